//! mount.hammer2 -o rw end to end, through the kernel: trees copied in
//! with cp -a, tar and rsync read back identical after unmount and
//! remount (treecheck against the fixture's manifest, and against a
//! manifest of a generated tree with owners, modes, times, sparse files
//! and hard links); every operation (rename with its flags, link,
//! unlink, rmdir, symlink, mknod, truncate, fallocate, hole punch,
//! SEEK_DATA/SEEK_HOLE, copy_file_range, chmod/chown/utimes, setgid
//! directories) with its result checked, before and after a remount; an
//! open unlinked file works until it is closed; a second read-write mount
//! of an image is refused; SIGTERM and the sync interval flush. Every
//! test ends with fsck of the image.
//!
//! These tests need root and /dev/fuse (and rsync), and fail (not skip)
//! without them. Read-write mounts run in the foreground (`-f`), so a
//! test can wait for the daemon's last flush (it exits after it) before
//! it looks at the image.

mod common;
use common::*;

use bufcache::{BlockDevice, FileDevice};
use nix::fcntl::{FallocateFlags, RenameFlags, AT_FDCWD};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::Whence;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{
    chown, lchown, symlink, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt,
};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

/// The reference image copied in: the full tree.
const FIXTURE: &str = "v1-lz4-xxhash64";

const B: u64 = 65536;

/// A read-write mount in the foreground; `unmount` waits for the daemon
/// to flush and exit.
struct RwMount {
    child: Option<Child>,
    guard: Option<Mounted>,
    log: PathBuf,
}

