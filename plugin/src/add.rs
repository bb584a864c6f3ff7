//! ADD: attach the pinned program to the pod's host-side veth (tc ingress) before the
//! pod runs, record the attachment, and pass prevResult through unchanged.
use egress_deny_datapath::{lifecycle, records::PodIdentity, settings};

use crate::{Output, config::FailurePolicy, error::PluginError, pod, skel::Invocation};

pub fn run(inv: &Invocation) -> Output {
    let conf = inv.config();
    let prev = inv.prev_result().ok_or_else(|| {
        PluginError::InvalidConfig("egress-deny is a chained plugin: prevResult is required".into())
    })?;
    let result = Ok(Some(prev.to_string()));

    let layout = conf.pin_layout();
    let excluded = conf.is_excluded(inv.pod_namespace());
    if excluded {
        // Not judged here; with the judged mark on, the exempt program marks its packets
        // so that a filtered host interface does not judge them either (the exemption
        // then holds off the node too). Never a reason to fail the pod.
        let marking = pod::installed(&layout).is_ok()
            && settings::read(&layout).is_ok_and(|s| s.judged_mark != 0);
        if !marking {
            log::info!(
                "{}: namespace {:?} is excluded, not filtering",
                inv.container_id,
                inv.pod_namespace()
            );
            return result;
        }
    } else if let Err(why) = pod::installed(&layout) {
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

    let id = conf.attachment_id(&inv.container_id, &inv.ifname);
    id.check_length().map_err(PluginError::InvalidEnvironment)?;
    let netns = inv.netns.as_deref().expect("checked in skel");
    let veth = pod::host_veth(netns, &inv.ifname, Some(&prev))?;
    let pod = PodIdentity {
        network: conf.name.clone(),
        container_id: inv.container_id.clone(),
        ifname: inv.ifname.clone(),
        netns: netns.display().to_string(),
        pod_namespace: inv.pod_namespace().map(str::to_owned),
        pod_name: inv.pod_name().map(str::to_owned),
    };
    let attached = lifecycle::attach_pod(
        &layout,
        &conf.state_layout(),
        pod,
        &veth,
        conf.attach_mode(),
        excluded,
    );
    let record = match attached {
        Ok(record) => record,
        Err(e) if excluded => {
            // Its traffic off the node is then judged at the uplink: filtered, not lost.
            log::warn!("{id}: excluded namespace, exempt program not attached: {e}");
            return result;
        }
        Err(e) => {
            return Err(PluginError::datapath(
                format!("attaching to {}", veth.ifname),
                e,
            ));
        }
    };
    log::info!(
        "{id}: attached{} to {} ingress (ifindex {}, {}, program {})",
        if excluded {
            " (excluded namespace: exempt)"
        } else {
            ""
        },
        record.host_ifname,
        record.host_ifindex,
        record.mode,
        record.program_id
    );
    result
}
