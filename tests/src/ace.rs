//! The crash-consistency suite: bounded, Ace-style workloads (every
//! sequence of one operation, sampled sequences of two and three) run
//! in-process on the recording device, then every crash state the log
//! allows is rebuilt and checked against an independent model.
//!
//! Crash states of a workload, per epoch (the writes between two
//! barriers): every write prefix, every subset of the epoch's writes
//! (exhaustive up to `Config::exhaustive_max` writes, sampled above),
//! and torn writes (a random subset of the 512-byte sectors of one
//! write, the volume header included). Writes of earlier epochs are
//! always whole: a barrier orders them.
//!
//! The oracle: fsck finds no problem; the image mounts; its tree equals
//! the state of the last commit whose volume header write is whole in
//! the image (a torn header may leave either that commit or the one
//! before, as the header copies' CRCs decide); and the recovered
//! filesystem takes new writes, flushes, and stays fsck-clean. A sync is
//! a commit of everything; an fsync or fdatasync a partial commit of the
//! dependency groups of its target and of the root (`Groups`, which
//! restates the library's rules from the operations): the state it
//! leaves (`Committed`) is the last one with those inodes and directory
//! entries as they are now and everything else as before. So everything
//! an fsync, fdatasync or sync returned from is there exactly, every
//! operation is there whole or not at all (an entry never without its
//! inode, a link count always its entries'), and what nobody fsynced
//! keeps its last committed state.
//!
//! The model is a plain map of paths to inodes (type, mode, contents or
//! target, links), updated by the workload and snapshotted at each
//! flush; the library's tree is read back and compared with it.

use bufcache::recording::{Event, RecordingDevice};
use bufcache::{BlockDevice, MemDevice};
use hammer2::disk::{self, ObjType};
use hammer2::mount::{Mount, RenameFlags, SetAttr, ROOT_INUM};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::hash::{Hash, Hasher};
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock, RwLock};

/// The PFS the workloads run in.
pub const LABEL: &str = "DATA";
/// Image size: big enough for all four volume header copies (one per
/// 2 GiB zone), so a torn header write has older copies to fall back on.
pub const IMAGE_BYTES: u64 = (6 << 30) + (64 << 20);
/// Sector size torn writes are cut into.
pub const SECTOR: usize = 512;

// ---------------------------------------------------------------------
// The model.

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MKind {
    File(Vec<u8>),
    Dir,
    Symlink(Vec<u8>),
}

#[derive(Clone, Debug)]
struct MInode {
    kind: MKind,
    mode: u32,
}

/// A path-keyed model of one PFS: paths (without a leading slash; the
/// root is implicit) to inode ids, and the inodes.
#[derive(Clone, Debug, Default)]
pub struct Model {
    paths: BTreeMap<String, u64>,
    inodes: BTreeMap<u64, MInode>,
    next: u64,
}

/// One entry of a tree as compared: type, mode, links (non-directories),
/// contents or target, and the first path of the same inode (hard links).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TEntry {
    pub kind: char,
    pub mode: u32,
    pub nlink: u64,
    pub data: Vec<u8>,
    pub group: String,
}

/// A whole tree: path -> entry.
pub type Tree = BTreeMap<String, TEntry>;

fn parent_of(path: &str) -> &str {
    path.rfind('/').map_or("", |i| &path[..i])
}

fn name_of(path: &str) -> &str {
    path.rfind('/').map_or(path, |i| &path[i + 1..])
}

fn under(path: &str, dir: &str) -> bool {
    path.len() > dir.len() && path.starts_with(dir) && path.as_bytes()[dir.len()] == b'/'
}

type MResult = std::result::Result<(), &'static str>;

impl Model {
    /// Every path, with its kind: 'f' file, 'd' directory, 'l' symlink.
    pub fn paths(&self) -> Vec<(String, char)> {
        self.paths
            .iter()
            .map(|(p, i)| {
                let k = match self.inodes[i].kind {
                    MKind::File(_) => 'f',
                    MKind::Dir => 'd',
                    MKind::Symlink(_) => 'l',
                };
                (p.clone(), k)
            })
            .collect()
    }

    fn is_dir(&self, path: &str) -> bool {
        path.is_empty()
            || self
                .paths
                .get(path)
                .is_some_and(|i| self.inodes[i].kind == MKind::Dir)
    }

    fn add(&mut self, path: &str, kind: MKind, mode: u32) -> MResult {
        if !self.is_dir(parent_of(path)) {
            return Err("parent is not a directory");
        }
        if self.paths.contains_key(path) {
            return Err("exists");
        }
        self.next += 1;
        self.inodes.insert(self.next, MInode { kind, mode });
        self.paths.insert(path.to_string(), self.next);
        Ok(())
    }

    fn file_mut(&mut self, path: &str) -> std::result::Result<&mut Vec<u8>, &'static str> {
        let ino = *self.paths.get(path).ok_or("no such file")?;
        match &mut self.inodes.get_mut(&ino).ok_or("no inode")?.kind {
            MKind::File(d) => Ok(d),
            _ => Err("not a file"),
        }
    }

    fn drop_path(&mut self, path: &str) {
        if let Some(ino) = self.paths.remove(path) {
            if !self.paths.values().any(|&i| i == ino) {
                self.inodes.remove(&ino);
            }
        }
    }

    fn has_children(&self, dir: &str) -> bool {
        self.paths.keys().any(|p| under(p, dir))
    }

    /// Apply `op`; `Err` when the operation must fail (and nothing changes).
    pub fn apply(&mut self, op: &Op) -> MResult {
        match op {
            Op::Creat(p) => self.add(p, MKind::File(Vec::new()), 0o644),
            Op::Mkdir(p) => self.add(p, MKind::Dir, 0o755),
            Op::Symlink { target, path } => {
                self.add(path, MKind::Symlink(target.as_bytes().to_vec()), 0o777)
            }
            Op::Write {
                path,
                off,
                len,
                seed,
            } => {
                let d = self.file_mut(path)?;
                let end = *off as usize + len;
                if d.len() < end {
                    d.resize(end, 0);
                }
                d[*off as usize..end].copy_from_slice(&pattern(*seed, *off, *len));
                Ok(())
            }
            Op::Truncate { path, size } => {
                self.file_mut(path)?.resize(*size as usize, 0);
                Ok(())
            }
            Op::Fallocate {
                path,
                off,
                len,
                punch,
            } => {
                let d = self.file_mut(path)?;
                let end = (off + len) as usize;
                if *punch {
                    let stop = end.min(d.len());
                    if (*off as usize) < stop {
                        d[*off as usize..stop].fill(0);
                    }
                } else if d.len() < end {
                    d.resize(end, 0);
                }
                Ok(())
            }
            Op::Link(src, dst) => {
                let ino = *self.paths.get(src).ok_or("no source")?;
                if self.inodes[&ino].kind == MKind::Dir {
                    return Err("link of a directory");
                }
                if !self.is_dir(parent_of(dst)) {
                    return Err("parent is not a directory");
                }
                if self.paths.contains_key(dst) {
                    return Err("exists");
                }
                self.paths.insert(dst.clone(), ino);
                Ok(())
            }
            Op::Unlink(p) => {
                let ino = *self.paths.get(p).ok_or("no such file")?;
                if self.inodes[&ino].kind == MKind::Dir {
                    return Err("is a directory");
                }
                self.drop_path(p);
                Ok(())
            }
            Op::Rmdir(p) => {
                if p.is_empty() || !self.paths.contains_key(p) {
                    return Err("no such directory");
                }
                if !self.is_dir(p) {
                    return Err("not a directory");
                }
                if self.has_children(p) {
                    return Err("not empty");
                }
                self.drop_path(p);
                Ok(())
            }
            Op::Rename(src, dst) => {
                let ino = *self.paths.get(src).ok_or("no source")?;
                if !self.is_dir(parent_of(dst)) {
                    return Err("target parent is not a directory");
                }
                let src_dir = self.inodes[&ino].kind == MKind::Dir;
                if src_dir && (dst == src || under(dst, src)) {
                    return if dst == src {
                        Ok(())
                    } else {
                        Err("directory into itself")
                    };
                }
                if let Some(&d) = self.paths.get(dst) {
                    if d == ino {
                        return Ok(());
                    }
                    let dst_dir = self.inodes[&d].kind == MKind::Dir;
                    match (src_dir, dst_dir) {
                        (true, false) => return Err("not a directory"),
                        (false, true) => return Err("is a directory"),
                        (true, true) if self.has_children(dst) => return Err("not empty"),
                        _ => {}
                    }
                    self.drop_path(dst);
                }
                let moved: Vec<(String, u64)> = self
                    .paths
                    .iter()
                    .filter(|(p, _)| *p == src || under(p, src))
                    .map(|(p, i)| (p.clone(), *i))
                    .collect();
                for (p, i) in moved {
                    self.paths.remove(&p);
                    self.paths.insert(format!("{dst}{}", &p[src.len()..]), i);
                }
                Ok(())
            }
            Op::Setattr { path, mode } => {
                let ino = *self.paths.get(path).ok_or("no such file")?;
                self.inodes.get_mut(&ino).ok_or("no inode")?.mode = *mode;
                Ok(())
            }
        }
    }

    /// The tree as compared.
    pub fn tree(&self) -> Tree {
        let mut first: HashMap<u64, &str> = HashMap::new();
        let mut links: HashMap<u64, u64> = HashMap::new();
        for (p, i) in &self.paths {
            first.entry(*i).or_insert(p);
            *links.entry(*i).or_insert(0) += 1;
        }
        self.paths
            .iter()
            .map(|(p, i)| {
                let n = &self.inodes[i];
                let (kind, data, nlink) = match &n.kind {
                    MKind::File(d) => ('f', d.clone(), links[i]),
                    MKind::Dir => ('d', Vec::new(), 0),
                    MKind::Symlink(t) => ('l', t.clone(), links[i]),
                };
                (
                    p.clone(),
                    TEntry {
                        kind,
                        mode: n.mode,
                        nlink,
                        data,
                        group: first[i].to_string(),
                    },
                )
            })
            .collect()
    }
}

