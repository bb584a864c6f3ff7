//! Applying a parsed rule set to the pinned maps as a diff against what is enforced,
//! in the gap-free phase order of `plan`.
use std::{
    net::IpAddr,
    ops::ControlFlow,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
};

use egress_deny_datapath::{paths::PinLayout, rules::RuleMaps};
use ipnet::IpNet;

use crate::{
    plan::{self, Phase},
    rules::{Address, Entry, RuleSet},
    status::EnforcedRecord,
};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Map(#[from] egress_deny_datapath::Error),
    #[error(
        "interrupted (shutting down); the maps hold a mix of the old and new rules that denies everything both deny"
    )]
    Interrupted,
}

/// How the set enforced before the first sync was learnt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Baseline {
    /// The previous daemon's record matched these maps and these rules: no walk.
    Recorded,
    /// Read back from the maps, entry by entry.
    Walked,
}

pub struct Syncer {
    layout: PinLayout,
    maps: RuleMaps,
    /// What the maps hold, kept in memory so that each update is a diff. `None` until
    /// the first sync after start: learnt then (see `apply`).
    enforced: Option<RuleSet>,
    /// What the previous daemon recorded as enforced, if anything.
    recorded: Option<EnforcedRecord>,
    map_ids: (u32, u32),
    /// Map operations between the maps and the desired set after a failed update.
    pending: Option<usize>,
}

/// Below this, one thread; above, the phase is fed to two (the trie serialises the
/// insert itself, but the syscall work around it overlaps).
const PARALLEL_THRESHOLD: usize = 20_000;
const BATCH: usize = 4096;

impl Syncer {
    /// Opens the pinned maps. `recorded` is what the previous daemon recorded as
    /// enforced (its status file), trusted only if it names these very maps.
    pub fn open(
        layout: &PinLayout,
        recorded: Option<EnforcedRecord>,
    ) -> egress_deny_datapath::Result<Self> {
        let maps = RuleMaps::open(layout)?;
        let map_ids = egress_deny_datapath::rules::rule_map_ids(layout)?;
        let recorded = recorded.filter(|r| r.map_ids == [map_ids.0, map_ids.1]);
        Ok(Self {
            layout: layout.clone(),
            maps,
            enforced: None,
            recorded,
            map_ids,
            pending: None,
        })
    }

    /// The set enforced, once known (after the first sync attempt).
    pub fn enforced(&self) -> Option<&RuleSet> {
        self.enforced.as_ref()
    }

    /// After a failed update: how many map operations the maps are from the desired set.
    pub fn pending(&self) -> Option<usize> {
        self.pending
    }

    /// What the previous daemon recorded about these maps, until the first sync.
    pub fn recorded(&self) -> Option<&EnforcedRecord> {
        self.recorded.as_ref()
    }

    /// The record describing `set` in these maps.
    pub fn record_of(&self, set: &RuleSet) -> EnforcedRecord {
        EnforcedRecord::new(set, [self.map_ids.0, self.map_ids.1])
    }

    /// Makes sure the enforced set is known: trusted from the record when it describes
    /// exactly `new` (a restart with unchanged rules: nothing to walk, nothing to do),
    /// read back from the maps otherwise.
    pub fn learn_baseline(
        &mut self,
        new: &RuleSet,
        cancel: &AtomicBool,
    ) -> Result<Option<Baseline>, SyncError> {
        if self.enforced.is_some() {
            return Ok(None);
        }
        let recorded = self.recorded.take();
        if recorded.is_some_and(|r| r.matches(new)) {
            self.enforced = Some(new.clone());
            return Ok(Some(Baseline::Recorded));
        }
        self.enforced = Some(read_enforced(&self.maps, cancel)?);
        Ok(Some(Baseline::Walked))
    }

    /// Whether the maps hold any entry (cheap: the first key of each trie at most).
    pub fn maps_hold_rules(&self) -> bool {
        if let Some(set) = &self.enforced {
            return !set.is_empty();
        }
        let mut any = false;
        let _ = self.maps.for_each_v4(|_, _, _| {
            any = true;
            ControlFlow::Break(())
        });
        let _ = self.maps.for_each_v6(|_, _, _| {
            any = true;
            ControlFlow::Break(())
        });
        any
    }

