//! CHECK: the pod's host veth must carry the currently pinned program, attached the way
//! its record says. Fails when the attachment is missing or runs another program.
use egress_deny_datapath::{
    attach::{self, AttachMode, Hook, NETLINK_HANDLE, NETLINK_PRIORITY},
    iface, netlink,
    records::AttachmentRecord,
};

use crate::{Output, config::FailurePolicy, error::PluginError, pod, skel::Invocation};

pub fn run(inv: &Invocation) -> Output {
    let conf = inv.config();
    let prev = inv.prev_result().ok_or_else(|| {
        PluginError::InvalidConfig("egress-deny is a chained plugin: prevResult is required".into())
    })?;
    if conf.is_excluded(inv.pod_namespace()) {
        return Ok(None);
    }
    let layout = conf.pin_layout();
    if let Err(why) = pod::installed(&layout) {
        return match conf.failure_policy {
            FailurePolicy::Fail => Err(PluginError::NotReady(why)),
            FailurePolicy::Ignore => Ok(None),
        };
    }
    let netns = inv.netns.as_deref().expect("checked in skel");
    let veth = pod::host_veth(netns, &inv.ifname, Some(&prev))?;
    let id = conf.attachment_id(&inv.container_id, &inv.ifname);
    let (_, record) = AttachmentRecord::find(&conf.state_layout(), &id)
        .ok_or_else(|| PluginError::CheckFailed(format!("no attachment recorded for {id}")))?;
    if record.host_ifindex != veth.ifindex {
        return Err(PluginError::CheckFailed(format!(
            "recorded host veth ifindex {} but the pod's peer is {} ({})",
            record.host_ifindex, veth.ifindex, veth.ifname
        )));
    }
    let kind = iface::program_kind(&veth.ifname)
        .map_err(|e| PluginError::datapath("interface type", e))?;
    let (_, expected) = attach::pinned_program_fd(&layout, kind)
        .map_err(|e| PluginError::datapath("pinned program", e))?;

    match record.mode {
        AttachMode::Tcx => {
            let link_pin = record.link_pin_path(&layout);
            let state = attach::pinned_link_state(&link_pin)
                .map_err(|e| PluginError::datapath("reading the link", e))?
                .ok_or_else(|| {
                    PluginError::CheckFailed(format!(
                        "{} is missing: not attached",
                        link_pin.display()
                    ))
                })?;
            if state.ifindex != veth.ifindex
                || state.attach_type != attach::tcx_attach_type(Hook::Ingress)
            {
                return Err(PluginError::CheckFailed(format!(
                    "the link is not on {} ingress (ifindex {}, attach type {})",
                    veth.ifname, state.ifindex, state.attach_type
                )));
            }
            if state.prog_id != expected {
                return Err(PluginError::CheckFailed(format!(
                    "{} runs program {} instead of the pinned program {expected}",
                    veth.ifname, state.prog_id
                )));
            }
        }
        AttachMode::Netlink => {
            let filters = netlink::bpf_filters(veth.ifindex, Hook::Ingress)
                .map_err(|e| PluginError::datapath("listing tc filters", e))?;
            // Ours by (priority, handle): another prio-1 filter may be listed first.
            let ours = filters
                .iter()
                .find(|f| f.priority == NETLINK_PRIORITY && f.handle == NETLINK_HANDLE)
                .map(|f| f.program_id);
            match ours {
                None => {
                    return Err(PluginError::CheckFailed(format!(
                        "no egress-deny filter on {} ingress",
                        veth.ifname
                    )));
                }
                Some(id) if id != expected => {
                    return Err(PluginError::CheckFailed(format!(
                        "{} runs program {id} instead of the pinned program {expected}",
                        veth.ifname
                    )));
                }
                Some(_) => {}
            }
        }
    }
    Ok(None)
}
