//! newfs: lay down an empty HAMMER2 filesystem, exactly as DragonFly's
//! `newfs_hammer2` does (single volume, format version 1 or 2).
//!
//! What newfs leaves on the device, in the order it writes it:
//!
//! ```text
//! 0        4 MiB        boot_end       aux_end
//! [resv seg][boot area  ][aux area    ][sroot][LOCAL][DATA]...
//!  |  zeroed   zeroed       zeroed       one 64 KiB block of inodes
//!  +-- volume header at 0, and at 2, 4, 6 GiB where they fit
//! ```
//!
//! - the last 64 KiB of the filesystem is written (zeros) first, to prove
//!   the device is that large;
//! - the reserved segment of the first zone and the boot and aux areas
//!   read back as zeros;
//! - one 64 KiB block right after the aux area holds the super-root inode
//!   (inum 0, "SUPROOT") and one PFS root inode per label (inum 1, MASTER,
//!   mode 0755), `LOCAL` always first. The super-root's blockset holds the
//!   PFS roots' INODE blockrefs, sorted by key (the dirhash of the label);
//! - the volume header, identical in every copy, points at the super-root;
//!   its freemap blockset is **empty**: newfs writes no freemap. The
//!   kernel builds it on first mount from `allocator_beg`, which is the
//!   first byte after the inodes;
//! - every blockref and the header carry transaction id 16.
//!
//! Architecture invariant: nothing here reads the device except to verify
//! what it wrote (and to skip rewriting zeros). Time and UUID randomness
//! come from the options when given, so a seeded run is reproducible.
//!
//! Deliberate differences from DragonFly (see `NewfsOptions::validate`):
//! duplicate labels are refused (DragonFly would file two PFS roots under
//! one key), and boot plus aux areas that end past the first 1 GiB are an
//! error rather than a failed assertion.

use bufcache::BlockDevice;
use hammer2::check::{set_check, verify};
use hammer2::dirhash::dirhash;
use hammer2::disk::uuid::FSTYPE_HAMMER2;
use hammer2::disk::{
    check_method, comp_method, enc_methods, pfs_type, volhdr_count, Blockref, BlockrefType,
    DataOff, InodeData, ObjType, Uuid, VolumeHeader, AUX_MAX_BYTES, AUX_MIN_BYTES, AUX_NOM_BYTES,
    BOOT_MAX_BYTES, BOOT_MIN_BYTES, BOOT_NOM_BYTES, BREF_FLAG_PFSROOT, COPYID_LOCAL,
    FREEMAP_LEVEL1_RADIX, INODE_BYTES, INODE_MAXNAME, MAX_VOLUMES, NUM_VOLHDRS, OPFLAG_PFSROOT,
    PBUFSIZE, SET_COUNT, VOLUME_ALIGN, VOL_VERSION_DEFAULT, VOL_VERSION_MIN,
    VOL_VERSION_MULTI_VOLUMES, VOL_VERSION_WIP, ZONE_BYTES64, ZONE_SEG,
};
use rand::{RngCore, SeedableRng};
use std::fmt;
use std::io;

/// Smallest filesystem size `-s` accepts: one freemap level-1 zone (1 GiB).
/// A device given without `-s` may be smaller, as long as the reserved
/// segment, boot and aux areas leave free space (24 MiB at the least).
pub const FS_SIZE_MIN: u64 = 1 << FREEMAP_LEVEL1_RADIX;
/// Sizes given to newfs (`-s`, `-b`, `-r`) are multiples of this (8 MiB).
pub const NEWFS_ALIGN: u64 = VOLUME_ALIGN;
/// newfs stamps every blockref and the volume header with this tid.
pub const NEWFS_TID: u64 = 16;
/// The `pfs_inum` newfs leaves in a PFS root (the kernel's allocator
/// starts new inodes at `INODE_START` regardless).
pub const NEWFS_PFS_INUM: u64 = 16;
/// The PFS newfs always creates.
pub const LABEL_LOCAL: &str = "LOCAL";
/// The PFS newfs creates when no label is given.
pub const LABEL_DATA: &str = "DATA";
/// PFS roots fit in the super-root's blockset: `LOCAL` plus three.
pub const LABELS_MAX: usize = SET_COUNT;
/// `peer_type` of a volume header: DMSG_PEER_HAMMER2.
const PEER_HAMMER2: u8 = 3;
/// Bytes zeroed per device read/compare/write step.
const ZERO_STEP: u64 = 16 * PBUFSIZE;

/// What to make. `Default` is `newfs_hammer2` with no options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewfsOptions {
    /// Format version: 1, or 2 (the default, "MULTI_VOLUMES").
    pub version: u32,
    /// PFSs to create besides `LOCAL` (which is always first). DragonFly's
    /// default is `DATA`; `-L none` makes this empty.
    pub labels: Vec<String>,
    /// Boot area size (`-b`); `None` sizes it from the filesystem.
    pub boot_area_bytes: Option<u64>,
    /// Aux area size (`-r`); `None` sizes it from the filesystem.
    pub aux_area_bytes: Option<u64>,
    /// Filesystem size (`-s`): at least 1 GiB, a multiple of 8 MiB, and
    /// capped at the device size. `None` uses the whole device.
    pub size_bytes: Option<u64>,
    /// `comp_algo` of the PFS roots (a BOOT PFS always gets autozero).
    pub comp_algo: u8,
    /// `check_algo` of the PFS roots.
    pub check_algo: u8,
    /// Inode times, microseconds since the epoch; `None` is now.
    pub now_us: Option<u64>,
    /// Seed for the UUIDs; `None` draws them from the OS.
    pub uuid_seed: Option<u64>,
}

