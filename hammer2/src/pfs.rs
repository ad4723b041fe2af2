//! PFSs and their inodes, read side: the super-root and its PFS roots,
//! the flat inode index under each PFS root, directories (DIRENT brefs
//! keyed by name hash) and path resolution.

use crate::chain;
use crate::dirhash::{dirhash_range, is_dirent_key};
use crate::disk::{
    Blockref, BlockrefType, InodeData, InodeMeta, ObjType, DATA_BLOCK_BYTES, DATA_BLOCK_RADIX,
    DIRHASH_VISIBLE, EMBEDDED_BYTES, INODE_BYTES,
};
use crate::error::{Error, Result};
use crate::volume::Volume;
use std::sync::Arc;

/// Dirent names up to this length sit in the blockref's check area.
pub const DIRENT_EMBEDDED_NAME_MAX: usize = 64;
/// The longest name a dirent may carry: DragonFly asserts a name is
/// shorter than `HAMMER2_INODE_MAXNAME` (256), and Linux's NAME_MAX is
/// the same 255. A longer one on disk is damage.
pub const DIRENT_NAME_MAX: usize = 255;
/// Linux's limit, which the library enforces for names it is given.
pub const NAME_MAX: usize = 255;
/// The largest file `Pfs::read_all` reads in one piece.
pub const READ_ALL_MAX: u64 = 1 << 30;
/// The longest symlink target served: Linux's PATH_MAX (DragonFly's
/// MAXPATHLEN is 1024; the FUSE kernel refuses a target past a page).
pub const SYMLINK_MAX: u64 = 4096;
/// The largest file size: Linux's `MAX_LFS_FILESIZE` (the kernel refuses
/// an attribute past it).
pub const FILE_SIZE_MAX: u64 = i64::MAX as u64;

/// Why an inode's meta cannot be served: a size past the largest file,
/// direct data longer than the 512 bytes an inode holds, a symlink
/// target longer than a path. `None` for a sound inode. Every read of an
/// inode refuses such a one (EIO through a mount) and fsck reports it.
pub fn meta_damage(m: &InodeMeta) -> Option<String> {
    if m.size > FILE_SIZE_MAX {
        Some(format!(
            "size {} exceeds the largest file size {FILE_SIZE_MAX}",
            m.size
        ))
    } else if m.has_direct_data() && m.size > EMBEDDED_BYTES as u64 {
        Some(format!(
            "direct data of {} bytes exceeds the {EMBEDDED_BYTES} an inode holds",
            m.size
        ))
    } else if m.obj_type == ObjType::Softlink && m.size > SYMLINK_MAX {
        Some(format!(
            "symlink target of {} bytes exceeds {SYMLINK_MAX}",
            m.size
        ))
    } else {
        None
    }
}

/// An inode read from disk, with the blockref that pointed to it.
#[derive(Clone, Debug)]
pub struct Inode {
    pub bref: Blockref,
    pub data: InodeData,
}

impl Inode {
    pub fn meta(&self) -> &InodeMeta {
        &self.data.meta
    }
    pub fn inum(&self) -> u64 {
        self.data.meta.inum
    }
    pub fn obj_type(&self) -> ObjType {
        self.data.meta.obj_type
    }
    pub fn is_dir(&self) -> bool {
        self.obj_type() == ObjType::Directory
    }
    /// `st_mode`: the type bits and the permission bits.
    pub fn st_mode(&self) -> u32 {
        self.obj_type().mode_bits() | (self.data.meta.mode & 0o7777)
    }
    /// The bytes the inode's blocks take on disk, for `st_blocks`
    /// (DragonFly's `va_bytes`, see `stored_bytes`).
    pub fn stored_bytes(&self) -> u64 {
        stored_bytes(self.meta(), self.bref.data_count())
    }
    /// The blockset of an inode without direct data.
    pub fn blockset(&self) -> Vec<Blockref> {
        if self.data.meta.has_direct_data() {
            Vec::new()
        } else {
            self.data.blockset().to_vec()
        }
    }
}

