//! What runs with the mount shared: `&self` versions of getattr,
//! stored_bytes, lookup, readdir and the read plan, for readers that
//! hold the daemon's transaction lock shared and so run side by side
//! (DragonFly's shared inode locks for lookups and reads), and of the
//! write and the setattr of a mode, an owner or times, which take the
//! inode's own lock (`InodeLock`) beside them, and of the pins an open
//! and a release count (the PFS's `Pins`, locked before an inode).
//! They answer from what is in memory alone; `None` means one would
//! first have to load an inode or a PFS root, which changes the mount,
//! so the caller runs the `&mut self` version with the lock taken
//! exclusive. A block read they need (a long name's block, an indirect
//! block over a write) is read as any other, so under
//! `volume::cache_only` a miss fails it with `Error::WouldBlock` and is
//! noted for the caller.
//!
//! Each takes at most one inode's lock at a time (the pins' lock may be
//! held around it, never taken under it), and nothing that holds one
//! waits for anything but the leaves (the PFS's inode map, removed set,
//! dependency groups), so they cannot deadlock with each other or with
//! the namespace changes of `namespace.rs`, which lock several inodes in
//! ascending number order; what holds the mount exclusive takes the
//! same locks, which nobody else holds then.

use super::vnops::{entries, found, is_dir, set_meta, write_node};
use super::{change_bytes, Mount, PfsState, SetAttr, Tier, ROOT_INUM};
use crate::disk::{InodeMeta, ObjType};
use crate::error::{Error, Result};
use crate::inode::InodeGuard;
use crate::inode::{Filled, InodeNode, ReadPlan};
use crate::pfs::DirEntry;
use crate::readgate::ReadTicket;
use std::ops::Deref;

/// An inode in memory as a shared query sees it: a PFS root (changed
/// only with the mount exclusive) or another inode, locked.
enum NodeRef<'a> {
    Root(&'a InodeNode),
    Locked(InodeGuard),
}

impl Deref for NodeRef<'_> {
    type Target = InodeNode;

    fn deref(&self) -> &InodeNode {
        match self {
            NodeRef::Root(n) => n,
            NodeRef::Locked(g) => g,
        }
    }
}

