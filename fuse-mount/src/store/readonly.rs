//! The read-only store: `hammer2::Pfs`, the lock-free read view over an
//! `Arc<Volume>`. Requests on several threads read (and verify and
//! decompress) in parallel with no lock; decoded inodes are cached in
//! the `InodeTable` for the nodes the kernel holds. The image is opened
//! read-only and nothing can write it: every change is refused (EROFS)
//! at `rw`.

use super::{attr_of_meta, parent_ino, subdirs, Check, Entry, Nodes, ReadWrite, Space, Store};
use crate::dirlinks::DirLinks;
use crate::errno::ErrorCount;
use crate::inode::{Ids, InodeTable};
use crate::snapdir;
use fuser::{Errno, FileAttr, INodeNo};
use hammer2::disk::{Blockref, InodeMeta, ObjType};
use hammer2::pfs::DIRENT_NAME_MAX;
use hammer2::{DirEntry, Inode, Pfs};
use std::sync::Arc;
use std::time::Duration;

/// How long the kernel may trust names and attributes without asking
/// again: nothing changes the mount, so this is long; the kernel still
/// drops entries under memory pressure.
const TTL_READ_ONLY: Duration = Duration::from_secs(3600);

pub struct ReadOnly {
    pfs: Box<Pfs>,
    root: Arc<Inode>,
    ids: Ids,
    /// The nodes the kernel holds, shared with the operations (which
    /// count lookups in it); here, their decoded inodes.
    inodes: Arc<InodeTable>,
    dirlinks: DirLinks,
    errors: ErrorCount,
}

impl ReadOnly {
    pub fn new(pfs: Pfs, inodes: Arc<InodeTable>, errors: ErrorCount) -> ReadOnly {
        let root = Arc::new(pfs.root.clone());
        ReadOnly {
            ids: Ids {
                root_inum: root.inum(),
            },
            pfs: Box::new(pfs),
            root,
            inodes,
            dirlinks: DirLinks::default(),
            errors,
        }
    }

    pub fn ids(&self) -> Ids {
        self.ids
    }

    fn h<T>(&self, r: hammer2::Result<T>) -> Result<T, Errno> {
        self.errors.h(r)
    }

    /// The inode behind a node id: the root, a cached one, or read from
    /// the inode index (and cached if the kernel holds the node).
    fn inode(&self, ino: u64) -> Result<Arc<Inode>, Errno> {
        if ino == INodeNo::ROOT.0 {
            return Ok(self.root.clone());
        }
        if let Some(i) = self.inodes.get(ino) {
            return Ok(i);
        }
        let i = Arc::new(self.h(self.pfs.inode(self.ids.inum(ino)))?);
        self.inodes.fill(ino, &i);
        Ok(i)
    }
}

impl Nodes for ReadOnly {
    fn rw(&self) -> Result<&ReadWrite, Errno> {
        Err(Errno::EROFS)
    }

    fn meta(&self, ino: u64) -> Result<InodeMeta, Errno> {
        Ok(*self.inode(ino)?.meta())
    }

    fn stat(&self, ino: u64) -> Result<(InodeMeta, u64), Errno> {
        let i = self.inode(ino)?;
        Ok((*i.meta(), i.stored_bytes()))
    }

    fn attr(&self, ino: u64, m: &InodeMeta, bytes: u64) -> Result<FileAttr, Errno> {
        let mut a = attr_of_meta(&self.errors, ino, m, bytes)?;
        if m.obj_type == ObjType::Directory {
            a.nlink = self.dirlinks.nlink(m.inum, || {
                let dir = self.inode(ino)?;
                Ok::<_, Errno>(subdirs(&self.h(self.pfs.readdir_from(&dir, 0))?))
            })?;
        }
        Ok(a)
    }

    fn lookup(&self, parent: u64, name: &[u8], search: Check) -> Result<Entry, Errno> {
        let dir = self.inode(parent)?;
        if !dir.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        search(dir.meta(), 1)?;
        let e = self.h(self.pfs.lookup(&dir, name))?.ok_or(Errno::ENOENT)?;
        let ino = self.ids.ino(e.inum);
        let inode = self.inode(ino)?;
        let attr = self.attr(ino, inode.meta(), inode.stored_bytes())?;
        Ok(Entry {
            attr,
            inode: Some(inode),
        })
    }

    fn parent(&self, _dir: u64, meta: &InodeMeta) -> Result<u64, Errno> {
        Ok(parent_ino(&self.ids, meta))
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        let i = self.inode(ino)?;
        self.h(self.pfs.readlink(&i))
    }

