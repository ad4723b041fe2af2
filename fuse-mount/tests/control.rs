//! The `hammer2` tool against a running mount.hammer2, through the
//! control channel (ioctls on a file of the mount), end to end through
//! the kernel: `mark` with and without a device that keeps a write log,
//! refused to users other than root; a snapshot taken while a writer
//! runs is one state of the writer's script (the expected trees are
//! built from the script, not read through our code) and stays so while
//! the origin goes on, and writes into it leave the origin alone.
//!
//! These tests need root and /dev/fuse, and the `hammer2` binary built
//! beside mount.hammer2 (`cargo build --workspace --bins`, as
//! scripts/test does first); they fail (not skip) without them.

mod common;
use common::*;

use bufcache::FileDevice;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The `hammer2` tool, built beside mount.hammer2.
fn hammer2_bin() -> PathBuf {
    let p = Path::new(BIN).with_file_name("hammer2");
    assert!(
        p.exists(),
        "{} is missing: build the tools first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

/// Run `hammer2 ARGS` as root.
fn hammer2(args: &[&str]) -> Output {
    Command::new(hammer2_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run hammer2")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A foreground read-write mount; `unmount` waits for the daemon's last
/// flush and its exit.
struct Daemon {
    child: Option<Child>,
    guard: Option<Mounted>,
    log: PathBuf,
}

impl Daemon {
    fn new(source: &str, mnt: &Path, opts: &str) -> Daemon {
        fs::create_dir_all(mnt).expect("mountpoint");
        let log = mnt.with_extension("log");
        let (child, guard) = mount_foreground(source, mnt, &log, opts);
        Daemon {
            child: Some(child),
            guard: Some(guard),
            log,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn unmount(mut self) {
        let guard = self.guard.take().expect("mounted");
        // A child another test forks may hold a descriptor of this mount
        // for the moment between its fork and its exec: EBUSY, briefly.
        let mut tries = 0;
        while let Err(e) = nix::mount::umount(&guard.mnt) {
            tries += 1;
            assert!(e == nix::errno::Errno::EBUSY && tries < 100, "umount: {e}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut child = self.child.take().expect("running");
        let status = wait_exit(&mut child, Duration::from_secs(60));
        assert!(
            status.success(),
            "mount.hammer2 exited {status}:\n{}",
            self.log()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        drop(self.guard.take());
        if let Some(mut c) = self.child.take() {
            let _ = wait_exit(&mut c, Duration::from_secs(30));
        }
    }
}

#[test]
fn mark_without_a_write_log_is_refused_clearly_and_needs_root() {
    require_fuse();
    let img = new_volume("mark", 2);
    let mnt = scratch("mark").join("mnt");
    let d = Daemon::new(img.to_str().unwrap(), &mnt, "rw,allow_other");
    fs::write(mnt.join("f"), b"x").expect("write");

    // On the mountpoint and on a file inside: the daemon answers, and
    // its device (a plain file) keeps no write log.
    for p in [mnt.clone(), mnt.join("f")] {
        let o = hammer2(&["mark", p.to_str().unwrap(), "m1"]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("this mount keeps no write log (mount with -o log_writes=FILE)"),
            "{}",
            stderr(&o)
        );
    }
    // An image is not a mount: mark needs one.
    let o = hammer2(&["mark", img.to_str().unwrap(), "m1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("not on a mounted hammer2 filesystem"),
        "{}",
        stderr(&o)
    );
    // Another user may open the mount (allow_other) but not mark it.
    let o = Command::new(hammer2_bin())
        .args(["mark", mnt.to_str().unwrap(), "m2"])
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .output()
        .expect("run hammer2 as nobody");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("only root may change the volume"),
        "{}",
        stderr(&o)
    );
    d.unmount();
}

/// A file tree as read through a mount: path -> contents (None for a
/// directory).
type Tree = BTreeMap<String, Option<Vec<u8>>>;

fn read_tree(root: &Path) -> Tree {
    fn walk(root: &Path, dir: &Path, out: &mut Tree) {
        let mut names: Vec<_> = fs::read_dir(dir)
            .expect("readdir")
            .map(|e| e.expect("entry").path())
            .collect();
        names.sort();
        for p in names {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                out.insert(rel, None);
                walk(root, &p, out);
            } else {
                out.insert(rel, Some(fs::read(&p).expect("read")));
            }
        }
    }
    let mut t = Tree::new();
    walk(root, root, &mut t);
    t
}

/// Deterministic bytes (xorshift), compressible in part.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|i| {
            if (i / 4096) % 3 == 0 {
                (i % 7) as u8
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect()
}

/// One operation of the writers: each is one FUSE request, except a
/// file write, which is a create then one write (so a state between the
/// two may be seen: the file, empty).
#[derive(Clone, Debug)]
enum Op {
    Write(String, Vec<u8>),
    Unlink(String),
    Rename(String, String),
}

/// The writers' script: files written into four directories, some
/// removed and renamed later; only names that exist at that point are
/// removed or renamed.
fn script(seed: u64, n: usize) -> Vec<Op> {
    let mut live: Vec<String> = Vec::new();
    let mut ops = Vec::new();
    for i in 0..n {
        let r = seed
            .wrapping_add(i as u64)
            .wrapping_mul(0x2545_f491_4f6c_dd1d)
            >> 33;
        if i % 7 == 6 && !live.is_empty() {
            let victim = live.remove(r as usize % live.len());
            ops.push(Op::Unlink(victim));
        } else if i % 11 == 10 && !live.is_empty() {
            let k = r as usize % live.len();
            let to = format!("d{}/r{i}", i % 4);
            ops.push(Op::Rename(live[k].clone(), to.clone()));
            live[k] = to;
        } else {
            let name = format!("d{}/f{i}", i % 4);
            let len = 1 + (r as usize % (96 << 10));
            ops.push(Op::Write(name.clone(), noise(seed ^ i as u64, len)));
            live.push(name);
        }
    }
    ops
}

fn apply(root: &Path, op: &Op) {
    match op {
        Op::Write(p, data) => fs::write(root.join(p), data).expect("write"),
        Op::Unlink(p) => fs::remove_file(root.join(p)).expect("unlink"),
        Op::Rename(a, b) => fs::rename(root.join(a), root.join(b)).expect("rename"),
    }
}

fn apply_model(t: &mut Tree, op: &Op) {
    match op {
        Op::Write(p, data) => {
            t.insert(p.clone(), Some(data.clone()));
        }
        Op::Unlink(p) => {
            t.remove(p);
        }
        Op::Rename(a, b) => {
            let v = t.remove(a).expect("renamed file in the model");
            t.insert(b.clone(), v);
        }
    }
}

/// The tree the script's directories start with.
fn base_tree() -> Tree {
    (0..4).map(|d| (format!("d{d}"), None)).collect()
}

/// The model after the first `k` operations.
fn model_after(ops: &[Op], k: usize) -> Tree {
    let mut t = base_tree();
    for op in &ops[..k] {
        apply_model(&mut t, op);
    }
    t
}

/// Which state of the script `tree` is: k such that it equals the model
/// after k operations (or after k and the create of a k+1st write), k
/// in `lo..=hi`.
fn which_state(ops: &[Op], tree: &Tree, lo: usize, hi: usize) -> Option<usize> {
    let mut t = model_after(ops, lo);
    for k in lo..=hi.min(ops.len()) {
        if *tree == t {
            return Some(k);
        }
        if let Some(Op::Write(p, _)) = ops.get(k) {
            let mut half = t.clone();
            half.insert(p.clone(), Some(Vec::new()));
            if *tree == half {
                return Some(k);
            }
        }
        if let Some(op) = ops.get(k) {
            apply_model(&mut t, op);
        }
    }
    None
}

/// Run `ops` on `root` from a thread, counting those done.
fn writer(root: PathBuf, ops: Vec<Op>, done: Arc<AtomicUsize>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for op in &ops {
            apply(&root, op);
            done.fetch_add(1, Ordering::SeqCst);
        }
    })
}

/// Labels `hammer2 pfs-list` prints (the last column, "(mounted)" cut).
fn pfs_labels(out: &str) -> Vec<String> {
    out.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
        .collect()
}

#[test]
fn an_online_snapshot_is_one_flushed_state_and_stays_so() {
    require_fuse();
    let img = new_volume("snap", 4);
    let dir = scratch("snap");
    let mnt = dir.join("mnt");
    let src = img.to_str().unwrap().to_string();
    let ops = script(1, 600);
    let d = Daemon::new(&src, &mnt, "rw,sync_interval=1");
    for k in 0..4 {
        fs::create_dir(mnt.join(format!("d{k}"))).expect("mkdir");
    }
    let done = Arc::new(AtomicUsize::new(0));
    let w = writer(mnt.clone(), ops.clone(), done.clone());
    wait_until(
        "the writer's first 150 operations",
        Duration::from_secs(60),
        || done.load(Ordering::SeqCst) >= 150,
    );
    let lo = done.load(Ordering::SeqCst);
    let o = hammer2(&["snapshot", mnt.to_str().unwrap(), "S1"]);
    let hi = done.load(Ordering::SeqCst) + 1;
    assert!(o.status.success(), "snapshot: {}", stderr(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "created snapshot S1"
    );
    // A second one with DragonFly's default name, LABEL.YYYYMMDD.HHMMSS.
    let o = hammer2(&["snapshot", mnt.join("d1").to_str().unwrap()]);
    assert!(o.status.success(), "snapshot: {}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let default = out
        .trim()
        .strip_prefix("created snapshot ")
        .expect("name")
        .to_string();
    assert!(
        default.len() == "DATA.20240101.120000".len() && default.starts_with("DATA.2"),
        "{default}"
    );
    w.join().expect("writer");
    let final_tree = model_after(&ops, ops.len());
    assert_eq!(read_tree(&mnt), final_tree, "origin after the script");
    let o = hammer2(&["pfs-list", mnt.to_str().unwrap()]);
    let labels = pfs_labels(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(labels, ["DATA", &default, "LOCAL", "S1"]);
    d.unmount();
    fsck_spotless(&img);

    // The snapshot is one state of the script, between the operations
    // done before the request and those done after it returned.
    let smnt = dir.join("smnt");
    let s = Daemon::new(&format!("{src}@S1"), &smnt, "rw");
    let got = read_tree(&smnt);
    let k = which_state(&ops, &got, lo, hi)
        .unwrap_or_else(|| panic!("S1 is no state of the script between {lo} and {hi}"));
    eprintln!(
        "S1: state {k} of {} (requested after {lo}, returned before {hi})",
        ops.len()
    );
    // Writing into the snapshot leaves the origin alone.
    fs::write(smnt.join("d0/in-snapshot"), b"only here").expect("write");
    fs::remove_dir_all(smnt.join("d2")).expect("rm -r");
    s.unmount();
    let o = Daemon::new(&src, &mnt, "ro");
    assert_eq!(read_tree(&mnt), final_tree, "origin after writes to S1");
    drop(o);
    let s = Daemon::new(&format!("{src}@S1"), &smnt, "ro");
    let mut want = model_after(&ops, k);
    if got != want {
        // The half-done write the snapshot caught.
        want = got.clone();
    }
    want.retain(|p, _| p != "d2" && !p.starts_with("d2/"));
    want.insert("d0/in-snapshot".into(), Some(b"only here".to_vec()));
    assert_eq!(read_tree(&smnt), want, "S1 after writes to it");
    drop(s);
    fsck_spotless(&img);
}

#[test]
fn pfs_create_list_and_delete_online() {
    require_fuse();
    let img = new_volume("pfs", 2);
    let dir = scratch("pfs");
    let mnt = dir.join("mnt");
    let src = img.to_str().unwrap().to_string();
    let d = Daemon::new(&src, &mnt, "rw,allow_other");
    fs::write(mnt.join("f"), b"data").expect("write");
    let m = mnt.to_str().unwrap();
    let list = || {
        let o = hammer2(&["pfs-list", m]);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(out.lines().any(|l| l.ends_with("DATA (mounted)")), "{out}");
        pfs_labels(&out)
    };
    assert_eq!(list(), ["DATA", "LOCAL"]);
    let o = hammer2(&["pfs-create", m, "NEW"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(list(), ["DATA", "LOCAL", "NEW"]);
    // An existing label: refused.
    let o = hammer2(&["pfs-create", m, "LOCAL"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("exists"), "{}", stderr(&o));
    // Enough PFSs for the list to take several pages (4 KiB each).
    let many: Vec<String> = (0..40)
        .map(|i| format!("P{i:02}-{}", "x".repeat(60)))
        .collect();
    for l in &many {
        let o = hammer2(&["pfs-create", m, l]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let mut want: Vec<String> = ["DATA", "LOCAL", "NEW"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    want.extend(many.iter().cloned());
    want.sort();
    assert_eq!(list(), want);
    // The PFS mounted here is refused (EBUSY).
    let o = hammer2(&["pfs-delete", m, "DATA"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is mounted here"), "{}", stderr(&o));
    // Another user may not change the volume.
    let o = Command::new(hammer2_bin())
        .args(["pfs-delete", m, "NEW"])
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .output()
        .expect("run hammer2 as nobody");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("only root"), "{}", stderr(&o));
    for l in &many {
        let o = hammer2(&["pfs-delete", m, l]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = hammer2(&["pfs-delete", m, "NEW"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(list(), ["DATA", "LOCAL"]);
    let o = hammer2(&["pfs-delete", m, "NEW"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(fs::read(mnt.join("f")).expect("read"), b"data");
    d.unmount();
    // Offline, the image says the same.
    let o = hammer2(&["pfs-list", &src]);
    assert_eq!(
        pfs_labels(&String::from_utf8_lossy(&o.stdout)),
        ["DATA", "LOCAL"]
    );
    fsck_spotless(&img);
}

#[test]
fn stat_shows_the_inode_the_kernel_sees() {
    require_fuse();
    let img = new_volume("stat", 2);
    let mnt = scratch("stat").join("mnt");
    let d = Daemon::new(img.to_str().unwrap(), &mnt, "rw");
    let f = mnt.join("file");
    fs::write(&f, noise(3, 200_000)).expect("write");
    fs::create_dir(mnt.join("dir")).expect("mkdir");
    let o = hammer2(&[
        "stat",
        f.to_str().unwrap(),
        mnt.join("dir").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    use std::os::unix::fs::MetadataExt;
    let md = fs::metadata(&f).expect("stat");
    let line = |name: &str, nth: usize| -> String {
        out.lines()
            .filter(|l| l.trim_start().starts_with(name))
            .nth(nth)
            .unwrap_or_else(|| panic!("no {name} line {nth}: {out}"))
            .to_string()
    };
    assert!(
        line("inum", 0).ends_with(&format!("({})", md.ino())),
        "{out}"
    );
    assert!(line("type", 0).ends_with("FILE"), "{out}");
    assert!(line("size", 0).ends_with(" 200000"), "{out}");
    assert!(line("type", 1).ends_with("DIR"), "{out}");
    assert!(line("comp", 0).contains("lz4"), "{out}");
    assert!(line("check", 0).contains("xxhash64"), "{out}");
    // Not on a mount: refused.
    let o = hammer2(&["stat", img.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    d.unmount();
}

#[test]
fn online_bulkfree_with_writers_running_frees_exactly_what_nothing_references() {
    require_fuse();
    let img = new_volume("bulk", 4);
    let offset = {
        let dev = Arc::new(FileDevice::open(&img, false).expect("open"));
        tests::freemap_check::allocator_free_offset(&dev)
    };
    let dir = scratch("bulk");
    let mnt = dir.join("mnt");
    let src = img.to_str().unwrap().to_string();
    let m = mnt.to_str().unwrap().to_string();
    let d = Daemon::new(&src, &mnt, "rw,sync_interval=1");
    for k in 0..4 {
        fs::create_dir(mnt.join(format!("d{k}"))).expect("mkdir");
    }
    // Something to free: a snapshot of a first round, then deleted, and
    // the files the script removes.
    let first = script(7, 200);
    for op in &first {
        apply(&mnt, op);
    }
    let o = hammer2(&["snapshot", &m, "OLD"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for p in model_after(&first, first.len())
        .keys()
        .filter(|p| p.contains('/'))
    {
        fs::remove_file(mnt.join(p)).expect("rm");
    }
    let o = hammer2(&["pfs-delete", &m, "OLD"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Bulkfree while a writer runs: twice two passes.
    let ops = script(8, 1500);
    let done = Arc::new(AtomicUsize::new(0));
    let w = writer(mnt.clone(), ops.clone(), done.clone());
    let mut freed_during = 0;
    for round in 0..2 {
        let before = done.load(Ordering::SeqCst);
        let o = hammer2(&["bulkfree", &m]);
        assert!(o.status.success(), "bulkfree {round}: {}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let freed: u64 = out
            .lines()
            .find_map(|l| {
                l.strip_prefix("freed ")?
                    .split(['(', ' '])
                    .nth(2)?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no freed line: {out}"));
        freed_during += freed;
        eprintln!(
            "online bulkfree {round}: {freed} bytes freed while the writer did {} operations",
            done.load(Ordering::SeqCst) - before
        );
    }
    assert!(freed_during > 0, "nothing freed by the online passes");
    w.join().expect("writer");
    let want = model_after(&ops, ops.len());
    let mut got = read_tree(&mnt);
    got.retain(|p, _| !p.starts_with('.'));
    assert_eq!(got, want, "the tree after the writer and bulkfree");
    d.unmount();
    // Nothing referenced was freed meanwhile.
    fsck_spotless(&img);
    // Quiet now: two more passes leave the freemap exactly the
    // reachability scan.
    let d = Daemon::new(&src, &mnt, "rw");
    let o = hammer2(&["bulkfree", &m]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read_tree(&mnt), want, "the tree after the quiet passes");
    d.unmount();
    let dev = Arc::new(FileDevice::open(&img, false).expect("open"));
    tests::freemap_check::assert_freemap_is_full_scan(&dev, offset, "after online bulkfree");
    fsck_spotless(&img);
}

#[test]
fn snapdir_shows_each_snapshot_read_only_and_only_when_asked() {
    require_fuse();
    let img = new_volume("snapdir", 2);
    let dir = scratch("snapdir");
    let mnt = dir.join("mnt");
    let src = img.to_str().unwrap().to_string();
    let m = mnt.to_str().unwrap().to_string();
    let ops = script(5, 120);
    // Without the option there is no .snapshot.
    let d = Daemon::new(&src, &mnt, "rw");
    for k in 0..4 {
        fs::create_dir(mnt.join(format!("d{k}"))).expect("mkdir");
    }
    for op in &ops[..60] {
        apply(&mnt, op);
    }
    let o = hammer2(&["snapshot", &m, "S1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!mnt.join(".snapshot").exists());
    d.unmount();

    let d = Daemon::new(&src, &mnt, "rw,snapdir");
    for op in &ops[60..] {
        apply(&mnt, op);
    }
    let o = hammer2(&["snapshot", &m, "S2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    fs::write(mnt.join("after"), b"not in any snapshot").expect("write");
    // Hidden from the root's listing, there when looked up.
    assert!(!read_tree(&mnt).contains_key(".snapshot"));
    let snaps = mnt.join(".snapshot");
    let mut names: Vec<String> = fs::read_dir(&snaps)
        .expect("readdir .snapshot")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["S1", "S2"]);
    assert_eq!(read_tree(&snaps.join("S1")), model_after(&ops, 60));
    let mut want2 = model_after(&ops, ops.len());
    assert_eq!(read_tree(&snaps.join("S2")), want2);
    want2.insert("after".into(), Some(b"not in any snapshot".to_vec()));
    assert_eq!(read_tree(&mnt), want2);
    // `hammer2 stat` on a file there: the inode the kernel sees.
    let any1 = model_after(&ops, 60)
        .into_iter()
        .find_map(|(p, v)| v.map(|_| p))
        .expect("a file in S1");
    let f = snaps.join("S1").join(&any1);
    let o = hammer2(&["stat", f.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let size = fs::metadata(&f).expect("stat").len();
    assert!(
        out.lines()
            .any(|l| l.trim() == format!("size         {size}")),
        "{out}"
    );
    // Read-only.
    let e = fs::write(snaps.join("S1/d0/new"), b"x").expect_err("write into a snapshot");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let e = fs::create_dir(snaps.join("S1/x")).expect_err("mkdir in a snapshot");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let any = model_after(&ops, 60)
        .into_iter()
        .find_map(|(p, v)| v.map(|_| p))
        .expect("a file in S1");
    let e = fs::remove_file(snaps.join("S1").join(&any)).expect_err("unlink in a snapshot");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    // Another layer, as another mount would be: a link either way is
    // EXDEV, and a copy out falls back to reading and writing.
    let file = snaps.join("S1").join(&any);
    let e = fs::hard_link(&file, mnt.join("linked")).expect_err("link out of a snapshot");
    assert_eq!(e.raw_os_error(), Some(libc::EXDEV), "{e}");
    let e = fs::hard_link(mnt.join("after"), snaps.join("S1/d0/linked"))
        .expect_err("link into a snapshot");
    assert_eq!(e.raw_os_error(), Some(libc::EXDEV), "{e}");
    fs::copy(&file, mnt.join("copied")).expect("copy out of a snapshot");
    assert_eq!(
        fs::read(mnt.join("copied")).unwrap(),
        fs::read(&file).unwrap()
    );
    // A deleted snapshot goes away.
    let o = hammer2(&["pfs-delete", &m, "S1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let left = fs::read_dir(&snaps).expect("readdir").count();
    assert_eq!(left, 1);
    d.unmount();
    fsck_spotless(&img);
}

#[test]
fn an_unmount_during_an_online_bulkfree_exits_cleanly() {
    require_fuse();
    let img = new_volume("bulkstop", 2);
    let mnt = scratch("bulkstop").join("mnt");
    let d = Daemon::new(img.to_str().unwrap(), &mnt, "rw");
    for i in 0..200 {
        fs::write(mnt.join(format!("f{i}")), noise(i, 20_000)).expect("write");
    }
    for i in 0..100 {
        fs::remove_file(mnt.join(format!("f{i}"))).expect("rm");
    }
    {
        let ch = mkfs::control::Channel::open(&mnt)
            .expect("control channel")
            .expect("a hammer2 mount");
        let r = ch
            .call(&hammer2::ctl::Request::BulkfreeStart { passes: 2 })
            .expect("bulkfree start");
        assert!(matches!(r, hammer2::ctl::Reply::Bulkfree(_)), "{r:?}");
        // A second start while it runs is refused, unless it is done.
        if let Err(e) = ch.call(&hammer2::ctl::Request::BulkfreeStart { passes: 2 }) {
            assert_eq!(e.errno(), Some(libc::EBUSY), "{e}");
        }
    }
    // Unmount at once: the daemon's last flush and its exit, whatever
    // the pass was doing; the image is clean.
    d.unmount();
    fsck_spotless(&img);
    let d = Daemon::new(img.to_str().unwrap(), &mnt, "ro");
    let want: Tree = (100..200)
        .map(|i| (format!("f{i}"), Some(noise(i, 20_000))))
        .collect();
    assert_eq!(read_tree(&mnt), want);
    drop(d);
}

/// setcomp/setcheck on paths in a mount: the daemon changes each inode
/// (the tool walks `-r` itself), new writes follow, old blocks keep
/// theirs; read offline after the unmount, fsck clean.
#[test]
fn setcomp_and_setcheck_through_a_mount() {
    require_fuse();
    let img = new_volume("setmethods", 2);
    let mnt = scratch("setmethods").join("mnt");
    let d = Daemon::new(img.to_str().unwrap(), &mnt, "rw");
    let text: Vec<u8> = (0..300_000u32)
        .flat_map(|i| format!("{i} hammer2\n").into_bytes())
        .take(300_000)
        .collect();
    fs::create_dir_all(mnt.join("d/sub")).expect("mkdir");
    fs::write(mnt.join("d/sub/old"), &text).expect("write");
    fs::write(mnt.join("outside"), &text).expect("write");
    let o = hammer2(&["setcomp", "-r", "zstd", mnt.join("d").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("DragonFly BSD cannot read"),
        "{}",
        stderr(&o)
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let want: Vec<String> = ["d", "d/sub", "d/sub/old"]
        .iter()
        .map(|p| format!("{}\tcomp_algo=0x08", mnt.join(p).display()))
        .collect();
    assert_eq!(out.lines().collect::<Vec<_>>(), want);
    fs::write(mnt.join("d/sub/new"), &text).expect("write");
    let o = hammer2(&[
        "setcheck",
        "blake3",
        mnt.join("d/sub/new").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Rewritten after setcheck: its blocks take BLAKE3 at the next flush.
    fs::write(mnt.join("d/sub/new"), &text).expect("rewrite");
    let o = hammer2(&["setcomp", "brotli", mnt.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    d.unmount();

    let dev: std::sync::Arc<dyn bufcache::BlockDevice> =
        std::sync::Arc::new(FileDevice::open(&img, false).expect("open"));
    let r = hammer2::fsck::fsck(dev.clone(), hammer2::fsck::Options::default()).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    let vol = std::sync::Arc::new(hammer2::Volume::open(dev).unwrap());
    let pfs = hammer2::Pfs::open(vol.clone(), "DATA").unwrap();
    let blocks = |path: &str| {
        let ino = pfs.resolve(path).unwrap();
        let brs: Vec<_> = hammer2::chain::collect(&vol, &ino.blockset(), 0, u64::MAX)
            .unwrap()
            .into_iter()
            .filter(|b| b.btype == hammer2::disk::BlockrefType::Data)
            .collect();
        (ino.meta().comp_algo, ino.meta().check_algo, brs)
    };
    let (c, _, old) = blocks("d/sub/old");
    assert_eq!(c, 8);
    // Written before setcomp (the flush may have run either side of it).
    assert!(!old.is_empty());
    let (c, k, new) = blocks("d/sub/new");
    assert_eq!((c, k), (8, 8));
    assert!(new
        .iter()
        .all(|b| b.comp_method() == 8 && b.check_method() == 8));
    let (c, _, out) = blocks("outside");
    assert_eq!(c & 15, hammer2::disk::comp_method::LZ4);
    assert!(out
        .iter()
        .all(|b| b.comp_method() == hammer2::disk::comp_method::LZ4));
    let new = pfs.resolve("d/sub/new").unwrap();
    assert!(pfs.read_all(&new).unwrap() == text);
}

/// `cp --sparse=always SRC DST`: a copy of an image as it is now.
fn copy_image(src: &Path, dst: &Path) {
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(src)
        .arg(dst)
        .status()
        .expect("cp");
    assert!(st.success(), "cp {} {}", src.display(), dst.display());
}

/// Record, mark and replay end to end: a read-write mount with
/// `log_writes=FILE`, files written and fsynced, `hammer2 mark`, more
/// changes, unmount; `hammer2 replay-log` onto copies of the image as it
/// was at mount time rebuilds exactly the state at the mark (the files
/// the test wrote, read back through a mount; fsck after every barrier)
/// and, to the end, the final image byte for byte; a --check command
/// that fails stops the replay at that barrier; any other base image is
/// refused.
#[test]
fn a_write_log_replays_to_a_mark_and_to_the_end() {
    require_fuse();
    let img = new_volume("logwrites", 1);
    let dir = img.parent().unwrap().to_path_buf();
    let base = dir.join("base.img");
    copy_image(&img, &base);
    let log = dir.join("writes.log");
    let mnt = dir.join("mnt");
    let (a, b) = (noise(1, 150_000), noise(2, 70_000));

    let d = Daemon::new(
        img.to_str().unwrap(),
        &mnt,
        &format!("rw,sync_interval=0,log_writes={}", log.display()),
    );
    fs::create_dir(mnt.join("d")).expect("mkdir");
    fs::write(mnt.join("d/a"), &a).expect("write a");
    File::open(mnt.join("d/a"))
        .and_then(|f| f.sync_all())
        .expect("fsync");
    let o = hammer2(&["mark", mnt.to_str().unwrap(), "m1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    fs::write(mnt.join("b"), &b).expect("write b");
    fs::remove_file(mnt.join("d/a")).expect("rm a");
    d.unmount();
    fsck_spotless(&img);

    let list = hammer2(&["replay-log", "--list", log.to_str().unwrap()]);
    assert!(list.status.success(), "{}", stderr(&list));
    assert!(String::from_utf8_lossy(&list.stdout).contains(" mark    m1"));

    // To the mark: the tree as fsynced before it, checked at each barrier.
    let r1 = dir.join("r1.img");
    copy_image(&base, &r1);
    let o = hammer2(&[
        "replay-log",
        "--fsck",
        "--to-mark",
        "m1",
        log.to_str().unwrap(),
        r1.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    fsck_spotless(&r1);
    let d = Daemon::new(r1.to_str().unwrap(), &mnt, "ro");
    let want: Tree = [
        ("d".to_string(), None),
        ("d/a".to_string(), Some(a.clone())),
    ]
    .into_iter()
    .collect();
    assert_eq!(read_tree(&mnt), want);
    drop(d);

    // To the end, a check after every barrier: the final image exactly.
    let r2 = dir.join("r2.img");
    copy_image(&base, &r2);
    let o = hammer2(&[
        "replay-log",
        "--check",
        "test -f \"$1\" && test \"$H2_REPLAY_IMAGE\" = \"$1\"",
        log.to_str().unwrap(),
        r2.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(fs::read(&r2).unwrap() == fs::read(&img).unwrap());

    // A check that fails at the second barrier stops there (exit 1).
    let r3 = dir.join("r3.img");
    copy_image(&base, &r3);
    let o = hammer2(&[
        "replay-log",
        "--check",
        "test \"$H2_REPLAY_BARRIER\" -lt 2",
        log.to_str().unwrap(),
        r3.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("check failed after barrier 2"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );

    // Not the base: refused, the image untouched.
    let before = fs::read(&r2).unwrap();
    let o = hammer2(&["replay-log", log.to_str().unwrap(), r2.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("not the image the log starts from"),
        "{}",
        stderr(&o)
    );
    assert!(fs::read(&r2).unwrap() == before);
}
