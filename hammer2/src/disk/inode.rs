//! The 1 KiB inode: 256 bytes of meta, 256 bytes of filename, and a
//! 512-byte union holding either a blockset or direct data.

use super::blockref::{Blockref, BLOCKREF_BYTES};
use super::le::{put_u16, put_u32, put_u64, u16_at, u32_at, u64_at};
use super::uuid::Uuid;
use super::{EMBEDDED_BYTES, INODE_MAXNAME, OPFLAG_DIRECTDATA, SET_COUNT};
use crate::error::{Error, Result};

pub const INODE_BYTES: usize = 1024;
pub const META_BYTES: usize = 256;
const OFF_FILENAME: usize = 0x100;
const OFF_UNION: usize = 0x200;
const _: () = assert!(OFF_FILENAME == META_BYTES);
const _: () = assert!(OFF_UNION == OFF_FILENAME + INODE_MAXNAME);
const _: () = assert!(OFF_UNION + EMBEDDED_BYTES == INODE_BYTES);
const _: () = assert!(SET_COUNT * BLOCKREF_BYTES == EMBEDDED_BYTES);

// struct hammer2_inode_meta field offsets.
const M_VERSION: usize = 0x00;
const M_PFS_SUBTYPE: usize = 0x03;
const M_UFLAGS: usize = 0x04;
const M_RMAJOR: usize = 0x08;
const M_RMINOR: usize = 0x0C;
const M_CTIME: usize = 0x10;
const M_MTIME: usize = 0x18;
const M_ATIME: usize = 0x20;
const M_BTIME: usize = 0x28;
const M_UID: usize = 0x30;
const M_GID: usize = 0x40;
const M_TYPE: usize = 0x50;
const M_OP_FLAGS: usize = 0x51;
const M_CAP_FLAGS: usize = 0x52;
const M_MODE: usize = 0x54;
const M_INUM: usize = 0x58;
const M_SIZE: usize = 0x60;
const M_NLINKS: usize = 0x68;
const M_IPARENT: usize = 0x70;
const M_NAME_KEY: usize = 0x78;
const M_NAME_LEN: usize = 0x80;
const M_NCOPIES: usize = 0x82;
const M_COMP_ALGO: usize = 0x83;
const M_CHECK_ALGO: usize = 0x85;
const M_PFS_NMASTERS: usize = 0x86;
const M_PFS_TYPE: usize = 0x87;
const M_PFS_INUM: usize = 0x88;
const M_PFS_CLID: usize = 0x90;
const M_PFS_FSID: usize = 0xA0;
const M_DATA_QUOTA: usize = 0xB0;
const M_INODE_QUOTA: usize = 0xC0;
const M_PFS_LSNAP_TID: usize = 0xD0;
const M_DECRYPT_CHECK: usize = 0xE0;
const _: () = assert!(M_DECRYPT_CHECK + 8 + 24 == META_BYTES);
const _: () = assert!(M_GID + 16 == M_TYPE);
const _: () = assert!(M_PFS_FSID + 16 == M_DATA_QUOTA);

pub const INODE_VERSION_ONE: u16 = 1;

/// Object types (`meta.type`, and the dirent head's type).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum ObjType {
    Unknown,
    Directory,
    Regfile,
    Fifo,
    Cdev,
    Bdev,
    Softlink,
    Socket,
    Whiteout,
    Invalid(u8),
}

impl ObjType {
    pub fn from_u8(v: u8) -> ObjType {
        match v {
            0 => ObjType::Unknown,
            1 => ObjType::Directory,
            2 => ObjType::Regfile,
            4 => ObjType::Fifo,
            5 => ObjType::Cdev,
            6 => ObjType::Bdev,
            7 => ObjType::Softlink,
            9 => ObjType::Socket,
            10 => ObjType::Whiteout,
            other => ObjType::Invalid(other),
        }
    }
    pub fn to_u8(self) -> u8 {
        match self {
            ObjType::Unknown => 0,
            ObjType::Directory => 1,
            ObjType::Regfile => 2,
            ObjType::Fifo => 4,
            ObjType::Cdev => 5,
            ObjType::Bdev => 6,
            ObjType::Softlink => 7,
            ObjType::Socket => 9,
            ObjType::Whiteout => 10,
            ObjType::Invalid(v) => v,
        }
    }
    /// The `S_IFMT` bits for this type (0 where there is none).
    pub fn mode_bits(self) -> u32 {
        match self {
            ObjType::Directory => 0o040000,
            ObjType::Regfile => 0o100000,
            ObjType::Fifo => 0o010000,
            ObjType::Cdev => 0o020000,
            ObjType::Bdev => 0o060000,
            ObjType::Softlink => 0o120000,
            ObjType::Socket => 0o140000,
            _ => 0,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            ObjType::Unknown => "UNKNOWN",
            ObjType::Directory => "DIR",
            ObjType::Regfile => "FILE",
            ObjType::Fifo => "FIFO",
            ObjType::Cdev => "CDEV",
            ObjType::Bdev => "BDEV",
            ObjType::Softlink => "SOFTLINK",
            ObjType::Socket => "SOCKET",
            ObjType::Whiteout => "WHITEOUT",
            ObjType::Invalid(_) => "ILLEGAL",
        }
    }
}