impl Default for NewfsOptions {
    fn default() -> Self {
        NewfsOptions {
            version: VOL_VERSION_DEFAULT,
            labels: vec![LABEL_DATA.to_string()],
            boot_area_bytes: None,
            aux_area_bytes: None,
            size_bytes: None,
            comp_algo: comp_method::DEFAULT,
            check_algo: check_method::DEFAULT,
            now_us: None,
            uuid_seed: None,
        }
    }
}

/// Why newfs refused or failed.
#[derive(Debug)]
pub enum NewfsError {
    /// A device read or write failed.
    Io {
        op: &'static str,
        at: u64,
        source: io::Error,
    },
    /// An option is out of range.
    InvalidOption { what: String },
    /// `size_bytes` is below `FS_SIZE_MIN`.
    SizeTooSmall { size: u64, min: u64 },
    /// The device rounds down to nothing.
    DeviceTooSmall { device: u64 },
    /// The reserved segments, boot and aux areas leave no free space.
    NotEnoughSpace {
        total: u64,
        reserved: u64,
        boot: u64,
        aux: u64,
    },
    /// Boot and aux areas must end inside the first 1 GiB zone.
    AreasTooLarge { aux_end: u64 },
    /// What was written does not read back the same.
    ReadBack { what: String, at: u64 },
}

impl fmt::Display for NewfsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NewfsError::Io { op, at, source } => {
                write!(f, "I/O error on {op} at {at:#x}: {source}")
            }
            NewfsError::InvalidOption { what } => write!(f, "{what}"),
            NewfsError::SizeTooSmall { size, min } => write!(
                f,
                "filesystem size {} is too small, the minimum is {}",
                size_string(*size).trim(),
                size_string(*min).trim()
            ),
            NewfsError::DeviceTooSmall { device } => write!(
                f,
                "device of {device} bytes has an aligned size of 0 (it must hold at least {} MiB)",
                NEWFS_ALIGN >> 20
            ),
            NewfsError::NotEnoughSpace {
                total,
                reserved,
                boot,
                aux,
            } => write!(
                f,
                "not enough free space: {} leaves nothing after {} reserved, {} boot and {} aux",
                size_string(*total).trim(),
                size_string(*reserved).trim(),
                size_string(*boot).trim(),
                size_string(*aux).trim()
            ),
            NewfsError::AreasTooLarge { aux_end } => write!(
                f,
                "boot and aux areas end at {aux_end:#x}, past the first {} zone",
                size_string(FS_SIZE_MIN).trim()
            ),
            NewfsError::ReadBack { what, at } => {
                write!(f, "{what} at {at:#x} does not read back as written")
            }
        }
    }
}

impl std::error::Error for NewfsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NewfsError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, NewfsError>;

/// A size as DragonFly's `sizetostr` prints it: `%6.2f` and a unit.
pub fn size_string(bytes: u64) -> String {
    const K: f64 = 1024.0;
    let b = bytes as f64;
    if bytes < 1024 / 2 {
        format!("{b:6.2}B")
    } else if bytes < (1 << 20) / 2 {
        format!("{:6.2}KB", b / K)
    } else if bytes < (1 << 30) / 2 {
        format!("{:6.2}MB", b / (K * K))
    } else if bytes < (1 << 40) / 2 {
        format!("{:6.2}GB", b / (K * K * K))
    } else {
        format!("{:6.2}TB", b / (K * K * K * K))
    }
}

/// A size as `units::parse_size` reads it (`2G`, `64m`, `4096`), held to
/// newfs_hammer2's rules for `-s`, `-b` and `-r`: at least `min`, at most
/// `max`, a multiple of 8 MiB. (DragonFly insists on a suffix; a bare
/// number is taken here as bytes.)
pub fn parse_size_in(text: &str, min: u64, max: u64) -> std::result::Result<u64, String> {
    let v = crate::units::parse_size(text)?;
    if v < min {
        return Err(format!(
            "Value too small: {text}, min is {}",
            size_string(min).trim()
        ));
    }
    if v > max {
        return Err(format!(
            "Value too large: {text}, max is {}",
            size_string(max).trim()
        ));
    }
    if !v.is_multiple_of(NEWFS_ALIGN) {
        return Err(format!(
            "Value not an integral multiple of {}K: {text}",
            NEWFS_ALIGN / 1024
        ));
    }
    Ok(v)
}

