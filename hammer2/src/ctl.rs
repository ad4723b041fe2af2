//! The control channel between the `hammer2` admin tool and a running
//! mount.hammer2: the wire protocol both sides use (DragonFly's
//! hammer2(8) talks to its kernel through ioctls on a descriptor of any
//! file in the mount; this is the same idea over FUSE).
//!
//! Transport: one ioctl command, `CTL_IOC` = `_IOWR('h', 0x48, [u8;
//! CTL_BUF])`, on a descriptor of any file or directory of the mount.
//! FUSE forwards such "restricted" ioctls to the daemon because the
//! command encodes its direction and size: the kernel copies `CTL_BUF`
//! bytes in, and the daemon's reply (at most `CTL_BUF` bytes) back into
//! the same buffer. Every message is one buffer: a 32-byte header
//! (`MAGIC`, `VERSION`, the operation, an errno, the payload length)
//! and a payload of fields in little-endian order, strings as a u16
//! length and bytes. Long answers (the PFS list) come in pages, each
//! naming the cursor of the next.
//!
//! Errors travel in the reply header (errno and a message), so the tool
//! can tell "this mount keeps no write log" from a failed ioctl; the
//! ioctl itself fails only when the descriptor is not on a hammer2 mount
//! (ENOTTY) or the daemon is gone. A daemon that gets a version it does
//! not speak replies EPROTO and names its own.
//!
//! Nothing here does I/O: the tool issues the ioctl (mkfs's
//! `ctl_ioctl`), the daemon answers it (fuse-mount's `ctl`).

use crate::disk::Uuid;

/// Bytes of every request and reply buffer (`_IOC_SIZE` allows 16383).
pub const CTL_BUF: usize = 4096;
/// Header bytes at the start of each buffer.
pub const HEADER_BYTES: usize = 32;
/// Payload bytes a buffer holds.
pub const PAYLOAD_MAX: usize = CTL_BUF - HEADER_BYTES;
/// "H2CT".
pub const MAGIC: u32 = 0x5443_3248;
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// The ioctl group ('h', as DragonFly's HAMMER2IOC_*) and number.
pub const IOC_GROUP: u32 = b'h' as u32;
pub const IOC_NR: u32 = 0x48;

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// Linux's `_IOWR(IOC_GROUP, IOC_NR, [u8; CTL_BUF])`.
pub const CTL_IOC: u32 =
    ((IOC_READ | IOC_WRITE) << 30) | ((CTL_BUF as u32) << 16) | (IOC_GROUP << 8) | IOC_NR;

/// Operation codes.
pub mod op {
    pub const MOUNT_INFO: u16 = 1;
    pub const MARK: u16 = 2;
    pub const SNAPSHOT: u16 = 3;
    pub const PFS_LIST: u16 = 4;
    pub const PFS_CREATE: u16 = 5;
    pub const PFS_DELETE: u16 = 6;
    pub const BULKFREE_START: u16 = 7;
    pub const BULKFREE_STATUS: u16 = 8;
    pub const STAT: u16 = 9;
    pub const FLUSH: u16 = 10;
    pub const SET_METHODS: u16 = 11;
}

/// A request from the tool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// What the daemon serves: `MountInfo`.
    MountInfo,
    /// Put a named mark in the device's write log (`BlockDevice::mark`).
    Mark {
        name: String,
    },
    /// Flush, then snapshot the mounted PFS as `name` (asked on a path
    /// under `.snapshot/S`: snapshot S).
    Snapshot {
        name: String,
    },
    /// The PFSs and snapshots from `cursor` (0 = the first).
    PfsList {
        cursor: u64,
    },
    PfsCreate {
        label: String,
    },
    PfsDelete {
        label: String,
    },
    /// Start a bulkfree of `passes` passes in the background.
    BulkfreeStart {
        passes: u32,
    },
    /// How the running (or last) bulkfree is doing.
    BulkfreeStatus,
    /// The inode of the descriptor the ioctl was issued on.
    Stat,
    /// Flush, and return once the flush has committed.
    Flush,
    /// setcomp/setcheck: set the `comp_algo` and/or `check_algo` of the
    /// descriptor's inode (DragonFly's `HAMMER2IOC_INODE_SET`); the
    /// reply is its `Stat` after the change.
    SetMethods {
        comp: Option<u8>,
        check: Option<u8>,
    },
}

