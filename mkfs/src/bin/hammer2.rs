//! `hammer2`: the HAMMER2 admin tool over an image file or block device,
//! in the shape of DragonFly's hammer2(8): verbs that read (show,
//! volhdr, freemap, pfs-list, info, hash) and verbs that write offline
//! (snapshot, pfs-create, pfs-delete, bulkfree; `admin.rs`; setcomp,
//! setcheck; `setmethods.rs`), recover (files copied out of a damaged
//! image, `recover.rs` over `mkfs::salvage`), and the same verbs (plus stat and mark)
//! through a running mount.hammer2 when given a path in its mount
//! (`online.rs`, over the control channel).
//!
//! Every verb that reads a filesystem takes its image as the argument
//! after the verb (`hammer2 show IMG`, as DragonFly's show, freemap and
//! volhdr do), or from `-s IMG` before it (DragonFly's way of naming the
//! filesystem for pfs-list and info, which there need a mount).
//!
//! Exit status: 0 clean; 1 on an error, or when damage was found (the
//! walk still finishes and flags each damaged block inline); 2 on a
//! usage error.

#![forbid(unsafe_code)]

// The verbs live in src/bin/hammer2/; a binary's root looks for its
// modules beside itself, hence the paths.
#[path = "hammer2/admin.rs"]
mod admin;
#[path = "hammer2/fmt.rs"]
mod fmt;
#[path = "hammer2/freemap.rs"]
mod freemap;
#[path = "hammer2/online.rs"]
mod online;
#[path = "hammer2/pfs.rs"]
mod pfs;
#[path = "hammer2/probe.rs"]
mod probe;
#[path = "hammer2/recover.rs"]
mod recover;
#[path = "hammer2/replay.rs"]
mod replay;
#[path = "hammer2/setmethods.rs"]
mod setmethods;
#[path = "hammer2/show.rs"]
mod show;
#[path = "hammer2/volhdr.rs"]
mod volhdr;

use bufcache::imagelock::{self, Holder, LockError};
use bufcache::logwrites::Stop;
use bufcache::BlockDevice;
use clap::{CommandFactory, Parser, Subcommand};
use hammer2::disk::BlockrefType;
use hammer2::volume::{header_slots, read_header_slot, HeaderSlot};
use hammer2::Volume;
use std::ffi::OsString;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

