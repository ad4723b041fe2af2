//! The namespace and file operations of a read-write mount, as a
//! library API (DragonFly's `hammer2_vnops.c`): lookup, readdir, read,
//! write, setattr, create, link, unlink, rename, fallocate, seek. Each
//! admits the space its change may need (`Mount::admit_change`), loads
//! what it reads before it changes anything, and changes inodes in
//! memory only; the flush (`flush.rs`) writes them.

use super::{range_end, Mount, RenameFlags, SetAttr, Tier, DATA_ADMIT_BYTES, NEW_INODE, ROOT_INUM};
use crate::disk::{self, DirentHead, InodeData, InodeMeta, ObjType, Uuid, OPFLAG_DIRECTDATA};
use crate::error::{Error, Result};
use crate::inode::{Filled, InodeNode, PendingChange};
use crate::pfs::{self, DirEntry};
use crate::volume::Volume;

pub(super) fn new_meta(
    obj_type: ObjType,
    inum: u64,
    parent: &InodeMeta,
    mode: u32,
    uid: u32,
    gid: u32,
    now: u64,
) -> InodeData {
    let mut d = InodeData::default();
    let m = &mut d.meta;
    m.obj_type = obj_type;
    m.inum = inum;
    m.iparent = parent.inum.max(ROOT_INUM);
    m.comp_algo = parent.comp_algo;
    m.check_algo = parent.check_algo;
    m.ctime = now;
    m.mtime = now;
    m.atime = now;
    m.btime = now;
    m.mode = mode & 0o7777;
    m.nlinks = 1;
    m.uid = Uuid::from_unix_id(uid);
    m.gid = Uuid::from_unix_id(gid);
    if matches!(obj_type, ObjType::Regfile | ObjType::Softlink) {
        m.op_flags |= OPFLAG_DIRECTDATA;
    }
    m.name_key = inum;
    d.set_name(format!("0x{inum:016x}").as_bytes());
    d
}

impl Mount {
    /// An inode's meta.
    pub fn getattr(&mut self, label: &str, inum: u64) -> Result<InodeMeta> {
        Ok(self.node(label, inum)?.data.meta)
    }

    /// The bytes an inode's blocks take on disk, as of now, and the room
    /// fallocate reserved for it (see `InodeNode::stored_bytes`): what
    /// `st_blocks` reports.
    pub fn stored_bytes(&mut self, label: &str, inum: u64) -> Result<u64> {
        self.with_node(label, inum, |vol, n| Ok(n.stored_bytes(vol)))
    }

    /// An inode's meta, the blockref it was last flushed through (EMPTY
    /// if it never was) and its file data waiting for a flush, for
    /// `hammer2 stat`.
    pub fn inode_state(
        &mut self,
        label: &str,
        inum: u64,
    ) -> Result<(InodeMeta, crate::disk::Blockref, u64)> {
        let n = self.node(label, inum)?;
        Ok((n.data.meta, n.bref, n.dirty_bytes()))
    }

    /// Look `name` up in directory `dir`.
    pub fn lookup(&mut self, label: &str, dir: u64, name: &[u8]) -> Result<Option<u64>> {
        Ok(self.lookup_key(label, dir, name)?.map(|(_, inum)| inum))
    }

    /// `lookup`, with the entry's key: (key, inode number). Removing the
    /// entry by its key reads nothing again (see `volume::CacheOnly`: an
    /// operation reads before it changes anything).
    fn lookup_key(&mut self, label: &str, dir: u64, name: &[u8]) -> Result<Option<(u64, u64)>> {
        self.with_node(label, dir, |vol, d| {
            is_dir(dir, d)?;
            found(dir, name, d.dir_lookup(vol, name)?)
        })
    }

    /// Entries of `dir` with key at least `from` (0 for all), in key
    /// order; keys are stable readdir cookies.
    pub fn readdir(&mut self, label: &str, dir: u64, from: u64) -> Result<Vec<DirEntry>> {
        self.with_node(label, dir, |vol, d| {
            is_dir(dir, d)?;
            entries(dir, d.dir_list(vol, from)?)
        })
    }

