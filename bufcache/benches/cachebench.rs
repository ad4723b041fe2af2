//! cachebench: the buffer cache against `Mutex<lru::LruCache>` and
//! `quick_cache::sync::Cache`, run in the same process on the same traces,
//! printed as ratios. Run with
//! `cargo bench -p bufcache --bench cachebench` (release profile).
//!
//! 1. Hit lookups per second, 1 and 2 threads, on a resident Zipf(0.99)
//!    set of 65,536 buffers. Every cache returns a refcounted handle: a
//!    held page for ours, an `Arc` clone for the baselines.
//! 2. The share of those hits served by the lockless page hash.
//! 3. Hot-set hit ratio (Zipf accesses only) on Zipf plus periodic
//!    sequential scans of 10% of capacity, every cache at the same
//!    capacity in buffers.
//! 4. Peak resident memory against the budget under a mixed load (readers,
//!    writers, a sequential scanner) on a file device.
//! 5. Pageout run time from low water to target (p50, p99, max) over the
//!    runs of 3 and 4.
//!
//! Figures vary run to run by a few percent; the machine is shared.
//! Arguments pick sections (`lookups`, `hits`, `memory`); environment:
//! `CB_PERIOD` overrides the scan period of 3, `CB_DEBUG` prints the page
//! layer's queue sizes after it.

use bufcache::{BlockDevice, BufCache, BufCacheConfig, FileDevice, MemDevice, Vm, VmConfig};
use lru::LruCache;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use std::hint::black_box;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const F: u64 = bufcache::FRAME_BYTES as u64;
const MIB: u64 = 1 << 20;

fn zipf_trace(n: u64, len: usize, seed: u64) -> Vec<u64> {
    let z = Zipf::new(n, 0.99).expect("valid Zipf parameters");
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..len).map(|_| z.sample(&mut rng) as u64 - 1).collect()
}

/// Spread Zipf ranks over the key space so hot keys are not neighbours:
/// multiplication by a prime that does not divide `n` (here: any `n`
/// below the prime) permutes `0..n`.
fn scatter(rank: u64, n: u64) -> u64 {
    const P: u64 = 1_000_003;
    (rank % n) * P % n
}

/// Operations per second by two clocks.
#[derive(Clone, Copy, Default)]
struct Rate {
    /// Over wall time.
    wall: f64,
    /// Over the threads' own CPU time (mean per thread): not inflated when
    /// other processes preempt the bench on a shared machine.
    cpu: f64,
}

impl Rate {
    fn max(self, o: Rate) -> Rate {
        Rate {
            wall: self.wall.max(o.wall),
            cpu: self.cpu.max(o.cpu),
        }
    }
}

/// Run `f(thread, i)` for `per_thread` iterations on each of `threads`
/// threads.
fn rate<Fn_: Fn(usize, usize) + Sync>(threads: usize, per_thread: usize, f: Fn_) -> Rate {
    let start = Instant::now();
    let cpu: Vec<Duration> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                s.spawn(move || {
                    let c0 = vmglue::thread_cpu_time();
                    for i in 0..per_thread {
                        f(t, i);
                    }
                    vmglue::thread_cpu_time().saturating_sub(c0)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("bench thread"))
            .collect()
    });
    let ops = (threads * per_thread) as f64;
    let cpu_mean = cpu.iter().map(Duration::as_secs_f64).sum::<f64>() / threads as f64;
    Rate {
        wall: ops / start.elapsed().as_secs_f64(),
        cpu: ops / cpu_mean.max(1e-9),
    }
}

struct LookupResult {
    ours: [Rate; 2],
    lru: [Rate; 2],
    quick: [Rate; 2],
    lockless_share: f64,
}

