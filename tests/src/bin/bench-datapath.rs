//! Datapath benchmark of the compiled rule tables, IPv4 at 0 … 10M rules of the published
//! egress-filtering benchmark's mix (plus one IPv6 set at the largest size), two table
//! layouts side by side and the kernel's LPM trie as the reference:
//!
//! - load time (compile + write the inner map, then the one-update swap) and the table's
//!   exact kernel memory per rule;
//! - ns per verdict of the real program on one packet (BPF_PROG_TEST_RUN), hit and miss;
//! - ns per lookup with pseudo-random destinations (the reference object's
//!   `bench_random`: uniformly random, or folded onto 4096 / 64 destinations), minus the
//!   same loop without the lookup;
//! - the cost of deny events and counters at 1M rules.
//!
//! ```text
//! cargo run --release -p egress-deny-tests --bin bench-datapath -- \
//!     [--max-rules N] [--repeat N] [--runs K] [--v6-rules N] [--out FILE]
//! ```
//!
//! Writes its section of `tests/BENCHMARKS.md` (or `--out`) between
//! `<!-- begin datapath -->` / `<!-- end datapath -->`; other sections are left alone.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        MapData,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use clap::Parser;
use egress_deny_datapath::{
    events,
    paths::{ProgramKind, V4_TABLE_MAP, V6_TABLE_MAP},
    rules::{Action, RuleTables, Swap},
    table::{Entry, Layout},
};
use egress_deny_tests::{
    PinDir,
    bench::{machine, meminfo_kib, rule_mix, write_section},
    packet, require_root,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_UNSPEC: u32 = u32::MAX;
/// Global unicast, covered by a deliberately inserted /32 deny rule.
const HIT_V4: Ipv4Addr = Ipv4Addr::new(8, 8, 8, 8);
/// TEST-NET-1: `rule_mix` never generates anything inside 192.0.0.0/16.
const MISS_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// Global unicast, covered by a deliberately inserted /128 deny rule.
const HIT_V6: Ipv6Addr = Ipv6Addr::new(0x2606, 0x4700, 0x4700, 0, 0, 0, 0, 0x1111);
/// Documentation prefix: `rule_mix_v6` never generates anything inside 2001:db8::/32.
const MISS_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const SEED_V4: u64 = 42;
const SEED_V6: u64 = 43;
/// The installer's default deny-event budget (`--deny-events-per-second`), so the deny
/// path measured is the one a node runs.
const INSTALLER_EVENTS_PER_SECOND: u32 = 5;
const SIZES: [usize; 5] = [0, 1_000, 100_000, 1_000_000, 10_000_000];
/// The size the random-destination costs are compared with (issue 11's target: at 1M
/// and 10M rules at most twice this row's cost).
const BASE_SIZE: usize = 1_000;

/// `bench_random`'s first packet byte: what each run looks up.
const WHAT_NONE: u8 = 0;
const WHAT_TABLE: u8 = 1;
const WHAT_TRIE: u8 = 2;
const WHAT_TABLE_V6: u8 = 3;
/// Working sets (0 = uniformly random destinations), in the columns' order.
const WORKING_SETS: [u32; 3] = [0, 4096, 64];
/// `bench_random`'s spreading multiplier: working-set slot s is destination s × this.
const SPREAD: u32 = 0x9E37_79B1;
/// Single-lookup runs per (structure, working set) whose verdicts are counted and
/// compared with the share of destinations the rules deny.
const VERDICT_SAMPLES: usize = 1000;

/// Issue 11's reference: the trie datapath's same-packet cost at 1M rules on this
/// machine kind (the previous version of this benchmark), ns.
const TRIE_HIT_1M_NS: f64 = 198.0;
const TRIE_MISS_1M_NS: f64 = 127.0;
const TARGET_BYTES_PER_RULE: f64 = 32.0;
const TARGET_RATIO: f64 = 2.0;

#[derive(Parser)]
#[command(about = "Datapath benchmark: compiled rule tables (two layouts) vs the LPM trie")]
struct Args {
    /// Largest IPv4 rule count (sizes 0, 1k, 100k, 1M, 10M up to it, and it).
    #[arg(long, default_value_t = 10_000_000)]
    max_rules: usize,
    /// Program runs per BPF_PROG_TEST_RUN (the kernel reports their average).
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// BPF_PROG_TEST_RUN calls per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// IPv6 rules, loaded at the largest IPv4 size (default: that size; 0 skips IPv6).
    #[arg(long)]
    v6_rules: Option<usize>,
    /// The benchmark document whose datapath section is (re)written.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md"))]
    out: PathBuf,
}

/// The table layouts compared side by side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Candidate {
    /// `Layout::default()`: direct level sized to about 4 ranges per bucket.
    Adaptive,
    /// A fixed 16-bit direct level (DXR / FreeBSD `dxr` style).
    Direct16,
}

impl Candidate {
    const ALL: [Candidate; 2] = [Candidate::Adaptive, Candidate::Direct16];

    fn layout(self) -> Layout {
        match self {
            Candidate::Adaptive => Layout::default(),
            Candidate::Direct16 => Layout {
                direct_bits: Some(16),
            },
        }
    }

    fn name(self) -> &'static str {
        match self {
            Candidate::Adaptive => "table, adaptive",
            Candidate::Direct16 => "table, direct16",
        }
    }
}

const TRIE: &str = "LPM trie (reference)";
const TABLE_V6: &str = "table, adaptive";

/// Median, min and max over `runs` test runs (ns).
#[derive(Clone, Copy, Debug)]
struct Timing {
    median: f64,
    min: f64,
    max: f64,
}

impl Timing {
    fn of(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        Timing {
            median: samples[samples.len() / 2],
            min: samples[0],
            max: samples[samples.len() - 1],
        }
    }

