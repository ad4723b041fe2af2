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

use std::path::Path;

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
