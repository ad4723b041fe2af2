//! A mount's life: open the image and the PFS, check the mountpoint,
//! open /dev/fuse, mount(2), say so (`ready`), serve until unmounted, and
//! unmount on SIGTERM, SIGINT or SIGHUP.
//!
//! Read-write: the image is opened read-write and locked (see
//! `bufcache::imagelock`: a writer lock and a live lock on the bytes of
//! the image, whatever name it was given: its path, a loop device over
//! it, a partition), so a second writer of it, by any name, fails at
//! once; a flusher thread runs from the mount to the end.
//!
//! A read-write mount is a fuseblk mount (`blkdev`, the default): over
//! the block device named, or over a loop device attached to the image
//! file (`loopdev`, cleared by the kernel when the mount goes), since
//! only on fuseblk connections does the kernel send FUSE_SYNCFS for
//! sync(2) and syncfs(2) (Linux 6.18 and later) and wait, in umount(2),
//! for the answer to FUSE_DESTROY. The daemon answers SYNCFS after a
//! flush (`RwVolume::sync`, as fsync) and DESTROY after the last flush
//! and the release of the locks (`vnops::destroy_request`), so `sync`
//! makes every write before it durable and `umount` returns with the
//! image final. The kernel holds the block device exclusively while
//! mounted (the daemon, which opened it first, still writes it), so
//! nothing that opens devices exclusively (mkfs, a kernel mount) can use
//! it meanwhile. With `noblkdev`, or when no loop device can be had (a
//! warning says so), the mount is plain FUSE: neither sync(2) nor
//! umount(2) involves the daemon; after the session ends the live lock
//! is dropped and `RwVolume::shutdown` flushes what is left before the
//! process exits, and a new mount, fsck and the writing tools wait for
//! that ending daemon. Read-only mounts are plain FUSE mounts (they read
//! the last flush and never write); they too wait for an ending daemon,
//! and hold the reader locks, which keep out the writers that overwrite
//! in place (mkfs, replay-log) and not copy-on-write ones.
//!
//! Threads: `serve` blocks those signals in the calling thread before it
//! starts any other, so every thread inherits the mask and only the
//! signal thread (sigwait) sees them. The session runs on its own
//! threads; the calling thread waits for whichever comes first, a signal
//! or the end of the session (an outside `umount`). On a signal it
//! unmounts; if the mount is busy it detaches it (`MNT_DETACH`), which
//! leaves open files working, and the session ends when the last of them
//! is closed; a second signal ends the process at once.

use crate::bind;
use crate::loopdev::{self, LoopDevice};
use crate::options::Options;
use crate::rw::RwVolume;
use crate::vnops::Hammer2Fs;
use bufcache::imagelock::{self, Holder, LockError, ReaderLock};
use bufcache::source::{self, Location, Opened, Pick};
use bufcache::BlockDevice;
use hammer2::mount::{Mount, ROOT_INUM};
use hammer2::pfs::{pfs_list, Pfs};
use hammer2::Volume;
use nix::errno::Errno;
use nix::mount::MntFlags;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;

/// Why a mount did not happen, with mount(8)'s exit codes.
#[derive(Debug)]
pub enum Failure {
    /// Bad arguments or options (exit 1).
    Usage(String),
    /// The mount itself failed: the image, the PFS, the mountpoint,
    /// /dev/fuse, mount(2) (exit 32).
    Mount(String),
    /// The system failed us: cannot start the daemon, the session broke
    /// (exit 2).
    System(String),
}

impl Failure {
    pub fn exit_code(&self) -> i32 {
        match self {
            Failure::Usage(_) => 1,
            Failure::System(_) => 2,
            Failure::Mount(_) => 32,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Usage(m) | Failure::Mount(m) | Failure::System(m) => f.write_str(m),
        }
    }
}

/// What to mount where.
#[derive(Clone, Debug)]
pub struct Request {
    pub image: PathBuf,
    pub label: String,
    pub mountpoint: PathBuf,
    pub options: Options,
}

/// The filesystem type mount(2) gets and /proc/mounts shows: a
/// read-write mount over a block device, and any other.
pub const FSTYPE_BLK: &str = "fuseblk.hammer2";
pub const FSTYPE: &str = "fuse.hammer2";

/// The label used when `IMG` has no `@LABEL`.
pub const DEFAULT_LABEL: &str = "DATA";

/// Split `IMG[@LABEL]` (`hammer2::pfsops::split_image_spec`): a source
/// that names an existing file is the image; otherwise the label is what
/// follows the last `@`, unless that contains a `/` (then the `@`
/// belongs to a directory name).
pub fn split_source(source: &str) -> Result<(PathBuf, String), Failure> {
    let (img, label) = hammer2::pfsops::split_image_spec(source, |p| p.exists());
    if label.is_none() && !img.exists() {
        if let Some((i, l)) = source.rsplit_once('@') {
            if !l.contains('/') && (i.is_empty() || l.is_empty()) {
                return Err(Failure::Usage(format!(
                    "{source:?}: expected IMG or IMG@LABEL"
                )));
            }
        }
    }
    Ok((img, label.unwrap_or_else(|| DEFAULT_LABEL.to_string())))
}

