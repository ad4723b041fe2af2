//! `hammer2 recover`: copy files out of a damaged image, as DragonFly's
//! `hammer2 recover` does, never writing to it.
//!
//! Two passes. The first walks every PFS (or the one named, from PATH)
//! as a reader would, but past damage: a directory block that fails its
//! check code loses only the entries under it, a file block that fails
//! is a hole (reported with its range), and everything else is copied
//! with its mode and times; hard links stay links. The second finds what
//! the first could not reach: every inode in each PFS's inode index
//! (through the index blocks that still verify), then every blockref in
//! the whole image that points at an inode whose check code verifies.
//! Those inodes not already copied go to `lost+found` (under the PFS's
//! directory when the PFS is known, else `DESTDIR/lost+found`), named as
//! a directory entry found anywhere in the image names them (a name is
//! believed when its hash is its entry's key), else `#INUM`. A recovered
//! directory brings what is under it.

use bufcache::BlockDevice;
use hammer2::chain::read_node;
use hammer2::dirhash::dirhash;
use hammer2::disk::inode::system_time;
use hammer2::disk::Blockref;
use hammer2::disk::{
    BlockrefType, ObjType, BLOCKREF_BYTES, DIRHASH_HIMASK, DIRHASH_VISIBLE, INODE_BYTES, PBUFSIZE,
};
use hammer2::pfs::{
    check_data_leaf, dirent_name, meta_damage, read_inode, super_root, PfsInfo, DIRENT_NAME_MAX,
};
use hammer2::volume::{header_slots, read_header_slot, HeaderSlot};
use hammer2::{Inode, Pfs, Volume};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Nodes nested deeper than this are damage (DragonFly's trees are a
/// few levels deep).
const DEPTH_MAX: usize = 40;
/// The longest symlink target copied (Linux's PATH_MAX).
const SYMLINK_MAX: u64 = 4096;

/// What to recover.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// One PFS (IMG@LABEL); every PFS, each in `DESTDIR/LABEL`, if none.
    pub label: Option<String>,
    /// A path in the PFS to recover from (its root if none).
    pub path: Option<String>,
    /// Skip the second pass (what no directory reaches).
    pub no_scan: bool,
}

/// What was recovered.
#[derive(Debug, Default)]
pub struct Report {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Hard links made (a file reached again under another name).
    pub links: u64,
    /// Devices, fifos and sockets, not recreated.
    pub skipped: u64,
    /// Bytes of file data copied.
    pub bytes: u64,
    /// Bytes of file data that could not be read (holes left).
    pub lost_bytes: u64,
    /// Inodes the second pass put in `lost+found`.
    pub lost_found: u64,
    /// What could not be read, one line each.
    pub problems: Vec<String>,
}

/// Where a copied inode came from: its PFS (`None` when found by the
/// image scan) and its number.
type Key = (Option<String>, u64);

struct Salvager<'a> {
    vol: Arc<Volume>,
    report: Report,
    /// Inodes copied, to their path (hard links, and what the second
    /// pass skips).
    copied: HashMap<Key, PathBuf>,
    /// The blocks of the inodes copied (a version of an inode met again
    /// by the image scan is not copied twice).
    copied_blocks: HashSet<u64>,
    /// Directory modes and times, set last (a read-only directory would
    /// refuse its entries).
    dir_meta: Vec<(PathBuf, u32, u64)>,
    say: &'a mut dyn FnMut(&str),
}

