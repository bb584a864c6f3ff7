//! The lifecycle of a pod attachment (attach and record, find, tear down, collect
//! garbage) in one place. Plugin ADD/DEL/CHECK/GC and the installer's repair, clean-up
//! and uninstall all go through here, so the rules they must share (the mode from the
//! record, the name-reuse guard, legacy names, counters, network scoping) cannot drift.
use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

use crate::{
    attach::{self, AttachMode, AttachRequest, Hook},
    counters::CounterMap,
    error::{Error, Result, is_missing, remove_if_present},
    iface,
    paths::{AttachmentId, PinLayout, StateLayout, is_legacy_pod_link_name},
    records::{AttachmentRecord, PodIdentity},
    veth::HostVeth,
};

/// Attaches the pinned program to the pod's host veth (tc ingress) and records it.
/// Nothing half-done: if the record cannot be written the attachment is undone (without
/// its record nobody could account for it). An attachment an older version made for
/// the same pod under the legacy name is retired, so the pod is not filtered twice.
pub fn attach_pod(
    layout: &PinLayout,
    state: &StateLayout,
    pod: PodIdentity,
    host: &HostVeth,
    mode: AttachMode,
    exempt: bool,
) -> Result<AttachmentRecord> {
    let id = AttachmentId::new(&pod.network, &pod.container_id, &pod.ifname);
    id.check_length().map_err(Error::Invalid)?;
    let link_pin = layout.pod_link_for(&id);
    let attachment = attach::attach(
        layout,
        &AttachRequest {
            ifname: &host.ifname,
            hook: Hook::Ingress,
            link_pin: &link_pin,
            mode,
            exempt,
        },
    )?;
    let record = AttachmentRecord::new(pod, host, &attachment, &link_pin);
    if let Err(e) = record.write(state) {
        let _ = attach::detach(
            Some(&host.ifname),
            Hook::Ingress,
            &link_pin,
            attachment.mode,
        );
        return Err(match e {
            Error::Io { context, source } => Error::Io {
                context: format!("recording the attachment: {context}"),
                source,
            },
            other => other,
        });
    }
    retire_legacy(layout, state, &id);
    Ok(record)
}

/// Removes the legacy-named record and link of `id` (if the legacy record is really
/// this attachment's) once it has a current one. A cls_bpf filter has one fixed
/// handle per interface, so the new attachment replaced it already: only the record
/// and a stray pin go.
fn retire_legacy(layout: &PinLayout, state: &StateLayout, id: &AttachmentId) {
    let path = state.legacy_record(&id.container_id, &id.ifname);
    let Ok(record) = AttachmentRecord::read(&path) else {
        return;
    };
    if record.network.is_some()
        || record.container_id != id.container_id
        || record.ifname != id.ifname
    {
        return;
    }
    if let Err(e) = remove_if_present(&record.link_pin_path(layout)) {
        log::warn!("{id}: removing the legacy link pin: {e}");
    }
    let _ = AttachmentRecord::remove_file(&path);
}

/// The recorded host veth's name, if that name still belongs to the recorded interface.
/// Names get reused (Calico names a pod's veth after the pod, so a restarted pod gets
/// the same one); ifindexes are not reused soon. Detaching by a reused name would strip
/// the filter of the pod that now owns it.
pub fn recorded_host_ifname(record: &AttachmentRecord) -> Option<&str> {
    match iface::ifindex(&record.host_ifname) {
        Ok(index) if index == record.host_ifindex => Some(&record.host_ifname),
        Ok(_) => {
            log::info!(
                "{}: {} now belongs to another pod; its own interface is gone",
                record.container_id,
                record.host_ifname
            );
            None
        }
        Err(_) => None,
    }
}

/// Whether the recorded host veth is gone (the pod died without a DEL reaching us).
/// By ifindex: a reused name does not keep a dead attachment alive.
pub fn is_vanished(record: &AttachmentRecord) -> bool {
    iface::ifname(record.host_ifindex).is_err()
}

/// Tears down one recorded attachment: the filter or link (by the recorded mode, only
/// on the recorded interface), a stray pin, its counters, the record. Best-effort:
/// every step runs; the first error is returned after all of them.
pub fn tear_down(
    layout: &PinLayout,
    record_path: &Path,
    record: &AttachmentRecord,
    counters: &mut Option<CounterMap>,
) -> Result<()> {
    let mut first_error = None;
    let mode = record.mode;
    let link_pin = record.link_pin_path(layout);
    let host_ifname = recorded_host_ifname(record);
    if let Err(e) = attach::detach(host_ifname, Hook::Ingress, &link_pin, mode) {
        first_error.get_or_insert(e);
    }
    // A pin can outlive a record written by an older version or lost to a crash.
    if mode == AttachMode::Netlink
        && let Err(e) = remove_if_present(&link_pin)
    {
        first_error.get_or_insert(e);
    }
    if let Some(c) = counters.as_mut()
        && let Err(e) = c.remove(record.host_ifindex)
    {
        log::debug!("{}: removing counters: {e}", record.container_id);
    }
    if let Err(e) = AttachmentRecord::remove_file(record_path) {
        first_error.get_or_insert(e);
    }
    first_error.map_or(Ok(()), Err)
}

