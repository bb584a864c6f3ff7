//! Turning the enforced rule set into a new one without ever opening a gap.
//!
//! The maps are changed one entry at a time (one bpf syscall each), and the datapath
//! reads them concurrently: every intermediate state is live. The operations of an
//! update (`old` → `new`) are grouped into four phases, applied in this order:
//!
//! 1. `UpsertDeny`: write every entry whose new action is deny (new denies, allow→deny
//!    flips);
//! 2. `RemoveAllow`: remove the old allow-exceptions that `new` does not have;
//! 3. `UpsertAllow`: write every entry whose new action is allow (new exceptions,
//!    deny→allow flips);
//! 4. `RemoveDeny`: remove the old denies that `new` does not have.
//!
//! Within a phase the order does not matter (phases are applied by several threads).
//!
//! Why no destination that both `old` and `new` deny is ever allowed. The datapath
//! decides by the longest matching entry. Three facts about the order:
//! - (F1) from the end of phase 1 on, every deny of `new` is in the map (later phases
//!   only remove entries `new` lacks and write `new`'s allows);
//! - (F2) an entry of `old` saying deny is only ever overwritten with deny (phase 1),
//!   or changed (phase 3) or removed (phase 4) after phase 2;
//! - (F3) from the end of phase 2 on, every allow in the map is one of `new`'s.
//!
//! Take a destination `d` that `old` denies through its longest match `Lo` and `new`
//! denies through its longest match `Ln`, and any intermediate state whose longest
//! match `e` for `d` says allow.
//! - During phases 1–2: by (F2) the prefix of `Lo` is in the map saying deny, so `e` is
//!   longer than `Lo`. Phase 3 has not run, so the allow `e` comes from `old` — an
//!   allow of `old` matching `d` longer than `Lo`, which is `old`'s longest match.
//!   Contradiction.
//! - During phases 3–4: by (F1) `Ln` is in the map, so `e` is longer than `Ln`. By (F3)
//!   `e` is an allow of `new` matching `d` longer than `Ln`, `new`'s longest match.
//!   Contradiction.
//!
//! Destinations whose verdict changes may flip at any point of the update, and ones
//! `new` allows inside a new deny may be denied until phase 3 (fail closed).
//!
//! The unit test `plan_never_allows_what_both_sets_deny` checks this exhaustively on
//! random small sets, after every single operation.
use egress_deny_datapath::rules::Action;

use crate::rules::Entry;

/// The phases, in the order they must be applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    UpsertDeny,
    RemoveAllow,
    UpsertAllow,
    RemoveDeny,
}

impl Phase {
    pub const ORDER: [Phase; 4] = [
        Phase::UpsertDeny,
        Phase::RemoveAllow,
        Phase::UpsertAllow,
        Phase::RemoveDeny,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn is_removal(self) -> bool {
        matches!(self, Phase::RemoveAllow | Phase::RemoveDeny)
    }

    fn of_addition(action: Action) -> Phase {
        match action {
            Action::Deny => Phase::UpsertDeny,
            Action::Allow => Phase::UpsertAllow,
        }
    }

    fn of_removal(action: Action) -> Phase {
        match action {
            Action::Deny => Phase::RemoveDeny,
            Action::Allow => Phase::RemoveAllow,
        }
    }
}

/// Merge-walks two sorted, deduplicated sets (one entry per prefix) and calls `op` for
/// every map operation, tagged with its phase. Linear, allocation-free: callers walk
/// once to count and once per non-empty phase to apply, instead of materialising a
/// plan as large as the rule set.
pub fn walk<A: Copy + Ord>(
    old: &[Entry<A>],
    new: &[Entry<A>],
    mut op: impl FnMut(Phase, Entry<A>),
) {
    let (mut i, mut j) = (0, 0);
    while i < old.len() && j < new.len() {
        let (o, n) = (old[i], new[j]);
        match o.key().cmp(&n.key()) {
            std::cmp::Ordering::Equal => {
                if o.action != n.action {
                    op(Phase::of_addition(n.action), n);
                }
                i += 1;
                j += 1;
            }
            std::cmp::Ordering::Less => {
                op(Phase::of_removal(o.action), o);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                op(Phase::of_addition(n.action), n);
                j += 1;
            }
        }
    }
    for o in &old[i..] {
        op(Phase::of_removal(o.action), *o);
    }
    for n in &new[j..] {
        op(Phase::of_addition(n.action), *n);
    }
}

/// Operations per phase (indexed by `Phase::index`).
pub fn count<A: Copy + Ord>(old: &[Entry<A>], new: &[Entry<A>]) -> [usize; 4] {
    let mut counts = [0; 4];
    walk(old, new, |phase, _| counts[phase.index()] += 1);
    counts
}

/// The whole plan, materialised (tests; small sets).
#[cfg(test)]
pub fn plan<A: Copy + Ord>(old: &[Entry<A>], new: &[Entry<A>]) -> [Vec<Entry<A>>; 4] {
    let mut plan: [Vec<Entry<A>>; 4] = Default::default();
    walk(old, new, |phase, e| plan[phase.index()].push(e));
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::mask4;

    fn e(addr: u32, len: u8, action: Action) -> Entry<u32> {
        Entry { addr, len, action }
    }

    /// Longest-prefix decision over a set of entries (the datapath's semantics).
    fn decide(entries: &[Entry<u32>], dst: u32) -> Action {
        entries
            .iter()
            .filter(|x| mask4(dst, x.len) == x.addr)
            .max_by_key(|x| x.len)
            .map(|x| x.action)
            .unwrap_or(Action::Allow)
    }

    #[test]
    fn plan_never_allows_what_both_sets_deny() {
        // Random small sets in a tiny address space (8 bits, lengths 24..=32 on
        // 0xC0000000 + x); every intermediate state after every single operation, with
        // each phase applied in forward and in reverse order (phases are split over
        // threads, so the order within one is arbitrary).
        let base = 0xC000_0000u32;
        let mut seed = 7u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..4000 {
            let mut make = || {
                let mut set: Vec<Entry<u32>> = (0..(rand() % 7))
                    .map(|_| {
                        let len = 24 + (rand() % 9) as u8;
                        let action = if rand() % 2 == 0 {
                            Action::Deny
                        } else {
                            Action::Allow
                        };
                        e(mask4(base + (rand() % 256) as u32, len), len, action)
                    })
                    .collect();
                set.sort_unstable();
                set.dedup_by_key(|x| x.key());
                set
            };
            let (old, new) = (make(), make());
            let plan = plan(&old, &new);
            assert_eq!(count(&old, &new), plan.each_ref().map(Vec::len));
            let mut state = old.clone();
            let check = |state: &Vec<Entry<u32>>| {
                for dst in 0..256u32 {
                    let d = base + dst;
                    if decide(&old, d) == Action::Deny && decide(&new, d) == Action::Deny {
                        assert_eq!(
                            decide(state, d),
                            Action::Deny,
                            "old {old:?} new {new:?} state {state:?}"
                        );
                    }
                }
            };
            for phase in Phase::ORDER {
                let mut ops = plan[phase.index()].clone();
                if round % 2 == 1 {
                    ops.reverse();
                }
                for x in &ops {
                    state.retain(|y| y.key() != x.key());
                    if !phase.is_removal() {
                        state.push(*x);
                    }
                    check(&state);
                }
            }
            state.sort_unstable();
            assert_eq!(state, new, "plan does not reach the new set");
        }
    }
}
