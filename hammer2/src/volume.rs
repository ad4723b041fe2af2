//! Opening a volume: reading every volume header copy, checking its CRCs
//! and choosing the one to mount (CRC-valid, highest `mirror_tid`), and
//! reading blocks through the device with their check codes verified.

use crate::check;
use crate::compress;
use crate::disk::{self, Blockref, BlockrefType, VolumeHeader, VOLUME_BYTES};
use crate::error::{Error, Result};
use bufcache::BlockDevice;
use std::sync::Arc;

/// What was found at one volume header slot.
#[derive(Debug)]
pub enum HeaderSlot {
    /// Decoded with all three CRCs good.
    Good(Box<VolumeHeader>),
    /// Decoded, but a CRC does not match.
    BadCrc(Box<VolumeHeader>, disk::volume::HeaderCrcs),
    /// Not a HAMMER2 header (or unreadable).
    Invalid(String),
}

/// An open HAMMER2 volume (single-volume images, versions 1 and 2).
pub struct Volume {
    dev: Arc<dyn BlockDevice>,
    /// The header in use.
    pub header: VolumeHeader,
    /// Which copy it came from (0..4).
    pub header_index: usize,
    /// Every copy that fits the device, as found.
    pub slots: Vec<HeaderSlot>,
    /// The page layer under the device's cache (`page_layer`), asked
    /// of the device once.
    pages: Option<Arc<bufcache::Vm>>,
}

thread_local! {
    static CACHE_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The first block a cache-only read missed since `take_miss`.
    static MISS: std::cell::Cell<Option<(u64, u64)>> = const { std::cell::Cell::new(None) };
}

/// The block (offset, bytes) a cache-only read on this thread missed
/// since the last call, if any.
pub fn take_miss() -> Option<(u64, u64)> {
    MISS.take()
}

/// Within a cache-only scope, let the rest of it read from the device:
/// for an operation past the point where it starts changing things
/// (after its admission), which must not fail half done. Its reads were
/// made before, so what remains is normally in memory.
pub(crate) fn allow_io() {
    CACHE_ONLY.set(false);
}

/// While the guard lives, block reads on this thread are served only
/// from memory (a device's cache, `BlockDevice::read_cached`): one that
/// would wait for the device fails with `Error::WouldBlock` instead and
/// is noted (`take_miss`). The mount daemon holds one while it holds the
/// mount's lock, so no request waits for the device behind another's
/// lock: the operation fails before it changes anything (every
/// operation reads before it changes; those that change several things
/// read with I/O allowed once admitted, `allow_io`), the daemon reads
/// the block with the lock released, and runs the operation again.
pub struct CacheOnly {
    was: bool,
}

/// Enter cache-only reading on this thread (see `CacheOnly`).
pub fn cache_only() -> CacheOnly {
    CacheOnly {
        was: CACHE_ONLY.replace(true),
    }
}

/// Leave cache-only reading for the guard's scope (a part that must do
/// its I/O, such as a commit that cannot be retried).
pub fn with_io() -> CacheOnly {
    CacheOnly {
        was: CACHE_ONLY.replace(false),
    }
}

impl Drop for CacheOnly {
    fn drop(&mut self) {
        CACHE_ONLY.set(self.was);
    }
}

/// Read the header copy at slot `i`.
pub fn read_header_slot(dev: &dyn BlockDevice, i: usize) -> HeaderSlot {
    let at = disk::volhdr_offset(i);
    let mut raw = vec![0u8; VOLUME_BYTES];
    if let Err(e) = dev.read_at(&mut raw, at) {
        return HeaderSlot::Invalid(format!("cannot read header at {at:#x}: {e}"));
    }
    match VolumeHeader::decode(&raw, at) {
        Err(e) => HeaderSlot::Invalid(e.to_string()),
        Ok(vh) => {
            let crcs = vh.crcs();
            if crcs.all_good() {
                HeaderSlot::Good(Box::new(vh))
            } else {
                HeaderSlot::BadCrc(Box::new(vh), crcs)
            }
        }
    }
}

