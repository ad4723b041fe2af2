//! Space freed at flush time (alloc.rs, "Freeing at flush time"),
//! against independent measures:
//! - after every flush, a reachability scan of every volume header copy
//!   on the media (each walked with every check code verified) finds
//!   each referenced block allocated in the newest freemap on disk: no
//!   header a mount could fall back to has lost a block;
//! - the space a workload leaks is read from the freemap on disk against
//!   a full scan of the topology (allocated but unreferenced), not from
//!   the allocator's own counts;
//! - contents are compared with what was written, snapshots with what
//!   they held, files sharing blocks through dedup with their bytes;
//! - fsck is clean, and after two bulkfree passes the freemap equals the
//!   scan exactly.
//!
//! Volumes of 2 GiB hold one header copy (blocks go free as soon as the
//! flush that drops them is on the media), those of 8 GiB four (three
//! flushes later).

use bufcache::{BlockDevice, MemDevice};
use hammer2::chain::decode_set;
use hammer2::disk::freemap::BMAP_ALLOCATED;
use hammer2::disk::{BlockrefType, InodeData, FREEMAP_BLOCK_SIZE};
use hammer2::mount::{Mount, ROOT_INUM};
use hammer2::pfs::Pfs;
use hammer2::volume::{header_slots, read_header_slot, HeaderSlot};
use hammer2::Volume;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tests::freemap_check::{
    allocator_free_offset, assert_freemap_is_full_scan, freemap_free, fsck_clean, referenced_blocks,
};
use tests::{create_file, new_fs_bytes, open, T0};

const PFS: &str = "DATA";
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn vol(dev: &Arc<MemDevice>) -> Volume {
    let d: Arc<dyn BlockDevice> = dev.clone();
    Volume::open(d).unwrap()
}

/// Every 16 KiB block the topology under `vol.header` references,
/// reading each block through its check code.
fn scan_header(vol: &Volume) -> Result<BTreeSet<u64>, String> {
    let mut out = BTreeSet::new();
    let mut stack: Vec<_> = vol.header.sroot_blockset.to_vec();
    while let Some(br) = stack.pop() {
        if br.is_empty() {
            continue;
        }
        let (off, bytes) = (br.data_off.offset(), br.data_off.bytes());
        if bytes > 0 {
            let mut b = off & !(FREEMAP_BLOCK_SIZE - 1);
            while b < off + bytes {
                out.insert(b);
                b += FREEMAP_BLOCK_SIZE;
            }
            // Every block, data too, must still hold what was written.
            let raw = vol
                .read_physical(&br)
                .map_err(|e| format!("{} block at {off:#x}: {e}", br.btype.name()))?;
            match br.btype {
                BlockrefType::Inode => {
                    let ino = InodeData::decode(&raw, off).map_err(|e| e.to_string())?;
                    if !ino.meta.has_direct_data() {
                        stack.extend(ino.blockset());
                    }
                }
                BlockrefType::Indirect => stack.extend(decode_set(&raw)),
                _ => {}
            }
        }
    }
    Ok(out)
}

/// Every valid header copy on the media keeps a whole tree, each of
/// its blocks allocated in the freemap of the newest header.
fn every_header_whole(dev: &Arc<MemDevice>, ctx: &str) {
    headers_whole_since(dev, 0, ctx)
}

/// `every_header_whole` for the copies with a tid of at least
/// `min_tid`. (Bulkfree, as DragonFly's, frees what the newest tree no
/// longer references, older header copies notwithstanding: after a
/// merge only the headers written since are whole.)
fn headers_whole_since(dev: &Arc<MemDevice>, min_tid: u64, ctx: &str) {
    let newest = vol(dev);
    let leaves = hammer2::freemap::leaves(&newest).unwrap();
    let state = |off: u64| -> u8 {
        let zone = off & !(GIB - 1);
        let Some(leaf) = leaves.get(&zone) else {
            return 0;
        };
        let within = off - zone;
        leaf.bmaps[(within >> 22) as usize].block_state(((within & ((4 << 20) - 1)) >> 14) as usize)
    };
    let mut checked = 0;
    for i in 0..header_slots(dev.size_bytes()) {
        let HeaderSlot::Good(vh) = read_header_slot(dev.as_ref(), i) else {
            continue;
        };
        let mut v = vol(dev);
        let tid = vh.mirror_tid;
        if tid < min_tid {
            continue;
        }
        v.header = *vh;
        let blocks =
            scan_header(&v).unwrap_or_else(|e| panic!("{ctx}: header {i} (tid {tid:#x}): {e}"));
        for b in blocks {
            if b >= newest.header.allocator_beg {
                assert_eq!(
                    state(b),
                    BMAP_ALLOCATED,
                    "{ctx}: block {b:#x} of header {i} (tid {tid:#x}) is not allocated"
                );
            }
        }
        checked += 1;
    }
    assert!(checked >= 1, "{ctx}: no valid header");
}

