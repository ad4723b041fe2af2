//! Page queues: FREE, CACHE, INACTIVE and ACTIVE, each split over a few
//! colors. A page's color is fixed (its index modulo the color count) and
//! one mutex per color guards that color's four lists and the links and
//! `queue` field of its pages. The color mutexes are the page layer's
//! "spin-locks": nothing else is taken while one is held except a busy
//! wait bucket (for a wakeup), and no two are held at once.
//!
//! Also here: the requeue stack, a lock-free stack (push, take-all) where
//! the last unwire of a page that a scan had dequeued leaves it, so that
//! unwiring takes no lock. Pageout drains it into ACTIVE.

#![forbid(unsafe_code)]

use crate::page::{Page, Queue, LISTS, NIL, PG_IN_PENDING, QUEUE_STATES};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// One doubly linked list of page indices.
#[derive(Clone, Copy, Debug)]
pub(crate) struct List {
    pub head: u32,
    pub tail: u32,
    pub len: usize,
}

impl List {
    const EMPTY: List = List {
        head: NIL,
        tail: NIL,
        len: 0,
    };
}

/// The four lists of one color.
pub(crate) struct ColorLists {
    lists: [List; LISTS],
}

/// One color: its lock, padded to a cache line pair.
#[repr(align(128))]
pub(crate) struct Color {
    lists: Mutex<ColorLists>,
}

/// All colors plus the global per-queue counters (read without locks for
/// targets and reserve checks, changed only under a color lock).
pub(crate) struct Queues {
    colors: Box<[Color]>,
    counts: [AtomicUsize; QUEUE_STATES],
    pending_head: AtomicU32,
}

/// A locked color, with the page array to follow links.
pub(crate) struct Locked<'a> {
    guard: MutexGuard<'a, ColorLists>,
    pages: &'a [Page],
    counts: &'a [AtomicUsize; QUEUE_STATES],
}

impl Queues {
    pub fn new(colors: usize) -> Queues {
        Queues {
            colors: (0..colors)
                .map(|_| Color {
                    lists: Mutex::new(ColorLists {
                        lists: [List::EMPTY; LISTS],
                    }),
                })
                .collect(),
            counts: Default::default(),
            pending_head: AtomicU32::new(NIL),
        }
    }

    pub fn colors(&self) -> usize {
        self.colors.len()
    }

    pub fn color_of(&self, idx: u32) -> usize {
        idx as usize % self.colors.len()
    }

    /// Lock color `c`. A poisoned lock is taken anyway: every list
    /// operation leaves the lists consistent before it can panic.
    pub fn lock<'a>(&'a self, c: usize, pages: &'a [Page]) -> Locked<'a> {
        let guard = self.colors[c]
            .lists
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        Locked {
            guard,
            pages,
            counts: &self.counts,
        }
    }

    pub fn lock_page<'a>(&'a self, idx: u32, pages: &'a [Page]) -> Locked<'a> {
        self.lock(self.color_of(idx), pages)
    }

    /// Pages on queue `q` (all colors), without locking.
    pub fn count(&self, q: Queue) -> usize {
        self.counts[q as usize].load(Ordering::Relaxed)
    }

