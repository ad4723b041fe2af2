//! The `Vm`: the page array, lookup (lockless hash, then the index), page
//! allocation with reserve tiers, freeing, wiring, and the guards through
//! which callers reach a page: `PageHold` (a hold: the page keeps its key),
//! `PageShared` (busy-shared: read the frame) and `PageBusy`
//! (busy-exclusive: write the frame, change valid/dirty, free the page).
//!
//! Lock order: a color lock and an index shard lock are never held
//! together; a busy wait bucket may be taken under a color lock (to wake);
//! the budget lock is taken before a color lock. Holds, unholds, wire,
//! unwire and wakeups take no color lock.
//!
//! Allocation (`take_page`) pops the FREE queue of the caller's color,
//! then of the next colors, then the CACHE queues the same way: each queue
//! is looked at once from its head, never rescanned. Reserve tiers keep the
//! last free pages for the flush path and the last of those for pageout.
//! An allocating thread never writes a dirty page: below the reserve it
//! wakes pageout and sleeps.

// `unsafe` only at the marked frame-access sites, each with its SAFETY note.
#![deny(unsafe_code)]

use crate::arena::{Arena, HugeArray};
use crate::error::{AllocClass, Error, Result};
use crate::hash::PageHash;
use crate::index::PageIndex;
use crate::page::{
    ObjectId, Page, PageKey, Queue, ACT_INIT, FRAME_BYTES, KEY_NONE, NIL, OBJECT_MAX,
    PG_PREFETCHED, PG_REFERENCED,
};
use crate::pageout::Pager;
use crate::prefault::Prefault;
use crate::queue::{Locked, Queues};
use crate::stats::{thread_slot, LookupStats, Stats};
use crate::wait::WaitTable;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

/// Frames per segment: the unit in which the budget grows and shrinks and
/// memory goes back to the kernel (2 MiB).
pub const SEGMENT_FRAMES: usize = 32;
const SEGMENT_BYTES: u64 = (SEGMENT_FRAMES * FRAME_BYTES) as u64;
/// The smallest budget: two segments.
const BUDGET_SEGMENTS_MIN: usize = 2;

pub(crate) const SEG_ONLINE: u8 = 0;
pub(crate) const SEG_DRAINING: u8 = 1;
pub(crate) const SEG_RELEASED: u8 = 2;

pub(crate) struct Segment {
    pub state: AtomicU8,
    /// Pages of this segment that are `Offline`.
    pub offline: AtomicUsize,
}

/// How the page layer is sized.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Memory the frames may use, in bytes (rounded down to 2 MiB).
    pub budget_bytes: u64,
    /// Largest budget `set_budget` may grow to: the arena is reserved at
    /// this size (address space only) and the page array is sized for it.
    pub budget_bytes_max: u64,
    /// Lock shards of the queues.
    pub colors: usize,
    /// How long an allocation sleeps for a free page before failing.
    pub alloc_wait_max: Duration,
}

impl VmConfig {
    pub fn new(budget_bytes: u64) -> VmConfig {
        VmConfig {
            budget_bytes,
            budget_bytes_max: budget_bytes,
            colors: 8,
            alloc_wait_max: Duration::from_secs(10),
        }
    }
}

/// A snapshot of the queue sizes and counters.
#[derive(Clone, Debug)]
pub struct VmStats {
    pub budget_pages: usize,
    pub online_pages: usize,
    pub free: usize,
    pub cache: usize,
    pub inactive: usize,
    pub active: usize,
    pub unqueued: usize,
    pub pending: usize,
    pub wired: usize,
    /// Anonymous pages (`Vm::alloc_anon`), counted in `wired` too, and
    /// the most there were at once.
    pub anon: usize,
    pub anon_peak: usize,
    /// Frames the prefault thread made resident ahead of use.
    pub prefaulted: u64,
    pub lookups: LookupStats,
}

/// Free-page thresholds derived from the online page count.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Targets {
    pub reserve_pageout: usize,
    pub reserve_flush: usize,
    /// Low water: pageout is woken when free + cache falls below it.
    pub free_min: usize,
    /// Pageout stops when free + cache reaches it.
    pub free_target: usize,
    /// Clean pages kept findable on CACHE rather than freed.
    pub cache_target: usize,
    /// The active scan deactivates pages until INACTIVE holds this many:
    /// an eighth of memory, a probation queue in which new pages must
    /// earn a reference to stay (S3-FIFO keeps a tenth for the same job).
    pub inactive_target: usize,
}

