//! Buffers aligned for direct I/O (O_DIRECT): the device's offsets,
//! lengths and memory must all be multiples of its logical block size,
//! which is at most `DIRECT_ALIGN` on every device this project serves.
//! `AlignedBuf` is a run of 4 KiB sectors seen as one byte slice.

#![forbid(unsafe_code)]

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The alignment direct I/O is done at: 4 KiB, the largest logical block
/// size of the devices and filesystems an image lives on (and a
/// multiple of the smaller ones).
pub const DIRECT_ALIGN: usize = 4096;

#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, align(4096))]
struct Sector([u8; DIRECT_ALIGN]);

const _: () = assert!(std::mem::size_of::<Sector>() == DIRECT_ALIGN);

/// A zeroed buffer of whole sectors whose start is `DIRECT_ALIGN`-aligned.
pub struct AlignedBuf {
    sectors: Vec<Sector>,
}

impl AlignedBuf {
    /// At least `len` bytes (rounded up to whole sectors).
    pub fn new(len: usize) -> AlignedBuf {
        AlignedBuf {
            sectors: vec![Sector([0; DIRECT_ALIGN]); len.div_ceil(DIRECT_ALIGN)],
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        self.sectors.as_bytes()
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.sectors.as_mut_bytes()
    }
}

/// Whether `offset`, `len` and the memory at `buf` suit direct I/O.
pub fn is_aligned(buf: &[u8], offset: u64) -> bool {
    let a = DIRECT_ALIGN as u64;
    offset.is_multiple_of(a)
        && (buf.len() as u64).is_multiple_of(a)
        && (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_sized() {
        for len in [1, 4095, 4096, 4097, 65536, 1 << 20] {
            let mut b = AlignedBuf::new(len);
            assert!(b.as_slice().len() >= len);
            assert_eq!(b.as_slice().len() % DIRECT_ALIGN, 0);
            assert!(is_aligned(b.as_slice(), 0));
            b.as_mut_slice()[len - 1] = 7;
            assert_eq!(b.as_slice()[len - 1], 7);
        }
        let b = AlignedBuf::new(8192);
        assert!(!is_aligned(&b.as_slice()[1..4097], 0));
        assert!(!is_aligned(&b.as_slice()[..4096], 512));
        assert!(!is_aligned(&b.as_slice()[..1024], 0));
    }
}
