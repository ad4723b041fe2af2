//! `mount.hammer2 [-f] [-o OPTIONS] IMG[@LABEL] MOUNTPOINT`: mount a PFS
//! of a HAMMER2 image over FUSE, read-only or read-write. Installed as
//! `/usr/local/sbin/mount.hammer2` (cargo cannot name a binary with a
//! dot, so in `target/` it is `mount-hammer2`).
//!
//! Without `-f` it returns once the mount is up, leaving a daemon to
//! serve it. The daemon is this same program started again with
//! `--daemon-child` rather than a fork: forking a process that may have
//! threads (or that links libraries that might start them) is unsafe in
//! Rust and would need `unsafe` here; a fresh process is not. The child
//! leaves the terminal's session, mounts, and writes `ready` on a pipe to
//! its parent, which exits 0 then; if the child fails, its messages have
//! gone to the same stderr and the parent exits with the child's status.
//!
//! Exit status, as mount(8): 0 mounted (and, with `-f`, unmounted
//! cleanly), 1 usage error (bad arguments or options), 2 system error
//! (including a failed last flush at unmount), 32 mount failure (image,
//! label, mountpoint, /dev/fuse, mount, another PFS of the image
//! mounted read-write). A second mount of a PFS mounted read-write is a
//! bind mount of the first (`fuse_mount::bind`): it exits 0 with no
//! daemon of its own, `-f` too.

use clap::Parser;
use fuse_mount::mount::{self, Failure, Request, DEFAULT_LABEL};
use fuse_mount::{logging, options};
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

const READY: &str = "ready\n";

/// Set for the daemon child when mount(8) ran its parent.
const MOUNT8_ENV: &str = "MOUNT_HAMMER2_BY_MOUNT8";

#[derive(Parser, Debug)]
#[command(
    name = "mount.hammer2",
    version,
    about = "Mount a PFS of a HAMMER2 image over FUSE",
    after_help = "IMG is an image file or block device, IMG:PART for a partition of a \
                  whole disk (s1d as DragonFly names it, p2 as Linux does; without one, \
                  the partition holding HAMMER2), or an NBD URI (nbd://HOST[:PORT]/EXPORT, \
                  nbd+unix:///EXPORT?socket=PATH); LABEL names a PFS or snapshot \
                  (default DATA). remount changes the mount on MOUNTPOINT in place \
                  (mount -o remount,ro MNT). Options: rw (the default), ro, allow_other, \
                  allow_root, default_permissions, nosuid/suid, nodev/dev, noexec/exec, \
                  noatime, fsname=NAME; fstab bookkeeping (noauto, nofail, _netdev, x-*) \
                  is ignored.\n\n\
                  rw: writes are kept in memory and written by a flush every \
                  sync_interval=SECONDS (default 5; 0 = only on sync and unmount), on \
                  sync, and at unmount; past a quarter of the dirty limit the data is written \
                  ahead of the flush (laundered) without a commit; fsync commits \
                  the file and what it depends on, without the other files' changes. An image has one writer: a second \
                  mount of the PFS mounted read-write is a bind mount of it, another \
                  PFS is refused.\n\n\
                  Space: blocks a flush stops using go back to free space by \
                  themselves when nothing else can use them; the rest (blocks shared \
                  with snapshots or by dedup, data written before this mount) comes back \
                  through bulkfree, which the mount runs by itself (autobulkfree, the \
                  default: in the background when less than 10% of the volume is free, \
                  autobulkfree=PERCENT to change that, and before a write fails with \
                  ENOSPC; noautobulkfree turns it off). fallocate reserves room: writes \
                  into the range cannot fail for lack of space while mounted.\n\n\
                  writeback_cache lets the kernel cache writes (off by default: with it \
                  SEEK_DATA/SEEK_HOLE see no holes).\n\n\
                  snapdir: the volume's snapshots, read-only, under .snapshot/NAME at \
                  the mount root (hidden from the root's listing; off by default).\n\n\
                  cache_size=SIZE (K, M or G suffix, at least 4M): the memory of the \
                  buffer cache every block goes through (default an eighth of \
                  memory, 64M to 4G), over the image opened with O_DIRECT where \
                  its file system allows.\n\n\
                  log_writes=FILE (read-write): log every write, barrier and mark \
                  that reaches the image to FILE, for hammer2 replay-log; keep a \
                  copy of the image as it was at mount time to replay onto.\n\n\
                  See mount.hammer2(8) for every option.\n\n\
                  Exit status: 0 mounted, 1 usage, 2 system error, 32 mount failed."
)]
struct Cli {
    /// Stay in the foreground and log to stderr (the default is to return
    /// once the mount is up and log to syslog).
    #[arg(short = 'f')]
    foreground: bool,
    /// Mount options, comma-separated; may be given more than once.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Sloppy: warn about unknown options instead of failing (mount(8) -s).
    #[arg(short = 's')]
    sloppy: bool,
    /// Log debug messages.
    #[arg(short = 'v')]
    verbose: bool,
    /// Accepted from mount(8) and ignored: there is no mtab to skip.
    #[arg(short = 'n')]
    no_mtab: bool,
    /// Accepted from mount(8) and ignored: the filesystem type.
    #[arg(short = 't', value_name = "TYPE")]
    fstype: Option<String>,
    /// The background daemon (internal).
    #[arg(long, hide = true)]
    daemon_child: bool,
    /// The image and, after @, the PFS label.
    #[arg(value_name = "IMG[@LABEL]")]
    source: OsString,
    /// An existing directory.
    #[arg(value_name = "MOUNTPOINT")]
    mountpoint: PathBuf,
}