const AFTER_HELP: &str = "\
Each verb takes the filesystem after it (or with -s before it): an
image file or block device (IMG, or IMG@LABEL to name a PFS), a
partition of a whole disk (IMG:s1d as DragonFly names it, IMG:p2 as
Linux does; without one, the partition holding HAMMER2 when exactly one
does; probe lists them), an NBD export (nbd://HOST[:PORT]/EXPORT,
nbd+unix:///EXPORT?socket=PATH), or a mountpoint of mount.hammer2 or
any file or directory in one. Given a
path in a mount, the verb asks the running daemon through its control
channel (ioctls on that path, as DragonFly's hammer2(8) does): snapshot
snapshots the PFS mounted there, pfs-list, pfs-create, pfs-delete and
bulkfree work on the mounted volume while it is in use (bulkfree's scan
runs alongside writers), show, volhdr, freemap and info read the image
after the daemon flushed it, and stat and mark work on mounts only.
Verbs that change a mounted volume need root. Given an image,
snapshot, pfs-create, pfs-delete and bulkfree work offline and refuse
an image that mount.hammer2 serves. setcomp and setcheck take files
and directories in a mount, or IMG[@LABEL][:/PATH] offline. recover
copies files out of a damaged image and never writes to it.

Exit status: 0 clean, 1 on an error or when damage was found
(show, volhdr and freemap flag each damaged block inline and finish
the walk first), 2 on a usage error.

Examples:
  hammer2 show disk.img | less
  hammer2 probe dragonfly-vm.raw        (partitions and what each holds)
  hammer2 pfs-list dragonfly-vm.raw:s1d
  hammer2 info nbd+unix:///vm?socket=/run/vm.sock
  hammer2 -s /dev/sdb1 pfs-list
  hammer2 snapshot /mnt/data            (names it DATA.YYYYMMDD.HHMMSS, UTC)
  hammer2 snapshot disk.img@DATA        (the same, offline)
  hammer2 pfs-delete /mnt/data DATA.20240101.120000
  hammer2 bulkfree /mnt/data
  hammer2 stat /mnt/data/some/file
  hammer2 setcomp -r zstd:9 /mnt/data/logs
  hammer2 setcomp -r zstd:9 disk.img@DATA:/logs    (the same, offline)
  hammer2 setcheck blake3 disk.img@DATA:/archive/big.iso
  hammer2 mark /mnt/data before-rename   (mounted with -o log_writes=FILE)
  hammer2 replay-log --fsck --to-mark before-rename FILE base-copy.img
  hammer2 hash hello.txt
  hammer2 recover disk.img /var/tmp/rescue   (every PFS, then lost+found)
  hammer2 recover disk.img@DATA /home/me /var/tmp/rescue

setcomp methods: none, autozero, lz4 (default), zlib[:1-9], zstd[:1-15].
setcheck methods: none, disabled, crc32, xxhash64 (default), sha192,
blake3. zstd (compression code 8) and blake3 (check code 8) are
extension methods of this implementation, codes DragonFly's
hammer2_disk.h leaves unused: DragonFly BSD cannot read blocks written
with them (setcomp and setcheck warn when they are chosen).";

#[derive(Parser)]
#[command(
    name = "hammer2",
    version,
    about = "HAMMER2 admin tool (as DragonFly's hammer2(8)), on an image or a mounted filesystem",
    after_help = AFTER_HELP
)]
struct Cli {
    /// The image file or block device, for verbs not given one
    #[arg(short = 's', value_name = "IMG", global = true)]
    select: Option<PathBuf>,
    /// show: print the check line of data blocks too (they are verified
    /// either way)
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Dump the topology: every blockref under the super-root, then the
    /// freemap tree, with check status
    Show { img: Option<PathBuf> },
    /// Print the volume header in use (every copy with --all), its CRCs
    /// (computed/stored) and blocksets
    Volhdr {
        img: Option<PathBuf>,
        /// Dump every header copy, not just the one in use
        #[arg(short, long)]
        all: bool,
    },
    /// Dump the freemap tree with each leaf's bmap entries, then totals
    Freemap { img: Option<PathBuf> },
    /// List the PFSs: type, cluster id, label (snapshots show SNAPSHOT)
    #[command(name = "pfs-list")]
    PfsList { img: Option<PathBuf> },
    /// Volume summary and free space, then each PFS's ids, counts and
    /// methods
    Info { img: Option<PathBuf> },
    /// List a disk's partition table and what each partition holds
    /// (type, size, HAMMER2 version and PFS labels), as blkid and lsblk -f
    /// would; IMG is a whole disk: a file, a block device or an NBD URI
    Probe { img: Option<PathBuf> },
    /// Print the directory hash of each name ("%016x name")
    Hash {
        #[arg(required = true)]
        names: Vec<OsString>,
    },
    /// Snapshot a PFS (offline): IMG@LABEL (LABEL defaults to DATA), or
    /// -s IMG@LABEL snapshot [NAME]; NAME defaults to
    /// LABEL.YYYYMMDD.HHMMSS in UTC (DragonFly uses local time). Costs
    /// the same on any PFS: the snapshot shares every block with its
    /// origin
    Snapshot {
        /// IMG@LABEL: the image and the PFS to snapshot
        #[arg(value_name = "IMG[@LABEL]")]
        spec: Option<String>,
        /// The snapshot's label
        name: Option<String>,
    },
    /// Create an empty PFS (offline): MASTER, lz4 and xxhash64 (a PFS
    /// named BOOT is not compressed)
    #[command(name = "pfs-create")]
    PfsCreate {
        #[arg(value_name = "IMG")]
        img: PathBuf,
        label: String,
    },
    /// Delete a PFS or snapshot (offline); its space comes back with
    /// bulkfree. The last PFS of a volume is refused
    #[command(name = "pfs-delete")]
    PfsDelete {
        #[arg(value_name = "IMG")]
        img: PathBuf,
        label: String,
    },
    /// Set the compression method of files and directories: later
    /// writes use it, files created later in a directory inherit it,
    /// blocks already written keep theirs. METHOD[:LEVEL] is none,
    /// autozero, lz4, zlib[:1-9] or zstd[:1-15] (an extension DragonFly
    /// cannot read); TARGET is a file or directory in a mount, or
    /// IMG[@LABEL][:/PATH] offline (LABEL defaults to DATA, PATH to the
    /// PFS root)
    Setcomp {
        /// Also every file and directory under a directory
        #[arg(short, long)]
        recursive: bool,
        #[arg(value_name = "METHOD[:LEVEL]")]
        method: String,
        #[arg(value_name = "TARGET", required = true)]
        targets: Vec<String>,
    },
    /// Set the check method of files and directories, as setcomp: none, disabled, crc32, xxhash64, sha192 or blake3 (an
    /// extension DragonFly cannot verify)
    Setcheck {
        /// Also every file and directory under a directory
        #[arg(short, long)]
        recursive: bool,
        #[arg(value_name = "METHOD")]
        method: String,
        #[arg(value_name = "TARGET", required = true)]
        targets: Vec<String>,
    },
    /// Free the space nothing references (offline): two passes, the
    /// first stages blocks no PFS or snapshot references, the second
    /// frees them; free space before and after. Progress on a terminal
    Bulkfree {
        img: Option<PathBuf>,
        /// One pass only, as DragonFly's bulkfree does per call (blocks
        /// it stages are freed by the next run)
        #[arg(long)]
        single_pass: bool,
    },
    /// Put a named mark in the write log of a mount's device (online
    /// only; the mount needs -o log_writes=FILE)
    Mark {
        /// The mountpoint or any file or directory of the mount
        path: PathBuf,
        name: String,
    },
    /// Rebuild an image from a write log of `mount.hammer2 -o
    /// log_writes=FILE`, onto a copy of the image as it was when mounted
    /// (the log's base; any other image is refused), up to the end, an
    /// entry, a barrier or a mark; with --fsck or --check, check the image
    /// after every barrier and stop at the first failure (exit 1)
    ReplayLog {
        /// The write log
        log: PathBuf,
        /// The base image to rebuild in place (not with --list)
        #[arg(required_unless_present = "list")]
        img: Option<PathBuf>,
        /// Print the log's entries (writes, barriers, marks) and stop
        #[arg(long, conflicts_with_all = ["img", "to_mark", "to_entry", "to_barrier", "check", "fsck"])]
        list: bool,
        /// Stop before the first mark of this name (`hammer2 mark`)
        #[arg(long, group = "stop")]
        to_mark: Option<String>,
        /// Stop after entry N (entries count from 1; 0 applies none)
        #[arg(long, group = "stop")]
        to_entry: Option<u64>,
        /// Stop after the N-th barrier (from 1)
        #[arg(long, group = "stop")]
        to_barrier: Option<u64>,
        /// After every barrier run `sh -c CMD replay-log IMG` ($1 is the
        /// image; H2_REPLAY_IMAGE, H2_REPLAY_ENTRY and H2_REPLAY_BARRIER
        /// are set); a failure stops the replay there
        #[arg(long, value_name = "CMD")]
        check: Option<String>,
        /// After every barrier run fsck.hammer2's checks; damage stops
        /// the replay there
        #[arg(long)]
        fsck: bool,
    },
    /// Copy files out of a damaged image (never writes to it): every
    /// file and directory reachable (damaged blocks become holes, each
    /// reported), then the inodes no directory reaches, into
    /// DESTDIR/lost+found under the names entries still give them.
    /// Without @LABEL every PFS goes to DESTDIR/LABEL. Exit 1 when
    /// anything could not be read
    Recover {
        /// IMG[@LABEL] [PATH] DESTDIR
        #[arg(value_name = "IMG[@LABEL] [PATH] DESTDIR", num_args = 2..=3, required = true)]
        args: Vec<String>,
        /// Only what the directories reach: no scan for lost inodes
        #[arg(long)]
        no_scan: bool,
    },
    /// Show the inode of each file or directory named (online only):
    /// inode number, type, size, methods, blocks as of the last flush
    Stat {
        /// Files or directories in a mounted hammer2 filesystem
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

/// How a verb failed.
pub enum CmdError {
    /// Writing the output failed.
    Output(io::Error),
    /// The verb could not do its work.
    Fail(String),
}

impl From<io::Error> for CmdError {
    fn from(e: io::Error) -> CmdError {
        CmdError::Output(e)
    }
}

/// How many times `Image::volume` reads a header again that failed its
/// check code (5 ms apart) before calling it damaged; `space_line` the
/// freemap likewise.
pub(crate) const HEADER_REREADS: u32 = 20;

/// An opened image or device.
pub struct Image {
    pub path: PathBuf,
    pub dev: Arc<dyn BlockDevice>,
    /// The bytes behind it (`bufcache::source`), for the image locks.
    pub backing: Option<bufcache::backing::Backing>,
    /// Read-write: the image's writer lock, held while the verb runs.
    _lock: Option<bufcache::imagelock::WriterLock>,
}

/// A path the tool was given that is on no running mount.hammer2, and
/// so must be an image: a regular file or a block device. A directory is
/// "not a hammer2 mount" (the caller meant one); anything else is not
/// an image. A path that does not exist passes (opening it says so).
pub fn check_image_path(path: &Path) -> Result<(), CmdError> {
    check_path(path, true)
}

/// `check_image_path` for a verb that takes an image only (`mounts`
/// false: a directory is then "not a HAMMER2 image").
pub fn check_path(path: &Path, mounts: bool) -> Result<(), CmdError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let t = meta.file_type();
    if t.is_dir() && !mounts {
        return Err(CmdError::Fail(format!(
            "{}: not a HAMMER2 image (a directory)",
            path.display()
        )));
    }
    if t.is_dir() {
        return Err(CmdError::Fail(format!(
            "{}: not a hammer2 mount (a directory on no running mount.hammer2; \
             name a mountpoint of mount.hammer2, a path in one, or an image)",
            path.display()
        )));
    }
    if !t.is_file() && !t.is_block_device() {
        return Err(CmdError::Fail(format!(
            "{}: not a HAMMER2 image (neither a regular file nor a block device)",
            path.display()
        )));
    }
    Ok(())
}

/// The error for an image whose volume did not open: when no header
/// slot holds the HAMMER2 magic it is no HAMMER2 image at all (not a
/// damaged one).
pub fn volume_error(
    path: &Path,
    dev: &dyn BlockDevice,
    what: &str,
    e: &hammer2::Error,
) -> CmdError {
    match mkfs::newfs::find_hammer2(dev) {
        Ok(None) => CmdError::Fail(format!(
            "{}: not a hammer2 mount or HAMMER2 image (no volume header)",
            path.display()
        )),
        _ => CmdError::Fail(format!("{}: {what}: {e}", path.display())),
    }
}

impl Image {
    /// An image named directly, to read: first wait for a mount of it
    /// that was unmounted to write its last flush, and warn when a live
    /// writer holds it (what is read is its last flush).
    fn open_named(path: &Path) -> Result<Image, CmdError> {
        let img = Image::open(path)?;
        let shown = img.path.display().to_string();
        let Some(backing) = &img.backing else {
            return Ok(img);
        };
        match imagelock::wait_for_writer_at(backing, || {
            eprintln!(
                "hammer2: {shown}: waiting for the mount that was unmounted to write its last flush"
            )
        }) {
            Ok(Holder::Nobody) | Err(LockError::Io(..)) => {}
            Ok(Holder::Mounted(on)) => {
                let hint = match &on {
                    Some(mnt) => format!(" (name {} for its state as of now)", mnt.display()),
                    None => String::new(),
                };
                eprintln!(
                    "hammer2: warning: {}: reading its last flush{hint}",
                    mkfs::held_by(&shown, on.as_deref())
                );
                // Read as the mount writes: with direct I/O.
                return Image::open_live(path);
            }
            Err(e) => return Err(CmdError::Fail(e.to_string())),
        }
        Ok(img)
    }

