//! The VM page layer: a frame arena with one page structure per frame,
//! wire/hold/busy state, page queues, a pageout daemon and a lockless page
//! hash. It knows nothing of files or HAMMER2: pages are bound to opaque
//! (object, index) keys and dirty pages reach storage through the `Pager`
//! trait that the layer above implements.
//!
//! Modules, one per subsystem (DragonFly's file names without `vm_`):
//! `anon` (pages owned by one holder, with no key),
//! `page` (the page structure and its atomic protocols), `arena` (the
//! mapping; most of the `unsafe`), `queue` (colored queues and the requeue
//! stack), `hash` (the lockless page hash), `index` (the authoritative
//! key -> page index), `wait` (sleeping on busy pages), `vm` (the `Vm`,
//! lookup, allocation, the page guards), `pageout` (the scans, laundering,
//! the daemon), `prefault` (frames made resident ahead of first use),
//! `budget` (shrinking and growing the budget), `stats`.

// The arena hands out frame slices from a raw mapping; that needs `unsafe`
// in `arena.rs`, at the marked frame-access sites of `vm.rs`, `anon.rs`,
// `pageout.rs` and `budget.rs`, and for the thread CPU clock in `stats.rs` (those
// modules deny `unsafe_code` and allow it site by site).
#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

mod anon;
mod arena;
mod budget;
mod error;
mod hash;
mod index;
mod page;
mod pageout;
mod prefault;
mod queue;
mod stats;
mod vm;
mod wait;

pub use anon::AnonPage;
pub use error::{AllocClass, Error, Result};
pub use page::{ObjectId, PageKey, Queue, BLOCKS_PER_FRAME, BLOCK_BYTES, FRAME_BYTES, INDEX_BITS};
pub use pageout::{LaunderPage, PageoutDaemon, PageoutReport, Pager};
pub use stats::{thread_cpu_time, LookupStats};
pub use vm::{Grab, PageBusy, PageHold, PageShared, Vm, VmConfig, VmStats, SEGMENT_FRAMES};
