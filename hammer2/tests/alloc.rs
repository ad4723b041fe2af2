//! The freemap allocator: a seeded model test against a reference set of
//! byte ranges, and tests on real DragonFly images (allocate and flush,
//! fill to NoSpace, mount-time recovery), each ending with fsck and the
//! read side of the freemap.
//!
//! `H2_ALLOC_SEED=S` replays one model seed, `H2_ALLOC_ITERS=N` runs N
//! seeds. `H2_ALLOC_DUMP_DIR=DIR` leaves the images the image tests
//! produce in DIR (for DragonFly's fsck).

use bufcache::{BlockDevice, MemDevice};
use hammer2::alloc::{Allocator, Purpose, Request};
use hammer2::chain::decode_set;
use hammer2::disk::freemap::{BMAP_ALLOCATED, BMAP_FREE};
use hammer2::disk::{
    Blockref, BlockrefType, DataOff, InodeData, VolumeHeader, FREEMAP_BLOCK_SIZE, ZONE_BYTES64,
    ZONE_SEG,
};
use hammer2::freemap;
use hammer2::{Error, Volume};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TYPES: [BlockrefType; 4] = [
    BlockrefType::Inode,
    BlockrefType::Indirect,
    BlockrefType::Data,
    BlockrefType::Dirent,
];

// ---- images ----------------------------------------------------------

fn fixture_dir() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    for c in [
        here.join("../../shared/fixtures/hammer2"),
        here.join("../shared/fixtures/hammer2"),
    ] {
        if c.is_dir() {
            return c;
        }
    }
    panic!("fixture images not found beside the project");
}

/// A fixture's non-zero 64 KiB chunks and its size, decoded once.
type Chunks = Arc<(u64, Vec<(u64, Vec<u8>)>)>;

fn fixture_chunks(name: &str) -> Chunks {
    static CACHE: OnceLock<Mutex<BTreeMap<String, Chunks>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(BTreeMap::new()));
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = cache.get(name) {
        return c.clone();
    }
    let path = fixture_dir().join(format!("{name}.img.zst"));
    let file = std::fs::File::open(&path).expect("open fixture");
    let mut dec = zstd::stream::read::Decoder::new(file).expect("zstd");
    let mut chunks = Vec::new();
    let mut len = 0u64;
    let mut buf = vec![0u8; 65536];
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = dec.read(&mut buf[filled..]).expect("decompress");
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        let c = &buf[..filled];
        if c.chunks(8).any(|w| w.iter().any(|&b| b != 0)) {
            chunks.push((len, c.to_vec()));
        }
        len += filled as u64;
    }
    let c: Chunks = Arc::new((len, chunks));
    cache.insert(name.to_string(), c.clone());
    c
}

/// A private in-memory copy of fixture `name`.
fn fixture_device(name: &str) -> Arc<MemDevice> {
    let c = fixture_chunks(name);
    let dev = MemDevice::new(c.0);
    for (at, bytes) in &c.1 {
        dev.write_at(bytes, *at).unwrap();
    }
    Arc::new(dev)
}

/// A volume with nothing but a header (no super-root, no freemap): newfs's
/// geometry for `size` bytes, boot and aux areas of 8 MiB each.
fn synthetic_device(size: u64) -> Arc<MemDevice> {
    let dev = MemDevice::new(size);
    let mut vh = VolumeHeader::new();
    vh.version = 1;
    vh.volu_size = size;
    vh.boot_beg = ZONE_SEG;
    vh.boot_end = ZONE_SEG + 8 * MIB;
    vh.aux_beg = vh.boot_end;
    vh.aux_end = vh.aux_beg + 8 * MIB;
    vh.allocator_beg = vh.aux_end + 0xc00;
    vh.allocator_size = size - vh.aux_end;
    vh.allocator_free = vh.allocator_size;
    vh.mirror_tid = 1;
    vh.freemap_tid = 1;
    dev.write_at(&vh.encode(), 0).unwrap();
    Arc::new(dev)
}

