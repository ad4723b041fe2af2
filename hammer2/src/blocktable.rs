//! The write side of a blockref tree: one blockref array (an inode's
//! blockset, or an indirect block) with the indirect blocks below it that
//! have been loaded, modified in memory and written copy-on-write at flush.
//!
//! Insertion follows DragonFly's `hammer2_chain_create`: descend into the
//! indirect block whose key range covers the key; at the deepest array,
//! if it is full, create an indirect block the way
//! `hammer2_chain_create_indirect` does (key and keybits chosen by
//! `indkey_file` for file data, `indkey_dir` for hashed directory keys and
//! the inode index; 4 KiB under a directory inode, 16 KiB elsewhere),
//! move the entries its range covers into it, and try again. Deletion
//! removes empty indirect blocks and pulls the entries of a sparse one
//! back into its parent as `hammer2_chain_indirect_maintenance` does.
//! So DragonFly can go on working on any tree this module leaves.
//!
//! Nothing here allocates or writes: `flush` hands each modified indirect
//! block to a `BlockSink`, bottom-up, and puts the blockref it gets back in
//! place of the old one.
//!
//! Every blockref that leaves the tree (a leaf replaced or deleted, an
//! indirect block rewritten by `flush` or removed by deletion) is kept in
//! the table's drop list (`take_dropped`): the blocks the last durable
//! tree may still reference and this one no longer does, which the flush
//! hands to the allocator for freeing once no volume header on the media
//! references them (see `alloc.rs`, "Freeing at flush time").

use crate::disk::{
    Blockref, BlockrefType, DataOff, BLOCKREF_BYTES, BLOCKREF_LEAF_MAX, IND_BYTES_MIN,
    IND_BYTES_NOM,
};
use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// Which DragonFly key-selection rule applies to a tree's indirect blocks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TreeKind {
    /// File data keyed by offset (`indkey_file`), 16 KiB indirect blocks.
    File,
    /// Directory entries, the inode index, the super-root: hashed or
    /// sparse keys (`indkey_dir`); 4 KiB indirect blocks directly under
    /// a directory inode, 16 KiB elsewhere.
    Directory,
}

/// Reads the blockref array an indirect blockref points to.
pub trait BlockSource {
    fn read_set(&self, br: &Blockref) -> Result<Vec<Blockref>>;
}

impl BlockSource for crate::volume::Volume {
    fn read_set(&self, br: &Blockref) -> Result<Vec<Blockref>> {
        crate::chain::read_node(self, br)
    }
}

/// Writes a modified indirect block: allocate, encode `entries`, compute
/// the check code, and return the new blockref (the caller's `template`
/// with data_off, check and tids filled in).
pub trait BlockSink {
    fn write_indirect(&mut self, template: &Blockref, entries: &[Blockref]) -> Result<Blockref>;
}

/// Embedded statistics a blockref array adds up to, as DragonFly's
/// `hammer2_base_insert` keeps them in the parent's blockref.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct SetStats {
    pub data_count: u64,
    pub inode_count: u64,
    /// Unsaturated; see `leaf_count_saturated`.
    pub leaf_count: u64,
}

impl SetStats {
    pub fn of(entries: &[Blockref]) -> SetStats {
        let mut s = SetStats::default();
        for br in entries.iter().filter(|b| !b.is_empty()) {
            s.add_child(br);
        }
        s
    }

    pub fn add_child(&mut self, br: &Blockref) {
        self.data_count = self.data_count.wrapping_add(br.data_off.bytes());
        match br.btype {
            BlockrefType::Inode => {
                self.inode_count = self.inode_count.wrapping_add(1 + br.inode_count());
                self.data_count = self.data_count.wrapping_add(br.data_count());
                self.leaf_count += 1;
            }
            BlockrefType::Indirect => {
                self.inode_count = self.inode_count.wrapping_add(br.inode_count());
                self.data_count = self.data_count.wrapping_add(br.data_count());
                self.leaf_count += br.leaf_count as u64;
            }
            BlockrefType::Data | BlockrefType::Dirent => {
                self.leaf_count += 1 + br.leaf_count as u64
            }
            _ => {}
        }
    }

