//! The daemon's periodic check of every TCX attachment (pods and host interfaces):
//! still first on its hook and on the program in use. Each repair is logged and counted
//! (`egress_deny_attachment_repairs_total`).
use std::sync::atomic::{AtomicU64, Ordering};

use egress_deny_datapath::{
    order::{Verified, ensure_first_and_current},
    paths::{PinLayout, host_link_ifname, is_pod_link_name, is_reorder_link_name},
};

pub fn attachments(layout: &PinLayout, repairs: &AtomicU64) {
    let Ok(entries) = std::fs::read_dir(layout.links_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_reorder_link_name(&name) {
            // Left by a daemon killed in the middle of a re-order (this thread makes
            // and renames its own before returning): a duplicate of an attachment.
            let _ = std::fs::remove_file(entry.path());
            continue;
        }
        if !is_pod_link_name(&name) && host_link_ifname(&name).is_none() {
            continue;
        }
        match ensure_first_and_current(layout, &entry.path()) {
            Ok(Verified::Reordered) => {
                repairs.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "another program was attached ahead of egress-deny ({name}); egress-deny is first again"
                );
            }
            Ok(Verified::Moved) => {
                repairs.fetch_add(1, Ordering::Relaxed);
                log::info!("{name} ran an older program; moved to the one in use");
            }
            Ok(Verified::InPlace | Verified::Gone) => {}
            Err(e) => log::warn!("verifying {name}: {e}"),
        }
    }
}
