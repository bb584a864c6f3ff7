//! RESULTS.md: the run's settings, the machine and the method, the headline table at 1M
//! rules with the spread of its ratios, what limits each mechanism, one section per
//! metric (its table and plot), set-up phases, time per repetition, and notes.
use std::fmt::Write as _;

use crate::bench::suite::{Suite, topology::SERVER};

use super::{
    machine,
    metrics::{
        EBPF, Kind, METRICS, Metric, as_ratio, by_key, has_baseline, mech_index, med, paired_ratio,
        runs, shown, shown_mechanisms, values,
    },
    numbers::{count, fmt, pct, secs},
    stats::{GOAL, Stat, median},
};

/// The whole of RESULTS.md, in the order it reads.
pub fn document(suite: &Suite) -> String {
    let mut md = String::new();
    title(&mut md, suite);
    machine_section(&mut md, suite);
    method(&mut md, suite);
    let head_n = headline_size(suite);
    let _ = writeln!(md, "## Headline at {} rules\n", count(head_n));
    if has_baseline(suite) {
        headline(&mut md, suite, head_n);
        spread_table(&mut md, suite, head_n);
    }
    // What limits each mechanism, with this run's numbers.
    let _ = writeln!(md, "## What limits each mechanism\n");
    let _ = writeln!(md, "{}", what_limits(suite));
    for metric in &METRICS {
        metric_section(&mut md, suite, metric);
    }
    setup_phases(&mut md, suite);
    repetition_times(&mut md, suite);
    if has_baseline(suite) {
        closing_note(&mut md, suite, head_n);
    }
    stops_and_notes(&mut md, suite);
    md
}

/// "median (min–max)", or just the median of a single value.
fn cell(st: Option<Stat>, as_pct: bool, decimals: usize) -> String {
    let Some(st) = st else {
        return "—".into();
    };
    let f = |v: f64| {
        if as_pct {
            pct(v).trim_end_matches('%').to_owned()
        } else {
            fmt(v, decimals)
        }
    };
    // Ratios of ×10 and more (iptables at large N) read better as factors.
    if as_pct && st.median >= 10.0 {
        return if st.n == 1 {
            format!("×{:.0}", st.median)
        } else {
            format!("×{:.0} (×{:.0}–×{:.0})", st.median, st.min, st.max)
        };
    }
    let unit = if as_pct { "%" } else { "" };
    if st.n == 1 {
        format!("{}{unit}", f(st.median))
    } else {
        format!("{}{unit} ({}–{})", f(st.median), f(st.min), f(st.max))
    }
}

/// The cell of one (metric, mechanism, N): a ratio for the ratio metrics (the
/// baseline's absolute value for `none`), else the absolute value.
fn metric_cell(suite: &Suite, metric: &Metric, m: &str, n: usize) -> String {
    let mi = mech_index(m);
    let ratio = metric.kind == Kind::Ratio && m != "none" && suite.mechanisms.contains(&"none");
    let st = Stat::of(&values(suite, mi, n, metric, ratio));
    cell(st, ratio, metric.decimals)
}

/// The heading: what ran, when, how long; a warning on a quick run.
fn title(md: &mut String, suite: &Suite) {
    let date = machine::date();
    let _ = writeln!(
        md,
        "# Egress filtering benchmark: every mechanism side by side{}\n\n\
         `{}` — {date}, took {:.1} min, {} repetition(s) per size.\n",
        if suite.quick { " (QUICK RUN)" } else { "" },
        suite.command.trim_end_matches(" --"),
        suite.took.as_secs_f64() / 60.0,
        suite.reps,
    );
    if suite.quick {
        let _ = writeln!(
            md,
            "> **Quick run**: two sizes, {} repetitions, short runs ({} s iperf3, {} s own sender). It checks\n\
             > that everything works end to end and measures the spread; it is not the full run (N = 10 … 10M),\n\
             > whose command is in tests/BENCHMARKS.md.\n",
            suite.reps, suite.secs, suite.blast_secs
        );
    }
}

