//! Where a damaged block's replacement comes from: the same key's block
//! in an older tree or a snapshot (DragonFly's reconstruct idea).
//!
//! Older trees are the volume header copies older than the one being
//! repaired: each is the root of a complete earlier state that shares
//! most blocks with the newest. A block is looked for at the same place:
//! the same PFS (label and cluster id), the same inode (its number and
//! birth time, so a file is never taken for another), the same blockref
//! type, key and keybits, reached through blocks whose check codes
//! verify. Snapshots are searched the same way, among the PFSs of the
//! tree being repaired and of older trees: a snapshot holds a file of
//! its origin when it holds an inode with the same number and birth
//! time (a snapshot copies its origin's inodes); for the PFS root's own
//! tree (the inode index and the root's entries), a snapshot whose root
//! has the origin's birth time (ours keep it; DragonFly's get a new
//! one, so their index blocks are not offered), and only blocks written
//! before the snapshot was taken (`pfs_lsnap_tid`).
//!
//! Candidates come newest first, never the damaged block itself; the
//! caller verifies each as it verifies the original.

use crate::chain::{read_node, DEPTH_MAX};
use crate::disk::{pfs_subtype, Blockref, BlockrefType, InodeData, Uuid, VolumeHeader};
use crate::pfs::read_inode;
use crate::volume::Volume;
use bufcache::BlockDevice;
use std::collections::HashMap;
use std::sync::Arc;

/// Where a blockref sits, as candidates are looked for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Place {
    /// The super-root's tree (PFS roots).
    SuperRoot,
    /// A PFS root's tree: the inode index and the root's entries.
    Pfs {
        label: Vec<u8>,
        clid: Uuid,
        btime: u64,
    },
    /// The tree of inode `inum` of a PFS.
    Inode {
        label: Vec<u8>,
        clid: Uuid,
        inum: u64,
        btime: u64,
    },
}

/// A PFS root of some tree.
#[derive(Clone)]
struct Root {
    label: Vec<u8>,
    clid: Uuid,
    btime: u64,
    snapshot: bool,
    lsnap: u64,
    set: Vec<Blockref>,
}

/// One tree to search.
struct Tree {
    vol: Volume,
    /// Trees older than the one repaired (false: the repaired one, used
    /// for its snapshots only).
    older: bool,
    /// The super-root's blockset and PFS roots, read on first use.
    sroot: Option<Option<Vec<Blockref>>>,
    roots: Option<Vec<Root>>,
}

pub(crate) struct Older {
    trees: Vec<Tree>,
    /// Answers already found.
    cache: HashMap<(Place, u8, u64, u8), Vec<Blockref>>,
}

/// Live entries of a set.
fn live(set: &[Blockref]) -> impl Iterator<Item = &Blockref> {
    set.iter().filter(|b| !b.is_empty())
}

/// The blockref with `want`'s type, key and keybits under `set`,
/// descending verified indirect blocks.
fn find_in(vol: &Volume, set: &[Blockref], want: &Blockref, depth: usize) -> Option<Blockref> {
    if let Some(b) =
        live(set).find(|b| b.btype == want.btype && b.key == want.key && b.keybits == want.keybits)
    {
        return Some(*b);
    }
    if depth >= DEPTH_MAX {
        return None;
    }
    let node = live(set).find(|b| {
        b.btype == BlockrefType::Indirect
            && b.key <= want.key
            && want.key_end() <= b.key_end()
            && b.keybits > want.keybits
    })?;
    let children = read_node(vol, node).ok()?;
    find_in(vol, &children, want, depth + 1)
}

impl Tree {
    fn sroot_set(&mut self) -> Option<Vec<Blockref>> {
        if self.sroot.is_none() {
            let br = self.vol.header.sroot_blockset[0];
            let set = read_inode(&self.vol, &br)
                .ok()
                .filter(|i| !i.data.meta.has_direct_data())
                .map(|i| i.data.blockset().to_vec());
            self.sroot = Some(set);
        }
        self.sroot.clone().flatten()
    }

    fn roots(&mut self) -> Vec<Root> {
        if self.roots.is_none() {
            let mut out = Vec::new();
            if let Some(set) = self.sroot_set() {
                let mut brefs = Vec::new();
                collect_leaves(&self.vol, &set, &mut brefs, 0);
                for br in brefs.iter().filter(|b| b.btype == BlockrefType::Inode) {
                    if let Ok(ino) = read_inode(&self.vol, br) {
                        let m = &ino.data.meta;
                        if m.has_direct_data() {
                            continue;
                        }
                        out.push(Root {
                            label: ino.data.name().to_vec(),
                            clid: m.pfs_clid,
                            btime: m.btime,
                            snapshot: m.pfs_subtype == pfs_subtype::SNAPSHOT,
                            lsnap: m.pfs_lsnap_tid,
                            set: ino.data.blockset().to_vec(),
                        });
                    }
                }
            }
            self.roots = Some(out);
        }
        self.roots.clone().unwrap_or_default()
    }