    pub fn leaf_count_saturated(&self) -> u16 {
        self.leaf_count.min(BLOCKREF_LEAF_MAX as u64) as u16
    }

    /// Store these statistics in a parent blockref.
    pub fn apply(&self, br: &mut Blockref) {
        br.set_stats(self.data_count, self.inode_count);
        br.leaf_count = self.leaf_count_saturated();
    }
}

/// A loaded indirect block.
#[derive(Clone, Debug)]
struct Indirect {
    bref: Blockref,
    table: BlockTable,
}

/// A blockref array and the loaded indirect blocks under it.
#[derive(Clone, Debug)]
pub struct BlockTable {
    entries: Vec<Blockref>,
    /// Loaded indirect children, by their key.
    children: BTreeMap<u64, Indirect>,
    dirty: bool,
    /// Blockrefs with a block on the media that left the tree (kept only
    /// at the top level; the recursion hands them up).
    dropped: Vec<Blockref>,
}

/// Record `br` as dropped from the tree when it points at a block (a
/// dirent with an embedded name, or an indirect block never written,
/// has none).
fn note_drop(dropped: &mut Vec<Blockref>, br: Blockref) {
    if !br.is_empty() && br.data_off.radix() != 0 && br.data_off.offset() != 0 {
        dropped.push(br);
    }
}

/// Deepest tree the insert path will build (a 64-bit key space needs
/// fewer than 12 levels even with 4-entry sets).
const DEPTH_MAX: usize = 32;

impl BlockTable {
    /// A table over `entries` (its length is the capacity).
    pub fn new(entries: Vec<Blockref>) -> BlockTable {
        BlockTable {
            entries,
            children: BTreeMap::new(),
            dirty: false,
            dropped: Vec::new(),
        }
    }

    /// Blockrefs dropped from the tree since the last call (see the
    /// module header), emptying the list.
    pub fn take_dropped(&mut self) -> Vec<Blockref> {
        std::mem::take(&mut self.dropped)
    }

