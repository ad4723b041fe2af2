//! fsck.hammer2: check a HAMMER2 image or device without changing it.
//!
//! Exit codes follow fsck(8): 0 clean, 4 errors left uncorrected, 8
//! operational error, 16 usage error.

use bufcache::imagelock::{Holder, LockError};
use clap::Parser;
use hammer2::fsck::{fsck, Options, Progress};
use mkfs::progress::{percent, ProgressLine};
use mkfs::units::human;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

const EXIT_CLEAN: u8 = 0;
const EXIT_ERRORS_LEFT: u8 = 4;
const EXIT_OPERATIONAL: u8 = 8;
const EXIT_USAGE: u8 = 16;

/// Check a HAMMER2 filesystem: every volume header copy, every PFS and
/// snapshot, every check code, the directory structure and the freemap.
/// Nothing is ever written.
#[derive(Parser)]
#[command(
    name = "fsck.hammer2",
    version,
    after_help = "Exit status: 0 clean, 4 problems found, 8 operational error, 16 usage error."
)]
struct Args {
    /// Print each PFS as it is checked, and the warnings.
    #[arg(short, long)]
    verbose: bool,
    /// Answer no to every repair (the default: this checker never writes).
    #[arg(short = 'n')]
    no: bool,
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
    ExitCode::from(run(&args))
}

fn run(args: &Args) -> u8 {
    let given = args.image.display().to_string();
    // A file, a block device, a partition of a disk (IMG:PART, or the
    // one holding HAMMER2), an NBD export.
    let opened = match mkfs::open_image(&args.image, false) {
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
    // A mount that was just unmounted may still be writing its last
    // flush (a FUSE umount does not wait for it): check what it leaves.
    let waiting = || {
        eprintln!("fsck.hammer2: {name}: waiting for the mount that was unmounted to write its last flush")
    };
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
    let dev = opened.dev.clone();
    let start = Instant::now();
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
    let report = match fsck(dev, opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fsck.hammer2: {name}: {e}");
            return EXIT_OPERATIONAL;
        }
    };
    line.clear();
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
    if report.is_clean() {
        println!("{name}: clean");
        EXIT_CLEAN
    } else {
        println!(
            "{name}: {} problems found, nothing changed",
            report.problems.len()
        );
        EXIT_ERRORS_LEFT
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
            "unlinked while open (nlinks 0): removed at the next read-write mount of their PFS",
        ),
        (
            false,
            "with links but no directory entry (left by hammer2 destroy, or damage): \
             not removed automatically",
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
