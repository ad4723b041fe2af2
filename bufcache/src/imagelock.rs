//! Who is writing an image file: the locks a read-write mount holds, and
//! how other tools wait for a mount that is ending.
//!
//! A read-write mount holds two locks on its image:
//!
//! - the writer lock, `flock(LOCK_EX)`, for the daemon's whole life,
//!   through the last flush after the unmount: nothing else may write
//!   the image meanwhile;
//! - the mounted lock, an open file description lock (`F_OFD_SETLK`,
//!   shared, on byte 0; others test for it by asking for a write lock),
//!   while the filesystem is mounted: the daemon drops
//!   it as soon as the kernel has ended the session.
//!
//! A FUSE `umount` returns before the daemon has written its last flush
//! (the kernel waits for the daemon only on block-device mounts). So a
//! writer lock held without the mounted lock means "an unmounted daemon
//! is finishing its flush": a new mount and fsck wait for it (up to
//! `WAIT_FOR_EXITING`), so `umount MNT; fsck IMG` and `umount MNT; mount
//! IMG MNT` see the image as the unmount left it. A writer lock held with
//! the mounted lock is a live mount: a second read-write mount fails at
//! once (after `GRACE`, the time a daemon takes to notice the unmount).

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, Flock, FlockArg};

/// How long a new mount or fsck waits for a daemon that was unmounted
/// to finish its last flush.
pub const WAIT_FOR_EXITING: Duration = Duration::from_secs(120);

/// How long a held mounted lock may take to go after an unmount (the
/// daemon notices the end of its session within milliseconds).
pub const GRACE: Duration = Duration::from_secs(1);

const POLL: Duration = Duration::from_millis(20);

/// Who holds an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    /// Nobody writes it.
    Nobody,
    /// A read-write mount is up.
    Mounted,
}

/// Why the writer lock was not taken.
#[derive(Debug)]
pub enum LockError {
    /// A read-write mount of the image is up.
    Mounted,
    /// An unmounted daemon still held the image after `WAIT_FOR_EXITING`.
    StillExiting(Duration),
    Io(io::Error),
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::Mounted => {
                f.write_str("it is already mounted read-write (another mount.hammer2 holds it)")
            }
            LockError::StillExiting(d) => write!(
                f,
                "an unmounted mount.hammer2 was still writing its last flush after {} s",
                d.as_secs()
            ),
            LockError::Io(e) => write!(f, "cannot lock it: {e}"),
        }
    }
}

/// The locks of a read-write mount (see the module comment).
pub struct WriterLock {
    /// The writer lock: hold it until nothing more will be written.
    pub writer: Flock<File>,
    /// The mounted lock: drop it once the filesystem is unmounted.
    pub mounted: MountedLock,
}

/// The mounted lock; dropping it releases it.
pub struct MountedLock {
    _file: File,
}

fn byte0(l_type: i32) -> libc::flock {
    libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    }
}

/// Is the mounted lock held (by another open file description)? A
/// write lock on its byte could not be had if so.
fn mounted_lock_held(f: &File) -> io::Result<bool> {
    let mut l = byte0(libc::F_WRLCK);
    fcntl(f, FcntlArg::F_OFD_GETLK(&mut l)).map_err(io::Error::from)?;
    Ok(l.l_type != libc::F_UNLCK as libc::c_short)
}

fn open(image: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).open(image)
}

/// Poll until the writer lock can be had (`take` tries it): `Ok(Some)`
/// with it, `Ok(None)` when a live mount holds the image. `waiting` is
/// called once if an ending daemon is waited for.
fn poll_writer<T>(
    image: &Path,
    mut take: impl FnMut() -> io::Result<Option<T>>,
    waiting: &mut dyn FnMut(),
) -> Result<Option<T>, LockError> {
    let probe = open(image).map_err(LockError::Io)?;
    let start = Instant::now();
    let mut mounted_since: Option<Instant> = None;
    let mut told = false;
    loop {
        if let Some(t) = take().map_err(LockError::Io)? {
            return Ok(Some(t));
        }
        let now = Instant::now();
        if mounted_lock_held(&probe).map_err(LockError::Io)? {
            let since = *mounted_since.get_or_insert(now);
            if now - since >= GRACE {
                return Ok(None);
            }
        } else {
            mounted_since = None;
            if !told && now - start >= GRACE {
                waiting();
                told = true;
            }
            if now - start >= WAIT_FOR_EXITING {
                return Err(LockError::StillExiting(WAIT_FOR_EXITING));
            }
        }
        thread::sleep(POLL);
    }
}

