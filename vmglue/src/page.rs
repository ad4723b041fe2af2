//! The page structure: one per frame of the arena, in an array that lives as
//! long as the `Vm` and is never freed or moved, so a page index read from
//! anywhere (even a stale hash slot) always names a valid structure.
//!
//! Fields and who may change them:
//! - `key`: the (object, index) the page is bound to, or `KEY_NONE`. Changed
//!   only while `refs` carries `RECLAIMING`, which needs a zero hold count,
//!   and only under the index shard lock of the key being removed or added.
//! - `refs`: the hold count (low 32 bits) and the `RECLAIMING` bit. Holds are
//!   taken and dropped with one atomic add each, never under a lock.
//! - `busy`: `EXCLUSIVE`, `WANTED` and a shared count. The content lock.
//! - `wire`: the wire count. Wiring needs the page busy (or held by the
//!   caller); neither wiring nor unwiring touches a queue.
//! - `queue`, `prev`, `next`: queue membership and links, changed only under
//!   the lock of the page's color, except the lockless `Wired -> Pending`
//!   hand-off done by the last unwire.
//! - `valid`, `dirty`: 1 KiB-block bitmaps, changed only while busy-exclusive.
//! - `home`: the page hash slot where lookups hold this page without
//!   touching it; set and cleared by the rules in `hash.rs`.
//! - `flags` (`REFERENCED`, `IN_PENDING`, `PREFETCHED`) and `act_count`: hints, written
//!   with plain atomics from anywhere.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

/// Bytes in one frame: HAMMER2's physical I/O unit (`HAMMER2_PBUFSIZE`).
pub const FRAME_BYTES: usize = 65536;
/// Bytes covered by one bit of the valid and dirty bitmaps: HAMMER2's
/// smallest block (radix 10).
pub const BLOCK_BYTES: usize = 1024;
/// Blocks per frame: the width of the valid and dirty bitmaps.
pub const BLOCKS_PER_FRAME: usize = FRAME_BYTES / BLOCK_BYTES;

const _: () = assert!(BLOCKS_PER_FRAME == 64, "bitmaps are one u64");

/// Identifies the owner of a set of pages (a device, for the buffer cache).
/// Handed out by `Vm::object_create`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(pub(crate) u16);

impl ObjectId {
    /// The raw number, for logs.
    pub fn get(self) -> u16 {
        self.0
    }
}

/// Largest object number; `0xffff` is reserved so no key equals `KEY_NONE`.
pub(crate) const OBJECT_MAX: u16 = 0xfffe;
/// Bits of the page index inside an object.
pub const INDEX_BITS: u32 = 48;

/// What a page is bound to: `object` in bits 63..48, the page `index`
/// within the object (offset / `FRAME_BYTES`) in bits 47..0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageKey(u64);

/// `key` of an unbound page.
pub(crate) const KEY_NONE: u64 = u64::MAX;

impl PageKey {
    /// The key of page `index` of `object`; `None` if `index` needs more
    /// than 48 bits.
    pub fn new(object: ObjectId, index: u64) -> Option<PageKey> {
        if index >> INDEX_BITS != 0 {
            return None;
        }
        Some(PageKey((u64::from(object.0) << INDEX_BITS) | index))
    }

    pub fn object(self) -> ObjectId {
        ObjectId((self.0 >> INDEX_BITS) as u16)
    }

    pub fn index(self) -> u64 {
        self.0 & ((1u64 << INDEX_BITS) - 1)
    }

    pub(crate) fn raw(self) -> u64 {
        self.0
    }

    pub(crate) fn from_raw(raw: u64) -> Option<PageKey> {
        (raw != KEY_NONE).then_some(PageKey(raw))
    }
}

impl std::fmt::Display for PageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{:#x}", self.object().0, self.index())
    }
}

/// Which queue a page is on. Stored in `Page::queue`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Queue {
    /// Unbound, ready to allocate.
    Free = 0,
    /// Bound and (probably) clean: reclaimable by the allocator at once.
    Cache = 1,
    /// Bound, not recently used: the pageout scan's input.
    Inactive = 2,
    /// Bound, recently used: aged by `act_count`.
    Active = 3,
    /// On no queue, owned by whoever holds it busy-exclusive: just
    /// allocated, being laundered or freed.
    None = 4,
    /// On no queue, waiting in the requeue stack after its last unwire.
    Pending = 5,
    /// Frame given back to the kernel (budget shrink).
    Offline = 6,
    /// On no queue: a scan met it wired and dequeued it (lazily). Its last
    /// unwire moves it to `Pending` with a CAS from exactly this state, so
    /// a late unwire can never disturb a page in any other state.
    Wired = 7,
}

/// Number of queue states (size of the counter array).
pub(crate) const QUEUE_STATES: usize = 8;

/// Queues that are linked lists (`Free`..=`Active`).
pub(crate) const LISTS: usize = 4;

