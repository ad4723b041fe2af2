//! The read-write store: the one `hammer2::mount::Mount` of the image
//! behind `RwVolume`'s transaction lock (see `rw`). Queries (getattr,
//! lookup, readdir, the plan of a file read) take it shared when what
//! they need is in memory (`ReadWrite::query`, the library's `_loaded`
//! queries), and so do writes to a file in memory, setattr without a
//! size, opens and releases (`write_shared`, `setattr_shared`, under the
//! inode's own lock), and the creates, links, unlinks and renames of
//! files (`make_shared`, `link_shared`, `unlink_shared`,
//! `rename_shared`, under the locks of the inodes they change, the
//! caller's permission check made on their meta there), so they run side
//! by side. Otherwise, and for every other change (mkdir, rmdir, a
//! directory moved, a symlink, anything not in memory), it is taken
//! exclusive for one library call or one `Tx`,
//! so a change sees no other caller and a flush takes whole operations
//! (the write path's reads must see its unflushed state). File reads
//! only plan under it (`RwVolume::read`).
//!
//! A change is a `Tx` (`ReadWrite::change`): refused with EIO once a
//! flush has failed, run with the mount locked, and run once more after
//! `RwVolume::make_room` when the library refused it for lack of space
//! (it changes nothing then). A `Tx` speaks node ids and errnos: it maps
//! ids to inode numbers, library errors through `errno`, and keeps the
//! directories' link counts (`dirlinks`) with the changes that move
//! them.

use super::{attr_of_meta, parent_ino, subdirs, Check, Entry, Nodes, Space, Store};
use crate::atime;
use crate::dirlinks::DirLinks;
use crate::errno::ErrorCount;
use crate::inode::Ids;
use crate::rw::RwVolume;
use crate::snapdir;
use fuser::{Errno, FileAttr};
use hammer2::disk::{Blockref, InodeMeta, ObjType};
use hammer2::inode::Filled;
use hammer2::mount::{Mount, RenameFlags, SetAttr};
use hammer2::DirEntry;
use std::sync::Arc;
use std::time::Duration;

/// How long the kernel may trust attributes without asking again (and
/// the names of the snapshot layer; this PFS's names keep
/// `TTL_ENTRY_READ_WRITE`): every change comes through the kernel,
/// which updates or invalidates what it caches, but some follow-ups
/// (the ctime of a file whose other name was removed, the link count
/// after a rename over it) are only right once it asks again. One
/// second, as libfuse's default.
const TTL_READ_WRITE: Duration = Duration::from_secs(1);

/// How long the kernel may trust a name: the PFS's names change only
/// through the kernel (create, link, unlink, rename, each of which
/// updates the names it caches), so they stay valid until it drops
/// them; what a change elsewhere may leave stale (a link count, a
/// ctime) is in the attributes, which keep `TTL_READ_WRITE`. Without
/// this each name older than a second cost a LOOKUP again (an unlink of
/// 10k files: 21k to 22k/s before, 25k to 27k/s after). Snapshots come
/// and go behind the kernel's back, so `.snapshot` keeps the mount's
/// time (`snapdir`).
const TTL_ENTRY_READ_WRITE: Duration = Duration::from_secs(3600);

/// The longest name made or looked up: Linux's NAME_MAX (see
/// `vnops::NAME_MAX_REPORTED`).
const NAME_MAX: usize = 255;

/// Entries of a readdirplus whose attributes are read per hold of the
/// mount (each unit reruns after a cache miss).
const ATTR_BATCH: usize = 64;

/// Hole punches go through the library this much per hold of the mount:
/// whole blocks are dropped in memory, so this is cheap, but a huge
/// range should not stall every other request.
const PUNCH_CHUNK: u64 = 1 << 30;

pub struct ReadWrite {
    pub vol: Arc<RwVolume>,
    ids: Ids,
    dirlinks: DirLinks,
    errors: ErrorCount,
    /// The time changes are stamped with, in microseconds since the
    /// epoch.
    clock: fn() -> u64,
    /// FUSE_WRITEBACK_CACHE asked for: lseek is left to the kernel.
    pub writeback_cache: bool,
    /// When reads update access times (see `atime`).
    pub atime: atime::Policy,
}

/// Why a query with the mount shared gave no answer.
enum Unshared {
    /// It needs an inode, an indirect block or a listing loaded first:
    /// run it with the mount exclusive.
    Load,
    /// The library's error, mapped only once the answer stands.
    Lib(hammer2::Error),
    Errno(Errno),
}

impl From<Errno> for Unshared {
    fn from(e: Errno) -> Unshared {
        Unshared::Errno(e)
    }
}

/// A `_loaded` query's answer as a step of a shared query.
fn loaded<T>(r: Option<hammer2::Result<T>>) -> Result<T, Unshared> {
    match r {
        None => Err(Unshared::Load),
        Some(r) => r.map_err(Unshared::Lib),
    }
}

/// The caller's check of a node made with the mount shared, from its
/// directory's meta: the new node's mode, uid and gid.
pub type NewOwner<'a> = dyn Fn(&InodeMeta) -> Result<(u32, u32, u32), Errno> + 'a;

/// The caller's check of a rename with the mount shared: the old and
/// the new directory's meta, the source's, and that of the entry it
/// replaces.
pub type RenameCheck<'a> =
    dyn Fn(&InodeMeta, &InodeMeta, &InodeMeta, Option<&InodeMeta>) -> Result<(), Errno> + 'a;

/// One hold of the mount for a request: node ids in, errnos out.
pub struct Tx<'a> {
    m: &'a mut Mount,
    s: &'a ReadWrite,
    /// The time of this change.
    pub now: u64,
}

impl ReadWrite {
    pub fn new(vol: Arc<RwVolume>, errors: ErrorCount, clock: fn() -> u64) -> ReadWrite {
        ReadWrite {
            vol,
            ids: Ids {
                root_inum: hammer2::mount::ROOT_INUM,
            },
            dirlinks: DirLinks::default(),
            errors,
            clock,
            writeback_cache: false,
            atime: atime::Policy::default(),
        }
    }

    pub fn ids(&self) -> Ids {
        self.ids
    }

    fn h<T>(&self, r: hammer2::Result<T>) -> Result<T, Errno> {
        self.errors.h(r)
    }

    fn inum(&self, ino: u64) -> u64 {
        self.ids.inum(ino)
    }

    /// EIO once a flush has failed.
    pub fn writable(&self) -> Result<(), Errno> {
        self.vol.writable().map_err(Errno::from_i32)
    }

    /// Query `shared` with the mount shared, beside other queries; when
    /// it needs something loaded first (or missed the cache), run
    /// `exclusive`, the same query through a `Tx`.
    fn query<T>(
        &self,
        shared: impl FnOnce(&Mount) -> Result<T, Unshared>,
        exclusive: impl FnMut(&mut Tx) -> Result<T, Errno>,
    ) -> Result<T, Errno> {
        self.vol
            .shared(|m| match shared(m) {
                Err(Unshared::Load) => None,
                r => Some(r),
            })
            .and_then(|r| self.answer(r))
            .unwrap_or_else(|| self.tx(exclusive))
    }

