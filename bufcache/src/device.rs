//! The `BlockDevice` trait and its file and memory implementations.

use crate::aligned::{is_aligned, AlignedBuf, DIRECT_ALIGN};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::RwLock;

/// A byte-addressed device. Reads and writes are whole: a short transfer
/// is an error. `barrier` makes every completed write durable before any
/// later one (fdatasync on a file).
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size_bytes(&self) -> u64;
    /// Fill `buf` from `offset`. Reading past the end is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write `buf` at `offset`. Writing past the end is an error.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make all completed writes durable.
    fn barrier(&self) -> io::Result<()>;
    /// `write_at` of `pieces` laid end to end from `offset`, as one
    /// device request: a file gathers them (`pwritev`), other devices get
    /// them copied into one buffer. A device request costs more than its
    /// bytes (a system call, a queue notification, on a network block
    /// device a round trip), so neighbours go together.
    fn write_gathered(&self, pieces: &[&[u8]], offset: u64) -> io::Result<()> {
        match pieces {
            [] => Ok(()),
            [one] => self.write_at(one, offset),
            _ => self.write_at(&pieces.concat(), offset),
        }
    }
    /// Several gathered writes (`write_gathered`: offset, pieces), in
    /// flight together where the device can: a direct file submits the
    /// small ones with one `io_submit`, an NBD export gets them all
    /// before any reply is awaited; others write them in turn. The
    /// writes do not overlap. One result per write, in order.
    fn write_many(&self, writes: &[(u64, Vec<&[u8]>)]) -> Vec<io::Result<()>> {
        writes
            .iter()
            .map(|(offset, pieces)| self.write_gathered(pieces, *offset))
            .collect()
    }
    /// `write_many`, done now rather than left to the next barrier, for
    /// a writer that works ahead of its commit without locks (a flush's
    /// or fsync's runs of new file data blocks): a later barrier, maybe
    /// another commit's, then has none of it left to write. Devices
    /// without delayed writes just write.
    fn write_through_many(&self, writes: &[(u64, Vec<&[u8]>)]) -> io::Result<()> {
        self.write_many(writes).into_iter().collect()
    }
    /// `read_at` if it needs no device I/O: true when `buf` was filled
    /// from memory, false when reading would have to wait for the device
    /// (nothing is read then). Devices that hold everything in memory,
    /// and those without a cache, read and say true.
    fn read_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        self.read_at(buf, offset).map(|()| true)
    }
    /// Run `f` on the `len` bytes at `offset`, which lie within one
    /// 64 KiB frame, without a copy where the device caches them
    /// (`BufCache::read_checked`). `tag` names a check of exactly those
    /// bytes: `f` is told whether it passed since the bytes were last
    /// read or changed, and returns whether it passes now. Devices
    /// without a cache read into a buffer and always say no.
    fn read_checked(
        &self,
        offset: u64,
        len: usize,
        tag: u64,
        f: &mut dyn FnMut(&[u8], bool) -> bool,
    ) -> io::Result<()> {
        let _ = tag;
        read_copied(self, offset, len, f)
    }
    /// A hint that `offset..offset+len` is about to be read piece by
    /// piece: a cached device brings it in with as few device reads as
    /// it can (`BufCache::cluster_read`). Others do nothing.
    fn cluster_read(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }
    /// One line on the device's cache for a mount's log (hits, the
    /// share of page lookups served without a lock, device traffic), for
    /// devices that cache; others say nothing.
    fn cache_report(&self) -> Option<String> {
        None
    }
    /// The page layer under the device's cache, for devices that cache:
    /// the layer above keeps its own data in memory on that layer's
    /// pages (`vmglue::AnonPage`), under the same budget. Others have
    /// none.
    fn page_layer(&self) -> Option<std::sync::Arc<vmglue::Vm>> {
        None
    }
    /// Put a named mark in the device's write log, for devices that keep
    /// one (recording, log-writes). Others refuse with `Unsupported`.
    fn mark(&self, name: &str) -> io::Result<()> {
        let _ = name;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this device keeps no write log to mark",
        ))
    }
}

