//! `mount.hammer2`: a HAMMER2 image served over FUSE, read-only or
//! read-write. The only crate that knows FUSE.
//!
//! - `vnops`: the `fuser::Filesystem` impl over one PFS (DragonFly's
//!   `hammer2_vnops.c`): `hammer2::Pfs` read-only, `hammer2::mount::Mount`
//!   read-write.
//! - `store`: the one trait over the read-only store (`hammer2::Pfs`)
//!   and the read-write one (`hammer2::mount::Mount`) the operations
//!   call.
//! - `rw`: a read-write mount's shared state: the `Mount` behind its transaction lock,
//!   the image lock, the flusher.
//! - `snapdir`: `-o snapdir`, the snapshots read-only under `.snapshot`,
//!   a layer of its own.
//! - `route`: which layer (the store, or `.snapshot`) answers a node id.
//! - `inode`: node ids, the table of inodes the kernel holds, attributes.
//! - `cookie`: readdir offsets from directory keys.
//! - `ctl`: the control channel the `hammer2` tool talks to (ioctls).
//! - `dirlinks`: POSIX link counts for directories.
//! - `perm`: the permission rules (mode bits, sticky directories,
//!   chmod/chown/utimes, set-id bits, protected hardlinks).
//! - `atime`: when reads update access times (relatime, strictatime,
//!   noatime).
//! - `errno`: the one mapping from `hammer2::Error` to an errno.
//! - `options`: `-o` options as mount(8) and fstab pass them.
//! - `mount`: opening the image, mounting, serving, unmounting on signals.
//! - `bind`: a second mount of a PFS served read-write, as a bind mount.
//! - `loopdev`: a loop device over an image file, for a fuseblk mount
//!   (the one module with `unsafe`: two ioctls std and nix lack).
//! - `logging`: stderr, then syslog once a background mount is up.

// Denied (the workspace lint), not forbidden: `loopdev` allows it.
#![deny(unsafe_code)]

pub mod atime;
pub mod bind;
pub mod cookie;
pub mod ctl;
pub mod dirlinks;
pub mod errno;
pub mod inode;
pub mod logging;
pub mod loopdev;
pub mod mount;
pub mod options;
pub mod perm;
pub mod remount;
pub mod route;
pub mod rw;
pub mod snapdir;
pub mod store;
pub mod vnops;

pub use errno::errno;
