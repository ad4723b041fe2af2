//! `-o snapdir`: the volume's snapshots, browsable read-only under a
//! hidden directory at the mount root, `.snapshot/NAME/...` (as ZFS's
//! `.zfs/snapshot`). Off by default. `.snapshot` is not listed in the
//! root directory but can be looked up (and shadows a real entry of that
//! name); it lists every PFS whose subtype is SNAPSHOT (HAMMER2 does not
//! record which PFS a snapshot was taken of).
//!
//! Each snapshot is served through `hammer2::Pfs`, the lock-free read
//! view, over a `Volume` opened when it is first looked up: a snapshot
//! never changes, and its blocks are never overwritten (copy on write)
//! nor freed while it exists (bulkfree frees only what no PFS
//! references), so the view needs no lock against the writers of the
//! mount. Deleting a snapshot (`hammer2 pfs-delete`) makes its nodes
//! stale (ESTALE).
//!
//! Node ids: bit 63 marks this namespace. `.snapshot` is `SNAP_BIT`;
//! inode `inum` of the n-th snapshot opened (n from 1) is `SNAP_BIT | n
//! << 48 | inum`; an inode number of 2^48 or more is refused
//! (EOVERFLOW).
//!
//! The namespace is a layer of its own (`store::Nodes`, which `route`
//! sends its node ids to): read-only (a change is refused at `rw` with
//! EROFS), its directories listed with the same cookies as the mount's
//! (`.snapshot`'s entries carry keys by position, the snapshots' their
//! own), link counts as on disk. The volume it shows the snapshots of
//! is its `Origin`, which the mounted store provides.

use crate::errno::ErrorCount;
use crate::inode::attr_of;
use crate::store::{self, Check, Entry, Nodes, ReadWrite};
use fuser::{Errno, FileAttr, INodeNo};
use hammer2::disk::{pfs_subtype, InodeMeta, ObjType, DIRHASH_VISIBLE};
use hammer2::{DirEntry, Inode, Pfs, Volume};
use std::sync::{Arc, Mutex, MutexGuard};

/// The hidden directory's name.
pub const NAME: &[u8] = b".snapshot";
/// The namespace bit, and `.snapshot`'s node id.
pub const SNAP_BIT: u64 = 1 << 63;
const VIEW_SHIFT: u32 = 48;
const INUM_MASK: u64 = (1 << VIEW_SHIFT) - 1;
const VIEWS_MAX: usize = (1 << (63 - VIEW_SHIFT)) - 1;

/// Is `ino` a node of `.snapshot`?
pub fn is_snap(ino: u64) -> bool {
    ino & SNAP_BIT != 0
}

struct View {
    label: String,
    /// None once the snapshot was deleted.
    pfs: Option<Arc<Pfs>>,
}

/// The snapshots opened through `.snapshot`.
pub struct SnapDir {
    views: Mutex<Vec<View>>,
    origin: Arc<dyn Origin>,
    errors: ErrorCount,
}

/// The snapshots of a volume and a volume to open them from, as the
/// mount provides them.
pub struct Source {
    pub snapshots: Vec<String>,
    pub volume: Arc<Volume>,
}

/// The mounted volume, as the snapshot layer sees it.
pub trait Origin: Send + Sync {
    /// Its snapshots (as of the last flush), and a volume to open them
    /// from.
    fn source(&self) -> Result<Source, Errno>;

    /// The meta of the mounted PFS's root (`.snapshot` takes its times).
    fn root_meta(&self) -> Result<InodeMeta, Errno>;
}

/// The directory key of entry `i` of `.snapshot` (visible, past the
/// keys "." and ".." resume at, in listing order).
fn position_key(i: usize) -> u64 {
    DIRHASH_VISIBLE | (i as u64 + 2)
}

fn lock(m: &Mutex<Vec<View>>) -> MutexGuard<'_, Vec<View>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn h<T>(r: hammer2::Result<T>) -> Result<T, Errno> {
    r.map_err(|e| Errno::from_i32(crate::errno(&e)))
}

/// The labels of the snapshots among a volume's PFSs.
pub fn snapshot_labels(vol: &Volume) -> hammer2::Result<Vec<String>> {
    let mut out: Vec<String> = hammer2::pfs::pfs_list(vol)?
        .into_iter()
        .filter(|p| p.root.meta().pfs_subtype == pfs_subtype::SNAPSHOT)
        .map(|p| p.label)
        .collect();
    out.sort();
    Ok(out)
}

impl SnapDir {
    pub fn new(origin: Arc<dyn Origin>, errors: ErrorCount) -> SnapDir {
        SnapDir {
            views: Mutex::new(Vec::new()),
            origin,
            errors,
        }
    }

