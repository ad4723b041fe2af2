//! Walking blockref trees: the read side of HAMMER2's chains. A parent
//! (a blockset in an inode or the volume header, or an indirect block)
//! holds an unordered set of blockrefs; INDIRECT and FREEMAP_NODE brefs
//! lead to further sets. `scan` visits the leaves covering a key range in
//! key order.

use crate::disk::{Blockref, BlockrefType, BLOCKREF_BYTES};
use crate::error::{Error, Result};
use crate::volume::Volume;

/// Deeper than any real tree (a 2^64 key space needs about 7 levels of
/// 64 KiB indirect blocks); a deeper one is corrupt (or a loop).
pub const DEPTH_MAX: usize = 32;

/// Decode a blockref array (an indirect block or a freemap node).
pub fn decode_set(buf: &[u8]) -> Vec<Blockref> {
    (0..buf.len() / BLOCKREF_BYTES)
        .filter_map(|i| Blockref::decode_at(buf, i))
        .collect()
}

/// True for blockrefs that lead to another set rather than to a leaf.
pub fn is_node(br: &Blockref) -> bool {
    matches!(br.btype, BlockrefType::Indirect | BlockrefType::FreemapNode)
}

/// Read the child set of a node blockref.
pub fn read_node(vol: &Volume, br: &Blockref) -> Result<Vec<Blockref>> {
    let buf = vol.read_physical(br)?;
    if buf.len() < BLOCKREF_BYTES {
        return Err(Error::corrupt(
            format!(
                "{} block of {} bytes holds no blockref",
                br.btype.name(),
                buf.len()
            ),
            br.data_off.offset(),
        ));
    }
    Ok(decode_set(&buf))
}

/// Visit, in key order, every non-empty leaf blockref under `set` whose
/// key range overlaps `[beg, end]`. The visitor returns `false` to stop.
pub fn scan(
    vol: &Volume,
    set: &[Blockref],
    beg: u64,
    end: u64,
    visit: &mut dyn FnMut(&Blockref) -> Result<bool>,
) -> Result<()> {
    scan_depth(vol, set, beg, end, visit, 0).map(|_| ())
}

fn scan_depth(
    vol: &Volume,
    set: &[Blockref],
    beg: u64,
    end: u64,
    visit: &mut dyn FnMut(&Blockref) -> Result<bool>,
    depth: usize,
) -> Result<bool> {
    let mut sorted: Vec<&Blockref> = set.iter().filter(|b| !b.is_empty()).collect();
    sorted.sort_by_key(|b| b.key);
    // Siblings never overlap: with key ranges strictly nested and
    // disjoint, every key has one path, so a damaged image cannot make
    // the walk revisit blocks without bound.
    for pair in sorted.windows(2) {
        if pair[0].key_end() >= pair[1].key {
            return Err(Error::corrupt(
                format!(
                    "blockrefs {:#x}/{} and {:#x}/{} overlap",
                    pair[0].key, pair[0].keybits, pair[1].key, pair[1].keybits
                ),
                pair[1].data_off.offset(),
            ));
        }
    }
    for br in sorted
        .into_iter()
        .filter(|b| b.key <= end && b.key_end() >= beg)
    {
        if is_node(br) {
            if depth >= DEPTH_MAX {
                return Err(Error::corrupt(
                    format!("blockref tree deeper than {DEPTH_MAX} levels"),
                    br.data_off.offset(),
                ));
            }
            let children = read_node(vol, br)?;
            if let Some(c) = children.iter().find(|c| {
                !c.is_empty()
                    && (c.key < br.key || c.key_end() > br.key_end() || c.keybits >= br.keybits)
            }) {
                return Err(Error::corrupt(
                    format!(
                        "blockref {:#x}/{} does not fit in its parent {:#x}/{}",
                        c.key, c.keybits, br.key, br.keybits
                    ),
                    br.data_off.offset(),
                ));
            }
            if !scan_depth(vol, &children, beg, end, visit, depth + 1)? {
                return Ok(false);
            }
        } else if !visit(br)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Collect the leaves under `set` in `[beg, end]`.
pub fn collect(vol: &Volume, set: &[Blockref], beg: u64, end: u64) -> Result<Vec<Blockref>> {
    let mut out = Vec::new();
    scan(vol, set, beg, end, &mut |br| {
        out.push(*br);
        Ok(true)
    })?;
    Ok(out)
}
