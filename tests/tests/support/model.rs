// The reference model shared by the model and crash tests: inodes by
// the library's inode number, directories as name -> inode maps, and the
// random workload both tests drive.

use hammer2::disk::ObjType;
use hammer2::mount::{Mount, RenameFlags, SetAttr, ROOT_INUM};
use hammer2::Error;
use rand::rngs::SmallRng;
use rand::Rng;
use std::collections::{BTreeMap, HashMap};

pub const PFS: &str = "DATA";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    File(Vec<u8>),
    /// A fifo, socket or device node, with its rdev.
    Special(ObjType, (u32, u32)),
    Dir(BTreeMap<Vec<u8>, u64>),
    Symlink(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MNode {
    pub kind: Kind,
    pub nlinks: u64,
    pub mode: u32,
}

/// The reference model: inodes by the library's inode number.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    pub nodes: HashMap<u64, MNode>,
}

impl Model {
    pub fn new() -> Model {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT_INUM,
            MNode {
                kind: Kind::Dir(BTreeMap::new()),
                nlinks: 1,
                mode: 0o755,
            },
        );
        Model { nodes }
    }
    pub fn dirs(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| matches!(n.kind, Kind::Dir(_)))
            .map(|(k, _)| *k)
            .collect();
        v.sort_unstable();
        v
    }
    pub fn entries(&self, dir: u64) -> Vec<(Vec<u8>, u64)> {
        match &self.nodes[&dir].kind {
            Kind::Dir(m) => m.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            _ => Vec::new(),
        }
    }
    pub fn dir_mut(&mut self, dir: u64) -> &mut BTreeMap<Vec<u8>, u64> {
        match &mut self.nodes.get_mut(&dir).expect("dir").kind {
            Kind::Dir(m) => m,
            _ => panic!("not a dir"),
        }
    }
    pub fn unref(&mut self, inum: u64) {
        let n = self.nodes.get_mut(&inum).expect("node");
        n.nlinks -= 1;
        if n.nlinks == 0 || matches!(n.kind, Kind::Dir(_)) {
            self.nodes.remove(&inum);
        }
    }
    pub fn is_ancestor(&self, anc: u64, dir: u64) -> bool {
        if anc == dir {
            return true;
        }
        // Walk down from anc looking for dir.
        let mut stack = vec![anc];
        while let Some(d) = stack.pop() {
            for (_, c) in self.entries(d) {
                if c == dir {
                    return true;
                }
                if matches!(self.nodes[&c].kind, Kind::Dir(_)) {
                    stack.push(c);
                }
            }
        }
        false
    }
}

pub fn name(rng: &mut SmallRng) -> Vec<u8> {
    match rng.gen_range(0..10) {
        0 => vec![b'L'; rng.gen_range(65..=255)],
        1 => format!(
            "n{}.x-y_z~{}",
            rng.gen_range(0..20),
            "q".repeat(rng.gen_range(0..60))
        )
        .into_bytes(),
        _ => format!("f{}", rng.gen_range(0..40)).into_bytes(),
    }
}

pub fn data(rng: &mut SmallRng, len: usize) -> Vec<u8> {
    match rng.gen_range(0..4) {
        0 => vec![0u8; len],
        1 => (0..len).map(|i| b"hammer2 text "[i % 13]).collect(),
        _ => (0..len).map(|_| rng.gen()).collect(),
    }
}

/// Compare the whole tree the library shows with the model.
#[allow(dead_code)]
pub fn compare(m: &mut Mount, model: &Model, ctx: &str) {
    compare_in(m, PFS, model, ctx)
}

/// Compare the tree of PFS `label` with the model.
pub fn compare_in(m: &mut Mount, label: &str, model: &Model, ctx: &str) {
    let mut stack = vec![ROOT_INUM];
    let mut seen = 0;
    while let Some(dir) = stack.pop() {
        let got: Vec<(Vec<u8>, u64)> = m
            .readdir(label, dir, 0)
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.inum))
            .collect();
        let mut got_sorted = got.clone();
        got_sorted.sort();
        assert_eq!(got_sorted, model.entries(dir), "{ctx}: entries of {dir}");
        for (_, inum) in got {
            seen += 1;
            let meta = m.getattr(label, inum).unwrap();
            let want = &model.nodes[&inum];
            assert_eq!(meta.mode, want.mode, "{ctx}: mode of {inum}");
            match &want.kind {
                Kind::File(d) => {
                    assert_eq!(meta.obj_type, ObjType::Regfile);
                    assert_eq!(meta.nlinks, want.nlinks, "{ctx}: nlinks of {inum}");
                    assert_eq!(meta.size, d.len() as u64, "{ctx}: size of {inum}");
                    let got = m.read(label, inum, 0, d.len() + 10).unwrap();
                    assert!(got == *d, "{ctx}: content of {inum} ({} bytes)", d.len());
                }
                Kind::Symlink(t) => assert_eq!(&m.readlink(label, inum).unwrap(), t, "{ctx}"),
                Kind::Special(t, rdev) => {
                    assert_eq!(meta.obj_type, *t, "{ctx}: type of {inum}");
                    assert_eq!((meta.rmajor, meta.rminor), *rdev, "{ctx}: rdev of {inum}");
                    assert_eq!(meta.nlinks, want.nlinks, "{ctx}: nlinks of {inum}");
                }
                Kind::Dir(_) => {
                    assert_eq!(meta.obj_type, ObjType::Directory);
                    stack.push(inum);
                }
            }
        }
    }
    let _ = seen;
}


