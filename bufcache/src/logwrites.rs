//! A log-writes device, as Linux's dm-log-writes: `LogWritesDevice` wraps
//! a `BlockDevice` and appends every write (offset and bytes), every
//! barrier and every named mark to a log file, in the order they reach
//! the device. `LogReader` reads such a log back, `scan_log` indexes it,
//! and `replay` rebuilds the device as it was at any entry, barrier or
//! mark, onto a copy of the image as it was when logging started.
//!
//! # Log format (version 1, little-endian)
//!
//! A 64-byte file header:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `H2LOGWRT` |
//! | 8..12 | format version, 1 |
//! | 12..16 | header length in bytes, 64 |
//! | 16..24 | device size in bytes |
//! | 24..56 | fingerprint of the base image (see `fingerprint_file`) |
//! | 56..60 | reserved, 0 |
//! | 60..64 | CRC32C of bytes 0..60 |
//!
//! then entries, each a 40-byte header followed by its payload:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | entry magic `0x4532_4857` (`WH2E` on disk) |
//! | 4..6 | kind: 1 write, 2 barrier, 3 mark |
//! | 6..8 | reserved, 0 |
//! | 8..16 | sequence number: 1 for the first entry, then +1 |
//! | 16..24 | write: device offset; others 0 |
//! | 24..32 | payload length: write data bytes (at most 16 MiB, `WRITE_ENTRY_MAX`: a longer write is logged as several entries), mark name bytes (UTF-8, at most 1024), barrier 0 |
//! | 32..36 | CRC32C of the payload |
//! | 36..40 | CRC32C of header bytes 0..36 |
//!
//! A write entry is appended once the wrapped device has taken the write
//! (a failed write is not logged); a barrier entry once the wrapped
//! device's barrier has returned, and the log is then flushed and
//! fdatasync'd before `barrier` returns, so every barrier the filesystem
//! saw complete is in the log, and a barrier in the log is one the device
//! completed. Marks are made durable the same way. Between barriers the
//! log is buffered: after a crash of the logging machine its tail may be
//! torn. The reader stops at the first entry that is incomplete or fails
//! a check (magic, sequence, CRCs, bounds) and reports the bytes it
//! ignored; what precedes it is replayed.
//!
//! Replay needs the image as it was when logging started (the base), as
//! dm-log-writes needs its base device: the log holds only what was
//! written. The header's fingerprint lets replay refuse any other image.

use crate::device::BlockDevice;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

/// File magic.
pub const LOG_MAGIC: [u8; 8] = *b"H2LOGWRT";
/// Format version this module writes and reads.
pub const LOG_VERSION: u32 = 1;
/// Bytes of the file header.
pub const LOG_HEADER_BYTES: usize = 64;
/// Entry header magic.
pub const ENTRY_MAGIC: u32 = 0x4532_4857;
/// Bytes of an entry header.
pub const ENTRY_HEADER_BYTES: usize = 40;
/// The longest mark name, in bytes.
pub const MARK_NAME_MAX: usize = 1024;
/// The largest payload of a write entry: a longer write is logged as
/// consecutive entries, and the reader refuses a longer one, so a
/// damaged or hostile log cannot make it allocate more.
pub const WRITE_ENTRY_MAX: usize = 16 << 20;
/// The unit the base fingerprint hashes: chunks of zeros are skipped.
pub const FINGERPRINT_CHUNK: u64 = 65536;

const KIND_WRITE: u16 = 1;
const KIND_BARRIER: u16 = 2;
const KIND_MARK: u16 = 3;

/// The log's file header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogHeader {
    /// Size of the logged device in bytes.
    pub device_size: u64,
    /// `fingerprint_*` of the device before the first logged write.
    pub base_fingerprint: [u8; 32],
}