impl RwMount {
    fn new(img: &Path, mnt: &Path, extra: &str) -> RwMount {
        let log = mnt.with_extension("log");
        let opts = if extra.is_empty() {
            "rw".to_string()
        } else {
            format!("rw,{extra}")
        };
        let (child, guard) = mount_foreground(img.to_str().unwrap(), mnt, &log, &opts);
        RwMount {
            child: Some(child),
            guard: Some(guard),
            log,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    /// umount, then the daemon's last flush and exit 0.
    fn unmount(mut self) {
        let guard = self.guard.take().expect("mounted");
        umount_settled(&guard.mnt);
        self.wait_exit();
    }

    fn wait_exit(&mut self) {
        let mut child = self.child.take().expect("running");
        let status = common::wait_exit(&mut child, Duration::from_secs(30));
        assert!(
            status.success(),
            "mount.hammer2 exited {status}:\n{}",
            self.log()
        );
    }
}

impl Drop for RwMount {
    fn drop(&mut self) {
        drop(self.guard.take());
        if let Some(mut c) = self.child.take() {
            for _ in 0..250 {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn sh(script: &str) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "{script}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// treecheck.py compare `dir` against `manifest` (PFS `label`).
fn treecheck(dir: &Path, manifest: &Path, label: &str) {
    let out = Command::new("python3")
        .arg(TREECHECK)
        .arg("compare")
        .arg(dir)
        .arg(manifest)
        .arg(label)
        .output()
        .expect("run python3 treecheck.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    println!("treecheck {}: {last}", dir.display());
    assert!(
        out.status.success() && last.ends_with(" entries, 0 differ"),
        "treecheck {} failed:\n{stdout}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deterministic bytes (xorshift), for file contents.
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

fn set_mtime(p: &Path, secs: i64) {
    let t = TimeSpec::new(secs, 0);
    nix::sys::stat::utimensat(AT_FDCWD, p, &t, &t, UtimensatFlags::NoFollowSymlink)
        .expect("utimensat");
}

/// A tree with what the fixture lacks: owners other than root, setgid
/// and sticky directories, sparse files, hard links, a directory of a
/// few hundred entries, times of every entry set.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::create_dir(root.join("many")).unwrap();
    fs::create_dir(root.join("sticky")).unwrap();
    fs::create_dir(root.join("setgid")).unwrap();
    for (i, size) in [0usize, 1, 511, 512, 513, 4096, 65535, 65536, 65537, 200_000]
        .into_iter()
        .enumerate()
    {
        fs::write(root.join(format!("a/f{size}")), noise(i as u64, size)).unwrap();
    }
    fs::write(root.join("a/b/c/text"), "hammer2 ".repeat(100_000)).unwrap();
    for i in 0..300 {
        fs::write(root.join(format!("many/entry-{i:04}")), format!("{i}\n")).unwrap();
    }
    // Sparse: data, a 3 MiB hole, data; and a file that is all hole.
    let f = File::create(root.join("a/sparse")).unwrap();
    f.write_all_at(&noise(7, 70_000), 0).unwrap();
    f.write_all_at(b"tail", 3 << 20).unwrap();
    File::create(root.join("a/hole"))
        .unwrap()
        .set_len(5 << 20)
        .unwrap();
    fs::hard_link(root.join("a/f4096"), root.join("a/b/hardlink")).unwrap();
    symlink("../f511", root.join("a/b/up")).unwrap();
    symlink("x".repeat(700), root.join("a/longlink")).unwrap();
    fs::write(root.join("setgid/owned"), "owned\n").unwrap();
    chown(root.join("setgid/owned"), Some(1234), Some(5678)).unwrap();
    lchown(root.join("a/b/up"), Some(42), Some(43)).unwrap();
    chown(root.join("a/b"), Some(1000), Some(1000)).unwrap();
    let modes = [
        ("a/f1", 0o600),
        ("a/f511", 0o4755),
        ("a/f512", 0o2711),
        ("sticky", 0o1777),
        ("setgid", 0o2775),
        ("a/b/c", 0o700),
    ];
    for (p, mode) in modes {
        fs::set_permissions(root.join(p), fs::Permissions::from_mode(mode)).unwrap();
    }
    // Times: every entry, deepest first so directories keep theirs.
    let mut all: Vec<PathBuf> = walk(root);
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, p) in all.iter().enumerate() {
        set_mtime(p, 1_500_000_000 + i as i64 * 3600);
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

/// treecheck's manifest of `dir` as PFS `label`, in a file.
fn manifest_of(dir: &Path, label: &str, out: &Path) {
    let o = Command::new("python3")
        .arg(TREECHECK)
        .arg("manifest")
        .arg(dir)
        .output()
        .expect("run treecheck manifest");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tree = String::from_utf8(o.stdout).unwrap();
    fs::write(out, format!("{{\"pfs\": {{\"{label}\": {tree}}}}}")).unwrap();
}

fn require_rsync() {
    let ok = Command::new("rsync")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "the rw tests need rsync: apt-get install rsync (scripts/test does)"
    );
}

/// cp -a, tar and rsync -a copy the fixture's tree (from a read-only
/// mount of it) and a generated tree into a read-write mount; after
/// unmount and a remount both read back exactly as their manifests say,
/// and fsck is clean.
#[test]
fn trees_copied_in_with_cp_tar_and_rsync_read_back_identical() {
    require_fuse();
    require_rsync();
    let img = new_volume("copy", 4);
    let src_mnt = scratch("copy-src");
    let _src = Mounted::new(fixture(FIXTURE).to_str().unwrap(), &src_mnt, &["-o", "ro"]);
    let gen = scratch("copy-gen").join("tree");
    make_tree(&gen);
    let gen_manifest = scratch("copy-gen").join("tree.json");
    manifest_of(&gen, "GEN", &gen_manifest);

    let mnt = scratch("copy-mnt");
    let m = RwMount::new(&img, &mnt, "");
    let (s, g, d) = (src_mnt.display(), gen.display(), mnt.display());
    sh(&format!(
        "cp -a {s} {d}/cp && cp -a {g} {d}/cp-gen && \
         mkdir {d}/tar {d}/tar-gen && \
         tar -C {s} -cf - . | tar -C {d}/tar -xpf - && \
         tar -C {g} -cf - . | tar -C {d}/tar-gen -xpf - && \
         rsync -a {s}/ {d}/rsync/ && rsync -aH {g}/ {d}/rsync-gen/"
    ));
    // Read back through the live mount first.
    treecheck(&mnt.join("rsync"), &manifest_path(FIXTURE), "DATA");
    treecheck(&mnt.join("cp-gen"), &gen_manifest, "GEN");
    m.unmount();
    fsck_spotless(&img);

    let m = RwMount::new(&img, &mnt, "");
    for dir in ["cp", "tar", "rsync"] {
        treecheck(&mnt.join(dir), &manifest_path(FIXTURE), "DATA");
        treecheck(&mnt.join(format!("{dir}-gen")), &gen_manifest, "GEN");
    }
    // Hard links survive cp -a, tar and rsync -H as links.
    for dir in ["cp-gen", "tar-gen", "rsync-gen"] {
        let a = fs::metadata(mnt.join(dir).join("a/f4096")).unwrap();
        let b = fs::metadata(mnt.join(dir).join("a/b/hardlink")).unwrap();
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "{dir}");
    }
    m.unmount();
    fsck_spotless(&img);
}

fn errno_of<T: std::fmt::Debug>(r: nix::Result<T>) -> nix::errno::Errno {
    r.expect_err("expected an error")
}

fn stat(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
}

/// Every namespace and attribute operation through the kernel, checked
/// at once and again after a remount.
#[test]
fn namespace_and_attribute_operations() {
    require_fuse();
    let img = new_volume("ops", 4);
    let mnt = scratch("ops-mnt");
    let m = RwMount::new(&img, &mnt, "");
    let p = |s: &str| mnt.join(s);
    let rename2 = |a: &str, b: &str, f: RenameFlags| {
        nix::fcntl::renameat2(AT_FDCWD, &p(a), AT_FDCWD, &p(b), f)
    };

    fs::create_dir(p("d1")).unwrap();
    fs::create_dir(p("d2")).unwrap();
    fs::create_dir_all(p("d1/sub/deeper")).unwrap();
    fs::write(p("d1/a"), "apple").unwrap();
    fs::write(p("d2/b"), "banana").unwrap();
    fs::write(p("victim"), "to be replaced").unwrap();

    // Names: 255 bytes at most (NAME_MAX), in lookups too.
    let longest = "n".repeat(255);
    fs::write(p(&longest), "ok").unwrap();
    let e = fs::write(p(&"n".repeat(256)), "no").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG));
    let e = fs::metadata(p(&"n".repeat(256))).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG));
    fs::remove_file(p(&longest)).unwrap();
    // A new file's times are all now.
    let st = stat(&p("victim"));
    assert_eq!((st.atime(), st.ctime()), (st.mtime(), st.mtime()));

    // rename: across directories, over a file, a directory to a new
    // parent (its ".." follows), NOREPLACE, EXCHANGE, into itself.
    fs::rename(p("d1/a"), p("d2/a")).unwrap();
    assert_eq!(fs::read(p("d2/a")).unwrap(), b"apple");
    assert!(!p("d1/a").exists());
    let replaced = stat(&p("victim")).ino();
    fs::rename(p("d2/a"), p("victim")).unwrap();
    assert_eq!(fs::read(p("victim")).unwrap(), b"apple");
    assert_ne!(stat(&p("victim")).ino(), replaced);
    fs::rename(p("d1/sub"), p("d2/sub")).unwrap();
    assert_eq!(stat(&p("d2/sub/..")).ino(), stat(&p("d2")).ino());
    assert_eq!(stat(&p("d2/sub/deeper/../..")).ino(), stat(&p("d2")).ino());
    let e = errno_of(rename2("victim", "d2/b", RenameFlags::RENAME_NOREPLACE));
    assert_eq!(e, nix::errno::Errno::EEXIST);
    rename2("victim", "d2/b", RenameFlags::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(p("victim")).unwrap(), b"banana");
    assert_eq!(fs::read(p("d2/b")).unwrap(), b"apple");
    rename2("victim", "d2/sub", RenameFlags::RENAME_EXCHANGE).unwrap();
    assert!(stat(&p("victim")).is_dir() && stat(&p("d2/sub")).is_file());
    assert_eq!(stat(&p("victim/..")).ino(), 1);
    rename2("victim", "d2/sub", RenameFlags::RENAME_EXCHANGE).unwrap();
    let e = fs::rename(p("d2"), p("d2/sub/deeper/d2")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));

    // link and unlink: one inode, two names, counts.
    fs::hard_link(p("d2/b"), p("d1/b-link")).unwrap();
    let (a, b) = (stat(&p("d2/b")), stat(&p("d1/b-link")));
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    fs::remove_file(p("d2/b")).unwrap();
    assert_eq!(stat(&p("d1/b-link")).nlink(), 1);
    assert_eq!(fs::read(p("d1/b-link")).unwrap(), b"apple");
    let e = fs::remove_file(p("d2/b")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    let e = fs::remove_file(p("d2/sub")).unwrap_err();
    assert!(matches!(
        e.raw_os_error(),
        Some(libc::EISDIR) | Some(libc::EPERM)
    ));

    // rmdir: not empty, not a directory, empty.
    let e = fs::remove_dir(p("d2/sub")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY));
    let e = fs::remove_dir(p("d1/b-link")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR));
    fs::remove_dir(p("d2/sub/deeper")).unwrap();
    // Directories report POSIX link counts (2 + subdirectories; HAMMER2
    // stores 1), kept through mkdir, rename across parents, rename over
    // an empty directory, exchange and rmdir.
    assert_eq!(stat(&p("d2/sub")).nlink(), 2);
    let links = |d: &str| stat(&p(d)).nlink();
    let (d1, d2) = (links("d1"), links("d2"));
    fs::create_dir(p("d1/x")).unwrap();
    fs::create_dir(p("d1/y")).unwrap();
    assert_eq!((links("d1"), links("d2")), (d1 + 2, d2));
    fs::rename(p("d1/x"), p("d2/x")).unwrap();
    assert_eq!((links("d1"), links("d2")), (d1 + 1, d2 + 1));
    fs::rename(p("d1/y"), p("d2/x")).unwrap();
    assert_eq!((links("d1"), links("d2")), (d1, d2 + 1));
    fs::write(p("d1/f"), b"f").unwrap();
    rename2("d1/f", "d2/x", RenameFlags::RENAME_EXCHANGE).unwrap();
    assert_eq!((links("d1"), links("d2"), links("d1/f")), (d1 + 1, d2, 2));
    fs::remove_dir(p("d1/f")).unwrap();
    fs::remove_file(p("d2/x")).unwrap();
    assert_eq!((links("d1"), links("d2")), (d1, d2));
    for d in ["", "d1", "d2", "d2/sub"] {
        let subdirs = fs::read_dir(p(d))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_type().unwrap().is_dir())
            .count();
        assert_eq!(links(d), 2 + subdirs as u64, "/{d}");
    }

