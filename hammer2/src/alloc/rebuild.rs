//! The freemap rebuilt from the topology, for fsck's repairs
//! (`repair.rs`): an allocator whose freemap is what a scan of the
//! blocks to keep found referenced (`Allocator::rebuilt`), and the
//! freemap of a running allocator replaced by such a scan (`set_exact`).
//!
//! A repair cannot trust the freemap on the image (it may be the damage),
//! so it allocates from a map of every block any volume header copy can
//! reach, damaged trees included, and writes nothing over them; at the
//! end the freemap becomes exactly what the repaired tree references
//! (DragonFly's bulkfree without its two stages: referenced 16 KiB blocks
//! are 11, every other managed block 00).
//!
//! Freemap blocks of a rebuilt tree are new, so nothing says which
//! rotation set they take (`tree.rs`: a block written for the first time
//! takes set 0, which may hold the copy a header copy on the image points
//! at). `FreemapSets` records the sets the header copies' freemaps use at
//! each place, and each new block is sent to a set none of them uses.

use super::bmap;
use super::bulkfree::ScanMap;
use super::tree::{Tree, FREEMAP_BLOCK_PRADIX, ROOT};
use super::Allocator;
use crate::disk::{
    Blockref, DataOff, VolumeHeader, FREEMAP_COUNT, FREEMAP_LEVEL1_RADIX, FREEMAP_LEVEL5_RADIX,
    PBUFSIZE, ZONE_FREEMAP_00, ZONE_FREEMAP_END, ZONE_FREEMAP_INC, ZONE_FREEMAP_SETS, ZONE_SEG,
};
use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// The rotation sets freemap blocks on the image occupy, by level
/// (keybits) and key: the places a rebuilt freemap must not write.
#[derive(Clone, Debug, Default)]
pub struct FreemapSets {
    used: BTreeMap<(u8, u64), u8>,
}

impl FreemapSets {
    /// Record the freemap block `br` points at (any header copy's tree).
    /// Blocks outside the rotation slots are ignored (damage; nothing
    /// rebuilt goes there).
    pub fn note(&mut self, br: &Blockref) {
        let off = br.data_off.offset();
        let slot = (off & (ZONE_SEG - 1)) / PBUFSIZE;
        if br.keybits > 64 || !(ZONE_FREEMAP_00..ZONE_FREEMAP_END).contains(&slot) {
            return;
        }
        let set = (slot - ZONE_FREEMAP_00) / ZONE_FREEMAP_INC;
        let key = br.key & !mask(br.keybits);
        *self.used.entry((br.keybits, key)).or_default() |= 1 << set;
    }

    /// The first set no recorded block occupies at this place.
    fn free_set(&self, keybits: u8, key: u64) -> u64 {
        let used = self
            .used
            .get(&(keybits, key & !mask(keybits)))
            .copied()
            .unwrap_or(0);
        (0..ZONE_FREEMAP_SETS)
            .find(|s| used & (1 << s) == 0)
            .unwrap_or(0)
    }
}

fn mask(keybits: u8) -> u64 {
    if keybits >= 64 {
        u64::MAX
    } else {
        (1u64 << keybits) - 1
    }
}

/// The freemap level (0 for leaves) of a block with these keybits.
fn level(keybits: u8) -> Option<u64> {
    (FREEMAP_LEVEL1_RADIX..=FREEMAP_LEVEL5_RADIX)
        .step_by(8)
        .position(|k| k == keybits)
        .map(|p| p as u64)
}

/// The leaf bref's `avail` hint for these bmaps.
fn leaf_avail(bmaps: &[crate::disk::BmapData]) -> u64 {
    bmaps.iter().map(|b| b.avail as u64).sum()
}

