//! The stores the FUSE operations run on, behind one trait, so that
//! `vnops` says what an operation does once for a read-only and a
//! read-write mount:
//!
//! - `ReadOnly` (`readonly.rs`): `hammer2::Pfs`, the lock-free read view
//!   over an `Arc<Volume>`; decoded inodes cached in the `InodeTable`
//!   for the nodes the kernel holds.
//! - `ReadWrite` (`readwrite.rs`): the one `hammer2::mount::Mount` of
//!   the image behind `RwVolume`'s mutex, taken for one library call (or
//!   one `Tx`) per request.
//!
//! `Nodes` is what is asked of a node id (its attributes, lookups,
//! reads, listings); `Store` adds what belongs to the whole mount
//! (statfs, sync, the end of the mount, the control channel's views).
//! Changes start at `Nodes::rw`: the read-write store hands out itself,
//! whose `change` runs a `Tx` (the mount locked, node ids mapped to
//! inode numbers, library errors mapped to errnos through `errno`); a
//! read-only store answers EROFS there, the one place it is said.
//!
//! Permission checks are the caller's (`perm`): the operations that
//! check inside one hold of the store (lookup's search permission,
//! open's mode) take them as a `Check`.
//!
//! Which layer answers a node id is `route`'s to say: the store, or the
//! snapshot layer (`snapdir::SnapDir`, which implements `Nodes` too).

pub mod readonly;
pub mod readwrite;

pub use readonly::ReadOnly;
pub use readwrite::{ReadWrite, Tx};

use crate::errno::ErrorCount;
use crate::inode::{attr_of, Ids};
use crate::snapdir;
use fuser::{Errno, FileAttr, INodeNo};
use hammer2::disk::{Blockref, InodeMeta, ObjType};
use hammer2::{DirEntry, Inode};
use std::sync::Arc;
use std::time::Duration;

/// A permission check on an inode's meta, for `mask` (R=4, W=2, X=1).
pub type Check<'a> = &'a dyn Fn(&InodeMeta, u32) -> Result<(), Errno>;

/// A node found (lookup, readdirplus): its attributes and, read-only,
/// its decoded inode for the `InodeTable`.
pub struct Entry {
    pub attr: FileAttr,
    pub inode: Option<Arc<Inode>>,
}

/// What statfs reports, in bytes and inodes.
pub struct Space {
    pub total: u64,
    pub free: u64,
    pub avail: u64,
    pub inodes: u64,
}

/// What is asked of a node id.
pub trait Nodes: Send + Sync {
    /// The read-write store, where every change starts; EROFS from
    /// anything read-only.
    fn rw(&self) -> Result<&ReadWrite, Errno>;

    /// How long the kernel may trust a name this layer answers (a
    /// lookup's, or a new node's); `ttl`, the mount's time for
    /// attributes, unless the layer knows better.
    fn entry_ttl(&self, ttl: Duration) -> Duration {
        ttl
    }

    /// Node `ino`'s meta.
    fn meta(&self, ino: u64) -> Result<InodeMeta, Errno>;

    /// Node `ino`'s meta and the bytes its blocks take on disk
    /// (`st_blocks`).
    fn stat(&self, ino: u64) -> Result<(InodeMeta, u64), Errno>;

    /// Node `ino`'s attributes from its meta `m` and `bytes`, a
    /// directory's link count counted (see `dirlinks`).
    fn attr(&self, ino: u64, m: &InodeMeta, bytes: u64) -> Result<FileAttr, Errno>;

    /// Entry `name` of directory `parent`, after `search` (mask 1) on
    /// the directory.
    fn lookup(&self, parent: u64, name: &[u8], search: Check) -> Result<Entry, Errno>;

    /// The node id of directory `dir`'s parent (".."), `meta` its meta.
    fn parent(&self, dir: u64, meta: &InodeMeta) -> Result<u64, Errno>;

    fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno>;

    /// Open non-directory `ino` after `may` on its meta (for the open's
    /// access mode; `reads` when it reads): pinned, read-write. True
    /// when its reads must reach the daemon (they update the access
    /// time, see `atime`).
    fn open(
        &self,
        ino: u64,
        reads: bool,
        may: &dyn Fn(&InodeMeta) -> Result<(), Errno>,
    ) -> Result<bool, Errno>;

