//! The checker behind `fsck.hammer2`: every volume header copy, every
//! blockref of every PFS and of the freemap, every check code, key
//! ranges, types, the embedded statistics (`leaf_count`, `data_count`,
//! `inode_count`), the directory structure (dirent names against their
//! hash, dirents against inodes, link counts, entries naming the PFS
//! root or their own directory, directories with two parents or cut off
//! from the root in a cycle), whatever the reader would refuse behind
//! good check codes (`pfs::meta_damage`, node shapes, unknown
//! compression), and a cross-check of the freemap against the topology:
//! every block the tree references must be marked allocated. Orphans are
//! listed apart: they are not damage.
//!
//! The checker never stops at the first problem: it records each with
//! its image offset and the PFS, inode and path where known, skips what
//! lies beneath a damaged block, and goes on. It never writes.

use crate::blocktable::SetStats;
use crate::chain::{check_node, decode_set, DEPTH_MAX};
use crate::compress;
use crate::dirhash::dirhash;
use crate::disk::freemap::BMAP_ALLOCATED;
use crate::disk::{
    self, check_method, Blockref, BlockrefType, InodeData, ObjType, BLOCKREF_LEAF_MAX,
    DIRHASH_HIMASK, DIRHASH_VISIBLE, FREEMAP_BLOCK_SIZE, FREEMAP_LEVEL1_RADIX,
};
use crate::error::{Error, Result};
use crate::freemap::{self, FreemapLeaf};
use crate::pfs::{meta_damage, DIRENT_EMBEDDED_NAME_MAX, DIRENT_NAME_MAX};
use crate::volume::{header_slots, read_header_slot, HeaderSlot, Volume};
use bufcache::BlockDevice;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

/// DragonFly keeps the live entries of every blockref array in key
/// order (empty slots may sit between them) and its lookups depend on it.
fn in_key_order(set: &[Blockref]) -> bool {
    let keys: Vec<u64> = set
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| b.key)
        .collect();
    keys.windows(2).all(|w| w[0] < w[1])
}

/// One thing wrong with the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Image offset of the block concerned.
    pub at: Option<u64>,
    pub pfs: Option<String>,
    pub inum: Option<u64>,
    pub path: Option<String>,
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(at) = self.at {
            write!(f, "at {at:#014x}: ")?;
        }
        write!(f, "{}", self.what)?;
        if let Some(p) = &self.pfs {
            write!(f, " [pfs {p}")?;
            if let Some(i) = self.inum {
                write!(f, " inode {i}")?;
            }
            if let Some(path) = &self.path {
                write!(f, " path /{path}")?;
            }
            write!(f, "]")?;
        }
        Ok(())
    }
}

/// Counts of what was checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub headers_good: usize,
    pub headers_total: usize,
    pub inode: u64,
    pub indirect: u64,
    pub data: u64,
    pub dirent: u64,
    pub freemap_node: u64,
    pub freemap_leaf: u64,
    /// Physical bytes of every block visited (shared blocks counted once
    /// per reference, as DragonFly's fsck does).
    pub bytes: u64,
    pub pfs: u64,
}

impl Stats {
    pub fn blockrefs(&self) -> u64 {
        self.inode + self.indirect + self.data + self.dirent + self.freemap_node + self.freemap_leaf
    }
}

/// Progress, for long runs: blockrefs visited and bytes checked so far,
/// against the bytes in use (allocator_size - allocator_free).
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub blockrefs: u64,
    pub bytes: u64,
    pub bytes_in_use: u64,
}

#[derive(Default)]
pub struct Options<'a> {
    /// Called every few thousand blockrefs.
    pub progress: Option<&'a mut dyn FnMut(Progress)>,
    /// Log each PFS and inode checked (at info level).
    pub verbose: bool,
}

/// An inode in no directory. One with nlinks 0 was unlinked while open
/// and left by a crash: a read-write mount of its PFS removes it. One
/// with links lost its entry otherwise (DragonFly's `hammer2 destroy`,
/// or damage) and stays until removed by hand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Orphan {
    pub pfs: String,
    pub inum: u64,
    pub nlinks: u64,
}

