//! Bulkfree's freemap side (DragonFly's `h2_bulkfree_callback`,
//! `h2_bulkfree_sync` and `h2_bulkfree_sync_adjust`): the in-memory map
//! of what a topology scan found referenced, and its merge into the live
//! freemap.
//!
//! The scan map (`ScanMap`) has one `bmap_data` per 4 MiB, as a freemap
//! leaf has, built the way DragonFly builds its own: every bmap outside
//! the managed space (below `allocator_beg` rounded up to 4 MiB, a zone's
//! reserved segment, past the last whole 4 MiB) starts all allocated;
//! the rest starts free, and each referenced block sets its 16 KiB pairs
//! to 11 (so 1 KiB granularity collapses to 16 KiB states) and pushes
//! `linear` past the end of its sub-16 KiB allocations. Zones are made
//! on first use, so memory follows the zones in use (32 KiB per GiB);
//! DragonFly instead windows a fixed buffer over the volume, one full
//! topology scan per window.
//!
//! The merge, per 2-bit pair (scan / live):
//! - 00 / 11 -> 10: staged, on the first pass that finds it unreferenced;
//! - 00 / 10 -> 00: freed on the next pass (`avail` and `allocator_free`
//!   grow by 16 KiB);
//! - 11 / 10 -> 11: referenced again (a block written between two passes);
//! - 11 / 00 -> 11: a referenced block the freemap showed free (damage;
//!   counted and repaired, as DragonFly does);
//! - 00 / 01 and 11 / 01 are left alone (DragonFly never writes 01).
//!
//! A bmap whose bitmap and `linear` already agree with the scan, and
//! whose leaf `bigmask` admits what the scan found free, is left as it
//! is. Otherwise its leaf's `bigmask` is reset to all ones and `linear`
//! is moved to or past the end of the last referenced sub-16 KiB
//! allocation (onto a 16 KiB boundary unless it stays in the same
//! block), so the cursor never points into a block that was freed; a
//! bmap left wholly free is reset (class 0, `linear` 0, `avail` 4 MiB).
//!
//! Safety against writes made while the scan ran (the scan reads the
//! topology of the flush the pass started at; the frontend and later
//! flushes go on): from `bulkfree_start` to the merge the allocator
//! records every block it hands out (a second map of the same shape),
//! and the merge treats those as referenced too, wherever the live
//! freemap still holds them (one allocated and released before the merge
//! stays free). Every block any tree can reference at merge time is in
//! the scanned topology or was allocated since, so no referenced block
//! is ever staged, and fsck stays clean between passes. DragonFly records
//! nothing and relies on its two stages instead: a block written during
//! a scan is staged by that pass and set back to allocated by the next.
//! Both stages are kept (a block is freed only when two passes find it
//! unreferenced). One pass at a time: `bulkfree_start` hands out a
//! token, and only the latest token may be merged, once.

use super::bmap::{self, SEGSIZE};
use super::Allocator;
use crate::disk::freemap::BMAP_ALLOCATED;
use crate::disk::freemap::{BmapData, BMAP_ELEMENTS};
use crate::disk::{
    BlockrefType, DataOff, FREEMAP_BLOCK_RADIX, FREEMAP_BLOCK_SIZE, FREEMAP_COUNT,
    FREEMAP_LEVEL1_RADIX, RADIX_MAX,
};
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::fmt;

const LEAF_BYTES: u64 = 1 << FREEMAP_LEVEL1_RADIX;
const PAIRS_LOW: u64 = 0x5555_5555_5555_5555;
const BLOCK_MASK: u64 = FREEMAP_BLOCK_SIZE - 1;
/// Bytes one 64-bit bitmap element covers (512 KiB).
const ELEMENT_BYTES: u64 = SEGSIZE / BMAP_ELEMENTS as u64;

/// What a topology scan found referenced, as freemap bitmaps.
pub struct ScanMap {
    token: u64,
    allocator_beg: u64,
    total_size: u64,
    zones: BTreeMap<u64, Vec<BmapData>>,
    /// Blocks marked (inside the managed space) and ignored (outside it:
    /// newfs's static blocks below `allocator_beg`).
    pub marked: u64,
    pub ignored: u64,
    /// Blocks that crossed a 4 MiB boundary (damage; DragonFly clips
    /// them the same way).
    pub illegal: u64,
}