    fn cell(&self) -> String {
        format!("{:.0} ({:.0}–{:.0})", self.median, self.min, self.max)
    }
}

fn frame_v4(dst: Ipv4Addr) -> Vec<u8> {
    packet::ethernet(
        &[],
        packet::ETH_P_IP,
        &packet::ipv4(Ipv4Addr::new(10, 0, 0, 1), dst, &Default::default()),
    )
}

fn frame_v6(dst: Ipv6Addr) -> Vec<u8> {
    packet::ethernet(
        &[],
        packet::ETH_P_IPV6,
        &packet::ipv6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1), dst),
    )
}

/// One BPF_PROG_TEST_RUN: (return value, the kernel's average ns per program run).
fn test_run(prog: &SchedClassifier, data: &[u8], repeat: u32) -> Result<(u32, f64)> {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(data);
    opts.repeat = repeat;
    let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    Ok((r.return_value, r.duration.as_nanos() as f64))
}

/// Runs the program `runs` times with `repeat` iterations each; every run must return
/// `expect` (a broken program or rule set cannot report a number).
fn ns_per_verdict(
    prog: &SchedClassifier,
    frame: &[u8],
    repeat: u32,
    runs: usize,
    expect: u32,
) -> Result<Timing> {
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let (ret, ns) = test_run(prog, frame, repeat)?;
        ensure!(
            ret == expect,
            "verdict {} != expected {}",
            ret as i32,
            expect as i32
        );
        samples.push(ns);
    }
    Ok(Timing::of(samples))
}

/// `bench_random`'s test packet: `[what, 0, 0, 0, working_set LE]`, padded to a
/// minimal Ethernet frame (BPF_PROG_TEST_RUN for tc needs at least the 14-byte header).
fn bench_packet(what: u8, working_set: u32) -> Vec<u8> {
    let mut p = vec![0u8; 64];
    p[0] = what;
    p[4..8].copy_from_slice(&working_set.to_le_bytes());
    p
}

/// `bench_random` must return a verdict: 0 (not denied) or 2 (denied); -1 means the
/// table could not be read, 0/1 are the baseline loop's only values.
fn check_random_return(what: u8, ret: u32) -> Result<()> {
    let ok = match what {
        WHAT_NONE => ret <= 1,
        _ => ret == TC_ACT_OK || ret == TC_ACT_SHOT,
    };
    ensure!(
        ok,
        "bench_random (what={what}) returned {}: {}",
        ret as i32,
        if ret == u32::MAX {
            "the table is unreadable"
        } else {
            "not a verdict"
        }
    );
    Ok(())
}

/// ns per lookup with pseudo-random destinations: per run, the loop without a lookup
/// and then the one with it (each `repeat` runs), the difference; median over `runs`.
#[derive(Clone, Copy, Debug)]
struct RandomCost {
    lookup: Timing,
    /// The subtracted loop (draw + packet handling), median.
    baseline: f64,
}

fn random_cost(
    bench: &SchedClassifier,
    what: u8,
    working_set: u32,
    repeat: u32,
    runs: usize,
) -> Result<RandomCost> {
    let base_packet = bench_packet(WHAT_NONE, working_set);
    let packet = bench_packet(what, working_set);
    let (mut diffs, mut bases) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        let (ret, base) = test_run(bench, &base_packet, repeat)?;
        check_random_return(WHAT_NONE, ret)?;
        let (ret, ns) = test_run(bench, &packet, repeat)?;
        check_random_return(what, ret)?;
        diffs.push(ns - base);
        bases.push(base);
    }
    Ok(RandomCost {
        lookup: Timing::of(diffs),
        baseline: Timing::of(bases).median,
    })
}

/// Share of `VERDICT_SAMPLES` single-lookup runs that `bench_random` denied.
fn observed_deny_share(bench: &SchedClassifier, what: u8, working_set: u32) -> Result<f64> {
    let packet = bench_packet(what, working_set);
    let mut denied = 0;
    for _ in 0..VERDICT_SAMPLES {
        let (ret, _) = test_run(bench, &packet, 1)?;
        check_random_return(what, ret)?;
        denied += usize::from(ret == TC_ACT_SHOT);
    }
    Ok(denied as f64 / VERDICT_SAMPLES as f64)
}

/// The lookups must decide like the rules: the denied share of random single lookups
/// has to match the share of the destination space (or of the working set) the rules
/// cover, computed here from the rules themselves, within 6 standard deviations + 1%.
fn check_deny_share(
    bench: &SchedClassifier,
    what: u8,
    working_set: u32,
    expected: f64,
    label: &str,
) -> Result<f64> {
    let observed = observed_deny_share(bench, what, working_set)?;
    let sigma = (expected * (1.0 - expected) / VERDICT_SAMPLES as f64).sqrt();
    ensure!(
        (observed - expected).abs() <= 6.0 * sigma + 0.01,
        "{label}, working set {working_set}: {observed:.3} of random lookups denied, but the \
         rules cover {expected:.3} of those destinations"
    );
    Ok(observed)
}

/// `memlock` of a map from `/proc/self/fdinfo` (the kernel's `map_mem_usage`).
fn memlock_of(map: &MapData) -> Result<u64> {
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .context("no memlock in fdinfo")?
        .trim()
        .parse()
        .context("memlock")
}

/// `memlock` of the inner table map a swap put in force.
fn table_memlock(swap: &Swap) -> Result<u64> {
    let map = MapData::from_id(swap.table_id)
        .with_context(|| format!("opening table map {}", swap.table_id))?;
    memlock_of(&map)
}

/// Waits until the kernel's `Slab` stops moving (a dropped LPM trie is freed node by
/// node in a kernel worker after the last reference goes: ≈5 s at 10M), so that work
/// does not run under the next size's measurements.
fn settle() {
    let started = Instant::now();
    let mut last = meminfo_kib("Slab").unwrap_or(0);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = meminfo_kib("Slab").unwrap_or(0);
        if now.abs_diff(last) < 1024 || started.elapsed() > Duration::from_secs(60) {
            return;
        }
        last = now;
    }
}

