//! Who is using an image: the locks every writer of an image holds (a
//! read-write mount, mkfs.hammer2, the writing `hammer2` verbs,
//! replay-log) and every read-only mount, and how other tools wait for a
//! mount that is ending.
//!
//! The locks follow the data, not the name: they are taken on the regular
//! file or whole block device that holds the image's bytes, over the
//! range of it the image is (`backing::resolve`), so the same image named
//! by its path, through a loop device (`losetup -f IMG`), through a
//! partition of one, or as a partition of a disk, takes the same lock;
//! two loop devices over different ranges of one file do not conflict.
//! They are open file description locks (`F_OFD_SETLK`), which belong to
//! an open file and go away when it is closed (a killed holder leaves
//! none behind), on four copies of the image's range, `SPAN` apart (so
//! they never meet):
//!
//! - the writer lock (`Region::Writer`), a write lock, for a writer's
//!   whole life (a mount: through its last flush): nothing else may write
//!   the image meanwhile;
//! - the writer's live lock (`Region::WriterLive`), a read lock, while the
//!   writer is live: a mount drops it when the kernel has ended its
//!   session, a tool when it exits. Others test for it by asking for a
//!   write lock;
//! - the reader lock (`Region::Reader`), a read lock, for a read-only
//!   mount's whole life, and its live lock (`Region::ReaderLive`) while
//!   it is mounted. A writer that rewrites blocks in place (mkfs,
//!   replay-log: "exclusive") takes a write lock on the reader region, so
//!   it refuses an image mounted read-only, and a read-only mount refuses
//!   an image such a writer is at work on. Copy-on-write writers (a
//!   read-write mount, the verbs) leave a read-only mount beside them
//!   alone: they never overwrite what its flush reaches.
//!
//! A life lock held without its live lock means "a mount that was
//! unmounted is finishing" (a read-write one: writing its last flush). A
//! read-write mount over a block device (fuseblk) writes that flush
//! before umount returns, but a plain FUSE mount (`noblkdev`, and every
//! read-only mount) does not, nor does a lazy `umount -l`: a new writer
//! and fsck wait for it (up to `WAIT_FOR_EXITING`), so `umount MNT; fsck
//! IMG` sees the image as the unmount left it. A life lock held with its
//! live lock is a live holder: a conflicting writer fails at once (after
//! `GRACE`, the time a daemon takes to notice an unmount).
//!
//! A writer also opens a block device it is named by exclusively
//! (`backing::claim`, which the kernel refuses while anything is mounted
//! on it), and refuses bytes that a loop device over them exposes to
//! such a holder (a filesystem mounted on `/dev/loop0` over the image
//! file): the kernel's view of who uses a device, for holders that know
//! nothing of these locks.

use crate::backing::{self, Backing};
use crate::source;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg};

/// How long a new writer or fsck waits for a daemon that was unmounted
/// to finish its last flush.
pub const WAIT_FOR_EXITING: Duration = Duration::from_secs(120);

/// How long a held live lock may take to go after an unmount (the
/// daemon notices the end of its session within milliseconds).
pub const GRACE: Duration = Duration::from_secs(1);

const POLL: Duration = Duration::from_millis(20);

/// The regions are copies of the image's range this far apart; image
/// ranges are clamped below it (1 EiB).
const SPAN: u64 = 1 << 60;

/// Which copy of the image's range a lock is on (see the module comment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Region {
    Writer = 0,
    WriterLive = 1,
    Reader = 2,
    ReaderLive = 3,
}

/// Who holds an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// Nobody writes it.
    Nobody,
    /// A live writer: a read-write mount (on this mountpoint, when one is
    /// found) or a tool.
    Mounted(Option<PathBuf>),
}

