//! Applying a parsed rule set to the pinned maps as a diff against what is enforced.
use std::net::IpAddr;

use egress_deny_datapath::{paths::PinLayout, rules::RuleMaps};
use ipnet::IpNet;

use crate::rules::{Entry, Plan, RuleSet, plan};

pub struct Syncer {
    layout: PinLayout,
    maps: RuleMaps,
    /// What the maps hold, kept in memory so that each update is a diff.
    enforced: RuleSet,
}

impl Syncer {
    /// Opens the pinned maps and reads what they enforce (after a restart: the previous
    /// daemon's rules, which stay in force until the first sync replaces them).
    pub fn open(layout: &PinLayout) -> egress_deny_datapath::Result<Self> {
        let maps = RuleMaps::open(layout)?;
        let enforced = read_enforced(&maps)?;
        Ok(Self {
            layout: layout.clone(),
            maps,
            enforced,
        })
    }

    pub fn enforced(&self) -> &RuleSet {
        &self.enforced
    }

    /// Applies `new` in the gap-free order of `rules::Plan`. Returns the number of map
    /// operations. On a map error the in-memory view is re-read from the maps.
    pub fn apply(&mut self, new: RuleSet) -> egress_deny_datapath::Result<usize> {
        let plan4 = plan(&self.enforced.v4, &new.v4);
        let plan6 = plan(&self.enforced.v6, &new.v6);
        let ops = plan4.operations() + plan6.operations();
        let result = self.run(&plan4, &plan6);
        match result {
            Ok(()) => {
                self.enforced = new;
                Ok(ops)
            }
            Err(e) => {
                if let Ok(actual) = read_enforced(&self.maps) {
                    self.enforced = actual;
                }
                Err(e)
            }
        }
    }

    fn run(&mut self, p4: &Plan<u32>, p6: &Plan<u128>) -> egress_deny_datapath::Result<()> {
        // Phase by phase, both families, so the ordering argument of `Plan` holds. Within
        // a phase the order does not matter: big phases are split over two threads (the
        // trie serialises the insert itself, but the syscall work around it overlaps).
        let layout = self.layout.clone();
        let maps = &mut self.maps;
        apply_phase(maps, &layout, &p4.upsert_deny, |m, e| {
            m.insert_v4(e.addr.to_be_bytes(), e.len, e.action)
        })?;
        apply_phase(maps, &layout, &p6.upsert_deny, |m, e| {
            m.insert_v6(e.addr.to_be_bytes(), e.len, e.action)
        })?;
        apply_phase(maps, &layout, &p4.remove_allow, |m, e| {
            m.remove_v4(e.addr.to_be_bytes(), e.len)
        })?;
        apply_phase(maps, &layout, &p6.remove_allow, |m, e| {
            m.remove_v6(e.addr.to_be_bytes(), e.len)
        })?;
        apply_phase(maps, &layout, &p4.upsert_allow, |m, e| {
            m.insert_v4(e.addr.to_be_bytes(), e.len, e.action)
        })?;
        apply_phase(maps, &layout, &p6.upsert_allow, |m, e| {
            m.insert_v6(e.addr.to_be_bytes(), e.len, e.action)
        })?;
        apply_phase(maps, &layout, &p4.remove_deny, |m, e| {
            m.remove_v4(e.addr.to_be_bytes(), e.len)
        })?;
        apply_phase(maps, &layout, &p6.remove_deny, |m, e| {
            m.remove_v6(e.addr.to_be_bytes(), e.len)
        })?;
        Ok(())
    }
}

/// Below this, a second thread costs more than it saves.
const PARALLEL_THRESHOLD: usize = 20_000;

fn apply_phase<A: Sync>(
    maps: &mut RuleMaps,
    layout: &PinLayout,
    entries: &[Entry<A>],
    op: impl Fn(&mut RuleMaps, &Entry<A>) -> egress_deny_datapath::Result<()> + Sync,
) -> egress_deny_datapath::Result<()> {
    if entries.len() < PARALLEL_THRESHOLD {
        return entries.iter().try_for_each(|e| op(maps, e));
    }
    let (first, second) = entries.split_at(entries.len() / 2);
    let mut other = RuleMaps::open(layout)?;
    std::thread::scope(|scope| {
        let helper = scope.spawn(|| second.iter().try_for_each(|e| op(&mut other, e)));
        let mine = first.iter().try_for_each(|e| op(maps, e));
        let theirs = helper.join().unwrap_or_else(|_| {
            Err(egress_deny_datapath::Error::Invalid(
                "map worker panicked".into(),
            ))
        });
        mine.and(theirs)
    })
}

fn read_enforced(maps: &RuleMaps) -> egress_deny_datapath::Result<RuleSet> {
    let mut set = RuleSet::default();
    maps.for_each_v4(|octets, len, action| {
        set.v4.push(Entry {
            addr: u32::from_be_bytes(octets),
            len,
            action,
        })
    })?;
    maps.for_each_v6(|octets, len, action| {
        set.v6.push(Entry {
            addr: u128::from_be_bytes(octets),
            len,
            action,
        })
    })?;
    set.v4.sort_unstable();
    set.v6.sort_unstable();
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