    /// `open` for an image a mount is writing (the mount's own name for
    /// it): an image file or block device is read with direct I/O, as
    /// the mount writes it (buffered reads beside direct writes can keep
    /// pages the writes made stale).
    pub fn open_live(path: &Path) -> Result<Image, CmdError> {
        check_image_path(path)?;
        let s = path
            .to_str()
            .ok_or_else(|| CmdError::Fail(format!("{}: not UTF-8", path.display())))?;
        let o = bufcache::source::open_for_mount(
            s,
            false,
            bufcache::source::Pick::Auto,
            &mkfs::is_hammer2,
        )
        .map_err(|e| CmdError::Fail(e.to_string()))?;
        Ok(Image {
            path: PathBuf::from(&o.name),
            dev: o.dev,
            backing: Some(o.backing),
            _lock: None,
        })
    }

    /// Open an image file, block device, partition of a disk (`IMG:PART`,
    /// or the one holding HAMMER2) or NBD export, read-only.
    fn open(path: &Path) -> Result<Image, CmdError> {
        check_image_path(path)?;
        let o = mkfs::open_image(path, false).map_err(|e| CmdError::Fail(e.to_string()))?;
        Ok(Image {
            path: PathBuf::from(&o.name),
            dev: o.dev,
            backing: Some(o.backing),
            _lock: None,
        })
    }