/// What the daemon serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountInfo {
    /// The PFS mounted; asked on a path under `.snapshot/S`, S.
    pub label: String,
    /// The image or device, as the daemon opened it (absolute).
    pub image: Vec<u8>,
    pub read_write: bool,
    /// `.snapshot` is served at the root.
    pub snapdir: bool,
    /// The daemon's version (`CARGO_PKG_VERSION`).
    pub daemon: String,
}

/// One PFS root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PfsEntry {
    pub label: Vec<u8>,
    pub pfs_type: u8,
    pub pfs_subtype: u8,
    pub clid: Uuid,
    pub fsid: Uuid,
    pub lsnap_tid: u64,
    pub inode_count: u64,
    pub data_count: u64,
    pub comp_algo: u8,
    pub check_algo: u8,
    /// Mounted by this daemon.
    pub mounted: bool,
}

/// State of the daemon's bulkfree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BulkfreeStatus {
    /// 0 none has run, 1 running, 2 finished, 3 failed.
    pub state: u8,
    /// The pass running or last run (1-based), and of how many.
    pub pass: u32,
    pub passes: u32,
    /// Scan progress of the current pass.
    pub brefs: u64,
    pub bytes: u64,
    pub bytes_in_use: u64,
    /// Freemap blocks freed and staged, summed over finished passes
    /// (staged: by the last one).
    pub freed: u64,
    pub staged: u64,
    /// Human-readable lines, one per finished pass, or why it failed.
    pub report: String,
}

pub mod bulkfree_state {
    pub const NONE: u8 = 0;
    pub const RUNNING: u8 = 1;
    pub const DONE: u8 = 2;
    pub const FAILED: u8 = 3;
}

/// One inode, for `hammer2 stat`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InodeStat {
    pub inum: u64,
    pub obj_type: u8,
    pub comp_algo: u8,
    pub check_algo: u8,
    pub mode: u32,
    pub nlinks: u64,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub ctime: u64,
    pub mtime: u64,
    pub atime: u64,
    pub btime: u64,
    pub op_flags: u8,
    pub version: u16,
    /// Bytes of blocks under the inode as of the last flush
    /// (`data_count` of its blockref), and inodes (`inode_count`).
    pub data_count: u64,
    pub inode_count: u64,
    /// Logical bytes not yet flushed.
    pub dirty_bytes: u64,
}

/// A reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Done; nothing to return.
    Ok,
    MountInfo(MountInfo),
    PfsList {
        entries: Vec<PfsEntry>,
        /// The cursor of the next page, if there is one.
        next: Option<u64>,
    },
    Bulkfree(BulkfreeStatus),
    Stat(InodeStat),
    /// The operation failed with `errno`; `message` says why.
    Error {
        errno: i32,
        message: String,
    },
}

/// A buffer that does not decode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Not a control message (wrong magic, or too short).
    NotControl,
    /// Another protocol version.
    Version(u16),
    UnknownOp(u16),
    /// A field runs past the payload, or a string is not UTF-8.
    Malformed(&'static str),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::NotControl => write!(f, "not a hammer2 control message"),
            DecodeError::Version(v) => write!(
                f,
                "control protocol version {v}; this side speaks version {VERSION}"
            ),
            DecodeError::UnknownOp(o) => write!(f, "unknown control operation {o}"),
            DecodeError::Malformed(what) => write!(f, "malformed control message: {what}"),
        }
    }
}

/// A message too large for one buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TooLong;

/// Little-endian field writer over a payload.
#[derive(Default)]
struct Enc {
    b: Vec<u8>,
}

impl Enc {
    fn u8(&mut self, v: u8) {
        self.b.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.b.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.b.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.b.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        let n = v.len().min(u16::MAX as usize);
        self.u16(n as u16);
        self.b.extend_from_slice(&v[..n]);
    }
    fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    fn uuid(&mut self, u: &Uuid) {
        let mut b = [0u8; 16];
        u.encode(&mut b);
        self.b.extend_from_slice(&b);
    }
}

