//! Focused regression tests for library bugs the crash-consistency
//! suite and the fault simulation found (tests/src/ace.rs, sim.rs).

use bufcache::recording::FaultDevice;
use bufcache::BlockDevice;
use hammer2::disk::ObjType;
use hammer2::mount::{SetAttr, ROOT_INUM};
use hammer2::Error;
use std::sync::Arc;
use tests::{create_file, new_fs, open, T0};

/// A size change is for regular files only (DragonFly's setattr:
/// EINVAL): truncating a symlink once rewrote its target.
#[test]
fn setattr_size_refuses_non_files() {
    let dev = new_fs(1);
    let mut m = open(&dev);
    let l = m
        .symlink("DATA", ROOT_INUM, b"ln", b"target", 0, 0, T0)
        .unwrap();
    let f = m
        .create(
            "DATA",
            ROOT_INUM,
            b"fifo",
            ObjType::Fifo,
            0o644,
            0,
            0,
            (0, 0),
            T0,
        )
        .unwrap();
    let d = m.mkdir("DATA", ROOT_INUM, b"d", 0o755, 0, 0, T0).unwrap();
    let size = SetAttr {
        size: Some(1),
        ..SetAttr::default()
    };
    assert!(matches!(
        m.setattr("DATA", l, size, T0),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        m.setattr("DATA", f, size, T0),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        m.setattr("DATA", d, size, T0),
        Err(Error::IsDir { .. })
    ));
    m.flush().unwrap();
    let mut m = open(&dev);
    assert_eq!(m.readlink("DATA", l).unwrap(), b"target");
}

/// A file of four 64 KiB blocks, flushed, reopened through a fault
/// device: (device, mount, inode, contents).
fn four_block_file() -> (
    Arc<FaultDevice>,
    Arc<bufcache::MemDevice>,
    hammer2::mount::Mount,
    u64,
    Vec<u8>,
) {
    let dev = new_fs(2);
    let mut m = open(&dev);
    let f = create_file(&mut m, "DATA", ROOT_INUM, b"f").unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8 + 1).collect();
    m.write("DATA", f, 0, &data, T0).unwrap();
    m.flush().unwrap();
    drop(m);
    let fault = Arc::new(FaultDevice::new(dev.clone()));
    let d: Arc<dyn BlockDevice> = fault.clone();
    let mut m = hammer2::mount::Mount::open(d).unwrap();
    m.getattr("DATA", f).unwrap();
    (fault, dev, m, f, data)
}

/// After a failed call and a flush, a remount shows `want`.
fn flushed_contents(
    fault: &FaultDevice,
    dev: &Arc<bufcache::MemDevice>,
    mut m: hammer2::mount::Mount,
    f: u64,
    want: &[u8],
) {
    fault.heal();
    m.flush().unwrap();
    drop(m);
    let mut m = open(dev);
    assert_eq!(m.getattr("DATA", f).unwrap().size, want.len() as u64);
    assert!(m.read("DATA", f, 0, want.len() + 1).unwrap() == want);
}

/// A truncate whose read of the new last block fails changes nothing:
/// it once dropped the blocks past the new end first, and the next
/// flush committed a file of the old size with those blocks gone.
#[test]
fn truncate_failing_on_a_read_changes_nothing() {
    let (fault, dev, mut m, f, data) = four_block_file();
    fault.fail_reads_after(0);
    let a = SetAttr {
        size: Some(70_000),
        ..SetAttr::default()
    };
    assert!(matches!(m.setattr("DATA", f, a, T0), Err(Error::Io { .. })));
    flushed_contents(&fault, &dev, m, f, &data);
}

/// A write over two partial blocks whose second read fails changes
/// nothing (it once changed the first block, and the flush kept it).
#[test]
fn write_failing_on_a_read_changes_nothing() {
    let (fault, dev, mut m, f, data) = four_block_file();
    fault.fail_reads_after(1);
    assert!(matches!(
        m.write("DATA", f, 1000, &[0xee; 70_000], T0),
        Err(Error::Io { .. })
    ));
    flushed_contents(&fault, &dev, m, f, &data);
}

/// A truncate that leaves a partial last block makes that block pending:
/// on a full disk it once went unadmitted, so the flush, not the
/// truncate, ran out of space. Shrinking is a deletion, which may take
/// half the flush reserve (so a full volume can still be emptied): with
/// a reserve of two chunks, the partial block (64 KiB) and the inode do
/// not fit in one, and the truncate is refused with NoSpace (nothing
/// changed); a block-aligned one fits, and the flush completes.
#[test]
fn truncate_to_a_partial_block_is_admitted_on_a_full_disk() {
    let dev = new_fs(2);
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let ino = {
        let mut m = open(&dev);
        let ino = create_file(&mut m, "DATA", ROOT_INUM, b"f").unwrap();
        m.write("DATA", ino, 0, &data, T0).unwrap();
        m.flush().unwrap();
        ino
    };
    let mut m = tests::open_nearly_full(&dev, 2);
    let to = SetAttr {
        size: Some(4000),
        ..SetAttr::default()
    };
    assert!(matches!(
        m.setattr("DATA", ino, to, T0),
        Err(Error::NoSpace { .. })
    ));
    // A block-aligned truncate leaves nothing partial: only the inode.
    let aligned = SetAttr {
        size: Some(131_072),
        ..SetAttr::default()
    };
    m.setattr("DATA", ino, aligned, T0).unwrap();
    m.flush().expect("the flush has room");
    let mut m = open(&dev);
    assert_eq!(m.read("DATA", ino, 0, 1 << 20).unwrap(), &data[..131_072]);
}
