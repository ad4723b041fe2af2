//! Soaks through a real read-write mount with its default options:
//!
//! - `full_volume_soak`: the volume filled first, a filler writes files
//!   until ENOSPC and deletes half of them, again and again, while a
//!   churner changes metadata
//!   (utime, chmod, rename, link, mkdir, rmdir, fsync) and a writer
//!   overwrites a file in 4 KiB pieces with fsync, on a volume that is
//!   full most of the time. ENOSPC is the only error allowed: never EIO,
//!   never a wedged mount. At the end every file written and fsynced
//!   reads back, the volume empties and takes a large file again, and
//!   fsck is clean after the unmount.
//! - `overwrite_soak_at_80_percent`: with 80% of the volume live data, a
//!   database-like 4 KiB random write and fsync loop, whole-file
//!   rewrites and deletions: never ENOSPC (space freed at flush time and
//!   by the automatic bulkfree comes back).
//!
//! Each runs for `H2_SOAK_SECONDS` (default 30; the README's figures
//! are from 600). These tests need root and /dev/fuse.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn soak_time() -> Duration {
    run_seconds("H2_SOAK_SECONDS", 30)
}

/// What the soak threads share: the stop flag, the errors no thread may
/// see, and counts for the report.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    bad: Mutex<Vec<String>>,
    enospc: AtomicU64,
    ops: AtomicU64,
}

impl Shared {
    /// Record `e` unless it is ENOSPC (and `enospc_ok`); true for ENOSPC.
    fn check(&self, what: &str, e: std::io::Error, enospc_ok: bool) -> bool {
        if e.raw_os_error() == Some(libc::ENOSPC) && enospc_ok {
            self.enospc.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.bad.lock().unwrap().push(format!("{what}: {e}"));
        self.stop.store(true, Ordering::Relaxed);
        false
    }
}

/// Write `len` bytes of noise(seed) to `path` and fsync it.
fn write_whole(path: &Path, seed: u64, len: u64) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    let mut done = 0;
    while done < len {
        let n = (len - done).min(MIB);
        f.write_all(&noise(seed ^ done, n as usize))?;
        done += n;
    }
    f.sync_all()
}

fn read_matches(path: &Path, seed: u64, len: u64) -> Result<(), String> {
    let got = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if got.len() as u64 != len {
        return Err(format!(
            "{}: {} bytes, not {len}",
            path.display(),
            got.len()
        ));
    }
    let mut done = 0;
    while done < len {
        let n = (len - done).min(MIB);
        if got[done as usize..(done + n) as usize] != noise(seed ^ done, n as usize)[..] {
            return Err(format!("{}: differs at {done}", path.display()));
        }
        done += n;
    }
    Ok(())
}

/// Files written and fsynced, by path: (seed, length).
type Written = Arc<Mutex<BTreeMap<PathBuf, (u64, u64)>>>;

fn filler(dir: PathBuf, sh: Arc<Shared>, written: Written, seed: u64) {
    let mut rng = Rng(seed | 1);
    let mut n = 0u64;
    while !sh.stop.load(Ordering::Relaxed) {
        n += 1;
        let path = dir.join(format!("f{n}"));
        let len = 64 * 1024 + rng.below(8 * MIB);
        let fseed = rng.next();
        match write_whole(&path, fseed, len) {
            Ok(()) => {
                written.lock().unwrap().insert(path, (fseed, len));
            }
            Err(e) => {
                if !sh.check("fill write", e, true) {
                    return;
                }
                // Full: drop the partial file (none when the create
                // itself met ENOSPC) and half of the others.
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        sh.check("remove partial", e, false);
                        return;
                    }
                    _ => {}
                }
                let victims: Vec<PathBuf> = {
                    let w = written.lock().unwrap();
                    w.keys().filter(|p| p.starts_with(&dir)).cloned().collect()
                };
                for p in victims.into_iter().filter(|_| rng.below(2) == 0) {
                    written.lock().unwrap().remove(&p);
                    if let Err(e) = fs::remove_file(&p) {
                        sh.check("remove", e, false);
                        return;
                    }
                }
            }
        }
        sh.ops.fetch_add(1, Ordering::Relaxed);
    }
}