/// Field reader over a payload; every read checks the length.
struct Dec<'a> {
    b: &'a [u8],
}

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.b.len() < n {
            return Err(DecodeError::Malformed("field past the end"));
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(self.u32()? as i32)
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        let n = self.u16()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn str(&mut self) -> Result<String, DecodeError> {
        String::from_utf8(self.bytes()?).map_err(|_| DecodeError::Malformed("string not UTF-8"))
    }
    fn uuid(&mut self) -> Result<Uuid, DecodeError> {
        Ok(Uuid::decode(self.take(16)?))
    }
}

/// The header of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub op: u16,
    pub errno: i32,
    pub len: usize,
}

/// Decode a buffer's header (magic and version checked).
pub fn header(buf: &[u8]) -> Result<Header, DecodeError> {
    if buf.len() < HEADER_BYTES {
        return Err(DecodeError::NotControl);
    }
    let mut d = Dec { b: buf };
    if d.u32()? != MAGIC {
        return Err(DecodeError::NotControl);
    }
    let version = d.u16()?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let op = d.u16()?;
    let errno = d.i32()?;
    let len = d.u32()? as usize;
    if len > buf.len() - HEADER_BYTES {
        return Err(DecodeError::Malformed("payload length past the buffer"));
    }
    Ok(Header { op, errno, len })
}

/// A whole buffer (`CTL_BUF` bytes): header, payload, zeros.
fn frame(op: u16, errno: i32, payload: &[u8]) -> Result<Vec<u8>, TooLong> {
    if payload.len() > PAYLOAD_MAX {
        return Err(TooLong);
    }
    let mut b = Vec::with_capacity(CTL_BUF);
    b.extend_from_slice(&MAGIC.to_le_bytes());
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&op.to_le_bytes());
    b.extend_from_slice(&errno.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.resize(HEADER_BYTES, 0);
    b.extend_from_slice(payload);
    b.resize(CTL_BUF, 0);
    Ok(b)
}

impl Request {
    pub fn op(&self) -> u16 {
        match self {
            Request::MountInfo => op::MOUNT_INFO,
            Request::Mark { .. } => op::MARK,
            Request::Snapshot { .. } => op::SNAPSHOT,
            Request::PfsList { .. } => op::PFS_LIST,
            Request::PfsCreate { .. } => op::PFS_CREATE,
            Request::PfsDelete { .. } => op::PFS_DELETE,
            Request::BulkfreeStart { .. } => op::BULKFREE_START,
            Request::BulkfreeStatus => op::BULKFREE_STATUS,
            Request::Stat => op::STAT,
            Request::Flush => op::FLUSH,
            Request::SetMethods { .. } => op::SET_METHODS,
        }
    }

    /// Operations that change the volume (refused to users other than
    /// root).
    pub fn mutates(&self) -> bool {
        matches!(
            self,
            Request::Mark { .. }
                | Request::Snapshot { .. }
                | Request::PfsCreate { .. }
                | Request::PfsDelete { .. }
                | Request::BulkfreeStart { .. }
                | Request::Flush
                | Request::SetMethods { .. }
        )
    }

    /// The request as one buffer.
    pub fn encode(&self) -> Result<Vec<u8>, TooLong> {
        let mut e = Enc::default();
        match self {
            Request::MountInfo | Request::BulkfreeStatus | Request::Stat | Request::Flush => {}
            Request::Mark { name } | Request::Snapshot { name } => e.str(name),
            Request::PfsCreate { label } | Request::PfsDelete { label } => e.str(label),
            Request::PfsList { cursor } => e.u64(*cursor),
            Request::BulkfreeStart { passes } => e.u32(*passes),
            Request::SetMethods { comp, check } => {
                e.u8(comp.is_some() as u8 | (check.is_some() as u8) << 1);
                e.u8(comp.unwrap_or(0));
                e.u8(check.unwrap_or(0));
            }
        }
        frame(self.op(), 0, &e.b)
    }

