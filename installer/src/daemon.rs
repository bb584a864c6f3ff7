//! `run`: the per-node daemon. Loads and pins the datapath, installs the plugin and its
//! conflist entry, filters the host's uplinks, and keeps the maps in sync with the rules
//! directory. On SIGTERM it exits and leaves enforcement in place.
//!
//! Threads: the main one syncs rules (seconds for millions of rules); `node` keeps the
//! conflist entry, host interfaces and pod repairs; `inotify` feeds both; `http` serves
//! the endpoints; `signals` stops everything.
use std::{
    collections::HashSet,
    io,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{self, RecvTimeoutError, Sender},
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use egress_deny_datapath::{
    attach::{self, AttachMode, AttachRequest, Hook},
    events::{self, EventReader},
    iface,
    loader::{self, MapOutcome},
    netlink,
    order::Verified,
    paths::{PinLayout, StateLayout, host_link_ifname, is_reorder_link_name},
    records::{AttachmentRecord, HostRecord},
};
use ipnet::IpNet;

use crate::{
    cli::RunArgs,
    conflist::{self, ConflistError, Ensured},
    metrics, node, repair,
    rules::{self, Fingerprint, RulesError},
    status::{DaemonStatus, RuleCounts, SyncStatus, TableStatus, now},
    sync::{self, FamilySwap, SyncError, Syncer},
};

pub const PLUGIN_NAME: &str = "egress-deny";
/// Quiet time after the last change before a rules sync: kubelet's update (new data
/// dir, `..data` swap, new and removed key symlinks) is a burst of a few operations
/// within a millisecond; a spurious sync in the middle only costs a metadata check.
const RULES_DEBOUNCE: Duration = Duration::from_millis(10);
/// A second look after a conf dir event, for a primary's multi-step write seen half-way
/// by the immediate one (issue 10, item 14).
const CONF_DEBOUNCE: Duration = Duration::from_millis(50);
/// Safety net for missed notifications, host-interface changes and late conflists.
const TICK: Duration = Duration::from_secs(2);

enum Event {
    Changed,
    /// A link or tc object (qdisc, filter) changed: re-verify the attachments.
    Datapath,
    Stop,
}

/// Quiet time after a link/tc notification before re-verifying: changes come in bursts
/// (a pod's veth pair, a qdisc and its filters).
const DATAPATH_DEBOUNCE: Duration = Duration::from_millis(20);

/// State the HTTP endpoints read.
pub struct Shared {
    pub layout: PinLayout,
    pub state: StateLayout,
    pub conf_dir: PathBuf,
    pub status: Mutex<DaemonStatus>,
    pub synced_once: AtomicBool,
    /// This version's program waits for its (replaced) rule maps to be filled; until
    /// then every attachment keeps the previous program and the rules it enforces.
    pub staged: AtomicBool,
    /// Attachments found behind another program or on an old one, and repaired.
    pub repairs: AtomicU64,
    /// Why this daemon is not running yet (starting up, waiting for another daemon to
    /// release the node lock), for /readyz; `None` once its datapath is loaded.
    pub not_started: Mutex<Option<String>>,
}

pub fn run(args: &RunArgs) -> Result<()> {
    let layout = PinLayout::new(&args.state.pin_dir);
    let state = StateLayout::new(&args.state.state_dir);
    std::fs::create_dir_all(state.attachments_dir())
        .with_context(|| format!("creating {}", state.attachments_dir().display()))?;
    // Set by SIGTERM: long parses, walks and map updates stop between two operations
    // (every intermediate state of an update is safe to leave behind, see `plan`).
    let cancel = Arc::new(AtomicBool::new(false));
    let (rules_tx, rules_rx) = mpsc::channel();
    stop_on_signals(rules_tx.clone(), Arc::clone(&cancel))?;

    // Served from the start: a daemon waiting for the node lock answers /healthz (alive)
    // and /readyz (not ready, and why). Binds (and retries binding) on its own thread: a
    // taken port must not keep the rules from being synced.
    let shared = Arc::new(Shared {
        layout: layout.clone(),
        state: state.clone(),
        conf_dir: args.cni.cni_conf_dir.clone(),
        status: Mutex::new(DaemonStatus::default()),
        synced_once: AtomicBool::new(false),
        staged: AtomicBool::new(false),
        repairs: AtomicU64::new(0),
        not_started: Mutex::new(Some("starting".into())),
    });
    if let Err(e) = metrics::serve(args.listen, Arc::clone(&shared)) {
        log::error!("starting the HTTP listener on {}: {e:#}", args.listen);
    }
    // One daemon per node: held until this process exits (the kernel drops it then,
    // kill -9 included).
    let Some(_lock) = node_lock(&state, &shared, &cancel)? else {
        log::info!("stopping while waiting for the node lock");
        return Ok(());
    };

    let report = loader::load_and_pin(&layout).context("loading and pinning the eBPF datapath")?;
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
    events::set_events_per_second(&layout, args.deny_events_per_second)?;
    egress_deny_datapath::settings::write(
        &layout,
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
        move_attachments_to_current_program(&layout, &state);
    }

    let plugin_source = match &args.plugin_binary {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join(PLUGIN_NAME))
            .context("own directory")?,
    };
    if !plugin_source.is_file() {
        bail!(
            "plugin binary {} not found (--plugin-binary)",
            plugin_source.display()
        );
    }
    if node::install_binary(&plugin_source, &args.cni.cni_bin_dir, PLUGIN_NAME).with_context(
        || {
            format!(
                "installing the plugin into {}",
                args.cni.cni_bin_dir.display()
            )
        },
    )? {
        log::info!(
            "installed {} into {}",
            PLUGIN_NAME,
            args.cni.cni_bin_dir.display()
        );
    }

    let previous = DaemonStatus::load(&args.state.state_dir).unwrap_or_default();
    let syncer = Syncer::open(
        &layout,
        previous.enforced.clone(),
        args.limits.max_table_bytes,
    )
    .context("opening the rule tables")?;
    match syncer.recorded() {
        Some(r) => log::info!(
            "the previous daemon enforced IPv4 {} deny / {} allow, IPv6 {} deny / {} allow; they stay enforced until the rules are synced",
            r.rules.v4_deny,
            r.rules.v4_allow,
            r.rules.v6_deny,
            r.rules.v6_allow
        ),
        None if syncer.maps_hold_rules() => log::info!(
            "the pinned maps hold rules from before; they stay enforced until the rules are synced"
        ),
        None => {}
    }
    *shared.status.lock().expect("status") = previous;
    shared.staged.store(report.staged, Ordering::Relaxed);
    *shared.not_started.lock().expect("lock state") = None;
    let (conf_tx, conf_rx) = mpsc::channel();
    watch_datapath(conf_tx.clone());
    watch(&args.rules_dir, &args.cni.cni_conf_dir, rules_tx, conf_tx)?;
    log_deny_events(layout.clone(), state.clone());
    // The node side (conflist, host interfaces, repair) on its own thread: a sync of
    // millions of rules takes seconds, the conflist must be repaired within one.
    {
        let (args, shared) = (args.clone(), Arc::clone(&shared));
        thread::Builder::new()
            .name("node".into())
            .spawn(move || node_loop(&args, &shared, conf_rx))?;
    }

    let mut rules = RulesSync {
        enforced: syncer.recorded().map(|r| r.rules.clone()),
        tables: TableStatus::in_force(&layout),
        syncer,
        seen: None,
        cancel,
        said_empty: false,
        last_rejection: None,
    };
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

/// Takes the node-wide daemon lock (`flock` on the state dir's lock file), waiting while
/// another daemon holds it: a hand-run next to the DaemonSet's, or a rollout with
/// `maxSurge`, where the new daemon takes over the moment the old one exits. `None` when
/// stopped (SIGTERM) while waiting.
fn node_lock(
    state: &StateLayout,
    shared: &Shared,
    cancel: &AtomicBool,
) -> Result<Option<std::fs::File>> {
    use std::{io::Write, os::fd::AsRawFd};
    let path = state.daemon_lock();
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut said = false;
    loop {
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            break;
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(err).with_context(|| format!("locking {}", path.display()));
        }
        if !said {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let who = format!(
                "another egress-deny-installer (pid {}) runs on this node (lock {})",
                holder.trim(),
                path.display()
            );
            log::warn!("{who}; waiting for it to exit");
            *shared.not_started.lock().expect("lock state") = Some(who);
            said = true;
        }
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(50)); // polling the lock, bounded by SIGTERM
    }
    if said {
        log::info!("took over the node lock");
    }
    *shared.not_started.lock().expect("lock state") = Some("starting".into());
    file.set_len(0)?;
    write!(file, "{}", std::process::id())?;
    Ok(Some(file))
}

