//! Freemap leaf entries (`bmap_data`): each describes 4 MiB with 2 bits per
//! 16 KiB block, plus a `linear` cursor for sub-16 KiB allocations and a
//! `class` that groups like allocations.

use super::le::{put_u16, put_u32, put_u64, u16_at, u32_at, u64_at};
use super::{FREEMAP_BLOCK_SIZE, FREEMAP_COUNT, FREEMAP_LEVELN_PSIZE};

pub const BMAP_BYTES: usize = 128;
pub const BMAP_ELEMENTS: usize = 8;
/// 16 KiB blocks per bmap_data (4 MiB / 16 KiB).
pub const BMAP_BLOCKS: usize = 256;
/// Blocks per 64-bit bitmap element (2 bits each).
pub const BMAP_BLOCKS_PER_ELEMENT: usize = 32;
const OFF_LINEAR: usize = 0x00;
const OFF_CLASS: usize = 0x04;
const OFF_AVAIL: usize = 0x1C;
const OFF_BITMAPQ: usize = 0x40;
const _: () = assert!(OFF_BITMAPQ + BMAP_ELEMENTS * 8 == BMAP_BYTES);
const _: () = assert!(BMAP_ELEMENTS * BMAP_BLOCKS_PER_ELEMENT == BMAP_BLOCKS);
const _: () = assert!(BMAP_BLOCKS as u64 * FREEMAP_BLOCK_SIZE == 4 * 1024 * 1024);
const _: () = assert!(FREEMAP_COUNT * BMAP_BYTES == FREEMAP_LEVELN_PSIZE);

/// 2-bit block states.
pub const BMAP_FREE: u8 = 0;
pub const BMAP_RESERVED: u8 = 1;
pub const BMAP_STAGED: u8 = 2;
pub const BMAP_ALLOCATED: u8 = 3;

#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct BmapData {
    pub linear: i32,
    pub class: u16,
    pub avail: u32,
    pub bitmapq: [u64; BMAP_ELEMENTS],
}

impl BmapData {
    /// Decode 128 bytes (caller passes exactly BMAP_BYTES or more).
    pub fn decode(b: &[u8]) -> BmapData {
        let mut bitmapq = [0u64; BMAP_ELEMENTS];
        for (i, q) in bitmapq.iter_mut().enumerate() {
            *q = u64_at(b, OFF_BITMAPQ + i * 8);
        }
        BmapData {
            linear: u32_at(b, OFF_LINEAR) as i32,
            class: u16_at(b, OFF_CLASS),
            avail: u32_at(b, OFF_AVAIL),
            bitmapq,
        }
    }

    /// The bmap_data at `index` of a freemap leaf.
    pub fn decode_at(leaf: &[u8], index: usize) -> Option<BmapData> {
        let start = index.checked_mul(BMAP_BYTES)?;
        leaf.get(start..start + BMAP_BYTES).map(BmapData::decode)
    }

    pub fn encode(&self, b: &mut [u8]) {
        b[..BMAP_BYTES].fill(0);
        put_u32(b, OFF_LINEAR, self.linear as u32);
        put_u16(b, OFF_CLASS, self.class);
        put_u32(b, OFF_AVAIL, self.avail);
        for (i, q) in self.bitmapq.iter().enumerate() {
            put_u64(b, OFF_BITMAPQ + i * 8, *q);
        }
    }

    /// Write the fields this type models over `b` (at least BMAP_BYTES),
    /// leaving the reserved bytes as they are, so a leaf read from disk
    /// and written back keeps whatever DragonFly stored there.
    pub fn encode_fields(&self, b: &mut [u8]) {
        put_u32(b, OFF_LINEAR, self.linear as u32);
        put_u16(b, OFF_CLASS, self.class);
        put_u32(b, OFF_AVAIL, self.avail);
        for (i, q) in self.bitmapq.iter().enumerate() {
            put_u64(b, OFF_BITMAPQ + i * 8, *q);
        }
    }

    /// State of 16 KiB block `n` (0..256).
    pub fn block_state(&self, n: usize) -> u8 {
        let q = self.bitmapq[n / BMAP_BLOCKS_PER_ELEMENT];
        ((q >> ((n % BMAP_BLOCKS_PER_ELEMENT) * 2)) & 3) as u8
    }

    pub fn set_block_state(&mut self, n: usize, state: u8) {
        let e = n / BMAP_BLOCKS_PER_ELEMENT;
        let shift = (n % BMAP_BLOCKS_PER_ELEMENT) * 2;
        self.bitmapq[e] = (self.bitmapq[e] & !(3u64 << shift)) | (((state & 3) as u64) << shift);
    }

    /// Count of 16 KiB blocks not free.
    pub fn blocks_used(&self) -> usize {
        (0..BMAP_BLOCKS)
            .filter(|&n| self.block_state(n) != BMAP_FREE)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_pairs() {
        let mut bm = BmapData::default();
        bm.set_block_state(0, BMAP_ALLOCATED);
        bm.set_block_state(33, BMAP_STAGED);
        bm.set_block_state(255, BMAP_RESERVED);
        assert_eq!(bm.bitmapq[0], 3);
        assert_eq!(bm.bitmapq[1], 2 << 2);
        assert_eq!(bm.bitmapq[7], 1 << 62);
        assert_eq!(bm.blocks_used(), 3);
        let mut raw = [0u8; BMAP_BYTES];
        bm.encode(&mut raw);
        assert_eq!(BmapData::decode(&raw), bm);
    }
}
