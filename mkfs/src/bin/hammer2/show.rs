//! The blockref printer behind `show`, `freemap` and `volhdr`: one entry
//! per blockref in DragonFly's `hammer2 show` layout, recursing into
//! inodes, indirect blocks and freemap nodes.
//!
//! Every block is read raw and its check code verified here (data blocks
//! too: an image tool can afford it). A block that cannot be read, does
//! not decode or fails its check is flagged inline and counted in
//! `Walker::damaged`; the walk goes on. As DragonFly does, the children of
//! a block that failed its check are listed but not descended into, since
//! they are probably garbage.

use crate::fmt::{self, type_name};
use bufcache::BlockDevice;
use hammer2::chain::{decode_set, DEPTH_MAX};
use hammer2::disk::freemap::BmapData;
use hammer2::disk::{
    self, check_method as cm, Blockref, BlockrefType, InodeData, VolumeHeader, FREEMAP_COUNT,
    ZONE_FREEMAP_00, ZONE_FREEMAP_END, ZONE_FREEMAP_INC, ZONE_SEG,
};
use hammer2::pfs::DIRENT_EMBEDDED_NAME_MAX;
use std::io::{self, Write};

use crate::freemap::FreemapStats;

/// Spaces per level of the tree, as DragonFly's default.
pub const TAB: usize = 2;
/// Column of the second and later lines of an entry, past its first.
const CONT: usize = 13;
/// Damage descriptions kept for the closing summary on stderr.
const PROBLEMS_KEPT_MAX: usize = 64;

/// What the walker needs from the volume header in use.
#[derive(Clone, Copy, Debug)]
pub struct VolumeCtx {
    pub volu_size: u64,
    pub aux_end: u64,
    /// Reads must end at or below this (the volume size and the device
    /// size, whichever is smaller).
    pub read_limit: u64,
}

impl VolumeCtx {
    pub fn new(vh: &VolumeHeader, dev_size: u64) -> VolumeCtx {
        VolumeCtx {
            volu_size: vh.volu_size,
            aux_end: vh.aux_end,
            read_limit: vh.volu_size.min(dev_size),
        }
    }
}

pub struct Walker<'a> {
    dev: &'a dyn BlockDevice,
    ctx: VolumeCtx,
    out: &'a mut dyn Write,
    /// Print the check line of data blocks too (they are verified anyway).
    pub verbose: bool,
    /// Blocks flagged as damaged.
    pub damaged: u64,
    /// The first few damage reports, for stderr.
    pub problems: Vec<String>,
    /// Totals over the freemap leaves seen, when asked for.
    pub stats: Option<FreemapStats>,
    /// Offsets of the blocks on the path from the root, to catch loops.
    path: Vec<u64>,
}

/// A block as read for display.
#[derive(Default)]
struct Loaded {
    media: Vec<u8>,
    /// Read or decode failures.
    problem: Option<String>,
    inode: Option<InodeData>,
    header: Option<VolumeHeader>,
    bmaps: Option<Vec<BmapData>>,
    children: Vec<Blockref>,
}

