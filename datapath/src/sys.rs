//! The few bpf(2) commands attaching needs, as plain syscalls. Opening a pinned program
//! through aya runs its feature detection, which loads and verifies probe programs and
//! creates probe maps: work the CNI plugin must not do per pod (it only attaches what
//! the installer pinned), and time it should not spend on every ADD.
use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_MAP_FREEZE: libc::c_long = 22;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// TCX ordering: before `relative_fd`, which 0 makes "before everything".
const BPF_F_BEFORE: u32 = 1 << 3;

/// `union bpf_attr` as 128 zeroed bytes; each command reads its own leading fields and
/// the kernel requires anything past what it knows to be zero.
type Attr = [u64; 16];

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: attr is a valid, writable, correctly sized bpf_attr for the duration of
    // the call; the pointers stored in it are kept alive by the callers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as u32,
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

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Sets the u32 at byte offset `4 * index` of the attr (native byte order, like the
/// kernel's struct layout).
fn set_u32(attr: &mut Attr, index: usize, value: u32) {
    let word = &mut attr[index / 2];
    let mut bytes = word.to_ne_bytes();
    let at = (index % 2) * 4;
    bytes[at..at + 4].copy_from_slice(&value.to_ne_bytes());
    *word = u64::from_ne_bytes(bytes);
}

/// BPF_OBJ_GET: an fd for a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let cpath = c_path(path)?;
    let mut attr: Attr = [0; 16];
    attr[0] = cpath.as_ptr() as u64; // pathname
    bpf(BPF_OBJ_GET, &mut attr).map(fd_from)
}

/// BPF_OBJ_PIN: pins `fd` at `path` (which must not exist).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let cpath = c_path(path)?;
    let mut attr: Attr = [0; 16];
    attr[0] = cpath.as_ptr() as u64; // pathname
    set_u32(&mut attr, 2, fd.as_raw_fd() as u32); // bpf_fd
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// BPF_OBJ_GET_INFO_BY_FD into a zeroed buffer of u32 words (program, map or link info).
pub fn obj_info(fd: BorrowedFd<'_>) -> io::Result<[u32; 64]> {
    let mut info = [0u32; 64];
    let mut attr: Attr = [0; 16];
    set_u32(&mut attr, 0, fd.as_raw_fd() as u32); // bpf_fd
    set_u32(&mut attr, 1, std::mem::size_of_val(&info) as u32); // info_len
    attr[1] = info.as_mut_ptr() as u64; // info
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// The kernel ID of a program (`struct bpf_prog_info`: type, id, …).
pub fn prog_id(fd: BorrowedFd<'_>) -> io::Result<u32> {
    Ok(obj_info(fd)?[1])
}

/// BPF_LINK_CREATE for TCX: attaches `prog` to `ifindex` ahead of any other program.
/// The link lives as long as the returned fd or a pin of it.
pub fn tcx_link_create(
    prog: BorrowedFd<'_>,
    ifindex: u32,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr: Attr = [0; 16];
    set_u32(&mut attr, 0, prog.as_raw_fd() as u32); // prog_fd
    set_u32(&mut attr, 1, ifindex); // target_ifindex
    set_u32(&mut attr, 2, attach_type); // attach_type
    set_u32(&mut attr, 3, BPF_F_BEFORE); // flags; tcx.relative_fd (word 4) = 0
    bpf(BPF_LINK_CREATE, &mut attr).map(fd_from)
}

/// BPF_LINK_UPDATE: the link runs `prog` from now on (atomic for packets).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr: Attr = [0; 16];
    set_u32(&mut attr, 0, link.as_raw_fd() as u32); // link_fd
    set_u32(&mut attr, 1, prog.as_raw_fd() as u32); // new_prog_fd
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
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
    let mut attr: Attr = [0; 16];
    // struct { target_ifindex, attach_type, query_flags, attach_flags; u64 prog_ids;
    // u32 count, pad; u64 prog_attach_flags; u64 link_ids; u64 link_attach_flags; ... }
    set_u32(&mut attr, 0, ifindex);
    set_u32(&mut attr, 1, attach_type);
    attr[2] = prog_ids.as_mut_ptr() as u64;
    set_u32(&mut attr, 6, MAX as u32);
    attr[5] = link_ids.as_mut_ptr() as u64;
    bpf(BPF_PROG_QUERY, &mut attr)?;
    let count = (attr[3] as u32).min(MAX as u32) as usize;
    Ok(TcxChain {
        prog_ids: prog_ids[..count].to_vec(),
        link_ids: link_ids[..count].to_vec(),
    })
}