    // symlinks, short (in the inode) and long (in a data block).
    symlink("d1/b-link", p("short")).unwrap();
    let long = "y/".repeat(600);
    symlink(&long, p("long")).unwrap();
    assert_eq!(fs::read(p("short")).unwrap(), b"apple");
    assert_eq!(fs::read_link(p("long")).unwrap(), Path::new(&long));
    assert!(stat(&p("long")).file_type().is_symlink());

    // mknod: fifo, character and block devices, socket.
    let dev = nix::sys::stat::makedev(8, 17);
    let nodes = [
        ("fifo", SFlag::S_IFIFO, 0),
        ("chr", SFlag::S_IFCHR, nix::sys::stat::makedev(1, 3)),
        ("blk", SFlag::S_IFBLK, dev),
        ("sock", SFlag::S_IFSOCK, 0),
    ];
    for (name, kind, rdev) in nodes {
        nix::sys::stat::mknod(&p(name), kind, Mode::from_bits_truncate(0o640), rdev).unwrap();
    }
    let check_nodes = |mnt: &Path| {
        use std::os::unix::fs::FileTypeExt;
        let t = |n: &str| stat(&mnt.join(n)).file_type();
        assert!(t("fifo").is_fifo());
        assert!(t("chr").is_char_device());
        assert!(t("blk").is_block_device());
        assert!(t("sock").is_socket());
        assert_eq!(stat(&mnt.join("blk")).rdev(), dev);
        assert_eq!(stat(&mnt.join("chr")).rdev(), nix::sys::stat::makedev(1, 3));
        assert_eq!(stat(&mnt.join("fifo")).mode() & 0o7777, 0o640);
    };
    check_nodes(&mnt);