    pub fn decode(buf: &[u8]) -> Result<Request, DecodeError> {
        let h = header(buf)?;
        let mut d = Dec {
            b: &buf[HEADER_BYTES..HEADER_BYTES + h.len],
        };
        Ok(match h.op {
            op::MOUNT_INFO => Request::MountInfo,
            op::MARK => Request::Mark { name: d.str()? },
            op::SNAPSHOT => Request::Snapshot { name: d.str()? },
            op::PFS_LIST => Request::PfsList { cursor: d.u64()? },
            op::PFS_CREATE => Request::PfsCreate { label: d.str()? },
            op::PFS_DELETE => Request::PfsDelete { label: d.str()? },
            op::BULKFREE_START => Request::BulkfreeStart { passes: d.u32()? },
            op::BULKFREE_STATUS => Request::BulkfreeStatus,
            op::STAT => Request::Stat,
            op::FLUSH => Request::Flush,
            op::SET_METHODS => {
                let (which, comp, check) = (d.u8()?, d.u8()?, d.u8()?);
                Request::SetMethods {
                    comp: (which & 1 != 0).then_some(comp),
                    check: (which & 2 != 0).then_some(check),
                }
            }
            o => return Err(DecodeError::UnknownOp(o)),
        })
    }
}

fn enc_pfs(e: &mut Enc, p: &PfsEntry) {
    e.bytes(&p.label);
    e.u8(p.pfs_type);
    e.u8(p.pfs_subtype);
    e.uuid(&p.clid);
    e.uuid(&p.fsid);
    e.u64(p.lsnap_tid);
    e.u64(p.inode_count);
    e.u64(p.data_count);
    e.u8(p.comp_algo);
    e.u8(p.check_algo);
    e.u8(p.mounted as u8);
}

fn dec_pfs(d: &mut Dec) -> Result<PfsEntry, DecodeError> {
    Ok(PfsEntry {
        label: d.bytes()?,
        pfs_type: d.u8()?,
        pfs_subtype: d.u8()?,
        clid: d.uuid()?,
        fsid: d.uuid()?,
        lsnap_tid: d.u64()?,
        inode_count: d.u64()?,
        data_count: d.u64()?,
        comp_algo: d.u8()?,
        check_algo: d.u8()?,
        mounted: d.u8()? != 0,
    })
}

/// Bytes `p` takes in a PFS list page.
pub fn pfs_entry_bytes(p: &PfsEntry) -> usize {
    let mut e = Enc::default();
    enc_pfs(&mut e, p);
    e.b.len()
}

/// Bytes of a PFS list page's fixed part (count, next cursor).
pub const PFS_PAGE_FIXED: usize = 2 + 1 + 8;

impl Reply {
    /// Reply to operation `op` as one buffer.
    pub fn encode(&self, op: u16) -> Result<Vec<u8>, TooLong> {
        let mut e = Enc::default();
        let mut errno = 0;
        match self {
            Reply::Ok => {}
            Reply::MountInfo(m) => {
                e.str(&m.label);
                e.bytes(&m.image);
                e.u8(m.read_write as u8);
                e.u8(m.snapdir as u8);
                e.str(&m.daemon);
            }
            Reply::PfsList { entries, next } => {
                e.u16(entries.len() as u16);
                e.u8(next.is_some() as u8);
                e.u64(next.unwrap_or(0));
                for p in entries {
                    enc_pfs(&mut e, p);
                }
            }
            Reply::Bulkfree(s) => {
                e.u8(s.state);
                e.u32(s.pass);
                e.u32(s.passes);
                e.u64(s.brefs);
                e.u64(s.bytes);
                e.u64(s.bytes_in_use);
                e.u64(s.freed);
                e.u64(s.staged);
                e.str(&s.report);
            }
            Reply::Stat(s) => {
                e.u64(s.inum);
                e.u8(s.obj_type);
                e.u8(s.comp_algo);
                e.u8(s.check_algo);
                e.u32(s.mode);
                e.u64(s.nlinks);
                e.u32(s.uid);
                e.u32(s.gid);
                e.u64(s.size);
                e.u64(s.ctime);
                e.u64(s.mtime);
                e.u64(s.atime);
                e.u64(s.btime);
                e.u8(s.op_flags);
                e.u16(s.version);
                e.u64(s.data_count);
                e.u64(s.inode_count);
                e.u64(s.dirty_bytes);
            }
            Reply::Error { errno: n, message } => {
                errno = (*n).max(1);
                // A message longer than a buffer is cut, not refused.
                let m = message.as_bytes();
                let mut cut = m.len().min(PAYLOAD_MAX - 2);
                while !message.is_char_boundary(cut) {
                    cut -= 1;
                }
                e.bytes(&m[..cut]);
            }
        }
        frame(op, errno, &e.b)
    }