    /// `.snapshot`'s meta: a read-only directory owned by root, with
    /// the times of the mount's root.
    pub fn dir_meta(root: &InodeMeta) -> InodeMeta {
        InodeMeta {
            obj_type: ObjType::Directory,
            mode: 0o555,
            nlinks: 2,
            ctime: root.ctime,
            mtime: root.mtime,
            atime: root.atime,
            btime: root.btime,
            uid: hammer2::disk::Uuid::from_unix_id(0),
            gid: hammer2::disk::Uuid::from_unix_id(0),
            ..InodeMeta::default()
        }
    }

    fn view(&self, n: u64) -> Result<Arc<Pfs>, Errno> {
        let views = lock(&self.views);
        let v = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_sub(1))
            .and_then(|i| views.get(i))
            .ok_or(Errno::ESTALE)?;
        v.pfs.clone().ok_or(Errno::ESTALE)
    }

    /// The view and inode behind node `ino` (not `.snapshot` itself).
    fn node(&self, ino: u64) -> Result<(Arc<Pfs>, u64, Inode), Errno> {
        let n = (ino & !SNAP_BIT) >> VIEW_SHIFT;
        let pfs = self.view(n)?;
        let inum = ino & INUM_MASK;
        let inode = h(pfs.inode(inum))?;
        Ok((pfs, n, inode))
    }

    fn ino_of(n: u64, inum: u64) -> Result<u64, Errno> {
        if inum > INUM_MASK {
            return Err(Errno::EOVERFLOW);
        }
        Ok(SNAP_BIT | n << VIEW_SHIFT | inum)
    }

    fn attr(ino: u64, i: &Inode) -> Result<FileAttr, Errno> {
        attr_of(ino, i.meta(), i.stored_bytes()).ok_or(Errno::EIO)
    }

    /// The label of the snapshot node `ino` is in (not `.snapshot`
    /// itself).
    pub fn label_of(&self, ino: u64) -> Result<String, Errno> {
        let n = (ino & !SNAP_BIT) >> VIEW_SHIFT;
        let views = lock(&self.views);
        let v = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_sub(1))
            .and_then(|i| views.get(i))
            .filter(|v| v.pfs.is_some())
            .ok_or(Errno::ESTALE)?;
        Ok(v.label.clone())
    }

    /// The inode behind node `ino` (not `.snapshot` itself).
    pub fn inode(&self, ino: u64) -> Result<Inode, Errno> {
        Ok(self.node(ino)?.2)
    }

    /// Look up `name` in directory node `parent` of this namespace.
    fn lookup_in(&self, parent: u64, name: &[u8]) -> Result<FileAttr, Errno> {
        if parent == SNAP_BIT {
            let label = std::str::from_utf8(name).map_err(|_| Errno::ENOENT)?;
            let n = self.open_in(&self.origin.source()?, label)?;
            let pfs = self.view(n)?;
            return Self::attr(Self::ino_of(n, pfs.root.inum())?, &pfs.root);
        }
        let (pfs, n, dir) = self.node(parent)?;
        if !dir.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        let e = h(pfs.lookup(&dir, name))?.ok_or(Errno::ENOENT)?;
        let child = h(pfs.inode(e.inum))?;
        Self::attr(Self::ino_of(n, e.inum)?, &child)
    }

    fn open_in(&self, src: &Source, label: &str) -> Result<u64, Errno> {
        if !src.snapshots.iter().any(|s| s == label) {
            return Err(Errno::ENOENT);
        }
        let mut views = lock(&self.views);
        if let Some(i) = views
            .iter()
            .position(|v| v.label == label && v.pfs.is_some())
        {
            return Ok(i as u64 + 1);
        }
        if views.len() >= VIEWS_MAX {
            return Err(Errno::ENFILE);
        }
        let pfs = h(Pfs::open(src.volume.clone(), label))?;
        views.push(View {
            label: label.to_string(),
            pfs: Some(Arc::new(pfs)),
        });
        Ok(views.len() as u64)
    }

    /// A snapshot was deleted: its nodes go stale.
    pub fn forget_label(&self, label: &str) {
        for v in lock(&self.views).iter_mut().filter(|v| v.label == label) {
            v.pfs = None;
        }
    }
}

impl Nodes for SnapDir {
    fn rw(&self) -> Result<&ReadWrite, Errno> {
        Err(Errno::EROFS)
    }

    fn meta(&self, ino: u64) -> Result<InodeMeta, Errno> {
        Ok(self.stat(ino)?.0)
    }

