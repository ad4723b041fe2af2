//! Rewinds: going back to an older volume header copy whose whole tree
//! verifies, as ZFS's `zpool import -F` goes back to an older uberblock.
//!
//! HAMMER2 keeps up to four header copies, written in rotation, each the
//! root of a complete earlier state. A copy is a target only when every
//! block of its topology verifies, data included: blocks the newer
//! states stopped using may have been freed and reused since (at flush
//! time once no copy reached them, or by bulkfree, which scans only the
//! newest state), and a tree that reaches one of them is not whole.
//! What the rewind gives up is described from the newer tree, as far as
//! it can be read: the flushes (tids) between the two, and the inodes
//! whose index entry changed since the target (with their paths).

use super::Rewind;
use crate::chain::{read_node, DEPTH_MAX};
use crate::compress;
use crate::disk::{
    comp_method, Blockref, BlockrefType, InodeData, ObjType, VolumeHeader, DATA_BLOCK_BYTES,
    DIRHASH_VISIBLE,
};
use crate::error::{Error, Result};
use crate::pfs::{dirent_name, read_inode};
use crate::volume::Volume;
use bufcache::BlockDevice;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// A header copy a rewind can go to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RewindTarget {
    pub slot: usize,
    pub tid: u64,
    /// Its CRCs are good (else they are recomputed: its tree verifies).
    pub crc_good: bool,
    /// The newest inode change time in its tree (microseconds).
    pub newest_time: Option<i64>,
    /// Blocks verified.
    pub blocks: u64,
}

/// What a whole-tree verification found.
#[derive(Default)]
struct Summary {
    blocks: u64,
    newest_time: Option<i64>,
}

/// Verify every block under `vol`'s super-root; the first that fails
/// ends it.
fn verify_tree(vol: &Volume) -> Result<Summary> {
    let mut s = Summary::default();
    let sroot = read_inode(vol, &vol.header.sroot_blockset[0])?;
    s.blocks += 1;
    if sroot.data.meta.has_direct_data() {
        return Err(Error::corrupt("super-root with direct data".into(), 0x200));
    }
    let mut stack: Vec<(Blockref, usize)> = sroot
        .data
        .blockset()
        .into_iter()
        .filter(|b| !b.is_empty())
        .map(|b| (b, 0))
        .collect();
    let mut seen = std::collections::HashSet::new();
    while let Some((br, depth)) = stack.pop() {
        if depth >= DEPTH_MAX * 2 {
            return Err(Error::corrupt(
                "topology too deep".into(),
                br.data_off.offset(),
            ));
        }
        s.blocks += 1;
        match br.btype {
            BlockrefType::Inode => {
                if !seen.insert(br.data_off.0) {
                    continue;
                }
                let ino = read_inode(vol, &br)?;
                let m = &ino.data.meta;
                // Times are signed (before 1970 in two's complement).
                let t = (m.ctime as i64).max(m.mtime as i64);
                s.newest_time = Some(s.newest_time.map_or(t, |n| n.max(t)));
                if !m.has_direct_data() {
                    stack.extend(
                        ino.data
                            .blockset()
                            .into_iter()
                            .filter(|b| !b.is_empty())
                            .map(|b| (b, depth + 1)),
                    );
                }
            }
            BlockrefType::Indirect => {
                if !seen.insert(br.data_off.0) {
                    continue;
                }
                let set = read_node(vol, &br)?;
                stack.extend(
                    set.into_iter()
                        .filter(|b| !b.is_empty())
                        .map(|b| (b, depth + 1)),
                );
            }
            BlockrefType::Data => {
                let phys = vol.read_physical(&br)?;
                let comp = br.comp_method();
                if !matches!(comp, comp_method::NONE | comp_method::AUTOZERO) {
                    compress::decompress(
                        comp,
                        &phys,
                        DATA_BLOCK_BYTES as usize,
                        br.data_off.offset(),
                    )?;
                }
            }
            BlockrefType::Dirent => {
                dirent_name(vol, &br)?;
            }
            other => {
                return Err(Error::corrupt(
                    format!("{} blockref in the topology", other.name()),
                    br.data_off.offset(),
                ))
            }
        }
    }
    Ok(s)
}

