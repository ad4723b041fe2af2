//! fsck's repairs (`fsck.hammer2 -p` and `-y`): the damage `fsck.rs`
//! reports, fixed in place through the write path, or by going back to
//! an older volume header whose whole tree verifies (a rewind, as ZFS's
//! `zpool import -F`).
//!
//! A repair runs in phases, each committed with a flush of the library's
//! `Mount`, so a repaired image is a normal committed state and a crash
//! at any point leaves either the state before it or a later one:
//!
//! 1. The base: the newest volume header copy with good CRCs (or the
//!    one `--rewind=N` names). Its `mirror_tid` is raised above every
//!    copy's, so the repair's headers are the newest.
//! 2. Space (`space.rs`): an allocator whose freemap is every block any
//!    header copy's tree reaches, read past check codes; nothing the
//!    repair writes can land on a block an older state, a damaged tree
//!    or a replacement candidate still holds.
//! 3. Structure (`walk.rs`): every block of the base's topology is
//!    verified as fsck verifies it; a block that fails is replaced by
//!    the same key's block in an older tree or a snapshot whose check
//!    code verifies (`older.rs`), else kept as read when what it holds
//!    is sound (a damaged check code or a field no read depends on),
//!    else cut; node shapes, keys, types, sizes, methods and statistics
//!    are corrected. When the super-root or a PFS root would be lost,
//!    the repair rewinds instead (`rewind.rs`), if an older header's
//!    whole tree verifies. Flush.
//! 4. Names (`names.rs`): entries naming nothing, the root or their own
//!    directory removed, wrong types and keys fixed, extra parents and
//!    cycles cut, detached directories and unreachable inodes moved to
//!    `lost+found` as `#INUM` (or reclaimed when unlinked), link counts
//!    recomputed. Flush.
//! 5. Every header slot gets the repaired state (one commit per slot),
//!    then the freemap becomes exactly what the repaired tree references
//!    (`Allocator::set_exact`) and a last commit writes it.
//!
//! Each repair is one `Action`, one line of fsck's output. `Mode::Preen`
//! makes only repairs that lose nothing and trust nothing a check code
//! did not verify; when anything else is needed it writes nothing and
//! says so (fsck exits 4, as e2fsck -p's "run fsck manually").

mod names;
mod older;
mod rewind;
mod space;
mod walk;

use crate::disk::{self, Blockref, BlockrefType, InodeData, VolumeHeader};
use crate::error::{Error, Result};
use crate::fsck;
use crate::inode::InodeNode;
use crate::mount::Mount;
use crate::volume::{header_slots, read_header_slot, HeaderSlot, Volume};
use bufcache::BlockDevice;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use rewind::{rewind_targets, RewindTarget};

/// How far a repair may go (fsck(8)'s `-p` and `-y`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Only repairs that lose nothing and rest on verified data: the
    /// freemap, statistics, link counts, header copies, key order, entry
    /// types and keys, unreachable inodes to `lost+found`.
    Preen,
    /// Everything, cutting what cannot be saved.
    Yes,
}

/// What to repair with.
#[derive(Clone, Debug)]
pub struct Options {
    pub mode: Mode,
    /// Rewind to this volume header copy (`--rewind=N`).
    pub rewind: Option<usize>,
    /// Time stamped on what the repair creates (`lost+found`),
    /// microseconds since the epoch.
    pub now: u64,
    /// Set to stop the repair at its next commit (`Error::Cancelled`);
    /// the image then holds the state that commit left.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Options {
    fn check_cancel(&self) -> Result<()> {
        match &self.cancel {
            Some(c) if c.load(Ordering::SeqCst) => Err(Error::Cancelled),
            _ => Ok(()),
        }
    }
}

/// One repair, printed as one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Action {
    pub at: Option<u64>,
    pub pfs: Option<String>,
    pub inum: Option<u64>,
    pub what: String,
    /// It removes or changes what a user sees (a cut, an entry removed,
    /// a block replaced by an older copy or kept without its check code,
    /// a rewind): `-y` only.
    pub lossy: bool,
    /// Bytes of file data it cut (holes), when known.
    pub lost_bytes: u64,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.pfs {
            write!(f, "PFS {p}")?;
            if let Some(i) = self.inum {
                write!(f, " inode {i}")?;
            }
            write!(f, ": ")?;
        } else if let Some(i) = self.inum {
            write!(f, "inode {i}: ")?;
        }
        write!(f, "{}", self.what)?;
        if let Some(at) = self.at {
            write!(f, " (at {at:#x})")?;
        }
        Ok(())
    }
}