    /// The volume, with its header chosen as a mount would. A mount
    /// writing the image rewrites a header in place (on a volume under 2
    /// GiB, the only one) with direct I/O: a read that meets the write
    /// half done fails the header's check code, so a header that fails
    /// its check code is read again, a few times, before it is called
    /// damaged.
    pub fn volume(&self) -> Result<Volume, CmdError> {
        let mut tries = 0;
        loop {
            match Volume::open(self.dev.clone()) {
                Ok(v) => return Ok(v),
                Err(e) if tries < HEADER_REREADS && self.header_fails_its_check() => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    let _ = e;
                }
                Err(e) => {
                    return Err(volume_error(
                        &self.path,
                        self.dev.as_ref(),
                        "cannot open volume",
                        &e,
                    ))
                }
            }
        }
    }

    /// Does a header slot hold a header whose check code fails?
    fn header_fails_its_check(&self) -> bool {
        self.header_slots()
            .iter()
            .any(|s| matches!(s, HeaderSlot::BadCrc(..)))
    }

    /// Every header copy the device has room for.
    pub fn header_slots(&self) -> Vec<HeaderSlot> {
        (0..header_slots(self.dev.size_bytes()))
            .map(|i| read_header_slot(self.dev.as_ref(), i))
            .collect()
    }

