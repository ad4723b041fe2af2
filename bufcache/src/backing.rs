//! Where an image's bytes live, whatever name it was given: an image file
//! named by its path, the same file through a loop device (`losetup -f
//! IMG`, with or without `-o OFFSET` and `--sizelimit`), a partition of a
//! loop device (`losetup -P`: `loop0p1`), a block device, or a partition
//! of one. Each resolves to the regular file or whole block device that
//! holds the bytes and the byte range of it, so that the image locks
//! (`imagelock`) follow the data and not the path: two names for the same
//! bytes take the same lock.
//!
//! Everything comes from stat(2) and sysfs (`/sys/dev/block/MAJ:MIN`:
//! `partition`, `start` and `size` in 512-byte sectors; a loop device's
//! `loop/backing_file`, `loop/offset` and `loop/sizelimit`), so nothing
//! here needs a device opened. A loop device's `backing_file` is the
//! backing file's current path (the kernel prints it from the open file,
//! so a rename shows); one whose backing file was deleted cannot be
//! resolved (nothing else can name that file either).
//!
//! Also here: the loop devices whose bytes overlap a range (`loops_over`)
//! and the exclusive open of a block device (`claim`), which the kernel
//! refuses while a filesystem is mounted on it (including a fuseblk
//! mount) or another program holds it exclusively. (Which mount shows
//! some bytes is `source::mounted_on`, since a mount's source may be a
//! partition or an NBD export.)

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Loop devices over loop devices are followed this deep at most.
const MAX_DEPTH: usize = 8;

/// sysfs gives partition offsets and sizes in these units.
const SECTOR: u64 = 512;

/// The regular file or whole block device holding an image's bytes, and
/// which bytes of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backing {
    /// The path named.
    pub named: PathBuf,
    /// The regular file or whole block device the bytes are in.
    pub data: PathBuf,
    /// `data`'s device and inode numbers: its identity.
    pub dev: u64,
    pub ino: u64,
    /// The first byte of the image in `data`.
    pub start: u64,
    /// The end of the image in `data` (exclusive); `None`: to its end.
    pub end: Option<u64>,
    /// The block devices passed on the way (loop devices, partitions), in
    /// order, starting with the one named.
    pub via: Vec<PathBuf>,
    /// The name is a block device.
    pub block_device: bool,
}

impl Backing {
    /// Do `self` and `other` share any byte?
    pub fn overlaps(&self, other: &Backing) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
            && other.end.is_none_or(|e| self.start < e)
            && self.end.is_none_or(|e| other.start < e)
    }

    /// "IMG", or "/dev/loop0 (IMG)" when the name is another name for
    /// bytes of a file or device.
    pub fn describe(&self) -> String {
        if self.via.is_empty() {
            return self.named.display().to_string();
        }
        let mut s = format!("{} ({}", self.named.display(), self.data.display());
        if self.start > 0 || self.end.is_some() {
            match self.end {
                Some(e) => s.push_str(&format!(", bytes {}..{e}", self.start)),
                None => s.push_str(&format!(", from byte {}", self.start)),
            }
        }
        s.push(')');
        s
    }
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Resolve `path` (see the module comment).
pub fn resolve(path: &Path) -> io::Result<Backing> {
    let meta = fs::metadata(path)?;
    if meta.is_file() {
        return Ok(Backing {
            named: path.to_path_buf(),
            data: path.canonicalize()?,
            dev: meta.dev(),
            ino: meta.ino(),
            start: 0,
            end: None,
            via: Vec::new(),
            block_device: false,
        });
    }
    if !meta.file_type().is_block_device() {
        return Err(bad(format!(
            "{} is neither a regular file nor a block device",
            path.display()
        )));
    }
    let mut b = resolve_block(path, meta.rdev(), 0)?;
    b.named = path.to_path_buf();
    b.block_device = true;
    Ok(b)
}

