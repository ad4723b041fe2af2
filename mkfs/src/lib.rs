//! The command-line tools' library side: `newfs` (behind `mkfs.hammer2`).
//! The binaries in `src/bin` only parse arguments, open devices and
//! print; everything a test wants to drive lives here.

#![forbid(unsafe_code)]

pub mod newfs;
