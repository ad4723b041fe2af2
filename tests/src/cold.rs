//! `Cold`: a memory image behind a cache that starts cold, for tests of
//! what the library reads from a device and when. `read_cached` answers
//! only for bytes read (by `read_at`) or written through it before, as a
//! buffer cache does, so cache-only reads (`hammer2::volume::cache_only`)
//! miss once per block; the reads that reach the image are counted.

use bufcache::{BlockDevice, MemDevice};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub struct Cold {
    pub dev: Arc<MemDevice>,
    warm: Mutex<HashSet<u64>>,
    reads: AtomicU64,
}

impl Cold {
    const GRAIN: u64 = 1024;

    /// `dev` with nothing cached.
    pub fn over(dev: &Arc<MemDevice>) -> Arc<Cold> {
        Arc::new(Cold {
            dev: dev.clone(),
            warm: Mutex::new(HashSet::new()),
            reads: AtomicU64::new(0),
        })
    }

    /// Reads that reached the image so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    fn grains(offset: u64, len: usize) -> std::ops::Range<u64> {
        offset / Self::GRAIN..(offset + len as u64).div_ceil(Self::GRAIN)
    }

    fn warm(&self, offset: u64, len: usize) {
        self.warm.lock().unwrap().extend(Self::grains(offset, len));
    }
}

impl BlockDevice for Cold {
    fn size_bytes(&self) -> u64 {
        self.dev.size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.dev.read_at(buf, offset)?;
        self.warm(offset, buf.len());
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.dev.write_at(buf, offset)?;
        self.warm(offset, buf.len());
        Ok(())
    }
    fn barrier(&self) -> std::io::Result<()> {
        self.dev.barrier()
    }
    fn read_cached(&self, buf: &mut [u8], offset: u64) -> std::io::Result<bool> {
        let warm = self.warm.lock().unwrap();
        if !Self::grains(offset, buf.len()).all(|g| warm.contains(&g)) {
            return Ok(false);
        }
        drop(warm);
        self.dev.read_at(buf, offset).map(|()| true)
    }
}
