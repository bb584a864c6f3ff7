//! Datapath benchmark: ns per verdict (BPF_PROG_TEST_RUN), kernel memory per rule and
//! load time, IPv4 at 0 … 10M rules of the published egress-filtering benchmark's mix,
//! plus one IPv6 set at the largest size.
//!
//!     cargo run --release -p egress-deny-tests --bin bench-datapath -- \
//!         [--max-rules N] [--repeat N] [--runs K] [--v6-rules N] [--out FILE]
//!
//! Writes its section of `tests/BENCHMARKS.md` (or `--out`) between
//! `<!-- begin datapath -->` / `<!-- end datapath -->`; other sections are left alone.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use aya::{
    maps::MapData,
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use egress_deny_datapath::{
    events,
    paths::{ProgramKind, V4_TABLE_MAP, V6_TABLE_MAP},
    rules::{Action, RuleTables},
    table::Entry,
};
use egress_deny_tests::{
    PinDir,
    bench::{machine, meminfo_kib, rule_mix, write_section},
    packet, require_root,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

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

struct Args {
    max_rules: usize,
    repeat: u32,
    runs: usize,
    v6_rules: Option<usize>,
    out: PathBuf,
}

fn usage() -> &'static str {
    "usage: bench-datapath [--max-rules N (10000000)] [--repeat N (1000000)] [--runs K (5)]\n\
     \x20                     [--v6-rules N (same as the largest IPv4 size)] [--out FILE (tests/BENCHMARKS.md)]"
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        max_rules: 10_000_000,
        repeat: 1_000_000,
        runs: 5,
        v6_rules: None,
        out: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md")),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{}", usage());
            std::process::exit(0);
        }
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{}", usage()))?;
        let bad = || format!("bad value {value:?} for {flag}");
        match flag.as_str() {
            "--max-rules" => args.max_rules = value.parse().with_context(bad)?,
            "--repeat" => args.repeat = value.parse().with_context(bad)?,
            "--runs" => args.runs = value.parse().with_context(bad)?,
            "--v6-rules" => args.v6_rules = Some(value.parse().with_context(bad)?),
            "--out" => args.out = PathBuf::from(value),
            _ => bail!("unknown argument {flag:?}\n{}", usage()),
        }
    }
    ensure!(
        args.repeat >= 1 && args.runs >= 1,
        "--repeat and --runs must be >= 1"
    );
    Ok(args)
}

/// Median, min and max of the kernel's average ns per run over `runs` test runs.
#[derive(Clone, Copy)]
struct Timing {
    median: f64,
    min: f64,
    max: f64,
}

impl Timing {
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
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat;
        let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
        ensure!(
            r.return_value == expect,
            "verdict {} != expected {expect}",
            r.return_value as i32
        );
        samples.push(r.duration.as_nanos() as f64);
    }
    samples.sort_by(f64::total_cmp);
    Ok(Timing {
        median: samples[samples.len() / 2],
        min: samples[0],
        max: samples[samples.len() - 1],
    })
}

/// `memlock` of a pinned map from `/proc/self/fdinfo` (the kernel's `map_mem_usage`).
fn memlock(path: &Path) -> Result<u64> {
    let map = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .context("no memlock in fdinfo")?
        .trim()
        .parse()
        .context("memlock")
}

/// Slab and Percpu (KiB) from /proc/meminfo once Slab has stopped moving (freeing a big
/// trie is deferred to workqueues and RCU callbacks and goes on after unpinning).
fn settled_meminfo() -> Mem {
    let started = Instant::now();
    let mut last = meminfo_kib("Slab").unwrap_or(0);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = meminfo_kib("Slab").unwrap_or(0);
        if now.abs_diff(last) < 1024 || started.elapsed() > Duration::from_secs(120) {
            return Mem {
                slab_kib: now as i64,
                percpu_kib: meminfo_kib("Percpu").unwrap_or(0) as i64,
                objects64: slab64_objects().map(|n| n as i64),
            };
        }
        last = now;
    }
}

