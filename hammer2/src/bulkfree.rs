//! Bulkfree (DragonFly's `hammer2_bulkfree.c`): the only way space comes
//! back. HAMMER2 keeps no reference counts (that is what makes snapshots
//! and dedup free), so a pass scans the whole topology of one flush —
//! every PFS and snapshot under the super-root — into a map of referenced
//! 16 KiB blocks, then merges that map into the freemap: allocated but
//! unreferenced blocks are staged (11 -> 10), staged blocks still
//! unreferenced are freed (10 -> 00), staged blocks referenced again go
//! back to allocated. A block is freed only after two passes agree; the
//! freemap side and its safety argument are in `alloc/bulkfree.rs`.
//!
//! A pass runs in three steps, so the scan can run while the frontend
//! goes on (as a pipelined flush does):
//! 1. `Mount::bulkfree_begin` flushes (DragonFly syncs every mount of
//!    the device first) and takes the flushed super-root blockset;
//! 2. `BulkfreeScan::run` walks that topology without the `Mount`: the
//!    blocks of a flushed topology cannot be reused while it runs (only a
//!    bulkfree merge frees durable blocks, and one pass runs at a time);
//! 3. `Mount::bulkfree_commit` merges the map (blocks the allocator
//!    handed out since step 1 count as referenced) and records
//!    `bulkfree_tid`; the next flush writes the freemap and the header.
//!
//! `Mount::bulkfree` does all three and the flush. What the scan does
//! not touch: the freemap's own blocks and the volume headers (they live
//! in the reserved segments) and newfs's blocks below `allocator_beg`.
//!
//! Differences from DragonFly: a block that cannot be read (I/O error,
//! bad check code) aborts the pass, where DragonFly merges anyway and so
//! may free what lies below a damaged block; a subtree shared by several
//! PFSs (snapshots) is walked once, by exact offset, where DragonFly uses
//! a lossy cache; the whole volume is mapped in one scan (memory grows
//! with the zones in use, 32 KiB per GiB) instead of windows of a fixed
//! buffer; and `bulkfree_tid` is set to the flush the pass scanned
//! (DragonFly leaves it 0).

use crate::alloc::SpaceMap;
use crate::alloc::{ScanMap, SyncStats};
use crate::chain::read_node;
use crate::disk::{Blockref, BlockrefType, InodeData, SET_COUNT};
use crate::error::{Error, Result};
use crate::mount::{lock_space, Mount};
use crate::volume::Volume;
use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};

/// Deeper than any real topology: file and inode-index indirect levels,
/// inodes, PFS roots and the super-root together stay well under it.
const DEPTH_MAX: usize = 64;
/// Blockrefs between two progress reports.
const PROGRESS_EVERY: u64 = 4096;
/// Inodes remembered as walked (indirect blocks always are): shared
/// subtrees are found through their indirect blocks, so past this only
/// an inode reached again through a new indirect block is read again
/// (with its own blockset, at most four blockrefs). Bounds the memory
/// of a scan of a huge volume to about 100 MiB.
const SEEN_INODES_MAX: usize = 1 << 22;

/// Progress of a scan, for long runs.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub brefs: u64,
    /// Physical bytes of the blocks seen so far (a shared block once).
    pub bytes: u64,
    /// Bytes in use per the volume header (allocator_size -
    /// allocator_free): what `bytes` grows towards.
    pub bytes_in_use: u64,
}

/// What a scan saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanStats {
    pub brefs: u64,
    pub inodes: u64,
    pub indirects: u64,
    pub data: u64,
    pub dirents: u64,
    /// PFS roots and snapshots scanned.
    pub pfs: u64,
    /// Subtrees not walked again because another PFS (a snapshot) shares
    /// them.
    pub shared: u64,
    pub bytes: u64,
}

impl fmt::Display for ScanStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} blockrefs ({} inode, {} indirect, {} data, {} dirent) in {} PFSs, \
             {} shared subtrees, {} bytes",
            self.brefs,
            self.inodes,
            self.indirects,
            self.data,
            self.dirents,
            self.pfs,
            self.shared,
            self.bytes
        )
    }
}

/// What one pass did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BulkfreeStats {
    /// The flush whose topology was scanned (now `bulkfree_tid`).
    pub tid: u64,
    pub scan: ScanStats,
    pub sync: SyncStats,
    /// The freemap's free bytes before and after the merge.
    pub free_before: u64,
    pub free_after: u64,
}

