// Interim bump allocator for the model test until the freemap allocator
// lands: allocates upward from allocator_beg, never persists.
use bufcache::BlockDevice;
use hammer2::disk::{Blockref, BlockrefType, DataOff};
use hammer2::flush::SpaceMap;
use std::sync::Arc;

pub struct Bump {
    next: u64,
    end: u64,
    set: [Blockref; 4],
}

thread_local! {
    static NEXT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

pub fn load(dev: Arc<dyn BlockDevice>) -> Box<dyn SpaceMap> {
    let vol = hammer2::Volume::open(dev).unwrap();
    let beg = (vol.header.allocator_beg.max(1 << 28) + 0xffff) & !0xffff;
    let next = NEXT.with(|n| if vol.header.mirror_tid <= 0x10 { beg } else { n.get().max(beg) });
    Box::new(Bump { next, end: vol.header.volu_size, set: vol.header.freemap_blockset })
}

impl SpaceMap for Bump {
    fn alloc(&mut self, _t: BlockrefType, bytes: u64) -> hammer2::Result<DataOff> {
        self.next = (self.next + bytes - 1) & !(bytes - 1);
        if (self.next & ((1 << 30) - 1)) < (4 << 20) {
            self.next += 4 << 20;
        }
        let off = self.next;
        self.next += bytes;
        assert!(self.next < self.end);
        NEXT.with(|n| n.set(self.next));
        Ok(DataOff::new(off, bytes.trailing_zeros() as u8))
    }
    fn release_unflushed(&mut self, _off: DataOff) {}
    fn flush(&mut self, _dev: &dyn BlockDevice, _tid: u64) -> hammer2::Result<[Blockref; 4]> {
        Ok(self.set)
    }
    fn free_bytes(&self) -> u64 {
        self.end - self.next
    }
}
