//! The few bpf(2) commands attaching needs, as plain syscalls. Opening a pinned program
//! through aya runs its feature detection, which loads and verifies probe programs and
//! creates probe maps: work the CNI plugin must not do per pod (it only attaches what
//! the installer pinned), and time it should not spend on every ADD.
//!
//! Requests and replies use the kernel's own struct layouts as aya-obj generates them
//! from the UAPI headers, so no offset here is written by hand.
use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya_obj::generated::{
    BPF_F_BEFORE, bpf_attr, bpf_cmd, bpf_link_info, bpf_map_info, bpf_map_type, bpf_prog_info,
};

/// A zeroed kernel struct: the kernel requires every field a command does not use, and
/// anything past what it knows, to be zero.
fn zeroed<T: Copy>() -> T {
    // SAFETY: only used for the plain-data UAPI structs and unions below, for which
    // all-zero bytes is a valid (and the expected default) value.
    unsafe { std::mem::zeroed() }
}

fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: attr is a valid, writable, correctly sized bpf_attr for the duration of
    // the call; the pointers stored in it are kept alive by the callers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>() as u32,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn fd_from(ret: i64) -> OwnedFd {
    // SAFETY: the kernel returned a new fd that nobody else owns.
    unsafe { OwnedFd::from_raw_fd(ret as i32) }
}

fn raw(fd: BorrowedFd<'_>) -> u32 {
    fd.as_raw_fd() as u32
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// A kernel object name (`char[16]`, NUL-terminated) as a string.
fn c_name(name: &[core::ffi::c_char; 16]) -> String {
    let bytes: Vec<u8> = name.iter().map(|c| *c as u8).collect();
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// A name for the kernel: at most 15 bytes, NUL-terminated.
fn to_c_name(name: &str) -> [core::ffi::c_char; 16] {
    let mut out = [0; 16];
    for (slot, byte) in out.iter_mut().zip(name.bytes().take(15)) {
        *slot = byte as core::ffi::c_char;
    }
    out
}

/// BPF_OBJ_GET: an fd for a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let cpath = c_path(path)?;
    let mut attr: bpf_attr = zeroed();
    attr.__bindgen_anon_4.pathname = cpath.as_ptr() as u64;
    bpf(bpf_cmd::BPF_OBJ_GET, &mut attr).map(fd_from)
}

/// BPF_OBJ_PIN: pins `fd` at `path` (which must not exist).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let cpath = c_path(path)?;
    let mut attr: bpf_attr = zeroed();
    attr.__bindgen_anon_4.pathname = cpath.as_ptr() as u64;
    attr.__bindgen_anon_4.bpf_fd = raw(fd);
    bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr).map(drop)
}

/// BPF_OBJ_GET_INFO_BY_FD into `T` (`bpf_prog_info`, `bpf_map_info` or `bpf_link_info`;
/// the kernel fills what it knows of the size it is given).
fn obj_info<T: Copy>(fd: BorrowedFd<'_>) -> io::Result<T> {
    let mut info: T = zeroed();
    let mut attr: bpf_attr = zeroed();
    attr.info.bpf_fd = raw(fd);
    attr.info.info_len = std::mem::size_of::<T>() as u32;
    attr.info.info = (&mut info as *mut T) as u64;
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// The kernel ID of a program.
pub fn prog_id(fd: BorrowedFd<'_>) -> io::Result<u32> {
    Ok(obj_info::<bpf_prog_info>(fd)?.id)
}

/// BPF_LINK_CREATE for TCX: attaches `prog` to `ifindex` ahead of any other program.
/// The link lives as long as the returned fd or a pin of it.
pub fn tcx_link_create(
    prog: BorrowedFd<'_>,
    ifindex: u32,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr: bpf_attr = zeroed();
    attr.link_create.__bindgen_anon_1.prog_fd = raw(prog);
    attr.link_create.__bindgen_anon_2.target_ifindex = ifindex;
    attr.link_create.attach_type = attach_type;
    // Before everything: BPF_F_BEFORE with no relative fd or id.
    attr.link_create.flags = BPF_F_BEFORE;
    bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr).map(fd_from)
}

