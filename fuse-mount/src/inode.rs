//! The inodes the kernel knows about, and their attributes.
//!
//! FUSE node ids are HAMMER2 inode numbers: node 1 is the PFS root
//! (inum 1 in every PFS DragonFly makes; `Ids` maps it whatever it is),
//! and every other inode keeps its inum (HAMMER2 numbers them from 1024
//! up, so nothing collides with the root). Node ids are therefore stable
//! across remounts, which file handles (`name_to_handle_at`, NFS) need.
//! A PFS hands out inums from a counter that only grows, but a crash
//! loses the numbers given since the last flush, which the next mount
//! gives again; the generation (`generation`) tells such a new inode
//! from the old one a handle names.
//!
//! `InodeTable` keeps, per node, the kernel's lookup count (lookup and
//! readdirplus add one, forget takes some away) and the decoded inode,
//! so getattr, open and read do not walk the inode index again. It holds
//! exactly the nodes the kernel holds, so the kernel's own inode cache
//! bounds it. The lock is held for map operations only, never across
//! I/O. A read-write mount caches no decoded inodes here (they change;
//! the library's `Mount` holds the live ones): only the counts.

use fuser::{FileAttr, FileType, Generation, INodeNo};
use hammer2::disk::{InodeMeta, ObjType};
use hammer2::Inode;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// The block size stat and statfs report: HAMMER2's largest block
/// (`HAMMER2_PBUFSIZE`), the unit its file data is stored in.
pub const BLOCK_BYTES: u32 = 65536;

/// FUSE node ids and HAMMER2 inums.
#[derive(Clone, Copy, Debug)]
pub struct Ids {
    pub root_inum: u64,
}

impl Ids {
    pub fn ino(&self, inum: u64) -> u64 {
        if inum == self.root_inum {
            INodeNo::ROOT.0
        } else {
            inum
        }
    }
    pub fn inum(&self, ino: u64) -> u64 {
        if ino == INodeNo::ROOT.0 {
            self.root_inum
        } else {
            ino
        }
    }
}

struct Node {
    nlookup: u64,
    /// None when the inode could not be read when it was listed
    /// (readdirplus still counts the reference).
    inode: Option<Arc<Inode>>,
}

#[derive(Default)]
pub struct InodeTable {
    nodes: Mutex<HashMap<u64, Node>>,
}

impl InodeTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Node>> {
        // A panic elsewhere cannot leave the map inconsistent: every
        // operation on it is a single insert, update or remove.
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The decoded inode of a node the kernel holds, if cached.
    pub fn get(&self, ino: u64) -> Option<Arc<Inode>> {
        self.lock().get(&ino).and_then(|n| n.inode.clone())
    }

    /// Cache the inode of a node the kernel already holds (no new
    /// reference).
    pub fn fill(&self, ino: u64, inode: &Arc<Inode>) {
        if let Some(n) = self.lock().get_mut(&ino) {
            n.inode.get_or_insert_with(|| inode.clone());
        }
    }

    /// The kernel took one more reference to `ino` (a lookup reply or a
    /// readdirplus entry).
    pub fn remember(&self, ino: u64, inode: Option<Arc<Inode>>) {
        let mut nodes = self.lock();
        let n = nodes.entry(ino).or_insert(Node {
            nlookup: 0,
            inode: None,
        });
        n.nlookup += 1;
        if n.inode.is_none() {
            n.inode = inode;
        }
    }

    /// The kernel dropped `nlookup` references.
    pub fn forget(&self, ino: u64, nlookup: u64) {
        let mut nodes = self.lock();
        let Some(n) = nodes.get_mut(&ino) else {
            log::warn!("forget of node {ino}, which the kernel never looked up");
            return;
        };
        if nlookup > n.nlookup {
            log::warn!(
                "forget of {nlookup} references to node {ino}, which has {}",
                n.nlookup
            );
        }
        n.nlookup = n.nlookup.saturating_sub(nlookup);
        if n.nlookup == 0 {
            nodes.remove(&ino);
        }
    }

