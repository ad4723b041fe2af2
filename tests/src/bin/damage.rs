//! `damage`: the damage campaign (`tests::damage`) as a command. For
//! every image and every block kind it damages random blocks (raw bit
//! flips and crafted damage behind good check codes), checks, repairs
//! and checks again, then prints the per-kind table and every violation
//! with what replays it. Exit status: 0 no violation, 1 violations, 2
//! usage error.

use clap::Parser;
use rand::rngs::SmallRng;
use rand::SeedableRng;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tests::damage::{self, Base, CaseResult, Kind};

#[derive(Parser)]
#[command(
    name = "damage",
    about = "Damage campaign for fsck.hammer2's repairs: random blocks of every kind damaged, \
             checked, repaired and checked again",
    after_help = "Examples:\n  damage --seed 7                  the full campaign\n  \
                  damage --cases 2 --images own    a quick run\n  \
                  damage --seed 7 --images own -v    every case of one image, printed"
)]
struct Args {
    /// Seed (default: from the clock, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Cases per block kind and image.
    #[arg(long, default_value_t = 20)]
    cases: u64,
    /// Images: own (written through the library, four header copies),
    /// own-small (one copy), or fixture names (v1-lz4-xxhash64, ...).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "own,own-small,v1-lz4-xxhash64,v2-lz4-xxhash64,v1-zlib-iscsi32,v1-autozero-none,v1-snapshot,v1-4headers-10g"
    )]
    images: Vec<String>,
    /// Keep each repaired image here (for DragonFly's tools).
    #[arg(long)]
    save: Option<PathBuf>,
    /// Print every case.
    #[arg(short, long)]
    verbose: bool,
    /// Seconds a case may take before it counts as a hang.
    #[arg(long, default_value_t = 300)]
    case_timeout: u64,
}

fn clock_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() ^ u64::from(d.subsec_nanos()))
        .unwrap_or(1)
}

fn base(name: &str) -> Base {
    match name {
        "own" => Base::new(name, damage::own_image(1, (6 << 30) + (8 << 20))),
        "own-small" => Base::new(name, damage::own_image(2, 2 << 30)),
        fixture => Base::new(fixture, damage::fixture_mem(fixture)),
    }
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let seed = args.seed.unwrap_or_else(clock_seed);
    println!(
        "damage campaign, seed {seed}, {} cases per kind and image",
        args.cases
    );
    if let Some(dir) = &args.save {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("damage: {}: {e}", dir.display());
            return ExitCode::from(2);
        }
    }
    let start = Instant::now();
    let mut results: Vec<CaseResult> = Vec::new();
    let mut hung = false;
    for (n, name) in args.images.iter().enumerate() {
        let t = Instant::now();
        let b = std::sync::Arc::new(base(name));
        println!(
            "{name}: {} files, {} header copies, ready in {:.1}s",
            b.files.len(),
            b.states.len(),
            t.elapsed().as_secs_f64()
        );
        let mut rng = SmallRng::seed_from_u64(seed ^ (n as u64).wrapping_mul(0x9e37_79b9));
        for kind in Kind::ALL {
            let mut misses = 0;
            let mut i = 0;
            while i < args.cases {
                let Some((target, how)) = damage::pick(&b, kind, &mut rng) else {
                    println!("{name}: no {} block", kind.name());
                    break;
                };
                let case_seed = seed.wrapping_add(i + misses);
                let (tx, rx) = mpsc::channel();
                let (b2, save) = (b.clone(), args.save.clone());
                let (t2, h2) = (target.clone(), how.clone());
                std::thread::spawn(move || {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        damage::run_case(&b2, &t2, &h2, case_seed, save.as_deref())
                    }));
                    let _ = tx.send(r);
                });
                let r = match rx.recv_timeout(Duration::from_secs(args.case_timeout)) {
                    Ok(Ok(Some(r))) => r,
                    Ok(Ok(None)) => {
                        // Not applicable to that block: pick again.
                        misses += 1;
                        if misses > 200 {
                            println!("{name}: no {} block takes the damage picked", kind.name());
                            break;
                        }
                        continue;
                    }
                    Ok(Err(p)) => {
                        let msg = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        CaseResult {
                            base: name.clone(),
                            kind,
                            how: how.clone(),
                            at: target.data_off.offset(),
                            seed: case_seed,
                            rewound: false,
                            in_place: false,
                            lost_bytes: 0,
                            violations: vec![format!("panic: {msg}")],
                            elapsed: Duration::ZERO,
                        }
                    }
                    Err(_) => {
                        println!(
                            "HANG: {name} {} at {:#x} ({how}) after {}s",
                            kind.name(),
                            target.data_off.offset(),
                            args.case_timeout
                        );
                        hung = true;
                        break;
                    }
                };
                i += 1;
                if args.verbose || !r.violations.is_empty() {
                    println!(
                        "{name} {} at {:#x} ({}): {}{}, {} bytes lost, {:.2}s",
                        kind.name(),
                        r.at,
                        r.how,
                        if r.rewound { "rewound" } else { "in place" },
                        if r.violations.is_empty() {
                            ""
                        } else {
                            ", VIOLATED"
                        },
                        r.lost_bytes,
                        r.elapsed.as_secs_f64()
                    );
                }
                if !r.violations.is_empty() {
                    println!(
                        "VIOLATION {name} {} at {:#x} ({}):",
                        kind.name(),
                        r.at,
                        r.how
                    );
                    for v in &r.violations {
                        println!("    {v}");
                    }
                }
                results.push(r);
            }
            if hung {
                break;
            }
        }
        if hung {
            break;
        }
    }
    let table = damage::table(&results);
    println!("\n{}", damage::format_table(&table));
    let secs: f64 = results.iter().map(|r| r.elapsed.as_secs_f64()).sum();
    let bad = results.iter().filter(|r| !r.violations.is_empty()).count();
    println!(
        "{} cases in {:.0}s ({:.2}s a case), {bad} with violations, {} hangs",
        results.len(),
        start.elapsed().as_secs_f64(),
        secs / results.len().max(1) as f64,
        u8::from(hung)
    );
    if bad > 0 || hung {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
