//! Behaviours the generic tests of fstests (xfstests) check, each found
//! failing or not running over this mount and kept here, since the
//! project's test command cannot run fstests itself (its source stays
//! out of the project): the link count of an open removed directory,
//! file handles across a remount, set-user-ID and set-group-ID cleared
//! by unprivileged data changes, access times, O_TMPFILE,
//! RENAME_WHITEOUT, FALLOC_FL_ZERO_RANGE. Each test names the fstests
//! cases it stands for.
//!
//! These tests need root and /dev/fuse, and fail (not skip) without them.
//! They run one at a time (`serial`): one drops the kernel's caches for
//! every mount, and a process another test starts holds copies of this
//! test's open descriptors until it execs, which can make an unmount
//! fail with EBUSY.

mod common;
use common::*;

use bufcache::{BlockDevice, FileDevice};
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Held for a whole test: the tests of this file run one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A read-write mount in the foreground, `allow_other` so that other
/// users' processes get in; `unmount` waits for the daemon's last flush
/// and exit.
struct RwMount {
    child: Option<Child>,
    guard: Option<Mounted>,
    log: PathBuf,
}

impl RwMount {
    fn new(img: &Path, mnt: &Path, extra: &str) -> RwMount {
        let log = mnt.with_extension("log");
        let opts = format!(
            "rw,allow_other,default_permissions,suid{}{extra}",
            if extra.is_empty() { "" } else { "," }
        );
        let (child, guard) = mount_foreground(img.to_str().unwrap(), mnt, &log, &opts);
        RwMount {
            child: Some(child),
            guard: Some(guard),
            log,
        }
    }

    /// `new` with `env` added to the daemon's environment.
    fn with_env(img: &Path, mnt: &Path, env: &[(&str, &str)]) -> RwMount {
        let log = mnt.with_extension("log");
        let opts = "rw,allow_other,default_permissions,suid";
        let (child, guard) = mount_foreground_env(img.to_str().unwrap(), mnt, &log, opts, env);
        RwMount {
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
        nix::mount::umount(&guard.mnt).expect("umount");
        let mut child = self.child.take().expect("running");
        let status = wait_exit(&mut child, Duration::from_secs(30));
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

/// The link count of what `fd` is open on (fstat).
fn nlink_of(fd: &File) -> u64 {
    fd.metadata().expect("fstat").nlink()
}

fn open_dir(p: &Path) -> File {
    File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

/// generic/035: a directory removed while open, by rmdir or by a rename
/// over it, has no links (a file already had none); its parent has one
/// subdirectory less.
#[test]
fn an_open_removed_directory_has_no_links() {
    require_fuse();
    let _serial = serial();
    let img = new_volume("nlink", 4);
    let mnt = scratch("nlink-mnt");
    let m = RwMount::new(&img, &mnt, "");
    let p = |s: &str| mnt.join(s);

    fs::create_dir_all(p("top/victim/sub")).unwrap();
    fs::create_dir(p("top/other")).unwrap();
    fs::remove_dir(p("top/victim/sub")).unwrap();
    let victim = open_dir(&p("top/victim"));
    assert_eq!(nlink_of(&victim), 2);
    // Replaced by a rename.
    fs::rename(p("top/other"), p("top/victim")).unwrap();
    assert_eq!(nlink_of(&victim), 0, "a directory replaced by rename");
    assert_eq!(fs::metadata(p("top")).unwrap().nlink(), 3);
    // Removed by rmdir.
    let gone = open_dir(&p("top/victim"));
    fs::remove_dir(p("top/victim")).unwrap();
    assert_eq!(nlink_of(&gone), 0, "a directory removed by rmdir");
    assert_eq!(fs::metadata(p("top")).unwrap().nlink(), 2);
    drop((victim, gone));
    m.unmount();
    fsck_spotless(&img);
}

/// A file handle (`struct file_handle`), as `name_to_handle_at` makes
/// it: its type and opaque bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Handle {
    htype: i32,
    bytes: Vec<u8>,
}

/// `struct file_handle` with room for `MAX_HANDLE_SZ` bytes.
#[repr(C)]
struct RawHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; 128],
}

/// libc has the call, nix does not: the one unsafe block of the test
/// (the workspace denies unsafe code elsewhere in this crate).
#[allow(unsafe_code)]
fn handle_of(p: &Path) -> Handle {
    let path = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut raw = RawHandle {
        handle_bytes: 128,
        handle_type: 0,
        f_handle: [0; 128],
    };
    let mut mount_id = 0;
    // SAFETY: `raw` is a file_handle with room for handle_bytes bytes.
    let r = unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            path.as_ptr(),
            (&mut raw as *mut RawHandle).cast(),
            &mut mount_id,
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "name_to_handle_at {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    Handle {
        htype: raw.handle_type,
        bytes: raw.f_handle[..raw.handle_bytes as usize].to_vec(),
    }
}

