//! Finding a pod's host-side veth from inside the pod's network namespace.
use std::{fs::File, os::fd::AsFd, path::Path};

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
/// the current namespace. Errors when the pod interface is not a veth, or when its peer
/// lives in another namespace than ours: an ifindex is only meaningful in its own
/// namespace, and resolving a foreign one here would pick an unrelated interface.
pub fn host_side(netns: &Path, ifname: &str) -> Result<HostVeth> {
    if !netns.exists() {
        return Err(Error::Invalid(format!(
            "network namespace {} does not exist",
            netns.display()
        )));
    }
    let here = File::open("/proc/thread-self/ns/net")
        .map_err(|e| Error::io("opening the current network namespace", e))?;
    let (details, our_id) = {
        let _guard = NetnsGuard::enter(netns)?;
        // Link first: reporting the peer's namespace assigns it an id if it had none.
        let details = netlink::link_details(ifname)?;
        (details, netlink::netns_id(here.as_fd())?)
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
    if details.link_netnsid.is_none() || details.link_netnsid != our_id {
        return Err(Error::Invalid(format!(
            "the peer of {ifname} is not in this network namespace (pod sees it in netns id \
             {:?}, this namespace as {our_id:?}): run the plugin where the host-side veth is",
            details.link_netnsid
        )));
    }
    let host = iface::ifname(peer)?;
    Ok(HostVeth {
        ifname: host,
        ifindex: peer,
    })
}