impl ScanMap {
    fn new(token: u64, allocator_beg: u64, total_size: u64) -> ScanMap {
        ScanMap {
            token,
            allocator_beg,
            total_size,
            zones: BTreeMap::new(),
            marked: 0,
            ignored: 0,
            illegal: 0,
        }
    }

    /// The bmap a zone starts with before anything is marked
    /// (`cbinfo_bmap_init`).
    fn initial(&self, zone: u64, n: usize) -> BmapData {
        if bmap::usable(zone, n, self.allocator_beg, self.total_size) {
            BmapData {
                avail: SEGSIZE as u32,
                ..BmapData::default()
            }
        } else {
            bmap::unusable()
        }
    }

    /// A map outside any bulkfree pass (fsck's freemap rebuild, which
    /// marks every block a topology references and makes the freemap
    /// exactly that: `Allocator::rebuilt`, `set_exact`).
    pub fn standalone(allocator_beg: u64, total_size: u64) -> ScanMap {
        ScanMap::new(0, allocator_beg, total_size)
    }

    /// The pass this map belongs to.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The scan's view of bmap `n` of the zone at `zone`.
    pub fn bmap(&self, zone: u64, n: usize) -> BmapData {
        match self.zones.get(&zone) {
            Some(z) => z[n],
            None => self.initial(zone, n),
        }
    }

    /// Zones with at least one block marked.
    pub fn zones(&self) -> impl Iterator<Item = u64> + '_ {
        self.zones.keys().copied()
    }

    /// Record a referenced block of type `btype` (`h2_bulkfree_callback`).
    /// Blocks below `allocator_beg` or past the volume are ignored, as
    /// DragonFly ignores them; a block without data is not a block.
    pub fn mark(&mut self, btype: BlockrefType, off: DataOff) {
        let radix = off.radix();
        if radix == 0 {
            return;
        }
        let at = off.offset();
        if at < self.allocator_beg || at >= self.total_size || radix > RADIX_MAX {
            self.ignored += 1;
            return;
        }
        self.marked += 1;
        let mut bytes = 1u64 << radix;
        let zone = at & !(LEAF_BYTES - 1);
        let n = ((at - zone) / SEGSIZE) as usize;
        let mut within = at & (SEGSIZE - 1);
        if within + bytes > SEGSIZE {
            self.illegal += 1;
            log::warn!("bulkfree: block {off:?} crosses a 4 MiB boundary; clipped");
            bytes = SEGSIZE - within;
        }
        if !self.zones.contains_key(&zone) {
            let z = (0..FREEMAP_COUNT).map(|i| self.initial(zone, i)).collect();
            self.zones.insert(zone, z);
        }
        let Some(z) = self.zones.get_mut(&zone) else {
            return;
        };
        let b = &mut z[n];
        if b.class == 0 {
            b.class = bmap::class_of(btype);
            b.avail = SEGSIZE as u32;
        }
        let end = (within + bytes) as i32;
        if bytes & BLOCK_MASK != 0 {
            b.linear = b.linear.max(end);
        } else if b.linear >= within as i32 && b.linear < end {
            b.linear = end;
        }
        let mut left = bytes;
        while left > 0 {
            let i = (within / ELEMENT_BYTES) as usize;
            let mask = 3u64 << (((within & (ELEMENT_BYTES - 1)) >> FREEMAP_BLOCK_RADIX) << 1);
            if b.bitmapq[i] & mask == 0 {
                // Bitmap granular (DragonFly subtracts the bytes left
                // here, over-counting big blocks; only hints read it).
                b.avail = b.avail.wrapping_sub(FREEMAP_BLOCK_SIZE as u32);
                b.bitmapq[i] |= mask;
            }
            within += FREEMAP_BLOCK_SIZE;
            left = left.saturating_sub(FREEMAP_BLOCK_SIZE);
        }
    }

    /// True when the 16 KiB block holding `offset` was marked referenced
    /// (or lies outside the managed space).
    pub fn is_allocated(&self, offset: u64) -> bool {
        let zone = offset & !(LEAF_BYTES - 1);
        let n = ((offset - zone) / SEGSIZE) as usize;
        let b = self.bmap(zone, n);
        b.block_state(((offset & (SEGSIZE - 1)) / FREEMAP_BLOCK_SIZE) as usize) == 3
    }
}

