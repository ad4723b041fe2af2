//! The flush: turning everything modified in memory into new blocks,
//! bottom-up, and committing them with a new volume header.
//!
//! Order, as DragonFly's `hammer2_flush` and `hammer2_vfs_sync`:
//! 1. each modified inode: its file data blocks (compressed per its
//!    `comp_algo`, zero blocks become holes), its long dirent names, its
//!    indirect blocks, then the inode block itself, whose new blockref
//!    goes into the PFS root's inode index;
//! 2. each PFS root, into the super-root; 3. the super-root;
//! 4. the freemap (`SpaceMap::flush`);
//! 5. a device barrier, the volume header into the next rotation slot,
//!    and a barrier.
//!
//! Every block written carries the flush's transaction id as its
//! `mirror_tid` and the check code of its inode's `check_algo`. A file
//! data block whose bytes match a recent write shares that block
//! (`dedup.rs`). Nothing
//! reachable from the previous header is ever overwritten, so a crash at
//! any point leaves the previous flush intact.
//!
//! Pipelined, so the daemon serves requests meanwhile: `flush_begin`
//! (mount locked) takes the file data written so far into a
//! `FlushBatch`, `FlushBatch::write` (unlocked) compresses, places and
//! writes it, `flush_commit_prepare` (locked) writes what changed since
//! and the whole tree and freemap into the buffer cache,
//! `Prepared::run` (unlocked) walks removed inodes' trees for freeing
//! and does the device part (write-back, barrier, header, barrier), and
//! `flush_commit_finish` (locked) adopts the header and frees what
//! waited for it. `flush` runs the steps in a row; `reclaim` commits
//! until no freed block waits for a header.
//!
//! Laundering (`launder_begin`, `launder_finish`): the batch part alone,
//! as DragonFly's buffer cache writes file data ahead of the flush. The
//! file data is written to new blocks and their blockrefs go into the
//! inodes' block tables in memory; no header is written, so nothing
//! reachable changes, and the next commit writes only the metadata
//! above them. A laundered block superseded before that commit is freed
//! by it as any dropped block is.
//!
//! Partial commits (`fsync`, `fsync_begin`): the same steps for the
//! closure of one inode's dependency group (`depend.rs`,
//! `commit_closure`: the group, the PFS root's group, the inode and the
//! root). Only those inodes' data, inodes, removals and drops are
//! written; the path above them (the PFS root's inode index, the PFS
//! root, the super-root) is rewritten from what is in memory, in which
//! every inode outside the closure still has the blockref of its last
//! commit, so the new header reaches exactly the last committed tree
//! plus the closure. The freemap is written whole. Every other dirty
//! inode stays dirty for a later commit. A partial commit's batch may be
//! written while a volume-wide flush writes its own; the commits
//! themselves (prepare .. finish) do not overlap (`committing`).

use crate::alloc::SpaceMap;
use crate::blocktable::{BlockSink, SetStats, TreeKind};
use crate::check;
use crate::dedup::DedupKey;
use crate::disk::{self, comp_method, enc_methods, Blockref, BlockrefType, BLOCKREF_BYTES};
use crate::disk::{BREF_FLAG_PFSROOT, VOLUME_BYTES};
use crate::error::{Error, Result};
use crate::inode::{InodeLock, InodeNode, PendingBlock};
use crate::mount::{lock_space, Mount};
use crate::pfs;
use crate::strategy::CompHeuristic;
use crate::strategy::{data_bref, dedupable, encode_data_block, place_data, write_placed, Placed};
use crate::volume::Volume;
use bufcache::BlockDevice;
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// What one flush wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushStats {
    pub tid: u64,
    pub blocks: u64,
    pub bytes: u64,
    pub header_slot: usize,
    /// Bytes an earlier flush dropped that went back to free once this
    /// one's header was written.
    pub freed: u64,
    /// Blocks written in part whose old block could not be read to
    /// merge them with (`PendingBlock`): dropped, each logged with its
    /// inode and offset, the damaged block left as it was. The daemon
    /// fails the fsync that waited for this flush with EIO, as Linux
    /// reports a lost writeback.
    pub lost: u64,
}

/// Writes blocks for one flush.
pub struct Writer<'a> {
    pub vol: &'a Volume,
    pub space: &'a mut dyn SpaceMap,
    pub tid: u64,
    /// Blocks written, for the closing barrier and statistics.
    pub blocks: u64,
    pub bytes: u64,
    /// Partial blocks that could not be merged (`FlushStats::lost`).
    pub lost: u64,
    /// Pending blocks a batch out for writing holds (`Mount::taken`):
    /// written here without dedup, so the two copies never share a
    /// block (see `BatchBlock::dedup`).
    pub taken: &'a HashMap<usize, u32>,
}

impl Writer<'_> {
    /// Allocate and write `phys` (already padded to a power of two) for
    /// `br`, filling in data_off, check code and tids.
    pub fn write(&mut self, br: &mut Blockref, phys: &[u8]) -> Result<()> {
        let off = self
            .space
            .alloc(br.btype, phys.len() as u64, br.key, true)?;
        debug_assert_eq!(off.bytes(), phys.len() as u64);
        self.vol
            .device()
            .write_at(phys, off.offset())
            .map_err(|source| Error::Io {
                op: "write",
                at: off.offset(),
                source,
            })?;
        br.data_off = off;
        br.mirror_tid = self.tid;
        br.modify_tid = self.tid;
        check::set_check(br, phys);
        self.blocks += 1;
        self.bytes += phys.len() as u64;
        Ok(())
    }
}

impl Writer<'_> {
    /// Write the file data block `phys` for `br`, sharing a recent block
    /// with the same bytes when there is one (see `dedup.rs`).
    /// `dedup` false: a new block, not recorded for sharing either.
    pub fn write_data(&mut self, br: &mut Blockref, phys: &[u8], dedup: bool) -> Result<()> {
        let fp = DedupKey::of(phys, br.methods);
        let dev = self.vol.device().clone();
        let placed = place_data(self.space, dev.as_ref(), &fp, phys, br.key, true, dedup)?;
        if let Placed::New(off) = placed {
            write_placed(dev.as_ref(), off, phys)?;
            if dedup && dedupable(br.methods) {
                self.space.dedup_record(fp, off);
            }
            self.blocks += 1;
            self.bytes += phys.len() as u64;
        }
        br.data_off = placed.off();
        br.mirror_tid = self.tid;
        br.modify_tid = self.tid;
        check::set_check(br, phys);
        Ok(())
    }
}

