//! A flush writes file data in runs: the new blocks of a batch go to the
//! device in device order, each run of neighbours as one device write
//! (`BlockDevice::write_through_many`), before the commit. Checked
//! against the device's own log (`RecordingDevice`, one event per write
//! request) and the blockrefs on disk, read back by a fresh volume; the
//! bytes against what was written. Blocks with the same bytes in one
//! batch are still shared, and what they share is on the device.

use bufcache::{
    BlockDevice, BufCache, BufCacheConfig, CachedDevice, Event, RecordingDevice, Vm, VmConfig,
};
use hammer2::disk::{Blockref, BlockrefType};
use hammer2::mount::{Mount, ROOT_INUM};
use hammer2::pfs::Pfs;
use hammer2::Volume;
use std::sync::Arc;
use tests::{create_file, noise, T0};

const PFS: &str = "DATA";
const BLOCK: usize = 65536;
const MIB: u64 = 1 << 20;

/// A mount over a buffer cache over a device that logs every request.
fn mount_recorded(seed: u64) -> (Mount, Arc<RecordingDevice>) {
    let image = tests::new_fs_bytes(seed, 256 * MIB);
    let rec = Arc::new(RecordingDevice::from_mem(image.snapshot()));
    let d: Arc<dyn BlockDevice> = rec.clone();
    let vm = Vm::new(VmConfig::new(64 * MIB)).unwrap();
    let cache = BufCache::new(d, vm, BufCacheConfig::default()).unwrap();
    let cached: Arc<dyn BlockDevice> = Arc::new(CachedDevice::new(cache));
    (Mount::open(cached).unwrap(), rec)
}

/// The DATA blockrefs of `/name` and the file's bytes, as a fresh volume
/// over what the device holds now reads them.
fn on_disk(rec: &RecordingDevice, name: &str, len: usize) -> (Vec<Blockref>, Vec<u8>) {
    let d: Arc<dyn BlockDevice> = Arc::new(rec.image_at(rec.position()));
    let vol = Arc::new(Volume::open(d).unwrap());
    let pfs = Pfs::open(vol.clone(), PFS).unwrap();
    let ino = pfs.resolve(&format!("/{name}")).unwrap();
    let brefs = hammer2::chain::collect(&vol, &ino.blockset(), 0, u64::MAX)
        .unwrap()
        .into_iter()
        .filter(|b| b.btype == BlockrefType::Data)
        .collect();
    let bytes = pfs.read(&ino, 0, len).unwrap();
    (brefs, bytes)
}

/// Device writes from log position `from` on that cover part of
/// `[off, off+len)`.
fn writes_over(rec: &RecordingDevice, from: usize, off: u64, len: u64) -> usize {
    rec.events()[from..]
        .iter()
        .filter(|e| match e {
            Event::Write { offset, data } => {
                *offset < off + len && off < *offset + data.len() as u64
            }
            _ => false,
        })
        .count()
}

#[test]
fn a_sequential_file_goes_to_the_device_in_runs() {
    let (mut m, rec) = mount_recorded(3);
    let inum = create_file(&mut m, PFS, ROOT_INUM, b"seq").unwrap();
    let data = noise(7, 8 << 20);
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        m.write(PFS, inum, (i << 20) as u64, chunk, T0).unwrap();
    }
    let from = rec.position();
    m.flush().unwrap();
    let (brefs, back) = on_disk(&rec, "seq", data.len());
    assert!(back == data, "the file does not read back");
    assert_eq!(brefs.len(), data.len() / BLOCK);
    // Runs of neighbouring blocks on disk, and the writes that reached
    // any of them: at most one per run and per MiB of a run.
    let mut offs: Vec<(u64, u64)> = brefs
        .iter()
        .map(|b| (b.data_off.offset(), b.data_off.bytes()))
        .collect();
    offs.sort_unstable();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (o, n) in offs {
        match runs.last_mut() {
            Some((s, l)) if *s + *l == o => *l += n,
            _ => runs.push((o, n)),
        }
    }
    let bound: u64 = runs.iter().map(|(_, l)| l.div_ceil(MIB)).sum();
    let writes: usize = runs
        .iter()
        .map(|&(o, l)| writes_over(&rec, from, o, l))
        .sum();
    assert!(
        writes as u64 <= bound,
        "{writes} device writes for {} blocks in {} runs (at most {bound})",
        data.len() / BLOCK,
        runs.len()
    );
}

#[test]
fn blocks_repeated_in_one_batch_share_a_block_on_the_device() {
    let (mut m, rec) = mount_recorded(4);
    let inum = create_file(&mut m, PFS, ROOT_INUM, b"rep").unwrap();
    let (a, b, c) = (noise(1, BLOCK), noise(2, BLOCK), noise(3, BLOCK));
    let data = [&a, &b, &a, &c, &b, &a].map(|v| v.as_slice()).concat();
    m.write(PFS, inum, 0, &data, T0).unwrap();
    m.flush().unwrap();
    let (brefs, back) = on_disk(&rec, "rep", data.len());
    assert!(back == data, "the file does not read back");
    let at = |lbase: usize| {
        brefs
            .iter()
            .find(|r| r.key == (lbase * BLOCK) as u64)
            .unwrap()
            .data_off
    };
    assert_eq!(at(0), at(2));
    assert_eq!(at(0), at(5));
    assert_eq!(at(1), at(4));
    let distinct: std::collections::BTreeSet<u64> =
        brefs.iter().map(|r| r.data_off.offset()).collect();
    assert_eq!(distinct.len(), 3, "three different blocks, three on disk");
}