    pub fn read(&mut self, label: &str, inum: u64, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.with_node(label, inum, |vol, n| match n.obj_type() {
            ObjType::Directory => Err(Error::IsDir {
                what: format!("inode {inum}"),
            }),
            _ => n.read(vol, offset, len),
        })
    }

    pub fn readlink(&mut self, label: &str, inum: u64) -> Result<Vec<u8>> {
        self.with_node(label, inum, |vol, n| {
            if n.obj_type() != ObjType::Softlink {
                return Err(Error::NotSymlink {
                    what: format!("inode {inum}"),
                });
            }
            // Bounded when the inode was read (`pfs::meta_damage`), and
            // by `symlink` for one made here.
            if n.size() > pfs::SYMLINK_MAX {
                return Err(Error::corrupt(
                    format!("symlink inode {inum} has a target of {} bytes", n.size()),
                    n.bref.data_off.offset(),
                ));
            }
            let size = n.size() as usize;
            n.read(vol, 0, size)
        })
    }

    pub fn write(
        &mut self,
        label: &str,
        inum: u64,
        offset: u64,
        buf: &[u8],
        now: u64,
    ) -> Result<()> {
        self.write_filled(label, inum, offset, buf, now, &mut Filled::default())
    }

    /// `write`, with the write's whole blocks already copied onto
    /// buffers (`Filled::of`, made without the mount's lock): it takes
    /// those it puts in place, and leaves them all when it fails.
    pub fn write_filled(
        &mut self,
        label: &str,
        inum: u64,
        offset: u64,
        buf: &[u8],
        now: u64,
        filled: &mut Filled,
    ) -> Result<()> {
        self.writable()?;
        if buf.is_empty() {
            return Ok(());
        }
        // Admit the 64 KiB blocks this write makes pending (at most).
        let new_blocks = self.with_node(label, inum, |vol, n| {
            n.before_write(vol, offset, buf.len() as u64)
        })?;
        let cost = self.admit_change(label, &[inum], 0, new_blocks, Tier::Normal)?;
        let defer = self.defers_reads();
        let r = self.with_node(label, inum, |vol, n| {
            if n.obj_type() != ObjType::Regfile {
                return Err(Error::InvalidArgument {
                    what: format!("write to a {}", n.obj_type().name()),
                });
            }
            write_node(vol, n, offset, buf, defer, filled, now)
        });
        self.unadmit(cost, r)
    }

    /// Whether a block written in part may skip reading its old bytes
    /// now (they merge in at the flush): not while a pipelined flush or
    /// a partial commit has taken file data already, whose commit would
    /// have to read under the lock. Changed only with the mount
    /// exclusive, so steady for a write made with it shared.
    pub(super) fn defers_reads(&self) -> bool {
        !self.flushing && self.partials == 0
    }

    pub fn setattr(&mut self, label: &str, inum: u64, a: SetAttr, now: u64) -> Result<InodeMeta> {
        self.writable()?;
        let (mut blocks, mut tier) = (0, Tier::Normal);
        if let Some(size) = a.size {
            // A truncate that leaves a partial last block makes it pending.
            let change = PendingChange::Truncate { size };
            let (new_blocks, old) = self.with_node(label, inum, |_, n| {
                Ok((n.new_pending_blocks(change), n.size()))
            })?;
            blocks = new_blocks;
            if size < old {
                tier = Tier::Delete;
            }
        }
        let cost = self.admit_change(label, &[inum], 0, blocks, tier)?;
        let r = self.with_node(label, inum, |vol, n| {
            if let Some(size) = a.size {
                // Only regular files have a size to set (DragonFly:
                // EINVAL for anything else; a directory is EISDIR as
                // Linux's truncate says).
                match n.obj_type() {
                    ObjType::Regfile => {}
                    ObjType::Directory => {
                        return Err(Error::IsDir {
                            what: format!("inode {inum}"),
                        })
                    }
                    t => {
                        return Err(Error::InvalidArgument {
                            what: format!("size of a {}", t.name()),
                        })
                    }
                }
                if size != n.size() {
                    n.truncate(vol, size)?;
                    n.data.meta.mtime = now;
                }
            }
            Ok(set_meta(n, &a, now))
        });
        let r = self.unadmit(cost, r);
        if r.is_ok() && a.atime.is_some() {
            // An access time a read left waiting (`touch_atime`) is older
            // than this one: the flush must not put it back.
            if let Some(p) = self.pfs.get_mut(label) {
                p.atimes.remove(&inum);
            }
        }
        r
    }