impl NewfsOptions {
    /// Check the options that do not depend on the device.
    pub fn validate(&self) -> Result<()> {
        if !(VOL_VERSION_MIN..VOL_VERSION_WIP).contains(&self.version) {
            return Err(invalid(format!(
                "I don't understand how to format HAMMER2 version {} (use {}..={})",
                self.version,
                VOL_VERSION_MIN,
                VOL_VERSION_WIP - 1
            )));
        }
        if self.labels.len() + 1 > LABELS_MAX {
            return Err(invalid(format!("Limit of {} local labels", LABELS_MAX - 1)));
        }
        let mut seen: Vec<&str> = vec![LABEL_LOCAL];
        for label in &self.labels {
            if label.is_empty() {
                return Err(invalid("Volume label '' cannot be 0-length".into()));
            }
            if label.len() >= INODE_MAXNAME {
                return Err(invalid(format!(
                    "Volume label '{label}' is too long ({} chars max)",
                    INODE_MAXNAME - 1
                )));
            }
            if let Some(why) = hammer2::pfsops::label_problem(label) {
                return Err(invalid(format!("Volume label {label:?} {why}")));
            }
            if seen.contains(&label.as_str()) {
                return Err(invalid(format!(
                    "Volume label '{label}' given twice (LOCAL is always created)"
                )));
            }
            seen.push(label);
        }
        if let Some(size) = self.size_bytes {
            if size < FS_SIZE_MIN {
                return Err(NewfsError::SizeTooSmall {
                    size,
                    min: FS_SIZE_MIN,
                });
            }
            check_aligned("filesystem size", size)?;
        }
        for (what, area, max) in [
            ("boot area", self.boot_area_bytes, BOOT_MAX_BYTES),
            ("aux area", self.aux_area_bytes, AUX_MAX_BYTES),
        ] {
            if let Some(bytes) = area {
                if bytes > max {
                    return Err(invalid(format!(
                        "{what} of {} is too large, the maximum is {}",
                        size_string(bytes).trim(),
                        size_string(max).trim()
                    )));
                }
                check_aligned(what, bytes)?;
            }
        }
        if !matches!(
            self.comp_algo & 15,
            comp_method::NONE | comp_method::AUTOZERO | comp_method::LZ4 | comp_method::ZLIB
        ) {
            return Err(invalid(format!(
                "unknown compression method {}",
                self.comp_algo & 15
            )));
        }
        if !matches!(
            self.check_algo,
            check_method::NONE
                | check_method::DISABLED
                | check_method::ISCSI32
                | check_method::XXHASH64
                | check_method::SHA192
        ) {
            return Err(invalid(format!("unknown check method {}", self.check_algo)));
        }
        Ok(())
    }

    /// Every PFS label in creation order: `LOCAL`, then the others.
    pub fn all_labels(&self) -> Vec<&str> {
        std::iter::once(LABEL_LOCAL)
            .chain(self.labels.iter().map(String::as_str))
            .collect()
    }
}

fn invalid(what: String) -> NewfsError {
    NewfsError::InvalidOption { what }
}

fn check_aligned(what: &str, bytes: u64) -> Result<()> {
    if !bytes.is_multiple_of(NEWFS_ALIGN) {
        return Err(invalid(format!(
            "{what} of {bytes} bytes is not a multiple of {}K",
            NEWFS_ALIGN / 1024
        )));
    }
    Ok(())
}

/// Where everything goes on a volume of a given size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// `volu_size` (and `total_size`): 8 MiB aligned.
    pub total_size: u64,
    pub boot_beg: u64,
    pub boot_bytes: u64,
    pub aux_beg: u64,
    pub aux_bytes: u64,
    /// "topo-reserved": 4 MiB per started 1 GiB.
    pub reserved_bytes: u64,
    /// `allocator_size` and `allocator_free`.
    pub free_bytes: u64,
    /// The end of the aux area, where the inode block goes.
    pub inode_block_beg: u64,
    /// Volume header copies written (at `i * 2 GiB`).
    pub volhdr_count: usize,
}

/// newfs's boot/aux sizing: the nominal size halved until it is at most
/// 1/20 of the filesystem, at least the minimum; a requested size below
/// the minimum is raised to it. Rounded up to 8 MiB.
fn area_bytes(requested: Option<u64>, nominal: u64, min: u64, total: u64) -> u64 {
    let bytes = match requested {
        None => {
            let mut b = nominal;
            while b > total / 20 {
                b >>= 1;
            }
            b.max(min)
        }
        Some(b) => b.max(min),
    };
    bytes.div_ceil(VOLUME_ALIGN) * VOLUME_ALIGN
}

impl Geometry {
    /// Lay out a filesystem on a device of `device_bytes`.
    pub fn plan(device_bytes: u64, opts: &NewfsOptions) -> Result<Geometry> {
        opts.validate()?;
        let size = opts
            .size_bytes
            .map_or(device_bytes, |s| s.min(device_bytes));
        if let Some(s) = opts.size_bytes {
            if s > device_bytes {
                log::warn!(
                    "filesystem size {s:#x} exceeds the device ({device_bytes:#x}); using the device size"
                );
            }
        }
        let total_size = size & !(VOLUME_ALIGN - 1);
        if total_size == 0 {
            return Err(NewfsError::DeviceTooSmall {
                device: device_bytes,
            });
        }
        let boot_bytes = area_bytes(
            opts.boot_area_bytes,
            BOOT_NOM_BYTES,
            BOOT_MIN_BYTES,
            total_size,
        );
        let aux_bytes = area_bytes(
            opts.aux_area_bytes,
            AUX_NOM_BYTES,
            AUX_MIN_BYTES,
            total_size,
        );
        // DragonFly reserves a segment per started 1 GiB ("LEVEL1"), not
        // per 2 GiB zone, and counts it all as topo-reserved.
        let reserved_bytes = total_size.div_ceil(FS_SIZE_MIN) * ZONE_SEG;
        let used = reserved_bytes + boot_bytes + aux_bytes;
        if used >= total_size {
            return Err(NewfsError::NotEnoughSpace {
                total: total_size,
                reserved: reserved_bytes,
                boot: boot_bytes,
                aux: aux_bytes,
            });
        }
        let boot_beg = ZONE_SEG;
        let aux_beg = boot_beg + boot_bytes;
        let inode_block_beg = aux_beg + aux_bytes;
        if inode_block_beg >= FS_SIZE_MIN {
            return Err(NewfsError::AreasTooLarge {
                aux_end: inode_block_beg,
            });
        }
        let volhdr_count = (0..NUM_VOLHDRS)
            .take_while(|&i| (i as u64) * ZONE_BYTES64 < total_size)
            .count();
        let geo = Geometry {
            total_size,
            boot_beg,
            boot_bytes,
            aux_beg,
            aux_bytes,
            reserved_bytes,
            free_bytes: total_size - used,
            inode_block_beg,
            volhdr_count,
        };
        geo.assert_invariants();
        Ok(geo)
    }