/// The block device `rdev` (named `node`), from sysfs.
pub(crate) fn resolve_block(node: &Path, rdev: u64, depth: usize) -> io::Result<Backing> {
    if depth > MAX_DEPTH {
        return Err(bad(format!(
            "{}: loop devices nested more than {MAX_DEPTH} deep",
            node.display()
        )));
    }
    let sys = sysfs_dir(rdev)?;
    if sys.join("partition").exists() {
        // A partition: a range of its whole disk (the parent directory).
        let start = read_u64(&sys.join("start"))?
            .checked_mul(SECTOR)
            .ok_or_else(|| bad(format!("{}: partition start out of range", sys.display())))?;
        let size = read_u64(&sys.join("size"))?
            .checked_mul(SECTOR)
            .ok_or_else(|| bad(format!("{}: partition size out of range", sys.display())))?;
        let disk = sys
            .parent()
            .ok_or_else(|| bad(format!("{}: no parent disk", sys.display())))?;
        let disk_rdev = read_devno(&disk.join("dev"))?;
        let disk_node = dev_node(disk, disk_rdev).unwrap_or_else(|| node.to_path_buf());
        let mut b = resolve_block(&disk_node, disk_rdev, depth + 1)?;
        b.narrow(start, Some(size))?;
        b.via.insert(0, node.to_path_buf());
        return Ok(b);
    }
    let lo = sys.join("loop");
    if lo.join("backing_file").exists() {
        let file = fs::read_to_string(lo.join("backing_file"))?;
        let file = file.trim_end_matches('\n');
        if file.ends_with(" (deleted)") {
            return Err(bad(format!(
                "{}: its backing file {file} was deleted",
                node.display()
            )));
        }
        let offset = read_u64(&lo.join("offset"))?;
        let sizelimit = read_u64(&lo.join("sizelimit"))?;
        let file = PathBuf::from(file);
        let meta = fs::metadata(&file)?;
        let mut b = if meta.file_type().is_block_device() {
            resolve_block(&file, meta.rdev(), depth + 1)?
        } else {
            Backing {
                named: file.clone(),
                data: file,
                dev: meta.dev(),
                ino: meta.ino(),
                start: 0,
                end: None,
                via: Vec::new(),
                block_device: false,
            }
        };
        b.narrow(offset, (sizelimit > 0).then_some(sizelimit))?;
        b.via.insert(0, node.to_path_buf());
        return Ok(b);
    }
    // Any other block device holds its own bytes. Its /dev node, if it is
    // this device, is the name every tool uses; else the one given.
    let data = dev_node(&sys, rdev).unwrap_or_else(|| node.to_path_buf());
    let meta = fs::metadata(&data)?;
    Ok(Backing {
        named: node.to_path_buf(),
        via: if data == node {
            Vec::new()
        } else {
            vec![node.to_path_buf()]
        },
        data,
        dev: meta.dev(),
        ino: meta.ino(),
        start: 0,
        end: None,
        block_device: true,
    })
}

impl Backing {
    /// Keep `len` bytes (all, if `None`) from `offset` of the current range.
    pub fn narrow(&mut self, offset: u64, len: Option<u64>) -> io::Result<()> {
        let overflow = || bad(format!("{}: range out of bounds", self.data.display()));
        let start = self.start.checked_add(offset).ok_or_else(overflow)?;
        let end = match len {
            Some(l) => Some(start.checked_add(l).ok_or_else(overflow)?),
            None => None,
        };
        self.end = match (end, self.end) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.start = start;
        Ok(())
    }
}

/// `/sys/dev/block/MAJ:MIN`, resolved (e.g. /sys/devices/virtual/block/
/// loop0/loop0p1).
pub(crate) fn sysfs_dir(rdev: u64) -> io::Result<PathBuf> {
    let link = PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    ));
    link.canonicalize()
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", link.display())))
}

fn read_u64(p: &Path) -> io::Result<u64> {
    let s = fs::read_to_string(p)?;
    s.trim()
        .parse()
        .map_err(|_| bad(format!("{}: not a number: {s:?}", p.display())))
}

/// A `MAJ:MIN` file as a device number.
fn read_devno(p: &Path) -> io::Result<u64> {
    let s = fs::read_to_string(p)?;
    let parse = || {
        let (a, b) = s.trim().split_once(':')?;
        Some(libc::makedev(a.parse().ok()?, b.parse().ok()?))
    };
    parse().ok_or_else(|| bad(format!("{}: not MAJ:MIN: {s:?}", p.display())))
}