/// What `stat` reports as the space an inode takes (DragonFly's
/// `hammer2_vop_getattr`: `va_bytes`): for a directory one inode block
/// (its `data_count` would be no measure: a PFS root's counts every
/// inode of the PFS, which lives under it); for anything else
/// `data_count`, the physical bytes of every block below the inode (data
/// blocks as compressed, indirect blocks), as of the flush that wrote
/// the blockref. Data embedded in the inode takes none.
pub fn stored_bytes(meta: &InodeMeta, data_count: u64) -> u64 {
    if meta.obj_type == ObjType::Directory {
        crate::disk::INODE_BYTES as u64
    } else {
        data_count
    }
}

/// Read and decode the inode a blockref points to.
pub fn read_inode(vol: &Volume, br: &Blockref) -> Result<Inode> {
    if br.btype != BlockrefType::Inode {
        return Err(Error::corrupt(
            format!("expected an inode blockref, found {}", br.btype.name()),
            br.data_off.offset(),
        ));
    }
    let at = br.data_off.offset();
    if br.data_off.bytes() != INODE_BYTES as u64 {
        return Err(Error::corrupt(
            format!(
                "inode blockref key {:#x} points at a block of {} bytes",
                br.key,
                br.data_off.bytes()
            ),
            at,
        ));
    }
    let buf = vol.read_physical(br)?;
    let data = InodeData::decode(&buf, at)?;
    if let Some(why) = meta_damage(&data.meta) {
        return Err(Error::corrupt(
            format!("inode {}: {why}", data.meta.inum),
            at,
        ));
    }
    Ok(Inode { bref: *br, data })
}

/// The super-root inode.
pub fn super_root(vol: &Volume) -> Result<Inode> {
    let br = vol.header.sroot_blockset[0];
    if br.is_empty() {
        return Err(Error::corrupt(
            "volume header has no super-root".to_string(),
            0x200,
        ));
    }
    read_inode(vol, &br)
}

/// One PFS (or snapshot) as listed in the super-root.
#[derive(Clone, Debug)]
pub struct PfsInfo {
    pub label: String,
    pub root: Inode,
}

/// Every PFS root under the super-root, in key order.
pub fn pfs_list(vol: &Volume) -> Result<Vec<PfsInfo>> {
    let sroot = super_root(vol)?;
    let brefs = chain::collect(vol, &sroot.blockset(), 0, u64::MAX)?;
    let mut out = Vec::new();
    for br in &brefs {
        if br.btype != BlockrefType::Inode {
            return Err(Error::corrupt(
                format!(
                    "{} blockref key {:#x} in the super-root",
                    br.btype.name(),
                    br.key
                ),
                br.data_off.offset(),
            ));
        }
        let root = read_inode(vol, br)?;
        let label = String::from_utf8_lossy(root.data.name()).into_owned();
        out.push(PfsInfo { label, root });
    }
    Ok(out)
}

/// A directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub inum: u64,
    pub obj_type: ObjType,
    /// The directory key (name hash plus collision counter).
    pub key: u64,
}

/// The name a DIRENT blockref carries: in its check area when short, in
/// its data block otherwise.
pub fn dirent_name(vol: &Volume, br: &Blockref) -> Result<Vec<u8>> {
    let namlen = br.dirent().namlen as usize;
    if namlen == 0 || namlen > DIRENT_NAME_MAX {
        return Err(Error::corrupt(
            format!("dirent name length {namlen}"),
            br.data_off.offset(),
        ));
    }
    if namlen <= DIRENT_EMBEDDED_NAME_MAX {
        return Ok(br.check[..namlen].to_vec());
    }
    let data = vol.read_physical(br)?;
    if data.len() < namlen {
        return Err(Error::corrupt(
            format!("dirent name of {namlen} bytes in a block of {}", data.len()),
            br.data_off.offset(),
        ));
    }
    Ok(data[..namlen].to_vec())
}