    pub fn entries(&self) -> &[Blockref] {
        &self.entries
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    fn live(&self) -> usize {
        self.entries.iter().filter(|b| !b.is_empty()).count()
    }

    fn slot_of(&self, pred: impl Fn(&Blockref) -> bool) -> Option<usize> {
        self.entries.iter().position(|b| !b.is_empty() && pred(b))
    }

    /// The indirect entry whose range covers `key`.
    fn covering_indirect(&self, key: u64) -> Option<usize> {
        self.slot_of(|b| b.btype == BlockrefType::Indirect && b.key <= key && key <= b.key_end())
    }

    fn load<'a>(&'a mut self, src: &dyn BlockSource, slot: usize) -> Result<&'a mut Indirect> {
        let br = self.entries[slot];
        match self.children.entry(br.key) {
            std::collections::btree_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::btree_map::Entry::Vacant(e) => {
                let set = src.read_set(&br)?;
                Ok(e.insert(Indirect {
                    bref: br,
                    table: BlockTable::new(set),
                }))
            }
        }
    }

    /// The leaf blockref at exactly `key`, if any.
    pub fn lookup(&mut self, src: &dyn BlockSource, key: u64) -> Result<Option<Blockref>> {
        self.lookup_depth(src, key, 0)
    }

    fn lookup_depth(
        &mut self,
        src: &dyn BlockSource,
        key: u64,
        depth: usize,
    ) -> Result<Option<Blockref>> {
        if let Some(slot) = self.slot_of(|b| b.btype != BlockrefType::Indirect && b.key == key) {
            return Ok(Some(self.entries[slot]));
        }
        match self.covering_indirect(key) {
            Some(slot) if depth < DEPTH_MAX => {
                self.load(src, slot)?
                    .table
                    .lookup_depth(src, key, depth + 1)
            }
            Some(slot) => Err(Error::corrupt(
                "indirect blocks nested too deep".into(),
                self.entries[slot].data_off.offset(),
            )),
            None => Ok(None),
        }
    }

    /// Every leaf with key in `[beg, end]`, in key order.
    pub fn range(&mut self, src: &dyn BlockSource, beg: u64, end: u64) -> Result<Vec<Blockref>> {
        let mut out = Vec::new();
        self.range_into(src, beg, end, &mut out, 0)?;
        out.sort_by_key(|b| b.key);
        Ok(out)
    }

    /// Every leaf in memory: the entries of this array and of the loaded
    /// indirect blocks under it (those not loaded hold what the last
    /// commit left on the media).
    pub fn loaded_leaves(&self) -> Vec<Blockref> {
        let mut out = Vec::new();
        self.loaded_leaves_into(&mut out);
        out
    }

    fn loaded_leaves_into(&self, out: &mut Vec<Blockref>) {
        for br in &self.entries {
            if br.is_empty() {
                continue;
            }
            if br.btype == BlockrefType::Indirect {
                if let Some(c) = self.children.get(&br.key) {
                    c.table.loaded_leaves_into(out);
                }
            } else {
                out.push(*br);
            }
        }
    }

    /// `range` from what is in memory alone: `None` when an indirect
    /// block over the range is not loaded (for read-ahead, which reads
    /// nothing to decide what to read).
    pub fn range_loaded(&self, beg: u64, end: u64) -> Option<Vec<Blockref>> {
        let mut out = Vec::new();
        self.range_loaded_into(beg, end, &mut out, 0)?;
        out.sort_by_key(|b| b.key);
        Some(out)
    }

    fn range_loaded_into(
        &self,
        beg: u64,
        end: u64,
        out: &mut Vec<Blockref>,
        depth: usize,
    ) -> Option<()> {
        for br in &self.entries {
            if br.is_empty() || br.key > end || br.key_end() < beg {
                continue;
            }
            if br.btype == BlockrefType::Indirect {
                if depth >= DEPTH_MAX {
                    return None;
                }
                self.children
                    .get(&br.key)?
                    .table
                    .range_loaded_into(beg, end, out, depth + 1)?;
            } else {
                out.push(*br);
            }
        }
        Some(())
    }

    fn range_into(
        &mut self,
        src: &dyn BlockSource,
        beg: u64,
        end: u64,
        out: &mut Vec<Blockref>,
        depth: usize,
    ) -> Result<()> {
        for slot in 0..self.entries.len() {
            // Looked at in place: a blockref is 128 bytes, and most
            // slots of a big table are outside the range.
            let br = &self.entries[slot];
            if br.is_empty() || br.key > end || br.key_end() < beg {
                continue;
            }
            if br.btype == BlockrefType::Indirect {
                if depth >= DEPTH_MAX {
                    return Err(Error::corrupt(
                        "indirect blocks nested too deep".into(),
                        br.data_off.offset(),
                    ));
                }
                self.load(src, slot)?
                    .table
                    .range_into(src, beg, end, out, depth + 1)?;
            } else {
                out.push(*br);
            }
        }
        Ok(())
    }

    /// Insert `leaf` (keybits 0 for dirents and inodes, 16 for file
    /// data), replacing a leaf with the same key. Returns the replaced
    /// leaf.
    pub fn insert(
        &mut self,
        src: &dyn BlockSource,
        kind: TreeKind,
        in_inode: bool,
        leaf: Blockref,
    ) -> Result<Option<Blockref>> {
        let mut dropped = std::mem::take(&mut self.dropped);
        let r = self.insert_depth(src, kind, in_inode, leaf, 0, &mut dropped);
        self.dropped = dropped;
        r
    }

    fn insert_depth(
        &mut self,
        src: &dyn BlockSource,
        kind: TreeKind,
        in_inode: bool,
        leaf: Blockref,
        depth: usize,
        dropped: &mut Vec<Blockref>,
    ) -> Result<Option<Blockref>> {
        if depth >= DEPTH_MAX {
            return Err(Error::corrupt(
                "indirect blocks nested too deep".into(),
                leaf.data_off.offset(),
            ));
        }
        if let Some(slot) = self.slot_of(|b| b.btype != BlockrefType::Indirect && b.key == leaf.key)
        {
            let old = std::mem::replace(&mut self.entries[slot], leaf);
            self.dirty = true;
            if old.data_off != leaf.data_off {
                note_drop(dropped, old);
            }
            return Ok(Some(old));
        }
        loop {
            if let Some(slot) = self.covering_indirect(leaf.key) {
                let child = self.load(src, slot)?;
                let old = child
                    .table
                    .insert_depth(src, kind, false, leaf, depth + 1, dropped)?;
                self.dirty = true;
                return Ok(old);
            }
            if let Some(slot) = self.entries.iter().position(|b| b.is_empty()) {
                self.entries[slot] = leaf;
                self.dirty = true;
                return Ok(None);
            }
            self.create_indirect(kind, in_inode, leaf.key, leaf.keybits)?;
        }
    }

    /// `hammer2_chain_create_indirect`: make room in this full table by
    /// moving the entries of one aligned key range into a new indirect
    /// block.
    fn create_indirect(
        &mut self,
        kind: TreeKind,
        in_inode: bool,
        create_key: u64,
        create_bits: u8,
    ) -> Result<()> {
        let count = self.capacity();
        let mut nbytes = match (kind, in_inode) {
            (TreeKind::Directory, true) => IND_BYTES_MIN,
            _ => IND_BYTES_NOM,
        };
        nbytes = nbytes.max(count * BLOCKREF_BYTES);
        let ncount = nbytes / BLOCKREF_BYTES;
        let live: Vec<Blockref> = self
            .entries
            .iter()
            .filter(|b| !b.is_empty())
            .copied()
            .collect();
        let (key, keybits) = match kind {
            TreeKind::File => indkey_file(&live, ncount),
            TreeKind::Directory => indkey_dir(&live, create_key, create_bits, ncount),
        };
        let keybits = keybits.min(63);
        let key = key & !((1u64 << keybits) - 1);
        let mut ibref = Blockref::EMPTY;
        ibref.btype = BlockrefType::Indirect;
        ibref.key = key;
        ibref.keybits = keybits;
        ibref.data_off = DataOff::new(0, nbytes.trailing_zeros() as u8);
        let mut ientries = vec![Blockref::EMPTY; ncount];
        let mut ichildren = BTreeMap::new();
        let mut moved = 0;
        for slot in 0..count {
            let b = self.entries[slot];
            if b.is_empty() || (b.key ^ key) >> keybits != 0 {
                continue;
            }
            ientries[moved] = b;
            moved += 1;
            if let Some(c) = self.children.remove(&b.key) {
                ichildren.insert(b.key, c);
            }
            self.entries[slot] = Blockref::EMPTY;
        }
        if moved == 0 {
            return Err(Error::corrupt(
                format!("no entry fits the new indirect block {key:#x}/{keybits}"),
                0,
            ));
        }
        let table = BlockTable {
            entries: ientries,
            children: ichildren,
            dirty: true,
            dropped: Vec::new(),
        };
        let slot = self.entries.iter().position(|b| b.is_empty()).unwrap_or(0);
        self.entries[slot] = ibref;
        self.children.insert(key, Indirect { bref: ibref, table });
        self.dirty = true;
        Ok(())
    }

    /// Remove the leaf at `key`. Indirect blocks left empty are removed,
    /// and one sparse enough is folded back into its parent.
    pub fn delete(&mut self, src: &dyn BlockSource, key: u64) -> Result<Option<Blockref>> {
        let mut dropped = std::mem::take(&mut self.dropped);
        let r = self.delete_depth(src, key, 0, &mut dropped);
        self.dropped = dropped;
        r
    }

    fn delete_depth(
        &mut self,
        src: &dyn BlockSource,
        key: u64,
        depth: usize,
        dropped: &mut Vec<Blockref>,
    ) -> Result<Option<Blockref>> {
        if let Some(slot) = self.slot_of(|b| b.btype != BlockrefType::Indirect && b.key == key) {
            self.dirty = true;
            let old = std::mem::replace(&mut self.entries[slot], Blockref::EMPTY);
            note_drop(dropped, old);
            return Ok(Some(old));
        }
        let Some(slot) = self.covering_indirect(key) else {
            return Ok(None);
        };
        if depth >= DEPTH_MAX {
            return Err(Error::corrupt(
                "indirect blocks nested too deep".into(),
                self.entries[slot].data_off.offset(),
            ));
        }
        let removed = self
            .load(src, slot)?
            .table
            .delete_depth(src, key, depth + 1, dropped)?;
        if removed.is_some() {
            self.dirty = true;
            self.maintain(slot, dropped);
        }
        Ok(removed)
    }

    /// `hammer2_chain_indirect_maintenance` for the indirect at `slot`:
    /// delete it when empty; fold its entries into this table when they
    /// fit and it is at most three quarters full.
    fn maintain(&mut self, slot: usize, dropped: &mut Vec<Blockref>) {
        let br = self.entries[slot];
        let Some(child) = self.children.get(&br.key) else {
            return;
        };
        let child_live = child.table.live();
        if child_live == 0 {
            self.children.remove(&br.key);
            self.entries[slot] = Blockref::EMPTY;
            note_drop(dropped, br);
            return;
        }
        if self.live() + child_live - 1 > self.capacity()
            || child_live > child.table.capacity() * 3 / 4
        {
            return;
        }
        let Some(child) = self.children.remove(&br.key) else {
            return;
        };
        self.entries[slot] = Blockref::EMPTY;
        note_drop(dropped, br);
        let mut free = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, b)| b.is_empty())
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
            .into_iter();
        let Indirect { table, .. } = child;
        let mut grandchildren = table.children;
        for b in table.entries.into_iter().filter(|b| !b.is_empty()) {
            if let Some(i) = free.next() {
                self.entries[i] = b;
                if let Some(c) = grandchildren.remove(&b.key) {
                    self.children.insert(b.key, c);
                }
            }
        }
    }

    /// Pack the live entries at the front in key order, as DragonFly's
    /// `hammer2_base_find` requires of every blockref array it reads.
    pub fn sort(&mut self) {
        let cap = self.entries.len();
        let mut live: Vec<Blockref> = self
            .entries
            .iter()
            .filter(|b| !b.is_empty())
            .copied()
            .collect();
        live.sort_by_key(|b| b.key);
        live.resize(cap, Blockref::EMPTY);
        if live != self.entries {
            self.entries = live;
            self.dirty = true;
        }
    }

    /// Write every modified indirect block below this table, bottom up,
    /// and put the new blockrefs in place. Afterwards nothing below is
    /// dirty; this table itself is dirty if anything changed (its owner
    /// writes it).
    pub fn flush(&mut self, sink: &mut dyn BlockSink) -> Result<()> {
        let mut dropped = std::mem::take(&mut self.dropped);
        let r = self.flush_into(sink, &mut dropped);
        self.dropped = dropped;
        r
    }

    fn flush_into(&mut self, sink: &mut dyn BlockSink, dropped: &mut Vec<Blockref>) -> Result<()> {
        let keys: Vec<u64> = self
            .children
            .iter()
            .filter(|(_, c)| c.table.dirty)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let Some(child) = self.children.get_mut(&key) else {
                continue;
            };
            child.table.flush_into(sink, dropped)?;
            child.table.sort();
            let mut template = child.bref;
            SetStats::of(&child.table.entries).apply(&mut template);
            let newbr = sink.write_indirect(&template, &child.table.entries)?;
            note_drop(dropped, child.bref);
            child.bref = newbr;
            child.table.dirty = false;
            if let Some(slot) = self
                .entries
                .iter()
                .position(|b| b.btype == BlockrefType::Indirect && b.key == key)
            {
                self.entries[slot] = newbr;
            }
            self.dirty = true;
        }
        Ok(())
    }

    /// The statistics this table adds up to now, as the next flush
    /// would store them in its parent: loaded indirect blocks are
    /// counted from their entries in memory, the others from their
    /// blockrefs. Reads nothing. An indirect block not yet written
    /// counts at the size it will be written at.
    pub fn stats_now(&self) -> SetStats {
        let mut s = SetStats::default();
        for br in self.entries.iter().filter(|b| !b.is_empty()) {
            match self.children.get(&br.key) {
                Some(c) if br.btype == BlockrefType::Indirect => {
                    let sub = c.table.stats_now();
                    s.data_count = s
                        .data_count
                        .wrapping_add(br.data_off.bytes())
                        .wrapping_add(sub.data_count);
                    s.inode_count = s.inode_count.wrapping_add(sub.inode_count);
                    s.leaf_count += sub.leaf_count;
                }
                _ => s.add_child(br),
            }
        }
        s
    }

    // ---- repair (fsck -y, `repair/walk.rs`) ----
    //
    // The repair walk verifies each entry itself before anything is
    // loaded, so these work slot by slot and never read: a damaged block
    // is replaced or cut without being read through `BlockSource`.

    /// Put `br` in `slot` (EMPTY cuts the entry), forgetting what was
    /// loaded under the entry it replaces. Nothing is noted as dropped:
    /// a repair rebuilds the freemap from the topology afterwards.
    pub fn set_slot(&mut self, slot: usize, br: Blockref) {
        let old = self.entries[slot];
        if old.btype == BlockrefType::Indirect {
            self.children.remove(&old.key);
        }
        self.entries[slot] = br;
        self.dirty = true;
    }

    /// Make `entries` (decoded and checked by the caller) the loaded
    /// content of the indirect entry in `slot`, and return its table.
    pub fn adopt(&mut self, slot: usize, entries: Vec<Blockref>) -> &mut BlockTable {
        let br = self.entries[slot];
        let child = self.children.entry(br.key).or_insert(Indirect {
            bref: br,
            table: BlockTable::new(Vec::new()),
        });
        child.bref = br;
        child.table = BlockTable::new(entries);
        &mut child.table
    }

    /// The loaded table of the indirect entry in `slot`.
    pub fn child_mut(&mut self, slot: usize) -> Option<&mut BlockTable> {
        let br = self.entries[slot];
        if br.btype != BlockrefType::Indirect {
            return None;
        }
        self.children.get_mut(&br.key).map(|c| &mut c.table)
    }

    /// Forget the loaded table of the indirect entry in `slot` if it is
    /// clean (it is read again when needed).
    pub fn forget_clean_child(&mut self, slot: usize) {
        let key = self.entries[slot].key;
        if self.children.get(&key).is_some_and(|c| !c.table.dirty) {
            self.children.remove(&key);
        }
    }

    /// Mark this table changed, so the flush rewrites it (and its
    /// statistics and check code) even though no entry changed.
    pub fn touch(&mut self) {
        self.dirty = true;
    }

    /// Bytes of decoded blockrefs this table holds in memory, its
    /// loaded indirect blocks included.
    pub fn loaded_bytes(&self) -> usize {
        self.entries.len() * std::mem::size_of::<Blockref>()
            + self
                .children
                .values()
                .map(|c| c.table.loaded_bytes())
                .sum::<usize>()
    }

    /// Drop loaded indirect blocks that are clean, to bound memory.
    pub fn release_clean(&mut self) {
        self.children.retain(|_, c| {
            c.table.release_clean();
            c.table.dirty || !c.table.children.is_empty()
        });
    }
}

