//! The command-line tools' library side: `newfs` (the format logic of
//! `mkfs.hammer2`), `units` (size parsing and human figures),
//! `progress` (the progress line of long runs), `signatures` (other
//! filesystems and partition tables on a target, found by blkid),
//! `salvage` (`hammer2 recover`: files copied out of a damaged image) and
//! `control`, the `hammer2` tool's side of the control channel to a
//! running mount.hammer2 (its one syscall std lacks, ioctl(2), in
//! `ctl_ioctl`). The binaries in `src/bin` parse arguments, open devices
//! and print; everything a test wants to drive lives here.

// The workspace denies unsafe code; `ctl_ioctl` alone allows it.
#![deny(unsafe_code)]

pub mod control;
mod ctl_ioctl;
pub mod newfs;
pub mod progress;
pub mod salvage;
pub mod signatures;
pub mod units;

use bufcache::source::{self, Opened, Pick};
use bufcache::BlockDevice;
use std::io;
use std::path::Path;

/// Does `dev` hold a HAMMER2 volume header (in any slot)? How a whole
/// disk's HAMMER2 partition is found.
pub fn is_hammer2(dev: &dyn BlockDevice) -> bool {
    matches!(newfs::find_hammer2(dev), Ok(Some(_)))
}

/// Open what a tool was named (`bufcache::source`: a file, a block
/// device, `IMG:PART`, an NBD URI), finding the HAMMER2 partition of a
/// whole disk by itself.
pub fn open_image(text: &Path, writable: bool) -> io::Result<Opened> {
    open_image_as(text, writable, Pick::Auto)
}

/// `open_image` choosing how a disk without a partition named is taken.
pub fn open_image_as(text: &Path, writable: bool, pick: Pick) -> io::Result<Opened> {
    let s = text.to_str().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not UTF-8", text.display()),
        )
    })?;
    // A name that is not UTF-8 cannot be a spec: opened as the path it is.
    source::open(s, writable, pick, &is_hammer2)
}

/// What the tools say of an image a live writer holds (see
/// `bufcache::imagelock`): "IMG is mounted read-write on MNT", or, when
/// no mount of it is found, that something is writing it.
pub fn held_by(name: &str, on: Option<&Path>) -> String {
    match on {
        Some(mnt) => format!("{name} is mounted read-write on {}", mnt.display()),
        None => format!(
            "{name} is being written (mounted read-write by mount.hammer2, or a hammer2 tool \
             or mkfs.hammer2 is at work on it)"
        ),
    }
}
