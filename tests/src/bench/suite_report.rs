//! bench-suite's output: RESULTS.md (machine, method, headline ratios, what limits each
//! mechanism, one table + SVG plot per metric), results.csv (every repetition).
use std::{fmt::Write as _, path::Path, process::Command, time::Duration};

use anyhow::Result;

use crate::{Run, Sample, Suite};

const COLORS: [&str; 5] = ["#7f7f7f", "#d62728", "#ff7f0e", "#2ca02c", "#1f77b4"];

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let m = values.len() / 2;
    if values.len() % 2 == 1 {
        values[m]
    } else {
        (values[m - 1] + values[m]) / 2.0
    }
}

type Get = fn(&Run) -> f64;

fn secs(d: Option<Duration>) -> f64 {
    d.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN)
}

struct Metric {
    key: &'static str,
    title: &'static str,
    unit: &'static str,
    log_y: bool,
    decimals: usize,
    get: Get,
    /// Only for the mechanisms that apply a rule set.
    filters_only: bool,
}

const METRICS: [Metric; 8] = [
    Metric {
        key: "udp_throughput",
        title: "UDP throughput, 1470-byte datagrams, unlimited rate (received)",
        unit: "Mbit/s",
        log_y: false,
        decimals: 0,
        get: |r| r.sample.udp_mbps,
        filters_only: false,
    },
    Metric {
        key: "udp_pps",
        title: "UDP packets/s, 64-byte datagrams, unlimited rate (received)",
        unit: "packets/s",
        log_y: false,
        decimals: 0,
        get: |r| r.sample.pps,
        filters_only: false,
    },
    Metric {
        key: "cpu",
        title: "CPU at a fixed 1 Gbit/s UDP rate: iperf3 client + server + softirq",
        unit: "% of one core",
        log_y: false,
        decimals: 1,
        get: |r| r.sample.cpu_pct,
        filters_only: false,
    },
    Metric {
        key: "ping_avg",
        title: "ICMP latency, 1 ms interval ×1000, average",
        unit: "ms",
        log_y: true,
        decimals: 3,
        get: |r| r.sample.ping_avg_ms,
        filters_only: false,
    },
    Metric {
        key: "ping_p99",
        title: "ICMP latency, 1 ms interval ×1000, p99",
        unit: "ms",
        log_y: true,
        decimals: 3,
        get: |r| r.sample.ping_p99_ms,
        filters_only: false,
    },
    Metric {
        key: "rr_p50",
        title: "UDP request/response round trip, p50",
        unit: "µs",
        log_y: true,
        decimals: 1,
        get: |r| r.sample.rr_p50_us,
        filters_only: false,
    },
    Metric {
        key: "rr_p99",
        title: "UDP request/response round trip, p99",
        unit: "µs",
        log_y: true,
        decimals: 1,
        get: |r| r.sample.rr_p99_us,
        filters_only: false,
    },
    Metric {
        key: "setup",
        title: "Set-up time: rule set applied → test destination dropped",
        unit: "s",
        log_y: true,
        decimals: 3,
        get: |r| secs(r.effective),
        filters_only: true,
    },
];

fn fmt(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "—".into()
    }
}

fn sh(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> String {
    let lscpu = sh("lscpu", &[]);
    let field = |name: &str| {
        lscpu
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == name).then(|| v.trim().to_owned())
            })
            .unwrap_or_else(|| "?".into())
    };
    let mem = egress_deny_tests::bench::meminfo_kib("MemTotal").unwrap_or(0) / 1024 / 1024;
    let hypervisor = field("Hypervisor vendor");
    format!(
        "- CPU: {} (lscpu), {} CPU(s), {} thread(s) per core{}\n\
         - Memory: {mem} GiB; kernel {}; {}\n\
         - Tools: {}; {}; {}",
        field("Model name"),
        field("CPU(s)"),
        field("Thread(s) per core"),
        if hypervisor == "?" {
            String::new()
        } else {
            format!(", virtualised ({hypervisor})")
        },
        sh("uname", &["-r"]),
        std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("PRETTY_NAME=")
                        .map(|v| v.trim_matches('"').to_owned())
                })
            })
            .unwrap_or_default(),
        sh("iptables", &["-V"]),
        sh("ipset", &["-v"]),
        sh("iperf3", &["-v"]).lines().next().unwrap_or("iperf3"),
    )
}