#[derive(Clone, Copy)]
struct Mem {
    slab_kib: i64,
    percpu_kib: i64,
    objects64: Option<i64>,
}

impl std::ops::Sub for Mem {
    type Output = Mem;
    fn sub(self, before: Mem) -> Mem {
        Mem {
            slab_kib: self.slab_kib - before.slab_kib,
            percpu_kib: self.percpu_kib - before.percpu_kib,
            objects64: self.objects64.zip(before.objects64).map(|(a, b)| a - b),
        }
    }
}

/// Active 64-byte kmalloc objects (`kmalloc-64` + `kmalloc-cg-64` in /proc/slabinfo):
/// the size class every LPM trie node of both families falls in (node 24 B + key data +
/// value 4 B + bpf_mem_alloc's 8 B list head = 40 or 52 B), so its change counts nodes.
fn slab64_objects() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/slabinfo").ok()?;
    let mut total = 0;
    for line in info.lines() {
        let mut f = line.split_whitespace();
        if matches!(f.next(), Some("kmalloc-64" | "kmalloc-cg-64")) {
            total += f.next()?.parse::<u64>().ok()?;
        }
    }
    Some(total)
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

/// Number of nodes the kernel's LPM trie holds for these prefixes (keys left-aligned in a
/// u128, sorted by key then length): one per entry plus one intermediate node per
/// branch point that is not itself an entry. In that order the branch points are exactly
/// the longest common prefixes of neighbours that diverge below both.
fn trie_nodes(sorted: &[(u128, u8)]) -> usize {
    let mut branches = std::collections::HashSet::new();
    for w in sorted.windows(2) {
        let ((a, la), (b, lb)) = (w[0], w[1]);
        let lcp = (a ^ b).leading_zeros().min(u32::from(la.min(lb)));
        if lcp < u32::from(la.min(lb)) {
            let mask = if lcp == 0 {
                0
            } else {
                u128::MAX << (128 - lcp)
            };
            branches.insert((a & mask, lcp as u8));
        }
    }
    let entries: std::collections::HashSet<(u128, u8)> = sorted.iter().copied().collect();
    sorted.len() + branches.iter().filter(|b| !entries.contains(b)).count()
}

fn mix<T>(rules: &[(T, u8)], lens: [u8; 3]) -> String {
    let count = |l| rules.iter().filter(|r| r.1 == l).count();
    let pct = |c: usize| 100.0 * c as f64 / rules.len().max(1) as f64;
    lens.iter()
        .map(|&l| format!("/{l} {} ({:.2}%)", count(l), pct(count(l))))
        .collect::<Vec<_>>()
        .join(", ")
}

struct Row {
    family: &'static str,
    n: usize,
    load: Duration,
    memlock: u64,
    /// Change across the load.
    mem: Mem,
    /// Trie nodes the rule set needs (`trie_nodes`).
    model_nodes: usize,
    hit: Option<Timing>,
    miss: Timing,
    mix: String,
}

