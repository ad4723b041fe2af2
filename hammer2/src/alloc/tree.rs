//! The freemap tree held in memory: every FREEMAP_NODE and FREEMAP_LEAF
//! under the volume header's `freemap_blockset`, with each leaf's 256
//! `bmap_data` decoded.
//!
//! Shape, as DragonFly builds it (`hammer2_chain_create`,
//! `hammer2_chain_create_indirect`, `hammer2_chain_indkey_freemap`):
//! - A new leaf goes into the deepest node whose key range holds its zone
//!   (the root, keybits 64, has 4 slots; a node has 256).
//! - When that node is full, a new FREEMAP_NODE is made one level above
//!   the parent's finest children (leaves at 30 -> node at 38, 38 -> 46,
//!   46 -> 54, 54 -> 62), keyed on the lowest of those children; every
//!   child inside its range moves into it. If the new leaf's zone falls
//!   inside, the insertion continues there, else in the old parent.
//! - So leaves may sit directly in the root or in any node; the shape
//!   depends on the order zones were first used.
//!
//! Placement (`hammer2_freemap_reserve`): a freemap block never comes from
//! the freemap. A level-L block keyed K lives in the reserved segment of
//! the 1 GiB zone at K rounded down to its own range, in slot
//! `1 + 5 * set + (L - 1)`. A block written for the first time takes set
//! 0; a rewrite takes the set after the one it occupies (of 8), so the
//! copy the last durable header points at is never overwritten.

use crate::chain::decode_set;
use crate::check;
use crate::disk::freemap::BmapData;
use crate::disk::{
    check_method, comp_method, dec_check, enc_methods, Blockref, BlockrefType, DataOff,
    FREEMAP_COUNT, FREEMAP_LEVEL1_RADIX, FREEMAP_LEVEL2_RADIX, FREEMAP_LEVEL3_RADIX,
    FREEMAP_LEVEL4_RADIX, FREEMAP_LEVEL5_RADIX, FREEMAP_LEVELN_PSIZE, PBUFSIZE, SET_COUNT,
    ZONE_FREEMAP_00, ZONE_FREEMAP_END, ZONE_FREEMAP_INC, ZONE_FREEMAP_SETS, ZONE_SEG,
};
use crate::error::{Error, Result};
use crate::freemap::decode_leaf;
use crate::volume::Volume;
use std::collections::BTreeMap;

/// log2 of a freemap block's size (32 KiB).
pub const FREEMAP_BLOCK_PRADIX: u8 = 15;
const _: () = assert!(1 << FREEMAP_BLOCK_PRADIX == FREEMAP_LEVELN_PSIZE);
/// The root's index in the arena.
pub const ROOT: usize = 0;
/// Freemap levels: leaves (30) and nodes (38..62); the root is 64.
const LEVELS: [u8; 5] = [
    FREEMAP_LEVEL1_RADIX,
    FREEMAP_LEVEL2_RADIX,
    FREEMAP_LEVEL3_RADIX,
    FREEMAP_LEVEL4_RADIX,
    FREEMAP_LEVEL5_RADIX,
];
/// Methods of every freemap block: the FREEMAP check (CRC-32C), no
/// compression; DragonFly's `fchain` carries these and children inherit.
pub const FREEMAP_METHODS: u8 = enc_methods(check_method::FREEMAP, comp_method::NONE);

/// A leaf's content: the decoded entries and the bytes they came from
/// (so reserved fields survive a rewrite).
#[derive(Clone)]
pub struct LeafData {
    pub bmaps: Vec<BmapData>,
    raw: Vec<u8>,
}

