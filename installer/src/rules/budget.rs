//! Whether a rule set's tables fit before anything changes: the program's search bound
//! per family, `--max-table-bytes`, and the memory left in the daemon's cgroup.
use egress_deny_datapath::table::{self, Layout};

use super::{RuleSet, SyncError};

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
    use crate::rules::tests::host_denies;

    #[test]
    fn more_rules_than_the_table_holds_are_rejected_whole() {
        let capacity = egress_deny_datapath::common::MAX_RULES_PER_FAMILY;
        let set = RuleSet {
            v4: host_denies(0..capacity + 1),
            v6: Vec::new(),
        };
        let err = check(&set, [true, false], 0).unwrap_err().to_string();
        assert!(err.contains("capacity"), "{err}");
    }

    #[test]
    fn tables_over_the_budget_or_the_cgroup_are_rejected() {
        let set = RuleSet {
            v4: host_denies(0..1000)
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
}
