//! The flush: turning everything modified in memory into new blocks,
//! bottom-up, and committing them with a new volume header.
//!
//! Order, as DragonFly's `hammer2_flush` and `hammer2_vfs_sync`:
//! 1. each modified inode: its file data blocks (compressed per its
//!    `comp_algo`, zero blocks become holes), its long dirent names, its
//!    indirect blocks, then the inode block itself, whose new blockref
//!    goes into the PFS root's inode index;
//! 2. each PFS root, into the super-root; 3. the super-root;
//! 4. the freemap (`SpaceMap::flush`);
//! 5. a device barrier, the volume header into the next rotation slot,
//!    and a barrier.
//!
//! Every block written carries the flush's transaction id as its
//! `mirror_tid` and the check code of its inode's `check_algo`. A file
//! data block whose bytes match a recent write shares that block
//! (`dedup.rs`). Nothing
//! reachable from the previous header is ever overwritten, so a crash at
//! any point leaves the previous flush intact.

use crate::blocktable::{BlockSink, SetStats, TreeKind};
use crate::check;
use crate::compress;
use crate::dedup::{dedupable, place_data, write_placed, DedupKey, Placed};
use crate::disk::{
    self, comp_method, enc_methods, Blockref, BlockrefType, DataOff, BLOCKREF_BYTES,
};
use crate::error::{Error, Result};
use crate::inode::InodeNode;
use crate::volume::Volume;
use bufcache::BlockDevice;

/// The allocator the flush draws on (the freemap).
pub trait SpaceMap: Send {
    /// Allocate `bytes` (a power of two, 1 KiB to 64 KiB) for a block of
    /// type `btype` with key `key`. With `flush` true the allocation may
    /// use the reserve kept so a flush can always complete: the flush's
    /// own writes, whose file data the frontend admitted against
    /// `available_bytes` when it was written.
    fn alloc(&mut self, btype: BlockrefType, bytes: u64, key: u64, flush: bool) -> Result<DataOff>;
    /// Give back a block allocated since the last `flush` that no
    /// durable tree references.
    fn release_unflushed(&mut self, off: DataOff);
    /// Write the modified freemap copy-on-write; return the new
    /// freemap blockset for the volume header.
    fn flush(&mut self, dev: &dyn BlockDevice, mirror_tid: u64) -> Result<[Blockref; 4]>;
    /// Bytes free, the reserve included.
    fn free_bytes(&self) -> u64;
    /// Bytes new file data may take: whole free 64 KiB chunks less the
    /// flush reserve.
    fn available_bytes(&self) -> u64;
    /// The flush reserve.
    fn reserve_bytes(&self) -> u64 {
        0
    }
    /// The volume header's `allocator_free` after the last flush.
    fn allocator_free(&self) -> u64 {
        self.free_bytes()
    }
    /// True when the map has changes a flush must write.
    fn is_dirty(&self) -> bool {
        false
    }
    /// Live dedup: a recent block whose content has the fingerprint `fp`,
    /// still allocated, for which `same` (a byte comparison) holds; it
    /// is then shared: returns it and whether it was durable (written
    /// by an earlier flush). Maps without a dedup table return `None`.
    fn dedup(
        &mut self,
        _fp: &crate::dedup::DedupKey,
        _same: &mut dyn FnMut(DataOff) -> bool,
    ) -> Option<(DataOff, bool)> {
        None
    }
    /// Remember that the block `off`, just written, holds `fp`.
    fn dedup_record(&mut self, _fp: crate::dedup::DedupKey, _off: DataOff) {}
    /// Queue the committed block `off`, which the tree being committed
    /// no longer references and nothing else can, to be freed once the
    /// header with tid `free_at` is on the media (see alloc.rs, "Freeing
    /// at flush time"); `data` for file data blocks. Returns whether it
    /// was queued; maps that never free early return false.
    fn queue_free(&mut self, _off: DataOff, _data: bool, _free_at: u64) -> bool {
        false
    }
    /// Count bytes the topology stopped referencing that only bulkfree
    /// can give back.
    fn note_possibly_free(&mut self, _bytes: u64) {}
    /// The header with tid `tid` is on the media: free what waited for
    /// it. Returns the bytes given back.
    fn committed(&mut self, _tid: u64) -> u64 {
        0
    }
    /// Blocks queued by `queue_free` still waiting for a header.
    fn pending_frees(&self) -> usize {
        0
    }
    /// Bytes the topology stopped referencing that only bulkfree can
    /// give back (since the last bulkfree merge).
    fn possibly_free_bytes(&self) -> u64 {
        0
    }
    /// The freemap allocator behind this map, for bulkfree, which works
    /// on the freemap itself; `None` for maps that are not one.
    fn allocator_mut(&mut self) -> Option<&mut crate::alloc::Allocator> {
        None
    }
}

