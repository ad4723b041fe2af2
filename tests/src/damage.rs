//! The damage campaign (issue 14): damage made at random blocks of
//! every kind, on DragonFly's reference images and on images written
//! through the library's `Mount` (as mount.hammer2 writes them), then
//! checked, repaired and checked again. Two ways to damage a block:
//! a raw bit flip (which its check code catches) and crafted damage
//! (`craft.rs`: a field changed and every check code resealed up to the
//! volume header, so only the logic behind the check codes can see it).
//!
//! For every case the oracle is:
//! - `fsck` reports it, without a single write to the device;
//! - `repair -y` writes and leaves an image `fsck` finds clean (a second
//!   `-n`), with no panic and in bounded time;
//! - every file the damage did not touch reads back identical, found by
//!   its PFS and inode number wherever it is now (`lost+found` too); a
//!   file is touched when the damaged block lies in its own tree, on the
//!   path from its PFS root to its inode, or is its PFS root or the
//!   super-root; after a rewind, the files compared are those of the
//!   state rewound to, read from the image before the damage;
//! - the repaired image opens read-write, takes a write to every PFS and
//!   a flush, and stays clean.
//!
//! Each case is counted per block kind: repaired in place, rewound,
//! file data lost (bytes that read differently or not at all, over every
//! file, touched ones included), and violations.

use crate::craft::{Craft, Holder, Slot};
use bufcache::{BlockDevice, MemDevice};
use hammer2::disk::{self, check_method, BlockrefType, DataOff, ObjType, BLOCKREF_BYTES};
use hammer2::fsck::{fsck, Options as FsckOptions};
use hammer2::mount::{Mount, ROOT_INUM};
use hammer2::pfs::{pfs_list, Pfs};
use hammer2::repair::{self, Mode, Outcome};
use hammer2::volume::{header_slots, read_header_slot, HeaderSlot};
use hammer2::Volume;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The kinds of block damaged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A volume header copy.
    Header,
    SuperRoot,
    PfsRoot,
    /// An indirect block of a PFS root's tree (the inode index, the
    /// root's entries).
    Index,
    /// A directory: its inode, its indirect blocks, long names.
    Dir,
    /// A file's or symlink's inode.
    Inode,
    /// A file's indirect block.
    Indirect,
    Data,
    FreemapNode,
    FreemapLeaf,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Header,
        Kind::SuperRoot,
        Kind::PfsRoot,
        Kind::Index,
        Kind::Dir,
        Kind::Inode,
        Kind::Indirect,
        Kind::Data,
        Kind::FreemapNode,
        Kind::FreemapLeaf,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Header => "volume header",
            Kind::SuperRoot => "super-root",
            Kind::PfsRoot => "PFS root",
            Kind::Index => "inode index",
            Kind::Dir => "directory",
            Kind::Inode => "inode",
            Kind::Indirect => "indirect",
            Kind::Data => "data",
            Kind::FreemapNode => "freemap node",
            Kind::FreemapLeaf => "freemap leaf",
        }
    }
}

/// One block that can be damaged: the blockref slot pointing at it (or
/// a volume header copy), and which files it belongs to.
#[derive(Clone, Debug)]
pub struct Target {
    pub kind: Kind,
    /// `None` for a volume header copy (`header`).
    pub slot: Option<Slot>,
    pub header: usize,
    pub data_off: DataOff,
    pub check: u8,
    pub btype: BlockrefType,
    /// The inode this block belongs to, and its type.
    pub owner: Option<(String, u64, ObjType)>,
}

/// A file as read: its PFS, inode number and bytes.
pub type Files = BTreeMap<(String, u64), Vec<u8>>;

/// An image ready for cases.
pub struct Base {
    pub name: String,
    pub dev: MemDevice,
    pub files: Files,
    /// The files of the state each header copy holds (for rewinds).
    pub states: BTreeMap<usize, Files>,
    /// Blocks (by image offset) and the files they belong to.
    pub owners: HashMap<u64, BTreeSet<(String, u64)>>,
    pub targets: BTreeMap<Kind, Vec<Target>>,
}