/// What one merge did (DragonFly's "bulkfree pass statistics").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// 10 -> 00: 16 KiB blocks freed.
    pub freed: u64,
    /// 11 -> 10: blocks staged, free on the next pass if still unreferenced.
    pub staged: u64,
    /// 00 -> 11: referenced blocks the freemap showed free (damage).
    pub free_to_allocated: u64,
    /// 01 seen where the scan found a reference (left as it is).
    pub reserved_referenced: u64,
    /// 10 -> 11: staged blocks referenced again.
    pub staged_to_allocated: u64,
    /// 4 MiB segments left wholly free and reset.
    pub segments_cleaned: u64,
    pub linear_adjusts: u64,
    /// Bmaps rewritten (the rest already agreed with the scan).
    pub bmaps_changed: u64,
    /// Zones with referenced blocks but no freemap leaf (damage).
    pub zones_without_leaf: u64,
    /// Net change of `allocator_free` in bytes.
    pub free_delta: i64,
}

impl fmt::Display for SyncStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "    transition->free   {}", self.freed)?;
        writeln!(f, "    transition->staged {}", self.staged)?;
        writeln!(f, "    ERR(00)->allocated {}", self.free_to_allocated)?;
        writeln!(f, "    ERR(01)->allocated {}", self.reserved_referenced)?;
        writeln!(f, "    staged->allocated  {}", self.staged_to_allocated)?;
        writeln!(f, "    ~4MB segs cleaned  {}", self.segments_cleaned)?;
        write!(f, "    linear adjusts     {}", self.linear_adjusts)
    }
}

/// Merge one scanned bmap into the live one (`h2_bulkfree_sync_adjust`).
pub fn sync_adjust(live: &mut BmapData, scan: &BmapData, st: &mut SyncStats) {
    for i in 0..BMAP_ELEMENTS {
        let (mut lmask, mut mmask) = (live.bitmapq[i], scan.bitmapq[i]);
        if lmask == mmask {
            continue;
        }
        for pair in (0..64).step_by(2) {
            match (mmask & 3, lmask & 3) {
                (0, 2) => {
                    live.bitmapq[i] &= !(2u64 << pair);
                    live.avail = live
                        .avail
                        .wrapping_add(FREEMAP_BLOCK_SIZE as u32)
                        .min(SEGSIZE as u32);
                    st.free_delta += FREEMAP_BLOCK_SIZE as i64;
                    st.freed += 1;
                }
                (0, 3) => {
                    live.bitmapq[i] &= !(1u64 << pair);
                    st.staged += 1;
                }
                (0, 1) => log::warn!("bulkfree: cannot transition m=00/l=01"),
                (3, l) => {
                    match l {
                        0 => {
                            st.free_to_allocated += 1;
                            st.free_delta -= FREEMAP_BLOCK_SIZE as i64;
                            live.avail = live.avail.saturating_sub(FREEMAP_BLOCK_SIZE as u32);
                        }
                        1 => st.reserved_referenced += 1,
                        2 => st.staged_to_allocated += 1,
                        _ => {}
                    }
                    live.bitmapq[i] |= 3u64 << pair;
                }
                _ => {}
            }
            mmask >>= 2;
            lmask >>= 2;
        }
    }
    match live.bitmapq.iter().rposition(|&q| q != 0) {
        None => {
            live.avail = SEGSIZE as u32;
            live.class = 0;
            live.linear = 0;
            st.segments_cleaned += 1;
        }
        Some(last) if last < BMAP_ELEMENTS - 1 => {
            st.linear_adjusts += 1;
            if live.linear < scan.linear
                && (live.linear as u64 ^ scan.linear as u64) & !BLOCK_MASK == 0
            {
                live.linear = scan.linear;
            } else {
                live.linear = ((scan.linear as u64 + BLOCK_MASK) & !BLOCK_MASK) as i32;
            }
        }
        Some(_) => live.linear = SEGSIZE as i32,
    }
    // The cursor hands out small blocks from inside a 16 KiB block
    // without looking at the bitmap, so it may rest inside one only if
    // that block is allocated. The scan's cursor may point into one that
    // is free again: a small block allocated while the pass ran (recorded,
    // `with_recent`) and released before the merge. Left there, the next
    // 16 KiB allocation could take that block whole and the cursor then
    // carve small blocks out of it.
    let lin = live.linear as u64;
    if lin & BLOCK_MASK != 0
        && lin < SEGSIZE
        && live.block_state((lin / FREEMAP_BLOCK_SIZE) as usize) != BMAP_ALLOCATED
    {
        live.linear = ((lin + BLOCK_MASK) & !BLOCK_MASK) as i32;
    }
}

