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

mod common;
use common::*;

use bufcache::{BlockDevice, FileDevice};
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

/// A new 4 GiB sparse image made by the library's newfs (PFSs LOCAL and
/// DATA).
fn new_image(tag: &str) -> PathBuf {
    let path = scratch(tag).join("disk.img");
    File::create(&path)
        .and_then(|f| f.set_len(4 << 30))
        .expect("create image");
    let dev = FileDevice::open(&path, true).expect("open image");
    mkfs::newfs::newfs(&dev, &mkfs::newfs::NewfsOptions::default()).expect("newfs");
    path
}

/// fsck (with its freemap cross-check): no problems and no warnings.
fn fsck_clean(img: &Path) {
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(img, false).expect("open image"));
    let r = hammer2::fsck::fsck(dev, hammer2::fsck::Options::default()).expect("fsck");
    let problems: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
    assert!(problems.is_empty(), "fsck: {problems:#?}");
    let warnings: Vec<String> = r.warnings.iter().map(|w| w.to_string()).collect();
    assert!(warnings.is_empty(), "fsck warnings: {warnings:#?}");
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
    let img = new_image("nlink");
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
    fsck_clean(&img);
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
    let img = new_image("handles");
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
    fsck_clean(&img);

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
    fsck_clean(&img);
}

/// A crash loses the inode numbers given since the last flush, and the
/// next mount gives them again: a handle to a lost file must be stale,
/// not open the new file that has its number (the generation, from the
/// inode's creation time, tells them apart).
#[test]
fn a_handle_to_a_file_lost_in_a_crash_does_not_open_its_successor() {
    require_fuse();
    let img = new_image("handles-crash");
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
    fsck_clean(&img);
}

/// The permission bits of `p` in octal, asked of the daemon (statx
/// with AT_STATX_FORCE_SYNC, not the kernel's attribute cache).
fn mode_of(p: &Path) -> String {
    let out = std::process::Command::new("stat")
        .args(["--cached=never", "-c", "%a"])
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
/// filesystems); root keeps both.
#[test]
fn unprivileged_data_changes_clear_set_id_bits() {
    require_fuse();
    let img = new_image("killpriv");
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
        assert_eq!(&mode_of(&f), before);
        run_as(*uid, *gid, cmd);
        assert_eq!(&mode_of(&f), after, "{before}, {cmd:?} as {uid}:{gid}");
    }
    m.unmount();
    fsck_clean(&img);
}
