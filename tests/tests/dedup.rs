//! Live dedup on write, against independent measures: the space a copy
//! costs is read from the freemap on disk (not from the dedup table),
//! sharing is seen in the blockrefs on disk, contents are compared with
//! a model of what was written, and after bulkfree the freemap must
//! equal a full scan of the topology (`tests::freemap_check`). Covers
//! the invariants of `hammer2/src/dedup.rs`: a shared block allocated in
//! the same flush is not released while another blockref points to it,
//! bulkfree keeps a block referenced through any blockref (also one that
//! was shared while a pass ran), and a freed block is never handed out
//! by the table.
//!
//! With `H2_DEDUP_SAVE=DIR` the deduped images are kept as DIR/NAME.img
//! with DIR/NAME.json (`{path: sha256}` of every file), for DragonFly's
//! fsck and makefs.

use bufcache::{BlockDevice, MemDevice};
use hammer2::disk::{Blockref, BlockrefType};
use hammer2::mount::{Mount, ROOT_INUM};
use hammer2::pfs::Pfs;
use hammer2::Volume;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tests::{create_file, new_fs, open, T0};

use tests::freemap_check::*;

const PFS: &str = "DATA";
const MIB: u64 = 1 << 20;
const BLOCK: usize = 65536;

fn create(m: &mut Mount, name: &str) -> u64 {
    create_file(m, PFS, ROOT_INUM, name.as_bytes()).unwrap()
}

fn lookup(m: &mut Mount, name: &str) -> u64 {
    m.lookup(PFS, ROOT_INUM, name.as_bytes()).unwrap().unwrap()
}

/// Free bytes per the freemap on disk (an independent reading).
fn disk_free(dev: &Arc<MemDevice>) -> u64 {
    let d: Arc<dyn BlockDevice> = dev.clone();
    freemap_free(&Volume::open(d).unwrap())
}

/// The DATA blockrefs of file `name` on disk.
fn data_brefs(dev: &Arc<MemDevice>, name: &str) -> Vec<Blockref> {
    let d: Arc<dyn BlockDevice> = dev.clone();
    let vol = Arc::new(Volume::open(d).unwrap());
    let pfs = Pfs::open(vol.clone(), PFS).unwrap();
    let ino = pfs.resolve(&format!("/{name}")).unwrap();
    hammer2::chain::collect(&vol, &ino.blockset(), 0, u64::MAX)
        .unwrap()
        .into_iter()
        .filter(|b| b.btype == BlockrefType::Data)
        .collect()
}

/// With `H2_DEDUP_SAVE=DIR`: keep the image and what its files hold.
fn save(dev: &Arc<MemDevice>, files: &BTreeMap<String, Vec<u8>>, name: &str) {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::FileExt;
    let Ok(dir) = std::env::var("H2_DEDUP_SAVE") else {
        return;
    };
    let dir = std::path::Path::new(&dir);
    let f = std::fs::File::create(dir.join(format!("{name}.img"))).unwrap();
    f.set_len(dev.size_bytes()).unwrap();
    let mut buf = vec![0u8; BLOCK];
    for off in (0..dev.size_bytes()).step_by(BLOCK) {
        dev.read_at(&mut buf, off).unwrap();
        if buf.iter().any(|&b| b != 0) {
            f.write_all_at(&buf, off).unwrap();
        }
    }
    let sums: serde_json::Map<String, serde_json::Value> = files
        .iter()
        .map(|(k, v)| {
            let h: String = Sha256::digest(v)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            (k.clone(), serde_json::Value::String(h))
        })
        .collect();
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(&sums).unwrap(),
    )
    .unwrap();
}

fn read_all(m: &mut Mount, inum: u64) -> Vec<u8> {
    let size = m.getattr(PFS, inum).unwrap().size;
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let n = (size - out.len() as u64).min(MIB) as usize;
        out.extend(m.read(PFS, inum, out.len() as u64, n).unwrap());
    }
    out
}

