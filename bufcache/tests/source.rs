//! Opening what the tools are named (`bufcache::source`) and locking it:
//! a partition named either way (`s1d`, `p1d`) is the same bytes and
//! locks as such, two partitions of one disk lock apart, the HAMMER2
//! partition is found by its volume header, and an NBD export locks the
//! same however its URI is spelled.

#[path = "../../tests/src/disks.rs"]
mod disks;
#[path = "../../tests/src/nbdserver.rs"]
mod nbdserver;

use bufcache::imagelock::{lock_writer_at, LockError};
use bufcache::source::{open, Pick};
use bufcache::BlockDevice;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

const MAGIC: u64 = 0x4841_4d32_0517_2011;

fn has_magic(dev: &dyn BlockDevice) -> bool {
    let mut b = [0u8; 8];
    dev.read_at(&mut b, 0).is_ok() && u64::from_le_bytes(b) == MAGIC
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("source-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn partitions_lock_by_their_bytes() {
    let dir = scratch("parts");
    let img = dir.join("d.raw");
    let (_, s1d, s2, _) = disks::mbr_disklabel64(&img);
    let s = img.to_str().unwrap();
    // Nothing holds HAMMER2 yet.
    let e = open(s, false, Pick::Auto, &has_magic).err().unwrap();
    assert!(e.to_string().contains("no partition holds one"), "{e}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&MAGIC.to_le_bytes(), s1d.start)
        .unwrap();
    let auto = open(s, true, Pick::Auto, &has_magic).unwrap();
    assert_eq!(auto.name, format!("{s}:s1d"));
    assert_eq!(auto.dev.size_bytes(), s1d.size);
    assert_eq!(
        (auto.backing.start, auto.backing.end),
        (s1d.start, Some(s1d.start + s1d.size))
    );
    let a = open(&format!("{s}:s1d"), true, Pick::Auto, &has_magic).unwrap();
    let b = open(&format!("{s}:p1d"), true, Pick::Auto, &has_magic).unwrap();
    let other = open(&format!("{s}:s2"), true, Pick::Auto, &has_magic).unwrap();
    assert_eq!(other.dev.size_bytes(), s2.size);
    let held = lock_writer_at(&a.backing, None, false, || {}).unwrap();
    let e = lock_writer_at(&b.backing, None, false, || {})
        .err()
        .unwrap();
    assert!(matches!(e, LockError::Mounted { .. }), "{e}");
    let e = lock_writer_at(&auto.backing, None, false, || {})
        .err()
        .unwrap();
    assert!(matches!(e, LockError::Mounted { .. }), "{e}");
    // Another partition of the same disk is other bytes.
    let _beside = lock_writer_at(&other.backing, None, false, || {}).unwrap();
    // And the disk whole overlaps both.
    let whole = open(s, true, Pick::Whole, &has_magic).unwrap();
    assert!(lock_writer_at(&whole.backing, None, false, || {}).is_err());
    drop(held);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_nbd_export_locks_however_it_is_spelled() {
    assert!(
        nbdserver::available(nbdserver::Server::QemuNbd),
        "qemu-nbd is needed"
    );
    let dir = scratch("nbd");
    let img = dir.join("e.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let srv = nbdserver::NbdServer::start(nbdserver::Server::QemuNbd, &img, "raw", Some(&dir));
    let nbdserver::Listen::Unix(sock) = &srv.listen else {
        unreachable!()
    };
    let link = dir.join("other-name.sock");
    std::os::unix::fs::symlink(sock, &link).unwrap();
    let a = open(&srv.uri, true, Pick::Whole, &has_magic).unwrap();
    let b = open(
        &format!("nbd+unix:///h2?socket={}", link.display()),
        true,
        Pick::Whole,
        &has_magic,
    )
    .unwrap();
    assert_eq!(a.backing.data, b.backing.data);
    assert!(a.backing.data.metadata().unwrap().len() >= 64 << 20);
    let _held = lock_writer_at(&a.backing, None, false, || {}).unwrap();
    let e = lock_writer_at(&b.backing, None, false, || {})
        .err()
        .unwrap();
    assert!(matches!(e, LockError::Mounted { .. }), "{e}");
    assert!(e.to_string().contains("nbd+unix://"), "{e}");
}
