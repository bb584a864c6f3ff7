//! Making a parsed rule set the one in force: each family whose rules changed is compiled
//! into a new table and swapped in whole (`datapath::rules`), so there is no
//! intermediate state for a packet to slip through, and a rejected set leaves the old
//! tables in force untouched.
use std::net::IpAddr;

use egress_deny_datapath::{
    paths::PinLayout,
    rules::{RuleTables, Swap},
    table::{self, Entry, Layout, TableKey},
};
use ipnet::IpNet;

use crate::{rules::RuleSet, status::EnforcedRecord};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Map(#[from] egress_deny_datapath::Error),
    /// The set does not fit (rule count or memory): rejected before anything changed.
    #[error("{0}")]
    TooLarge(String),
}

/// One family's swap, for logs, status and metrics.
#[derive(Clone, Copy, Debug)]
pub struct FamilySwap {
    pub family: u8,
    pub swap: Swap,
}

pub struct Syncer {
    tables: RuleTables,
    /// `--max-table-bytes` (0: none).
    max_table_bytes: u64,
    /// Digest of each family's rules in force (IPv4, IPv6), once known.
    in_force: Option<[u64; 2]>,
    /// What the previous daemon recorded as enforced, if it describes these tables.
    recorded: Option<EnforcedRecord>,
}

impl Syncer {
    /// Opens the pinned tables. `recorded` is what the previous daemon recorded as
    /// enforced (its status file), trusted only if it names the tables in force.
    pub fn open(
        layout: &PinLayout,
        recorded: Option<EnforcedRecord>,
        max_table_bytes: u64,
    ) -> egress_deny_datapath::Result<Self> {
        let tables = RuleTables::open(layout)?;
        let ids = tables.table_ids()?;
        let recorded = recorded.filter(|r| r.map_ids == [ids.0, ids.1] && ids != (0, 0));
        Ok(Self {
            tables,
            max_table_bytes,
            in_force: None,
            recorded,
        })
    }

    /// What the previous daemon recorded about these tables, until the first sync.
    pub fn recorded(&self) -> Option<&EnforcedRecord> {
        self.recorded.as_ref()
    }

    /// Whether the tables in force hold any rule (from before this daemon, too).
    pub fn maps_hold_rules(&self) -> bool {
        self.tables.hold_rules()
    }

    /// The record describing `set` in the tables now in force.
    pub fn record_of(&self, set: &RuleSet) -> egress_deny_datapath::Result<EnforcedRecord> {
        let ids = self.tables.table_ids()?;
        Ok(EnforcedRecord::new(set, [ids.0, ids.1]))
    }

    /// Makes `new` the set in force: a family whose rules are unchanged keeps its table
    /// (a restart with unchanged rules swaps nothing). Checks first that the new tables
    /// fit (`check`), so that a set too large is rejected whole.
    pub fn apply(&mut self, new: &RuleSet) -> Result<Vec<FamilySwap>, SyncError> {
        let digests = [family_digest(&new.v4), family_digest(&new.v6)];
        let in_force = match (self.in_force, self.recorded.take()) {
            (Some(d), _) => Some(d),
            // The previous daemon's tables hold exactly these rules.
            (None, Some(r)) if r.matches(new) => Some(digests),
            _ => None,
        };
        let changed = [0, 1].map(|i| in_force.is_none_or(|d| d[i] != digests[i]));
        check(new, changed, self.max_table_bytes)?;
        let mut swaps = Vec::new();
        if changed[0] {
            swaps.push(FamilySwap {
                family: 4,
                swap: self.tables.replace_v4(&new.v4)?,
            });
        }
        // The IPv4 table is in force now: record that much before the IPv6 one.
        self.in_force = Some([digests[0], in_force.map_or(0, |d| d[1])]);
        if changed[1] {
            swaps.push(FamilySwap {
                family: 6,
                swap: self.tables.replace_v6(&new.v6)?,
            });
        }
        self.in_force = Some(digests);
        Ok(swaps)
    }
}