fn machine_section(md: &mut String, suite: &Suite) {
    let _ = writeln!(
        md,
        "## Machine\n\n{}\n- Background load of the (shared) machine, no benchmark traffic: {:.0}% busy before the run, {:.0}% after.\n",
        machine::description(),
        100.0 * suite.background_before,
        100.0 * suite.background_after
    );
}

/// How the run measured, with its settings.
fn method(md: &mut String, suite: &Suite) {
    let _ = writeln!(
        md,
        "## Method\n\n\
         The methodology of the published egress-filtering benchmark (Kinvolk, \"egress filtering\n\
         benchmark\", parts 1 and 2) on one machine. A pod namespace sends through a veth pair into a\n\
         node namespace that routes (`ip_forward=1`) through a second veth pair to a server namespace\n\
         (iperf3 server, ping target, UDP echo responder, UDP sink). The filter sits on the pod's path in the\n\
         node namespace: tc ingress of the pod's host-side veth (TCX) for the eBPF filters, the\n\
         FORWARD chain for iptables and ipset.\n\n\
         - **none**: no filter (baseline).\n\
         - **iptables**: N `-d CIDR -j DROP` rules, loaded with one `iptables-restore --noflush` into a\n  chain that FORWARD jumps to (one extra rule per packet; the jump is what switches it on and\n  off, see below).\n\
         - **ipset**: one `hash:net` set loaded with `ipset restore` + one `-m set --match-set … dst -j DROP`\n  rule (Calico's mechanism underneath).\n\
         - **egress-deny**: the installer's load path (`load_and_pin`, then the rules compiled into a\n  table and swapped into the pinned outer map, as the installer does; the set-up phase \"rule\n  inserts\" is that compile + swap) and the CNI plugin's ADD path (`attach`: TCX on tc ingress\n  of the host-side veth).\n\
         - **reference-lpm**: the published benchmark's tc-eBPF design (one plain LPM-trie lookup per\n  packet, IPv4 only, no counters), loaded with aya, inserted from one thread, TCX on the same hook.\n\n\
         Rules: N random global-unicast IPv4 prefixes, ≈89% /32, 10% /24, 1% /16, seed {seed}; the\n\
         one-destination tests' destination ({server}) is outside every list (checked), the set-up test's\n\
         destination is a /32 from the list (the last one, deepest in the iptables chain). The\n\
         many-destination test cycles through {dests} addresses (shuffled): {deny:.0}% inside the rule list\n\
         (a random host of a random rule: denied by every filter), the rest random global-unicast\n\
         addresses no rule covers; the same addresses for every mechanism at one N. The server\n\
         namespace owns them all (a `local` route each) and the node namespace routes them to it, so\n\
         no packet leaves the run's namespaces.\n\n\
         **Pairing.** Per N and repetition, every mechanism's rule set is applied afresh (set-up\n\
         timed), then switched off but kept loaded. Then each test runs for every mechanism with only\n\
         that one switched on (TCX attach/detach for the eBPF filters, one FORWARD rule at position 1\n\
         for iptables/ipset), bracketed by no-filter runs: none, A, none, B, none, … (the order of\n\
         A, B, … rotates with the repetition). A mechanism's baseline in that repetition is the mean\n\
         of the two no-filter runs right before and after it, seconds away, so a shared machine's\n\
         drift cancels to first order in the ratio. Tables give the median over repetitions and,\n\
         in brackets, the smallest and largest repetition (min–max). Everything is then unloaded,\n\
         and the next set-up waits (capped) for the kernel to finish freeing big sets and tries.\n\n\
         - UDP throughput: `iperf3 -u -b 0 -l 1470 -t {secs}`, datagrams the server received per second.\n\
         - Packets/s: an own sender (one thread, pinned to CPU 0, 64-byte datagrams, as fast as\n  `sendto` returns) for {blast} s, to the one destination or cycling through the many; a receiver\n  thread in the server namespace (CPU 1) counts what arrives while the sender runs (for many\n  destinations: what arrives at allowed ones; a packet to a denied one that arrives is a leak,\n  `many_denied_arrived` in results.csv).\n\
         - ns per packet: the kernel's own accounting of the attached program's run time and run\n  count during those packets/s runs ({stats}): Δrun_time / Δrun_cnt, for egress-deny and the\n  reference LPM filter.\n\
         - CPU per packet: during `iperf3 -u -b 1G -l 1470`, the run time of the iperf3 client and\n  server (all threads) and the ksoftirqd threads from `/proc/<pid>/task/*/schedstat` (the\n  scheduler's ns clock), over the datagrams received. This kernel has tick-based CPU accounting\n  without IRQ time accounting: the forwarding softirq (and the filter in it) served in the\n  sender's context is in the sender's run time, the rest in ksoftirqd's; other work on a shared\n  machine is in neither. `/proc/stat`'s per-CPU softirq column is not used: it is tick-sampled,\n  counts everyone's softirq on that CPU, and the same time is already in the task's run time.\n  results.csv also has this for the own sender (`cpu_ns_pkt_single`, `cpu_ns_pkt_many`: sender +\n  receiver threads + ksoftirqd per packet sent) and the rate reached (`cpu_rate_mbps`).\n\
         - ICMP: `ping -i 0.001 -c 1000`, average and p99 of the per-packet times.\n\
         - Request/response: 32-byte UDP request, echoed back, one at a time, 2000 round trips (or\n  5 s), p50 and p99; client and responder on CPU 0 (cross-CPU wake-ups of an idle vCPU cost\n  tens of µs here and would drown the filters' differences).\n\
         - Set-up: a probe datagram every 0.5 ms from the pod to the in-list destination; the time\n  from starting to apply the rule set until the first probe that never arrived was sent.\n\
         - Senders pinned to CPU 0, receivers to CPU 1: the forwarding path (and so the filter) runs\n  in softirq on the sender's CPU, so filter cost shows up as lost throughput.\n\n\
         Every number comes from one 2-core VM where sender, router and receiver share the CPUs:\n\
         compare mechanisms within the run, not with other machines. Raw repetitions, each with its\n\
         paired baseline (`base_*` columns): `results.csv`.\n",
        seed = suite.seed,
        server = SERVER,
        dests = suite.destinations,
        deny = 100.0 * suite.deny_share,
        secs = suite.secs,
        blast = suite.blast_secs,
        stats = suite.stats_mode,
    );
}