/// Random global-unicast IPv6 prefixes (2000::/3), ≈89% /128, 10% /64, 1% /48 — the
/// IPv4 mix's host/subnet/block shape — deduplicated, fixed seed, never inside
/// 2001:db8::/32 (the miss destination) and never the hit address.
fn rule_mix_v6(count: usize, seed: u64) -> Vec<(u128, u8)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let doc = u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0)) >> 96;
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let addr = (rng.random::<u128>() >> 3) | (1u128 << 125); // 001… = 2000::/3
        if addr >> 96 == doc || addr == u128::from(HIT_V6) {
            continue;
        }
        let len: u8 = match rng.random_range(0..100) {
            0 => 48,
            1..=10 => 64,
            _ => 128,
        };
        out.push((addr & (u128::MAX << (128 - u32::from(len))), len));
        if out.len() == count {
            out.sort_unstable();
            out.dedup();
        }
    }
    out
}

/// Exactly `n` IPv4 rules of the mix, one of them the /32 for the hit destination
/// (replacing a random /32 when the mix does not already hold it).
fn v4_rules(n: usize) -> Vec<(u32, u8)> {
    let mut rules = rule_mix(n, SEED_V4);
    let hit = (u32::from(HIT_V4), 32u8);
    if n > 0 && rules.binary_search(&hit).is_err() {
        let i = rules.iter().position(|r| r.1 == 32).unwrap_or(0);
        rules[i] = hit;
        rules.sort_unstable();
    }
    rules
}

fn v6_rules(n: usize) -> Vec<(u128, u8)> {
    if n == 0 {
        return Vec::new();
    }
    let mut rules = rule_mix_v6(n - 1, SEED_V6);
    rules.push((u128::from(HIT_V6), 128));
    rules.sort_unstable();
    rules
}

fn deny_entries<A: Copy>(rules: &[(A, u8)]) -> Vec<Entry<A>> {
    rules
        .iter()
        .map(|&(addr, len)| Entry {
            addr,
            len,
            action: Action::Deny,
        })
        .collect()
}

/// Share of the IPv4 space the (sorted, deduplicated) prefixes cover. In (addr, len)
/// order a prefix comes before every prefix nested in it.
fn covered_share_v4(rules: &[(u32, u8)]) -> f64 {
    let (mut covered, mut end) = (0u64, 0u64);
    for &(addr, len) in rules {
        let addr = u64::from(addr);
        if addr < end {
            continue;
        }
        let size = 1u64 << (32 - u32::from(len));
        covered += size;
        end = addr + size;
    }
    covered as f64 / (1u64 << 32) as f64
}

/// Share of 2000::/3 (where `bench_random` draws IPv6 destinations and every rule of
/// the mix lies) the prefixes cover.
fn covered_share_v6(rules: &[(u128, u8)]) -> f64 {
    let (mut covered, mut end) = (0f64, 0u128);
    for &(addr, len) in rules {
        if addr < end {
            continue;
        }
        let size = 1u128 << (128 - u32::from(len));
        covered += size as f64;
        end = addr.saturating_add(size);
    }
    covered / 2f64.powi(125)
}

fn denied_v4(rules: &[(u32, u8)], addr: u32) -> bool {
    (0..=32u8).any(|len| {
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        rules.binary_search(&(addr & mask, len)).is_ok()
    })
}

/// Share of `bench_random`'s IPv4 working-set destinations the rules deny.
fn working_set_share_v4(rules: &[(u32, u8)], working_set: u32) -> f64 {
    let denied = (0..working_set)
        .filter(|s| denied_v4(rules, s.wrapping_mul(SPREAD)))
        .count();
    denied as f64 / f64::from(working_set)
}

/// The same for IPv6: `bench_random` puts the folded draw into the high 64 bits (under
/// 2000::/3) and a fresh random low half; only rules of /64 or shorter can then match
/// (a /128 with probability 2^-64).
fn working_set_share_v6(rules: &[(u128, u8)], working_set: u32) -> f64 {
    let denied = (0..working_set)
        .filter(|s| {
            let draw = u64::from(s.wrapping_mul(SPREAD));
            let hi = (1u64 << 61) | ((draw << 29) & ((1u64 << 61) - 1));
            let addr = u128::from(hi) << 64;
            (0..=64u8).any(|len| {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                rules.binary_search(&(addr & mask, len)).is_ok()
            })
        })
        .count();
    denied as f64 / f64::from(working_set)
}

