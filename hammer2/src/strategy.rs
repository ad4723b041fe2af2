//! How a file data block goes to disk (DragonFly's `hammer2_strategy.c`):
//! the compression choice (`CompHeuristic`, DragonFly's `comp_heuristic`),
//! the encoding (`encode_data_block`: zero blocks become holes, the
//! keep-only-if-half rule, the physical size of the file's last block),
//! and the placement (`place_data`: a recent block with the same bytes,
//! through the dedup table, else a new allocation; `write_placed`).
//! The flush's writer and the pipelined batch both write data this way.

use crate::alloc::SpaceMap;
use crate::compress;
use crate::dedup::DedupKey;
use crate::disk::{self, comp_method, enc_methods, Blockref, BlockrefType, DataOff};
use crate::error::{Error, Result};
use bufcache::BlockDevice;

/// The physical size DragonFly gives the block holding the file's end:
/// the smallest power of two of at least 1 KiB holding the remainder.
pub fn physical_block_size(size: u64, lbase: u64) -> u64 {
    let block = disk::DATA_BLOCK_BYTES;
    if lbase + block <= size {
        return block;
    }
    let eof = size.saturating_sub(lbase).max(1);
    eof.next_power_of_two().clamp(1024, block)
}

/// When to try compressing a file's next block, as DragonFly's
/// `hammer2_compress_and_write` decides (its `comp_heuristic`): every
/// block until 8 in a row fail to compress, then one block in 8 until
/// one compresses again. Incompressible files (media, archives, random
/// data) then cost one compression attempt per 8 blocks, not one each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompHeuristic(u8);

impl CompHeuristic {
    /// Whether to attempt compression of the next block.
    pub fn attempt(&self) -> bool {
        self.0 < 8 || self.0 & 7 == 0
    }

    /// Record the outcome of a block: compressed, or stored as it is
    /// (failed or not attempted).
    pub fn record(&mut self, compressed: bool) {
        if compressed {
            self.0 = 0;
        } else {
            self.0 += 1;
            if self.0 > 128 {
                self.0 = 8;
            }
        }
    }
}

/// A file data block as it goes to disk: the physical bytes (compressed
/// per `comp_algo` when that halves it and `heur` says to try) and the
/// blockref methods; `None` for a block of zeros, which becomes a hole
/// (DragonFly skips zero detection only when both compression and check
/// are off).
pub fn encode_data_block(
    size: u64,
    lbase: u64,
    blk: &[u8],
    comp_algo: u8,
    check_algo: u8,
    heur: &mut CompHeuristic,
) -> Option<(Vec<u8>, u8)> {
    // A pending block may be shorter than its physical size (the rest
    // is zeros).
    let lsize = physical_block_size(size, lbase) as usize;
    let padded;
    let logical = if blk.len() >= lsize {
        &blk[..lsize]
    } else {
        padded = [blk, &vec![0u8; lsize - blk.len()]].concat();
        &padded[..]
    };
    let check = disk::dec_algo(check_algo);
    let comp = disk::dec_algo(comp_algo);
    let zero_detect = !(comp == comp_method::NONE && check <= disk::check_method::DISABLED);
    if zero_detect && logical.iter().all(|&b| b == 0) {
        return None;
    }
    let phys = match comp {
        comp_method::LZ4 | comp_method::ZLIB | comp_method::ZSTD => {
            let p = if heur.attempt() {
                compress::compress(comp, disk::dec_level(comp_algo), logical)
            } else {
                None
            };
            heur.record(p.is_some());
            p
        }
        _ => None,
    };
    Some(match phys {
        Some(p) => (p, enc_methods(check, comp)),
        None => {
            let used = if comp == comp_method::AUTOZERO {
                comp
            } else {
                comp_method::NONE
            };
            (logical.to_vec(), enc_methods(check, used))
        }
    })
}

/// The DATA blockref template for the block at `lbase`.
pub fn data_bref(lbase: u64, methods: u8) -> Blockref {
    let mut br = Blockref::EMPTY;
    br.btype = BlockrefType::Data;
    br.key = lbase;
    br.keybits = disk::DATA_BLOCK_RADIX;
    br.methods = methods;
    br
}

/// Where a file data block went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placed {
    /// A new block, to be written (`write_placed`) and then recorded.
    New(DataOff),
    /// An existing block with the same bytes; nothing to write.
    /// `durable`: the block was written by an earlier flush (a share of
    /// it is not released with `release_unflushed`).
    Shared { off: DataOff, durable: bool },
}

