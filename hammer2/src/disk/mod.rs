//! The on-disk format: every structure HAMMER2 stores, encoded and decoded
//! explicitly in little-endian byte order (DragonFly stores host order, and
//! every machine that writes these images is little-endian).
//!
//! Each structure has a plain in-memory type with `decode(&[u8]) -> Result`
//! and `encode(&self, &mut [u8])`. Decoders never panic: a short or
//! malformed buffer gives `Error::Corrupt`. Sizes and field offsets are
//! asserted at compile time next to each structure. The layout follows
//! DragonFly's `sys/vfs/hammer2/hammer2_disk.h`.

pub mod blockref;
pub mod freemap;
pub mod inode;
pub mod uuid;
pub mod volume;

pub use blockref::{Blockref, BlockrefType, DataOff, DirentHead, BLOCKREF_BYTES};
pub use freemap::{BmapData, BMAP_BYTES};
pub use inode::{InodeData, InodeMeta, ObjType, INODE_BYTES};
pub use uuid::Uuid;
pub use volume::{VolumeHeader, VOLUME_BYTES};

/// Physical I/O unit: allocations never cross a 64 KiB boundary.
pub const PBUFRADIX: u8 = 16;
pub const PBUFSIZE: u64 = 1 << PBUFRADIX;
/// Logical buffer size DragonFly uses for most metadata.
pub const LBUFSIZE: u64 = 16384;
/// Smallest allocation HAMMER2 makes (radix 10).
pub const RADIX_MIN: u8 = 10;
/// Largest allocation HAMMER2 makes (radix 16).
pub const RADIX_MAX: u8 = 16;
/// A blockset: four blockrefs, in the volume header and in inodes.
pub const SET_COUNT: usize = 4;
/// Bytes of direct data an inode can hold in place of its blockset.
pub const EMBEDDED_BYTES: usize = 512;
/// File data uses 64 KiB logical blocks.
pub const DATA_BLOCK_RADIX: u8 = 16;
pub const DATA_BLOCK_BYTES: u64 = 1 << DATA_BLOCK_RADIX;

/// Indirect block sizes: 4 KiB nominal minimum, 64 KiB maximum.
pub const IND_BYTES_MIN: usize = 4096;
pub const IND_BYTES_NOM: usize = 16384;
pub const IND_BYTES_MAX: usize = 65536;

/// The reserved segment at the start of every 1 GiB zone (4 MiB, 64 slots).
pub const ZONE_SEG: u64 = 4 * 1024 * 1024;
/// Volume headers live at the start of each of the first four 2 GiB zones.
pub const ZONE_BYTES64: u64 = 2 * 1024 * 1024 * 1024;
pub const NUM_VOLHDRS: usize = 4;
/// Slot of the first freemap rotation set in the reserved segment; each set
/// has one slot per level (5 levels), 8 sets.
pub const ZONE_FREEMAP_00: u64 = 1;
pub const ZONE_FREEMAP_INC: u64 = 5;
pub const ZONE_FREEMAP_END: u64 = 41;
pub const ZONE_FREEMAP_SETS: u64 = 8;

/// Volume alignment and the boot/aux area bounds.
pub const VOLUME_ALIGN: u64 = 8 * 1024 * 1024;
pub const BOOT_MIN_BYTES: u64 = VOLUME_ALIGN;
pub const BOOT_NOM_BYTES: u64 = 64 * 1024 * 1024;
pub const AUX_MIN_BYTES: u64 = VOLUME_ALIGN;
pub const AUX_NOM_BYTES: u64 = 256 * 1024 * 1024;
/// Largest boot and aux areas newfs accepts.
pub const BOOT_MAX_BYTES: u64 = 256 * 1024 * 1024;
pub const AUX_MAX_BYTES: u64 = 1024 * 1024 * 1024;

/// Freemap radixes: a level-N node's bref covers 2^radix bytes.
pub const FREEMAP_LEVEL0_RADIX: u8 = 22; // 4 MiB per bmap_data
pub const FREEMAP_LEVEL1_RADIX: u8 = 30; // 1 GiB per leaf
pub const FREEMAP_LEVEL2_RADIX: u8 = 38;
pub const FREEMAP_LEVEL3_RADIX: u8 = 46;
pub const FREEMAP_LEVEL4_RADIX: u8 = 54;
pub const FREEMAP_LEVEL5_RADIX: u8 = 62;
/// Physical size of every freemap node and leaf.
pub const FREEMAP_LEVELN_PSIZE: usize = 32768;
/// Entries in a freemap node or leaf (256).
pub const FREEMAP_COUNT: usize = FREEMAP_LEVELN_PSIZE / BLOCKREF_BYTES;
/// Each bitmap pair covers 16 KiB.
pub const FREEMAP_BLOCK_RADIX: u8 = 14;
pub const FREEMAP_BLOCK_SIZE: u64 = 1 << FREEMAP_BLOCK_RADIX;

/// Inode numbers: the PFS root is 1; new inodes start at 1024.
pub const INODE_START: u64 = 1024;
pub const INODE_MAXNAME: usize = 256;

/// Volume header versions.
pub const VOL_VERSION_MIN: u32 = 1;
pub const VOL_VERSION_MULTI_VOLUMES: u32 = 2;
pub const VOL_VERSION_DEFAULT: u32 = VOL_VERSION_MULTI_VOLUMES;
pub const VOL_VERSION_WIP: u32 = 3;
pub const MAX_VOLUMES: usize = 64;

/// Directory hash masks (see `dirhash`).
pub const DIRHASH_VISIBLE: u64 = 0x8000_0000_0000_0000;
pub const DIRHASH_LOMASK: u64 = 0x0000_0000_0000_7FFF;
pub const DIRHASH_HIMASK: u64 = 0xFFFF_FFFF_FFFF_0000;
pub const DIRHASH_FORCED: u64 = 0x0000_0000_0000_8000;