fn mix<T>(rules: &[(T, u8)], lens: [u8; 3]) -> String {
    let count = |l| rules.iter().filter(|r| r.1 == l).count();
    let pct = |c: usize| 100.0 * c as f64 / rules.len().max(1) as f64;
    lens.iter()
        .map(|&l| format!("/{l} {} ({:.2}%)", count(l), pct(count(l))))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One structure holding one rule set: load, memory, same-packet verdicts.
struct Row {
    family: &'static str,
    n: usize,
    structure: &'static str,
    /// `None` for the trie.
    swap: Option<Swap>,
    /// Tables: compile + write; trie: the per-entry insert loop.
    build: Duration,
    memlock: Option<u64>,
    hit: Option<Timing>,
    miss: Timing,
}

impl Row {
    fn load(&self) -> Duration {
        self.build + self.swap.map_or(Duration::ZERO, |s| s.swap)
    }

    fn bytes_per_rule(&self) -> Option<f64> {
        let swap = self.swap?;
        (self.n > 0).then(|| swap.summary.bytes as f64 / self.n as f64)
    }

    fn markdown(&self) -> String {
        let dash = || "—".to_owned();
        let per_rule = |bytes: u64| {
            if self.n == 0 {
                dash()
            } else {
                format!("{:.1}", bytes as f64 / self.n as f64)
            }
        };
        let load = match self.swap {
            Some(s) => format!(
                "{} ({} + {})",
                duration(self.load()),
                duration(self.build),
                duration(s.swap)
            ),
            None => format!("{} (inserts)", duration(self.build)),
        };
        let rate = if self.n == 0 {
            dash()
        } else {
            format!("{:.0}", self.n as f64 / self.load().as_secs_f64().max(1e-9))
        };
        let (bits, ranges, size, bytes) = match self.swap {
            Some(s) => (
                s.summary.direct_bits.to_string(),
                s.summary.ranges.to_string(),
                format!("{:.2}", s.summary.bytes as f64 / (1 << 20) as f64),
                per_rule(s.summary.bytes),
            ),
            None => (dash(), dash(), dash(), dash()),
        };
        format!(
            "| {} | {} | {} | {bits} | {ranges} | {load} | {rate} | {size} | {bytes} | {} | {} | {} |",
            self.family,
            self.n,
            self.structure,
            self.memlock.map_or_else(dash, per_rule),
            self.hit
                .map(|t| t.cell())
                .unwrap_or_else(|| "— (no rule)".into()),
            self.miss.cell(),
        )
    }
}

/// Seconds from 1 s up, else milliseconds.
fn duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.1} ms", s * 1e3)
    }
}

const HEADER: &str = "| family | rules | structure | direct bits | ranges | load: total (build + swap) | rules/s | table MiB | B/rule | memlock B/rule | ns/verdict hit | ns/verdict miss |\n\
                      |---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

/// One structure's random-destination costs at one size, per working set.
struct RandomRow {
    family: &'static str,
    n: usize,
    structure: &'static str,
    costs: [RandomCost; 3],
    /// (observed, expected) denied share of single random lookups, per working set.
    shares: [(f64, f64); 3],
}

impl RandomRow {
    fn markdown(&self, rows: &[RandomRow]) -> String {
        let base = rows
            .iter()
            .find(|r| r.family == self.family && r.n == BASE_SIZE && r.structure == self.structure);
        let cells: Vec<String> = (0..WORKING_SETS.len())
            .map(|i| {
                let t = self.costs[i].lookup;
                let ratio = base
                    .map(|b| b.costs[i].lookup.median)
                    .filter(|&b| b > 0.0)
                    .map_or_else(|| "—".to_owned(), |b| format!("{:.1}×", t.median / b));
                format!("{} | {ratio}", t.cell())
            })
            .collect();
        let baselines: Vec<String> = self
            .costs
            .iter()
            .map(|c| format!("{:.0}", c.baseline))
            .collect();
        let denied: Vec<String> = self
            .shares
            .iter()
            .map(|(o, e)| format!("{:.1}/{:.1}", o * 100.0, e * 100.0))
            .collect();
        format!(
            "| {} | {} | {} | {} | {} | {} |",
            self.family,
            self.n,
            self.structure,
            cells.join(" | "),
            baselines.join(" / "),
            denied.join(" · "),
        )
    }

    fn raw(&self) -> String {
        let cells: Vec<String> = WORKING_SETS
            .iter()
            .zip(&self.costs)
            .zip(&self.shares)
            .map(|((w, c), (o, e))| {
                format!(
                    "W={w}: {:.1} ns (min {:.1}, max {:.1}) loop {:.1} ns, denied {o:.3} (rules {e:.3})",
                    c.lookup.median, c.lookup.min, c.lookup.max, c.baseline
                )
            })
            .collect();
        format!(
            "random {} n={} {}: {}",
            self.family,
            self.n,
            self.structure,
            cells.join("; ")
        )
    }
}

const RANDOM_HEADER: &str = "| family | rules | structure | uniform ns/lookup | × 1k | 4096 dest. ns/lookup | × 1k | 64 dest. ns/lookup | × 1k | loop ns subtracted (uniform / 4096 / 64) | denied % observed/rules (uniform · 4096 · 64) |\n\
                             |---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|";

/// The reference object bound to this pin dir's table maps: `bench_random` reads the
/// tables the installer code swapped in, `ref_v4` is its own LPM trie.
fn load_reference(pins: &PinDir) -> Result<Ebpf> {
    let v4 = pins.layout.map(V4_TABLE_MAP);
    let v6 = pins.layout.map(V6_TABLE_MAP);
    let mut ebpf = EbpfLoader::new()
        .map_pin_path(V4_TABLE_MAP, v4)
        .map_pin_path(V6_TABLE_MAP, v6)
        .load(egress_deny_datapath::REFERENCE_LPM_OBJECT)
        .context("loading the reference object")?;
    for name in ["reference_lpm", "bench_random"] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("{name} missing from the reference object"))?
            .try_into()?;
        prog.load().with_context(|| format!("loading {name}"))?;
    }
    Ok(ebpf)
}

fn program<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a SchedClassifier> {
    Ok(ebpf
        .program(name)
        .with_context(|| format!("{name} missing"))?
        .try_into()?)
}

/// Fills the reference object's LPM trie, one update per rule; returns the loop's time.
fn fill_trie(ebpf: &mut Ebpf, rules: &[(u32, u8)]) -> Result<Duration> {
    let mut trie: LpmTrie<_, [u8; 4], u32> =
        LpmTrie::try_from(ebpf.map_mut("ref_v4").context("ref_v4")?)?;
    let started = Instant::now();
    for &(addr, len) in rules {
        trie.insert(&Key::new(u32::from(len), addr.to_be_bytes()), 1, 0)?;
    }
    Ok(started.elapsed())
}

