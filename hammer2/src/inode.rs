//! Inodes being modified: an inode's meta and its blockref tree in
//! memory (`BlockTable`), file data written but not yet flushed
//! (whole 64 KiB logical blocks, on pages of the page layer: `DataBuf`),
//! and long dirent names waiting for their block. Reads see the modified state; the flush writes it out.
//!
//! Files up to 512 bytes keep their data in the inode (DIRECTDATA), as
//! DragonFly does for new files and symlinks; a file that grows past that
//! moves its data into logical block 0.

use crate::blocktable::{BlockTable, TreeKind};
use crate::databuf::DataBuf;
use crate::dirhash::dirhash;
use crate::disk::{
    self, Blockref, BlockrefType, DirentHead, InodeData, ObjType, DATA_BLOCK_BYTES, DIRHASH_LOMASK,
    EMBEDDED_BYTES, OPFLAG_DIRECTDATA, SET_COUNT,
};
use crate::error::{Error, Result};
use crate::pfs::{check_data_leaf, DIRENT_EMBEDDED_NAME_MAX, NAME_MAX};
use crate::reserve::BlockRanges;
use crate::volume::Volume;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const BLOCK: u64 = DATA_BLOCK_BYTES;

/// A file data block read and decoded (check code verified), at most
/// 64 KiB; errors carry the inode and file offset.
fn read_data_block(vol: &Volume, br: &Blockref, inum: u64, lbase: u64) -> Result<Vec<u8>> {
    let mut b = vol
        .read_block(br)
        .map_err(|e| e.with_place(None, Some(inum), Some(lbase)))?;
    b.truncate(BLOCK as usize);
    Ok(b)
}

/// How far past a sequential read its read-ahead reaches.
const READ_AHEAD: u64 = 2 << 20;

/// A 64 KiB logical block written since the last flush.
///
/// A write that covers part of a block whose old bytes are not in the
/// buffer cache does not read them (the write would wait for the device):
/// the block keeps the ranges written and the blockref of the old block
/// (`under`), and the old bytes are merged in where the block is needed
/// whole: by a read (`ReadPlan::run`, outside the mount's lock), by the
/// flush (`merged`, reading in device order), or by an operation that
/// changes the block otherwise (truncate, hole punch), which completes
/// it first.
///
/// Its bytes are on a page of the page layer when the volume's device
/// has one (`DataBuf`), so every change that needs a new buffer takes
/// it before changing anything (a shortage fails the change whole).
/// Read plans share the block (`Arc`); a change to a shared block
/// changes a copy (`unshare`).
#[derive(Debug, Default)]
pub struct PendingBlock {
    /// At most 64 KiB; the bytes past its end are zeros. With `under`,
    /// only the written ranges are the file's.
    pub bytes: DataBuf,
    pub under: Option<Under>,
}

/// The old block under a block written in part, and the ranges written.
#[derive(Clone, Debug)]
pub struct Under {
    pub base: Blockref,
    /// Byte ranges `[lo, hi)` within the block, sorted, disjoint, not
    /// touching.
    pub written: Vec<(usize, usize)>,
}

impl PendingBlock {
    /// A block whose every byte is the file's.
    pub fn whole(bytes: DataBuf) -> PendingBlock {
        PendingBlock { bytes, under: None }
    }

    /// A block holding a copy of `bytes` (at most 64 KiB), every byte the
    /// file's, on a page of `vol`'s page layer if it has one.
    pub fn copy_of(vol: &Volume, bytes: &[u8]) -> Result<PendingBlock> {
        Ok(PendingBlock::whole(DataBuf::copy_of(
            vol.page_layer(),
            bytes,
        )?))
    }

    /// An empty block on a page of `vol`'s page layer if it has one.
    fn empty(vol: &Volume) -> Result<PendingBlock> {
        Ok(PendingBlock::whole(DataBuf::new(vol.page_layer())?))
    }

    fn over(vol: &Volume, base: Blockref) -> Result<PendingBlock> {
        Ok(PendingBlock {
            bytes: DataBuf::new(vol.page_layer())?,
            under: Some(Under {
                base,
                written: Vec::new(),
            }),
        })
    }

    /// A copy, on a new buffer of the same kind.
    fn try_clone(&self) -> Result<PendingBlock> {
        Ok(PendingBlock {
            bytes: self.bytes.try_clone()?,
            under: self.under.clone(),
        })
    }

    /// Whether the old block's bytes still have to be merged in.
    pub fn is_partial(&self) -> bool {
        self.under.is_some()
    }

    /// Put `src` at `at` within the block, growing it as needed.
    fn put(&mut self, at: usize, src: &[u8]) {
        let end = at + src.len();
        self.bytes.put(at, src);
        if let Some(u) = &mut self.under {
            add_range(&mut u.written, at, end);
        }
    }

    /// The block's bytes, with the old block's merged under the ranges
    /// written when it is partial (read through `vol`; `inum` and
    /// `lbase` name it in errors). Not more than 64 KiB.
    pub fn merged(&self, vol: &Volume, inum: u64, lbase: u64) -> Result<Vec<u8>> {
        let Some(u) = &self.under else {
            return Ok(self.bytes.to_vec());
        };
        let mut out = read_data_block(vol, &u.base, inum, lbase)?;
        if out.len() < self.bytes.len() {
            out.resize(self.bytes.len(), 0);
        }
        for &(lo, hi) in &u.written {
            out[lo..hi].copy_from_slice(&self.bytes[lo..hi]);
        }
        Ok(out)
    }

    /// Bytes of memory the block holds (a whole page when on one).
    pub fn memory(&self) -> usize {
        self.bytes.memory()
    }
}

/// The pending block in `entry`, to change: a copy first when a read plan
/// or a batch shares it. The copy may need a new buffer, so changes call
/// this before they change anything; it reads the same, so making it
/// early undoes nothing.
fn unshare(entry: &mut Arc<PendingBlock>) -> Result<&mut PendingBlock> {
    if Arc::get_mut(entry).is_none() {
        *entry = Arc::new(entry.try_clone()?);
    }
    Arc::get_mut(entry)
        .ok_or_else(|| Error::corrupt("a pending block copied is still shared".into(), 0))
}

