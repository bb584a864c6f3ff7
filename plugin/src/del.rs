//! DEL: best-effort and idempotent. Whatever is already gone (namespace, veth, link,
//! record) counts as removed; DEL twice, or without prevResult, succeeds.
use egress_deny_datapath::{
    attach::{self, AttachMode, Hook},
    counters::CounterMap,
    iface,
    records::AttachmentRecord,
};

use crate::{Output, skel::Invocation};

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
    // A cls_bpf filter is found by interface name. Only touch the interface if it is
    // still the one recorded: a new pod may reuse the name (Calico names veths by pod)
    // and an old sandbox's late DEL must not strip its filter.
    let host_ifname = record
        .as_ref()
        .filter(|r| iface::ifindex(&r.host_ifname).is_ok_and(|i| i == r.host_ifindex))
        .map(|r| r.host_ifname.as_str());
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