impl LeafData {
    pub fn new(bmaps: Vec<BmapData>) -> LeafData {
        debug_assert_eq!(bmaps.len(), FREEMAP_COUNT);
        LeafData {
            bmaps,
            raw: vec![0; FREEMAP_LEVELN_PSIZE],
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.raw.clone();
        for (i, b) in self.bmaps.iter().enumerate() {
            b.encode_fields(&mut out[i * crate::disk::BMAP_BYTES..]);
        }
        out
    }
}

/// One freemap block (or the root) in memory.
pub struct FNode {
    /// As it stands (or will stand) in the parent. `data_off` is where
    /// the current copy lives; radix only for a block never written.
    pub bref: Blockref,
    pub parent: usize,
    /// Children, sorted by key (nodes and the root only).
    pub children: Vec<usize>,
    pub leaf: Option<Box<LeafData>>,
    /// Changed since the last flush (its own content or its child set).
    pub dirty: bool,
}

impl FNode {
    fn capacity(&self) -> usize {
        if self.bref.btype == BlockrefType::Freemap {
            SET_COUNT
        } else {
            FREEMAP_COUNT
        }
    }
    fn covers(&self, key: u64) -> bool {
        key >= self.bref.key && key <= self.bref.key_end()
    }
}

/// The in-memory freemap tree: an arena with the root at index 0.
pub struct Tree {
    pub nodes: Vec<FNode>,
    /// Leaves by the base of the zone they describe.
    pub by_zone: BTreeMap<u64, usize>,
}

fn level_index(keybits: u8) -> Option<u64> {
    LEVELS.iter().position(|&l| l == keybits).map(|p| p as u64)
}

/// `hammer2_freemap_reserve`: the `data_off` the next copy of a freemap
/// block goes to.
pub fn reserve(bref: &Blockref) -> Result<DataOff> {
    let level = level_index(bref.keybits).ok_or_else(|| {
        Error::corrupt(
            format!("freemap block with keybits {}", bref.keybits),
            bref.data_off.offset(),
        )
    })?;
    let set = match bref.data_off.offset() {
        0 => 0,
        off => (rotation_set(off)? + 1) % ZONE_FREEMAP_SETS,
    };
    let base = bref.key & !((1u64 << bref.keybits) - 1);
    let slot = ZONE_FREEMAP_00 + set * ZONE_FREEMAP_INC + level;
    Ok(DataOff::new(base + slot * PBUFSIZE, FREEMAP_BLOCK_PRADIX))
}

/// Which of the 8 rotation sets a freemap block at `off` belongs to
/// (DragonFly looks only at the offset within the 4 MiB segment).
pub fn rotation_set(off: u64) -> Result<u64> {
    let slot = (off & (ZONE_SEG - 1)) / PBUFSIZE;
    if !(ZONE_FREEMAP_00..ZONE_FREEMAP_END).contains(&slot) {
        return Err(Error::corrupt(
            format!("freemap block outside the rotation slots (slot {slot})"),
            off,
        ));
    }
    Ok((slot - ZONE_FREEMAP_00) / ZONE_FREEMAP_INC)
}

/// The bytes a freemap node holds: its children's brefs, sorted by key
/// and packed from slot 0 (DragonFly keeps them sorted; holes are
/// allowed but we make none).
pub fn encode_node(children: &[Blockref]) -> Vec<u8> {
    let mut out = vec![0u8; FREEMAP_LEVELN_PSIZE];
    for (i, br) in children.iter().enumerate() {
        br.encode_at(&mut out, i);
    }
    out
}

/// Seal a freemap bref over its block: CRC-32C in the check area, hints
/// left as they are.
pub fn seal(bref: &mut Blockref, block: &[u8]) {
    debug_assert_eq!(bref.check_method(), check_method::FREEMAP);
    check::set_check(bref, block);
}

impl Tree {
    /// A tree with nothing under the root.
    pub fn empty(freemap_tid: u64) -> Tree {
        let mut root = Blockref::EMPTY;
        root.btype = BlockrefType::Freemap;
        root.keybits = 64;
        root.methods = FREEMAP_METHODS;
        root.mirror_tid = freemap_tid;
        root.modify_tid = freemap_tid;
        Tree {
            nodes: vec![FNode {
                bref: root,
                parent: usize::MAX,
                children: Vec::new(),
                leaf: None,
                dirty: false,
            }],
            by_zone: BTreeMap::new(),
        }
    }

    /// Read the whole freemap of `vol`, verifying every check code.
    pub fn load(vol: &Volume) -> Result<Tree> {
        let mut tree = Tree::empty(vol.header.freemap_tid);
        let set = vol.header.freemap_blockset;
        tree.load_children(vol, ROOT, &set, 0)?;
        Ok(tree)
    }

