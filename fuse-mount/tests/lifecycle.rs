//! What users do around a read-write mount, through the kernel: the same
//! image named twice (by its path and through a loop device, or through
//! partitions of loop devices) has one writer, and mkfs, fsck and the
//! `hammer2` verbs see the mount by any name; `sync`, `sync -f` and
//! syncfs(2) make every write before them durable (the daemon killed
//! with SIGKILL right after keeps them); `umount` returns only once the
//! image is final (a copy taken right after it has the last writes, also
//! after `losetup -d` of a loop device it was mounted through).
//!
//! These tests need root, /dev/fuse and loop devices (util-linux's
//! losetup), and fail (not skip) without them; the loop devices they
//! attach are detached however a test ends.

mod common;
use common::*;

use bufcache::{BlockDevice, FileDevice};
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::Arc;
use std::time::Duration;

/// A binary of the workspace built next to this test.
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

fn tool(name: &str, args: &[&str]) -> Output {
    Command::new(workspace_bin(name))
        .args(args)
        .output()
        .expect("run tool")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `name` in the root of PFS DATA as the image's last flush has it.
fn on_disk(img: &Path, name: &str) -> Option<Vec<u8>> {
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(img, false).unwrap());
    let vol = Arc::new(hammer2::Volume::open(dev).unwrap());
    let pfs = hammer2::Pfs::open(vol, "DATA").unwrap();
    let ino = pfs.resolve(name).ok()?;
    Some(pfs.read_all(&ino).unwrap())
}

fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A loop device attached with `losetup` (as a user would), detached on
/// drop whatever happened.
struct LoopDev {
    path: PathBuf,
    detached: std::cell::Cell<bool>,
}

impl LoopDev {
    fn attach(file: &Path, extra: &[&str]) -> LoopDev {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .args(extra)
            .arg(file)
            .output()
            .expect("run losetup (util-linux)");
        assert!(out.status.success(), "losetup: {}", text(&out.stderr));
        let path = PathBuf::from(text(&out.stdout).trim());
        assert!(
            path.to_string_lossy().starts_with("/dev/loop"),
            "losetup printed {path:?}"
        );
        LoopDev {
            path,
            detached: std::cell::Cell::new(false),
        }
    }