    fn assert_invariants(&self) {
        assert!(self.total_size.is_multiple_of(VOLUME_ALIGN));
        assert!(self.inode_block_beg.is_multiple_of(PBUFSIZE));
        assert!(self.inode_block_beg + PBUFSIZE <= self.total_size);
        assert!(self.volhdr_count >= 1 && self.volhdr_count <= NUM_VOLHDRS);
        // newfs's rule (header i where i * 2 GiB < size) and the reader's
        // (the header's reserved segment fits) agree on aligned sizes.
        assert_eq!(self.volhdr_count, volhdr_count(self.total_size));
    }
}

impl fmt::Display for Geometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "size {:#x}: boot {:#x}+{:#x} aux {:#x}+{:#x} reserved {:#x} free {:#x} inodes at {:#x}, {} header(s)",
            self.total_size,
            self.boot_beg,
            self.boot_bytes,
            self.aux_beg,
            self.aux_bytes,
            self.reserved_bytes,
            self.free_bytes,
            self.inode_block_beg,
            self.volhdr_count
        )
    }
}

/// One PFS newfs created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PfsSummary {
    pub label: String,
    pub clid: Uuid,
    pub fsid: Uuid,
    /// The key of its blockref in the super-root (dirhash of the label).
    pub key: u64,
    /// Where its root inode is.
    pub inode_off: u64,
}

/// What newfs made; `Display` prints newfs_hammer2's report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewfsSummary {
    pub version: u32,
    pub geometry: Geometry,
    /// `allocator_beg`: the first byte after the inodes.
    pub allocator_beg: u64,
    pub vol_fsid: Uuid,
    pub sup_clid: Uuid,
    pub sup_fsid: Uuid,
    /// In creation order, `LOCAL` first.
    pub pfs: Vec<PfsSummary>,
}

impl fmt::Display for NewfsSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.geometry;
        writeln!(f, "version:          {}", self.version)?;
        for (name, bytes) in [
            ("total-size:      ", g.total_size),
            ("boot-area-size:  ", g.boot_bytes),
            ("aux-area-size:   ", g.aux_bytes),
            ("topo-reserved:   ", g.reserved_bytes),
            ("free-size:       ", g.free_bytes),
        ] {
            writeln!(f, "{name} {} ({bytes} bytes)", size_string(bytes))?;
        }
        writeln!(f, "vol-fsid:         {}", self.vol_fsid)?;
        writeln!(f, "sup-clid:         {}", self.sup_clid)?;
        writeln!(f, "sup-fsid:         {}", self.sup_fsid)?;
        for p in &self.pfs {
            writeln!(f, "PFS \"{}\"", p.label)?;
            writeln!(f, "    clid {}", p.clid)?;
            writeln!(f, "    fsid {}", p.fsid)?;
        }
        Ok(())
    }
}

/// Random version 4 UUIDs, from a seed or from the OS.
struct UuidSource(rand::rngs::StdRng);

impl UuidSource {
    fn new(seed: Option<u64>) -> UuidSource {
        UuidSource(match seed {
            Some(s) => rand::rngs::StdRng::seed_from_u64(s),
            None => rand::rngs::StdRng::from_entropy(),
        })
    }

    fn next(&mut self) -> Uuid {
        let mut b = [0u8; 16];
        self.0.fill_bytes(&mut b);
        Uuid::from_random(b)
    }
}

fn now_micros() -> u64 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_secs() * 1_000_000 + u64::from(d.subsec_micros()),
        Err(_) => 0,
    }
}

fn write(dev: &dyn BlockDevice, buf: &[u8], at: u64, op: &'static str) -> Result<()> {
    log::trace!("newfs: write {} bytes at {at:#x} ({op})", buf.len());
    dev.write_at(buf, at)
        .map_err(|source| NewfsError::Io { op, at, source })
}

fn read(dev: &dyn BlockDevice, buf: &mut [u8], at: u64, op: &'static str) -> Result<()> {
    dev.read_at(buf, at)
        .map_err(|source| NewfsError::Io { op, at, source })
}

fn barrier(dev: &dyn BlockDevice) -> Result<()> {
    dev.barrier().map_err(|source| NewfsError::Io {
        op: "sync",
        at: 0,
        source,
    })
}

/// Make `[beg, end)` read as zeros. DragonFly writes zeros over the whole
/// range; writing only the parts that are not zero already leaves the
/// same bytes and keeps sparse images sparse.
fn zero_range(dev: &dyn BlockDevice, beg: u64, end: u64, op: &'static str) -> Result<()> {
    assert!(beg.is_multiple_of(PBUFSIZE) && end.is_multiple_of(PBUFSIZE) && beg <= end);
    let zeros = vec![0u8; ZERO_STEP as usize];
    let mut buf = vec![0u8; ZERO_STEP as usize];
    let mut at = beg;
    while at < end {
        let n = (end - at).min(ZERO_STEP) as usize;
        read(dev, &mut buf[..n], at, op)?;
        if buf[..n].iter().any(|&b| b != 0) {
            write(dev, &zeros[..n], at, op)?;
        }
        at += n as u64;
    }
    Ok(())
}

