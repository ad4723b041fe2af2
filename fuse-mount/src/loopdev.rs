//! A loop device over an image file, for a read-write mount: the kernel
//! mounts FUSE over a block device (fuseblk) only, and only a fuseblk
//! mount gets `sync(2)`/`syncfs(2)` (FUSE_SYNCFS) and an unmount that
//! waits for the daemon (FUSE_DESTROY). The daemon itself reads and
//! writes the image file, not the loop device; the loop device is what
//! the kernel mounts, and `/proc/mounts` shows.
//!
//! It is attached as `mount -o loop` attaches one: a free device
//! (LOOP_CTL_GET_FREE), configured in one call (LOOP_CONFIGURE) with
//! `LO_FLAGS_AUTOCLEAR`, so it goes away when the mount lets go of it,
//! however the daemon ends. std and nix have neither ioctl, hence the
//! `unsafe` here (the only in this crate).

#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const LOOP_CONTROL: &str = "/dev/loop-control";
/// linux/loop.h
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64` (linux/loop.h).
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config` (linux/loop.h, Linux 5.8).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

/// A loop device attached by `attach`. Dropping it closes our descriptor;
/// the device stays while something (the mount) has it open.
pub struct LoopDevice {
    pub path: PathBuf,
    _file: File,
}

/// Attach a free loop device over `image`, read-write, cleared by the
/// kernel once nothing has it open. Tries again if another program takes
/// the free device first.
pub fn attach(image: &Path) -> io::Result<LoopDevice> {
    attach_range(image, 0, 0)
}

/// `attach` over `sizelimit` bytes (0: to the end) of `image` from
/// `offset`: a partition of an image file or disk, as `losetup -o OFFSET
/// --sizelimit SIZE` does.
pub fn attach_range(image: &Path, offset: u64, sizelimit: u64) -> io::Result<LoopDevice> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open(LOOP_CONTROL)?;
    // A descriptor of its own: the loop device keeps it for its life, and
    // the image locks must not live in it (they would outlive the daemon).
    let backing = OpenOptions::new().read(true).write(true).open(image)?;
    let mut name = [0u8; LO_NAME_SIZE];
    let shown = image.as_os_str().as_encoded_bytes();
    let n = shown.len().min(LO_NAME_SIZE - 1);
    name[..n].copy_from_slice(&shown[..n]);
    let mut last = io::Error::other("no loop device was free");
    for _ in 0..8 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device
        // number or -1; the descriptor is valid for the borrow of `control`.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = OpenOptions::new().read(true).write(true).open(&path)?;
        let config = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            block_size: 0,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: offset,
                lo_sizelimit: sizelimit,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: LO_FLAGS_AUTOCLEAR,
                lo_file_name: name,
                lo_crypt_name: [0; LO_NAME_SIZE],
                lo_encrypt_key: [0; LO_KEY_SIZE],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which
        // `config` is (layout checked above), and does not keep the
        // pointer; both descriptors are valid for the call.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, &config) };
        if r == 0 {
            return Ok(LoopDevice { path, _file: dev });
        }
        last = io::Error::last_os_error();
        // EBUSY: another program configured it between the two calls.
        if last.raw_os_error() != Some(libc::EBUSY) {
            break;
        }
    }
    Err(last)
}
