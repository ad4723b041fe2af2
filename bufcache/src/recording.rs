//! Devices for crash and failure tests.
//!
//! `RecordingDevice` keeps every write (offset and bytes), every barrier
//! and named marks in one log, in order, so a test can rebuild the image
//! the device held at any log position: after a mark, at the N-th
//! barrier, or anywhere between (a crash point). `FaultDevice` wraps any
//! device and fails reads, writes or barriers on command (at once or
//! after the N-th), or flips bits of a byte on its way from the media.

use crate::device::{BlockDevice, MemDevice};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// One entry of the recording.
#[derive(Clone, Debug)]
pub enum Event {
    Write { offset: u64, data: Arc<[u8]> },
    Barrier,
    Mark(String),
}

/// A memory device that logs what is done to it.
pub struct RecordingDevice {
    base: MemDevice,
    current: MemDevice,
    log: Mutex<Vec<Event>>,
}

impl RecordingDevice {
    /// A zero-filled device of `size` bytes.
    pub fn new(size: u64) -> RecordingDevice {
        RecordingDevice::from_mem(MemDevice::new(size))
    }

    /// Start from the contents of `dev` (position 0 is that image).
    pub fn from_mem(dev: MemDevice) -> RecordingDevice {
        RecordingDevice {
            base: dev.snapshot(),
            current: dev,
            log: Mutex::new(Vec::new()),
        }
    }

    fn log(&self) -> MutexGuard<'_, Vec<Event>> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record a named point.
    pub fn mark_here(&self, name: &str) {
        self.log().push(Event::Mark(name.to_string()));
    }

    /// Log length: the position of the next event.
    pub fn position(&self) -> usize {
        self.log().len()
    }

    /// Position of the first mark called `name`.
    pub fn mark_position(&self, name: &str) -> Option<usize> {
        self.log()
            .iter()
            .position(|e| matches!(e, Event::Mark(m) if m == name))
    }

    /// Positions of the barriers, in order.
    pub fn barrier_positions(&self) -> Vec<usize> {
        self.log()
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, Event::Barrier))
            .map(|(i, _)| i)
            .collect()
    }

    /// A copy of the log.
    pub fn events(&self) -> Vec<Event> {
        self.log().clone()
    }

    /// The image after the first `pos` events.
    pub fn image_at(&self, pos: usize) -> MemDevice {
        let img = self.base.snapshot();
        for e in self.log().iter().take(pos) {
            if let Event::Write { offset, data } = e {
                // In range: it was accepted by the device when logged.
                let _ = img.write_at(data, *offset);
            }
        }
        img
    }
}

impl BlockDevice for RecordingDevice {
    fn size_bytes(&self) -> u64 {
        self.current.size_bytes()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.current.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut log = self.log();
        self.current.write_at(buf, offset)?;
        log.push(Event::Write {
            offset,
            data: Arc::from(buf),
        });
        Ok(())
    }

    fn barrier(&self) -> io::Result<()> {
        self.log().push(Event::Barrier);
        Ok(())
    }

    fn mark(&self, name: &str) -> io::Result<()> {
        self.mark_here(name);
        Ok(())
    }
}

/// A device that fails on command.
pub struct FaultDevice {
    inner: Arc<dyn BlockDevice>,
    /// Writes still allowed before every write fails (`u64::MAX`: never).
    writes_left: AtomicU64,
    fail_barrier: AtomicBool,
    /// Barriers still allowed before every barrier fails.
    barriers_left: AtomicU64,
    /// Reads still allowed before every read fails.
    reads_left: AtomicU64,
    /// Reads touching `[start, end)` fail.
    bad_read: Mutex<Option<(u64, u64)>>,
    /// Reads covering this byte see it with these bits flipped (the
    /// media keeps it intact).
    flip: Mutex<Option<(u64, u8)>>,
    /// A page layer to offer the layer above (`page_layer`), though this
    /// device caches nothing: so a test can run the mount's memory on
    /// pages over a device it injects faults into.
    pages: Mutex<Option<Arc<vmglue::Vm>>>,
}

/// Take one from a countdown (`u64::MAX` never runs out); false when
/// none is left.
fn take_one(left: &AtomicU64) -> bool {
    left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
        if n == u64::MAX {
            Some(n)
        } else {
            n.checked_sub(1)
        }
    })
    .is_ok()
}

impl FaultDevice {
    pub fn new(inner: Arc<dyn BlockDevice>) -> FaultDevice {
        FaultDevice {
            inner,
            writes_left: AtomicU64::new(u64::MAX),
            fail_barrier: AtomicBool::new(false),
            barriers_left: AtomicU64::new(u64::MAX),
            reads_left: AtomicU64::new(u64::MAX),
            bad_read: Mutex::new(None),
            flip: Mutex::new(None),
            pages: Mutex::new(None),
        }
    }

    /// Offer `vm` as the page layer under this device (`None`: none).
    pub fn set_page_layer(&self, vm: Option<Arc<vmglue::Vm>>) {
        *self.pages.lock().unwrap_or_else(|p| p.into_inner()) = vm;
    }

