//! Damage that passes the check codes (made with `tests::craft`) under
//! a real mount, read-only and read-write: a symlink, a file or an inode
//! whose stored size cannot be served fails with EIO and a line in the
//! log naming it, and the daemon serves on (it used to allocate the
//! stored size and abort). And a file unlinked while open when the
//! daemon is killed is an orphan fsck reports, which the next
//! read-write mount removes. And a write into a block damaged on disk
//! is EIO (at the write or at the fsync after it) without stopping the
//! mount.
//!
//! These tests need root and /dev/fuse, and fail (not skip) without them.

use bufcache::{BlockDevice, FileDevice};
use hammer2::disk::ObjType;
use hammer2::mount::{Mount, ROOT_INUM};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tests::craft::Craft;

mod common;
use common::*;

const L: &str = "DATA";
const T: u64 = 1_700_000_000_000_000;

/// A 2 GiB image with /ok (a file), /ln and /longln (symlinks, the
/// second past the inode's 512 bytes), /direct (100 bytes in the inode)
/// and /big (a file), then damaged: both symlinks claim 16 TiB, /direct
/// 4 KiB (more than an inode holds) and /big 2^63 bytes.
fn damaged_image(tag: &str) -> PathBuf {
    let path = scratch(tag).join("disk.img");
    File::create(&path)
        .and_then(|f| f.set_len(2 << 30))
        .expect("create image");
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&path, true).expect("open"));
    mkfs::newfs::newfs(dev.as_ref(), &mkfs::newfs::NewfsOptions::default()).expect("newfs");
    let mut m = Mount::open(dev.clone()).expect("open rw");
    let file = |m: &mut Mount, name: &[u8], body: &[u8]| {
        let f = m
            .create(L, ROOT_INUM, name, ObjType::Regfile, 0o644, 0, 0, (0, 0), T)
            .unwrap();
        m.write(L, f, 0, body, T).unwrap();
        f
    };
    file(&mut m, b"ok", b"still readable");
    let direct = file(&mut m, b"direct", &[1u8; 100]);
    let big = file(&mut m, b"big", &[2u8; 100_000]);
    let ln = m.symlink(L, ROOT_INUM, b"ln", b"ok", 0, 0, T).unwrap();
    let longln = m
        .symlink(L, ROOT_INUM, b"longln", &[b'x'; 1000], 0, 0, T)
        .unwrap();
    m.flush().unwrap();
    drop(m);
    let c = Craft::new(dev);
    for (inum, size) in [
        (ln, 1u64 << 44),
        (longln, 1 << 44),
        (direct, 4096),
        (big, 1 << 63),
    ] {
        c.edit_inode(c.inode(L, inum), |ino| ino.meta.size = size);
    }
    path
}

fn eio<T: std::fmt::Debug>(r: std::io::Result<T>, what: &str) {
    match r {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}"),
        Ok(v) => panic!("{what}: expected EIO, got {v:?}"),
    }
}

fn serves_damaged_sizes_as_eio(opts: &str, tag: &str) {
    require_fuse();
    let img = damaged_image(tag);
    let mnt = scratch(&format!("{tag}-mnt"));
    let log = scratch(tag).join("mount.log");
    let (mut child, _m) = mount_foreground(img.to_str().unwrap(), &mnt, &log, opts);

    eio(std::fs::read_link(mnt.join("ln")), "readlink ln");
    eio(std::fs::read_link(mnt.join("longln")), "readlink longln");
    eio(std::fs::read(mnt.join("direct")), "read direct");
    eio(std::fs::metadata(mnt.join("big")), "stat big");
    // The daemon serves on: the rest reads, the listing is whole.
    assert!(child.try_wait().unwrap().is_none(), "the daemon died");
    assert_eq!(std::fs::read(mnt.join("ok")).unwrap(), b"still readable");
    let mut names: Vec<String> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["big", "direct", "ln", "longln", "ok"]);

    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert!(status.success(), "exit after SIGTERM: {status}");
    let text = std::fs::read_to_string(&log).unwrap();
    for what in [
        "symlink target of 17592186044416 bytes",
        "direct data of 4096 bytes",
        "exceeds the largest file size",
    ] {
        assert!(
            text.lines()
                .any(|l| l.contains("damaged block") && l.contains(what)),
            "no log line for {what:?}:\n{text}"
        );
    }
    std::fs::remove_file(&img).unwrap();
}

#[test]
fn damaged_sizes_are_eio_on_a_read_only_mount() {
    serves_damaged_sizes_as_eio("ro", "dmg-ro");
}

#[test]
fn damaged_sizes_are_eio_on_a_read_write_mount() {
    serves_damaged_sizes_as_eio("rw", "dmg-rw");
}

fn orphans(img: &Path) -> Vec<hammer2::fsck::Orphan> {
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(img, false).unwrap());
    let r = hammer2::fsck::fsck(dev, hammer2::fsck::Options::default()).unwrap();
    let problems: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
    assert!(problems.is_empty(), "{problems:#?}");
    r.orphans
}