pub struct Vm {
    pub(crate) cfg: VmConfig,
    pub(crate) arena: Arena,
    pub(crate) pages: HugeArray<Page>,
    pub(crate) queues: Queues,
    pub(crate) hash: PageHash,
    pub(crate) index: PageIndex,
    pub(crate) wait: WaitTable,
    pub(crate) segments: Box<[Segment]>,
    pub(crate) budget_lock: Mutex<()>,
    pub(crate) budget_pages: AtomicUsize,
    pub(crate) wired_pages: AtomicUsize,
    /// Anonymous pages (`anon.rs`), among the wired ones, and the most
    /// there were at once.
    pub(crate) anon_pages: AtomicUsize,
    pub(crate) anon_peak: AtomicUsize,
    pub(crate) objects: RwLock<Vec<Option<Weak<dyn Pager>>>>,
    free_lock: Mutex<()>,
    free_cv: Condvar,
    free_waiters: AtomicUsize,
    pub(crate) pageout_wanted: AtomicBool,
    /// Held for a whole pageout run, so runs never overlap and `verify`
    /// never watches one half done.
    pub(crate) pageout_run_lock: Mutex<()>,
    pub(crate) pageout_lock: Mutex<()>,
    pub(crate) pageout_cv: Condvar,
    pub(crate) prefault: Prefault,
    pub(crate) stats: Stats,
}

/// What `Vm::grab` found.
pub enum Grab<'a> {
    /// The key was resident: a held page (busy it to use the frame).
    Found(PageHold<'a>),
    /// A new page bound to the key, busy-exclusive, nothing valid.
    New(PageBusy<'a>),
}

/// A held page: its key cannot change until the hold is dropped. The hold
/// is on the page's hash slot (a lockless hit) or on the page.
pub struct PageHold<'a> {
    vm: &'a Vm,
    idx: u32,
    /// Where the hold is (`hash::Hit::via`), or `NIL` for a page hold.
    slot: u32,
}

/// A busy-shared page: the frame may be read.
pub struct PageShared<'a> {
    vm: &'a Vm,
    idx: u32,
}

/// A busy-exclusive page: the frame may be written.
pub struct PageBusy<'a> {
    vm: &'a Vm,
    idx: u32,
}

impl Vm {
    pub fn new(cfg: VmConfig) -> Result<Arc<Vm>> {
        let segs_online = (cfg.budget_bytes / SEGMENT_BYTES) as usize;
        let segs_max = (cfg.budget_bytes_max.max(cfg.budget_bytes) / SEGMENT_BYTES) as usize;
        if segs_online < BUDGET_SEGMENTS_MIN {
            return Err(Error::BudgetTooSmall {
                budget_bytes: cfg.budget_bytes,
                min_bytes: BUDGET_SEGMENTS_MIN as u64 * SEGMENT_BYTES,
            });
        }
        let frames = segs_max * SEGMENT_FRAMES;
        // Page hash slot numbers (four per page, rounded up) fit 31 bits.
        if frames > 1 << 28 {
            return Err(Error::BudgetTooLarge { frames });
        }
        let colors = cfg.colors.clamp(1, 64);
        let arena = Arena::new(frames)?;
        let online = segs_online * SEGMENT_FRAMES;
        let pages = HugeArray::new(frames, |i| {
            Page::new(if i < online {
                Queue::None
            } else {
                Queue::Offline
            })
        })?;
        let segments = (0..segs_max)
            .map(|s| Segment {
                state: AtomicU8::new(if s < segs_online {
                    SEG_ONLINE
                } else {
                    SEG_RELEASED
                }),
                offline: AtomicUsize::new(if s < segs_online { 0 } else { SEGMENT_FRAMES }),
            })
            .collect();
        let vm = Vm {
            arena,
            hash: PageHash::new(frames)?,
            queues: Queues::new(colors),
            index: PageIndex::new(),
            wait: WaitTable::new(),
            segments,
            budget_lock: Mutex::new(()),
            budget_pages: AtomicUsize::new(online),
            wired_pages: AtomicUsize::new(0),
            anon_pages: AtomicUsize::new(0),
            anon_peak: AtomicUsize::new(0),
            objects: RwLock::new(Vec::new()),
            free_lock: Mutex::new(()),
            free_cv: Condvar::new(),
            free_waiters: AtomicUsize::new(0),
            pageout_wanted: AtomicBool::new(false),
            pageout_run_lock: Mutex::new(()),
            pageout_lock: Mutex::new(()),
            pageout_cv: Condvar::new(),
            prefault: Prefault::new(colors),
            stats: Stats::new(),
            pages,
            cfg: VmConfig { colors, ..cfg },
        };
        for _ in 0..online {
            vm.queues.count_add(Queue::None);
        }
        for _ in online..frames {
            vm.queues.count_add(Queue::Offline);
        }
        for idx in 0..online as u32 {
            vm.lock_page(idx).enter(Queue::Free, idx);
        }
        log::info!(
            "vm: {} pages online of {} reserved, {} colors, {} hash slots",
            online,
            frames,
            colors,
            vm.hash.slots()
        );
        Ok(Arc::new(vm))
    }

