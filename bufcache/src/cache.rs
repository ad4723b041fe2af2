//! The buffer cache: 64 KiB device-aligned buffers on `vmglue` pages.
//!
//! A buffer is one page bound to (this cache's object, offset / 64 KiB).
//! Requests name a byte range inside one buffer (HAMMER2 blocks are
//! naturally aligned and at most 64 KiB, so they never cross one).
//!
//! - `getblk`: the buffer busy-exclusive and wired, contents as cached
//!   (edge blocks of an unaligned range are read so that marking the range
//!   valid is honest);
//! - `bread`: busy-shared, the range valid (read on a miss, with read-ahead
//!   when misses are sequential); `bread_mut`: the same, exclusive;
//! - releases on the exclusive `Buf`: `bdwrite` (delayed write: mark dirty,
//!   written by flush, the flusher or pageout), `bawrite` (async write:
//!   queued for the flusher now), `bwrite` (sync write), `brelse` (release;
//!   first in line for pageout), `bqrelse` (quick release: keep it hot),
//!   `invalidate` (discard);
//! - `lookup`: a held buffer without busy or I/O (the lockless hit path).
//!
//! Rules: a buffer's page is wired while a `Buf`/`BufShared` is out; dirty
//! buffers are in `dirty` (offset-ordered) exactly while their page has
//! dirty blocks, both changed with the page busy-exclusive. Pageout may
//! write any unwired dirty buffer at any time, so a block that must not
//! reach the disk before a barrier (the volume header) is written with
//! `bwrite` after `flush`, never left dirty.

#![forbid(unsafe_code)]

use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::flush::{FlushSignal, Flusher};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::Duration;
use vmglue::{
    AllocClass, Grab, LaunderPage, ObjectId, PageBusy, PageHold, PageKey, PageShared,
    PageoutDaemon, Pager, Vm, VmConfig, BLOCK_BYTES, FRAME_BYTES,
};

/// Tuning of one cache.
#[derive(Clone, Debug)]
pub struct BufCacheConfig {
    /// Dirty data above which writers are throttled; `None`: a quarter of
    /// the page budget.
    pub dirty_max_bytes: Option<u64>,
    /// Largest read-ahead, in buffers.
    pub read_ahead_max: usize,
    /// Run a flusher thread for async writes and dirty-limit flushing. If
    /// false, those writes happen in the caller.
    pub flusher_thread: bool,
    /// How long a throttled writer waits before failing.
    pub throttle_wait_max: Duration,
}

impl Default for BufCacheConfig {
    fn default() -> BufCacheConfig {
        BufCacheConfig {
            dirty_max_bytes: None,
            read_ahead_max: 8,
            flusher_thread: true,
            throttle_wait_max: Duration::from_secs(30),
        }
    }
}

/// Parse a `cache_size=` value: bytes with an optional K, M or G suffix
/// (powers of 1024).
pub fn parse_cache_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// Counters of one cache.
#[derive(Clone, Debug, Default)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub device_reads: u64,
    pub device_read_bytes: u64,
    pub device_writes: u64,
    pub device_write_bytes: u64,
    pub read_ahead_buffers: u64,
    pub barriers: u64,
    pub dirty_buffers: usize,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub device_reads: AtomicU64,
    pub device_read_bytes: AtomicU64,
    pub device_writes: AtomicU64,
    pub device_write_bytes: AtomicU64,
    pub read_ahead_buffers: AtomicU64,
    pub barriers: AtomicU64,
}

/// Buffers one `cluster_read` brings in at most (2 MiB).
pub const CLUSTER_MAX: usize = 32;

struct ReadAhead {
    /// The index a sequential reader misses on next.
    next: u64,
    window: usize,
}

