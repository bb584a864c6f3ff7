//! tc: the clsact qdisc and cls_bpf filters (attach in netlink mode, and list them).
use super::wire::{
    NLA_F_NESTED, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
    attrs, nul_terminated, push_attr, request,
};
use crate::{
    error::{Error, Result},
    hook::Hook,
};

pub(super) const RTM_GETTFILTER: u16 = 46;
pub(super) const RTM_NEWTFILTER: u16 = 44;
pub(super) const RTM_NEWQDISC: u16 = 36;
pub(super) const TCA_BPF_FD: u16 = 6;
pub(super) const TCA_BPF_NAME: u16 = 7;
pub(super) const TCA_BPF_FLAGS: u16 = 8;
pub(super) const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
pub(super) const ETH_P_ALL: u16 = 0x0003;
pub(super) const TCA_KIND: u16 = 1;
pub(super) const TCA_OPTIONS: u16 = 2;
pub(super) const TCA_BPF_ID: u16 = 11;
pub(super) const TC_H_CLSACT: u32 = 0xffff_fff1;
pub(super) const TC_H_MIN_INGRESS: u32 = 0xfff2;
pub(super) const TC_H_MIN_EGRESS: u32 = 0xfff3;

pub(super) fn clsact_parent(hook: Hook) -> u32 {
    let minor = match hook {
        Hook::Ingress => TC_H_MIN_INGRESS,
        Hook::Egress => TC_H_MIN_EGRESS,
    };
    (TC_H_CLSACT & 0xffff_0000) | (minor & 0x0000_ffff)
}

/// struct tcmsg { family u8, pad u8, pad u16, ifindex i32, handle u32, parent u32, info u32 }
pub(super) fn tcmsg(ifindex: u32, handle: u32, parent: u32, info: u32) -> Vec<u8> {
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
pub(super) fn parse_bpf_filter(body: &[u8]) -> Option<BpfFilter> {
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