/// Take the locks of a read-write mount of `image`, waiting for an
/// unmounted daemon to finish (`waiting` is called if that takes more
/// than a moment).
pub fn lock_writer(image: &Path, mut waiting: impl FnMut()) -> Result<WriterLock, LockError> {
    let take = || match Flock::lock(open(image)?, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(io::Error::from(e)),
    };
    let writer = poll_writer(image, take, &mut waiting)?.ok_or(LockError::Mounted)?;
    let mounted = open(image).map_err(LockError::Io)?;
    fcntl(&mounted, FcntlArg::F_OFD_SETLK(&byte0(libc::F_RDLCK)))
        .map_err(|e| LockError::Io(io::Error::from(e)))?;
    Ok(WriterLock {
        writer,
        mounted: MountedLock { _file: mounted },
    })
}

/// For readers (fsck, a read-only mount): wait for an unmounted daemon
/// to finish its last flush (`waiting` is called if that takes more
/// than a moment), then say whether a live read-write mount holds the
/// image (its last flush is what a reader sees).
pub fn wait_for_writer(image: &Path, mut waiting: impl FnMut()) -> Result<Holder, LockError> {
    let take = || match Flock::lock(open(image)?, FlockArg::LockSharedNonblock) {
        // Free: let it go at once (a reader does not keep writers out).
        Ok(l) => {
            drop(l);
            Ok(Some(()))
        }
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(io::Error::from(e)),
    };
    Ok(match poll_writer(image, take, &mut waiting)? {
        Some(()) => Holder::Nobody,
        None => Holder::Mounted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn image(tag: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("imagelock-{tag}-{}", std::process::id()));
        std::fs::write(&p, b"image").unwrap();
        p
    }

    #[test]
    fn a_live_mount_refuses_writers_and_is_reported_to_readers() {
        let img = image("live");
        assert_eq!(
            wait_for_writer(&img, || panic!("waited")).unwrap(),
            Holder::Nobody
        );
        let held = lock_writer(&img, || panic!("waited")).unwrap();
        let t = Instant::now();
        assert!(matches!(
            lock_writer(&img, || panic!("waited")),
            Err(LockError::Mounted)
        ));
        assert_eq!(
            wait_for_writer(&img, || panic!("waited")).unwrap(),
            Holder::Mounted
        );
        assert!(t.elapsed() < WAIT_FOR_EXITING);
        drop(held);
        let again = lock_writer(&img, || panic!("waited")).unwrap();
        drop(again);
        std::fs::remove_file(&img).unwrap();
    }

    #[test]
    fn an_unmounted_writer_is_waited_for() {
        let img = image("exiting");
        let held = lock_writer(&img, || {}).unwrap();
        drop(held.mounted);
        let released = Arc::new(AtomicBool::new(false));
        let r = released.clone();
        let exiting = thread::spawn(move || {
            thread::sleep(GRACE + Duration::from_millis(300));
            r.store(true, Ordering::SeqCst);
            drop(held.writer);
        });
        let mut told = 0;
        assert_eq!(wait_for_writer(&img, || told += 1).unwrap(), Holder::Nobody);
        assert!(released.load(Ordering::SeqCst));
        assert_eq!(told, 1);
        exiting.join().unwrap();

        let held = lock_writer(&img, || {}).unwrap();
        drop(held.mounted);
        let r = released.clone();
        r.store(false, Ordering::SeqCst);
        let exiting = thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            r.store(true, Ordering::SeqCst);
            drop(held.writer);
        });
        let next = lock_writer(&img, || {}).unwrap();
        assert!(released.load(Ordering::SeqCst));
        exiting.join().unwrap();
        drop(next);
        std::fs::remove_file(&img).unwrap();
    }
}
