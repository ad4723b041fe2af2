//! A volume opened read-write (DragonFly's `hammer2_dev`) and its PFSs
//! (`hammer2_pfs`), with the filesystem operations as a library API
//! (DragonFly's vnops): everything the FUSE daemon calls.
//!
//! Operations change inodes in memory (`InodeNode`) and mark them dirty;
//! `flush` writes them out (see `flush.rs`). Each operation is applied
//! whole under the caller's exclusive borrow, and a flush takes every
//! change made before it, so an operation that touches several inodes
//! (create, link, remove, rename) lands wholly in one flush. Time comes
//! from the caller (`now`, microseconds since the epoch), so tests are
//! deterministic.
//!
//! Pins (`pin`/`unpin`) keep an inode whose last link goes: an open
//! file that is unlinked lives, readable and writable by number, until
//! its last pin goes; only then does it leave the index.
//!
//! A failed device write or barrier poisons the mount: every later
//! modifying call fails with `Error::Poisoned` until the image is opened
//! again; what is on disk stays the state of the last completed flush.

use crate::alloc::SpaceMap;
use crate::dedup::DedupKey;
use crate::disk::{
    self, Blockref, BlockrefType, DirentHead, InodeData, InodeMeta, ObjType, Uuid,
    BREF_FLAG_PFSROOT, INODE_START, OPFLAG_DIRECTDATA, VOLUME_BYTES,
};
use crate::error::{Error, Result};
use crate::flush::{flush_inode, Writer};
use crate::inode::ReadPlan;
use crate::inode::{InodeNode, PendingChange};
use crate::pfs::{self, DirEntry};
use crate::readgate::{ReadGate, ReadTicket};
use crate::strategy::{
    data_bref, dedupable, encode_data_block, place_data, write_placed, CompHeuristic, Placed,
};
use crate::volume::Volume;
use bufcache::BlockDevice;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

mod linux;
pub use linux::ATIMES_MAX;

/// The PFS root's inode number.
pub const ROOT_INUM: u64 = 1;

/// Admission (see `Mount::admit`): what the flush may allocate for a
/// change, held against the space available before anything changes,
/// so a full volume fails the operation with ENOSPC and never the
/// flush. Counted generously (the flush shares indirect blocks between
/// changes); a writer refused with a flush waiting gets the room back
/// when it commits (the daemon flushes and retries once).
///
/// An inode the flush will rewrite, counted once between flushes: its
/// 1 KiB block and the leaf of the inode index that holds it.
const INODE_ADMIT_BYTES: u64 = 1024 + disk::IND_BYTES_NOM as u64;
/// A directory entry added or removed: the leaf of the directory's tree
/// it is in, and the 1 KiB block of a long name.
const DIRENT_ADMIT_BYTES: u64 = disk::IND_BYTES_NOM as u64 + 1024;
/// A file data block: itself and its share of the file's indirect
/// blocks (a 16 KiB indirect block holds 128 blockrefs).
const DATA_ADMIT_BYTES: u64 = disk::DATA_BLOCK_BYTES + disk::IND_BYTES_NOM as u64 / 128;
/// Stands for an inode an operation creates, in `admit_change`.
const NEW_INODE: u64 = 0;

/// Which share of the space an operation may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tier {
    /// Everything but the flush reserve.
    Normal,
    /// Operations that give space back (unlink, rmdir, truncating,
    /// punching holes) may also take half the reserve, so a full volume
    /// can still be emptied; the flush keeps the other half.
    Delete,
}

/// One PFS opened for writing.
pub(crate) struct PfsState {
    /// The key of its root inode in the super-root.
    key: u64,
    pub(crate) root: InodeNode,
    /// Inodes loaded or created, by number.
    pub(crate) inodes: BTreeMap<u64, InodeNode>,
    /// Inodes to remove from the index at the next flush.
    pub(crate) removed: BTreeSet<u64>,
    /// Pin counts (see `Mount::pin`): an inode whose last link goes
    /// while it is pinned stays until its last pin goes.
    pub(crate) pins: BTreeMap<u64, u32>,
    /// Blockrefs dropped from the trees of inodes that left memory
    /// before the flush (see `BlockTable::take_dropped`).
    dropped: Vec<Blockref>,
    /// Access times waiting for the next flush, by inode (see
    /// `mount/linux.rs`, `touch_atime`).
    pub(crate) atimes: BTreeMap<u64, u64>,
}

/// Attributes to change in `setattr`; `None` leaves a field alone.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<u64>,
    pub mtime: Option<u64>,
    pub ctime: Option<u64>,
}

/// rename(2) flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenameFlags {
    pub noreplace: bool,
    pub exchange: bool,
}

/// statfs figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatFs {
    pub bytes_total: u64,
    /// Bytes the tree stopped referencing that only bulkfree can give
    /// back (shared with snapshots or by dedup, or small pieces of
    /// 16 KiB blocks earlier mounts allocated), since the last bulkfree.
    pub bytes_possibly_free: u64,
    /// Free, the flush reserve included.
    pub bytes_free: u64,
    /// What ordinary writes may still take: whole free 64 KiB chunks
    /// less the flush reserve and what is admitted for the next flush.
    pub bytes_avail: u64,
    pub inodes_used: u64,
}

/// What one flush wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushStats {
    pub tid: u64,
    pub blocks: u64,
    pub bytes: u64,
    pub header_slot: usize,
    /// Bytes an earlier flush dropped that went back to free once this
    /// one's header was written.
    pub freed: u64,
}

impl PfsState {
    /// A PFS whose root is new (pfsops: snapshot, pfs_create).
    pub(crate) fn new(key: u64, root: InodeNode) -> PfsState {
        PfsState {
            key,
            root,
            inodes: BTreeMap::new(),
            removed: BTreeSet::new(),
            pins: BTreeMap::new(),
            dropped: Vec::new(),
            atimes: BTreeMap::new(),
        }
    }

    /// Take inode `inum` out of memory, keeping what its tree dropped.
    fn forget_inode(&mut self, inum: u64) {
        if let Some(mut n) = self.inodes.remove(&inum) {
            self.dropped.extend(n.table.take_dropped());
        }
    }
}