    /// A shared step's result as the request's (the library's error
    /// mapped and counted now that it stands); `None` for `Load`.
    fn answer<T>(&self, r: Result<T, Unshared>) -> Option<Result<T, Errno>> {
        match r {
            Ok(v) => Some(Ok(v)),
            Err(Unshared::Lib(e)) => Some(self.h(Err(e))),
            Err(Unshared::Errno(e)) => Some(Err(e)),
            Err(Unshared::Load) => None,
        }
    }

    /// `Tx::attr` with the mount shared: the attributes of node `ino`.
    fn attr_shared(&self, m: &Mount, ino: u64) -> Result<FileAttr, Unshared> {
        let (meta, bytes) = loaded(m.stat_loaded(&self.vol.label, self.inum(ino)))?;
        self.attr_of(m, ino, &meta, bytes)
    }

    /// `attr_locked` with the mount shared: a directory's link count
    /// is counted from a listing in memory, or it is `Load`. Nothing that
    /// runs with the mount shared makes, removes or moves a directory,
    /// so a count made here is as good as one made by a change.
    fn attr_of(
        &self,
        mount: &Mount,
        ino: u64,
        m: &InodeMeta,
        bytes: u64,
    ) -> Result<FileAttr, Unshared> {
        self.attr_with(ino, m, bytes, || {
            loaded(mount.readdir_loaded(&self.vol.label, m.inum, 0))
        })
    }

    /// Node `ino`'s attributes from its meta and stored bytes, a
    /// directory's link count from the `listing` of its entries when
    /// `dirlinks` has none yet.
    fn attr_with<E: From<Errno>>(
        &self,
        ino: u64,
        m: &InodeMeta,
        bytes: u64,
        listing: impl FnOnce() -> Result<Vec<DirEntry>, E>,
    ) -> Result<FileAttr, E> {
        let mut a = attr_of_meta(&self.errors, ino, m, bytes)?;
        // A directory removed (rmdir, or replaced by a rename) while it
        // is open has no links: its 0 on disk, not a count.
        if m.obj_type == ObjType::Directory && m.nlinks != 0 {
            a.nlink = self
                .dirlinks
                .nlink(m.inum, || listing().map(|l| subdirs(&l)))?;
        }
        Ok(a)
    }

    /// Whether a read of inode `inum` at `now` would update its access
    /// time (`accessed`), from memory.
    fn atime_due(&self, m: &Mount, inum: u64, now: u64) -> Result<bool, Unshared> {
        if self.atime.mode == atime::Mode::Never {
            return Ok(false);
        }
        let meta = loaded(m.getattr_loaded(&self.vol.label, inum))?;
        Ok(self.atime.due(&meta, now))
    }

    /// Run `f` with the mount locked (see `RwVolume::locked`): reads,
    /// and changes that need no admission retry.
    pub fn tx<T>(&self, mut f: impl FnMut(&mut Tx) -> T) -> T {
        self.vol.locked(|m| {
            f(&mut Tx {
                m,
                s: self,
                now: (self.clock)(),
            })
        })
    }

    /// Run change `f`: EIO once a flush has failed; when the library
    /// refuses it for lack of space, room is made and it runs once more.
    pub fn change<T>(&self, mut f: impl FnMut(&mut Tx) -> Result<T, Errno>) -> Result<T, Errno> {
        self.writable()?;
        self.with_room(|m| {
            f(&mut Tx {
                m,
                s: self,
                now: (self.clock)(),
            })
        })
    }

    /// Run `f` on the mount; when it is refused for lack of space (the
    /// library changes nothing then), make room (`RwVolume::make_room`:
    /// a flush, the frees waiting for it, a bulkfree) and run it once
    /// more; when it is refused for a shortage of pages (EAGAIN, nothing
    /// changed either), give pages back (`RwVolume::make_pages`: a flush
    /// writes the file data that holds them) and run it once more.
    fn with_room<T>(&self, mut f: impl FnMut(&mut Mount) -> Result<T, Errno>) -> Result<T, Errno> {
        let r = self.vol.locked(&mut f);
        match r.as_ref().err() {
            Some(&Errno::ENOSPC) if self.vol.make_room() => self.vol.locked(&mut f),
            Some(&Errno::EAGAIN) if self.vol.make_pages() => self.vol.locked(&mut f),
            _ => r,
        }
    }

