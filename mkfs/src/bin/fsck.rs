//! fsck.hammer2: check a HAMMER2 image or device, and repair it.
//!
//! `-n` (the default) checks and never writes; `-p` (preen) makes the
//! repairs that lose nothing; `-y` makes every repair, rewinding to an
//! older volume header when the newest tree cannot be repaired in place
//! (`--rewind=N` picks the copy). The repairs are `hammer2::repair`'s;
//! each is printed as one line. A repair holds the image's writer lock,
//! exclusive (`bufcache::imagelock`), so an image mounted under any name,
//! read-write or read-only, is refused.
//!
//! Exit codes follow fsck(8): 0 clean, 1 errors corrected, 4 errors left
//! uncorrected, 8 operational error, 16 usage error, 32 cancelled by the
//! user (SIGINT or SIGTERM).

#![forbid(unsafe_code)]

use bufcache::imagelock::{Holder, LockError};
use bufcache::BlockDevice;
use clap::Parser;
use hammer2::fsck::{fsck, Options, Progress, Report};
use hammer2::repair::{self, Mode};
use mkfs::progress::{percent, ProgressLine};
use mkfs::units::human;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

const EXIT_CLEAN: u8 = 0;
const EXIT_CORRECTED: u8 = 1;
const EXIT_ERRORS_LEFT: u8 = 4;
const EXIT_OPERATIONAL: u8 = 8;
const EXIT_USAGE: u8 = 16;
const EXIT_CANCELLED: u8 = 32;

/// Check a HAMMER2 filesystem: every volume header copy, every PFS and
/// snapshot, every check code, the directory structure and the freemap;
/// with -p or -y, repair it.
#[derive(Parser)]
#[command(
    name = "fsck.hammer2",
    version,
    after_help = "Exit status: 0 clean, 1 errors corrected, 4 errors left uncorrected, \
                  8 operational error, 16 usage error, 32 cancelled."
)]
struct Args {
    /// Print each PFS as it is checked, and the warnings.
    #[arg(short, long)]
    verbose: bool,
    /// Check only and never write (the default).
    #[arg(short = 'n', conflicts_with_all = ["preen", "yes"])]
    no: bool,
    /// Preen: make the repairs that lose nothing (freemap, statistics,
    /// link counts, header copies, entry types and keys, lost+found);
    /// stop, writing nothing, if any other is needed.
    #[arg(short = 'p', conflicts_with = "yes")]
    preen: bool,
    /// Make every repair: also cut what cannot be saved, replace damaged
    /// blocks by older copies, rewind when in-place repair would lose a
    /// PFS.
    #[arg(short = 'y')]
    yes: bool,
    /// With -y: rewind to volume header copy N (0-3), whose whole tree
    /// must verify, then repair.
    #[arg(long, value_name = "N", requires = "yes")]
    rewind: Option<usize>,
    /// Do not print progress even on a terminal.
    #[arg(short, long)]
    quiet: bool,
    /// The image file or block device, IMG:PART for a partition of a disk
    /// (found by itself when one holds HAMMER2), or an NBD URI.
    #[arg(value_name = "IMG")]
    image: PathBuf,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() {
                EXIT_USAGE
            } else {
                EXIT_CLEAN
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or(if args.verbose { "info" } else { "warn" }),
    )
    .format_timestamp(None)
    .init();
    let _ = args.no;
    let cancel = Arc::new(AtomicBool::new(false));
    if let Err(e) = watch_signals(cancel.clone(), args.preen || args.yes) {
        eprintln!("fsck.hammer2: cannot watch for signals: {e}");
        return ExitCode::from(EXIT_OPERATIONAL);
    }
    ExitCode::from(run(&args, cancel))
}