impl Allocator {
    /// An allocator for the volume of header `vh` whose freemap is
    /// `map` (every block in it allocated, every other managed block
    /// free), with `freemap_tid` the header's `mirror_tid`. Its blocks
    /// go to rotation sets `avoid` does not list. Nothing is written
    /// until its first `flush`.
    pub fn rebuilt(vh: &VolumeHeader, map: &ScanMap, avoid: &FreemapSets) -> Result<Allocator> {
        let total_size = super::total_size_of(vh);
        if total_size < ZONE_SEG || vh.allocator_beg > total_size {
            return Err(Error::corrupt(
                format!(
                    "volume header: allocator_beg {:#x} and size {total_size} leave no freemap",
                    vh.allocator_beg
                ),
                0,
            ));
        }
        let tree = Tree::empty(vh.mirror_tid);
        let mut a = Allocator::with_tree(vh, total_size, tree);
        a.freemap_tid = vh.mirror_tid;
        a.set_reserve_bytes(super::reserve_for(total_size));
        a.set_exact(map)?;
        a.place_new_blocks(avoid);
        log::info!("freemap rebuilt from the topology: {}", a.stats());
        Ok(a)
    }

    /// Make the freemap exactly `map`: every bmap the allocator manages
    /// takes the scan's bitmap, class, `linear` and `avail`; zones with
    /// referenced blocks get a leaf; everything the allocator tracked
    /// about earlier allocations and frees (unflushed blocks, claims,
    /// frees waiting for a header, dedup) is forgotten, and
    /// `allocator_free` is the free space counted. The next flush writes
    /// it.
    pub fn set_exact(&mut self, map: &ScanMap) -> Result<()> {
        self.check_poisoned()?;
        // `create_leaf` moves a zone's counts from virtual to real.
        self.count_free();
        for zone in map.zones() {
            if self.zone_exists(zone) && !self.tree.by_zone.contains_key(&zone) {
                self.create_leaf(zone)?;
            }
        }
        let (beg, total) = (self.allocator_beg, self.total_size);
        let zones: Vec<(u64, usize)> = self.tree.by_zone.iter().map(|(&z, &i)| (z, i)).collect();
        for (zone, idx) in zones {
            let mut changed = false;
            if let Some(leaf) = self.tree.nodes[idx].leaf.as_deref_mut() {
                for n in 0..FREEMAP_COUNT {
                    let want = if bmap::usable(zone, n, beg, total) {
                        map.bmap(zone, n)
                    } else {
                        bmap::unusable()
                    };
                    if leaf.bmaps[n] != want {
                        leaf.bmaps[n] = want;
                        changed = true;
                    }
                }
            }
            let avail = self.tree.nodes[idx]
                .leaf
                .as_deref()
                .map_or(0, |l| leaf_avail(&l.bmaps));
            let br = &mut self.tree.nodes[idx].bref;
            if changed || br.freemap_avail() != avail || br.freemap_bigmask() != u32::MAX {
                br.set_freemap_hints(u32::MAX, avail);
                self.tree.touch(idx);
            }
        }
        self.unflushed.clear();
        self.fresh.clear();
        self.shares.clear();
        self.claimed.clear();
        self.dedup.clear();
        self.dedup_shared.clear();
        self.pending_frees.clear();
        self.possibly_free = 0;
        self.possibly_free_at_start = 0;
        self.relaxed = false;
        self.heur = [0; super::HEUR_SIZE];
        self.count_free();
        self.allocator_free = self.free_bytes();
        Ok(())
    }

    /// Point every freemap block never written at the rotation set
    /// before the one it should take, so its first write lands in a set
    /// `avoid` does not list (`tree::reserve` takes the set after the
    /// one a block occupies).
    fn place_new_blocks(&mut self, avoid: &FreemapSets) {
        for idx in 0..self.tree.nodes.len() {
            if idx == ROOT {
                continue;
            }
            let br = self.tree.nodes[idx].bref;
            if br.data_off.offset() != 0 {
                continue;
            }
            let Some(lvl) = level(br.keybits) else {
                continue;
            };
            let want = avoid.free_set(br.keybits, br.key);
            let before = (want + ZONE_FREEMAP_SETS - 1) % ZONE_FREEMAP_SETS;
            let base = br.key & !mask(br.keybits);
            let slot = ZONE_FREEMAP_00 + before * ZONE_FREEMAP_INC + lvl;
            self.tree.nodes[idx].bref.data_off =
                DataOff::new(base + slot * PBUFSIZE, FREEMAP_BLOCK_PRADIX);
        }
    }
}
