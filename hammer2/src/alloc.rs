//! The freemap allocator (DragonFly's `hammer2_freemap.c`): where new
//! blocks go, and writing the freemap back copy-on-write at each flush.
//!
//! What it keeps: the whole freemap tree in memory (`tree`), DragonFly's
//! placement state (one iterator per blockref type, the "relaxed" flag,
//! each leaf's `bigmask` hint), the volume header's `allocator_free`, and
//! exact counts of free 16 KiB blocks and wholly free 64 KiB chunks.
//!
//! Placement is DragonFly's, step for step (see `bmap.rs` for the 4 MiB
//! level): an allocation starts at its type's iterator, in the 1 GiB zone
//! there, scanning the zone's 4 MiB entries outward from the iterator's
//! (forward and backward in turn), taking an entry that is unclassed or of
//! its own class; a zone that cannot serve it passes to the next zone, and
//! after wrapping twice around the volume the search turns "relaxed"
//! (any class) for one more round before `NoSpace`. A zone with no leaf
//! gets one, initialised as `hammer2_freemap_init` does. A failed relaxed
//! scan of a whole zone clears the radix's bit in the leaf's `bigmask`, so
//! later searches skip it.
//!
//! Lifetimes and the flush (DragonFly's model: blocks are never freed in
//! normal operation; only bulkfree returns space):
//! - `alloc` marks blocks allocated at once, in memory. `flush` writes every
//!   changed leaf, and every node above one, to its next rotation slot in
//!   the reserved segment (`tree.rs`), and returns the new
//!   `freemap_blockset`; the caller writes it in the volume header with
//!   `freemap_tid` = `mirror_tid`, after a barrier.
//! - Our addition, `release_unflushed`: a block allocated since the last
//!   flush and dropped before the next (say a block rewritten twice
//!   between flushes) goes back to the in-memory freemap. Safe because no
//!   durable tree can reference it: the last durable freemap shows it free
//!   and the last durable topology was written before it was allocated.
//!   Bits go back to free only for 16 KiB blocks that were free at the last
//!   flush and hold no other live allocation (`fresh`); a sub-16 KiB block
//!   released last-in-first-out also rewinds the `linear` cursor.
//! - The caller flushes the topology first (its allocations land in this
//!   freemap) and the freemap last with the same tid, so after a clean
//!   flush `freemap_tid == mirror_tid` and a remount has nothing to
//!   recover. (DragonFly flushes the freemap before the topology, so its
//!   freemap may lag by the blocks that flush allocated; both states
//!   are valid on disk and each side recovers the other's.)
//! - `mark_allocated` / `recover`: DragonFly's mount-time recovery marks
//!   every block newer than `freemap_tid` allocated (the freemap may lag
//!   the topology by one flush after a crash).
//!
//! Freeing at flush time (our addition; DragonFly frees only through
//! bulkfree): the mount hands each block its committed tree stopped
//! referencing to `queue_free`, when it can prove nothing else does (see
//! `Mount`'s flush: born after the PFS's last snapshot, not shared by
//! dedup). The block stays allocated until every volume header on the
//! media that may reference it has been overwritten: a block dropped by
//! the flush with tid N is referenced by the header of N-1 and older,
//! and the header slots rotate, so it is freed when the header of
//! N + slots - 1 is written (`committed`). Every header copy on the media
//! thus keeps a whole tree: a torn newest header falls back to one whose
//! blocks are all there, and DragonFly's fsck of every copy stays clean.
//! - Blocks of 16 KiB and more own their bitmap pairs and go back whole.
//! - Smaller blocks share a 16 KiB pair with others. A pair this session
//!   took from free for them (`claimed`) counts its live pieces; the pair
//!   goes back when the count reaches zero. Pieces in pairs taken before
//!   this session cannot be counted and are left for bulkfree.
//! - Dedup: a data block dedup handed out this session is recorded
//!   (`dedup_shared`) and never freed early; a block queued for freeing
//!   is forgotten by the dedup table, so it is never handed out again.
//! - Bulkfree: while a pass runs (between `bulkfree_start` and its merge
//!   or cancel) nothing is freed, as its scan reads the topology it began
//!   at; the merge drops queued blocks it freed or staged (bulkfree frees
//!   them), and forgets claims and dedup records of pairs it changed.
//!
//! The flush reserve (our addition; DragonFly refuses writes in the VFS
//! when `allocator_free` drops under 5% (2.5% for root) and has an
//! emergency mode, but its allocator has no reserve): ordinary
//! allocations fail with `NoSpace` once the wholly free 64 KiB chunks are
//! down to the reserve; flush allocations may use it. Every allocation
//! lies inside one 64 KiB chunk, so each takes at most one free chunk, and
//! a reserve of N chunks guarantees the flush N allocations of any size.

mod bmap;
mod bulkfree;
mod recover;
mod space;
mod tree;

pub use bulkfree::{ScanMap, SyncStats};
pub use recover::RecoveryStats;
pub use space::SpaceMap;

use crate::dedup::{DedupKey, DedupTable};
use crate::disk::freemap::{BmapData, BMAP_ALLOCATED, BMAP_FREE};
use crate::disk::{
    Blockref, BlockrefType, DataOff, VolumeHeader, FREEMAP_BLOCK_RADIX, FREEMAP_BLOCK_SIZE,
    FREEMAP_COUNT, FREEMAP_LEVELN_PSIZE, PBUFRADIX, PBUFSIZE, RADIX_MAX, RADIX_MIN, SET_COUNT,
    VOL_VERSION_MULTI_VOLUMES, ZONE_FREEMAP_00, ZONE_FREEMAP_END, ZONE_SEG,
};
use crate::error::{Error, Result};
use crate::freemap::FreemapLeaf;
use crate::volume::Volume;
use bmap::{LEAF_BYTES, SEGSIZE};
use bufcache::BlockDevice;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt;
use tree::{LeafData, Tree};

