//! Moving attachments to the program in use: at every start (a freshly loaded program,
//! after an upgrade a new version) and when a staged program is promoted once its new
//! rule maps hold a valid rule set.
use std::{collections::HashSet, sync::atomic::Ordering};

use egress_deny_datapath::{
    attach::{self, AttachRequest, Hook},
    loader,
    order::{self, Verified},
    paths::{PinLayout, StateLayout, is_reorder_link_name},
    records::AttachmentRecord,
};

use super::Shared;
use crate::repair;

/// The staged program's maps now hold a valid rule set: make it the program in use and
/// move every attachment to it. On failure it stays staged (and not ready) and the next
/// successful sync tries again; the previous program keeps enforcing meanwhile.
pub(super) fn promote(shared: &Shared) {
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

/// Every start pins a freshly loaded program (after an upgrade, a new version): move
/// every attachment to it — pods from their records (TCX link update or cls_bpf filter
/// replace, both atomic), then every other pinned link (host interfaces, a pod whose
/// ADD died before writing its record) by a link update. Attachments whose pod is gone
/// are cleaned up.
pub(super) fn move_attachments_to_current_program(layout: &PinLayout, state: &StateLayout) {
    repair::clean_up_vanished(layout, state);
    let mut moved_pins = HashSet::new();
    for (_, record) in AttachmentRecord::list(state).unwrap_or_default() {
        let link_pin = record.link_pin_path(layout);
        let mode = record.mode;
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
        match order::ensure_first_and_current(layout, &pin) {
            Ok(Verified::Moved | Verified::Reordered) => {
                log::info!("moved {} to the program in use", pin.display())
            }
            Ok(Verified::InPlace | Verified::Gone | Verified::Restored) => {}
            Err(e) => log::warn!("re-attaching {}: {e}", pin.display()),
        }
    }
}
