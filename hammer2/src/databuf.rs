//! `DataBuf`: the bytes of one logical file block held in memory until a
//! flush or laundering writes them (`inode::PendingBlock`).
//!
//! Over a device with a page layer (a mount's buffer cache), the bytes
//! live on an anonymous page of that layer (`bufcache::AnonPage`): one
//! 64 KiB frame per block, wired, under the same budget as the cached
//! device blocks, as DragonFly keeps a file's dirty data on the pages of
//! its vnode's VM object. Without one (the library over a bare device)
//! they live on the heap. Either way the buffer is a byte slice of its
//! length, at most 64 KiB; growing it zero-fills.
//!
//! Taking a page fails when pending data already takes half the page
//! layer (the most anonymous pages may take, so that the flush that
//! writes them always finds buffers), or when wired pages hold the rest
//! too: an `OutOfMemory` I/O error (a shortage, which the mount answers
//! with EAGAIN and which poisons nothing), raised before the caller
//! changes anything. A mount's dirty limit keeps writers well below
//! that (`fuse-mount`'s `Budget`).

use crate::error::{Error, Result};
use bufcache::{AllocClass, AnonPage, Vm};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

/// The largest buffer: one logical block.
pub const DATABUF_MAX: usize = crate::disk::DATA_BLOCK_BYTES as usize;

const _: () = assert!(
    AnonPage::BYTES == DATABUF_MAX,
    "a page holds one logical block"
);

/// One logical block's bytes (see the module notes).
pub struct DataBuf {
    store: Store,
}

enum Store {
    /// On a page: the frame and how much of it is the buffer's.
    Page {
        page: AnonPage,
        len: usize,
    },
    Heap(Vec<u8>),
}

impl DataBuf {
    /// An empty buffer: on a page of `pages` when given, else on the heap.
    pub fn new(pages: Option<&Arc<Vm>>) -> Result<DataBuf> {
        let store = match pages {
            Some(vm) => Store::Page {
                page: take_page(vm)?,
                len: 0,
            },
            None => Store::Heap(Vec::new()),
        };
        Ok(DataBuf { store })
    }

    /// A buffer holding a copy of `src` (at most 64 KiB).
    pub fn copy_of(pages: Option<&Arc<Vm>>, src: &[u8]) -> Result<DataBuf> {
        if src.len() > DATABUF_MAX {
            return Err(Error::InvalidArgument {
                what: format!("a block of {} bytes (at most {DATABUF_MAX})", src.len()),
            });
        }
        let mut b = DataBuf::new(pages)?;
        b.put(0, src);
        Ok(b)
    }

    /// A buffer of `pages` like this one (another page, or the heap),
    /// holding a copy of its bytes.
    pub fn try_clone(&self) -> Result<DataBuf> {
        DataBuf::copy_of(self.page_layer(), self)
    }

    /// The page layer the buffer is on, if any.
    fn page_layer(&self) -> Option<&Arc<Vm>> {
        match &self.store {
            Store::Page { page, .. } => Some(page.vm()),
            Store::Heap(_) => None,
        }
    }

    /// Make the buffer `new_len` bytes long (at most 64 KiB: longer is
    /// clamped), zero-filling what it gains.
    pub fn resize(&mut self, new_len: usize) {
        let new_len = new_len.min(DATABUF_MAX);
        match &mut self.store {
            Store::Page { page, len } => {
                if new_len > *len {
                    page.data_mut()[*len..new_len].fill(0);
                }
                *len = new_len;
            }
            Store::Heap(v) => v.resize(new_len, 0),
        }
    }

    /// Put `src` at `at` (ending within 64 KiB), growing the buffer as
    /// needed; only the gap between the old end and `at` is zero-filled,
    /// so a block written whole is written once.
    pub fn put(&mut self, at: usize, src: &[u8]) {
        let end = at + src.len();
        debug_assert!(end <= DATABUF_MAX, "a put past 64 KiB");
        let end = end.min(DATABUF_MAX);
        let src = &src[..end.saturating_sub(at)];
        match &mut self.store {
            Store::Page { page, len } => {
                let data = page.data_mut();
                if at > *len {
                    data[*len..at].fill(0);
                }
                data[at..end].copy_from_slice(src);
                *len = (*len).max(end);
            }
            Store::Heap(v) => {
                if v.len() < end {
                    v.resize(end, 0);
                }
                v[at..end].copy_from_slice(src);
            }
        }
    }

