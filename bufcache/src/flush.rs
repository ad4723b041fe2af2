//! Writing dirty buffers: the coalescing writer shared by every path
//! (`bwrite`, flush, the flusher thread, pageout's laundering), `flush`
//! with its barrier, dirty-limit throttling and the flusher thread.
//!
//! Ordering: `flush` snapshots the dirty set (device order), writes it
//! with neighbouring dirty blocks merged into one device write (up to
//! `WRITE_BYTES_MAX`) and the writes of up to `BATCH_MAX` buffers in
//! flight together (`BlockDevice::write_many`), then issues the
//! barrier. Everything dirty when flush began is durable when it
//! returns, so the caller may then write the volume header and barrier
//! again (HAMMER2's flush order).
//!
//! Deadlock avoidance: a writer holding busy pages sleeps only on pages
//! above them (`write_indices` takes its batch in ascending order, as
//! `CachedDevice::write_through_many` does), and nothing else sleeps
//! on a page's busy while holding one, so no two sleepers wait on each
//! other.
//!
//! Errors: a failed write or barrier poisons the cache; afterwards every
//! write path returns `Error::Poisoned`.

#![forbid(unsafe_code)]

use crate::cache::{runs, Inner};
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmglue::{LaunderPage, PageBusy, BLOCK_BYTES, FRAME_BYTES};

/// Largest single device write built by coalescing.
const WRITE_BYTES_MAX: usize = 1 << 20;
/// Buffers a flush holds busy at once, whose writes go to the device
/// together (8 MiB).
const BATCH_MAX: usize = 128;

/// One device write: its offset and its pieces (the frame's place in
/// the list written, the blocks of that frame it covers, the bytes).
type Submission<'a> = (u64, Vec<(usize, u64, &'a [u8])>);

/// One dirty frame to write: its index, dirty and valid masks and bytes.
struct DirtyFrame<'a> {
    index: u64,
    dirty: u64,
    valid: u64,
    data: &'a [u8],
}

/// Blocks (of 1 KiB) per direct-I/O sector.
const SECTOR_BLOCKS: usize = crate::aligned::DIRECT_ALIGN / BLOCK_BYTES;

/// The blocks to write for `dirty`: each sector it touches whole when
/// every block of that sector is valid (the clean ones hold what the
/// device holds, so writing them changes nothing), so that a device
/// opened for direct I/O gets aligned writes and needs no
/// read-modify-write.
fn sector_mask(dirty: u64, valid: u64) -> u64 {
    let group = (1u64 << SECTOR_BLOCKS) - 1;
    let mut out = dirty;
    for g in (0..64).step_by(SECTOR_BLOCKS) {
        let m = group << g;
        if dirty & m != 0 && valid & m == m {
            out |= m;
        }
    }
    out
}

