//! Host interfaces (tc egress: the node's own traffic and what it forwards): attach to
//! the wanted ones, detach from the others, each the way it was made (`HostRecord`).
use egress_deny_datapath::{
    attach::{self, AttachMode, AttachRequest, Hook},
    iface,
    paths::{PinLayout, StateLayout, host_link_ifname},
    records::HostRecord,
};

use super::Shared;
use crate::{commands::run::RunArgs, node};

/// The host interfaces that should be filtered: attached, and not (with why).
#[derive(Default)]
pub(super) struct HostLinks {
    attached: Vec<String>,
    unfiltered: Vec<(String, String)>,
}

/// Attaches to the wanted host interfaces (tc egress), detaches from ones no longer
/// wanted, whatever the mode (each attachment has a host record: a cls_bpf filter has
/// no pin to find it by). Each failure is logged when it starts (or changes) and
/// reported in status.
pub(super) fn attach_host_interfaces(
    args: &RunArgs,
    layout: &PinLayout,
    state: &StateLayout,
    previous: &HostLinks,
) -> HostLinks {
    let wanted = node::host_interfaces(&args.host_interfaces);
    let mut now = HostLinks::default();
    for ifname in &wanted {
        let link_pin = layout.host_link(ifname);
        let req = AttachRequest {
            ifname,
            hook: Hook::Egress,
            link_pin: &link_pin,
            mode: AttachMode::forced_or_best(),
            exempt: false,
        };
        match attach::attach(layout, &req) {
            Ok(a) => {
                if !previous.attached.contains(ifname) {
                    log::info!(
                        "filtering host interface {ifname} (tc egress, {} program {})",
                        a.mode,
                        a.program_id
                    );
                }
                let record = HostRecord {
                    ifname: ifname.clone(),
                    ifindex: a.ifindex,
                    mode: a.mode,
                };
                if HostRecord::list(state).iter().all(|(_, r)| *r != record)
                    && let Err(e) = record.write(state)
                {
                    log::warn!("recording host interface {ifname}: {e}");
                }
                now.attached.push(ifname.clone());
            }
            Err(e) => {
                let why = e.to_string();
                if !previous
                    .unfiltered
                    .iter()
                    .any(|(i, w)| i == ifname && *w == why)
                {
                    log::error!("host interface {ifname} is NOT filtered: {why}");
                }
                now.unfiltered.push((ifname.clone(), why));
            }
        }
    }
    // Attachments to interfaces no longer wanted (or gone): recorded ones by their mode,
    // then pins without a record (older versions recorded none).
    for (path, record) in HostRecord::list(state) {
        if now.attached.contains(&record.ifname) {
            continue;
        }
        detach_host(layout, &record);
        let _ = std::fs::remove_file(path);
        if previous.attached.contains(&record.ifname) {
            log::info!(
                "host interface {} no longer filtered (gone or not a default route)",
                record.ifname
            );
        }
    }
    if let Ok(entries) = std::fs::read_dir(layout.links_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(ifname) = host_link_ifname(&name)
                && !now.attached.contains(&ifname)
            {
                let _ = attach::detach(None, Hook::Egress, &entry.path(), AttachMode::Tcx);
            }
        }
    }
    now
}

/// Removes one host attachment the way it was made. A cls_bpf filter is found by the
/// recorded name only while that name still has the recorded ifindex (a new interface
/// reusing the name is not ours to strip).
pub fn detach_host(layout: &PinLayout, record: &HostRecord) {
    let mode = record.mode;
    let still_ours = iface::ifindex(&record.ifname).is_ok_and(|i| i == record.ifindex);
    let ifname = still_ours.then_some(record.ifname.as_str());
    if let Err(e) = attach::detach(
        ifname,
        Hook::Egress,
        &layout.host_link(&record.ifname),
        mode,
    ) {
        log::warn!("detaching from host interface {}: {e}", record.ifname);
    }
}

/// Puts the host interfaces (filtered, and not with why) into status, saved when they
/// changed.
pub(super) fn set_host_interfaces(shared: &Shared, host_links: &HostLinks) {
    let mut status = shared.status.lock().expect("status");
    if status.host_interfaces != host_links.attached
        || status.host_interfaces_unfiltered != host_links.unfiltered
    {
        status.host_interfaces = host_links.attached.clone();
        status.host_interfaces_unfiltered = host_links.unfiltered.clone();
        status.save(&shared.state);
    }
}
