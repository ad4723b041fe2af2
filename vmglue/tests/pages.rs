//! Page layer behaviour against independent models: a `BTreeMap` of what
//! each key should hold (in the frame or, once laundered, in the pager's
//! store), and `Vm::verify`'s structural invariants after every scenario.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use vmglue::{
    AllocClass, Error, Grab, LaunderPage, ObjectId, PageKey, Pager, Vm, VmConfig, FRAME_BYTES,
};

const MIB: u64 = 1 << 20;

/// A pager that stores what it is given, like a device would.
#[derive(Default)]
struct StorePager {
    store: Mutex<BTreeMap<u64, Vec<u8>>>,
}

impl Pager for StorePager {
    fn launder(&self, pages: &[LaunderPage<'_>]) {
        let mut store = self.store.lock().unwrap();
        for p in pages {
            store.insert(p.key().index(), p.data()[..64].to_vec());
            p.mark_clean(p.dirty());
        }
    }
}

fn setup(budget: u64, max: u64) -> (Arc<Vm>, Arc<StorePager>, ObjectId) {
    let mut cfg = VmConfig::new(budget);
    cfg.budget_bytes_max = max;
    cfg.colors = 4;
    let vm = Vm::new(cfg).unwrap();
    let pager = Arc::new(StorePager::default());
    let weak: std::sync::Weak<dyn Pager> = Arc::downgrade(&(pager.clone() as Arc<dyn Pager>));
    let obj = vm.object_create(weak).unwrap();
    (vm, pager, obj)
}

fn key(obj: ObjectId, i: u64) -> PageKey {
    PageKey::new(obj, i).unwrap()
}

fn pattern(i: u64, generation: u8) -> Vec<u8> {
    let mut v = i.to_le_bytes().to_vec();
    v.extend((0..56).map(|j| generation.wrapping_add(j)));
    v
}

/// Write `pattern(i, g)` into a new or found page; `dirty` decides
/// whether it must reach the pager before the page can be freed.
fn put(vm: &Vm, obj: ObjectId, i: u64, g: u8, dirty: bool) -> Result<(), Error> {
    let mut busy = match vm.grab(key(obj, i), AllocClass::Normal, false)? {
        Grab::New(b) => b,
        Grab::Found(h) => h.busy_exclusive(),
    };
    busy.data_mut()[..64].copy_from_slice(&pattern(i, g));
    if dirty {
        busy.set_dirty(1);
    } else {
        busy.set_valid(1);
    }
    Ok(())
}

#[test]
fn grab_lookup_free_round_trip() {
    let (vm, _pager, obj) = setup(4 * MIB, 4 * MIB);
    put(&vm, obj, 7, 1, false).unwrap();
    {
        let h = vm.lookup(key(obj, 7)).expect("resident");
        assert_eq!(h.key(), key(obj, 7));
        let s = h.busy_shared();
        assert_eq!(&s.data()[..64], &pattern(7, 1)[..]);
        assert_eq!(s.valid(), 1);
    }
    assert!(vm.lookup(key(obj, 8)).is_none());
    let busy = vm.lookup(key(obj, 7)).unwrap().busy_exclusive();
    assert!(busy.free());
    assert!(vm.lookup(key(obj, 7)).is_none());
    vm.verify().unwrap();
    let s = vm.stats();
    assert_eq!(s.free, s.online_pages);
}

#[test]
fn pageout_keeps_every_write_in_frame_or_pager() {
    let (vm, pager, obj) = setup(4 * MIB, 4 * MIB);
    let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut rng = 0x1234_5678u64;
    for round in 0..2000u64 {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let i = (rng >> 33) % 300;
        let g = (round % 251) as u8;
        match put(&vm, obj, i, g, true) {
            Ok(()) => {
                model.insert(i, pattern(i, g));
            }
            Err(Error::WouldBlock { .. }) => {
                vm.pageout_run();
            }
            Err(e) => panic!("{e}"),
        }
    }
    vm.pageout_run();
    vm.verify().unwrap();
    let store = pager.store.lock().unwrap();
    for (i, want) in &model {
        match vm.lookup(key(obj, *i)) {
            Some(h) => {
                let s = h.busy_shared();
                assert_eq!(&s.data()[..64], &want[..], "resident page {i}");
            }
            None => assert_eq!(store.get(i), Some(want), "evicted page {i}"),
        }
    }
}

#[test]
fn dirty_pages_are_laundered_before_they_are_freed() {
    let (vm, pager, obj) = setup(4 * MIB, 4 * MIB);
    let pages = vm.stats().online_pages as u64;
    // Fill the budget with dirty pages, then force them all out.
    let mut written = Vec::new();
    for i in 0..pages * 3 {
        match put(&vm, obj, i, 9, true) {
            Ok(()) => written.push(i),
            Err(Error::WouldBlock { .. }) => {
                vm.pageout_run();
            }
            Err(e) => panic!("{e}"),
        }
    }
    vm.pageout_run();
    vm.verify().unwrap();
    let store = pager.store.lock().unwrap();
    for &i in &written {
        if vm.lookup(key(obj, i)).is_none() {
            assert_eq!(
                store.get(&i),
                Some(&pattern(i, 9)),
                "page {i} freed without laundering"
            );
        }
    }
    assert!(!store.is_empty());
}

#[test]
fn reserve_tiers_keep_pages_for_flush_and_pageout() {
    let (vm, _pager, obj) = setup(4 * MIB, 4 * MIB);
    let mut held = Vec::new();
    let mut i = 0u64;
    let normal_err = loop {
        match vm.grab(key(obj, i), AllocClass::Normal, false) {
            Ok(Grab::New(b)) => held.push(b),
            Ok(Grab::Found(_)) => unreachable!("fresh key"),
            Err(e) => break e,
        }
        i += 1;
    };
    assert!(matches!(
        normal_err,
        Error::WouldBlock {
            class: AllocClass::Normal
        }
    ));
    let flush = vm.grab(key(obj, i), AllocClass::Flush, false);
    assert!(
        matches!(flush, Ok(Grab::New(_))),
        "flush class digs into its reserve"
    );
    i += 1;
    let mut pageout_got = 0;
    while let Ok(Grab::New(b)) = vm.grab(key(obj, i + pageout_got), AllocClass::Pageout, false) {
        held.push(b);
        pageout_got += 1;
    }
    assert!(pageout_got > 0, "pageout class gets the last pages");
    assert_eq!(vm.stats().free + vm.stats().cache, 0);
    drop(flush);
    drop(held);
    vm.verify().unwrap();
}

#[test]
fn wired_pages_are_never_reclaimed_and_requeue_after_unwire() {
    let (vm, _pager, obj) = setup(4 * MIB, 4 * MIB);
    for i in 0..10 {
        put(&vm, obj, i, 3, false).unwrap();
        let b = vm.lookup(key(obj, i)).unwrap().busy_exclusive();
        b.wire();
    }
    // Churn enough other pages to cycle the queues many times.
    for i in 100..2000 {
        if put(&vm, obj, i, 4, false).is_err() {
            vm.pageout_run();
        }
    }
    vm.pageout_run();
    let st = vm.stats();
    assert_eq!(st.wired, 10);
    assert!(st.unqueued > 0, "scans dequeued wired pages lazily");
    vm.verify().unwrap();
    for i in 0..10 {
        let h = vm.lookup(key(obj, i)).expect("wired page stayed");
        {
            let s = vm.lookup(key(obj, i)).unwrap().busy_shared();
            assert_eq!(&s.data()[..64], &pattern(i, 3)[..]);
        }
        h.unwire();
    }
    let st = vm.stats();
    assert_eq!(st.wired, 0);
    vm.verify().unwrap();
    assert_eq!(vm.stats().unqueued, 0);
}

#[test]
fn budget_shrinks_in_segments_and_grows_back() {
    let (vm, pager, obj) = setup(8 * MIB, 16 * MIB);
    assert_eq!(vm.stats().online_pages, 128);
    for i in 0..120 {
        put(&vm, obj, i, 5, i % 3 == 0).unwrap();
    }
    vm.set_budget(4 * MIB).unwrap();
    for _ in 0..8 {
        vm.pageout_run();
    }
    assert_eq!(vm.stats().online_pages, 64);
    assert_eq!(vm.budget_bytes(), 4 * MIB);
    vm.verify().unwrap();
    {
        let store = pager.store.lock().unwrap();
        for i in (0..120).filter(|i| i % 3 == 0) {
            if vm.lookup(key(obj, i)).is_none() {
                assert_eq!(store.get(&i), Some(&pattern(i, 5)));
            }
        }
    }
    vm.set_budget(16 * MIB).unwrap();
    assert_eq!(vm.stats().online_pages, 256);
    vm.verify().unwrap();
    assert!(matches!(
        vm.set_budget(32 * MIB),
        Err(Error::BudgetAboveMax { .. })
    ));
    assert!(matches!(
        vm.set_budget(MIB),
        Err(Error::BudgetTooSmall { .. })
    ));
    // Frames released and brought back read as zeros or old data, never
    // fault: touch every page.
    for i in 1000..1200 {
        if put(&vm, obj, i, 6, false).is_err() {
            vm.pageout_run();
        }
    }
    vm.verify().unwrap();
    let _ = FRAME_BYTES;
}

#[test]
fn object_destroy_frees_its_pages() {
    let (vm, _pager, obj) = setup(4 * MIB, 4 * MIB);
    for i in 0..20 {
        put(&vm, obj, i, 1, i % 2 == 0).unwrap();
    }
    {
        let _h = vm.lookup(key(obj, 3)).unwrap();
        assert!(matches!(
            vm.object_destroy(obj),
            Err(Error::ObjectBusy { pages: 1, .. })
        ));
    }
    vm.object_destroy(obj).unwrap();
    assert!(matches!(
        vm.object_destroy(obj),
        Err(Error::UnknownObject { .. })
    ));
    let st = vm.stats();
    assert_eq!(st.free, st.online_pages);
    vm.verify().unwrap();
}

/// A resident working set as large as the budget is served by the
/// lockless hash, not the locked index, at least 99% of the time.
#[test]
fn resident_hits_take_the_lockless_path() {
    let (vm, _pager, obj) = setup(64 * MIB, 64 * MIB);
    let keys = vm.stats().online_pages as u64 - 64;
    for i in 0..keys {
        put(&vm, obj, i * 7919, 1, false).unwrap();
    }
    vm.reset_lookup_stats();
    for round in 0..10u64 {
        for i in 0..keys {
            let k = ((i + round) % keys) * 7919;
            assert!(vm.lookup(key(obj, k)).is_some(), "resident key {k}");
        }
    }
    let s = vm.stats().lookups;
    assert_eq!(s.miss, 0);
    let hits = 10 * keys;
    assert_eq!(s.fast + s.slow, hits, "every hit counted once, by its path");
    let share = (hits - s.slow) as f64 / hits as f64;
    assert!(share >= 0.99, "lock-free share {share}");
}
