//! Bulkfree against the reference model and an independent topology
//! walk: files and snapshots are deleted, two passes return exactly the
//! blocks nothing references (the freemap then equals a full scan: every
//! referenced 16 KiB block allocated, every other block outside the
//! reserved and static areas free, `avail` matching), every PFS still
//! reads as the model says, and fsck is clean after every step; the same
//! with operations, flushes and snapshots running between a pass's
//! begin, scan and merge. The expected freemap is computed here from the
//! blockrefs on disk, not with the library's scan. `H2_BULK_SEED=S`
//! replays one seed.

use bufcache::{BlockDevice, MemDevice};
use hammer2::bulkfree::BulkfreeStats;
use hammer2::disk::{BlockrefType, Uuid};
use hammer2::mount::Mount;
use hammer2::pfsops::PfsIds;
use hammer2::Volume;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Arc;
use tests::freemap_check::{allocator_free_offset, assert_freemap_is_full_scan};

mod model {
    include!("support/model.rs");
}
use model::*;
use tests::freemap_check::*;
use tests::{new_fs, open, T0};

fn ids(n: u8) -> PfsIds {
    PfsIds {
        clid: Uuid::from_random([n; 16]),
        fsid: Uuid::from_random([n ^ 0x5a; 16]),
    }
}

fn seeds(default: u64) -> Vec<u64> {
    match std::env::var("H2_BULK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(s) => vec![s],
        None => (1..=default).collect(),
    }
}

/// With `H2_BULK_SAVE=DIR`: keep the image as DIR/NAME.img and what
/// each PFS must hold as DIR/NAME.json (`{label: {path: {type, size,
/// sha256}}}`, regular files and directories), for DragonFly's tools.
fn save(dev: &Arc<MemDevice>, models: &BTreeMap<String, Model>, name: &str) {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::FileExt;
    let Ok(dir) = std::env::var("H2_BULK_SAVE") else {
        return;
    };
    let dir = std::path::Path::new(&dir);
    let f = std::fs::File::create(dir.join(format!("{name}.img"))).unwrap();
    f.set_len(dev.size_bytes()).unwrap();
    let mut buf = vec![0u8; 65536];
    let mut off = 0;
    while off < dev.size_bytes() {
        dev.read_at(&mut buf, off).unwrap();
        if buf.iter().any(|&b| b != 0) {
            f.write_all_at(&buf, off).unwrap();
        }
        off += 65536;
    }
    let mut out = serde_json::Map::new();
    for (label, model) in models {
        let mut tree = serde_json::Map::new();
        let mut stack = vec![(String::new(), hammer2::mount::ROOT_INUM)];
        while let Some((prefix, dir)) = stack.pop() {
            for (n, inum) in model.entries(dir) {
                let path = format!("{prefix}{}", String::from_utf8_lossy(&n));
                match &model.nodes[&inum].kind {
                    Kind::Dir(_) => {
                        tree.insert(path.clone(), serde_json::json!({"type": "dir"}));
                        stack.push((format!("{path}/"), inum));
                    }
                    Kind::File(d) => {
                        let h: String = Sha256::digest(d)
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect();
                        tree.insert(
                            path,
                            serde_json::json!({"type": "file", "size": d.len(), "sha256": h}),
                        );
                    }
                    _ => {}
                }
            }
        }
        out.insert(label.clone(), serde_json::Value::Object(tree));
    }
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(&out).unwrap(),
    )
    .unwrap();
}

fn pass(m: &mut Mount, dev: &Arc<impl BlockDevice + 'static>, ctx: &str) -> BulkfreeStats {
    let mut reports = 0;
    let st = m
        .bulkfree(Some(&mut |_p: hammer2::bulkfree::Progress| reports += 1))
        .unwrap();
    eprintln!("{ctx}: {st}");
    fsck_clean(dev, ctx);
    st
}