/// BPF_LINK_UPDATE: the link runs `prog` from now on (atomic for packets).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr: bpf_attr = zeroed();
    attr.link_update.link_fd = raw(link);
    attr.link_update.__bindgen_anon_1.new_prog_fd = raw(prog);
    bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// State of a link as the kernel reports it (TCX links: the interface and hook).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub prog_id: u32,
    /// 0 once the interface is gone (the link is then defunct).
    pub ifindex: u32,
    pub attach_type: u32,
}

/// BPF_OBJ_GET_INFO_BY_FD on a TCX link. aya's LinkInfo does not expose the TCX ifindex
/// (needed to tell a live link from one whose interface vanished).
pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let info: bpf_link_info = obj_info(fd)?;
    // SAFETY: reading the tcx member of a zero-initialised union the kernel filled:
    // for a TCX link it is the member the kernel wrote, for any other every bit
    // pattern is still a valid pair of u32s.
    let tcx = unsafe { info.__bindgen_anon_1.tcx };
    Ok(LinkInfo {
        id: info.id,
        prog_id: info.prog_id,
        ifindex: tcx.ifindex,
        attach_type: tcx.attach_type,
    })
}

/// The programs attached to one TCX hook, in the order they run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcxChain {
    pub prog_ids: Vec<u32>,
    /// The link of each program (0 for one attached without a link).
    pub link_ids: Vec<u32>,
}

/// BPF_PROG_QUERY on a TCX hook (`attach_type` BPF_TCX_INGRESS/EGRESS of `ifindex`).
pub fn tcx_query(ifindex: u32, attach_type: u32) -> io::Result<TcxChain> {
    // More than enough: mprog allows 64 programs per hook.
    const MAX: usize = 64;
    let mut prog_ids = [0u32; MAX];
    let mut link_ids = [0u32; MAX];
    let mut attr: bpf_attr = zeroed();
    attr.query.__bindgen_anon_1.target_ifindex = ifindex;
    attr.query.attach_type = attach_type;
    attr.query.prog_ids = prog_ids.as_mut_ptr() as u64;
    attr.query.__bindgen_anon_2.count = MAX as u32;
    attr.query.link_ids = link_ids.as_mut_ptr() as u64;
    bpf(bpf_cmd::BPF_PROG_QUERY, &mut attr)?;
    // SAFETY: the kernel wrote the count back into the field we set.
    let count = unsafe { attr.query.__bindgen_anon_2.count }.min(MAX as u32) as usize;
    Ok(TcxChain {
        prog_ids: prog_ids[..count].to_vec(),
        link_ids: link_ids[..count].to_vec(),
    })
}

/// The name a program was loaded with (`bpf_prog_info.name`: at most 15 bytes, so
/// longer function names are cut), found by its kernel ID.
pub fn prog_name_by_id(id: u32) -> io::Result<String> {
    let mut attr: bpf_attr = zeroed();
    attr.__bindgen_anon_6.__bindgen_anon_1.prog_id = id;
    let fd = bpf(bpf_cmd::BPF_PROG_GET_FD_BY_ID, &mut attr).map(fd_from)?;
    let info: bpf_prog_info = obj_info(fd.as_fd())?;
    Ok(c_name(&info.name))
}

/// BPF_MAP_CREATE of an array map with u32 keys.
pub fn array_map_create(
    name: &str,
    value_size: u32,
    max_entries: u32,
    flags: u32,
) -> io::Result<OwnedFd> {
    let mut attr: bpf_attr = zeroed();
    attr.__bindgen_anon_1.map_type = bpf_map_type::BPF_MAP_TYPE_ARRAY as u32;
    attr.__bindgen_anon_1.key_size = 4;
    attr.__bindgen_anon_1.value_size = value_size;
    attr.__bindgen_anon_1.max_entries = max_entries;
    attr.__bindgen_anon_1.map_flags = flags;
    attr.__bindgen_anon_1.map_name = to_c_name(name);
    bpf(bpf_cmd::BPF_MAP_CREATE, &mut attr).map(fd_from)
}