/// What a parse saw, to skip the next one when nothing changed.
struct Seen {
    fingerprint: Option<Fingerprint>,
    protections: Vec<(IpNet, String)>,
    parsed_at: SystemTime,
}

struct RulesSync {
    syncer: Syncer,
    /// Rules in force, once known.
    enforced: Option<RuleCounts>,
    /// The tables in force and how the last of each was built.
    tables: Vec<TableStatus>,
    seen: Option<Seen>,
    cancel: Arc<AtomicBool>,
    said_empty: bool,
    /// The last rejection logged, and when: the same one is logged again only as a
    /// slow reminder (status and /metrics keep it meanwhile).
    last_rejection: Option<(String, Instant)>,
}

/// How often a rejection that stays is logged again.
const REJECTION_REMINDER: Duration = Duration::from_secs(600);

/// Why a sync did not apply.
enum Rejected {
    /// The files say something wrong: reading them again changes nothing.
    Content(String),
    /// Worth retrying (I/O, map errors).
    Transient(String),
    Interrupted,
}

impl RulesSync {
    /// Reads the rules directory and applies it, unless neither the files nor the
    /// protected destinations changed since the last parse.
    fn sync(&mut self, args: &RunArgs, shared: &Shared) {
        let started = Instant::now();
        let parsed_at = SystemTime::now();
        let files = match rules::rule_files(&args.rules_dir) {
            Ok(files) => Some(files),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                let why = format!("reading {}: {e}", args.rules_dir.display());
                self.finish(args, shared, started, Err(Rejected::Transient(why)));
                return;
            }
        };
        let fingerprint = files.as_deref().and_then(|f| Fingerprint::of(f).ok());
        let protections = sync::protected(&args.protect.0);
        if let Some(seen) = &self.seen
            && seen.protections == protections
            && match (&fingerprint, &seen.fingerprint) {
                (Some(now), Some(then)) => now.seen_by_parse_at(then, seen.parsed_at),
                (None, None) => files.is_none(),
                _ => false,
            }
        {
            return;
        }
        let outcome = self.parse_and_apply(args, shared, files.as_deref(), &protections);
        self.seen = match &outcome {
            Ok(_) | Err(Rejected::Content(_)) => Some(Seen {
                fingerprint,
                protections,
                parsed_at,
            }),
            Err(_) => None,
        };
        self.finish(args, shared, started, outcome);
    }

    fn parse_and_apply(
        &mut self,
        args: &RunArgs,
        shared: &Shared,
        files: Option<&[PathBuf]>,
        protections: &[(IpNet, String)],
    ) -> Result<(usize, usize, usize), Rejected> {
        let cancel = &*self.cancel;
        let parsed = match files {
            // A volume not mounted (yet), or a wrong --rules-dir: never taken as "no
            // rules". What is enforced stays; with nothing enforced yet the node stays
            // not ready and ADD keeps retrying pods (fail closed). An existing empty
            // directory is the way to say "no rules".
            None => {
                return Err(Rejected::Content(format!(
                    "rules directory {} does not exist (volume not mounted or wrong --rules-dir); {}",
                    args.rules_dir.display(),
                    if self.syncer.maps_hold_rules() {
                        "the rules enforced before stay"
                    } else {
                        "no valid rule set yet: pods wait"
                    }
                )));
            }
            Some(files) => {
                rules::parse_files(files, &args.limits.limits(), cancel).map_err(|e| match e {
                    RulesError::Interrupted => Rejected::Interrupted,
                    e if e.is_about_content() => Rejected::Content(e.to_string()),
                    e => Rejected::Transient(e.to_string()),
                })?
            }
        };
        if let Some(files) = files
            && !rules::still_current(&args.rules_dir, files)
        {
            return Err(Rejected::Transient(
                "the rules directory was updated while it was read; reading the new version".into(),
            ));
        }
        // Said once per transition: the tick re-syncs when gateways change, and an
        // empty list is a valid (if unusual) state, not news every two seconds.
        let empty = files.is_some_and(|f| f.is_empty());
        if empty && !self.said_empty {
            log::warn!(
                "rules directory {} holds no rule files: no rules to enforce",
                args.rules_dir.display()
            );
        }
        self.said_empty = empty;
        let (files, lines) = (parsed.files, parsed.lines);
        let mut set = parsed.rules;
        for warning in sync::add_protections(&mut set, protections) {
            log::warn!("{warning}");
        }
        if cancel.load(Ordering::Relaxed) {
            return Err(Rejected::Interrupted);
        }
        let swaps = self.syncer.apply(&set).map_err(|e| match e {
            SyncError::TooLarge(why) => Rejected::Content(why),
            e => Rejected::Transient(format!("{e:#}")),
        })?;
        if swaps.is_empty() {
            log::info!("the tables in force already hold these rules: nothing to swap");
        }
        for FamilySwap { family, swap } in &swaps {
            log::info!(
                "IPv{family} table swapped in: {} rules as {} ranges, {:.1} MiB, built in {} ms, swapped in {} µs",
                swap.summary.deny_rules + swap.summary.allow_rules,
                swap.summary.ranges,
                swap.summary.bytes as f64 / f64::from(1 << 20),
                swap.build.as_millis(),
                swap.swap.as_micros()
            );
            let entry = TableStatus::of(*family, swap);
            self.tables.retain(|t| t.family != *family);
            self.tables.push(entry);
            self.tables.sort_by_key(|t| t.family);
        }
        let record = self
            .syncer
            .record_of(&set)
            .map_err(|e| Rejected::Transient(format!("{e:#}")))?;
        self.enforced = Some(record.rules.clone());
        shared.status.lock().expect("status").enforced = Some(record);
        Ok((swaps.len(), files, lines))
    }

    fn finish(
        &mut self,
        args: &RunArgs,
        shared: &Shared,
        started: Instant,
        outcome: Result<(usize, usize, usize), Rejected>,
    ) {
        let elapsed = started.elapsed();
        let enforced = self.enforced.clone();
        let mut status = shared.status.lock().expect("status");
        let previous = status.last_sync.clone().unwrap_or_default();
        let rules = enforced
            .or_else(|| self.syncer.recorded().map(|r| r.rules.clone()))
            .unwrap_or(previous.rules.clone());
        let (ok, error, operations, files) = match outcome {
            Ok((ops, files, lines)) => {
                log::info!(
                    "rules synced in {} ms: {} ({ops} tables swapped, {files} files, {lines} lines)",
                    elapsed.as_millis(),
                    CountsDisplay(&rules),
                );
                status.last_success = now();
                self.last_rejection = None;
                if let Err(e) = events::mark_rules_loaded(&shared.layout) {
                    log::error!("marking the rules loaded: {e}");
                }
                if shared.staged.load(Ordering::Relaxed) {
                    promote(shared);
                }
                shared.synced_once.store(true, Ordering::Relaxed);
                (true, None, ops, files)
            }
            Err(Rejected::Interrupted) => {
                log::warn!("rules sync interrupted by shutdown");
                return;
            }
            Err(Rejected::Content(why) | Rejected::Transient(why)) => {
                let repeated = self
                    .last_rejection
                    .as_ref()
                    .is_some_and(|(last, at)| *last == why && at.elapsed() < REJECTION_REMINDER);
                if repeated {
                    log::debug!("rules update still rejected: {why}");
                } else {
                    log::error!("rules update rejected, the previous rules stay enforced: {why}");
                    self.last_rejection = Some((why.clone(), Instant::now()));
                }
                status.sync_errors_total += 1;
                (false, Some(why), 0, previous.files)
            }
        };
        status.last_sync = Some(SyncStatus {
            time: now(),
            duration_ms: elapsed.as_millis() as u64,
            ok,
            error,
            rules,
            operations,
            files,
            tables: self.tables.clone(),
        });
        status.save(&args.state.state_dir);
    }
}

