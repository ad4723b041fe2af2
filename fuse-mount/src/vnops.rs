//! The FUSE operations over one PFS (DragonFly's `hammer2_vnops.c`): one
//! `Filesystem` impl over the `hammer2` library, read-only or read-write.
//!
//! Each operation routes, checks permission, calls the store and maps
//! the errno: `route::Router` names the layer that answers a node id
//! (the store, `store::Store`: `hammer2::Pfs` read-only,
//! `hammer2::mount::Mount` read-write; or, with `-o snapdir`, the
//! snapshot layer), `perm::Caller` the rules, `errno` the mapping. A
//! change starts at `Nodes::rw`, which a read-only layer answers with
//! EROFS.
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
//! Permissions: each operation asks the request's `perm::Caller`, which
//! holds every rule (and knows whether `default_permissions` left them
//! to the kernel).

use crate::atime;
use crate::cookie;
use crate::errno::ErrorCount;
use crate::inode::{self, generation, placeholder_attr, Ids, InodeTable, BLOCK_BYTES};
use crate::perm::{Caller, R, W, X};
use crate::route::Router;
use crate::rw::RwVolume;
use crate::snapdir::SnapDir;
use crate::store::{self, Nodes, ReadOnly, ReadWrite, Store, Tx};
use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenAccMode,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};
use hammer2::disk::{InodeMeta, ObjType};
use hammer2::mount::SetAttr;
use hammer2::{DirEntry, Pfs};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// Counters, logged at unmount.
#[derive(Default)]
struct Counters {
    lookups: AtomicU64,
    reads: AtomicU64,
    bytes_read: AtomicU64,
    writes: AtomicU64,
    bytes_written: AtomicU64,
    readdirs: AtomicU64,
}

/// One open directory stream: its listing, read at the first readdir
/// and at each rewind.
struct DirStream {
    listing: Mutex<Option<Arc<Vec<DirEntry>>>>,
}

pub struct Hammer2Fs {
    /// The store and, with `-o snapdir`, the snapshot layer: which
    /// answers a node id.
    pub(crate) router: Router,
    pub(crate) label: String,
    /// The image served (absolute), for the control channel.
    pub(crate) image: std::path::PathBuf,
    ids: Ids,
    /// The nodes the kernel holds (lookup counts; read-only, their
    /// decoded inodes too).
    inodes: Arc<InodeTable>,
    dirs: Mutex<HashMap<u64, Arc<DirStream>>>,
    next_fh: AtomicU64,
    /// Without `default_permissions` the kernel checks nothing; then
    /// the operations check the mode bits here.
    check_permissions: bool,
    /// The session's channel for notifications to the kernel, set once
    /// the session exists (`notifier_slot`).
    notifier: Arc<OnceLock<fuser::Notifier>>,
    ttl: Duration,
    errors: ErrorCount,
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

impl Hammer2Fs {
    /// A read-only mount of `pfs`.
    pub fn new(pfs: Pfs, default_permissions: bool) -> Hammer2Fs {
        let (label, inodes, errors) = (pfs.label.clone(), Arc::default(), ErrorCount::default());
        let store = ReadOnly::new(pfs, Arc::clone(&inodes), errors.clone());
        let ids = store.ids();
        Hammer2Fs::with_store(
            Box::new(store),
            label,
            ids,
            inodes,
            errors,
            default_permissions,
        )
    }

    /// A read-write mount of the PFS `vol.label`.
    pub fn new_rw(vol: Arc<RwVolume>, default_permissions: bool) -> Hammer2Fs {
        let (label, errors) = (vol.label.clone(), ErrorCount::default());
        let store = ReadWrite::new(vol, errors.clone(), now_us);
        let ids = store.ids();
        let inodes = Arc::default();
        Hammer2Fs::with_store(
            Box::new(store),
            label,
            ids,
            inodes,
            errors,
            default_permissions,
        )
    }