fn open(dev: &Arc<MemDevice>) -> Volume {
    let d: Arc<dyn BlockDevice> = dev.clone();
    Volume::open(d).expect("open volume")
}

/// Write the header a flush at `mirror_tid` leaves into the next header
/// slot (DragonFly's rotation), and reopen.
fn commit_header(dev: &Arc<MemDevice>, vol: &Volume, a: &Allocator, mirror_tid: u64) -> Volume {
    let mut vh = vol.header.clone();
    a.apply_to_header(&mut vh);
    vh.mirror_tid = vh.mirror_tid.max(mirror_tid);
    let slots = (0..4)
        .take_while(|&j| j as u64 * ZONE_BYTES64 + ZONE_SEG <= vh.volu_size)
        .count();
    let j = (vol.header_index + 1) % slots;
    dev.barrier().unwrap();
    dev.write_at(&vh.encode(), j as u64 * ZONE_BYTES64).unwrap();
    dev.barrier().unwrap();
    let v = open(dev);
    assert_eq!(v.header_index, j);
    assert_eq!(v.header.freemap_tid, a.freemap_tid());
    v
}

fn fsck_clean(dev: &Arc<MemDevice>) {
    let d: Arc<dyn BlockDevice> = dev.clone();
    let report = hammer2::fsck::fsck(d, Default::default()).expect("fsck runs");
    assert!(
        report.is_clean(),
        "fsck problems: {:#?}",
        &report.problems[..report.problems.len().min(20)]
    );
}

fn dump(dev: &MemDevice, name: &str) {
    let Ok(dir) = std::env::var("H2_ALLOC_DUMP_DIR") else {
        return;
    };
    use std::io::{Seek, SeekFrom, Write};
    let path = Path::new(&dir).join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    let mut buf = vec![0u8; 65536];
    let mut at = 0;
    while at < dev.size_bytes() {
        dev.read_at(&mut buf, at).unwrap();
        if buf.iter().any(|&b| b != 0) {
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&buf).unwrap();
        }
        at += 65536;
    }
    f.set_len(dev.size_bytes()).unwrap();
    eprintln!("wrote {}", path.display());
}

/// Every (offset, bytes, mirror_tid) the topology references.
fn topology_blocks(vol: &Volume) -> Vec<(Blockref, u64, u64)> {
    let mut out = Vec::new();
    let mut stack: Vec<Blockref> = vol.header.sroot_blockset.to_vec();
    while let Some(br) = stack.pop() {
        if br.is_empty() {
            continue;
        }
        if br.data_off.radix() != 0 {
            out.push((br, br.data_off.offset(), br.data_off.bytes()));
        }
        match br.btype {
            BlockrefType::Inode => {
                let buf = vol.read_physical(&br).unwrap();
                let ino = InodeData::decode(&buf, 0).unwrap();
                if !ino.meta.has_direct_data() {
                    stack.extend(ino.blockset());
                }
            }
            BlockrefType::Indirect => stack.extend(decode_set(&vol.read_physical(&br).unwrap())),
            _ => {}
        }
    }
    out
}

fn blocks_of(d: DataOff) -> impl Iterator<Item = u64> {
    let start = d.offset() & !(FREEMAP_BLOCK_SIZE - 1);
    (start..d.offset() + d.bytes()).step_by(FREEMAP_BLOCK_SIZE as usize)
}

/// The freemap on disk (read side) shows every range allocated.
fn assert_on_disk_allocated(vol: &Volume, ranges: impl Iterator<Item = DataOff>) {
    let leaves = freemap::leaves(vol).expect("read freemap");
    for d in ranges {
        for b in blocks_of(d) {
            assert_eq!(
                freemap::block_state(&leaves, b),
                Some(BMAP_ALLOCATED),
                "{d:?} not allocated on disk"
            );
        }
    }
}