/// The root directory's id in the model (inode ids start at 1).
pub const MROOT: u64 = 0;

impl Model {
    /// The inode id of `path` (`MROOT` for the root).
    pub fn id_of(&self, path: &str) -> Option<u64> {
        if path.is_empty() {
            Some(MROOT)
        } else {
            self.paths.get(path).copied()
        }
    }

    /// The entries of directory `dir`: name to inode id.
    fn entries(&self, dir: u64) -> BTreeMap<String, u64> {
        self.paths
            .iter()
            .filter(|(p, _)| self.id_of(parent_of(p)) == Some(dir))
            .map(|(p, i)| (name_of(p).to_string(), *i))
            .collect()
    }

    fn links(&self, id: u64) -> u64 {
        self.paths.values().filter(|&&i| i == id).count() as u64
    }
}

/// The dependency groups the model expects (the rules of the library's
/// `depend.rs`, restated): each operation that changes several inodes
/// ties them; an fsync commits the groups of its target and of the root.
#[derive(Clone, Debug, Default)]
pub struct Groups {
    parent: HashMap<u64, u64>,
}

impl Groups {
    fn find(&mut self, x: u64) -> u64 {
        let p = *self.parent.entry(x).or_insert(x);
        if p == x {
            return x;
        }
        let r = self.find(p);
        self.parent.insert(x, r);
        r
    }

    fn tie(&mut self, ids: &[u64]) {
        if let Some((&first, rest)) = ids.split_first() {
            let a = self.find(first);
            for &i in rest {
                let b = self.find(i);
                self.parent.insert(b, a);
            }
        }
    }

    /// Record what `op` ties, on `model` as it was before `op` (which
    /// `after` is after it, `op` having succeeded).
    pub fn note(&mut self, before: &Model, after: &Model, op: &Op) {
        let pid = |m: &Model, p: &str| m.id_of(parent_of(p));
        let ids: Vec<Option<u64>> = match op {
            Op::Creat(p) | Op::Mkdir(p) | Op::Symlink { path: p, .. } => {
                vec![pid(after, p), after.id_of(p)]
            }
            Op::Link(src, dst) => vec![before.id_of(src), pid(after, dst)],
            Op::Unlink(p) | Op::Rmdir(p) => vec![pid(before, p), before.id_of(p)],
            Op::Rename(src, dst) => {
                if before.paths == after.paths {
                    // Nothing moved (the same inode under both names).
                    return;
                }
                vec![
                    pid(before, src),
                    pid(before, dst),
                    before.id_of(src),
                    before.paths.get(dst.as_str()).copied(),
                ]
            }
            _ => return,
        };
        let ids: Vec<u64> = ids.into_iter().flatten().collect();
        self.tie(&ids);
    }

    /// The inodes an fsync of `target` commits: its group and the root's.
    pub fn closure(&mut self, target: u64) -> Vec<u64> {
        let (t, r) = (self.find(target), self.find(MROOT));
        let mut out: Vec<u64> = self.parent.keys().copied().collect();
        out.retain(|&x| {
            let g = self.find(x);
            g == t || g == r
        });
        out.extend([target, MROOT]);
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The groups of `ids` are committed.
    pub fn committed(&mut self, ids: &[u64]) {
        let gone: Vec<u64> = ids.iter().map(|&i| self.find(i)).collect();
        let members: Vec<u64> = self.parent.keys().copied().collect();
        let drop: Vec<u64> = members
            .into_iter()
            .filter(|&x| gone.contains(&self.find(x)))
            .collect();
        for x in drop {
            self.parent.remove(&x);
        }
    }
}

/// The model as the commits so far left it on disk: the directories'
/// entries and the inodes (with their link counts) as of the commit
/// that last included each. A flush commits everything, an fsync the
/// closure of its target (`Groups::closure`).
#[derive(Clone, Debug, Default)]
pub struct Committed {
    dirs: BTreeMap<u64, BTreeMap<String, u64>>,
    inodes: BTreeMap<u64, (MInode, u64)>,
}

impl Committed {
    /// Everything in `model` committed.
    pub fn full(model: &Model) -> Committed {
        let mut c = Committed::default();
        let all: Vec<u64> = std::iter::once(MROOT)
            .chain(model.inodes.keys().copied())
            .collect();
        c.apply(model, &all);
        c
    }

    /// The inodes `ids` committed as `model` has them now.
    pub fn apply(&mut self, model: &Model, ids: &[u64]) {
        for &id in ids {
            let dir = id == MROOT || model.inodes.get(&id).is_some_and(|n| n.kind == MKind::Dir);
            if dir {
                self.dirs.insert(id, model.entries(id));
            } else {
                self.dirs.remove(&id);
            }
            match model.inodes.get(&id) {
                Some(n) => {
                    self.inodes.insert(id, (n.clone(), model.links(id)));
                }
                None => {
                    self.inodes.remove(&id);
                }
            }
        }
    }

