//! A read-write mount's shared state: the one `hammer2::mount::Mount` of
//! the image behind a mutex, the image lock, and the flusher.
//!
//! Locking: every FUSE operation takes `mount` for the length of one
//! library call (chunked operations, such as a hole punch or
//! copy_file_range, retake it per MiB). The flusher takes it twice per
//! flush, for `flush_begin` and `flush_commit`; compressing and writing
//! the file data between the two runs without it (the pipelined flush),
//! so writers go on meanwhile. `flush` (the flusher's bookkeeping) is
//! never held while waiting for `mount`, and `mount` never while
//! waiting on the condition variable.
//!
//! Flushes happen: every `sync_interval` when something is dirty; when
//! the file data waiting for a flush passes `DIRTY_KICK_BYTES`; on fsync
//! and fsyncdir (the caller waits for a flush that started after its
//! request); and once more at unmount (`shutdown`). A writer that finds
//! more than `DIRTY_MAX_BYTES` waiting stalls until a flush commits.
//!
//! A failed flush poisons the mount: it is logged at error level, the
//! fsync that waited for it gets its errno, and every later write,
//! fsync and close gets EIO until the image is mounted again. What is on
//! disk stays the last completed flush.

use hammer2::mount::Mount;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// File data waiting for a flush (the memory it holds: what was written
/// of each 64 KiB block) beyond which the flusher is woken.
pub const DIRTY_KICK_BYTES: u64 = 64 << 20;
/// File data waiting for a flush beyond which writers wait for one.
pub const DIRTY_MAX_BYTES: u64 = 256 << 20;

/// What the flusher and the threads waiting for it share.
#[derive(Default)]
struct FlushState {
    /// fsync requests: a generation number each.
    requested: u64,
    /// The last request generation a completed flush covers.
    done: u64,
    /// Dirty data passed `DIRTY_KICK_BYTES`.
    kicked: bool,
    stop: bool,
    /// Why the mount refuses writes, and the errno of the failure.
    poisoned: Option<(i32, String)>,
    flushes: u64,
    bytes: u64,
}

pub struct RwVolume {
    mount: Mutex<Mount>,
    /// The PFS served.
    pub label: String,
    flush: Mutex<FlushState>,
    cv: Condvar,
    /// Held for each flush: `Mount` takes one pipelined flush at a time.
    serial: Mutex<()>,
    sync_interval: Option<Duration>,
    /// Dirty file data as of the last check (see `note_written`).
    dirty: AtomicU64,
    /// Bytes written since `dirty` was last brought up to date.
    written: AtomicU64,
    /// The exclusive lock on the image, held for the mount's life.
    _lock: nix::fcntl::Flock<File>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking operation leaves the Mount as consistent as a failed
    // one would (each change is applied whole or refused); serve on.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RwVolume {
    pub fn new(
        mount: Mount,
        label: String,
        lock: nix::fcntl::Flock<File>,
        sync_interval: Option<Duration>,
    ) -> RwVolume {
        RwVolume {
            mount: Mutex::new(mount),
            label,
            flush: Mutex::new(FlushState::default()),
            cv: Condvar::new(),
            serial: Mutex::new(()),
            sync_interval,
            dirty: AtomicU64::new(0),
            written: AtomicU64::new(0),
            _lock: lock,
        }
    }