/// A HAMMER2 volume opened read-write.
pub struct Mount {
    pub(crate) vol: Volume,
    /// The allocator, shared with a pipelined flush's data writes.
    pub(crate) space: Arc<Mutex<Box<dyn SpaceMap>>>,
    /// A pipelined flush is between `flush_begin` and `flush_commit`.
    pub(crate) flushing: bool,
    /// Bytes admitted since the last flush (file data blocks and inode
    /// metadata), held against the allocator's available space so a
    /// full disk fails the operation, never the flush.
    admitted: u64,
    pub(crate) sroot: InodeNode,
    pub(crate) pfs: BTreeMap<String, PfsState>,
    poisoned: Option<String>,
    /// The tid of the header this mount opened: file data blocks with a
    /// later `modify_tid` were written by this mount, which knows every
    /// block its dedup shared (see `flush_inner`).
    session_tid: u64,
    /// Bytes of decoded metadata (inodes, the indirect blocks under
    /// them, the PFS roots' inode indexes) kept in memory across flushes
    /// before the clean part is dropped (`trim_metadata`).
    meta_limit: usize,
    /// Readers outside the lock (`read_plan`), which queued frees wait
    /// for (`readgate.rs`), and the tid of the commit at the gate's last
    /// advance: blocks dropped through it may be freed once the readers
    /// from before that advance are gone.
    gate: Arc<ReadGate>,
    gate_mark: u64,
}

/// `Mount::meta_limit` unless the caller sets one.
pub const META_LIMIT_DEFAULT: usize = 64 << 20;

/// The end of a non-empty file range `[offset, offset + len)` that ends
/// within the largest file offset; `op` names it in the error.
pub(crate) fn range_end(op: &str, offset: u64, len: u64) -> Result<u64> {
    offset
        .checked_add(len)
        .filter(|&e| e <= i64::MAX as u64 && len > 0)
        .ok_or_else(|| Error::InvalidArgument {
            what: format!("{op} of {len} bytes at {offset}"),
        })
}

