//! The rtnetlink wire format: messages and attributes, and one request/reply exchange
//! on a fresh NETLINK_ROUTE socket.
use std::{io, mem::size_of};

pub(super) const NLMSG_HDRLEN: usize = 16;
pub(super) const NLMSG_ERROR: u16 = 2;
pub(super) const NLMSG_DONE: u16 = 3;
pub(super) const NLM_F_REQUEST: u16 = 1;
pub(super) const NLM_F_ACK: u16 = 4;
pub(super) const NLM_F_REPLACE: u16 = 0x100;
pub(super) const NLM_F_EXCL: u16 = 0x200;
pub(super) const NLM_F_CREATE: u16 = 0x400;
pub(super) const NLM_F_DUMP: u16 = 0x300;
pub(super) const NLA_F_NESTED: u16 = 0x8000;
pub(super) const NLA_TYPE_MASK: u16 = 0x3fff;

pub(super) fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

pub(super) fn push_attr(buf: &mut Vec<u8>, ty: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len() + (align4(len) - len), 0);
}

pub(super) fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Iterates over netlink attributes (type with flag bits masked off, payload).
pub(super) fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
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
pub(super) fn route_socket() -> io::Result<std::os::fd::OwnedFd> {
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
pub(super) fn request(
    msg_type: u16,
    flags: u16,
    payload: &[u8],
) -> io::Result<Vec<(u16, Vec<u8>)>> {
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
pub(super) fn read_messages(
    mut datagram: &[u8],
    out: &mut Vec<(u16, Vec<u8>)>,
) -> Option<io::Result<()>> {
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
