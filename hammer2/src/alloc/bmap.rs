//! One 4 MiB `bmap_data` at a time: DragonFly's `hammer2_bmap_alloc`
//! (the `linear` sub-16 KiB packing and the bitmap scan) and
//! `hammer2_freemap_init` (what a new leaf marks allocated), as pure
//! functions on `BmapData`, plus the free-space counts the allocator keeps.
//!
//! Facts from DragonFly's `hammer2_freemap.c` (behaviour, not code):
//! - Each 16 KiB block has two bits; an allocation of 32 KiB or 64 KiB
//!   takes 2 or 4 adjacent pairs aligned to its size, a smaller one takes
//!   one pair (the whole 16 KiB becomes "allocated").
//! - `linear` is a byte cursor inside the bmap. While it sits inside a
//!   16 KiB block (not on a boundary) and the request fits before the
//!   block's end, a sub-16 KiB request is taken at the cursor and the
//!   cursor advances. Otherwise the bitmap is scanned; after a bitmap
//!   allocation smaller than 16 KiB the cursor moves to just past it.
//! - DATA blocks of 16 KiB or more first try the position their key
//!   suggests within the 4 MiB (so file blocks land in file order).
//! - `avail` and the volume's `allocator_free` drop by 16 KiB when a pair
//!   goes from free to allocated (bitmap granular, as bulkfree can only
//!   undo whole pairs), by the allocation size for 16 KiB and larger.
//! - A bmap takes the class of its first allocation; class is
//!   `(bref type << 8) | 16` (the radix part is always PBUFRADIX).

use crate::disk::freemap::{BmapData, BMAP_ALLOCATED, BMAP_BLOCKS, BMAP_ELEMENTS, BMAP_FREE};
use crate::disk::{
    BlockrefType, FREEMAP_BLOCK_RADIX, FREEMAP_BLOCK_SIZE, FREEMAP_COUNT, FREEMAP_LEVEL0_RADIX,
    FREEMAP_LEVEL1_RADIX, PBUFRADIX, RADIX_MIN, ZONE_SEG,
};

/// Bytes one bmap_data covers (HAMMER2_SEGSIZE, 4 MiB).
pub const SEGSIZE: u64 = 1 << FREEMAP_LEVEL0_RADIX;
/// Bytes one leaf covers (1 GiB).
pub const LEAF_BYTES: u64 = 1 << FREEMAP_LEVEL1_RADIX;
const BLOCK_MASK: u64 = FREEMAP_BLOCK_SIZE - 1;
/// Bytes one 64-bit bitmap element covers (32 blocks, 512 KiB).
const ELEMENT_BYTES: u64 = SEGSIZE / BMAP_ELEMENTS as u64;
/// 64 KiB chunks per bmap (the unit the flush reserve counts).
pub const CHUNKS_PER_BMAP: u64 = SEGSIZE >> PBUFRADIX;
const PAIRS_LOW: u64 = 0x5555_5555_5555_5555;

const _: () = assert!(ELEMENT_BYTES == 32 * FREEMAP_BLOCK_SIZE);
const _: () = assert!(ZONE_SEG == SEGSIZE);

/// The clustering class DragonFly gives an allocation of `btype`.
pub fn class_of(btype: BlockrefType) -> u16 {
    ((btype.to_u8() as u16) << 8) | PBUFRADIX as u16
}

/// Where `bmap_alloc` put an allocation: byte offset inside the bmap and
/// the bitmap-granular bytes it took from `avail` / `allocator_free`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub offset: u64,
    pub bgsize: u64,
}

/// Bits per allocation in the bitmap: 2 up to 16 KiB, 4 for 32 KiB, 8
/// for 64 KiB.
fn bmradix(radix: u8) -> u32 {
    if radix <= FREEMAP_BLOCK_RADIX {
        2
    } else {
        2 << (radix - FREEMAP_BLOCK_RADIX)
    }
}

