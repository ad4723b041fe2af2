//! Shrinking and growing the page budget at run time.
//!
//! The arena is cut into segments of `SEGMENT_FRAMES` frames (2 MiB). A
//! segment is Online (its pages circulate), Draining (its pages go Offline
//! as they are freed, pageout evacuates the rest) or Released (all pages
//! Offline and the memory given back with one `madvise` over every run of
//! neighbouring segments). So memory leaves in batches of at least 2 MiB,
//! never frame by frame. Growing brings Draining segments back first (their
//! memory is still resident), then Released ones (which fault in as zeros).
//! All segment state changes happen under the budget lock; a page going
//! Offline does so under its color lock after reading the segment state.

// `unsafe` only at the marked frame-access sites, each with its SAFETY note.
#![deny(unsafe_code)]

use crate::error::{Error, Result};
use crate::page::{Queue, FRAME_BYTES};
use crate::vm::{Vm, SEGMENT_FRAMES, SEG_DRAINING, SEG_ONLINE, SEG_RELEASED};
use std::sync::atomic::Ordering;

impl Vm {
    /// The budget now in force, in bytes.
    pub fn budget_bytes(&self) -> u64 {
        (self.budget_pages.load(Ordering::SeqCst) * FRAME_BYTES) as u64
    }

    /// Change the budget (rounded down to 2 MiB). Growing takes effect at
    /// once; shrinking marks segments draining and wakes pageout, which
    /// evacuates them and returns their memory as they empty.
    pub fn set_budget(&self, bytes: u64) -> Result<()> {
        let seg_bytes = (SEGMENT_FRAMES * FRAME_BYTES) as u64;
        let max_bytes = (self.frames_max() * FRAME_BYTES) as u64;
        if bytes > max_bytes {
            return Err(Error::BudgetAboveMax {
                budget_bytes: bytes,
                max_bytes,
            });
        }
        let want = (bytes / seg_bytes) as usize;
        if want < 2 {
            return Err(Error::BudgetTooSmall {
                budget_bytes: bytes,
                min_bytes: 2 * seg_bytes,
            });
        }
        let _g = self.budget_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.budget_pages
            .store(want * SEGMENT_FRAMES, Ordering::SeqCst);
        let online = |vm: &Vm| {
            vm.segments
                .iter()
                .filter(|s| s.state.load(Ordering::SeqCst) == SEG_ONLINE)
                .count()
        };
        let mut have = online(self);
        // Grow: draining segments first, then released ones.
        for pass in [SEG_DRAINING, SEG_RELEASED] {
            for s in 0..self.segments.len() {
                if have >= want {
                    break;
                }
                if self.segments[s].state.load(Ordering::SeqCst) == pass {
                    self.segment_online(s);
                    have += 1;
                }
            }
        }
        // Shrink: highest online segments first.
        for s in (0..self.segments.len()).rev() {
            if have <= want {
                break;
            }
            if self.segments[s].state.load(Ordering::SeqCst) == SEG_ONLINE {
                self.segment_drain(s);
                have -= 1;
            }
        }
        drop(_g);
        self.release_drained()?;
        self.notify_free();
        self.wake_pageout();
        log::info!("vm: budget set to {bytes} bytes ({want} segments)");
        Ok(())
    }

    /// Bring segment `s` online: its Offline pages become free.
    fn segment_online(&self, s: usize) {
        let seg = &self.segments[s];
        seg.state.store(SEG_ONLINE, Ordering::SeqCst);
        for idx in (s * SEGMENT_FRAMES..(s + 1) * SEGMENT_FRAMES).map(|i| i as u32) {
            let mut l = self.lock_page(idx);
            if self.page(idx).queue() == Queue::Offline {
                l.enter(Queue::Free, idx);
                seg.offline.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Start draining segment `s`: its free pages go Offline now.
    fn segment_drain(&self, s: usize) {
        let seg = &self.segments[s];
        seg.state.store(SEG_DRAINING, Ordering::SeqCst);
        for idx in (s * SEGMENT_FRAMES..(s + 1) * SEGMENT_FRAMES).map(|i| i as u32) {
            let mut l = self.lock_page(idx);
            if self.page(idx).queue() == Queue::Free {
                l.unlink(idx, Queue::None);
                l.shift(idx, Queue::Offline);
                seg.offline.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// Release every draining segment whose pages are all Offline, one
    /// `madvise` per run of neighbouring segments.
    pub(crate) fn release_drained(&self) -> Result<()> {
        let _g = self.budget_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (s, seg) in self.segments.iter().enumerate() {
            if seg.state.load(Ordering::SeqCst) == SEG_DRAINING
                && seg.offline.load(Ordering::SeqCst) == SEGMENT_FRAMES
            {
                seg.state.store(SEG_RELEASED, Ordering::SeqCst);
                match runs.last_mut() {
                    Some((first, count)) if *first + *count == s => *count += 1,
                    _ => runs.push((s, 1)),
                }
            }
        }
        for (first, count) in runs {
            // SAFETY: every page of these segments is Offline: unbound, on
            // no queue, not busy, so no slice of their frames exists and
            // none is made until `segment_online` frees them again, which
            // needs the budget lock we hold.
            #[allow(unsafe_code)]
            unsafe {
                self.arena
                    .release(first * SEGMENT_FRAMES, count * SEGMENT_FRAMES)?;
            }
            log::debug!(
                "vm: released {} MiB at segment {first}",
                (count * SEGMENT_FRAMES * FRAME_BYTES) >> 20
            );
        }
        Ok(())
    }
}