/// Random-destination costs and verdict check of one structure, all working sets.
#[allow(clippy::too_many_arguments)]
fn random_row(
    bench: &SchedClassifier,
    family: &'static str,
    n: usize,
    structure: &'static str,
    what: u8,
    expected: &dyn Fn(u32) -> f64,
    args: &Args,
) -> Result<RandomRow> {
    let mut costs = Vec::new();
    let mut shares = Vec::new();
    for w in WORKING_SETS {
        costs.push(random_cost(bench, what, w, args.repeat, args.runs)?);
        let e = expected(w);
        let label = format!("{family} {n} {structure}");
        shares.push((check_deny_share(bench, what, w, e, &label)?, e));
    }
    let row = RandomRow {
        family,
        n,
        structure,
        costs: costs.try_into().expect("one per working set"),
        shares: shares.try_into().expect("one per working set"),
    };
    eprintln!("  {}", row.raw());
    Ok(row)
}

fn main() -> Result<()> {
    require_root();
    let args = Args::parse();
    ensure!(
        args.repeat >= 1 && args.runs >= 1,
        "--repeat and --runs must be >= 1"
    );
    let mut sizes: Vec<usize> = SIZES
        .iter()
        .copied()
        .filter(|&n| n <= args.max_rules)
        .collect();
    if !sizes.contains(&args.max_rules) {
        sizes.push(args.max_rules);
    }
    let largest = *sizes.last().unwrap_or(&0);
    let v6_count = args.v6_rules.unwrap_or(largest);
    let load_at_start = loadavg();
    let frames = [
        frame_v4(HIT_V4),
        frame_v4(MISS_V4),
        frame_v6(HIT_V6),
        frame_v6(MISS_V6),
    ];

    println!("{HEADER}");
    let mut rows = Vec::new();
    let mut random_rows = Vec::new();
    let mut event_rows = Vec::new();
    let mut mixes = Vec::new();
    for &n in &sizes {
        let rules = v4_rules(n);
        ensure!(
            rules.len() == n,
            "generated {} rules, wanted {n}",
            rules.len()
        );
        if n > 0 {
            mixes.push(format!("IPv4 {n}: {}", mix(&rules, [32, 24, 16])));
        }
        let entries = deny_entries(&rules);
        let uniform_share = covered_share_v4(&rules);
        let expected_v4 = |w: u32| {
            if w == 0 {
                uniform_share
            } else {
                working_set_share_v4(&rules, w)
            }
        };
        let pins = PinDir::new()?;
        events::set_events_per_second(&pins.layout, INSTALLER_EVENTS_PER_SECOND)?;
        let tables = RuleTables::open(&pins.layout)?;
        let prog = SchedClassifier::from_pin(pins.layout.program(ProgramKind::Ethernet))?;
        let mut reference = load_reference(&pins)?;
        let trie_fill = fill_trie(&mut reference, &rules)?;

        for candidate in Candidate::ALL {
            let swap = tables.replace_v4_with(&entries, candidate.layout())?;
            let memlock = table_memlock(&swap)?;
            check_decisions(&tables, HIT_V4.into(), MISS_V4.into(), n > 0)?;
            let hit = if n > 0 {
                Some(ns_per_verdict(
                    &prog,
                    &frames[0],
                    args.repeat,
                    args.runs,
                    TC_ACT_SHOT,
                )?)
            } else {
                None
            };
            let miss = ns_per_verdict(&prog, &frames[1], args.repeat, args.runs, TC_ACT_UNSPEC)?;
            let row = Row {
                family: "IPv4",
                n,
                structure: candidate.name(),
                swap: Some(swap),
                build: swap.build,
                memlock: Some(memlock),
                hit,
                miss,
            };
            println!("{}", row.markdown());
            rows.push(row);
            random_rows.push(random_row(
                program(&reference, "bench_random")?,
                "IPv4",
                n,
                candidate.name(),
                WHAT_TABLE,
                &expected_v4,
                &args,
            )?);
            if n == 1_000_000 && candidate == Candidate::Adaptive {
                event_rows = event_costs(
                    &pins,
                    &prog,
                    program(&reference, "reference_lpm")?,
                    &frames,
                    &args,
                )?;
            }
        }

        let lpm = program(&reference, "reference_lpm")?;
        let hit = if n > 0 {
            Some(ns_per_verdict(
                lpm,
                &frames[0],
                args.repeat,
                args.runs,
                TC_ACT_SHOT,
            )?)
        } else {
            None
        };
        let miss = ns_per_verdict(lpm, &frames[1], args.repeat, args.runs, TC_ACT_OK)?;
        let row = Row {
            family: "IPv4",
            n,
            structure: TRIE,
            swap: None,
            build: trie_fill,
            memlock: None,
            hit,
            miss,
        };
        println!("{}", row.markdown());
        rows.push(row);
        random_rows.push(random_row(
            program(&reference, "bench_random")?,
            "IPv4",
            n,
            TRIE,
            WHAT_TRIE,
            &expected_v4,
            &args,
        )?);

        if n == largest && v6_count > 0 {
            let v6 = v6_rules(v6_count);
            mixes.push(format!("IPv6 {}: {}", v6.len(), mix(&v6, [128, 64, 48])));
            let swap = tables.replace_v6(&deny_entries(&v6))?;
            let memlock = table_memlock(&swap)?;
            check_decisions(&tables, HIT_V6.into(), MISS_V6.into(), true)?;
            let hit = ns_per_verdict(&prog, &frames[2], args.repeat, args.runs, TC_ACT_SHOT)?;
            let miss = ns_per_verdict(&prog, &frames[3], args.repeat, args.runs, TC_ACT_UNSPEC)?;
            let row = Row {
                family: "IPv6",
                n: v6.len(),
                structure: TABLE_V6,
                swap: Some(swap),
                build: swap.build,
                memlock: Some(memlock),
                hit: Some(hit),
                miss,
            };
            println!("{}", row.markdown());
            rows.push(row);
            let uniform_share = covered_share_v6(&v6);
            let expected_v6 = |w: u32| {
                if w == 0 {
                    uniform_share
                } else {
                    working_set_share_v6(&v6, w)
                }
            };
            random_rows.push(random_row(
                program(&reference, "bench_random")?,
                "IPv6",
                v6.len(),
                TABLE_V6,
                WHAT_TABLE_V6,
                &expected_v6,
                &args,
            )?);
        }
        drop(reference); // frees the trie (in a kernel worker)
        drop(prog);
        drop(tables);
        drop(pins); // unpins: the kernel frees the tables
        settle();
    }

    println!("\n{RANDOM_HEADER}");
    for row in &random_rows {
        println!("{}", row.markdown(&random_rows));
    }
    let targets = targets(&rows, &random_rows);
    println!("\n{targets}");

    let body = document(
        &args,
        &rows,
        &random_rows,
        &targets,
        &event_rows,
        &mixes.join("; "),
        &format!("{load_at_start} at start, {} at the end", loadavg()),
        (frames[0].len(), frames[2].len()),
    );
    write_section(&args.out, "datapath", &body)?;
    println!("\nwrote the datapath section of {}", args.out.display());
    Ok(())
}

