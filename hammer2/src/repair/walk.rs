//! Phase 3 of a repair: every block of the topology verified as fsck
//! verifies it, and what fails fixed in the `Mount`'s trees in memory
//! (the next flush writes it copy-on-write).
//!
//! Each blockref array is walked in key order. An entry outside its
//! parent's key range, overlapping a sibling, or of a type its tree
//! cannot hold is cut. A block that does not verify (check code, size,
//! shape, decompression) is, in this order:
//! 1. replaced by the same key's block in an older tree or a snapshot
//!    (`older.rs`) that verifies, as DragonFly's reconstruct idea;
//! 2. for blocks that hold structure (indirect blocks, inodes, long
//!    names), kept as read when what it holds is sound without its check
//!    code (every blockref in it plausible and one of them verifying;
//!    an inode whose fields are all in range; a name that hashes to its
//!    key), as e2fsck keeps a block whose only fault is its checksum;
//!    the flush rewrites it with a good check code;
//! 3. cut: a file keeps its other blocks (a hole, reported with its
//!    range), a directory its other entries (the inodes the cut entries
//!    named go to `lost+found` in phase 4).
//!
//! A PFS root that can only be cut, or a super-root that cannot be read,
//! is `fatal`: the caller rewinds instead when an older tree verifies.
//!
//! Fields behind good check codes are corrected where the value can be
//! derived (an inode's number from its index key, its type from what it
//! holds, a size from its data, methods to the defaults, a data block's
//! keybits, the PFS root's flags and number, an embedded name's stray
//! block), statistics are recomputed (a node whose stored counts differ
//! is rewritten), an array out of key order or holding a newer tid than
//! its parent is rewritten, and a block in a reserved area or straddling
//! a 16 KiB boundary is moved. Entries to re-key (a name whose hash is
//! not its key) are left for phase 4, which has the names.

use super::older::{Older, Place};
use super::Log;
use crate::blocktable::{BlockTable, SetStats};
use crate::chain::{check_node, decode_set, DEPTH_MAX};
use crate::compress;
use crate::dirhash::dirhash;
use crate::disk::{
    self, check_method, comp_method, Blockref, BlockrefType, DataOff, InodeData, ObjType, Uuid,
    BLOCKREF_LEAF_MAX, DIRHASH_HIMASK, DIRHASH_VISIBLE, INODE_BYTES, INODE_MAXNAME,
};
use crate::error::Result;
use crate::inode::{InodeLock, InodeNode, PendingBlock};
use crate::mount::{Mount, PfsState, ROOT_INUM};
use crate::pfs::{meta_damage, DIRENT_EMBEDDED_NAME_MAX, DIRENT_NAME_MAX, FILE_SIZE_MAX};
use crate::volume::Volume;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

const BLOCK: u64 = disk::DATA_BLOCK_BYTES;

/// The structural repair of one volume.
pub(crate) struct Walk<'a> {
    older: &'a mut Older,
    log: &'a mut Log,
    /// What could not be saved in place: a PFS or the super-root.
    pub fatal: Vec<String>,
    /// The highest tid met, so the repair's commits come after it.
    pub max_tid: u64,
    /// Nodes kept as read above the current one: their entries' keys
    /// were not verified by a check code.
    unverified: usize,
}

/// One PFS being walked.
struct PfsCtx {
    label: String,
    clid: Uuid,
    root_btime: u64,
    /// Inodes whose number is not their index key, resolved once the
    /// index is known: (index key, the number the inode claims, the key
    /// came from a block kept as read).
    misnumbered: Vec<(u64, u64, bool)>,
    /// Every inode key walked.
    keys: BTreeSet<u64>,
    /// Data offsets of inode blocks walked, to catch one block filed
    /// under two keys.
    max_inum: u64,
}

/// Where a blockref array sits, with what its entries may update.
enum Scope<'s> {
    SuperRoot {
        pfs: &'s mut BTreeMap<String, PfsState>,
        /// PFS roots whose key must change (their label's hash): the
        /// old slot was cut, the state holds the new key.
        vol: &'s Volume,
    },
    PfsRoot {
        cx: &'s mut PfsCtx,
        inodes: &'s mut BTreeMap<u64, InodeLock>,
        pending_dirents: &'s mut BTreeMap<u64, Option<Vec<u8>>>,
        vol: &'s Volume,
    },
    Inode(InodeScope<'s>),
}

/// Where an inode's content came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Source {
    /// It verified where it is.
    Verified,
    /// It verified, but lies where no block may: rewritten elsewhere.
    Moved,
    /// Read past a failed check code: rewritten, its entries unverified.
    Salvaged,
    /// An older copy's.
    Older,
}

/// The tree of one inode (not a PFS root).
struct InodeScope<'s> {
    label: &'s str,
    clid: Uuid,
    inum: u64,
    btime: u64,
    kind: Kind,
    size: u64,
    /// The end of the last data block kept.
    data_end: &'s mut u64,
    pending_dirents: &'s mut BTreeMap<u64, Option<Vec<u8>>>,
    pending: &'s mut BTreeMap<u64, Arc<PendingBlock>>,
    vol: &'s Volume,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Dir,
    File,
    /// Devices, fifos, sockets: nothing below them.
    Other,
}

impl Scope<'_> {
    fn vol(&self) -> &Volume {
        match self {
            Scope::SuperRoot { vol, .. } | Scope::PfsRoot { vol, .. } => vol,
            Scope::Inode(s) => s.vol,
        }
    }
    fn label(&self) -> Option<&str> {
        match self {
            Scope::SuperRoot { .. } => None,
            Scope::PfsRoot { cx, .. } => Some(&cx.label),
            Scope::Inode(s) => Some(s.label),
        }
    }
    fn inum(&self) -> Option<u64> {
        match self {
            Scope::SuperRoot { .. } => None,
            Scope::PfsRoot { .. } => Some(ROOT_INUM),
            Scope::Inode(s) => Some(s.inum),
        }
    }
    fn place(&self) -> Place {
        match self {
            Scope::SuperRoot { .. } => Place::SuperRoot,
            Scope::PfsRoot { cx, .. } => Place::Pfs {
                label: cx.label.as_bytes().to_vec(),
                clid: cx.clid,
                btime: cx.root_btime,
            },
            Scope::Inode(s) => Place::Inode {
                label: s.label.as_bytes().to_vec(),
                clid: s.clid,
                inum: s.inum,
                btime: s.btime,
            },
        }
    }
    /// The leaf types this tree holds (besides INDIRECT).
    fn holds(&self, t: BlockrefType) -> bool {
        match self {
            Scope::SuperRoot { .. } => t == BlockrefType::Inode,
            Scope::PfsRoot { .. } => matches!(t, BlockrefType::Inode | BlockrefType::Dirent),
            Scope::Inode(s) => match s.kind {
                Kind::Dir => t == BlockrefType::Dirent,
                Kind::File => t == BlockrefType::Data,
                Kind::Other => false,
            },
        }
    }
}

fn salvaged_here(s: Source) -> bool {
    s == Source::Salvaged
}

/// The last key of a range of `kb` bits at `k`.
fn key_end(k: u64, kb: u8) -> u64 {
    if kb >= 64 {
        u64::MAX
    } else {
        k.saturating_add((1u64 << kb) - 1)
    }
}

