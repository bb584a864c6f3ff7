//! The node thread: keeps our conflist entry (at once on a conf dir event, again after
//! a short quiet time, and every tick), verifies the attachments (on link/tc
//! notifications and every tick), re-asserts the host interfaces and repairs pods the
//! runtime attached while the plugin was missing.
use std::{
    path::Path,
    sync::{
        atomic::Ordering,
        mpsc::{self, RecvTimeoutError},
    },
    time::{Duration, Instant},
};

use egress_deny_datapath::paths::{DEFAULT_PIN_DIR, DEFAULT_STATE_DIR};

use super::{
    Event, Shared, TICK,
    host::{HostLinks, attach_host_interfaces, set_host_interfaces},
};
use crate::{
    commands::run::RunArgs,
    conflist::{self, ConflistError, Ensured},
    repair, verify,
};

/// A second look after a conf dir event, for a primary's multi-step write seen half-way
/// by the immediate one (issue 10, item 14).
const CONF_DEBOUNCE: Duration = Duration::from_millis(50);
/// Quiet time after a link/tc notification before re-verifying: changes come in bursts
/// (a pod's veth pair, a qdisc and its filters).
const DATAPATH_DEBOUNCE: Duration = Duration::from_millis(20);

/// Conflist, host interfaces and pod repair: on conf dir events and every tick.
pub(super) fn node_loop(args: &RunArgs, shared: &Shared, events: mpsc::Receiver<Event>) {
    let (layout, state) = (&shared.layout, &shared.state);
    let mut conflist_error: Option<String> = None;
    ensure_conflist(args, shared, &mut conflist_error);
    repair::repair_from_cache(layout, state, &args.cni_cache_dir, &args.cni.cni_conf_dir);
    let mut host_links = attach_host_interfaces(args, layout, state, &HostLinks::default());
    set_host_interfaces(shared, &host_links);
    let mut conf_due: Option<Instant> = None;
    let mut verify_due: Option<Instant> = None;
    let mut next_tick = Instant::now() + TICK;
    loop {
        let next = [conf_due, verify_due]
            .into_iter()
            .flatten()
            .fold(next_tick, Instant::min);
        match events.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Ok(Event::Datapath) => {
                verify_due.get_or_insert(Instant::now() + DATAPATH_DEBOUNCE);
            }
            Ok(_) => {
                // At once: a rewritten primary without our entry is what the runtime
                // picks until we are back in it, so a debounce would be a window. Events
                // queued before this read are covered by it.
                while events.try_recv().is_ok() {}
                ensure_conflist(args, shared, &mut conflist_error);
                // Not pushed back by later events: a primary that rewrites continuously
                // must not starve the second look.
                conf_due.get_or_insert(Instant::now() + CONF_DEBOUNCE);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        if conf_due.is_some_and(|due| now >= due) {
            conf_due = None;
            ensure_conflist(args, shared, &mut conflist_error);
        }
        if verify_due.is_some_and(|due| now >= due) {
            verify_due = None;
            verify_unless_staged(shared, verify::Trigger::Notification);
        }
        if now >= next_tick {
            next_tick = now + TICK;
            ensure_conflist(args, shared, &mut conflist_error);
            // Verified (and repairs counted) before the host attachments are
            // re-asserted, which would otherwise restore a lost filter silently.
            verify_unless_staged(shared, verify::Trigger::Tick);
            host_links = attach_host_interfaces(args, layout, state, &host_links);
            repair::clean_up_vanished(layout, state);
            repair::repair_from_cache(layout, state, &args.cni_cache_dir, &args.cni.cni_conf_dir);
            set_host_interfaces(shared, &host_links);
        }
    }
}

/// Checks (and repairs) every attachment; not while a staged program waits, whose
/// attachments deliberately stay on the previous program.
fn verify_unless_staged(shared: &Shared, trigger: verify::Trigger) {
    if !shared.staged.load(Ordering::Relaxed) {
        verify::attachments(&shared.layout, &shared.state, &shared.repairs, trigger);
    }
}

/// Our entry in the primary CNI's conflist, written when missing; the path in status.
fn ensure_conflist(args: &RunArgs, shared: &Shared, last_error: &mut Option<String>) {
    let default_pin = Path::new(DEFAULT_PIN_DIR);
    let default_state = Path::new(DEFAULT_STATE_DIR);
    let entry = conflist::Entry {
        pin_dir: (args.state.pin_dir != default_pin)
            .then(|| args.state.pin_dir.display().to_string()),
        state_dir: (args.state.state_dir != default_state)
            .then(|| args.state.state_dir.display().to_string()),
        exclude_namespaces: args.exclude_namespaces.0.clone(),
    };
    let outcome = conflist::ensure(&args.cni.cni_conf_dir, &entry);
    // Each problem is logged when it starts, not on every tick.
    let mut report = |message: Option<String>, error: bool| {
        if message != *last_error {
            if let Some(m) = &message {
                if error {
                    log::error!("{m}");
                } else {
                    log::info!("{m}");
                }
            }
            *last_error = message;
        }
    };
    let conflist = match outcome {
        Ok(Ensured::Written(path)) => {
            log::info!("added the egress-deny entry to {}", path.display());
            report(None, false);
            Some(path.display().to_string())
        }
        Ok(Ensured::AlreadyPresent(path)) => {
            report(None, false);
            Some(path.display().to_string())
        }
        Err(ConflistError::NoPrimary(dir)) => {
            report(
                Some(format!(
                    "waiting for the primary CNI to write its configuration into {}",
                    dir.display()
                )),
                false,
            );
            None
        }
        Err(e) => {
            report(Some(e.to_string()), true);
            None
        }
    };
    let mut status = shared.status.lock().expect("status");
    if status.conflist != conflist {
        status.conflist = conflist;
        status.save(&shared.state);
    }
}
