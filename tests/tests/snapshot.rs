//! Snapshots and PFS administration against the reference model: a
//! snapshot shows exactly the model state at snapshot time while its
//! origin goes on changing (flushes, pipelined flushes, remounts);
//! writes into a snapshot leave the origin unchanged; the snapshot root
//! carries DragonFly's fields; PFSs are created and deleted; fsck is
//! clean after every step. `snapshot_timing` prints the time a snapshot
//! takes on a small and on a 20,000-file PFS (`-- --nocapture`).
//! `H2_SNAP_SEED=S` replays one seed.

use bufcache::{BlockDevice, MemDevice};
use hammer2::dirhash::dirhash;
use hammer2::disk::{pfs_subtype, pfs_type, ObjType, Uuid};
use hammer2::fsck::{fsck, Options};
use hammer2::mount::{Mount, ROOT_INUM};
use hammer2::pfs::pfs_list;
use hammer2::pfsops::PfsIds;
use hammer2::Error;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Instant;

mod model {
    include!("support/model.rs");
}
use model::*;
use tests::{create_file, new_fs, open, T0};

fn fsck_clean(dev: &Arc<MemDevice>, ctx: &str) {
    let d: Arc<dyn BlockDevice> = dev.clone();
    let report = fsck(d, Options::default()).unwrap();
    let msgs: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
    assert!(msgs.is_empty(), "{ctx}: fsck: {}", msgs.join("\n"));
}

fn ids(n: u8) -> PfsIds {
    PfsIds {
        clid: Uuid::from_random([n; 16]),
        fsid: Uuid::from_random([n.wrapping_add(100); 16]),
    }
}

fn seeds(default: u64) -> Vec<u64> {
    match std::env::var("H2_SNAP_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(s) => vec![s],
        None => (1..=default).collect(),
    }
}

/// `n` random operations on PFS `label`, with flushes now and then.
#[allow(clippy::too_many_arguments)]
fn churn(
    m: &mut Mount,
    label: &str,
    model: &mut Model,
    rng: &mut SmallRng,
    now: &mut u64,
    n: usize,
    ctx: &str,
) {
    churn_flushed(m, label, model, rng, now, n, ctx, &mut None)
}

/// `churn`, keeping in `flushed` the model state of the last flush.
#[allow(clippy::too_many_arguments)]
fn churn_flushed(
    m: &mut Mount,
    label: &str,
    model: &mut Model,
    rng: &mut SmallRng,
    now: &mut u64,
    n: usize,
    ctx: &str,
    flushed: &mut Option<Model>,
) {
    for i in 0..n {
        *now += 1000;
        if rng.gen_range(0..100) < 5 {
            m.flush().unwrap();
            if let Some(f) = flushed.as_mut() {
                *f = model.clone();
            }
        } else {
            step_in(m, label, model, rng, *now, &format!("{ctx} op {i}"));
        }
    }
}

#[test]
fn snapshot_stays_unchanged_while_origin_changes() {
    for seed in seeds(3) {
        let dev = new_fs(seed);
        let mut m = open(&dev);
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut now = T0;
        let mut model = Model::new();
        let ctx = format!("seed {seed}");
        // Unflushed changes at snapshot time: the snapshot flushes first.
        churn(&mut m, PFS, &mut model, &mut rng, &mut now, 150, &ctx);
        m.snapshot_with_ids(PFS, "SNAP1", now, ids(1)).unwrap();
        let at_snap1 = model.clone();
        fsck_clean(&dev, &format!("{ctx} after SNAP1"));
        compare_in(&mut m, "SNAP1", &at_snap1, &format!("{ctx} SNAP1 at once"));
        let mut flushed = Some(model.clone());
        let mut at_snap2 = None;
        for round in 0..6 {
            let rctx = format!("{ctx} round {round}");
            churn_flushed(
                &mut m,
                PFS,
                &mut model,
                &mut rng,
                &mut now,
                60,
                &rctx,
                &mut flushed,
            );
            match round {
                1 => {
                    // A pipelined flush with operations running meanwhile;
                    // the flush commits the state at flush_commit.
                    let mut batch = m.flush_begin().unwrap();
                    for i in 0..10 {
                        now += 10;
                        step_in(
                            &mut m,
                            PFS,
                            &mut model,
                            &mut rng,
                            now,
                            &format!("{rctx} {i}"),
                        );
                    }
                    batch.write();
                    m.flush_commit(batch).unwrap();
                    flushed = Some(model.clone());
                }
                2 => {
                    m.snapshot_with_ids(PFS, "SNAP2", now, ids(2)).unwrap();
                    at_snap2 = Some(model.clone());
                    flushed = Some(model.clone());
                }
                3 => {
                    // A crash: unflushed origin changes are lost, the
                    // snapshots are not.
                    drop(m);
                    m = open(&dev);
                    model = flushed.clone().unwrap();
                }
                _ => {
                    m.flush().unwrap();
                    flushed = Some(model.clone());
                }
            }
            compare_in(&mut m, PFS, &model, &format!("{rctx} origin"));
            compare_in(&mut m, "SNAP1", &at_snap1, &format!("{rctx} SNAP1"));
            if let Some(s2) = &at_snap2 {
                compare_in(&mut m, "SNAP2", s2, &format!("{rctx} SNAP2"));
            }
            m.flush().unwrap();
            fsck_clean(&dev, &rctx);
        }
        drop(m);
        let mut m = open(&dev);
        compare_in(&mut m, PFS, &model, &format!("{ctx} final origin"));
        compare_in(&mut m, "SNAP1", &at_snap1, &format!("{ctx} final SNAP1"));
        compare_in(
            &mut m,
            "SNAP2",
            at_snap2.as_ref().unwrap(),
            &format!("{ctx} final SNAP2"),
        );
    }
}

