//! Walking blockref trees: the read side of HAMMER2's chains. A parent
//! (a blockset in an inode or the volume header, or an indirect block)
//! holds an unordered set of blockrefs; INDIRECT brefs (in inode trees)
//! and FREEMAP_NODE brefs (in the freemap) lead to further sets. `scan`
//! visits the leaves covering a key range in key order.
//!
//! Every node is checked before its children are used: its size (4 KiB
//! to 64 KiB for an indirect block, 32 KiB for a freemap node), its
//! keybits (at most 64, the key aligned to them), and its children's key
//! ranges (inside its own, with fewer keybits, siblings disjoint). So a
//! key has one path, depth is bounded by the key width, and a block a
//! damaged blockref points at by mistake (an inode, a data block) is
//! refused, not read as blockrefs.

use crate::disk::{
    Blockref, BlockrefType, BLOCKREF_BYTES, FREEMAP_LEVELN_PSIZE, IND_BYTES_MAX, IND_BYTES_MIN,
};
use crate::error::{Error, Result};
use crate::volume::Volume;

/// Deeper than any real tree (a 2^64 key space needs about 7 levels of
/// 64 KiB indirect blocks); a deeper one is corrupt (or a loop).
pub const DEPTH_MAX: usize = 32;

/// Which kind of tree a walk is in: it descends only that kind's nodes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Tree {
    /// Under an inode (or the super-root): INDIRECT nodes.
    Inode,
    /// Under the volume header's freemap blockset: FREEMAP_NODE nodes.
    Freemap,
}

impl Tree {
    fn node_type(self) -> BlockrefType {
        match self {
            Tree::Inode => BlockrefType::Indirect,
            Tree::Freemap => BlockrefType::FreemapNode,
        }
    }
}

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

/// The shape a node blockref must have before its block is read: a key
/// range of at most 64 bits with the key aligned to it, and the size of
/// its kind (an indirect block 4 KiB to 64 KiB, as DragonFly's
/// `HAMMER2_IND_BYTES_MIN`/`MAX`; a freemap node 32 KiB).
pub fn check_node(br: &Blockref) -> Result<()> {
    let at = br.data_off.offset();
    if br.keybits > 64 || (br.keybits < 64 && br.key & ((1u64 << br.keybits) - 1) != 0) {
        return Err(Error::corrupt(
            format!(
                "{} blockref key {:#x} with keybits {} is not an aligned key range",
                br.btype.name(),
                br.key,
                br.keybits
            ),
            at,
        ));
    }
    let bytes = br.data_off.bytes();
    let size_ok = match br.btype {
        BlockrefType::Indirect => (IND_BYTES_MIN as u64..=IND_BYTES_MAX as u64).contains(&bytes),
        BlockrefType::FreemapNode => bytes == FREEMAP_LEVELN_PSIZE as u64,
        _ => false,
    };
    if !size_ok {
        return Err(Error::corrupt(
            format!(
                "{} blockref key {:#x} points at a block of {bytes} bytes",
                br.btype.name(),
                br.key
            ),
            at,
        ));
    }
    Ok(())
}

/// The children of node `parent` must lie inside its key range with
/// fewer keybits, and siblings must not overlap: then every key has one
/// path and no walk can revisit a block.
pub fn check_children(parent: &Blockref, children: &[Blockref]) -> Result<()> {
    let mut live: Vec<&Blockref> = children.iter().filter(|c| !c.is_empty()).collect();
    if let Some(c) = live.iter().find(|c| {
        c.key < parent.key || c.key_end() > parent.key_end() || c.keybits >= parent.keybits
    }) {
        return Err(Error::corrupt(
            format!(
                "blockref {:#x}/{} does not fit in its parent {:#x}/{}",
                c.key, c.keybits, parent.key, parent.keybits
            ),
            parent.data_off.offset(),
        ));
    }
    live.sort_by_key(|b| b.key);
    check_disjoint(&live)
}

/// Siblings (sorted by key) must not overlap.
fn check_disjoint(sorted: &[&Blockref]) -> Result<()> {
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
    Ok(())
}

/// Read the child set of a node blockref.
pub fn read_node(vol: &Volume, br: &Blockref) -> Result<Vec<Blockref>> {
    check_node(br)?;
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
    let children = decode_set(&buf);
    check_children(br, &children)?;
    Ok(children)
}

/// Visit, in key order, every non-empty leaf blockref under `set` (an
/// inode tree) whose key range overlaps `[beg, end]`. The visitor
/// returns `false` to stop. A FREEMAP_NODE in the tree is damage.
pub fn scan(
    vol: &Volume,
    set: &[Blockref],
    beg: u64,
    end: u64,
    visit: &mut dyn FnMut(&Blockref) -> Result<bool>,
) -> Result<()> {
    scan_depth(vol, Tree::Inode, set, beg, end, visit, 0).map(|_| ())
}

/// `scan` over the freemap tree: FREEMAP_NODEs are descended, an
/// INDIRECT is damage.
pub fn scan_freemap(
    vol: &Volume,
    set: &[Blockref],
    visit: &mut dyn FnMut(&Blockref) -> Result<bool>,
) -> Result<()> {
    scan_depth(vol, Tree::Freemap, set, 0, u64::MAX, visit, 0).map(|_| ())
}

fn scan_depth(
    vol: &Volume,
    kind: Tree,
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
    check_disjoint(&sorted)?;
    for br in sorted
        .into_iter()
        .filter(|b| b.key <= end && b.key_end() >= beg)
    {
        if is_node(br) {
            if br.btype != kind.node_type() {
                return Err(Error::corrupt(
                    format!(
                        "{} blockref key {:#x} in {}",
                        br.btype.name(),
                        br.key,
                        match kind {
                            Tree::Inode => "an inode's tree",
                            Tree::Freemap => "the freemap",
                        }
                    ),
                    br.data_off.offset(),
                ));
            }
            if depth >= DEPTH_MAX {
                return Err(Error::corrupt(
                    format!("blockref tree deeper than {DEPTH_MAX} levels"),
                    br.data_off.offset(),
                ));
            }
            let children = read_node(vol, br)?;
            if !scan_depth(vol, kind, &children, beg, end, visit, depth + 1)? {
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
