//! `run`: the per-node daemon. Loads and pins the datapath, installs the plugin and its
//! conflist entry, filters the host's uplinks, and keeps the maps in sync with the rules
//! directory. On SIGTERM it exits and leaves enforcement in place.
//!
//! This file starts it and runs the rules side's small loop over [`Event`]s; each other
//! job has its own file. Threads: the main one syncs rules (`rules_sync`, seconds for
//! millions of rules); `node` keeps the conflist entry, host interfaces and pod repairs
//! (`node_loop`, `host`); `inotify` and `netlink` feed both (`watch`); `http` serves
//! the endpoints (`crate::http`, `crate::metrics`); `deny-events` logs drops (`deny_events`);
//! `signals` stops everything (`signals`).
mod deny_events;
mod host;
mod lock;
mod node_loop;
mod rules_sync;
pub mod shared;
mod signals;
mod upgrade;
mod watch;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, RecvTimeoutError},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use egress_deny_datapath::{
    events,
    loader::{self, MapOutcome},
    paths::{PinLayout, StateLayout},
};

pub use self::{host::detach_host, shared::Shared};
use crate::{commands::run::RunArgs, http, metrics, node, status::DaemonStatus};

/// Quiet time after the last change before a rules sync: kubelet's update (new data
/// dir, `..data` swap, new and removed key symlinks) is a burst of a few operations
/// within a millisecond; a spurious sync in the middle only costs a metadata check.
const RULES_DEBOUNCE: Duration = Duration::from_millis(10);
/// Safety net for missed notifications, host-interface changes and late conflists.
const TICK: Duration = Duration::from_secs(2);

/// What wakes the rules loop and the node loop (each has its own channel).
enum Event {
    Changed,
    /// A link or tc object (qdisc, filter) changed: re-verify the attachments.
    Datapath,
    Stop,
}

pub fn run(args: &RunArgs) -> Result<()> {
    let layout = PinLayout::new(&args.state.pin_dir);
    let state = StateLayout::new(&args.state.state_dir);
    std::fs::create_dir_all(state.attachments_dir())
        .with_context(|| format!("creating {}", state.attachments_dir().display()))?;
    // Set by SIGTERM: long parses, walks and table builds stop between two steps (a
    // table is swapped in whole or not at all).
    let cancel = Arc::new(AtomicBool::new(false));
    let (rules_tx, rules_rx) = mpsc::channel();
    signals::stop_on_signals(rules_tx.clone(), Arc::clone(&cancel))?;

    // Served from the start: a daemon waiting for the node lock answers /healthz (alive)
    // and /readyz (not ready, and why). Binds (and retries binding) on its own thread: a
    // taken port must not keep the rules from being synced.
    let shared = Arc::new(Shared::new(
        layout.clone(),
        state.clone(),
        args.cni.cni_conf_dir.clone(),
    ));
    let registry = metrics::registry(Arc::clone(&shared));
    if let Err(e) = http::serve(args.listen, Arc::clone(&shared), registry) {
        log::error!("starting the HTTP listener on {}: {e:#}", args.listen);
    }
    // One daemon per node: held until this process exits (the kernel drops it then,
    // kill -9 included).
    let Some(_lock) = lock::node_lock(&state, &shared, &cancel)? else {
        log::info!("stopping while waiting for the node lock");
        return Ok(());
    };
    let staged = load_datapath(args, &layout, &state)?;
    node::install_plugin(args.plugin_binary.as_deref(), &args.cni.cni_bin_dir)?;

    let previous = DaemonStatus::load(&state).unwrap_or_default();
    let mut rules = rules_sync::RulesSync::open(args, &layout, previous.enforced.clone(), cancel)?;
    *shared.status.lock().expect("status") = previous;
    shared.staged.store(staged, Ordering::Relaxed);
    *shared.not_started.lock().expect("lock state") = None;
    let (conf_tx, conf_rx) = mpsc::channel();
    watch::watch_datapath(conf_tx.clone());
    watch::watch(&args.rules_dir, &args.cni.cni_conf_dir, rules_tx, conf_tx)?;
    deny_events::log_deny_events(layout.clone(), state.clone());
    // The node side (conflist, host interfaces, repair) on its own thread: a sync of
    // millions of rules takes seconds, the conflist must be repaired within one.
    {
        let (args, shared) = (args.clone(), Arc::clone(&shared));
        thread::Builder::new()
            .name("node".into())
            .spawn(move || node_loop::node_loop(&args, &shared, conf_rx))?;
    }

    rules.sync(args, &shared);
    let mut rules_due: Option<Instant> = None;
    let mut next_tick = Instant::now() + TICK;
    loop {
        let next = rules_due.map_or(next_tick, |due| due.min(next_tick));
        match rules_rx.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Ok(Event::Changed) => rules_due = Some(Instant::now() + RULES_DEBOUNCE),
            Ok(Event::Datapath) => {} // the node thread's business
            Ok(Event::Stop) => {
                log::info!("stopping; enforcement stays in place (use `uninstall` to remove it)");
                return Ok(());
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => bail!("event sources stopped"),
        }
        let now = Instant::now();
        if rules_due.is_some_and(|due| now >= due) {
            rules_due = None;
            rules.sync(args, &shared);
        }
        if now >= next_tick {
            // Safety net for missed notifications and for changed protections (default
            // gateways): only metadata is compared unless something changed.
            next_tick = now + TICK;
            rules.sync(args, &shared);
        }
    }
}

/// Loads and pins the programs and maps (reusing compatible pinned maps, so that the
/// rules stay enforced across restarts and upgrades) and writes the datapath settings.
/// Moves every attachment to the new program, unless its rule maps were replaced and it
/// stays staged until they are filled: returns whether it is staged.
fn load_datapath(args: &RunArgs, layout: &PinLayout, state: &StateLayout) -> Result<bool> {
    let report = loader::load_and_pin(layout).context("loading and pinning the eBPF datapath")?;
    for (name, outcome) in &report.maps {
        match outcome {
            MapOutcome::Reused => {
                log::info!("map {name}: reusing the pinned map (rules stay enforced)")
            }
            MapOutcome::Created => log::info!("map {name}: created"),
            MapOutcome::Replaced { was } => {
                log::warn!("map {name}: replaced an incompatible pinned map ({was})")
            }
        }
    }
    log::info!(
        "programs pinned in {}: {:?}",
        layout.root().display(),
        report.programs
    );
    events::set_events_per_second(layout, args.deny_events_per_second)?;
    egress_deny_datapath::settings::write(
        layout,
        &egress_deny_datapath::settings::DatapathSettings {
            judged_mark: args.judged_mark,
            nat64_prefixes: args.nat64_prefixes.0.clone(),
            trust_pod_verdicts: args.trust_pod_verdicts,
        },
    )
    .context("writing the datapath settings")?;
    if report.staged {
        log::warn!(
            "the rule maps were replaced: the new program stays staged, and every attachment keeps the previous program and its rules, until the new maps hold a valid rule set"
        );
    } else {
        upgrade::move_attachments_to_current_program(layout, state);
    }
    Ok(report.staged)
}