/// Read `br`'s block without verifying it: `None` when its size or
/// place cannot be a block of this volume.
pub(super) fn read_raw(vol: &Volume, br: &Blockref) -> Option<Vec<u8>> {
    let radix = br.data_off.radix();
    if !(6..=disk::PBUFRADIX).contains(&radix) {
        return None;
    }
    let (at, bytes) = (br.data_off.offset(), br.data_off.bytes());
    if (at & (disk::PBUFSIZE - 1)) + bytes > disk::PBUFSIZE
        || at.checked_add(bytes)? > vol.header.volu_size.min(vol.device().size_bytes())
    {
        return None;
    }
    let mut buf = vec![0u8; bytes as usize];
    vol.device().read_at(&mut buf, at).ok()?;
    Some(buf)
}

/// An indirect block's entries, its shape and check code verified (the
/// entries themselves are the walk's business).
pub(super) fn read_indirect(vol: &Volume, br: &Blockref) -> Result<Vec<Blockref>> {
    check_node(br)?;
    let buf = vol.read_physical(br)?;
    Ok(decode_set(&buf))
}

/// An inode block, its size and check code verified.
pub(super) fn read_inode_block(vol: &Volume, br: &Blockref) -> Result<InodeData> {
    if br.data_off.bytes() != INODE_BYTES as u64 {
        return Err(crate::Error::corrupt(
            format!(
                "inode blockref key {:#x} points at a block of {} bytes",
                br.key,
                br.data_off.bytes()
            ),
            br.data_off.offset(),
        ));
    }
    let buf = vol.read_physical(br)?;
    InodeData::decode(&buf, br.data_off.offset())
}

/// A data block verified as the read path reads it.
pub(super) fn verify_data(vol: &Volume, br: &Blockref) -> Result<()> {
    let phys = vol.read_physical(br)?;
    let comp = br.comp_method();
    if !matches!(comp, comp_method::NONE | comp_method::AUTOZERO) {
        compress::decompress(comp, &phys, BLOCK as usize, br.data_off.offset())?;
    }
    Ok(())
}

/// A long name's block verified: the name.
pub(super) fn read_name(vol: &Volume, br: &Blockref) -> Result<Vec<u8>> {
    let n = br.dirent().namlen as usize;
    let buf = vol.read_physical(br)?;
    if buf.len() < n {
        return Err(crate::Error::corrupt(
            format!(
                "dirent name block of {} bytes for a {n}-byte name",
                buf.len()
            ),
            br.data_off.offset(),
        ));
    }
    Ok(buf[..n].to_vec())
}

fn name_hash_ok(name: &[u8], key: u64) -> bool {
    key & DIRHASH_HIMASK == dirhash(name) & DIRHASH_HIMASK
}

/// What is wrong with an inode's fields, as fsck sees it; `key` is the
/// number the index files it under.
fn anomalies(d: &InodeData, key: u64) -> Vec<String> {
    let m = &d.meta;
    let mut v = Vec::new();
    if m.inum != key {
        v.push(format!("number {} (filed as {key})", m.inum));
    }
    if matches!(m.obj_type, ObjType::Invalid(_) | ObjType::Unknown) {
        v.push(format!("type {}", m.obj_type.to_u8()));
    }
    if m.version != disk::inode::INODE_VERSION_ONE {
        v.push(format!("version {}", m.version));
    }
    if m.name_len as usize > INODE_MAXNAME {
        v.push(format!("name_len {}", m.name_len));
    }
    if !check_method::is_known(disk::dec_algo(m.check_algo)) {
        v.push(format!("check_algo {:#x}", m.check_algo));
    }
    if !comp_method::is_known(disk::dec_algo(m.comp_algo)) {
        v.push(format!("comp_algo {:#x}", m.comp_algo));
    }
    if let Some(why) = meta_damage(m) {
        v.push(why);
    }
    v
}

/// A blockref that could point at a block of this volume (or at none).
fn plausible_extent(vol: &Volume, br: &Blockref) -> bool {
    let radix = br.data_off.radix();
    if radix == 0 {
        return br.data_off.offset() == 0;
    }
    (6..=disk::PBUFRADIX).contains(&radix)
        && (br.data_off.offset() & (disk::PBUFSIZE - 1)) + br.data_off.bytes() <= disk::PBUFSIZE
        && br.data_off.offset() + br.data_off.bytes() <= vol.header.volu_size
}

/// Where a block may not be: in a reserved segment or the boot/aux
/// areas, or (under 16 KiB) across a 16 KiB boundary, where DragonFly's
/// allocator never puts one and its I/O would not read it whole.
fn misplaced(vol: &Volume, br: &Blockref) -> bool {
    let (off, bytes) = (br.data_off.offset(), br.data_off.bytes());
    if bytes == 0 {
        return false;
    }
    let vh = &vol.header;
    let reserved = (off & ((1u64 << disk::FREEMAP_LEVEL1_RADIX) - 1)) < disk::ZONE_SEG
        || (off < vh.aux_end && off + bytes > vh.boot_beg);
    let within = off % disk::LBUFSIZE;
    let straddles = if bytes >= disk::LBUFSIZE {
        within != 0
    } else {
        within + bytes > disk::LBUFSIZE
    };
    reserved || straddles
}

