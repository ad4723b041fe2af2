//! Sleeping on a busy page: a small table of (mutex, condvar) buckets
//! hashed by page index, like the kernel's sleep queues. The busy word
//! carries `BUSY_WANTED`; a release that sees no sleeper takes no lock at
//! all, and one that does takes only the bucket mutex, never a queue lock.
//!
//! No lost wakeup: a sleeper sets `BUSY_WANTED` with the bucket locked and
//! waits atomically releasing it; a releaser clears the busy word first and
//! then locks the bucket to notify, so it notifies after the sleeper waits.
//! Waits also time out and recheck, as a second line of defence.

#![forbid(unsafe_code)]

use crate::page::{Page, BUSY_EXCLUSIVE, BUSY_SHARED_MASK, BUSY_WANTED};
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

const BUCKETS: usize = 64;

pub(crate) struct WaitTable {
    buckets: Box<[(Mutex<()>, Condvar)]>,
}

impl WaitTable {
    pub fn new() -> WaitTable {
        WaitTable {
            buckets: (0..BUCKETS)
                .map(|_| (Mutex::new(()), Condvar::new()))
                .collect(),
        }
    }

    fn bucket(&self, idx: u32) -> &(Mutex<()>, Condvar) {
        &self.buckets[idx as usize % BUCKETS]
    }

    /// Wake everyone sleeping on page `idx`.
    pub fn wakeup(&self, idx: u32) {
        let (lock, cv) = self.bucket(idx);
        let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
        cv.notify_all();
    }

    /// Busy page `idx`, sleeping while it is busy in a conflicting way.
    pub fn busy_wait(&self, page: &Page, idx: u32, exclusive: bool) {
        loop {
            let got = if exclusive {
                page.try_busy_exclusive()
            } else {
                page.try_busy_shared()
            };
            if got {
                return;
            }
            let (lock, cv) = self.bucket(idx);
            let g = lock.lock().unwrap_or_else(|p| p.into_inner());
            let v = page.busy.load(Ordering::Relaxed);
            let conflicts = if exclusive {
                v & (BUSY_EXCLUSIVE | BUSY_SHARED_MASK) != 0
            } else {
                v & BUSY_EXCLUSIVE != 0
            };
            if !conflicts {
                continue;
            }
            if v & BUSY_WANTED == 0
                && page
                    .busy
                    .compare_exchange(v, v | BUSY_WANTED, Ordering::SeqCst, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            let _ = cv
                .wait_timeout(g, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner());
        }
    }
}
