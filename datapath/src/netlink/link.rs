//! Links: an interface's kind and veth peer, and namespace ids.
use super::wire::{NLM_F_REQUEST, attrs, nul_terminated, push_attr, request};
use crate::error::{Error, Result};

pub(super) const RTM_GETLINK: u16 = 18;
pub(super) const RTM_NEWLINK: u16 = 16;
pub(super) const RTM_NEWNSID: u16 = 88;
pub(super) const RTM_GETNSID: u16 = 90;
pub(super) const NETNSA_NSID: u16 = 1;
pub(super) const NETNSA_FD: u16 = 3;
pub(super) const IFLA_IFNAME: u16 = 3;
pub(super) const IFLA_LINK: u16 = 5;
pub(super) const IFLA_LINKINFO: u16 = 18;
pub(super) const IFLA_INFO_KIND: u16 = 1;
pub(super) const IFLA_LINK_NETNSID: u16 = 37;

/// What rtnetlink says about one interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkDetails {
    pub ifindex: u32,
    /// `IFLA_INFO_KIND`: "veth", "bridge", … (`None` for physical devices).
    pub kind: Option<String>,
    /// `IFLA_LINK`: for a veth, its peer's ifindex (in the peer's namespace).
    pub link: Option<u32>,
    /// `IFLA_LINK_NETNSID`: set when the peer lives in another namespace.
    pub link_netnsid: Option<i32>,
}

/// Looks `ifname` up in the current thread's network namespace.
pub fn link_details(ifname: &str) -> Result<LinkDetails> {
    let mut req = Vec::with_capacity(64);
    // struct ifinfomsg { family u8, pad u8, type u16, index i32, flags u32, change u32 }
    req.extend_from_slice(&[0u8; 16]);
    push_attr(&mut req, IFLA_IFNAME, &nul_terminated(ifname));
    let replies = request(RTM_GETLINK, NLM_F_REQUEST, &req).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENODEV) {
            Error::NoSuchInterface(ifname.to_owned())
        } else {
            Error::io(format!("RTM_GETLINK {ifname}"), e)
        }
    })?;
    let (_, body) = replies
        .iter()
        .find(|(ty, _)| *ty == RTM_NEWLINK)
        .ok_or_else(|| Error::NoSuchInterface(ifname.to_owned()))?;
    parse_link(body).ok_or_else(|| Error::Invalid("short RTM_NEWLINK".into()))
}

/// An RTM_NEWLINK body: struct ifinfomsg, then attributes. `None` when too short.
pub(super) fn parse_link(body: &[u8]) -> Option<LinkDetails> {
    if body.len() < 16 {
        return None;
    }
    let mut details = LinkDetails {
        ifindex: i32::from_ne_bytes(body[4..8].try_into().unwrap()) as u32,
        ..Default::default()
    };
    for (ty, value) in attrs(&body[16..]) {
        match ty {
            IFLA_LINK if value.len() >= 4 => {
                details.link = Some(u32::from_ne_bytes(value[..4].try_into().unwrap()))
            }
            IFLA_LINK_NETNSID if value.len() >= 4 => {
                details.link_netnsid = Some(i32::from_ne_bytes(value[..4].try_into().unwrap()))
            }
            IFLA_LINKINFO => {
                for (inner_ty, inner) in attrs(value) {
                    if inner_ty == IFLA_INFO_KIND {
                        let kind = inner.split(|b| *b == 0).next().unwrap_or_default();
                        details.kind = Some(String::from_utf8_lossy(kind).into_owned());
                    }
                }
            }
            _ => {}
        }
    }
    Some(details)
}

/// The id the current thread's namespace uses for the namespace `ns` refers to (the
/// ids `IFLA_LINK_NETNSID` reports); `None` when it has not assigned one.
pub fn netns_id(ns: std::os::fd::BorrowedFd<'_>) -> Result<Option<i32>> {
    // struct rtgenmsg { family u8 }, padded to 4 bytes, then NETNSA_FD.
    let mut req = vec![0u8; 4];
    let fd = std::os::fd::AsRawFd::as_raw_fd(&ns) as u32;
    push_attr(&mut req, NETNSA_FD, &fd.to_ne_bytes());
    let replies =
        request(RTM_GETNSID, NLM_F_REQUEST, &req).map_err(|e| Error::io("RTM_GETNSID", e))?;
    Ok(parse_nsid(&replies))
}

/// The assigned id in RTM_NEWNSID replies (struct rtgenmsg padded to 4, attributes).
pub(super) fn parse_nsid(replies: &[(u16, Vec<u8>)]) -> Option<i32> {
    let id = replies
        .iter()
        .filter(|(ty, body)| *ty == RTM_NEWNSID && body.len() >= 4)
        .flat_map(|(_, body)| attrs(&body[4..]))
        .find(|(ty, value)| *ty == NETNSA_NSID && value.len() >= 4)
        .map(|(_, value)| i32::from_ne_bytes(value[..4].try_into().unwrap()));
    // NETNSA_NSID_NOT_ASSIGNED is -1.
    id.filter(|id| *id >= 0)
}