    /// Applies `new` (after `learn_baseline`). Returns the number of map operations.
    /// `before_changes` runs once before the first map operation, if there is one.
    /// On failure the in-memory view is re-read from the maps (it is a mix).
    pub fn apply(
        &mut self,
        new: RuleSet,
        cancel: &AtomicBool,
        before_changes: impl FnOnce(),
    ) -> Result<usize, SyncError> {
        let old = self.enforced.take().unwrap_or_default();
        let counts4 = plan::count(&old.v4, &new.v4);
        let counts6 = plan::count(&old.v6, &new.v6);
        let ops = counts4.iter().chain(&counts6).sum();
        if ops > 0 {
            before_changes();
        }
        // Phase by phase, both families, so the ordering argument of `plan` holds.
        let result = Phase::ORDER.into_iter().try_for_each(|phase| {
            let i = phase.index();
            self.run_phase(phase, &old.v4, &new.v4, counts4[i], cancel, V4)?;
            self.run_phase(phase, &old.v6, &new.v6, counts6[i], cancel, V6)
        });
        match result {
            Ok(()) => {
                self.enforced = Some(new);
                self.pending = None;
                Ok(ops)
            }
            Err(e) => {
                drop(old);
                if !matches!(e, SyncError::Interrupted) {
                    self.enforced = read_enforced(&self.maps, cancel).ok();
                    // What is still to do: reported until a retry (every tick) converges.
                    self.pending = self.enforced.as_ref().map(|actual| {
                        plan::count(&actual.v4, &new.v4)
                            .iter()
                            .chain(&plan::count(&actual.v6, &new.v6))
                            .sum()
                    });
                }
                Err(e)
            }
        }
    }

    fn run_phase<A: Address>(
        &mut self,
        phase: Phase,
        old: &[Entry<A>],
        new: &[Entry<A>],
        count: usize,
        cancel: &AtomicBool,
        family: Family<A>,
    ) -> Result<(), SyncError> {
        if count == 0 {
            return Ok(());
        }
        let apply = |maps: &mut RuleMaps, e: &Entry<A>| -> egress_deny_datapath::Result<()> {
            if phase.is_removal() {
                (family.remove)(maps, e)
            } else {
                (family.upsert)(maps, e)
            }
        };
        if count < PARALLEL_THRESHOLD {
            let mut result = Ok(());
            plan::walk(old, new, |p, e| {
                if p == phase && result.is_ok() {
                    result = apply(&mut self.maps, &e);
                }
            });
            return Ok(result?);
        }
        // The walk (cheap) feeds batches to two appliers (one syscall per entry).
        let (tx, rx) = mpsc::sync_channel::<Vec<Entry<A>>>(4);
        let rx = Mutex::new(rx);
        let failed = AtomicBool::new(false);
        let mut helper_maps = RuleMaps::open(&self.layout)?;
        let worker = |maps: &mut RuleMaps| -> Result<(), SyncError> {
            loop {
                let batch = match rx.lock().expect("batch queue").recv() {
                    Ok(batch) => batch,
                    Err(_) => return Ok(()),
                };
                if cancel.load(Ordering::Relaxed) {
                    failed.store(true, Ordering::Relaxed);
                    return Err(SyncError::Interrupted);
                }
                if let Err(e) = batch.iter().try_for_each(|e| apply(maps, e)) {
                    failed.store(true, Ordering::Relaxed);
                    return Err(e.into());
                }
            }
        };
        let maps = &mut self.maps;
        std::thread::scope(|scope| {
            let a = scope.spawn(|| worker(maps));
            let b = scope.spawn(|| worker(&mut helper_maps));
            let mut batch = Vec::with_capacity(BATCH);
            plan::walk(old, new, |p, e| {
                if p != phase || failed.load(Ordering::Relaxed) {
                    return;
                }
                batch.push(e);
                if batch.len() == BATCH {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                    let _ = tx.send(full);
                }
            });
            if !batch.is_empty() {
                let _ = tx.send(batch);
            }
            drop(tx);
            let ra = a.join().unwrap_or_else(|_| Err(panicked()));
            let rb = b.join().unwrap_or_else(|_| Err(panicked()));
            ra.and(rb)
        })
    }
}

fn panicked() -> SyncError {
    SyncError::Map(egress_deny_datapath::Error::Invalid(
        "map worker panicked".into(),
    ))
}

/// The map operations of one address family.
struct Family<A> {
    upsert: fn(&mut RuleMaps, &Entry<A>) -> egress_deny_datapath::Result<()>,
    remove: fn(&mut RuleMaps, &Entry<A>) -> egress_deny_datapath::Result<()>,
}

const V4: Family<u32> = Family {
    upsert: |m, e| m.insert_v4(e.addr.to_be_bytes(), e.len, e.action),
    remove: |m, e| m.remove_v4(e.addr.to_be_bytes(), e.len),
};

const V6: Family<u128> = Family {
    upsert: |m, e| m.insert_v6(e.addr.to_be_bytes(), e.len, e.action),
    remove: |m, e| m.remove_v6(e.addr.to_be_bytes(), e.len),
};

