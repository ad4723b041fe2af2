//! Namespace changes side by side, without FUSE: threads create, link,
//! unlink and rename files under names of their own in directories they
//! all share, each first with the mount shared (`Mount::create_shared`,
//! `link_shared`, `unlink_shared`, `rename_shared`, under the inodes'
//! own locks in ascending number order) and, where the library declines,
//! with the mount exclusive, as the mount's requests run; they also
//! write into their files and read them back. Beside them a thread lists
//! and stats the directories, and the flusher commits every few
//! milliseconds while another thread syncs and fsyncs.
//!
//! The directories are made so that some files' inode numbers are below
//! theirs and some above, so the lock order of an operation sometimes
//! differs from the order its names lead to (an unlink locks a low file
//! before its directory; a rename between two directories locks them
//! before a new file and after an old one). A watchdog fails the test
//! when no operation has finished for 60 seconds: a lock-order deadlock
//! stops everything.
//!
//! Each thread keeps the exact model of its names (which inode each
//! names: no other thread touches them), so at the end every directory
//! holds exactly the models' names, each pointing at its inode, every
//! inode's link count is the number of names the models give it, and
//! every file holds the bytes written to it; after a clean unmount and a
//! remount (read from disk) too, and fsck finds nothing. The shared
//! versions must have carried most operations (counted).
//! `H2_NAMES_SECONDS` sets the run time (default 10).

mod common;
use common::{run_seconds, Rng};

use bufcache::{BlockDevice, BufCache, CachedDevice, MemDevice};
use fuse_mount::rw::RwVolume;
use hammer2::disk::ObjType;
use hammer2::mount::{Mount, RenameFlags, ROOT_INUM};
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LABEL: &str = "DATA";
const WORKERS: usize = 4;
/// Names per worker, in each directory.
const NAMES: usize = 6;
/// Directories made before the first files (their numbers below every
/// file's) and after them.
const DIRS_BEFORE: usize = 2;
const DIRS_AFTER: usize = 2;
const STALL: Duration = Duration::from_secs(60);

/// A worker's names, (directory, name) to inode number, and what its
/// files hold, by inode number.
#[derive(Default)]
struct Model {
    names: BTreeMap<(u64, Vec<u8>), u64>,
    contents: BTreeMap<u64, Vec<u8>>,
}

impl Model {
    /// Forget inode `inum`'s bytes once no name is left to it.
    fn drop_if_unnamed(&mut self, inum: u64) {
        if !self.names.values().any(|&i| i == inum) {
            self.contents.remove(&inum);
        }
    }
}

struct Shared {
    v: Arc<RwVolume>,
    dirs: Vec<u64>,
    stop: AtomicBool,
    failures: Mutex<Vec<String>>,
    /// Operations finished (the watchdog's sign of life).
    done: AtomicU64,
    /// Namespace operations made with the mount shared, and exclusive.
    shared: AtomicU64,
    exclusive: AtomicU64,
    now: AtomicU64,
    models: Vec<Arc<Mutex<Model>>>,
}

impl Shared {
    fn fail(&self, what: String) {
        eprintln!("failure: {what}");
        self.failures.lock().unwrap().push(what);
        self.stop.store(true, Ordering::SeqCst);
    }

    fn now(&self) -> u64 {
        self.now.fetch_add(1, Ordering::Relaxed)
    }

    /// `shared` with the mount shared; when it declines, `exclusive`
    /// with the mount locked (room made once for lack of space).
    fn run<T>(
        &self,
        shared: impl FnOnce(&Mount) -> Option<Result<T, Infallible>>,
        mut exclusive: impl FnMut(&mut Mount) -> hammer2::Result<T>,
    ) -> hammer2::Result<T> {
        let mut out = None;
        self.v.shared_change(|m| {
            out = shared(m);
            out.is_some()
        });
        if let Some(Ok(v)) = out {
            self.shared.fetch_add(1, Ordering::Relaxed);
            return Ok(v);
        }
        self.exclusive.fetch_add(1, Ordering::Relaxed);
        let r = self.v.locked(&mut exclusive);
        if matches!(r, Err(hammer2::Error::NoSpace { .. })) && self.v.make_room() {
            return self.v.locked(&mut exclusive);
        }
        r
    }
}

fn ok2<A, B>(_: &A, _: &B) -> Result<(), Infallible> {
    Ok(())
}