/// What fsck found.
#[derive(Debug, Default)]
pub struct Report {
    pub problems: Vec<Problem>,
    /// Things worth knowing that are not damage: orphaned inodes (space
    /// lost until removed), as DragonFly leaves after a crash or destroy.
    pub warnings: Vec<Problem>,
    /// The orphaned inodes of those warnings, in PFS and inode order.
    pub orphans: Vec<Orphan>,
    pub stats: Stats,
    /// The header copy in use, and its mirror_tid.
    pub header_index: Option<usize>,
    pub mirror_tid: u64,
    pub version: u32,
    /// PFS labels found, in key order.
    pub pfs_labels: Vec<String>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Check the image on `dev`. `Err` only when the device cannot be read
/// at all, or holds no HAMMER2 volume (no header copy has the magic: an
/// image of something else, or nothing); damage of any kind is reported
/// in `Report::problems`.
pub fn fsck(dev: Arc<dyn BlockDevice>, opts: Options<'_>) -> Result<Report> {
    let mut report = Report::default();
    let size = dev.size_bytes();
    if header_slots(size) == 0 {
        return Err(Error::corrupt(
            format!("not a HAMMER2 filesystem: {size} bytes hold no volume header"),
            0,
        ));
    }
    // A device that cannot be read at its start is an operational error.
    let mut probe = [0u8; 512];
    dev.read_at(&mut probe, 0).map_err(|source| Error::Io {
        op: "read",
        at: 0,
        source,
    })?;

    if !check_header_copies(dev.as_ref(), &mut report) {
        return Err(Error::corrupt(
            format!(
                "not a HAMMER2 filesystem: no volume header copy has the HAMMER2 magic \
                 ({size} bytes)"
            ),
            0,
        ));
    }
    let vol = match Volume::open(dev) {
        Ok(v) => v,
        Err(e) => {
            report.problems.push(Problem {
                at: e.offset(),
                pfs: None,
                inum: None,
                path: None,
                what: format!("cannot open the volume: {e}"),
            });
            return Ok(report);
        }
    };
    report.header_index = Some(vol.header_index);
    report.mirror_tid = vol.header.mirror_tid;
    report.version = vol.header.version;
    check_header_fields(&vol, size, &mut report);

    let mut checker = Checker {
        vol: &vol,
        report: &mut report,
        refs: Vec::new(),
        progress: opts.progress,
        verbose: opts.verbose,
        last_progress: 0,
        bytes_in_use: vol
            .header
            .allocator_size
            .saturating_sub(vol.header.allocator_free),
    };
    checker.walk_super_root();
    let leaves = checker.walk_freemap();
    checker.cross_check_freemap(&leaves);
    Ok(report)
}

/// Report the damaged header copies. False when no copy is HAMMER2's at
/// all (none decodes with the magic, CRCs aside).
fn check_header_copies(dev: &dyn BlockDevice, report: &mut Report) -> bool {
    let n = header_slots(dev.size_bytes());
    report.stats.headers_total = n;
    // The copies that should exist depend on the volume size, which the
    // first good copy tells.
    let slots: Vec<HeaderSlot> = (0..n).map(|i| read_header_slot(dev, i)).collect();
    let volu_size = slots
        .iter()
        .find_map(|s| match s {
            HeaderSlot::Good(vh) => Some(vh.volu_size),
            _ => None,
        })
        .unwrap_or(dev.size_bytes());
    let expected = disk::volhdr_count(volu_size).min(n);
    for (i, slot) in slots.iter().enumerate() {
        let at = disk::volhdr_offset(i);
        match slot {
            HeaderSlot::Good(_) => report.stats.headers_good += 1,
            HeaderSlot::BadCrc(_, c) => {
                let mut bad = Vec::new();
                for (name, (stored, computed)) in [
                    ("sector 0", c.sect0),
                    ("sector 1 (super-root blockset)", c.sect1),
                    ("whole header", c.volheader),
                ] {
                    if stored != computed {
                        bad.push(format!(
                            "{name} stored {stored:08x} computed {computed:08x}"
                        ));
                    }
                }
                report.problems.push(Problem {
                    at: Some(at),
                    pfs: None,
                    inum: None,
                    path: None,
                    what: format!("volume header copy {i}: bad CRC: {}", bad.join(", ")),
                });
            }
            HeaderSlot::Invalid(why) if i < expected => report.problems.push(Problem {
                at: Some(at),
                pfs: None,
                inum: None,
                path: None,
                what: format!("volume header copy {i}: {why}"),
            }),
            HeaderSlot::Invalid(_) => {}
        }
    }
    slots.iter().any(|s| !matches!(s, HeaderSlot::Invalid(_)))
}

fn check_header_fields(vol: &Volume, dev_size: u64, report: &mut Report) {
    let vh = &vol.header;
    let at = Some(disk::volhdr_offset(vol.header_index));
    let mut bad = |what: String| {
        report.problems.push(Problem {
            at,
            pfs: None,
            inum: None,
            path: None,
            what,
        })
    };
    if vh.fstype != disk::uuid::FSTYPE_HAMMER2 {
        bad(format!(
            "volume header fstype {} is not HAMMER2's",
            vh.fstype
        ));
    }
    if vh.volu_size > dev_size {
        bad(format!(
            "volume size {} exceeds the device size {dev_size}",
            vh.volu_size
        ));
    }
    if !(vh.boot_beg <= vh.boot_end && vh.boot_end <= vh.aux_beg && vh.aux_beg <= vh.aux_end) {
        bad(format!(
            "boot/aux areas out of order: boot {:#x}..{:#x} aux {:#x}..{:#x}",
            vh.boot_beg, vh.boot_end, vh.aux_beg, vh.aux_end
        ));
    }
    if vh.allocator_beg > vh.volu_size || vh.allocator_free > vh.allocator_size {
        bad(format!(
            "allocator fields out of range: beg {:#x} size {} free {}",
            vh.allocator_beg, vh.allocator_size, vh.allocator_free
        ));
    }
    if vh.version >= disk::VOL_VERSION_MULTI_VOLUMES && vh.nvolumes != 1 {
        bad(format!(
            "version {} header with nvolumes {}",
            vh.version, vh.nvolumes
        ));
    }
}

/// Where a blockref set sits, for the checks that depend on it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Owner {
    SuperRoot,
    /// A PFS root's tree: the inode index and the root directory.
    PfsRoot,
    Directory,
    File,
    /// Inodes that should have no children (devices, fifos, ...).
    Other,
}

/// What a PFS walk gathers for its cross-checks.
#[derive(Default)]
struct PfsState {
    label: String,
    /// inum -> (type, nlinks, image offset of the inode)
    inodes: HashMap<u64, (ObjType, u64, u64)>,
    /// (directory inum, name, target inum, type, image offset of the bref)
    dirents: Vec<(u64, Vec<u8>, u64, ObjType, u64)>,
    /// problems found in this PFS, paths filled in at the end
    problems: Vec<Problem>,
}