/// `open_by_handle_at` on the filesystem `mnt` is (its root open as the
/// mount descriptor).
#[allow(unsafe_code)]
fn open_by_handle(mnt: &Path, h: &Handle, flags: i32) -> std::io::Result<File> {
    use std::os::fd::FromRawFd;
    let root = File::open(mnt)?;
    let mut raw = RawHandle {
        handle_bytes: h.bytes.len() as u32,
        handle_type: h.htype,
        f_handle: [0; 128],
    };
    raw.f_handle[..h.bytes.len()].copy_from_slice(&h.bytes);
    // SAFETY: `raw` holds a handle of handle_bytes bytes.
    let fd = unsafe {
        libc::open_by_handle_at(
            std::os::fd::AsRawFd::as_raw_fd(&root),
            (&mut raw as *mut RawHandle).cast(),
            flags,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Drop the kernel's clean dentries and inodes (the mount's too).
fn drop_caches() {
    fs::write("/proc/sys/vm/drop_caches", "3").expect("drop_caches");
}

/// The path a descriptor is open on, as the kernel names it.
fn fd_path(f: &File) -> PathBuf {
    fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(f)
    ))
    .expect("readlink /proc/self/fd")
}

/// generic/426, 467, 477, 756, 777, and an NFS export: file handles
/// decode after the kernel forgot the inode (drop_caches) and after a
/// remount (FUSE_EXPORT_SUPPORT: node ids are inode numbers, and the
/// kernel looks "." and ".." up by node id); a directory's handle
/// reconnects to its path through "..", and a handle to a removed file
/// is stale.
#[test]
fn file_handles_decode_after_drop_caches_and_a_remount() {
    require_fuse();
    let _serial = serial();
    let img = new_volume("handles", 4);
    let mnt = scratch("handles-mnt");
    let m = RwMount::new(&img, &mnt, "");
    let p = |s: &str| mnt.join(s);
    fs::create_dir_all(p("a/b/c")).unwrap();
    fs::write(p("a/b/c/file"), b"by handle").unwrap();
    fs::write(p("a/gone"), b"removed").unwrap();
    let file = handle_of(&p("a/b/c/file"));
    let dir = handle_of(&p("a/b/c"));
    let root = handle_of(&mnt);
    let gone = handle_of(&p("a/gone"));
    fs::remove_file(p("a/gone")).unwrap();

    let check = |when: &str| {
        drop_caches();
        let f = open_by_handle(&mnt, &file, libc::O_RDONLY)
            .unwrap_or_else(|e| panic!("{when}: open the file by handle: {e}"));
        let mut text = String::new();
        std::io::Read::read_to_string(&mut &f, &mut text).unwrap();
        assert_eq!(text, "by handle", "{when}");
        drop(f);
        drop_caches();
        let d = open_by_handle(&mnt, &dir, libc::O_RDONLY | libc::O_DIRECTORY)
            .unwrap_or_else(|e| panic!("{when}: open the directory by handle: {e}"));
        // A directory is reconnected up to the root ("..", then its
        // name in the parent).
        assert_eq!(fd_path(&d), p("a/b/c").canonicalize().unwrap(), "{when}");
        let r = open_by_handle(&mnt, &root, libc::O_RDONLY | libc::O_DIRECTORY)
            .unwrap_or_else(|e| panic!("{when}: open the root by handle: {e}"));
        assert_eq!(fd_path(&r), mnt.canonicalize().unwrap(), "{when}");
        let e = open_by_handle(&mnt, &gone, libc::O_RDONLY).expect_err("a removed file");
        assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{when}: {e}");
    };
    check("after drop_caches");
    m.unmount();
    fsck_spotless(&img);

    let m = RwMount::new(&img, &mnt, "");
    assert_eq!(handle_of(&p("a/b/c/file")), file, "the same handle");
    check("after a remount");
    m.unmount();
    // Read-only too.
    let log = mnt.with_extension("ro.log");
    let (mut child, guard) = mount_foreground(img.to_str().unwrap(), &mnt, &log, "ro");
    check("read-only");
    nix::mount::umount(&guard.mnt).expect("umount");
    drop(guard);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).success());
    fsck_spotless(&img);
}