/// The allocator's leaves equal what the read side finds on disk.
fn assert_memory_matches_disk(a: &Allocator, vol: &Volume) {
    let disk = freemap::leaves(vol).expect("read freemap");
    let mem = a.leaves();
    assert_eq!(
        disk.keys().collect::<Vec<_>>(),
        mem.keys().collect::<Vec<_>>()
    );
    for (z, l) in &disk {
        let m = &mem[z];
        assert_eq!(l.bref, m.bref, "leaf bref of zone {z:#x}");
        assert_eq!(l.bmaps, m.bmaps, "leaf of zone {z:#x}");
    }
}

fn random_request(rng: &mut SmallRng, purpose: Purpose) -> Request {
    let radix = rng.gen_range(10..=16u32);
    let bytes = if rng.gen_bool(0.3) {
        rng.gen_range(1..=1u64 << radix)
    } else {
        1 << radix
    };
    Request {
        btype: TYPES[rng.gen_range(0..TYPES.len())],
        bytes,
        key: rng.gen_range(0..1u64 << 24) << 16,
        purpose,
    }
}

// ---- (1) the model test ----------------------------------------------

/// The reference: allocations as byte ranges, split by durability.
#[derive(Default)]
struct Model {
    /// Every allocation not released, by offset (flushed or not).
    live: BTreeMap<u64, DataOff>,
    unflushed: BTreeSet<u64>,
    /// 16 KiB blocks that hold a flushed allocation or were marked.
    durable_blocks: BTreeSet<u64>,
    /// Marked ranges (allocated forever).
    marked: Vec<DataOff>,
}

impl Model {
    fn overlaps(&self, d: DataOff) -> Option<DataOff> {
        let (s, e) = (d.offset(), d.offset() + d.bytes());
        if let Some((_, &p)) = self.live.range(..e).next_back() {
            if p.offset() + p.bytes() > s {
                return Some(p);
            }
        }
        None
    }

    fn used_blocks(&self) -> BTreeSet<u64> {
        let mut used = self.durable_blocks.clone();
        for d in self.live.values() {
            used.extend(blocks_of(*d));
        }
        used
    }
}

fn check_placement(vh: &VolumeHeader, d: DataOff) {
    let (s, e) = (d.offset(), d.offset() + d.bytes());
    assert!(d.radix() >= 10 && d.radix() <= 16, "{d:?}");
    assert!(s >= vh.allocator_beg, "{d:?} below allocator_beg");
    assert!(e <= vh.volu_size, "{d:?} past the end");
    assert!(s % GIB >= ZONE_SEG, "{d:?} in a reserved segment");
    assert!(e <= vh.boot_beg || s >= vh.aux_end, "{d:?} in boot/aux");
    assert_eq!(s / 65536, (e - 1) / 65536, "{d:?} crosses 64 KiB");
    // Sub-16 KiB blocks packed by `linear` are only 1 KiB aligned, as in
    // DragonFly; 16 KiB and up are aligned to their size.
    let align = if d.bytes() < FREEMAP_BLOCK_SIZE {
        1024
    } else {
        d.bytes()
    };
    assert_eq!(s % align, 0, "{d:?} misaligned");
}

/// How often the interesting paths ran (a coverage guard).
#[derive(Default, Debug)]
struct Coverage {
    no_space: u64,
    remounts: u64,
    leaves_max: usize,
}

