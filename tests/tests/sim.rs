//! The seeded simulation of operations, crashes and faults
//! (`tests::sim`): a few seeds in full; `H2_SIM_SEED=S` replays one
//! (also `crashsuite sim --seed S`).

use std::io::Write;
use tests::sim;

#[test]
fn operations_crashes_and_faults_keep_the_image_consistent() {
    let seeds: Vec<u64> = match std::env::var("H2_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(s) => vec![s],
        None => (1..=12).collect(),
    };
    let mut failures = Vec::new();
    let mut total = sim::SimStats::default();
    for seed in seeds {
        match sim::run(seed, 200) {
            Ok(s) => total.add(&s),
            Err(e) => failures.push(e),
        }
    }
    let _ = writeln!(std::io::stderr(), "simulation: {}", total.summary());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(total.crashes > 0 && total.write_faults > 0 && total.bit_flips > 0);
    assert!(total.launders > 0, "no laundering wrote anything");
    if std::env::var("H2_SIM_SEED").is_err() {
        assert!(total.data_pages_peak > 0, "no run kept file data on pages");
    }
    assert!(total.errors_seen > 0, "no fault surfaced");
}