/// Bytes allocated in the freemap on disk that no tree references.
fn leaked(dev: &Arc<MemDevice>) -> u64 {
    let v = vol(dev);
    let size = v.header.volu_size;
    let referenced = referenced_blocks(&v).len() as u64 * FREEMAP_BLOCK_SIZE;
    let static_end = (v.header.allocator_beg + (4 << 20) - 1) & !((4 << 20) - 1);
    // Space the allocator manages: past newfs's static area, outside the
    // 4 MiB reserved at the start of each 1 GiB zone.
    let zones = size.div_ceil(GIB);
    let managed = (size & !((4 << 20) - 1)) - static_end - (zones - 1) * (4 << 20);
    let static_referenced = referenced_blocks(&v)
        .iter()
        .filter(|&&b| b < static_end)
        .count() as u64
        * FREEMAP_BLOCK_SIZE;
    let allocated = managed - freemap_free(&v);
    allocated - (referenced - static_referenced)
}

fn noise(rng: &mut SmallRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

fn read_all(m: &mut Mount, inum: u64, len: u64) -> Vec<u8> {
    m.read(PFS, inum, 0, len as usize).unwrap()
}

/// Random 4 KiB overwrites of an 8 MiB file, each followed by a flush
/// (an fsync loop, the workload that filled the volume): the space
/// leaked stays under a few MiB where every flush used to keep its
/// 64 KiB block, its indirect blocks and inodes; every header copy keeps
/// a whole tree at every step.
fn overwrite_loop(bytes: u64, seed: u64, rounds: usize) {
    let dev = new_fs_bytes(seed, bytes);
    let mut m = open(&dev);
    let mut rng = SmallRng::seed_from_u64(seed);
    let f = create_file(&mut m, PFS, ROOT_INUM, b"db").unwrap();
    let mut model = noise(&mut rng, (8 * MIB) as usize);
    m.write(PFS, f, 0, &model, T0).unwrap();
    m.flush().unwrap();
    let before = leaked(&dev);
    for round in 0..rounds {
        let at = rng.gen_range(0..(8 * MIB / 4096)) * 4096;
        let buf = noise(&mut rng, 4096);
        model[at as usize..at as usize + 4096].copy_from_slice(&buf);
        m.write(PFS, f, at, &buf, T0 + round as u64).unwrap();
        m.fsync(PFS, f).unwrap();
        if round % 25 == 0 {
            every_header_whole(&dev, &format!("seed {seed} round {round}"));
        }
    }
    m.reclaim().unwrap();
    m.flush().unwrap();
    every_header_whole(&dev, "after reclaim");
    assert_eq!(read_all(&mut m, f, 8 * MIB), model, "file content");
    let grown = leaked(&dev).saturating_sub(before);
    // Without freeing at flush time each round keeps at least its old
    // 64 KiB block: rounds * 64 KiB. What stays are small pieces in
    // 16 KiB blocks the volume's first inodes share, for bulkfree.
    assert!(
        grown < 2 * MIB,
        "seed {seed}: {grown} bytes leaked over {rounds} rounds"
    );
    fsck_clean(&dev, "after the overwrite loop");
    drop(m);
    let mut m = open(&dev);
    assert_eq!(read_all(&mut m, f, 8 * MIB), model, "after remount");
}

#[test]
fn overwrites_come_back_one_header() {
    overwrite_loop(2 * GIB, 1, 300);
}

#[test]
fn overwrites_come_back_four_headers() {
    overwrite_loop(8 * GIB, 2, 300);
}

/// Remove `names` from directory `dir`, flush, and commit until nothing
/// waits to be freed; every header copy keeps a whole tree throughout.
/// Returns the free bytes on disk then.
fn delete_and_reclaim(m: &mut Mount, dev: &Arc<MemDevice>, dir: u64, names: &[String]) -> u64 {
    for name in names {
        m.unlink(PFS, dir, name.as_bytes(), T0).unwrap();
    }
    m.flush().unwrap();
    every_header_whole(dev, "deleted");
    m.reclaim().unwrap();
    m.flush().unwrap();
    every_header_whole(dev, "reclaimed");
    freemap_free(&vol(dev))
}

/// Files written, flushed and deleted (data, indirect blocks, inodes,
/// long-name dirents): the free space on disk comes back to where it
/// was before they were written, without bulkfree.
#[test]
fn deleted_files_come_back() {
    for (seed, bytes) in [(3, 2 * GIB), (4, 8 * GIB)] {
        let dev = new_fs_bytes(seed, bytes);
        let mut m = open(&dev);
        let mut rng = SmallRng::seed_from_u64(seed);
        let d = m.mkdir(PFS, ROOT_INUM, b"dir", 0o755, 0, 0, T0).unwrap();
        m.flush().unwrap();
        m.reclaim().unwrap();
        m.flush().unwrap();
        let free0 = freemap_free(&vol(&dev));
        for round in 0..3 {
            let mut names = Vec::new();
            for i in 0..40 {
                let name = format!("{}-{round}-{i}", "long-name-".repeat(8));
                let f = create_file(&mut m, PFS, d, name.as_bytes()).unwrap();
                let len = rng.gen_range(1..3 * MIB as usize);
                m.write(PFS, f, 0, &noise(&mut rng, len), T0).unwrap();
                names.push(name);
                if i % 10 == 9 {
                    m.flush().unwrap();
                }
            }
            m.flush().unwrap();
            every_header_whole(&dev, "written");
            let used = free0 - freemap_free(&vol(&dev));
            assert!(used > 40 * MIB, "round {round}: {used} bytes used");
            let left = free0.saturating_sub(delete_and_reclaim(&mut m, &dev, d, &names));
            assert!(
                left < MIB,
                "seed {seed} round {round}: {left} bytes not back after deleting {used}"
            );
        }
        fsck_clean(&dev, "deleted");
    }
}

/// Files whose data was laundered (written to new blocks, recorded in
/// memory, no commit) and that are deleted before any commit: the
/// laundered blocks are in no tree the commit walks for the deletion, and
/// they come back too (they leaked until a bulkfree, the engine stress
/// ran a 1 GiB volume out of space that way). Some are laundered twice,
/// part rewritten in between, and the space test is the same as for
/// files deleted after a flush.
#[test]
fn laundered_files_deleted_before_a_commit_come_back() {
    let dev = new_fs_bytes(5, 2 * GIB);
    let mut m = open(&dev);
    let mut rng = SmallRng::seed_from_u64(5);
    m.flush().unwrap();
    m.reclaim().unwrap();
    m.flush().unwrap();
    let free0 = freemap_free(&vol(&dev));
    let launder = |m: &mut Mount| {
        let mut batch = m.launder_begin().unwrap();
        batch.write();
        m.launder_finish(batch).unwrap().blocks
    };
    for round in 0..3 {
        let mut names = Vec::new();
        let mut laundered = 0;
        for i in 0..20 {
            let name = format!("f-{round}-{i}");
            let f = create_file(&mut m, PFS, ROOT_INUM, name.as_bytes()).unwrap();
            let len = rng.gen_range(64 * 1024..2 * MIB as usize);
            m.write(PFS, f, 0, &noise(&mut rng, len), T0).unwrap();
            if i % 2 == 0 {
                laundered += launder(&mut m);
                m.write(PFS, f, 4096, &noise(&mut rng, 100_000), T0)
                    .unwrap();
            }
            names.push(name);
        }
        laundered += launder(&mut m);
        assert!(
            laundered > 200,
            "round {round}: {laundered} blocks laundered"
        );
        let left = free0.saturating_sub(delete_and_reclaim(&mut m, &dev, ROOT_INUM, &names));
        assert!(
            left < MIB,
            "round {round}: {left} bytes not back after deleting {laundered} laundered blocks"
        );
    }
    fsck_clean(&dev, "deleted");
}

/// A snapshot shares every block of its origin: overwriting and deleting
/// the origin's file frees only what was written after the snapshot;
/// the snapshot reads back what it held, from every header copy too.
#[test]
fn snapshot_blocks_stay() {
    let dev = new_fs_bytes(5, 8 * GIB);
    let mut m = open(&dev);
    let mut rng = SmallRng::seed_from_u64(5);
    let f = create_file(&mut m, PFS, ROOT_INUM, b"f").unwrap();
    let old = noise(&mut rng, (4 * MIB) as usize);
    m.write(PFS, f, 0, &old, T0).unwrap();
    m.flush().unwrap();
    m.snapshot(PFS, "SNAP", T0).unwrap();
    let mut cur = old.clone();
    for round in 0..12 {
        let at = rng.gen_range(0..64u64) * 65536;
        let buf = noise(&mut rng, 65536);
        cur[at as usize..at as usize + 65536].copy_from_slice(&buf);
        m.write(PFS, f, at, &buf, T0).unwrap();
        m.flush().unwrap();
        every_header_whole(&dev, &format!("round {round}"));
    }
    assert_eq!(read_all(&mut m, f, 4 * MIB), cur);
    m.unlink(PFS, ROOT_INUM, b"f", T0).unwrap();
    m.flush().unwrap();
    m.reclaim().unwrap();
    m.flush().unwrap();
    every_header_whole(&dev, "deleted");
    drop(m);
    let v = Arc::new(vol(&dev));
    let snap = Pfs::open(v, "SNAP").unwrap();
    let ino = snap.resolve("/f").unwrap();
    assert_eq!(
        snap.read(&ino, 0, 4 * MIB as usize).unwrap(),
        old,
        "snapshot content"
    );
    fsck_clean(&dev, "snapshot");
}

/// Blocks dedup shares are never freed early: a copy outlives the
/// overwrite and deletion of its original, in the session that shared
/// them and after a remount.
#[test]
fn dedup_shared_blocks_stay() {
    let dev = new_fs_bytes(6, 2 * GIB);
    let mut m = open(&dev);
    let mut rng = SmallRng::seed_from_u64(6);
    let content = noise(&mut rng, (2 * MIB) as usize);
    let a = create_file(&mut m, PFS, ROOT_INUM, b"a").unwrap();
    m.write(PFS, a, 0, &content, T0).unwrap();
    m.flush().unwrap();
    let b = create_file(&mut m, PFS, ROOT_INUM, b"b").unwrap();
    m.write(PFS, b, 0, &content, T0).unwrap();
    m.flush().unwrap();
    let b2 = create_file(&mut m, PFS, ROOT_INUM, b"b2").unwrap();
    m.write(PFS, b2, 0, &content, T0).unwrap();
    m.flush().unwrap();
    // The same content within one flush too.
    let c = create_file(&mut m, PFS, ROOT_INUM, b"c").unwrap();
    let d = create_file(&mut m, PFS, ROOT_INUM, b"d").unwrap();
    let second = noise(&mut rng, (MIB) as usize);
    m.write(PFS, c, 0, &second, T0).unwrap();
    m.write(PFS, d, 0, &second, T0).unwrap();
    m.flush().unwrap();
    // Overwrite, then delete the originals.
    m.write(PFS, a, 0, &noise(&mut rng, (2 * MIB) as usize), T0)
        .unwrap();
    m.write(PFS, c, 0, &noise(&mut rng, MIB as usize), T0)
        .unwrap();
    m.flush().unwrap();
    m.unlink(PFS, ROOT_INUM, b"a", T0).unwrap();
    m.unlink(PFS, ROOT_INUM, b"c", T0).unwrap();
    m.flush().unwrap();
    m.reclaim().unwrap();
    m.flush().unwrap();
    every_header_whole(&dev, "originals gone");
    // New writes reuse what was freed; the copies must not be hit.
    let e = create_file(&mut m, PFS, ROOT_INUM, b"e").unwrap();
    m.write(PFS, e, 0, &noise(&mut rng, (8 * MIB) as usize), T0)
        .unwrap();
    m.flush().unwrap();
    assert_eq!(read_all(&mut m, b, 2 * MIB), content, "b");
    assert_eq!(read_all(&mut m, d, MIB), second, "d");
    drop(m);
    // Next session: b's blocks were shared (with b2 too), d's were
    // written by the last session; this session cannot know which of
    // those another blockref shares, so deleting b leaves its blocks to
    // bulkfree.
    let mut m = open(&dev);
    let f = create_file(&mut m, PFS, ROOT_INUM, b"f").unwrap();
    m.write(PFS, f, 0, &content, T0).unwrap();
    m.flush().unwrap();
    m.unlink(PFS, ROOT_INUM, b"b", T0).unwrap();
    m.flush().unwrap();
    m.reclaim().unwrap();
    let g = create_file(&mut m, PFS, ROOT_INUM, b"g").unwrap();
    m.write(PFS, g, 0, &noise(&mut rng, (8 * MIB) as usize), T0)
        .unwrap();
    m.flush().unwrap();
    assert_eq!(read_all(&mut m, f, 2 * MIB), content, "f");
    assert_eq!(read_all(&mut m, b2, 2 * MIB), content, "b2 after remount");
    assert_eq!(read_all(&mut m, d, MIB), second, "d after remount");
    every_header_whole(&dev, "second session");
    fsck_clean(&dev, "dedup");
}

/// Frees at flush time and bulkfree passes interleaved with writes,
/// deletions and flushes: every header stays whole; once quiet, two
/// passes leave the freemap equal to the scan.
#[test]
fn bulkfree_between_frees() {
    let dev = new_fs_bytes(7, 8 * GIB);
    let offset = allocator_free_offset(&dev);
    let mut m = open(&dev);
    let mut rng = SmallRng::seed_from_u64(7);
    let mut files: BTreeMap<Vec<u8>, (u64, Vec<u8>)> = BTreeMap::new();
    let mut merged_at = 0;
    for round in 0..40 {
        for _ in 0..6 {
            let name = format!("f{}", rng.gen_range(0..30)).into_bytes();
            match files.get(&name).map(|x| x.0) {
                Some(inum) if rng.gen_bool(0.3) => {
                    m.unlink(PFS, ROOT_INUM, &name, T0).unwrap();
                    let _ = inum;
                    files.remove(&name);
                }
                Some(inum) => {
                    let len = rng.gen_range(1..400_000);
                    let data = noise(&mut rng, len);
                    m.setattr(
                        PFS,
                        inum,
                        hammer2::mount::SetAttr {
                            size: Some(0),
                            ..Default::default()
                        },
                        T0,
                    )
                    .unwrap();
                    m.write(PFS, inum, 0, &data, T0).unwrap();
                    files.insert(name, (inum, data));
                }
                None => {
                    let inum = create_file(&mut m, PFS, ROOT_INUM, &name).unwrap();
                    let len = rng.gen_range(1..400_000);
                    let data = noise(&mut rng, len);
                    m.write(PFS, inum, 0, &data, T0).unwrap();
                    files.insert(name, (inum, data));
                }
            }
        }
        match round % 5 {
            0 => {
                // A pass whose scan runs while the frontend and flushes
                // drop and free blocks.
                let mut scan = m.bulkfree_begin().unwrap();
                let name = b"f0".to_vec();
                if let Some((inum, _)) = files.remove(&name) {
                    let _ = inum;
                    m.unlink(PFS, ROOT_INUM, &name, T0).unwrap();
                }
                m.flush().unwrap();
                scan.run(None).unwrap();
                m.bulkfree_commit(scan).unwrap();
                merged_at = m.flush().unwrap().tid;
            }
            3 => {
                // A pass abandoned: frees held for it go on.
                let scan = m.bulkfree_begin().unwrap();
                drop(scan);
                m.flush().unwrap();
            }
            _ => {
                m.flush().unwrap();
            }
        }
        headers_whole_since(&dev, merged_at, &format!("round {round}"));
    }
    for (name, (inum, data)) in &files {
        assert_eq!(
            &read_all(&mut m, *inum, data.len() as u64),
            data,
            "{}",
            String::from_utf8_lossy(name)
        );
    }
    m.reclaim().unwrap();
    m.bulkfree(None).unwrap();
    m.bulkfree(None).unwrap();
    assert_freemap_is_full_scan(&dev, offset, "quiet after two passes");
    fsck_clean(&dev, "bulkfree between frees");
}