#[test]
fn copying_a_100_mib_file_costs_under_one_percent() {
    let dev = new_fs(1);
    let mut m = open(&dev);
    m.flush().unwrap();
    let offset = allocator_free_offset(&dev);
    let mut rng = SmallRng::seed_from_u64(100);
    let mut data = vec![0u8; (100 * MIB) as usize];
    rng.fill_bytes(&mut data);
    let orig = create(&mut m, "orig");
    for (i, chunk) in data.chunks(MIB as usize).enumerate() {
        m.write(PFS, orig, i as u64 * MIB, chunk, T0).unwrap();
    }
    m.flush().unwrap();
    let before = disk_free(&dev);
    // The copy, as cp does it: read a chunk, write it.
    let copy = create(&mut m, "copy");
    for i in 0..100 {
        let chunk = m.read(PFS, orig, i * MIB, MIB as usize).unwrap();
        m.write(PFS, copy, i * MIB, &chunk, T0).unwrap();
    }
    m.flush().unwrap();
    let after = disk_free(&dev);
    let cost = before - after;
    let pct = cost as f64 * 100.0 / (100 * MIB) as f64;
    eprintln!("100 MiB copy took {cost} bytes of new space ({pct:.3}%)");
    assert!(pct < 1.0, "copy cost {cost} bytes ({pct:.3}%)");
    // Every data block of the copy is one of the original's, on disk.
    let a: BTreeSet<u64> = data_brefs(&dev, "orig")
        .iter()
        .map(|b| b.data_off.offset())
        .collect();
    let b = data_brefs(&dev, "copy");
    assert_eq!(b.len(), 1600);
    assert!(b.iter().all(|br| a.contains(&br.data_off.offset())));
    fsck_clean(&dev, "after the copy");
    // Remounted, both read as written.
    drop(m);
    let mut m = open(&dev);
    let (orig, copy) = (lookup(&mut m, "orig"), lookup(&mut m, "copy"));
    assert!(read_all(&mut m, orig) == data, "original after remount");
    assert!(read_all(&mut m, copy) == data, "copy after remount");
    let both = BTreeMap::from([
        ("orig".to_string(), data.clone()),
        ("copy".to_string(), data.clone()),
    ]);
    save(&dev, &both, "dedup-copy");
    // The original goes: two passes keep every block the copy shares.
    m.unlink(PFS, ROOT_INUM, b"orig", T0).unwrap();
    m.bulkfree(None).unwrap();
    m.bulkfree(None).unwrap();
    assert_freemap_is_full_scan(&dev, offset, "original deleted");
    assert!(read_all(&mut m, copy) == data, "copy after bulkfree");
    // The copy goes too: the space comes back.
    m.unlink(PFS, ROOT_INUM, b"copy", T0).unwrap();
    m.bulkfree(None).unwrap();
    m.bulkfree(None).unwrap();
    assert_freemap_is_full_scan(&dev, offset, "both deleted");
    assert!(disk_free(&dev) > before + 99 * MIB, "space returned");
    fsck_clean(&dev, "both deleted");
}

/// Two files with the same blocks in one flush, one of them rewritten
/// while a pipelined flush is between its batch and its commit: the
/// superseded share is dropped, the block stays for the other file and
/// is never handed out again.
#[test]
fn a_shared_unflushed_block_outlives_one_release() {
    for victim in ["a", "b"] {
        let ctx = format!("rewriting {victim}");
        let dev = new_fs(3);
        let mut m = open(&dev);
        m.flush().unwrap();
        let offset = allocator_free_offset(&dev);
        let mut rng = SmallRng::seed_from_u64(7);
        let mut blk = vec![0u8; 4 * BLOCK];
        rng.fill_bytes(&mut blk);
        let (a, b) = (create(&mut m, "a"), create(&mut m, "b"));
        m.write(PFS, a, 0, &blk, T0).unwrap();
        m.write(PFS, b, 0, &blk, T0).unwrap();
        let mut batch = m.flush_begin().unwrap();
        batch.write();
        let mut other = vec![0u8; 4 * BLOCK];
        rng.fill_bytes(&mut other);
        let v = if victim == "a" { a } else { b };
        m.write(PFS, v, 0, &other, T0).unwrap();
        m.flush_commit(batch).unwrap();
        m.flush().unwrap();
        // Fill a good part of the disk with fresh blocks: none may land
        // on the block the survivor points at.
        let filler = create(&mut m, "filler");
        let mut junk = vec![0u8; MIB as usize];
        for i in 0..64 {
            rng.fill_bytes(&mut junk);
            m.write(PFS, filler, i * MIB, &junk, T0).unwrap();
        }
        m.flush().unwrap();
        let (keep, keep_name) = if victim == "a" { (b, "b") } else { (a, "a") };
        assert!(read_all(&mut m, keep) == blk, "{ctx}: survivor");
        assert!(read_all(&mut m, v) == other, "{ctx}: rewritten file");
        let kept: BTreeSet<u64> = data_brefs(&dev, keep_name)
            .iter()
            .map(|b| b.data_off.offset())
            .collect();
        let fill: BTreeSet<u64> = data_brefs(&dev, "filler")
            .iter()
            .map(|b| b.data_off.offset())
            .collect();
        assert!(kept.is_disjoint(&fill), "{ctx}: a shared block reused");
        fsck_clean(&dev, &ctx);
        drop(m);
        let mut m = open(&dev);
        let keep = lookup(&mut m, keep_name);
        assert!(read_all(&mut m, keep) == blk, "{ctx}: survivor remounted");
        m.bulkfree(None).unwrap();
        m.bulkfree(None).unwrap();
        assert_freemap_is_full_scan(&dev, offset, &ctx);
        assert!(
            read_all(&mut m, keep) == blk,
            "{ctx}: survivor after bulkfree"
        );
    }
}