#[test]
fn writes_into_a_snapshot_leave_the_origin_unchanged() {
    for seed in seeds(3) {
        let dev = new_fs(seed + 10);
        let mut m = open(&dev);
        let mut rng = SmallRng::seed_from_u64(seed + 10);
        let mut now = T0;
        let mut origin = Model::new();
        let ctx = format!("seed {seed}");
        churn(&mut m, PFS, &mut origin, &mut rng, &mut now, 200, &ctx);
        m.snapshot_with_ids(PFS, "SNAP", now, ids(3)).unwrap();
        let mut snap = origin.clone();
        // Snapshot of the snapshot, before it changes.
        m.snapshot_with_ids("SNAP", "SNAPSNAP", now, ids(4))
            .unwrap();
        let at_snapsnap = snap.clone();
        for round in 0..4 {
            let rctx = format!("{ctx} round {round}");
            churn(&mut m, "SNAP", &mut snap, &mut rng, &mut now, 80, &rctx);
            m.flush().unwrap();
            compare_in(&mut m, "SNAP", &snap, &format!("{rctx} snapshot"));
            compare_in(&mut m, PFS, &origin, &format!("{rctx} origin"));
            compare_in(&mut m, "SNAPSNAP", &at_snapsnap, &format!("{rctx} 2nd"));
            fsck_clean(&dev, &rctx);
        }
        // Both sides diverge; then a remount.
        churn(&mut m, PFS, &mut origin, &mut rng, &mut now, 80, &ctx);
        m.flush().unwrap();
        drop(m);
        let mut m = open(&dev);
        compare_in(&mut m, "SNAP", &snap, &format!("{ctx} final snapshot"));
        compare_in(&mut m, PFS, &origin, &format!("{ctx} final origin"));
        compare_in(
            &mut m,
            "SNAPSNAP",
            &at_snapsnap,
            &format!("{ctx} final 2nd"),
        );
        fsck_clean(&dev, &format!("{ctx} final"));
    }
}

#[test]
fn snapshot_root_carries_dragonfly_fields() {
    let dev = new_fs(7);
    let mut m = open(&dev);
    let dir = m.mkdir(PFS, ROOT_INUM, b"d", 0o750, 1, 2, T0).unwrap();
    let f = m
        .create(PFS, dir, b"f", ObjType::Regfile, 0o644, 0, 0, (0, 0), T0)
        .unwrap();
    m.write(PFS, f, 0, &vec![7u8; 300_000], T0).unwrap();
    m.snapshot_with_ids(PFS, "DATA.20240101.000000", T0 + 5, ids(5))
        .unwrap();
    let tid = m.volume().header.mirror_tid;
    let list = pfs_list(m.volume()).unwrap();
    let get = |l: &str| list.iter().find(|p| p.label == l).unwrap().clone();
    let (o, s) = (get(PFS), get("DATA.20240101.000000"));
    let (om, sm) = (o.root.meta(), s.root.meta());
    assert_eq!(sm.pfs_type, pfs_type::MASTER);
    assert_eq!(sm.pfs_subtype, pfs_subtype::SNAPSHOT);
    assert_eq!(om.pfs_subtype, pfs_subtype::NONE);
    assert_eq!((sm.pfs_clid, sm.pfs_fsid), (ids(5).clid, ids(5).fsid));
    assert_ne!(sm.pfs_clid, om.pfs_clid);
    assert_eq!(sm.pfs_lsnap_tid, tid, "the flush that committed it");
    assert_eq!(om.pfs_lsnap_tid, tid, "set on the origin too");
    assert_eq!(sm.inum, 1);
    assert_eq!(sm.pfs_inum, om.pfs_inum + 1);
    assert_eq!(s.root.data.name(), b"DATA.20240101.000000");
    assert_eq!(sm.name_key, dirhash(b"DATA.20240101.000000"));
    assert_eq!(s.root.bref.key, sm.name_key);
    assert_eq!(s.root.blockset(), o.root.blockset(), "the same blocks");
    assert_eq!(s.root.bref.data_count(), o.root.bref.data_count());
    assert_eq!(s.root.bref.inode_count(), o.root.bref.inode_count());
    assert_eq!(
        (sm.mode, sm.mtime, sm.comp_algo),
        (om.mode, om.mtime, om.comp_algo)
    );
    assert_eq!(sm.ctime, T0 + 5);
    // The read-only view reads the snapshot like any PFS.
    let vol = Arc::new(hammer2::Volume::open(m.volume().device().clone()).unwrap());
    let p = hammer2::Pfs::open(vol, "DATA.20240101.000000").unwrap();
    let ino = p.resolve("d/f").unwrap();
    assert_eq!(p.read_all(&ino).unwrap(), vec![7u8; 300_000]);
    fsck_clean(&dev, "dragonfly fields");
}

