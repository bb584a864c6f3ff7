//! Interface lookups in the current network namespace.
use std::ffi::{CStr, CString};

use crate::{
    error::{Error, Result},
    paths::ProgramKind,
};

pub fn ifindex(name: &str) -> Result<u32> {
    let cname =
        CString::new(name).map_err(|_| Error::Invalid(format!("bad interface name {name:?}")))?;
    // SAFETY: valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        Err(Error::NoSuchInterface(name.to_owned()))
    } else {
        Ok(index)
    }
}

pub fn ifname(index: u32) -> Result<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf is IF_NAMESIZE bytes as the API requires.
    let ret = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if ret.is_null() {
        return Err(Error::NoSuchInterface(format!("ifindex {index}")));
    }
    // SAFETY: if_indextoname NUL-terminates on success.
    Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned())
}

/// ARPHRD types whose packets start at the IP header at tc: tun and wireguard (NONE),
/// ipip, ip6tnl, sit, GRE (not gretap, which is Ethernet), raw-IP modems.
const L3_LINK_TYPES: [u16; 7] = [
    0xFFFE, // ARPHRD_NONE
    768,    // ARPHRD_TUNNEL
    769,    // ARPHRD_TUNNEL6
    776,    // ARPHRD_SIT
    778,    // ARPHRD_IPGRE
    823,    // ARPHRD_IP6GRE
    519,    // ARPHRD_RAWIP
];
/// Ethernet framing: Ethernet itself and loopback (which carries an Ethernet header).
const ETHERNET_LINK_TYPES: [u16; 2] = [1 /* ARPHRD_ETHER */, 772 /* ARPHRD_LOOPBACK */];

/// Which program an interface needs, by its link type: Ethernet framing gets the
/// Ethernet program, the known L3 types the L3 program, anything else is refused (a
/// header we do not parse must not be judged as if it were IP). The ARPHRD type comes
/// from SIOCGIFHWADDR on a socket of the current network namespace (sysfs would show the
/// namespace it was mounted in, not ours).
pub fn program_kind(name: &str) -> Result<ProgramKind> {
    let link_type = link_type(name)?;
    if ETHERNET_LINK_TYPES.contains(&link_type) {
        Ok(ProgramKind::Ethernet)
    } else if L3_LINK_TYPES.contains(&link_type) {
        Ok(ProgramKind::L3)
    } else {
        Err(Error::UnsupportedLinkType {
            name: name.to_owned(),
            link_type,
        })
    }
}

/// The interface's ARPHRD_* link type.
fn link_type(name: &str) -> Result<u16> {
    if name.len() >= libc::IF_NAMESIZE {
        return Err(Error::Invalid(format!("interface name too long: {name:?}")));
    }
    // SAFETY: plain socket(2); the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Error::io("socket", std::io::Error::last_os_error()));
    }
    // SAFETY: ifreq is plain data; the name fits (checked above) and stays NUL-terminated.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills ifr_hwaddr of the ifreq we pass.
    let ret = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    let err = std::io::Error::last_os_error();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if ret < 0 {
        return Err(if err.raw_os_error() == Some(libc::ENODEV) {
            Error::NoSuchInterface(name.to_owned())
        } else {
            Error::io(format!("SIOCGIFHWADDR {name}"), err)
        });
    }
    // SAFETY: the union member written by SIOCGIFHWADDR.
    Ok(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family })
}