    fn open(
        &self,
        ino: u64,
        _reads: bool,
        may: &dyn Fn(&InodeMeta) -> Result<(), Errno>,
    ) -> Result<bool, Errno> {
        let inode = self.inode(ino)?;
        if inode.is_dir() {
            return Err(Errno::EISDIR);
        }
        may(inode.meta()).map(|()| false)
    }

    fn pin(&self, _ino: u64) -> Result<(), Errno> {
        Ok(())
    }

    fn unpin(&self, _ino: u64) {}

    fn read(&self, ino: u64, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        let i = self.inode(ino)?;
        self.h(self.pfs.read(&i, offset, len))
    }

    fn seek(&self, ino: u64, offset: u64, data: bool) -> Result<Option<u64>, Errno> {
        let i = self.inode(ino)?;
        if data {
            self.h(self.pfs.seek_data(&i, offset))
        } else if offset < i.meta().size {
            Ok(Some(self.h(self.pfs.seek_hole(&i, offset))?))
        } else {
            Ok(None)
        }
    }

    fn list(&self, ino: u64, from: u64) -> Result<Vec<DirEntry>, Errno> {
        let dir = self.inode(ino)?;
        let mut out = self.h(self.pfs.readdir_from(&dir, from))?;
        for e in &mut out {
            e.inum = self.ids.ino(e.inum);
        }
        Ok(out)
    }

    fn listed(&self, _ino: u64) {}

    fn entry_attrs(&self, entries: &[DirEntry]) -> Vec<Option<Entry>> {
        entries
            .iter()
            .map(|e| {
                let child = e.inum;
                let inode = self.inode(child).ok()?;
                let attr = self.attr(child, inode.meta(), inode.stored_bytes()).ok()?;
                Some(Entry {
                    attr,
                    inode: Some(inode),
                })
            })
            .collect()
    }

    fn attr_batch(&self) -> usize {
        // Read as they are added: no more than the reply holds.
        1
    }
}

/// The volume as the snapshot layer sees it: as opened (nothing changes
/// it).
struct Origin {
    volume: Arc<hammer2::Volume>,
    root: Arc<Inode>,
    errors: ErrorCount,
}

impl snapdir::Origin for Origin {
    fn source(&self) -> Result<snapdir::Source, Errno> {
        Ok(snapdir::Source {
            snapshots: self.errors.h(snapdir::snapshot_labels(&self.volume))?,
            volume: self.volume.clone(),
        })
    }

    fn root_meta(&self) -> Result<InodeMeta, Errno> {
        Ok(*self.root.meta())
    }
}

impl Store for ReadOnly {
    fn nodes(&self) -> &dyn Nodes {
        self
    }

    fn rw_mut(&mut self) -> Option<&mut ReadWrite> {
        None
    }

    fn name_max(&self) -> usize {
        // The format's limit: every name on the image lists and looks up.
        DIRENT_NAME_MAX
    }

    fn ttl(&self) -> Duration {
        TTL_READ_ONLY
    }

    /// From the volume header: free space as recorded, and as available
    /// what a read-write mount would let writes take.
    fn statfs(&self) -> Result<Space, Errno> {
        let h = &self.pfs.volume().header;
        let free = h.allocator_free.min(h.allocator_size);
        Ok(Space {
            total: h.allocator_size,
            free,
            avail: free.saturating_sub(hammer2::alloc::reserve_for(h.allocator_size)),
            inodes: self.root.bref.inode_count(),
        })
    }

    fn sync(&self) -> Result<(), Errno> {
        Ok(())
    }

    fn healthy(&self) -> Result<(), Errno> {
        Ok(())
    }

    fn unmount(&self) {}

    fn snap_origin(&self) -> Arc<dyn snapdir::Origin> {
        Arc::new(Origin {
            volume: self.pfs.volume().clone(),
            root: self.root.clone(),
            errors: self.errors.clone(),
        })
    }

    fn has_real_snapdir(&self) -> hammer2::Result<bool> {
        Ok(self.pfs.lookup(&self.root, snapdir::NAME)?.is_some())
    }

    fn pfs_list(&self) -> hammer2::Result<Vec<hammer2::pfs::PfsInfo>> {
        hammer2::pfs::pfs_list(self.pfs.volume())
    }

    fn inode_state(&self, inum: u64) -> hammer2::Result<(InodeMeta, Blockref, u64)> {
        let i = self.pfs.inode(inum)?;
        Ok((*i.meta(), i.bref, 0))
    }
}