impl SpaceMap for crate::alloc::Allocator {
    fn alloc(&mut self, btype: BlockrefType, bytes: u64, key: u64, flush: bool) -> Result<DataOff> {
        let purpose = if flush {
            crate::alloc::Purpose::Flush
        } else {
            crate::alloc::Purpose::Frontend
        };
        self.alloc_request(crate::alloc::Request {
            btype,
            bytes,
            key,
            purpose,
        })
    }
    fn release_unflushed(&mut self, off: DataOff) {
        if let Err(e) = crate::alloc::Allocator::release_unflushed(self, off) {
            log::warn!("release of unflushed block {off:?} refused: {e}");
        }
    }
    fn flush(&mut self, dev: &dyn BlockDevice, mirror_tid: u64) -> Result<[Blockref; 4]> {
        crate::alloc::Allocator::flush(self, dev, mirror_tid)
    }
    fn free_bytes(&self) -> u64 {
        crate::alloc::Allocator::free_bytes(self)
    }
    fn available_bytes(&self) -> u64 {
        // File data goes in 64 KiB blocks, which need whole free chunks.
        self.free_chunk_bytes()
            .saturating_sub(crate::alloc::Allocator::reserve_bytes(self))
    }
    fn reserve_bytes(&self) -> u64 {
        crate::alloc::Allocator::reserve_bytes(self)
    }
    fn allocator_free(&self) -> u64 {
        crate::alloc::Allocator::allocator_free(self)
    }
    fn is_dirty(&self) -> bool {
        crate::alloc::Allocator::is_dirty(self)
    }
    fn allocator_mut(&mut self) -> Option<&mut crate::alloc::Allocator> {
        Some(self)
    }
    fn queue_free(&mut self, off: DataOff, data: bool, free_at: u64) -> bool {
        crate::alloc::Allocator::queue_free(self, off, data, free_at)
    }
    fn note_possibly_free(&mut self, bytes: u64) {
        crate::alloc::Allocator::note_possibly_free(self, bytes)
    }
    fn committed(&mut self, tid: u64) -> u64 {
        crate::alloc::Allocator::committed(self, tid)
    }
    fn pending_frees(&self) -> usize {
        crate::alloc::Allocator::pending_frees(self)
    }
    fn possibly_free_bytes(&self) -> u64 {
        crate::alloc::Allocator::possibly_free_bytes(self)
    }
    fn dedup(
        &mut self,
        fp: &crate::dedup::DedupKey,
        same: &mut dyn FnMut(DataOff) -> bool,
    ) -> Option<(DataOff, bool)> {
        crate::alloc::Allocator::dedup_share(self, fp, same)
    }
    fn dedup_record(&mut self, fp: crate::dedup::DedupKey, off: DataOff) {
        crate::alloc::Allocator::dedup_record(self, fp, off)
    }
}

/// Writes blocks for one flush.
pub struct Writer<'a> {
    pub vol: &'a Volume,
    pub space: &'a mut dyn SpaceMap,
    pub tid: u64,
    /// Blocks written, for the closing barrier and statistics.
    pub blocks: u64,
    pub bytes: u64,
}

impl Writer<'_> {
    /// Allocate and write `phys` (already padded to a power of two) for
    /// `br`, filling in data_off, check code and tids.
    pub fn write(&mut self, br: &mut Blockref, phys: &[u8]) -> Result<()> {
        let off = self
            .space
            .alloc(br.btype, phys.len() as u64, br.key, true)?;
        debug_assert_eq!(off.bytes(), phys.len() as u64);
        self.vol
            .device()
            .write_at(phys, off.offset())
            .map_err(|source| Error::Io {
                op: "write",
                at: off.offset(),
                source,
            })?;
        br.data_off = off;
        br.mirror_tid = self.tid;
        br.modify_tid = self.tid;
        check::set_check(br, phys);
        self.blocks += 1;
        self.bytes += phys.len() as u64;
        Ok(())
    }
}