/// The whole 64 KiB blocks of a write, copied onto buffers before the
/// write takes the mount's lock (`Filled::of`), so the copy of the
/// bytes, most of a large write's time in memory, happens beside other
/// requests. The write then puts them in place of its blocks
/// (`InodeNode::write`); what it does not use is given back when this
/// goes.
#[derive(Debug, Default)]
pub struct Filled {
    /// By block offset, in order; taken by the write that uses them.
    blocks: Vec<(u64, Option<DataBuf>)>,
}

impl Filled {
    /// Copies of the whole blocks of `buf` written at `offset`, on
    /// `vol`'s page layer if it has one. Where no page can be had now,
    /// none from there on: the write takes its own under the lock (and
    /// fails whole there if it still cannot).
    pub fn of(vol: &Volume, offset: u64, buf: &[u8]) -> Filled {
        let mut blocks = Vec::new();
        let end = offset.saturating_add(buf.len() as u64);
        let mut lbase = offset.next_multiple_of(BLOCK);
        while lbase.saturating_add(BLOCK) <= end {
            let from = (lbase - offset) as usize;
            match DataBuf::copy_of(vol.page_layer(), &buf[from..from + BLOCK as usize]) {
                Ok(b) => blocks.push((lbase, Some(b))),
                Err(_) => break,
            }
            lbase += BLOCK;
        }
        Filled { blocks }
    }

    /// Whether the whole block at `lbase` is here.
    fn has(&self, lbase: u64) -> bool {
        self.blocks
            .binary_search_by_key(&lbase, |(b, _)| *b)
            .is_ok_and(|i| self.blocks[i].1.is_some())
    }

    /// The whole block at `lbase`, taken.
    fn take(&mut self, lbase: u64) -> Option<DataBuf> {
        let i = self.blocks.binary_search_by_key(&lbase, |(b, _)| *b).ok()?;
        self.blocks[i].1.take()
    }
}

/// Add `[lo, hi)` to sorted, disjoint, non-touching `ranges`.
fn add_range(ranges: &mut Vec<(usize, usize)>, lo: usize, hi: usize) {
    let (mut lo, mut hi) = (lo, hi);
    let mut out = Vec::with_capacity(ranges.len() + 1);
    let mut placed = false;
    for &(a, b) in ranges.iter() {
        if b < lo {
            out.push((a, b));
        } else if a > hi {
            if !placed {
                out.push((lo, hi));
                placed = true;
            }
            out.push((a, b));
        } else {
            lo = lo.min(a);
            hi = hi.max(b);
        }
    }
    if !placed {
        out.push((lo, hi));
    }
    *ranges = out;
}

/// `read_data_block` if the block is in the buffer cache; `None` when
/// reading it would wait for the device.
fn read_cached_block(
    vol: &Volume,
    br: &Blockref,
    inum: u64,
    lbase: u64,
) -> Result<Option<Vec<u8>>> {
    let b = vol
        .read_block_cached(br)
        .map_err(|e| e.with_place(None, Some(inum), Some(lbase)))?;
    Ok(b.map(|mut b| {
        b.truncate(BLOCK as usize);
        b
    }))
}

/// Where a read's bytes come from (`InodeNode::read_plan`), so that the
/// blocks are read and decoded without the mount's lock: copy-on-write
/// blocks never change under a reader, and every block is verified as
/// it is read.
pub struct ReadPlan {
    inum: u64,
    /// Bytes already in hand (direct data, or nothing to read).
    out: Option<Vec<u8>>,
    out_len: usize,
    parts: Vec<ReadPart>,
    /// The blocks on disk after the read's, for a sequential reader
    /// (read-ahead): brought into the device's cache with the read's own
    /// (`Volume::cluster_read`), not copied.
    ahead: Vec<Blockref>,
}

struct ReadPart {
    /// Where in the result, how many bytes, from where in the block.
    dst: usize,
    len: usize,
    within: usize,
    lbase: u64,
    src: ReadSource,
}

enum ReadSource {
    /// A pending block: its bytes past its end are zeros (a partial one
    /// is merged with its old block as it is read).
    Memory(Arc<PendingBlock>),
    Disk(Blockref),
}

impl ReadPlan {
    fn ready(inum: u64, out: Vec<u8>) -> ReadPlan {
        ReadPlan {
            inum,
            out_len: out.len(),
            out: Some(out),
            parts: Vec::new(),
            ahead: Vec::new(),
        }
    }

    /// The blocks on disk the plan reads.
    pub fn disk_blocks(&self) -> usize {
        self.parts
            .iter()
            .filter(|p| matches!(p.src, ReadSource::Disk(_)))
            .count()
    }

    /// Read the plan's blocks (through `vol`, which may be a reader of
    /// the mount's volume) and assemble the bytes; holes read as zeros.
    pub fn run(self, vol: &Volume) -> Result<Vec<u8>> {
        if let Some(out) = self.out {
            return Ok(out);
        }
        // The blocks on disk in as few device reads as their layout
        // allows (a file written in order lies in a row), read-ahead
        // included.
        let disk = self.parts.iter().filter_map(|p| match &p.src {
            ReadSource::Disk(br) => Some(br),
            ReadSource::Memory(_) => None,
        });
        vol.cluster_read(disk.chain(self.ahead.iter()));
        let mut out = vec![0u8; self.out_len];
        for p in &self.parts {
            let dst = &mut out[p.dst..p.dst + p.len];
            let mut copy = |b: &[u8]| {
                let end = b.len().min(p.within + p.len);
                if end > p.within {
                    dst[..end - p.within].copy_from_slice(&b[p.within..end]);
                }
            };
            match &p.src {
                ReadSource::Memory(b) if !b.is_partial() => copy(&b.bytes),
                ReadSource::Memory(b) => copy(&b.merged(vol, self.inum, p.lbase)?),
                // In place from the cache, checked once per residency.
                ReadSource::Disk(br) => vol
                    .with_data_block(br, copy)
                    .map_err(|e| e.with_place(None, Some(self.inum), Some(p.lbase)))?,
            }
        }
        Ok(out)
    }
}

/// A change to a file's data, for `InodeNode::new_pending_blocks`.
#[derive(Clone, Copy, Debug)]
pub enum PendingChange {
    Write { offset: u64, len: u64 },
    Truncate { size: u64 },
}