/// The scan's bmap with the blocks allocated since the pass started
/// added where the live bmap still holds them, and `linear` past the
/// end of either's small blocks.
fn with_recent(scan: &BmapData, recent: &BmapData, live: &BmapData) -> BmapData {
    let mut out = *scan;
    for i in 0..BMAP_ELEMENTS {
        let q = live.bitmapq[i];
        let held = (q | (q >> 1)) & PAIRS_LOW;
        out.bitmapq[i] |= recent.bitmapq[i] & (held | (held << 1));
    }
    out.linear = scan.linear.max(recent.linear);
    out
}

/// The allocation radixes a bmap has a wholly free aligned run for, as
/// a `bigmask` (`bigmask_get`): bit r set when a 2^r block could fit.
pub fn bigmask_get(b: &BmapData) -> u32 {
    let mut bigmask = 0u32;
    for &q in &b.bitmapq {
        let mut radix_mask = (1u32 << FREEMAP_BLOCK_RADIX) | ((1u32 << FREEMAP_BLOCK_RADIX) - 1);
        let mut bits = 2u32;
        while bits <= 64 {
            let run = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            if (0..64).step_by(bits as usize).any(|j| q & (run << j) == 0) {
                bigmask |= radix_mask;
            }
            bits <<= 1;
            radix_mask = (radix_mask << 1) | 1;
        }
    }
    bigmask
}

fn bigmask_good(b: &BmapData, live_bigmask: u32) -> bool {
    let want = bigmask_get(b);
    live_bigmask & want == want
}

impl Allocator {
    /// Start a bulkfree pass: an empty scan map for the topology scan to
    /// fill; from now on every allocation is recorded for the merge.
    /// Starting a pass voids any pass started before it.
    pub fn bulkfree_start(&mut self) -> ScanMap {
        self.bulkfree_started += 1;
        let token = self.bulkfree_started;
        self.bulkfree_recent = Some(ScanMap::new(token, self.allocator_beg, self.total_size));
        self.possibly_free_at_start = self.possibly_free;
        ScanMap::new(token, self.allocator_beg, self.total_size)
    }

    /// Abandon the pass `token` (its scan failed or was dropped): stop
    /// recording allocations for it, and let frees held for it go on.
    pub fn bulkfree_cancel(&mut self, token: u64) {
        if self
            .bulkfree_recent
            .as_ref()
            .is_some_and(|r| r.token == token)
        {
            self.bulkfree_recent = None;
            log::info!("bulkfree pass {token} abandoned");
        }
    }

    /// After a merge: forget what it may have changed under the early
    /// frees (claims and dedup records of pairs no longer allocated,
    /// queued blocks it freed or staged: bulkfree gives those back).
    fn after_merge(&mut self) {
        let allocated = |a: &Allocator, b: u64| a.block_state(b) == Some(BMAP_ALLOCATED);
        let gone: Vec<u64> = self
            .claimed
            .keys()
            .copied()
            .filter(|&b| !allocated(self, b))
            .collect();
        for b in gone {
            self.claimed.remove(&b);
        }
        let gone: Vec<u64> = self
            .dedup_shared
            .iter()
            .copied()
            .filter(|&b| !allocated(self, b))
            .collect();
        for b in gone {
            self.dedup_shared.remove(&b);
        }
        let queue = std::mem::take(&mut self.pending_frees);
        self.pending_frees = queue
            .into_iter()
            .filter(|(_, off)| super::blocks_of(*off).all(|b| allocated(self, b)))
            .collect();
        self.possibly_free = self
            .possibly_free
            .saturating_sub(self.possibly_free_at_start);
    }