struct Checker<'a, 'p> {
    vol: &'a Volume,
    report: &'a mut Report,
    /// Every referenced block: (offset, bytes, mirror_tid).
    refs: Vec<(u64, u64, u64)>,
    progress: Option<&'p mut dyn FnMut(Progress)>,
    verbose: bool,
    last_progress: u64,
    bytes_in_use: u64,
}

impl Checker<'_, '_> {
    fn problem(
        &mut self,
        pfs: Option<&mut PfsState>,
        at: Option<u64>,
        inum: Option<u64>,
        what: String,
    ) {
        match pfs {
            Some(p) => p.problems.push(Problem {
                at,
                pfs: Some(p.label.clone()),
                inum,
                path: None,
                what,
            }),
            None => self.report.problems.push(Problem {
                at,
                pfs: None,
                inum,
                path: None,
                what,
            }),
        }
    }

    fn count(&mut self, br: &Blockref) {
        let s = &mut self.report.stats;
        match br.btype {
            BlockrefType::Inode => s.inode += 1,
            BlockrefType::Indirect => s.indirect += 1,
            BlockrefType::Data => s.data += 1,
            BlockrefType::Dirent => s.dirent += 1,
            BlockrefType::FreemapNode => s.freemap_node += 1,
            BlockrefType::FreemapLeaf => s.freemap_leaf += 1,
            _ => {}
        }
        s.bytes += br.data_off.bytes();
        let n = s.blockrefs();
        if n - self.last_progress >= 4096 {
            self.last_progress = n;
            let p = Progress {
                blockrefs: n,
                bytes: s.bytes,
                bytes_in_use: self.bytes_in_use,
            };
            if let Some(cb) = self.progress.as_mut() {
                cb(p);
            }
        }
    }

    /// Read a block and verify its check code; a failure is recorded.
    fn read(
        &mut self,
        pfs: Option<&mut PfsState>,
        inum: Option<u64>,
        br: &Blockref,
    ) -> Option<Vec<u8>> {
        match self.vol.read_physical(br) {
            Ok(b) => Some(b),
            Err(e) => {
                let what = format!("{} blockref key {:#x}: {e}", br.btype.name(), br.key);
                self.problem(pfs, Some(br.data_off.offset()), inum, what);
                None
            }
        }
    }

    fn walk_super_root(&mut self) {
        let sroot_br = self.vol.header.sroot_blockset[0];
        if sroot_br.btype != BlockrefType::Inode {
            self.problem(
                None,
                Some(0x200),
                None,
                format!("super-root blockref has type {}", sroot_br.btype.name()),
            );
            return;
        }
        for (i, br) in self.vol.header.sroot_blockset.iter().enumerate().skip(1) {
            if !br.is_empty() {
                self.problem(
                    None,
                    Some(0x200),
                    None,
                    format!("volume header sroot_blockset[{i}] is not empty"),
                );
            }
        }
        self.note_ref(&sroot_br);
        self.count(&sroot_br);
        let vol_tid = self.vol.header.mirror_tid;
        if sroot_br.mirror_tid > vol_tid {
            self.problem(
                None,
                Some(sroot_br.data_off.offset()),
                Some(0),
                format!(
                    "super-root mirror_tid {:#x} is newer than the volume's {vol_tid:#x}",
                    sroot_br.mirror_tid
                ),
            );
        }
        let Some(buf) = self.read(None, Some(0), &sroot_br) else {
            return;
        };
        let sroot = match InodeData::decode(&buf, sroot_br.data_off.offset()) {
            Ok(i) => i,
            Err(e) => {
                self.problem(None, e.offset(), Some(0), e.to_string());
                return;
            }
        };
        if sroot.meta.pfs_type & 15 != disk::pfs_type::SUPROOT {
            self.problem(
                None,
                Some(sroot_br.data_off.offset()),
                Some(0),
                format!("super-root has pfs_type {:#x}", sroot.meta.pfs_type),
            );
        }
        if sroot.meta.has_direct_data() {
            self.problem(
                None,
                Some(sroot_br.data_off.offset()),
                Some(0),
                "super-root has direct data".into(),
            );
            return;
        }
        let set = sroot.blockset();
        // The super-root blockref's statistics are not compared: newfs
        // writes them as zero and the kernel counts on from there.
        self.walk_set(None, Owner::SuperRoot, 0, &sroot_br, &set, 0);
    }

    fn note_ref(&mut self, br: &Blockref) {
        let bytes = br.data_off.bytes();
        let within = br.data_off.offset() % disk::LBUFSIZE;
        if bytes > 0
            && (if bytes >= disk::LBUFSIZE {
                within != 0
            } else {
                within + bytes > disk::LBUFSIZE
            })
        {
            // DragonFly's allocator packs blocks under 16 KiB inside one
            // 16 KiB chunk and places larger ones on 16 KiB boundaries;
            // its I/O layer (and its fsck) read in those units.
            let what = format!(
                "{} block of {bytes} bytes straddles a 16 KiB boundary",
                br.btype.name()
            );
            self.problem(None, Some(br.data_off.offset()), None, what);
        }
        if br.data_off.bytes() > 0 {
            self.refs
                .push((br.data_off.offset(), br.data_off.bytes(), br.mirror_tid));
        }
    }