impl LogHeader {
    pub fn encode(&self) -> [u8; LOG_HEADER_BYTES] {
        let mut b = [0u8; LOG_HEADER_BYTES];
        b[0..8].copy_from_slice(&LOG_MAGIC);
        b[8..12].copy_from_slice(&LOG_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(LOG_HEADER_BYTES as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.device_size.to_le_bytes());
        b[24..56].copy_from_slice(&self.base_fingerprint);
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode and check a file header.
    pub fn decode(b: &[u8]) -> Result<LogHeader, String> {
        if b.len() < LOG_HEADER_BYTES {
            return Err(format!(
                "too short for a log-writes header ({} of {LOG_HEADER_BYTES} bytes)",
                b.len()
            ));
        }
        if b[0..8] != LOG_MAGIC {
            return Err("not a HAMMER2 write log (bad magic)".to_string());
        }
        let version = le32(&b[8..12]);
        if version != LOG_VERSION {
            return Err(format!(
                "write log format version {version} (this program reads {LOG_VERSION})"
            ));
        }
        let hlen = le32(&b[12..16]);
        if hlen as usize != LOG_HEADER_BYTES {
            return Err(format!(
                "write log header length {hlen}, expected {LOG_HEADER_BYTES}"
            ));
        }
        if crc32c::crc32c(&b[..60]) != le32(&b[60..64]) {
            return Err("write log header fails its CRC".to_string());
        }
        let mut base_fingerprint = [0u8; 32];
        base_fingerprint.copy_from_slice(&b[24..56]);
        Ok(LogHeader {
            device_size: le64(&b[16..24]),
            base_fingerprint,
        })
    }
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn entry_header(kind: u16, seq: u64, offset: u64, payload: &[u8]) -> [u8; ENTRY_HEADER_BYTES] {
    let mut h = [0u8; ENTRY_HEADER_BYTES];
    h[0..4].copy_from_slice(&ENTRY_MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..24].copy_from_slice(&offset.to_le_bytes());
    h[24..32].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    h[32..36].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let crc = crc32c::crc32c(&h[..36]);
    h[36..40].copy_from_slice(&crc.to_le_bytes());
    h
}

// ---------------------------------------------------------------------
// Base fingerprint

/// Hashes 64 KiB chunks in order; chunks of zeros are skipped, so a
/// sparse file and a fully written copy of it agree.
struct Fingerprinter {
    hasher: blake3::Hasher,
    next_chunk: u64,
}

impl Fingerprinter {
    fn new(size: u64) -> Fingerprinter {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"hammer2 log-writes base v1");
        hasher.update(&size.to_le_bytes());
        Fingerprinter {
            hasher,
            next_chunk: 0,
        }
    }

    fn chunk(&mut self, index: u64, data: &[u8]) {
        debug_assert!(index >= self.next_chunk);
        self.next_chunk = index + 1;
        if data.iter().any(|&b| b != 0) {
            self.hasher.update(&index.to_le_bytes());
            self.hasher.update(data);
        }
    }

    fn finish(self) -> [u8; 32] {
        *self.hasher.finalize().as_bytes()
    }
}

fn chunk_len(index: u64, size: u64) -> usize {
    (size - index * FINGERPRINT_CHUNK).min(FINGERPRINT_CHUNK) as usize
}

/// The fingerprint of everything `dev` holds (reads it all).
pub fn fingerprint_device(dev: &dyn BlockDevice) -> io::Result<[u8; 32]> {
    let size = dev.size_bytes();
    let mut fp = Fingerprinter::new(size);
    let mut buf = vec![0u8; FINGERPRINT_CHUNK as usize];
    for index in 0..size.div_ceil(FINGERPRINT_CHUNK) {
        let n = chunk_len(index, size);
        dev.read_at(&mut buf[..n], index * FINGERPRINT_CHUNK)?;
        fp.chunk(index, &buf[..n]);
    }
    Ok(fp.finish())
}

/// The fingerprint of a file or block device, the same as
/// `fingerprint_device` gives for its contents, but skipping a file's
/// holes (SEEK_DATA), so a sparse image costs what it holds. A block
/// device is read whole.
pub fn fingerprint_file(file: &File) -> io::Result<[u8; 32]> {
    use nix::unistd::{lseek, Whence};
    use std::os::unix::fs::FileExt;
    let size = {
        let meta = file.metadata()?;
        if meta.is_file() {
            meta.len()
        } else {
            lseek(file, 0, Whence::SeekEnd).map_err(io::Error::from)? as u64
        }
    };
    let mut fp = Fingerprinter::new(size);
    let mut buf = vec![0u8; FINGERPRINT_CHUNK as usize];
    let mut pos = 0u64;
    while pos < size {
        // The next data region; ENXIO: none left. A file system without
        // SEEK_DATA reports all of the file as data.
        let start = match lseek(file, pos as i64, Whence::SeekData) {
            Ok(s) => s as u64,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(nix::errno::Errno::EINVAL) => pos,
            Err(e) => return Err(e.into()),
        };
        let end = match lseek(file, start as i64, Whence::SeekHole) {
            Ok(e) => (e as u64).min(size),
            Err(_) => size,
        };
        let mut index = (start / FINGERPRINT_CHUNK).max(fp.next_chunk);
        while index * FINGERPRINT_CHUNK < end {
            let n = chunk_len(index, size);
            file.read_exact_at(&mut buf[..n], index * FINGERPRINT_CHUNK)?;
            fp.chunk(index, &buf[..n]);
            index += 1;
        }
        pos = (index * FINGERPRINT_CHUNK).max(end);
    }
    Ok(fp.finish())
}

/// The fingerprint as hex, for messages.
pub fn fingerprint_hex(fp: &[u8; 32]) -> String {
    fp.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------
// The device

struct LogState {
    out: BufWriter<File>,
    next_seq: u64,
    /// Set when an append failed: the log no longer matches the device,
    /// so every later operation fails.
    broken: Option<String>,
}

/// A device that logs every write, barrier and mark to a file before
/// passing on (see the module documentation for the format).
pub struct LogWritesDevice {
    inner: Arc<dyn BlockDevice>,
    state: Mutex<LogState>,
}

impl LogWritesDevice {
    /// Start a log at `log` (created, or truncated) for `inner`, whose
    /// current contents have fingerprint `base_fingerprint`. The header
    /// is durable when this returns.
    pub fn create(
        inner: Arc<dyn BlockDevice>,
        log: &Path,
        base_fingerprint: [u8; 32],
    ) -> io::Result<LogWritesDevice> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(log)?;
        let header = LogHeader {
            device_size: inner.size_bytes(),
            base_fingerprint,
        };
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&header.encode())?;
        out.flush()?;
        out.get_ref().sync_all()?;
        Ok(LogWritesDevice {
            inner,
            state: Mutex::new(LogState {
                out,
                next_seq: 1,
                broken: None,
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sequence number the next entry gets (entries so far + 1).
    pub fn next_seq(&self) -> u64 {
        self.state().next_seq
    }

    fn check(st: &LogState) -> io::Result<()> {
        match &st.broken {
            Some(why) => Err(io::Error::other(format!(
                "the write log is broken ({why}); the device is no longer logged"
            ))),
            None => Ok(()),
        }
    }

    /// Append one entry; durable with `sync`. A failure breaks the log.
    fn append(
        st: &mut LogState,
        kind: u16,
        offset: u64,
        payload: &[u8],
        sync: bool,
    ) -> io::Result<()> {
        let seq = st.next_seq;
        let h = entry_header(kind, seq, offset, payload);
        let r = st
            .out
            .write_all(&h)
            .and_then(|()| st.out.write_all(payload))
            .and_then(|()| {
                if sync {
                    st.out.flush()?;
                    st.out.get_ref().sync_data()
                } else {
                    Ok(())
                }
            });
        match r {
            Ok(()) => {
                st.next_seq += 1;
                Ok(())
            }
            Err(e) => {
                let why = format!("appending entry {seq}: {e}");
                log::error!("write log: {why}");
                st.broken = Some(why);
                Err(e)
            }
        }
    }
}

impl BlockDevice for LogWritesDevice {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        // Held across the write, so the log's order is the device's.
        let mut st = self.state();
        Self::check(&st)?;
        self.inner.write_at(buf, offset)?;
        for (i, piece) in buf.chunks(WRITE_ENTRY_MAX).enumerate() {
            let at = offset + (i * WRITE_ENTRY_MAX) as u64;
            Self::append(&mut st, KIND_WRITE, at, piece, false)?;
        }
        Ok(())
    }

    fn barrier(&self) -> io::Result<()> {
        let mut st = self.state();
        Self::check(&st)?;
        self.inner.barrier()?;
        Self::append(&mut st, KIND_BARRIER, 0, &[], true)
    }

    fn mark(&self, name: &str) -> io::Result<()> {
        if name.is_empty() || name.len() > MARK_NAME_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a mark name is 1 to {MARK_NAME_MAX} bytes"),
            ));
        }
        let mut st = self.state();
        Self::check(&st)?;
        Self::append(&mut st, KIND_MARK, 0, name.as_bytes(), true)
    }
}

impl Drop for LogWritesDevice {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if st.broken.is_none() {
            if let Err(e) = st.out.flush().and_then(|()| st.out.get_ref().sync_data()) {
                log::error!("write log: cannot write its last entries: {e}");
            }
        }
    }
}

// ---------------------------------------------------------------------
// Reading

/// What an entry records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    Write { offset: u64, data: Vec<u8> },
    Barrier,
    Mark(String),
}

