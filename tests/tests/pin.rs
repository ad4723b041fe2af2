//! `Mount::pin`: an inode unlinked while pinned stays readable and
//! writable by number, is flushed (with no links) while pinned, and
//! leaves the index at the flush after its last pin goes; fsck is clean
//! at the end, and an image flushed while the inode was pinned shows it
//! as an orphan (a warning, as DragonFly leaves after a crash). Also
//! `seek_hole` and `dirty_bytes`.

use bufcache::{BlockDevice, MemDevice};
use hammer2::disk::ObjType;
use hammer2::fsck::{fsck, Options};
use hammer2::mount::{Mount, SetAttr, ROOT_INUM};
use hammer2::Error;
use std::sync::Arc;

const NOW: u64 = 1_700_000_000_000_000;
const L: &str = "DATA";

fn image() -> Arc<MemDevice> {
    let dev = Arc::new(MemDevice::new(2 << 30));
    let opts = mkfs::newfs::NewfsOptions {
        now_us: Some(NOW),
        uuid_seed: Some(7),
        ..Default::default()
    };
    mkfs::newfs::newfs(dev.as_ref(), &opts).unwrap();
    dev
}

fn open(dev: &Arc<MemDevice>) -> Mount {
    let d: Arc<dyn BlockDevice> = dev.clone();
    Mount::open(d).unwrap()
}

fn file(m: &mut Mount, name: &str) -> u64 {
    m.create(
        L,
        ROOT_INUM,
        name.as_bytes(),
        ObjType::Regfile,
        0o644,
        0,
        0,
        (0, 0),
        NOW,
    )
    .unwrap()
}

/// fsck's problems and warnings.
fn problems(dev: &Arc<MemDevice>) -> (Vec<String>, Vec<String>) {
    let d: Arc<dyn BlockDevice> = dev.clone();
    let r = fsck(d, Options::default()).unwrap();
    let p = r.problems.iter().map(|p| p.to_string()).collect();
    (p, r.warnings.iter().map(|w| w.to_string()).collect())
}

#[test]
fn a_pinned_inode_outlives_its_last_link() {
    let dev = image();
    let mut m = open(&dev);
    let a = file(&mut m, "a");
    let data = vec![0x5au8; 200_000];
    m.write(L, a, 0, &data, NOW).unwrap();
    m.flush().unwrap();

    m.pin(L, a).unwrap();
    m.pin(L, a).unwrap();
    assert_eq!(m.pin_count(L, a), 2);
    m.unlink(L, ROOT_INUM, b"a", NOW + 1).unwrap();
    assert_eq!(m.lookup(L, ROOT_INUM, b"a").unwrap(), None);
    assert_eq!(m.getattr(L, a).unwrap().nlinks, 0);
    assert_eq!(m.read(L, a, 0, data.len()).unwrap(), data);
    m.write(L, a, 300_000, b"more", NOW + 2).unwrap();
    // Flushed while pinned: still there, also once evicted from memory.
    m.flush().unwrap();
    m.release_clean();
    assert_eq!(m.read(L, a, 300_000, 4).unwrap(), b"more");
    assert_eq!(m.getattr(L, a).unwrap().size, 300_004);

    // A crash now leaves an orphan: a warning, not damage.
    {
        let (p, w) = problems(&dev);
        assert!(p.is_empty(), "{p:#?}");
        assert!(w.iter().any(|w| w.contains("orphan")), "{w:#?}");
    }

    m.unpin(L, a).unwrap();
    assert_eq!(m.read(L, a, 0, 4).unwrap(), vec![0x5a; 4], "one pin left");
    m.unpin(L, a).unwrap();
    assert_eq!(m.pin_count(L, a), 0);
    assert!(matches!(m.getattr(L, a), Err(Error::NotFound { .. })));
    assert!(m.is_dirty());
    m.flush().unwrap();
    drop(m);
    let (p, w) = problems(&dev);
    assert!(p.is_empty(), "{p:#?}");
    assert!(w.is_empty(), "{w:#?}");
    let mut m = open(&dev);
    assert!(matches!(m.getattr(L, a), Err(Error::NotFound { .. })));
}

#[test]
fn unpinned_or_linked_inodes_behave_as_before() {
    let dev = image();
    let mut m = open(&dev);
    // Never flushed, pinned, unlinked, unpinned: gone without a trace.
    let t = file(&mut m, "tmp");
    m.pin(L, t).unwrap();
    m.write(L, t, 0, b"scratch", NOW).unwrap();
    m.unlink(L, ROOT_INUM, b"tmp", NOW).unwrap();
    assert_eq!(m.read(L, t, 0, 7).unwrap(), b"scratch");
    m.unpin(L, t).unwrap();
    assert!(m.getattr(L, t).is_err());
    // Unpinned: unlink removes at once, as before.
    let b = file(&mut m, "b");
    m.unlink(L, ROOT_INUM, b"b", NOW).unwrap();
    assert!(m.getattr(L, b).is_err());
    // Pinned with a link left: unpin changes nothing.
    let c = file(&mut m, "c");
    m.link(L, c, ROOT_INUM, b"c2", NOW).unwrap();
    m.pin(L, c).unwrap();
    m.unlink(L, ROOT_INUM, b"c", NOW).unwrap();
    m.unpin(L, c).unwrap();
    assert_eq!(m.getattr(L, c).unwrap().nlinks, 1);
    // Unpinning what was never pinned is harmless.
    m.unpin(L, c).unwrap();
    m.flush().unwrap();
    drop(m);
    let (p, w) = problems(&dev);
    assert!(p.is_empty(), "{p:#?}");
    assert!(w.is_empty(), "{w:#?}");
}