    fn with_store(
        store: Box<dyn Store>,
        label: String,
        ids: Ids,
        inodes: Arc<InodeTable>,
        errors: ErrorCount,
        default_permissions: bool,
    ) -> Hammer2Fs {
        Hammer2Fs {
            ttl: store.ttl(),
            router: Router::new(store),
            label,
            image: std::path::PathBuf::new(),
            ids,
            inodes,
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            check_permissions: !default_permissions,
            notifier: Arc::default(),
            errors,
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
        let origin = self.store().snap_origin();
        let sd = on.then(|| SnapDir::new(origin, self.errors.clone()));
        self.router.set_snapdir(sd);
        self
    }

    /// The mounted PFS's store.
    fn store(&self) -> &dyn Store {
        self.router.store()
    }

    /// The layer that answers node `ino` (see `route`).
    fn route(&self, ino: INodeNo) -> &dyn Nodes {
        self.router.route(ino.0)
    }

    /// Let the kernel cache writes (`-o writeback_cache`).
    pub fn with_writeback_cache(mut self, on: bool) -> Hammer2Fs {
        if let Some(s) = self.router.store_mut().rw_mut() {
            s.writeback_cache = on;
        }
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
        if let Some(s) = self.router.store_mut().rw_mut() {
            s.atime = policy;
        }
        self
    }

    /// The attributes of node `ino`.
    fn stat_attr(&self, ino: INodeNo) -> Result<FileAttr, Errno> {
        let layer = self.route(ino);
        let (m, bytes) = layer.stat(ino.0)?;
        layer.attr(ino.0, &m, bytes)
    }

    /// The caller of `req`, for the permission rules (`perm`).
    fn caller(&self, req: &Request) -> Caller {
        Caller::of(req, self.check_permissions)
    }

    /// Whether the PFS root has a real entry named `.snapshot`, which
    /// `-o snapdir` would hide (the mount is refused then).
    pub fn has_real_snapdir(&self) -> hammer2::Result<bool> {
        self.store().has_real_snapdir()
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
    fn dir_for_change(&self, who: &Caller, tx: &mut Tx, dir: INodeNo) -> Result<InodeMeta, Errno> {
        let d = tx.dir(dir.0)?;
        who.may(&d, W | X)?;
        Ok(d)
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
            return Ok((Arc::new(self.route(dir).list(dir.0, from)?), 0));
        };
        let cached = stream
            .listing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let listing = match cached {
            Some(l) if offset != cookie::START => l,
            _ => {
                let l = Arc::new(self.route(dir).list(dir.0, 0)?);
                *stream.listing.lock().unwrap_or_else(|p| p.into_inner()) = Some(l.clone());
                // A listing from the start is an access of the directory.
                self.route(dir).listed(dir.0);
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
        let dir = self.route(ino).meta(ino.0)?;
        if dir.obj_type != ObjType::Directory {
            return Err(Errno::ENOTDIR);
        }
        Ok(dir)
    }

    /// How long the kernel may trust a name made in directory `parent`.
    fn entry_ttl_in(&self, parent: INodeNo) -> Duration {
        self.router.route(parent.0).entry_ttl(self.ttl)
    }

    /// Reply to an operation that made a node or a name in directory
    /// `parent` (mknod, mkdir, symlink, link): the kernel now holds it.
    fn reply_entry(&self, parent: INodeNo, r: Result<FileAttr, Errno>, reply: ReplyEntry) {
        match r {
            Ok(attr) => {
                self.inodes.remember(attr.ino.0, None);
                let entry_ttl = self.entry_ttl_in(parent);
                reply.entry_with_ttls(&self.ttl, &entry_ttl, &attr, generation(&attr))
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
        let who = self.caller(req);
        let s = self.router.change_entry(parent.0, name.as_bytes(), true)?;
        let is_dir = obj_type == ObjType::Directory;
        // The caller's check of the directory, and the new node's mode,
        // uid and gid, from the directory's meta: under its lock with the
        // mount shared, or in the `Tx`.
        let prepare = |dir: &InodeMeta| {
            who.may(dir, W | X)?;
            let (uid, gid, mode) = who.new_owner(dir, mode, is_dir);
            Self::new_name(name)?;
            Ok((mode, uid, gid))
        };
        if !is_dir {
            let made = s.make_shared(
                parent.0,
                name.as_bytes(),
                obj_type,
                dev_of(rdev),
                pin,
                &prepare,
            );
            if let Some(r) = made {
                return r;
            }
        }
        s.change(|tx| {
            let (mode, uid, gid) = prepare(&tx.dir(parent.0)?)?;
            let name = name.as_bytes();
            let ino = tx.make(parent.0, name, obj_type, mode, uid, gid, dev_of(rdev))?;
            if pin {
                tx.pin(ino)?;
            }
            tx.attr(ino)
        })
    }

    /// A change of file `ino`'s data by `who` (write, truncate,
    /// fallocate): the set-user-ID and set-group-ID bits it clears
    /// (`Caller::after_data_change`) cleared, and the kernel told.
    fn drop_suid_sgid(&self, who: &Caller, tx: &mut Tx, ino: u64) -> Result<(), Errno> {
        let Some(mode) = who.after_data_change(&tx.meta(ino)?) else {
            return Ok(());
        };
        let a = SetAttr {
            mode: Some(mode),
            ..SetAttr::default()
        };
        tx.setattr(ino, a)?;
        self.attrs_changed(ino);
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
        let target = if dotdot {
            let layer = self.route(node);
            let dir = layer.meta(node.0)?;
            if dir.obj_type != ObjType::Directory {
                return Err(Errno::ENOTDIR);
            }
            INodeNo(layer.parent(node.0, &dir)?)
        } else {
            node
        };
        self.stat_attr(target)
    }
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
        if self.store().rw().is_ok_and(|s| s.writeback_cache) {
            // The kernel keeps written pages and sends them in large
            // writes (and manages mtime itself); fsync and close flush
            // them to us first.
            caps.push(InitFlags::FUSE_WRITEBACK_CACHE);
        } else {
            // Set-id bits are ours to drop on a write, a truncation and
            // a chown (`Caller::after_data_change`, `after_chown`):
            // without this the kernel asks for the attributes before
            // every chown to work out the mode itself. Not with the
            // writeback cache, whose writes reach us from the kernel's
            // flusher rather than from the caller whose rights decide.
            caps.push(InitFlags::FUSE_HANDLE_KILLPRIV);
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
            self.errors.get(),
        );
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.counters.lookups.fetch_add(1, Ordering::Relaxed);
        let dots = name == "." || name == "..";
        let layer = self.router.route_entry(parent.0, name.as_bytes());
        let r = (|| {
            if name.len() > self.store().name_max() {
                return Err(Errno::ENAMETOOLONG);
            }
            if dots {
                return self.lookup_dots(parent, name == "..");
            }
            let who = self.caller(req);
            let search = |m: &InodeMeta, mask| who.may(m, mask);
            let e = layer.lookup(parent.0, name.as_bytes(), &search)?;
            self.inodes.remember(e.attr.ino.0, e.inode);
            Ok(e.attr)
        })();
        match r {
            Ok(attr) => {
                let entry_ttl = if dots {
                    self.inodes.remember(attr.ino.0, None);
                    self.ttl
                } else {
                    layer.entry_ttl(self.ttl)
                };
                reply.entry_with_ttls(&self.ttl, &entry_ttl, &attr, generation(&attr))
            }
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if ino != INodeNo::ROOT {
            self.inodes.forget(ino.0, nlookup);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.stat_attr(ino) {
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
        let who = self.caller(req);
        // What to set, as the caller may: from the inode's meta and the
        // time of the change.
        let asked = |meta: &InodeMeta, now: u64| {
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
            who.may_setattr(meta, &mut a, times_now, fh.is_some())?;
            // A chown, or with nothing asked a chown(f, -1, -1) or the
            // kernel's own call to drop set-id bits before a write (the
            // kernel leaves those bits to us: FUSE_HANDLE_KILLPRIV).
            let nothing = mode.is_none()
                && size.is_none()
                && atime.is_none()
                && mtime.is_none()
                && ctime.is_none();
            if uid.is_some() || gid.is_some() || nothing {
                a.mode = a.mode.or(who.after_chown(meta));
            }
            Ok(a)
        };
        let r = self.route(ino).rw().and_then(|s| {
            // A size change may clear set-id bits and free blocks: with
            // the mount exclusive. The rest may share it.
            let shared = size.is_none().then(|| s.setattr_shared(ino.0, &asked));
            if let Some(Some(r)) = shared {
                return r;
            }
            s.change(|tx| {
                let meta = tx.meta(ino.0)?;
                let a = asked(&meta, tx.now)?;
                tx.setattr(ino.0, a)?;
                if size.is_some() {
                    self.drop_suid_sgid(&who, tx, ino.0)?;
                }
                tx.attr(ino.0)
            })
        });
        match r {
            Ok(attr) => reply.attr(&self.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self.route(ino).readlink(ino.0);
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
        self.reply_entry(parent, r, reply);
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
        self.reply_entry(parent, r, reply);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let who = self.caller(req);
        let r = self.router.change_entry(parent.0, name.as_bytes(), false);
        let r = r.and_then(|s| {
            // The caller's check of the directory's and the entry's meta:
            // under their locks with the mount shared, or in the `Tx`
            // (which checks the directory before it looks the name up).
            let allow = |dir: &InodeMeta, victim: &InodeMeta| {
                who.may(dir, W | X)?;
                who.may_remove(dir, victim)
            };
            if let Some(r) = s.unlink_shared(parent.0, name.as_bytes(), &allow) {
                return r;
            }
            s.change(|tx| {
                let dir = self.dir_for_change(&who, tx, parent)?;
                allow(&dir, &tx.entry(parent.0, name.as_bytes())?)?;
                tx.unlink(parent.0, name.as_bytes())
            })
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let who = self.caller(req);
        let r = self.router.change_entry(parent.0, name.as_bytes(), false);
        let r = r.and_then(|s| {
            s.change(|tx| {
                let dir = self.dir_for_change(&who, tx, parent)?;
                let victim = tx.entry(parent.0, name.as_bytes())?;
                who.may_remove(&dir, &victim)?;
                tx.rmdir(parent.0, name.as_bytes(), victim.inum)
            })
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
        let who = self.caller(req);
        let r = self
            .router
            .change_entry(parent.0, link_name.as_bytes(), true);
        let r = r.and_then(|s| {
            s.change(|tx| {
                let dir = self.dir_for_change(&who, tx, parent)?;
                let (uid, gid, _) = who.new_owner(&dir, 0o777, false);
                let target = target.as_os_str().as_bytes();
                let ino = tx.symlink(parent.0, Self::new_name(link_name)?, target, uid, gid)?;
                tx.attr(ino)
            })
        });
        self.reply_entry(parent, r, reply);
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
        let who = self.caller(req);
        let r = self.router.change_entry(parent.0, name.as_bytes(), false);
        let r = r.and_then(|s| {
            self.router
                .change_entry(newparent.0, newname.as_bytes(), false)?;
            // The caller's check of both directories', the source's and
            // the replaced entry's meta: under their locks with the mount
            // shared, or in the `Tx` (which checks the directories before
            // it looks the names up).
            let allow =
                |odir: &InodeMeta, ndir: &InodeMeta, src: &InodeMeta, dst: Option<&InodeMeta>| {
                    who.may(odir, W | X)?;
                    who.may(ndir, W | X)?;
                    who.may_remove(odir, src)?;
                    if let Some(d) = dst {
                        who.may_remove(ndir, d)?;
                    }
                    if parent != newparent {
                        who.may_reparent(src)?;
                    }
                    Self::new_name(newname).map(|_| ())
                };
            let plain =
                !flags.intersects(RenameFlags::RENAME_WHITEOUT | RenameFlags::RENAME_EXCHANGE);
            if plain {
                let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
                let (old, new) = (
                    (parent.0, name.as_bytes()),
                    (newparent.0, newname.as_bytes()),
                );
                if let Some(r) = s.rename_shared(old, new, noreplace, &allow) {
                    return r;
                }
            }
            s.change(|tx| {
                let whiteout = flags.contains(RenameFlags::RENAME_WHITEOUT);
                if whiteout && flags.contains(RenameFlags::RENAME_EXCHANGE) {
                    return Err(Errno::EINVAL);
                }
                let odir = self.dir_for_change(&who, tx, parent)?;
                let ndir = self.dir_for_change(&who, tx, newparent)?;
                let src = tx.entry(parent.0, name.as_bytes())?;
                let dst = match tx.entry(newparent.0, newname.as_bytes()) {
                    Ok(d) => Some(d),
                    Err(e) if e == Errno::ENOENT => None,
                    Err(e) => return Err(e),
                };
                allow(&odir, &ndir, &src, dst.as_ref())?;
                // An exchange moves the other entry too.
                if let Some(d) = dst.filter(|_| flags.contains(RenameFlags::RENAME_EXCHANGE)) {
                    if parent != newparent {
                        who.may_reparent(&d)?;
                    }
                }
                let f = hammer2::mount::RenameFlags {
                    noreplace: flags.contains(RenameFlags::RENAME_NOREPLACE),
                    exchange: flags.contains(RenameFlags::RENAME_EXCHANGE),
                };
                let is_dir = |m: &InodeMeta| m.obj_type == ObjType::Directory;
                let moves_dir = is_dir(&src) || dst.as_ref().is_some_and(is_dir);
                let replaced_dir = dst.filter(|d| is_dir(d) && !f.exchange).map(|d| d.inum);
                let newname = newname.as_bytes();
                // The whiteout left at the old name is the caller's, as
                // a node made in that directory would be.
                let whiteout = whiteout.then(|| {
                    let (uid, gid, _) = who.new_owner(&odir, 0, false);
                    (uid, gid)
                });
                let (old, new) = ((parent.0, name.as_bytes()), (newparent.0, newname));
                tx.rename(old, new, f, whiteout, moves_dir, replaced_dir)
            })
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
        let who = self.caller(req);
        let r = self.router.same_layer(ino.0, newparent.0).and_then(|()| {
            let s = self
                .router
                .change_entry(newparent.0, newname.as_bytes(), true)?;
            // The caller's check of the directory's and the node's meta:
            // under their locks with the mount shared, or in the `Tx`.
            let allow = |dir: &InodeMeta, node: &InodeMeta| {
                who.may(dir, W | X)?;
                who.may_link(node)?;
                Self::new_name(newname).map(|_| ())
            };
            if let Some(r) = s.link_shared(ino.0, newparent.0, newname.as_bytes(), &allow) {
                return r;
            }
            s.change(|tx| {
                let dir = self.dir_for_change(&who, tx, newparent)?;
                allow(&dir, &tx.meta(ino.0)?)?;
                tx.link(ino.0, newparent.0, newname.as_bytes())?;
                tx.attr(ino.0)
            })
        });
        self.reply_entry(newparent, r, reply);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mask = match flags.acc_mode() {
            OpenAccMode::O_RDONLY => R,
            OpenAccMode::O_WRONLY => W,
            OpenAccMode::O_RDWR => R | W,
        };
        let who = self.caller(req);
        let r = (|| {
            let layer = self.route(ino);
            if mask & W != 0 {
                layer.rw()?.writable()?;
            }
            let may = |m: &InodeMeta| who.may(m, mask);
            layer.open(ino.0, mask & R != 0, &may)
        })();
        // A descriptor that cannot write has nothing for close(2) to
        // report (`flush`): the kernel need not ask.
        let noflush = if mask & W == 0 {
            FopenFlags::FOPEN_NOFLUSH
        } else {
            FopenFlags::empty()
        };
        match r {
            // Every change goes through the kernel's page cache, so
            // cached pages stay valid across opens.
            Ok(false) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE | noflush),
            Ok(true) => reply.opened(FileHandle(0), noflush),
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
                let entry_ttl = self.entry_ttl_in(parent);
                reply.created_with_ttls(
                    &self.ttl,
                    &entry_ttl,
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
        let who = self.caller(req);
        let r = self.route(parent).rw().and_then(|s| {
            s.change(|tx| {
                let dir = self.dir_for_change(&who, tx, parent)?;
                let (uid, gid, mode) = who.new_owner(&dir, mode, false);
                let ino = tx.tmpfile(parent.0, mode, uid, gid)?;
                tx.attr(ino)
            })
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
        let r = self.route(ino).read(ino.0, offset, size as usize);
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
        let who = self.caller(req);
        let r = self.route(ino).rw().and_then(|s| {
            s.write(
                ino.0,
                offset,
                data,
                |m| who.after_data_change(m).is_none(),
                |tx| self.drop_suid_sgid(&who, tx, ino.0),
            )
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

    /// close(2) of a descriptor that may write: nothing to write here
    /// (the flusher does), but a mount whose flush failed says so. The
    /// kernel does not ask for read-only ones (`open`: FOPEN_NOFLUSH).
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.store().healthy() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
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
        self.route(ino).unpin(ino.0);
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
        self.store().unmount();
    }

    /// fsync and fdatasync: a partial commit of the node's dependency
    /// groups (the file, and what operations tied to it: its directory
    /// entries, a rename's directories), not of the whole volume.
    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Nodes of a read-only layer (`.snapshot`, a read-only mount)
        // have nothing waiting to be written.
        let r = match self.route(ino).rw() {
            Ok(_) => self.store().fsync(ino.0),
            Err(_) => Ok(()),
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let r = self
            .listed_dir(ino)
            .and_then(|d| self.caller(req).may(&d, R));
        let r = r.and_then(|()| self.route(ino).pin(ino.0));
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
        if offset <= cookie::AFTER_DOT {
            let parent = match self.route(ino).parent(ino.0, &dir) {
                Ok(p) => INodeNo(p),
                Err(e) => return reply.error(e),
            };
            if reply.add(parent, cookie::AFTER_DOTDOT, FileType::Directory, "..") {
                return reply.ok();
            }
        }
        for e in &entries[start..] {
            let full = reply.add(
                INodeNo(e.inum),
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
        let r = self.listed_dir(ino).and_then(|dir| {
            let (entries, start) = self.entries_from(fh, ino, offset)?;
            let layer = self.route(ino);
            let attr = layer.attr(ino.0, &dir, hammer2::pfs::stored_bytes(&dir, 0))?;
            let parent = layer.parent(ino.0, &dir)?;
            Ok((parent, attr, entries, start))
        });
        let (parent, dir_attr, entries, start) = match r {
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
        parent_attr.ino = INodeNo(parent);
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
        // The attributes of a batch of entries at once (read-write: per
        // hold of the mount, and each unit reruns after a cache miss, so
        // nothing is added to the reply inside it).
        let layer = self.route(ino);
        let entry_ttl = layer.entry_ttl(self.ttl);
        let batch_len = layer.attr_batch().max(1);
        let mut batch: std::collections::VecDeque<Option<store::Entry>> = Default::default();
        for (i, e) in entries[start..].iter().enumerate() {
            let child = e.inum;
            // An inode that cannot be read still lists (by name and
            // type, with a zero TTL); stat on it then gets the error.
            if batch.is_empty() {
                let next = &entries[start + i..(start + i + batch_len).min(entries.len())];
                batch = layer.entry_attrs(next).into();
            }
            let (attr, inode) = match batch.pop_front().flatten() {
                Some(found) => (Some(found.attr), found.inode),
                None => (None, None),
            };
            let (attr, ttl, entry_ttl) = match attr {
                Some(a) => (a, self.ttl, entry_ttl),
                None => (
                    placeholder_attr(child, entry_kind(e)),
                    Duration::ZERO,
                    Duration::ZERO,
                ),
            };
            let full = reply.add_with_ttls(
                INodeNo(child),
                cookie::after_key(e.key),
                OsStr::from_bytes(&e.name),
                &ttl,
                &entry_ttl,
                &attr,
                generation(&attr),
            );
            if full {
                break;
            }
            self.inodes.remember(child, inode);
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
        self.route(ino).unpin(ino.0);
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
        let store::Space {
            total,
            free,
            avail,
            inodes,
        } = match self.store().statfs() {
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

    /// ENOSYS: the kernel remembers it for the connection and answers
    /// every later getxattr itself, with EOPNOTSUPP, as Linux
    /// filesystems without extended attributes do. Without it, each
    /// write (and each chown or chmod) would cost a round trip more: the
    /// kernel asks for `security.capability` before it lets a write
    /// through, to know whether the write must drop one.
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    /// None: the empty list, as a Linux filesystem without extended
    /// attributes gives.
    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EOPNOTSUPP);
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
        let layer = self.route(ino);
        let r = layer.meta(ino.0).and_then(|m| {
            if mask.contains(AccessFlags::W_OK) {
                layer.rw()?;
            }
            self.caller(req).may(&m, mask.bits() as u32 & (R | W | X))
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
            let s = self.route(ino).rw()?;
            s.writable()?;
            offset.checked_add(length).ok_or(Errno::EFBIG)?;
            if s.meta(ino.0)?.obj_type != ObjType::Regfile {
                return Err(Errno::ENODEV);
            }
            if !matches!(mode, 0 | KEEP) && mode != PUNCH | KEEP && mode & !KEEP != ZERO {
                return Err(Errno::EOPNOTSUPP);
            }
            let who = self.caller(req);
            s.tx(|tx| self.drop_suid_sgid(&who, tx, ino.0))?;
            match mode {
                0 | KEEP => s.change(|tx| tx.fallocate(ino.0, offset, length, mode == KEEP)),
                m if m == PUNCH | KEEP => s.punch_hole(ino.0, offset, length),
                m if m & !KEEP == ZERO => {
                    s.change(|tx| tx.zero_range(ino.0, offset, length, mode & KEEP != 0))
                }
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
            let at = self.route(ino).seek(ino.0, offset, data)?;
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
            let s = self.route(ino_out).rw()?;
            if !flags.is_empty() {
                return Err(Errno::EINVAL);
            }
            // Across layers (from a snapshot): the caller copies itself.
            self.router.same_layer(ino_in.0, ino_out.0)?;
            // The reply counts in 32 bits.
            let len = len.min(u64::from(u32::MAX) & !0xfff);
            let done = s.copy(ino_in.0, offset_in, ino_out.0, offset_out, len, CHUNK_BYTES)?;
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