    /// Decode the reply to operation `op`.
    pub fn decode(op: u16, buf: &[u8]) -> Result<Reply, DecodeError> {
        let h = header(buf)?;
        if h.op != op {
            return Err(DecodeError::Malformed("reply to another operation"));
        }
        let mut d = Dec {
            b: &buf[HEADER_BYTES..HEADER_BYTES + h.len],
        };
        if h.errno != 0 {
            let message = String::from_utf8_lossy(&d.bytes()?).into_owned();
            return Ok(Reply::Error {
                errno: h.errno,
                message,
            });
        }
        Ok(match op {
            op::MARK | op::SNAPSHOT | op::PFS_CREATE | op::PFS_DELETE | op::FLUSH => Reply::Ok,
            op::BULKFREE_START | op::BULKFREE_STATUS => Reply::Bulkfree(BulkfreeStatus {
                state: d.u8()?,
                pass: d.u32()?,
                passes: d.u32()?,
                brefs: d.u64()?,
                bytes: d.u64()?,
                bytes_in_use: d.u64()?,
                freed: d.u64()?,
                staged: d.u64()?,
                report: d.str()?,
            }),
            op::MOUNT_INFO => Reply::MountInfo(MountInfo {
                label: d.str()?,
                image: d.bytes()?,
                read_write: d.u8()? != 0,
                snapdir: d.u8()? != 0,
                daemon: d.str()?,
            }),
            op::PFS_LIST => {
                let n = d.u16()?;
                let more = d.u8()? != 0;
                let cursor = d.u64()?;
                let mut entries = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    entries.push(dec_pfs(&mut d)?);
                }
                Reply::PfsList {
                    entries,
                    next: more.then_some(cursor),
                }
            }
            op::STAT | op::SET_METHODS => Reply::Stat(InodeStat {
                inum: d.u64()?,
                obj_type: d.u8()?,
                comp_algo: d.u8()?,
                check_algo: d.u8()?,
                mode: d.u32()?,
                nlinks: d.u64()?,
                uid: d.u32()?,
                gid: d.u32()?,
                size: d.u64()?,
                ctime: d.u64()?,
                mtime: d.u64()?,
                atime: d.u64()?,
                btime: d.u64()?,
                op_flags: d.u8()?,
                version: d.u16()?,
                data_count: d.u64()?,
                inode_count: d.u64()?,
                dirty_bytes: d.u64()?,
            }),
            o => return Err(DecodeError::UnknownOp(o)),
        })
    }
}

/// The reply to a buffer that did not decode as a request: the errno
/// and message the daemon sends (EPROTO for another version, EINVAL
/// otherwise), under the operation the buffer named if it had our magic
/// (else operation 0).
pub fn reject(buf: &[u8], e: &DecodeError) -> Vec<u8> {
    let op = if buf.len() >= 8 && buf[..4] == MAGIC.to_le_bytes() {
        u16::from_le_bytes([buf[6], buf[7]])
    } else {
        0
    };
    let errno = match e {
        DecodeError::Version(_) => libc_errno::EPROTO,
        DecodeError::UnknownOp(_) => libc_errno::EOPNOTSUPP,
        _ => libc_errno::EINVAL,
    };
    Reply::Error {
        errno,
        message: e.to_string(),
    }
    .encode(op)
    .unwrap_or_default()
}