/// Recover from `dev` into `dest` (created if missing). Reads only.
pub fn recover(
    dev: Arc<dyn BlockDevice>,
    opts: &Options,
    dest: &Path,
    say: &mut dyn FnMut(&str),
) -> Result<Report, String> {
    let vol = open_volume(dev.clone())?;
    fs::create_dir_all(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    let mut s = Salvager {
        vol: Arc::new(vol),
        report: Report::default(),
        copied: HashMap::new(),
        copied_blocks: HashSet::new(),
        dir_meta: Vec::new(),
        say,
    };
    let pfss = s.pfs_roots();
    if let Some(l) = &opts.label {
        if !pfss.iter().any(|p| &p.label == l) && !pfss.is_empty() {
            return Err(format!("no PFS {l} in the image"));
        }
    }
    let mut walked: Vec<(Pfs, PathBuf)> = Vec::new();
    for info in pfss {
        if opts.label.as_ref().is_some_and(|l| l != &info.label) {
            continue;
        }
        let base = match &opts.label {
            Some(_) => dest.to_path_buf(),
            None => dest.join(safe_name(info.label.as_bytes(), 1)),
        };
        let pfs = Pfs::from_info(s.vol.clone(), info);
        let start = match &opts.path {
            Some(p) => match pfs.resolve(p) {
                Ok(i) => i,
                Err(e) => {
                    s.problem(format!("PFS {}: {p}: {e}", pfs.label));
                    continue;
                }
            },
            None => pfs.root.clone(),
        };
        let target = match (&opts.path, start.is_dir()) {
            (Some(p), false) => {
                fs::create_dir_all(&base).map_err(|e| format!("{}: {e}", base.display()))?;
                let name = p.rsplit('/').find(|c| !c.is_empty()).unwrap_or("file");
                base.join(safe_name(name.as_bytes(), start.inum()))
            }
            _ => base.clone(),
        };
        let mut seen = BTreeSet::new();
        s.copy(Some(&pfs), &start, &target, &mut seen, 0);
        walked.push((pfs, base));
    }
    if !opts.no_scan && opts.path.is_none() {
        s.second_pass(&walked, dest, opts.label.is_some());
    }
    s.finish();
    Ok(s.report)
}

/// The newest volume header copy whose super-root reads; else the
/// newest with good CRCs.
fn open_volume(dev: Arc<dyn BlockDevice>) -> Result<Volume, String> {
    let mut good: Vec<(u64, usize, hammer2::disk::VolumeHeader)> =
        (0..header_slots(dev.size_bytes()))
            .filter_map(|i| match read_header_slot(dev.as_ref(), i) {
                HeaderSlot::Good(vh) => Some((vh.mirror_tid, i, *vh)),
                _ => None,
            })
            .collect();
    good.sort_by_key(|g| std::cmp::Reverse(g.0));
    let first = good
        .first()
        .cloned()
        .ok_or_else(|| "no volume header copy is a good HAMMER2 header".to_string())?;
    for (_, i, vh) in &good {
        let v = Volume::at_header(dev.clone(), vh.clone(), *i);
        if hammer2::pfs::super_root(&v).is_ok() {
            return Ok(v);
        }
    }
    Ok(Volume::at_header(dev, first.2, first.1))
}

/// A name usable on the host: not empty, no `/` or NUL, not `.` or
/// `..`; else `#INUM`.
fn safe_name(name: &[u8], inum: u64) -> PathBuf {
    let bad = name.is_empty()
        || name.len() > DIRENT_NAME_MAX
        || name == b"."
        || name == b".."
        || name.iter().any(|&c| c == b'/' || c == 0);
    if bad {
        PathBuf::from(format!("#{inum}"))
    } else {
        PathBuf::from(std::ffi::OsStr::from_bytes(name))
    }
}

/// `path`, or `path.#INUM` when something is there already.
fn free_path(path: PathBuf, inum: u64) -> PathBuf {
    if fs::symlink_metadata(&path).is_err() {
        return path;
    }
    let mut s = path.into_os_string();
    s.push(format!(".#{inum}"));
    PathBuf::from(s)
}

/// Every leaf blockref under `set`, past nodes that fail (each one a
/// problem line); nodes met twice are skipped.
fn leaves(vol: &Volume, set: &[Blockref], what: &str, problems: &mut Vec<String>) -> Vec<Blockref> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut stack: Vec<(Blockref, usize)> = set
        .iter()
        .rev()
        .filter(|b| !b.is_empty())
        .map(|b| (*b, 0))
        .collect();
    while let Some((br, depth)) = stack.pop() {
        if br.btype != BlockrefType::Indirect {
            out.push(br);
            continue;
        }
        if depth >= DEPTH_MAX || !seen.insert(br.data_off.0) {
            problems.push(format!(
                "{what}: indirect block at {:#x} nested too deep or met twice; skipped",
                br.data_off.offset()
            ));
            continue;
        }
        match read_node(vol, &br) {
            Ok(kids) => stack.extend(
                kids.into_iter()
                    .rev()
                    .filter(|b| !b.is_empty())
                    .map(|b| (b, depth + 1)),
            ),
            Err(e) => problems.push(format!(
                "{what}: keys {:#x}..{:#x} lost: {e}",
                br.key,
                br.key_end()
            )),
        }
    }
    out
}