/// The entry a directory-range blockref stands for: a DIRENT, or an
/// INODE filed by name (the super-root, and pre-2017 directories).
/// Anything else there is damage.
fn entry_of(vol: &Volume, br: &Blockref) -> Result<Option<DirEntry>> {
    match br.btype {
        BlockrefType::Dirent => {
            let d = br.dirent();
            Ok(Some(DirEntry {
                name: dirent_name(vol, br)?,
                inum: d.inum,
                obj_type: ObjType::from_u8(d.obj_type),
                key: br.key,
            }))
        }
        BlockrefType::Inode => {
            let ino = read_inode(vol, br)?;
            Ok(Some(DirEntry {
                name: ino.data.name().to_vec(),
                inum: ino.inum(),
                obj_type: ino.obj_type(),
                key: br.key,
            }))
        }
        other => Err(Error::corrupt(
            format!(
                "{} blockref key {:#x} among a directory's entries",
                other.name(),
                br.key
            ),
            br.data_off.offset(),
        )),
    }
}

/// An entry of directory `dir` may not name the PFS root (inode 1) or
/// `dir` itself: either makes the tree a cycle, which every walk of it
/// would follow for ever. (fsck reports both.)
pub fn check_entry(dir: u64, e: &DirEntry, br: &Blockref) -> Result<()> {
    if e.inum == 1 || e.inum == dir {
        return Err(Error::corrupt(
            format!(
                "entry {:?} of directory inode {dir} names {}",
                String::from_utf8_lossy(&e.name),
                if e.inum == 1 {
                    "the PFS root".to_string()
                } else {
                    "its own directory".to_string()
                }
            ),
            br.data_off.offset(),
        ));
    }
    Ok(())
}

/// A mounted (for reading) PFS.
#[derive(Clone)]
pub struct Pfs {
    vol: Arc<Volume>,
    pub label: String,
    pub root: Inode,
}

impl Pfs {
    /// Open the PFS (or snapshot) named `label`.
    pub fn open(vol: Arc<Volume>, label: &str) -> Result<Pfs> {
        let found = pfs_list(&vol)?.into_iter().find(|p| p.label == label);
        match found {
            Some(p) => Ok(Pfs {
                vol,
                label: p.label,
                root: p.root,
            }),
            None => Err(Error::NotFound {
                what: format!("PFS {label}"),
            }),
        }
    }

    /// The PFS whose root is `info`'s, without reading the super-root
    /// again (a reader that lists PFS roots one by one, past damage).
    pub fn from_info(vol: Arc<Volume>, info: PfsInfo) -> Pfs {
        Pfs {
            vol,
            label: info.label,
            root: info.root,
        }
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.vol
    }

    /// The inode numbered `inum` (1 is the PFS root).
    pub fn inode(&self, inum: u64) -> Result<Inode> {
        if inum == 1 {
            return Ok(self.root.clone());
        }
        if is_dirent_key(inum) {
            return Err(Error::NotFound {
                what: format!("inode {inum}"),
            });
        }
        let mut found = None;
        chain::scan(&self.vol, &self.root.blockset(), inum, inum, &mut |br| {
            if br.key == inum {
                if br.btype != BlockrefType::Inode {
                    return Err(Error::corrupt(
                        format!("{} blockref at inode index key {inum}", br.btype.name()),
                        br.data_off.offset(),
                    ));
                }
                found = Some(*br);
                return Ok(false);
            }
            Ok(true)
        })?;
        let br = found.ok_or_else(|| Error::NotFound {
            what: format!("inode {inum}"),
        })?;
        let ino = read_inode(&self.vol, &br)?;
        if ino.inum() != inum {
            return Err(Error::corrupt(
                format!("inode index key {inum} holds inode {}", ino.inum()),
                br.data_off.offset(),
            ));
        }
        Ok(ino)
    }

