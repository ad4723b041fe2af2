//! Directory cookies: the offsets readdir hands the kernel so that a
//! listing continues where it stopped, across calls and across
//! telldir/seekdir. As in DragonFly's `hammer2_vop_readdir`, they come
//! from the entry keys, which never change while the entry exists:
//!
//! - 0 starts the listing at ".", 1 resumes at "..";
//! - an entry with key `k` carries `(k & DIRHASH_USERMSK) + 1`: resuming
//!   there continues with the keys above `k`. Visible keys have bit 63
//!   set and bit 15 set (`DIRHASH_FORCED`), so these cookies lie in
//!   `0x8001..=2^63` and never meet 1 or 2;
//! - `2^63`, the cookie after the largest possible key, means the end.
//!
//! Every cookie but the end one is a non-negative `loff_t`, as lseek on
//! a directory wants.

use hammer2::disk::DIRHASH_VISIBLE;

/// Resume with "." (the start).
pub const START: u64 = 0;
/// The cookie after "."; resumes with "..".
pub const AFTER_DOT: u64 = 1;
/// The cookie after ".."; resumes with the first entry.
pub const AFTER_DOTDOT: u64 = 2;
/// The cookie after the largest possible key.
pub const END: u64 = 1 << 63;

/// The cookie that resumes after the entry with directory key `key`.
pub fn after_key(key: u64) -> u64 {
    (key & !DIRHASH_VISIBLE) + 1
}

/// Where a cookie resumes among the entries: the least key to list, or
/// `None` at the end. Only for cookies past `AFTER_DOT`.
pub fn resume_key(cookie: u64) -> Option<u64> {
    debug_assert!(cookie >= AFTER_DOTDOT);
    if cookie >= END {
        None
    } else {
        Some(cookie | DIRHASH_VISIBLE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hammer2::dirhash::dirhash;

    #[test]
    fn cookies_resume_after_their_entry() {
        for name in [
            &b"a"[..],
            b"hello.txt",
            b"..dots..",
            b"x".repeat(255).as_slice(),
        ] {
            let key = dirhash(name);
            let c = after_key(key);
            assert!(c > AFTER_DOTDOT && c <= END);
            assert_eq!(resume_key(c), Some(key + 1));
            // a collision-counter neighbour still comes after
            assert!(resume_key(c).unwrap() <= key + 1);
        }
        assert_eq!(after_key(u64::MAX), END);
        assert_eq!(resume_key(END), None);
        assert_eq!(resume_key(AFTER_DOTDOT), Some(DIRHASH_VISIBLE | 2));
        assert_eq!(after_key(u64::MAX - 1), END - 1);
        assert_eq!(resume_key(END - 1), Some(u64::MAX));
    }
}
