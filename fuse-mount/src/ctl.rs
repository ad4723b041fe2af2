//! The daemon's side of the control channel (`hammer2::ctl`): the
//! `hammer2` tool's requests, sent as one ioctl on any file or directory
//! of the mount, answered here. DragonFly's hammer2(8) asks its kernel
//! the same way (`HAMMER2IOC_*` on a descriptor in the mount).
//!
//! Permission: the kernel has checked the open of the descriptor; the
//! operations that change the volume (mark, snapshot, pfs-create,
//! pfs-delete, bulkfree, flush) are further refused (EPERM) unless the
//! request comes from uid 0, as DragonFly's ioctls need root.
//!
//! Operations that change the volume hold the flusher's serial lock
//! (`RwVolume::between_flushes`), so none runs in the middle of a
//! pipelined flush: a mark lands between two flushes, and a snapshot is
//! exactly one flushed state of its PFS (flush, then copy the root, under
//! one hold of the `Mount`). Bulkfree runs on its own thread
//! (`bulkfree`), outside the `Mount` for its scan.

use crate::rw::RwVolume;
use crate::vnops::Hammer2Fs;
use hammer2::ctl::{self, bulkfree_state, InodeStat, MountInfo, PfsEntry, Reply, Request};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

/// A failed operation: errno and why.
type Failed = (i32, String);

fn failed(e: &hammer2::Error) -> Failed {
    (crate::errno(e), e.to_string())
}

/// What `mark` tells a caller whose device keeps no write log.
pub const NO_WRITE_LOG: &str = "this mount keeps no write log (mount with -o log_writes=FILE)";

/// Answer one control buffer from `uid`, issued on the file `inum`.
/// Always returns a whole reply buffer (errors included).
pub fn serve(fs: &Hammer2Fs, uid: u32, inum: u64, input: &[u8]) -> Vec<u8> {
    let req = match Request::decode(input) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("control request refused: {e}");
            return ctl::reject(input, &e);
        }
    };
    let op = req.op();
    let reply = if req.mutates() && uid != 0 {
        Reply::Error {
            errno: libc::EPERM,
            message: "only root may change the volume".into(),
        }
    } else {
        handle(fs, inum, req).unwrap_or_else(|(errno, message)| Reply::Error { errno, message })
    };
    if let Reply::Error { errno, message } = &reply {
        log::info!("control operation {op}: errno {errno}: {message}");
    }
    reply.encode(op).unwrap_or_else(|_| {
        Reply::Error {
            errno: libc::E2BIG,
            message: "reply larger than a control buffer".into(),
        }
        .encode(op)
        .unwrap_or_default()
    })
}

fn rw(fs: &Hammer2Fs) -> Result<&Arc<RwVolume>, Failed> {
    fs.router.store().rw().map(|s| &s.vol).map_err(|_| {
        (
            libc::EROFS,
            "the mount is read-only: nothing is written through it".into(),
        )
    })
}