/// Does `dev` hold a HAMMER2 volume header's magic (either byte order)
/// at the start of any header slot? How the HAMMER2 partition of a whole
/// disk is told from the others (`bufcache::source`).
pub fn has_volume_magic(dev: &dyn BlockDevice) -> bool {
    use disk::volume::{VOLUME_ID_ABO, VOLUME_ID_HBO};
    (0..header_slots(dev.size_bytes())).any(|i| {
        let mut magic = [0u8; 8];
        dev.read_at(&mut magic, disk::volhdr_offset(i)).is_ok()
            && [VOLUME_ID_HBO, VOLUME_ID_ABO].contains(&u64::from_le_bytes(magic))
    })
}

/// Number of header slots a device of `size` bytes holds.
pub fn header_slots(size: u64) -> usize {
    (0..disk::NUM_VOLHDRS)
        .take_while(|&i| disk::volhdr_offset(i) + VOLUME_BYTES as u64 <= size)
        .count()
}

impl Volume {
    pub fn open(dev: Arc<dyn BlockDevice>) -> Result<Volume> {
        let size = dev.size_bytes();
        let n = header_slots(size);
        if n == 0 {
            return Err(Error::corrupt(
                format!("device of {size} bytes is too small for HAMMER2"),
                0,
            ));
        }
        let slots: Vec<HeaderSlot> = (0..n).map(|i| read_header_slot(dev.as_ref(), i)).collect();
        let mut best: Option<(usize, &VolumeHeader)> = None;
        for (i, slot) in slots.iter().enumerate() {
            match slot {
                HeaderSlot::Good(vh) => {
                    if best.is_none_or(|(_, b)| vh.mirror_tid > b.mirror_tid) {
                        best = Some((i, vh));
                    }
                }
                HeaderSlot::BadCrc(_, crcs) => {
                    log::warn!(
                        "volume header {i} at {:#x} has a bad check code ({crcs:?}); skipped",
                        disk::volhdr_offset(i)
                    );
                }
                HeaderSlot::Invalid(why)
                    if i == 0 || slots.iter().any(|s| matches!(s, HeaderSlot::Good(_))) =>
                {
                    // Copies past the first are absent on images smaller
                    // than their zone; only say so when others exist.
                    if i == 0 {
                        log::warn!("volume header 0: {why}");
                    } else {
                        log::debug!("volume header {i}: {why}");
                    }
                }
                HeaderSlot::Invalid(_) => {}
            }
        }
        let (index, header) = match best {
            Some((i, vh)) => (i, vh.clone()),
            None => {
                let why = match slots.first() {
                    Some(HeaderSlot::Invalid(w)) => w.clone(),
                    _ => "no volume header with valid check codes".to_string(),
                };
                return Err(Error::corrupt(
                    format!("not a usable HAMMER2 volume: {why}"),
                    0,
                ));
            }
        };
        validate_header(&header, size)?;
        Ok(Volume {
            pages: dev.page_layer(),
            dev,
            header,
            header_index: index,
            slots,
        })
    }

    /// The volume as header copy `index` (`header`, as the caller
    /// decoded it) describes it, whichever copy `open` would choose: for
    /// fsck's repairs and rewinds, and for reading an older state.
    pub fn at_header(dev: Arc<dyn BlockDevice>, header: VolumeHeader, index: usize) -> Volume {
        let n = header_slots(dev.size_bytes());
        let slots = (0..n).map(|i| read_header_slot(dev.as_ref(), i)).collect();
        Volume {
            pages: dev.page_layer(),
            dev,
            header,
            header_index: index,
            slots,
        }
    }

    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// The page layer under the device's cache, where file data waiting
    /// for a flush is kept (`databuf`); none over a device that does not
    /// cache.
    pub fn page_layer(&self) -> Option<&Arc<bufcache::Vm>> {
        self.pages.as_ref()
    }

    /// A second handle on the same device and header, for reading
    /// blocks without the owner (a flush's device phase).
    pub fn reader(&self) -> Volume {
        Volume {
            dev: self.dev.clone(),
            header: self.header.clone(),
            header_index: self.header_index,
            slots: Vec::new(),
            pages: self.pages.clone(),
        }
    }

    pub fn size(&self) -> u64 {
        self.header.volu_size
    }

