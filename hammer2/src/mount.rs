//! A volume opened read-write (DragonFly's `hammer2_dev`) and its PFSs
//! (`hammer2_pfs`): the inodes in memory, admission, inode numbers and
//! tids, pins, and the accounting the daemon reads. The filesystem
//! operations are in `mount/vnops.rs` (DragonFly's vnops) and
//! `mount/linux.rs` (what Linux asks for besides); the flush, which
//! writes what they changed, is `flush.rs`.
//!
//! Operations change inodes in memory (`InodeNode`, each behind its
//! `InodeLock`) and mark them dirty; `flush` writes them out. Each
//! operation is applied whole under the caller's exclusive borrow, but
//! for those on one inode in memory (a write, a setattr without a size,
//! a pin), which may run under a shared borrow holding that inode's lock
//! (`mount/shared.rs`), and the creates, links, unlinks and renames of
//! files in memory, which hold the locks of every inode they change,
//! taken in ascending inode number order (`mount/namespace.rs`); a
//! flush takes every change made before it, so an operation that
//! touches several inodes lands wholly in one flush. Time comes from
//! the caller (`now`, microseconds since the epoch), so tests are
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
use crate::depend::Depend;
use crate::disk::{self, Blockref, BlockrefType, ObjType, INODE_START};
use crate::error::{Error, Result};

use crate::inode::ReadPlan;
use crate::inode::{InodeLock, InodeNode};
use crate::pfs;
use crate::readgate::{ReadGate, ReadTicket};
use crate::volume::Volume;
use bufcache::BlockDevice;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

mod linux;
mod namespace;
mod shared;
mod vnops;
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

/// What a change admits (`Mount::admit`): `inodes` rewritten that do
/// not wait for the flush already, `dirents` added or removed, and
/// `blocks` of file data made pending.
fn change_bytes(inodes: u64, dirents: u64, blocks: u64) -> u64 {
    inodes * INODE_ADMIT_BYTES
        + dirents * DIRENT_ADMIT_BYTES
        + blocks.saturating_mul(DATA_ADMIT_BYTES)
}

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
    pub(crate) key: u64,
    pub(crate) root: InodeNode,
    /// The last inode number handed out (`PfsState::alloc_inum`), atomic so
    /// creates with the mount shared take numbers beside each other; the
    /// flush writes it into the root's `pfs_inum`.
    pub(crate) last_inum: AtomicU64,
    /// Inodes loaded or created, by number, each behind its own lock.
    pub(crate) inodes: InodeMap,
    /// Inodes to remove from the index at the next flush.
    pub(crate) removed: parking_lot::Mutex<BTreeSet<u64>>,
    /// Pin counts (see `Mount::pin`): an inode whose last link goes
    /// while it is pinned stays until its last pin goes. Behind a lock
    /// of its own: opens and releases count here with the mount shared
    /// (`mount/shared.rs`; taken before an inode's lock, never after).
    pub(crate) pins: Pins,
    /// Blockrefs dropped from the trees of inodes that left memory
    /// before the flush (see `BlockTable::take_dropped`), by inode: a
    /// partial commit frees only what its groups dropped.
    pub(crate) dropped: parking_lot::Mutex<BTreeMap<u64, Vec<Blockref>>>,
    /// Which inodes must be committed together (`depend.rs`).
    pub(crate) depend: parking_lot::Mutex<Depend>,
    /// Access times waiting for the next flush, by inode (see
    /// `mount/linux.rs`, `touch_atime`).
    pub(crate) atimes: BTreeMap<u64, u64>,
}

/// A PFS's inodes in memory, by number. Changes with the mount shared
/// add (a create) and take out (an unlink's last link) under the map's
/// own lock, which is a leaf: nothing waits for an inode's lock while
/// holding it, so a handle is cloned out (`handle`) and locked after.
/// With the mount exclusive the map is reached without it (`get_mut`).
#[derive(Default)]
pub(crate) struct InodeMap(parking_lot::RwLock<BTreeMap<u64, InodeLock>>);

