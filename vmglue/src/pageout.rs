//! Pageout: keeps free + cache pages between the low water mark and the
//! target, so allocations find pages without waiting.
//!
//! A run (from a wakeup below low water until the target is reached or a
//! pass makes no progress) drains the requeue stack, evacuates draining
//! segments (budget shrink), then alternates:
//! - the inactive scan, from each color's INACTIVE head: wired pages are
//!   dequeued lazily, referenced ones go to ACTIVE (the first use of a
//!   prefetched page does not count, so read-ahead streams pass through), busy or held ones to
//!   the tail, dirty ones are laundered through the object's `Pager`,
//!   clean ones go to CACHE (up to its target) or are freed;
//! - the active scan, while INACTIVE is below its target: referenced pages
//!   gain `ACT_ADVANCE` of `act_count`, others lose one, and reaching zero
//!   moves a page to INACTIVE.
//!
//! Laundering happens here, in the pageout thread, never in an allocating
//! thread. The daemon sleeps until woken by an allocation below low water
//! (or a budget change); it does not poll.

// `unsafe` only at the marked frame-access sites, each with its SAFETY note.
#![deny(unsafe_code)]

use crate::error::{Error, Result};
use crate::page::{PageKey, Queue, ACT_ADVANCE, ACT_INIT, ACT_MAX};
use crate::vm::{Vm, SEGMENT_FRAMES, SEG_DRAINING};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Writes dirty pages for the layer above. `launder` gets busy-exclusive
/// pages of one object; for each it writes the dirty blocks and calls
/// `mark_clean` with the blocks written. Blocks left dirty count as a
/// failed write: the page goes back to ACTIVE and is retried later.
pub trait Pager: Send + Sync {
    fn launder(&self, pages: &[LaunderPage<'_>]);
}

/// A page handed to a `Pager`, busy-exclusive by pageout.
pub struct LaunderPage<'a> {
    vm: &'a Vm,
    idx: u32,
}

impl LaunderPage<'_> {
    pub fn key(&self) -> PageKey {
        PageKey::from_raw(self.vm.page(self.idx).key.load(Ordering::Relaxed))
            .expect("a page being laundered is bound")
    }

    pub fn dirty(&self) -> u64 {
        self.vm.page(self.idx).dirty.load(Ordering::Acquire)
    }

    pub fn valid(&self) -> u64 {
        self.vm.page(self.idx).valid.load(Ordering::Acquire)
    }

    pub fn data(&self) -> &[u8] {
        // SAFETY: pageout holds the page busy-exclusive until `launder`
        // returns, and the slice cannot outlive this borrow of `self`.
        #[allow(unsafe_code)]
        unsafe {
            self.vm.arena.frame(self.idx as usize)
        }
    }

    /// Blocks `mask` reached the device.
    pub fn mark_clean(&self, mask: u64) {
        self.vm
            .page(self.idx)
            .dirty
            .fetch_and(!mask, Ordering::Release);
    }
}

/// What one pageout run did.
#[derive(Clone, Debug, Default)]
pub struct PageoutReport {
    pub duration: Duration,
    pub scanned: usize,
    pub freed: usize,
    pub cached: usize,
    pub laundered: usize,
    /// Dirty pages handed to pagers (laundered or failed).
    pub launder_attempted: usize,
    pub activated: usize,
    pub deactivated: usize,
    pub offlined: usize,
    pub reached_target: bool,
}

/// Nice value asked for the pageout thread: like the kernel's pageout
/// daemon it must run when allocators are waiting on it. Needs
/// CAP_SYS_NICE; without it the thread keeps the default priority.
const PAGEOUT_NICE: i32 = -5;

/// Pages looked at per color per pass.
const SCAN_BATCH: usize = 64;
/// Dirty pages one run hands to pagers (2 MiB): bounds the time a run
/// spends writing; past it, dirty pages wait at the INACTIVE tail for the
/// next run (or the layer above's own flusher) while clean ones are
/// reclaimed.
const LAUNDER_MAX: usize = 32;