fn bench_lookups() -> LookupResult {
    const N: u64 = 65_536;
    const PER_THREAD: usize = 4_000_000;
    let trace = zipf_trace(N, 1 << 20, 1);
    let mask = trace.len() - 1;
    // Budget: the resident set plus headroom, so no pageout runs. Frames
    // are never touched (getblk of whole buffers reads nothing), so this
    // reserves address space, not memory.
    let budget = (N + 8192) * F;
    let vm = Vm::new(VmConfig::new(budget)).expect("vm");
    let dev = Arc::new(MemDevice::new(N * F));
    let cache = BufCache::new(dev, vm, BufCacheConfig::default()).expect("cache");
    for k in 0..N {
        cache.getblk(k * F, F as usize).expect("getblk").bqrelse();
    }
    let lru = Mutex::new(LruCache::new(
        NonZeroUsize::new(N as usize).expect("nonzero"),
    ));
    let quick = quick_cache::sync::Cache::new(N as usize);
    for k in 0..N {
        lru.lock().expect("lru").put(k, Arc::new(k));
        quick.insert(k, Arc::new(k));
    }
    let mut res = LookupResult {
        ours: [Rate::default(); 2],
        lru: [Rate::default(); 2],
        quick: [Rate::default(); 2],
        lockless_share: 0.0,
    };
    cache.vm().reset_lookup_stats();
    let misses = AtomicU64::new(0);
    let mut ours_lookups = 0u64;
    // Rounds interleave the three caches so background load on the
    // machine hits them alike; each figure is the best of its rounds.
    for (ti, threads) in [1usize, 2].into_iter().enumerate() {
        let start_of = |t: usize| t * 7919;
        for _round in 0..5 {
            ours_lookups += (threads * PER_THREAD) as u64;
            let ours = rate(threads, PER_THREAD, |t, i| {
                let k = trace[(start_of(t) + i) & mask];
                match cache.lookup(k * F) {
                    Some(r) => {
                        black_box(&r);
                    }
                    None => {
                        misses.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            if std::env::var_os("CB_OURS_ONLY").is_some() {
                res.ours[ti] = res.ours[ti].max(ours);
                continue;
            }
            let l = rate(threads, PER_THREAD, |t, i| {
                let k = trace[(start_of(t) + i) & mask];
                let v = lru.lock().expect("lru").get(&k).cloned();
                black_box(v);
            });
            let q = rate(threads, PER_THREAD, |t, i| {
                let k = trace[(start_of(t) + i) & mask];
                black_box(quick.get(&k));
            });
            res.ours[ti] = res.ours[ti].max(ours);
            res.lru[ti] = res.lru[ti].max(l);
            res.quick[ti] = res.quick[ti].max(q);
        }
    }
    let st = cache.vm().stats().lookups;
    // Every lookup above was a hit on a resident buffer; only those that
    // fell back to the locked index are counted.
    let hits = ours_lookups - misses.load(Ordering::Relaxed);
    res.lockless_share = (hits - st.slow.min(hits)) as f64 / hits as f64;
    let m = misses.load(Ordering::Relaxed);
    if m > 0 {
        println!("  (warning: {m} lookups of resident buffers missed)");
    }
    res
}

struct HitRatio {
    ours: f64,
    lru: f64,
    quick: f64,
}

/// The access trace: Zipf keys over `universe`, and every `period` Zipf
/// accesses a sequential scan of `scan` never-reused keys.
enum Access {
    Hot(u64),
    Scan(u64),
}

fn mixed_trace(universe: u64, hot: usize, period: usize, scan: u64) -> Vec<Access> {
    let z = zipf_trace(universe, hot, 2);
    let mut out = Vec::with_capacity(hot + hot / period * scan as usize);
    let mut next_scan = universe;
    for (i, r) in z.into_iter().enumerate() {
        if i % period == 0 {
            for k in 0..scan {
                out.push(Access::Scan(next_scan + k));
            }
            next_scan += scan;
        }
        out.push(Access::Hot(scatter(r, universe)));
    }
    out
}

fn bench_hit_ratio(capacity: u64) -> HitRatio {
    // Six times the capacity in keys, a scan every capacity/4 Zipf
    // accesses: LRU lands near 0.68, a cache holding exactly the hottest
    // keys at 0.82.
    let universe = 6 * capacity;
    let scan = capacity / 10;
    let hot = 1_000_000usize;
    let period: usize = std::env::var("CB_PERIOD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or((capacity / 4) as usize);
    let trace = mixed_trace(universe, hot, period, scan);
    let warm = trace.len() / 5;
    let scans = trace
        .iter()
        .filter(|a| matches!(a, Access::Scan(_)))
        .count() as u64;

    let count = |hits: &mut u64, total: &mut u64, i: usize, a: &Access, hit: bool| {
        if i >= warm && matches!(a, Access::Hot(_)) {
            *total += 1;
            if hit {
                *hits += 1;
            }
        }
    };

    // LRU baseline.
    let mut lru = LruCache::new(NonZeroUsize::new(capacity as usize).expect("nonzero"));
    let (mut hits, mut total) = (0u64, 0u64);
    for (i, a) in trace.iter().enumerate() {
        let k = match a {
            Access::Hot(k) | Access::Scan(k) => *k,
        };
        let hit = lru.get(&k).is_some();
        if !hit {
            lru.put(k, ());
        }
        count(&mut hits, &mut total, i, a, hit);
    }
    let lru_ratio = hits as f64 / total as f64;

    // quick_cache baseline.
    let q = quick_cache::sync::Cache::new(capacity as usize);
    let (mut hits, mut total) = (0u64, 0u64);
    for (i, a) in trace.iter().enumerate() {
        let k = match a {
            Access::Hot(k) | Access::Scan(k) => *k,
        };
        let hit = q.get(&k).is_some();
        if !hit {
            q.insert(k, ());
        }
        count(&mut hits, &mut total, i, a, hit);
    }
    let quick_ratio = hits as f64 / total as f64;

    // Ours: the buffer cache with its pageout daemon, reading 1 KiB of
    // each buffer (a miss reads the whole buffer from the device).
    let budget = capacity * F;
    let vm = Vm::new(VmConfig::new(budget)).expect("vm");
    let daemon = vm.start_pageout().expect("pageout");
    let dev = Arc::new(MemDevice::new((universe + scans + 64) * F));
    let cache = BufCache::new(dev, vm, BufCacheConfig::default()).expect("cache");
    let (mut hits, mut total) = (0u64, 0u64);
    for (i, a) in trace.iter().enumerate() {
        let k = match a {
            Access::Hot(k) | Access::Scan(k) => *k,
        };
        // A hit is a bread that read nothing (a second lookup to test
        // residency would count as a second reference).
        let misses = cache.stats().misses;
        let b = cache.bread(k * F, 1024).expect("bread");
        black_box(b.data()[0]);
        drop(b);
        let hit = cache.stats().misses == misses;
        count(&mut hits, &mut total, i, a, hit);
    }
    if std::env::var_os("CB_DEBUG").is_some() {
        println!("   vm: {:?}", cache.vm().stats());
        println!("   cache: {:?}", cache.stats());
    }
    drop(cache);
    drop(daemon);
    HitRatio {
        ours: hits as f64 / total as f64,
        lru: lru_ratio,
        quick: quick_ratio,
    }
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

struct Memory {
    budget: u64,
    peak_over_base: u64,
    durations: Vec<(Duration, Duration)>,
}

/// Mixed load on a file device: two Zipf readers, a writer (16 KiB blocks,
/// delayed writes, periodic flush), a sequential scanner, for `secs`.
fn bench_memory(budget: u64, secs: u64) -> Memory {
    let dir = std::env::temp_dir().join(format!("cachebench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("dev.img");
    let dev_size = 4 * budget;
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(dev_size))
        .expect("device file");
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&path, true).expect("open"));
    let buffers = dev_size / F;
    let traces: Vec<Vec<u64>> = (0..2)
        .map(|t| zipf_trace(buffers, 1 << 18, 10 + t))
        .collect();
    let base = rss_bytes();
    let peak = AtomicU64::new(base);
    let stop = AtomicBool::new(false);
    let vm = Vm::new(VmConfig::new(budget)).expect("vm");
    let daemon = vm.start_pageout().expect("pageout");
    vm.reset_pageout_stats();
    let cache = BufCache::new(dev, vm, BufCacheConfig::default()).expect("cache");
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        for trace in &traces {
            let (cache, stop) = (&cache, &stop);
            s.spawn(move || {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let k = scatter(trace[i % trace.len()], buffers);
                    i += 1;
                    match cache.bread(k * F, 4096) {
                        Ok(b) => {
                            black_box(b.data()[0]);
                        }
                        Err(e) => panic!("bread: {e}"),
                    }
                }
            });
        }
        s.spawn(|| {
            let mut rng = SmallRng::seed_from_u64(5);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let off = rng.gen_range(0..dev_size / 16384) * 16384;
                let mut b = cache.getblk(off, 16384).expect("getblk");
                b.data_mut().fill(n as u8);
                b.bdwrite().expect("bdwrite");
                n += 1;
                if n & 2047 == 0 {
                    cache.flush().expect("flush");
                }
            }
        });
        s.spawn(|| {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                black_box(cache.bread((k % buffers) * F, 1024).expect("scan").data()[0]);
                k += 1;
            }
        });
        std::thread::sleep(Duration::from_secs(secs));
        stop.store(true, Ordering::Relaxed);
    });
    let durations = cache.vm().pageout_durations();
    drop(cache);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
    Memory {
        budget,
        peak_over_base: peak.load(Ordering::Relaxed).saturating_sub(base),
        durations,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    // `cargo bench` passes `--bench`; other arguments pick sections
    // (`lookups`, `hits`, `memory`); none runs all.
    let picked: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let run = |name: &str| picked.is_empty() || picked.iter().any(|p| p == name);
    println!("cachebench: buffer cache vs Mutex<lru::LruCache> and quick_cache::sync::Cache");
    println!();

    if run("lookups") {
        lookups_section();
    }
    if run("hits") {
        hits_section();
    }
    if run("memory") {
        memory_section();
    }
}

fn lookups_section() {
    let l = bench_lookups();
    println!("1. hit lookups/s, resident Zipf(0.99) set of 65,536 buffers (goal: >= 2x both)");
    println!("   (best of 5 interleaved rounds; by wall time and by the threads' own CPU time)");
    for (i, threads) in [1, 2].iter().enumerate() {
        for (clock, pick) in [("wall", 0), ("cpu ", 1)] {
            let get = |r: Rate| if pick == 0 { r.wall } else { r.cpu };
            let (o, lr, q) = (get(l.ours[i]), get(l.lru[i]), get(l.quick[i]));
            println!(
                "   {threads} thread(s) {clock}: ours {:>6.1} M/s | LRU {:>6.1} M/s ({:.2}x) | quick_cache {:>6.1} M/s ({:.2}x)",
                o / 1e6,
                lr / 1e6,
                o / lr,
                q / 1e6,
                o / q,
            );
        }
    }
    println!(
        "2. share of hits served lock-free: {:.4} (goal: >= 0.99)",
        l.lockless_share
    );
}

fn hits_section() {
    let capacity = 4096;
    let h = bench_hit_ratio(capacity);
    println!(
        "3. hot-set hit ratio, Zipf + 10%-capacity scans, capacity {capacity} buffers (goal: >= 0.78)"
    );
    println!(
        "   ours {:.3} | LRU {:.3} ({:.2}x) | quick_cache {:.3} ({:.2}x)",
        h.ours,
        h.lru,
        h.ours / h.lru,
        h.quick,
        h.ours / h.quick
    );
}

fn memory_section() {
    let m = bench_memory(256 * MIB, 4);
    println!("4. peak resident memory under mixed load (goal: within 5% of budget)");
    println!(
        "   budget {} MiB, peak RSS growth {:.1} MiB = {:.3} of budget",
        m.budget / MIB,
        m.peak_over_base as f64 / MIB as f64,
        m.peak_over_base as f64 / m.budget as f64
    );
    let mut wall: Vec<Duration> = m.durations.iter().map(|d| d.0).collect();
    let mut cpu: Vec<Duration> = m.durations.iter().map(|d| d.1).collect();
    wall.sort();
    cpu.sort();
    println!("5. pageout run time, low water to target (goal: p99 <= 5 ms)");
    for (what, d) in [("wall", &wall), ("CPU ", &cpu)] {
        println!(
            "   {what}: {} runs: p50 {:?} | p99 {:?} | max {:?}",
            d.len(),
            percentile(d, 0.5),
            percentile(d, 0.99),
            d.last().copied().unwrap_or_default()
        );
    }
}