fn ones(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// True when the `linear` cursor can serve a request of `size` bytes:
/// inside a block (not on a boundary), the request fits before the
/// block's end, and the cursor is a sane 1 KiB multiple inside the bmap.
/// (DragonFly asserts the last two; a corrupt cursor just disables the
/// path here.)
fn linear_usable(bmap: &BmapData, size: u64) -> bool {
    let lin = bmap.linear;
    if lin <= 0 || lin as u64 >= SEGSIZE || lin as u64 & ((1 << RADIX_MIN) - 1) != 0 {
        return false;
    }
    let within = lin as u64 & BLOCK_MASK;
    within != 0 && within + size <= FREEMAP_BLOCK_SIZE
}

/// Whether DragonFly's zone scan would try this bmap for `radix`: it has
/// `avail`, or (for sub-16 KiB requests) a cursor inside a block.
pub fn worth_trying(bmap: &BmapData, radix: u8) -> bool {
    bmap.avail != 0 || (radix < FREEMAP_BLOCK_RADIX && bmap.linear as u64 & BLOCK_MASK != 0)
}

/// Allocate `1 << radix` bytes in `bmap` (`hammer2_bmap_alloc`). `key` is
/// the key of the blockref being allocated (DATA: the file offset).
/// `None` when the bmap has no room; the bmap is then unchanged.
pub fn bmap_alloc(bmap: &mut BmapData, class: u16, key: u64, radix: u8) -> Option<Placement> {
    debug_assert!((RADIX_MIN..=PBUFRADIX).contains(&radix));
    let size = 1u64 << radix;
    let bits = bmradix(radix);
    let (i, j, offset) = if linear_usable(bmap, size) {
        let offset = bmap.linear as u64;
        let i = (offset / ELEMENT_BYTES) as usize;
        let j = ((offset / (FREEMAP_BLOCK_SIZE / 2)) & 62) as u32;
        bmap.linear = (offset + size) as i32;
        (i, j, offset)
    } else {
        let (i, j) = scan(bmap, class, key, radix, bits)?;
        let offset = i as u64 * ELEMENT_BYTES + j as u64 * (FREEMAP_BLOCK_SIZE / 2);
        if size & BLOCK_MASK != 0 {
            bmap.linear = (offset + size) as i32;
        }
        (i, j, offset)
    };
    let mask = ones(bits) << j;
    let bgsize = if radix < FREEMAP_BLOCK_RADIX {
        if bmap.bitmapq[i] & mask != 0 {
            0
        } else {
            FREEMAP_BLOCK_SIZE
        }
    } else {
        size
    };
    bmap.bitmapq[i] |= mask;
    if bmap.class == 0 {
        bmap.class = class;
    }
    // DragonFly's avail is a u32 that it decrements without a floor.
    bmap.avail = bmap.avail.wrapping_sub(bgsize as u32);
    Some(Placement { offset, bgsize })
}

/// The bitmap search of `hammer2_bmap_alloc`: first the spot a DATA key
/// suggests (16 KiB and larger), then every aligned run in order.
fn scan(bmap: &BmapData, class: u16, key: u64, radix: u8, bits: u32) -> Option<(usize, u32)> {
    if class >> 8 == BlockrefType::Data.to_u8() as u16 && radix >= FREEMAP_BLOCK_RADIX {
        // Keys of file data are 64 KiB multiples, so DragonFly's index is
        // always aligned to the run; align other keys the same way
        // rather than straddle a 64 KiB boundary.
        let k = key & (SEGSIZE - 1) & !((1u64 << radix) - 1);
        let i = (k / ELEMENT_BYTES) as usize;
        let j = ((k & (ELEMENT_BYTES - 1)) / FREEMAP_BLOCK_SIZE * 2) as u32;
        if bmap.bitmapq[i] & (ones(bits) << j) == 0 {
            return Some((i, j));
        }
    }
    for (i, q) in bmap.bitmapq.iter().enumerate() {
        let mut j = 0;
        while j < 64 {
            if q & (ones(bits) << j) == 0 {
                return Some((i, j));
            }
            j += bits;
        }
    }
    None
}

/// A freshly initialised leaf for the zone at `zone` (`hammer2_freemap_init`):
/// everything below `allocator_beg` (rounded up to 4 MiB), the zone's
/// reserved segment and everything past the volume's last whole 4 MiB is
/// marked allocated with `avail` 0 and `linear` at the end; the rest is
/// free with `avail` 4 MiB. Returns the 256 entries and the leaf bref's
/// `avail` hint.
pub fn init_leaf(zone: u64, allocator_beg: u64, total_size: u64) -> (Vec<BmapData>, u64) {
    debug_assert_eq!(zone & (LEAF_BYTES - 1), 0);
    let mut avail = LEAF_BYTES;
    let bmaps = (0..FREEMAP_COUNT)
        .map(|n| {
            let mut b = BmapData::default();
            if usable(zone, n, allocator_beg, total_size) {
                b.avail = SEGSIZE as u32;
            } else {
                b = unusable();
                avail -= SEGSIZE;
            }
            b
        })
        .collect();
    (bmaps, avail)
}

/// Whether bmap `n` of the leaf for `zone` is managed by the allocator at
/// all (the range `hammer2_freemap_init` and bulkfree leave free): not
/// below `allocator_beg` rounded up to 4 MiB, not the zone's reserved
/// segment, not past the volume's last whole 4 MiB.
pub fn usable(zone: u64, n: usize, allocator_beg: u64, total_size: u64) -> bool {
    let lokey = (allocator_beg.saturating_add(SEGSIZE - 1) & !(SEGSIZE - 1))
        .max(zone)
        .max(zone + ZONE_SEG);
    let hikey = (zone + LEAF_BYTES).min(total_size & !(SEGSIZE - 1));
    let key = zone + n as u64 * SEGSIZE;
    key >= lokey && key < hikey
}

/// A bmap the allocator never hands out: all allocated, no `avail`,
/// cursor at the end.
pub fn unusable() -> BmapData {
    BmapData {
        linear: SEGSIZE as i32,
        class: 0,
        avail: 0,
        bitmapq: [u64::MAX; BMAP_ELEMENTS],
    }
}

/// Free 16 KiB blocks (state 00) and wholly free 64 KiB chunks in a bmap.
pub fn free_counts(bmap: &BmapData) -> (u64, u64) {
    let mut blocks = 0;
    let mut chunks = 0;
    for &q in &bmap.bitmapq {
        blocks += 32 - ((q | (q >> 1)) & PAIRS_LOW).count_ones() as u64;
        chunks += q.to_le_bytes().iter().filter(|&&b| b == 0).count() as u64;
    }
    (blocks, chunks)
}

/// Set the 2-bit state of the 16 KiB block at byte `offset` of the bmap;
/// returns the state it had.
pub fn set_block(bmap: &mut BmapData, offset: u64, state: u8) -> u8 {
    let n = (offset / FREEMAP_BLOCK_SIZE) as usize;
    debug_assert!(n < BMAP_BLOCKS);
    let old = bmap.block_state(n);
    bmap.set_block_state(n, state);
    old
}

/// Mark the blocks under `[offset, offset + bytes)` of the bmap allocated
/// (`hammer2_freemap_adjust` with DORECOVER): free pairs cost `avail` 16 KiB
/// each; any change resets `linear` to 0 and sets the class if it was 0.
/// Returns the bytes newly taken from free (bitmap granular) and whether
/// anything changed.
pub fn mark_range(bmap: &mut BmapData, offset: u64, bytes: u64, class: Option<u16>) -> (u64, bool) {
    let first = offset & !BLOCK_MASK;
    let mut taken = 0;
    let mut changed = false;
    let mut at = first;
    while at < offset + bytes.max(1) {
        let n = (at / FREEMAP_BLOCK_SIZE) as usize;
        let old = bmap.block_state(n);
        if old != BMAP_ALLOCATED {
            changed = true;
            if old == BMAP_FREE {
                bmap.avail = bmap.avail.wrapping_sub(FREEMAP_BLOCK_SIZE as u32);
                taken += FREEMAP_BLOCK_SIZE;
            }
            if let Some(c) = class {
                if bmap.class == 0 {
                    bmap.class = c;
                }
            }
            bmap.set_block_state(n, BMAP_ALLOCATED);
        }
        at += FREEMAP_BLOCK_SIZE;
    }
    if changed {
        // DragonFly resets the cursor of a bmap it repairs, so a cursor
        // never points into a block someone else now owns.
        bmap.linear = 0;
    }
    (taken, changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> BmapData {
        BmapData {
            avail: SEGSIZE as u32,
            ..BmapData::default()
        }
    }

    #[test]
    fn small_allocations_pack_through_linear() {
        let mut b = fresh();
        let c = class_of(BlockrefType::Inode);
        let p0 = bmap_alloc(&mut b, c, 0, 10).unwrap();
        assert_eq!(
            p0,
            Placement {
                offset: 0,
                bgsize: FREEMAP_BLOCK_SIZE
            }
        );
        assert_eq!(b.linear, 1024);
        assert_eq!(b.class, c);
        // Fifteen more 1 KiB inodes fill the first 16 KiB block.
        for n in 1..16 {
            let p = bmap_alloc(&mut b, c, 0, 10).unwrap();
            assert_eq!(
                p,
                Placement {
                    offset: n * 1024,
                    bgsize: 0
                }
            );
        }
        // The cursor sits on a boundary now: the bitmap gives block 1.
        let p = bmap_alloc(&mut b, c, 0, 10).unwrap();
        assert_eq!(p.offset, FREEMAP_BLOCK_SIZE);
        assert_eq!(b.avail, (SEGSIZE - 2 * FREEMAP_BLOCK_SIZE) as u32);
        assert_eq!(b.bitmapq[0], 0b1111);
    }

    #[test]
    fn large_allocations_align_and_skip_used_pairs() {
        let mut b = fresh();
        let c = class_of(BlockrefType::Indirect);
        bmap_alloc(&mut b, c, 0, 14).unwrap();
        let p = bmap_alloc(&mut b, c, 0, 16).unwrap();
        assert_eq!(p.offset, 65536);
        assert_eq!(p.bgsize, 65536);
        let p = bmap_alloc(&mut b, c, 0, 15).unwrap();
        assert_eq!(p.offset, 32768);
        // Blocks 0 (16 KiB), 2-3 (32 KiB) and 4-7 (64 KiB); block 1 free.
        assert_eq!(b.bitmapq[0], 0xFFF3);
        assert_eq!(b.linear, 0, "16 KiB and up leave the cursor alone");
    }

    #[test]
    fn data_keys_choose_their_spot() {
        let mut b = fresh();
        let c = class_of(BlockrefType::Data);
        let p = bmap_alloc(&mut b, c, 5 * 65536, 16).unwrap();
        assert_eq!(p.offset, 5 * 65536);
        // Taken: falls back to the first free run.
        let p = bmap_alloc(&mut b, c, 5 * 65536, 16).unwrap();
        assert_eq!(p.offset, 0);
    }

    #[test]
    fn full_bmap_refuses_and_stays_unchanged() {
        let mut b = fresh();
        b.bitmapq = [u64::MAX; BMAP_ELEMENTS];
        b.bitmapq[3] = !(3u64 << 10);
        let before = b;
        assert!(bmap_alloc(&mut b, 0x110, 0, 15).is_none());
        assert_eq!(b, before);
        let p = bmap_alloc(&mut b, 0x110, 0, 14).unwrap();
        assert_eq!(p.offset, 3 * ELEMENT_BYTES + 5 * FREEMAP_BLOCK_SIZE);
    }

    #[test]
    fn init_marks_static_reserved_and_tail() {
        // allocator_beg inside the first zone, volume ending mid-zone 1.
        let beg = 0x840_0c00;
        let total = LEAF_BYTES + 100 * SEGSIZE + 12345;
        let (z0, avail0) = init_leaf(0, beg, total);
        let used0 = z0.iter().filter(|b| b.avail == 0).count() as u64;
        assert_eq!(used0, 0x880_0000 / SEGSIZE);
        assert_eq!(avail0, LEAF_BYTES - used0 * SEGSIZE);
        assert_eq!(z0[33].bitmapq, [u64::MAX; 8]);
        assert_eq!(z0[33].linear, SEGSIZE as i32);
        assert_eq!(z0[34].avail, SEGSIZE as u32);
        let (z1, _) = init_leaf(LEAF_BYTES, beg, total);
        assert_eq!(z1[0].avail, 0, "reserved segment of zone 1");
        assert_eq!(z1[1].avail, SEGSIZE as u32);
        assert_eq!(z1[99].avail, SEGSIZE as u32);
        assert_eq!(z1[100].avail, 0, "partial last bmap is past the end");
    }

    #[test]
    fn counts() {
        let mut b = fresh();
        assert_eq!(free_counts(&b), (256, 64));
        b.set_block_state(5, BMAP_ALLOCATED);
        b.set_block_state(40, 2);
        assert_eq!(free_counts(&b), (254, 62));
    }
}
