//! Stress of the concurrent engine through a real read-write mount on a
//! tight memory budget (`cache_size=8M`, flushes every second).
//!
//! Six threads create, write (from a byte to 128 KiB, aligned or not),
//! read, truncate, rename (within their directories and across a
//! directory all of them share), unlink and fsync files of their own,
//! each keeping a model of what its files hold; beside them one thread
//! takes snapshots, reads the newest back through `.snapshot` and
//! deletes the old ones, one runs bulkfree again and again, and one
//! calls sync(2). A watchdog fails the test when any thread makes no
//! progress for `STALL` (a deadlock, a wedged request): it records the
//! daemon's threads (their kernel stacks and wait channels) and kills
//! it, so every blocked request returns.
//!
//! - `threads_against_the_model`: after `H2_STRESS_SECONDS` (default
//!   45) every file and directory listing equals the model, the unmount
//!   is clean, fsck finds nothing, and after a remount the model holds
//!   again.
//! - `threads_then_a_crash`: the same load ends with kill -9 of the
//!   daemon; fsck finds nothing, and every file whose last change was
//!   followed by fsync of the file and of its directory reads back as
//!   the model says.
//!
//! These tests need root and /dev/fuse.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WORKERS: usize = 6;
/// No thread may go this long without finishing an operation.
const STALL: Duration = Duration::from_secs(60);
const MAX_FILES: usize = 16;
const MAX_SIZE: u64 = 1 << 20;
const OPTS: &str = "cache_size=8M,sync_interval=1,snapdir";

fn stress_time() -> Duration {
    run_seconds("H2_STRESS_SECONDS", 45)
}

/// What every thread shares: the stop flag, set once the daemon is
/// killed on purpose (errors after it are expected), failures, and the
/// time of each thread's last finished operation (ms since `start`).
struct Shared {
    start: Instant,
    stop: AtomicBool,
    crashing: AtomicBool,
    bad: Mutex<Vec<String>>,
    progress: Vec<AtomicU64>,
    names: Vec<&'static str>,
    ops: Vec<AtomicU64>,
    stall: Duration,
}

impl Shared {
    fn new(names: Vec<&'static str>, stall: Duration) -> Arc<Shared> {
        Arc::new(Shared {
            start: Instant::now(),
            stop: AtomicBool::new(false),
            crashing: AtomicBool::new(false),
            bad: Mutex::new(Vec::new()),
            progress: names.iter().map(|_| AtomicU64::new(0)).collect(),
            ops: names.iter().map(|_| AtomicU64::new(0)).collect(),
            names,
            stall,
        })
    }

    fn tick(&self, who: usize) {
        let now = self.start.elapsed().as_millis() as u64;
        self.progress[who].store(now, Ordering::Relaxed);
        self.ops[who].fetch_add(1, Ordering::Relaxed);
    }