impl fmt::Display for BulkfreeStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "bulkfree pass of tid {:#x}: {}", self.tid, self.scan)?;
        writeln!(f, "{}", self.sync)?;
        write!(
            f,
            "    free before {} bytes, after {} bytes",
            self.free_before, self.free_after
        )
    }
}

/// The topology scan of one pass, runnable without the `Mount`.
pub struct BulkfreeScan {
    vol: Volume,
    roots: [Blockref; SET_COUNT],
    tid: u64,
    bytes_in_use: u64,
    map: ScanMap,
    pub stats: ScanStats,
    done: bool,
    /// The allocator, to abandon the pass when the scan is dropped
    /// unmerged (a failed scan): it stops recording allocations and
    /// lets the frees it held go on.
    space: Arc<Mutex<Box<dyn SpaceMap>>>,
}

impl Drop for BulkfreeScan {
    fn drop(&mut self) {
        let token = self.map.token();
        if let Some(a) = lock_space(&self.space).allocator_mut() {
            a.bulkfree_cancel(token);
        }
    }
}

impl BulkfreeScan {
    /// The flush whose topology this pass scans.
    pub fn tid(&self) -> u64 {
        self.tid
    }

    /// Walk every blockref under the super-root and record each block.
    /// A block that cannot be read fails the pass (nothing is merged).
    pub fn run(&mut self, mut progress: Option<&mut dyn FnMut(Progress)>) -> Result<()> {
        let mut seen: HashSet<u64> = HashSet::new();
        let mut seen_inodes = 0usize;
        let mut stack: Vec<(Blockref, usize)> = self
            .roots
            .iter()
            .rev()
            .filter(|b| !b.is_empty())
            .map(|b| (*b, 0))
            .collect();
        let st = &mut self.stats;
        while let Some((br, depth)) = stack.pop() {
            st.brefs += 1;
            if st.brefs.is_multiple_of(PROGRESS_EVERY) {
                if let Some(p) = progress.as_mut() {
                    p(Progress {
                        brefs: st.brefs,
                        bytes: st.bytes,
                        bytes_in_use: self.bytes_in_use,
                    });
                }
            }
            check_extent(
                &br,
                self.vol.header.volu_size.max(self.vol.header.total_size),
            )?;
            self.map.mark(br.btype, br.data_off);
            match br.btype {
                BlockrefType::Data => st.data += 1,
                BlockrefType::Dirent => st.dirents += 1,
                BlockrefType::Inode | BlockrefType::Indirect => {
                    if br.btype == BlockrefType::Inode {
                        st.inodes += 1;
                    } else {
                        st.indirects += 1;
                    }
                    if seen.contains(&br.data_off.0) {
                        st.shared += 1;
                        continue;
                    }
                    if br.btype == BlockrefType::Indirect || seen_inodes < SEEN_INODES_MAX {
                        seen.insert(br.data_off.0);
                        seen_inodes += usize::from(br.btype == BlockrefType::Inode);
                    }
                    if depth >= DEPTH_MAX {
                        return Err(Error::corrupt(
                            format!("topology deeper than {DEPTH_MAX} levels"),
                            br.data_off.offset(),
                        ));
                    }
                    let children = children(&self.vol, &br)?;
                    if br.btype == BlockrefType::Inode
                        && br.flags & crate::disk::BREF_FLAG_PFSROOT != 0
                    {
                        st.pfs += 1;
                    }
                    stack.extend(
                        children
                            .into_iter()
                            .rev()
                            .filter(|c| !c.is_empty())
                            .map(|c| (c, depth + 1)),
                    );
                }
                _ => {
                    return Err(Error::corrupt(
                        format!("{} blockref in the topology", br.btype.name()),
                        br.data_off.offset(),
                    ));
                }
            }
            st.bytes += br.data_off.bytes();
        }
        self.done = true;
        log::info!("bulkfree scan of tid {:#x}: {}", self.tid, self.stats);
        Ok(())
    }
}

