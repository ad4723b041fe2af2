//! The FUSE operations over one PFS (DragonFly's `hammer2_vnops.c`): one
//! `Filesystem` impl over the `hammer2` library, read-only for now.
//!
//! Every failure goes through `errno::errno`, the one mapping from
//! library errors to errnos. Requests arrive on several threads: the
//! library's types are shared read-only (`Pfs` over an `Arc<Volume>`), and
//! the two tables here (`InodeTable`, the open directory streams) take a
//! mutex for map operations only, never across I/O.
//!
//! Directory streams: opendir makes a handle; the first readdir (and
//! every readdir at offset 0, i.e. rewinddir) reads the whole listing
//! once, and later calls continue from the cookie (see `cookie`) by
//! binary search in it. So a listing of n entries costs one directory
//! walk, not one per reply buffer, and shows one state of the directory
//! from rewind to end.
//!
//! The write path will add its operations here, over the same tables,
//! with `read_only` deciding whether they are offered.

use crate::cookie;
use crate::errno::errno;
use crate::inode::{self, attr_of, placeholder_attr, Ids, InodeTable, BLOCK_BYTES};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen,
    ReplyStatfs, ReplyXattr, Request,
};
use hammer2::pfs::DIRENT_NAME_MAX;
use hammer2::{DirEntry, Inode, Pfs};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long the kernel may trust names and attributes without asking
/// again. Nothing changes a read-only mount, so this is long; the kernel
/// still drops entries under memory pressure.
const TTL: Duration = Duration::from_secs(3600);

/// `statfs` name length: Linux's NAME_MAX, which is what DragonFly's VFS
/// enforces too (the format allows longer names; such names still list
/// and look up).
const NAME_MAX_REPORTED: u32 = 255;

/// Space an inode takes on disk: an inode is one 1 KiB block, so free
/// space bounds how many more could exist.
const INODE_BYTES: u64 = 1024;

/// Counters, logged at unmount.
#[derive(Default)]
struct Counters {
    lookups: AtomicU64,
    reads: AtomicU64,
    bytes_read: AtomicU64,
    readdirs: AtomicU64,
    errors: AtomicU64,
}

/// One open directory stream: its listing, read at the first readdir
/// and at each rewind.
struct DirStream {
    listing: Mutex<Option<Arc<Vec<DirEntry>>>>,
}

pub struct Hammer2Fs {
    pfs: Pfs,
    root: Arc<Inode>,
    ids: Ids,
    inodes: InodeTable,
    dirs: Mutex<HashMap<u64, Arc<DirStream>>>,
    next_fh: AtomicU64,
    /// Without `default_permissions` the kernel checks nothing; then
    /// access, open, opendir and lookup check the mode bits here.
    check_permissions: bool,
    counters: Counters,
}

impl Hammer2Fs {
    pub fn new(pfs: Pfs, default_permissions: bool) -> Hammer2Fs {
        let root = Arc::new(pfs.root.clone());
        let ids = Ids {
            root_inum: root.inum(),
        };
        Hammer2Fs {
            pfs,
            root,
            ids,
            inodes: InodeTable::default(),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            check_permissions: !default_permissions,
            counters: Counters::default(),
        }
    }

    pub fn pfs(&self) -> &Pfs {
        &self.pfs
    }

    /// Turn a library error into the reply's errno (logged there).
    fn fail(&self, e: &hammer2::Error) -> Errno {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        Errno::from_i32(errno(e))
    }

    /// The inode behind a node id: the root, a cached one, or read from
    /// the inode index (and cached if the kernel holds the node).
    fn inode(&self, ino: INodeNo) -> Result<Arc<Inode>, Errno> {
        if ino == INodeNo::ROOT {
            return Ok(self.root.clone());
        }
        if let Some(i) = self.inodes.get(ino.0) {
            return Ok(i);
        }
        let i = Arc::new(
            self.pfs
                .inode(self.ids.inum(ino.0))
                .map_err(|e| self.fail(&e))?,
        );
        self.inodes.fill(ino.0, &i);
        Ok(i)
    }

    fn attr(&self, ino: u64, inode: &Inode) -> Result<FileAttr, Errno> {
        attr_of(ino, inode).ok_or_else(|| {
            self.fail(&hammer2::Error::corrupt(
                format!(
                    "inode {} has object type {}",
                    inode.inum(),
                    inode.obj_type().name()
                ),
                inode.bref.data_off.offset(),
            ))
        })
    }

    fn check(&self, req: &Request, inode: &Inode, mask: u32) -> Result<(), Errno> {
        if !self.check_permissions || inode::permitted(inode, req.uid(), req.gid(), mask) {
            Ok(())
        } else {
            Err(Errno::EACCES)
        }
    }