    fn check_stats(
        &mut self,
        pfs: Option<&mut PfsState>,
        inum: Option<u64>,
        br: &Blockref,
        got: Option<SetStats>,
    ) {
        let Some(got) = got else { return };
        let mut what = Vec::new();
        // leaf_count is a hint for collapsing indirect blocks. DragonFly
        // stops counting at the maximum, and a snapshot's root starts it
        // afresh, so neither is held against the image.
        let leaf_count_exact =
            br.leaf_count != BLOCKREF_LEAF_MAX && br.flags & disk::BREF_FLAG_PFSROOT == 0;
        if leaf_count_exact && br.leaf_count != got.leaf_count_saturated() {
            what.push(format!(
                "leaf_count {} (the tree below has {})",
                br.leaf_count,
                got.leaf_count_saturated()
            ));
        }
        if matches!(br.btype, BlockrefType::Inode | BlockrefType::Indirect) {
            if br.data_count() != got.data_count {
                what.push(format!(
                    "data_count {} (the tree below has {})",
                    br.data_count(),
                    got.data_count
                ));
            }
            if br.inode_count() != got.inode_count {
                what.push(format!(
                    "inode_count {} (the tree below has {})",
                    br.inode_count(),
                    got.inode_count
                ));
            }
        }
        if !what.is_empty() {
            let what = format!(
                "{} blockref key {:#x}: {}",
                br.btype.name(),
                br.key,
                what.join(", ")
            );
            self.problem(pfs, Some(br.data_off.offset()), inum, what);
        }
    }

    /// Check every blockref in `set`, which belongs to `parent` (an
    /// inode or indirect blockref) owned by inode `inum`. Returns the
    /// statistics the set adds up to, or `None` when part of it could
    /// not be read (the parent's counts are then not compared).
    fn walk_set(
        &mut self,
        mut pfs: Option<&mut PfsState>,
        owner: Owner,
        inum: u64,
        parent: &Blockref,
        set: &[Blockref],
        depth: usize,
    ) -> Option<SetStats> {
        let mut stats = SetStats::default();
        let mut complete = true;
        let (lo, hi) = if parent.btype == BlockrefType::Indirect {
            (parent.key, parent.key_end())
        } else {
            (0, u64::MAX)
        };
        if !in_key_order(set) {
            let what = format!(
                "blockrefs under {} key {:#x} are not in key order",
                parent.btype.name(),
                parent.key
            );
            self.problem(
                pfs.as_deref_mut(),
                Some(parent.data_off.offset()),
                Some(inum),
                what,
            );
        }
        let mut sorted: Vec<&Blockref> = set.iter().filter(|b| !b.is_empty()).collect();
        sorted.sort_by_key(|b| b.key);
        let mut prev_end: Option<u64> = None;
        for br in sorted {
            let at = Some(br.data_off.offset());
            self.count(br);
            self.note_ref(br);
            stats.add_child(br);
            if br.key < lo || br.key_end() > hi {
                let what = format!(
                    "{} blockref key {:#x}/{} lies outside its parent's range {lo:#x}..{hi:#x}",
                    br.btype.name(),
                    br.key,
                    br.keybits
                );
                self.problem(pfs.as_deref_mut(), at, Some(inum), what);
                complete = false;
                continue;
            }
            // Siblings never overlap; one that does is not followed, so a
            // damaged image cannot make the walk revisit blocks.
            if prev_end.is_some_and(|e| br.key <= e) {
                let what = format!(
                    "{} blockref key {:#x}/{} overlaps its sibling",
                    br.btype.name(),
                    br.key,
                    br.keybits
                );
                self.problem(pfs.as_deref_mut(), at, Some(inum), what);
                complete = false;
                continue;
            }
            prev_end = Some(br.key_end());
            if br.mirror_tid > parent.mirror_tid && parent.btype != BlockrefType::Volume {
                let what = format!(
                    "{} blockref key {:#x} has mirror_tid {:#x} newer than its parent's {:#x}",
                    br.btype.name(),
                    br.key,
                    br.mirror_tid,
                    parent.mirror_tid
                );
                self.problem(pfs.as_deref_mut(), at, Some(inum), what);
            }
            let ok = match br.btype {
                BlockrefType::Indirect => {
                    if depth >= DEPTH_MAX {
                        self.problem(
                            pfs.as_deref_mut(),
                            at,
                            Some(inum),
                            "indirect blocks nested too deep".into(),
                        );
                        false
                    } else if let Err(e) = check_node(br) {
                        self.problem(pfs.as_deref_mut(), at, Some(inum), e.to_string());
                        false
                    } else if br.keybits >= parent.keybits && parent.btype == BlockrefType::Indirect
                    {
                        let what = format!(
                            "indirect blockref keybits {} not below its parent's {}",
                            br.keybits, parent.keybits
                        );
                        self.problem(pfs.as_deref_mut(), at, Some(inum), what);
                        false
                    } else {
                        match self.read(pfs.as_deref_mut(), Some(inum), br) {
                            Some(buf) => {
                                let children = decode_set(&buf);
                                let sub = self.walk_set(
                                    pfs.as_deref_mut(),
                                    owner,
                                    inum,
                                    br,
                                    &children,
                                    depth + 1,
                                );
                                self.check_stats(pfs.as_deref_mut(), Some(inum), br, sub);
                                true
                            }
                            None => false,
                        }
                    }
                }
                BlockrefType::Inode => match owner {
                    Owner::SuperRoot => {
                        self.walk_pfs_root(br);
                        true
                    }
                    Owner::PfsRoot => match pfs.as_deref_mut() {
                        Some(p) => self.walk_inode(p, br, depth),
                        None => false,
                    },
                    _ => {
                        let what = format!(
                            "inode blockref key {:#x} inside inode {inum}'s tree",
                            br.key
                        );
                        self.problem(pfs.as_deref_mut(), at, Some(inum), what);
                        false
                    }
                },
                BlockrefType::Dirent => match (owner, pfs.as_deref_mut()) {
                    (Owner::PfsRoot | Owner::Directory, Some(p)) => self.check_dirent(p, inum, br),
                    (_, p) => {
                        let what =
                            format!("dirent blockref key {:#x} inside a non-directory", br.key);
                        self.problem(p, at, Some(inum), what);
                        false
                    }
                },
                BlockrefType::Data => match owner {
                    Owner::File => self.check_data(pfs.as_deref_mut(), inum, br),
                    _ => {
                        let what =
                            format!("data blockref key {:#x} inside a non-file inode", br.key);
                        self.problem(pfs.as_deref_mut(), at, Some(inum), what);
                        false
                    }
                },
                other => {
                    let what = format!(
                        "unexpected {} blockref (type {}) in an inode tree",
                        other.name(),
                        other.to_u8()
                    );
                    self.problem(pfs.as_deref_mut(), at, Some(inum), what);
                    false
                }
            };
            complete &= ok;
        }
        complete.then_some(stats)
    }

