//! PFS administration on a mounted volume (DragonFly's
//! `hammer2_ioctl_pfs_snapshot`, `hammer2_ioctl_pfs_create` and
//! `hammer2_ioctl_pfs_delete`): the super-root's entries are the PFS root
//! inodes, keyed by the directory hash of their label, and these
//! operations add and remove them. Each returns once a flush has made
//! its change durable.
//!
//! A snapshot costs the same on any PFS: after a flush, the PFS root's
//! 1 KiB inode is copied under the new label with the same blockset, so
//! the snapshot shares every block below the root with its origin and
//! nothing is walked or copied. Blocks are never overwritten (copy on
//! write, no reference counts), so later writes to either side go to new
//! blocks and leave the other unchanged; space comes back only through
//! bulkfree, once neither side references a block.
//!
//! What the copy changes, as DragonFly does: the label (`filename`,
//! `name_len`, `name_key`), new `pfs_clid` and `pfs_fsid`, `pfs_type`
//! MASTER, `pfs_subtype` SNAPSHOT, `pfs_inum` one past the origin's (the
//! snapshot's inode numbers start beyond any the origin had handed out),
//! and `pfs_lsnap_tid` = the tid of the flush that commits the snapshot,
//! set on the origin too. It also sets the copy's `ctime` to the time
//! given. Differences from DragonFly: DragonFly builds the snapshot root
//! from a fresh PFS inode (mode 0755, owner 0, `ctime`/`mtime` now,
//! `iparent` 1, and the super-root's compression, autozero) and copies
//! only the blockset and statistics into it; here the root keeps the
//! origin's mode, owner, times, compression and check methods, so the
//! snapshot reads exactly as its origin did. The key is the label's
//! hash, or the next free key of its collision range (DragonFly's
//! `hammer2_inode_create_pfs` starts one past the hash; newfs and these
//! operations start at the hash; readers search the range either way).
//!
//! Not here: refusing to delete a PFS that is mounted (DragonFly's EBUSY)
//! is the mount daemon's job; a `Mount` does not know who uses a label.

use crate::dirhash::dirhash;
use crate::disk::{
    check_method, comp_method, pfs_subtype, pfs_type, Blockref, BlockrefType, InodeData, ObjType,
    Uuid, DIRHASH_LOMASK, OPFLAG_PFSROOT,
};
use crate::error::{Error, Result};
use crate::inode::InodeNode;
use crate::mount::{Mount, PfsState, ROOT_INUM};
use crate::pfs;

/// The `pfs_inum` a new PFS root starts with, as newfs writes it (inode
/// numbers are handed out from `INODE_START` regardless).
pub const PFS_INUM_START: u64 = 16;
/// The longest label: the inode's filename field less DragonFly's NUL.
pub const LABEL_MAX: usize = 255;

/// The two ids of a new PFS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PfsIds {
    /// Cluster id (`pfs_clid`).
    pub clid: Uuid,
    /// Unique id (`pfs_fsid`).
    pub fsid: Uuid,
}

impl PfsIds {
    /// Fresh random (version 4) ids.
    pub fn random() -> PfsIds {
        PfsIds {
            clid: Uuid::from_random(rand::random()),
            fsid: Uuid::from_random(rand::random()),
        }
    }
}

/// What is wrong with `label` as the name of a new PFS or snapshot, if
/// anything: the one rule for every place a label is made (mkfs.hammer2
/// `-L`, pfs-create, snapshot, offline or through a mount). A label is
/// 1 to 255 bytes; it has no `/` or `@`, so that `IMG@LABEL` names it
/// (and `IMG@LABEL:/PATH`); it is not `.` or `..` and has no NUL or
/// other control character, since it is a name under `.snapshot` and a
/// line of `pfs-list`.
pub fn label_problem(label: &str) -> Option<&'static str> {
    if label.is_empty() {
        Some("is empty")
    } else if label.len() > LABEL_MAX {
        Some("is longer than 255 bytes")
    } else if label == "." || label == ".." {
        Some("is . or ..")
    } else if label.contains(['/', '@']) {
        Some("holds a '/' or '@' (IMG@LABEL could not name it)")
    } else if label.chars().any(char::is_control) {
        Some("holds a control character")
    } else {
        None
    }
}

/// Split `IMG[@LABEL]` as every tool does (mount.hammer2, the `hammer2`
/// verbs): a `spec` that names an existing file (`exists`) is the image
/// whole, so `mail@x.img` mounts the file of that name; otherwise the
/// label is what follows the last `@`, unless that is empty or holds a
/// `/` (then the `@` belongs to a directory name) or nothing precedes
/// it. Labels have no `@` (`label_problem`), so the last one is the
/// split.
pub fn split_image_spec(
    spec: &str,
    exists: impl Fn(&std::path::Path) -> bool,
) -> (std::path::PathBuf, Option<String>) {
    if !exists(std::path::Path::new(spec)) {
        if let Some((img, label)) = spec.rsplit_once('@') {
            if !img.is_empty() && !label.is_empty() && !label.contains('/') {
                return (img.into(), Some(label.to_string()));
            }
        }
    }
    (spec.into(), None)
}

