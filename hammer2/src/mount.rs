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

use crate::dedup::{dedupable, place_data, write_placed, DedupKey, Placed};
use crate::disk::{
    self, Blockref, BlockrefType, DirentHead, InodeData, InodeMeta, ObjType, Uuid,
    BREF_FLAG_PFSROOT, INODE_START, OPFLAG_DIRECTDATA, VOLUME_BYTES,
};
use crate::error::{Error, Result};
use crate::flush::{data_bref, encode_data_block, flush_inode, CompHeuristic, SpaceMap, Writer};
use crate::inode::{InodeNode, PendingChange};
use crate::pfs::{self, DirEntry};
use crate::volume::Volume;
use bufcache::BlockDevice;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

/// The PFS root's inode number.
pub const ROOT_INUM: u64 = 1;

/// Space admitted for each new inode: its 1 KiB block, a 1 KiB block for
/// a long name, and a share of the indirect blocks above them.
const INODE_ADMIT_BYTES: u64 = 4096;

/// One PFS opened for writing.
pub(crate) struct PfsState {
    /// The key of its root inode in the super-root.
    key: u64,
    pub(crate) root: InodeNode,
    /// Inodes loaded or created, by number.
    inodes: BTreeMap<u64, InodeNode>,
    /// Inodes to remove from the index at the next flush.
    removed: BTreeSet<u64>,
    /// Pin counts (see `Mount::pin`): an inode whose last link goes
    /// while it is pinned stays until its last pin goes.
    pub(crate) pins: BTreeMap<u64, u32>,
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
    pub bytes_free: u64,
    pub inodes_used: u64,
}

