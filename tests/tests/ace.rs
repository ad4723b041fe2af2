//! The crash-consistency suite as a test: every one-operation workload
//! in full, and a seeded sample of two- and three-operation ones
//! (`H2_ACE_SEED=S` samples another; `crashsuite --replay OPS:SEED`
//! replays one workload). The figures are written straight to stderr,
//! so `cargo test` shows them.

use std::collections::HashSet;
use std::io::Write;
use std::time::Instant;
use tests::ace::{plan, run_plan, Config, Stats};

#[test]
fn every_crash_state_recovers_a_completed_flush() {
    let seed: u64 = std::env::var("H2_ACE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x4ace);
    let cfg = Config::default();
    let mut stats = Stats::default();
    let mut seen = HashSet::new();
    let t = Instant::now();
    let mut ids = plan(1, 0, seed);
    let one = ids.len();
    ids.extend(plan(2, 60, seed));
    ids.extend(plan(3, 40, seed));
    run_plan(&ids, &cfg, &mut stats, &mut seen, &mut |_| {});
    let secs = t.elapsed().as_secs_f64();
    let line = format!(
        "crash suite (seed {seed}): {} workloads ({one} one-operation, all; {} sampled), {} with a log already checked; {} crash states checked, {:.0} states/s, {} violations\n",
        stats.workloads,
        stats.workloads - one as u64,
        stats.duplicates,
        stats.states,
        stats.states as f64 / secs,
        stats.violations.len()
    );
    // Past the test harness's capture: the figures show on success too.
    let _ = std::io::stderr().write_all(line.as_bytes());
    for v in stats.violations.iter().take(20) {
        let _ = writeln!(std::io::stderr(), "violation: {v}");
    }
    assert!(
        stats.violations.is_empty(),
        "{} violations",
        stats.violations.len()
    );
    assert!(stats.states > 5000, "only {} crash states", stats.states);
}