pub(crate) struct Inner {
    pub vm: Arc<Vm>,
    pub dev: Arc<dyn BlockDevice>,
    pub object: ObjectId,
    pub size: u64,
    pub cfg: BufCacheConfig,
    pub dirty_hi: usize,
    pub dirty_lo: usize,
    poisoned: AtomicBool,
    poison_cause: Mutex<Option<String>>,
    /// Indices of dirty buffers, in device order.
    pub dirty: Mutex<BTreeSet<u64>>,
    pub dirty_count: AtomicUsize,
    /// Indices handed to `bawrite`, for the flusher.
    pub async_set: Mutex<BTreeSet<u64>>,
    pub throttle_lock: Mutex<()>,
    pub throttle_cv: Condvar,
    pub throttle_waiters: AtomicUsize,
    ra: Mutex<ReadAhead>,
    /// Per frame: the tag of the check its bytes last passed for a
    /// reader (`BufCache::read_checked`), 0 for none. Set under a shared
    /// busy; cleared whenever the cache takes the frame's page
    /// exclusively (a new binding, a fill, a write), so a tag never
    /// outlives the bytes it vouches for.
    checked: Box<[AtomicU64]>,
    pub counters: Counters,
    pub flush_signal: FlushSignal,
    _pager: Arc<CachePager>,
}

/// The `Pager` the VM calls; forwards to the cache while it lives.
struct CachePager {
    inner: OnceLock<Weak<Inner>>,
}

impl Pager for CachePager {
    fn launder(&self, pages: &[LaunderPage<'_>]) {
        if let Some(inner) = self.inner.get().and_then(Weak::upgrade) {
            inner.launder(pages);
        }
    }
}

/// A buffer cache over one device.
pub struct BufCache {
    pub(crate) inner: Arc<Inner>,
    flusher: Option<Flusher>,
    _pageout: Option<PageoutDaemon>,
}

/// A buffer held busy-exclusive and wired.
pub struct Buf<'a> {
    inner: &'a Inner,
    page: Option<PageBusy<'a>>,
    offset: u64,
    len: usize,
}

/// A buffer held busy-shared and wired; the range is valid.
pub struct BufShared<'a> {
    page: Option<PageShared<'a>>,
    offset: u64,
    len: usize,
}

/// A held buffer: resident, not busy, no I/O.
pub struct BufRef<'a> {
    hold: PageHold<'a>,
}

pub(crate) fn frame_of(offset: u64) -> u64 {
    offset / FRAME_BYTES as u64
}

fn within(offset: u64) -> usize {
    (offset % FRAME_BYTES as u64) as usize
}

/// Blocks touched by `len` bytes at `start` inside a frame.
fn block_mask(start: usize, len: usize) -> u64 {
    let first = start / BLOCK_BYTES;
    let last = (start + len - 1) / BLOCK_BYTES;
    let bits = last - first + 1;
    let m = if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    m << first
}

/// Runs of set bits: (first block, block count).
pub(crate) fn runs(mask: u64) -> impl Iterator<Item = (usize, usize)> {
    let mut m = mask;
    std::iter::from_fn(move || {
        if m == 0 {
            return None;
        }
        let start = m.trailing_zeros() as usize;
        let len = (m >> start).trailing_ones() as usize;
        m &= !(if len >= 64 {
            u64::MAX
        } else {
            ((1u64 << len) - 1) << start
        });
        Some((start, len))
    })
}

impl BufCache {
    /// A cache with its own page layer of `budget_bytes` and pageout
    /// daemon, and default tuning.
    pub fn open(dev: Arc<dyn BlockDevice>, budget_bytes: u64) -> Result<BufCache> {
        let vm = Vm::new(VmConfig::new(budget_bytes))?;
        let daemon = vm.start_pageout()?;
        let mut cache = BufCache::new(dev, vm, BufCacheConfig::default())?;
        cache._pageout = Some(daemon);
        Ok(cache)
    }