    fn s(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// Partition `n` of a device attached with `-P`, once its node is
    /// there. The kernel reads the partition table itself when it knows
    /// the format (CONFIG_MSDOS_PARTITION); `partx -a` adds them from
    /// userspace when it does not (and fails, harmlessly, when they are
    /// there already).
    fn partition(&self, n: u32) -> PathBuf {
        let p = PathBuf::from(format!("{}p{n}", self.path.display()));
        if !p.exists() {
            let _ = Command::new("partx").arg("-a").arg(&self.path).output();
        }
        wait_until("the partition's node", Duration::from_secs(10), || {
            p.exists()
        });
        p
    }

    /// `losetup -d`, now, checking it worked.
    fn detach(&self) {
        self.detached.set(true);
        let out = Command::new("losetup")
            .arg("-d")
            .arg(&self.path)
            .output()
            .expect("run losetup -d");
        assert!(out.status.success(), "losetup -d: {}", text(&out.stderr));
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        if !self.detached.get() {
            let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
        }
    }
}

/// mount.hammer2 in the background; the guard unmounts.
fn mount(source: &str, mnt: &Path, opts: &str) -> Mounted {
    Mounted::new(source, mnt, &["-o", opts])
}

/// A refusal: exit `code`, one line on stderr saying `what`, nothing
/// mounted.
fn refused(out: &Output, code: i32, what: &str) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(err.contains(what), "wanted {what:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    err
}

/// The image mounted read-write by its path and again through a loop
/// device (`losetup -f --show IMG`) is one image: a read-write mount of
/// its other PFS is refused with a one-line error naming the first, as
/// are `mkfs.hammer2 -f`, the writing `hammer2` verbs, `replay-log` and
/// fsck's repairs by either name; fsck and the reading verbs warn that
/// it is mounted; a read-only mount of the same PFS beside it is a
/// read-only bind mount of it (and says so). Then the other way round:
/// mounted through the loop device, the path is refused. A read-only mount alone keeps out mkfs, replay-log and
/// fsck -y. The
/// image comes out as written, fsck-clean.
#[test]
fn one_image_by_two_names_has_one_writer() {
    require_fuse();
    let img = new_volume("names", 4);
    let (mnt1, mnt2) = (scratch("names-1"), scratch("names-2"));
    let (img_s, mnt1_s, mnt2_s) = (
        img.to_str().unwrap(),
        mnt1.to_str().unwrap(),
        mnt2.to_str().unwrap(),
    );
    // A write log of another image, for replay-log below.
    let other = new_volume("names-other", 1);
    let log = scratch("names").join("w.log");
    {
        let _m = mount(
            other.to_str().unwrap(),
            &mnt2,
            &format!("rw,log_writes={}", log.display()),
        );
        fs::write(mnt2.join("x"), "x").unwrap();
    }
    let lo = LoopDev::attach(&img, &[]);

    let m = mount(img_s, &mnt1, "rw");
    fs::write(mnt1.join("hello"), "world").unwrap();
    File::open(mnt1.join("hello")).unwrap().sync_all().unwrap();
    let on1 = format!("mounted read-write on {mnt1_s}");

    // (Guards: a mount that should have been refused is not left behind.)
    let stray = Mounted::adopt(&mnt2);
    let out = run(&["-o", "rw", &format!("{}@LOCAL", lo.s()), mnt2_s]);
    refused(&out, 32, &format!("already {on1} (PFS @DATA)"));
    assert!(!is_mounted(&mnt2));
    drop(stray);
    for name in [lo.s(), img_s] {
        let out = tool("mkfs-hammer2", &["-f", name]);
        refused(&out, 1, &format!("already {on1}"));
        for args in [
            vec!["pfs-create", name, "NEW"],
            vec!["snapshot", name],
            vec!["bulkfree", name],
            vec!["pfs-delete", name, "LOCAL"],
        ] {
            let out = tool("hammer2", &args);
            refused(&out, 1, &format!("already {on1}"));
        }
        let spec = format!("{name}@DATA:/");
        let out = tool("hammer2", &["setcomp", "zlib", &spec]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(&on1), "{err}");
        let out = tool("hammer2", &["replay-log", log.to_str().unwrap(), name]);
        refused(&out, 1, &format!("already {on1}"));

        // fsck repairs take the writer lock: refused (exit 8).
        for mode in ["-y", "-p"] {
            refused(&tool("fsck-hammer2", &[mode, name]), 8, &on1);
        }
        let out = tool("fsck-hammer2", &[name]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
        assert!(text(&out.stderr).contains(&format!("warning: {name} is {on1}")));
        let out = tool("hammer2", &["info", name]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains(&format!("warning: {name} is {on1}")));
    }
    // Read-only beside it, through the loop device: a read-only bind
    // mount of it.
    let out = run(&["-o", "ro", lo.s(), mnt2_s]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ro = Mounted::adopt(&mnt2);
    let bound = format!("served by the mount on {mnt1_s}: {mnt2_s} is a bind mount of it");
    assert!(text(&out.stderr).contains(&bound), "{}", text(&out.stderr));
    assert_eq!(fs::read(mnt2.join("hello")).unwrap(), b"world");
    // The read-only mount is not taken for the writer.
    refused(
        &tool("mkfs-hammer2", &["-f", img_s]),
        1,
        &format!("already {on1}"),
    );
    drop(ro);
    drop(m);
    assert_eq!(on_disk(&img, "hello").as_deref(), Some(&b"world"[..]));
    fsck_spotless(&img);

    // The other way round, with a read-only mount made first (listed
    // before the writer in /proc/self/mountinfo; not named as the writer).
    let mnt3 = scratch("names-3");
    let ro = mount(img_s, &mnt3, "ro");
    let m = mount(lo.s(), &mnt2, "rw");
    fs::write(mnt2.join("second"), "name").unwrap();
    let on2 = format!("already mounted read-write on {mnt2_s}");
    let stray = Mounted::adopt(&mnt1);
    refused(
        &run(&["-o", "rw", &format!("{img_s}@LOCAL"), mnt1_s]),
        32,
        &on2,
    );
    assert!(!is_mounted(&mnt1));
    drop(stray);
    refused(&tool("mkfs-hammer2", &["-f", img_s]), 1, &on2);
    refused(&tool("hammer2", &["pfs-create", img_s, "NEW"]), 1, &on2);
    drop(m);
    // The read-only mount alone: copy-on-write verbs may go on beside it
    // (it shows its flush), mkfs and replay-log, which overwrite in
    // place, may not.
    let ro_on = format!("mounted read-only on {}", mnt3.display());
    refused(&tool("mkfs-hammer2", &["-f", lo.s()]), 1, &ro_on);
    refused(&tool("fsck-hammer2", &["-y", lo.s()]), 8, &ro_on);
    refused(
        &tool("hammer2", &["replay-log", log.to_str().unwrap(), img_s]),
        1,
        &ro_on,
    );
    drop(ro);
    assert_eq!(on_disk(&img, "second").as_deref(), Some(&b"name"[..]));
    lo.detach();
    // Free again.
    let m = mount(img_s, &mnt1, "rw");
    assert_eq!(fs::read(mnt1.join("hello")).unwrap(), b"world");
    drop(m);
    fsck_spotless(&img);
}

/// A second mount of the PFS a read-write mount serves, by its path or a
/// loop device, is a bind mount of the first, as a second mount of a
/// local filesystem's device shares its superblock: one filesystem (one
/// st_dev, but no peer of it for mount propagation), a write through
/// either seen through the other at once; `ro`
/// gives a read-only bind (EROFS), which sees what is written, not only
/// the last flush. The first can be unmounted and the others go on with
/// the same daemon, fsync included; it exits 0 when the last goes, and
/// the image is clean and holds every write. The same mountpoint again
/// is refused. A SIGTERM after the first was unmounted unmounts the bind
/// mounts left.
#[test]
fn a_second_mount_of_the_same_pfs_is_a_bind_mount() {
    require_fuse();
    let img = new_volume("bind", 4);
    let (mnt1, mnt2, mnt3) = (scratch("bind-1"), scratch("bind-2"), scratch("bind-3"));
    let (img_s, mnt2_s, mnt3_s) = (
        img.to_str().unwrap(),
        mnt2.to_str().unwrap(),
        mnt3.to_str().unwrap(),
    );
    let log = mnt1.with_extension("log");
    let lo = LoopDev::attach(&img, &[]);
    let dev = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(p).unwrap().dev()
    };
    let (mut child, first) = mount_foreground(img_s, &mnt1, &log, "rw,sync_interval=0");
    fs::create_dir(mnt1.join("d")).unwrap();
    let shared = nix::mount::MsFlags::MS_SHARED;
    nix::mount::mount(None::<&str>, &mnt1, None::<&str>, shared, None::<&str>).unwrap();
    let out = run(&["-o", "rw", lo.s(), mnt2_s]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let second = Mounted::adopt(&mnt2);
    let bound = |how: &str, mnt: &str| {
        format!(
            "served by the mount on {}: {mnt} is a bind mount of it ({how})",
            mnt1.display()
        )
    };
    let said = bound("read-write", mnt2_s);
    assert!(text(&out.stderr).contains(&said), "{}", text(&out.stderr));
    assert_eq!(dev(&mnt1), dev(&mnt2));
    // A new mount for propagation, as a second mount of a device is: no
    // peer of the first (a mount under the first does not show under it).
    let tmpfs = mnt1.join("d");
    let none = nix::mount::MsFlags::empty();
    nix::mount::mount(Some("tmpfs"), &tmpfs, Some("tmpfs"), none, None::<&str>).unwrap();
    assert!(is_mounted(&tmpfs));
    let propagated = is_mounted(&mnt2.join("d"));
    umount_settled(&tmpfs);
    assert!(
        !propagated,
        "a mount under the first showed under the second"
    );
    fs::write(mnt1.join("one"), "1").unwrap();
    assert_eq!(fs::read(mnt2.join("one")).unwrap(), b"1");
    fs::write(mnt2.join("two"), "2").unwrap();
    assert_eq!(fs::read(mnt1.join("two")).unwrap(), b"2");

    let out = run(&["-o", "ro", img_s, mnt3_s]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let third = Mounted::adopt(&mnt3);
    let said = bound("read-only", mnt3_s);
    assert!(text(&out.stderr).contains(&said), "{}", text(&out.stderr));
    fs::write(mnt1.join("three"), "3").unwrap();
    assert_eq!(fs::read(mnt3.join("three")).unwrap(), b"3");
    let e = fs::write(mnt3.join("x"), "x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    refused(
        &run(&["-o", "rw", img_s, mnt2_s]),
        32,
        &format!("@DATA of this image is already mounted on {mnt2_s}"),
    );

    // The first unmounted: the others go on, with the same daemon.
    umount_settled(&mnt1);
    drop(first);
    let mut f = File::create(mnt2.join("four")).unwrap();
    f.write_all(b"4").unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(on_disk(&img, "four").as_deref(), Some(&b"4"[..]));
    assert_eq!(fs::read(mnt3.join("four")).unwrap(), b"4");
    assert!(child.try_wait().unwrap().is_none(), "the daemon is gone");
    umount_settled(&mnt3);
    drop(third);
    umount_settled(&mnt2);
    drop(second);
    let status = wait_exit(&mut child, Duration::from_secs(30));
    let logged = fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "mount.hammer2 exited {status}:\n{logged}");
    for (name, body) in [("one", "1"), ("two", "2"), ("three", "3"), ("four", "4")] {
        assert_eq!(on_disk(&img, name).as_deref(), Some(body.as_bytes()));
    }
    fsck_spotless(&img);

    // SIGTERM with the first gone: the bind mount left is unmounted.
    let (mut child, first) = mount_foreground(img_s, &mnt1, &log, "rw");
    let out = run(&["-o", "rw", img_s, mnt2_s]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let second = Mounted::adopt(&mnt2);
    umount_settled(&mnt1);
    drop(first);
    fs::write(mnt2.join("five"), "5").unwrap();
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(30));
    let logged = fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "mount.hammer2 exited {status}:\n{logged}");
    assert!(!is_mounted(&mnt2), "{logged}");
    drop(second);
    assert_eq!(on_disk(&img, "five").as_deref(), Some(&b"5"[..]));
    fsck_spotless(&img);
}

/// A DOS partition table with two Linux partitions of 64 MiB each.
fn write_two_partitions(img: &Path) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new().write(true).open(img).unwrap();
    for (i, start) in [2048u32, 2048 + (64 << 11)].into_iter().enumerate() {
        let mut entry = [0u8; 16];
        entry[4] = 0x83;
        entry[8..12].copy_from_slice(&start.to_le_bytes());
        entry[12..16].copy_from_slice(&(64u32 << 11).to_le_bytes());
        f.write_all_at(&entry, 446 + 16 * i as u64).unwrap();
    }
    f.write_all_at(&[0x55, 0xaa], 510).unwrap();
}

/// The locks follow the bytes of partitions too: two partitions of one
/// loop device (`losetup -P`) mount read-write side by side; the other
/// PFS of the same partition through a second loop device over the file
/// is refused, and
/// so is mkfs over the whole file; the whole loop device holds a
/// partition table, which mkfs refuses without -f.
#[test]
fn partitions_of_loop_devices_lock_by_their_bytes() {
    require_fuse();
    let file = scratch("parts").join("parts.img");
    File::create(&file)
        .and_then(|f| f.set_len(160 << 20))
        .unwrap();
    write_two_partitions(&file);
    let a = LoopDev::attach(&file, &["-P"]);
    let (p1, p2) = (a.partition(1), a.partition(2));
    for p in [&p1, &p2] {
        let out = tool("mkfs-hammer2", &[p.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let (mnt1, mnt2) = (scratch("parts-1"), scratch("parts-2"));
    let m1 = mount(p1.to_str().unwrap(), &mnt1, "rw");
    let m2 = mount(p2.to_str().unwrap(), &mnt2, "rw");
    fs::write(mnt1.join("one"), "1").unwrap();
    fs::write(mnt2.join("two"), "2").unwrap();

    let b = LoopDev::attach(&file, &["-P"]);
    let b1 = b.partition(1);
    let mnt3 = scratch("parts-3");
    let on1 = format!(
        "already mounted read-write on {} (PFS @DATA)",
        mnt1.display()
    );
    let _stray = Mounted::adopt(&mnt3);
    let b1_local = format!("{}@LOCAL", b1.display());
    refused(
        &run(&["-o", "rw", &b1_local, mnt3.to_str().unwrap()]),
        32,
        &on1,
    );
    let out = tool("mkfs-hammer2", &["-f", file.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("already mounted read-write on"), "{err}");
    drop(m1);
    drop(m2);
    // The partitions' mounts are gone; the whole loop device is free and
    // holds a partition table.
    b.detach();
    let out = tool("mkfs-hammer2", &[a.s()]);
    refused(&out, 1, "already holds a partition table of type dos");
    let out = tool("fsck-hammer2", &[p2.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(text(&out.stderr).is_empty(), "{}", text(&out.stderr));
    a.detach();
}

fn sigkill(child: &mut Child) {
    child.kill().expect("kill -KILL");
    child.wait().expect("wait");
}

/// `sync`, `sync -f FILE` and syncfs(2) return once everything written
/// before them is on the image: the daemon killed with SIGKILL right
/// after loses none of it. A plain FUSE mount (`noblkdev`), which the
/// kernel never asks to sync, loses the same write after the same
/// `sync` (nothing else flushes with sync_interval=0).
#[test]
fn sync_and_syncfs_are_durable() {
    require_fuse();
    let img = new_volume("sync", 4);
    let mnt = scratch("sync-mnt");
    type Way<'a> = (&'a str, &'a dyn Fn(&Path));
    let ways: [Way; 4] = [
        ("plain", &|_| {
            assert!(Command::new("sync").status().unwrap().success());
        }),
        ("sync", &|_| {
            assert!(Command::new("sync").status().unwrap().success());
        }),
        ("sync-f", &|f| {
            assert!(Command::new("sync")
                .arg("-f")
                .arg(f)
                .status()
                .unwrap()
                .success());
        }),
        ("syncfs", &|f| {
            let dir = File::open(f.parent().unwrap()).unwrap();
            nix::unistd::syncfs(dir.as_fd()).expect("syncfs");
        }),
    ];
    for (way, sync) in ways {
        let opts = match way {
            "plain" => "rw,sync_interval=0,noblkdev",
            _ => "rw,sync_interval=0",
        };
        let log = mnt.with_extension("log");
        let (mut child, guard) = mount_foreground(img.to_str().unwrap(), &mnt, &log, opts);
        let name = format!("f-{way}");
        let body = noise(way.len() as u64, 300_000);
        let mut f = File::create(mnt.join(&name)).unwrap();
        f.write_all(&body).unwrap();
        drop(f);
        sync(&mnt.join(&name));
        sigkill(&mut child);
        drop(guard);
        assert!(!is_mounted(&mnt));
        let got = on_disk(&img, &name);
        match way {
            "plain" => assert_eq!(got, None, "plain FUSE: kept"),
            _ => assert!(got.as_deref() == Some(&body[..]), "{way}: lost"),
        }
        fsck_spotless(&img);
    }
}

/// Copy `img` as `cp` does, to `copy`.
fn cp(img: &Path, copy: &Path) {
    let _ = fs::remove_file(copy);
    let ok = Command::new("cp")
        .arg("--sparse=always")
        .arg(img)
        .arg(copy)
        .status()
        .expect("run cp")
        .success();
    assert!(ok, "cp failed");
}

/// Write a last batch that only the unmount flushes (40 MiB and 2,000
/// files, sync_interval=0: the flush takes a good while), unmount with
/// `unmount`, copy the image at once, and check the copy has all of it.
fn last_writes_survive(tag: &str, source: &str, img: &Path, unmount: &dyn Fn(&Path)) {
    let mnt = scratch(&format!("{tag}-mnt"));
    let body = noise(7, 40 << 20);
    let m = mount(source, &mnt, "rw,sync_interval=0");
    let (dir, big) = (format!("many-{tag}"), format!("big-{tag}"));
    fs::create_dir(mnt.join(&dir)).unwrap();
    for i in 0..2000 {
        fs::write(mnt.join(format!("{dir}/{i}")), i.to_string()).unwrap();
    }
    fs::write(mnt.join(&big), &body).unwrap();
    unmount(&mnt);
    let copy = scratch(tag).join("copy.img");
    cp(img, &copy);
    drop(m);
    assert!(
        on_disk(&copy, &big).as_deref() == Some(&body[..]),
        "{tag}: the copy misses the last writes"
    );
    fsck_spotless(&copy);
    fs::remove_file(&copy).unwrap();
}

fn umount_cmd(mnt: &Path) {
    let out = Command::new("umount").arg(mnt).output().expect("umount");
    assert!(out.status.success(), "umount: {}", text(&out.stderr));
}

/// `umount` returns only once the image is final: a copy taken right
/// after it has the last writes, with umount(8), with umount(2), and
/// mounted through a loop device (with 4 KiB sectors) that is detached
/// right after.
#[test]
fn umount_returns_once_the_image_is_final() {
    require_fuse();
    let img = new_volume("final", 4);
    let img_s = img.to_str().unwrap();
    last_writes_survive("final-cmd", img_s, &img, &umount_cmd);
    last_writes_survive("final-sys", img_s, &img, &|m| {
        nix::mount::umount(m).expect("umount(2)")
    });
    // With 4 KiB sectors, as a 4Kn disk has.
    let lo = LoopDev::attach(&img, &["-b", "4096"]);
    last_writes_survive("final-loop", lo.s(), &img, &|m| {
        umount_cmd(m);
        lo.detach();
    });
    fsck_spotless(&img);
}