/// An inode time field as a `SystemTime`: microseconds since the epoch,
/// signed (DragonFly writes `(u64)tv_sec * 1000000 + usec`, so a time
/// before 1970 lands as its two's complement; DragonFly reads the field
/// unsigned, so a value of 2^63 or more, which it only writes for a time
/// before 1970, reads there as after the year 292,277).
pub fn system_time(us: u64) -> std::time::SystemTime {
    use std::time::{Duration, UNIX_EPOCH};
    let us = us as i64;
    match u64::try_from(us) {
        Ok(after) => UNIX_EPOCH + Duration::from_micros(after),
        Err(_) => UNIX_EPOCH - Duration::from_micros(us.unsigned_abs()),
    }
}

/// The inode's meta section.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct InodeMeta {
    pub version: u16,
    pub pfs_subtype: u8,
    pub uflags: u32,
    pub rmajor: u32,
    pub rminor: u32,
    /// Times in microseconds since the epoch, signed: a time before 1970
    /// in two's complement, as DragonFly writes it (`system_time`).
    pub ctime: u64,
    pub mtime: u64,
    pub atime: u64,
    pub btime: u64,
    pub uid: Uuid,
    pub gid: Uuid,
    pub obj_type: ObjType,
    pub op_flags: u8,
    pub cap_flags: u16,
    pub mode: u32,
    pub inum: u64,
    pub size: u64,
    pub nlinks: u64,
    pub iparent: u64,
    pub name_key: u64,
    pub name_len: u16,
    pub ncopies: u8,
    pub comp_algo: u8,
    pub check_algo: u8,
    pub pfs_nmasters: u8,
    pub pfs_type: u8,
    pub pfs_inum: u64,
    pub pfs_clid: Uuid,
    pub pfs_fsid: Uuid,
    pub data_quota: u64,
    pub inode_quota: u64,
    pub pfs_lsnap_tid: u64,
    pub decrypt_check: u64,
}

impl Default for InodeMeta {
    fn default() -> Self {
        InodeMeta {
            version: INODE_VERSION_ONE,
            pfs_subtype: 0,
            uflags: 0,
            rmajor: 0,
            rminor: 0,
            ctime: 0,
            mtime: 0,
            atime: 0,
            btime: 0,
            uid: Uuid::NIL,
            gid: Uuid::NIL,
            obj_type: ObjType::Unknown,
            op_flags: 0,
            cap_flags: 0,
            mode: 0,
            inum: 0,
            size: 0,
            nlinks: 0,
            iparent: 0,
            name_key: 0,
            name_len: 0,
            ncopies: 0,
            comp_algo: 0,
            check_algo: 0,
            pfs_nmasters: 0,
            pfs_type: 0,
            pfs_inum: 0,
            pfs_clid: Uuid::NIL,
            pfs_fsid: Uuid::NIL,
            data_quota: 0,
            inode_quota: 0,
            pfs_lsnap_tid: 0,
            decrypt_check: 0,
        }
    }
}

