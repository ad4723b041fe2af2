//! The 128-byte blockref, the element every HAMMER2 tree is made of, and
//! the `data_off` encoding it carries.

use super::le::{put_u16, put_u64, u16_at, u64_at};
use std::fmt;

pub const BLOCKREF_BYTES: usize = 128;
pub const BLOCKREF_RADIX: u8 = 7;

// Field offsets within the 128 bytes (hammer2_disk.h, struct hammer2_blockref).
const OFF_TYPE: usize = 0x00;
const OFF_METHODS: usize = 0x01;
const OFF_COPYID: usize = 0x02;
const OFF_KEYBITS: usize = 0x03;
const OFF_VRADIX: usize = 0x04;
const OFF_FLAGS: usize = 0x05;
const OFF_LEAF_COUNT: usize = 0x06;
const OFF_KEY: usize = 0x08;
const OFF_MIRROR_TID: usize = 0x10;
const OFF_MODIFY_TID: usize = 0x18;
const OFF_DATA_OFF: usize = 0x20;
const OFF_UPDATE_TID: usize = 0x28;
const OFF_EMBED: usize = 0x30;
const OFF_CHECK: usize = 0x40;
pub const EMBED_BYTES: usize = 16;
pub const CHECK_BYTES: usize = 64;

const _: () = assert!(OFF_CHECK + CHECK_BYTES == BLOCKREF_BYTES);
const _: () = assert!(OFF_EMBED + EMBED_BYTES == OFF_CHECK);
const _: () = assert!(OFF_UPDATE_TID + 8 == OFF_EMBED);
const _: () = assert!(1 << BLOCKREF_RADIX == BLOCKREF_BYTES);

/// Blockref types.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum BlockrefType {
    Empty,
    Inode,
    Indirect,
    Data,
    Dirent,
    FreemapNode,
    FreemapLeaf,
    /// In-memory pseudo types: the freemap root and the volume.
    Freemap,
    Volume,
    /// A byte with no defined meaning; decoders keep it for reporting.
    Invalid(u8),
}

impl BlockrefType {
    pub fn from_u8(v: u8) -> BlockrefType {
        match v {
            0 => BlockrefType::Empty,
            1 => BlockrefType::Inode,
            2 => BlockrefType::Indirect,
            3 => BlockrefType::Data,
            4 => BlockrefType::Dirent,
            5 => BlockrefType::FreemapNode,
            6 => BlockrefType::FreemapLeaf,
            254 => BlockrefType::Freemap,
            255 => BlockrefType::Volume,
            other => BlockrefType::Invalid(other),
        }
    }

    pub fn to_u8(self) -> u8 {
        match self {
            BlockrefType::Empty => 0,
            BlockrefType::Inode => 1,
            BlockrefType::Indirect => 2,
            BlockrefType::Data => 3,
            BlockrefType::Dirent => 4,
            BlockrefType::FreemapNode => 5,
            BlockrefType::FreemapLeaf => 6,
            BlockrefType::Freemap => 254,
            BlockrefType::Volume => 255,
            BlockrefType::Invalid(v) => v,
        }
    }

    /// The name hammer2(8) `show` prints.
    pub fn name(self) -> &'static str {
        match self {
            BlockrefType::Empty => "empty",
            BlockrefType::Inode => "inode",
            BlockrefType::Indirect => "indblk",
            BlockrefType::Data => "data",
            BlockrefType::Dirent => "dirent",
            BlockrefType::FreemapNode => "freemap_node",
            BlockrefType::FreemapLeaf => "freemap_leaf",
            BlockrefType::Freemap => "freemap",
            BlockrefType::Volume => "volume",
            BlockrefType::Invalid(_) => "unknown",
        }
    }
}

/// A blockref's `data_off`: the physical byte offset of the referenced
/// block in the high 58 bits (64-byte granular) and log2 of its size in
/// the low 6 bits. Radix 0 means "no data" (not one byte).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct DataOff(pub u64);

impl DataOff {
    pub const MASK_RADIX: u64 = 0x3F;
    pub const MASK_OFF: u64 = !0x3F;