impl<'a> Walker<'a> {
    pub fn new(dev: &'a dyn BlockDevice, ctx: VolumeCtx, out: &'a mut dyn Write) -> Walker<'a> {
        Walker {
            dev,
            ctx,
            out,
            verbose: false,
            damaged: 0,
            problems: Vec::new(),
            stats: None,
            path: Vec::new(),
        }
    }

    fn flag(&mut self, br: &Blockref, what: &str) {
        self.damaged += 1;
        if self.problems.len() < PROBLEMS_KEPT_MAX {
            self.problems.push(format!(
                "{} {:016x} {:016x}/{}: {what}",
                type_name(br.btype),
                br.data_off.0,
                br.key,
                br.keybits
            ));
        }
    }

    /// The bytes a blockref references, bounds-checked; the volume
    /// header itself for the VOLUME and FREEMAP pseudo types.
    fn read_media(&self, br: &Blockref) -> Result<Vec<u8>, String> {
        let at = br.data_off.offset();
        let bytes = match br.btype {
            BlockrefType::Volume | BlockrefType::Freemap => disk::VOLUME_BYTES as u64,
            _ => br.data_off.bytes(),
        };
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let radix = br.data_off.radix();
        if !(6..=disk::PBUFRADIX).contains(&radix) {
            return Err(format!("bad size radix {radix}"));
        }
        if (at & (disk::PBUFSIZE - 1)) + bytes > disk::PBUFSIZE {
            return Err(format!("{bytes}-byte block crosses a 64 KiB boundary"));
        }
        if at
            .checked_add(bytes)
            .is_none_or(|end| end > self.ctx.read_limit)
        {
            return Err(format!("{bytes}-byte block lies past the volume end"));
        }
        let mut buf = vec![0u8; bytes as usize];
        self.dev
            .read_at(&mut buf, at)
            .map_err(|e| format!("read error: {e}"))?;
        Ok(buf)
    }

    fn load(&self, br: &Blockref) -> Loaded {
        let mut l = Loaded::default();
        match self.read_media(br) {
            Ok(m) => l.media = m,
            Err(e) => {
                l.problem = Some(e);
                return l;
            }
        }
        let at = br.data_off.offset();
        match br.btype {
            BlockrefType::Inode => match InodeData::decode(&l.media, at) {
                Ok(ino) => {
                    let sroot = ino.meta.pfs_type & 15 == disk::pfs_type::SUPROOT;
                    if sroot || !ino.meta.has_direct_data() {
                        l.children = ino.blockset().to_vec();
                    }
                    l.inode = Some(ino);
                }
                Err(e) => l.problem = Some(e.to_string()),
            },
            BlockrefType::Indirect | BlockrefType::FreemapNode => {
                l.children = decode_set(&l.media);
            }
            BlockrefType::Volume | BlockrefType::Freemap => {
                match VolumeHeader::decode(&l.media, at) {
                    Ok(vh) => {
                        l.children = if br.btype == BlockrefType::Volume {
                            vh.sroot_blockset.to_vec()
                        } else {
                            vh.freemap_blockset.to_vec()
                        };
                        l.header = Some(vh);
                    }
                    Err(e) => l.problem = Some(e.to_string()),
                }
            }
            BlockrefType::FreemapLeaf => {
                let bmaps: Vec<BmapData> = (0..FREEMAP_COUNT)
                    .filter_map(|i| BmapData::decode_at(&l.media, i))
                    .collect();
                if bmaps.len() == FREEMAP_COUNT {
                    l.bmaps = Some(bmaps);
                } else {
                    l.problem = Some(format!(
                        "freemap leaf of {} bytes is too short",
                        l.media.len()
                    ));
                }
            }
            BlockrefType::Dirent => {
                let namlen = br.dirent().namlen as usize;
                if namlen > DIRENT_EMBEDDED_NAME_MAX && l.media.len() < namlen {
                    l.problem = Some(format!(
                        "dirent name of {namlen} bytes in a block of {}",
                        l.media.len()
                    ));
                }
            }
            _ => {}
        }
        l
    }

    /// The check-code part of the third line: `meth=... xxh=...`, or a
    /// failure marker. Returns the text and whether it failed.
    fn check_text(br: &Blockref, media: &[u8]) -> (String, bool) {
        let meth = fmt::methods(br.methods);
        if matches!(br.btype, BlockrefType::Volume | BlockrefType::Freemap) {
            // The pseudo blockrefs carry no check code; the header has
            // its own CRCs (see volhdr).
            return (format!("meth={meth} "), false);
        }
        match hammer2::check::verify(br, media) {
            Ok(()) => {
                let value = match br.check_method() {
                    cm::ISCSI32 => format!("icrc={:08x} ", br.freemap_icrc()),
                    cm::XXHASH64 => {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(&br.check[..8]);
                        format!("xxh={:016x} ", u64::from_le_bytes(a))
                    }
                    cm::FREEMAP => format!("fcrc={:08x} ", br.freemap_icrc()),
                    cm::BLAKE3 => format!("blake3={} ", hex32(&br.check[..32])),
                    _ => String::new(),
                };
                (format!("meth={meth} {value}"), false)
            }
            Err(hammer2::Error::CheckMismatch {
                method,
                expected,
                actual,
                ..
            }) => {
                let text = match method {
                    cm::ISCSI32 => format!("(icrc {meth} {expected}/{actual} failed) "),
                    cm::XXHASH64 => format!("(xxh {meth} {expected}/{actual} failed) "),
                    cm::FREEMAP => format!("(fcrc {meth} {expected}/{actual} failed) "),
                    cm::SHA192 => format!("(sha192 {meth} failed) "),
                    cm::BLAKE3 => format!("(blake3 {meth} {expected}/{actual} failed) "),
                    other => format!("(check {other} {meth} failed) "),
                };
                (text, true)
            }
            // A method this build cannot verify (a newer extension):
            // shown, not counted as damage.
            Err(e) => (format!("meth={meth} (unverified: {e}) "), false),
        }
    }

    /// Print `br` (entry `idx` of its parent set) at indent `tab`, and
    /// below it its children when `recurse`.
    pub fn show_bref(
        &mut self,
        tab: usize,
        idx: usize,
        br: &Blockref,
        recurse: bool,
    ) -> io::Result<()> {
        let name = type_name(br.btype);
        let pad = 8usize.saturating_sub(name.len());
        writeln!(
            self.out,
            "{:tab$}{name}.{idx:<3}{:pad$} {:016x} {:016x}/{:<2} ",
            "", "", br.data_off.0, br.key, br.keybits
        )?;
        write!(
            self.out,
            "{:w$}vol=0 mir={:016x} mod={:016x} lfcnt={} ",
            "",
            br.mirror_tid,
            br.modify_tid,
            br.leaf_count,
            w = tab + CONT
        )?;
        let looped = !br.data_off.is_empty() && self.path.contains(&br.data_off.offset());
        let l = if looped {
            Loaded {
                problem: Some("block loops back to one above it".to_string()),
                ..Loaded::default()
            }
        } else {
            self.load(br)
        };

        let freemap_type = matches!(
            br.btype,
            BlockrefType::FreemapNode | BlockrefType::FreemapLeaf
        );
        if !l.children.is_empty() || br.flags != 0 || freemap_type {
            write!(self.out, "\n{:w$}", "", w = tab + CONT)?;
        }
        if !l.children.is_empty() {
            write!(self.out, "bcnt={} ", l.children.len())?;
        }
        if br.flags != 0 {
            write!(self.out, "flags={:02x} ", br.flags)?;
        }
        if freemap_type {
            write!(
                self.out,
                "bigmask={:08x} avail={} ",
                br.freemap_bigmask(),
                br.freemap_avail()
            )?;
        }

        let mut failed = false;
        if let Some(p) = &l.problem {
            write!(self.out, "\n{:w$}(error: {p}) ", "", w = tab + CONT)?;
            let p = p.clone();
            self.flag(br, &p);
            failed = true;
        } else if !l.media.is_empty() {
            let (text, bad) = Self::check_text(br, &l.media);
            if br.btype != BlockrefType::Data || self.verbose || bad {
                write!(self.out, "\n{:w$}{text}", "", w = tab + CONT)?;
            }
            if bad {
                self.flag(br, "check code mismatch");
                failed = true;
            }
        }

        let child_tab = tab + TAB;
        let obrace = self.show_data(child_tab, br, &l)?;
        if br.btype == BlockrefType::FreemapLeaf {
            if let (Some(stats), Some(bmaps)) = (self.stats.as_mut(), &l.bmaps) {
                stats.add_leaf(br.key, bmaps, self.ctx.aux_end, self.ctx.volu_size);
            }
        }

        if recurse && !l.children.is_empty() {
            if self.path.len() >= DEPTH_MAX {
                writeln!(
                    self.out,
                    "{:child_tab$}(error: tree deeper than {DEPTH_MAX} levels; not descended)",
                    ""
                )?;
                self.flag(br, "tree too deep");
            } else {
                self.path.push(br.data_off.offset());
                for (i, child) in l.children.iter().enumerate() {
                    if !child.is_empty() {
                        self.show_bref(child_tab, i, child, !failed)?;
                    }
                }
                self.path.pop();
            }
        }

        if obrace {
            match (&l.inode, br.btype) {
                (Some(ino), BlockrefType::Inode) => writeln!(
                    self.out,
                    "{:tab$}}} ({name}.{idx}, \"{}\")",
                    "",
                    fmt::name_string(ino.name())
                )?,
                _ => writeln!(self.out, "{:tab$}}} ({name}.{idx})", "")?,
            }
        }
        Ok(())
    }

    /// The rest of an entry's last line and its body. True when it opened
    /// a brace that the caller closes after the children.
    fn show_data(&mut self, tab: usize, br: &Blockref, l: &Loaded) -> io::Result<bool> {
        match br.btype {
            BlockrefType::Inode => match &l.inode {
                Some(ino) => {
                    writeln!(self.out, "{{")?;
                    self.show_inode(tab, br, ino)?;
                    Ok(true)
                }
                None => {
                    writeln!(self.out)?;
                    Ok(false)
                }
            },
            BlockrefType::Indirect => {
                writeln!(self.out, "{{")?;
                Ok(true)
            }
            BlockrefType::Dirent => {
                writeln!(self.out, "{{")?;
                let d = br.dirent();
                let namlen = d.namlen as usize;
                let name: &[u8] = if namlen <= DIRENT_EMBEDDED_NAME_MAX {
                    &br.check[..namlen]
                } else {
                    l.media.get(..namlen).unwrap_or(&[])
                };
                writeln!(
                    self.out,
                    "{:tab$}filename \"{}\"",
                    "",
                    fmt::name_string(name)
                )?;
                writeln!(self.out, "{:tab$}inum {:#018x}", "", d.inum)?;
                writeln!(self.out, "{:tab$}nlen {}", "", d.namlen)?;
                writeln!(
                    self.out,
                    "{:tab$}type {}",
                    "",
                    disk::ObjType::from_u8(d.obj_type).name()
                )?;
                Ok(true)
            }
            BlockrefType::FreemapNode | BlockrefType::FreemapLeaf => {
                writeln!(self.out, "{{")?;
                let slot = (br.data_off.offset() & (ZONE_SEG - 1)) / disk::PBUFSIZE;
                if (ZONE_FREEMAP_00..ZONE_FREEMAP_END).contains(&slot) {
                    let rotation = (slot - ZONE_FREEMAP_00) / ZONE_FREEMAP_INC;
                    writeln!(self.out, "{:tab$}rotation={rotation}", "")?;
                } else {
                    writeln!(
                        self.out,
                        "{:tab$}rotation=? (slot {slot} is outside the freemap area)",
                        ""
                    )?;
                }
                if let Some(bmaps) = &l.bmaps {
                    for (i, bm) in bmaps.iter().enumerate() {
                        let off = br
                            .key
                            .wrapping_add(i as u64 * (1u64 << disk::FREEMAP_LEVEL0_RADIX));
                        write!(
                            self.out,
                            "{:w$}{off:016x} {i:04}.{:04x} linear={:06x} avail={:06x}",
                            "",
                            bm.class,
                            bm.linear,
                            bm.avail,
                            w = tab + 4
                        )?;
                        for q in bm.bitmapq {
                            write!(self.out, " {q:016x}")?;
                        }
                        writeln!(self.out)?;
                    }
                }
                writeln!(self.out, "{:tab$}}}", "")?;
                Ok(true)
            }
            BlockrefType::Volume | BlockrefType::Freemap => match &l.header {
                Some(vh) => {
                    writeln!(
                        self.out,
                        "mirror_tid={:016x} freemap_tid={:016x} {{",
                        vh.mirror_tid, vh.freemap_tid
                    )?;
                    Ok(true)
                }
                None => {
                    writeln!(self.out)?;
                    Ok(false)
                }
            },
            _ => {
                writeln!(self.out)?;
                Ok(false)
            }
        }
    }

    fn show_inode(&mut self, tab: usize, br: &Blockref, ino: &InodeData) -> io::Result<()> {
        let m = &ino.meta;
        let o = &mut self.out;
        let root = m.is_pfs_root() || m.pfs_type & 15 == disk::pfs_type::SUPROOT;
        writeln!(
            o,
            "{:tab$}filename \"{}\"",
            "",
            fmt::name_string(ino.name())
        )?;
        writeln!(o, "{:tab$}version  {}", "", m.version)?;
        if root {
            writeln!(
                o,
                "{:tab$}pfs_st   {} ({})",
                "",
                m.pfs_subtype,
                disk::pfs_subtype::name(m.pfs_subtype)
            )?;
        }
        writeln!(o, "{:tab$}uflags   {:#010x}", "", m.uflags)?;
        if m.rmajor != 0 || m.rminor != 0 {
            writeln!(o, "{:tab$}rmajor   {}", "", m.rmajor)?;
            writeln!(o, "{:tab$}rminor   {}", "", m.rminor)?;
        }
        writeln!(o, "{:tab$}ctime    {}", "", fmt::time_string(m.ctime))?;
        writeln!(o, "{:tab$}mtime    {}", "", fmt::time_string(m.mtime))?;
        writeln!(o, "{:tab$}atime    {}", "", fmt::time_string(m.atime))?;
        writeln!(o, "{:tab$}btime    {}", "", fmt::time_string(m.btime))?;
        writeln!(o, "{:tab$}uid      {}", "", m.uid)?;
        writeln!(o, "{:tab$}gid      {}", "", m.gid)?;
        writeln!(o, "{:tab$}type     {}", "", m.obj_type.name())?;
        writeln!(o, "{:tab$}opflgs   {:#04x}", "", m.op_flags)?;
        writeln!(o, "{:tab$}capflgs  {:#06x}", "", m.cap_flags)?;
        writeln!(o, "{:tab$}mode     {:<7o}", "", m.mode)?;
        writeln!(o, "{:tab$}inum     {:#018x}", "", m.inum)?;
        let embedded = m.has_direct_data() && m.size <= disk::EMBEDDED_BYTES as u64;
        writeln!(
            o,
            "{:tab$}size     {} {}",
            "",
            m.size,
            if embedded { "(embedded data)" } else { "" }
        )?;
        writeln!(o, "{:tab$}nlinks   {}", "", m.nlinks)?;
        writeln!(o, "{:tab$}iparent  {:#018x}", "", m.iparent)?;
        writeln!(o, "{:tab$}name_key {:#018x}", "", m.name_key)?;
        writeln!(o, "{:tab$}name_len {}", "", m.name_len)?;
        writeln!(o, "{:tab$}ncopies  {}", "", m.ncopies)?;
        writeln!(o, "{:tab$}compalg  {}", "", fmt::comp_mode(m.comp_algo))?;
        writeln!(o, "{:tab$}checkalg {}", "", fmt::check_mode(m.check_algo))?;
        if root {
            writeln!(o, "{:tab$}pfs_nmas {}", "", m.pfs_nmasters)?;
            writeln!(
                o,
                "{:tab$}pfs_type {} ({})",
                "",
                m.pfs_type,
                disk::pfs_type::name(m.pfs_type)
            )?;
            writeln!(o, "{:tab$}pfs_inum {:#018x}", "", m.pfs_inum)?;
            writeln!(o, "{:tab$}pfs_clid {}", "", m.pfs_clid)?;
            writeln!(o, "{:tab$}pfs_fsid {}", "", m.pfs_fsid)?;
            writeln!(o, "{:tab$}pfs_lsnap_tid {:#018x}", "", m.pfs_lsnap_tid)?;
        }
        writeln!(o, "{:tab$}data_quota  {}", "", m.data_quota)?;
        writeln!(o, "{:tab$}data_count  {}", "", br.data_count())?;
        writeln!(o, "{:tab$}inode_quota {}", "", m.inode_quota)?;
        writeln!(o, "{:tab$}inode_count {}", "", br.inode_count())?;
        Ok(())
    }
}