/// Delete about `share` of every directory's entries (recursively
/// emptying directories first), in the library and the model.
fn delete_some(m: &mut Mount, label: &str, model: &mut Model, rng: &mut SmallRng, share: f64) {
    let now = T0 + 9_000_000;
    let mut dirs = vec![hammer2::mount::ROOT_INUM];
    let mut order = Vec::new();
    while let Some(d) = dirs.pop() {
        order.push(d);
        for (_, inum) in model.entries(d) {
            if matches!(model.nodes[&inum].kind, Kind::Dir(_)) {
                dirs.push(inum);
            }
        }
    }
    for d in order.into_iter().rev() {
        if !model.nodes.contains_key(&d) {
            continue;
        }
        for (name, inum) in model.entries(d) {
            if !rng.gen_bool(share) {
                continue;
            }
            if matches!(model.nodes[&inum].kind, Kind::Dir(_)) {
                if !model.entries(inum).is_empty() {
                    continue;
                }
                m.rmdir(label, d, &name, now).unwrap();
            } else {
                m.unlink(label, d, &name, now).unwrap();
            }
            model.dir_mut(d).remove(&name);
            model.unref(inum);
        }
    }
}

/// `n` operations on `label` with no flush among them.
fn steps(
    m: &mut Mount,
    label: &str,
    model: &mut Model,
    rng: &mut SmallRng,
    now: &mut u64,
    n: usize,
) {
    for i in 0..n {
        *now += 1000;
        step_in(m, label, model, rng, *now, &format!("{label} step {i}"));
    }
}

fn churn(
    m: &mut Mount,
    label: &str,
    model: &mut Model,
    rng: &mut SmallRng,
    now: &mut u64,
    n: usize,
) {
    for i in 0..n {
        *now += 1000;
        if rng.gen_range(0..100) < 4 {
            m.flush().unwrap();
        } else {
            step_in(m, label, model, rng, *now, &format!("{label} op {i}"));
        }
    }
}

#[test]
fn two_passes_return_exactly_the_unreferenced_blocks() {
    for seed in seeds(3) {
        let ctx = format!("seed {seed}");
        let dev = new_fs(seed);
        let mut m = open(&dev);
        m.flush().unwrap();
        let offset = allocator_free_offset(&dev);
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut now = T0;
        let mut data = Model::new();
        churn(&mut m, PFS, &mut data, &mut rng, &mut now, 600);
        m.snapshot_with_ids(PFS, "SNAP1", now, ids(1)).unwrap();
        let snap1 = data.clone();
        churn(&mut m, PFS, &mut data, &mut rng, &mut now, 400);
        m.snapshot_with_ids(PFS, "SNAP2", now, ids(2)).unwrap();
        let snap2 = data.clone();
        churn(&mut m, PFS, &mut data, &mut rng, &mut now, 400);
        m.flush().unwrap();
        fsck_clean(&dev, &format!("{ctx} built"));
        // Nothing was deleted yet that no one references: a pass stages
        // only the blocks earlier flushes superseded.
        let free0 = m.statfs(PFS).unwrap().bytes_free;

        compare_in(&mut m, "SNAP1", &snap1, &format!("{ctx} SNAP1"));
        delete_some(&mut m, PFS, &mut data, &mut rng, 0.7);
        m.flush().unwrap();
        m.pfs_delete("SNAP1").unwrap();
        fsck_clean(&dev, &format!("{ctx} deleted"));

        let p1 = pass(&mut m, &dev, &format!("{ctx} pass 1"));
        assert!(p1.sync.staged > 0, "{ctx}: pass 1 stages: {p1}");
        assert_eq!(p1.sync.freed, 0, "{ctx}: pass 1 frees nothing: {p1}");
        assert_eq!(p1.sync.free_to_allocated, 0, "{ctx}: {p1}");
        compare_in(&mut m, PFS, &data, &format!("{ctx} DATA after pass 1"));
        compare_in(
            &mut m,
            "SNAP2",
            &snap2,
            &format!("{ctx} SNAP2 after pass 1"),
        );
        let p2 = pass(&mut m, &dev, &format!("{ctx} pass 2"));
        assert_eq!(
            p2.sync.freed, p1.sync.staged,
            "{ctx}: pass 2 frees what 1 staged"
        );
        assert_eq!(
            (p2.sync.staged, p2.sync.staged_to_allocated),
            (0, 0),
            "{ctx}: {p2}"
        );
        assert!(p2.free_after > free0, "{ctx}: space came back");
        assert_eq!(m.volume().header.bulkfree_tid, p2.tid);
        assert_freemap_is_full_scan(&dev, offset, &format!("{ctx} after two passes"));

        // Freed space is reused safely: write over it, remount, compare.
        let mut s2 = snap2.clone();
        churn(&mut m, "SNAP2", &mut s2, &mut rng, &mut now, 150);
        churn(&mut m, PFS, &mut data, &mut rng, &mut now, 150);
        m.flush().unwrap();
        drop(m);
        let mut m = open(&dev);
        compare_in(&mut m, PFS, &data, &format!("{ctx} DATA reused"));
        compare_in(&mut m, "SNAP2", &s2, &format!("{ctx} SNAP2 reused"));
        fsck_clean(&dev, &format!("{ctx} reused"));
        let models = BTreeMap::from([(PFS.to_string(), data.clone()), ("SNAP2".into(), s2)]);
        save(&dev, &models, &format!("bulkfree-reused-{seed}"));

        // Everything gone but empty PFSs: two passes give the space back.
        m.pfs_delete("SNAP2").unwrap();
        delete_some(&mut m, PFS, &mut data, &mut rng, 1.0);
        delete_some(&mut m, PFS, &mut data, &mut rng, 1.0);
        delete_some(&mut m, PFS, &mut data, &mut rng, 1.0);
        m.flush().unwrap();
        pass(&mut m, &dev, &format!("{ctx} empty pass 1"));
        pass(&mut m, &dev, &format!("{ctx} empty pass 2"));
        assert_freemap_is_full_scan(&dev, offset, &format!("{ctx} emptied"));
        compare_in(&mut m, PFS, &data, &format!("{ctx} DATA emptied"));
    }
}