impl InodeMeta {
    fn decode(b: &[u8]) -> InodeMeta {
        InodeMeta {
            version: u16_at(b, M_VERSION),
            pfs_subtype: b[M_PFS_SUBTYPE],
            uflags: u32_at(b, M_UFLAGS),
            rmajor: u32_at(b, M_RMAJOR),
            rminor: u32_at(b, M_RMINOR),
            ctime: u64_at(b, M_CTIME),
            mtime: u64_at(b, M_MTIME),
            atime: u64_at(b, M_ATIME),
            btime: u64_at(b, M_BTIME),
            uid: Uuid::decode(&b[M_UID..M_UID + 16]),
            gid: Uuid::decode(&b[M_GID..M_GID + 16]),
            obj_type: ObjType::from_u8(b[M_TYPE]),
            op_flags: b[M_OP_FLAGS],
            cap_flags: u16_at(b, M_CAP_FLAGS),
            mode: u32_at(b, M_MODE),
            inum: u64_at(b, M_INUM),
            size: u64_at(b, M_SIZE),
            nlinks: u64_at(b, M_NLINKS),
            iparent: u64_at(b, M_IPARENT),
            name_key: u64_at(b, M_NAME_KEY),
            name_len: u16_at(b, M_NAME_LEN),
            ncopies: b[M_NCOPIES],
            comp_algo: b[M_COMP_ALGO],
            check_algo: b[M_CHECK_ALGO],
            pfs_nmasters: b[M_PFS_NMASTERS],
            pfs_type: b[M_PFS_TYPE],
            pfs_inum: u64_at(b, M_PFS_INUM),
            pfs_clid: Uuid::decode(&b[M_PFS_CLID..M_PFS_CLID + 16]),
            pfs_fsid: Uuid::decode(&b[M_PFS_FSID..M_PFS_FSID + 16]),
            data_quota: u64_at(b, M_DATA_QUOTA),
            inode_quota: u64_at(b, M_INODE_QUOTA),
            pfs_lsnap_tid: u64_at(b, M_PFS_LSNAP_TID),
            decrypt_check: u64_at(b, M_DECRYPT_CHECK),
        }
    }

    fn encode(&self, b: &mut [u8]) {
        b[..META_BYTES].fill(0);
        put_u16(b, M_VERSION, self.version);
        b[M_PFS_SUBTYPE] = self.pfs_subtype;
        put_u32(b, M_UFLAGS, self.uflags);
        put_u32(b, M_RMAJOR, self.rmajor);
        put_u32(b, M_RMINOR, self.rminor);
        put_u64(b, M_CTIME, self.ctime);
        put_u64(b, M_MTIME, self.mtime);
        put_u64(b, M_ATIME, self.atime);
        put_u64(b, M_BTIME, self.btime);
        self.uid.encode(&mut b[M_UID..M_UID + 16]);
        self.gid.encode(&mut b[M_GID..M_GID + 16]);
        b[M_TYPE] = self.obj_type.to_u8();
        b[M_OP_FLAGS] = self.op_flags;
        put_u16(b, M_CAP_FLAGS, self.cap_flags);
        put_u32(b, M_MODE, self.mode);
        put_u64(b, M_INUM, self.inum);
        put_u64(b, M_SIZE, self.size);
        put_u64(b, M_NLINKS, self.nlinks);
        put_u64(b, M_IPARENT, self.iparent);
        put_u64(b, M_NAME_KEY, self.name_key);
        put_u16(b, M_NAME_LEN, self.name_len);
        b[M_NCOPIES] = self.ncopies;
        b[M_COMP_ALGO] = self.comp_algo;
        b[M_CHECK_ALGO] = self.check_algo;
        b[M_PFS_NMASTERS] = self.pfs_nmasters;
        b[M_PFS_TYPE] = self.pfs_type;
        put_u64(b, M_PFS_INUM, self.pfs_inum);
        self.pfs_clid.encode(&mut b[M_PFS_CLID..M_PFS_CLID + 16]);
        self.pfs_fsid.encode(&mut b[M_PFS_FSID..M_PFS_FSID + 16]);
        put_u64(b, M_DATA_QUOTA, self.data_quota);
        put_u64(b, M_INODE_QUOTA, self.inode_quota);
        put_u64(b, M_PFS_LSNAP_TID, self.pfs_lsnap_tid);
        put_u64(b, M_DECRYPT_CHECK, self.decrypt_check);
    }

    pub fn has_direct_data(&self) -> bool {
        self.op_flags & OPFLAG_DIRECTDATA != 0
    }
    pub fn is_pfs_root(&self) -> bool {
        self.op_flags & super::OPFLAG_PFSROOT != 0
    }
    pub fn uid_unix(&self) -> u32 {
        self.uid.unix_id()
    }
    pub fn gid_unix(&self) -> u32 {
        self.gid.unix_id()
    }
}

