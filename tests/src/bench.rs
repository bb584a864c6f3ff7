//! Shared benchmark helpers: the published benchmark's rule mix, machine description,
//! and writing a section of tests/BENCHMARKS.md between markers; the benchmarks' own
//! parts in [`suite`] (bench-suite) and [`datapath`] (bench-datapath).
pub mod datapath;
pub mod suite;

use std::{net::Ipv4Addr, path::Path};

use anyhow::Result;
use egress_deny_datapath::{
    paths::PinLayout,
    rules::{Action, RuleTables, Swap},
    table::Entry,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// Makes `rules` (sorted and deduplicated, as [`rule_mix`] returns them) the IPv4 deny
/// table in force, swapped in whole as the installer does.
pub fn deny_v4(layout: &PinLayout, rules: &[(u32, u8)]) -> Result<Swap> {
    Ok(RuleTables::open(layout)?.replace_v4(&deny_entries(rules))?)
}

/// Table entries that deny each (address, prefix length).
pub fn deny_entries<A: Copy>(rules: &[(A, u8)]) -> Vec<Entry<A>> {
    rules
        .iter()
        .map(|&(addr, len)| Entry {
            addr,
            len,
            action: Action::Deny,
        })
        .collect()
}

/// Random global-unicast IPv4 prefixes, ≈89% /32, 10% /24, 1% /16 (the mix of the
/// published egress-filtering benchmark), deduplicated, with a fixed seed. Never inside
/// 192.0.2.0/24, 198.51.100.0/24 or 203.0.113.0/24 (the test destinations).
pub fn rule_mix(count: usize, seed: u64) -> Vec<(u32, u8)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let addr: u32 = rng.random();
        if !global_unicast(addr) {
            continue;
        }
        let len = match rng.random_range(0..100) {
            0 => 16,
            1..=10 => 24,
            _ => 32,
        };
        out.push((addr & (u32::MAX << (32 - len)), len));
        if out.len() == count {
            out.sort_unstable();
            out.dedup();
        }
    }
    out
}

/// Not in 0/8, 10/8, 100.64/10, 127/8, 169.254/16, 172.16/12, 192.0/16 (192.0.2.0/24
/// inside), 192.168/16, 198.51/16, 203.0/16, 224/3: the space [`rule_mix`] draws from.
pub fn global_unicast(addr: u32) -> bool {
    let first = addr >> 24;
    !(matches!(first, 0 | 10 | 127 | 224..=255)
        || (addr >> 22) == (100 << 2 | 1)
        || (addr >> 16) == (169 << 8 | 254)
        || (addr >> 20) == (172 << 4 | 1)
        || (addr >> 16) == (192 << 8 | 168)
        || (addr >> 16) == (192 << 8)
        || (addr >> 16) == (198 << 8 | 51)
        || (addr >> 16) == (203 << 8))
}

pub fn rules_text(rules: &[(u32, u8)]) -> String {
    let mut s = String::with_capacity(rules.len() * 18);
    for (addr, len) in rules {
        s.push_str(&format!("{}/{len}\n", Ipv4Addr::from(*addr)));
    }
    s
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem = meminfo_kib("MemTotal").unwrap_or(0) / 1024 / 1024;
    format!("{cpu}, {cores} cores, {mem} GiB, kernel {}", kernel.trim())
}

pub fn meminfo_kib(key: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k == key).then(|| v.split_whitespace().next()?.parse().ok())?
        })
}

/// `bytes_memlock` the kernel reports for a pinned map (its own accounting).
pub fn map_memlock(path: &Path) -> Option<u64> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(path)
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get("bytes_memlock")
        .and_then(|b| b.as_u64().or_else(|| b.as_str()?.parse().ok()))
}

/// Replaces the section between `<!-- begin NAME -->` and `<!-- end NAME -->` in the
/// benchmark document (appending it when absent).
pub fn write_section(doc: &Path, name: &str, body: &str) -> Result<()> {
    let begin = format!("<!-- begin {name} -->");
    let end = format!("<!-- end {name} -->");
    let mut text = std::fs::read_to_string(doc).unwrap_or_else(|_| {
        "# egress-deny benchmarks\n\nNumbers measured on the machines named in each section; re-run the commands to update.\n".into()
    });
    let section = format!("{begin}\n{body}\n{end}");
    match (text.find(&begin), text.find(&end)) {
        (Some(b), Some(e)) if e > b => text.replace_range(b..e + end.len(), &section),
        _ => {
            text.push('\n');
            text.push_str(&section);
            text.push('\n');
        }
    }
    std::fs::write(doc, text)?;
    Ok(())
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}
