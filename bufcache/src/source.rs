//! What every tool is given as an image, opened: `SOURCE[:PART]`, where
//! SOURCE is an image file or block device path, or an NBD URI
//! (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`), and
//! PART names a partition of a whole disk, `sN[x]` in DragonFly's names
//! (`s1d`: partition d of the disklabel64 in slice 1) or `pN[x]` in
//! Linux's (`p2`), see `partition`. (`@LABEL` for the PFS comes after
//! this and is split off first, by `hammer2::pfsops::split_image_spec`.)
//!
//! A path that names an existing file is the image whole, whatever it
//! contains (`disk:s1` is a file of that name if there is one); an NBD
//! export name with a `:` or `@` is percent-encoded in its URI.
//!
//! Without PART, `open` takes the whole disk when it holds a HAMMER2
//! volume header at its start, and otherwise the one partition that
//! does (`Pick::Auto`): none, or more than one, is an error that lists
//! what there is. mkfs (`Pick::Whole`) takes what it is named: the disk
//! whole, or the partition.
//!
//! `Opened::backing` is what the image locks (`imagelock`) take: the
//! bytes of the file or disk behind the name, narrowed to the partition
//! (so two partitions of one image lock apart, and a loop device with
//! the partition's offset names the same bytes). An NBD export has no
//! local bytes to lock; its locks are on a file named after the export
//! in `NBD_LOCK_DIR` (sparse, sized as the export), over the same
//! ranges, so two tools on this machine agree about one export however
//! its URI was spelled. They cannot see writers on other machines: NBD
//! servers that take one client at a time (qemu-nbd without `--shared`)
//! are what keeps those out.

use crate::backing::{self, Backing};
use crate::device::{BlockDevice, FileDevice};
use crate::nbd::{self, NbdDevice, NbdUri};
use crate::partition::{self, Partition, RangeDevice, Selector, Table};
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the lock files of NBD exports are.
pub const NBD_LOCK_DIR: &str = "/run/hammer2/nbd";

/// Where the bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// An image file or block device.
    Path(PathBuf),
    /// An NBD export.
    Nbd(NbdUri),
}

/// A parsed `SOURCE[:PART]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub location: Location,
    pub part: Option<Selector>,
    /// As given.
    pub text: String,
}

impl Spec {
    /// Parse `text`. A path naming an existing file (`exists`) is whole;
    /// otherwise a trailing `:sN[x]` or `:pN[x]` names a partition.
    pub fn parse(text: &str, exists: impl Fn(&Path) -> bool) -> Result<Spec, String> {
        let (source, part) = match text.rsplit_once(':') {
            Some((s, p)) if !s.is_empty() && !exists(Path::new(text)) => match Selector::parse(p) {
                Some(sel) => (s, Some(sel)),
                None => (text, None),
            },
            _ => (text, None),
        };
        let location = match nbd::is_uri(source) {
            true => Location::Nbd(NbdUri::parse(source)?),
            false => Location::Path(PathBuf::from(source)),
        };
        Ok(Spec {
            location,
            part,
            text: text.to_string(),
        })
    }

    /// Is it an NBD export (or a partition of one)?
    pub fn is_nbd(&self) -> bool {
        matches!(self.location, Location::Nbd(_))
    }

    /// The source without the partition, as given.
    pub fn source_text(&self) -> String {
        match &self.location {
            Location::Path(p) => p.display().to_string(),
            Location::Nbd(u) => u.text.clone(),
        }
    }
}

/// Which part of a disk a tool works on when no partition is named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// The disk whole if it is a HAMMER2 volume, else the one partition
    /// that holds one.
    Auto,
    /// The disk whole (mkfs).
    Whole,
}

/// An image opened: the device of the volume's bytes and what to lock.
pub struct Opened {
    /// The volume's bytes (a partition's range of the disk, or all of it).
    pub dev: Arc<dyn BlockDevice>,
    pub spec: Spec,
    /// What messages call it: the spec as given, with the partition
    /// found by itself added (`disk.img:s1d`).
    pub name: String,
    /// The bytes to lock (see the module comment).
    pub backing: Backing,
    /// The block device named whole, which a writer opens exclusively.
    pub claim: Option<PathBuf>,
    /// The partition used, if one is; and the disk's table.
    pub partition: Option<Partition>,
    pub table: Option<Table>,
    /// The NBD device under `dev`, for an export.
    pub nbd: Option<Arc<NbdDevice>>,
    /// Opened read-write.
    pub writable: bool,
    /// An image file or block device opened for direct I/O
    /// (`open_for_mount`; `FileDevice::open_direct`).
    pub direct: bool,
}

