//! `CachedDevice`: a `BlockDevice` that reads and writes through the
//! buffer cache, so the layers above (the HAMMER2 read engine and flush)
//! keep their one device interface and gain the cache.
//!
//! Reads are served from cached 64 KiB buffers (read on a miss, with
//! read-ahead). Writes go into buffers as delayed writes
//! (`write_through_many` writes its buffers at once and leaves them
//! clean). `barrier` is the
//! cache's flush: every dirty buffer written in device order, then the
//! device barrier. So the ordering a caller builds with barriers holds:
//! nothing written after a barrier can reach the device before what was
//! written before it, because it was not even dirty then. Pageout may
//! write a dirty buffer early; that only makes it durable sooner.

use crate::cache::BufCache;
use crate::device::BlockDevice;
use std::io;

pub struct CachedDevice {
    cache: BufCache,
}

const FRAME: u64 = vmglue::FRAME_BYTES as u64;

/// A shortage of pages is `OutOfMemory` (the library answers EAGAIN
/// and poisons nothing); anything else is a device error.
fn io_error(e: crate::Error) -> io::Error {
    if e.is_resource() {
        io::Error::new(io::ErrorKind::OutOfMemory, e.to_string())
    } else {
        io::Error::other(e.to_string())
    }
}

/// Tries of a buffer operation that met a shortage of pages (each after
/// the page layer's own wait) before the shortage is reported.
const RESOURCE_TRIES: usize = 3;

/// `op`, again while it fails for a shortage of pages (pageout and the
/// cache's flusher free pages meanwhile), `RESOURCE_TRIES` times at most.
fn retrying<T>(mut op: impl FnMut() -> crate::Result<T>) -> io::Result<T> {
    let mut tries = 0;
    loop {
        match op() {
            Err(e) if e.is_resource() && tries + 1 < RESOURCE_TRIES => {
                tries += 1;
                log::warn!("buffer cache: {e}; trying again ({tries} of {RESOURCE_TRIES})");
            }
            r => return r.map_err(io_error),
        }
    }
}

/// Split `[offset, offset+len)` at 64 KiB buffer boundaries.
fn pieces_of(offset: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize)> {
    let end = offset + len as u64;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let next = ((pos / FRAME) + 1) * FRAME;
        let hi = next.min(end);
        let piece = (pos, (pos - offset) as usize, (hi - pos) as usize);
        pos = hi;
        Some(piece)
    })
}

/// The most buffers a gathered write holds at once (2 MiB): their
/// pages are wired and busy, out of pageout's reach, and a tight budget
/// must keep enough others to make room for the next ones.
const GATHER_MAX: usize = 32;

/// A cursor over pieces laid end to end.
struct Gather<'a> {
    pieces: &'a [&'a [u8]],
    piece: usize,
    at: usize,
}

impl<'a> Gather<'a> {
    fn new(pieces: &'a [&'a [u8]]) -> Gather<'a> {
        Gather {
            pieces,
            piece: 0,
            at: 0,
        }
    }

    /// Fill `out` with the next `out.len()` bytes.
    fn copy_into(&mut self, out: &mut [u8]) {
        let mut done = 0;
        while done < out.len() {
            let p = self.pieces[self.piece];
            let n = (p.len() - self.at).min(out.len() - done);
            out[done..done + n].copy_from_slice(&p[self.at..self.at + n]);
            done += n;
            self.at += n;
            if self.at == p.len() {
                self.piece += 1;
                self.at = 0;
            }
        }
    }
}

impl CachedDevice {
    pub fn new(cache: BufCache) -> CachedDevice {
        CachedDevice { cache }
    }

    pub fn cache(&self) -> &BufCache {
        &self.cache
    }
}

impl BlockDevice for CachedDevice {
    fn size_bytes(&self) -> u64 {
        self.cache.device().size_bytes()
    }

    fn cache_report(&self) -> Option<String> {
        Some(self.cache.report())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        for (at, from, n) in pieces_of(offset, buf.len()) {
            let b = retrying(|| self.cache.bread(at, n))?;
            buf[from..from + n].copy_from_slice(b.data());
        }
        Ok(())
    }

    /// Delayed writes: copied into the buffers, written by the next
    /// barrier (or earlier by the flusher or pageout).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        for (at, from, n) in pieces_of(offset, buf.len()) {
            retrying(|| {
                let mut b = self.cache.getblk(at, n)?;
                b.data_mut().copy_from_slice(&buf[from..from + n]);
                b.bdwrite()
            })?;
        }
        Ok(())
    }

    fn barrier(&self) -> io::Result<()> {
        self.cache.flush().map_err(io_error)
    }

    /// Every buffer the runs cover filled, then all written together
    /// (`BufCache::bwrite_all`): one device write per run of neighbours
    /// instead of one per buffer, and those in flight together where the
    /// device can. The buffers are taken in ascending order, at most
    /// `GATHER_MAX` at a time; a run that begins in the buffer the one
    /// before it ended in writes what is held first (a buffer is taken
    /// once), and so does a shortage of pages before it waits (it waits
    /// holding none).
    fn write_through_many(&self, writes: &[(u64, Vec<&[u8]>)]) -> io::Result<()> {
        let mut order: Vec<&(u64, Vec<&[u8]>)> = writes.iter().collect();
        order.sort_by_key(|w| w.0);
        let mut bufs: Vec<crate::cache::Buf<'_>> = Vec::new();
        for (offset, pieces) in order {
            let len: usize = pieces.iter().map(|p| p.len()).sum();
            let mut src = Gather::new(pieces);
            for (at, _, n) in pieces_of(*offset, len) {
                let taken = bufs
                    .last()
                    .is_some_and(|b| b.offset() / FRAME == at / FRAME);
                if bufs.len() == GATHER_MAX || taken {
                    self.cache
                        .bwrite_all(std::mem::take(&mut bufs))
                        .map_err(io_error)?;
                }
                let mut b = match self.cache.getblk(at, n) {
                    Ok(b) => b,
                    // Short of pages: write and let go of those held,
                    // then wait for one holding none.
                    Err(e) if e.is_resource() => {
                        self.cache
                            .bwrite_all(std::mem::take(&mut bufs))
                            .map_err(io_error)?;
                        retrying(|| self.cache.getblk(at, n))?
                    }
                    Err(e) => return Err(io_error(e)),
                };
                src.copy_into(b.data_mut());
                bufs.push(b);
            }
        }
        self.cache.bwrite_all(bufs).map_err(io_error)
    }

    fn read_checked(
        &self,
        offset: u64,
        len: usize,
        tag: u64,
        f: &mut dyn FnMut(&[u8], bool) -> bool,
    ) -> io::Result<()> {
        let frame = crate::FRAME_BYTES as u64;
        if offset % frame + len as u64 > frame {
            // Across two buffers: copied out, checked each time.
            return crate::device::read_copied(self, offset, len, f);
        }
        retrying(|| self.cache.read_checked(offset, len, tag, &mut *f))
    }

    fn cluster_read(&self, offset: u64, len: u64) {
        self.cache.cluster_read(offset, len);
    }

    fn read_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        for (at, from, n) in pieces_of(offset, buf.len()) {
            match self.cache.bread_resident(at, n).map_err(io_error)? {
                Some(b) => buf[from..from + n].copy_from_slice(b.data()),
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    fn page_layer(&self) -> Option<std::sync::Arc<vmglue::Vm>> {
        Some(self.cache.vm().clone())
    }

    fn mark(&self, name: &str) -> io::Result<()> {
        self.cache.device().mark(name)
    }
}