fn churner(dir: PathBuf, sh: Arc<Shared>, seed: u64) {
    let mut rng = Rng(seed | 1);
    let names: Vec<PathBuf> = (0..40).map(|i| dir.join(format!("m{i}"))).collect();
    let mut i = 0u64;
    while !sh.stop.load(Ordering::Relaxed) {
        i += 1;
        let a = &names[rng.below(names.len() as u64) as usize];
        let b = &names[rng.below(names.len() as u64) as usize];
        let r = match rng.below(8) {
            0 => File::create(a).and_then(|mut f| f.write_all(&noise(i, rng.below(3000) as usize))),
            1 => fs::set_permissions(
                a,
                fs::Permissions::from_mode(0o600 | rng.below(0o100) as u32),
            ),
            2 => fs::rename(a, b),
            3 => fs::hard_link(a, b),
            4 => fs::remove_file(a),
            5 => fs::create_dir(a),
            6 => fs::remove_dir(a),
            _ => {
                let t = nix::sys::time::TimeSpec::new(1_700_000_000 + rng.below(1 << 20) as i64, 0);
                nix::sys::stat::utimensat(
                    nix::fcntl::AT_FDCWD,
                    a,
                    &t,
                    &t,
                    nix::sys::stat::UtimensatFlags::NoFollowSymlink,
                )
                .map_err(std::io::Error::from)
            }
        };
        if let Err(e) = r {
            // The namespace races with itself: these are answers, not
            // failures.
            let expected = [
                libc::ENOENT,
                libc::EEXIST,
                libc::ENOTDIR,
                libc::EISDIR,
                libc::ENOTEMPTY,
                libc::EPERM,
            ];
            if !e.raw_os_error().is_some_and(|c| expected.contains(&c))
                && !sh.check("metadata", e, true)
            {
                return;
            }
        }
        if i.is_multiple_of(16) {
            if let Err(e) = File::open(&dir).and_then(|d| d.sync_all()) {
                if !sh.check("fsync dir", e, true) {
                    return;
                }
            }
        }
        sh.ops.fetch_add(1, Ordering::Relaxed);
    }
}

/// 4 KiB random writes with fsync over `path` (`len` bytes); the model
/// of what it holds is kept for the final check.
fn overwriter(
    path: PathBuf,
    len: u64,
    sh: Arc<Shared>,
    model: Arc<Mutex<Vec<u8>>>,
    enospc_ok: bool,
) {
    let f = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) => {
            sh.check("open", e, false);
            return;
        }
    };
    let mut rng = Rng(0xfeed);
    let mut i = 0u64;
    while !sh.stop.load(Ordering::Relaxed) {
        i += 1;
        let at = rng.below(len / 4096) * 4096;
        let buf = noise(i ^ 0xabc, 4096);
        match f.write_all_at(&buf, at).and_then(|_| f.sync_data()) {
            Ok(()) => {
                model.lock().unwrap()[at as usize..at as usize + 4096].copy_from_slice(&buf);
            }
            Err(e) => {
                if !sh.check("4 KiB write + fsync", e, enospc_ok) {
                    return;
                }
                // What failed may or may not be there: read it back
                // into the model.
                let mut back = vec![0u8; 4096];
                if let Err(e) = f.read_exact_at(&mut back, at) {
                    sh.check("read back", e, false);
                    return;
                }
                model.lock().unwrap()[at as usize..at as usize + 4096].copy_from_slice(&back);
            }
        }
        sh.ops.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn full_volume_soak() {
    require_fuse();
    let img = new_volume("soak-full", 1);
    let mnt = scratch("soak-full-mnt");
    let m = Rw::new(&img, &mnt, "rw");
    let sh = Arc::new(Shared::default());
    let written: Written = Arc::default();
    for d in ["fill", "meta"] {
        fs::create_dir(mnt.join(d)).unwrap();
    }
    let db_len = 16 * MIB;
    write_whole(&mnt.join("db"), 77, db_len).unwrap();
    let model = Arc::new(Mutex::new(fs::read(mnt.join("db")).unwrap()));
    // Fill the volume first (whatever the machine's speed, the soak
    // then starts full): 16 MiB files until ENOSPC, the last one gone.
    for n in 0.. {
        let path = mnt.join("fill").join(format!("pre{n}"));
        match write_whole(&path, 1000 + n, 16 * MIB) {
            Ok(()) => {
                written.lock().unwrap().insert(path, (1000 + n, 16 * MIB));
            }
            Err(e) => {
                assert!(sh.check("prefill", e, true), "prefill");
                fs::remove_file(&path).unwrap();
                break;
            }
        }
    }
    let mut threads = Vec::new();
    {
        let (sh, w, d) = (sh.clone(), written.clone(), mnt.join("fill"));
        threads.push(std::thread::spawn(move || filler(d, sh, w, 1)));
    }
    {
        let (sh, d) = (sh.clone(), mnt.join("meta"));
        threads.push(std::thread::spawn(move || churner(d, sh, 2)));
    }
    {
        let (sh, p, md) = (sh.clone(), mnt.join("db"), model.clone());
        threads.push(std::thread::spawn(move || {
            overwriter(p, db_len, sh, md, true)
        }));
    }
    let start = Instant::now();
    while start.elapsed() < soak_time() && !sh.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
    }
    sh.stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("soak thread");
    }
    let bad = sh.bad.lock().unwrap().clone();
    assert!(
        bad.is_empty(),
        "errors other than ENOSPC: {bad:#?}\n{}",
        m.log()
    );
    let enospc = sh.enospc.load(Ordering::Relaxed);
    eprintln!(
        "full-volume soak: {} operations, {enospc} ENOSPC, {} files live",
        sh.ops.load(Ordering::Relaxed),
        written.lock().unwrap().len()
    );
    for (p, (seed, len)) in written.lock().unwrap().iter() {
        read_matches(p, *seed, *len).unwrap();
    }
    assert_eq!(
        *model.lock().unwrap(),
        fs::read(mnt.join("db")).unwrap(),
        "db"
    );
    // Emptied, the volume takes a large file again.
    fs::remove_dir_all(mnt.join("fill")).unwrap();
    write_whole(&mnt.join("big"), 5, 600 * MIB).expect("a large file after emptying");
    read_matches(&mnt.join("big"), 5, 600 * MIB).unwrap();
    m.unmount();
    fsck_clean(&img);
}