/// Indirect blocks of one inode, with its check method.
struct IndirectSink<'w, 'a> {
    w: &'w mut Writer<'a>,
    check_algo: u8,
}

impl BlockSink for IndirectSink<'_, '_> {
    fn write_indirect(&mut self, template: &Blockref, entries: &[Blockref]) -> Result<Blockref> {
        let mut buf = vec![0u8; entries.len() * BLOCKREF_BYTES];
        for (i, e) in entries.iter().enumerate() {
            e.encode_at(&mut buf, i);
        }
        let mut br = *template;
        br.methods = enc_methods(disk::dec_algo(self.check_algo), comp_method::NONE);
        self.w.write(&mut br, &buf)?;
        Ok(br)
    }
}

/// The bytes to write for pending block `lbase` of inode `inum`: merged
/// with its old block (read through `vol`) if it was written in part.
/// An error when that old block cannot be read: the write is lost
/// (`FlushStats::lost`, `log_lost`).
fn block_bytes<'a>(
    blk: &'a PendingBlock,
    vol: &Volume,
    inum: u64,
    lbase: u64,
) -> Result<Cow<'a, [u8]>> {
    if !blk.is_partial() {
        return Ok(Cow::Borrowed(&blk.bytes));
    }
    blk.merged(vol, inum, lbase).map(Cow::Owned)
}

/// Say which write is lost and why (`block_bytes`).
fn log_lost(inum: u64, lbase: u64, e: &Error) {
    log::error!(
        "inode {inum}: a write into the 64 KiB block at file offset {lbase:#x} is lost: \
         its old block, to merge the write with, cannot be read: {e}"
    );
}

/// Write an inode's pending data blocks and long names, its indirect
/// blocks, and the inode block. Returns its new blockref (key `key`,
/// flags `flags`).
pub fn flush_inode(
    w: &mut Writer<'_>,
    node: &mut InodeNode,
    key: u64,
    flags: u8,
) -> Result<Blockref> {
    let check_algo = node.data.meta.check_algo;
    let comp_algo = node.data.meta.comp_algo;
    let inum = node.inum();
    let size = node.size();
    let pending = std::mem::take(&mut node.pending);
    for (lbase, blk) in pending {
        if lbase >= size {
            continue;
        }
        let data = match block_bytes(&blk, w.vol, inum, lbase) {
            Ok(d) => d,
            Err(e) => {
                log_lost(inum, lbase, &e);
                w.lost += 1;
                continue;
            }
        };
        let heur = &mut node.comp_heuristic;
        match encode_data_block(size, lbase, &data, comp_algo, check_algo, heur) {
            None => {
                node.table.delete(w.vol, lbase)?;
            }
            Some((phys, methods)) => {
                let mut br = data_bref(lbase, methods);
                let dedup = !w.taken.contains_key(&pending_key(&blk));
                w.write_data(&mut br, &phys, dedup)
                    .map_err(|e| e.with_place(None, Some(inum), Some(lbase)))?;
                node.table.insert(w.vol, TreeKind::File, true, br)?;
            }
        }
    }
    let dirents = std::mem::take(&mut node.pending_dirents);
    for (dkey, name) in dirents {
        let Some(mut br) = node.table.lookup(w.vol, dkey)? else {
            continue;
        };
        match name {
            Some(name) => {
                let mut block = vec![0u8; 1024];
                let n = name.len().min(1024);
                block[..n].copy_from_slice(&name[..n]);
                br.methods = enc_methods(disk::dec_algo(check_algo), comp_method::NONE);
                w.write(&mut br, &block)?;
            }
            None => {
                br.mirror_tid = w.tid;
                br.modify_tid = w.tid;
            }
        }
        node.table.insert(w.vol, TreeKind::Directory, true, br)?;
    }
    {
        let mut sink = IndirectSink { w, check_algo };
        node.table.flush(&mut sink)?;
    }
    node.table.sort();
    let mut br = Blockref::EMPTY;
    br.btype = BlockrefType::Inode;
    br.key = key;
    br.flags = flags;
    br.methods = enc_methods(disk::dec_algo(check_algo), disk::dec_algo(comp_algo));
    if node.data.meta.has_direct_data() {
        SetStats::default().apply(&mut br);
    } else {
        let set: [Blockref; disk::SET_COUNT] = node
            .table
            .entries()
            .try_into()
            .map_err(|_| Error::corrupt(format!("inode {inum} table is not a blockset"), 0))?;
        node.data.set_blockset(&set);
        SetStats::of(&set).apply(&mut br);
    }
    let raw = node.data.encode();
    w.write(&mut br, &raw)?;
    node.bref = br;
    node.dirty = false;
    Ok(br)
}

impl Mount {
    /// Commit now, whether or not anything changed: a new volume header
    /// in the next slot (fsck's repairs write every slot this way).
    pub(crate) fn commit(&mut self) -> Result<FlushStats> {
        self.commit_now()
    }

    /// fsync(2) of a file or directory: a partial commit of the inode's
    /// dependency groups (`commit_closure`), not pipelined. Every other
    /// change stays in memory for a later commit.
    pub fn fsync(&mut self, label: &str, inum: u64) -> Result<FlushStats> {
        let mut batch = self.fsync_begin(label, inum)?;
        batch.write();
        self.flush_commit(batch)
    }

    /// What a partial commit for `inum` of PFS `label` writes: the
    /// inode's group, and the PFS root's (the root holds the inode index
    /// every commit rewrites and the root directory's entries, so its
    /// changes go with every partial commit of the PFS).
    pub(crate) fn commit_closure(&self, label: &str, inum: u64) -> BTreeSet<u64> {
        let mut s = BTreeSet::new();
        s.insert(crate::mount::ROOT_INUM);
        if let Some(p) = self.pfs.get(label) {
            let depend = p.depend.lock();
            depend.closure_into(inum, &mut s);
            depend.closure_into(crate::mount::ROOT_INUM, &mut s);
        }
        s
    }