/// The headline's rule count: 1M if the run had it, else its largest.
fn headline_size(suite: &Suite) -> usize {
    if suite.sizes.contains(&1_000_000) {
        1_000_000
    } else {
        suite.sizes.iter().copied().max().unwrap_or(0)
    }
}

/// One row per mechanism at `head_n`: the ratio metrics as % of the paired baseline, the
/// rest absolute.
fn headline(md: &mut String, suite: &Suite, head_n: usize) {
    let head_reps = suite
        .mechanisms
        .iter()
        .map(|m| runs(suite, mech_index(m), head_n).len())
        .max()
        .unwrap_or(0);
    let _ = writeln!(
        md,
        "Throughput, packets/s and the own sender's CPU per packet (sender thread + ksoftirqd) as a\n\
         fraction of the paired no-filter baseline (CPU above 100% = costlier); program ns per packet\n\
         (bpf_stats), CPU per packet at 1 Gbit/s, latency and set-up in absolute numbers (the\n\
         baseline's own in the first row). Median of {head_reps} repetition(s) (min–max).\n\n\
         | mechanism | UDP throughput | pps, one destination | pps, many destinations | CPU/packet, one dest. | CPU/packet, many dest. | ns/packet (bpf_stats), one dest. | ns/packet, many dest. | CPU ns/packet at 1 Gbit/s | ping avg ms | set-up s |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for &m in &suite.mechanisms {
        let mi = mech_index(m);
        if runs(suite, mi, head_n).is_empty() {
            let why = suite
                .stopped
                .get(m)
                .map(|(at, why)| format!("not measured (stopped at {}: {why})", count(*at)))
                .unwrap_or_else(|| "not measured".into());
            let _ = writeln!(md, "| {m} | {why} | | | | | | | | | |");
            continue;
        }
        let c = |key: &str| {
            let metric = by_key(key);
            if shown(metric, m) {
                metric_cell(suite, metric, m, head_n)
            } else {
                "—".into()
            }
        };
        let _ = writeln!(
            md,
            "| {m} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c("udp_throughput"),
            c("udp_pps"),
            c("udp_pps_many"),
            c("cpu_per_packet"),
            c("cpu_per_packet_many"),
            c("ns_per_packet"),
            c("ns_per_packet_many"),
            c("cpu"),
            c("ping_avg"),
            c("setup"),
        );
    }
    md.push('\n');
}