#[test]
fn passes_are_safe_against_writes_meanwhile() {
    for seed in seeds(3) {
        let ctx = format!("seed {seed}");
        let dev = new_fs(seed + 20);
        let mut m = open(&dev);
        m.flush().unwrap();
        let offset = allocator_free_offset(&dev);
        let mut rng = SmallRng::seed_from_u64(seed + 20);
        let mut now = T0;
        let mut models: BTreeMap<String, Model> = BTreeMap::new();
        models.insert(PFS.into(), Model::new());
        let mut data = Model::new();
        churn(&mut m, PFS, &mut data, &mut rng, &mut now, 200);
        models.insert(PFS.into(), data);
        let mut snaps = 0u8;
        for round in 0..8 {
            let rctx = format!("{ctx} round {round}");
            let mut scan = m.bulkfree_begin().unwrap();
            // Between begin and the scan: operations on every PFS, flushes,
            // a snapshot or a deletion, a pipelined flush.
            let labels: Vec<String> = models.keys().cloned().collect();
            for label in &labels {
                let model = models.get_mut(label).unwrap();
                churn(&mut m, label, model, &mut rng, &mut now, 40);
            }
            if round % 3 == 0 {
                snaps += 1;
                let name = format!("S{snaps}");
                m.snapshot_with_ids(PFS, &name, now, ids(snaps)).unwrap();
                let s = models[PFS].clone();
                models.insert(name, s);
            } else if round % 3 == 1 && models.len() > 2 {
                let victim = models.keys().find(|l| l.starts_with('S')).cloned().unwrap();
                m.pfs_delete(&victim).unwrap();
                models.remove(&victim);
            }
            let mut data = models.remove(PFS).unwrap();
            delete_some(&mut m, PFS, &mut data, &mut rng, 0.3);
            scan.run(None).unwrap();
            let mut batch = m.flush_begin().unwrap();
            steps(&mut m, PFS, &mut data, &mut rng, &mut now, 30);
            batch.write();
            // The merge lands while a pipelined flush is between its
            // batch and its commit.
            let st = m.bulkfree_commit(scan).unwrap();
            assert_eq!(st.sync.free_to_allocated, 0, "{rctx}: {st}");
            steps(&mut m, PFS, &mut data, &mut rng, &mut now, 30);
            m.flush_commit(batch).unwrap();
            models.insert(PFS.into(), data);
            m.flush().unwrap();
            for (label, model) in &models {
                compare_in(&mut m, label, model, &format!("{rctx} {label}"));
            }
            fsck_clean(&dev, &rctx);
        }
        drop(m);
        let mut m = open(&dev);
        for (label, model) in &models {
            compare_in(&mut m, label, model, &format!("{ctx} remounted {label}"));
        }
        // Quiet now: two passes leave the freemap equal to a full scan.
        pass(&mut m, &dev, &format!("{ctx} quiet pass 1"));
        pass(&mut m, &dev, &format!("{ctx} quiet pass 2"));
        assert_freemap_is_full_scan(&dev, offset, &format!("{ctx} quiet"));
        for (label, model) in &models {
            compare_in(&mut m, label, model, &format!("{ctx} final {label}"));
        }
        drop(m);
        save(&dev, &models, &format!("bulkfree-meanwhile-{seed}"));
    }
}

