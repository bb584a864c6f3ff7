//! DEL: best-effort and idempotent. Whatever is already gone (namespace, veth, link,
//! record) counts as removed; DEL twice, or without prevResult, succeeds.
use egress_deny_datapath::{
    attach::{self, AttachMode, Hook},
    counters::CounterMap,
    records::AttachmentRecord,
};

use crate::{Output, pod, skel::Invocation};

pub fn run(inv: &Invocation) -> Output {
    let conf = inv.config();
    let layout = conf.pin_layout();
    let state = conf.state_layout();
    let record_path = state.attachment_record(&inv.container_id, &inv.ifname);
    let record = AttachmentRecord::read(&record_path).ok();
    let link_pin = layout.pod_link(&inv.container_id, &inv.ifname);

    let mode = match &record {
        Some(r) => AttachMode::parse(&r.mode).unwrap_or(AttachMode::Tcx),
        None => AttachMode::Tcx,
    };
    let host_ifname = record.as_ref().and_then(pod::recorded_host_ifname);
    if let Err(e) = attach::detach(host_ifname, Hook::Ingress, &link_pin, mode) {
        log::warn!("{}: detaching: {e}", inv.container_id);
    }
    // A pin can outlive a record written by an older version or lost to a crash.
    if mode == AttachMode::Netlink
        && let Err(e) = attach::detach(None, Hook::Ingress, &link_pin, AttachMode::Tcx)
    {
        log::warn!("{}: removing link pin: {e}", inv.container_id);
    }
    if let Some(record) = &record
        && let Ok(mut counters) = CounterMap::open(&layout)
        && let Err(e) = counters.remove(record.host_ifindex)
    {
        log::warn!("{}: removing counters: {e}", inv.container_id);
    }
    if let Err(e) = AttachmentRecord::remove(&state, &inv.container_id, &inv.ifname) {
        log::warn!("{}: removing attachment record: {e}", inv.container_id);
    }
    log::info!(
        "{}: detached ({})",
        inv.container_id,
        if record.is_some() {
            "was attached"
        } else {
            "nothing recorded"
        }
    );
    Ok(None)
}
