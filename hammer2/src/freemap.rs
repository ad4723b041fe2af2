//! The freemap, read side: walking the freemap tree under the volume
//! header's `freemap_blockset` to its leaves, and looking up the 2-bit
//! state of any 16 KiB block.
//!
//! Each leaf covers 1 GiB (keybits 30) as 256 `bmap_data` entries of
//! 4 MiB. Zones with no leaf have never been allocated from, except the
//! space newfs allocated statically below `allocator_beg`.

use crate::chain;
use crate::disk::freemap::{BmapData, BMAP_BLOCKS};
use crate::disk::{
    Blockref, BlockrefType, FREEMAP_BLOCK_RADIX, FREEMAP_COUNT, FREEMAP_LEVEL0_RADIX,
    FREEMAP_LEVEL1_RADIX,
};
use crate::error::{Error, Result};
use crate::volume::Volume;
use std::collections::BTreeMap;

/// A freemap leaf: 1 GiB of the volume.
#[derive(Clone, Debug)]
pub struct FreemapLeaf {
    pub bref: Blockref,
    pub bmaps: Vec<BmapData>,
}

impl FreemapLeaf {
    /// First byte of the volume this leaf describes.
    pub fn zone_base(&self) -> u64 {
        self.bref.key & !((1u64 << FREEMAP_LEVEL1_RADIX) - 1)
    }
}

/// Decode a leaf's 32 KiB into its 256 entries.
pub fn decode_leaf(br: &Blockref, buf: &[u8]) -> Result<FreemapLeaf> {
    let bmaps: Vec<BmapData> = (0..FREEMAP_COUNT)
        .filter_map(|i| BmapData::decode_at(buf, i))
        .collect();
    if bmaps.len() != FREEMAP_COUNT {
        return Err(Error::corrupt(
            format!(
                "freemap leaf of {} bytes holds {} of {FREEMAP_COUNT} entries",
                buf.len(),
                bmaps.len()
            ),
            br.data_off.offset(),
        ));
    }
    Ok(FreemapLeaf { bref: *br, bmaps })
}

/// Every leaf of the freemap, keyed by zone base.
pub fn leaves(vol: &Volume) -> Result<BTreeMap<u64, FreemapLeaf>> {
    let mut out = BTreeMap::new();
    let set = vol.header.freemap_blockset;
    let mut failure = None;
    chain::scan_freemap(vol, &set, &mut |br| {
        if br.btype != BlockrefType::FreemapLeaf {
            failure = Some(Error::corrupt(
                format!("{} blockref in the freemap tree", br.btype.name()),
                br.data_off.offset(),
            ));
            return Ok(false);
        }
        let buf = vol.read_physical(br)?;
        let leaf = decode_leaf(br, &buf)?;
        out.insert(leaf.zone_base(), leaf);
        Ok(true)
    })?;
    match failure {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Where a byte offset falls in the freemap: (zone base, bmap index,
/// 16 KiB block index within the bmap).
pub fn locate(offset: u64) -> (u64, usize, usize) {
    let zone = offset & !((1u64 << FREEMAP_LEVEL1_RADIX) - 1);
    let within = offset - zone;
    let bmap = (within >> FREEMAP_LEVEL0_RADIX) as usize;
    let block = ((within & ((1u64 << FREEMAP_LEVEL0_RADIX) - 1)) >> FREEMAP_BLOCK_RADIX) as usize;
    debug_assert!(bmap < FREEMAP_COUNT && block < BMAP_BLOCKS);
    (zone, bmap, block)
}

/// The state of the 16 KiB block holding `offset`, or `None` when no
/// leaf covers it.
pub fn block_state(leaves: &BTreeMap<u64, FreemapLeaf>, offset: u64) -> Option<u8> {
    let (zone, bmap, block) = locate(offset);
    leaves
        .get(&zone)
        .and_then(|l| l.bmaps.get(bmap))
        .map(|b| b.block_state(block))
}

/// Free bytes the freemap shows: 16 KiB blocks in state free, over all
/// leaves, plus nothing for zones without a leaf (callers add those).
pub fn free_bytes_in_leaves(leaves: &BTreeMap<u64, FreemapLeaf>) -> u64 {
    leaves
        .values()
        .flat_map(|l| l.bmaps.iter())
        .map(|b| (BMAP_BLOCKS - b.blocks_used()) as u64 * (1u64 << FREEMAP_BLOCK_RADIX))
        .sum()
}