    /// Merge a finished scan into the freemap in memory (the next flush
    /// writes it): blocks allocated since the pass started count as
    /// referenced; see the module header for the transitions.
    pub fn bulkfree_apply(&mut self, map: &mut ScanMap) -> Result<SyncStats> {
        self.check_poisoned()?;
        if map.token != self.bulkfree_started || self.bulkfree_applied >= map.token {
            return Err(Error::InvalidArgument {
                what: "a bulkfree scan that is not the latest, or merged already".into(),
            });
        }
        let recent = match self.bulkfree_recent.take() {
            Some(r) if r.token == map.token => r,
            _ => {
                return Err(Error::InvalidArgument {
                    what: "bulkfree pass without its allocation record".into(),
                })
            }
        };
        self.bulkfree_applied = map.token;
        // Blocks may go free (or their unreferenced 1 KiB pieces be handed
        // out again): no fingerprint taken before the merge is trusted.
        self.dedup.clear();
        let mut st = SyncStats::default();
        let zones: Vec<(u64, usize)> = self.tree.by_zone.iter().map(|(&z, &i)| (z, i)).collect();
        for (zone, idx) in zones {
            for n in 0..FREEMAP_COUNT {
                let base = zone + n as u64 * SEGSIZE;
                if base < self.allocator_beg || base >= self.total_size {
                    continue;
                }
                let live = self.leaf_data(idx).bmaps[n];
                let scan = with_recent(&map.bmap(zone, n), &recent.bmap(zone, n), &live);
                let bigmask = self.tree.nodes[idx].bref.freemap_bigmask();
                if live.bitmapq == scan.bitmapq
                    && live.linear >= scan.linear
                    && bigmask_good(&scan, bigmask)
                {
                    continue;
                }
                st.bmaps_changed += 1;
                self.with_bmap(idx, n, |b| sync_adjust(b, &scan, &mut st));
                let br = &mut self.tree.nodes[idx].bref;
                let avail = br.freemap_avail();
                br.set_freemap_hints(u32::MAX, avail);
                self.relaxed = false;
            }
        }
        for zone in map.zones() {
            if self.tree.by_zone.contains_key(&zone) {
                continue;
            }
            let used = (0..FREEMAP_COUNT).any(|n| {
                let b = map.bmap(zone, n);
                bmap::usable(zone, n, self.allocator_beg, self.total_size)
                    && b.class != 0
                    && b.avail != SEGSIZE as u32
            });
            if used {
                st.zones_without_leaf += 1;
                log::warn!("bulkfree: referenced blocks in zone {zone:#x}, which has no leaf");
            }
        }
        self.after_merge();
        self.allocator_free = if st.free_delta >= 0 {
            self.allocator_free.saturating_add(st.free_delta as u64)
        } else {
            self.allocator_free
                .saturating_sub(st.free_delta.unsigned_abs())
        };
        log::info!(
            "bulkfree merge: {} freed, {} staged, {} back to allocated, {} bmaps changed",
            st.freed,
            st.staged,
            st.staged_to_allocated,
            st.bmaps_changed
        );
        Ok(st)
    }

