//! No decoder and no image open panics on any input: random and mutated
//! blocks through every decoder, and mutated images through open, a full
//! read of every PFS, and fsck. Seeded; `H2_FUZZ_ITERS` scales the run
//! and a failing seed is printed so it can be replayed with
//! `H2_FUZZ_SEED`.

use bufcache::{BlockDevice, MemDevice};
use hammer2::chain;
use hammer2::compress::decompress;
use hammer2::disk::freemap::{BmapData, BMAP_BYTES};
use hammer2::disk::{
    Blockref, BlockrefType, InodeData, VolumeHeader, BLOCKREF_BYTES, INODE_BYTES, VOLUME_BYTES,
};
use hammer2::fsck::{fsck, Options};
use hammer2::pfs::{pfs_list, Pfs};
use hammer2::Volume;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use tests::*;

fn iters(default: usize) -> usize {
    std::env::var("H2_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn seeds(n: usize) -> Vec<u64> {
    match std::env::var("H2_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(s) => vec![s],
        None => (0..n as u64)
            .map(|i| 0x4841_4d32 ^ (i * 0x9e37_79b9))
            .collect(),
    }
}

#[test]
fn decoders_round_trip_and_never_panic() {
    let mut rng = SmallRng::seed_from_u64(1);
    for _ in 0..iters(20_000) {
        let mut b = [0u8; BLOCKREF_BYTES];
        rng.fill_bytes(&mut b);
        let br = Blockref::decode(&b);
        assert_eq!(br.encode(), b, "blockref encode(decode(b)) == b");
        let _ = (
            br.key_end(),
            br.dirent(),
            br.data_off.bytes(),
            format!("{br:?}"),
        );

        let mut raw = vec![0u8; INODE_BYTES];
        rng.fill_bytes(&mut raw);
        let ino = InodeData::decode(&raw, 0).unwrap();
        assert_eq!(InodeData::decode(&ino.encode(), 0).unwrap(), ino);
        let _ = (ino.name(), ino.blockset());

        let mut bm = [0u8; BMAP_BYTES];
        rng.fill_bytes(&mut bm);
        let d = BmapData::decode(&bm);
        let mut again = [0u8; BMAP_BYTES];
        d.encode(&mut again);
        assert_eq!(BmapData::decode(&again), d);

        let len = rng.gen_range(0..4096);
        let junk: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        for method in 0..16u8 {
            let _ = decompress(method, &junk, 65536, 0);
        }
        let _ = InodeData::decode(&junk, 0);
    }
    // Volume headers: any bytes after the magic decode, and re-encoding
    // gives valid CRCs.
    for _ in 0..iters(200) {
        let mut raw = vec![0u8; VOLUME_BYTES];
        rng.fill_bytes(&mut raw);
        raw[..8].copy_from_slice(&hammer2::disk::volume::VOLUME_ID_HBO.to_le_bytes());
        let vh = VolumeHeader::decode(&raw, 0).unwrap();
        let back = VolumeHeader::decode(&vh.encode(), 0).unwrap();
        assert!(back.crcs().all_good());
        let cut = rng.gen_range(0..VOLUME_BYTES);
        assert!(VolumeHeader::decode(&raw[..cut], 0).is_err());
    }
}

/// Every metadata block of an image: (offset, bytes).
fn metadata_blocks(vol: &Volume) -> Vec<(u64, u64)> {
    fn walk(vol: &Volume, set: &[Blockref], out: &mut Vec<(u64, u64)>, depth: usize) {
        for br in set
            .iter()
            .filter(|b| !b.is_empty() && b.data_off.bytes() > 0)
        {
            if br.btype == BlockrefType::Data || depth > 40 {
                continue;
            }
            out.push((br.data_off.offset(), br.data_off.bytes()));
            match br.btype {
                BlockrefType::Inode => {
                    if let Ok(ino) = hammer2::pfs::read_inode(vol, br) {
                        walk(vol, &ino.blockset(), out, depth + 1);
                    }
                }
                BlockrefType::Indirect | BlockrefType::FreemapNode => {
                    if let Ok(c) = chain::read_node(vol, br) {
                        walk(vol, &c, out, depth + 1);
                    }
                }
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(vol, &vol.header.sroot_blockset, &mut out, 0);
    walk(vol, &vol.header.freemap_blockset, &mut out, 0);
    out.sort_unstable();
    out.dedup();
    out
}

/// Open, list, read every PFS whole, and fsck; errors are fine, panics
/// are not.
fn exercise(dev: Arc<dyn BlockDevice>) {
    if let Ok(vol) = Volume::open(dev.clone()) {
        let vol = Arc::new(vol);
        if let Ok(list) = pfs_list(&vol) {
            for p in list {
                if let Ok(pfs) = Pfs::open(vol.clone(), &p.label) {
                    let _ = describe_pfs(&pfs);
                    let _ = pfs.resolve("big/entry_00010_0e72e5ef");
                    let _ = pfs.inode(rand::random::<u64>() >> 1);
                }
            }
        }
    }
    let _ = fsck(dev, Options::default());
}

fn mutate_images(name: &str, n: usize) {
    let bytes = std::fs::read(fixture_image(name)).unwrap();
    let pristine = Arc::new(MemDevice::from_bytes(&bytes));
    drop(bytes);
    let vol = Volume::open(pristine.clone()).unwrap();
    let blocks = metadata_blocks(&vol);
    assert!(
        blocks.len() > 100,
        "{name}: only {} metadata blocks",
        blocks.len()
    );
    let mut failures = Vec::new();
    for seed in seeds(n) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let dev = Arc::new(pristine.snapshot());
        let fix_header = rng.gen_bool(0.3);
        for _ in 0..rng.gen_range(1..=8) {
            let (at, len) = if fix_header && rng.gen_bool(0.5) {
                (0u64, 0x1000u64)
            } else {
                blocks[rng.gen_range(0..blocks.len())]
            };
            let pos = at + rng.gen_range(0..len);
            let mut b = [0u8; 1];
            dev.read_at(&mut b, pos).unwrap();
            b[0] = match rng.gen_range(0..3) {
                0 => b[0] ^ (1 << rng.gen_range(0..8)),
                1 => rng.gen(),
                _ => [0u8, 0xff, 0x10, 0x3f, 0x40][rng.gen_range(0..5)],
            };
            dev.write_at(&b, pos).unwrap();
        }
        if fix_header {
            // Re-seal the header so the mutation gets past its CRCs.
            let mut raw = vec![0u8; VOLUME_BYTES];
            dev.read_at(&mut raw, 0).unwrap();
            if let Ok(vh) = VolumeHeader::decode(&raw, 0) {
                dev.write_at(&vh.encode(), 0).unwrap();
            }
        }
        let d: Arc<dyn BlockDevice> = dev;
        if catch_unwind(AssertUnwindSafe(|| exercise(d))).is_err() {
            failures.push(seed);
        }
    }
    assert!(
        failures.is_empty(),
        "{name}: panics with seeds {failures:?} (replay with H2_FUZZ_SEED)"
    );
}

#[test]
fn mutated_images_without_check_codes() {
    // No check codes: every mutation reaches the decoders.
    mutate_images("v1-autozero-none", iters(40));
}

#[test]
fn mutated_images_with_check_codes() {
    mutate_images("v1-lz4-xxhash64", iters(25));
}