    /// Nodes the kernel holds (for the unmount summary and tests).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The FUSE file type of a HAMMER2 object type, if it is one.
pub fn file_type(t: ObjType) -> Option<FileType> {
    match t {
        ObjType::Directory => Some(FileType::Directory),
        ObjType::Regfile => Some(FileType::RegularFile),
        ObjType::Fifo => Some(FileType::NamedPipe),
        ObjType::Cdev => Some(FileType::CharDevice),
        ObjType::Bdev => Some(FileType::BlockDevice),
        ObjType::Softlink => Some(FileType::Symlink),
        ObjType::Socket => Some(FileType::Socket),
        ObjType::Unknown | ObjType::Whiteout | ObjType::Invalid(_) => None,
    }
}

/// A time as stored: microseconds since the epoch, signed
/// (`hammer2::disk::inode::system_time`).
pub fn time_of(micros: u64) -> SystemTime {
    hammer2::disk::inode::system_time(micros)
}

/// Linux's `dev_t` encoding as FUSE carries it (32 bits: `new_encode_dev`).
pub fn rdev_of(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// `st_mode`: the type bits and the permission bits.
pub fn st_mode(m: &InodeMeta) -> u32 {
    m.obj_type.mode_bits() | (m.mode & 0o7777)
}

/// The attributes of an inode whose blocks take `bytes` on disk
/// (`hammer2::pfs::stored_bytes`); `None` for an object type no file can
/// have (the inode is damaged).
pub fn attr_of(ino: u64, m: &InodeMeta, bytes: u64) -> Option<FileAttr> {
    let kind = file_type(m.obj_type)?;
    let rdev = match m.obj_type {
        ObjType::Cdev | ObjType::Bdev => rdev_of(m.rmajor, m.rminor),
        _ => 0,
    };
    Some(FileAttr {
        ino: INodeNo(ino),
        size: m.size,
        // The space stored, in 512-byte units (st_blocks).
        blocks: bytes.div_ceil(512),
        atime: time_of(m.atime),
        mtime: time_of(m.mtime),
        ctime: time_of(m.ctime),
        crtime: time_of(m.btime),
        kind,
        perm: (m.mode & 0o7777) as u16,
        nlink: u32::try_from(m.nlinks).unwrap_or(u32::MAX),
        uid: m.uid_unix(),
        gid: m.gid_unix(),
        rdev,
        blksize: BLOCK_BYTES,
        flags: 0,
    })
}

/// The generation of a node (the kernel's `i_generation`, which every
/// file handle carries and `open_by_handle_at` compares): the low 32
/// bits of the inode's creation time in microseconds, which never
/// changes, so two inodes given the same number (one lost in a crash
/// before its flush, then its number given again) differ. The root is
/// 0, as the kernel makes it at mount time.
pub fn generation(attr: &FileAttr) -> Generation {
    if attr.ino == INodeNo::ROOT {
        return Generation(0);
    }
    let us = attr
        .crtime
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    Generation(us as u64 & 0xffff_ffff)
}

/// Stand-in attributes for an entry whose inode cannot be read: the
/// type from its directory entry, nothing else (sent with a zero TTL, so
/// the next stat asks again and gets the error).
pub fn placeholder_attr(ino: u64, kind: FileType) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm: 0,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK_BYTES,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_map_the_root_to_node_one() {
        let ids = Ids { root_inum: 1 };
        assert_eq!(ids.ino(1), 1);
        assert_eq!(ids.ino(1024), 1024);
        assert_eq!(ids.inum(1), 1);
        let ids = Ids { root_inum: 77 };
        assert_eq!(ids.ino(77), 1);
        assert_eq!(ids.inum(1), 77);
        assert_eq!(ids.inum(1030), 1030);
    }

    #[test]
    fn rdev_decodes_as_the_kernel_does() {
        for (ma, mi) in [(0, 0), (8, 1), (1, 3), (259, 65536 + 7), (4095, 0xfffff)] {
            // decode as the kernel's new_decode_dev does
            let dev = rdev_of(ma, mi);
            assert_eq!((dev & 0xfff00) >> 8, ma);
            assert_eq!((dev & 0xff) | ((dev >> 12) & 0xfff00), mi);
        }
    }

    #[test]
    fn lookup_counts_come_and_go() {
        let t = InodeTable::default();
        t.remember(1024, None);
        t.remember(1024, None);
        t.forget(1024, 1);
        assert_eq!(t.len(), 1);
        t.forget(1024, 1);
        assert!(t.is_empty());
        t.forget(1024, 1);
        assert!(t.is_empty());
    }
}