/// What a rewind gave up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewind {
    /// The header copy the volume was at and its tid.
    pub from_slot: Option<usize>,
    pub from_tid: u64,
    /// The copy rewound to and its tid.
    pub to_slot: usize,
    pub to_tid: u64,
    /// The newest change time found in the tree rewound to (inode
    /// ctime/mtime, microseconds), the state's "as of".
    pub to_time: Option<i64>,
    /// Files and directories the newer tree changed (PFS:path, or
    /// PFS:#INUM where no path could be read), as far as it could be read.
    pub changed: Vec<String>,
    /// Whether the list is complete (the newer tree could be read).
    pub changed_complete: bool,
}

/// What a repair did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub actions: Vec<Action>,
    pub rewind: Option<Rewind>,
    /// Something was written.
    pub written: bool,
    /// Why nothing was written although damage was found (preen met a
    /// repair that loses data; nothing could be done).
    pub refused: Option<String>,
    /// The check after the repair (the one before, when nothing was
    /// written).
    pub after: fsck::Report,
}

impl Outcome {
    /// Bytes of file data the repair cut.
    pub fn lost_bytes(&self) -> u64 {
        self.actions.iter().map(|a| a.lost_bytes).sum()
    }
}

/// The log the phases write their actions to.
#[derive(Default)]
pub(crate) struct Log {
    pub actions: Vec<Action>,
}

impl Log {
    pub fn safe(&mut self, pfs: Option<&str>, inum: Option<u64>, at: Option<u64>, what: String) {
        self.push(pfs, inum, at, what, false, 0);
    }
    pub fn lossy(&mut self, pfs: Option<&str>, inum: Option<u64>, at: Option<u64>, what: String) {
        self.push(pfs, inum, at, what, true, 0);
    }
    pub fn push(
        &mut self,
        pfs: Option<&str>,
        inum: Option<u64>,
        at: Option<u64>,
        what: String,
        lossy: bool,
        lost_bytes: u64,
    ) {
        log::info!(
            "repair: {}{}",
            pfs.map(|p| format!("PFS {p}: ")).unwrap_or_default(),
            what
        );
        self.actions.push(Action {
            at,
            pfs: pfs.map(str::to_string),
            inum,
            what,
            lossy,
            lost_bytes,
        });
    }
    pub fn any_lossy(&self) -> bool {
        self.actions.iter().any(|a| a.lossy)
    }
}

/// Every header copy as found: (slot, header, CRCs good).
fn header_copies(dev: &dyn BlockDevice) -> Vec<(usize, VolumeHeader, bool)> {
    (0..header_slots(dev.size_bytes()))
        .filter_map(|i| match read_header_slot(dev, i) {
            HeaderSlot::Good(vh) => Some((i, *vh, true)),
            HeaderSlot::BadCrc(vh, _) => Some((i, *vh, false)),
            HeaderSlot::Invalid(_) => None,
        })
        .collect()
}