    pub fn new(offset: u64, radix: u8) -> DataOff {
        DataOff((offset & Self::MASK_OFF) | (radix as u64 & Self::MASK_RADIX))
    }
    /// log2 of the block size; 0 when there is no data.
    pub fn radix(self) -> u8 {
        (self.0 & Self::MASK_RADIX) as u8
    }
    /// The physical byte offset.
    pub fn offset(self) -> u64 {
        self.0 & Self::MASK_OFF
    }
    /// Bytes referenced, or 0 for radix 0. Radixes past 63 cannot occur.
    pub fn bytes(self) -> u64 {
        match self.radix() {
            0 => 0,
            r => 1u64 << r,
        }
    }
    pub fn is_empty(self) -> bool {
        self.radix() == 0
    }
}

impl fmt::Debug for DataOff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The dirent header embedded in a DIRENT blockref.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct DirentHead {
    pub inum: u64,
    pub namlen: u16,
    pub obj_type: u8,
}

/// A decoded blockref.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Blockref {
    pub btype: BlockrefType,
    pub methods: u8,
    pub copyid: u8,
    pub keybits: u8,
    pub vradix: u8,
    pub flags: u8,
    pub leaf_count: u16,
    pub key: u64,
    pub mirror_tid: u64,
    pub modify_tid: u64,
    pub data_off: DataOff,
    pub update_tid: u64,
    /// DIRENT: dirent head; INODE/INDIRECT: data_count, inode_count.
    pub embed: [u8; EMBED_BYTES],
    /// The check code, or a short dirent name, or freemap hints.
    pub check: [u8; CHECK_BYTES],
}

impl Default for Blockref {
    fn default() -> Self {
        Blockref::EMPTY
    }
}

impl Blockref {
    pub const EMPTY: Blockref = Blockref {
        btype: BlockrefType::Empty,
        methods: 0,
        copyid: 0,
        keybits: 0,
        vradix: 0,
        flags: 0,
        leaf_count: 0,
        key: 0,
        mirror_tid: 0,
        modify_tid: 0,
        data_off: DataOff(0),
        update_tid: 0,
        embed: [0; EMBED_BYTES],
        check: [0; CHECK_BYTES],
    };

    /// Decode 128 bytes. Any byte pattern decodes; validation of the
    /// values is the reader's business.
    pub fn decode(b: &[u8; BLOCKREF_BYTES]) -> Blockref {
        let mut embed = [0u8; EMBED_BYTES];
        embed.copy_from_slice(&b[OFF_EMBED..OFF_EMBED + EMBED_BYTES]);
        let mut check = [0u8; CHECK_BYTES];
        check.copy_from_slice(&b[OFF_CHECK..OFF_CHECK + CHECK_BYTES]);
        Blockref {
            btype: BlockrefType::from_u8(b[OFF_TYPE]),
            methods: b[OFF_METHODS],
            copyid: b[OFF_COPYID],
            keybits: b[OFF_KEYBITS],
            vradix: b[OFF_VRADIX],
            flags: b[OFF_FLAGS],
            leaf_count: u16_at(b, OFF_LEAF_COUNT),
            key: u64_at(b, OFF_KEY),
            mirror_tid: u64_at(b, OFF_MIRROR_TID),
            modify_tid: u64_at(b, OFF_MODIFY_TID),
            data_off: DataOff(u64_at(b, OFF_DATA_OFF)),
            update_tid: u64_at(b, OFF_UPDATE_TID),
            embed,
            check,
        }
    }

    /// Decode the blockref at `index` of an array of blockrefs (an
    /// indirect block, a blockset, a freemap node). `None` past the end.
    pub fn decode_at(buf: &[u8], index: usize) -> Option<Blockref> {
        let start = index.checked_mul(BLOCKREF_BYTES)?;
        let raw: &[u8; BLOCKREF_BYTES] = buf.get(start..start + BLOCKREF_BYTES)?.try_into().ok()?;
        Some(Blockref::decode(raw))
    }

    pub fn encode(&self) -> [u8; BLOCKREF_BYTES] {
        let mut b = [0u8; BLOCKREF_BYTES];
        b[OFF_TYPE] = self.btype.to_u8();
        b[OFF_METHODS] = self.methods;
        b[OFF_COPYID] = self.copyid;
        b[OFF_KEYBITS] = self.keybits;
        b[OFF_VRADIX] = self.vradix;
        b[OFF_FLAGS] = self.flags;
        put_u16(&mut b, OFF_LEAF_COUNT, self.leaf_count);
        put_u64(&mut b, OFF_KEY, self.key);
        put_u64(&mut b, OFF_MIRROR_TID, self.mirror_tid);
        put_u64(&mut b, OFF_MODIFY_TID, self.modify_tid);
        put_u64(&mut b, OFF_DATA_OFF, self.data_off.0);
        put_u64(&mut b, OFF_UPDATE_TID, self.update_tid);
        b[OFF_EMBED..OFF_EMBED + EMBED_BYTES].copy_from_slice(&self.embed);
        b[OFF_CHECK..OFF_CHECK + CHECK_BYTES].copy_from_slice(&self.check);
        b
    }

