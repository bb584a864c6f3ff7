//! Rules directory → maps: parse (skipped while neither the files nor the protected
//! destinations changed), add the protections, apply, and report in status; a rejected
//! update keeps the rules in force and is logged when it starts, then as a slow
//! reminder.
use std::{
    io,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use egress_deny_datapath::{events, paths::PinLayout};
use ipnet::IpNet;

use super::{Shared, upgrade};
use crate::{
    commands::run::RunArgs,
    rules::{self, FamilySwap, Fingerprint, RulesError, SyncError, Syncer},
    status::{EnforcedRecord, RuleCounts, SyncStatus, TableStatus, now},
};

/// What a parse saw, to skip the next one when nothing changed.
struct Seen {
    fingerprint: Option<Fingerprint>,
    protections: Vec<(IpNet, String)>,
    parsed_at: SystemTime,
}

/// The rules side of the daemon: reads the rules directory, applies it to the maps,
/// and reports in status.
pub(super) struct RulesSync {
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
    /// Opens the rule tables; what the previous daemon recorded (`enforced`) spares
    /// reading them back when the rules did not change.
    pub(super) fn open(
        args: &RunArgs,
        layout: &PinLayout,
        enforced: Option<EnforcedRecord>,
        cancel: Arc<AtomicBool>,
    ) -> Result<Self> {
        let syncer = Syncer::open(layout, enforced, args.limits.max_table_bytes)
            .context("opening the rule tables")?;
        match syncer.recorded() {
            Some(r) => log::info!(
                "the previous daemon enforced {}; they stay enforced until the rules are synced",
                r.rules
            ),
            None if syncer.maps_hold_rules() => log::info!(
                "the pinned maps hold rules from before; they stay enforced until the rules are synced"
            ),
            None => {}
        }
        Ok(Self {
            enforced: syncer.recorded().map(|r| r.rules.clone()),
            tables: TableStatus::in_force(layout),
            syncer,
            seen: None,
            cancel,
            said_empty: false,
            last_rejection: None,
        })
    }

    /// Reads the rules directory and applies it, unless neither the files nor the
    /// protected destinations changed since the last parse.
    pub(super) fn sync(&mut self, args: &RunArgs, shared: &Shared) {
        let started = Instant::now();
        let parsed_at = SystemTime::now();
        let files = match rules::rule_files(&args.rules_dir) {
            Ok(files) => Some(files),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                let why = format!("reading {}: {e}", args.rules_dir.display());
                self.finish(shared, started, Err(Rejected::Transient(why)));
                return;
            }
        };
        let fingerprint = files.as_deref().and_then(|f| Fingerprint::of(f).ok());
        let protections = rules::protected(&args.protect.0);
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
        self.finish(shared, started, outcome);
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
        for warning in rules::add_protections(&mut set, protections) {
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
                    "rules synced in {} ms: {} (tables swapped: {ops}, {files} files, {lines} lines)",
                    elapsed.as_millis(),
                    rules,
                );
                status.last_success = now();
                self.last_rejection = None;
                if let Err(e) = events::mark_rules_loaded(&shared.layout) {
                    log::error!("marking the rules loaded: {e}");
                }
                if shared.staged.load(Ordering::Relaxed) {
                    upgrade::promote(shared);
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
        status.save(&shared.state);
    }
}