    /// Record a failure (unless the daemon is being killed on purpose)
    /// and stop everyone.
    fn fail(&self, what: String) {
        if !self.crashing.load(Ordering::SeqCst) {
            self.bad.lock().unwrap().push(what);
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// One worker's files: path -> bytes, and the contents known durable
/// (fsync of the file, then of its directory, after its last change).
#[derive(Default)]
struct Model {
    files: BTreeMap<PathBuf, Vec<u8>>,
    durable: BTreeMap<PathBuf, Vec<u8>>,
}

/// The directories worker `t` uses: two of its own and the shared one.
fn dirs(mnt: &Path, t: usize) -> [PathBuf; 3] {
    [
        mnt.join(format!("w{t}")),
        mnt.join(format!("w{t}/sub")),
        mnt.join("shared"),
    ]
}

/// A file of worker `t` written and made durable (fsync of it, its
/// directory and the root) before the load, never changed afterwards,
/// so that the crash test always has durable data to find, however the
/// random operations left the other files (they drift towards few files,
/// most changed since their last fsync).
fn anchor(t: usize, mnt: &Path, rng: &mut Rng) -> std::io::Result<(PathBuf, Vec<u8>)> {
    let dir = mnt.join("anchors");
    fs::create_dir_all(&dir)?;
    let p = dir.join(format!("t{t}"));
    let data = noise(rng.next(), 100_000);
    fs::write(&p, &data)?;
    File::open(&p)?.sync_all()?;
    File::open(&dir)?.sync_all()?;
    File::open(mnt)?.sync_all()?;
    Ok((p, data))
}

fn worker(t: usize, mnt: PathBuf, sh: Arc<Shared>, model: Arc<Mutex<Model>>) {
    let mut rng = Rng(0x5157_0000 + t as u64 * 7919);
    let dirs = dirs(&mnt, t);
    let mut serial = 0u64;
    match anchor(t, &mnt, &mut rng) {
        Ok((p, data)) => {
            model.lock().unwrap().durable.insert(p, data);
        }
        Err(e) => {
            sh.fail(format!("worker {t}: anchor file: {e}"));
            return;
        }
    }
    while !sh.stopped() {
        let mut m = model.lock().unwrap();
        let paths: Vec<PathBuf> = m.files.keys().cloned().collect();
        let pick = |rng: &mut Rng| paths[rng.below(paths.len() as u64) as usize].clone();
        serial += 1;
        let op = if paths.is_empty() {
            0
        } else {
            rng.below(if paths.len() >= MAX_FILES { 9 } else { 10 }) + 1
        };
        let r: Result<(), String> = match op {
            // Create a file (up to 256 KiB, half of them under 8 KiB).
            0 | 10 => {
                let p = dirs[rng.below(3) as usize].join(format!("t{t}-{serial}"));
                let len = if rng.below(2) == 0 {
                    rng.below(8192)
                } else {
                    rng.below(256 << 10)
                };
                let data = noise(rng.next(), len as usize);
                m.durable.remove(&p);
                match fs::write(&p, &data) {
                    Ok(()) => {
                        m.files.insert(p, data);
                        Ok(())
                    }
                    Err(e) => Err(format!("create {}: {e}", p.display())),
                }
            }
            // Write somewhere in or just past the file.
            1..=3 => {
                let p = pick(&mut rng);
                let cur = m.files[&p].len() as u64;
                let at = rng.below(cur + (16 << 10));
                let len = match rng.below(3) {
                    0 => 1 + rng.below(64),
                    1 => 4096,
                    _ => 1 + rng.below(128 << 10),
                }
                .min(MAX_SIZE - at.min(MAX_SIZE - 1));
                let at = if len == 4096 { at & !4095 } else { at };
                let data = noise(rng.next(), len as usize);
                m.durable.remove(&p);
                let r = OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .and_then(|f| f.write_all_at(&data, at));
                match r {
                    Ok(()) => {
                        let f = m.files.get_mut(&p).unwrap();
                        let end = (at + len) as usize;
                        if f.len() < end {
                            f.resize(end, 0);
                        }
                        f[at as usize..end].copy_from_slice(&data);
                        Ok(())
                    }
                    Err(e) => Err(format!("write {} at {at}+{len}: {e}", p.display())),
                }
            }
            // Read the whole file, or a range of it.
            4 | 5 => {
                let p = pick(&mut rng);
                let want = &m.files[&p];
                if rng.below(2) == 0 {
                    match fs::read(&p) {
                        Ok(got) if got == *want => Ok(()),
                        Ok(got) => Err(format!(
                            "read {}: {} bytes, differs from the model ({} bytes) at {:?}",
                            p.display(),
                            got.len(),
                            want.len(),
                            got.iter().zip(want.iter()).position(|(a, b)| a != b)
                        )),
                        Err(e) => Err(format!("read {}: {e}", p.display())),
                    }
                } else {
                    let at = rng.below(want.len() as u64 + 1);
                    let len = rng.below(64 << 10) as usize;
                    let mut buf = vec![0u8; len];
                    let end = (at as usize + len).min(want.len());
                    match File::open(&p).and_then(|f| f.read_at(&mut buf, at)) {
                        Ok(n) if buf[..n] == want[at as usize..end] => Ok(()),
                        Ok(n) => Err(format!(
                            "pread {} at {at}+{len}: {n} bytes, not the model's {}",
                            p.display(),
                            end - at as usize
                        )),
                        Err(e) => Err(format!("pread {}: {e}", p.display())),
                    }
                }
            }
            // Truncate, shorter or longer.
            6 => {
                let p = pick(&mut rng);
                let size = rng.below(m.files[&p].len() as u64 * 2 + 4096).min(MAX_SIZE);
                m.durable.remove(&p);
                match OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .and_then(|f| f.set_len(size))
                {
                    Ok(()) => {
                        m.files.get_mut(&p).unwrap().resize(size as usize, 0);
                        Ok(())
                    }
                    Err(e) => Err(format!("truncate {} to {size}: {e}", p.display())),
                }
            }
            // Rename, maybe over another file of ours, maybe to another
            // directory.
            7 => {
                let p = pick(&mut rng);
                let q = if rng.below(3) == 0 {
                    pick(&mut rng)
                } else {
                    dirs[rng.below(3) as usize].join(format!("t{t}-{serial}"))
                };
                m.durable.remove(&p);
                m.durable.remove(&q);
                match fs::rename(&p, &q) {
                    Ok(()) => {
                        let data = m.files.remove(&p).unwrap();
                        m.files.insert(q, data);
                        Ok(())
                    }
                    Err(e) => Err(format!("rename {} {}: {e}", p.display(), q.display())),
                }
            }
            // Unlink.
            8 => {
                let p = pick(&mut rng);
                m.durable.remove(&p);
                match fs::remove_file(&p) {
                    Ok(()) => {
                        m.files.remove(&p);
                        Ok(())
                    }
                    Err(e) => Err(format!("unlink {}: {e}", p.display())),
                }
            }
            // fsync the file, then its directory: durable from here on.
            _ => {
                let p = pick(&mut rng);
                let r = File::open(&p)
                    .and_then(|f| f.sync_all())
                    .and_then(|()| File::open(p.parent().unwrap()))
                    .and_then(|d| d.sync_all());
                match r {
                    Ok(()) => {
                        let data = m.files[&p].clone();
                        m.durable.insert(p, data);
                        Ok(())
                    }
                    Err(e) => Err(format!("fsync {}: {e}", p.display())),
                }
            }
        };
        drop(m);
        if let Err(e) = r {
            sh.fail(format!("worker {t}: {e}"));
            return;
        }
        sh.tick(t);
    }
}

/// The `hammer2` tool, built beside mount.hammer2.
fn hammer2(args: &[&str]) -> Result<String, String> {
    let bin = Path::new(BIN).with_file_name("hammer2");
    let out = Command::new(&bin)
        .args(args)
        .output()
        .map_err(|e| format!("run {}: {e}", bin.display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "hammer2 {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Read every file under `dir` (a snapshot): nothing may fail.
fn read_tree(dir: &Path) -> Result<u64, String> {
    let mut n = 0;
    for e in fs::read_dir(dir).map_err(|e| format!("readdir {}: {e}", dir.display()))? {
        let e = e.map_err(|e| format!("readdir {}: {e}", dir.display()))?;
        let p = e.path();
        let ft = e.file_type().map_err(|e| format!("{}: {e}", p.display()))?;
        if ft.is_dir() {
            n += read_tree(&p)?;
        } else {
            n += fs::read(&p)
                .map_err(|e| format!("read {}: {e}", p.display()))?
                .len() as u64;
        }
    }
    Ok(n)
}

/// Snapshot the mount, read the newest snapshot whole, keep three.
fn snapshotter(who: usize, mnt: PathBuf, sh: Arc<Shared>) {
    let m = mnt.to_str().unwrap();
    let mut taken: Vec<String> = Vec::new();
    let mut i = 0;
    while !sh.stopped() {
        i += 1;
        let name = format!("stress{i}");
        let r = hammer2(&["snapshot", m, &name])
            .and_then(|_| read_tree(&mnt.join(".snapshot").join(&name)))
            .and_then(|_| {
                taken.push(name);
                if taken.len() > 3 {
                    let old = taken.remove(0);
                    hammer2(&["pfs-delete", m, &old]).map(|_| 0)
                } else {
                    Ok(0)
                }
            });
        if let Err(e) = r {
            sh.fail(format!("snapshots: {e}"));
            return;
        }
        sh.tick(who);
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn bulkfreer(who: usize, mnt: PathBuf, sh: Arc<Shared>) {
    while !sh.stopped() {
        if let Err(e) = hammer2(&["bulkfree", mnt.to_str().unwrap()]) {
            sh.fail(format!("bulkfree: {e}"));
            return;
        }
        sh.tick(who);
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn syncer(who: usize, sh: Arc<Shared>) {
    while !sh.stopped() {
        nix::unistd::sync();
        sh.tick(who);
        std::thread::sleep(Duration::from_millis(700));
    }
}

/// What the daemon's threads are doing: name, wait channel and kernel
/// stack of each.
fn daemon_threads(pid: u32) -> String {
    let mut out = String::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(no /proc/{pid}/task)");
    };
    for t in tasks.flatten() {
        let d = t.path();
        let get = |f: &str| fs::read_to_string(d.join(f)).unwrap_or_default();
        out += &format!(
            "-- task {} {} wchan={}\n{}\n",
            t.file_name().to_string_lossy(),
            get("comm").trim(),
            get("wchan").trim(),
            get("stack")
        );
    }
    out
}

/// Fail (and kill the daemon, so blocked requests return) when a
/// thread has finished nothing for the stall limit.
fn watchdog(pid: u32, sh: Arc<Shared>, done: Arc<AtomicBool>) {
    while !done.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(250));
        let now = sh.start.elapsed().as_millis() as u64;
        for (i, p) in sh.progress.iter().enumerate() {
            let last = p.load(Ordering::Relaxed);
            if !done.load(Ordering::SeqCst)
                && now.saturating_sub(last) > sh.stall.as_millis() as u64
            {
                let threads = daemon_threads(pid);
                sh.fail(format!(
                    "watchdog: {} finished nothing for {} s; the daemon's threads:\n{threads}",
                    sh.names[i],
                    (now - last) / 1000
                ));
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                return;
            }
        }
    }
}

/// Start the load; returns the models and the threads to join.
struct Load {
    sh: Arc<Shared>,
    models: Vec<Arc<Mutex<Model>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    dog: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

fn start_load(mnt: &Path, pid: u32, models: Vec<Arc<Mutex<Model>>>, stall: Duration) -> Load {
    let mut names: Vec<&'static str> = vec!["a worker"; WORKERS];
    names.extend([
        "the snapshot thread",
        "the bulkfree thread",
        "the sync thread",
    ]);
    let sh = Shared::new(names, stall);
    let mut threads = Vec::new();
    for (t, model) in models.iter().enumerate() {
        let (mnt, sh, model) = (mnt.to_path_buf(), sh.clone(), model.clone());
        threads.push(std::thread::spawn(move || worker(t, mnt, sh, model)));
    }
    let (m, s) = (mnt.to_path_buf(), sh.clone());
    threads.push(std::thread::spawn(move || snapshotter(WORKERS, m, s)));
    let (m, s) = (mnt.to_path_buf(), sh.clone());
    threads.push(std::thread::spawn(move || bulkfreer(WORKERS + 1, m, s)));
    let s = sh.clone();
    threads.push(std::thread::spawn(move || syncer(WORKERS + 2, s)));
    let done = Arc::new(AtomicBool::new(false));
    let (d, s) = (done.clone(), sh.clone());
    let dog = std::thread::spawn(move || watchdog(pid, s, d));
    Load {
        sh,
        models,
        threads,
        dog: Some((done, dog)),
    }
}

impl Load {
    /// Run for `secs` (or until a failure), then stop and join.
    fn run_for(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until && !self.sh.stopped() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn join(&mut self) {
        self.sh.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().expect("a stress thread panicked");
        }
        if let Some((done, dog)) = self.dog.take() {
            done.store(true, Ordering::SeqCst);
            dog.join().unwrap();
        }
    }

    fn assert_no_failure(&self, log: impl FnOnce() -> String) {
        let bad = self.sh.bad.lock().unwrap();
        assert!(
            bad.is_empty(),
            "stress failures: {bad:#?}\ndaemon log:\n{}",
            log()
        );
    }
}

fn setup_dirs(mnt: &Path) {
    fs::create_dir(mnt.join("shared")).unwrap();
    for t in 0..WORKERS {
        fs::create_dir_all(mnt.join(format!("w{t}/sub"))).unwrap();
    }
    nix::unistd::sync();
}

/// Every worker's files read back as the model says, and each of its
/// directories lists exactly them (plus `sub` in its own).
fn check_models(mnt: &Path, models: &[Arc<Mutex<Model>>]) {
    let mut shared_want: Vec<String> = Vec::new();
    for (t, model) in models.iter().enumerate() {
        let m = model.lock().unwrap();
        for (p, want) in &m.files {
            let got = fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            assert!(
                got == *want,
                "{}: {} bytes, the model has {} (first difference at {:?})",
                p.display(),
                got.len(),
                want.len(),
                got.iter().zip(want.iter()).position(|(a, b)| a != b)
            );
        }
        let [own, sub, shared] = dirs(mnt, t);
        for d in [&own, &sub] {
            let mut want: Vec<String> = m
                .files
                .keys()
                .filter(|p| p.parent() == Some(d.as_path()))
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            if *d == own {
                want.push("sub".into());
            }
            want.sort();
            assert_eq!(list(d), want, "{}", d.display());
        }
        shared_want.extend(
            m.files
                .keys()
                .filter(|p| p.parent() == Some(shared.as_path()))
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned()),
        );
    }
    shared_want.sort();
    assert_eq!(list(&mnt.join("shared")), shared_want, "shared");
}

fn list(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(d)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", d.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn new_models() -> Vec<Arc<Mutex<Model>>> {
    (0..WORKERS).map(|_| Arc::default()).collect()
}

/// Print what each thread did; every one must have done something.
fn report(what: &str, load: &Load) {
    let ops: Vec<u64> = load
        .sh
        .ops
        .iter()
        .map(|o| o.load(Ordering::Relaxed))
        .collect();
    eprintln!(
        "{what}: in {:.0} s, {} worker operations, {} snapshots, {} bulkfree runs, {} syncs",
        load.sh.start.elapsed().as_secs_f64(),
        ops[..WORKERS].iter().sum::<u64>(),
        ops[WORKERS],
        ops[WORKERS + 1],
        ops[WORKERS + 2]
    );
    for (i, n) in ops.iter().enumerate() {
        assert!(*n > 0, "{} (thread {i}) did nothing", load.sh.names[i]);
    }
}

#[test]
fn threads_against_the_model() {
    require_fuse();
    let img = new_volume("stress", 2);
    let mnt = scratch("stress-mnt");
    let rw = Rw::new(&img, &mnt, OPTS);
    setup_dirs(&mnt);
    let mut load = start_load(&mnt, rw.pid().unwrap(), new_models(), STALL);
    load.run_for(stress_time());
    load.join();
    load.assert_no_failure(|| rw.log());
    report("stress", &load);
    check_models(&mnt, &load.models);
    rw.unmount();
    fsck_clean(&img);
    let rw = Rw::new(&img, &mnt, OPTS);
    check_models(&mnt, &load.models);
    rw.unmount();
    fsck_clean(&img);
    let _ = fs::remove_file(&img);
}

#[test]
fn threads_then_a_crash() {
    require_fuse();
    let img = new_volume("stress-crash", 2);
    let mnt = scratch("stress-crash-mnt");
    let rw = Rw::new(&img, &mnt, OPTS);
    setup_dirs(&mnt);
    let mut load = start_load(&mnt, rw.pid().unwrap(), new_models(), STALL);
    load.run_for(stress_time() / 2);
    load.assert_no_failure(|| rw.log());
    // kill -9 in the middle of it all (the threads stop after what
    // they are doing, which fails).
    load.sh.crashing.store(true, Ordering::SeqCst);
    load.sh.stop.store(true, Ordering::SeqCst);
    let log = rw.crash();
    load.join();
    {
        let bad = load.sh.bad.lock().unwrap();
        assert!(
            bad.is_empty(),
            "stress failures: {bad:#?}\ndaemon log:\n{log}"
        );
    }
    report("stress before the crash", &load);
    fsck_clean(&img);
    let rw = Rw::new(&img, &mnt, OPTS);
    let mut durable = 0;
    for model in &load.models {
        for (p, want) in &model.lock().unwrap().durable {
            let got = fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            assert!(
                got == *want,
                "{} was fsynced with {} bytes; after the crash it has {}",
                p.display(),
                want.len(),
                got.len()
            );
            durable += 1;
        }
    }
    assert!(
        durable > 0,
        "no file was durable when the daemon was killed"
    );
    rw.unmount();
    fsck_clean(&img);
    let _ = fs::remove_file(&img);
}

/// The watchdog is real: a daemon that stops answering (SIGSTOP) fails
/// the load within the stall limit, with the daemon's threads in the
/// report, and the killed daemon lets every blocked thread return.
#[test]
fn the_watchdog_catches_a_wedged_daemon() {
    require_fuse();
    let img = new_volume("stress-wedge", 1);
    let mnt = scratch("stress-wedge-mnt");
    let rw = Rw::new(&img, &mnt, OPTS);
    setup_dirs(&mnt);
    let pid = rw.pid().unwrap();
    let mut load = start_load(&mnt, pid, new_models(), Duration::from_secs(3));
    load.run_for(Duration::from_secs(2));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    load.run_for(Duration::from_secs(30));
    load.join();
    let bad = load.sh.bad.lock().unwrap().clone();
    // The daemon goes first: an unmount of a stopped one would wait for
    // it forever (and so would every sync(2) on the machine).
    drop(rw.crash());
    assert!(
        bad.iter().any(|b| b.starts_with("watchdog:")
            && b.contains("finished nothing")
            && b.contains("-- task")),
        "{bad:#?}"
    );
    let _ = fs::remove_file(&img);
}