    /// Start a pipelined partial commit for fsync of `inum`: as
    /// `flush_begin`, for the file data of the inodes of its closure
    /// (`commit_closure`) alone. It may run while a volume-wide flush
    /// writes its batch (commits themselves do not overlap: the caller
    /// serializes `flush_commit_prepare` .. `flush_commit_finish`).
    pub fn fsync_begin(&mut self, label: &str, inum: u64) -> Result<FlushBatch> {
        self.writable()?;
        self.getattr(label, inum)?;
        let scope = self.commit_closure(label, inum);
        let batch = self.begin_batch(Some((label, &scope)), false)?;
        self.partials += 1;
        Ok(FlushBatch {
            scope: Some((label.to_string(), inum)),
            ..batch
        })
    }

    /// Start laundering, as DragonFly's buffer cache writes file data
    /// ahead of the flush: take the file data waiting for a flush (what
    /// no other batch holds) into a batch; `FlushBatch::write` writes it
    /// to new blocks without this `Mount` (compressed, checked,
    /// deduped), and `launder_finish` records their blockrefs in the
    /// inodes' block tables. Nothing is committed: the next commit
    /// writes only the metadata above them, and until then no header
    /// reaches the new blocks. Counts as a partial batch for
    /// `no_commit_under_way`.
    pub fn launder_begin(&mut self) -> Result<FlushBatch> {
        self.writable()?;
        let batch = self.begin_batch(None, true)?;
        self.partials += 1;
        Ok(FlushBatch {
            launder: true,
            ..batch
        })
    }

    /// Finish laundering (`launder_begin`): each block written that is
    /// still its inode's pending block goes into the inode's table and
    /// leaves memory; one rewritten meanwhile is given back. The space
    /// admitted for the blocks recorded is now allocated: their
    /// admission goes (the indirect blocks' share stays until the
    /// commit). A device error poisons the mount, as in a flush.
    pub fn launder_finish(&mut self, batch: FlushBatch) -> Result<FlushStats> {
        if !batch.launder {
            return Err(Error::InvalidArgument {
                what: "launder_finish needs a batch of launder_begin".into(),
            });
        }
        self.settle(&batch.blocks, batch.dup_admitted);
        self.partials = self.partials.saturating_sub(1);
        let r = self.writable().and_then(|()| match batch.error {
            Some(e) => Err(e),
            None => self.install(batch.heuristics, batch.blocks),
        });
        match r {
            Ok(done) => {
                self.unadmit_bytes(done.settled * disk::DATA_BLOCK_BYTES);
                Ok(self.uncommitted(&done))
            }
            Err(e) => {
                self.note_flush_error(&e);
                Err(e)
            }
        }
    }

    /// Write everything modified and commit it with a new volume header.
    pub fn flush(&mut self) -> Result<FlushStats> {
        let mut batch = self.flush_begin()?;
        batch.write();
        self.flush_commit(batch)
    }

    /// Start a pipelined flush: take the file data written so far into a
    /// batch whose blocks `FlushBatch::write` compresses and writes
    /// without this `Mount` (so the frontend can go on), then
    /// `flush_commit` writes what changed meanwhile and all metadata, and
    /// commits. The flush commits the state at `flush_commit`: a block
    /// the frontend rewrote after `flush_begin` is written again there
    /// and the batch's copy is given back to the allocator.
    pub fn flush_begin(&mut self) -> Result<FlushBatch> {
        self.writable()?;
        if self.flushing {
            return Err(Error::InvalidArgument {
                what: "a flush is already in progress".into(),
            });
        }
        let batch = self.begin_batch(None, false)?;
        self.flushing = true;
        Ok(batch)
    }

    /// The file data of the inodes in `scope` (PFS and inode numbers;
    /// `None`: all) waiting for a flush, as a batch; without the blocks
    /// another batch holds when `skip_taken`.
    fn begin_batch(
        &mut self,
        scope: Option<(&str, &BTreeSet<u64>)>,
        skip_taken: bool,
    ) -> Result<FlushBatch> {
        let tid = self.next_tid()?;
        let mut blocks = Vec::new();
        let mut heuristics = HashMap::new();
        for (label, p) in &self.pfs {
            // A partial commit's scope is looked up, not searched for
            // among every inode in memory.
            let handles: Vec<(u64, InodeLock)> = match scope {
                None => p.inodes.handles_by_inum(),
                Some((l, s)) if l == label => s
                    .iter()
                    .filter_map(|&i| Some((i, p.inodes.handle(i)?)))
                    .collect(),
                Some(_) => continue,
            };
            // The mount is borrowed whole: no lock is held by anyone else.
            let nodes = handles.iter().map(|(i, h)| (i, h.lock()));
            for (inum, n) in nodes.filter(|(_, n)| !n.pending.is_empty()) {
                heuristics.insert((label.clone(), *inum), n.comp_heuristic);
                let size = n.size();
                for (lbase, blk) in n.pending.range(..size) {
                    let taken = self.taken.contains_key(&pending_key(blk));
                    if taken && skip_taken {
                        continue;
                    }
                    blocks.push(BatchBlock {
                        label: label.clone(),
                        inum: *inum,
                        lbase: *lbase,
                        blk: blk.clone(),
                        size,
                        comp_algo: n.data.meta.comp_algo,
                        check_algo: n.data.meta.check_algo,
                        written: None,
                        lost: None,
                        shared_durable: false,
                        dedup: !taken,
                    });
                }
            }
        }
        // A block another batch out holds (`dedup` off) is written twice
        // (a partial commit beside a flush): one copy is installed and
        // the other given back, but both take space until then, which no
        // write admitted. Admit it before anything is taken, so the
        // allocation of a later admitted change never finds it spent; a
        // volume too full for it fails the batch here, changing nothing.
        let dup_admitted =
            blocks.iter().filter(|b| !b.dedup).count() as u64 * disk::DATA_BLOCK_BYTES;
        if dup_admitted > 0 {
            self.admit_dups(dup_admitted)?;
        }
        for b in &blocks {
            *self.taken.entry(pending_key(&b.blk)).or_insert(0) += 1;
        }
        Ok(FlushBatch {
            tid,
            reader: self.vol.reader(),
            dev: self.vol.device().clone(),
            space: self.space.clone(),
            blocks,
            heuristics,
            error: None,
            scope: None,
            launder: false,
            dup_admitted,
        })
    }

    /// Finish a flush started with `flush_begin` (or a partial commit
    /// started with `fsync_begin`).
    pub fn flush_commit(&mut self, batch: FlushBatch) -> Result<FlushStats> {
        let prepared = self.flush_commit_prepare(batch)?;
        let io = prepared.run();
        self.flush_commit_finish(prepared, io)
    }

