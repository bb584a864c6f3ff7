//! The structures compared: the installer's compiled table in two layouts and the
//! reference object's LPM trie. Loading them, their kernel memory, and checking that a
//! loaded rule set decides the hit and miss destinations as intended.
use std::{
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        MapData,
        lpm_trie::{Key, LpmTrie},
    },
    programs::SchedClassifier,
};
use egress_deny_datapath::{
    paths::{V4_TABLE_MAP, V6_TABLE_MAP},
    rules::{Action, RuleTables, Swap},
    table::Layout,
};

use crate::{PinDir, bench::meminfo_kib};

/// The table layouts compared side by side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Candidate {
    /// `Layout::default()`: direct level sized to about 4 ranges per bucket.
    Adaptive,
    /// A fixed 16-bit direct level (DXR / FreeBSD `dxr` style).
    Direct16,
}

impl Candidate {
    pub const ALL: [Candidate; 2] = [Candidate::Adaptive, Candidate::Direct16];

    pub fn layout(self) -> Layout {
        match self {
            Candidate::Adaptive => Layout::default(),
            Candidate::Direct16 => Layout {
                direct_bits: Some(16),
            },
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Candidate::Adaptive => "table, adaptive",
            Candidate::Direct16 => "table, direct16",
        }
    }
}

pub const TRIE: &str = "LPM trie (reference)";
pub const TABLE_V6: &str = "table, adaptive";

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
pub fn table_memlock(swap: &Swap) -> Result<u64> {
    let map = MapData::from_id(swap.table_id)
        .with_context(|| format!("opening table map {}", swap.table_id))?;
    memlock_of(&map)
}

/// Waits until the kernel's `Slab` stops moving (a dropped LPM trie is freed node by
/// node in a kernel worker after the last reference goes: ≈5 s at 10M), so that work
/// does not run under the next size's measurements.
pub fn settle() {
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

/// The reference object bound to this pin dir's table maps: `bench_random` reads the
/// tables the installer code swapped in, `ref_v4` is its own LPM trie.
pub fn load_reference(pins: &PinDir) -> Result<Ebpf> {
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

pub fn program<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a SchedClassifier> {
    Ok(ebpf
        .program(name)
        .with_context(|| format!("{name} missing"))?
        .try_into()?)
}

/// Fills the reference object's LPM trie, one update per rule; returns the loop's time.
pub fn fill_trie(ebpf: &mut Ebpf, rules: &[(u32, u8)]) -> Result<Duration> {
    let mut trie: LpmTrie<_, [u8; 4], u32> =
        LpmTrie::try_from(ebpf.map_mut("ref_v4").context("ref_v4")?)?;
    let started = Instant::now();
    for &(addr, len) in rules {
        trie.insert(&Key::new(u32::from(len), addr.to_be_bytes()), 1, 0)?;
    }
    Ok(started.elapsed())
}

/// The rule set must decide the two destinations as intended, read back through the
/// installer's own lookup (the same search the program does).
pub fn check_decisions(maps: &RuleTables, hit: IpAddr, miss: IpAddr, has_hit: bool) -> Result<()> {
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