/// `label_problem` as an error (EINVAL; ENAMETOOLONG when too long).
pub fn check_label(label: &str) -> Result<()> {
    match label_problem(label) {
        None => Ok(()),
        Some(_) if label.len() > LABEL_MAX => Err(Error::NameTooLong { len: label.len() }),
        Some(why) => Err(Error::InvalidArgument {
            what: format!("PFS label {label:?} {why}"),
        }),
    }
}

impl Mount {
    /// Every PFS root in the super-root: label and blockref.
    fn pfs_entries(&mut self) -> Result<Vec<(String, Blockref)>> {
        let Mount { vol, sroot, .. } = self;
        let mut out = Vec::new();
        for br in sroot.table.range(&*vol, 0, u64::MAX)? {
            if br.btype != BlockrefType::Inode {
                return Err(Error::corrupt(
                    format!(
                        "{} blockref key {:#x} in the super-root",
                        br.btype.name(),
                        br.key
                    ),
                    br.data_off.offset(),
                ));
            }
            let ino = pfs::read_inode(vol, &br)?;
            out.push((String::from_utf8_lossy(ino.data.name()).into_owned(), br));
        }
        Ok(out)
    }

    /// Refuse when a flush is running or the mount is poisoned, and when
    /// `label` is taken.
    fn pfs_op_ready(&mut self, new_label: Option<&str>) -> Result<()> {
        self.writable()?;
        self.no_commit_under_way()?;
        if let Some(label) = new_label {
            check_label(label)?;
            if self.pfs.contains_key(label) || self.pfs_entries()?.iter().any(|(l, _)| l == label) {
                return Err(Error::Exists {
                    what: format!("PFS {label}"),
                });
            }
        }
        Ok(())
    }

    /// The key a new super-root entry for `label` takes: its hash, or
    /// the next free key in the hash's collision range.
    fn free_pfs_key(&mut self, label: &str) -> Result<u64> {
        let hash = dirhash(label.as_bytes());
        let Mount { vol, sroot, .. } = self;
        for key in hash..=(hash | DIRHASH_LOMASK) {
            if sroot.table.lookup(&*vol, key)?.is_none() {
                return Ok(key);
            }
        }
        Err(Error::CollisionSpaceFull {
            what: format!("PFS {label}"),
        })
    }

    /// Put a new PFS root into the super-root (written at the next flush).
    fn add_pfs_root(&mut self, label: &str, key: u64, mut data: InodeData) {
        data.set_name(label.as_bytes());
        data.meta.name_key = key;
        data.meta.op_flags |= OPFLAG_PFSROOT;
        data.meta.inum = ROOT_INUM;
        self.pfs
            .insert(label.to_string(), PfsState::new(key, InodeNode::new(data)));
        self.sroot.dirty = true;
    }

    /// Snapshot PFS `label` as `name` (a new PFS sharing every block),
    /// with fresh random ids. `now` is the snapshot root's ctime.
    pub fn snapshot(&mut self, label: &str, name: &str, now: u64) -> Result<()> {
        self.snapshot_with_ids(label, name, now, PfsIds::random())
    }

    /// `snapshot` with the given ids.
    pub fn snapshot_with_ids(
        &mut self,
        label: &str,
        name: &str,
        now: u64,
        ids: PfsIds,
    ) -> Result<()> {
        self.pfs_op_ready(Some(name))?;
        self.pfs_mut(label)?;
        // DragonFly syncs the PFS first: the snapshot is the flushed state.
        self.flush()?;
        let tid = self.next_tid()?;
        let origin = self.pfs_mut(label)?;
        debug_assert!(!origin.root.dirty, "PFS root dirty after a flush");
        origin.root.data.meta.pfs_lsnap_tid = tid;
        origin.root.dirty = true;
        let mut data = origin.root.data.clone();
        let m = &mut data.meta;
        m.pfs_type = pfs_type::MASTER;
        m.pfs_subtype = pfs_subtype::SNAPSHOT;
        m.pfs_clid = ids.clid;
        m.pfs_fsid = ids.fsid;
        m.pfs_lsnap_tid = tid;
        m.pfs_inum = m.pfs_inum.saturating_add(1);
        m.ctime = now;
        let key = self.free_pfs_key(name)?;
        self.add_pfs_root(name, key, data);
        let stats = self.flush()?;
        debug_assert_eq!(stats.tid, tid);
        log::info!("snapshot of PFS {label} as {name} at tid {tid:#x}");
        Ok(())
    }