/// Issue 11's targets, per structure, from what this run measured.
fn targets(rows: &[Row], random_rows: &[RandomRow]) -> String {
    let structures = [Candidate::Adaptive.name(), Candidate::Direct16.name(), TRIE];
    let mark = |ok: bool| if ok { "✓" } else { "✗" };
    let not_run = || "not measured".to_owned();
    let ratio = |structure: &str, n: usize| {
        let find = |n| {
            random_rows
                .iter()
                .find(|r| r.family == "IPv4" && r.n == n && r.structure == structure)
        };
        match (find(n), find(BASE_SIZE)) {
            (Some(r), Some(b)) if b.costs[0].lookup.median > 0.0 => {
                let x = r.costs[0].lookup.median / b.costs[0].lookup.median;
                format!(
                    "{:.0} / {:.0} ns = {x:.1}× {}",
                    r.costs[0].lookup.median,
                    b.costs[0].lookup.median,
                    mark(x <= TARGET_RATIO)
                )
            }
            _ => not_run(),
        }
    };
    let row = |structure: &str, n: usize| {
        rows.iter()
            .find(|r| r.family == "IPv4" && r.n == n && r.structure == structure)
    };
    let same_packet = |structure: &str| match row(structure, 1_000_000) {
        Some(r) if structure == TRIE => format!(
            "{:.0} / {:.0} ns (`reference_lpm`: no parsing, counters or events)",
            r.hit.map_or(f64::NAN, |t| t.median),
            r.miss.median
        ),
        Some(r) => {
            let hit = r.hit.map_or(f64::NAN, |t| t.median);
            format!(
                "{hit:.0} / {:.0} ns {}",
                r.miss.median,
                mark(hit <= TRIE_HIT_1M_NS && r.miss.median <= TRIE_MISS_1M_NS)
            )
        }
        None => not_run(),
    };
    let memory = |structure: &str, n: usize| match row(structure, n) {
        Some(_) if structure == TRIE => "≈140–153 (previous measurement)".to_owned(),
        Some(r) => r.bytes_per_rule().map_or_else(not_run, |b| {
            format!("{b:.1} {}", mark(b <= TARGET_BYTES_PER_RULE))
        }),
        None => not_run(),
    };
    let line = |what: &str, cell: &dyn Fn(&str) -> String| {
        let cells: Vec<String> = structures.iter().map(|s| cell(s)).collect();
        format!("| {what} | {} |", cells.join(" | "))
    };
    [
        format!(
            "| target (issue 11) | {} | {} | {} |\n|---|---:|---:|---:|",
            structures[0], structures[1], structures[2]
        ),
        line(
            "uniformly random destinations, 1M rules: ns/lookup ≤ 2 × the 1k cost",
            &|s| ratio(s, 1_000_000),
        ),
        line(
            "uniformly random destinations, 10M rules: ns/lookup ≤ 2 × the 1k cost",
            &|s| ratio(s, 10_000_000),
        ),
        line(
            "same packet, 1M rules: ns/verdict hit / miss ≤ the trie datapath's 198 / 127",
            &same_packet,
        ),
        line("kernel memory, 1M rules: B/rule ≤ 32", &|s| {
            memory(s, 1_000_000)
        }),
        line("kernel memory, 10M rules: B/rule ≤ 32", &|s| {
            memory(s, 10_000_000)
        }),
    ]
    .join("\n")
}

/// The rule set must decide the two destinations as intended, read back through the
/// installer's own lookup (the same search the program does).
fn check_decisions(maps: &RuleTables, hit: IpAddr, miss: IpAddr, has_hit: bool) -> Result<()> {
    let d = maps.lookup(hit)?;
    let full = if hit.is_ipv4() { 32 } else { 128 };
    ensure!(
        !has_hit || (d.action == Action::Deny && d.prefix.map(|p| p.prefix_len()) == Some(full)),
        "hit destination {hit} decided {d:?}"
    );
    let d = maps.lookup(miss)?;
    ensure!(
        d.action == Action::Allow && d.prefix.is_none(),
        "miss destination {miss} is covered: {d:?}"
    );
    Ok(())
}

/// Size of the last-level cache as the (virtual) machine reports it.
fn l3_size() -> String {
    std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index3/size")
        .map(|s| {
            let s = s.trim();
            match s.strip_suffix('K').and_then(|k| k.parse::<u64>().ok()) {
                Some(k) if k >= 1024 => format!("{} MiB", k / 1024),
                _ => s.to_owned(),
            }
        })
        .unwrap_or_else(|_| "unknown".into())
}

