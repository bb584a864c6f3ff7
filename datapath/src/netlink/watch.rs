//! Notifications about links and tc objects.
use std::{io, mem::size_of};

use super::wire::route_socket;

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
