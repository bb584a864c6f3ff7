//! The metrics the report shows (title, unit, how each is read from a sample, what its
//! spread means) and the per-repetition values of one for a (mechanism, N).
use crate::bench::suite::{Run, Suite, measurement::sample::Sample, mechanisms::MECHANISMS};

use super::{numbers::secs, stats::median};

/// Reads one metric from a sample (the run's own, or its paired baseline).
pub type Get = fn(&Sample) -> f64;

#[derive(Clone, Copy, PartialEq)]
pub enum Kind {
    /// Reported as the ratio to the paired no-filter baseline (the baseline itself in
    /// absolute numbers).
    Ratio,
    /// Reported in absolute numbers.
    Absolute,
    /// Set-up time (from the run, not the samples); filters only.
    Setup,
}

pub struct Metric {
    pub key: &'static str,
    pub title: &'static str,
    pub unit: &'static str,
    pub kind: Kind,
    pub log_y: bool,
    pub decimals: usize,
    pub get: Get,
    /// Only the eBPF mechanisms have it.
    pub ebpf_only: bool,
    /// What its spread means (RESULTS.md, under the table).
    pub spread: &'static str,
}

pub const EBPF: [&str; 2] = ["egress-deny", "reference-lpm"];

pub const METRICS: [Metric; 13] = [
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

/// The repetitions of (mechanism index, N); none where it was not measured.
pub fn runs(suite: &Suite, mi: usize, n: usize) -> &[Run] {
    suite
        .results
        .get(&(mi, n))
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// Per-repetition values of a metric: absolute, or as the ratio to the paired baseline.
pub fn values(suite: &Suite, mi: usize, n: usize, metric: &Metric, ratio: bool) -> Vec<f64> {
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
pub fn med(suite: &Suite, mi: usize, n: usize, get: Get) -> f64 {
    median(runs(suite, mi, n).iter().map(|r| get(&r.sample)).collect())
}

/// Median over repetitions of (mechanism / its paired no-filter baseline).
pub fn paired_ratio(suite: &Suite, mi: usize, n: usize, get: Get) -> f64 {
    median(
        runs(suite, mi, n)
            .iter()
            .map(|r| get(&r.sample) / get(&r.base))
            .collect(),
    )
}

/// A mechanism's position in [`MECHANISMS`], the key of its results.
pub fn mech_index(m: &str) -> usize {
    MECHANISMS.iter().position(|k| *k == m).unwrap_or(0)
}

/// Whether a mechanism has this metric: eBPF-only ones, and set-up (`none` sets nothing up).
pub fn shown(metric: &Metric, m: &str) -> bool {
    let ebpf_ok = !metric.ebpf_only || EBPF.contains(&m);
    let setup_ok = metric.kind != Kind::Setup || m != "none";
    ebpf_ok && setup_ok
}

/// The metric with this key (a key the report names, so it exists).
pub fn by_key(key: &str) -> &'static Metric {
    let all: &'static [Metric] = &METRICS;
    all.iter().find(|m| m.key == key).expect("metric")
}

/// The mechanisms of this run a metric's table and plot show, in the run's order.
pub fn shown_mechanisms(suite: &Suite, metric: &Metric) -> Vec<&'static str> {
    suite
        .mechanisms
        .iter()
        .copied()
        .filter(|m| shown(metric, m))
        .collect()
}

/// Whether the run measured the no-filter baseline (first, as bench-suite orders them),
/// so that the ratio metrics can be shown as ratios.
pub fn has_baseline(suite: &Suite) -> bool {
    suite.mechanisms.first() == Some(&"none")
}

/// Whether a metric's table and plot show the ratio to the paired baseline.
pub fn as_ratio(suite: &Suite, metric: &Metric) -> bool {
    metric.kind == Kind::Ratio && has_baseline(suite)
}
