//! Namespace changes with the mount shared: create (a file, fifo,
//! socket or device), link, unlink and rename of a non-directory, for
//! callers that hold
//! the daemon's transaction lock shared, beside queries, writes and
//! each other (DragonFly's vnops under `hammer2_trans_init` without
//! ISFLUSH). Each locks the inodes it changes and nothing else.
//!
//! Lock order (DragonFly's `hammer2_inode_lock4`): the inodes of one
//! operation are locked in ascending inode number order, all before any
//! change. A name's target is known only once its directory is locked,
//! so an operation looks names up under the directories' locks, lets
//! them go, locks every inode in order and looks the names up again;
//! when they moved meanwhile it starts over (a few times, then the
//! caller runs the exclusive version). The pins' lock is taken before
//! any inode's (as `shared.rs`), the PFS's inode map, removed set,
//! dropped blockrefs and dependency groups are leaves.
//!
//! What each leaves to the exclusive versions (`None`): anything not in
//! memory (an inode, a directory block over the name, the inode index
//! over the next inode number), the PFS root (changed only exclusive),
//! whatever makes, removes or moves a directory (mkdir, rmdir, a
//! directory renamed or replaced: the ancestry check walks parents one
//! at a time, and a mount's directory link counts change only with the
//! mount exclusive), a symlink, and any library error (the exclusive
//! version reports the error of record, having loaded what it needs and
//! made room). A refusal of the caller's own check (`E`: permissions) is
//! the answer.
//!
//! Each admits what it changes (`Mount::admit`) and ties the inodes it
//! changed into one dependency group, as the exclusive versions do; a
//! flush waits for every shared holder, so it takes whole operations.

use super::vnops::{check_name, found, insert_entry, new_meta, remove_entry_at};
use super::{change_bytes, Mount, PfsState, Tier, ROOT_INUM};
use crate::disk::{InodeMeta, ObjType};
use crate::error::Result;
use crate::inode::{InodeGuard, InodeNode};
use std::collections::BTreeMap;

/// How often an operation looks its names up again after they moved
/// between its lookups and its locks, before it gives up.
const RELOCK_TRIES: usize = 4;

/// The inodes one operation locked (in ascending number order).
struct Locked(BTreeMap<u64, InodeGuard>);

impl Locked {
    /// Lock inodes `inums` of `p` (duplicates once) in ascending order:
    /// `None` when one is the PFS root, removed or not in memory.
    fn take(p: &PfsState, inums: &[u64]) -> Option<Locked> {
        let mut sorted = inums.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.first() == Some(&ROOT_INUM) {
            return None;
        }
        let handles = sorted
            .iter()
            .map(|&i| Some((i, p.inodes.handle(i)?)))
            .collect::<Option<Vec<_>>>()?;
        let guards: BTreeMap<u64, InodeGuard> = handles
            .into_iter()
            .map(|(i, h)| (i, h.lock_owned()))
            .collect();
        // An inode leaves the map only under its own lock (`forget_inode`),
        // so one held here and not removed stays.
        let removed = p.removed.lock();
        if guards.keys().any(|i| removed.contains(i)) {
            return None;
        }
        drop(removed);
        Some(Locked(guards))
    }

    /// Inode `inum`, one of those locked.
    fn get(&mut self, inum: u64) -> Option<&mut InodeNode> {
        self.0.get_mut(&inum).map(|g| &mut **g)
    }

    /// The meta of inode `inum`, one of those locked.
    fn meta(&mut self, inum: u64) -> Option<InodeMeta> {
        self.get(inum).map(|n| n.data.meta)
    }

    /// How many of them do not wait for the flush yet: the inodes whose
    /// rewrite the change must admit.
    fn clean_count(&self) -> u64 {
        self.0.values().filter(|n| !n.dirty).count() as u64
    }
}

/// A directory that takes new entries: a directory with links left.
fn live_dir(d: &InodeNode) -> bool {
    d.obj_type() == ObjType::Directory && d.data.meta.nlinks > 0
}

/// Look `name` up in locked directory `d` (`dir`): (key, inode number),
/// `None` when the tree over it is not in memory.
fn lookup(m: &Mount, dir: u64, d: &InodeNode, name: &[u8]) -> Option<Result<Option<(u64, u64)>>> {
    let r = d.dir_lookup_loaded(&m.vol, name)?;
    Some(r.and_then(|e| found(dir, name, e)))
}

