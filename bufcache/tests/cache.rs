//! Buffer cache behaviour against independent references: a plain byte
//! image as the model of the device, the recording device's log for write
//! order, and the fault device for errors.

use bufcache::{
    BlockDevice, BufCache, BufCacheConfig, Error, Event, FaultDevice, MemDevice, RecordingDevice,
    Vm, VmConfig, FRAME_BYTES,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const F: u64 = FRAME_BYTES as u64;

/// A cache on its own page layer with a running pageout daemon (dropped
/// after the cache, as tuple fields drop in order).
fn cache_on(
    dev: Arc<dyn BlockDevice>,
    budget: u64,
    cfg: BufCacheConfig,
) -> (BufCache, vmglue::PageoutDaemon) {
    let vm = Vm::new(VmConfig::new(budget)).unwrap();
    let daemon = vm.start_pageout().unwrap();
    (BufCache::new(dev, vm, cfg).unwrap(), daemon)
}

fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for b in buf {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

#[test]
fn random_ops_match_a_byte_image_through_eviction() {
    let size = 16 * MIB;
    let mem = Arc::new(MemDevice::new(size));
    let cache = BufCache::open(mem.clone(), 4 * MIB).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = SmallRng::seed_from_u64(7);
    for step in 0..3000u64 {
        // HAMMER2-like blocks: 1 KiB to 64 KiB, naturally aligned.
        let radix = rng.gen_range(10..=16);
        let len = 1usize << radix;
        let off = rng.gen_range(0..size / len as u64) * len as u64;
        let o = off as usize;
        match rng.gen_range(0..10) {
            0..=3 => {
                let b = cache.bread(off, len).unwrap();
                assert_eq!(
                    b.data(),
                    &model[o..o + len],
                    "step {step} bread {off:#x}+{len}"
                );
            }
            4..=7 => {
                let mut b = if rng.gen_bool(0.5) {
                    cache.bread_mut(off, len).unwrap()
                } else {
                    cache.getblk(off, len).unwrap()
                };
                fill(b.data_mut(), step);
                fill(&mut model[o..o + len], step);
                match rng.gen_range(0..3) {
                    0 => b.bdwrite().unwrap(),
                    1 => b.bawrite().unwrap(),
                    _ => b.bwrite().unwrap(),
                }
            }
            8 => {
                let b = cache.bread_mut(off, len).unwrap();
                assert_eq!(b.data(), &model[o..o + len]);
                if rng.gen_bool(0.5) {
                    b.brelse();
                } else {
                    b.bqrelse();
                }
            }
            _ => cache.flush().unwrap(),
        }
    }
    cache.flush().unwrap();
    let mut disk = vec![0u8; size as usize];
    mem.read_at(&mut disk, 0).unwrap();
    assert!(disk == model, "device differs from the model after flush");
    cache.vm().verify().unwrap();
    assert!(cache.stats().misses > 0);
}

#[test]
fn flush_writes_in_device_order_coalesced_then_barrier() {
    let rec = Arc::new(RecordingDevice::new(8 * MIB));
    let (cache, _pageout) = cache_on(
        rec.clone(),
        8 * MIB,
        BufCacheConfig {
            flusher_thread: false,
            ..BufCacheConfig::default()
        },
    );
    // Dirty buffers 10..20 (neighbours) and 40, in scrambled order.
    for i in [15u64, 12, 40, 10, 19, 11, 13, 14, 16, 17, 18] {
        let mut b = cache.getblk(i * F, FRAME_BYTES).unwrap();
        b.data_mut().fill(i as u8);
        b.bdwrite().unwrap();
    }
    let before = rec.position();
    cache.flush().unwrap();
    rec.mark_here("flushed");
    let mut h = cache.getblk(0, 4096).unwrap();
    h.data_mut().fill(0xee);
    h.bwrite().unwrap();
    cache.barrier().unwrap();
    let events = rec.events();
    let flush_events = &events[before..rec.mark_position("flushed").unwrap()];
    let writes: Vec<(u64, usize)> = flush_events
        .iter()
        .filter_map(|e| match e {
            Event::Write { offset, data } => Some((*offset, data.len())),
            _ => None,
        })
        .collect();
    assert!(matches!(flush_events.last(), Some(Event::Barrier)));
    assert!(
        writes.windows(2).all(|w| w[0].0 < w[1].0),
        "device order: {writes:?}"
    );
    assert_eq!(writes.len(), 2, "neighbours coalesced: {writes:?}");
    assert_eq!(writes[0], (10 * F, 10 * FRAME_BYTES));
    // The image at the flush barrier holds all data but not the header.
    let barrier = rec.barrier_positions()[0];
    let img = rec.image_at(barrier + 1);
    let mut b = vec![0u8; FRAME_BYTES];
    for i in [10u64, 15, 19, 40] {
        img.read_at(&mut b, i * F).unwrap();
        assert!(b.iter().all(|&x| x == i as u8));
    }
    img.read_at(&mut b[..4096], 0).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 0));
    let last = rec.image_at(rec.position());
    last.read_at(&mut b[..4096], 0).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 0xee));
}

