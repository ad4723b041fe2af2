//! The 64 KiB volume header, with its three CRC-32C check codes.

use super::blockref::{Blockref, BLOCKREF_BYTES};
use super::le::{put_u32, put_u64, u32_at, u64_at};
use super::uuid::Uuid;
use super::{MAX_VOLUMES, SET_COUNT};
use crate::check::crc32c;
use crate::error::{Error, Result};

pub const VOLUME_BYTES: usize = 65536;
pub const VOLUME_ID_HBO: u64 = 0x4841_4d32_0517_2011;
pub const VOLUME_ID_ABO: u64 = 0x1120_1705_324d_4148;

const OFF_MAGIC: usize = 0x000;
const OFF_BOOT_BEG: usize = 0x008;
const OFF_BOOT_END: usize = 0x010;
const OFF_AUX_BEG: usize = 0x018;
const OFF_AUX_END: usize = 0x020;
const OFF_VOLU_SIZE: usize = 0x028;
const OFF_VERSION: usize = 0x030;
const OFF_FLAGS: usize = 0x034;
const OFF_COPYID: usize = 0x038;
const OFF_FREEMAP_VERSION: usize = 0x039;
const OFF_PEER_TYPE: usize = 0x03A;
const OFF_VOLU_ID: usize = 0x03B;
const OFF_NVOLUMES: usize = 0x03C;
const OFF_FSID: usize = 0x040;
const OFF_FSTYPE: usize = 0x050;
const OFF_ALLOCATOR_SIZE: usize = 0x060;
const OFF_ALLOCATOR_FREE: usize = 0x068;
const OFF_ALLOCATOR_BEG: usize = 0x070;
const OFF_MIRROR_TID: usize = 0x078;
const OFF_FREEMAP_TID: usize = 0x090;
const OFF_BULKFREE_TID: usize = 0x098;
const OFF_TOTAL_SIZE: usize = 0x0C0;
const OFF_COPYEXISTS: usize = 0x0C8;
const OFF_ICRC_SECTS: usize = 0x1E0;
pub const OFF_SROOT_BLOCKSET: usize = 0x200;
pub const OFF_FREEMAP_BLOCKSET: usize = 0x800;
const OFF_VOLU_LOFF: usize = 0xE00;
const OFF_COPYINFO: usize = 0x1000;
const COPYINFO_BYTES: usize = 0x8000;
pub const OFF_ICRC_VOLHEADER: usize = 0xFFFC;

/// Which icrc_sects entry covers which range.
pub const ICRC_SECT0: usize = 7; // 0x000..0x1FC
pub const ICRC_SECT1: usize = 6; // 0x200..0x400
const ICRC0_SIZE: usize = 512 - 4;
const ICRC1_OFF: usize = 512;
const ICRC1_SIZE: usize = 512;

const _: () = assert!(OFF_ICRC_SECTS + 8 * 4 == OFF_SROOT_BLOCKSET);
const _: () = assert!(OFF_SROOT_BLOCKSET + SET_COUNT * BLOCKREF_BYTES == 0x400);
const _: () = assert!(OFF_VOLU_LOFF + MAX_VOLUMES * 8 == OFF_COPYINFO);
const _: () = assert!(OFF_COPYINFO + COPYINFO_BYTES == 0x9000);
const _: () = assert!(OFF_ICRC_VOLHEADER + 4 == VOLUME_BYTES);
const _: () = assert!(ICRC1_OFF == OFF_SROOT_BLOCKSET);

/// A decoded volume header. `raw` keeps the whole 64 KiB so fields this
/// project does not interpret (copyinfo, reserved) survive a rewrite.
#[derive(Clone, PartialEq, Eq)]
pub struct VolumeHeader {
    pub magic: u64,
    pub boot_beg: u64,
    pub boot_end: u64,
    pub aux_beg: u64,
    pub aux_end: u64,
    pub volu_size: u64,
    pub version: u32,
    pub flags: u32,
    pub copyid: u8,
    pub freemap_version: u8,
    pub peer_type: u8,
    pub volu_id: u8,
    pub nvolumes: u8,
    pub fsid: Uuid,
    pub fstype: Uuid,
    pub allocator_size: u64,
    pub allocator_free: u64,
    pub allocator_beg: u64,
    pub mirror_tid: u64,
    pub freemap_tid: u64,
    pub bulkfree_tid: u64,
    pub total_size: u64,
    pub copyexists: [u32; 8],
    pub icrc_sects: [u32; 8],
    pub sroot_blockset: [Blockref; SET_COUNT],
    pub freemap_blockset: [Blockref; SET_COUNT],
    pub volu_loff: [u64; MAX_VOLUMES],
    pub icrc_volheader: u32,
    raw: Vec<u8>,
}