    fn walk_pfs_root(&mut self, br: &Blockref) {
        let at = Some(br.data_off.offset());
        let Some(buf) = self.read(None, Some(1), br) else {
            return;
        };
        let ino = match InodeData::decode(&buf, br.data_off.offset()) {
            Ok(i) => i,
            Err(e) => {
                self.problem(None, at, None, e.to_string());
                return;
            }
        };
        let label = String::from_utf8_lossy(ino.name()).into_owned();
        self.report.stats.pfs += 1;
        self.report.pfs_labels.push(label.clone());
        if self.verbose {
            log::info!(
                "checking PFS {label} ({}{})",
                disk::pfs_type::name(ino.meta.pfs_type),
                if ino.meta.pfs_subtype != 0 {
                    " snapshot"
                } else {
                    ""
                }
            );
        }
        let mut state = PfsState {
            label: label.clone(),
            ..PfsState::default()
        };
        if !ino.meta.is_pfs_root() || br.flags & disk::BREF_FLAG_PFSROOT == 0 {
            self.problem(
                Some(&mut state),
                at,
                Some(1),
                "PFS root lacks the PFSROOT flag".into(),
            );
        }
        if (br.key & DIRHASH_HIMASK) != (dirhash(ino.name()) & DIRHASH_HIMASK) {
            let what = format!(
                "PFS root key {:#x} does not match the hash of its label",
                br.key
            );
            self.problem(Some(&mut state), at, Some(1), what);
        }
        if ino.meta.inum != 1 {
            let what = format!("PFS root has inum {}", ino.meta.inum);
            self.problem(Some(&mut state), at, Some(1), what);
        }
        if ino.meta.obj_type != ObjType::Directory {
            let what = format!("PFS root has type {}", ino.meta.obj_type.name());
            self.problem(Some(&mut state), at, Some(1), what);
        }
        self.check_inode_meta(&mut state, br, &ino);
        state.inodes.insert(
            1,
            (ino.meta.obj_type, ino.meta.nlinks, br.data_off.offset()),
        );
        if !ino.meta.has_direct_data() {
            let set = ino.blockset();
            let stats = self.walk_set(Some(&mut state), Owner::PfsRoot, 1, br, &set, 0);
            self.check_stats(Some(&mut state), Some(1), br, stats);
        }
        // New inodes take the number after `pfs_inum`: one behind an
        // inode in use would take its number (the write path refuses).
        let max = state.inodes.keys().copied().max().unwrap_or(0);
        if ino.meta.pfs_inum < max {
            let what = format!(
                "PFS inode counter pfs_inum {} is behind inode {max}, which is in use",
                ino.meta.pfs_inum
            );
            self.problem(Some(&mut state), at, Some(1), what);
        }
        self.cross_check_pfs(state);
    }

    fn check_inode_meta(&mut self, pfs: &mut PfsState, br: &Blockref, ino: &InodeData) {
        let at = Some(br.data_off.offset());
        let inum = Some(ino.meta.inum);
        let m = &ino.meta;
        if matches!(m.obj_type, ObjType::Invalid(_) | ObjType::Unknown) {
            self.problem(
                Some(pfs),
                at,
                inum,
                format!("inode has invalid type {}", m.obj_type.to_u8()),
            );
        }
        if let Some(why) = meta_damage(m) {
            self.problem(Some(pfs), at, inum, format!("inode: {why}"));
        }
        if br.data_off.bytes() != disk::INODE_BYTES as u64 {
            let what = format!(
                "inode blockref key {:#x} points at a block of {} bytes",
                br.key,
                br.data_off.bytes()
            );
            self.problem(Some(pfs), at, inum, what);
        }
        if m.name_len as usize > disk::INODE_MAXNAME {
            self.problem(
                Some(pfs),
                at,
                inum,
                format!("inode name_len {}", m.name_len),
            );
        }
        let check = disk::dec_algo(m.check_algo);
        if !check_method::is_known(check) {
            self.problem(
                Some(pfs),
                at,
                inum,
                format!("inode check_algo {:#x} is unknown", m.check_algo),
            );
        }
        if !disk::comp_method::is_known(disk::dec_algo(m.comp_algo)) {
            self.problem(
                Some(pfs),
                at,
                inum,
                format!("inode comp_algo {:#x} is unknown", m.comp_algo),
            );
        }
    }

