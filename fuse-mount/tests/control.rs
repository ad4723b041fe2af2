//! The `hammer2` tool against a running mount.hammer2, through the
//! control channel (ioctls on a file of the mount), end to end through
//! the kernel: `mark` with and without a device that keeps a write log,
//! refused to users other than root.
//!
//! These tests need root and /dev/fuse, and the `hammer2` binary built
//! beside mount.hammer2 (`cargo build --workspace --bins`, as
//! scripts/test does first); they fail (not skip) without them.

mod common;
use common::*;

use bufcache::FileDevice;
use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
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

/// A new sparse image of `gib` GiB made by the library's newfs, with
/// PFSs LOCAL and DATA.
fn new_image(tag: &str, gib: u64) -> PathBuf {
    let path = scratch(tag).join("disk.img");
    File::create(&path)
        .and_then(|f| f.set_len(gib << 30))
        .expect("create image");
    let dev = FileDevice::open(&path, true).expect("open image");
    mkfs::newfs::newfs(&dev, &mkfs::newfs::NewfsOptions::default()).expect("newfs");
    path
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
        nix::mount::umount(&guard.mnt).expect("umount");
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
    let img = new_image("mark", 2);
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

/// setcomp/setcheck on paths in a mount: the daemon changes each inode
/// (the tool walks `-r` itself), new writes follow, old blocks keep
/// theirs; read offline after the unmount, fsck clean.
#[test]
fn setcomp_and_setcheck_through_a_mount() {
    require_fuse();
    let img = new_image("setmethods", 2);
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