impl InodeMap {
    /// Inode `inum`'s handle, if in memory.
    pub(crate) fn handle(&self, inum: u64) -> Option<InodeLock> {
        self.0.read().get(&inum).cloned()
    }

    pub(crate) fn contains(&self, inum: u64) -> bool {
        self.0.read().contains_key(&inum)
    }

    pub(crate) fn insert(&self, inum: u64, n: InodeNode) {
        self.0.write().insert(inum, InodeLock::new(n));
    }

    pub(crate) fn remove(&self, inum: u64) -> Option<InodeLock> {
        self.0.write().remove(&inum)
    }

    /// Every handle, taken under the map's lock and locked after it.
    pub(crate) fn handles(&self) -> Vec<InodeLock> {
        self.0.read().values().cloned().collect()
    }

    /// Every handle with its inode number, in order.
    pub(crate) fn handles_by_inum(&self) -> Vec<(u64, InodeLock)> {
        self.0.read().iter().map(|(&i, h)| (i, h.clone())).collect()
    }

    /// The map, through the exclusive borrow of the mount.
    pub(crate) fn get_mut(&mut self) -> &mut BTreeMap<u64, InodeLock> {
        self.0.get_mut()
    }
}

/// A PFS's pin counts, by inode, behind their own lock.
#[derive(Default)]
pub(crate) struct Pins(Mutex<BTreeMap<u64, u32>>);

impl Pins {
    pub(crate) fn get_mut(&mut self) -> &mut BTreeMap<u64, u32> {
        self.0.get_mut().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, u32>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
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

/// An inode reached with the mount exclusive (`Mount::node`): a PFS
/// root, or another inode, locked (nobody else holds it then).
pub(crate) enum NodeMut<'a> {
    Root(&'a mut InodeNode),
    Locked(parking_lot::MutexGuard<'a, InodeNode>),
}

impl std::ops::Deref for NodeMut<'_> {
    type Target = InodeNode;

    fn deref(&self) -> &InodeNode {
        match self {
            NodeMut::Root(n) => n,
            NodeMut::Locked(g) => g,
        }
    }
}

impl std::ops::DerefMut for NodeMut<'_> {
    fn deref_mut(&mut self) -> &mut InodeNode {
        match self {
            NodeMut::Root(n) => n,
            NodeMut::Locked(g) => g,
        }
    }
}

impl PfsState {
    /// A PFS whose root is new (pfsops: snapshot, pfs_create).
    pub(crate) fn new(key: u64, root: InodeNode) -> PfsState {
        PfsState {
            key,
            last_inum: AtomicU64::new(root.data.meta.pfs_inum),
            root,
            inodes: InodeMap::default(),
            removed: parking_lot::Mutex::default(),
            pins: Pins::default(),
            dropped: parking_lot::Mutex::default(),
            depend: parking_lot::Mutex::default(),
            atimes: BTreeMap::new(),
        }
    }

    /// Take removed inode `inum` out of memory and mark it removed,
    /// keeping what its tree dropped and the leaves it holds in memory.
    /// The commit that removes it frees the tree its last commit left
    /// (`CommitIo`'s walk), which lacks what was written since: file
    /// data laundered into its table (`Mount::launder_finish`). Leaves
    /// in both are freed once (the commit's `seen`). `n` is the inode,
    /// locked by the caller when the mount is shared (a handle cloned
    /// before sees it removed).
    fn forget_inode(&self, inum: u64, n: &mut InodeNode) {
        self.removed.lock().insert(inum);
        self.inodes.remove(inum);
        let mut d = n.table.take_dropped();
        d.extend(n.table.loaded_leaves());
        if !d.is_empty() {
            self.dropped.lock().entry(inum).or_default().extend(d);
        }
    }