    fn load_children(
        &mut self,
        vol: &Volume,
        parent: usize,
        set: &[Blockref],
        depth: usize,
    ) -> Result<()> {
        let pbref = self.nodes[parent].bref;
        let mut live: Vec<Blockref> = set.iter().filter(|b| !b.is_empty()).copied().collect();
        live.sort_by_key(|b| b.key);
        if live.len() > self.nodes[parent].capacity() {
            return Err(Error::corrupt(
                "freemap node holds too many blockrefs".into(),
                pbref.data_off.offset(),
            ));
        }
        for pair in live.windows(2) {
            if pair[0].key_end() >= pair[1].key {
                return Err(Error::corrupt(
                    format!(
                        "freemap blockrefs {:#x}/{} and {:#x}/{} overlap",
                        pair[0].key, pair[0].keybits, pair[1].key, pair[1].keybits
                    ),
                    pair[1].data_off.offset(),
                ));
            }
        }
        for br in live {
            let at = br.data_off.offset();
            let kind_ok = match br.btype {
                BlockrefType::FreemapLeaf => br.keybits == FREEMAP_LEVEL1_RADIX,
                BlockrefType::FreemapNode => {
                    level_index(br.keybits).is_some() && br.keybits != FREEMAP_LEVEL1_RADIX
                }
                _ => false,
            };
            if !kind_ok {
                return Err(Error::corrupt(
                    format!(
                        "{} blockref with keybits {} in the freemap",
                        br.btype.name(),
                        br.keybits
                    ),
                    at,
                ));
            }
            if br.key & ((1u64 << br.keybits) - 1) != 0
                || br.keybits >= pbref.keybits
                || !self.nodes[parent].covers(br.key)
                || br.key_end() > pbref.key_end()
            {
                return Err(Error::corrupt(
                    format!(
                        "freemap blockref {:#x}/{} does not fit in {:#x}/{}",
                        br.key, br.keybits, pbref.key, pbref.keybits
                    ),
                    at,
                ));
            }
            if br.data_off.radix() != FREEMAP_BLOCK_PRADIX {
                return Err(Error::corrupt(
                    format!("freemap block of radix {}", br.data_off.radix()),
                    at,
                ));
            }
            rotation_set(at)?;
            let buf = vol.read_physical(&br)?;
            let idx = self.nodes.len();
            self.nodes.push(FNode {
                bref: br,
                parent,
                children: Vec::new(),
                leaf: None,
                dirty: false,
            });
            self.nodes[parent].children.push(idx);
            if br.btype == BlockrefType::FreemapLeaf {
                let leaf = decode_leaf(&br, &buf)?;
                self.nodes[idx].leaf = Some(Box::new(LeafData {
                    bmaps: leaf.bmaps,
                    raw: buf,
                }));
                self.by_zone.insert(br.key, idx);
            } else if depth + 1 < LEVELS.len() {
                let children = decode_set(&buf);
                self.load_children(vol, idx, &children, depth + 1)?;
            } else {
                return Err(Error::corrupt("freemap deeper than 5 levels".into(), at));
            }
        }
        Ok(())
    }

    /// The deepest node whose range holds `key`.
    fn deepest_cover(&self, key: u64) -> usize {
        let mut p = ROOT;
        'down: loop {
            for &c in &self.nodes[p].children {
                let n = &self.nodes[c];
                if n.bref.btype == BlockrefType::FreemapNode && n.covers(key) {
                    p = c;
                    continue 'down;
                }
            }
            return p;
        }
    }

    fn insert_child(&mut self, parent: usize, child: usize) {
        let key = self.nodes[child].bref.key;
        let pos = self.nodes[parent]
            .children
            .partition_point(|&c| self.nodes[c].bref.key < key);
        self.nodes[parent].children.insert(pos, child);
        self.nodes[child].parent = parent;
        self.nodes[parent].dirty = true;
    }

    /// Add a leaf for the zone at `zone` holding `bmaps`, whose bref
    /// carries the `avail` hint given (`bigmask` all ones), making nodes as
    /// DragonFly would. Returns its index.
    pub fn insert_leaf(&mut self, zone: u64, data: LeafData, avail: u64) -> Result<usize> {
        debug_assert!(!self.by_zone.contains_key(&zone));
        let mut parent = self.deepest_cover(zone);
        while self.nodes[parent].children.len() >= self.nodes[parent].capacity() {
            parent = self.create_indirect(parent, zone)?;
        }
        let mut bref = Blockref::EMPTY;
        bref.btype = BlockrefType::FreemapLeaf;
        bref.methods = FREEMAP_METHODS;
        bref.key = zone;
        bref.keybits = FREEMAP_LEVEL1_RADIX;
        bref.data_off = DataOff(FREEMAP_BLOCK_PRADIX as u64);
        bref.set_freemap_hints(u32::MAX, avail);
        let idx = self.nodes.len();
        self.nodes.push(FNode {
            bref,
            parent,
            children: Vec::new(),
            leaf: Some(Box::new(data)),
            dirty: true,
        });
        self.insert_child(parent, idx);
        self.by_zone.insert(zone, idx);
        Ok(idx)
    }