/// Median of one metric for (mechanism index, N).
fn med(suite: &Suite, mi: usize, n: usize, get: Get) -> f64 {
    suite
        .results
        .get(&(mi, n))
        .map(|runs| median(runs.iter().map(get).collect()))
        .unwrap_or(f64::NAN)
}

/// Median over repetitions of (mechanism / no filter, same repetition) — the pairing
/// cancels drift of a shared machine between repetitions.
fn paired_ratio(suite: &Suite, mi: usize, n: usize, get: Get) -> f64 {
    let (Some(runs), Some(base)) = (suite.results.get(&(mi, n)), suite.results.get(&(0, n))) else {
        return f64::NAN;
    };
    median(
        runs.iter()
            .filter_map(|r| {
                let b = base.iter().find(|b| b.rep == r.rep)?;
                Some(get(r) / get(b))
            })
            .collect(),
    )
}

/// The fixed-rate CPU test did not reach (90% of) its 1 Gbit/s.
fn below_rate(suite: &Suite, mi: usize, n: usize) -> bool {
    med(suite, mi, n, |r| r.sample.cpu_rate_mbps) < 900.0
}

fn pct(v: f64) -> String {
    if v.is_finite() && v < 0.1 {
        format!("{:.2}%", 100.0 * v)
    } else if v.is_finite() {
        format!("{:.0}%", 100.0 * v)
    } else {
        "—".into()
    }
}