    /// A cache on an existing page layer (whose pageout daemon, if any,
    /// the caller runs).
    pub fn new(dev: Arc<dyn BlockDevice>, vm: Arc<Vm>, cfg: BufCacheConfig) -> Result<BufCache> {
        let pager = Arc::new(CachePager {
            inner: OnceLock::new(),
        });
        let weak: Weak<dyn Pager> = Arc::downgrade(&(pager.clone() as Arc<dyn Pager>));
        let object = vm.object_create(weak)?;
        let budget_pages = (vm.budget_bytes() / FRAME_BYTES as u64) as usize;
        let dirty_hi = match cfg.dirty_max_bytes {
            Some(b) => (b / FRAME_BYTES as u64) as usize,
            None => budget_pages / 4,
        }
        .max(2);
        let inner = Arc::new(Inner {
            size: dev.size_bytes(),
            dev,
            object,
            dirty_hi,
            dirty_lo: dirty_hi * 3 / 4,
            poisoned: AtomicBool::new(false),
            poison_cause: Mutex::new(None),
            dirty: Mutex::new(BTreeSet::new()),
            dirty_count: AtomicUsize::new(0),
            async_set: Mutex::new(BTreeSet::new()),
            throttle_lock: Mutex::new(()),
            throttle_cv: Condvar::new(),
            throttle_waiters: AtomicUsize::new(0),
            ra: Mutex::new(ReadAhead { next: 0, window: 0 }),
            checked: (0..vm.frames_max()).map(|_| AtomicU64::new(0)).collect(),
            counters: Counters::default(),
            flush_signal: FlushSignal::new(),
            _pager: pager.clone(),
            cfg,
            vm,
        });
        let _ = pager.inner.set(Arc::downgrade(&inner));
        let flusher = if inner.cfg.flusher_thread {
            Some(Flusher::start(&inner)?)
        } else {
            None
        };
        Ok(BufCache {
            inner,
            flusher,
            _pageout: None,
        })
    }

