//! The two rtnetlink queries aya does not offer: a link's kind and peer (to find a
//! pod's host-side veth from inside the pod's namespace) and the program IDs of cls_bpf
//! filters on an interface (to CHECK netlink-mode attachments). A socket belongs to the
//! namespace of the thread that created it.
use std::{io, mem::size_of};

use crate::{
    error::{Error, Result},
    hook::Hook,
};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_GETLINK: u16 = 18;
const RTM_NEWLINK: u16 = 16;
const RTM_GETTFILTER: u16 = 46;
const RTM_NEWTFILTER: u16 = 44;
const RTM_NEWNSID: u16 = 88;
const RTM_GETNSID: u16 = 90;
const NETNSA_NSID: u16 = 1;
const NETNSA_FD: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RTM_NEWQDISC: u16 = 36;
const NLA_F_NESTED: u16 = 0x8000;
const TCA_BPF_FD: u16 = 6;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_FLAGS: u16 = 8;
const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
const ETH_P_ALL: u16 = 0x0003;
const NLM_F_DUMP: u16 = 0x300;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_LINK_NETNSID: u16 = 37;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_ID: u16 = 11;
const TC_H_CLSACT: u32 = 0xffff_fff1;
const TC_H_MIN_INGRESS: u32 = 0xfff2;
const TC_H_MIN_EGRESS: u32 = 0xfff3;
const NLA_TYPE_MASK: u16 = 0x3fff;

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
fn parse_link(body: &[u8]) -> Option<LinkDetails> {
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
fn parse_nsid(replies: &[(u16, Vec<u8>)]) -> Option<i32> {
    let id = replies
        .iter()
        .filter(|(ty, body)| *ty == RTM_NEWNSID && body.len() >= 4)
        .flat_map(|(_, body)| attrs(&body[4..]))
        .find(|(ty, value)| *ty == NETNSA_NSID && value.len() >= 4)
        .map(|(_, value)| i32::from_ne_bytes(value[..4].try_into().unwrap()));
    // NETNSA_NSID_NOT_ASSIGNED is -1.
    id.filter(|id| *id >= 0)
}

fn clsact_parent(hook: Hook) -> u32 {
    let minor = match hook {
        Hook::Ingress => TC_H_MIN_INGRESS,
        Hook::Egress => TC_H_MIN_EGRESS,
    };
    (TC_H_CLSACT & 0xffff_0000) | (minor & 0x0000_ffff)
}

/// struct tcmsg { family u8, pad u8, pad u16, ifindex i32, handle u32, parent u32, info u32 }
fn tcmsg(ifindex: u32, handle: u32, parent: u32, info: u32) -> Vec<u8> {
    let mut msg = vec![0u8; 20];
    msg[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    msg[8..12].copy_from_slice(&handle.to_ne_bytes());
    msg[12..16].copy_from_slice(&parent.to_ne_bytes());
    msg[16..20].copy_from_slice(&info.to_ne_bytes());
    msg
}

/// Adds the clsact qdisc to `ifindex`; already there (ours or another CNI's) is fine.
pub fn add_clsact(ifindex: u32) -> Result<()> {
    let mut req = tcmsg(ifindex, TC_H_CLSACT & 0xffff_0000, TC_H_CLSACT, 0);
    push_attr(&mut req, TCA_KIND, b"clsact\0");
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    match request(RTM_NEWQDISC, flags, &req) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
            Err(Error::NoSuchInterface(format!("ifindex {ifindex}")))
        }
        Err(e) => Err(Error::io(format!("adding clsact to ifindex {ifindex}"), e)),
    }
}

/// Creates the direct-action cls_bpf filter (priority, handle) running `prog` on the
/// clsact hook, or replaces the program of the one already there in place (atomic for
/// packets). The filter stays until deleted: it does not depend on this process.
pub fn replace_bpf_filter(
    ifindex: u32,
    hook: Hook,
    priority: u16,
    handle: u32,
    prog: std::os::fd::BorrowedFd<'_>,
    name: &str,
) -> Result<()> {
    let info = (u32::from(priority) << 16) | u32::from(ETH_P_ALL.to_be());
    let mut req = tcmsg(ifindex, handle, clsact_parent(hook), info);
    push_attr(&mut req, TCA_KIND, b"bpf\0");
    let mut options = Vec::new();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&prog) as u32;
    push_attr(&mut options, TCA_BPF_FD, &fd.to_ne_bytes());
    push_attr(&mut options, TCA_BPF_NAME, &nul_terminated(name));
    push_attr(
        &mut options,
        TCA_BPF_FLAGS,
        &TCA_BPF_FLAG_ACT_DIRECT.to_ne_bytes(),
    );
    push_attr(&mut req, TCA_OPTIONS | NLA_F_NESTED, &options);
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    request(RTM_NEWTFILTER, flags, &req).map(drop).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENODEV) {
            Error::NoSuchInterface(format!("ifindex {ifindex}"))
        } else {
            Error::io(
                format!(
                    "adding the bpf filter to ifindex {ifindex} {}",
                    hook.as_str()
                ),
                e,
            )
        }
    })
}

/// One cls_bpf filter on a clsact hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BpfFilter {
    pub priority: u16,
    pub handle: u32,
    pub program_id: u32,
}

/// Program IDs of the cls_bpf filters on `ifindex`'s clsact hook, with their priority.
pub fn bpf_filter_program_ids(ifindex: u32, hook: Hook) -> Result<Vec<(u16, u32)>> {
    Ok(bpf_filters(ifindex, hook)?
        .into_iter()
        .map(|f| (f.priority, f.program_id))
        .collect())
}