    pub(crate) fn lock_page(&self, idx: u32) -> Locked<'_> {
        self.queues.lock_page(idx, &self.pages)
    }

    pub(crate) fn lock_color(&self, c: usize) -> Locked<'_> {
        self.queues.lock(c, &self.pages)
    }

    pub(crate) fn page(&self, idx: u32) -> &Page {
        &self.pages[idx as usize]
    }

    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    /// Frames online now (the budget, once a shrink has drained).
    pub fn online_pages(&self) -> usize {
        self.pages.len() - self.queues.count(Queue::Offline)
    }

    /// Frames the arena can ever hold.
    pub fn frames_max(&self) -> usize {
        self.pages.len()
    }

    pub(crate) fn targets(&self) -> Targets {
        let online = self.online_pages().max(1);
        let reserve_pageout = (online / 512).max(2);
        let reserve_flush = (online / 512).max(2);
        let free_min = (online / 64).max(reserve_pageout + reserve_flush + 2);
        let free_target = (free_min * 2).min(online / 2);
        Targets {
            reserve_pageout,
            reserve_flush,
            free_min,
            free_target,
            cache_target: free_target / 2,
            inactive_target: online / 8,
        }
    }

    /// Free plus cache: pages an allocation can take at once.
    pub(crate) fn available(&self) -> usize {
        self.queues.count(Queue::Free) + self.queues.count(Queue::Cache)
    }

    pub fn stats(&self) -> VmStats {
        VmStats {
            budget_pages: self.budget_pages.load(Ordering::Relaxed),
            online_pages: self.online_pages(),
            free: self.queues.count(Queue::Free),
            cache: self.queues.count(Queue::Cache),
            inactive: self.queues.count(Queue::Inactive),
            active: self.queues.count(Queue::Active),
            unqueued: self.queues.count(Queue::None) + self.queues.count(Queue::Wired),
            pending: self.queues.count(Queue::Pending),
            wired: self.wired_pages.load(Ordering::Relaxed),
            anon: self.anon_pages.load(Ordering::Relaxed),
            anon_peak: self.anon_peak.load(Ordering::Relaxed),
            prefaulted: self.prefault.frames.load(Ordering::Relaxed),
            lookups: self.stats.lookups(),
        }
    }

    pub fn reset_lookup_stats(&self) {
        self.stats.reset_lookups();
    }

    /// (wall, thread CPU) durations of the most recent pageout runs that
    /// started below low water (until free + cache reached the target, or
    /// a pass made no progress).
    pub fn pageout_durations(&self) -> Vec<(Duration, Duration)> {
        self.stats.pageout_durations()
    }

    pub fn reset_pageout_stats(&self) {
        self.stats.reset_pageout();
    }

    /// Register an object whose dirty pages `pager` writes.
    pub fn object_create(&self, pager: Weak<dyn Pager>) -> Result<ObjectId> {
        let mut objs = self.objects.write().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = objs.iter().position(|o| o.is_none()) {
            objs[i] = Some(pager);
            return Ok(ObjectId(i as u16));
        }
        if objs.len() > OBJECT_MAX as usize {
            return Err(Error::ObjectsExhausted);
        }
        objs.push(Some(pager));
        Ok(ObjectId((objs.len() - 1) as u16))
    }

    pub(crate) fn pager_of(&self, object: ObjectId) -> Option<Arc<dyn Pager>> {
        let objs = self.objects.read().unwrap_or_else(|p| p.into_inner());
        objs.get(object.0 as usize)
            .and_then(|o| o.as_ref())
            .and_then(Weak::upgrade)
    }

    /// Free every page of `object` (dirty contents are discarded) and
    /// retire its number. Fails if a page is still busy, held or wired.
    pub fn object_destroy(&self, object: ObjectId) -> Result<()> {
        {
            let objs = self.objects.read().unwrap_or_else(|p| p.into_inner());
            if !matches!(objs.get(object.0 as usize), Some(Some(_))) {
                return Err(Error::UnknownObject { object });
            }
        }
        let mut in_use = 0;
        for s in 0..crate::index::SHARDS {
            let keys: Vec<(u64, u32)> = self
                .index
                .lock_shard(s)
                .iter()
                .filter(|(&k, _)| PageKey::from_raw(k).map(|k| k.object()) == Some(object))
                .map(|(&k, &i)| (k, i))
                .collect();
            for (raw, idx) in keys {
                let page = self.page(idx);
                if page.key.load(Ordering::SeqCst) != raw || !page.try_busy_exclusive() {
                    in_use += 1;
                    continue;
                }
                if page.key.load(Ordering::SeqCst) != raw {
                    self.unbusy_exclusive(idx);
                    continue;
                }
                let busy = PageBusy { vm: self, idx };
                busy.page().dirty.store(0, Ordering::SeqCst);
                if !busy.free() {
                    in_use += 1;
                }
            }
        }
        if in_use > 0 {
            return Err(Error::ObjectBusy {
                object,
                pages: in_use,
            });
        }
        let mut objs = self.objects.write().unwrap_or_else(|p| p.into_inner());
        objs[object.0 as usize] = None;
        Ok(())
    }

    /// Find the page bound to `key` and hold it. A hit in the page hash
    /// takes no lock; otherwise the index shard is locked.
    #[inline]
    pub fn lookup(&self, key: PageKey) -> Option<PageHold<'_>> {
        if let Some(hit) = self.hash.lookup(key) {
            self.stats.lookup_fast();
            return Some(PageHold {
                vm: self,
                idx: hit.idx,
                slot: hit.via,
            });
        }
        self.lookup_slow(key)
    }

    fn lookup_slow(&self, key: PageKey) -> Option<PageHold<'_>> {
        let shard = self.index.lock(key);
        let Some(&idx) = shard.get(&key.raw()) else {
            drop(shard);
            self.stats.lookup_miss();
            return None;
        };
        let page = self.page(idx);
        // Under the shard lock no key of this shard is changing, so the
        // hold cannot meet RECLAIMING and the key is ours.
        let held = page.try_hold();
        drop(shard);
        if !held {
            debug_assert!(false, "rebind in flight under the index lock");
            self.stats.lookup_miss();
            return None;
        }
        assert_eq!(
            page.key.load(Ordering::SeqCst),
            key.raw(),
            "index entry names a page bound elsewhere"
        );
        self.hash.enter(&self.pages, key, idx);
        page.set_referenced();
        self.stats.lookup_slow();
        Some(PageHold {
            vm: self,
            idx,
            slot: NIL,
        })
    }

    /// Find the page bound to `key`, or allocate one and bind it. With
    /// `wait`, sleeps (up to `alloc_wait_max`) for pageout to free pages.
    pub fn grab(&self, key: PageKey, class: AllocClass, wait: bool) -> Result<Grab<'_>> {
        loop {
            if let Some(h) = self.lookup(key) {
                return Ok(Grab::Found(h));
            }
            let idx = self.take_page(class, wait)?;
            let page = self.page(idx);
            let mut shard = self.index.lock(key);
            if let Some(&other) = shard.get(&key.raw()) {
                // Lost a race with another grab of the same key.
                let held = self.page(other).try_hold();
                drop(shard);
                self.free_unbound(idx);
                if held {
                    return Ok(Grab::Found(PageHold {
                        vm: self,
                        idx: other,
                        slot: NIL,
                    }));
                }
                continue;
            }
            // Holds on a free page are transient (the holder sees the key
            // mismatch and drops at once).
            let mut spins = 0u32;
            while !page.try_begin_rebind() {
                spins += 1;
                if spins & 63 == 0 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
            page.key.store(key.raw(), Ordering::SeqCst);
            page.valid.store(0, Ordering::Relaxed);
            page.dirty.store(0, Ordering::Relaxed);
            page.act_count.store(0, Ordering::Relaxed);
            page.flags
                .fetch_and(!(PG_REFERENCED | PG_PREFETCHED), Ordering::Relaxed);
            shard.insert(key.raw(), idx);
            page.end_rebind();
            drop(shard);
            self.lock_page(idx).enter(Queue::Inactive, idx);
            self.hash.enter(&self.pages, key, idx);
            return Ok(Grab::New(PageBusy { vm: self, idx }));
        }
    }

    fn reserve_of(&self, class: AllocClass, t: &Targets) -> usize {
        match class {
            AllocClass::Normal => t.reserve_pageout + t.reserve_flush,
            AllocClass::Flush => t.reserve_pageout,
            AllocClass::Pageout => 0,
        }
    }

    /// Take an unbound page, busy-exclusive, on no queue.
    pub(crate) fn take_page(&self, class: AllocClass, wait: bool) -> Result<u32> {
        let start = Instant::now();
        let color = thread_slot() % self.queues.colors();
        loop {
            let t = self.targets();
            let avail = self.available();
            if avail > self.reserve_of(class, &t) {
                let got = self.take_free(color).or_else(|| self.take_cache(color));
                if let Some(idx) = got {
                    if self.available() < t.free_min {
                        self.wake_pageout();
                    }
                    return Ok(idx);
                }
            }
            self.wake_pageout();
            if !wait {
                return Err(Error::WouldBlock { class });
            }
            let waited = start.elapsed();
            if waited >= self.cfg.alloc_wait_max {
                return Err(Error::NoFreePages {
                    class,
                    waited_ms: waited.as_millis() as u64,
                    online_pages: self.online_pages(),
                    wired_pages: self.wired_pages.load(Ordering::Relaxed),
                });
            }
            self.free_waiters.fetch_add(1, Ordering::SeqCst);
            let g = self.free_lock.lock().unwrap_or_else(|p| p.into_inner());
            if self.available() <= self.reserve_of(class, &self.targets()) {
                let _ = self
                    .free_cv
                    .wait_timeout(g, Duration::from_millis(5))
                    .unwrap_or_else(|p| p.into_inner());
            }
            self.free_waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn take_free(&self, color: usize) -> Option<u32> {
        let n = self.queues.colors();
        for i in 0..n {
            let c = (color + i) % n;
            let mut l = self.lock_color(c);
            if let Some(idx) = l.head(Queue::Free) {
                l.unlink(idx, Queue::None);
                let ok = self.page(idx).try_busy_exclusive();
                assert!(ok, "free page {idx} was busy");
                drop(l);
                self.prefault.taken(c, idx);
                return Some(idx);
            }
        }
        None
    }

    /// Reclaim a page from the head of a CACHE queue: the allocator's
    /// second choice. Pages found referenced, busy, held, dirty or wired
    /// are moved off CACHE instead (at most a few per color).
    fn take_cache(&self, color: usize) -> Option<u32> {
        let n = self.queues.colors();
        for i in 0..n {
            let c = (color + i) % n;
            for _ in 0..4 {
                let mut l = self.lock_color(c);
                let Some(idx) = l.head(Queue::Cache) else {
                    break;
                };
                let page = self.page(idx);
                if page.wire_count() > 0 {
                    self.dequeue_wired(&mut l, idx);
                    continue;
                }
                if self.test_and_clear_referenced(idx) {
                    page.act_count.store(ACT_INIT, Ordering::Relaxed);
                    l.requeue(Queue::Active, idx);
                    continue;
                }
                if !page.try_busy_exclusive() {
                    l.requeue(Queue::Inactive, idx);
                    continue;
                }
                if page.wire_count() > 0
                    || self.held(idx)
                    || page.dirty.load(Ordering::Relaxed) != 0
                {
                    l.requeue(Queue::Inactive, idx);
                    self.unbusy_exclusive(idx);
                    continue;
                }
                l.unlink(idx, Queue::None);
                drop(l);
                if self.unbind(idx) {
                    return Some(idx);
                }
                self.lock_page(idx).enter(Queue::Inactive, idx);
                self.unbusy_exclusive(idx);
            }
        }
        None
    }

    /// Holds on page `idx`, on the page and on its hash slot (a hint that
    /// leaves out hazard holds: the authoritative check is `unbind`).
    pub(crate) fn held(&self, idx: u32) -> bool {
        self.page(idx).hold_count() > 0 || self.hash.holds(&self.pages, idx) > 0
    }

    /// Clear and return the referenced hint, on the page and its slot.
    pub(crate) fn test_and_clear_referenced(&self, idx: u32) -> bool {
        let on_page = self.page(idx).test_and_clear_referenced();
        let on_slot = self.hash.test_and_clear_referenced(&self.pages, idx);
        on_page || on_slot
    }

    /// A scan met a wired page: take it off its queue (DragonFly 5.6's
    /// lazy dequeue). If the last unwire raced with us, put it back; the
    /// unwire side does the same check the other way round (`unwire`), so
    /// one of the two always requeues it.
    pub(crate) fn dequeue_wired(&self, l: &mut Locked<'_>, idx: u32) {
        let page = self.page(idx);
        l.unlink(idx, Queue::Wired);
        if page.wire_count() == 0 && self.claim_wired(idx) {
            l.enter(Queue::Active, idx);
        }
    }

    /// Move page `idx` from `Wired` to `Pending` if it is still `Wired`:
    /// the one transition out of `Wired`, taken by CAS by whoever gets
    /// there first (the last unwire, a scan that saw the wire count drop,
    /// a free). Returns whether this caller made it.
    pub(crate) fn claim_wired(&self, idx: u32) -> bool {
        let ok = self
            .page(idx)
            .queue
            .compare_exchange(
                Queue::Wired as u8,
                Queue::Pending as u8,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok();
        if ok {
            self.queues.count_sub(Queue::Wired);
            self.queues.count_add(Queue::Pending);
        }
        ok
    }

    /// Unbind a busy-exclusive page from its key. Fails (returns false)
    /// if it is held, wired or dirty.
    pub(crate) fn unbind(&self, idx: u32) -> bool {
        let page = self.page(idx);
        let raw = page.key.load(Ordering::SeqCst);
        let Some(key) = PageKey::from_raw(raw) else {
            return true;
        };
        let mut shard = self.index.lock(key);
        if !page.try_begin_rebind() {
            return false;
        }
        if !self.hash.close_home(&self.pages, idx) {
            page.end_rebind();
            return false;
        }
        if page.wire_count() > 0 || page.dirty.load(Ordering::SeqCst) != 0 {
            self.hash.reopen_home(&self.pages, idx);
            page.end_rebind();
            return false;
        }
        self.hash.release_home(&self.pages, idx);
        let removed = shard.remove(&raw);
        assert_eq!(removed, Some(idx), "index did not map {key} to its page");
        page.key.store(KEY_NONE, Ordering::SeqCst);
        page.valid.store(0, Ordering::Relaxed);
        page.flags
            .fetch_and(!(PG_REFERENCED | PG_PREFETCHED), Ordering::Relaxed);
        page.act_count.store(0, Ordering::Relaxed);
        page.end_rebind();
        true
    }

    /// Put an unbound, busy-exclusive page on no list onto FREE (or
    /// Offline if its segment is draining), and unbusy it.
    pub(crate) fn free_unbound(&self, idx: u32) {
        let mut l = self.lock_page(idx);
        self.free_unbound_locked(&mut l, idx);
        drop(l);
        self.notify_free();
    }

    pub(crate) fn free_unbound_locked(&self, l: &mut Locked<'_>, idx: u32) {
        let page = self.page(idx);
        debug_assert_eq!(page.key.load(Ordering::SeqCst), KEY_NONE);
        let from = page.queue();
        let seg = &self.segments[idx as usize / SEGMENT_FRAMES];
        match from {
            Queue::None | Queue::Pending => {}
            q => panic!("freeing page {idx} that is on {q:?}"),
        }
        if seg.state.load(Ordering::SeqCst) == SEG_DRAINING {
            self.queues.count_sub(from);
            self.queues.count_add(Queue::Offline);
            page.set_queue(Queue::Offline);
            seg.offline.fetch_add(1, Ordering::SeqCst);
        } else {
            // At the head: the next allocation of this color reuses it
            // while its frame is resident and in the CPU's caches, and
            // frames never used stay untouched at the tail (the kernel
            // zeroes, and a virtual machine's host backs, a frame on its
            // first touch). FreeBSD's free queues put hot pages first
            // for the same reason.
            l.enter_head(Queue::Free, idx);
        }
        self.unbusy_exclusive(idx);
    }

    pub(crate) fn notify_free(&self) {
        if self.free_waiters.load(Ordering::SeqCst) > 0 {
            let _g = self.free_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.free_cv.notify_all();
        }
    }

    pub(crate) fn unbusy_exclusive(&self, idx: u32) {
        if self.page(idx).unbusy_exclusive() {
            self.wait.wakeup(idx);
        }
    }

    fn unbusy_shared(&self, idx: u32) {
        if self.page(idx).unbusy_shared() {
            self.wait.wakeup(idx);
        }
    }

    fn wire(&self, idx: u32) {
        let old = self.page(idx).wire.fetch_add(1, Ordering::SeqCst);
        assert!(old < u32::MAX, "page wire count overflow");
        if old == 0 {
            self.wired_pages.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Drop a wire. Touches no queue: if a scan had dequeued the page, the
    /// last unwire leaves it on the lock-free requeue stack.
    fn unwire(&self, idx: u32) {
        let page = self.page(idx);
        let old = page.wire.fetch_sub(1, Ordering::SeqCst);
        assert!(old > 0, "page {idx} unwired with wire count zero");
        if old != 1 {
            return;
        }
        self.wired_pages.fetch_sub(1, Ordering::Relaxed);
        if self.claim_wired(idx) {
            self.queues.pending_push(&self.pages, idx);
        }
    }

    /// Put pages left by their last unwire back on ACTIVE.
    pub(crate) fn drain_pending(&self) -> usize {
        let mut n = 0;
        for idx in self.queues.pending_take(&self.pages) {
            let mut l = self.lock_page(idx);
            if self.page(idx).queue() == Queue::Pending {
                self.page(idx).act_count.store(ACT_INIT, Ordering::Relaxed);
                l.enter(Queue::Active, idx);
                n += 1;
            }
        }
        n
    }

    /// Check every invariant of the page layer. Call when no other thread
    /// uses pages (a pageout daemon may run: its runs are waited out);
    /// pages still wired are allowed to be dequeued.
    pub fn verify(&self) -> Result<()> {
        let _run = self
            .pageout_run_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.drain_pending();
        let bad = |what: String| Err(Error::Invariant { what });
        let n = self.pages.len();
        let mut seen = vec![false; n];
        let mut counted = [0usize; crate::page::QUEUE_STATES];
        for c in 0..self.queues.colors() {
            let l = self.lock_color(c);
            for (q, members, len) in l.walk() {
                if members.len() != len || members.contains(&crate::page::NIL) {
                    return bad(format!(
                        "color {c} {q:?}: list length {len} but walk {members:?}"
                    ));
                }
                for idx in members {
                    let i = idx as usize;
                    if seen[i] {
                        return bad(format!("page {idx} on two lists"));
                    }
                    seen[i] = true;
                    if self.queues.color_of(idx) != c {
                        return bad(format!("page {idx} on color {c}"));
                    }
                    if self.page(idx).queue() != q {
                        return bad(format!(
                            "page {idx} on {q:?} says {:?}",
                            self.page(idx).queue()
                        ));
                    }
                }
            }
        }
        let mut bound = 0usize;
        let mut wired = 0usize;
        let mut anon_seen = 0usize;
        for (i, page) in self.pages.iter().enumerate() {
            let idx = i as u32;
            let q = page.queue();
            counted[q as usize] += 1;
            if q.is_list() != seen[i] {
                return bad(format!(
                    "page {idx} says {q:?} but list membership is {}",
                    seen[i]
                ));
            }
            let refs = page.refs.load(Ordering::SeqCst);
            if refs != 0 {
                return bad(format!("page {idx} has refs {refs:#x} at rest"));
            }
            if page.is_busy() {
                return bad(format!("page {idx} busy at rest"));
            }
            let w = page.wire_count();
            if w > 0 {
                wired += 1;
            }
            match q {
                Queue::None => return bad(format!("page {idx} owned by no one at rest")),
                Queue::Wired if w == 0 => {
                    return bad(format!("page {idx} dequeued as wired but unwired at rest"));
                }
                Queue::Pending => return bad(format!("page {idx} pending after drain")),
                _ => {}
            }
            let key = page.key.load(Ordering::SeqCst);
            let unbound_queue = matches!(q, Queue::Free | Queue::Offline);
            // Besides free and offline pages, only anonymous ones (wired,
            // dequeued) have no key.
            let anon = q == Queue::Wired && key == KEY_NONE;
            if anon {
                anon_seen += 1;
            }
            if !anon && unbound_queue != (key == KEY_NONE) {
                return bad(format!("page {idx} on {q:?} has key {key:#x}"));
            }
            if unbound_queue && (w != 0 || page.dirty.load(Ordering::SeqCst) != 0) {
                return bad(format!("page {idx} on {q:?} is wired or dirty"));
            }
            let dirty = page.dirty.load(Ordering::SeqCst);
            if dirty & !page.valid.load(Ordering::SeqCst) != 0 {
                return bad(format!("page {idx} has dirty blocks that are not valid"));
            }
            if let Some(k) = PageKey::from_raw(key) {
                bound += 1;
                let shard = self.index.lock(k);
                if shard.get(&key) != Some(&idx) {
                    return bad(format!(
                        "page {idx} bound to {k} but the index says {:?}",
                        shard.get(&key)
                    ));
                }
            }
        }
        if let Err(what) = self.hash.verify(&self.pages) {
            return bad(what);
        }
        let indexed: usize = (0..crate::index::SHARDS)
            .map(|s| self.index.lock_shard(s).len())
            .sum();
        if indexed != bound {
            return bad(format!(
                "index holds {indexed} keys for {bound} bound pages"
            ));
        }
        for q in [
            Queue::Free,
            Queue::Cache,
            Queue::Inactive,
            Queue::Active,
            Queue::None,
            Queue::Pending,
            Queue::Offline,
            Queue::Wired,
        ] {
            if self.queues.count(q) != counted[q as usize] {
                return bad(format!(
                    "{q:?} counter {} but {} pages",
                    self.queues.count(q),
                    counted[q as usize]
                ));
            }
        }
        if self.anon_pages.load(Ordering::SeqCst) != anon_seen {
            return bad(format!(
                "anonymous counter {} but {anon_seen} pages",
                self.anon_pages.load(Ordering::SeqCst)
            ));
        }
        if self.wired_pages.load(Ordering::SeqCst) != wired {
            return bad(format!(
                "wired counter {} but {wired} pages",
                self.wired_pages.load(Ordering::SeqCst)
            ));
        }
        for (s, seg) in self.segments.iter().enumerate() {
            let first = s * SEGMENT_FRAMES;
            let off = (first..first + SEGMENT_FRAMES)
                .filter(|&i| self.pages[i].queue() == Queue::Offline)
                .count();
            if off != seg.offline.load(Ordering::SeqCst) {
                return bad(format!(
                    "segment {s} counts {} offline pages, has {off}",
                    seg.offline.load(Ordering::SeqCst)
                ));
            }
            let state = seg.state.load(Ordering::SeqCst);
            if state == SEG_RELEASED && off != SEGMENT_FRAMES {
                return bad(format!("segment {s} released with {off} offline pages"));
            }
            if state == SEG_ONLINE && off != 0 {
                return bad(format!("segment {s} online with {off} offline pages"));
            }
        }
        Ok(())
    }
}

impl<'a> PageHold<'a> {
    pub(crate) fn page(&self) -> &'a Page {
        self.vm.page(self.idx)
    }

    pub fn key(&self) -> PageKey {
        PageKey::from_raw(self.page().key.load(Ordering::Relaxed))
            .expect("a held page keeps its key")
    }

    /// Valid-block bitmap (a hint without busy).
    pub fn valid(&self) -> u64 {
        self.page().valid.load(Ordering::Acquire)
    }

    /// Frame number, for diagnostics and tests.
    pub fn frame(&self) -> u32 {
        self.idx
    }

    /// Sleep until the page is busy-shared.
    pub fn busy_shared(self) -> PageShared<'a> {
        self.vm.wait.busy_wait(self.page(), self.idx, false);
        let (vm, idx) = (self.vm, self.idx);
        drop(self);
        PageShared { vm, idx }
    }

    /// Sleep until the page is busy-exclusive.
    pub fn busy_exclusive(self) -> PageBusy<'a> {
        self.vm.wait.busy_wait(self.page(), self.idx, true);
        let (vm, idx) = (self.vm, self.idx);
        drop(self);
        PageBusy { vm, idx }
    }

    pub fn try_busy_exclusive(self) -> std::result::Result<PageBusy<'a>, PageHold<'a>> {
        if self.page().try_busy_exclusive() {
            let (vm, idx) = (self.vm, self.idx);
            drop(self);
            Ok(PageBusy { vm, idx })
        } else {
            Err(self)
        }
    }

    /// Drop a wire taken earlier through a busy guard.
    pub fn unwire(&self) {
        self.vm.unwire(self.idx);
    }
}

impl Drop for PageHold<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.slot == NIL {
            self.page().unhold();
        } else {
            self.vm.hash.release(self.slot);
        }
    }
}