/// An empty directory inode with newfs's common fields.
fn dir_inode(now_us: u64, inum: u64, mode: u32, nlinks: u64, name: &[u8]) -> InodeData {
    let mut ino = InodeData::default();
    let m = &mut ino.meta;
    m.ctime = now_us;
    m.mtime = now_us;
    m.atime = now_us;
    m.btime = now_us;
    m.obj_type = ObjType::Directory;
    m.mode = mode;
    m.inum = inum;
    m.nlinks = nlinks;
    ino.set_name(name);
    ino
}

/// An INODE blockref for a 1 KiB inode at `off`, checked with xxhash64
/// as newfs does whatever the PFS's own check method is.
fn inode_bref(off: u64, key: u64, comp: u8, flags: u8, raw: &[u8]) -> Blockref {
    let mut br = Blockref::EMPTY;
    br.btype = BlockrefType::Inode;
    br.methods = enc_methods(check_method::XXHASH64, comp);
    br.copyid = COPYID_LOCAL;
    br.keybits = 0;
    br.vradix = INODE_RADIX;
    br.flags = flags;
    br.key = key;
    br.mirror_tid = NEWFS_TID;
    br.data_off = DataOff::new(off, INODE_RADIX);
    set_check(&mut br, raw);
    br
}

const INODE_RADIX: u8 = 10;
const _: () = assert!(1 << INODE_RADIX == INODE_BYTES);

/// The 64 KiB block of inodes and the super-root's blockref.
struct InodeBlock {
    block: Vec<u8>,
    sroot: Blockref,
    pfs: Vec<PfsSummary>,
    /// `allocator_beg`: just past the last inode.
    end: u64,
}

fn build_inodes(
    geo: &Geometry,
    opts: &NewfsOptions,
    ids: &mut UuidSource,
    sup: (Uuid, Uuid),
    now_us: u64,
) -> InodeBlock {
    let base = geo.inode_block_beg;
    let labels = opts.all_labels();
    assert!(labels.len() <= SET_COUNT);
    let mut block = vec![0u8; PBUFSIZE as usize];
    let mut pfs = Vec::with_capacity(labels.len());
    let mut brefs = Vec::with_capacity(labels.len());
    // The super-root takes the first 1 KiB; the PFS roots follow in order.
    for (i, label) in labels.iter().enumerate() {
        let clid = ids.next();
        let fsid = ids.next();
        let slot = (i + 1) * INODE_BYTES;
        let off = base + slot as u64;
        let mut ino = dir_inode(now_us, 1, 0o755, 1, label.as_bytes());
        let key = dirhash(label.as_bytes());
        let m = &mut ino.meta;
        m.name_key = key;
        // DragonFly never compresses a BOOT PFS (pfs-create agrees).
        if label.eq_ignore_ascii_case("BOOT") {
            m.comp_algo = comp_method::AUTOZERO;
            m.check_algo = check_method::XXHASH64;
        } else {
            m.comp_algo = opts.comp_algo;
            m.check_algo = opts.check_algo;
        }
        // pfs_nmasters stays 0: the quorum is then 1.
        m.pfs_clid = clid;
        m.pfs_fsid = fsid;
        m.pfs_type = pfs_type::MASTER;
        m.op_flags |= OPFLAG_PFSROOT;
        m.pfs_inum = NEWFS_PFS_INUM;
        let raw = ino.encode();
        block[slot..slot + INODE_BYTES].copy_from_slice(&raw);
        brefs.push(inode_bref(
            off,
            key,
            comp_method::NONE,
            BREF_FLAG_PFSROOT,
            &raw,
        ));
        pfs.push(PfsSummary {
            label: label.to_string(),
            clid,
            fsid,
            key,
            inode_off: off,
        });
    }
    let mut sroot = dir_inode(now_us, 0, 0o700, 2, b"SUPROOT");
    let m = &mut sroot.meta;
    m.comp_algo = comp_method::AUTOZERO;
    m.check_algo = check_method::XXHASH64;
    m.pfs_clid = sup.0;
    m.pfs_fsid = sup.1;
    m.pfs_type = pfs_type::SUPROOT;
    m.name_key = 0;
    m.pfs_inum = 0;
    // The blockset is fully associative; newfs keeps it sorted by key.
    brefs.sort_by_key(|b| b.key);
    let mut set = [Blockref::EMPTY; SET_COUNT];
    set[..brefs.len()].copy_from_slice(&brefs);
    sroot.set_blockset(&set);
    let raw = sroot.encode();
    block[..INODE_BYTES].copy_from_slice(&raw);
    let sroot_bref = inode_bref(base, 0, comp_method::AUTOZERO, 0, &raw);
    InodeBlock {
        block,
        sroot: sroot_bref,
        pfs,
        end: base + ((labels.len() + 1) * INODE_BYTES) as u64,
    }
}

