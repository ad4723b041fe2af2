//! Decoded metadata stays in memory across flushes, within its budget:
//! after a flush, looking up and stat'ing files already looked up reads
//! nothing from the device (before, every flush dropped the clean
//! inodes and the PFS root's inode index, and each was read again);
//! with a budget smaller than what is loaded, a flush drops what is
//! clean and the same lookups read the device again. The device counts
//! its reads, independently of the library.

use bufcache::BlockDevice;
use hammer2::disk::ObjType;
use hammer2::mount::{Mount, ROOT_INUM};
use std::sync::Arc;
use tests::CountingDevice;

const NOW: u64 = 1_700_000_000_000_000;
const L: &str = "DATA";
const FILES: usize = 300;

/// A volume holding `FILES` small files in its root, flushed, opened
/// again (nothing loaded) on a counting device.
fn populated() -> (Mount, Arc<CountingDevice>) {
    let dev = Arc::new(CountingDevice::new(1 << 30));
    let opts = mkfs::newfs::NewfsOptions {
        now_us: Some(NOW),
        uuid_seed: Some(11),
        ..Default::default()
    };
    mkfs::newfs::newfs(&dev.dev, &opts).unwrap();
    let d: Arc<dyn BlockDevice> = dev.clone();
    let mut m = Mount::open(d.clone()).unwrap();
    for i in 0..FILES {
        let inum = m
            .create(
                L,
                ROOT_INUM,
                format!("f{i}").as_bytes(),
                ObjType::Regfile,
                0o644,
                0,
                0,
                (0, 0),
                NOW,
            )
            .unwrap();
        m.write(L, inum, 0, &[i as u8; 100], NOW).unwrap();
    }
    m.flush().unwrap();
    drop(m);
    (Mount::open(d).unwrap(), dev)
}

/// Look up and stat every file; the device reads it took.
fn stat_all(m: &mut Mount, dev: &CountingDevice) -> u64 {
    let before = dev.reads();
    for i in 0..FILES {
        let inum = m
            .lookup(L, ROOT_INUM, format!("f{i}").as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(m.getattr(L, inum).unwrap().size, 100);
    }
    dev.reads() - before
}

/// Change one file and flush, so the flush has work and commits.
fn change_and_flush(m: &mut Mount, n: u8) {
    let inum = m.lookup(L, ROOT_INUM, b"f0").unwrap().unwrap();
    m.write(L, inum, 0, &[n; 10], NOW).unwrap();
    m.flush().unwrap();
}

#[test]
fn a_flush_keeps_what_was_read() {
    let (mut m, dev) = populated();
    let cold = stat_all(&mut m, &dev);
    assert!(cold >= FILES as u64, "{cold} reads for {FILES} cold inodes");
    change_and_flush(&mut m, 1);
    assert_eq!(stat_all(&mut m, &dev), 0, "reads after a flush");
    change_and_flush(&mut m, 2);
    assert_eq!(stat_all(&mut m, &dev), 0, "reads after a second flush");
    // And what was kept is what was flushed: a fresh mount agrees.
    let mut want = vec![2u8; 10];
    want.extend([0, 0]);
    let inum = m.lookup(L, ROOT_INUM, b"f0").unwrap().unwrap();
    assert_eq!(m.read(L, inum, 0, 12).unwrap(), want);
    drop(m);
    let d: Arc<dyn BlockDevice> = dev.clone();
    let mut fresh = Mount::open(d).unwrap();
    assert_eq!(fresh.read(L, inum, 0, 12).unwrap(), want);
    assert!(stat_all(&mut fresh, &dev) >= FILES as u64);
}

#[test]
fn over_its_budget_a_flush_drops_clean_metadata() {
    let (mut m, dev) = populated();
    stat_all(&mut m, &dev);
    let loaded = m.metadata_bytes();
    m.set_metadata_limit(loaded / 4);
    change_and_flush(&mut m, 1);
    assert!(
        m.metadata_bytes() <= loaded / 4,
        "{} bytes of metadata kept over a {}-byte budget",
        m.metadata_bytes(),
        loaded / 4
    );
    let again = stat_all(&mut m, &dev);
    assert!(again >= FILES as u64 / 2, "{again} reads after dropping");
}