fn model_run(seed: u64, cov: &mut Coverage) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let size = match seed % 3 {
        0 => 48 * MIB,
        1 => 2 * GIB + 512 * MIB + 16 * MIB,
        _ => 5 * GIB + 24 * MIB,
    };
    let dev = synthetic_device(size);
    let mut vol = open(&dev);
    let mut a = Allocator::load(&vol).unwrap();
    if rng.gen_bool(0.5) {
        a.set_reserve_bytes(rng.gen_range(0..64) * 65536);
    }
    let initial_free = a.free_bytes();
    let vh = vol.header.clone();
    let mut m = Model::default();
    let mut tid = vh.mirror_tid;
    let ops = 2500;
    let trace = std::env::var("H2_ALLOC_TRACE").is_ok();
    for op in 0..ops {
        let ctx = format!("seed {seed} op {op}");
        if trace {
            eprintln!("{ctx}: {}", a.stats());
        }
        match rng.gen_range(0..100) {
            0..=59 => {
                let purpose = if rng.gen_bool(0.2) {
                    Purpose::Flush
                } else {
                    Purpose::Frontend
                };
                let req = random_request(&mut rng, purpose);
                let before = a.stats();
                match a.alloc_request(req) {
                    Ok(d) => {
                        check_placement(&vh, d);
                        assert_eq!(d.bytes(), req.bytes.next_power_of_two().max(1024));
                        if let Some(p) = m.overlaps(d) {
                            panic!("{ctx}: {d:?} overlaps live {p:?}");
                        }
                        for b in blocks_of(d) {
                            assert!(
                                !m.durable_blocks.contains(&b) || d.bytes() < FREEMAP_BLOCK_SIZE,
                                "{ctx}: {d:?} in a durable block"
                            );
                        }
                        if trace {
                            eprintln!("  alloc {req:?} -> {d:?}");
                        }
                        m.live.insert(d.offset(), d);
                        m.unflushed.insert(d.offset());
                    }
                    Err(Error::NoSpace { .. }) => {
                        cov.no_space += 1;
                        if purpose == Purpose::Frontend {
                            // Refused at the reserve, or truly nothing fits.
                            assert!(
                                before.free_chunk_bytes <= before.reserve_bytes
                                    || before.free_chunk_bytes == 0,
                                "{ctx}: NoSpace with {before}"
                            );
                        } else {
                            assert!(before.free_chunk_bytes == 0, "{ctx}: NoSpace with {before}");
                        }
                    }
                    Err(e) => panic!("{ctx}: {e}"),
                }
            }
            60..=79 => {
                let Some(&off) = m
                    .unflushed
                    .iter()
                    .nth(rng.gen_range(0..m.unflushed.len().max(1)))
                else {
                    continue;
                };
                let d = m.live.remove(&off).unwrap();
                m.unflushed.remove(&off);
                if trace {
                    eprintln!("  release {d:?}");
                }
                a.release_unflushed(d)
                    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                assert!(a.release_unflushed(d).is_err(), "{ctx}: double release");
            }
            80..=83 => {
                // Releasing something durable is refused.
                let durable: Vec<DataOff> = m
                    .live
                    .values()
                    .filter(|d| !m.unflushed.contains(&d.offset()))
                    .copied()
                    .collect();
                if let Some(d) = durable.get(rng.gen_range(0..durable.len().max(1))) {
                    assert!(a.release_unflushed(*d).is_err(), "{ctx}");
                }
            }
            84..=88 => {
                // Someone else's block: a random free 64 KiB chunk, marked.
                // (Above allocator_beg rounded up to 4 MiB: below that the
                // freemap shows everything allocated from the start.)
                let lo = vh.allocator_beg.div_ceil(4 * MIB) * 4 * MIB;
                let at = rng.gen_range(lo / 65536..size / 65536) * 65536;
                let d = DataOff::new(at, 16);
                if at % GIB < ZONE_SEG || m.overlaps(d).is_some() {
                    continue;
                }
                if trace {
                    eprintln!("  mark {d:?}");
                }
                a.mark_allocated(d).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                m.live.insert(at, d);
                m.marked.push(d);
                m.durable_blocks.extend(blocks_of(d));
            }
            89..=96 => {
                tid += 1;
                a.flush(dev.as_ref(), tid).unwrap();
                for off in std::mem::take(&mut m.unflushed) {
                    m.durable_blocks.extend(blocks_of(m.live[&off]));
                }
                assert!(!a.is_dirty());
            }
            _ => {
                // Flush, write the header, remount, compare.
                tid += 1;
                a.flush(dev.as_ref(), tid).unwrap();
                for off in std::mem::take(&mut m.unflushed) {
                    m.durable_blocks.extend(blocks_of(m.live[&off]));
                }
                vol = commit_header(&dev, &vol, &a, tid);
                assert_on_disk_allocated(&vol, m.live.values().copied());
                assert_memory_matches_disk(&a, &vol);
                let reserve = a.reserve_bytes();
                let free = a.free_bytes();
                a = Allocator::load(&vol).unwrap();
                a.set_reserve_bytes(reserve);
                cov.remounts += 1;
                assert_eq!(a.free_bytes(), free, "{ctx}: free bytes after remount");
            }
        }
        // Free space accounting: every 16 KiB block any live or durable
        // allocation touches is used, nothing else.
        let used = m.used_blocks().len() as u64;
        assert_eq!(
            a.free_bytes(),
            initial_free - used * FREEMAP_BLOCK_SIZE,
            "{ctx}: free bytes"
        );
        for d in m.live.values() {
            assert_eq!(a.block_state(d.offset()), Some(BMAP_ALLOCATED), "{ctx}");
        }
        cov.leaves_max = cov.leaves_max.max(a.stats().leaves);
    }
}