/// `/dev/DEVNAME` of the device whose sysfs directory is `sys`, if that
/// node is this device.
pub(crate) fn dev_node(sys: &Path, rdev: u64) -> Option<PathBuf> {
    let uevent = fs::read_to_string(sys.join("uevent")).ok()?;
    let name = uevent.lines().find_map(|l| l.strip_prefix("DEVNAME="))?;
    let node = Path::new("/dev").join(name);
    let m = fs::metadata(&node).ok()?;
    (m.file_type().is_block_device() && m.rdev() == rdev).then_some(node)
}

/// Every loop device whose bytes overlap `b`'s (the ones `b` was named
/// through included), as its /dev path.
pub fn loops_over(b: &Backing) -> Vec<PathBuf> {
    let Ok(dir) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = dir
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter(|e| e.path().join("loop/backing_file").exists())
        .filter_map(|e| {
            let rdev = read_devno(&e.path().join("dev")).ok()?;
            let node = dev_node(&e.path(), rdev)?;
            let other = resolve_block(&node, rdev, 0).ok()?;
            other.overlaps(b).then_some(node)
        })
        .collect();
    v.sort();
    v
}

/// Open the block device `dev` exclusively (O_EXCL; read-write if
/// `write`). The kernel refuses with EBUSY while a filesystem is mounted
/// on it, or on a partition of it, or another program holds it so (mkfs,
/// a device mapper table, a fuseblk mount). Held while the file is open.
pub fn claim(dev: &Path, write: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_EXCL)
        .open(dev)
}

/// Is the block device `dev` held exclusively by anyone (see `claim`)?
/// Errors other than EBUSY (the device went away) read as free.
pub fn claimed(dev: &Path) -> bool {
    matches!(claim(dev, false), Err(e) if e.raw_os_error() == Some(libc::EBUSY))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(dev: u64, ino: u64, start: u64, end: Option<u64>) -> Backing {
        Backing {
            named: PathBuf::from("x"),
            data: PathBuf::from("x"),
            dev,
            ino,
            start,
            end,
            via: Vec::new(),
            block_device: false,
        }
    }

    #[test]
    fn ranges_overlap_only_on_the_same_file_and_shared_bytes() {
        let whole = b(1, 2, 0, None);
        assert!(whole.overlaps(&b(1, 2, 1 << 40, None)));
        assert!(!whole.overlaps(&b(1, 3, 0, None)));
        assert!(!whole.overlaps(&b(2, 2, 0, None)));
        let first = b(1, 2, 0, Some(100));
        let second = b(1, 2, 100, Some(200));
        assert!(!first.overlaps(&second) && !second.overlaps(&first));
        assert!(first.overlaps(&b(1, 2, 99, Some(100))));
        assert!(second.overlaps(&b(1, 2, 150, None)));
        assert!(!first.overlaps(&b(1, 2, 100, None)));
    }

    #[test]
    fn narrowing_composes_offsets_and_limits() {
        let mut x = b(1, 2, 0, None);
        x.narrow(1 << 20, None).unwrap();
        assert_eq!((x.start, x.end), (1 << 20, None));
        x.narrow(4096, Some(8192)).unwrap();
        assert_eq!(
            (x.start, x.end),
            ((1 << 20) + 4096, Some((1 << 20) + 4096 + 8192))
        );
        // A partition reaching past the loop's size limit stops at it.
        let mut y = b(1, 2, 0, Some(1000));
        y.narrow(500, Some(1000)).unwrap();
        assert_eq!((y.start, y.end), (500, Some(1000)));
        assert!(b(1, 2, u64::MAX, None).narrow(1, None).is_err());
    }

    #[test]
    fn a_regular_file_is_its_own_backing() {
        let p = std::env::temp_dir().join(format!("backing-{}", std::process::id()));
        fs::write(&p, b"image").unwrap();
        let r = resolve(&p).unwrap();
        let m = fs::metadata(&p).unwrap();
        assert_eq!((r.dev, r.ino, r.start, r.end), (m.dev(), m.ino(), 0, None));
        assert!(!r.block_device && r.via.is_empty());
        assert_eq!(r.describe(), p.display().to_string());
        assert!(resolve(Path::new("/dev/null")).is_err());
        fs::remove_file(&p).unwrap();
    }
}
