//! The rules directory: finding the rule files (kubelet's ConfigMap layout), parsing
//! them (streaming, in blocks, on several threads) into compact sorted sets, and
//! noticing cheaply when nothing changed.
//!
//! Format (one entry per line): `CIDR`, a bare address or an address range `A-B` (the
//! exact minimal set of prefixes covering it) denies, `!` before any of them makes it an
//! allow-exception, `#` or `;` (Spamhaus DROP) starts a comment, blank lines and
//! surrounding whitespace are ignored. Files whose name ends in `.gz` are gzip-compressed. Hidden entries (`.x`,
//! kubelet's `..data`) are skipped; symlinks (kubelet's ConfigMap layout) are followed.
//! Host bits set, an unparsable line, or one prefix listed as both deny and allow reject
//! the whole update, naming file and line.
//!
//! The files of this module, one job each:
//! - here: the model ([`RuleSet`], [`Counts`], the [`Address`] trait both families share);
//! - `files`: finding the rule files (kubelet's ConfigMap layout, one `..data` snapshot),
//!   their [`Fingerprint`], opening them (gzip);
//! - `parse`: the line format (comments, `!`, CIDR, address, range `A-B`, the fast IPv4 path);
//! - `pipeline`: reading files in blocks and parsing them on several threads into a set;
//! - `error`: [`RulesError`] and the [`Limits`] of one update;
//! - `protect`: the destinations no rule may cut off, as allow-exceptions;
//! - `budget`: whether the compiled tables fit (search bound, `--max-table-bytes`, cgroup);
//! - `apply`: making a set the one in force, swapping only the families that changed.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use egress_deny_datapath::{rules::Action, table::TableKey};
use ipnet::IpNet;

mod apply;
mod budget;
mod error;
mod files;
mod parse;
mod pipeline;
mod protect;

pub use apply::{FamilySwap, Syncer};
pub use error::{
    DEFAULT_MAX_BYTES, DEFAULT_MAX_LINE, DEFAULT_MAX_RULES, Limits, RulesError, SyncError,
};
pub use files::{Fingerprint, rule_files, shown, still_current};
pub(crate) use files::{UTF8_BOM, open};
pub(crate) use parse::{fast_line, parse_rule, split_rule};
#[cfg(test)]
pub use pipeline::parse_dir;
pub use pipeline::parse_files;
pub use protect::{add_protections, protected};

/// One rule: a truncated prefix and its action (`A` = u32 for IPv4, u128 for IPv6,
/// host order, so that sorting is by address then length; 8 bytes for IPv4). The same
/// type the table compiler reads.
pub use egress_deny_datapath::table::Entry;

/// What the two address families need from their address type, on top of the table
/// compiler's [`TableKey`] (width, host masks): one generic code path for both.
pub trait Address: TableKey {
    /// Sorts by (address, length, action) — the derived order, faster.
    fn sort(entries: &mut [Entry<Self>]);
    fn to_net(self, len: u8) -> IpNet;
    /// The first address of the `/len` prefix holding `self` (host bits cleared).
    fn mask(self, len: u8) -> Self {
        self & !Self::host_mask(len)
    }
}

impl Address for u32 {
    fn sort(entries: &mut [Entry<u32>]) {
        // One integer comparison instead of three field comparisons.
        entries.sort_unstable_by_key(|e| {
            (u64::from(e.addr) << 16) | (u64::from(e.len) << 8) | e.action as u64
        });
    }
    fn to_net(self, len: u8) -> IpNet {
        IpNet::new(IpAddr::V4(Ipv4Addr::from(self)), len).expect("valid prefix length")
    }
}

impl Address for u128 {
    fn sort(entries: &mut [Entry<u128>]) {
        entries.sort_unstable();
    }
    fn to_net(self, len: u8) -> IpNet {
        IpNet::new(IpAddr::V6(Ipv6Addr::from(self)), len).expect("valid prefix length")
    }
}

/// A prefix (truncated) as an entry of its family: the one place an [`IpNet`] splits
/// into the per-family types the generic code works on.
pub(crate) enum FamilyEntry {
    V4(Entry<u32>),
    V6(Entry<u128>),
}

impl FamilyEntry {
    pub(crate) fn new(net: IpNet, action: Action) -> Self {
        match net.trunc() {
            IpNet::V4(n) => FamilyEntry::V4(Entry {
                addr: n.network().into(),
                len: n.prefix_len(),
                action,
            }),
            IpNet::V6(n) => FamilyEntry::V6(Entry {
                addr: n.network().into(),
                len: n.prefix_len(),
                action,
            }),
        }
    }
}

/// A complete rule set, sorted by (address, length) and free of duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleSet {
    pub v4: Vec<Entry<u32>>,
    pub v6: Vec<Entry<u128>>,
}

/// What was read: the set, plus whether the directory existed at all.
#[derive(Debug)]
pub struct Parsed {
    pub rules: RuleSet,
    pub files: usize,
    pub lines: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub v4_deny: usize,
    pub v4_allow: usize,
    pub v6_deny: usize,
    pub v6_allow: usize,
}

