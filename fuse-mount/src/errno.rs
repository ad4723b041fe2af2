//! The one place a `hammer2::Error` becomes an errno. The `match` has no
//! catch-all arm, so a new library variant does not compile until it is
//! given an errno here. The original error is logged here too, at a level
//! that says how bad it is: damage and I/O errors at error level (the
//! library's `Display` carries the image offset and, for check-code and
//! decompression failures, the PFS, inode and file offset), expected
//! conditions (a name that does not exist) at debug level.

use hammer2::Error;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The errno a failed filesystem operation returns to the caller.
pub fn errno(e: &Error) -> i32 {
    match e {
        Error::NotFound { .. } => {
            log::debug!("{e}");
            libc::ENOENT
        }
        Error::NotDir { .. } => {
            log::debug!("{e}");
            libc::ENOTDIR
        }
        Error::IsDir { .. } => {
            log::debug!("{e}");
            libc::EISDIR
        }
        Error::NotSymlink { .. } => {
            log::debug!("{e}");
            libc::EINVAL
        }
        Error::NameTooLong { .. } => {
            log::debug!("{e}");
            libc::ENAMETOOLONG
        }
        Error::InvalidArgument { .. } => {
            log::debug!("{e}");
            libc::EINVAL
        }
        Error::TooManyLinks { .. } => {
            log::debug!("{e}");
            libc::ELOOP
        }
        // The buffer cache's page layer out of pages for the whole
        // wait: no device failed, the request may work again later.
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::OutOfMemory => {
            log::warn!("{e}");
            libc::EAGAIN
        }
        Error::Io { .. } => {
            log::error!("{e}");
            libc::EIO
        }
        Error::CheckMismatch { .. } | Error::Decompress { .. } | Error::Corrupt { .. } => {
            log::error!("damaged block: {e}");
            libc::EIO
        }
        Error::Unsupported { .. } => {
            log::warn!("{e}");
            libc::EOPNOTSUPP
        }
        Error::Exists { .. } => {
            log::debug!("{e}");
            libc::EEXIST
        }
        Error::NotEmpty { .. } => {
            log::debug!("{e}");
            libc::ENOTEMPTY
        }
        Error::NoSpace { .. } | Error::CollisionSpaceFull { .. } => {
            log::warn!("{e}");
            libc::ENOSPC
        }
        Error::Poisoned { .. } => {
            log::error!("{e}");
            libc::EIO
        }
        Error::Busy { .. } => {
            log::debug!("{e}");
            libc::EBUSY
        }
        Error::ReadOnly => {
            log::debug!("{e}");
            libc::EROFS
        }
        Error::Cancelled => {
            log::debug!("{e}");
            libc::EINTR
        }
        Error::WouldBlock { .. } => {
            // A block not in the cache under the mount's lock: the
            // operations map their errors inside `RwVolume::locked`,
            // which reads the block without the lock and runs them
            // again, so this is a retry, not a failure (no reply
            // carries it).
            log::debug!("{e}");
            libc::EAGAIN
        }
    }
}

/// The errors a mount's replies carried, counted for the unmount
/// summary; shared by the stores and the operations of one mount.
#[derive(Clone, Default)]
pub struct ErrorCount(Arc<AtomicU64>);

impl ErrorCount {
    /// The reply's errno for library error `e` (logged by `errno`),
    /// counted unless it is a cache miss under the lock, which
    /// `RwVolume::locked` retries.
    pub fn fail(&self, e: &Error) -> fuser::Errno {
        if !matches!(e, Error::WouldBlock { .. }) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fuser::Errno::from_i32(errno(e))
    }

    /// A library result, its error as the reply's errno.
    pub fn h<T>(&self, r: hammer2::Result<T>) -> Result<T, fuser::Errno> {
        r.map_err(|e| self.fail(&e))
    }

    /// How many so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hammer2::error::Where;

    #[test]
    fn conditions_map_to_their_errno() {
        let what = || "x".to_string();
        let cases = [
            (Error::NotFound { what: what() }, libc::ENOENT),
            (Error::NotDir { what: what() }, libc::ENOTDIR),
            (Error::IsDir { what: what() }, libc::EISDIR),
            (Error::NotSymlink { what: what() }, libc::EINVAL),
            (Error::NameTooLong { len: 300 }, libc::ENAMETOOLONG),
            (Error::InvalidArgument { what: what() }, libc::EINVAL),
            (Error::TooManyLinks { what: what() }, libc::ELOOP),
            (
                Error::Io {
                    op: "read",
                    at: 0x1000,
                    source: std::io::Error::other("gone"),
                },
                libc::EIO,
            ),
            (
                Error::Io {
                    op: "read",
                    at: 0x1000,
                    source: std::io::Error::new(
                        std::io::ErrorKind::OutOfMemory,
                        "page layer: no free page",
                    ),
                },
                libc::EAGAIN,
            ),
            (Error::corrupt(what(), 0x2000), libc::EIO),
            (
                Error::CheckMismatch {
                    at: 0x3000,
                    method: 4,
                    expected: "1".into(),
                    actual: "2".into(),
                    place: Where::default(),
                },
                libc::EIO,
            ),
            (
                Error::Decompress {
                    at: 0x4000,
                    method: 2,
                    detail: what(),
                    place: Where::default(),
                },
                libc::EIO,
            ),
            (
                Error::Unsupported {
                    what: what(),
                    at: 0,
                },
                libc::EOPNOTSUPP,
            ),
        ];
        for (e, want) in &cases {
            assert_eq!(errno(e), *want, "{e}");
        }
    }

    /// A cache miss under the lock is retried by `RwVolume::locked`:
    /// it is not one of the mount's errors; a device error is.
    #[test]
    fn a_retried_miss_is_not_counted() {
        let errors = ErrorCount::default();
        let miss = Error::WouldBlock {
            at: 0x10000,
            bytes: 65536,
        };
        assert_eq!(errors.fail(&miss), fuser::Errno::from_i32(libc::EAGAIN));
        assert_eq!(errors.get(), 0);
        let io = Error::Io {
            op: "read",
            at: 0x1000,
            source: std::io::Error::other("gone"),
        };
        assert_eq!(errors.fail(&io), fuser::Errno::from_i32(libc::EIO));
        assert_eq!(errors.get(), 1);
    }
}
