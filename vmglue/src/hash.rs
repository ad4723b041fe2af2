//! The lockless page hash (DragonFly 5.6's `vm_page_hash`): a cache in
//! front of the authoritative index, so that a lookup that hits a resident
//! page takes no lock.
//!
//! Four-way set-associative buckets of page indices. A slot is only a
//! hint: it may name a page since rebound to another key or freed. The
//! lookup checks the page's key, takes a hold, and checks the key again;
//! the hold protocol in `page.rs` guarantees that a key seen after a
//! successful hold stays until the hold is dropped. So the hash can never
//! return a page bound to another key, and stale slots cost only a miss.
//! Slots are filled on slow-path hits and on allocation, replacing an
//! empty or stale slot first, else one picked by the key's hash bits.
//!
//! Sizing: one bucket per page rounded up to a power of two, so four slots
//! per page and a load of at most one quarter; a resident working set then
//! almost never overflows a bucket (the bench measures the share).

#![forbid(unsafe_code)]

use crate::arena::HugeArray;
use crate::error::Result;
use crate::page::{Page, PageKey, KEY_NONE, NIL};
use std::sync::atomic::{AtomicU32, Ordering};

pub(crate) const WAYS: usize = 4;

pub(crate) struct PageHash {
    slots: HugeArray<AtomicU32>,
    shift: u32,
}

/// Fibonacci hashing of the raw key.
#[inline]
pub(crate) fn mix(raw: u64) -> u64 {
    (raw ^ (raw >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl PageHash {
    pub fn new(pages: usize) -> Result<PageHash> {
        let buckets = pages.max(2).next_power_of_two();
        Ok(PageHash {
            slots: HugeArray::new(buckets * WAYS, |_| AtomicU32::new(NIL))?,
            shift: 64 - buckets.trailing_zeros(),
        })
    }

    #[inline]
    fn bucket(&self, raw: u64) -> usize {
        (mix(raw) >> self.shift) as usize * WAYS
    }

    /// Find and hold the page bound to `key`, or `None` (the caller falls
    /// back to the index). Takes no lock.
    #[inline]
    pub fn lookup(&self, pages: &[Page], key: PageKey) -> Option<u32> {
        let raw = key.raw();
        let b = self.bucket(raw);
        for slot in &self.slots[b..b + WAYS] {
            let idx = slot.load(Ordering::Acquire);
            if idx == NIL {
                continue;
            }
            let page = &pages[idx as usize];
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
        let ways = &self.slots[b..b + WAYS];
        let mut victim = None;
        for (i, slot) in ways.iter().enumerate() {
            let cur = slot.load(Ordering::Relaxed);
            if cur == idx {
                return;
            }
            if victim.is_none() {
                let stale = cur == NIL || {
                    let k = pages[cur as usize].key.load(Ordering::Relaxed);
                    k == KEY_NONE || self.bucket(k) != b
                };
                if stale {
                    victim = Some(i);
                }
            }
        }
        let i = victim.unwrap_or((mix(raw) as usize >> 7) % WAYS);
        ways[i].store(idx, Ordering::Release);
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