    /// An open directory: pinned, read-write.
    fn pin(&self, ino: u64) -> Result<(), Errno>;

    /// The last release of an open: unpinned, read-write.
    fn unpin(&self, ino: u64);

    fn read(&self, ino: u64, offset: u64, len: usize) -> Result<Vec<u8>, Errno>;

    /// SEEK_DATA (`data`) or SEEK_HOLE from `offset`: `None` at or past
    /// the end, and for SEEK_DATA with only holes after.
    fn seek(&self, ino: u64, offset: u64, data: bool) -> Result<Option<u64>, Errno>;

    /// The entries of directory `ino` with key at least `from`, in key
    /// order, each `inum` the entry's node id.
    fn list(&self, ino: u64, from: u64) -> Result<Vec<DirEntry>, Errno>;

    /// Directory `ino` was listed from its start (its access time).
    fn listed(&self, ino: u64);

    /// The entries (`None` for one whose inode cannot be read) of
    /// `entries` (from `list`), read together: at most `attr_batch` at
    /// once.
    fn entry_attrs(&self, entries: &[DirEntry]) -> Vec<Option<Entry>>;

    /// How many entries `entry_attrs` reads in one go.
    fn attr_batch(&self) -> usize;
}

/// A PFS store: its nodes and what belongs to the whole mount.
pub trait Store: Nodes {
    /// These nodes, as `Nodes`.
    fn nodes(&self) -> &dyn Nodes;

    /// The read-write store, for its options while the mount is built.
    fn rw_mut(&mut self) -> Option<&mut ReadWrite>;

    /// The longest name a lookup accepts.
    fn name_max(&self) -> usize;

    /// How long the kernel may trust names and attributes.
    fn ttl(&self) -> Duration;

    fn statfs(&self) -> Result<Space, Errno>;

    /// syncfs: a flush that started after the call.
    fn sync(&self) -> Result<(), Errno>;

    /// fsync, fdatasync and fsyncdir of node `ino`: its changes and
    /// those they depend on are on disk when this returns.
    fn fsync(&self, ino: u64) -> Result<(), Errno> {
        let _ = ino;
        self.sync()
    }

    /// close(2): EIO once a flush has failed, nothing else.
    fn healthy(&self) -> Result<(), Errno>;

    /// FUSE_DESTROY: the last flush written and the image let go.
    fn unmount(&self);

    /// The volume as the snapshot layer (`-o snapdir`) sees it.
    fn snap_origin(&self) -> Arc<dyn snapdir::Origin>;

    /// Whether the PFS root has a real entry named `.snapshot`.
    fn has_real_snapdir(&self) -> hammer2::Result<bool>;

    /// Every PFS of the volume (the control channel's list).
    fn pfs_list(&self) -> hammer2::Result<Vec<hammer2::pfs::PfsInfo>>;

    /// Inode `inum`'s meta, the blockref it was last flushed through and
    /// its file data waiting for a flush (`hammer2 stat`).
    fn inode_state(&self, inum: u64) -> hammer2::Result<(InodeMeta, Blockref, u64)>;
}

/// Node `ino`'s attributes from its inode, the link count of a
/// directory aside; an object type no file has is damage (EIO).
pub(crate) fn attr_of_meta(
    errors: &ErrorCount,
    ino: u64,
    m: &InodeMeta,
    bytes: u64,
) -> Result<FileAttr, Errno> {
    attr_of(ino, m, bytes).ok_or_else(|| {
        errors.fail(&hammer2::Error::corrupt(
            format!("inode {} has object type {}", m.inum, m.obj_type.name()),
            0,
        ))
    })
}

/// How many of a directory's entries are directories.
pub(crate) fn subdirs(entries: &[DirEntry]) -> u32 {
    let n = entries
        .iter()
        .filter(|e| e.obj_type == ObjType::Directory)
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The node id of a directory's parent ("..").
pub(crate) fn parent_ino(ids: &Ids, dir: &InodeMeta) -> u64 {
    let p = dir.iparent;
    if dir.inum == ids.root_inum || p == 0 {
        INodeNo::ROOT.0
    } else {
        ids.ino(p)
    }
}
