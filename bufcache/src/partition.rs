//! Partition tables of whole disks, read from any `BlockDevice`: MBR
//! (DOS) with its extended partitions, GPT, and DragonFly BSD's
//! `disklabel64` inside an MBR slice or a GPT partition (DragonFly's
//! installer puts HAMMER2 in partition `d` of slice 1). `RangeDevice` is
//! one partition as a device of its own.
//!
//! Names: every partition has DragonFly's name and Linux's.
//!
//! - DragonFly (`s`): MBR slices `s1`..`s4`, logical partitions of an
//!   extended one `s5` on; GPT entries from `s0` (the first entry is the
//!   compatibility slice s0, `subr_diskgpt.c`); a disklabel64 partition
//!   adds its letter: `s1d`.
//! - Linux (`p`, as `sda2`, `loop0p2`): MBR primaries `p1`..`p4`,
//!   logical ones `p5` on; GPT entry N is `p(N+1)`; a disklabel64
//!   partition (Linux does not read them) adds its letter too: `p1d`.
//!
//! Formats, for facts only: MBR (sector 0: four 16-byte entries at 446,
//! 0x55AA at 510; extended partitions chain EBRs whose first entry is a
//! logical partition relative to that EBR and whose second is the next
//! EBR relative to the extended partition's start); GPT (UEFI: header
//! "EFI PART" at LBA 1 with CRC-32s of itself and of its entry array;
//! 16-byte GUIDs with the first three fields little-endian); disklabel64
//! (`sys/sys/disklabel64.h`: at byte 512 of its slice, magic 0xc4464c59,
//! a CRC-32 from the magic through the last partition with the CRC field
//! zeroed, up to 16 partitions of 64 bytes at byte 712, byte offsets
//! relative to the slice).
//!
//! Everything read is bounded before use: entries must lie inside the
//! device (or their slice), an EBR chain is followed at most
//! `MAX_LOGICAL` links and never twice through one sector, a GPT array is
//! at most `GPT_MAX_ENTRIES` entries of at most 4 KiB. Damage makes an
//! entry unusable (listed in `Table::problems`), never a panic.

use crate::device::BlockDevice;
use std::collections::HashSet;
use std::fmt;
use std::io;
use std::sync::Arc;

/// The sector size MBR and GPT offsets count in (images and most disks;
/// GPT is also looked for with 4096-byte sectors).
pub const SECTOR: u64 = 512;
/// Logical partitions followed at most.
pub const MAX_LOGICAL: usize = 128;
/// GPT entries read at most.
pub const GPT_MAX_ENTRIES: u32 = 1024;

/// disklabel64 (`sys/sys/disklabel64.h`).
pub const DISKMAGIC64: u32 = 0xc446_4c59;
pub const MAXPARTITIONS64: usize = 16;
/// Byte offsets within the slice.
pub const L64_MAGIC_AT: usize = 512;
pub const L64_PARTS_AT: usize = 712;
pub const L64_PART_BYTES: usize = 64;
/// `p_fstype` of a HAMMER2 partition (FS_HAMMER2 in `sys/sys/dtype.h`).
pub const FS_HAMMER2: u8 = 23;
/// `p_fstype` of a HAMMER partition (FS_HAMMER).
pub const FS_HAMMER: u8 = 22;

/// MBR types of a DragonFly slice: 0x6c (DragonFly), 0xa5 (386BSD, which
/// DragonFly also uses).
pub const MBR_DRAGONFLY: u8 = 0x6c;
pub const MBR_386BSD: u8 = 0xa5;
const MBR_PROTECTIVE: u8 = 0xee;
const MBR_EXTENDED: [u8; 3] = [0x05, 0x0f, 0x85];

/// A GUID as stored (mixed-endian, GPT's and DragonFly's `struct uuid`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// From its text form's fields (`time_low-mid-hi-seq-node`).
    pub const fn new(a: u32, b: u16, c: u16, d: [u8; 8]) -> Guid {
        let a = a.to_le_bytes();
        let b = b.to_le_bytes();
        let c = c.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5],
            d[6], d[7],
        ])
    }

    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.0;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-",
            u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
            u16::from_le_bytes([g[4], g[5]]),
            u16::from_le_bytes([g[6], g[7]]),
            g[8],
            g[9]
        )?;
        g[10..].iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

const DFLY_NODE: [u8; 6] = [0x01, 0x30, 0x1b, 0xb8, 0xa9, 0xf5];
const fn dfly(a: u32, b: u16, c: u16, s0: u8, s1: u8) -> Guid {
    let n = DFLY_NODE;
    Guid::new(a, b, c, [s0, s1, n[0], n[1], n[2], n[3], n[4], n[5]])
}

