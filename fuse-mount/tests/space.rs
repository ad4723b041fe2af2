//! Space through a real read-write mount: what overwrites and deletions
//! free comes back by itself (freed at flush time, or by the automatic
//! bulkfree), `df`'s available space leaves out the flush reserve that
//! writes cannot take, fallocate reserves room that later writes cannot
//! be refused. Checked with statvfs(2), the errors the kernel returns,
//! what reads back, and fsck of the image after each unmount.
//!
//! These tests need root and /dev/fuse, and fail (not skip) without.

mod common;
use common::*;

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// Write `len` bytes of noise to `path` in 1 MiB writes; stop at the
/// first error and return it with the bytes written.
fn write_file(path: &Path, seed: u64, len: u64) -> (u64, Option<std::io::Error>) {
    let mut f = match File::create(path) {
        Ok(f) => f,
        Err(e) => return (0, Some(e)),
    };
    let mut done = 0;
    while done < len {
        let n = (len - done).min(MIB);
        if let Err(e) = f.write_all(&noise(seed ^ done, n as usize)) {
            return (done, Some(e));
        }
        done += n;
    }
    (done, None)
}

/// statvfs: (free, available) bytes.
fn df(mnt: &Path) -> (u64, u64) {
    let s = nix::sys::statvfs::statvfs(mnt).expect("statvfs");
    let bs = s.fragment_size() as u64;
    (
        s.blocks_free() as u64 * bs,
        s.blocks_available() as u64 * bs,
    )
}

/// A 1 GiB volume takes a 400 MiB file written, deleted and written
/// again three times, then a random 4 KiB write and fsync loop over a
/// 128 MiB file, with no bulkfree: every flush frees what it dropped.
/// Before, the third file failed with ENOSPC (1.2 GB written to 1 GiB).
#[test]
fn overwrites_and_deletes_come_back_without_bulkfree() {
    require_fuse();
    let img = new_volume("reuse", 1);
    let mnt = scratch("reuse-mnt");
    let m = Rw::new(&img, &mnt, "rw,noautobulkfree");
    let (_, avail0) = df(&mnt);
    for round in 0..3u64 {
        let (n, err) = write_file(&mnt.join("big"), round, 400 * MIB);
        assert!(err.is_none(), "round {round}: {n} bytes, then {err:?}");
        let f = File::open(mnt.join("big")).unwrap();
        f.sync_all().unwrap();
        let mut buf = vec![0u8; 4096];
        f.read_exact_at(&mut buf, 300 * MIB).unwrap();
        assert_eq!(buf, noise(round ^ (300 * MIB), 4096));
        fs::remove_file(mnt.join("big")).unwrap();
    }
    let (n, err) = write_file(&mnt.join("db"), 99, 128 * MIB);
    assert!(err.is_none(), "db: {n} bytes, then {err:?}");
    let db = OpenOptions::new().write(true).open(mnt.join("db")).unwrap();
    let mut x = 12345u64;
    for i in 0..1500u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let at = (x % (128 * MIB / 4096)) * 4096;
        db.write_all_at(&noise(i, 4096), at)
            .unwrap_or_else(|e| panic!("write {i}: {e}"));
        db.sync_data().unwrap_or_else(|e| panic!("fsync {i}: {e}"));
    }
    drop(db);
    fs::remove_file(mnt.join("db")).unwrap();
    File::open(&mnt).unwrap().sync_all().unwrap();
    // Freed blocks wait for the next headers; the interval flushes
    // write them (a few seconds).
    wait_until("the space to come back", Duration::from_secs(60), || {
        df(&mnt).1 + 4 * MIB >= avail0
    });
    let log = m.unmount();
    assert!(!log.contains("bulkfree"), "bulkfree ran:\n{log}");
    fsck_clean(&img);
}

/// Blocks an earlier mount wrote may be shared (dedup leaves no mark on
/// disk), so deleting them leaves their space to bulkfree: without
/// autobulkfree a rewrite fails with ENOSPC, with it (the default) the
/// mount runs bulkfree before failing and the write goes through.
#[test]
fn autobulkfree_frees_what_an_earlier_mount_wrote() {
    require_fuse();
    let img = new_volume("autobf", 1);
    let mnt = scratch("autobf-mnt");
    let m = Rw::new(&img, &mnt, "rw");
    let (n, err) = write_file(&mnt.join("old"), 1, 600 * MIB);
    assert!(err.is_none(), "{n} bytes, then {err:?}");
    m.unmount();
    // Without: ENOSPC.
    let m = Rw::new(&img, &mnt, "rw,noautobulkfree");
    fs::remove_file(mnt.join("old")).unwrap();
    let (n, err) = write_file(&mnt.join("new"), 2, 600 * MIB);
    let err = err.expect("no ENOSPC without bulkfree");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOSPC),
        "{n} bytes, then {err}"
    );
    // df says what a write can still take.
    let (_, avail) = df(&mnt);
    assert!(
        avail < 2 * MIB,
        "df shows {avail} bytes available on a full volume"
    );
    fs::remove_file(mnt.join("new")).unwrap();
    m.unmount();
    fsck_clean(&img);
    // With: the same goes through.
    let m = Rw::new(&img, &mnt, "rw");
    let (n, err) = write_file(&mnt.join("new"), 3, 600 * MIB);
    assert!(err.is_none(), "{n} bytes, then {err:?}");
    let f = File::open(mnt.join("new")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 500 * MIB).unwrap();
    assert_eq!(buf, noise(3 ^ (500 * MIB), 4096));
    drop(f);
    let log = m.unmount();
    assert!(
        log.contains("running bulkfree"),
        "no bulkfree in the log:\n{log}"
    );
    fsck_clean(&img);
}

/// fallocate past the free space fails with ENOSPC; within it, the room
/// is held: after everything else is filled, writes into the range
/// succeed.
#[test]
fn fallocate_reserves_room() {
    require_fuse();
    let img = new_volume("falloc", 1);
    let mnt = scratch("falloc-mnt");
    let m = Rw::new(&img, &mnt, "rw,noautobulkfree");
    let f = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(mnt.join("pre"))
        .unwrap();
    let r = nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, 100 << 30);
    assert_eq!(
        r,
        Err(nix::errno::Errno::ENOSPC),
        "a 100 GiB fallocate on 1 GiB"
    );
    assert_eq!(
        f.metadata().unwrap().len(),
        0,
        "the failed fallocate changed the size"
    );
    nix::fcntl::fallocate(
        &f,
        nix::fcntl::FallocateFlags::empty(),
        0,
        (128 * MIB) as i64,
    )
    .expect("fallocate 128 MiB");
    assert_eq!(f.metadata().unwrap().len(), 128 * MIB);
    let (n, err) = write_file(&mnt.join("fill"), 7, 2 << 30);
    let err = err.expect("the fill ends with ENOSPC");
    assert_eq!(err.kind(), ErrorKind::StorageFull, "{n} bytes, then {err}");
    for i in 0..128u64 {
        f.write_all_at(&noise(i, MIB as usize), i * MIB)
            .unwrap_or_else(|e| panic!("write at {i} MiB into the reserved range: {e}"));
    }
    f.sync_all().expect("fsync");
    let mut buf = vec![0u8; MIB as usize];
    f.read_exact_at(&mut buf, 77 * MIB).unwrap();
    assert_eq!(buf, noise(77, MIB as usize));
    drop(f);
    m.unmount();
    fsck_clean(&img);
}
