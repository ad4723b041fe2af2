//! Dependency groups (DragonFly's `hammer2_depend`): which inodes of a
//! PFS must reach the disk together. Every operation that changes more
//! than one inode ties them: a new inode and its directory, a link and
//! its directory, an unlinked inode and its directory, a rename's two
//! directories with the moved and the replaced inode. Groups merge
//! transitively until committed. A partial commit (`Mount::fsync`)
//! writes whole groups, so after any crash every operation is on disk
//! wholly or not at all; a volume-wide flush commits every group.
//!
//! An inode no operation tied to another is a group of its own (a write,
//! a setattr). The PFS root is special: it holds the inode index every
//! commit rewrites, so its group goes with every partial commit of its
//! PFS (see `Mount::commit_closure`).

use std::collections::{BTreeSet, HashMap};

/// The groups of one PFS, by inode number.
#[derive(Debug, Default)]
pub(crate) struct Depend {
    /// Inode to group id.
    group: HashMap<u64, u64>,
    /// Group id to its members (two or more).
    members: HashMap<u64, Vec<u64>>,
    next: u64,
}

impl Depend {
    /// Tie `inums` into one group, merging the groups they are in.
    pub(crate) fn tie(&mut self, inums: &[u64]) {
        let mut ids: Vec<u64> = inums
            .iter()
            .filter_map(|i| self.group.get(i).copied())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        // The largest group absorbs the others.
        let target = ids
            .iter()
            .copied()
            .max_by_key(|g| self.members.get(g).map_or(0, Vec::len));
        let target = match target {
            Some(t) => t,
            None => {
                self.next += 1;
                self.members.insert(self.next, Vec::new());
                self.next
            }
        };
        for g in ids.into_iter().filter(|&g| g != target) {
            for m in self.members.remove(&g).unwrap_or_default() {
                self.group.insert(m, target);
                self.members.entry(target).or_default().push(m);
            }
        }
        for &i in inums {
            if self.group.insert(i, target).is_none() {
                self.members.entry(target).or_default().push(i);
            }
        }
    }

    /// Add the members of `inum`'s group (or `inum` alone) to `out`.
    pub(crate) fn closure_into(&self, inum: u64, out: &mut BTreeSet<u64>) {
        out.insert(inum);
        if let Some(m) = self.group.get(&inum).and_then(|g| self.members.get(g)) {
            out.extend(m.iter().copied());
        }
    }

    /// The groups of `inums` are committed: they dissolve.
    pub(crate) fn committed(&mut self, inums: &BTreeSet<u64>) {
        for i in inums {
            if let Some(g) = self.group.remove(i) {
                if let Some(m) = self.members.remove(&g) {
                    for x in m {
                        self.group.remove(&x);
                    }
                }
            }
        }
    }

    /// Everything is committed (a volume-wide flush).
    pub(crate) fn clear(&mut self) {
        self.group.clear();
        self.members.clear();
    }

    /// Inodes in groups.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.group.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closure(d: &Depend, i: u64) -> Vec<u64> {
        let mut s = BTreeSet::new();
        d.closure_into(i, &mut s);
        s.into_iter().collect()
    }

    #[test]
    fn ties_merge_transitively_and_dissolve_whole() {
        let mut d = Depend::default();
        assert_eq!(closure(&d, 7), vec![7]);
        d.tie(&[1, 10]);
        d.tie(&[20, 21]);
        d.tie(&[30]);
        assert_eq!(closure(&d, 10), vec![1, 10]);
        assert_eq!(closure(&d, 21), vec![20, 21]);
        // A rename from 10's group into 20's joins them.
        d.tie(&[10, 20, 40]);
        assert_eq!(closure(&d, 1), vec![1, 10, 20, 21, 40]);
        assert_eq!(closure(&d, 30), vec![30]);
        let mut c = BTreeSet::new();
        d.closure_into(21, &mut c);
        d.committed(&c);
        assert_eq!(closure(&d, 1), vec![1]);
        assert_eq!(closure(&d, 30), vec![30]);
        assert_eq!(d.len(), 1);
        d.clear();
        assert_eq!(d.len(), 0);
    }
}