#[allow(clippy::too_many_arguments)]
fn document(
    args: &Args,
    rows: &[Row],
    random_rows: &[RandomRow],
    targets: &str,
    event_rows: &[String],
    mixes: &str,
    loadavg: &str,
    frame_bytes: (usize, usize),
) -> String {
    let table = rows
        .iter()
        .map(Row::markdown)
        .collect::<Vec<_>>()
        .join("\n");
    let random = random_rows
        .iter()
        .map(|r| r.markdown(random_rows))
        .collect::<Vec<_>>()
        .join("\n");
    let events = if event_rows.is_empty() {
        "Not measured in this run (it runs at 1,000,000 IPv4 rules; `--max-rules` was lower)."
            .to_owned()
    } else {
        format!(
            "| case | ns/verdict median (min–max) |\n|---|---:|\n{}",
            event_rows.join("\n")
        )
    };
    let v6 = match args.v6_rules {
        Some(n) => format!(" --v6-rules {n}"),
        None => String::new(),
    };
    format!(
        "## Datapath: compiled rule tables vs the LPM trie (BPF_PROG_TEST_RUN)

`cargo run --release -p egress-deny-tests --bin bench-datapath -- --max-rules {max} --repeat {repeat} --runs {runs}{v6}`

Machine: {machine}, L3 {l3} as the VM reports it; measured {date} (1-minute load average
{loadavg}: other work shared this 2-core machine during the run).

**Rules.** IPv4: the published egress-filtering benchmark's mix — random global-unicast
prefixes (never in 0/8, 10/8, 100.64/10, 127/8, 169.254/16, 172.16/12, 192.0/16,
192.168/16, 198.51/16, 203.0/16, 224/3), ≈89% /32, 10% /24, 1% /16, deduplicated, seed
{SEED_V4} (`egress_deny_tests::bench::rule_mix`, the same generator as the other
benchmarks). The rule count is exact and includes the hit destination's /32. Actual mix:
{mixes}. At 10M rules the /16 share cannot reach 1%: there are only ≈56k global-unicast
/16s outside the exclusions, most of which end up in the set (nearly every address is
then denied by some /16; the miss destination sits in the excluded 192.0/16). IPv6 (at
the largest size only, loaded next to the IPv4 set): random 2000::/3 prefixes, ≈89% /128,
10% /64, 1% /48, seed {SEED_V6}, never in 2001:db8::/32.

**Structures.** Each rule set is compiled by the installer's own code
(`RuleTables::replace_v4_with`, `replace_v6`) into disjoint address ranges with a
verdict, laid out as a direct table on the top bits of the destination (one `u32` per
bucket: the bucket's first range) followed by the sorted ranges, searched by a bounded
binary search within the bucket. Two layouts are measured side by side on the same
rules: *adaptive* (`Layout::default()`: the direct level sized to about 4 ranges per
bucket, so its width grows with the rule set) and *direct16* (a fixed 16-bit direct
level, DXR / FreeBSD `dxr` style: 256 KiB of direct table, buckets of ≈ranges/65536).
Where the adaptive layout picks 16 bits itself (the 100k-rule set) the two rows are the
same table and differ only by measurement noise. The reference is the kernel's LPM trie (`BPF_MAP_TYPE_LPM_TRIE`, the map the datapath
used before issue 11), filled with the same rules one `BPF_MAP_UPDATE_ELEM` at a time.

**Load and memory.** *load* is the installer's swap: *build* compiles the rules and
writes the new inner array map (64 KiB blocks, one update per block, then frozen),
*swap* is the single outer-map update that puts it in force (it returns after an RCU
grace period, once no program can still read the old table). For the trie it is the
per-entry insert loop. At small sizes the grace period (a few to tens of ms here)
dominates the table's load, so *rules/s* there says nothing about the compiler. *table MiB* and *B/rule* are the inner map's exact size (blocks
× 64 KiB: header block, direct table, 8-byte IPv4 / 24-byte IPv6 ranges, rounded up to a
block); *memlock* is what the kernel charges for that map (`/proc/self/fdinfo`
`memlock`, i.e. `map_mem_usage`). This is the whole kernel memory of a table: one
vmalloc'ed area, no per-rule objects. The trie's memory is not re-measured here (its
`memlock` of 32 B/rule counts neither intermediate nodes nor slab rounding); the previous
version of this benchmark measured ≈127 / 140 / 153 B/rule of slab at 100k / 1M / 10M
(two 64-byte slab objects per rule).

**ns/verdict (same packet)** is the kernel's own average over `repeat` = {repeat} runs of
the real Ethernet program (`egress_deny`, pinned by the installer's `load_and_pin`) on
one small UDP frame ({v4_bytes} bytes IPv4, {v6_bytes} bytes IPv6), median (min–max) of
{runs} such runs. Every run's return value is asserted (hit: `TC_ACT_SHOT`, miss:
`TC_ACT_UNSPEC`), and both destinations are checked with the installer's lookup first.
Hit = {HIT_V4} / {HIT_V6} (a /32 or /128 rule); miss = {MISS_V4} / {MISS_V6}. Deny
events are at the installer's default budget ({INSTALLER_EVENTS_PER_SECOND}/s per
attachment and CPU), so the hit path includes the budget check (suppressed: the flood
case). The trie rows run the published benchmark's plain filter (`reference_lpm`:
Ethernet + IPv4 only, one trie lookup, no counters or events; miss returns `TC_ACT_OK`),
so they are the trie's lookup plus minimal parsing, not egress-deny on a trie; the trie
datapath itself measured 198 / 127 ns (hit / miss) at 1M rules before issue 11. The same
packet every time keeps the lookup's memory hot in the CPU caches: a best case.

