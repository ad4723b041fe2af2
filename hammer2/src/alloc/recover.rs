//! Mount-time recovery (DragonFly's `hammer2_recovery` in
//! `hammer2_vfsops.c`): the freemap may lag the topology by a flush, so
//! every block the topology references with a `mirror_tid` above the
//! header's `freemap_tid` is marked allocated.
//!
//! The walk starts at the super-root blockset, so it covers every PFS and
//! snapshot. A subtree whose blockref has `mirror_tid <= freemap_tid` is
//! skipped whole (a flush stamps its tid on every block it writes and on
//! every parent up to the root). INODE and INDIRECT blocks are marked,
//! then their children visited (an inode with direct data has none);
//! DATA and DIRENT blocks are marked. A block that cannot be read is
//! counted and its subtree skipped; the walk goes on.
//!
//! One difference from DragonFly: `hammer2_freemap_adjust` picks the bit
//! pair with `(offset >> 14) & 15`, so for the upper 16 blocks of each
//! 512 KiB bitmap word it marks a block 256 KiB lower instead; we mark the
//! block itself.

use super::{bmap, Allocator};
use crate::chain::decode_set;
use crate::disk::{Blockref, BlockrefType, InodeData};
use crate::error::Result;
use crate::volume::Volume;
use std::fmt;

/// Deeper than any real topology (file and inode-index indirect levels,
/// inodes, PFS roots and the super-root together stay well under it).
const DEPTH_MAX: usize = 64;

/// What recovery did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryStats {
    /// Blockrefs newer than `freemap_tid` visited.
    pub brefs: u64,
    /// Of those, blocks whose freemap state changed.
    pub marked: u64,
    /// Bytes taken from free (16 KiB granular).
    pub bytes: u64,
    /// Blocks that could not be read or marked (their subtrees skipped).
    pub damaged: u64,
}

impl fmt::Display for RecoveryStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "freemap recovery: {} newer blockrefs, {} blocks marked ({} bytes), {} damaged",
            self.brefs, self.marked, self.bytes, self.damaged
        )
    }
}

impl Allocator {
    /// Mark allocated every block of `vol`'s topology newer than the
    /// header's `freemap_tid`.
    pub fn recover(&mut self, vol: &Volume) -> Result<RecoveryStats> {
        let sync_tid = vol.header.freemap_tid;
        if sync_tid < vol.header.mirror_tid {
            log::info!(
                "freemap recovery {:#x}-{:#x}",
                sync_tid + 1,
                vol.header.mirror_tid
            );
        }
        let mut st = RecoveryStats::default();
        let mut stack: Vec<(Blockref, usize)> = vol
            .header
            .sroot_blockset
            .iter()
            .rev()
            .map(|b| (*b, 0))
            .collect();
        while let Some((br, depth)) = stack.pop() {
            if br.is_empty() || br.mirror_tid <= sync_tid {
                continue;
            }
            st.brefs += 1;
            match br.btype {
                BlockrefType::Data | BlockrefType::Dirent => self.recover_one(&br, &mut st)?,
                BlockrefType::Inode | BlockrefType::Indirect => {
                    self.recover_one(&br, &mut st)?;
                    if depth >= DEPTH_MAX {
                        st.damaged += 1;
                        log::warn!("recovery: topology deeper than {DEPTH_MAX} at {br:?}");
                        continue;
                    }
                    match children(vol, &br) {
                        Ok(set) => stack.extend(set.into_iter().rev().map(|c| (c, depth + 1))),
                        Err(e) => {
                            st.damaged += 1;
                            log::warn!("recovery: {e}; subtree skipped");
                        }
                    }
                }
                _ => {
                    st.damaged += 1;
                    log::warn!("recovery: unexpected {br:?} in the topology");
                }
            }
        }
        log::info!("{st}");
        Ok(st)
    }

    fn recover_one(&mut self, br: &Blockref, st: &mut RecoveryStats) -> Result<()> {
        match self.adjust(br.data_off, Some(bmap::class_of(br.btype))) {
            Ok((taken, changed)) => {
                if changed {
                    st.marked += 1;
                    st.bytes += taken;
                }
                Ok(())
            }
            Err(e) if e.is_media_damage() => {
                st.damaged += 1;
                log::warn!("recovery: {e}");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// The blockrefs under an INODE (its blockset, none with direct data) or
/// an INDIRECT block.
fn children(vol: &Volume, br: &Blockref) -> Result<Vec<Blockref>> {
    let buf = vol.read_physical(br)?;
    if br.btype == BlockrefType::Inode {
        let ino = InodeData::decode(&buf, br.data_off.offset())?;
        if ino.meta.has_direct_data() {
            return Ok(Vec::new());
        }
        return Ok(ino.blockset().to_vec());
    }
    Ok(decode_set(&buf))
}
