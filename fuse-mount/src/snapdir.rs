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

use crate::inode::{attr_of, file_type};
use fuser::{Errno, FileAttr, FileType};
use hammer2::disk::{pfs_subtype, InodeMeta, ObjType};
use hammer2::{Inode, Pfs, Volume};
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

/// A directory's entries after "." and "..": node id, type, name.
pub type Entries = Vec<(u64, FileType, Vec<u8>)>;

/// The snapshots opened through `.snapshot`.
#[derive(Default)]
pub struct SnapDir {
    views: Mutex<Vec<View>>,
}

/// The snapshots of a volume and a volume to open them from, as the
/// mount provides them.
pub struct Source {
    pub snapshots: Vec<String>,
    pub volume: Arc<Volume>,
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

    /// The meta of node `ino`; `root` is the mount root's meta (for
    /// `.snapshot` itself).
    pub fn meta(
        &self,
        ino: u64,
        root: impl FnOnce() -> Result<InodeMeta, Errno>,
    ) -> Result<InodeMeta, Errno> {
        Ok(self.stat(ino, root)?.0)
    }

    /// The meta of node `ino` and the bytes its blocks take on disk.
    pub fn stat(
        &self,
        ino: u64,
        root: impl FnOnce() -> Result<InodeMeta, Errno>,
    ) -> Result<(InodeMeta, u64), Errno> {
        if ino == SNAP_BIT {
            let m = Self::dir_meta(&root()?);
            return Ok((m, hammer2::pfs::stored_bytes(&m, 0)));
        }
        let i = self.node(ino)?.2;
        Ok((*i.meta(), i.stored_bytes()))
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

    /// SEEK_DATA (`data`) or SEEK_HOLE from `offset` in file node
    /// `ino`, as `Pfs::seek_data` and `seek_hole` answer; `None` at or
    /// past the size, or for SEEK_DATA with only holes after.
    pub fn seek(&self, ino: u64, offset: u64, data: bool) -> Result<Option<u64>, Errno> {
        let (pfs, _, inode) = self.node(ino)?;
        if data {
            h(pfs.seek_data(&inode, offset))
        } else if offset < inode.meta().size {
            h(pfs.seek_hole(&inode, offset)).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Look up `name` in directory node `parent` of this namespace.
    pub fn lookup(
        &self,
        parent: u64,
        name: &[u8],
        source: impl FnOnce() -> Result<Source, Errno>,
    ) -> Result<FileAttr, Errno> {
        if parent == SNAP_BIT {
            let label = std::str::from_utf8(name).map_err(|_| Errno::ENOENT)?;
            let n = self.open(label, source)?;
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

    /// The view of snapshot `label`, opened now if it was not (its index).
    fn open(
        &self,
        label: &str,
        source: impl FnOnce() -> Result<Source, Errno>,
    ) -> Result<u64, Errno> {
        self.open_in(&source()?, label)
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

    /// The entries of directory node `ino` after "." and "..": (node id,
    /// type, name), and the parent's node id (`mount_root` for
    /// `.snapshot`).
    pub fn list(
        &self,
        ino: u64,
        mount_root: u64,
        source: impl FnOnce() -> Result<Source, Errno>,
    ) -> Result<(u64, Entries), Errno> {
        if ino == SNAP_BIT {
            // Listing opens each snapshot's view, so every entry has its
            // node id (readdirplus hands them to the kernel).
            let src = source()?;
            let mut out = Vec::new();
            for label in &src.snapshots {
                let n = self.open_in(&src, label)?;
                let child = Self::ino_of(n, hammer2::mount::ROOT_INUM)?;
                out.push((child, FileType::Directory, label.clone().into_bytes()));
            }
            return Ok((mount_root, out));
        }
        let (pfs, n, dir) = self.node(ino)?;
        if !dir.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        let parent = if dir.inum() == pfs.root.inum() {
            SNAP_BIT
        } else {
            Self::ino_of(n, dir.meta().iparent)?
        };
        let mut out = Vec::new();
        for e in h(pfs.readdir(&dir))? {
            let kind = file_type(e.obj_type).unwrap_or(FileType::RegularFile);
            out.push((Self::ino_of(n, e.inum)?, kind, e.name));
        }
        Ok((parent, out))
    }

    /// Read from file node `ino`.
    pub fn read(&self, ino: u64, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        let (pfs, _, inode) = self.node(ino)?;
        if inode.is_dir() {
            return Err(Errno::EISDIR);
        }
        h(pfs.read(&inode, offset, len))
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        let (pfs, _, inode) = self.node(ino)?;
        h(pfs.readlink(&inode))
    }
}
