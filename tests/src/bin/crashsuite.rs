//! `crashsuite`: the crash-consistency suite as a command. Without a
//! subcommand it runs Ace-style workloads (every one-operation workload,
//! or a seeded sample of longer ones) and checks every crash state;
//! `sim` runs the seeded simulation of operations, crashes and faults.
//! Prints crash states checked, states per second and violations, each
//! with the workload or seed that replays it. Exit status: 0 clean,
//! 1 violations found, 2 usage error.

use clap::{Parser, Subcommand};
use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tests::ace::{self, Config, Stats, WorkloadId};
use tests::sim;

#[derive(Parser)]
#[command(
    name = "crashsuite",
    about = "Crash-consistency suite for the HAMMER2 library: bounded workloads on a recording device, every crash state checked",
    after_help = "Examples:\n  crashsuite                          every one-operation workload\n  crashsuite --ops 2 --sample 500 --seed 7\n  crashsuite --replay 3:1234567       one workload again\n  crashsuite sim --runs 50 --seed 1   the fault simulation"
)]
struct Args {
    /// Operations per workload: 1 runs every one-operation workload;
    /// 2 or more runs a seeded sample.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    ops: u64,
    /// Sampled workloads (with --ops 2 or more).
    #[arg(long, default_value_t = 200)]
    sample: u64,
    /// Seed of the sample (default: from the clock, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Run one workload, as a violation names it (OPS:SEED).
    #[arg(long, value_name = "OPS:SEED")]
    replay: Option<WorkloadId>,
    /// Epochs of at most this many writes get every subset checked.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=20))]
    exhaustive_max: u64,
    /// Random subsets checked for larger epochs.
    #[arg(long, default_value_t = 256)]
    subset_samples: u64,
    /// Random torn (sector subset) versions of each write.
    #[arg(long, default_value_t = 4)]
    torn_samples: u64,
    /// Skip writing to each recovered image.
    #[arg(long)]
    no_probe: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// The seeded simulation of operations, crashes and faults.
    Sim {
        /// First seed (default: from the clock, printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Runs, with seeds SEED, SEED+1, ...
        #[arg(long, default_value_t = 20)]
        runs: u64,
        /// Steps per run.
        #[arg(long, default_value_t = 300)]
        steps: usize,
    },
}

fn clock_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() ^ u64::from(d.subsec_nanos()))
        .unwrap_or(1)
}

fn run_sim(seed: Option<u64>, runs: u64, steps: usize) -> ExitCode {
    let first = seed.unwrap_or_else(clock_seed);
    let tty = std::io::stderr().is_terminal();
    let t = Instant::now();
    let mut total = sim::SimStats::default();
    let mut failures = Vec::new();
    for (i, seed) in (first..first.saturating_add(runs)).enumerate() {
        match sim::run(seed, steps) {
            Ok(s) => total.add(&s),
            Err(e) => {
                eprintln!("{}violation: {e}", if tty { "\r\x1b[K" } else { "" });
                eprintln!("  replay: crashsuite sim --seed {seed} --runs 1 --steps {steps}");
                failures.push(seed);
            }
        }
        if tty {
            eprint!("\r\x1b[K[{}/{runs}] {} failures", i + 1, failures.len());
        }
    }
    if tty {
        eprint!("\r\x1b[K");
    }
    println!(
        "simulation: seeds {first}..{}, {steps} steps each, {:.1}s",
        first.saturating_add(runs),
        t.elapsed().as_secs_f64()
    );
    println!("{}", total.summary());
    println!("violations: {}", failures.len());
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Cmd::Sim { seed, runs, steps }) = args.cmd {
        return run_sim(seed, runs, steps);
    }
    let cfg = Config {
        exhaustive_max: args.exhaustive_max as usize,
        subset_samples: args.subset_samples as usize,
        torn_samples: args.torn_samples as usize,
        probe_writes: !args.no_probe,
    };
    let seed = args.seed.unwrap_or_else(clock_seed);
    let ids: Vec<WorkloadId> = match args.replay {
        Some(id) => vec![id],
        None => ace::plan(args.ops as usize, args.sample, seed),
    };
    match args.replay {
        Some(id) => println!(
            "replaying workload {id}: {}",
            id.steps().map_or("(none)".into(), |s| ace::describe(&s))
        ),
        None if args.ops == 1 => println!("every one-operation workload ({})", ids.len()),
        None => println!(
            "{} sampled workloads of {} operations, seed {seed}",
            ids.len(),
            args.ops
        ),
    }
    let tty = std::io::stderr().is_terminal();
    let t = Instant::now();
    let mut stats = Stats::default();
    let mut seen = HashSet::new();
    let mut shown = 0;
    let mut last = Instant::now();
    let total = ids.len();
    ace::run_plan(&ids, &cfg, &mut stats, &mut seen, &mut |s: &Stats| {
        for v in &s.violations[shown..] {
            eprintln!("{}violation: {v}", if tty { "\r\x1b[K" } else { "" });
        }
        shown = s.violations.len();
        if tty && last.elapsed().as_millis() >= 100 {
            last = Instant::now();
            let secs = t.elapsed().as_secs_f64().max(1e-9);
            eprint!(
                "\r\x1b[K[{}/{total}] {} states, {:.0}/s, {} violations",
                s.workloads,
                s.states,
                s.states as f64 / secs,
                s.violations.len()
            );
            let _ = std::io::stderr().flush();
        }
    });
    if tty {
        eprint!("\r\x1b[K");
    }
    let secs = t.elapsed().as_secs_f64().max(1e-9);
    println!(
        "workloads: {} ({} with a log already checked)",
        stats.workloads, stats.duplicates
    );
    println!("crash states checked: {}", stats.states);
    println!("states per second: {:.0}", stats.states as f64 / secs);
    println!("violations: {}", stats.violations.len());
    if stats.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