    /// Every committed path and its inode, walked from the root through
    /// committed directories (bounded, in case a broken rule made a loop).
    fn paths(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let mut stack = vec![(MROOT, String::new())];
        while let Some((dir, path)) = stack.pop() {
            for (name, &id) in self.dirs.get(&dir).into_iter().flatten() {
                let p = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}/{name}")
                };
                if self.dirs.contains_key(&id) && out.len() < 100_000 {
                    stack.push((id, p.clone()));
                }
                out.push((p, id));
            }
        }
        out
    }

    /// The committed state as a model (its ids continuing `like`'s).
    pub fn to_model(&self, like: &Model) -> Model {
        let paths: BTreeMap<String, u64> = self.paths().into_iter().collect();
        let inodes = self
            .inodes
            .iter()
            .filter(|(id, _)| paths.values().any(|i| i == *id))
            .map(|(id, (n, _))| (*id, n.clone()))
            .collect();
        Model {
            paths,
            inodes,
            next: like.next,
        }
    }

    /// The tree as compared. An entry whose inode was never committed
    /// (a broken group rule) shows as kind '!', which no tree read back
    /// has.
    pub fn tree(&self) -> Tree {
        let mut raw = self.paths();
        raw.sort();
        let mut first: HashMap<u64, String> = HashMap::new();
        raw.into_iter()
            .map(|(p, id)| {
                let group = first.entry(id).or_insert_with(|| p.clone()).clone();
                let e = match self.inodes.get(&id) {
                    Some((n, links)) => {
                        let (kind, data, nlink) = match &n.kind {
                            MKind::File(d) => ('f', d.clone(), *links),
                            MKind::Dir => ('d', Vec::new(), 0),
                            MKind::Symlink(t) => ('l', t.clone(), *links),
                        };
                        TEntry {
                            kind,
                            mode: n.mode,
                            nlink,
                            data,
                            group,
                        }
                    }
                    None => TEntry {
                        kind: '!',
                        mode: 0,
                        nlink: 0,
                        data: Vec::new(),
                        group,
                    },
                };
                (p, e)
            })
            .collect()
    }
}

/// Deterministic file contents: text-like (compressible) for even
/// seeds, pseudo-random for odd ones; a function of the file offset.
pub fn pattern(seed: u8, off: u64, len: usize) -> Vec<u8> {
    (off..off + len as u64)
        .map(|i| {
            if seed.is_multiple_of(2) {
                b"hammer2 crash suite "[(i % 20) as usize].wrapping_add(seed)
            } else {
                let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(seed) << 56;
                x ^= x >> 29;
                x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
                (x >> 32) as u8
            }
        })
        .collect()
}

// ---------------------------------------------------------------------
// Workloads.

/// One operation, on paths.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Creat(String),
    Mkdir(String),
    /// write(2) and overwrite (the same call; the workloads use it both
    /// to extend files and to overwrite data already there).
    Write {
        path: String,
        off: u64,
        len: usize,
        seed: u8,
    },
    Truncate {
        path: String,
        size: u64,
    },
    /// Mode 0 (extend the size) or PUNCH_HOLE|KEEP_SIZE (zeros).
    Fallocate {
        path: String,
        off: u64,
        len: u64,
        punch: bool,
    },
    Link(String, String),
    Unlink(String),
    Rmdir(String),
    Rename(String, String),
    Symlink {
        target: String,
        path: String,
    },
    Setattr {
        path: String,
        mode: u32,
    },
}

/// What follows an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Persist {
    Fsync,
    Fdatasync,
    Sync,
    Nothing,
    /// The file data written ahead of a commit, as the daemon's flusher
    /// does when much is written (`Mount::launder_begin`): nothing is
    /// committed.
    Launder,
}

pub const PERSISTS: [Persist; 4] = [
    Persist::Fsync,
    Persist::Fdatasync,
    Persist::Sync,
    Persist::Nothing,
];

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Step {
    pub op: Op,
    pub persist: Persist,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = match self.persist {
            Persist::Fsync => "; fsync",
            Persist::Fdatasync => "; fdatasync",
            Persist::Sync => "; sync",
            Persist::Launder => "; laundered",
            Persist::Nothing => "",
        };
        match &self.op {
            Op::Creat(a) => write!(f, "creat {a}{p}"),
            Op::Mkdir(a) => write!(f, "mkdir {a}{p}"),
            Op::Write {
                path,
                off,
                len,
                seed,
            } => write!(f, "write {path} @{off}+{len} ({seed}){p}"),
            Op::Truncate { path, size } => write!(f, "truncate {path} {size}{p}"),
            Op::Fallocate {
                path,
                off,
                len,
                punch,
            } => write!(
                f,
                "fallocate{} {path} @{off}+{len}{p}",
                if *punch { " punch" } else { "" }
            ),
            Op::Link(a, b) => write!(f, "link {a} {b}{p}"),
            Op::Unlink(a) => write!(f, "unlink {a}{p}"),
            Op::Rmdir(a) => write!(f, "rmdir {a}{p}"),
            Op::Rename(a, b) => write!(f, "rename {a} {b}{p}"),
            Op::Symlink { target, path } => write!(f, "symlink {target} {path}{p}"),
            Op::Setattr { path, mode } => write!(f, "chmod {mode:o} {path}{p}"),
        }
    }
}

/// Describe a workload in one line.
pub fn describe(steps: &[Step]) -> String {
    steps
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(" | ")
}

fn s(x: &str) -> String {
    x.to_string()
}

/// The starting tree every workload runs on (committed by one flush).
fn setup_ops() -> Vec<Op> {
    vec![
        Op::Mkdir(s("A")),
        Op::Mkdir(s("A/C")),
        Op::Mkdir(s("B")),
        Op::Mkdir(s("E")),
        Op::Creat(s("foo")),
        Op::Write {
            path: s("foo"),
            off: 0,
            len: 70_000,
            seed: 1,
        },
        Op::Creat(s("A/bar")),
        Op::Write {
            path: s("A/bar"),
            off: 0,
            len: 4000,
            seed: 2,
        },
        Op::Creat(s("B/baz")),
        Op::Symlink {
            target: s("foo"),
            path: s("ln"),
        },
    ]
}

fn w(path: &str, off: u64, len: usize, seed: u8) -> Op {
    Op::Write {
        path: s(path),
        off,
        len,
        seed,
    }
}

/// Every operation variant of the bounded space: each operation with a
/// few argument choices over the starting tree (files foo, A/bar, B/baz,
/// the symlink ln; directories A, A/C, B, E).
pub fn variants() -> Vec<Op> {
    let t = |p: &str, size| Op::Truncate { path: s(p), size };
    let fa = |p: &str, off, len, punch| Op::Fallocate {
        path: s(p),
        off,
        len,
        punch,
    };
    let ren = |a: &str, b: &str| Op::Rename(s(a), s(b));
    let link = |a: &str, b: &str| Op::Link(s(a), s(b));
    let chmod = |p: &str, mode| Op::Setattr { path: s(p), mode };
    let sym = |target: &str, path: &str| Op::Symlink {
        target: s(target),
        path: s(path),
    };
    vec![
        Op::Creat(s("new")),
        Op::Creat(s("A/new")),
        Op::Creat(s("A/C/new")),
        Op::Mkdir(s("D")),
        Op::Mkdir(s("A/D")),
        Op::Mkdir(s("A/C/D")),
        // write: append, extend sparsely, fill an empty file across a block
        w("foo", 70_000, 5000, 3),
        w("A/bar", 100_000, 3000, 4),
        w("B/baz", 0, 70_000, 5),
        // overwrite: inside a block, across two blocks, a whole small file
        w("foo", 1000, 3000, 6),
        w("foo", 60_000, 10_000, 7),
        w("A/bar", 0, 4000, 8),
        t("foo", 0),
        t("foo", 1000),
        t("foo", 65_536),
        t("A/bar", 200_000),
        fa("foo", 0, 150_000, false),
        fa("A/bar", 1000, 2000, true),
        fa("foo", 0, 65_536, true),
        link("foo", "A/foo2"),
        link("A/bar", "B/bar2"),
        link("B/baz", "baz2"),
        Op::Unlink(s("foo")),
        Op::Unlink(s("A/bar")),
        Op::Unlink(s("ln")),
        Op::Rmdir(s("A/C")),
        Op::Rmdir(s("E")),
        ren("foo", "A/foo"),
        ren("A/bar", "foo"),
        ren("A", "E/A"),
        ren("B", "Z"),
        ren("ln", "A/ln"),
        ren("E", "A/C"),
        sym("foo", "sl"),
        sym("../foo", "A/sl"),
        sym(&"t".repeat(700), "B/long"),
        chmod("foo", 0o600),
        chmod("A", 0o700),
        chmod("A/bar", 0o4755),
    ]
}