#[test]
fn model_random_operations() {
    let mut cov = Coverage::default();
    if let Ok(s) = std::env::var("H2_ALLOC_SEED") {
        model_run(s.parse().expect("H2_ALLOC_SEED"), &mut cov);
        return;
    }
    let iters: u64 = std::env::var("H2_ALLOC_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    for seed in 0..iters {
        model_run(seed, &mut cov);
    }
    eprintln!("{cov:?}");
    assert!(
        cov.no_space > 0 && cov.remounts > 0 && cov.leaves_max > 1,
        "{cov:?}"
    );
}

/// Fill a multi-zone volume through marks and allocations so leaves for
/// all zones exist, then check the tree DragonFly's rules give, across a
/// remount and eight rotations.
#[test]
fn leaves_for_every_zone_and_rotation() {
    let size = 6 * GIB + 64 * MIB;
    let dev = synthetic_device(size);
    let mut vol = open(&dev);
    let mut a = Allocator::load(&vol).unwrap();
    let mut tid = vol.header.mirror_tid;
    // Touch each zone in turn.
    for z in 0..7u64 {
        a.mark_allocated(DataOff::new(z * GIB + 40 * MIB, 14))
            .unwrap();
    }
    let leaves = a.leaves();
    assert_eq!(leaves.len(), 7);
    let mut slots = Vec::new();
    for round in 0..9 {
        a.mark_allocated(DataOff::new(3 * GIB + (6 + round) * MIB, 14))
            .unwrap();
        tid += 1;
        let set = a.flush(dev.as_ref(), tid).unwrap();
        vol = commit_header(&dev, &vol, &a, tid);
        // Root: one level-2 node holding all seven leaves.
        assert_eq!(set[0].btype, BlockrefType::FreemapNode);
        assert_eq!(set[0].keybits, 38);
        assert!(set[1..].iter().all(|b| b.is_empty()));
        slots.push(set[0].data_off.offset() / 65536);
        let leaf3 = &a.leaves()[&(3 * GIB)];
        slots.push((leaf3.bref.data_off.offset() - 3 * GIB) / 65536);
        assert_memory_matches_disk(&a, &vol);
    }
    // Node and leaf 3 rotate through the 8 sets; untouched leaves stay.
    assert_eq!(slots[..4], [2, 1, 7, 6]);
    assert_eq!(slots[16..18], [2, 1]);
    assert_eq!((a.leaves()[&GIB].bref.data_off.offset() - GIB) / 65536, 1);
}

// ---- (2) a real DragonFly image ---------------------------------------

