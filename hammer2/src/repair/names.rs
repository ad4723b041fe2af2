//! Phase 4 of a repair: the directory structure of every PFS, read from
//! the tree phase 3 committed (whose blocks all verify now), checked as
//! fsck's `cross_check_pfs` checks it and fixed through the `Mount`:
//!
//! - an entry naming the PFS root, its own directory or an inode that
//!   does not exist is removed;
//! - an entry whose type is not its inode's takes the inode's type; one
//!   whose key is not its name's hash (or lacks the visible bit) is
//!   filed again under the right key;
//! - a directory named by several entries keeps one (the one in the
//!   directory its `iparent` names, else the first) and loses the
//!   others; a cycle of directories cut off from the root is broken at
//!   its lowest-numbered directory, whose entry is removed;
//! - inodes no directory reaches from the root (orphans, directories
//!   detached above, inodes whose entry was cut in phase 3) are linked
//!   into `lost+found` at the PFS root as `#INUM`, as e2fsck does, or
//!   removed when they have no links (unlinked while open before a
//!   crash, as a read-write mount would remove them);
//! - link counts follow the entries: a file's nlinks is the number of
//!   entries naming it, a directory's is 1 (DragonFly's) when it had 0.

use super::{Log, Options};
use crate::chain;
use crate::dirhash::dirhash;
use crate::disk::{BlockrefType, DirentHead, ObjType, DIRHASH_HIMASK, DIRHASH_VISIBLE};
use crate::error::Result;
use crate::mount::{Mount, ROOT_INUM};
use crate::pfs;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// An inode as the names phase needs it.
struct Ino {
    otype: ObjType,
    nlinks: u64,
    iparent: u64,
    /// A directory with entries.
    has_entries: bool,
}

/// One directory entry.
#[derive(Clone)]
struct Entry {
    dir: u64,
    key: u64,
    name: Vec<u8>,
    inum: u64,
    otype: ObjType,
}

