//! Counters: lookups by path (lockless hits, slow-path hits, misses),
//! per thread so that counting writes only the counting thread's own
//! cache line (no locked instruction, no shared line on the lockless
//! path), and the durations of pageout runs.

// `unsafe` only for the thread CPU clock (see `thread_cpu_time`).
#![deny(unsafe_code)]

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

const SLOTS: usize = 64;
/// Pageout durations kept (the most recent).
const DURATIONS_MAX: usize = 1 << 16;

#[repr(align(128))]
#[derive(Default)]
struct LookupCounters {
    fast: AtomicU64,
    slow: AtomicU64,
    miss: AtomicU64,
}

static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// A small per-thread number, handed out round-robin.
pub(crate) fn thread_slot() -> usize {
    SLOT.with(|s| {
        let v = s.get();
        if v != usize::MAX {
            return v;
        }
        let v = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
        s.set(v);
        v
    })
}

/// Add one without a locked instruction. Exact while no two threads share
/// a slot (the first 64 threads each get their own), approximate after.
#[inline]
fn bump(c: &AtomicU64) {
    c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

pub(crate) struct Stats {
    lookups: Box<[LookupCounters]>,
    /// (wall, thread CPU) microseconds of recent pageout runs.
    pageout_runs: Mutex<Vec<(u32, u32)>>,
    pageout_runs_total: AtomicU64,
}

/// Lookup counts by path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LookupStats {
    /// Hits served by the lockless page hash.
    pub fast: u64,
    /// Hits that fell back to the locked index.
    pub slow: u64,
    /// Lookups that found nothing.
    pub miss: u64,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            lookups: (0..SLOTS).map(|_| LookupCounters::default()).collect(),
            pageout_runs: Mutex::new(Vec::new()),
            pageout_runs_total: AtomicU64::new(0),
        }
    }

    #[inline]
    fn mine(&self) -> &LookupCounters {
        &self.lookups[thread_slot() % SLOTS]
    }

    #[inline]
    pub fn lookup_fast(&self) {
        bump(&self.mine().fast);
    }

    pub fn lookup_slow(&self) {
        bump(&self.mine().slow);
    }

    pub fn lookup_miss(&self) {
        bump(&self.mine().miss);
    }

    pub fn lookups(&self) -> LookupStats {
        let mut s = LookupStats::default();
        for c in self.lookups.iter() {
            s.fast += c.fast.load(Ordering::Relaxed);
            s.slow += c.slow.load(Ordering::Relaxed);
            s.miss += c.miss.load(Ordering::Relaxed);
        }
        s
    }

    pub fn reset_lookups(&self) {
        for c in self.lookups.iter() {
            c.fast.store(0, Ordering::Relaxed);
            c.slow.store(0, Ordering::Relaxed);
            c.miss.store(0, Ordering::Relaxed);
        }
    }

    pub fn record_pageout(&self, wall: Duration, cpu: Duration) {
        let us = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        let e = (us(wall), us(cpu));
        let mut v = self.pageout_runs.lock().unwrap_or_else(|p| p.into_inner());
        let n = self.pageout_runs_total.fetch_add(1, Ordering::Relaxed) as usize;
        if v.len() < DURATIONS_MAX {
            v.push(e);
        } else {
            v[n % DURATIONS_MAX] = e;
        }
    }

    /// (wall, CPU) durations of recent pageout runs.
    pub fn pageout_durations(&self) -> Vec<(Duration, Duration)> {
        let v = self.pageout_runs.lock().unwrap_or_else(|p| p.into_inner());
        let d = |us: u32| Duration::from_micros(u64::from(us));
        v.iter().map(|&(w, c)| (d(w), d(c))).collect()
    }

    pub fn reset_pageout(&self) {
        self.pageout_runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// CPU time consumed by the calling thread, or zero if the clock is not
/// available. Pageout runs are timed both ways: wall time includes time
/// the thread spent preempted on a busy machine.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` writes one `timespec` through the pointer,
    // which points at a live, writable local of that type.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// Set the calling thread's nice value (Linux threads have their own).
/// Best effort: refused without the privilege, which is logged and
/// otherwise ignored.
pub(crate) fn raise_thread_priority(nice: i32) {
    // SAFETY: `gettid` takes no arguments and only returns the caller's
    // thread id.
    #[allow(unsafe_code)]
    let tid = unsafe { libc::gettid() };
    // SAFETY: `setpriority` reads its three integer arguments only; a
    // failure is reported through the return value.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if rc != 0 {
        log::debug!(
            "vm: pageout keeps default priority: {}",
            std::io::Error::last_os_error()
        );
    }
}