/// DragonFly's per-type iterators: 4 radix classes by 8 types, of which
/// it uses one per type (`hammer2_freemap_alloc`'s `hindex`).
const HEUR_NRADIX: usize = 4;
const HEUR_TYPES: usize = 8;
const HEUR_SIZE: usize = HEUR_NRADIX * HEUR_TYPES;
const LBUFRADIX: u8 = 14;

/// The flush reserve: 1/64 of the volume, at least 16 MiB, at most
/// 512 MiB. Why this much: one flush copies on write every ancestor of
/// every chain the frontend dirtied. One worst-case path from a data
/// block to the volume root is about 24 blocks of at most 64 KiB (up to 7
/// file indirect levels, the inode, up to 8 levels of the PFS inode index
/// or directory, the PFS root, 2 super-root levels and the super-root),
/// 1.5 MiB; paths share their upper levels, and each further inode adds
/// roughly its own inode and indirect blocks. 16 MiB (256 chunks) covers
/// ten worst-case paths, a few hundred typical inodes; the flush layer
/// must bound the chains it lets the frontend dirty to what this covers
/// (`reserve_bytes`). Freemap blocks cost nothing: they live in the
/// reserved segments. The 1/64 scaling keeps room for the larger dirty
/// sets big volumes run with, at 1.6% (ZFS holds back 3.1%).
const RESERVE_DIVISOR: u64 = 64;
const RESERVE_MIN: u64 = 16 << 20;
const RESERVE_MAX: u64 = 512 << 20;

/// The flush reserve of a volume of `total_size` bytes.
pub fn reserve_for(total_size: u64) -> u64 {
    (total_size / RESERVE_DIVISOR).clamp(RESERVE_MIN, RESERVE_MAX)
}

/// Who is asking: ordinary (frontend) allocations stop at the reserve,
/// flush allocations may use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Frontend,
    Flush,
}

/// One allocation request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// INODE, INDIRECT, DATA or DIRENT (the class and iterator follow it).
    pub btype: BlockrefType,
    /// 1 B..64 KiB, rounded up to a power of two of at least 1 KiB.
    pub bytes: u64,
    /// The key of the blockref being allocated: DATA blocks of 16 KiB and
    /// more try the spot their file offset suggests first.
    pub key: u64,
    pub purpose: Purpose,
}

/// What statfs and the flush layer need to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocStats {
    pub total_bytes: u64,
    /// Bytes in 16 KiB blocks in the free state, counting zones that have
    /// no leaf yet as their initialisation would leave them.
    pub free_bytes: u64,
    /// Bytes in wholly free 64 KiB chunks (what the reserve is held in).
    pub free_chunk_bytes: u64,
    /// The volume header's running estimate, kept as DragonFly keeps it.
    pub allocator_free: u64,
    pub reserve_bytes: u64,
    pub leaves: usize,
    pub nodes: usize,
    /// Allocations since the last flush (the ones `release_unflushed`
    /// accepts) and their bytes.
    pub unflushed: usize,
    pub unflushed_bytes: u64,
    pub freemap_tid: u64,
}

impl fmt::Display for AllocStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "freemap: {} of {} bytes free ({} in whole 64 KiB chunks, reserve {}), \
             allocator_free {}, {} leaves, {} nodes, {} unflushed allocations ({} bytes), \
             freemap_tid {:#x}",
            self.free_bytes,
            self.total_bytes,
            self.free_chunk_bytes,
            self.reserve_bytes,
            self.allocator_free,
            self.leaves,
            self.nodes,
            self.unflushed,
            self.unflushed_bytes,
            self.freemap_tid
        )
    }
}

/// DragonFly's `hammer2_fiterate`.
struct Iter {
    bnext: u64,
    loops: u32,
    relaxed: bool,
}

/// The freemap allocator of one mounted volume. Single-threaded; the
/// caller serialises access and supplies time (tids).
pub struct Allocator {
    tree: Tree,
    total_size: u64,
    allocator_beg: u64,
    allocator_free: u64,
    freemap_tid: u64,
    heur: [u64; HEUR_SIZE],
    relaxed: bool,
    /// Free 16 KiB blocks and wholly free 64 KiB chunks in existing leaves.
    free_blocks: u64,
    free_chunks: u64,
    /// The same for zones without a leaf, as initialisation will leave them.
    virtual_blocks: u64,
    virtual_chunks: u64,
    reserve_chunks: u64,
    /// Allocations since the last flush, by offset.
    unflushed: BTreeMap<u64, DataOff>,
    /// 16 KiB blocks that were free at the last flush and allocated since,
    /// with the number of live unflushed allocations in each.
    fresh: BTreeMap<u64, u32>,
    /// Set when a flush write failed: nothing more is accepted.
    poisoned: bool,
    /// Bulkfree passes started and the last one merged (`bulkfree.rs`).
    bulkfree_started: u64,
    bulkfree_applied: u64,
    bulkfree_flushed: u64,
    /// Blocks allocated since the running pass started.
    bulkfree_recent: Option<bulkfree::ScanMap>,
    /// Live dedup: fingerprints of recent data blocks (`dedup.rs`).
    dedup: DedupTable,
    /// Unflushed allocations shared by dedup: extra blockrefs pointing
    /// at them, each of which `release_unflushed` drops before the block
    /// itself may go.
    shares: BTreeMap<u64, u32>,
    /// 16 KiB pairs this session took from free for allocations under
    /// 16 KiB, with the number of those allocations still live in each
    /// (see "Freeing at flush time").
    claimed: BTreeMap<u64, u32>,
    /// Data blocks dedup handed out this session: never freed early.
    dedup_shared: HashSet<u64>,
    /// Committed blocks waiting for the header whose tid is given before
    /// they may be freed, in tid order.
    pending_frees: VecDeque<(u64, DataOff)>,
    /// Bytes of blocks the topology stopped referencing that were not
    /// freed early (bulkfree's work), since the last bulkfree merge.
    possibly_free: u64,
    /// `possibly_free` when the running bulkfree pass started.
    possibly_free_at_start: u64,
    /// Bytes freed early since the allocator was loaded.
    early_freed: u64,
}

