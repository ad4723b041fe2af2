//! Permission policy: who may do what to a node, as the Linux VFS
//! decides it for a local filesystem. The operations (`vnops`) ask a
//! `Caller` (the request's uid, gid and process) before they change or
//! reveal anything; the stores know nothing of permissions.
//!
//! With `default_permissions` the kernel checks the mode bits (with
//! supplementary groups), the sticky bit and chmod/chown/utimes itself
//! and calls none of the checks here (`Caller::enforce` false); without
//! it FUSE checks nothing, so these rules apply: the mode bits
//! (`permitted`), the sticky bit, `fs.protected_hardlinks`, and who may
//! chmod, chown, truncate and set times. Whatever the option, the
//! filesystem decides the owner of a new node (`new_owner`) and which
//! set-user-ID and set-group-ID bits a change of data or of owner
//! clears (`after_data_change`, `after_chown`), since FUSE leaves that
//! to it.
//!
//! Supplementary groups and CAP_FSETID are read from /proc (as libfuse's
//! `fuse_req_getgroups`) only when a rule needs them, once per request.

use fuser::{Errno, Request};
use hammer2::disk::{InodeMeta, ObjType};
use hammer2::mount::SetAttr;
use std::cell::OnceCell;

/// Read, write and execute (search) in a permission mask.
pub const R: u32 = 4;
pub const W: u32 = 2;
pub const X: u32 = 1;

const S_ISUID: u32 = 0o4000;
const S_ISGID: u32 = 0o2000;
const S_ISVTX: u32 = 0o1000;
const S_IXGRP: u32 = 0o0010;

/// Linux's CAP_FSETID, the capability that keeps set-user-ID and
/// set-group-ID bits through a change of the file's data.
const CAP_FSETID: u32 = 4;

/// Where what the request does not carry comes from.
enum Source {
    /// The calling process's `/proc/PID/status`.
    Proc(u32),
    /// Given (tests).
    #[cfg(test)]
    Given { groups: Vec<u32>, cap_fsetid: bool },
}

/// The caller of one request.
pub struct Caller {
    uid: u32,
    gid: u32,
    /// Apply the mode-bit rules (false with `default_permissions`).
    enforce: bool,
    source: Source,
    groups: OnceCell<Vec<u32>>,
}