#[test]
fn failed_write_poisons_until_reopened() {
    let mem: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(4 * MIB));
    let faulty = Arc::new(FaultDevice::new(mem.clone()));
    let (cache, _pageout) = cache_on(faulty.clone(), 4 * MIB, BufCacheConfig::default());
    let mut b = cache.getblk(0, 4096).unwrap();
    b.data_mut().fill(1);
    b.bwrite().unwrap();
    faulty.fail_writes_after(0);
    let mut b = cache.getblk(F, 4096).unwrap();
    b.data_mut().fill(2);
    assert!(matches!(b.bwrite(), Err(Error::Write { .. })));
    assert!(cache.is_poisoned());
    faulty.fail_writes_after(u64::MAX);
    let b = cache.getblk(2 * F, 4096).unwrap();
    assert!(matches!(b.bdwrite(), Err(Error::Poisoned { .. })));
    assert!(matches!(cache.flush(), Err(Error::Poisoned { .. })));
    // Reads still work.
    assert_eq!(cache.bread(0, 4096).unwrap().data()[0], 1);
    drop(cache);
    let (cache, _pageout2) = cache_on(faulty.clone(), 4 * MIB, BufCacheConfig::default());
    let b = cache.getblk(2 * F, 4096).unwrap();
    b.bdwrite().unwrap();
    cache.flush().unwrap();
}

#[test]
fn failed_barrier_poisons() {
    let faulty = Arc::new(FaultDevice::new(Arc::new(MemDevice::new(4 * MIB))));
    let (cache, _pageout) = cache_on(faulty.clone(), 4 * MIB, BufCacheConfig::default());
    cache.getblk(0, 1024).unwrap().bdwrite().unwrap();
    faulty.fail_barriers(true);
    assert!(matches!(cache.flush(), Err(Error::Barrier { .. })));
    assert!(matches!(cache.barrier(), Err(Error::Poisoned { .. })));
}

#[test]
fn failed_read_fails_only_that_buffer() {
    let mem = Arc::new(MemDevice::new(4 * MIB));
    mem.write_at(&[5u8; 4096], 3 * F).unwrap();
    let faulty = Arc::new(FaultDevice::new(mem));
    let (cache, _pageout) = cache_on(faulty.clone(), 4 * MIB, BufCacheConfig::default());
    faulty.fail_reads(Some((3 * F, 4 * F)));
    assert!(matches!(cache.bread(3 * F, 4096), Err(Error::Read { .. })));
    assert!(!cache.is_poisoned());
    assert!(cache.bread(5 * F, 4096).is_ok());
    cache.getblk(6 * F, 1024).unwrap().bdwrite().unwrap();
    cache.flush().unwrap();
    faulty.fail_reads(None);
    assert_eq!(cache.bread(3 * F, 4096).unwrap().data(), &[5u8; 4096][..]);
    cache.vm().verify().unwrap();
}

#[test]
fn sequential_misses_read_ahead() {
    let mem = Arc::new(MemDevice::new(8 * MIB));
    for i in 0..64u64 {
        mem.write_at(&[i as u8; 16], i * F).unwrap();
    }
    let (cache, _pageout) = cache_on(mem, 8 * MIB, BufCacheConfig::default());
    for i in 0..64u64 {
        let b = cache.bread(i * F, 16).unwrap();
        assert_eq!(b.data(), &[i as u8; 16][..]);
    }
    let st = cache.stats();
    assert!(st.read_ahead_buffers > 32, "{st:?}");
    assert!(st.device_reads < 20, "{st:?}");
    // Random misses do not read ahead.
    let before = cache.stats().read_ahead_buffers;
    for i in [100u64, 90, 110, 95] {
        cache.bread(i * F, 16).unwrap();
    }
    assert_eq!(cache.stats().read_ahead_buffers, before);
}