/// Open what the mount was given (`bufcache::source`: an image file, a
/// block device, `IMG:PART`, the HAMMER2 partition of a whole disk, an
/// NBD export), read-only or read-write.
pub fn open_source(image: &Path, writable: bool) -> Result<Opened, OpenFailure> {
    let text = image.to_str().ok_or_else(|| {
        OpenFailure::Other(Failure::Usage(format!("{}: not UTF-8", image.display())))
    })?;
    source::open_for_mount(
        text,
        writable,
        Pick::Auto,
        &hammer2::volume::has_volume_magic,
    )
    .map_err(|e| {
        if writable
            && (e.kind() == io::ErrorKind::ReadOnlyFilesystem
                || e.kind() == io::ErrorKind::PermissionDenied)
        {
            OpenFailure::WriteProtected(e)
        } else {
            OpenFailure::Other(Failure::Mount(format!("cannot open {e}")))
        }
    })
}

/// Say whether the image file or block device was opened for direct
/// I/O (`source::open_for_mount`: where its file system allows, so that
/// it is cached once, in the mount's buffer cache, see `cached`). Once
/// the image is locked: a refused mount says only why.
fn log_direct(o: &Opened) {
    if let Location::Path(p) = &o.spec.location {
        if o.direct {
            log::info!("{}: direct I/O (O_DIRECT)", p.display());
        } else {
            log::info!(
                "{}: its file system refuses direct I/O (O_DIRECT); the kernel's page cache \
                 holds a second copy of what the buffer cache holds",
                p.display()
            );
        }
    }
}

/// Why `open_source` failed.
pub enum OpenFailure {
    /// Read-write was asked and refused (a read-only file, device,
    /// filesystem or NBD export): mount read-only instead.
    WriteProtected(io::Error),
    Other(Failure),
}

/// What /proc/mounts and the control channel show as the image: the
/// path made absolute, with the partition used (`/srv/disk.img:s1d`),
/// or the NBD URI.
pub fn shown_source(o: &Opened) -> String {
    match &o.spec.location {
        Location::Path(p) => {
            let abs = p.canonicalize().unwrap_or_else(|_| p.clone());
            match &o.partition {
                Some(part) => format!("{}:{}", abs.display(), part.dfly),
                None => abs.display().to_string(),
            }
        }
        Location::Nbd(_) => o.name.clone(),
    }
}

/// Open the PFS `label` of an opened image, read-only (through the
/// buffer cache, of `cache_size` bytes if given), with messages that say what is
/// wrong: not HAMMER2, no such label (listing those there are).
pub fn open_pfs(o: &Opened, label: &str, cache_size: Option<u64>) -> Result<Pfs, Failure> {
    let shown = Path::new(&o.name);
    log_direct(o);
    let (budget, from) = budget_of(cache_size);
    let dev = cached(o.dev.clone(), budget, &format!(" ({from})"))?;
    let vol = Arc::new(open_volume(shown, dev)?);
    check_label(shown, &vol, label)?;
    Pfs::open(vol, label).map_err(|e| Failure::Mount(format!("{}@{label}: {e}", o.name)))
}

/// The buffer cache's budget when `cache_size=` is not given: an eighth
/// of the machine's memory, 64 MiB to 4 GiB (rounded down to 2 MiB).
pub fn default_cache_size() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or(1 << 30, |kib| kib << 10);
    (total / 8).clamp(64 << 20, 4 << 30) & !((2 << 20) - 1)
}

/// How a read-write mount shares its one memory budget (`cache_size=`
/// or `default_cache_size`): decoded metadata kept across flushes (an
/// eighth) and the page layer (the rest, rounded down to 2 MiB, at least
/// `CACHE_SIZE_MIN`), whose pages hold both the buffer cache and the
/// file data written and waiting for a flush (`hammer2::databuf`); that
/// data may take a quarter of the budget (at most `rw::DIRTY_MAX_BYTES`
/// and a quarter of the pages) before writers wait. A read-only mount gives it
/// all to the pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub pages: u64,
    pub dirty: u64,
    pub metadata: u64,
}

impl Budget {
    pub fn read_write(total: u64) -> Budget {
        let metadata = total / 8;
        let pages =
            (total.saturating_sub(metadata) & !((2 << 20) - 1)).max(crate::options::CACHE_SIZE_MIN);
        // A quarter of the pages at most: anonymous pages stop at half of
        // them, and besides the pending blocks the limit counts they hold
        // the copies batches out are still writing (up to as many again).
        let dirty = (total / 4).min(crate::rw::DIRTY_MAX_BYTES).min(pages / 4);
        Budget {
            pages,
            dirty,
            metadata,
        }
    }
}

