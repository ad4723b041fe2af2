//! Anonymous pages: frames of the arena owned by one holder instead of
//! bound to a key, for data that has no place in any object yet (a
//! file's data written and not yet laundered: DragonFly keeps it in the
//! vnode's VM object; here the filesystem above keeps it, on these
//! pages, under the same budget as the buffer cache).
//!
//! An `AnonPage` is taken like any page (`take_page`, with the reserve
//! tiers and the wait for pageout), then wired and left on no queue in
//! the `Wired` state with no key. Nothing else can reach it: it is in no
//! hash slot, no index shard and on no list, so no lookup, scan or
//! segment drain meets it, and the `AnonPage` is the one path to its
//! frame. It counts as wired (pageout cannot take it) and in
//! `VmStats::anon`. Dropping it frees the page (Offline if its segment
//! is draining).
//!
//! Anonymous pages may take at most half the online pages: pageout cannot
//! write them, so the other half stays for the buffers their owner needs
//! to write them out (a filesystem's flush), which would otherwise wait
//! for pages that only that flush can free.

// `unsafe` only at the marked frame-access sites, each with its SAFETY note.
#![deny(unsafe_code)]

use crate::error::{AllocClass, Error, Result};
use crate::page::{Queue, FRAME_BYTES};
use crate::vm::Vm;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// One page of the arena owned by its holder (see the module notes).
pub struct AnonPage {
    vm: Arc<Vm>,
    idx: u32,
}

impl Vm {
    /// Take a page for the caller alone: wired, with no key, its frame's
    /// contents whatever the frame held last. With `wait`, sleeps (up to
    /// `alloc_wait_max`) for pageout to free pages, as `grab` does. Fails
    /// at once with `AnonLimit` when anonymous pages take half the online
    /// pages already (module notes).
    pub fn alloc_anon(self: &Arc<Self>, class: AllocClass, wait: bool) -> Result<AnonPage> {
        let online = self.online_pages();
        let anon = self.anon_pages.fetch_add(1, Ordering::SeqCst);
        if anon >= online / 2 {
            self.anon_pages.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::AnonLimit {
                anon_pages: anon,
                online_pages: online,
            });
        }
        self.anon_peak.fetch_max(anon + 1, Ordering::Relaxed);
        let idx = match self.take_page(class, wait) {
            Ok(idx) => idx,
            Err(e) => {
                self.anon_pages.fetch_sub(1, Ordering::SeqCst);
                return Err(e);
            }
        };
        let page = self.page(idx);
        let old = page.wire.fetch_add(1, Ordering::SeqCst);
        debug_assert_eq!(old, 0, "a page taken free was wired");
        self.wired_pages.fetch_add(1, Ordering::Relaxed);
        let mut l = self.lock_page(idx);
        l.shift(idx, Queue::Wired);
        drop(l);
        self.unbusy_exclusive(idx);
        Ok(AnonPage {
            vm: self.clone(),
            idx,
        })
    }

    /// Anonymous pages taken and not yet dropped.
    pub fn anon_pages(&self) -> usize {
        self.anon_pages.load(Ordering::Relaxed)
    }
}

impl AnonPage {
    /// The frame's bytes.
    pub fn data(&self) -> &[u8] {
        // SAFETY: the page is anonymous and this `AnonPage` is the one
        // path to its frame (module notes), so the only slices of the
        // frame are those borrowed from it; `data_mut` borrows it
        // mutably, so none of those coexists with this one.
        #[allow(unsafe_code)]
        unsafe {
            self.vm.arena.frame(self.idx as usize)
        }
    }

    /// The frame's bytes, to write.
    pub fn data_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `data`; the slice borrows `self` mutably, so it is
        // the only slice of the frame while it lives.
        #[allow(unsafe_code)]
        unsafe {
            self.vm.arena.frame_mut(self.idx as usize)
        }
    }

    /// Frame number, for diagnostics and tests.
    pub fn frame(&self) -> u32 {
        self.idx
    }

    /// The page layer the page belongs to.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// Bytes of memory the page holds: one frame.
    pub const BYTES: usize = FRAME_BYTES;
}

impl fmt::Debug for AnonPage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AnonPage(frame {})", self.idx)
    }
}

impl Drop for AnonPage {
    fn drop(&mut self) {
        let (vm, idx) = (&self.vm, self.idx);
        let page = vm.page(idx);
        // Nothing else can busy the page (module notes), so this cannot
        // fail; the busy is what `free_unbound_locked` hands back.
        let busied = page.try_busy_exclusive();
        debug_assert!(busied, "anonymous page {idx} was busy");
        let old = page.wire.fetch_sub(1, Ordering::SeqCst);
        debug_assert_eq!(old, 1, "anonymous page {idx} wired {old} times");
        vm.wired_pages.fetch_sub(1, Ordering::Relaxed);
        vm.anon_pages.fetch_sub(1, Ordering::Relaxed);
        let mut l = vm.lock_page(idx);
        l.shift(idx, Queue::None);
        vm.free_unbound_locked(&mut l, idx);
        drop(l);
        vm.notify_free();
    }
}

