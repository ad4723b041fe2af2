//! The lockless page hash (DragonFly 5.6's `vm_page_hash`): a lookup that
//! hits a resident page takes no lock, and touches one cache line.
//!
//! Four-way buckets of 16-byte slots, one bucket per 64-byte line. A slot
//! is the *home* of at most one page: it holds the page's key, and a state
//! word packing the page index, a hold count, `CLOSED`, and the
//! `REFERENCED` and `PREFETCHED` hints. A page has at most one home
//! (`Page::home`). A lookup that finds its key in an open slot takes its
//! hold on the slot itself, with one atomic add on the line it already
//! read, and sets the referenced hint there. It never reads the page
//! structure. That is what makes a hit cheap: one line, not two.
//!
//! Protocol:
//! - An open slot for (K, P) implies P is bound to K. A slot is opened only
//!   while the opener pins P (a page hold or busy), and so P cannot be
//!   unbound. It is closed before P is unbound.
//! - Closing (`open, 0 holds` to `CLOSED`) is one CAS on the state word.
//!   It fails while any slot hold is up, just as `try_begin_rebind` fails
//!   while a page hold is up. Unbinding a page needs both.
//! - A lookup adds its hold, then checks `CLOSED` and the key again. A
//!   closed slot or a changed key means back off. The key and index of an
//!   open slot cannot change while a hold is up, because changing them
//!   needs the slot closed.
//! - Whoever closes a slot owns its teardown: clearing the key and the
//!   page's `home`. State updates after that are CAS loops that keep the
//!   hold field, which lookups backing off from a closed slot touch
//!   briefly.
//! - A full bucket evicts a slot with no holds. The victim page keeps its
//!   binding and loses only its fast path, and its referenced hint moves to
//!   the page.
//!
//! Hazard holds: a hit does not even write the slot. Each thread publishes
//! the slot it holds in its own hazard record (a cache line of sixteen
//! entries, picked by a per-thread number), then checks that the slot is
//! still open with its key; the page is the one the open slot names.
//! Closing a slot (to unbind or evict) scans the hazard records after the
//! CAS and reopens the slot if it is published. Both sides are sequentially consistent, so one of them sees
//! the other. So hot pages shared by threads are read-shared lines, not
//! lines bounced by atomic adds. A thread whose record is full takes a slot
//! hold instead. A page with no home has no valid hazard, because a hazard
//! counts only once its slot is seen open, and a published open slot
//! cannot be closed.
//!
//! Sizing: at least 1.5 slots per page (the bucket count is rounded up to
//! a power of two, so 1.5 to 3), 24 to 48 bytes per page, 0.04% to 0.07% of
//! the frames they index. The table is what a hit reads, so its size is
//! what a hit costs: with a bucket per page (64 bytes) a 65,536-page set
//! spread its hot keys over 8 MiB, far beyond a core's L2, and hits ran at
//! 60% of the speed they have at a quarter of that. Buckets then hold 1.3
//! to 2.7 entries on average, so some overflow; a full bucket evicts with a
//! second chance (a slot whose referenced hint is set passes the hint to
//! its page and is skipped once), so the slots of a bucket go to its
//! hottest pages and overflow costs the cold ones their fast path, not the
//! hot ones (the bench counts the share of hits served here).

#![forbid(unsafe_code)]

use crate::arena::HugeArray;
use crate::error::Result;
use crate::page::{Page, PageKey, KEY_NONE, NIL, PG_PREFETCHED, PG_REFERENCED};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub(crate) const WAYS: usize = 4;

const CLOSED: u64 = 1 << 63;
const REFERENCED: u64 = 1 << 62;
const PREFETCHED: u64 = 1 << 61;
const HOLD_ONE: u64 = 1 << 32;
const HOLD_MASK: u64 = ((1 << 29) - 1) << 32;
const IDX_MASK: u64 = 0xffff_ffff;
/// State of an empty slot (its key is `KEY_NONE`).
const EMPTY: u64 = CLOSED | NIL as u64;