    fn stat(&self, ino: u64) -> Result<(InodeMeta, u64), Errno> {
        if ino == SNAP_BIT {
            let m = Self::dir_meta(&self.origin.root_meta()?);
            return Ok((m, hammer2::pfs::stored_bytes(&m, 0)));
        }
        let i = self.node(ino)?.2;
        Ok((*i.meta(), i.stored_bytes()))
    }

    /// Read views: the link counts on disk.
    fn attr(&self, ino: u64, m: &InodeMeta, bytes: u64) -> Result<FileAttr, Errno> {
        store::attr_of_meta(&self.errors, ino, m, bytes)
    }

    /// `.snapshot` itself is the entry of that name at the mount's root
    /// (`route` sends it here); `search` on the directory looked in, the
    /// root there, as for any name.
    fn lookup(&self, parent: u64, name: &[u8], search: Check) -> Result<Entry, Errno> {
        let attr = if !is_snap(parent) {
            search(&self.origin.root_meta()?, 1)?;
            let (m, bytes) = self.stat(SNAP_BIT)?;
            self.attr(SNAP_BIT, &m, bytes)?
        } else {
            search(&self.meta(parent)?, 1)?;
            self.lookup_in(parent, name)?
        };
        Ok(Entry { attr, inode: None })
    }

    fn parent(&self, dir: u64, meta: &InodeMeta) -> Result<u64, Errno> {
        if dir == SNAP_BIT {
            return Ok(INodeNo::ROOT.0);
        }
        let (pfs, n, _) = self.node(dir)?;
        if meta.inum == pfs.root.inum() {
            Ok(SNAP_BIT)
        } else {
            Self::ino_of(n, meta.iparent)
        }
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        let (pfs, _, inode) = self.node(ino)?;
        h(pfs.readlink(&inode))
    }

    fn open(
        &self,
        ino: u64,
        _reads: bool,
        may: &dyn Fn(&InodeMeta) -> Result<(), Errno>,
    ) -> Result<bool, Errno> {
        let meta = self.meta(ino)?;
        if meta.obj_type == ObjType::Directory {
            return Err(Errno::EISDIR);
        }
        may(&meta).map(|()| false)
    }

    fn pin(&self, _ino: u64) -> Result<(), Errno> {
        Ok(())
    }

    fn unpin(&self, _ino: u64) {}

    fn read(&self, ino: u64, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        let (pfs, _, inode) = self.node(ino)?;
        if inode.is_dir() {
            return Err(Errno::EISDIR);
        }
        h(pfs.read(&inode, offset, len))
    }

    /// As `Pfs::seek_data` and `seek_hole` answer.
    fn seek(&self, ino: u64, offset: u64, data: bool) -> Result<Option<u64>, Errno> {
        let (pfs, _, inode) = self.node(ino)?;
        if data {
            h(pfs.seek_data(&inode, offset))
        } else if offset < inode.meta().size {
            h(pfs.seek_hole(&inode, offset)).map(Some)
        } else {
            Ok(None)
        }
    }

    /// `.snapshot` lists every snapshot (opening each view, so every
    /// entry has its node id), keyed by position; a directory of a
    /// snapshot lists as the snapshot has it.
    fn list(&self, ino: u64, from: u64) -> Result<Vec<DirEntry>, Errno> {
        if ino == SNAP_BIT {
            let src = self.origin.source()?;
            let mut out = Vec::new();
            for (i, label) in src.snapshots.iter().enumerate() {
                let key = position_key(i);
                if key < from {
                    continue;
                }
                let n = self.open_in(&src, label)?;
                out.push(DirEntry {
                    name: label.clone().into_bytes(),
                    inum: Self::ino_of(n, hammer2::mount::ROOT_INUM)?,
                    obj_type: ObjType::Directory,
                    key,
                });
            }
            return Ok(out);
        }
        let (pfs, n, dir) = self.node(ino)?;
        if !dir.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        let mut out = h(pfs.readdir_from(&dir, from))?;
        for e in &mut out {
            e.inum = Self::ino_of(n, e.inum)?;
        }
        Ok(out)
    }

    fn listed(&self, _ino: u64) {}

    fn entry_attrs(&self, entries: &[DirEntry]) -> Vec<Option<Entry>> {
        entries
            .iter()
            .map(|e| {
                let (m, bytes) = self.stat(e.inum).ok()?;
                let attr = self.attr(e.inum, &m, bytes).ok()?;
                Some(Entry { attr, inode: None })
            })
            .collect()
    }

    fn attr_batch(&self) -> usize {
        1
    }
}