#[test]
fn overwrite_soak_at_80_percent() {
    require_fuse();
    let img = new_volume("soak-80", 2);
    let mnt = scratch("soak-80-mnt");
    let m = Rw::new(&img, &mnt, "rw");
    let (total, _) = {
        let s = nix::sys::statvfs::statvfs(&mnt).unwrap();
        let bs = s.fragment_size() as u64;
        (s.blocks() as u64 * bs, ())
    };
    // 80% live: a 256 MiB database file and 16 MiB files for the rest.
    let db_len = 256 * MIB;
    write_whole(&mnt.join("db"), 99, db_len).unwrap();
    let file_len = 16 * MIB;
    let nfiles = (total * 8 / 10 - db_len) / file_len;
    let mut files: Vec<u64> = Vec::new();
    for i in 0..nfiles {
        write_whole(&mnt.join(format!("f{i}")), i, file_len)
            .unwrap_or_else(|e| panic!("setting up file {i} of {nfiles}: {e}"));
        files.push(i);
    }
    let model = Arc::new(Mutex::new(fs::read(mnt.join("db")).unwrap()));
    let sh = Arc::new(Shared::default());
    let writer = {
        let (sh, p, md) = (sh.clone(), mnt.join("db"), model.clone());
        std::thread::spawn(move || overwriter(p, db_len, sh, md, false))
    };
    // Rewrites and deletions with recreation, keeping the live size.
    let mut rng = Rng(7);
    let mut seeds: BTreeMap<u64, u64> = files.iter().map(|&i| (i, i)).collect();
    let start = Instant::now();
    let mut rewrites = 0;
    while start.elapsed() < soak_time() && !sh.stop.load(Ordering::Relaxed) {
        let i = rng.below(nfiles);
        let p = mnt.join(format!("f{i}"));
        let seed = rng.next();
        let r = if rng.below(2) == 0 {
            write_whole(&p, seed, file_len)
        } else {
            fs::remove_file(&p).and_then(|_| write_whole(&p, seed, file_len))
        };
        if let Err(e) = r {
            sh.check(&format!("rewrite f{i}"), e, false);
            break;
        }
        seeds.insert(i, seed);
        rewrites += 1;
    }
    sh.stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    let bad = sh.bad.lock().unwrap().clone();
    assert!(bad.is_empty(), "{bad:#?}\n{}", m.log());
    eprintln!(
        "80% soak: {} 4 KiB writes with fsync, {rewrites} 16 MiB rewrites, {} files live",
        sh.ops.load(Ordering::Relaxed),
        nfiles
    );
    for (i, seed) in &seeds {
        read_matches(&mnt.join(format!("f{i}")), *seed, file_len).unwrap();
    }
    assert_eq!(
        *model.lock().unwrap(),
        fs::read(mnt.join("db")).unwrap(),
        "db"
    );
    m.unmount();
    fsck_clean(&img);
}