/// Apply one random operation to the library and to the model, checking
/// that both agree on its outcome.
#[allow(clippy::map_entry, dead_code)]
pub fn step(m: &mut Mount, model: &mut Model, rng: &mut SmallRng, now: u64, ctx: &str) {
    step_in(m, PFS, model, rng, now, ctx)
}

/// `step` on PFS `label`.
#[allow(clippy::map_entry)]
pub fn step_in(
    m: &mut Mount,
    label: &str,
    model: &mut Model,
    rng: &mut SmallRng,
    now: u64,
    ctx: &str,
) {
    let rng = &mut *rng;
        let dirs = model.dirs();
        let dir = dirs[rng.gen_range(0..dirs.len())];
        let entries = model.entries(dir);
        let pick = if entries.is_empty() {
            None
        } else {
            Some(entries[rng.gen_range(0..entries.len())].clone())
        };
        match rng.gen_range(0..90) {
            0..=19 => {
                let n = name(rng);
                let mode = [0o644, 0o600, 0o4755][rng.gen_range(0..3)];
                let (t, rdev) = match rng.gen_range(0..10) {
                    0 => (ObjType::Fifo, (0, 0)),
                    1 => (ObjType::Cdev, (rng.gen_range(0..300), rng.gen_range(0..300))),
                    2 => (ObjType::Bdev, (8, rng.gen_range(0..64))),
                    3 => (ObjType::Socket, (0, 0)),
                    _ => (ObjType::Regfile, (0, 0)),
                };
                let r = m.create(label, dir, &n, t, mode, 0, 0, rdev, now);
                if model.dir_mut(dir).contains_key(&n) {
                    assert!(matches!(r, Err(Error::Exists { .. })), "{ctx}: {r:?}");
                } else {
                    let inum = r.unwrap();
                    model.dir_mut(dir).insert(n, inum);
                    model.nodes.insert(
                        inum,
                        MNode {
                            kind: if t == ObjType::Regfile { Kind::File(Vec::new()) } else { Kind::Special(t, rdev) },
                            nlinks: 1,
                            mode,
                        },
                    );
                }
            }
            20..=26 => {
                let n = name(rng);
                let r = m.mkdir(label, dir, &n, 0o755, 0, 0, now);
                if model.dir_mut(dir).contains_key(&n) {
                    assert!(r.is_err(), "{ctx}");
                } else {
                    let inum = r.unwrap();
                    model.dir_mut(dir).insert(n, inum);
                    model.nodes.insert(
                        inum,
                        MNode {
                            kind: Kind::Dir(BTreeMap::new()),
                            nlinks: 1,
                            mode: 0o755,
                        },
                    );
                }
            }
            27..=29 => {
                let n = name(rng);
                let target = vec![b't'; rng.gen_range(1..700)];
                let r = m.symlink(label, dir, &n, &target, 0, 0, now);
                if model.dir_mut(dir).contains_key(&n) {
                    assert!(r.is_err(), "{ctx}");
                } else {
                    let inum = r.unwrap();
                    model.dir_mut(dir).insert(n, inum);
                    model.nodes.insert(
                        inum,
                        MNode {
                            kind: Kind::Symlink(target),
                            nlinks: 1,
                            mode: 0o777,
                        },
                    );
                }
            }
            30..=54 => {
                if let Some((_, inum)) = pick {
                    if let Kind::File(d) = &mut model.nodes.get_mut(&inum).unwrap().kind {
                        let max_off = [600u64, 70_000, 300_000, 3_000_000][rng.gen_range(0..4)];
                        let off = rng.gen_range(0..max_off);
                        let len = [1usize, 100, 513, 4096, 65536, 200_000][rng.gen_range(0..6)];
                        let buf = data(rng, len);
                        m.write(label, inum, off, &buf, now).unwrap();
                        let end = off as usize + len;
                        if d.len() < end {
                            d.resize(end, 0);
                        }
                        d[off as usize..end].copy_from_slice(&buf);
                    }
                }
            }
            55..=62 => {
                if let Some((_, inum)) = pick {
                    if let Kind::File(d) = &mut model.nodes.get_mut(&inum).unwrap().kind {
                        let size = [0u64, 1, 512, 513, 65535, 65537, 200_000, 1_000_000]
                            [rng.gen_range(0..8)];
                        m.setattr(
                            label,
                            inum,
                            SetAttr {
                                size: Some(size),
                                ..Default::default()
                            },
                            now,
                        )
                        .unwrap();
                        d.resize(size as usize, 0);
                    }
                }
            }
            63..=67 => {
                if let Some((_, inum)) = pick {
                    let to = dirs[rng.gen_range(0..dirs.len())];
                    let n = name(rng);
                    let is_dir = matches!(model.nodes[&inum].kind, Kind::Dir(_));
                    let r = m.link(label, inum, to, &n, now);
                    if is_dir || model.dir_mut(to).contains_key(&n) {
                        assert!(r.is_err(), "{ctx}");
                    } else {
                        r.unwrap();
                        model.dir_mut(to).insert(n, inum);
                        model.nodes.get_mut(&inum).unwrap().nlinks += 1;
                    }
                }
            }
            68..=79 => {
                if let Some((n, inum)) = pick {
                    let is_dir = matches!(model.nodes[&inum].kind, Kind::Dir(_));
                    if is_dir {
                        let r = m.rmdir(label, dir, &n, now);
                        if model.entries(inum).is_empty() {
                            r.unwrap();
                            model.dir_mut(dir).remove(&n);
                            model.unref(inum);
                        } else {
                            assert!(matches!(r, Err(Error::NotEmpty { .. })), "{ctx}: {r:?}");
                        }
                    } else {
                        m.unlink(label, dir, &n, now).unwrap();
                        model.dir_mut(dir).remove(&n);
                        model.unref(inum);
                    }
                }
            }
            80..=89 => {
                if let Some((n, inum)) = pick {
                    let to = dirs[rng.gen_range(0..dirs.len())];
                    let nn = if rng.gen_bool(0.3) {
                        model
                            .entries(to)
                            .first()
                            .map(|e| e.0.clone())
                            .unwrap_or_else(|| name(rng))
                    } else {
                        name(rng)
                    };
                    let flags = RenameFlags {
                        noreplace: rng.gen_bool(0.2),
                        exchange: rng.gen_bool(0.15),
                    };
                    let r = m.rename(label, dir, &n, to, &nn, flags, now);
                    let src_dir = matches!(model.nodes[&inum].kind, Kind::Dir(_));
                    let dst = model.dir_mut(to).get(&nn).copied();
                    let expect_ok = if flags.exchange && flags.noreplace {
                        false
                    } else if flags.exchange && dst == Some(inum) {
                        true
                    } else if src_dir && model.is_ancestor(inum, to) {
                        false
                    } else if flags.exchange {
                        match dst {
                            None => false,
                            Some(d) => {
                                !(matches!(model.nodes[&d].kind, Kind::Dir(_))
                                    && model.is_ancestor(d, dir))
                            }
                        }
                    } else {
                        match dst {
                            None => true,
                            Some(d) if d == inum => true,
                            Some(_) if flags.noreplace => false,
                            Some(d) => match (&model.nodes[&inum].kind, &model.nodes[&d].kind) {
                                (Kind::Dir(_), Kind::Dir(c)) => c.is_empty(),
                                (Kind::Dir(_), _) | (_, Kind::Dir(_)) => false,
                                _ => true,
                            },
                        }
                    };
                    assert_eq!(
                        r.is_ok(),
                        expect_ok,
                        "{ctx}: rename {:?} -> {:?} {flags:?}: {r:?}",
                        String::from_utf8_lossy(&n),
                        String::from_utf8_lossy(&nn)
                    );
                    if expect_ok {
                        if flags.exchange && dst == Some(inum) {
                        } else if flags.exchange {
                            let d = dst.unwrap();
                            model.dir_mut(dir).insert(n, d);
                            model.dir_mut(to).insert(nn, inum);
                        } else if dst != Some(inum) {
                            model.dir_mut(dir).remove(&n);
                            if let Some(d) = model.dir_mut(to).insert(nn, inum) {
                                model.unref(d);
                            }
                        }
                    }
                }
            }
            _ => unreachable!(),
        }
}