impl<'a> Walk<'a> {
    pub fn new(older: &'a mut Older, log: &'a mut Log) -> Walk<'a> {
        Walk {
            older,
            log,
            fatal: Vec::new(),
            max_tid: 0,
            unverified: 0,
        }
    }

    /// Walk the whole topology of `m` (its super-root already read):
    /// every PFS root and everything under it.
    pub fn volume(&mut self, m: &mut Mount) -> Result<()> {
        let Mount {
            vol, sroot, pfs, ..
        } = m;
        self.note_tid(&sroot.bref);
        if sroot.data.meta.has_direct_data() {
            return Ok(());
        }
        let sroot_br = sroot.bref;
        let stats = {
            let mut scope = Scope::SuperRoot { pfs, vol };
            self.table(&mut sroot.table, &mut scope, None, sroot_br.mirror_tid, 0)
        };
        let _ = stats; // the super-root's own counts are not kept exact
        if sroot.table.is_dirty() {
            sroot.dirty = true;
        }
        Ok(())
    }

    fn note_tid(&mut self, br: &Blockref) {
        self.max_tid = self.max_tid.max(br.mirror_tid).max(br.modify_tid);
    }

    fn cut_line(scope: &Scope, br: &Blockref, why: &str) -> (String, u64) {
        let what = match (br.btype, scope) {
            (BlockrefType::Data, Scope::Inode(s)) => {
                let end = (br.key + BLOCK).min(s.size.max(br.key));
                (
                    format!(
                        "file data at {:#x}..{:#x} cut ({why}): a hole now",
                        br.key,
                        br.key + BLOCK
                    ),
                    end - br.key.min(end),
                )
            }
            (BlockrefType::Indirect, Scope::Inode(s)) if s.kind == Kind::File => {
                let end = br.key_end().min(s.size.saturating_sub(1));
                (
                    format!(
                        "indirect block of file offsets {:#x}..{:#x} cut ({why}): a hole now",
                        br.key,
                        br.key_end()
                    ),
                    if end >= br.key { end - br.key + 1 } else { 0 },
                )
            }
            (BlockrefType::Indirect, _) => (
                format!(
                    "indirect block of keys {:#x}..{:#x} cut ({why}); what it held is lost",
                    br.key,
                    br.key_end()
                ),
                0,
            ),
            (BlockrefType::Inode, Scope::PfsRoot { .. }) => {
                (format!("inode {} cut ({why})", br.key), 0)
            }
            (BlockrefType::Dirent, _) => (
                format!(
                    "directory entry key {:#x} (inode {}) cut ({why})",
                    br.key,
                    br.dirent().inum
                ),
                0,
            ),
            (t, _) => (
                format!("{} blockref key {:#x} cut ({why})", t.name(), br.key),
                0,
            ),
        };
        what
    }

    fn cut(&mut self, table: &mut BlockTable, slot: usize, scope: &Scope, why: &str) {
        let br = table.entries()[slot];
        table.set_slot(slot, Blockref::EMPTY);
        let (what, lost) = Self::cut_line(scope, &br, why);
        self.log.push(
            scope.label(),
            scope.inum(),
            Some(br.data_off.offset()),
            what,
            true,
            lost,
        );
    }

    /// Walk one blockref array; returns the statistics it will hold once
    /// the flush has rewritten what changed.
    fn table(
        &mut self,
        table: &mut BlockTable,
        scope: &mut Scope,
        parent: Option<&Blockref>,
        parent_tid: u64,
        depth: usize,
    ) -> SetStats {
        let (lo, hi) = parent.map_or((0, u64::MAX), |p| (p.key, p.key_end()));
        let mut order: Vec<usize> = (0..table.entries().len())
            .filter(|&i| !table.entries()[i].is_empty())
            .collect();
        order.sort_by_key(|&i| table.entries()[i].key);
        let keys: Vec<u64> = order.iter().map(|&i| table.entries()[i].key).collect();
        let packed_sorted = {
            let live: Vec<u64> = table
                .entries()
                .iter()
                .filter(|b| !b.is_empty())
                .map(|b| b.key)
                .collect();
            live.windows(2).all(|w| w[0] < w[1])
        };
        if !packed_sorted && keys.windows(2).all(|w| w[0] < w[1]) {
            table.touch();
            self.log.safe(
                scope.label(),
                scope.inum(),
                parent.map(|p| p.data_off.offset()),
                format!("blockrefs under key {lo:#x} put back in key order"),
            );
        }
        let mut stats = SetStats::default();
        let mut prev_end: Option<u64> = None;
        for (pos, &slot) in order.iter().enumerate() {
            let mut br = table.entries()[slot];
            self.note_tid(&br);
            if self.unverified > 0 {
                if let Some(fixed) = self.one_bit(table, slot, scope) {
                    br = fixed;
                }
            }
            let room = (
                prev_end.map_or(lo, |e| e.saturating_add(1)).max(lo),
                keys.get(pos + 1)
                    .map_or(hi, |k| k.saturating_sub(1))
                    .min(hi),
            );
            let is_node = br.btype == BlockrefType::Indirect;
            if !is_node && (br.key < lo || br.key_end() > hi) {
                self.cut(table, slot, scope, "outside its parent's key range");
                continue;
            }
            if !is_node && prev_end.is_some_and(|e| br.key <= e) {
                self.cut(table, slot, scope, "overlaps its sibling");
                continue;
            }
            if br.mirror_tid > parent_tid {
                table.touch();
                self.log.safe(
                    scope.label(),
                    scope.inum(),
                    Some(br.data_off.offset()),
                    format!(
                        "{} blockref key {:#x} newer than its parent: parent rewritten",
                        br.btype.name(),
                        br.key
                    ),
                );
            }
            let kept = match br.btype {
                BlockrefType::Indirect => self.indirect(table, slot, scope, parent, depth, room),
                t if !scope.holds(t) => {
                    let why = format!("{} blockref in this tree", t.name());
                    self.cut(table, slot, scope, &why);
                    None
                }
                BlockrefType::Inode => match scope {
                    Scope::SuperRoot { .. } => self.pfs_root(table, slot, scope),
                    _ => self.inode(table, slot, scope),
                },
                BlockrefType::Dirent => self.dirent(table, slot, scope),
                BlockrefType::Data => self.data(table, slot, scope),
                _ => {
                    self.cut(table, slot, scope, "unknown blockref type");
                    None
                }
            };
            if let Some(b) = kept {
                stats.add_child(&b);
                prev_end = Some(b.key_end());
            }
        }
        stats
    }

    /// Whether the entry in `slot` is what it says: its block verifies
    /// as its type must (a short name has no block).
    fn entry_verifies(vol: &Volume, scope: &Scope, br: &Blockref) -> bool {
        if br.btype != BlockrefType::Indirect && !scope.holds(br.btype) {
            return false;
        }
        match br.btype {
            BlockrefType::Indirect => read_indirect(vol, br).is_ok(),
            BlockrefType::Inode => read_inode_block(vol, br).is_ok(),
            BlockrefType::Data => verify_data(vol, br).is_ok(),
            BlockrefType::Dirent => {
                let n = br.dirent().namlen as usize;
                n <= DIRENT_EMBEDDED_NAME_MAX || read_name(vol, br).is_ok()
            }
            _ => false,
        }
    }

    /// In a block kept as read, an entry that does not verify may have
    /// had one of its own bits flipped: its check code (one bit from what
    /// its block hashes to), its methods, its type or its data_off. When
    /// one bit's correction makes it verify, the entry is corrected.
    fn one_bit(&mut self, table: &mut BlockTable, slot: usize, scope: &Scope) -> Option<Blockref> {
        let vol = scope.vol();
        let br = table.entries()[slot];
        if Self::entry_verifies(vol, scope, &br) {
            return None;
        }
        let mut found: Option<(Blockref, &str)> = None;
        if let Some(raw) = read_raw(vol, &br) {
            let mut c = br;
            crate::check::set_check(&mut c, &raw);
            let dist: u32 = c
                .check
                .iter()
                .zip(br.check.iter())
                .map(|(a, b)| (a ^ b).count_ones())
                .sum();
            if dist == 1 && Self::entry_verifies(vol, scope, &c) {
                found = Some((c, "check code"));
            }
        }
        for bit in 0..8 {
            if found.is_some() {
                break;
            }
            let mut c = br;
            c.methods ^= 1 << bit;
            if Self::entry_verifies(vol, scope, &c) {
                found = Some((c, "methods"));
            }
            let mut c = br;
            c.btype = BlockrefType::from_u8(br.btype.to_u8() ^ (1 << bit));
            if found.is_none() && Self::entry_verifies(vol, scope, &c) {
                found = Some((c, "type"));
            }
        }
        for bit in 0..64 {
            if found.is_some() {
                break;
            }
            let mut c = br;
            c.data_off = DataOff(br.data_off.0 ^ (1 << bit));
            if plausible_extent(vol, &c) && Self::entry_verifies(vol, scope, &c) {
                found = Some((c, "data_off"));
            }
        }
        let (c, field) = found?;
        table.set_slot(slot, c);
        self.log.lossy(
            scope.label(),
            scope.inum(),
            Some(br.data_off.offset()),
            format!(
                "{} blockref key {:#x} in a block kept as read: one flipped bit of its {field} \
                 corrected (its block verifies)",
                c.btype.name(),
                c.key
            ),
        );
        Some(c)
    }

    /// Compare the counts stored in `br` with `got`; true when they
    /// differ (the owner must be rewritten).
    fn stats_differ(br: &Blockref, got: &SetStats, leaf_count_kept: bool) -> bool {
        let leaf_exact = leaf_count_kept
            && br.leaf_count != BLOCKREF_LEAF_MAX
            && br.flags & disk::BREF_FLAG_PFSROOT == 0;
        br.data_count() != got.data_count
            || br.inode_count() != got.inode_count
            || (leaf_exact && br.leaf_count != got.leaf_count_saturated())
    }

    #[allow(clippy::too_many_arguments)]
    fn indirect(
        &mut self,
        table: &mut BlockTable,
        slot: usize,
        scope: &mut Scope,
        parent: Option<&Blockref>,
        depth: usize,
        room: (u64, u64),
    ) -> Option<Blockref> {
        let mut br = table.entries()[slot];
        if depth >= DEPTH_MAX {
            self.cut(table, slot, scope, "indirect blocks nested too deep");
            return None;
        }
        let max_bits = parent.map_or(64, |p| p.keybits.saturating_sub(1));
        let vol = scope.vol();
        let size_ok = (disk::IND_BYTES_MIN as u64..=disk::IND_BYTES_MAX as u64)
            .contains(&br.data_off.bytes());
        let read = if size_ok {
            vol.read_physical(&br).map(|b| decode_set(&b))
        } else {
            check_node(&br).map(|_| Vec::new())
        };
        let mut salvaged = false;
        let (use_br, entries, rewrite) = match read {
            Ok(set) => (br, set, misplaced(vol, &br)),
            Err(e) => {
                let why = e.to_string();
                if let Some(set) = self.salvage_node(scope, &br) {
                    self.log.lossy(
                        scope.label(),
                        scope.inum(),
                        Some(br.data_off.offset()),
                        format!(
                            "indirect block of keys {:#x}..{:#x} ({why}) kept as read: the \
                             blockrefs in it are sound; rewritten with a good check code",
                            br.key,
                            br.key_end()
                        ),
                    );
                    salvaged = true;
                    (br, set, true)
                } else {
                    let place = scope.place();
                    let cand = self
                        .older
                        .candidates(&place, &br)
                        .into_iter()
                        .find_map(|c| read_indirect(vol, &c).ok().map(|s| (c, s)));
                    match cand {
                        Some((c, set)) => {
                            table.set_slot(slot, c);
                            self.log.lossy(
                                scope.label(),
                                scope.inum(),
                                Some(br.data_off.offset()),
                                format!(
                                    "indirect block of keys {:#x}..{:#x} ({why}) replaced by \
                                     its copy of tid {:#x}",
                                    br.key,
                                    br.key_end(),
                                    c.modify_tid
                                ),
                            );
                            (c, set, false)
                        }
                        None => {
                            self.cut(table, slot, scope, &why);
                            return None;
                        }
                    }
                }
            }
        };
        br = use_br;
        // The key range must hold the entries, be aligned, sit inside the
        // parent's with fewer keybits and clear of the siblings; an
        // indirect block whose entries verify says what it holds.
        let span = entries.iter().filter(|b| !b.is_empty()).fold(
            None,
            |acc: Option<(u64, u64, u8)>, b| {
                Some(match acc {
                    None => (b.key, b.key_end(), b.keybits),
                    Some((l, h, k)) => (l.min(b.key), h.max(b.key_end()), k.max(b.keybits)),
                })
            },
        );
        let fits = |k: u64, kb: u8| {
            kb <= max_bits
                && (kb >= 64 || k & ((1u64 << kb) - 1) == 0)
                && k >= room.0
                && key_end(k, kb) <= room.1
        };
        let holds_all =
            span.is_none_or(|(l, h, k)| l >= br.key && h <= br.key_end() && k < br.keybits);
        if !fits(br.key, br.keybits) || !holds_all {
            let fitted = span.and_then(|(l, h, k)| {
                (k.saturating_add(1)..=max_bits).find_map(|kb| {
                    let key = if kb >= 64 { 0 } else { l & !((1u64 << kb) - 1) };
                    (key_end(key, kb) >= h && fits(key, kb)).then_some((key, kb))
                })
            });
            match fitted {
                Some((key, kb)) if (key, kb) != (br.key, br.keybits) => {
                    self.log.safe(
                        scope.label(),
                        scope.inum(),
                        Some(br.data_off.offset()),
                        format!(
                            "indirect block key range {:#x}/{} corrected to {key:#x}/{kb}, \
                             which holds its entries",
                            br.key, br.keybits
                        ),
                    );
                    br.key = key;
                    br.keybits = kb;
                    table.set_slot(slot, br);
                }
                _ if !fits(br.key, br.keybits) => {
                    self.cut(
                        table,
                        slot,
                        scope,
                        "its key range fits neither its parent nor its entries",
                    );
                    return None;
                }
                _ => {}
            }
        }
        let tid = br.mirror_tid;
        let child = table.adopt(slot, entries);
        self.unverified += usize::from(salvaged);
        let sub = self.table(child, scope, Some(&br), tid, depth + 1);
        self.unverified -= usize::from(salvaged);
        if rewrite {
            child.touch();
        }
        if !child.is_dirty() && Self::stats_differ(&br, &sub, true) {
            child.touch();
            self.log.safe(
                scope.label(),
                scope.inum(),
                Some(br.data_off.offset()),
                format!(
                    "indirect block key {:#x}: counts recomputed (data {} inodes {})",
                    br.key, sub.data_count, sub.inode_count
                ),
            );
        }
        if child.is_dirty() {
            table.touch();
        } else {
            table.forget_clean_child(slot);
        }
        let mut b = br;
        sub.apply(&mut b);
        Some(b)
    }

    /// A damaged node whose content is still sound: most live entries of
    /// a type its tree holds, inside its key range, pointing at a place
    /// a block can be, and at least one of them verifying (the rest are
    /// judged one by one by the walk).
    fn salvage_node(&mut self, scope: &Scope, br: &Blockref) -> Option<Vec<Blockref>> {
        if !(disk::IND_BYTES_MIN as u64..=disk::IND_BYTES_MAX as u64).contains(&br.data_off.bytes())
        {
            return None;
        }
        let vol = scope.vol();
        let buf = read_raw(vol, br)?;
        let set = decode_set(&buf);
        let live: Vec<&Blockref> = set.iter().filter(|b| !b.is_empty()).collect();
        if live.is_empty() {
            return None;
        }
        let sound = live
            .iter()
            .filter(|b| {
                (b.btype == BlockrefType::Indirect || scope.holds(b.btype))
                    && plausible_extent(vol, b)
            })
            .count();
        let verifies = live
            .iter()
            .any(|b| b.data_off.bytes() > 0 && vol.read_physical(b).is_ok());
        (sound * 2 > live.len() && verifies).then_some(set)
    }

    fn data(&mut self, table: &mut BlockTable, slot: usize, scope: &mut Scope) -> Option<Blockref> {
        let mut br = table.entries()[slot];
        let Scope::Inode(s) = scope else {
            return None;
        };
        let (label, inum) = (s.label, s.inum);
        if br.key & (BLOCK - 1) != 0 {
            self.cut(table, slot, scope, "file data not on a 64 KiB boundary");
            return None;
        }
        if br.keybits != disk::DATA_BLOCK_RADIX {
            self.log.safe(
                Some(label),
                Some(inum),
                Some(br.data_off.offset()),
                format!(
                    "file data at {:#x}: keybits {} set to {}",
                    br.key,
                    br.keybits,
                    disk::DATA_BLOCK_RADIX
                ),
            );
            br.keybits = disk::DATA_BLOCK_RADIX;
            table.set_slot(slot, br);
        }
        let vol = scope.vol();
        match verify_data(vol, &br) {
            Ok(()) => {
                if misplaced(vol, &br) {
                    // The copy is on the heap unless the device caches,
                    // and fails only for want of a page: then the block
                    // stays where it is, and nothing is logged as moved.
                    let block = vol
                        .read_block(&br)
                        .and_then(|content| PendingBlock::copy_of(vol, &content));
                    if let Ok(mut b) = block {
                        if let Scope::Inode(s) = &mut *scope {
                            let keep = (s.size.saturating_sub(br.key)).min(BLOCK) as usize;
                            b.bytes.resize(b.bytes.len().min(keep.max(1)));
                            s.pending.insert(br.key, Arc::new(b));
                        }
                        self.log.safe(
                            Some(label),
                            Some(inum),
                            Some(br.data_off.offset()),
                            format!("file data at {:#x} moved out of a reserved place", br.key),
                        );
                    }
                }
            }
            Err(e) => {
                let why = e.to_string();
                let place = scope.place();
                let cand =
                    self.older.candidates(&place, &br).into_iter().find(|c| {
                        c.keybits == disk::DATA_BLOCK_RADIX && verify_data(vol, c).is_ok()
                    });
                match cand {
                    Some(c) => {
                        table.set_slot(slot, c);
                        self.log.lossy(
                            Some(label),
                            Some(inum),
                            Some(br.data_off.offset()),
                            format!(
                                "file data at {:#x}..{:#x} ({why}) replaced by its copy of tid \
                                 {:#x}",
                                br.key,
                                br.key + BLOCK,
                                c.modify_tid
                            ),
                        );
                        br = c;
                    }
                    None => {
                        self.cut(table, slot, scope, &why);
                        return None;
                    }
                }
            }
        }
        if let Scope::Inode(s) = scope {
            *s.data_end = (*s.data_end).max(br.key + BLOCK);
        }
        Some(br)
    }

    fn dirent(
        &mut self,
        table: &mut BlockTable,
        slot: usize,
        scope: &mut Scope,
    ) -> Option<Blockref> {
        let mut br = table.entries()[slot];
        let namlen = br.dirent().namlen as usize;
        if namlen == 0 || namlen > DIRENT_NAME_MAX {
            let why = format!("name length {namlen}");
            self.cut(table, slot, scope, &why);
            return None;
        }
        let (label, inum) = (scope.label(), scope.inum());
        let (label, inum) = (label.map(str::to_string), inum);
        let label = label.as_deref();
        if namlen <= DIRENT_EMBEDDED_NAME_MAX {
            if !br.data_off.is_empty() {
                let at = br.data_off.offset();
                br.data_off = DataOff(0);
                table.set_slot(slot, br);
                self.log.safe(
                    label,
                    inum,
                    Some(at),
                    format!(
                        "directory entry key {:#x}: its name is in the blockref; the block it \
                         also pointed at is dropped",
                        br.key
                    ),
                );
            }
            return Some(br);
        }
        let vol = scope.vol();
        if let Err(e) = read_name(vol, &br) {
            let why = e.to_string();
            let place = scope.place();
            let cand = self.older.candidates(&place, &br).into_iter().find(|c| {
                c.dirent() == br.dirent()
                    && read_name(vol, c).is_ok_and(|n| name_hash_ok(&n, br.key))
            });
            if let Some(c) = cand {
                table.set_slot(slot, c);
                self.log.lossy(
                    label,
                    inum,
                    Some(br.data_off.offset()),
                    format!(
                        "long name of directory entry key {:#x} ({why}) replaced by its copy \
                         of tid {:#x}",
                        br.key, c.modify_tid
                    ),
                );
                return Some(c);
            }
            let raw = read_raw(vol, &br)
                .filter(|b| b.len() >= namlen)
                .map(|b| b[..namlen].to_vec())
                .filter(|n| name_hash_ok(n, br.key) && !n.contains(&0) && !n.contains(&b'/'));
            match raw {
                Some(name) => {
                    let pending = match scope {
                        Scope::PfsRoot {
                            pending_dirents, ..
                        } => pending_dirents,
                        Scope::Inode(s) => &mut *s.pending_dirents,
                        Scope::SuperRoot { .. } => return None,
                    };
                    pending.insert(br.key, Some(name));
                    table.touch();
                    self.log.lossy(
                        label,
                        inum,
                        Some(br.data_off.offset()),
                        format!(
                            "long name of directory entry key {:#x} ({why}) kept as read: it \
                             hashes to its key; rewritten with a good check code",
                            br.key
                        ),
                    );
                }
                None => {
                    self.cut(table, slot, scope, &why);
                    return None;
                }
            }
        } else if misplaced(vol, &br) {
            if let Ok(name) = read_name(vol, &br) {
                let pending = match scope {
                    Scope::PfsRoot {
                        pending_dirents, ..
                    } => pending_dirents,
                    Scope::Inode(s) => &mut *s.pending_dirents,
                    Scope::SuperRoot { .. } => return None,
                };
                pending.insert(br.key, Some(name));
                table.touch();
                self.log.safe(
                    label,
                    inum,
                    Some(br.data_off.offset()),
                    format!(
                        "long name of entry key {:#x} moved out of a reserved place",
                        br.key
                    ),
                );
            }
        }
        Some(br)
    }

    /// The content of the inode `br` points at, fixed field by field
    /// later, or why it cannot be saved. `expect` is the number it must
    /// carry. A block that fails its check code is kept as read when its
    /// fields are all sound (it is rewritten), else replaced by an older
    /// copy.
    fn inode_content(
        &mut self,
        scope: &Scope,
        br: &Blockref,
        expect: u64,
        what: &str,
    ) -> std::result::Result<(Blockref, InodeData, Source), String> {
        let vol = scope.vol();
        let label = scope.label().map(str::to_string);
        let parent_inum = scope.inum();
        match read_inode_block(vol, br) {
            Ok(d) if anomalies(&d, expect).len() <= 1 => Ok((
                *br,
                d,
                if misplaced(vol, br) {
                    Source::Moved
                } else {
                    Source::Verified
                },
            )),
            Ok(d) => Err(format!(
                "its block holds no inode: {}",
                anomalies(&d, expect).join(", ")
            )),
            Err(e) => {
                let why = e.to_string();
                let raw = read_raw(vol, br)
                    .filter(|b| b.len() >= INODE_BYTES)
                    .and_then(|b| InodeData::decode(&b, br.data_off.offset()).ok())
                    .filter(|d| anomalies(d, expect).is_empty())
                    .filter(|d| {
                        d.meta.has_direct_data()
                            || d.blockset()
                                .iter()
                                .filter(|b| {
                                    !b.is_empty()
                                        && (!plausible_extent(vol, b)
                                            || matches!(b.btype, BlockrefType::Invalid(_)))
                                })
                                .count()
                                <= 1
                    });
                if let Some(d) = raw {
                    self.log.lossy(
                        label.as_deref(),
                        parent_inum,
                        Some(br.data_off.offset()),
                        format!(
                            "{what} ({why}) kept as read: its fields are sound; rewritten with \
                             a good check code"
                        ),
                    );
                    return Ok((*br, d, Source::Salvaged));
                }
                let place = scope.place();
                let cand = self.older.candidates(&place, br).into_iter().find_map(|c| {
                    read_inode_block(vol, &c)
                        .ok()
                        .filter(|d| anomalies(d, expect).is_empty())
                        .map(|d| (c, d))
                });
                match cand {
                    Some((c, d)) => {
                        self.log.lossy(
                            label.as_deref(),
                            parent_inum,
                            Some(br.data_off.offset()),
                            format!(
                                "{what} ({why}) replaced by its copy of tid {:#x}",
                                c.modify_tid
                            ),
                        );
                        Ok((c, d, Source::Older))
                    }
                    None => Err(why),
                }
            }
        }
    }

    /// Fix an inode's fields; true when anything changed.
    fn fix_meta(&mut self, label: Option<&str>, key: u64, node: &mut InodeNode) -> bool {
        let at = Some(node.bref.data_off.offset());
        let mut changed = false;
        let m = &mut node.data.meta;
        let say = |log: &mut Log, what: String| {
            log.safe(label, Some(key), at, what);
        };
        if m.version != disk::inode::INODE_VERSION_ONE {
            say(self.log, format!("inode version {} set to 1", m.version));
            m.version = disk::inode::INODE_VERSION_ONE;
            changed = true;
        }
        if m.name_len as usize > INODE_MAXNAME {
            let n = node
                .data
                .filename
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(INODE_MAXNAME);
            say(
                self.log,
                format!("inode name_len {} set to {n}", node.data.meta.name_len),
            );
            node.data.meta.name_len = n as u16;
            changed = true;
        }
        let m = &mut node.data.meta;
        if !check_method::is_known(disk::dec_algo(m.check_algo)) {
            say(
                self.log,
                format!("inode check_algo {:#x} set to xxhash64", m.check_algo),
            );
            m.check_algo = check_method::DEFAULT;
            changed = true;
        }
        if !comp_method::is_known(disk::dec_algo(m.comp_algo)) {
            say(
                self.log,
                format!("inode comp_algo {:#x} set to lz4", m.comp_algo),
            );
            m.comp_algo = comp_method::DEFAULT;
            changed = true;
        }
        if m.has_direct_data() && m.size > disk::EMBEDDED_BYTES as u64 {
            say(
                self.log,
                format!(
                    "size {} of data in the inode set to {}",
                    m.size,
                    disk::EMBEDDED_BYTES
                ),
            );
            m.size = disk::EMBEDDED_BYTES as u64;
            changed = true;
        }
        changed
    }

    /// The type an inode of unknown type must have, from what it holds.
    fn infer_type(node: &InodeNode) -> ObjType {
        if node.data.meta.has_direct_data() {
            return ObjType::Regfile;
        }
        let set = node.data.blockset();
        let live: Vec<&Blockref> = set.iter().filter(|b| !b.is_empty()).collect();
        if live
            .iter()
            .any(|b| b.btype == BlockrefType::Dirent || b.key & DIRHASH_VISIBLE != 0)
        {
            ObjType::Directory
        } else {
            ObjType::Regfile
        }
    }

    /// Walk inode `node`'s tree and fix its size; returns its statistics.
    #[allow(clippy::too_many_arguments)]
    fn inode_tree(
        &mut self,
        vol: &Volume,
        label: &str,
        clid: Uuid,
        inum: u64,
        node: &mut InodeNode,
    ) -> SetStats {
        if node.data.meta.has_direct_data() {
            return SetStats::default();
        }
        let kind = match node.data.meta.obj_type {
            ObjType::Directory => Kind::Dir,
            ObjType::Regfile | ObjType::Softlink => Kind::File,
            _ => Kind::Other,
        };
        let mut data_end = 0u64;
        let size = node.data.meta.size;
        let btime = node.data.meta.btime;
        let tid = node.bref.mirror_tid;
        let InodeNode {
            table,
            pending_dirents,
            pending,
            ..
        } = node;
        let sub = {
            let mut scope = Scope::Inode(InodeScope {
                label,
                clid,
                inum,
                btime,
                kind,
                size,
                data_end: &mut data_end,
                pending_dirents,
                pending,
                vol,
            });
            self.table(table, &mut scope, None, tid, 0)
        };
        if table.is_dirty() || !node.pending.is_empty() || !node.pending_dirents.is_empty() {
            node.dirty = true;
        }
        let m = &mut node.data.meta;
        // A data block starting at or past the end: the size is what is
        // wrong (a block past the end is never written), so it grows to
        // the end of that block.
        if kind == Kind::File && data_end > 0 && data_end - BLOCK >= m.size {
            self.log.safe(
                Some(label),
                Some(inum),
                Some(node.bref.data_off.offset()),
                format!(
                    "size {} extended to {data_end}: it holds data at {:#x}",
                    m.size,
                    data_end - BLOCK
                ),
            );
            m.size = data_end;
            node.dirty = true;
        }
        let m = &mut node.data.meta;
        if m.size > FILE_SIZE_MAX
            || (m.obj_type == ObjType::Softlink && m.size > crate::pfs::SYMLINK_MAX)
        {
            let want = if m.obj_type == ObjType::Softlink {
                data_end.min(crate::pfs::SYMLINK_MAX)
            } else {
                data_end
            };
            self.log.safe(
                Some(label),
                Some(inum),
                Some(node.bref.data_off.offset()),
                format!("size {} set to {want}, the end of its data", m.size),
            );
            m.size = want;
            node.dirty = true;
        }
        sub
    }

    /// An inode of a PFS's index.
    fn inode(
        &mut self,
        table: &mut BlockTable,
        slot: usize,
        scope: &mut Scope,
    ) -> Option<Blockref> {
        let br = table.entries()[slot];
        if br.key & DIRHASH_VISIBLE != 0 {
            // An inode filed by name among the root's entries (DragonFly's
            // pre-2017 layout): kept if it verifies, not converted.
            return match read_inode_block(scope.vol(), &br) {
                Ok(_) => Some(br),
                Err(e) => {
                    let why = e.to_string();
                    self.cut(table, slot, scope, &why);
                    None
                }
            };
        }
        let key = br.key;
        let (use_br, data, source) =
            match self.inode_content(scope, &br, key, &format!("inode {key}")) {
                Ok(x) => x,
                Err(why) => {
                    self.cut(table, slot, scope, &why);
                    return None;
                }
            };
        let rewrite = matches!(source, Source::Moved | Source::Salvaged);
        if use_br != br {
            table.set_slot(slot, use_br);
        }
        let Scope::PfsRoot {
            cx, inodes, vol, ..
        } = scope
        else {
            return None;
        };
        let vol: &Volume = vol;
        let label = cx.label.clone();
        if data.meta.inum != key {
            cx.misnumbered.push((
                key,
                data.meta.inum,
                self.unverified > 0 && !salvaged_here(source),
            ));
        }
        cx.keys.insert(key);
        cx.max_inum = cx.max_inum.max(key);
        let mut node = InodeNode::from_disk(use_br, data);
        let mut dirty = rewrite;
        if matches!(
            node.data.meta.obj_type,
            ObjType::Invalid(_) | ObjType::Unknown
        ) {
            let t = Self::infer_type(&node);
            self.log.safe(
                Some(&label),
                Some(key),
                Some(use_br.data_off.offset()),
                format!(
                    "inode type {} set to {} from what it holds",
                    node.data.meta.obj_type.to_u8(),
                    t.name()
                ),
            );
            node.data.meta.obj_type = t;
            dirty = true;
        }
        dirty |= self.fix_meta(Some(&label), key, &mut node);
        let salvaged = source == Source::Salvaged;
        self.unverified += usize::from(salvaged);
        let sub = self.inode_tree(vol, &label, cx.clid, key, &mut node);
        self.unverified -= usize::from(salvaged);
        if !dirty && !node.dirty && Self::stats_differ(&use_br, &sub, true) {
            self.log.safe(
                Some(&label),
                Some(key),
                Some(use_br.data_off.offset()),
                format!(
                    "inode {key}: counts recomputed (data {} inodes {})",
                    sub.data_count, sub.inode_count
                ),
            );
            dirty = true;
        }
        node.dirty |= dirty;
        let mut b = use_br;
        sub.apply(&mut b);
        if node.dirty || node.data.meta.inum != key {
            inodes.insert(key, InodeLock::new(node));
            table.touch();
        }
        Some(b)
    }

    /// A PFS root in the super-root: the whole PFS.
    fn pfs_root(
        &mut self,
        table: &mut BlockTable,
        slot: usize,
        scope: &mut Scope,
    ) -> Option<Blockref> {
        let br = table.entries()[slot];
        let vol = scope.vol();
        let ok = |d: &InodeData| {
            let m = &d.meta;
            let mut bad = 0;
            bad += usize::from(m.inum != ROOT_INUM);
            bad += usize::from(m.obj_type != ObjType::Directory);
            bad += usize::from(m.version != disk::inode::INODE_VERSION_ONE);
            bad += usize::from(!name_hash_ok(d.name(), br.key) || d.name().is_empty());
            bad += usize::from(!m.is_pfs_root());
            bad += usize::from(m.has_direct_data());
            bad += usize::from(meta_damage(m).is_some());
            bad
        };
        let got = match read_inode_block(vol, &br) {
            Ok(d) if ok(&d) <= 1 && !d.meta.has_direct_data() => Ok((br, d, misplaced(vol, &br))),
            Ok(_) => Err("its block holds no PFS root".to_string()),
            Err(e) => Err(e.to_string()),
        };
        let got = got.or_else(|why| {
            let cand = self
                .older
                .candidates(&Place::SuperRoot, &br)
                .into_iter()
                .find_map(|c| {
                    read_inode_block(vol, &c)
                        .ok()
                        .filter(|d| ok(d) == 0)
                        .map(|d| (c, d))
                });
            if let Some((c, d)) = cand {
                self.log.lossy(
                    None,
                    None,
                    Some(br.data_off.offset()),
                    format!(
                        "PFS root key {:#x} ({why}) replaced by its copy of tid {:#x}: PFS {} \
                         is as of that flush",
                        br.key,
                        c.modify_tid,
                        String::from_utf8_lossy(d.name())
                    ),
                );
                return Ok((c, d, false));
            }
            let raw = read_raw(vol, &br)
                .filter(|b| b.len() >= INODE_BYTES)
                .and_then(|b| InodeData::decode(&b, 0).ok())
                .filter(|d| ok(d) == 0);
            match raw {
                Some(d) => {
                    self.log.lossy(
                        None,
                        None,
                        Some(br.data_off.offset()),
                        format!(
                            "PFS root of {} ({why}) kept as read: its fields are sound; \
                             rewritten with a good check code",
                            String::from_utf8_lossy(d.name())
                        ),
                    );
                    Ok((br, d, true))
                }
                None => Err(why),
            }
        });
        let (use_br, data, rewrite) = match got {
            Ok(x) => x,
            Err(why) => {
                self.fatal
                    .push(format!("the PFS at key {:#x} ({why})", br.key));
                self.cut(table, slot, scope, &why);
                return None;
            }
        };
        if use_br != br {
            table.set_slot(slot, use_br);
        }
        let label = String::from_utf8_lossy(data.name()).into_owned();
        let at = Some(use_br.data_off.offset());
        let mut node = InodeNode::from_disk(use_br, data);
        let mut dirty = rewrite;
        {
            let m = &mut node.data.meta;
            let mut fix = |cond: bool, what: &str, log: &mut Log| {
                if cond {
                    log.safe(Some(&label), Some(ROOT_INUM), at, what.to_string());
                    dirty = true;
                }
                cond
            };
            if fix(m.inum != ROOT_INUM, "PFS root number set to 1", self.log) {
                m.inum = ROOT_INUM;
            }
            if fix(
                m.obj_type != ObjType::Directory,
                "PFS root type set to directory",
                self.log,
            ) {
                m.obj_type = ObjType::Directory;
            }
            if fix(
                !m.is_pfs_root() || use_br.flags & disk::BREF_FLAG_PFSROOT == 0,
                "PFS root flags set",
                self.log,
            ) {
                m.op_flags |= disk::OPFLAG_PFSROOT;
            }
            if fix(
                m.version != disk::inode::INODE_VERSION_ONE,
                "PFS root version set to 1",
                self.log,
            ) {
                m.version = disk::inode::INODE_VERSION_ONE;
            }
        }
        dirty |= self.fix_meta(Some(&label), ROOT_INUM, &mut node);
        let mut key = use_br.key;
        if !name_hash_ok(node.data.name(), key) {
            let hash = dirhash(node.data.name());
            let taken: BTreeSet<u64> = table
                .entries()
                .iter()
                .filter(|b| !b.is_empty())
                .map(|b| b.key)
                .collect();
            if let Some(k) = (hash..=(hash | disk::DIRHASH_LOMASK)).find(|k| !taken.contains(k)) {
                self.log.safe(
                    Some(&label),
                    Some(ROOT_INUM),
                    at,
                    format!("PFS root filed under key {key:#x} moved to its label's hash {k:#x}"),
                );
                table.set_slot(slot, Blockref::EMPTY);
                key = k;
                dirty = true;
            }
        }
        let Scope::SuperRoot { pfs, vol } = scope else {
            return None;
        };
        let vol: &Volume = vol;
        if pfs.contains_key(&label) {
            self.log.safe(
                Some(&label),
                Some(ROOT_INUM),
                at,
                format!(
                    "a second PFS labelled {label} (key {:#x}) is left as it is",
                    br.key
                ),
            );
            let mut b = use_br;
            b.key = key;
            return Some(b);
        }
        let mut cx = PfsCtx {
            label: label.clone(),
            clid: node.data.meta.pfs_clid,
            root_btime: node.data.meta.btime,
            misnumbered: Vec::new(),
            keys: BTreeSet::new(),
            max_inum: 0,
        };
        let mut state = PfsState::new(key, node);
        let sub = {
            let PfsState { root, inodes, .. } = &mut state;
            let inodes = inodes.get_mut();
            let tid = root.bref.mirror_tid;
            let InodeNode {
                table: rtable,
                pending_dirents,
                ..
            } = root;
            let mut s = Scope::PfsRoot {
                cx: &mut cx,
                inodes,
                pending_dirents,
                vol,
            };
            self.table(rtable, &mut s, None, tid, 0)
        };
        self.resolve_numbers(vol, &mut state, &cx);
        let root = &mut state.root;
        if root.table.is_dirty() || !root.pending_dirents.is_empty() {
            dirty = true;
        }
        if !dirty && Self::stats_differ(&use_br, &sub, false) {
            self.log.safe(
                Some(&label),
                Some(ROOT_INUM),
                at,
                format!(
                    "PFS root: counts recomputed (data {} inodes {})",
                    sub.data_count, sub.inode_count
                ),
            );
            dirty = true;
        }
        if root.data.meta.pfs_inum < cx.max_inum {
            self.log.safe(
                Some(&label),
                Some(ROOT_INUM),
                at,
                format!(
                    "PFS inode counter {} raised to its highest inode {}",
                    root.data.meta.pfs_inum, cx.max_inum
                ),
            );
            root.data.meta.pfs_inum = cx.max_inum;
            *state.last_inum.get_mut() = cx.max_inum;
            dirty = true;
        }
        root.dirty |= dirty;
        if root.dirty {
            table.touch();
        }
        pfs.insert(label, state);
        let mut b = use_br;
        b.key = key;
        sub.apply(&mut b);
        Some(b)
    }

    /// Inodes whose number is not their index key: an inode whose number
    /// is filed under its own key as well is a block filed twice (the
    /// entry under the other key is cut); otherwise the key is right and
    /// the number is set to it.
    fn resolve_numbers(&mut self, vol: &Volume, state: &mut PfsState, cx: &PfsCtx) {
        for &(key, claimed, key_unverified) in &cx.misnumbered {
            let free = !cx.keys.contains(&claimed)
                && claimed >= disk::INODE_START
                && claimed & DIRHASH_VISIBLE == 0;
            if key_unverified && free {
                // The key is what the damaged block held; the inode's
                // own number passed its check code.
                if let Some(n) = state.inodes.get_mut().remove(&key) {
                    if state.root.table.delete(vol, key).is_ok() {
                        n.lock().dirty = true;
                        state.inodes.get_mut().insert(claimed, n);
                        state.root.dirty = true;
                        self.log.safe(
                            Some(&cx.label),
                            Some(claimed),
                            None,
                            format!(
                                "inode {claimed}, filed under key {key} in a block kept as \
                                 read, filed again under its number"
                            ),
                        );
                        continue;
                    }
                    state.inodes.get_mut().insert(key, n);
                }
            }
            if cx.keys.contains(&claimed) {
                state.inodes.get_mut().remove(&key);
                match state.root.table.delete(vol, key) {
                    Ok(_) => {
                        state.root.dirty = true;
                        self.log.lossy(
                            Some(&cx.label),
                            Some(key),
                            None,
                            format!(
                                "index entry {key} cut: it points at inode {claimed}'s block, \
                                 which is filed under its own number too"
                            ),
                        );
                    }
                    Err(e) => log::warn!("index entry {key} could not be cut: {e}"),
                }
            } else if let Some(mut n) = state.inodes.get_mut().get(&key).map(InodeLock::lock) {
                self.log.safe(
                    Some(&cx.label),
                    Some(key),
                    None,
                    format!("inode number {claimed} set to {key}, its index key"),
                );
                n.data.meta.inum = key;
                n.dirty = true;
            }
        }
        // Inodes kept only to resolve their number, unchanged after all.
        state.inodes.get_mut().retain(|_, n| n.lock().dirty);
    }
}