    /// The next inode number (DragonFly's `pmp->inode_tid`), taken
    /// atomically, so creates with the mount shared number side by side.
    /// The counter comes from disk: one past the inode number space
    /// (keys from 2^63 are directory entries in the PFS root) or behind
    /// an inode in use (the new one would replace it) is damage. `None`
    /// when the inode index over the number is not in memory
    /// (`Mount::load_next_inum` loads it).
    pub(crate) fn alloc_inum(&self, label: &str) -> Option<Result<u64>> {
        let at = self.root.bref.data_off.offset();
        loop {
            let raw = self.last_inum.load(Ordering::SeqCst);
            let last = raw.max(INODE_START - 1);
            let Some(inum) = last
                .checked_add(1)
                .filter(|&i| !crate::dirhash::is_dirent_key(i))
            else {
                return Some(Err(Error::corrupt(
                    format!(
                        "PFS {label}: inode allocator pfs_inum {last:#x} is past the inode numbers"
                    ),
                    at,
                )));
            };
            if self.inodes.contains(inum) || !self.root.table.range_loaded(inum, inum)?.is_empty() {
                return Some(Err(Error::corrupt(
                    format!("PFS {label}: inode allocator pfs_inum {last} is behind inode {inum}, which is in use"),
                    at,
                )));
            }
            if self
                .last_inum
                .compare_exchange(raw, inum, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return Some(Ok(inum));
            }
        }
    }

    /// `forget_inode` for inode `inum` if in memory, with the mount
    /// exclusive.
    fn forget_loaded(&mut self, inum: u64) {
        match self.inodes.handle(inum) {
            Some(h) => self.forget_inode(inum, &mut h.lock()),
            None => {
                self.removed.get_mut().insert(inum);
            }
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
    /// Partial commits (`fsync_begin`) between their begin and commit.
    pub(crate) partials: u32,
    /// Pending blocks a batch out for writing holds (`Arc::as_ptr`), with
    /// how many batches hold each: a partial commit and a flush may both
    /// take one, and the second copy must not be deduped against the
    /// first (see `FlushBatch::write`).
    pub(crate) taken: HashMap<usize, u32>,
    /// A commit is between `flush_commit_prepare` and
    /// `flush_commit_finish` (its header is not the volume's yet):
    /// commits do not overlap.
    pub(crate) committing: bool,
    /// Bytes admitted since the last flush (file data blocks and inode
    /// metadata), held against the allocator's available space so a
    /// full disk fails the operation, never the flush. Changes made with
    /// the mount shared admit beside each other (`admit`).
    pub(crate) admitted: AtomicU64,
    pub(crate) sroot: InodeNode,
    pub(crate) pfs: BTreeMap<String, PfsState>,
    pub(crate) poisoned: Option<String>,
    /// The tid of the header this mount opened: file data blocks with a
    /// later `modify_tid` were written by this mount, which knows every
    /// block its dedup shared (see `flush_inner`).
    pub(crate) session_tid: u64,
    /// Bytes of decoded metadata (inodes, the indirect blocks under
    /// them, the PFS roots' inode indexes) kept in memory across flushes
    /// before the clean part is dropped (`trim_metadata`).
    pub(crate) meta_limit: usize,
    /// Readers outside the lock (`read_plan`), which queued frees wait
    /// for (`readgate.rs`), and the tid of the commit at the gate's last
    /// advance: blocks dropped through it may be freed once the readers
    /// from before that advance are gone.
    pub(crate) gate: Arc<ReadGate>,
    pub(crate) gate_mark: u64,
    /// Of `admitted`: the space admitted for blocks two batches out
    /// write both (`flush::begin_batch`), until their batch settles.
    pub(crate) dup_admitted: u64,
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
            partials: 0,
            taken: HashMap::new(),
            committing: false,
            admitted: AtomicU64::new(0),
            sroot,
            pfs: BTreeMap::new(),
            poisoned: None,
            meta_limit: META_LIMIT_DEFAULT,
            gate: Arc::new(ReadGate::default()),
            gate_mark: 0,
            dup_admitted: 0,
        }
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
            self.pfs
                .insert(label.to_string(), PfsState::new(br.key, root));
        }
        self.pfs.get_mut(label).ok_or_else(|| Error::NotFound {
            what: format!("PFS {label}"),
        })
    }

