//! The lockless page hash (DragonFly 5.6's `vm_page_hash`): a cache in
//! front of the authoritative index, so that a lookup that hits a resident
//! page takes no lock.
//!
//! Eight-way set-associative buckets of 32-bit slots, each packing a page
//! index (low `idx_bits`) with a tag taken from key hash bits that do not
//! pick the bucket (the rest), so a lookup reads one bucket and touches
//! only the page whose tag matches. A slot is only a hint: it may name a
//! page since rebound to another key or freed. The lookup checks the page's
//! key, takes a hold, and checks the key again; the hold protocol in
//! `page.rs` guarantees that a key seen after a successful hold stays
//! until the hold is dropped. So the hash can never return a page bound to
//! another key, and stale slots cost only a miss. Slots are filled on
//! slow-path hits and on allocation, replacing an empty or stale slot
//! first, else one picked by the key's hash bits.
//!
//! Sizing: two slots per page (one bucket of eight per four pages, rounded
//! up to a power of two), so a resident working set loads a bucket with
//! at most four entries on average and practically never overflows it
//! (the bench measures the share of hits served here), while the table
//! stays at 8 bytes per page: small enough to stay in cache, which is what
//! a lookup's speed depends on.

#![forbid(unsafe_code)]

use crate::arena::HugeArray;
use crate::error::Result;
use crate::page::{Page, PageKey, KEY_NONE};
use std::sync::atomic::{AtomicU32, Ordering};

pub(crate) const WAYS: usize = 8;

pub(crate) struct PageHash {
    slots: HugeArray<AtomicU32>,
    /// Right shift of the mixed key that leaves the bucket number.
    shift: u32,
    /// Bits of a slot holding the page index; the rest hold the tag.
    idx_bits: u32,
    /// All index bits set: the index part of an empty slot (no page has
    /// it, since `2^idx_bits` exceeds the page count).
    idx_mask: u32,
}

/// Fibonacci hashing of the raw key.
#[inline]
pub(crate) fn mix(raw: u64) -> u64 {
    (raw ^ (raw >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// An empty slot.
const EMPTY: u32 = u32::MAX;

impl PageHash {
    pub fn new(pages: usize) -> Result<PageHash> {
        let buckets = (pages.max(8).next_power_of_two() / 4).max(2);
        let idx_bits = usize::BITS - pages.leading_zeros();
        Ok(PageHash {
            slots: HugeArray::new(buckets * WAYS, |_| AtomicU32::new(EMPTY))?,
            shift: 64 - buckets.trailing_zeros(),
            idx_bits,
            idx_mask: ((1u64 << idx_bits) - 1) as u32,
        })
    }

    #[inline]
    fn bucket(&self, raw: u64) -> usize {
        (mix(raw) >> self.shift) as usize * WAYS
    }

    /// The tag of a key, already shifted into place.
    #[inline]
    fn tag(&self, raw: u64) -> u32 {
        ((mix(raw) as u32) << self.idx_bits.min(31)) & !self.idx_mask
    }

    #[inline]
    fn slot_of(&self, raw: u64, idx: u32) -> u32 {
        self.tag(raw) | idx
    }

    /// Find and hold the page bound to `key`, or `None` (the caller falls
    /// back to the index). Takes no lock.
    #[inline]
    pub fn lookup(&self, pages: &[Page], key: PageKey) -> Option<u32> {
        let raw = key.raw();
        let b = self.bucket(raw);
        let tag = self.tag(raw);
        let bucket: &[AtomicU32; WAYS] = self.slots[b..b + WAYS].try_into().ok()?;
        // Read the bucket, then find tag matches without a branch per
        // slot (the matching way is random, so per-slot branches would
        // mispredict on most lookups).
        let v: [u32; WAYS] = std::array::from_fn(|i| bucket[i].load(Ordering::Acquire));
        let mut matches = 0u32;
        for (i, &x) in v.iter().enumerate() {
            matches |= u32::from(x & !self.idx_mask == tag) << i;
        }
        while matches != 0 {
            let i = matches.trailing_zeros() as usize;
            matches &= matches - 1;
            let idx = v[i] & self.idx_mask;
            if idx == self.idx_mask {
                continue;
            }
            let Some(page) = pages.get(idx as usize) else {
                continue;
            };
            if page.key.load(Ordering::Relaxed) != raw {
                continue;
            }
            if !page.try_hold() {
                return None;
            }
            if page.key.load(Ordering::SeqCst) == raw {
                return Some(idx);
            }
            page.unhold();
        }
        None
    }

    /// Remember that page `idx` is bound to `key`.
    pub fn enter(&self, pages: &[Page], key: PageKey, idx: u32) {
        let raw = key.raw();
        let b = self.bucket(raw);
        let entry = self.slot_of(raw, idx);
        let ways = &self.slots[b..b + WAYS];
        let mut victim = None;
        for (i, slot) in ways.iter().enumerate() {
            let v = slot.load(Ordering::Relaxed);
            if v == entry {
                return;
            }
            if victim.is_none() {
                let old = v & self.idx_mask;
                let stale = old == self.idx_mask
                    || pages.get(old as usize).is_none_or(|p| {
                        let k = p.key.load(Ordering::Relaxed);
                        k == KEY_NONE || self.bucket(k) != b || self.slot_of(k, old) != v
                    });
                if stale {
                    victim = Some(i);
                }
            }
        }
        let i = victim.unwrap_or((mix(raw) as usize >> 7) % WAYS);
        ways[i].store(entry, Ordering::Release);
    }

    pub fn slots(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::{ObjectId, Queue};

    #[test]
    fn stale_slot_never_returns_another_key() {
        let pages: Vec<Page> = (0..4).map(|_| Page::new(Queue::None)).collect();
        let h = PageHash::new(4).unwrap();
        let a = PageKey::new(ObjectId(1), 10).unwrap();
        let b = PageKey::new(ObjectId(1), 11).unwrap();
        pages[2].key.store(a.raw(), Ordering::SeqCst);
        h.enter(&pages, a, 2);
        assert_eq!(h.lookup(&pages, a), Some(2));
        pages[2].unhold();
        // Rebind page 2 to b: the slot for a is now stale.
        pages[2].key.store(b.raw(), Ordering::SeqCst);
        assert_eq!(h.lookup(&pages, a), None);
        assert_eq!(pages[2].hold_count(), 0);
        h.enter(&pages, b, 2);
        assert_eq!(h.lookup(&pages, b), Some(2));
        pages[2].unhold();
    }

    #[test]
    fn fills_all_ways_before_evicting_live_entries() {
        let pages: Vec<Page> = (0..64).map(|_| Page::new(Queue::None)).collect();
        let h = PageHash::new(64).unwrap();
        let keys: Vec<PageKey> = (0..64)
            .map(|i| PageKey::new(ObjectId(3), i).unwrap())
            .collect();
        for (i, k) in keys.iter().enumerate() {
            pages[i].key.store(k.raw(), Ordering::SeqCst);
            h.enter(&pages, *k, i as u32);
        }
        let found = keys
            .iter()
            .enumerate()
            .filter(|(i, k)| {
                let hit = h.lookup(&pages, **k);
                if let Some(idx) = hit {
                    assert_eq!(idx as usize, *i);
                    pages[idx as usize].unhold();
                }
                hit.is_some()
            })
            .count();
        // 64 keys into 64 buckets of 4: overflow is possible but rare.
        assert!(found >= 60, "only {found} of 64 found");
    }
}