    pub fn vm(&self) -> &Arc<Vm> {
        &self.inner.vm
    }

    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.inner.dev
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        CacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            device_reads: c.device_reads.load(Ordering::Relaxed),
            device_read_bytes: c.device_read_bytes.load(Ordering::Relaxed),
            device_writes: c.device_writes.load(Ordering::Relaxed),
            device_write_bytes: c.device_write_bytes.load(Ordering::Relaxed),
            read_ahead_buffers: c.read_ahead_buffers.load(Ordering::Relaxed),
            barriers: c.barriers.load(Ordering::Relaxed),
            dirty_buffers: self.inner.dirty_count.load(Ordering::Relaxed),
        }
    }

    /// One line for a mount's log: buffer hits and misses, how the
    /// page lookups went (lockless hash, locked index, not found), and
    /// the device traffic.
    pub fn report(&self) -> String {
        let s = self.stats();
        let vs = self.vm().stats();
        let l = vs.lookups;
        let hits = l.fast + l.slow;
        let share = if hits == 0 {
            1.0
        } else {
            l.fast as f64 / hits as f64
        };
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        format!(
            "buffer cache: {} hits, {} misses; page lookups: {} lockless, {} locked \
             ({:.4} of hits lockless), {} not found; device: {} reads ({:.1} MiB), \
             {} writes ({:.1} MiB), {} barriers; file data pages: peak {} ({:.1} MiB); \
             frames made resident ahead of use: {} ({:.1} MiB)",
            s.hits,
            s.misses,
            l.fast,
            l.slow,
            share,
            l.miss,
            s.device_reads,
            mib(s.device_read_bytes),
            s.device_writes,
            mib(s.device_write_bytes),
            s.barriers,
            vs.anon_peak,
            mib((vs.anon_peak * FRAME_BYTES) as u64),
            vs.prefaulted,
            mib(vs.prefaulted * FRAME_BYTES as u64)
        )
    }

    /// Whether an earlier write or barrier failed.
    pub fn is_poisoned(&self) -> bool {
        self.inner.is_poisoned()
    }

    /// The held buffer at `offset` if resident; no busy, no I/O.
    #[inline]
    pub fn lookup(&self, offset: u64) -> Option<BufRef<'_>> {
        let key = PageKey::new(self.inner.object, frame_of(offset))?;
        self.inner.vm.lookup(key).map(|hold| BufRef { hold })
    }

    /// The buffer holding `offset..offset+len`, busy-exclusive, wired;
    /// its contents are whatever is cached (see `Buf::is_valid`).
    pub fn getblk(&self, offset: u64, len: usize) -> Result<Buf<'_>> {
        let inner = &*self.inner;
        inner.check_range(offset, len)?;
        let (mut page, new) = inner.grab_exclusive(frame_of(offset))?;
        let start = within(offset);
        let mask = block_mask(start, len);
        let aligned_start = start & (BLOCK_BYTES - 1) == 0;
        let end = start + len;
        let aligned_end = end & (BLOCK_BYTES - 1) == 0 || offset + len as u64 == inner.size;
        let mut edges = 0u64;
        if !aligned_start {
            edges |= 1 << (start / BLOCK_BYTES);
        }
        if !aligned_end {
            edges |= 1 << ((end - 1) / BLOCK_BYTES);
        }
        let missing = edges & mask & !page.valid();
        if missing != 0 {
            if let Err(e) = inner.read_blocks(&mut page, frame_of(offset), missing) {
                inner.drop_failed(page, new);
                return Err(e);
            }
        }
        page.wire();
        Ok(Buf {
            inner,
            page: Some(page),
            offset,
            len,
        })
    }

    /// Sync write of several buffers together (BSD's `cluster_write`):
    /// each is marked dirty, then all are written, neighbours in one
    /// device write. The buffers are of distinct frames, in ascending
    /// order (the order `getblk` took them in, so two writers cannot
    /// wait on each other).
    ///
    /// A buffer that was clean is not entered in the dirty set while it
    /// is written: it is busy throughout, so nothing else sees it, and a
    /// `flush` meanwhile (another commit's barrier) has no reason to
    /// wait for this writer's data.
    pub fn bwrite_all(&self, mut bufs: Vec<Buf<'_>>) -> Result<()> {
        self.inner.check_poison()?;
        for b in bufs.iter_mut() {
            let mask = b.mask();
            b.page_mut().set_dirty(mask);
        }
        let mut pages: Vec<(u64, &mut PageBusy<'_>)> = bufs
            .iter_mut()
            .map(|b| (frame_of(b.offset), b.page_mut()))
            .collect();
        self.inner.write_busy_pages(&mut pages)
    }

    /// The buffer holding `offset..offset+len`, busy-shared, wired, the
    /// range valid (read from the device on a miss).
    pub fn bread(&self, offset: u64, len: usize) -> Result<BufShared<'_>> {
        let inner = &*self.inner;
        inner.check_range(offset, len)?;
        let index = frame_of(offset);
        let need = block_mask(within(offset), len);
        if let Some(key) = PageKey::new(inner.object, index) {
            if let Some(h) = inner.vm.lookup(key) {
                let s = h.busy_shared();
                if s.valid() & need == need {
                    inner.counters.hits.fetch_add(1, Ordering::Relaxed);
                    s.wire();
                    return Ok(BufShared {
                        page: Some(s),
                        offset,
                        len,
                    });
                }
            }
        }
        let (page, new) = inner.read_exclusive(index, need)?;
        let s = page.downgrade();
        s.wire();
        if new {
            inner.read_ahead(index);
        }
        Ok(BufShared {
            page: Some(s),
            offset,
            len,
        })
    }

    /// `bread` without I/O: the buffer busy-shared and wired if it is
    /// resident with the range valid, else `None` (the caller reads it
    /// some other time, holding no lock).
    pub fn bread_resident(&self, offset: u64, len: usize) -> Result<Option<BufShared<'_>>> {
        let inner = &*self.inner;
        inner.check_range(offset, len)?;
        let need = block_mask(within(offset), len);
        let Some(key) = PageKey::new(inner.object, frame_of(offset)) else {
            return Ok(None);
        };
        let Some(h) = inner.vm.lookup(key) else {
            return Ok(None);
        };
        let s = h.busy_shared();
        if s.valid() & need != need {
            return Ok(None);
        }
        inner.counters.hits.fetch_add(1, Ordering::Relaxed);
        s.wire();
        Ok(Some(BufShared {
            page: Some(s),
            offset,
            len,
        }))
    }

    /// DragonFly's cluster read: bring the buffers over
    /// `offset..offset+len` into the cache with as few device reads as
    /// possible (one per run of buffers not resident), for a caller
    /// about to read them one by one (a file's blocks laid out in a
    /// row). Resident buffers are skipped; at most `CLUSTER_MAX`
    /// buffers per call. A hint: a failed read leaves the buffers to
    /// be read (and the error reported) when they are needed.
    pub fn cluster_read(&self, offset: u64, len: u64) {
        let inner = &*self.inner;
        if len == 0 || inner.check_range(offset, 1).is_err() {
            return;
        }
        let last = frame_of(offset.saturating_add(len - 1).min(inner.size - 1));
        let mut i = frame_of(offset);
        let end = (last + 1).min(i + CLUSTER_MAX as u64);
        while i < end {
            if let Some(key) = PageKey::new(inner.object, i) {
                if inner.vm.lookup(key).is_some() {
                    i += 1;
                    continue;
                }
            }
            let n = inner.fill_run(i, (end - i) as usize);
            i += n.max(1) as u64;
        }
    }

    /// Run `f` on the `len` bytes at `offset` (within one buffer) in
    /// place, the buffer held shared, read from the device on a miss.
    /// `tag` names a check of exactly those bytes (a block's check code
    /// and place): `f` is told whether the same tag passed since the
    /// bytes were last read or changed, and returns whether it passed
    /// now, which records it. So a block read again and again from the
    /// cache is checked once per residency, not copied out each time.
    pub fn read_checked(
        &self,
        offset: u64,
        len: usize,
        tag: u64,
        f: &mut dyn FnMut(&[u8], bool) -> bool,
    ) -> Result<()> {
        let b = self.bread(offset, len)?;
        let frame = b.page().frame() as usize;
        let slot = self.inner.checked.get(frame);
        let seen = tag != 0 && slot.is_some_and(|t| t.load(Ordering::Relaxed) == tag);
        if f(b.data(), seen) && !seen && tag != 0 {
            if let Some(t) = slot {
                t.store(tag, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Like `bread`, but busy-exclusive, for modifying in place.
    pub fn bread_mut(&self, offset: u64, len: usize) -> Result<Buf<'_>> {
        let inner = &*self.inner;
        inner.check_range(offset, len)?;
        let index = frame_of(offset);
        let (page, new) = inner.read_exclusive(index, block_mask(within(offset), len))?;
        page.wire();
        if new {
            inner.read_ahead(index);
        }
        Ok(Buf {
            inner,
            page: Some(page),
            offset,
            len,
        })
    }

    /// Write every dirty buffer, in device order with neighbours coalesced,
    /// then a barrier: everything dirty when `flush` began is durable when
    /// it returns.
    pub fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    /// Make every completed write durable.
    pub fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }
}

impl Drop for BufCache {
    fn drop(&mut self) {
        self.flusher.take();
        if !self.inner.is_poisoned() {
            if let Err(e) = self.inner.flush() {
                log::error!("bufcache: flush at close failed: {e}");
            }
        }
        if let Err(e) = self.inner.vm.object_destroy(self.inner.object) {
            log::warn!("bufcache: pages left at close: {e}");
        }
    }
}

impl Inner {
    pub(crate) fn key(&self, index: u64) -> Option<PageKey> {
        PageKey::new(self.object, index)
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<()> {
        let bad = Error::Range {
            offset,
            len,
            device_size: self.size,
        };
        if len == 0 || len > FRAME_BYTES {
            return Err(bad);
        }
        let Some(end) = offset.checked_add(len as u64) else {
            return Err(bad);
        };
        if end > self.size || frame_of(offset) != frame_of(end - 1) {
            return Err(bad);
        }
        Ok(())
    }

    /// Bytes of buffer `index` that exist on the device.
    pub(crate) fn frame_len(&self, index: u64) -> usize {
        let base = index * FRAME_BYTES as u64;
        (self.size.saturating_sub(base)).min(FRAME_BYTES as u64) as usize
    }

    fn frame_blocks_mask(&self, index: u64) -> u64 {
        let blocks = self.frame_len(index).div_ceil(BLOCK_BYTES);
        if blocks >= 64 {
            u64::MAX
        } else {
            (1u64 << blocks) - 1
        }
    }

    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    pub(crate) fn check_poison(&self) -> Result<()> {
        if !self.is_poisoned() {
            return Ok(());
        }
        let cause = self
            .poison_cause
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        Err(Error::Poisoned { cause })
    }

    pub(crate) fn poison(&self, e: &Error) {
        let mut cause = self.poison_cause.lock().unwrap_or_else(|p| p.into_inner());
        if cause.is_none() {
            log::error!("bufcache: poisoned: {e}");
            *cause = Some(e.to_string());
        }
        self.poisoned.store(true, Ordering::SeqCst);
        drop(cause);
        self.wake_throttled();
    }

    fn grab_exclusive(&self, index: u64) -> Result<(PageBusy<'_>, bool)> {
        let key = self.key(index).ok_or(Error::Range {
            offset: index.saturating_mul(FRAME_BYTES as u64),
            len: FRAME_BYTES,
            device_size: self.size,
        })?;
        let (page, new) = match self.vm.grab(key, AllocClass::Normal, true)? {
            Grab::New(b) => (b, true),
            Grab::Found(h) => (h.busy_exclusive(), false),
        };
        self.forget_checked(page.frame());
        Ok((page, new))
    }

    /// The frame's bytes may change: no check tag vouches for them.
    fn forget_checked(&self, frame: u32) {
        if let Some(t) = self.checked.get(frame as usize) {
            t.store(0, Ordering::Relaxed);
        }
    }

    /// Busy-exclusive buffer `index` with the blocks `need` valid.
    fn read_exclusive(&self, index: u64, need: u64) -> Result<(PageBusy<'_>, bool)> {
        let (mut page, new) = self.grab_exclusive(index)?;
        if page.valid() & need == need {
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Ok((page, new));
        }
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        let missing = self.frame_blocks_mask(index) & !page.valid();
        if let Err(e) = self.read_blocks(&mut page, index, missing) {
            self.drop_failed(page, new);
            return Err(e);
        }
        Ok((page, new))
    }

    /// A read failed: a page that held nothing is freed, others are kept.
    fn drop_failed(&self, page: PageBusy<'_>, new: bool) {
        if new && page.valid() == 0 {
            page.free();
        }
    }

    /// Read blocks `mask` of buffer `index` from the device, one read per
    /// run of blocks.
    fn read_blocks(&self, page: &mut PageBusy<'_>, index: u64, mask: u64) -> Result<()> {
        let flen = self.frame_len(index);
        let base = index * FRAME_BYTES as u64;
        let mask = mask & self.frame_blocks_mask(index);
        for (first, count) in runs(mask) {
            let start = first * BLOCK_BYTES;
            let end = ((first + count) * BLOCK_BYTES).min(flen);
            let buf = &mut page.data_mut()[start..end];
            self.dev
                .read_at(buf, base + start as u64)
                .map_err(|source| Error::Read {
                    offset: base + start as u64,
                    source,
                })?;
            self.counters.device_reads.fetch_add(1, Ordering::Relaxed);
            self.counters
                .device_read_bytes
                .fetch_add((end - start) as u64, Ordering::Relaxed);
        }
        page.set_valid(mask);
        Ok(())
    }

    /// After a miss on `index`: if misses are sequential, read the next
    /// buffers (doubling the window up to `read_ahead_max`) with one device
    /// read, into pages taken without waiting. Read-ahead never fails the
    /// caller's read; errors just end it.
    fn read_ahead(&self, index: u64) {
        if self.cfg.read_ahead_max == 0 {
            return;
        }
        let window = {
            let mut ra = self.ra.lock().unwrap_or_else(|p| p.into_inner());
            ra.window = if index == ra.next {
                (ra.window * 2).clamp(2.min(self.cfg.read_ahead_max), self.cfg.read_ahead_max)
            } else {
                0
            };
            ra.next = index + 1;
            ra.window
        };
        if window == 0 {
            return;
        }
        let n = self.fill_run(index + 1, window) as u64;
        if n == 0 {
            return;
        }
        let mut ra = self.ra.lock().unwrap_or_else(|p| p.into_inner());
        if ra.next == index + 1 {
            ra.next = index + 1 + n;
        }
    }

    /// Read up to `max` buffers from `first` that are not resident with
    /// one device read, into pages taken without waiting, stopping at
    /// the first one resident, busy or short (the device's end). Returns
    /// how many were read; a failed read frees them and returns 0 (the
    /// callers only read ahead: the buffers are read again when needed,
    /// and that read reports the error).
    fn fill_run(&self, first: u64, max: usize) -> usize {
        let mut pages = Vec::new();
        for i in first..first + max as u64 {
            if self.frame_len(i) != FRAME_BYTES {
                break;
            }
            let Some(key) = self.key(i) else { break };
            match self.vm.grab(key, AllocClass::Normal, false) {
                Ok(Grab::New(b)) => {
                    self.forget_checked(b.frame());
                    pages.push(b)
                }
                _ => break,
            }
        }
        if pages.is_empty() {
            return 0;
        }
        let base = first * FRAME_BYTES as u64;
        let mut aligned = crate::aligned::AlignedBuf::new(pages.len() * FRAME_BYTES);
        let bounce = &mut aligned.as_mut_slice()[..pages.len() * FRAME_BYTES];
        if let Err(e) = self.dev.read_at(bounce, base) {
            log::debug!("bufcache: read-ahead at {base:#x} failed: {e}");
            for p in pages {
                p.free();
            }
            return 0;
        }
        self.counters.device_reads.fetch_add(1, Ordering::Relaxed);
        self.counters
            .device_read_bytes
            .fetch_add(bounce.len() as u64, Ordering::Relaxed);
        self.counters
            .read_ahead_buffers
            .fetch_add(pages.len() as u64, Ordering::Relaxed);
        let n = pages.len();
        for (p, chunk) in pages.iter_mut().zip(bounce.chunks(FRAME_BYTES)) {
            p.data_mut().copy_from_slice(chunk);
            p.set_valid(u64::MAX);
            p.mark_prefetched();
        }
        n
    }

    /// Record that buffer `index` (busy-exclusive by the caller) became
    /// dirty.
    pub(crate) fn note_dirty(&self, index: u64) {
        let mut d = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        if d.insert(index) {
            self.dirty_count.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Record that buffer `index` (busy-exclusive by the caller) is clean.
    pub(crate) fn note_clean(&self, index: u64) {
        let mut d = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        if d.remove(&index) {
            self.dirty_count.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl<'a> Buf<'a> {
    fn page(&self) -> &PageBusy<'a> {
        self.page
            .as_ref()
            .expect("a Buf owns its page until consumed")
    }

    fn page_mut(&mut self) -> &mut PageBusy<'a> {
        self.page
            .as_mut()
            .expect("a Buf owns its page until consumed")
    }

    fn range(&self) -> std::ops::Range<usize> {
        let s = within(self.offset);
        s..s + self.len
    }

    fn mask(&self) -> u64 {
        block_mask(within(self.offset), self.len)
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the whole range holds device (or written) data.
    pub fn is_valid(&self) -> bool {
        self.page().valid() & self.mask() == self.mask()
    }

    /// Whether part of the range is waiting to be written.
    pub fn is_dirty(&self) -> bool {
        self.page().dirty() & self.mask() != 0
    }

    pub fn data(&self) -> &[u8] {
        let r = self.range();
        &self.page().data()[r]
    }

    /// The range, for writing. Call a write release afterwards so the
    /// change is marked dirty.
    pub fn data_mut(&mut self) -> &mut [u8] {
        let r = self.range();
        &mut self.page_mut().data_mut()[r]
    }

    fn mark_dirty(&mut self) -> Result<()> {
        self.inner.check_poison()?;
        let mask = self.mask();
        let was_dirty = self.page().dirty() != 0;
        self.page_mut().set_dirty(mask);
        if !was_dirty {
            self.inner.note_dirty(frame_of(self.offset));
        }
        Ok(())
    }

    /// Delayed write: mark dirty and release; written later by `flush`,
    /// the flusher or pageout. May sleep while dirty data is over its
    /// limit.
    pub fn bdwrite(mut self) -> Result<()> {
        self.mark_dirty()?;
        let inner = self.inner;
        drop(self);
        inner.throttle()
    }

    /// Async write: mark dirty, queue for the flusher now, release.
    pub fn bawrite(mut self) -> Result<()> {
        self.mark_dirty()?;
        let inner = self.inner;
        if inner.cfg.flusher_thread {
            inner
                .async_set
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(frame_of(self.offset));
            drop(self);
            inner.wake_flusher();
            inner.throttle()
        } else {
            self.write_now()
        }
    }

    /// Sync write: mark dirty, write the buffer's dirty blocks now.
    pub fn bwrite(mut self) -> Result<()> {
        self.mark_dirty()?;
        self.write_now()
    }

    fn write_now(mut self) -> Result<()> {
        let inner = self.inner;
        let index = frame_of(self.offset);
        let page = self.page_mut();
        inner.write_busy_pages(&mut [(index, page)])
    }

    /// Release; the buffer is first in line for pageout.
    pub fn brelse(self) {
        self.page().deactivate();
    }

    /// Quick release: the buffer is likely wanted again soon.
    pub fn bqrelse(self) {
        self.page().activate();
    }

    /// Discard the buffer's contents (dirty or not) and free its page.
    pub fn invalidate(mut self) {
        let index = frame_of(self.offset);
        if let Some(page) = self.page.take() {
            page.unwire();
            if page.dirty() != 0 {
                self.inner.note_clean(index);
            }
            page.free();
        }
    }
}

impl Drop for Buf<'_> {
    fn drop(&mut self) {
        if let Some(page) = self.page.take() {
            page.unwire();
        }
    }
}

impl BufShared<'_> {
    fn page(&self) -> &PageShared<'_> {
        self.page
            .as_ref()
            .expect("a BufShared owns its page until dropped")
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn data(&self) -> &[u8] {
        let s = within(self.offset);
        &self.page().data()[s..s + self.len]
    }

    /// Release (the buffer ages normally).
    pub fn brelse(self) {}
}

impl Drop for BufShared<'_> {
    fn drop(&mut self) {
        if let Some(page) = self.page.take() {
            page.unwire();
        }
    }
}

impl BufRef<'_> {
    /// Whether all of the buffer's blocks are valid (a hint: not busy).
    pub fn is_valid(&self) -> bool {
        self.hold.valid() == u64::MAX
    }

    pub fn offset(&self) -> u64 {
        self.hold.key().index() * FRAME_BYTES as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_runs() {
        assert_eq!(block_mask(0, 1), 1);
        assert_eq!(block_mask(1023, 2), 0b11);
        assert_eq!(block_mask(0, FRAME_BYTES), u64::MAX);
        assert_eq!(block_mask(4096, 4096), 0xf0);
        let r: Vec<_> = runs(0b1110_0110).collect();
        assert_eq!(r, vec![(1, 2), (5, 3)]);
        assert_eq!(runs(u64::MAX).collect::<Vec<_>>(), vec![(0, 64)]);
        assert_eq!(runs(0).count(), 0);
    }

    #[test]
    fn cache_size_option_parses() {
        assert_eq!(parse_cache_size("512M"), Some(512 << 20));
        assert_eq!(parse_cache_size("2g"), Some(2 << 30));
        assert_eq!(parse_cache_size("65536"), Some(65536));
        assert_eq!(parse_cache_size("12x"), None);
        assert_eq!(parse_cache_size(""), None);
        assert_eq!(parse_cache_size("99999999999999G"), None);
    }
}
