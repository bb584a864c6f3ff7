//! Cost of egress-deny per forwarded pod packet with the node's uplink filtered too (the
//! default deployment): by default a second lookup at the uplink (which sees the
//! destination after any DNAT), with `--trust-pod-verdicts` one lookup (at the veth). Measured by the kernel itself
//! (`kernel.bpf_stats_enabled`: the program's run time and run count) while a pod sends
//! real UDP through a real CNI chain (bridge) to a server behind the uplink, 1M rules.
//!
//!     cargo build --release --bins && cargo run --release -p egress-deny-tests --bin bench-one-verdict -- [--packets N] [--rules N] [--runs N]
use std::{fmt::Write as _, path::PathBuf};

use anyhow::{Context, Result};
use aya::programs::ProgramInfo;
use clap::Parser;
use egress_deny_datapath::{counters::CounterMap, paths::ProgramKind};
use egress_deny_tests::{
    bench::{machine, rule_mix, write_section},
    cni::{ALLOWED, CniNode, DENIED, Primary},
    installer::Installer,
    probe::udp_through,
    require_root,
};

#[derive(Parser)]
struct Args {
    /// UDP packets per run.
    #[arg(long, default_value_t = 100_000)]
    packets: usize,
    /// Rules loaded (the published benchmark's mix).
    #[arg(long, default_value_t = 1_000_000)]
    rules: usize,
    /// Runs per setting (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Where the table goes (a section of the benchmark document).
    #[arg(long, default_value = "tests/BENCHMARKS.md")]
    out: PathBuf,
}

const BATCH: usize = 200;

struct Run {
    ns_per_forwarded: f64,
    runs_per_forwarded: f64,
    judged_before_share: f64,
}

fn measure(flags: &[&str], args: &Args, rules: &str) -> Result<Vec<Run>> {
    let (node, dirs, conflist) = CniNode::with_installer_dirs(Primary::Bridge)?;
    dirs.publish_rules(&[("rules", rules.as_bytes())])?;
    let mut all = vec!["--host-interfaces=up0", "--deny-events-per-second=0"];
    all.extend_from_slice(flags);
    let installer = Installer::start(&dirs, Some(&node.node), &all)?;
    installer.wait_ready()?;
    let pod = node.pod()?;
    pod.add(&conflist, "")?.map_err(anyhow::Error::msg)?;
    let uplink: u32 = node
        .node
        .exec("cat", &["/sys/class/net/up0/ifindex"])?
        .trim()
        .parse()?;
    let program = dirs.layout().program(ProgramKind::Ethernet);
    let counters = CounterMap::open(&dirs.layout())?;
    let mut runs = Vec::new();
    // One warm-up run, not reported (neighbour resolution, caches).
    udp_through(pod.ns(), &node.server, ALLOWED, ALLOWED, 1000)?;
    for _ in 0..args.runs {
        let before = ProgramInfo::from_pin(&program)?;
        let up_before = counters.get(uplink)?;
        // In batches the receiver's socket buffer holds (it reads after each batch).
        let mut arrived = 0;
        for _ in 0..args.packets / BATCH {
            arrived += udp_through(pod.ns(), &node.server, ALLOWED, ALLOWED, BATCH)?;
        }
        let after = ProgramInfo::from_pin(&program)?;
        let up_after = counters.get(uplink)?;
        let forwarded = (up_after.allowed_packets - up_before.allowed_packets) as f64;
        anyhow::ensure!(
            arrived == args.packets,
            "{arrived} of {} arrived",
            args.packets
        );
        let ns = (after.run_time() - before.run_time()).as_nanos() as f64;
        let count = (after.run_count() - before.run_count()) as f64;
        runs.push(Run {
            ns_per_forwarded: ns / forwarded,
            runs_per_forwarded: count / forwarded,
            judged_before_share: (up_after.judged_before_packets - up_before.judged_before_packets)
                as f64
                / forwarded,
        });
    }
    Ok(runs)
}

fn median(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
}

fn main() -> Result<()> {
    require_root();
    let args = Args::parse();
    // Stats cost a little per run; restored when done (other benchmarks want it off).
    let stats = "/proc/sys/kernel/bpf_stats_enabled";
    let was = std::fs::read_to_string(stats).context("reading bpf_stats_enabled")?;
    std::fs::write(stats, "1").context("enabling bpf_stats")?;
    let result = run(&args);
    std::fs::write(stats, was.trim())?;
    result
}

fn run(args: &Args) -> Result<()> {
    let mut rules = format!("{DENIED}/32\n");
    // The mix never covers the test destinations.
    for (addr, len) in rule_mix(args.rules, 7) {
        let _ = writeln!(rules, "{}/{len}", std::net::Ipv4Addr::from(addr));
    }
    let mut table = String::new();
    let _ = writeln!(
        table,
        "## One verdict per forwarded pod packet\n\n`cargo run --release -p egress-deny-tests --bin bench-one-verdict` — a pod behind a bridge sends {} UDP packets per run to a server behind the node's filtered uplink, {} rules; the kernel's own accounting (`kernel.bpf_stats_enabled`) gives the time spent in egress-deny's program (both attachments: pod veth and uplink) per forwarded packet. Median (min–max) of {} runs. Machine: {}.\n",
        args.packets,
        args.rules,
        args.runs,
        machine()
    );
    let _ = writeln!(
        table,
        "| setting | program runs per packet | uplink passes without lookup | ns in egress-deny per forwarded packet |\n|---|---:|---:|---:|"
    );
    let settings: [(&str, &[&str]); 2] = [
        ("default: at the veth, again at the uplink", &[]),
        (
            "`--trust-pod-verdicts`: once, at the veth",
            &["--trust-pod-verdicts"],
        ),
    ];
    for (label, flags) in settings {
        let runs = measure(flags, args, &rules)?;
        let (ns, ns_min, ns_max) = median(runs.iter().map(|r| r.ns_per_forwarded).collect());
        let (per, _, _) = median(runs.iter().map(|r| r.runs_per_forwarded).collect());
        let (share, _, _) = median(runs.iter().map(|r| r.judged_before_share).collect());
        let _ = writeln!(
            table,
            "| {label} | {per:.2} | {:.0}% | {ns:.0} ({ns_min:.0}–{ns_max:.0}) |",
            share * 100.0
        );
        eprintln!("{label}: {ns:.0} ns per forwarded packet ({ns_min:.0}–{ns_max:.0})");
    }
    print!("{table}");
    write_section(&args.out, "one-verdict", &table)?;
    Ok(())
}
