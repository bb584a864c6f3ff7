//! The daemon's periodic check of every attachment (pods and host interfaces): a TCX
//! link still first on its hook and on the program in use; a cls_bpf filter still
//! there and on the program in use. Each repair is logged and counted
//! (`egress_deny_attachment_repairs_total`).
use std::sync::atomic::{AtomicU64, Ordering};

use egress_deny_datapath::{
    attach::{AttachMode, Hook},
    lifecycle,
    order::{Verified, ensure_filter_present, ensure_first_and_current},
    paths::{PinLayout, StateLayout, host_link_ifname, is_pod_link_name, is_reorder_link_name},
    records::{AttachmentRecord, HostRecord},
};

/// What made the daemon check: said in the log of each repair.
#[derive(Clone, Copy, Debug)]
pub enum Trigger {
    Tick,
    Notification,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Tick => "periodic check",
            Trigger::Notification => "on a link/tc notification",
        }
    }
}

pub fn attachments(layout: &PinLayout, state: &StateLayout, repairs: &AtomicU64, trigger: Trigger) {
    netlink_attachments(layout, state, repairs, trigger);
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
            // Logged before counted: whoever sees the count can find the log line.
            Ok(Verified::Reordered) => {
                log::warn!(
                    "another program was attached ahead of egress-deny ({name}); egress-deny is first again ({})",
                    trigger.as_str()
                );
                repairs.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Verified::Moved) => {
                log::info!("{name} ran an older program; moved to the one in use");
                repairs.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Verified::InPlace | Verified::Gone | Verified::Restored) => {}
            Err(e) => log::warn!("verifying {name}: {e}"),
        }
    }
}

/// cls_bpf attachments (kernels without TCX): present and on the program in use. A
/// deleted filter or clsact qdisc is attached again.
fn netlink_attachments(
    layout: &PinLayout,
    state: &StateLayout,
    repairs: &AtomicU64,
    trigger: Trigger,
) {
    let pods = AttachmentRecord::list(state)
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, r)| r.mode == AttachMode::Netlink)
        .filter_map(|(_, r)| {
            // Only while the name still has the recorded ifindex (names are reused).
            let ifname = lifecycle::recorded_host_ifname(&r)?.to_owned();
            Some((ifname, Hook::Ingress, r.exempt))
        });
    let hosts = HostRecord::list(state)
        .into_iter()
        .filter(|(_, r)| r.mode == AttachMode::Netlink)
        .filter(|(_, r)| {
            egress_deny_datapath::iface::ifindex(&r.ifname).is_ok_and(|i| i == r.ifindex)
        })
        .map(|(_, r)| (r.ifname, Hook::Egress, false));
    for (ifname, hook, exempt) in pods.chain(hosts) {
        match ensure_filter_present(layout, &ifname, hook, exempt) {
            Ok(Verified::Restored) => {
                log::warn!(
                    "the egress-deny filter on {ifname} {} was gone (filter or clsact deleted); attached again ({})",
                    hook.as_str(),
                    trigger.as_str()
                );
                repairs.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Verified::Moved) => {
                log::info!("{ifname} ran an older program; moved to the one in use");
                repairs.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => log::warn!("verifying the filter on {ifname}: {e}"),
        }
    }
}