/// An inode in memory.
#[derive(Clone, Debug)]
pub struct InodeNode {
    /// The blockref the inode was read through (EMPTY for a new inode).
    pub bref: Blockref,
    pub data: InodeData,
    /// The tree under the inode's blockset.
    pub table: BlockTable,
    /// File data written since the last flush, by 64 KiB block offset.
    /// Shared so a pipelined flush can write a block while the frontend
    /// goes on (a write to a block being flushed copies it first). A
    /// block is at most 64 KiB long and may be shorter: the bytes past
    /// its end are zeros (so a 4 KiB file holds 4 KiB, not 64). A block
    /// written in part may wait for its old bytes (`PendingBlock`).
    pub pending: BTreeMap<u64, Arc<PendingBlock>>,
    /// Dirents added since the last flush, by key, with the name when it
    /// is over 64 bytes and still needs its 1 KiB block.
    pub pending_dirents: BTreeMap<u64, Option<Vec<u8>>>,
    /// Anything here differs from disk.
    pub dirty: bool,
    /// Whether the flush tries to compress this file's next block.
    pub comp_heuristic: crate::strategy::CompHeuristic,
    /// 64 KiB blocks fallocate reserved room for (`reserve.rs`), by
    /// block number.
    pub reserved: BlockRanges,
    /// Where the last read of this file ended, and how far its
    /// read-ahead has read (`read_plan`).
    pub read_ahead: ReadAhead,
}

/// A directory entry as listed: (key, name, head).
pub type Listed = (u64, Vec<u8>, DirentHead);

/// A file's read-ahead state: where its last read ended and how far
/// read-ahead has read. Hints, updated by reads that share the mount's
/// lock (`InodeNode::read_plan_loaded` takes `&self`); two reads of one
/// file at once may each see the other's or their own, which only moves
/// where read-ahead starts.
#[derive(Debug, Default)]
pub struct ReadAhead {
    next: AtomicU64,
    end: AtomicU64,
}

impl Clone for ReadAhead {
    fn clone(&self) -> ReadAhead {
        ReadAhead {
            next: AtomicU64::new(self.next.load(Ordering::Relaxed)),
            end: AtomicU64::new(self.end.load(Ordering::Relaxed)),
        }
    }
}

/// An inode in memory behind its own lock (DragonFly's inode lock), a
/// handle shared by the PFS's inode map (`mount::InodeMap`) and whoever
/// cloned it out. A change made with the daemon's transaction lock
/// shared (`mount/shared.rs`: a write, a setattr, a create, an unlink, a
/// link or a rename) and a query beside it take it, several in
/// ascending inode number order; whatever holds the mount exclusive
/// takes it too (nobody else does then, so it never waits). A panic
/// under the lock leaves the inode as a failed change does (changes are
/// applied whole or refused), so the lock does not poison.
#[derive(Debug, Clone)]
pub struct InodeLock(Arc<parking_lot::Mutex<InodeNode>>);

/// An inode locked through its own handle (`InodeLock::lock_owned`).
pub type InodeGuard = parking_lot::ArcMutexGuard<parking_lot::RawMutex, InodeNode>;

impl InodeLock {
    pub fn new(n: InodeNode) -> InodeLock {
        InodeLock(Arc::new(parking_lot::Mutex::new(n)))
    }

    /// The inode, locked.
    pub fn lock(&self) -> parking_lot::MutexGuard<'_, InodeNode> {
        self.0.lock()
    }

    /// The inode, locked by a guard that holds the handle.
    pub fn lock_owned(&self) -> InodeGuard {
        parking_lot::Mutex::lock_arc(&self.0)
    }
}

impl InodeNode {
    pub fn from_disk(bref: Blockref, data: InodeData) -> InodeNode {
        let table = BlockTable::new(if data.meta.has_direct_data() {
            vec![Blockref::EMPTY; SET_COUNT]
        } else {
            data.blockset().to_vec()
        });
        InodeNode {
            bref,
            data,
            table,
            pending: BTreeMap::new(),
            pending_dirents: BTreeMap::new(),
            dirty: false,
            comp_heuristic: Default::default(),
            reserved: BlockRanges::default(),
            read_ahead: ReadAhead::default(),
        }
    }

    pub fn new(data: InodeData) -> InodeNode {
        let mut n = InodeNode::from_disk(Blockref::EMPTY, data);
        n.dirty = true;
        n
    }

    pub fn inum(&self) -> u64 {
        self.data.meta.inum
    }

    pub fn obj_type(&self) -> ObjType {
        self.data.meta.obj_type
    }

    pub fn size(&self) -> u64 {
        self.data.meta.size
    }

    /// Which DragonFly indirect-block rule this inode's tree follows.
    pub fn tree_kind(&self) -> TreeKind {
        match self.obj_type() {
            ObjType::Regfile | ObjType::Softlink => TreeKind::File,
            _ => TreeKind::Directory,
        }
    }

    fn direct(&self) -> bool {
        self.data.meta.has_direct_data()
    }

    /// The logical block at `lbase` as stored on disk, at most 64 KiB
    /// (the bytes past its end are zeros; empty for a hole). Anything in
    /// the block's key range but one DATA blockref at `lbase` is damage.
    fn disk_block(&mut self, vol: &Volume, lbase: u64) -> Result<Vec<u8>> {
        match self.disk_leaf(vol, lbase)? {
            None => Ok(Vec::new()),
            Some(br) => read_data_block(vol, &br, self.inum(), lbase),
        }
    }

    /// The pending copy of block `lbase`, whole, to change: made from
    /// disk when absent, a partial one merged with its old bytes first
    /// (`complete`), a shared one copied (`unshare`). Everything that can
    /// fail happens before the block changes.
    fn pending_block(&mut self, vol: &Volume, lbase: u64) -> Result<&mut DataBuf> {
        if !self.pending.contains_key(&lbase) {
            let b = PendingBlock::copy_of(vol, &self.disk_block(vol, lbase)?)?;
            self.pending.insert(lbase, Arc::new(b));
        } else {
            self.complete(vol, lbase)?;
        }
        let blk = self
            .pending
            .get_mut(&lbase)
            .ok_or_else(|| Error::corrupt(format!("pending block {lbase:#x} vanished"), 0))?;
        Ok(&mut unshare(blk)?.bytes)
    }

    /// Merge the old bytes into pending block `lbase` if it is partial
    /// (a read, which fails before anything changes).
    fn complete(&mut self, vol: &Volume, lbase: u64) -> Result<()> {
        let inum = self.inum();
        if let Some(b) = self.pending.get(&lbase).filter(|b| b.is_partial()) {
            let merged = PendingBlock::copy_of(vol, &b.merged(vol, inum, lbase)?)?;
            self.pending.insert(lbase, Arc::new(merged));
        }
        Ok(())
    }