fn new_meta(
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
    /// Open `dev` read-write with `space` as its allocator.
    /// Open `dev` read-write with its freemap as the allocator, after
    /// DragonFly's mount-time recovery (blocks newer than the freemap are
    /// marked allocated).
    pub fn open(dev: Arc<dyn BlockDevice>) -> Result<Mount> {
        let vol = Volume::open(dev.clone())?;
        let mut alloc = crate::alloc::Allocator::load(&vol)?;
        let rec = alloc.recover(&vol)?;
        log::info!("mount: freemap recovery: {rec:?}");
        Mount::open_with(dev, Box::new(alloc))
    }

    /// Open `dev` read-write with `space` as its allocator.
    pub fn open_with(dev: Arc<dyn BlockDevice>, space: Box<dyn SpaceMap>) -> Result<Mount> {
        let vol = Volume::open(dev)?;
        let s = pfs::super_root(&vol)?;
        let sroot = InodeNode::from_disk(s.bref, s.data);
        Ok(Mount::from_parts(vol, space, sroot))
    }

    /// A mount of `vol` at the header the caller chose, with `sroot` as
    /// its super-root (for fsck's repairs, which may start from an older
    /// header or a super-root read past its check code; `repair.rs`).
    pub(crate) fn from_parts(vol: Volume, space: Box<dyn SpaceMap>, sroot: InodeNode) -> Mount {
        let session_tid = vol.header.mirror_tid;
        Mount {
            session_tid,
            vol,
            space: Arc::new(Mutex::new(space)),
            flushing: false,
            admitted: 0,
            sroot,
            pfs: BTreeMap::new(),
            poisoned: None,
            meta_limit: META_LIMIT_DEFAULT,
            gate: Arc::new(ReadGate::default()),
            gate_mark: 0,
        }
    }

    /// Commit now, whether or not anything changed: a new volume header
    /// in the next slot (fsck's repairs write every slot this way).
    pub(crate) fn commit(&mut self) -> Result<FlushStats> {
        self.commit_now()
    }

    pub fn volume(&self) -> &Volume {
        &self.vol
    }

    pub(crate) fn writable(&self) -> Result<()> {
        match &self.poisoned {
            Some(why) => Err(Error::Poisoned { why: why.clone() }),
            None => Ok(()),
        }
    }

    /// Labels of every PFS and snapshot.
    pub fn pfs_labels(&self) -> Result<Vec<String>> {
        Ok(pfs::pfs_list(&self.vol)?
            .into_iter()
            .map(|p| p.label)
            .collect())
    }

    pub(crate) fn pfs_mut(&mut self, label: &str) -> Result<&mut PfsState> {
        if !self.pfs.contains_key(label) {
            let mut found = None;
            let vol = &self.vol;
            for br in self.sroot.table.range(vol, 0, u64::MAX)? {
                if br.btype != BlockrefType::Inode {
                    return Err(Error::corrupt(
                        format!(
                            "{} blockref key {:#x} in the super-root",
                            br.btype.name(),
                            br.key
                        ),
                        br.data_off.offset(),
                    ));
                }
                let ino = pfs::read_inode(vol, &br)?;
                if ino.data.name() == label.as_bytes() {
                    found = Some((br, ino));
                    break;
                }
            }
            let (br, ino) = found.ok_or_else(|| Error::NotFound {
                what: format!("PFS {label}"),
            })?;
            let root = InodeNode::from_disk(br, ino.data);
            self.pfs.insert(
                label.to_string(),
                PfsState {
                    key: br.key,
                    root,
                    inodes: BTreeMap::new(),
                    removed: BTreeSet::new(),
                    pins: BTreeMap::new(),
                    dropped: Vec::new(),
                    atimes: BTreeMap::new(),
                },
            );
        }
        self.pfs.get_mut(label).ok_or_else(|| Error::NotFound {
            what: format!("PFS {label}"),
        })
    }

    /// The inode `inum` of PFS `label`, loaded into memory.
    fn node(&mut self, label: &str, inum: u64) -> Result<&mut InodeNode> {
        self.pfs_mut(label)?;
        let Mount { vol, pfs, .. } = self;
        let p = pfs.get_mut(label).ok_or_else(|| Error::NotFound {
            what: format!("PFS {label}"),
        })?;
        if inum == ROOT_INUM {
            return Ok(&mut p.root);
        }
        if p.removed.contains(&inum) {
            return Err(Error::NotFound {
                what: format!("inode {inum}"),
            });
        }
        if !p.inodes.contains_key(&inum) {
            let br = p
                .root
                .table
                .lookup(&*vol, inum)?
                .ok_or_else(|| Error::NotFound {
                    what: format!("inode {inum}"),
                })?;
            if br.btype != BlockrefType::Inode {
                return Err(Error::corrupt(
                    format!("{} blockref at inode index key {inum}", br.btype.name()),
                    br.data_off.offset(),
                ));
            }
            let ino = pfs::read_inode(vol, &br)?;
            if ino.inum() != inum {
                return Err(Error::corrupt(
                    format!("inode index key {inum} holds inode {}", ino.inum()),
                    br.data_off.offset(),
                ));
            }
            let mut n = InodeNode::from_disk(br, ino.data);
            if let Some(&t) = p.atimes.get(&inum) {
                n.data.meta.atime = t;
            }
            p.inodes.insert(inum, n);
        }
        p.inodes.get_mut(&inum).ok_or_else(|| Error::NotFound {
            what: format!("inode {inum}"),
        })
    }

    /// Borrow the volume and one inode at once.
    pub(crate) fn with_node<T>(
        &mut self,
        label: &str,
        inum: u64,
        f: impl FnOnce(&Volume, &mut InodeNode) -> Result<T>,
    ) -> Result<T> {
        self.node(label, inum)?;
        let Mount { vol, pfs, .. } = self;
        let p = pfs.get_mut(label).ok_or_else(|| Error::NotFound {
            what: format!("PFS {label}"),
        })?;
        let node = if inum == ROOT_INUM {
            &mut p.root
        } else {
            p.inodes.get_mut(&inum).ok_or_else(|| Error::NotFound {
                what: format!("inode {inum}"),
            })?
        };
        f(vol, node)
    }

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
            if d.obj_type() != ObjType::Directory {
                return Err(Error::NotDir {
                    what: format!("inode {dir}"),
                });
            }
            match d.dir_lookup(vol, name)? {
                Some((key, h)) => {
                    check_named(dir, key, name, h.inum)?;
                    Ok(Some((key, h.inum)))
                }
                None => Ok(None),
            }
        })
    }

    /// Entries of `dir` with key at least `from` (0 for all), in key
    /// order; keys are stable readdir cookies.
    pub fn readdir(&mut self, label: &str, dir: u64, from: u64) -> Result<Vec<DirEntry>> {
        self.with_node(label, dir, |vol, d| {
            if d.obj_type() != ObjType::Directory {
                return Err(Error::NotDir {
                    what: format!("inode {dir}"),
                });
            }
            d.dir_list(vol, from)?
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
        self.writable()?;
        if buf.is_empty() {
            return Ok(());
        }
        // Admit the 64 KiB blocks this write makes pending (at most).
        let change = PendingChange::Write {
            offset,
            len: buf.len() as u64,
        };
        // Load the tree over the blocks the flush will insert, so that
        // the flush reads nothing under the mount's lock.
        let end = offset.saturating_add(buf.len() as u64 - 1);
        let new_blocks = self.with_node(label, inum, |vol, n| {
            n.load_range(vol, offset, end)?;
            Ok(n.new_pending_blocks(change))
        })?;
        let cost = self.admit_change(label, &[inum], 0, new_blocks, Tier::Normal)?;
        let r = self.with_node(label, inum, |vol, n| {
            if n.obj_type() != ObjType::Regfile {
                return Err(Error::InvalidArgument {
                    what: format!("write to a {}", n.obj_type().name()),
                });
            }
            n.write(vol, offset, buf)?;
            n.data.meta.mtime = now;
            n.data.meta.ctime = now;
            Ok(())
        });
        self.unadmit(cost, r)
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
            Ok(n.data.meta)
        });
        self.unadmit(cost, r)
    }

    /// Whether inode `inum` already waits for the flush (its rewrite is
    /// admitted).
    fn inode_dirty(&self, label: &str, inum: u64) -> bool {
        self.pfs.get(label).is_some_and(|p| {
            if inum == ROOT_INUM {
                p.root.dirty
            } else {
                p.inodes.get(&inum).is_some_and(|n| n.dirty)
            }
        })
    }

    /// Admit a change before making it: the inodes it will rewrite (each
    /// counted unless already dirty; `NEW_INODE` for one it creates), the
    /// directory entries it adds or removes, and the file data blocks it
    /// makes pending. Fails with NoSpace, changing nothing.
    fn admit_change(
        &mut self,
        label: &str,
        inodes: &[u64],
        dirents: u64,
        blocks: u64,
        tier: Tier,
    ) -> Result<u64> {
        let mut counted: Vec<u64> = Vec::with_capacity(inodes.len());
        let mut n = 0u64;
        for &inum in inodes {
            if inum == NEW_INODE {
                n += 1;
            } else if !counted.contains(&inum) {
                counted.push(inum);
                n += u64::from(!self.inode_dirty(label, inum));
            }
        }
        let bytes = n * INODE_ADMIT_BYTES
            + dirents * DIRENT_ADMIT_BYTES
            + blocks.saturating_mul(DATA_ADMIT_BYTES);
        self.admit(bytes, tier)?;
        Ok(bytes)
    }

    /// Give back what `admit_change` admitted for a change that failed
    /// before it changed anything (a read error, or a block not cached:
    /// `volume::CacheOnly`), so retries do not count it again.
    fn unadmit<T>(&mut self, bytes: u64, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.admitted = self.admitted.saturating_sub(bytes);
        }
        r
    }

    /// Admit the rewrite of inode `inum` alone (a change to its meta).
    pub(crate) fn admit_inode_change(&mut self, label: &str, inum: u64) -> Result<()> {
        self.admit_change(label, &[inum], 0, 0, Tier::Normal)
            .map(|_| ())
    }

    /// Admit `bytes` more for the next flush, or fail with NoSpace.
    fn admit(&mut self, bytes: u64, tier: Tier) -> Result<()> {
        let (mut available, reserve) = {
            let space = lock_space(&self.space);
            (space.available_bytes(), space.reserve_bytes())
        };
        if tier == Tier::Delete {
            available += reserve / 2;
        }
        if self.admitted.saturating_add(bytes) > available {
            return Err(Error::NoSpace {
                bytes,
                free: available.saturating_sub(self.admitted),
            });
        }
        self.admitted += bytes;
        Ok(())
    }

    /// What stays admitted once a flush has committed: data written
    /// since it took its batch, and fallocate's reservations.
    fn held_after_commit(&self) -> u64 {
        self.pfs
            .values()
            .flat_map(|p| p.inodes.values())
            .map(|n| {
                (n.dirty_bytes() / disk::DATA_BLOCK_BYTES
                    + n.reserved_bytes() / disk::DATA_BLOCK_BYTES)
                    * DATA_ADMIT_BYTES
                    + if n.dirty { INODE_ADMIT_BYTES } else { 0 }
            })
            .sum()
    }

    /// The next inode number of PFS `label`, from its root's allocator.
    /// The counter comes from disk: one past the inode number space
    /// (keys from 2^63 are directory entries in the PFS root) or behind
    /// an inode in use (the new one would replace it) is damage.
    /// Load the inode index over the number `alloc_inum` will hand out
    /// next, so that the flush inserting the new inode reads nothing
    /// under the mount's lock (and a create reads before it changes).
    fn load_next_inum(&mut self, label: &str) -> Result<()> {
        self.pfs_mut(label)?;
        let Mount { vol, pfs, .. } = self;
        let Some(p) = pfs.get_mut(label) else {
            return Ok(());
        };
        let next = p
            .root
            .data
            .meta
            .pfs_inum
            .max(INODE_START - 1)
            .saturating_add(1);
        p.root.table.lookup(&*vol, next)?;
        Ok(())
    }

    fn alloc_inum(&mut self, label: &str) -> Result<u64> {
        let root = self.node(label, ROOT_INUM)?;
        let at = root.bref.data_off.offset();
        let last = root.data.meta.pfs_inum.max(INODE_START - 1);
        let inum = last
            .checked_add(1)
            .filter(|&i| !crate::dirhash::is_dirent_key(i))
            .ok_or_else(|| {
                Error::corrupt(
                    format!(
                        "PFS {label}: inode allocator pfs_inum {last:#x} is past the inode numbers"
                    ),
                    at,
                )
            })?;
        let Mount { vol, pfs, .. } = self;
        let p = pfs.get_mut(label).ok_or_else(|| Error::NotFound {
            what: format!("PFS {label}"),
        })?;
        if p.inodes.contains_key(&inum) || p.root.table.lookup(&*vol, inum)?.is_some() {
            return Err(Error::corrupt(
                format!("PFS {label}: inode allocator pfs_inum {last} is behind inode {inum}, which is in use"),
                at,
            ));
        }
        p.root.data.meta.pfs_inum = inum;
        Ok(inum)
    }

    /// The transaction id of the next flush. It comes from disk: a
    /// header at the largest tid is damage.
    pub(crate) fn next_tid(&self) -> Result<u64> {
        let vh = &self.vol.header;
        vh.mirror_tid.checked_add(1).ok_or_else(|| {
            Error::corrupt(
                format!(
                    "volume header mirror_tid {:#x} is at its maximum",
                    vh.mirror_tid
                ),
                disk::volhdr_offset(self.vol.header_index),
            )
        })
    }

    fn check_new_name(&mut self, label: &str, dir: u64, name: &[u8]) -> Result<()> {
        if name.is_empty()
            || name == b"."
            || name == b".."
            || name.contains(&b'/')
            || name.contains(&0)
        {
            return Err(Error::InvalidArgument {
                what: format!("name {:?}", String::from_utf8_lossy(name)),
            });
        }
        if name.len() > pfs::NAME_MAX {
            return Err(Error::NameTooLong { len: name.len() });
        }
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
            let check = d.data.meta.check_algo;
            d.dir_insert(
                vol,
                name,
                DirentHead {
                    inum,
                    namlen: 0,
                    obj_type: t.to_u8(),
                },
                check,
            )?;
            d.data.meta.mtime = now;
            d.data.meta.ctime = now;
            Ok(())
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
        self.pfs_mut(label)?
            .inodes
            .insert(inum, InodeNode::new(data));
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
        self.with_node(label, inum, |vol, n| n.write(vol, 0, target))?;
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
            if !p.pins.contains_key(&inum) {
                p.forget_inode(inum);
                p.removed.insert(inum);
            }
        }
        Ok(())
    }

    /// Pin inode `inum` (counted): while pinned, losing its last link
    /// does not remove it. It stays readable and writable by number,
    /// and flushes go on writing it to the inode index (with no links,
    /// as DragonFly keeps a file open and unlinked: after a crash it is
    /// an orphan, which fsck lists as a warning). The FUSE daemon pins
    /// an inode for each open file handle.
    pub fn pin(&mut self, label: &str, inum: u64) -> Result<()> {
        self.node(label, inum)?;
        *self.pfs_mut(label)?.pins.entry(inum).or_insert(0) += 1;
        Ok(())
    }

    /// Drop one pin of `inum`. At the last one, an inode with no links
    /// left leaves memory at once and the index at the next flush.
    pub fn unpin(&mut self, label: &str, inum: u64) -> Result<()> {
        let p = self.pfs_mut(label)?;
        match p.pins.get_mut(&inum) {
            None => return Ok(()),
            Some(n) if *n > 1 => {
                *n -= 1;
                return Ok(());
            }
            Some(_) => {
                p.pins.remove(&inum);
            }
        }
        if inum == ROOT_INUM {
            return Ok(());
        }
        let nlinks = match self.node(label, inum) {
            Ok(n) => n.data.meta.nlinks,
            Err(Error::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        if nlinks == 0 {
            let p = self.pfs_mut(label)?;
            p.forget_inode(inum);
            p.removed.insert(inum);
        }
        Ok(())
    }

    /// Pins held on `inum` (for tests and the daemon's bookkeeping).
    pub fn pin_count(&self, label: &str, inum: u64) -> u32 {
        self.pfs
            .get(label)
            .and_then(|p| p.pins.get(&inum).copied())
            .unwrap_or(0)
    }

    /// Remove the entry at `key` (from `lookup_key`) of directory `dir`.
    fn remove_entry(&mut self, label: &str, dir: u64, key: u64, now: u64) -> Result<()> {
        self.with_node(label, dir, |vol, d| {
            d.dir_remove(vol, key)?;
            d.data.meta.mtime = now;
            d.data.meta.ctime = now;
            Ok(())
        })
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

    pub fn statfs(&mut self, label: &str) -> Result<StatFs> {
        let used = self.pfs_mut(label)?.root.bref.inode_count();
        let vh = &self.vol.header;
        let space = lock_space(&self.space);
        Ok(StatFs {
            bytes_total: vh.allocator_size,
            bytes_possibly_free: space.possibly_free_bytes(),
            bytes_free: space.free_bytes(),
            bytes_avail: space.available_bytes().saturating_sub(self.admitted),
            inodes_used: used,
        })
    }

    /// True when anything waits for a flush (the freemap too: recovery
    /// and bulkfree change it without touching the topology).
    pub fn is_dirty(&self) -> bool {
        self.sroot.dirty
            || self.pfs.values().any(|p| {
                p.root.dirty || !p.removed.is_empty() || p.inodes.values().any(|n| n.dirty)
            })
            || lock_space(&self.space).is_dirty()
    }

    /// Bytes of file data written and waiting for a flush (whole 64 KiB
    /// blocks), for writeback limits.
    pub fn dirty_bytes(&self) -> u64 {
        self.pfs
            .values()
            .map(|p| {
                p.root.dirty_bytes() + p.inodes.values().map(InodeNode::dirty_bytes).sum::<u64>()
            })
            .sum()
    }

    /// Bytes of memory held by file data waiting for a flush (a block
    /// holds what was written of it, up to 64 KiB), for writeback
    /// limits.
    pub fn pending_bytes(&self) -> u64 {
        self.pfs
            .values()
            .map(|p| {
                p.root.pending_bytes()
                    + p.inodes.values().map(InodeNode::pending_bytes).sum::<u64>()
            })
            .sum()
    }

    /// Drop clean metadata from memory (it is read again when next
    /// needed): clean inodes, and the clean indirect blocks of the
    /// inodes kept and of the PFS roots' and super-root's indexes.
    pub fn release_clean(&mut self) {
        for p in self.pfs.values_mut() {
            p.inodes
                .retain(|_, n| n.dirty || !n.pending.is_empty() || n.reserved_bytes() > 0);
            for n in p.inodes.values_mut() {
                n.table.release_clean();
            }
            p.root.table.release_clean();
        }
        self.sroot.table.release_clean();
    }

    /// Bytes of decoded metadata in memory (an estimate: inode data and
    /// the blockrefs of every loaded table).
    pub fn metadata_bytes(&self) -> usize {
        let node = |n: &InodeNode| std::mem::size_of::<InodeNode>() + n.table.loaded_bytes();
        node(&self.sroot)
            + self
                .pfs
                .values()
                .map(|p| node(&p.root) + p.inodes.values().map(node).sum::<usize>())
                .sum::<usize>()
    }

    /// The budget of `metadata_bytes` past which `trim_metadata` drops
    /// what is clean (a mount gives it a share of its cache's budget).
    pub fn set_metadata_limit(&mut self, bytes: usize) {
        self.meta_limit = bytes;
    }

    /// Keep decoded metadata across flushes while it fits the budget;
    /// past it, drop what is clean. Every flush calls it, and an idle
    /// mount's flusher.
    pub fn trim_metadata(&mut self) {
        if self.metadata_bytes() > self.meta_limit {
            self.release_clean();
        }
    }

    /// fsync(2) of a file or directory: everything modified is flushed
    /// (the flush is volume-wide, so the inode and every inode it depends
    /// on land together).
    pub fn fsync(&mut self, label: &str, inum: u64) -> Result<FlushStats> {
        self.getattr(label, inum)?;
        self.flush()
    }

    /// Write everything modified and commit it with a new volume header.
    pub fn flush(&mut self) -> Result<FlushStats> {
        let mut batch = self.flush_begin()?;
        batch.write();
        self.flush_commit(batch)
    }

    /// Start a pipelined flush: take the file data written so far into a
    /// batch whose blocks `FlushBatch::write` compresses and writes
    /// without this `Mount` (so the frontend can go on), then
    /// `flush_commit` writes what changed meanwhile and all metadata, and
    /// commits. The flush commits the state at `flush_commit`: a block
    /// the frontend rewrote after `flush_begin` is written again there
    /// and the batch's copy is given back to the allocator.
    pub fn flush_begin(&mut self) -> Result<FlushBatch> {
        self.writable()?;
        if self.flushing {
            return Err(Error::InvalidArgument {
                what: "a flush is already in progress".into(),
            });
        }
        let tid = self.next_tid()?;
        self.flushing = true;
        let mut blocks = Vec::new();
        let mut heuristics = HashMap::new();
        for (label, p) in &self.pfs {
            for (inum, n) in p.inodes.iter().filter(|(_, n)| !n.pending.is_empty()) {
                heuristics.insert((label.clone(), *inum), n.comp_heuristic);
                let size = n.size();
                for (lbase, blk) in n.pending.range(..size) {
                    blocks.push(BatchBlock {
                        label: label.clone(),
                        inum: *inum,
                        lbase: *lbase,
                        blk: blk.clone(),
                        size,
                        comp_algo: n.data.meta.comp_algo,
                        check_algo: n.data.meta.check_algo,
                        written: None,
                        shared_durable: false,
                    });
                }
            }
        }
        Ok(FlushBatch {
            tid,
            dev: self.vol.device().clone(),
            space: self.space.clone(),
            blocks,
            heuristics,
            error: None,
        })
    }

    /// Finish a flush started with `flush_begin`.
    pub fn flush_commit(&mut self, batch: FlushBatch) -> Result<FlushStats> {
        let prepared = self.flush_commit_prepare(batch)?;
        let io = prepared.run();
        self.flush_commit_finish(prepared, io)
    }

    /// The first part of `flush_commit`: everything but waiting for the
    /// device. The tree and the freemap are written (into the device's
    /// cache, for a mount), the volume header is ready. The caller may
    /// unlock the mount, `Prepared::run` the device part (barrier, header,
    /// barrier), and lock it again for `flush_commit_finish`; operations
    /// meanwhile change the tree in memory for the next flush, which
    /// cannot begin before this one finishes.
    pub fn flush_commit_prepare(&mut self, batch: FlushBatch) -> Result<Prepared> {
        let result = self.flush_commit_inner(batch);
        if let Err(e) = &result {
            self.flushing = false;
            self.note_flush_error(e);
        }
        result
    }

    /// Finish a flush after `Prepared::run`: adopt its header and free
    /// what waited for it, or poison the mount if the device failed.
    pub fn flush_commit_finish(
        &mut self,
        prepared: Prepared,
        io: Result<()>,
    ) -> Result<FlushStats> {
        self.flushing = false;
        let result = match prepared {
            Prepared::Nothing(stats) => io.map(|()| stats),
            Prepared::Commit(c) => io.and_then(|()| self.adopt_header(*c)),
        };
        match &result {
            Ok(_) => {
                self.admitted = self.held_after_commit();
                self.trim_metadata();
            }
            Err(e) => self.note_flush_error(e),
        }
        result
    }

    /// A failed flush: a device error poisons the mount.
    fn note_flush_error(&mut self, e: &Error) {
        if matches!(e, Error::Io { .. }) && self.poisoned.is_none() {
            log::error!("flush failed, refusing further writes: {e}");
            self.poisoned = Some(e.to_string());
        }
    }

    fn flush_commit_inner(&mut self, batch: FlushBatch) -> Result<Prepared> {
        self.writable()?;
        if let Some(e) = batch.error {
            return Err(e);
        }
        for ((label, inum), h) in batch.heuristics {
            if let Some(n) = self
                .pfs
                .get_mut(&label)
                .and_then(|p| p.inodes.get_mut(&inum))
            {
                n.comp_heuristic = h;
            }
        }
        let (mut blocks, mut bytes) = (0, 0);
        for b in batch.blocks {
            let Some(leaf) = b.written else { continue };
            let vol = &self.vol;
            let node = self
                .pfs
                .get_mut(&b.label)
                .and_then(|p| p.inodes.get_mut(&b.inum));
            let current = node.filter(|n| {
                b.lbase < n.size()
                    && n.pending
                        .get(&b.lbase)
                        .is_some_and(|p| Arc::ptr_eq(p, &b.blk))
            });
            match current {
                Some(n) => {
                    n.pending.remove(&b.lbase);
                    match leaf {
                        Some(br) => {
                            blocks += 1;
                            bytes += br.data_off.bytes();
                            n.table
                                .insert(vol, crate::blocktable::TreeKind::File, true, br)?;
                        }
                        None => {
                            n.table.delete(vol, b.lbase)?;
                        }
                    }
                }
                None => {
                    // Rewritten, truncated or removed meanwhile.
                    if let Some(br) = leaf.filter(|_| !b.shared_durable) {
                        lock_space(&self.space).release_unflushed(br.data_off);
                    }
                }
            }
        }
        if !self.is_dirty() {
            return Ok(Prepared::Nothing(FlushStats {
                tid: self.vol.header.mirror_tid,
                blocks,
                bytes,
                header_slot: self.vol.header_index,
                freed: 0,
            }));
        }
        let mut c = self.flush_prepare()?;
        c.stats.blocks += blocks;
        c.stats.bytes += bytes;
        Ok(Prepared::Commit(Box::new(c)))
    }

    /// A whole flush with the mount held throughout.
    fn flush_inner(&mut self) -> Result<FlushStats> {
        let c = self.flush_prepare()?;
        c.run()?;
        self.adopt_header(c)
    }

    /// Write the tree and the freemap (`flush.rs` order) and make the
    /// volume header of the commit, not yet written. The access times
    /// waiting in memory go with it (`flush_atimes`).
    fn flush_prepare(&mut self) -> Result<CommitIo> {
        if let Err(e) = self.flush_atimes() {
            // An access time is not worth failing the flush for.
            log::warn!("access times left for a later flush: {e}");
        }
        let tid = self.next_tid()?;
        // A block this flush drops is referenced by the headers before
        // it; the header slots rotate, so the last of those is gone once
        // the header of tid + slots - 1 is written (see alloc.rs,
        // "Freeing at flush time").
        let nslots = disk::volhdr_count(self.vol.header.volu_size) as u64;
        let free_at = tid + nslots.max(1) - 1;
        let session_tid = self.session_tid;
        let space_arc = self.space.clone();
        let mut space = lock_space(&space_arc);
        let Mount {
            vol, sroot, pfs, ..
        } = self;
        let mut w = Writer {
            vol,
            space: space.as_mut(),
            tid,
            blocks: 0,
            bytes: 0,
        };
        let mut seen = HashSet::new();
        // Removed inodes whose trees the device phase walks (`CommitIo`).
        let mut removed_trees = Vec::new();
        for p in pfs.values_mut() {
            let mut drops = std::mem::take(&mut p.dropped);
            let removed = std::mem::take(&mut p.removed);
            let lsnap = p.root.data.meta.pfs_lsnap_tid;
            for inum in removed {
                if let Some(ibr) = p.root.table.delete(w.vol, inum)? {
                    removed_trees.push((ibr, lsnap));
                }
                p.root.dirty = true;
            }
            for (inum, node) in p.inodes.iter_mut().filter(|(_, n)| n.dirty) {
                let br = flush_inode(&mut w, node, *inum, 0)?;
                p.root
                    .table
                    .insert(w.vol, crate::blocktable::TreeKind::Directory, true, br)?;
                p.root.dirty = true;
            }
            for node in p.inodes.values_mut() {
                drops.extend(node.table.take_dropped());
            }
            if p.root.dirty {
                let br = flush_inode(&mut w, &mut p.root, p.key, BREF_FLAG_PFSROOT)?;
                sroot
                    .table
                    .insert(w.vol, crate::blocktable::TreeKind::Directory, true, br)?;
                sroot.dirty = true;
            }
            drops.extend(p.root.table.take_dropped());
            let lsnap = p.root.data.meta.pfs_lsnap_tid;
            queue_drops(w.space, drops, Some(lsnap), session_tid, free_at, &mut seen);
        }
        // A flush that changed only the freemap (bulkfree, recovery)
        // leaves the super-root where it is.
        let sroot_br = if sroot.dirty {
            let old = sroot.bref;
            let br = flush_inode(&mut w, sroot, 0, 0)?;
            let mut drops = sroot.table.take_dropped();
            drops.push(old);
            // Nothing but the volume header points into the super-root's
            // tree (PFS roots are copied, never shared): no snapshot rule.
            queue_drops(w.space, drops, None, session_tid, free_at, &mut seen);
            br
        } else {
            sroot.bref
        };
        let (blocks, bytes) = (w.blocks, w.bytes);
        let dev = vol.device().clone();
        let freemap_blockset = space.flush(dev.as_ref(), tid)?;
        let mut vh = vol.header.clone();
        vh.mirror_tid = tid;
        vh.freemap_tid = tid;
        vh.sroot_blockset[0] = sroot_br;
        vh.freemap_blockset = freemap_blockset;
        vh.allocator_free = space.allocator_free();
        let nslots = disk::volhdr_count(vh.volu_size);
        let slot = (vol.header_index + 1) % nslots;
        let raw = vh.encode();
        debug_assert_eq!(raw.len(), VOLUME_BYTES);
        Ok(CommitIo {
            dev,
            raw,
            reader: vol.reader(),
            space: space_arc.clone(),
            removed_trees,
            seen: Mutex::new(seen),
            session_tid,
            free_at,
            at: disk::volhdr_offset(slot),
            stats: FlushStats {
                tid,
                blocks,
                bytes,
                header_slot: slot,
                freed: 0,
            },
        })
    }

    /// A commit's header is on the media: it is the volume's now, and
    /// the blocks that waited for it are freed.
    fn adopt_header(&mut self, c: CommitIo) -> Result<FlushStats> {
        let CommitIo { raw, at, stats, .. } = c;
        self.vol.header = disk::VolumeHeader::decode(&raw, at)?;
        self.vol.header_index = stats.header_slot;
        let freed = match self.frees_allowed_through(stats.tid) {
            Some(tid) => lock_space(&self.space).committed(tid),
            None => 0,
        };
        log::info!(
            "flush {:#x}: {} blocks, {} bytes, volume header {}, {freed} bytes freed",
            stats.tid,
            stats.blocks,
            stats.bytes,
            stats.header_slot
        );
        Ok(FlushStats { freed, ..stats })
    }

    /// At the commit of `tid`: the tid through which queued frees may
    /// go now. With no reader outside the lock, all of them; else those
    /// dropped through the commit at the gate's last advance, once the
    /// readers from before it are gone (the gate advances now if they
    /// are); `None` while they read.
    fn frees_allowed_through(&mut self, tid: u64) -> Option<u64> {
        if self.gate.idle() {
            self.gate.try_advance();
            self.gate_mark = tid;
            return Some(tid);
        }
        if self.gate.try_advance() {
            Some(std::mem::replace(&mut self.gate_mark, tid))
        } else {
            None
        }
    }

    /// The plan of a read of `len` bytes at `offset` of file `inum` and
    /// the ticket that keeps its blocks from being freed: run the plan
    /// (`ReadPlan::run`, through `volume().reader()`) without the
    /// mount's lock, then drop the ticket.
    pub fn read_plan(
        &mut self,
        label: &str,
        inum: u64,
        offset: u64,
        len: usize,
    ) -> Result<(ReadPlan, ReadTicket)> {
        let plan = self.with_node(label, inum, |vol, n| match n.obj_type() {
            ObjType::Directory => Err(Error::IsDir {
                what: format!("inode {inum}"),
            }),
            _ => n.read_plan(vol, offset, len),
        })?;
        Ok((plan, self.gate.ticket()))
    }

    /// Whether every reader outside the lock that started in gate epoch
    /// `e` or before is done (advancing the gate if it can).
    pub fn readers_done_since(&mut self, e: u64) -> bool {
        self.gate.passed(e)
    }

    /// The gate's epoch now (for `readers_done_since`).
    pub fn read_epoch(&self) -> u64 {
        self.gate.epoch()
    }

    /// Commit until no freed block waits for a header (each commit
    /// writes the freemap, if changed, and a header), so space dropped
    /// by earlier flushes is free now; for a writer about to fail with
    /// ENOSPC and for unmount. Returns the bytes given back.
    pub fn reclaim(&mut self) -> Result<u64> {
        self.writable()?;
        if self.flushing {
            return Err(Error::InvalidArgument {
                what: "a flush is in progress".into(),
            });
        }
        let mut freed = 0;
        // At most one commit per header slot releases the whole queue
        // (and one more while readers outside the lock hold the gate).
        for _ in 0..=disk::volhdr_count(self.vol.header.volu_size) + 1 {
            if lock_space(&self.space).pending_frees() == 0 {
                break;
            }
            freed += self.commit_now()?.freed;
        }
        if self.is_dirty() {
            // What the last commit freed (or anything else changed) goes
            // on the media too: the mount is clean after this.
            freed += self.commit_now()?.freed;
        }
        Ok(freed)
    }

    /// One whole flush, not pipelined, with `flush_commit`'s
    /// bookkeeping (admission reset, poisoning on a device error).
    fn commit_now(&mut self) -> Result<FlushStats> {
        let r = self.flush_inner();
        match &r {
            Ok(_) => {
                self.admitted = self.held_after_commit();
                self.trim_metadata();
            }
            Err(e @ Error::Io { .. }) => {
                log::error!("flush failed, refusing further writes: {e}");
                self.poisoned = Some(e.to_string());
            }
            Err(_) => {}
        }
        r
    }
}

/// Hand the blocks a tree dropped to the allocator. A block is queued
/// for freeing when nothing but the tree it left can reference it:
/// - not modified in place in an emergency (DragonFly's EMERG_MIP);
/// - in a PFS (`lsnap` is its `pfs_lsnap_tid`), born after its last
///   snapshot: a snapshot shares exactly the blocks of the flushed tree
///   it copied, all with tids up to `pfs_lsnap_tid` (DragonFly allows
///   overwriting in place by the same rule); the super-root's own blocks
///   (`lsnap` None) are never shared;
/// - file data: written by this mount (dedup, ours or DragonFly's, may
///   point other blockrefs at older data blocks; this mount's allocator
///   records every block its dedup shares and never frees those).
///
/// Everything else is counted as possibly free, bulkfree's work.
fn queue_drops(
    space: &mut dyn SpaceMap,
    drops: Vec<Blockref>,
    lsnap: Option<u64>,
    session_tid: u64,
    free_at: u64,
    seen: &mut HashSet<u64>,
) {
    for br in drops {
        if br.data_off.radix() == 0 || !seen.insert(br.data_off.offset()) {
            continue;
        }
        let unshared = br.flags & disk::BREF_FLAG_EMERG_MIP == 0
            && lsnap.is_none_or(|l| br.modify_tid > l)
            && match br.btype {
                BlockrefType::Data => br.modify_tid > session_tid,
                BlockrefType::Inode | BlockrefType::Indirect | BlockrefType::Dirent => true,
                _ => false,
            };
        if unshared {
            space.queue_free(br.data_off, br.btype == BlockrefType::Data, free_at);
        } else {
            space.note_possibly_free(br.data_off.bytes());
        }
    }
}

/// The blocks under a removed inode (`ibr`, its blockref in the inode
/// index, which the index's own drop list holds): every indirect,
/// data and dirent block of its last flushed tree. A block that cannot
/// be read ends the walk of its subtree; what lies below is left for
/// bulkfree.
fn inode_tree_drops(vol: &Volume, ibr: &Blockref, out: &mut Vec<Blockref>, unread: &mut u64) {
    let ino = match pfs::read_inode(vol, ibr) {
        Ok(i) => i,
        Err(e) => {
            log::warn!(
                "removed inode at {:#x} unreadable, its blocks are left for bulkfree: {e}",
                ibr.data_off.offset()
            );
            *unread += ibr.data_count();
            return;
        }
    };
    if ino.data.meta.has_direct_data() {
        return;
    }
    let mut stack: Vec<(Blockref, usize)> = ino
        .data
        .blockset()
        .into_iter()
        .filter(|b| !b.is_empty())
        .map(|b| (b, 0))
        .collect();
    while let Some((br, depth)) = stack.pop() {
        if br.data_off.radix() == 0 || br.data_off.offset() == 0 {
            continue;
        }
        out.push(br);
        if br.btype != BlockrefType::Indirect {
            continue;
        }
        if depth >= crate::chain::DEPTH_MAX {
            *unread += br.data_count();
            continue;
        }
        match crate::chain::read_node(vol, &br) {
            Ok(set) => stack.extend(
                set.into_iter()
                    .filter(|b| !b.is_empty())
                    .map(|b| (b, depth + 1)),
            ),
            Err(e) => {
                log::warn!("indirect block at {:#x} of a removed inode unreadable, what is below is left for bulkfree: {e}",
                    br.data_off.offset());
                *unread += br.data_count();
            }
        }
    }
}

/// An entry of `dir` naming the PFS root or `dir` itself is damage that
/// would make every walk of the tree a cycle (see `pfs::check_entry`).
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

pub(crate) fn lock_space(space: &Mutex<Box<dyn SpaceMap>>) -> MutexGuard<'_, Box<dyn SpaceMap>> {
    space.lock().unwrap_or_else(|p| p.into_inner())
}

/// What `flush_commit_prepare` leaves to do.
pub enum Prepared {
    /// Nothing changed but the file data already written: no header.
    Nothing(FlushStats),
    Commit(Box<CommitIo>),
}

impl Prepared {
    /// The device part of the commit: a barrier (everything written
    /// before is durable), the volume header, a barrier. Needs no lock
    /// on the mount.
    pub fn run(&self) -> Result<()> {
        match self {
            Prepared::Nothing(_) => Ok(()),
            Prepared::Commit(c) => c.run(),
        }
    }
}

/// A commit waiting for the device: the new volume header and where it
/// goes.
pub struct CommitIo {
    dev: Arc<dyn BlockDevice>,
    raw: Vec<u8>,
    at: u64,
    stats: FlushStats,
    /// For the trees of inodes the commit removes: their blocks are
    /// walked in the device phase (the walk reads them; they stay
    /// allocated until freed through the queue) and queued for freeing.
    reader: Volume,
    space: Arc<Mutex<Box<dyn SpaceMap>>>,
    removed_trees: Vec<(Blockref, u64)>,
    /// Blocks the commit queued already (a removed inode's tree holds
    /// blocks its table dropped before it went): each is queued once.
    seen: Mutex<HashSet<u64>>,
    session_tid: u64,
    free_at: u64,
}

impl CommitIo {
    fn run(&self) -> Result<()> {
        for (ibr, lsnap) in &self.removed_trees {
            let mut drops = Vec::new();
            let mut noted = 0;
            inode_tree_drops(&self.reader, ibr, &mut drops, &mut noted);
            let mut space = lock_space(&self.space);
            space.note_possibly_free(noted);
            queue_drops(
                space.as_mut(),
                drops,
                Some(*lsnap),
                self.session_tid,
                self.free_at,
                &mut self.seen.lock().unwrap_or_else(|p| p.into_inner()),
            );
        }
        let io = |op, at| move |source| Error::Io { op, at, source };
        self.dev.barrier().map_err(io("barrier", 0))?;
        self.dev
            .write_at(&self.raw, self.at)
            .map_err(io("write volume header", self.at))?;
        self.dev.barrier().map_err(io("barrier", self.at))
    }
}

/// One data block of a pipelined flush.
struct BatchBlock {
    label: String,
    inum: u64,
    lbase: u64,
    blk: Arc<Vec<u8>>,
    size: u64,
    comp_algo: u8,
    check_algo: u8,
    /// After `write`: the new blockref, or `None` for a hole.
    written: Option<Option<Blockref>>,
    /// The block written is a durable one shared by dedup: nothing to
    /// give back if it is superseded.
    shared_durable: bool,
}

/// The file data of a flush, written without holding the `Mount`.
pub struct FlushBatch {
    tid: u64,
    dev: Arc<dyn BlockDevice>,
    space: Arc<Mutex<Box<dyn SpaceMap>>>,
    blocks: Vec<BatchBlock>,
    /// Each file's compression heuristic, carried through the batch and
    /// given back to its inode at commit.
    heuristics: HashMap<(String, u64), CompHeuristic>,
    error: Option<Error>,
}

impl FlushBatch {
    /// Blocks in the batch.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Compress, allocate and write every block. An error is kept for
    /// `flush_commit`, which reports it (and poisons the mount on I/O).
    pub fn write(&mut self) {
        for b in &mut self.blocks {
            if self.error.is_some() {
                return;
            }
            let heur = self
                .heuristics
                .entry((b.label.clone(), b.inum))
                .or_default();
            let Some((phys, methods)) =
                encode_data_block(b.size, b.lbase, &b.blk, b.comp_algo, b.check_algo, heur)
            else {
                b.written = Some(None);
                continue;
            };
            let mut br = data_bref(b.lbase, methods);
            let fp = DedupKey::of(&phys, methods);
            let placed = {
                let mut space = lock_space(&self.space);
                // Admitted when written: a flush allocation, which may
                // use the reserve (`SpaceMap::alloc`).
                place_data(space.as_mut(), self.dev.as_ref(), &fp, &phys, b.lbase, true)
            };
            let off = match placed {
                Ok(Placed::New(off)) => {
                    if let Err(e) = write_placed(self.dev.as_ref(), off, &phys) {
                        self.error = Some(e);
                        return;
                    }
                    if dedupable(methods) {
                        lock_space(&self.space).dedup_record(fp, off);
                    }
                    off
                }
                Ok(Placed::Shared { off, durable }) => {
                    b.shared_durable = durable;
                    off
                }
                Err(e) => {
                    self.error = Some(e);
                    return;
                }
            };
            br.data_off = off;
            br.mirror_tid = self.tid;
            br.modify_tid = self.tid;
            crate::check::set_check(&mut br, &phys);
            b.written = Some(Some(br));
        }
    }
}