impl Vm {
    /// Ask the pageout daemon to run. Lock-free unless it must be woken.
    pub fn wake_pageout(&self) {
        if !self.pageout_wanted.swap(true, Ordering::SeqCst) {
            let _g = self.pageout_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.pageout_cv.notify_one();
        }
    }

    fn segments_draining(&self) -> bool {
        self.segments
            .iter()
            .any(|s| s.state.load(Ordering::SeqCst) == SEG_DRAINING)
    }

    /// Whether a run would do anything: free + cache below low water, a
    /// shrink in progress, or pages waiting on the requeue stack.
    pub fn pageout_needed(&self) -> bool {
        self.available() < self.targets().free_min
            || self.segments_draining()
            || self.queues.count(Queue::Pending) > 0
    }

    /// One pageout run, in the calling thread. Deterministic callers (tests,
    /// simulations) use this instead of the daemon.
    pub fn pageout_run(&self) -> PageoutReport {
        let _run = self
            .pageout_run_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let start = Instant::now();
        let cpu_start = crate::stats::thread_cpu_time();
        let timed = self.available() < self.targets().free_min;
        let mut r = PageoutReport::default();
        self.drain_pending();
        if self.segments_draining() {
            self.drain_segments(&mut r);
        }
        let mut passes = 0;
        loop {
            let t = self.targets();
            if self.available() >= t.free_target {
                r.reached_target = true;
                break;
            }
            passes += 1;
            let before = (r.freed, r.cached, r.laundered, r.deactivated, r.activated);
            for c in 0..self.queues.colors() {
                self.inactive_scan(c, &mut r);
            }
            // Age ACTIVE only to refill INACTIVE: reclaim pressure alone
            // (a scan streaming through) must not speed up the clock that
            // decides which hot pages stay.
            if self.queues.count(Queue::Inactive) < t.inactive_target {
                for c in 0..self.queues.colors() {
                    self.active_scan(c, &mut r);
                }
            }
            let after = (r.freed, r.cached, r.laundered, r.deactivated, r.activated);
            if before == after || passes > 4 * self.online_pages() / SCAN_BATCH + 8 {
                break;
            }
        }
        self.notify_free();
        r.duration = start.elapsed();
        if timed {
            let cpu = crate::stats::thread_cpu_time().saturating_sub(cpu_start);
            self.stats.record_pageout(r.duration, cpu);
        }
        log::debug!("pageout: {r:?}");
        r
    }

    fn inactive_scan(&self, c: usize, r: &mut PageoutReport) {
        let t = self.targets();
        let mut reclaim = Vec::new();
        let mut launder = Vec::new();
        {
            let mut l = self.lock_color(c);
            let mut n = 0;
            while n < SCAN_BATCH {
                let Some(idx) = l.head(Queue::Inactive) else {
                    break;
                };
                n += 1;
                r.scanned += 1;
                let page = self.page(idx);
                if page.wire_count() > 0 {
                    self.dequeue_wired(&mut l, idx);
                    continue;
                }
                if self.test_and_clear_referenced(idx) {
                    let act = page.act_count.load(Ordering::Relaxed).max(ACT_INIT);
                    page.act_count.store(act, Ordering::Relaxed);
                    l.requeue(Queue::Active, idx);
                    r.activated += 1;
                    continue;
                }
                if !page.try_busy_exclusive() {
                    l.requeue(Queue::Inactive, idx);
                    continue;
                }
                if page.wire_count() > 0 || self.held(idx) {
                    l.requeue(Queue::Inactive, idx);
                    self.unbusy_exclusive(idx);
                    continue;
                }
                if page.dirty.load(Ordering::Acquire) != 0 {
                    if r.launder_attempted + launder.len() < LAUNDER_MAX {
                        l.unlink(idx, Queue::None);
                        launder.push(idx);
                    } else {
                        l.requeue(Queue::Inactive, idx);
                        self.unbusy_exclusive(idx);
                    }
                    continue;
                }
                if self.queues.count(Queue::Cache) < t.cache_target {
                    l.requeue(Queue::Cache, idx);
                    self.unbusy_exclusive(idx);
                    r.cached += 1;
                } else {
                    l.unlink(idx, Queue::None);
                    reclaim.push(idx);
                }
                if self.available() + reclaim.len() >= t.free_target {
                    break;
                }
            }
        }
        self.reclaim(&reclaim, r);
        self.launder(&launder, r);
    }