    // chmod, chown, utimes (explicit and UTIME_NOW).
    fs::write(p("attrs"), "x").unwrap();
    fs::set_permissions(p("attrs"), fs::Permissions::from_mode(0o4751)).unwrap();
    // chown clears set-user-ID (the kernel asks for it), even for root.
    chown(p("attrs"), Some(1001), Some(1002)).unwrap();
    assert_eq!(stat(&p("attrs")).mode() & 0o7777, 0o751);
    fs::set_permissions(p("attrs"), fs::Permissions::from_mode(0o4751)).unwrap();
    let t = TimeSpec::new(1_234_567_890, 123_456_000);
    nix::sys::stat::utimensat(AT_FDCWD, &p("attrs"), &t, &t, UtimensatFlags::FollowSymlink)
        .unwrap();
    let check_attrs = |mnt: &Path| {
        let a = stat(&mnt.join("attrs"));
        assert_eq!(a.mode() & 0o7777, 0o4751);
        assert_eq!((a.uid(), a.gid()), (1001, 1002));
        assert_eq!((a.mtime(), a.mtime_nsec()), (1_234_567_890, 123_456_000));
        assert_eq!(a.atime(), 1_234_567_890);
    };
    check_attrs(&mnt);
    let now = TimeSpec::UTIME_NOW;
    nix::sys::stat::utimensat(
        AT_FDCWD,
        &p("fifo"),
        &now,
        &now,
        UtimensatFlags::FollowSymlink,
    )
    .unwrap();
    let age = std::time::SystemTime::now()
        .duration_since(stat(&p("fifo")).modified().unwrap())
        .unwrap_or_default();
    assert!(age < Duration::from_secs(60), "UTIME_NOW set {age:?} ago");

    // A setgid directory: new entries get its group, directories stay
    // setgid.
    fs::create_dir(p("sgid")).unwrap();
    chown(p("sgid"), None, Some(4321)).unwrap();
    fs::set_permissions(p("sgid"), fs::Permissions::from_mode(0o2775)).unwrap();
    fs::write(p("sgid/file"), "g").unwrap();
    fs::create_dir(p("sgid/dir")).unwrap();
    assert_eq!(stat(&p("sgid/file")).gid(), 4321);
    assert_eq!(stat(&p("sgid/dir")).gid(), 4321);
    assert_ne!(stat(&p("sgid/dir")).mode() & 0o2000, 0);

    let st = nix::sys::statvfs::statvfs(&mnt).unwrap();
    assert!(!st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY));
    assert!(st.blocks_free() > 0 && st.blocks_free() <= st.blocks());

    m.unmount();
    fsck_spotless(&img);
    // On disk, directories keep the one link DragonFly gives them.
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&img, false).unwrap());
    let pfs = hammer2::Pfs::open(Arc::new(hammer2::Volume::open(dev).unwrap()), "DATA").unwrap();
    for d in ["", "d1", "d2", "d2/sub"] {
        assert_eq!(pfs.resolve(d).unwrap().meta().nlinks, 1, "/{d}");
    }
    drop(pfs);
    let m = RwMount::new(&img, &mnt, "");
    assert_eq!(fs::read(p("victim")).unwrap(), b"banana");
    assert_eq!(fs::read(p("d1/b-link")).unwrap(), b"apple");
    assert_eq!(stat(&p("d1/b-link")).nlink(), 1);
    assert_eq!(stat(&p("d2/sub/..")).ino(), stat(&p("d2")).ino());
    assert_eq!(fs::read_link(p("long")).unwrap(), Path::new(&long));
    check_nodes(&mnt);
    check_attrs(&mnt);
    assert_eq!(stat(&p("sgid/file")).gid(), 4321);
    m.unmount();
    fsck_spotless(&img);
}

fn seek(f: &File, at: u64, whence: Whence) -> nix::Result<u64> {
    nix::unistd::lseek(f, at as i64, whence).map(|o| o as u64)
}

