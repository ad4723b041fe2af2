//! The snapshot and dedup bench: snapshot time on a small and on a large
//! filesystem (median and p99 over several snapshots, and the ratio
//! large/small), and the space a 100 MiB file copy costs with live
//! dedup, read from the freemap (statfs) before and after. Images are
//! sparse files (default under /tmp) opened as mount.hammer2 opens them
//! (`FileDevice`, whose barrier is fdatasync), through the library.
//!
//! `cargo bench -p tests --bench snapshot` (release build). Settings by
//! environment: `H2_BENCH_DIR` (where the images go), `H2_BENCH_FILES`
//! and `H2_BENCH_GIB` (the large filesystem; default 100000 files and
//! 10 GiB written), `H2_BENCH_SNAPS` (snapshots per filesystem, default
//! 25), `H2_BENCH_KEEP=1` keeps the images.

use bufcache::{BlockDevice, FileDevice};
use hammer2::mount::{Mount, ROOT_INUM};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PFS: &str = "DATA";
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
use tests::T0;
/// Every image has the same size, so only what it holds differs.
const IMAGE_BYTES: u64 = 64 * GIB;
/// Flush when this much file data waits, as the mount daemon does.
const FLUSH_AT: u64 = 256 * MIB;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Incompressible, never repeating bytes (xorshift64*), so neither
/// compression nor dedup shrinks what is written.
struct Noise(u64);

