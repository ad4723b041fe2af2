//! A read-write mount's shared state: the one `hammer2::mount::Mount` of
//! the image behind its transaction lock, the image lock, and the
//! flusher.
//!
//! Locking: `mount` is the transaction lock (DragonFly's
//! `hammer2_trans_init`), an `RwLock`. A query that finds what it needs
//! in memory takes it shared (`shared`), beside other queries, and so
//! do a write to a file in memory, a setattr without a size, an open
//! and a release (`shared_change`), which take the inode's own lock too
//! (`hammer2::inode::InodeLock`); every other FUSE
//! operation takes it exclusive for the length of one library call
//! (`locked`; chunked operations, such as a hole punch or
//! copy_file_range, retake it per MiB). None does device I/O under it
//! (`hammer2::volume::cache_only`). The flusher takes it twice per
//! flush, for `flush_begin` and `flush_commit`; compressing and writing
//! the file data between the two runs without it (the pipelined flush),
//! so writers go on meanwhile. `flush` (the flusher's bookkeeping) is
//! never held while waiting for `mount`, and `mount` never while
//! waiting on the condition variable. `commit` is held from a commit's
//! prepare to its finish, by the flusher and by partial commits, so
//! the two take turns only for that step; it is taken before `mount`.
//! `partials` is held shared by each partial commit throughout and
//! exclusive by `between_flushes`. Order: `serial`, `partials`,
//! `commit`, `mount`.
//!
//! Flushes happen: every `sync_interval` when something is dirty; on
//! sync and syncfs (the caller waits for a flush that started after
//! its request); and once more at unmount (`shutdown`). When the file
//! data waiting for a flush passes a quarter of its limit and no flush
//! is asked for or due, the flusher launders it instead
//! (`launder_once`): written to new blocks and recorded in the inodes'
//! tables, with no commit; it flushes when laundering finds nothing to
//! write or leaves decoded metadata past its budget. fsync and
//! fsyncdir are partial commits of the inode's dependency group on the
//! caller's thread (`RwVolume::fsync`, `Mount::fsync_begin`): they do
//! not write other files' data nor wait for a running flush's. A writer that
//! finds more than the limit waiting stalls until a flush commits. The
//! limit is the dirty share of the mount's memory budget
//! (`mount::Budget`, at most `DIRTY_MAX_BYTES`; `set_dirty_limit`).
//!
//! A failed flush or partial commit poisons the mount: it is logged at
//! error level, the fsync that waited for it gets its errno, and every later write,
//! fsync and close gets EIO until the image is mounted again. What is on
//! disk stays the last completed commit.
//!
//! Space (`make_room`, `maybe_autobulkfree`): a change refused with
//! ENOSPC gets one retry after the daemon has made room: a flush (what
//! was admitted for it is free again once it commits), the commits that
//! free blocks earlier flushes dropped (`Mount::reclaim`), and, with
//! `autobulkfree` and something for it to find, a bulkfree run to its
//! end; a shortage gets one bulkfree, then writes fail. After each
//! flush, when less than the `autobulkfree` share of the volume is free
//! and enough space waits for bulkfree, a bulkfree starts in the
//! background.
//!
//! The end: `unmounted` drops the image's live lock once the kernel has
//! let go of the filesystem, `shutdown` stops the flusher and writes the
//! last flush, `release` drops the writer lock, after which nothing is
//! flushed. On a fuseblk mount all three run before FUSE_DESTROY is
//! answered (`vnops::destroy_request`), so umount(2) returns with the
//! image final and free; `mount::serve` runs them again (no-ops then)
//! when the session ends, which covers the other ways it can end.

use bufcache::imagelock::{RangeLock, WriterLock};
use hammer2::ctl::{bulkfree_state, BulkfreeStatus};
use hammer2::mount::Mount;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// File data waiting for a flush (the memory it holds: a page per 64 KiB
/// block, `Mount::pending_bytes`) beyond which writers wait for the flusher, at
/// most (the mount's budget may set less, `set_dirty_limit`); the
/// flusher is woken past a quarter of the limit, and launders.
pub const DIRTY_MAX_BYTES: u64 = 256 << 20;

/// How a partial commit (`RwVolume::partial_commit`) went.
enum Partial {
    Done(hammer2::flush::FlushStats),
    /// The inode is gone from the index: nothing was begun.
    Gone,
    /// Too little room to write twice the blocks a flush out is writing
    /// too (`Mount::fsync_begin` admits those): nothing was begun, and a
    /// whole flush, after that one, makes the file durable instead.
    NoRoom,
}

/// What the flusher and the threads waiting for it share.
#[derive(Default)]
struct FlushState {
    /// fsync requests: a generation number each.
    requested: u64,
    /// The last request generation a completed flush covers.
    done: u64,
    /// Dirty data passed a quarter of the limit (`dirty_max`).
    kicked: bool,
    stop: bool,
    /// The writer lock is gone: nothing may be written any more.
    released: bool,
    /// Why the mount refuses writes, and the errno of the failure.
    poisoned: Option<(i32, String)>,
    /// Writes into blocks whose old bytes could not be read, dropped by
    /// the flushes so far (`FlushStats::lost`): an fsync that waited for
    /// a flush that lost one fails with EIO.
    lost: u64,
    flushes: u64,
    bytes: u64,
    /// Partial commits (`fsync`) that wrote something, and the blocks
    /// they wrote.
    partial_commits: u64,
    partial_blocks: u64,
    /// Launderings (`launder_once`) that wrote something, and the
    /// blocks they wrote.
    launders: u64,
    laundered_blocks: u64,
}

