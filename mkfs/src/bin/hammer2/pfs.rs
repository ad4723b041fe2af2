//! `hammer2 pfs-list` and `hammer2 info`: the PFSs under the super-root,
//! read offline from the image (DragonFly asks a mounted filesystem).

use crate::fmt::{self, GIB};
use crate::freemap::FreemapStats;
use crate::{CmdError, Image};
use hammer2::disk::{pfs_subtype, pfs_type};
use hammer2::pfs::{pfs_list, PfsInfo};
use hammer2::Volume;
use std::io::Write;

/// The type column of `pfs-list`: a MASTER with a subtype shows the
/// subtype, so snapshots read "SNAPSHOT".
fn type_label(p: &PfsInfo) -> &'static str {
    let m = p.root.meta();
    if m.pfs_type & 15 == pfs_type::MASTER && m.pfs_subtype != pfs_subtype::NONE {
        pfs_subtype::name(m.pfs_subtype)
    } else {
        pfs_type::name(m.pfs_type)
    }
}

fn sorted_pfs(img: &Image, vol: &Volume) -> Result<Vec<PfsInfo>, CmdError> {
    let mut list = pfs_list(vol).map_err(|e| img.fail("cannot list PFSs", &e))?;
    list.sort_by(|a, b| a.root.data.name().cmp(b.root.data.name()));
    Ok(list)
}

/// `hammer2 pfs-list IMG`.
pub fn list(img: &Image, out: &mut dyn Write) -> Result<u64, CmdError> {
    let list = sorted_pfs(img, &img.volume()?)?;
    writeln!(
        out,
        "Type        ClusterId (pfs_clid)                 Label on {}",
        img.path.display()
    )?;
    for p in &list {
        writeln!(
            out,
            "{:<11} {} {}",
            type_label(p),
            p.root.meta().pfs_clid,
            fmt::name_string(p.root.data.name())
        )?;
    }
    Ok(0)
}

/// Space per the freemap (zones without a leaf counted free).
pub struct Space {
    pub free: u64,
    /// Staged by a bulkfree pass (10): free after the next one.
    pub staged: u64,
    pub allocated: u64,
}

/// The freemap's totals of `vol`.
pub fn space(vol: &Volume) -> hammer2::Result<Space> {
    let vh = &vol.header;
    let leaves = hammer2::freemap::leaves(vol)?;
    let mut stats = FreemapStats::default();
    for leaf in leaves.values() {
        stats.add_leaf(leaf.bref.key, &leaf.bmaps, vh.aux_end, vh.volu_size);
    }
    Ok(Space {
        free: stats.accum16[0] + stats.untouched_free(vh.aux_end, vh.volu_size),
        staged: stats.accum16[2],
        allocated: stats.accum16[3],
    })
}

/// `hammer2 info IMG`: the volume, then each PFS.
pub fn info(img: &Image, out: &mut dyn Write) -> Result<u64, CmdError> {
    let vol = img.volume()?;
    let vh = &vol.header;
    let list = sorted_pfs(img, &vol)?;
    let gb = |v: u64| v as f64 / GIB;
    writeln!(out, "{}:", img.path.display())?;
    writeln!(out, "    version        {}", vh.version)?;
    writeln!(
        out,
        "    volu_size      {:#018x} ({:6.2}GB)",
        vh.volu_size,
        gb(vh.volu_size)
    )?;
    writeln!(out, "    fsid           {}", vh.fsid)?;
    writeln!(
        out,
        "    header         {} of {} in use",
        vol.header_index,
        vol.slots.len()
    )?;
    writeln!(out, "    mirror_tid     {:#018x}", vh.mirror_tid)?;
    writeln!(out, "    freemap_tid    {:#018x}", vh.freemap_tid)?;
    writeln!(out, "    bulkfree_tid   {:#018x}", vh.bulkfree_tid)?;
    writeln!(
        out,
        "    free           {:#018x} ({:6.2}GB) per the volume header (allocator_free)",
        vh.allocator_free,
        gb(vh.allocator_free)
    )?;
    let mut damaged = 0;
    match space(&vol) {
        Ok(s) => {
            writeln!(
                out,
                "    free           {:#018x} ({:6.2}GB) per the freemap",
                s.free,
                gb(s.free)
            )?;
            writeln!(
                out,
                "    possibly free  {:#018x} ({:6.2}GB) staged by bulkfree, free after its next pass",
                s.staged,
                gb(s.staged)
            )?;
            writeln!(
                out,
                "    allocated      {:#018x} ({:6.2}GB) per the freemap",
                s.allocated,
                gb(s.allocated)
            )?;
        }
        Err(e) => {
            damaged += 1;
            writeln!(out, "    free           ? per the freemap (error: {e})")?;
        }
    }
    writeln!(out, "    pfs_count      {}", list.len())?;
    for p in &list {
        let m = p.root.meta();
        let br = &p.root.bref;
        writeln!(out)?;
        writeln!(out, "    PFS \"{}\"", fmt::name_string(p.root.data.name()))?;
        writeln!(
            out,
            "        pfs_type     {} ({})",
            m.pfs_type,
            pfs_type::name(m.pfs_type)
        )?;
        writeln!(
            out,
            "        pfs_subtype  {} ({})",
            m.pfs_subtype,
            pfs_subtype::name(m.pfs_subtype)
        )?;
        writeln!(out, "        pfs_clid     {}", m.pfs_clid)?;
        writeln!(out, "        pfs_fsid     {}", m.pfs_fsid)?;
        writeln!(out, "        inode_count  {}", br.inode_count())?;
        writeln!(
            out,
            "        data_count   {} ({})",
            br.data_count(),
            fmt::size_string(br.data_count()).trim_start()
        )?;
        writeln!(out, "        compalg      {}", fmt::comp_mode(m.comp_algo))?;
        writeln!(
            out,
            "        checkalg     {}",
            fmt::check_mode(m.check_algo)
        )?;
        if m.pfs_lsnap_tid != 0 {
            writeln!(out, "        pfs_lsnap_tid {:#018x}", m.pfs_lsnap_tid)?;
        }
    }
    crate::report_damage(out, "info", damaged, &[])?;
    Ok(damaged)
}