    /// Inode `inum` of the PFS whose root set is `set`, verified.
    fn inode(&self, set: &[Blockref], inum: u64) -> Option<InodeData> {
        let mut want = Blockref::EMPTY;
        want.btype = BlockrefType::Inode;
        want.key = inum;
        let br = find_in(&self.vol, set, &want, 0)?;
        read_inode(&self.vol, &br).ok().map(|i| i.data)
    }
}

/// Every leaf under `set` whose nodes verify (unreadable ones skipped).
fn collect_leaves(vol: &Volume, set: &[Blockref], out: &mut Vec<Blockref>, depth: usize) {
    for b in live(set) {
        if b.btype == BlockrefType::Indirect {
            if depth < DEPTH_MAX {
                if let Ok(children) = read_node(vol, b) {
                    collect_leaves(vol, &children, out, depth + 1);
                }
            }
        } else {
            out.push(*b);
        }
    }
}

impl Older {
    /// The trees of `copies` older than `base_tid` (and, for its
    /// snapshots, the one at `base_slot`).
    pub fn new(
        dev: Arc<dyn BlockDevice>,
        copies: &[(usize, VolumeHeader, bool)],
        base_slot: usize,
        base_tid: u64,
    ) -> Older {
        let mut trees: Vec<(u64, Tree)> = Vec::new();
        let base_own_tid = copies
            .iter()
            .find(|c| c.0 == base_slot)
            .map_or(base_tid, |c| c.1.mirror_tid);
        for (slot, vh, _) in copies {
            let is_base = *slot == base_slot;
            if !is_base && vh.mirror_tid >= base_own_tid {
                continue;
            }
            trees.push((
                if is_base { u64::MAX } else { vh.mirror_tid },
                Tree {
                    vol: Volume::at_header(dev.clone(), vh.clone(), *slot),
                    older: !is_base,
                    sroot: None,
                    roots: None,
                },
            ));
        }
        // The repaired tree first (its snapshots), then older, newest
        // first.
        trees.sort_by_key(|(t, _)| std::cmp::Reverse(*t));
        Older {
            trees: trees.into_iter().map(|(_, t)| t).collect(),
            cache: HashMap::new(),
        }
    }

    /// Blocks that may stand for `want` at `place`, newest first.
    pub fn candidates(&mut self, place: &Place, want: &Blockref) -> Vec<Blockref> {
        let ck = (place.clone(), want.btype.to_u8(), want.key, want.keybits);
        if let Some(v) = self.cache.get(&ck) {
            return v.clone();
        }
        let mut out: Vec<Blockref> = Vec::new();
        let push = |b: Blockref, out: &mut Vec<Blockref>| {
            if b.data_off != want.data_off
                && b.data_off.bytes() > 0
                && !out.iter().any(|o| o.data_off == b.data_off)
            {
                out.push(b);
            }
        };
        for t in &mut self.trees {
            match place {
                Place::SuperRoot => {
                    if !t.older {
                        continue;
                    }
                    if let Some(set) = t.sroot_set() {
                        if let Some(b) = find_in(&t.vol, &set, want, 0) {
                            push(b, &mut out);
                        }
                    }
                }
                Place::Pfs { label, clid, btime } => {
                    for r in t.roots() {
                        let same = r.label == *label && r.clid == *clid;
                        if same && t.older {
                            if let Some(b) = find_in(&t.vol, &r.set, want, 0) {
                                push(b, &mut out);
                            }
                        } else if !same && r.btime == *btime && (r.snapshot || t.older) {
                            // A snapshot of this PFS: only what it shared
                            // when it was taken.
                            if let Some(b) = find_in(&t.vol, &r.set, want, 0) {
                                if b.modify_tid <= r.lsnap {
                                    push(b, &mut out);
                                }
                            }
                        }
                    }
                }
                Place::Inode {
                    label,
                    clid,
                    inum,
                    btime,
                } => {
                    for r in t.roots() {
                        let same = r.label == *label && r.clid == *clid;
                        if same && !t.older {
                            continue;
                        }
                        let Some(ino) = t.inode(&r.set, *inum) else {
                            continue;
                        };
                        if ino.meta.btime != *btime || ino.meta.has_direct_data() {
                            continue;
                        }
                        let set = ino.blockset();
                        if let Some(b) = find_in(&t.vol, &set, want, 0) {
                            push(b, &mut out);
                        }
                    }
                }
            }
        }
        out.sort_by_key(|b| std::cmp::Reverse(b.modify_tid));
        self.cache.insert(ck, out.clone());
        out
    }
}