    /// Copy `out.len()` bytes of block `lbase` from `within` into `out`.
    /// Where the bytes `offset..offset+len` come from (short at end of
    /// file), for `ReadPlan::run`: pending blocks (shared, not copied),
    /// the blockrefs of blocks on disk (the tree over the range is
    /// loaded here; no data block is read), holes. Taken under the
    /// mount's lock; the plan runs without it.
    pub fn read_plan(&mut self, vol: &Volume, offset: u64, len: usize) -> Result<ReadPlan> {
        let end = self.size().min(offset.saturating_add(len as u64));
        if offset < end && !self.direct() {
            // Load the tree over the range; the plan then finds it all
            // in memory.
            let inum = self.inum();
            self.table
                .range(vol, offset & !(BLOCK - 1), end - 1)
                .map_err(|e| e.with_place(None, Some(inum), Some(offset & !(BLOCK - 1))))?;
        }
        self.read_plan_loaded(offset, len).unwrap_or_else(|| {
            Err(Error::corrupt(
                "indirect blocks nested too deep".into(),
                self.bref.data_off.offset(),
            ))
        })
    }

    /// `read_plan` from what is in memory alone, for a read that shares
    /// the mount's lock: `None` when an indirect block over the range is
    /// not loaded (`read_plan` loads it).
    pub fn read_plan_loaded(&self, offset: u64, len: usize) -> Option<Result<ReadPlan>> {
        let inum = self.inum();
        let size = self.size();
        if offset >= size || len == 0 {
            return Some(Ok(ReadPlan::ready(inum, Vec::new())));
        }
        let end = size.min(offset.saturating_add(len as u64));
        let out_len = (end - offset) as usize;
        if self.direct() {
            let u = &self.data.u;
            let mut out = u
                [(offset as usize).min(EMBEDDED_BYTES)..(end as usize).min(EMBEDDED_BYTES)]
                .to_vec();
            out.resize(out_len, 0);
            return Some(Ok(ReadPlan::ready(inum, out)));
        }
        let mut parts = Vec::new();
        let mut pos = offset;
        while pos < end {
            let lbase = pos & !(BLOCK - 1);
            let hi = end.min(lbase + BLOCK);
            let part = |src| ReadPart {
                dst: (pos - offset) as usize,
                len: (hi - pos) as usize,
                within: (pos - lbase) as usize,
                lbase,
                src,
            };
            if let Some(b) = self.pending.get(&lbase) {
                parts.push(part(ReadSource::Memory(b.clone())));
            } else {
                match self.disk_leaf_loaded(lbase)? {
                    Ok(Some(br)) => parts.push(part(ReadSource::Disk(br))),
                    Ok(None) => {}
                    Err(e) => return Some(Err(e)),
                }
            }
            pos = hi;
        }
        // Read-ahead. A read is sequential when it starts within half a
        // window of where the last one ended (the kernel's parallel
        // read-ahead sends requests a little out of order). A sequential
        // reader that comes within half a window of where read-ahead has
        // read gets the blocks up to a window past its read read with its
        // own, so read-ahead goes to the device in reads of about half a
        // window. Any other read starts a new stream there. Only the tree
        // in memory is looked at: a block under an index block not loaded
        // ends the read-ahead.
        let ra = &self.read_ahead;
        let mut ahead_end = ra.end.load(Ordering::Relaxed);
        let sequential = offset.abs_diff(ra.next.load(Ordering::Relaxed)) <= READ_AHEAD / 2;
        if !sequential || ahead_end > end.saturating_add(READ_AHEAD) {
            ahead_end = end;
        }
        let mut ahead = Vec::new();
        if sequential && end + READ_AHEAD / 2 >= ahead_end {
            let mut lbase = end.max(ahead_end).next_multiple_of(BLOCK);
            let stop = size.min(end.saturating_add(READ_AHEAD));
            ahead_end = stop;
            while lbase < stop {
                if !self.pending.contains_key(&lbase) {
                    match self.table.range_loaded(lbase, lbase + (BLOCK - 1)) {
                        Some(leaves) => ahead.extend(
                            leaves
                                .into_iter()
                                .filter(|br| br.btype == crate::disk::BlockrefType::Data),
                        ),
                        None => break,
                    }
                }
                lbase += BLOCK;
            }
        }
        ra.end.store(ahead_end, Ordering::Relaxed);
        ra.next.store(end, Ordering::Relaxed);
        Some(Ok(ReadPlan {
            inum,
            out: None,
            out_len,
            parts,
            ahead,
        }))
    }

    /// The blockref of the data block at `lbase` on disk, if any (the
    /// tree over it loaded, the leaf checked).
    fn disk_leaf(&mut self, vol: &Volume, lbase: u64) -> Result<Option<Blockref>> {
        let leaves = self
            .table
            .range(vol, lbase, lbase + (BLOCK - 1))
            .map_err(|e| e.with_place(None, Some(self.inum()), Some(lbase)))?;
        self.data_leaf(lbase, &leaves)
    }

    /// `disk_leaf` from what is in memory alone (`None`: not loaded).
    fn disk_leaf_loaded(&self, lbase: u64) -> Option<Result<Option<Blockref>>> {
        let leaves = self.table.range_loaded(lbase, lbase + (BLOCK - 1))?;
        Some(self.data_leaf(lbase, &leaves))
    }

    /// The data leaf of the 64 KiB block at `lbase`, of the `leaves`
    /// found over it (checked: one at most, a data blockref).
    fn data_leaf(&self, lbase: u64, leaves: &[Blockref]) -> Result<Option<Blockref>> {
        let place = |e: Error| e.with_place(None, Some(self.inum()), Some(lbase));
        match leaves {
            [] => Ok(None),
            [br] => {
                check_data_leaf(br).map_err(place)?;
                Ok(Some(*br))
            }
            [_, second, ..] => Err(place(Error::corrupt(
                format!("several blockrefs in the 64 KiB block at file offset {lbase:#x}"),
                second.data_off.offset(),
            ))),
        }
    }

    /// Read up to `len` bytes at `offset` (short at end of file).
    pub fn read(&mut self, vol: &Volume, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.read_plan(vol, offset, len)?.run(vol)
    }