fn worker(t: usize, sh: Arc<Shared>) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((t as u64 + 1) * 0x1234_5678_9abc_def1));
    let own: Vec<Vec<u8>> = (0..NAMES)
        .map(|k| format!("w{t}n{k}").into_bytes())
        .collect();
    while !sh.stop.load(Ordering::SeqCst) {
        let mut model = sh.models[t].lock().unwrap();
        let dir = sh.dirs[rng.pick(sh.dirs.len())];
        let name = own[rng.pick(NAMES)].clone();
        let present = model.names.get(&(dir, name.clone())).copied();
        let now = sh.now();
        let existing: Vec<((u64, Vec<u8>), u64)> =
            model.names.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let r: Result<(), String> = match (rng.pick(10), present) {
            // Create where the name is free.
            (0..=2, None) => sh
                .run(
                    |m| {
                        m.create_shared(LABEL, dir, &name, ObjType::Regfile, (0, 0), now, |_| {
                            Ok((0o644, 0, 0))
                        })
                    },
                    |m| {
                        m.create(
                            LABEL,
                            dir,
                            &name,
                            ObjType::Regfile,
                            0o644,
                            0,
                            0,
                            (0, 0),
                            now,
                        )
                    },
                )
                .map(|inum| {
                    model.names.insert((dir, name.clone()), inum);
                    model.contents.insert(inum, Vec::new());
                })
                .map_err(|e| format!("create {dir}/{}: {e}", show(&name))),
            // Unlink.
            (0..=2, Some(inum)) => sh
                .run(
                    |m| m.unlink_shared(LABEL, dir, &name, now, ok2),
                    |m| m.unlink(LABEL, dir, &name, now),
                )
                .map(|()| {
                    model.names.remove(&(dir, name.clone()));
                    model.drop_if_unnamed(inum);
                })
                .map_err(|e| format!("unlink {dir}/{}: {e}", show(&name))),
            // Link an existing file of this worker's under the free name.
            (3..=4, None) if !existing.is_empty() => {
                let inum = existing[rng.pick(existing.len())].1;
                sh.run(
                    |m| m.link_shared(LABEL, inum, dir, &name, now, ok2),
                    |m| m.link(LABEL, inum, dir, &name, now),
                )
                .map(|()| {
                    model.names.insert((dir, name.clone()), inum);
                })
                .map_err(|e| format!("link {inum} as {dir}/{}: {e}", show(&name)))
            }
            // Rename one of this worker's names to this one, replacing
            // what it names.
            (3..=6, _) if !existing.is_empty() => {
                let ((odir, oname), src) = existing[rng.pick(existing.len())].clone();
                if (odir, &oname) == (dir, &name) {
                    Ok(())
                } else {
                    sh.run(
                        |m| {
                            m.rename_shared(
                                LABEL,
                                odir,
                                &oname,
                                dir,
                                &name,
                                false,
                                now,
                                |_, _, _, _| Ok(()),
                            )
                        },
                        |m| m.rename(LABEL, odir, &oname, dir, &name, RenameFlags::default(), now),
                    )
                    .map(|()| {
                        let replaced = model.names.insert((dir, name.clone()), src);
                        if replaced != Some(src) {
                            model.names.remove(&(odir, oname.clone()));
                        }
                        if let Some(r) = replaced.filter(|&r| r != src) {
                            model.drop_if_unnamed(r);
                        }
                    })
                    .map_err(|e| {
                        format!(
                            "rename {odir}/{} to {dir}/{}: {e}",
                            show(&oname),
                            show(&name)
                        )
                    })
                }
            }
            // Write at the end of one of this worker's files, and read it
            // back whole.
            (7..=9, _) if !existing.is_empty() => {
                let inum = existing[rng.pick(existing.len())].1;
                let piece = format!("{inum}:{};", rng.next()).into_bytes();
                let data = model.contents.entry(inum).or_default();
                let off = data.len() as u64;
                let written = sh.v.shared_change(|m| {
                    let mut filled = hammer2::inode::Filled::default();
                    let r = m.write_shared(LABEL, inum, off, &piece, now, &mut filled, |_| true);
                    matches!(r, Some(Ok(())))
                });
                let r = match written {
                    true => Ok(()),
                    false => sh.v.locked(|m| m.write(LABEL, inum, off, &piece, now)),
                };
                data.extend_from_slice(&piece);
                let want = data.clone();
                match (r, sh.v.read(inum, 0, want.len() + 16)) {
                    (Err(e), _) => Err(format!("write to inode {inum}: {e}")),
                    (_, Err(e)) => Err(format!("read of inode {inum}: errno {e}")),
                    (_, Ok(got)) if got != want => Err(format!(
                        "inode {inum} reads {} bytes, not the {} written",
                        got.len(),
                        want.len()
                    )),
                    _ => Ok(()),
                }
            }
            _ => Ok(()),
        };
        drop(model);
        if let Err(e) = r {
            sh.fail(format!("worker {t}: {e}"));
            return;
        }
        sh.done.fetch_add(1, Ordering::Relaxed);
    }
}