fn volume_header(
    geo: &Geometry,
    version: u32,
    fsid: Uuid,
    sroot: Blockref,
    allocator_beg: u64,
) -> VolumeHeader {
    let mut vh = VolumeHeader::new();
    vh.boot_beg = geo.boot_beg;
    vh.boot_end = geo.boot_beg + geo.boot_bytes;
    vh.aux_beg = geo.aux_beg;
    vh.aux_end = geo.aux_beg + geo.aux_bytes;
    vh.volu_size = geo.total_size;
    vh.version = version;
    vh.flags = 0;
    if version >= VOL_VERSION_MULTI_VOLUMES {
        // One volume: id 0 at logical offset 0; unused slots are -1.
        vh.volu_id = 0;
        vh.nvolumes = 1;
        vh.total_size = geo.total_size;
        vh.volu_loff = [u64::MAX; MAX_VOLUMES];
        vh.volu_loff[0] = 0;
    }
    vh.fsid = fsid;
    vh.fstype = FSTYPE_HAMMER2;
    vh.peer_type = PEER_HAMMER2;
    vh.allocator_size = geo.free_bytes;
    vh.allocator_free = geo.free_bytes;
    vh.allocator_beg = allocator_beg;
    vh.sroot_blockset[0] = sroot;
    vh.mirror_tid = NEWFS_TID;
    vh.freemap_tid = NEWFS_TID;
    vh
}

/// Offset of the first volume header slot on `dev` that holds a HAMMER2
/// magic (either byte order), if any: a filesystem is already there.
pub fn find_hammer2(dev: &dyn BlockDevice) -> Result<Option<u64>> {
    use hammer2::disk::volume::{VOLUME_ID_ABO, VOLUME_ID_HBO};
    for i in 0..NUM_VOLHDRS {
        let at = i as u64 * ZONE_BYTES64;
        if at + 8 > dev.size_bytes() {
            break;
        }
        let mut magic = [0u8; 8];
        read(dev, &mut magic, at, "probe volume header")?;
        let magic = u64::from_le_bytes(magic);
        if magic == VOLUME_ID_HBO || magic == VOLUME_ID_ABO {
            return Ok(Some(at));
        }
    }
    Ok(None)
}

/// Make an empty HAMMER2 filesystem on `dev`.
pub fn newfs(dev: &dyn BlockDevice, opts: &NewfsOptions) -> Result<NewfsSummary> {
    let geo = Geometry::plan(dev.size_bytes(), opts)?;
    log::debug!("newfs: {geo}");
    let now_us = opts.now_us.unwrap_or_else(now_micros);
    // UUIDs in newfs_hammer2's order: volume, super-root, then per PFS.
    let mut ids = UuidSource::new(opts.uuid_seed);
    let vol_fsid = ids.next();
    let sup = (ids.next(), ids.next());

    // Prove the device is as large as the filesystem.
    let zeros = vec![0u8; PBUFSIZE as usize];
    write(
        dev,
        &zeros,
        geo.total_size - PBUFSIZE,
        "write at end of volume",
    )?;
    zero_range(dev, 0, ZONE_SEG, "clear reserved segment")?;
    zero_range(dev, geo.boot_beg, geo.inode_block_beg, "clear boot/aux")?;

    let inodes = build_inodes(&geo, opts, &mut ids, sup, now_us);
    write(dev, &inodes.block, geo.inode_block_beg, "write inodes")?;
    // The inodes are durable before any header points at them.
    barrier(dev)?;

    let vh = volume_header(&geo, opts.version, vol_fsid, inodes.sroot, inodes.end);
    let raw = vh.encode();
    for i in 0..geo.volhdr_count {
        write(dev, &raw, i as u64 * ZONE_BYTES64, "write volume header")?;
    }
    barrier(dev)?;
    verify_written(dev, &geo, &raw, &inodes)?;

    let summary = NewfsSummary {
        version: opts.version,
        geometry: geo,
        allocator_beg: inodes.end,
        vol_fsid,
        sup_clid: sup.0,
        sup_fsid: sup.1,
        pfs: inodes.pfs,
    };
    log::info!(
        "newfs: version {} size {:#x}, {} PFS, fsid {}",
        summary.version,
        geo.total_size,
        summary.pfs.len(),
        vol_fsid
    );
    Ok(summary)
}

