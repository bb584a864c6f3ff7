//! Finding a pod's host-side veth, and whether the installer's state is there.
use std::path::Path;

use egress_deny_datapath::{
    events,
    paths::{ALL_MAPS, PinLayout, ProgramKind},
    veth,
};
use serde_json::Value;

use crate::error::PluginError;

pub use egress_deny_datapath::veth::HostVeth;

/// The pod's host-side veth; cross-checked with the host-side interfaces the primary
/// plugin reported, if any (the kernel's answer decides; a mismatch is logged).
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
    let veth = veth::host_side(netns, ifname).map_err(|e| match e {
        egress_deny_datapath::Error::Invalid(msg) => PluginError::InvalidConfig(msg),
        other => PluginError::datapath(format!("finding the host side of {ifname}"), other),
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
    if !reported.is_empty() && !reported.contains(&veth.ifname.as_str()) {
        log::warn!(
            "host-side veth {} of {ifname} is not among the host interfaces in prevResult {reported:?}",
            veth.ifname
        );
    }
    Ok(veth)
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