#[test]
fn dragonfly_image_allocate_flush_fsck() {
    let dev = fixture_device("v1-lz4-xxhash64");
    let vol = open(&dev);
    let mut a = Allocator::load(&vol).unwrap();
    assert_memory_matches_disk(&a, &vol);
    // Free space: the leaf's free blocks plus zone 1 as a new leaf would
    // be (all but its reserved segment).
    let disk = freemap::leaves(&vol).unwrap();
    assert_eq!(
        a.free_bytes(),
        freemap::free_bytes_in_leaves(&disk) + (GIB - ZONE_SEG)
    );
    assert_eq!(a.allocator_free(), vol.header.allocator_free);

    let topo = topology_blocks(&vol);
    let mut taken: BTreeMap<u64, u64> = topo.iter().map(|(_, s, b)| (*s, s + b)).collect();
    let mut rng = SmallRng::seed_from_u64(2);
    let mut mine = Vec::new();
    for _ in 0..4000 {
        let d = a
            .alloc_request(random_request(&mut rng, Purpose::Frontend))
            .unwrap();
        check_placement(&vol.header, d);
        let (s, e) = (d.offset(), d.offset() + d.bytes());
        if let Some((ps, pe)) = taken.range(..e).next_back() {
            assert!(*pe <= s, "{d:?} overlaps {ps:#x}..{pe:#x}");
        }
        taken.insert(s, e);
        mine.push(d);
    }
    // Some go back before the flush.
    for d in mine.drain(..500) {
        a.release_unflushed(d).unwrap();
    }
    let tid = vol.header.mirror_tid + 1;
    a.flush(dev.as_ref(), tid).unwrap();
    let vol = commit_header(&dev, &vol, &a, tid);
    fsck_clean(&dev);
    assert_on_disk_allocated(&vol, mine.iter().copied());
    assert_on_disk_allocated(&vol, topo.iter().map(|(b, _, _)| b.data_off));
    assert_memory_matches_disk(&a, &vol);
    // A remount sees the same.
    let b = Allocator::load(&vol).unwrap();
    assert_eq!(b.free_bytes(), a.free_bytes());
    assert_eq!(b.allocator_free(), a.allocator_free());
    dump(&dev, "alloc-v1-lz4-xxhash64.img");
}

// ---- (3) full ---------------------------------------------------------