/// Repair the image on `dev`, which `before` (fsck's report of it) found
/// damaged. The caller holds the image's writer lock.
pub fn repair(dev: Arc<dyn BlockDevice>, before: fsck::Report, opts: &Options) -> Result<Outcome> {
    let copies = header_copies(dev.as_ref());
    let good: Vec<&(usize, VolumeHeader, bool)> = copies.iter().filter(|c| c.2).collect();
    let newest = good.iter().max_by_key(|c| c.1.mirror_tid).map(|c| c.0);
    let base_slot = match opts.rewind {
        Some(n) => {
            if !copies.iter().any(|c| c.0 == n) {
                return Err(Error::InvalidArgument {
                    what: format!("volume header copy {n} is not a HAMMER2 header"),
                });
            }
            n
        }
        None => match roll_forward(dev.clone(), &copies, newest) {
            Some(s) => s,
            // No copy has good CRCs: the newest whose tree verifies.
            None => rewind_targets(dev.clone(), &copies, None)
                .first()
                .map(|t| t.slot)
                .ok_or_else(|| {
                    Error::corrupt(
                        "no volume header copy has good CRCs, and none leads to a tree that \
                         verifies"
                            .into(),
                        0,
                    )
                })?,
        },
    };
    let mut log = Log::default();
    let mut rewound = None;
    // A newer copy with bad CRCs that could not be used: its flush is
    // lost, as by a rewind.
    if opts.rewind.is_none() {
        let base_tid = copies
            .iter()
            .find(|c| c.0 == base_slot)
            .map(|c| c.1.mirror_tid);
        let slots = copies
            .iter()
            .find(|c| c.0 == base_slot)
            .map_or(1, |c| disk::volhdr_count(c.1.volu_size) as u64);
        let lost = copies
            .iter()
            .filter(|c| {
                !c.2 && base_tid.is_some_and(|t| c.1.mirror_tid > t && c.1.mirror_tid <= t + slots)
            })
            .max_by_key(|c| c.1.mirror_tid);
        if let (Some(bad), Ok(t)) = (lost, rewind::verify_target(dev.clone(), &copies, base_slot)) {
            let r = rewind::describe(dev.clone(), &copies, Some(bad.0), &t);
            log.lossy(
                None,
                None,
                Some(disk::volhdr_offset(bad.0)),
                format!(
                    "volume header copy {} (tid {:#x}) has bad CRCs and its tree does not \
                     verify: {}",
                    bad.0,
                    bad.1.mirror_tid,
                    rewind::line(&r)
                ),
            );
            rewound = Some(r);
        }
    }
    // A header copy that is no HAMMER2 header at all (newfs writes every
    // copy, so it is damage) may have held a flush newer than the base's
    // (or an older state; nothing tells which). Going on from the base
    // gives that flush up, as a rewind does: said so.
    let nslots = copies.iter().find(|c| c.0 == base_slot).map_or(1, |c| {
        disk::volhdr_count(c.1.volu_size).min(header_slots(dev.size_bytes()))
    });
    let unreadable = (0..nslots).find(|i| *i != base_slot && !copies.iter().any(|c| c.0 == *i));
    if let (None, None, Some(gone)) = (opts.rewind, &rewound, unreadable) {
        // Reported whether or not the base's own tree verifies (the
        // repair goes on from it either way).
        let t = rewind::verify_target(dev.clone(), &copies, base_slot)
            .ok()
            .or_else(|| {
                copies
                    .iter()
                    .find(|c| c.0 == base_slot)
                    .map(|c| RewindTarget {
                        slot: base_slot,
                        tid: c.1.mirror_tid,
                        crc_good: c.2,
                        newest_time: None,
                        blocks: 0,
                    })
            });
        if let Some(t) = t {
            let r = Rewind {
                from_slot: Some(gone),
                ..rewind::describe(dev.clone(), &copies, Some(base_slot), &t)
            };
            log.lossy(
                None,
                None,
                Some(disk::volhdr_offset(gone)),
                format!(
                    "volume header copy {gone} is unreadable: a flush after copy {base_slot}'s \
                     (tid {:#x}) that it may have held is lost; the volume is as of copy \
                     {base_slot}",
                    t.tid
                ),
            );
            rewound = Some(r);
        }
    }
    let mut plan = match opts.rewind {
        Some(n) => {
            let t = rewind::verify_target(dev.clone(), &copies, n)?;
            let r = rewind::describe(dev.clone(), &copies, newest, &t);
            log.lossy(None, None, None, rewind::line(&r));
            rewound = Some(r);
            Plan::build(dev.clone(), &copies, n, opts)?
        }
        None => Plan::build(dev.clone(), &copies, base_slot, opts)?,
    };
    if !plan.fatal.is_empty() && opts.rewind.is_none() {
        let targets = rewind_targets(dev.clone(), &copies, Some(base_slot));
        if let Some(t) = targets.into_iter().next() {
            log::warn!(
                "repair: in place the repair would lose {}; rewinding to header copy {} \
                 (tid {:#x})",
                plan.fatal.join(", "),
                t.slot,
                t.tid
            );
            let r = rewind::describe(dev.clone(), &copies, newest, &t);
            log.lossy(None, None, None, rewind::line(&r));
            rewound = Some(r);
            plan = Plan::build(dev.clone(), &copies, t.slot, opts)?;
        }
    }
    log.actions.append(&mut plan.log.actions);
    let lossy = log.any_lossy();
    if opts.mode == Mode::Preen && lossy {
        let first = log
            .actions
            .iter()
            .find(|a| a.lossy)
            .map(|a| a.to_string())
            .unwrap_or_default();
        return Ok(Outcome {
            actions: log.actions,
            rewind: rewound,
            written: false,
            refused: Some(format!(
                "a repair that cuts or replaces data is needed ({first}); run fsck.hammer2 -y"
            )),
            after: before,
        });
    }
    let mut m = plan.mount;
    // Phase 3's changes.
    opts.check_cancel()?;
    m.commit()?;
    // Phase 4.
    opts.check_cancel()?;
    names::repair_names(&mut m, &mut log, opts)?;
    m.commit()?;
    // Phase 5: every slot, then the exact freemap.
    opts.check_cancel()?;
    space::settle(&mut m, &mut log)?;
    drop(m);
    let after = fsck::fsck(dev, fsck::Options::default())?;
    Ok(Outcome {
        actions: log.actions,
        rewind: rewound,
        written: true,
        refused: None,
        after,
    })
}