/// The super-root inode of `vol`'s header: read and checked, or kept as
/// read when only its check code is wrong. `None` when it cannot be used.
pub(super) fn super_root(vol: &Volume, log: &mut Log) -> Option<InodeNode> {
    let mut br = vol.header.sroot_blockset[0];
    if br.is_empty() || br.data_off.bytes() == 0 {
        return None;
    }
    let sane = |d: &InodeData| {
        !d.meta.has_direct_data()
            && d.blockset()
                .iter()
                .filter(|b| !b.is_empty())
                .all(|b| matches!(b.btype, BlockrefType::Inode | BlockrefType::Indirect))
    };
    let mut rewrite = false;
    if br.btype != BlockrefType::Inode {
        log.safe(
            None,
            Some(0),
            Some(0x200),
            format!("super-root blockref type {} set to inode", br.btype.name()),
        );
        br.btype = BlockrefType::Inode;
        rewrite = true;
    }
    let data = match vol.read_physical(&br) {
        Ok(b) => InodeData::decode(&b, br.data_off.offset())
            .ok()
            .filter(|d| sane(d) || d.meta.pfs_type & 15 == disk::pfs_type::SUPROOT)?,
        Err(e) => {
            let raw = read_raw(vol, &br)
                .filter(|b| b.len() >= INODE_BYTES)
                .and_then(|b| InodeData::decode(&b, 0).ok())
                .filter(|d| sane(d) && d.meta.pfs_type & 15 == disk::pfs_type::SUPROOT)?;
            log.lossy(
                None,
                Some(0),
                Some(br.data_off.offset()),
                format!(
                    "super-root ({e}) kept as read: it holds only PFS roots; rewritten with a \
                     good check code"
                ),
            );
            rewrite = true;
            raw
        }
    };
    let mut data = data;
    if data.meta.has_direct_data() {
        let set = data.blockset();
        let plausible = set.iter().filter(|b| !b.is_empty()).all(|b| {
            matches!(b.btype, BlockrefType::Inode | BlockrefType::Indirect)
                && plausible_extent(vol, b)
        });
        if !plausible {
            return None;
        }
        data.meta.op_flags &= !disk::OPFLAG_DIRECTDATA;
        log.safe(
            None,
            Some(0),
            Some(br.data_off.offset()),
            "super-root's direct-data flag cleared: it holds PFS roots".into(),
        );
        rewrite = true;
    }
    let mut node = InodeNode::from_disk(br, data);
    if node.data.meta.pfs_type & 15 != disk::pfs_type::SUPROOT {
        log.safe(
            None,
            Some(0),
            Some(br.data_off.offset()),
            format!(
                "super-root pfs_type {:#x} set to SUPROOT",
                node.data.meta.pfs_type
            ),
        );
        node.data.meta.pfs_type = disk::pfs_type::SUPROOT;
        rewrite = true;
    }
    if misplaced(vol, &br) {
        rewrite = true;
    }
    node.dirty = rewrite;
    Some(node)
}