    /// The mount, for one operation.
    pub fn mount(&self) -> MutexGuard<'_, Mount> {
        lock(&self.mount)
    }

    /// EIO once a flush has failed.
    pub fn writable(&self) -> Result<(), i32> {
        match &lock(&self.flush).poisoned {
            Some(_) => Err(libc::EIO),
            None => Ok(()),
        }
    }

    /// After a write of `n` bytes, with the mount still locked: every
    /// `DIRTY_KICK_BYTES / 4` written, count what waits for a flush and
    /// wake the flusher past `DIRTY_KICK_BYTES`. (Summing it on every
    /// write would cost a pass over the inodes in memory each time.)
    pub fn note_written(&self, m: &Mount, n: u64) {
        let w = self.written.fetch_add(n, Ordering::Relaxed) + n;
        if w < DIRTY_KICK_BYTES / 4 {
            return;
        }
        self.written.store(0, Ordering::Relaxed);
        let dirty = m.pending_bytes();
        self.dirty.store(dirty, Ordering::Relaxed);
        if dirty > DIRTY_KICK_BYTES {
            lock(&self.flush).kicked = true;
            self.cv.notify_all();
        }
    }

    /// Without the mount locked: wait while more than `DIRTY_MAX_BYTES`
    /// waits for a flush.
    pub fn throttle(&self) {
        let mut st = lock(&self.flush);
        while self.dirty.load(Ordering::Relaxed) > DIRTY_MAX_BYTES
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

    /// fsync: wait for a flush that starts after this call, and return
    /// its errno if it failed (EIO if the mount was poisoned before).
    pub fn sync(&self) -> Result<(), i32> {
        let mut st = lock(&self.flush);
        if st.poisoned.is_some() {
            return Err(libc::EIO);
        }
        st.requested += 1;
        let want = st.requested;
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
            None => Ok(()),
        }
    }

    /// Start the flusher thread.
    pub fn start_flusher(self: &Arc<Self>) -> std::io::Result<JoinHandle<()>> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("flusher".into())
            .spawn(move || me.flusher())
    }

    fn flusher(&self) {
        loop {
            let target = {
                let mut st = lock(&self.flush);
                let deadline = self.sync_interval.map(|i| Instant::now() + i);
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
                st.kicked = false;
                st.requested
            };
            self.flush_and_record(target);
        }
    }

    /// Flush (unless poisoned), then mark requests up to `target` done.
    fn flush_and_record(&self, target: u64) {
        let _serial = lock(&self.serial);
        let poisoned = lock(&self.flush).poisoned.is_some();
        let r = if poisoned {
            Ok(0)
        } else {
            // A panic in the flush (a broken invariant) must not leave
            // fsync waiting forever: it poisons the mount like an error.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.flush_once()))
                .unwrap_or_else(|_| {
                    Err(hammer2::Error::Poisoned {
                        why: "the flush panicked".into(),
                    })
                })
        };
        let mut st = lock(&self.flush);
        match r {
            Ok(bytes) => {
                if bytes > 0 {
                    st.flushes += 1;
                    st.bytes += bytes;
                }
            }
            Err(e) => {
                log::error!(
                    "flush of {} failed; refusing writes until remounted: {e}",
                    self.label
                );
                st.poisoned = Some((crate::errno::errno(&e), e.to_string()));
            }
        }
        st.done = st.done.max(target);
        self.cv.notify_all();
    }

    /// One pipelined flush: take the dirty data (mount locked), write it
    /// (unlocked), commit with all metadata (locked). Drops clean inodes
    /// from memory when nothing is dirty. Returns the bytes written.
    fn flush_once(&self) -> hammer2::Result<u64> {
        let mut batch = {
            let mut m = self.mount();
            if !m.is_dirty() {
                m.release_clean();
                return Ok(0);
            }
            m.flush_begin()?
        };
        batch.write();
        let mut m = self.mount();
        let stats = m.flush_commit(batch)?;
        self.dirty.store(m.pending_bytes(), Ordering::Relaxed);
        self.written.store(0, Ordering::Relaxed);
        Ok(stats.bytes)
    }

    /// At unmount: stop the flusher and flush what is left. Returns the
    /// error that poisoned the mount, if any did.
    pub fn shutdown(&self, flusher: Option<JoinHandle<()>>) -> Result<(), String> {
        lock(&self.flush).stop = true;
        self.cv.notify_all();
        if let Some(t) = flusher {
            if t.join().is_err() {
                log::error!("the flusher thread panicked");
            }
        }
        let target = lock(&self.flush).requested;
        self.flush_and_record(target);
        let st = lock(&self.flush);
        log::info!(
            "{}: {} flushes, {} bytes written",
            self.label,
            st.flushes,
            st.bytes
        );
        match &st.poisoned {
            Some((_, why)) => Err(why.clone()),
            None => Ok(()),
        }
    }
}