/// One metric's table over the run's sizes (its plot is `{key}.svg`).
fn metric_section(md: &mut String, suite: &Suite, metric: &Metric) {
    let mechs = shown_mechanisms(suite, metric);
    if mechs.is_empty() {
        return;
    }
    let ratio = as_ratio(suite, metric);
    let header: Vec<String> = mechs
        .iter()
        .map(|m| {
            if ratio && *m != "none" {
                format!("{m} (% of paired none)")
            } else if ratio {
                format!("none ({})", metric.unit)
            } else {
                m.to_string()
            }
        })
        .collect();
    let _ = writeln!(
        md,
        "## {} ({})\n\n![{}]({}.svg)\n\n{}\n\n| rules | {} | reps |\n|---:|{}---:|",
        metric.title,
        metric.unit,
        metric.key,
        metric.key,
        metric.spread,
        header.join(" | "),
        "---:|".repeat(mechs.len())
    );
    for &n in &suite.sizes {
        let cells: Vec<String> = mechs
            .iter()
            .map(|m| {
                let mut c = metric_cell(suite, metric, m, n);
                if metric.key == "cpu" && med(suite, mech_index(m), n, |s| s.cpu_rate_mbps) < 900.0
                {
                    c.push_str(" *");
                }
                c
            })
            .collect();
        let reps = mechs
            .iter()
            .map(|m| values(suite, mech_index(m), n, metric, false).len())
            .max()
            .unwrap_or(0);
        let _ = writeln!(md, "| {} | {} | {reps} |", count(n), cells.join(" | "));
    }
    if metric.key == "cpu" {
        let _ = writeln!(
            md,
            "\n`*`: the rate reached was under 0.9 Gbit/s (the filter could not carry 1 Gbit/s), so\nthe number is not \"at 1 Gbit/s\"."
        );
    }
    md.push('\n');
}

/// What each step of applying and removing the rule sets took.
fn setup_phases(md: &mut String, suite: &Suite) {
    let _ = writeln!(
        md,
        "## Set-up phases and teardown (medians, s)\n\n\
         Wall time of each step of applying the rule set (what \"set-up\" above is made of), and\n\
         of removing it again (flush / destroy / unpin; the kernel may free memory after that).\n\n\
         | mechanism | rules | phases | apply total | teardown |\n|---|---:|---|---:|---:|"
    );
    for &m in suite.mechanisms.iter().filter(|m| **m != "none") {
        let mi = mech_index(m);
        for &n in &suite.sizes {
            let runs = runs(suite, mi, n);
            if runs.is_empty() {
                continue;
            }
            let names: Vec<&str> = runs
                .first()
                .map(|r| r.setup.phases.iter().map(|(p, _)| *p).collect())
                .unwrap_or_default();
            let phases: Vec<String> = names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    let v = median(
                        runs.iter()
                            .filter_map(|r| r.setup.phases.get(i).map(|(_, d)| d.as_secs_f64()))
                            .collect(),
                    );
                    format!("{name} {v:.3}")
                })
                .collect();
            let _ = writeln!(
                md,
                "| {m} | {} | {} | {} | {} |",
                count(n),
                phases.join(", "),
                fmt(
                    median(runs.iter().map(|r| secs(r.setup.apply)).collect()),
                    3
                ),
                fmt(
                    median(runs.iter().map(|r| r.teardown.as_secs_f64()).collect()),
                    3
                )
            );
        }
    }
    md.push('\n');
}