/// The name a program was loaded with (`bpf_prog_info.name`: at most 15 bytes, so
/// longer function names are cut), found by its kernel ID.
pub fn prog_name_by_id(id: u32) -> io::Result<String> {
    let mut attr: Attr = [0; 16];
    set_u32(&mut attr, 0, id); // prog_id
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).map(fd_from)?;
    let info = obj_info(fd.as_fd())?;
    // struct bpf_prog_info: name[16] at byte 64 (u32 words 16..20).
    let bytes: Vec<u8> = info[16..20].iter().flat_map(|w| w.to_ne_bytes()).collect();
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    Ok(String::from_utf8_lossy(&bytes[..end]).into_owned())
}

/// BPF_MAP_CREATE of an array map with u32 keys.
pub fn array_map_create(
    name: &str,
    value_size: u32,
    max_entries: u32,
    flags: u32,
) -> io::Result<OwnedFd> {
    let mut attr: Attr = [0; 16];
    set_u32(&mut attr, 0, BPF_MAP_TYPE_ARRAY); // map_type
    set_u32(&mut attr, 1, 4); // key_size
    set_u32(&mut attr, 2, value_size);
    set_u32(&mut attr, 3, max_entries);
    set_u32(&mut attr, 4, flags); // map_flags; inner_map_fd, numa_node = 0
    // map_name: 16 bytes at byte 28 (u32 words 7..11), NUL-terminated.
    let mut map_name = [0u8; 16];
    let len = name.len().min(15);
    map_name[..len].copy_from_slice(&name.as_bytes()[..len]);
    for (i, chunk) in map_name.chunks(4).enumerate() {
        set_u32(
            &mut attr,
            7 + i,
            u32::from_ne_bytes(chunk.try_into().expect("4 bytes")),
        );
    }
    bpf(BPF_MAP_CREATE, &mut attr).map(fd_from)
}

/// BPF_MAP_UPDATE_ELEM with `flags` (BPF_ANY = 0).
pub fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8], flags: u64) -> io::Result<()> {
    let mut attr: Attr = [0; 16];
    set_u32(&mut attr, 0, map.as_raw_fd() as u32); // map_fd
    attr[1] = key.as_ptr() as u64;
    attr[2] = value.as_ptr() as u64;
    attr[3] = flags;
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// BPF_MAP_LOOKUP_ELEM into `value` (which must be the map's value size).
pub fn map_lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<()> {
    let mut attr: Attr = [0; 16];
    set_u32(&mut attr, 0, map.as_raw_fd() as u32); // map_fd
    attr[1] = key.as_ptr() as u64;
    attr[2] = value.as_mut_ptr() as u64;
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).map(drop)
}

/// BPF_MAP_GET_FD_BY_ID.
pub fn map_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr: Attr = [0; 16];
    set_u32(&mut attr, 0, id); // map_id
    bpf(BPF_MAP_GET_FD_BY_ID, &mut attr).map(fd_from)
}

/// BPF_MAP_FREEZE: no more writes from userspace (programs only read our tables).
pub fn map_freeze(map: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr: Attr = [0; 16];
    set_u32(&mut attr, 0, map.as_raw_fd() as u32); // map_fd
    bpf(BPF_MAP_FREEZE, &mut attr).map(drop)
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
    let info = obj_info(map)?;
    Ok(MapInfo {
        map_type: info[0],
        id: info[1],
        key_size: info[2],
        value_size: info[3],
        max_entries: info[4],
        flags: info[5],
    })
}