/// The staged program's maps now hold a valid rule set: make it the program in use and
/// move every attachment to it. On failure it stays staged (and not ready) and the next
/// successful sync tries again; the previous program keeps enforcing meanwhile.
fn promote(shared: &Shared) {
    match loader::promote_staged(&shared.layout) {
        Ok(_) => {
            shared.staged.store(false, Ordering::Relaxed);
            log::info!(
                "the new rule maps hold a valid rule set: moving every attachment to the new program"
            );
            move_attachments_to_current_program(&shared.layout, &shared.state);
        }
        Err(e) => log::error!("promoting the staged program: {e}"),
    }
}

struct CountsDisplay<'a>(&'a RuleCounts);

impl std::fmt::Display for CountsDisplay<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self.0;
        write!(
            f,
            "IPv4 {} deny / {} allow, IPv6 {} deny / {} allow",
            r.v4_deny, r.v4_allow, r.v6_deny, r.v6_allow
        )
    }
}

/// Conflist, host interfaces and pod repair: on conf dir events and every tick.
fn node_loop(args: &RunArgs, shared: &Shared, events: mpsc::Receiver<Event>) {
    let (layout, state) = (&shared.layout, &shared.state);
    let mut conflist_error: Option<String> = None;
    ensure_conflist(args, shared, &mut conflist_error);
    repair::repair_from_cache(layout, state, &args.cni_cache_dir, &args.cni.cni_conf_dir);
    let mut host_links = attach_host_interfaces(args, layout, state, &HostLinks::default());
    set_host_interfaces(shared, args, &host_links);
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
            if !shared.staged.load(Ordering::Relaxed) {
                crate::verify::attachments(
                    layout,
                    state,
                    &shared.repairs,
                    crate::verify::Trigger::Notification,
                );
            }
        }
        if now >= next_tick {
            next_tick = now + TICK;
            ensure_conflist(args, shared, &mut conflist_error);
            // Verified (and repairs counted) before the host attachments are
            // re-asserted, which would otherwise restore a lost filter silently.
            if !shared.staged.load(Ordering::Relaxed) {
                crate::verify::attachments(
                    layout,
                    state,
                    &shared.repairs,
                    crate::verify::Trigger::Tick,
                );
            }
            host_links = attach_host_interfaces(args, layout, state, &host_links);
            repair::clean_up_vanished(layout, state);
            repair::repair_from_cache(layout, state, &args.cni_cache_dir, &args.cni.cni_conf_dir);
            set_host_interfaces(shared, args, &host_links);
        }
    }
}