/// `dev` through a buffer cache of `pages` bytes: every block the mount
/// reads or writes goes through it. `what` says in the log where the
/// figure came from.
fn cached(
    dev: Arc<dyn BlockDevice>,
    pages: u64,
    what: &str,
) -> Result<Arc<dyn BlockDevice>, Failure> {
    let cache = bufcache::BufCache::open(dev, pages)
        .map_err(|e| Failure::Mount(format!("cannot set up a {pages}-byte buffer cache: {e}")))?;
    log::info!("buffer cache of {} MiB{what}", pages >> 20);
    let dev = Arc::new(bufcache::CachedDevice::new(cache));
    CACHES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(dev.clone());
    Ok(dev)
}

/// The memory budget `cache_size` asks for, or the default, and how the
/// log names it.
fn budget_of(cache_size: Option<u64>) -> (u64, &'static str) {
    match cache_size {
        Some(b) => (b, "cache_size="),
        None => (
            default_cache_size(),
            "an eighth of memory; cache_size= to set",
        ),
    }
}

/// The buffer caches this daemon made (one per mount it serves), for
/// the report at its end.
static CACHES: std::sync::Mutex<Vec<Arc<bufcache::CachedDevice>>> =
    std::sync::Mutex::new(Vec::new());

/// Log what each buffer cache did (`BufCache::report`).
fn log_cache_reports() {
    for c in CACHES.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        if let Some(r) = c.cache_report() {
            log::info!("{r}");
        }
    }
}

fn open_volume(image: &Path, dev: Arc<dyn BlockDevice>) -> Result<Volume, Failure> {
    Volume::open(dev).map_err(|e| {
        Failure::Mount(format!(
            "{} is not a usable HAMMER2 image: {e}",
            image.display()
        ))
    })
}

/// The image must have a PFS `label`; the message lists those it has.
fn check_label(image: &Path, vol: &Volume, label: &str) -> Result<(), Failure> {
    let shown = image.display();
    let mut labels: Vec<String> = pfs_list(vol)
        .map_err(|e| Failure::Mount(format!("{shown}: cannot read the PFS list: {e}")))?
        .into_iter()
        .map(|p| p.label)
        .collect();
    if labels.iter().any(|l| l == label) {
        return Ok(());
    }
    labels.sort();
    let have = if labels.is_empty() {
        "it has none".to_string()
    } else {
        format!("it has: {}", labels.join(", "))
    };
    Err(Failure::Mount(format!(
        "{shown} has no PFS labelled {label:?}; {have}"
    )))
}

/// For a read-only mount: wait for a mount of the image that was
/// unmounted to finish its last flush (saying so if that takes more than
/// a moment), say so if the image is being written, and take the reader
/// locks (refused while mkfs or replay-log rewrites the image; they keep
/// those out in turn). `None`: the bytes cannot be locked (a file we may
/// not open), which the reads then meet.
fn lock_read_only(o: &Opened) -> Result<Option<ReaderLock>, Failure> {
    let shown = &o.name;
    match imagelock::lock_reader_at(&o.backing, || {
        log::warn!("{shown}: waiting for the mount that was unmounted to write its last flush")
    }) {
        Ok((Holder::Nobody, lock)) => Ok(Some(lock)),
        Ok((Holder::Mounted(on), lock)) => {
            let on = on.map_or(String::new(), |m| format!(" on {}", m.display()));
            log::warn!(
                "{shown} is mounted read-write{on}: this read-only mount shows its last \
                 flush as of now, not later ones"
            );
            Ok(Some(lock))
        }
        Err(LockError::Io(..)) => Ok(None),
        Err(e) => Err(Failure::Mount(e.to_string())),
    }
}

/// A read-write volume ready to mount: its state (holding the image
/// locks), and the block device named, opened exclusively until
/// mount(2) claims it.
pub struct OpenRw {
    pub volume: Arc<RwVolume>,
    pub claim: Option<File>,
}

