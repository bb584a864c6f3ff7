//! bench-suite's output: RESULTS.md (machine, method, headline ratios with their spread,
//! what limits each mechanism, one table + SVG plot per metric), results.csv (every
//! repetition with its paired baseline).
use std::{fmt::Write as _, path::Path, process::Command, time::Duration};

use anyhow::Result;

use super::{Run, Suite, measurement::sample::Sample, mechanisms::MECHANISMS, topology::SERVER};

const COLORS: [&str; 5] = ["#7f7f7f", "#d62728", "#ff7f0e", "#2ca02c", "#1f77b4"];
/// The spread goal: a 95% confidence interval of the mean paired ratio within ±3% of it.
const GOAL: f64 = 0.03;

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

/// Two-sided 95% Student t quantile for `df` degrees of freedom.
fn t95(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        d if d <= 30 => T[d - 1],
        _ => 1.96,
    }
}

/// Summary of one metric's per-repetition values.
#[derive(Clone, Copy)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
    mean: f64,
    /// Sample standard deviation (NaN below 2 values).
    sd: f64,
}

impl Stat {
    fn of(values: &[f64]) -> Option<Stat> {
        let v: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        let n = v.len();
        let mean = v.iter().sum::<f64>() / n as f64;
        let sd = if n > 1 {
            (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            f64::NAN
        };
        Some(Stat {
            median: median(v.clone()),
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            n,
            mean,
            sd,
        })
    }

    /// Half-width of the 95% confidence interval of the mean, relative to the mean.
    fn ci_rel(&self) -> f64 {
        t95(self.n - 1) * self.sd / (self.n as f64).sqrt() / self.mean.abs()
    }

    /// Repetitions that would bring `ci_rel` under the goal at this spread (the sample
    /// standard deviation taken as the true one).
    fn reps_for_goal(&self) -> Option<usize> {
        let rel = self.sd / self.mean.abs();
        if !rel.is_finite() {
            return None;
        }
        (2..=500).find(|&n| t95(n - 1) * rel / (n as f64).sqrt() <= GOAL)
    }
}

/// Reads one metric from a sample (the run's own, or its paired baseline).
type Get = fn(&Sample) -> f64;

fn secs(d: Option<Duration>) -> f64 {
    d.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN)
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// Reported as the ratio to the paired no-filter baseline (the baseline itself in
    /// absolute numbers).
    Ratio,
    /// Reported in absolute numbers.
    Absolute,
    /// Set-up time (from the run, not the samples); filters only.
    Setup,
}

struct Metric {
    key: &'static str,
    title: &'static str,
    unit: &'static str,
    kind: Kind,
    log_y: bool,
    decimals: usize,
    get: Get,
    /// Only the eBPF mechanisms have it.
    ebpf_only: bool,
    /// What its spread means (RESULTS.md, under the table).
    spread: &'static str,
}

const EBPF: [&str; 2] = ["egress-deny", "reference-lpm"];