    /// The inode `inum` of PFS `label`, loaded into memory.
    fn node(&mut self, label: &str, inum: u64) -> Result<NodeMut<'_>> {
        self.pfs_mut(label)?;
        let Mount { vol, pfs, .. } = self;
        let p = pfs.get_mut(label).ok_or_else(|| Error::NotFound {
            what: format!("PFS {label}"),
        })?;
        if inum == ROOT_INUM {
            return Ok(NodeMut::Root(&mut p.root));
        }
        if p.removed.get_mut().contains(&inum) {
            return Err(Error::NotFound {
                what: format!("inode {inum}"),
            });
        }
        let inodes = p.inodes.get_mut();
        let node = match inodes.entry(inum) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(slot) => {
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
                slot.insert(InodeLock::new(n))
            }
        };
        Ok(NodeMut::Locked(node.lock()))
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
        if inum == ROOT_INUM {
            return f(vol, &mut p.root);
        }
        let n = p
            .inodes
            .get_mut()
            .get(&inum)
            .ok_or_else(|| Error::NotFound {
                what: format!("inode {inum}"),
            })?;
        f(vol, &mut n.lock())
    }

    /// Whether inode `inum` already waits for the flush (its rewrite is
    /// admitted).
    fn inode_dirty(&self, label: &str, inum: u64) -> bool {
        self.pfs.get(label).is_some_and(|p| {
            if inum == ROOT_INUM {
                p.root.dirty
            } else {
                p.inodes.handle(inum).is_some_and(|n| n.lock().dirty)
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
        let bytes = change_bytes(n, dirents, blocks);
        self.admit(bytes, tier)?;
        // The inodes one change rewrites reach the disk together
        // (`depend.rs`); an inode it creates is tied once it has a number.
        if counted.len() > 1 {
            self.tie(label, &counted);
        }
        Ok(bytes)
    }

    /// Tie inodes of PFS `label` into one dependency group.
    pub(crate) fn tie(&mut self, label: &str, inums: &[u64]) {
        if let Some(p) = self.pfs.get_mut(label) {
            p.depend.get_mut().tie(inums);
        }
    }

    /// Give back what `admit_change` admitted for a change that failed
    /// before it changed anything (a read error, or a block not cached:
    /// `volume::CacheOnly`), so retries do not count it again.
    fn unadmit<T>(&mut self, bytes: u64, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.unadmit_bytes(bytes);
        }
        r
    }

    /// Give back `bytes` admitted.
    pub(crate) fn unadmit_bytes(&self, bytes: u64) {
        let _ = self
            .admitted
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |a| {
                Some(a.saturating_sub(bytes))
            });
    }

    /// Admit the rewrite of inode `inum` alone (a change to its meta).
    pub(crate) fn admit_inode_change(&mut self, label: &str, inum: u64) -> Result<()> {
        self.admit_change(label, &[inum], 0, 0, Tier::Normal)
            .map(|_| ())
    }

    /// Admit `bytes` more for the next flush, or fail with NoSpace.
    fn admit(&self, bytes: u64, tier: Tier) -> Result<()> {
        let (mut available, reserve) = {
            let space = lock_space(&self.space);
            (space.available_bytes(), space.reserve_bytes())
        };
        if tier == Tier::Delete {
            available += reserve / 2;
        }
        self.admitted
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |a| {
                (a.saturating_add(bytes) <= available).then_some(a + bytes)
            })
            .map(|_| ())
            .map_err(|a| Error::NoSpace {
                bytes,
                free: available.saturating_sub(a),
            })
    }

    /// Admit `bytes` for blocks a batch writes that another batch out
    /// writes too (`flush::begin_batch`), or fail with NoSpace.
    pub(crate) fn admit_dups(&mut self, bytes: u64) -> Result<()> {
        self.admit(bytes, Tier::Normal)?;
        self.dup_admitted += bytes;
        Ok(())
    }

    /// What stays admitted once a flush has committed: data written
    /// since it took its batch, fallocate's reservations, and the
    /// duplicates of batches still out.
    pub(crate) fn held_after_commit(&self) -> u64 {
        self.dup_admitted
            + self
                .pfs
                .values()
                .flat_map(|p| p.inodes.handles())
                .map(|n| {
                    let n = n.lock();
                    (n.dirty_bytes() / disk::DATA_BLOCK_BYTES
                        + n.reserved_bytes() / disk::DATA_BLOCK_BYTES)
                        * DATA_ADMIT_BYTES
                        + if n.dirty { INODE_ADMIT_BYTES } else { 0 }
                })
                .sum::<u64>()
    }

    /// Load the inode index over the number `alloc_inum` will hand out
    /// next, so that the flush inserting the new inode reads nothing
    /// under the mount's lock (and a create reads before it changes).
    fn load_next_inum(&mut self, label: &str) -> Result<()> {
        self.pfs_mut(label)?;
        let Mount { vol, pfs, .. } = self;
        let Some(p) = pfs.get_mut(label) else {
            return Ok(());
        };
        let next = (*p.last_inum.get_mut())
            .max(INODE_START - 1)
            .saturating_add(1);
        p.root.table.lookup(&*vol, next)?;
        Ok(())
    }

    /// `PfsState::alloc_inum` with the mount exclusive, for a change
    /// that called `load_next_inum` before it changed anything.
    fn alloc_inum(&mut self, label: &str) -> Result<u64> {
        let p = self.pfs.get(label).ok_or_else(|| Error::NotFound {
            what: format!("PFS {label}"),
        })?;
        p.alloc_inum(label).unwrap_or_else(|| {
            Err(Error::Busy {
                what: format!(
                    "PFS {label}: the inode index over the next inode number, not loaded"
                ),
            })
        })
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

    /// Pin inode `inum` (counted): while pinned, losing its last link
    /// does not remove it. It stays readable and writable by number,
    /// and flushes go on writing it to the inode index (with no links,
    /// as DragonFly keeps a file open and unlinked: after a crash it is
    /// an orphan, which fsck lists as a warning). The FUSE daemon pins
    /// an inode for each open file handle.
    pub fn pin(&mut self, label: &str, inum: u64) -> Result<()> {
        self.node(label, inum)?;
        *self.pfs_mut(label)?.pins.get_mut().entry(inum).or_insert(0) += 1;
        Ok(())
    }

    /// Drop one pin of `inum`. At the last one, an inode with no links
    /// left leaves memory at once and the index at the next flush.
    pub fn unpin(&mut self, label: &str, inum: u64) -> Result<()> {
        let pins = self.pfs_mut(label)?.pins.get_mut();
        match pins.get_mut(&inum) {
            None => return Ok(()),
            Some(n) if *n > 1 => {
                *n -= 1;
                return Ok(());
            }
            Some(_) => {
                pins.remove(&inum);
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
            self.pfs_mut(label)?.forget_loaded(inum);
        }
        Ok(())
    }

    /// Pins held on `inum` (for tests and the daemon's bookkeeping).
    pub fn pin_count(&self, label: &str, inum: u64) -> u32 {
        self.pfs
            .get(label)
            .and_then(|p| p.pins.lock().get(&inum).copied())
            .unwrap_or(0)
    }

    pub fn statfs(&mut self, label: &str) -> Result<StatFs> {
        let used = self.pfs_mut(label)?.root.bref.inode_count();
        let vh = &self.vol.header;
        let space = lock_space(&self.space);
        Ok(StatFs {
            bytes_total: vh.allocator_size,
            bytes_possibly_free: space.possibly_free_bytes(),
            bytes_free: space.free_bytes(),
            bytes_avail: space
                .available_bytes()
                .saturating_sub(self.admitted.load(Ordering::SeqCst)),
            inodes_used: used,
        })
    }

    /// True when anything waits for a flush (the freemap too: recovery
    /// and bulkfree change it without touching the topology).
    pub fn is_dirty(&self) -> bool {
        self.sroot.dirty
            || self.pfs.values().any(|p| {
                p.root.dirty
                    || !p.removed.lock().is_empty()
                    || p.inodes.handles().iter().any(|n| n.lock().dirty)
            })
            || lock_space(&self.space).is_dirty()
    }

    /// Bytes of file data written and waiting for a flush (whole 64 KiB
    /// blocks), for writeback limits.
    pub fn dirty_bytes(&self) -> u64 {
        self.pfs
            .values()
            .map(|p| {
                p.root.dirty_bytes()
                    + p.inodes
                        .handles()
                        .iter()
                        .map(|n| n.lock().dirty_bytes())
                        .sum::<u64>()
            })
            .sum()
    }

    /// Bytes of memory held by file data waiting for a flush, for
    /// writeback limits: a page per pending block on the page layer, what
    /// was written of each on the heap (no page layer). A pass over the
    /// inodes in memory (`data_page_bytes` is the cheap sign of growth).
    pub fn pending_bytes(&self) -> u64 {
        self.pfs
            .values()
            .map(|p| {
                p.root.pending_bytes()
                    + p.inodes
                        .handles()
                        .iter()
                        .map(|n| n.lock().pending_bytes())
                        .sum::<u64>()
            })
            .sum()
    }

    /// Bytes of the page layer's anonymous pages, which hold the pending
    /// blocks and also the blocks batches out for writing and read plans
    /// still hold after they left the pending maps: counted by the page
    /// layer, so free to ask after every write. `None` without a page
    /// layer.
    pub fn data_page_bytes(&self) -> Option<u64> {
        self.vol
            .page_layer()
            .map(|vm| (vm.anon_pages() * bufcache::FRAME_BYTES) as u64)
    }

    /// Drop clean metadata from memory (it is read again when next
    /// needed): clean inodes, and the clean indirect blocks of the
    /// inodes kept and of the PFS roots' and super-root's indexes.
    pub fn release_clean(&mut self) {
        for p in self.pfs.values_mut() {
            let inodes = p.inodes.get_mut();
            inodes.retain(|_, n| {
                let n = n.lock();
                n.dirty || !n.pending.is_empty() || n.reserved_bytes() > 0
            });
            for n in inodes.values() {
                n.lock().table.release_clean();
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
                .map(|p| {
                    node(&p.root)
                        + p.inodes
                            .handles()
                            .iter()
                            .map(|n| node(&n.lock()))
                            .sum::<usize>()
                })
                .sum::<usize>()
    }

    /// The budget of `metadata_bytes` past which `trim_metadata` drops
    /// what is clean (a mount gives it a share of its cache's budget).
    pub fn set_metadata_limit(&mut self, bytes: usize) {
        self.meta_limit = bytes;
    }

    /// Whether decoded metadata is past its budget (what is dirty of it
    /// leaves memory only once a commit has written it).
    pub fn metadata_over_limit(&self) -> bool {
        self.metadata_bytes() > self.meta_limit
    }

    /// Keep decoded metadata across flushes while it fits the budget;
    /// past it, drop what is clean. Every flush calls it, and an idle
    /// mount's flusher.
    pub fn trim_metadata(&mut self) {
        if self.metadata_bytes() > self.meta_limit {
            self.release_clean();
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
}

pub(crate) fn lock_space(space: &Mutex<Box<dyn SpaceMap>>) -> MutexGuard<'_, Box<dyn SpaceMap>> {
    space.lock().unwrap_or_else(|p| p.into_inner())
}