/// Read back every header copy and the inodes and check them against
/// what was meant: the header CRCs and the inode check codes.
fn verify_written(
    dev: &dyn BlockDevice,
    geo: &Geometry,
    header: &[u8],
    inodes: &InodeBlock,
) -> Result<()> {
    let mut buf = vec![0u8; PBUFSIZE as usize];
    for i in 0..geo.volhdr_count {
        let at = i as u64 * ZONE_BYTES64;
        read(dev, &mut buf, at, "read back volume header")?;
        let good = VolumeHeader::decode(&buf, at)
            .map(|vh| vh.crcs().all_good())
            .unwrap_or(false);
        if buf != header || !good {
            return Err(NewfsError::ReadBack {
                what: format!("volume header {i}"),
                at,
            });
        }
    }
    read(dev, &mut buf, geo.inode_block_beg, "read back inodes")?;
    if buf != inodes.block {
        return Err(NewfsError::ReadBack {
            what: "inode block".into(),
            at: geo.inode_block_beg,
        });
    }
    let sroot = InodeData::decode(&buf[..INODE_BYTES], geo.inode_block_beg).map_err(|_| {
        NewfsError::ReadBack {
            what: "super-root inode".into(),
            at: geo.inode_block_beg,
        }
    })?;
    let brefs = std::iter::once(inodes.sroot).chain(
        sroot
            .blockset()
            .into_iter()
            .filter(|b| b.btype != BlockrefType::Empty),
    );
    for br in brefs {
        let at = br.data_off.offset();
        let slot = (at - geo.inode_block_beg) as usize;
        verify(&br, &buf[slot..slot + INODE_BYTES]).map_err(|e| NewfsError::ReadBack {
            what: format!("inode check code ({e})"),
            at,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bufcache::MemDevice;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn plan(size: u64) -> Result<Geometry> {
        Geometry::plan(size, &NewfsOptions::default())
    }

    #[test]
    fn geometry_matches_dragonfly_for_common_sizes() {
        // 2 GiB: the values newfs_hammer2 printed for the fixture images.
        let g = plan(2 * GIB).unwrap();
        assert_eq!((g.boot_bytes, g.aux_bytes), (64 * MIB, 64 * MIB));
        assert_eq!(g.reserved_bytes, 8 * MIB);
        assert_eq!(g.free_bytes, 2_004_877_312);
        assert_eq!(g.inode_block_beg, 0x840_0000);
        assert_eq!(g.volhdr_count, 1);
        // 10 GiB: aux at its nominal 256 MiB, four headers.
        let g = plan(10 * GIB).unwrap();
        assert_eq!((g.boot_bytes, g.aux_bytes), (64 * MIB, 256 * MIB));
        assert_eq!(g.free_bytes, 0x2_6980_0000);
        assert_eq!(g.inode_block_beg, 0x1440_0000);
        assert_eq!(g.volhdr_count, 4);
        // 1 GiB: both areas halved to 32 MiB.
        let g = plan(GIB).unwrap();
        assert_eq!((g.boot_bytes, g.aux_bytes), (32 * MIB, 32 * MIB));
        assert_eq!(g.reserved_bytes, 4 * MIB);
    }

    #[test]
    fn header_count_follows_two_gib_zones() {
        assert_eq!(plan(2 * GIB).unwrap().volhdr_count, 1);
        assert_eq!(plan(2 * GIB + 8 * MIB).unwrap().volhdr_count, 2);
        assert_eq!(plan(6 * GIB).unwrap().volhdr_count, 3);
        assert_eq!(plan(6 * GIB + 8 * MIB).unwrap().volhdr_count, 4);
        assert_eq!(plan(100 * GIB).unwrap().volhdr_count, 4);
    }

    #[test]
    fn device_size_is_aligned_down() {
        let g = plan(2 * GIB + 5 * MIB).unwrap();
        assert_eq!(g.total_size, 2 * GIB);
        assert!(matches!(
            plan(7 * MIB),
            Err(NewfsError::DeviceTooSmall { .. })
        ));
    }

    #[test]
    fn small_devices_run_out_of_space() {
        // 4 MiB reserved + 8 MiB boot + 8 MiB aux: 16 MiB is too small,
        // 24 MiB leaves 4 MiB, DragonFly's floor for a whole device.
        assert!(matches!(
            plan(16 * MIB),
            Err(NewfsError::NotEnoughSpace { .. })
        ));
        assert_eq!(plan(24 * MIB).unwrap().free_bytes, 4 * MIB);
    }

    #[test]
    fn size_option_has_a_one_gib_floor_and_caps_at_the_device() {
        let opts = NewfsOptions {
            size_bytes: Some(512 * MIB),
            ..NewfsOptions::default()
        };
        assert!(matches!(
            Geometry::plan(4 * GIB, &opts),
            Err(NewfsError::SizeTooSmall { .. })
        ));
        let opts = NewfsOptions {
            size_bytes: Some(3 * GIB),
            ..NewfsOptions::default()
        };
        assert_eq!(Geometry::plan(10 * GIB, &opts).unwrap().total_size, 3 * GIB);
        assert_eq!(Geometry::plan(2 * GIB, &opts).unwrap().total_size, 2 * GIB);
    }

    #[test]
    fn explicit_areas_are_raised_to_the_minimum_and_bounded() {
        let opts = NewfsOptions {
            boot_area_bytes: Some(256 * MIB),
            aux_area_bytes: Some(16 * MIB),
            ..NewfsOptions::default()
        };
        let g = Geometry::plan(2 * GIB, &opts).unwrap();
        assert_eq!((g.boot_bytes, g.aux_bytes), (256 * MIB, 16 * MIB));
        assert_eq!(g.aux_beg, 260 * MIB);
        let opts = NewfsOptions {
            boot_area_bytes: Some(256 * MIB),
            aux_area_bytes: Some(GIB),
            ..NewfsOptions::default()
        };
        assert!(matches!(
            Geometry::plan(100 * GIB, &opts),
            Err(NewfsError::AreasTooLarge { .. })
        ));
        let opts = NewfsOptions {
            boot_area_bytes: Some(512 * MIB),
            ..NewfsOptions::default()
        };
        assert!(matches!(
            opts.validate(),
            Err(NewfsError::InvalidOption { .. })
        ));
    }

    #[test]
    fn labels_are_checked() {
        let with = |labels: &[&str]| NewfsOptions {
            labels: labels.iter().map(|s| s.to_string()).collect(),
            ..NewfsOptions::default()
        };
        assert!(with(&[]).validate().is_ok());
        assert!(with(&["A", "B", "C"]).validate().is_ok());
        assert!(with(&["A", "B", "C", "D"]).validate().is_err());
        assert!(with(&[""]).validate().is_err());
        assert!(with(&["LOCAL"]).validate().is_err());
        assert!(with(&["A", "A"]).validate().is_err());
        assert!(with(&[&"x".repeat(255)]).validate().is_ok());
        assert!(with(&[&"x".repeat(256)]).validate().is_err());
        // The labels pfs-create refuses: IMG@LABEL could not name them.
        for bad in ["a/b", "a@b", ".", "..", "a\nb", "a\tb"] {
            assert!(with(&[bad]).validate().is_err(), "{bad:?}");
        }
        let bad_version = NewfsOptions {
            version: 3,
            ..NewfsOptions::default()
        };
        assert!(bad_version.validate().is_err());
    }

    #[test]
    fn sizes_are_held_to_newfs_rules() {
        assert_eq!(parse_size_in("1G", FS_SIZE_MIN, u64::MAX), Ok(GIB));
        assert_eq!(
            parse_size_in("8192k", NEWFS_ALIGN, BOOT_MAX_BYTES),
            Ok(8 * MIB)
        );
        assert!(parse_size_in("2X", FS_SIZE_MIN, u64::MAX).is_err());
        assert!(parse_size_in("512M", FS_SIZE_MIN, u64::MAX)
            .unwrap_err()
            .contains("Value too small: 512M, min is 1.00GB"));
        assert!(parse_size_in("512M", NEWFS_ALIGN, BOOT_MAX_BYTES)
            .unwrap_err()
            .contains("Value too large: 512M, max is 256.00MB"));
        assert!(parse_size_in("1028M", FS_SIZE_MIN, u64::MAX)
            .unwrap_err()
            .contains("multiple of 8192K"));
    }

    #[test]
    fn size_string_is_sizetostr() {
        assert_eq!(size_string(100), "100.00B");
        assert_eq!(size_string(2 * GIB), "  2.00GB");
        assert_eq!(size_string(64 * MIB), " 64.00MB");
        assert_eq!(size_string(2_004_877_312), "  1.87GB");
        assert_eq!(size_string(600 * GIB), "  0.59TB");
    }

    #[test]
    fn summary_prints_newfs_lines() {
        let dev = MemDevice::new(2 * GIB);
        let opts = NewfsOptions {
            uuid_seed: Some(1),
            now_us: Some(1),
            ..NewfsOptions::default()
        };
        let s = newfs(&dev, &opts).unwrap().to_string();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "version:          2");
        assert_eq!(lines[1], "total-size:         2.00GB (2147483648 bytes)");
        assert_eq!(lines[2], "boot-area-size:    64.00MB (67108864 bytes)");
        assert_eq!(lines[3], "aux-area-size:     64.00MB (67108864 bytes)");
        assert_eq!(lines[4], "topo-reserved:      8.00MB (8388608 bytes)");
        assert_eq!(lines[5], "free-size:          1.87GB (2004877312 bytes)");
        assert!(lines[6].starts_with("vol-fsid:         "));
        assert_eq!(lines[9], "PFS \"LOCAL\"");
        assert!(lines[10].starts_with("    clid "));
        assert_eq!(lines[12], "PFS \"DATA\"");
        assert_eq!(lines.len(), 15);
    }

    #[test]
    fn seeded_runs_are_identical_and_uuids_distinct() {
        let opts = NewfsOptions {
            uuid_seed: Some(7),
            now_us: Some(1_700_000_000_000_000),
            ..NewfsOptions::default()
        };
        let a = MemDevice::new(2 * GIB);
        let b = MemDevice::new(2 * GIB);
        let sa = newfs(&a, &opts).unwrap();
        let sb = newfs(&b, &opts).unwrap();
        assert_eq!(sa, sb);
        let mut ids = vec![sa.vol_fsid, sa.sup_clid, sa.sup_fsid];
        for p in &sa.pfs {
            ids.push(p.clid);
            ids.push(p.fsid);
        }
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n);
        let mut x = vec![0u8; PBUFSIZE as usize];
        let mut y = vec![0u8; PBUFSIZE as usize];
        for at in [0, sa.geometry.inode_block_beg] {
            a.read_at(&mut x, at).unwrap();
            b.read_at(&mut y, at).unwrap();
            assert_eq!(x, y);
        }
    }

    #[test]
    fn stale_data_is_cleared_and_existing_fs_is_found() {
        let dev = MemDevice::new(2 * GIB);
        assert_eq!(find_hammer2(&dev).unwrap(), None);
        let junk = vec![0xA5u8; 3 * PBUFSIZE as usize];
        for at in [PBUFSIZE, 20 * MIB, 0x840_0000 - PBUFSIZE] {
            dev.write_at(&junk[..PBUFSIZE as usize], at).unwrap();
        }
        let s = newfs(&dev, &NewfsOptions::default()).unwrap();
        let mut buf = vec![0u8; PBUFSIZE as usize];
        for at in [PBUFSIZE, 20 * MIB, 0x840_0000 - PBUFSIZE] {
            dev.read_at(&mut buf, at).unwrap();
            assert!(buf.iter().all(|&b| b == 0), "stale bytes at {at:#x}");
        }
        assert_eq!(s.allocator_beg, 0x840_0c00);
        assert_eq!(find_hammer2(&dev).unwrap(), Some(0));
        // Only what newfs writes is resident: no 128 MiB of zeros.
        assert!(dev.resident_bytes() < 8 * MIB);
    }

    #[test]
    fn too_small_device_is_an_error_and_untouched() {
        let dev = MemDevice::new(16 * MIB);
        let err = newfs(&dev, &NewfsOptions::default()).unwrap_err();
        assert!(matches!(err, NewfsError::NotEnoughSpace { .. }));
        assert!(err.to_string().contains("not enough free space"));
        assert_eq!(dev.resident_bytes(), 0);
    }
}
