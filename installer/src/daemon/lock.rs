//! One daemon per node: an `flock` on the state dir's lock file, waited for while
//! another daemon holds it.
use std::{
    io::{self, Write},
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use anyhow::{Context, Result};
use egress_deny_datapath::paths::StateLayout;

use super::Shared;

/// Takes the node-wide daemon lock (`flock` on the state dir's lock file), waiting while
/// another daemon holds it: a hand-run next to the DaemonSet's, or a rollout with
/// `maxSurge`, where the new daemon takes over the moment the old one exits. `None` when
/// stopped (SIGTERM) while waiting.
pub(super) fn node_lock(
    state: &StateLayout,
    shared: &Shared,
    cancel: &AtomicBool,
) -> Result<Option<std::fs::File>> {
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