/// A pseudo blockref for the volume header at `offset` (type VOLUME for
/// the topology, FREEMAP for the freemap), as DragonFly builds one.
pub fn header_bref(btype: BlockrefType, offset: u64, mirror_tid: u64) -> Blockref {
    let mut br = Blockref::EMPTY;
    br.btype = btype;
    br.mirror_tid = mirror_tid;
    br.data_off = disk::DataOff::new(offset, disk::PBUFRADIX);
    br
}

/// Hex of a check value.
fn hex32(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bufcache::MemDevice;
    use hammer2::disk::DataOff;

    const SIZE: u64 = 8 << 20;

    fn indirect_at(at: u64) -> Blockref {
        let mut br = Blockref::EMPTY;
        br.btype = BlockrefType::Indirect;
        br.keybits = 63;
        br.data_off = DataOff::new(at, 10);
        br
    }

    fn walk(dev: &MemDevice, root: &Blockref) -> (String, u64) {
        let ctx = VolumeCtx {
            volu_size: SIZE,
            aux_end: 0,
            read_limit: SIZE,
        };
        let mut out = Vec::new();
        let mut w = Walker::new(dev, ctx, &mut out);
        w.show_bref(0, 0, root, true).unwrap();
        let damaged = w.damaged;
        (String::from_utf8(out).unwrap(), damaged)
    }

    #[test]
    fn a_loop_is_flagged_not_followed() {
        let dev = MemDevice::new(SIZE);
        let root = indirect_at(0x10000);
        let mut blk = vec![0u8; 1024];
        root.encode_at(&mut blk, 0); // the block points at itself
        dev.write_at(&blk, 0x10000).unwrap();
        let (text, damaged) = walk(&dev, &root);
        assert_eq!(damaged, 1);
        assert!(text.contains("loops back"), "{text}");
    }

    #[test]
    fn a_too_deep_chain_stops() {
        let dev = MemDevice::new(SIZE);
        for level in 0..(DEPTH_MAX as u64 + 8) {
            let mut blk = vec![0u8; 1024];
            indirect_at(0x10000 * (level + 2)).encode_at(&mut blk, 0);
            dev.write_at(&blk, 0x10000 * (level + 1)).unwrap();
        }
        let (text, damaged) = walk(&dev, &indirect_at(0x10000));
        assert_eq!(damaged, 1);
        assert!(text.contains("deeper than"), "{text}");
    }

    #[test]
    fn bad_offsets_are_flagged() {
        let dev = MemDevice::new(SIZE);
        let mut blk = vec![0u8; 1024];
        let mut past_end = indirect_at(SIZE);
        past_end.btype = BlockrefType::Data;
        past_end.encode_at(&mut blk, 0);
        let mut crossing = indirect_at(0x1fc00);
        crossing.data_off = DataOff::new(0x1fc00, 12);
        crossing.encode_at(&mut blk, 1);
        let mut radix = indirect_at(0x30000);
        radix.data_off = DataOff(0x30000 | 40);
        radix.encode_at(&mut blk, 2);
        dev.write_at(&blk, 0x10000).unwrap();
        let (text, damaged) = walk(&dev, &indirect_at(0x10000));
        assert_eq!(damaged, 3, "{text}");
        assert!(text.contains("past the volume end"));
        assert!(text.contains("crosses a 64 KiB boundary"));
        assert!(text.contains("bad size radix 40"));
    }
}