fn set_host_interfaces(shared: &Shared, args: &RunArgs, host_links: &HostLinks) {
    let mut status = shared.status.lock().expect("status");
    if status.host_interfaces != host_links.attached
        || status.host_interfaces_unfiltered != host_links.unfiltered
    {
        status.host_interfaces = host_links.attached.clone();
        status.host_interfaces_unfiltered = host_links.unfiltered.clone();
        status.save(&args.state.state_dir);
    }
}

/// The host interfaces that should be filtered: attached, and not (with why).
#[derive(Default)]
struct HostLinks {
    attached: Vec<String>,
    unfiltered: Vec<(String, String)>,
}

fn ensure_conflist(args: &RunArgs, shared: &Shared, last_error: &mut Option<String>) {
    let default_pin = Path::new(egress_deny_datapath::paths::DEFAULT_PIN_DIR);
    let default_state = Path::new(egress_deny_datapath::paths::DEFAULT_STATE_DIR);
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
        status.save(&args.state.state_dir);
    }
}

/// Attaches to the wanted host interfaces (tc egress), detaches from ones no longer
/// wanted, whatever the mode (each attachment has a host record: a cls_bpf filter has
/// no pin to find it by). Each failure is logged when it starts (or changes) and
/// reported in status.
fn attach_host_interfaces(
    args: &RunArgs,
    layout: &PinLayout,
    state: &StateLayout,
    previous: &HostLinks,
) -> HostLinks {
    let wanted = node::host_interfaces(&args.host_interfaces);
    let mut now = HostLinks::default();
    for ifname in &wanted {
        let link_pin = layout.host_link(ifname);
        let req = AttachRequest {
            ifname,
            hook: Hook::Egress,
            link_pin: &link_pin,
            mode: AttachMode::forced_or_best(),
            exempt: false,
        };
        match attach::attach(layout, &req) {
            Ok(a) => {
                if !previous.attached.contains(ifname) {
                    log::info!(
                        "filtering host interface {ifname} (tc egress, {} program {})",
                        a.mode.as_str(),
                        a.program_id
                    );
                }
                let record = HostRecord {
                    ifname: ifname.clone(),
                    ifindex: a.ifindex,
                    mode: a.mode.as_str().to_owned(),
                };
                if HostRecord::list(state).iter().all(|(_, r)| *r != record)
                    && let Err(e) = record.write(state)
                {
                    log::warn!("recording host interface {ifname}: {e}");
                }
                now.attached.push(ifname.clone());
            }
            Err(e) => {
                let why = e.to_string();
                if !previous
                    .unfiltered
                    .iter()
                    .any(|(i, w)| i == ifname && *w == why)
                {
                    log::error!("host interface {ifname} is NOT filtered: {why}");
                }
                now.unfiltered.push((ifname.clone(), why));
            }
        }
    }
    // Attachments to interfaces no longer wanted (or gone): recorded ones by their mode,
    // then pins without a record (older versions recorded none).
    for (path, record) in HostRecord::list(state) {
        if now.attached.contains(&record.ifname) {
            continue;
        }
        detach_host(layout, &record);
        let _ = std::fs::remove_file(path);
        if previous.attached.contains(&record.ifname) {
            log::info!(
                "host interface {} no longer filtered (gone or not a default route)",
                record.ifname
            );
        }
    }
    if let Ok(entries) = std::fs::read_dir(layout.links_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(ifname) = host_link_ifname(&name)
                && !now.attached.contains(&ifname)
            {
                let _ = attach::detach(None, Hook::Egress, &entry.path(), AttachMode::Tcx);
            }
        }
    }
    now
}