/// A crash loses the inode numbers given since the last flush, and the
/// next mount gives them again: a handle to a lost file must be stale,
/// not open the new file that has its number (the generation, from the
/// inode's creation time, tells them apart).
#[test]
fn a_handle_to_a_file_lost_in_a_crash_does_not_open_its_successor() {
    require_fuse();
    let _serial = serial();
    let img = new_volume("handles-crash", 4);
    let mnt = scratch("handles-crash-mnt");
    let mut m = RwMount::new(&img, &mnt, "sync_interval=0");
    let p = |s: &str| mnt.join(s);
    fs::write(p("kept"), b"kept").unwrap();
    File::open(p("kept")).unwrap().sync_all().unwrap();
    fs::write(p("lost"), b"lost").unwrap();
    let lost = handle_of(&p("lost"));
    let lost_ino = fs::metadata(p("lost")).unwrap().ino();
    // The daemon dies before any flush writes "lost".
    let child = m.child.take().expect("running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut child = child;
    child.wait().unwrap();
    let guard = m.guard.take().expect("mounted");
    nix::mount::umount2(&guard.mnt, nix::mount::MntFlags::MNT_DETACH).unwrap();
    drop((m, guard));

    let m = RwMount::new(&img, &mnt, "");
    assert!(!p("lost").exists());
    fs::write(p("successor"), b"successor").unwrap();
    assert_eq!(
        fs::metadata(p("successor")).unwrap().ino(),
        lost_ino,
        "the number is given again"
    );
    drop_caches();
    let e = open_by_handle(&mnt, &lost, libc::O_RDONLY).expect_err("a lost file");
    assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{e}");
    m.unmount();
    fsck_spotless(&img);
}

/// The permission bits of `p` in octal, as `stat -c %a` shows them:
/// from the kernel's attribute cache (statx asking for the mode only,
/// as fstests does), or asked of the daemon (`fresh`, statx with
/// AT_STATX_FORCE_SYNC).
fn mode_of(p: &Path, fresh: bool) -> String {
    let cached = if fresh { "never" } else { "default" };
    let out = std::process::Command::new("stat")
        .arg(format!("--cached={cached}"))
        .args(["-c", "%a"])
        .arg(p)
        .output()
        .expect("run stat");
    assert!(out.status.success(), "stat {}: {out:?}", p.display());
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Run `args` as user `uid` and group `gid` (std drops the
/// supplementary groups when root sets a uid).
fn run_as(uid: u32, gid: u32, args: &[&str]) {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap_or_else(|e| panic!("run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} as {uid}:{gid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const NOBODY: u32 = 65534;

/// generic/683 and 684 (fallocate and hole punch by another user), and
/// the same for writes and truncation: a change of a file's data by a
/// caller without CAP_FSETID clears set-user-ID, and set-group-ID when
/// the file is group-executable or the caller is not in its group, as
/// on a local filesystem (the kernel leaves the last case to FUSE
/// filesystems); root keeps both. The kernel's cached attributes show it
/// at once, as fstests looks.
#[test]
fn unprivileged_data_changes_clear_set_id_bits() {
    require_fuse();
    let _serial = serial();
    let img = new_volume("killpriv", 4);
    let mnt = scratch("killpriv-mnt");
    let m = RwMount::new(&img, &mnt, "");
    let f = mnt.join("f");
    let fs_ = f.to_str().unwrap();
    let cases: &[(&str, u32, u32, &[&str], &str)] = &[
        (
            "6666",
            NOBODY,
            NOBODY,
            &["fallocate", "-l", "131072", fs_],
            "666",
        ),
        (
            "6666",
            NOBODY,
            NOBODY,
            &["fallocate", "-p", "-o", "0", "-l", "4096", fs_],
            "666",
        ),
        (
            "2676",
            NOBODY,
            NOBODY,
            &["fallocate", "-l", "131072", fs_],
            "676",
        ),
        (
            "6766",
            NOBODY,
            NOBODY,
            &["fallocate", "-p", "-o", "0", "-l", "4096", fs_],
            "766",
        ),
        (
            "6666",
            NOBODY,
            NOBODY,
            &["sh", "-c", &format!("printf x >> {fs_}")],
            "666",
        ),
        (
            "6666",
            NOBODY,
            NOBODY,
            &["truncate", "-s", "100", fs_],
            "666",
        ),
        // Set-group-ID alone, no group execute: the kernel asks for
        // nothing before the change.
        (
            "2666",
            NOBODY,
            NOBODY,
            &["fallocate", "-l", "131072", fs_],
            "666",
        ),
        (
            "2666",
            NOBODY,
            NOBODY,
            &["sh", "-c", &format!("printf x >> {fs_}")],
            "666",
        ),
        // In the file's group (root): set-group-ID without group
        // execute stays (set-user-ID goes).
        (
            "6666",
            NOBODY,
            0,
            &["fallocate", "-l", "131072", fs_],
            "2666",
        ),
        // Root, with CAP_FSETID.
        ("6666", 0, 0, &["fallocate", "-l", "131072", fs_], "6666"),
        (
            "6777",
            0,
            0,
            &["fallocate", "-p", "-o", "0", "-l", "4096", fs_],
            "6777",
        ),
    ];
    for (before, uid, gid, cmd, after) in cases {
        let _ = fs::remove_file(&f);
        fs::write(&f, vec![0x58; 196608]).unwrap();
        let mode = u32::from_str_radix(before, 8).unwrap();
        fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
        assert_eq!(&mode_of(&f, false), before);
        run_as(*uid, *gid, cmd);
        assert_eq!(
            &mode_of(&f, false),
            after,
            "{before}, {cmd:?} as {uid}:{gid}"
        );
        assert_eq!(
            &mode_of(&f, true),
            after,
            "{before}, {cmd:?} as {uid}:{gid}"
        );
    }
    m.unmount();
    fsck_spotless(&img);
}

/// generic/193 (chown and set-id bits): a chown drops set-user-ID and
/// set-group-ID as on a local filesystem, the oracle being the same
/// calls on a file of the host's own filesystem beside the mount. The
/// mount does it itself (FUSE_HANDLE_KILLPRIV), so the kernel no longer
/// asks for the attributes before each chown: in fuser's log of the
/// kernel's requests, 16 fchowns are 16 SETATTRs with no GETATTR among
/// them (before, one each).
#[test]
fn chown_clears_set_id_bits_as_a_local_filesystem_does() {
    require_fuse();
    let _serial = serial();
    let img = new_volume("chown-killpriv", 4);
    let mnt = scratch("chown-killpriv-mnt");
    let local = scratch("chown-killpriv-local");
    let m = RwMount::with_env(&img, &mnt, &[("RUST_LOG", "info,fuser::request=debug")]);
    let chown = "import os, sys; os.chown(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))";
    // (mode, the file's owner and group, the caller, chown's uid and gid)
    type Ids = (u32, u32);
    let cases: &[(&str, Ids, Ids, (i64, i64))] = &[
        ("6755", (0, 0), (0, 0), (1001, 1002)),
        ("6745", (0, 0), (0, 0), (1001, -1)),
        ("4755", (0, 0), (0, 0), (-1, -1)),
        ("2755", (0, 0), (0, 0), (-1, 1002)),
        (
            "6745",
            (NOBODY, NOBODY),
            (NOBODY, NOBODY),
            (-1, NOBODY as i64),
        ),
        ("2745", (NOBODY, 0), (NOBODY, NOBODY), (-1, NOBODY as i64)),
        ("2745", (NOBODY, 0), (NOBODY, NOBODY), (-1, -1)),
        (
            "4711",
            (NOBODY, NOBODY),
            (NOBODY, NOBODY),
            (NOBODY as i64, -1),
        ),
    ];
    for dir in [&mnt, &local] {
        let d = dir.join("d");
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o6775)).unwrap();
        std::os::unix::fs::chown(&d, Some(1001), Some(1002)).unwrap();
        assert_eq!(mode_of(&d, true), "6775", "a directory keeps its bits");
    }
    for (i, (mode, owner, who, to)) in cases.iter().enumerate() {
        let mut got = Vec::new();
        for dir in [&mnt, &local] {
            let f = dir.join(format!("f{i}"));
            fs::write(&f, b"x").unwrap();
            std::os::unix::fs::chown(&f, Some(owner.0), Some(owner.1)).unwrap();
            let bits = u32::from_str_radix(mode, 8).unwrap();
            fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(bits)).unwrap();
            let f_ = f.to_str().unwrap();
            let (u, g) = (to.0.to_string(), to.1.to_string());
            run_as(who.0, who.1, &["python3", "-c", chown, f_, &u, &g]);
            got.push((mode_of(&f, false), mode_of(&f, true)));
        }
        let (ours, theirs) = (&got[0], &got[1]);
        assert_eq!(ours.0, theirs.1, "case {i}: the kernel's cached mode");
        assert_eq!(
            ours.1, theirs.1,
            "case {i}: {mode} {owner:?}, chown {to:?} by {who:?}"
        );
    }
    // No GETATTR before a chown.
    let f = mnt.join("counted");
    fs::write(&f, b"x").unwrap();
    fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o4755)).unwrap();
    let file = File::open(&f).unwrap();
    let from = m.log().len();
    for i in 0..16u32 {
        std::os::unix::fs::fchown(&file, Some(2000 + i), None).unwrap();
    }
    drop(file);
    assert_eq!(mode_of(&f, true), "755");
    let log = m.log();
    let ino = fs::metadata(&f).unwrap().ino();
    let node = format!("ino {ino:#018x} ");
    let reqs: Vec<&str> = log[from..].lines().filter(|l| l.contains(&node)).collect();
    let setattrs = reqs.iter().filter(|l| l.contains(" SETATTR ")).count();
    let last = reqs
        .iter()
        .rposition(|l| l.contains(" SETATTR "))
        .unwrap_or(0);
    let asked = reqs[..last]
        .iter()
        .filter(|l| l.contains(" GETATTR "))
        .count();
    assert_eq!(
        setattrs,
        16,
        "the log shows the kernel's requests:\n{}",
        reqs.join("\n")
    );
    assert_eq!(
        asked,
        0,
        "GETATTRs among the SETATTRs:\n{}",
        reqs.join("\n")
    );
    m.unmount();
    fsck_spotless(&img);
}

/// O_TMPFILE (generic/004, 389, 509, 530...): an unnamed file in a
/// directory, no links while open, named by linkat(2) with its contents,
/// gone without a trace when closed unnamed; `O_EXCL` keeps it from ever
/// being named (the kernel's rule).
#[test]
fn o_tmpfile_files_are_unnamed_until_linked() {
    use nix::fcntl::{open, AtFlags, OFlag};
    use nix::sys::stat::Mode;
    require_fuse();
    let _serial = serial();
    let img = new_volume("tmpfile", 4);
    let mnt = scratch("tmpfile-mnt");
    let m = RwMount::new(&img, &mnt, "");
    let p = |s: &str| mnt.join(s);
    fs::create_dir(p("d")).unwrap();
    let tmp = |flags: OFlag| -> File {
        let fd = open(
            &p("d"),
            OFlag::O_TMPFILE | OFlag::O_RDWR | flags,
            Mode::from_bits_truncate(0o640),
        )
        .expect("open O_TMPFILE");
        File::from(fd)
    };
    let named = tmp(OFlag::empty());
    let st = named.metadata().unwrap();
    assert_eq!((st.nlink(), st.mode() & 0o7777), (0, 0o640));
    assert!(st.is_file());
    std::io::Write::write_all(&mut &named, b"made unnamed").unwrap();
    let unnamed = tmp(OFlag::empty());
    std::io::Write::write_all(&mut &unnamed, &vec![1u8; 300_000]).unwrap();
    let excl = tmp(OFlag::O_EXCL);
    assert_eq!(fs::read_dir(p("d")).unwrap().count(), 0, "no names");
    // A flush while they are open and unnamed.
    named.sync_all().unwrap();

    let dir = File::open(p("d")).unwrap();
    nix::unistd::linkat(&named, "", &dir, "now-named", AtFlags::AT_EMPTY_PATH).unwrap();
    assert_eq!(named.metadata().unwrap().nlink(), 1);
    let e =
        nix::unistd::linkat(&excl, "", &dir, "never", AtFlags::AT_EMPTY_PATH).expect_err("O_EXCL");
    assert_eq!(e, nix::errno::Errno::ENOENT);
    assert_eq!(fs::read(p("d/now-named")).unwrap(), b"made unnamed");
    drop((named, unnamed, excl, dir));
    m.unmount();
    // No orphan left: fsck_clean refuses warnings.
    fsck_spotless(&img);
    let m = RwMount::new(&img, &mnt, "");
    assert_eq!(fs::read(p("d/now-named")).unwrap(), b"made unnamed");
    assert_eq!(fs::read_dir(p("d")).unwrap().count(), 1);
    m.unmount();
    fsck_spotless(&img);
}

/// RENAME_WHITEOUT (generic/078, 626; overlayfs upper directories):
/// the source name becomes a character device 0/0 with mode 0, the file
/// moves, in one step; RENAME_EXCHANGE with it is EINVAL.
#[test]
fn rename_whiteout_leaves_a_whiteout() {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    require_fuse();
    let _serial = serial();
    let img = new_volume("whiteout", 4);
    let mnt = scratch("whiteout-mnt");
    let m = RwMount::new(&img, &mnt, "");
    let p = |s: &str| mnt.join(s);
    fs::write(p("src"), b"moved").unwrap();
    fs::write(p("over"), b"replaced").unwrap();
    renameat2(
        AT_FDCWD,
        &p("src"),
        AT_FDCWD,
        &p("dst"),
        RenameFlags::RENAME_WHITEOUT,
    )
    .unwrap();
    let w = fs::symlink_metadata(p("src")).unwrap();
    assert!(
        std::os::unix::fs::FileTypeExt::is_char_device(&w.file_type()),
        "{w:?}"
    );
    assert_eq!((w.rdev(), w.mode() & 0o7777, w.nlink()), (0, 0, 1));
    assert_eq!(fs::read(p("dst")).unwrap(), b"moved");
    fs::write(p("src2"), b"second").unwrap();
    renameat2(
        AT_FDCWD,
        &p("src2"),
        AT_FDCWD,
        &p("over"),
        RenameFlags::RENAME_WHITEOUT,
    )
    .unwrap();
    assert_eq!(fs::read(p("over")).unwrap(), b"second");
    let e = renameat2(
        AT_FDCWD,
        &p("dst"),
        AT_FDCWD,
        &p("over"),
        RenameFlags::RENAME_WHITEOUT | RenameFlags::RENAME_EXCHANGE,
    )
    .expect_err("whiteout with exchange");
    assert_eq!(e, nix::errno::Errno::EINVAL);
    m.unmount();
    fsck_spotless(&img);
    let m = RwMount::new(&img, &mnt, "");
    let w = fs::symlink_metadata(p("src2")).unwrap();
    assert_eq!((w.rdev(), w.mode() & 0o170000), (0, libc::S_IFCHR));
    m.unmount();
}

/// FALLOC_FL_ZERO_RANGE (generic/008, 009, 349...): zeros read back at
/// once, whole blocks are holes at once, KEEP_SIZE keeps the size and
/// the plain mode grows it.
#[test]
fn zero_range_reads_zeros_and_leaves_holes() {
    use nix::fcntl::{fallocate, FallocateFlags};
    use std::os::unix::fs::FileExt;
    require_fuse();
    let _serial = serial();
    let img = new_volume("zero", 4);
    let mnt = scratch("zero-mnt");
    let m = RwMount::new(&img, &mnt, "");
    let f = mnt.join("f");
    let data: Vec<u8> = (0..4 * 65536u32).map(|i| (i % 253 + 1) as u8).collect();
    fs::write(&f, &data).unwrap();
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f)
        .unwrap();
    file.sync_all().unwrap();
    fallocate(
        &file,
        FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        100,
        2 * 65536,
    )
    .unwrap();
    let mut want = data.clone();
    want[100..100 + 2 * 65536].fill(0);
    let mut got = vec![0; want.len()];
    file.read_exact_at(&mut got, 0).unwrap();
    assert!(got == want, "zeros where zeroed, data elsewhere");
    assert_eq!(file.metadata().unwrap().len(), data.len() as u64);
    let hole = nix::unistd::lseek(&file, 0, nix::unistd::Whence::SeekHole).unwrap();
    assert_eq!(hole, 65536, "the whole block zeroed is a hole at once");
    fallocate(&file, FallocateFlags::FALLOC_FL_ZERO_RANGE, 6 * 65536, 10).unwrap();
    assert_eq!(file.metadata().unwrap().len(), 6 * 65536 + 10);
    drop(file);
    m.unmount();
    fsck_spotless(&img);
    let m = RwMount::new(&img, &mnt, "");
    want.resize(6 * 65536 + 10, 0);
    assert!(fs::read(&f).unwrap() == want);
    m.unmount();
}