    /// Let `n` more barriers through, then fail every barrier.
    pub fn fail_barriers_after(&self, n: u64) {
        self.barriers_left.store(n, Ordering::SeqCst);
    }

    /// Let `n` more reads through, then fail every read.
    pub fn fail_reads_after(&self, n: u64) {
        self.reads_left.store(n, Ordering::SeqCst);
    }

    /// Flip the bits `mask` of the byte at `offset` in every read that
    /// covers it (`None` heals): a bit flip on the way from the media.
    pub fn flip_on_read(&self, at: Option<(u64, u8)>) {
        *self.flip.lock().unwrap_or_else(|p| p.into_inner()) = at;
    }

    /// Heal every fault.
    pub fn heal(&self) {
        self.writes_left.store(u64::MAX, Ordering::SeqCst);
        self.barriers_left.store(u64::MAX, Ordering::SeqCst);
        self.reads_left.store(u64::MAX, Ordering::SeqCst);
        self.fail_barrier.store(false, Ordering::SeqCst);
        self.fail_reads(None);
        self.flip_on_read(None);
    }

    /// Let `n` more writes through, then fail every write.
    pub fn fail_writes_after(&self, n: u64) {
        self.writes_left.store(n, Ordering::SeqCst);
    }

    pub fn fail_barriers(&self, fail: bool) {
        self.fail_barrier.store(fail, Ordering::SeqCst);
    }

    /// Fail reads that touch `start..end` (`None` heals).
    pub fn fail_reads(&self, range: Option<(u64, u64)>) {
        *self.bad_read.lock().unwrap_or_else(|p| p.into_inner()) = range;
    }
}

impl BlockDevice for FaultDevice {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn page_layer(&self) -> Option<Arc<vmglue::Vm>> {
        self.pages.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bad = *self.bad_read.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((start, end)) = bad {
            if offset < end && offset + buf.len() as u64 > start {
                return Err(io::Error::other("injected read error"));
            }
        }
        if !take_one(&self.reads_left) {
            return Err(io::Error::other("injected read error"));
        }
        self.inner.read_at(buf, offset)?;
        let flip = *self.flip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, mask)) = flip {
            if at >= offset && at < offset + buf.len() as u64 {
                buf[(at - offset) as usize] ^= mask;
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !take_one(&self.writes_left) {
            return Err(io::Error::other("injected write error"));
        }
        self.inner.write_at(buf, offset)
    }

    fn barrier(&self) -> io::Result<()> {
        if self.fail_barrier.load(Ordering::SeqCst) || !take_one(&self.barriers_left) {
            return Err(io::Error::other("injected barrier error"));
        }
        self.inner.barrier()
    }

    fn mark(&self, name: &str) -> io::Result<()> {
        self.inner.mark(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_rebuilds_every_point() {
        let dev = RecordingDevice::new(1 << 20);
        dev.write_at(&[1; 100], 0).unwrap();
        dev.mark_here("one");
        dev.barrier().unwrap();
        dev.write_at(&[2; 50], 50).unwrap();
        dev.barrier().unwrap();
        assert_eq!(dev.barrier_positions(), vec![2, 4]);
        let one = dev.mark_position("one").unwrap();
        let mut b = [0u8; 100];
        dev.image_at(one).read_at(&mut b, 0).unwrap();
        assert_eq!(b, [1; 100]);
        dev.image_at(dev.position()).read_at(&mut b, 0).unwrap();
        assert_eq!(&b[..50], &[1; 50]);
        assert_eq!(&b[50..], &[2; 50]);
        dev.image_at(0).read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0; 100]);
    }

    #[test]
    fn fault_device_fails_on_command() {
        let dev = FaultDevice::new(Arc::new(MemDevice::new(4096)));
        dev.fail_writes_after(1);
        dev.write_at(&[1], 0).unwrap();
        assert!(dev.write_at(&[1], 0).is_err());
        dev.fail_barriers(true);
        assert!(dev.barrier().is_err());
        dev.fail_reads(Some((100, 200)));
        let mut b = [0u8; 10];
        assert!(dev.read_at(&mut b, 195).is_err());
        dev.read_at(&mut b, 200).unwrap();
        dev.heal();
        dev.fail_barriers_after(1);
        dev.barrier().unwrap();
        assert!(dev.barrier().is_err());
        dev.fail_reads_after(1);
        dev.read_at(&mut b, 0).unwrap();
        assert!(dev.read_at(&mut b, 0).is_err());
        dev.heal();
        dev.write_at(&[0x0f; 10], 100).unwrap();
        dev.flip_on_read(Some((103, 0x81)));
        dev.read_at(&mut b, 100).unwrap();
        assert_eq!(
            b,
            [0x0f, 0x0f, 0x0f, 0x8e, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f]
        );
        dev.read_at(&mut b, 104).unwrap();
        assert_eq!(&b[..6], &[0x0f; 6]);
    }
}
