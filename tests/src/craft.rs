//! Crafted damage for tests: change one thing in an image (a blockref's
//! fields, an inode, the bytes of any block, the volume header), then
//! recompute the check code of every blockref that points at a changed
//! block, and so on up to the volume header, whose CRCs are recomputed
//! too. The damage then passes every check code and reaches the logic
//! behind them, as a buggy writer or a hostile image would deliver it.
//!
//! Blocks are found by walking the image from the volume header in use
//! (the super-root tree and the freemap tree), reading raw bytes with
//! nothing verified; each walk remembers, for every block, the blockref
//! slots that point at it, so a change climbs every path to the header
//! (snapshots share blocks: all of their paths are resealed).
//!
//! Usable on any `BlockDevice` (a `MemDevice` from `new_fs`, or an image
//! file opened with `Craft::open_file`); every edit goes straight to the
//! device, so a `Mount` or `Volume` opened before an edit must be opened
//! again to see it.

use bufcache::{BlockDevice, FileDevice};
use hammer2::check::set_check;
use hammer2::dirhash::dirhash;
use hammer2::disk::{
    check_method, Blockref, BlockrefType, DataOff, InodeData, VolumeHeader, BLOCKREF_BYTES,
    DIRHASH_HIMASK, INODE_BYTES, SET_COUNT,
};
use hammer2::volume::{header_slots, read_header_slot, HeaderSlot};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

/// Where an inode keeps its blockset (the union after meta and name).
const INODE_SET_OFF: usize = 0x200;
/// Deeper than any tree a test builds; a walk stops here.
const DEPTH_MAX: usize = 40;

/// What holds a blockref.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Holder {
    /// The volume header's super-root blockset.
    SrootSet,
    /// The volume header's freemap blockset.
    FreemapSet,
    /// The blockset of the inode block at this place.
    Inode(DataOff),
    /// The blockref array of an indirect block or freemap node.
    Node(DataOff),
}

impl Holder {
    /// The block holding the array, if not the header.
    fn block(self) -> Option<DataOff> {
        match self {
            Holder::Inode(d) | Holder::Node(d) => Some(d),
            Holder::SrootSet | Holder::FreemapSet => None,
        }
    }
}

/// One blockref: entry `index` of `holder`'s array.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Slot {
    pub holder: Holder,
    pub index: usize,
}

/// An image being damaged on purpose.
pub struct Craft {
    dev: Arc<dyn BlockDevice>,
}

impl Craft {
    pub fn new(dev: Arc<dyn BlockDevice>) -> Craft {
        Craft { dev }
    }