/// A cluster read brings a range in with one device read per run of
/// buffers not resident, skips the resident ones (a dirty one keeps its
/// bytes), stops at the device's end, and the buffers then read without
/// the device and hold the device's bytes.
#[test]
fn a_cluster_read_brings_a_range_in_one_read_per_run() {
    let mem = Arc::new(MemDevice::new(4 * MIB));
    for i in 0..64u64 {
        mem.write_at(&[i as u8 + 1; 16], i * F).unwrap();
    }
    let cfg = BufCacheConfig {
        read_ahead_max: 0,
        ..BufCacheConfig::default()
    };
    let (cache, _pageout) = cache_on(mem.clone(), 8 * MIB, cfg);
    // Buffers 4 and 9 resident, 9 dirty with bytes the device lacks.
    cache.bread(4 * F, 16).unwrap();
    let mut b = cache.getblk(9 * F, 16).unwrap();
    b.data_mut().copy_from_slice(&[0xee; 16]);
    b.bdwrite().unwrap();
    let before = cache.stats();
    cache.cluster_read(2 * F, 12 * F);
    let after = cache.stats();
    // Runs 2..4, 5..9 and 10..14.
    assert_eq!(after.device_reads - before.device_reads, 3, "{after:?}");
    assert_eq!(after.read_ahead_buffers - before.read_ahead_buffers, 10);
    for i in 2..14u64 {
        let b = cache.bread(i * F, 16).unwrap();
        let want = if i == 9 { 0xee } else { i as u8 + 1 };
        assert_eq!(b.data(), &[want; 16][..], "buffer {i}");
    }
    assert_eq!(cache.stats().device_reads, after.device_reads);
    // At most CLUSTER_MAX buffers, and nothing past the device's end.
    let before = cache.stats().device_reads;
    cache.cluster_read(20 * F, 100 * F);
    assert_eq!(cache.stats().device_reads - before, 1);
    assert_eq!(
        cache.stats().read_ahead_buffers - after.read_ahead_buffers,
        bufcache::CLUSTER_MAX as u64
    );
    cache.cluster_read(4 * MIB - F, 8 * F);
    cache.cluster_read(8 * MIB, F);
    assert_eq!(cache.bread(63 * F, 16).unwrap().data(), &[64u8; 16][..]);
    cache.vm().verify().unwrap();
}

/// A check tag recorded by `read_checked` vouches for the bytes only
/// while they stay as read: another tag, a write into the buffer, or the
/// buffer read again from the device after eviction each make the
/// reader check again, and a check that failed records nothing.
/// (Eviction rebinds the page through the same exclusive take as a
/// fill.)
#[test]
fn a_check_tag_lasts_only_while_the_bytes_stay() {
    let mem = Arc::new(MemDevice::new(64 * MIB));
    mem.write_at(&[7u8; 4096], 3 * F).unwrap();
    let (cache, _pageout) = cache_on(mem.clone(), 8 * MIB, BufCacheConfig::default());
    let seen = |tag: u64, pass: bool| {
        let mut r = None;
        cache
            .read_checked(3 * F, 4096, tag, &mut |b, seen| {
                r = Some((b.to_vec(), seen));
                pass
            })
            .unwrap();
        r.unwrap()
    };
    assert_eq!(seen(11, false), (vec![7u8; 4096], false));
    // A failed check recorded nothing.
    assert!(!seen(11, true).1);
    assert!(seen(11, true).1);
    assert!(!seen(12, true).1, "another tag");
    assert!(seen(12, true).1);
    // A write into the buffer forgets the tag.
    let mut b = cache.getblk(3 * F, 16).unwrap();
    b.data_mut().copy_from_slice(&[9u8; 16]);
    b.bdwrite().unwrap();
    let (bytes, was) = seen(12, true);
    assert!(!was, "a tag outlived a write");
    assert_eq!(&bytes[..17], &[[9u8; 16].as_slice(), &[7u8]].concat()[..]);
    assert!(seen(12, true).1);
    cache.flush().unwrap();
    // Dropped from the cache and read again from the device (which
    // changed meanwhile): the tag is gone.
    cache.getblk(3 * F, 16).unwrap().invalidate();
    mem.write_at(&[5u8; 16], 3 * F).unwrap();
    let (bytes, was) = seen(12, true);
    assert_eq!(bytes[0], 5, "the buffer was not read again");
    assert!(!was, "a tag outlived its buffer");
    cache.vm().verify().unwrap();
}

