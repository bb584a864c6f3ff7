//! bench-datapath's section of tests/BENCHMARKS.md: method, both tables, issue 11's
//! targets against what the run measured, and the cost of events and counters.
use super::{
    Settings,
    events::INSTALLER_EVENTS_PER_SECOND,
    measure::Measurements,
    rows::{BASE_SIZE, HEADER, RANDOM_HEADER, RandomRow, Row},
    rules::{HIT_V4, HIT_V6, MISS_V4, MISS_V6, SEED_V4, SEED_V6},
    structures::{Candidate, TRIE},
    test_run::VERDICT_SAMPLES,
};
use crate::bench::machine;

/// Issue 11's reference: the trie datapath's same-packet cost at 1M rules on this
/// machine kind (the previous version of this benchmark), ns.
const TRIE_HIT_1M_NS: f64 = 198.0;
const TRIE_MISS_1M_NS: f64 = 127.0;
const TARGET_BYTES_PER_RULE: f64 = 32.0;
const TARGET_RATIO: f64 = 2.0;

/// Issue 11's targets, per structure, from what this run measured.
pub fn targets(rows: &[Row], random_rows: &[RandomRow]) -> String {
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

/// The section's markdown; `loadavg` says how busy the machine was during the run.
pub fn document(settings: &Settings, m: &Measurements, targets: &str, loadavg: &str) -> String {
    let (rows, random_rows, event_rows) = (&m.rows, &m.random_rows, &m.event_rows);
    let mixes = m.mixes.join("; ");
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
    let v6 = match settings.v6_rules {
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
        max = settings.max_rules,
        repeat = settings.repeat,
        runs = settings.runs,
        machine = machine(),
        l3 = l3_size(),
        date = date_utc(),
        v4_bytes = m.frames[0].len(),
        v6_bytes = m.frames[2].len(),
    )
}

pub fn loadavg() -> String {
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