impl Salvager<'_> {
    /// Every PFS root under the super-root that reads; each one that
    /// does not is a problem line (its inodes are left to the scan).
    fn pfs_roots(&mut self) -> Vec<PfsInfo> {
        let sroot = match super_root(&self.vol) {
            Ok(s) => s,
            Err(e) => {
                self.problem(format!(
                    "the super-root cannot be read ({e}): no PFS walked"
                ));
                return Vec::new();
            }
        };
        let mut problems = Vec::new();
        let brefs = leaves(&self.vol, &sroot.blockset(), "super-root", &mut problems);
        for p in problems {
            self.problem(p);
        }
        let mut out = Vec::new();
        for br in brefs {
            match read_inode(&self.vol, &br) {
                Ok(root) if br.btype == BlockrefType::Inode => {
                    let label = String::from_utf8_lossy(root.data.name()).into_owned();
                    out.push(PfsInfo { label, root });
                }
                Ok(_) => {}
                Err(e) => self.problem(format!(
                    "PFS root at key {:#x} cannot be read ({e}): its files are left to the scan",
                    br.key
                )),
            }
        }
        out
    }

    fn problem(&mut self, line: String) {
        (self.say)(&line);
        self.report.problems.push(line);
    }

    /// Copy inode `ino` (of `pfs`, or found by the scan) to `to`.
    fn copy(
        &mut self,
        pfs: Option<&Pfs>,
        ino: &Inode,
        to: &Path,
        seen: &mut BTreeSet<u64>,
        depth: usize,
    ) {
        let label = pfs.map(|p| p.label.clone());
        let key: Key = (label.clone(), ino.inum());
        let what = format!(
            "{}inode {} ({})",
            label
                .as_ref()
                .map(|l| format!("PFS {l} "))
                .unwrap_or_default(),
            ino.inum(),
            to.display()
        );
        if let Some(why) = meta_damage(ino.meta()) {
            self.problem(format!("{what}: not copied: {why}"));
            return;
        }
        if ino.obj_type() != ObjType::Directory {
            if let Some(first) = self.copied.get(&key).cloned() {
                match fs::hard_link(&first, to) {
                    Ok(()) => self.report.links += 1,
                    Err(e) => self.problem(format!("{what}: link to {}: {e}", first.display())),
                }
                return;
            }
        }
        match ino.obj_type() {
            ObjType::Directory => {
                if !seen.insert(ino.inum()) || depth > 4096 {
                    self.problem(format!("{what}: directory met twice (a cycle); skipped"));
                    return;
                }
                if let Err(e) = fs::create_dir_all(to) {
                    self.problem(format!("{what}: {e}"));
                    return;
                }
                self.report.dirs += 1;
                self.copied.insert(key, to.to_path_buf());
                self.copied_blocks.insert(ino.bref.data_off.offset());
                self.dir_meta
                    .push((to.to_path_buf(), ino.meta().mode, ino.meta().mtime));
                let mut problems = Vec::new();
                let brefs = leaves(&self.vol, &ino.blockset(), &what, &mut problems);
                for p in problems {
                    self.problem(p);
                }
                for br in brefs {
                    if br.key & DIRHASH_VISIBLE == 0 {
                        continue;
                    }
                    let (name, inum) = match br.btype {
                        BlockrefType::Dirent => match dirent_name(&self.vol, &br) {
                            Ok(n) => (n, br.dirent().inum),
                            Err(e) => {
                                let inum = br.dirent().inum;
                                self.problem(format!("{what}: entry for inode {inum}: {e}"));
                                (Vec::new(), inum)
                            }
                        },
                        BlockrefType::Inode => match read_inode(&self.vol, &br) {
                            Ok(child) => {
                                let p = free_path(
                                    to.join(safe_name(child.data.name(), child.inum())),
                                    child.inum(),
                                );
                                self.copy(pfs, &child, &p, seen, depth + 1);
                                continue;
                            }
                            Err(e) => {
                                self.problem(format!("{what}: entry key {:#x}: {e}", br.key));
                                continue;
                            }
                        },
                        t => {
                            self.problem(format!(
                                "{what}: {} blockref among the entries; skipped",
                                t.name()
                            ));
                            continue;
                        }
                    };
                    let child = match pfs {
                        Some(p) => p.inode(inum).map_err(|e| e.to_string()),
                        None => Err("no PFS to look it up in".into()),
                    };
                    match child {
                        Ok(c) => {
                            let p = free_path(to.join(safe_name(&name, inum)), inum);
                            self.copy(pfs, &c, &p, seen, depth + 1);
                        }
                        Err(e) => self.problem(format!(
                            "{what}: entry {:?} (inode {inum}): {e}",
                            String::from_utf8_lossy(&name)
                        )),
                    }
                }
                seen.remove(&ino.inum());
            }
            ObjType::Regfile => {
                let f = match File::create(to) {
                    Ok(f) => f,
                    Err(e) => {
                        self.problem(format!("{what}: {e}"));
                        return;
                    }
                };
                self.copy_data(ino, &what, |at, b| f.write_all_at(b, at));
                if let Err(e) = f.set_len(ino.meta().size) {
                    self.problem(format!("{what}: {e}"));
                }
                drop(f);
                self.set_meta(to, ino.meta().mode, ino.meta().mtime);
                self.report.files += 1;
                self.copied.insert(key, to.to_path_buf());
                self.copied_blocks.insert(ino.bref.data_off.offset());
            }
            ObjType::Softlink => {
                if ino.meta().size > SYMLINK_MAX {
                    self.problem(format!("{what}: symlink of {} bytes", ino.meta().size));
                    return;
                }
                let mut target = vec![0u8; ino.meta().size as usize];
                self.copy_data(ino, &what, |at, b| {
                    target[at as usize..at as usize + b.len()].copy_from_slice(b);
                    Ok(())
                });
                match std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), to) {
                    Ok(()) => {
                        self.report.symlinks += 1;
                        self.copied.insert(key, to.to_path_buf());
                        self.copied_blocks.insert(ino.bref.data_off.offset());
                    }
                    Err(e) => self.problem(format!("{what}: {e}")),
                }
            }
            _ => {
                self.report.skipped += 1;
                self.copied_blocks.insert(ino.bref.data_off.offset());
            }
        }
    }

    /// Hand every readable byte of `ino`'s data to `put` (offset,
    /// bytes); what cannot be read is a hole, reported with its range.
    fn copy_data(
        &mut self,
        ino: &Inode,
        what: &str,
        mut put: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) {
        let size = ino.meta().size;
        if ino.meta().has_direct_data() {
            let n = (size as usize).min(ino.data.u.len());
            match put(0, &ino.data.u[..n]) {
                Ok(()) => self.report.bytes += n as u64,
                Err(e) => self.problem(format!("{what}: {e}")),
            }
            return;
        }
        let mut problems = Vec::new();
        let brefs = leaves(&self.vol, &ino.blockset(), what, &mut problems);
        for p in problems {
            self.problem(p);
        }
        for br in brefs {
            if br.key >= size {
                continue;
            }
            let data = check_data_leaf(&br).and_then(|_| self.vol.read_block(&br));
            let len = (1u64 << br.keybits.min(16)).min(size - br.key);
            match data {
                Ok(d) => {
                    let n = (d.len() as u64).min(size - br.key) as usize;
                    match put(br.key, &d[..n]) {
                        Ok(()) => {
                            self.report.bytes += n as u64;
                        }
                        Err(e) => self.problem(format!("{what}: {e}")),
                    }
                }
                Err(e) => {
                    self.report.lost_bytes += len;
                    self.problem(format!(
                        "{what}: bytes {:#x}..{:#x} lost (a hole): {e}",
                        br.key,
                        br.key + len
                    ));
                }
            }
        }
    }

    fn set_meta(&mut self, path: &Path, mode: u32, mtime: u64) {
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777));
        if let Ok(f) = File::options().write(true).open(path) {
            let _ = f.set_modified(system_time(mtime));
        }
    }

    /// Directory modes and times, deepest first.
    fn finish(&mut self) {
        let mut dirs = std::mem::take(&mut self.dir_meta);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.0.components().count()));
        for (p, mode, mtime) in dirs {
            if let Ok(f) = File::open(&p) {
                let _ = f.set_modified(system_time(mtime));
            }
            let _ = fs::set_permissions(&p, fs::Permissions::from_mode(mode & 0o7777 | 0o700));
        }
    }

    /// The inodes no directory reached: from each PFS's inode index, then
    /// from every blockref in the image that points at an inode whose
    /// check code verifies.
    fn second_pass(&mut self, walked: &[(Pfs, PathBuf)], dest: &Path, one_pfs: bool) {
        // One read of the image: the names entries give, and the newest
        // version of every inode a blockref anywhere points at.
        let mut names: HashMap<u64, Vec<u8>> = HashMap::new();
        // Blockrefs only (an inode is read again when it is copied): 128
        // bytes per inode found, whatever the image holds.
        let mut scanned: BTreeMap<u64, (Blockref, bool)> = BTreeMap::new();
        self.scan_image(|br, vol| match br.btype {
            BlockrefType::Dirent => {
                let d = br.dirent();
                if br.key & DIRHASH_VISIBLE == 0
                    || d.namlen == 0
                    || d.namlen as usize > DIRENT_NAME_MAX
                    || names.contains_key(&d.inum)
                {
                    return;
                }
                if let Ok(n) = dirent_name(vol, br) {
                    if dirhash(&n) & DIRHASH_HIMASK == br.key & DIRHASH_HIMASK {
                        names.insert(d.inum, n);
                    }
                }
            }
            BlockrefType::Inode => {
                if let Ok(i) = read_inode(vol, br) {
                    let newer = scanned
                        .get(&i.inum())
                        .is_none_or(|o| o.0.modify_tid < br.modify_tid);
                    if newer {
                        let root = i.meta().op_flags & hammer2::disk::OPFLAG_PFSROOT != 0;
                        scanned.insert(i.inum(), (*br, root));
                    }
                }
            }
            _ => {}
        });
        for (pfs, base) in walked {
            let mut problems = Vec::new();
            let brefs = leaves(
                &self.vol,
                &pfs.root.blockset(),
                &format!("PFS {} inode index", pfs.label),
                &mut problems,
            );
            for p in problems {
                self.problem(p);
            }
            let mut found: BTreeMap<u64, Inode> = BTreeMap::new();
            for br in brefs {
                if br.btype != BlockrefType::Inode || br.key & DIRHASH_VISIBLE != 0 {
                    continue;
                }
                if self.copied.contains_key(&(Some(pfs.label.clone()), br.key)) {
                    continue;
                }
                match read_inode(&self.vol, &br) {
                    Ok(i) if i.inum() == br.key => {
                        found.insert(br.key, i);
                    }
                    Ok(_) => {}
                    Err(e) => self.problem(format!("PFS {} inode {}: {e}", pfs.label, br.key)),
                }
            }
            let lf = if one_pfs {
                dest.join("lost+found")
            } else {
                base.join("lost+found")
            };
            self.adopt(Some(pfs), found, &lf, &names);
        }
        // Inodes no PFS's index reaches.
        let found: BTreeMap<u64, Inode> = scanned
            .into_iter()
            .filter(|(inum, (br, root))| {
                !root && *inum > 1 && !self.copied_blocks.contains(&br.data_off.offset())
            })
            .filter_map(|(inum, (br, _))| read_inode(&self.vol, &br).ok().map(|i| (inum, i)))
            .collect();
        self.adopt(None, found, &dest.join("lost+found"), &names);
    }

    /// Copy `found` into `lf`: first those no other found directory
    /// names (with what is under them), then the rest.
    fn adopt(
        &mut self,
        pfs: Option<&Pfs>,
        found: BTreeMap<u64, Inode>,
        lf: &Path,
        names: &HashMap<u64, Vec<u8>>,
    ) {
        if found.is_empty() {
            return;
        }
        if let Err(e) = fs::create_dir_all(lf) {
            self.problem(format!("{}: {e}", lf.display()));
            return;
        }
        let label = pfs.map(|p| p.label.clone());
        let mut named_by_dir = HashSet::new();
        for i in found.values().filter(|i| i.is_dir()) {
            let mut sink = Vec::new();
            for br in leaves(&self.vol, &i.blockset(), "", &mut sink) {
                if br.btype == BlockrefType::Dirent {
                    named_by_dir.insert(br.dirent().inum);
                }
            }
        }
        let order: Vec<u64> = found
            .keys()
            .copied()
            .filter(|k| !named_by_dir.contains(k))
            .chain(found.keys().copied().filter(|k| named_by_dir.contains(k)))
            .collect();
        for inum in order {
            let ino = &found[&inum];
            // A PFS's inode is judged by its number there; one the scan
            // found, by its block (a PFS's or snapshot's copy of it).
            let done = match pfs {
                Some(_) => self.copied.contains_key(&(label.clone(), inum)),
                None => self.copied_blocks.contains(&ino.bref.data_off.offset()),
            };
            if done {
                continue;
            }
            let name = names
                .get(&inum)
                .map(|n| safe_name(n, inum))
                .unwrap_or_else(|| PathBuf::from(format!("#{inum}")));
            let to = free_path(lf.join(name), inum);
            (self.say)(&format!(
                "{}inode {inum} recovered as {}",
                label
                    .as_ref()
                    .map(|l| format!("PFS {l} "))
                    .unwrap_or_default(),
                to.display()
            ));
            self.report.lost_found += 1;
            let mut seen = BTreeSet::new();
            self.copy(pfs, ino, &to, &mut seen, 0);
        }
    }

    /// Visit every 128-byte-aligned slot of the image that decodes as a
    /// blockref whose block lies in the volume. Reads the image once,
    /// 64 KiB at a time.
    fn scan_image(&mut self, mut visit: impl FnMut(&Blockref, &Volume)) {
        let vol = self.vol.clone();
        let dev = vol.device().clone();
        let end = vol.size().min(dev.size_bytes());
        let mut buf = vec![0u8; PBUFSIZE as usize];
        let mut at = 0u64;
        let (inode_type, dirent_type) = (BlockrefType::Inode.to_u8(), BlockrefType::Dirent.to_u8());
        while at < end {
            let n = (end - at).min(PBUFSIZE) as usize;
            if dev.read_at(&mut buf[..n], at).is_err() {
                at += PBUFSIZE;
                continue;
            }
            for raw in buf[..n].chunks_exact(BLOCKREF_BYTES) {
                // The type byte first: most slots are no blockref.
                if raw[0] != inode_type && raw[0] != dirent_type {
                    continue;
                }
                let Ok(arr) = <&[u8; BLOCKREF_BYTES]>::try_from(raw) else {
                    continue;
                };
                let br = Blockref::decode(arr);
                let plausible = match br.btype {
                    BlockrefType::Inode => br.data_off.bytes() == INODE_BYTES as u64,
                    BlockrefType::Dirent => true,
                    _ => false,
                };
                let off = br.data_off.offset();
                if plausible && off.saturating_add(br.data_off.bytes()) <= end {
                    visit(&br, &vol);
                }
            }
            at += PBUFSIZE;
        }
    }
}