#[test]
fn writers_are_throttled_at_the_dirty_limit() {
    for flusher_thread in [false, true] {
        let mem = Arc::new(MemDevice::new(32 * MIB));
        let cfg = BufCacheConfig {
            dirty_max_bytes: Some(16 * F),
            flusher_thread,
            throttle_wait_max: Duration::from_secs(10),
            ..BufCacheConfig::default()
        };
        let (cache, _pageout) = cache_on(mem, 8 * MIB, cfg);
        let mut peak = 0;
        for i in 0..200u64 {
            let mut b = cache.getblk(i * F, FRAME_BYTES).unwrap();
            b.data_mut().fill(i as u8);
            b.bdwrite().unwrap();
            peak = peak.max(cache.stats().dirty_buffers);
        }
        assert!(peak <= 16, "dirty peaked at {peak} buffers");
        cache.flush().unwrap();
        assert_eq!(cache.stats().dirty_buffers, 0);
    }
}

#[test]
fn requests_outside_the_device_or_across_buffers_are_errors() {
    let (cache, _pageout) = cache_on(
        Arc::new(MemDevice::new(4 * MIB + 512)),
        4 * MIB,
        BufCacheConfig::default(),
    );
    assert!(matches!(
        cache.bread(F - 1024, 2048),
        Err(Error::Range { .. })
    ));
    assert!(matches!(
        cache.bread(4 * MIB, 1024),
        Err(Error::Range { .. })
    ));
    assert!(matches!(cache.getblk(0, 0), Err(Error::Range { .. })));
    assert!(matches!(
        cache.bread(u64::MAX - 10, 5),
        Err(Error::Range { .. })
    ));
    // The partial last buffer is usable up to the device end.
    let mut b = cache.getblk(4 * MIB, 512).unwrap();
    b.data_mut().fill(9);
    b.bwrite().unwrap();
    assert_eq!(cache.bread(4 * MIB, 512).unwrap().data(), &[9u8; 512][..]);
}

#[test]
fn invalidate_discards_dirty_data() {
    let mem = Arc::new(MemDevice::new(4 * MIB));
    let (cache, _pageout) = cache_on(mem.clone(), 4 * MIB, BufCacheConfig::default());
    let mut b = cache.getblk(0, 1024).unwrap();
    b.data_mut().fill(3);
    b.bdwrite().unwrap();
    assert_eq!(cache.stats().dirty_buffers, 1);
    cache.bread_mut(0, 1024).unwrap().invalidate();
    assert_eq!(cache.stats().dirty_buffers, 0);
    cache.flush().unwrap();
    let mut back = [1u8; 1024];
    mem.read_at(&mut back, 0).unwrap();
    assert_eq!(back, [0u8; 1024]);
    cache.vm().verify().unwrap();
}