#[test]
fn fill_until_no_space() {
    let dev = fixture_device("newfs-v1-empty");
    let vol = open(&dev);
    let mut a = Allocator::load(&vol).unwrap();
    let mut rng = SmallRng::seed_from_u64(3);
    let mut count = 0;
    let err = loop {
        let req = random_request(&mut rng, Purpose::Frontend);
        match a.alloc_request(req) {
            Ok(d) => {
                check_placement(&vol.header, d);
                count += 1;
            }
            Err(e) => break e,
        }
    };
    assert!(matches!(err, Error::NoSpace { .. }), "{err}");
    assert!(count > 10_000);
    // The reserve is intact: the flush gets at least its chunks, of any
    // size, while the frontend keeps getting NoSpace.
    let reserve = a.reserve_bytes();
    assert!(reserve >= 16 * MIB);
    assert!(a.stats().free_chunk_bytes >= reserve);
    assert!(matches!(
        a.alloc(BlockrefType::Inode, 1024),
        Err(Error::NoSpace { .. })
    ));
    for _ in 0..reserve / 65536 {
        let d = a.alloc_flush(BlockrefType::Indirect, 65536).unwrap();
        check_placement(&vol.header, d);
    }
    // Then it runs dry too, cleanly.
    let mut flush_more = 0;
    loop {
        match a.alloc_flush(BlockrefType::Indirect, 16384) {
            Ok(_) => flush_more += 1,
            Err(Error::NoSpace { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    // What is left are fragments behind `linear` cursors.
    loop {
        match a.alloc_flush(BlockrefType::Data, 1024) {
            Ok(d) => assert!(d.offset() % FREEMAP_BLOCK_SIZE != 0),
            Err(Error::NoSpace { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    eprintln!(
        "{count} allocations, then {flush_more} more 16 KiB from the flush; {}",
        a.stats()
    );
    assert_eq!(a.free_bytes(), 0);
    let tid = vol.header.mirror_tid + 1;
    a.flush(dev.as_ref(), tid).unwrap();
    let vol = commit_header(&dev, &vol, &a, tid);
    fsck_clean(&dev);
    let leaves = freemap::leaves(&vol).unwrap();
    assert_eq!(freemap::free_bytes_in_leaves(&leaves), 0);
    dump(&dev, "alloc-full.img");
}

// ---- (4) mount-time recovery -----------------------------------------

#[test]
fn recovery_marks_blocks_newer_than_freemap_tid() {
    let dev = fixture_device("v1-lz4-xxhash64");
    let vol = open(&dev);
    let topo = topology_blocks(&vol);
    let tids: BTreeSet<u64> = topo.iter().map(|(b, _, _)| b.mirror_tid).collect();
    let top = *tids.last().unwrap();
    let old_tid = top - 1;
    // Blocks the recovery must find: newer than old_tid, at or above
    // allocator_beg (newfs's own blocks are never in the freemap).
    let newer: Vec<Blockref> = topo
        .iter()
        .filter(|(b, s, _)| b.mirror_tid > old_tid && *s >= vol.header.allocator_beg)
        .map(|(b, _, _)| *b)
        .collect();
    assert!(newer.len() > 100);

    // Forget them in the leaf, re-seal it, lower freemap_tid.
    let mut leaf_br = vol.header.freemap_blockset[0];
    assert_eq!(leaf_br.btype, BlockrefType::FreemapLeaf);
    let mut buf = vol.read_physical(&leaf_br).unwrap();
    let mut leaf = freemap::decode_leaf(&leaf_br, &buf).unwrap();
    let cleared: BTreeSet<u64> = newer
        .iter()
        .step_by(3)
        .flat_map(|b| blocks_of(b.data_off))
        .collect();
    for &blk in &cleared {
        // As if the flush that allocated them never reached the freemap.
        let (_, n, k) = freemap::locate(blk);
        assert_eq!(leaf.bmaps[n].block_state(k), BMAP_ALLOCATED);
        leaf.bmaps[n].set_block_state(k, BMAP_FREE);
        leaf.bmaps[n].avail += FREEMAP_BLOCK_SIZE as u32;
    }
    for (i, bm) in leaf.bmaps.iter().enumerate() {
        bm.encode_fields(&mut buf[i * 128..]);
    }
    dev.write_at(&buf, leaf_br.data_off.offset()).unwrap();
    hammer2::check::set_check(&mut leaf_br, &buf);
    let mut vh = vol.header.clone();
    vh.freemap_blockset[0] = leaf_br;
    vh.freemap_tid = old_tid;
    dev.write_at(&vh.encode(), 0).unwrap();
    let vol = open(&dev);
    assert_eq!(vol.header.freemap_tid, old_tid);
    let before = freemap::leaves(&vol).unwrap();
    assert!(cleared
        .iter()
        .all(|&b| freemap::block_state(&before, b) == Some(BMAP_FREE)));

    let mut a = Allocator::load(&vol).unwrap();
    let st = a.recover(&vol).unwrap();
    eprintln!("{st}");
    assert_eq!(st.damaged, 0);
    // Blocks shared by several blockrefs (packed inodes) change once.
    assert!(st.marked > 0 && st.marked as usize <= cleared.len());
    assert_eq!(st.bytes, cleared.len() as u64 * FREEMAP_BLOCK_SIZE);
    for &b in &cleared {
        assert_eq!(a.block_state(b), Some(BMAP_ALLOCATED), "{b:#x}");
    }
    // Nothing older was touched, and a second pass changes nothing.
    assert_eq!(a.recover(&vol).unwrap().marked, 0);
    let tid = vol.header.mirror_tid + 1;
    a.flush(dev.as_ref(), tid).unwrap();
    let vol = commit_header(&dev, &vol, &a, tid);
    fsck_clean(&dev);
    assert_on_disk_allocated(&vol, newer.iter().map(|b| b.data_off));
    dump(&dev, "alloc-recovered.img");
}

// ---- a failed write -----------------------------------------------------

/// A device whose writes fail.
struct ReadOnly(Arc<MemDevice>);

impl BlockDevice for ReadOnly {
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, _: &[u8], _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("write refused"))
    }
    fn barrier(&self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn failed_flush_write_poisons() {
    let dev = synthetic_device(48 * MIB);
    let vol = open(&dev);
    let mut a = Allocator::load(&vol).unwrap();
    let d = a.alloc(BlockrefType::Data, 65536).unwrap();
    let before = dev.snapshot();
    let ro = ReadOnly(dev.clone());
    assert!(matches!(a.flush(&ro, 2), Err(Error::Io { .. })));
    assert!(a.alloc(BlockrefType::Data, 65536).is_err());
    assert!(a.release_unflushed(d).is_err());
    assert!(a.flush(dev.as_ref(), 2).is_err());
    // Nothing reached the device.
    let mut x = vec![0u8; 65536];
    let mut y = vec![0u8; 65536];
    for at in (0..48 * MIB).step_by(65536) {
        dev.read_at(&mut x, at).unwrap();
        before.read_at(&mut y, at).unwrap();
        assert!(x == y, "{at:#x} changed");
    }
}

/// A small block allocated while a bulkfree pass runs and released before
/// the pass merges leaves the 16 KiB block it came from free, and the
/// merge must not leave the small-block cursor inside it: a 16 KiB block
/// that takes it whole is never carved by a later small allocation.
/// (The stress of the engine found data blocks overwritten that way: the
/// merge took the cursor from what the pass recorded.)
#[test]
fn a_small_block_released_during_a_bulkfree_pass_leaves_no_cursor_behind() {
    let dev = synthetic_device(48 * MIB);
    let vol = open(&dev);
    let mut a = Allocator::load(&vol).unwrap();
    // A file block the scan will find, so the bmap stays in use.
    a.alloc(BlockrefType::Data, 65536).unwrap();
    let mut scan = a.bulkfree_start();
    // Scanned: what is allocated now.
    let held: Vec<u64> = (0..48 * MIB)
        .step_by(FREEMAP_BLOCK_SIZE as usize)
        .filter(|&b| a.block_state(b) == Some(BMAP_ALLOCATED))
        .collect();
    for &b in &held {
        scan.mark(BlockrefType::Inode, DataOff::new(b, 14));
    }
    let small = a.alloc(BlockrefType::Data, 8192).unwrap();
    let pair = small.offset() & !(FREEMAP_BLOCK_SIZE - 1);
    a.release_unflushed(small).unwrap();
    assert_eq!(a.block_state(pair), Some(BMAP_FREE));
    a.bulkfree_apply(&mut scan).unwrap();
    let whole = a
        .alloc_request(Request {
            btype: BlockrefType::Data,
            bytes: FREEMAP_BLOCK_SIZE,
            key: pair & (4 * MIB - 1),
            purpose: Purpose::Frontend,
        })
        .unwrap();
    assert_eq!(
        whole.offset(),
        pair,
        "the 16 KiB block goes where its key points, the freed pair"
    );
    for bytes in [1024, 2048, 4096, 8192] {
        let s = a.alloc(BlockrefType::Data, bytes).unwrap();
        let (lo, hi) = (s.offset(), s.offset() + s.bytes());
        assert!(
            hi <= whole.offset() || lo >= whole.offset() + whole.bytes(),
            "{bytes} bytes at {lo:#x} inside the 16 KiB block at {:#x}",
            whole.offset()
        );
    }
}
