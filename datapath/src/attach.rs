//! Attaching the pinned program to interfaces so that the attachment outlives the
//! process that made it, and shares the pinned maps.
//!
//! - TCX (kernel >= 6.6): a bpf link, pinned under `<pinDir>/links/`. The pin keeps it
//!   attached; removing the pin detaches it. Re-attaching an existing pin to a newer
//!   program is an atomic link update.
//! - Netlink cls_bpf (older kernels, or forced): a direct-action filter on the clsact
//!   qdisc with a fixed priority/handle, deliberately leaked so that it stays.
use std::{
    fs, io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
};

use crate::{
    error::{Error, Result},
    iface,
    paths::{PinLayout, ProgramKind},
};

/// Netlink filter identity: fixed so that a later call can find, replace or remove it.
/// Priority 1 puts us ahead of filters installed with the default priority.
pub const NETLINK_PRIORITY: u16 = 1;
pub const NETLINK_HANDLE: u32 = 0xed01;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// Packets entering the host from the device: pod veths (host side).
    Ingress,
    /// Packets leaving the host through the device: host uplinks.
    Egress,
}

impl Hook {
    fn tc(self) -> TcAttachType {
        match self {
            Hook::Ingress => TcAttachType::Ingress,
            Hook::Egress => TcAttachType::Egress,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        }
    }
}

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

    /// TCX where the kernel has it (6.6+), netlink otherwise.
    pub fn best_available() -> Self {
        if kernel_has_tcx() {
            AttachMode::Tcx
        } else {
            AttachMode::Netlink
        }
    }
}

fn kernel_has_tcx() -> bool {
    let Ok(release) = fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
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

/// Attaches (or re-attaches) the pinned program. Idempotent: an existing attachment of
/// the current program is left as it is; one of an older program is moved atomically.
/// On failure nothing new stays attached.
pub fn attach(layout: &PinLayout, req: &AttachRequest<'_>) -> Result<Attachment> {
    let ifindex = iface::ifindex(req.ifname)?;
    let kind = iface::program_kind(req.ifname)?;
    let (mut program, program_id) = pinned_program(layout, kind)?;
    match req.mode {
        AttachMode::Tcx => attach_tcx(&mut program, program_id, ifindex, kind, req),
        AttachMode::Netlink => attach_netlink(&mut program, program_id, ifindex, kind, req),
    }
}

fn attach_tcx(
    program: &mut SchedClassifier,
    program_id: u32,
    ifindex: u32,
    kind: ProgramKind,
    req: &AttachRequest<'_>,
) -> Result<Attachment> {
    if let Some(info) = pinned_link_state(req.link_pin)? {
        if info.ifindex == ifindex && info.attach_type == tcx_attach_type(req.hook) {
            if info.prog_id != program_id {
                // Same interface, older program: swap atomically, no gap.
                let fd = open_link(req.link_pin)?.map(FdLink::from).ok_or_else(|| {
                    Error::NotInstalled {
                        path: req.link_pin.to_path_buf(),
                    }
                })?;
                let link = SchedClassifierLink::try_from(fd)
                    .map_err(|e| Error::link("converting TCX link", e))?;
                let id = program
                    .attach_to_link(link)
                    .map_err(|e| Error::program(format!("updating link on {}", req.ifname), e))?;
                // The pin still refers to the same link object; drop our handle only.
                let link = program
                    .take_link(id)
                    .map_err(|e| Error::program("taking link", e))?;
                std::mem::forget(link);
            }
            return Ok(Attachment {
                ifindex,
                kind,
                mode: AttachMode::Tcx,
                program_id,
                link_id: info.id,
            });
        }
        // Pinned link of a vanished or different interface (a reused name): replace it.
        remove_pin(req.link_pin)?;
    }
    let id = program
        .attach_with_options(
            req.ifname,
            req.hook.tc(),
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        )
        .map_err(|e| {
            Error::program(
                format!("attaching to {} {}", req.ifname, req.hook.as_str()),
                e,
            )
        })?;
    let link = program
        .take_link(id)
        .map_err(|e| Error::program("taking link", e))?;
    let link = FdLink::try_from(link).map_err(|e| Error::link("TCX link", e))?;
    let link_id = link
        .info()
        .map_err(|e| Error::link("reading link info", e))?
        .id();
    // If pinning fails the link is dropped here, which detaches it.
    link.pin(req.link_pin).map_err(|e| Error::Pin {
        path: req.link_pin.to_path_buf(),
        source: Box::new(e),
    })?;
    Ok(Attachment {
        ifindex,
        kind,
        mode: AttachMode::Tcx,
        program_id,
        link_id,
    })
}

fn attach_netlink(
    program: &mut SchedClassifier,
    program_id: u32,
    ifindex: u32,
    kind: ProgramKind,
    req: &AttachRequest<'_>,
) -> Result<Attachment> {
    if let Err(e) = tc::qdisc_add_clsact(req.ifname) {
        // EEXIST: the clsact qdisc is already there (ours or the primary CNI's).
        if !is_errno(&e, libc::EEXIST) {
            return Err(Error::program(
                format!("adding clsact qdisc to {}", req.ifname),
                aya::programs::ProgramError::from(e),
            ));
        }
    }
    let options = NlOptions {
        priority: NETLINK_PRIORITY,
        handle: TcHandle::from(NETLINK_HANDLE),
        classid: None,
    };
    let id = match program.attach_with_options(
        req.ifname,
        req.hook.tc(),
        TcAttachOptions::Netlink(options),
    ) {
        Ok(id) => id,
        Err(e) if is_errno(&e, libc::EEXIST) => {
            // Our filter is already there: replace it in place (atomic for packets).
            let link = SchedClassifierLink::attached(
                req.ifname,
                req.hook.tc(),
                NETLINK_PRIORITY,
                TcHandle::from(NETLINK_HANDLE),
                None,
            )
            .map_err(|e| Error::io(format!("interface {}", req.ifname), e))?;
            program
                .attach_to_link(link)
                .map_err(|e| Error::program(format!("replacing filter on {}", req.ifname), e))?
        }
        Err(e) => {
            return Err(Error::program(
                format!("attaching to {} {}", req.ifname, req.hook.as_str()),
                e,
            ));
        }
    };
    let link = program
        .take_link(id)
        .map_err(|e| Error::program("taking link", e))?;
    // Dropping the link would remove the filter; it must outlive this process.
    std::mem::forget(link);
    Ok(Attachment {
        ifindex,
        kind,
        mode: AttachMode::Netlink,
        program_id,
        link_id: 0,
    })
}

/// Detaches. Already gone (pin, link, interface or filter) is success.
pub fn detach(ifname: Option<&str>, hook: Hook, link_pin: &Path, mode: AttachMode) -> Result<()> {
    match mode {
        AttachMode::Tcx => remove_pin(link_pin),
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

fn remove_pin(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
    }
}

fn open_link(path: &Path) -> Result<Option<PinnedLink>> {
    if !path.exists() {
        return Ok(None);
    }
    PinnedLink::from_pin(path)
        .map(Some)
        .map_err(|e| Error::link(format!("opening {}", path.display()), e))
}

/// State of a pinned TCX link as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub id: u32,
    pub prog_id: u32,
    /// 0 once the interface is gone (the link is then defunct).
    pub ifindex: u32,
    pub attach_type: u32,
}

/// Reads a pinned TCX link; `None` when there is no pin.
pub fn pinned_link_state(path: &Path) -> Result<Option<LinkState>> {
    let fd = match obj_get(path) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("opening {}", path.display()), e)),
    };
    link_info(fd.as_fd()).map(Some)
}