/// Removes one host attachment the way it was made. A cls_bpf filter is found by the
/// recorded name only while that name still has the recorded ifindex (a new interface
/// reusing the name is not ours to strip).
pub fn detach_host(layout: &PinLayout, record: &HostRecord) {
    let mode = AttachMode::parse(&record.mode).unwrap_or(AttachMode::Tcx);
    let still_ours = iface::ifindex(&record.ifname).is_ok_and(|i| i == record.ifindex);
    let ifname = still_ours.then_some(record.ifname.as_str());
    if let Err(e) = attach::detach(
        ifname,
        Hook::Egress,
        &layout.host_link(&record.ifname),
        mode,
    ) {
        log::warn!("detaching from host interface {}: {e}", record.ifname);
    }
}

/// Every start pins a freshly loaded program (after an upgrade, a new version): move
/// every attachment to it — pods from their records (TCX link update or cls_bpf filter
/// replace, both atomic), then every other pinned link (host interfaces, a pod whose
/// ADD died before writing its record) by a link update. Attachments whose pod is gone
/// are cleaned up.
fn move_attachments_to_current_program(layout: &PinLayout, state: &StateLayout) {
    crate::repair::clean_up_vanished(layout, state);
    let mut moved_pins = HashSet::new();
    for (_, record) in AttachmentRecord::list(state).unwrap_or_default() {
        let link_pin = record.link_pin_path(layout);
        let mode = AttachMode::parse(&record.mode).unwrap_or(AttachMode::Tcx);
        let req = AttachRequest {
            ifname: &record.host_ifname,
            hook: Hook::Ingress,
            link_pin: &link_pin,
            mode,
            exempt: record.exempt,
        };
        moved_pins.insert(link_pin.clone());
        match attach::attach(layout, &req) {
            Ok(a) if a.program_id != record.program_id => {
                let mut updated = record.clone();
                updated.program_id = a.program_id;
                let _ = updated.write(state);
                log::info!("moved {} to program {}", record.host_ifname, a.program_id);
            }
            Ok(_) => {}
            Err(e) => log::warn!("re-attaching {}: {e}", record.host_ifname),
        }
    }
    // Every other pinned link (host interfaces, a pod whose ADD died before writing its
    // record): moved by a link update, exempt ones kept exempt.
    let Ok(entries) = std::fs::read_dir(layout.links_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let pin = entry.path();
        let name = entry.file_name();
        if moved_pins.contains(&pin) || is_reorder_link_name(&name.to_string_lossy()) {
            continue; // a re-order leftover is removed by the verifier
        }
        match egress_deny_datapath::order::ensure_first_and_current(layout, &pin) {
            Ok(Verified::Moved | Verified::Reordered) => {
                log::info!("moved {} to the program in use", pin.display())
            }
            Ok(Verified::InPlace | Verified::Gone | Verified::Restored) => {}
            Err(e) => log::warn!("re-attaching {}: {e}", pin.display()),
        }
    }
}