impl Mount {
    /// Inode `inum` of PFS `label`, if in memory (locked until the
    /// reference goes: hold one at a time).
    fn node_loaded(&self, label: &str, inum: u64) -> Option<Result<NodeRef<'_>>> {
        let p = self.pfs.get(label)?;
        if inum == ROOT_INUM {
            return Some(Ok(NodeRef::Root(&p.root)));
        }
        if p.removed.lock().contains(&inum) {
            return Some(Err(Error::NotFound {
                what: format!("inode {inum}"),
            }));
        }
        p.inodes
            .handle(inum)
            .map(|n| Ok(NodeRef::Locked(n.lock_owned())))
    }

    /// Directory `dir` of PFS `label`, if in memory (NotDir for anything
    /// else).
    fn dir_loaded(&self, label: &str, dir: u64) -> Option<Result<NodeRef<'_>>> {
        Some(
            self.node_loaded(label, dir)?
                .and_then(|d| is_dir(dir, &d).map(|()| d)),
        )
    }

    /// Inode `inum` of PFS `label` to change with the mount shared, and
    /// its PFS: `None` for a PFS root (changed only with the mount
    /// exclusive), an inode removed, or one not in memory.
    fn changing(&self, label: &str, inum: u64) -> Option<(&PfsState, InodeGuard)> {
        let p = self.pfs.get(label)?;
        if inum == ROOT_INUM || p.removed.lock().contains(&inum) {
            return None;
        }
        Some((p, p.inodes.handle(inum)?.lock_owned()))
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
        let d = match self.dir_loaded(label, dir)? {
            Ok(d) => d,
            Err(e) => return Some(Err(e)),
        };
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
        let d = match self.dir_loaded(label, dir)? {
            Ok(d) => d,
            Err(e) => return Some(Err(e)),
        };
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

    /// `write_filled` with the mount shared and the file's own lock
    /// taken: beside queries and writes to other files. `None` when the
    /// file is not in memory, is not a regular file, or `plain` (asked
    /// of its meta under its lock) says the write needs more done than
    /// this does (set-id bits to clear); an error changes nothing (what
    /// it admitted is given back). Either way the caller may run
    /// `write_filled` with the mount exclusive, which loads what is
    /// missing, makes room and reports the error of record.
    #[allow(clippy::too_many_arguments)]
    pub fn write_shared(
        &self,
        label: &str,
        inum: u64,
        offset: u64,
        buf: &[u8],
        now: u64,
        filled: &mut Filled,
        plain: impl FnOnce(&InodeMeta) -> bool,
    ) -> Option<Result<()>> {
        if let Err(e) = self.writable() {
            return Some(Err(e));
        }
        let (_, mut n) = self.changing(label, inum)?;
        if n.obj_type() != ObjType::Regfile || !plain(&n.data.meta) {
            return None;
        }
        if buf.is_empty() {
            return Some(Ok(()));
        }
        // As `write_filled`: the blocks this write makes pending
        // admitted, with the inode unless it waits for the flush already.
        let blocks = match n.before_write(&self.vol, offset, buf.len() as u64) {
            Ok(b) => b,
            Err(e) => return Some(Err(e)),
        };
        let cost = change_bytes(u64::from(!n.dirty), 0, blocks);
        if let Err(e) = self.admit(cost, Tier::Normal) {
            return Some(Err(e));
        }
        let r = write_node(
            &self.vol,
            &mut n,
            offset,
            buf,
            self.defers_reads(),
            filled,
            now,
        );
        if r.is_err() {
            self.unadmit_bytes(cost);
        }
        Some(r)
    }

    /// `setattr` of a mode, an owner or times (not a size) with the
    /// mount shared and the inode's own lock taken; what to set is
    /// `asked` of the inode's meta under that lock (so a permission
    /// check and the change are one step), and its refusal is the
    /// answer (`Ok(Err(_))`, nothing changed). `None` when the inode is
    /// not in memory, is a PFS root, or has an access time waiting that
    /// an atime set here must drop (`touch_atime`), or when asked for a
    /// size; a library error changes nothing. Either way the caller may
    /// run `setattr` with the mount exclusive.
    pub fn setattr_shared<E>(
        &self,
        label: &str,
        inum: u64,
        now: u64,
        asked: impl FnOnce(&InodeMeta) -> std::result::Result<SetAttr, E>,
    ) -> Option<Result<std::result::Result<InodeMeta, E>>> {
        if let Err(e) = self.writable() {
            return Some(Err(e));
        }
        let (p, mut n) = self.changing(label, inum)?;
        let a = match asked(&n.data.meta) {
            Ok(a) => a,
            Err(e) => return Some(Ok(Err(e))),
        };
        if a.size.is_some() || (a.atime.is_some() && p.atimes.contains_key(&inum)) {
            return None;
        }
        if !n.dirty {
            if let Err(e) = self.admit(change_bytes(1, 0, 0), Tier::Normal) {
                return Some(Err(e));
            }
        }
        Some(Ok(Ok(set_meta(&mut n, &a, now))))
    }

    /// `pin` with the mount shared (an open): `None` when the inode is
    /// not in memory.
    pub fn pin_shared(&self, label: &str, inum: u64) -> Option<()> {
        let p = self.pfs.get(label)?;
        if inum != ROOT_INUM && (p.removed.lock().contains(&inum) || !p.inodes.contains(inum)) {
            return None;
        }
        *p.pins.lock().entry(inum).or_insert(0) += 1;
        Some(())
    }

    /// `unpin` with the mount shared (a release): `None` when it would
    /// drop the last pin of an inode with no links left (it then leaves
    /// memory, with the mount exclusive) or of one not in memory.
    pub fn unpin_shared(&self, label: &str, inum: u64) -> Option<()> {
        let p = self.pfs.get(label)?;
        let mut pins = p.pins.lock();
        match pins.get_mut(&inum) {
            None => return Some(()),
            Some(n) if *n > 1 => {
                *n -= 1;
                return Some(());
            }
            Some(_) => {}
        }
        // Links change under the inode's lock. Seen here under the pins'
        // lock, the count stands: an unlink that takes the last link
        // later finds the pin gone (`forget_unpinned` takes the pins'
        // lock before the inode's) and removes the inode itself.
        if inum != ROOT_INUM && p.inodes.handle(inum)?.lock().data.meta.nlinks == 0 {
            return None;
        }
        pins.remove(&inum);
        Some(())
    }
}