/// Threads write and read their own regions (each checked against its own
/// model) while sharing the cache, pageout, the flusher and a flushing
/// thread; the device must equal the union of the models at the end.
#[test]
fn concurrent_writers_and_readers_keep_their_data() {
    const THREADS: u64 = 4;
    let size = 32 * MIB;
    let region = size / THREADS;
    let mem = Arc::new(MemDevice::new(size));
    let cache = BufCache::open(mem.clone(), 4 * MIB).unwrap();
    let models: Vec<Vec<u8>> = std::thread::scope(|s| {
        let flusher = s.spawn(|| {
            for _ in 0..20 {
                cache.flush().unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let cache = &cache;
                s.spawn(move || {
                    let mut model = vec![0u8; region as usize];
                    let base = t * region;
                    let mut rng = SmallRng::seed_from_u64(100 + t);
                    for step in 0..1500u64 {
                        let len = 1usize << rng.gen_range(10..=16);
                        let rel = rng.gen_range(0..region / len as u64) * len as u64;
                        let (off, o) = (base + rel, rel as usize);
                        if rng.gen_bool(0.5) {
                            let b = cache.bread(off, len).unwrap();
                            assert_eq!(b.data(), &model[o..o + len], "thread {t} step {step}");
                        } else {
                            let mut b = cache.getblk(off, len).unwrap();
                            fill(b.data_mut(), step * THREADS + t);
                            fill(&mut model[o..o + len], step * THREADS + t);
                            match rng.gen_range(0..3) {
                                0 => b.bdwrite().unwrap(),
                                1 => b.bawrite().unwrap(),
                                _ => b.bwrite().unwrap(),
                            }
                        }
                    }
                    model
                })
            })
            .collect();
        let models = workers.into_iter().map(|w| w.join().unwrap()).collect();
        flusher.join().unwrap();
        models
    });
    cache.flush().unwrap();
    let mut disk = vec![0u8; size as usize];
    mem.read_at(&mut disk, 0).unwrap();
    for (t, model) in models.iter().enumerate() {
        let base = t * region as usize;
        assert!(
            disk[base..base + region as usize] == model[..],
            "region {t} differs"
        );
    }
    cache.vm().verify().unwrap();
}

/// Pages all held: a `CachedDevice` read or write that needs another
/// fails after its tries with `OutOfMemory` (a shortage, which the mount
/// answers with EAGAIN), not as a device error, and poisons nothing;
/// once the holds go, the same read and write work.
#[test]
fn a_shortage_of_pages_is_not_a_device_error() {
    let mem = Arc::new(MemDevice::new(64 * MIB));
    let mut vcfg = VmConfig::new(4 * MIB);
    vcfg.alloc_wait_max = Duration::from_millis(50);
    let vm = Vm::new(vcfg).unwrap();
    let daemon = vm.start_pageout().unwrap();
    let dev =
        bufcache::CachedDevice::new(BufCache::new(mem, vm, BufCacheConfig::default()).unwrap());
    let mut held = Vec::new();
    let mut i = 0;
    let short = loop {
        match dev.cache().bread(i * F, F as usize) {
            Ok(b) => held.push(b),
            Err(e) => break e,
        }
        i += 1;
        assert!(i < 1024, "4 MiB of pages never ran out");
    };
    assert!(short.is_resource(), "{short}");
    let far = 32 * MIB;
    let mut buf = vec![0u8; 4096];
    let e = dev.read_at(&mut buf, far).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::OutOfMemory, "{e}");
    let e = dev.write_at(&[7u8; 4096], far).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::OutOfMemory, "{e}");
    assert!(!dev.cache().is_poisoned());
    drop(held);
    dev.write_at(&[7u8; 4096], far).unwrap();
    dev.read_at(&mut buf, far).unwrap();
    assert_eq!(buf, [7u8; 4096]);
    dev.barrier().unwrap();
    drop(dev);
    drop(daemon);
}

/// A memory device that notes how many writes each `write_many` call
/// brought (what a file would have in flight together).
struct Batches {
    mem: MemDevice,
    calls: std::sync::Mutex<Vec<usize>>,
}

