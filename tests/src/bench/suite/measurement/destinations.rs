//! The many-destination test's destinations: thousands of addresses, a known share of
//! them inside the rule list, that the server namespace owns and the node routes to it,
//! so the filters' lookups walk different parts of their tries and hash tables and
//! nothing leaves the run's namespaces.
use std::{collections::BTreeSet, fmt::Write as _, net::Ipv4Addr, sync::Arc, time::Duration};

use anyhow::{Result, bail};

use crate::bench::{
    global_unicast,
    suite::{
        processes::exec_in,
        topology::{SERVER, Topology},
    },
};

/// The traffic destinations of the many-destination mode: (address, denied by the
/// rules). All of them are owned by the server namespace (`local` routes) and routed
/// to it by the node namespace, so nothing leaves the run's namespaces.
pub struct Destinations {
    pub list: Arc<Vec<(Ipv4Addr, bool)>>,
}

/// Whether a sorted rule list covers `addr` (one binary search per prefix length in use:
/// 10M rules × thousands of addresses must not be a linear scan).
pub fn covers(rules: &[(u32, u8)], lens: &[u8], addr: u32) -> bool {
    lens.iter().any(|&len| {
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        rules.binary_search(&(addr & mask, len)).is_ok()
    })
}

pub fn prefix_lens(rules: &[(u32, u8)]) -> Vec<u8> {
    let set: BTreeSet<u8> = rules.iter().map(|(_, l)| *l).collect();
    set.into_iter().collect()
}

impl Destinations {
    /// `count` distinct addresses, `deny_share` of them inside a random rule each (a
    /// random host of the prefix), the rest random global-unicast addresses no rule
    /// covers; shuffled, so denied and allowed packets interleave. `avoid`: addresses the
    /// run uses otherwise.
    pub fn new(
        rules: &[(u32, u8)],
        count: usize,
        deny_share: f64,
        seed: u64,
        avoid: &[Ipv4Addr],
    ) -> Result<Self> {
        use rand::{Rng, SeedableRng, seq::SliceRandom};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_de57);
        let lens = prefix_lens(rules);
        let mut seen: BTreeSet<u32> = avoid.iter().map(|a| u32::from(*a)).collect();
        let mut list = Vec::with_capacity(count);
        let denied = ((count as f64 * deny_share).round() as usize).min(count);
        // Bounded: a small rule list (N = 10, mostly /32s) may hold fewer distinct
        // addresses than asked for; it then gets what it has (the rest are allowed).
        let mut attempts = 0usize;
        while list.len() < denied && !rules.is_empty() {
            attempts += 1;
            if attempts > denied * 100 {
                break;
            }
            let (net, len) = rules[rng.random_range(0..rules.len())];
            let host = if len == 32 {
                0
            } else {
                rng.random::<u32>() >> len
            };
            let a = net | host;
            if seen.insert(a) {
                list.push((Ipv4Addr::from(a), true));
            }
        }
        attempts = 0;
        while list.len() < count {
            attempts += 1;
            if attempts > count * 1000 {
                bail!("cannot find {count} allowed destinations outside the rule list");
            }
            let a: u32 = rng.random();
            if global_unicast(a) && !covers(rules, &lens, a) && seen.insert(a) {
                list.push((Ipv4Addr::from(a), false));
            }
        }
        list.shuffle(&mut rng);
        Ok(Self {
            list: Arc::new(list),
        })
    }

    /// Server namespace: a `local` route per address (it accepts them as its own); node
    /// namespace: a route to the server for each.
    pub fn install(&self, topo: &Topology) -> Result<()> {
        self.batch(topo, "add")
    }

    pub fn uninstall(&self, topo: &Topology) -> Result<()> {
        self.batch(topo, "del")
    }

    fn batch(&self, topo: &Topology, verb: &str) -> Result<()> {
        let mut server = String::new();
        let mut node = String::new();
        for (a, _) in self.list.iter() {
            let _ = writeln!(server, "route {verb} local {a}/32 dev lo");
            let _ = writeln!(node, "route {verb} {a}/32 via {SERVER}");
        }
        for (ns, batch) in [(&topo.server, server), (&topo.node, node)] {
            let batch = Some(Arc::new(batch));
            exec_in(
                &ns.name,
                "ip",
                &["-batch", "-"],
                batch,
                Duration::from_secs(60),
            )?
            .success()?;
        }
        Ok(())
    }
}
