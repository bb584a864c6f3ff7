//! Finding a pod's host-side veth, and whether the installer's state is there.
use std::path::Path;

use egress_deny_datapath::{
    events, iface, netlink,
    netns::NetnsGuard,
    paths::{ALL_MAPS, PinLayout, ProgramKind},
};
use serde_json::Value;

use crate::error::PluginError;

/// The host side of the pod's veth, in the plugin's (the host's) namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVeth {
    pub ifname: String,
    pub ifindex: u32,
}

/// Reads the peer ifindex of `ifname` inside the pod namespace, then resolves it here.
/// Cross-checks with the host-side interfaces the primary plugin reported, if any.
pub fn host_veth(
    netns: &Path,
    ifname: &str,
    prev_result: Option<&Value>,
) -> Result<HostVeth, PluginError> {
    if !netns.exists() {
        return Err(PluginError::Other(format!(
            "network namespace {} does not exist",
            netns.display()
        )));
    }
    let details = {
        let _guard = NetnsGuard::enter(netns)
            .map_err(|e| PluginError::datapath("entering the pod namespace", e))?;
        netlink::link_details(ifname)
            .map_err(|e| PluginError::datapath(format!("looking up {ifname} in the pod"), e))?
    };
    if details.kind.as_deref() != Some("veth") {
        return Err(PluginError::InvalidConfig(format!(
            "{ifname} in the pod is a {:?} device, not a veth: egress-deny needs a host-side veth \
             (primary plugins such as bridge, ptp, Calico, Flannel)",
            details.kind.as_deref().unwrap_or("physical")
        )));
    }
    let peer = details
        .link
        .filter(|i| *i != 0)
        .ok_or_else(|| PluginError::Other(format!("{ifname} in the pod has no peer")))?;
    let host_ifname = iface::ifname(peer).map_err(|e| {
        PluginError::datapath(
            format!("the peer of {ifname} (ifindex {peer}) is not in this namespace"),
            e,
        )
    })?;

    let reported: Vec<&str> = prev_result
        .and_then(|p| p.get("interfaces"))
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter(|i| {
                    i.get("sandbox")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
                })
                .filter_map(|i| i.get("name").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    if !reported.is_empty() && !reported.contains(&host_ifname.as_str()) {
        // The kernel's answer decides; a mismatch is worth knowing about.
        log::warn!(
            "host-side veth {host_ifname} of {ifname} is not among the host interfaces in prevResult {reported:?}"
        );
    }
    Ok(HostVeth {
        ifname: host_ifname,
        ifindex: peer,
    })
}

/// Whether the installer has pinned the programs and maps.
pub fn installed(layout: &PinLayout) -> Result<(), String> {
    let missing = ProgramKind::ALL
        .iter()
        .map(|k| layout.program(*k))
        .chain(ALL_MAPS.iter().map(|m| layout.map(m)))
        .find(|p| !p.exists());
    if let Some(path) = missing {
        return Err(format!(
            "{} is missing (is egress-deny-installer running?)",
            path.display()
        ));
    }
    match events::rules_loaded(layout) {
        Ok(true) => Ok(()),
        Ok(false) => Err("the installer has not loaded a valid rule set yet".into()),
        Err(e) => Err(format!("reading the datapath config: {e}")),
    }
}
