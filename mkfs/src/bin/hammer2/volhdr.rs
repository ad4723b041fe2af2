//! `hammer2 volhdr`: every field of the volume header in use (of every
//! copy with `--all`), its three CRCs as computed/stored, and the
//! super-root and freemap blocksets, in DragonFly's layout.

use crate::fmt::{GIB, MIB};
use crate::show::{VolumeCtx, Walker};
use crate::{slot_line, CmdError, Image};
use hammer2::disk::uuid::FSTYPE_HAMMER2;
use hammer2::disk::VolumeHeader;
use hammer2::volume::HeaderSlot;
use std::io::Write;

/// Indent of the blockset entries, as DragonFly prints them.
const BLOCKSET_TAB: usize = 16;

fn u64_at(raw: &[u8], off: usize) -> u64 {
    raw.get(off..off + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

fn crc_line(
    out: &mut dyn Write,
    label: &str,
    (stored, computed): (u32, u32),
    bad: &str,
) -> std::io::Result<bool> {
    let ok = stored == computed;
    writeln!(
        out,
        "    {label:<14} {computed:#010x}/{stored:#010x} ({})",
        if ok { "OK" } else { bad }
    )?;
    Ok(ok)
}

/// Dump header copy `index`. Returns the number of problems found (bad
/// CRCs and damaged blockset blocks).
fn dump(
    img: &Image,
    vh: &VolumeHeader,
    index: usize,
    verbose: bool,
    problems: &mut Vec<String>,
    out: &mut dyn Write,
) -> Result<u64, CmdError> {
    let mut damaged = 0;
    writeln!(out)?;
    writeln!(out, "Volume {} header {index} {{", vh.volu_id)?;
    writeln!(out, "    magic          {:#018x}", vh.magic)?;
    writeln!(out, "    boot_beg       {:#018x}", vh.boot_beg)?;
    let mb = |a: u64, b: u64| b.wrapping_sub(a) as f64 / MIB;
    writeln!(
        out,
        "    boot_end       {:#018x} ({:6.2}MB)",
        vh.boot_end,
        mb(vh.boot_beg, vh.boot_end)
    )?;
    writeln!(out, "    aux_beg        {:#018x}", vh.aux_beg)?;
    writeln!(
        out,
        "    aux_end        {:#018x} ({:6.2}MB)",
        vh.aux_end,
        mb(vh.aux_beg, vh.aux_end)
    )?;
    let gb = |v: u64| v as f64 / GIB;
    writeln!(
        out,
        "    volu_size      {:#018x} ({:6.2}GB)",
        vh.volu_size,
        gb(vh.volu_size)
    )?;
    writeln!(out, "    version        {}", vh.version)?;
    writeln!(out, "    flags          {:#010x}", vh.flags)?;
    writeln!(out, "    copyid         {}", vh.copyid)?;
    writeln!(out, "    freemap_vers   {}", vh.freemap_version)?;
    writeln!(out, "    peer_type      {}", vh.peer_type)?;
    writeln!(out, "    volu_id        {}", vh.volu_id)?;
    writeln!(out, "    nvolumes       {}", vh.nvolumes)?;
    writeln!(out, "    fsid           {}", vh.fsid)?;
    writeln!(out, "    fstype         {}", vh.fstype)?;
    let kind = if vh.fstype == FSTYPE_HAMMER2 {
        "DragonFly HAMMER2"
    } else {
        "?"
    };
    writeln!(out, "                   ({kind})")?;
    for (label, v) in [
        ("allocator_size", vh.allocator_size),
        ("allocator_free", vh.allocator_free),
        ("allocator_beg ", vh.allocator_beg),
    ] {
        writeln!(out, "    {label} {v:#018x} ({:6.2}GB)", gb(v))?;
    }
    let raw = vh.raw();
    writeln!(out, "    mirror_tid     {:#018x}", vh.mirror_tid)?;
    writeln!(out, "    reserved0080   {:#018x}", u64_at(raw, 0x80))?;
    writeln!(out, "    reserved0088   {:#018x}", u64_at(raw, 0x88))?;
    writeln!(out, "    freemap_tid    {:#018x}", vh.freemap_tid)?;
    writeln!(out, "    bulkfree_tid   {:#018x}", vh.bulkfree_tid)?;
    for i in 0..4 {
        writeln!(
            out,
            "    reserved00A0/{i} {:#018x}",
            u64_at(raw, 0xA0 + 8 * i)
        )?;
    }
    writeln!(out, "    total_size     {:#018x}", vh.total_size)?;
    write!(out, "    copyexists    ")?;
    for c in vh.copyexists {
        write!(out, " {c:#04x}")?;
    }
    writeln!(out)?;

    // icrc_sects[7] covers sector 0 and icrc_sects[6] sector 1: the
    // indexes run backwards, as in hammer2_disk.h.
    writeln!(out)?;
    let crcs = vh.crcs();
    for i in 0..8 {
        let label = format!("icrc_sects[{i}]");
        let pair = match i {
            hammer2::disk::volume::ICRC_SECT0 => Some(crcs.sect0),
            hammer2::disk::volume::ICRC_SECT1 => Some(crcs.sect1),
            _ => None,
        };
        match pair {
            Some(p) => {
                if !crc_line(out, &label, p, "FAILED")? {
                    damaged += 1;
                    problems.push(format!("header {index}: {label} mismatch"));
                }
            }
            None => writeln!(out, "    {label:<14} {:#010x} (reserved)", vh.icrc_sects[i])?,
        }
    }
    if !crc_line(
        out,
        "icrc_volhdr",
        crcs.volheader,
        "FAILED - not a critical error",
    )? {
        damaged += 1;
        problems.push(format!("header {index}: icrc_volhdr mismatch"));
    }

    writeln!(out)?;
    let ctx = VolumeCtx::new(vh, img.dev.size_bytes());
    for (label, set) in [
        ("sroot_blockset", &vh.sroot_blockset),
        ("freemap_blockset", &vh.freemap_blockset),
    ] {
        writeln!(out, "    {label} {{")?;
        let mut w = Walker::new(img.dev.as_ref(), ctx, out);
        w.verbose = verbose;
        for (i, br) in set.iter().enumerate() {
            w.show_bref(BLOCKSET_TAB, i, br, false)?;
        }
        damaged += w.damaged;
        problems.append(&mut w.problems);
        writeln!(out, "    }}")?;
    }

    if vh.volu_loff.iter().any(|&v| v != 0) {
        writeln!(out)?;
        for (i, v) in vh.volu_loff.iter().enumerate() {
            if *v != u64::MAX {
                writeln!(out, "    volu_loff[{i}]   {v:#018x}")?;
            }
        }
    }
    writeln!(out, "}}")?;
    Ok(damaged)
}

/// `hammer2 volhdr IMG`. Works even when no copy is usable (then the
/// best-looking damaged copy is dumped). Returns the problem count.
pub fn run(img: &Image, all: bool, verbose: bool, out: &mut dyn Write) -> Result<u64, CmdError> {
    let slots = img.header_slots();
    let in_use = crate::best_slot(&slots);
    // Without a usable copy, dump the damaged one with the highest tid.
    let shown = in_use.or_else(|| {
        slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                HeaderSlot::BadCrc(vh, _) => Some((i, vh.mirror_tid)),
                _ => None,
            })
            .max_by_key(|&(_, tid)| tid)
            .map(|(i, _)| i)
    });
    let Some(shown) = shown else {
        let why = match slots.first() {
            Some(HeaderSlot::Invalid(w)) => w.clone(),
            _ => "no volume header found".to_string(),
        };
        return Err(CmdError::Fail(format!(
            "{}: not a HAMMER2 volume: {why}",
            img.path.display()
        )));
    };
    writeln!(out, "{}", img.path.display())?;
    let mut damaged = 0;
    let mut problems = Vec::new();
    if in_use.is_none() {
        damaged += 1;
        problems.push("no volume header copy has valid check codes".to_string());
    }
    for (i, slot) in slots.iter().enumerate() {
        writeln!(out, "{}", slot_line(i, slot, in_use))?;
        let vh = match slot {
            HeaderSlot::Good(vh) => vh,
            HeaderSlot::BadCrc(vh, _) => vh,
            HeaderSlot::Invalid(_) => continue,
        };
        if i == shown || all {
            damaged += dump(img, vh, i, verbose, &mut problems, out)?;
        } else if matches!(slot, HeaderSlot::BadCrc(..)) {
            damaged += 1;
            problems.push(format!("header {i}: bad check code"));
        }
        if all && i + 1 != slots.len() {
            writeln!(out)?;
        }
    }
    crate::report_damage(out, "volhdr", damaged, &problems)?;
    Ok(damaged)
}