impl Queue {
    pub(crate) fn from_u8(v: u8) -> Queue {
        match v {
            0 => Queue::Free,
            1 => Queue::Cache,
            2 => Queue::Inactive,
            3 => Queue::Active,
            4 => Queue::None,
            5 => Queue::Pending,
            6 => Queue::Offline,
            _ => Queue::Wired,
        }
    }

    pub(crate) fn is_list(self) -> bool {
        (self as usize) < LISTS
    }
}

/// `refs`: set while the key is being changed; holds back off.
pub(crate) const RECLAIMING: u64 = 1 << 63;
/// `refs`: the hold count.
pub(crate) const HOLD_MASK: u64 = 0xffff_ffff;

/// `busy`: held exclusively.
pub(crate) const BUSY_EXCLUSIVE: u32 = 1 << 31;
/// `busy`: someone sleeps waiting for it.
pub(crate) const BUSY_WANTED: u32 = 1 << 30;
/// `busy`: the shared count.
pub(crate) const BUSY_SHARED_MASK: u32 = BUSY_WANTED - 1;

/// `flags`: used since the last scan looked.
pub(crate) const PG_REFERENCED: u32 = 1;
/// `flags`: sits in the requeue stack.
pub(crate) const PG_IN_PENDING: u32 = 2;
/// `flags`: filled ahead of use (read-ahead); its first use is not yet a
/// re-reference.
pub(crate) const PG_PREFETCHED: u32 = 4;

/// Link value meaning "none".
pub(crate) const NIL: u32 = u32::MAX;

/// `act_count` given to a page on activation, added per reference seen by
/// the active scan, and its ceiling (DragonFly's ACT_INIT, ACT_ADVANCE,
/// ACT_MAX).
pub(crate) const ACT_INIT: u8 = 5;
pub(crate) const ACT_ADVANCE: u8 = 3;
pub(crate) const ACT_MAX: u8 = 64;

/// One page structure. 64 bytes, one cache line, so that traffic on one
/// page never slows a neighbour.
#[repr(align(64))]
pub(crate) struct Page {
    pub key: AtomicU64,
    pub refs: AtomicU64,
    pub valid: AtomicU64,
    pub dirty: AtomicU64,
    pub busy: AtomicU32,
    pub wire: AtomicU32,
    pub flags: AtomicU32,
    pub prev: AtomicU32,
    pub next: AtomicU32,
    pub pending_next: AtomicU32,
    /// The page hash slot that is this page's home, or `NIL` (see
    /// `hash.rs`).
    pub home: AtomicU32,
    pub queue: AtomicU8,
    pub act_count: AtomicU8,
}

const _: () = assert!(std::mem::size_of::<Page>() == 64);

impl Page {
    pub fn new(queue: Queue) -> Page {
        Page {
            key: AtomicU64::new(KEY_NONE),
            refs: AtomicU64::new(0),
            valid: AtomicU64::new(0),
            dirty: AtomicU64::new(0),
            busy: AtomicU32::new(0),
            wire: AtomicU32::new(0),
            flags: AtomicU32::new(0),
            prev: AtomicU32::new(NIL),
            next: AtomicU32::new(NIL),
            pending_next: AtomicU32::new(NIL),
            home: AtomicU32::new(NIL),
            queue: AtomicU8::new(queue as u8),
            act_count: AtomicU8::new(0),
        }
    }

    pub fn queue(&self) -> Queue {
        Queue::from_u8(self.queue.load(Ordering::SeqCst))
    }

    pub fn set_queue(&self, q: Queue) {
        self.queue.store(q as u8, Ordering::SeqCst);
    }

    pub fn hold_count(&self) -> u64 {
        self.refs.load(Ordering::SeqCst) & HOLD_MASK
    }