    /// An image file, opened for writing.
    pub fn open_file(path: &Path) -> Craft {
        let dev = FileDevice::open(path, true)
            .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()));
        Craft::new(Arc::new(dev))
    }

    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    // ---- raw I/O ----

    fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.dev
            .read_at(&mut buf, at)
            .unwrap_or_else(|e| panic!("read {len} bytes at {at:#x}: {e}"));
        buf
    }

    fn write(&self, at: u64, bytes: &[u8]) {
        self.dev
            .write_at(bytes, at)
            .unwrap_or_else(|e| panic!("write {} bytes at {at:#x}: {e}", bytes.len()));
    }

    /// The bytes a blockref points at (empty for radix 0).
    pub fn block_bytes(&self, d: DataOff) -> Vec<u8> {
        self.read(d.offset(), d.bytes() as usize)
    }

    // ---- the volume header ----

    /// The header copy in use: good CRCs, highest mirror_tid (as
    /// `Volume::open` chooses).
    fn header_slot(&self) -> (usize, VolumeHeader) {
        let n = header_slots(self.dev.size_bytes());
        (0..n)
            .filter_map(|i| match read_header_slot(self.dev.as_ref(), i) {
                HeaderSlot::Good(vh) => Some((i, *vh)),
                _ => None,
            })
            .max_by_key(|(_, vh)| vh.mirror_tid)
            .expect("the image has no valid volume header")
    }

    pub fn header(&self) -> VolumeHeader {
        self.header_slot().1
    }

    /// Change the header in use; its CRCs are recomputed.
    pub fn edit_header(&self, f: impl FnOnce(&mut VolumeHeader)) {
        let (i, mut vh) = self.header_slot();
        f(&mut vh);
        self.write(hammer2::disk::volhdr_offset(i), &vh.encode());
    }

    // ---- blockref slots ----

    /// Where `holder`'s array starts and how many entries it has.
    fn array(&self, holder: Holder) -> (u64, usize) {
        match holder {
            Holder::Inode(d) => (d.offset() + INODE_SET_OFF as u64, SET_COUNT),
            Holder::Node(d) => (d.offset(), d.bytes() as usize / BLOCKREF_BYTES),
            Holder::SrootSet | Holder::FreemapSet => unreachable!("header sets are not blocks"),
        }
    }

    /// The blockref in `slot`.
    pub fn bref(&self, slot: Slot) -> Blockref {
        match slot.holder {
            Holder::SrootSet => self.header().sroot_blockset[slot.index],
            Holder::FreemapSet => self.header().freemap_blockset[slot.index],
            h => {
                let (base, n) = self.array(h);
                assert!(slot.index < n, "{slot:?} is past its array");
                let raw = self.read(base + (slot.index * BLOCKREF_BYTES) as u64, BLOCKREF_BYTES);
                Blockref::decode(raw.as_slice().try_into().expect("128 bytes"))
            }
        }
    }

    /// Store `br` in `slot` as it is (no check code changes anywhere).
    fn put(&self, slot: Slot, br: Blockref) {
        match slot.holder {
            Holder::SrootSet => self.edit_header(|vh| vh.sroot_blockset[slot.index] = br),
            Holder::FreemapSet => self.edit_header(|vh| vh.freemap_blockset[slot.index] = br),
            h => {
                let (base, _) = self.array(h);
                self.write(base + (slot.index * BLOCKREF_BYTES) as u64, &br.encode());
            }
        }
    }

    /// The live blockrefs of `holder`'s array.
    pub fn children(&self, holder: Holder) -> Vec<(Slot, Blockref)> {
        let set: Vec<Blockref> = match holder {
            Holder::SrootSet => self.header().sroot_blockset.to_vec(),
            Holder::FreemapSet => self.header().freemap_blockset.to_vec(),
            h => {
                let (base, n) = self.array(h);
                let raw = self.read(base, n * BLOCKREF_BYTES);
                (0..n)
                    .filter_map(|i| Blockref::decode_at(&raw, i))
                    .collect()
            }
        };
        set.into_iter()
            .enumerate()
            .filter(|(_, b)| !b.is_empty())
            .map(|(index, b)| (Slot { holder, index }, b))
            .collect()
    }

    /// Every live blockref in `holder`'s array and, through indirect
    /// blocks and freemap nodes, below it (not into other inodes).
    pub fn tree(&self, holder: Holder) -> Vec<(Slot, Blockref)> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut stack = vec![(holder, 0usize)];
        while let Some((h, depth)) = stack.pop() {
            for (slot, br) in self.children(h) {
                out.push((slot, br));
                let node = matches!(br.btype, BlockrefType::Indirect | BlockrefType::FreemapNode);
                if node && depth < DEPTH_MAX && seen.insert(br.data_off.offset()) {
                    stack.push((Holder::Node(br.data_off), depth + 1));
                }
            }
        }
        out
    }

    /// The inode block `slot` points at.
    pub fn inode_data(&self, slot: Slot) -> InodeData {
        let br = self.bref(slot);
        InodeData::decode(&self.read(br.data_off.offset(), INODE_BYTES), 0).expect("inode decodes")
    }

    /// The slot of PFS `label`'s root inode in the super-root.
    pub fn pfs_root(&self, label: &str) -> Slot {
        let sroot = self.header().sroot_blockset[0];
        self.tree(Holder::Inode(sroot.data_off))
            .into_iter()
            .filter(|(_, b)| b.btype == BlockrefType::Inode)
            .find(|(s, _)| self.inode_data(*s).name() == label.as_bytes())
            .unwrap_or_else(|| panic!("no PFS {label}"))
            .0
    }

    /// The slot of inode `inum` of PFS `label` (1: the PFS root).
    pub fn inode(&self, label: &str, inum: u64) -> Slot {
        let root = self.pfs_root(label);
        if inum == 1 {
            return root;
        }
        self.tree(Holder::Inode(self.bref(root).data_off))
            .into_iter()
            .find(|(_, b)| b.btype == BlockrefType::Inode && b.key == inum)
            .unwrap_or_else(|| panic!("no inode {inum} in PFS {label}"))
            .0
    }

    /// The holder of inode `inum`'s blockset.
    pub fn inode_holder(&self, label: &str, inum: u64) -> Holder {
        Holder::Inode(self.bref(self.inode(label, inum)).data_off)
    }

    /// The slot of the entry `name` in directory `dir` of PFS `label`.
    pub fn dirent(&self, label: &str, dir: u64, name: &[u8]) -> Slot {
        let hash = dirhash(name) & DIRHASH_HIMASK;
        self.tree(self.inode_holder(label, dir))
            .into_iter()
            .filter(|(_, b)| b.btype == BlockrefType::Dirent && b.key & DIRHASH_HIMASK == hash)
            .find(|(_, b)| {
                let n = b.dirent().namlen as usize;
                let stored = if n <= 64 {
                    b.check[..n].to_vec()
                } else {
                    self.block_bytes(b.data_off)[..n].to_vec()
                };
                stored == name
            })
            .unwrap_or_else(|| {
                panic!(
                    "no entry {:?} in directory {dir}",
                    String::from_utf8_lossy(name)
                )
            })
            .0
    }

    /// The leaves (data blocks, dirents) under inode `inum`, in key order.
    pub fn leaves(&self, label: &str, inum: u64) -> Vec<Slot> {
        let mut v: Vec<(Slot, Blockref)> = self
            .tree(self.inode_holder(label, inum))
            .into_iter()
            .filter(|(_, b)| b.btype != BlockrefType::Indirect)
            .collect();
        v.sort_by_key(|(_, b)| b.key);
        v.into_iter().map(|(s, _)| s).collect()
    }

    /// The indirect blocks under inode `inum`, outermost first.
    pub fn indirects(&self, label: &str, inum: u64) -> Vec<Slot> {
        self.tree(self.inode_holder(label, inum))
            .into_iter()
            .filter(|(_, b)| b.btype == BlockrefType::Indirect)
            .map(|(s, _)| s)
            .collect()
    }

    // ---- the reference graph ----

    /// For every block reachable from the header, the slots pointing at
    /// it (by image offset).
    fn referrers(&self) -> HashMap<u64, Vec<Slot>> {
        let mut map: HashMap<u64, Vec<Slot>> = HashMap::new();
        let mut seen = HashSet::new();
        let mut stack = vec![(Holder::SrootSet, 0usize), (Holder::FreemapSet, 0)];
        while let Some((h, depth)) = stack.pop() {
            for (slot, br) in self.children(h) {
                if br.data_off.is_empty() {
                    continue;
                }
                let off = br.data_off.offset();
                map.entry(off).or_default().push(slot);
                if depth >= DEPTH_MAX || !seen.insert(off) {
                    continue;
                }
                match br.btype {
                    BlockrefType::Inode if br.data_off.bytes() >= INODE_BYTES as u64 => {
                        let ino = InodeData::decode(&self.read(off, INODE_BYTES), off);
                        if ino.is_ok_and(|i| !i.meta.has_direct_data()) {
                            stack.push((Holder::Inode(br.data_off), depth + 1));
                        }
                    }
                    BlockrefType::Indirect | BlockrefType::FreemapNode => {
                        stack.push((Holder::Node(br.data_off), depth + 1))
                    }
                    _ => {}
                }
            }
        }
        map
    }

    /// The bytes at `off` changed: recompute the check code in every
    /// slot pointing there, and climb.
    fn reseal(&self, off: u64, map: &HashMap<u64, Vec<Slot>>, depth: usize) {
        assert!(depth <= DEPTH_MAX, "blocks point at each other in a loop");
        for &slot in map.get(&off).into_iter().flatten() {
            let mut br = self.bref(slot);
            if br.data_off.offset() != off {
                continue;
            }
            let bytes = self.block_bytes(br.data_off);
            set_check(&mut br, &bytes);
            self.put(slot, br);
            if let Some(d) = slot.holder.block() {
                self.reseal(d.offset(), map, depth + 1);
            }
        }
    }

    /// `slot`'s holder changed: reseal upwards from it.
    fn holder_changed(&self, holder: Holder, map: &HashMap<u64, Vec<Slot>>) {
        if let Some(d) = holder.block() {
            self.reseal(d.offset(), map, 0);
        }
    }

    // ---- edits ----

    /// Change the fields of the blockref in `slot` (its own check code
    /// is left as the closure leaves it: it covers the block pointed at,
    /// which did not change), and reseal the path above it.
    pub fn edit_bref(&self, slot: Slot, f: impl FnOnce(&mut Blockref)) {
        let map = self.referrers();
        let mut br = self.bref(slot);
        f(&mut br);
        self.put(slot, br);
        self.holder_changed(slot.holder, &map);
    }

    /// Point the blockref in `slot` at `target` (another block of the
    /// image), with a check code that matches what is there.
    pub fn point_at(&self, slot: Slot, target: DataOff) {
        let bytes = self.block_bytes(target);
        self.edit_bref(slot, |br| {
            br.data_off = target;
            if br.check_method() == check_method::NONE {
                br.methods = hammer2::disk::enc_methods(check_method::XXHASH64, br.comp_method());
            }
            set_check(br, &bytes);
        });
    }

    /// Change the bytes of the block `slot` points at (its length stays
    /// the blockref's size), and reseal every path to it.
    pub fn edit_block(&self, slot: Slot, f: impl FnOnce(&mut Vec<u8>)) {
        let map = self.referrers();
        let d = self.bref(slot).data_off;
        let mut bytes = self.block_bytes(d);
        let len = bytes.len();
        f(&mut bytes);
        bytes.resize(len, 0);
        self.write(d.offset(), &bytes);
        self.reseal(d.offset(), &map, 0);
    }

    /// Change the inode `slot` points at.
    pub fn edit_inode(&self, slot: Slot, f: impl FnOnce(&mut InodeData)) {
        self.edit_block(slot, |bytes| {
            let mut ino = InodeData::decode(bytes, 0).expect("an inode block");
            f(&mut ino);
            bytes[..INODE_BYTES].copy_from_slice(&ino.encode());
        });
    }
}
