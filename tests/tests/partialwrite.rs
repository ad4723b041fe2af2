//! Small writes do not read: a write that covers part of a 64 KiB block
//! whose old bytes are not in the buffer cache keeps the range written
//! and the old block's blockref; reads merge the two, and the flush
//! merges them before it writes the block. The device here answers
//! `read_cached` only for bytes read or written through it before (as a
//! buffer cache does) and counts the reads that reach it, independently
//! of the library. The expected file contents come from a model (the
//! old bytes with the writes laid over them), and fsck checks the image.
//!
//! A block whose old bytes cannot be read when the flush merges them
//! (damaged on disk) is dropped with an error, counted in the flush's
//! `lost`, and the damaged block stays as it was (it still reads as an
//! error); everything else of the flush commits.

use bufcache::{BlockDevice, MemDevice};
use hammer2::fsck::{fsck, Options};
use hammer2::mount::{Mount, ROOT_INUM};
use hammer2::Error;
use std::sync::Arc;
use tests::cold::Cold;
use tests::craft::Craft;
use tests::{create_file, new_fs, noise, open, T0 as NOW};

const L: &str = "DATA";
const B: usize = 65536;
const BLOCKS: usize = 16;

/// A volume with one file of `BLOCKS` blocks of noise, flushed; the
/// image, the file's inode number and its bytes.
fn volume() -> (Arc<MemDevice>, u64, Vec<u8>) {
    let dev = new_fs(5);
    let mut m = open(&dev);
    let f = create_file(&mut m, L, ROOT_INUM, b"f").unwrap();
    let data = noise(1, BLOCKS * B);
    m.write(L, f, 0, &data, NOW).unwrap();
    m.flush().unwrap();
    (dev, f, data)
}

fn fsck_clean(dev: &Arc<MemDevice>) {
    let d: Arc<dyn BlockDevice> = dev.clone();
    let r = fsck(d, Options::default()).unwrap();
    let p: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
    assert!(p.is_empty(), "fsck: {p:#?}");
}

/// 4 KiB written into the middle of every block, last block first: no
/// data block is read for the writes (before, each read its 64 KiB
/// block); reads and the flush merge the old bytes in; the file equals
/// the model before the flush, after it, and after a remount.
#[test]
fn small_writes_into_blocks_not_cached_read_nothing() {
    let (img, f, mut model) = volume();
    let cold = Cold::over(&img);
    let d: Arc<dyn BlockDevice> = cold.clone();
    let mut m = Mount::open(d.clone()).unwrap();
    // The file's inode and tree (metadata) are read here, not its data.
    assert_eq!(m.seek_data(L, f, 0).unwrap(), Some(0));
    let before = cold.reads();
    for b in (0..BLOCKS).rev() {
        let at = b * B + 20_000;
        let patch = noise(100 + b as u64, 4096);
        model[at..at + 4096].copy_from_slice(&patch);
        m.write(L, f, at as u64, &patch, NOW + 1).unwrap();
    }
    assert_eq!(cold.reads() - before, 0, "the writes read from the device");
    // A read across two blocks sees old and new bytes together.
    let span = (B - 1000) as u64..(2 * B + 30_000) as u64;
    let got = m
        .read(L, f, span.start, (span.end - span.start) as usize)
        .unwrap();
    assert!(got == model[span.start as usize..span.end as usize]);
    let stats = m.flush().unwrap();
    assert_eq!(stats.lost, 0);
    assert!(m.read(L, f, 0, BLOCKS * B).unwrap() == model);
    drop(m);
    let mut m = Mount::open(d).unwrap();
    assert!(m.read(L, f, 0, BLOCKS * B).unwrap() == model);
    drop(m);
    fsck_clean(&img);
}

/// A block written in part, then written whole, then in part again, and
/// a truncate into a block written in part: each gives the model's
/// bytes (a whole write drops the old bytes; a truncate merges first,
/// then zeroes the tail, which a later growth must read as zeros).
#[test]
fn partial_blocks_meet_whole_writes_and_truncates() {
    let (img, f, mut model) = volume();
    let cold = Cold::over(&img);
    let d: Arc<dyn BlockDevice> = cold.clone();
    let mut m = Mount::open(d.clone()).unwrap();
    let put = |m: &mut Mount, model: &mut Vec<u8>, at: usize, len: usize, seed: u64| {
        let p = noise(seed, len);
        if model.len() < at + len {
            model.resize(at + len, 0);
        }
        model[at..at + len].copy_from_slice(&p);
        m.write(L, f, at as u64, &p, NOW + 2).unwrap();
    };
    // Block 2: in part, whole, in part again.
    put(&mut m, &mut model, 2 * B + 100, 50, 7);
    put(&mut m, &mut model, 2 * B, B, 8);
    put(&mut m, &mut model, 2 * B + 9000, 10, 9);
    // Block 5: two ranges that touch, one inside another.
    put(&mut m, &mut model, 5 * B + 1000, 1000, 10);
    put(&mut m, &mut model, 5 * B + 2000, 1000, 11);
    put(&mut m, &mut model, 5 * B + 1500, 100, 12);
    // Block 9: in part, then the file cut inside it and grown again.
    put(&mut m, &mut model, 9 * B + 40_000, 100, 13);
    let cut = 9 * B + 30_000;
    m.setattr(
        L,
        f,
        hammer2::mount::SetAttr {
            size: Some(cut as u64),
            ..Default::default()
        },
        NOW + 3,
    )
    .unwrap();
    model.truncate(cut);
    put(&mut m, &mut model, 9 * B + 50_000, 10, 14);
    assert!(m.read(L, f, 0, model.len()).unwrap() == model);
    m.flush().unwrap();
    drop(m);
    let mut m = Mount::open(d).unwrap();
    assert_eq!(m.getattr(L, f).unwrap().size, model.len() as u64);
    assert!(m.read(L, f, 0, model.len()).unwrap() == model);
    drop(m);
    fsck_clean(&img);
}

/// The old block of a block written in part is damaged (its bytes no
/// longer match its check code): the write succeeds (nothing is read),
/// a read of the block fails, and the flush drops that write with an
/// error (`lost` 1) and commits the rest: another block written in the
/// same flush is on disk, and the damaged block still reads as an error.
#[test]
fn a_write_over_a_damaged_block_is_lost_and_counted() {
    let (img, f, mut model) = volume();
    let d: Arc<dyn BlockDevice> = img.clone();
    let c = Craft::new(d);
    let victim = c.bref(c.leaves(L, f)[3]).data_off.offset();
    img.write_at(&[0x5a; 64], victim + 100).unwrap();
    let cold = Cold::over(&img);
    let d: Arc<dyn BlockDevice> = cold.clone();
    let mut m = Mount::open(d.clone()).unwrap();
    m.write(L, f, (3 * B + 10) as u64, b"into the damage", NOW + 1)
        .unwrap();
    let at = 6 * B + 10;
    model[at..at + 5].copy_from_slice(b"fine.");
    m.write(L, f, at as u64, b"fine.", NOW + 1).unwrap();
    assert!(matches!(
        m.read(L, f, (3 * B) as u64, 100),
        Err(Error::CheckMismatch { .. })
    ));
    let stats = m.flush().unwrap();
    assert_eq!(stats.lost, 1);
    drop(m);
    let mut m = Mount::open(d).unwrap();
    assert!(m.read(L, f, (6 * B) as u64, B).unwrap() == model[6 * B..7 * B]);
    assert!(matches!(
        m.read(L, f, (3 * B) as u64, 100),
        Err(Error::CheckMismatch { .. })
    ));
}
