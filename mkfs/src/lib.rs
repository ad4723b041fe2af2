//! The command-line tools' library side: `newfs` (the format logic of
//! `mkfs.hammer2`), `units` (size parsing and human figures) and
//! `progress` (the progress line of long runs). The
//! binaries in `src/bin` parse arguments, open devices and print;
//! everything a test wants to drive lives here.

#![forbid(unsafe_code)]

pub mod newfs;
pub mod progress;
pub mod units;