/// kill -9 with a file open and unlinked (and flushed so): the inode is
/// an orphan on disk; the next read-write mount removes it and says so.
#[test]
fn an_open_unlinked_file_left_by_a_killed_daemon_is_reclaimed_at_the_next_mount() {
    require_fuse();
    let img = scratch("orphan").join("disk.img");
    File::create(&img)
        .and_then(|f| f.set_len(2 << 30))
        .expect("create image");
    let dev = FileDevice::open(&img, true).expect("open");
    mkfs::newfs::newfs(&dev, &mkfs::newfs::NewfsOptions::default()).expect("newfs");
    drop(dev);
    let mnt = scratch("orphan-mnt");
    let log = scratch("orphan").join("mount1.log");

    let (mut child, guard) = mount_foreground(img.to_str().unwrap(), &mnt, &log, "rw");
    let path = mnt.join("tmp");
    let mut f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    f.write_all(&vec![0x5a; 1 << 20]).unwrap();
    std::fs::remove_file(&path).unwrap();
    f.sync_all().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    drop(f);
    drop(guard);
    let left = orphans(&img);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].nlinks, 0);

    let log = scratch("orphan").join("mount2.log");
    let (mut child, _guard) = mount_foreground(img.to_str().unwrap(), &mnt, &log, "rw");
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert!(status.success(), "exit after SIGTERM: {status}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!(
            "PFS DATA: removing 1 orphaned inodes (unlinked while open before a crash): [{}]",
            left[0].inum
        )),
        "{text}"
    );
    assert_eq!(orphans(&img), []);
    std::fs::remove_file(&img).unwrap();
}

/// A write into part of a block whose bytes on disk no longer match
/// their check code, through a read-write mount: the damage surfaces as
/// EIO, at the write when the block was in the cache (it is checked
/// then) or at the fsync after it when it was not (the flush merges the
/// old bytes, cannot, drops that write and says so in the log; the path
/// this image takes); either way the daemon serves on, a write
/// elsewhere in the same file is durable, a later fsync succeeds, and
/// the damaged block still reads as EIO after a remount.
#[test]
fn a_write_into_a_damaged_block_is_eio_and_the_mount_goes_on() {
    require_fuse();
    const B: u64 = 65536;
    let img = scratch("dmg-write").join("disk.img");
    File::create(&img)
        .and_then(|f| f.set_len(2 << 30))
        .expect("create image");
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&img, true).expect("open"));
    mkfs::newfs::newfs(dev.as_ref(), &mkfs::newfs::NewfsOptions::default()).expect("newfs");
    let mut m = Mount::open(dev.clone()).expect("open rw");
    let f = m
        .create(
            L,
            ROOT_INUM,
            b"data",
            ObjType::Regfile,
            0o644,
            0,
            0,
            (0, 0),
            T,
        )
        .unwrap();
    // Incompressible, so each block is stored as written.
    m.write(L, f, 0, &noise(3, 16 * B as usize), T).unwrap();
    m.flush().unwrap();
    drop(m);
    let c = Craft::new(dev.clone());
    let victim = c.bref(c.leaves(L, f)[9]).data_off.offset();
    dev.write_at(&[0xa5; 32], victim + 1000).unwrap();
    drop(c);
    drop(dev);

    let mnt = scratch("dmg-write-mnt");
    let m = Rw::new(&img, &mnt, "rw");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("data"))
        .unwrap();
    use std::os::unix::fs::FileExt;
    file.write_all_at(b"elsewhere", 2 * B + 7).unwrap();
    let at_write = file.write_all_at(b"into the damage", 9 * B + 10);
    match at_write {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "write: {e}"),
        Ok(()) => {
            eio(file.sync_all(), "fsync after a write into a damaged block");
            let log = m.log();
            assert!(
                log.lines().any(|l| l.contains(&format!("inode {f}"))
                    && l.contains("0x90000")
                    && l.contains("is lost")),
                "no log line for the lost write:\n{log}"
            );
        }
    }
    // The mount goes on: another write and fsync succeed.
    file.write_all_at(b"later", 4 * B).unwrap();
    file.sync_all().unwrap();
    drop(file);
    m.unmount();

    let m = Rw::new(&img, &mnt, "ro");
    let mut got = vec![0u8; 9];
    let file = File::open(mnt.join("data")).unwrap();
    file.read_exact_at(&mut got, 2 * B + 7).unwrap();
    assert_eq!(&got, b"elsewhere");
    file.read_exact_at(&mut got[..5], 4 * B).unwrap();
    assert_eq!(&got[..5], b"later");
    let mut one = [0u8; 1];
    eio(
        file.read_exact_at(&mut one, 9 * B + 10),
        "read of the damaged block",
    );
    drop(file);
    m.unmount();
    std::fs::remove_file(&img).unwrap();
}