/// A whole inode as stored in its 1 KiB block.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct InodeData {
    pub meta: InodeMeta,
    pub filename: [u8; INODE_MAXNAME],
    /// The union: a blockset (4 blockrefs) or direct data.
    pub u: [u8; EMBEDDED_BYTES],
}

impl Default for InodeData {
    fn default() -> Self {
        InodeData {
            meta: InodeMeta::default(),
            filename: [0; INODE_MAXNAME],
            u: [0; EMBEDDED_BYTES],
        }
    }
}

impl InodeData {
    /// Decode an inode block; it must be at least 1 KiB.
    pub fn decode(b: &[u8], at: u64) -> Result<InodeData> {
        if b.len() < INODE_BYTES {
            return Err(Error::corrupt(
                format!("inode block is {} bytes, need {INODE_BYTES}", b.len()),
                at,
            ));
        }
        let mut filename = [0u8; INODE_MAXNAME];
        filename.copy_from_slice(&b[OFF_FILENAME..OFF_FILENAME + INODE_MAXNAME]);
        let mut u = [0u8; EMBEDDED_BYTES];
        u.copy_from_slice(&b[OFF_UNION..OFF_UNION + EMBEDDED_BYTES]);
        Ok(InodeData {
            meta: InodeMeta::decode(&b[..META_BYTES]),
            filename,
            u,
        })
    }

    pub fn encode(&self) -> [u8; INODE_BYTES] {
        let mut b = [0u8; INODE_BYTES];
        self.meta.encode(&mut b[..META_BYTES]);
        b[OFF_FILENAME..OFF_FILENAME + INODE_MAXNAME].copy_from_slice(&self.filename);
        b[OFF_UNION..OFF_UNION + EMBEDDED_BYTES].copy_from_slice(&self.u);
        b
    }

    /// The blockset in the union (meaningless when DIRECTDATA is set).
    pub fn blockset(&self) -> [Blockref; SET_COUNT] {
        let mut set = [Blockref::EMPTY; SET_COUNT];
        for (i, slot) in set.iter_mut().enumerate() {
            if let Some(br) = Blockref::decode_at(&self.u, i) {
                *slot = br;
            }
        }
        set
    }

    pub fn set_blockset(&mut self, set: &[Blockref; SET_COUNT]) {
        for (i, br) in set.iter().enumerate() {
            br.encode_at(&mut self.u, i);
        }
    }

    /// The filename field, cut at `name_len` (bounded by the field).
    pub fn name(&self) -> &[u8] {
        let n = (self.meta.name_len as usize).min(INODE_MAXNAME);
        &self.filename[..n]
    }

    pub fn set_name(&mut self, name: &[u8]) {
        let n = name.len().min(INODE_MAXNAME);
        self.filename = [0; INODE_MAXNAME];
        self.filename[..n].copy_from_slice(&name[..n]);
        self.meta.name_len = n as u16;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_signed() {
        use std::time::{Duration, UNIX_EPOCH};
        assert_eq!(system_time(1500), UNIX_EPOCH + Duration::from_micros(1500));
        // DragonFly's (u64)-2 * 1000000 + 500000 for -1.5 s.
        let raw = 0u64.wrapping_sub(2_000_000).wrapping_add(500_000);
        assert_eq!(system_time(raw), UNIX_EPOCH - Duration::from_millis(1500));
        assert_eq!(system_time(u64::MAX), UNIX_EPOCH - Duration::from_micros(1));
        let first = UNIX_EPOCH - Duration::from_micros(1 << 63);
        assert_eq!(system_time(1 << 63), first);
    }

    #[test]
    fn meta_round_trip_preserves_defined_fields() {
        let mut b = [0u8; INODE_BYTES];
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(13).wrapping_add(7);
        }
        let ino = InodeData::decode(&b, 0).unwrap();
        let again = InodeData::decode(&ino.encode(), 0).unwrap();
        assert_eq!(ino, again);
        // filename and union are carried whole.
        assert_eq!(&ino.encode()[0x100..], &b[0x100..]);
    }

    #[test]
    fn short_buffer_is_corrupt_not_panic() {
        assert!(InodeData::decode(&[0u8; 100], 0).is_err());
    }
}