/// Lock the opened image against any other writer by any name (waiting
/// for a mount that was unmounted to finish its last flush), and open the
/// write path (`Mount`) on PFS `label`.
pub fn open_rw(o: &Opened, label: &str, options: &Options) -> Result<OpenRw, Failure> {
    let shown = Path::new(&o.name);
    let mut lock = imagelock::lock_writer_at(&o.backing, o.claim.as_deref(), false, || {
        log::warn!(
            "{}: waiting for the mount that was unmounted to write its last flush",
            o.name
        )
    })
    .map_err(|e| match e {
        LockError::Mounted { .. } => Failure::Mount(bind::other_pfs_refusal(
            &e.to_string(),
            label,
            bind::served(&o.backing).as_ref(),
        )),
        e => Failure::Mount(e.to_string()),
    })?;
    log_direct(o);
    let dev = o.dev.clone();
    // With log_writes= every write reaching the image is logged: the log
    // device sits right above it, under the buffer cache.
    let dev = match &options.log_writes {
        Some(log) => {
            let file = match (&o.spec.location, &o.partition) {
                (Location::Path(p), None) => p.clone(),
                _ => {
                    return Err(Failure::Usage(format!(
                        "log_writes= needs an image file or block device named whole, not {}",
                        o.name
                    )))
                }
            };
            open_log(&file, dev, log)?
        }
        None => dev,
    };
    let vol = open_volume(shown, dev.clone())?;
    check_label(shown, &vol, label)?;
    drop(vol);
    // The library reads and writes through the buffer cache (its
    // barrier is the cache's ordered flush).
    let (total, from) = budget_of(options.cache_size);
    let budget = Budget::read_write(total);
    let dev = cached(
        dev,
        budget.pages,
        &format!(
            " of a {} MiB budget ({from}); file data waiting for a flush on those pages \
             up to {} MiB, metadata kept across flushes up to {} MiB",
            total >> 20,
            budget.dirty >> 20,
            budget.metadata >> 20
        ),
    )?;
    // Loads the freemap allocator and runs DragonFly's mount-time
    // recovery.
    let mut mount = Mount::open(dev)
        .map_err(|e| Failure::Mount(format!("{} cannot be opened read-write: {e}", o.name)))?;
    // Decoded metadata stays in memory across flushes within its share
    // of the budget.
    mount.set_metadata_limit(budget.metadata as usize);
    mount
        .getattr(label, ROOT_INUM)
        .map_err(|e| Failure::Mount(format!("{}@{label}: {e}", o.name)))?;
    // Files unlinked while open when the system went down: removed now
    // (the library logs how many), so the first flush drops them.
    if let Err(e) = mount.reclaim_orphans(label) {
        log::warn!("{}@{label}: orphaned inodes not reclaimed: {e}", o.name);
    }
    let claim = lock.claim.take();
    let volume = RwVolume::new(mount, label.to_string(), Some(lock), options.sync_interval);
    volume.set_autobulkfree(options.autobulkfree);
    volume.set_dirty_limit(budget.dirty);
    Ok(OpenRw {
        volume: Arc::new(volume),
        claim,
    })
}

/// Start a write log at `log` for the image open as `file` and `dev`.
/// Its header records the image's size and fingerprint as it is now, so
/// that a replay can refuse any other base.
fn open_log(
    image: &Path,
    dev: Arc<dyn BlockDevice>,
    log: &Path,
) -> Result<Arc<dyn BlockDevice>, Failure> {
    let shown = log.display();
    let file = File::open(image)
        .map_err(|e| Failure::Mount(format!("cannot open {}: {e}", image.display())))?;
    if let (Ok(a), Ok(b)) = (std::fs::metadata(log), file.metadata()) {
        if a.dev() == b.dev() && a.ino() == b.ino() {
            return Err(Failure::Usage(format!(
                "log_writes={shown} is the image itself"
            )));
        }
    }
    let started = std::time::Instant::now();
    let fp = bufcache::logwrites::fingerprint_file(&file).map_err(|e| {
        Failure::Mount(format!(
            "cannot read {} to fingerprint it for the write log: {e}",
            image.display()
        ))
    })?;
    let dev = bufcache::LogWritesDevice::create(dev, log, fp)
        .map_err(|e| Failure::Mount(format!("cannot start the write log {shown}: {e}")))?;
    log::info!(
        "logging writes to {shown} (base fingerprint {}, taken in {:.1?})",
        bufcache::logwrites::fingerprint_hex(&fp),
        started.elapsed()
    );
    Ok(Arc::new(dev))
}

/// A write log must not live inside the mount it logs: writing it would
/// wait on the daemon that is writing it.
fn check_log_outside(log: &Path, mnt: &Path) -> Result<(), Failure> {
    let dir = match log.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = dir
        .canonicalize()
        .map_err(|e| Failure::Mount(format!("log_writes={}: its directory: {e}", log.display())))?;
    if dir.starts_with(mnt) {
        return Err(Failure::Usage(format!(
            "log_writes={} is inside the mountpoint {}",
            log.display(),
            mnt.display()
        )));
    }
    Ok(())
}

/// The mountpoint must be an existing directory.
fn check_mountpoint(mnt: &Path) -> Result<PathBuf, Failure> {
    let shown = mnt.display();
    match std::fs::metadata(mnt) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Failure::Mount(format!(
                "mountpoint {shown} is not a directory"
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Failure::Mount(format!("mountpoint {shown} does not exist")))
        }
        Err(e) => return Err(Failure::Mount(format!("mountpoint {shown}: {e}"))),
    }
    mnt.canonicalize()
        .map_err(|e| Failure::Mount(format!("mountpoint {shown}: {e}")))
}