/// Why a lock was not taken.
#[derive(Debug)]
pub enum LockError {
    /// A live writer holds the image: a read-write mount (on this
    /// mountpoint, when one is found) or a tool.
    Mounted {
        image: Box<Backing>,
        on: Option<PathBuf>,
    },
    /// An exclusive writer (mkfs, replay-log) found the image mounted
    /// read-only (on this mountpoint, when one is found).
    ReadOnly {
        image: Box<Backing>,
        on: Option<PathBuf>,
    },
    /// A read-only mount found an exclusive writer at work.
    Rewriting {
        image: Box<Backing>,
    },
    /// A block device with the image's bytes is held exclusively by
    /// something that does not take these locks (a mounted filesystem,
    /// mkfs, a device-mapper table).
    Busy {
        image: Box<Backing>,
        device: PathBuf,
    },
    /// An unmounted daemon still held the image after `WAIT_FOR_EXITING`.
    StillExiting {
        image: Box<Backing>,
        after: Duration,
    },
    Io(PathBuf, io::Error),
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::Mounted {
                image,
                on: Some(on),
            } => write!(
                f,
                "{} is already mounted read-write on {}",
                image.describe(),
                on.display()
            ),
            LockError::Mounted { image, on: None } => write!(
                f,
                "{} is already being written (mounted read-write by mount.hammer2, \
                 or a hammer2 tool or mkfs.hammer2 is at work on it)",
                image.describe()
            ),
            LockError::ReadOnly {
                image,
                on: Some(on),
            } => write!(
                f,
                "{} is mounted read-only on {}",
                image.describe(),
                on.display()
            ),
            LockError::ReadOnly { image, on: None } => write!(
                f,
                "{} is mounted read-only by mount.hammer2",
                image.describe()
            ),
            LockError::Rewriting { image } => write!(
                f,
                "{} is being rewritten (mkfs.hammer2 or hammer2 replay-log is at work on it)",
                image.describe()
            ),
            LockError::Busy { image, device } if image.via.first() == Some(device) => write!(
                f,
                "{} is in use: something is mounted on it, or another program holds it \
                 exclusively",
                image.describe()
            ),
            LockError::Busy { image, device } => write!(
                f,
                "{} is in use through {}: something is mounted on that device, or another \
                 program holds it exclusively",
                image.describe(),
                device.display()
            ),
            LockError::StillExiting { image, after } => write!(
                f,
                "{}: an unmounted mount.hammer2 was still writing its last flush after {} s",
                image.describe(),
                after.as_secs()
            ),
            LockError::Io(p, e) => write!(f, "{}: cannot lock it: {e}", p.display()),
        }
    }
}

/// An open file description lock; dropping it releases it.
pub struct RangeLock {
    _file: File,
}

/// The locks of a writer (see the module comment).
pub struct WriterLock {
    /// What was locked.
    pub backing: Backing,
    /// The writer lock: hold it until nothing more will be written.
    pub writer: RangeLock,
    /// The live lock: a mount drops it once the filesystem is unmounted.
    pub mounted: RangeLock,
    /// An exclusive writer's write lock on the reader region.
    pub exclusive: Option<RangeLock>,
    /// The block device named, opened exclusively (a mount drops it just
    /// before mount(2), which claims the device itself).
    pub claim: Option<File>,
}

/// The locks of a read-only mount.
pub struct ReaderLock {
    /// For the daemon's life.
    pub reader: RangeLock,
    /// While mounted.
    pub live: RangeLock,
}

/// `(start, len)` of the image's range in `region`.
fn range(b: &Backing, region: Region) -> (u64, u64) {
    let start = b.start.min(SPAN - 1);
    let end = b.end.unwrap_or(SPAN).clamp(start + 1, SPAN);
    (region as u64 * SPAN + start, end - start)
}

fn lock_of(l_type: i32, (start, len): (u64, u64)) -> libc::flock {
    libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        // Both below 2^62: in range of off_t.
        l_start: start as libc::off_t,
        l_len: len as libc::off_t,
        l_pid: 0,
    }
}

/// Would a lock of `l_type` on `region` conflict with one held through
/// another open file description?
fn conflicts(f: &File, b: &Backing, l_type: i32, region: Region) -> io::Result<bool> {
    let mut l = lock_of(l_type, range(b, region));
    fcntl(f, FcntlArg::F_OFD_GETLK(&mut l)).map_err(io::Error::from)?;
    Ok(l.l_type != libc::F_UNLCK as libc::c_short)
}

/// Is a write lock held on `region`? (It conflicts with a read lock.)
fn write_locked(probe: &File, b: &Backing, region: Region) -> io::Result<bool> {
    conflicts(probe, b, libc::F_RDLCK, region)
}

/// Is any lock held on `region`? (Any conflicts with a write lock.)
fn locked(probe: &File, b: &Backing, region: Region) -> io::Result<bool> {
    conflicts(probe, b, libc::F_WRLCK, region)
}