impl Noise {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The image file, with the time spent in barriers (fdatasync) counted,
/// so the bench can tell the device's share from the library's.
struct Timed {
    dev: FileDevice,
    barrier_ns: AtomicU64,
}

impl BlockDevice for Timed {
    fn size_bytes(&self) -> u64 {
        self.dev.size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.dev.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.dev.write_at(buf, offset)
    }
    fn barrier(&self) -> std::io::Result<()> {
        let t = Instant::now();
        let r = self.dev.barrier();
        self.barrier_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }
}

fn new_image(path: &Path) -> (Mount, Arc<Timed>) {
    let _ = std::fs::remove_file(path);
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(IMAGE_BYTES).expect("size image");
    drop(f);
    let dev = FileDevice::open(path, true).expect("open image");
    mkfs::newfs::newfs(
        &dev,
        &mkfs::newfs::NewfsOptions {
            now_us: Some(T0),
            ..Default::default()
        },
    )
    .expect("newfs");
    let timed = Arc::new(Timed {
        dev,
        barrier_ns: AtomicU64::new(0),
    });
    let dev: Arc<dyn BlockDevice> = timed.clone();
    (Mount::open(dev).expect("mount"), timed)
}

fn create(m: &mut Mount, dir: u64, name: &str) -> u64 {
    tests::create_file(m, PFS, dir, name.as_bytes()).expect("create")
}

/// `files` files in directories of 1000, `bytes` written in all.
fn populate(m: &mut Mount, files: u64, bytes: u64, noise: &mut Noise) {
    let per_file = bytes / files.max(1);
    let mut buf = vec![0u8; per_file.min(4 * MIB) as usize];
    let t = Instant::now();
    let mut dir = ROOT_INUM;
    let mut written = 0u64;
    for i in 0..files {
        if i % 1000 == 0 {
            dir = m
                .mkdir(
                    PFS,
                    ROOT_INUM,
                    format!("d{}", i / 1000).as_bytes(),
                    0o755,
                    0,
                    0,
                    T0,
                )
                .expect("mkdir");
        }
        let inum = create(m, dir, &format!("f{i}"));
        let mut off = 0;
        while off < per_file {
            let n = (per_file - off).min(buf.len() as u64) as usize;
            noise.fill(&mut buf[..n]);
            m.write(PFS, inum, off, &buf[..n], T0).expect("write");
            off += n as u64;
        }
        written += per_file;
        if m.dirty_bytes() >= FLUSH_AT {
            m.flush().expect("flush");
            m.release_clean();
        }
        if (i + 1) % 10_000 == 0 {
            eprintln!(
                "  {} files, {:.2} GiB in {:.0?}",
                i + 1,
                written as f64 / GIB as f64,
                t.elapsed()
            );
        }
    }
    m.flush().expect("flush");
    m.release_clean();
}

/// Median and p99 (nearest rank) of `d`.
fn stats(d: &mut [Duration]) -> (Duration, Duration) {
    d.sort();
    let rank = |p: f64| d[((p * d.len() as f64).ceil() as usize).clamp(1, d.len()) - 1];
    (rank(0.5), rank(0.99))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `n` snapshots of DATA, each timed alone: the whole call, and the
/// same less the time its barriers (fdatasync) took.
fn snapshots(m: &mut Mount, dev: &Timed, n: u64, tag: &str) -> (Vec<Duration>, Vec<Duration>) {
    (0..n)
        .map(|i| {
            let b0 = dev.barrier_ns.load(Ordering::Relaxed);
            let t = Instant::now();
            m.snapshot(PFS, &format!("{tag}.{i}"), T0 + i)
                .expect("snapshot");
            let all = t.elapsed();
            let sync = Duration::from_nanos(dev.barrier_ns.load(Ordering::Relaxed) - b0);
            (all, all.saturating_sub(sync))
        })
        .unzip()
}

/// Print one filesystem's snapshot figures; returns the medians and p99s
/// (whole, without barriers).
fn report(what: &str, n: u64, mut all: Vec<Duration>, mut cpu: Vec<Duration>) -> [Duration; 4] {
    let (a50, a99) = stats(&mut all);
    let (c50, c99) = stats(&mut cpu);
    println!(
        "{what}: snapshot median {:.3} ms, p99 {:.3} ms; without fdatasync: median {:.3} ms, p99 {:.3} ms ({n} snapshots)",
        ms(a50),
        ms(a99),
        ms(c50),
        ms(c99)
    );
    [a50, a99, c50, c99]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = std::env::var("H2_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            std::env::temp_dir().join(format!("hammer2-bench-{}", std::process::id()))
        });
    std::fs::create_dir_all(&dir).expect("bench dir");
    let files = env_u64("H2_BENCH_FILES", 100_000);
    let gib = env_u64("H2_BENCH_GIB", 10);
    let n = env_u64("H2_BENCH_SNAPS", 25);
    let mut noise = Noise(0x9E37_79B9_7F4A_7C15);

    println!(
        "snapshot bench: images of {} GiB (sparse) in {}",
        IMAGE_BYTES / GIB,
        dir.display()
    );
    let small_path = dir.join("small.img");
    let (mut small, sdev) = new_image(&small_path);
    populate(&mut small, 100, 10 * MIB, &mut noise);
    let (a, c) = snapshots(&mut small, &sdev, n, "small");
    let sm = report("small (100 files, 10 MiB written)", n, a, c);
    drop(small);

    let large_path = dir.join("large.img");
    let (mut large, ldev) = new_image(&large_path);
    eprintln!("writing {files} files, {gib} GiB");
    let t = Instant::now();
    populate(&mut large, files, gib * GIB, &mut noise);
    let fill = t.elapsed();
    println!(
        "large: {files} files, {gib} GiB written in {:.1} s ({:.0} MiB/s)",
        fill.as_secs_f64(),
        (gib * GIB) as f64 / MIB as f64 / fill.as_secs_f64()
    );
    let (a, c) = snapshots(&mut large, &ldev, n, "large");
    let lg = report("large", n, a, c);
    let r = |i: usize| ms(lg[i]) / ms(sm[i]);
    println!(
        "snapshot large/small: median {:.2}x, p99 {:.2}x; without fdatasync: median {:.2}x, p99 {:.2}x",
        r(0),
        r(1),
        r(2),
        r(3)
    );

    // A 100 MiB file, then its copy as cp makes it (read, write).
    let orig = create(&mut large, ROOT_INUM, "copy-src");
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..100 {
        noise.fill(&mut buf);
        large.write(PFS, orig, i * MIB, &buf, T0).expect("write");
    }
    large.flush().expect("flush");
    let before = large.statfs(PFS).expect("statfs").bytes_free;
    let copy = create(&mut large, ROOT_INUM, "copy-dst");
    let t = Instant::now();
    for i in 0..100 {
        let chunk = large.read(PFS, orig, i * MIB, MIB as usize).expect("read");
        large.write(PFS, copy, i * MIB, &chunk, T0).expect("write");
    }
    large.flush().expect("flush");
    let took = t.elapsed();
    let after = large.statfs(PFS).expect("statfs").bytes_free;
    let cost = before.saturating_sub(after);
    println!(
        "100 MiB copy: {cost} bytes of new space ({:.3}% of the file), {:.0} ms",
        cost as f64 * 100.0 / (100 * MIB) as f64,
        ms(took)
    );
    drop(large);
    if std::env::var("H2_BENCH_KEEP").is_err() {
        let _ = std::fs::remove_file(&small_path);
        let _ = std::fs::remove_file(&large_path);
        let _ = std::fs::remove_dir(&dir);
    }
}