/// One entry of a log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Sequence number (1 for the first).
    pub seq: u64,
    /// Byte offset of the entry header in the log file.
    pub at: u64,
    pub kind: EntryKind,
}

/// Where the readable log ends, when it does not end cleanly at the end
/// of the file: an entry that is incomplete or fails a check, and
/// everything after it, is ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// Log file offset of the first byte ignored.
    pub at: u64,
    /// Bytes ignored, to the end of the file.
    pub bytes: u64,
    /// Why the entry there was not taken.
    pub why: String,
}

/// Reads a log front to back.
pub struct LogReader {
    r: BufReader<File>,
    header: LogHeader,
    /// File offset of the next entry.
    pos: u64,
    file_len: u64,
    next_seq: u64,
    tail: Option<TornTail>,
    done: bool,
}

/// Why a log cannot be read.
#[derive(Debug)]
pub enum LogError {
    Io(io::Error),
    /// Not a log, or its header is damaged.
    Header(String),
}

impl std::fmt::Display for LogError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogError::Io(e) => write!(f, "{e}"),
            LogError::Header(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for LogError {}

impl From<io::Error> for LogError {
    fn from(e: io::Error) -> LogError {
        LogError::Io(e)
    }
}

impl LogReader {
    pub fn open(path: &Path) -> Result<LogReader, LogError> {
        let file = File::open(path)?;
        let file_len = file.metadata()?.len();
        let mut r = BufReader::with_capacity(1 << 20, file);
        let mut b = [0u8; LOG_HEADER_BYTES];
        let mut got = 0;
        while got < b.len() {
            let n = r.read(&mut b[got..])?;
            if n == 0 {
                break;
            }
            got += n;
        }
        let header = LogHeader::decode(&b[..got]).map_err(LogError::Header)?;
        Ok(LogReader {
            r,
            header,
            pos: LOG_HEADER_BYTES as u64,
            file_len,
            next_seq: 1,
            tail: None,
            done: false,
        })
    }

    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    /// The torn tail, once `next_entry` has returned `None` on one.
    pub fn torn_tail(&self) -> Option<&TornTail> {
        self.tail.as_ref()
    }

    fn torn(&mut self, why: String) -> Option<Entry> {
        self.tail = Some(TornTail {
            at: self.pos,
            bytes: self.file_len - self.pos,
            why,
        });
        self.done = true;
        None
    }

    /// The next entry, or `None` at the end of the readable log (see
    /// `torn_tail`). Errors are read errors of the file only.
    pub fn next_entry(&mut self) -> io::Result<Option<Entry>> {
        if self.done || self.pos >= self.file_len {
            self.done = true;
            return Ok(None);
        }
        let left = self.file_len - self.pos;
        if left < ENTRY_HEADER_BYTES as u64 {
            return Ok(self.torn("incomplete entry header".to_string()));
        }
        let mut h = [0u8; ENTRY_HEADER_BYTES];
        self.r.read_exact(&mut h)?;
        if le32(&h[0..4]) != ENTRY_MAGIC {
            return Ok(self.torn("bad entry magic".to_string()));
        }
        if crc32c::crc32c(&h[..36]) != le32(&h[36..40]) {
            return Ok(self.torn("entry header fails its CRC".to_string()));
        }
        let kind = u16::from_le_bytes([h[4], h[5]]);
        let seq = le64(&h[8..16]);
        let offset = le64(&h[16..24]);
        let len = le64(&h[24..32]);
        if seq != self.next_seq {
            return Ok(self.torn(format!(
                "entry numbered {seq} where {} was due",
                self.next_seq
            )));
        }
        if len > left - ENTRY_HEADER_BYTES as u64 {
            return Ok(self.torn(format!(
                "entry {seq} is incomplete ({len} payload bytes, {} in the file)",
                left - ENTRY_HEADER_BYTES as u64
            )));
        }
        let ok_shape = match kind {
            KIND_WRITE => {
                len <= WRITE_ENTRY_MAX as u64
                    && offset
                        .checked_add(len)
                        .is_some_and(|end| end <= self.header.device_size)
            }
            KIND_BARRIER => len == 0 && offset == 0,
            KIND_MARK => len > 0 && len as usize <= MARK_NAME_MAX && offset == 0,
            _ => false,
        };
        if !ok_shape {
            return Ok(self.torn(format!(
                "entry {seq}: kind {kind}, offset {offset:#x}, length {len} make no sense"
            )));
        }
        let mut payload = vec![0u8; len as usize];
        self.r.read_exact(&mut payload)?;
        if crc32c::crc32c(&payload) != le32(&h[32..36]) {
            return Ok(self.torn(format!("entry {seq}: payload fails its CRC")));
        }
        let kind = match kind {
            KIND_WRITE => EntryKind::Write {
                offset,
                data: payload,
            },
            KIND_BARRIER => EntryKind::Barrier,
            _ => match String::from_utf8(payload) {
                Ok(name) => EntryKind::Mark(name),
                Err(_) => return Ok(self.torn(format!("entry {seq}: mark name is not UTF-8"))),
            },
        };
        let entry = Entry {
            seq,
            at: self.pos,
            kind,
        };
        self.pos += ENTRY_HEADER_BYTES as u64 + len;
        self.next_seq += 1;
        Ok(Some(entry))
    }
}

/// An entry without its data, for listings and finding stop points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IndexKind {
    Write {
        offset: u64,
        len: u64,
    },
    /// The `n`-th barrier (from 1).
    Barrier {
        n: u64,
    },
    Mark(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub seq: u64,
    pub at: u64,
    pub kind: IndexKind,
}

/// A whole log, read once and checked, without the data.
#[derive(Clone, Debug)]
pub struct LogIndex {
    pub header: LogHeader,
    pub entries: Vec<IndexEntry>,
    pub tail: Option<TornTail>,
}

impl LogIndex {
    /// Entries in the log.
    pub fn len(&self) -> u64 {
        self.entries.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn barriers(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| matches!(e.kind, IndexKind::Barrier { .. }))
            .count() as u64
    }

    pub fn marks(&self) -> Vec<&str> {
        self.entries
            .iter()
            .filter_map(|e| match &e.kind {
                IndexKind::Mark(m) => Some(m.as_str()),
                _ => None,
            })
            .collect()
    }

    /// How many entries replaying to `stop` applies. At a mark, those
    /// before it (the mark itself changes nothing).
    pub fn resolve(&self, stop: &Stop) -> Result<u64, String> {
        match stop {
            Stop::End => Ok(self.len()),
            Stop::Entry(n) if *n <= self.len() => Ok(*n),
            Stop::Entry(n) => Err(format!(
                "the log has {} entries; there is no entry {n}",
                self.len()
            )),
            Stop::Barrier(n) => self
                .entries
                .iter()
                .find(|e| e.kind == IndexKind::Barrier { n: *n })
                .map(|e| e.seq)
                .ok_or_else(|| {
                    format!(
                        "the log has {} barriers; there is no barrier {n}",
                        self.barriers()
                    )
                }),
            Stop::Mark(name) => self
                .entries
                .iter()
                .find(|e| matches!(&e.kind, IndexKind::Mark(m) if m == name))
                .map(|e| e.seq - 1)
                .ok_or_else(|| {
                    let marks = self.marks();
                    if marks.is_empty() {
                        format!("no mark {name:?} in the log (it has no marks)")
                    } else {
                        format!("no mark {name:?} in the log; it has: {}", marks.join(", "))
                    }
                }),
        }
    }
}

/// Read and check a whole log.
pub fn scan_log(path: &Path) -> Result<LogIndex, LogError> {
    let mut r = LogReader::open(path)?;
    let mut entries = Vec::new();
    let mut barriers = 0;
    while let Some(e) = r.next_entry()? {
        let kind = match e.kind {
            EntryKind::Write { offset, data } => IndexKind::Write {
                offset,
                len: data.len() as u64,
            },
            EntryKind::Barrier => {
                barriers += 1;
                IndexKind::Barrier { n: barriers }
            }
            EntryKind::Mark(m) => IndexKind::Mark(m),
        };
        entries.push(IndexEntry {
            seq: e.seq,
            at: e.at,
            kind,
        });
    }
    Ok(LogIndex {
        header: r.header.clone(),
        entries,
        tail: r.tail.clone(),
    })
}

/// Where a replay stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Every entry.
    End,
    /// Entries 1 to N (0: none).
    Entry(u64),
    /// Through the N-th barrier (from 1).
    Barrier(u64),
    /// Every entry before the first mark of that name.
    Mark(String),
}