    /// The first part of `flush_commit`: everything but waiting for the
    /// device. The tree and the freemap are written (into the device's
    /// cache, for a mount), the volume header is ready. The caller may
    /// unlock the mount, `Prepared::run` the device part (barrier, header,
    /// barrier), and lock it again for `flush_commit_finish`; operations
    /// meanwhile change the tree in memory for the next flush, which
    /// cannot begin before this one finishes.
    pub fn flush_commit_prepare(&mut self, batch: FlushBatch) -> Result<Prepared> {
        if batch.launder {
            return Err(Error::InvalidArgument {
                what: "a laundering batch is finished by launder_finish, not committed".into(),
            });
        }
        let partial = batch.scope.is_some();
        self.settle(&batch.blocks, batch.dup_admitted);
        if self.committing {
            // The batch goes back whole: its blocks stay pending.
            self.batch_done(partial);
            return Err(Error::InvalidArgument {
                what: "a commit is already in progress".into(),
            });
        }
        let result = self.flush_commit_inner(batch);
        match &result {
            Err(e) => {
                self.batch_done(partial);
                self.note_flush_error(e);
            }
            Ok(Prepared::Commit(_)) => self.committing = true,
            Ok(Prepared::Nothing(..)) => {}
        }
        result
    }

    /// A batch's blocks are settled (installed, or given back) by the
    /// caller under this borrow: no other batch can take them as in
    /// flight after, and the space admitted for its duplicates
    /// (`begin_batch`) goes back, each being installed or given back too.
    fn settle(&mut self, blocks: &[BatchBlock], dup_admitted: u64) {
        for b in blocks {
            let k = pending_key(&b.blk);
            if let Some(n) = self.taken.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    self.taken.remove(&k);
                }
            }
        }
        self.unadmit_bytes(dup_admitted);
        self.dup_admitted = self.dup_admitted.saturating_sub(dup_admitted);
    }

    /// A batch is committed (or failed): it no longer holds file data.
    fn batch_done(&mut self, partial: bool) {
        if partial {
            self.partials = self.partials.saturating_sub(1);
        } else {
            self.flushing = false;
        }
    }

    /// Finish a flush after `Prepared::run`: adopt its header and free
    /// what waited for it, or poison the mount if the device failed.
    pub fn flush_commit_finish(
        &mut self,
        prepared: Prepared,
        io: Result<()>,
    ) -> Result<FlushStats> {
        let result = match prepared {
            Prepared::Nothing(stats, partial) => {
                self.batch_done(partial);
                io.map(|()| stats)
            }
            Prepared::Commit(c) => {
                self.batch_done(c.partial);
                self.committing = false;
                io.and_then(|()| self.adopt_header(*c))
            }
        };
        match &result {
            Ok(_) => {
                let held = self.held_after_commit();
                *self.admitted.get_mut() = held;
                self.trim_metadata();
            }
            Err(e) => self.note_flush_error(e),
        }
        result
    }

    /// A failed flush: a device error poisons the mount.
    fn note_flush_error(&mut self, e: &Error) {
        if matches!(e, Error::Io { .. }) && self.poisoned.is_none() {
            log::error!("flush failed, refusing further writes: {e}");
            self.poisoned = Some(e.to_string());
        }
    }

    fn flush_commit_inner(&mut self, batch: FlushBatch) -> Result<Prepared> {
        self.writable()?;
        if let Some(e) = batch.error {
            return Err(e);
        }
        let partial = batch.scope.is_some();
        let done = self.install(batch.heuristics, batch.blocks)?;
        // A partial commit writes the closure as it is now: the groups
        // may have grown since the batch was taken.
        let scope = batch
            .scope
            .map(|(label, inum)| {
                let s = self.commit_closure(&label, inum);
                (label, s)
            })
            .filter(|(label, s)| self.scope_dirty(label, s));
        if (partial && scope.is_none()) || (!partial && !self.is_dirty()) {
            return Ok(Prepared::Nothing(self.uncommitted(&done), partial));
        }
        let mut c = self.flush_prepare(scope)?;
        c.partial = partial;
        c.stats.blocks += done.blocks;
        c.stats.bytes += done.bytes;
        c.stats.lost += done.lost;
        Ok(Prepared::Commit(Box::new(c)))
    }

    /// What a batch installed without a header: the stats of the
    /// volume's last commit, with the batch's blocks.
    fn uncommitted(&self, done: &Installed) -> FlushStats {
        FlushStats {
            tid: self.vol.header.mirror_tid,
            blocks: done.blocks,
            bytes: done.bytes,
            header_slot: self.vol.header_index,
            freed: 0,
            lost: done.lost,
        }
    }

    /// Record a written batch's blocks: each still the inode's pending
    /// block goes into its block table (a hole: removed from it) and
    /// leaves the pending map; a lost one (`FlushStats::lost`) is
    /// dropped; one rewritten, truncated or removed meanwhile is given
    /// back to the allocator. The compression heuristics go back to
    /// their inodes.
    fn install(
        &mut self,
        heuristics: HashMap<(String, u64), CompHeuristic>,
        blocks: Vec<BatchBlock>,
    ) -> Result<Installed> {
        for ((label, inum), h) in heuristics {
            if let Some(n) = self.pfs.get(&label).and_then(|p| p.inodes.handle(inum)) {
                n.lock().comp_heuristic = h;
            }
        }
        let mut done = Installed::default();
        for b in blocks {
            if let Some(e) = &b.lost {
                // Dropped unless written again meanwhile. A block no
                // longer the inode's may have had its old block freed
                // (and reused) while the batch was out: nothing is lost.
                let handle = self.pfs.get(&b.label).and_then(|p| p.inodes.handle(b.inum));
                if let Some(mut n) = handle.as_ref().map(InodeLock::lock).filter(|n| {
                    n.pending
                        .get(&b.lbase)
                        .is_some_and(|p| Arc::ptr_eq(p, &b.blk))
                }) {
                    log_lost(b.inum, b.lbase, e);
                    n.pending.remove(&b.lbase);
                    done.lost += 1;
                    done.settled += 1;
                } else {
                    log::debug!(
                        "inode {}: the old block under the 64 KiB block at {:#x} was not read \
                         ({e}); the block was superseded meanwhile",
                        b.inum,
                        b.lbase
                    );
                }
                continue;
            }
            let Some(leaf) = b.written else { continue };
            let vol = &self.vol;
            let handle = self.pfs.get(&b.label).and_then(|p| p.inodes.handle(b.inum));
            let current = handle.as_ref().map(InodeLock::lock).filter(|n| {
                b.lbase < n.size()
                    && n.pending
                        .get(&b.lbase)
                        .is_some_and(|p| Arc::ptr_eq(p, &b.blk))
            });
            match current {
                Some(mut n) => {
                    n.pending.remove(&b.lbase);
                    done.settled += 1;
                    match leaf {
                        Some(br) => {
                            done.blocks += 1;
                            done.bytes += br.data_off.bytes();
                            n.table
                                .insert(vol, crate::blocktable::TreeKind::File, true, br)?;
                        }
                        None => {
                            n.table.delete(vol, b.lbase)?;
                        }
                    }
                }
                None => {
                    // Rewritten, truncated or removed meanwhile (or
                    // committed by a partial commit that wrote it again).
                    if let Some(br) = leaf.filter(|_| !b.shared_durable) {
                        let free_at = self.next_tid()?;
                        let mut space = lock_space(&self.space);
                        if !space.release_unflushed(br.data_off) {
                            // A commit since it was allocated made its
                            // allocation durable; no header references it.
                            space.queue_free(br.data_off, true, free_at);
                        }
                    }
                }
            }
        }
        Ok(done)
    }

    /// A whole flush with the mount held throughout.
    fn flush_inner(&mut self) -> Result<FlushStats> {
        let c = self.flush_prepare(None)?;
        c.run()?;
        self.adopt_header(c)
    }

    /// Whether a partial commit of `scope` (inodes of PFS `label`) has
    /// anything to write.
    fn scope_dirty(&self, label: &str, scope: &BTreeSet<u64>) -> bool {
        let Some(p) = self.pfs.get(label) else {
            return false;
        };
        p.root.dirty
            || scope.iter().any(|i| {
                p.removed.lock().contains(i)
                    || p.dropped.lock().contains_key(i)
                    || p.inodes.handle(*i).is_some_and(|n| n.lock().dirty)
            })
    }

    /// Write the tree and the freemap (`flush.rs` order) and make the
    /// volume header of the commit, not yet written. `scope`: a partial
    /// commit of those inodes of that PFS (their data, inodes, removals
    /// and drops, the PFS root and the super-root); `None`: everything,
    /// the access times waiting in memory too (`flush_atimes`).
    fn flush_prepare(&mut self, scope: Option<(String, BTreeSet<u64>)>) -> Result<CommitIo> {
        if scope.is_none() {
            if let Err(e) = self.flush_atimes() {
                // An access time is not worth failing the flush for.
                log::warn!("access times left for a later flush: {e}");
            }
        }
        let tid = self.next_tid()?;
        // A block this flush drops is referenced by the headers before
        // it; the header slots rotate, so the last of those is gone once
        // the header of tid + slots - 1 is written (see alloc.rs,
        // "Freeing at flush time").
        let nslots = disk::volhdr_count(self.vol.header.volu_size) as u64;
        let free_at = tid + nslots.max(1) - 1;
        let session_tid = self.session_tid;
        let space_arc = self.space.clone();
        let mut space = lock_space(&space_arc);
        let Mount {
            vol,
            sroot,
            pfs,
            taken,
            ..
        } = self;
        let mut w = Writer {
            vol,
            space: space.as_mut(),
            tid,
            blocks: 0,
            bytes: 0,
            lost: 0,
            taken,
        };
        let mut seen = HashSet::new();
        // Removed inodes whose trees the device phase walks (`CommitIo`).
        let mut removed_trees = Vec::new();
        for (label, p) in pfs.iter_mut() {
            let members = match &scope {
                None => None,
                Some((l, s)) if l == label => Some(s),
                Some(_) => continue,
            };
            let inums: Vec<u64> = match members {
                None => p.inodes.get_mut().keys().copied().collect(),
                Some(s) => s.iter().copied().collect(),
            };
            let mut drops = Vec::new();
            let (dropped, removed_set) = (p.dropped.get_mut(), p.removed.get_mut());
            let removed: Vec<u64> = match members {
                None => {
                    drops.extend(std::mem::take(dropped).into_values().flatten());
                    std::mem::take(removed_set).into_iter().collect()
                }
                Some(s) => {
                    for i in s {
                        drops.extend(dropped.remove(i).into_iter().flatten());
                    }
                    s.iter()
                        .filter(|i| removed_set.remove(i))
                        .copied()
                        .collect()
                }
            };
            let lsnap = p.root.data.meta.pfs_lsnap_tid;
            for inum in removed {
                if let Some(ibr) = p.root.table.delete(w.vol, inum)? {
                    removed_trees.push((ibr, lsnap));
                }
                p.root.dirty = true;
            }
            for inum in &inums {
                let Some(mut node) = p
                    .inodes
                    .get_mut()
                    .get(inum)
                    .map(InodeLock::lock)
                    .filter(|n| n.dirty)
                else {
                    continue;
                };
                let br = flush_inode(&mut w, &mut node, *inum, 0)?;
                p.root
                    .table
                    .insert(w.vol, crate::blocktable::TreeKind::Directory, true, br)?;
                p.root.dirty = true;
            }
            for inum in &inums {
                if let Some(node) = p.inodes.get_mut().get(inum) {
                    drops.extend(node.lock().table.take_dropped());
                }
            }
            match members {
                None => p.depend.get_mut().clear(),
                Some(s) => p.depend.get_mut().committed(s),
            }
            // The inode numbers handed out since, into the root (which a
            // repair may have raised on its own).
            let last_inum = (*p.last_inum.get_mut()).max(p.root.data.meta.pfs_inum);
            *p.last_inum.get_mut() = last_inum;
            if p.root.data.meta.pfs_inum != last_inum {
                p.root.data.meta.pfs_inum = last_inum;
                p.root.dirty = true;
            }
            if p.root.dirty {
                let br = flush_inode(&mut w, &mut p.root, p.key, BREF_FLAG_PFSROOT)?;
                sroot
                    .table
                    .insert(w.vol, crate::blocktable::TreeKind::Directory, true, br)?;
                sroot.dirty = true;
            }
            drops.extend(p.root.table.take_dropped());
            let lsnap = p.root.data.meta.pfs_lsnap_tid;
            queue_drops(w.space, drops, Some(lsnap), session_tid, free_at, &mut seen);
        }
        // A flush that changed only the freemap (bulkfree, recovery)
        // leaves the super-root where it is.
        let sroot_br = if sroot.dirty {
            let old = sroot.bref;
            let br = flush_inode(&mut w, sroot, 0, 0)?;
            let mut drops = sroot.table.take_dropped();
            drops.push(old);
            // Nothing but the volume header points into the super-root's
            // tree (PFS roots are copied, never shared): no snapshot rule.
            queue_drops(w.space, drops, None, session_tid, free_at, &mut seen);
            br
        } else {
            sroot.bref
        };
        let (blocks, bytes, lost) = (w.blocks, w.bytes, w.lost);
        let dev = vol.device().clone();
        let freemap_blockset = space.flush(dev.as_ref(), tid)?;
        let mut vh = vol.header.clone();
        vh.mirror_tid = tid;
        vh.freemap_tid = tid;
        vh.sroot_blockset[0] = sroot_br;
        vh.freemap_blockset = freemap_blockset;
        vh.allocator_free = space.allocator_free();
        let nslots = disk::volhdr_count(vh.volu_size);
        let slot = (vol.header_index + 1) % nslots;
        let raw = vh.encode();
        debug_assert_eq!(raw.len(), VOLUME_BYTES);
        Ok(CommitIo {
            partial: false,
            dev,
            raw,
            reader: vol.reader(),
            space: space_arc.clone(),
            removed_trees,
            seen: Mutex::new(seen),
            session_tid,
            free_at,
            at: disk::volhdr_offset(slot),
            stats: FlushStats {
                tid,
                blocks,
                bytes,
                header_slot: slot,
                freed: 0,
                lost,
            },
        })
    }

    /// A commit's header is on the media: it is the volume's now, and
    /// the blocks that waited for it are freed.
    fn adopt_header(&mut self, c: CommitIo) -> Result<FlushStats> {
        let CommitIo { raw, at, stats, .. } = c;
        self.vol.header = disk::VolumeHeader::decode(&raw, at)?;
        self.vol.header_index = stats.header_slot;
        let freed = match self.frees_allowed_through(stats.tid) {
            Some(tid) => lock_space(&self.space).committed(tid),
            None => 0,
        };
        log::info!(
            "flush {:#x}: {} blocks, {} bytes, volume header {}, {freed} bytes freed",
            stats.tid,
            stats.blocks,
            stats.bytes,
            stats.header_slot
        );
        Ok(FlushStats { freed, ..stats })
    }

    /// At the commit of `tid`: the tid through which queued frees may
    /// go now. With no reader outside the lock, all of them; else those
    /// dropped through the commit at the gate's last advance, once the
    /// readers from before it are gone (the gate advances now if they
    /// are); `None` while they read.
    fn frees_allowed_through(&mut self, tid: u64) -> Option<u64> {
        if self.gate.idle() {
            self.gate.try_advance();
            self.gate_mark = tid;
            return Some(tid);
        }
        if self.gate.try_advance() {
            Some(std::mem::replace(&mut self.gate_mark, tid))
        } else {
            None
        }
    }

    /// Refuse while a flush or a partial commit has a batch out or a
    /// commit is between its prepare and finish: reclaim and PFS
    /// operations run between commits (the daemon's `between_flushes`).
    pub(crate) fn no_commit_under_way(&self) -> Result<()> {
        if self.flushing || self.partials > 0 || self.committing {
            return Err(Error::InvalidArgument {
                what: "a flush is in progress".into(),
            });
        }
        Ok(())
    }

    /// Commit until no freed block waits for a header (each commit
    /// writes the freemap, if changed, and a header), so space dropped
    /// by earlier flushes is free now; for a writer about to fail with
    /// ENOSPC and for unmount. Returns the bytes given back.
    pub fn reclaim(&mut self) -> Result<u64> {
        self.writable()?;
        self.no_commit_under_way()?;
        let mut freed = 0;
        // At most one commit per header slot releases the whole queue
        // (and one more while readers outside the lock hold the gate).
        for _ in 0..=disk::volhdr_count(self.vol.header.volu_size) + 1 {
            if lock_space(&self.space).pending_frees() == 0 {
                break;
            }
            freed += self.commit_now()?.freed;
        }
        if self.is_dirty() {
            // What the last commit freed (or anything else changed) goes
            // on the media too: the mount is clean after this.
            freed += self.commit_now()?.freed;
        }
        Ok(freed)
    }

    /// One whole flush, not pipelined, with `flush_commit`'s
    /// bookkeeping (admission reset, poisoning on a device error).
    fn commit_now(&mut self) -> Result<FlushStats> {
        let r = self.flush_inner();
        match &r {
            Ok(_) => {
                let held = self.held_after_commit();
                *self.admitted.get_mut() = held;
                self.trim_metadata();
            }
            Err(e @ Error::Io { .. }) => {
                log::error!("flush failed, refusing further writes: {e}");
                self.poisoned = Some(e.to_string());
            }
            Err(_) => {}
        }
        r
    }
}