    /// Node `ino` was read (its data, or a directory's listing) at
    /// `now`: update its access time when the policy says so, without
    /// making the mount dirty (`Mount::touch_atime`). Never an error for
    /// the read: one is logged at debug level.
    fn accessed(&self, m: &mut Mount, inum: u64, now: u64) {
        if self.atime.mode == atime::Mode::Never {
            return;
        }
        let label = &self.vol.label;
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

    /// Write `data` at `offset` of file `ino` after `before` (the
    /// set-id bits a write clears), the flusher told, writers slowed
    /// past the dirty limit.
    pub fn write(
        &self,
        ino: u64,
        offset: u64,
        data: &[u8],
        plain: impl Fn(&InodeMeta) -> bool,
        mut before: impl FnMut(&mut Tx) -> Result<(), Errno>,
    ) -> Result<(), Errno> {
        // The whole blocks are copied before the lock is taken.
        let mut filled = self.vol.filled(offset, data);
        if !self.write_shared(ino, offset, data, &plain, &mut filled) {
            self.change(|tx| {
                before(tx)?;
                tx.write(ino, offset, data, &mut filled)
            })?;
        }
        self.vol.throttle();
        Ok(())
    }

    /// Namespace change `f` with the mount shared, given the PFS label
    /// and the time: its answer, or `None` when it declined (run it with
    /// the mount exclusive), as refused writes do.
    fn shared_step<T>(&self, f: impl FnOnce(&Mount, &str, u64) -> Option<T>) -> Option<T> {
        if self.writable().is_err() {
            return None;
        }
        let now = (self.clock)();
        let mut out = None;
        self.vol.shared_change(|m| {
            out = f(m, &self.vol.label, now);
            out.is_some()
        });
        out
    }

    /// `Tx::make` of a file, fifo, socket or device with the mount
    /// shared (`Mount::create_shared`), pinned for an open when `pin`:
    /// its attributes, or the refusal of `prepare` (the caller's check,
    /// and the new node's mode, uid and gid, from the directory's meta
    /// under its lock). `None` when it was not made: make it with the
    /// mount exclusive.
    pub fn make_shared(
        &self,
        dir: u64,
        name: &[u8],
        obj_type: ObjType,
        rdev: (u32, u32),
        pin: bool,
        prepare: &NewOwner<'_>,
    ) -> Option<Result<FileAttr, Errno>> {
        let dinum = self.inum(dir);
        // The node made and its attributes if read then, or the answer.
        let made = self.shared_step(|m, label, now| {
            Some(
                match m.create_shared(label, dinum, name, obj_type, rdev, now, prepare)? {
                    Err(e) => Err(e),
                    // Nothing else can have named it yet, so it is in memory.
                    Ok(inum) if pin && m.pin_shared(label, inum).is_none() => Err(Errno::ENOENT),
                    Ok(inum) => {
                        let ino = self.ids.ino(inum);
                        Ok((ino, self.answer(self.attr_shared(m, ino))))
                    }
                },
            )
        })?;
        Some(match made {
            Err(e) => Err(e),
            Ok((_, Some(attr))) => attr,
            Ok((ino, None)) => self.tx(|tx| tx.attr(ino)),
        })
    }

    /// `Tx::link` of a non-directory with the mount shared
    /// (`Mount::link_shared`): the node's attributes after, or the
    /// refusal of `allow` (the caller's check of the directory's and the
    /// node's meta under their locks). `None`: link with the mount
    /// exclusive.
    pub fn link_shared(
        &self,
        ino: u64,
        dir: u64,
        name: &[u8],
        allow: &dyn Fn(&InodeMeta, &InodeMeta) -> Result<(), Errno>,
    ) -> Option<Result<FileAttr, Errno>> {
        let (inum, dinum) = (self.inum(ino), self.inum(dir));
        let linked = self.shared_step(|m, label, now| {
            Some(
                m.link_shared(label, inum, dinum, name, now, allow)?
                    .map(|()| self.answer(self.attr_shared(m, ino))),
            )
        })?;
        Some(match linked {
            Err(e) => Err(e),
            Ok(Some(attr)) => attr,
            Ok(None) => self.tx(|tx| tx.attr(ino)),
        })
    }

    /// `Tx::unlink` of a non-directory with the mount shared
    /// (`Mount::unlink_shared`), after `allow` (the caller's check of
    /// the directory's and the entry's meta under their locks). `None`:
    /// unlink with the mount exclusive.
    pub fn unlink_shared(
        &self,
        dir: u64,
        name: &[u8],
        allow: &dyn Fn(&InodeMeta, &InodeMeta) -> Result<(), Errno>,
    ) -> Option<Result<(), Errno>> {
        let dinum = self.inum(dir);
        self.shared_step(|m, label, now| m.unlink_shared(label, dinum, name, now, allow))
    }

    /// `Tx::rename` of a non-directory, without RENAME_EXCHANGE or
    /// RENAME_WHITEOUT, with the mount shared (`Mount::rename_shared`),
    /// after `allow` (the caller's check of both directories', the
    /// source's and the replaced entry's meta under their locks).
    /// `None`: rename with the mount exclusive.
    pub fn rename_shared(
        &self,
        old: (u64, &[u8]),
        new: (u64, &[u8]),
        noreplace: bool,
        allow: &RenameCheck<'_>,
    ) -> Option<Result<(), Errno>> {
        let (odinum, ndinum) = (self.inum(old.0), self.inum(new.0));
        self.shared_step(|m, label, now| {
            m.rename_shared(label, odinum, old.1, ndinum, new.1, noreplace, now, allow)
        })
    }

    /// setattr of a mode, an owner or times with the mount shared
    /// (`Mount::setattr_shared`), what to set `asked` of the inode's meta
    /// and the time: its attributes, or its error (nothing changed).
    /// `None` when it was not made: run it with the mount exclusive.
    pub fn setattr_shared(
        &self,
        ino: u64,
        asked: &dyn Fn(&InodeMeta, u64) -> Result<SetAttr, Errno>,
    ) -> Option<Result<FileAttr, Errno>> {
        if self.writable().is_err() {
            return None;
        }
        let (label, inum, now) = (&self.vol.label, self.inum(ino), (self.clock)());
        let mut out = None;
        self.vol
            .shared_change(|m| {
                match m.setattr_shared(label, inum, now, |meta| asked(meta, now)) {
                    Some(Ok(Ok(_))) => {}
                    Some(Ok(Err(e))) => {
                        out = Some(Err(e));
                        return true;
                    }
                    _ => return false,
                }
                // Made: the attributes from memory, or (a directory whose
                // links were never counted) with the mount exclusive below.
                out = self.answer(self.attr_shared(m, ino));
                true
            })
            .then(|| out.unwrap_or_else(|| self.tx(|tx| tx.attr(ino))))
    }

    /// `write` with the mount shared (`Mount::write_shared`): for a file
    /// in memory whose meta `plain` says needs nothing done `before` (no
    /// set-id bit to clear; its mode cannot change while the mount is
    /// shared). False when it was not written: the write runs with the
    /// mount exclusive, which loads, makes room and reports errors.
    fn write_shared(
        &self,
        ino: u64,
        offset: u64,
        data: &[u8],
        plain: &dyn Fn(&InodeMeta) -> bool,
        filled: &mut Filled,
    ) -> bool {
        if self.writable().is_err() {
            return false;
        }
        let (label, inum, now) = (&self.vol.label, self.inum(ino), (self.clock)());
        self.vol.shared_change(|m| {
            match m.write_shared(label, inum, offset, data, now, filled, plain) {
                Some(Ok(())) => {
                    self.vol.note_written(m, data.len() as u64);
                    true
                }
                _ => false,
            }
        })
    }

    /// Zero `[offset, offset + len)` of file `ino`, within its size:
    /// only where there is data (holes stay), a chunk per hold of the
    /// mount. The flush turns the zeroed blocks into holes.
    pub fn punch_hole(&self, ino: u64, offset: u64, len: u64) -> Result<(), Errno> {
        let inum = self.inum(ino);
        let end = offset.saturating_add(len);
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(PUNCH_CHUNK);
            self.change(|tx| {
                let r = tx.m.punch_hole(&self.vol.label, inum, pos, n, tx.now);
                self.h(r)
            })?;
            pos += n;
        }
        Ok(())
    }

    /// Copy `len` bytes from `offset_in` of file `src` to `offset_out`
    /// of `dst`, `chunk` bytes per hold of the mount: holes in the
    /// source are written as zeros, which the flush stores as holes
    /// again. Short at the source's end, and when space runs out after
    /// a first chunk (what was copied stands).
    pub fn copy(
        &self,
        src: u64,
        offset_in: u64,
        dst: u64,
        offset_out: u64,
        len: u64,
        chunk: u64,
    ) -> Result<u64, Errno> {
        let (src, dst) = (self.inum(src), self.inum(dst));
        if src == dst
            && offset_in < offset_out.saturating_add(len)
            && offset_out < offset_in.saturating_add(len)
        {
            return Err(Errno::EINVAL);
        }
        let mut done = 0u64;
        while done < len {
            self.writable()?;
            let n = (len - done).min(chunk) as usize;
            let data = self.h(self.vol.read(src, offset_in + done, n))?;
            if data.is_empty() {
                break;
            }
            let r = self.with_room(|m| {
                let r = m.write(
                    &self.vol.label,
                    dst,
                    offset_out + done,
                    &data,
                    (self.clock)(),
                );
                self.h(r)?;
                self.vol.note_written(m, data.len() as u64);
                Ok(())
            });
            match r {
                Err(e) if e == Errno::ENOSPC && done > 0 => break,
                r => r?,
            }
            self.vol.throttle();
            done += data.len() as u64;
        }
        Ok(done)
    }