/// Changes to other files left dirty before an fsync: a lone write
/// (a group of its own) and a new file with data in a directory no other
/// dirty change is tied to, so a partial commit must leave them out.
fn dirty_prelude() -> Vec<Step> {
    [
        w("B/baz", 0, 70_000, 9),
        Op::Creat(s("A/C/dirty")),
        w("A/C/dirty", 0, 5000, 10),
    ]
    .into_iter()
    .map(|op| Step {
        op,
        persist: Persist::Nothing,
    })
    .collect()
}

/// Every one-operation workload: each operation with each persistence,
/// then each with fsync and fdatasync again after other files were
/// changed and left dirty (`dirty_prelude`), and with fsync after other
/// files' data was laundered (written ahead, not committed).
pub fn one_op_workloads() -> Vec<Vec<Step>> {
    let mut v = Vec::new();
    for op in variants() {
        for persist in PERSISTS {
            v.push(vec![Step {
                op: op.clone(),
                persist,
            }]);
        }
    }
    for op in variants() {
        for persist in [Persist::Fsync, Persist::Fdatasync] {
            let mut steps = dirty_prelude();
            steps.push(Step {
                op: op.clone(),
                persist,
            });
            v.push(steps);
        }
        let mut steps = dirty_prelude();
        if let Some(last) = steps.last_mut() {
            last.persist = Persist::Launder;
        }
        steps.push(Step {
            op: op.clone(),
            persist: Persist::Fsync,
        });
        v.push(steps);
    }
    v
}

/// A sampled workload of `k` operations from `seed`: each step a random
/// variant and persistence, the last one persisted.
pub fn sampled_workload(k: usize, seed: u64) -> Vec<Step> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let vars = variants();
    (0..k)
        .map(|i| {
            let op = vars[rng.gen_range(0..vars.len())].clone();
            let persist = if i + 1 == k {
                PERSISTS[rng.gen_range(0..3)]
            } else {
                PERSISTS[rng.gen_range(0..4)]
            };
            Step { op, persist }
        })
        .collect()
}

/// Which workload: the index of a one-operation workload, or the
/// length and seed of a sampled one. `Display` is what `--replay` takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadId {
    One(usize),
    Sampled { ops: usize, seed: u64 },
}

impl std::fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkloadId::One(i) => write!(f, "1:{i}"),
            WorkloadId::Sampled { ops, seed } => write!(f, "{ops}:{seed}"),
        }
    }
}

impl std::str::FromStr for WorkloadId {
    type Err = String;
    fn from_str(v: &str) -> std::result::Result<Self, String> {
        let (a, b) = v
            .split_once(':')
            .ok_or_else(|| format!("{v:?}: expected OPS:SEED"))?;
        let ops: usize = a.parse().map_err(|_| format!("{a:?}: not a number"))?;
        let n: u64 = b.parse().map_err(|_| format!("{b:?}: not a number"))?;
        match ops {
            1 => Ok(WorkloadId::One(n as usize)),
            2..=16 => Ok(WorkloadId::Sampled { ops, seed: n }),
            _ => Err(format!("{ops} operations: expected 1 to 16")),
        }
    }
}

impl WorkloadId {
    pub fn steps(&self) -> Option<Vec<Step>> {
        match *self {
            WorkloadId::One(i) => one_op_workloads().get(i).cloned(),
            WorkloadId::Sampled { ops, seed } => Some(sampled_workload(ops, seed)),
        }
    }
}

/// The seed of the `i`-th sampled workload of a run seeded `seed`.
pub fn sample_seed(seed: u64, i: u64) -> u64 {
    let mut x = seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xd6e8_feb8_6659_fd93);
    x ^ (x >> 32)
}

// ---------------------------------------------------------------------
// Driving the library.

/// The inode at `path` ("" is the root).
pub fn resolve(m: &mut Mount, path: &str) -> hammer2::Result<u64> {
    let mut inum = ROOT_INUM;
    if path.is_empty() {
        return Ok(inum);
    }
    for part in path.split('/') {
        inum = m
            .lookup(LABEL, inum, part.as_bytes())?
            .ok_or_else(|| hammer2::Error::NotFound { what: s(path) })?;
    }
    Ok(inum)
}