/// The largest average write a direct file's `write_many` hands to the
/// kernel together; larger ones go in turn. Large direct writes into a
/// sparse image's holes contend in the host filesystem when several are
/// in flight (a 1 GiB sequential write: 490 to 560 MiB/s with its 1 MiB
/// runs together, 650 in turn), and one of them already keeps the
/// device busy; small scattered ones (an fsync's rewritten blocks and
/// its metadata) gain most from going together.
const TOGETHER_BYTES_MAX: usize = 256 << 10;

/// `pieces` without their first `n` bytes.
fn skip<'a>(pieces: &[&'a [u8]], mut n: usize) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(pieces.len());
    for p in pieces {
        if n >= p.len() {
            n -= p.len();
        } else {
            out.push(&p[n..]);
            n = 0;
        }
    }
    out
}

/// Whether `pieces`, laid end to end from `offset`, are each aligned
/// for direct I/O (memory, place and length).
fn aligned_run(pieces: &[&[u8]], offset: u64) -> bool {
    let mut at = offset;
    pieces.iter().all(|p| {
        let ok = is_aligned(p, at);
        at += p.len() as u64;
        ok
    })
}

/// `read_checked` for bytes not held in place: read into a buffer, and
/// never checked before.
pub(crate) fn read_copied(
    dev: &(impl BlockDevice + ?Sized),
    offset: u64,
    len: usize,
    f: &mut dyn FnMut(&[u8], bool) -> bool,
) -> io::Result<()> {
    let mut buf = vec![0u8; len];
    dev.read_at(&mut buf, offset)?;
    f(&buf, false);
    Ok(())
}

fn past_end(offset: u64, len: usize, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("access of {len} bytes at {offset:#x} is past the device end {size:#x}"),
    )
}

fn check_range(offset: u64, len: usize, size: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(past_end(offset, len, size)),
    }
}

/// A regular file or a block device, with the kernel's page cache
/// (`open`) or without it (`open_direct`, O_DIRECT: for a device under
/// the buffer cache, so the image is cached once).
pub struct FileDevice {
    file: File,
    size: u64,
    writable: bool,
    /// Opened with O_DIRECT: transfers not aligned to `DIRECT_ALIGN`
    /// go through an aligned bounce buffer (writes read the sectors
    /// they cover in part first).
    direct: bool,
    /// Native AIO contexts for `write_many` on a direct file.
    aio: crate::aio::Contexts,
}