    /// `attr` with the mount locked by the caller.
    fn attr_locked(
        &self,
        mount: &mut Mount,
        ino: u64,
        m: &InodeMeta,
        bytes: u64,
    ) -> Result<FileAttr, Errno> {
        self.attr_with(ino, m, bytes, || {
            self.h(mount.readdir(&self.vol.label, m.inum, 0))
        })
    }
}

impl Tx<'_> {
    fn h<T>(&self, r: hammer2::Result<T>) -> Result<T, Errno> {
        self.s.h(r)
    }

    fn inum(&self, ino: u64) -> u64 {
        self.s.inum(ino)
    }

    /// The node id of inode `inum`.
    pub fn ino(&self, inum: u64) -> u64 {
        self.s.ids.ino(inum)
    }

    pub fn meta(&mut self, ino: u64) -> Result<InodeMeta, Errno> {
        let r = self.m.getattr(&self.s.vol.label, self.inum(ino));
        self.h(r)
    }

    /// Directory `ino`'s meta (ENOTDIR for anything else).
    pub fn dir(&mut self, ino: u64) -> Result<InodeMeta, Errno> {
        let d = self.meta(ino)?;
        if d.obj_type != ObjType::Directory {
            return Err(Errno::ENOTDIR);
        }
        Ok(d)
    }

    /// The meta of entry `name` of directory `dir` (ENOENT).
    pub fn entry(&mut self, dir: u64, name: &[u8]) -> Result<InodeMeta, Errno> {
        let r = self.m.lookup(&self.s.vol.label, self.inum(dir), name);
        let inum = self.h(r)?.ok_or(Errno::ENOENT)?;
        let r = self.m.getattr(&self.s.vol.label, inum);
        self.h(r)
    }

    /// Node `ino`'s attributes.
    pub fn attr(&mut self, ino: u64) -> Result<FileAttr, Errno> {
        let inum = self.inum(ino);
        let r = self.m.getattr(&self.s.vol.label, inum);
        let meta = self.h(r)?;
        let r = self.m.stored_bytes(&self.s.vol.label, inum);
        let bytes = self.h(r)?;
        self.s.attr_locked(self.m, ino, &meta, bytes)
    }

    /// Make a non-directory node (file, fifo, socket, device: `rdev`
    /// as major, minor) or a directory named `name` in `dir`; its node
    /// id.
    #[allow(clippy::too_many_arguments)]
    pub fn make(
        &mut self,
        dir: u64,
        name: &[u8],
        obj_type: ObjType,
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: (u32, u32),
    ) -> Result<u64, Errno> {
        let (label, dinum, now) = (&self.s.vol.label, self.inum(dir), self.now);
        let inum = if obj_type == ObjType::Directory {
            let r = self.m.mkdir(label, dinum, name, mode, uid, gid, now);
            let inum = self.h(r)?;
            self.s.dirlinks.added(dinum);
            inum
        } else {
            let r = self
                .m
                .create(label, dinum, name, obj_type, mode, uid, gid, rdev, now);
            self.h(r)?
        };
        Ok(self.ino(inum))
    }

    /// Symlink `name` in `dir` to `target`; its node id.
    pub fn symlink(
        &mut self,
        dir: u64,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<u64, Errno> {
        let (dinum, now) = (self.inum(dir), self.now);
        let r = self
            .m
            .symlink(&self.s.vol.label, dinum, name, target, uid, gid, now);
        Ok(self.ino(self.h(r)?))
    }

    /// An unnamed file in `dir` (O_TMPFILE), pinned; its node id.
    pub fn tmpfile(&mut self, dir: u64, mode: u32, uid: u32, gid: u32) -> Result<u64, Errno> {
        let (dinum, now) = (self.inum(dir), self.now);
        let r = self
            .m
            .tmpfile(&self.s.vol.label, dinum, mode, uid, gid, now);
        Ok(self.ino(self.h(r)?))
    }

    pub fn link(&mut self, ino: u64, dir: u64, name: &[u8]) -> Result<(), Errno> {
        let (inum, dinum, now) = (self.inum(ino), self.inum(dir), self.now);
        let r = self.m.link(&self.s.vol.label, inum, dinum, name, now);
        self.h(r)
    }

    pub fn unlink(&mut self, dir: u64, name: &[u8]) -> Result<(), Errno> {
        let (dinum, now) = (self.inum(dir), self.now);
        let r = self.m.unlink(&self.s.vol.label, dinum, name, now);
        self.h(r)
    }

    /// Remove directory `name` (inode `victim`) from `dir`.
    pub fn rmdir(&mut self, dir: u64, name: &[u8], victim: u64) -> Result<(), Errno> {
        let (dinum, now) = (self.inum(dir), self.now);
        let r = self.m.rmdir(&self.s.vol.label, dinum, name, now);
        self.h(r)?;
        self.s.dirlinks.removed(dinum);
        self.s.dirlinks.forget(victim);
        Ok(())
    }

    /// Rename entry `old` (directory node, name) to `new`; `whiteout`
    /// leaves a whiteout (a character device 0/0 owned by that uid and
    /// gid) at the old name. When it `moves_dir` (a directory moved or
    /// replaced), both parents' link counts are recounted, and the
    /// directory inode it replaces (`replaced_dir`) forgets its own.
    pub fn rename(
        &mut self,
        old: (u64, &[u8]),
        new: (u64, &[u8]),
        flags: RenameFlags,
        whiteout: Option<(u32, u32)>,
        moves_dir: bool,
        replaced_dir: Option<u64>,
    ) -> Result<(), Errno> {
        let (odinum, ndinum, now) = (self.inum(old.0), self.inum(new.0), self.now);
        let (name, nname) = (old.1, new.1);
        let label = &self.s.vol.label;
        let r = match whiteout {
            Some((uid, gid)) => self.m.rename_whiteout(
                label,
                odinum,
                name,
                ndinum,
                nname,
                flags.noreplace,
                uid,
                gid,
                now,
            ),
            None => self
                .m
                .rename(label, odinum, name, ndinum, nname, flags, now),
        };
        self.h(r)?;
        if moves_dir {
            self.s.dirlinks.forget(odinum);
            self.s.dirlinks.forget(ndinum);
            if let Some(d) = replaced_dir {
                self.s.dirlinks.forget(d);
            }
        }
        Ok(())
    }

    pub fn setattr(&mut self, ino: u64, a: SetAttr) -> Result<(), Errno> {
        let (inum, now) = (self.inum(ino), self.now);
        let r = self.m.setattr(&self.s.vol.label, inum, a, now);
        self.h(r).map(|_| ())
    }

    pub fn pin(&mut self, ino: u64) -> Result<(), Errno> {
        let r = self.m.pin(&self.s.vol.label, self.inum(ino));
        self.h(r)
    }

    fn write(
        &mut self,
        ino: u64,
        offset: u64,
        data: &[u8],
        filled: &mut Filled,
    ) -> Result<(), Errno> {
        let (inum, now) = (self.inum(ino), self.now);
        let r = self
            .m
            .write_filled(&self.s.vol.label, inum, offset, data, now, filled);
        self.h(r)?;
        self.s.vol.note_written(self.m, data.len() as u64);
        Ok(())
    }

    /// Reserve room for `[offset, offset + len)` of file `ino`
    /// (`Mount::fallocate`), extending its size unless `keep_size`.
    pub fn fallocate(
        &mut self,
        ino: u64,
        offset: u64,
        len: u64,
        keep_size: bool,
    ) -> Result<(), Errno> {
        let (inum, now) = (self.inum(ino), self.now);
        let r = self
            .m
            .fallocate(&self.s.vol.label, inum, offset, len, keep_size, now);
        self.h(r)
    }

    /// FALLOC_FL_ZERO_RANGE (`Mount::zero_range`).
    pub fn zero_range(
        &mut self,
        ino: u64,
        offset: u64,
        len: u64,
        keep_size: bool,
    ) -> Result<(), Errno> {
        let (inum, now) = (self.inum(ino), self.now);
        let r = self
            .m
            .zero_range(&self.s.vol.label, inum, offset, len, keep_size, now);
        self.h(r)
    }
}