#[test]
fn seek_hole_and_dirty_bytes() {
    const B: u64 = 65536;
    let dev = image();
    let mut m = open(&dev);
    let f = file(&mut m, "sparse");
    assert_eq!(m.dirty_bytes(), 0);
    // data in blocks 0 and 1, a hole in 2..4, data in 4, size 5.5 blocks
    m.write(L, f, 0, &vec![1u8; 2 * B as usize], NOW).unwrap();
    m.write(L, f, 4 * B, &vec![2u8; B as usize + 100], NOW)
        .unwrap();
    assert_eq!(m.dirty_bytes(), 3 * B + B);
    let size = 5 * B + 100;
    for flushed in [false, true] {
        assert_eq!(m.seek_hole(L, f, 0).unwrap(), 2 * B, "flushed {flushed}");
        assert_eq!(m.seek_hole(L, f, 2 * B + 5).unwrap(), 2 * B + 5);
        assert_eq!(m.seek_data(L, f, 2 * B + 5).unwrap(), Some(4 * B));
        assert_eq!(m.seek_hole(L, f, 4 * B).unwrap(), size);
        assert_eq!(m.seek_hole(L, f, size).unwrap(), size);
        m.flush().unwrap();
        assert_eq!(m.dirty_bytes(), 0);
    }
    // A small file keeps its data in the inode: no hole before the end.
    let s = file(&mut m, "small");
    m.write(L, s, 0, b"tiny", NOW).unwrap();
    assert_eq!(m.seek_hole(L, s, 1).unwrap(), 4);
}

/// Pending file data holds what was written of each block: a 4 KiB
/// file 4 KiB, a byte written far into a block the bytes up to it, a
/// whole block 64 KiB. What reads back is the same as with whole blocks
/// (zeros past what was written), before and after the flush.
#[test]
fn pending_bytes_count_what_was_written() {
    const B: u64 = 65536;
    let dev = image();
    let mut m = open(&dev);
    let small = file(&mut m, "small");
    m.write(L, small, 0, &[7u8; 4096], NOW).unwrap();
    assert_eq!(m.pending_bytes(), 4096);
    let sparse = file(&mut m, "sparse");
    m.write(L, sparse, B + 999, b"x", NOW).unwrap();
    assert_eq!(m.pending_bytes(), 4096 + 1000);
    let whole = file(&mut m, "whole");
    m.write(L, whole, 0, &vec![3u8; B as usize], NOW).unwrap();
    assert_eq!(m.pending_bytes(), 4096 + 1000 + B);
    // Whole-block accounting for admission is unchanged.
    assert_eq!(m.dirty_bytes(), 3 * B);
    for flushed in [false, true] {
        let mut want = vec![0u8; B as usize + 1000];
        want[B as usize + 999] = b'x';
        assert_eq!(m.read(L, sparse, 0, 2 * B as usize).unwrap(), want);
        // Growing the small file shows zeros between the old end and the
        // new data.
        if !flushed {
            assert_eq!(m.read(L, small, 0, B as usize).unwrap(), vec![7u8; 4096]);
            m.write(L, small, 8192, b"yz", NOW).unwrap();
        }
        let mut want = vec![7u8; 4096];
        want.resize(8192, 0);
        want.extend_from_slice(b"yz");
        assert_eq!(
            m.read(L, small, 0, B as usize).unwrap(),
            want,
            "flushed {flushed}"
        );
        m.flush().unwrap();
        assert_eq!(m.pending_bytes(), 0);
    }
    // Truncating into a block and growing again reads zeros past the cut.
    m.write(L, whole, 0, &vec![5u8; B as usize], NOW).unwrap();
    let cut = SetAttr {
        size: Some(100),
        ..SetAttr::default()
    };
    m.setattr(L, whole, cut, NOW).unwrap();
    let grow = SetAttr {
        size: Some(B),
        ..SetAttr::default()
    };
    m.setattr(L, whole, grow, NOW).unwrap();
    let mut want = vec![5u8; 100];
    want.resize(B as usize, 0);
    assert_eq!(m.read(L, whole, 0, B as usize).unwrap(), want);
    m.flush().unwrap();
    assert_eq!(m.read(L, whole, 0, B as usize).unwrap(), want);
}