pub struct RwVolume {
    /// The transaction lock (DragonFly's `hammer2_trans_init`): taken
    /// shared by queries that find what they need in memory (`shared`),
    /// exclusive by changes, by queries that must load something, and
    /// by the flusher's short steps.
    mount: RwLock<Mount>,
    /// The device under the mount (through its buffer cache), for
    /// reading what a locked unit missed (`locked`) without the lock.
    dev: Arc<dyn bufcache::BlockDevice>,
    /// The volume as file reads see it without the lock (`read`).
    reader: hammer2::volume::Volume,
    /// The PFS served.
    pub label: String,
    flush: Mutex<FlushState>,
    cv: Condvar,
    /// Held for each flush: `Mount` takes one pipelined flush at a time.
    serial: Mutex<()>,
    /// Held from a commit's prepare to its finish (`Mount`'s commits do
    /// not overlap): flushes and partial commits (`fsync`) take turns
    /// here, and a partial commit does not wait for a flush's data.
    commit: Mutex<()>,
    /// Held shared by each partial commit from its begin to its finish,
    /// exclusive by `between_flushes` and `release`: what must run with
    /// no batch out (PFS operations, bulkfree's begin and merge,
    /// reclaim) waits for the fsyncs under way, and new ones wait for it.
    partials: RwLock<()>,
    sync_interval: Option<Duration>,
    /// Dirty file data as of the last check (see `note_written`).
    dirty: AtomicU64,
    /// Bytes written since `dirty` was last brought up to date (without
    /// a page layer).
    written: AtomicU64,
    /// The page layer's data pages when `dirty` was last brought up to
    /// date.
    pages_at_count: AtomicU64,
    /// Dirty file data past which writers wait for a flush.
    dirty_max: AtomicU64,
    /// The online bulkfree (`hammer2 bulkfree MOUNTPOINT`): its state,
    /// as `hammer2 bulkfree` polls it.
    bulkfree: Mutex<BulkfreeStatus>,
    /// `autobulkfree=PERCENT`: 0 when off.
    autobulkfree: AtomicU8,
    /// What bulkfree could find (`StatFs::bytes_possibly_free`) when a
    /// shortage last ran one: a shortage runs it again only when more
    /// has been dropped since.
    shortage_bulkfree: Mutex<Option<u64>>,
    /// The image's writer lock, held until the last flush is written.
    writer: Mutex<Option<RangeLock>>,
    /// The image's live lock, held while mounted.
    live: Mutex<Option<RangeLock>>,
    /// The flusher thread, once started, until `shutdown` joins it.
    flusher: Mutex<Option<JoinHandle<()>>>,
    /// Queries and changes made with the mount shared (`shared`,
    /// `shared_change`), and those sent to `locked` instead.
    shared_answers: AtomicU64,
    shared_declined: AtomicU64,
}

/// Runs of a locked unit that missed the cache (`RwVolume::locked`)
/// before it runs with its reads allowed to wait for the device.
const MISS_RETRIES: usize = 8;

/// A background bulkfree starts only when at least this much (or 1% of
/// the volume, if less) waits for it.
const AUTOBULKFREE_MIN_BYTES: u64 = 256 << 20;

fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    // As `lock`.
    m.write().unwrap_or_else(|p| p.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking operation leaves the Mount as consistent as a failed
    // one would (each change is applied whole or refused); serve on.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RwVolume {
    /// The volume of `mount` serving PFS `label`, holding `lock`'s
    /// writer and live locks (`None`: an image nothing else can reach,
    /// in tests).
    pub fn new(
        mount: Mount,
        label: String,
        lock: Option<WriterLock>,
        sync_interval: Option<Duration>,
    ) -> RwVolume {
        let (writer, live) = lock.map(|l| (l.writer, l.mounted)).unzip();
        RwVolume {
            dev: mount.volume().device().clone(),
            reader: mount.volume().reader(),
            mount: RwLock::new(mount),
            label,
            flush: Mutex::new(FlushState::default()),
            cv: Condvar::new(),
            serial: Mutex::new(()),
            commit: Mutex::new(()),
            partials: RwLock::new(()),
            sync_interval,
            dirty: AtomicU64::new(0),
            written: AtomicU64::new(0),
            pages_at_count: AtomicU64::new(0),
            dirty_max: AtomicU64::new(DIRTY_MAX_BYTES),
            bulkfree: Mutex::new(BulkfreeStatus::default()),
            autobulkfree: AtomicU8::new(0),
            shortage_bulkfree: Mutex::new(None),
            writer: Mutex::new(writer),
            live: Mutex::new(live),
            flusher: Mutex::new(None),
            shared_answers: AtomicU64::new(0),
            shared_declined: AtomicU64::new(0),
        }
    }

    /// File data waiting for a flush past which writers wait for one
    /// (the flusher is woken past a quarter of it): the dirty share of
    /// the memory budget, at most `DIRTY_MAX_BYTES`, at least 1 MiB.
    pub fn set_dirty_limit(&self, bytes: u64) {
        self.dirty_max
            .store(bytes.clamp(1 << 20, DIRTY_MAX_BYTES), Ordering::Relaxed);
    }

    fn dirty_kick(&self) -> u64 {
        self.dirty_max.load(Ordering::Relaxed) / 4
    }

    /// `autobulkfree=PERCENT` (`None`: `noautobulkfree`).
    pub fn set_autobulkfree(&self, percent: Option<u8>) {
        self.autobulkfree
            .store(percent.unwrap_or(0), Ordering::Relaxed);
    }

    /// A change was refused with ENOSPC: make room before the caller
    /// retries it once (see the module header). Returns false when
    /// retrying is pointless (the mount refuses writes).
    pub fn make_room(self: &Arc<Self>) -> bool {
        if self.writable().is_err() {
            return false;
        }
        if self.sync().is_err() {
            return false;
        }
        match self.between_flushes(|m| m.reclaim()) {
            Ok(freed) if freed > 0 => {
                log::info!("out of space: {freed} bytes freed by the flushes that waited");
            }
            Ok(_) => {}
            Err(e) => {
                log::error!("out of space, and freeing what earlier flushes dropped failed: {e}");
                return false;
            }
        }
        if self.autobulkfree.load(Ordering::Relaxed) == 0 {
            return true;
        }
        let possibly = match self.mount().statfs(&self.label) {
            Ok(s) => s.bytes_possibly_free,
            Err(_) => return true,
        };
        {
            let mut last = lock(&self.shortage_bulkfree);
            if possibly == 0 || last.is_some_and(|l| possibly <= l) {
                return true;
            }
            *last = Some(possibly);
        }
        log::info!("out of space: running bulkfree ({possibly} bytes may be free)");
        self.run_bulkfree_to_end();
        true
    }

    /// A change was refused for a shortage of pages (the file data
    /// waiting for a flush takes the most of the page layer it may, or
    /// wired buffers hold the rest): a flush writes that data and gives
    /// its pages back before the caller retries once. Writers normally
    /// wait below that (`throttle`); this is for the writes that passed
    /// the limit together. Returns false when the mount refuses writes.
    pub fn make_pages(self: &Arc<Self>) -> bool {
        if self.writable().is_err() {
            return false;
        }
        log::debug!(
            "short of pages with {} bytes of file data waiting: flushing",
            self.mount().pending_bytes()
        );
        self.sync().is_ok()
    }

    /// Start a two-pass bulkfree unless one runs, and wait for the one
    /// running to end.
    fn run_bulkfree_to_end(self: &Arc<Self>) {
        if let Err(e) = self.bulkfree_start(2) {
            log::debug!("bulkfree: {e}; waiting for it");
        }
        while self.bulkfree_status().state == bulkfree_state::RUNNING {
            if lock(&self.flush).stop {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// After a flush: start a background bulkfree when free space is
    /// below the `autobulkfree` share and enough waits for it.
    fn maybe_autobulkfree(self: &Arc<Self>) {
        let pct = u64::from(self.autobulkfree.load(Ordering::Relaxed));
        if pct == 0 || self.bulkfree_status().state == bulkfree_state::RUNNING {
            return;
        }
        let Ok(s) = self.mount().statfs(&self.label) else {
            return;
        };
        let low = s.bytes_free < s.bytes_total / 100 * pct;
        let worth = s.bytes_possibly_free >= AUTOBULKFREE_MIN_BYTES.min(s.bytes_total / 100);
        if low && worth {
            log::info!(
                "{} of {} bytes free, {} may be: starting bulkfree",
                s.bytes_free,
                s.bytes_total,
                s.bytes_possibly_free
            );
            if let Err(e) = self.bulkfree_start(2) {
                log::debug!("automatic bulkfree: {e}");
            }
        }
    }

    /// The mount, for the flusher and administration, which may read
    /// from the device with it locked (requests use `locked`).
    pub fn mount(&self) -> RwLockWriteGuard<'_, Mount> {
        write(&self.mount)
    }

    /// Run query `f` with the mount shared, beside other queries (no
    /// device I/O: `hammer2::volume::cache_only`). `None` when `f`
    /// answered `None` (it needs something loaded first, which changes
    /// the mount) or missed the cache: run the query through `locked`.
    pub fn shared<T>(&self, f: impl FnOnce(&Mount) -> Option<T>) -> Option<T> {
        let (r, missed) = self.with_shared(f);
        let r = r.filter(|_| !missed);
        self.count_shared(r.is_some());
        r
    }

    /// `f` with the mount shared and reads served from the cache alone,
    /// and whether a read missed it.
    fn with_shared<T>(&self, f: impl FnOnce(&Mount) -> T) -> (T, bool) {
        let m = self.mount.read().unwrap_or_else(|p| p.into_inner());
        let _mode = hammer2::volume::cache_only();
        hammer2::volume::take_miss();
        let r = f(&m);
        (r, hammer2::volume::take_miss().is_some())
    }

    fn count_shared(&self, answered: bool) {
        let counter = match answered {
            true => &self.shared_answers,
            false => &self.shared_declined,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The whole blocks of a write of `data` at `offset`, copied onto
    /// pages with the lock not held (`Mount::write_filled`).
    pub fn filled(&self, offset: u64, data: &[u8]) -> hammer2::inode::Filled {
        hammer2::inode::Filled::of(&self.reader, offset, data)
    }

    /// Run change `f` with the mount shared (no device I/O: a miss fails
    /// what needed the block, and `f` says whether it made its change).
    /// Each is counted with the queries of `shared`.
    pub fn shared_change(&self, f: impl FnOnce(&Mount) -> bool) -> bool {
        let (done, _) = self.with_shared(f);
        self.count_shared(done);
        done
    }

    /// Queries and changes made with the mount shared, and those run
    /// exclusive instead (`shared`, `shared_change`).
    pub fn shared_counts(&self) -> (u64, u64) {
        (
            self.shared_answers.load(Ordering::Relaxed),
            self.shared_declined.load(Ordering::Relaxed),
        )
    }

    /// Run `f` with the mount locked and no device I/O under the lock
    /// (`hammer2::volume::cache_only`): when `f` needed a block that is
    /// not in the buffer cache, it failed before changing anything; the
    /// block is read with the lock released and `f` runs again. So a
    /// request never waits for the device while it holds the lock that
    /// every other request needs. A unit whose blocks keep being evicted
    /// before it runs again (a tiny cache), or whose read fails, runs once
    /// more with its reads allowed to wait, so it always ends, with the
    /// device's own error if it has one.
    pub fn locked<T>(&self, mut f: impl FnMut(&mut Mount) -> T) -> T {
        let mut attempt = 0;
        loop {
            let cache_only = attempt < MISS_RETRIES;
            let r = {
                let mut m = write(&self.mount);
                let _mode = cache_only.then(hammer2::volume::cache_only);
                hammer2::volume::take_miss();
                f(&mut m)
            };
            match hammer2::volume::take_miss() {
                Some((at, bytes)) if cache_only => {
                    attempt += 1;
                    if !self.prefetch(at, bytes) {
                        attempt = MISS_RETRIES;
                    }
                }
                _ => return r,
            }
        }
    }

    /// Read `len` bytes at `offset` of file `inum`: where they come from
    /// is taken under the lock (no device I/O there), and the blocks are
    /// read, decoded and checked without it, so reads of one file run in
    /// parallel and a slow device stalls only its readers. The ticket
    /// keeps the blocks from being freed until the reads are done.
    pub fn read(&self, inum: u64, offset: u64, len: usize) -> hammer2::Result<Vec<u8>> {
        self.read_noting(inum, offset, len, |_| true, |_| {})
    }

    /// `read`, with `noted` called under the lock once the plan is taken
    /// (an access time to update with it). The plan is taken with the
    /// mount shared (`shared`) when the tree over the range is in memory
    /// and `quiet` says there is nothing to note.
    pub fn read_noting(
        &self,
        inum: u64,
        offset: u64,
        len: usize,
        quiet: impl FnOnce(&Mount) -> bool,
        mut noted: impl FnMut(&mut Mount),
    ) -> hammer2::Result<Vec<u8>> {
        let planned = self.shared(|m| {
            if quiet(m) {
                m.read_plan_loaded(&self.label, inum, offset, len)
            } else {
                None
            }
        });
        let (plan, ticket) = match planned {
            Some(r) => r?,
            None => self.locked(|m| {
                let r = m.read_plan(&self.label, inum, offset, len);
                if r.is_ok() {
                    noted(m);
                }
                r
            })?,
        };
        let r = plan.run(&self.reader);
        drop(ticket);
        r
    }

    /// Read `bytes` at `at` into the buffer cache (the lock not held).
    /// False when the read fails.
    fn prefetch(&self, at: u64, bytes: u64) -> bool {
        let mut buf = vec![0u8; bytes as usize];
        match self.dev.read_at(&mut buf, at) {
            Ok(()) => true,
            Err(e) => {
                log::debug!("read of {bytes} bytes at {at:#x} for a request failed: {e}");
                false
            }
        }
    }

    /// Run `f` on the mount between two flushes: no pipelined flush is
    /// under way (its data writes run without the mount locked) while
    /// `f` runs, and none starts until it returns.
    pub fn between_flushes<T>(&self, f: impl FnOnce(&mut Mount) -> T) -> T {
        let _serial = lock(&self.serial);
        let _partials = self.partials.write().unwrap_or_else(|p| p.into_inner());
        let _commit = lock(&self.commit);
        let mut m = self.mount();
        f(&mut m)
    }

    /// EIO once a flush has failed.
    pub fn writable(&self) -> Result<(), i32> {
        match &lock(&self.flush).poisoned {
            Some(_) => Err(libc::EIO),
            None => Ok(()),
        }
    }

    /// After a write of `n` bytes, with the mount still locked: count
    /// what waits for a flush and wake the flusher past the wake-up mark
    /// (a quarter of the limit). The count is a pass over the inodes in
    /// memory, so it is taken each time a quarter of the mark was added:
    /// on the page layer, a quarter of the mark in pages taken since the
    /// last count (a small write may take a whole page; the layer counts
    /// them for free), else a quarter of the mark in bytes written.
    pub fn note_written(&self, m: &Mount, n: u64) {
        let kick = self.dirty_kick();
        let due = match m.data_page_bytes() {
            Some(pages) => pages >= self.pages_at_count.load(Ordering::Relaxed) + kick / 4,
            None => self.written.fetch_add(n, Ordering::Relaxed) + n >= kick / 4,
        };
        if !due {
            return;
        }
        let dirty = self.recount(m);
        if dirty > kick {
            lock(&self.flush).kicked = true;
            self.cv.notify_all();
        }
    }

    /// Count what waits for a flush (`Mount::pending_bytes`) and start
    /// `note_written`'s measure of growth over; returns the count.
    fn recount(&self, m: &Mount) -> u64 {
        let dirty = m.pending_bytes();
        self.dirty.store(dirty, Ordering::Relaxed);
        self.written.store(0, Ordering::Relaxed);
        self.pages_at_count
            .store(m.data_page_bytes().unwrap_or(0), Ordering::Relaxed);
        dirty
    }

    /// Without the mount locked: wait while more than the limit
    /// waits for a flush.
    pub fn throttle(&self) {
        let mut st = lock(&self.flush);
        while self.dirty.load(Ordering::Relaxed) > self.dirty_max.load(Ordering::Relaxed)
            && st.poisoned.is_none()
            && !st.stop
        {
            st.kicked = true;
            self.cv.notify_all();
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// sync and syncfs: wait for a flush that starts after this call, and return
    /// its errno if it failed (EIO if the mount was poisoned before, or
    /// if a flush meanwhile dropped a write it could not merge with its
    /// damaged block, `FlushStats::lost`).
    pub fn sync(&self) -> Result<(), i32> {
        // Access times wait in memory for a flush that happens anyway;
        // an fsync or sync writes them too.
        self.hand_over_atimes();
        let mut st = lock(&self.flush);
        if st.poisoned.is_some() {
            return Err(libc::EIO);
        }
        st.requested += 1;
        let want = st.requested;
        let lost = st.lost;
        if st.stop {
            // Unmounting (a second signal came): no flusher to ask.
            drop(st);
            self.flush_and_record(want);
            st = lock(&self.flush);
        }
        self.cv.notify_all();
        while st.done < want {
            if st.poisoned.is_some() {
                break;
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        match &st.poisoned {
            Some((errno, _)) => Err(*errno),
            None if st.lost > lost => Err(libc::EIO),
            None => Ok(()),
        }
    }

    /// fsync and fdatasync of inode `inum` (and fsync of a directory): a
    /// partial commit of its dependency groups (`Mount::fsync_begin`),
    /// pipelined as a flush is, which does not wait for the data of a
    /// flush under way (only for its commit step) nor write other files'
    /// changes. Errors as `sync`. While the mount stops, a flush.
    pub fn fsync(&self, inum: u64) -> Result<(), i32> {
        let lost = {
            let st = lock(&self.flush);
            if st.poisoned.is_some() {
                return Err(libc::EIO);
            }
            if st.stop || st.released {
                drop(st);
                return self.sync();
            }
            st.lost
        };
        let r = unpanicked("the partial commit", || self.partial_commit(inum));
        if matches!(r, Ok(Partial::NoRoom)) {
            return self.sync();
        }
        let mut st = lock(&self.flush);
        match r {
            Ok(Partial::Gone | Partial::NoRoom) => {
                // An inode gone from the index: nothing of it to commit
                // (no room became a whole flush above).
            }
            Ok(Partial::Done(stats)) => {
                st.lost += stats.lost;
                if stats.blocks > 0 {
                    st.partial_commits += 1;
                    st.partial_blocks += stats.blocks;
                }
            }
            Err(e) => poison(
                &mut st,
                &format!("fsync of inode {inum} of {}", self.label),
                &e,
            ),
        }
        match &st.poisoned {
            Some((errno, _)) => Err(*errno),
            None if st.lost > lost => Err(libc::EIO),
            None => Ok(()),
        }
    }

    /// The steps of a partial commit: take the closure's file data
    /// (mount locked), write it (unlocked), commit it (`commit_batch`).
    fn partial_commit(&self, inum: u64) -> hammer2::Result<Partial> {
        let _partials = self.partials.read().unwrap_or_else(|p| p.into_inner());
        let mut batch = match self.locked(|m| m.fsync_begin(&self.label, inum)) {
            Err(hammer2::Error::NotFound { .. }) => return Ok(Partial::Gone),
            Err(hammer2::Error::NoSpace { .. }) => return Ok(Partial::NoRoom),
            r => r?,
        };
        batch.write();
        self.commit_batch(batch).map(Partial::Done)
    }

    /// The commit of a written batch, in turn with other commits: the
    /// tree and freemap into the cache (locked), the device part
    /// (unlocked), the header adopted (locked).
    fn commit_batch(
        &self,
        batch: hammer2::flush::FlushBatch,
    ) -> hammer2::Result<hammer2::flush::FlushStats> {
        let _commit = lock(&self.commit);
        let prepared = self.mount().flush_commit_prepare(batch)?;
        let io = prepared.run();
        let mut m = self.mount();
        let stats = m.flush_commit_finish(prepared, io)?;
        self.recount(&m);
        Ok(stats)
    }

    /// Start the flusher thread (`shutdown` stops it).
    pub fn start_flusher(self: &Arc<Self>) -> std::io::Result<()> {
        let me = self.clone();
        let t = std::thread::Builder::new()
            .name("flusher".into())
            .spawn(move || me.flusher())?;
        *lock(&self.flusher) = Some(t);
        Ok(())
    }

    fn flusher(self: &Arc<Self>) {
        let mut deadline = self.sync_interval.map(|i| Instant::now() + i);
        loop {
            let (target, launder) = {
                let mut st = lock(&self.flush);
                loop {
                    if st.stop {
                        return;
                    }
                    if st.requested > st.done || st.kicked {
                        break;
                    }
                    st = match deadline {
                        None => self.cv.wait(st).unwrap_or_else(|p| p.into_inner()),
                        Some(d) => {
                            let left = d.saturating_duration_since(Instant::now());
                            if left.is_zero() {
                                break;
                            }
                            self.cv
                                .wait_timeout(st, left)
                                .unwrap_or_else(|p| p.into_inner())
                                .0
                        }
                    };
                }
                // Much written and no commit asked for or due: launder.
                // (Due whatever woke the flusher: writers that keep the
                // kick set must not put off the interval's commit.)
                let due = deadline.is_some_and(|d| Instant::now() >= d);
                let launder = st.kicked && st.requested <= st.done && !due;
                st.kicked = false;
                (st.requested, launder)
            };
            if launder && self.launder_and_record() {
                continue;
            }
            self.flush_and_record(target);
            deadline = self.sync_interval.map(|i| Instant::now() + i);
            self.maybe_autobulkfree();
        }
    }

    /// Launder (unless poisoned or released): write the file data
    /// waiting for a flush to new blocks and record them in the inodes'
    /// tables, with no commit (`launder_once`). False when a flush
    /// should follow instead: laundering found nothing to write, or the
    /// metadata it left dirty is past its budget (only a commit lets
    /// it go).
    fn launder_and_record(&self) -> bool {
        let _serial = lock(&self.serial);
        {
            let st = lock(&self.flush);
            if st.poisoned.is_some() || st.released {
                return false;
            }
        }
        let r = unpanicked("laundering", || self.launder_once());
        let mut st = lock(&self.flush);
        let enough = match r {
            Ok((stats, metadata_over)) => {
                st.lost += stats.lost;
                if stats.blocks > 0 {
                    st.launders += 1;
                    st.laundered_blocks += stats.blocks;
                }
                if self.dirty.load(Ordering::Relaxed) > self.dirty_kick() {
                    // Written meanwhile: once more.
                    st.kicked = true;
                }
                (stats.blocks > 0 || stats.lost > 0) && !metadata_over
            }
            Err(e) => {
                poison(&mut st, &format!("laundering of {}", self.label), &e);
                true
            }
        };
        self.cv.notify_all();
        enough
    }

    /// Take the file data waiting for a flush (mount locked), write it
    /// (unlocked), record the blocks in their inodes (locked). Returns
    /// what was written and whether decoded metadata is past its budget.
    fn launder_once(&self) -> hammer2::Result<(hammer2::flush::FlushStats, bool)> {
        let mut batch = self.mount().launder_begin()?;
        batch.write();
        let mut m = self.mount();
        let stats = m.launder_finish(batch)?;
        self.recount(&m);
        Ok((stats, m.metadata_over_limit()))
    }

    /// Flush (unless poisoned or released), then mark requests up to
    /// `target` done.
    fn flush_and_record(&self, target: u64) {
        let _serial = lock(&self.serial);
        let (poisoned, released) = {
            let st = lock(&self.flush);
            (st.poisoned.is_some(), st.released)
        };
        let r = if poisoned {
            Ok((0, 0))
        } else if released {
            // Only after the last flush and the end of the session; a
            // change now is one the unmount did not wait for.
            match self.mount().is_dirty() {
                true => Err(hammer2::Error::Poisoned {
                    why: "a change came after the last flush of the unmount".into(),
                }),
                false => Ok((0, 0)),
            }
        } else {
            unpanicked("the flush", || self.flush_once())
        };
        let mut st = lock(&self.flush);
        match r {
            Ok((bytes, lost)) => {
                st.lost += lost;
                if bytes > 0 {
                    st.flushes += 1;
                    st.bytes += bytes;
                }
            }
            Err(e) => poison(&mut st, &format!("flush of {}", self.label), &e),
        }
        st.done = st.done.max(target);
        self.cv.notify_all();
    }

    /// One pipelined flush: take the dirty data (mount locked), write it
    /// (unlocked), write the tree and freemap into the cache (locked),
    /// wait for the device (barrier, header, barrier: unlocked), adopt
    /// the header and free what waited for it (locked). Keeps decoded
    /// metadata within its budget when nothing is dirty
    /// (`Mount::trim_metadata`). Returns the bytes written.
    fn flush_once(&self) -> hammer2::Result<(u64, u64)> {
        let begin = || {
            let mut m = self.mount();
            if !m.is_dirty() {
                m.trim_metadata();
                return Ok(None);
            }
            m.flush_begin().map(Some)
        };
        let batch = match begin() {
            // Too little room to write twice the blocks partial commits
            // out are writing: wait for them, then take the rest alone.
            Err(hammer2::Error::NoSpace { .. }) => {
                let _partials = self.partials.write().unwrap_or_else(|p| p.into_inner());
                begin()?
            }
            r => r?,
        };
        let Some(mut batch) = batch else {
            return Ok((0, 0));
        };
        batch.write();
        let stats = self.commit_batch(batch)?;
        Ok((stats.bytes, stats.lost))
    }

    /// The filesystem is unmounted: drop the live lock, so that a new
    /// mount or fsck waits for the last flush rather than fail.
    pub fn unmounted(&self) {
        lock(&self.live).take();
    }

    /// At unmount: stop the flusher and flush what is left (once; later
    /// calls only report). Returns the error that poisoned the mount, if
    /// any did.
    pub fn shutdown(&self) -> Result<(), String> {
        let first = !std::mem::replace(&mut lock(&self.flush).stop, true);
        if first {
            self.hand_over_atimes();
        }
        self.cv.notify_all();
        if let Some(t) = lock(&self.flusher).take() {
            if t.join().is_err() {
                log::error!("the flusher thread panicked");
            }
        }
        let target = lock(&self.flush).requested;
        self.flush_and_record(target);
        // Blocks the last flushes dropped wait for headers still to be
        // written: write them, so the freemap left shows them free (not
        // once the writer lock is released: nothing is written then).
        let released = lock(&self.flush).released;
        if self.writable().is_ok() && !released {
            if let Err(e) = self.between_flushes(|m| m.reclaim()) {
                let what = format!("{}: freeing what the last flushes dropped", self.label);
                poison(&mut lock(&self.flush), &what, &e);
            }
        }
        let st = lock(&self.flush);
        if first {
            log::info!(
                "{}: {} flushes, {} bytes written; {} partial commits (fsync), {} blocks written by them; \
                 {} launderings, {} blocks written by them; {} queries and changes made with the \
                 mount shared, {} run exclusive instead (to load, after a cache miss, or to note an \
                 access time)",
                self.label,
                st.flushes,
                st.bytes,
                st.partial_commits,
                st.partial_blocks,
                st.launders,
                st.laundered_blocks,
                self.shared_answers.load(Ordering::Relaxed),
                self.shared_declined.load(Ordering::Relaxed),
            );
        }
        match &st.poisoned {
            Some((_, why)) => Err(why.clone()),
            None => Ok(()),
        }
    }

    /// Make the access times kept in memory part of the next flush
    /// (`Mount::flush_atimes`).
    fn hand_over_atimes(&self) {
        if let Err(e) = self.locked(|m| m.flush_atimes()) {
            log::warn!("{}: access times not written: {e}", self.label);
        }
    }

    /// After `shutdown`: drop the writer lock. Nothing is flushed after
    /// this; the image is final.
    pub fn release(&self) {
        let _serial = lock(&self.serial);
        let _partials = self.partials.write().unwrap_or_else(|p| p.into_inner());
        let _commit = lock(&self.commit);
        lock(&self.flush).released = true;
        lock(&self.live).take();
        lock(&self.writer).take();
    }

    /// The online bulkfree's state.
    pub fn bulkfree_status(&self) -> BulkfreeStatus {
        lock(&self.bulkfree).clone()
    }

    /// Start an online bulkfree of `passes` passes on its own thread,
    /// unless one runs already. Returns its state at the start.
    pub fn bulkfree_start(self: &Arc<Self>, passes: u32) -> Result<BulkfreeStatus, String> {
        let start = {
            let mut st = lock(&self.bulkfree);
            if st.state == bulkfree_state::RUNNING {
                return Err(format!(
                    "a bulkfree is running already (pass {} of {})",
                    st.pass, st.passes
                ));
            }
            *st = BulkfreeStatus {
                state: bulkfree_state::RUNNING,
                pass: 1,
                passes,
                ..Default::default()
            };
            st.clone()
        };
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("bulkfree".into())
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    me.bulkfree_run(passes)
                }))
                .unwrap_or_else(|_| Err("the bulkfree thread panicked".into()));
                let mut st = lock(&me.bulkfree);
                let done = crate::ctl::finished(st.clone(), r.err());
                if done.state == bulkfree_state::FAILED {
                    log::error!("bulkfree failed: {}", done.report);
                }
                *st = done;
            });
        if let Err(e) = spawned {
            let mut st = lock(&self.bulkfree);
            *st = crate::ctl::finished(st.clone(), Some(format!("cannot start: {e}")));
            return Err(format!("cannot start the bulkfree thread: {e}"));
        }
        Ok(start)
    }

    /// The passes of an online bulkfree, as DragonFly runs one against a
    /// live filesystem: each pass begins between two flushes (the
    /// library flushes and takes that flush's topology, and from then on
    /// the allocator records what it hands out), scans that topology
    /// with the mount unlocked, so every operation and flush goes on
    /// meanwhile, and merges under the mount (blocks handed out since the
    /// begin count as referenced), then flushes the freemap.
    fn bulkfree_run(&self, passes: u32) -> Result<(), String> {
        for pass in 1..=passes {
            self.writable()
                .map_err(|_| "a flush failed; the mount refuses writes".to_string())?;
            lock(&self.bulkfree).pass = pass;
            let mut scan = self
                .between_flushes(|m| {
                    if lock(&self.flush).stop {
                        return Ok(None);
                    }
                    m.bulkfree_begin().map(Some)
                })
                .map_err(|e| format!("pass {pass}: {e}"))?
                .ok_or_else(|| format!("pass {pass}: stopped by the unmount"))?;
            let mut progress = |p: hammer2::bulkfree::Progress| {
                let mut st = lock(&self.bulkfree);
                st.brefs = p.brefs;
                st.bytes = p.bytes;
                st.bytes_in_use = p.bytes_in_use;
            };
            scan.run(Some(&mut progress))
                .map_err(|e| format!("pass {pass}: {e}"))?;
            // Reads that planned before the scan's topology (their
            // blocks may be among those it found unreferenced) end
            // before the merge; wait for them without the lock.
            while !self.mount().readers_done_since(scan.read_epoch()) {
                std::thread::sleep(Duration::from_millis(5));
            }
            // Unmounting: the last flush has run or waits for the serial
            // lock; merge nothing after it (checked under that lock).
            let stats = self
                .between_flushes(|m| {
                    if lock(&self.flush).stop {
                        return Ok(None);
                    }
                    let s = m.bulkfree_commit(scan)?;
                    m.flush()?;
                    Ok::<_, hammer2::Error>(Some(s))
                })
                .map_err(|e| format!("pass {pass}: {e}"))?
                .ok_or_else(|| format!("pass {pass}: stopped by the unmount"))?;
            log::info!("online {stats}");
            let mut st = lock(&self.bulkfree);
            st.brefs = stats.scan.brefs;
            st.bytes = stats.scan.bytes;
            st.freed += stats.sync.freed;
            st.staged = stats.sync.staged;
            if !st.report.is_empty() {
                st.report.push('\n');
            }
            st.report.push_str(&format!(
                "bulkfree pass {pass} (tid {:#x}): {}\n{}",
                stats.tid, stats.scan, stats.sync
            ));
        }
        Ok(())
    }
}

/// `f`, with a panic in it (a broken invariant) turned into an error:
/// it must not leave an fsync waiting forever, and it poisons the mount
/// as an error does.
fn unpanicked<T>(what: &str, f: impl FnOnce() -> hammer2::Result<T>) -> hammer2::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(hammer2::Error::Poisoned {
            why: format!("{what} panicked"),
        })
    })
}