impl Entry {
    fn shown(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

/// What happens to an entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fate {
    Keep,
    Remove,
    /// Filed again under its name's hash (with the inode's type).
    Rekey,
    /// Its type set to its inode's.
    Retype,
}

pub(super) fn repair_names(m: &mut Mount, log: &mut Log, opts: &Options) -> Result<()> {
    let labels: Vec<String> = m.pfs.keys().cloned().collect();
    for label in labels {
        repair_pfs(m, &label, log, opts)?;
    }
    Ok(())
}

/// Every inode and entry of PFS `label`, as committed.
fn gather(m: &mut Mount, label: &str) -> Result<(BTreeMap<u64, Ino>, Vec<Entry>)> {
    let Some(p) = m.pfs.get(label) else {
        return Ok((BTreeMap::new(), Vec::new()));
    };
    let root_meta = p.root.data.meta;
    let root_set = if root_meta.has_direct_data() {
        Vec::new()
    } else {
        p.root.data.blockset().to_vec()
    };
    let vol = &m.vol;
    let mut index = Vec::new();
    let mut dirents = Vec::new();
    chain::scan(vol, &root_set, 0, u64::MAX, &mut |br| {
        match br.btype {
            BlockrefType::Inode if br.key & DIRHASH_VISIBLE == 0 => index.push(*br),
            BlockrefType::Dirent => dirents.push((ROOT_INUM, *br)),
            _ => {}
        }
        Ok(true)
    })?;
    let mut inodes = BTreeMap::new();
    inodes.insert(
        ROOT_INUM,
        Ino {
            otype: ObjType::Directory,
            nlinks: root_meta.nlinks,
            iparent: 0,
            has_entries: !dirents.is_empty(),
        },
    );
    for br in &index {
        let ino = pfs::read_inode(vol, br)?;
        let md = &ino.data.meta;
        let mut has_entries = false;
        if md.obj_type == ObjType::Directory && !md.has_direct_data() {
            let set = ino.data.blockset();
            chain::scan(vol, &set, 0, u64::MAX, &mut |d| {
                if d.btype == BlockrefType::Dirent {
                    dirents.push((br.key, *d));
                    has_entries = true;
                }
                Ok(true)
            })?;
        }
        inodes.insert(
            br.key,
            Ino {
                otype: md.obj_type,
                nlinks: md.nlinks,
                iparent: md.iparent,
                has_entries,
            },
        );
    }
    let mut entries = Vec::new();
    for (dir, br) in dirents {
        let d = br.dirent();
        entries.push(Entry {
            dir,
            key: br.key,
            name: pfs::dirent_name(vol, &br)?,
            inum: d.inum,
            otype: ObjType::from_u8(d.obj_type),
        });
    }
    Ok((inodes, entries))
}

fn repair_pfs(m: &mut Mount, label: &str, log: &mut Log, opts: &Options) -> Result<()> {
    let (inodes, entries) = gather(m, label)?;
    let mut fate = vec![Fate::Keep; entries.len()];
    for (i, e) in entries.iter().enumerate() {
        let why = if e.inum == ROOT_INUM {
            Some("names the PFS root".to_string())
        } else if e.inum == e.dir {
            Some("names its own directory".to_string())
        } else if !inodes.contains_key(&e.inum) {
            Some(format!("names inode {}, which does not exist", e.inum))
        } else {
            None
        };
        if let Some(why) = why {
            fate[i] = Fate::Remove;
            log.lossy(
                Some(label),
                Some(e.dir),
                None,
                format!("entry \"{}\" {why}: removed", e.shown()),
            );
            continue;
        }
        let t = inodes[&e.inum].otype;
        if e.key & DIRHASH_VISIBLE == 0
            || e.key & DIRHASH_HIMASK != dirhash(&e.name) & DIRHASH_HIMASK
        {
            fate[i] = Fate::Rekey;
            log.safe(
                Some(label),
                Some(e.dir),
                None,
                format!(
                    "entry \"{}\" filed under key {:#x}, not its name's hash: filed again",
                    e.shown(),
                    e.key
                ),
            );
        } else if t != e.otype {
            fate[i] = Fate::Retype;
            log.safe(
                Some(label),
                Some(e.dir),
                None,
                format!(
                    "entry \"{}\" says {} but inode {} is {}: type corrected",
                    e.shown(),
                    e.otype.name(),
                    e.inum,
                    t.name()
                ),
            );
        }
    }
    // Directories with several parents keep one.
    let mut named_by: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        if fate[i] != Fate::Remove {
            named_by.entry(e.inum).or_default().push(i);
        }
    }
    for (inum, list) in &named_by {
        if inodes[inum].otype != ObjType::Directory || list.len() < 2 {
            continue;
        }
        let iparent = inodes[inum].iparent;
        let keep = list
            .iter()
            .copied()
            .find(|&i| entries[i].dir == iparent)
            .unwrap_or(list[0]);
        for &i in list.iter().filter(|&&i| i != keep) {
            fate[i] = Fate::Remove;
            log.lossy(
                Some(label),
                Some(entries[i].dir),
                None,
                format!(
                    "entry \"{}\" removed: directory {inum} is already in directory {}",
                    entries[i].shown(),
                    entries[keep].dir
                ),
            );
        }
    }
    // Cycles: a directory whose parents never reach the root.
    let parent_of = |fate: &[Fate]| -> HashMap<u64, usize> {
        let mut p = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            if fate[i] != Fate::Remove && inodes[&e.inum].otype == ObjType::Directory {
                p.insert(e.inum, i);
            }
        }
        p
    };
    let parents = parent_of(&fate);
    let mut state: HashMap<u64, bool> = HashMap::new();
    let mut dirs: Vec<u64> = parents.keys().copied().collect();
    dirs.sort_unstable();
    for d in dirs {
        let mut chain = Vec::new();
        let mut cur = d;
        let ok = loop {
            if cur == ROOT_INUM {
                break true;
            }
            if let Some(&k) = state.get(&cur) {
                break k;
            }
            if chain.contains(&cur) {
                // A cycle: break it at its lowest-numbered member.
                let at = chain.iter().position(|&c| c == cur).unwrap_or(0);
                let member = chain[at..].iter().copied().min().unwrap_or(cur);
                if let Some(&i) = parents.get(&member) {
                    fate[i] = Fate::Remove;
                    log.lossy(
                        Some(label),
                        Some(entries[i].dir),
                        None,
                        format!(
                            "entry \"{}\" removed: directory {member} and its parents form a \
                             cycle cut off from the root",
                            entries[i].shown()
                        ),
                    );
                }
                break false;
            }
            chain.push(cur);
            match parents.get(&cur) {
                Some(&i) => cur = entries[i].dir,
                None => break true,
            }
        };
        for c in chain {
            state.insert(c, ok);
        }
    }
    // Reachability from the root over the entries that stay.
    let mut children: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        if fate[i] != Fate::Remove {
            children.entry(e.dir).or_default().push(e.inum);
        }
    }
    let mut reached = BTreeSet::new();
    let mut queue = VecDeque::from([ROOT_INUM]);
    while let Some(d) = queue.pop_front() {
        if !reached.insert(d) {
            continue;
        }
        for &c in children.get(&d).into_iter().flatten() {
            if inodes
                .get(&c)
                .is_some_and(|i| i.otype == ObjType::Directory)
            {
                queue.push_back(c);
            } else {
                reached.insert(c);
            }
        }
    }
    let named: BTreeSet<u64> = entries
        .iter()
        .enumerate()
        .filter(|(i, _)| fate[*i] != Fate::Remove)
        .map(|(_, e)| e.inum)
        .collect();
    // Detached: unreachable and named by no entry that stays (what is
    // named from inside a detached tree comes back with it).
    let detached: Vec<u64> = inodes
        .keys()
        .copied()
        .filter(|i| !reached.contains(i) && !named.contains(i))
        .collect();

    // Apply: removals, types, keys.
    for (i, e) in entries.iter().enumerate() {
        match fate[i] {
            Fate::Remove | Fate::Rekey => {
                m.with_node(label, e.dir, |vol, n| n.dir_remove(vol, e.key))?;
            }
            Fate::Retype => {
                let t = inodes[&e.inum].otype;
                m.with_node(label, e.dir, |vol, n| {
                    if let Some(mut br) = n.table.lookup(vol, e.key)? {
                        let mut h = br.dirent();
                        h.obj_type = t.to_u8();
                        br.set_dirent(h);
                        n.table
                            .insert(vol, crate::blocktable::TreeKind::Directory, true, br)?;
                        n.dirty = true;
                    }
                    Ok(())
                })?;
            }
            Fate::Keep => {}
        }
    }
    let mut links: BTreeMap<u64, u64> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        if fate[i] == Fate::Rekey {
            let t = inodes[&e.inum].otype;
            let head = DirentHead {
                inum: e.inum,
                namlen: e.name.len() as u16,
                obj_type: t.to_u8(),
            };
            let r = m.with_node(label, e.dir, |vol, n| {
                let check = n.data.meta.check_algo;
                if n.dir_lookup(vol, &e.name)?.is_some() {
                    return Ok(false);
                }
                n.dir_insert(vol, &e.name, head, check).map(|_| true)
            });
            match r {
                Ok(true) => {}
                Ok(false) | Err(_) => {
                    log.lossy(
                        Some(label),
                        Some(e.dir),
                        None,
                        format!(
                            "entry \"{}\" could not be filed again (the name is taken or \
                             cannot be used): dropped",
                            e.shown()
                        ),
                    );
                    continue;
                }
            }
        }
        if fate[i] != Fate::Remove {
            *links.entry(e.inum).or_default() += 1;
        }
    }
    // Detached inodes: removed when unlinked, else to lost+found.
    let mut lost = Vec::new();
    for inum in detached {
        let ino = &inodes[&inum];
        if inum == ROOT_INUM {
            continue;
        }
        let empty = ino.otype != ObjType::Directory || !ino.has_entries;
        if ino.nlinks == 0 && empty {
            if let Some(p) = m.pfs.get_mut(label) {
                p.inodes.get_mut().remove(&inum);
                p.removed.get_mut().insert(inum);
            }
            log.safe(
                Some(label),
                Some(inum),
                None,
                format!(
                    "inode {inum} ({}) is in no directory and has no links (unlinked while \
                     open): removed",
                    ino.otype.name()
                ),
            );
        } else {
            lost.push(inum);
        }
    }
    if !lost.is_empty() {
        let lf = lost_and_found(m, label, opts)?;
        let reachable_lf = lf;
        for inum in lost {
            let ino = &inodes[&inum];
            let head = DirentHead {
                inum,
                namlen: 0,
                obj_type: ino.otype.to_u8(),
            };
            let placed = m.with_node(label, reachable_lf, |vol, n| {
                let check = n.data.meta.check_algo;
                let mut name = format!("#{inum}").into_bytes();
                let mut k = 0;
                while n.dir_lookup(vol, &name)?.is_some() {
                    k += 1;
                    name = format!("#{inum}.{k}").into_bytes();
                }
                n.dir_insert(vol, &name, head, check)?;
                Ok(String::from_utf8_lossy(&name).into_owned())
            });
            match placed {
                Ok(name) => {
                    *links.entry(inum).or_default() += 1;
                    if ino.otype == ObjType::Directory {
                        m.with_node(label, inum, |_, n| {
                            n.data.meta.iparent = reachable_lf;
                            n.dirty = true;
                            Ok(())
                        })?;
                    }
                    log.safe(
                        Some(label),
                        Some(inum),
                        None,
                        format!(
                            "inode {inum} ({}) is reached by no directory: moved to \
                             /lost+found/{name}",
                            ino.otype.name()
                        ),
                    );
                }
                Err(e) => log.lossy(
                    Some(label),
                    Some(inum),
                    None,
                    format!("inode {inum} could not be put in lost+found: {e}"),
                ),
            }
        }
    }
    // Link counts.
    let removed: BTreeSet<u64> = m
        .pfs
        .get(label)
        .map(|p| p.removed.lock().iter().copied().collect())
        .unwrap_or_default();
    for (inum, ino) in &inodes {
        if *inum == ROOT_INUM || removed.contains(inum) {
            continue;
        }
        let n = links.get(inum).copied().unwrap_or(0);
        let want = if ino.otype == ObjType::Directory {
            if ino.nlinks == 0 && n > 0 {
                1
            } else {
                ino.nlinks
            }
        } else if n > 0 {
            n
        } else {
            ino.nlinks
        };
        if want != ino.nlinks {
            m.with_node(label, *inum, |_, node| {
                node.data.meta.nlinks = want;
                node.dirty = true;
                Ok(())
            })?;
            log.safe(
                Some(label),
                Some(*inum),
                None,
                format!("inode {inum}: nlinks {} set to {want}", ino.nlinks),
            );
        }
    }
    Ok(())
}

/// The PFS's `lost+found` directory, made when missing (as e2fsck
/// makes it: mode 0700, owned by root).
fn lost_and_found(m: &mut Mount, label: &str, opts: &Options) -> Result<u64> {
    let mut name = b"lost+found".to_vec();
    for k in 0..100 {
        if k > 0 {
            name = format!("lost+found.{k}").into_bytes();
        }
        match m.lookup(label, ROOT_INUM, &name)? {
            Some(i) => {
                if m.getattr(label, i)?.obj_type == ObjType::Directory {
                    return Ok(i);
                }
            }
            None => return m.mkdir(label, ROOT_INUM, &name, 0o700, 0, 0, opts.now),
        }
    }
    Err(crate::Error::Exists {
        what: "lost+found (and lost+found.1 to .99) as files".into(),
    })
}