    /// Bytes in 16 KiB blocks staged by a bulkfree pass (state 10): free
    /// after the next pass unless referenced again.
    pub fn staged_bytes(&self) -> u64 {
        let mut n = 0;
        for &idx in self.tree.by_zone.values() {
            for b in &self.leaf_data(idx).bmaps {
                for &q in &b.bitmapq {
                    // Pairs 10: high bit set, low bit clear.
                    n += ((q >> 1) & !q & PAIRS_LOW).count_ones() as u64;
                }
            }
        }
        n * FREEMAP_BLOCK_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> ScanMap {
        // allocator_beg in the first zone's second bmap, 2 GiB volume.
        ScanMap::new(1, 0x80_0c00, 2 << 30)
    }

    #[test]
    fn initial_map_allocates_reserved_and_static_space() {
        let m = map();
        assert!(m.is_allocated(0), "reserved segment");
        assert!(m.is_allocated(0x80_0c00), "bmap holding allocator_beg");
        assert!(!m.is_allocated(0xc0_0000));
        assert!(m.is_allocated(LEAF_BYTES), "zone 1 reserved segment");
        assert!(!m.is_allocated(LEAF_BYTES + SEGSIZE));
    }

    #[test]
    fn marks_collapse_to_16k_and_push_linear() {
        let mut m = map();
        let base = 0x100_0000;
        m.mark(BlockrefType::Inode, DataOff::new(base + 1024, 10));
        m.mark(BlockrefType::Inode, DataOff::new(base + 5 * 1024, 10));
        m.mark(BlockrefType::Data, DataOff::new(base + 0x10000, 16));
        let b = m.bmap(0, 4);
        assert_eq!(b.bitmapq[0], 0b11 | (0xff << 8));
        assert_eq!(b.linear, 6 * 1024, "past the last small block");
        assert_eq!(b.avail, (SEGSIZE - 5 * FREEMAP_BLOCK_SIZE) as u32);
        assert!(m.is_allocated(base + 0x3000));
        assert!(!m.is_allocated(base + 0x4000));
        // A block below allocator_beg is newfs's, never counted.
        m.mark(BlockrefType::Inode, DataOff::new(0x40_0000, 10));
        assert_eq!((m.marked, m.ignored), (3, 1));
    }

    #[test]
    fn transitions_stage_then_free_and_restore() {
        let mut live = BmapData {
            avail: (SEGSIZE - 4 * FREEMAP_BLOCK_SIZE) as u32,
            class: 0x310,
            linear: 0,
            ..BmapData::default()
        };
        // Blocks 0..4 allocated, 4 staged; the scan references 0 and 4.
        live.bitmapq[0] = 0xff | (0b10 << 8);
        let mut scan = BmapData::default();
        scan.bitmapq[0] = 0b11 | (0b11 << 8);
        let mut st = SyncStats::default();
        sync_adjust(&mut live, &scan, &mut st);
        assert_eq!(
            live.bitmapq[0],
            0b11 | (0b10 << 2) | (0b10 << 4) | (0b10 << 6) | (0b11 << 8)
        );
        assert_eq!((st.staged, st.staged_to_allocated, st.freed), (3, 1, 0));
        // The next pass: nothing referenced any more but block 0.
        scan.bitmapq[0] = 0b11;
        let mut st = SyncStats::default();
        sync_adjust(&mut live, &scan, &mut st);
        assert_eq!(live.bitmapq[0], 0b11 | (0b10 << 8));
        assert_eq!((st.freed, st.staged), (3, 1));
        assert_eq!(st.free_delta, 3 * FREEMAP_BLOCK_SIZE as i64);
        assert_eq!(live.avail, (SEGSIZE - FREEMAP_BLOCK_SIZE) as u32);
        // Everything unreferenced, twice: the segment is reset.
        scan.bitmapq[0] = 0;
        sync_adjust(&mut live, &scan, &mut SyncStats::default());
        let mut st = SyncStats::default();
        sync_adjust(&mut live, &scan, &mut st);
        assert_eq!(live.bitmapq, [0; BMAP_ELEMENTS]);
        assert_eq!(
            (live.avail, live.class, live.linear),
            (SEGSIZE as u32, 0, 0)
        );
        assert_eq!(st.segments_cleaned, 1);
    }

    #[test]
    fn linear_never_points_into_a_freed_block() {
        let mut live = BmapData {
            linear: 0x9400,
            ..BmapData::default()
        };
        live.bitmapq[0] = 0b11 << 4; // block 2 (0x8000..0xc000), staged next
        live.bitmapq[1] = 0b11;
        let mut scan = BmapData {
            linear: 0x400,
            ..BmapData::default()
        };
        scan.bitmapq[0] = 0b11; // block 0 holds small blocks up to 0x400
        scan.bitmapq[1] = 0b11;
        sync_adjust(&mut live, &scan, &mut SyncStats::default());
        assert_eq!(
            live.linear, FREEMAP_BLOCK_SIZE as i32,
            "rounded to a boundary"
        );
        // Same block, further on: the cursor may move up inside it.
        live.linear = 0x200;
        live.bitmapq[0] |= 0b11 << 6;
        sync_adjust(&mut live, &scan, &mut SyncStats::default());
        assert_eq!(live.linear, 0x400);
    }

    #[test]
    fn bigmask_lists_free_runs() {
        let mut b = BmapData {
            bitmapq: [u64::MAX; BMAP_ELEMENTS],
            ..BmapData::default()
        };
        assert_eq!(bigmask_get(&b), 0);
        b.bitmapq[3] = !(3u64 << 6); // one free 16 KiB block
        assert_eq!(bigmask_get(&b), (1 << 15) - 1);
        b.bitmapq[3] = !(0xffu64 << 8); // an aligned free 64 KiB run
        assert_eq!(bigmask_get(&b), (1 << 17) - 1);
    }
}