    /// Move direct data into logical block 0 so the file can grow. Fails
    /// only for want of a page for the block, before changing anything.
    fn undirect(&mut self, vol: &Volume) -> Result<()> {
        if !self.direct() {
            return Ok(());
        }
        let n = (self.size() as usize).min(EMBEDDED_BYTES);
        let blk = match n {
            0 => None,
            _ => Some(PendingBlock::copy_of(vol, &self.data.u[..n])?),
        };
        self.data.meta.op_flags &= !OPFLAG_DIRECTDATA;
        self.data.u = [0; EMBEDDED_BYTES];
        self.table = BlockTable::new(vec![Blockref::EMPTY; SET_COUNT]);
        if let Some(blk) = blk {
            self.pending.insert(0, Arc::new(blk));
        }
        self.dirty = true;
        Ok(())
    }

    /// How many 64 KiB blocks not yet pending a write of `len` bytes at
    /// `offset` (`len > 0`) or, with `truncate_to`, a size change would
    /// make pending: what the mount admits before it changes anything.
    /// Leaving embedded data moves it to a pending block 0 as well.
    pub fn new_pending_blocks(&self, change: PendingChange) -> u64 {
        // A reserved block was admitted when fallocate reserved it.
        let not_pending = |lbase: u64| {
            !self.pending.contains_key(&lbase) && !self.reserved.contains(lbase / BLOCK)
        };
        let old = self.size();
        let leaves_direct =
            |end: u64| self.direct() && end > EMBEDDED_BYTES as u64 && old > 0 && not_pending(0);
        match change {
            PendingChange::Write { offset, len } => {
                let end = offset.saturating_add(len);
                if self.direct() && end <= EMBEDDED_BYTES as u64 {
                    // Stays in the inode.
                    return 0;
                }
                let first = offset / BLOCK;
                let last = (end - 1) / BLOCK;
                let touched = (first..=last).filter(|b| not_pending(b * BLOCK)).count() as u64;
                touched + u64::from(leaves_direct(end) && first > 0)
            }
            PendingChange::Truncate { size } => {
                if size == old {
                    0
                } else if self.direct() {
                    u64::from(leaves_direct(size))
                } else {
                    u64::from(size < old && size % BLOCK != 0 && not_pending(size & !(BLOCK - 1)))
                }
            }
        }
    }