/// Most 16 KiB pairs `claimed` tracks (one per 16 live small blocks at
/// best; about 40 MiB of map at the cap). Pairs claimed beyond it are
/// left to bulkfree.
const CLAIMED_MAX: usize = 1 << 20;
/// Most dedup shares recorded in a session (one per 64 KiB block shared
/// at best: 64 GiB of shared data, about 40 MiB of set); past it, dedup
/// stops sharing until a bulkfree merge forgets what it freed.
const DEDUP_SHARED_MAX: usize = 1 << 20;

/// The 64 KiB chunk and 16 KiB block arithmetic of an allocation.
fn blocks_of(off: DataOff) -> impl Iterator<Item = u64> {
    let start = off.offset() & !(FREEMAP_BLOCK_SIZE - 1);
    let end = off.offset() + off.bytes().max(1);
    (start..end).step_by(FREEMAP_BLOCK_SIZE as usize)
}

fn zone_of(offset: u64) -> u64 {
    offset & !(LEAF_BYTES - 1)
}

/// DragonFly's `hammer2_getradix` clamped to 1 KiB..64 KiB.
fn alloc_radix(bytes: u64) -> Result<u8> {
    if bytes == 0 || bytes > 1 << RADIX_MAX {
        return Err(Error::InvalidArgument {
            what: format!("allocation of {bytes} bytes"),
        });
    }
    let mut radix = RADIX_MIN;
    while (1u64 << radix) < bytes {
        radix += 1;
    }
    Ok(radix)
}

/// The volume's size as the allocator sees it (`hmp->total_size`).
fn total_size_of(vh: &VolumeHeader) -> u64 {
    if vh.version >= VOL_VERSION_MULTI_VOLUMES && vh.total_size != 0 {
        vh.total_size
    } else {
        vh.volu_size
    }
}

impl Allocator {
    /// Read the freemap of `vol` into memory.
    pub fn load(vol: &Volume) -> Result<Allocator> {
        let vh = &vol.header;
        let total_size = total_size_of(vh);
        if total_size > vol.device().size_bytes() || total_size < ZONE_SEG {
            return Err(Error::corrupt(
                format!("volume size {total_size} does not fit the device"),
                0,
            ));
        }
        if vh.allocator_beg > total_size {
            return Err(Error::corrupt(
                format!("allocator_beg {:#x} past the volume end", vh.allocator_beg),
                0,
            ));
        }
        let tree = Tree::load(vol)?;
        let mut a = Allocator {
            tree,
            total_size,
            allocator_beg: vh.allocator_beg,
            allocator_free: vh.allocator_free,
            freemap_tid: vh.freemap_tid,
            heur: [0; HEUR_SIZE],
            relaxed: false,
            free_blocks: 0,
            free_chunks: 0,
            virtual_blocks: 0,
            virtual_chunks: 0,
            reserve_chunks: 0,
            unflushed: BTreeMap::new(),
            fresh: BTreeMap::new(),
            poisoned: false,
            bulkfree_started: 0,
            bulkfree_applied: 0,
            bulkfree_flushed: 0,
            bulkfree_recent: None,
            dedup: DedupTable::default(),
            shares: BTreeMap::new(),
            claimed: BTreeMap::new(),
            dedup_shared: HashSet::new(),
            pending_frees: VecDeque::new(),
            possibly_free: 0,
            possibly_free_at_start: 0,
            early_freed: 0,
        };
        a.set_reserve_bytes(reserve_for(total_size));
        a.sanitize_leaves();
        a.count_free();
        log::info!("{}", a.stats());
        Ok(a)
    }

    /// Force the bmaps DragonFly never manages (below `allocator_beg`,
    /// reserved segments, past the end) to fully allocated, in case a
    /// damaged image shows them otherwise: the allocator must never hand
    /// them out.
    fn sanitize_leaves(&mut self) {
        let (beg, total) = (self.allocator_beg, self.total_size);
        let zones: Vec<(u64, usize)> = self.tree.by_zone.iter().map(|(&z, &i)| (z, i)).collect();
        for (zone, idx) in zones {
            let mut repaired = false;
            if let Some(leaf) = self.tree.nodes[idx].leaf.as_deref_mut() {
                for (n, b) in leaf.bmaps.iter_mut().enumerate() {
                    if !bmap::usable(zone, n, beg, total) && b.bitmapq != [u64::MAX; 8] {
                        *b = bmap::unusable();
                        repaired = true;
                    }
                }
            }
            if repaired {
                log::warn!("freemap leaf of zone {zone:#x} showed reserved space free; repaired");
                self.tree.touch(idx);
            }
        }
    }

    /// A zone gets a leaf only when its reserved segment lies inside the
    /// volume (DragonFly's newfs aligns volumes to 8 MiB, so this only
    /// matters for odd sizes: there the tail zone has no usable space).
    fn zone_exists(&self, zone: u64) -> bool {
        zone + ZONE_SEG <= self.total_size
    }