/// Link and tc notifications of the node's namespace → an attachment check (a deleted
/// clsact qdisc or filter is restored within milliseconds rather than at the next
/// tick; a TCX program attached ahead of ours sends no notification and waits for the
/// tick).
fn watch_datapath(tx: Sender<Event>) {
    let watch = match netlink::ChangeWatch::open() {
        Ok(watch) => watch,
        Err(e) => {
            log::warn!("no link/tc notifications ({e}); attachments are checked every tick");
            return;
        }
    };
    let spawned = thread::Builder::new()
        .name("netlink".into())
        .spawn(move || {
            while watch.wait().is_ok() {
                if tx.send(Event::Datapath).is_err() {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("no link/tc notifications ({e})");
    }
}

fn watch(
    rules_dir: &Path,
    conf_dir: &Path,
    rules_tx: Sender<Event>,
    conf_tx: Sender<Event>,
) -> Result<()> {
    use inotify::{Inotify, WatchMask};
    let mut inotify = Inotify::init().context("inotify")?;
    let mask = WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::ATTRIB
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF;
    std::fs::create_dir_all(conf_dir)
        .with_context(|| format!("creating {}", conf_dir.display()))?;
    let conf_wd = inotify
        .watches()
        .add(conf_dir, mask)
        .context("watching the CNI conf dir")?;
    // The rules directory may not exist yet: watch its parent too, to see it appear
    // (only events naming the rules directory count there).
    let rules_parent = rules_dir.parent().unwrap_or(Path::new("/")).to_path_buf();
    let rules_name = rules_dir.file_name().map(|n| n.to_os_string());
    let parent_wd = inotify.watches().add(&rules_parent, mask).ok();
    let mut rules_wd = inotify.watches().add(rules_dir, mask).ok();
    let rules_dir = rules_dir.to_path_buf();
    thread::Builder::new()
        .name("inotify".into())
        .spawn(move || {
            let mut buffer = [0u8; 16 * 1024];
            loop {
                let events = match inotify.read_events_blocking(&mut buffer) {
                    Ok(events) => events,
                    Err(e) => {
                        log::error!("inotify: {e}");
                        return;
                    }
                };
                let (mut rules, mut conf) = (false, false);
                for event in events {
                    if event.wd == conf_wd {
                        conf = true;
                    } else if Some(&event.wd) == rules_wd.as_ref()
                        || (Some(&event.wd) == parent_wd.as_ref()
                            && event.name.map(|n| n.to_os_string()) == rules_name)
                    {
                        rules = true;
                    }
                }
                if rules {
                    // (Re)watch the directory itself once it exists (again).
                    if let Ok(wd) = inotify.watches().add(&rules_dir, mask) {
                        rules_wd = Some(wd);
                    }
                }
                if (rules && rules_tx.send(Event::Changed).is_err())
                    || (conf && conf_tx.send(Event::Changed).is_err())
                {
                    return;
                }
            }
        })?;
    Ok(())
}

fn stop_on_signals(tx: Sender<Event>, cancel: Arc<AtomicBool>) -> Result<()> {
    use signal_hook::{
        consts::{SIGINT, SIGTERM},
        iterator::Signals,
    };
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                cancel.store(true, Ordering::Relaxed);
                if tx.send(Event::Stop).is_err() {
                    // Still starting up (no event loop yet): nothing to finish.
                    log::info!("stopping during start-up; enforcement stays in place");
                    std::process::exit(0);
                }
            }
        })?;
    Ok(())
}

