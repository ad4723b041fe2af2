//! HAMMER2 for Linux: DragonFly BSD's copy-on-write filesystem, on-disk
//! compatible with format versions 1 and 2 (single volume).
//!
//! Layers, bottom up: `disk` (the on-disk structures), `check` and
//! `compress` (block codes), `dirhash`; then the read engine (`volume`,
//! `chain`, `inode`, `pfs`) over a `bufcache::BlockDevice`; and `fsck`,
//! the checker behind `fsck.hammer2`, and `repair`, its repairs (`-p`,
//! `-y`); the write side (`mount`, `flush`,
//! `alloc`), PFS administration and snapshots (`pfsops`) and `bulkfree`;
//! `ctl`, the wire protocol of the control channel between the `hammer2`
//! tool and a running mount.

#![forbid(unsafe_code)]

pub mod alloc;
pub mod bulkfree;
pub mod check;
pub mod compress;
pub mod databuf;
pub mod dedup;
mod depend;
pub mod dirhash;
pub mod disk;
pub mod error;
pub mod flush;
pub mod freemap;
pub mod fsck;
pub mod inode;
pub mod mount;
pub mod orphans;
pub mod pfsops;
pub mod readgate;
pub mod repair;
pub mod reserve;
pub mod setmethods;
pub mod strategy;

pub use error::{Error, Result};
pub mod blocktable;
pub mod chain;
pub mod ctl;
pub mod pfs;
pub mod volume;

pub use pfs::{DirEntry, Inode, Pfs, PfsInfo};
pub use volume::Volume;
