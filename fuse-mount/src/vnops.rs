//! The FUSE operations over one PFS (DragonFly's `hammer2_vnops.c`): one
//! `Filesystem` impl over the `hammer2` library, read-only or read-write.
//!
//! Two stores behind the same operations:
//!
//! - read-only: `hammer2::Pfs`, the lock-free read view over an
//!   `Arc<Volume>`: requests on several threads read in parallel, and
//!   decoded inodes are cached in `InodeTable` for the nodes the kernel
//!   holds. The image is opened read-only and nothing can write it.
//! - read-write: `RwVolume`, the one `hammer2::mount::Mount` of the
//!   image behind a mutex (see `rw`). Every operation, reads included,
//!   takes the mutex for one library call, so the library sees one
//!   caller at a time and a flush takes whole operations.
//!
//! Every failure goes through `errno::errno`, the one mapping from
//! library errors to errnos. The tables here (`InodeTable`, the open
//! directory streams) take a mutex for map operations only, never across
//! I/O.
//!
//! Directory streams: opendir makes a handle; the first readdir (and
//! every readdir at offset 0, i.e. rewinddir) reads the whole listing
//! once, and later calls continue from the cookie (see `cookie`) by
//! binary search in it. So a listing of n entries costs one directory
//! walk, not one per reply buffer, and shows one state of the directory
//! from rewind to end (entries added or removed meanwhile show at the
//! next rewind, as POSIX allows).
//!
//! Open files (read-write): each open, create and opendir pins the inode
//! in the library (`Mount::pin`) and its release unpins it, so a file
//! that is unlinked while open lives until its last close.
//!
//! Permissions: with `default_permissions` the kernel checks the mode
//! bits (with supplementary groups) and calls none of the checks here;
//! without it, `check`, `check_sticky`, `check_setattr` and
//! `check_hardlink_source` apply the Unix rules with the caller's uid
//! and groups (the supplementary ones read from /proc when they decide),
//! and `fs.protected_hardlinks`.

use crate::atime;
use crate::cookie;
use crate::dirlinks::DirLinks;
use crate::errno::errno;
use crate::inode::{self, attr_of, generation, placeholder_attr, Ids, InodeTable, BLOCK_BYTES};
use crate::rw::RwVolume;
use crate::snapdir::{self, is_snap, SnapDir};
use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenAccMode,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};
use hammer2::disk::{InodeMeta, ObjType};
use hammer2::mount::{Mount, SetAttr};
use hammer2::pfs::DIRENT_NAME_MAX;
use hammer2::{DirEntry, Inode, Pfs};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may trust names and attributes without asking
/// again, read-only: nothing changes the mount, so this is long; the
/// kernel still drops entries under memory pressure.
const TTL_READ_ONLY: Duration = Duration::from_secs(3600);

/// The same, read-write: every change comes through the kernel, which
/// updates or invalidates what it caches, but some follow-ups (the
/// ctime of a file whose other name was removed, the link count after a
/// rename over it) are only right once it asks again. One second, as
/// libfuse's default.
const TTL_READ_WRITE: Duration = Duration::from_secs(1);

/// `statfs` name length: Linux's NAME_MAX, which is what DragonFly's VFS
/// enforces too. The format allows 256 bytes: read-only, such names
/// still list and look up; read-write, longer names fail with
/// ENAMETOOLONG, in lookups too (as POSIX wants of a NAME_MAX of 255),
/// so none is ever made.
const NAME_MAX_REPORTED: u32 = 255;

/// Space an inode takes on disk: an inode is one 1 KiB block, so free
/// space bounds how many more could exist.
const INODE_BYTES: u64 = 1024;

/// The largest write the kernel sends in one request.
pub const MAX_WRITE_BYTES: u32 = 1 << 20;

/// Operations that move data through the library (hole punch,
/// copy_file_range) do it this much per mount lock.
const CHUNK_BYTES: u64 = 1 << 20;

const S_ISUID: u32 = 0o4000;
const S_ISGID: u32 = 0o2000;
const S_ISVTX: u32 = 0o1000;
const S_IXGRP: u32 = 0o0010;

/// Counters, logged at unmount.
#[derive(Default)]
struct Counters {
    lookups: AtomicU64,
    reads: AtomicU64,
    bytes_read: AtomicU64,
    writes: AtomicU64,
    bytes_written: AtomicU64,
    readdirs: AtomicU64,
    errors: AtomicU64,
}

/// One open directory stream: its listing, read at the first readdir
/// and at each rewind.
struct DirStream {
    listing: Mutex<Option<Arc<Vec<DirEntry>>>>,
}

pub(crate) enum Store {
    ReadOnly { pfs: Box<Pfs>, root: Arc<Inode> },
    ReadWrite(Arc<RwVolume>),
}

pub struct Hammer2Fs {
    pub(crate) store: Store,
    pub(crate) label: String,
    /// The image served (absolute), for the control channel.
    pub(crate) image: std::path::PathBuf,
    ids: Ids,
    inodes: InodeTable,
    /// Directories' POSIX link counts (see `dirlinks`).
    dirlinks: DirLinks,
    dirs: Mutex<HashMap<u64, Arc<DirStream>>>,
    next_fh: AtomicU64,
    /// Without `default_permissions` the kernel checks nothing; then
    /// the operations check the mode bits here.
    check_permissions: bool,
    /// FUSE_WRITEBACK_CACHE asked for (read-write only).
    writeback_cache: bool,
    /// When reads update access times (read-write only; see `atime`).
    atime: atime::Policy,
    /// The session's channel for notifications to the kernel, set once
    /// the session exists (`notifier_slot`).
    notifier: Arc<OnceLock<fuser::Notifier>>,
    /// `-o snapdir`: the snapshots under `.snapshot` at the root.
    pub(crate) snapdir: Option<SnapDir>,
    ttl: Duration,
    counters: Counters,
}

/// Now, in microseconds since the epoch (the library's time).
fn now_us() -> u64 {
    micros(SystemTime::now())
}

/// A time as the format stores it, for every time a caller sets
/// (utimensat, touch -d, the ctime the kernel sends) and the times of new
/// inodes: microseconds since the epoch as a signed 64-bit number, a time
/// before 1970 in two's complement, bit for bit what DragonFly writes
/// (`hammer2_timespec_to_time`: `(u64)tv_sec * 1000000 + usec`). Below a
/// microsecond it rounds down, as Linux truncates to a filesystem's
/// granularity. A time past what that holds (about 292,277 years either
/// side of 1970) is clamped to the nearest it holds, as Linux clamps
/// every filesystem's times to its range (`timestamp_truncate`); the
/// first clamp is logged (a daemon serves one mount).
fn micros(t: SystemTime) -> u64 {
    static LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let exact: i128 = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i128,
        Err(e) => -(e.duration().as_nanos().div_ceil(1000) as i128),
    };
    let us = exact.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
    if i128::from(us) != exact && !LOGGED.swap(true, Ordering::Relaxed) {
        log::warn!(
            "a time outside what HAMMER2 stores (signed 64-bit microseconds since 1970, about \
             292,277 years either side) was set: stored as {us} microseconds; further clamps \
             are not logged"
        );
    }
    us as u64
}

/// FUSE's 32-bit `dev_t` (the kernel's `new_encode_dev`) as major, minor.
fn dev_of(rdev: u32) -> (u32, u32) {
    (
        (rdev & 0xfff00) >> 8,
        (rdev & 0xff) | ((rdev >> 12) & 0xfff00),
    )
}

/// The object type `mknod` makes for the `S_IFMT` bits of `mode`.
fn mknod_type(mode: u32) -> Option<ObjType> {
    match mode & libc::S_IFMT {
        0 | libc::S_IFREG => Some(ObjType::Regfile),
        libc::S_IFIFO => Some(ObjType::Fifo),
        libc::S_IFCHR => Some(ObjType::Cdev),
        libc::S_IFBLK => Some(ObjType::Bdev),
        libc::S_IFSOCK => Some(ObjType::Socket),
        _ => None,
    }
}

/// Is the caller of `req` in group `gid` (its primary group, or one of
/// its supplementary groups, the kernel's `in_group_p`)? The
/// supplementary groups are read only when the primary one differs.
fn in_group(req: &Request, gid: u32) -> bool {
    gid == req.gid() || inode::supplementary_groups(req.pid()).contains(&gid)
}