const DEV_FUSE: &str = "/dev/fuse";

/// Open /dev/fuse: the kernel end of the connection the mount will use.
fn open_dev_fuse() -> Result<File, Failure> {
    match OpenOptions::new().read(true).write(true).open(DEV_FUSE) {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Failure::Mount(format!(
            "{DEV_FUSE} does not exist: load the fuse module (modprobe fuse), \
             or give the container the device"
        ))),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(Failure::Mount(format!(
            "cannot open {DEV_FUSE}: permission denied (mount.hammer2 must run as root)"
        ))),
        Err(e) => Err(Failure::Mount(format!("cannot open {DEV_FUSE}: {e}"))),
    }
}

/// mount(2) the FUSE filesystem on `mnt`, talking over `dev`. Done here
/// rather than by fuser's `Session::new` because fuser 0.18 cannot tell
/// a mount that is gone from one that is not (its `is_mounted` reads
/// POLLERR backwards, fixed upstream after 0.18.0): after an outside
/// `umount` it unmounts the path again, which fails with EINVAL, or
/// unmounts whatever was mounted there since. With the mount ours, fuser
/// only serves the connection (`Session::from_fd`) and never unmounts.
/// `blk`: a fuseblk mount of the block device `source` (the kernel opens
/// it exclusively for the mount's life); otherwise a plain one, showing
/// `source` (or `fsname=`).
fn mount_kernel(
    dev: &File,
    mnt: &Path,
    source: &str,
    blk: bool,
    options: &Options,
) -> Result<(), Failure> {
    let shown = mnt.display();
    let rootmode = std::fs::metadata(mnt)
        .map_err(|e| Failure::Mount(format!("mountpoint {shown}: {e}")))?
        .mode();
    let data = options.kernel_data(
        dev.as_raw_fd(),
        rootmode,
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    let (source, fstype) = match blk {
        true => (source, FSTYPE_BLK),
        false => (options.fsname.as_deref().unwrap_or(source), FSTYPE),
    };
    // fuseblk: the block size the kernel gives the superblock; it must be
    // at least the device's logical block size (4 KiB on 4Kn disks) and at
    // most a page.
    let data = match blk {
        true => format!("{data},blksize=4096"),
        false => data,
    };
    nix::mount::mount(
        Some(source),
        mnt,
        Some(fstype),
        options.ms_flags(),
        Some(data.as_str()),
    )
    .map_err(|e| match e {
        Errno::EPERM => Failure::Mount(format!(
            "cannot mount on {shown}: permission denied (mount.hammer2 must run as root)"
        )),
        Errno::EBUSY if blk => Failure::Mount(format!(
            "cannot mount {source} on {shown}: the device is in use (something mounted it, \
             or another program holds it exclusively)"
        )),
        e => Failure::Mount(format!("cannot mount on {shown}: {e}")),
    })
}

/// True once the kernel has dropped the connection (the filesystem was
/// unmounted, or the connection aborted): /dev/fuse polls POLLERR then.
fn connection_gone(dev: &File) -> bool {
    let mut fds = [PollFd::new(dev.as_fd(), PollFlags::empty())];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(1))
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLERR))
}

/// The device number of the filesystem just mounted on `mnt` (the last
/// mount there in mountinfo), which its bind mounts share: read there,
/// since a stat would wait for the session to start.
fn fs_device(mnt: &Path) -> Option<u64> {
    source::hammer2_mounts()
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == mnt)
        .map(|m| m.dev)
}

/// Unmount after a signal: every mount point of this filesystem, the
/// first (`mnt`) and the bind mounts of it (`bind`), known by its device
/// number `fs_dev`, since the first may be gone and its path hold another
/// mount by now. Not if the connection is already gone (an outside umount
/// of the last came first); if busy, detach: open files keep working,
/// and the session ends when the last one is closed.
fn unmount(mnt: &Path, fs_dev: Option<u64>, dev: &File) -> Result<(), Failure> {
    if connection_gone(dev) {
        return Ok(());
    }
    let points: Vec<PathBuf> = match fs_dev {
        Some(d) => source::hammer2_mounts()
            .into_iter()
            .rev()
            .filter(|m| m.dev == d)
            .map(|m| m.mountpoint)
            .collect(),
        None => vec![mnt.to_path_buf()],
    };
    for p in points {
        // Not a mount stacked on ours there since.
        if fs_dev.is_some_and(|d| std::fs::metadata(&p).map_or(true, |m| m.dev() != d)) {
            continue;
        }
        unmount_one(&p)?;
    }
    Ok(())
}