const METRICS: [Metric; 13] = [
    Metric {
        key: "udp_throughput",
        title: "UDP throughput, 1470-byte datagrams, unlimited rate (iperf3, received)",
        unit: "Mbit/s",
        kind: Kind::Ratio,
        log_y: false,
        decimals: 0,
        get: |s| s.udp_mbps,
        ebpf_only: false,
        spread: "Ratio to the no-filter runs just before and after, per repetition. Its spread is what is left of the machine's drift after pairing, plus the run-to-run noise of two 2–3 s iperf3 runs; a filter is only slower than no filter when its whole range is below 100%.",
    },
    Metric {
        key: "udp_pps",
        title: "UDP packets/s, 64-byte datagrams, unlimited rate, one destination (received)",
        unit: "packets/s",
        kind: Kind::Ratio,
        log_y: false,
        decimals: 0,
        get: |s| s.pps,
        ebpf_only: false,
        spread: "Own sender, one thread pinned to CPU 0, which also runs the whole forwarding path (and the filter) in softirq: a filter's per-packet cost comes straight out of this rate. Spread as for throughput; the per-packet cost is small against the rest of the path (≈ 5 µs per packet), so the ratios sit close to 100% and their spread is the honest limit of what this machine can resolve.",
    },
    Metric {
        key: "udp_pps_many",
        title: "UDP packets/s to allowed destinations, 64-byte, unlimited rate, many destinations",
        unit: "packets/s",
        kind: Kind::Ratio,
        log_y: false,
        decimals: 0,
        get: |s| s.pps_many,
        ebpf_only: false,
        spread: "As above, cycling through thousands of destinations spread over the address space (some inside the rule list, dropped by every filter; the rest outside it): the lookups walk different parts of the table, trie or hash, so cache misses show. Filters drop the denied share early and so skip its forwarding work, which the no-filter baseline does not: a ratio slightly above 100% is that, not a faster filter.",
    },
    Metric {
        key: "cpu_per_packet",
        title: "CPU per packet on the forwarding CPU (own sender thread + ksoftirqd, schedstat), one destination",
        unit: "ns",
        kind: Kind::Ratio,
        log_y: false,
        decimals: 0,
        get: |s| s.cpu_ns_pkt_single,
        ebpf_only: false,
        spread: "The same runs as packets/s, measured by the work instead of the rate: the sender thread's and ksoftirqd's run time (`schedstat`: the whole forwarding path and the filter run in the sender's softirq) per packet that reached a verdict, as % of the paired baseline's (above 100% = costlier). Time the sender is descheduled for other people's work is not in it, so load on a shared machine moves it much less than packets/s; what remains is cache pollution and hypervisor noise.",
    },
    Metric {
        key: "cpu_per_packet_many",
        title: "CPU per packet on the forwarding CPU (own sender thread + ksoftirqd, schedstat), many destinations",
        unit: "ns",
        kind: Kind::Ratio,
        log_y: false,
        decimals: 0,
        get: |s| s.cpu_ns_pkt_many,
        ebpf_only: false,
        spread: "As above with thousands of destinations. The no-filter baseline forwards the denied share too, the filters drop it early: that saving is in the filters' numbers. With big tables, tries and sets this is the most fragile number: it depends on how much of the structure other work on the machine (and the previous tests) evicted from the caches, which moves whole repetitions; the spread of the paired ratios at 1M is in its own table above. Compare mechanisms within a repetition and read the median.",
    },
    Metric {
        key: "ns_per_packet",
        title: "Program run time per packet (bpf_stats), one destination",
        unit: "ns",
        kind: Kind::Absolute,
        log_y: false,
        decimals: 0,
        get: |s| s.ns_pkt,
        ebpf_only: true,
        spread: "The kernel's own accounting of the attached program (run time / run count) over millions of real packets: independent of how fast the rest of the path is, so far steadier than throughput. The spread is cache state and hypervisor noise; the stats add two clock reads per run (≈ 20–40 ns), in these numbers for every eBPF filter alike.",
    },
    Metric {
        key: "ns_per_packet_many",
        title: "Program run time per packet (bpf_stats), many destinations",
        unit: "ns",
        kind: Kind::Absolute,
        log_y: false,
        decimals: 0,
        get: |s| s.ns_pkt_many,
        ebpf_only: true,
        spread: "Same accounting with thousands of destinations: the difference to the one-destination row is what cache misses in a big table or trie cost per packet. Its spread is how much of the structure other work on the machine (and the previous tests) evicted from the caches; a single slow repetition moves the max, not the median.",
    },
    Metric {
        key: "cpu",
        title: "CPU per packet at a fixed 1 Gbit/s (iperf3 client + server + ksoftirqd, schedstat)",
        unit: "ns per datagram",
        kind: Kind::Absolute,
        log_y: false,
        decimals: 0,
        get: |s| s.cpu_ns_pkt,
        ebpf_only: false,
        spread: "The run time of the iperf3 client and server processes and of the ksoftirqd threads (`/proc/<pid>/task/*/schedstat`: the scheduler's ns clock, not tick samples) divided by the datagrams received. Without IRQ time accounting (this kernel) softirq served in a task's context is in its run time, so the forwarding path and the filter are in it and other people's work is not. Spread: how steadily the same work takes the same time; the paired baseline's value is in results.csv (`base_cpu_ns_pkt`).",
    },
    Metric {
        key: "ping_avg",
        title: "ICMP latency, 1 ms interval ×1000, average",
        unit: "ms",
        kind: Kind::Absolute,
        log_y: true,
        decimals: 3,
        get: |s| s.ping_avg_ms,
        ebpf_only: false,
        spread: "Average of 1000 echo round trips per run; the spread over repetitions is mostly the scheduling of an idle vCPU, not the filter (except where the filter's own cost is milliseconds).",
    },
    Metric {
        key: "ping_p99",
        title: "ICMP latency, 1 ms interval ×1000, p99",
        unit: "ms",
        kind: Kind::Absolute,
        log_y: true,
        decimals: 3,
        get: |s| s.ping_p99_ms,
        ebpf_only: false,
        spread: "The 10th-slowest of 1000 round trips: dominated by whatever else the shared machine did in that second.",
    },
    Metric {
        key: "rr_p50",
        title: "UDP request/response round trip, p50",
        unit: "µs",
        kind: Kind::Absolute,
        log_y: true,
        decimals: 1,
        get: |s| s.rr_p50_us,
        ebpf_only: false,
        spread: "Median of up to 2000 one-at-a-time round trips on one CPU: the steadiest latency number; differences of a fraction of a µs are within the spread.",
    },
    Metric {
        key: "rr_p99",
        title: "UDP request/response round trip, p99",
        unit: "µs",
        kind: Kind::Absolute,
        log_y: true,
        decimals: 1,
        get: |s| s.rr_p99_us,
        ebpf_only: false,
        spread: "Tail of the same round trips: machine noise more than filter cost.",
    },
    Metric {
        key: "setup",
        title: "Set-up time: rule set applied → test destination dropped",
        unit: "s",
        kind: Kind::Setup,
        log_y: true,
        decimals: 3,
        get: |s| s.udp_mbps, // unused: set-up comes from the run
        ebpf_only: false,
        spread: "One set-up per repetition (the rule set is applied afresh each time); the spread is the machine's load during loading.",
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
    let mem = crate::bench::meminfo_kib("MemTotal").unwrap_or(0) / 1024 / 1024;
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

fn runs(suite: &Suite, mi: usize, n: usize) -> &[Run] {
    suite
        .results
        .get(&(mi, n))
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// Per-repetition values of a metric: absolute, or as the ratio to the paired baseline.
fn values(suite: &Suite, mi: usize, n: usize, metric: &Metric, ratio: bool) -> Vec<f64> {
    runs(suite, mi, n)
        .iter()
        .map(|r| match metric.kind {
            Kind::Setup => secs(r.setup.effective),
            _ if ratio => (metric.get)(&r.sample) / (metric.get)(&r.base),
            _ => (metric.get)(&r.sample),
        })
        .filter(|v| v.is_finite())
        .collect()
}

/// Median of one metric for (mechanism index, N).
fn med(suite: &Suite, mi: usize, n: usize, get: Get) -> f64 {
    median(runs(suite, mi, n).iter().map(|r| get(&r.sample)).collect())
}

/// Median over repetitions of (mechanism / its paired no-filter baseline).
fn paired_ratio(suite: &Suite, mi: usize, n: usize, get: Get) -> f64 {
    median(
        runs(suite, mi, n)
            .iter()
            .map(|r| get(&r.sample) / get(&r.base))
            .collect(),
    )
}

fn pct(v: f64) -> String {
    if v.is_finite() && v >= 10.0 {
        format!("×{v:.0}")
    } else if v.is_finite() && v < 0.1 {
        format!("{:.2}%", 100.0 * v)
    } else if v.is_finite() {
        format!("{:.1}%", 100.0 * v)
    } else {
        "—".into()
    }
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

fn mech_index(m: &str) -> usize {
    MECHANISMS.iter().position(|k| *k == m).unwrap_or(0)
}

fn shown(metric: &Metric, m: &str) -> bool {
    let ebpf_ok = !metric.ebpf_only || EBPF.contains(&m);
    let setup_ok = metric.kind != Kind::Setup || m != "none";
    ebpf_ok && setup_ok
}

/// The cell of one (metric, mechanism, N): a ratio for the ratio metrics (the
/// baseline's absolute value for `none`), else the absolute value.
fn metric_cell(suite: &Suite, metric: &Metric, m: &str, n: usize) -> String {
    let mi = mech_index(m);
    let ratio = metric.kind == Kind::Ratio && m != "none" && suite.mechanisms.contains(&"none");
    let st = Stat::of(&values(suite, mi, n, metric, ratio));
    cell(st, ratio, metric.decimals)
}

pub fn write(dir: &Path, suite: &Suite) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let date = sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let has_none = suite.mechanisms.first() == Some(&"none");
    let mut md = String::new();
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

    // Headline.
    let head_n = if suite.sizes.contains(&1_000_000) {
        1_000_000
    } else {
        suite.sizes.iter().copied().max().unwrap_or(0)
    };
    let _ = writeln!(md, "## Headline at {} rules\n", count(head_n));
    let metric = |key: &str| METRICS.iter().find(|m| m.key == key).expect("metric");
    let head_reps = suite
        .mechanisms
        .iter()
        .map(|m| runs(suite, mech_index(m), head_n).len())
        .max()
        .unwrap_or(0);
    if has_none {
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
                let metric = metric(key);
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
        spread_table(&mut md, suite, head_n);
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
            .filter(|m| shown(metric, m))
            .collect();
        if mechs.is_empty() {
            continue;
        }
        let ratio = metric.kind == Kind::Ratio && has_none;
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
        let mut series = Vec::new();
        for &m in &mechs {
            // Ratio plots leave out the baseline (100% by construction: a reference line).
            if ratio && m == "none" {
                continue;
            }
            let mi = mech_index(m);
            let points: Vec<(usize, Stat)> = suite
                .sizes
                .iter()
                .filter_map(|&n| {
                    let mut st = Stat::of(&values(suite, mi, n, metric, ratio))?;
                    if ratio {
                        st.median *= 100.0;
                        st.min *= 100.0;
                        st.max *= 100.0;
                    }
                    Some((n, st))
                })
                .collect();
            series.push((m, COLORS[mi % COLORS.len()], points));
        }
        for &n in &suite.sizes {
            let cells: Vec<String> = mechs
                .iter()
                .map(|m| {
                    let mut c = metric_cell(suite, metric, m, n);
                    if metric.key == "cpu"
                        && med(suite, mech_index(m), n, |s| s.cpu_rate_mbps) < 900.0
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
        let (title, unit, log_y) = if ratio {
            (
                format!("{}: % of the paired no-filter baseline", metric.title),
                "% of no filter (paired)".to_owned(),
                false,
            )
        } else {
            (
                format!("{} ({})", metric.title, metric.unit),
                metric.unit.to_owned(),
                metric.log_y,
            )
        };
        std::fs::write(
            dir.join(format!("{}.svg", metric.key)),
            svg(&title, &unit, log_y, ratio.then_some(100.0), &series),
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

    // Time per repetition, for planning runs with other sizes and repetition counts.
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

    if has_none {
        closing_note(&mut md, suite, head_n);
    }

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
    let metric = |key: &str| METRICS.iter().find(|m| m.key == key).expect("metric");
    for &m in suite.mechanisms.iter().filter(|m| EBPF.contains(m)) {
        let mi = mech_index(m);
        if runs(suite, mi, n).is_empty() {
            continue;
        }
        let ratio = |key: &str| {
            let st = Stat::of(&values(suite, mi, n, metric(key), true));
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
                Stat::of(&values(suite, mi, n, metric(key), false)),
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

fn count(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

fn limits(suite: &Suite) -> String {
    let idx = |m: &str| MECHANISMS.iter().position(|k| *k == m).unwrap_or(0);
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
        let ping = |n: usize| med(suite, idx("iptables"), n, |s| s.ping_avg_ms);
        let _ = writeln!(
            s,
            "- **iptables**: the FORWARD chain is walked rule by rule for every packet, so cost grows\n  linearly with N (ping average {} ms at {} → {} ms at {}; throughput {} of the baseline at\n  {}). {}",
            fmt(ping(*first), 3),
            count(*first),
            fmt(ping(*last), 3),
            count(*last),
            pct(paired_ratio(suite, idx("iptables"), *last, |s| s.udp_mbps)),
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

fn csv(suite: &Suite) -> String {
    let mut s = String::from("mechanism,rules,rep,");
    s.push_str(&Sample::NAMES.join(","));
    for name in Sample::NAMES {
        let _ = write!(s, ",base_{name}");
    }
    s.push_str(",apply_s,setup_s,teardown_s,settle_s,phases\n");
    let num = |v: f64| {
        if v.is_finite() {
            format!("{v:.4}")
        } else {
            String::new()
        }
    };
    for ((mi, n), runs) in &suite.results {
        for r in runs {
            let phases: Vec<String> = r
                .setup
                .phases
                .iter()
                .map(|(p, d)| format!("{p}={:.4}", d.as_secs_f64()))
                .collect();
            let values: Vec<String> = r
                .sample
                .values()
                .into_iter()
                .chain(r.base.values())
                .map(num)
                .collect();
            let _ = writeln!(
                s,
                "{},{n},{},{},{},{},{:.4},{:.2},{}",
                MECHANISMS[*mi],
                r.rep + 1,
                values.join(","),
                num(secs(r.setup.apply)),
                num(secs(r.setup.effective)),
                r.teardown.as_secs_f64(),
                r.settle.as_secs_f64(),
                phases.join(";")
            );
        }
    }
    s
}

/// (mechanism, colour, (N, median/min/max) points).
type Series<'a> = (&'a str, &'a str, Vec<(usize, Stat)>);

/// Round tick values covering [lo, hi]: steps of 1, 2 or 5 × 10^k, at most ~7 ticks.
fn linear_ticks(lo: f64, hi: f64) -> (f64, f64, Vec<f64>) {
    let span = (hi - lo).max(1e-9);
    let raw = span / 6.0;
    let p = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * p);
    let lo = (lo / step).floor() * step;
    let hi = (hi / step).ceil() * step;
    let n = ((hi - lo) / step).round() as usize;
    (lo, hi, (0..=n).map(|i| lo + step * i as f64).collect())
}

/// Decimals that show a round tick value (1, 2 or 5 × 10^e) exactly.
fn tick_decimals(v: f64) -> usize {
    if v == 0.0 {
        0
    } else {
        (-(v.abs().log10() + 1e-9).floor()).max(0.0) as usize
    }
}

/// A line chart: x = rule count (log scale, decades), one line per mechanism through the
/// medians with min–max error bars; y linear (round ticks, from 0) or logarithmic
/// (decades, with 2 and 5 when the range is short). `reference`: a dashed horizontal
/// line (100% for the ratio plots: the paired baseline).
fn svg(
    title: &str,
    unit: &str,
    log_y: bool,
    reference: Option<f64>,
    series: &[Series<'_>],
) -> String {
    let (w, h, left, right, top, bottom) = (860.0, 420.0, 80.0, 170.0, 40.0, 50.0);
    let points: Vec<(usize, Stat)> = series
        .iter()
        .flat_map(|(_, _, p)| p.iter().copied())
        .filter(|(_, st)| st.median.is_finite() && (!log_y || st.min > 0.0))
        .collect();
    let lx = |n: usize| (n.max(1) as f64).log10();
    let (min_x, max_x) = if points.is_empty() {
        (1.0, 7.0)
    } else {
        let lo = points.iter().map(|p| lx(p.0)).fold(f64::MAX, f64::min);
        let hi = points.iter().map(|p| lx(p.0)).fold(f64::MIN, f64::max);
        // Half a decade of margin, so single sizes and error bars are not on the frame.
        (lo.floor().min(lo - 0.3), hi.ceil().max(hi + 0.3))
    };
    let data_hi = points
        .iter()
        .map(|p| p.1.max)
        .chain(reference)
        .fold(0.0f64, f64::max);
    // Labels: log ticks each with their own decimals, linear ones with the step's.
    let (lo, hi, ticks) = if log_y {
        let lo = points
            .iter()
            .map(|p| p.1.min.log10())
            .fold(f64::MAX, f64::min);
        let hi = points
            .iter()
            .map(|p| p.1.max.log10())
            .fold(f64::MIN, f64::max);
        let (lo, hi) = if points.is_empty() {
            (0.0, 1.0)
        } else {
            (lo.floor(), hi.ceil().max(lo.floor() + 1.0))
        };
        let mults: &[f64] = if hi - lo <= 2.0 {
            &[1.0, 2.0, 5.0]
        } else {
            &[1.0]
        };
        let mut ticks = Vec::new();
        for e in (lo as i32)..=(hi as i32) {
            for m in mults {
                let v = m * 10f64.powi(e);
                if v.log10() <= hi + 1e-9 {
                    ticks.push(v);
                }
            }
        }
        (lo, hi, ticks)
    } else {
        linear_ticks(0.0, data_hi.max(1e-9) * 1.05)
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
    // Grid and axes: x at every decade.
    for e in (min_x.ceil() as i32)..=(max_x.floor() as i32) {
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
    let step_decimals = if log_y || ticks.len() < 2 {
        None
    } else {
        Some(tick_decimals(ticks[1] - ticks[0]))
    };
    for v in ticks {
        let gy = y(v);
        let d = step_decimals.unwrap_or_else(|| tick_decimals(v));
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{gy:.1}\" x2=\"{:.1}\" y2=\"{gy:.1}\" stroke=\"#e0e0e0\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v:.d$}</text>",
            left + plot_w,
            left - 6.0,
            gy + 4.0,
        );
    }
    let _ = writeln!(
        s,
        "<rect x=\"{left}\" y=\"{top}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"black\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">rules (log scale); points: median, bars: min–max over repetitions</text>\n\
         <text transform=\"translate(18 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}{}</text>",
        left + plot_w / 2.0,
        h - 10.0,
        top + plot_h / 2.0,
        escape(unit),
        if log_y { " (log scale)" } else { "" }
    );
    let legend_x = left + plot_w + 14.0;
    let mut legend_row = 0usize;
    if let Some(r) = reference {
        let ry = y(r);
        let ly = top + 10.0;
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{ry:.1}\" x2=\"{:.1}\" y2=\"{ry:.1}\" stroke=\"#7f7f7f\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\"/>\
             <line x1=\"{legend_x}\" y1=\"{ly}\" x2=\"{:.1}\" y2=\"{ly}\" stroke=\"#7f7f7f\" stroke-width=\"3\" stroke-dasharray=\"6 4\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">no filter (paired)</text>",
            left + plot_w,
            legend_x + 22.0,
            legend_x + 28.0,
            ly + 4.0
        );
        legend_row += 1;
    }
    // Series side by side within a size (a few pixels apart), so error bars do not hide
    // each other.
    let k = series.len().max(1) as f64;
    for (i, (name, color, pts)) in series.iter().enumerate() {
        let dx = (i as f64 - (k - 1.0) / 2.0) * 4.0;
        let pts: Vec<&(usize, Stat)> = pts
            .iter()
            .filter(|(_, st)| st.median.is_finite() && (!log_y || st.min > 0.0))
            .collect();
        let line: Vec<String> = pts
            .iter()
            .map(|(n, st)| format!("{:.1},{:.1}", x(*n) + dx, y(st.median)))
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
        for (n, st) in &pts {
            let cx = x(*n) + dx;
            if st.n > 1 {
                let (y0, y1) = (y(st.min), y(st.max));
                let _ = writeln!(
                    s,
                    "<line x1=\"{cx:.1}\" y1=\"{y0:.1}\" x2=\"{cx:.1}\" y2=\"{y1:.1}\" stroke=\"{color}\" stroke-width=\"1.5\"/>\
                     <line x1=\"{:.1}\" y1=\"{y0:.1}\" x2=\"{:.1}\" y2=\"{y0:.1}\" stroke=\"{color}\" stroke-width=\"1.5\"/>\
                     <line x1=\"{:.1}\" y1=\"{y1:.1}\" x2=\"{:.1}\" y2=\"{y1:.1}\" stroke=\"{color}\" stroke-width=\"1.5\"/>",
                    cx - 4.0,
                    cx + 4.0,
                    cx - 4.0,
                    cx + 4.0
                );
            }
            let _ = writeln!(
                s,
                "<circle cx=\"{cx:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{color}\"><title>{name} {n}: {:.4} ({:.4}–{:.4}, n={})</title></circle>",
                y(st.median),
                st.median,
                st.min,
                st.max,
                st.n
            );
        }
        let ly = top + 10.0 + 20.0 * legend_row as f64;
        legend_row += 1;
        let _ = writeln!(
            s,
            "<line x1=\"{legend_x}\" y1=\"{ly}\" x2=\"{:.1}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"3\"{dash}/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{name}</text>",
            legend_x + 22.0,
            legend_x + 28.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
