//! Finding a pod's host-side veth from inside the pod's network namespace.
use std::path::Path;

use crate::{
    error::{Error, Result},
    iface, netlink,
    netns::NetnsGuard,
};

/// The host side of a pod's veth, in the caller's (the host's) namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVeth {
    pub ifname: String,
    pub ifindex: u32,
}

/// Reads the peer ifindex of `ifname` inside `netns` (rtnetlink), then resolves it in
/// the current namespace. Errors when the pod interface is not a veth.
pub fn host_side(netns: &Path, ifname: &str) -> Result<HostVeth> {
    if !netns.exists() {
        return Err(Error::Invalid(format!(
            "network namespace {} does not exist",
            netns.display()
        )));
    }
    let details = {
        let _guard = NetnsGuard::enter(netns)?;
        netlink::link_details(ifname)?
    };
    if details.kind.as_deref() != Some("veth") {
        return Err(Error::Invalid(format!(
            "{ifname} in the pod is a {} device, not a veth: egress-deny needs a host-side veth \
             (primary plugins such as bridge, ptp, Calico, Flannel)",
            details.kind.as_deref().unwrap_or("physical")
        )));
    }
    let peer = details
        .link
        .filter(|i| *i != 0)
        .ok_or_else(|| Error::Invalid(format!("{ifname} in the pod has no peer")))?;
    let host = iface::ifname(peer)?;
    Ok(HostVeth {
        ifname: host,
        ifindex: peer,
    })
}