/// Owner and mode of a new node in a directory (the kernel's
/// `inode_init_owner`): the caller's uid; the directory's gid when it
/// is setgid (a new directory stays setgid), else the caller's gid; a
/// setgid, group-executable file keeps S_ISGID only if the caller is in
/// its group (or root).
fn new_owner(req: &Request, dir: &InodeMeta, mode: u32, is_dir: bool) -> (u32, u32, u32) {
    let mut mode = mode & 0o7777;
    let gid = if dir.mode & S_ISGID != 0 {
        if is_dir {
            mode |= S_ISGID;
        }
        dir.gid_unix()
    } else {
        req.gid()
    };
    let sgid_exec = S_ISGID | S_IXGRP;
    if !is_dir && mode & sgid_exec == sgid_exec && !in_group(req, gid) && req.uid() != 0 {
        mode &= !S_ISGID;
    }
    (req.uid(), gid, mode)
}

impl Hammer2Fs {
    /// A read-only mount of `pfs`.
    pub fn new(pfs: Pfs, default_permissions: bool) -> Hammer2Fs {
        let root = Arc::new(pfs.root.clone());
        let ids = Ids {
            root_inum: root.inum(),
        };
        let label = pfs.label.clone();
        Hammer2Fs::with_store(
            Store::ReadOnly {
                pfs: Box::new(pfs),
                root,
            },
            label,
            ids,
            default_permissions,
            TTL_READ_ONLY,
        )
    }

    /// A read-write mount of the PFS `vol.label`.
    pub fn new_rw(vol: Arc<RwVolume>, default_permissions: bool) -> Hammer2Fs {
        let ids = Ids {
            root_inum: hammer2::mount::ROOT_INUM,
        };
        let label = vol.label.clone();
        Hammer2Fs::with_store(
            Store::ReadWrite(vol),
            label,
            ids,
            default_permissions,
            TTL_READ_WRITE,
        )
    }

    fn with_store(
        store: Store,
        label: String,
        ids: Ids,
        default_permissions: bool,
        ttl: Duration,
    ) -> Hammer2Fs {
        Hammer2Fs {
            store,
            label,
            image: std::path::PathBuf::new(),
            ids,
            inodes: InodeTable::default(),
            dirlinks: DirLinks::default(),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            check_permissions: !default_permissions,
            writeback_cache: false,
            atime: atime::Policy::default(),
            notifier: Arc::default(),
            snapdir: None,
            ttl,
            counters: Counters::default(),
        }
    }

    /// Name the image served (what `hammer2` verbs through the control
    /// channel are told).
    pub fn with_image(mut self, image: std::path::PathBuf) -> Hammer2Fs {
        self.image = image;
        self
    }

    /// Serve the snapshots read-only under `.snapshot` (`-o snapdir`).
    pub fn with_snapdir(mut self, on: bool) -> Hammer2Fs {
        self.snapdir = on.then(SnapDir::default);
        self
    }

    /// The `.snapshot` namespace (ENOENT when it is off).
    fn snap(&self) -> Result<&SnapDir, Errno> {
        self.snapdir.as_ref().ok_or(Errno::ENOENT)
    }

    /// The snapshots of the volume, and a volume to open them from.
    fn snap_source(&self) -> Result<snapdir::Source, Errno> {
        match &self.store {
            Store::ReadOnly { pfs, .. } => Ok(snapdir::Source {
                snapshots: self.h(snapdir::snapshot_labels(pfs.volume()))?,
                volume: pfs.volume().clone(),
            }),
            Store::ReadWrite(v) => {
                let (snapshots, dev) = v.locked(|m| {
                    let l = snapdir::snapshot_labels(m.volume());
                    (l, m.volume().device().clone())
                });
                let volume = self.h(hammer2::Volume::open(dev))?;
                Ok(snapdir::Source {
                    snapshots: self.h(snapshots)?,
                    volume: Arc::new(volume),
                })
            }
        }
    }

