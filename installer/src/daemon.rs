//! `run`: the per-node daemon. Loads and pins the datapath, installs the plugin and its
//! conflist entry, filters the host's uplinks, and keeps the maps in sync with the rules
//! directory. On SIGTERM it exits and leaves enforcement in place.
use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, RecvTimeoutError, Sender},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use egress_deny_datapath::{
    attach::{self, AttachMode, AttachRequest, Hook},
    events::{self, EventReader},
    loader::{self, MapOutcome},
    paths::{PinLayout, StateLayout, host_link_ifname},
    records::AttachmentRecord,
};

use crate::{
    cli::RunArgs,
    conflist::{self, ConflistError, Ensured},
    metrics, node, repair,
    rules::{self, RuleSet},
    status::{DaemonStatus, RuleCounts, SyncStatus, now},
    sync::{self, Syncer},
};

pub const PLUGIN_NAME: &str = "egress-deny";
/// Quiet time after the last change before a rules sync (kubelet swaps in one rename,
/// editors write in bursts).
const RULES_DEBOUNCE: Duration = Duration::from_millis(20);
const CONF_DEBOUNCE: Duration = Duration::from_millis(50);
/// Safety net for missed notifications, host-interface changes and late conflists.
const TICK: Duration = Duration::from_secs(2);

enum Event {
    Rules,
    Conf,
    Stop,
}

/// State the HTTP endpoints read.
pub struct Shared {
    pub layout: PinLayout,
    pub state: StateLayout,
    pub conf_dir: PathBuf,
    pub status: Mutex<DaemonStatus>,
    pub synced_once: AtomicBool,
}

pub fn run(args: &RunArgs) -> Result<()> {
    let layout = PinLayout::new(&args.state.pin_dir);
    let state = StateLayout::new(&args.state.state_dir);
    std::fs::create_dir_all(state.attachments_dir())
        .with_context(|| format!("creating {}", state.attachments_dir().display()))?;

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
    move_pod_attachments_to_current_program(&layout, &state);

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

    let shared = Arc::new(Shared {
        layout: layout.clone(),
        state: state.clone(),
        conf_dir: args.cni.cni_conf_dir.clone(),
        status: Mutex::new(DaemonStatus::load(&args.state.state_dir).unwrap_or_default()),
        synced_once: AtomicBool::new(false),
    });
    let mut syncer = Syncer::open(&layout).context("opening the rule maps")?;
    let enforced = syncer.enforced().counts();
    if enforced.v4_deny + enforced.v6_deny > 0 {
        log::info!("found enforced rules from before: {enforced}");
    }

    let (tx, rx) = mpsc::channel();
    metrics::serve(args.listen, Arc::clone(&shared))?;
    watch(&args.rules_dir, &args.cni.cni_conf_dir, tx.clone())?;
    stop_on_signals(tx.clone())?;
    log_deny_events(layout.clone(), state.clone());

    sync_rules(args, &mut syncer, &shared);
    ensure_conflist(args, &shared);
    repair::repair_from_cache(&layout, &state, &args.cni_cache_dir);
    let mut host_links = attach_host_interfaces(args, &layout, &[]);
    shared.status.lock().expect("status").host_interfaces = host_links.clone();

    let mut rules_due: Option<Instant> = None;
    let mut conf_due: Option<Instant> = None;
    let mut next_tick = Instant::now() + TICK;
    loop {
        let next = [rules_due, conf_due, Some(next_tick)]
            .into_iter()
            .flatten()
            .min()
            .expect("tick");
        match rx.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Ok(Event::Rules) => rules_due = Some(Instant::now() + RULES_DEBOUNCE),
            Ok(Event::Conf) => conf_due = Some(Instant::now() + CONF_DEBOUNCE),
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
            sync_rules(args, &mut syncer, &shared);
        }
        if conf_due.is_some_and(|due| now >= due) {
            conf_due = None;
            ensure_conflist(args, &shared);
        }
        if now >= next_tick {
            next_tick = now + TICK;
            ensure_conflist(args, &shared);
            host_links = attach_host_interfaces(args, &layout, &host_links);
            repair::clean_up_vanished(&layout, &state);
            repair::repair_from_cache(&layout, &state, &args.cni_cache_dir);
            shared.status.lock().expect("status").host_interfaces = host_links.clone();
            if !shared.synced_once.load(Ordering::Relaxed)
                || rules_dir_appeared(&args.rules_dir, &shared)
            {
                sync_rules(args, &mut syncer, &shared);
            }
        }
    }
}

/// A rules directory that did not exist at start may appear later (the volume mounts).
fn rules_dir_appeared(dir: &Path, shared: &Shared) -> bool {
    let status = shared.status.lock().expect("status");
    dir.exists()
        && status.last_sync.as_ref().is_some_and(|s| s.files == 0)
        && rules::rule_files(dir)
            .map(|f| !f.is_empty())
            .unwrap_or(false)
}