/// Take a lock of `l_type` on `region` of `b.data` through a new open
/// file description (read-write for a write lock); `None` if it is held.
fn try_lock(b: &Backing, l_type: i32, region: Region) -> io::Result<Option<RangeLock>> {
    let file = OpenOptions::new()
        .read(true)
        .write(l_type == libc::F_WRLCK)
        .open(&b.data)?;
    match fcntl(
        &file,
        FcntlArg::F_OFD_SETLK(&lock_of(l_type, range(b, region))),
    ) {
        Ok(_) => Ok(Some(RangeLock { _file: file })),
        Err(nix::errno::Errno::EAGAIN) => Ok(None),
        Err(e) => Err(io::Error::from(e)),
    }
}

fn resolve(image: &Path) -> Result<Backing, LockError> {
    backing::resolve(image).map_err(|e| LockError::Io(image.to_path_buf(), e))
}

/// Poll until `take` succeeds: `Ok(Some)` with what it took, `Ok(None)`
/// when a live holder (a lock on `live`) stands in the way. `waiting` is
/// called once if an ending daemon is waited for.
fn poll<T>(
    b: &Backing,
    live: Region,
    mut take: impl FnMut() -> io::Result<Option<T>>,
    waiting: &mut dyn FnMut(),
) -> Result<Option<T>, LockError> {
    let io = |e| LockError::Io(b.named.clone(), e);
    let probe = File::open(&b.data).map_err(io)?;
    let start = Instant::now();
    let mut live_since: Option<Instant> = None;
    let mut told = false;
    loop {
        if let Some(t) = take().map_err(io)? {
            return Ok(Some(t));
        }
        let now = Instant::now();
        if locked(&probe, b, live).map_err(io)? {
            let since = *live_since.get_or_insert(now);
            if now - since >= GRACE {
                return Ok(None);
            }
        } else {
            live_since = None;
            if !told && now - start >= GRACE {
                waiting();
                told = true;
            }
            if now - start >= WAIT_FOR_EXITING {
                return Err(LockError::StillExiting {
                    image: Box::new(b.clone()),
                    after: WAIT_FOR_EXITING,
                });
            }
        }
        thread::sleep(POLL);
    }
}

/// Take the locks of a writer of `image`, waiting for an unmounted
/// daemon to finish (`waiting` is called if that takes more than a
/// moment); if `image` is a block device, open it exclusively too; and
/// refuse bytes a loop device exposes to an exclusive holder. An
/// `exclusive` writer (one that overwrites blocks in place: mkfs,
/// replay-log) also refuses an image mounted read-only.
pub fn lock_writer(
    image: &Path,
    exclusive: bool,
    waiting: impl FnMut(),
) -> Result<WriterLock, LockError> {
    let b = resolve(image)?;
    let claim = b.block_device.then_some(image);
    lock_writer_at(&b, claim, exclusive, waiting)
}

/// `lock_writer` of bytes already resolved (an image opened by
/// `source::open`: a partition of a disk, an NBD export); `claim`, if
/// given, is the block device to open exclusively.
pub fn lock_writer_at(
    b: &Backing,
    claim: Option<&Path>,
    exclusive: bool,
    mut waiting: impl FnMut(),
) -> Result<WriterLock, LockError> {
    let b = b.clone();
    let io = |e| LockError::Io(b.named.clone(), e);
    let take = || try_lock(&b, libc::F_WRLCK, Region::Writer);
    let writer = match poll(&b, Region::WriterLive, take, &mut waiting)? {
        Some(w) => w,
        None => {
            return Err(LockError::Mounted {
                on: source::mounted_on(&b, true),
                image: Box::new(b),
            })
        }
    };
    let claim = match claim {
        Some(dev) => match backing::claim(dev, true) {
            Ok(f) => Some(f),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(LockError::Busy {
                    device: dev.to_path_buf(),
                    image: Box::new(b),
                })
            }
            Err(e) => return Err(io(e)),
        },
        None => None,
    };
    // Loop devices over these bytes, other than the ones the image was
    // named through (one of which is claimed above).
    if let Some(dev) = backing::loops_over(&b)
        .into_iter()
        .filter(|d| !b.via.contains(d))
        .find(|d| backing::claimed(d))
    {
        return Err(LockError::Busy {
            image: Box::new(b),
            device: dev,
        });
    }
    let exclusive = match exclusive {
        false => None,
        true => {
            let take = || try_lock(&b, libc::F_WRLCK, Region::Reader);
            match poll(&b, Region::ReaderLive, take, &mut waiting)? {
                Some(l) => Some(l),
                None => {
                    return Err(LockError::ReadOnly {
                        on: source::mounted_on(&b, false),
                        image: Box::new(b),
                    })
                }
            }
        }
    };
    let mounted = try_lock(&b, libc::F_RDLCK, Region::WriterLive)
        .map_err(io)?
        // Nobody takes a write lock there: a read lock is always granted.
        .ok_or_else(|| io(io::Error::other("the live lock was refused")))?;
    Ok(WriterLock {
        backing: b,
        writer,
        mounted,
        exclusive,
        claim,
    })
}