/// Run `op` on the library.
pub fn lib_apply(m: &mut Mount, op: &Op, now: u64) -> hammer2::Result<()> {
    let pn = |m: &mut Mount, p: &str| -> hammer2::Result<(u64, Vec<u8>)> {
        Ok((resolve(m, parent_of(p))?, name_of(p).as_bytes().to_vec()))
    };
    match op {
        Op::Creat(p) => {
            let (d, n) = pn(m, p)?;
            // Half of the creates, links, unlinks and renames (every
            // other step: `now` moves by 1000 a step) as the mount's go
            // first: with the mount shared and their inodes' own locks
            // (`mount/namespace.rs`); what that declines goes the usual
            // way.
            let shared = (now / 1000).is_multiple_of(2)
                && matches!(
                    m.create_shared(LABEL, d, &n, ObjType::Regfile, (0, 0), now, |_| {
                        Ok::<_, Infallible>((0o644, 0, 0))
                    }),
                    Some(Ok(_))
                );
            if !shared {
                m.create(LABEL, d, &n, ObjType::Regfile, 0o644, 0, 0, (0, 0), now)?;
            }
        }
        Op::Mkdir(p) => {
            let (d, n) = pn(m, p)?;
            m.mkdir(LABEL, d, &n, 0o755, 0, 0, now)?;
        }
        Op::Symlink { target, path } => {
            let (d, n) = pn(m, path)?;
            m.symlink(LABEL, d, &n, target.as_bytes(), 0, 0, now)?;
        }
        Op::Write {
            path,
            off,
            len,
            seed,
        } => {
            let i = resolve(m, path)?;
            let data = pattern(*seed, *off, *len);
            // Half of the writes as the mount's writes go first: with the
            // mount shared and the file's own lock, the whole blocks
            // filled beforehand; what that declines goes the usual way.
            let mut filled = match seed % 2 {
                0 => hammer2::inode::Filled::of(m.volume(), *off, &data),
                _ => hammer2::inode::Filled::default(),
            };
            let shared = seed % 2 == 0
                && matches!(
                    m.write_shared(LABEL, i, *off, &data, now, &mut filled, |_| true),
                    Some(Ok(()))
                );
            if !shared {
                m.write_filled(LABEL, i, *off, &data, now, &mut filled)?;
            }
        }
        Op::Truncate { path, size } => {
            let i = resolve(m, path)?;
            let a = SetAttr {
                size: Some(*size),
                ..SetAttr::default()
            };
            m.setattr(LABEL, i, a, now)?;
        }
        Op::Fallocate {
            path,
            off,
            len,
            punch,
        } => {
            let i = resolve(m, path)?;
            let meta = m.getattr(LABEL, i)?;
            if meta.obj_type != ObjType::Regfile {
                return Err(hammer2::Error::InvalidArgument {
                    what: s("fallocate of a non-file"),
                });
            }
            let end = off + len;
            if *punch {
                let stop = end.min(meta.size);
                if *off < stop {
                    m.write(LABEL, i, *off, &vec![0; (stop - off) as usize], now)?;
                }
            } else if end > meta.size {
                let a = SetAttr {
                    size: Some(end),
                    ..SetAttr::default()
                };
                m.setattr(LABEL, i, a, now)?;
            }
        }
        Op::Link(a, b) => {
            let i = resolve(m, a)?;
            let (d, n) = pn(m, b)?;
            let shared = (now / 1000).is_multiple_of(2)
                && matches!(
                    m.link_shared(LABEL, i, d, &n, now, |_, _| Ok::<_, Infallible>(())),
                    Some(Ok(()))
                );
            if !shared {
                m.link(LABEL, i, d, &n, now)?;
            }
        }
        Op::Unlink(p) => {
            let (d, n) = pn(m, p)?;
            let shared = (now / 1000).is_multiple_of(2)
                && matches!(
                    m.unlink_shared(LABEL, d, &n, now, |_, _| Ok::<_, Infallible>(())),
                    Some(Ok(()))
                );
            if !shared {
                m.unlink(LABEL, d, &n, now)?;
            }
        }
        Op::Rmdir(p) => {
            let (d, n) = pn(m, p)?;
            m.rmdir(LABEL, d, &n, now)?;
        }
        Op::Rename(a, b) => {
            let (od, on) = pn(m, a)?;
            let (nd, nn) = pn(m, b)?;
            let allow = |_: &_, _: &_, _: &_, _: Option<&_>| Ok::<_, Infallible>(());
            let shared = (now / 1000).is_multiple_of(2)
                && matches!(
                    m.rename_shared(LABEL, od, &on, nd, &nn, false, now, allow),
                    Some(Ok(()))
                );
            if !shared {
                m.rename(LABEL, od, &on, nd, &nn, RenameFlags::default(), now)?;
            }
        }
        Op::Setattr { path, mode } => {
            let i = resolve(m, path)?;
            let a = SetAttr {
                mode: Some(*mode),
                ..SetAttr::default()
            };
            m.setattr(LABEL, i, a, now)?;
        }
    }
    Ok(())
}

/// The path an fsync after `op` names: the object, or its directory
/// when the object is gone.
fn fsync_target(op: &Op) -> &str {
    match op {
        Op::Creat(p) | Op::Mkdir(p) | Op::Setattr { path: p, .. } => p,
        Op::Write { path, .. } | Op::Truncate { path, .. } | Op::Fallocate { path, .. } => path,
        Op::Symlink { path, .. } => path,
        Op::Link(_, b) | Op::Rename(_, b) => b,
        Op::Unlink(p) | Op::Rmdir(p) => parent_of(p),
    }
}

/// Read the whole tree of the PFS back through the library.
pub fn lib_tree(m: &mut Mount) -> hammer2::Result<Tree> {
    let mut out = Tree::new();
    let mut first: HashMap<u64, String> = HashMap::new();
    let mut stack = vec![(ROOT_INUM, String::new())];
    let mut raw = Vec::new();
    while let Some((dir, path)) = stack.pop() {
        for e in m.readdir(LABEL, dir, 0)? {
            let name = String::from_utf8_lossy(&e.name).into_owned();
            let p = if path.is_empty() {
                name
            } else {
                format!("{path}/{name}")
            };
            let meta = m.getattr(LABEL, e.inum)?;
            if meta.obj_type == ObjType::Directory {
                if raw.len() > 100_000 {
                    return Err(hammer2::Error::corrupt(s("directory loop"), 0));
                }
                stack.push((e.inum, p.clone()));
            }
            raw.push((p, e.inum, meta));
        }
    }
    raw.sort_by(|a, b| a.0.cmp(&b.0));
    for (p, inum, meta) in raw {
        let group = first.entry(inum).or_insert_with(|| p.clone()).clone();
        let (kind, data, nlink) = match meta.obj_type {
            ObjType::Directory => ('d', Vec::new(), 0),
            ObjType::Softlink => ('l', m.readlink(LABEL, inum)?, meta.nlinks),
            ObjType::Regfile => (
                'f',
                m.read(LABEL, inum, 0, meta.size as usize + 1)?,
                meta.nlinks,
            ),
            _ => ('?', Vec::new(), meta.nlinks),
        };
        if kind == 'f' && data.len() as u64 != meta.size {
            return Err(hammer2::Error::corrupt(
                format!("{p}: size {} but {} bytes read", meta.size, data.len()),
                0,
            ));
        }
        out.insert(
            p,
            TEntry {
                kind,
                mode: meta.mode & 0o7777,
                nlink,
                data,
                group,
            },
        );
    }
    Ok(out)
}

/// A short account of how two trees differ.
pub fn tree_diff(got: &Tree, want: &Tree) -> String {
    let mut v = Vec::new();
    for (p, e) in want {
        match got.get(p) {
            None => v.push(format!("{p} missing")),
            Some(g) if g != e => v.push(format!(
                "{p} differs (type {}/{}, mode {:o}/{:o}, links {}/{}, {} /{} bytes{})",
                g.kind,
                e.kind,
                g.mode,
                e.mode,
                g.nlink,
                e.nlink,
                g.data.len(),
                e.data.len(),
                if g.data == e.data {
                    ""
                } else {
                    ", contents differ"
                }
            )),
            _ => {}
        }
    }
    for p in got.keys().filter(|p| !want.contains_key(*p)) {
        v.push(format!("{p} unexpected"));
    }
    v.truncate(6);
    v.join("; ")
}

// ---------------------------------------------------------------------
// Images.

/// A copy-on-write image over a shared base: crash states are built by
/// writing a few blocks on top of the image the workload started from.
pub struct Overlay {
    base: Arc<MemDevice>,
    chunks: RwLock<HashMap<u64, Box<[u8]>>>,
}

const CHUNK: u64 = 65536;

impl Overlay {
    pub fn new(base: Arc<MemDevice>) -> Overlay {
        Overlay {
            base,
            chunks: RwLock::new(HashMap::new()),
        }
    }

    fn chunk_copy(&self, idx: u64) -> io::Result<Box<[u8]>> {
        let mut b = vec![0u8; CHUNK as usize].into_boxed_slice();
        let at = idx * CHUNK;
        let n = (self.base.size_bytes() - at).min(CHUNK) as usize;
        self.base.read_at(&mut b[..n], at)?;
        Ok(b)
    }
}

fn check_range(offset: u64, len: usize, size: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{len} bytes at {offset:#x} past the end"),
        )),
    }
}