/// The cls_bpf filters on `ifindex`'s clsact hook, in the kernel's (evaluation) order.
/// Filters of one priority share a classifier; its newest filter is listed (and runs)
/// first, so a filter is identified by (priority, handle), never by position.
pub fn bpf_filters(ifindex: u32, hook: Hook) -> Result<Vec<BpfFilter>> {
    let req = tcmsg(ifindex, 0, clsact_parent(hook), 0);
    let replies = match request(RTM_GETTFILTER, NLM_F_REQUEST | NLM_F_DUMP, &req) {
        Ok(replies) => replies,
        // No clsact qdisc (or no such device): no filters.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::ENOENT | libc::ENODEV)
            ) =>
        {
            return Ok(Vec::new());
        }
        Err(e) => return Err(Error::io(format!("RTM_GETTFILTER ifindex {ifindex}"), e)),
    };
    Ok(replies
        .iter()
        .filter(|(ty, _)| *ty == RTM_NEWTFILTER)
        .filter_map(|(_, body)| parse_bpf_filter(body))
        .collect())
}

/// An RTM_NEWTFILTER body (struct tcmsg, then attributes); `None` unless it is a cls_bpf
/// filter with a program.
fn parse_bpf_filter(body: &[u8]) -> Option<BpfFilter> {
    if body.len() < 20 {
        return None;
    }
    let handle = u32::from_ne_bytes(body[8..12].try_into().unwrap());
    let info = u32::from_ne_bytes(body[16..20].try_into().unwrap());
    let priority = (info >> 16) as u16;
    let mut is_bpf = false;
    let mut id = None;
    for (attr_ty, value) in attrs(&body[20..]) {
        match attr_ty {
            TCA_KIND => is_bpf = value.starts_with(b"bpf"),
            TCA_OPTIONS => {
                for (opt_ty, opt) in attrs(value) {
                    if opt_ty == TCA_BPF_ID && opt.len() >= 4 {
                        id = Some(u32::from_ne_bytes(opt[..4].try_into().unwrap()));
                    }
                }
            }
            _ => {}
        }
    }
    let program_id = id?;
    is_bpf.then_some(BpfFilter {
        priority,
        handle,
        program_id,
    })
}

fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn push_attr(buf: &mut Vec<u8>, ty: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len() + (align4(len) - len), 0);
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Iterates over netlink attributes (type with flag bits masked off, payload).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let value = &buf[4..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((ty, value))
    })
}

/// A NETLINK_ROUTE socket.
fn route_socket() -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: plain socket(2); wrapped in OwnedFd right away.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh fd we own.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

/// Sends one request and collects the reply messages (type, payload) until the answer
/// is complete. Kernel errors come back as io::Error with the errno.
fn request(msg_type: u16, flags: u16, payload: &[u8]) -> io::Result<Vec<(u16, Vec<u8>)>> {
    let fd = route_socket()?;
    let fd_raw = std::os::fd::AsRawFd::as_raw_fd(&fd);

    let total = NLMSG_HDRLEN + payload.len();
    let mut msg = Vec::with_capacity(total);
    msg.extend_from_slice(&(total as u32).to_ne_bytes());
    msg.extend_from_slice(&msg_type.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port: kernel assigns
    msg.extend_from_slice(payload);
    // SAFETY: sockaddr_nl zeroed = the kernel as destination.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: msg and addr outlive the call.
    let sent = unsafe {
        libc::sendto(
            fd_raw,
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }

    let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::recv(fd_raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some(end) = read_messages(&buf[..n as usize], &mut out) {
            return end.map(|()| out);
        }
        if !dump && !out.is_empty() {
            return Ok(out);
        }
    }
}

/// Appends the messages of one received datagram to `out`, up to a truncated one.
/// `Some` when the answer ends in it: NLMSG_DONE, an ACK, or the kernel's error.
fn read_messages(mut datagram: &[u8], out: &mut Vec<(u16, Vec<u8>)>) -> Option<io::Result<()>> {
    while datagram.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(datagram[0..4].try_into().unwrap()) as usize;
        let ty = u16::from_ne_bytes([datagram[4], datagram[5]]);
        if len < NLMSG_HDRLEN || len > datagram.len() {
            break;
        }
        let body = &datagram[NLMSG_HDRLEN..len];
        match ty {
            NLMSG_DONE => return Some(Ok(())),
            NLMSG_ERROR => {
                // A body too short for the errno cannot be an error report: an ACK.
                let errno = body
                    .get(0..4)
                    .map_or(0, |e| i32::from_ne_bytes(e.try_into().unwrap()));
                if errno != 0 {
                    return Some(Err(io::Error::from_raw_os_error(-errno)));
                }
                return Some(Ok(())); // ACK
            }
            _ => out.push((ty, body.to_vec())),
        }
        datagram = &datagram[align4(len).min(datagram.len())..];
    }
    None
}

/// A socket that receives the kernel's notifications about links and tc objects
/// (qdiscs, filters) of this network namespace: what the daemon re-verifies its
/// attachments on, rather than only on its tick.
pub struct ChangeWatch {
    fd: std::os::fd::OwnedFd,
}

impl ChangeWatch {
    pub fn open() -> io::Result<Self> {
        const RTMGRP_LINK: u32 = 0x1;
        const RTMGRP_TC: u32 = 0x8;
        let fd = route_socket()?;
        // SAFETY: sockaddr_nl zeroed, then the groups we want.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = RTMGRP_LINK | RTMGRP_TC;
        // SAFETY: addr outlives the call.
        let ret = unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                (&addr as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Blocks until at least one notification arrived (its content does not matter:
    /// the caller re-checks everything). An overrun (ENOBUFS) also counts as one.
    pub fn wait(&self) -> io::Result<()> {
        let mut buf = [0u8; 16 * 1024];
        // SAFETY: buf outlives the call.
        let n = unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOBUFS) && e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