    /// Write this blockref at `index` of a blockref array.
    pub fn encode_at(&self, buf: &mut [u8], index: usize) {
        let start = index * BLOCKREF_BYTES;
        buf[start..start + BLOCKREF_BYTES].copy_from_slice(&self.encode());
    }

    pub fn is_empty(&self) -> bool {
        self.btype == BlockrefType::Empty
    }

    /// The last key this blockref covers: key + 2^keybits - 1, saturating.
    pub fn key_end(&self) -> u64 {
        if self.keybits >= 64 {
            u64::MAX
        } else {
            self.key.saturating_add((1u64 << self.keybits) - 1)
        }
    }

    pub fn check_method(&self) -> u8 {
        super::dec_check(self.methods)
    }
    pub fn comp_method(&self) -> u8 {
        super::dec_comp(self.methods)
    }

    // Embedded statistics of INODE and INDIRECT brefs.
    pub fn data_count(&self) -> u64 {
        u64_at(&self.embed, 0)
    }
    pub fn inode_count(&self) -> u64 {
        u64_at(&self.embed, 8)
    }
    pub fn set_stats(&mut self, data_count: u64, inode_count: u64) {
        put_u64(&mut self.embed, 0, data_count);
        put_u64(&mut self.embed, 8, inode_count);
    }

    /// The dirent head embedded in a DIRENT blockref.
    pub fn dirent(&self) -> DirentHead {
        DirentHead {
            inum: u64_at(&self.embed, 0),
            namlen: u16_at(&self.embed, 8),
            obj_type: self.embed[10],
        }
    }
    pub fn set_dirent(&mut self, d: DirentHead) {
        self.embed = [0; EMBED_BYTES];
        put_u64(&mut self.embed, 0, d.inum);
        put_u16(&mut self.embed, 8, d.namlen);
        self.embed[10] = d.obj_type;
    }

    // Freemap hints in the check area of FREEMAP_NODE/LEAF brefs.
    pub fn freemap_icrc(&self) -> u32 {
        super::le::u32_at(&self.check, 0)
    }
    pub fn freemap_bigmask(&self) -> u32 {
        super::le::u32_at(&self.check, 4)
    }
    pub fn freemap_avail(&self) -> u64 {
        u64_at(&self.check, 8)
    }
    pub fn set_freemap_hints(&mut self, bigmask: u32, avail: u64) {
        super::le::put_u32(&mut self.check, 4, bigmask);
        put_u64(&mut self.check, 8, avail);
    }
}

impl fmt::Debug for Blockref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:02x} key={:016x}/{} data_off={:?} mirror_tid={:016x} modify_tid={:016x} methods={:02x} leafs={}",
            self.btype.name(),
            self.btype.to_u8(),
            self.key,
            self.keybits,
            self.data_off,
            self.mirror_tid,
            self.modify_tid,
            self.methods,
            self.leaf_count
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_field() {
        let mut b = [0u8; BLOCKREF_BYTES];
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(37).wrapping_add(11);
        }
        let br = Blockref::decode(&b);
        assert_eq!(br.encode(), b);
    }

    #[test]
    fn data_off_radix() {
        let d = DataOff::new(0x1234_0000, 16);
        assert_eq!(d.offset(), 0x1234_0000);
        assert_eq!(d.radix(), 16);
        assert_eq!(d.bytes(), 65536);
        assert_eq!(DataOff(0).bytes(), 0);
        assert!(DataOff(0x1234_0000).is_empty());
    }

    #[test]
    fn key_end_saturates() {
        let mut br = Blockref::EMPTY;
        br.keybits = 64;
        assert_eq!(br.key_end(), u64::MAX);
        br.keybits = 16;
        br.key = 0x10000;
        assert_eq!(br.key_end(), 0x1ffff);
        br.key = u64::MAX - 5;
        assert_eq!(br.key_end(), u64::MAX);
    }
}