/// A block whose last reference went before a bulkfree pass began, shared
/// again while the pass runs: the merge must keep it.
#[test]
fn a_block_shared_during_a_bulkfree_pass_is_kept() {
    let dev = new_fs(5);
    let mut m = open(&dev);
    m.flush().unwrap();
    let offset = allocator_free_offset(&dev);
    let mut rng = SmallRng::seed_from_u64(11);
    let mut blk = vec![0u8; 8 * BLOCK];
    rng.fill_bytes(&mut blk);
    let a = create(&mut m, "a");
    m.write(PFS, a, 0, &blk, T0).unwrap();
    m.flush().unwrap();
    let old: BTreeSet<u64> = data_brefs(&dev, "a")
        .iter()
        .map(|b| b.data_off.offset())
        .collect();
    m.unlink(PFS, ROOT_INUM, b"a", T0).unwrap();
    let mut scan = m.bulkfree_begin().unwrap();
    let c = create(&mut m, "c");
    m.write(PFS, c, 0, &blk, T0).unwrap();
    m.flush().unwrap();
    let now: BTreeSet<u64> = data_brefs(&dev, "c")
        .iter()
        .map(|b| b.data_off.offset())
        .collect();
    assert_eq!(now, old, "c shares the blocks a left");
    scan.run(None).unwrap();
    m.bulkfree_commit(scan).unwrap();
    m.flush().unwrap();
    fsck_clean(&dev, "after the merge");
    m.bulkfree(None).unwrap();
    m.bulkfree(None).unwrap();
    assert_freemap_is_full_scan(&dev, offset, "after two more passes");
    assert!(read_all(&mut m, c) == blk);
}