impl Nodes for ReadWrite {
    fn rw(&self) -> Result<&ReadWrite, Errno> {
        Ok(self)
    }

    fn entry_ttl(&self, _ttl: Duration) -> Duration {
        TTL_ENTRY_READ_WRITE
    }

    fn meta(&self, ino: u64) -> Result<InodeMeta, Errno> {
        let inum = self.inum(ino);
        self.query(
            |m| loaded(m.getattr_loaded(&self.vol.label, inum)),
            |tx| tx.meta(ino),
        )
    }

    fn stat(&self, ino: u64) -> Result<(InodeMeta, u64), Errno> {
        let inum = self.inum(ino);
        let label = &self.vol.label;
        self.query(
            |m| loaded(m.stat_loaded(label, inum)),
            |tx| {
                let meta = self.h(tx.m.getattr(label, inum))?;
                Ok((meta, self.h(tx.m.stored_bytes(label, inum))?))
            },
        )
    }

    fn attr(&self, ino: u64, m: &InodeMeta, bytes: u64) -> Result<FileAttr, Errno> {
        if m.obj_type != ObjType::Directory {
            return attr_of_meta(&self.errors, ino, m, bytes);
        }
        self.query(
            |mount| self.attr_of(mount, ino, m, bytes),
            |tx| self.attr_locked(tx.m, ino, m, bytes),
        )
    }

    fn lookup(&self, parent: u64, name: &[u8], search: Check) -> Result<Entry, Errno> {
        let label = &self.vol.label;
        let attr = self.query(
            |m| {
                let dir = loaded(m.getattr_loaded(label, self.inum(parent)))?;
                if dir.obj_type != ObjType::Directory {
                    return Err(Errno::ENOTDIR.into());
                }
                search(&dir, 1)?;
                let inum = loaded(m.lookup_loaded(label, self.inum(parent), name))?
                    .ok_or(Errno::ENOENT)?;
                self.attr_shared(m, self.ids.ino(inum))
            },
            |tx| {
                let dir = tx.dir(parent)?;
                search(&dir, 1)?;
                let meta = tx.entry(parent, name)?;
                tx.attr(tx.ino(meta.inum))
            },
        )?;
        Ok(Entry { attr, inode: None })
    }

    fn parent(&self, _dir: u64, meta: &InodeMeta) -> Result<u64, Errno> {
        Ok(parent_ino(&self.ids, meta))
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        let inum = self.inum(ino);
        let r = self.vol.locked(|m| m.readlink(&self.vol.label, inum));
        self.h(r)
    }

    fn open(
        &self,
        ino: u64,
        reads: bool,
        may: &dyn Fn(&InodeMeta) -> Result<(), Errno>,
    ) -> Result<bool, Errno> {
        // Not a directory, and as the caller may; reads that update the
        // access time must reach us, not the page cache (see `atime`).
        let check = |meta: &InodeMeta| match meta.obj_type {
            ObjType::Directory => Err(Errno::EISDIR),
            _ => may(meta),
        };
        let keeps = |meta: &InodeMeta, now| reads && self.atime.due(meta, now);
        // With the mount shared when the inode is in memory.
        let (label, inum, now) = (&self.vol.label, self.inum(ino), (self.clock)());
        let mut out = None;
        self.vol.shared_change(|m| {
            let Some(Ok(meta)) = m.getattr_loaded(label, inum) else {
                return false;
            };
            let r = check(&meta);
            if r.is_ok() && m.pin_shared(label, inum).is_none() {
                return false;
            }
            out = Some(r.map(|()| keeps(&meta, now)));
            true
        });
        out.unwrap_or_else(|| {
            self.tx(|tx| {
                let meta = tx.meta(ino)?;
                check(&meta)?;
                tx.pin(ino)?;
                Ok(keeps(&meta, tx.now))
            })
        })
    }

    fn pin(&self, ino: u64) -> Result<(), Errno> {
        self.tx(|tx| tx.pin(ino))
    }

    fn unpin(&self, ino: u64) {
        let (label, inum) = (&self.vol.label, self.inum(ino));
        if self
            .vol
            .shared_change(|m| m.unpin_shared(label, inum).is_some())
        {
            return;
        }
        let r = self.vol.locked(|m| m.unpin(label, inum));
        if let Err(e) = r {
            self.errors.fail(&e);
        }
    }

    fn read(&self, ino: u64, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        let inum = self.inum(ino);
        let now = (self.clock)();
        let r = self.vol.read_noting(
            inum,
            offset,
            len,
            |m| matches!(self.atime_due(m, inum, now), Ok(false)),
            |m| self.accessed(m, inum, now),
        );
        self.h(r)
    }

    /// ENOSYS with the writeback cache: the kernel then answers itself
    /// (see `vnops::lseek`).
    fn seek(&self, ino: u64, offset: u64, data: bool) -> Result<Option<u64>, Errno> {
        if self.writeback_cache {
            return Err(Errno::ENOSYS);
        }
        let inum = self.inum(ino);
        let label = &self.vol.label;
        self.vol.locked(|m| {
            let size = self.h(m.getattr(label, inum))?.size;
            Ok(if data {
                self.h(m.seek_data(label, inum, offset))?
            } else if offset < size {
                Some(self.h(m.seek_hole(label, inum, offset))?)
            } else {
                None
            })
        })
    }