impl Writer<'_> {
    /// Write the file data block `phys` for `br`, sharing a recent block
    /// with the same bytes when there is one (see `dedup.rs`).
    pub fn write_data(&mut self, br: &mut Blockref, phys: &[u8]) -> Result<()> {
        let fp = DedupKey::of(phys, br.methods);
        let dev = self.vol.device().clone();
        let placed = place_data(self.space, dev.as_ref(), &fp, phys, br.key, true)?;
        if let Placed::New(off) = placed {
            write_placed(dev.as_ref(), off, phys)?;
            if dedupable(br.methods) {
                self.space.dedup_record(fp, off);
            }
            self.blocks += 1;
            self.bytes += phys.len() as u64;
        }
        br.data_off = placed.off();
        br.mirror_tid = self.tid;
        br.modify_tid = self.tid;
        check::set_check(br, phys);
        Ok(())
    }
}

/// Indirect blocks of one inode, with its check method.
struct IndirectSink<'w, 'a> {
    w: &'w mut Writer<'a>,
    check_algo: u8,
}

impl BlockSink for IndirectSink<'_, '_> {
    fn write_indirect(&mut self, template: &Blockref, entries: &[Blockref]) -> Result<Blockref> {
        let mut buf = vec![0u8; entries.len() * BLOCKREF_BYTES];
        for (i, e) in entries.iter().enumerate() {
            e.encode_at(&mut buf, i);
        }
        let mut br = *template;
        br.methods = enc_methods(disk::dec_algo(self.check_algo), comp_method::NONE);
        self.w.write(&mut br, &buf)?;
        Ok(br)
    }
}

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

/// Write an inode's pending data blocks and long names, its indirect
/// blocks, and the inode block. Returns its new blockref (key `key`,
/// flags `flags`).
pub fn flush_inode(
    w: &mut Writer<'_>,
    node: &mut InodeNode,
    key: u64,
    flags: u8,
) -> Result<Blockref> {
    let check_algo = node.data.meta.check_algo;
    let comp_algo = node.data.meta.comp_algo;
    let inum = node.inum();
    let size = node.size();
    let pending = std::mem::take(&mut node.pending);
    for (lbase, blk) in pending {
        if lbase >= size {
            continue;
        }
        let heur = &mut node.comp_heuristic;
        match encode_data_block(size, lbase, &blk, comp_algo, check_algo, heur) {
            None => {
                node.table.delete(w.vol, lbase)?;
            }
            Some((phys, methods)) => {
                let mut br = data_bref(lbase, methods);
                w.write_data(&mut br, &phys)
                    .map_err(|e| e.with_place(None, Some(inum), Some(lbase)))?;
                node.table.insert(w.vol, TreeKind::File, true, br)?;
            }
        }
    }
    let dirents = std::mem::take(&mut node.pending_dirents);
    for (dkey, name) in dirents {
        let Some(mut br) = node.table.lookup(w.vol, dkey)? else {
            continue;
        };
        match name {
            Some(name) => {
                let mut block = vec![0u8; 1024];
                let n = name.len().min(1024);
                block[..n].copy_from_slice(&name[..n]);
                br.methods = enc_methods(disk::dec_algo(check_algo), comp_method::NONE);
                w.write(&mut br, &block)?;
            }
            None => {
                br.mirror_tid = w.tid;
                br.modify_tid = w.tid;
            }
        }
        node.table.insert(w.vol, TreeKind::Directory, true, br)?;
    }
    {
        let mut sink = IndirectSink { w, check_algo };
        node.table.flush(&mut sink)?;
    }
    node.table.sort();
    let mut br = Blockref::EMPTY;
    br.btype = BlockrefType::Inode;
    br.key = key;
    br.flags = flags;
    br.methods = enc_methods(disk::dec_algo(check_algo), disk::dec_algo(comp_algo));
    if node.data.meta.has_direct_data() {
        SetStats::default().apply(&mut br);
    } else {
        let set: [Blockref; disk::SET_COUNT] = node
            .table
            .entries()
            .try_into()
            .map_err(|_| Error::corrupt(format!("inode {inum} table is not a blockset"), 0))?;
        node.data.set_blockset(&set);
        SetStats::of(&set).apply(&mut br);
    }
    let raw = node.data.encode();
    w.write(&mut br, &raw)?;
    node.bref = br;
    node.dirty = false;
    Ok(br)
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