/// Which of the three header CRCs hold.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct HeaderCrcs {
    pub sect0: (u32, u32),
    pub sect1: (u32, u32),
    pub volheader: (u32, u32),
}

impl HeaderCrcs {
    pub fn all_good(&self) -> bool {
        self.sect0.0 == self.sect0.1
            && self.sect1.0 == self.sect1.1
            && self.volheader.0 == self.volheader.1
    }
}

impl VolumeHeader {
    /// An all-zero header with the magic and fstype set.
    pub fn new() -> VolumeHeader {
        let raw = vec![0u8; VOLUME_BYTES];
        let mut vh = VolumeHeader::decode_fields(&raw);
        vh.magic = VOLUME_ID_HBO;
        vh.fstype = super::uuid::FSTYPE_HAMMER2;
        vh
    }

    fn decode_fields(b: &[u8]) -> VolumeHeader {
        let mut copyexists = [0u32; 8];
        let mut icrc_sects = [0u32; 8];
        for i in 0..8 {
            copyexists[i] = u32_at(b, OFF_COPYEXISTS + i * 4);
            icrc_sects[i] = u32_at(b, OFF_ICRC_SECTS + i * 4);
        }
        let mut volu_loff = [0u64; MAX_VOLUMES];
        for (i, v) in volu_loff.iter_mut().enumerate() {
            *v = u64_at(b, OFF_VOLU_LOFF + i * 8);
        }
        let set_at = |base: usize| {
            let mut set = [Blockref::EMPTY; SET_COUNT];
            for (i, slot) in set.iter_mut().enumerate() {
                if let Some(br) =
                    Blockref::decode_at(&b[base..base + SET_COUNT * BLOCKREF_BYTES], i)
                {
                    *slot = br;
                }
            }
            set
        };
        VolumeHeader {
            magic: u64_at(b, OFF_MAGIC),
            boot_beg: u64_at(b, OFF_BOOT_BEG),
            boot_end: u64_at(b, OFF_BOOT_END),
            aux_beg: u64_at(b, OFF_AUX_BEG),
            aux_end: u64_at(b, OFF_AUX_END),
            volu_size: u64_at(b, OFF_VOLU_SIZE),
            version: u32_at(b, OFF_VERSION),
            flags: u32_at(b, OFF_FLAGS),
            copyid: b[OFF_COPYID],
            freemap_version: b[OFF_FREEMAP_VERSION],
            peer_type: b[OFF_PEER_TYPE],
            volu_id: b[OFF_VOLU_ID],
            nvolumes: b[OFF_NVOLUMES],
            fsid: Uuid::decode(&b[OFF_FSID..OFF_FSID + 16]),
            fstype: Uuid::decode(&b[OFF_FSTYPE..OFF_FSTYPE + 16]),
            allocator_size: u64_at(b, OFF_ALLOCATOR_SIZE),
            allocator_free: u64_at(b, OFF_ALLOCATOR_FREE),
            allocator_beg: u64_at(b, OFF_ALLOCATOR_BEG),
            mirror_tid: u64_at(b, OFF_MIRROR_TID),
            freemap_tid: u64_at(b, OFF_FREEMAP_TID),
            bulkfree_tid: u64_at(b, OFF_BULKFREE_TID),
            total_size: u64_at(b, OFF_TOTAL_SIZE),
            copyexists,
            icrc_sects,
            sroot_blockset: set_at(OFF_SROOT_BLOCKSET),
            freemap_blockset: set_at(OFF_FREEMAP_BLOCKSET),
            volu_loff,
            icrc_volheader: u32_at(b, OFF_ICRC_VOLHEADER),
            raw: b.to_vec(),
        }
    }

    /// Decode a 64 KiB header. Checks only that the buffer is whole and
    /// the magic is HAMMER2's; CRCs are reported by `crcs()`.
    pub fn decode(b: &[u8], at: u64) -> Result<VolumeHeader> {
        if b.len() < VOLUME_BYTES {
            return Err(Error::corrupt(
                format!("volume header is {} bytes", b.len()),
                at,
            ));
        }
        let b = &b[..VOLUME_BYTES];
        let magic = u64_at(b, OFF_MAGIC);
        if magic == VOLUME_ID_ABO {
            return Err(Error::corrupt(
                "volume header is in the other byte order".to_string(),
                at,
            ));
        }
        if magic != VOLUME_ID_HBO {
            return Err(Error::corrupt(
                format!("bad volume header magic {magic:#018x}"),
                at,
            ));
        }
        Ok(VolumeHeader::decode_fields(b))
    }