impl Row {
    fn markdown(&self) -> String {
        let per_rule = |bytes: f64| {
            if self.n == 0 {
                "—".to_owned()
            } else {
                format!("{:.0}", bytes / self.n as f64)
            }
        };
        // Below ~100k rules the change (< 14 MB) drowns in the rest of the kernel's
        // slab traffic.
        let delta = |kib: i64| {
            if self.n >= 100_000 && self.disturbed() {
                format!("({} disturbed)", per_rule(kib as f64 * 1024.0))
            } else if self.n >= 100_000 {
                per_rule(kib as f64 * 1024.0)
            } else {
                "(noise)".to_owned()
            }
        };
        let load_s = self.load.as_secs_f64();
        let model = self.model_nodes as f64 / self.n.max(1) as f64;
        let nodes = match self.mem.objects64 {
            _ if self.n == 0 => "—".to_owned(),
            _ if self.n < 100_000 => format!("(noise) (model {model:.2})"),
            Some(o) if self.disturbed() => {
                format!("{:.2} ≠ {model:.2}: disturbed", o as f64 / self.n as f64)
            }
            Some(o) => format!("{:.2} (model {model:.2})", o as f64 / self.n as f64),
            None => format!("n/a (model {model:.2})"),
        };
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            self.family,
            self.n,
            if self.n == 0 {
                "—".to_owned()
            } else {
                format!("{load_s:.2} s")
            },
            if self.n == 0 {
                "—".to_owned()
            } else {
                format!("{:.0}", self.n as f64 / load_s.max(1e-9))
            },
            per_rule(self.memlock as f64),
            delta(self.mem.slab_kib),
            delta(self.mem.percpu_kib),
            nodes,
            self.hit
                .map(|t| t.cell())
                .unwrap_or_else(|| "— (no rule)".into()),
            self.miss.cell(),
        )
    }

    /// Other activity on the machine moved the 64-byte slab count by more than 5% of
    /// what this rule set needs: the machine-wide deltas of this row are not its own.
    fn disturbed(&self) -> bool {
        self.n >= 100_000
            && self.mem.objects64.is_none_or(|o| {
                (o - self.model_nodes as i64).unsigned_abs() * 20 > self.model_nodes as u64
            })
    }

    fn raw(&self) -> String {
        format!(
            "{} n={} load={:.3}s memlock={}B slabΔ={}KiB percpuΔ={}KiB 64B-objectsΔ={:?} model-nodes={} mix: {}",
            self.family,
            self.n,
            self.load.as_secs_f64(),
            self.memlock,
            self.mem.slab_kib,
            self.mem.percpu_kib,
            self.mem.objects64,
            self.model_nodes,
            self.mix
        )
    }
}

const HEADER: &str = "| family | rules | load time | rules/s | memlock B/rule | Slab Δ B/rule | Percpu Δ B/rule | trie nodes/rule: 64 B objects Δ (model) | ns/verdict hit | ns/verdict miss |\n\
                      |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

fn main() -> Result<()> {
    require_root();
    let args = parse_args()?;
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
    let mut event_rows = Vec::new();
    for &n in &sizes {
        let rules = v4_rules(n);
        ensure!(
            rules.len() == n,
            "generated {} rules, wanted {n}",
            rules.len()
        );
        let pins = PinDir::new()?;
        events::set_events_per_second(&pins.layout, INSTALLER_EVENTS_PER_SECOND)?;
        let maps = RuleTables::open(&pins.layout)?;
        // After the (empty) maps exist: only what the rules add is counted.
        let before = settled_meminfo();
        let started = Instant::now();
        egress_deny_tests::bench::deny_v4(&pins.layout, &rules)?;
        let load = started.elapsed();
        let mem = settled_meminfo() - before;
        check_decisions(&maps, HIT_V4.into(), MISS_V4.into(), n > 0)?;
        let prog = SchedClassifier::from_pin(pins.layout.program(ProgramKind::Ethernet))?;
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
            load,
            memlock: memlock(&pins.layout.map(V4_TABLE_MAP))?,
            mem,
            hit,
            miss,
            model_nodes: trie_nodes(
                &rules
                    .iter()
                    .map(|&(a, l)| (u128::from(a) << 96, l))
                    .collect::<Vec<_>>(),
            ),
            mix: mix(&rules, [32, 24, 16]),
        };
        println!("{}", row.markdown());
        eprintln!("  {}", row.raw());
        rows.push(row);

        if n == 1_000_000 {
            event_rows = event_costs(&pins, &prog, &rules, &frames, &args)?;
        }
        if n == largest && v6_count > 0 {
            let v6 = v6_rules(v6_count);
            let before = settled_meminfo();
            let started = Instant::now();
            let entries: Vec<Entry<u128>> = v6
                .iter()
                .map(|&(addr, len)| Entry {
                    addr,
                    len,
                    action: Action::Deny,
                })
                .collect();
            maps.replace_v6(&entries)?;
            let load = started.elapsed();
            let mem = settled_meminfo() - before;
            check_decisions(&maps, HIT_V6.into(), MISS_V6.into(), true)?;
            let hit = ns_per_verdict(&prog, &frames[2], args.repeat, args.runs, TC_ACT_SHOT)?;
            let miss = ns_per_verdict(&prog, &frames[3], args.repeat, args.runs, TC_ACT_UNSPEC)?;
            let row = Row {
                family: "IPv6",
                n: v6.len(),
                load,
                memlock: memlock(&pins.layout.map(V6_TABLE_MAP))?,
                mem,
                hit: Some(hit),
                miss,
                model_nodes: trie_nodes(&v6),
                mix: mix(&v6, [128, 64, 48]),
            };
            println!("{}", row.markdown());
            eprintln!("  {}", row.raw());
            rows.push(row);
        }
        drop(prog);
        drop(maps);
        drop(pins); // unpins: the kernel frees the trie before the next size is measured
    }

    let body = document(
        &args,
        &rows,
        &event_rows,
        &format!("{load_at_start} at start, {} at the end", loadavg()),
        (frames[0].len(), frames[2].len()),
    );
    write_section(&args.out, "datapath", &body)?;
    println!("\nwrote the datapath section of {}", args.out.display());
    Ok(())
}