impl Mount {
    /// `create` with the mount shared: a node of `obj_type` (not a
    /// directory or a symlink) named `name` in directory `dir`, its mode and
    /// owner `prepare`d from the directory's meta under its lock (the
    /// caller's permission check and the answer to a refusal). The new
    /// inode's number, or `None`: see the module header.
    #[allow(clippy::too_many_arguments)]
    pub fn create_shared<E>(
        &self,
        label: &str,
        dir: u64,
        name: &[u8],
        obj_type: ObjType,
        rdev: (u32, u32),
        now: u64,
        prepare: impl FnOnce(&InodeMeta) -> std::result::Result<(u32, u32, u32), E>,
    ) -> Option<std::result::Result<u64, E>> {
        if self.writable().is_err() || matches!(obj_type, ObjType::Directory | ObjType::Softlink) {
            return None;
        }
        let p = self.pfs.get(label)?;
        let mut l = Locked::take(p, &[dir])?;
        let d = l.get(dir)?;
        if !live_dir(d) {
            return None;
        }
        let (mode, uid, gid) = match prepare(&d.data.meta) {
            Ok(o) => o,
            Err(e) => return Some(Err(e)),
        };
        if check_name(name).is_err() || lookup(self, dir, d, name)?.ok()?.is_some() {
            return None;
        }
        let cost = change_bytes(1 + u64::from(!d.dirty), 1, 0);
        self.admit(cost, Tier::Normal).ok()?;
        let inum = match p.alloc_inum(label) {
            Some(Ok(i)) => i,
            _ => {
                self.unadmit_bytes(cost);
                return None;
            }
        };
        let mut data = new_meta(obj_type, inum, &d.data.meta, mode, uid, gid, now);
        if matches!(obj_type, ObjType::Cdev | ObjType::Bdev) {
            data.meta.rmajor = rdev.0;
            data.meta.rminor = rdev.1;
        }
        p.inodes.insert(inum, InodeNode::new(data));
        if insert_entry(&self.vol, d, name, inum, obj_type, now).is_err() {
            // The number stays spent; nothing names the inode.
            p.inodes.remove(inum);
            self.unadmit_bytes(cost);
            return None;
        }
        p.depend.lock().tie(&[dir, inum]);
        Some(Ok(inum))
    }

    /// `link` with the mount shared: a new name `name` in `dir` for
    /// inode `inum` (not a directory), after the caller's check `allow`
    /// of the directory's and the inode's meta under their locks.
    pub fn link_shared<E>(
        &self,
        label: &str,
        inum: u64,
        dir: u64,
        name: &[u8],
        now: u64,
        allow: impl FnOnce(&InodeMeta, &InodeMeta) -> std::result::Result<(), E>,
    ) -> Option<std::result::Result<(), E>> {
        if self.writable().is_err() || check_name(name).is_err() || inum == dir {
            return None;
        }
        let p = self.pfs.get(label)?;
        let mut l = Locked::take(p, &[inum, dir])?;
        let (dmeta, imeta) = (l.meta(dir)?, l.meta(inum)?);
        if !live_dir(l.get(dir)?)
            || imeta.obj_type == ObjType::Directory
            || imeta.nlinks == u64::MAX
        {
            return None;
        }
        if let Err(e) = allow(&dmeta, &imeta) {
            return Some(Err(e));
        }
        if lookup(self, dir, l.get(dir)?, name)?.ok()?.is_some() {
            return None;
        }
        let cost = change_bytes(l.clean_count(), 1, 0);
        self.admit(cost, Tier::Normal).ok()?;
        if insert_entry(&self.vol, l.get(dir)?, name, inum, imeta.obj_type, now).is_err() {
            self.unadmit_bytes(cost);
            return None;
        }
        let n = l.get(inum)?;
        n.data.meta.nlinks += 1;
        n.data.meta.ctime = now;
        n.dirty = true;
        p.depend.lock().tie(&[dir, inum]);
        Some(Ok(()))
    }

    /// `unlink` with the mount shared: remove entry `name` of `dir`, not
    /// a directory, after the caller's check `allow` of the directory's
    /// and the entry's meta under their locks. The inode leaves memory
    /// at its last link unless pinned.
    pub fn unlink_shared<E>(
        &self,
        label: &str,
        dir: u64,
        name: &[u8],
        now: u64,
        allow: impl FnOnce(&InodeMeta, &InodeMeta) -> std::result::Result<(), E>,
    ) -> Option<std::result::Result<(), E>> {
        if self.writable().is_err() {
            return None;
        }
        let p = self.pfs.get(label)?;
        for _ in 0..RELOCK_TRIES {
            let (_, inum) = {
                let mut l = Locked::take(p, &[dir])?;
                let d = l.get(dir)?;
                if !live_dir(d) {
                    return None;
                }
                lookup(self, dir, d, name)?.ok()??
            };
            let mut l = Locked::take(p, &[dir, inum])?;
            match lookup(self, dir, l.get(dir)?, name)?.ok()? {
                Some((key, i)) if i == inum => {
                    let (dmeta, vmeta) = (l.meta(dir)?, l.meta(inum)?);
                    if !live_dir(l.get(dir)?) || vmeta.obj_type == ObjType::Directory {
                        return None;
                    }
                    if let Err(e) = allow(&dmeta, &vmeta) {
                        return Some(Err(e));
                    }
                    let cost = change_bytes(l.clean_count(), 1, 0);
                    self.admit(cost, Tier::Delete).ok()?;
                    if remove_entry_at(&self.vol, l.get(dir)?, key, now).is_err() {
                        self.unadmit_bytes(cost);
                        return None;
                    }
                    let gone = drop_link(l.get(inum)?, now);
                    p.depend.lock().tie(&[dir, inum]);
                    drop(l);
                    if gone {
                        self.forget_unpinned(p, inum);
                    }
                    return Some(Ok(()));
                }
                _ => continue,
            }
        }
        None
    }

