//! `mount.hammer2 -o remount[,OPTIONS] SOURCE MOUNTPOINT`: what mount(8)
//! runs for `mount -o remount,ro MNT` (and back with `remount,rw`) on a
//! mount.hammer2 mount, found by the type in /proc/self/mountinfo
//! (`/sbin/mount.fuse.hammer2`, `/sbin/mount.fuseblk.hammer2`). The mount
//! is changed in place, never stacked (a second mount on MNT was what an
//! unknown `remount` under `-s` used to give).
//!
//! The VFS flags are changed with mount(2) (MS_REMOUNT: ro/rw, nosuid,
//! nodev, noexec, noatime, sync, dirsync); FUSE takes no other option on
//! a remount, so the daemon keeps its own (sync_interval, cache_size...;
//! a warning names any given). Going read-only, the kernel writes back
//! and refuses while files are open for writing (EBUSY), and the daemon
//! is asked over its control channel to flush, so that what was written
//! before the remount is on the image when it returns; while read-only
//! the kernel lets no change reach the daemon. Going back to read-write
//! needs a daemon that writes: a mount made read-only (`-o ro`) serves a
//! read view and is refused (unmount it and mount it read-write).

use crate::mount::{Failure, FSTYPE, FSTYPE_BLK};
use crate::options::Options;
use hammer2::ctl::{Reply, Request};
use mkfs::control::Channel;
use nix::mount::MsFlags;
use std::path::{Path, PathBuf};

/// The type of the mount on `mnt` (the last one mounted there), from
/// /proc/self/mountinfo.
fn fstype_on(mnt: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().rev().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let point = bufcache::source::unescape(left.split(' ').nth(4)?);
        (Path::new(&point) == mnt).then(|| right.split(' ').next().map(str::to_string))?
    })
}

/// Remount `mnt` with `o` (see the module comment).
pub fn remount(mnt: &Path, o: &Options) -> Result<(), Failure> {
    let shown = mnt.display();
    let mnt: PathBuf = mnt
        .canonicalize()
        .map_err(|e| Failure::Mount(format!("{shown}: {e}")))?;
    match fstype_on(&mnt).as_deref() {
        Some(t) if t == FSTYPE || t == FSTYPE_BLK => {}
        Some(t) => {
            return Err(Failure::Mount(format!(
                "{shown} is a {t} mount, not one of mount.hammer2: cannot remount it"
            )))
        }
        None => return Err(Failure::Mount(format!("{shown} is not a mountpoint"))),
    }
    let ch = match Channel::open(&mnt) {
        Ok(Some(ch)) => ch,
        Ok(None) => return Err(Failure::Mount(format!("{shown} is not a FUSE mount"))),
        Err(e) => return Err(Failure::Mount(e)),
    };
    let info = match ch.call(&Request::MountInfo) {
        Ok(Reply::MountInfo(m)) => m,
        Ok(r) => return Err(Failure::System(format!("{shown}: unexpected reply {r:?}"))),
        Err(e) => return Err(Failure::System(format!("{shown}: mount-info: {e}"))),
    };
    if o.read_write && !info.read_write {
        return Err(Failure::Mount(format!(
            "{shown} was mounted read-only (-o ro): its daemon serves a read-only view and \
             cannot start writing; unmount it and mount it read-write"
        )));
    }
    for ignored in o.daemon_options() {
        log::warn!("{ignored} is not changed by a remount (unmount and mount to change it)");
    }
    let flags = o.ms_flags() | MsFlags::MS_REMOUNT;
    nix::mount::mount(None::<&str>, &mnt, None::<&str>, flags, None::<&str>).map_err(
        |e| match e {
            nix::errno::Errno::EBUSY if !o.read_write => Failure::Mount(format!(
                "cannot remount {shown} read-only: files are open on it for writing"
            )),
            e => Failure::Mount(format!("cannot remount {shown}: {e}")),
        },
    )?;
    if info.read_write {
        // Written before the remount: on the image before we return.
        match ch.call(&Request::Flush) {
            Ok(_) => {}
            Err(e) => {
                return Err(Failure::System(format!(
                    "{shown}: remounted, but the flush failed: {e}"
                )))
            }
        }
    }
    log::info!(
        "remounted {} {}",
        shown,
        if o.read_write {
            "read-write"
        } else {
            "read-only"
        }
    );
    Ok(())
}