fn handle(fs: &Hammer2Fs, inum: u64, req: Request) -> Result<Reply, Failed> {
    match req {
        Request::MountInfo => Ok(Reply::MountInfo(MountInfo {
            // A path under `.snapshot/S` is in S (the default name of a
            // snapshot asked there is S's).
            label: match snapshot_of(fs, inum) {
                Ok(Some(label)) => label,
                _ => fs.label.clone(),
            },
            image: fs.image.as_os_str().as_bytes().to_vec(),
            read_write: fs.router.store().rw().is_ok(),
            snapdir: fs.router.snapdir().is_some(),
            daemon: env!("CARGO_PKG_VERSION").into(),
        })),
        Request::Mark { name } => {
            let v = rw(fs)?;
            v.writable()
                .map_err(|e| (e, "a flush failed; the mount refuses writes".into()))?;
            v.between_flushes(|m| m.volume().device().mark(&name))
                .map_err(|e| match e.kind() {
                    io::ErrorKind::Unsupported => (libc::EOPNOTSUPP, NO_WRITE_LOG.into()),
                    _ => (e.raw_os_error().unwrap_or(libc::EIO), e.to_string()),
                })?;
            log::info!("mark {name:?} in the write log");
            Ok(Reply::Ok)
        }
        Request::Flush => {
            let v = rw(fs)?;
            v.sync().map_err(|e| (e, "the flush failed".into()))?;
            Ok(Reply::Ok)
        }
        Request::Snapshot { name } => {
            let v = rw(fs)?;
            v.writable()
                .map_err(|e| (e, "a flush failed; the mount refuses writes".into()))?;
            // Asked on a path under `.snapshot/S`: a snapshot of S.
            let origin = match snapshot_of(fs, inum)? {
                Some(label) => label,
                None => v.label.clone(),
            };
            let now = now_micros();
            v.between_flushes(|m| m.snapshot(&origin, &name, now))
                .map_err(|e| failed(&e))?;
            Ok(Reply::Ok)
        }
        Request::PfsCreate { label } => {
            let v = rw(fs)?;
            v.writable()
                .map_err(|e| (e, "a flush failed; the mount refuses writes".into()))?;
            v.between_flushes(|m| m.pfs_create(&label, now_micros()))
                .map_err(|e| failed(&e))?;
            Ok(Reply::Ok)
        }
        Request::PfsDelete { label } => {
            let v = rw(fs)?;
            if label == v.label {
                return Err((
                    libc::EBUSY,
                    format!("PFS {label} is mounted here; it cannot be deleted while mounted"),
                ));
            }
            v.writable()
                .map_err(|e| (e, "a flush failed; the mount refuses writes".into()))?;
            v.between_flushes(|m| m.pfs_delete(&label))
                .map_err(|e| failed(&e))?;
            if let Some(sd) = fs.router.snapdir() {
                sd.forget_label(&label);
            }
            Ok(Reply::Ok)
        }
        Request::PfsList { cursor } => pfs_page(fs, cursor),
        Request::Stat => stat(fs, inum),
        Request::SetMethods { comp, check } => {
            let v = rw(fs)?;
            if fs.router.route(inum).rw().is_err() {
                return Err((libc::EROFS, "under .snapshot, which is read-only".into()));
            }
            v.writable()
                .map_err(|e| (e, "a flush failed; the mount refuses writes".into()))?;
            let methods = hammer2::setmethods::Methods { comp, check };
            hammer2::setmethods::validate(methods).map_err(|e| failed(&e))?;
            v.mount()
                .set_inode_methods(&v.label, inum, methods)
                .map_err(|e| failed(&e))?;
            stat(fs, inum)
        }
        Request::BulkfreeStart { passes } => {
            let v = rw(fs)?;
            v.writable()
                .map_err(|e| (e, "a flush failed; the mount refuses writes".into()))?;
            if !(1..=2).contains(&passes) {
                return Err((libc::EINVAL, format!("{passes} passes: 1 or 2")));
            }
            v.bulkfree_start(passes)
                .map(Reply::Bulkfree)
                .map_err(|why| (libc::EBUSY, why))
        }
        Request::BulkfreeStatus => {
            let v = rw(fs)?;
            Ok(Reply::Bulkfree(v.bulkfree_status()))
        }
    }
}

