//! Attaching the pinned program to interfaces so that the attachment outlives the
//! process that made it, and shares the pinned maps.
//!
//! - TCX (kernel >= 6.6): a bpf link, pinned under `<pinDir>/links/`. The pin keeps it
//!   attached; removing the pin detaches it. Re-attaching an existing pin to a newer
//!   program is an atomic link update.
//! - Netlink cls_bpf (older kernels, or forced): a direct-action filter on the clsact
//!   qdisc with a fixed priority/handle; it stays until deleted.
//!
//! Both open the pinned program with plain bpf(2) calls ([`crate::sys`]), not aya: the
//! CNI plugin runs this per pod and must not load (probe) programs or create maps.
use std::{
    fmt, fs, io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::Path,
};

use aya::programs::{
    SchedClassifier,
    tc::{SchedClassifierLink, TcHandle},
};
use aya_obj::generated::bpf_attach_type;
use serde::{Deserialize, Serialize};

pub use crate::hook::Hook;
use crate::{
    error::{Error, Result, is_missing, missing_is_not_installed, remove_if_present},
    iface, netlink,
    paths::{PinLayout, ProgramKind},
    sys,
};

/// Netlink filter identity: fixed so that a later call can find, replace or remove it.
/// Priority 1 puts us ahead of filters installed with the default priority.
pub const NETLINK_PRIORITY: u16 = 1;
pub const NETLINK_HANDLE: u32 = 0xed01;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    Tcx,
    Netlink,
}

impl AttachMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Tcx => "tcx",
            AttachMode::Netlink => "netlink",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tcx" => Some(AttachMode::Tcx),
            "netlink" | "cls_bpf" => Some(AttachMode::Netlink),
            _ => None,
        }
    }

    /// `EGRESS_DENY_ATTACH_MODE` (`tcx`, `netlink`) when set — how tests exercise the
    /// cls_bpf fallback on a kernel with TCX — else [`Self::best_available`].
    pub fn forced_or_best() -> Self {
        Self::forced().unwrap_or_else(Self::best_available)
    }

    /// `EGRESS_DENY_ATTACH_MODE`, when set to a mode this version knows.
    pub fn forced() -> Option<Self> {
        std::env::var("EGRESS_DENY_ATTACH_MODE")
            .ok()
            .and_then(|m| Self::parse(&m))
    }

    /// TCX where the kernel has it (6.6+), netlink otherwise.
    pub fn best_available() -> Self {
        if kernel_has_tcx() {
            AttachMode::Tcx
        } else {
            AttachMode::Netlink
        }
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// In records as `"tcx"` / `"netlink"`, the strings earlier versions wrote.
impl Serialize for AttachMode {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for AttachMode {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let mode = String::deserialize(deserializer)?;
        // A mode this version does not know is handled as TCX (a pinned link), as
        // before the field was typed: the record stays readable and its pod cleanable.
        Ok(Self::parse(&mode).unwrap_or(AttachMode::Tcx))
    }
}

fn kernel_has_tcx() -> bool {
    fs::read_to_string("/proc/sys/kernel/osrelease").is_ok_and(|release| release_has_tcx(&release))
}

/// Whether a kernel release (`/proc/sys/kernel/osrelease`) is 6.6 or later; one that
/// does not parse counts as older.
fn release_has_tcx(release: &str) -> bool {
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 6)
}

/// Where and how to attach.
#[derive(Clone, Copy, Debug)]
pub struct AttachRequest<'a> {
    pub ifname: &'a str,
    pub hook: Hook,
    /// Pin path of the TCX link (ignored in netlink mode).
    pub link_pin: &'a Path,
    pub mode: AttachMode,
    /// A pod of an excluded namespace: the exempt program (mark, no lookup) rather than
    /// the one the interface's link type needs.
    pub exempt: bool,
}

/// What was attached, for records and later checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub ifindex: u32,
    pub kind: ProgramKind,
    pub mode: AttachMode,
    pub program_id: u32,
    /// TCX link ID (0 in netlink mode).
    pub link_id: u32,
}

/// Opens the pinned program an interface of this kind needs.
pub fn pinned_program(layout: &PinLayout, kind: ProgramKind) -> Result<(SchedClassifier, u32)> {
    let path = layout.program(kind);
    if !path.exists() {
        return Err(Error::NotInstalled { path });
    }
    let program = SchedClassifier::from_pin(&path)
        .map_err(|e| Error::program(format!("opening {}", path.display()), e))?;
    let id = program
        .info()
        .map_err(|e| Error::program("reading program info", e))?
        .id();
    Ok((program, id))
}

/// The pinned program's fd and kernel ID, opened without aya (see [`crate::sys`]: no
/// feature probing, so no probe programs loaded or maps created).
pub fn pinned_program_fd(layout: &PinLayout, kind: ProgramKind) -> Result<(OwnedFd, u32)> {
    let path = layout.program(kind);
    let fd = sys::obj_get(&path).map_err(|e| missing_is_not_installed(&path, e))?;
    let id = sys::prog_id(fd.as_fd())
        .map_err(|e| Error::io(format!("reading program info of {}", path.display()), e))?;
    Ok((fd, id))
}

