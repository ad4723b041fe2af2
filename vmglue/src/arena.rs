//! The frame arena: one anonymous private mapping holding every frame the
//! budget can ever reach, reserved up front (untouched frames cost no
//! memory) and never remapped, so frame addresses are stable for the life
//! of the `Vm`. Memory goes back to the kernel with `MADV_DONTNEED` over
//! whole segments only.
//!
//! This is the one module with `unsafe`: it turns the mapping into slices.
//! Its callers (the busy guards in `vm.rs`) uphold the aliasing rule: a
//! frame is mutably borrowed only while its page is busy-exclusive, and
//! immutably only while busy (shared or exclusive) by the borrower.

use crate::error::{Error, Result};
use crate::page::FRAME_BYTES;
use memmap2::{Advice, MmapOptions, MmapRaw, UncheckedAdvice};

pub(crate) struct Arena {
    map: MmapRaw,
    frames: usize,
}

impl Arena {
    pub fn new(frames: usize) -> Result<Arena> {
        let bytes = frames
            .checked_mul(FRAME_BYTES)
            .ok_or(Error::BudgetTooLarge { frames })?;
        let map = MmapOptions::new()
            .len(bytes)
            .map_anon()
            .map_err(|source| Error::ArenaMap { bytes, source })?;
        Ok(Arena {
            map: MmapRaw::from(map),
            frames,
        })
    }