    /// Take a hold if no key change is in progress. The caller then checks
    /// the key: while a hold is up the key cannot change.
    #[inline]
    pub fn try_hold(&self) -> bool {
        let old = self.refs.fetch_add(1, Ordering::SeqCst);
        assert!(old & HOLD_MASK < HOLD_MASK, "page hold count overflow");
        if old & RECLAIMING != 0 {
            self.refs.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    #[inline]
    pub fn unhold(&self) {
        let old = self.refs.fetch_sub(1, Ordering::SeqCst);
        assert!(old & HOLD_MASK != 0, "page unheld with hold count zero");
    }

    /// Start a key change: succeeds only with no holds and no other change.
    pub fn try_begin_rebind(&self) -> bool {
        self.refs
            .compare_exchange(0, RECLAIMING, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    pub fn end_rebind(&self) {
        let old = self.refs.fetch_and(!RECLAIMING, Ordering::SeqCst);
        assert!(old & RECLAIMING != 0, "rebind ended that was not begun");
    }

    #[cfg(test)]
    pub fn is_referenced(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & PG_REFERENCED != 0
    }

    /// Mark used; writes only if not already marked, so hot pages are not
    /// written on every hit. The first use of a prefetched page only
    /// clears `PG_PREFETCHED`: like the access that allocated a page, it
    /// is not a re-reference.
    #[inline]
    pub fn set_referenced(&self) {
        let f = self.flags.load(Ordering::Relaxed);
        if f & PG_REFERENCED != 0 {
            return;
        }
        if f & PG_PREFETCHED != 0 {
            self.flags.fetch_and(!PG_PREFETCHED, Ordering::Relaxed);
        } else {
            self.flags.fetch_or(PG_REFERENCED, Ordering::Relaxed);
        }
    }

    /// Clear the referenced flag, returning whether it was set.
    pub fn test_and_clear_referenced(&self) -> bool {
        if self.flags.load(Ordering::Relaxed) & PG_REFERENCED == 0 {
            return false;
        }
        self.flags.fetch_and(!PG_REFERENCED, Ordering::Relaxed) & PG_REFERENCED != 0
    }

    pub fn try_busy_exclusive(&self) -> bool {
        self.busy
            .compare_exchange(0, BUSY_EXCLUSIVE, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    pub fn try_busy_shared(&self) -> bool {
        let mut v = self.busy.load(Ordering::Relaxed);
        loop {
            if v & BUSY_EXCLUSIVE != 0 {
                return false;
            }
            assert!(
                v & BUSY_SHARED_MASK < BUSY_SHARED_MASK,
                "page shared busy count overflow"
            );
            match self
                .busy
                .compare_exchange_weak(v, v + 1, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(cur) => v = cur,
            }
        }
    }

    /// Drop an exclusive busy. Returns true if a sleeper must be woken.
    pub fn unbusy_exclusive(&self) -> bool {
        let old = self.busy.swap(0, Ordering::Release);
        assert!(old & BUSY_EXCLUSIVE != 0, "page unbusied but not busy");
        old & BUSY_WANTED != 0
    }

    /// Turn an exclusive busy into one shared busy. Returns true if
    /// sleepers must be woken (shared ones can now enter).
    pub fn downgrade(&self) -> bool {
        let old = self.busy.swap(1, Ordering::Release);
        assert!(old & BUSY_EXCLUSIVE != 0, "page downgraded but not busy");
        old & BUSY_WANTED != 0
    }

    /// Drop a shared busy. Returns true if a sleeper must be woken.
    pub fn unbusy_shared(&self) -> bool {
        let mut v = self.busy.load(Ordering::Relaxed);
        loop {
            assert!(
                v & BUSY_SHARED_MASK != 0 && v & BUSY_EXCLUSIVE == 0,
                "page shared unbusy without a shared busy"
            );
            let mut new = v - 1;
            if new & BUSY_SHARED_MASK == 0 {
                new = 0;
            }
            match self
                .busy
                .compare_exchange_weak(v, new, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return new == 0 && v & BUSY_WANTED != 0,
                Err(cur) => v = cur,
            }
        }
    }

    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed) & (BUSY_EXCLUSIVE | BUSY_SHARED_MASK) != 0
    }

    pub fn wire_count(&self) -> u32 {
        self.wire.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_packs_object_and_index() {
        let k = PageKey::new(ObjectId(7), (1 << 48) - 1).unwrap();
        assert_eq!(k.object(), ObjectId(7));
        assert_eq!(k.index(), (1 << 48) - 1);
        assert!(PageKey::new(ObjectId(1), 1 << 48).is_none());
        let top = PageKey::new(ObjectId(OBJECT_MAX), (1 << 48) - 1).unwrap();
        assert_ne!(top.raw(), KEY_NONE);
        assert_eq!(PageKey::from_raw(top.raw()), Some(top));
        assert_eq!(PageKey::from_raw(KEY_NONE), None);
    }

    #[test]
    fn hold_blocks_rebind_and_rebind_blocks_hold() {
        let p = Page::new(Queue::Free);
        assert!(p.try_hold());
        assert!(!p.try_begin_rebind());
        p.unhold();
        assert!(p.try_begin_rebind());
        assert!(!p.try_hold());
        assert_eq!(p.hold_count(), 0);
        p.end_rebind();
        assert!(p.try_hold());
        p.unhold();
    }

    #[test]
    fn busy_shared_and_exclusive_exclude() {
        let p = Page::new(Queue::Free);
        assert!(p.try_busy_shared());
        assert!(p.try_busy_shared());
        assert!(!p.try_busy_exclusive());
        assert!(!p.unbusy_shared());
        p.busy.fetch_or(BUSY_WANTED, Ordering::SeqCst);
        assert!(p.unbusy_shared(), "last sharer wakes the waiter");
        assert_eq!(p.busy.load(Ordering::SeqCst), 0);
        assert!(p.try_busy_exclusive());
        assert!(!p.try_busy_shared());
        assert!(!p.unbusy_exclusive());
        assert!(!p.is_busy());
    }

    #[test]
    fn referenced_flag_round_trip() {
        let p = Page::new(Queue::Inactive);
        assert!(!p.test_and_clear_referenced());
        p.set_referenced();
        p.set_referenced();
        assert!(p.is_referenced());
        assert!(p.test_and_clear_referenced());
        assert!(!p.is_referenced());
    }
}
