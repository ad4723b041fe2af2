//! What a mount answers, checked through the kernel against figures
//! computed independently of the code that answers: `st_blocks` against
//! a walk of the file's blockrefs on disk; SEEK_DATA/SEEK_HOLE the same
//! on read-only, read-write and `.snapshot` views, against the layout
//! written; `.snapshot` (`-o snapdir`) and a real entry of that name;
//! hard links under `fs.protected_hardlinks` without
//! `default_permissions`; times outside what the format stores.
//!
//! These tests need root and /dev/fuse, and fail (not skip) without them.
//! Read-write mounts run in the foreground (`-f`), so a test can wait
//! for the daemon's last flush before it reads the image.

mod common;
use common::*;

use bufcache::{BlockDevice, FileDevice};
use hammer2::disk::{Blockref, BlockrefType};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

/// Held by a test that drops the kernel's caches, or that counts on
/// them staying, so that no other test of this file drops them meanwhile.
fn kernel_caches() -> std::sync::MutexGuard<'static, ()> {
    static CACHES: std::sync::Mutex<()> = std::sync::Mutex::new(());
    CACHES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Drop the kernel's dentries and inodes (`drop_caches` 2), with
/// `kernel_caches` held.
fn drop_dentries() {
    fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
}

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

/// A read-write mount in the foreground; `unmount` waits for the daemon
/// to flush and exit.
struct RwMount {
    child: Option<Child>,
    guard: Option<Mounted>,
    log: PathBuf,
}

impl RwMount {
    fn new(img: &Path, mnt: &Path, opts: &str) -> RwMount {
        RwMount::with_env(img, mnt, opts, &[])
    }

    /// `new`, with fuser logging every request the kernel sends.
    fn with_request_log(img: &Path, mnt: &Path, opts: &str) -> RwMount {
        RwMount::with_env(img, mnt, opts, &[("RUST_LOG", "info,fuser::request=debug")])
    }

    fn with_env(img: &Path, mnt: &Path, opts: &str, env: &[(&str, &str)]) -> RwMount {
        let log = mnt.with_extension("log");
        let opts = format!(
            "rw,sync_interval=0{}{opts}",
            if opts.is_empty() { "" } else { "," }
        );
        let (child, guard) = mount_foreground_env(img.to_str().unwrap(), mnt, &log, &opts, env);
        RwMount {
            child: Some(child),
            guard: Some(guard),
            log,
        }
    }

    /// The log's length now: where `requests_since` starts.
    fn log_len(&self) -> usize {
        fs::read(&self.log).map(|l| l.len()).unwrap_or(0)
    }

    /// What the daemon logged (the kernel's requests, with
    /// `with_request_log`) since `from`.
    fn requests_since(&self, from: usize) -> String {
        let log = fs::read(&self.log).unwrap();
        String::from_utf8_lossy(&log[from.min(log.len())..]).into_owned()
    }
}

/// The lines of `log` that hold every one of `parts` (a request's
/// opcode, its node, its name).
fn count_lines(log: &str, parts: &[&str]) -> usize {
    log.lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .count()
}