#[test]
fn a_pass_not_the_latest_is_refused() {
    let dev = new_fs(5);
    let mut m = open(&dev);
    let mut old = m.bulkfree_begin().unwrap();
    let mut new = m.bulkfree_begin().unwrap();
    old.run(None).unwrap();
    new.run(None).unwrap();
    assert!(m.bulkfree_commit(old).is_err(), "voided by the later begin");
    m.bulkfree_commit(new).unwrap();
    let unrun = m.bulkfree_begin().unwrap();
    assert!(m.bulkfree_commit(unrun).is_err(), "a scan must run first");
    m.flush().unwrap();
    fsck_clean(&dev, "refusals");
}

/// Images DragonFly wrote (with its own garbage: blocks its flushes
/// superseded stay allocated until a bulkfree): two passes, then every
/// PFS and snapshot still reads as its manifest says, fsck is clean and
/// the freemap equals a full scan.
#[test]
fn dragonfly_images_after_two_passes() {
    for name in ["v1-snapshot", "v2-lz4-xxhash64"] {
        let path = tests::fixture_copy(name, "bulkfree");
        let dev = Arc::new(bufcache::FileDevice::open(&path, true).unwrap());
        let d: Arc<dyn BlockDevice> = dev.clone();
        let mut m = Mount::open(d).unwrap();
        m.flush().unwrap();
        let offset = allocator_free_offset(&dev);
        let p1 = pass(&mut m, &dev, &format!("{name} pass 1"));
        let p2 = pass(&mut m, &dev, &format!("{name} pass 2"));
        assert_eq!(p2.sync.freed, p1.sync.staged, "{name}");
        assert_freemap_is_full_scan(&dev, offset, name);
        drop(m);
        let vol = tests::open_volume(&path).unwrap();
        for (label, want) in tests::manifest(name) {
            let pfs = hammer2::Pfs::open(vol.clone(), &label).unwrap();
            let have = tests::describe_pfs(&pfs).unwrap();
            let diffs = tests::diff_manifest(&want, &have);
            assert!(diffs.is_empty(), "{name}@{label}: {}", diffs.join("\n"));
        }
    }
}

/// A block the scan cannot read stops the pass before it merges:
/// nothing below a damaged block may be taken for unreferenced.
#[test]
fn a_damaged_block_stops_the_pass() {
    let dev = new_fs(6);
    let mut m = open(&dev);
    let mut rng = SmallRng::seed_from_u64(6);
    let mut now = T0;
    let mut data = Model::new();
    churn(&mut m, PFS, &mut data, &mut rng, &mut now, 300);
    delete_some(&mut m, PFS, &mut data, &mut rng, 0.5);
    m.flush().unwrap();
    // Blocks the flushes dropped go free as later headers are written:
    // let that settle, so only a merge could change the freemap now.
    m.reclaim().unwrap();
    m.flush().unwrap();
    let d: Arc<dyn BlockDevice> = dev.clone();
    let vol = Volume::open(d.clone()).unwrap();
    // An indirect block of DATA's inode index.
    let root = hammer2::pfs::pfs_list(&vol)
        .unwrap()
        .into_iter()
        .find(|p| p.label == PFS)
        .unwrap();
    let ind = root
        .root
        .blockset()
        .into_iter()
        .find(|b| b.btype == BlockrefType::Indirect)
        .expect("an indirect block under DATA");
    let leaves = hammer2::freemap::leaves(&vol).unwrap();
    let mut byte = [0u8; 1];
    let at = ind.data_off.offset() + 7;
    d.read_at(&mut byte, at).unwrap();
    d.write_at(&[byte[0] ^ 0x40], at).unwrap();
    assert!(m.bulkfree(None).is_err());
    m.flush().unwrap();
    let after = hammer2::freemap::leaves(&Volume::open(d.clone()).unwrap()).unwrap();
    let bits = |l: &BTreeMap<u64, hammer2::freemap::FreemapLeaf>| -> Vec<_> {
        l.values()
            .flat_map(|x| x.bmaps.iter().map(|b| b.bitmapq))
            .collect()
    };
    assert_eq!(bits(&leaves), bits(&after), "nothing merged");
    // Repaired, the pass goes through.
    d.write_at(&byte, at).unwrap();
    m.bulkfree(None).unwrap();
    fsck_clean(&dev, "repaired");
}