/// Every regular file and symlink reachable in every PFS of `vol`, by
/// PFS and inode number.
pub fn read_files(vol: Arc<Volume>) -> Files {
    let mut out = Files::new();
    let Ok(list) = pfs_list(&vol) else {
        return out;
    };
    for info in list {
        let Ok(p) = Pfs::open(vol.clone(), &info.label) else {
            continue;
        };
        let mut stack = vec![p.root.clone()];
        let mut seen = BTreeSet::new();
        while let Some(dir) = stack.pop() {
            if !seen.insert(dir.inum()) {
                continue;
            }
            let Ok(entries) = p.readdir(&dir) else {
                continue;
            };
            for e in entries {
                let Ok(ino) = p.inode(e.inum) else { continue };
                match ino.obj_type() {
                    ObjType::Directory => stack.push(ino),
                    ObjType::Regfile => {
                        if let Ok(d) = p.read_all(&ino) {
                            out.insert((info.label.clone(), e.inum), d);
                        }
                    }
                    ObjType::Softlink => {
                        if let Ok(d) = p.readlink(&ino) {
                            out.insert((info.label.clone(), e.inum), d);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

fn volume(dev: &MemDevice) -> Option<Arc<Volume>> {
    let d: Arc<dyn BlockDevice> = Arc::new(dev.snapshot());
    Volume::open(d).ok().map(Arc::new)
}

/// A fixture image (`../shared/fixtures/hammer2/NAME.img.zst`) restored
/// into memory.
pub fn fixture_mem(name: &str) -> MemDevice {
    let path = crate::fixture_dir().join(format!("{name}.img.zst"));
    let mut dec = zstd::stream::read::Decoder::new(std::fs::File::open(&path).expect("fixture"))
        .expect("zstd stream");
    let mut chunks = Vec::new();
    let mut buf = vec![0u8; 65536];
    let mut off = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = dec.read(&mut buf[filled..]).expect("decompress fixture");
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        if buf[..filled].iter().any(|&b| b != 0) {
            chunks.push((off, buf[..filled].to_vec()));
        }
        off += filled as u64;
    }
    let dev = MemDevice::new(off);
    for (at, c) in chunks {
        dev.write_at(&c, at).expect("write fixture chunk");
    }
    dev
}

/// An image written through the library as mount.hammer2 writes one,
/// over several flushes (so the older header copies hold older trees):
/// two PFSs and a snapshot, a directory of 60 entries (indirect blocks),
/// long names, files in the inode, in blocksets and under indirect
/// blocks, a sparse file, hard links and symlinks; then changes after
/// the snapshot. `bytes` at least 6 GiB + 4 MiB gives four header copies.
pub fn own_image(seed: u64, bytes: u64) -> MemDevice {
    use crate::{create_file, new_fs_bytes, T0};
    let dev = new_fs_bytes(seed, bytes);
    let d: Arc<dyn BlockDevice> = dev.clone();
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut random = |n: usize| {
        let mut v = vec![0u8; n];
        rng.fill_bytes(&mut v);
        v
    };
    if bytes >= 5 << 30 {
        // A block in each of the first five zones (allocated, referenced
        // by nothing: not damage), so the freemap has more leaves than
        // its root holds and grows a node.
        let vol = Volume::open(d.clone()).unwrap();
        let mut a = hammer2::alloc::Allocator::load(&vol).unwrap();
        for z in 1..5u64 {
            a.mark_allocated(DataOff::new((z << 30) + (8 << 20), 16))
                .unwrap();
        }
        let mut m = Mount::open_with(d.clone(), Box::new(a)).unwrap();
        m.flush().unwrap();
        m.reclaim().unwrap();
    }
    let mut m = Mount::open(d.clone()).expect("open new image");
    let l = "DATA";
    let big = m.mkdir(l, ROOT_INUM, b"big", 0o755, 0, 0, T0).unwrap();
    for i in 0..60u32 {
        let name = format!("entry-{i:03}-{}", "x".repeat((i % 5) as usize * 30));
        let f = create_file(&mut m, l, big, name.as_bytes()).unwrap();
        let data = random(100 + (i as usize * 997) % 3000);
        m.write(l, f, 0, &data, T0).unwrap();
    }
    m.flush().unwrap();
    let docs = m.mkdir(l, ROOT_INUM, b"docs", 0o755, 0, 0, T0).unwrap();
    for (i, size) in [0usize, 300, 5000, 70_000, 200_000, 400_000, 2 << 20]
        .iter()
        .enumerate()
    {
        let f = create_file(&mut m, l, docs, format!("f{i}").as_bytes()).unwrap();
        let data = random(*size);
        m.write(l, f, 0, &data, T0).unwrap();
    }
    let sparse = create_file(&mut m, l, ROOT_INUM, b"sparse").unwrap();
    let data = random(70_000);
    m.write(l, sparse, 5 << 20, &data, T0).unwrap();
    let long = vec![b'L'; 200];
    let lf = create_file(&mut m, l, ROOT_INUM, &long).unwrap();
    m.write(l, lf, 0, b"a file with a long name", T0).unwrap();
    m.link(l, lf, docs, b"hardlink", T0).unwrap();
    m.symlink(l, ROOT_INUM, b"ln", b"docs/f1", 0, 0, T0)
        .unwrap();
    m.symlink(l, docs, b"longln", &[b'p'; 700], 0, 0, T0)
        .unwrap();
    let mut deep = ROOT_INUM;
    for i in 0..6 {
        deep = m
            .mkdir(l, deep, format!("level{i}").as_bytes(), 0o755, 0, 0, T0)
            .unwrap();
    }
    let f = create_file(&mut m, l, deep, b"bottom").unwrap();
    m.write(l, f, 0, &random(9000), T0).unwrap();
    m.flush().unwrap();
    let ll = "LOCAL";
    let lfile = create_file(&mut m, ll, ROOT_INUM, b"local-file").unwrap();
    m.write(ll, lfile, 0, &random(150_000), T0).unwrap();
    m.flush().unwrap();
    m.snapshot(l, "SNAP", T0).unwrap();
    m.flush().unwrap();
    m.reclaim().unwrap();
    // Changes after the snapshot: overwrites, new files, a removal and
    // a rename, each flushed, so the header copies hold four states.
    let f0 = m.lookup(l, docs, b"f4").unwrap().unwrap();
    m.write(l, f0, 65536, &random(4096), T0).unwrap();
    m.flush().unwrap();
    let n = create_file(&mut m, l, big, b"after-snapshot").unwrap();
    m.write(l, n, 0, &random(30_000), T0).unwrap();
    m.unlink(
        l,
        big,
        b"entry-007-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        T0,
    )
    .ok();
    m.flush().unwrap();
    m.rename(
        l,
        docs,
        b"f2",
        ROOT_INUM,
        b"f2-moved",
        hammer2::mount::RenameFlags::default(),
        T0,
    )
    .unwrap();
    let f6 = m.lookup(l, docs, b"f6").unwrap().unwrap();
    m.write(l, f6, 1 << 20, &random(100_000), T0).unwrap();
    m.flush().unwrap();
    drop(m);
    dev.snapshot()
}

impl Base {
    /// Everything a campaign needs of `dev` (clean, as fsck must find it).
    pub fn new(name: &str, dev: MemDevice) -> Base {
        let d: Arc<dyn BlockDevice> = Arc::new(dev.snapshot());
        let r = fsck(d, FsckOptions::default()).expect("fsck the base image");
        assert!(
            r.is_clean(),
            "base image {name} is not clean: {:?}",
            r.problems
        );
        let vol = volume(&dev).expect("open base image");
        let files = read_files(vol);
        let mut states = BTreeMap::new();
        let dyn_dev: Arc<dyn BlockDevice> = Arc::new(dev.snapshot());
        for i in 0..header_slots(dev.size_bytes()) {
            if let HeaderSlot::Good(vh) = read_header_slot(dyn_dev.as_ref(), i) {
                let v = Volume::at_header(dyn_dev.clone(), *vh, i);
                states.insert(i, read_files(Arc::new(v)));
            }
        }
        let mut b = Base {
            name: name.to_string(),
            dev,
            files,
            states,
            owners: HashMap::new(),
            targets: BTreeMap::new(),
        };
        b.catalogue();
        b
    }

    /// Walk the image (every PFS, every inode) recording the targets of
    /// each kind and which files every block belongs to.
    fn catalogue(&mut self) {
        let c = Craft::new(Arc::new(self.dev.snapshot()));
        let vh = c.header();
        let mut targets: BTreeMap<Kind, Vec<Target>> = BTreeMap::new();
        let mut add = |t: Target| targets.entry(t.kind).or_default().push(t);
        let nheaders = header_slots(self.dev.size_bytes());
        for i in 0..nheaders {
            add(Target {
                kind: Kind::Header,
                slot: None,
                header: i,
                data_off: DataOff::new(disk::volhdr_offset(i), 16),
                check: check_method::ISCSI32,
                btype: BlockrefType::Volume,
                owner: None,
            });
        }
        let sroot = vh.sroot_blockset[0];
        let sroot_slot = Slot {
            holder: Holder::SrootSet,
            index: 0,
        };
        add(Target {
            kind: Kind::SuperRoot,
            slot: Some(sroot_slot),
            header: 0,
            data_off: sroot.data_off,
            check: sroot.check_method(),
            btype: sroot.btype,
            owner: None,
        });
        let mut owners: HashMap<u64, BTreeSet<(String, u64)>> = HashMap::new();
        let mut all_files: BTreeSet<(String, u64)> = BTreeSet::new();
        for (slot, br) in c.tree(Holder::Inode(sroot.data_off)) {
            if br.btype != BlockrefType::Inode {
                continue;
            }
            let root = c.inode_data(slot);
            let label = String::from_utf8_lossy(root.name()).into_owned();
            add(Target {
                kind: Kind::PfsRoot,
                slot: Some(slot),
                header: 0,
                data_off: br.data_off,
                check: br.check_method(),
                btype: br.btype,
                owner: Some((label.clone(), ROOT_INUM, ObjType::Directory)),
            });
            let mut pfs_files = BTreeSet::new();
            // The PFS root's tree, with each inode's path of index blocks.
            let mut stack: Vec<(Holder, Vec<u64>)> = vec![(Holder::Inode(br.data_off), vec![])];
            while let Some((h, path)) = stack.pop() {
                for (s, b) in c.children(h) {
                    match b.btype {
                        BlockrefType::Indirect => {
                            add(Target {
                                kind: Kind::Index,
                                slot: Some(s),
                                header: 0,
                                data_off: b.data_off,
                                check: b.check_method(),
                                btype: b.btype,
                                owner: None,
                            });
                            let mut p = path.clone();
                            p.push(b.data_off.offset());
                            stack.push((Holder::Node(b.data_off), p));
                        }
                        BlockrefType::Dirent if !b.data_off.is_empty() => add(Target {
                            kind: Kind::Dir,
                            slot: Some(s),
                            header: 0,
                            data_off: b.data_off,
                            check: b.check_method(),
                            btype: b.btype,
                            owner: Some((label.clone(), ROOT_INUM, ObjType::Directory)),
                        }),
                        BlockrefType::Inode => {
                            let ino = c.inode_data(s);
                            let inum = b.key;
                            let t = ino.meta.obj_type;
                            let is_file = matches!(t, ObjType::Regfile | ObjType::Softlink);
                            let key = (label.clone(), inum);
                            if is_file {
                                pfs_files.insert(key.clone());
                                for off in &path {
                                    owners.entry(*off).or_default().insert(key.clone());
                                }
                                owners
                                    .entry(b.data_off.offset())
                                    .or_default()
                                    .insert(key.clone());
                            }
                            add(Target {
                                kind: if t == ObjType::Directory {
                                    Kind::Dir
                                } else {
                                    Kind::Inode
                                },
                                slot: Some(s),
                                header: 0,
                                data_off: b.data_off,
                                check: b.check_method(),
                                btype: b.btype,
                                owner: Some((label.clone(), inum, t)),
                            });
                            if ino.meta.has_direct_data() {
                                continue;
                            }
                            for (ss, bb) in c.tree(Holder::Inode(b.data_off)) {
                                if is_file {
                                    owners
                                        .entry(bb.data_off.offset())
                                        .or_default()
                                        .insert(key.clone());
                                }
                                let kind = match (bb.btype, is_file) {
                                    (BlockrefType::Indirect, true) => Kind::Indirect,
                                    (BlockrefType::Indirect, false) => Kind::Dir,
                                    (BlockrefType::Data, _) => Kind::Data,
                                    (BlockrefType::Dirent, _) if !bb.data_off.is_empty() => {
                                        Kind::Dir
                                    }
                                    _ => continue,
                                };
                                add(Target {
                                    kind,
                                    slot: Some(ss),
                                    header: 0,
                                    data_off: bb.data_off,
                                    check: bb.check_method(),
                                    btype: bb.btype,
                                    owner: Some((label.clone(), inum, t)),
                                });
                            }
                        }
                        _ => {}
                    }
                }
            }
            // The PFS root's block: everything in the PFS.
            for f in &pfs_files {
                owners
                    .entry(br.data_off.offset())
                    .or_default()
                    .insert(f.clone());
            }
            all_files.extend(pfs_files);
        }
        owners
            .entry(sroot.data_off.offset())
            .or_default()
            .extend(all_files);
        for (s, b) in c.tree(Holder::FreemapSet) {
            let kind = match b.btype {
                BlockrefType::FreemapNode => Kind::FreemapNode,
                BlockrefType::FreemapLeaf => Kind::FreemapLeaf,
                _ => continue,
            };
            add(Target {
                kind,
                slot: Some(s),
                header: 0,
                data_off: b.data_off,
                check: b.check_method(),
                btype: b.btype,
                owner: None,
            });
        }
        // One target per block (a block shared by snapshots is listed
        // once per slot otherwise).
        for v in targets.values_mut() {
            let mut seen = BTreeSet::new();
            v.retain(|t| t.kind == Kind::Header || seen.insert(t.data_off.0));
        }
        self.targets = targets;
        self.owners = owners;
    }

    /// The files a damaged block belongs to.
    pub fn touched(&self, t: &Target) -> BTreeSet<(String, u64)> {
        self.owners
            .get(&t.data_off.offset())
            .cloned()
            .unwrap_or_default()
    }
}

/// How a case damages its block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum How {
    /// One bit flipped at this byte of the block.
    Flip { byte: u64, bit: u8 },
    /// The whole block overwritten with junk from this seed (its check
    /// code fails and nothing in it reads as sound).
    Junk(u64),
    /// A crafted change, check codes resealed.
    Craft(&'static str),
}

impl fmt::Display for How {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            How::Flip { byte, bit } => write!(f, "bit {bit} of byte {byte:#x} flipped"),
            How::Junk(seed) => write!(f, "overwritten with junk (seed {seed})"),
            How::Craft(what) => write!(f, "crafted: {what}"),
        }
    }
}

/// The crafted changes a kind of block can take (each one fsck sees).
fn crafts(t: &Target) -> &'static [&'static str] {
    match t.kind {
        Kind::Header => &[
            "fstype",
            "allocator_free",
            "sroot_blockset[1]",
            "boot/aux order",
        ],
        Kind::SuperRoot => &["pfs_type", "direct-data flag", "blockref type"],
        Kind::PfsRoot => &[
            "inum",
            "PFSROOT flag",
            "type",
            "key",
            "data_count",
            "inode counter",
        ],
        Kind::Index => &["data_count", "key order", "mirror_tid", "keybits"],
        Kind::Dir => match (t.btype, t.owner.as_ref().map(|o| o.1)) {
            (BlockrefType::Inode, _) => &["nlinks 0", "type", "data_count"],
            (BlockrefType::Dirent, _) => &["entry names nothing", "entry type", "entry key"],
            _ => &["data_count", "key order", "entry names the root"],
        },
        Kind::Inode => &[
            "nlinks",
            "size past the largest file",
            "type",
            "check_algo",
            "inum",
            "comp_algo",
        ],
        Kind::Indirect => &["data_count", "mirror_tid", "keybits"],
        Kind::Data => &["compression method", "keybits", "key"],
        Kind::FreemapNode => &["leaf keybits"],
        Kind::FreemapLeaf => &["bitmap", "linear"],
    }
}

/// Apply `how` to `t` on the device behind `c`. Returns false when this
/// target cannot take it (the caller picks another).
fn apply(c: &Craft, base: &Base, t: &Target, how: &How) -> bool {
    let dev = c.device();
    match how {
        How::Junk(seed) => {
            let bytes = if t.kind == Kind::Header {
                disk::VOLUME_BYTES as u64
            } else {
                t.data_off.bytes()
            };
            let mut junk = vec![0u8; bytes as usize];
            SmallRng::seed_from_u64(*seed).fill_bytes(&mut junk);
            dev.write_at(&junk, t.data_off.offset())
                .expect("write junk");
            true
        }
        How::Flip { byte, bit } => {
            let at = t.data_off.offset() + byte;
            let mut b = [0u8];
            dev.read_at(&mut b, at).expect("read byte");
            b[0] ^= 1 << bit;
            dev.write_at(&b, at).expect("write byte");
            true
        }
        How::Craft(what) => craft(c, base, t, what),
    }
}

fn craft(c: &Craft, base: &Base, t: &Target, what: &str) -> bool {
    let slot = t.slot;
    match (t.kind, what) {
        (Kind::Header, "fstype") => c.edit_header(|vh| vh.fstype = disk::Uuid([7; 16])),
        (Kind::Header, "allocator_free") => {
            c.edit_header(|vh| vh.allocator_free = vh.allocator_size + (1 << 20))
        }
        (Kind::Header, "sroot_blockset[1]") => {
            c.edit_header(|vh| vh.sroot_blockset[1] = vh.sroot_blockset[0])
        }
        (Kind::Header, "boot/aux order") => c.edit_header(|vh| {
            std::mem::swap(&mut vh.boot_beg, &mut vh.aux_end);
        }),
        (Kind::SuperRoot, "pfs_type") => {
            c.edit_inode(slot.unwrap(), |i| i.meta.pfs_type = disk::pfs_type::MASTER)
        }
        (Kind::SuperRoot, "direct-data flag") => c.edit_inode(slot.unwrap(), |i| {
            i.meta.op_flags |= disk::OPFLAG_DIRECTDATA
        }),
        (Kind::SuperRoot, "blockref type") => c.edit_header(|vh| {
            vh.sroot_blockset[0].btype = BlockrefType::Indirect;
        }),
        (Kind::PfsRoot, "inum") => c.edit_inode(slot.unwrap(), |i| i.meta.inum = 77),
        (Kind::PfsRoot, "PFSROOT flag") => {
            c.edit_inode(slot.unwrap(), |i| i.meta.op_flags &= !disk::OPFLAG_PFSROOT)
        }
        (Kind::PfsRoot, "type") => {
            c.edit_inode(slot.unwrap(), |i| i.meta.obj_type = ObjType::Regfile)
        }
        (Kind::PfsRoot, "key") => c.edit_bref(slot.unwrap(), |b| b.key ^= 1 << 40),
        (Kind::PfsRoot | Kind::Index | Kind::Indirect | Kind::Dir, "data_count") => {
            if t.btype == BlockrefType::Dirent {
                return false;
            }
            c.edit_bref(slot.unwrap(), |b| {
                let (d, i) = (b.data_count(), b.inode_count());
                b.set_stats(d + 1024, i);
            })
        }
        (Kind::PfsRoot, "inode counter") => {
            let max = base
                .files
                .keys()
                .filter(|(l, _)| Some(l) == t.owner.as_ref().map(|o| &o.0))
                .map(|(_, i)| *i)
                .max()
                .unwrap_or(0);
            if max <= disk::INODE_START {
                return false;
            }
            c.edit_inode(slot.unwrap(), |i| i.meta.pfs_inum = max - 1)
        }
        (Kind::Index | Kind::Dir, "key order") => {
            if t.btype != BlockrefType::Indirect {
                return false;
            }
            let kids = c.children(Holder::Node(t.data_off));
            if kids.len() < 2 {
                return false;
            }
            let (a, b) = (kids[0].0.index, kids[1].0.index);
            c.edit_block(slot.unwrap(), |bytes| {
                let x = bytes[a * BLOCKREF_BYTES..(a + 1) * BLOCKREF_BYTES].to_vec();
                let y = bytes[b * BLOCKREF_BYTES..(b + 1) * BLOCKREF_BYTES].to_vec();
                bytes[a * BLOCKREF_BYTES..(a + 1) * BLOCKREF_BYTES].copy_from_slice(&y);
                bytes[b * BLOCKREF_BYTES..(b + 1) * BLOCKREF_BYTES].copy_from_slice(&x);
            })
        }
        (Kind::Index | Kind::Indirect, "mirror_tid") => {
            c.edit_bref(slot.unwrap(), |b| b.mirror_tid += 1000)
        }
        (Kind::Index | Kind::Indirect, "keybits") => {
            // Half the range, when an entry then lies outside it.
            let br = c.bref(slot.unwrap());
            if br.keybits == 0 {
                return false;
            }
            let half_end = br.key + (1u64 << (br.keybits - 1)) - 1;
            let kids = c.children(Holder::Node(t.data_off));
            if !kids.iter().any(|(_, k)| k.key_end() > half_end) {
                return false;
            }
            c.edit_bref(slot.unwrap(), |b| b.keybits -= 1)
        }
        (Kind::Dir, "nlinks 0") => c.edit_inode(slot.unwrap(), |i| i.meta.nlinks = 0),
        (Kind::Dir, "type") => {
            c.edit_inode(slot.unwrap(), |i| i.meta.obj_type = ObjType::Invalid(33))
        }
        (Kind::Dir, "entry names nothing") => c.edit_bref(slot.unwrap(), |b| {
            let mut h = b.dirent();
            h.inum = 0x7fff_0000;
            b.set_dirent(h);
        }),
        (Kind::Dir, "entry type") => c.edit_bref(slot.unwrap(), |b| {
            let mut h = b.dirent();
            h.obj_type = if h.obj_type == ObjType::Fifo.to_u8() {
                ObjType::Socket.to_u8()
            } else {
                ObjType::Fifo.to_u8()
            };
            b.set_dirent(h);
        }),
        (Kind::Dir, "entry key") => c.edit_bref(slot.unwrap(), |b| b.key ^= 1 << 40),
        (Kind::Dir, "entry names the root") => {
            // The first entry of a directory's indirect block.
            let kids: Vec<(Slot, hammer2::disk::Blockref)> = c
                .tree(Holder::Node(t.data_off))
                .into_iter()
                .filter(|(_, b)| b.btype == BlockrefType::Dirent)
                .collect();
            let Some((s, _)) = kids.first() else {
                return false;
            };
            c.edit_bref(*s, |b| {
                let mut h = b.dirent();
                h.inum = ROOT_INUM;
                h.obj_type = ObjType::Directory.to_u8();
                b.set_dirent(h);
            })
        }
        (Kind::Inode, "nlinks") => c.edit_inode(slot.unwrap(), |i| i.meta.nlinks += 1),
        (Kind::Inode, "size past the largest file") => {
            c.edit_inode(slot.unwrap(), |i| i.meta.size = u64::MAX - 7)
        }
        (Kind::Inode, "type") => {
            c.edit_inode(slot.unwrap(), |i| i.meta.obj_type = ObjType::Invalid(33))
        }
        (Kind::Inode, "check_algo") => c.edit_inode(slot.unwrap(), |i| i.meta.check_algo = 0x77),
        (Kind::Inode, "comp_algo") => c.edit_inode(slot.unwrap(), |i| i.meta.comp_algo = 0x7e),
        (Kind::Inode, "inum") => c.edit_inode(slot.unwrap(), |i| i.meta.inum += 100_000),
        (Kind::Data, "compression method") => c.edit_bref(slot.unwrap(), |b| {
            b.methods = disk::enc_methods(b.check_method(), 0x0e)
        }),
        (Kind::Data, "keybits") => c.edit_bref(slot.unwrap(), |b| b.keybits = 15),
        (Kind::Data, "key") => c.edit_bref(slot.unwrap(), |b| b.key += 512),
        (Kind::FreemapNode, "leaf keybits") => {
            let kids = c.children(Holder::Node(t.data_off));
            let Some((s, _)) = kids
                .iter()
                .find(|(_, b)| b.btype == BlockrefType::FreemapLeaf)
            else {
                return false;
            };
            c.edit_bref(*s, |b| b.keybits = 31)
        }
        (Kind::FreemapLeaf, "bitmap") => {
            // Only damage when the zone holds a block the tree references
            // (zones holding only unreferenced allocations lose nothing).
            let br = c.bref(slot.unwrap());
            let used = base.targets.values().flatten().any(|x| {
                !matches!(x.kind, Kind::Header | Kind::FreemapNode | Kind::FreemapLeaf)
                    && x.data_off.offset() >= br.key
                    && x.data_off.offset() <= br.key_end()
            });
            if !used {
                return false;
            }
            c.edit_block(slot.unwrap(), |bytes| {
                // Every 16 KiB block of the zone free (bitmapq at 0x40 of
                // each 128-byte bmap_data).
                for n in 0..disk::FREEMAP_COUNT {
                    let at = n * disk::BMAP_BYTES + 0x40;
                    bytes[at..at + 64].fill(0);
                }
            })
        }
        (Kind::FreemapLeaf, "linear") => c.edit_block(slot.unwrap(), |bytes| {
            bytes[0..4].copy_from_slice(&(-5i32).to_le_bytes());
        }),
        _ => return false,
    }
    true
}

/// What one case came to.
#[derive(Clone, Debug)]
pub struct CaseResult {
    pub base: String,
    pub kind: Kind,
    pub how: How,
    pub at: u64,
    pub seed: u64,
    pub rewound: bool,
    pub in_place: bool,
    pub lost_bytes: u64,
    pub violations: Vec<String>,
    pub elapsed: Duration,
}

/// Bytes of `before`'s files that read differently or not at all in
/// `after`.
pub fn lost_bytes(before: &Files, after: &Files) -> u64 {
    let mut n = 0u64;
    for (k, a) in before {
        match after.get(k) {
            None => n += a.len() as u64,
            Some(b) => {
                let common = a.len().min(b.len());
                n += a[..common]
                    .iter()
                    .zip(&b[..common])
                    .filter(|(x, y)| x != y)
                    .count() as u64;
                n += (a.len() - common) as u64;
            }
        }
    }
    n
}

/// A device that refuses and counts writes: fsck -n must never write.
struct NoWrites {
    inner: MemDevice,
    writes: AtomicU64,
}

impl BlockDevice for NoWrites {
    fn read_at(&self, buf: &mut [u8], at: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, at)
    }
    fn write_at(&self, _buf: &[u8], _at: u64) -> std::io::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        Err(std::io::Error::other("fsck -n wrote"))
    }
    fn barrier(&self) -> std::io::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
}

/// Pick a case: a target of `kind` and a damage for it.
pub fn pick(base: &Base, kind: Kind, rng: &mut SmallRng) -> Option<(Target, How)> {
    let list = base.targets.get(&kind)?;
    for _ in 0..64 {
        let t = &list[rng.gen_range(0..list.len())];
        let roll = rng.gen_range(0..3);
        let raw_ok = t.kind == Kind::Header
            || !matches!(t.check, check_method::NONE | check_method::DISABLED);
        // The only header copy junked leaves no HAMMER2 image to repair.
        let one_header = t.kind == Kind::Header && header_slots(base.dev.size_bytes()) < 2;
        if roll == 2 && raw_ok && !one_header && t.data_off.bytes() > 0 {
            return Some((t.clone(), How::Junk(rng.gen())));
        }
        if roll == 1 && raw_ok {
            let bytes = if t.kind == Kind::Header {
                // Damage where the header's fields are most of the time;
                // the rest of the 64 KiB is unused.
                if rng.gen_bool(0.5) {
                    0x1000
                } else {
                    disk::VOLUME_BYTES as u64
                }
            } else {
                t.data_off.bytes()
            };
            if bytes == 0 {
                continue;
            }
            return Some((
                t.clone(),
                How::Flip {
                    byte: rng.gen_range(0..bytes),
                    bit: rng.gen_range(0..8),
                },
            ));
        }
        let menu = crafts(t);
        if menu.is_empty() || (t.kind == Kind::Header && t.header != in_use(&base.dev)) {
            continue;
        }
        return Some((t.clone(), How::Craft(menu[rng.gen_range(0..menu.len())])));
    }
    None
}

fn in_use(dev: &MemDevice) -> usize {
    (0..header_slots(dev.size_bytes()))
        .filter_map(|i| match read_header_slot(dev, i) {
            HeaderSlot::Good(vh) => Some((i, vh.mirror_tid)),
            _ => None,
        })
        .max_by_key(|x| x.1)
        .map_or(0, |x| x.0)
}

/// Run one case. `save`: a directory to keep the repaired image in.
/// `None` when the damage does not apply to this block (no second
/// entry to swap, no entry that would fall outside a halved range...).
pub fn run_case(
    base: &Base,
    t: &Target,
    how: &How,
    seed: u64,
    save: Option<&Path>,
) -> Option<CaseResult> {
    let start = Instant::now();
    let mut res = CaseResult {
        base: base.name.clone(),
        kind: t.kind,
        how: how.clone(),
        at: t.data_off.offset(),
        seed,
        rewound: false,
        in_place: false,
        lost_bytes: 0,
        violations: Vec::new(),
        elapsed: Duration::ZERO,
    };
    let dev = Arc::new(base.dev.snapshot());
    let c = Craft::new(dev.clone());
    if !apply(&c, base, t, how) {
        return None;
    }
    let v = &mut res.violations;
    // fsck -n: reports it, writes nothing.
    let probe = Arc::new(NoWrites {
        inner: dev.snapshot(),
        writes: AtomicU64::new(0),
    });
    let before = match fsck(probe.clone(), FsckOptions::default()) {
        Ok(r) => r,
        Err(e) => {
            v.push(format!("fsck -n failed: {e}"));
            res.elapsed = start.elapsed();
            return Some(res);
        }
    };
    if probe.writes.load(Ordering::SeqCst) != 0 {
        v.push("fsck -n wrote to the image".into());
    }
    if before.is_clean() {
        v.push("fsck -n did not report the damage".into());
        res.elapsed = start.elapsed();
        return Some(res);
    }
    // fsck -y.
    let d: Arc<dyn BlockDevice> = dev.clone();
    let opts = repair::Options {
        mode: Mode::Yes,
        rewind: None,
        now: crate::T0,
        cancel: None,
    };
    let outcome: Outcome = match repair::repair(d.clone(), before, &opts) {
        Ok(o) => o,
        Err(e) => {
            v.push(format!("repair failed: {e}"));
            res.elapsed = start.elapsed();
            return Some(res);
        }
    };
    if !outcome.written {
        v.push(format!("repair wrote nothing: {:?}", outcome.refused));
    }
    if !outcome.after.is_clean() {
        for p in &outcome.after.problems {
            v.push(format!("left after repair: {p}"));
        }
    }
    // A second -n, from scratch.
    match fsck(d.clone(), FsckOptions::default()) {
        Ok(r) if r.is_clean() => {}
        Ok(r) => {
            for p in r.problems {
                v.push(format!("second fsck -n: {p}"));
            }
        }
        Err(e) => v.push(format!("second fsck -n failed: {e}")),
    }
    res.rewound = outcome.rewind.is_some();
    res.in_place = outcome.written && !res.rewound;
    // Files.
    let after_files = Volume::open(d.clone())
        .map(|vol| read_files(Arc::new(vol)))
        .unwrap_or_default();
    let (expect, touched) = match &outcome.rewind {
        Some(r) => match base.states.get(&r.to_slot) {
            Some(s) => (s, BTreeSet::new()),
            None => {
                v.push(format!(
                    "rewound to copy {}, which held no good header before the damage",
                    r.to_slot
                ));
                (&base.files, base.touched(t))
            }
        },
        None => (&base.files, base.touched(t)),
    };
    for (k, want) in expect {
        if touched.contains(k) {
            continue;
        }
        match after_files.get(k) {
            Some(got) if got == want => {}
            Some(got) => v.push(format!(
                "untouched file {}:{} reads differently ({} bytes, was {})",
                k.0,
                k.1,
                got.len(),
                want.len()
            )),
            None => v.push(format!("untouched file {}:{} is gone", k.0, k.1)),
        }
    }
    res.lost_bytes = lost_bytes(&base.files, &after_files);
    // The mount works read-write afterwards.
    match Mount::open(d.clone()) {
        Ok(mut m) => {
            let labels = m.pfs_labels().unwrap_or_default();
            for l in &labels {
                let r = crate::create_file(&mut m, l, ROOT_INUM, b"after-repair")
                    .and_then(|f| m.write(l, f, 0, &[0x5a; 70_000], crate::T0));
                if let Err(e) = r {
                    v.push(format!("after repair, writing to PFS {l} failed: {e}"));
                }
            }
            if let Err(e) = m.flush() {
                v.push(format!("after repair, a flush failed: {e}"));
            }
            drop(m);
            match fsck(d.clone(), FsckOptions::default()) {
                Ok(r) if r.is_clean() => {}
                Ok(r) => v.push(format!(
                    "after writing to the repaired image: {:?}",
                    r.problems.first().map(|p| p.to_string())
                )),
                Err(e) => v.push(format!("fsck after writing failed: {e}")),
            }
        }
        Err(e) => v.push(format!("the repaired image does not open read-write: {e}")),
    }
    if let Some(dir) = save {
        let name = format!(
            "{}-{}-{:x}-{seed}.img",
            base.name,
            t.kind.name().replace(' ', "_"),
            t.data_off.offset()
        );
        crate::save_sparse(&dev, &dir.join(name));
    }
    res.elapsed = start.elapsed();
    Some(res)
}

/// Per-kind totals.
#[derive(Clone, Debug, Default)]
pub struct Row {
    pub cases: u64,
    pub in_place: u64,
    pub rewound: u64,
    pub lost_bytes: u64,
    pub violations: u64,
}

/// The table of the closing note.
pub fn table(results: &[CaseResult]) -> BTreeMap<Kind, Row> {
    let mut t: BTreeMap<Kind, Row> = BTreeMap::new();
    for r in results {
        let row = t.entry(r.kind).or_default();
        row.cases += 1;
        row.in_place += u64::from(r.in_place && r.violations.is_empty());
        row.rewound += u64::from(r.rewound && r.violations.is_empty());
        row.lost_bytes += r.lost_bytes;
        row.violations += u64::from(!r.violations.is_empty());
    }
    t
}

/// The table as text.
pub fn format_table(t: &BTreeMap<Kind, Row>) -> String {
    let mut s = String::from(
        "| block kind | cases | repaired in place | rewound | file data lost (bytes) | violations |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    let mut total = Row::default();
    for (k, r) in t {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            k.name(),
            r.cases,
            r.in_place,
            r.rewound,
            r.lost_bytes,
            r.violations
        );
        total.cases += r.cases;
        total.in_place += r.in_place;
        total.rewound += r.rewound;
        total.lost_bytes += r.lost_bytes;
        total.violations += r.violations;
    }
    s += &format!(
        "| all | {} | {} | {} | {} | {} |\n",
        total.cases, total.in_place, total.rewound, total.lost_bytes, total.violations
    );
    s
}