/// Verify the tree of header copy `slot`.
pub(super) fn verify_target(
    dev: Arc<dyn BlockDevice>,
    copies: &[(usize, VolumeHeader, bool)],
    slot: usize,
) -> Result<RewindTarget> {
    let (_, vh, good) =
        copies
            .iter()
            .find(|c| c.0 == slot)
            .ok_or_else(|| Error::InvalidArgument {
                what: format!("volume header copy {slot} is not a HAMMER2 header"),
            })?;
    let vol = Volume::at_header(dev, vh.clone(), slot);
    let s = verify_tree(&vol).map_err(|e| Error::InvalidArgument {
        what: format!(
            "volume header copy {slot} (tid {:#x}): its tree does not verify ({e})",
            vh.mirror_tid
        ),
    })?;
    Ok(RewindTarget {
        slot,
        tid: vh.mirror_tid,
        crc_good: *good,
        newest_time: s.newest_time,
        blocks: s.blocks,
    })
}

/// Header copies whose whole tree verifies, newest first; with `below`,
/// only those older than that copy.
pub fn rewind_targets(
    dev: Arc<dyn BlockDevice>,
    copies: &[(usize, VolumeHeader, bool)],
    below: Option<usize>,
) -> Vec<RewindTarget> {
    let limit = below
        .and_then(|b| copies.iter().find(|c| c.0 == b))
        .map(|c| c.1.mirror_tid);
    let mut order: Vec<&(usize, VolumeHeader, bool)> = copies
        .iter()
        .filter(|c| limit.is_none_or(|l| c.1.mirror_tid < l))
        .collect();
    order.sort_by_key(|c| std::cmp::Reverse(c.1.mirror_tid));
    order
        .into_iter()
        .filter_map(|c| verify_target(dev.clone(), copies, c.0).ok())
        .collect()
}

/// The inodes of `vol`'s tree changed after `tid`, as PFS:path (or
/// PFS:#INUM), read as far as it can be; and whether all of it could.
fn changed_since(vol: &Volume, tid: u64) -> (Vec<String>, bool) {
    let mut complete = true;
    let mut out = Vec::new();
    let Ok(sroot) = read_inode(vol, &vol.header.sroot_blockset[0]) else {
        return (out, false);
    };
    let mut roots = Vec::new();
    leaves(vol, &sroot.data.blockset(), &mut roots, &mut complete, 0);
    for rbr in roots.iter().filter(|b| b.btype == BlockrefType::Inode) {
        let Ok(root) = read_inode(vol, rbr) else {
            complete = false;
            continue;
        };
        let label = String::from_utf8_lossy(root.data.name()).into_owned();
        if root.data.meta.has_direct_data() {
            continue;
        }
        let mut set = Vec::new();
        leaves(vol, &root.data.blockset(), &mut set, &mut complete, 0);
        // Names: entry -> (parent, name), from every directory readable.
        let mut parent: HashMap<u64, (u64, Vec<u8>)> = HashMap::new();
        let mut changed: BTreeMap<u64, ()> = BTreeMap::new();
        let mut dirs: Vec<(u64, InodeData)> = vec![(1, root.data.clone())];
        for b in &set {
            if b.btype == BlockrefType::Inode && b.key & DIRHASH_VISIBLE == 0 {
                if b.modify_tid > tid {
                    changed.insert(b.key, ());
                }
                match read_inode(vol, b) {
                    Ok(i) if i.data.meta.obj_type == ObjType::Directory => {
                        dirs.push((b.key, i.data))
                    }
                    Ok(_) => {}
                    Err(_) => complete = false,
                }
            }
        }
        for (dir, data) in &dirs {
            if data.meta.has_direct_data() {
                continue;
            }
            let mut ents = Vec::new();
            leaves(vol, &data.blockset(), &mut ents, &mut complete, 0);
            for e in ents.iter().filter(|e| e.btype == BlockrefType::Dirent) {
                if let Ok(name) = dirent_name(vol, e) {
                    parent.entry(e.dirent().inum).or_insert((*dir, name));
                }
            }
        }
        for inum in changed.keys() {
            let mut parts = Vec::new();
            let mut cur = *inum;
            let mut ok = false;
            for _ in 0..256 {
                if cur == 1 {
                    ok = true;
                    break;
                }
                match parent.get(&cur) {
                    Some((d, n)) => {
                        parts.push(String::from_utf8_lossy(n).into_owned());
                        cur = *d;
                    }
                    None => break,
                }
            }
            parts.reverse();
            out.push(if ok {
                format!("{label}:/{}", parts.join("/"))
            } else {
                format!("{label}:#{inum}")
            });
        }
    }
    (out, complete)
}