/// What one flush wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushStats {
    pub tid: u64,
    pub blocks: u64,
    pub bytes: u64,
    pub header_slot: usize,
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
        Ok(Mount {
            vol,
            space: Arc::new(Mutex::new(space)),
            flushing: false,
            admitted: 0,
            sroot,
            pfs: BTreeMap::new(),
            poisoned: None,
        })
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
                    continue;
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
                .filter(|b| b.btype == BlockrefType::Inode)
                .ok_or_else(|| Error::NotFound {
                    what: format!("inode {inum}"),
                })?;
            let ino = pfs::read_inode(vol, &br)?;
            if ino.inum() != inum {
                return Err(Error::corrupt(
                    format!("inode index key {inum} holds inode {}", ino.inum()),
                    br.data_off.offset(),
                ));
            }
            p.inodes.insert(inum, InodeNode::from_disk(br, ino.data));
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

    /// The bytes an inode's blocks take on disk, as of now (see
    /// `InodeNode::stored_bytes`): what `st_blocks` reports.
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
        self.with_node(label, dir, |vol, d| {
            if d.obj_type() != ObjType::Directory {
                return Err(Error::NotDir {
                    what: format!("inode {dir}"),
                });
            }
            Ok(d.dir_lookup(vol, name)?.map(|(_, h)| h.inum))
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
            Ok(d.dir_list(vol, from)?
                .into_iter()
                .map(|(key, name, h)| DirEntry {
                    name,
                    inum: h.inum,
                    obj_type: ObjType::from_u8(h.obj_type),
                    key,
                })
                .collect())
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
        let new_blocks = self.with_node(label, inum, |_, n| Ok(n.new_pending_blocks(change)))?;
        self.admit(new_blocks * disk::DATA_BLOCK_BYTES)?;
        self.with_node(label, inum, |vol, n| {
            if n.obj_type() != ObjType::Regfile {
                return Err(Error::InvalidArgument {
                    what: format!("write to a {}", n.obj_type().name()),
                });
            }
            n.write(vol, offset, buf)?;
            n.data.meta.mtime = now;
            n.data.meta.ctime = now;
            Ok(())
        })
    }

    pub fn setattr(&mut self, label: &str, inum: u64, a: SetAttr, now: u64) -> Result<InodeMeta> {
        self.writable()?;
        if let Some(size) = a.size {
            // A truncate that leaves a partial last block makes it pending.
            let change = PendingChange::Truncate { size };
            let new_blocks =
                self.with_node(label, inum, |_, n| Ok(n.new_pending_blocks(change)))?;
            self.admit(new_blocks * disk::DATA_BLOCK_BYTES)?;
        }
        self.with_node(label, inum, |vol, n| {
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
        })
    }

    /// Admit `bytes` more of pending writes, or fail with NoSpace.
    fn admit(&mut self, bytes: u64) -> Result<()> {
        let available = lock_space(&self.space).available_bytes();
        if self.admitted.saturating_add(bytes) > available {
            return Err(Error::NoSpace {
                bytes,
                free: available.saturating_sub(self.admitted),
            });
        }
        self.admitted += bytes;
        Ok(())
    }

    /// The next inode number of PFS `label`, from its root's allocator.
    fn alloc_inum(&mut self, label: &str) -> Result<u64> {
        let root = &mut self.node(label, ROOT_INUM)?.data.meta;
        let inum = root.pfs_inum.max(INODE_START - 1) + 1;
        root.pfs_inum = inum;
        Ok(inum)
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
        self.admit(INODE_ADMIT_BYTES)?;
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
        self.admit(INODE_ADMIT_BYTES)?;
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
        if target.is_empty() || target.len() > 4096 {
            return Err(Error::InvalidArgument {
                what: format!("symlink target of {} bytes", target.len()),
            });
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
                p.inodes.remove(&inum);
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
            p.inodes.remove(&inum);
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

    fn remove_entry(&mut self, label: &str, dir: u64, name: &[u8], now: u64) -> Result<()> {
        self.with_node(label, dir, |vol, d| {
            let (key, _) = d.dir_lookup(vol, name)?.ok_or_else(|| Error::NotFound {
                what: String::from_utf8_lossy(name).into_owned(),
            })?;
            d.dir_remove(vol, key)?;
            d.data.meta.mtime = now;
            d.data.meta.ctime = now;
            Ok(())
        })
    }

    /// unlink(2): remove a non-directory entry.
    pub fn unlink(&mut self, label: &str, dir: u64, name: &[u8], now: u64) -> Result<()> {
        self.writable()?;
        let inum = self
            .lookup(label, dir, name)?
            .ok_or_else(|| Error::NotFound {
                what: String::from_utf8_lossy(name).into_owned(),
            })?;
        if self.getattr(label, inum)?.obj_type == ObjType::Directory {
            return Err(Error::IsDir {
                what: String::from_utf8_lossy(name).into_owned(),
            });
        }
        self.remove_entry(label, dir, name, now)?;
        self.drop_link(label, inum, now)
    }

    /// rmdir(2): remove an empty directory.
    pub fn rmdir(&mut self, label: &str, dir: u64, name: &[u8], now: u64) -> Result<()> {
        self.writable()?;
        let inum = self
            .lookup(label, dir, name)?
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
        self.remove_entry(label, dir, name, now)?;
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
        let src = self
            .lookup(label, odir, oname)?
            .ok_or_else(|| Error::NotFound {
                what: String::from_utf8_lossy(oname).into_owned(),
            })?;
        let dst = self.lookup(label, ndir, nname)?;
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
            let dst = dst.ok_or_else(|| Error::NotFound {
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
            self.remove_entry(label, odir, oname, now)?;
            self.remove_entry(label, ndir, nname, now)?;
            self.add_entry(label, odir, oname, dst, dmeta.obj_type, now)?;
            self.add_entry(label, ndir, nname, src, smeta.obj_type, now)?;
            self.reparent(label, src, ndir, now)?;
            self.reparent(label, dst, odir, now)?;
            return Ok(());
        }
        if let Some(dst) = dst {
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
            self.remove_entry(label, ndir, nname, now)?;
            self.drop_link(label, dst, now)?;
        }
        self.remove_entry(label, odir, oname, now)?;
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
        Ok(StatFs {
            bytes_total: vh.allocator_size,
            bytes_free: lock_space(&self.space).free_bytes(),
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

    /// Drop clean inodes from memory (they are read again when next
    /// needed), as a flush does; for a mount that only reads between
    /// flushes.
    pub fn release_clean(&mut self) {
        for p in self.pfs.values_mut() {
            p.inodes.retain(|_, n| n.dirty || !n.pending.is_empty());
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
            tid: self.vol.header.mirror_tid + 1,
            dev: self.vol.device().clone(),
            space: self.space.clone(),
            blocks,
            heuristics,
            error: None,
        })
    }

    /// Finish a flush started with `flush_begin`.
    pub fn flush_commit(&mut self, batch: FlushBatch) -> Result<FlushStats> {
        let result = self.flush_commit_inner(batch);
        self.flushing = false;
        if result.is_ok() {
            // What is still pending was written after the batch was taken.
            let pending: u64 = self
                .pfs
                .values()
                .flat_map(|p| p.inodes.values())
                .map(|n| n.dirty_bytes())
                .sum();
            self.admitted = pending;
        }
        if let Err(e) = &result {
            if matches!(e, Error::Io { .. }) {
                log::error!("flush failed, refusing further writes: {e}");
                self.poisoned = Some(e.to_string());
            }
        }
        result
    }

    fn flush_commit_inner(&mut self, batch: FlushBatch) -> Result<FlushStats> {
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
            return Ok(FlushStats {
                tid: self.vol.header.mirror_tid,
                blocks,
                bytes,
                header_slot: self.vol.header_index,
            });
        }
        let mut stats = self.flush_inner()?;
        stats.blocks += blocks;
        stats.bytes += bytes;
        Ok(stats)
    }

    fn flush_inner(&mut self) -> Result<FlushStats> {
        let tid = self.vol.header.mirror_tid + 1;
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
        for p in pfs.values_mut() {
            let removed = std::mem::take(&mut p.removed);
            for inum in removed {
                p.root.table.delete(w.vol, inum)?;
                p.root.dirty = true;
            }
            for (inum, node) in p.inodes.iter_mut().filter(|(_, n)| n.dirty) {
                let br = flush_inode(&mut w, node, *inum, 0)?;
                p.root
                    .table
                    .insert(w.vol, crate::blocktable::TreeKind::Directory, true, br)?;
                p.root.dirty = true;
            }
            p.inodes.retain(|_, n| n.dirty || !n.pending.is_empty());
            if p.root.dirty {
                let br = flush_inode(&mut w, &mut p.root, p.key, BREF_FLAG_PFSROOT)?;
                sroot
                    .table
                    .insert(w.vol, crate::blocktable::TreeKind::Directory, true, br)?;
                sroot.dirty = true;
            }
        }
        // A flush that changed only the freemap (bulkfree, recovery)
        // leaves the super-root where it is.
        let sroot_br = if sroot.dirty {
            flush_inode(&mut w, sroot, 0, 0)?
        } else {
            sroot.bref
        };
        let (blocks, bytes) = (w.blocks, w.bytes);
        let dev = vol.device().clone();
        let freemap_blockset = space.flush(dev.as_ref(), tid)?;
        dev.barrier().map_err(|source| Error::Io {
            op: "barrier",
            at: 0,
            source,
        })?;
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
        let at = disk::volhdr_offset(slot);
        dev.write_at(&raw, at).map_err(|source| Error::Io {
            op: "write volume header",
            at,
            source,
        })?;
        dev.barrier().map_err(|source| Error::Io {
            op: "barrier",
            at,
            source,
        })?;
        vol.header = disk::VolumeHeader::decode(&raw, at)?;
        vol.header_index = slot;
        log::info!("flush {tid:#x}: {blocks} blocks, {bytes} bytes, volume header {slot}");
        Ok(FlushStats {
            tid,
            blocks,
            bytes,
            header_slot: slot,
        })
    }
}

pub(crate) fn lock_space(space: &Mutex<Box<dyn SpaceMap>>) -> MutexGuard<'_, Box<dyn SpaceMap>> {
    space.lock().unwrap_or_else(|p| p.into_inner())
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
                place_data(
                    space.as_mut(),
                    self.dev.as_ref(),
                    &fp,
                    &phys,
                    b.lbase,
                    false,
                )
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