    /// `hammer2_chain_create_indirect` for the freemap: make room in the
    /// full node `parent`; returns where an insertion of `key` goes on.
    fn create_indirect(&mut self, parent: usize, key: u64) -> Result<usize> {
        let pbref = self.nodes[parent].bref;
        let (low_key, low_bits) = self.nodes[parent]
            .children
            .iter()
            .map(|&c| (self.nodes[c].bref.key, self.nodes[c].bref.keybits))
            .min_by_key(|&(k, b)| (b, k))
            .ok_or_else(|| Error::corrupt("empty full freemap node".into(), 0))?;
        let level = level_index(low_bits).unwrap_or(LEVELS.len() as u64) as usize;
        let Some(&keybits) = LEVELS.get(level + 1) else {
            return Err(Error::corrupt(
                "freemap would need a level above 5".into(),
                pbref.data_off.offset(),
            ));
        };
        let nkey = low_key & !((1u64 << keybits) - 1);
        let mut bref = Blockref::EMPTY;
        bref.btype = BlockrefType::FreemapNode;
        bref.methods = enc_methods(dec_check(pbref.methods), comp_method::NONE);
        bref.key = nkey;
        bref.keybits = keybits;
        bref.data_off = DataOff(FREEMAP_BLOCK_PRADIX as u64);
        let idx = self.nodes.len();
        self.nodes.push(FNode {
            bref,
            parent,
            children: Vec::new(),
            leaf: None,
            dirty: true,
        });
        let (moved, kept): (Vec<usize>, Vec<usize>) = self.nodes[parent]
            .children
            .iter()
            .partition(|&&c| (self.nodes[c].bref.key ^ nkey) >> keybits == 0);
        for &c in &moved {
            // Siblings never overlap, so nothing coarser lies inside.
            assert!(self.nodes[c].bref.keybits < keybits);
            self.nodes[c].parent = idx;
        }
        self.nodes[idx].children = moved;
        self.nodes[parent].children = kept;
        self.insert_child(parent, idx);
        Ok(if (key ^ nkey) >> keybits == 0 {
            idx
        } else {
            parent
        })
    }

    /// Mark a node changed; the flush rewrites it and its ancestors.
    pub fn touch(&mut self, idx: usize) {
        self.nodes[idx].dirty = true;
    }

    pub fn leaf(&self, zone: u64) -> Option<&LeafData> {
        self.by_zone
            .get(&zone)
            .and_then(|&i| self.nodes[i].leaf.as_deref())
    }

    pub fn is_dirty(&self) -> bool {
        self.nodes.iter().any(|n| n.dirty)
    }

    /// The root's children as the volume header's `freemap_blockset`.
    pub fn blockset(&self) -> [Blockref; SET_COUNT] {
        let mut set = [Blockref::EMPTY; SET_COUNT];
        for (slot, &c) in set.iter_mut().zip(&self.nodes[ROOT].children) {
            *slot = self.nodes[c].bref;
        }
        set
    }

    /// Every freemap block a flush must write, children before parents,
    /// as (index, new bref, bytes). Nothing in the tree changes; `commit`
    /// applies the result once every write has landed.
    pub fn plan_flush(&self, mirror_tid: u64) -> Result<Vec<(usize, Blockref, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut new_brefs: BTreeMap<usize, Blockref> = BTreeMap::new();
        self.plan(ROOT, mirror_tid, &mut out, &mut new_brefs)?;
        Ok(out)
    }

    fn plan(
        &self,
        idx: usize,
        mirror_tid: u64,
        out: &mut Vec<(usize, Blockref, Vec<u8>)>,
        new_brefs: &mut BTreeMap<usize, Blockref>,
    ) -> Result<bool> {
        let node = &self.nodes[idx];
        let mut rewrite = node.dirty;
        for &c in &node.children {
            rewrite |= self.plan(c, mirror_tid, out, new_brefs)?;
        }
        if !rewrite || idx == ROOT {
            return Ok(rewrite);
        }
        let block = match &node.leaf {
            Some(leaf) => leaf.encode(),
            None => {
                let children: Vec<Blockref> = node
                    .children
                    .iter()
                    .map(|c| new_brefs.get(c).copied().unwrap_or(self.nodes[*c].bref))
                    .collect();
                encode_node(&children)
            }
        };
        let mut bref = node.bref;
        bref.data_off = reserve(&node.bref)?;
        bref.mirror_tid = mirror_tid;
        bref.modify_tid = mirror_tid;
        seal(&mut bref, &block);
        new_brefs.insert(idx, bref);
        out.push((idx, bref, block));
        Ok(true)
    }