    /// The frame's bytes, shared.
    ///
    /// # Safety
    /// The caller holds the page of frame `idx` busy (shared or exclusive),
    /// or owns it as an anonymous page (`anon.rs`), for as long as the
    /// slice lives, so no `frame_mut` slice of the same frame exists
    /// meanwhile.
    pub unsafe fn frame(&self, idx: usize) -> &[u8] {
        assert!(idx < self.frames, "frame {idx} outside the arena");
        // SAFETY: `idx < frames`, so the range lies inside the mapping,
        // which is readable and lives as long as `self`. Aliasing: the
        // caller's busy excludes writers (the contract above).
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(idx * FRAME_BYTES), FRAME_BYTES) }
    }

    /// The frame's bytes, exclusive.
    ///
    /// # Safety
    /// The caller holds the page of frame `idx` busy-exclusive, or owns it
    /// as an anonymous page and borrows that mutably, for as long as the
    /// slice lives, so no other slice of the frame exists.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn frame_mut(&self, idx: usize) -> &mut [u8] {
        assert!(idx < self.frames, "frame {idx} outside the arena");
        // SAFETY: `idx < frames`, so the range lies inside the mapping,
        // which is writable and lives as long as `self`. Aliasing: the
        // caller's exclusive busy means no other slice of this frame exists
        // (the contract above), and frames never overlap.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.map.as_mut_ptr().add(idx * FRAME_BYTES),
                FRAME_BYTES,
            )
        }
    }

    /// Make frame `idx` resident (`MADV_POPULATE_WRITE`): its memory
    /// faulted in, its contents untouched, so it may be in use meanwhile.
    pub fn populate(&self, idx: usize) -> std::io::Result<()> {
        assert!(idx < self.frames, "frame {idx} outside the arena");
        self.map
            .advise_range(Advice::PopulateWrite, idx * FRAME_BYTES, FRAME_BYTES)
    }

    /// Which frames are resident, as the kernel says (`mincore`).
    #[cfg(test)]
    pub fn resident(&self) -> Vec<bool> {
        let page = 4096;
        let mut vec = vec![0u8; self.frames * FRAME_BYTES / page];
        // SAFETY: the range is the whole mapping, page aligned, and `vec`
        // has one byte per kernel page of it, as mincore(2) writes.
        let rc = unsafe {
            libc::mincore(
                self.map.as_mut_ptr().cast(),
                self.frames * FRAME_BYTES,
                vec.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.chunks(FRAME_BYTES / page)
            .map(|f| f.iter().all(|b| b & 1 == 1))
            .collect()
    }

    /// Give frames `first..first + count` back to the kernel; they read as
    /// zeros afterwards.
    ///
    /// # Safety
    /// No slice of any of these frames exists, and none is made until the
    /// frames are handed out again (their pages are `Offline`).
    pub unsafe fn release(&self, first: usize, count: usize) -> Result<()> {
        assert!(first + count <= self.frames, "release outside the arena");
        let offset = first * FRAME_BYTES;
        let len = count * FRAME_BYTES;
        // SAFETY: the range is inside the mapping; `MADV_DONTNEED` on a
        // private anonymous mapping replaces its contents with zeros, which
        // only matters to borrowers, and the caller guarantees there are
        // none.
        unsafe {
            self.map
                .unchecked_advise_range(UncheckedAdvice::DontNeed, offset, len)
        }
        .map_err(|source| Error::Madvise {
            offset,
            len,
            source,
        })
    }
}

/// A fixed array of `T` in its own anonymous mapping, advised to use
/// transparent huge pages: the page array and the page hash are read at
/// random on every lookup, and with 4 KiB pages the TLB, not the cache,
/// becomes the limit once they pass a few MiB. Never resized or moved.
pub(crate) struct HugeArray<T> {
    map: MmapRaw,
    /// Bytes from the mapping's start to the first element: the mapping
    /// is one huge page longer than needed and the array starts at its
    /// first huge-page boundary, so every huge page it spans is whole.
    start: usize,
    len: usize,
    _marker: std::marker::PhantomData<T>,
}

// SAFETY: a `HugeArray<T>` owns its `T`s and hands out only shared
// references to them, exactly like a `Box<[T]>`, so it may cross and be
// shared between threads when `T` may.
#[allow(unsafe_code)]
unsafe impl<T: Send> Send for HugeArray<T> {}
// SAFETY: as above: shared access to the array is shared access to `T`s.
#[allow(unsafe_code)]
unsafe impl<T: Sync> Sync for HugeArray<T> {}

impl<T> HugeArray<T> {
    /// `len` elements, element `i` made by `init(i)`.
    pub fn new(len: usize, mut init: impl FnMut(usize) -> T) -> Result<HugeArray<T>> {
        const {
            assert!(
                !std::mem::needs_drop::<T>(),
                "HugeArray never drops its elements"
            );
            assert!(
                std::mem::align_of::<T>() <= 4096,
                "mappings are page aligned"
            );
        };
        const HUGE_PAGE: usize = 2 << 20;
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .and_then(|b| b.checked_add(HUGE_PAGE))
            .ok_or(Error::BudgetTooLarge { frames: len })?;
        let map = MmapOptions::new()
            .len(bytes)
            .map_anon()
            .map_err(|source| Error::ArenaMap { bytes, source })?;
        // Advice only: without huge pages it still works, just slower.
        if let Err(e) = map.advise(memmap2::Advice::HugePage) {
            log::debug!("vm: no huge pages for a {bytes}-byte table: {e}");
        }
        let map = MmapRaw::from(map);
        let addr = map.as_ptr() as usize;
        let start = addr.next_multiple_of(HUGE_PAGE) - addr;
        // SAFETY: `start < HUGE_PAGE` and the mapping has `HUGE_PAGE`
        // spare bytes, so the offset pointer stays inside it.
        let base = unsafe { map.as_mut_ptr().add(start) }.cast::<T>();
        for i in 0..len {
            // SAFETY: `i < len`, so the write lies inside the mapping (its
            // length covers `start` plus `len` elements); `base` is 2 MiB
            // aligned and `size_of::<T>()` is a multiple of `T`'s
            // alignment, so every element is aligned. Nothing reads the
            // slot before it is written.
            unsafe { base.add(i).write(init(i)) };
        }
        Ok(HugeArray {
            map,
            start,
            len,
            _marker: std::marker::PhantomData,
        })
    }
}

impl<T> std::ops::Deref for HugeArray<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `new` initialized all `len` elements from `start` in the
        // mapping, which lives as long as `self`; only shared references
        // are made.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(self.start).cast::<T>(), self.len)
        }
    }
}
