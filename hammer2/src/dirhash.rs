//! The directory hash (`hammer2_dirhash`): the key a name is filed under
//! in its directory.
//!
//! - bit 63 set;
//! - bits 62..32: the sum of the CRC-32Cs of the name's segments, split
//!   on `.`, `-`, `_` and `~`;
//! - bits 31..16: the top half of `c ^ (c << 16)`, c the CRC-32C of the
//!   whole name;
//! - bit 15 set, bits 14..0 left for the collision counter, so keys below
//!   0x8000 stay free for the "." and ".." readdir cookies.

use crate::check::crc32c;
use crate::disk::{DIRHASH_FORCED, DIRHASH_LOMASK, DIRHASH_VISIBLE};

pub fn dirhash(name: &[u8]) -> u64 {
    let mut crcx: u32 = 0;
    let mut j = 0;
    for (i, &c) in name.iter().enumerate() {
        if matches!(c, b'.' | b'-' | b'_' | b'~') {
            if i != j {
                crcx = crcx.wrapping_add(crc32c(&name[j..i]));
            }
            j = i + 1;
        }
    }
    if name.len() != j {
        crcx = crcx.wrapping_add(crc32c(&name[j..]));
    }
    let mut key = ((crcx | 0x8000_0000) as u64) << 32;
    let c = crc32c(name);
    key |= ((c ^ (c << 16)) & 0xFFFF_0000) as u64;
    key | DIRHASH_FORCED
}

/// The key range a name's entry can sit in: [hash, hash | LOMASK].
pub fn dirhash_range(name: &[u8]) -> (u64, u64) {
    let h = dirhash(name);
    (h, h | DIRHASH_LOMASK)
}

/// Directory keys have the visible bit set; inode-index keys do not.
pub fn is_dirent_key(key: u64) -> bool {
    key & DIRHASH_VISIBLE != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape() {
        for name in [&b"a"[..], b"hello.txt", b"..dots..", b"-", b"a.b-c_d~e"] {
            let h = dirhash(name);
            assert!(h & DIRHASH_VISIBLE != 0);
            assert!(h & DIRHASH_FORCED != 0);
            assert_eq!(h & DIRHASH_LOMASK, 0);
        }
    }

    #[test]
    fn segments_sum() {
        // "a.b" hashes its segments "a" and "b"; so does "a-b".
        assert_eq!(dirhash(b"a.b") >> 32, dirhash(b"a-b") >> 32);
        assert_ne!(dirhash(b"a.b"), dirhash(b"a-b"));
    }
}