    /// The node id of a directory's parent ("..").
    fn parent_ino(&self, dir: &Inode) -> u64 {
        let p = dir.meta().iparent;
        if dir.inum() == self.ids.root_inum || p == 0 {
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

    /// The entries of `dir` from cookie `offset` on (past ".."): from the
    /// stream's listing, read now if this is the first call or a rewind.
    fn entries_from(
        &self,
        fh: FileHandle,
        dir: &Inode,
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
            let v = self
                .pfs
                .readdir_from(dir, from)
                .map_err(|e| self.fail(&e))?;
            return Ok((Arc::new(v), 0));
        };
        let cached = stream
            .listing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let listing = match cached {
            Some(l) if offset != cookie::START => l,
            _ => {
                let l = Arc::new(self.pfs.readdir(dir).map_err(|e| self.fail(&e))?);
                *stream.listing.lock().unwrap_or_else(|p| p.into_inner()) = Some(l.clone());
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
    fn listed_dir(&self, ino: INodeNo) -> Result<Arc<Inode>, Errno> {
        let dir = self.inode(ino)?;
        if !dir.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        Ok(dir)
    }
}

fn entry_kind(e: &DirEntry) -> FileType {
    // d_type is a hint; an entry of a type no file has lists as a file
    // and fails when its inode is read.
    inode::file_type(e.obj_type).unwrap_or(FileType::RegularFile)
}

impl Filesystem for Hammer2Fs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for cap in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
        ] {
            if config.add_capabilities(cap).is_err() {
                log::debug!("kernel does not offer {cap:?}");
            }
        }
        // Times are stored in microseconds.
        let _ = config.set_time_granularity(Duration::from_micros(1));
        Ok(())
    }

    fn destroy(&mut self) {
        let c = &self.counters;
        log::info!(
            "{}: {} lookups, {} reads ({} bytes), {} directory reads, {} errors",
            self.pfs.label,
            c.lookups.load(Ordering::Relaxed),
            c.reads.load(Ordering::Relaxed),
            c.bytes_read.load(Ordering::Relaxed),
            c.readdirs.load(Ordering::Relaxed),
            c.errors.load(Ordering::Relaxed),
        );
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.counters.lookups.fetch_add(1, Ordering::Relaxed);
        let r = (|| {
            let dir = self.listed_dir(parent)?;
            self.check(req, &dir, 1)?;
            if name.len() > DIRENT_NAME_MAX {
                return Err(Errno::ENAMETOOLONG);
            }
            let e = self
                .pfs
                .lookup(&dir, name.as_bytes())
                .map_err(|e| self.fail(&e))?
                .ok_or(Errno::ENOENT)?;
            let ino = self.ids.ino(e.inum);
            let inode = self.inode(INodeNo(ino))?;
            let attr = self.attr(ino, &inode)?;
            self.inodes.remember(ino, Some(inode));
            Ok(attr)
        })();
        match r {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if ino != INodeNo::ROOT {
            self.inodes.forget(ino.0, nlookup);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.inode(ino).and_then(|i| self.attr(ino.0, &i)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self
            .inode(ino)
            .and_then(|i| self.pfs.readlink(&i).map_err(|e| self.fail(&e)));
        match r {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = (|| {
            if flags.acc_mode() != OpenAccMode::O_RDONLY {
                return Err(Errno::EROFS);
            }
            let inode = self.inode(ino)?;
            if inode.is_dir() {
                return Err(Errno::EISDIR);
            }
            self.check(req, &inode, 4)
        })();
        match r {
            // Nothing changes the file, so cached pages stay valid
            // across opens.
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
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
        let r = self.inode(ino).and_then(|i| {
            self.pfs
                .read(&i, offset, size as usize)
                .map_err(|e| self.fail(&e))
        });
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

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let r = self.listed_dir(ino).and_then(|d| self.check(req, &d, 4));
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
            let (entries, start) = self.entries_from(fh, &dir, offset)?;
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
        let r = self.listed_dir(ino).and_then(|dir| {
            let (entries, start) = self.entries_from(fh, &dir, offset)?;
            let attr = self.attr(ino.0, &dir)?;
            Ok((dir, attr, entries, start))
        });
        let (dir, dir_attr, entries, start) = match r {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        let g = Generation(0);
        // The kernel takes no reference for "." and ".." and ignores
        // their attributes; ".." gets the directory's own with the
        // parent's node id.
        if offset == cookie::START && reply.add(ino, cookie::AFTER_DOT, ".", &TTL, &dir_attr, g) {
            return reply.ok();
        }
        let mut parent_attr = dir_attr;
        parent_attr.ino = INodeNo(self.parent_ino(&dir));
        if offset <= cookie::AFTER_DOT
            && reply.add(
                parent_attr.ino,
                cookie::AFTER_DOTDOT,
                "..",
                &TTL,
                &parent_attr,
                g,
            )
        {
            return reply.ok();
        }
        for e in &entries[start..] {
            let child = self.ids.ino(e.inum);
            // An inode that cannot be read still lists (by name and
            // type, with a zero TTL); stat on it then gets the error.
            let (inode, attr, ttl) = match self.inode(INodeNo(child)) {
                Ok(i) => match self.attr(child, &i) {
                    Ok(a) => (Some(i), a, TTL),
                    Err(_) => (None, placeholder_attr(child, entry_kind(e)), Duration::ZERO),
                },
                Err(_) => (None, placeholder_attr(child, entry_kind(e)), Duration::ZERO),
            };
            let full = reply.add(
                INodeNo(child),
                cookie::after_key(e.key),
                OsStr::from_bytes(&e.name),
                &ttl,
                &attr,
                g,
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
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    /// From the volume header, in 64 KiB blocks: the allocator's size and
    /// free space; inodes: this PFS's count, and as many more as 1 KiB
    /// inode blocks fit in the free space.
    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let h = &self.pfs.volume().header;
        let bs = u64::from(BLOCK_BYTES);
        let free = h.allocator_free.min(h.allocator_size);
        let files_free = free / INODE_BYTES;
        let files = self.root.bref.inode_count().saturating_add(files_free);
        reply.statfs(
            h.allocator_size / bs,
            free / bs,
            free / bs,
            files,
            files_free,
            BLOCK_BYTES,
            NAME_MAX_REPORTED,
            BLOCK_BYTES,
        );
    }

    /// HAMMER2 keeps no extended attributes.
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

    /// No ioctls (the kernel does not remember an ENOSYS for ioctl, and
    /// every isatty() on a file asks): "not a terminal" is the answer.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let r = self.inode(ino).and_then(|inode| {
            if mask.contains(AccessFlags::W_OK) {
                return Err(Errno::EROFS);
            }
            let bits = mask.bits() as u32 & 0o5;
            self.check(req, &inode, bits)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}