/// A block the scan cannot account for exactly stops the pass: a size
/// outside 1 KiB..64 KiB (64 bytes for DragonFly's smallest), one that
/// crosses a 64 KiB boundary or lies past the volume. Leaving such a
/// block unmarked could free what it covers.
fn check_extent(br: &Blockref, volume_bytes: u64) -> Result<()> {
    let (radix, at) = (br.data_off.radix(), br.data_off.offset());
    if radix == 0 {
        return Ok(());
    }
    let bytes = br.data_off.bytes();
    if !(6..=crate::disk::PBUFRADIX).contains(&radix)
        || (at & (crate::disk::PBUFSIZE - 1)) + bytes > crate::disk::PBUFSIZE
        || at.saturating_add(bytes) > volume_bytes
    {
        return Err(Error::corrupt(
            format!(
                "{} blockref of radix {radix} outside the volume's blocks",
                br.btype.name()
            ),
            at,
        ));
    }
    Ok(())
}

/// The blockrefs under an INODE (its blockset; none with direct data) or
/// an INDIRECT block, read with their check codes verified.
fn children(vol: &Volume, br: &Blockref) -> Result<Vec<Blockref>> {
    if br.data_off.bytes() == 0 {
        return Err(Error::corrupt(
            format!("{} blockref without data", br.btype.name()),
            0,
        ));
    }
    if br.btype == BlockrefType::Indirect {
        return read_node(vol, br);
    }
    let buf = vol.read_physical(br)?;
    let ino = InodeData::decode(&buf, br.data_off.offset())?;
    if ino.meta.has_direct_data() {
        return Ok(Vec::new());
    }
    Ok(ino.blockset().to_vec())
}

fn no_allocator() -> Error {
    Error::InvalidArgument {
        what: "bulkfree needs the freemap allocator".into(),
    }
}

impl Mount {
    /// Start a bulkfree pass: flush, then take the flushed topology for
    /// `BulkfreeScan::run`. Starting a pass voids one started before.
    pub fn bulkfree_begin(&mut self) -> Result<BulkfreeScan> {
        self.writable()?;
        self.flush()?;
        let vol = Volume::open(self.vol.device().clone())?;
        if vol.header.mirror_tid != self.vol.header.mirror_tid {
            return Err(Error::corrupt(
                format!(
                    "volume header after flush shows tid {:#x}, not {:#x}",
                    vol.header.mirror_tid, self.vol.header.mirror_tid
                ),
                0,
            ));
        }
        let space = self.space.clone();
        let mut guard = lock_space(&space);
        let alloc = guard.allocator_mut().ok_or_else(no_allocator)?;
        let map = alloc.bulkfree_start();
        let vh = &vol.header;
        Ok(BulkfreeScan {
            roots: vh.sroot_blockset,
            tid: vh.mirror_tid,
            bytes_in_use: vh.allocator_size.saturating_sub(vh.allocator_free),
            vol,
            map,
            stats: ScanStats::default(),
            done: false,
            space: self.space.clone(),
        })
    }

    /// Merge a finished scan into the freemap. The change is in memory;
    /// the next flush writes it (with `bulkfree_tid`).
    pub fn bulkfree_commit(&mut self, mut scan: BulkfreeScan) -> Result<BulkfreeStats> {
        self.writable()?;
        if !scan.done {
            return Err(Error::InvalidArgument {
                what: "bulkfree scan not run to its end".into(),
            });
        }
        let space = self.space.clone();
        let mut guard = lock_space(&space);
        let alloc = guard.allocator_mut().ok_or_else(no_allocator)?;
        let free_before = alloc.free_bytes();
        let sync = alloc.bulkfree_apply(&mut scan.map)?;
        let free_after = alloc.free_bytes();
        drop(guard);
        // The allocator is dirty now, so the next flush writes the header.
        self.vol.header.bulkfree_tid = scan.tid;
        Ok(BulkfreeStats {
            tid: scan.tid,
            scan: scan.stats.clone(),
            sync,
            free_before,
            free_after,
        })
    }

    /// One whole bulkfree pass: begin, scan, merge, flush. Space comes
    /// back on the second pass that finds it unreferenced.
    pub fn bulkfree(
        &mut self,
        progress: Option<&mut dyn FnMut(Progress)>,
    ) -> Result<BulkfreeStats> {
        let mut scan = self.bulkfree_begin()?;
        scan.run(progress)?;
        let stats = self.bulkfree_commit(scan)?;
        self.flush()?;
        Ok(stats)
    }
}