impl RwMount {
    fn unmount(mut self) {
        let guard = self.guard.take().expect("mounted");
        umount_settled(&guard.mnt);
        let mut child = self.child.take().expect("running");
        let status = wait_exit(&mut child, Duration::from_secs(30));
        assert!(
            status.success(),
            "mount.hammer2 exited {status}:\n{}",
            fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

impl Drop for RwMount {
    fn drop(&mut self) {
        drop(self.guard.take());
        if let Some(mut c) = self.child.take() {
            let _ = wait_exit(&mut c, Duration::from_secs(30));
        }
    }
}

/// Deterministic bytes no compressor shrinks (xorshift).
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn open_rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

/// `st_blocks` in bytes, asked of the daemon (`stat --cached=never`,
/// i.e. statx with AT_STATX_FORCE_SYNC: the kernel would otherwise
/// answer from attributes it cached before a flush, for up to the
/// attribute timeout).
fn stored(p: &Path) -> u64 {
    let out = Command::new("stat")
        .args(["--cached=never", "-c", "%b %B"])
        .arg(p)
        .output()
        .expect("run stat");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stat {}: {out:?}", p.display());
    let mut f = text.split_whitespace().map(|w| w.parse::<u64>().unwrap());
    f.next().unwrap() * f.next().unwrap()
}

/// The read view of PFS `label` of an image (not mounted read-write).
fn pfs_of(img: &Path, label: &str) -> hammer2::Pfs {
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(img, false).expect("open image"));
    let vol = Arc::new(hammer2::Volume::open(dev).expect("open volume"));
    hammer2::Pfs::open(vol, label).expect("open PFS")
}

/// The physical bytes of every block below a file's inode, summed from
/// the blockrefs on disk (the inode's blockset and, recursively, its
/// indirect blocks), without the statistics the flush stores.
fn walked_bytes(pfs: &hammer2::Pfs, path: &str) -> u64 {
    fn sum(vol: &hammer2::Volume, set: &[Blockref]) -> u64 {
        let mut n = 0;
        for br in set.iter().filter(|b| !b.is_empty()) {
            n += br.data_off.bytes();
            if br.btype == BlockrefType::Indirect {
                n += sum(
                    vol,
                    &hammer2::chain::read_node(vol, br).expect("indirect block"),
                );
            }
        }
        n
    }
    let ino = pfs.resolve(path).expect("resolve");
    sum(pfs.volume(), &ino.blockset())
}

/// `st_blocks` is the space the file's blocks take, not its size: a
/// 20 MiB file holding 8 KiB, a 2^63 - 1 byte sparse file, a file
/// overwritten in place, truncated, embedded in its inode. Right after a
/// write a block counts at its uncompressed size in place of the one it
/// replaces (documented); after the flush the figure is exact, checked
/// against a walk of the blockrefs on disk after unmount, and the
/// read-only mount reports the same.
#[test]
fn st_blocks_count_the_space_stored() {
    require_fuse();
    let img = new_volume("blocks", 4);
    let mnt = scratch("blocks-mnt");
    let m = RwMount::new(&img, &mnt, "");
    let p = |s: &str| mnt.join(s);

    // 20 MiB long, one 8 KiB run at 1 MiB: one 64 KiB block waiting.
    let f = open_rw(&p("sparse20"));
    f.set_len(20 * MIB).unwrap();
    f.write_all_at(&noise(1, 8192), MIB).unwrap();
    assert_eq!(stored(&p("sparse20")), 64 * KIB, "one pending block");
    // The largest size, 4 KiB written near its middle.
    let huge = open_rw(&p("huge"));
    huge.set_len(i64::MAX as u64).unwrap();
    huge.write_all_at(&noise(2, 4096), 1 << 62).unwrap();
    assert_eq!(stored(&p("huge")), 64 * KIB, "one pending block");
    // 1 MiB of noise: 16 blocks of 64 KiB, stored as they are.
    fs::write(p("full"), noise(3, MIB as usize)).unwrap();
    assert_eq!(stored(&p("full")), MIB);
    // Embedded in the inode, and empty.
    fs::write(p("small"), b"small").unwrap();
    File::create(p("empty")).unwrap();
    fs::create_dir(p("dir")).unwrap();

    f.sync_all().unwrap();
    let sparse20 = stored(&p("sparse20"));
    assert!(
        (1..=16 * KIB).contains(&sparse20),
        "8 KiB of noise and 56 KiB of zeros compress to at most 16 KiB: {sparse20}"
    );
    // 16 blocks do not fit the inode's 4 blockrefs: a 16 KiB indirect
    // block holds them.
    assert_eq!(stored(&p("full")), MIB + 16 * KIB);
    assert_eq!(stored(&p("small")), 0);
    assert_eq!(stored(&p("empty")), 0);
    assert_eq!(stored(&p("dir")), KIB, "a directory: one inode block");

    // Overwriting a flushed block in place: the pending copy replaces
    // it, nothing is counted twice.
    let full = open_rw(&p("full"));
    full.write_all_at(&noise(4, 64 * 1024), 3 * 64 * KIB)
        .unwrap();
    assert_eq!(stored(&p("full")), MIB + 16 * KIB);
    // Truncated: the blocks past the end go at once.
    fs::write(p("gone"), noise(5, 256 * 1024)).unwrap();
    full.sync_all().unwrap();
    assert_eq!(stored(&p("gone")), 256 * KIB);
    open_rw(&p("gone")).set_len(0).unwrap();
    assert_eq!(stored(&p("gone")), 0);

    let names = ["sparse20", "huge", "full", "small", "empty", "gone"];
    let rw: Vec<u64> = names.iter().map(|n| stored(&p(n))).collect();
    drop((f, huge, full));
    m.unmount();

    let pfs = pfs_of(&img, "DATA");
    for (name, got) in names.iter().zip(&rw) {
        assert_eq!(*got, walked_bytes(&pfs, name), "{name}: st_blocks * 512");
    }
    let walked_huge = walked_bytes(&pfs, "huge");
    assert!(walked_huge < MIB, "huge: {walked_huge}");

    let _ro = Mounted::new(img.to_str().unwrap(), &mnt, &["-o", "ro"]);
    for (name, got) in names.iter().zip(&rw) {
        assert_eq!(stored(&p(name)), *got, "{name}: read-only");
    }
    assert_eq!(stored(&p("dir")), KIB);
}

/// SEEK_DATA and SEEK_HOLE at `at` in `f`: the offset, or the errno.
fn seeks(f: &File, at: u64) -> (Result<u64, i32>, Result<u64, i32>) {
    let one = |w| {
        nix::unistd::lseek(f, at as i64, w)
            .map(|o| o as u64)
            .map_err(|e| e as i32)
    };
    (
        one(nix::unistd::Whence::SeekData),
        one(nix::unistd::Whence::SeekHole),
    )
}

const B: u64 = 64 * KIB;

/// A file of the seek test: name, size, data ranges written.
type Layout = (&'static str, u64, Vec<(u64, u64)>);

fn seek_layout() -> Vec<Layout> {
    vec![
        // data, hole, data (a partial block), hole to the end
        ("holes", 4 * MIB, vec![(0, B), (MIB, MIB + B + 1)]),
        // a hole first, data to the end
        ("tail", 3 * B, vec![(2 * B + 10, 3 * B)]),
        ("allhole", 5 * MIB, vec![]),
        ("small", 100, vec![(0, 100)]),
    ]
}

/// The answers the layout implies, as POSIX describes them: SEEK_DATA
/// is the first offset at or after `at` inside a written 64 KiB block,
/// SEEK_HOLE the first outside one (the size counts as a hole); ENXIO at
/// or past the size, and for SEEK_DATA with no data after.
fn expected(size: u64, data: &[(u64, u64)], at: u64) -> (Result<u64, i32>, Result<u64, i32>) {
    let enxio = Err(libc::ENXIO);
    if at >= size {
        return (enxio, enxio);
    }
    let embedded = size <= 512;
    let is_data = |o: u64| {
        embedded
            || data
                .iter()
                .any(|&(a, b)| o / B >= a / B && o / B <= (b - 1) / B)
    };
    let block_end = |o: u64| if embedded { size } else { (o / B + 1) * B };
    let mut o = at;
    let mut d = None;
    while o < size {
        if is_data(o) {
            d = Some(o);
            break;
        }
        o = block_end(o);
    }
    let mut o = at;
    while o < size && is_data(o) {
        o = block_end(o);
    }
    (d.ok_or(libc::ENXIO), Ok(o.min(size)))
}

fn probe_offsets(size: u64) -> Vec<u64> {
    let mut v = vec![
        0,
        1,
        B - 1,
        B,
        B + 5,
        2 * B,
        2 * B + 11,
        MIB - 1,
        MIB,
        MIB + B,
    ];
    v.extend([
        MIB + B + 1,
        MIB + 2 * B,
        3 * MIB,
        size.saturating_sub(1),
        size,
    ]);
    v.extend([size + 1, 99, 100]);
    v
}

fn check_seeks(dir: &Path, view: &str) {
    for (name, size, data) in seek_layout() {
        let f = File::open(dir.join(name)).unwrap();
        for at in probe_offsets(size) {
            assert_eq!(
                seeks(&f, at),
                expected(size, &data, at),
                "{view}: {name} at {at}"
            );
        }
    }
}

/// SEEK_DATA and SEEK_HOLE answer the same on a read-write mount (before
/// and after the flush), a read-only mount and in `.snapshot`, and what
/// the layout written implies.
#[test]
fn seek_data_and_hole_answer_the_same_on_every_view() {
    require_fuse();
    let img = new_volume("seek", 4);
    let mnt = scratch("seek-mnt");
    let m = RwMount::new(&img, &mnt, "");
    for (name, size, data) in seek_layout() {
        let f = open_rw(&mnt.join(name));
        f.set_len(size).unwrap();
        for (i, (a, b)) in data.into_iter().enumerate() {
            f.write_all_at(&noise(i as u64 + 1, (b - a) as usize), a)
                .unwrap();
        }
    }
    check_seeks(&mnt, "read-write, unflushed");
    File::open(&mnt).unwrap().sync_all().unwrap();
    check_seeks(&mnt, "read-write, flushed");
    m.unmount();

    // A snapshot of DATA, for `.snapshot`.
    {
        let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&img, true).unwrap());
        let mut m = hammer2::mount::Mount::open(dev).unwrap();
        m.snapshot("DATA", "S", 1).unwrap();
        m.flush().unwrap();
    }
    let _ro = Mounted::new(img.to_str().unwrap(), &mnt, &["-o", "ro,snapdir"]);
    check_seeks(&mnt, "read-only");
    check_seeks(&mnt.join(".snapshot/S"), "read-only .snapshot");
}

/// The errno of a failed call.
fn errno_of<T: std::fmt::Debug>(r: nix::Result<T>) -> i32 {
    r.expect_err("should have failed") as i32
}

/// Run `sh -c script` in `dir`, as `who` (setpriv arguments).
fn sh_as(dir: &Path, who: &[&str], script: &str) -> std::process::Output {
    Command::new("setpriv")
        .args(who)
        .args(["sh", "-c", script])
        .current_dir(dir)
        .output()
        .expect("run setpriv")
}

/// The names in a directory.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// Snapshot PFS DATA of an image (not mounted) as `name`, through the
/// library.
fn snapshot_offline(img: &Path, name: &str) {
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(img, true).unwrap());
    let mut m = hammer2::mount::Mount::open(dev).unwrap();
    m.snapshot("DATA", name, 1).unwrap();
    m.flush().unwrap();
}