/// Hand the blocks a tree dropped to the allocator. A block is queued
/// for freeing when nothing but the tree it left can reference it:
/// - not modified in place in an emergency (DragonFly's EMERG_MIP);
/// - in a PFS (`lsnap` is its `pfs_lsnap_tid`), born after its last
///   snapshot: a snapshot shares exactly the blocks of the flushed tree
///   it copied, all with tids up to `pfs_lsnap_tid` (DragonFly allows
///   overwriting in place by the same rule); the super-root's own blocks
///   (`lsnap` None) are never shared;
/// - file data: written by this mount (dedup, ours or DragonFly's, may
///   point other blockrefs at older data blocks; this mount's allocator
///   records every block its dedup shares and never frees those).
///
/// Everything else is counted as possibly free, bulkfree's work.
fn queue_drops(
    space: &mut dyn SpaceMap,
    drops: Vec<Blockref>,
    lsnap: Option<u64>,
    session_tid: u64,
    free_at: u64,
    seen: &mut HashSet<u64>,
) {
    for br in drops {
        if br.data_off.radix() == 0 || !seen.insert(br.data_off.offset()) {
            continue;
        }
        let unshared = br.flags & disk::BREF_FLAG_EMERG_MIP == 0
            && lsnap.is_none_or(|l| br.modify_tid > l)
            && match br.btype {
                BlockrefType::Data => br.modify_tid > session_tid,
                BlockrefType::Inode | BlockrefType::Indirect | BlockrefType::Dirent => true,
                _ => false,
            };
        if unshared {
            space.queue_free(br.data_off, br.btype == BlockrefType::Data, free_at);
        } else {
            space.note_possibly_free(br.data_off.bytes());
        }
    }
}