#[cfg(test)]
mod tests {
    use crate::{AllocClass, Error, PageKey, Vm, VmConfig, FRAME_BYTES};

    fn vm(mib: u64) -> std::sync::Arc<Vm> {
        let mut cfg = VmConfig::new(mib << 20);
        cfg.alloc_wait_max = std::time::Duration::from_millis(50);
        Vm::new(cfg).unwrap()
    }

    #[test]
    fn an_anonymous_page_keeps_its_bytes_and_counts_as_wired() {
        let vm = vm(8);
        let before = vm.stats();
        let mut p = vm.alloc_anon(AllocClass::Normal, true).unwrap();
        p.data_mut().fill(0xa5);
        p.data_mut()[FRAME_BYTES - 1] = 7;
        let s = vm.stats();
        assert_eq!(s.anon, 1);
        assert_eq!(s.wired, before.wired + 1);
        assert_eq!(s.free, before.free - 1);
        vm.verify().unwrap();
        assert!(p.data()[..FRAME_BYTES - 1].iter().all(|&b| b == 0xa5));
        assert_eq!(p.data()[FRAME_BYTES - 1], 7);
        drop(p);
        let s = vm.stats();
        assert_eq!((s.anon, s.wired, s.free), (0, before.wired, before.free));
        vm.verify().unwrap();
    }

    /// A page freed is the next one taken (of its color): its frame is
    /// resident and warm, and frames never used stay untouched.
    #[test]
    fn a_freed_page_is_the_next_taken() {
        let vm = vm(8);
        let a = vm.alloc_anon(AllocClass::Normal, true).unwrap();
        let b = vm.alloc_anon(AllocClass::Normal, true).unwrap();
        let (fa, fb) = (a.frame(), b.frame());
        drop(a);
        let c = vm.alloc_anon(AllocClass::Normal, true).unwrap();
        assert_eq!(c.frame(), fa);
        drop(b);
        drop(c);
        let d = vm.alloc_anon(AllocClass::Normal, true).unwrap();
        let e = vm.alloc_anon(AllocClass::Normal, true).unwrap();
        assert_eq!((d.frame(), e.frame()), (fa, fb), "last freed, first taken");
        drop((d, e));
        vm.verify().unwrap();
    }

    /// Anonymous pages stop at half the online pages; pageout never
    /// takes one, and bound pages can still be had around them; freeing
    /// one lets the next through.
    #[test]
    fn anonymous_pages_stop_at_half_are_not_paged_out_and_free_on_drop() {
        let vm = vm(4);
        struct Clean;
        impl crate::Pager for Clean {
            fn launder(&self, _: &[crate::LaunderPage<'_>]) {}
        }
        let pager: std::sync::Arc<dyn crate::Pager> = std::sync::Arc::new(Clean);
        let obj = vm.object_create(std::sync::Arc::downgrade(&pager)).unwrap();
        let mut held = Vec::new();
        loop {
            match vm.alloc_anon(AllocClass::Normal, true) {
                Ok(mut p) => {
                    let n = held.len() as u8;
                    p.data_mut()[0] = n;
                    held.push(p);
                }
                Err(Error::AnonLimit {
                    anon_pages,
                    online_pages,
                }) => {
                    assert_eq!((anon_pages, online_pages), (held.len(), 64));
                    break;
                }
                Err(e) => panic!("{e}"),
            }
            assert!(held.len() <= 64, "more anonymous pages than the budget");
        }
        assert_eq!(held.len(), 32, "half of 64 pages");
        assert_eq!((vm.stats().anon, vm.stats().anon_peak), (32, 32));
        vm.pageout_run();
        vm.verify().unwrap();
        for (i, p) in held.iter().enumerate() {
            assert_eq!(p.data()[0], i as u8, "page {i} changed under its owner");
        }
        let key = PageKey::new(obj, 1).unwrap();
        match vm.grab(key, AllocClass::Normal, true).unwrap() {
            crate::Grab::New(_) => {}
            crate::Grab::Found(_) => panic!("a key never bound was found"),
        }
        held.pop();
        assert!(vm.alloc_anon(AllocClass::Normal, true).is_ok());
        drop(held);
        vm.verify().unwrap();
        assert_eq!(vm.stats().anon, 0);
    }
}
