//! A "pod" and the "host" it sends into: two namespaces joined by a veth, for tests that
//! attach the program by hand to the host side. The host owns the test destinations on
//! its loopback, so whatever the kernel delivers as IP reaches a socket there.
use std::net::IpAddr;

use anyhow::{Context, Result};
use egress_deny_datapath::{
    attach::{self, AttachMode, AttachRequest, Attachment, Hook},
    iface,
    netns::NetnsGuard,
};

use crate::{Netns, PinDir};

pub struct PodHost {
    pub pod: Netns,
    pub host: Netns,
    /// The host side of the veth (where a pod's packets enter: tc ingress).
    pub host_veth: String,
}

/// Fixed MAC addresses of both ends, for tests that write their own frames.
pub struct Macs {
    pub host: [u8; 6],
    pub pod: [u8; 6],
}

impl PodHost {
    /// Namespaces named `<prefix>-pod-…`/`<prefix>-host-…`; pod 10.77.0.2 / fd77::2,
    /// host 10.77.0.1 / fd77::1 and every address of `destinations` (its default routes
    /// point there).
    pub fn new(prefix: &str, destinations: &[IpAddr], macs: Option<Macs>) -> Result<Self> {
        let pod = Netns::new(&format!("{prefix}-pod"))?;
        let host = Netns::new(&format!("{prefix}-host"))?;
        let host_veth = format!("{prefix}{}", &host.name[host.name.len() - 6..]);
        host.ip(&format!(
            "link add {host_veth} type veth peer name eth0 netns {}",
            pod.name
        ))?;
        if let Some(macs) = &macs {
            host.ip(&format!("link set {host_veth} address {}", mac(macs.host)))?;
            pod.ip(&format!("link set eth0 address {}", mac(macs.pod)))?;
        }
        host.ip(&format!("addr add 10.77.0.1/24 dev {host_veth}"))?;
        host.ip(&format!("addr add fd77::1/64 dev {host_veth} nodad"))?;
        host.ip(&format!("link set {host_veth} up"))?;
        for addr in destinations {
            let len = if addr.is_ipv4() { 32 } else { 128 };
            host.ip(&format!("addr add {addr}/{len} dev lo"))?;
        }
        pod.ip("addr add 10.77.0.2/24 dev eth0")?;
        pod.ip("addr add fd77::2/64 dev eth0 nodad")?;
        pod.ip("link set eth0 up")?;
        pod.ip("route add default via 10.77.0.1")?;
        pod.ip("-6 route add default via fd77::1")?;
        Ok(Self {
            pod,
            host,
            host_veth,
        })
    }
}

impl PodHost {
    /// Attaches `pins`' program to the host side's tc ingress (where the pod's packets
    /// enter the host), as the plugin does.
    pub fn attach_host_side(&self, pins: &PinDir, mode: AttachMode) -> Result<Attachment> {
        let _guard = NetnsGuard::enter(&self.host.path())?;
        let link_pin = pins.layout.host_link(&self.host_veth);
        attach::attach(
            &pins.layout,
            &AttachRequest {
                ifname: &self.host_veth,
                hook: Hook::Ingress,
                link_pin: &link_pin,
                mode,
                exempt: false,
            },
        )
        .context("attach")
    }

    /// The host side's ifindex (the key of its counters).
    pub fn host_ifindex(&self) -> Result<u32> {
        let _guard = NetnsGuard::enter(&self.host.path())?;
        Ok(iface::ifindex(&self.host_veth)?)
    }
}

/// `aa:bb:…` form of a MAC address.
pub fn mac(bytes: [u8; 6]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