/// The blocks under a removed inode (`ibr`, its blockref in the inode
/// index, which the index's own drop list holds): every indirect,
/// data and dirent block of its last flushed tree. A block that cannot
/// be read ends the walk of its subtree; what lies below is left for
/// bulkfree.
fn inode_tree_drops(vol: &Volume, ibr: &Blockref, out: &mut Vec<Blockref>, unread: &mut u64) {
    let ino = match pfs::read_inode(vol, ibr) {
        Ok(i) => i,
        Err(e) => {
            log::warn!(
                "removed inode at {:#x} unreadable, its blocks are left for bulkfree: {e}",
                ibr.data_off.offset()
            );
            *unread += ibr.data_count();
            return;
        }
    };
    if ino.data.meta.has_direct_data() {
        return;
    }
    let mut stack: Vec<(Blockref, usize)> = ino
        .data
        .blockset()
        .into_iter()
        .filter(|b| !b.is_empty())
        .map(|b| (b, 0))
        .collect();
    while let Some((br, depth)) = stack.pop() {
        if br.data_off.radix() == 0 || br.data_off.offset() == 0 {
            continue;
        }
        out.push(br);
        if br.btype != BlockrefType::Indirect {
            continue;
        }
        if depth >= crate::chain::DEPTH_MAX {
            *unread += br.data_count();
            continue;
        }
        match crate::chain::read_node(vol, &br) {
            Ok(set) => stack.extend(
                set.into_iter()
                    .filter(|b| !b.is_empty())
                    .map(|b| (b, depth + 1)),
            ),
            Err(e) => {
                log::warn!("indirect block at {:#x} of a removed inode unreadable, what is below is left for bulkfree: {e}",
                    br.data_off.offset());
                *unread += br.data_count();
            }
        }
    }
}