/// Logs deny events (already rate-limited per attachment in the kernel) with the pod
/// they came from.
fn log_deny_events(layout: PinLayout, state: StateLayout) {
    let spawned = thread::Builder::new()
        .name("deny-events".into())
        .spawn(move || {
            let mut reader = match EventReader::open(&layout) {
                Ok(reader) => reader,
                Err(e) => {
                    log::warn!("deny events unavailable: {e}");
                    return;
                }
            };
            let fd = std::os::fd::AsRawFd::as_raw_fd(&reader);
            let mut names: Vec<(u32, String)> = Vec::new();
            let mut names_at = Instant::now() - Duration::from_secs(60);
            loop {
                let mut pollfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pollfd, 1, 1000) };
                while let Some(event) = reader.next_event() {
                    if names_at.elapsed() > Duration::from_secs(1) {
                        names = attachment_names(&layout, &state);
                        names_at = Instant::now();
                    }
                    let who = names
                        .iter()
                        .find(|(i, _)| *i == event.ifindex)
                        .map(|(_, n)| n.clone())
                        .unwrap_or_else(|| format!("ifindex {}", event.ifindex));
                    match (event.destination, event.rule) {
                        (Some(dst), Some(rule)) => log::warn!(
                            "denied: {who} -> {dst} (rule {rule}, {} bytes)",
                            event.packet_len
                        ),
                        _ => {
                            log::warn!("denied: {who}: IP packet too short to read its destination")
                        }
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("deny events: {e}");
    }
}

fn attachment_names(layout: &PinLayout, state: &StateLayout) -> Vec<(u32, String)> {
    crate::status::attachments(layout, state)
        .into_iter()
        .map(|a| {
            let name = match (a.pod_namespace, a.pod_name) {
                (Some(ns), Some(pod)) => format!("pod {ns}/{pod} ({})", a.ifname),
                _ => match a.container_id {
                    Some(c) => format!("container {c} ({})", a.ifname),
                    None => format!("host {}", a.ifname),
                },
            };
            (a.ifindex, name)
        })
        .collect()
}