fn sync_rules(args: &RunArgs, syncer: &mut Syncer, shared: &Shared) {
    let started = Instant::now();
    let outcome = (|| -> Result<(usize, usize, RuleSet)> {
        let parsed = rules::parse_dir(&args.rules_dir)?;
        if parsed.dir_missing {
            log::warn!(
                "rules directory {} does not exist: empty rule set",
                args.rules_dir.display()
            );
        } else if parsed.rules.len() == 0 {
            log::warn!(
                "rules directory {} holds no rules",
                args.rules_dir.display()
            );
        }
        let mut rules = parsed.rules;
        for warning in sync::add_protections(&mut rules, &sync::protected(&args.protect.0)) {
            log::warn!("{warning}");
        }
        let ops = syncer.apply(rules.clone())?;
        Ok((ops, parsed.files, rules))
    })();
    let elapsed = started.elapsed();
    let counts = syncer.enforced().counts();
    let rule_counts = RuleCounts {
        v4_deny: counts.v4_deny,
        v4_allow: counts.v4_allow,
        v6_deny: counts.v6_deny,
        v6_allow: counts.v6_allow,
    };
    let mut status = shared.status.lock().expect("status");
    let (ok, error, operations, files) = match outcome {
        Ok((ops, files, _)) => {
            log::info!(
                "rules synced in {} ms: {counts} ({ops} map operations, {files} files)",
                elapsed.as_millis()
            );
            status.last_success = now();
            shared.synced_once.store(true, Ordering::Relaxed);
            if let Err(e) = events::mark_rules_loaded(&shared.layout) {
                log::error!("marking the rules loaded: {e}");
            }
            (true, None, ops, files)
        }
        Err(e) => {
            log::error!("rules update rejected, the previous rules stay enforced: {e:#}");
            status.sync_errors_total += 1;
            (
                false,
                Some(format!("{e:#}")),
                0,
                status.last_sync.as_ref().map(|s| s.files).unwrap_or(0),
            )
        }
    };
    status.last_sync = Some(SyncStatus {
        time: now(),
        duration_ms: elapsed.as_millis() as u64,
        ok,
        error,
        rules: rule_counts,
        operations,
        files,
    });
    status.save(&args.state.state_dir);
}

fn ensure_conflist(args: &RunArgs, shared: &Shared) {
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
    let mut status = shared.status.lock().expect("status");
    match outcome {
        Ok(Ensured::Written(path)) => {
            log::info!("added the egress-deny entry to {}", path.display());
            status.conflist = Some(path.display().to_string());
        }
        Ok(Ensured::AlreadyPresent(path)) => status.conflist = Some(path.display().to_string()),
        Err(ConflistError::NoPrimary(dir)) => {
            if status.conflist.take().is_some() || !shared.synced_once.load(Ordering::Relaxed) {
                log::info!(
                    "waiting for the primary CNI to write its configuration into {}",
                    dir.display()
                );
            }
        }
        Err(e) => {
            log::error!("{e}");
            status.conflist = None;
        }
    }
}

/// Attaches to the wanted host interfaces (tc egress), detaches from ones no longer
/// wanted. Returns the interfaces attached.
fn attach_host_interfaces(args: &RunArgs, layout: &PinLayout, previous: &[String]) -> Vec<String> {
    let wanted = node::host_interfaces(&args.host_interfaces);
    let mut attached = Vec::new();
    for ifname in &wanted {
        let link_pin = layout.host_link(ifname);
        let req = AttachRequest {
            ifname,
            hook: Hook::Egress,
            link_pin: &link_pin,
            mode: AttachMode::best_available(),
        };
        match attach::attach(layout, &req) {
            Ok(a) => {
                if !previous.contains(ifname) {
                    log::info!(
                        "filtering host interface {ifname} (tc egress, {} program {})",
                        a.mode.as_str(),
                        a.program_id
                    );
                }
                attached.push(ifname.clone());
            }
            Err(e) => {
                if !previous.contains(ifname) {
                    log::warn!("cannot attach to host interface {ifname}: {e}");
                }
            }
        }
    }
    // Host links for interfaces no longer wanted (or gone).
    if let Ok(entries) = std::fs::read_dir(layout.links_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(ifname) = host_link_ifname(&name)
                && !attached.contains(&ifname)
            {
                let _ = attach::detach(None, Hook::Egress, &entry.path(), AttachMode::Tcx);
                if previous.contains(&ifname) {
                    log::info!(
                        "host interface {ifname} no longer filtered (gone or not a default route)"
                    );
                }
            }
        }
    }
    attached
}

/// After an upgrade the pinned program is new: move every pod attachment to it (a TCX
/// link update is atomic). Attachments whose pod is gone are cleaned up.
fn move_pod_attachments_to_current_program(layout: &PinLayout, state: &StateLayout) {
    crate::repair::clean_up_vanished(layout, state);
    for (_, record) in AttachmentRecord::list(state).unwrap_or_default() {
        let link_pin = layout.pod_link(&record.container_id, &record.ifname);
        let mode = AttachMode::parse(&record.mode).unwrap_or(AttachMode::Tcx);
        let req = AttachRequest {
            ifname: &record.host_ifname,
            hook: Hook::Ingress,
            link_pin: &link_pin,
            mode,
        };
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
}

fn watch(rules_dir: &Path, conf_dir: &Path, tx: Sender<Event>) -> Result<()> {
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
                if (rules && tx.send(Event::Rules).is_err())
                    || (conf && tx.send(Event::Conf).is_err())
                {
                    return;
                }
            }
        })?;
    Ok(())
}

fn stop_on_signals(tx: Sender<Event>) -> Result<()> {
    use signal_hook::{
        consts::{SIGINT, SIGTERM},
        iterator::Signals,
    };
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                let _ = tx.send(Event::Stop);
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