/// What `flush_commit_prepare` leaves to do.
pub enum Prepared {
    /// Nothing changed but the file data already written: no header.
    /// (The flag: a partial commit's.)
    Nothing(FlushStats, bool),
    Commit(Box<CommitIo>),
}

impl Prepared {
    /// The device part of the commit: a barrier (everything written
    /// before is durable), the volume header, a barrier. Needs no lock
    /// on the mount.
    pub fn run(&self) -> Result<()> {
        match self {
            Prepared::Nothing(..) => Ok(()),
            Prepared::Commit(c) => c.run(),
        }
    }
}

/// A commit waiting for the device: the new volume header and where it
/// goes.
pub struct CommitIo {
    /// A partial commit's (`Mount::fsync_begin`).
    partial: bool,
    dev: Arc<dyn BlockDevice>,
    raw: Vec<u8>,
    at: u64,
    stats: FlushStats,
    /// For the trees of inodes the commit removes: their blocks are
    /// walked in the device phase (the walk reads them; they stay
    /// allocated until freed through the queue) and queued for freeing.
    reader: Volume,
    space: Arc<Mutex<Box<dyn SpaceMap>>>,
    removed_trees: Vec<(Blockref, u64)>,
    /// Blocks the commit queued already (a removed inode's tree holds
    /// blocks its table dropped before it went): each is queued once.
    seen: Mutex<HashSet<u64>>,
    session_tid: u64,
    free_at: u64,
}

impl CommitIo {
    fn run(&self) -> Result<()> {
        for (ibr, lsnap) in &self.removed_trees {
            let mut drops = Vec::new();
            let mut noted = 0;
            inode_tree_drops(&self.reader, ibr, &mut drops, &mut noted);
            let mut space = lock_space(&self.space);
            space.note_possibly_free(noted);
            queue_drops(
                space.as_mut(),
                drops,
                Some(*lsnap),
                self.session_tid,
                self.free_at,
                &mut self.seen.lock().unwrap_or_else(|p| p.into_inner()),
            );
        }
        let io = |op, at| move |source| Error::Io { op, at, source };
        self.dev.barrier().map_err(io("barrier", 0))?;
        self.dev
            .write_at(&self.raw, self.at)
            .map_err(io("write volume header", self.at))?;
        self.dev.barrier().map_err(io("barrier", self.at))
    }
}

/// One data block of a pipelined flush.
struct BatchBlock {
    label: String,
    inum: u64,
    lbase: u64,
    blk: Arc<PendingBlock>,
    size: u64,
    comp_algo: u8,
    check_algo: u8,
    /// After `write`: the new blockref, or `None` for a hole.
    written: Option<Option<Blockref>>,
    /// After `write`: written in part, and why its old block could not
    /// be read to merge with (`FlushStats::lost` if the block is still
    /// the inode's at install).
    lost: Option<Error>,
    /// The block written is a durable one shared by dedup: nothing to
    /// give back if it is superseded.
    shared_durable: bool,
    /// Placed with dedup (shared with, and recorded for, other blocks of
    /// the same bytes). Not when another batch out at the same time holds
    /// the same pending block: the two copies would share one block, and
    /// whichever commit comes second, finding its block superseded, could
    /// not give it back (a shared block is left to bulkfree).
    dedup: bool,
}

/// A pending block's identity while batches hold it.
fn pending_key(blk: &Arc<PendingBlock>) -> usize {
    Arc::as_ptr(blk) as usize
}

/// The file data of a flush, written without holding the `Mount`.
pub struct FlushBatch {
    tid: u64,
    /// Reads the old blocks of blocks written in part.
    reader: Volume,
    dev: Arc<dyn BlockDevice>,
    space: Arc<Mutex<Box<dyn SpaceMap>>>,
    blocks: Vec<BatchBlock>,
    /// Each file's compression heuristic, carried through the batch and
    /// given back to its inode at commit.
    heuristics: HashMap<(String, u64), CompHeuristic>,
    error: Option<Error>,
    /// A partial commit's: the PFS and the inode fsync was called for.
    scope: Option<(String, u64)>,
    /// Laundering's (`Mount::launder_begin`): recorded, not committed.
    launder: bool,
    /// Space admitted for the blocks the batch writes that another batch
    /// out writes too (`Mount::dup_admitted`).
    dup_admitted: u64,
}

