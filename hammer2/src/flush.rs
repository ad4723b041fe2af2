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

use crate::alloc::SpaceMap;
use crate::blocktable::{BlockSink, SetStats, TreeKind};
use crate::check;
use crate::dedup::DedupKey;
use crate::disk::{self, comp_method, enc_methods, Blockref, BlockrefType, BLOCKREF_BYTES};
use crate::error::{Error, Result};
use crate::inode::InodeNode;
use crate::strategy::{data_bref, dedupable, encode_data_block, place_data, write_placed, Placed};
use crate::volume::Volume;

/// Writes blocks for one flush.
pub struct Writer<'a> {
    pub vol: &'a Volume,
    pub space: &'a mut dyn SpaceMap,
    pub tid: u64,
    /// Blocks written, for the closing barrier and statistics.
    pub blocks: u64,
    pub bytes: u64,
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
    pub fn write_data(&mut self, br: &mut Blockref, phys: &[u8]) -> Result<()> {
        let fp = DedupKey::of(phys, br.methods);
        let dev = self.vol.device().clone();
        let placed = place_data(self.space, dev.as_ref(), &fp, phys, br.key, true)?;
        if let Placed::New(off) = placed {
            write_placed(dev.as_ref(), off, phys)?;
            if dedupable(br.methods) {
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
        let heur = &mut node.comp_heuristic;
        match encode_data_block(size, lbase, &blk, comp_algo, check_algo, heur) {
            None => {
                node.table.delete(w.vol, lbase)?;
            }
            Some((phys, methods)) => {
                let mut br = data_bref(lbase, methods);
                w.write_data(&mut br, &phys)
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
