//! Which layer answers a node id: the mounted PFS's store, or, with
//! `-o snapdir`, the snapshot layer (`snapdir::SnapDir`), whose node ids
//! carry bit 63 and never meet the store's. The operations ask here
//! first, so none of them tests node ids for the snapshot namespace.
//!
//! `.snapshot` at the root is the snapshot layer's entry: a lookup of it
//! goes there, making that name fails with EEXIST (it exists), removing
//! or renaming it with EROFS, as every change in a read-only layer. A
//! link or copy_file_range between two layers is EXDEV, as between two
//! mounts.

use crate::snapdir::{self, is_snap, SnapDir};
use crate::store::{Nodes, ReadWrite, Store};
use fuser::{Errno, INodeNo};

pub struct Router {
    store: Box<dyn Store>,
    snapdir: Option<SnapDir>,
}

impl Router {
    pub fn new(store: Box<dyn Store>) -> Router {
        Router {
            store,
            snapdir: None,
        }
    }

    /// Serve the snapshots under `.snapshot` (`-o snapdir`), or not.
    pub fn set_snapdir(&mut self, snapdir: Option<SnapDir>) {
        self.snapdir = snapdir;
    }

    /// The mounted PFS's store (what belongs to the whole mount).
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The store, to set its options while the mount is built.
    pub fn store_mut(&mut self) -> &mut dyn Store {
        self.store.as_mut()
    }

    /// The snapshot layer, when it is on.
    pub fn snapdir(&self) -> Option<&SnapDir> {
        self.snapdir.as_ref()
    }

    /// The layer of node `ino`.
    pub fn route(&self, ino: u64) -> &dyn Nodes {
        match &self.snapdir {
            Some(sd) if is_snap(ino) => sd,
            _ => self.store.nodes(),
        }
    }

    /// Is `name` in `parent` the snapshot layer's `.snapshot`?
    fn is_snapdir_entry(&self, parent: u64, name: &[u8]) -> bool {
        self.snapdir.is_some() && parent == INodeNo::ROOT.0 && name == snapdir::NAME
    }

    /// The layer that answers entry `name` of directory `parent`.
    pub fn route_entry(&self, parent: u64, name: &[u8]) -> &dyn Nodes {
        match &self.snapdir {
            Some(sd) if self.is_snapdir_entry(parent, name) => sd,
            _ => self.route(parent),
        }
    }

    /// The store a change of entry `name` of directory `parent` is made
    /// in (`making`: a new name): EROFS in a read-only layer, EEXIST
    /// for making `.snapshot` at the root.
    pub fn change_entry(
        &self,
        parent: u64,
        name: &[u8],
        making: bool,
    ) -> Result<&ReadWrite, Errno> {
        let s = self.route(parent).rw()?;
        if making && self.is_snapdir_entry(parent, name) {
            return Err(Errno::EEXIST);
        }
        self.route_entry(parent, name).rw()?;
        Ok(s)
    }

    /// Nodes `a` and `b` of one operation (link, copy_file_range) in
    /// different layers: EXDEV.
    pub fn same_layer(&self, a: u64, b: u64) -> Result<(), Errno> {
        if self.snapdir.is_some() && is_snap(a) != is_snap(b) {
            return Err(Errno::EXDEV);
        }
        Ok(())
    }
}