impl<'a> PageShared<'a> {
    fn page(&self) -> &'a Page {
        self.vm.page(self.idx)
    }

    pub fn key(&self) -> PageKey {
        PageKey::from_raw(self.page().key.load(Ordering::Relaxed))
            .expect("a busy page keeps its key")
    }

    pub fn frame(&self) -> u32 {
        self.idx
    }

    pub fn data(&self) -> &[u8] {
        // SAFETY: this guard holds the page busy-shared for its lifetime,
        // which bounds the slice; no exclusive guard can exist meanwhile.
        #[allow(unsafe_code)]
        unsafe {
            self.vm.arena.frame(self.idx as usize)
        }
    }

    pub fn valid(&self) -> u64 {
        self.page().valid.load(Ordering::Acquire)
    }

    pub fn dirty(&self) -> u64 {
        self.page().dirty.load(Ordering::Acquire)
    }

    pub fn wire(&self) {
        self.vm.wire(self.idx);
    }

    pub fn unwire(&self) {
        self.vm.unwire(self.idx);
    }
}

impl Drop for PageShared<'_> {
    fn drop(&mut self) {
        self.vm.unbusy_shared(self.idx);
    }
}

impl<'a> PageBusy<'a> {
    fn page(&self) -> &'a Page {
        self.vm.page(self.idx)
    }

    pub fn key(&self) -> PageKey {
        PageKey::from_raw(self.page().key.load(Ordering::Relaxed))
            .expect("a busy page keeps its key")
    }

    pub fn frame(&self) -> u32 {
        self.idx
    }

    pub fn data(&self) -> &[u8] {
        // SAFETY: this guard holds the page busy-exclusive for its
        // lifetime; the slice borrows the guard, so no `data_mut` slice
        // can coexist with it.
        #[allow(unsafe_code)]
        unsafe {
            self.vm.arena.frame(self.idx as usize)
        }
    }

    pub fn data_mut(&mut self) -> &mut [u8] {
        // SAFETY: this guard holds the page busy-exclusive for its
        // lifetime and the slice borrows the guard mutably, so it is the
        // only slice of the frame.
        #[allow(unsafe_code)]
        unsafe {
            self.vm.arena.frame_mut(self.idx as usize)
        }
    }

    pub fn valid(&self) -> u64 {
        self.page().valid.load(Ordering::Acquire)
    }

    pub fn dirty(&self) -> u64 {
        self.page().dirty.load(Ordering::Acquire)
    }

    pub fn set_valid(&mut self, mask: u64) {
        self.page().valid.fetch_or(mask, Ordering::Release);
    }

    /// Mark blocks dirty (and so valid).
    pub fn set_dirty(&mut self, mask: u64) {
        self.page().valid.fetch_or(mask, Ordering::Release);
        self.page().dirty.fetch_or(mask, Ordering::Release);
    }

    pub fn clear_dirty(&mut self, mask: u64) {
        self.page().dirty.fetch_and(!mask, Ordering::Release);
    }

    /// Forget the contents: nothing valid, nothing dirty.
    pub fn invalidate(&mut self) {
        self.page().dirty.store(0, Ordering::Release);
        self.page().valid.store(0, Ordering::Release);
    }

    pub fn wire(&self) {
        self.vm.wire(self.idx);
    }

    pub fn unwire(&self) {
        self.vm.unwire(self.idx);
    }

    pub fn wire_count(&self) -> u32 {
        self.page().wire_count()
    }

    /// Trade the exclusive busy for a shared one without letting go.
    pub fn downgrade(self) -> PageShared<'a> {
        let (vm, idx) = (self.vm, self.idx);
        std::mem::forget(self);
        if vm.page(idx).downgrade() {
            vm.wait.wakeup(idx);
        }
        PageShared { vm, idx }
    }

    /// Hint: filled ahead of use (read-ahead); its first use will not
    /// count as a re-reference, so a one-pass sequential read leaves
    /// through INACTIVE without touching ACTIVE.
    pub fn mark_prefetched(&self) {
        self.vm.hash.mark_prefetched(&self.vm.pages, self.idx);
    }

    /// Hint: likely used again soon.
    pub fn activate(&self) {
        self.page().set_referenced();
    }

    /// Hint: unlikely to be used again; first in line for pageout.
    pub fn deactivate(&self) {
        self.page()
            .flags
            .fetch_and(!(PG_REFERENCED | PG_PREFETCHED), Ordering::Relaxed);
        self.vm.hash.clear_hints(&self.vm.pages, self.idx);
        self.page().act_count.store(0, Ordering::Relaxed);
    }

    /// Unbind and free the page, discarding its contents. If it cannot be
    /// freed (someone holds it, or it is wired) it is invalidated and
    /// deactivated instead and `false` returned.
    pub fn free(mut self) -> bool {
        let (vm, idx) = (self.vm, self.idx);
        self.invalidate();
        if !vm.unbind(idx) {
            self.deactivate();
            return false;
        }
        std::mem::forget(self);
        let mut l = vm.lock_page(idx);
        let page = vm.page(idx);
        match page.queue() {
            q if q.is_list() => l.unlink(idx, Queue::None),
            Queue::Wired => {
                // A scan dequeued the page while it was wired and its last
                // unwire may still be on its way to `claim_wired`: claim
                // first, or let it have claimed; either way it is Pending.
                vm.claim_wired(idx);
            }
            _ => {}
        }
        vm.free_unbound_locked(&mut l, idx);
        drop(l);
        vm.notify_free();
        true
    }
}

impl Drop for PageBusy<'_> {
    fn drop(&mut self) {
        self.vm.unbusy_exclusive(self.idx);
    }
}