/// The rule set must decide the two destinations as intended, read back through the
/// installer's own lookup (the same longest-prefix match the program does).
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

fn document(
    args: &Args,
    rows: &[Row],
    event_rows: &[String],
    loadavg: &str,
    frame_bytes: (usize, usize),
) -> String {
    let table = rows
        .iter()
        .map(Row::markdown)
        .collect::<Vec<_>>()
        .join("\n");
    let mixes = rows
        .iter()
        .filter(|r| r.n > 0)
        .map(|r| format!("{} {}: {}", r.family, r.n, r.mix))
        .collect::<Vec<_>>()
        .join("; ");
    let events = if event_rows.is_empty() {
        "Not measured in this run (it runs at 1,000,000 IPv4 rules; `--max-rules` was lower)."
            .to_owned()
    } else {
        format!(
            "| case | ns/verdict median (min–max) |\n|---|---:|\n{}",
            event_rows.join("\n")
        )
    };
    format!(
        "## Datapath: ns per verdict (BPF_PROG_TEST_RUN)

`cargo run --release -p egress-deny-tests --bin bench-datapath -- --max-rules {max} --repeat {repeat} --runs {runs}`

Machine: {machine}; measured {date} (1-minute load average {loadavg}: other work
shared this 2-core machine during the run, which mostly affects the load times).

**Rules.** IPv4: the published egress-filtering benchmark's mix — random global-unicast
prefixes (never in 0/8, 10/8, 100.64/10, 127/8, 169.254/16, 172.16/12, 192.0/16,
192.168/16, 198.51/16, 203.0/16, 224/3), ≈89% /32, 10% /24, 1% /16, deduplicated, seed
{SEED_V4} (`egress_deny_tests::bench::rule_mix`, the same generator as the other
benchmarks). The rule count is exact and includes the hit destination's /32. Actual mix:
{mixes}. At 10M rules the /16 share cannot reach 1%: there are only ≈56k global-unicast
/16s outside the exclusions, most of which end up in the set (nearly every address is
then denied by some /16; the miss destination sits in the excluded 192.0/16). IPv6 (at the largest size
only, loaded next to the IPv4 set): random 2000::/3 prefixes, ≈89% /128, 10% /64, 1% /48,
seed {SEED_V6}, never in 2001:db8::/32. Rules are inserted one `BPF_MAP_UPDATE_ELEM` at a
time in sorted order by the installer's own map code (`RuleMaps::insert_v4/insert_v6`,
single thread); load time is that loop's wall time.

**ns/verdict** is the kernel's own average over `repeat` = {repeat} runs of the real
Ethernet program (`egress_deny`, pinned by the installer's `load_and_pin`) on one
small UDP frame ({v4_bytes} bytes IPv4, {v6_bytes} bytes IPv6), median (min–max) of {runs} such runs.
Every run's return value is asserted (hit: `TC_ACT_SHOT`, miss: `TC_ACT_UNSPEC`), and
both destinations are checked with the installer's lookup first. Hit = {HIT_V4} /
{HIT_V6} (a /32 or /128 rule, i.e. the deepest walk); miss = {MISS_V4} / {MISS_V6}.
Deny events are at the installer's default budget ({INSTALLER_EVENTS_PER_SECOND}/s per
attachment and CPU), so the hit path includes the budget check (suppressed: the flood
case). BPF_PROG_TEST_RUN pauses its clock when it reschedules, so other load on the
machine mostly shows as cache pollution, not as stolen time; hypervisor steal time (this
is a VM) is not excluded. The same packet every iteration means the trie path is hot in
the CPU caches: these are best-case lookup costs; a real mix of destinations on a 10M
trie misses the CPU caches on most of the nodes it visits.

**Memory.** *memlock* is what the kernel reports for the map (`/proc/self/fdinfo`
`memlock`, i.e. `map_mem_usage`): for an LPM trie that is n × (node header 24 B + key
data + value 4 B) — 32 B/rule for IPv4, 44 B for IPv6 — counting neither the trie's
intermediate nodes nor allocator rounding. *Slab Δ* / *Percpu Δ* are the change in the
kernel's `Slab` / `Percpu` in `/proc/meminfo` across the load (each read once the value
stopped moving): what the nodes really cost, intermediate nodes and allocator rounding
included. They are machine-wide counters, so other activity on the machine is in them
too; below 100k rules that noise is larger than the signal and they are not reported.
*64 B objects Δ* is the change in active `kmalloc-64`/`kmalloc-cg-64` objects in
`/proc/slabinfo`: every trie node of either family (24 B header + key data + 4 B value +
`bpf_mem_alloc`'s 8 B list head = 40 or 52 B) is one such object, so this is the number of
trie nodes per rule (entries + intermediate nodes), and 64 × it is the node memory without
slab page overhead. *model* is the node count computed from the rule set itself (entries +
branch points that are not entries: what the kernel's trie must hold). Other engineers'
work on this shared machine (compiles, tests and benchmarks creating and freeing their
own BPF maps) also moves these machine-wide counters; when the measured 64 B object
change differs from the model by more than 5%, the row's slab figures are marked
*disturbed* and are not this rule set's cost: use 64 B × model nodes instead.

{HEADER}
{table}

### Cost of deny events and counters (1M IPv4 rules)

Same method and rule set. Deny events are emitted on the deny path only; the allow path
reads no config and takes no timestamp. The reference rows are the published
benchmark's plain LPM filter (IPv4 only, no VLAN parsing, no counters, no events) on the
same rules: the difference to it on a miss is what parsing and the per-attachment
counters cost.

{events}
",
        max = args.max_rules,
        repeat = args.repeat,
        runs = args.runs,
        machine = machine(),
        date = date_utc(),
        v4_bytes = frame_bytes.0,
        v6_bytes = frame_bytes.1,
    )
}

/// Deny path with events off, on within budget, on over budget; allow path vs the
/// reference program.
fn event_costs(
    pins: &PinDir,
    prog: &SchedClassifier,
    rules: &[(u32, u8)],
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

    let mut ebpf = aya::EbpfLoader::new().load(egress_deny_datapath::REFERENCE_LPM_OBJECT)?;
    {
        let mut trie: aya::maps::lpm_trie::LpmTrie<_, [u8; 4], u32> =
            aya::maps::lpm_trie::LpmTrie::try_from(ebpf.map_mut("ref_v4").context("ref_v4")?)?;
        for (addr, len) in rules {
            trie.insert(
                &aya::maps::lpm_trie::Key::new(u32::from(*len), addr.to_be_bytes()),
                1,
                0,
            )?;
        }
    }
    let reference: &mut SchedClassifier = ebpf
        .program_mut("reference_lpm")
        .context("reference")?
        .try_into()?;
    reference.load()?;
    rows.push(format!(
        "| allow (miss), reference LPM filter | {} |",
        ns_per_verdict(reference, miss, repeat, runs, 0)?.cell()
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