/// Check methods (high nibble of `Blockref::methods`).
pub mod check_method {
    pub const NONE: u8 = 0;
    pub const DISABLED: u8 = 1;
    pub const ISCSI32: u8 = 2;
    pub const XXHASH64: u8 = 3;
    pub const SHA192: u8 = 4;
    pub const FREEMAP: u8 = 5;
    /// Extension (not DragonFly's; see "Extension methods" in
    /// ARCHITECTURE.md): the 32-byte BLAKE3 hash of the physical block in
    /// the first 32 bytes of the check area. DragonFly cannot verify it.
    pub const BLAKE3: u8 = 8;
    pub const DEFAULT: u8 = XXHASH64;
    /// True for the methods this crate computes and verifies.
    pub const fn is_known(m: u8) -> bool {
        m <= FREEMAP || m == BLAKE3
    }
}

/// Compression methods (low nibble of `Blockref::methods`; an inode's
/// `comp_algo` keeps a level in its high nibble).
pub mod comp_method {
    pub const NONE: u8 = 0;
    pub const AUTOZERO: u8 = 1;
    pub const LZ4: u8 = 2;
    pub const ZLIB: u8 = 3;
    /// Extension (not DragonFly's; see "Extension methods" in
    /// ARCHITECTURE.md): a zstd frame, level in the inode's `comp_algo`
    /// high nibble (0 = zstd's default 3). DragonFly cannot read it.
    pub const ZSTD: u8 = 8;
    pub const DEFAULT: u8 = LZ4;
    /// True for the methods this crate reads and writes.
    pub const fn is_known(m: u8) -> bool {
        m <= ZLIB || m == ZSTD
    }
}

/// Compose a `methods` byte from a check and a compression method.
pub const fn enc_methods(check: u8, comp: u8) -> u8 {
    ((check & 15) << 4) | (comp & 15)
}
pub const fn dec_check(methods: u8) -> u8 {
    (methods >> 4) & 15
}
pub const fn dec_comp(methods: u8) -> u8 {
    methods & 15
}
/// The algorithm in an inode's `check_algo` or `comp_algo` (the low
/// nibble; `comp_algo` keeps a level in the high nibble).
pub const fn dec_algo(algo: u8) -> u8 {
    algo & 15
}
/// The level in an inode's `comp_algo`.
pub const fn dec_level(algo: u8) -> u8 {
    (algo >> 4) & 15
}

/// PFS types (low nibble of `pfs_type`).
pub mod pfs_type {
    pub const NONE: u8 = 0;
    pub const CACHE: u8 = 1;
    pub const SLAVE: u8 = 3;
    pub const SOFT_SLAVE: u8 = 4;
    pub const SOFT_MASTER: u8 = 5;
    pub const MASTER: u8 = 6;
    pub const SUPROOT: u8 = 8;
    pub const DUMMY: u8 = 9;

    /// The name hammer2(8) prints for a PFS type.
    pub fn name(t: u8) -> &'static str {
        match t & 15 {
            NONE => "NONE",
            CACHE => "CACHE",
            SLAVE => "SLAVE",
            SOFT_SLAVE => "SOFT_SLAVE",
            SOFT_MASTER => "SOFT_MASTER",
            MASTER => "MASTER",
            SUPROOT => "SUPROOT",
            DUMMY => "DUMMY",
            _ => "ILLEGAL",
        }
    }
}

/// PFS subtypes.
pub mod pfs_subtype {
    pub const NONE: u8 = 0;
    pub const SNAPSHOT: u8 = 1;
    pub const AUTOSNAP: u8 = 2;

    pub fn name(t: u8) -> &'static str {
        match t {
            NONE => "NONE",
            SNAPSHOT => "SNAPSHOT",
            AUTOSNAP => "AUTOSNAP",
            _ => "ILLEGAL",
        }
    }
}

/// Inode `op_flags`.
pub const OPFLAG_DIRECTDATA: u8 = 0x01;
pub const OPFLAG_PFSROOT: u8 = 0x02;
pub const OPFLAG_COPYIDS: u8 = 0x04;

/// Blockref `flags`.
pub const BREF_FLAG_PFSROOT: u8 = 0x01;
pub const BREF_FLAG_EMERG_MIP: u8 = 0x04;

/// Blockref `copyid` of storage local to this volume (all of it, with one
/// volume).
pub const COPYID_LOCAL: u8 = 0xFF;

/// `leaf_count` saturates here.
pub const BLOCKREF_LEAF_MAX: u16 = 65535;

/// Little-endian field access on byte slices whose length the caller has
/// already checked. Offsets are compile-time constants within the checked
/// length, so the slicing cannot fail.
pub(crate) mod le {
    pub fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }
    pub fn u32_at(b: &[u8], off: usize) -> u32 {
        let mut a = [0u8; 4];
        a.copy_from_slice(&b[off..off + 4]);
        u32::from_le_bytes(a)
    }
    pub fn u64_at(b: &[u8], off: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[off..off + 8]);
        u64::from_le_bytes(a)
    }
    pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
        b[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }
}

/// Offset of volume header copy `i` (0..4).
pub const fn volhdr_offset(i: usize) -> u64 {
    i as u64 * ZONE_BYTES64
}

/// How many volume header copies fit in a volume of `size` bytes.
pub fn volhdr_count(size: u64) -> usize {
    (0..NUM_VOLHDRS)
        .take_while(|&i| volhdr_offset(i) + ZONE_SEG <= size.max(ZONE_SEG))
        .count()
}