/// The snapshot a node of `.snapshot` belongs to (`None` for the
/// mounted PFS's own nodes); `.snapshot` itself is no PFS (EINVAL).
fn snapshot_of(fs: &Hammer2Fs, inum: u64) -> Result<Option<String>, Failed> {
    if !crate::snapdir::is_snap(inum) {
        return Ok(None);
    }
    let sd = fs
        .router
        .snapdir()
        .ok_or((libc::ENOENT, "no .snapshot".into()))?;
    if inum == crate::snapdir::SNAP_BIT {
        return Err((
            libc::EINVAL,
            ".snapshot is not a PFS: name the mount, or a snapshot under .snapshot".into(),
        ));
    }
    sd.label_of(inum)
        .map(Some)
        .map_err(|e| (i32::from(e), "the snapshot was deleted".into()))
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Every PFS root of the volume as last flushed, in label order.
fn pfs_entries(fs: &Hammer2Fs) -> Result<Vec<PfsEntry>, Failed> {
    let list = fs.router.store().pfs_list().map_err(|e| failed(&e))?;
    let mut out: Vec<PfsEntry> = list
        .into_iter()
        .map(|p| {
            let m = p.root.meta();
            PfsEntry {
                label: p.root.data.name().to_vec(),
                pfs_type: m.pfs_type,
                pfs_subtype: m.pfs_subtype,
                clid: m.pfs_clid,
                fsid: m.pfs_fsid,
                lsnap_tid: m.pfs_lsnap_tid,
                inode_count: p.root.bref.inode_count(),
                data_count: p.root.bref.data_count(),
                comp_algo: m.comp_algo,
                check_algo: m.check_algo,
                mounted: p.label == fs.label,
            }
        })
        .collect();
    out.sort_by(|a, b| a.label.cmp(&b.label));
    Ok(out)
}

/// One page of the PFS list from index `cursor`: as many entries as fit
/// in a buffer.
fn pfs_page(fs: &Hammer2Fs, cursor: u64) -> Result<Reply, Failed> {
    let all = pfs_entries(fs)?;
    let mut used = ctl::PFS_PAGE_FIXED;
    let mut entries = Vec::new();
    let mut i = usize::try_from(cursor).unwrap_or(usize::MAX);
    while i < all.len() {
        let n = ctl::pfs_entry_bytes(&all[i]);
        if used + n > ctl::PAYLOAD_MAX {
            break;
        }
        used += n;
        entries.push(all[i].clone());
        i += 1;
    }
    let next = (i < all.len()).then_some(i as u64);
    Ok(Reply::PfsList { entries, next })
}

fn stat(fs: &Hammer2Fs, inum: u64) -> Result<Reply, Failed> {
    // A node of `.snapshot` (inum is the node id there).
    let (meta, bref, dirty) = if crate::snapdir::is_snap(inum) {
        let sd = fs
            .router
            .snapdir()
            .ok_or((libc::ENOENT, "no .snapshot".into()))?;
        if inum == crate::snapdir::SNAP_BIT {
            return Err((
                libc::EINVAL,
                ".snapshot is not an inode of the volume".into(),
            ));
        }
        let i = sd
            .inode(inum)
            .map_err(|e| (i32::from(e), format!("node {inum:#x}: {e:?}")))?;
        (*i.meta(), i.bref, 0)
    } else {
        fs.router
            .store()
            .inode_state(inum)
            .map_err(|e| failed(&e))?
    };
    Ok(Reply::Stat(InodeStat {
        inum: meta.inum,
        obj_type: meta.obj_type.to_u8(),
        comp_algo: meta.comp_algo,
        check_algo: meta.check_algo,
        mode: meta.mode,
        nlinks: meta.nlinks,
        uid: meta.uid_unix(),
        gid: meta.gid_unix(),
        size: meta.size,
        ctime: meta.ctime,
        mtime: meta.mtime,
        atime: meta.atime,
        btime: meta.btime,
        op_flags: meta.op_flags,
        version: meta.version,
        data_count: bref.data_count(),
        inode_count: bref.inode_count(),
        dirty_bytes: dirty,
    }))
}

/// The bulkfree state a finished or failed job leaves.
pub fn finished(mut st: ctl::BulkfreeStatus, failed: Option<String>) -> ctl::BulkfreeStatus {
    match failed {
        Some(why) => {
            st.state = bulkfree_state::FAILED;
            if !st.report.is_empty() {
                st.report.push('\n');
            }
            st.report.push_str(&why);
        }
        None => st.state = bulkfree_state::DONE,
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;
    use bufcache::recording::{Event, RecordingDevice};
    use bufcache::{BlockDevice, MemDevice};
    use hammer2::ctl::{op, Reply, Request};
    use hammer2::mount::Mount;

    /// A read-write `Hammer2Fs` of PFS DATA on a fresh 1 GiB volume over
    /// `dev` (newfs'd here), as mount.hammer2 builds one.
    fn fs_over(dev: Arc<dyn BlockDevice>) -> Hammer2Fs {
        mkfs::newfs::newfs(dev.as_ref(), &mkfs::newfs::NewfsOptions::default()).expect("newfs");
        let m = Mount::open(dev).expect("open");
        // A device in memory: nothing else can reach it, nothing to lock.
        let v = Arc::new(RwVolume::new(m, "DATA".into(), None, None));
        Hammer2Fs::new_rw(v, true)
    }

    fn ask(fs: &Hammer2Fs, uid: u32, req: Request) -> Reply {
        let out = serve(fs, uid, hammer2::mount::ROOT_INUM, &req.encode().unwrap());
        assert_eq!(out.len(), ctl::CTL_BUF);
        Reply::decode(req.op(), &out).expect("reply decodes")
    }

    #[test]
    fn a_mark_lands_in_a_recording_devices_log_between_flushes() {
        let rec = Arc::new(RecordingDevice::new(1 << 30));
        let fs = fs_over(rec.clone());
        let before = rec.position();
        let r = ask(&fs, 0, Request::Mark { name: "m1".into() });
        assert_eq!(r, Reply::Ok);
        assert_eq!(rec.mark_position("m1"), Some(before));
        // Only root may mark.
        match ask(&fs, 1000, Request::Mark { name: "m2".into() }) {
            Reply::Error { errno, .. } => assert_eq!(errno, libc::EPERM),
            other => panic!("{other:?}"),
        }
        assert_eq!(rec.mark_position("m2"), None);
        let marks = rec
            .events()
            .iter()
            .filter(|e| matches!(e, Event::Mark(_)))
            .count();
        assert_eq!(marks, 1);
    }

    #[test]
    fn a_device_without_a_write_log_refuses_a_mark_clearly() {
        let fs = fs_over(Arc::new(MemDevice::new(1 << 30)));
        match ask(&fs, 0, Request::Mark { name: "m1".into() }) {
            Reply::Error { errno, message } => {
                assert_eq!(errno, libc::EOPNOTSUPP);
                assert_eq!(message, NO_WRITE_LOG);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_buffer_of_another_version_gets_eproto() {
        let fs = fs_over(Arc::new(MemDevice::new(1 << 30)));
        let mut b = Request::MountInfo.encode().unwrap();
        b[4] = 0x7f;
        let out = serve(&fs, 0, 1, &b);
        match Reply::decode(op::MOUNT_INFO, &out).unwrap() {
            Reply::Error { errno, .. } => assert_eq!(errno, libc::EPROTO),
            other => panic!("{other:?}"),
        }
        // Garbage: EINVAL, never a panic.
        let out = serve(&fs, 0, 1, &[0xff; 100]);
        assert!(matches!(
            Reply::decode(0, &out),
            Ok(Reply::Error {
                errno: libc::EINVAL,
                ..
            })
        ));
    }
}
