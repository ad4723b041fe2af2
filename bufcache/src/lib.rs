//! Block devices and the buffer cache.
//!
//! `BlockDevice` is the seam every layer above reads and writes through:
//! a file or block device (`FileDevice`), memory (`MemDevice`), and later a
//! recording device for crash tests. The buffer cache sits on top of it
//! and on `vmglue`'s pages.

#![forbid(unsafe_code)]

pub mod device;

pub use device::{BlockDevice, FileDevice, MemDevice};