    fn count_free(&mut self) {
        let (mut blocks, mut chunks) = (0, 0);
        for leaf in self.tree.by_zone.values() {
            let leaf = self.tree.nodes[*leaf].leaf.as_deref().expect("leaf");
            for b in &leaf.bmaps {
                let (x, y) = bmap::free_counts(b);
                blocks += x;
                chunks += y;
            }
        }
        self.free_blocks = blocks;
        self.free_chunks = chunks;
        let (mut vb, mut vc) = (0, 0);
        let mut zone = 0;
        while zone < self.total_size {
            if self.zone_exists(zone) && !self.tree.by_zone.contains_key(&zone) {
                let (b, c) = self.virtual_counts(zone);
                vb += b;
                vc += c;
            }
            zone += LEAF_BYTES;
        }
        self.virtual_blocks = vb;
        self.virtual_chunks = vc;
    }

    /// Free blocks and chunks a new leaf for `zone` starts with.
    fn virtual_counts(&self, zone: u64) -> (u64, u64) {
        let usable = (0..FREEMAP_COUNT)
            .filter(|&n| bmap::usable(zone, n, self.allocator_beg, self.total_size))
            .count() as u64;
        (
            usable * (SEGSIZE / FREEMAP_BLOCK_SIZE),
            usable * bmap::CHUNKS_PER_BMAP,
        )
    }

    fn check_poisoned(&self) -> Result<()> {
        if self.poisoned {
            return Err(Error::Io {
                op: "freemap update",
                at: 0,
                source: std::io::Error::other("an earlier freemap write failed; remount"),
            });
        }
        Ok(())
    }

    // ---- allocation -------------------------------------------------

    /// An ordinary allocation of `bytes` for a block of type `btype`.
    pub fn alloc(&mut self, btype: BlockrefType, bytes: u64) -> Result<DataOff> {
        self.alloc_request(Request {
            btype,
            bytes,
            key: 0,
            purpose: Purpose::Frontend,
        })
    }

    /// An allocation made by the flush, which may use the reserve.
    pub fn alloc_flush(&mut self, btype: BlockrefType, bytes: u64) -> Result<DataOff> {
        self.alloc_request(Request {
            btype,
            bytes,
            key: 0,
            purpose: Purpose::Flush,
        })
    }

    pub fn alloc_request(&mut self, req: Request) -> Result<DataOff> {
        self.check_poisoned()?;
        if !matches!(
            req.btype,
            BlockrefType::Inode
                | BlockrefType::Indirect
                | BlockrefType::Data
                | BlockrefType::Dirent
        ) {
            return Err(Error::InvalidArgument {
                what: format!("allocation for a {} blockref", req.btype.name()),
            });
        }
        let radix = alloc_radix(req.bytes)?;
        let size = 1u64 << radix;
        if req.purpose == Purpose::Frontend && self.free_chunks_total() <= self.reserve_chunks {
            return Err(Error::NoSpace {
                bytes: size,
                free: self.free_bytes(),
            });
        }
        let (off, bgsize) = self.freemap_alloc(req.btype, radix, req.key)?;
        let d = DataOff::new(off, radix);
        // Pair assertions: the placement invariants DragonFly asserts.
        assert!(off >= self.allocator_beg && off + size <= self.total_size);
        assert!(
            off & (LEAF_BYTES - 1) >= ZONE_SEG,
            "allocation in a reserved segment"
        );
        assert!((off & (PBUFSIZE - 1)) + size <= PBUFSIZE);
        assert_eq!(self.block_state(off), Some(BMAP_ALLOCATED));
        let prior = self.unflushed.insert(off, d);
        assert!(prior.is_none(), "{d:?} handed out twice");
        if let Some(recent) = self.bulkfree_recent.as_mut() {
            recent.mark(req.btype, d);
        }
        for b in blocks_of(d) {
            if radix >= FREEMAP_BLOCK_RADIX || bgsize != 0 {
                let was = self.fresh.insert(b, 1);
                assert!(was.is_none(), "fresh block {b:#x} reused");
            } else if let Some(c) = self.fresh.get_mut(&b) {
                *c += 1;
            }
            if radix < FREEMAP_BLOCK_RADIX {
                if bgsize != 0 {
                    if self.claimed.len() < CLAIMED_MAX {
                        self.claimed.insert(b, 1);
                    }
                } else if let Some(c) = self.claimed.get_mut(&b) {
                    *c += 1;
                }
            }
        }
        log::debug!("alloc {} {size} -> {d:?}", req.btype.name());
        Ok(d)
    }

    /// `hammer2_freemap_alloc`: DragonFly's search. Returns the offset and
    /// the bitmap-granular bytes taken.
    fn freemap_alloc(&mut self, btype: BlockrefType, radix: u8, key: u64) -> Result<(u64, u64)> {
        let class = bmap::class_of(btype);
        let hindex = ((PBUFRADIX - LBUFRADIX) as usize + btype.to_u8() as usize * HEUR_NRADIX)
            & (HEUR_SIZE - 1);
        let mut bpref = self.heur[hindex];
        if bpref > self.total_size {
            bpref = self.total_size - 1;
        }
        let mut it = Iter {
            bnext: bpref,
            loops: 0,
            relaxed: self.relaxed,
        };
        let result = loop {
            if let Some(found) = self.try_alloc(class, radix, key, &mut it)? {
                break Ok(found);
            }
            if !self.iterate(&mut it) {
                break Err(Error::NoSpace {
                    bytes: 1 << radix,
                    free: self.free_bytes(),
                });
            }
        };
        self.relaxed |= it.relaxed;
        self.heur[hindex] = it.bnext;
        result
    }

