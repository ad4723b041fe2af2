//! Prefault: frames made resident ahead of their first use, by a thread
//! of their own (the idea of DragonFly's and FreeBSD's idle page-zeroing
//! thread, which had free pages ready before a fault asked for one).
//!
//! The arena is reserved, not touched: a frame's first use faults its
//! memory in, 16 kernel pages per 64 KiB frame, in the thread that
//! copies data into it. On a virtual machine whose host backs guest
//! memory only once touched, that first touch costs several times the
//! copy (a gigabyte of fresh memory here took 2 to 6 s to touch, 0.3 s
//! once touched), and a large write into a fresh cache pays it all on
//! the request path.
//!
//! FREE queues hand out never-used frames in ascending index order per
//! color (they start that way, and freed frames go to the head), so the
//! next frames a color will give are known: `take_free` notes the
//! highest index it took per color, and this thread keeps `LEAD` frames
//! of each color beyond it resident (once the color is used at all, so
//! an idle mount stays small) with `MADV_POPULATE_WRITE`, which
//! faults the memory in without touching the contents (so a frame in use
//! meanwhile is unharmed). Frames of segments not online are skipped,
//! under the budget lock, so a released segment stays released. On a
//! kernel without `MADV_POPULATE_WRITE` (before Linux 5.14) the thread
//! says so once and stops; frames then fault in on first use as before.

// `unsafe` nowhere here.
#![deny(unsafe_code)]

use crate::vm::{Vm, SEGMENT_FRAMES, SEG_ONLINE};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Frames of each color kept resident beyond the highest taken: with 8
/// colors, 64 MiB in all.
const LEAD: u32 = 128;

/// Per color: the frame after the highest one taken, and the next frame
/// not yet made resident; and the thread's wakeup.
pub(crate) struct Prefault {
    taken: Box<[AtomicU32]>,
    resident: Box<[AtomicU32]>,
    wanted: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
    /// Frames made resident, for the statistics.
    pub(crate) frames: AtomicU64,
}

impl Prefault {
    pub(crate) fn new(colors: usize) -> Prefault {
        Prefault {
            taken: (0..colors).map(|_| AtomicU32::new(0)).collect(),
            resident: (0..colors).map(|c| AtomicU32::new(c as u32)).collect(),
            wanted: AtomicBool::new(false),
            lock: Mutex::new(()),
            cv: Condvar::new(),
            frames: AtomicU64::new(0),
        }
    }

    /// Frame `idx` of color `color` was taken from FREE: wake the thread
    /// when the resident frames ahead of it run under half the lead.
    pub(crate) fn taken(&self, color: usize, idx: u32) {
        let colors = self.taken.len() as u32;
        let next = idx.saturating_add(1);
        if next > self.taken[color].load(Ordering::Relaxed) {
            self.taken[color].fetch_max(next, Ordering::Relaxed);
            let ahead = (LEAD / 2).saturating_mul(colors);
            if next.saturating_add(ahead) > self.resident[color].load(Ordering::Relaxed) {
                self.wake();
            }
        }
    }

    /// Wake the thread to see its stop flag, whatever it was told.
    pub(crate) fn stop_wake(&self) {
        self.wanted.store(true, Ordering::SeqCst);
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.cv.notify_all();
    }

    pub(crate) fn wake(&self) {
        if !self.wanted.swap(true, Ordering::SeqCst) {
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.cv.notify_one();
        }
    }
}

impl Vm {
    /// One pass: every color brought `LEAD` frames past its highest
    /// taken. Ok(frames made resident), or the error that stops the
    /// thread (`MADV_POPULATE_WRITE` refused).
    fn prefault_pass(&self, stop: &AtomicBool) -> std::io::Result<u64> {
        let p = &self.prefault;
        let colors = p.taken.len() as u32;
        let frames = self.pages.len() as u32;
        let mut done = 0;
        for c in 0..p.taken.len() {
            let taken = p.taken[c].load(Ordering::Relaxed);
            if taken == 0 {
                // Nothing of this color used yet: an idle mount stays
                // small.
                continue;
            }
            loop {
                let next = p.resident[c].load(Ordering::Relaxed);
                let goal = p.taken[c]
                    .load(Ordering::Relaxed)
                    .saturating_add(LEAD.saturating_mul(colors))
                    .min(frames);
                if next >= goal || stop.load(Ordering::Relaxed) {
                    break;
                }
                {
                    let _g = self.budget_lock.lock().unwrap_or_else(|e| e.into_inner());
                    let seg = &self.segments[next as usize / SEGMENT_FRAMES];
                    if seg.state.load(Ordering::SeqCst) == SEG_ONLINE {
                        self.arena.populate(next as usize)?;
                        done += 1;
                    }
                }
                p.resident[c].store(next.saturating_add(colors), Ordering::Relaxed);
            }
        }
        p.frames.fetch_add(done, Ordering::Relaxed);
        Ok(done)
    }