pub fn write(dir: &Path, suite: &Suite) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let date = sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let has_none = suite.mechanisms.first() == Some(&"none");
    let mech_index = |m: &str| crate::MECHANISMS.iter().position(|k| *k == m).unwrap_or(0);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Egress filtering benchmark: every mechanism side by side\n\n\
         `{}` — {date}, took {:.1} min. {}\n",
        suite.command.trim_end_matches(" --"),
        suite.took.as_secs_f64() / 60.0,
        if suite.quick {
            "**Quick mode: one repetition, short iperf3 runs — indicative only.**"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "## Machine\n\n{}\n- Background load of the (shared) machine, no benchmark traffic: {:.0}% busy before the run, {:.0}% after.\n",
        machine(),
        100.0 * suite.background_before,
        100.0 * suite.background_after
    );
    let _ = writeln!(
        md,
        "## Method\n\n\
         The methodology of the published egress-filtering benchmark (Kinvolk, \"egress filtering\n\
         benchmark\", parts 1 and 2) on one machine. A pod namespace sends through a veth pair into a\n\
         node namespace that routes (`ip_forward=1`) through a second veth pair to a server namespace\n\
         (iperf3 server, ping target, UDP echo responder). The filter sits on the pod's path in the\n\
         node namespace: tc ingress of the pod's host-side veth (TCX) for the eBPF filters, the\n\
         FORWARD chain for iptables and ipset.\n\n\
         - **none**: no filter (baseline).\n\
         - **iptables**: N `-d CIDR -j DROP` rules, loaded with one `iptables-restore --noflush` into a\n  chain that FORWARD jumps to (one extra rule per packet; the jump is what switches it on and\n  off, see below).\n\
         - **ipset**: one `hash:net` set loaded with `ipset restore` + one `-m set --match-set … dst -j DROP`\n  rule (Calico's mechanism underneath).\n\
         - **egress-deny**: the installer's load path (`load_and_pin`, rule inserts into the pinned\n  LPM maps, two threads above 20k rules as the installer does) and the CNI plugin's ADD path\n  (`attach`: TCX on tc ingress of the host-side veth).\n\
         - **reference-lpm**: the published benchmark's tc-eBPF design (one plain LPM-trie lookup per\n  packet, IPv4 only, no counters), loaded with aya, inserted from one thread, TCX on the same hook.\n\n\
         Rules: N random global-unicast IPv4 prefixes, ≈89% /32, 10% /24, 1% /16, seed {}; the\n\
         traffic tests' destination ({}) is outside every list (checked), the set-up test's\n\
         destination is a /32 from the list (the last one, deepest in the iptables chain).\n\n\
         Per N and repetition ({} repetition(s), tables show medians): every mechanism's rule set is\n\
         applied afresh (set-up timed), then switched off but kept loaded. Then each test runs for\n\
         every mechanism back to back with only that one switched on (TCX attach/detach for the eBPF\n\
         filters, one FORWARD rule at position 1 for iptables/ipset), so the mechanisms' results\n\
         are seconds apart and a shared machine's load changes hit them alike; the order rotates\n\
         with the repetition. Headline ratios pair each mechanism with the no-filter result of the\n\
         same repetition. Everything is then unloaded, and the next set-up waits (capped) for the\n\
         kernel to finish freeing big sets and tries.\n\n\
         - UDP throughput: `iperf3 -u -b 0 -l 1470 -t {}`, datagrams the server received per second.\n\
         - Packets/s: the same with `-l 64`.\n\
         - CPU: during `iperf3 -u -b 1G -l 1470`, the CPU time of the iperf3 client and server and\n  of the ksoftirqd threads (`/proc/<pid>/stat`, sampled inside the run), in % of one core.\n  This kernel uses tick accounting without IRQ time accounting, so the forwarding softirq\n  (and the filter in it), served in the sender's context, is charged to the sender; other\n  work on a shared machine is not counted. The whole machine's busy share is in\n  results.csv (`cpu_machine_pct`), as is the rate reached (`cpu_rate_mbps`; a `*` in the\n  table marks medians under 0.9 Gbit/s, where the number is not \"at 1 Gbit/s\").\n\
         - ICMP: `ping -i 0.001 -c 1000`, average and p99 of the per-packet times.\n\
         - Request/response: 32-byte UDP request, echoed back, one at a time, 2000 round trips (or\n  5 s), p50 and p99; client and responder on CPU 0 (cross-CPU wake-ups of an idle vCPU cost\n  tens of µs here and would drown the filters' differences).\n\
         - Set-up: a probe datagram every 0.5 ms from the pod to the in-list destination; the time\n  from starting to apply the rule set until the first probe that never arrived was sent.\n\
         - iperf3 client and ping pinned to CPU 0, iperf3 server to CPU 1: the forwarding path (and\n  so the filter) runs in softirq on the sender's CPU, so filter cost shows up as lost\n  throughput.\n\n\
         Every number comes from one 2-core VM where sender, router and receiver share the CPUs:\n\
         compare mechanisms within the run, not with other machines. Raw repetitions: `results.csv`.\n",
        suite.seed,
        crate::SERVER,
        suite.reps,
        suite.secs,
    );

    // Headline.
    let head_n = if suite.sizes.contains(&1_000_000) {
        1_000_000
    } else {
        suite.sizes.iter().copied().max().unwrap_or(0)
    };
    let _ = writeln!(md, "## Headline at {head_n} rules\n");
    if has_none {
        let _ = writeln!(
            md,
            "Throughput and packets/s as a fraction of the no-filter baseline (paired per repetition,\n\
             median); CPU at 1 Gbit/s and latencies as medians (baseline in the first row).\n\n\
             | mechanism | UDP throughput | 64-byte pps | CPU at 1 Gbit/s | ping avg | req/resp p50 | set-up |\n\
             |---|---:|---:|---:|---:|---:|---:|"
        );
        for &m in &suite.mechanisms {
            let mi = mech_index(m);
            if !suite.results.contains_key(&(mi, head_n)) {
                let why = suite
                    .stopped
                    .get(m)
                    .map(|(at, why)| format!("not measured (stopped at {at}: {why})"))
                    .unwrap_or_else(|| "not measured".into());
                let _ = writeln!(md, "| {m} | {why} | | | | | |");
                continue;
            }
            let (tp, pps) = if m == "none" {
                (
                    format!(
                        "{} Mbit/s",
                        fmt(med(suite, mi, head_n, |r| r.sample.udp_mbps), 0)
                    ),
                    format!("{} pps", fmt(med(suite, mi, head_n, |r| r.sample.pps), 0)),
                )
            } else {
                (
                    pct(paired_ratio(suite, mi, head_n, |r| r.sample.udp_mbps)),
                    pct(paired_ratio(suite, mi, head_n, |r| r.sample.pps)),
                )
            };
            let setup = med(suite, mi, head_n, |r| secs(r.effective));
            let star = if below_rate(suite, mi, head_n) {
                "*"
            } else {
                ""
            };
            let _ = writeln!(
                md,
                "| {m} | {tp} | {pps} | {}%{star} | {} ms | {} µs | {} |",
                fmt(med(suite, mi, head_n, |r| r.sample.cpu_pct), 1),
                fmt(med(suite, mi, head_n, |r| r.sample.ping_avg_ms), 3),
                fmt(med(suite, mi, head_n, |r| r.sample.rr_p50_us), 1),
                if m == "none" {
                    "—".into()
                } else {
                    format!("{} s", fmt(setup, 2))
                }
            );
        }
        md.push('\n');
    }

    // What limits each mechanism, with this run's numbers.
    let _ = writeln!(md, "## What limits each mechanism\n");
    let _ = writeln!(md, "{}", limits(suite));

    // One section per metric.
    for metric in &METRICS {
        let mechs: Vec<&str> = suite
            .mechanisms
            .iter()
            .copied()
            .filter(|m| !(metric.filters_only && *m == "none"))
            .collect();
        let _ = writeln!(
            md,
            "## {} ({})\n\n![{}]({}.svg)\n\n| rules | {} |\n|---:|{}",
            metric.title,
            metric.unit,
            metric.key,
            metric.key,
            mechs.join(" | "),
            "---:|".repeat(mechs.len())
        );
        let mut series = Vec::new();
        for &m in &mechs {
            let mi = mech_index(m);
            let points: Vec<(usize, f64)> = suite
                .sizes
                .iter()
                .map(|&n| (n, med(suite, mi, n, metric.get)))
                .filter(|(_, v)| v.is_finite())
                .collect();
            series.push((m, COLORS[mi % COLORS.len()], points));
        }
        for &n in &suite.sizes {
            let cells: Vec<String> = mechs
                .iter()
                .map(|m| {
                    let mi = mech_index(m);
                    let mut cell = fmt(med(suite, mi, n, metric.get), metric.decimals);
                    if metric.key == "cpu" && below_rate(suite, mi, n) {
                        cell.push('*');
                    }
                    cell
                })
                .collect();
            let _ = writeln!(md, "| {} | {} |", count(n), cells.join(" | "));
        }
        md.push('\n');
        std::fs::write(
            dir.join(format!("{}.svg", metric.key)),
            svg(
                &format!("{} ({})", metric.title, metric.unit),
                metric.unit,
                metric.log_y,
                &series,
            ),
        )?;
    }

    // Set-up phases and teardown.
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
            let Some(runs) = suite.results.get(&(mi, n)) else {
                continue;
            };
            let names: Vec<&str> = runs
                .first()
                .map(|r| r.phases.iter().map(|(p, _)| *p).collect())
                .unwrap_or_default();
            let phases: Vec<String> = names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    let v = median(
                        runs.iter()
                            .filter_map(|r| r.phases.get(i).map(|(_, d)| d.as_secs_f64()))
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
                fmt(median(runs.iter().map(|r| secs(r.apply)).collect()), 3),
                fmt(
                    median(runs.iter().map(|r| r.teardown.as_secs_f64()).collect()),
                    3
                )
            );
        }
    }
    md.push('\n');

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
    std::fs::write(dir.join("RESULTS.md"), md)?;
    std::fs::write(dir.join("results.csv"), csv(suite))?;
    Ok(())
}