/// With `-o snapdir`, `.snapshot` at the root is the snapshots'
/// directory and nothing else: a PFS whose root has a real `.snapshot`
/// is not mounted with snapdir (read-write or read-only); on a snapdir
/// mount the name is never listed, cannot be made (EEXIST), removed or
/// renamed (EROFS), and `rm -rf` of it deletes nothing.
#[test]
fn snapdir_and_a_real_snapshot_entry_never_meet() {
    require_fuse();
    let img = new_volume("snapdir-real", 4);
    let mnt = scratch("snapdir-real-mnt");
    let m = RwMount::new(&img, &mnt, "");
    fs::create_dir(mnt.join(".snapshot")).unwrap();
    fs::write(mnt.join(".snapshot/keep"), b"kept").unwrap();
    m.unmount();

    for opts in ["rw,snapdir", "ro,snapdir"] {
        // Unmounted again should it mount.
        let _guard = Mounted::adopt(&mnt);
        let out = run(&["-o", opts, img.to_str().unwrap(), mnt.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(32), "{opts}: {err}");
        assert!(err.contains("real .snapshot"), "{opts}: {err}");
        assert!(!is_mounted(&mnt));
    }

    let m = RwMount::new(&img, &mnt, "");
    fs::rename(mnt.join(".snapshot"), mnt.join("real")).unwrap();
    m.unmount();
    snapshot_offline(&img, "S");

    let m = RwMount::new(&img, &mnt, "snapdir");
    let p = |s: &str| mnt.join(s);
    assert_eq!(names(&mnt), ["real"]);
    assert!(fs::metadata(p(".snapshot")).unwrap().is_dir());
    assert_eq!(names(&p(".snapshot")), ["S"]);
    assert_eq!(
        errno_of(nix::unistd::mkdir(
            &p(".snapshot"),
            nix::sys::stat::Mode::from_bits_truncate(0o755)
        )),
        libc::EEXIST
    );
    assert_eq!(
        std::os::unix::fs::symlink("real", p(".snapshot"))
            .unwrap_err()
            .raw_os_error()
            .unwrap(),
        libc::EEXIST
    );
    fs::write(p("f"), b"f").unwrap();
    assert_eq!(
        fs::hard_link(p("f"), p(".snapshot"))
            .unwrap_err()
            .raw_os_error()
            .unwrap(),
        libc::EEXIST
    );
    let rmdir = fs::remove_dir(p(".snapshot")).unwrap_err();
    assert_eq!(rmdir.raw_os_error(), Some(libc::EROFS));
    // (A file over it is the kernel's EISDIR.)
    for (from, to, errno) in [
        (".snapshot", "x", libc::EROFS),
        ("real", ".snapshot", libc::EROFS),
        ("f", ".snapshot", libc::EISDIR),
    ] {
        let e = fs::rename(p(from), p(to)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(errno), "rename {from} {to}");
    }
    let out = Command::new("rm")
        .arg("-rf")
        .arg(p(".snapshot"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "rm -rf .snapshot succeeded");
    assert_eq!(names(&p(".snapshot")), ["S"]);
    assert_eq!(names(&mnt), ["f", "real"]);
    m.unmount();

    let pfs = pfs_of(&img, "DATA");
    let keep = pfs.resolve("real/keep").expect("real/keep");
    assert_eq!(pfs.read_all(&keep).unwrap(), b"kept");
    assert!(pfs.resolve(".snapshot").is_err());
}

/// `.snapshot` is a name in the root as any other: looking it up needs
/// search permission on the root, whoever checks it (the daemon without
/// `default_permissions`, the kernel with it).
#[test]
fn the_snapshot_directory_needs_search_permission_on_the_root() {
    require_fuse();
    let nobody = ["--reuid=65534", "--regid=65534", "--clear-groups"];
    for opts in [
        "allow_other,snapdir",
        "allow_other,default_permissions,snapdir",
    ] {
        let img = new_volume(&format!("snapsearch-{opts}"), 4);
        let mnt = scratch(&format!("snapsearch-mnt-{opts}"));
        let m = RwMount::new(&img, &mnt, opts);
        fs::write(mnt.join("f"), b"f").unwrap();
        // Refused first, with nothing in the kernel's cache: a name
        // looked up (or made) there is not asked for again for a while.
        let caches = kernel_caches();
        drop_dentries();
        drop(caches);
        fs::set_permissions(&mnt, fs::Permissions::from_mode(0o700)).unwrap();
        let stat = |name: &str| {
            sh_as(&mnt, &nobody, &format!("stat {name}"))
                .status
                .success()
        };
        assert!(!stat("f"), "{opts}: f in a root others may not search");
        assert!(!stat(".snapshot"), "{opts}: .snapshot there");
        fs::set_permissions(&mnt, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(stat("f"), "{opts}: f");
        assert!(stat(".snapshot"), "{opts}: .snapshot");
        m.unmount();
    }
}

/// Without `default_permissions` the daemon applies the rules the kernel
/// would: a user may hard-link a file they neither own nor may read and
/// write only when `fs.protected_hardlinks` is 0 (set-user-ID files and
/// set-group-ID executables never); supplementary groups count for the
/// group bits. The same answers with the kernel checking.
#[test]
fn hard_links_and_groups_follow_the_kernels_rules() {
    require_fuse();
    let protected = fs::read_to_string("/proc/sys/fs/protected_hardlinks")
        .expect("read fs.protected_hardlinks")
        .trim()
        != "0";
    let nobody = ["--reuid=65534", "--regid=65534", "--clear-groups"];
    let member = ["--reuid=65534", "--regid=65534", "--groups=4242"];
    for opts in ["allow_other", "allow_other,default_permissions"] {
        let img = new_volume(&format!("links-{opts}"), 4);
        let mnt = scratch(&format!("links-mnt-{opts}"));
        let m = RwMount::new(&img, &mnt, opts);
        let p = |s: &str| mnt.join(s);
        fs::create_dir(p("d")).unwrap();
        fs::set_permissions(p("d"), fs::Permissions::from_mode(0o777)).unwrap();
        for (name, mode) in [
            ("secret", 0o600),
            ("open", 0o666),
            ("suid", 0o4777),
            ("sgid", 0o2777),
        ] {
            fs::write(p(name), name).unwrap();
            fs::set_permissions(p(name), fs::Permissions::from_mode(mode)).unwrap();
        }
        fs::write(p("grp"), "grp").unwrap();
        std::os::unix::fs::chown(p("grp"), Some(0), Some(4242)).unwrap();
        fs::set_permissions(p("grp"), fs::Permissions::from_mode(0o660)).unwrap();

        let link = |who: &[&str], src: &str, dst: &str| {
            sh_as(&mnt, who, &format!("ln {src} d/{dst}"))
                .status
                .success()
        };
        assert_eq!(link(&nobody, "secret", "l1"), !protected, "{opts}: secret");
        assert!(link(&nobody, "open", "l2"), "{opts}: open");
        assert_eq!(
            link(&nobody, "suid", "l3"),
            !protected,
            "{opts}: set-user-ID"
        );
        assert_eq!(
            link(&nobody, "sgid", "l4"),
            !protected,
            "{opts}: set-group-ID executable"
        );
        assert_eq!(
            link(&nobody, "grp", "l5"),
            !protected,
            "{opts}: group file, not a member"
        );
        assert!(link(&member, "grp", "l6"), "{opts}: group file, a member");
        assert!(
            sh_as(&mnt, &member, "cat grp").status.success(),
            "{opts}: member reads"
        );
        assert!(
            !sh_as(&mnt, &nobody, "cat grp").status.success(),
            "{opts}: other reads"
        );
        m.unmount();
    }
}

/// HAMMER2 stores times as signed microseconds since 1970, a time before
/// 1970 in two's complement as DragonFly writes it: -1.5 s set through
/// utimensat reads back as -1.5 s, before and after a remount, and lands
/// on disk as DragonFly's `(u64)-2 * 1000000 + 500000`. A time past what
/// 64 bits of microseconds hold is clamped to the nearest one they hold,
/// and the daemon says so in its log. `hammer2 recover` copies the time.
#[test]
fn times_before_1970_are_kept_and_outside_the_format_clamped() {
    require_fuse();
    let img = new_volume("times", 4);
    let mnt = scratch("times-mnt");
    let log = mnt.with_extension("log");
    let m = RwMount::new(&img, &mnt, "");
    let p = |s: &str| mnt.join(s);
    for f in ["old", "far", "early"] {
        fs::write(p(f), b"x").unwrap();
    }
    let touch = |when: &str, f: &str| {
        let out = Command::new("touch")
            .args(["-d", when])
            .arg(p(f))
            .output()
            .unwrap();
        assert!(out.status.success(), "touch -d {when}: {out:?}");
    };
    // stat(1) asking the daemon, not the kernel's cache.
    let stat = |fmt: &str, f: &str| {
        let out = Command::new("stat")
            .args(["--cached=never", "-c", fmt])
            .arg(p(f))
            .output()
            .unwrap();
        assert!(out.status.success(), "stat {f}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    touch("@-1.5", "old");
    assert_eq!(stat("%.9X %.9Y", "old"), "-1.500000000 -1.500000000");
    touch("@20000000000000", "far");
    assert_eq!(stat("%.6Y", "far"), "9223372036854.775807");
    touch("@-20000000000000", "early");
    assert_eq!(stat("%.6Y", "early"), "-9223372036854.775808");
    let logged = fs::read_to_string(&log).unwrap();
    assert!(logged.contains("outside what HAMMER2 stores"), "{logged}");
    m.unmount();
    let pfs = pfs_of(&img, "DATA");
    let meta = |f: &str| *pfs.resolve(f).unwrap().meta();
    let dragonfly = 0u64.wrapping_sub(2 * 1_000_000).wrapping_add(500_000);
    assert_eq!(
        (meta("old").atime, meta("old").mtime),
        (dragonfly, dragonfly)
    );
    assert_eq!(meta("far").mtime, 0x7fff_ffff_ffff_ffff);
    assert_eq!(meta("early").mtime, 0x8000_0000_0000_0000);
    drop(pfs);
    let m = RwMount::new(&img, &mnt, "ro");
    assert_eq!(stat("%.9X %.9Y", "old"), "-1.500000000 -1.500000000");
    assert_eq!(stat("%.6Y", "early"), "-9223372036854.775808");
    m.unmount();
    // hammer2 recover gives the copy the same time.
    let dest = scratch("times-recovered");
    let out = hammer2_tool(&[os("recover"), img.as_os_str(), dest.as_os_str()]);
    assert!(out.status.success(), "hammer2 recover: {out:?}");
    let copy = fs::metadata(dest.join("DATA/old")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((copy.mtime(), copy.mtime_nsec()), (-2, 500_000_000));
}

/// The `hammer2` tool, built beside mount.hammer2.
fn hammer2_tool(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let bin = Path::new(BIN).with_file_name("hammer2");
    assert!(
        bin.exists(),
        "{} is missing: build the tools first (cargo build --workspace --bins)",
        bin.display()
    );
    Command::new(bin).args(args).output().expect("run hammer2")
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// Names: `mount.hammer2 mail@x.img MNT` mounts the file of that name;
/// through the mount, snapshot names `.`, `..` and ones with a newline
/// are refused; `hammer2 snapshot MNT/.snapshot/S X` snapshots S (not
/// the mounted PFS), with S's name in the default one; `.snapshot`
/// itself is no PFS to snapshot, and setcomp there is refused.
#[test]
fn names_and_snapshots_through_the_mount() {
    require_fuse();
    let dir = scratch("names");
    let img = dir.join("mail@x.img");
    fs::rename(new_volume("names-img", 4), &img).unwrap();
    let mnt = scratch("names-mnt");
    let m = RwMount::new(&img, &mnt, "snapdir");
    let p = |s: &str| mnt.join(s);
    fs::write(p("v"), b"one").unwrap();
    let tool = |args: &[&std::ffi::OsStr]| hammer2_tool(args);
    let ok = |args: &[&std::ffi::OsStr]| {
        let out = tool(args);
        assert!(out.status.success(), "hammer2 {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let refused = |args: &[&std::ffi::OsStr], why: &str| {
        let out = tool(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "hammer2 {args:?}: {err}");
        assert!(err.contains(why), "hammer2 {args:?}: {err}");
    };
    ok(&[os("snapshot"), mnt.as_os_str(), os("S")]);
    fs::write(p("v"), b"two").unwrap();
    for bad in [".", "..", "a\nb"] {
        refused(&[os("snapshot"), mnt.as_os_str(), os(bad)], "PFS label");
    }
    // Under .snapshot/S: a snapshot of S.
    ok(&[os("snapshot"), p(".snapshot/S").as_os_str(), os("X")]);
    assert_eq!(fs::read(p(".snapshot/X/v")).unwrap(), b"one");
    let out = ok(&[os("snapshot"), p(".snapshot/S/v").as_os_str()]);
    assert!(out.starts_with("created snapshot S."), "{out}");
    refused(
        &[os("snapshot"), p(".snapshot").as_os_str(), os("Y")],
        ".snapshot is not a PFS",
    );
    refused(
        &[os("setcomp"), os("lz4"), p(".snapshot/S/v").as_os_str()],
        "read-only",
    );
    m.unmount();
    let labels: Vec<String> = hammer2::pfs::pfs_list(pfs_of(&img, "DATA").volume())
        .unwrap()
        .into_iter()
        .map(|p| p.label)
        .collect();
    assert!(
        !labels
            .iter()
            .any(|l| l == "Y" || l == "." || l.contains('\n')),
        "{labels:?}"
    );
    let _ro = Mounted::new(img.to_str().unwrap(), &mnt, &["-o", "ro"]);
    assert_eq!(fs::read(p("v")).unwrap(), b"two");
}

/// HAMMER2 keeps no extended attributes: every xattr call fails as it
/// does on a Linux filesystem without them (EOPNOTSUPP; an empty list),
/// and the daemon is asked once. The kernel's own requests, as fuser logs
/// each one it receives, are the count: before, each write cost a
/// GETXATTR of `security.capability` more.
#[test]
fn extended_attributes_are_refused_and_asked_for_once() {
    require_fuse();
    let img = new_volume("xattr", 1);
    let mnt = scratch("xattr-mnt");
    let m = RwMount::with_request_log(&img, &mnt, "");
    let p = mnt.join("f");
    let f = open_rw(&p);
    for i in 0..32u64 {
        f.write_all_at(&noise(i, 4096), i * 4096).unwrap();
    }
    let mut buf = [0u8; 64];
    for name in ["user.a", "security.capability", "trusted.t"] {
        let e = rustix::fs::getxattr(&p, name, &mut buf).unwrap_err();
        assert_eq!(e, rustix::io::Errno::OPNOTSUPP, "getxattr {name}");
    }
    let e = rustix::fs::setxattr(&p, "user.a", b"v", rustix::fs::XattrFlags::empty()).unwrap_err();
    assert_eq!(e, rustix::io::Errno::OPNOTSUPP, "setxattr");
    let e = rustix::fs::removexattr(&p, "user.a").unwrap_err();
    assert_eq!(e, rustix::io::Errno::OPNOTSUPP, "removexattr");
    let mut list = [0u8; 64];
    assert_eq!(rustix::fs::listxattr(&p, &mut list).unwrap(), 0, "no names");
    drop(f);
    let log = m.requests_since(0);
    let writes = count_lines(&log, &[" WRITE "]);
    let asks = count_lines(&log, &[" GETXATTR "]);
    assert!(
        writes >= 32,
        "the log shows the kernel's requests ({writes} writes)"
    );
    assert_eq!(asks, 1, "getxattr asked once in {writes} writes");
    m.unmount();
    let _ = fs::remove_file(&img);
}

/// close(2) asks the daemon (FUSE_FLUSH) only for a descriptor that may
/// write, the one whose close can report a failed flush: read-only
/// opens say FOPEN_NOFLUSH, and the kernel's requests, as fuser logs
/// them, show 2 flushes for 2 writable opens among 11.
#[test]
fn only_writable_descriptors_are_flushed_at_close() {
    require_fuse();
    let img = new_volume("noflush", 1);
    let mnt = scratch("noflush-mnt");
    let m = RwMount::with_request_log(&img, &mnt, "");
    let p = mnt.join("f");
    fs::write(&p, b"data").unwrap();
    let ino = fs::metadata(&p).unwrap().ino();
    let from = m.log_len();
    for _ in 0..8 {
        assert_eq!(fs::read(&p).unwrap(), b"data");
    }
    for _ in 0..2 {
        let f = fs::OpenOptions::new().append(true).open(&p).unwrap();
        (&f).write_all(b"+").unwrap();
    }
    assert_eq!(fs::read(&p).unwrap(), b"data++");
    let log = m.requests_since(from);
    let node = format!("ino {ino:#018x} ");
    let count = |op: &str| count_lines(&log, &[&node, op]);
    assert_eq!(
        count(" OPEN "),
        11,
        "the log shows the kernel's requests:\n{log}"
    );
    assert_eq!(count(" FLUSH "), 2, "flushes:\n{log}");
    m.unmount();
    let _ = fs::remove_file(&img);
}

/// A name of the PFS stays valid in the kernel once looked up, listed
/// or made: a stat of it seconds later asks no LOOKUP (only its
/// attributes, which keep one second). The snapshot layer's names,
/// which change behind the kernel's back, are asked again after a
/// second. Counted in fuser's log of the kernel's requests.
#[test]
fn names_outlive_their_attributes_but_snapshot_names_do_not() {
    require_fuse();
    let img = new_volume("entry-ttl", 1);
    let mnt = scratch("entry-ttl-mnt");
    let m = RwMount::with_request_log(&img, &mnt, "snapdir");
    let _caches = kernel_caches();
    let p = |s: &str| mnt.join(s);
    fs::create_dir(p("d")).unwrap();
    fs::create_dir(p("e")).unwrap();
    fs::write(p("d/found"), b"y").unwrap();
    fs::write(p("e/listed"), b"z").unwrap();
    // The kernel forgets the names; "found" is then looked up, "listed"
    // listed (READDIRPLUS) and "made" made.
    drop_dentries();
    assert_eq!(fs::metadata(p("d/found")).unwrap().len(), 1);
    assert_eq!(fs::read_dir(p("e")).unwrap().count(), 1);
    fs::write(p("d/made"), b"x").unwrap();
    assert!(fs::metadata(p(".snapshot")).unwrap().is_dir());
    let from = m.log_len();
    std::thread::sleep(Duration::from_millis(1500));
    for name in ["d/found", "d/made", "e/listed", ".snapshot"] {
        fs::metadata(p(name)).unwrap();
    }
    let log = m.requests_since(from);
    let lookups = |name: &str| count_lines(&log, &[&format!(" LOOKUP name {name:?}")]);
    for name in ["d", "e", "found", "made", "listed"] {
        assert_eq!(lookups(name), 0, "{name} looked up again:\n{log}");
    }
    assert_eq!(lookups(".snapshot"), 1, "the snapshot layer's name:\n{log}");
    m.unmount();
    let _ = fs::remove_file(&img);
}