fn show(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// Lists and stats the directories beside the changes.
fn lister(sh: Arc<Shared>) {
    while !sh.stop.load(Ordering::SeqCst) {
        for &d in &sh.dirs {
            let listed = sh.v.shared(|m| m.readdir_loaded(LABEL, d, 0));
            if let Some(Err(e)) = listed {
                sh.fail(format!("listing of directory {d}: {e}"));
                return;
            }
            for e in listed.and_then(Result::ok).unwrap_or_default() {
                // An entry listed may be gone by now; one found must be
                // a file with links.
                if let Some(Ok(m)) = sh.v.shared(|m| m.getattr_loaded(LABEL, e.inum)) {
                    if m.obj_type != ObjType::Regfile {
                        sh.fail(format!(
                            "entry {} of {d} is a {:?}",
                            show(&e.name),
                            m.obj_type
                        ));
                        return;
                    }
                }
            }
        }
        sh.done.fetch_add(1, Ordering::Relaxed);
    }
}

/// Syncs and fsyncs beside the changes (the flusher commits too).
fn syncer(sh: Arc<Shared>) {
    let mut rng = Rng(5);
    while !sh.stop.load(Ordering::SeqCst) {
        let model = sh.models[rng.pick(WORKERS)].lock().unwrap();
        let inums: Vec<u64> = model.contents.keys().copied().collect();
        // Under the worker's model lock, so none of them goes meanwhile.
        let r = if rng.pick(4) == 0 || inums.is_empty() {
            sh.v.sync().map_err(|e| format!("sync: errno {e}"))
        } else {
            let inum = inums[rng.pick(inums.len())];
            sh.v.fsync(inum)
                .map_err(|e| format!("fsync of {inum}: errno {e}"))
        };
        drop(model);
        if let Err(e) = r {
            sh.fail(e);
            return;
        }
        sh.done.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(3));
    }
}

fn open(dev: &Arc<MemDevice>) -> Arc<RwVolume> {
    let base: Arc<dyn BlockDevice> = dev.clone();
    let cache = BufCache::open(base, 64 << 20).unwrap();
    let cached = Arc::new(CachedDevice::new(cache));
    let v = Arc::new(RwVolume::new(
        Mount::open(cached).unwrap(),
        LABEL.into(),
        None,
        Some(Duration::from_millis(20)),
    ));
    v.start_flusher().unwrap();
    v
}

/// The volume holds exactly what the models say.
fn check(v: &RwVolume, dirs: &[u64], models: &[Arc<Mutex<Model>>], when: &str) {
    let mut want: BTreeMap<(u64, Vec<u8>), u64> = BTreeMap::new();
    let mut contents: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for m in models {
        let m = m.lock().unwrap();
        want.extend(m.names.iter().map(|(k, v)| (k.clone(), *v)));
        contents.extend(m.contents.iter().map(|(k, v)| (*k, v.clone())));
    }
    let mut got = BTreeMap::new();
    for &d in dirs {
        for e in v.locked(|m| m.readdir(LABEL, d, 0)).unwrap() {
            got.insert((d, e.name), e.inum);
        }
    }
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{when}: names missing {missing:?}, names not in the models {extra:?}"
    );
    for (k, inum) in &want {
        assert_eq!(
            got[k], *inum,
            "{when}: {k:?} names inode {}, the model {inum}",
            got[k]
        );
    }
    let inodes: BTreeSet<u64> = want.values().copied().collect();
    assert_eq!(
        inodes,
        contents.keys().copied().collect(),
        "{when}: the models' inodes"
    );
    for inum in &inodes {
        let names = want.values().filter(|&&i| i == *inum).count() as u64;
        let meta = v.locked(|m| m.getattr(LABEL, *inum)).unwrap();
        assert_eq!(meta.nlinks, names, "{when}: inode {inum}'s link count");
        let bytes = v.read(*inum, 0, 1 << 20).unwrap();
        assert_eq!(
            Some(&bytes),
            contents.get(inum),
            "{when}: inode {inum}'s bytes"
        );
    }
}

