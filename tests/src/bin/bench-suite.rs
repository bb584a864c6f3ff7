//! The published egress-filtering benchmark's methodology (Kinvolk, parts 1 and 2), every
//! mechanism side by side in one run: no filter, iptables (N DROP rules in FORWARD),
//! ipset `hash:net` + one iptables rule (Calico's mechanism), egress-deny (the installer's
//! load path + the plugin's attach path), and the reference tc LPM filter.
//!
//! Topology: pod ns → veth → node ns (routes; the filter sits here: tc ingress of the
//! pod's host-side veth, or FORWARD) → veth → server ns (iperf3, ping target, UDP echo).
//!
//!     cargo run --release -p egress-deny-tests --bin bench-suite -- [--quick] [--out DIR]
//!
//! Repetitions are interleaved (rep 1 of every mechanism, then rep 2, …) and within one
//! repetition every test brackets each mechanism with no-filter runs (none, A, none, B,
//! none, …), so each mechanism has its own baseline seconds away and slow drift of a
//! shared machine cancels in the ratio; the report gives median ratios with their spread
//! over repetitions. Besides iperf3's one destination, an own UDP sender cycles through
//! thousands of destinations (some denied) that the server namespace owns, and the
//! kernel's per-program accounting (bpf_stats) gives the eBPF filters' ns per packet
//! under that real traffic. Every repetition applies the rule set afresh, so set-up time
//! is a median too. Everything it creates (namespaces under one
//! random prefix, bpffs pins under `/sys/fs/bpf/egress-deny-bench-<prefix>-*`, child
//! processes by pid; iptables rules and ipsets live inside its node namespace) is removed
//! on exit, on error, on panic and on SIGINT/SIGTERM.
//!
//! This file is the command line and the run's order; the parts are in
//! `egress_deny_tests::bench::suite` (tests/src/bench/suite/).
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use clap::Parser;
use egress_deny_tests::{
    bench::{
        rule_mix,
        suite::{
            Results, Suite,
            limits::Limits,
            measurement::{
                bpf_stats::BpfStats,
                cpu::busy_over,
                destinations::{Destinations, covers, prefix_lens},
                iperf,
                setup_time::probe_target,
            },
            mechanisms::{Applier, MECHANISMS, Prepared},
            processes::{own_everything, pin_prefix},
            repetition::{Repeater, Traffic},
            report,
            topology::{SERVER, SERVER_ADDR, Topology},
        },
    },
    random_suffix, require_root,
};

/// Repetitions of a full run (≈ 13 min each). At the quick run's spread this gives a
/// 95% confidence interval of about ±3–5% on the 1M paired ratios; ±3% on all of them
/// took 7 (`--reps 7`, see tests/BENCHMARKS.md).
const DEFAULT_REPS: usize = 5;
/// A full run's own stop: well above its expected duration (see tests/BENCHMARKS.md).
const DEFAULT_BUDGET_MINUTES: f64 = 90.0;

#[derive(Parser)]
#[command(about = "Egress filtering benchmark: every mechanism side by side")]
struct Args {
    /// N = 10k, 1M; 3 repetitions; 2 s iperf3 runs, 1 s own-sender runs (about 9 minutes).
    #[arg(long)]
    quick: bool,
    /// Where RESULTS.md, results.csv and the SVG plots go.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Rule counts (comma list); default 10,100,1000,10000,100000,1000000,10000000
    /// (quick: 10000,1000000).
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<usize>>,
    /// Mechanisms to run (comma list of none,iptables,ipset,egress-deny,reference-lpm).
    #[arg(long, value_delimiter = ',')]
    mechanisms: Option<Vec<String>>,
    /// Repetitions per (mechanism, N); medians and their spread are reported.
    /// Default 5 (quick: 3).
    #[arg(long)]
    reps: Option<usize>,
    /// Seconds per iperf3 run. Default 3 (quick: 2).
    #[arg(long)]
    secs: Option<u32>,
    /// Seconds per own-sender run (packets/s, one and many destinations). Default 2
    /// (quick: 1).
    #[arg(long)]
    blast_secs: Option<f64>,
    /// Destinations of the many-destination test.
    #[arg(long, default_value_t = 4096)]
    destinations: usize,
    /// Share of them inside the rule list (denied by every filter).
    #[arg(long, default_value_t = 0.1)]
    deny_share: f64,
    /// A mechanism is not tried at a size whose set-up (extrapolated linearly from the
    /// previous size) would exceed this, and an attempt is killed when it does.
    #[arg(long, default_value_t = 180)]
    setup_budget_secs: u64,
    /// A mechanism whose ICMP latency is already over 1 ms (a per-packet cost that grows
    /// with N) is not tried at a size where, extrapolated linearly, it would exceed this:
    /// every packet then costs the forwarding CPU that long, and the 1000-packet backlog
    /// an unlimited-rate test leaves behind takes minutes to drain.
    #[arg(long, default_value_t = 50.0)]
    max_packet_ms: f64,
    /// Wall-clock budget: repetitions that would start after it are skipped (and
    /// reported). Default 90 min (quick: 15 min).
    #[arg(long)]
    budget_minutes: Option<f64>,
    /// Seed of the rule lists.
    #[arg(long, default_value_t = 11)]
    seed: u64,
}