/// For readers (fsck, a read-only mount, the `hammer2` verbs that read):
/// wait for an unmounted daemon to finish its last flush (`waiting` is
/// called if that takes more than a moment), then say whether a live
/// writer holds the image (its last flush is what a reader sees).
pub fn wait_for_writer(image: &Path, waiting: impl FnMut()) -> Result<Holder, LockError> {
    wait_for_writer_at(&resolve(image)?, waiting)
}

/// `wait_for_writer` of bytes already resolved.
pub fn wait_for_writer_at(b: &Backing, mut waiting: impl FnMut()) -> Result<Holder, LockError> {
    let probe = File::open(&b.data).map_err(|e| LockError::Io(b.named.clone(), e))?;
    let take = || Ok((!write_locked(&probe, b, Region::Writer)?).then_some(()));
    Ok(match poll(b, Region::WriterLive, take, &mut waiting)? {
        Some(()) => Holder::Nobody,
        None => Holder::Mounted(source::mounted_on(b, true)),
    })
}

/// For a read-only mount: as `wait_for_writer`, then take the reader
/// locks, refusing an image an exclusive writer (mkfs, replay-log) is at
/// work on.
pub fn lock_reader(image: &Path, waiting: impl FnMut()) -> Result<(Holder, ReaderLock), LockError> {
    lock_reader_at(&resolve(image)?, waiting)
}

