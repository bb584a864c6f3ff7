//! Datapath benchmark: ns per verdict (BPF_PROG_TEST_RUN), kernel memory per rule and
//! load time, IPv4, at 0 … 10M rules of the published benchmark's mix.
//!
//!     cargo run --release -p egress-deny-tests --bin bench-datapath -- [max_rules] [repeat]
use std::{path::Path, time::Instant};

use anyhow::{Context, Result, ensure};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use egress_deny_datapath::{
    paths::{ProgramKind, V4_RULES_MAP},
    rules::{Action, RuleMaps},
};
use egress_deny_tests::{
    PinDir,
    bench::{machine, map_memlock, meminfo_kib, rule_mix, write_section},
    packet, require_root,
};

const TC_ACT_SHOT: u32 = 2;
const TC_ACT_UNSPEC: u32 = u32::MAX;
const HIT: [u8; 4] = [8, 8, 8, 8];
const MISS: [u8; 4] = [192, 0, 2, 1];

fn ns_per_verdict(prog: &SchedClassifier, dst: [u8; 4], repeat: u32, expect: u32) -> Result<f64> {
    let pkt = packet::ethernet(
        &[],
        packet::ETH_P_IP,
        &packet::ipv4([10, 0, 0, 1].into(), dst.into(), &Default::default()),
    );
    let mut runs = Vec::new();
    for _ in 0..3 {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&pkt);
        opts.repeat = repeat;
        let r = prog.test_run(opts)?;
        ensure!(
            r.return_value == expect,
            "verdict {} != {expect}",
            r.return_value
        );
        runs.push(r.duration.as_nanos() as f64);
    }
    runs.sort_by(f64::total_cmp);
    Ok(runs[1])
}

fn main() -> Result<()> {
    require_root();
    let mut args = std::env::args().skip(1);
    let max: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000_000);
    let repeat: u32 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let sizes = [0usize, 1_000, 100_000, 1_000_000, 10_000_000];
    let mut rows = Vec::new();
    let mut event_rows = Vec::new();
    println!(
        "| rules | load time | rules/s | memlock B/rule | slab B/rule | ns/verdict hit | ns/verdict miss |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for &n in sizes.iter().filter(|&&n| n <= max) {
        let rules = rule_mix(n, 42);
        let pins = PinDir::new()?;
        let mut maps = RuleMaps::open(&pins.layout)?;
        let slab_before = meminfo_kib("Slab").unwrap_or(0);
        let started = Instant::now();
        for (addr, len) in &rules {
            maps.insert_v4(addr.to_be_bytes(), *len, Action::Deny)?;
        }
        maps.insert_v4(HIT, 32, Action::Deny)?;
        let load = started.elapsed();
        let slab_after = meminfo_kib("Slab").unwrap_or(0);
        let entries = (rules.len() + 1) as f64;
        let memlock = map_memlock(&pins.layout.map(V4_RULES_MAP)).map(|b| b as f64 / entries);
        let slab = (slab_after.saturating_sub(slab_before) * 1024) as f64 / entries;
        let prog = SchedClassifier::from_pin(pins.layout.program(ProgramKind::Ethernet))?;
        let hit = ns_per_verdict(&prog, HIT, repeat, TC_ACT_SHOT)?;
        let miss = ns_per_verdict(&prog, MISS, repeat, TC_ACT_UNSPEC)?;
        let row = format!(
            "| {n} | {:.2} s | {:.0} | {} | {} | {hit:.1} | {miss:.1} |",
            load.as_secs_f64(),
            entries / load.as_secs_f64().max(1e-9),
            memlock
                .map(|m| format!("{m:.0}"))
                .unwrap_or_else(|| "n/a".into()),
            if n >= 100_000 {
                format!("{slab:.0}")
            } else {
                "(noise)".into()
            },
        );
        println!("{row}");
        rows.push(row);
        if n == 1_000_000 {
            event_rows = event_costs(&pins, &prog, &rules, repeat)?;
        }
        drop(prog);
        drop(maps);
        drop(pins); // frees the trie before the next size
    }
    let body = format!(
        "## Datapath: ns per verdict (BPF_PROG_TEST_RUN)\n\n\
         `cargo run --release -p egress-deny-tests --bin bench-datapath` — {}; measured {}.\n\n\
         IPv4 rules of the published benchmark's mix (random global-unicast, ≈89% /32, 10% /24,\n\
         1% /16, seed 42), inserted one by one through the installer's map code. ns/verdict is\n\
         the kernel's average over {repeat} runs of the real program on one small UDP frame\n\
         (median of 3), for a destination that hits a deny rule and one that misses. memlock\n\
         is the kernel's own accounting for the map (`bpftool map show`); slab is the growth of\n\
         the kernel's slab memory while loading (what the nodes really cost, allocator overhead\n\
         included; too noisy below 100k rules).\n\n\
         | rules | load time | rules/s | memlock B/rule | slab B/rule | ns/verdict hit | ns/verdict miss |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n{}\n",
        machine(),
        chrono_like_date(),
        rows.join("\n")
    ) + &format!(
        "\n### Cost of deny events and counters (1M rules)\n\n\
         Same method. Deny events are emitted on the deny path only; the allow path reads no\n\
         config and takes no timestamp. The reference row is the published benchmark's plain\n\
         LPM filter (IPv4 only, no VLAN parsing, no counters) on the same rule set: the\n\
         difference to it on a miss is what parsing and the per-attachment counters cost.\n\n\
         | case | ns/verdict |\n|---|---:|\n{}\n",
        event_rows.join("\n")
    );
    write_section(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md")),
        "datapath",
        &body,
    )?;
    Ok(())
}