/// `st_blocks` in bytes, asked of the daemon (`stat --cached=never`).
fn blocks_bytes(p: &Path) -> u64 {
    let out = std::process::Command::new("stat")
        .args(["--cached=never", "-c", "%b"])
        .arg(p)
        .output()
        .expect("run stat");
    assert!(out.status.success(), "stat {}: {out:?}", p.display());
    let n: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    n * 512
}

/// generic/568: the room fallocate reserves counts in `st_blocks`, a
/// whole 64 KiB block per block of the range, as preallocated blocks do
/// on a local filesystem; so writing into it does not grow the file's
/// blocks, and du of a fallocated file is not 0. Over a stored block the
/// reservation counts too (a copy-on-write rewrite takes new room). The
/// reservation goes with the unmount, leaving what was stored.
#[test]
fn fallocated_room_counts_in_st_blocks() {
    use nix::fcntl::{fallocate, FallocateFlags};
    use std::os::unix::fs::FileExt;
    require_fuse();
    let _serial = serial();
    let img = new_volume("falloc-blocks", 4);
    let mnt = scratch("falloc-blocks-mnt");
    let m = RwMount::new(&img, &mnt, "");
    let f = mnt.join("f");
    let file = File::create(&f).unwrap();
    // Two bytes across the boundary of the first two blocks.
    fallocate(&file, FallocateFlags::empty(), 65535, 2).unwrap();
    assert_eq!(blocks_bytes(&f), 2 * 65536, "two blocks reserved");
    let before = blocks_bytes(&f);
    file.write_all_at(b"xy", 65535).unwrap();
    let after = blocks_bytes(&f);
    assert!(after <= before, "grew from {before} to {after}");
    // 1 MiB more past the end, with KEEP_SIZE: 16 blocks.
    fallocate(
        &file,
        FallocateFlags::FALLOC_FL_KEEP_SIZE,
        2 * 65536,
        1 << 20,
    )
    .unwrap();
    assert_eq!(blocks_bytes(&f), after + (1 << 20));
    assert_eq!(file.metadata().unwrap().len(), 65537);
    file.sync_all().unwrap();
    let stored = blocks_bytes(&f);
    // Over the stored blocks: counted again until written.
    fallocate(&file, FallocateFlags::FALLOC_FL_KEEP_SIZE, 0, 65537).unwrap();
    assert_eq!(blocks_bytes(&f), stored + 2 * 65536);
    file.write_all_at(&[7; 65537], 0).unwrap();
    assert_eq!(
        blocks_bytes(&f),
        65536 + 1024 + (1 << 20),
        "two pending blocks, the room past the end"
    );
    drop(file);
    m.unmount();
    fsck_spotless(&img);
    let m = RwMount::new(&img, &mnt, "");
    let flushed = blocks_bytes(&f);
    assert!(
        flushed > 0 && flushed <= 65536 + 1024,
        "after the remount, what is stored: {flushed}"
    );
    m.unmount();
}