**ns/lookup (random destinations)** runs `bench_random` from the reference object (its
`v4_table` / `v6_table` are the pin dir's maps, so it reads the very table measured
above; `ref_v4` is the trie). Each program run draws `bpf_get_prandom_u32()` as the
destination — uniformly random, or folded onto a working set of W = 4096 or 64
destinations (`(draw % W) × 0x9E3779B1`, spread over the space) — and does one lookup.
Per measurement, the same loop without the lookup (`repeat` runs) and then with it
(`repeat` runs) are timed back to back; the cell is the median over {runs} such pairs of
the difference, with its min–max. The loop's own cost (program entry, packet handling,
the draw) is in the *loop ns subtracted* column. Medians, because the samples are skewed
by whatever else this shared 2-core VM does (and by hypervisor steal time, which
BPF_PROG_TEST_RUN does not exclude); min–max show the spread. A run's first lookups
warm the caches and TLB for the structure; a large `repeat` amortizes that (with
`--repeat 1000` the uniform costs at 100k rules came out 3–4× higher on this machine). *× 1k* is the ratio to the
same structure's 1,000-rule row (at a few ns the 1k cost is coarse — the kernel reports
whole ns — so small ratios carry that noise). With W = 64 the few lines touched stay in
L1/L2: the cache-hot case; W = 4096 is in between (a few thousand lines per structure);
uniformly random destinations touch a new part of the structure every time: the
cold-cache worst case, and what a node talking to many destinations pays. Caveat: this VM
reports a {l3} L3 (`lscpu`), larger than even the 10M-rule tables (*table MiB* above), so
here they may sit largely in L3 and the uniform column is likely better than on hardware
with a 32–256 MiB L3; the trie (≈1.5 GB of nodes at 10M) cannot fit in it either way. IPv6 lookups
draw a second random number for the low 64 bits, which is in their cost (a few ns).
Each row is also checked: {VERDICT_SAMPLES} single-lookup runs per working set must deny
the share of destinations the rules cover (computed from the rules, within 6 σ + 1%; the
last column, %), and no run may return -1 (table unreadable).

{HEADER}
{table}

{RANDOM_HEADER}
{random}

### Against issue 11's targets

{targets}

### Cost of deny events and counters (1M IPv4 rules, adaptive table)

Same method and rule set. Deny events are emitted on the deny path only; the allow path
reads no config and takes no timestamp. The reference rows are the published
benchmark's plain LPM filter (IPv4 only, no VLAN parsing, no counters, no events) on the
same rules in its trie: the difference to it on a miss is parsing, the counters and the
table lookup against the trie's.

{events}
",
        max = args.max_rules,
        repeat = args.repeat,
        runs = args.runs,
        machine = machine(),
        l3 = l3_size(),
        date = date_utc(),
        v4_bytes = frame_bytes.0,
        v6_bytes = frame_bytes.1,
    )
}

/// Deny path with events off, on within budget, on over budget; allow path vs the
/// reference program (its trie already holds the same rules).
fn event_costs(
    pins: &PinDir,
    prog: &SchedClassifier,
    reference: &SchedClassifier,
    frames: &[Vec<u8>; 4],
    args: &Args,
) -> Result<Vec<String>> {
    let (hit, miss) = (&frames[0], &frames[1]);
    let (repeat, runs) = (args.repeat, args.runs);
    let mut rows = Vec::new();
    events::set_events_per_second(&pins.layout, 0)?;
    rows.push(format!(
        "| deny, events off | {} |",
        ns_per_verdict(prog, hit, repeat, runs, TC_ACT_SHOT)?.cell()
    ));
    events::set_events_per_second(&pins.layout, INSTALLER_EVENTS_PER_SECOND)?;
    rows.push(format!(
        "| deny, events on, over the budget (suppressed: the flood case; installer default) | {} |",
        ns_per_verdict(prog, hit, repeat, runs, TC_ACT_SHOT)?.cell()
    ));
    events::set_events_per_second(&pins.layout, u32::MAX)?;
    // Nobody consumes the ring here: after it fills, outputs fail fast; measure a
    // short burst that stays within the ring (256 KiB / 48 B ≈ 5400 events), once.
    rows.push(format!(
        "| deny, events on, every packet reported (ring not full; 2000 runs, 1 sample) | {} |",
        ns_per_verdict(prog, hit, 2000, 1, TC_ACT_SHOT)?.cell()
    ));
    events::set_events_per_second(&pins.layout, INSTALLER_EVENTS_PER_SECOND)?;
    rows.push(format!(
        "| allow (miss), egress-deny | {} |",
        ns_per_verdict(prog, miss, repeat, runs, TC_ACT_UNSPEC)?.cell()
    ));
    rows.push(format!(
        "| allow (miss), reference LPM filter | {} |",
        ns_per_verdict(reference, miss, repeat, runs, TC_ACT_OK)?.cell()
    ));
    rows.push(format!(
        "| deny (hit), reference LPM filter | {} |",
        ns_per_verdict(reference, hit, repeat, runs, TC_ACT_SHOT)?.cell()
    ));
    for row in &rows {
        println!("{row}");
    }
    Ok(rows)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_owned()
}

fn date_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covered_share_counts_nested_prefixes_once() {
        // 10.0.0.0/8 holds 10.1.0.0/16 and 10.1.2.3/32; 11.0.0.0/8 beside it.
        let rules = vec![
            (0x0a00_0000, 8),
            (0x0a01_0000, 16),
            (0x0a01_0203, 32),
            (0x0b00_0000, 8),
        ];
        assert_eq!(covered_share_v4(&rules), 2.0 / 256.0);
        assert!(denied_v4(&rules, 0x0a63_0000));
        assert!(!denied_v4(&rules, 0x0c00_0000));
        assert_eq!(covered_share_v4(&[(0, 0)]), 1.0);
        let v6 = vec![(1u128 << 125, 3)];
        assert_eq!(covered_share_v6(&v6), 1.0);
        assert_eq!(working_set_share_v6(&v6, 64), 1.0);
    }
}