    /// Apply a flush whose writes all landed.
    pub fn commit(&mut self, written: &[(usize, Blockref, Vec<u8>)], mirror_tid: u64) {
        for (idx, bref, _) in written {
            self.nodes[*idx].bref = *bref;
        }
        for n in &mut self.nodes {
            n.dirty = false;
        }
        self.nodes[ROOT].bref.mirror_tid = mirror_tid;
        self.nodes[ROOT].bref.modify_tid = mirror_tid;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn leaf() -> LeafData {
        LeafData::new(vec![BmapData::default(); FREEMAP_COUNT])
    }

    fn shape(t: &Tree, idx: usize) -> String {
        let n = &t.nodes[idx];
        let inner: Vec<String> = n.children.iter().map(|&c| shape(t, c)).collect();
        let me = if n.bref.btype == BlockrefType::FreemapLeaf {
            format!("{}G", n.bref.key / G)
        } else {
            format!("{}@{}G", n.bref.keybits, n.bref.key / G)
        };
        if inner.is_empty() {
            me
        } else {
            format!("{me}[{}]", inner.join(" "))
        }
    }

    #[test]
    fn nodes_grow_like_dragonfly() {
        let mut t = Tree::empty(1);
        for z in 0..4 {
            t.insert_leaf(z * G, leaf(), 0).unwrap();
        }
        assert_eq!(shape(&t, ROOT), "64@0G[0G 1G 2G 3G]");
        t.insert_leaf(4 * G, leaf(), 0).unwrap();
        assert_eq!(shape(&t, ROOT), "64@0G[38@0G[0G 1G 2G 3G 4G]]");
        for z in [256, 257, 258] {
            t.insert_leaf(z * G, leaf(), 0).unwrap();
        }
        assert_eq!(
            shape(&t, ROOT),
            "64@0G[38@0G[0G 1G 2G 3G 4G] 256G 257G 258G]"
        );
        t.insert_leaf(259 * G, leaf(), 0).unwrap();
        assert_eq!(
            shape(&t, ROOT),
            "64@0G[38@0G[0G 1G 2G 3G 4G] 38@256G[256G 257G 258G 259G]]"
        );
        for z in [512, 768] {
            t.insert_leaf(z * G, leaf(), 0).unwrap();
        }
        assert_eq!(
            shape(&t, ROOT),
            "64@0G[38@0G[0G 1G 2G 3G 4G] 38@256G[256G 257G 258G 259G] 512G 768G]"
        );
        // The root is full: the finest children (the leaves) get a level-2
        // node each, one per round, and once the root holds four level-2
        // nodes they go under a level-3 node, which takes the new leaf
        // directly (a leaf under a level-3 node is legal).
        t.insert_leaf(1024 * G, leaf(), 0).unwrap();
        assert_eq!(
            shape(&t, ROOT),
            "64@0G[46@0G[38@0G[0G 1G 2G 3G 4G] 38@256G[256G 257G 258G 259G] \
             38@512G[512G] 38@768G[768G] 1024G]]"
        );
        assert_eq!(t.by_zone.len(), 12);
    }

    #[test]
    fn rotation_walks_the_eight_sets() {
        let mut br = Blockref::EMPTY;
        br.btype = BlockrefType::FreemapLeaf;
        br.key = 3 * G;
        br.keybits = FREEMAP_LEVEL1_RADIX;
        br.data_off = DataOff(15);
        let mut seen = Vec::new();
        for _ in 0..9 {
            br.data_off = reserve(&br).unwrap();
            seen.push((br.data_off.offset() - 3 * G) / PBUFSIZE);
        }
        assert_eq!(seen, [1, 6, 11, 16, 21, 26, 31, 36, 1]);
        br.btype = BlockrefType::FreemapNode;
        br.keybits = FREEMAP_LEVEL2_RADIX;
        br.key = 256 * G;
        br.data_off = DataOff(15);
        assert_eq!(reserve(&br).unwrap().offset(), 256 * G + 2 * PBUFSIZE);
    }
}
