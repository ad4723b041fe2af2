//! Multi-thread stress of the page layer: concurrent lookup, grab (and so
//! rebinding of pages to new keys), write, wire, unwire, free, pageout by
//! the daemon with laundering, and budget shrink/grow, on a budget much
//! smaller than the key space. Checked along the way:
//! - a lookup or grab never returns a page bound to another key (checked
//!   against the key and against the key stamped in the frame);
//! - no page is owned twice: an exclusive owner stamps a token in the frame
//!   and finds it intact at release; shared readers and the pager find no
//!   token;
//! - a wired page is never reclaimed, nor freed while the thread that
//!   wired it still holds the wire.
//!
//! and at the end `Vm::verify`: every page on exactly one queue or
//! Offline, counters equal to the lists, index and keys in bijection.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vmglue::{AllocClass, Grab, LaunderPage, ObjectId, PageKey, Pager, Vm, VmConfig};

const MIB: u64 = 1 << 20;
const KEYS: u64 = 400;
const TOKEN: std::ops::Range<usize> = 8..16;

#[derive(Default)]
struct CheckingPager {
    errors: AtomicUsize,
    laundered: AtomicUsize,
    calls: AtomicUsize,
}

impl Pager for CheckingPager {
    fn launder(&self, pages: &[LaunderPage<'_>]) {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        for p in pages {
            let d = p.data();
            if d[..8] != p.key().index().to_le_bytes() || d[TOKEN] != [0u8; 8] {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
            // Fail one call in ten: the pages must stay dirty and survive.
            if call % 10 != 9 {
                p.mark_clean(p.dirty());
                self.laundered.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn key(obj: ObjectId, i: u64) -> PageKey {
    PageKey::new(obj, i).unwrap()
}

fn worker(vm: &Vm, obj: ObjectId, seed: u64, ops: usize, errors: &AtomicUsize) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let token = (seed + 1).to_le_bytes();
    let mut wired: Vec<u64> = Vec::new();
    let fail = |what: &str| {
        errors.fetch_add(1, Ordering::Relaxed);
        eprintln!("thread {seed}: {what}");
    };
    for _ in 0..ops {
        let i = rng.gen_range(0..KEYS);
        match rng.gen_range(0..100) {
            0..=39 => {
                if let Some(h) = vm.lookup(key(obj, i)) {
                    if h.key() != key(obj, i) {
                        fail("lookup returned another key");
                    }
                    let s = h.busy_shared();
                    if s.key() != key(obj, i) {
                        fail("key changed while held");
                    }
                    if s.valid() & 1 != 0 && s.data()[..8] != i.to_le_bytes() {
                        fail("frame stamped with another key");
                    }
                    if s.data()[TOKEN] != [0u8; 8] {
                        fail("shared busy while an owner is inside");
                    }
                }
            }
            40..=74 => {
                let grabbed = vm.grab(key(obj, i), AllocClass::Normal, true);
                let mut b = match grabbed {
                    Ok(Grab::New(b)) => b,
                    Ok(Grab::Found(h)) => h.busy_exclusive(),
                    Err(e) => {
                        fail(&format!("grab failed: {e}"));
                        continue;
                    }
                };
                if b.key() != key(obj, i) {
                    fail("grab returned another key");
                }
                if b.valid() & 1 != 0 && b.data()[..8] != i.to_le_bytes() {
                    fail("grabbed frame stamped with another key");
                }
                if b.data()[TOKEN] != [0u8; 8] {
                    fail("exclusive busy found another owner's token");
                }
                b.data_mut()[TOKEN].copy_from_slice(&token);
                b.data_mut()[..8].copy_from_slice(&i.to_le_bytes());
                for _ in 0..rng.gen_range(0..50) {
                    std::hint::spin_loop();
                }
                if b.data()[TOKEN] != token {
                    fail("token overwritten: page owned twice");
                }
                b.data_mut()[TOKEN].fill(0);
                if rng.gen_bool(0.5) {
                    b.set_dirty(1);
                } else {
                    b.set_valid(1);
                }
                if wired.len() < 3 && rng.gen_bool(0.1) && !wired.contains(&i) {
                    b.wire();
                    wired.push(i);
                }
            }
            75..=84 => {
                if let Some(pos) = (!wired.is_empty()).then(|| rng.gen_range(0..wired.len())) {
                    let w = wired.swap_remove(pos);
                    match vm.lookup(key(obj, w)) {
                        Some(h) => h.unwire(),
                        None => fail("wired page was reclaimed"),
                    }
                }
            }
            _ => {
                // Aim at this thread's own wired pages now and then, so the
                // exact check below runs often.
                let i = match wired.len() {
                    n if n > 0 && rng.gen_bool(0.2) => wired[rng.gen_range(0..n)],
                    _ => i,
                };
                if let Some(h) = vm.lookup(key(obj, i)) {
                    // Only this thread's own wirings are known to hold
                    // through the free: another thread's may be dropped at
                    // any moment (unwire needs no busy), so a wire count
                    // read here can fall to zero before `free` looks.
                    let wired_here = wired.contains(&i);
                    let b = h.busy_exclusive();
                    if wired_here && b.wire_count() == 0 {
                        fail("page wired by this thread has wire count zero");
                    }
                    if b.free() && wired_here {
                        fail("wired page freed");
                    }
                }
            }
        }
    }
    for w in wired {
        match vm.lookup(key(obj, w)) {
            Some(h) => h.unwire(),
            None => fail("wired page was reclaimed"),
        }
    }
}

#[test]
fn concurrent_wire_lookup_rebind_pageout_budget() {
    let mut cfg = VmConfig::new(4 * MIB);
    cfg.budget_bytes_max = 8 * MIB;
    cfg.colors = 4;
    cfg.alloc_wait_max = Duration::from_secs(20);
    let vm = Vm::new(cfg).unwrap();
    let pager = Arc::new(CheckingPager::default());
    let weak: std::sync::Weak<dyn Pager> = Arc::downgrade(&(pager.clone() as Arc<dyn Pager>));
    let obj = vm.object_create(weak).unwrap();
    let daemon = vm.start_pageout().unwrap();
    let errors = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..4u64)
            .map(|t| {
                let (vm, errors) = (&vm, &errors);
                s.spawn(move || worker(vm, obj, t, 50_000, errors))
            })
            .collect();
        let (vm2, done2) = (&vm, &done);
        let budgeter = s.spawn(move || {
            let mut big = false;
            while !done2.load(Ordering::SeqCst) {
                big = !big;
                vm2.set_budget(if big { 8 * MIB } else { 4 * MIB }).unwrap();
                std::thread::sleep(Duration::from_millis(3));
            }
        });
        for w in workers {
            w.join().unwrap();
        }
        done.store(true, Ordering::SeqCst);
        budgeter.join().unwrap();
    });
    drop(daemon);
    vm.pageout_run();
    vm.verify().unwrap();
    assert_eq!(errors.load(Ordering::Relaxed), 0, "worker checks failed");
    assert_eq!(
        pager.errors.load(Ordering::Relaxed),
        0,
        "pager saw a foreign frame"
    );
    let st = vm.stats();
    eprintln!(
        "stress: {st:?}, laundered {}, pageout runs {}",
        pager.laundered.load(Ordering::Relaxed),
        vm.pageout_durations().len()
    );
    assert_eq!(st.wired, 0);
    assert!(
        pager.laundered.load(Ordering::Relaxed) > 0,
        "pageout never laundered"
    );
}

/// Lookups race with constant rebinding of a tiny budget's pages to new
/// keys: a hold must never come back on a page bound to another key, and
/// the key must not move while held.
#[test]
fn lockless_hash_never_returns_a_foreign_page() {
    let vm = Vm::new(VmConfig::new(4 * MIB)).unwrap();
    let pager = Arc::new(CheckingPager::default());
    let weak: std::sync::Weak<dyn Pager> = Arc::downgrade(&(pager.clone() as Arc<dyn Pager>));
    let obj = vm.object_create(weak).unwrap();
    let bad = AtomicUsize::new(0);
    let hits = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (vm1, stop1) = (&vm, &stop);
        let rebinder = s.spawn(move || {
            let mut rng = SmallRng::seed_from_u64(99);
            for _ in 0..30_000 {
                let i = rng.gen_range(0..1000);
                match vm1.grab(key(obj, i), AllocClass::Normal, false) {
                    Ok(Grab::New(mut b)) => {
                        b.data_mut()[..8].copy_from_slice(&i.to_le_bytes());
                        b.set_valid(1);
                        if rng.gen_bool(0.5) {
                            b.free();
                        }
                    }
                    Ok(Grab::Found(h)) => {
                        let _ = h.busy_exclusive().free();
                    }
                    Err(_) => {
                        vm1.pageout_run();
                    }
                }
            }
            stop1.store(true, Ordering::SeqCst);
        });
        for t in 0..2u64 {
            let (vm2, bad2, hits2, stop2) = (&vm, &bad, &hits, &stop);
            s.spawn(move || {
                let mut rng = SmallRng::seed_from_u64(t);
                while !stop2.load(Ordering::SeqCst) {
                    let i = rng.gen_range(0..1000);
                    if let Some(h) = vm2.lookup(key(obj, i)) {
                        hits2.fetch_add(1, Ordering::Relaxed);
                        let k1 = h.key();
                        std::hint::spin_loop();
                        let k2 = h.key();
                        if k1 != key(obj, i) || k2 != k1 {
                            bad2.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        rebinder.join().unwrap();
    });
    assert_eq!(bad.load(Ordering::Relaxed), 0);
    assert!(hits.load(Ordering::Relaxed) > 0);
    vm.verify().unwrap();
}