    /// Where the physical bytes a blockref references lie (offset,
    /// length), checked against the volume; `None` for radix 0.
    fn locate(&self, br: &Blockref) -> Result<Option<(u64, u64)>> {
        let bytes = br.data_off.bytes();
        if bytes == 0 {
            return Ok(None);
        }
        let at = br.data_off.offset();
        let radix = br.data_off.radix();
        if !(6..=disk::PBUFRADIX).contains(&radix) {
            return Err(Error::corrupt(
                format!("{} blockref has bad size radix {radix}", br.btype.name()),
                at,
            ));
        }
        // A block never crosses a 64 KiB boundary.
        if (at & (disk::PBUFSIZE - 1)) + bytes > disk::PBUFSIZE {
            return Err(Error::corrupt(
                format!("block of {bytes} bytes crosses a 64 KiB boundary"),
                at,
            ));
        }
        if at
            .checked_add(bytes)
            .is_none_or(|end| end > self.header.volu_size.min(self.dev.size_bytes()))
        {
            return Err(Error::corrupt(
                format!("block of {bytes} bytes lies past the volume end"),
                at,
            ));
        }
        Ok(Some((at, bytes)))
    }

    /// Read the physical bytes a blockref references, verifying its
    /// check code. Radix 0 gives an empty buffer.
    pub fn read_physical(&self, br: &Blockref) -> Result<Vec<u8>> {
        let Some((at, bytes)) = self.locate(br)? else {
            return Ok(Vec::new());
        };
        let mut buf = vec![0u8; bytes as usize];
        let io = |source| Error::Io {
            op: "read",
            at,
            source,
        };
        if CACHE_ONLY.get() {
            if !self.dev.read_cached(&mut buf, at).map_err(io)? {
                if MISS.get().is_none() {
                    MISS.set(Some((at, bytes)));
                }
                return Err(Error::WouldBlock { at, bytes });
            }
        } else {
            self.dev.read_at(&mut buf, at).map_err(io)?;
        }
        check::verify(br, &buf)?;
        Ok(buf)
    }

    /// `f` on a file data block's logical content (`read_block`), read
    /// in place from the device's cache where it can be: an
    /// uncompressed block is not copied out, and a block whose check
    /// passed since the cache last read it is not checked again (the
    /// cache forgets that whenever its bytes change, see
    /// `BufCache::read_checked`). For reads outside the mount's lock
    /// (`ReadPlan::run`).
    pub fn with_data_block<R>(&self, br: &Blockref, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        let Some((at, bytes)) = self.locate(br)? else {
            return Ok(f(&Self::logical(br, Vec::new())?));
        };
        if CACHE_ONLY.get() || br.btype != BlockrefType::Data {
            return Ok(f(&self.read_block(br)?));
        }
        // The tag: the check code, the methods and the size, seeded with
        // where the block lies.
        const C: usize = disk::blockref::CHECK_BYTES;
        let mut key = [0u8; C + 16];
        key[..C].copy_from_slice(&br.check);
        key[C] = br.methods;
        key[C + 8..].copy_from_slice(&bytes.to_le_bytes());
        let tag = xxhash_rust::xxh64::xxh64(&key, at) | 1;
        let logical = Self::logical_bytes(br)?;
        let mut f = Some(f);
        let mut out: Option<Result<R>> = None;
        self.dev
            .read_checked(at, bytes as usize, tag, &mut |phys, seen| {
                if !seen {
                    if let Err(e) = check::verify(br, phys) {
                        out = Some(Err(e));
                        return false;
                    }
                }
                let f = f.take().expect("called once");
                out = Some(
                    if br.comp_method() == disk::comp_method::NONE && phys.len() == logical {
                        Ok(f(phys))
                    } else {
                        Self::logical(br, phys.to_vec()).map(|b| f(&b))
                    },
                );
                true
            })
            .map_err(|source| Error::Io {
                op: "read",
                at,
                source,
            })?;
        out.unwrap_or_else(|| {
            Err(Error::Io {
                op: "read",
                at,
                source: std::io::Error::other("the device did not hand over the block"),
            })
        })
    }

