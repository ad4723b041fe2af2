//! The write path against a reference model: random operation sequences
//! applied to the library and to a plain in-memory model of files,
//! directories, symlinks and hard links, compared after every step;
//! flushes, remounts (what survives is exactly the last flush) and fsck
//! at the end of every run. `H2_MODEL_SEED=S` replays one run,
//! `H2_MODEL_RUNS=N` and `H2_MODEL_OPS=N` scale it.

use bufcache::{BlockDevice, MemDevice};
use hammer2::fsck::{fsck, Options};
use hammer2::mount::Mount;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

mod model {
    include!("support/model.rs");
}
use model::*;
use tests::save_sparse;

#[allow(clippy::map_entry)]
fn run(seed: u64, ops: usize) {
    let dev = Arc::new(MemDevice::new(2 << 30));
    let opts = mkfs::newfs::NewfsOptions {
        version: if seed.is_multiple_of(2) { 1 } else { 2 },
        now_us: Some(1_700_000_000_000_000),
        uuid_seed: Some(seed),
        ..Default::default()
    };
    mkfs::newfs::newfs(dev.as_ref(), &opts).unwrap();
    // Odd seeds run through the buffer cache with a small budget, so
    // pageout writes buffers back behind the flush's back.
    let cached = !seed.is_multiple_of(2);
    let open = |dev: &Arc<MemDevice>| -> Mount {
        let d: Arc<dyn BlockDevice> = dev.clone();
        let d: Arc<dyn BlockDevice> = if cached {
            Arc::new(bufcache::CachedDevice::new(
                bufcache::BufCache::open(d, 8 << 20).unwrap(),
            ))
        } else {
            d
        };
        Mount::open(d).unwrap()
    };
    let mut m = open(&dev);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut model = Model::new();
    let mut flushed = model.clone();
    let mut now = 1_700_000_000_000_000u64;
    for i in 0..ops {
        now += 1000;
        let ctx = format!("seed {seed} step {i}");
        let r = rng.gen_range(0..100);
        match r {
            0..=89 => step(&mut m, &mut model, &mut rng, now, &ctx),
            90..=92 => {
                m.flush().unwrap();
                flushed = model.clone();
            }
            93..=95 => {
                // A pipelined flush: the frontend goes on while the
                // batch's data is written; the flush commits the state
                // at flush_commit.
                let mut batch = m.flush_begin().unwrap();
                for j in 0..rng.gen_range(0..6) {
                    now += 10;
                    step(
                        &mut m,
                        &mut model,
                        &mut rng,
                        now,
                        &format!("{ctx} during flush {j}"),
                    );
                }
                batch.write();
                for j in 0..rng.gen_range(0..6) {
                    now += 10;
                    step(
                        &mut m,
                        &mut model,
                        &mut rng,
                        now,
                        &format!("{ctx} after batch {j}"),
                    );
                }
                m.flush_commit(batch).unwrap();
                flushed = model.clone();
            }
            _ => {
                // A crash: whatever was not flushed is gone.
                drop(m);
                m = open(&dev);
                model = flushed.clone();
                compare(&mut m, &model, &format!("{ctx} after remount"));
            }
        }
        if i % 25 == 0 {
            compare(&mut m, &model, &ctx);
        }
    }
    m.flush().unwrap();
    drop(m);
    let mut m = open(&dev);
    compare(&mut m, &model, &format!("seed {seed} final"));
    if let Ok(dir) = std::env::var("H2_MODEL_SAVE") {
        // Keep the image for checking with other tools.
        let path = std::path::Path::new(&dir).join(format!("model-{seed}.img"));
        save_sparse(dev.as_ref(), &path);
    }
    let d: Arc<dyn BlockDevice> = dev.clone();
    let report = fsck(d, Options::default()).unwrap();
    let msgs: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
    assert!(msgs.is_empty(), "seed {seed}: fsck: {}", msgs.join("\n"));
}

#[allow(clippy::map_entry)]
#[test]
fn random_operations_match_the_model() {
    let runs: u64 = std::env::var("H2_MODEL_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let ops: usize = std::env::var("H2_MODEL_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let seeds: Vec<u64> = match std::env::var("H2_MODEL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(s) => vec![s],
        None => (1..=runs).collect(),
    };
    for seed in seeds {
        run(seed, ops);
    }
}