    pub fn fail(&self, what: &str, e: &hammer2::Error) -> CmdError {
        CmdError::Fail(format!("{}: {what}: {e}", self.path.display()))
    }
}

/// The copy a mount uses: valid check codes, highest mirror_tid (the
/// first such copy on a tie, as `Volume::open`).
pub fn best_slot(slots: &[HeaderSlot]) -> Option<usize> {
    let mut best: Option<(usize, u64)> = None;
    for (i, s) in slots.iter().enumerate() {
        if let HeaderSlot::Good(vh) = s {
            if best.is_none_or(|(_, tid)| vh.mirror_tid > tid) {
                best = Some((i, vh.mirror_tid));
            }
        }
    }
    best.map(|(i, _)| i)
}

/// DragonFly's per-copy summary line, with the copy's state added.
pub fn slot_line(i: usize, slot: &HeaderSlot, in_use: Option<usize>) -> String {
    match slot {
        HeaderSlot::Good(vh) => format!(
            "Volume {} header {i}: mirror_tid={:016x} ({})",
            vh.volu_id,
            vh.mirror_tid,
            if in_use == Some(i) { "in use" } else { "valid" }
        ),
        HeaderSlot::BadCrc(vh, _) => format!(
            "Volume {} header {i}: mirror_tid={:016x} (BAD CHECK CODE, not used)",
            vh.volu_id, vh.mirror_tid
        ),
        HeaderSlot::Invalid(why) => format!("Volume 0 header {i}: no valid header ({why})"),
    }
}