    fn check_new_name(&mut self, label: &str, dir: u64, name: &[u8]) -> Result<()> {
        check_name(name)?;
        if self.lookup(label, dir, name)?.is_some() {
            return Err(Error::Exists {
                what: String::from_utf8_lossy(name).into_owned(),
            });
        }
        Ok(())
    }

    fn add_entry(
        &mut self,
        label: &str,
        dir: u64,
        name: &[u8],
        inum: u64,
        t: ObjType,
        now: u64,
    ) -> Result<()> {
        self.with_node(label, dir, |vol, d| {
            insert_entry(vol, d, name, inum, t, now)
        })
    }

    /// Create a non-directory inode (regular file, fifo, socket, device,
    /// or a symlink with `target`) named `name` in `dir`.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &mut self,
        label: &str,
        dir: u64,
        name: &[u8],
        obj_type: ObjType,
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: (u32, u32),
        now: u64,
    ) -> Result<u64> {
        self.writable()?;
        if obj_type == ObjType::Directory {
            return self.mkdir(label, dir, name, mode, uid, gid, now);
        }
        let dmeta = self.getattr(label, dir)?;
        if dmeta.obj_type != ObjType::Directory {
            return Err(Error::NotDir {
                what: format!("inode {dir}"),
            });
        }
        self.check_new_name(label, dir, name)?;
        self.load_next_inum(label)?;
        self.admit_change(label, &[dir, NEW_INODE], 1, 0, Tier::Normal)?;
        crate::volume::allow_io();
        let inum = self.alloc_inum(label)?;
        let mut data = new_meta(obj_type, inum, &dmeta, mode, uid, gid, now);
        if matches!(obj_type, ObjType::Cdev | ObjType::Bdev) {
            data.meta.rmajor = rdev.0;
            data.meta.rminor = rdev.1;
        }
        let p = self.pfs_mut(label)?;
        p.inodes.insert(inum, InodeNode::new(data));
        p.depend.get_mut().tie(&[dir, inum]);
        self.add_entry(label, dir, name, inum, obj_type, now)?;
        Ok(inum)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn mkdir(
        &mut self,
        label: &str,
        dir: u64,
        name: &[u8],
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
        self.check_new_name(label, dir, name)?;
        self.load_next_inum(label)?;
        self.admit_change(label, &[dir, NEW_INODE], 1, 0, Tier::Normal)?;
        crate::volume::allow_io();
        let inum = self.alloc_inum(label)?;
        let data = new_meta(ObjType::Directory, inum, &dmeta, mode, uid, gid, now);
        let p = self.pfs_mut(label)?;
        p.inodes.insert(inum, InodeNode::new(data));
        p.depend.get_mut().tie(&[dir, inum]);
        self.add_entry(label, dir, name, inum, ObjType::Directory, now)?;
        Ok(inum)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn symlink(
        &mut self,
        label: &str,
        dir: u64,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
        now: u64,
    ) -> Result<u64> {
        if target.is_empty() || target.len() as u64 > pfs::SYMLINK_MAX {
            return Err(Error::InvalidArgument {
                what: format!("symlink target of {} bytes", target.len()),
            });
        }
        if target.len() > disk::EMBEDDED_BYTES {
            // The target leaves the inode for a data block.
            self.writable()?;
            self.admit(DATA_ADMIT_BYTES, Tier::Normal)?;
        }
        let inum = self.create(
            label,
            dir,
            name,
            ObjType::Softlink,
            0o777,
            uid,
            gid,
            (0, 0),
            now,
        )?;
        self.with_node(label, inum, |vol, n| {
            n.write(vol, 0, target, false, &mut Filled::default())
        })?;
        Ok(inum)
    }

    /// A new name `name` in `dir` for inode `inum`.
    pub fn link(&mut self, label: &str, inum: u64, dir: u64, name: &[u8], now: u64) -> Result<()> {
        self.writable()?;
        let m = self.getattr(label, inum)?;
        if m.obj_type == ObjType::Directory {
            return Err(Error::IsDir {
                what: format!("inode {inum}"),
            });
        }
        if self.getattr(label, dir)?.obj_type != ObjType::Directory {
            return Err(Error::NotDir {
                what: format!("inode {dir}"),
            });
        }
        self.check_new_name(label, dir, name)?;
        // The count comes from disk: refused before anything changes.
        if m.nlinks == u64::MAX {
            return Err(Error::corrupt(
                format!("inode {inum} has nlinks {}", m.nlinks),
                0,
            ));
        }
        self.admit_change(label, &[inum, dir], 1, 0, Tier::Normal)?;
        crate::volume::allow_io();
        self.add_entry(label, dir, name, inum, m.obj_type, now)?;
        self.with_node(label, inum, |_, n| {
            n.data.meta.nlinks += 1;
            n.data.meta.ctime = now;
            n.dirty = true;
            Ok(())
        })
    }

    /// Drop one link of `inum`; at zero the inode leaves the index at the
    /// next flush.
    fn drop_link(&mut self, label: &str, inum: u64, now: u64) -> Result<()> {
        let gone = self.with_node(label, inum, |_, n| {
            let m = &mut n.data.meta;
            m.nlinks = if m.obj_type == ObjType::Directory {
                0
            } else {
                m.nlinks.saturating_sub(1)
            };
            m.ctime = now;
            n.dirty = true;
            Ok(m.nlinks == 0)
        })?;
        if gone {
            let p = self.pfs_mut(label)?;
            if !p.pins.get_mut().contains_key(&inum) {
                p.forget_loaded(inum);
            }
        }
        Ok(())
    }

    /// Remove the entry at `key` (from `lookup_key`) of directory `dir`.
    fn remove_entry(&mut self, label: &str, dir: u64, key: u64, now: u64) -> Result<()> {
        self.with_node(label, dir, |vol, d| remove_entry_at(vol, d, key, now))
    }

    /// unlink(2): remove a non-directory entry.
    pub fn unlink(&mut self, label: &str, dir: u64, name: &[u8], now: u64) -> Result<()> {
        self.writable()?;
        let (key, inum) = self
            .lookup_key(label, dir, name)?
            .ok_or_else(|| Error::NotFound {
                what: String::from_utf8_lossy(name).into_owned(),
            })?;
        if self.getattr(label, inum)?.obj_type == ObjType::Directory {
            return Err(Error::IsDir {
                what: String::from_utf8_lossy(name).into_owned(),
            });
        }
        self.admit_change(label, &[dir, inum], 1, 0, Tier::Delete)?;
        crate::volume::allow_io();
        self.remove_entry(label, dir, key, now)?;
        self.drop_link(label, inum, now)
    }

    /// rmdir(2): remove an empty directory.
    pub fn rmdir(&mut self, label: &str, dir: u64, name: &[u8], now: u64) -> Result<()> {
        self.writable()?;
        let (key, inum) = self
            .lookup_key(label, dir, name)?
            .ok_or_else(|| Error::NotFound {
                what: String::from_utf8_lossy(name).into_owned(),
            })?;
        let empty = self.with_node(label, inum, |vol, n| {
            if n.obj_type() != ObjType::Directory {
                return Err(Error::NotDir {
                    what: String::from_utf8_lossy(name).into_owned(),
                });
            }
            n.dir_is_empty(vol)
        })?;
        if !empty {
            return Err(Error::NotEmpty {
                what: String::from_utf8_lossy(name).into_owned(),
            });
        }
        self.admit_change(label, &[dir, inum], 1, 0, Tier::Delete)?;
        crate::volume::allow_io();
        self.remove_entry(label, dir, key, now)?;
        self.drop_link(label, inum, now)
    }

    /// True when `anc` is `inum` or one of its ancestors (via iparent).
    fn is_ancestor(&mut self, label: &str, anc: u64, mut inum: u64) -> Result<bool> {
        for _ in 0..4096 {
            if inum == anc {
                return Ok(true);
            }
            if inum == ROOT_INUM {
                return Ok(false);
            }
            inum = self.getattr(label, inum)?.iparent;
        }
        Err(Error::corrupt(
            "directory parent chain does not reach the root".into(),
            0,
        ))
    }

    /// rename(2) with RENAME_NOREPLACE and RENAME_EXCHANGE.
    #[allow(clippy::too_many_arguments)]
    pub fn rename(
        &mut self,
        label: &str,
        odir: u64,
        oname: &[u8],
        ndir: u64,
        nname: &[u8],
        flags: RenameFlags,
        now: u64,
    ) -> Result<()> {
        self.writable()?;
        if nname.len() > pfs::NAME_MAX {
            return Err(Error::NameTooLong { len: nname.len() });
        }
        if nname.is_empty() || nname == b"." || nname == b".." || nname.contains(&b'/') {
            return Err(Error::InvalidArgument {
                what: "rename target name".into(),
            });
        }
        let (okey, src) = self
            .lookup_key(label, odir, oname)?
            .ok_or_else(|| Error::NotFound {
                what: String::from_utf8_lossy(oname).into_owned(),
            })?;
        let dst_entry = self.lookup_key(label, ndir, nname)?;
        let smeta = self.getattr(label, src)?;
        if smeta.obj_type == ObjType::Directory && self.is_ancestor(label, src, ndir)? {
            return Err(Error::InvalidArgument {
                what: "cannot move a directory into itself".into(),
            });
        }
        if flags.exchange && flags.noreplace {
            return Err(Error::InvalidArgument {
                what: "RENAME_EXCHANGE with RENAME_NOREPLACE".into(),
            });
        }
        if flags.exchange {
            let (nkey, dst) = dst_entry.ok_or_else(|| Error::NotFound {
                what: String::from_utf8_lossy(nname).into_owned(),
            })?;
            if dst == src {
                return Ok(());
            }
            let dmeta = self.getattr(label, dst)?;
            if dmeta.obj_type == ObjType::Directory && self.is_ancestor(label, dst, odir)? {
                return Err(Error::InvalidArgument {
                    what: "cannot move a directory into itself".into(),
                });
            }
            self.admit_change(label, &[odir, ndir, src, dst], 4, 0, Tier::Normal)?;
            crate::volume::allow_io();
            self.remove_entry(label, odir, okey, now)?;
            self.remove_entry(label, ndir, nkey, now)?;
            self.add_entry(label, odir, oname, dst, dmeta.obj_type, now)?;
            self.add_entry(label, ndir, nname, src, smeta.obj_type, now)?;
            self.reparent(label, src, ndir, now)?;
            self.reparent(label, dst, odir, now)?;
            return Ok(());
        }
        if let Some((nkey, dst)) = dst_entry {
            if dst == src {
                return Ok(());
            }
            if flags.noreplace {
                return Err(Error::Exists {
                    what: String::from_utf8_lossy(nname).into_owned(),
                });
            }
            let dmeta = self.getattr(label, dst)?;
            match (
                smeta.obj_type == ObjType::Directory,
                dmeta.obj_type == ObjType::Directory,
            ) {
                (true, false) => {
                    return Err(Error::NotDir {
                        what: String::from_utf8_lossy(nname).into_owned(),
                    })
                }
                (false, true) => {
                    return Err(Error::IsDir {
                        what: String::from_utf8_lossy(nname).into_owned(),
                    })
                }
                (true, true) => {
                    if !self.with_node(label, dst, |vol, n| n.dir_is_empty(vol))? {
                        return Err(Error::NotEmpty {
                            what: String::from_utf8_lossy(nname).into_owned(),
                        });
                    }
                }
                (false, false) => {}
            }
            self.admit_change(label, &[odir, ndir, src, dst], 3, 0, Tier::Normal)?;
            crate::volume::allow_io();
            self.remove_entry(label, ndir, nkey, now)?;
            self.drop_link(label, dst, now)?;
        } else {
            self.admit_change(label, &[odir, ndir, src], 2, 0, Tier::Normal)?;
            crate::volume::allow_io();
        }
        self.remove_entry(label, odir, okey, now)?;
        self.add_entry(label, ndir, nname, src, smeta.obj_type, now)?;
        self.reparent(label, src, ndir, now)
    }

    fn reparent(&mut self, label: &str, inum: u64, dir: u64, now: u64) -> Result<()> {
        self.with_node(label, inum, |_, n| {
            n.data.meta.iparent = dir;
            n.data.meta.ctime = now;
            n.dirty = true;
            Ok(())
        })
    }

    /// fallocate(2) without flags (and with FALLOC_FL_KEEP_SIZE when
    /// `keep_size`): reserve room for every 64 KiB block of
    /// `[offset, offset + len)` that has none yet, so writes there cannot
    /// fail for lack of space while this mount lives (see `reserve.rs`),
    /// and grow the file to the end of the range unless `keep_size`
    /// (the new range reads as zeros). NoSpace when the volume cannot
    /// hold it, changing nothing.
    pub fn fallocate(
        &mut self,
        label: &str,
        inum: u64,
        offset: u64,
        len: u64,
        keep_size: bool,
        now: u64,
    ) -> Result<()> {
        self.writable()?;
        let end = range_end("fallocate", offset, len)?;
        let (t, size, reserve, grow) = self.with_node(label, inum, |_, n| {
            let grow = if !keep_size && end > n.size() {
                n.new_pending_blocks(PendingChange::Truncate { size: end })
            } else {
                0
            };
            Ok((
                n.obj_type(),
                n.size(),
                n.new_reserved_blocks(offset, end),
                grow,
            ))
        })?;
        if t != ObjType::Regfile {
            return Err(Error::InvalidArgument {
                what: format!("fallocate on a {}", t.name()),
            });
        }
        let cost = self.admit_change(label, &[inum], 0, reserve + grow, Tier::Normal)?;
        let r = self.with_node(label, inum, |vol, n| {
            if !keep_size && end > size {
                n.truncate(vol, end)?;
                n.data.meta.mtime = now;
                n.data.meta.ctime = now;
            }
            n.reserve(offset, end);
            Ok(())
        });
        self.unadmit(cost, r)
    }

    /// FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: `[offset,
    /// offset + len)` reads as zeros and holds no data blocks (whole
    /// blocks at once, partly covered ones once the flush finds them all
    /// zeros). Takes space only for the partly covered blocks, and may
    /// use the share of the reserve that deletions may.
    pub fn punch_hole(
        &mut self,
        label: &str,
        inum: u64,
        offset: u64,
        len: u64,
        now: u64,
    ) -> Result<()> {
        self.writable()?;
        let (t, blocks) = self.with_node(label, inum, |_, n| {
            Ok((n.obj_type(), n.punch_pending_blocks(offset, len)))
        })?;
        if t != ObjType::Regfile {
            return Err(Error::InvalidArgument {
                what: format!("hole punch in a {}", t.name()),
            });
        }
        let cost = self.admit_change(label, &[inum], 0, blocks, Tier::Delete)?;
        let r = self.with_node(label, inum, |vol, n| {
            n.punch(vol, offset, len)?;
            n.data.meta.mtime = now;
            n.data.meta.ctime = now;
            Ok(())
        });
        self.unadmit(cost, r)
    }

    /// First data offset at or after `offset` (SEEK_DATA); `None` past
    /// the last data.
    pub fn seek_data(&mut self, label: &str, inum: u64, offset: u64) -> Result<Option<u64>> {
        self.with_node(label, inum, |vol, n| n.next_data(vol, offset))
    }

    /// First hole offset at or after `offset` (SEEK_HOLE): the file size
    /// when there is none before it. Blocks written since the last flush
    /// count as data, also when they hold zeros (the flush makes those
    /// holes).
    pub fn seek_hole(&mut self, label: &str, inum: u64, offset: u64) -> Result<u64> {
        self.with_node(label, inum, |vol, n| n.next_hole(vol, offset))
    }
}

/// Write `buf` at `offset` of regular file `n` (`InodeNode::write`) and
/// set its modification and change times to `now`.
pub(super) fn write_node(
    vol: &crate::volume::Volume,
    n: &mut InodeNode,
    offset: u64,
    buf: &[u8],
    defer: bool,
    filled: &mut Filled,
    now: u64,
) -> Result<()> {
    n.write(vol, offset, buf, defer, filled)?;
    n.data.meta.mtime = now;
    n.data.meta.ctime = now;
    Ok(())
}

/// Apply `a`'s mode, owner and times to inode `n` (its size is the
/// caller's), the change time `now` unless `a` sets one; the inode is
/// dirty then. Returns its meta.
pub(super) fn set_meta(n: &mut InodeNode, a: &SetAttr, now: u64) -> InodeMeta {
    let m = &mut n.data.meta;
    if let Some(mode) = a.mode {
        m.mode = mode & 0o7777;
    }
    if let Some(uid) = a.uid {
        m.uid = Uuid::from_unix_id(uid);
    }
    if let Some(gid) = a.gid {
        m.gid = Uuid::from_unix_id(gid);
    }
    if let Some(t) = a.atime {
        m.atime = t;
    }
    if let Some(t) = a.mtime {
        m.mtime = t;
    }
    m.ctime = a.ctime.unwrap_or(now);
    n.dirty = true;
    n.data.meta
}

/// NotDir unless node `d` (inode `dir`) is a directory.
pub(super) fn is_dir(dir: u64, d: &InodeNode) -> Result<()> {
    if d.obj_type() != ObjType::Directory {
        return Err(Error::NotDir {
            what: format!("inode {dir}"),
        });
    }
    Ok(())
}

/// Add entry `name` for inode `inum` of type `t` to directory `d`,
/// stamping its times.
pub(super) fn insert_entry(
    vol: &Volume,
    d: &mut InodeNode,
    name: &[u8],
    inum: u64,
    t: ObjType,
    now: u64,
) -> Result<()> {
    let head = DirentHead {
        inum,
        namlen: 0,
        obj_type: t.to_u8(),
    };
    let check = d.data.meta.check_algo;
    d.dir_insert(vol, name, head, check)?;
    d.data.meta.mtime = now;
    d.data.meta.ctime = now;
    Ok(())
}

/// Remove the entry at `key` of directory `d`, stamping its times.
pub(super) fn remove_entry_at(vol: &Volume, d: &mut InodeNode, key: u64, now: u64) -> Result<()> {
    d.dir_remove(vol, key)?;
    d.data.meta.mtime = now;
    d.data.meta.ctime = now;
    Ok(())
}

/// A name a new entry may take: not empty, ".", ".." or too long, and
/// without a slash or a NUL.
pub(super) fn check_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(Error::InvalidArgument {
            what: format!("name {:?}", String::from_utf8_lossy(name)),
        });
    }
    if name.len() > pfs::NAME_MAX {
        return Err(Error::NameTooLong { len: name.len() });
    }
    Ok(())
}