    /// Find `name` in directory `dir`.
    pub fn lookup(&self, dir: &Inode, name: &[u8]) -> Result<Option<DirEntry>> {
        if !dir.is_dir() {
            return Err(Error::NotDir {
                what: format!("inode {}", dir.inum()),
            });
        }
        if name.is_empty() || name.len() > DIRENT_NAME_MAX {
            return Ok(None);
        }
        let (beg, end) = dirhash_range(name);
        let mut found = None;
        let vol = &self.vol;
        chain::scan(vol, &dir.blockset(), beg, end, &mut |br| {
            if let Some(e) = entry_of(vol, br)? {
                if e.name == name {
                    check_entry(dir.inum(), &e, br)?;
                    found = Some(e);
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        Ok(found)
    }

    /// Every entry of directory `dir` ("." and ".." excluded), in key
    /// order. Keys are stable cookies for readdir.
    pub fn readdir(&self, dir: &Inode) -> Result<Vec<DirEntry>> {
        self.readdir_from(dir, DIRHASH_VISIBLE)
    }

    /// Entries with key at least `key_beg`, in key order.
    pub fn readdir_from(&self, dir: &Inode, key_beg: u64) -> Result<Vec<DirEntry>> {
        if !dir.is_dir() {
            return Err(Error::NotDir {
                what: format!("inode {}", dir.inum()),
            });
        }
        let mut out = Vec::new();
        let vol = &self.vol;
        chain::scan(
            vol,
            &dir.blockset(),
            key_beg.max(DIRHASH_VISIBLE),
            u64::MAX,
            &mut |br| {
                if let Some(e) = entry_of(vol, br)? {
                    check_entry(dir.inum(), &e, br)?;
                    out.push(e);
                }
                Ok(true)
            },
        )?;
        Ok(out)
    }

    /// Resolve a path relative to the PFS root, without following
    /// symlinks (as lstat does). "" and "/" are the root.
    pub fn resolve(&self, path: &str) -> Result<Inode> {
        let mut cur = self.root.clone();
        let mut walked = String::new();
        for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            walked.push('/');
            walked.push_str(comp);
            if !cur.is_dir() {
                return Err(Error::NotDir { what: walked });
            }
            let e = self
                .lookup(&cur, comp.as_bytes())?
                .ok_or_else(|| Error::NotFound {
                    what: walked.clone(),
                })?;
            cur = self.inode(e.inum)?;
        }
        Ok(cur)
    }

    /// The target of a symlink.
    pub fn readlink(&self, ino: &Inode) -> Result<Vec<u8>> {
        if ino.obj_type() != ObjType::Softlink {
            return Err(Error::NotSymlink {
                what: format!("inode {}", ino.inum()),
            });
        }
        if let Some(why) = meta_damage(ino.meta()) {
            return Err(Error::corrupt(
                format!("inode {}: {why}", ino.inum()),
                ino.bref.data_off.offset(),
            ));
        }
        self.read_all(ino)
    }

    /// Read a whole file.
    pub fn read_all(&self, ino: &Inode) -> Result<Vec<u8>> {
        let size = ino.meta().size;
        if size > READ_ALL_MAX {
            return Err(Error::InvalidArgument {
                what: format!("file of {size} bytes is too large to read whole"),
            });
        }
        self.read(ino, 0, size as usize)
    }

    /// The first data offset at or after `offset` (SEEK_DATA); `None`
    /// at or past the size, or when only holes follow. Data is every
    /// 64 KiB block the file has; embedded data is all data. The same
    /// answer as `Mount::seek_data` gives for a flushed file.
    pub fn seek_data(&self, ino: &Inode, offset: u64) -> Result<Option<u64>> {
        let size = ino.meta().size;
        if offset >= size {
            return Ok(None);
        }
        if ino.meta().has_direct_data() {
            return Ok(Some(offset));
        }
        let mut found = None;
        chain::scan(&self.vol, &ino.blockset(), offset, size - 1, &mut |br| {
            if br.btype == BlockrefType::Data && br.key < size {
                found = Some(br.key.max(offset));
                return Ok(false);
            }
            Ok(true)
        })
        .map_err(|e| e.with_place(Some(&self.label), Some(ino.inum()), Some(offset)))?;
        Ok(found)
    }

    /// The first hole offset at or after `offset` (SEEK_HOLE): the size
    /// when no hole comes before it. The same answer as
    /// `Mount::seek_hole` gives for a flushed file.
    pub fn seek_hole(&self, ino: &Inode, offset: u64) -> Result<u64> {
        let size = ino.meta().size;
        if offset >= size || ino.meta().has_direct_data() {
            return Ok(size);
        }
        let block = crate::disk::DATA_BLOCK_BYTES;
        let mut pos = offset & !(block - 1);
        chain::scan(&self.vol, &ino.blockset(), pos, size - 1, &mut |br| {
            if br.btype != BlockrefType::Data || br.key > pos {
                return Ok(false);
            }
            pos = pos.max(br.key.saturating_add(block));
            Ok(pos < size)
        })
        .map_err(|e| e.with_place(Some(&self.label), Some(ino.inum()), Some(offset)))?;
        Ok(pos.max(offset).min(size))
    }

    /// Read up to `len` bytes at `offset`; short at end of file. Holes
    /// read as zeros. A damaged block fails the read with an error that
    /// names the image offset, the inode and the file offset.
    pub fn read(&self, ino: &Inode, offset: u64, len: usize) -> Result<Vec<u8>> {
        let size = ino.meta().size;
        if offset >= size || len == 0 {
            return Ok(Vec::new());
        }
        if let Some(why) = meta_damage(ino.meta()) {
            return Err(Error::corrupt(
                format!("inode {}: {why}", ino.inum()),
                ino.bref.data_off.offset(),
            ));
        }
        let end = size.min(offset.saturating_add(len as u64));
        let mut out = vec![0u8; (end - offset) as usize];
        if ino.meta().has_direct_data() {
            let direct = &ino.data.u;
            let lo = (offset as usize).min(direct.len());
            let hi = (end as usize).min(direct.len());
            out[..hi - lo].copy_from_slice(&direct[lo..hi]);
            return Ok(out);
        }
        let place =
            |e: Error, key: Option<u64>| e.with_place(Some(&self.label), Some(ino.inum()), key);
        let blocks = chain::collect(&self.vol, &ino.blockset(), offset, end - 1)
            .map_err(|e| place(e, Some(offset)))?;
        // Neighbouring blocks in one device read (a hint).
        self.vol.cluster_read(blocks.iter());
        for br in &blocks {
            check_data_leaf(br).map_err(|e| place(e, Some(br.key)))?;
            // In place from the cache, checked once per residency.
            self.vol
                .with_data_block(br, |data| {
                    let blk_beg = br.key;
                    let blk_end = blk_beg.saturating_add(data.len() as u64);
                    let lo = blk_beg.max(offset);
                    let hi = blk_end.min(end);
                    if lo < hi {
                        out[(lo - offset) as usize..(hi - offset) as usize].copy_from_slice(
                            &data[(lo - blk_beg) as usize..(hi - blk_beg) as usize],
                        );
                    }
                })
                .map_err(|e| place(e, Some(br.key)))?;
        }
        Ok(out)
    }
}

/// A leaf of a file's tree must be a 64 KiB DATA block at a 64 KiB key
/// (DragonFly's logical block); anything else there (an inode, a dirent,
/// an unknown type, another size) is damage, never a hole.
pub fn check_data_leaf(br: &Blockref) -> Result<()> {
    if br.btype != BlockrefType::Data {
        return Err(Error::corrupt(
            format!(
                "{} blockref (type {}) at file offset {:#x}",
                br.btype.name(),
                br.btype.to_u8(),
                br.key
            ),
            br.data_off.offset(),
        ));
    }
    if br.keybits != DATA_BLOCK_RADIX || !br.key.is_multiple_of(DATA_BLOCK_BYTES) {
        return Err(Error::corrupt(
            format!(
                "data blockref key {:#x}/{} is not a 64 KiB block",
                br.key, br.keybits
            ),
            br.data_off.offset(),
        ));
    }
    Ok(())
}