    /// `hammer2_freemap_iterate`: on to the next zone; false when the
    /// search is over.
    fn iterate(&self, it: &mut Iter) -> bool {
        it.bnext = zone_of(it.bnext) + LEAF_BYTES;
        if it.bnext >= self.total_size {
            it.bnext = 0;
            it.loops += 1;
            if it.loops >= 2 {
                if it.relaxed {
                    return false;
                }
                it.relaxed = true;
            }
        }
        true
    }

    /// `hammer2_freemap_try_alloc`: try the zone `it.bnext` is in.
    fn try_alloc(
        &mut self,
        class: u16,
        radix: u8,
        key: u64,
        it: &mut Iter,
    ) -> Result<Option<(u64, u64)>> {
        let zone = zone_of(it.bnext);
        let idx = match self.tree.by_zone.get(&zone) {
            Some(&idx) => {
                if self.tree.nodes[idx].bref.freemap_bigmask() & (1u32 << radix) == 0 {
                    return Ok(None);
                }
                idx
            }
            None if self.zone_exists(zone) => self.create_leaf(zone)?,
            None => return Ok(None),
        };
        // DragonFly modifies the leaf before scanning, found or not.
        self.tree.touch(idx);
        let start = ((it.bnext - zone) / SEGSIZE) as i64;
        for count in 0..FREEMAP_COUNT as i64 {
            if start + count >= FREEMAP_COUNT as i64 && start - count < 0 {
                break;
            }
            for n in [start + count, start - count] {
                if !(0..FREEMAP_COUNT as i64).contains(&n) {
                    continue;
                }
                let n = n as usize;
                let b = &self.leaf_data(idx).bmaps[n];
                if !bmap::worth_trying(b, radix)
                    || !(b.class == 0 || b.class == class || it.relaxed)
                {
                    continue;
                }
                let placed = self.with_bmap(idx, n, |b| bmap::bmap_alloc(b, class, key, radix));
                if let Some(p) = placed {
                    self.allocator_free = self.allocator_free.saturating_sub(p.bgsize);
                    return Ok(Some((zone + n as u64 * SEGSIZE + p.offset, p.bgsize)));
                }
            }
        }
        if start == 0 && it.relaxed {
            let br = &mut self.tree.nodes[idx].bref;
            let bigmask = br.freemap_bigmask() & !(1u32 << radix);
            let avail = br.freemap_avail();
            br.set_freemap_hints(bigmask, avail);
        }
        Ok(None)
    }

    fn leaf_data(&self, idx: usize) -> &LeafData {
        self.tree.nodes[idx].leaf.as_deref().expect("leaf node")
    }

    /// Change bmap `n` of leaf `idx`, keeping the free counts exact.
    fn with_bmap<T>(&mut self, idx: usize, n: usize, f: impl FnOnce(&mut BmapData) -> T) -> T {
        let leaf = self.tree.nodes[idx].leaf.as_deref_mut().expect("leaf node");
        let b = &mut leaf.bmaps[n];
        let (ob, oc) = bmap::free_counts(b);
        let out = f(b);
        let (nb, nc) = bmap::free_counts(b);
        self.free_blocks = self.free_blocks + nb - ob;
        self.free_chunks = self.free_chunks + nc - oc;
        self.tree.touch(idx);
        out
    }

    fn create_leaf(&mut self, zone: u64) -> Result<usize> {
        let (bmaps, avail) = bmap::init_leaf(zone, self.allocator_beg, self.total_size);
        let (vb, vc) = self.virtual_counts(zone);
        let idx = self.tree.insert_leaf(zone, LeafData::new(bmaps), avail)?;
        self.virtual_blocks -= vb;
        self.virtual_chunks -= vc;
        self.free_blocks += vb;
        self.free_chunks += vc;
        log::debug!("freemap leaf created for zone {zone:#x}");
        Ok(idx)
    }

    // ---- release and marking ----------------------------------------

    /// Give back a block allocated since the last flush and never made
    /// durable. Anything else is refused.
    pub fn release_unflushed(&mut self, off: DataOff) -> Result<()> {
        self.check_poisoned()?;
        match self.unflushed.get(&off.offset()) {
            Some(&d) if d == off => {}
            _ => {
                return Err(Error::InvalidArgument {
                    what: format!("release of {off:?}, which is not an unflushed allocation"),
                });
            }
        }
        if let Some(c) = self.shares.get_mut(&off.offset()) {
            // Another blockref still points here (dedup): drop one share.
            *c -= 1;
            if *c == 0 {
                self.shares.remove(&off.offset());
            }
            log::debug!("release {off:?}: one dedup share dropped");
            return Ok(());
        }
        self.unflushed.remove(&off.offset());
        self.dedup.forget(off.offset());
        let small = off.bytes() < FREEMAP_BLOCK_SIZE;
        let mut freed_any = false;
        for b in blocks_of(off) {
            let mut free = false;
            if let Some(c) = self.fresh.get_mut(&b) {
                *c -= 1;
                if *c == 0 {
                    self.fresh.remove(&b);
                    free = true;
                }
            }
            if small {
                // The piece leaves the pair's count; a pair whose pieces
                // are all gone holds nothing any header references.
                if let Some(c) = self.claimed.get_mut(&b) {
                    *c -= 1;
                    if *c == 0 {
                        self.claimed.remove(&b);
                        free = true;
                    }
                }
            }
            if free {
                self.fresh.remove(&b);
                self.claimed.remove(&b);
                self.free_pair(b);
                freed_any = true;
            }
        }
        let zone = zone_of(off.offset());
        let idx = self.tree.by_zone[&zone];
        let n = ((off.offset() - zone) / SEGSIZE) as usize;
        let base = zone + n as u64 * SEGSIZE;
        let size = off.bytes();
        let within = off.offset() - base;
        if !freed_any && size < FREEMAP_BLOCK_SIZE && within & (FREEMAP_BLOCK_SIZE - 1) != 0 {
            self.with_bmap(idx, n, |bm| {
                if bm.linear as u64 == within + size {
                    bm.linear = within as i32;
                }
            });
        }
        log::debug!("release {off:?} (space returned: {freed_any})");
        Ok(())
    }

