//! The `hammer2` tool's side of the control channel: find out whether a
//! path is on a running mount.hammer2 (a mountpoint or any file or
//! directory under it) and send it requests (`hammer2::ctl`) as ioctls
//! on a descriptor of that path, as DragonFly's hammer2(8) does.

use crate::ctl_ioctl;
use hammer2::ctl::{DecodeError, Reply, Request, CTL_BUF};
use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// An open path on a hammer2 mount.
pub struct Channel {
    file: File,
    pub path: PathBuf,
}

/// How a control request failed.
#[derive(Debug)]
pub enum CtlError {
    /// The ioctl failed: the daemon is gone, or the path is not on a
    /// hammer2 mount.
    Io(io::Error),
    /// The reply did not decode (another protocol version...).
    Protocol(DecodeError),
    /// The daemon refused or the operation failed.
    Failed { errno: i32, message: String },
}

impl fmt::Display for CtlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CtlError::Io(e) => write!(f, "control request failed: {e}"),
            CtlError::Protocol(e) => write!(f, "{e}"),
            CtlError::Failed { message, .. } => write!(f, "{message}"),
        }
    }
}

impl CtlError {
    /// The errno the daemon or the kernel gave, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            CtlError::Io(e) => e.raw_os_error(),
            CtlError::Protocol(_) => None,
            CtlError::Failed { errno, .. } => Some(*errno),
        }
    }
}

impl Channel {
    /// `path` if it is on a FUSE mount that answers the control channel;
    /// `Ok(None)` if it does not exist or is not on a FUSE mount (then it
    /// names an image); an error if it is on a FUSE mount that is not
    /// hammer2's (or whose daemon does not answer).
    pub fn open(path: &Path) -> Result<Option<Channel>, String> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        match ctl_ioctl::on_fuse(&file) {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(e) => return Err(format!("{}: statfs: {e}", path.display())),
        }
        let ch = Channel {
            file,
            path: path.to_path_buf(),
        };
        match ch.call(&Request::MountInfo) {
            Ok(_) => Ok(Some(ch)),
            Err(CtlError::Io(e)) if e.raw_os_error() == Some(libc::ENOTTY) => Err(format!(
                "{} is on a FUSE mount that is not mount.hammer2's (or one too old to \
                 answer the control channel)",
                path.display()
            )),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Send one request and decode the reply; a reply carrying an errno
    /// becomes `CtlError::Failed`.
    pub fn call(&self, req: &Request) -> Result<Reply, CtlError> {
        let enc = req.encode().map_err(|_| CtlError::Failed {
            errno: libc::E2BIG,
            message: "request larger than a control buffer".into(),
        })?;
        let mut buf = [0u8; CTL_BUF];
        buf.copy_from_slice(&enc);
        ctl_ioctl::control(&self.file, &mut buf).map_err(CtlError::Io)?;
        match Reply::decode(req.op(), &buf).map_err(CtlError::Protocol)? {
            Reply::Error { errno, message } => Err(CtlError::Failed { errno, message }),
            r => Ok(r),
        }
    }
}
