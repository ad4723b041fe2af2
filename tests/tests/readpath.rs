//! The read path through the buffer cache. Reading a file in order goes
//! to the device in large reads: the blocks of a read and the read-ahead
//! past it (`ReadPlan`, `Volume::cluster_read`) are brought into the
//! buffer cache one run of neighbouring blocks per device read, as
//! DragonFly's cluster reads do; reads at random offsets read no more
//! than their own blocks. Blocks are read in place from the cache and
//! checked once per residency (`Volume::with_data_block`): a damaged
//! block fails every read. The device counts its reads, independently
//! of the library, and every byte read is checked against what was
//! written.

use bufcache::{BlockDevice, BufCache, BufCacheConfig, CachedDevice, Vm, VmConfig};
use hammer2::disk::ObjType;
use hammer2::mount::{Mount, ROOT_INUM};
use std::sync::Arc;
use tests::{noise, CountingDevice};

const NOW: u64 = 1_700_000_000_000_000;
const L: &str = "DATA";
const FILE: usize = 8 << 20;
const BLOCK: usize = 64 << 10;

/// A volume with one 8 MiB file written in order and flushed; its
/// inode number and the counting device.
fn volume_with_a_file(data: &[u8]) -> (Arc<CountingDevice>, u64) {
    let dev = Arc::new(CountingDevice::new(1 << 30));
    let opts = mkfs::newfs::NewfsOptions {
        now_us: Some(NOW),
        uuid_seed: Some(12),
        ..Default::default()
    };
    mkfs::newfs::newfs(&dev.dev, &opts).unwrap();
    let d: Arc<dyn BlockDevice> = dev.clone();
    let mut m = Mount::open(d).unwrap();
    let inum = m
        .create(
            L,
            ROOT_INUM,
            b"big",
            ObjType::Regfile,
            0o644,
            0,
            0,
            (0, 0),
            NOW,
        )
        .unwrap();
    m.write(L, inum, 0, data, NOW).unwrap();
    m.flush().unwrap();
    (dev, inum)
}

/// The volume mounted again through a fresh buffer cache with no
/// read-ahead of its own (so only the library's cluster reads read
/// ahead).
fn mount_cached(dev: &Arc<CountingDevice>) -> Mount {
    let vm = Vm::new(VmConfig::new(64 << 20)).unwrap();
    let cfg = BufCacheConfig {
        read_ahead_max: 0,
        ..BufCacheConfig::default()
    };
    let raw: Arc<dyn BlockDevice> = dev.clone();
    let cache = BufCache::new(raw, vm, cfg).unwrap();
    let cached: Arc<dyn BlockDevice> = Arc::new(CachedDevice::new(cache));
    Mount::open(cached).unwrap()
}

#[test]
fn reading_in_order_reads_the_device_in_clusters() {
    let data = noise(1, FILE);
    let (dev, inum) = volume_with_a_file(&data);
    let mut m = mount_cached(&dev);
    m.getattr(L, inum).unwrap();
    let before = dev.reads();
    let step = 128 << 10;
    for off in (0..FILE).step_by(step) {
        let got = m.read(L, inum, off as u64, step).unwrap();
        assert!(got == data[off..off + step], "bytes at {off} differ");
    }
    let reads = dev.reads() - before;
    // 128 blocks in a row: without clusters one read each; with them
    // one per read-ahead window (1 to 2 MiB) and the index blocks.
    assert!(
        reads <= 16,
        "{reads} device reads for 128 blocks read in order"
    );
}

/// A reader that starts over (the second half of the file read first,
/// then the first half) gets read-ahead on its second run too.
#[test]
fn a_reader_that_starts_over_reads_ahead_again() {
    let data = noise(1, FILE);
    let (dev, inum) = volume_with_a_file(&data);
    let mut m = mount_cached(&dev);
    m.getattr(L, inum).unwrap();
    let step = 128 << 10;
    let mut runs = Vec::new();
    for half in [FILE / 2..FILE, 0..FILE / 2] {
        let before = dev.reads();
        for off in half.step_by(step) {
            let got = m.read(L, inum, off as u64, step).unwrap();
            assert!(got == data[off..off + step], "bytes at {off} differ");
        }
        runs.push(dev.reads() - before);
    }
    // 64 blocks each: one read per block pair without read-ahead.
    assert!(
        runs.iter().all(|&r| r <= 10),
        "device reads of the two runs of 64 blocks: {runs:?}"
    );
}

#[test]
fn reading_at_random_reads_only_its_blocks() {
    let data = noise(1, FILE);
    let (dev, inum) = volume_with_a_file(&data);
    let mut m = mount_cached(&dev);
    m.getattr(L, inum).unwrap();
    // Warm the index blocks: one read of the last block.
    m.read(L, inum, (FILE - 4096) as u64, 4096).unwrap();
    let before = dev.reads();
    // 4 KiB reads in distinct blocks, never in order.
    let blocks = [97usize, 3, 64, 11, 120, 40, 77, 5, 101, 58];
    for b in blocks {
        let off = b * BLOCK + 8192;
        let got = m.read(L, inum, off as u64, 4096).unwrap();
        assert!(got == data[off..off + 4096], "bytes at {off} differ");
    }
    let reads = dev.reads() - before;
    assert_eq!(
        reads,
        blocks.len() as u64,
        "random reads read more than their blocks"
    );
}

#[test]
fn a_damaged_block_fails_every_read_through_the_cache() {
    let data = noise(1, FILE);
    let (dev, inum) = volume_with_a_file(&data);
    // Where block 5 of the file lies, from a mount of its own.
    let at = {
        let mut m = mount_cached(&dev);
        m.getattr(L, inum).unwrap();
        let got = m.read(L, inum, 5 * BLOCK as u64, 4096).unwrap();
        assert!(got == data[5 * BLOCK..5 * BLOCK + 4096]);
        let mut at = None;
        for off in (0..(1u64 << 30)).step_by(BLOCK) {
            let mut b = vec![0u8; 4096];
            dev.dev.read_at(&mut b, off).unwrap();
            if b == data[5 * BLOCK..5 * BLOCK + 4096] {
                at = Some(off);
                break;
            }
        }
        at.expect("block 5 on the device")
    };
    // One byte flipped on the device, then read through a fresh cache:
    // each read fails, and a read of another block still works.
    let mut byte = [0u8; 1];
    dev.dev.read_at(&mut byte, at + 60_000).unwrap();
    dev.dev.write_at(&[byte[0] ^ 0x40], at + 60_000).unwrap();
    let mut m = mount_cached(&dev);
    m.getattr(L, inum).unwrap();
    for _ in 0..3 {
        let r = m.read(L, inum, 5 * BLOCK as u64 + 100, 4096);
        assert!(
            matches!(&r, Err(e) if e.is_media_damage()),
            "a damaged block read as {r:?}"
        );
    }
    let got = m.read(L, inum, 6 * BLOCK as u64, 4096).unwrap();
    assert!(got == data[6 * BLOCK..6 * BLOCK + 4096]);
    // Read whole and in place twice from an undamaged block: the same bytes.
    for _ in 0..2 {
        let got = m.read(L, inum, 7 * BLOCK as u64, BLOCK).unwrap();
        assert!(got == data[7 * BLOCK..8 * BLOCK]);
    }
}
