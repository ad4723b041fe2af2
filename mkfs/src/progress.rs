//! One progress line on stderr for long runs (fsck, bulkfree): shown only
//! on a terminal, redrawn in place at most every 200 ms, erased at the end.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const INTERVAL: Duration = Duration::from_millis(200);

pub struct ProgressLine {
    enabled: bool,
    last: Instant,
    width: usize,
}

impl ProgressLine {
    /// A line that shows when `wanted` and stderr is a terminal.
    pub fn new(wanted: bool) -> ProgressLine {
        ProgressLine {
            enabled: wanted && std::io::stderr().is_terminal(),
            last: Instant::now(),
            width: 0,
        }
    }

    /// Redraw the line with `text()` if it is on and due.
    pub fn show(&mut self, text: impl FnOnce() -> String) {
        if !self.enabled || self.last.elapsed() < INTERVAL {
            return;
        }
        self.last = Instant::now();
        let t = text();
        self.width = self.width.max(t.len());
        eprint!("\r{t:w$}", w = self.width);
        let _ = std::io::stderr().flush();
    }

    /// Erase the line if anything was shown.
    pub fn clear(&self) {
        if self.width > 0 {
            eprint!("\r{:w$}\r", "", w = self.width);
        }
    }
}

/// `done` as a percentage of `total` (0 when the total is unknown).
pub fn percent(done: u64, total: u64) -> u64 {
    done.saturating_mul(100)
        .checked_div(total)
        .unwrap_or(0)
        .min(100)
}