#[repr(C, align(16))]
pub(crate) struct Slot {
    key: AtomicU64,
    state: AtomicU64,
}

pub(crate) struct PageHash {
    slots: HugeArray<Slot>,
    shift: u32,
    hazards: Box<[HazardRecord]>,
}

/// Fibonacci hashing of the raw key.
#[inline]
pub(crate) fn mix(raw: u64) -> u64 {
    (raw ^ (raw >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// A hit: the page, and where its hold is (`via`: a slot index, or a
/// hazard entry with `VIA_HAZARD` set).
#[derive(Clone, Copy)]
pub(crate) struct Hit {
    pub via: u32,
    pub idx: u32,
}

/// `Hit::via` of a hazard hold.
pub(crate) const VIA_HAZARD: u32 = 1 << 31;
/// Hazard entries per thread record: one cache line.
const HAZARDS: usize = 16;
/// Thread records; threads beyond share records (entries are claimed by
/// CAS, so sharing is safe, only slower).
const RECORDS: usize = 32;

#[repr(align(64))]
struct HazardRecord {
    entries: [AtomicU32; HAZARDS],
}

impl PageHash {
    pub fn new(pages: usize) -> Result<PageHash> {
        // 1.5 slots per page at least: pages * 3 / 8 buckets of four.
        let buckets = (pages.max(2) * 3).div_ceil(2 * WAYS).next_power_of_two();
        Ok(PageHash {
            slots: HugeArray::new(buckets * WAYS, |_| Slot {
                key: AtomicU64::new(KEY_NONE),
                state: AtomicU64::new(EMPTY),
            })?,
            shift: 64 - buckets.trailing_zeros(),
            hazards: (0..RECORDS)
                .map(|_| HazardRecord {
                    entries: std::array::from_fn(|_| AtomicU32::new(NIL)),
                })
                .collect(),
        })
    }

    #[inline]
    fn bucket(&self, raw: u64) -> usize {
        (mix(raw) >> self.shift) as usize * WAYS
    }

    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Find `key` and hold its page: a hazard entry if one is free, else a
    /// slot hold. Takes no lock and reads no page structure. The first use
    /// of a prefetched page only clears the hint; later ones set
    /// `REFERENCED`.
    #[inline]
    pub fn lookup(&self, key: PageKey) -> Option<Hit> {
        let raw = key.raw();
        let b = self.bucket(raw);
        for (i, slot) in self.slots[b..b + WAYS].iter().enumerate() {
            if slot.key.load(Ordering::Acquire) != raw {
                continue;
            }
            let s = (b + i) as u32;
            return match self.hazard_claim(s) {
                Some(entry) => self.hazard_validate(slot, raw, entry),
                None => self.slot_hold(slot, raw, s),
            };
        }
        None
    }

    /// Publish slot `s` in a free entry of this thread's hazard record.
    #[inline]
    fn hazard_claim(&self, s: u32) -> Option<u32> {
        let r = crate::stats::thread_slot() % RECORDS;
        let rec = &self.hazards[r];
        for (e, entry) in rec.entries.iter().enumerate() {
            if entry.load(Ordering::Relaxed) == NIL
                && entry
                    .compare_exchange(NIL, s, Ordering::SeqCst, Ordering::Relaxed)
                    .is_ok()
            {
                return Some((r * HAZARDS + e) as u32);
            }
        }
        None
    }

    /// After publishing: the hold counts if the slot is open and still
    /// has our key; closers scan hazards after closing, so either they see
    /// ours and reopen, or we see the slot closed or changed. The page is
    /// the one the open slot names.
    #[inline]
    fn hazard_validate(&self, slot: &Slot, raw: u64, entry: u32) -> Option<Hit> {
        let st = slot.state.load(Ordering::SeqCst);
        if st & CLOSED != 0 || slot.key.load(Ordering::SeqCst) != raw {
            self.hazard_release(entry);
            return None;
        }
        Self::note_use(slot, st);
        Some(Hit {
            via: entry | VIA_HAZARD,
            idx: (st & IDX_MASK) as u32,
        })
    }

    #[inline]
    pub fn hazard_release(&self, entry: u32) {
        let e = entry as usize;
        self.hazards[e / HAZARDS].entries[e % HAZARDS].store(NIL, Ordering::Release);
    }

    /// Whether some thread has published slot `s`.
    fn hazard_published(&self, s: u32) -> bool {
        self.hazards
            .iter()
            .any(|r| r.entries.iter().any(|e| e.load(Ordering::SeqCst) == s))
    }

    /// The referenced hint, written only when it changes.
    #[inline]
    fn note_use(slot: &Slot, st: u64) {
        if st & (REFERENCED | PREFETCHED) == 0 {
            slot.state.fetch_or(REFERENCED, Ordering::Relaxed);
        } else if st & PREFETCHED != 0 {
            slot.state.fetch_and(!PREFETCHED, Ordering::Relaxed);
        }
    }

    /// The fallback hold: an atomic add on the slot's hold count.
    fn slot_hold(&self, slot: &Slot, raw: u64, s: u32) -> Option<Hit> {
        let old = slot.state.fetch_add(HOLD_ONE, Ordering::SeqCst);
        if old & CLOSED != 0 || slot.key.load(Ordering::SeqCst) != raw {
            slot.state.fetch_sub(HOLD_ONE, Ordering::SeqCst);
            return None;
        }
        assert!(old & HOLD_MASK != HOLD_MASK, "page hash hold overflow");
        Self::note_use(slot, old);
        Some(Hit {
            via: s,
            idx: (old & IDX_MASK) as u32,
        })
    }

    /// Drop a hold taken by `lookup`.
    #[inline]
    pub fn release(&self, via: u32) {
        if via & VIA_HAZARD != 0 {
            self.hazard_release(via & !VIA_HAZARD);
        } else {
            let old = self.slots[via as usize]
                .state
                .fetch_sub(HOLD_ONE, Ordering::SeqCst);
            assert!(old & HOLD_MASK != 0, "page hash slot unheld with no hold");
        }
    }

    /// Holds on page `idx`'s home slot.
    pub fn holds(&self, pages: &[Page], idx: u32) -> u64 {
        let h = pages[idx as usize].home.load(Ordering::SeqCst);
        match self.slots.get(h as usize) {
            Some(s) => {
                let st = s.state.load(Ordering::SeqCst);
                if st & IDX_MASK == u64::from(idx) && st & CLOSED == 0 {
                    (st & HOLD_MASK) >> 32
                } else {
                    0
                }
            }
            None => 0,
        }
    }

    /// Update a slot's state keeping its hold field (lookups backing off a
    /// closed slot add and remove holds at any time).
    fn update(slot: &Slot, f: impl Fn(u64) -> u64) -> u64 {
        let mut cur = slot.state.load(Ordering::SeqCst);
        loop {
            let new = (cur & HOLD_MASK) | (f(cur) & !HOLD_MASK);
            match slot
                .state
                .compare_exchange_weak(cur, new, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return cur,
                Err(c) => cur = c,
            }
        }
    }

    /// Give page `idx`, bound to `key` and pinned by the caller (a page
    /// hold or busy), a home slot if it has none and one can be had.
    pub fn enter(&self, pages: &[Page], key: PageKey, idx: u32) {
        let page = &pages[idx as usize];
        if page.home.load(Ordering::SeqCst) != NIL {
            return;
        }
        let raw = key.raw();
        let b = self.bucket(raw);
        let ways = &self.slots[b..b + WAYS];
        // An empty slot, claimed by CAS from EMPTY (holds 0) to CLOSED|idx.
        let mut got = ways.iter().position(|s| {
            s.state
                .compare_exchange(
                    EMPTY,
                    CLOSED | u64::from(idx),
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_ok()
        });
        if got.is_none() {
            got = self.evict(pages, b, (mix(raw) >> 7) as usize % WAYS);
        }
        let Some(i) = got else { return };
        let slot = &ways[i];
        let s = (b + i) as u32;
        if page
            .home
            .compare_exchange(NIL, s, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            // A concurrent enter gave the page a home first.
            slot.key.store(KEY_NONE, Ordering::SeqCst);
            Self::update(slot, |_| EMPTY);
            return;
        }
        slot.key.store(raw, Ordering::SeqCst);
        let prefetched =
            page.flags.fetch_and(!PG_PREFETCHED, Ordering::Relaxed) & PG_PREFETCHED != 0;
        let hint = if prefetched { PREFETCHED } else { 0 };
        Self::update(slot, |_| hint | u64::from(idx));
    }

    /// Close and take over one slot of bucket `b` that has no holds,
    /// starting at way `start`; its page keeps its binding without a home.
    /// A slot whose referenced hint is set gets a second chance: the hint
    /// moves to its page (where pageout still finds it) and the slot is
    /// passed over while another way can be had. Returns the way, closed
    /// and claimed for the caller.
    fn evict(&self, pages: &[Page], b: usize, start: usize) -> Option<usize> {
        for k in 0..2 * WAYS {
            let i = (start + k) % WAYS;
            let slot = &self.slots[b + i];
            let st = slot.state.load(Ordering::SeqCst);
            if st & CLOSED != 0 || st & HOLD_MASK != 0 {
                continue;
            }
            if k < WAYS && st & REFERENCED != 0 {
                if slot.state.fetch_and(!REFERENCED, Ordering::SeqCst) & REFERENCED != 0 {
                    if let Some(v) = pages.get((st & IDX_MASK) as usize) {
                        v.flags.fetch_or(PG_REFERENCED, Ordering::Relaxed);
                    }
                }
                continue;
            }
            if slot
                .state
                .compare_exchange(
                    st,
                    CLOSED | (st & IDX_MASK),
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_err()
            {
                continue;
            }
            let victim = (st & IDX_MASK) as u32;
            if self.hazard_published((b + i) as u32) {
                Self::update(slot, |_| st);
                continue;
            }
            if let Some(v) = pages.get(victim as usize) {
                let _ = v.home.compare_exchange(
                    (b + i) as u32,
                    NIL,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
                if st & REFERENCED != 0 {
                    v.flags.fetch_or(PG_REFERENCED, Ordering::Relaxed);
                }
            }
            slot.key.store(KEY_NONE, Ordering::SeqCst);
            return Some(i);
        }
        None
    }

    /// Close page `idx`'s home slot before unbinding it. False if the slot
    /// has holds (the page is in use); true if it is closed or there was
    /// none.
    pub fn close_home(&self, pages: &[Page], idx: u32) -> bool {
        let page = &pages[idx as usize];
        loop {
            let h = page.home.load(Ordering::SeqCst);
            let Some(slot) = self.slots.get(h as usize) else {
                return true;
            };
            let st = slot.state.load(Ordering::SeqCst);
            if st & IDX_MASK == u64::from(idx) && st & CLOSED == 0 {
                if st & HOLD_MASK != 0 {
                    return false;
                }
                if slot
                    .state
                    .compare_exchange(st, st | CLOSED, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    if self.hazard_published(h) {
                        Self::update(slot, |st| st & !CLOSED);
                        return false;
                    }
                    return true;
                }
                continue;
            }
            // An eviction closed it and is about to clear `home`.
            std::thread::yield_now();
        }
    }

    /// The unbind that closed the home slot went ahead: empty the slot and
    /// forget the home. Returns the slot's referenced hint.
    pub fn release_home(&self, pages: &[Page], idx: u32) -> bool {
        let page = &pages[idx as usize];
        let h = page.home.swap(NIL, Ordering::SeqCst);
        let Some(slot) = self.slots.get(h as usize) else {
            return false;
        };
        slot.key.store(KEY_NONE, Ordering::SeqCst);
        Self::update(slot, |_| EMPTY) & REFERENCED != 0
    }

    /// The unbind that closed the home slot gave up: open it again.
    pub fn reopen_home(&self, pages: &[Page], idx: u32) {
        let h = pages[idx as usize].home.load(Ordering::SeqCst);
        if let Some(slot) = self.slots.get(h as usize) {
            Self::update(slot, |st| st & !CLOSED);
        }
    }

    /// Clear and return the referenced hint of page `idx`'s home slot.
    pub fn test_and_clear_referenced(&self, pages: &[Page], idx: u32) -> bool {
        let h = pages[idx as usize].home.load(Ordering::Relaxed);
        let Some(slot) = self.slots.get(h as usize) else {
            return false;
        };
        let st = slot.state.load(Ordering::Relaxed);
        if st & REFERENCED == 0 || st & IDX_MASK != u64::from(idx) {
            return false;
        }
        slot.state.fetch_and(!REFERENCED, Ordering::Relaxed) & REFERENCED != 0
    }

    /// Mark page `idx` prefetched: on its home slot if it has one.
    pub fn mark_prefetched(&self, pages: &[Page], idx: u32) {
        let page = &pages[idx as usize];
        let h = page.home.load(Ordering::SeqCst);
        match self.slots.get(h as usize) {
            Some(slot) => {
                slot.state.fetch_or(PREFETCHED, Ordering::Relaxed);
            }
            None => {
                page.flags.fetch_or(PG_PREFETCHED, Ordering::Relaxed);
            }
        }
    }

    /// Clear page `idx`'s hints on its home slot (the page was deactivated).
    pub fn clear_hints(&self, pages: &[Page], idx: u32) {
        let h = pages[idx as usize].home.load(Ordering::SeqCst);
        if let Some(slot) = self.slots.get(h as usize) {
            slot.state
                .fetch_and(!(REFERENCED | PREFETCHED), Ordering::Relaxed);
        }
    }

    /// Consistency at rest: every open slot is the home of a page bound to
    /// its key; no slot has holds; every page's home is open for it.
    pub fn verify(&self, pages: &[Page]) -> std::result::Result<(), String> {
        if let Some(e) = self
            .hazards
            .iter()
            .flat_map(|r| r.entries.iter())
            .position(|e| e.load(Ordering::SeqCst) != NIL)
        {
            return Err(format!("hazard entry {e} published at rest"));
        }
        for (s, slot) in self.slots.iter().enumerate() {
            let st = slot.state.load(Ordering::SeqCst);
            let key = slot.key.load(Ordering::SeqCst);
            if st & HOLD_MASK != 0 {
                return Err(format!("hash slot {s} has holds at rest"));
            }
            if st & CLOSED != 0 {
                if st & !(REFERENCED | PREFETCHED) != EMPTY || key != KEY_NONE {
                    return Err(format!("hash slot {s} closed but not empty at rest"));
                }
                continue;
            }
            let idx = (st & IDX_MASK) as u32;
            let Some(p) = pages.get(idx as usize) else {
                return Err(format!("hash slot {s} names page {idx}"));
            };
            if p.key.load(Ordering::SeqCst) != key || key == KEY_NONE {
                return Err(format!(
                    "hash slot {s} has key {key:#x}, page {idx} another"
                ));
            }
            if p.home.load(Ordering::SeqCst) != s as u32 {
                return Err(format!(
                    "hash slot {s} holds page {idx} whose home is elsewhere"
                ));
            }
        }
        for (i, p) in pages.iter().enumerate() {
            let h = p.home.load(Ordering::SeqCst);
            if h == NIL {
                continue;
            }
            let st = self
                .slots
                .get(h as usize)
                .map(|s| s.state.load(Ordering::SeqCst));
            if st.is_none_or(|st| st & CLOSED != 0 || st & IDX_MASK != i as u64) {
                return Err(format!("page {i} has home {h} that is not its open slot"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::{ObjectId, Queue};

    fn bind(pages: &[Page], idx: usize, k: PageKey) {
        pages[idx].key.store(k.raw(), Ordering::SeqCst);
    }

    #[test]
    fn closed_slot_never_returns_another_key() {
        let pages: Vec<Page> = (0..4).map(|_| Page::new(Queue::None)).collect();
        let h = PageHash::new(4).unwrap();
        let a = PageKey::new(ObjectId(1), 10).unwrap();
        let b = PageKey::new(ObjectId(1), 11).unwrap();
        bind(&pages, 2, a);
        h.enter(&pages, a, 2);
        let hit = h.lookup(a).unwrap();
        assert_eq!(hit.idx, 2);
        assert!(!h.close_home(&pages, 2), "held page's slot cannot close");
        h.release(hit.via);
        assert!(h.close_home(&pages, 2));
        assert!(h.lookup(a).is_none(), "closed slot refuses holds");
        h.release_home(&pages, 2);
        bind(&pages, 2, b);
        assert!(h.lookup(a).is_none());
        h.enter(&pages, b, 2);
        let hit = h.lookup(b).unwrap();
        assert_eq!(hit.idx, 2);
        h.release(hit.via);
        h.verify(&pages).unwrap();
    }

    #[test]
    fn full_bucket_evicts_an_unreferenced_slot_first() {
        // Whichever way holds the one unused page, that way is evicted.
        for unused in 0..WAYS {
            let pages: Vec<Page> = (0..8).map(|_| Page::new(Queue::None)).collect();
            let h = PageHash::new(8).unwrap();
            // Five keys that share bucket 0.
            let keys: Vec<PageKey> = (0..)
                .map(|i| PageKey::new(ObjectId(5), i).unwrap())
                .filter(|k| h.bucket(k.raw()) == 0)
                .take(WAYS + 1)
                .collect();
            for (i, k) in keys[..WAYS].iter().enumerate() {
                bind(&pages, i, *k);
                h.enter(&pages, *k, i as u32);
            }
            // Every other page is used: their slots carry the hint.
            for (i, k) in keys[..WAYS].iter().enumerate() {
                if i != unused {
                    let hit = h.lookup(*k).unwrap();
                    h.release(hit.via);
                }
            }
            bind(&pages, WAYS, keys[WAYS]);
            h.enter(&pages, keys[WAYS], WAYS as u32);
            assert!(
                h.lookup(keys[unused]).is_none(),
                "the unused page lost its slot"
            );
            for (i, k) in keys.iter().enumerate() {
                if i != unused {
                    let hit = h
                        .lookup(*k)
                        .expect("used pages and the newcomer keep slots");
                    h.release(hit.via);
                }
            }
            h.verify(&pages).unwrap();
        }
    }

    #[test]
    fn full_bucket_evicts_an_unheld_slot() {
        let pages: Vec<Page> = (0..64).map(|_| Page::new(Queue::None)).collect();
        let h = PageHash::new(64).unwrap();
        let keys: Vec<PageKey> = (0..64)
            .map(|i| PageKey::new(ObjectId(3), i).unwrap())
            .collect();
        for (i, k) in keys.iter().enumerate() {
            bind(&pages, i, *k);
            h.enter(&pages, *k, i as u32);
        }
        let mut found = 0;
        for (i, k) in keys.iter().enumerate() {
            if let Some(hit) = h.lookup(*k) {
                assert_eq!(hit.idx as usize, i);
                h.release(hit.via);
                found += 1;
            }
        }
        assert!(found >= 60, "only {found} of 64 found");
        h.verify(&pages).unwrap();
    }
}