/// Was this program run by mount(8) (as `/sbin/mount.hammer2`,
/// `mount.fuse.hammer2` or `mount.fuseblk.hammer2`)? Its parent is then
/// the `mount` process.
fn run_by_mount8() -> bool {
    let ppid = nix::unistd::getppid();
    std::fs::read_to_string(format!("/proc/{ppid}/comm")).is_ok_and(|c| c.trim() == "mount")
}

fn request(cli: &Cli) -> Result<Request, Failure> {
    let (image, label) = match cli.source.to_str() {
        Some(s) => mount::split_source(s)?,
        None => (PathBuf::from(&cli.source), DEFAULT_LABEL.to_string()),
    };
    // Through mount(8), no nosuid/nodev means suid and dev (it drops
    // those from the list as the defaults they are); run directly,
    // nosuid and nodev are the default (FUSE's). The daemon child is
    // told which by its parent.
    let defaults = match cli.daemon_child {
        true => match std::env::var_os(MOUNT8_ENV) {
            Some(_) => options::Options::mount8_defaults(),
            None => options::Options::default(),
        },
        false if run_by_mount8() => options::Options::mount8_defaults(),
        false => options::Options::default(),
    };
    let options =
        options::parse_from(defaults, &cli.options, cli.sloppy).map_err(Failure::Usage)?;
    Ok(Request {
        image,
        label,
        mountpoint: cli.mountpoint.clone(),
        options,
    })
}

/// Start the daemon and wait until it says the mount is up, or exits.
fn spawn_daemon() -> Result<(), Failure> {
    let exe = std::env::current_exe()
        .map_err(|e| Failure::System(format!("cannot find this program: {e}")))?;
    let mut cmd = Command::new(exe);
    if run_by_mount8() {
        cmd.env(MOUNT8_ENV, "1");
    } else {
        cmd.env_remove(MOUNT8_ENV);
    }
    let mut child = cmd
        .arg("--daemon-child")
        .args(std::env::args_os().skip(1))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| Failure::System(format!("cannot start the daemon: {e}")))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        // EOF (an empty line) means it exited or closed the pipe early.
        let _ = BufReader::new(out).read_line(&mut line);
    }
    if line == READY {
        return Ok(());
    }
    let status = child
        .wait()
        .map_err(|e| Failure::System(format!("cannot wait for the daemon: {e}")))?;
    // Its own messages are already on stderr; pass its status on.
    std::process::exit(status.code().unwrap_or(2));
}

/// In the daemon, once mounted: log to syslog, let go of the caller's
/// stdio (so a caller reading our output to its end is not kept
/// waiting) and working directory, and tell the parent.
fn detach() {
    logging::to_syslog();
    let _ = std::env::set_current_dir("/");
    let Ok(null) = File::options().read(true).write(true).open("/dev/null") else {
        log::warn!("cannot open /dev/null; keeping stdio");
        return;
    };
    let _ = nix::unistd::dup2_stderr(&null);
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(READY.as_bytes());
    let _ = out.flush();
    let _ = nix::unistd::dup2_stdout(&null);
}

fn run(cli: &Cli) -> Result<(), Failure> {
    let req = request(cli)?;
    if req.options.remount {
        // Change the mount on MOUNTPOINT in place; SOURCE is whatever
        // mount(8) found for it.
        return fuse_mount::remount::remount(&req.mountpoint, &req.options);
    }
    if cli.daemon_child {
        // Out of the caller's session: no SIGHUP or ^C from its terminal.
        let _ = nix::unistd::setsid();
        mount::serve(&req, detach)
    } else if cli.foreground {
        mount::serve(&req, || {})
    } else {
        spawn_daemon()
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            return ExitCode::from(if usage { 1 } else { 0 });
        }
    };
    logging::init(cli.verbose);
    log::debug!("{cli:?}");
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            log::debug!("{f:?}");
            eprintln!("mount.hammer2: {f}");
            ExitCode::from(f.exit_code() as u8)
        }
    }
}