/// Access and modification times of `p` as stat prints them (to the
/// nanosecond), asked of the daemon.
fn times(p: &Path) -> (String, String) {
    let out = std::process::Command::new("stat")
        .args(["--cached=never", "-c", "%x|%y"])
        .arg(p)
        .output()
        .expect("run stat");
    assert!(out.status.success(), "stat {}: {out:?}", p.display());
    let s = String::from_utf8_lossy(&out.stdout);
    let (a, m) = s.trim().split_once('|').expect("two times");
    (a.to_string(), m.to_string())
}

fn atime(p: &Path) -> String {
    times(p).0
}

/// Read a file whole through a new open (as cat does).
fn cat(p: &Path) {
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
}

/// List a directory through a new open (as ls does).
fn ls(p: &Path) {
    fs::read_dir(p).unwrap().for_each(drop);
}

/// The transaction id of the image's last flush (its volume header).
fn last_flush(img: &Path) -> u64 {
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(img, false).expect("open image"));
    hammer2::Volume::open(dev)
        .expect("volume")
        .header
        .mirror_tid
}

/// generic/003: reads update access times as the mount options say:
/// relatime by default (the first read after a change, not the next),
/// strictatime (every open's reads), noatime (never), nodiratime
/// (files, not directory listings), read-only (never). An access time
/// alone starts no flush, is written by the next flush of anything,
/// and by the unmount.
#[test]
fn reads_update_access_times_as_the_mount_options_say() {
    require_fuse();
    let _serial = serial();
    let img = new_volume("atime", 4);
    let mnt = scratch("atime-mnt");
    let p = |s: &str| mnt.join(s);

    // relatime (the default), flushing every second when dirty.
    let m = RwMount::new(&img, &mnt, "sync_interval=1");
    fs::create_dir(p("d")).unwrap();
    fs::write(p("d/f"), vec![b'a'; 8192]).unwrap();
    fs::write(p("g"), b"g").unwrap();
    let t0 = atime(&p("d/f"));
    cat(&p("d/f"));
    let t1 = atime(&p("d/f"));
    assert!(t1 > t0, "first read after the write: {t0} -> {t1}");
    cat(&p("d/f"));
    assert_eq!(atime(&p("d/f")), t1, "second read");
    fs::write(p("d/f"), vec![b'b'; 8192]).unwrap();
    cat(&p("d/f"));
    let t2 = atime(&p("d/f"));
    assert!(t2 > t1, "first read after a change: {t1} -> {t2}");
    let (d0, _) = times(&p("d"));
    ls(&p("d"));
    let d1 = atime(&p("d"));
    assert!(d1 > d0, "listing after the directory changed: {d0} -> {d1}");
    ls(&p("d"));
    assert_eq!(atime(&p("d")), d1);

    // No flush for an access time alone: the flusher runs every
    // second, yet the header stays; a change then gets flushed. First
    // the mount is made clean: blocks the overwrite of d/f freed wait
    // for up to three more headers, and flushes go on until they are
    // written, so fsync until one writes no header (a clean mount's
    // fsync writes none).
    let mut flushed = last_flush(&img);
    for _ in 0..8 {
        File::open(p("g")).unwrap().sync_all().unwrap();
        let now = last_flush(&img);
        if now == flushed {
            break;
        }
        flushed = now;
    }
    cat(&p("g"));
    let g1 = atime(&p("g"));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(last_flush(&img), flushed, "a flush for an access time");
    fs::write(p("d/other"), b"x").unwrap();
    wait_until("the interval flush", Duration::from_secs(20), || {
        last_flush(&img) > flushed
    });
    m.unmount();
    fsck_spotless(&img);
    let m = RwMount::new(&img, &mnt, "");
    assert_eq!(atime(&p("g")), g1, "written by the next flush");
    assert_eq!(atime(&p("d/f")), t2);
    // Written at unmount.
    fs::write(p("h"), b"h").unwrap();
    File::open(p("h")).unwrap().sync_all().unwrap();
    cat(&p("h"));
    let h1 = atime(&p("h"));
    m.unmount();
    let m = RwMount::new(&img, &mnt, "noatime");
    assert_eq!(atime(&p("h")), h1, "written by the unmount");

    // noatime: never, not even after a change.
    fs::write(p("h"), b"changed").unwrap();
    let n0 = atime(&p("h"));
    cat(&p("h"));
    assert_eq!(atime(&p("h")), n0, "noatime");
    m.unmount();

    // strictatime: each open's reads.
    let m = RwMount::new(&img, &mnt, "strictatime");
    cat(&p("h"));
    let s1 = atime(&p("h"));
    assert!(s1 > n0);
    cat(&p("h"));
    let s2 = atime(&p("h"));
    assert!(s2 > s1, "strictatime: {s1} -> {s2}");
    m.unmount();

    // nodiratime: files yes, directory listings no.
    let m = RwMount::new(&img, &mnt, "strictatime,nodiratime");
    let dd = atime(&p("d"));
    ls(&p("d"));
    assert_eq!(atime(&p("d")), dd, "nodiratime");
    cat(&p("g"));
    assert!(atime(&p("g")) > g1);
    m.unmount();
    fsck_spotless(&img);

    // Read-only: never.
    let log = mnt.with_extension("ro.log");
    let (mut child, guard) = mount_foreground(img.to_str().unwrap(), &mnt, &log, "ro,strictatime");
    let before = atime(&p("g"));
    cat(&p("g"));
    ls(&p("d"));
    assert_eq!(atime(&p("g")), before);
    nix::mount::umount(&guard.mnt).expect("umount");
    drop(guard);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).success());
}

