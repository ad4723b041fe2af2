//! `hammer2 setcomp` and `setcheck` on a `Mount`: change the compression
//! or check method an inode asks for (its meta `comp_algo`/`check_algo`),
//! optionally through a whole directory tree, as DragonFly's
//! `cmd_setcomp`/`cmd_setcheck` do through `HAMMER2IOC_INODE_SET`. Blocks
//! already written keep their methods (every blockref names its own);
//! only blocks written later follow the new ones, and inodes created
//! later inherit them from their directory.
//!
//! Method names are DragonFly's (`none`, `autozero`, `lz4`, `zlib[:1-9]`;
//! `none`, `disabled`, `crc32`, `xxhash64`, `sha192`) plus our extension
//! methods `zstd[:1-15]` (compression 8) and `blake3` (check 8), which
//! DragonFly cannot read (see ARCHITECTURE.md, "Extension methods").

use crate::disk::{check_method as cm, comp_method as cmp, ObjType};
use crate::error::{Error, Result};
use crate::mount::Mount;

/// What to change; `None` leaves a field alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Methods {
    /// An inode `comp_algo` byte: method in the low nibble, level high.
    pub comp: Option<u8>,
    /// An inode `check_algo` byte.
    pub check: Option<u8>,
}

fn invalid(what: String) -> Error {
    Error::InvalidArgument { what }
}

/// Parse `METHOD[:LEVEL]` into a `comp_algo` byte (DragonFly's names and
/// synonyms, `zstd`, or a number).
pub fn parse_comp(text: &str) -> Result<u8> {
    let (name, level) = match text.split_once(':') {
        Some((n, l)) => (n, Some(l)),
        None => (text, None),
    };
    let algo = match name.to_ascii_lowercase().as_str() {
        "none" => cmp::NONE,
        "autozero" | "disabled" => cmp::AUTOZERO,
        "lz4" | "default" => cmp::LZ4,
        "zlib" => cmp::ZLIB,
        "zstd" => cmp::ZSTD,
        n => n
            .parse::<u8>()
            .ok()
            .filter(|&a| cmp::is_known(a))
            .ok_or_else(|| invalid(format!("unknown compression method {name:?}")))?,
    };
    let level = match level {
        None => 0,
        Some(l) if l.eq_ignore_ascii_case("default") => 0,
        Some(l) => l
            .parse::<u8>()
            .map_err(|_| invalid(format!("compression level {l:?} is not a number")))?,
    };
    let max = match algo {
        cmp::ZLIB => 9,
        cmp::ZSTD => 15,
        _ => 0,
    };
    if level > max {
        return Err(invalid(if max == 0 {
            format!("compression method {name} takes no level")
        } else {
            format!("{name} levels are 1 to {max}")
        }));
    }
    Ok(algo | (level << 4))
}

/// Parse a check method name (or number) into a `check_algo` byte; the
/// freemap's internal method is not one a file may ask for.
pub fn parse_check(text: &str) -> Result<u8> {
    let algo = match text.to_ascii_lowercase().as_str() {
        "none" => cm::NONE,
        "disabled" => cm::DISABLED,
        "crc32" | "iscsi32" => cm::ISCSI32,
        "xxhash64" | "default" => cm::XXHASH64,
        "sha192" => cm::SHA192,
        "blake3" => cm::BLAKE3,
        n => n
            .parse::<u8>()
            .ok()
            .filter(|&a| cm::is_known(a) && a != cm::FREEMAP)
            .ok_or_else(|| invalid(format!("unknown check method {text:?}")))?,
    };
    Ok(algo)
}

/// True when the byte asks for a method DragonFly cannot read.
pub fn comp_is_extension(comp_algo: u8) -> bool {
    comp_algo & 15 == cmp::ZSTD
}

/// True when the byte asks for a check method DragonFly cannot verify.
pub fn check_is_extension(check_algo: u8) -> bool {
    check_algo & 15 == cm::BLAKE3
}

/// Refuse method bytes no name parses to (an unknown method, a level
/// the method does not take, the freemap's check).
pub fn validate(m: Methods) -> Result<()> {
    if let Some(c) = m.comp {
        parse_comp(&format!("{}:{}", c & 15, c >> 4))?;
    }
    if let Some(c) = m.check {
        parse_check(&c.to_string())?;
    }
    Ok(())
}

impl Mount {
    /// Set the methods of one inode; returns its type. Times are left
    /// alone.
    pub fn set_inode_methods(&mut self, label: &str, inum: u64, m: Methods) -> Result<ObjType> {
        validate(m)?;
        self.writable()?;
        self.admit_inode_change(label, inum)?;
        self.with_node(label, inum, |_, n| {
            let meta = &mut n.data.meta;
            let mut changed = false;
            if let Some(c) = m.comp.filter(|&c| c != meta.comp_algo) {
                meta.comp_algo = c;
                changed = true;
            }
            if let Some(c) = m.check.filter(|&c| c != meta.check_algo) {
                meta.check_algo = c;
                changed = true;
            }
            n.dirty |= changed;
            Ok(n.obj_type())
        })
    }

    /// Set the methods of inode `inum` in PFS `label`, and with
    /// `recursive` of everything under it when it is a directory. `seen`
    /// is called for each inode changed with its path relative to
    /// `inum` (empty for `inum` itself). Returns the number changed.
    pub fn set_methods(
        &mut self,
        label: &str,
        inum: u64,
        m: Methods,
        recursive: bool,
        seen: &mut dyn FnMut(&[u8], u64),
    ) -> Result<u64> {
        validate(m)?;
        self.writable()?;
        let mut count = 0;
        // Depth-first with an explicit stack: a deep tree cannot exhaust
        // the thread's stack. A directory is entered once: meeting one
        // again means a damaged tree (an entry naming an ancestor, or a
        // directory with two parents), which would loop for ever.
        let mut entered = std::collections::HashSet::new();
        let mut stack = vec![(inum, Vec::new())];
        while let Some((ino, path)) = stack.pop() {
            let is_dir = self.getattr(label, ino)?.obj_type == ObjType::Directory;
            if recursive && is_dir && !entered.insert(ino) {
                return Err(Error::corrupt(
                    format!(
                        "directory inode {ino} is met again at {:?}: the tree is damaged \
                         (a cycle, or a directory with two parents); run fsck.hammer2",
                        String::from_utf8_lossy(&path)
                    ),
                    0,
                ));
            }
            self.set_inode_methods(label, ino, m)?;
            count += 1;
            seen(&path, ino);
            if !(recursive && is_dir) {
                continue;
            }
            let entries = self.readdir(label, ino, 0)?;
            for e in entries.into_iter().rev() {
                let mut p = path.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(&e.name);
                stack.push((e.inum, p));
            }
        }
        Ok(count)
    }
}
