//! Access times on a read-write mount: when a read or a directory
//! listing updates an inode's atime (`-o relatime`, the default,
//! `strictatime`, `noatime`, `nodiratime`, as Linux's mount options).
//!
//! The kernel never updates a FUSE inode's atime itself (it marks them
//! S_NOATIME), so the daemon does, on the reads and listings that reach
//! it (`Mount::touch_atime`, which keeps the time in memory until a
//! flush happens anyway: an access never starts a flush). Reads the
//! kernel serves from its page cache never reach it; so an open whose
//! reads would update the atime (`Policy::due`) does not keep the
//! cache (no FOPEN_KEEP_CACHE), and its first read comes here. With
//! relatime that is the first open after a change or a day, so the
//! page cache is kept across opens otherwise; with strictatime it is
//! every open (each open's reads update the atime, not each read(2)
//! of data already cached by that open).

use hammer2::disk::{InodeMeta, ObjType};

/// A day in microseconds: relatime updates an atime at least this old.
const DAY_US: u64 = 24 * 3600 * 1_000_000;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Update when the atime is not newer than the mtime or ctime, or
    /// is a day old (Linux's default).
    #[default]
    Relatime,
    /// Update on every access.
    Strict,
    /// Never update.
    Never,
}

/// The atime rules of a mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// Directories too (`nodiratime` turns it off).
    pub dirs: bool,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            mode: Mode::Relatime,
            dirs: true,
        }
    }
}

impl Policy {
    /// Does an access at `now` (microseconds) update the atime of the
    /// inode `m`? As Linux's `atime_needs_update` and
    /// `relatime_need_update`.
    pub fn due(&self, m: &InodeMeta, now: u64) -> bool {
        if m.obj_type == ObjType::Directory && !self.dirs {
            return false;
        }
        if m.atime == now {
            return false;
        }
        match self.mode {
            Mode::Never => false,
            Mode::Strict => true,
            Mode::Relatime => {
                // Times are signed (before 1970 in two's complement).
                let (atime, now) = (m.atime as i64, now as i64);
                m.mtime as i64 >= atime
                    || m.ctime as i64 >= atime
                    || i128::from(now) - i128::from(atime) >= i128::from(DAY_US)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_700_000_000_000_000;

    fn meta(t: ObjType, atime: u64, mtime: u64, ctime: u64) -> InodeMeta {
        InodeMeta {
            obj_type: t,
            atime,
            mtime,
            ctime,
            ..InodeMeta::default()
        }
    }

    #[test]
    fn relatime_updates_after_a_change_or_a_day() {
        let p = Policy::default();
        let f = ObjType::Regfile;
        // New: all times equal.
        assert!(p.due(&meta(f, T, T, T), T + 1));
        // Read since the last change.
        assert!(!p.due(&meta(f, T + 5, T, T), T + 10));
        // Changed since the last read.
        assert!(p.due(&meta(f, T + 5, T + 6, T), T + 10));
        assert!(p.due(&meta(f, T + 5, T, T + 6), T + 10));
        // A day later.
        assert!(!p.due(&meta(f, T + 5, T, T), T + 5 + DAY_US - 1));
        assert!(p.due(&meta(f, T + 5, T, T), T + 5 + DAY_US));
        // Not to the same time.
        assert!(!p.due(&meta(f, T, T, T), T));
    }

    #[test]
    fn relatime_reads_times_before_1970_as_signed() {
        let p = Policy::default();
        let f = ObjType::Regfile;
        // 10 s before 1970, in two's complement as stored.
        let old = 0u64.wrapping_sub(10_000_000);
        // Changed (1970 + T) after the last read (before 1970).
        assert!(p.due(&meta(f, old, T, T), T + 10));
        // Read before 1970, changed before that: more than a day ago.
        assert!(p.due(&meta(f, old, old - 1, old - 1), T));
    }

    #[test]
    fn strict_never_and_directories() {
        let strict = Policy {
            mode: Mode::Strict,
            dirs: true,
        };
        let f = ObjType::Regfile;
        assert!(strict.due(&meta(f, T + 5, T, T), T + 6));
        let never = Policy {
            mode: Mode::Never,
            dirs: true,
        };
        assert!(!never.due(&meta(f, T, T + 1, T + 1), T + 6));
        let nodir = Policy {
            mode: Mode::Strict,
            dirs: false,
        };
        assert!(!nodir.due(&meta(ObjType::Directory, T, T, T), T + 6));
        assert!(nodir.due(&meta(f, T, T, T), T + 6));
    }
}