    /// Encode into 64 KiB, computing all three CRCs.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.raw.clone();
        b.resize(VOLUME_BYTES, 0);
        put_u64(&mut b, OFF_MAGIC, self.magic);
        put_u64(&mut b, OFF_BOOT_BEG, self.boot_beg);
        put_u64(&mut b, OFF_BOOT_END, self.boot_end);
        put_u64(&mut b, OFF_AUX_BEG, self.aux_beg);
        put_u64(&mut b, OFF_AUX_END, self.aux_end);
        put_u64(&mut b, OFF_VOLU_SIZE, self.volu_size);
        put_u32(&mut b, OFF_VERSION, self.version);
        put_u32(&mut b, OFF_FLAGS, self.flags);
        b[OFF_COPYID] = self.copyid;
        b[OFF_FREEMAP_VERSION] = self.freemap_version;
        b[OFF_PEER_TYPE] = self.peer_type;
        b[OFF_VOLU_ID] = self.volu_id;
        b[OFF_NVOLUMES] = self.nvolumes;
        self.fsid.encode(&mut b[OFF_FSID..OFF_FSID + 16]);
        self.fstype.encode(&mut b[OFF_FSTYPE..OFF_FSTYPE + 16]);
        put_u64(&mut b, OFF_ALLOCATOR_SIZE, self.allocator_size);
        put_u64(&mut b, OFF_ALLOCATOR_FREE, self.allocator_free);
        put_u64(&mut b, OFF_ALLOCATOR_BEG, self.allocator_beg);
        put_u64(&mut b, OFF_MIRROR_TID, self.mirror_tid);
        put_u64(&mut b, OFF_FREEMAP_TID, self.freemap_tid);
        put_u64(&mut b, OFF_BULKFREE_TID, self.bulkfree_tid);
        put_u64(&mut b, OFF_TOTAL_SIZE, self.total_size);
        for i in 0..8 {
            put_u32(&mut b, OFF_COPYEXISTS + i * 4, self.copyexists[i]);
            put_u32(&mut b, OFF_ICRC_SECTS + i * 4, self.icrc_sects[i]);
        }
        for (i, br) in self.sroot_blockset.iter().enumerate() {
            br.encode_at(&mut b[OFF_SROOT_BLOCKSET..], i);
        }
        for (i, br) in self.freemap_blockset.iter().enumerate() {
            br.encode_at(&mut b[OFF_FREEMAP_BLOCKSET..], i);
        }
        for (i, v) in self.volu_loff.iter().enumerate() {
            put_u64(&mut b, OFF_VOLU_LOFF + i * 8, *v);
        }
        // CRC order matters: sect1 first (sect0 covers it), then sect0,
        // then the whole header.
        let s1 = crc32c(&b[ICRC1_OFF..ICRC1_OFF + ICRC1_SIZE]);
        put_u32(&mut b, OFF_ICRC_SECTS + ICRC_SECT1 * 4, s1);
        let s0 = crc32c(&b[..ICRC0_SIZE]);
        put_u32(&mut b, OFF_ICRC_SECTS + ICRC_SECT0 * 4, s0);
        let vh = crc32c(&b[..OFF_ICRC_VOLHEADER]);
        put_u32(&mut b, OFF_ICRC_VOLHEADER, vh);
        b
    }

    /// The stored and computed values of the three CRCs, over the bytes
    /// this header was decoded from.
    pub fn crcs(&self) -> HeaderCrcs {
        let b = &self.raw;
        HeaderCrcs {
            sect0: (self.icrc_sects[ICRC_SECT0], crc32c(&b[..ICRC0_SIZE])),
            sect1: (
                self.icrc_sects[ICRC_SECT1],
                crc32c(&b[ICRC1_OFF..ICRC1_OFF + ICRC1_SIZE]),
            ),
            volheader: (self.icrc_volheader, crc32c(&b[..OFF_ICRC_VOLHEADER])),
        }
    }

    /// The raw bytes this header was decoded from (or created as).
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }
}

impl Default for VolumeHeader {
    fn default() -> Self {
        VolumeHeader::new()
    }
}

impl std::fmt::Debug for VolumeHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeHeader")
            .field("version", &self.version)
            .field("volu_size", &self.volu_size)
            .field("mirror_tid", &self.mirror_tid)
            .field("freemap_tid", &self.freemap_tid)
            .field("fsid", &self.fsid)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_then_decode_has_valid_crcs() {
        let mut vh = VolumeHeader::new();
        vh.version = 1;
        vh.volu_size = 1 << 31;
        vh.mirror_tid = 5;
        let raw = vh.encode();
        let back = VolumeHeader::decode(&raw, 0).unwrap();
        assert!(back.crcs().all_good());
        assert_eq!(back.mirror_tid, 5);
        assert_eq!(back.encode(), raw);
    }

    #[test]
    fn bad_magic_is_an_error() {
        let raw = vec![0u8; VOLUME_BYTES];
        assert!(VolumeHeader::decode(&raw, 0).is_err());
        assert!(VolumeHeader::decode(&raw[..100], 0).is_err());
    }
}