    fn walk_inode(&mut self, pfs: &mut PfsState, br: &Blockref, depth: usize) -> bool {
        let at = Some(br.data_off.offset());
        let Some(buf) = self.read(Some(pfs), Some(br.key), br) else {
            return false;
        };
        let ino = match InodeData::decode(&buf, br.data_off.offset()) {
            Ok(i) => i,
            Err(e) => {
                self.problem(Some(pfs), at, Some(br.key), e.to_string());
                return false;
            }
        };
        let inum = ino.meta.inum;
        if br.key != inum || br.key & DIRHASH_VISIBLE != 0 {
            self.problem(
                Some(pfs),
                at,
                Some(inum),
                format!("inode index key {:#x} holds inode {inum}", br.key),
            );
        }
        if pfs
            .inodes
            .insert(
                inum,
                (ino.meta.obj_type, ino.meta.nlinks, br.data_off.offset()),
            )
            .is_some()
        {
            self.problem(
                Some(pfs),
                at,
                Some(inum),
                format!("inode {inum} appears twice in the index"),
            );
        }
        self.check_inode_meta(pfs, br, &ino);
        if self.verbose {
            log::debug!(
                "inode {inum} {} size {}",
                ino.meta.obj_type.name(),
                ino.meta.size
            );
        }
        if ino.meta.has_direct_data() {
            return true;
        }
        let owner = match ino.meta.obj_type {
            ObjType::Directory => Owner::Directory,
            ObjType::Regfile | ObjType::Softlink => Owner::File,
            _ => Owner::Other,
        };
        let set = ino.blockset();
        if owner == Owner::File {
            // No data may lie past the end of the file.
            let size = ino.meta.size;
            for b in set.iter().filter(|b| !b.is_empty()) {
                if b.btype == BlockrefType::Data && b.key >= size {
                    let what = format!(
                        "data block at file offset {:#x} lies past the file size {size}",
                        b.key
                    );
                    self.problem(Some(pfs), Some(b.data_off.offset()), Some(inum), what);
                }
            }
        }
        let stats = self.walk_set(Some(pfs), owner, inum, br, &set, depth + 1);
        self.check_stats(Some(pfs), Some(inum), br, stats);
        true
    }

    fn check_dirent(&mut self, pfs: &mut PfsState, dir: u64, br: &Blockref) -> bool {
        let at = Some(br.data_off.offset());
        let d = br.dirent();
        let namlen = d.namlen as usize;
        if br.key & DIRHASH_VISIBLE == 0 {
            self.problem(
                Some(pfs),
                at,
                Some(dir),
                format!("dirent key {:#x} lacks the visible bit", br.key),
            );
        }
        if namlen == 0 || namlen > DIRENT_NAME_MAX {
            self.problem(
                Some(pfs),
                at,
                Some(dir),
                format!("dirent key {:#x} has name length {namlen}", br.key),
            );
            return false;
        }
        let name = if namlen <= DIRENT_EMBEDDED_NAME_MAX {
            if !br.data_off.is_empty() {
                let what = format!(
                    "dirent key {:#x} with an embedded name also references a block",
                    br.key
                );
                self.problem(Some(pfs), at, Some(dir), what);
            }
            br.check[..namlen].to_vec()
        } else {
            let Some(buf) = self.read(Some(pfs), Some(dir), br) else {
                return false;
            };
            if buf.len() < namlen {
                let what = format!(
                    "dirent name block of {} bytes for a {namlen}-byte name",
                    buf.len()
                );
                self.problem(Some(pfs), at, Some(dir), what);
                return false;
            }
            buf[..namlen].to_vec()
        };
        if (br.key & DIRHASH_HIMASK) != (dirhash(&name) & DIRHASH_HIMASK) {
            let what = format!(
                "dirent \"{}\" key {:#x} does not match its name hash {:#x}",
                String::from_utf8_lossy(&name),
                br.key,
                dirhash(&name)
            );
            self.problem(Some(pfs), at, Some(dir), what);
        }
        pfs.dirents.push((
            dir,
            name,
            d.inum,
            ObjType::from_u8(d.obj_type),
            br.data_off.offset(),
        ));
        true
    }

    fn check_data(&mut self, pfs: Option<&mut PfsState>, inum: u64, br: &Blockref) -> bool {
        let at = Some(br.data_off.offset());
        let mut pfs = pfs;
        if br.keybits != disk::DATA_BLOCK_RADIX || br.key & (disk::DATA_BLOCK_BYTES - 1) != 0 {
            let what = format!(
                "data blockref key {:#x}/{} is not a 64 KiB block",
                br.key, br.keybits
            );
            self.problem(pfs.as_deref_mut(), at, Some(inum), what);
        }
        let Some(phys) = self.read(pfs.as_deref_mut(), Some(inum), br) else {
            return false;
        };
        let comp = br.comp_method();
        // Every method but the two that store the bytes as they are is
        // decompressed, so an unknown one is reported as the read path
        // would refuse it.
        if !matches!(comp, disk::comp_method::NONE | disk::comp_method::AUTOZERO) {
            if let Err(e) = compress::decompress(
                comp,
                &phys,
                disk::DATA_BLOCK_BYTES as usize,
                br.data_off.offset(),
            ) {
                self.problem(
                    pfs,
                    at,
                    Some(inum),
                    format!("data at file offset {:#x}: {e}", br.key),
                );
                return false;
            }
        }
        true
    }