/// Damaged header copies (decoded, but with a CRC that fails).
pub fn header_problems(slots: &[HeaderSlot]) -> Vec<String> {
    slots
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s, HeaderSlot::BadCrc(..)))
        .map(|(i, _)| format!("volume header {i}: bad check code"))
        .collect()
}

/// Tell stderr what damage a verb found, after the output so far.
pub fn report_damage(
    out: &mut dyn Write,
    verb: &str,
    damaged: u64,
    problems: &[String],
) -> io::Result<()> {
    if damaged == 0 {
        return Ok(());
    }
    out.flush()?;
    eprintln!("hammer2: {verb}: {damaged} damaged block(s) or structure(s) found");
    for p in problems {
        eprintln!("hammer2:   {p}");
    }
    if (problems.len() as u64) < damaged {
        eprintln!("hammer2:   ...");
    }
    Ok(())
}

/// `hammer2 show IMG`: both trees of the header in use.
fn show(img: &Image, verbose: bool, out: &mut dyn Write) -> Result<u64, CmdError> {
    let vol = img.volume()?;
    let vh = &vol.header;
    writeln!(out, "{}", img.path.display())?;
    let mut problems = header_problems(&vol.slots);
    let mut damaged = problems.len() as u64;
    for (i, slot) in vol.slots.iter().enumerate() {
        writeln!(out, "{}", slot_line(i, slot, Some(vol.header_index)))?;
        if i != vol.header_index {
            continue;
        }
        let ctx = show::VolumeCtx::new(vh, img.dev.size_bytes());
        let offset = hammer2::disk::volhdr_offset(i);
        for btype in [BlockrefType::Volume, BlockrefType::Freemap] {
            let mut w = show::Walker::new(img.dev.as_ref(), ctx, out);
            w.verbose = verbose;
            let root = show::header_bref(btype, offset, vh.mirror_tid);
            w.show_bref(0, i, &root, true)?;
            damaged += w.damaged;
            problems.append(&mut w.problems);
        }
    }
    report_damage(out, "show", damaged, &problems)?;
    Ok(damaged)
}

fn hash(names: &[OsString], out: &mut dyn Write) -> Result<u64, CmdError> {
    use std::os::unix::ffi::OsStrExt;
    for n in names {
        let bytes = n.as_bytes();
        write!(out, "{:016x} ", hammer2::dirhash::dirhash(bytes))?;
        out.write_all(bytes)?;
        writeln!(out)?;
    }
    Ok(0)
}

/// The image a verb works on: its own argument, or -s.
fn image_arg(own: Option<PathBuf>, select: &Option<PathBuf>) -> Result<PathBuf, clap::Error> {
    match (own, select) {
        (Some(a), Some(b)) if a != *b => Err(Cli::command().error(
            clap::error::ErrorKind::ArgumentConflict,
            format!("two images given: {} and -s {}", a.display(), b.display()),
        )),
        (Some(a), _) => Ok(a),
        (None, Some(b)) => Ok(b.clone()),
        (None, None) => Err(Cli::command().error(
            clap::error::ErrorKind::MissingRequiredArgument,
            "no image given: name it after the verb or with -s IMG",
        )),
    }
}

/// The image a verb that reads works on: named, or behind a mount
/// (flushed first).
fn image_or_mount(path: &Path) -> Result<Image, CmdError> {
    match online::channel(path)? {
        Some(ch) => online::flushed_image(&ch),
        None => Image::open_named(path),
    }
}

