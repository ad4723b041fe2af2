//! Block devices and the buffer cache.
//!
//! `BlockDevice` is the seam every layer above reads and writes through:
//! a file or block device (`FileDevice`), memory (`MemDevice`), and for
//! crash and failure tests a recording device (`RecordingDevice`) and a
//! fault injector (`FaultDevice`). The buffer cache (`BufCache`) keeps
//! 64 KiB buffers on `vmglue` pages, under the page layer's memory budget.
//!
//! Modules: `device` (the trait, file and memory devices), `cached` (a
//! `BlockDevice` through the cache), `recording`
//! (recording and fault devices), `backing` (where an image's bytes
//! live, whatever it is named: file, loop device, partition),
//! `imagelock` (the locks every writer of an image holds, on those
//! bytes, and waiting for a mount that is ending), `logwrites` (a device that
//! logs every write, barrier and mark to a file, as dm-log-writes, and its
//! replay), `cache` (getblk, bread, releases,
//! read-ahead, dirty accounting), `flush` (the coalescing writer, flush and
//! barrier, throttling, the flusher thread), `aio` (Linux native AIO for
//! a direct file's batches of writes: the crate's one `unsafe`), `error`.

#![deny(unsafe_code)]

mod aio;
pub mod aligned;
pub mod backing;
mod cache;
pub mod cached;
pub mod device;
mod error;
mod flush;
pub mod imagelock;
pub mod logwrites;
pub mod nbd;
pub mod partition;
pub mod recording;
pub mod source;

pub use cache::{
    parse_cache_size, Buf, BufCache, BufCacheConfig, BufRef, BufShared, CacheStats, CLUSTER_MAX,
};
pub use cached::CachedDevice;
pub use device::{BlockDevice, FileDevice, MemDevice};
pub use error::{Error, Result};
pub use logwrites::LogWritesDevice;
pub use recording::{Event, FaultDevice, RecordingDevice};
pub use vmglue::{AllocClass, AnonPage, Vm, VmConfig, FRAME_BYTES};
