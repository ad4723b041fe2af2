//! Space for a repair, and its last phase.
//!
//! `reachable` maps every block any volume header copy's tree reaches,
//! reading inodes and indirect blocks past their check codes (a damaged
//! block's entries count too: a block the repair may keep as read, or an
//! older state a crash during the repair falls back to, must not be
//! overwritten); the repair's allocator starts from that map, so what it
//! writes lands only on blocks nothing on the image can reach. It also
//! records the rotation sets the copies' freemap blocks occupy, which the
//! rebuilt freemap's blocks avoid.
//!
//! `settle` ends a repair: one commit per header slot, so every copy
//! holds the repaired tree (a copy left holding a damaged tree would
//! reach blocks the new freemap gives back), then the freemap becomes
//! exactly what that tree references and one more commit writes it.

use super::Log;
use crate::alloc::{FreemapSets, ScanMap};
use crate::chain::decode_set;
use crate::disk::{
    self, Blockref, BlockrefType, InodeData, VolumeHeader, FREEMAP_LEVELN_PSIZE, INODE_BYTES,
    VOL_VERSION_MULTI_VOLUMES,
};
use crate::error::{Error, Result};
use crate::mount::{lock_space, Mount};
use bufcache::BlockDevice;
use std::collections::HashSet;

/// Deeper than any real topology (bulkfree's bound).
const DEPTH_MAX: usize = 64;

/// The size the allocator manages (`hmp->total_size`).
fn total_size(vh: &VolumeHeader) -> u64 {
    if vh.version >= VOL_VERSION_MULTI_VOLUMES && vh.total_size != 0 {
        vh.total_size
    } else {
        vh.volu_size
    }
}

/// Read `bytes` at `at` unverified, when the range is a block's.
fn raw(dev: &dyn BlockDevice, end: u64, br: &Blockref) -> Option<Vec<u8>> {
    let radix = br.data_off.radix();
    if !(6..=disk::PBUFRADIX).contains(&radix) {
        return None;
    }
    let (at, bytes) = (br.data_off.offset(), br.data_off.bytes());
    if (at & (disk::PBUFSIZE - 1)) + bytes > disk::PBUFSIZE || at.checked_add(bytes)? > end {
        return None;
    }
    let mut buf = vec![0u8; bytes as usize];
    dev.read_at(&mut buf, at).ok()?;
    Some(buf)
}

/// Every block the trees of `copies` reach (read past check codes), as
/// a scan map over the first copy's geometry, and the rotation sets of
/// their freemap blocks.
pub(super) fn reachable(
    dev: &dyn BlockDevice,
    copies: &[(usize, VolumeHeader, bool)],
) -> (ScanMap, FreemapSets) {
    let mut sets = FreemapSets::default();
    let Some(geometry) = copies.iter().find(|c| c.2).or(copies.first()).map(|c| &c.1) else {
        return (ScanMap::standalone(0, 0), sets);
    };
    let end = geometry.volu_size.min(dev.size_bytes());
    let mut map = ScanMap::standalone(geometry.allocator_beg, total_size(geometry));
    let mut seen: HashSet<u64> = HashSet::new();
    for (_, vh, _) in copies {
        let mut stack: Vec<(Blockref, usize)> = vh
            .sroot_blockset
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| (*b, 0))
            .collect();
        while let Some((br, depth)) = stack.pop() {
            if br.data_off.radix() == 0 {
                continue;
            }
            let (at, bytes) = (br.data_off.offset(), br.data_off.bytes());
            if bytes > disk::PBUFSIZE
                || at.saturating_add(bytes) > end
                || (at & (disk::PBUFSIZE - 1)) + bytes > disk::PBUFSIZE
            {
                continue;
            }
            map.mark(br.btype, br.data_off);
            let descend = matches!(br.btype, BlockrefType::Inode | BlockrefType::Indirect);
            if !descend || depth >= DEPTH_MAX || !seen.insert(br.data_off.0) {
                continue;
            }
            let Some(buf) = raw(dev, end, &br) else {
                continue;
            };
            let children = if br.btype == BlockrefType::Inode {
                if buf.len() < INODE_BYTES {
                    continue;
                }
                // The blockset even under a direct-data flag: the flag
                // may be the damage, and what decodes as junk only costs
                // a leak until the freemap is made exact.
                match InodeData::decode(&buf, at) {
                    Ok(ino) => ino.blockset().to_vec(),
                    Err(_) => continue,
                }
            } else {
                decode_set(&buf)
            };
            stack.extend(
                children
                    .into_iter()
                    .filter(|c| {
                        !c.is_empty()
                            && matches!(
                                c.btype,
                                BlockrefType::Inode
                                    | BlockrefType::Indirect
                                    | BlockrefType::Data
                                    | BlockrefType::Dirent
                            )
                    })
                    .map(|c| (c, depth + 1)),
            );
        }
        // The freemap's blocks: only their places.
        let mut stack: Vec<(Blockref, usize)> = vh
            .freemap_blockset
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| (*b, 0))
            .collect();
        while let Some((br, depth)) = stack.pop() {
            sets.note(&br);
            if br.btype != BlockrefType::FreemapNode
                || depth >= 8
                || br.data_off.bytes() != FREEMAP_LEVELN_PSIZE as u64
            {
                continue;
            }
            if let Some(buf) = raw(dev, end, &br) {
                stack.extend(
                    decode_set(&buf)
                        .into_iter()
                        .filter(|c| {
                            matches!(
                                c.btype,
                                BlockrefType::FreemapNode | BlockrefType::FreemapLeaf
                            )
                        })
                        .map(|c| (c, depth + 1)),
                );
            }
        }
    }
    (map, sets)
}

/// Write the repaired state to every header slot, then the freemap
/// rebuilt from it.
pub(super) fn settle(m: &mut Mount, log: &mut Log) -> Result<()> {
    let slots = disk::volhdr_count(m.vol.header.volu_size).max(1);
    for _ in 0..slots {
        m.commit()?;
    }
    let vh = m.vol.header.clone();
    let dev = m.vol.device().clone();
    let (map, _) = reachable(dev.as_ref(), &[(m.vol.header_index, vh, true)]);
    {
        let space = m.space.clone();
        let mut guard = lock_space(&space);
        let alloc = guard
            .allocator_mut()
            .ok_or_else(|| Error::InvalidArgument {
                what: "a repair needs the freemap allocator".into(),
            })?;
        alloc.set_exact(&map)?;
    }
    m.commit()?;
    log.safe(
        None,
        None,
        None,
        format!(
            "freemap rebuilt from the topology ({} blocks referenced); every volume header copy \
             holds the repaired state",
            map.marked
        ),
    );
    Ok(())
}