/// What a lookup of `name` in `dir` found: (key, inode number), checked.
pub(super) fn found(
    dir: u64,
    name: &[u8],
    entry: Option<(u64, DirentHead)>,
) -> Result<Option<(u64, u64)>> {
    match entry {
        Some((key, h)) => {
            check_named(dir, key, name, h.inum)?;
            Ok(Some((key, h.inum)))
        }
        None => Ok(None),
    }
}

/// A directory listing's entries, checked.
pub(super) fn entries(dir: u64, listed: Vec<crate::inode::Listed>) -> Result<Vec<DirEntry>> {
    listed
        .into_iter()
        .map(|(key, name, h)| {
            check_named(dir, key, &name, h.inum)?;
            Ok(DirEntry {
                name,
                inum: h.inum,
                obj_type: ObjType::from_u8(h.obj_type),
                key,
            })
        })
        .collect()
}

fn check_named(dir: u64, key: u64, name: &[u8], inum: u64) -> Result<()> {
    if inum == ROOT_INUM || inum == dir {
        return Err(Error::corrupt(
            format!(
                "entry {:?} (key {key:#x}) of directory inode {dir} names {}",
                String::from_utf8_lossy(name),
                if inum == ROOT_INUM {
                    "the PFS root"
                } else {
                    "its own directory"
                }
            ),
            0,
        ));
    }
    Ok(())
}