/// FNV-1a over one family's entries: tells an unchanged family apart cheaply.
fn family_digest<A: TableKey>(entries: &[Entry<A>]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |x: u64| {
        h ^= x;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    mix(entries.len() as u64);
    for e in entries {
        let wide = e.addr.widen();
        mix(wide as u64);
        mix((wide >> 64) as u64);
        mix((u64::from(e.len) << 8) | e.action as u64);
    }
    h
}

/// Destinations that must stay reachable: the API server, the default gateways and the
/// `--protect` CIDRs.
pub fn protected(extra: &[IpNet]) -> Vec<(IpNet, String)> {
    let mut out: Vec<(IpNet, String)> = Vec::new();
    if let Ok(host) = std::env::var("KUBERNETES_SERVICE_HOST") {
        match host.trim().parse::<IpAddr>() {
            Ok(ip) => out.push((IpNet::from(ip), "the Kubernetes API server".into())),
            Err(_) => {
                log::warn!("KUBERNETES_SERVICE_HOST {host:?} is not an IP address; not protected")
            }
        }
    }
    for (iface, gateway) in crate::node::default_routes() {
        if let Some(gw) = gateway {
            out.push((IpNet::from(gw), format!("the default gateway via {iface}")));
        }
    }
    for net in extra {
        out.push((net.trunc(), "--protect".into()));
    }
    out
}

/// Adds an allow-exception for each protected destination, warning about the deny
/// rules that would have cut it off.
pub fn add_protections(rules: &mut RuleSet, protected: &[(IpNet, String)]) -> Vec<String> {
    let mut warnings = Vec::new();
    for (net, why) in protected {
        let covering = rules.denies_covering(*net);
        if !covering.is_empty() {
            let list: Vec<String> = covering.iter().map(ToString::to_string).collect();
            warnings.push(format!(
                "deny rule(s) {} cover {net} ({why}); keeping it reachable",
                list.join(", ")
            ));
        }
        rules.allow(*net);
    }
    warnings
}

/// Refuses, before anything changes, a set the tables cannot hold: more rules per
/// family than the program's search is bounded for, tables over `max_table_bytes`
/// (`--max-table-bytes`, 0 = none), or new tables that do not fit the memory the
/// daemon's cgroup has left (table memory is charged there, and the old table stays
/// until the new one is in force, so both exist at the swap).
pub fn check(new: &RuleSet, changed: [bool; 2], max_table_bytes: u64) -> Result<(), SyncError> {
    let capacity = egress_deny_datapath::common::MAX_RULES_PER_FAMILY as usize;
    for (family, len) in [("IPv4", new.v4.len()), ("IPv6", new.v6.len())] {
        if len > capacity {
            return Err(SyncError::TooLarge(format!(
                "{len} {family} rules exceed the table's capacity of {capacity}"
            )));
        }
    }
    let bytes = |summary: Result<table::TableSummary, table::TableError>| {
        summary
            .map(|s| s.bytes)
            .map_err(|e| SyncError::TooLarge(e.to_string()))
    };
    let mut needed = 0;
    if changed[0] {
        needed += bytes(table::Plan::new(&new.v4, Layout::default()).map(|p| p.summary()))?;
    }
    if changed[1] {
        needed += bytes(table::Plan::new(&new.v6, Layout::default()).map(|p| p.summary()))?;
    }
    if max_table_bytes > 0 && needed > max_table_bytes {
        return Err(SyncError::TooLarge(format!(
            "the new rule tables need {} KiB of kernel memory, over --max-table-bytes ({} KiB)",
            needed >> 10,
            max_table_bytes >> 10
        )));
    }
    match cgroup_memory() {
        Some((limit, used)) => fits_cgroup(needed, limit, used),
        None => Ok(()),
    }
}

/// Whether `needed` more bytes fit a cgroup at `used` of `limit`, keeping a tenth of the
/// limit for the daemon itself (parsing the next update).
fn fits_cgroup(needed: u64, limit: u64, used: u64) -> Result<(), SyncError> {
    let room = (limit - limit / 10).saturating_sub(used);
    if needed > room {
        return Err(SyncError::TooLarge(format!(
            "the new rule tables need {} MiB of kernel memory, but the daemon's cgroup has {} MiB left of its {} MiB limit (raise the DaemonSet's memory limit)",
            needed >> 20,
            room >> 20,
            limit >> 20
        )));
    }
    Ok(())
}

/// (limit, usage) in bytes of this process's memory cgroup, if it has a limit: cgroup v2
/// (`memory.max`; "max" is no limit) or v1 (`memory.limit_in_bytes`; no limit is a
/// huge number, which leaves room for anything).
fn cgroup_memory() -> Option<(u64, u64)> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read = |dir: &std::path::Path, name: &str| -> Option<u64> {
        std::fs::read_to_string(dir.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    for cgroup in memory_cgroups(&own) {
        match cgroup {
            MemoryCgroup::V1(dir) => {
                return Some((
                    read(&dir, "memory.limit_in_bytes")?,
                    read(&dir, "memory.usage_in_bytes")?,
                ));
            }
            MemoryCgroup::V2(dir) => {
                if let (Some(max), Some(current)) =
                    (read(&dir, "memory.max"), read(&dir, "memory.current"))
                {
                    return Some((max, current));
                }
            }
        }
    }
    None
}

/// A cgroup directory that may hold this process's memory limit.
#[derive(Debug, PartialEq, Eq)]
enum MemoryCgroup {
    /// A v1 hierarchy with the memory controller.
    V1(std::path::PathBuf),
    /// The v2 (unified) hierarchy: it has the memory controller where memory.max exists.
    V2(std::path::PathBuf),
}

/// The candidates `/proc/self/cgroup` (`id:controllers:path` lines) names, in its order,
/// up to the first malformed line.
fn memory_cgroups(own: &str) -> Vec<MemoryCgroup> {
    let root = std::path::Path::new("/sys/fs/cgroup");
    let mut out = Vec::new();
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            break;
        };
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            out.push(MemoryCgroup::V1(root.join("memory").join(path)));
        } else if controllers.is_empty() {
            out.push(MemoryCgroup::V2(root.join(path)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use egress_deny_datapath::rules::Action;

    fn entries(addrs: std::ops::Range<u32>) -> Vec<Entry<u32>> {
        addrs
            .map(|addr| Entry {
                addr,
                len: 32,
                action: Action::Deny,
            })
            .collect()
    }

    #[test]
    fn more_rules_than_the_table_holds_are_rejected_whole() {
        let capacity = egress_deny_datapath::common::MAX_RULES_PER_FAMILY;
        let set = RuleSet {
            v4: entries(0..capacity + 1),
            v6: Vec::new(),
        };
        let err = check(&set, [true, false], 0).unwrap_err().to_string();
        assert!(err.contains("capacity"), "{err}");
    }

    #[test]
    fn tables_over_the_budget_or_the_cgroup_are_rejected() {
        let set = RuleSet {
            v4: entries(0..1000)
                .into_iter()
                .map(|mut e| {
                    e.addr *= 2; // apart: two ranges each
                    e
                })
                .collect(),
            v6: Vec::new(),
        };
        let err = check(&set, [true, true], 4096).unwrap_err().to_string();
        assert!(err.contains("--max-table-bytes"), "{err}");
        // An unchanged family needs nothing new.
        assert!(
            check(&set, [false, false], 4096)
                .err()
                .is_none_or(|e| e.to_string().contains("cgroup"))
        );
        let err = fits_cgroup(100 << 20, 512 << 20, 400 << 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("raise the DaemonSet's memory limit"), "{err}");
        assert!(fits_cgroup(10 << 20, 512 << 20, 400 << 20).is_ok());
    }

    fn v1(path: &str) -> MemoryCgroup {
        MemoryCgroup::V1(std::path::Path::new("/sys/fs/cgroup/memory").join(path))
    }

    fn v2(path: &str) -> MemoryCgroup {
        MemoryCgroup::V2(std::path::Path::new("/sys/fs/cgroup").join(path))
    }

    #[test]
    fn the_memory_cgroup_is_found_in_v1_v2_and_hybrid_layouts() {
        let pod = "kubepods/burstable/pod5f0c/0a1b2c";
        let v1_only = format!(
            "12:pids:/{pod}\n11:cpu,memory:/{pod}\n10:cpu,cpuacct:/{pod}\n1:name=systemd:/{pod}\n"
        );
        assert_eq!(memory_cgroups(&v1_only), vec![v1(pod)]);
        // A private cgroup namespace shows its root; the host's shows the whole path.
        assert_eq!(memory_cgroups("0::/\n"), vec![v2("")]);
        let scope = "kubepods.slice/kubepods-pod5f0c.slice/cri-containerd-0a1b.scope";
        assert_eq!(memory_cgroups(&format!("0::/{scope}\n")), vec![v2(scope)]);
        let hybrid = format!("4:memory:/{pod}\n1:name=systemd:/{pod}\n0::/{pod}\n");
        assert_eq!(memory_cgroups(&hybrid), vec![v1(pod), v2(pod)]);
    }

    #[test]
    fn odd_cgroup_lines_end_or_skip_cleanly() {
        assert_eq!(memory_cgroups(""), vec![]);
        // The controller must match whole, not as a prefix.
        assert_eq!(memory_cgroups("3:memoryx:/a\n"), vec![]);
        // The path is everything after the second colon.
        assert_eq!(memory_cgroups("0::/a:b\n"), vec![v2("a:b")]);
        // Nothing after a malformed line counts: the file is not what we think it is.
        for text in [
            "0::/a\ngarbage\n0::/b\n",
            "0::/a\n1:memory\n0::/b\n",
            "0::/a\n\n0::/b",
        ] {
            assert_eq!(memory_cgroups(text), vec![v2("a")], "{text:?}");
        }
    }

    #[test]
    fn family_digests_tell_changes_apart() {
        let a = entries(0..10);
        let mut b = a.clone();
        b[3].action = Action::Allow;
        assert_ne!(family_digest(&a), family_digest(&b));
        assert_eq!(family_digest(&a), family_digest(&a.clone()));
        assert_ne!(family_digest(&a), family_digest(&entries(0..11)));
    }
}