/// Unmount `mnt`, or detach it if busy.
fn unmount_one(mnt: &Path) -> Result<(), Failure> {
    match nix::mount::umount2(mnt, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(Errno::EBUSY) => {
            log::warn!(
                "{} is busy: detaching it; it goes away when the last file open on it \
                 is closed",
                mnt.display()
            );
            nix::mount::umount2(mnt, MntFlags::MNT_DETACH)
                .map_err(|e| Failure::System(format!("cannot detach {}: {e}", mnt.display())))
        }
        Err(e) => Err(Failure::System(format!(
            "cannot unmount {}: {e}",
            mnt.display()
        ))),
    }
}

/// Request threads: one per CPU, at most four (each holds a 16 MiB
/// request buffer; reads are CPU-bound on check codes and decompression).
fn n_threads() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

enum Event {
    Signal(Signal),
    Ended(io::Result<()>),
}

fn shutdown_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set
}

/// Mount `req`, call `ready` once the kernel has accepted the mount, and
/// serve until it is unmounted. Call it before starting any thread.
pub fn serve(req: &Request, ready: impl FnOnce()) -> Result<(), Failure> {
    let signals = shutdown_signals();
    signals
        .thread_block()
        .map_err(|e| Failure::System(format!("cannot block signals: {e}")))?;
    let Some((session, dev, mnt, fs_dev, rw, reader)) = mount(req)? else {
        // A bind mount of a mount of this PFS: its daemon serves it.
        ready();
        return Ok(());
    };
    if let Some(v) = &rw {
        v.start_flusher().map_err(|e| {
            let _ = nix::mount::umount2(&mnt, MntFlags::MNT_DETACH);
            Failure::System(format!("cannot start the flusher: {e}"))
        })?;
    }
    ready();
    let end = start_threads(session, signals)
        .and_then(|events| wait_for_end(&events, &mnt, fs_dev, &dev));
    // Read-only: unmounted; the reader lock goes when the process does.
    let _reader = reader.map(|r| r.reader);
    let r = match rw {
        Some(v) => finish_rw(&v, end),
        None => end,
    };
    log_cache_reports();
    r
}

/// After a read-write session: the last flush, whatever ended it (on a
/// fuseblk mount FUSE_DESTROY has done all this already).
fn finish_rw(v: &RwVolume, end: Result<(), Failure>) -> Result<(), Failure> {
    // Unmounted: a new mount or fsck now waits for the last flush.
    v.unmounted();
    let flushed = v.shutdown();
    v.release();
    end?;
    flushed.map_err(|why| {
        Failure::System(format!(
            "writes to {} since the last completed flush are lost: {why}",
            v.label
        ))
    })
}

/// The session, the /dev/fuse descriptor, the mountpoint, the
/// filesystem's device number (`fs_device`), and the read-write state or
/// the read-only mount's locks.
type Mounted = (
    fuser::Session<Hammer2Fs>,
    File,
    PathBuf,
    Option<u64>,
    Option<Arc<RwVolume>>,
    Option<ReaderLock>,
);

/// What the kernel mounts for a read-write mount with `blkdev`: the
/// block device named whole; otherwise a loop device over the bytes
/// (attached here, cleared by the kernel when the mount goes): the image
/// file, or the partition's range of the file or disk (as `losetup -o
/// --sizelimit`), or for an NBD export its lock file (`bufcache::source`:
/// a sparse file of the export's size, which nothing reads; the daemon
/// does its I/O over NBD) with the partition's range. The loop device
/// names the same bytes as the image locks, so `losetup -l` and the
/// tools' "mounted on" messages point at the export or partition.
/// `None`: a plain FUSE mount (a warning says why).
fn block_device_for(o: &Opened) -> Option<(PathBuf, Option<LoopDevice>)> {
    if o.claim.is_some() {
        let p = match &o.spec.location {
            Location::Path(p) => p.clone(),
            Location::Nbd(_) => return None,
        };
        return Some((p.canonicalize().unwrap_or(p), None));
    }
    let (file, offset, size) = match o.local_range() {
        Some((p, start, size)) => (p, start, size.unwrap_or(0)),
        None => (
            o.backing.data.clone(),
            o.backing.start,
            o.backing.end.map_or(0, |e| e - o.backing.start),
        ),
    };
    match loopdev::attach_range(&file, offset, size) {
        Ok(l) => Some((l.path.clone(), Some(l))),
        Err(e) => {
            log::warn!(
                "cannot attach a loop device for {} ({e}): mounting it as plain FUSE, over \
                 which sync(2) and syncfs(2) do not reach this daemon and umount returns \
                 before its last flush (fsync still works; see -o noblkdev)",
                o.name
            );
            None
        }
    }
}