    /// Create an empty MASTER PFS `label`, as newfs makes one (lz4 and
    /// xxhash64; a PFS named BOOT is never compressed), with random ids.
    pub fn pfs_create(&mut self, label: &str, now: u64) -> Result<()> {
        self.pfs_create_with_ids(label, now, PfsIds::random())
    }

    /// `pfs_create` with the given ids.
    pub fn pfs_create_with_ids(&mut self, label: &str, now: u64, ids: PfsIds) -> Result<()> {
        self.pfs_op_ready(Some(label))?;
        let mut data = InodeData::default();
        let m = &mut data.meta;
        m.obj_type = ObjType::Directory;
        m.mode = 0o755;
        m.nlinks = 1;
        (m.ctime, m.mtime, m.atime, m.btime) = (now, now, now, now);
        if label.eq_ignore_ascii_case("BOOT") {
            m.comp_algo = comp_method::AUTOZERO;
        } else {
            m.comp_algo = comp_method::DEFAULT;
        }
        m.check_algo = check_method::DEFAULT;
        m.pfs_type = pfs_type::MASTER;
        m.pfs_clid = ids.clid;
        m.pfs_fsid = ids.fsid;
        m.pfs_inum = PFS_INUM_START;
        let key = self.free_pfs_key(label)?;
        self.add_pfs_root(label, key, data);
        self.flush()?;
        log::info!("PFS {label} created");
        Ok(())
    }

    /// Remove PFS or snapshot `label` from the super-root. Its blocks
    /// stay allocated until bulkfree finds nothing else references them.
    /// The last PFS is refused: a volume without one cannot be mounted
    /// (DragonFly refuses a mounted PFS, and needs one mounted to ask).
    pub fn pfs_delete(&mut self, label: &str) -> Result<()> {
        self.pfs_op_ready(None)?;
        let entries = self.pfs_entries()?;
        let Some(&(_, br)) = entries.iter().find(|(l, _)| l == label) else {
            return Err(Error::NotFound {
                what: format!("PFS {label}"),
            });
        };
        if entries.len() <= 1 {
            return Err(Error::InvalidArgument {
                what: format!("{label} is the last PFS of the volume"),
            });
        }
        if self
            .pfs
            .get(label)
            .is_some_and(|p| !p.pins.lock().is_empty())
        {
            // DragonFly refuses to delete a mounted PFS (EBUSY).
            return Err(Error::Busy {
                what: format!("PFS {label} has files open"),
            });
        }
        // Changes not flushed go with it. What it alone held is for
        // bulkfree (its blocks may be shared with snapshots).
        self.pfs.remove(label);
        crate::mount::lock_space(&self.space)
            .note_possibly_free(br.data_count().saturating_add(br.data_off.bytes()));
        let Mount { vol, sroot, .. } = self;
        sroot.table.delete(&*vol, br.key)?;
        sroot.dirty = true;
        self.flush()?;
        log::info!("PFS {label} deleted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn labels_follow_one_rule() {
        for good in ["DATA", "a.b", "SNAP-1 2", "é", &"x".repeat(255)] {
            assert_eq!(label_problem(good), None, "{good:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a@b",
            "a\nb",
            "a\0b",
            "\x7f",
            &"x".repeat(256),
        ] {
            assert!(label_problem(bad).is_some(), "{bad:?}");
            assert!(check_label(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn specs_split_at_the_last_at_unless_the_whole_names_a_file() {
        let none = |_: &std::path::Path| false;
        let split = |s: &str| split_image_spec(s, none);
        assert_eq!(split("disk.img"), (PathBuf::from("disk.img"), None));
        assert_eq!(split("d.img@S"), (PathBuf::from("d.img"), Some("S".into())));
        assert_eq!(split("/a@b/d.img"), (PathBuf::from("/a@b/d.img"), None));
        assert_eq!(
            split("/a@b/d@x.img@L"),
            (PathBuf::from("/a@b/d@x.img"), Some("L".into()))
        );
        assert_eq!(split("d.img@"), (PathBuf::from("d.img@"), None));
        assert_eq!(split("@L"), (PathBuf::from("@L"), None));
        let mail = |p: &std::path::Path| p == std::path::Path::new("mail@x.img");
        assert_eq!(
            split_image_spec("mail@x.img", mail),
            (PathBuf::from("mail@x.img"), None)
        );
        assert_eq!(
            split_image_spec("mail@x.img@L", mail),
            (PathBuf::from("mail@x.img"), Some("L".into()))
        );
    }
}
