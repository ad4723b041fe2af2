//! Operations Linux asks of a filesystem that DragonFly's vnops have no
//! counterpart for, built from the mount's own steps: unnamed files
//! (O_TMPFILE), rename leaving a whiteout (RENAME_WHITEOUT, for
//! overlayfs), FALLOC_FL_ZERO_RANGE, and access times kept in memory
//! until a flush happens anyway (`touch_atime`).
//!
//! Access times: a read that updates only the atime must not cost a
//! flush (a new volume header and a rewrite of every inode on the way)
//! on a copy-on-write filesystem, so `touch_atime` records the time in
//! the PFS's `atimes` and in the inode in memory, without marking it
//! dirty: `Mount::is_dirty` does not see it and no flush is started for
//! it. Every flush writes them (`flush_atimes` at its start marks those
//! inodes dirty), and so do fsync, sync and unmount, which call
//! `flush_atimes` before asking for a flush; an inode read again from
//! disk before that gets its time back from `atimes`. Past
//! `ATIMES_MAX` inodes they are marked dirty at once, which bounds the
//! memory they hold (the next interval flush writes them). A crash
//! loses what no flush wrote, as Linux's `lazytime` does.

use super::vnops::new_meta;
use super::{range_end, Mount, Tier, NEW_INODE};
use crate::disk::ObjType;
use crate::error::{Error, Result};
use crate::inode::{InodeNode, PendingChange};

/// Access times held in memory at most, per PFS, before they are
/// handed to the next flush.
pub const ATIMES_MAX: usize = 1024;

impl Mount {
    /// O_TMPFILE: a regular file with no name and no links in `dir`'s
    /// PFS, pinned once (the opener's pin, see `Mount::pin`): it lives
    /// as a file unlinked while open does, until its last unpin, unless
    /// `link` gives it a name first. `dir` is where it was made (its
    /// parent, compression and check methods, as `create`). A flush
    /// meanwhile writes it to the inode index with no links: after a
    /// crash it is an orphan, which the next mount removes.
    #[allow(clippy::too_many_arguments)]
    pub fn tmpfile(
        &mut self,
        label: &str,
        dir: u64,
        mode: u32,
        uid: u32,
        gid: u32,
        now: u64,
    ) -> Result<u64> {
        self.writable()?;
        let dmeta = self.getattr(label, dir)?;
        if dmeta.obj_type != ObjType::Directory {
            return Err(Error::NotDir {
                what: format!("inode {dir}"),
            });
        }
        self.load_next_inum(label)?;
        self.admit_change(label, &[NEW_INODE], 0, 0, Tier::Normal)?;
        crate::volume::allow_io();
        let inum = self.alloc_inum(label)?;
        let mut data = new_meta(ObjType::Regfile, inum, &dmeta, mode, uid, gid, now);
        data.meta.nlinks = 0;
        let p = self.pfs_mut(label)?;
        p.inodes.insert(inum, InodeNode::new(data));
        *p.pins.get_mut().entry(inum).or_insert(0) += 1;
        Ok(inum)
    }

    /// rename(2) with RENAME_WHITEOUT (and RENAME_NOREPLACE when
    /// `noreplace`): the rename, and in the same step a whiteout where
    /// the source was, as Linux makes one: a character device 0/0 with
    /// mode 0, owned by `uid` and `gid`. Both or neither: the space for
    /// both is admitted before anything changes.
    #[allow(clippy::too_many_arguments)]
    pub fn rename_whiteout(
        &mut self,
        label: &str,
        odir: u64,
        oname: &[u8],
        ndir: u64,
        nname: &[u8],
        noreplace: bool,
        uid: u32,
        gid: u32,
        now: u64,
    ) -> Result<()> {
        self.writable()?;
        let src = self.lookup(label, odir, oname)?;
        if src.is_some() && src == self.lookup(label, ndir, nname)? {
            // Two names of one inode: rename does nothing, so no whiteout.
            return Ok(());
        }
        // What the rename and the create below admit, at most: the two
        // directories, source, target and the whiteout, three entries
        // changed and one added. Admitted here to know both fit, then
        // handed back: each step admits its own share.
        let before = *self.admitted.get_mut();
        self.admit_change(
            label,
            &[odir, ndir, NEW_INODE, NEW_INODE, NEW_INODE],
            4,
            0,
            Tier::Normal,
        )?;
        *self.admitted.get_mut() = before;
        let flags = super::RenameFlags {
            noreplace,
            exchange: false,
        };
        self.rename(label, odir, oname, ndir, nname, flags, now)?;
        self.create(label, odir, oname, ObjType::Cdev, 0, uid, gid, (0, 0), now)?;
        Ok(())
    }

