//! POSIX link counts for directories, as the mount reports them.
//!
//! HAMMER2 keeps `nlinks` 1 on every directory (DragonFly does, and so
//! does the write path here: on disk it stays that way). POSIX and
//! Linux tools (`find`'s leaf optimisation, `rename` tests) expect a
//! directory to have 2 + its number of subdirectories: its name, its
//! ".", and each subdirectory's "..". The mount reports that count: it
//! is computed from a directory's entries the first time its
//! attributes are asked for, then kept current by the operations that
//! change it (mkdir and rmdir adjust the parent; a rename that moves a
//! directory forgets both parents' counts, which are recounted on the
//! next stat). Read-write, every count is changed with the mount lock
//! exclusive and read with it held, and nothing that runs with it
//! shared makes, removes or moves a directory, so a count and the
//! directory it describes agree.

use std::collections::HashMap;
use std::sync::Mutex;

/// Subdirectory counts by inode number, for the directories whose
/// attributes have been asked for.
#[derive(Default)]
pub struct DirLinks {
    subdirs: Mutex<HashMap<u64, u32>>,
}

impl DirLinks {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u32>> {
        self.subdirs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The link count of directory `inum`: 2 + its subdirectories,
    /// counted by `count` if not known yet.
    pub fn nlink<E>(&self, inum: u64, count: impl FnOnce() -> Result<u32, E>) -> Result<u32, E> {
        if let Some(n) = self.map().get(&inum) {
            return Ok(n.saturating_add(2));
        }
        let n = count()?;
        self.map().insert(inum, n);
        Ok(n.saturating_add(2))
    }

    /// A subdirectory was made in `inum`.
    pub fn added(&self, inum: u64) {
        if let Some(n) = self.map().get_mut(&inum) {
            *n = n.saturating_add(1);
        }
    }

    /// A subdirectory of `inum` was removed.
    pub fn removed(&self, inum: u64) {
        if let Some(n) = self.map().get_mut(&inum) {
            *n = n.saturating_sub(1);
        }
    }

    /// Forget `inum`'s count (it is recounted when next asked for).
    pub fn forget(&self, inum: u64) {
        self.map().remove(&inum);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_once_then_follows_changes() {
        let l = DirLinks::default();
        let mut calls = 0;
        let mut count = |n| {
            calls += 1;
            Ok::<u32, ()>(n)
        };
        assert_eq!(l.nlink(7, || count(3)), Ok(5));
        assert_eq!(l.nlink(7, || count(99)), Ok(5));
        l.added(7);
        l.added(8); // not counted yet: nothing to follow
        assert_eq!(l.nlink(7, || count(99)), Ok(6));
        l.removed(7);
        l.removed(7);
        assert_eq!(l.nlink(7, || count(99)), Ok(4));
        l.forget(7);
        assert_eq!(l.nlink(7, || count(0)), Ok(2));
        assert_eq!(l.nlink(8, || count(1)), Ok(3));
        assert_eq!(l.nlink(9, || Err::<u32, ()>(())), Err(()));
        assert_eq!(l.nlink(9, || count(0)), Ok(2));
        assert_eq!(calls, 4);
    }
}