impl Inner {
    /// Write the dirty blocks of `frames` (sorted by index, distinct),
    /// merging neighbours; the writes that are not neighbours go to the
    /// device together (`BlockDevice::write_many`). Returns the blocks
    /// written per frame; on a failure the cache is poisoned and the
    /// error returned with the blocks of the writes that succeeded.
    fn write_dirty(&self, frames: &[DirtyFrame<'_>]) -> (Vec<u64>, Result<()>) {
        let mut written = vec![0u64; frames.len()];
        // Each device write: its offset and pieces (frame, mask, bytes).
        let mut subs: Vec<Submission<'_>> = Vec::new();
        let mut pending_len = 0usize;
        for (fi, f) in frames.iter().enumerate() {
            let base = f.index * FRAME_BYTES as u64;
            let flen = self.frame_len(f.index);
            for (first, count) in runs(sector_mask(f.dirty, f.valid)) {
                let s = first * BLOCK_BYTES;
                let e = ((first + count) * BLOCK_BYTES).min(flen);
                if s >= e {
                    continue;
                }
                let mask = if count >= 64 {
                    u64::MAX
                } else {
                    ((1u64 << count) - 1) << first
                };
                let off = base + s as u64;
                match subs.last_mut() {
                    Some((start, pieces))
                        if *start + pending_len as u64 == off
                            && pending_len + (e - s) <= WRITE_BYTES_MAX =>
                    {
                        pieces.push((fi, mask, &f.data[s..e]));
                    }
                    _ => {
                        subs.push((off, vec![(fi, mask, &f.data[s..e])]));
                        pending_len = 0;
                    }
                }
                pending_len += e - s;
            }
        }
        let res = self.submit(&subs, &mut written);
        (written, res)
    }

    /// Issue `subs` (offset and pieces each) together, count them, and
    /// note in `written` the blocks of those that reached the device.
    fn submit(&self, subs: &[Submission<'_>], written: &mut [u64]) -> Result<()> {
        if subs.is_empty() {
            return Ok(());
        }
        let writes: Vec<(u64, Vec<&[u8]>)> = subs
            .iter()
            .map(|(off, pieces)| (*off, pieces.iter().map(|p| p.2).collect()))
            .collect();
        let results = self.dev.write_many(&writes);
        let mut first_error = None;
        for ((offset, pieces), res) in subs.iter().zip(results) {
            let len: usize = pieces.iter().map(|p| p.2.len()).sum();
            log::trace!("bufcache: write {len} bytes at {offset:#x}");
            match res {
                Ok(()) => {
                    self.counters.device_writes.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .device_write_bytes
                        .fetch_add(len as u64, Ordering::Relaxed);
                    for &(fi, mask, _) in pieces {
                        written[fi] |= mask;
                    }
                }
                Err(source) => {
                    if first_error.is_none() {
                        first_error = Some(Error::Write {
                            offset: *offset,
                            len,
                            source,
                        });
                    }
                }
            }
        }
        match first_error {
            Some(e) => {
                self.poison(&e);
                Err(e)
            }
            None => Ok(()),
        }
    }

    /// Write busy-exclusive pages (sorted by index) and mark what reached
    /// the device clean.
    pub(crate) fn write_busy_pages(&self, pages: &mut [(u64, &mut PageBusy<'_>)]) -> Result<()> {
        self.check_poison()?;
        let (written, res) = {
            let frames: Vec<DirtyFrame<'_>> = pages
                .iter()
                .map(|(index, p)| DirtyFrame {
                    index: *index,
                    dirty: p.dirty(),
                    valid: p.valid(),
                    data: p.data(),
                })
                .collect();
            self.write_dirty(&frames)
        };
        for ((index, p), mask) in pages.iter_mut().zip(written) {
            if mask != 0 {
                p.clear_dirty(mask);
                if p.dirty() == 0 {
                    self.note_clean(*index);
                }
            }
        }
        self.wake_throttled();
        res
    }

    /// The `Pager` side: pageout hands over dirty pages of this cache.
    pub(crate) fn launder(&self, pages: &[LaunderPage<'_>]) {
        if self.is_poisoned() {
            return;
        }
        let mut order: Vec<&LaunderPage<'_>> = pages.iter().collect();
        order.sort_by_key(|p| p.key().index());
        let frames: Vec<DirtyFrame<'_>> = order
            .iter()
            .map(|p| DirtyFrame {
                index: p.key().index(),
                dirty: p.dirty(),
                valid: p.valid(),
                data: p.data(),
            })
            .collect();
        let (written, res) = self.write_dirty(&frames);
        for (p, mask) in order.iter().zip(written) {
            if mask != 0 {
                p.mark_clean(mask);
                if p.dirty() == 0 {
                    self.note_clean(p.key().index());
                }
            }
        }
        if let Err(e) = res {
            log::error!("bufcache: pageout write failed: {e}");
        }
        self.wake_throttled();
    }

    /// Write the dirty buffers among `indices` (sorted), up to
    /// `BATCH_MAX` at a time: their writes (neighbours merged) go to the
    /// device together.
    pub(crate) fn write_indices(&self, indices: &[u64]) -> Result<()> {
        let mut batch: Vec<(u64, PageBusy<'_>)> = Vec::new();
        for &index in indices {
            self.check_poison()?;
            if let Some(p) = self.busy_dirty(index) {
                batch.push((index, p));
            }
            if batch.len() == BATCH_MAX {
                self.write_batch(&mut batch)?;
            }
        }
        self.write_batch(&mut batch)
    }

    /// Write the busy pages of `batch` (sorted) and let them go.
    fn write_batch(&self, batch: &mut Vec<(u64, PageBusy<'_>)>) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut refs: Vec<(u64, &mut PageBusy<'_>)> =
            batch.iter_mut().map(|(ix, p)| (*ix, p)).collect();
        let r = self.write_busy_pages(&mut refs);
        batch.clear();
        r
    }

    /// Busy buffer `index` exclusively (sleeping for it) if it is
    /// resident and dirty.
    fn busy_dirty(&self, index: u64) -> Option<PageBusy<'_>> {
        let hold = self.vm.lookup(self.key(index)?)?;
        let p = hold.busy_exclusive();
        (p.dirty() != 0).then_some(p)
    }

    pub(crate) fn flush(&self) -> Result<()> {
        self.check_poison()?;
        let snapshot: Vec<u64> = self
            .dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        self.write_indices(&snapshot)?;
        self.barrier()?;
        log::debug!("bufcache: flushed {} buffers", snapshot.len());
        Ok(())
    }

    pub(crate) fn barrier(&self) -> Result<()> {
        self.check_poison()?;
        if let Err(source) = self.dev.barrier() {
            let e = Error::Barrier { source };
            self.poison(&e);
            return Err(e);
        }
        self.counters.barriers.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub(crate) fn wake_throttled(&self) {
        if self.throttle_waiters.load(Ordering::SeqCst) > 0 {
            let _g = self.throttle_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.throttle_cv.notify_all();
        }
    }

    pub(crate) fn wake_flusher(&self) {
        self.flush_signal.wake();
    }

    /// Hold a writer while dirty data is over its limit: the flusher (or,
    /// without one, this thread) writes down to the low mark.
    pub(crate) fn throttle(&self) -> Result<()> {
        if self.dirty_count.load(Ordering::SeqCst) <= self.dirty_hi {
            return Ok(());
        }
        if !self.cfg.flusher_thread {
            return self.write_down_to_low();
        }
        let start = Instant::now();
        self.throttle_waiters.fetch_add(1, Ordering::SeqCst);
        let res = loop {
            if let Err(e) = self.check_poison() {
                break Err(e);
            }
            if self.dirty_count.load(Ordering::SeqCst) <= self.dirty_lo {
                break Ok(());
            }
            let waited = start.elapsed();
            if waited >= self.cfg.throttle_wait_max {
                break Err(Error::Throttled {
                    dirty_bytes: (self.dirty_count.load(Ordering::SeqCst) * FRAME_BYTES) as u64,
                    waited_ms: waited.as_millis() as u64,
                });
            }
            self.wake_flusher();
            let g = self.throttle_lock.lock().unwrap_or_else(|p| p.into_inner());
            if self.dirty_count.load(Ordering::SeqCst) > self.dirty_lo && !self.is_poisoned() {
                let _ = self
                    .throttle_cv
                    .wait_timeout(g, Duration::from_millis(10))
                    .unwrap_or_else(|p| p.into_inner());
            }
        };
        self.throttle_waiters.fetch_sub(1, Ordering::SeqCst);
        res
    }

    /// Write the lowest-offset dirty buffers until at most `dirty_lo`
    /// remain.
    pub(crate) fn write_down_to_low(&self) -> Result<()> {
        let excess = self
            .dirty_count
            .load(Ordering::SeqCst)
            .saturating_sub(self.dirty_lo);
        if excess == 0 {
            return Ok(());
        }
        let pick: Vec<u64> = self
            .dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .take(excess)
            .collect();
        self.write_indices(&pick)
    }
}

/// The flusher's wakeup: a flag and a condvar, in the cache.
pub(crate) struct FlushSignal {
    wanted: Mutex<bool>,
    cv: Condvar,
    stop: AtomicBool,
}

impl FlushSignal {
    pub(crate) fn new() -> FlushSignal {
        FlushSignal {
            wanted: Mutex::new(false),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
        }
    }

    fn wake(&self) {
        let mut w = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        if !*w {
            *w = true;
            self.cv.notify_one();
        }
    }
}

/// The flusher thread of one cache: writes `bawrite` buffers and brings
/// dirty data down to its low mark when writers are throttled. Sleeps until
/// woken. Dropping the handle stops and joins it.
pub(crate) struct Flusher {
    inner: Arc<Inner>,
    handle: Option<JoinHandle<()>>,
}

impl Flusher {
    pub(crate) fn start(inner: &Arc<Inner>) -> Result<Flusher> {
        let inner2 = Arc::clone(inner);
        let handle = std::thread::Builder::new()
            .name("bufcache-flush".into())
            .spawn(move || flusher(&inner2))
            .map_err(|source| Error::FlusherSpawn { source })?;
        Ok(Flusher {
            inner: Arc::clone(inner),
            handle: Some(handle),
        })
    }
}

fn flusher(inner: &Inner) {
    let sig = &inner.flush_signal;
    loop {
        {
            let mut w = sig.wanted.lock().unwrap_or_else(|p| p.into_inner());
            while !*w && !sig.stop.load(Ordering::SeqCst) {
                w = sig.cv.wait(w).unwrap_or_else(|p| p.into_inner());
            }
            *w = false;
        }
        if sig.stop.load(Ordering::SeqCst) {
            return;
        }
        let queued: Vec<u64> =
            std::mem::take(&mut *inner.async_set.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .collect();
        let mut res = inner.write_indices(&queued);
        if res.is_ok() && inner.dirty_count.load(Ordering::SeqCst) > inner.dirty_lo {
            res = inner.write_down_to_low();
        }
        if let Err(e) = res {
            log::error!("bufcache: flusher: {e}");
        }
        inner.wake_throttled();
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        let sig = &self.inner.flush_signal;
        sig.stop.store(true, Ordering::SeqCst);
        {
            let _w = sig.wanted.lock().unwrap_or_else(|p| p.into_inner());
            sig.cv.notify_all();
        }
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                log::error!("bufcache: flusher thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_runs_grow_to_whole_valid_sectors() {
        // One dirty block in a valid sector: the sector.
        assert_eq!(sector_mask(0b0010, 0b1111), 0b1111);
        // Not all valid: only the dirty block.
        assert_eq!(sector_mask(0b0010, 0b0111), 0b0010);
        // Sectors without dirty blocks are left out.
        assert_eq!(sector_mask(0b1 << 8, u64::MAX), 0b1111 << 8);
        assert_eq!(sector_mask(0, u64::MAX), 0);
        assert_eq!(sector_mask(u64::MAX, u64::MAX), u64::MAX);
        // The last sector of a frame.
        assert_eq!(sector_mask(1 << 63, u64::MAX), 0b1111 << 60);
    }
}