/// BPF_OBJ_GET: an fd for any pinned object.
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    const BPF_OBJ_GET: libc::c_long = 7;
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // union bpf_attr for BPF_OBJ_GET: { pathname: u64, bpf_fd: u32, file_flags: u32 }.
    let mut attr = [0u64; 16];
    attr[0] = cpath.as_ptr() as u64;
    // SAFETY: attr outlives the call; pathname is a valid C string.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr) as u32,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
}

const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

pub fn tcx_attach_type(hook: Hook) -> u32 {
    match hook {
        Hook::Ingress => BPF_TCX_INGRESS,
        Hook::Egress => BPF_TCX_EGRESS,
    }
}

/// BPF_OBJ_GET_INFO_BY_FD on a link. aya's LinkInfo does not expose the TCX ifindex
/// (needed to tell a live link from one whose interface vanished).
fn link_info(fd: BorrowedFd<'_>) -> Result<LinkState> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // struct bpf_link_info: type, id, prog_id, then a union at offset 16 whose tcx
    // member is { ifindex, attach_type }. Larger-than-kernel buffers must be zeroed.
    let mut info = [0u32; 64];
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = [0u64; 16];
    let req = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: attr is large enough and zeroed beyond the fields we set; the kernel
    // writes at most info_len bytes into `info`.
    let ret = unsafe {
        std::ptr::write(attr.as_mut_ptr().cast::<InfoAttr>(), req);
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr) as u32,
        )
    };
    if ret < 0 {
        return Err(Error::io("reading link info", io::Error::last_os_error()));
    }
    Ok(LinkState {
        id: info[1],
        prog_id: info[2],
        ifindex: info[4],
        attach_type: info[5],
    })
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