/// DragonFly's GPT partition types (`sys/sys/gpt.h`, `uuid.h`).
pub const GPT_DFLY_HAMMER2: Guid = dfly(0x5cbb9ad1, 0x862d, 0x11dc, 0xa9, 0x4d);
pub const GPT_DFLY_HAMMER: Guid = dfly(0x61dc63ac, 0x6e38, 0x11dc, 0x85, 0x13);
pub const GPT_DFLY_LABEL64: Guid = dfly(0x3d48ce54, 0x1d16, 0x11dc, 0x86, 0x96);
pub const GPT_DFLY_LABEL32: Guid = dfly(0x9d087404, 0x1ca5, 0x11dc, 0x88, 0x17);
pub const GPT_DFLY_SWAP: Guid = dfly(0x9d58fdbd, 0x1ca5, 0x11dc, 0x88, 0x17);
pub const GPT_DFLY_UFS1: Guid = dfly(0x9d94ce7c, 0x1ca5, 0x11dc, 0x88, 0x17);
pub const GPT_EFI: Guid = Guid::new(
    0xc12a7328,
    0xf81f,
    0x11d2,
    [0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b],
);
pub const GPT_LINUX_DATA: Guid = Guid::new(
    0x0fc63daf,
    0x8483,
    0x4772,
    [0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4],
);
pub const GPT_MS_BASIC_DATA: Guid = Guid::new(
    0xebd0a0a2,
    0xb9e5,
    0x4433,
    [0x87, 0xc0, 0x68, 0xb6, 0xb7, 0x26, 0x99, 0xc7],
);
pub const GPT_LINUX_SWAP: Guid = Guid::new(
    0x0657fd6d,
    0xa4ab,
    0x43c4,
    [0x84, 0xe5, 0x09, 0x33, 0xc8, 0x4b, 0x4f, 0x4f],
);

/// The name of a GPT type this module knows.
pub fn gpt_type_name(t: &Guid) -> Option<&'static str> {
    [
        (GPT_DFLY_HAMMER2, "DragonFly HAMMER2"),
        (GPT_DFLY_HAMMER, "DragonFly HAMMER"),
        (GPT_DFLY_LABEL64, "DragonFly disklabel64"),
        (GPT_DFLY_LABEL32, "DragonFly disklabel32"),
        (GPT_DFLY_SWAP, "DragonFly swap"),
        (GPT_DFLY_UFS1, "DragonFly UFS1"),
        (GPT_EFI, "EFI System"),
        (GPT_LINUX_DATA, "Linux filesystem"),
        (GPT_MS_BASIC_DATA, "Microsoft basic data"),
        (GPT_LINUX_SWAP, "Linux swap"),
    ]
    .iter()
    .find(|(g, _)| g == t)
    .map(|(_, n)| *n)
}

fn mbr_type_name(t: u8) -> &'static str {
    match t {
        0x01 | 0x04 | 0x06 | 0x0b | 0x0c | 0x0e => "FAT",
        0x05 | 0x0f | 0x85 => "extended",
        0x07 => "NTFS/exFAT",
        0x82 => "Linux swap",
        0x83 => "Linux",
        0x8e => "Linux LVM",
        0xa5 => "386BSD/DragonFly",
        MBR_DRAGONFLY => "DragonFly",
        0xee => "GPT protective",
        0xef => "EFI System",
        0xfd => "Linux RAID",
        _ => "unknown",
    }
}

fn fstype_name(t: u8) -> &'static str {
    match t {
        0 => "unused",
        1 => "swap",
        7 => "4.2BSD",
        8 => "MSDOS",
        10 => "other",
        13 => "boot",
        14 => "vinum",
        19 => "ccd",
        FS_HAMMER => "HAMMER",
        FS_HAMMER2 => "HAMMER2",
        _ => "unknown",
    }
}

/// Which table a partition comes from, and its type there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An MBR primary or logical partition of this type.
    Mbr(u8),
    /// A GPT entry of this type, with its name.
    Gpt { type_guid: Guid, name: String },
    /// A disklabel64 partition of this `p_fstype`.
    Label64 { fstype: u8, type_guid: Guid },
}

/// One partition: its names, where it is, what its table says it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// DragonFly's name: `s1`, `s5`, `s0`, `s1d`.
    pub dfly: String,
    /// Linux's name: `p1`, `p5`, `p1d`.
    pub linux: String,
    /// First byte, on the whole device.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    pub kind: Kind,
    /// It holds a disklabel64 (whose partitions follow it in the list).
    pub has_label: bool,
}

impl Partition {
    /// What its table says it is, in words: "MBR 0x6c DragonFly", "GPT
    /// DragonFly HAMMER2", "disklabel64 HAMMER2".
    pub fn type_name(&self) -> String {
        match &self.kind {
            Kind::Mbr(t) => format!("MBR {t:#04x} {}", mbr_type_name(*t)),
            Kind::Gpt { type_guid, .. } => match gpt_type_name(type_guid) {
                Some(n) => format!("GPT {n}"),
                None => format!("GPT {type_guid}"),
            },
            Kind::Label64 { fstype, .. } => format!("disklabel64 {}", fstype_name(*fstype)),
        }
    }

    /// Its table types it HAMMER2.
    pub fn typed_hammer2(&self) -> bool {
        match &self.kind {
            Kind::Mbr(_) => false,
            Kind::Gpt { type_guid, .. } => *type_guid == GPT_DFLY_HAMMER2,
            Kind::Label64 { fstype, type_guid } => {
                *fstype == FS_HAMMER2 || *type_guid == GPT_DFLY_HAMMER2
            }
        }
    }

    /// Does `sel` name it?
    pub fn matches(&self, sel: &Selector) -> bool {
        let want = sel.to_string();
        match sel.scheme {
            Naming::DragonFly => self.dfly == want,
            Naming::Linux => self.linux == want,
        }
    }
}