impl FileDevice {
    /// Open `path` read-only or read-write. The size of a block device is
    /// found by seeking to its end.
    pub fn open(path: &Path, writable: bool) -> io::Result<FileDevice> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        let meta = file.metadata()?;
        let size = if meta.is_file() {
            meta.len()
        } else {
            use std::io::Seek;
            let mut f = &file;
            f.seek(io::SeekFrom::End(0))?
        };
        Ok(FileDevice {
            file,
            size,
            writable,
            direct: false,
            aio: Default::default(),
        })
    }

    /// `open` with O_DIRECT, where the file system under the file (or
    /// the block device) allows it: tried with one aligned read. Where
    /// it does not (tmpfs, some network file systems), the file is
    /// opened with the page cache and `is_direct` says so.
    pub fn open_direct(path: &Path, writable: bool) -> io::Result<FileDevice> {
        use std::os::unix::fs::OpenOptionsExt;
        let direct = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        let mut dev = FileDevice::open(path, writable)?;
        if let Ok(file) = direct {
            let mut probe = AlignedBuf::new(DIRECT_ALIGN);
            let n = (dev.size as usize).min(DIRECT_ALIGN) / DIRECT_ALIGN * DIRECT_ALIGN;
            if n == 0
                || file
                    .read_exact_at(&mut probe.as_mut_slice()[..n], 0)
                    .is_ok()
            {
                dev.file = file;
                dev.direct = true;
            }
        }
        Ok(dev)
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Opened with O_DIRECT (see `open_direct`).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// A direct read of `buf.len()` bytes at `offset`, bounced through
    /// an aligned buffer covering the sectors it touches.
    fn read_bounced(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let a = DIRECT_ALIGN as u64;
        let start = offset / a * a;
        let end = (offset + buf.len() as u64).div_ceil(a) * a;
        let mut bounce = AlignedBuf::new((end - start) as usize);
        let within = (offset - start) as usize;
        self.read_direct(&mut bounce.as_mut_slice()[..(end - start) as usize], start)?;
        buf.copy_from_slice(&bounce.as_slice()[within..within + buf.len()]);
        Ok(())
    }

    /// An aligned read; the device's last sector may be short (a size
    /// that is not a multiple of the alignment): what lies past the end
    /// reads as zeros.
    fn read_direct(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    if offset + done as u64 >= self.size {
                        buf[done..].fill(0);
                        return Ok(());
                    }
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "short direct read",
                    ));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A direct write of `buf` at `offset` through an aligned buffer: the
    /// sectors it covers in part are read first.
    fn write_bounced(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let a = DIRECT_ALIGN as u64;
        let start = offset / a * a;
        let end = (offset + buf.len() as u64).div_ceil(a) * a;
        let len = (end - start) as usize;
        let mut bounce = AlignedBuf::new(len);
        let within = (offset - start) as usize;
        let b = &mut bounce.as_mut_slice()[..len];
        if within != 0 {
            self.read_direct(&mut b[..DIRECT_ALIGN], start)?;
        }
        if !(within + buf.len()).is_multiple_of(DIRECT_ALIGN) && (len > DIRECT_ALIGN || within == 0)
        {
            self.read_direct(&mut b[len - DIRECT_ALIGN..], end - a)?;
        }
        b[within..within + buf.len()].copy_from_slice(buf);
        self.write_direct(b, start)
    }

    /// Write every byte of `pieces` from `offset` with `pwritev`,
    /// going on after a short transfer (which, for direct I/O, ends on
    /// a sector boundary, so what is left stays aligned).
    fn pwritev_all(&self, pieces: &[&[u8]], offset: u64) -> io::Result<()> {
        use std::io::IoSlice;
        let mut rest: Vec<&[u8]> = pieces.iter().copied().filter(|p| !p.is_empty()).collect();
        let mut first = 0;
        let mut at = offset;
        while first < rest.len() {
            // The kernel takes at most IOV_MAX (1024) pieces at a time.
            let iov: Vec<IoSlice<'_>> = rest[first..]
                .iter()
                .take(1024)
                .map(|p| IoSlice::new(p))
                .collect();
            let n = match nix::sys::uio::pwritev(&self.file, &iov, at as libc::off_t) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "device took none of a gathered write",
                    ))
                }
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            at += n as u64;
            let mut done = n;
            while done > 0 {
                if done >= rest[first].len() {
                    done -= rest[first].len();
                    first += 1;
                } else {
                    rest[first] = &rest[first][done..];
                    done = 0;
                }
            }
        }
        Ok(())
    }

    /// An aligned write. (HAMMER2 volumes are multiples of 8 MiB, so a
    /// bounced write never reaches past a file's end.)
    fn write_direct(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
}

