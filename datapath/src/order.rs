//! Keeping every TCX attachment first on its hook and on the program in use. A program
//! attached ahead of ours (another CNI's, with `BPF_F_BEFORE`) that returns a final
//! verdict (pass, redirect) would skip us: nothing may run before the filter.
use std::{
    fs,
    os::fd::AsFd,
    path::Path,
    time::{Duration, Instant},
};

use crate::{
    attach::{
        self, AttachMode, AttachRequest, Hook, NETLINK_HANDLE, NETLINK_PRIORITY, pinned_link_state,
        pinned_program_fd,
    },
    error::{Error, Result},
    iface, loader, netlink,
    paths::{PROGRAM_EXEMPT, PinLayout, ProgramKind},
    sys,
};

/// How long a re-order waits for the replaced link to leave the hook.
const OLD_LINK_DETACH_TIMEOUT: Duration = Duration::from_secs(2);

/// Which of our programs a link runs (any version): by the name it was loaded with, so
/// that an exempt pod's link stays exempt when it is moved to a newer program.
pub fn running_kind(prog_id: u32, ifname: &str) -> Result<ProgramKind> {
    let name = sys::prog_name_by_id(prog_id)
        .map_err(|e| Error::io(format!("reading program {prog_id}"), e))?;
    // bpf_prog_info keeps 15 bytes of the name.
    let exempt = &PROGRAM_EXEMPT[..PROGRAM_EXEMPT.len().min(15)];
    if name == exempt {
        Ok(ProgramKind::Exempt)
    } else {
        iface::program_kind(ifname)
    }
}

/// What [`ensure_first_and_current`] found (and did).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verified {
    /// First on its hook, running the program in use.
    InPlace,
    /// Was running another program (an older version): moved by a link update.
    Moved,
    /// Another program ran ahead of ours: re-attached at the front.
    Reordered,
    /// No pin, or its interface is gone (cleaned up elsewhere).
    Gone,
    /// A cls_bpf filter that was missing (filter or clsact qdisc deleted): attached again.
    Restored,
}

/// Checks the pinned TCX link at `pin` and repairs it: the program in use, first on
/// its hook. Re-attaching at the front creates the new link before the old one goes
/// (the filter runs twice for a moment, never zero times). Not while an upgrade is
/// staged (the copy would read the staged maps).
pub fn ensure_first_and_current(layout: &PinLayout, pin: &Path) -> Result<Verified> {
    let Some(link) = pinned_link_state(pin)? else {
        return Ok(Verified::Gone);
    };
    if link.ifindex == 0 {
        return Ok(Verified::Gone);
    }
    let Ok(ifname) = iface::ifname(link.ifindex) else {
        return Ok(Verified::Gone);
    };
    let kind = running_kind(link.prog_id, &ifname)?;
    let (program, program_id) = pinned_program_fd(layout, kind)?;
    let mut outcome = Verified::InPlace;
    if link.prog_id != program_id {
        let fd =
            sys::obj_get(pin).map_err(|e| Error::io(format!("opening {}", pin.display()), e))?;
        sys::link_update(fd.as_fd(), program.as_fd())
            .map_err(|e| Error::io(format!("updating the link on {ifname}"), e))?;
        outcome = Verified::Moved;
    }
    let chain = sys::tcx_query(link.ifindex, link.attach_type)
        .map_err(|e| Error::io(format!("querying the tc programs of {ifname}"), e))?;
    if chain.link_ids.first() == Some(&link.id) {
        return Ok(outcome);
    }
    // TCX takes a program once per hook: a copy goes first, the old link goes, then the
    // new link switches to the program in use. Ours runs at every step.
    let copy = loader::load_copy(layout, kind)?;
    let front = sys::tcx_link_create(copy.as_fd(), link.ifindex, link.attach_type)
        .map_err(|e| Error::io(format!("re-attaching at the front of {ifname}"), e))?;
    // Pinned under a name no lister takes for an attachment, then renamed over the old
    // pin, which drops the old link (its last reference).
    let tmp = layout.reorder_link(link.id);
    sys::obj_pin(front.as_fd(), &tmp)
        .map_err(|e| Error::io(format!("pinning {}", tmp.display()), e))?;
    fs::rename(&tmp, pin).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(format!("replacing {}", pin.display()), e)
    })?;
    // The old link is detached when bpffs lets go of the replaced pin, after an RCU
    // grace period: until then the program in use is still on the hook and TCX refuses
    // it a second time (EEXIST). If this still fails the copy (same code, same maps)
    // keeps filtering and the next check moves the link.
    let deadline = Instant::now() + OLD_LINK_DETACH_TIMEOUT;
    loop {
        match sys::link_update(front.as_fd(), program.as_fd()) {
            Ok(()) => return Ok(Verified::Reordered),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(Error::io(format!("updating the link on {ifname}"), e)),
        }
    }
}

/// The cls_bpf (netlink mode) counterpart for an attachment on `ifname`'s `hook`: our
/// filter (fixed priority and handle) present and running the program in use, else
/// attached again (clsact re-created if it was deleted). Its position among other
/// filters of the same priority is not repaired: a filter cannot be moved without a
/// moment in which it is absent.
pub fn ensure_filter_present(
    layout: &PinLayout,
    ifname: &str,
    hook: Hook,
    exempt: bool,
) -> Result<Verified> {
    let ifindex = iface::ifindex(ifname)?;
    let kind = if exempt {
        ProgramKind::Exempt
    } else {
        iface::program_kind(ifname)?
    };
    let (_, expected) = pinned_program_fd(layout, kind)?;
    let ours = netlink::bpf_filters(ifindex, hook)?
        .into_iter()
        .find(|f| f.priority == NETLINK_PRIORITY && f.handle == NETLINK_HANDLE);
    if ours.as_ref().is_some_and(|f| f.program_id == expected) {
        return Ok(Verified::InPlace);
    }
    attach::attach(
        layout,
        &AttachRequest {
            ifname,
            hook,
            link_pin: Path::new(""),
            mode: AttachMode::Netlink,
            exempt,
        },
    )?;
    Ok(if ours.is_some() {
        Verified::Moved
    } else {
        Verified::Restored
    })
}