/// Deny path with events off, on within budget, on over budget; allow path vs the
/// reference program.
fn event_costs(
    pins: &PinDir,
    prog: &SchedClassifier,
    rules: &[(u32, u8)],
    repeat: u32,
) -> Result<Vec<String>> {
    use egress_deny_datapath::events;
    let mut rows = Vec::new();
    events::set_events_per_second(&pins.layout, 0)?;
    rows.push(format!(
        "| deny, events off | {:.1} |",
        ns_per_verdict(prog, HIT, repeat, TC_ACT_SHOT)?
    ));
    events::set_events_per_second(&pins.layout, 5)?;
    rows.push(format!(
        "| deny, events on, over the budget (suppressed: the flood case) | {:.1} |",
        ns_per_verdict(prog, HIT, repeat, TC_ACT_SHOT)?
    ));
    events::set_events_per_second(&pins.layout, u32::MAX)?;
    // Nobody consumes the ring here: after it fills, outputs fail fast; measure a
    // short burst that stays within the ring (256 KiB / 48 B ≈ 5400 events).
    rows.push(format!(
        "| deny, events on, every packet reported (ring not full) | {:.1} |",
        ns_per_verdict(prog, HIT, 2000, TC_ACT_SHOT)?
    ));
    events::set_events_per_second(&pins.layout, 0)?;
    rows.push(format!(
        "| allow (miss), egress-deny | {:.1} |",
        ns_per_verdict(prog, MISS, repeat, TC_ACT_UNSPEC)?
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
        trie.insert(&aya::maps::lpm_trie::Key::new(32, HIT), 1, 0)?;
    }
    let reference: &mut SchedClassifier = ebpf
        .program_mut("reference_lpm")
        .context("reference")?
        .try_into()?;
    reference.load()?;
    rows.push(format!(
        "| allow (miss), reference LPM filter | {:.1} |",
        ns_per_verdict(reference, MISS, repeat, 0)?
    ));
    rows.push(format!(
        "| deny (hit), reference LPM filter | {:.1} |",
        ns_per_verdict(reference, HIT, repeat, TC_ACT_SHOT)?
    ));
    for row in &rows {
        println!("{row}");
    }
    Ok(rows)
}

fn chrono_like_date() -> String {
    std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