/// What `Mount::install` did with a batch's blocks.
#[derive(Default)]
struct Installed {
    /// Blocks recorded in their inodes' tables, and their bytes on disk.
    blocks: u64,
    bytes: u64,
    /// Writes dropped: their old blocks could not be read.
    lost: u64,
    /// Pending blocks the batch settled (recorded, made holes, or lost):
    /// their admission is spent.
    settled: u64,
}

impl FlushBatch {
    /// Blocks in the batch.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Compress, allocate and write every block. An error is kept for
    /// `flush_commit`, which reports it (and poisons the mount on I/O).
    pub fn write(&mut self) {
        // Blocks written in part last, in the order of the old blocks
        // they are merged with (one read each, in device order).
        let mut order: Vec<usize> = (0..self.blocks.len()).collect();
        order.sort_by_key(|&i| {
            let b = &self.blocks[i].blk;
            b.under
                .as_ref()
                .map(|u| (1, u.base.data_off.offset(), i))
                .unwrap_or((0, 0, i))
        });
        let mut new = NewBlocks::default();
        for i in order {
            if self.error.is_some() {
                return;
            }
            let b = &mut self.blocks[i];
            let data = match block_bytes(&b.blk, &self.reader, b.inum, b.lbase) {
                Ok(d) => d,
                Err(e) => {
                    b.lost = Some(e);
                    continue;
                }
            };
            let heur = self
                .heuristics
                .entry((b.label.clone(), b.inum))
                .or_default();
            let Some((phys, methods)) =
                encode_data_block(b.size, b.lbase, &data, b.comp_algo, b.check_algo, heur)
            else {
                b.written = Some(None);
                continue;
            };
            let mut br = data_bref(b.lbase, methods);
            crate::check::set_check(&mut br, &phys);
            let fp = DedupKey::of(&phys, methods);
            let dedup = b.dedup && dedupable(methods);
            if dedup && new.holds(&fp) {
                // The same bytes wait to be written: once written, the
                // dedup table offers them (a block not on the device
                // yet is offered to no one).
                if let Err(e) = new.write(self.dev.as_ref(), &self.space) {
                    self.error = Some(e);
                    return;
                }
            }
            let placed = {
                let mut space = lock_space(&self.space);
                // Admitted when written: a flush allocation, which may
                // use the reserve (`SpaceMap::alloc`).
                let dev = self.dev.as_ref();
                place_data(space.as_mut(), dev, &fp, &phys, b.lbase, true, b.dedup)
            };
            let off = match placed {
                Ok(Placed::New(off)) => {
                    // Written before the commit's barrier: another
                    // commit's barrier meanwhile (an fsync's) would have
                    // to write it first. Neighbours go to the device
                    // together.
                    if !new.takes(phys.len()) {
                        if let Err(e) = new.write(self.dev.as_ref(), &self.space) {
                            self.error = Some(e);
                            return;
                        }
                    }
                    new.push(off, phys, dedup.then_some(fp));
                    off
                }
                Ok(Placed::Shared { off, durable }) => {
                    b.shared_durable = durable;
                    off
                }
                Err(e) => {
                    self.error = Some(e);
                    return;
                }
            };
            br.data_off = off;
            br.mirror_tid = self.tid;
            br.modify_tid = self.tid;
            b.written = Some(Some(br));
        }
        if let Err(e) = new.write(self.dev.as_ref(), &self.space) {
            self.error = Some(e);
        }
    }
}

/// The longest run of neighbouring new blocks a batch writes at once.
const RUN_BYTES_MAX: u64 = 1 << 20;

/// The most bytes of new blocks a batch holds before writing them.
const NEW_BYTES_MAX: usize = 4 << 20;

/// New blocks of a batch waiting to be written: up to `NEW_BYTES_MAX`
/// are held, then written in device order, each run of neighbours as
/// one device request and the runs in flight together where the device
/// can (`BlockDevice::write_through_many`). A sequential writer's blocks
/// are allocated in order and come out as runs of `RUN_BYTES_MAX`;
/// rewritten blocks go where freed ones were, scattered, and sorting
/// finds the neighbours among them. Once on the device they are offered
/// to the dedup table, which may only point at blocks on the device.
#[derive(Default)]
struct NewBlocks {
    bytes: usize,
    blocks: Vec<(crate::disk::DataOff, Vec<u8>, Option<DedupKey>)>,
    /// The fingerprints of those that go to the dedup table.
    fps: HashSet<DedupKey>,
}

impl NewBlocks {
    /// Whether `len` more bytes fit.
    fn takes(&self, len: usize) -> bool {
        self.blocks.is_empty() || self.bytes + len <= NEW_BYTES_MAX
    }

    fn push(&mut self, off: crate::disk::DataOff, phys: Vec<u8>, fp: Option<DedupKey>) {
        self.bytes += phys.len();
        if let Some(fp) = fp {
            self.fps.insert(fp);
        }
        self.blocks.push((off, phys, fp));
    }

    /// Whether a block held has fingerprint `fp`.
    fn holds(&self, fp: &DedupKey) -> bool {
        self.fps.contains(fp)
    }

    /// Write every block held, in runs, and let go of them.
    fn write(&mut self, dev: &dyn BlockDevice, space: &Mutex<Box<dyn SpaceMap>>) -> Result<()> {
        if self.blocks.is_empty() {
            return Ok(());
        }
        self.blocks.sort_by_key(|b| b.0.offset());
        let mut runs: Vec<(u64, Vec<&[u8]>)> = Vec::new();
        let mut run_len = 0u64;
        for (off, phys, _) in &self.blocks {
            let (at, len) = (off.offset(), phys.len() as u64);
            match runs.last_mut() {
                Some((start, pieces))
                    if *start + run_len == at && run_len + len <= RUN_BYTES_MAX =>
                {
                    pieces.push(phys);
                    run_len += len;
                }
                _ => {
                    runs.push((at, vec![phys]));
                    run_len = len;
                }
            }
        }
        dev.write_through_many(&runs).map_err(|source| Error::Io {
            op: "write",
            at: runs[0].0,
            source,
        })?;
        let mut space = lock_space(space);
        for (off, _, fp) in &self.blocks {
            if let Some(fp) = fp {
                space.dedup_record(*fp, *off);
            }
        }
        drop(space);
        self.blocks.clear();
        self.fps.clear();
        self.bytes = 0;
        Ok(())
    }
}