/// For planning runs with other sizes and repetition counts.
fn repetition_times(md: &mut String, suite: &Suite) {
    let _ = writeln!(
        md,
        "## Time per repetition\n\nWall time of one repetition (every mechanism's set-up, all tests with their paired\nbaselines, teardown) at each size: median (min–max) s.\n\n| rules | s per repetition | repetitions |\n|---:|---:|---:|"
    );
    for &n in &suite.sizes {
        let times: Vec<f64> = suite
            .rep_times
            .iter()
            .filter(|(size, _, _)| *size == n)
            .map(|(_, _, d)| d.as_secs_f64())
            .collect();
        if let Some(st) = Stat::of(&times) {
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                count(n),
                cell(Some(st), false, 0),
                st.n
            );
        }
    }
    md.push('\n');
}

fn stops_and_notes(md: &mut String, suite: &Suite) {
    let _ = writeln!(md, "## Where mechanisms stopped, and other notes\n");
    if suite.stopped.is_empty() && suite.notes.is_empty() {
        let _ = writeln!(md, "- Every mechanism ran at every size.");
    }
    for (m, (n, why)) in &suite.stopped {
        let _ = writeln!(md, "- **{m}** stopped at {}: {why}.", count(*n));
    }
    for note in &suite.notes {
        let _ = writeln!(md, "- {note}");
    }
}

/// For the ratio metrics at `n`: the per-repetition spread, the 95% confidence interval
/// of the mean ratio it gives, and how many repetitions would bring that under ±3%.
fn spread_table(md: &mut String, suite: &Suite, n: usize) {
    let _ = writeln!(
        md,
        "### Spread of the paired ratios at {} rules\n\n\
         Per-repetition ratios (mechanism ÷ its paired baseline): their standard deviation, the 95%\n\
         confidence interval of their mean (Student t, relative to the mean), and the repetitions\n\
         that would bring that interval under ±{:.0}% at this spread (t·sd/√n ≤ {:.0}%). Mechanisms whose\n\
         ratio is far from 100% (iptables at large N) need no precision to be read.\n\n\
         | mechanism | metric | reps | mean ratio | sd | 95% CI of the mean | reps for ±{:.0}% |\n\
         |---|---|---:|---:|---:|---:|---:|",
        count(n),
        100.0 * GOAL,
        100.0 * GOAL,
        100.0 * GOAL,
    );
    for &m in suite.mechanisms.iter().filter(|m| **m != "none") {
        for metric in METRICS.iter().filter(|k| k.kind == Kind::Ratio) {
            let Some(st) = Stat::of(&values(suite, mech_index(m), n, metric, true)) else {
                continue;
            };
            let _ = writeln!(
                md,
                "| {m} | {} | {} | {} | {} | {} | {} |",
                metric.key,
                st.n,
                pct(st.mean),
                if st.sd.is_finite() {
                    format!("{:.1} pp", 100.0 * st.sd)
                } else {
                    "—".into()
                },
                if st.n > 1 {
                    format!("±{:.1}%", 100.0 * st.ci_rel())
                } else {
                    "—".into()
                },
                st.reps_for_goal()
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "—".into()),
            );
        }
    }
    md.push('\n');
}

/// The headline row of each eBPF filter in words, with the precision this run reached
/// and the repetitions ±3% would take at its spread.
fn closing_note(md: &mut String, suite: &Suite, n: usize) {
    let _ = writeln!(md, "## Closing note ({} rules)\n", count(n));
    for &m in suite.mechanisms.iter().filter(|m| EBPF.contains(m)) {
        let mi = mech_index(m);
        if runs(suite, mi, n).is_empty() {
            continue;
        }
        let ratio = |key: &str| {
            let st = Stat::of(&values(suite, mi, n, by_key(key), true));
            let ci = st
                .filter(|s| s.n > 1)
                .map(|s| format!("; 95% CI of the mean ±{:.1}%", 100.0 * s.ci_rel()))
                .unwrap_or_default();
            let need = st
                .and_then(|s| s.reps_for_goal())
                .map(|r| format!("; ±3% takes {r} repetitions at this spread"))
                .unwrap_or_default();
            format!(
                "**{}** [{}{ci}{need}]",
                cell(st, true, 0),
                st.map(|s| s.n).unwrap_or(0)
            )
        };
        let abs = |key: &str| {
            cell(
                Stat::of(&values(suite, mi, n, by_key(key), false)),
                false,
                0,
            )
        };
        let _ = writeln!(
            md,
            "- **{m}**, as % of the paired no-filter baseline, median (min–max) [repetitions; …]:\n  UDP throughput {};\n  packets/s, one destination {};\n  packets/s, many destinations {};\n  CPU per packet on the forwarding CPU, one destination {};\n  the same, many destinations {};\n  program run time (bpf_stats) {} ns per packet with one destination, {} ns with many.",
            ratio("udp_throughput"),
            ratio("udp_pps"),
            ratio("udp_pps_many"),
            ratio("cpu_per_packet"),
            ratio("cpu_per_packet_many"),
            abs("ns_per_packet"),
            abs("ns_per_packet_many"),
        );
    }
    md.push('\n');
}