impl Caller {
    /// The caller of `req`; `enforce` when the mount checks permissions
    /// itself (no `default_permissions`).
    pub fn of(req: &Request, enforce: bool) -> Caller {
        Caller {
            uid: req.uid(),
            gid: req.gid(),
            enforce,
            source: Source::Proc(req.pid()),
            groups: OnceCell::new(),
        }
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Is the caller in group `gid` (its primary group, or one of its
    /// supplementary groups, the kernel's `in_group_p`)? The
    /// supplementary groups are read only when the primary one differs.
    pub fn in_group(&self, gid: u32) -> bool {
        gid == self.gid
            || self
                .groups
                .get_or_init(|| match &self.source {
                    Source::Proc(pid) => supplementary_groups(*pid),
                    #[cfg(test)]
                    Source::Given { groups, .. } => groups.clone(),
                })
                .contains(&gid)
    }

    fn cap_fsetid(&self) -> bool {
        match &self.source {
            Source::Proc(pid) => has_cap_fsetid(*pid, self.uid),
            #[cfg(test)]
            Source::Given { cap_fsetid, .. } => *cap_fsetid,
        }
    }

    /// May the caller do `mask` (R, W, X) to `m`? EACCES if not; always,
    /// with `default_permissions` (the kernel has checked).
    pub fn may(&self, m: &InodeMeta, mask: u32) -> Result<(), Errno> {
        if !self.enforce || permitted(m, self.uid, |g| self.in_group(g), mask) {
            Ok(())
        } else {
            Err(Errno::EACCES)
        }
    }

    /// May the caller remove or rename `victim` out of `dir`? In a
    /// sticky directory only root and the owners of the entry or the
    /// directory may (EPERM).
    pub fn may_remove(&self, dir: &InodeMeta, victim: &InodeMeta) -> Result<(), Errno> {
        let uid = self.uid;
        if !self.enforce
            || uid == 0
            || dir.mode & S_ISVTX == 0
            || uid == victim.uid_unix()
            || uid == dir.uid_unix()
        {
            Ok(())
        } else {
            Err(Errno::EPERM)
        }
    }

    /// May the caller move `moved` to another directory? A directory
    /// moved so has its ".." rewritten: write permission on it (the
    /// kernel's `vfs_rename`); anything else, yes.
    pub fn may_reparent(&self, moved: &InodeMeta) -> Result<(), Errno> {
        if moved.obj_type == ObjType::Directory {
            self.may(moved, W)
        } else {
            Ok(())
        }
    }

    /// `fs.protected_hardlinks` (the kernel's `may_linkat`), for a mount
    /// without `default_permissions`: the kernel asks the filesystem for
    /// the read and write permission that rule needs, and without
    /// `default_permissions` FUSE grants it, so the check is here. When
    /// the sysctl is 1, a caller who neither is root nor owns the source
    /// may link only a regular file that is not set-user-ID, not
    /// set-group-ID and group-executable, and that they may read and
    /// write (EPERM otherwise).
    pub fn may_link(&self, src: &InodeMeta) -> Result<(), Errno> {
        self.may_link_with(src, protected_hardlinks)
    }

    fn may_link_with(&self, src: &InodeMeta, protected: impl Fn() -> bool) -> Result<(), Errno> {
        if !self.enforce || self.uid == 0 || self.uid == src.uid_unix() || !protected() {
            return Ok(());
        }
        let mode = src.mode;
        let safe = src.obj_type == ObjType::Regfile
            && mode & S_ISUID == 0
            && mode & (S_ISGID | S_IXGRP) != (S_ISGID | S_IXGRP)
            && permitted(src, self.uid, |g| self.in_group(g), R | W);
        if safe {
            Ok(())
        } else {
            Err(Errno::EPERM)
        }
    }

    /// setattr's rules (chmod, chown, truncate, utimes) for a mount
    /// without `default_permissions`, on `m` changed as `a` says; a
    /// set-group-ID bit a chmod may not set is dropped from `a`.
    /// `times_now`: the times asked are both "now" (or unset). `fh`: the
    /// kernel acts through an open file (ftruncate, writeback of times),
    /// whose opening was checked already.
    pub fn may_setattr(
        &self,
        m: &InodeMeta,
        a: &mut SetAttr,
        times_now: bool,
        fh: bool,
    ) -> Result<(), Errno> {
        if !self.enforce || self.uid == 0 {
            return Ok(());
        }
        let owner = self.uid == m.uid_unix();
        if let Some(mode) = a.mode.as_mut() {
            // Dropping set-user-ID and set-group-ID is what the kernel
            // asks for after a write by anyone, owner or not.
            let drop_only = *mode == m.mode & 0o7777 & !(S_ISUID | S_ISGID);
            if !owner && !drop_only {
                return Err(Errno::EPERM);
            }
            let gid = a.gid.unwrap_or(m.gid_unix());
            if !self.in_group(gid) {
                *mode &= !S_ISGID;
            }
        }
        if a.uid.is_some_and(|u| u != m.uid_unix()) {
            return Err(Errno::EPERM);
        }
        if a.gid
            .is_some_and(|g| g != m.gid_unix() && !(owner && self.in_group(g)))
        {
            return Err(Errno::EPERM);
        }
        if a.size.is_some() && !fh {
            self.may(m, W)?;
        }
        let times = a.atime.is_some() || a.mtime.is_some();
        if times && !fh && !owner {
            if !times_now {
                return Err(Errno::EPERM);
            }
            self.may(m, W)?;
        }
        Ok(())
    }

    /// Owner and mode of a new node in directory `dir` (the kernel's
    /// `inode_init_owner`): the caller's uid; the directory's gid when it
    /// is setgid (a new directory stays setgid), else the caller's gid; a
    /// setgid, group-executable file keeps S_ISGID only if the caller is
    /// in its group (or root).
    pub fn new_owner(&self, dir: &InodeMeta, mode: u32, is_dir: bool) -> (u32, u32, u32) {
        let mut mode = mode & 0o7777;
        let gid = if dir.mode & S_ISGID != 0 {
            if is_dir {
                mode |= S_ISGID;
            }
            dir.gid_unix()
        } else {
            self.gid
        };
        let sgid_exec = S_ISGID | S_IXGRP;
        if !is_dir && mode & sgid_exec == sgid_exec && !self.in_group(gid) && self.uid != 0 {
            mode &= !S_ISGID;
        }
        (self.uid, gid, mode)
    }

    /// The mode of file `m` after the caller changed its data (write,
    /// truncate, fallocate), when it differs: set-user-ID and
    /// set-group-ID cleared as Linux does for local filesystems
    /// (`setattr_should_drop_suidgid`) unless the caller holds
    /// CAP_FSETID: set-user-ID always, set-group-ID when the file is
    /// group-executable or the caller is not in its group. With
    /// FUSE_HANDLE_KILLPRIV the kernel leaves all of it to the
    /// filesystem; without it (the writeback cache) it drops set-user-ID,
    /// and set-group-ID of a group-executable file, itself (a SETATTR
    /// before the change), and leaves the rest (fs/fuse/dir.c,
    /// `fuse_setattr`).
    pub fn after_data_change(&self, m: &InodeMeta) -> Option<u32> {
        if m.obj_type != ObjType::Regfile {
            return None;
        }
        self.set_id_cleared(m, || false)
            .filter(|_| !self.cap_fsetid())
    }

    /// The mode of `m` after a chown (its owner or group set, the same
    /// ones included, or neither: `chown(f, -1, -1)`), when it differs:
    /// as Linux does for a local filesystem (`chown_common`), anything
    /// but a directory loses set-user-ID whoever the caller, and
    /// set-group-ID when it is group-executable or the caller is neither
    /// in its group nor holds CAP_FSETID. The mount leaves this to the
    /// filesystem (FUSE_HANDLE_KILLPRIV) rather than have the kernel
    /// send a GETATTR before every chown.
    pub fn after_chown(&self, m: &InodeMeta) -> Option<u32> {
        if m.obj_type == ObjType::Directory {
            return None;
        }
        self.set_id_cleared(m, || self.cap_fsetid())
    }

    /// `m`'s mode without set-user-ID, and without set-group-ID when the
    /// file is group-executable or the caller is neither in its group
    /// nor `exempt` (Linux's `setattr_should_drop_sgid`), when that
    /// differs. `exempt` and the groups are asked only if they decide.
    fn set_id_cleared(&self, m: &InodeMeta, exempt: impl FnOnce() -> bool) -> Option<u32> {
        let old = m.mode & 0o7777;
        if old & (S_ISUID | S_ISGID) == 0 {
            return None;
        }
        let mut mode = old & !S_ISUID;
        if old & S_ISGID != 0 && (old & S_IXGRP != 0 || !(self.in_group(m.gid_unix()) || exempt()))
        {
            mode &= !S_ISGID;
        }
        (mode != old).then_some(mode)
    }
}

/// May a caller with `uid`, in the groups `in_group` accepts, do `mask`
/// (R, W, X) to an inode? Unix rules on the owner, group and other
/// bits; root may read and search anything and execute what has any
/// execute bit. `in_group` is asked only when the answer depends on it
/// (the group and other bits disagree), since it may read /proc.
pub fn permitted(m: &InodeMeta, uid: u32, in_group: impl Fn(u32) -> bool, mask: u32) -> bool {
    let mode = crate::inode::st_mode(m);
    if uid == 0 {
        let any_x = mode & 0o111 != 0 || m.obj_type == ObjType::Directory;
        return mask & X == 0 || any_x;
    }
    let grants = |bits: u32| bits & mask == mask;
    if uid == m.uid_unix() {
        return grants((mode >> 6) & 7);
    }
    let (group, other) = (grants((mode >> 3) & 7), grants(mode & 7));
    if group == other {
        return other;
    }
    if in_group(m.gid_unix()) {
        group
    } else {
        other
    }
}

/// `fs.protected_hardlinks` as the kernel has it now (read at each
/// link, as the kernel does); on when it cannot be read, the side that
/// refuses.
fn protected_hardlinks() -> bool {
    std::fs::read_to_string("/proc/sys/fs/protected_hardlinks").map_or(true, |v| v.trim() != "0")
}

/// The supplementary groups of process (or thread) `pid`, from
/// `/proc/PID/status` (as libfuse's `fuse_req_getgroups`); none when it
/// cannot be read (it exited), the side that refuses.
fn supplementary_groups(pid: u32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Does process (or thread) `pid`, running as `uid`, hold CAP_FSETID
/// (its effective set, `CapEff` in `/proc/PID/status`)? When that
/// cannot be read (it exited), whether it is root.
fn has_cap_fsetid(pid: u32, uid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return uid == 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .map_or(uid == 0, |caps| caps & (1 << CAP_FSETID) != 0)
}

/// The expected answers here come from the rules as POSIX.1-2017 and
/// the Linux man pages state them (chmod(2), chown(2), utimensat(2),
/// truncate(2), unlink(2), mkdir(2), proc(5) on protected_hardlinks),
/// not from the code above.
#[cfg(test)]
mod tests {
    use super::*;
    use hammer2::disk::Uuid;

    const OWNER: u32 = 1000;
    const OTHER: u32 = 2000;
    const GROUP: u32 = 100;
    const OTHER_GROUP: u32 = 200;

    fn caller(uid: u32, gid: u32, groups: &[u32]) -> Caller {
        Caller {
            uid,
            gid,
            enforce: true,
            source: Source::Given {
                groups: groups.to_vec(),
                cap_fsetid: uid == 0,
            },
            groups: OnceCell::new(),
        }
    }

    fn node(obj_type: ObjType, mode: u32, uid: u32, gid: u32) -> InodeMeta {
        InodeMeta {
            obj_type,
            mode,
            uid: Uuid::from_unix_id(uid),
            gid: Uuid::from_unix_id(gid),
            ..InodeMeta::default()
        }
    }

    fn file(mode: u32) -> InodeMeta {
        node(ObjType::Regfile, mode, OWNER, GROUP)
    }

    fn chmod(mode: u32) -> SetAttr {
        SetAttr {
            mode: Some(mode),
            ..SetAttr::default()
        }
    }

    #[test]
    fn mode_bits_owner_then_group_then_other() {
        let f = file(0o640);
        assert!(caller(OWNER, GROUP, &[]).may(&f, R | W).is_ok());
        // A group member reads, but may not write.
        assert!(caller(OTHER, GROUP, &[]).may(&f, R).is_ok());
        assert_eq!(caller(OTHER, GROUP, &[]).may(&f, W), Err(Errno::EACCES));
        // Supplementary groups count.
        assert!(caller(OTHER, OTHER_GROUP, &[GROUP]).may(&f, R).is_ok());
        // Others get nothing.
        assert_eq!(
            caller(OTHER, OTHER_GROUP, &[]).may(&f, R),
            Err(Errno::EACCES)
        );
        // The owner class alone applies to the owner: 0o077 denies them.
        let f = file(0o077);
        assert_eq!(caller(OWNER, GROUP, &[]).may(&f, R), Err(Errno::EACCES));
        // With default_permissions the kernel has checked.
        let mut c = caller(OTHER, OTHER_GROUP, &[]);
        c.enforce = false;
        assert!(c.may(&file(0), R | W | X).is_ok());
    }

    #[test]
    fn root_reads_anything_and_executes_what_has_an_execute_bit() {
        let root = caller(0, 0, &[]);
        assert!(root.may(&file(0), R | W).is_ok());
        assert_eq!(root.may(&file(0o644), X), Err(Errno::EACCES));
        assert!(root.may(&file(0o100), X).is_ok());
        // Search in a directory needs no bit.
        assert!(root
            .may(&node(ObjType::Directory, 0, OWNER, GROUP), X)
            .is_ok());
    }

    #[test]
    fn group_bits_apply_to_members_only_and_membership_is_asked_only_when_it_matters() {
        let m = node(ObjType::Regfile, 0o604, 10, 20);
        let asked = std::cell::Cell::new(0);
        let member = |g: u32| {
            asked.set(asked.get() + 1);
            g == 20
        };
        // A member of group 20 gets the group bits (none), even where
        // other bits would grant.
        assert!(!permitted(&m, 11, member, R));
        assert!(permitted(&m, 11, |_| false, R));
        assert!(permitted(&m, 10, |_| panic!("owner"), R | W));
        // Writing: neither group nor other bits grant, so membership
        // is not asked.
        asked.set(0);
        assert!(!permitted(&m, 11, member, W));
        assert_eq!(asked.get(), 0);
    }

    /// chmod(2): "The effective UID of the calling process must match
    /// the owner of the file, or the process must be privileged";
    /// "If the calling process is not privileged, and the group of the
    /// file does not match the effective group ID of the process or one
    /// of its supplementary group IDs, the S_ISGID bit will be turned
    /// off, but this will not cause an error to be returned."
    #[test]
    fn chmod_is_the_owners_and_drops_set_group_id_outside_the_group() {
        let f = file(0o644);
        let mut a = chmod(0o600);
        assert_eq!(
            caller(OTHER, GROUP, &[]).may_setattr(&f, &mut a, true, false),
            Err(Errno::EPERM)
        );
        let mut a = chmod(0o2755);
        caller(OWNER, OTHER_GROUP, &[])
            .may_setattr(&f, &mut a, true, false)
            .unwrap();
        assert_eq!(a.mode, Some(0o755));
        let mut a = chmod(0o2755);
        caller(OWNER, OTHER_GROUP, &[GROUP])
            .may_setattr(&f, &mut a, true, false)
            .unwrap();
        assert_eq!(a.mode, Some(0o2755));
        let mut a = chmod(0o2755);
        caller(0, 0, &[])
            .may_setattr(&f, &mut a, true, false)
            .unwrap();
        assert_eq!(a.mode, Some(0o2755));
    }

    /// The kernel's own SETATTR after a write by anyone clears
    /// set-user-ID (fs/fuse/dir.c, `fuse_setattr` with ATTR_KILL_SUID):
    /// a mode equal to the old one less those bits is not a chmod the
    /// caller chose, and needs no ownership.
    #[test]
    fn the_kernels_kill_suid_after_a_write_is_allowed_to_anyone() {
        let f = file(0o4766);
        let mut a = chmod(0o766);
        assert!(caller(OTHER, OTHER_GROUP, &[])
            .may_setattr(&f, &mut a, true, false)
            .is_ok());
        let mut a = chmod(0o777);
        assert_eq!(
            caller(OTHER, OTHER_GROUP, &[]).may_setattr(&f, &mut a, true, false),
            Err(Errno::EPERM)
        );
    }

    /// chown(2): "Only a privileged process may change the owner of a
    /// file. The owner of a file may change the group of the file to any
    /// group of which that owner is a member."
    #[test]
    fn chown_is_roots_and_chgrp_the_owners_within_their_groups() {
        let f = file(0o644);
        let owner = caller(OWNER, GROUP, &[OTHER_GROUP]);
        let stranger = caller(OTHER, GROUP, &[OTHER_GROUP]);
        let to = |uid: Option<u32>, gid: Option<u32>| SetAttr {
            uid,
            gid,
            ..SetAttr::default()
        };
        assert_eq!(
            owner.may_setattr(&f, &mut to(Some(OTHER), None), true, false),
            Err(Errno::EPERM)
        );
        // Unchanged owner and group: nothing is changed, nothing refused
        // (chown(2) with the same ids, as `chown -R` does).
        assert!(owner
            .may_setattr(&f, &mut to(Some(OWNER), Some(GROUP)), true, false)
            .is_ok());
        assert!(owner
            .may_setattr(&f, &mut to(None, Some(OTHER_GROUP)), true, false)
            .is_ok());
        assert_eq!(
            owner.may_setattr(&f, &mut to(None, Some(300)), true, false),
            Err(Errno::EPERM)
        );
        assert_eq!(
            stranger.may_setattr(&f, &mut to(None, Some(OTHER_GROUP)), true, false),
            Err(Errno::EPERM)
        );
        let root = caller(0, 0, &[]);
        assert!(root
            .may_setattr(&f, &mut to(Some(OTHER), Some(300)), true, false)
            .is_ok());
    }

    /// utimensat(2): setting both times to now needs write access or
    /// ownership; any other change needs ownership (EPERM), and without
    /// either for "now" the error is EACCES.
    #[test]
    fn utimes_now_needs_write_access_and_other_times_ownership() {
        let times = || SetAttr {
            atime: Some(1),
            mtime: Some(1),
            ..SetAttr::default()
        };
        let writable = file(0o666);
        let stranger = caller(OTHER, OTHER_GROUP, &[]);
        assert!(stranger
            .may_setattr(&writable, &mut times(), true, false)
            .is_ok());
        assert_eq!(
            stranger.may_setattr(&writable, &mut times(), false, false),
            Err(Errno::EPERM)
        );
        let readonly = file(0o644);
        assert_eq!(
            stranger.may_setattr(&readonly, &mut times(), true, false),
            Err(Errno::EACCES)
        );
        let owner = caller(OWNER, GROUP, &[]);
        assert!(owner
            .may_setattr(&file(0o444), &mut times(), false, false)
            .is_ok());
    }

    /// truncate(2): EACCES when the file is not writable by the caller;
    /// ftruncate(2) acts on a descriptor already open for writing.
    #[test]
    fn truncate_needs_write_permission_unless_through_an_open_file() {
        let size = || SetAttr {
            size: Some(0),
            ..SetAttr::default()
        };
        let f = file(0o644);
        let stranger = caller(OTHER, OTHER_GROUP, &[]);
        assert_eq!(
            stranger.may_setattr(&f, &mut size(), true, false),
            Err(Errno::EACCES)
        );
        assert!(stranger.may_setattr(&f, &mut size(), true, true).is_ok());
        assert!(stranger
            .may_setattr(&file(0o646), &mut size(), true, false)
            .is_ok());
    }

    /// unlink(2), EPERM: "The directory containing pathname has the
    /// sticky bit (S_ISVTX) set and the process's effective UID is
    /// neither the UID of the file to be deleted nor that of the
    /// directory containing it, and the process is not privileged."
    #[test]
    fn a_sticky_directory_lets_only_owners_remove() {
        let tmp = node(ObjType::Directory, 0o1777, 0, 0);
        let theirs = node(ObjType::Regfile, 0o666, OWNER, GROUP);
        assert_eq!(
            caller(OTHER, GROUP, &[]).may_remove(&tmp, &theirs),
            Err(Errno::EPERM)
        );
        assert!(caller(OWNER, GROUP, &[]).may_remove(&tmp, &theirs).is_ok());
        assert!(caller(0, 0, &[]).may_remove(&tmp, &theirs).is_ok());
        let own_dir = node(ObjType::Directory, 0o1777, OTHER, GROUP);
        assert!(caller(OTHER, GROUP, &[])
            .may_remove(&own_dir, &theirs)
            .is_ok());
        // Without the sticky bit, write permission on the directory is
        // all it takes (checked separately).
        let plain = node(ObjType::Directory, 0o777, 0, 0);
        assert!(caller(OTHER, GROUP, &[])
            .may_remove(&plain, &theirs)
            .is_ok());
    }

    /// rename(2), EACCES: "oldpath is a directory and does not allow
    /// write permission (needed to update the .. entry)".
    #[test]
    fn moving_a_directory_elsewhere_needs_write_permission_on_it() {
        let dir = node(ObjType::Directory, 0o755, OWNER, GROUP);
        let stranger = caller(OTHER, GROUP, &[]);
        assert_eq!(stranger.may_reparent(&dir), Err(Errno::EACCES));
        assert!(caller(OWNER, GROUP, &[]).may_reparent(&dir).is_ok());
        assert!(stranger.may_reparent(&file(0o444)).is_ok());
        let open = node(ObjType::Directory, 0o777, OWNER, GROUP);
        assert!(stranger.may_reparent(&open).is_ok());
    }

    /// mkdir(2): "If the parent directory has the set-group-ID bit set,
    /// then so will the newly created directory"; open(2)/POSIX: a new
    /// file's group is the parent's in a set-group-ID directory, else
    /// the caller's; and (inode_init_owner) a set-group-ID executable
    /// made there keeps the bit only for a member of that group.
    #[test]
    fn new_nodes_take_the_group_of_a_set_group_id_directory() {
        let c = caller(OWNER, OTHER_GROUP, &[]);
        let plain = node(ObjType::Directory, 0o755, 0, GROUP);
        assert_eq!(
            c.new_owner(&plain, 0o644, false),
            (OWNER, OTHER_GROUP, 0o644)
        );
        assert_eq!(
            c.new_owner(&plain, 0o755, true),
            (OWNER, OTHER_GROUP, 0o755)
        );
        let sgid = node(ObjType::Directory, 0o2775, 0, GROUP);
        assert_eq!(c.new_owner(&sgid, 0o755, true), (OWNER, GROUP, 0o2755));
        assert_eq!(c.new_owner(&sgid, 0o644, false), (OWNER, GROUP, 0o644));
        assert_eq!(c.new_owner(&sgid, 0o2755, false), (OWNER, GROUP, 0o755));
        let member = caller(OWNER, OTHER_GROUP, &[GROUP]);
        assert_eq!(
            member.new_owner(&sgid, 0o2755, false),
            (OWNER, GROUP, 0o2755)
        );
    }

    /// A write by a caller without CAP_FSETID clears set-user-ID, and
    /// set-group-ID when the file is group-executable or the caller is
    /// outside its group (Linux's `setattr_should_drop_sgid`); a plain
    /// set-group-ID bit without group execute stays for a member.
    #[test]
    fn writes_clear_set_id_bits_unless_the_caller_may_keep_them() {
        let member = caller(OTHER, GROUP, &[]);
        let stranger = caller(OTHER, OTHER_GROUP, &[]);
        assert_eq!(member.after_data_change(&file(0o4755)), Some(0o755));
        assert_eq!(member.after_data_change(&file(0o2755)), Some(0o755));
        assert_eq!(member.after_data_change(&file(0o2745)), None);
        assert_eq!(stranger.after_data_change(&file(0o2745)), Some(0o745));
        assert_eq!(stranger.after_data_change(&file(0o6775)), Some(0o775));
        assert_eq!(member.after_data_change(&file(0o755)), None);
        // CAP_FSETID keeps them.
        assert_eq!(caller(0, 0, &[]).after_data_change(&file(0o6755)), None);
        // Only regular files.
        let dir = node(ObjType::Directory, 0o2775, OWNER, GROUP);
        assert_eq!(stranger.after_data_change(&dir), None);
    }

    /// A chown clears set-user-ID from anything but a directory, root's
    /// included, and set-group-ID when the file is group-executable or
    /// the caller is neither in its group nor holds CAP_FSETID (Linux's
    /// `chown_common`).
    #[test]
    fn chown_clears_set_id_bits_but_a_directory_s() {
        let member = caller(OWNER, GROUP, &[]);
        let stranger = caller(OWNER, OTHER_GROUP, &[]);
        let root = caller(0, 0, &[]);
        assert_eq!(root.after_chown(&file(0o4755)), Some(0o755));
        assert_eq!(root.after_chown(&file(0o6755)), Some(0o755));
        assert_eq!(root.after_chown(&file(0o6745)), Some(0o2745));
        assert_eq!(member.after_chown(&file(0o2745)), None);
        assert_eq!(stranger.after_chown(&file(0o2745)), Some(0o745));
        assert_eq!(member.after_chown(&file(0o755)), None);
        let fifo = node(ObjType::Fifo, 0o4666, OWNER, GROUP);
        assert_eq!(member.after_chown(&fifo), Some(0o666));
        let dir = node(ObjType::Directory, 0o6775, OWNER, GROUP);
        assert_eq!(stranger.after_chown(&dir), None);
    }

    /// proc(5), protected_hardlinks = 1: "users cannot create hard links
    /// unless they already own the source file, or have read/write
    /// access to it"; the kernel also refuses set-user-ID files,
    /// set-group-ID executables and anything not a regular file.
    #[test]
    fn protected_hardlinks_need_ownership_or_a_safe_readable_writable_file() {
        let stranger = caller(OTHER, OTHER_GROUP, &[]);
        let on = || true;
        assert_eq!(stranger.may_link_with(&file(0o644), on), Err(Errno::EPERM));
        assert!(stranger.may_link_with(&file(0o666), on).is_ok());
        assert_eq!(stranger.may_link_with(&file(0o4666), on), Err(Errno::EPERM));
        assert_eq!(stranger.may_link_with(&file(0o2676), on), Err(Errno::EPERM));
        assert!(stranger.may_link_with(&file(0o2666), on).is_ok());
        let fifo = node(ObjType::Fifo, 0o666, OWNER, GROUP);
        assert_eq!(stranger.may_link_with(&fifo, on), Err(Errno::EPERM));
        assert!(caller(OWNER, GROUP, &[])
            .may_link_with(&file(0), on)
            .is_ok());
        assert!(caller(0, 0, &[]).may_link_with(&file(0), on).is_ok());
        // With the sysctl at 0 anything goes.
        assert!(stranger.may_link_with(&file(0o4000), || false).is_ok());
    }
}
