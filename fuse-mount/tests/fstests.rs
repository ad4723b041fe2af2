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