/// The partition table of a whole disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    /// "MBR" or "GPT".
    pub scheme: &'static str,
    /// Every partition, in table order, each disklabel64's partitions
    /// right after its slice.
    pub partitions: Vec<Partition>,
    /// Entries that could not be used, and why.
    pub problems: Vec<String>,
}

/// How a selector names a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// `sN[x]`: DragonFly's names.
    DragonFly,
    /// `pN[x]`: Linux's.
    Linux,
}

/// A partition named by the user: `s1d`, `s0`, `p2`, `p1d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selector {
    pub scheme: Naming,
    pub number: u32,
    /// The disklabel64 partition letter, `a` to `p`.
    pub letter: Option<char>,
}

impl Selector {
    /// Parse `sN`, `sNx`, `pN` or `pNx` (x from `a` to `p`); `None` for
    /// anything else.
    pub fn parse(s: &str) -> Option<Selector> {
        let scheme = match s.as_bytes().first()? {
            b's' => Naming::DragonFly,
            b'p' => Naming::Linux,
            _ => return None,
        };
        let rest = &s[1..];
        let (digits, letter) = match rest.char_indices().last()? {
            (i, c @ 'a'..='p') => (&rest[..i], Some(c)),
            _ => (rest, None),
        };
        if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // No leading zeros: `s01` is not a name either tool uses.
        if digits.len() > 1 && digits.starts_with('0') {
            return None;
        }
        Some(Selector {
            scheme,
            number: digits.parse().ok()?,
            letter,
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = match self.scheme {
            Naming::DragonFly => 's',
            Naming::Linux => 'p',
        };
        write!(f, "{c}{}", self.number)?;
        if let Some(l) = self.letter {
            write!(f, "{l}")?;
        }
        Ok(())
    }
}

fn read(dev: &dyn BlockDevice, at: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    dev.read_at(&mut b, at)?;
    Ok(b)
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// `start..start+size` (in sectors of `ss` bytes) as bytes, if it lies
/// within `limit` bytes.
fn extent(start: u64, size: u64, ss: u64, limit: u64) -> Option<(u64, u64)> {
    let s = start.checked_mul(ss)?;
    let n = size.checked_mul(ss)?;
    (n > 0 && s.checked_add(n)? <= limit).then_some((s, n))
}

/// Read the partition table of `dev`: GPT (behind its protective MBR),
/// else MBR; `None` when there is neither. An I/O error is an error;
/// damage is not (see `Table::problems`).
pub fn read_table(dev: &dyn BlockDevice) -> io::Result<Option<Table>> {
    let size = dev.size_bytes();
    if size < 2 * SECTOR {
        return Ok(None);
    }
    let mbr = read(dev, 0, SECTOR as usize)?;
    if mbr[510] != 0x55 || mbr[511] != 0xaa {
        return Ok(None);
    }
    let entries: Vec<&[u8]> = (0..4).map(|i| &mbr[446 + 16 * i..462 + 16 * i]).collect();
    // Boot flags are 0x00 or 0x80 in a real table; anything else is a
    // boot sector of some filesystem (FAT, NTFS) that has 0x55AA too.
    if entries.iter().any(|e| e[0] != 0 && e[0] != 0x80) {
        return Ok(None);
    }
    if entries.iter().any(|e| e[4] == MBR_PROTECTIVE) {
        for ss in [SECTOR, 4096] {
            if let Some(t) = read_gpt(dev, ss)? {
                return Ok(Some(t));
            }
        }
        return Ok(Some(Table {
            scheme: "GPT",
            partitions: Vec::new(),
            problems: vec![
                "protective MBR, but neither GPT header (nor its backup) is valid".into(),
            ],
        }));
    }
    if entries.iter().all(|e| e[4] == 0) {
        return Ok(None);
    }
    read_mbr(dev, &entries).map(Some)
}

fn read_mbr(dev: &dyn BlockDevice, entries: &[&[u8]]) -> io::Result<Table> {
    let size = dev.size_bytes();
    let mut t = Table {
        scheme: "MBR",
        partitions: Vec::new(),
        problems: Vec::new(),
    };
    let mut extended = None;
    for (i, e) in entries.iter().enumerate() {
        let n = i + 1;
        let ty = e[4];
        if ty == 0 {
            continue;
        }
        let Some((start, len)) = extent(le32(e, 8) as u64, le32(e, 12) as u64, SECTOR, size) else {
            t.problems.push(format!(
                "s{n}: MBR entry of type {ty:#04x} lies outside the disk"
            ));
            continue;
        };
        if MBR_EXTENDED.contains(&ty) {
            if extended.is_none() {
                extended = Some((start, len));
            } else {
                t.problems
                    .push(format!("s{n}: a second extended partition"));
            }
            continue;
        }
        push_slice(dev, &mut t, n as u32, start, len, Kind::Mbr(ty))?;
    }
    if let Some((ext_start, ext_len)) = extended {
        read_logical(dev, &mut t, ext_start, ext_len)?;
    }
    Ok(t)
}

/// The logical partitions of the extended partition at `ext_start`.
fn read_logical(
    dev: &dyn BlockDevice,
    t: &mut Table,
    ext_start: u64,
    ext_len: u64,
) -> io::Result<()> {
    let ext_end = ext_start + ext_len;
    let mut seen = HashSet::new();
    let mut ebr = ext_start;
    let mut n = 5u32;
    for _ in 0..MAX_LOGICAL {
        if !seen.insert(ebr) {
            t.problems.push(format!(
                "extended partition: the EBR chain loops at byte {ebr}"
            ));
            return Ok(());
        }
        let b = read(dev, ebr, SECTOR as usize)?;
        if b[510] != 0x55 || b[511] != 0xaa {
            t.problems.push(format!(
                "extended partition: no EBR signature at byte {ebr}"
            ));
            return Ok(());
        }
        let (first, next) = (&b[446..462], &b[462..478]);
        if first[4] != 0 {
            // Relative to this EBR, and inside the extended partition.
            let s = (le32(first, 8) as u64) * SECTOR;
            let l = (le32(first, 12) as u64) * SECTOR;
            match ebr.checked_add(s) {
                Some(start) if l > 0 && start + l <= ext_end => {
                    push_slice(dev, t, n, start, l, Kind::Mbr(first[4]))?;
                }
                _ => t.problems.push(format!(
                    "s{n}: logical partition lies outside its extended partition"
                )),
            }
            n += 1;
        }
        if next[4] == 0 || le32(next, 8) == 0 {
            return Ok(());
        }
        let rel = (le32(next, 8) as u64) * SECTOR;
        if rel >= ext_len {
            t.problems
                .push("extended partition: an EBR link points outside it".into());
            return Ok(());
        }
        ebr = ext_start + rel;
    }
    t.problems.push(format!(
        "extended partition: more than {MAX_LOGICAL} logical partitions; the rest are not read"
    ));
    Ok(())
}

/// Add slice `n` (DragonFly's number; Linux's is the same for MBR) and,
/// for a DragonFly slice holding a disklabel64, its partitions.
fn push_slice(
    dev: &dyn BlockDevice,
    t: &mut Table,
    n: u32,
    start: u64,
    len: u64,
    kind: Kind,
) -> io::Result<()> {
    push_with_label(dev, t, format!("s{n}"), format!("p{n}"), start, len, kind)
}

fn push_with_label(
    dev: &dyn BlockDevice,
    t: &mut Table,
    dfly: String,
    linux: String,
    start: u64,
    len: u64,
    kind: Kind,
) -> io::Result<()> {
    let label_kind = match &kind {
        Kind::Mbr(ty) => *ty == MBR_DRAGONFLY || *ty == MBR_386BSD,
        Kind::Gpt { type_guid, .. } => *type_guid == GPT_DFLY_LABEL64,
        Kind::Label64 { .. } => false,
    };
    let label = match label_kind {
        true => {
            let slice = RangeDevice::new_ref(dev, start, len);
            read_disklabel64(&slice).map_err(|e| {
                io::Error::new(e.kind(), format!("{dfly}: reading its disklabel64: {e}"))
            })?
        }
        false => None,
    };
    let index = t.partitions.len();
    t.partitions.push(Partition {
        dfly: dfly.clone(),
        linux: linux.clone(),
        start,
        size: len,
        kind,
        has_label: false,
    });
    match label {
        Some(Ok(parts)) => {
            t.partitions[index].has_label = true;
            for (letter, p) in parts {
                t.partitions.push(Partition {
                    dfly: format!("{dfly}{letter}"),
                    linux: format!("{linux}{letter}"),
                    start: start + p.offset,
                    size: p.size,
                    kind: Kind::Label64 {
                        fstype: p.fstype,
                        type_guid: p.type_guid,
                    },
                    has_label: false,
                });
            }
        }
        Some(Err(why)) => t.problems.push(format!("{dfly}: disklabel64 {why}")),
        None => {}
    }
    Ok(())
}

/// One partition of a disklabel64, relative to its slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label64Part {
    pub offset: u64,
    pub size: u64,
    pub fstype: u8,
    pub type_guid: Guid,
}

/// The disklabel64 at the start of `slice`: `None` when there is none
/// (no magic), `Some(Err(why))` when it is damaged, else its live
/// partitions with their letters.
#[allow(clippy::type_complexity)]
pub fn read_disklabel64(
    slice: &dyn BlockDevice,
) -> io::Result<Option<Result<Vec<(char, Label64Part)>, String>>> {
    let need = (L64_PARTS_AT + MAXPARTITIONS64 * L64_PART_BYTES) as u64;
    if slice.size_bytes() < need {
        return Ok(None);
    }
    let b = read(slice, 0, need as usize)?;
    if le32(&b, L64_MAGIC_AT) != DISKMAGIC64 {
        return Ok(None);
    }
    Ok(Some(parse_label64(&b, slice.size_bytes())))
}

fn parse_label64(b: &[u8], slice_size: u64) -> Result<Vec<(char, Label64Part)>, String> {
    let n = le32(b, 524) as usize;
    if n > MAXPARTITIONS64 {
        return Err(format!("claims {n} partitions (at most {MAXPARTITIONS64})"));
    }
    let end = L64_PARTS_AT + n * L64_PART_BYTES;
    let mut crcd = b[L64_MAGIC_AT..end].to_vec();
    crcd[4..8].fill(0);
    let want = le32(b, 516);
    let got = crc32fast::hash(&crcd);
    if got != want {
        return Err(format!("has a bad CRC ({got:#010x}, stored {want:#010x})"));
    }
    let mut parts = Vec::new();
    for i in 0..n {
        let p = &b[L64_PARTS_AT + i * L64_PART_BYTES..][..L64_PART_BYTES];
        let (offset, size) = (le64(p, 0), le64(p, 8));
        if size == 0 {
            continue;
        }
        let letter = (b'a' + i as u8) as char;
        if offset.checked_add(size).is_none_or(|e| e > slice_size) {
            return Err(format!("partition {letter} lies outside its slice"));
        }
        let mut g = [0u8; 16];
        g.copy_from_slice(&p[32..48]);
        parts.push((
            letter,
            Label64Part {
                offset,
                size,
                fstype: p[16],
                type_guid: Guid(g),
            },
        ));
    }
    Ok(parts)
}

/// A disklabel64 for a slice of `slice_size` bytes with these
/// partitions (letter order, `None` for an unused one), as DragonFly's
/// `disklabel64 -w` lays one out: 32 KiB reserved for the label and
/// boot code, the backup label's room at the end. Returns the bytes to
/// write at the start of the slice. For tests and tools that make disks.
pub fn encode_disklabel64(slice_size: u64, parts: &[Option<Label64Part>]) -> Vec<u8> {
    let n = parts.len().min(MAXPARTITIONS64);
    let mut b = vec![0u8; L64_PARTS_AT + MAXPARTITIONS64 * L64_PART_BYTES];
    b[512..516].copy_from_slice(&DISKMAGIC64.to_le_bytes());
    b[520..524].copy_from_slice(&4096u32.to_le_bytes());
    b[524..528].copy_from_slice(&(n as u32).to_le_bytes());
    b[544..552].copy_from_slice(&slice_size.to_le_bytes());
    let reserved = 4096u64;
    b[552..560].copy_from_slice(&reserved.to_le_bytes());
    b[560..568].copy_from_slice(&(reserved + 32768).to_le_bytes());
    b[568..576].copy_from_slice(&(slice_size - reserved).to_le_bytes());
    b[576..584].copy_from_slice(&(slice_size - reserved).to_le_bytes());
    for (i, p) in parts.iter().take(n).enumerate() {
        let Some(p) = p else { continue };
        let at = L64_PARTS_AT + i * L64_PART_BYTES;
        b[at..at + 8].copy_from_slice(&p.offset.to_le_bytes());
        b[at + 8..at + 16].copy_from_slice(&p.size.to_le_bytes());
        b[at + 16] = p.fstype;
        b[at + 32..at + 48].copy_from_slice(&p.type_guid.0);
    }
    let crc = crc32fast::hash(&b[512..L64_PARTS_AT + n * L64_PART_BYTES]);
    b[516..520].copy_from_slice(&crc.to_le_bytes());
    b
}

/// GPT with sectors of `ss` bytes: the primary header, else the backup at
/// the last sector. `None` when neither is valid.
fn read_gpt(dev: &dyn BlockDevice, ss: u64) -> io::Result<Option<Table>> {
    let size = dev.size_bytes();
    let last = size / ss - 1;
    let mut problems = Vec::new();
    for lba in [1, last] {
        match read_gpt_at(dev, ss, lba)? {
            Ok(mut t) => {
                if lba != 1 {
                    problems.push("the primary GPT header is damaged; read the backup".into());
                }
                t.problems.splice(0..0, problems);
                return Ok(Some(t));
            }
            Err(why) if ss == SECTOR => problems.push(why),
            Err(_) => {}
        }
    }
    Ok(None)
}

fn read_gpt_at(dev: &dyn BlockDevice, ss: u64, lba: u64) -> io::Result<Result<Table, String>> {
    let size = dev.size_bytes();
    let at = lba * ss;
    if at + ss > size {
        return Ok(Err(format!("GPT header at LBA {lba}: past the disk's end")));
    }
    let h = read(dev, at, ss as usize)?;
    if &h[0..8] != b"EFI PART" {
        return Ok(Err(format!("GPT header at LBA {lba}: no signature")));
    }
    let hsize = le32(&h, 12) as usize;
    if !(92..=ss as usize).contains(&hsize) {
        return Ok(Err(format!("GPT header at LBA {lba}: size {hsize}")));
    }
    let mut c = h[..hsize].to_vec();
    c[16..20].fill(0);
    if crc32fast::hash(&c) != le32(&h, 16) {
        return Ok(Err(format!("GPT header at LBA {lba}: bad CRC")));
    }
    let table_lba = le64(&h, 72);
    let count = le32(&h, 80);
    let entsz = le32(&h, 84);
    if count > GPT_MAX_ENTRIES || !(128..=4096).contains(&entsz) || !entsz.is_multiple_of(8) {
        return Ok(Err(format!(
            "GPT header at LBA {lba}: {count} entries of {entsz} bytes"
        )));
    }
    let bytes = count as u64 * entsz as u64;
    let Some(tat) = table_lba
        .checked_mul(ss)
        .filter(|&s| s.checked_add(bytes).is_some_and(|e| e <= size))
    else {
        return Ok(Err(format!(
            "GPT header at LBA {lba}: entry array outside the disk"
        )));
    };
    let arr = read(dev, tat, bytes as usize)?;
    if crc32fast::hash(&arr) != le32(&h, 88) {
        return Ok(Err(format!("GPT entry array at LBA {table_lba}: bad CRC")));
    }
    let mut t = Table {
        scheme: "GPT",
        partitions: Vec::new(),
        problems: Vec::new(),
    };
    for i in 0..count as usize {
        let e = &arr[i * entsz as usize..][..128];
        let mut g = [0u8; 16];
        g.copy_from_slice(&e[0..16]);
        let type_guid = Guid(g);
        if type_guid.is_nil() {
            continue;
        }
        let (first, last) = (le64(e, 32), le64(e, 40));
        let name: Vec<u16> = (0..36)
            .map(|k| le16(e, 56 + 2 * k))
            .take_while(|&u| u != 0)
            .collect();
        let name = String::from_utf16_lossy(&name);
        let Some((start, len)) = last
            .checked_sub(first)
            .and_then(|n| extent(first, n + 1, ss, size))
        else {
            t.problems
                .push(format!("s{i}: GPT entry lies outside the disk"));
            continue;
        };
        push_with_label(
            dev,
            &mut t,
            format!("s{i}"),
            format!("p{}", i + 1),
            start,
            len,
            Kind::Gpt { type_guid, name },
        )?;
    }
    Ok(Ok(t))
}

/// A range of another device as a device of its own: a partition. Reads
/// and writes are checked against the range; barriers and marks go to
/// the device under it.
pub struct RangeDevice {
    inner: Arc<dyn BlockDevice>,
    start: u64,
    size: u64,
}

impl RangeDevice {
    /// `size` bytes of `inner` from `start`; an error if that is not
    /// inside it.
    pub fn new(inner: Arc<dyn BlockDevice>, start: u64, size: u64) -> io::Result<RangeDevice> {
        if start
            .checked_add(size)
            .is_none_or(|e| e > inner.size_bytes())
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range of {size} bytes at {start} is past the device's end ({})",
                    inner.size_bytes()
                ),
            ));
        }
        Ok(RangeDevice { inner, start, size })
    }

    pub fn start(&self) -> u64 {
        self.start
    }
}