/// File data: truncate, fallocate (extend, KEEP_SIZE, punch),
/// SEEK_DATA/SEEK_HOLE, copy_file_range; checked at once, after fsync
/// and after a remount.
#[test]
fn file_data_operations() {
    require_fuse();
    let img = new_volume("data", 4);
    let mnt = scratch("data-mnt");
    let m = RwMount::new(&img, &mnt, "");
    let p = |s: &str| mnt.join(s);
    let rw = |s: &str| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(p(s))
            .unwrap()
    };

    // truncate: shrink into a block, grow with a hole, to zero.
    let body = noise(1, 200_000);
    fs::write(p("trunc"), &body).unwrap();
    let t = rw("trunc");
    t.set_len(70_000).unwrap();
    t.set_len(300_000).unwrap();
    drop(t);
    let data = fs::read(p("trunc")).unwrap();
    assert_eq!(data.len(), 300_000);
    assert_eq!(&data[..70_000], &body[..70_000]);
    assert!(data[70_000..].iter().all(|&b| b == 0));
    fs::write(p("empty"), "gone soon").unwrap();
    rw("empty").set_len(0).unwrap();
    assert_eq!(stat(&p("empty")).len(), 0);

    // A sparse file: data in blocks 0 and 4, holes between and after.
    let f = rw("sparse");
    f.write_all_at(&noise(2, B as usize), 0).unwrap();
    f.write_all_at(&noise(3, 1000), 4 * B).unwrap();
    f.set_len(8 * B).unwrap();
    // Written through: the daemon answers from what it holds, before
    // and after the flush.
    for when in ["before fsync", "after fsync"] {
        assert_eq!(seek(&f, 0, Whence::SeekData), Ok(0), "{when}");
        assert_eq!(seek(&f, 10, Whence::SeekHole), Ok(B), "{when}");
        assert_eq!(seek(&f, B, Whence::SeekData), Ok(4 * B), "{when}");
        assert_eq!(seek(&f, 4 * B + 5, Whence::SeekHole), Ok(5 * B), "{when}");
        assert_eq!(
            seek(&f, 5 * B, Whence::SeekData),
            Err(nix::errno::Errno::ENXIO),
            "{when}"
        );
        assert_eq!(seek(&f, 6 * B, Whence::SeekHole), Ok(6 * B), "{when}");
        assert_eq!(
            seek(&f, 8 * B, Whence::SeekHole),
            Err(nix::errno::Errno::ENXIO),
            "{when}"
        );
        f.sync_all().unwrap();
    }
    drop(f);

    // fallocate: plain extends, KEEP_SIZE keeps, PUNCH_HOLE zeroes.
    let f = rw("falloc");
    let body = noise(4, 3 * B as usize);
    f.write_all_at(&body, 0).unwrap();
    nix::fcntl::fallocate(&f, FallocateFlags::empty(), 0, 5 * B as i64).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 5 * B);
    nix::fcntl::fallocate(&f, FallocateFlags::FALLOC_FL_KEEP_SIZE, 0, 9 * B as i64).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 5 * B);
    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    // From the middle of block 0 to the middle of block 2: block 1 goes.
    nix::fcntl::fallocate(&f, punch, 1000, 2 * B as i64).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 5 * B);
    let mut want = body.clone();
    want[1000..1000 + 2 * B as usize].fill(0);
    want.resize(5 * B as usize, 0);
    assert!(fs::read(p("falloc")).unwrap() == want, "after the punch");
    f.sync_all().unwrap();
    assert_eq!(
        seek(&f, 0, Whence::SeekHole),
        Ok(B),
        "punched block 1 is a hole"
    );
    assert_eq!(seek(&f, B, Whence::SeekData), Ok(2 * B));
    assert_eq!(seek(&f, 2 * B, Whence::SeekHole), Ok(3 * B));
    let e = nix::fcntl::fallocate(&f, FallocateFlags::FALLOC_FL_COLLAPSE_RANGE, 0, B as i64);
    assert_eq!(e, Err(nix::errno::Errno::EOPNOTSUPP));

    // copy_file_range: the whole sparse file, and a piece into the middle
    // of another; holes come back as holes once flushed.
    let (src, dst) = (File::open(p("sparse")).unwrap(), rw("copy"));
    let mut done = 0;
    while done < 8 * B as usize {
        let n = nix::fcntl::copy_file_range(&src, None, &dst, None, 8 * B as usize - done).unwrap();
        assert!(n > 0);
        done += n;
    }
    assert!(fs::read(p("copy")).unwrap() == fs::read(p("sparse")).unwrap());
    let (mut off_in, mut off_out) = (4 * B as i64, 100i64);
    let n = nix::fcntl::copy_file_range(&src, Some(&mut off_in), &dst, Some(&mut off_out), 1000)
        .unwrap();
    assert_eq!(n, 1000);
    let mut piece = vec![0u8; 1000];
    dst.read_exact_at(&mut piece, 100).unwrap();
    assert_eq!(piece, noise(3, 1000));
    dst.sync_all().unwrap();
    assert_eq!(seek(&dst, 0, Whence::SeekHole), Ok(B));
    assert_eq!(seek(&dst, B, Whence::SeekData), Ok(4 * B));

    let expect = [
        ("trunc", fs::read(p("trunc")).unwrap()),
        ("sparse", fs::read(p("sparse")).unwrap()),
        ("falloc", want),
        ("copy", fs::read(p("copy")).unwrap()),
    ];
    drop((f, src, dst));
    m.unmount();
    fsck_spotless(&img);
    let m = RwMount::new(&img, &mnt, "");
    for (name, want) in &expect {
        assert!(fs::read(p(name)).unwrap() == *want, "{name} after remount");
    }
    let f = File::open(p("falloc")).unwrap();
    assert_eq!(seek(&f, 0, Whence::SeekHole), Ok(B));
    drop(f);
    m.unmount();
    fsck_spotless(&img);
}

/// A file open and unlinked: readable and writable (also across a
/// flush) until closed; then gone, leaving no orphan.
#[test]
fn an_open_unlinked_file_lives_until_closed() {
    require_fuse();
    let img = new_volume("unlinked", 4);
    let mnt = scratch("unlinked-mnt");
    let m = RwMount::new(&img, &mnt, "");
    let path = mnt.join("tmp");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    let body = noise(9, 150_000);
    f.write_all_at(&body, 0).unwrap();
    fs::remove_file(&path).unwrap();
    assert!(!path.exists());
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    f.sync_all().unwrap();
    f.write_all_at(b"more", 150_000).unwrap();
    f.sync_all().unwrap();
    let mut back = vec![0u8; 150_004];
    f.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(&back[..150_000], &body[..]);
    assert_eq!(&back[150_000..], b"more");
    assert_eq!(f.metadata().unwrap().len(), 150_004);
    // A directory removed while open lists as empty.
    fs::create_dir(mnt.join("dir")).unwrap();
    let d = fs::read_dir(mnt.join("dir")).unwrap();
    fs::remove_dir(mnt.join("dir")).unwrap();
    assert_eq!(d.count(), 0);
    drop(f);
    m.unmount();
    fsck_spotless(&img);
}

/// One writer per image: a read-write mount of another PFS of it gets
/// exit 32 and says why (a second mount of the same PFS is a bind mount:
/// lifecycle.rs); a read-only mount of that PFS beside it works.
#[test]
fn a_read_write_mount_of_another_pfs_is_refused() {
    require_fuse();
    let img = new_volume("twice", 4);
    let (mnt1, mnt2) = (scratch("twice-1"), scratch("twice-2"));
    let m = RwMount::new(&img, &mnt1, "");
    fs::write(mnt1.join("hello"), "world").unwrap();
    File::open(mnt1.join("hello")).unwrap().sync_all().unwrap();
    let local = format!("{}@LOCAL", img.display());
    let out = run(&["-o", "rw", &local, mnt2.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(32), "{err}");
    let why = format!(
        "already mounted read-write on {} (PFS @DATA): an image has one writer",
        mnt1.display()
    );
    assert!(err.contains(&why), "{err}");
    assert!(!is_mounted(&mnt2));
    {
        let _ro = Mounted::new(&local, &mnt2, &["-o", "ro"]);
        assert_eq!(fs::read_dir(&mnt2).unwrap().count(), 0);
    }
    m.unmount();
    // Free again once the first is gone.
    let m = RwMount::new(&img, &mnt2, "");
    assert_eq!(fs::read(mnt2.join("hello")).unwrap(), b"world");
    m.unmount();
    fsck_spotless(&img);
}

/// Is `name` in the root of PFS DATA on disk (the last flush)?
fn on_disk(img: &Path, name: &str) -> Option<Vec<u8>> {
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(img, false).unwrap());
    let vol = Arc::new(hammer2::Volume::open(dev).unwrap());
    let pfs = hammer2::Pfs::open(vol, "DATA").unwrap();
    let ino = pfs.resolve(name).ok()?;
    Some(pfs.read_all(&ino).unwrap())
}