    /// Dirents against inodes: every dirent names an inode of its type
    /// (never the PFS root, never its own directory), every directory
    /// has one parent and reaches the root through its parents, every
    /// inode but the root is named, and link counts agree.
    fn cross_check_pfs(&mut self, mut st: PfsState) {
        let label = st.label.clone();
        let problem = |at: u64, inum: u64, what: String| Problem {
            at: Some(at),
            pfs: Some(label.clone()),
            inum: Some(inum),
            path: None,
            what,
        };
        let mut names: HashMap<u64, u64> = HashMap::new();
        let mut parent: HashMap<u64, (u64, Vec<u8>)> = HashMap::new();
        // Directory -> the directories naming it.
        let mut dir_parents: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        let mut found = Vec::new();
        for (dir, name, target, otype, at) in &st.dirents {
            let shown = String::from_utf8_lossy(name);
            *names.entry(*target).or_default() += 1;
            if *target == 1 {
                found.push(problem(
                    *at,
                    *dir,
                    format!("dirent \"{shown}\" names the PFS root"),
                ));
                continue;
            }
            if target == dir {
                found.push(problem(
                    *at,
                    *dir,
                    format!("dirent \"{shown}\" names its own directory"),
                ));
                continue;
            }
            parent.entry(*target).or_insert((*dir, name.clone()));
            match st.inodes.get(target) {
                None => found.push(problem(
                    *at,
                    *dir,
                    format!("dirent \"{shown}\" names inode {target}, which does not exist"),
                )),
                Some((t, _, _)) => {
                    if t != otype {
                        found.push(problem(
                            *at,
                            *dir,
                            format!(
                                "dirent \"{shown}\" says type {} but inode {target} is {}",
                                otype.name(),
                                t.name()
                            ),
                        ));
                    }
                    if *t == ObjType::Directory {
                        dir_parents.entry(*target).or_default().push(*dir);
                    }
                }
            }
        }
        for (d, parents) in &dir_parents {
            if parents.len() > 1 {
                let at = st.inodes.get(d).map_or(0, |i| i.2);
                let list: Vec<String> = parents.iter().map(|p| p.to_string()).collect();
                found.push(problem(
                    at,
                    *d,
                    format!(
                        "directory inode {d} has {} parents (entries in directories {})",
                        parents.len(),
                        list.join(", ")
                    ),
                ));
            }
        }
        // Each directory must reach the root through its (first) parent;
        // a chain that comes back on itself is a cycle cut off from it.
        let mut reaches_root: HashMap<u64, bool> = HashMap::new();
        for &d in dir_parents.keys() {
            let mut chain = Vec::new();
            let mut on_chain = HashSet::new();
            let mut cur = d;
            let ok = loop {
                if cur == 1 {
                    break true;
                }
                if let Some(&known) = reaches_root.get(&cur) {
                    break known;
                }
                if !on_chain.insert(cur) {
                    break false;
                }
                chain.push(cur);
                match dir_parents.get(&cur).and_then(|p| p.first()) {
                    Some(&p) => cur = p,
                    // Not named by any directory: an orphan, below.
                    None => break true,
                }
            };
            for c in chain {
                reaches_root.insert(c, ok);
            }
        }
        for (&d, &ok) in &reaches_root {
            if !ok {
                let at = st.inodes.get(&d).map_or(0, |i| i.2);
                found.push(problem(
                    at,
                    d,
                    format!(
                        "directory inode {d} does not reach the root: its parents form a cycle"
                    ),
                ));
            }
        }
        let mut orphans: Vec<(u64, ObjType, u64, u64)> = Vec::new();
        for (inum, (t, nlinks, at)) in &st.inodes {
            if *inum == 1 {
                continue;
            }
            let n = names.get(inum).copied().unwrap_or(0);
            if n == 0 {
                orphans.push((*inum, *t, *nlinks, *at));
            } else if *nlinks == 0 {
                found.push(problem(
                    *at,
                    *inum,
                    format!("inode {inum} has nlinks 0 but {n} directory entries"),
                ));
            } else if *t != ObjType::Directory && *nlinks != n {
                found.push(problem(
                    *at,
                    *inum,
                    format!("inode {inum} has nlinks {nlinks} but {n} directory entries"),
                ));
            }
        }
        orphans.sort_unstable_by_key(|o| o.0);
        for (inum, t, nlinks, at) in orphans {
            let fate = if nlinks == 0 {
                "unlinked while open; removed at the next read-write mount of the PFS"
            } else {
                "its entry was removed without it (hammer2 destroy, or damage)"
            };
            self.report.warnings.push(Problem {
                at: Some(at),
                pfs: Some(st.label.clone()),
                inum: Some(inum),
                path: None,
                what: format!(
                    "inode {inum} ({}, nlinks {nlinks}) is in no directory: orphaned, {fate}",
                    t.name()
                ),
            });
            self.report.orphans.push(Orphan {
                pfs: st.label.clone(),
                inum,
                nlinks,
            });
        }
        st.problems.extend(found);
        let path_of = |inum: u64| -> Option<String> {
            let mut parts = Vec::new();
            let mut cur = inum;
            for _ in 0..4096 {
                if cur == 1 {
                    parts.reverse();
                    return Some(parts.join("/"));
                }
                let (dir, name) = parent.get(&cur)?;
                parts.push(String::from_utf8_lossy(name).into_owned());
                cur = *dir;
            }
            None
        };
        for mut p in st.problems {
            if let Some(i) = p.inum {
                p.path = path_of(i);
            }
            self.report.problems.push(p);
        }
    }