/// BPF_MAP_UPDATE_ELEM with `flags` (BPF_ANY = 0).
pub fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8], flags: u64) -> io::Result<()> {
    let mut attr: bpf_attr = zeroed();
    attr.__bindgen_anon_2.map_fd = raw(map);
    attr.__bindgen_anon_2.key = key.as_ptr() as u64;
    attr.__bindgen_anon_2.__bindgen_anon_1.value = value.as_ptr() as u64;
    attr.__bindgen_anon_2.flags = flags;
    bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// BPF_MAP_LOOKUP_ELEM into `value` (which must be the map's value size).
pub fn map_lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<()> {
    let mut attr: bpf_attr = zeroed();
    attr.__bindgen_anon_2.map_fd = raw(map);
    attr.__bindgen_anon_2.key = key.as_ptr() as u64;
    attr.__bindgen_anon_2.__bindgen_anon_1.value = value.as_mut_ptr() as u64;
    bpf(bpf_cmd::BPF_MAP_LOOKUP_ELEM, &mut attr).map(drop)
}

/// BPF_MAP_GET_FD_BY_ID.
pub fn map_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr: bpf_attr = zeroed();
    attr.__bindgen_anon_6.__bindgen_anon_1.map_id = id;
    bpf(bpf_cmd::BPF_MAP_GET_FD_BY_ID, &mut attr).map(fd_from)
}

/// BPF_MAP_FREEZE: no more writes from userspace (programs only read our tables).
pub fn map_freeze(map: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr: bpf_attr = zeroed();
    attr.__bindgen_anon_2.map_fd = raw(map);
    bpf(bpf_cmd::BPF_MAP_FREEZE, &mut attr).map(drop)
}

/// The leading fields of `struct bpf_map_info`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapInfo {
    pub map_type: u32,
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

pub fn map_info(map: BorrowedFd<'_>) -> io::Result<MapInfo> {
    let info: bpf_map_info = obj_info(map)?;
    Ok(MapInfo {
        map_type: info.type_,
        id: info.id,
        key_size: info.key_size,
        value_size: info.value_size,
        max_entries: info.max_entries,
        flags: info.map_flags,
    })
}

#[cfg(test)]
mod tests {
    use std::mem::offset_of;

    use aya_obj::generated::{
        bpf_attr__bindgen_ty_10, bpf_attr__bindgen_ty_14,
        bpf_link_info__bindgen_ty_1__bindgen_ty_12,
    };

    use super::*;

    #[test]
    fn names_are_cut_to_fifteen_bytes_and_nul_terminated() {
        let name = to_c_name("v4_table_next_generation");
        assert_eq!(name[15], 0);
        assert_eq!(c_name(&name), "v4_table_next_g");
        assert_eq!(c_name(&to_c_name("v6_table")), "v6_table");
        assert_eq!(c_name(&to_c_name("")), "");
    }

    #[test]
    fn a_name_without_a_nul_is_read_whole() {
        let full = [b'x' as core::ffi::c_char; 16];
        assert_eq!(c_name(&full), "x".repeat(16));
    }

    /// The offsets the kernel's `union bpf_attr` and `struct bpf_link_info` have had since
    /// TCX (6.6): a binding regenerated against other headers must keep them.
    #[test]
    fn request_layouts_match_the_kernel_abi() {
        assert!(std::mem::size_of::<bpf_attr>() >= 128);
        assert_eq!(offset_of!(bpf_attr__bindgen_ty_14, attach_type), 8);
        assert_eq!(offset_of!(bpf_attr__bindgen_ty_14, flags), 12);
        assert_eq!(offset_of!(bpf_attr__bindgen_ty_10, prog_ids), 16);
        assert_eq!(offset_of!(bpf_attr__bindgen_ty_10, __bindgen_anon_2), 24);
        assert_eq!(offset_of!(bpf_attr__bindgen_ty_10, link_ids), 40);
        assert_eq!(offset_of!(bpf_link_info, __bindgen_anon_1), 16);
        assert_eq!(
            offset_of!(bpf_link_info__bindgen_ty_1__bindgen_ty_12, attach_type),
            4
        );
        assert_eq!(offset_of!(bpf_prog_info, name), 64);
        assert_eq!(offset_of!(bpf_map_info, map_flags), 20);
    }
}
