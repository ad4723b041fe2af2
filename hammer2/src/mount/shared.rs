//! Queries that share the mount: `&self` versions of getattr,
//! stored_bytes, lookup, readdir and the read plan, for readers that
//! hold the daemon's transaction lock shared and so run side by side
//! (DragonFly's shared inode locks for lookups and reads). They answer
//! from what is in memory alone; `None` means one would first have to
//! load an inode, a PFS root or an indirect block, which changes the
//! mount, so the caller runs the `&mut self` version with the lock
//! taken exclusive. A block read they need (a long name's block) is
//! read as any other, so under `volume::cache_only` a miss fails it
//! with `Error::WouldBlock` and is noted for the caller.

use super::vnops::{entries, found, is_dir};
use super::{Mount, ROOT_INUM};
use crate::disk::{InodeMeta, ObjType};
use crate::error::{Error, Result};
use crate::inode::{InodeNode, ReadPlan};
use crate::pfs::DirEntry;
use crate::readgate::ReadTicket;

impl Mount {
    /// Inode `inum` of PFS `label`, if in memory.
    fn node_loaded(&self, label: &str, inum: u64) -> Option<Result<&InodeNode>> {
        let p = self.pfs.get(label)?;
        if inum == ROOT_INUM {
            return Some(Ok(&p.root));
        }
        if p.removed.contains(&inum) {
            return Some(Err(Error::NotFound {
                what: format!("inode {inum}"),
            }));
        }
        p.inodes.get(&inum).map(Ok)
    }

    /// `getattr` from memory.
    pub fn getattr_loaded(&self, label: &str, inum: u64) -> Option<Result<InodeMeta>> {
        Some(self.node_loaded(label, inum)?.map(|n| n.data.meta))
    }

    /// `getattr` and `stored_bytes` from memory.
    pub fn stat_loaded(&self, label: &str, inum: u64) -> Option<Result<(InodeMeta, u64)>> {
        match self.node_loaded(label, inum)? {
            Ok(n) => Some(Ok((n.data.meta, n.stored_bytes_loaded()?))),
            Err(e) => Some(Err(e)),
        }
    }

    /// `lookup` from memory.
    pub fn lookup_loaded(&self, label: &str, dir: u64, name: &[u8]) -> Option<Result<Option<u64>>> {
        let d = match self.node_loaded(label, dir)? {
            Ok(d) => d,
            Err(e) => return Some(Err(e)),
        };
        if let Err(e) = is_dir(dir, d) {
            return Some(Err(e));
        }
        let r = d.dir_lookup_loaded(&self.vol, name)?;
        Some(
            r.and_then(|e| found(dir, name, e))
                .map(|e| e.map(|(_, inum)| inum)),
        )
    }

    /// `readdir` from memory.
    pub fn readdir_loaded(
        &self,
        label: &str,
        dir: u64,
        from: u64,
    ) -> Option<Result<Vec<DirEntry>>> {
        let d = match self.node_loaded(label, dir)? {
            Ok(d) => d,
            Err(e) => return Some(Err(e)),
        };
        if let Err(e) = is_dir(dir, d) {
            return Some(Err(e));
        }
        let r = d.dir_list_loaded(&self.vol, from)?;
        Some(r.and_then(|listed| entries(dir, listed)))
    }

    /// `read_plan` from memory.
    pub fn read_plan_loaded(
        &self,
        label: &str,
        inum: u64,
        offset: u64,
        len: usize,
    ) -> Option<Result<(ReadPlan, ReadTicket)>> {
        let n = match self.node_loaded(label, inum)? {
            Ok(n) => n,
            Err(e) => return Some(Err(e)),
        };
        if n.obj_type() == ObjType::Directory {
            return Some(Err(Error::IsDir {
                what: format!("inode {inum}"),
            }));
        }
        let plan = n.read_plan_loaded(offset, len)?;
        Some(plan.map(|p| (p, self.gate.ticket())))
    }
}
