//! The one error type of the `hammer2` crate. Each variant names a
//! condition and carries where it happened; corrupt media is an error,
//! never a panic. The errno mapping lives once, in `fuse-mount`.

use std::fmt;
use std::io;

pub type Result<T> = std::result::Result<T, Error>;

/// Where a block sits in the filesystem, for error reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Where {
    /// The PFS label, where known.
    pub pfs: Option<String>,
    /// The inode number whose tree holds the block, where known.
    pub inum: Option<u64>,
    /// The file offset (data blocks) or key, where known.
    pub key: Option<u64>,
}

impl fmt::Display for Where {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.pfs {
            write!(f, " pfs {p}")?;
        }
        if let Some(i) = self.inum {
            write!(f, " inode {i}")?;
        }
        if let Some(k) = self.key {
            write!(f, " offset {k:#x}")?;
        }
        Ok(())
    }
}

#[derive(Debug)]
pub enum Error {
    /// A device read or write failed.
    Io {
        op: &'static str,
        at: u64,
        source: io::Error,
    },
    /// A structure on disk does not make sense.
    Corrupt {
        what: String,
        at: u64,
    },
    /// A block's check code does not match its bytes.
    CheckMismatch {
        at: u64,
        method: u8,
        expected: String,
        actual: String,
        place: Where,
    },
    /// A compressed block does not decompress.
    Decompress {
        at: u64,
        method: u8,
        detail: String,
        place: Where,
    },
    /// A method this build cannot handle.
    Unsupported {
        what: String,
        at: u64,
    },
    /// No such file, directory, PFS or label.
    NotFound {
        what: String,
    },
    NotDir {
        what: String,
    },
    IsDir {
        what: String,
    },
    NotSymlink {
        what: String,
    },
    NameTooLong {
        len: usize,
    },
    /// A caller's argument is out of range.
    InvalidArgument {
        what: String,
    },
    /// Symlink loops or too many levels.
    TooManyLinks {
        what: String,
    },
    /// The name already exists.
    Exists {
        what: String,
    },
    /// A directory to remove or replace is not empty.
    NotEmpty {
        what: String,
    },
    /// The freemap has no room for an allocation of `bytes` (or only
    /// room the flush reserve holds back); `free` is what was free.
    NoSpace {
        bytes: u64,
        free: u64,
    },
    /// Every key of a name's hash collision range (32768 names with one
    /// hash) is taken in its directory.
    CollisionSpaceFull {
        what: String,
    },
    /// A device write or barrier failed earlier; writes are refused
    /// until the image is opened again.
    Poisoned {
        why: String,
    },
    /// The image or PFS is open read-only.
    ReadOnly,
    /// The object is in use (a PFS with open files).
    Busy {
        what: String,
    },
    /// Under `volume::cache_only`: the block at `at` is not in memory,
    /// and reading it would wait for the device. Nothing was changed; the
    /// caller reads `bytes` at `at` holding no lock and tries again.
    WouldBlock {
        at: u64,
        bytes: u64,
    },
}

impl Error {
    pub fn corrupt(what: String, at: u64) -> Error {
        Error::Corrupt { what, at }
    }

    /// The image offset the error concerns, where it has one.
    pub fn offset(&self) -> Option<u64> {
        match self {
            Error::Io { at, .. }
            | Error::Corrupt { at, .. }
            | Error::CheckMismatch { at, .. }
            | Error::Decompress { at, .. }
            | Error::Unsupported { at, .. } => Some(*at),
            _ => None,
        }
    }

    /// Add the inode and file offset to a block-level error.
    pub fn with_place(mut self, pfs: Option<&str>, inum: Option<u64>, key: Option<u64>) -> Error {
        if let Error::CheckMismatch { place, .. } | Error::Decompress { place, .. } = &mut self {
            if place.pfs.is_none() {
                place.pfs = pfs.map(str::to_string);
            }
            if place.inum.is_none() {
                place.inum = inum;
            }
            if place.key.is_none() {
                place.key = key;
            }
        }
        self
    }

    /// True for damage found on the media (as opposed to I/O or usage).
    pub fn is_media_damage(&self) -> bool {
        matches!(
            self,
            Error::Corrupt { .. } | Error::CheckMismatch { .. } | Error::Decompress { .. }
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { op, at, source } => write!(f, "I/O error on {op} at {at:#x}: {source}"),
            Error::WouldBlock { at, bytes } => write!(
                f,
                "{bytes} bytes at {at:#x} are not cached (read them without the mount locked)"
            ),
            Error::Corrupt { what, at } => write!(f, "corrupt at {at:#x}: {what}"),
            Error::CheckMismatch {
                at,
                method,
                expected,
                actual,
                place,
            } => write!(
                f,
                "check code mismatch at {at:#x} ({}): stored {expected}, computed {actual}{place}",
                crate::check::method_name(*method).unwrap_or("unknown")
            ),
            Error::Decompress {
                at,
                method,
                detail,
                place,
            } => write!(
                f,
                "cannot decompress block at {at:#x} ({}): {detail}{place}",
                crate::compress::method_name(*method).unwrap_or("unknown")
            ),
            Error::Unsupported { what, at } => write!(f, "unsupported at {at:#x}: {what}"),
            Error::NotFound { what } => write!(f, "{what}: not found"),
            Error::NotDir { what } => write!(f, "{what}: not a directory"),
            Error::IsDir { what } => write!(f, "{what}: is a directory"),
            Error::NotSymlink { what } => write!(f, "{what}: not a symbolic link"),
            Error::NameTooLong { len } => write!(f, "name of {len} bytes is too long"),
            Error::InvalidArgument { what } => write!(f, "invalid argument: {what}"),
            Error::TooManyLinks { what } => write!(f, "{what}: too many levels of symbolic links"),
            Error::Exists { what } => write!(f, "{what}: already exists"),
            Error::NotEmpty { what } => write!(f, "{what}: directory not empty"),
            Error::NoSpace { bytes, free } => write!(
                f,
                "no space for an allocation of {bytes} bytes ({free} bytes free)"
            ),
            Error::CollisionSpaceFull { what } => {
                write!(f, "{what}: directory hash collision space is full")
            }
            Error::Poisoned { why } => {
                write!(f, "writes refused after an earlier device failure: {why}")
            }
            Error::ReadOnly => write!(f, "read-only"),
            Error::Busy { what } => write!(f, "{what}: busy"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