/// generic/539 (seek_sanity_test 21): right after a hole punch, before
/// any flush, SEEK_DATA and SEEK_HOLE see the hole; also in blocks that
/// were on disk.
#[test]
fn seek_sees_a_punched_hole_at_once() {
    use nix::fcntl::{fallocate, FallocateFlags};
    use nix::unistd::{lseek, Whence};
    use std::os::unix::fs::FileExt;
    require_fuse();
    let _serial = serial();
    let img = new_volume("punch-seek", 4);
    let mnt = scratch("punch-seek-mnt");
    let m = RwMount::new(&img, &mnt, "sync_interval=0");
    const B: i64 = 65536;
    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    for (name, flushed) in [("pending", false), ("on-disk", true)] {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(mnt.join(name))
            .unwrap();
        f.write_all_at(&vec![b'a'; 3 * B as usize], 0).unwrap();
        if flushed {
            f.sync_all().unwrap();
        }
        fallocate(&f, punch, B, B).unwrap();
        assert_eq!(lseek(&f, 0, Whence::SeekData), Ok(0), "{name}");
        assert_eq!(lseek(&f, 0, Whence::SeekHole), Ok(B), "{name}");
        assert_eq!(lseek(&f, B, Whence::SeekData), Ok(2 * B), "{name}");
    }
    m.unmount();
    fsck_spotless(&img);
}