    /// Put the 16 KiB pair at `b` (allocated, holding nothing any header
    /// references) back to free, keeping `avail`, `allocator_free`, the
    /// leaf's hints and the `linear` cursor right.
    fn free_pair(&mut self, b: u64) {
        let zone = zone_of(b);
        let Some(&idx) = self.tree.by_zone.get(&zone) else {
            return;
        };
        let n = ((b - zone) / SEGSIZE) as usize;
        let within = b - zone - n as u64 * SEGSIZE;
        self.with_bmap(idx, n, |bm| {
            let old = bmap::set_block(bm, within, BMAP_FREE);
            assert_eq!(old, BMAP_ALLOCATED, "freed block {b:#x} not allocated");
            bm.avail = bm.avail.wrapping_add(FREEMAP_BLOCK_SIZE as u32);
            // Never leave the cursor inside a block that is free again.
            let lin = bm.linear as u64;
            if bm.linear > 0 && lin & !(FREEMAP_BLOCK_SIZE - 1) == within {
                bm.linear = within as i32;
            }
        });
        self.allocator_free += FREEMAP_BLOCK_SIZE;
        let br = &mut self.tree.nodes[idx].bref;
        let avail = br.freemap_avail();
        br.set_freemap_hints(u32::MAX, avail);
        self.relaxed = false;
    }

    /// Queue the committed block `off`, which the tree being committed no
    /// longer references and nothing else can (the caller's proof: see
    /// "Freeing at flush time"), to be freed once the header with tid
    /// `free_at` is on the media. `data`: a file data block, which dedup
    /// may have shared. Returns whether it was queued; a block that is
    /// not is counted as possibly free (left for bulkfree).
    pub fn queue_free(&mut self, off: DataOff, data: bool, free_at: u64) -> bool {
        let ok = !self.poisoned
            && self.early_freeable(off)
            && !(data && self.dedup_shared.contains(&off.offset()));
        if ok {
            self.dedup.forget(off.offset());
            self.pending_frees.push_back((free_at, off));
        } else {
            self.note_possibly_free(off.bytes());
        }
        ok
    }

    /// Count `bytes` the topology stopped referencing that only bulkfree
    /// can give back.
    pub fn note_possibly_free(&mut self, bytes: u64) {
        self.possibly_free = self.possibly_free.saturating_add(bytes);
    }

    /// Whether the block `off` is one this allocator can give back by
    /// itself: inside the managed space, and whole pairs or pieces of a
    /// pair it claimed this session, every pair allocated.
    fn early_freeable(&self, off: DataOff) -> bool {
        let radix = off.radix();
        let (at, bytes) = (off.offset(), off.bytes());
        if !(RADIX_MIN..=RADIX_MAX).contains(&radix)
            || at < self.allocator_beg
            || at + bytes > self.total_size
            || (at & (PBUFSIZE - 1)) + bytes > PBUFSIZE
            || at & (LEAF_BYTES - 1) < ZONE_SEG
            || at & (bytes - 1) != 0
        {
            return false;
        }
        if bytes < FREEMAP_BLOCK_SIZE
            && !self.claimed.contains_key(&(at & !(FREEMAP_BLOCK_SIZE - 1)))
        {
            return false;
        }
        blocks_of(off).all(|b| self.block_state(b) == Some(BMAP_ALLOCATED))
    }

    /// The header with tid `tid` is on the media: free every queued block
    /// that waited for it, unless a bulkfree pass is running (its scan
    /// reads the topology it began at; the frees wait for its merge).
    /// Returns the bytes given back.
    pub fn committed(&mut self, tid: u64) -> u64 {
        if self.poisoned || self.bulkfree_recent.is_some() {
            return 0;
        }
        let mut returned = 0;
        while let Some(&(at, off)) = self.pending_frees.front() {
            if at > tid {
                break;
            }
            self.pending_frees.pop_front();
            returned += self.free_committed(off);
        }
        self.early_freed += returned;
        returned
    }

    /// Free one queued block; returns the bytes that went back to free.
    fn free_committed(&mut self, off: DataOff) -> u64 {
        if !self.early_freeable(off) {
            // A bulkfree merge or a recovery changed it meanwhile.
            self.note_possibly_free(off.bytes());
            return 0;
        }
        if off.bytes() >= FREEMAP_BLOCK_SIZE {
            for b in blocks_of(off) {
                self.free_pair(b);
            }
            return off.bytes();
        }
        let b = off.offset() & !(FREEMAP_BLOCK_SIZE - 1);
        let Some(c) = self.claimed.get_mut(&b) else {
            return 0;
        };
        *c -= 1;
        if *c > 0 {
            return 0;
        }
        self.claimed.remove(&b);
        self.free_pair(b);
        FREEMAP_BLOCK_SIZE
    }

    /// Blocks waiting in the free queue for a header.
    pub fn pending_frees(&self) -> usize {
        self.pending_frees.len()
    }

    /// Bytes the topology stopped referencing since the last bulkfree
    /// merge that were not freed early: what a bulkfree may give back.
    pub fn possibly_free_bytes(&self) -> u64 {
        self.possibly_free
    }

