//! A mount's life: open the image and the PFS, check the mountpoint and
//! /dev/fuse, mount, say so (`ready`), serve until unmounted, and unmount
//! on SIGTERM, SIGINT or SIGHUP.
//!
//! Threads: `serve` blocks those signals in the calling thread before it
//! starts any other, so every thread inherits the mask and only the
//! signal thread (sigwait) sees them. The session runs on its own
//! threads; the calling thread waits for whichever comes first, a signal
//! or the end of the session (an outside `umount`). On a signal it
//! unmounts; if the mount is busy it detaches it (`MNT_DETACH`), which
//! leaves open files working, and the session ends when the last of them
//! is closed; a second signal ends the process at once.

use crate::options::Options;
use crate::vnops::Hammer2Fs;
use bufcache::{BlockDevice, FileDevice};
use hammer2::pfs::{pfs_list, Pfs};
use hammer2::Volume;
use nix::sys::signal::{SigSet, Signal};
use std::fmt;
use std::io;
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

/// The label used when `IMG` has no `@LABEL`.
pub const DEFAULT_LABEL: &str = "DATA";

/// Split `IMG[@LABEL]`. The label is what follows the last `@`, unless
/// that contains a `/` (then the `@` belongs to a directory name).
pub fn split_source(source: &str) -> Result<(PathBuf, String), Failure> {
    match source.rsplit_once('@') {
        Some((img, label)) if !label.contains('/') => {
            if img.is_empty() || label.is_empty() {
                return Err(Failure::Usage(format!(
                    "{source:?}: expected IMG or IMG@LABEL"
                )));
            }
            Ok((PathBuf::from(img), label.to_string()))
        }
        _ => Ok((PathBuf::from(source), DEFAULT_LABEL.to_string())),
    }
}

/// Open the image and its PFS `label`, with messages that say what is
/// wrong: not a file, not HAMMER2, no such label (listing those there
/// are).
pub fn open_pfs(image: &Path, label: &str) -> Result<Pfs, Failure> {
    let shown = image.display();
    let dev = FileDevice::open(image, false)
        .map_err(|e| Failure::Mount(format!("cannot open {shown}: {e}")))?;
    let dev: Arc<dyn BlockDevice> = Arc::new(dev);
    let vol = Volume::open(dev)
        .map_err(|e| Failure::Mount(format!("{shown} is not a usable HAMMER2 image: {e}")))?;
    let vol = Arc::new(vol);
    let mut labels: Vec<String> = pfs_list(&vol)
        .map_err(|e| Failure::Mount(format!("{shown}: cannot read the PFS list: {e}")))?
        .into_iter()
        .map(|p| p.label)
        .collect();
    if !labels.iter().any(|l| l == label) {
        labels.sort();
        let have = if labels.is_empty() {
            "it has none".to_string()
        } else {
            format!("it has: {}", labels.join(", "))
        };
        return Err(Failure::Mount(format!(
            "{shown} has no PFS labelled {label:?}; {have}"
        )));
    }
    Pfs::open(vol, label).map_err(|e| Failure::Mount(format!("{shown}@{label}: {e}")))
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

/// /dev/fuse must exist and open (fuser opens it again to mount).
fn check_dev_fuse() -> Result<(), Failure> {
    const DEV: &str = "/dev/fuse";
    match std::fs::OpenOptions::new().read(true).write(true).open(DEV) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Failure::Mount(format!(
            "{DEV} does not exist: load the fuse module (modprobe fuse), \
             or give the container the device"
        ))),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(Failure::Mount(format!(
            "cannot open {DEV}: permission denied (mount.hammer2 must run as root)"
        ))),
        Err(e) => Err(Failure::Mount(format!("cannot open {DEV}: {e}"))),
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

    let pfs = open_pfs(&req.image, &req.label)?;
    let mnt = check_mountpoint(&req.mountpoint)?;
    check_dev_fuse()?;

    let source = req.image.display().to_string();
    let config = req.options.fuser_config(&source, n_threads());
    let fs = Hammer2Fs::new(pfs, req.options.default_permissions);
    let mut session = fuser::Session::new(fs, &mnt, &config)
        .map_err(|e| Failure::Mount(format!("cannot mount on {}: {e}", mnt.display())))?;
    log::info!(
        "mounted {source}@{} on {} read-only",
        req.label,
        mnt.display()
    );
    ready();

    let mut unmounter = session.unmount_callable();
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

    let mut unmounting = false;
    loop {
        let event = rx
            .recv()
            .map_err(|_| Failure::System("the session ended without a word".into()))?;
        match event {
            Event::Ended(Ok(())) => {
                log::info!("{} unmounted", mnt.display());
                return Ok(());
            }
            Event::Ended(Err(e)) => {
                return Err(Failure::System(format!("FUSE session failed: {e}")));
            }
            Event::Signal(sig) if !unmounting => {
                log::info!("{sig}: unmounting {}", mnt.display());
                unmounting = true;
                if let Err(e) = unmounter.unmount() {
                    log::warn!(
                        "cannot unmount {} ({e}): detaching it; it goes away when the \
                         last file open on it is closed",
                        mnt.display()
                    );
                    if let Err(e) = nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH) {
                        return Err(Failure::System(format!(
                            "cannot detach {}: {e}",
                            mnt.display()
                        )));
                    }
                }
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
}
