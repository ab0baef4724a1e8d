//! The only place that calls `bpf()` directly, for what aya does not offer: opening a pinned
//! map read-only or a pinned link, reading link and program info, opening a program by id and replacing a link's
//! program in place.
//!
//! Every command's attribute is a `#[repr(C)]` struct laid out as its member of the kernel's
//! `union bpf_attr` (`include/uapi/linux/bpf.h`), checked by size at compile time; the size
//! passed to the kernel is the struct's, and the kernel treats the rest of the union as zero.

use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use super::lifecycle::ProgramRef;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `BPF_OBJ_GET` file flag: the fd may look up, not update (read permission on the pinned
/// file is enough).
const BPF_F_RDONLY: u32 = 1 << 3;
/// `BPF_LINK_UPDATE` flag: replace only if the link still runs `old_prog_fd`.
const BPF_F_REPLACE: u32 = 4;

/// `bpf_attr` for `BPF_OBJ_GET`.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    /// Pointer to the NUL-terminated path.
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}
const _: () = assert!(size_of::<ObjGetAttr>() == 24);

/// `bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    /// Size of the buffer at `info`; the kernel writes back how much it filled.
    info_len: u32,
    /// Pointer to the info buffer.
    info: u64,
}
const _: () = assert!(size_of::<InfoAttr>() == 16);

/// `bpf_attr` for `BPF_PROG_GET_FD_BY_ID`.
#[repr(C)]
#[derive(Default)]
struct GetIdAttr {
    prog_id: u32,
    next_id: u32,
    open_flags: u32,
}
const _: () = assert!(size_of::<GetIdAttr>() == 12);

/// `bpf_attr` for `BPF_LINK_UPDATE`.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}
const _: () = assert!(size_of::<LinkUpdateAttr>() == 16);

/// The head of `struct bpf_prog_info` (the kernel fills no more than the length given).
#[repr(C)]
#[derive(Default)]
struct ProgInfoHead {
    kind: u32,
    id: u32,
    tag: [u8; 8],
}
const _: () = assert!(size_of::<ProgInfoHead>() == 16);

/// The head of `struct bpf_link_info` with its `netns` union member (8-aligned, at offset 16).
#[repr(C, align(8))]
#[derive(Default)]
struct LinkInfoHead {
    kind: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    netns_ino: u32,
    attach_type: u32,
}
const _: () = assert!(size_of::<LinkInfoHead>() == 24);

/// Runs `bpf(cmd, attr, size_of::<T>())`.
///
/// # Safety
/// `T` must be the `#[repr(C)]` layout of `cmd`'s member of `union bpf_attr`, and every
/// pointer and fd in `attr` must be valid (and, for buffers, as large as declared) for the
/// whole call.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: the caller guarantees the layout and the validity of what `attr` points to;
    // `attr` itself is a live, exclusive reference of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Takes ownership of an fd returned by `bpf()`.
fn owned_fd(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf() returned an invalid fd"))?;
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the pinned BPF object at `path` (`BPF_OBJ_GET`).
pub(super) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    obj_get_flags(path, 0)
}

/// Opens the pinned map at `path` read-only (`BPF_OBJ_GET` with `BPF_F_RDONLY`): the kernel
/// checks only read permission on the pinned file, and the fd cannot update the map.
pub(super) fn obj_get_read_only(path: &Path) -> io::Result<OwnedFd> {
    obj_get_flags(path, BPF_F_RDONLY)
}

fn obj_get_flags(path: &Path, file_flags: u32) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        file_flags,
        ..Default::default()
    };
    // SAFETY: ObjGetAttr is BPF_OBJ_GET's layout; `pathname` points to `c`, NUL-terminated
    // and alive until the end of this function.
    owned_fd(unsafe { bpf(BPF_OBJ_GET, &mut attr) }?)
}

/// Fills `info` with the kernel's info about the BPF object `fd` (`BPF_OBJ_GET_INFO_BY_FD`).
///
/// # Safety
/// `I` must be a prefix of the info struct of `fd`'s kind, made of plain integers.
unsafe fn obj_info<I>(fd: BorrowedFd<'_>, info: &mut I) -> io::Result<()> {
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<I>() as u32,
        info: std::ptr::from_mut(info) as u64,
    };
    // SAFETY: InfoAttr is BPF_OBJ_GET_INFO_BY_FD's layout; `info` points to a live, exclusive
    // buffer of `info_len` bytes that any bytes are valid for (the caller's guarantee), and
    // `fd` is open (borrowed) for the call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }.map(drop)
}

/// Id of the program that the link `fd` runs.
pub(super) fn link_prog_id(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut info = LinkInfoHead::default();
    // SAFETY: LinkInfoHead is the head of `struct bpf_link_info`, plain integers.
    unsafe { obj_info(fd, &mut info) }?;
    Ok(info.prog_id)
}

/// Reads `bpf_link_info` of the pinned link at `path`: (program id, netns inode).
fn link_info(path: &Path) -> io::Result<(u32, u32)> {
    let fd = obj_get(path)?;
    let mut info = LinkInfoHead::default();
    // SAFETY: LinkInfoHead is the head of `struct bpf_link_info`, plain integers.
    unsafe { obj_info(std::os::fd::AsFd::as_fd(&fd), &mut info) }?;
    Ok((info.prog_id, info.netns_ino))
}

/// Id and tag of the program `fd`.
pub(super) fn prog_ref(fd: BorrowedFd<'_>) -> io::Result<ProgramRef> {
    let mut info = ProgInfoHead::default();
    // SAFETY: ProgInfoHead is the head of `struct bpf_prog_info`, plain integers.
    unsafe { obj_info(fd, &mut info) }?;
    Ok(ProgramRef {
        id: info.id,
        tag: info.tag,
    })
}

/// An fd of the loaded program `id` (`BPF_PROG_GET_FD_BY_ID`).
pub(super) fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetIdAttr {
        prog_id: id,
        ..Default::default()
    };
    // SAFETY: GetIdAttr is BPF_PROG_GET_FD_BY_ID's layout; it holds no pointer.
    owned_fd(unsafe { bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) }?)
}

/// Switches the link `link` to the program `new` if it still runs `old`
/// (`BPF_LINK_UPDATE` with `BPF_F_REPLACE`: if another loader replaced the program in between,
/// the kernel refuses with EPERM instead of undoing that change).
pub(super) fn link_update(
    link: BorrowedFd<'_>,
    new: BorrowedFd<'_>,
    old: BorrowedFd<'_>,
) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new.as_raw_fd() as u32,
        flags: BPF_F_REPLACE,
        old_prog_fd: old.as_raw_fd() as u32,
    };
    // SAFETY: LinkUpdateAttr is BPF_LINK_UPDATE's layout; its three fds are borrowed, so open
    // for the whole call; it holds no pointer.
    unsafe { bpf(BPF_LINK_UPDATE, &mut attr) }.map(drop)
}

/// Inode of the network namespace the pinned sk_lookup link at `path` is attached to (0 when
/// that namespace is gone).
pub(super) fn link_netns(path: &Path) -> io::Result<u32> {
    link_info(path).map(|(_, ino)| ino)
}

/// Id of the program the pinned link at `path` runs.
pub(super) fn link_program(path: &Path) -> io::Result<u32> {
    link_info(path).map(|(prog, _)| prog)
}