/// Attaches (or re-attaches) the pinned program. Idempotent: an existing attachment of
/// the current program is left as it is; one of an older program is moved atomically.
/// On failure nothing new stays attached.
pub fn attach(layout: &PinLayout, req: &AttachRequest<'_>) -> Result<Attachment> {
    let ifindex = iface::ifindex(req.ifname)?;
    let kind = if req.exempt {
        ProgramKind::Exempt
    } else {
        iface::program_kind(req.ifname)?
    };
    let (program, program_id) = pinned_program_fd(layout, kind)?;
    let attached = Attachment {
        ifindex,
        kind,
        mode: req.mode,
        program_id,
        link_id: 0,
    };
    match req.mode {
        AttachMode::Tcx => {
            let link_id = attach_tcx(program.as_fd(), program_id, ifindex, req)?;
            Ok(Attachment {
                link_id,
                ..attached
            })
        }
        AttachMode::Netlink => {
            netlink::add_clsact(ifindex)?;
            // Create-or-replace with our fixed priority/handle: a re-ADD or an upgrade
            // swaps the program in place. The filter outlives this process.
            netlink::replace_bpf_filter(
                ifindex,
                req.hook,
                NETLINK_PRIORITY,
                NETLINK_HANDLE,
                program.as_fd(),
                kind.name(),
            )?;
            Ok(attached)
        }
    }
}

/// Returns the link ID.
fn attach_tcx(
    program: BorrowedFd<'_>,
    program_id: u32,
    ifindex: u32,
    req: &AttachRequest<'_>,
) -> Result<u32> {
    let pin = req.link_pin;
    if let Some(info) = pinned_link_state(pin)? {
        if info.ifindex == ifindex && info.attach_type == tcx_attach_type(req.hook) {
            if info.prog_id != program_id {
                // Same interface, older program: swap atomically, no gap.
                let link = sys::obj_get(pin)
                    .map_err(|e| Error::io(format!("opening {}", pin.display()), e))?;
                sys::link_update(link.as_fd(), program)
                    .map_err(|e| Error::io(format!("updating the link on {}", req.ifname), e))?;
            }
            return Ok(info.id);
        }
        // Pinned link of a vanished or different interface (a reused name): replace it.
        remove_if_present(pin)?;
    }
    let link = sys::tcx_link_create(program, ifindex, tcx_attach_type(req.hook)).map_err(|e| {
        Error::io(
            format!("attaching to {} {}", req.ifname, req.hook.as_str()),
            e,
        )
    })?;
    let link_id = link_info(link.as_fd())?.id;
    // If pinning fails the link's only fd closes here, which detaches it.
    sys::obj_pin(link.as_fd(), pin)
        .map_err(|e| Error::io(format!("pinning {}", pin.display()), e))?;
    Ok(link_id)
}

/// Detaches. Already gone (pin, link, interface or filter) is success.
pub fn detach(ifname: Option<&str>, hook: Hook, link_pin: &Path, mode: AttachMode) -> Result<()> {
    match mode {
        AttachMode::Tcx => remove_if_present(link_pin),
        AttachMode::Netlink => {
            let Some(ifname) = ifname else { return Ok(()) };
            let link = match SchedClassifierLink::attached(
                ifname,
                hook.tc(),
                NETLINK_PRIORITY,
                TcHandle::from(NETLINK_HANDLE),
                None,
            ) {
                Ok(link) => link,
                Err(_) => return Ok(()), // interface gone: so is its filter
            };
            match aya::programs::links::Link::detach(link) {
                Ok(()) => Ok(()),
                Err(e)
                    if is_errno(&e, libc::ENOENT)
                        || is_errno(&e, libc::ENODEV)
                        || is_errno(&e, libc::EINVAL) =>
                {
                    Ok(())
                }
                Err(e) => Err(Error::program(format!("detaching filter from {ifname}"), e)),
            }
        }
    }
}

/// State of a pinned TCX link as the kernel reports it.
pub type LinkState = sys::LinkInfo;

/// Reads a pinned TCX link; `None` when there is no pin.
pub fn pinned_link_state(path: &Path) -> Result<Option<LinkState>> {
    let fd = match sys::obj_get(path) {
        Ok(fd) => fd,
        Err(e) if is_missing(&e) => return Ok(None),
        Err(e) => return Err(Error::io(format!("opening {}", path.display()), e)),
    };
    link_info(fd.as_fd()).map(Some)
}

pub fn tcx_attach_type(hook: Hook) -> u32 {
    match hook {
        Hook::Ingress => bpf_attach_type::BPF_TCX_INGRESS as u32,
        Hook::Egress => bpf_attach_type::BPF_TCX_EGRESS as u32,
    }
}

fn link_info(fd: BorrowedFd<'_>) -> Result<LinkState> {
    sys::link_info(fd).map_err(|e| Error::io("reading link info", e))
}

fn is_errno<E: std::error::Error + 'static>(err: &E, errno: i32) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && io.raw_os_error() == Some(errno)
        {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests;