/// A binary of the workspace built next to this test (fsck-hammer2 is
/// mkfs's).
fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let p = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// On a plain FUSE mount (`noblkdev`; a fuseblk mount's umount waits,
/// see lifecycle.rs) `umount MNT` returns before a daemonized read-write
/// mount has written its last flush (the kernel does not wait for the
/// daemon). fsck.hammer2 run right after it waits for that flush and
/// finds the image clean with everything written; a new mount.hammer2
/// run right after it waits too, instead of failing on the image lock.
#[test]
fn fsck_and_a_new_mount_right_after_umount_wait_for_the_last_flush() {
    require_fuse();
    let img = new_volume("umount-wait", 4);
    let mnt = scratch("umount-wait-mnt");
    let fsck = workspace_bin("fsck-hammer2");
    // Unflushed until the unmount (sync_interval=0, below the dirty
    // limits), so the last flush has 40 MiB and 10,000 inodes to write:
    // it ends a good while after umount has returned.
    let body = noise(11, 40 << 20);
    let mount = || {
        let out = Command::new(BIN)
            .args(["-o", "rw,sync_interval=0,noblkdev"])
            .arg(&img)
            .arg(&mnt)
            .output()
            .expect("run mount.hammer2");
        assert!(
            out.status.success(),
            "mount.hammer2 exited {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    };
    mount();
    fs::create_dir(mnt.join("many")).unwrap();
    for i in 0..10_000 {
        fs::write(mnt.join(format!("many/{i}")), i.to_string()).unwrap();
    }
    fs::write(mnt.join("first"), &body).unwrap();
    umount_settled(&mnt);
    let out = Command::new(&fsck).arg(&img).output().expect("run fsck");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fsck exited {}: {stderr}", out.status);
    assert!(!stderr.contains("mounted read-write"), "{stderr}");
    let first = on_disk(&img, "first");
    assert!(
        first.as_deref() == Some(&body[..]),
        "first: not on disk as written"
    );

    mount();
    fs::write(mnt.join("second"), &body[..body.len() / 2]).unwrap();
    umount_settled(&mnt);
    mount();
    assert!(fs::read(mnt.join("second")).unwrap() == body[..body.len() / 2]);
    assert!(fs::read(mnt.join("first")).unwrap() == body);
    umount_settled(&mnt);
    // And a read-only mount right after an unmount sees the last flush.
    fs::create_dir_all(&mnt).unwrap();
    let out = Command::new(BIN)
        .args(["-o", "ro"])
        .arg(&img)
        .arg(&mnt)
        .output()
        .expect("run mount.hammer2");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(fs::read(mnt.join("second")).unwrap() == body[..body.len() / 2]);
    umount_settled(&mnt);
    let out = Command::new(&fsck).arg(&img).output().expect("run fsck");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// sync_interval=1 writes within about a second with no fsync; with
/// sync_interval=0 nothing is written until SIGTERM, whose unmount
/// flushes it before the daemon exits.
#[test]
fn the_sync_interval_and_sigterm_flush() {
    require_fuse();
    let img = new_volume("sync", 4);
    let mnt = scratch("sync-mnt");
    let m = RwMount::new(&img, &mnt, "sync_interval=1");
    fs::write(mnt.join("periodic"), "tick").unwrap();
    wait_until("the periodic flush", Duration::from_secs(10), || {
        on_disk(&img, "periodic").is_some()
    });
    assert_eq!(on_disk(&img, "periodic").unwrap(), b"tick");
    m.unmount();

    let mut m = RwMount::new(&img, &mnt, "sync_interval=0");
    let body = noise(5, 300_000);
    let mut f = File::create(mnt.join("late")).unwrap();
    f.write_all(&body).unwrap();
    drop(f);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(on_disk(&img, "late"), None, "flushed with sync_interval=0");
    nix::sys::signal::kill(m.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
    m.wait_exit();
    assert!(!is_mounted(&mnt));
    assert!(m.log().contains("flushes"), "{}", m.log());
    assert_eq!(on_disk(&img, "late").as_deref(), Some(&body[..]));
    fsck_spotless(&img);
}

/// New files belong to the caller; without write permission on the
/// directory nothing is made; in a sticky directory only the owner
/// removes. The same with the kernel checking (default_permissions) and
/// with the mount checking.
#[test]
fn callers_own_what_they_make_and_the_mode_bits_hold() {
    require_fuse();
    for opts in ["allow_other", "allow_other,default_permissions"] {
        let img = new_volume(&format!("owners-{opts}"), 4);
        let mnt = scratch(&format!("owners-mnt-{opts}"));
        let m = RwMount::new(&img, &mnt, opts);
        fs::create_dir(mnt.join("tmp")).unwrap();
        fs::set_permissions(mnt.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::write(mnt.join("tmp/roots"), "root's").unwrap();
        let as_nobody = |script: &str| {
            Command::new("sh")
                .arg("-c")
                .arg(script)
                .current_dir(&mnt)
                .uid(65534)
                .gid(65534)
                .output()
                .expect("run as nobody")
        };
        let out = as_nobody("echo mine > tmp/nobodys && mkdir tmp/nd");
        assert!(out.status.success(), "{opts}: {out:?}");
        for n in ["tmp/nobodys", "tmp/nd"] {
            let st = stat(&mnt.join(n));
            assert_eq!((st.uid(), st.gid()), (65534, 65534), "{opts}: {n}");
        }
        let out = as_nobody("echo x > not-allowed");
        assert!(!out.status.success(), "{opts}: wrote into a 0755 root dir");
        assert!(!mnt.join("not-allowed").exists());
        let out = as_nobody("rm -f tmp/roots");
        assert!(
            !out.status.success(),
            "{opts}: removed root's file from a sticky dir"
        );
        assert!(mnt.join("tmp/roots").exists());
        let out = as_nobody("rm tmp/nobodys && rmdir tmp/nd");
        assert!(out.status.success(), "{opts}: {out:?}");
        m.unmount();
        fsck_spotless(&img);
    }
}

/// A flush that fails (here: the daemon may not write past 300 MiB of
/// the image, and the next volume header slot is at 2 GiB) poisons the
/// mount: the fsync that waited gets EIO, and so does every later
/// write, fsync and close; the error is logged; the image keeps the last
/// completed flush; the daemon exits 2 after the unmount.
#[test]
fn a_failed_flush_poisons_the_mount() {
    require_fuse();
    let img = new_volume("poison", 4);
    let mnt = scratch("poison-mnt");
    let log = scratch("poison").join("mount.log");
    // SIGXFSZ ignored (inherited across exec), so writes past the
    // limit fail with EFBIG instead of killing the daemon.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 614400; exec \"$0\" \"$@\"")
        .args([BIN, "-f", "-o", "rw", img.to_str().unwrap()])
        .arg(&mnt)
        .stderr(File::create(&log).unwrap())
        .spawn()
        .expect("start mount.hammer2");
    let guard = Mounted::adopt(&mnt);
    wait_until("the mount", Duration::from_secs(10), || is_mounted(&mnt));

    fs::write(mnt.join("before"), "kept in memory").unwrap();
    let f = File::create(mnt.join("doomed")).unwrap();
    let e = f.sync_all().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "fsync: {e}");
    let e = f.write_all_at(b"x", 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "write: {e}");
    let e = fs::write(mnt.join("new"), "x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "create: {e}");
    assert_eq!(
        nix::unistd::close(std::os::fd::OwnedFd::from(f)),
        Err(nix::errno::Errno::EIO),
        "close"
    );
    // Reads still work.
    assert_eq!(fs::read(mnt.join("before")).unwrap(), b"kept in memory");

    drop(guard);
    let status = common::wait_exit(&mut child, Duration::from_secs(30));
    let text = fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(2), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("ERROR") && l.contains("refusing writes")),
        "{text}"
    );
    assert_eq!(on_disk(&img, "before"), None);
    fsck_spotless(&img);
}

#[test]
fn a_tree_written_through_the_buffer_cache_reads_back_identical() {
    require_fuse();
    let img = new_volume("cached", 4);
    let src_mnt = scratch("cached-src");
    let _src = Mounted::new(fixture(FIXTURE).to_str().unwrap(), &src_mnt, &["-o", "ro"]);
    let mnt = scratch("cached-mnt");
    // A small budget, so pageout and the cache's flusher write buffers
    // back while the copy runs.
    let m = RwMount::new(&img, &mnt, "cache_size=8M");
    sh(&format!("cp -a {} {}/cp", src_mnt.display(), mnt.display()));
    treecheck(&mnt.join("cp"), &manifest_path(FIXTURE), "DATA");
    m.unmount();
    fsck_spotless(&img);
    let m = RwMount::new(&img, &mnt, "");
    treecheck(&mnt.join("cp"), &manifest_path(FIXTURE), "DATA");
    m.unmount();
    fsck_spotless(&img);
}

/// The daemon's last words include its buffer cache's report, and the
/// figures are those of the work done: a 4 MiB file written and then
/// read back cold through a new mount shows at least 4 MiB read from
/// the device and a page lookup per 64 KiB block of it.
#[test]
fn the_buffer_cache_reports_at_the_end() {
    require_fuse();
    let img = new_volume("report", 4);
    let mnt = scratch("report-mnt");
    let body = noise(9, 4 << 20);
    let m = RwMount::new(&img, &mnt, "");
    fs::write(mnt.join("f"), &body).unwrap();
    m.unmount();
    let m = RwMount::new(&img, &mnt, "");
    assert!(fs::read(mnt.join("f")).unwrap() == body);
    let mut m = m;
    umount_settled(&mnt);
    m.wait_exit();
    let log = m.log();
    let line = log
        .lines()
        .find(|l| l.contains("buffer cache: "))
        .unwrap_or_else(|| panic!("no cache report in the log:\n{log}"));
    let number_before = |what: &str| -> f64 {
        let i = line
            .find(what)
            .unwrap_or_else(|| panic!("{what:?} in {line}"));
        line[..i]
            .trim_end()
            .rsplit([' ', '('])
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|e| panic!("{what:?} in {line}: {e}"))
    };
    let lockless = number_before(" lockless");
    let locked = number_before(" locked");
    let not_found = number_before(" not found");
    assert!(
        lockless + locked + not_found >= 64.0,
        "{line}: fewer page lookups than the file's 64 blocks"
    );
    let read_mib: f64 = {
        let i = line.find(" MiB), ").expect("device reads");
        line[..i].rsplit('(').next().unwrap().parse().unwrap()
    };
    assert!(read_mib >= 4.0, "{line}: less than the file read");
    fsck_spotless(&img);
}

/// Writers that keep much data waiting (so the flusher launders again
/// and again) do not put off the commit every `sync_interval`: writing
/// without a pause for 3.5 s with `sync_interval=1` commits during the
/// writing, not only at unmount.
#[test]
fn laundering_does_not_put_off_the_interval_commit() {
    require_fuse();
    let img = new_volume("interval", 4);
    let mnt = scratch("interval").join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let m = Rw::new(&img, &mnt, "rw,cache_size=64M,sync_interval=1");
    let start = std::time::Instant::now();
    let mut f = File::create(mnt.join("stream")).unwrap();
    let mut i = 0u64;
    while start.elapsed() < Duration::from_millis(3500) {
        // Rewrites within 256 MiB: the image never fills.
        f.seek(std::io::SeekFrom::Start((i % 256) << 20)).unwrap();
        f.write_all(&noise(i, 1 << 20)).unwrap();
        i += 1;
    }
    drop(f);
    let log = m.unmount();
    // "DATA: N flushes, ... M launderings, ...": the unmount's own
    // flush is one; at least one more came on the interval.
    let flushes = logged_count(&log, "flushes");
    let launderings = logged_count(&log, "launderings");
    assert!(
        launderings > 0,
        "{i} MiB written and nothing laundered:\n{log}"
    );
    assert!(
        flushes >= 2,
        "{flushes} flushes while writing {i} MiB for 3.5 s with sync_interval=1:\n{log}"
    );
    fsck_clean(&img);
}

/// The figure that follows `label` in the daemon's unmount log.
fn logged_after(log: &str, label: &str) -> u64 {
    log.split(label)
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no figure after {label:?} in the unmount log:\n{log}"))
}

/// The figure N of "N WHAT, " in the daemon's unmount log line.
fn logged_count(log: &str, what: &str) -> u64 {
    log.split(&format!(" {what}, "))
        .next()
        .filter(|t| t.len() < log.len())
        .and_then(|t| t.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of {what} in the unmount log:\n{log}"))
}

/// The daemon's resident memory, from /proc.
fn rss_bytes(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?;
    Some(kib << 10)
}

/// `cache_size=` is the whole budget of a read-write mount: the file data
/// waiting for a flush is held to its share (a quarter), not to a fixed
/// 256 MiB beside it, so writing 1 GiB with a 64 MiB budget keeps the
/// daemon within the budget and 64 MiB (its code, request buffers and
/// heap). Before, it reached the budget and 256 MiB. With no flush on
/// an interval (`sync_interval=0`) the flusher launders: the data is
/// written ahead and recorded in the file's block table, and one commit
/// at the fsync writes the metadata above it. Reading the file back
/// through a read-only mount of the same budget stays within the same
/// bound (77 MiB seen for both).
#[test]
fn writing_and_reading_stay_within_the_memory_budget() {
    require_fuse();
    let img = new_volume("budget", 4);
    let mnt = scratch("budget").join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let m = Rw::new(&img, &mnt, "rw,cache_size=64M,sync_interval=0");
    let peak = peak_rss_during(m.pid().expect("daemon"), || {
        let mut f = File::create(mnt.join("big")).unwrap();
        for i in 0..1024u64 {
            f.write_all(&noise(i, 1 << 20)).unwrap();
        }
        f.sync_all().unwrap();
    });
    within_budget_and_64_mib(peak, "writing");
    let log = m.log();
    assert!(
        log.contains("file data waiting for a flush on those pages up to 14 MiB"),
        "the log does not show the budget's shares:\n{log}"
    );
    assert_eq!(fs::metadata(mnt.join("big")).unwrap().len(), 1 << 30);
    let log = m.unmount();
    // "N launderings, M blocks written by them": most of the 16,384
    // blocks were laundered (at most the 14 MiB dirty share was left for
    // the fsync's commit).
    let laundered = logged_after(&log, " launderings, ");
    assert!(
        laundered >= 12_288,
        "only {laundered} of 16,384 blocks laundered:\n{log}"
    );
    // The data waiting was on the page layer's pages, a page per block,
    // never much past the 14 MiB dirty share (writers stop past it; the
    // count is taken at each MiB of pages: 17 MiB seen with a 16 MiB
    // share), well under the half of the 56 MiB of pages that is their
    // ceiling.
    let pages = logged_after(&log, "file data pages: peak ");
    assert!(
        (16..=(20 << 20) / 65536).contains(&pages),
        "file data pages peaked at {pages}:\n{log}"
    );
    fsck_clean(&img);
    // Reading it back, through a cache of the same budget, stays within
    // the same bound: the buffers are recycled, not added to.
    let m = Rw::new(&img, &mnt, "ro,cache_size=64M");
    let peak = peak_rss_during(m.pid().expect("daemon"), || {
        let mut f = File::open(mnt.join("big")).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for i in 0..1024u64 {
            f.read_exact(&mut buf).unwrap();
            assert!(
                buf == noise(i, 1 << 20),
                "MiB {i} of the file differs after a remount"
            );
        }
    });
    within_budget_and_64_mib(peak, "reading");
    m.unmount();
}

/// A peak resident memory `peak` (sampled at least once) of a daemon
/// `doing` 1 GiB with `cache_size=64M`: within the budget and 64 MiB.
fn within_budget_and_64_mib(peak: u64, doing: &str) {
    eprintln!("peak resident memory {doing} 1 GiB: {} MiB", peak >> 20);
    let limit = (64 + 64) << 20;
    assert!(peak > 0, "no sample of the daemon's memory");
    assert!(
        peak <= limit,
        "the daemon's resident memory reached {} MiB {doing} 1 GiB with cache_size=64M \
         (at most {} MiB expected)",
        peak >> 20,
        limit >> 20
    );
}

/// The most resident memory of process `pid` while `f` runs, sampled
/// every 20 ms.
fn peak_rss_during(pid: u32, f: impl FnOnce()) -> u64 {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_bytes(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    f();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap()
}