/// `hammer2_chain_indkey_file`: the lowest key among the entries with
/// the fewest keybits, widened by the indirect block's fan-out.
pub fn indkey_file(live: &[Blockref], ncount: usize) -> (u64, u8) {
    let mut key = 0u64;
    let mut keybits = 64u32;
    for b in live {
        let kb = b.keybits as u32;
        if kb < keybits || (kb == keybits && b.key < key) {
            key = b.key;
            keybits = kb;
        }
    }
    let nradix = ncount.trailing_zeros();
    ((key), (keybits + nradix).min(63) as u8)
}

/// `hammer2_chain_indkey_dir`: the smallest aligned range holding every
/// entry, cut in half on the side with more entries, but at least wide
/// enough to fill the new block (for the inode index's dense keys).
pub fn indkey_dir(live: &[Blockref], create_key: u64, create_bits: u8, ncount: usize) -> (u64, u8) {
    let mut key = create_key;
    let mut keybits = create_bits as u32;
    let mut locount = 0u64;
    let mut hicount = 0u64;
    let mut sorted: Vec<&Blockref> = live.iter().collect();
    sorted.sort_by_key(|b| b.key);
    for b in sorted {
        let mut nkeybits = keybits.max(b.keybits as u32);
        while nkeybits < 64 && ((key ^ b.key) >> nkeybits) != 0 {
            nkeybits += 1;
        }
        if keybits != nkeybits {
            if nkeybits >= 1 && key & (1u64 << (nkeybits - 1).min(63)) != 0 {
                hicount += locount;
                locount = 0;
            } else {
                locount += hicount;
                hicount = 0;
            }
            keybits = nkeybits;
        }
        if nkeybits >= 1 && b.key & (1u64 << (nkeybits - 1).min(63)) != 0 {
            hicount += 1;
        } else {
            locount += 1;
        }
    }
    keybits = keybits.saturating_sub(1);
    while (1u64 << keybits.min(63)) < ncount as u64 && keybits < 63 {
        keybits += 1;
        if key & (1u64 << keybits) != 0 {
            hicount += locount;
            locount = 0;
        } else {
            locount += hicount;
            hicount = 0;
        }
    }
    let keybits = keybits.min(63);
    if hicount > locount {
        key |= 1u64 << keybits;
    } else {
        key &= !((1u64 << keybits) | ((1u64 << keybits) - 1));
    }
    (key, keybits as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DataOff;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// An in-memory block store standing in for the device.
    #[derive(Default)]
    struct Store {
        blocks: RefCell<HashMap<u64, Vec<Blockref>>>,
        next: RefCell<u64>,
    }

    impl BlockSource for Store {
        fn read_set(&self, br: &Blockref) -> Result<Vec<Blockref>> {
            self.blocks
                .borrow()
                .get(&br.data_off.offset())
                .cloned()
                .ok_or_else(|| Error::corrupt("no such block".into(), br.data_off.offset()))
        }
    }

    struct Sink<'a>(&'a Store);

    impl BlockSink for Sink<'_> {
        fn write_indirect(
            &mut self,
            template: &Blockref,
            entries: &[Blockref],
        ) -> Result<Blockref> {
            let mut next = self.0.next.borrow_mut();
            *next += 65536;
            let mut br = *template;
            br.data_off = DataOff::new(*next, template.data_off.radix());
            assert_eq!(
                entries.len() * BLOCKREF_BYTES,
                1usize << template.data_off.radix()
            );
            self.0.blocks.borrow_mut().insert(*next, entries.to_vec());
            Ok(br)
        }
    }

    fn leaf(kind: TreeKind, key: u64) -> Blockref {
        let mut b = Blockref::EMPTY;
        match kind {
            TreeKind::File => {
                b.btype = BlockrefType::Data;
                b.keybits = 16;
                b.data_off = DataOff::new(key.wrapping_mul(7) & 0xffff_ffc0, 10);
            }
            TreeKind::Directory => {
                b.btype = BlockrefType::Dirent;
            }
        }
        b.key = key;
        b
    }

    /// Structural invariants of a flushed tree: children inside their
    /// parent's range with fewer keybits, siblings disjoint, stats right.
    fn check_tree(
        store: &Store,
        entries: &[Blockref],
        lo: u64,
        hi: u64,
        keybits: u32,
        out: &mut Vec<u64>,
    ) -> SetStats {
        let mut live: Vec<&Blockref> = entries.iter().filter(|b| !b.is_empty()).collect();
        live.sort_by_key(|b| b.key);
        for w in live.windows(2) {
            assert!(
                w[0].key_end() < w[1].key,
                "siblings overlap: {:?} {:?}",
                w[0],
                w[1]
            );
        }
        for b in &live {
            assert!(
                b.key >= lo && b.key_end() <= hi,
                "{b:?} outside {lo:#x}..{hi:#x}"
            );
            assert!((b.keybits as u32) < keybits);
            if b.btype == BlockrefType::Indirect {
                let set = store.read_set(b).unwrap();
                let sub = check_tree(store, &set, b.key, b.key_end(), b.keybits as u32, out);
                assert_eq!(sub.data_count, b.data_count());
                assert_eq!(sub.inode_count, b.inode_count());
                assert_eq!(sub.leaf_count_saturated(), b.leaf_count);
            } else {
                out.push(b.key);
            }
        }
        SetStats::of(entries)
    }

    fn model_run(kind: TreeKind, seed: u64, ops: usize, key_of: impl Fn(&mut SmallRng) -> u64) {
        let store = Store::default();
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut table = BlockTable::new(vec![Blockref::EMPTY; 4]);
        let mut model: BTreeMap<u64, Blockref> = BTreeMap::new();
        for i in 0..ops {
            let r = rng.gen_range(0..100);
            if r < 65 || model.is_empty() {
                let k = key_of(&mut rng);
                let l = leaf(kind, k);
                let old = table.insert(&store, kind, true, l).unwrap();
                assert_eq!(old, model.insert(k, l), "seed {seed} op {i}");
            } else if r < 95 {
                let k = if rng.gen_bool(0.8) {
                    *model.keys().nth(rng.gen_range(0..model.len())).unwrap()
                } else {
                    key_of(&mut rng)
                };
                let old = table.delete(&store, k).unwrap();
                assert_eq!(old, model.remove(&k), "seed {seed} op {i}");
            } else {
                // What the table adds up to in memory is what the flush
                // stores.
                let now = table.stats_now();
                table.flush(&mut Sink(&store)).unwrap();
                assert_eq!(now, SetStats::of(table.entries()), "seed {seed} op {i}");
                if rng.gen_bool(0.5) {
                    table = BlockTable::new(table.entries().to_vec());
                }
            }
            if i % 50 == 0 {
                let got: Vec<u64> = table
                    .range(&store, 0, u64::MAX)
                    .unwrap()
                    .iter()
                    .map(|b| b.key)
                    .collect();
                let want: Vec<u64> = model.keys().copied().collect();
                assert_eq!(got, want, "seed {seed} op {i}");
                if let Some((&k, v)) = model.iter().next() {
                    assert_eq!(table.lookup(&store, k).unwrap(), Some(*v));
                }
            }
        }
        table.flush(&mut Sink(&store)).unwrap();
        let mut keys = Vec::new();
        check_tree(&store, table.entries(), 0, u64::MAX, 65, &mut keys);
        keys.sort_unstable();
        assert_eq!(
            keys,
            model.keys().copied().collect::<Vec<_>>(),
            "seed {seed}"
        );
    }

    #[test]
    fn file_tree_against_model() {
        for seed in 0..6 {
            // Offsets clustered like a file written and rewritten.
            model_run(TreeKind::File, seed, 3000, |r| {
                (r.gen_range(0..4096u64)) << 16
            });
        }
        // Sparse offsets across the whole key space.
        model_run(TreeKind::File, 99, 2000, |r| {
            (r.gen::<u64>() >> 1) & !0xffff
        });
    }

    #[test]
    fn directory_tree_against_model() {
        for seed in 0..6 {
            model_run(TreeKind::Directory, seed, 3000, |r| {
                crate::dirhash::dirhash(format!("f{}", r.gen_range(0..5000)).as_bytes())
            });
        }
        // The inode index: dense, growing inode numbers.
        model_run(TreeKind::Directory, 7, 3000, |r| {
            1024 + r.gen_range(0..4000u64)
        });
    }

    #[test]
    fn sequential_file_makes_dragonfly_shape() {
        // A 5 MiB file written in order: DragonFly makes one 16 KiB
        // indirect with keybits 23 holding all 80 blocks (seen in the
        // fixture images: "a 16 KiB indirect with keybits 23").
        let store = Store::default();
        let mut table = BlockTable::new(vec![Blockref::EMPTY; 4]);
        for i in 0..80u64 {
            table
                .insert(&store, TreeKind::File, true, leaf(TreeKind::File, i << 16))
                .unwrap();
        }
        table.flush(&mut Sink(&store)).unwrap();
        let live: Vec<&Blockref> = table.entries().iter().filter(|b| !b.is_empty()).collect();
        assert_eq!(live.len(), 1);
        assert_eq!(
            (live[0].btype, live[0].keybits, live[0].key),
            (BlockrefType::Indirect, 23, 0)
        );
        assert_eq!(live[0].data_off.bytes(), 16384);
        assert_eq!(live[0].leaf_count, 80);
    }
}