/// Open everything, mount, and shake hands with the kernel. Returns the
/// session to run, the /dev/fuse descriptor to watch, the canonical
/// mountpoint, and for a read-write mount its state; `None` when the PFS
/// was already served read-write and `req.mountpoint` was made a bind
/// mount of that (`bind`).
fn mount(req: &Request) -> Result<Option<Mounted>, Failure> {
    let mut o = req.options.clone();
    if let Some(log) = &o.log_writes {
        if !o.read_write {
            return Err(Failure::Usage(
                "log_writes= needs a read-write mount (a read-only one writes nothing)".into(),
            ));
        }
        check_log_outside(log, &check_mountpoint(&req.mountpoint)?)?;
    }
    // Read-write unless asked otherwise or the image is write-protected
    // (then read-only, as mount(8) does with a write-protected device).
    let opened = match o.read_write {
        true => match open_source(&req.image, true) {
            Ok(op) => Some(op),
            Err(OpenFailure::WriteProtected(e)) => {
                log::warn!("{e}: write-protected, mounting it read-only");
                None
            }
            Err(OpenFailure::Other(f)) => return Err(f),
        },
        false => None,
    };
    if o.log_writes.is_some() && opened.is_none() {
        return Err(Failure::Mount(format!(
            "{} is write-protected: it cannot be mounted read-write with log_writes=",
            req.image.display()
        )));
    }
    let img = match opened {
        Some(op) => op,
        None => match open_source(&req.image, false) {
            Ok(op) => op,
            Err(OpenFailure::WriteProtected(e)) => {
                return Err(Failure::Mount(format!("cannot open {e}")))
            }
            Err(OpenFailure::Other(f)) => return Err(f),
        },
    };
    // A PFS a read-write daemon serves already: bind its mount (the
    // mount of another PFS is refused below, by the image lock).
    if let Some(served) = bind::served(&img.backing) {
        if served.info.label == req.label {
            bind::bind(&served, &check_mountpoint(&req.mountpoint)?, &o)?;
            return Ok(None);
        }
    }
    let (rw, claim) = match img.writable {
        true => {
            let OpenRw { volume, claim } = open_rw(&img, &req.label, &o)?;
            (Some(volume), claim)
        }
        false => (None, None),
    };
    let reader = match rw {
        None => lock_read_only(&img)?,
        Some(_) => None,
    };
    o.read_write = rw.is_some();
    // What /proc/mounts shows as the source, as mount(8) would.
    let image = PathBuf::from(shown_source(&img));
    let fs = match &rw {
        Some(v) => Hammer2Fs::new_rw(v.clone(), o.default_permissions)
            .with_writeback_cache(o.writeback_cache)
            .with_atime(o.atime),
        None => Hammer2Fs::new(
            open_pfs(&img, &req.label, o.cache_size)?,
            o.default_permissions,
        ),
    }
    .with_image(image.clone())
    .with_snapdir(o.snapdir);
    // One rule for `.snapshot`: with snapdir it is the snapshots'
    // directory only, so a real entry of that name (which it would hide,
    // and which lookup, readdir and unlink would disagree about) refuses
    // the mount.
    if o.snapdir {
        let real = fs
            .has_real_snapdir()
            .map_err(|e| Failure::Mount(format!("{}@{}: {e}", req.image.display(), req.label)))?;
        if real {
            return Err(Failure::Mount(format!(
                "{}@{} has a real .snapshot at its root, which -o snapdir would hide:                  mount it without snapdir and rename it first",
                req.image.display(),
                req.label
            )));
        }
    }
    let mnt = check_mountpoint(&req.mountpoint)?;
    let dev = open_dev_fuse()?;
    let (acl, config) = o.session_config(n_threads());
    let blk = match rw.is_some() && o.blkdev {
        true => block_device_for(&img),
        false => None,
    };
    let block_device = img.claim.is_some();
    let source = match &blk {
        Some((device, _)) => {
            if o.fsname.is_some() {
                log::info!(
                    "fsname= is not shown: a read-write mount shows its block device, {}",
                    device.display()
                );
            }
            device.display().to_string()
        }
        None => image.display().to_string(),
    };
    // The kernel claims the device for the mount: let go of ours first.
    drop(claim);
    mount_kernel(&dev, &mnt, &source, blk.is_some(), &o)?;
    let fs_dev = fs_device(&mnt);
    // The mount holds the loop device now (and the kernel clears it when
    // the mount lets go); ours can go.
    let over = blk.map(|(device, _)| device);
    // fuser takes a duplicate; `dev` stays to watch the connection.
    let notifier = fs.notifier_slot();
    let session = dev
        .try_clone()
        .and_then(|fd| fuser::Session::from_fd(fs, OwnedFd::from(fd), acl, config))
        .map_err(|e| {
            let _ = nix::mount::umount2(&mnt, MntFlags::MNT_DETACH);
            Failure::Mount(format!("FUSE handshake on {} failed: {e}", mnt.display()))
        })?;
    let _ = notifier.set(session.notifier());
    if o.read_write {
        let interval = o
            .sync_interval
            .map_or("off".to_string(), |i| format!("{} s", i.as_secs()));
        let kind = match &over {
            Some(device) if !block_device => format!(", fuseblk over {}", device.display()),
            Some(_) => ", fuseblk".to_string(),
            None => String::new(),
        };
        log::info!(
            "mounted {}@{} on {} read-write (sync_interval {interval}{kind})",
            image.display(),
            req.label,
            mnt.display()
        );
    } else {
        log::info!(
            "mounted {source}@{} on {} read-only",
            req.label,
            mnt.display()
        );
    }
    Ok(Some((session, dev, mnt, fs_dev, rw, reader)))
}