/// The copy to repair from when no rewind is asked for: a copy newer
/// than every copy with good CRCs whose own CRCs are bad but whose whole
/// tree verifies (the damage is in the header's unused bytes or its
/// freemap blockset, which the repair rebuilds) and whose geometry is the
/// good copies' is taken (its CRCs recomputed), so the last flush is not
/// lost; else the newest good copy.
fn roll_forward(
    dev: Arc<dyn BlockDevice>,
    copies: &[(usize, VolumeHeader, bool)],
    newest: Option<usize>,
) -> Option<usize> {
    let good = newest.and_then(|n| copies.iter().find(|c| c.0 == n))?;
    let same_geometry = |h: &VolumeHeader| {
        let g = &good.1;
        h.volu_size == g.volu_size
            && h.version == g.version
            && h.allocator_beg == g.allocator_beg
            && h.allocator_size == g.allocator_size
            && h.fsid == g.fsid
            && (h.boot_beg, h.boot_end, h.aux_beg, h.aux_end)
                == (g.boot_beg, g.boot_end, g.aux_beg, g.aux_end)
    };
    let slots = disk::volhdr_count(good.1.volu_size) as u64;
    let mut newer: Vec<&(usize, VolumeHeader, bool)> = copies
        .iter()
        .filter(|c| {
            !c.2 && c.1.mirror_tid > good.1.mirror_tid
                && c.1.mirror_tid <= good.1.mirror_tid + slots
                && same_geometry(&c.1)
        })
        .collect();
    newer.sort_by_key(|c| std::cmp::Reverse(c.1.mirror_tid));
    for c in newer {
        if rewind::verify_target(dev.clone(), copies, c.0).is_ok() {
            return Some(c.0);
        }
    }
    newest
}

/// What `fsck.hammer2 -y` would rewind to: `None` when the newest tree
/// can be repaired in place (or `before` is clean). Reads only.
pub fn would_rewind(dev: Arc<dyn BlockDevice>, before: &fsck::Report) -> Result<Option<Rewind>> {
    if before.is_clean() {
        return Ok(None);
    }
    let copies = header_copies(dev.as_ref());
    let newest = copies
        .iter()
        .filter(|c| c.2)
        .max_by_key(|c| c.1.mirror_tid)
        .map(|c| c.0);
    if let Some(base) = newest {
        let opts = Options {
            mode: Mode::Yes,
            rewind: None,
            now: 0,
            cancel: None,
        };
        let plan = Plan::build(dev.clone(), &copies, base, &opts)?;
        if plan.fatal.is_empty() {
            return Ok(None);
        }
    }
    Ok(rewind_targets(dev.clone(), &copies, newest)
        .first()
        .map(|t| rewind::describe(dev, &copies, newest, t)))
}

/// The line a rewind is reported as.
pub fn rewind_line(r: &Rewind) -> String {
    rewind::line(r)
}

/// A mount at the chosen header with phase 3's repairs made in memory.
struct Plan {
    mount: Mount,
    log: Log,
    /// What in-place repair could not save (a PFS, the super-root).
    fatal: Vec<String>,
}