impl Placed {
    pub fn off(&self) -> DataOff {
        match *self {
            Placed::New(off) | Placed::Shared { off, .. } => off,
        }
    }
}

/// Blocks with a check code take part; as in DragonFly, blocks with
/// check NONE or DISABLED do not (DragonFly may overwrite such a block in
/// place, which a shared block must never be).
pub fn dedupable(methods: u8) -> bool {
    crate::disk::dec_check(methods) > crate::disk::check_method::DISABLED
}

/// Find a block for the file data `phys` (blockref methods `methods`,
/// file offset `key`): a recent block with the same bytes when the table
/// has one and the device confirms it, else a new allocation (always,
/// without `dedup`).
pub fn place_data(
    space: &mut dyn SpaceMap,
    dev: &dyn BlockDevice,
    fp: &DedupKey,
    phys: &[u8],
    key: u64,
    flush: bool,
    dedup: bool,
) -> Result<Placed> {
    if !dedup || !dedupable(fp.methods) {
        let off = space.alloc(BlockrefType::Data, phys.len() as u64, key, flush)?;
        return Ok(Placed::New(off));
    }
    // The candidate's bytes from memory only (a flush may hold the
    // mount's lock here): one that is not cached is not shared.
    let mut same = |off: DataOff| {
        let mut buf = vec![0u8; phys.len()];
        matches!(dev.read_cached(&mut buf, off.offset()), Ok(true)) && buf == phys
    };
    if let Some((off, durable)) = space.dedup(fp, &mut same) {
        return Ok(Placed::Shared { off, durable });
    }
    let off = space.alloc(BlockrefType::Data, phys.len() as u64, key, flush)?;
    Ok(Placed::New(off))
}

/// Write a newly placed block, delayed until the commit's barrier. (A
/// pipelined batch writes its blocks ahead, in runs: `FlushBatch`.)
pub fn write_placed(dev: &dyn BlockDevice, off: DataOff, phys: &[u8]) -> Result<()> {
    dev.write_at(phys, off.offset())
        .map_err(|source| Error::Io {
            op: "write",
            at: off.offset(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{check_method, comp_method, dec_comp, DATA_BLOCK_BYTES};

    /// Bytes no compressor shrinks (xorshift64).
    fn noise(seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..DATA_BLOCK_BYTES)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// DragonFly's rule (hammer2_strategy.c): try while the count of
    /// blocks stored uncompressed in a row is under 8 or a multiple of
    /// 8; the count wraps from 129 to 8; a compressed block resets it.
    #[test]
    fn heuristic_follows_dragonfly() {
        let mut h = CompHeuristic::default();
        let mut tried = Vec::new();
        for _ in 0..140 {
            tried.push(h.attempt());
            h.record(false);
        }
        let expect: Vec<bool> = (0..140)
            .map(|i| match i {
                0..=7 => true,
                // count 129 becomes 8: block 129 sees 8, then 9, ...
                129.. => (i - 121) % 8 == 0,
                _ => i % 8 == 0,
            })
            .collect();
        assert_eq!(tried, expect);
        h.record(true);
        assert!(h.attempt());
    }

    /// A file of incompressible blocks, then compressible ones: after
    /// the 20 noise blocks the count is 20, so blocks 20..24 are stored
    /// as they are and block 24 (count 24) is compressed, and those after
    /// it too.
    #[test]
    fn compressible_tail_after_noise() {
        let comp = comp_method::LZ4;
        let check = check_method::XXHASH64;
        let size = 30 * DATA_BLOCK_BYTES;
        let mut h = CompHeuristic::default();
        let mut compressed = Vec::new();
        for i in 0..30u64 {
            let blk = if i < 20 {
                noise(i + 1)
            } else {
                b"hammer2 ".repeat(DATA_BLOCK_BYTES as usize / 8)
            };
            let (phys, methods) =
                encode_data_block(size, i * DATA_BLOCK_BYTES, &blk, comp, check, &mut h)
                    .expect("not zeros");
            let c = dec_comp(methods) == comp_method::LZ4;
            assert_eq!(c, phys.len() < blk.len());
            compressed.push(c);
        }
        let expect: Vec<bool> = (0..30).map(|i| i >= 24).collect();
        assert_eq!(compressed, expect);
    }
}
