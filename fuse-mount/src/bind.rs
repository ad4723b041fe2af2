//! A second mount of a PFS that a read-write `mount.hammer2` already
//! serves: a bind mount of that mount, as a second mount of a local
//! filesystem's device shares the first one's superblock (ext4, XFS).
//! An image has one writer, so a second daemon could not write it; the
//! bind gives the same filesystem, read-write or read-only (`ro`: the
//! bind alone is made read-only), with the mount flags asked (nosuid,
//! nodev, noexec, atime); the daemon's own options (snapdir, cache_size,
//! sync_interval...) are the first mount's.
//!
//! The mount served is found by the bytes of its image (`Hammer2Mount::
//! backing`: the device and inode of the file or disk, and the range),
//! not by names, and asked over its control channel which PFS it serves.
//! The bind is made from a descriptor open on that mount's root (which
//! also keeps it from going away meanwhile), checked to be on the
//! filesystem's device: a detached copy of that mount (open_tree), made
//! private and then attached (move_mount), so that for mount propagation
//! it is a new mount, as a second mount of a device is, not a peer of
//! the first (fstests generic/409 to 411). The daemon ends when the last
//! mount of its filesystem goes (the kernel ends the session then),
//! whichever mount point was first; on a signal it unmounts them all
//! (`mount::serve`).

use crate::mount::Failure;
use crate::options::Options;
use bufcache::backing::Backing;
use bufcache::source::{self, Hammer2Mount};
use hammer2::ctl::{MountInfo, Reply, Request};
use mkfs::control::Channel;
use nix::mount::MsFlags;
use rustix::fs::CWD;
use rustix::mount::{move_mount, open_tree, MoveMountFlags, OpenTreeFlags};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A read-write mount.hammer2 filesystem over an image, found through
/// one of its mounts.
pub struct Served {
    /// Open on the root of that mount: the bind's source.
    root: File,
    pub mount: Hammer2Mount,
    /// What its daemon says it serves.
    pub info: MountInfo,
}

/// `/proc/self/fd/N` of `f`: names the mount and directory it is open
/// on, whatever happens to their path meanwhile.
fn fd_path(f: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

/// The filesystem a read-write mount.hammer2 daemon serves over exactly
/// the bytes `b` (the same image, whatever name it was given), if one is
/// mounted in this namespace; found through a mount of its whole tree.
pub fn served(b: &Backing) -> Option<Served> {
    source::hammer2_mounts()
        .into_iter()
        .filter(|m| m.root == "/")
        .filter(|m| m.backing().is_some_and(|theirs| same_bytes(&theirs, b)))
        .find_map(|mount| {
            let root = File::open(&mount.mountpoint).ok()?;
            // The path may have been unmounted, or mounted over, since
            // mountinfo was read.
            if root.metadata().ok()?.dev() != mount.dev {
                return None;
            }
            let ch = Channel::open(&fd_path(&root)).ok()??;
            match ch.call(&Request::MountInfo) {
                Ok(Reply::MountInfo(info)) if info.read_write => Some(Served { root, mount, info }),
                _ => None,
            }
        })
}

/// The same image: the same file or disk (device and inode), the same
/// range of it.
fn same_bytes(a: &Backing, b: &Backing) -> bool {
    (a.dev, a.ino, a.start, a.end) == (b.dev, b.ino, b.start, b.end)
}

/// Bind the mount of `s` onto `mnt` (canonical) with the mount flags of
/// `o`. Refused, as the kernel refuses a second mount of a superblock on
/// its own root, when `mnt` already shows this filesystem's root; and for
/// a read-write mount, when the filesystem was remounted read-only.
pub fn bind(s: &Served, mnt: &Path, o: &Options) -> Result<(), Failure> {
    let first = &s.mount.mountpoint;
    let shown = mnt.display();
    let label = &s.info.label;
    if let Ok(m) = std::fs::metadata(mnt) {
        if m.dev() == s.mount.dev && m.ino() == s.root.metadata().map_or(0, |r| r.ino()) {
            return Err(Failure::Mount(format!(
                "@{label} of this image is already mounted on {shown}"
            )));
        }
    }
    if o.read_write && !s.mount.fs_read_write {
        return Err(Failure::Mount(format!(
            "@{label} of this image is mounted on {} and was remounted read-only: mount it \
             read-only (ro), or remount {} read-write first",
            first.display(),
            first.display()
        )));
    }
    let cannot = |e: &dyn std::fmt::Display| {
        Failure::Mount(format!(
            "cannot bind-mount {} on {shown}: {e}",
            first.display()
        ))
    };
    // A copy of the mount, detached (open_tree, as `mount --bind` does
    // with the new mount API), made private before it is attached: so it
    // is no peer of the first (mounts under one do not propagate to the
    // other), and under a shared parent it gets a peer group of its own,
    // as a new mount does; mount(2) MS_BIND would make it the first's peer.
    let tree = open_tree(
        &s.root,
        "",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH,
    )
    .map_err(|e| cannot(&e))?;
    let tree = File::from(tree);
    nix::mount::mount(
        None::<&str>,
        &fd_path(&tree),
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| cannot(&e))?;
    move_mount(&tree, "", CWD, mnt, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
        .map_err(|e| cannot(&e))?;
    // The flags asked, on this mount point alone (MS_REMOUNT | MS_BIND
    // changes no other mount of the filesystem).
    let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | o.ms_flags();
    if let Err(e) = nix::mount::mount(None::<&str>, mnt, None::<&str>, flags, None::<&str>) {
        let _ = nix::mount::umount2(mnt, nix::mount::MntFlags::MNT_DETACH);
        return Err(Failure::Mount(format!(
            "cannot set the mount flags of {shown}: {e}"
        )));
    }
    log::info!(
        "@{label} of this image is served by the mount on {}: {shown} is a bind mount of it \
         ({}), as a second mount of a local filesystem shares the first",
        first.display(),
        if o.read_write {
            "read-write"
        } else {
            "read-only"
        }
    );
    let own = o.daemon_options();
    if !own.is_empty() {
        log::info!(
            "{} not applied to {shown}: the daemon serving it keeps the options {} was \
             mounted with",
            own.join(","),
            first.display()
        );
    }
    Ok(())
}

/// Why a read-write mount of PFS `label` is refused while another
/// daemon writes the image (`s`, if its mount is found): an image has
/// one writer, and it serves another PFS (or cannot be asked).
pub fn other_pfs_refusal(refused: &str, label: &str, s: Option<&Served>) -> String {
    match s {
        Some(s) => format!(
            "{refused} (PFS @{}): an image has one writer, and one mount.hammer2 daemon \
             serves one PFS, so @{label} cannot be mounted read-write beside it; mount @{label} \
             read-only (ro), or unmount {} first",
            s.info.label,
            s.mount.mountpoint.display()
        ),
        None => refused.to_string(),
    }
}