fn main() -> Result<()> {
    require_root();
    let args = Args::parse();
    let quick = args.quick;
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-results"));
    let sizes = args.sizes.clone().unwrap_or_else(|| {
        if quick {
            vec![10_000, 1_000_000]
        } else {
            vec![10, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000]
        }
    });
    let mechanisms: Vec<&'static str> = match &args.mechanisms {
        None => MECHANISMS.to_vec(),
        Some(list) => {
            let mut picked = Vec::new();
            for m in list {
                match MECHANISMS.iter().find(|k| **k == m.as_str()) {
                    Some(k) => picked.push(*k),
                    None => bail!("unknown mechanism {m} (known: {})", MECHANISMS.join(",")),
                }
            }
            // Table order, whatever the command line order.
            MECHANISMS
                .iter()
                .copied()
                .filter(|m| picked.contains(m))
                .collect()
        }
    };
    let reps = args
        .reps
        .unwrap_or(if quick { 3 } else { DEFAULT_REPS })
        .max(1);
    let secs = args.secs.unwrap_or(if quick { 2 } else { 3 }).max(1);
    let blast_secs = args
        .blast_secs
        .unwrap_or(if quick { 1.0 } else { 2.0 })
        .clamp(0.2, 30.0);
    let budget = Duration::from_secs_f64(
        60.0 * args
            .budget_minutes
            .unwrap_or(if quick { 15.0 } else { DEFAULT_BUDGET_MINUTES }),
    );
    if !(0.0..=0.5).contains(&args.deny_share) {
        bail!("--deny-share must be within 0..0.5");
    }
    let destination_count = args.destinations.clamp(1, 65_536);
    let setup_budget = Duration::from_secs(args.setup_budget_secs);
    for tool in [
        "iperf3",
        "ping",
        "iptables",
        "iptables-restore",
        "ipset",
        "taskset",
        "ss",
    ] {
        which(tool)?;
    }

    let prefix = format!("bs{}", &random_suffix()[..4]);
    let _cleanup = own_everything(&prefix)?;
    println!(
        "bench-suite: namespaces {prefix}*, pins /sys/fs/bpf/{}*; sizes {sizes:?}, {reps} rep(s), {secs} s per iperf3 run",
        pin_prefix(&prefix)
    );
    let background_before = busy_over(Duration::from_secs(2));
    let bpf_stats = BpfStats::enable()?;

    let topo = Topology::new(&prefix)?;
    let iperf_server = iperf::start_server(&topo)?;

    let mut suite = Suite {
        quick,
        sizes: sizes.clone(),
        mechanisms: mechanisms.clone(),
        reps,
        secs,
        blast_secs,
        destinations: destination_count,
        deny_share: args.deny_share,
        seed: args.seed,
        setup_budget,
        stats_mode: bpf_stats.describe().to_owned(),
        rep_times: Vec::new(),
        results: Results::new(),
        notes: BTreeSet::new(),
        stopped: BTreeMap::new(),
        took: Duration::ZERO,
        background_before,
        background_after: f64::NAN,
        command: format!(
            "cargo run --release -p egress-deny-tests --bin bench-suite --{}",
            std::env::args()
                .skip(1)
                .map(|a| format!(" {a}"))
                .collect::<String>()
        ),
    };
    let mut repeater = Repeater {
        applier: Applier {
            topo: &topo,
            prefix: &prefix,
            pins_made: 0,
            setup_budget,
        },
        iperf_server_pid: iperf_server.pid(),
        secs,
        blast_secs,
        limits: Limits::new(setup_budget, args.max_packet_ms),
    };
    let suite_started = Instant::now();
    let mut out_of_time = false;
    for &n in &sizes {
        let generated = Instant::now();
        let rules = rule_mix(n.max(1), args.seed);
        if covers(&rules, &prefix_lens(&rules), u32::from(SERVER_ADDR)) {
            bail!("the traffic destination {SERVER} is inside the rule list");
        }
        // The same destinations for every mechanism at this N (they depend on the rule
        // list: the denied ones are inside it). Never the set-up test's target.
        let many = Destinations::new(
            &rules,
            destination_count,
            args.deny_share,
            args.seed,
            &[SERVER_ADDR, probe_target(&rules).unwrap_or(SERVER_ADDR)],
        )?;
        many.install(&topo)?;
        let denied_now = many.list.iter().filter(|(_, d)| *d).count();
        let denied_asked = (destination_count as f64 * args.deny_share).round() as usize;
        if denied_now < denied_asked {
            suite.notes.insert(format!(
                "N={n}: the rule list holds only {denied_now} distinct denied destinations (asked for {denied_asked}); the many-destination test used those."
            ));
        }
        let prepared = Prepared::new(rules, &mechanisms);
        println!(
            "N={n}: {} rules generated and formatted, {} destinations routed ({} denied) in {:.1} s",
            prepared.rules.len(),
            many.list.len(),
            denied_now,
            generated.elapsed().as_secs_f64()
        );
        let traffic = Traffic {
            prepared: &prepared,
            many: many.list.clone(),
        };
        for rep in 0..reps {
            if suite_started.elapsed() > budget {
                out_of_time = true;
                break;
            }
            repeater.run(&mut suite, n, rep, &traffic)?;
        }
        if let Err(e) = many.uninstall(&topo) {
            suite.notes.insert(format!(
                "N={n}: removing the destination routes failed: {e:#}"
            ));
        }
        if out_of_time {
            suite.notes.insert(format!(
                "The {:.0}-minute time budget ran out at N={n}: later steps were not run.",
                budget.as_secs_f64() / 60.0
            ));
            break;
        }
    }
    suite.took = suite_started.elapsed();
    drop(bpf_stats);
    suite.background_after = busy_over(Duration::from_secs(2));
    drop(iperf_server);
    drop(topo);
    report::write(&out_dir, &suite)?;
    println!(
        "bench-suite: done in {:.1} min; wrote {}",
        suite.took.as_secs_f64() / 60.0,
        out_dir.join("RESULTS.md").display()
    );
    Ok(())
}

fn which(tool: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        bail!("{tool} not found: run tests/setup.sh");
    }
    Ok(())
}