fn run(cli: Cli, out: &mut dyn Write) -> Result<u64, CmdError> {
    let verbose = cli.verbose;
    let sel = &cli.select;
    let path =
        |own: Option<PathBuf>| -> PathBuf { image_arg(own, sel).unwrap_or_else(|e| e.exit()) };
    let img = |own: Option<PathBuf>| -> Result<Image, CmdError> { image_or_mount(&path(own)) };
    match cli.verb {
        Verb::Show { img: p } => show(&img(p)?, verbose, out),
        Verb::Volhdr { img: p, all } => volhdr::run(&img(p)?, all, verbose, out),
        Verb::Freemap { img: p } => freemap::run(&img(p)?, verbose, out),
        Verb::PfsList { img: p } => {
            let p = path(p);
            match online::channel(&p)? {
                Some(ch) => online::pfs_list(&ch, out),
                None => pfs::list(&Image::open_named(&p)?, out),
            }
        }
        Verb::Info { img: p } => pfs::info(&img(p)?, out),
        Verb::Hash { names } => hash(&names, out),
        Verb::Probe { img: p } => probe::run(&path(p).display().to_string(), out),
        Verb::Snapshot { spec, name } => {
            // With -s IMG[@LABEL] the one argument is the name, as in
            // DragonFly's `hammer2 -s PATH snapshot [NAME]`.
            let (spec, name) = match (spec, name, sel) {
                (Some(n), None, Some(p)) => (p.display().to_string(), Some(n)),
                (Some(s), n, _) => (s, n),
                (None, n, _) => {
                    let p = image_arg(None, sel).unwrap_or_else(|e| e.exit());
                    (p.display().to_string(), n)
                }
            };
            match online::channel(Path::new(&spec))? {
                Some(ch) => online::snapshot(&ch, name.as_deref(), out),
                None => admin::snapshot(&spec, name.as_deref(), out),
            }
        }
        Verb::PfsCreate { img, label } => match online::channel(&img)? {
            Some(ch) => online::pfs_create(&ch, &label, out),
            None => admin::pfs_create(&img, &label, out),
        },
        Verb::PfsDelete { img, label } => match online::channel(&img)? {
            Some(ch) => online::pfs_delete(&ch, &label, out),
            None => admin::pfs_delete(&img, &label, out),
        },
        Verb::Bulkfree {
            img: p,
            single_pass,
        } => {
            let p = path(p);
            match online::channel(&p)? {
                Some(ch) => online::bulkfree(&ch, single_pass, out),
                None => admin::bulkfree(&p, single_pass, out),
            }
        }
        Verb::Setcomp {
            recursive,
            method,
            targets,
        } => setmethods::run(
            setmethods::Field::Comp,
            &method,
            &targets,
            recursive,
            out,
            &mut io::stderr(),
        ),
        Verb::Setcheck {
            recursive,
            method,
            targets,
        } => setmethods::run(
            setmethods::Field::Check,
            &method,
            &targets,
            recursive,
            out,
            &mut io::stderr(),
        ),
        Verb::Mark { path, name } => online::mark(&path, &name, out),
        Verb::Stat { paths } => online::stat(&paths, out),
        Verb::Recover { args, no_scan } => recover::run(&args, no_scan, out),
        Verb::ReplayLog {
            log,
            img,
            list,
            to_mark,
            to_entry,
            to_barrier,
            check,
            fsck,
        } => match (list, img) {
            (true, _) => replay::list(&log, out),
            (false, Some(img)) => {
                let stop = match (to_mark, to_entry, to_barrier) {
                    (Some(m), _, _) => Stop::Mark(m),
                    (_, Some(n), _) => Stop::Entry(n),
                    (_, _, Some(n)) => Stop::Barrier(n),
                    _ => Stop::End,
                };
                let plan = replay::Plan {
                    stop,
                    check: check.as_deref(),
                    fsck,
                };
                replay::run(&log, &img, &plan, out)
            }
            (false, None) => Err(CmdError::Fail(
                "replay-log: name the image to rebuild".into(),
            )),
        },
    }
}

fn main() -> ExitCode {
    env_logger::init();
    let cli = Cli::parse();
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let result = run(cli, &mut out).and_then(|n| {
        out.flush()?;
        Ok(n)
    });
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        // A reader that stopped early (`| head`) is not an error.
        Err(CmdError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(CmdError::Output(e)) => {
            eprintln!("hammer2: cannot write output: {e}");
            ExitCode::from(1)
        }
        Err(CmdError::Fail(msg)) => {
            let _ = out.flush();
            eprintln!("hammer2: {msg}");
            ExitCode::from(1)
        }
    }
}