/// SIGINT and SIGTERM cancel: a check stops at once (nothing is
/// written); a repair stops at its next commit, leaving a committed
/// state.
fn watch_signals(cancel: Arc<AtomicBool>, repairing: bool) -> nix::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()?;
    std::thread::spawn(move || {
        if set.wait().is_ok() {
            eprintln!("fsck.hammer2: cancelled");
            if !repairing {
                std::process::exit(i32::from(EXIT_CANCELLED));
            }
            cancel.store(true, Ordering::SeqCst);
        }
    });
    Ok(())
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn run(args: &Args, cancel: Arc<AtomicBool>) -> u8 {
    let given = args.image.display().to_string();
    let repairing = args.preen || args.yes;
    // A file, a block device, a partition of a disk (IMG:PART, or the
    // one holding HAMMER2), an NBD export.
    let opened = match mkfs::open_image(&args.image, repairing) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fsck.hammer2: {e}");
            return EXIT_OPERATIONAL;
        }
    };
    let name = opened.name.clone();
    if name != given {
        eprintln!("fsck.hammer2: {given}: checking {name}");
    }
    let waiting = || {
        eprintln!("fsck.hammer2: {name}: waiting for the mount that was unmounted to write its last flush")
    };
    // A repair writes: it takes the image as mkfs does (any writer or
    // read-only mount of it, by any name, refuses it).
    let _lock = if repairing {
        match bufcache::imagelock::lock_writer_at(
            &opened.backing,
            opened.claim.as_deref(),
            true,
            waiting,
        ) {
            Ok(l) => Some(l),
            Err(LockError::Mounted { on, .. }) => {
                eprintln!(
                    "fsck.hammer2: {}; unmount it to repair it",
                    mkfs::held_by(&name, on.as_deref())
                );
                return EXIT_OPERATIONAL;
            }
            Err(e) => {
                eprintln!("fsck.hammer2: {name}: {e}; not repaired");
                return EXIT_OPERATIONAL;
            }
        }
    } else {
        // A mount that was just unmounted may still be writing its last
        // flush (a FUSE umount does not wait for it): check what it
        // leaves.
        match bufcache::imagelock::wait_for_writer_at(&opened.backing, waiting) {
            Ok(Holder::Nobody) | Err(LockError::Io(..)) => {}
            Ok(Holder::Mounted(on)) => eprintln!(
                "fsck.hammer2: warning: {}: checking its last flush, which the writer may be \
                 replacing meanwhile",
                mkfs::held_by(&name, on.as_deref())
            ),
            Err(e) => {
                eprintln!("fsck.hammer2: {name}: {e}");
                return EXIT_OPERATIONAL;
            }
        }
        None
    };
    let dev: Arc<dyn BlockDevice> = opened.dev.clone();
    let start = Instant::now();
    let report = match check(args, &name, dev.clone()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fsck.hammer2: {name}: {e}");
            return EXIT_OPERATIONAL;
        }
    };
    print_report(args, &name, &report, start);
    let needs_work = !report.is_clean() || !report.orphans.is_empty() || args.rewind.is_some();
    if !repairing {
        if report.is_clean() {
            println!("{name}: clean");
            return EXIT_CLEAN;
        }
        offer_rewind(dev, &report);
        println!(
            "{name}: {} problems found, nothing changed (fsck.hammer2 -y repairs them)",
            report.problems.len()
        );
        return EXIT_ERRORS_LEFT;
    }
    if !needs_work {
        println!("{name}: clean");
        return EXIT_CLEAN;
    }
    let opts = repair::Options {
        mode: if args.yes { Mode::Yes } else { Mode::Preen },
        rewind: args.rewind,
        now: now_micros(),
        cancel: Some(cancel.clone()),
    };
    let found = report.problems.len();
    let outcome = match repair::repair(dev, report, &opts) {
        Ok(o) => o,
        Err(hammer2::Error::Cancelled) => {
            eprintln!("fsck.hammer2: {name}: repair cancelled; the image holds its last commit");
            return EXIT_CANCELLED;
        }
        Err(e) => {
            eprintln!("fsck.hammer2: {name}: repair failed: {e}");
            return EXIT_OPERATIONAL;
        }
    };
    for a in &outcome.actions {
        println!("{}: {a}", if outcome.written { "fixed" } else { "to fix" });
    }
    if let Some(why) = &outcome.refused {
        println!("{name}: UNEXPECTED INCONSISTENCY: {why}; nothing changed");
        return EXIT_ERRORS_LEFT;
    }
    if let Some(r) = &outcome.rewind {
        if r.changed.len() > 20 {
            println!(
                "changed since the state rewound to (all {}):",
                r.changed.len()
            );
            for c in &r.changed {
                println!("    {c}");
            }
        }
    }
    let lost = outcome.lost_bytes();
    if !outcome.after.is_clean() {
        for p in &outcome.after.problems {
            println!("left: {p}");
        }
        println!(
            "{name}: {found} problems found, {} repairs made, {} problems left",
            outcome.actions.len(),
            outcome.after.problems.len()
        );
        return EXIT_ERRORS_LEFT;
    }
    println!(
        "{name}: {found} problems found, {} repairs made{}; clean now",
        outcome.actions.len(),
        if lost > 0 {
            format!(", {} of file data cut", human(lost))
        } else {
            String::new()
        }
    );
    EXIT_CORRECTED
}