/// Leaves under `set` through the indirect blocks that verify.
fn leaves(vol: &Volume, set: &[Blockref], out: &mut Vec<Blockref>, ok: &mut bool, depth: usize) {
    for b in set.iter().filter(|b| !b.is_empty()) {
        if b.btype == BlockrefType::Indirect {
            match read_node(vol, b) {
                Ok(c) if depth < DEPTH_MAX => leaves(vol, &c, out, ok, depth + 1),
                _ => *ok = false,
            }
        } else {
            out.push(*b);
        }
    }
}

/// What rewinding from the copy at `from` (the newest, when known) to
/// `t` gives up.
pub(super) fn describe(
    dev: Arc<dyn BlockDevice>,
    copies: &[(usize, VolumeHeader, bool)],
    from: Option<usize>,
    t: &RewindTarget,
) -> Rewind {
    let newest = from
        .and_then(|f| copies.iter().find(|c| c.0 == f))
        .or_else(|| copies.iter().max_by_key(|c| c.1.mirror_tid));
    let (changed, complete, from_tid, from_slot) = match newest {
        Some((slot, vh, _)) if vh.mirror_tid > t.tid => {
            let vol = Volume::at_header(dev, vh.clone(), *slot);
            let (c, ok) = changed_since(&vol, t.tid);
            (c, ok, vh.mirror_tid, Some(*slot))
        }
        _ => (Vec::new(), true, t.tid, None),
    };
    Rewind {
        from_slot,
        from_tid,
        to_slot: t.slot,
        to_tid: t.tid,
        to_time: t.newest_time,
        changed,
        changed_complete: complete,
    }
}

/// The one line a rewind is reported as.
pub(super) fn line(r: &Rewind) -> String {
    let lost = if r.from_tid > r.to_tid {
        format!("flushes {:#x}..{:#x} are lost", r.to_tid + 1, r.from_tid)
    } else {
        "no newer flush is lost".to_string()
    };
    let files = if r.changed.is_empty() {
        String::new()
    } else {
        let shown: Vec<&str> = r.changed.iter().take(20).map(String::as_str).collect();
        format!(
            "; {} changed since{}: {}{}",
            r.changed.len(),
            if r.changed_complete {
                ""
            } else {
                " (at least)"
            },
            shown.join(", "),
            if r.changed.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        )
    };
    format!(
        "rewound to volume header copy {} (tid {:#x}, last change {}): {lost}{files}",
        r.to_slot,
        r.to_tid,
        r.to_time
            .map(fmt_time)
            .unwrap_or_else(|| "unknown".to_string())
    )
}

/// Microseconds since the epoch (signed: before 1970 negative) as
/// `YYYY-MM-DD HH:MM:SS UTC`.
pub fn fmt_time(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::fmt_time;

    #[test]
    fn times_before_and_after_1970() {
        assert_eq!(fmt_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(fmt_time(-1), "1969-12-31 23:59:59 UTC");
        // touch -t 196001010101 (generic/258): -315615540 s.
        assert_eq!(fmt_time(-315_615_540_000_000), "1960-01-01 01:01:00 UTC");
        assert_eq!(fmt_time(951_782_400_000_000), "2000-02-29 00:00:00 UTC");
    }
}