    /// `rename` with the mount shared, without RENAME_EXCHANGE: entry
    /// `oname` of `odir` becomes `nname` of `ndir`, replacing what that
    /// names unless `noreplace`; neither may be a directory. `allow` is
    /// the caller's check of the directories' and the inodes' meta
    /// (source, and the entry replaced) under their locks.
    #[allow(clippy::too_many_arguments)]
    pub fn rename_shared<E>(
        &self,
        label: &str,
        odir: u64,
        oname: &[u8],
        ndir: u64,
        nname: &[u8],
        noreplace: bool,
        now: u64,
        allow: impl FnOnce(
            &InodeMeta,
            &InodeMeta,
            &InodeMeta,
            Option<&InodeMeta>,
        ) -> std::result::Result<(), E>,
    ) -> Option<std::result::Result<(), E>> {
        if self.writable().is_err() || check_name(nname).is_err() {
            return None;
        }
        let p = self.pfs.get(label)?;
        let mut allow = Some(allow);
        for _ in 0..RELOCK_TRIES {
            let (src, dst) = {
                let mut l = Locked::take(p, &[odir, ndir])?;
                if !live_dir(l.get(odir)?) || !live_dir(l.get(ndir)?) {
                    return None;
                }
                let (_, src) = lookup(self, odir, l.get(odir)?, oname)?.ok()??;
                let dst = lookup(self, ndir, l.get(ndir)?, nname)?.ok()?;
                (src, dst.map(|(_, i)| i))
            };
            let mut inums = vec![odir, ndir, src];
            inums.extend(dst);
            let mut l = Locked::take(p, &inums)?;
            let okey = match lookup(self, odir, l.get(odir)?, oname)?.ok()? {
                Some((k, i)) if i == src => k,
                _ => continue,
            };
            let nkey = match lookup(self, ndir, l.get(ndir)?, nname)?.ok()? {
                Some((k, i)) if Some(i) == dst => Some(k),
                None if dst.is_none() => None,
                _ => continue,
            };
            let (om, nm, sm) = (l.meta(odir)?, l.meta(ndir)?, l.meta(src)?);
            let dm = match dst {
                Some(d) => Some(l.meta(d)?),
                None => None,
            };
            let is_dir = |m: &InodeMeta| m.obj_type == ObjType::Directory;
            if is_dir(&sm) || dm.as_ref().is_some_and(is_dir) {
                return None;
            }
            if let Err(e) = allow.take()?(&om, &nm, &sm, dm.as_ref()) {
                return Some(Err(e));
            }
            if dst == Some(src) {
                // Two names of one inode: nothing to do (rename(2)).
                return Some(Ok(()));
            }
            if dst.is_some() && noreplace {
                return None;
            }
            let cost = change_bytes(l.clean_count(), 2 + u64::from(dst.is_some()), 0);
            self.admit(cost, Tier::Normal).ok()?;
            let mut gone = false;
            if let (Some(d), Some(k)) = (dst, nkey) {
                if remove_entry_at(&self.vol, l.get(ndir)?, k, now).is_err() {
                    self.unadmit_bytes(cost);
                    return None;
                }
                gone = drop_link(l.get(d)?, now);
            }
            if remove_entry_at(&self.vol, l.get(odir)?, okey, now).is_err()
                || insert_entry(&self.vol, l.get(ndir)?, nname, src, sm.obj_type, now).is_err()
            {
                self.unadmit_bytes(cost);
                return None;
            }
            let s = l.get(src)?;
            s.data.meta.iparent = ndir;
            s.data.meta.ctime = now;
            s.dirty = true;
            p.depend.lock().tie(&inums);
            drop(l);
            if let (true, Some(d)) = (gone, dst) {
                self.forget_unpinned(p, d);
            }
            return Some(Ok(()));
        }
        None
    }

    /// After an operation took inode `inum`'s last link: it leaves
    /// memory (and the index at the next flush) unless pinned. The pins'
    /// lock comes first, then the inode's, whose links are counted again
    /// (a link may have named it since).
    fn forget_unpinned(&self, p: &PfsState, inum: u64) {
        let pins = p.pins.lock();
        if pins.contains_key(&inum) {
            return;
        }
        let Some(h) = p.inodes.handle(inum) else {
            return;
        };
        let mut n = h.lock();
        if n.data.meta.nlinks == 0 {
            p.forget_inode(inum, &mut n);
        }
    }
}

/// Take one link of (non-directory) inode `n`: whether it was the last.
fn drop_link(n: &mut InodeNode, now: u64) -> bool {
    let m = &mut n.data.meta;
    m.nlinks = m.nlinks.saturating_sub(1);
    m.ctime = now;
    n.dirty = true;
    m.nlinks == 0
}