/// `lock_reader` of bytes already resolved.
pub fn lock_reader_at(
    b: &Backing,
    waiting: impl FnMut(),
) -> Result<(Holder, ReaderLock), LockError> {
    let holder = wait_for_writer_at(b, waiting)?;
    let io = |e| LockError::Io(b.named.clone(), e);
    let reader = match try_lock(b, libc::F_RDLCK, Region::Reader).map_err(io)? {
        Some(l) => l,
        None => {
            return Err(LockError::Rewriting {
                image: Box::new(b.clone()),
            })
        }
    };
    let live = try_lock(b, libc::F_RDLCK, Region::ReaderLive)
        .map_err(io)?
        // Nobody takes a write lock there: a read lock is always granted.
        .ok_or_else(|| io(io::Error::other("the live lock was refused")))?;
    Ok((holder, ReaderLock { reader, live }))
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
    fn a_live_writer_refuses_writers_and_is_reported_to_readers() {
        let img = image("live");
        assert_eq!(
            wait_for_writer(&img, || panic!("waited")).unwrap(),
            Holder::Nobody
        );
        let held = lock_writer(&img, false, || panic!("waited")).unwrap();
        let t = Instant::now();
        let e = lock_writer(&img, false, || panic!("waited")).err().unwrap();
        assert!(matches!(e, LockError::Mounted { on: None, .. }), "{e}");
        assert!(e.to_string().contains("already being written"), "{e}");
        assert_eq!(
            wait_for_writer(&img, || panic!("waited")).unwrap(),
            Holder::Mounted(None)
        );
        assert!(t.elapsed() < WAIT_FOR_EXITING);
        drop(held);
        let again = lock_writer(&img, false, || panic!("waited")).unwrap();
        drop(again);
        std::fs::remove_file(&img).unwrap();
    }

    #[test]
    fn the_locks_follow_the_file_not_the_name() {
        let img = image("names");
        let link = img.with_extension("link");
        let _ = std::fs::remove_file(&link);
        std::fs::hard_link(&img, &link).unwrap();
        let held = lock_writer(&img, false, || panic!("waited")).unwrap();
        assert!(matches!(
            lock_writer(&link, false, || panic!("waited")),
            Err(LockError::Mounted { .. })
        ));
        assert_eq!(
            wait_for_writer(&link, || panic!("waited")).unwrap(),
            Holder::Mounted(None)
        );
        drop(held);
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_file(&img).unwrap();
    }

    #[test]
    fn disjoint_ranges_of_one_file_lock_apart() {
        let img = image("ranges");
        let whole = backing::resolve(&img).unwrap();
        let part = |start, end| Backing {
            start,
            end: Some(end),
            ..whole.clone()
        };
        let (a, b, c) = (part(0, 1 << 20), part(1 << 20, 2 << 20), part(4096, 8192));
        let wa = try_lock(&a, libc::F_WRLCK, Region::Writer).unwrap();
        assert!(wa.is_some());
        let probe = File::open(&img).unwrap();
        assert!(!write_locked(&probe, &b, Region::Writer).unwrap());
        assert!(write_locked(&probe, &c, Region::Writer).unwrap());
        assert!(write_locked(&probe, &whole, Region::Writer).unwrap());
        // The regions never meet.
        assert!(!locked(&probe, &whole, Region::WriterLive).unwrap());
        assert!(!locked(&probe, &whole, Region::Reader).unwrap());
        assert!(try_lock(&b, libc::F_WRLCK, Region::Writer)
            .unwrap()
            .is_some());
        assert!(try_lock(&c, libc::F_WRLCK, Region::Writer)
            .unwrap()
            .is_none());
        std::fs::remove_file(&img).unwrap();
    }

    #[test]
    fn read_only_mounts_keep_out_exclusive_writers_only() {
        let img = image("readers");
        let (holder, ro) = lock_reader(&img, || panic!("waited")).unwrap();
        assert_eq!(holder, Holder::Nobody);
        let (_, ro2) = lock_reader(&img, || panic!("waited")).unwrap();
        // A copy-on-write writer beside them, and readers beside it.
        let cow = lock_writer(&img, false, || panic!("waited")).unwrap();
        let (holder, ro3) = lock_reader(&img, || panic!("waited")).unwrap();
        assert_eq!(holder, Holder::Mounted(None));
        drop((cow, ro3, ro2));
        let e = lock_writer(&img, true, || panic!("waited")).err().unwrap();
        assert!(matches!(e, LockError::ReadOnly { on: None, .. }), "{e}");
        assert!(e.to_string().contains("mounted read-only"), "{e}");
        // Unmounted (the live lock gone), exiting: waited for.
        drop(ro.live);
        let reader = ro.reader;
        let exiting = thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            drop(reader);
        });
        let ex = lock_writer(&img, true, || {}).unwrap();
        exiting.join().unwrap();
        let e = lock_reader(&img, || panic!("waited")).err().unwrap();
        assert!(matches!(e, LockError::Rewriting { .. }), "{e}");
        drop(ex);
        assert!(lock_reader(&img, || panic!("waited")).is_ok());
        std::fs::remove_file(&img).unwrap();
    }

    #[test]
    fn an_unmounted_writer_is_waited_for() {
        let img = image("exiting");
        let held = lock_writer(&img, false, || {}).unwrap();
        drop(held.mounted);
        let released = Arc::new(AtomicBool::new(false));
        let r = released.clone();
        let writer = held.writer;
        let exiting = thread::spawn(move || {
            thread::sleep(GRACE + Duration::from_millis(300));
            r.store(true, Ordering::SeqCst);
            drop(writer);
        });
        let mut told = 0;
        assert_eq!(wait_for_writer(&img, || told += 1).unwrap(), Holder::Nobody);
        assert!(released.load(Ordering::SeqCst));
        assert_eq!(told, 1);
        exiting.join().unwrap();

        let held = lock_writer(&img, false, || {}).unwrap();
        drop(held.mounted);
        let r = released.clone();
        r.store(false, Ordering::SeqCst);
        let writer = held.writer;
        let exiting = thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            r.store(true, Ordering::SeqCst);
            drop(writer);
        });
        let next = lock_writer(&img, false, || {}).unwrap();
        assert!(released.load(Ordering::SeqCst));
        exiting.join().unwrap();
        drop(next);
        std::fs::remove_file(&img).unwrap();
    }
}