impl Opened {
    /// The image file or block device that holds the bytes (for a loop
    /// device over them), with the range: `None` for an NBD export.
    pub fn local_range(&self) -> Option<(PathBuf, u64, Option<u64>)> {
        match &self.spec.location {
            Location::Path(p) => Some((
                p.clone(),
                self.partition.as_ref().map_or(0, |x| x.start),
                self.partition.as_ref().map(|x| x.size),
            )),
            Location::Nbd(_) => None,
        }
    }
}

fn ctx(name: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{name}: {e}"))
}

fn other(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Human sizes for partition lists.
pub fn human(bytes: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    match i {
        0 => format!("{bytes} B"),
        _ => format!("{v:.1} {}", U[i]),
    }
}

/// "s1 (MBR 0x83 Linux, 1.0 GiB), s2 (...)".
pub fn list_partitions(t: &Table) -> String {
    if t.partitions.is_empty() {
        return "none".into();
    }
    t.partitions
        .iter()
        .map(|p| format!("{} ({}, {})", p.dfly, p.type_name(), human(p.size)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The directory of NBD lock files: `NBD_LOCK_DIR`, or for a user who
/// cannot create it, one of their own under the temporary directory.
fn nbd_lock_dir() -> io::Result<PathBuf> {
    match fs::create_dir_all(NBD_LOCK_DIR) {
        Ok(()) => Ok(PathBuf::from(NBD_LOCK_DIR)),
        Err(_) => {
            // Not root: a directory per user (/proc/self belongs to us).
            let uid = fs::metadata("/proc/self").map_or(0, |m| m.uid());
            let d = std::env::temp_dir().join(format!("hammer2-nbd-{uid}"));
            fs::create_dir_all(&d)?;
            Ok(d)
        }
    }
}

/// Where the lock file of an NBD export is (named after its
/// `NbdUri::key`, so every spelling of one export shares it).
pub fn nbd_lock_path(uri: &NbdUri) -> io::Result<PathBuf> {
    let key = uri.key();
    let mut name: String = key
        .chars()
        .map(|c| match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '.' | '-' | '_' => c.to_string(),
            c => format!("%{:02X}", c as u32 & 0xff),
        })
        .collect();
    if name.len() > 200 {
        let h = blake3::hash(key.as_bytes()).to_hex();
        name = format!("{}-{}", &name[..100], &h[..32]);
    }
    Ok(nbd_lock_dir()?.join(name))
}

/// The lock file of an NBD export (created, sparse, at least `size`
/// bytes, so that a loop device over it can stand for the export).
pub fn nbd_lock_file(uri: &NbdUri, size: u64) -> io::Result<PathBuf> {
    let path = nbd_lock_path(uri)?;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    if f.metadata()?.len() < size {
        f.set_len(size)?;
    }
    Ok(path)
}

/// The Backing (lock target) of bytes `range` of an NBD export.
fn nbd_backing(
    uri: &NbdUri,
    name: &str,
    size: u64,
    range: Option<(u64, u64)>,
) -> io::Result<Backing> {
    let data = nbd_lock_file(uri, size)?;
    let meta = fs::metadata(&data)?;
    Ok(Backing {
        named: PathBuf::from(name),
        data,
        dev: meta.dev(),
        ino: meta.ino(),
        start: range.map_or(0, |r| r.0),
        end: range.map(|r| r.0 + r.1),
        via: Vec::new(),
        block_device: false,
    })
}

/// Open `text` (see the module comment), read-only or read-write.
/// `is_hammer2` says whether a device holds a HAMMER2 volume (the
/// caller's test: this crate knows no format).
pub fn open(
    text: &str,
    writable: bool,
    pick: Pick,
    is_hammer2: &dyn Fn(&dyn BlockDevice) -> bool,
) -> io::Result<Opened> {
    let spec = Spec::parse(text, |p| p.exists()).map_err(other)?;
    open_spec(spec, writable, pick, is_hammer2)
}

/// `open` for a mount: an image file or block device is opened for
/// direct I/O where its file system allows (`FileDevice::open_direct`),
/// as the mount's buffer cache holds what it reads.
pub fn open_for_mount(
    text: &str,
    writable: bool,
    pick: Pick,
    is_hammer2: &dyn Fn(&dyn BlockDevice) -> bool,
) -> io::Result<Opened> {
    let spec = Spec::parse(text, |p| p.exists()).map_err(other)?;
    open_spec_with(spec, writable, pick, is_hammer2, true)
}

/// `open` of a parsed spec.
pub fn open_spec(
    spec: Spec,
    writable: bool,
    pick: Pick,
    is_hammer2: &dyn Fn(&dyn BlockDevice) -> bool,
) -> io::Result<Opened> {
    open_spec_with(spec, writable, pick, is_hammer2, false)
}

/// `open_spec`, with an image file or block device opened for direct
/// I/O where it allows (`direct`).
fn open_spec_with(
    spec: Spec,
    writable: bool,
    pick: Pick,
    is_hammer2: &dyn Fn(&dyn BlockDevice) -> bool,
    direct: bool,
) -> io::Result<Opened> {
    let src = spec.source_text();
    let mut is_direct = false;
    let (whole, nbd): (Arc<dyn BlockDevice>, Option<Arc<NbdDevice>>) = match &spec.location {
        Location::Path(p) => {
            let dev = match direct {
                true => FileDevice::open_direct(p, writable),
                false => FileDevice::open(p, writable),
            }
            .map_err(|e| ctx(&src, e))?;
            is_direct = dev.is_direct();
            (Arc::new(dev), None)
        }
        Location::Nbd(u) => {
            let d = Arc::new(NbdDevice::open(u, writable)?);
            (d.clone(), Some(d))
        }
    };
    let (partition, table) = choose(&spec, &src, &whole, pick, is_hammer2)?;
    let name = match (&partition, spec.part) {
        (Some(p), None) => format!("{src}:{}", p.dfly),
        _ => spec.text.clone(),
    };
    let dev: Arc<dyn BlockDevice> = match &partition {
        Some(p) => Arc::new(RangeDevice::new(whole.clone(), p.start, p.size)?),
        None => whole.clone(),
    };
    let range = partition.as_ref().map(|p| (p.start, p.size));
    let (backing, claim) = match &spec.location {
        Location::Path(p) => {
            let mut b = backing::resolve(p).map_err(|e| ctx(&src, e))?;
            if let Some((start, size)) = range {
                b.narrow(start, Some(size))?;
            }
            b.named = PathBuf::from(&name);
            let claim = (b.block_device && partition.is_none()).then(|| p.clone());
            (b, claim)
        }
        Location::Nbd(u) => (nbd_backing(u, &name, whole.size_bytes(), range)?, None),
    };
    Ok(Opened {
        dev,
        spec,
        name,
        backing,
        claim,
        partition,
        table,
        nbd,
        writable,
        direct: is_direct,
    })
}

/// The partition to use, if any, and the disk's table.
fn choose(
    spec: &Spec,
    src: &str,
    whole: &Arc<dyn BlockDevice>,
    pick: Pick,
    is_hammer2: &dyn Fn(&dyn BlockDevice) -> bool,
) -> io::Result<(Option<Partition>, Option<Table>)> {
    if spec.part.is_none() && (pick == Pick::Whole || is_hammer2(whole.as_ref())) {
        return Ok((None, None));
    }
    let table = partition::read_table(whole.as_ref()).map_err(|e| ctx(src, e))?;
    let Some(sel) = spec.part else {
        let Some(t) = table else {
            // Not partitioned: the caller's open says what it is not.
            return Ok((None, None));
        };
        let found: Vec<&Partition> = t
            .partitions
            .iter()
            .filter(|p| {
                RangeDevice::new(whole.clone(), p.start, p.size)
                    .map(|r| is_hammer2(&r))
                    .unwrap_or(false)
            })
            .collect();
        return match found.as_slice() {
            [one] => Ok((Some((*one).clone()), Some(t.clone()))),
            [] => Err(other(format!(
                "{src} holds no HAMMER2 volume: it has a {} partition table, and no partition \
                 holds one (partitions: {}); name one as {src}:sN[x] or {src}:pN[x] to use it \
                 anyway",
                t.scheme,
                list_partitions(&t)
            ))),
            many => Err(other(format!(
                "{src} has {} partitions holding HAMMER2 volumes ({}): name one, as {src}:{}",
                many.len(),
                many.iter()
                    .map(|p| p.dfly.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                many[0].dfly
            ))),
        };
    };
    let Some(t) = table else {
        return Err(other(format!(
            "{}: {src} has no partition table (MBR or GPT) to find {sel} in",
            spec.text
        )));
    };
    match t.partitions.iter().find(|p| p.matches(&sel)) {
        Some(p) => Ok((Some(p.clone()), Some(t.clone()))),
        None => Err(other(format!(
            "{}: {src} has no partition {sel}; its {} partitions: {}{}",
            spec.text,
            t.scheme,
            list_partitions(&t),
            if t.problems.is_empty() {
                String::new()
            } else {
                format!(" ({})", t.problems.join("; "))
            }
        ))),
    }
}

/// The bytes a mount source names (what /proc/mounts shows for a plain
/// `fuse.hammer2` mount): a path, `PATH:PART` (the table is read to find
/// the range), or an NBD URI (its lock file, whole: no connection is
/// made to find a partition's range).
fn backing_of_source(text: &str) -> Option<Backing> {
    let spec = Spec::parse(text, |p| p.exists()).ok()?;
    match (&spec.location, spec.part) {
        (Location::Path(p), None) => backing::resolve(p).ok(),
        (Location::Path(p), Some(sel)) => {
            let dev = FileDevice::open(p, false).ok()?;
            let t = partition::read_table(&dev).ok()??;
            let part = t.partitions.iter().find(|x| x.matches(&sel))?;
            let mut b = backing::resolve(p).ok()?;
            b.narrow(part.start, Some(part.size)).ok()?;
            Some(b)
        }
        (Location::Nbd(u), _) => nbd_backing(u, text, 0, None).ok(),
    }
}

/// A `mount.hammer2` mount in this mount namespace (a line of
/// /proc/self/mountinfo of type `fuseblk.hammer2` or `fuse.hammer2`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hammer2Mount {
    pub mountpoint: PathBuf,
    /// The superblock's device number (MAJ:MIN): one per filesystem,
    /// shared by its bind mounts; for `fuseblk.hammer2` the block device.
    pub dev: u64,
    /// The directory of the filesystem mounted here: `/`, but for a bind
    /// mount of a directory in it.
    pub root: String,
    /// This mount point's own read-write flag (a bind mount may be
    /// read-only over a read-write filesystem).
    pub read_write: bool,
    /// The filesystem (superblock) is read-write.
    pub fs_read_write: bool,
    pub fstype: String,
    pub source: String,
}

impl Hammer2Mount {
    /// The bytes its image is: by the block device for `fuseblk.hammer2`,
    /// by the source for `fuse.hammer2` (`None` if that no longer names
    /// the image, as with `fsname=`).
    pub fn backing(&self) -> Option<Backing> {
        match self.fstype.as_str() {
            "fuseblk.hammer2" => {
                let node = backing::sysfs_dir(self.dev)
                    .ok()
                    .and_then(|s| backing::dev_node(&s, self.dev));
                let node = node.unwrap_or_else(|| PathBuf::from(&self.source));
                backing::resolve_block(&node, self.dev, 0).ok()
            }
            _ => backing_of_source(&self.source),
        }
    }
}

/// The `mount.hammer2` mounts in this mount namespace, oldest first.
pub fn hammer2_mounts() -> Vec<Hammer2Mount> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines().filter_map(parse_mountinfo_line).collect()
}

/// One line of mountinfo, if it is a `mount.hammer2` mount: "ID PARENT
/// MAJ:MIN ROOT MOUNTPOINT OPTIONS [TAGS...] - TYPE SOURCE SUPEROPTIONS".
fn parse_mountinfo_line(line: &str) -> Option<Hammer2Mount> {
    let (left, right) = line.split_once(" - ")?;
    let left: Vec<&str> = left.split(' ').collect();
    let mut right = right.split(' ');
    let (fstype, source, superopts) = (right.next()?, right.next()?, right.next()?);
    if fstype != "fuseblk.hammer2" && fstype != "fuse.hammer2" {
        return None;
    }
    let (a, m) = left.get(2)?.split_once(':')?;
    let rw = |opts: &str| opts.split(',').next() == Some("rw");
    Some(Hammer2Mount {
        mountpoint: PathBuf::from(unescape(left.get(4)?)),
        dev: libc::makedev(a.parse().ok()?, m.parse().ok()?),
        root: unescape(left.get(3)?),
        read_write: rw(left.get(5)?),
        fs_read_write: rw(superopts),
        fstype: fstype.to_string(),
        source: unescape(source),
    })
}

/// The mountpoint of a `mount.hammer2` mount (over a block device,
/// `fuseblk.hammer2`, or plain `fuse.hammer2`), read-write or read-only
/// as `read_write` asks, whose image shares bytes with `b`, if one is in
/// this mount namespace. A plain mount named with `fsname=` cannot be
/// matched; one of an NBD export matches any range of that export.
pub fn mounted_on(b: &Backing, read_write: bool) -> Option<PathBuf> {
    hammer2_mounts().into_iter().find_map(|m| {
        (m.read_write == read_write && m.backing()?.overlaps(b)).then_some(m.mountpoint)
    })
}

/// Undo mountinfo's octal escapes (space, tab, newline, backslash).
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::Transport;

    #[test]
    fn mountinfo_lines_of_hammer2_mounts() {
        let l = "36 25 7:3 / /mnt/a\\040b ro,nosuid shared:1 - fuseblk.hammer2 /dev/loop3 \
                 rw,user_id=0,group_id=0,blksize=4096";
        let m = parse_mountinfo_line(l).unwrap();
        assert_eq!(m.mountpoint, PathBuf::from("/mnt/a b"));
        assert_eq!(m.dev, libc::makedev(7, 3));
        assert_eq!(m.root, "/");
        assert!(!m.read_write);
        assert!(m.fs_read_write);
        assert_eq!(
            (m.fstype.as_str(), m.source.as_str()),
            ("fuseblk.hammer2", "/dev/loop3")
        );
        let l = "40 25 0:52 /sub /b rw - fuse.hammer2 /x.img ro,user_id=0";
        let m = parse_mountinfo_line(l).unwrap();
        assert_eq!(
            (m.root.as_str(), m.read_write, m.fs_read_write),
            ("/sub", true, false)
        );
        assert!(parse_mountinfo_line("41 25 0:53 / /c rw - ext4 /dev/sda1 rw").is_none());
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape("/mnt/a\\040b\\011c\\134d"), "/mnt/a b\tc\\d");
        assert_eq!(unescape("/plain\\04"), "/plain\\04");
    }

    #[test]
    fn specs() {
        let none = |_: &Path| false;
        let s = Spec::parse("disk.img:s1d", none).unwrap();
        assert_eq!(s.location, Location::Path("disk.img".into()));
        assert_eq!(s.part.unwrap().to_string(), "s1d");
        let s = Spec::parse("disk.img", none).unwrap();
        assert_eq!(s.part, None);
        // Not a selector: part of the name.
        let s = Spec::parse("/a:b/disk.img", none).unwrap();
        assert_eq!(s.location, Location::Path("/a:b/disk.img".into()));
        let s = Spec::parse("disk:x1", none).unwrap();
        assert_eq!(s.part, None);
        // An existing file is whole.
        let s = Spec::parse("disk:s1", |p| p == Path::new("disk:s1")).unwrap();
        assert_eq!(
            (s.location, s.part),
            (Location::Path("disk:s1".into()), None)
        );
        let s = Spec::parse("nbd+unix:///x?socket=/run/s.sock:p2", none).unwrap();
        match &s.location {
            Location::Nbd(u) => {
                assert_eq!(u.export, "x");
                assert_eq!(
                    u.transport,
                    Transport::Unix {
                        socket: "/run/s.sock".into()
                    }
                );
            }
            l => panic!("{l:?}"),
        }
        assert_eq!(s.part.unwrap().to_string(), "p2");
        let s = Spec::parse("nbd://h:10809/e", none).unwrap();
        assert!(s.is_nbd() && s.part.is_none());
        assert!(Spec::parse("nbds://h/e", none).is_err());
    }
}
