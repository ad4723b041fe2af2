//! Readers outside the mount's lock, and the frees that wait for them.
//!
//! A read takes its plan (pending blocks, blockrefs) under the mount's
//! lock and reads the blocks without it (`inode::ReadPlan`). A block the
//! plan names may meanwhile leave the tree and be queued for freeing; it
//! must not be handed out again (and overwritten) while a reader that
//! planned before it left may still read it. Each reader holds a
//! `ReadTicket` from planning until its reads are done. The gate counts
//! tickets by epoch, with two counters, as RCU counts readers by grace
//! period: the epoch advances at a commit only when every ticket of the
//! previous epoch is gone, and the blocks dropped through the commit at
//! the last advance may then be freed (`Mount::frees_allowed_through`).
//! With no ticket out at all, everything committed may be freed at once.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// The epoch counter and the tickets out in each of the two latest
/// epochs.
#[derive(Debug, Default)]
pub struct ReadGate {
    epoch: AtomicU64,
    active: [AtomicUsize; 2],
}

/// A reader's hold on the blocks its plan names: frees of blocks that
/// left the tree after the plan was taken wait until it is dropped.
#[derive(Debug)]
pub struct ReadTicket {
    gate: Arc<ReadGate>,
    parity: usize,
}

impl ReadGate {
    /// A ticket in the current epoch. Take it under the mount's lock,
    /// with the plan.
    pub fn ticket(self: &Arc<Self>) -> ReadTicket {
        loop {
            let e = self.epoch.load(Ordering::SeqCst);
            let parity = (e & 1) as usize;
            self.active[parity].fetch_add(1, Ordering::SeqCst);
            if self.epoch.load(Ordering::SeqCst) == e {
                return ReadTicket {
                    gate: self.clone(),
                    parity,
                };
            }
            self.active[parity].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// No ticket is out.
    pub fn idle(&self) -> bool {
        self.active[0].load(Ordering::SeqCst) == 0 && self.active[1].load(Ordering::SeqCst) == 0
    }

    /// Advance the epoch if every ticket of the previous one is gone;
    /// true when it advanced. Called under the mount's lock.
    pub fn try_advance(&self) -> bool {
        let e = self.epoch.load(Ordering::SeqCst);
        let previous = ((e + 1) & 1) as usize;
        if self.active[previous].load(Ordering::SeqCst) != 0 {
            return false;
        }
        self.epoch.store(e + 1, Ordering::SeqCst);
        true
    }
}

impl ReadGate {
    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Every ticket taken in epoch `e` or before is gone for good: the
    /// epoch advanced twice since (each advance waits for the tickets of
    /// the epoch before the one it leaves). Advances as far as it can
    /// to get there; called under the mount's lock.
    pub fn passed(&self, e: u64) -> bool {
        while self.epoch() < e + 2 {
            if !self.try_advance() {
                return false;
            }
        }
        true
    }
}

impl Drop for ReadTicket {
    fn drop(&mut self) {
        self.gate.active[self.parity].fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ticket blocks the advance after the one that made it old; the
    /// advance goes on once it is dropped; new tickets never block the
    /// first advance.
    #[test]
    fn an_old_ticket_holds_the_second_advance() {
        let g = Arc::new(ReadGate::default());
        assert!(g.idle());
        let old = g.ticket();
        assert!(!g.idle());
        assert!(g.try_advance(), "the previous epoch had no ticket");
        let new = g.ticket();
        assert!(!g.try_advance(), "the ticket of the previous epoch is out");
        drop(old);
        assert!(g.try_advance());
        assert!(!g.try_advance(), "now `new` is of the previous epoch");
        drop(new);
        assert!(g.try_advance());
        assert!(g.idle());
        // `passed`: a ticket of epoch `e` holds it; once gone, it stays
        // passed even when new tickets come.
        let e = g.epoch();
        let t = g.ticket();
        assert!(!g.passed(e));
        drop(t);
        assert!(g.passed(e));
        let _new = g.ticket();
        assert!(g.passed(e));
    }
}
