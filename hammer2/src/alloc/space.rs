//! `SpaceMap`: the allocator interface the write side draws on (the
//! flush's blocks, the frontend's admission, freeing at flush time,
//! dedup's table, bulkfree's access to the freemap), and its
//! implementation by the freemap `Allocator`. Tests put other maps
//! behind it (a full disk, a failing allocator).

use crate::alloc::{Allocator, Purpose, Request};
use crate::disk::{Blockref, BlockrefType, DataOff};
use crate::error::Result;
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
    /// durable tree references. False when it is not one (a commit
    /// since made its allocation durable).
    fn release_unflushed(&mut self, off: DataOff) -> bool;
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
    fn allocator_mut(&mut self) -> Option<&mut Allocator> {
        None
    }
}

impl SpaceMap for Allocator {
    fn alloc(&mut self, btype: BlockrefType, bytes: u64, key: u64, flush: bool) -> Result<DataOff> {
        let purpose = if flush {
            Purpose::Flush
        } else {
            Purpose::Frontend
        };
        self.alloc_request(Request {
            btype,
            bytes,
            key,
            purpose,
        })
    }
    fn release_unflushed(&mut self, off: DataOff) -> bool {
        match Allocator::release_unflushed(self, off) {
            Ok(()) => true,
            Err(e) => {
                log::debug!("release of unflushed block {off:?} refused: {e}");
                false
            }
        }
    }
    fn flush(&mut self, dev: &dyn BlockDevice, mirror_tid: u64) -> Result<[Blockref; 4]> {
        Allocator::flush(self, dev, mirror_tid)
    }
    fn free_bytes(&self) -> u64 {
        Allocator::free_bytes(self)
    }
    fn available_bytes(&self) -> u64 {
        // File data goes in 64 KiB blocks, which need whole free chunks.
        self.free_chunk_bytes()
            .saturating_sub(Allocator::reserve_bytes(self))
    }
    fn reserve_bytes(&self) -> u64 {
        Allocator::reserve_bytes(self)
    }
    fn allocator_free(&self) -> u64 {
        Allocator::allocator_free(self)
    }
    fn is_dirty(&self) -> bool {
        Allocator::is_dirty(self)
    }
    fn allocator_mut(&mut self) -> Option<&mut Allocator> {
        Some(self)
    }
    fn queue_free(&mut self, off: DataOff, data: bool, free_at: u64) -> bool {
        Allocator::queue_free(self, off, data, free_at)
    }
    fn note_possibly_free(&mut self, bytes: u64) {
        Allocator::note_possibly_free(self, bytes)
    }
    fn committed(&mut self, tid: u64) -> u64 {
        Allocator::committed(self, tid)
    }
    fn pending_frees(&self) -> usize {
        Allocator::pending_frees(self)
    }
    fn possibly_free_bytes(&self) -> u64 {
        Allocator::possibly_free_bytes(self)
    }
    fn dedup(
        &mut self,
        fp: &crate::dedup::DedupKey,
        same: &mut dyn FnMut(DataOff) -> bool,
    ) -> Option<(DataOff, bool)> {
        Allocator::dedup_share(self, fp, same)
    }
    fn dedup_record(&mut self, fp: crate::dedup::DedupKey, off: DataOff) {
        Allocator::dedup_record(self, fp, off)
    }
}