impl BlockDevice for Overlay {
    fn size_bytes(&self) -> u64 {
        self.base.size_bytes()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.size_bytes())?;
        let chunks = self.chunks.read().unwrap_or_else(|p| p.into_inner());
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let idx = at / CHUNK;
            let inner = (at % CHUNK) as usize;
            let n = (CHUNK as usize - inner).min(buf.len() - done);
            match chunks.get(&idx) {
                Some(c) => buf[done..done + n].copy_from_slice(&c[inner..inner + n]),
                None => self.base.read_at(&mut buf[done..done + n], at)?,
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.size_bytes())?;
        let mut chunks = self.chunks.write().unwrap_or_else(|p| p.into_inner());
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let idx = at / CHUNK;
            let inner = (at % CHUNK) as usize;
            let n = (CHUNK as usize - inner).min(buf.len() - done);
            let c = match chunks.entry(idx) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(self.chunk_copy(idx)?),
            };
            c[inner..inner + n].copy_from_slice(&buf[done..done + n]);
            done += n;
        }
        Ok(())
    }

    fn barrier(&self) -> io::Result<()> {
        Ok(())
    }
}

/// The starting image (the setup tree committed) and its model, per
/// format version, made once per process.
pub struct Base {
    pub image: Arc<MemDevice>,
    pub model: Model,
}

fn make_base(version: u32) -> Base {
    let dev = MemDevice::new(IMAGE_BYTES);
    let opts = mkfs::newfs::NewfsOptions {
        version,
        now_us: Some(crate::T0),
        uuid_seed: Some(u64::from(version)),
        ..Default::default()
    };
    mkfs::newfs::newfs(&dev, &opts).expect("newfs");
    let dev = Arc::new(dev);
    let d: Arc<dyn BlockDevice> = dev.clone();
    let mut m = Mount::open(d).expect("open the new image");
    let mut model = Model::default();
    for op in setup_ops() {
        model.apply(&op).expect("setup model");
        lib_apply(&mut m, &op, crate::T0).expect("setup");
    }
    m.flush().expect("setup flush");
    drop(m);
    Base { image: dev, model }
}

/// The base for format `version` (1 or 2).
pub fn base(version: u32) -> &'static Base {
    static V1: OnceLock<Base> = OnceLock::new();
    static V2: OnceLock<Base> = OnceLock::new();
    if version == 1 {
        V1.get_or_init(|| make_base(1))
    } else {
        V2.get_or_init(|| make_base(2))
    }
}

// ---------------------------------------------------------------------
// Crash states and the oracle.

/// How thoroughly to enumerate crash states.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Epochs with at most this many writes get every subset.
    pub exhaustive_max: usize,
    /// Random subsets of larger epochs.
    pub subset_samples: usize,
    /// Random sector subsets per write, for torn writes.
    pub torn_samples: usize,
    /// Also check that the recovered image takes new writes.
    pub probe_writes: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            exhaustive_max: 10,
            subset_samples: 256,
            torn_samples: 4,
            probe_writes: true,
        }
    }
}

/// A violation: what failed, where, and how to replay it.
#[derive(Clone, Debug)]
pub struct Violation {
    pub workload: WorkloadId,
    pub steps: String,
    pub state: String,
    pub what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "workload {} [{}], crash state {}: {} (replay: crashsuite --replay {})",
            self.workload, self.steps, self.state, self.what, self.workload
        )
    }
}

/// Figures of a run.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub workloads: u64,
    /// Workloads whose log equals one already checked (same crash states).
    pub duplicates: u64,
    pub states: u64,
    pub violations: Vec<Violation>,
}

/// One crash state: the log prefix whole, then some writes of the epoch
/// after it, some torn.
struct State<'a> {
    whole: Vec<(u64, &'a [u8])>,
    /// Acceptable trees (the first is the one expected when not torn).
    accept: Vec<&'a Tree>,
    /// The offset of a volume header copy torn in this state.
    torn_header: Option<u64>,
}

/// Write events at a volume header slot.
fn is_header_write(offset: u64, len: usize) -> bool {
    len == disk::VOLUME_BYTES && (0..disk::NUM_VOLHDRS).any(|i| disk::volhdr_offset(i) == offset)
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        s("panic")
    }
}

/// fsck `dev`: Ok when it finds no problem but, with `torn_header`,
/// the torn copy at that offset (a header copy whose write a crash
/// tore fails its CRCs; fsck says so, as DragonFly's does, and the next
/// flush rewrites that copy). The copy in use must not be that one.
pub fn fsck_clean(
    dev: Arc<dyn BlockDevice>,
    torn_header: Option<u64>,
) -> std::result::Result<(), String> {
    let r = hammer2::fsck::fsck(dev, hammer2::fsck::Options::default())
        .map_err(|e| format!("fsck failed: {e}"))?;
    if let (Some(at), Some(i)) = (torn_header, r.header_index) {
        if disk::volhdr_offset(i) == at {
            return Err(s("the torn volume header copy is in use"));
        }
    }
    let v: Vec<String> = r
        .problems
        .iter()
        .filter(|p| torn_header.is_none() || p.at != torn_header)
        .take(4)
        .map(|p| p.to_string())
        .collect();
    if v.is_empty() {
        Ok(())
    } else {
        Err(format!("fsck: {}", v.join("; ")))
    }
}

/// The oracle for one crash image.
fn check_image(
    base: &Arc<MemDevice>,
    writes: &[(u64, &[u8])],
    accept: &[&Tree],
    torn_header: Option<u64>,
    probe: bool,
) -> std::result::Result<(), String> {
    let img = Arc::new(Overlay::new(base.clone()));
    for (off, data) in writes {
        img.write_at(data, *off).map_err(|e| e.to_string())?;
    }
    let dev: Arc<dyn BlockDevice> = img;
    fsck_clean(dev.clone(), torn_header)?;
    let mut m = Mount::open(dev.clone()).map_err(|e| format!("mount: {e}"))?;
    let got = lib_tree(&mut m).map_err(|e| format!("reading the tree: {e}"))?;
    if !accept.iter().any(|t| **t == got) {
        let d: Vec<String> = accept.iter().map(|t| tree_diff(&got, t)).collect();
        return Err(format!(
            "tree is no acceptable state: {}",
            d.join(" / or / ")
        ));
    }
    if !probe {
        return Ok(());
    }
    // The recovered filesystem takes new writes and stays clean.
    let data = pattern(9, 0, 100_000);
    let f = crate::create_file(&mut m, LABEL, ROOT_INUM, b"__probe")
        .map_err(|e| format!("probe create: {e}"))?;
    m.write(LABEL, f, 0, &data, crate::T0)
        .map_err(|e| format!("probe write: {e}"))?;
    m.mkdir(LABEL, ROOT_INUM, b"__pdir", 0o755, 0, 0, crate::T0)
        .map_err(|e| format!("probe mkdir: {e}"))?;
    m.flush().map_err(|e| format!("probe flush: {e}"))?;
    drop(m);
    fsck_clean(dev.clone(), None).map_err(|e| format!("after new writes: {e}"))?;
    let mut m = Mount::open(dev).map_err(|e| format!("remount after new writes: {e}"))?;
    let mut again = lib_tree(&mut m).map_err(|e| format!("after new writes: {e}"))?;
    let p = again.remove("__probe").map(|e| e.data);
    again.remove("__pdir");
    if p.as_deref() != Some(&data[..]) || again != got {
        return Err(s("new writes after recovery did not read back"));
    }
    Ok(())
}

/// Check one crash state, turning a panic into a violation.
fn check_state(base: &Arc<MemDevice>, st: &State, probe: bool) -> std::result::Result<(), String> {
    match catch_unwind(AssertUnwindSafe(|| {
        check_image(base, &st.whole, &st.accept, st.torn_header, probe)
    })) {
        Ok(r) => r,
        Err(p) => Err(format!("panic: {}", panic_text(p))),
    }
}

