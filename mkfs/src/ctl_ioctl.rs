//! The two syscalls the `hammer2` tool needs and std lacks: fstatfs(2),
//! to tell a FUSE mount from a plain file, and ioctl(2), to send one
//! control buffer (`hammer2::ctl`) to the daemon serving the mount.

#![allow(unsafe_code)]

use hammer2::ctl::{CTL_BUF, CTL_IOC};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `FUSE_SUPER_MAGIC` (linux/magic.h).
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// Is `file` on a FUSE filesystem?
pub fn on_fuse(file: &File) -> io::Result<bool> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs writes at most one `struct statfs` to the pointer,
    // which points at a zeroed buffer of exactly that type; the
    // descriptor is valid for the borrow of `file`.
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatfs returned 0, so it filled the structure (and it was
    // zero-initialised before, so every field holds a valid integer).
    let st = unsafe { st.assume_init() };
    // f_type's width differs between architectures and C libraries.
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64 == FUSE_SUPER_MAGIC)
}

/// Issue the control ioctl on `file` with `buf` (exactly `CTL_BUF`
/// bytes): the kernel sends it to the daemon and copies the reply back
/// into `buf`.
pub fn control(file: &File, buf: &mut [u8; CTL_BUF]) -> io::Result<()> {
    // SAFETY: CTL_IOC is _IOWR with size CTL_BUF, so the kernel reads and
    // writes at most CTL_BUF bytes at the pointer, and `buf` is a live,
    // exclusively borrowed array of exactly that size; the descriptor is
    // valid for the borrow of `file`.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), CTL_IOC as _, buf.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