    fn walk_freemap(&mut self) -> BTreeMap<u64, FreemapLeaf> {
        let mut leaves = BTreeMap::new();
        let set = self.vol.header.freemap_blockset;
        let mut root = Blockref::EMPTY;
        root.btype = BlockrefType::Freemap;
        root.keybits = 64;
        root.mirror_tid = u64::MAX;
        self.walk_freemap_set(&root, &set, 0, &mut leaves);
        leaves
    }

    fn walk_freemap_set(
        &mut self,
        parent: &Blockref,
        set: &[Blockref],
        depth: usize,
        leaves: &mut BTreeMap<u64, FreemapLeaf>,
    ) {
        let (lo, hi) = (parent.key, parent.key_end());
        if !in_key_order(set) {
            let what = format!(
                "freemap blockrefs under key {:#x} are not in key order",
                parent.key
            );
            self.problem(None, Some(parent.data_off.offset()), None, what);
        }
        let mut sorted: Vec<&Blockref> = set.iter().filter(|b| !b.is_empty()).collect();
        sorted.sort_by_key(|b| b.key);
        let mut prev_end: Option<u64> = None;
        for br in sorted {
            let at = Some(br.data_off.offset());
            self.count(br);
            let overlaps = prev_end.is_some_and(|e| br.key <= e);
            prev_end = Some(br.key_end());
            if br.key < lo || br.key_end() > hi || br.keybits >= parent.keybits || overlaps {
                let what = format!(
                    "freemap {} key {:#x}/{} outside its parent's {lo:#x}..{hi:#x}",
                    br.btype.name(),
                    br.key,
                    br.keybits
                );
                self.problem(None, at, None, what);
                continue;
            }
            if br.check_method() != check_method::FREEMAP {
                let what = format!(
                    "freemap {} has check method {}",
                    br.btype.name(),
                    br.check_method()
                );
                self.problem(None, at, None, what);
            }
            match br.btype {
                BlockrefType::FreemapNode if depth < DEPTH_MAX => {
                    if let Err(e) = check_node(br) {
                        self.problem(None, at, None, e.to_string());
                    } else if let Some(buf) = self.read(None, None, br) {
                        let children = decode_set(&buf);
                        self.walk_freemap_set(br, &children, depth + 1, leaves);
                    }
                }
                BlockrefType::FreemapLeaf => {
                    if br.keybits != FREEMAP_LEVEL1_RADIX {
                        self.problem(
                            None,
                            at,
                            None,
                            format!("freemap leaf with keybits {}", br.keybits),
                        );
                    }
                    let Some(buf) = self.read(None, None, br) else {
                        continue;
                    };
                    match freemap::decode_leaf(br, &buf) {
                        Ok(leaf) => {
                            self.check_leaf(&leaf);
                            leaves.insert(leaf.zone_base(), leaf);
                        }
                        Err(e) => self.problem(None, at, None, e.to_string()),
                    }
                }
                other => {
                    self.problem(
                        None,
                        at,
                        None,
                        format!("unexpected {} blockref in the freemap", other.name()),
                    );
                }
            }
        }
    }

    fn check_leaf(&mut self, leaf: &FreemapLeaf) {
        let at = Some(leaf.bref.data_off.offset());
        for (i, bm) in leaf.bmaps.iter().enumerate() {
            if bm.linear < 0 || bm.linear as u64 > (1u64 << disk::FREEMAP_LEVEL0_RADIX) {
                let what = format!(
                    "freemap bmap {i} of zone {:#x} has linear {}",
                    leaf.zone_base(),
                    bm.linear
                );
                self.problem(None, at, None, what);
            }
        }
    }

    /// Every block the topology references must be allocated in the
    /// freemap, unless newfs placed it statically below allocator_beg or
    /// it is newer than the freemap (recovered at mount).
    fn cross_check_freemap(&mut self, leaves: &BTreeMap<u64, FreemapLeaf>) {
        let vh = &self.vol.header;
        let (beg, freemap_tid) = (vh.allocator_beg, vh.freemap_tid);
        let reserved = |off: u64| (off & ((1u64 << FREEMAP_LEVEL1_RADIX) - 1)) < disk::ZONE_SEG;
        let mut refs = std::mem::take(&mut self.refs);
        refs.sort_unstable();
        refs.dedup();
        let mut problems = Vec::new();
        for (off, bytes, tid) in refs {
            if reserved(off) || (off < vh.aux_end && off + bytes > vh.boot_beg) {
                problems.push((
                    off,
                    format!("block of {bytes} bytes lies in a reserved area"),
                ));
                continue;
            }
            if tid > freemap_tid {
                continue;
            }
            let mut chunk = off & !(FREEMAP_BLOCK_SIZE - 1);
            while chunk < off + bytes {
                match freemap::block_state(leaves, chunk) {
                    Some(BMAP_ALLOCATED) => {}
                    None if off + bytes <= beg => {}
                    None => {
                        problems.push((
                            off,
                            format!(
                                "block of {bytes} bytes is in a zone the freemap has no leaf for"
                            ),
                        ));
                        break;
                    }
                    Some(s) => {
                        problems.push((off, format!("block of {bytes} bytes is referenced but its freemap state is {s:02b}")));
                        break;
                    }
                }
                chunk += FREEMAP_BLOCK_SIZE;
            }
        }
        for (off, what) in problems {
            self.problem(None, Some(off), None, what);
        }
    }
}