    fn list(&self, ino: u64, from: u64) -> Result<Vec<DirEntry>, Errno> {
        let label = &self.vol.label;
        let inum = self.inum(ino);
        let mut out = self.query(
            |m| loaded(m.readdir_loaded(label, inum, from)),
            |tx| self.h(tx.m.readdir(label, inum, from)),
        )?;
        for e in &mut out {
            e.inum = self.ids.ino(e.inum);
        }
        Ok(out)
    }

    fn listed(&self, ino: u64) {
        let inum = self.inum(ino);
        self.vol.locked(|m| self.accessed(m, inum, (self.clock)()));
    }

    fn entry_attrs(&self, entries: &[DirEntry]) -> Vec<Option<Entry>> {
        let entry = |attr| Some(Entry { attr, inode: None });
        let shared = self.vol.shared(|m| {
            entries
                .iter()
                .map(|e| match self.attr_shared(m, e.inum) {
                    Err(Unshared::Load) => None,
                    r => Some(r),
                })
                .collect::<Option<Vec<_>>>()
        });
        match shared {
            // An entry that fails is left to its own lookup, as below.
            Some(attrs) => attrs
                .into_iter()
                .map(|r| entry(self.answer(r)?.ok()?))
                .collect(),
            None => self.tx(|tx| {
                entries
                    .iter()
                    .map(|e| entry(tx.attr(e.inum).ok()?))
                    .collect()
            }),
        }
    }

    fn attr_batch(&self) -> usize {
        ATTR_BATCH
    }
}

/// The volume as the snapshot layer sees it: the snapshots as last
/// flushed, opened through a `Volume` of their own (a snapshot never
/// changes, and its blocks are neither overwritten nor freed while it
/// exists, so they are read without the mount's lock).
struct Origin {
    vol: Arc<RwVolume>,
    errors: ErrorCount,
}

impl snapdir::Origin for Origin {
    fn source(&self) -> Result<snapdir::Source, Errno> {
        let (snapshots, dev) = self.vol.locked(|m| {
            let l = snapdir::snapshot_labels(m.volume());
            (l, m.volume().device().clone())
        });
        let volume = self.errors.h(hammer2::Volume::open(dev))?;
        Ok(snapdir::Source {
            snapshots: self.errors.h(snapshots)?,
            volume: Arc::new(volume),
        })
    }

    fn root_meta(&self) -> Result<InodeMeta, Errno> {
        let root = hammer2::mount::ROOT_INUM;
        let r = self.vol.locked(|m| m.getattr(&self.vol.label, root));
        self.errors.h(r)
    }
}

impl Store for ReadWrite {
    fn nodes(&self) -> &dyn Nodes {
        self
    }

    fn rw_mut(&mut self) -> Option<&mut ReadWrite> {
        Some(self)
    }

    fn name_max(&self) -> usize {
        NAME_MAX
    }

    fn ttl(&self) -> Duration {
        TTL_READ_WRITE
    }

    /// From the allocator: free, and available (free less the flush
    /// reserve and what is admitted for the next flush).
    fn statfs(&self) -> Result<Space, Errno> {
        let r = self.vol.locked(|m| m.statfs(&self.vol.label));
        self.h(r).map(|s| Space {
            total: s.bytes_total,
            free: s.bytes_free.min(s.bytes_total),
            avail: s.bytes_avail.min(s.bytes_total),
            inodes: s.inodes_used,
        })
    }

    fn sync(&self) -> Result<(), Errno> {
        self.vol.sync().map_err(Errno::from_i32)
    }

    fn fsync(&self, ino: u64) -> Result<(), Errno> {
        self.vol.fsync(self.inum(ino)).map_err(Errno::from_i32)
    }

    fn healthy(&self) -> Result<(), Errno> {
        self.writable()
    }

    /// The end of the mount (`RwVolume::unmounted`, `shutdown`,
    /// `release`): the live lock dropped, the flusher stopped, the last
    /// flush written, the writer lock dropped, nothing written after.
    fn unmount(&self) {
        self.vol.unmounted();
        if let Err(why) = self.vol.shutdown() {
            log::debug!("last flush at FUSE_DESTROY: {why}");
        }
        self.vol.release();
    }

    fn snap_origin(&self) -> Arc<dyn snapdir::Origin> {
        Arc::new(Origin {
            vol: self.vol.clone(),
            errors: self.errors.clone(),
        })
    }

    fn has_real_snapdir(&self) -> hammer2::Result<bool> {
        let root = hammer2::mount::ROOT_INUM;
        let r = self
            .vol
            .locked(|m| m.lookup(&self.vol.label, root, snapdir::NAME));
        Ok(r?.is_some())
    }

    fn pfs_list(&self) -> hammer2::Result<Vec<hammer2::pfs::PfsInfo>> {
        hammer2::pfs::pfs_list(self.vol.mount().volume())
    }

    fn inode_state(&self, inum: u64) -> hammer2::Result<(InodeMeta, Blockref, u64)> {
        self.vol.mount().inode_state(&self.vol.label, inum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bufcache::{BlockDevice, MemDevice};
    use hammer2::mount::ROOT_INUM;
    use std::sync::mpsc;
    use std::time::Duration;

    fn clock() -> u64 {
        1_000_000
    }

    /// A store over a volume holding directory `d` with file `f` (100 KiB
    /// of bytes) and file `g`, flushed and opened again with nothing in
    /// memory: (store, d, f, g, f's bytes), as inode numbers.
    fn store() -> (ReadWrite, u64, u64, u64, Vec<u8>) {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 30));
        mkfs::newfs::newfs(dev.as_ref(), &mkfs::newfs::NewfsOptions::default()).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (d, f, g) = {
            let mut m = Mount::open(dev.clone()).unwrap();
            let d = m.mkdir("DATA", ROOT_INUM, b"d", 0o755, 0, 0, 1).unwrap();
            let file = |m: &mut Mount, dir, name: &[u8]| {
                m.create("DATA", dir, name, ObjType::Regfile, 0o644, 0, 0, (0, 0), 1)
                    .unwrap()
            };
            let f = file(&mut m, d, b"f");
            m.write("DATA", f, 0, &data, 1).unwrap();
            let g = file(&mut m, ROOT_INUM, b"g");
            m.flush().unwrap();
            (d, f, g)
        };
        let v = RwVolume::new(Mount::open(dev).unwrap(), "DATA".into(), None, None);
        let rw = ReadWrite::new(Arc::new(v), ErrorCount::default(), clock);
        (rw, d, f, g, data)
    }

