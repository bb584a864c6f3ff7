//! What the daemon's threads share with the HTTP endpoints: the node's state as the
//! rules and node loops leave it, and whether that makes the node ready.
use std::{
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use egress_deny_datapath::paths::{ALL_MAPS, PinLayout, ProgramKind, StateLayout};

use crate::{conflist, status::DaemonStatus};

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

impl Shared {
    pub fn new(layout: PinLayout, state: StateLayout, conf_dir: PathBuf) -> Self {
        Self {
            layout,
            state,
            conf_dir,
            status: Mutex::new(DaemonStatus::default()),
            synced_once: AtomicBool::new(false),
            staged: AtomicBool::new(false),
            repairs: AtomicU64::new(0),
            not_started: Mutex::new(Some("starting".into())),
        }
    }

    /// `/readyz`: program and maps pinned, a valid rule set enforced, the conflist entry
    /// present; otherwise why not.
    pub fn readiness(&self) -> Result<(), String> {
        for kind in ProgramKind::ALL {
            if !self.layout.program(kind).exists() {
                return Err(format!("{} is not pinned", kind.name()));
            }
        }
        for map in ALL_MAPS {
            if !self.layout.map(map).exists() {
                return Err(format!("map {map} is not pinned"));
            }
        }
        if let Some(who) = self.not_started.lock().expect("lock state").as_ref() {
            return Err(who.clone());
        }
        if self.staged.load(Ordering::Relaxed) {
            return Err(
                "upgrade staged: the replaced rule maps do not hold a valid rule set yet (the previous program keeps enforcing)".into(),
            );
        }
        // A valid rule set enforced in the pinned maps: synced by this daemon, or by a
        // previous one whose rules are still in force while the current files are rejected.
        if !self.synced_once.load(Ordering::Relaxed)
            && !egress_deny_datapath::events::rules_loaded(&self.layout).unwrap_or(false)
        {
            return Err("no valid rule set loaded yet".into());
        }
        if !conflist::present(&self.conf_dir) {
            return Err(format!(
                "no egress-deny entry in the primary CNI configuration in {}",
                self.conf_dir.display()
            ));
        }
        Ok(())
    }
}
