//! The freemap against an independent reachability scan, for the
//! bulkfree and dedup tests here and the online bulkfree test of the mount: the
//! expected state of every 16 KiB block is computed from a plain walk of
//! the blockrefs on disk, not with the library's bulkfree scan.

use bufcache::BlockDevice;
use hammer2::chain::decode_set;
use hammer2::disk::freemap::BMAP_FREE;
use hammer2::disk::{BlockrefType, InodeData, FREEMAP_BLOCK_SIZE, ZONE_SEG};
use hammer2::fsck::{fsck, Options};
use hammer2::Volume;
use std::collections::BTreeSet;
use std::sync::Arc;

const GIB: u64 = 1 << 30;

/// fsck of the volume on `dev` finds nothing; `ctx` names the step.
pub fn fsck_clean(dev: &Arc<impl BlockDevice + 'static>, ctx: &str) {
    let d: Arc<dyn BlockDevice> = dev.clone();
    let report = fsck(d, Options::default()).unwrap();
    let msgs: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
    assert!(msgs.is_empty(), "{ctx}: fsck: {}", msgs.join("\n"));
}

/// Every 16 KiB block the topology of the header in use references,
/// from a plain walk of the blockrefs (shared subtrees walked again).
pub fn referenced_blocks(vol: &Volume) -> BTreeSet<u64> {
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
        }
        match br.btype {
            BlockrefType::Inode => {
                let buf = vol.read_physical(&br).unwrap();
                let ino = InodeData::decode(&buf, off).unwrap();
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

/// `allocator_free` less the freemap's free bytes. DragonFly's newfs
/// counts the 4 MiB holding its own inodes as free, the freemap does
/// not; every later change moves both alike, so this stays constant.
pub fn allocator_free_offset(dev: &Arc<impl BlockDevice + 'static>) -> i64 {
    let d: Arc<dyn BlockDevice> = dev.clone();
    let vol = Volume::open(d).unwrap();
    vol.header.allocator_free as i64 - freemap_free(&vol) as i64
}

/// Free bytes per the freemap, zones without a leaf counted as new.
pub fn freemap_free(vol: &Volume) -> u64 {
    let vh = &vol.header;
    let size = if vh.version >= 2 && vh.total_size != 0 {
        vh.total_size
    } else {
        vh.volu_size
    };
    let tail = size & !(ZONE_SEG - 1);
    let leaves = hammer2::freemap::leaves(vol).unwrap();
    let in_leaves: u64 = leaves
        .values()
        .flat_map(|l| l.bmaps.iter())
        .map(|b| (0..256).filter(|&k| b.block_state(k) == BMAP_FREE).count() as u64)
        .sum::<u64>()
        * FREEMAP_BLOCK_SIZE;
    let static_end = (vh.allocator_beg + ZONE_SEG - 1) & !(ZONE_SEG - 1);
    let unleafed: u64 = (0..size.div_ceil(GIB))
        .map(|z| z * GIB)
        .filter(|z| !leaves.contains_key(z) && z + ZONE_SEG <= size)
        .map(|z| {
            tail.min(z + GIB)
                .saturating_sub(static_end.max(z + ZONE_SEG))
        })
        .sum();
    in_leaves + unleafed
}

/// The freemap on disk equals a full scan of the topology, and
/// `allocator_free` is off it by `offset` (see `allocator_free_offset`).
pub fn assert_freemap_is_full_scan(dev: &Arc<impl BlockDevice + 'static>, offset: i64, ctx: &str) {
    let d: Arc<dyn BlockDevice> = dev.clone();
    let vol = Volume::open(d).unwrap();
    let vh = &vol.header;
    let referenced = referenced_blocks(&vol);
    let size = if vh.version >= 2 && vh.total_size != 0 {
        vh.total_size
    } else {
        vh.volu_size
    };
    let seg = ZONE_SEG;
    let static_end = (vh.allocator_beg + seg - 1) & !(seg - 1);
    let tail = size & !(seg - 1);
    let leaves = hammer2::freemap::leaves(&vol).unwrap();
    let mut wrong = Vec::new();
    for (&zone, leaf) in &leaves {
        for (n, b) in leaf.bmaps.iter().enumerate() {
            let base = zone + n as u64 * seg;
            let special = base % GIB < seg || base < static_end || base >= tail;
            let mut free_here = 0;
            for k in 0..256 {
                let off = base + k as u64 * FREEMAP_BLOCK_SIZE;
                let want = if special || referenced.contains(&off) {
                    3
                } else {
                    0
                };
                let got = b.block_state(k);
                if got != want {
                    wrong.push(format!("{off:#x}: state {got:02b}, expected {want:02b}"));
                }
                if got == BMAP_FREE {
                    free_here += FREEMAP_BLOCK_SIZE;
                }
            }
            assert_eq!(
                b.avail as u64, free_here,
                "{ctx}: avail of bmap {base:#x} against its free blocks"
            );
        }
    }
    // Zones without a leaf hold nothing.
    for off in &referenced {
        let zone = off & !(GIB - 1);
        assert!(
            leaves.contains_key(&zone) || *off < static_end,
            "{ctx}: block {off:#x} in a zone without a leaf"
        );
    }
    wrong.truncate(20);
    assert!(
        wrong.is_empty(),
        "{ctx}: freemap differs from the scan:\n{}",
        wrong.join("\n")
    );
    assert_eq!(
        vh.allocator_free as i64 - freemap_free(&vol) as i64,
        offset,
        "{ctx}: allocator_free against the freemap"
    );
}