/// A model workload with many duplicate blocks: files made of blocks
/// from a small pool (some shorter than a block, some zero), rewritten,
/// truncated, deleted, with plain and pipelined flushes and bulkfree
/// passes; after each round every file reads as the model says, fsck is
/// clean, and at the end (remounted, two quiet passes) the freemap
/// equals a full scan.
#[test]
fn model_workload_with_duplicate_blocks() {
    for seed in 1..=3u64 {
        let ctx = format!("seed {seed}");
        let dev = new_fs(seed + 40);
        let mut m = open(&dev);
        m.flush().unwrap();
        let offset = allocator_free_offset(&dev);
        let mut rng = SmallRng::seed_from_u64(seed);
        let pool: Vec<Vec<u8>> = (0..6)
            .map(|i| {
                let mut b = vec![0u8; BLOCK];
                match i {
                    0 => {}
                    1 => b
                        .iter_mut()
                        .enumerate()
                        .for_each(|(k, x)| *x = (k % 7) as u8),
                    _ => rng.fill_bytes(&mut b),
                }
                b
            })
            .collect();
        let mut model: BTreeMap<String, (u64, Vec<u8>)> = BTreeMap::new();
        let mut next = 0;
        for round in 0..6 {
            let rctx = format!("{ctx} round {round}");
            let mut batch = None;
            for _ in 0..60 {
                let op = rng.gen_range(0..100);
                let names: Vec<String> = model.keys().cloned().collect();
                if op < 35 || names.is_empty() {
                    next += 1;
                    let name = format!("f{next}");
                    let inum = create(&mut m, &name);
                    let blocks = rng.gen_range(1..6);
                    let mut d = Vec::new();
                    for _ in 0..blocks {
                        d.extend_from_slice(&pool[rng.gen_range(0..pool.len())]);
                    }
                    // A short tail is a smaller physical block.
                    d.truncate(d.len() - rng.gen_range(0..3) * 20000);
                    m.write(PFS, inum, 0, &d, T0).unwrap();
                    model.insert(name, (inum, d));
                } else if op < 65 {
                    let name = &names[rng.gen_range(0..names.len())];
                    let (inum, d) = model.get_mut(name).unwrap();
                    let at = rng.gen_range(0..4) * BLOCK;
                    let blk = &pool[rng.gen_range(0..pool.len())];
                    m.write(PFS, *inum, at as u64, blk, T0).unwrap();
                    if d.len() < at + BLOCK {
                        d.resize(at + BLOCK, 0);
                    }
                    d[at..at + BLOCK].copy_from_slice(blk);
                } else if op < 75 {
                    let name = &names[rng.gen_range(0..names.len())];
                    let (inum, d) = model.get_mut(name).unwrap();
                    let size = rng.gen_range(0..=d.len());
                    let a = hammer2::mount::SetAttr {
                        size: Some(size as u64),
                        ..Default::default()
                    };
                    m.setattr(PFS, *inum, a, T0).unwrap();
                    d.truncate(size);
                } else if op < 88 {
                    let name = names[rng.gen_range(0..names.len())].clone();
                    m.unlink(PFS, ROOT_INUM, name.as_bytes(), T0).unwrap();
                    model.remove(&name);
                } else if op < 94 {
                    match batch.take() {
                        Some(b) => m.flush_commit(b).unwrap(),
                        None => m.flush().unwrap(),
                    };
                } else if batch.is_none() {
                    let mut b = m.flush_begin().unwrap();
                    b.write();
                    batch = Some(b);
                } else {
                    m.flush_commit(batch.take().unwrap()).unwrap();
                }
            }
            if let Some(b) = batch.take() {
                m.flush_commit(b).unwrap();
            }
            m.flush().unwrap();
            for (name, (inum, d)) in &model {
                assert!(read_all(&mut m, *inum) == *d, "{rctx}: {name}");
            }
            fsck_clean(&dev, &rctx);
            if round % 2 == 1 {
                m.bulkfree(None).unwrap();
                fsck_clean(&dev, &format!("{rctx} bulkfree"));
            }
        }
        drop(m);
        let mut m = open(&dev);
        for (name, (_, d)) in &model {
            let inum = lookup(&mut m, name);
            assert!(read_all(&mut m, inum) == *d, "{ctx} remounted: {name}");
        }
        m.bulkfree(None).unwrap();
        m.bulkfree(None).unwrap();
        assert_freemap_is_full_scan(&dev, offset, &ctx);
        for (name, (inum, d)) in &model {
            assert!(read_all(&mut m, *inum) == *d, "{ctx} final: {name}");
        }
        // Duplicates were shared: fewer distinct data blocks than blockrefs.
        let d: Arc<dyn BlockDevice> = dev.clone();
        let vol = Arc::new(Volume::open(d).unwrap());
        let pfs = Pfs::open(vol.clone(), PFS).unwrap();
        let (mut refs, mut distinct) = (0, BTreeSet::new());
        for name in model.keys() {
            let ino = pfs.resolve(&format!("/{name}")).unwrap();
            for b in hammer2::chain::collect(&vol, &ino.blockset(), 0, u64::MAX).unwrap() {
                if b.btype == BlockrefType::Data {
                    refs += 1;
                    distinct.insert(b.data_off.offset());
                }
            }
        }
        eprintln!("{ctx}: {refs} data blockrefs on {} blocks", distinct.len());
        drop(m);
        let files = model
            .iter()
            .map(|(k, (_, d))| (k.clone(), d.clone()))
            .collect();
        save(&dev, &files, &format!("dedup-model-{seed}"));
        assert!(
            distinct.len() * 2 < refs,
            "{ctx}: {refs} refs, {distinct:?}"
        );
    }
}

/// Blocks without a check code are never shared (DragonFly may overwrite
/// them in place): a copy of a check-NONE file takes new blocks.
#[test]
fn check_none_blocks_are_not_shared() {
    let dev = new_fs(9);
    let mut m = open(&dev);
    let mut rng = SmallRng::seed_from_u64(13);
    let mut data = vec![0u8; 8 * BLOCK];
    rng.fill_bytes(&mut data);
    let none = hammer2::setmethods::Methods {
        comp: None,
        check: Some(hammer2::disk::check_method::NONE),
    };
    let (a, b) = (create(&mut m, "a"), create(&mut m, "b"));
    m.set_inode_methods(PFS, a, none).unwrap();
    m.set_inode_methods(PFS, b, none).unwrap();
    m.write(PFS, a, 0, &data, T0).unwrap();
    m.flush().unwrap();
    m.write(PFS, b, 0, &data, T0).unwrap();
    m.flush().unwrap();
    let offs = |n: &str| -> BTreeSet<u64> {
        data_brefs(&dev, n)
            .iter()
            .map(|b| b.data_off.offset())
            .collect()
    };
    let (oa, ob) = (offs("a"), offs("b"));
    assert_eq!((oa.len(), ob.len()), (8, 8));
    assert!(oa.is_disjoint(&ob));
    assert!(read_all(&mut m, b) == data);
    fsck_clean(&dev, "check none");
}