/// Reads every entry back from the maps (two syscalls per entry: slow for millions).
fn read_enforced(maps: &RuleMaps, cancel: &AtomicBool) -> Result<RuleSet, SyncError> {
    let mut set = RuleSet::default();
    let mut seen = 0usize;
    let mut go_on = || {
        seen += 1;
        if seen.is_multiple_of(4096) && cancel.load(Ordering::Relaxed) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    maps.for_each_v4(|octets, len, action| {
        set.v4.push(Entry {
            addr: u32::from_be_bytes(octets),
            len,
            action,
        });
        go_on()
    })?;
    maps.for_each_v6(|octets, len, action| {
        set.v6.push(Entry {
            addr: u128::from_be_bytes(octets),
            len,
            action,
        });
        go_on()
    })?;
    if cancel.load(Ordering::Relaxed) {
        return Err(SyncError::Interrupted);
    }
    u32::sort(&mut set.v4);
    u128::sort(&mut set.v6);
    set.v4.shrink_to_fit();
    Ok(set)
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

/// Kernel memory one LPM-trie entry costs, measured (tests/BENCHMARKS.md: 140-153 B of
/// slab per rule at 1M-10M rules), rounded up.
const KERNEL_BYTES_PER_RULE: u64 = 160;

/// Refuses, before touching the maps, a set the maps cannot hold. An update adds new
/// entries before it removes old ones (gap-free order), so the maps hold the old set plus
/// every new key at its peak: that must fit the maps' capacity per family and, when the
/// daemon runs under a cgroup memory limit (map memory is charged there), the memory
/// left. Failing part-way would leave a half-applied update; this rejects it whole with
/// the numbers.
pub fn check_capacity(new: &RuleSet, enforced: Option<&RuleSet>) -> Result<(), String> {
    let capacity = egress_deny_datapath::common::MAX_RULES_PER_FAMILY as usize;
    let empty = RuleSet::default();
    let old = enforced.unwrap_or(&empty);
    let added4 = added_keys(&old.v4, &new.v4);
    let added6 = added_keys(&old.v6, &new.v6);
    for (family, now, added, final_len) in [
        ("IPv4", old.v4.len(), added4, new.v4.len()),
        ("IPv6", old.v6.len(), added6, new.v6.len()),
    ] {
        if final_len > capacity {
            return Err(format!(
                "{final_len} {family} entries exceed the rule map's capacity of {capacity}"
            ));
        }
        if now + added > capacity {
            return Err(format!(
                "replacing {now} {family} entries by {final_len} holds {} at once (new ones are added before old ones go, so that nothing is ever allowed in between), over the rule map's capacity of {capacity}: apply it in two smaller updates",
                now + added
            ));
        }
    }
    let Some((limit, used)) = cgroup_memory() else {
        return Ok(());
    };
    let growth = (added4 + added6) as u64;
    let needed = growth * KERNEL_BYTES_PER_RULE;
    // Keep a tenth of the limit for the daemon itself (parsing the next update).
    let room = (limit - limit / 10).saturating_sub(used);
    if needed > room {
        return Err(format!(
            "{} more rules need about {} MiB of kernel memory, but the daemon's cgroup has {} MiB left of its {} MiB limit (raise the DaemonSet's memory limit)",
            growth,
            needed >> 20,
            room >> 20,
            limit >> 20
        ));
    }
    Ok(())
}

/// How many prefixes of `new` are not in `old` (both sorted by key, as parsed and as
/// read back): the entries an update adds.
fn added_keys<A: Address>(old: &[Entry<A>], new: &[Entry<A>]) -> usize {
    let (mut i, mut added) = (0, 0);
    for e in new {
        while i < old.len() && old[i].key() < e.key() {
            i += 1;
        }
        if i >= old.len() || old[i].key() != e.key() {
            added += 1;
        }
    }
    added
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
    let root = std::path::Path::new("/sys/fs/cgroup");
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            let dir = root.join("memory").join(path);
            return Some((
                read(&dir, "memory.limit_in_bytes")?,
                read(&dir, "memory.usage_in_bytes")?,
            ));
        }
        if controllers.is_empty() {
            let dir = root.join(path);
            if let (Some(max), Some(current)) =
                (read(&dir, "memory.max"), read(&dir, "memory.current"))
            {
                return Some((max, current));
            }
        }
    }
    None
}

#[cfg(test)]
mod capacity_tests {
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
    fn added_keys_counts_prefixes_new_to_the_maps() {
        assert_eq!(added_keys(&entries(0..10), &entries(5..15)), 5);
        assert_eq!(added_keys(&entries(0..10), &entries(0..10)), 0);
        assert_eq!(added_keys(&[], &entries(0..3)), 3);
        // An action change is an update in place, not a new entry.
        let mut flipped = entries(0..3);
        flipped[1].action = Action::Allow;
        assert_eq!(added_keys(&entries(0..3), &flipped), 0);
    }

    #[test]
    fn the_peak_of_a_replacement_must_fit_the_maps() {
        let capacity = egress_deny_datapath::common::MAX_RULES_PER_FAMILY;
        let old = RuleSet {
            v4: entries(0..capacity / 2 + 1),
            v6: Vec::new(),
        };
        let disjoint = RuleSet {
            v4: entries(capacity..capacity + capacity / 2 + 1),
            v6: Vec::new(),
        };
        let err = check_capacity(&disjoint, Some(&old)).unwrap_err();
        assert!(err.contains("two smaller updates"), "{err}");
        // The same size overlapping mostly: fine.
        let shifted = RuleSet {
            v4: entries(10..capacity / 2 + 11),
            v6: Vec::new(),
        };
        assert!(
            check_capacity(&shifted, Some(&old))
                .err()
                .is_none_or(|e| e.contains("cgroup")),
        );
    }
}