impl Plan {
    fn build(
        dev: Arc<dyn BlockDevice>,
        copies: &[(usize, VolumeHeader, bool)],
        slot: usize,
        opts: &Options,
    ) -> Result<Plan> {
        let mut log = Log::default();
        let (_, header, crc_good) = copies
            .iter()
            .find(|c| c.0 == slot)
            .cloned()
            .ok_or_else(|| Error::corrupt(format!("no volume header at slot {slot}"), 0))?;
        let mut vh = header;
        let max_good = copies
            .iter()
            .filter(|c| c.2)
            .map(|c| c.1.mirror_tid)
            .max()
            .unwrap_or(0);
        vh.mirror_tid = vh.mirror_tid.max(max_good);
        if !crc_good {
            log.safe(
                None,
                None,
                Some(disk::volhdr_offset(slot)),
                format!("volume header copy {slot}: CRCs recomputed (its tree verifies)"),
            );
        }
        fix_header_fields(&mut vh, copies, dev.size_bytes(), &mut log, slot);
        let vol = Volume::at_header(dev.clone(), vh.clone(), slot);
        let (map, sets) = space::reachable(dev.as_ref(), copies);
        let alloc = crate::alloc::Allocator::rebuilt(&vh, &map, &sets)?;
        let mut older = older::Older::new(dev.clone(), copies, slot, vh.mirror_tid);
        let mut fatal = Vec::new();
        let sroot = match walk::super_root(&vol, &mut log) {
            Some(s) => s,
            None => {
                fatal.push("the super-root (every PFS)".to_string());
                // An empty super-root keeps the mount usable for the
                // report; a rewind replaces this plan.
                let mut d = InodeData::default();
                d.meta.obj_type = disk::ObjType::Directory;
                d.meta.pfs_type = disk::pfs_type::SUPROOT;
                let mut br = Blockref::EMPTY;
                br.btype = BlockrefType::Inode;
                let mut n = InodeNode::from_disk(br, d);
                n.dirty = true;
                n
            }
        };
        let mut mount = Mount::from_parts(vol, Box::new(alloc), sroot);
        if fatal.is_empty() {
            let mut w = walk::Walk::new(&mut older, &mut log);
            w.volume(&mut mount)?;
            fatal.extend(w.fatal);
            let max_tid = w.max_tid;
            let h = &mut mount.vol.header;
            h.mirror_tid = h.mirror_tid.max(max_tid);
        }
        // The header's other super-root slots hold nothing.
        let h = &mut mount.vol.header;
        for (i, br) in h.sroot_blockset.iter_mut().enumerate().skip(1) {
            if !br.is_empty() {
                *br = Blockref::EMPTY;
                log.safe(
                    None,
                    None,
                    Some(0x200),
                    format!("volume header sroot_blockset[{i}] cleared"),
                );
            }
        }
        let _ = opts;
        Ok(Plan { mount, log, fatal })
    }
}

/// The fields fsck checks in the header in use, taken from another copy
/// with good CRCs where one holds a sound value.
fn fix_header_fields(
    vh: &mut VolumeHeader,
    copies: &[(usize, VolumeHeader, bool)],
    dev_size: u64,
    log: &mut Log,
    slot: usize,
) {
    let at = Some(disk::volhdr_offset(slot));
    if vh.fstype != disk::uuid::FSTYPE_HAMMER2 {
        vh.fstype = disk::uuid::FSTYPE_HAMMER2;
        log.safe(
            None,
            None,
            at,
            "volume header fstype set to HAMMER2's".into(),
        );
    }
    if vh.version >= disk::VOL_VERSION_MULTI_VOLUMES && vh.nvolumes != 1 {
        vh.nvolumes = 1;
        log.safe(None, None, at, "volume header nvolumes set to 1".into());
    }
    let areas_ok = |h: &VolumeHeader| {
        h.boot_beg <= h.boot_end && h.boot_end <= h.aux_beg && h.aux_beg <= h.aux_end
    };
    if !areas_ok(vh) {
        if let Some(o) = copies.iter().find(|c| c.2 && c.0 != slot && areas_ok(&c.1)) {
            (vh.boot_beg, vh.boot_end, vh.aux_beg, vh.aux_end) =
                (o.1.boot_beg, o.1.boot_end, o.1.aux_beg, o.1.aux_end);
            log.safe(
                None,
                None,
                at,
                format!("volume header boot/aux areas taken from copy {}", o.0),
            );
        } else {
            // The four bounds in order (newfs lays the areas out one
            // after the other below allocator_beg).
            let mut b = [vh.boot_beg, vh.boot_end, vh.aux_beg, vh.aux_end];
            b.sort_unstable();
            if b[3] <= vh.allocator_beg {
                [vh.boot_beg, vh.boot_end, vh.aux_beg, vh.aux_end] = b;
                log.safe(
                    None,
                    None,
                    at,
                    "volume header boot/aux area bounds put back in order".into(),
                );
            }
        }
    }
    if vh.allocator_free > vh.allocator_size {
        // The rebuilt freemap's count replaces it at the next commit.
        log.safe(
            None,
            None,
            at,
            "volume header allocator_free recounted from the rebuilt freemap".into(),
        );
    }
    if vh.volu_size > dev_size {
        log::warn!(
            "volume size {} exceeds the device ({dev_size} bytes): not repaired",
            vh.volu_size
        );
    }
}