impl BlockDevice for FileDevice {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.size)?;
        if self.direct {
            if is_aligned(buf, offset) {
                return self.read_direct(buf, offset);
            }
            return self.read_bounced(buf, offset);
        }
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.size)?;
        if !self.writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "device opened read-only",
            ));
        }
        if self.direct {
            if is_aligned(buf, offset) {
                return self.write_direct(buf, offset);
            }
            return self.write_bounced(buf, offset);
        }
        self.file.write_all_at(buf, offset)
    }

    /// On a direct file, the aligned writes go to the kernel in one
    /// `io_submit` and are reaped together (`aio`), so the device's
    /// queue holds them all; the others, and all of them on a file with
    /// the page cache (where AIO would write in turn anyway), one after
    /// another. (Four writer threads were tried first: an fsync beside a
    /// large writer waited for them to be scheduled, p99 3 to 20 ms.)
    fn write_many(&self, writes: &[(u64, Vec<&[u8]>)]) -> Vec<io::Result<()>> {
        let lens: Vec<usize> = writes
            .iter()
            .map(|w| w.1.iter().map(|p| p.len()).sum())
            .collect();
        let small = lens.iter().sum::<usize>() <= TOGETHER_BYTES_MAX * writes.len();
        let together: Vec<usize> = if self.direct && self.writable && small && writes.len() > 1 {
            (0..writes.len())
                .filter(|&i| {
                    let (offset, pieces) = &writes[i];
                    lens[i] > 0
                        && aligned_run(pieces, *offset)
                        && check_range(*offset, lens[i], self.size).is_ok()
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut done: Vec<Option<io::Result<usize>>> = writes.iter().map(|_| None).collect();
        if !together.is_empty() {
            let batch: Vec<(u64, Vec<&[u8]>)> =
                together.iter().map(|&i| writes[i].clone()).collect();
            if let Some(results) = self.aio.write_batch(self.file.as_raw_fd(), &batch) {
                for (&i, r) in together.iter().zip(results) {
                    done[i] = Some(r);
                }
            }
        }
        // What AIO did not take is written here, one after another; a
        // short transfer's rest too (direct I/O ends it on a sector
        // boundary).
        writes
            .iter()
            .zip(done)
            .zip(&lens)
            .map(|(((offset, pieces), done), &len)| match done {
                Some(Ok(n)) if n >= len => Ok(()),
                Some(Ok(n)) => self.write_gathered(&skip(pieces, n), offset + n as u64),
                Some(Err(e)) => Err(e),
                None => self.write_gathered(pieces, *offset),
            })
            .collect()
    }

    /// One `pwritev` where it can: always with the page cache, and
    /// with direct I/O when every piece is aligned (else the pieces are
    /// copied into one aligned buffer).
    fn write_gathered(&self, pieces: &[&[u8]], offset: u64) -> io::Result<()> {
        let len: usize = pieces.iter().map(|p| p.len()).sum();
        check_range(offset, len, self.size)?;
        if pieces.len() < 2 || !self.writable {
            return match pieces {
                [one] => self.write_at(one, offset),
                _ => self.write_at(&pieces.concat(), offset),
            };
        }
        if self.direct && !aligned_run(pieces, offset) {
            return self.write_at(&pieces.concat(), offset);
        }
        self.pwritev_all(pieces, offset)
    }

    fn barrier(&self) -> io::Result<()> {
        if self.writable {
            self.file.sync_data()
        } else {
            Ok(())
        }
    }
}

/// A sparse in-memory device: 64 KiB chunks allocated on first write,
/// zeros elsewhere, so a 2 GiB image costs only what is written.
pub struct MemDevice {
    size: u64,
    chunks: RwLock<HashMap<u64, Box<[u8]>>>,
}

const CHUNK: u64 = 65536;

impl MemDevice {
    pub fn new(size: u64) -> MemDevice {
        MemDevice {
            size,
            chunks: RwLock::new(HashMap::new()),
        }
    }

    /// A device holding a copy of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> MemDevice {
        let dev = MemDevice::new(bytes.len() as u64);
        for (i, c) in bytes.chunks(CHUNK as usize).enumerate() {
            if c.iter().any(|&b| b != 0) {
                // Cannot fail: in range by construction.
                let _ = dev.write_at(c, i as u64 * CHUNK);
            }
        }
        dev
    }

    /// An independent copy of the current contents.
    pub fn snapshot(&self) -> MemDevice {
        let chunks = self
            .chunks
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        MemDevice {
            size: self.size,
            chunks: RwLock::new(chunks),
        }
    }

    /// Bytes of chunks allocated.
    pub fn resident_bytes(&self) -> u64 {
        self.chunks
            .read()
            .map(|c| c.len() as u64 * CHUNK)
            .unwrap_or(0)
    }
}

impl BlockDevice for MemDevice {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.size)?;
        let chunks = self
            .chunks
            .read()
            .map_err(|_| io::Error::other("memory device lock poisoned"))?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let base = pos - pos % CHUNK;
            let within = (pos - base) as usize;
            let n = (CHUNK as usize - within).min(buf.len() - done);
            match chunks.get(&base) {
                Some(c) => buf[done..done + n].copy_from_slice(&c[within..within + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.size)?;
        let mut chunks = self
            .chunks
            .write()
            .map_err(|_| io::Error::other("memory device lock poisoned"))?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let base = pos - pos % CHUNK;
            let within = (pos - base) as usize;
            let n = (CHUNK as usize - within).min(buf.len() - done);
            let c = chunks
                .entry(base)
                .or_insert_with(|| vec![0u8; CHUNK as usize].into_boxed_slice());
            c[within..within + n].copy_from_slice(&buf[done..done + n]);
            done += n;
        }
        Ok(())
    }

    fn barrier(&self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_device_sparse_round_trip() {
        let dev = MemDevice::new(1 << 30);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        dev.write_at(&data, 65_000).unwrap();
        let mut back = vec![0u8; data.len()];
        dev.read_at(&mut back, 65_000).unwrap();
        assert_eq!(back, data);
        let mut zeros = vec![1u8; 1000];
        dev.read_at(&mut zeros, 1 << 29).unwrap();
        assert!(zeros.iter().all(|&b| b == 0));
        assert!(dev.read_at(&mut zeros, (1 << 30) - 10).is_err());
        assert!(dev.write_at(&zeros, u64::MAX - 3).is_err());
    }

    /// O_DIRECT on the test machine's file system (ext4 here; a file
    /// system without it falls back, which the test reports), against a
    /// memory device taking the same random writes: transfers of any
    /// offset and length, aligned ones direct, others bounced.
    #[test]
    fn direct_file_device_against_memory() {
        use rand::rngs::SmallRng;
        use rand::{Rng, RngCore, SeedableRng};
        let dir = std::env::temp_dir().join(format!("bufcache-direct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img");
        const SIZE: u64 = 8 << 20;
        File::create(&path).unwrap().set_len(SIZE).unwrap();
        let dev = FileDevice::open_direct(&path, true).unwrap();
        assert!(
            dev.is_direct(),
            "O_DIRECT refused on {}: the test needs a file system that takes it",
            dir.display()
        );
        let model = MemDevice::new(SIZE);
        let mut rng = SmallRng::seed_from_u64(1);
        for i in 0..3000 {
            let aligned = rng.gen_bool(0.3);
            let (off, len) = if aligned {
                let a = DIRECT_ALIGN as u64;
                (
                    rng.gen_range(0..SIZE / a - 17) * a,
                    rng.gen_range(1..16) * DIRECT_ALIGN,
                )
            } else {
                (rng.gen_range(0..SIZE - 70_000), rng.gen_range(1..70_000))
            };
            if rng.gen_bool(0.5) {
                let mut data = AlignedBuf::new(len);
                rng.fill_bytes(&mut data.as_mut_slice()[..len]);
                let data = &data.as_slice()[..len];
                dev.write_at(data, off).unwrap();
                model.write_at(data, off).unwrap();
            } else {
                let mut got = AlignedBuf::new(len);
                let mut want = vec![0u8; len];
                dev.read_at(&mut got.as_mut_slice()[..len], off).unwrap();
                model.read_at(&mut want, off).unwrap();
                assert!(
                    got.as_slice()[..len] == want[..],
                    "op {i}: read {len} at {off:#x}"
                );
            }
        }
        dev.barrier().unwrap();
        // What the file holds, read with the page cache.
        let buffered = FileDevice::open(&path, false).unwrap();
        let (mut a, mut b) = (vec![0u8; SIZE as usize], vec![0u8; SIZE as usize]);
        buffered.read_at(&mut a, 0).unwrap();
        model.read_at(&mut b, 0).unwrap();
        assert!(a == b, "the file differs from the model");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Gathered writes (`write_gathered`: `pwritev`, or one copied
    /// buffer where direct I/O needs it), alone and several at once
    /// (`write_many`), leave a file, direct or not, holding what a
    /// memory device holds after the same bytes were written to it in
    /// one piece each.
    #[test]
    fn gathered_writes_against_memory() {
        use rand::rngs::SmallRng;
        use rand::{Rng, RngCore, SeedableRng};
        let dir = std::env::temp_dir().join(format!("bufcache-gather-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        const SIZE: u64 = 8 << 20;
        for direct in [true, false] {
            let path = dir.join(format!("img-{direct}"));
            File::create(&path).unwrap().set_len(SIZE).unwrap();
            let dev = if direct {
                FileDevice::open_direct(&path, true).unwrap()
            } else {
                FileDevice::open(&path, true).unwrap()
            };
            assert_eq!(
                dev.is_direct(),
                direct,
                "O_DIRECT refused on {}",
                dir.display()
            );
            let model = MemDevice::new(SIZE);
            let mut rng = SmallRng::seed_from_u64(2);
            for i in 0..600 {
                // Aligned pieces take pwritev on the direct file too;
                // the others are copied first.
                let aligned = rng.gen_bool(0.5);
                let unit = if aligned { DIRECT_ALIGN } else { 1 };
                let len = rng.gen_range(1..300_000 / unit) * unit;
                let off = rng.gen_range(0..(SIZE - len as u64) / unit as u64) * unit as u64;
                let mut data = AlignedBuf::new(len);
                rng.fill_bytes(&mut data.as_mut_slice()[..len]);
                let data = &data.as_slice()[..len];
                let mut cuts: Vec<usize> = (0..rng.gen_range(0..6))
                    .map(|_| rng.gen_range(0..=len / unit) * unit)
                    .collect();
                cuts.extend([0, len]);
                cuts.sort_unstable();
                let pieces: Vec<&[u8]> = cuts.windows(2).map(|w| &data[w[0]..w[1]]).collect();
                dev.write_gathered(&pieces, off)
                    .unwrap_or_else(|e| panic!("op {i}: {} pieces at {off:#x}: {e}", pieces.len()));
                model.write_at(data, off).unwrap();
            }
            // Several at once (`write_many`), each
            // in a MiB of its own so that none overlaps another.
            for round in 0..60 {
                let n = rng.gen_range(1..=8u64);
                let mut bufs = Vec::new();
                for slot in 0..n {
                    let aligned = rng.gen_bool(0.5);
                    let unit = if aligned { DIRECT_ALIGN } else { 1 };
                    let len = rng.gen_range(1..(1 << 20) / unit) * unit;
                    let off = slot * (1 << 20)
                        + rng.gen_range(0..((1 << 20) - len as u64) / unit as u64) * unit as u64;
                    let mut data = AlignedBuf::new(len);
                    rng.fill_bytes(&mut data.as_mut_slice()[..len]);
                    let cut = rng.gen_range(0..=len / unit) * unit;
                    bufs.push((off, data, len, cut));
                }
                let writes: Vec<(u64, Vec<&[u8]>)> = bufs
                    .iter()
                    .map(|(off, d, len, cut)| {
                        let d = &d.as_slice()[..*len];
                        (*off, vec![&d[..*cut], &d[*cut..]])
                    })
                    .collect();
                for (i, r) in dev.write_many(&writes).into_iter().enumerate() {
                    r.unwrap_or_else(|e| panic!("round {round}, write {i}: {e}"));
                }
                for (off, d, len, _) in &bufs {
                    model.write_at(&d.as_slice()[..*len], *off).unwrap();
                }
            }
            // The direct file's aligned writes went through AIO.
            assert_eq!(dev.aio.writes_done() > 0, direct);
            dev.barrier().unwrap();
            let buffered = FileDevice::open(&path, false).unwrap();
            let (mut a, mut b) = (vec![0u8; SIZE as usize], vec![0u8; SIZE as usize]);
            buffered.read_at(&mut a, 0).unwrap();
            model.read_at(&mut b, 0).unwrap();
            assert!(a == b, "the file (direct: {direct}) differs from the model");
            // Past the end is refused whole.
            assert!(dev
                .write_gathered(&[&[1u8; 4096], &[2u8; 4096]], SIZE - 4096)
                .is_err());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_device_round_trip() {
        let dir = std::env::temp_dir().join(format!("bufcache-fd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img");
        let f = File::create(&path).unwrap();
        f.set_len(1 << 20).unwrap();
        drop(f);
        let dev = FileDevice::open(&path, true).unwrap();
        assert_eq!(dev.size_bytes(), 1 << 20);
        dev.write_at(b"hammer2", 4096).unwrap();
        dev.barrier().unwrap();
        let mut b = [0u8; 7];
        dev.read_at(&mut b, 4096).unwrap();
        assert_eq!(&b, b"hammer2");
        let ro = FileDevice::open(&path, false).unwrap();
        assert!(ro.write_at(b"x", 0).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
