//! Making a parsed rule set the one in force: each family whose rules changed is compiled
//! into a new table and swapped in whole (`datapath::rules`), so there is no
//! intermediate state for a packet to slip through, and a rejected set leaves the old
//! tables in force untouched.
use egress_deny_datapath::{
    paths::PinLayout,
    rules::{RuleTables, Swap},
    table::TableKey,
};

use super::{Entry, RuleSet, SyncError, budget::check};
use crate::status::EnforcedRecord;

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

#[cfg(test)]
mod tests {
    use egress_deny_datapath::rules::Action;

    use super::*;
    use crate::rules::tests::host_denies;

    #[test]
    fn family_digests_tell_changes_apart() {
        let a = host_denies(0..10);
        let mut b = a.clone();
        b[3].action = Action::Allow;
        assert_ne!(family_digest(&a), family_digest(&b));
        assert_eq!(family_digest(&a), family_digest(&a.clone()));
        assert_ne!(family_digest(&a), family_digest(&host_denies(0..11)));
    }
}