    /// Account a page entering (`+1`) or leaving a non-list state
    /// (None, Pending, Offline). Lists account themselves.
    pub fn count_add(&self, q: Queue) {
        self.counts[q as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_sub(&self, q: Queue) {
        self.counts[q as usize].fetch_sub(1, Ordering::Relaxed);
    }

    /// Push page `idx` onto the requeue stack; lock-free. The caller has
    /// just moved the page from `Wired` to `Pending`. If the page is still
    /// in the stack from an earlier push, it is not pushed again: the
    /// drainer rechecks `queue` after clearing `PG_IN_PENDING`.
    pub fn pending_push(&self, pages: &[Page], idx: u32) {
        let page = &pages[idx as usize];
        if page.flags.fetch_or(PG_IN_PENDING, Ordering::SeqCst) & PG_IN_PENDING != 0 {
            return;
        }
        let mut head = self.pending_head.load(Ordering::SeqCst);
        loop {
            page.pending_next.store(head, Ordering::SeqCst);
            match self.pending_head.compare_exchange_weak(
                head,
                idx,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return,
                Err(cur) => head = cur,
            }
        }
    }

    /// Take the whole requeue stack (no ABA: pops are take-all).
    pub fn pending_take(&self, pages: &[Page]) -> Vec<u32> {
        let mut idx = self.pending_head.swap(NIL, Ordering::SeqCst);
        let mut out = Vec::new();
        while idx != NIL {
            let page = &pages[idx as usize];
            let next = page.pending_next.load(Ordering::SeqCst);
            page.flags.fetch_and(!PG_IN_PENDING, Ordering::SeqCst);
            out.push(idx);
            idx = next;
        }
        out
    }
}

impl Locked<'_> {
    pub fn list(&self, q: Queue) -> &List {
        &self.guard.lists[q as usize]
    }

    pub fn head(&self, q: Queue) -> Option<u32> {
        let h = self.guard.lists[q as usize].head;
        (h != NIL).then_some(h)
    }

    #[cfg(test)]
    pub fn next_of(&self, idx: u32) -> Option<u32> {
        let n = self.pages[idx as usize].next.load(Ordering::Relaxed);
        (n != NIL).then_some(n)
    }

    /// Link page `idx` (on no list) at the head or the tail of list `q`.
    fn link(&mut self, q: Queue, idx: u32, at_head: bool) {
        assert!(q.is_list());
        let page = &self.pages[idx as usize];
        let cur = page.queue();
        assert!(
            !cur.is_list(),
            "page {idx} linked to {q:?} while on {cur:?}"
        );
        let list = &mut self.guard.lists[q as usize];
        let (prev, next) = if at_head {
            (NIL, list.head)
        } else {
            (list.tail, NIL)
        };
        page.prev.store(prev, Ordering::Relaxed);
        page.next.store(next, Ordering::Relaxed);
        match prev {
            NIL => list.head = idx,
            p => self.pages[p as usize].next.store(idx, Ordering::Relaxed),
        }
        match next {
            NIL => list.tail = idx,
            n => self.pages[n as usize].prev.store(idx, Ordering::Relaxed),
        }
        list.len += 1;
        page.set_queue(q);
        self.counts[q as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Unlink page `idx` from its list; its queue becomes `to` (a non-list
    /// state, counted).
    pub fn unlink(&mut self, idx: u32, to: Queue) {
        assert!(!to.is_list());
        let page = &self.pages[idx as usize];
        let q = page.queue();
        assert!(q.is_list(), "page {idx} unlinked while on {q:?}");
        let prev = page.prev.load(Ordering::Relaxed);
        let next = page.next.load(Ordering::Relaxed);
        let list = &mut self.guard.lists[q as usize];
        if prev == NIL {
            list.head = next;
        } else {
            self.pages[prev as usize]
                .next
                .store(next, Ordering::Relaxed);
        }
        if next == NIL {
            list.tail = prev;
        } else {
            self.pages[next as usize]
                .prev
                .store(prev, Ordering::Relaxed);
        }
        list.len -= 1;
        page.prev.store(NIL, Ordering::Relaxed);
        page.next.store(NIL, Ordering::Relaxed);
        self.counts[q as usize].fetch_sub(1, Ordering::Relaxed);
        page.set_queue(to);
        self.counts[to as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Move page `idx` from a non-list state to the head of list `q`.
    pub fn enter_head(&mut self, q: Queue, idx: u32) {
        self.enter_at(q, idx, true);
    }

    /// Move page `idx` from a non-list state to the tail of list `q`.
    pub fn enter(&mut self, q: Queue, idx: u32) {
        self.enter_at(q, idx, false);
    }

    fn enter_at(&mut self, q: Queue, idx: u32, at_head: bool) {
        let from = self.pages[idx as usize].queue();
        assert!(!from.is_list());
        self.counts[from as usize].fetch_sub(1, Ordering::Relaxed);
        self.link(q, idx, at_head);
    }

    /// Move page `idx` between two non-list states (None, Pending,
    /// Offline, Wired), keeping the counters.
    pub fn shift(&mut self, idx: u32, to: Queue) {
        let page = &self.pages[idx as usize];
        let from = page.queue();
        assert!(!from.is_list() && !to.is_list());
        self.counts[from as usize].fetch_sub(1, Ordering::Relaxed);
        self.counts[to as usize].fetch_add(1, Ordering::Relaxed);
        page.set_queue(to);
    }

    /// Move page `idx` from whatever list it is on to the tail of `q`.
    pub fn requeue(&mut self, q: Queue, idx: u32) {
        self.unlink(idx, Queue::None);
        self.enter(q, idx);
    }

    /// Walk every list of this color, returning (queue, members) for a
    /// consistency check.
    pub fn walk(&self) -> Vec<(Queue, Vec<u32>, usize)> {
        let mut out = Vec::new();
        for q in [Queue::Free, Queue::Cache, Queue::Inactive, Queue::Active] {
            let list = self.guard.lists[q as usize];
            let mut members = Vec::new();
            let mut idx = list.head;
            let mut prev = NIL;
            while idx != NIL && members.len() <= self.pages.len() {
                let p = &self.pages[idx as usize];
                if p.prev.load(Ordering::Relaxed) != prev {
                    // Reported by the caller as a length mismatch.
                    members.push(NIL);
                    break;
                }
                members.push(idx);
                prev = idx;
                idx = p.next.load(Ordering::Relaxed);
            }
            if prev != list.tail && list.len != 0 {
                members.push(NIL);
            }
            out.push((q, members, list.len));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_link_unlink_and_count() {
        let pages: Vec<Page> = (0..8).map(|_| Page::new(Queue::None)).collect();
        let q = Queues::new(2);
        for _ in 0..8 {
            q.count_add(Queue::None);
        }
        let mut l = q.lock(0, &pages);
        for idx in [0u32, 2, 4, 6] {
            l.enter(Queue::Inactive, idx);
        }
        l.requeue(Queue::Active, 2);
        l.unlink(0, Queue::None);
        assert_eq!(l.head(Queue::Inactive), Some(4));
        assert_eq!(l.next_of(4), Some(6));
        assert_eq!(l.list(Queue::Inactive).len, 2);
        let walked = l.walk();
        assert_eq!(walked[2].1, vec![4, 6]);
        assert_eq!(walked[3].1, vec![2]);
        drop(l);
        assert_eq!(q.count(Queue::Inactive), 2);
        assert_eq!(q.count(Queue::Active), 1);
        assert_eq!(q.count(Queue::None), 5);
    }

    #[test]
    fn pending_stack_pushes_once_and_takes_all() {
        let pages: Vec<Page> = (0..4).map(|_| Page::new(Queue::None)).collect();
        let q = Queues::new(1);
        q.pending_push(&pages, 1);
        q.pending_push(&pages, 3);
        q.pending_push(&pages, 1);
        let mut got = q.pending_take(&pages);
        got.sort_unstable();
        assert_eq!(got, vec![1, 3]);
        assert!(q.pending_take(&pages).is_empty());
        q.pending_push(&pages, 1);
        assert_eq!(q.pending_take(&pages), vec![1]);
    }
}
