//! ADD: attach the pinned program to the pod's host-side veth (tc ingress) before the
//! pod runs, record the attachment, and pass prevResult through unchanged.
use egress_deny_datapath::{
    attach::{self, AttachRequest, Hook},
    records::{AttachmentRecord, PodIdentity},
};

use crate::{Output, config::FailurePolicy, error::PluginError, pod, skel::Invocation};

pub fn run(inv: &Invocation) -> Output {
    let conf = inv.config();
    let prev = inv.prev_result().ok_or_else(|| {
        PluginError::InvalidConfig("egress-deny is a chained plugin: prevResult is required".into())
    })?;
    let result = Ok(Some(prev.to_string()));

    if conf.is_excluded(inv.pod_namespace()) {
        log::info!(
            "{}: namespace {:?} is excluded, not filtering",
            inv.container_id,
            inv.pod_namespace()
        );
        return result;
    }
    let layout = conf.pin_layout();
    if let Err(why) = pod::installed(&layout) {
        return match conf.failure_policy {
            FailurePolicy::Fail => Err(PluginError::NotReady(why)),
            FailurePolicy::Ignore => {
                log::warn!(
                    "{}: starting UNFILTERED (failurePolicy ignore): {why}",
                    inv.container_id
                );
                result
            }
        };
    }

    let netns = inv.netns.as_deref().expect("checked in skel");
    let veth = pod::host_veth(netns, &inv.ifname, Some(&prev))?;
    let link_pin = layout.pod_link(&inv.container_id, &inv.ifname);
    let mode = conf.attach_mode();
    let attachment = attach::attach(
        &layout,
        &AttachRequest {
            ifname: &veth.ifname,
            hook: Hook::Ingress,
            link_pin: &link_pin,
            mode,
        },
    )
    .map_err(|e| PluginError::datapath(format!("attaching to {}", veth.ifname), e))?;

    let pod = PodIdentity {
        container_id: inv.container_id.clone(),
        ifname: inv.ifname.clone(),
        netns: netns.display().to_string(),
        pod_namespace: inv.pod_namespace().map(str::to_owned),
        pod_name: inv.pod_name().map(str::to_owned),
    };
    let record = AttachmentRecord::new(pod, &veth, &attachment, &link_pin);
    if let Err(e) = record.write(&conf.state_layout()) {
        // Nothing half-done: without its record the installer could not account for it.
        let _ = attach::detach(
            Some(&veth.ifname),
            Hook::Ingress,
            &link_pin,
            attachment.mode,
        );
        return Err(PluginError::datapath("recording the attachment", e));
    }
    log::info!(
        "{}: attached {} to {} ingress ({}, program {})",
        inv.container_id,
        attachment.kind.name(),
        veth.ifname,
        attachment.mode.as_str(),
        attachment.program_id
    );
    result
}