    /// Bytes of memory the buffer holds: a whole frame on a page.
    pub fn memory(&self) -> usize {
        match &self.store {
            Store::Page { .. } => AnonPage::BYTES,
            Store::Heap(v) => v.len(),
        }
    }
}

/// A page of `vm`, after the page layer's own wait for pageout at most:
/// the caller holds the mount, so a shortage is reported rather than
/// waited out again (the daemon flushes, which gives pages back, and
/// retries the change).
fn take_page(vm: &Arc<Vm>) -> Result<AnonPage> {
    vm.alloc_anon(AllocClass::Normal, true)
        .map_err(|e| Error::Io {
            op: "take a page for file data",
            at: 0,
            source: std::io::Error::new(std::io::ErrorKind::OutOfMemory, e.to_string()),
        })
}

impl Deref for DataBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.store {
            Store::Page { page, len } => &page.data()[..*len],
            Store::Heap(v) => v,
        }
    }
}

impl DerefMut for DataBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.store {
            Store::Page { page, len } => &mut page.data_mut()[..*len],
            Store::Heap(v) => v,
        }
    }
}

impl Default for DataBuf {
    fn default() -> DataBuf {
        DataBuf {
            store: Store::Heap(Vec::new()),
        }
    }
}

impl fmt::Debug for DataBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.store {
            Store::Page { page, len } => write!(f, "DataBuf({len} bytes on {page:?})"),
            Store::Heap(v) => write!(f, "DataBuf({} bytes on the heap)", v.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bufcache::VmConfig;

    #[test]
    fn a_page_buffer_reads_back_what_was_put_and_zero_fills_what_it_gains() {
        let vm = Vm::new(VmConfig::new(8 << 20)).unwrap();
        // A frame that held other bytes before.
        drop({
            let mut b = DataBuf::new(Some(&vm)).unwrap();
            b.resize(DATABUF_MAX);
            b.fill(0xee);
            b
        });
        let mut b = DataBuf::copy_of(Some(&vm), b"hello").unwrap();
        assert!(b.page_layer().is_some());
        assert_eq!(vm.stats().anon, 1);
        b.resize(10);
        assert_eq!(&b[..], b"hello\0\0\0\0\0");
        b.resize(3);
        b.resize(6);
        assert_eq!(&b[..], b"hel\0\0\0");
        b.put(8, b"xy");
        assert_eq!(&b[..], b"hel\0\0\0\0\0xy");
        b.put(1, b"EL");
        assert_eq!(&b[..], b"hEL\0\0\0\0\0xy");
        let mut h = DataBuf::default();
        h.put(2, b"ab");
        h.put(0, b"z");
        assert_eq!(&h[..], b"z\0ab");
        b.resize(usize::MAX);
        assert_eq!(b.len(), DATABUF_MAX);
        assert!(b[10..].iter().all(|&x| x == 0));
        let c = b.try_clone().unwrap();
        assert_eq!(vm.stats().anon, 2);
        assert_eq!(&c[..], &b[..]);
        drop((b, c));
        assert_eq!(vm.stats().anon, 0);
        vm.verify().unwrap();
    }

    #[test]
    fn a_shortage_of_pages_is_an_out_of_memory_error() {
        let mut cfg = VmConfig::new(4 << 20);
        cfg.alloc_wait_max = std::time::Duration::from_millis(10);
        let vm = Vm::new(cfg).unwrap();
        let mut held = Vec::new();
        let e = loop {
            match DataBuf::new(Some(&vm)) {
                Ok(b) => held.push(b),
                Err(e) => break e,
            }
            assert!(held.len() <= 64);
        };
        assert_eq!(held.len(), 32, "half the pages");
        assert!(
            matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::OutOfMemory),
            "{e}"
        );
        held.pop();
        assert!(DataBuf::new(Some(&vm)).is_ok());
    }
}
