//! GC: remove attachments (records and pinned links) the runtime no longer lists in
//! `cni.dev/valid-attachments`.
use std::collections::HashSet;

use egress_deny_datapath::{
    attach::{self, AttachMode, Hook},
    counters::CounterMap,
    paths::{is_pod_link_name, pod_link_name},
    records::AttachmentRecord,
};

use crate::{Output, error::PluginError, pod, skel::Invocation};

pub fn run(inv: &Invocation) -> Output {
    let conf = inv.config();
    let Some(valid) = &conf.valid_attachments else {
        // Without the runtime's list, removing anything would be a guess.
        log::warn!("GC without cni.dev/valid-attachments: nothing removed");
        return Ok(None);
    };
    let keep: HashSet<String> = valid
        .iter()
        .map(|a| pod_link_name(&a.container_id, &a.ifname))
        .collect();
    let layout = conf.pin_layout();
    let state = conf.state_layout();
    let mut counters = CounterMap::open(&layout).ok();
    let mut removed = 0;

    let records = AttachmentRecord::list(&state)
        .map_err(|e| PluginError::datapath("listing attachments", e))?;
    for (_, record) in records {
        if keep.contains(&pod_link_name(&record.container_id, &record.ifname)) {
            continue;
        }
        let link_pin = layout.pod_link(&record.container_id, &record.ifname);
        let mode = AttachMode::parse(&record.mode).unwrap_or(AttachMode::Tcx);
        let host_ifname = pod::recorded_host_ifname(&record);
        if let Err(e) = attach::detach(host_ifname, Hook::Ingress, &link_pin, mode) {
            log::warn!("GC {}: {e}", record.container_id);
        }
        if let Some(counters) = counters.as_mut() {
            let _ = counters.remove(record.host_ifindex);
        }
        let _ = AttachmentRecord::remove(&state, &record.container_id, &record.ifname);
        removed += 1;
    }
    // Pins without a record (lost to a crash between attach and record).
    if let Ok(entries) = std::fs::read_dir(layout.links_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_pod_link_name(&name) && !keep.contains(&name) {
                let _ = std::fs::remove_file(entry.path());
                removed += 1;
            }
        }
    }
    log::info!(
        "GC: removed {removed} stale attachment(s), kept {}",
        keep.len()
    );
    Ok(None)
}