    /// The prefault thread's loop, until `stop`.
    pub(crate) fn prefault_daemon(&self, stop: &AtomicBool) {
        let p = &self.prefault;
        while !stop.load(Ordering::SeqCst) {
            p.wanted.store(false, Ordering::SeqCst);
            if let Err(e) = self.prefault_pass(stop) {
                log::info!("vm: frames are not made resident ahead of use: {e}");
                return;
            }
            let g = p.lock.lock().unwrap_or_else(|e| e.into_inner());
            if !p.wanted.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
                let _ =
                    p.cv.wait_timeout(g, Duration::from_secs(1))
                        .unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AllocClass, Grab, PageBusy, PageKey, VmConfig};

    /// The kernel's residency (mincore) shows what a pass does: nothing
    /// before any frame is taken; then the `LEAD` frames the color taken
    /// from hands out next, beyond the highest it handed out, but not
    /// those of segments not online; and a frame in use keeps its
    /// bytes.
    #[test]
    fn a_pass_makes_the_next_frames_resident_and_leaves_their_bytes() {
        let mut cfg = VmConfig::new(32 << 20);
        cfg.budget_bytes_max = 64 << 20;
        cfg.colors = 2;
        let vm = Vm::new(cfg).unwrap();
        let online = vm.online_pages();
        assert_eq!(online, 512);
        let lead = LEAD as usize * 2;
        let stop = AtomicBool::new(false);
        assert_eq!(vm.prefault_pass(&stop).unwrap(), 0, "nothing used yet");
        assert!(
            vm.arena.resident().iter().all(|r| !r),
            "reserved, not touched"
        );

        // 10 frames of the caller's color taken and written: the next 128
        // frames of that color are made resident, the first 10 keeping
        // their bytes.
        let weak: std::sync::Weak<dyn crate::Pager> = std::sync::Weak::<NoPager>::new();
        let obj = vm.object_create(weak).unwrap();
        let vm: &Vm = &vm;
        let mut pages = Vec::new();
        fn take<'a>(vm: &'a Vm, obj: crate::ObjectId, pages: &mut Vec<PageBusy<'a>>, n: u64) {
            for i in pages.len() as u64..n {
                let Grab::New(mut page) = vm
                    .grab(PageKey::new(obj, i).unwrap(), AllocClass::Normal, false)
                    .unwrap()
                else {
                    panic!("a new key")
                };
                page.data_mut().fill(i as u8);
                pages.push(page);
            }
        }
        take(vm, obj, &mut pages, 10);
        let made = vm.prefault_pass(&stop).unwrap();
        let resident = vm.arena.resident();
        let color = if resident[0] { 0 } else { 1 };
        for (idx, r) in resident.iter().enumerate() {
            assert_eq!(*r, idx % 2 == color && idx < 20 + lead, "frame {idx}");
        }
        assert_eq!(made, 10 + LEAD as u64);

        // 150 more: the lead reaches the end of the online segments.
        take(vm, obj, &mut pages, 160);
        let made = vm.prefault_pass(&stop).unwrap();
        let resident = vm.arena.resident();
        for (idx, r) in resident.iter().enumerate() {
            assert_eq!(*r, idx % 2 == color && idx < online, "frame {idx}");
        }
        assert_eq!(made, online as u64 / 2 - 10 - LEAD as u64);
        assert_eq!(vm.stats().prefaulted, online as u64 / 2);
        for (i, p) in pages.iter_mut().enumerate() {
            assert!(p.data_mut().iter().all(|b| *b == i as u8), "page {i}");
        }
        assert_eq!(vm.prefault_pass(&stop).unwrap(), 0, "nothing left");
    }

    struct NoPager;

    impl crate::Pager for NoPager {
        fn launder(&self, _pages: &[crate::LaunderPage<'_>]) {}
    }
}
