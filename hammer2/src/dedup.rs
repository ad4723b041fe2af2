//! Live dedup on write: a file data block whose exact physical bytes were
//! written recently shares the block already on disk instead of taking a
//! new one, as DragonFly's `hammer2_dedup_record`/`hammer2_dedup_lookup`
//! do (DragonFly keys a small per-mount heuristic table by the block's
//! check code; we key by a BLAKE3 fingerprint of the physical bytes,
//! whatever the block's check method).
//!
//! The table (`DedupTable`) is bounded and remembers recent writes only.
//! The allocator owns it (`Allocator::dedup`), because the allocator is
//! what frees blocks, and it keeps these rules:
//! - a hit is offered only while every 16 KiB freemap block under it is
//!   allocated (state 11): never a block freed or staged by bulkfree;
//! - an entry goes when its block is released (`release_unflushed`), and
//!   the whole table is dropped at each bulkfree merge;
//! - a hit on a block allocated since the last flush counts as a share,
//!   so `release_unflushed` does not give the block back while another
//!   blockref still points at it;
//! - a hit while a bulkfree pass runs is recorded as an allocation, so
//!   the merge counts the block referenced;
//! - before sharing, the caller compares the bytes on disk with the bytes
//!   it would write (`place_data`), so a stale entry can cost a read but
//!   never wrong data (DragonFly compares the bytes too);
//! - only blocks with a check code take part (`dedupable`), as in
//!   DragonFly.
//!
//! Nothing on disk records a share: as in DragonFly, a block is
//! referenced by as many blockrefs as share it, and bulkfree, which marks
//! every block any blockref reaches, keeps it while any does.

use crate::disk::DataOff;
use std::collections::{HashMap, VecDeque};

/// Entries kept: 64 Ki fingerprints, about 4 GiB of 64 KiB blocks
/// (about 10 MiB of memory).
pub const DEDUP_ENTRIES: usize = 64 * 1024;

/// What identifies a physical block's content: the BLAKE3 hash of the
/// exact bytes written, their length, and the blockref's methods byte
/// (a hit must carry the same compression and check methods).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DedupKey {
    pub hash: [u8; 32],
    pub bytes: u32,
    pub methods: u8,
}

impl DedupKey {
    pub fn of(phys: &[u8], methods: u8) -> DedupKey {
        DedupKey {
            hash: *blake3::hash(phys).as_bytes(),
            bytes: phys.len() as u32,
            methods,
        }
    }
}

/// A bounded map from fingerprint to block, oldest dropped first.
#[derive(Debug)]
pub struct DedupTable {
    by_key: HashMap<DedupKey, DataOff>,
    by_off: HashMap<u64, DedupKey>,
    order: VecDeque<(u64, DedupKey)>,
    cap: usize,
}

impl Default for DedupTable {
    fn default() -> Self {
        DedupTable::new(DEDUP_ENTRIES)
    }
}

impl DedupTable {
    pub fn new(cap: usize) -> DedupTable {
        DedupTable {
            by_key: HashMap::new(),
            by_off: HashMap::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn lookup(&self, key: &DedupKey) -> Option<DataOff> {
        self.by_key.get(key).copied()
    }

    /// Remember that `off` holds the bytes `key` names.
    pub fn record(&mut self, key: DedupKey, off: DataOff) {
        if let Some(old) = self.by_key.insert(key, off) {
            if old.offset() != off.offset() {
                self.by_off.remove(&old.offset());
            }
        }
        if let Some(old_key) = self.by_off.insert(off.offset(), key) {
            if old_key != key && self.by_key.get(&old_key) == Some(&off) {
                self.by_key.remove(&old_key);
            }
        }
        self.order.push_back((off.offset(), key));
        while self.order.len() > self.cap {
            let Some((o, k)) = self.order.pop_front() else {
                break;
            };
            if self.by_off.get(&o) == Some(&k) {
                self.by_off.remove(&o);
                self.by_key.remove(&k);
            }
        }
    }

    /// Forget the block at `offset` (it was freed or is not trusted).
    pub fn forget(&mut self, offset: u64) {
        if let Some(k) = self.by_off.remove(&offset) {
            if self.by_key.get(&k).map(|d| d.offset()) == Some(offset) {
                self.by_key.remove(&k);
            }
        }
    }

    pub fn clear(&mut self) {
        self.by_key.clear();
        self.by_off.clear();
        self.order.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> DedupKey {
        DedupKey::of(&[n; 1024], 0x32)
    }

    #[test]
    fn bounded_oldest_first_and_forget() {
        let mut t = DedupTable::new(3);
        for i in 0..5u8 {
            t.record(key(i), DataOff::new(0x40_0000 + u64::from(i) * 1024, 10));
        }
        assert_eq!(t.len(), 3);
        assert_eq!(t.lookup(&key(0)), None);
        assert_eq!(t.lookup(&key(1)), None);
        assert_eq!(t.lookup(&key(4)), Some(DataOff::new(0x40_1000, 10)));
        t.forget(0x40_1000);
        assert_eq!(t.lookup(&key(4)), None);
        // A block reused for other bytes drops its old fingerprint.
        t.record(key(9), DataOff::new(0x40_0c00, 10));
        assert_eq!(t.lookup(&key(3)), None);
        assert_eq!(t.lookup(&key(9)), Some(DataOff::new(0x40_0c00, 10)));
        t.clear();
        assert!(t.is_empty());
    }

    #[test]
    fn key_covers_bytes_length_and_methods() {
        let a = DedupKey::of(&[1u8; 1024], 0x32);
        assert_eq!(a.hash, *blake3::hash(&[1u8; 1024]).as_bytes());
        assert_ne!(a, DedupKey::of(&[1u8; 2048], 0x32));
        assert_ne!(a, DedupKey::of(&[1u8; 1024], 0x33));
    }
}