#[test]
fn creates_links_unlinks_and_renames_side_by_side() {
    let _ = env_logger::builder().is_test(true).try_init();
    let dev = Arc::new(MemDevice::new(1 << 30));
    mkfs::newfs::newfs(dev.as_ref(), &mkfs::newfs::NewfsOptions::default()).unwrap();
    let v = open(&dev);
    let mkdir = |i: usize| {
        let name = format!("d{i}").into_bytes();
        v.locked(|m| m.mkdir(LABEL, ROOT_INUM, &name, 0o755, 0, 0, 1))
            .unwrap()
    };
    let mut dirs: Vec<u64> = (0..DIRS_BEFORE).map(mkdir).collect();
    // A file per worker and name in the first directory, numbered
    // between the directories made before and after.
    let models: Vec<Arc<Mutex<Model>>> = (0..WORKERS)
        .map(|t| {
            let mut model = Model::default();
            for k in 0..NAMES {
                let name = format!("w{t}n{k}").into_bytes();
                let inum = v
                    .locked(|m| {
                        m.create(
                            LABEL,
                            dirs[0],
                            &name,
                            ObjType::Regfile,
                            0o644,
                            0,
                            0,
                            (0, 0),
                            1,
                        )
                    })
                    .unwrap();
                model.names.insert((dirs[0], name), inum);
                model.contents.insert(inum, Vec::new());
            }
            Arc::new(Mutex::new(model))
        })
        .collect();
    dirs.extend((DIRS_BEFORE..DIRS_BEFORE + DIRS_AFTER).map(mkdir));
    v.sync().unwrap();
    let sh = Arc::new(Shared {
        v,
        dirs: dirs.clone(),
        stop: AtomicBool::new(false),
        failures: Mutex::new(Vec::new()),
        done: AtomicU64::new(0),
        shared: AtomicU64::new(0),
        exclusive: AtomicU64::new(0),
        now: AtomicU64::new(2),
        models: models.clone(),
    });
    let mut threads = Vec::new();
    for t in 0..WORKERS {
        let sh = sh.clone();
        threads.push(std::thread::spawn(move || worker(t, sh)));
    }
    let s = sh.clone();
    threads.push(std::thread::spawn(move || lister(s)));
    let s = sh.clone();
    threads.push(std::thread::spawn(move || syncer(s)));
    let until = Instant::now() + run_seconds("H2_NAMES_SECONDS", 10);
    let (mut last, mut moved) = (0, Instant::now());
    while Instant::now() < until && !sh.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        let done = sh.done.load(Ordering::Relaxed);
        if done != last {
            (last, moved) = (done, Instant::now());
        } else if moved.elapsed() > STALL {
            // The threads are stuck: fail without waiting for them.
            panic!("no operation finished for {STALL:?} after {done}: a deadlock");
        }
    }
    sh.stop.store(true, Ordering::SeqCst);
    // The threads finish the operation under way; one that cannot is
    // stuck.
    let stopped = Instant::now();
    while !threads.iter().all(|t| t.is_finished()) {
        assert!(
            stopped.elapsed() < STALL,
            "threads still running {STALL:?} after the stop: a deadlock"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for t in threads {
        t.join().unwrap();
    }
    let failures = sh.failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "{failures:#?}");
    let (shared, exclusive) = (
        sh.shared.load(Ordering::Relaxed),
        sh.exclusive.load(Ordering::Relaxed),
    );
    eprintln!(
        "{} operations; namespace changes: {shared} with the mount shared, {exclusive} exclusive",
        sh.done.load(Ordering::Relaxed)
    );
    assert!(shared > 1000, "{shared} namespace changes ran shared");
    assert!(
        shared > exclusive * 3,
        "{shared} shared against {exclusive} exclusive"
    );
    check(&sh.v, &dirs, &models, "before the unmount");
    sh.v.shutdown().unwrap();
    drop(sh);
    let v = open(&dev);
    check(&v, &dirs, &models, "after a remount");
    v.shutdown().unwrap();
    drop(v);
    let report = hammer2::fsck::fsck(dev.clone(), hammer2::fsck::Options::default()).unwrap();
    assert!(report.problems.is_empty(), "fsck: {:#?}", report.problems);
}
