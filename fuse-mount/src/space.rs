//! The allocator a read-write mount hands `hammer2::mount::Mount`.
//!
//! INTERIM, until the freemap allocator (`hammer2::alloc`) is in: `Bump`
//! allocates upward from the end of the highest block the image's
//! current tree references, and keeps no freemap. So:
//!
//! - nothing reachable from the volume header is ever overwritten, also
//!   across remounts (each mount starts past everything in use);
//! - space is never reused: freed blocks stay lost until the real
//!   allocator and bulkfree come, and the mount runs out of space when
//!   the bump reaches the end of the volume;
//! - the freemap on disk is left as it was, so fsck reports every block
//!   written here as "in a zone the freemap has no leaf for", and
//!   DragonFly must not mount such an image read-write.
//!
//! `space_map` is the one line to change when `hammer2::alloc` lands.

use bufcache::BlockDevice;
use hammer2::chain::{is_node, read_node};
use hammer2::disk::{Blockref, BlockrefType, DataOff, ZONE_SEG};
use hammer2::flush::SpaceMap;
use hammer2::pfs::read_inode;
use hammer2::{Error, Result, Volume};

/// The allocator for a read-write mount of `vol`.
pub fn space_map(vol: &Volume) -> Result<Box<dyn SpaceMap>> {
    // With the freemap allocator: Ok(Box::new(hammer2::alloc::Allocator::load(vol)?))
    Ok(Box::new(Bump::load(vol)?))
}

/// Each 1 GiB of the volume starts with a reserved segment (volume
/// headers, freemap blocks).
const LEVEL1_BYTES: u64 = 1 << 30;

/// Nesting bound of the walk: indirect levels within an inode, and the
/// super-root → PFS root → inode levels.
const DEPTH_MAX: usize = 64;

/// Allocates upward; see the module comment.
pub struct Bump {
    next: u64,
    end: u64,
    /// The header's `allocator_free` at load, less what was allocated
    /// since (never more than the allocator's size, as fsck requires).
    free: u64,
    freemap_blockset: [Blockref; 4],
}

impl Bump {
    /// Start past every block the current tree references (and past
    /// `allocator_beg`).
    pub fn load(vol: &Volume) -> Result<Bump> {
        let h = &vol.header;
        let mut high = h.allocator_beg;
        walk(vol, &h.sroot_blockset, &mut high, 0)?;
        log::debug!("interim allocator starts at {high:#x}");
        Ok(Bump {
            next: high,
            end: h.volu_size,
            free: h.allocator_free.min(h.allocator_size),
            freemap_blockset: h.freemap_blockset,
        })
    }
}

/// Raise `high` to the end of every block under `set`: indirect blocks,
/// inodes and what they hold, data, long dirent names.
fn walk(vol: &Volume, set: &[Blockref], high: &mut u64, depth: usize) -> Result<()> {
    if depth > DEPTH_MAX {
        return Err(Error::corrupt(
            format!("tree deeper than {DEPTH_MAX} levels"),
            0,
        ));
    }
    for br in set.iter().filter(|b| !b.is_empty()) {
        let off = br.data_off;
        if !off.is_empty() {
            *high = (*high).max(off.offset() + off.bytes());
        }
        if is_node(br) {
            walk(vol, &read_node(vol, br)?, high, depth + 1)?;
        } else if br.btype == BlockrefType::Inode {
            let ino = read_inode(vol, br)?;
            if !ino.meta().has_direct_data() {
                walk(vol, &ino.blockset(), high, depth + 1)?;
            }
        }
    }
    Ok(())
}

impl SpaceMap for Bump {
    fn alloc(&mut self, _btype: BlockrefType, bytes: u64) -> Result<DataOff> {
        debug_assert!(bytes.is_power_of_two() && (1024..=65536).contains(&bytes));
        let mut off = self.next.next_multiple_of(bytes);
        if off % LEVEL1_BYTES < ZONE_SEG {
            off = off - off % LEVEL1_BYTES + ZONE_SEG;
        }
        if off + bytes > self.end {
            return Err(Error::NoSpace {
                what: format!(
                    "the interim allocator reached the end of the volume \
                     ({:#x}); it reuses no space until the freemap allocator is in",
                    self.end
                ),
            });
        }
        self.next = off + bytes;
        self.free = self.free.saturating_sub(bytes);
        Ok(DataOff::new(off, bytes.trailing_zeros() as u8))
    }

    fn release_unflushed(&mut self, _off: DataOff) {}

    fn flush(&mut self, _dev: &dyn BlockDevice, _mirror_tid: u64) -> Result<[Blockref; 4]> {
        Ok(self.freemap_blockset)
    }

    fn free_bytes(&self) -> u64 {
        self.free.min(self.end.saturating_sub(self.next))
    }
}