/// The session's threads, and one that turns blocked signals into events.
fn start_threads(
    session: fuser::Session<Hammer2Fs>,
    signals: SigSet,
) -> Result<mpsc::Receiver<Event>, Failure> {
    let (tx, rx) = mpsc::channel();
    let tx_session = tx.clone();
    thread::Builder::new()
        .name("session".into())
        .spawn(move || {
            let r = session.run();
            let _ = tx_session.send(Event::Ended(r));
        })
        .map_err(|e| Failure::System(format!("cannot start the session: {e}")))?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match signals.wait() {
                Ok(sig) => {
                    if tx.send(Event::Signal(sig)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    log::error!("sigwait: {e}");
                    return;
                }
            }
        })
        .map_err(|e| Failure::System(format!("cannot start the signal thread: {e}")))?;
    Ok(rx)
}

/// Until the session ends: by an outside umount, or by ours after a
/// signal; a second signal does not wait for a busy mount.
fn wait_for_end(
    events: &mpsc::Receiver<Event>,
    mnt: &Path,
    fs_dev: Option<u64>,
    dev: &File,
) -> Result<(), Failure> {
    let mut unmounting = false;
    loop {
        let event = events
            .recv()
            .map_err(|_| Failure::System("the session ended without a word".into()))?;
        match event {
            Event::Ended(Ok(())) => {
                log::info!("{} unmounted", mnt.display());
                return Ok(());
            }
            Event::Ended(Err(e)) if unmounting && e.raw_os_error() == Some(libc::ECONNABORTED) => {
                // After our detach, the kernel may end the connection of
                // the last close by aborting it rather than unmounting it:
                // either way it is the end asked for.
                log::info!("{} unmounted (connection closed)", mnt.display());
                return Ok(());
            }
            Event::Ended(Err(e)) => {
                return Err(Failure::System(format!("FUSE session failed: {e}")));
            }
            Event::Signal(sig) if !unmounting => {
                log::info!("{sig}: unmounting {}", mnt.display());
                unmounting = true;
                unmount(mnt, fs_dev, dev)?;
            }
            Event::Signal(sig) => {
                log::warn!(
                    "{sig} again: exiting; files still open on {} fail from now on",
                    mnt.display()
                );
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_split_at_the_last_at_sign() {
        let (i, l) = split_source("disk.img").unwrap();
        assert_eq!((i.to_str().unwrap(), l.as_str()), ("disk.img", "DATA"));
        let (i, l) = split_source("/x/disk.img@SNAP1").unwrap();
        assert_eq!((i.to_str().unwrap(), l.as_str()), ("/x/disk.img", "SNAP1"));
        let (i, l) = split_source("/a@b/disk.img").unwrap();
        assert_eq!((i.to_str().unwrap(), l.as_str()), ("/a@b/disk.img", "DATA"));
        let (i, l) = split_source("/a@b/disk.img@LOCAL").unwrap();
        assert_eq!(
            (i.to_str().unwrap(), l.as_str()),
            ("/a@b/disk.img", "LOCAL")
        );
        assert!(split_source("disk.img@").is_err());
        assert!(split_source("@DATA").is_err());
    }

    /// An eighth for metadata, the rest (2 MiB multiples, 4 MiB at
    /// least) for pages, of which dirty data may take a quarter of the
    /// whole (at most 256 MiB and a quarter of the pages).
    #[test]
    fn the_budget_is_shared_by_pages_and_metadata_and_dirty_data_is_on_the_pages() {
        const M: u64 = 1 << 20;
        let b = Budget::read_write(64 * M);
        assert_eq!((b.pages, b.dirty, b.metadata), (56 * M, 14 * M, 8 * M));
        let b = Budget::read_write(4096 * M);
        assert_eq!((b.pages, b.dirty, b.metadata), (3584 * M, 256 * M, 512 * M));
        let b = Budget::read_write(100 * M);
        assert_eq!(
            (b.pages, b.dirty, b.metadata),
            (86 * M, 86 * M / 4, 12 * M + M / 2)
        );
        let b = Budget::read_write(4 * M);
        assert_eq!((b.pages, b.dirty, b.metadata), (4 * M, M, M / 2));
        let b = Budget::read_write(6 * M);
        assert_eq!((b.pages, b.dirty, b.metadata), (4 * M, M, 6 * M / 8));
    }
}