impl RuleSet {
    pub fn counts(&self) -> Counts {
        let deny4 = denies(&self.v4);
        let deny6 = denies(&self.v6);
        Counts {
            v4_deny: deny4,
            v4_allow: self.v4.len() - deny4,
            v6_deny: deny6,
            v6_allow: self.v6.len() - deny6,
        }
    }

    /// Adds an allow-exception (replacing a deny of exactly that prefix).
    pub fn allow(&mut self, net: IpNet) {
        match FamilyEntry::new(net, Action::Allow) {
            FamilyEntry::V4(e) => upsert(&mut self.v4, e),
            FamilyEntry::V6(e) => upsert(&mut self.v6, e),
        }
    }

    /// The deny entries that contain `net` (shortest first).
    pub fn denies_covering(&self, net: IpNet) -> Vec<IpNet> {
        match FamilyEntry::new(net, Action::Deny) {
            FamilyEntry::V4(e) => covering(&self.v4, e.addr, e.len),
            FamilyEntry::V6(e) => covering(&self.v6, e.addr, e.len),
        }
    }

    /// An order-sensitive 64-bit digest of the set: equal sets, equal digests. Lets a
    /// restarted daemon trust what its predecessor recorded instead of walking millions
    /// of map entries (see `apply::Syncer::open`).
    pub fn digest(&self) -> u64 {
        // FNV-1a over the fields; cheap (a few ms per million entries) and plenty to
        // tell two rule sets apart by accident.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut mix = |x: u64| {
            h ^= x;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        };
        mix(self.v4.len() as u64);
        for e in &self.v4 {
            mix((u64::from(e.addr) << 16) | (u64::from(e.len) << 8) | e.action as u64);
        }
        mix(self.v6.len() as u64);
        for e in &self.v6 {
            mix(e.addr as u64);
            mix((e.addr >> 64) as u64);
            mix((u64::from(e.len) << 8) | e.action as u64);
        }
        h
    }
}

fn denies<A: Address>(entries: &[Entry<A>]) -> usize {
    entries.iter().filter(|e| e.action == Action::Deny).count()
}

fn covering<A: Address>(entries: &[Entry<A>], addr: A, prefix_len: u8) -> Vec<IpNet> {
    (0..=prefix_len)
        .filter_map(|len| {
            let key = (addr.mask(len), len);
            let i = entries.binary_search_by(|e| e.key().cmp(&key)).ok()?;
            (entries[i].action == Action::Deny).then(|| key.0.to_net(len))
        })
        .collect()
}

fn upsert<A: Copy + Ord>(entries: &mut Vec<Entry<A>>, entry: Entry<A>) {
    match entries.binary_search_by(|e| e.key().cmp(&entry.key())) {
        Ok(i) => entries[i] = entry,
        Err(i) => entries.insert(i, entry),
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "IPv4 {} deny / {} allow, IPv6 {} deny / {} allow",
            self.v4_deny, self.v4_allow, self.v6_deny, self.v6_allow
        )
    }
}

/// Sorts, drops duplicates, and returns a prefix listed with both actions, if any.
/// Frees the slack: sets live as long as they are enforced.
fn sort_dedup<A: Address>(entries: &mut Vec<Entry<A>>) -> Option<(A, u8)> {
    A::sort(entries);
    // One pass: drop duplicates, spot a prefix with both actions (adjacent after the
    // sort, as the action is the last sort key).
    let mut conflict = None;
    let mut kept = 0;
    for i in 0..entries.len() {
        let e = entries[i];
        if kept > 0 {
            let last = entries[kept - 1];
            if last.key() == e.key() {
                if last.action != e.action && conflict.is_none() {
                    conflict = Some(e.key());
                }
                continue;
            }
        }
        entries[kept] = e;
        kept += 1;
    }
    entries.truncate(kept);
    entries.shrink_to_fit();
    conflict
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{fs, io::Write};

    use super::*;

    /// A temporary directory holding `files` (name, contents).
    pub(super) fn dir_with(files: &[(&str, &[u8])]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in files {
            fs::write(dir.path().join(name), content).unwrap();
        }
        dir
    }

    /// IPv4 /32 deny rules on `addrs`, sorted.
    pub(crate) fn host_denies(addrs: std::ops::Range<u32>) -> Vec<Entry<u32>> {
        addrs
            .map(|addr| Entry {
                addr,
                len: 32,
                action: Action::Deny,
            })
            .collect()
    }

    pub(super) fn gz(text: &str) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(text.as_bytes()).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn digest_tells_sets_apart() {
        let dir = dir_with(&[("a", b"1.1.1.1\n!2.2.2.0/24\n")]);
        let a = parse_dir(dir.path()).unwrap().rules;
        let dir = dir_with(&[("a", b"1.1.1.1\n2.2.2.0/24\n")]);
        let b = parse_dir(dir.path()).unwrap().rules;
        assert_ne!(a.digest(), b.digest());
        assert_eq!(a.digest(), a.clone().digest());
    }
}