    /// FALLOC_FL_ZERO_RANGE (with FALLOC_FL_KEEP_SIZE when `keep_size`):
    /// `[offset, offset + len)` reads as zeros, holds no data blocks (as
    /// `punch_hole` leaves a range) and has room reserved for every
    /// block (as `fallocate`), so writes there cannot fail for lack of
    /// space while this mount lives; the file grows to the end of the
    /// range unless `keep_size`. NoSpace when the volume cannot hold it,
    /// changing nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn zero_range(
        &mut self,
        label: &str,
        inum: u64,
        offset: u64,
        len: u64,
        keep_size: bool,
        now: u64,
    ) -> Result<()> {
        self.writable()?;
        let end = range_end("zero range", offset, len)?;
        let (t, size, blocks) = self.with_node(label, inum, |_, n| {
            let grow = if !keep_size && end > n.size() {
                n.new_pending_blocks(PendingChange::Truncate { size: end })
            } else {
                0
            };
            Ok((
                n.obj_type(),
                n.size(),
                n.punch_pending_blocks(offset, len) + n.new_reserved_blocks(offset, end) + grow,
            ))
        })?;
        if t != ObjType::Regfile {
            return Err(Error::InvalidArgument {
                what: format!("zero range in a {}", t.name()),
            });
        }
        let cost = self.admit_change(label, &[inum], 0, blocks, Tier::Normal)?;
        // `punch` reads before it changes anything; a block missing from
        // the cache fails it (and gives the admission back) so that the
        // caller runs it again, which punching, growing and reserving the
        // same range again makes no different.
        let r = self.with_node(label, inum, |vol, n| {
            n.punch(vol, offset, len)?;
            if !keep_size && end > size {
                n.truncate(vol, end)?;
            }
            n.reserve(offset, end);
            n.data.meta.mtime = now;
            n.data.meta.ctime = now;
            n.dirty = true;
            Ok(())
        });
        self.unadmit(cost, r)
    }

    /// Set inode `inum`'s access time to `atime` without making it dirty
    /// (see the module comment): written by the next flush, whatever
    /// starts it. When the rewrite of the inode cannot be admitted (the
    /// volume is full), the time is left as it was: an access time is
    /// not worth an error.
    pub fn touch_atime(&mut self, label: &str, inum: u64, atime: u64) -> Result<()> {
        self.writable()?;
        // The inode in memory before anything is admitted (a read that
        // misses the cache fails here, changing nothing).
        self.with_node(label, inum, |_, _| Ok(()))?;
        let dirty = self.inode_dirty(label, inum);
        let known = self.pfs_mut(label)?.atimes.contains_key(&inum);
        if !known && !dirty {
            match self.admit_change(label, &[inum], 0, 0, Tier::Normal) {
                Err(Error::NoSpace { .. }) => return Ok(()),
                r => {
                    r?;
                }
            }
        }
        self.with_node(label, inum, |_, n| {
            n.data.meta.atime = atime;
            Ok(())
        })?;
        if dirty {
            // The flush writes it anyway.
            return Ok(());
        }
        let p = self.pfs_mut(label)?;
        p.atimes.insert(inum, atime);
        if p.atimes.len() > ATIMES_MAX {
            self.flush_atimes()?;
        }
        Ok(())
    }

    /// Inodes whose access time waits for a flush, in every PFS.
    pub fn atimes_waiting(&self) -> usize {
        self.pfs.values().map(|p| p.atimes.len()).sum()
    }

    /// Hand the access times kept in memory to the next flush: their
    /// inodes become dirty (so `is_dirty` sees them). An inode removed
    /// since needs nothing; one that cannot be loaded keeps its time
    /// waiting, and the first such error is returned.
    pub fn flush_atimes(&mut self) -> Result<()> {
        let waiting: Vec<(String, u64, u64)> = self
            .pfs
            .iter_mut()
            .flat_map(|(label, p)| {
                std::mem::take(&mut p.atimes)
                    .into_iter()
                    .map(move |(inum, t)| (label.clone(), inum, t))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut first_error = None;
        for (label, inum, atime) in waiting {
            let r = self.with_node(&label, inum, |_, n| {
                n.data.meta.atime = atime;
                n.dirty = true;
                Ok(())
            });
            match r {
                Ok(()) | Err(Error::NotFound { .. }) => {}
                Err(e) => {
                    // Kept for the next try: an inode that is not in the
                    // cache now (`volume::CacheOnly`, the caller runs again
                    // once it is) or cannot be read now.
                    if let Ok(p) = self.pfs_mut(&label) {
                        p.atimes.entry(inum).or_insert(atime);
                    }
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