/// What DEL found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detached {
    /// A record (current or legacy name) described the attachment; it is torn down.
    WasRecorded,
    /// No record; stray pins of this attachment, if any, are removed.
    NothingRecorded,
}

/// DEL of one attachment, idempotent: its record under the current name and a legacy
/// one that is really this attachment's, then pins left without a record. A legacy pin
/// whose legacy record belongs to another attachment (the old names collide) is that
/// attachment's and stays.
pub fn detach_pod(layout: &PinLayout, state: &StateLayout, id: &AttachmentId) -> Result<Detached> {
    let mut counters = CounterMap::open(layout).ok();
    let mut first_error = None;
    let mut found = Detached::NothingRecorded;
    while let Some((path, record)) = AttachmentRecord::find(state, id) {
        found = Detached::WasRecorded;
        if let Err(e) = tear_down(layout, &path, &record, &mut counters) {
            log::warn!("{id}: {e}");
            // The record is gone unless removing it failed: then stop, not loop.
            if path.exists() {
                first_error.get_or_insert(e);
                break;
            }
        }
    }
    if let Err(e) = remove_if_present(&layout.pod_link_for(id)) {
        first_error.get_or_insert(e);
    }
    if !state.legacy_record(&id.container_id, &id.ifname).exists()
        && let Err(e) = remove_if_present(&layout.legacy_pod_link(&id.container_id, &id.ifname))
    {
        first_error.get_or_insert(e);
    }
    first_error.map_or(Ok(found), Err)
}

/// What GC did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub removed: usize,
    pub kept: usize,
}

/// GC of one network: removes that network's attachments (records, links, pins
/// without a record) that are not in `valid` (container ID, ifname). Other networks'
/// attachments are never touched: the runtime's list only speaks for this network.
/// Legacy records and pins carry no network: they go only once their interface is gone.
pub fn collect_garbage(
    layout: &PinLayout,
    state: &StateLayout,
    network: &str,
    valid: &HashSet<(String, String)>,
) -> Result<Collected> {
    let mut counters = CounterMap::open(layout).ok();
    let mut outcome = Collected::default();
    let is_valid = |cid: &str, ifname: &str| valid.contains(&(cid.to_owned(), ifname.to_owned()));
    let mut legacy_pins_in_use = HashSet::new();
    for (path, record) in AttachmentRecord::list(state)? {
        let ours = match &record.network {
            Some(n) => n == network,
            None => {
                legacy_pins_in_use.insert(record.link_pin_path(layout));
                false
            }
        };
        let stale = if ours {
            !is_valid(&record.container_id, &record.ifname)
        } else {
            record.network.is_none()
                && !is_valid(&record.container_id, &record.ifname)
                && is_vanished(&record)
        };
        if !stale {
            outcome.kept += usize::from(ours);
            continue;
        }
        if let Err(e) = tear_down(layout, &path, &record, &mut counters) {
            log::warn!("GC {}: {e}", record.container_id);
        }
        outcome.removed += 1;
    }
    // Pins without a record (lost to a crash between attach and record).
    let entries = match std::fs::read_dir(layout.links_dir()) {
        Ok(entries) => entries,
        Err(e) if is_missing(&e) => return Ok(outcome),
        Err(e) => {
            return Err(Error::io(
                format!("listing {}", layout.links_dir().display()),
                e,
            ));
        }
    };
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let pin = entry.path();
        let orphan = if let Some(id) = AttachmentId::parse_name(&name) {
            id.network == network
                && !is_valid(&id.container_id, &id.ifname)
                && !state.record_for(&id).exists()
        } else if is_legacy_pod_link_name(&name) {
            // Whose it is cannot be told from the name: only a defunct link goes.
            !legacy_pins_in_use.contains(&pin)
                && attach::pinned_link_state(&pin)
                    .ok()
                    .flatten()
                    .is_none_or(|link| link.ifindex == 0)
        } else {
            false
        };
        if orphan {
            match remove_if_present(&pin) {
                Ok(()) => outcome.removed += 1,
                Err(e) => log::warn!("GC: {e}"),
            }
        }
    }
    Ok(outcome)
}

/// Removes records, links and counters of attachments whose host veth is gone (the pod
/// was deleted without a DEL reaching us), on every network. Returns how many.
pub fn clean_up_vanished(layout: &PinLayout, state: &StateLayout) -> usize {
    let mut counters = CounterMap::open(layout).ok();
    let mut removed = 0;
    for (path, record) in AttachmentRecord::list(state).unwrap_or_default() {
        if !is_vanished(&record) {
            continue;
        }
        if let Err(e) = tear_down(layout, &path, &record, &mut counters) {
            log::warn!(
                "cleaning up vanished container {}: {e}",
                record.container_id
            );
        }
        log::info!(
            "cleaned up the attachment of vanished container {}",
            record.container_id
        );
        removed += 1;
    }
    removed
}

/// Tears down every recorded attachment (uninstall). Returns the records' paths that
/// could not be removed cleanly, with the error.
pub fn tear_down_all(layout: &PinLayout, state: &StateLayout) -> Vec<(PathBuf, Error)> {
    let mut counters = CounterMap::open(layout).ok();
    let mut failed = Vec::new();
    for (path, record) in AttachmentRecord::list(state).unwrap_or_default() {
        if let Err(e) = tear_down(layout, &path, &record, &mut counters) {
            failed.push((path, e));
        }
    }
    failed
}