/// What a workload run left: the log and the trees of its flushes.
pub struct Recorded {
    pub events: Vec<Event>,
    /// (log position of the header write, tree committed)
    pub commits: Vec<(usize, Tree)>,
    pub initial: Tree,
    pub version: u32,
}

/// Run `steps` on the recording device; `Err` is a violation found while
/// running (the library and the model disagreed on an outcome).
pub fn record(steps: &[Step], version: u32) -> std::result::Result<Recorded, String> {
    let b = base(version);
    let rec = Arc::new(RecordingDevice::from_mem(b.image.snapshot()));
    let dev: Arc<dyn BlockDevice> = rec.clone();
    let mut m = Mount::open(dev).map_err(|e| format!("open: {e}"))?;
    let mut model = b.model.clone();
    let initial = model.tree();
    let mut committed = Committed::full(&model);
    let mut groups = Groups::default();
    let mut commits: Vec<(usize, Tree)> = Vec::new();
    let mut now = crate::T0 + 1_000_000;
    for (i, st) in steps.iter().enumerate() {
        now += 1000;
        let before = model.clone();
        let want = model.apply(&st.op);
        if want.is_ok() {
            groups.note(&before, &model, &st.op);
        }
        let got = lib_apply(&mut m, &st.op, now);
        match (&want, &got) {
            (Ok(()), Err(e)) => return Err(format!("step {i} failed: {e}")),
            (Err(w), Ok(())) => return Err(format!("step {i} succeeded, expected: {w}")),
            _ => {}
        }
        let flushed = match st.persist {
            Persist::Nothing => None,
            Persist::Launder => {
                let before = rec.events().len();
                let r = m.launder_begin().and_then(|mut batch| {
                    batch.write();
                    m.launder_finish(batch)
                });
                r.map_err(|e| format!("step {i}: laundering: {e}"))?;
                let events = rec.events();
                if let Some((at, _)) = events.iter().enumerate().skip(before).find(
                    |(_, e)| matches!(e, Event::Write { offset, data } if is_header_write(*offset, data.len())),
                ) {
                    return Err(format!("step {i}: laundering wrote a volume header (event {at})"));
                }
                None
            }
            Persist::Sync => {
                committed = Committed::full(&model);
                groups = Groups::default();
                Some(m.flush())
            }
            Persist::Fsync | Persist::Fdatasync => {
                let path = fsync_target(&st.op);
                let target = match resolve(&mut m, path) {
                    Ok(i) => i,
                    Err(_) => ROOT_INUM,
                };
                let ids = groups.closure(model.id_of(path).unwrap_or(MROOT));
                committed.apply(&model, &ids);
                groups.committed(&ids);
                Some(m.fsync(LABEL, target))
            }
        };
        if let Some(r) = flushed {
            r.map_err(|e| format!("step {i}: flush: {e}"))?;
            let header = rec.events().iter().rposition(
                |e| matches!(e, Event::Write { offset, data } if is_header_write(*offset, data.len())),
            );
            let tree = committed.tree();
            match header {
                Some(h) if commits.last().is_none_or(|c| c.0 != h) => commits.push((h, tree)),
                _ => {
                    let last = commits.last().map_or(&initial, |c| &c.1);
                    if *last != tree {
                        return Err(format!(
                            "step {i}: a flush wrote no header, but the tree changed"
                        ));
                    }
                }
            }
        }
        // The library's tree in memory equals the model at every step.
        let t = lib_tree(&mut m).map_err(|e| format!("step {i}: reading the tree: {e}"))?;
        if t != model.tree() {
            return Err(format!(
                "step {i}: tree in memory: {}",
                tree_diff(&t, &model.tree())
            ));
        }
    }
    drop(m);
    Ok(Recorded {
        events: rec.events(),
        commits,
        initial,
        version,
    })
}

fn log_hash(r: &Recorded) -> u64 {
    let mut h = DefaultHasher::new();
    r.version.hash(&mut h);
    for e in &r.events {
        match e {
            Event::Write { offset, data } => {
                offset.hash(&mut h);
                data.hash(&mut h);
            }
            Event::Barrier => 1u8.hash(&mut h),
            Event::Mark(_) => {}
        }
    }
    for (p, t) in &r.commits {
        p.hash(&mut h);
        t.hash(&mut h);
    }
    h.finish()
}

/// Check every crash state of a recorded workload; returns the number
/// of states and the violations (as state, what).
pub fn check_recorded(
    r: &Recorded,
    cfg: &Config,
    rng: &mut SmallRng,
) -> (u64, Vec<(String, String)>) {
    let b = base(r.version);
    let mut bad = Vec::new();
    let mut n = 0u64;
    // Epochs: the writes between barriers.
    let mut epochs: Vec<Vec<usize>> = vec![Vec::new()];
    for (i, e) in r.events.iter().enumerate() {
        match e {
            Event::Write { .. } => epochs.last_mut().expect("epoch").push(i),
            Event::Barrier => epochs.push(Vec::new()),
            Event::Mark(_) => {}
        }
    }
    let write_of = |i: usize| -> (u64, &[u8]) {
        match &r.events[i] {
            Event::Write { offset, data } => (*offset, &data[..]),
            _ => unreachable!("index of a write"),
        }
    };
    // The tree committed by the last header write before log position `pos`.
    let durable = |pos: usize| -> &Tree {
        r.commits
            .iter()
            .rev()
            .find(|c| c.0 < pos)
            .map_or(&r.initial, |c| &c.1)
    };
    let mut whole: Vec<(u64, &[u8])> = Vec::new();
    let check = |label: String, st: State, n: &mut u64, bad: &mut Vec<(String, String)>| {
        *n += 1;
        if let Err(e) = check_state(&b.image, &st, cfg.probe_writes) {
            bad.push((label, e));
        }
    };
    for (ei, ep) in epochs.iter().enumerate() {
        let start = ep.first().copied().unwrap_or(0);
        let before = durable(start);
        let header = ep
            .iter()
            .copied()
            .find(|&i| r.commits.iter().any(|c| c.0 == i));
        let after = header.map(|h| {
            &r.commits
                .iter()
                .find(|c| c.0 == h)
                .expect("commit of header")
                .1
        });
        let expect = |mask: &[bool]| -> &Tree {
            match (header, after) {
                (Some(h), Some(t)) if ep.iter().zip(mask).any(|(&i, &on)| on && i == h) => t,
                _ => before,
            }
        };
        // Subsets: every prefix, then every subset or a sample.
        let k = ep.len();
        let mut masks: Vec<Vec<bool>> = Vec::new();
        let mut seen: HashSet<Vec<bool>> = HashSet::new();
        for p in 0..=k {
            let m: Vec<bool> = (0..k).map(|i| i < p).collect();
            if seen.insert(m.clone()) {
                masks.push(m);
            }
        }
        if k <= cfg.exhaustive_max {
            for bits in 0u64..(1u64 << k) {
                let m: Vec<bool> = (0..k).map(|i| bits >> i & 1 == 1).collect();
                if seen.insert(m.clone()) {
                    masks.push(m);
                }
            }
        } else {
            for _ in 0..cfg.subset_samples {
                let m: Vec<bool> = (0..k).map(|_| rng.gen_bool(0.5)).collect();
                if seen.insert(m.clone()) {
                    masks.push(m);
                }
            }
        }
        // The empty subset of a later epoch is the barrier prefix
        // already checked as the full subset of the one before.
        for m in &masks {
            if ei > 0 && m.iter().all(|b| !b) {
                continue;
            }
            let mut ws = whole.clone();
            ws.extend(
                ep.iter()
                    .zip(m)
                    .filter(|(_, on)| **on)
                    .map(|(&i, _)| write_of(i)),
            );
            let on: Vec<usize> = ep
                .iter()
                .zip(m)
                .filter(|(_, o)| **o)
                .map(|(&i, _)| i)
                .collect();
            let label = format!("epoch {ei}, writes {on:?} of {ep:?}");
            check(
                label,
                State {
                    whole: ws,
                    accept: vec![expect(m)],
                    torn_header: None,
                },
                &mut n,
                &mut bad,
            );
        }
        // Torn writes: a prefix of the epoch whole, then some sectors of
        // the next write.
        for (j, &wi) in ep.iter().enumerate() {
            let (off, data) = write_of(wi);
            let sectors = data.len().div_ceil(SECTOR);
            if sectors < 2 {
                continue;
            }
            let prefix: Vec<bool> = (0..k).map(|i| i < j).collect();
            let old = {
                let img = Overlay::new(b.image.clone());
                for &(o, d) in whole.iter() {
                    let _ = img.write_at(d, o);
                }
                for &i in &ep[..j] {
                    let (o, d) = write_of(i);
                    let _ = img.write_at(d, o);
                }
                let mut v = vec![0u8; data.len()];
                let _ = img.read_at(&mut v, off);
                v
            };
            let differing: Vec<usize> = (0..sectors)
                .filter(|&sct| {
                    let r = sct * SECTOR..((sct + 1) * SECTOR).min(data.len());
                    old[r.clone()] != data[r]
                })
                .collect();
            if differing.len() < 2 {
                continue;
            }
            for _ in 0..cfg.torn_samples {
                let pick: Vec<usize> = differing
                    .iter()
                    .copied()
                    .filter(|_| rng.gen_bool(0.5))
                    .collect();
                if pick.is_empty() || pick.len() == differing.len() {
                    continue;
                }
                let mut ws = whole.clone();
                ws.extend(ep[..j].iter().map(|&i| write_of(i)));
                for &sct in &pick {
                    let r = sct * SECTOR..((sct + 1) * SECTOR).min(data.len());
                    ws.push((off + r.start as u64, &data[r]));
                }
                let mut accept = vec![expect(&prefix)];
                if Some(wi) == header {
                    // The header copy is torn: its CRCs fail and the
                    // previous copy is used; accept the new state too in
                    // case the sectors torn were all alike.
                    accept.push(after.unwrap_or(before));
                }
                let label = format!(
                    "epoch {ei}, writes {:?} whole, write {wi} torn ({} of {} sectors{})",
                    &ep[..j],
                    pick.len(),
                    sectors,
                    if Some(wi) == header {
                        ", volume header"
                    } else {
                        ""
                    }
                );
                check(
                    label,
                    State {
                        whole: ws,
                        accept,
                        torn_header: (Some(wi) == header).then_some(off),
                    },
                    &mut n,
                    &mut bad,
                );
            }
        }
        whole.extend(ep.iter().map(|&i| write_of(i)));
    }
    (n, bad)
}