impl BlockDevice for Batches {
    fn size_bytes(&self) -> u64 {
        self.mem.size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.mem.write_at(buf, offset)
    }
    fn barrier(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn write_many(&self, writes: &[(u64, Vec<&[u8]>)]) -> Vec<std::io::Result<()>> {
        self.calls.lock().unwrap().push(writes.len());
        writes
            .iter()
            .map(|(off, pieces)| self.mem.write_at(&pieces.concat(), *off))
            .collect()
    }
}

/// A flush hands the device every dirty buffer's write at once, not one
/// after another: 40 scattered dirty buffers and a run of 8 neighbours
/// are 41 writes in one `write_many`; what the device holds after it is
/// what was written.
#[test]
fn a_flush_puts_its_writes_in_flight_together() {
    let dev = Arc::new(Batches {
        mem: MemDevice::new(64 * MIB),
        calls: std::sync::Mutex::new(Vec::new()),
    });
    let vm = Vm::new(VmConfig::new(16 * MIB)).unwrap();
    let d: Arc<dyn BlockDevice> = dev.clone();
    // No flusher thread: nothing is written before the flush.
    let cfg = BufCacheConfig {
        flusher_thread: false,
        ..BufCacheConfig::default()
    };
    let cache = BufCache::new(d, vm, cfg).unwrap();
    let mut want = Vec::new();
    for i in 0..40u64 {
        let at = (3 * i + 1) * F + 1024 * (i % 7);
        let bytes = vec![i as u8 + 1; 2048];
        let mut b = cache.getblk(at, bytes.len()).unwrap();
        b.data_mut().copy_from_slice(&bytes);
        b.bdwrite().unwrap();
        want.push((at, bytes));
    }
    for i in 0..8u64 {
        let at = (200 + i) * F;
        let bytes = vec![0x80 + i as u8; F as usize];
        let mut b = cache.getblk(at, bytes.len()).unwrap();
        b.data_mut().copy_from_slice(&bytes);
        b.bdwrite().unwrap();
        want.push((at, bytes));
    }
    dev.calls.lock().unwrap().clear();
    cache.flush().unwrap();
    assert_eq!(*dev.calls.lock().unwrap(), vec![41]);
    for (at, bytes) in want {
        let mut got = vec![0u8; bytes.len()];
        dev.mem.read_at(&mut got, at).unwrap();
        assert!(got == bytes, "not on the device at {at:#x}");
    }
}

/// `write_through_many` puts pieces laid end to end on the device at
/// once, every buffer they cover in one device write when they are
/// neighbours, and leaves the cache clean; what reads back is theirs.
#[test]
fn write_through_many_writes_neighbours_at_once() {
    let mem = Arc::new(MemDevice::new(64 * MIB));
    let vm = Vm::new(VmConfig::new(16 * MIB)).unwrap();
    let dev = bufcache::CachedDevice::new(
        BufCache::new(mem.clone(), vm, BufCacheConfig::default()).unwrap(),
    );
    let data: Vec<u8> = (0..3 * F as usize + 8000)
        .map(|i| (i * 13 % 251) as u8)
        .collect();
    // Pieces of odd sizes over five buffers, the first and last in part.
    let cuts = [0, 5000, 5000 + F as usize, 2 * F as usize + 77, data.len()];
    let pieces: Vec<&[u8]> = cuts.windows(2).map(|w| &data[w[0]..w[1]]).collect();
    let at = 2 * F - 5000;
    let before = dev.cache().stats().device_writes;
    dev.write_through_many(&[(at, pieces)]).unwrap();
    assert_eq!(
        dev.cache().stats().device_writes - before,
        1,
        "neighbouring buffers written apart"
    );
    let mut on_dev = vec![0u8; data.len()];
    mem.read_at(&mut on_dev, at).unwrap();
    assert!(on_dev == data, "not on the device after write_through_many");
    assert_eq!(dev.cache().stats().dirty_buffers, 0);
    let mut back = vec![0u8; data.len()];
    assert!(dev.read_cached(&mut back, at).unwrap());
    assert!(back == data);
    // Two runs with a buffer between them: one write each.
    let before = dev.cache().stats().device_writes;
    let (a, b) = (vec![1u8; F as usize], vec![2u8; F as usize]);
    dev.write_through_many(&[(20 * F, vec![&a[..]]), (22 * F, vec![&b[..], &a[..]])])
        .unwrap();
    assert_eq!(dev.cache().stats().device_writes - before, 2);
    let mut got = vec![0u8; 4 * F as usize];
    mem.read_at(&mut got, 20 * F).unwrap();
    let want = [a.clone(), vec![0u8; F as usize], b, a].concat();
    assert!(got == want);
}

/// `write_through_many` of one piece across two buffers puts the bytes
/// on the device at once and leaves the cache clean (a barrier after it
/// writes nothing), and they read back from the cache.
#[test]
fn write_through_writes_now_and_leaves_nothing_dirty() {
    let mem = Arc::new(MemDevice::new(64 * MIB));
    let vm = Vm::new(VmConfig::new(16 * MIB)).unwrap();
    let dev = bufcache::CachedDevice::new(
        BufCache::new(mem.clone(), vm, BufCacheConfig::default()).unwrap(),
    );
    let data: Vec<u8> = (0..F as usize + 8192)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let at = 3 * F - 4096; // across two frames
    dev.write_through_many(&[(at, vec![&data[..]])]).unwrap();
    let mut on_dev = vec![0u8; data.len()];
    mem.read_at(&mut on_dev, at).unwrap();
    assert_eq!(on_dev, data, "not on the device after write_through_many");
    assert_eq!(dev.cache().stats().dirty_buffers, 0);
    let before = dev.cache().stats().device_writes;
    dev.barrier().unwrap();
    assert_eq!(
        dev.cache().stats().device_writes,
        before,
        "the barrier wrote"
    );
    let mut back = vec![0u8; data.len()];
    assert!(dev.read_cached(&mut back, at).unwrap());
    assert_eq!(back, data);
    // A delayed write is on the device by the barrier.
    dev.write_at(&[9u8; 4096], 10 * F).unwrap();
    dev.barrier().unwrap();
    let mut b = vec![0u8; 4096];
    mem.read_at(&mut b, 10 * F).unwrap();
    assert_eq!(b, vec![9u8; 4096]);
}