/// The check, with progress on a terminal.
fn check(args: &Args, name: &str, dev: Arc<dyn BlockDevice>) -> hammer2::Result<Report> {
    let mut line = ProgressLine::new(!args.quiet);
    let mut progress = |p: Progress| {
        line.show(|| {
            let pct = percent(p.bytes, p.bytes_in_use);
            format!(
                "{name}: {} blockrefs, {} checked (~{pct}%)",
                p.blockrefs,
                human(p.bytes)
            )
        })
    };
    let opts = Options {
        progress: Some(&mut progress),
        verbose: args.verbose,
    };
    let r = fsck(dev, opts);
    line.clear();
    r
}

fn print_report(args: &Args, name: &str, report: &Report, start: Instant) {
    if let Some(i) = report.header_index {
        println!(
            "{name}: HAMMER2 version {}, volume header {} of {} in use, mirror_tid {:#018x}",
            report.version, i, report.stats.headers_total, report.mirror_tid
        );
        println!("PFS: {}", report.pfs_labels.join(", "));
    }
    for p in &report.problems {
        println!("error: {p}");
    }
    if args.verbose {
        for w in &report.warnings {
            println!("warning: {w}");
        }
    }
    print_orphans(&report.orphans);
    let s = &report.stats;
    println!(
        "{} blockrefs ({} inode, {} indirect, {} data, {} dirent, {} freemap node, {} freemap leaf), {} in {:.1}s",
        s.blockrefs(),
        s.inode,
        s.indirect,
        s.data,
        s.dirent,
        s.freemap_node,
        s.freemap_leaf,
        human(s.bytes),
        start.elapsed().as_secs_f64()
    );
}

/// With -n: when the newest tree cannot be read at its root, say which
/// older state -y would go back to.
fn offer_rewind(dev: Arc<dyn BlockDevice>, report: &Report) {
    match repair::would_rewind(dev, report) {
        Ok(Some(r)) => println!("with -y: {}", repair::rewind_line(&r)),
        Ok(None) => {}
        Err(e) => log::warn!("could not look for an older state: {e}"),
    }
}

/// Orphans are not damage (exit 0) but are always reported: how many,
/// and their inode numbers per PFS, split by what becomes of them.
fn print_orphans(orphans: &[hammer2::fsck::Orphan]) {
    if orphans.is_empty() {
        return;
    }
    let mut labels: Vec<&str> = orphans.iter().map(|o| o.pfs.as_str()).collect();
    labels.dedup();
    for (unlinked, what) in [
        (
            true,
            "unlinked while open (nlinks 0): removed at the next read-write mount of their PFS \
             (or by fsck -p)",
        ),
        (
            false,
            "with links but no directory entry (left by hammer2 destroy, or damage): \
             not removed automatically (fsck -p puts them in lost+found)",
        ),
    ] {
        let mut lists = Vec::new();
        let mut count = 0;
        for label in &labels {
            let inums: Vec<String> = orphans
                .iter()
                .filter(|o| o.pfs == *label && (o.nlinks == 0) == unlinked)
                .map(|o| o.inum.to_string())
                .collect();
            if !inums.is_empty() {
                count += inums.len();
                lists.push(format!("PFS {label}: inodes {}", inums.join(", ")));
            }
        }
        if count > 0 {
            println!(
                "warning: {count} orphaned inodes {what}; {}",
                lists.join("; ")
            );
        }
    }
}
