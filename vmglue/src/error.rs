//! The page layer's one error type.

#![forbid(unsafe_code)]

use crate::page::ObjectId;
use std::fmt;
use std::io;

/// Which reserve tier an allocation may dig into (see `alloc.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocClass {
    /// Ordinary callers: stops short of both reserves.
    Normal,
    /// The flush path (writing dirty buffers): may use the flush reserve.
    Flush,
    /// The pageout path: may use every free page.
    Pageout,
}

#[derive(Debug)]
pub enum Error {
    /// The budget is below the smallest that can run (reserves + one segment).
    BudgetTooSmall { budget_bytes: u64, min_bytes: u64 },
    /// The arena size overflows the address space.
    BudgetTooLarge { frames: usize },
    /// `set_budget` beyond the arena reserved at creation.
    BudgetAboveMax { budget_bytes: u64, max_bytes: u64 },
    /// The anonymous mapping for the arena could not be made.
    ArenaMap { bytes: usize, source: io::Error },
    /// Giving frames back to the kernel failed.
    Madvise {
        offset: usize,
        len: usize,
        source: io::Error,
    },
    /// Every object number is in use.
    ObjectsExhausted,
    /// The object was never created or was destroyed.
    UnknownObject { object: ObjectId },
    /// The object still has pages in use (busy, held or wired).
    ObjectBusy { object: ObjectId, pages: usize },
    /// No page could be had within the wait limit: the budget is taken by
    /// wired or busy pages, or pageout cannot keep up.
    NoFreePages {
        class: AllocClass,
        waited_ms: u64,
        online_pages: usize,
        wired_pages: usize,
    },
    /// A non-waiting allocation found the free reserve exhausted.
    WouldBlock { class: AllocClass },
    /// Anonymous pages already take half the online pages, the most they
    /// may (`Vm::alloc_anon`).
    AnonLimit {
        anon_pages: usize,
        online_pages: usize,
    },
    /// The pageout or the prefault thread (`thread`) could not be
    /// started.
    PageoutSpawn {
        thread: &'static str,
        source: io::Error,
    },
    /// `Vm::verify` found a broken invariant.
    Invariant { what: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BudgetTooSmall {
                budget_bytes,
                min_bytes,
            } => write!(
                f,
                "page budget {budget_bytes} bytes is below the minimum {min_bytes}"
            ),
            Error::BudgetTooLarge { frames } => {
                write!(
                    f,
                    "page budget of {frames} frames overflows the address space"
                )
            }
            Error::BudgetAboveMax {
                budget_bytes,
                max_bytes,
            } => write!(
                f,
                "page budget {budget_bytes} bytes exceeds the arena reserved ({max_bytes} bytes)"
            ),
            Error::ArenaMap { bytes, source } => {
                write!(f, "mapping a {bytes}-byte frame arena failed: {source}")
            }
            Error::Madvise {
                offset,
                len,
                source,
            } => write!(
                f,
                "releasing {len} bytes at arena offset {offset:#x} failed: {source}"
            ),
            Error::ObjectsExhausted => write!(f, "all page object numbers are in use"),
            Error::UnknownObject { object } => write!(f, "page object {} does not exist", object.0),
            Error::ObjectBusy { object, pages } => {
                write!(f, "page object {} still has {pages} pages in use", object.0)
            }
            Error::NoFreePages {
                class,
                waited_ms,
                online_pages,
                wired_pages,
            } => write!(
                f,
                "no free page for a {class:?} allocation after {waited_ms} ms \
                 ({online_pages} pages online, {wired_pages} wired)"
            ),
            Error::WouldBlock { class } => {
                write!(f, "no free page for a {class:?} allocation without waiting")
            }
            Error::AnonLimit {
                anon_pages,
                online_pages,
            } => write!(
                f,
                "{anon_pages} anonymous pages already, the most {online_pages} online pages allow"
            ),
            Error::PageoutSpawn { thread, source } => {
                write!(f, "starting the {thread} thread failed: {source}")
            }
            Error::Invariant { what } => write!(f, "page layer invariant broken: {what}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::ArenaMap { source, .. }
            | Error::Madvise { source, .. }
            | Error::PageoutSpawn { source, .. } => Some(source),
            _ => None,
        }
    }
}