fn count(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

fn limits(suite: &Suite) -> String {
    let idx = |m: &str| crate::MECHANISMS.iter().position(|k| *k == m).unwrap_or(0);
    let measured: Vec<usize> = suite
        .sizes
        .iter()
        .copied()
        .filter(|n| suite.results.contains_key(&(idx("iptables"), *n)))
        .collect();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "- **The machine**: 2 cores shared by sender, router and receiver (and, on a shared machine,\n  other work). With no filter, throughput is bounded by the sender's CPU, which also runs the\n  forwarding softirq; every nanosecond a filter spends per packet comes out of that budget."
    );
    if let (Some(first), Some(last)) = (measured.first(), measured.last()) {
        let ping = |n: usize| med(suite, idx("iptables"), n, |r| r.sample.ping_avg_ms);
        let _ = writeln!(
            s,
            "- **iptables**: the FORWARD chain is walked rule by rule for every packet, so cost grows\n  linearly with N (ping average {} ms at {} → {} ms at {}; throughput {} of the baseline at\n  {}). {}",
            fmt(ping(*first), 3),
            count(*first),
            fmt(ping(*last), 3),
            count(*last),
            pct(paired_ratio(suite, idx("iptables"), *last, |r| r
                .sample
                .udp_mbps)),
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
        "- **egress-deny**: one LPM-trie lookup per packet (its cost grows slowly with the trie's\n  size: ~150–250 ns per verdict at 1M–10M rules in BPF_PROG_TEST_RUN, see\n  tests/BENCHMARKS.md) plus Ethernet/VLAN/IPv6 parsing and per-attachment counters. Set-up:\n  program load and verification, one `bpf()` map update per rule (two threads), and the TCX\n  attach (`BPF_LINK_CREATE` waits for an RCU grace period). In production the program and\n  link already exist and an update is only the map writes.{}",
        lim("egress-deny")
    );
    let _ = writeln!(
        s,
        "- **reference-lpm**: the same LPM lookup without parsing beyond IPv4 and without counters;\n  set-up is one `bpf()` update per rule from one thread. The anchor for future datapath work.{}",
        lim("reference-lpm")
    );
    s
}

fn csv(suite: &Suite) -> String {
    let mut s = String::from(
        "mechanism,rules,rep,udp_mbps,udp_loss_pct,pps,cpu_pct,cpu_machine_pct,cpu_rate_mbps,ping_avg_ms,ping_p99_ms,ping_loss_pct,rr_p50_us,rr_p99_us,rr_count,apply_s,setup_s,teardown_s,settle_s,phases\n",
    );
    for ((mi, n), runs) in &suite.results {
        for r in runs {
            let Sample {
                udp_mbps,
                udp_loss_pct,
                pps,
                cpu_pct,
                cpu_machine_pct,
                cpu_rate_mbps,
                ping_avg_ms,
                ping_p99_ms,
                ping_loss_pct,
                rr_p50_us,
                rr_p99_us,
                rr_count,
            } = r.sample;
            let phases: Vec<String> = r
                .phases
                .iter()
                .map(|(p, d)| format!("{p}={:.4}", d.as_secs_f64()))
                .collect();
            let _ = writeln!(
                s,
                "{},{n},{},{udp_mbps:.1},{udp_loss_pct:.2},{pps:.0},{cpu_pct:.2},{cpu_machine_pct:.1},{cpu_rate_mbps:.1},{ping_avg_ms:.4},{ping_p99_ms:.4},{ping_loss_pct:.1},{rr_p50_us:.2},{rr_p99_us:.2},{rr_count:.0},{:.4},{:.4},{:.4},{:.2},{}",
                crate::MECHANISMS[*mi],
                r.rep + 1,
                secs(r.apply),
                secs(r.effective),
                r.teardown.as_secs_f64(),
                r.settle.as_secs_f64(),
                phases.join(";")
            );
        }
    }
    s
}

/// (mechanism, colour, (N, value) points).
type Series<'a> = (&'a str, &'a str, Vec<(usize, f64)>);

/// A line chart: x = rule count (log scale), one line per mechanism; y linear from 0 or
/// logarithmic.
fn svg(title: &str, unit: &str, log_y: bool, series: &[Series<'_>]) -> String {
    let (w, h, left, right, top, bottom) = (820.0, 420.0, 80.0, 150.0, 40.0, 50.0);
    let points: Vec<(usize, f64)> = series
        .iter()
        .flat_map(|(_, _, p)| p.iter().copied())
        .filter(|(_, v)| v.is_finite() && (!log_y || *v > 0.0))
        .collect();
    let lx = |n: usize| (n.max(1) as f64).log10();
    let min_x = points
        .iter()
        .map(|p| lx(p.0))
        .fold(f64::MAX, f64::min)
        .floor();
    let max_x = points
        .iter()
        .map(|p| lx(p.0))
        .fold(f64::MIN, f64::max)
        .ceil();
    let (min_x, max_x) = if points.is_empty() {
        (1.0, 7.0)
    } else {
        (min_x, max_x.max(min_x + 1.0))
    };
    let (lo, hi) = if log_y {
        let lo = points.iter().map(|p| p.1.log10()).fold(f64::MAX, f64::min);
        let hi = points.iter().map(|p| p.1.log10()).fold(f64::MIN, f64::max);
        if points.is_empty() {
            (0.0, 1.0)
        } else {
            (lo.floor(), hi.ceil().max(lo.floor() + 1.0))
        }
    } else {
        let hi = points.iter().map(|p| p.1).fold(0.0f64, f64::max);
        (0.0, nice_ceiling(hi.max(1e-9)))
    };
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let x = |n: usize| left + (lx(n) - min_x) / (max_x - min_x) * plot_w;
    let y = |v: f64| {
        let t = if log_y {
            (v.log10() - lo) / (hi - lo)
        } else {
            (v - lo) / (hi - lo)
        };
        top + plot_h * (1.0 - t)
    };
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"22\" font-size=\"14\">{}</text>\n",
        escape(title)
    );
    // Grid and axes.
    for e in (min_x as i32)..=(max_x as i32) {
        let gx = left + (f64::from(e) - min_x) / (max_x - min_x) * plot_w;
        let _ = writeln!(
            s,
            "<line x1=\"{gx:.1}\" y1=\"{top}\" x2=\"{gx:.1}\" y2=\"{:.1}\" stroke=\"#e0e0e0\"/>\
             <text x=\"{gx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            top + plot_h,
            top + plot_h + 16.0,
            count(10usize.pow(e.max(0) as u32))
        );
    }
    let ticks: Vec<f64> = if log_y {
        ((lo as i32)..=(hi as i32)).map(|e| 10f64.powi(e)).collect()
    } else {
        (0..=5).map(|i| hi * f64::from(i) / 5.0).collect()
    };
    for v in ticks {
        let gy = y(v);
        let label = if v >= 100.0 || v == 0.0 {
            format!("{v:.0}")
        } else if v >= 1.0 {
            format!("{v:.1}")
        } else {
            format!("{v}")
        };
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{gy:.1}\" x2=\"{:.1}\" y2=\"{gy:.1}\" stroke=\"#e0e0e0\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>",
            left + plot_w,
            left - 6.0,
            gy + 4.0
        );
    }
    let _ = writeln!(
        s,
        "<rect x=\"{left}\" y=\"{top}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"black\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">rules (log scale)</text>\n\
         <text transform=\"translate(18 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}{}</text>",
        left + plot_w / 2.0,
        h - 10.0,
        top + plot_h / 2.0,
        escape(unit),
        if log_y { " (log scale)" } else { "" }
    );
    for (i, (name, color, pts)) in series.iter().enumerate() {
        let pts: Vec<&(usize, f64)> = pts
            .iter()
            .filter(|(_, v)| v.is_finite() && (!log_y || *v > 0.0))
            .collect();
        let line: Vec<String> = pts
            .iter()
            .map(|(n, v)| format!("{:.1},{:.1}", x(*n), y(*v)))
            .collect();
        let dash = if *name == "none" {
            " stroke-dasharray=\"6 4\""
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash} points=\"{}\"/>",
            line.join(" ")
        );
        for (n, v) in &pts {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{color}\"><title>{name} {n}: {v:.4}</title></circle>",
                x(*n),
                y(*v)
            );
        }
        let ly = top + 10.0 + 20.0 * i as f64;
        let lx0 = left + plot_w + 14.0;
        let _ = writeln!(
            s,
            "<line x1=\"{lx0}\" y1=\"{ly}\" x2=\"{:.1}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"3\"{dash}/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{name}</text>",
            lx0 + 22.0,
            lx0 + 28.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * p {
            return m * p;
        }
    }
    10.0 * p
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