    /// A thread holding the mount shared (as a query does) until told to
    /// go; returns once it holds it.
    fn hold(rw: &Arc<ReadWrite>) -> (std::thread::JoinHandle<()>, mpsc::Sender<()>) {
        let (held_tx, held_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let rw = rw.clone();
        let holder = std::thread::spawn(move || {
            rw.vol.shared(|_| {
                held_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                Some(())
            });
        });
        held_rx.recv().unwrap();
        (holder, go_tx)
    }

    /// Queries share the mount (the transaction lock taken shared): while
    /// another query holds it, getattr, lookup, readdir, readdirplus's
    /// attributes and a file read of what is in memory are answered
    /// beside it. Under the one mutex they waited for the holder (the
    /// watchdog fails the test). A query that would have to load an
    /// inode first declines with the mount shared, and is answered with
    /// it exclusive once the holder is gone.
    #[test]
    fn queries_share_the_mount_and_loads_take_it_alone() {
        let (rw, d, f, g, data) = store();
        let rw = Arc::new(rw);
        let ids = rw.ids();
        let (dino, fino, gino) = (ids.ino(d), ids.ino(f), ids.ino(g));
        let any: Check = &|_, _| Ok(());
        // The first queries load d, f and the tree over f's data (with
        // the mount exclusive).
        assert_eq!(rw.lookup(1, b"d", any).unwrap().attr.ino.0, dino);
        assert_eq!(rw.lookup(dino, b"f", any).unwrap().attr.ino.0, fino);
        assert_eq!(rw.read(fino, 0, data.len()).unwrap(), data);

        let (holder, go) = hold(&rw);
        let (answered, _) = rw.vol.shared_counts();
        let (tx, rx) = mpsc::channel();
        let q = rw.clone();
        std::thread::spawn(move || {
            let any: Check = &|_, _| Ok(());
            let r = (
                q.stat(fino).map(|(m, _)| m.size),
                q.lookup(dino, b"f", any)
                    .map(|e| (e.attr.ino.0, e.attr.size)),
                q.list(dino, 0).map(|l| {
                    l.iter()
                        .map(|e| (e.name.clone(), e.inum))
                        .collect::<Vec<_>>()
                }),
                q.entry_attrs(&q.list(dino, 0).unwrap())
                    .into_iter()
                    .map(|e| e.map(|e| e.attr.size))
                    .collect::<Vec<_>>(),
                q.read(fino, 70_000, 4096),
                q.meta(dino).map(|m| m.obj_type),
            );
            let _ = tx.send(r);
        });
        let (stat, lookup, list, plus, read, meta) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a query waited for another query's hold of the mount");
        assert_eq!(stat, Ok(100_000));
        assert_eq!(lookup, Ok((fino, 100_000)));
        assert_eq!(list, Ok(vec![(b"f".to_vec(), fino)]));
        assert_eq!(plus, vec![Some(100_000)]);
        assert_eq!(read.as_deref(), Ok(&data[70_000..74_096]));
        assert_eq!(meta, Ok(ObjType::Directory));
        // stat, lookup, two listings, readdirplus, the read and meta.
        assert_eq!(rw.vol.shared_counts().0 - answered, 7);
        // g was never loaded: with the mount shared, the query declines.
        assert!(rw.vol.shared(|m| m.getattr_loaded("DATA", g)).is_none());
        go.send(()).unwrap();
        holder.join().unwrap();
        // With the holder gone, it is loaded with the mount exclusive.
        assert_eq!(rw.stat(gino).map(|(m, _)| m.size), Ok(0));
        assert!(rw
            .vol
            .shared(|m| m.getattr_loaded("DATA", g))
            .is_some_and(|r| r.is_ok()));
    }

    /// A write to a file in memory runs with the mount shared and the
    /// file's own lock: beside a query that holds the mount (and so
    /// beside writes to other files), where it used to wait for the one
    /// mutex (the watchdog fails the test). What needs the mount
    /// exclusive declines: a file not in memory, a directory.
    #[test]
    fn a_write_runs_with_the_mount_shared() {
        let (rw, d, f, g, data) = store();
        let rw = Arc::new(rw);
        let ids = rw.ids();
        let (fino, gino) = (ids.ino(f), ids.ino(g));
        let shared_write = |inum| {
            let mut filled = Filled::default();
            rw.vol.shared_change(|m| {
                m.write_shared("DATA", inum, 0, b"x", 2, &mut filled, |_| true)
                    .is_some()
            })
        };
        assert!(!shared_write(g), "g is not in memory");
        assert!(!shared_write(d), "a directory");
        assert_eq!(rw.read(fino, 0, data.len()).unwrap(), data);

        let (holder, go) = hold(&rw);
        let new: Vec<u8> = (0..200_000u32).map(|i| (i * 13 % 241) as u8).collect();
        let (tx, rx) = mpsc::channel();
        let w = rw.clone();
        let bytes = new.clone();
        std::thread::spawn(move || {
            let before = w.vol.shared_counts().0;
            let r = w.write(
                fino,
                4096,
                &bytes,
                |_| true,
                |_| panic!("the shared write needs nothing done before"),
            );
            let read = w.read(fino, 0, 300_000);
            let _ = tx.send((r, read, w.vol.shared_counts().0 - before));
        });
        let (r, read, answered) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a write waited for a query's hold of the mount");
        assert_eq!(r, Ok(()));
        let mut want = data.clone();
        want.resize(4096 + new.len(), 0);
        want[4096..].copy_from_slice(&new);
        assert_eq!(read, Ok(want));
        assert_eq!(answered, 2, "the write and the read, with the mount shared");
        go.send(()).unwrap();
        holder.join().unwrap();
        // g, loaded with the mount exclusive, is then written shared.
        assert_eq!(rw.stat(gino).map(|(m, _)| m.size), Ok(0));
        assert!(shared_write(g));
        assert_eq!(rw.read(gino, 0, 10), Ok(b"x".to_vec()));
    }

    /// A setattr of a mode, an owner or times runs with the mount
    /// shared: beside a query that holds it. Its permission check is
    /// made under the inode's lock, and a refusal is the answer; a size
    /// change declines (it runs with the mount exclusive).
    #[test]
    fn a_setattr_runs_with_the_mount_shared() {
        let (rw, _, f, _, _) = store();
        let rw = Arc::new(rw);
        let fino = rw.ids().ino(f);
        assert_eq!(rw.stat(fino).map(|(m, _)| m.mode & 0o7777), Ok(0o644));
        let (holder, go) = hold(&rw);
        let (tx, rx) = mpsc::channel();
        let s = rw.clone();
        std::thread::spawn(move || {
            let set = |a: SetAttr| move |_: &InodeMeta, _| Ok(a);
            let chmod = set(SetAttr {
                mode: Some(0o600),
                ..SetAttr::default()
            });
            let refused = |_: &InodeMeta, _| Err(Errno::EPERM);
            let sized = set(SetAttr {
                size: Some(1),
                ..SetAttr::default()
            });
            let perm = |r: Option<Result<FileAttr, Errno>>| r.map(|r| r.map(|a| a.perm));
            let _ = tx.send((
                perm(s.setattr_shared(fino, &chmod)),
                perm(s.setattr_shared(fino, &refused)),
                s.setattr_shared(fino, &sized).is_none(),
            ));
        });
        let (chmod, refused, sized_declined) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a setattr waited for a query's hold of the mount");
        assert_eq!(chmod, Some(Ok(0o600)));
        assert_eq!(refused, Some(Err(Errno::EPERM)));
        assert!(sized_declined);
        go.send(()).unwrap();
        holder.join().unwrap();
        assert_eq!(rw.stat(fino).map(|(m, _)| m.mode & 0o7777), Ok(0o600));
    }

    /// Create, link, rename and unlink of files run with the mount
    /// shared and their inodes' own locks: beside a query that holds the
    /// mount, where they used to wait for it (the watchdog fails the
    /// test). The caller's check sees the inodes' meta and its refusal is
    /// the answer; what needs the mount exclusive declines (a mkdir, an
    /// entry of the PFS root), and runs once the holder is gone.
    #[test]
    fn namespace_changes_run_with_the_mount_shared() {
        let (rw, d, f, _, _) = store();
        let rw = Arc::new(rw);
        let ids = rw.ids();
        let (dino, fino) = (ids.ino(d), ids.ino(f));
        let any: Check = &|_, _| Ok(());
        assert_eq!(rw.lookup(dino, b"f", any).unwrap().attr.ino.0, fino);

        let (holder, go) = hold(&rw);
        let (tx, rx) = mpsc::channel();
        let s = rw.clone();
        std::thread::spawn(move || {
            let before = s.vol.shared_counts().0;
            let owner = |m: &InodeMeta| {
                assert_eq!(m.obj_type, ObjType::Directory);
                Ok((0o640, 7, 8))
            };
            let made = s.make_shared(dino, b"n", ObjType::Regfile, (0, 0), true, &owner);
            let refused = s.make_shared(dino, b"m", ObjType::Regfile, (0, 0), false, &|_| {
                Err(Errno::EACCES)
            });
            let mkdir = s.make_shared(1, b"x", ObjType::Regfile, (0, 0), false, &owner);
            let ok2 = |_: &InodeMeta, _: &InodeMeta| Ok(());
            let linked = s.link_shared(fino, dino, b"f2", &ok2);
            let renamed =
                s.rename_shared((dino, b"f2"), (dino, b"f3"), false, &|_, _, src, dst| {
                    assert_eq!((src.nlinks, dst.is_none()), (2, true));
                    Ok(())
                });
            let unlinked = s.unlink_shared(dino, b"f", &ok2);
            let answered = s.vol.shared_counts().0 - before;
            let _ = tx.send((made, refused, mkdir, linked, renamed, unlinked, answered));
        });
        let (made, refused, root, linked, renamed, unlinked, answered) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a namespace change waited for a query's hold of the mount");
        let attr = made.expect("made with the mount shared").unwrap();
        assert_eq!(
            (attr.perm, attr.uid, attr.gid, attr.nlink),
            (0o640, 7, 8, 1)
        );
        assert_eq!(refused.map(|r| r.err()), Some(Some(Errno::EACCES)));
        assert!(root.is_none(), "an entry of the PFS root declines");
        assert_eq!(linked.map(|r| r.map(|a| a.nlink)), Some(Ok(2)));
        assert_eq!(renamed, Some(Ok(())));
        assert_eq!(unlinked, Some(Ok(())));
        // The create, the refusal, the link, the rename and the unlink.
        assert_eq!(answered, 5);
        go.send(()).unwrap();
        holder.join().unwrap();
        let names = |rw: &ReadWrite| {
            let mut l: Vec<_> = rw
                .list(dino, 0)
                .unwrap()
                .iter()
                .map(|e| (e.name.clone(), e.inum))
                .collect();
            l.sort();
            l
        };
        let n = rw.inum(attr.ino.0);
        assert_eq!(names(&rw), vec![(b"f3".to_vec(), f), (b"n".to_vec(), n)]);
        assert_eq!(rw.stat(fino).map(|(m, _)| m.nlinks), Ok(1));
        // The new file is pinned, as an open makes it.
        assert_eq!(rw.vol.shared(|m| Some(m.pin_count("DATA", n))), Some(1));
        // Flushed and read back from disk: the same.
        rw.vol.mount().flush().unwrap();
        let dev = rw.vol.mount().volume().device().clone();
        let pfs =
            hammer2::Pfs::open(Arc::new(hammer2::Volume::open(dev).unwrap()), "DATA").unwrap();
        assert_eq!(pfs.resolve("/d/f3").unwrap().meta().inum, f);
        assert_eq!(pfs.resolve("/d/n").unwrap().meta().mode & 0o7777, 0o640);
        assert!(pfs.resolve("/d/f").is_err() && pfs.resolve("/d/f2").is_err());
    }

    /// An open and a release of a file in memory count its pins with the
    /// mount shared (beside a query that holds it); the last release of
    /// a file with no links left declines, and runs with the mount
    /// exclusive, where the file leaves memory.
    #[test]
    fn opens_and_releases_pin_with_the_mount_shared() {
        let (rw, d, f, _, data) = store();
        let rw = Arc::new(rw);
        let fino = rw.ids().ino(f);
        let pins = move |rw: &ReadWrite| rw.vol.shared(|m| Some(m.pin_count("DATA", f))).unwrap();
        assert_eq!(rw.stat(fino).map(|(m, _)| m.size), Ok(100_000));
        let (holder, go) = hold(&rw);
        let (tx, rx) = mpsc::channel();
        let s = rw.clone();
        std::thread::spawn(move || {
            let opened = (0..3)
                .map(|_| s.open(fino, true, &|_| Ok(())))
                .collect::<Vec<_>>();
            let refused = s.open(fino, true, &|_| Err(Errno::EACCES));
            let held = pins(&s);
            s.unpin(fino);
            let _ = tx.send((opened, refused, held, pins(&s)));
        });
        let (opened, refused, held, after) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("an open waited for a query's hold of the mount");
        assert!(opened.iter().all(|r| r.is_ok()), "{opened:?}");
        assert_eq!(refused, Err(Errno::EACCES));
        assert_eq!((held, after), (3, 2));
        go.send(()).unwrap();
        holder.join().unwrap();

        // Unlinked while open: the last release removes it (exclusive).
        rw.vol.locked(|m| m.unlink("DATA", d, b"f", 3)).unwrap();
        rw.unpin(fino);
        assert_eq!(rw.read(fino, 0, 10), Ok(data[..10].to_vec()));
        assert!(!rw
            .vol
            .shared_change(|m| m.unpin_shared("DATA", f).is_some()));
        rw.unpin(fino);
        assert_eq!(pins(&rw), 0);
        assert!(rw.stat(fino).is_err(), "gone with its last pin");
    }
}