/// Per mechanism, the cost that grows with N, with this run's numbers, and where it
/// stopped.
fn what_limits(suite: &Suite) -> String {
    let measured: Vec<usize> = suite
        .sizes
        .iter()
        .copied()
        .filter(|n| suite.results.contains_key(&(mech_index("iptables"), *n)))
        .collect();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "- **The machine**: 2 cores shared by sender, router and receiver (and, on a shared machine,\n  other work). With no filter, throughput is bounded by the sender's CPU, which also runs the\n  forwarding softirq; every nanosecond a filter spends per packet comes out of that budget."
    );
    if let (Some(first), Some(last)) = (measured.first(), measured.last()) {
        let ping = |n: usize| med(suite, mech_index("iptables"), n, |s| s.ping_avg_ms);
        let _ = writeln!(
            s,
            "- **iptables**: the FORWARD chain is walked rule by rule for every packet, so cost grows\n  linearly with N (ping average {} ms at {} → {} ms at {}; throughput {} of the baseline at\n  {}). {}",
            fmt(ping(*first), 3),
            count(*first),
            fmt(ping(*last), 3),
            count(*last),
            pct(paired_ratio(suite, mech_index("iptables"), *last, |s| s.udp_mbps)),
            count(*last),
            match suite.stopped.get("iptables") {
                Some((n, why)) => format!("Not run at {} and beyond: {why}.", count(*n)),
                None => "It ran at every size of this run.".into(),
            }
        );
    }
    let lim = |m: &str| match suite.stopped.get(m) {
        Some((n, why)) => format!(" Stopped at {}: {why}.", count(*n)),
        None => String::new(),
    };
    let _ = writeln!(
        s,
        "- **ipset** (Calico's mechanism): one hash lookup per distinct prefix length in the set\n  (3 here: /16, /24, /32) behind a single iptables rule, so per-packet cost is nearly flat in\n  N; set-up is `ipset restore` pushing every entry through netlink, growing the hash as it\n  goes, linear in N.{}",
        lim("ipset")
    );
    let _ = writeln!(
        s,
        "- **egress-deny**: one lookup in the compiled rule table per packet (a direct-table read\n  and a binary search within one block of ranges: ~75–120 ns per verdict with a hot cache\n  at any size in BPF_PROG_TEST_RUN, ~160 / 380 ns with uniformly random destinations at\n  1M / 10M rules, see tests/BENCHMARKS.md; under this run's real traffic see the bpf_stats\n  ns/packet tables) plus Ethernet/VLAN/IPv6 parsing and per-attachment counters. Set-up:\n  program load and verification, compiling the rules into a table and swapping it in\n  (one map update; ~0.05 s at 1M, ~0.4 s at 10M), and the TCX attach (`BPF_LINK_CREATE`\n  waits for an RCU grace period). In production the program and link already exist and an\n  update is only the compile and the swap.{}",
        lim("egress-deny")
    );
    let _ = writeln!(
        s,
        "- **reference-lpm**: the published benchmark's design, one kernel LPM-trie lookup per packet\n  (egress-deny's datapath before its compiled tables), without parsing beyond IPv4 and\n  without counters; its cost grows with the trie's size, above all with many destinations;\n  set-up is one `bpf()` update per rule from one thread. The anchor for datapath work.{}",
        lim("reference-lpm")
    );
    s
}