/// A borrowed range, for reading a label inside a slice.
struct RangeRef<'a> {
    inner: &'a dyn BlockDevice,
    start: u64,
    size: u64,
}

impl RangeDevice {
    fn new_ref(inner: &dyn BlockDevice, start: u64, size: u64) -> RangeRef<'_> {
        RangeRef { inner, start, size }
    }
}

fn in_range(offset: u64, len: usize, size: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(e) if e <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("access of {len} bytes at {offset:#x} is past the partition's end {size:#x}"),
        )),
    }
}

impl BlockDevice for RangeRef<'_> {
    fn size_bytes(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        in_range(offset, buf.len(), self.size)?;
        self.inner.read_at(buf, self.start + offset)
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "read-only view",
        ))
    }
    fn barrier(&self) -> io::Result<()> {
        Ok(())
    }
}

impl BlockDevice for RangeDevice {
    fn size_bytes(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        in_range(offset, buf.len(), self.size)?;
        self.inner.read_at(buf, self.start + offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        in_range(offset, buf.len(), self.size)?;
        self.inner.write_at(buf, self.start + offset)
    }
    fn write_gathered(&self, pieces: &[&[u8]], offset: u64) -> io::Result<()> {
        in_range(offset, pieces.iter().map(|p| p.len()).sum(), self.size)?;
        self.inner.write_gathered(pieces, self.start + offset)
    }
    fn write_many(&self, writes: &[(u64, Vec<&[u8]>)]) -> Vec<io::Result<()>> {
        let mut out: Vec<Option<io::Result<()>>> = Vec::with_capacity(writes.len());
        let mut inner = Vec::with_capacity(writes.len());
        for (offset, pieces) in writes {
            match in_range(*offset, pieces.iter().map(|p| p.len()).sum(), self.size) {
                Ok(()) => {
                    out.push(None);
                    inner.push((self.start + offset, pieces.clone()));
                }
                Err(e) => out.push(Some(Err(e))),
            }
        }
        let mut done = self.inner.write_many(&inner).into_iter();
        out.into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    done.next()
                        .unwrap_or_else(|| Err(io::Error::other("a write went unanswered")))
                })
            })
            .collect()
    }
    fn barrier(&self) -> io::Result<()> {
        self.inner.barrier()
    }
    fn mark(&self, name: &str) -> io::Result<()> {
        self.inner.mark(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemDevice;

    const MIB: u64 = 1 << 20;

    fn mbr_entry(b: &mut [u8], i: usize, ty: u8, start: u32, len: u32) {
        let e = &mut b[446 + 16 * i..462 + 16 * i];
        e[4] = ty;
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&len.to_le_bytes());
    }

    fn sig(b: &mut [u8]) {
        b[510] = 0x55;
        b[511] = 0xaa;
    }

    fn l64(offset: u64, size: u64, fstype: u8) -> Option<Label64Part> {
        Some(Label64Part {
            offset,
            size,
            fstype,
            type_guid: Guid([0; 16]),
        })
    }

    /// An MBR disk: s1 a DragonFly slice with a disklabel64 (a: 1 MiB,
    /// d: HAMMER2 from 2 MiB), s2 Linux, s3 extended with two logicals.
    fn mbr_disk() -> MemDevice {
        let dev = MemDevice::new(64 * MIB);
        let mut s0 = vec![0u8; 512];
        mbr_entry(&mut s0, 0, MBR_DRAGONFLY, 2048, 16384); // 1..9 MiB
        mbr_entry(&mut s0, 1, 0x83, 20480, 8192); // 10..14 MiB
        mbr_entry(&mut s0, 2, 0x05, 32768, 65536); // 16..48 MiB
        sig(&mut s0);
        dev.write_at(&s0, 0).unwrap();
        let label = encode_disklabel64(
            8 * MIB,
            &[
                l64(MIB, MIB, 7),
                None,
                None,
                l64(2 * MIB, 6 * MIB, FS_HAMMER2),
            ],
        );
        dev.write_at(&label, MIB).unwrap();
        // EBR 1 at 16 MiB: logical at +1 MiB for 4 MiB; next EBR at +8 MiB.
        let mut e1 = vec![0u8; 512];
        mbr_entry(&mut e1, 0, 0x83, 2048, 8192);
        mbr_entry(&mut e1, 1, 0x05, 16384, 16384);
        sig(&mut e1);
        dev.write_at(&e1, 16 * MIB).unwrap();
        // EBR 2 at 24 MiB: logical at +1 MiB for 2 MiB, last.
        let mut e2 = vec![0u8; 512];
        mbr_entry(&mut e2, 0, 0x82, 2048, 4096);
        sig(&mut e2);
        dev.write_at(&e2, 24 * MIB).unwrap();
        dev
    }

    #[test]
    fn mbr_with_a_disklabel64_slice_and_logical_partitions() {
        let t = read_table(&mbr_disk()).unwrap().unwrap();
        assert_eq!(t.scheme, "MBR");
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        let names: Vec<(&str, &str, u64, u64)> = t
            .partitions
            .iter()
            .map(|p| {
                (
                    p.dfly.as_str(),
                    p.linux.as_str(),
                    p.start / MIB,
                    p.size / MIB,
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                ("s1", "p1", 1, 8),
                ("s1a", "p1a", 2, 1),
                ("s1d", "p1d", 3, 6),
                ("s2", "p2", 10, 4),
                ("s5", "p5", 17, 4),
                ("s6", "p6", 25, 2),
            ]
        );
        assert!(t.partitions[0].has_label);
        assert!(t.partitions[2].typed_hammer2());
        assert_eq!(t.partitions[2].type_name(), "disklabel64 HAMMER2");
        assert_eq!(t.partitions[0].type_name(), "MBR 0x6c DragonFly");
        let sel = Selector::parse("s1d").unwrap();
        assert!(t.partitions[2].matches(&sel));
        assert!(t.partitions[2].matches(&Selector::parse("p1d").unwrap()));
    }

    #[test]
    fn damage_is_reported_not_followed() {
        let dev = mbr_disk();
        // A label with a bad CRC: the slice stays, its partitions go.
        dev.write_at(&[0xff], MIB + 600).unwrap();
        let t = read_table(&dev).unwrap().unwrap();
        assert!(t.partitions.iter().all(|p| p.dfly.len() == 2), "{t:?}");
        assert!(t.problems.iter().any(|p| p.contains("bad CRC")), "{t:?}");
        // An EBR chain that points back at itself.
        let dev = mbr_disk();
        let mut e2 = vec![0u8; 512];
        mbr_entry(&mut e2, 0, 0x82, 2048, 4096);
        mbr_entry(&mut e2, 1, 0x05, 0, 16384);
        mbr_entry(&mut e2, 1, 0x05, 16384, 16384);
        sig(&mut e2);
        dev.write_at(&e2, 24 * MIB).unwrap();
        let t = read_table(&dev).unwrap().unwrap();
        assert!(t.problems.iter().any(|p| p.contains("loops")), "{t:?}");
        // A primary past the end of the disk.
        let dev = mbr_disk();
        let mut s0 = vec![0u8; 512];
        dev.read_at(&mut s0, 0).unwrap();
        mbr_entry(&mut s0, 3, 0x83, 100_000, 100_000);
        dev.write_at(&s0, 0).unwrap();
        let t = read_table(&dev).unwrap().unwrap();
        assert!(t.problems.iter().any(|p| p.starts_with("s4")), "{t:?}");
        assert_eq!(t.partitions.len(), 6);
    }

    #[test]
    fn no_table_is_none() {
        assert!(read_table(&MemDevice::new(MIB)).unwrap().is_none());
        // A boot sector with 0x55AA but a non-table first entry.
        let dev = MemDevice::new(MIB);
        let mut s0 = vec![0u8; 512];
        s0[446] = 0x12;
        sig(&mut s0);
        dev.write_at(&s0, 0).unwrap();
        assert!(read_table(&dev).unwrap().is_none());
    }

    fn gpt_disk(bad_primary: bool) -> MemDevice {
        let size = 64 * MIB;
        let dev = MemDevice::new(size);
        let mut s0 = vec![0u8; 512];
        mbr_entry(&mut s0, 0, 0xee, 1, (size / 512 - 1) as u32);
        sig(&mut s0);
        dev.write_at(&s0, 0).unwrap();
        let mut arr = vec![0u8; 128 * 128];
        let mut ent = |i: usize, t: Guid, first: u64, last: u64, name: &str| {
            let e = &mut arr[i * 128..(i + 1) * 128];
            e[0..16].copy_from_slice(&t.0);
            e[16] = i as u8 + 1;
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
            for (k, u) in name.encode_utf16().enumerate() {
                e[56 + 2 * k..58 + 2 * k].copy_from_slice(&u.to_le_bytes());
            }
        };
        ent(0, GPT_EFI, 2048, 4095, "efi");
        ent(1, GPT_DFLY_LABEL64, 4096, 4096 + 16384 - 1, "dfly");
        ent(3, GPT_DFLY_HAMMER2, 40960, 40960 + 8192 - 1, "h2");
        let acrc = crc32fast::hash(&arr);
        let last = size / 512 - 1;
        let header = |self_lba: u64, alt: u64, table: u64| {
            let mut h = vec![0u8; 512];
            h[0..8].copy_from_slice(b"EFI PART");
            h[8..12].copy_from_slice(&0x10000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&self_lba.to_le_bytes());
            h[32..40].copy_from_slice(&alt.to_le_bytes());
            h[72..80].copy_from_slice(&table.to_le_bytes());
            h[80..84].copy_from_slice(&128u32.to_le_bytes());
            h[84..88].copy_from_slice(&128u32.to_le_bytes());
            h[88..92].copy_from_slice(&acrc.to_le_bytes());
            let c = crc32fast::hash(&h[..92]);
            h[16..20].copy_from_slice(&c.to_le_bytes());
            h
        };
        dev.write_at(&header(1, last, 2), 512).unwrap();
        dev.write_at(&arr, 1024).unwrap();
        dev.write_at(&arr, (last - 32) * 512).unwrap();
        dev.write_at(&header(last, 1, last - 32), last * 512)
            .unwrap();
        let label = encode_disklabel64(8 * MIB, &[None, None, None, l64(MIB, 4 * MIB, FS_HAMMER2)]);
        dev.write_at(&label, 2 * MIB).unwrap();
        if bad_primary {
            dev.write_at(&[0x42], 512 + 40).unwrap();
        }
        dev
    }

    /// A primary header whose entry array would lie past the end of the
    /// address space (its CRC right): reported, and the backup used.
    #[test]
    fn a_gpt_entry_array_beyond_any_disk_is_a_problem() {
        let dev = gpt_disk(false);
        let mut h = vec![0u8; 512];
        dev.read_at(&mut h, 512).unwrap();
        h[72..80].copy_from_slice(&(u64::MAX / 512).to_le_bytes());
        h[16..20].fill(0);
        let c = crc32fast::hash(&h[..92]);
        h[16..20].copy_from_slice(&c.to_le_bytes());
        dev.write_at(&h, 512).unwrap();
        let t = read_table(&dev).unwrap().unwrap();
        assert!(
            t.problems.iter().any(|p| p.contains("outside the disk")),
            "{:?}",
            t.problems
        );
        assert_eq!(t.partitions.len(), 4, "{t:?}");
    }

    #[test]
    fn gpt_with_a_disklabel64_partition_and_its_backup_header() {
        for bad in [false, true] {
            let t = read_table(&gpt_disk(bad)).unwrap().unwrap();
            assert_eq!(t.scheme, "GPT");
            assert_eq!(t.problems.is_empty(), !bad, "{:?}", t.problems);
            let names: Vec<(&str, &str, u64, u64)> = t
                .partitions
                .iter()
                .map(|p| {
                    (
                        p.dfly.as_str(),
                        p.linux.as_str(),
                        p.start / MIB,
                        p.size / MIB,
                    )
                })
                .collect();
            assert_eq!(
                names,
                [
                    ("s0", "p1", 1, 1),
                    ("s1", "p2", 2, 8),
                    ("s1d", "p2d", 3, 4),
                    ("s3", "p4", 20, 4),
                ]
            );
            assert_eq!(t.partitions[3].type_name(), "GPT DragonFly HAMMER2");
            assert!(t.partitions[3].typed_hammer2());
            match &t.partitions[0].kind {
                Kind::Gpt { name, .. } => assert_eq!(name, "efi"),
                k => panic!("{k:?}"),
            }
        }
        assert_eq!(
            GPT_DFLY_HAMMER2.to_string(),
            "5cbb9ad1-862d-11dc-a94d-01301bb8a9f5"
        );
    }

    #[test]
    fn selectors() {
        for (s, ok) in [
            ("s1d", true),
            ("s0", true),
            ("p12", true),
            ("p2a", true),
            ("s1q", false),
            ("s", false),
            ("x1", false),
            ("s01", false),
            ("p1dd", false),
            ("s12345", false),
            ("/path", false),
        ] {
            assert_eq!(Selector::parse(s).is_some(), ok, "{s}");
            if ok {
                assert_eq!(Selector::parse(s).unwrap().to_string(), s);
            }
        }
    }

    #[test]
    fn a_range_device_keeps_to_its_range() {
        let mem: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(MIB));
        let r = RangeDevice::new(mem.clone(), 4096, 8192).unwrap();
        r.write_at(b"abc", 8189).unwrap();
        let mut b = [0u8; 3];
        mem.read_at(&mut b, 4096 + 8189).unwrap();
        assert_eq!(&b, b"abc");
        assert!(r.write_at(b"abcd", 8189).is_err());
        assert!(r.read_at(&mut [0u8; 1], 8192).is_err());
        assert!(RangeDevice::new(mem, MIB - 10, 11).is_err());
    }
}