    /// Write `buf` at `offset`, growing the file as needed. With
    /// `defer`, a block written in part whose old bytes are not in the
    /// buffer cache keeps the ranges written and merges the old bytes
    /// later (`PendingBlock`) instead of reading them now.
    pub fn write(
        &mut self,
        vol: &Volume,
        offset: u64,
        buf: &[u8],
        defer: bool,
        filled: &mut Filled,
    ) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or_else(|| Error::InvalidArgument {
                what: "write past the largest file offset".into(),
            })?;
        if self.direct() && end <= EMBEDDED_BYTES as u64 {
            self.dirty = true;
            self.data.u[offset as usize..end as usize].copy_from_slice(buf);
            self.data.meta.size = self.size().max(end);
            return Ok(());
        }
        self.undirect(vol)?;
        // Read (or decide not to read) the partly written first and last
        // blocks, and take a buffer for every block that needs one (new
        // blocks, and pending ones a read plan shares), before changing
        // anything, so a read error or a shortage of pages leaves the
        // file as it was (a write is applied whole or not at all).
        let first = offset & !(BLOCK - 1);
        let last = (end - 1) & !(BLOCK - 1);
        let mut fresh: Vec<(u64, PendingBlock)> = Vec::new();
        for lbase in [first, last] {
            let whole = offset <= lbase && end >= lbase + BLOCK;
            if whole || fresh.iter().any(|(b, _)| *b == lbase) {
                continue;
            }
            match self.pending.get(&lbase) {
                Some(b) if b.is_partial() && !defer => {
                    let merged = b.merged(vol, self.inum(), lbase)?;
                    fresh.push((lbase, PendingBlock::copy_of(vol, &merged)?));
                }
                Some(_) => {}
                None => {
                    let blk = match self.disk_leaf(vol, lbase)? {
                        None => PendingBlock::empty(vol)?,
                        Some(br) => match defer {
                            true => match read_cached_block(vol, &br, self.inum(), lbase)? {
                                Some(b) => PendingBlock::copy_of(vol, &b)?,
                                None => PendingBlock::over(vol, br)?,
                            },
                            false => PendingBlock::copy_of(
                                vol,
                                &read_data_block(vol, &br, self.inum(), lbase)?,
                            )?,
                        },
                    };
                    fresh.push((lbase, blk));
                }
            }
        }
        for lbase in (first..=last).step_by(BLOCK as usize) {
            // A block filled before the lock replaces what is there.
            if fresh.iter().any(|(b, _)| *b == lbase) || filled.has(lbase) {
                continue;
            }
            // A copy in place of a shared block reads the same: making it
            // now changes nothing a failure would have to undo.
            match self.pending.get_mut(&lbase) {
                None => fresh.push((lbase, PendingBlock::empty(vol)?)),
                Some(b) => {
                    unshare(b)?;
                }
            }
        }
        for (lbase, blk) in fresh {
            self.pending.insert(lbase, Arc::new(blk));
        }
        self.dirty = true;
        let mut pos = offset;
        while pos < end {
            let lbase = pos & !(BLOCK - 1);
            let hi = end.min(lbase + BLOCK);
            let whole = pos == lbase && hi == lbase + BLOCK;
            let src = &buf[(pos - offset) as usize..(hi - offset) as usize];
            let at = (pos - lbase) as usize;
            if whole {
                if let Some(b) = filled.take(lbase) {
                    self.pending.insert(lbase, Arc::new(PendingBlock::whole(b)));
                    pos = hi;
                    continue;
                }
            }
            let blk = self
                .pending
                .get_mut(&lbase)
                .and_then(Arc::get_mut)
                .ok_or_else(|| {
                    Error::corrupt(format!("pending block {lbase:#x} not ready for a write"), 0)
                })?;
            if whole {
                // Overwritten whole: the old bytes no longer matter.
                blk.under = None;
                blk.bytes.resize(0);
                blk.bytes.put(0, src);
            } else {
                blk.put(at, src);
            }
            pos = hi;
        }
        // The blocks written are pending now: their reservation passed
        // to them.
        self.reserved.remove(first / BLOCK, last / BLOCK + 1);
        self.data.meta.size = self.size().max(end);
        Ok(())
    }

    /// Before a write of `len` bytes (`len > 0`) at `offset`: load the
    /// tree over the blocks the flush will insert there (so it reads
    /// nothing under the mount's lock) and say how many 64 KiB blocks the
    /// write makes pending, at most (what the mount admits).
    pub fn before_write(&mut self, vol: &Volume, offset: u64, len: u64) -> Result<u64> {
        self.load_range(vol, offset, offset.saturating_add(len - 1))?;
        Ok(self.new_pending_blocks(PendingChange::Write { offset, len }))
    }

    /// Load the file's tree over bytes `lo..=hi` (a direct-data file has
    /// none), so that changes there, and the flush's, read nothing.
    pub fn load_range(&mut self, vol: &Volume, lo: u64, hi: u64) -> Result<()> {
        if !self.direct() {
            self.table.range(vol, lo & !(BLOCK - 1), hi | (BLOCK - 1))?;
        }
        Ok(())
    }

    /// Bytes of room reserved by fallocate and not yet written.
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved.len() * BLOCK
    }

    /// Reserve room for the blocks of `[offset, end)` not yet pending
    /// (`new_reserved_blocks` says how many; the mount admits them
    /// first).
    pub fn reserve(&mut self, offset: u64, end: u64) {
        if end <= offset {
            return;
        }
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        let mut b = first;
        while b <= last {
            // Skip pending blocks: their room is admitted already.
            if self.pending.contains_key(&(b * BLOCK)) {
                b += 1;
                continue;
            }
            let mut e = b + 1;
            while e <= last && !self.pending.contains_key(&(e * BLOCK)) {
                e += 1;
            }
            self.reserved.insert(b, e);
            b = e;
        }
    }

    /// How many blocks of `[offset, end)` `reserve` would add.
    pub fn new_reserved_blocks(&self, offset: u64, end: u64) -> u64 {
        if end <= offset {
            return 0;
        }
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        let span = last - first + 1;
        let pending = self.pending.range(first * BLOCK..=last * BLOCK).count() as u64;
        let reserved_not_pending = self.reserved.count_in(first, last + 1)
            - self
                .pending
                .range(first * BLOCK..=last * BLOCK)
                .filter(|(k, _)| self.reserved.contains(*k / BLOCK))
                .count() as u64;
        span - pending - reserved_not_pending
    }

    /// Bytes of file data waiting for the flush.
    pub fn dirty_bytes(&self) -> u64 {
        self.pending.len() as u64 * BLOCK
    }

    /// Bytes of memory the file data waiting for the flush holds.
    pub fn pending_bytes(&self) -> u64 {
        self.pending.values().map(|b| b.memory() as u64).sum()
    }

    /// The bytes this inode's blocks take on disk (`pfs::stored_bytes`,
    /// what `st_blocks` reports), as of now: the tree in memory (indirect
    /// blocks changed since the last flush counted as they will be
    /// written), with each block written since the last flush counted
    /// at its uncompressed size in place of the block it replaces. Exact
    /// once flushed (the flush compresses, and turns zero blocks into holes).
    /// Replaced blocks are looked up in the tree, which may read
    /// indirect blocks; one that cannot be read counts as none.
    /// The room fallocate reserved and no write has used yet counts too,
    /// a whole block each, as preallocated blocks count on a local
    /// filesystem: it is taken from the volume's free space (over a
    /// stored block too, which a copy-on-write rewrite does not reuse).
    pub fn stored_bytes(&mut self, vol: &Volume) -> u64 {
        let size = self.size();
        let keys: Vec<u64> = self.pending.range(..size).map(|(k, _)| *k).collect();
        let mut old = Vec::with_capacity(keys.len());
        for lbase in keys {
            if let Ok(Some(br)) = self.table.lookup(vol, lbase) {
                old.push(br.data_off.bytes());
            }
        }
        self.stored_bytes_with(old)
    }

    /// `stored_bytes` from the tree in memory alone (`None`: an indirect
    /// block over a pending block is not loaded).
    pub fn stored_bytes_loaded(&self) -> Option<u64> {
        let size = self.size();
        let mut old = Vec::new();
        for (&lbase, _) in self.pending.range(..size) {
            let leaves = self.table.range_loaded(lbase, lbase)?;
            old.extend(
                leaves
                    .iter()
                    .filter(|br| br.key == lbase)
                    .map(|br| br.data_off.bytes()),
            );
        }
        Some(self.stored_bytes_with(old))
    }

    /// `stored_bytes`, given the bytes on disk of the blocks that
    /// pending blocks replace.
    fn stored_bytes_with(&self, replaced: Vec<u64>) -> u64 {
        let reserved = self.reserved_bytes();
        if self.obj_type() == ObjType::Directory || self.direct() {
            return crate::pfs::stored_bytes(&self.data.meta, 0).saturating_add(reserved);
        }
        let mut bytes = self.table.stats_now().data_count.wrapping_add(reserved);
        let size = self.size();
        for (&lbase, _) in self.pending.range(..size) {
            bytes = bytes.wrapping_add(crate::strategy::physical_block_size(size, lbase));
        }
        replaced
            .into_iter()
            .fold(bytes, |b, old| b.wrapping_sub(old))
    }

    /// Set the file size: drop whole blocks past it, zero the tail of
    /// the last one, leave holes when growing.
    pub fn truncate(&mut self, vol: &Volume, size: u64) -> Result<()> {
        if size > i64::MAX as u64 {
            return Err(Error::InvalidArgument {
                what: format!("size {size} is too large"),
            });
        }
        let old = self.size();
        if size < old {
            // fallocate's room past the new end goes (KEEP_SIZE room past
            // the old end too, as other filesystems free it).
            self.reserved.remove(size.div_ceil(BLOCK), u64::MAX);
        }
        if self.direct() {
            if size <= EMBEDDED_BYTES as u64 {
                self.dirty = true;
                let (lo, hi) = (
                    size.min(old) as usize,
                    old.max(size).min(EMBEDDED_BYTES as u64) as usize,
                );
                self.data.u[lo..hi].fill(0);
                self.data.meta.size = size;
                return Ok(());
            }
            self.undirect(vol)?;
        }
        if size < old {
            // Every read first (the new last block, and the indirect
            // blocks over the doomed range, which stay loaded), so a
            // read error leaves the file as it was.
            let keep_end = size.div_ceil(BLOCK) * BLOCK;
            let partial = !size.is_multiple_of(BLOCK);
            let lbase = size & !(BLOCK - 1);
            if partial {
                self.pending_block(vol, lbase)?;
            }
            // Every leaf past the new end goes (a damaged one too: a
            // file's tree holds nothing but data).
            let doomed: Vec<u64> = self
                .table
                .range(vol, keep_end, u64::MAX)?
                .iter()
                .map(|b| b.key)
                .collect();
            self.dirty = true;
            self.pending.retain(|&k, _| k < keep_end);
            for k in doomed {
                self.table.delete(vol, k)?;
            }
            if partial {
                let blk = self.pending_block(vol, lbase)?;
                blk.resize(blk.len().min((size - lbase) as usize));
            }
        }
        self.dirty = true;
        self.data.meta.size = size;
        Ok(())
    }

    /// The blocks a hole punch of `[offset, end)` (end within the size)
    /// covers only in part, with the range covered in each: the punch
    /// zeroes those in a pending copy and drops the others whole. A
    /// block covered up to the end of the file counts as whole.
    fn punch_edges(&self, offset: u64, end: u64) -> Vec<(u64, u64, u64)> {
        let size = self.size();
        let mut edges = Vec::new();
        let first = offset & !(BLOCK - 1);
        let last = (end - 1) & !(BLOCK - 1);
        for lbase in [first, last] {
            if edges.iter().any(|&(b, _, _)| b == lbase) {
                continue;
            }
            let (lo, hi) = (offset.max(lbase), end.min(lbase + BLOCK));
            let whole = lo == lbase && (hi == lbase + BLOCK || hi >= size);
            if !whole {
                edges.push((lbase, lo, hi));
            }
        }
        edges
    }

    /// Blocks a hole punch of `[offset, offset + len)` would make pending
    /// (the partly covered first and last blocks), for admission.
    pub fn punch_pending_blocks(&self, offset: u64, len: u64) -> u64 {
        let end = offset.saturating_add(len).min(self.size());
        if self.direct() || end <= offset {
            return 0;
        }
        self.punch_edges(offset, end)
            .into_iter()
            .filter(|&(b, _, _)| {
                !self.pending.contains_key(&b) && !self.reserved.contains(b / BLOCK)
            })
            .count() as u64
    }

    /// FALLOC_FL_PUNCH_HOLE | KEEP_SIZE: zero `[offset, offset + len)`
    /// within the size. Whole blocks become holes at once (their blocks
    /// leave the tree, pending data is dropped); the partly covered
    /// first and last blocks are zeroed in a pending copy (the flush
    /// makes an all-zero block a hole). Every read happens first, so a
    /// read error leaves the file as it was.
    pub fn punch(&mut self, vol: &Volume, offset: u64, len: u64) -> Result<()> {
        let end = offset.saturating_add(len).min(self.size());
        if end <= offset {
            return Ok(());
        }
        if self.direct() {
            let (lo, hi) = (offset as usize, end.min(EMBEDDED_BYTES as u64) as usize);
            if lo < hi {
                self.data.u[lo..hi].fill(0);
                self.dirty = true;
            }
            return Ok(());
        }
        let edges = self.punch_edges(offset, end);
        let is_edge = |lbase: u64| edges.iter().any(|&(b, _, _)| b == lbase);
        let (first, last) = (offset & !(BLOCK - 1), (end - 1) & !(BLOCK - 1));
        let doomed: Vec<u64> = self
            .table
            .range(vol, first, last + BLOCK - 1)?
            .iter()
            .filter(|b| b.btype == BlockrefType::Data && !is_edge(b.key))
            .map(|b| b.key)
            .collect();
        // Read the edge blocks that hold data before changing anything,
        // and take their buffers: all of them, then make them pending, so
        // that a read that fails (or misses the cache,
        // `volume::CacheOnly`) or a shortage of pages leaves no edge
        // pending that the next try would not admit.
        let mut with_data = Vec::new();
        let mut read = Vec::new();
        let inum = self.inum();
        for &(lbase, _, _) in &edges {
            if let Some(b) = self.pending.get_mut(&lbase) {
                if b.is_partial() {
                    let merged = b.merged(vol, inum, lbase)?;
                    read.push((lbase, PendingBlock::copy_of(vol, &merged)?));
                } else {
                    unshare(b)?;
                }
                with_data.push(lbase);
            } else if self
                .table
                .lookup(vol, lbase)?
                .is_some_and(|b| b.btype == BlockrefType::Data)
            {
                read.push((
                    lbase,
                    PendingBlock::copy_of(vol, &self.disk_block(vol, lbase)?)?,
                ));
                with_data.push(lbase);
            }
        }
        for (lbase, b) in read {
            self.pending.insert(lbase, Arc::new(b));
        }
        self.dirty = true;
        let whole: Vec<u64> = self
            .pending
            .range(first..=last)
            .map(|(k, _)| *k)
            .filter(|&k| !is_edge(k))
            .collect();
        for k in whole {
            self.pending.remove(&k);
        }
        for k in doomed {
            self.table.delete(vol, k)?;
        }
        for (lbase, lo, hi) in edges {
            if !with_data.contains(&lbase) {
                continue;
            }
            let blk = self.pending_block(vol, lbase)?;
            let (a, b) = ((lo - lbase) as usize, (hi - lbase) as usize);
            if a < blk.len() {
                let b = b.min(blk.len());
                blk[a..b].fill(0);
            }
        }
        Ok(())
    }

    /// Offsets of data (as opposed to holes) at or after `offset`:
    /// the first data byte and the first hole byte, for SEEK_DATA and
    /// SEEK_HOLE.
    pub fn next_data(&mut self, vol: &Volume, offset: u64) -> Result<Option<u64>> {
        let size = self.size();
        if offset >= size {
            return Ok(None);
        }
        if self.direct() {
            return Ok(Some(offset));
        }
        let lbase = offset & !(BLOCK - 1);
        let mut keys: Vec<u64> = self
            .table
            .range(vol, lbase, u64::MAX)?
            .iter()
            .map(|b| b.key)
            .collect();
        keys.extend(self.pending.range(lbase..).map(|(k, _)| *k));
        Ok(keys
            .into_iter()
            .filter(|&k| k < size)
            .min()
            .map(|k| k.max(offset)))
    }

    /// The first hole at or after `offset` below the size (SEEK_HOLE),
    /// or the size. Pending blocks count as data.
    pub fn next_hole(&mut self, vol: &Volume, offset: u64) -> Result<u64> {
        let size = self.size();
        if offset >= size || self.direct() {
            return Ok(size);
        }
        let lbase = offset & !(BLOCK - 1);
        let mut keys: Vec<u64> = self
            .table
            .range(vol, lbase, u64::MAX)?
            .iter()
            .filter(|b| b.btype == BlockrefType::Data)
            .map(|b| b.key)
            .collect();
        keys.extend(self.pending.range(lbase..).map(|(k, _)| *k));
        keys.sort_unstable();
        keys.dedup();
        let mut pos = lbase;
        for k in keys {
            if k != pos {
                break;
            }
            pos += BLOCK;
        }
        Ok(pos.max(offset).min(size))
    }

    // ---- directories ----

    /// The name a dirent leaf carries: embedded, pending, or in its block.
    fn dirent_name(&self, vol: &Volume, br: &Blockref) -> Result<Vec<u8>> {
        if let Some(Some(n)) = self.pending_dirents.get(&br.key) {
            return Ok(n.clone());
        }
        crate::pfs::dirent_name(vol, br)
    }

    /// Find `name`: its key and dirent head.
    pub fn dir_lookup(&mut self, vol: &Volume, name: &[u8]) -> Result<Option<(u64, DirentHead)>> {
        let h = dirhash(name);
        let leaves = self.table.range(vol, h, h | DIRHASH_LOMASK)?;
        self.find_dirent(vol, name, leaves)
    }

    /// `dir_lookup` from the tree in memory alone (`None`: an indirect
    /// block over the name's hash is not loaded). A long name is read
    /// from its block as `dir_lookup` reads it.
    pub fn dir_lookup_loaded(
        &self,
        vol: &Volume,
        name: &[u8],
    ) -> Option<Result<Option<(u64, DirentHead)>>> {
        let h = dirhash(name);
        let leaves = self.table.range_loaded(h, h | DIRHASH_LOMASK)?;
        Some(self.find_dirent(vol, name, leaves))
    }

    /// The entry named `name` among `leaves` (those of its hash).
    fn find_dirent(
        &self,
        vol: &Volume,
        name: &[u8],
        leaves: Vec<Blockref>,
    ) -> Result<Option<(u64, DirentHead)>> {
        for br in leaves {
            dirent_leaf(&br)?;
            if self.dirent_name(vol, &br)? == name {
                return Ok(Some((br.key, br.dirent())));
            }
        }
        Ok(None)
    }

    /// Every entry with key at least `from`, in key order: (key, name,
    /// head).
    pub fn dir_list(&mut self, vol: &Volume, from: u64) -> Result<Vec<Listed>> {
        let leaves = self
            .table
            .range(vol, from.max(disk::DIRHASH_VISIBLE), u64::MAX)?;
        self.named(vol, leaves)
    }

    /// `dir_list` from the tree in memory alone (`None`: an indirect
    /// block is not loaded).
    pub fn dir_list_loaded(&self, vol: &Volume, from: u64) -> Option<Result<Vec<Listed>>> {
        let leaves = self
            .table
            .range_loaded(from.max(disk::DIRHASH_VISIBLE), u64::MAX)?;
        Some(self.named(vol, leaves))
    }

    /// The entries `leaves` hold, with their names.
    fn named(&self, vol: &Volume, leaves: Vec<Blockref>) -> Result<Vec<Listed>> {
        let mut out = Vec::with_capacity(leaves.len());
        for br in leaves {
            dirent_leaf(&br)?;
            out.push((br.key, self.dirent_name(vol, &br)?, br.dirent()));
        }
        Ok(out)
    }

    /// Add an entry; the name must not exist. Picks the key the way
    /// DragonFly's rename/create scan does.
    pub fn dir_insert(
        &mut self,
        vol: &Volume,
        name: &[u8],
        head: DirentHead,
        check_algo: u8,
    ) -> Result<u64> {
        if name.is_empty() || name.len() > NAME_MAX {
            return Err(Error::NameTooLong { len: name.len() });
        }
        let base = dirhash(name);
        let mut key = base;
        let used = self.table.range(vol, base, base | DIRHASH_LOMASK)?;
        let mut exhausted = true;
        for br in &used {
            if br.key != key {
                exhausted = false;
                break;
            }
            key += 1;
        }
        if exhausted {
            key += 1;
        }
        if (key ^ base) & !DIRHASH_LOMASK != 0 {
            return Err(Error::CollisionSpaceFull {
                what: String::from_utf8_lossy(name).into_owned(),
            });
        }
        let mut br = Blockref::EMPTY;
        br.btype = BlockrefType::Dirent;
        br.key = key;
        br.set_dirent(DirentHead {
            namlen: name.len() as u16,
            ..head
        });
        if name.len() <= DIRENT_EMBEDDED_NAME_MAX {
            br.check[..name.len()].copy_from_slice(name);
            self.pending_dirents.insert(key, None);
        } else {
            br.methods = disk::enc_methods(disk::dec_algo(check_algo), 0);
            self.pending_dirents.insert(key, Some(name.to_vec()));
        }
        self.table.insert(vol, TreeKind::Directory, true, br)?;
        self.dirty = true;
        Ok(key)
    }

    /// Remove the entry at `key`.
    pub fn dir_remove(&mut self, vol: &Volume, key: u64) -> Result<()> {
        self.pending_dirents.remove(&key);
        self.table.delete(vol, key)?;
        self.dirty = true;
        Ok(())
    }

    /// True when the directory has no entries.
    pub fn dir_is_empty(&mut self, vol: &Volume) -> Result<bool> {
        match self
            .table
            .range(vol, disk::DIRHASH_VISIBLE, u64::MAX)?
            .first()
        {
            Some(br) => dirent_leaf(br).map(|()| false),
            None => Ok(true),
        }
    }
}

/// A leaf in a directory's entry range must be a DIRENT. An INODE there
/// is an entry of DragonFly's pre-2017 layout (inodes filed by name),
/// which the read-only view reads but this write path does not; anything
/// else is damage.
fn dirent_leaf(br: &Blockref) -> Result<()> {
    match br.btype {
        BlockrefType::Dirent => Ok(()),
        BlockrefType::Inode => Err(Error::Unsupported {
            what: format!(
                "directory entry key {:#x} of the pre-2017 layout (an inode filed by name) \
                 on a read-write mount",
                br.key
            ),
            at: br.data_off.offset(),
        }),
        other => Err(Error::corrupt(
            format!(
                "{} blockref (type {}) key {:#x} among a directory's entries",
                other.name(),
                other.to_u8(),
                br.key
            ),
            br.data_off.offset(),
        )),
    }
}