/// Where a replay is, for the barrier hook and progress.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayPoint {
    /// Entries applied (the last one's sequence number).
    pub entries: u64,
    /// Barriers passed.
    pub barriers: u64,
    /// Writes applied, and their bytes.
    pub writes: u64,
    pub bytes: u64,
}

/// Why a replay stopped short.
#[derive(Debug)]
pub enum ReplayError {
    Log(LogError),
    /// Writing the image failed.
    Device(io::Error),
    /// The log ends before the entry the replay was to reach.
    Short {
        wanted: u64,
        have: u64,
    },
    /// The barrier hook said stop, after the barrier at this point.
    Stopped(ReplayPoint),
}

impl std::fmt::Display for ReplayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplayError::Log(e) => write!(f, "reading the log: {e}"),
            ReplayError::Device(e) => write!(f, "writing the image: {e}"),
            ReplayError::Short { wanted, have } => {
                write!(f, "the log ends after entry {have}, before entry {wanted}")
            }
            ReplayError::Stopped(p) => write!(
                f,
                "stopped after barrier {} (entry {})",
                p.barriers, p.entries
            ),
        }
    }
}

impl std::error::Error for ReplayError {}

/// Apply the first `upto` entries of the log at `path` to `dev`, which
/// must hold the base image. After each barrier `at_barrier` is called
/// with the point reached; `Ok(false)` stops the replay there. `progress`
/// is called after every entry. Ends with a barrier on `dev`.
pub fn replay(
    path: &Path,
    dev: &dyn BlockDevice,
    upto: u64,
    mut at_barrier: impl FnMut(&ReplayPoint) -> bool,
    mut progress: impl FnMut(&ReplayPoint),
) -> Result<ReplayPoint, ReplayError> {
    let mut r = LogReader::open(path).map_err(ReplayError::Log)?;
    if r.header().device_size != dev.size_bytes() {
        return Err(ReplayError::Device(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the image is {} bytes; the log is of a {}-byte device",
                dev.size_bytes(),
                r.header().device_size
            ),
        )));
    }
    let mut p = ReplayPoint::default();
    while p.entries < upto {
        let Some(e) = r
            .next_entry()
            .map_err(|e| ReplayError::Log(LogError::Io(e)))?
        else {
            return Err(ReplayError::Short {
                wanted: upto,
                have: p.entries,
            });
        };
        p.entries = e.seq;
        match e.kind {
            EntryKind::Write { offset, data } => {
                dev.write_at(&data, offset).map_err(ReplayError::Device)?;
                p.writes += 1;
                p.bytes += data.len() as u64;
            }
            EntryKind::Barrier => {
                p.barriers += 1;
                if !at_barrier(&p) {
                    dev.barrier().map_err(ReplayError::Device)?;
                    return Err(ReplayError::Stopped(p));
                }
            }
            EntryKind::Mark(_) => {}
        }
        progress(&p);
    }
    dev.barrier().map_err(ReplayError::Device)?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemDevice;
    use crate::recording::RecordingDevice;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    /// `bufcache-logw-PID-TAG` in the temp dir; those of test processes
    /// that are gone are removed first.
    fn scratch(tag: &str) -> std::path::PathBuf {
        let tmp = std::env::temp_dir();
        for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("bufcache-logw-")
                .and_then(|r| r.split('-').next());
            if pid.is_some_and(|pid| !std::path::Path::new("/proc").join(pid).exists()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let d = tmp.join(format!("bufcache-logw-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn same(a: &dyn BlockDevice, b: &dyn BlockDevice) -> bool {
        fingerprint_device(a).unwrap() == fingerprint_device(b).unwrap()
    }

    /// The same random stream of writes, barriers and marks through a
    /// log device and a recording device; returns the recording (the
    /// reference), the base and the log path.
    fn record(
        seed: u64,
        size: u64,
        n: usize,
        tag: &str,
    ) -> (RecordingDevice, MemDevice, std::path::PathBuf) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let base = MemDevice::new(size);
        for _ in 0..8 {
            let at = rng.gen_range(0..size - 5000);
            let data: Vec<u8> = (0..rng.gen_range(1..5000)).map(|_| rng.gen()).collect();
            base.write_at(&data, at).unwrap();
        }
        let reference = RecordingDevice::from_mem(base.snapshot());
        let log = scratch(tag).join("log");
        let inner = Arc::new(base.snapshot());
        let dev = LogWritesDevice::create(inner.clone(), &log, fingerprint_device(&base).unwrap())
            .unwrap();
        for i in 0..n {
            match rng.gen_range(0..10) {
                0 => {
                    dev.barrier().unwrap();
                    reference.barrier().unwrap();
                }
                1 => {
                    let name = format!("m{i}");
                    dev.mark(&name).unwrap();
                    reference.mark(&name).unwrap();
                }
                _ => {
                    let len = rng.gen_range(1..20000);
                    let at = rng.gen_range(0..size - len as u64);
                    let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    dev.write_at(&data, at).unwrap();
                    reference.write_at(&data, at).unwrap();
                }
            }
        }
        // A write past the end is refused by the device and not logged.
        assert!(dev.write_at(&[1; 10], size - 5).is_err());
        drop(dev);
        assert!(same(
            inner.as_ref(),
            &reference.image_at(reference.position())
        ));
        (reference, base, log)
    }

    #[test]
    fn replay_rebuilds_every_point_as_the_recording_does() {
        let size = 4 << 20;
        let (reference, base, log) = record(7, size, 300, "every");
        let index = scan_log(&log).unwrap();
        assert_eq!(index.tail, None);
        assert_eq!(index.len(), reference.position() as u64);
        assert_eq!(index.header.device_size, size);
        assert_eq!(
            index.header.base_fingerprint,
            fingerprint_device(&base).unwrap()
        );
        // Entry kinds match the recording's events one for one.
        for (e, ev) in index.entries.iter().zip(reference.events()) {
            match (&e.kind, ev) {
                (IndexKind::Write { offset, len }, crate::Event::Write { offset: o, data }) => {
                    assert_eq!((*offset, *len), (o, data.len() as u64))
                }
                (IndexKind::Barrier { .. }, crate::Event::Barrier) => {}
                (IndexKind::Mark(a), crate::Event::Mark(b)) => assert_eq!(a, &b),
                (a, b) => panic!("entry {} is {a:?}, recorded {b:?}", e.seq),
            }
        }
        let mut rng = SmallRng::seed_from_u64(99);
        let mut points: Vec<u64> = (0..12).map(|_| rng.gen_range(0..=index.len())).collect();
        points.extend([0, index.len()]);
        for upto in points {
            let img = base.snapshot();
            let p = replay(&log, &img, upto, |_| true, |_| {}).unwrap();
            assert_eq!(p.entries, upto);
            assert!(
                same(&img, &reference.image_at(upto as usize)),
                "at entry {upto}"
            );
        }
        // Every barrier, through the hook, in one pass.
        let img = base.snapshot();
        let positions = reference.barrier_positions();
        let mut seen = 0;
        replay(
            &log,
            &img,
            index.len(),
            |p| {
                assert_eq!(p.entries as usize, positions[seen] + 1);
                assert!(same(&img, &reference.image_at(p.entries as usize)));
                seen += 1;
                true
            },
            |_| {},
        )
        .unwrap();
        assert_eq!(seen, positions.len());
    }

    #[test]
    fn stop_points_resolve_against_the_recording() {
        let (reference, _base, log) = record(11, 1 << 20, 200, "stops");
        let index = scan_log(&log).unwrap();
        let marks: Vec<String> = reference
            .events()
            .into_iter()
            .filter_map(|e| match e {
                crate::Event::Mark(m) => Some(m),
                _ => None,
            })
            .collect();
        assert!(!marks.is_empty());
        for m in &marks {
            let at = reference.mark_position(m).unwrap() as u64;
            assert_eq!(index.resolve(&Stop::Mark(m.clone())).unwrap(), at);
        }
        for (i, at) in reference.barrier_positions().iter().enumerate() {
            assert_eq!(
                index.resolve(&Stop::Barrier(i as u64 + 1)).unwrap(),
                *at as u64 + 1
            );
        }
        let nb = reference.barrier_positions().len() as u64;
        assert!(index.resolve(&Stop::Barrier(nb + 1)).is_err());
        assert!(index
            .resolve(&Stop::Mark("nope".into()))
            .unwrap_err()
            .contains(&marks[0]));
        assert!(index.resolve(&Stop::Entry(index.len() + 1)).is_err());
        assert_eq!(index.resolve(&Stop::End).unwrap(), index.len());
    }

    #[test]
    fn a_torn_tail_is_ignored_and_the_rest_replays() {
        let size = 1 << 20;
        let (reference, base, log) = record(3, size, 120, "torn");
        let full = std::fs::read(&log).unwrap();
        let index = scan_log(&log).unwrap();
        let torn = log.with_extension("torn");
        let mut rng = SmallRng::seed_from_u64(5);
        for _ in 0..40 {
            let cut = rng.gen_range(LOG_HEADER_BYTES..full.len());
            std::fs::write(&torn, &full[..cut]).unwrap();
            let t = scan_log(&torn).unwrap();
            // The entries that fit whole, and no more.
            let whole = index
                .entries
                .iter()
                .take_while(|e| {
                    let next = index
                        .entries
                        .get(e.seq as usize)
                        .map_or(full.len() as u64, |n| n.at);
                    next <= cut as u64
                })
                .count();
            assert_eq!(t.len(), whole as u64, "cut at {cut}");
            let boundary = index.entries.get(whole).map(|e| e.at);
            assert_eq!(
                t.tail.is_none(),
                boundary == Some(cut as u64) || whole == index.entries.len()
            );
            let img = base.snapshot();
            replay(&torn, &img, t.len(), |_| true, |_| {}).unwrap();
            assert!(same(&img, &reference.image_at(whole)));
        }
        // A flipped byte in an entry stops the log there.
        let victim = &index.entries[index.entries.len() / 2];
        let mut bad = full.clone();
        bad[victim.at as usize + ENTRY_HEADER_BYTES.min(8) + 3] ^= 0x40;
        std::fs::write(&torn, &bad).unwrap();
        let t = scan_log(&torn).unwrap();
        assert_eq!(t.len(), victim.seq - 1);
        assert_eq!(t.tail.as_ref().unwrap().at, victim.at);
        // So does damage to a payload.
        let w = index
            .entries
            .iter()
            .find(|e| matches!(e.kind, IndexKind::Write { .. }) && e.seq > 10)
            .unwrap();
        let mut bad = full.clone();
        bad[w.at as usize + ENTRY_HEADER_BYTES] ^= 1;
        std::fs::write(&torn, &bad).unwrap();
        let t = scan_log(&torn).unwrap();
        assert_eq!(t.len(), w.seq - 1);
        assert!(t.tail.unwrap().why.contains("payload"));
    }

    #[test]
    fn headers_are_checked() {
        let h = LogHeader {
            device_size: 123 << 20,
            base_fingerprint: [7; 32],
        };
        let b = h.encode();
        assert_eq!(LogHeader::decode(&b).unwrap(), h);
        for i in 0..LOG_HEADER_BYTES {
            let mut c = b;
            c[i] ^= 0x10;
            assert!(LogHeader::decode(&c).is_err(), "byte {i}");
        }
        assert!(LogHeader::decode(&b[..63]).is_err());
        let dir = scratch("hdr");
        std::fs::write(dir.join("empty"), b"").unwrap();
        assert!(matches!(
            LogReader::open(&dir.join("empty")),
            Err(LogError::Header(_))
        ));
    }

    #[test]
    fn writes_past_the_entry_limit_are_split_and_longer_entries_refused() {
        let dir = scratch("big");
        let size = 3 * WRITE_ENTRY_MAX as u64;
        let base = MemDevice::new(size);
        let log = dir.join("log");
        let inner = Arc::new(MemDevice::new(size));
        let dev = LogWritesDevice::create(inner.clone(), &log, fingerprint_device(&base).unwrap())
            .unwrap();
        let data: Vec<u8> = (0..WRITE_ENTRY_MAX + 5000).map(|i| i as u8).collect();
        dev.write_at(&data, 4096).unwrap();
        dev.barrier().unwrap();
        drop(dev);
        let mut r = LogReader::open(&log).unwrap();
        let mut writes = Vec::new();
        while let Some(e) = r.next_entry().unwrap() {
            if let EntryKind::Write { offset, data } = e.kind {
                writes.push((offset, data.len()));
            }
        }
        assert_eq!(
            writes,
            [
                (4096, WRITE_ENTRY_MAX),
                (4096 + WRITE_ENTRY_MAX as u64, 5000)
            ]
        );
        assert!(r.torn_tail().is_none());
        let img = MemDevice::new(size);
        replay(&log, &img, 3, |_| true, |_| {}).unwrap_or_else(|e| panic!("{e:?}"));
        assert!(same(&img, inner.as_ref()));

        // One entry past the limit (whole, with good CRCs) is refused
        // before its payload is read.
        let payload = vec![7u8; WRITE_ENTRY_MAX + 1];
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(&entry_header(KIND_WRITE, 4, 0, &payload))
            .unwrap();
        f.write_all(&payload).unwrap();
        drop(f);
        let mut r = LogReader::open(&log).unwrap();
        while r.next_entry().unwrap().is_some() {}
        let why = &r.torn_tail().expect("the long entry is refused").why;
        assert!(why.contains("make no sense"), "{why}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_replay_onto_another_size_is_refused() {
        let (_r, _base, log) = record(1, 1 << 20, 20, "size");
        let img = MemDevice::new(2 << 20);
        assert!(matches!(
            replay(&log, &img, 1, |_| true, |_| {}),
            Err(ReplayError::Device(_))
        ));
    }

    #[test]
    fn file_fingerprints_skip_holes_and_match_the_contents() {
        let dir = scratch("fp");
        let size: u64 = 3 * FINGERPRINT_CHUNK * 17 + 1234;
        let mut rng = SmallRng::seed_from_u64(2);
        let mem = MemDevice::new(size);
        let sparse = dir.join("sparse");
        let f = File::create(&sparse).unwrap();
        f.set_len(size).unwrap();
        use std::os::unix::fs::FileExt;
        for _ in 0..10 {
            let len = rng.gen_range(1..100_000);
            let at = rng.gen_range(0..size - len as u64);
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            mem.write_at(&data, at).unwrap();
            f.write_all_at(&data, at).unwrap();
        }
        // The last partial chunk too.
        mem.write_at(&[9], size - 1).unwrap();
        f.write_all_at(&[9], size - 1).unwrap();
        // Written zeros are the same as a hole.
        f.write_all_at(&[0; 70000], 40 * FINGERPRINT_CHUNK).unwrap();
        drop(f);
        let dense = dir.join("dense");
        let mut all = vec![0u8; size as usize];
        mem.read_at(&mut all, 0).unwrap();
        std::fs::write(&dense, &all).unwrap();
        let want = fingerprint_device(&mem).unwrap();
        assert_eq!(
            fingerprint_file(&File::open(&sparse).unwrap()).unwrap(),
            want
        );
        assert_eq!(
            fingerprint_file(&File::open(&dense).unwrap()).unwrap(),
            want
        );
        // One byte anywhere changes it.
        mem.write_at(&[1], 5 * FINGERPRINT_CHUNK + 17).unwrap();
        assert_ne!(fingerprint_device(&mem).unwrap(), want);
        // And the size.
        assert_ne!(
            fingerprint_device(&MemDevice::new(size)).unwrap(),
            fingerprint_device(&MemDevice::new(size + 1)).unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_write_is_not_logged_and_a_failed_append_breaks_the_log() {
        let dir = scratch("fail");
        let inner = Arc::new(crate::FaultDevice::new(Arc::new(MemDevice::new(1 << 16))));
        let dev = LogWritesDevice::create(inner.clone(), &dir.join("log"), [0; 32]).unwrap();
        dev.write_at(&[1; 10], 0).unwrap();
        inner.fail_writes_after(0);
        assert!(dev.write_at(&[2; 10], 0).is_err());
        inner.fail_barriers(true);
        assert!(dev.barrier().is_err());
        assert!(dev.mark("").is_err());
        dev.mark("after").unwrap();
        drop(dev);
        let index = scan_log(&dir.join("log")).unwrap();
        assert_eq!(
            index
                .entries
                .iter()
                .map(|e| e.kind.clone())
                .collect::<Vec<_>>(),
            vec![
                IndexKind::Write { offset: 0, len: 10 },
                IndexKind::Mark("after".into())
            ]
        );
        // A log on a full device: the append fails, and so does every
        // later operation.
        if Path::new("/dev/full").exists() {
            let inner = Arc::new(MemDevice::new(1 << 16));
            let dev = LogWritesDevice {
                inner,
                state: Mutex::new(LogState {
                    out: BufWriter::with_capacity(
                        16,
                        OpenOptions::new().write(true).open("/dev/full").unwrap(),
                    ),
                    next_seq: 1,
                    broken: None,
                }),
            };
            assert!(dev.write_at(&[1; 100], 0).is_err());
            assert!(dev.barrier().is_err());
            assert!(dev.write_at(&[1; 1], 0).is_err());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
