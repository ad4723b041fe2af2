//! Orphans: inodes unlinked while open and left in the inode index by a
//! crash. A file that loses its last link while open stays in the index
//! with nlinks 0 until its last close (`Mount::pin`); if the system goes
//! down first, nothing removes it and its blocks stay allocated through
//! every bulkfree. As ext4 processes its orphan list at mount, a
//! read-write mount of a PFS removes them (`Mount::reclaim_orphans`) the
//! way a last unpin does, so the next flush drops them from the index.
//!
//! HAMMER2 keeps no orphan list, so this scans the PFS's flushed state:
//! every inode of the inode index (for nlinks) and every directory's
//! entries (dirent blockrefs carry the inode number, so only indirect
//! blocks and long-name blocks are read besides the inodes). An inode
//! with nlinks 0 that an entry still names is damage, not an orphan, and
//! stays for fsck to report; so does a directory (DragonFly stores 1 as
//! a live directory's nlinks). Anything unreadable stops the scan with
//! nothing removed: a directory that cannot be read might name a
//! candidate.

use crate::chain;
use crate::disk::{BlockrefType, InodeData, ObjType, DIRHASH_VISIBLE};
use crate::error::{Error, Result};
use crate::mount::{Mount, ROOT_INUM};
use std::collections::HashSet;

impl Mount {
    /// Remove the orphans of PFS `label`: inodes with nlinks 0 that no
    /// directory names and nothing pins. Runs on a PFS with nothing
    /// waiting for a flush (as a mount opens it); returns the inode
    /// numbers removed, which leave the index at the next flush.
    pub fn reclaim_orphans(&mut self, label: &str) -> Result<Vec<u64>> {
        self.writable()?;
        let p = self.pfs_mut(label)?;
        if p.root.dirty
            || !p.removed.get_mut().is_empty()
            || p.inodes.get_mut().values().any(|n| n.lock().dirty)
        {
            return Err(Error::InvalidArgument {
                what: format!("orphans of PFS {label} are reclaimed before it is changed"),
            });
        }
        let root_set = p.root.data.blockset();
        let vol = &self.vol;

        // The inode index and the root directory's entries.
        let mut index = Vec::new();
        let mut named: HashSet<u64> = HashSet::new();
        chain::scan(vol, &root_set, 0, u64::MAX, &mut |br| {
            match br.btype {
                BlockrefType::Inode if br.key < DIRHASH_VISIBLE => index.push(*br),
                BlockrefType::Dirent if br.key >= DIRHASH_VISIBLE => {
                    named.insert(br.dirent().inum);
                }
                other => {
                    return Err(Error::corrupt(
                        format!(
                            "{} blockref key {:#x} in the PFS root's tree",
                            other.name(),
                            br.key
                        ),
                        br.data_off.offset(),
                    ))
                }
            }
            Ok(true)
        })?;
        // Inodes in image order, so the reads run forward.
        index.sort_by_key(|b| b.data_off.offset());
        let mut candidates = Vec::new();
        let mut dirs = Vec::new();
        for br in &index {
            let buf = vol.read_physical(br)?;
            let ino = InodeData::decode(&buf, br.data_off.offset())?;
            let m = &ino.meta;
            if m.obj_type == ObjType::Directory && !m.has_direct_data() {
                dirs.push(ino.blockset());
            }
            // A live directory has nlinks 1 (DragonFly's count); 0 is
            // one removed while open, as for a file.
            if m.nlinks == 0 && br.key != ROOT_INUM {
                candidates.push(br.key);
            }
        }
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        for set in &dirs {
            chain::scan(vol, set, DIRHASH_VISIBLE, u64::MAX, &mut |br| {
                if br.btype != BlockrefType::Dirent {
                    // An inode filed by name (the pre-2017 layout) or
                    // damage: which inode it names is not known here.
                    return Err(Error::corrupt(
                        format!(
                            "{} blockref key {:#x} among a directory's entries",
                            br.btype.name(),
                            br.key
                        ),
                        br.data_off.offset(),
                    ));
                }
                named.insert(br.dirent().inum);
                Ok(true)
            })?;
        }
        let p = self.pfs_mut(label)?;
        let mut removed = Vec::new();
        for inum in candidates {
            if named.contains(&inum) {
                log::warn!(
                    "PFS {label}: inode {inum} has nlinks 0 but a directory names it \
                     (damaged; run fsck.hammer2); left in place"
                );
                continue;
            }
            if p.pins.get_mut().contains_key(&inum) {
                continue;
            }
            p.inodes.get_mut().remove(&inum);
            p.removed.get_mut().insert(inum);
            removed.push(inum);
        }
        if !removed.is_empty() {
            log::info!(
                "PFS {label}: removing {} orphaned inodes (unlinked while open before a crash): {removed:?}",
                removed.len()
            );
        }
        Ok(removed)
    }
}
