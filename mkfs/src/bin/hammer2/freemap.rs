//! `hammer2 freemap`: the freemap tree with every leaf's `bmap_data`
//! rows, then DragonFly's storage totals. `FreemapStats` also gives
//! `info` its free-space figure.

use crate::show::{header_bref, VolumeCtx, Walker};
use crate::{header_problems, slot_line, CmdError, Image};
use hammer2::disk::freemap::{BmapData, BMAP_BLOCKS, BMAP_BLOCKS_PER_ELEMENT};
use hammer2::disk::{
    BlockrefType, FREEMAP_BLOCK_SIZE, FREEMAP_LEVEL0_RADIX, FREEMAP_LEVEL1_RADIX, ZONE_SEG,
};
use std::collections::BTreeSet;
use std::io::Write;

const BMAP_BYTES_COVERED: u64 = 1 << FREEMAP_LEVEL0_RADIX;
const LEAF_BYTES_COVERED: u64 = 1 << FREEMAP_LEVEL1_RADIX;

/// Storage totals over freemap leaves, as `hammer2 freemap` sums them.
/// Index 0..4 of the accumulators is the 2-bit block state (free,
/// reserved, possibly free, allocated).
#[derive(Debug, Default)]
pub struct FreemapStats {
    /// Bytes by state, counted per 16 KiB block.
    pub accum16: [u64; 4],
    /// Bytes by state, counted per 64 KiB chunk whose four blocks agree.
    pub accum64: [u64; 4],
    /// 4 MiB ranges below the end of the aux area or past the volume.
    pub unavail: u64,
    /// Bytes the leaves cover (1 GiB each).
    pub freemap: u64,
    /// Zone bases that have a leaf.
    pub zones: BTreeSet<u64>,
}

impl FreemapStats {
    pub fn add_leaf(&mut self, key: u64, bmaps: &[BmapData], aux_end: u64, volu_size: u64) {
        let base = key & !(LEAF_BYTES_COVERED - 1);
        for (i, bm) in bmaps.iter().enumerate() {
            let off = base.saturating_add(i as u64 * BMAP_BYTES_COVERED);
            if off < aux_end || off >= volu_size {
                self.unavail += BMAP_BYTES_COVERED;
                continue;
            }
            for n in 0..BMAP_BLOCKS {
                self.accum16[bm.block_state(n) as usize] += FREEMAP_BLOCK_SIZE;
            }
            for q in bm.bitmapq {
                for chunk in 0..BMAP_BLOCKS_PER_ELEMENT / 4 {
                    let byte = (q >> (chunk * 8)) & 0xff;
                    let state = byte & 3;
                    if byte == state * 0x55 {
                        self.accum64[state as usize] += 4 * FREEMAP_BLOCK_SIZE;
                    }
                }
            }
        }
        self.freemap += LEAF_BYTES_COVERED;
        self.zones.insert(base);
    }

    /// Free bytes in zones no leaf covers yet: all of each zone past its
    /// reserved segment (and past the aux area), within the volume.
    pub fn untouched_free(&self, aux_end: u64, volu_size: u64) -> u64 {
        let mut free = 0;
        let mut zone = 0u64;
        while zone < volu_size {
            if !self.zones.contains(&zone) {
                let beg = (zone + ZONE_SEG).max(aux_end);
                let end = (zone + LEAF_BYTES_COVERED).min(volu_size);
                free += end.saturating_sub(beg);
            }
            zone += LEAF_BYTES_COVERED;
        }
        free
    }

    pub fn print_totals(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let g = |b: u64| b as f64 / crate::fmt::GIB;
        writeln!(
            out,
            "Total unallocated storage:   {:6.3}GB ({:6.3}GB in 64KB chunks)",
            g(self.accum16[0]),
            g(self.accum64[0])
        )?;
        writeln!(
            out,
            "Total possibly free storage: {:6.3}GB ({:6.3}GB in 64KB chunks)",
            g(self.accum16[2]),
            g(self.accum64[2])
        )?;
        writeln!(
            out,
            "Total allocated storage:     {:6.3}GB ({:6.3}GB in 64KB chunks)",
            g(self.accum16[3]),
            g(self.accum64[3])
        )?;
        writeln!(
            out,
            "Total unavailable storage:   {:6.3}GB",
            g(self.unavail)
        )?;
        writeln!(
            out,
            "Total freemap storage:       {:6.3}GB",
            g(self.freemap)
        )
    }
}

/// `hammer2 freemap IMG`. Returns the number of damaged blocks found.
pub fn run(img: &Image, verbose: bool, out: &mut dyn Write) -> Result<u64, CmdError> {
    let vol = img.volume()?;
    let vh = &vol.header;
    writeln!(out, "{}", img.path.display())?;
    let mut problems = header_problems(&vol.slots);
    let mut damaged = problems.len() as u64;
    let mut stats = FreemapStats::default();
    for (i, slot) in vol.slots.iter().enumerate() {
        writeln!(out, "{}", slot_line(i, slot, Some(vol.header_index)))?;
        if i != vol.header_index {
            continue;
        }
        let ctx = VolumeCtx::new(vh, img.dev.size_bytes());
        let mut w = Walker::new(img.dev.as_ref(), ctx, out);
        w.verbose = verbose;
        w.stats = Some(FreemapStats::default());
        let offset = hammer2::disk::volhdr_offset(i);
        let root = header_bref(BlockrefType::Freemap, offset, vh.mirror_tid);
        w.show_bref(0, i, &root, true)?;
        damaged += w.damaged;
        problems.append(&mut w.problems);
        stats = w.stats.take().unwrap_or_default();
    }
    stats.print_totals(out)?;
    crate::report_damage(out, "freemap", damaged, &problems)?;
    Ok(damaged)
}