    /// Readdir of a `.snapshot` node: every entry from `offset` (an
    /// index: 1 after ".", 2 after "..", 3 + i after entry i), each given
    /// to `add` until it reports the buffer full.
    fn snap_readdir(
        &self,
        ino: INodeNo,
        offset: u64,
        mut add: impl FnMut(u64, u64, FileType, &OsStr) -> bool,
    ) -> Result<(), Errno> {
        let (parent, entries) = self
            .snap()?
            .list(ino.0, INodeNo::ROOT.0, || self.snap_source())?;
        let mut all = vec![
            (ino.0, FileType::Directory, b".".to_vec()),
            (parent, FileType::Directory, b"..".to_vec()),
        ];
        all.extend(entries);
        let from = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (child, kind, name)) in all.iter().enumerate().skip(from) {
            if add(*child, i as u64 + 1, *kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        Ok(())
    }

    /// Let the kernel cache writes (`-o writeback_cache`).
    pub fn with_writeback_cache(mut self, on: bool) -> Hammer2Fs {
        self.writeback_cache = on && self.read_write();
        self
    }

    /// Where the mount puts the session's notifier once the session is
    /// made (the filesystem moves into it first).
    pub fn notifier_slot(&self) -> Arc<OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    /// Node `ino`'s attributes changed in a way the kernel cannot know
    /// from the request it sent (a set-group-ID bit cleared with a
    /// write): drop its cached attributes. Only attributes, no pages, so
    /// it takes no lock the kernel may hold for the request in flight.
    fn attrs_changed(&self, ino: u64) {
        if let Some(n) = self.notifier.get() {
            if let Err(e) = n.inval_inode(INodeNo(ino), -1, 0) {
                log::debug!("invalidating the attributes of node {ino}: {e}");
            }
        }
    }

    /// The access time rules (`-o relatime`, `strictatime`, `noatime`,
    /// `nodiratime`); a read-only mount never updates them.
    pub fn with_atime(mut self, policy: atime::Policy) -> Hammer2Fs {
        self.atime = policy;
        self
    }

    /// Node `inum` was read (its data, or a directory's listing) at
    /// `now`: update its access time when the policy says so, without
    /// making the mount dirty (`Mount::touch_atime`). Never an error for
    /// the read: one is logged at debug level.
    fn accessed(&self, m: &mut Mount, label: &str, inum: u64, now: u64) {
        if self.atime.mode == atime::Mode::Never {
            return;
        }
        let r = m.getattr(label, inum).and_then(|meta| {
            if self.atime.due(&meta, now) {
                m.touch_atime(label, inum, now)
            } else {
                Ok(())
            }
        });
        if let Err(e) = r {
            log::debug!("access time of inode {inum} not updated: {e}");
        }
    }

    fn read_write(&self) -> bool {
        matches!(self.store, Store::ReadWrite(_))
    }

    /// Turn a library error into the reply's errno (logged there).
    fn fail(&self, e: &hammer2::Error) -> Errno {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        Errno::from_i32(errno(e))
    }

    /// A library result, its error as an errno.
    fn h<T>(&self, r: hammer2::Result<T>) -> Result<T, Errno> {
        r.map_err(|e| self.fail(&e))
    }

    /// The read-write store, or EROFS.
    fn rw(&self) -> Result<&Arc<RwVolume>, Errno> {
        match &self.store {
            Store::ReadWrite(v) => Ok(v),
            Store::ReadOnly { .. } => Err(Errno::EROFS),
        }
    }

    /// Run a modifying operation on the mount: EROFS on a read-only
    /// mount, EIO once a flush has failed.
    fn modify<T>(
        &self,
        mut f: impl FnMut(&mut Mount, &str, u64) -> Result<T, Errno>,
    ) -> Result<T, Errno> {
        let v = self.rw()?;
        v.writable().map_err(Errno::from_i32)?;
        self.with_room(v, |m| f(m, &v.label, now_us()))
    }

    /// Run `f` on the mount; when it is refused for lack of space (the
    /// library changes nothing then), make room (`RwVolume::make_room`:
    /// a flush, the frees waiting for it, a bulkfree) and run it once
    /// more.
    fn with_room<T>(
        &self,
        v: &Arc<RwVolume>,
        mut f: impl FnMut(&mut Mount) -> Result<T, Errno>,
    ) -> Result<T, Errno> {
        let r = v.locked(&mut f);
        if r.as_ref().err() == Some(&Errno::ENOSPC) && v.make_room() {
            return v.locked(&mut f);
        }
        r
    }

    /// The inode behind a node id, read-only store: the root, a cached
    /// one, or read from the inode index (and cached if the kernel holds
    /// the node).
    fn inode(&self, pfs: &Pfs, root: &Arc<Inode>, ino: INodeNo) -> Result<Arc<Inode>, Errno> {
        if ino == INodeNo::ROOT {
            return Ok(root.clone());
        }
        if let Some(i) = self.inodes.get(ino.0) {
            return Ok(i);
        }
        let i = Arc::new(self.h(pfs.inode(self.ids.inum(ino.0)))?);
        self.inodes.fill(ino.0, &i);
        Ok(i)
    }

    /// The meta of node `ino`.
    fn meta(&self, ino: INodeNo) -> Result<InodeMeta, Errno> {
        if is_snap(ino.0) {
            return self.snap()?.meta(ino.0, || self.meta(INodeNo::ROOT));
        }
        match &self.store {
            Store::ReadOnly { pfs, root } => Ok(*self.inode(pfs, root, ino)?.meta()),
            Store::ReadWrite(v) => {
                let r = v.locked(|m| m.getattr(&v.label, self.ids.inum(ino.0)));
                self.h(r)
            }
        }
    }

    /// The meta of node `ino` and the bytes its blocks take on disk
    /// (`st_blocks`).
    fn stat(&self, ino: INodeNo) -> Result<(InodeMeta, u64), Errno> {
        if is_snap(ino.0) {
            return self.snap()?.stat(ino.0, || self.meta(INodeNo::ROOT));
        }
        match &self.store {
            Store::ReadOnly { pfs, root } => {
                let i = self.inode(pfs, root, ino)?;
                Ok((*i.meta(), i.stored_bytes()))
            }
            Store::ReadWrite(v) => {
                let inum = self.ids.inum(ino.0);
                v.locked(|m| {
                    let meta = self.h(m.getattr(&v.label, inum))?;
                    Ok((meta, self.h(m.stored_bytes(&v.label, inum))?))
                })
            }
        }
    }

    /// The attributes of node `ino` from its inode (whose blocks take
    /// `bytes`), the link count of a directory aside.
    fn attr_of_meta(&self, ino: u64, m: &InodeMeta, bytes: u64) -> Result<FileAttr, Errno> {
        attr_of(ino, m, bytes).ok_or_else(|| {
            self.fail(&hammer2::Error::corrupt(
                format!("inode {} has object type {}", m.inum, m.obj_type.name()),
                0,
            ))
        })
    }

    /// The attributes of node `ino`, a directory's link count counted
    /// (see `dirlinks`); read-write, the mount must not be locked by the
    /// caller (`attr_locked` is for that).
    fn attr(&self, ino: u64, m: &InodeMeta, bytes: u64) -> Result<FileAttr, Errno> {
        // `.snapshot` and what is under it are read views with their own
        // inode numbers: they keep the link counts on disk.
        if m.obj_type != ObjType::Directory || is_snap(ino) {
            return self.attr_of_meta(ino, m, bytes);
        }
        match &self.store {
            Store::ReadOnly { pfs, root } => {
                let mut a = self.attr_of_meta(ino, m, bytes)?;
                a.nlink = self.dirlinks.nlink(m.inum, || {
                    let dir = self.inode(pfs, root, INodeNo(ino))?;
                    Ok::<_, Errno>(subdirs(&self.h(pfs.readdir_from(&dir, 0))?))
                })?;
                Ok(a)
            }
            Store::ReadWrite(v) => {
                v.locked(|mount| self.attr_locked(mount, &v.label, ino, m, bytes))
            }
        }
    }

    /// `attr` with the read-write mount locked by the caller.
    fn attr_locked(
        &self,
        mount: &mut Mount,
        label: &str,
        ino: u64,
        m: &InodeMeta,
        bytes: u64,
    ) -> Result<FileAttr, Errno> {
        let mut a = self.attr_of_meta(ino, m, bytes)?;
        // A directory removed (rmdir, or replaced by a rename) while it
        // is open has no links: its 0 on disk, not a count.
        if m.obj_type == ObjType::Directory && m.nlinks != 0 {
            a.nlink = self.dirlinks.nlink(m.inum, || {
                Ok::<_, Errno>(subdirs(&self.h(mount.readdir(label, m.inum, 0))?))
            })?;
        }
        Ok(a)
    }

    /// Node `ino`'s attributes from the mount, locked by the caller.
    fn attr_in(&self, m: &mut Mount, label: &str, ino: u64) -> Result<FileAttr, Errno> {
        let inum = self.ids.inum(ino);
        let meta = self.h(m.getattr(label, inum))?;
        let bytes = self.h(m.stored_bytes(label, inum))?;
        self.attr_locked(m, label, ino, &meta, bytes)
    }

    /// May the caller do `mask` (R=4, W=2, X=1)? Always, with
    /// `default_permissions` (the kernel has checked).
    fn check(&self, req: &Request, m: &InodeMeta, mask: u32) -> Result<(), Errno> {
        if !self.check_permissions || inode::permitted(m, req.uid(), |g| in_group(req, g), mask) {
            Ok(())
        } else {
            Err(Errno::EACCES)
        }
    }

    /// In a sticky directory only root and the owners of the entry or
    /// the directory may remove or rename it.
    fn check_sticky(
        &self,
        req: &Request,
        dir: &InodeMeta,
        victim: &InodeMeta,
    ) -> Result<(), Errno> {
        let uid = req.uid();
        if !self.check_permissions
            || uid == 0
            || dir.mode & S_ISVTX == 0
            || uid == victim.uid_unix()
            || uid == dir.uid_unix()
        {
            Ok(())
        } else {
            Err(Errno::EPERM)
        }
    }

    /// With `-o snapdir`, `.snapshot` at the root is the snapshots'
    /// directory (the mount refuses an image with a real entry of that
    /// name, see `has_real_snapdir`): making that name fails with EEXIST
    /// (`making`), removing or renaming it with EROFS, as any change
    /// there.
    fn snapdir_entry(&self, parent: INodeNo, name: &OsStr, making: bool) -> Result<(), Errno> {
        if self.snapdir.is_some() && parent == INodeNo::ROOT && name.as_bytes() == snapdir::NAME {
            return Err(if making { Errno::EEXIST } else { Errno::EROFS });
        }
        Ok(())
    }

    /// Whether the PFS root has a real entry named `.snapshot`, which
    /// `-o snapdir` would hide (the mount is refused then).
    pub fn has_real_snapdir(&self) -> hammer2::Result<bool> {
        match &self.store {
            Store::ReadOnly { pfs, root } => Ok(pfs.lookup(root, snapdir::NAME)?.is_some()),
            Store::ReadWrite(v) => {
                let root = hammer2::mount::ROOT_INUM;
                Ok(v.locked(|m| m.lookup(&v.label, root, snapdir::NAME))?
                    .is_some())
            }
        }
    }

    /// `fs.protected_hardlinks` (the kernel's `may_linkat`), for a mount
    /// without `default_permissions`: the kernel asks the filesystem for
    /// the read and write permission that rule needs, and without
    /// `default_permissions` FUSE grants it, so the check is here. When
    /// the sysctl is 1, a caller who neither is root nor owns the source
    /// may link only a regular file that is not set-user-ID, not
    /// set-group-ID and group-executable, and that they may read and
    /// write (EPERM otherwise).
    fn check_hardlink_source(&self, req: &Request, src: &InodeMeta) -> Result<(), Errno> {
        if !self.check_permissions || req.uid() == 0 || req.uid() == src.uid_unix() {
            return Ok(());
        }
        if !protected_hardlinks() {
            return Ok(());
        }
        let mode = src.mode;
        let safe = src.obj_type == ObjType::Regfile
            && mode & S_ISUID == 0
            && mode & (S_ISGID | S_IXGRP) != (S_ISGID | S_IXGRP)
            && inode::permitted(src, req.uid(), |g| in_group(req, g), 6);
        if safe {
            Ok(())
        } else {
            Err(Errno::EPERM)
        }
    }

    /// A name being made (create, mknod, mkdir, symlink, link, rename's
    /// target): at most NAME_MAX bytes.
    fn new_name(name: &OsStr) -> Result<&[u8], Errno> {
        let n = name.as_bytes();
        if n.len() > NAME_MAX_REPORTED as usize {
            return Err(Errno::ENAMETOOLONG);
        }
        Ok(n)
    }

    /// A directory being changed: write and search permission.
    fn dir_for_change(
        &self,
        req: &Request,
        m: &mut Mount,
        label: &str,
        dir: INodeNo,
    ) -> Result<InodeMeta, Errno> {
        if is_snap(dir.0) {
            return Err(Errno::EROFS);
        }
        let d = self.h(m.getattr(label, self.ids.inum(dir.0)))?;
        if d.obj_type != ObjType::Directory {
            return Err(Errno::ENOTDIR);
        }
        self.check(req, &d, 3)?;
        Ok(d)
    }

    /// The meta of entry `name` of `dir`.
    fn entry_meta(
        &self,
        m: &mut Mount,
        label: &str,
        dir: INodeNo,
        name: &OsStr,
    ) -> Result<InodeMeta, Errno> {
        let inum = self
            .h(m.lookup(label, self.ids.inum(dir.0), name.as_bytes()))?
            .ok_or(Errno::ENOENT)?;
        self.h(m.getattr(label, inum))
    }

    /// setattr's permission rules (chmod, chown, truncate, utimes), for
    /// a mount without `default_permissions`. `fh` is set when the
    /// kernel acts through an open file (ftruncate, writeback of times),
    /// whose opening was checked already.
    fn check_setattr(
        &self,
        req: &Request,
        m: &InodeMeta,
        a: &mut SetAttr,
        times_now: bool,
        fh: bool,
    ) -> Result<(), Errno> {
        if !self.check_permissions || req.uid() == 0 {
            return Ok(());
        }
        let owner = req.uid() == m.uid_unix();
        if let Some(mode) = a.mode.as_mut() {
            // Dropping set-user-ID and set-group-ID is what the kernel
            // asks for after a write by anyone, owner or not.
            let drop_only = *mode == m.mode & 0o7777 & !(S_ISUID | S_ISGID);
            if !owner && !drop_only {
                return Err(Errno::EPERM);
            }
            let gid = a.gid.unwrap_or(m.gid_unix());
            if !in_group(req, gid) {
                *mode &= !S_ISGID;
            }
        }
        if a.uid.is_some_and(|u| u != m.uid_unix()) {
            return Err(Errno::EPERM);
        }
        if a.gid
            .is_some_and(|g| g != m.gid_unix() && !(owner && in_group(req, g)))
        {
            return Err(Errno::EPERM);
        }
        if a.size.is_some() && !fh {
            self.check(req, m, 2)?;
        }
        let times = a.atime.is_some() || a.mtime.is_some();
        if times && !fh && !owner {
            if !times_now {
                return Err(Errno::EPERM);
            }
            self.check(req, m, 2)?;
        }
        Ok(())
    }

    /// The node id of a directory's parent ("..").
    fn parent_ino(&self, dir: &InodeMeta) -> u64 {
        let p = dir.iparent;
        if dir.inum == self.ids.root_inum || p == 0 {
            INodeNo::ROOT.0
        } else {
            self.ids.ino(p)
        }
    }

    fn open_stream(&self) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let stream = Arc::new(DirStream {
            listing: Mutex::new(None),
        });
        self.dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, stream);
        FileHandle(fh)
    }

    /// The entries of directory `ino` with key at least `from`.
    fn list(&self, ino: INodeNo, from: u64) -> Result<Vec<DirEntry>, Errno> {
        match &self.store {
            Store::ReadOnly { pfs, root } => {
                let dir = self.inode(pfs, root, ino)?;
                self.h(pfs.readdir_from(&dir, from))
            }
            Store::ReadWrite(v) => {
                let r = v.locked(|m| m.readdir(&v.label, self.ids.inum(ino.0), from));
                self.h(r)
            }
        }
    }

    /// The entries of `dir` from cookie `offset` on (past ".."): from the
    /// stream's listing, read now if this is the first call or a rewind.
    fn entries_from(
        &self,
        fh: FileHandle,
        dir: INodeNo,
        offset: u64,
    ) -> Result<(Arc<Vec<DirEntry>>, usize), Errno> {
        self.counters.readdirs.fetch_add(1, Ordering::Relaxed);
        let stream = self
            .dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh.0)
            .cloned();
        let Some(stream) = stream else {
            // Not a handle of ours (cannot happen with opendir
            // implemented): list statelessly from the cookie.
            let from = match cookie::resume_key(offset.max(cookie::AFTER_DOTDOT)) {
                Some(k) => k,
                None => return Ok((Arc::new(Vec::new()), 0)),
            };
            return Ok((Arc::new(self.list(dir, from)?), 0));
        };
        let cached = stream
            .listing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let listing = match cached {
            Some(l) if offset != cookie::START => l,
            _ => {
                let l = Arc::new(self.list(dir, 0)?);
                *stream.listing.lock().unwrap_or_else(|p| p.into_inner()) = Some(l.clone());
                // A listing from the start is an access of the directory.
                if let Store::ReadWrite(v) = &self.store {
                    let inum = self.ids.inum(dir.0);
                    v.locked(|m| self.accessed(m, &v.label, inum, now_us()));
                }
                l
            }
        };
        let start = if offset <= cookie::AFTER_DOT {
            0
        } else {
            match cookie::resume_key(offset) {
                Some(k) => listing.partition_point(|e| e.key < k),
                None => listing.len(),
            }
        };
        Ok((listing, start))
    }

    /// A directory being listed: checked to be one.
    fn listed_dir(&self, ino: INodeNo) -> Result<InodeMeta, Errno> {
        let dir = self.meta(ino)?;
        if dir.obj_type != ObjType::Directory {
            return Err(Errno::ENOTDIR);
        }
        Ok(dir)
    }

    /// Reply to an operation that made a node (mknod, mkdir, symlink,
    /// link): the kernel now holds it.
    fn reply_entry(&self, r: Result<FileAttr, Errno>, reply: ReplyEntry) {
        match r {
            Ok(attr) => {
                self.inodes.remember(attr.ino.0, None);
                reply.entry(&self.ttl, &attr, generation(&attr))
            }
            Err(e) => reply.error(e),
        }
    }

    /// Make a non-directory node (file, fifo, socket, device) or a
    /// directory; returns its attributes.
    #[allow(clippy::too_many_arguments)]
    fn make_node(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        obj_type: ObjType,
        mode: u32,
        rdev: u32,
        pin: bool,
    ) -> Result<FileAttr, Errno> {
        self.modify(|m, label, now| {
            self.snapdir_entry(parent, name, true)?;
            let dir = self.dir_for_change(req, m, label, parent)?;
            let is_dir = obj_type == ObjType::Directory;
            let (uid, gid, mode) = new_owner(req, &dir, mode, is_dir);
            let dinum = self.ids.inum(parent.0);
            let name = Self::new_name(name)?;
            let inum = if is_dir {
                let inum = self.h(m.mkdir(label, dinum, name, mode, uid, gid, now))?;
                self.dirlinks.added(dinum);
                inum
            } else {
                let dev = dev_of(rdev);
                self.h(m.create(label, dinum, name, obj_type, mode, uid, gid, dev, now))?
            };
            if pin {
                self.h(m.pin(label, inum))?;
            }
            self.attr_in(m, label, self.ids.ino(inum))
        })
    }

    /// A change of file `inum`'s data by the caller of `req` (write,
    /// truncate, fallocate): clear set-user-ID and set-group-ID as Linux
    /// does for local filesystems (`setattr_should_drop_suidgid`) unless
    /// the caller holds CAP_FSETID: set-user-ID always, set-group-ID
    /// when the file is group-executable or the caller is not in its
    /// group. The kernel has FUSE drop set-user-ID, and set-group-ID of a
    /// group-executable file, itself (a SETATTR before the change), but
    /// not a set-group-ID bit without group execute
    /// (fs/fuse/dir.c, `fuse_setattr`): that is left to the filesystem.
    fn drop_suid_sgid(
        &self,
        req: &Request,
        m: &mut Mount,
        label: &str,
        inum: u64,
    ) -> Result<(), Errno> {
        let meta = self.h(m.getattr(label, inum))?;
        if meta.mode & (S_ISUID | S_ISGID) == 0 || meta.obj_type != ObjType::Regfile {
            return Ok(());
        }
        let old = meta.mode & 0o7777;
        let mut mode = old & !S_ISUID;
        if old & S_ISGID != 0 && (old & S_IXGRP != 0 || !in_group(req, meta.gid_unix())) {
            mode &= !S_ISGID;
        }
        if mode == old || inode::has_cap_fsetid(req.pid(), req.uid()) {
            return Ok(());
        }
        let a = SetAttr {
            mode: Some(mode),
            ..SetAttr::default()
        };
        self.h(m.setattr(label, inum, a, now_us()))?;
        self.attrs_changed(self.ids.ino(inum));
        Ok(())
    }

    /// Lookups of "." (`dotdot` false) and ".." in node `node`, which
    /// the kernel sends only to decode a file handle whose node it no
    /// longer holds (FUSE_EXPORT_SUPPORT: `open_by_handle_at`, an NFS
    /// export), never for a path: "." is the node itself, whatever its
    /// type, ".." a directory's parent (the root's is the root). The
    /// caller may decode handles (CAP_DAC_READ_SEARCH), so no search
    /// permission is checked. An inode removed since (no links, no
    /// opener) is not found: ENOENT, which the kernel turns into ESTALE.
    fn lookup_dots(&self, node: INodeNo, dotdot: bool) -> Result<FileAttr, Errno> {
        let target = if !dotdot {
            node.0
        } else if is_snap(node.0) {
            self.snap()?
                .list(node.0, INodeNo::ROOT.0, || self.snap_source())?
                .0
        } else {
            let dir = self.meta(node)?;
            if dir.obj_type != ObjType::Directory {
                return Err(Errno::ENOTDIR);
            }
            self.parent_ino(&dir)
        };
        let (m, bytes) = self.stat(INodeNo(target))?;
        self.attr(target, &m, bytes)
    }

    /// Zero `[offset, offset + len)` of a file, within its size, through
    /// the library: only where there is data (holes stay), a chunk per
    /// mount lock. The flush turns the zeroed blocks into holes.
    fn punch_hole(&self, v: &Arc<RwVolume>, inum: u64, offset: u64, len: u64) -> Result<(), Errno> {
        // A bounded range per hold of the mount: whole blocks are
        // dropped in memory, so this is cheap, but a huge range should
        // not stall every other request.
        const PUNCH_CHUNK: u64 = 1 << 30;
        let end = offset.saturating_add(len);
        let mut pos = offset;
        while pos < end {
            v.writable().map_err(Errno::from_i32)?;
            let n = (end - pos).min(PUNCH_CHUNK);
            self.with_room(v, |m| {
                let r = m.punch_hole(&v.label, inum, pos, n, now_us());
                self.h(r)
            })?;
            pos += n;
        }
        Ok(())
    }
}