    /// Free busy pages on no queue; those that cannot be unbound go back
    /// to INACTIVE.
    fn reclaim(&self, idxs: &[u32], r: &mut PageoutReport) {
        for &idx in idxs {
            if self.unbind(idx) {
                self.free_unbound(idx);
                r.freed += 1;
            } else {
                self.lock_page(idx).enter(Queue::Inactive, idx);
                self.unbusy_exclusive(idx);
            }
        }
    }

    /// Hand busy dirty pages (on no queue) to their pagers, grouped by
    /// object; then clean ones go to CACHE and the rest to ACTIVE.
    fn launder(&self, idxs: &[u32], r: &mut PageoutReport) {
        if idxs.is_empty() {
            return;
        }
        let mut by_object: Vec<(crate::page::ObjectId, Vec<LaunderPage<'_>>)> = Vec::new();
        for &idx in idxs {
            let lp = LaunderPage { vm: self, idx };
            let obj = lp.key().object();
            match by_object.iter_mut().find(|(o, _)| *o == obj) {
                Some((_, v)) => v.push(lp),
                None => by_object.push((obj, vec![lp])),
            }
        }
        for (obj, pages) in &by_object {
            match self.pager_of(*obj) {
                Some(pager) => pager.launder(pages),
                None => log::warn!(
                    "pageout: object {} has no pager; dirty pages kept",
                    obj.get()
                ),
            }
        }
        r.launder_attempted += idxs.len();
        for &idx in idxs {
            let page = self.page(idx);
            let mut l = self.lock_page(idx);
            if page.dirty.load(Ordering::Acquire) == 0 {
                l.enter(Queue::Cache, idx);
                r.laundered += 1;
            } else {
                page.act_count.store(ACT_INIT, Ordering::Relaxed);
                l.enter(Queue::Active, idx);
            }
            self.unbusy_exclusive(idx);
        }
    }

    fn active_scan(&self, c: usize, r: &mut PageoutReport) {
        let t = self.targets();
        let mut l = self.lock_color(c);
        let len = l.list(Queue::Active).len;
        let mut n = 0;
        while n < SCAN_BATCH.min(len) {
            let Some(idx) = l.head(Queue::Active) else {
                break;
            };
            n += 1;
            r.scanned += 1;
            let page = self.page(idx);
            if page.wire_count() > 0 {
                self.dequeue_wired(&mut l, idx);
                continue;
            }
            let mut act = page.act_count.load(Ordering::Relaxed);
            if self.test_and_clear_referenced(idx) {
                act = act.saturating_add(ACT_ADVANCE).min(ACT_MAX);
            } else {
                act = act.saturating_sub(1);
            }
            page.act_count.store(act, Ordering::Relaxed);
            if act == 0 {
                l.requeue(Queue::Inactive, idx);
                r.deactivated += 1;
                if self.queues.count(Queue::Inactive) >= t.inactive_target {
                    break;
                }
            } else {
                l.requeue(Queue::Active, idx);
            }
        }
    }

    /// Evacuate draining segments: free pages go Offline at once, clean
    /// unused pages are unbound and go Offline, dirty ones are laundered
    /// (and go Offline on a later pass). Wired, busy and held pages wait.
    pub(crate) fn drain_segments(&self, r: &mut PageoutReport) {
        for (s, seg) in self.segments.iter().enumerate() {
            if seg.state.load(Ordering::SeqCst) != SEG_DRAINING {
                continue;
            }
            let mut reclaim = Vec::new();
            let mut launder = Vec::new();
            for idx in (s * SEGMENT_FRAMES..(s + 1) * SEGMENT_FRAMES).map(|i| i as u32) {
                let page = self.page(idx);
                let mut l = self.lock_page(idx);
                match page.queue() {
                    Queue::Free => {
                        l.unlink(idx, Queue::None);
                        l.shift(idx, Queue::Offline);
                        seg.offline.fetch_add(1, Ordering::SeqCst);
                        r.offlined += 1;
                    }
                    Queue::Cache | Queue::Inactive | Queue::Active => {
                        if page.wire_count() > 0 || !page.try_busy_exclusive() {
                            continue;
                        }
                        if page.wire_count() > 0 || self.held(idx) {
                            self.unbusy_exclusive(idx);
                            continue;
                        }
                        l.unlink(idx, Queue::None);
                        if page.dirty.load(Ordering::Acquire) != 0 {
                            launder.push(idx);
                        } else {
                            reclaim.push(idx);
                        }
                    }
                    _ => {}
                }
            }
            let freed = r.freed;
            self.reclaim(&reclaim, r);
            r.offlined += r.freed - freed;
            self.launder(&launder, r);
        }
        if let Err(e) = self.release_drained() {
            log::warn!("pageout: {e}");
        }
    }

    /// Start the pageout daemon. It stops when the handle is dropped.
    pub fn start_pageout(self: &Arc<Self>) -> Result<PageoutDaemon> {
        let stop = Arc::new(AtomicBool::new(false));
        let vm = Arc::clone(self);
        let stop2 = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("pageout".into())
            .spawn(move || daemon(&vm, &stop2))
            .map_err(|source| Error::PageoutSpawn {
                thread: "pageout",
                source,
            })?;
        let mut d = PageoutDaemon {
            vm: Arc::clone(self),
            stop,
            handle: Some(handle),
            prefault: None,
        };
        let vm = Arc::clone(self);
        let stop2 = Arc::clone(&d.stop);
        d.prefault = Some(
            std::thread::Builder::new()
                .name("prefault".into())
                .spawn(move || vm.prefault_daemon(&stop2))
                .map_err(|source| Error::PageoutSpawn {
                    thread: "prefault",
                    source,
                })?,
        );
        Ok(d)
    }
}

fn daemon(vm: &Vm, stop: &AtomicBool) {
    crate::stats::raise_thread_priority(PAGEOUT_NICE);
    while !stop.load(Ordering::SeqCst) {
        if vm.pageout_wanted.swap(false, Ordering::SeqCst) || vm.pageout_needed() {
            let r = vm.pageout_run();
            if !r.reached_target && r.freed + r.cached + r.laundered + r.offlined == 0 {
                // Nothing reclaimable now (all busy, held or wired): back
                // off briefly instead of spinning.
                std::thread::sleep(Duration::from_millis(1));
            }
            continue;
        }
        let g = vm.pageout_lock.lock().unwrap_or_else(|p| p.into_inner());
        if !vm.pageout_wanted.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
            let _ = vm
                .pageout_cv
                .wait_timeout(g, Duration::from_secs(1))
                .unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The running pageout thread, and the prefault thread beside it
/// (`prefault.rs`); dropping it stops and joins both.
pub struct PageoutDaemon {
    vm: Arc<Vm>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    prefault: Option<JoinHandle<()>>,
}

impl Drop for PageoutDaemon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        {
            let _g = self
                .vm
                .pageout_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            self.vm.pageout_cv.notify_all();
        }
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                log::error!("pageout thread panicked");
            }
        }
        self.vm.prefault.stop_wake();
        if let Some(h) = self.prefault.take() {
            if h.join().is_err() {
                log::error!("prefault thread panicked");
            }
        }
    }
}
