//! The buffer cache's one error type.

use std::fmt;
use std::io;

#[derive(Debug)]
pub enum Error {
    /// The request is empty, crosses a 64 KiB buffer, or ends past the
    /// device.
    Range {
        offset: u64,
        len: usize,
        device_size: u64,
    },
    /// A device read failed; only this buffer is affected.
    Read { offset: u64, source: io::Error },
    /// A device write failed; the cache is now poisoned.
    Write {
        offset: u64,
        len: usize,
        source: io::Error,
    },
    /// A barrier (fdatasync) failed; the cache is now poisoned.
    Barrier { source: io::Error },
    /// An earlier write or barrier failed: writes are refused until the
    /// cache is reopened.
    Poisoned { cause: String },
    /// Dirty data stayed above its limit for the whole throttle wait.
    Throttled { dirty_bytes: u64, waited_ms: u64 },
    /// The flusher thread could not be started.
    FlusherSpawn { source: io::Error },
    /// The page layer refused (out of pages, bad budget, ...).
    Vm(vmglue::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A shortage of the page layer (no free page within the wait, dirty
    /// data over its limit for the whole throttle): nothing failed on
    /// the device, and the same request may succeed later.
    pub fn is_resource(&self) -> bool {
        matches!(
            self,
            Error::Throttled { .. }
                | Error::Vm(vmglue::Error::NoFreePages { .. })
                | Error::Vm(vmglue::Error::WouldBlock { .. })
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Range {
                offset,
                len,
                device_size,
            } => write!(
                f,
                "buffer request of {len} bytes at {offset:#x} is empty, crosses a 64 KiB \
                 buffer or ends past the device ({device_size:#x} bytes)"
            ),
            Error::Read { offset, source } => write!(f, "read at {offset:#x} failed: {source}"),
            Error::Write {
                offset,
                len,
                source,
            } => write!(f, "write of {len} bytes at {offset:#x} failed: {source}"),
            Error::Barrier { source } => write!(f, "barrier failed: {source}"),
            Error::Poisoned { cause } => {
                write!(f, "buffer cache refuses writes after an I/O error: {cause}")
            }
            Error::Throttled {
                dirty_bytes,
                waited_ms,
            } => write!(
                f,
                "dirty data stayed at {dirty_bytes} bytes for {waited_ms} ms of throttling"
            ),
            Error::FlusherSpawn { source } => {
                write!(f, "starting the flusher thread failed: {source}")
            }
            Error::Vm(e) => write!(f, "page layer: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Read { source, .. }
            | Error::Write { source, .. }
            | Error::Barrier { source }
            | Error::FlusherSpawn { source } => Some(source),
            Error::Vm(e) => Some(e),
            _ => None,
        }
    }
}

impl From<vmglue::Error> for Error {
    fn from(e: vmglue::Error) -> Error {
        Error::Vm(e)
    }
}