#[test]
fn pfs_create_delete_and_refusals() {
    let dev = new_fs(8);
    let mut m = open(&dev);
    m.pfs_create_with_ids("NEW", T0, ids(6)).unwrap();
    let mut model = Model::new();
    let mut rng = SmallRng::seed_from_u64(8);
    let mut now = T0;
    churn(&mut m, "NEW", &mut model, &mut rng, &mut now, 100, "NEW");
    m.pfs_create_with_ids("boot", T0, ids(7)).unwrap();
    drop(m);
    let mut m = open(&dev);
    // pfs_create flushed NEW's changes with it.
    compare_in(&mut m, "NEW", &model, "NEW after remount");
    let list = pfs_list(m.volume()).unwrap();
    let new = list.iter().find(|p| p.label == "NEW").unwrap();
    let nm = new.root.meta();
    assert_eq!(
        (nm.pfs_type, nm.pfs_subtype),
        (pfs_type::MASTER, pfs_subtype::NONE)
    );
    assert_eq!((nm.comp_algo, nm.check_algo), (2, 3), "lz4, xxhash64");
    assert_eq!(
        (nm.inum, nm.mode, nm.obj_type),
        (1, 0o755, ObjType::Directory)
    );
    assert_eq!(new.root.bref.key, dirhash(b"NEW"));
    let boot = list.iter().find(|p| p.label == "boot").unwrap();
    assert_eq!(boot.root.meta().comp_algo, 1, "BOOT is never compressed");
    assert_eq!(boot.root.meta().pfs_inum, 16, "as newfs starts it");
    fsck_clean(&dev, "created");

    // Refusals leave everything as it was.
    assert!(matches!(m.pfs_create("NEW", T0), Err(Error::Exists { .. })));
    assert!(matches!(
        m.snapshot(PFS, "LOCAL", T0),
        Err(Error::Exists { .. })
    ));
    assert!(matches!(
        m.snapshot("NOPE", "X", T0),
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(m.pfs_delete("NOPE"), Err(Error::NotFound { .. })));
    for bad in ["", "a/b", "nul\0", "a@b"] {
        assert!(
            matches!(m.pfs_create(bad, T0), Err(Error::InvalidArgument { .. })),
            "{bad:?}"
        );
    }
    assert!(matches!(
        m.pfs_create(&"x".repeat(256), T0),
        Err(Error::NameTooLong { .. })
    ));

    for label in ["boot", "NEW", PFS] {
        m.pfs_delete(label).unwrap();
        fsck_clean(&dev, &format!("deleted {label}"));
    }
    assert!(matches!(
        m.pfs_delete("LOCAL"),
        Err(Error::InvalidArgument { .. })
    ));
    drop(m);
    let m = open(&dev);
    assert_eq!(m.pfs_labels().unwrap(), vec!["LOCAL".to_string()]);
}

/// Build a PFS of `files` files (in directories of 1,000) and flush;
/// returns the first file's inode number.
fn populate(m: &mut Mount, files: usize) -> u64 {
    let mut first = 0;
    let mut dir = ROOT_INUM;
    for i in 0..files {
        if i % 1000 == 0 {
            dir = m
                .mkdir(PFS, ROOT_INUM, format!("d{i}").as_bytes(), 0o755, 0, 0, T0)
                .unwrap();
        }
        let f = create_file(m, PFS, dir, format!("file{i}").as_bytes()).unwrap();
        m.write(PFS, f, 0, format!("contents of {i}\n").as_bytes(), T0)
            .unwrap();
        if i == 0 {
            first = f;
        }
    }
    m.flush().unwrap();
    first
}

#[test]
fn snapshot_timing() {
    for files in [10usize, 20_000] {
        let dev = new_fs(9);
        let mut m = open(&dev);
        let f = populate(&mut m, files);
        let mut took = Vec::new();
        for n in 0..5u8 {
            // A small change each time, so the snapshot's first flush
            // has something to write, as it usually will.
            m.write(PFS, f, 0, &[b'0' + n], T0).unwrap();
            let t = Instant::now();
            m.snapshot_with_ids(PFS, &format!("SNAP{n}"), T0, ids(9 + n))
                .unwrap();
            took.push(t.elapsed().as_secs_f64() * 1e3);
        }
        took.sort_by(f64::total_cmp);
        let inodes = pfs_list(m.volume())
            .unwrap()
            .iter()
            .find(|p| p.label == "SNAP0")
            .map(|p| p.root.bref.inode_count())
            .unwrap();
        eprintln!(
            "snapshot of a PFS of {files} files ({inodes} inodes, in memory): \
             median {:.3} ms, min {:.3} ms, max {:.3} ms over 5",
            took[2], took[0], took[4]
        );
        if files == 10 {
            fsck_clean(&dev, "timing");
        }
    }
}