/// Run one workload and check its crash states into `stats`.
/// `seen` holds the logs already checked (identical logs are skipped).
pub fn run_workload(
    id: WorkloadId,
    steps: &[Step],
    cfg: &Config,
    stats: &mut Stats,
    seen: &mut HashSet<u64>,
) {
    stats.workloads += 1;
    let version = match id {
        WorkloadId::One(i) => 1 + (i / PERSISTS.len()) as u32 % 2,
        WorkloadId::Sampled { seed, .. } => 1 + (seed % 2) as u32,
    };
    let desc = describe(steps);
    let violation = |state: &str, what: String| Violation {
        workload: id,
        steps: desc.clone(),
        state: state.to_string(),
        what,
    };
    let rec = match catch_unwind(AssertUnwindSafe(|| record(steps, version))) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            stats.violations.push(violation("(running)", e));
            return;
        }
        Err(p) => {
            stats
                .violations
                .push(violation("(running)", format!("panic: {}", panic_text(p))));
            return;
        }
    };
    if !seen.insert(log_hash(&rec)) {
        stats.duplicates += 1;
        return;
    }
    let seed = match id {
        WorkloadId::One(i) => i as u64,
        WorkloadId::Sampled { seed, .. } => seed,
    };
    let mut rng = SmallRng::seed_from_u64(seed ^ 0xace);
    let (n, bad) = check_recorded(&rec, cfg, &mut rng);
    stats.states += n;
    for (state, what) in bad {
        stats.violations.push(violation(&state, what));
    }
}

/// The workloads of a run: every one-operation workload for `ops == 1`,
/// else `sample` sampled workloads of `ops` operations from `seed`.
pub fn plan(ops: usize, sample: u64, seed: u64) -> Vec<WorkloadId> {
    if ops <= 1 {
        (0..one_op_workloads().len()).map(WorkloadId::One).collect()
    } else {
        (0..sample)
            .map(|i| WorkloadId::Sampled {
                ops,
                seed: sample_seed(seed, i),
            })
            .collect()
    }
}

/// Run the workloads `ids`, calling `progress` after each.
pub fn run_plan(
    ids: &[WorkloadId],
    cfg: &Config,
    stats: &mut Stats,
    seen: &mut HashSet<u64>,
    progress: &mut dyn FnMut(&Stats),
) {
    for id in ids {
        match id.steps() {
            Some(steps) => run_workload(*id, &steps, cfg, stats, seen),
            None => stats.violations.push(Violation {
                workload: *id,
                steps: s("?"),
                state: s("-"),
                what: s("no such workload"),
            }),
        }
        progress(stats);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The oracle tells a committed state from one that is not: the
    /// image after a flush matches the flushed tree and not the tree
    /// before, and the image before it the other way round.
    #[test]
    fn oracle_tells_states_apart() {
        let steps = vec![Step {
            op: Op::Rename(s("A"), s("E/A")),
            persist: Persist::Sync,
        }];
        let r = record(&steps, 2).unwrap();
        let b = base(2);
        let all: Vec<(u64, &[u8])> = r
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Write { offset, data } => Some((*offset, &data[..])),
                _ => None,
            })
            .collect();
        let after = &r.commits.last().unwrap().1;
        assert!(after.contains_key("E/A/bar") && !after.contains_key("A"));
        check_image(&b.image, &all, &[after], None, true).unwrap();
        assert!(check_image(&b.image, &all, &[&r.initial], None, false).is_err());
        check_image(&b.image, &[], &[&r.initial], None, false).unwrap();
        assert!(check_image(&b.image, &[], &[after], None, false).is_err());
        // A lost metadata write with the header landed is caught.
        let header = all.len() - 1;
        let broken: Vec<(u64, &[u8])> = all[1..].to_vec();
        assert!(is_header_write(all[header].0, all[header].1.len()));
        assert!(check_image(&b.image, &broken, &[after], None, false).is_err());
    }

    #[test]
    fn model_moves_subtrees_and_counts_links() {
        let mut m = base(1).model.clone();
        m.apply(&Op::Link(s("A/bar"), s("B/bar2"))).unwrap();
        m.apply(&Op::Rename(s("A"), s("E/A"))).unwrap();
        assert_eq!(m.apply(&Op::Rmdir(s("E"))), Err("not empty"));
        let t = m.tree();
        assert_eq!(t["E/A/bar"].nlink, 2);
        assert_eq!(t["E/A/bar"].group, "B/bar2");
        assert!(t.contains_key("E/A/C") && !t.contains_key("A/C"));
        m.apply(&Op::Unlink(s("B/bar2"))).unwrap();
        assert_eq!(m.tree()["E/A/bar"].nlink, 1);
    }
}