    /// Read a block and give its logical content: file data decompressed
    /// and zero-filled to the logical block size (2^keybits); metadata as
    /// stored (DragonFly never compresses metadata).
    pub fn read_block(&self, br: &Blockref) -> Result<Vec<u8>> {
        let phys = self.read_physical(br)?;
        Self::logical(br, phys)
    }

    /// Bring the blocks `brs` (in file order) into the device's cache
    /// with as few device reads as their layout allows: blocks in
    /// consecutive 64 KiB frames make one run, and each run of two
    /// frames or more is one `BlockDevice::cluster_read` (a lone block
    /// is left to its own read). A hint: nothing is checked or
    /// returned; a block that cannot be located is skipped.
    pub fn cluster_read<'a>(&self, brs: impl Iterator<Item = &'a Blockref>) {
        const FRAME: u64 = disk::PBUFSIZE;
        if CACHE_ONLY.get() {
            // Under the mount's lock: no device I/O (the reads that
            // follow note their misses).
            return;
        }
        let mut run: Option<(u64, u64)> = None;
        let flush = |r: Option<(u64, u64)>| {
            if let Some((beg, end)) = r {
                if end - (beg & !(FRAME - 1)) > FRAME {
                    self.dev.cluster_read(beg, end - beg);
                }
            }
        };
        for br in brs {
            let Ok(Some((at, bytes))) = self.locate(br) else {
                continue;
            };
            run = match run {
                Some((beg, end))
                    if at >= beg && (at & !(FRAME - 1)) <= end.next_multiple_of(FRAME) =>
                {
                    Some((beg, end.max(at + bytes)))
                }
                other => {
                    flush(other);
                    Some((at, at + bytes))
                }
            };
        }
        flush(run);
    }

    /// `read_block` if the block is in the device's cache (devices
    /// without one read it); `None`, with nothing read or noted, when
    /// reading it would wait for the device.
    pub fn read_block_cached(&self, br: &Blockref) -> Result<Option<Vec<u8>>> {
        let Some((at, bytes)) = self.locate(br)? else {
            return Self::logical(br, Vec::new()).map(Some);
        };
        let mut buf = vec![0u8; bytes as usize];
        let hit = self
            .dev
            .read_cached(&mut buf, at)
            .map_err(|source| Error::Io {
                op: "read",
                at,
                source,
            })?;
        if !hit {
            return Ok(None);
        }
        check::verify(br, &buf)?;
        Self::logical(br, buf).map(Some)
    }

    /// A block's logical content from its physical bytes (`read_block`).
    fn logical(br: &Blockref, phys: Vec<u8>) -> Result<Vec<u8>> {
        if br.btype != BlockrefType::Data {
            return Ok(phys);
        }
        let logical = Self::logical_bytes(br)?;
        compress::decompress(br.comp_method(), &phys, logical, br.data_off.offset())
    }

    /// A data block's logical size, 2^keybits, which bounds what
    /// decompression may produce: 1 KiB to 64 KiB, else damage.
    fn logical_bytes(br: &Blockref) -> Result<usize> {
        if !(disk::RADIX_MIN..=disk::DATA_BLOCK_RADIX).contains(&br.keybits) {
            return Err(Error::corrupt(
                format!(
                    "data blockref key {:#x} has keybits {} (a logical block is 1 KiB to 64 KiB)",
                    br.key, br.keybits
                ),
                br.data_off.offset(),
            ));
        }
        Ok(1usize << br.keybits)
    }
}

fn validate_header(vh: &VolumeHeader, dev_size: u64) -> Result<()> {
    if vh.version < disk::VOL_VERSION_MIN || vh.version >= disk::VOL_VERSION_WIP {
        return Err(Error::Unsupported {
            what: format!("volume version {}", vh.version),
            at: 0,
        });
    }
    if vh.version >= disk::VOL_VERSION_MULTI_VOLUMES && vh.nvolumes > 1 {
        return Err(Error::Unsupported {
            what: format!("{} volumes (only one is supported)", vh.nvolumes),
            at: 0,
        });
    }
    if vh.volu_size > dev_size {
        return Err(Error::corrupt(
            format!(
                "volume size {} is larger than the device ({dev_size} bytes)",
                vh.volu_size
            ),
            0,
        ));
    }
    Ok(())
}