/// `fs.protected_hardlinks` as the kernel has it now (read at each
/// link, as the kernel does); on when it cannot be read, the side that
/// refuses.
fn protected_hardlinks() -> bool {
    std::fs::read_to_string("/proc/sys/fs/protected_hardlinks").map_or(true, |v| v.trim() != "0")
}

/// How many of a directory's entries are directories.
fn subdirs(entries: &[DirEntry]) -> u32 {
    let n = entries
        .iter()
        .filter(|e| e.obj_type == ObjType::Directory)
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn entry_kind(e: &DirEntry) -> FileType {
    // d_type is a hint; an entry of a type no file has lists as a file
    // and fails when its inode is read.
    inode::file_type(e.obj_type).unwrap_or(FileType::RegularFile)
}

impl Filesystem for Hammer2Fs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let mut caps = vec![
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            // File handles outlive the kernel's inode cache: it asks
            // for "." and ".." by node id (`lookup_dots`).
            InitFlags::FUSE_EXPORT_SUPPORT,
        ];
        if self.writeback_cache {
            // The kernel keeps written pages and sends them in large
            // writes (and manages mtime itself); fsync and close flush
            // them to us first.
            caps.push(InitFlags::FUSE_WRITEBACK_CACHE);
        }
        for cap in caps {
            if config.add_capabilities(cap).is_err() {
                log::debug!("kernel does not offer {cap:?}");
            }
        }
        if let Err(max) = config.set_max_write(MAX_WRITE_BYTES) {
            let _ = config.set_max_write(max);
        }
        // Times are stored in microseconds.
        let _ = config.set_time_granularity(Duration::from_micros(1));
        Ok(())
    }

    fn destroy(&mut self) {
        let c = &self.counters;
        log::info!(
            "{}: {} lookups, {} reads ({} bytes), {} writes ({} bytes), {} directory reads, \
             {} errors",
            self.label,
            c.lookups.load(Ordering::Relaxed),
            c.reads.load(Ordering::Relaxed),
            c.bytes_read.load(Ordering::Relaxed),
            c.writes.load(Ordering::Relaxed),
            c.bytes_written.load(Ordering::Relaxed),
            c.readdirs.load(Ordering::Relaxed),
            c.errors.load(Ordering::Relaxed),
        );
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.counters.lookups.fetch_add(1, Ordering::Relaxed);
        let r = (|| {
            let max = match self.store {
                Store::ReadOnly { .. } => DIRENT_NAME_MAX,
                Store::ReadWrite(_) => NAME_MAX_REPORTED as usize,
            };
            if name.len() > max {
                return Err(Errno::ENAMETOOLONG);
            }
            if name == "." || name == ".." {
                return self.lookup_dots(parent, name == "..");
            }
            if is_snap(parent.0) {
                let dir = self.meta(parent)?;
                self.check(req, &dir, 1)?;
                return self
                    .snap()?
                    .lookup(parent.0, name.as_bytes(), || self.snap_source());
            }
            if parent == INodeNo::ROOT && name.as_bytes() == snapdir::NAME && self.snapdir.is_some()
            {
                let (m, bytes) = self.stat(INodeNo(snapdir::SNAP_BIT))?;
                return self.attr(snapdir::SNAP_BIT, &m, bytes);
            }
            match &self.store {
                Store::ReadOnly { pfs, root } => {
                    let dir = self.inode(pfs, root, parent)?;
                    if !dir.is_dir() {
                        return Err(Errno::ENOTDIR);
                    }
                    self.check(req, dir.meta(), 1)?;
                    let e = self
                        .h(pfs.lookup(&dir, name.as_bytes()))?
                        .ok_or(Errno::ENOENT)?;
                    let ino = self.ids.ino(e.inum);
                    let inode = self.inode(pfs, root, INodeNo(ino))?;
                    let attr = self.attr(ino, inode.meta(), inode.stored_bytes())?;
                    self.inodes.remember(ino, Some(inode));
                    Ok(attr)
                }
                Store::ReadWrite(v) => {
                    let (ino, attr) = v.locked(|m| {
                        let dir = self.h(m.getattr(&v.label, self.ids.inum(parent.0)))?;
                        if dir.obj_type != ObjType::Directory {
                            return Err(Errno::ENOTDIR);
                        }
                        self.check(req, &dir, 1)?;
                        let meta = self.entry_meta(m, &v.label, parent, name)?;
                        let ino = self.ids.ino(meta.inum);
                        Ok((ino, self.attr_in(m, &v.label, ino)?))
                    })?;
                    self.inodes.remember(ino, None);
                    Ok(attr)
                }
            }
        })();
        match r {
            Ok(attr) => {
                if name == "." || name == ".." {
                    self.inodes.remember(attr.ino.0, None);
                }
                reply.entry(&self.ttl, &attr, generation(&attr))
            }
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if ino != INodeNo::ROOT && !is_snap(ino.0) {
            self.inodes.forget(ino.0, nlookup);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.stat(ino).and_then(|(m, b)| self.attr(ino.0, &m, b)) {
            Ok(attr) => reply.attr(&self.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if is_snap(ino.0) {
            return reply.error(Errno::EROFS);
        }
        let r = self.modify(|m, label, now| {
            let inum = self.ids.inum(ino.0);
            let meta = self.h(m.getattr(label, inum))?;
            let time = |t: TimeOrNow| match t {
                TimeOrNow::Now => now,
                TimeOrNow::SpecificTime(t) => micros(t),
            };
            let times_now = matches!(atime, Some(TimeOrNow::Now) | None)
                && matches!(mtime, Some(TimeOrNow::Now) | None);
            let mut a = SetAttr {
                mode: mode.map(|m| m & 0o7777),
                uid,
                gid,
                size,
                atime: atime.map(time),
                mtime: mtime.map(time),
                ctime: ctime.map(micros),
            };
            self.check_setattr(req, &meta, &mut a, times_now, fh.is_some())?;
            self.h(m.setattr(label, inum, a, now))?;
            if size.is_some() {
                self.drop_suid_sgid(req, m, label, inum)?;
            }
            self.attr_in(m, label, ino.0)
        });
        match r {
            Ok(attr) => reply.attr(&self.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = match &self.store {
            _ if is_snap(ino.0) => self.snap().and_then(|sd| sd.readlink(ino.0)),
            Store::ReadOnly { pfs, root } => self
                .inode(pfs, root, ino)
                .and_then(|i| self.h(pfs.readlink(&i))),
            Store::ReadWrite(v) => {
                let r = v.locked(|m| m.readlink(&v.label, self.ids.inum(ino.0)));
                self.h(r)
            }
        };
        match r {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = mknod_type(mode)
            .ok_or(Errno::EINVAL)
            .and_then(|t| self.make_node(req, parent, name, t, mode, rdev, false));
        self.reply_entry(r, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.make_node(req, parent, name, ObjType::Directory, mode, 0, false);
        self.reply_entry(r, reply);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.modify(|m, label, now| {
            self.snapdir_entry(parent, name, false)?;
            let dir = self.dir_for_change(req, m, label, parent)?;
            let victim = self.entry_meta(m, label, parent, name)?;
            self.check_sticky(req, &dir, &victim)?;
            self.h(m.unlink(label, self.ids.inum(parent.0), name.as_bytes(), now))
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.modify(|m, label, now| {
            self.snapdir_entry(parent, name, false)?;
            let dir = self.dir_for_change(req, m, label, parent)?;
            let victim = self.entry_meta(m, label, parent, name)?;
            self.check_sticky(req, &dir, &victim)?;
            let dinum = self.ids.inum(parent.0);
            self.h(m.rmdir(label, dinum, name.as_bytes(), now))?;
            self.dirlinks.removed(dinum);
            self.dirlinks.forget(victim.inum);
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.modify(|m, label, now| {
            self.snapdir_entry(parent, link_name, true)?;
            let dir = self.dir_for_change(req, m, label, parent)?;
            let (uid, gid, _) = new_owner(req, &dir, 0o777, false);
            let target = target.as_os_str().as_bytes();
            let inum = self.h(m.symlink(
                label,
                self.ids.inum(parent.0),
                Self::new_name(link_name)?,
                target,
                uid,
                gid,
                now,
            ))?;
            self.attr_in(m, label, self.ids.ino(inum))
        });
        self.reply_entry(r, reply);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.modify(|m, label, now| {
            let whiteout = flags.contains(RenameFlags::RENAME_WHITEOUT);
            if whiteout && flags.contains(RenameFlags::RENAME_EXCHANGE) {
                return Err(Errno::EINVAL);
            }
            self.snapdir_entry(parent, name, false)?;
            self.snapdir_entry(newparent, newname, false)?;
            let odir = self.dir_for_change(req, m, label, parent)?;
            let ndir = self.dir_for_change(req, m, label, newparent)?;
            let src = self.entry_meta(m, label, parent, name)?;
            self.check_sticky(req, &odir, &src)?;
            let dst = match self.entry_meta(m, label, newparent, newname) {
                Ok(d) => Some(d),
                Err(e) if e == Errno::ENOENT => None,
                Err(e) => return Err(e),
            };
            if let Some(d) = &dst {
                self.check_sticky(req, &ndir, d)?;
            }
            // A directory that changes parent has its ".." rewritten.
            if parent != newparent {
                if src.obj_type == ObjType::Directory {
                    self.check(req, &src, 2)?;
                }
                if let Some(d) = dst.filter(|_| flags.contains(RenameFlags::RENAME_EXCHANGE)) {
                    if d.obj_type == ObjType::Directory {
                        self.check(req, &d, 2)?;
                    }
                }
            }
            let f = hammer2::mount::RenameFlags {
                noreplace: flags.contains(RenameFlags::RENAME_NOREPLACE),
                exchange: flags.contains(RenameFlags::RENAME_EXCHANGE),
            };
            let is_dir = |m: &InodeMeta| m.obj_type == ObjType::Directory;
            let moves_dir = is_dir(&src) || dst.as_ref().is_some_and(is_dir);
            let (odinum, ndinum) = (self.ids.inum(parent.0), self.ids.inum(newparent.0));
            let newname = Self::new_name(newname)?;
            if whiteout {
                // The whiteout left at the old name is the caller's, as
                // a node made in that directory would be.
                let (uid, gid, _) = new_owner(req, &odir, 0, false);
                self.h(m.rename_whiteout(
                    label,
                    odinum,
                    name.as_bytes(),
                    ndinum,
                    newname,
                    f.noreplace,
                    uid,
                    gid,
                    now,
                ))?;
            } else {
                self.h(m.rename(label, odinum, name.as_bytes(), ndinum, newname, f, now))?;
            }
            // Directories moved or replaced: both parents are recounted.
            if moves_dir {
                self.dirlinks.forget(odinum);
                self.dirlinks.forget(ndinum);
                if let Some(d) = dst.filter(|d| is_dir(d) && !f.exchange) {
                    self.dirlinks.forget(d.inum);
                }
            }
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        if is_snap(ino.0) {
            return reply.error(Errno::EXDEV);
        }
        let r = self.modify(|m, label, now| {
            self.snapdir_entry(newparent, newname, true)?;
            self.dir_for_change(req, m, label, newparent)?;
            let inum = self.ids.inum(ino.0);
            self.check_hardlink_source(req, &self.h(m.getattr(label, inum))?)?;
            let ndir = self.ids.inum(newparent.0);
            self.h(m.link(label, inum, ndir, Self::new_name(newname)?, now))?;
            self.attr_in(m, label, ino.0)
        });
        self.reply_entry(r, reply);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mask = match flags.acc_mode() {
            OpenAccMode::O_RDONLY => 4,
            OpenAccMode::O_WRONLY => 2,
            OpenAccMode::O_RDWR => 6,
        };
        let r = match &self.store {
            _ if is_snap(ino.0) => (|| {
                if mask != 4 {
                    return Err(Errno::EROFS);
                }
                let meta = self.meta(ino)?;
                if meta.obj_type == ObjType::Directory {
                    return Err(Errno::EISDIR);
                }
                self.check(req, &meta, 4).map(|()| false)
            })(),
            Store::ReadOnly { pfs, root } => (|| {
                if mask != 4 {
                    return Err(Errno::EROFS);
                }
                let inode = self.inode(pfs, root, ino)?;
                if inode.is_dir() {
                    return Err(Errno::EISDIR);
                }
                self.check(req, inode.meta(), 4).map(|()| false)
            })(),
            Store::ReadWrite(v) => (|| {
                if mask & 2 != 0 {
                    v.writable().map_err(Errno::from_i32)?;
                }
                let inum = self.ids.inum(ino.0);
                v.locked(|m| {
                    let meta = self.h(m.getattr(&v.label, inum))?;
                    if meta.obj_type == ObjType::Directory {
                        return Err(Errno::EISDIR);
                    }
                    self.check(req, &meta, mask)?;
                    self.h(m.pin(&v.label, inum))?;
                    // Reads that update the access time must reach us, not
                    // the page cache (see `atime`).
                    Ok(mask & 4 != 0 && self.atime.due(&meta, now_us()))
                })
            })(),
        };
        match r {
            // Every change goes through the kernel's page cache, so
            // cached pages stay valid across opens.
            Ok(false) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Ok(true) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.make_node(req, parent, name, ObjType::Regfile, mode, 0, true);
        match r {
            Ok(attr) => {
                self.inodes.remember(attr.ino.0, None);
                reply.created(
                    &self.ttl,
                    &attr,
                    generation(&attr),
                    FileHandle(0),
                    FopenFlags::FOPEN_KEEP_CACHE,
                )
            }
            Err(e) => reply.error(e),
        }
    }

    /// O_TMPFILE: an unnamed file in `parent` (`Mount::tmpfile`), owned
    /// and moded as `create` makes one, pinned for the open this reply
    /// makes; `link` names it (`linkat(2)`), its last release removes it
    /// otherwise.
    fn tmpfile(
        &self,
        req: &Request,
        parent: INodeNo,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.modify(|m, label, now| {
            let dir = self.dir_for_change(req, m, label, parent)?;
            let (uid, gid, mode) = new_owner(req, &dir, mode, false);
            let dinum = self.ids.inum(parent.0);
            let inum = self.h(m.tmpfile(label, dinum, mode, uid, gid, now))?;
            self.attr_in(m, label, self.ids.ino(inum))
        });
        match r {
            Ok(attr) => {
                self.inodes.remember(attr.ino.0, None);
                reply.created(
                    &self.ttl,
                    &attr,
                    generation(&attr),
                    FileHandle(0),
                    FopenFlags::FOPEN_KEEP_CACHE,
                )
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        let r = match &self.store {
            _ if is_snap(ino.0) => self
                .snap()
                .and_then(|sd| sd.read(ino.0, offset, size as usize)),
            Store::ReadOnly { pfs, root } => self
                .inode(pfs, root, ino)
                .and_then(|i| self.h(pfs.read(&i, offset, size as usize))),
            Store::ReadWrite(v) => {
                let inum = self.ids.inum(ino.0);
                let r = v.read_noting(inum, offset, size as usize, |m| {
                    self.accessed(m, &v.label, inum, now_us())
                });
                self.h(r)
            }
        };
        match r {
            Ok(data) => {
                self.counters
                    .bytes_read
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                reply.data(&data)
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        let r = self.rw().and_then(|v| {
            v.writable().map_err(Errno::from_i32)?;
            self.with_room(v, |m| {
                let inum = self.ids.inum(ino.0);
                self.drop_suid_sgid(req, m, &v.label, inum)?;
                let r = m.write(&v.label, inum, offset, data, now_us());
                self.h(r)?;
                v.note_written(m, data.len() as u64);
                Ok(())
            })?;
            v.throttle();
            Ok(())
        });
        match r {
            Ok(()) => {
                self.counters
                    .bytes_written
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                reply.written(data.len() as u32)
            }
            Err(e) => reply.error(e),
        }
    }

    /// close(2): nothing to write here (the flusher does), but a mount
    /// whose flush failed says so.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match &self.store {
            Store::ReadWrite(v) if v.writable().is_err() => reply.error(Errno::EIO),
            _ => reply.ok(),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let (Store::ReadWrite(v), false) = (&self.store, is_snap(ino.0)) {
            let r = v.locked(|m| m.unpin(&v.label, self.ids.inum(ino.0)));
            if let Err(e) = r {
                self.fail(&e);
            }
        }
        reply.ok();
    }

    /// syncfs(2), and sync(2) for every filesystem (the kernel sends it on
    /// fuseblk mounts, Linux 6.18 and later): as fsync, a flush of
    /// everything, started after the call.
    fn syncfs(&self, req: &Request, ino: INodeNo, reply: ReplyEmpty) {
        self.fsync(req, ino, FileHandle(0), false, reply);
    }

    /// FUSE_DESTROY, which umount(2) of a fuseblk mount waits for: write
    /// the last flush and let go of the image before it is answered, so
    /// that when umount returns the image is final and free for the next
    /// mount, fsck, or a copy. (The session's end runs the same steps
    /// again in `mount::serve`, as no-ops.)
    fn destroy_request(&self) {
        if let Store::ReadWrite(v) = &self.store {
            v.unmounted();
            if let Err(why) = v.shutdown() {
                log::debug!("last flush at FUSE_DESTROY: {why}");
            }
            v.release();
        }
    }

    /// fsync and fdatasync: a flush of everything (HAMMER2 commits the
    /// whole filesystem at once), started after the call.
    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match &self.store {
            Store::ReadWrite(v) => match v.sync() {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(Errno::from_i32(e)),
            },
            Store::ReadOnly { .. } => reply.ok(),
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let r = self.listed_dir(ino).and_then(|d| self.check(req, &d, 4));
        let r = r.and_then(|()| match &self.store {
            _ if is_snap(ino.0) => Ok(()),
            Store::ReadWrite(v) => {
                let r = v.locked(|m| m.pin(&v.label, self.ids.inum(ino.0)));
                self.h(r)
            }
            Store::ReadOnly { .. } => Ok(()),
        });
        match r {
            Ok(()) => reply.opened(self.open_stream(), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if is_snap(ino.0) {
            let r = self.snap_readdir(ino, offset, |child, next, kind, name| {
                reply.add(INodeNo(child), next, kind, name)
            });
            return match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            };
        }
        let r = self.listed_dir(ino).and_then(|dir| {
            let (entries, start) = self.entries_from(fh, ino, offset)?;
            Ok((dir, entries, start))
        });
        let (dir, entries, start) = match r {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        if offset == cookie::START && reply.add(ino, cookie::AFTER_DOT, FileType::Directory, ".") {
            return reply.ok();
        }
        if offset <= cookie::AFTER_DOT
            && reply.add(
                INodeNo(self.parent_ino(&dir)),
                cookie::AFTER_DOTDOT,
                FileType::Directory,
                "..",
            )
        {
            return reply.ok();
        }
        for e in &entries[start..] {
            let full = reply.add(
                INodeNo(self.ids.ino(e.inum)),
                cookie::after_key(e.key),
                entry_kind(e),
                OsStr::from_bytes(&e.name),
            );
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        if is_snap(ino.0) {
            let r = self.snap_readdir(ino, offset, |child, next, _kind, name| {
                // "." and ".." take no reference; their attributes are
                // ignored but must still be some node's.
                let dots = name == OsStr::new(".") || name == OsStr::new("..");
                let attr = self
                    .stat(INodeNo(child))
                    .and_then(|(m, b)| self.attr(child, &m, b));
                let (attr, ttl) = match attr {
                    Ok(a) => (a, self.ttl),
                    Err(_) if dots => {
                        (placeholder_attr(child, FileType::Directory), Duration::ZERO)
                    }
                    Err(_) => return false,
                };
                reply.add(INodeNo(child), next, name, &ttl, &attr, generation(&attr))
            });
            return match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            };
        }
        let r = self.listed_dir(ino).and_then(|dir| {
            let (entries, start) = self.entries_from(fh, ino, offset)?;
            let attr = self.attr(ino.0, &dir, hammer2::pfs::stored_bytes(&dir, 0))?;
            Ok((dir, attr, entries, start))
        });
        let (dir, dir_attr, entries, start) = match r {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        // The kernel takes no reference for "." and ".." and ignores
        // their attributes; ".." gets the directory's own with the
        // parent's node id.
        let g = generation(&dir_attr);
        if offset == cookie::START
            && reply.add(ino, cookie::AFTER_DOT, ".", &self.ttl, &dir_attr, g)
        {
            return reply.ok();
        }
        let mut parent_attr = dir_attr;
        parent_attr.ino = INodeNo(self.parent_ino(&dir));
        if offset <= cookie::AFTER_DOT
            && reply.add(
                parent_attr.ino,
                cookie::AFTER_DOTDOT,
                "..",
                &self.ttl,
                &parent_attr,
                g,
            )
        {
            return reply.ok();
        }
        // Read-write: the attributes of a batch of entries per hold of
        // the mount (each unit reruns after a cache miss, so nothing is
        // added to the reply inside it).
        const ATTR_BATCH: usize = 64;
        let mut batch: std::collections::VecDeque<Option<FileAttr>> = Default::default();
        for (i, e) in entries[start..].iter().enumerate() {
            let child = self.ids.ino(e.inum);
            // An inode that cannot be read still lists (by name and
            // type, with a zero TTL); stat on it then gets the error.
            let (inode, attr) = match &self.store {
                Store::ReadOnly { pfs, root } => match self.inode(pfs, root, INodeNo(child)) {
                    Ok(i) => {
                        let a = self.attr(child, i.meta(), i.stored_bytes()).ok();
                        (Some(i), a)
                    }
                    Err(_) => (None, None),
                },
                Store::ReadWrite(v) => {
                    if batch.is_empty() {
                        let next = &entries[start + i..(start + i + ATTR_BATCH).min(entries.len())];
                        batch = v.locked(|m| {
                            next.iter()
                                .map(|e| self.attr_in(m, &v.label, self.ids.ino(e.inum)).ok())
                                .collect()
                        });
                    }
                    (None, batch.pop_front().flatten())
                }
            };
            let (attr, ttl) = match attr {
                Some(a) => (a, self.ttl),
                None => (placeholder_attr(child, entry_kind(e)), Duration::ZERO),
            };
            let full = reply.add(
                INodeNo(child),
                cookie::after_key(e.key),
                OsStr::from_bytes(&e.name),
                &ttl,
                &attr,
                generation(&attr),
            );
            if full {
                break;
            }
            self.inodes
                .remember(child, inode.filter(|_| ttl > Duration::ZERO));
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        if let (Store::ReadWrite(v), false) = (&self.store, is_snap(ino.0)) {
            let r = v.locked(|m| m.unpin(&v.label, self.ids.inum(ino.0)));
            if let Err(e) = r {
                self.fail(&e);
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.fsync(req, ino, fh, datasync, reply);
    }

    /// In 64 KiB blocks: the volume's size, free space (read-only: from
    /// the volume header; read-write: from the allocator) and available
    /// space (free less the flush reserve, which ordinary writes cannot
    /// take, and, read-write, less what is admitted for the next flush);
    /// inodes: this PFS's count, and as many more as 1 KiB inode blocks
    /// fit in the available space.
    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let r = match &self.store {
            Store::ReadOnly { pfs, root } => {
                let h = &pfs.volume().header;
                let free = h.allocator_free.min(h.allocator_size);
                Ok((
                    h.allocator_size,
                    free,
                    // What a read-write mount would let writes take.
                    free.saturating_sub(hammer2::alloc::reserve_for(h.allocator_size)),
                    root.bref.inode_count(),
                ))
            }
            Store::ReadWrite(v) => {
                let r = v.locked(|m| m.statfs(&v.label));
                self.h(r).map(|s| {
                    (
                        s.bytes_total,
                        s.bytes_free.min(s.bytes_total),
                        s.bytes_avail.min(s.bytes_total),
                        s.inodes_used,
                    )
                })
            }
        };
        let (total, free, avail, inodes) = match r {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        let bs = u64::from(BLOCK_BYTES);
        let files_free = avail / INODE_BYTES;
        reply.statfs(
            total / bs,
            free / bs,
            avail / bs,
            inodes.saturating_add(files_free),
            files_free,
            BLOCK_BYTES,
            NAME_MAX_REPORTED,
            BLOCK_BYTES,
        );
    }

    /// HAMMER2 keeps no extended attributes.
    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EOPNOTSUPP);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::NO_XATTR);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::NO_XATTR);
    }

    /// The control channel (`hammer2::ctl`): the one ioctl the `hammer2`
    /// tool sends on any file or directory of the mount. Anything else:
    /// ENOTTY (the kernel does not remember an ENOSYS for ioctl).
    fn ioctl(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: ReplyIoctl,
    ) {
        if cmd != hammer2::ctl::CTL_IOC || (out_size as usize) < hammer2::ctl::CTL_BUF {
            reply.error(Errno::ENOTTY);
            return;
        }
        let out = crate::ctl::serve(self, req.uid(), self.ids.inum(ino.0), in_data);
        reply.ioctl(0, &out);
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let r = self.meta(ino).and_then(|m| {
            if mask.contains(AccessFlags::W_OK) && (!self.read_write() || is_snap(ino.0)) {
                return Err(Errno::EROFS);
            }
            self.check(req, &m, mask.bits() as u32 & 0o7)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// fallocate: mode 0 and KEEP_SIZE reserve room for every block of
    /// the range (`Mount::fallocate`: writes there cannot fail for lack
    /// of space while mounted; ENOSPC when the volume cannot hold it),
    /// mode 0 also extends the size (the new range reads as zeros);
    /// PUNCH_HOLE|KEEP_SIZE drops the range's blocks and zeroes partial
    /// ones (`Mount::punch_hole`); ZERO_RANGE, with or without KEEP_SIZE,
    /// does both (`Mount::zero_range`). Other modes: EOPNOTSUPP (the
    /// kernel refuses COLLAPSE_RANGE and INSERT_RANGE for FUSE itself).
    /// A caller without CAP_FSETID loses set-user-ID and set-group-ID
    /// first, as with a write.
    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE;
        const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
        let r = (|| {
            let v = self.rw()?;
            v.writable().map_err(Errno::from_i32)?;
            let inum = self.ids.inum(ino.0);
            offset.checked_add(length).ok_or(Errno::EFBIG)?;
            let meta = self.h(v.locked(|m| m.getattr(&v.label, inum)))?;
            if meta.obj_type != ObjType::Regfile {
                return Err(Errno::ENODEV);
            }
            if !matches!(mode, 0 | KEEP) && mode != PUNCH | KEEP && mode & !KEEP != ZERO {
                return Err(Errno::EOPNOTSUPP);
            }
            v.locked(|m| self.drop_suid_sgid(req, m, &v.label, inum))?;
            match mode {
                0 | KEEP => self.with_room(v, |m| {
                    let r = m.fallocate(&v.label, inum, offset, length, mode == KEEP, now_us());
                    self.h(r)
                }),
                m if m == PUNCH | KEEP => self.punch_hole(v, inum, offset, length),
                m if m & !KEEP == ZERO => self.with_room(v, |m| {
                    let r =
                        m.zero_range(&v.label, inum, offset, length, mode & KEEP != 0, now_us());
                    self.h(r)
                }),
                _ => Err(Errno::EOPNOTSUPP),
            }
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// SEEK_DATA and SEEK_HOLE (the kernel answers the other whences):
    /// data is every 64 KiB block the file has; a hole is anything else,
    /// up to the size. The same answer read-only (`Pfs::seek_data`), in
    /// `.snapshot`, and read-write (`Mount::seek_data`, where blocks
    /// written since the last flush count as data).
    ///
    /// ENOSYS with the writeback cache; the kernel then answers itself,
    /// for good, with its own size: all data, the only hole at the end.
    /// The writeback cache needs that because the kernel asks without
    /// writing back its dirty pages first (fs/fuse/file.c, `fuse_lseek`):
    /// a file just written would look like a hole here, and cp(1), which
    /// copies by SEEK_DATA, would copy zeros. That is why the writeback
    /// cache is not the default.
    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let r = (|| {
            let data = match whence {
                libc::SEEK_DATA => true,
                libc::SEEK_HOLE => false,
                _ => return Err(Errno::EINVAL),
            };
            let offset = u64::try_from(offset).map_err(|_| Errno::ENXIO)?;
            let at = if is_snap(ino.0) {
                self.snap()?.seek(ino.0, offset, data)?
            } else {
                match &self.store {
                    Store::ReadOnly { pfs, root } => {
                        let i = self.inode(pfs, root, ino)?;
                        if data {
                            self.h(pfs.seek_data(&i, offset))?
                        } else if offset < i.meta().size {
                            Some(self.h(pfs.seek_hole(&i, offset))?)
                        } else {
                            None
                        }
                    }
                    Store::ReadWrite(v) if !self.writeback_cache => {
                        let inum = self.ids.inum(ino.0);
                        v.locked(|m| {
                            let size = self.h(m.getattr(&v.label, inum))?.size;
                            Ok::<_, Errno>(if data {
                                self.h(m.seek_data(&v.label, inum, offset))?
                            } else if offset < size {
                                Some(self.h(m.seek_hole(&v.label, inum, offset))?)
                            } else {
                                None
                            })
                        })?
                    }
                    Store::ReadWrite(_) => return Err(Errno::ENOSYS),
                }
            };
            // At or past the end, and SEEK_DATA with only holes after.
            let at = at.ok_or(Errno::ENXIO)?;
            i64::try_from(at).map_err(|_| Errno::EOVERFLOW)
        })();
        match r {
            Ok(at) => reply.offset(at),
            Err(e) => reply.error(e),
        }
    }

    /// Read and write through the library, a MiB per mount lock; holes
    /// in the source are written as zeros, which the flush stores as
    /// holes again.
    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let r = (|| {
            let v = self.rw()?;
            if !flags.is_empty() {
                return Err(Errno::EINVAL);
            }
            if is_snap(ino_in.0) || is_snap(ino_out.0) {
                // Across to or from a snapshot: the caller copies itself.
                return Err(Errno::EXDEV);
            }
            let (src, dst) = (self.ids.inum(ino_in.0), self.ids.inum(ino_out.0));
            // The reply counts in 32 bits.
            let len = len.min(u64::from(u32::MAX) & !0xfff);
            if src == dst
                && offset_in < offset_out.saturating_add(len)
                && offset_out < offset_in.saturating_add(len)
            {
                return Err(Errno::EINVAL);
            }
            let mut done = 0u64;
            while done < len {
                v.writable().map_err(Errno::from_i32)?;
                let n = (len - done).min(CHUNK_BYTES) as usize;
                let data = self.h(v.read(src, offset_in + done, n))?;
                if data.is_empty() {
                    break;
                }
                let r = self.with_room(v, |m| {
                    let r = m.write(&v.label, dst, offset_out + done, &data, now_us());
                    self.h(r)?;
                    v.note_written(m, data.len() as u64);
                    Ok(())
                });
                match r {
                    // Short copy: what was copied stands.
                    Err(e) if e == Errno::ENOSPC && done > 0 => break,
                    r => r?,
                }
                v.throttle();
                done += data.len() as u64;
            }
            Ok(done as u32)
        })();
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_decode_as_the_kernel_encodes_them() {
        for (ma, mi) in [(0, 0), (8, 1), (1, 3), (259, 65536 + 7), (4095, 0xfffff)] {
            assert_eq!(dev_of(inode::rdev_of(ma, mi)), (ma, mi));
        }
    }

    #[test]
    fn mknod_types() {
        assert_eq!(mknod_type(libc::S_IFIFO | 0o644), Some(ObjType::Fifo));
        assert_eq!(mknod_type(0o644), Some(ObjType::Regfile));
        assert_eq!(mknod_type(libc::S_IFSOCK), Some(ObjType::Socket));
        assert_eq!(mknod_type(libc::S_IFDIR | 0o755), None);
    }

    #[test]
    fn times_are_signed_microseconds_clamped_to_their_range() {
        assert_eq!(micros(UNIX_EPOCH + Duration::from_micros(1500)), 1500);
        // -1.5 s: DragonFly's (u64)-2 * 1000000 + 500000.
        let before = UNIX_EPOCH - Duration::from_millis(1500);
        assert_eq!(
            micros(before),
            0u64.wrapping_sub(2_000_000).wrapping_add(500_000)
        );
        // Below a microsecond rounds down, before 1970 too.
        assert_eq!(micros(UNIX_EPOCH + Duration::from_nanos(1999)), 1);
        assert_eq!(micros(UNIX_EPOCH - Duration::from_nanos(1)), u64::MAX);
        let last = UNIX_EPOCH + Duration::from_micros(i64::MAX as u64);
        assert_eq!(micros(last), i64::MAX as u64);
        assert_eq!(micros(last + Duration::from_secs(1)), i64::MAX as u64);
        let first = UNIX_EPOCH - Duration::from_micros(1 << 63);
        assert_eq!(micros(first), 1 << 63);
        assert_eq!(micros(first - Duration::from_secs(1)), 1 << 63);
    }
}