/// A failed flush or partial commit (`what`): logged, and the mount
/// refuses writes from now on.
fn poison(st: &mut FlushState, what: &str, e: &hammer2::Error) {
    log::error!("{what} failed; refusing writes until remounted: {e}");
    st.poisoned = Some((crate::errno::errno(e), e.to_string()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use bufcache::{BlockDevice, BufCache, CachedDevice, MemDevice};
    use hammer2::mount::ROOT_INUM;
    use std::sync::mpsc;

    /// A memory device whose reads of one range, or writes from the
    /// flusher thread, wait until released.
    struct Stalling {
        mem: MemDevice,
        /// (start, end) of the stalled range, while armed.
        armed: Mutex<Option<(u64, u64)>>,
        /// The flusher's writes wait, while set (a flush whose data
        /// writes go slowly, or not at all).
        flusher_writes: Mutex<bool>,
        cv: Condvar,
        stalled: AtomicU64,
    }

    impl Stalling {
        fn new() -> Stalling {
            Stalling {
                mem: MemDevice::new(1 << 30),
                armed: Mutex::new(None),
                flusher_writes: Mutex::new(false),
                cv: Condvar::new(),
                stalled: AtomicU64::new(0),
            }
        }

        fn release(&self) {
            *self.armed.lock().unwrap() = None;
            *self.flusher_writes.lock().unwrap() = false;
            self.cv.notify_all();
        }
    }

    impl BlockDevice for Stalling {
        fn size_bytes(&self) -> u64 {
            self.mem.size_bytes()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            let mut a = self.armed.lock().unwrap();
            while let Some((s, e)) = *a {
                if offset >= e || offset + buf.len() as u64 <= s {
                    break;
                }
                self.stalled.fetch_add(1, Ordering::SeqCst);
                a = self.cv.wait(a).unwrap();
            }
            drop(a);
            self.mem.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            if std::thread::current().name() == Some("flusher") {
                let mut a = self.flusher_writes.lock().unwrap();
                while *a {
                    self.stalled.fetch_add(1, Ordering::SeqCst);
                    a = self.cv.wait(a).unwrap();
                }
            }
            self.mem.write_at(buf, offset)
        }
        fn barrier(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Within `limit`, or the test fails (a watchdog, not a timing).
    fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(limit)
            .expect("a request waited behind a read stalled in another request")
    }

    /// A read that waits for the device forever (a stalled disk, a lost
    /// network block device) holds no lock: requests on other files go
    /// on, reads, writes and creations alike, and a flush of them, and
    /// the stalled one ends with the right bytes once the device answers.
    /// Before, the reader held the mount's lock through its device read.
    #[test]
    fn a_stalled_read_does_not_stop_requests_on_other_files() {
        let dev = Arc::new(Stalling::new());
        mkfs::newfs::newfs(dev.as_ref(), &mkfs::newfs::NewfsOptions::default()).unwrap();
        let a_data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (a, b) = {
            let mut m = Mount::open(dev.clone()).unwrap();
            let mut mk = |name: &[u8], data: &[u8]| {
                let f = m
                    .create(
                        "DATA",
                        ROOT_INUM,
                        name,
                        hammer2::disk::ObjType::Regfile,
                        0o644,
                        0,
                        0,
                        (0, 0),
                        1,
                    )
                    .unwrap();
                m.write("DATA", f, 0, data, 1).unwrap();
                f
            };
            let a = mk(b"a", &a_data);
            let b = mk(b"b", b"bee");
            m.flush().unwrap();
            (a, b)
        };
        // A's first data block, from what the flush left on the media.
        let a_block = {
            let vol = Arc::new(hammer2::Volume::open(dev.clone()).unwrap());
            let pfs = hammer2::Pfs::open(vol.clone(), "DATA").unwrap();
            let ino = pfs.resolve("/a").unwrap();
            hammer2::chain::collect(&vol, &ino.blockset(), 0, 0)
                .unwrap()
                .into_iter()
                .find(|br| br.key == 0)
                .expect("a's block 0")
                .data_off
        };
        // A mount with a cold buffer cache over the device.
        let cache = BufCache::open(dev.clone(), 16 << 20).unwrap();
        let cached: Arc<dyn BlockDevice> = Arc::new(CachedDevice::new(cache));
        let v = Arc::new(RwVolume::new(
            Mount::open(cached).unwrap(),
            "DATA".into(),
            None,
            None,
        ));
        // Load A's inode and B's before the device stalls.
        v.locked(|m| {
            m.getattr("DATA", a)
                .map(|_| ())
                .and(m.getattr("DATA", b).map(|_| ()))
        })
        .unwrap();
        let at = a_block.offset() & !0xffff;
        *dev.armed.lock().unwrap() = Some((at, at + 65536));
        let reader = {
            let v = v.clone();
            std::thread::spawn(move || v.locked(|m| m.read("DATA", a, 0, 4096)))
        };
        while dev.stalled.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        v.start_flusher().unwrap();
        let w = v.clone();
        let (b_read, c) = within(Duration::from_secs(30), move || {
            let r = w.locked(|m| m.read("DATA", b, 0, 3)).unwrap();
            w.locked(|m| m.write("DATA", b, 3, b"hive", 2)).unwrap();
            let c = w
                .locked(|m| {
                    m.create(
                        "DATA",
                        ROOT_INUM,
                        b"c",
                        hammer2::disk::ObjType::Regfile,
                        0o644,
                        0,
                        0,
                        (0, 0),
                        2,
                    )
                })
                .unwrap();
            // And a flush of all that, its device writes and barriers.
            w.sync().unwrap();
            (r, c)
        });
        assert_eq!(b_read, b"bee");
        assert!(c > b);
        assert!(
            !reader.is_finished(),
            "the stalled read ended before its device did"
        );
        dev.release();
        let got = reader.join().unwrap().unwrap();
        assert_eq!(got, &a_data[..4096]);
        assert_eq!(v.locked(|m| m.read("DATA", b, 0, 16)).unwrap(), b"beehive");
        v.shutdown().unwrap();
    }

    /// fsync of a small file does not wait for a flush of another file's
    /// data: with the flusher's writes stalled in the middle of 64 MiB
    /// of another file (it could be any amount: it never finishes while
    /// stalled), fsync of the small file commits it, and a crash then
    /// (the device as it is) has the small file and not the other. Once
    /// the flusher goes on, its flush commits the rest. Before, fsync
    /// was a flush of everything and waited for it.
    #[test]
    fn fsync_does_not_wait_for_another_files_flush() {
        let dev = Arc::new(Stalling::new());
        mkfs::newfs::newfs(dev.as_ref(), &mkfs::newfs::NewfsOptions::default()).unwrap();
        let v = Arc::new(RwVolume::new(
            Mount::open(dev.clone()).unwrap(),
            "DATA".into(),
            None,
            None,
        ));
        v.set_dirty_limit(1 << 30);
        let mk = |name: &[u8]| {
            v.locked(|m| {
                m.create(
                    "DATA",
                    ROOT_INUM,
                    name,
                    hammer2::disk::ObjType::Regfile,
                    0o644,
                    0,
                    0,
                    (0, 0),
                    1,
                )
            })
            .unwrap()
        };
        let (a, big) = (mk(b"a"), mk(b"big"));
        v.start_flusher().unwrap();
        v.sync().unwrap();
        let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i * 31 % 253) as u8).collect();
        for i in 0..64u64 {
            v.locked(|m| m.write("DATA", big, i << 20, &chunk, 2))
                .unwrap();
        }
        v.locked(|m| m.write("DATA", a, 0, b"small", 2)).unwrap();
        // A flush of everything, its data writes stalled.
        *dev.flusher_writes.lock().unwrap() = true;
        let syncer = {
            let v = v.clone();
            std::thread::spawn(move || v.sync())
        };
        while dev.stalled.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let v2 = v.clone();
        within(Duration::from_secs(60), move || v2.fsync(a)).unwrap();
        assert!(!syncer.is_finished(), "the stalled flush ended early");
        {
            // What a crash now leaves: the small file, not the big one.
            let img: Arc<dyn BlockDevice> = Arc::new(dev.mem.snapshot());
            let vol = Arc::new(hammer2::Volume::open(img).unwrap());
            let pfs = hammer2::Pfs::open(vol, "DATA").unwrap();
            let ino = pfs.resolve("/a").unwrap();
            assert_eq!(pfs.read_all(&ino).unwrap(), b"small");
            assert_eq!(pfs.resolve("/big").unwrap().meta().size, 0);
        }
        dev.release();
        syncer.join().unwrap().unwrap();
        v.shutdown().unwrap();
        let img: Arc<dyn BlockDevice> = Arc::new(dev.mem.snapshot());
        let r = hammer2::fsck::fsck(img.clone(), hammer2::fsck::Options::default()).unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        let vol = Arc::new(hammer2::Volume::open(img).unwrap());
        let pfs = hammer2::Pfs::open(vol, "DATA").unwrap();
        let ino = pfs.resolve("/big").unwrap();
        let got = pfs.read(&ino, 63 << 20, 1 << 20).unwrap();
        assert_eq!(got, chunk);
        assert_eq!(pfs.read_all(&pfs.resolve("/a").unwrap()).unwrap(), b"small");
    }
}