    /// Bytes freed early since the allocator was loaded.
    pub fn early_freed_bytes(&self) -> u64 {
        self.early_freed
    }

    /// Mark a block allocated (a block written by others, or recovery).
    /// Blocks below `allocator_beg` belong to newfs and are left alone.
    /// Returns whether the freemap changed.
    pub fn mark_allocated(&mut self, off: DataOff) -> Result<bool> {
        self.adjust(off, None).map(|(_, changed)| changed)
    }

    /// `hammer2_freemap_adjust` with DORECOVER: returns the bytes taken
    /// from free and whether anything changed. `class` is set on an
    /// unclassed bmap.
    fn adjust(&mut self, off: DataOff, class: Option<u16>) -> Result<(u64, bool)> {
        self.check_poisoned()?;
        let radix = off.radix();
        if radix == 0 {
            return Ok((0, false));
        }
        let (at, bytes) = (off.offset(), off.bytes());
        if !(6..=RADIX_MAX).contains(&radix) {
            return Err(Error::corrupt(format!("block of radix {radix}"), at));
        }
        if at < self.allocator_beg {
            return Ok((0, false));
        }
        if at + bytes > self.total_size
            || (at & (PBUFSIZE - 1)) + bytes > PBUFSIZE
            || at & (LEAF_BYTES - 1) < ZONE_SEG
        {
            return Err(Error::corrupt(
                format!("block of {bytes} bytes outside the allocatable space"),
                at,
            ));
        }
        let zone = zone_of(at);
        let idx = match self.tree.by_zone.get(&zone) {
            Some(&i) => i,
            None => self.create_leaf(zone)?,
        };
        let n = ((at - zone) / SEGSIZE) as usize;
        let within = at - zone - n as u64 * SEGSIZE;
        for b in blocks_of(off) {
            // Someone else owns it now: never give it back.
            self.fresh.remove(&b);
            self.claimed.remove(&b);
        }
        if let Some(recent) = self.bulkfree_recent.as_mut() {
            recent.mark(BlockrefType::Data, off);
        }
        let (taken, changed) = {
            let leaf = self.tree.nodes[idx].leaf.as_deref().expect("leaf");
            let mut probe = leaf.bmaps[n];
            let r = bmap::mark_range(&mut probe, within, bytes, class);
            if r.1 {
                self.with_bmap(idx, n, |b| *b = probe);
            }
            r
        };
        if changed {
            let br = &mut self.tree.nodes[idx].bref;
            let avail = br.freemap_avail();
            br.set_freemap_hints(u32::MAX, avail);
            self.relaxed = false;
            self.allocator_free = self.allocator_free.saturating_sub(taken);
        }
        Ok((taken, changed))
    }

    // ---- flush ------------------------------------------------------

    /// Write every changed freemap block copy-on-write to its next
    /// rotation slot and return the new `freemap_blockset`. The caller
    /// issues a barrier and writes the volume header with it,
    /// `freemap_tid = mirror_tid` and `allocator_free()`, before the next
    /// flush (see `apply_to_header`). Writes land only in the freemap
    /// slots of reserved segments. A failed write poisons the allocator.
    pub fn flush(
        &mut self,
        dev: &dyn BlockDevice,
        mirror_tid: u64,
    ) -> Result<[Blockref; SET_COUNT]> {
        self.check_poisoned()?;
        let dirty = self.tree.is_dirty();
        if mirror_tid < self.freemap_tid || (dirty && mirror_tid == self.freemap_tid) {
            return Err(Error::InvalidArgument {
                what: format!(
                    "freemap flush at tid {mirror_tid:#x}, not after {:#x}",
                    self.freemap_tid
                ),
            });
        }
        let plan = self.tree.plan_flush(mirror_tid)?;
        let limit = self.total_size.min(dev.size_bytes());
        for (idx, bref, block) in &plan {
            let at = bref.data_off.offset();
            let slot = (at & (LEAF_BYTES - 1)) / PBUFSIZE;
            let old = self.tree.nodes[*idx].bref.data_off;
            assert!(
                (ZONE_FREEMAP_00..ZONE_FREEMAP_END).contains(&slot) && at % PBUFSIZE == 0,
                "freemap block planned outside the rotation slots: {at:#x}"
            );
            assert_ne!(old.offset(), at, "freemap block rewritten in place");
            assert_eq!(block.len(), FREEMAP_LEVELN_PSIZE);
            if at + FREEMAP_LEVELN_PSIZE as u64 > limit {
                return Err(Error::corrupt(
                    "freemap block would lie past the volume end".into(),
                    at,
                ));
            }
            if let Err(source) = dev.write_at(block, at) {
                self.poisoned = true;
                log::error!("freemap write at {at:#x} failed: {source}; allocator poisoned");
                return Err(Error::Io {
                    op: "write",
                    at,
                    source,
                });
            }
        }
        self.tree.commit(&plan, mirror_tid);
        self.freemap_tid = mirror_tid;
        self.unflushed.clear();
        self.fresh.clear();
        self.shares.clear();
        self.bulkfree_flushed = self.bulkfree_applied;
        log::info!(
            "freemap flush at tid {mirror_tid:#x}: {} blocks written",
            plan.len()
        );
        Ok(self.tree.blockset())
    }

    /// Put the freemap's state into a volume header about to be written:
    /// `freemap_blockset`, `freemap_tid` and `allocator_free`.
    pub fn apply_to_header(&self, vh: &mut VolumeHeader) {
        vh.freemap_blockset = self.tree.blockset();
        vh.freemap_tid = self.freemap_tid;
        vh.allocator_free = self.allocator_free;
    }

    // ---- queries ----------------------------------------------------

