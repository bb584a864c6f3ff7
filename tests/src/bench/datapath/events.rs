//! The cost of deny events and counters: the deny path with events off, within and over
//! their budget, and the allow path against the reference program.
use anyhow::Result;
use aya::programs::SchedClassifier;
use egress_deny_datapath::events;

use super::{
    Settings,
    test_run::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC, ns_per_verdict},
};
use crate::PinDir;

/// The installer's default deny-event budget (`--deny-events-per-second`), so the deny
/// path measured is the one a node runs.
pub const INSTALLER_EVENTS_PER_SECOND: u32 = 5;

/// Deny path with events off, on within budget, on over budget; allow path vs the
/// reference program (its trie already holds the same rules).
pub fn event_costs(
    pins: &PinDir,
    prog: &SchedClassifier,
    reference: &SchedClassifier,
    frames: &[Vec<u8>; 4],
    settings: &Settings,
) -> Result<Vec<String>> {
    let (hit, miss) = (&frames[0], &frames[1]);
    let (repeat, runs) = (settings.repeat, settings.runs);
    let mut rows = Vec::new();
    events::set_events_per_second(&pins.layout, 0)?;
    rows.push(format!(
        "| deny, events off | {} |",
        ns_per_verdict(prog, hit, repeat, runs, TC_ACT_SHOT)?.cell()
    ));
    events::set_events_per_second(&pins.layout, INSTALLER_EVENTS_PER_SECOND)?;
    rows.push(format!(
        "| deny, events on, over the budget (suppressed: the flood case; installer default) | {} |",
        ns_per_verdict(prog, hit, repeat, runs, TC_ACT_SHOT)?.cell()
    ));
    events::set_events_per_second(&pins.layout, u32::MAX)?;
    // Nobody consumes the ring here: after it fills, outputs fail fast; measure a
    // short burst that stays within the ring (256 KiB / 48 B ≈ 5400 events), once.
    rows.push(format!(
        "| deny, events on, every packet reported (ring not full; 2000 runs, 1 sample) | {} |",
        ns_per_verdict(prog, hit, 2000, 1, TC_ACT_SHOT)?.cell()
    ));
    events::set_events_per_second(&pins.layout, INSTALLER_EVENTS_PER_SECOND)?;
    rows.push(format!(
        "| allow (miss), egress-deny | {} |",
        ns_per_verdict(prog, miss, repeat, runs, TC_ACT_UNSPEC)?.cell()
    ));
    rows.push(format!(
        "| allow (miss), reference LPM filter | {} |",
        ns_per_verdict(reference, miss, repeat, runs, TC_ACT_OK)?.cell()
    ));
    rows.push(format!(
        "| deny (hit), reference LPM filter | {} |",
        ns_per_verdict(reference, hit, repeat, runs, TC_ACT_SHOT)?.cell()
    ));
    for row in &rows {
        println!("{row}");
    }
    Ok(rows)
}