/// The Linux errnos the protocol names (this crate does not link libc).
pub mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EBUSY: i32 = 16;
    pub const EEXIST: i32 = 17;
    pub const EINVAL: i32 = 22;
    pub const EROFS: i32 = 30;
    pub const EPROTO: i32 = 71;
    pub const EOPNOTSUPP: i32 = 95;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ioctl_command_is_linuxs_iowr() {
        // _IOWR('h', 0x48, char[4096]) as <asm-generic/ioctl.h> computes
        // it: dir 3 << 30, size 4096 << 16, type 0x68 << 8, nr 0x48.
        assert_eq!(CTL_IOC, 0xd000_6848);
    }

    #[test]
    fn requests_round_trip() {
        let all = [
            Request::MountInfo,
            Request::Mark { name: "m1".into() },
            Request::Snapshot {
                name: "DATA.1".into(),
            },
            Request::PfsList { cursor: 7 },
            Request::PfsCreate { label: "X".into() },
            Request::PfsDelete { label: "Y".into() },
            Request::BulkfreeStart { passes: 2 },
            Request::BulkfreeStatus,
            Request::Stat,
            Request::Flush,
            Request::SetMethods {
                comp: Some(0x98),
                check: None,
            },
            Request::SetMethods {
                comp: None,
                check: Some(8),
            },
        ];
        for r in all {
            let b = r.encode().unwrap();
            assert_eq!(b.len(), CTL_BUF);
            assert_eq!(Request::decode(&b).unwrap(), r);
        }
    }

    #[test]
    fn replies_round_trip() {
        let e = PfsEntry {
            label: b"DATA".to_vec(),
            pfs_type: 1,
            pfs_subtype: 0,
            clid: Uuid([3; 16]),
            fsid: Uuid([4; 16]),
            lsnap_tid: 9,
            inode_count: 10,
            data_count: 11,
            comp_algo: 2,
            check_algo: 3,
            mounted: true,
        };
        let cases = [
            (op::MARK, Reply::Ok),
            (
                op::MOUNT_INFO,
                Reply::MountInfo(MountInfo {
                    label: "DATA".into(),
                    image: b"/x/disk.img".to_vec(),
                    read_write: true,
                    snapdir: false,
                    daemon: "0.1.0".into(),
                }),
            ),
            (
                op::PFS_LIST,
                Reply::PfsList {
                    entries: vec![e.clone(), e],
                    next: Some(2),
                },
            ),
            (
                op::BULKFREE_STATUS,
                Reply::Bulkfree(BulkfreeStatus {
                    state: 1,
                    pass: 1,
                    passes: 2,
                    brefs: 5,
                    report: "x".into(),
                    ..Default::default()
                }),
            ),
            (
                op::STAT,
                Reply::Stat(InodeStat {
                    inum: 5,
                    size: 77,
                    ..Default::default()
                }),
            ),
            (
                op::SNAPSHOT,
                Reply::Error {
                    errno: libc_errno::EEXIST,
                    message: "exists".into(),
                },
            ),
        ];
        for (o, r) in cases {
            let b = r.encode(o).unwrap();
            assert_eq!(Reply::decode(o, &b).unwrap(), r);
        }
    }

    #[test]
    fn bad_buffers_are_errors_not_panics() {
        assert_eq!(Request::decode(&[]), Err(DecodeError::NotControl));
        assert_eq!(
            Request::decode(&[0u8; CTL_BUF]),
            Err(DecodeError::NotControl)
        );
        let mut b = Request::Mark { name: "m".into() }.encode().unwrap();
        b[4] = 9;
        assert_eq!(Request::decode(&b), Err(DecodeError::Version(9)));
        let r = reject(&b, &DecodeError::Version(9));
        // The reply still decodes on this side (same magic, our version).
        match Reply::decode(op::MARK, &r).unwrap() {
            Reply::Error { errno, .. } => assert_eq!(errno, libc_errno::EPROTO),
            other => panic!("{other:?}"),
        }
        // Truncated payloads: every prefix length fails cleanly.
        let full = Request::Mark {
            name: "abcdef".into(),
        }
        .encode()
        .unwrap();
        for len in 0..8u32 {
            let mut t = full.clone();
            t[12..16].copy_from_slice(&len.to_le_bytes());
            let _ = Request::decode(&t);
        }
        let mut t = full;
        t[12..16].copy_from_slice(&(CTL_BUF as u32).to_le_bytes());
        assert!(Request::decode(&t).is_err());
    }

    #[test]
    fn long_messages_are_cut_to_a_buffer() {
        let r = Reply::Error {
            errno: 5,
            message: "é".repeat(3000),
        };
        let b = r.encode(op::MARK).unwrap();
        assert_eq!(b.len(), CTL_BUF);
        assert!(matches!(
            Reply::decode(op::MARK, &b),
            Ok(Reply::Error { errno: 5, .. })
        ));
    }
}