    fn free_chunks_total(&self) -> u64 {
        self.free_chunks + self.virtual_chunks
    }

    /// Bytes in wholly free 64 KiB chunks (zones without a leaf counted
    /// as new): what 64 KiB blocks can still be placed in.
    pub fn free_chunk_bytes(&self) -> u64 {
        self.free_chunks_total() * PBUFSIZE
    }

    /// Bytes in free 16 KiB blocks (zones without a leaf counted as new).
    pub fn free_bytes(&self) -> u64 {
        (self.free_blocks + self.virtual_blocks) * FREEMAP_BLOCK_SIZE
    }

    /// The header's `allocator_free`, kept as DragonFly keeps it.
    pub fn allocator_free(&self) -> u64 {
        self.allocator_free
    }

    pub fn reserve_bytes(&self) -> u64 {
        self.reserve_chunks * PBUFSIZE
    }

    /// Change the flush reserve (rounded down to 64 KiB chunks).
    pub fn set_reserve_bytes(&mut self, bytes: u64) {
        self.reserve_chunks = bytes / PBUFSIZE;
    }

    pub fn freemap_tid(&self) -> u64 {
        self.freemap_tid
    }

    /// True when a flush has something to write (a merged bulkfree pass
    /// counts: its `bulkfree_tid` goes into the next header).
    pub fn is_dirty(&self) -> bool {
        self.tree.is_dirty()
            || self.bulkfree_applied > self.bulkfree_flushed
            || !self.pending_frees.is_empty()
    }

    pub fn stats(&self) -> AllocStats {
        AllocStats {
            total_bytes: self.total_size,
            free_bytes: self.free_bytes(),
            free_chunk_bytes: self.free_chunks_total() * PBUFSIZE,
            allocator_free: self.allocator_free,
            reserve_bytes: self.reserve_bytes(),
            leaves: self.tree.by_zone.len(),
            nodes: self.tree.nodes.len() - 1 - self.tree.by_zone.len(),
            unflushed: self.unflushed.len(),
            unflushed_bytes: self.unflushed.values().map(|d| d.bytes()).sum(),
            freemap_tid: self.freemap_tid,
        }
    }

    // ---- live dedup (see dedup.rs) -------------------------------------

    /// Share a recent block whose bytes have the fingerprint `fp`: only
    /// one of `fp`'s size, every 16 KiB block under it allocated (never a
    /// block bulkfree freed or staged), and for which `same` (the
    /// caller's byte comparison) holds. Counts the share (an unflushed
    /// block keeps it until released as often as it was shared) and,
    /// while a bulkfree pass runs, records it as allocated for the
    /// merge. Returns the block and whether it is durable.
    pub fn dedup_share(
        &mut self,
        fp: &DedupKey,
        same: &mut dyn FnMut(DataOff) -> bool,
    ) -> Option<(DataOff, bool)> {
        if self.poisoned {
            return None;
        }
        if self.dedup_shared.len() >= DEDUP_SHARED_MAX {
            return None;
        }
        let off = self.dedup.lookup(fp)?;
        let valid = off.bytes() == u64::from(fp.bytes)
            && blocks_of(off).all(|b| self.block_state(b) == Some(BMAP_ALLOCATED))
            && same(off);
        if !valid {
            self.dedup.forget(off.offset());
            return None;
        }
        let durable = match self.unflushed.get(&off.offset()) {
            Some(&d) if d == off => {
                *self.shares.entry(off.offset()).or_insert(0) += 1;
                false
            }
            _ => true,
        };
        if let Some(recent) = self.bulkfree_recent.as_mut() {
            recent.mark(BlockrefType::Data, off);
        }
        self.dedup_shared.insert(off.offset());
        Some((off, durable))
    }

    /// Remember the data block `off`, just written, under `fp`.
    pub fn dedup_record(&mut self, fp: DedupKey, off: DataOff) {
        if !self.poisoned {
            self.dedup.record(fp, off);
        }
    }

    /// Fingerprints held by the dedup table.
    pub fn dedup_entries(&self) -> usize {
        self.dedup.len()
    }

    /// The 2-bit state of the 16 KiB block holding `offset`, or `None`
    /// when its zone has no leaf yet.
    pub fn block_state(&self, offset: u64) -> Option<u8> {
        let zone = zone_of(offset);
        let leaf = self.tree.leaf(zone)?;
        let within = offset - zone;
        let b = leaf.bmaps.get((within / SEGSIZE) as usize)?;
        Some(b.block_state(((within % SEGSIZE) / FREEMAP_BLOCK_SIZE) as usize))
    }

    /// Every leaf as the read side (`freemap::leaves`) shows them; a leaf
    /// never flushed has a `data_off` without an offset.
    pub fn leaves(&self) -> BTreeMap<u64, FreemapLeaf> {
        self.tree
            .by_zone
            .iter()
            .map(|(&z, &i)| {
                let n = &self.tree.nodes[i];
                let bmaps = n.leaf.as_deref().expect("leaf").bmaps.clone();
                (
                    z,
                    FreemapLeaf {
                        bref: n.bref,
                        bmaps,
                    },
                )
            })
            .collect()
    }
}

impl fmt::Debug for Allocator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Allocator({})", self.stats())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn radix_rounds_like_dragonfly() {
        assert_eq!(alloc_radix(1).unwrap(), 10);
        assert_eq!(alloc_radix(1024).unwrap(), 10);
        assert_eq!(alloc_radix(1025).unwrap(), 11);
        assert_eq!(alloc_radix(65536).unwrap(), 16);
        assert!(alloc_radix(0).is_err());
        assert!(alloc_radix(65537).is_err());
    }
}
