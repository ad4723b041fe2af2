//! mkfs.hammer2: make an empty HAMMER2 filesystem, as DragonFly's
//! newfs_hammer2 does, on an image file or a block device.
//!
//! Exit status: 0 made, 1 error, 2 usage error.

#![forbid(unsafe_code)]

use bufcache::imagelock::{LockError, WriterLock};
use bufcache::partition;
use bufcache::source::{self, Location, Opened, Pick, Spec};
use clap::Parser;
use hammer2::disk::{AUX_MAX_BYTES, BOOT_MAX_BYTES};
use mkfs::newfs::{
    find_hammer2, newfs, parse_size_in, size_string, NewfsOptions, FS_SIZE_MIN, LABEL_DATA,
    NEWFS_ALIGN,
};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "mkfs.hammer2",
    bin_name = "mkfs.hammer2",
    about = "Make a HAMMER2 filesystem (DragonFly BSD's format, single volume)",
    disable_version_flag = true
)]
struct Args {
    /// Format version: 1, or 2 (multi-volume header layout)
    #[arg(short = 'V', value_name = "VERSION", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=2))]
    version: u32,

    /// Create PFS LABEL besides LOCAL (repeatable; default DATA; "none" for LOCAL only)
    #[arg(short = 'L', value_name = "LABEL", action = clap::ArgAction::Append,
          value_parser = parse_label)]
    labels: Vec<String>,

    /// Boot area size (K, M, G, T suffix; default about 64M, 1/20 of the fs at most)
    #[arg(short = 'b', value_name = "BOOT", value_parser = parse_boot)]
    boot: Option<u64>,

    /// Aux area size (K, M, G, T suffix; default about 256M, 1/20 of the fs at most)
    #[arg(short = 'r', value_name = "AUX", value_parser = parse_aux)]
    aux: Option<u64>,

    /// Filesystem size (K, M, G, T suffix; at least 1G); creates IMG as a sparse file if missing
    #[arg(short = 's', value_name = "SIZE", value_parser = parse_fs_size)]
    size: Option<u64>,

    /// Overwrite an existing HAMMER2 filesystem
    #[arg(short = 'f')]
    force: bool,

    /// Image file or block device, IMG:PART for a partition of a disk
    /// (sN[x] as DragonFly names it, pN[x] as Linux does), or an NBD URI
    #[arg(value_name = "IMG")]
    image: PathBuf,
}

fn parse_label(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("Volume label '' cannot be 0-length".into());
    }
    Ok(s.to_string())
}

fn parse_boot(s: &str) -> Result<u64, String> {
    parse_size_in(s, NEWFS_ALIGN, BOOT_MAX_BYTES)
}

fn parse_aux(s: &str) -> Result<u64, String> {
    parse_size_in(s, NEWFS_ALIGN, AUX_MAX_BYTES)
}

fn parse_fs_size(s: &str) -> Result<u64, String> {
    parse_size_in(s, FS_SIZE_MIN, i64::MAX as u64)
}

impl Args {
    fn options(&self) -> NewfsOptions {
        // newfs_hammer2: no -L means DATA; any -L replaces it, and
        // "none" (any case) adds nothing.
        let labels = if self.labels.is_empty() {
            vec![LABEL_DATA.to_string()]
        } else {
            self.labels
                .iter()
                .filter(|l| !l.eq_ignore_ascii_case("none"))
                .cloned()
                .collect()
        };
        NewfsOptions {
            version: self.version,
            labels,
            boot_area_bytes: self.boot,
            aux_area_bytes: self.aux,
            size_bytes: self.size,
            ..NewfsOptions::default()
        }
    }
}

/// Create or grow a regular image file to `-s` (sparse). Returns whether
/// this run created it.
fn prepare_file(path: &Path, size: Option<u64>) -> Result<bool, String> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Ok(meta) => {
            if let Some(size) = size {
                if meta.is_file() && meta.len() < size {
                    // Grow an image file to the size asked for (sparse).
                    log::info!("extending {shown} to {size} bytes");
                    let f = OpenOptions::new()
                        .write(true)
                        .open(path)
                        .map_err(|e| format!("{shown}: {e}"))?;
                    f.set_len(size).map_err(|e| format!("{shown}: {e}"))?;
                }
            }
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let Some(size) = size else {
                return Err(format!(
                    "{shown} does not exist (give -s SIZE to create an image file)"
                ));
            };
            let f = File::create_new(path).map_err(|e| format!("{shown}: {e}"))?;
            f.set_len(size).map_err(|e| {
                let _ = std::fs::remove_file(path);
                format!("{shown}: {e}")
            })?;
            Ok(true)
        }
        Err(e) => Err(format!("{shown}: {e}")),
    }
}

/// Take the image's writer locks, exclusive (`bufcache::imagelock`):
/// never over an image something writes or a read-only mount shows, by
/// any name (a mount of it or of a loop device over it, a hammer2 tool),
/// nor over a block device anything holds (a mounted filesystem), -f or
/// not.
fn lock(o: &Opened) -> Result<WriterLock, String> {
    bufcache::imagelock::lock_writer_at(&o.backing, o.claim.as_deref(), true, || {
        eprintln!(
            "mkfs.hammer2: {}: waiting for the mount that was unmounted to write its last flush",
            o.name
        )
    })
    .map_err(|e| match e {
        LockError::Mounted { on: Some(_), .. } | LockError::ReadOnly { on: Some(_), .. } => {
            format!("{e}; unmount it first")
        }
        e => e.to_string(),
    })
}

/// What the target holds that mkfs must not overwrite without -f: a
/// HAMMER2 volume, a disklabel64 (a DragonFly slice named whole), or
/// what blkid finds (for an NBD export, which blkid cannot open: a
/// partition table, or any data in its first MiB).
fn occupied(o: &Opened) -> Result<Option<String>, String> {
    let shown = &o.name;
    if let Some(at) = find_hammer2(o.dev.as_ref()).map_err(|e| e.to_string())? {
        return Ok(Some(format!(
            "{shown} already holds a HAMMER2 filesystem (volume header at {at:#x})"
        )));
    }
    if let Some(p) = &o.partition {
        if p.has_label {
            let inner: Vec<&str> = o
                .table
                .iter()
                .flat_map(|t| &t.partitions)
                .filter(|q| q.dfly.starts_with(&p.dfly) && q.dfly.len() > p.dfly.len())
                .map(|q| q.dfly.as_str())
                .collect();
            return Ok(Some(format!(
                "{shown} is a DragonFly slice holding a disklabel64 (partitions {}): name \
                 one of them, as {}:{}",
                inner.join(", "),
                o.spec.source_text(),
                inner.first().copied().unwrap_or("s1d")
            )));
        }
    }
    let found = match o.local_range() {
        Some((path, start, size)) => {
            mkfs::signatures::other_signature_in(&path, size.map(|n| (start, n)))
                .map_err(|why| format!("{shown}: {why}; use -f to make it anyway"))?
                .map(|what| format!("{what} (found by blkid)"))
        }
        None => {
            if let Some(t) = partition::read_table(o.dev.as_ref()).map_err(|e| e.to_string())? {
                Some(format!("a partition table of type {}", t.scheme))
            } else {
                let n = o.dev.size_bytes().min(1 << 20) as usize;
                let mut head = vec![0u8; n];
                o.dev.read_at(&mut head, 0).map_err(|e| e.to_string())?;
                head.iter()
                    .any(|&b| b != 0)
                    .then(|| "data in its first MiB (blkid cannot look into an NBD export)".into())
            }
        }
    };
    Ok(found.map(|what| format!("{shown} already holds {what}")))
}

fn run(args: &Args) -> Result<(), String> {
    let opts = args.options();
    opts.validate().map_err(|e| e.to_string())?;
    let text = args
        .image
        .to_str()
        .ok_or_else(|| format!("{}: not UTF-8", args.image.display()))?;
    let spec = Spec::parse(text, |p| p.exists())?;
    // Only an image file named whole is created or grown to -s.
    let file = match (&spec.location, spec.part) {
        (Location::Path(p), None) if !p.exists() || p.is_file() => Some(p.clone()),
        _ => None,
    };
    // Locked before anything is changed (an image file grown to -s).
    let early = match &file {
        Some(p) if p.exists() => {
            let o = source::open_spec(spec.clone(), true, Pick::Whole, &mkfs::is_hammer2)
                .map_err(|e| format!("Unable to open {text} R+W: {e}"))?;
            Some(lock(&o)?)
        }
        _ => None,
    };
    let created = match &file {
        Some(p) => prepare_file(p, args.size)?,
        None => false,
    };
    let cleanup = |msg: String| {
        if created {
            if let Some(p) = &file {
                let _ = std::fs::remove_file(p);
            }
        }
        msg
    };
    let o = source::open_spec(spec, true, Pick::Whole, &mkfs::is_hammer2)
        .map_err(|e| cleanup(format!("Unable to open {text} R+W: {e}")))?;
    let _lock = match early {
        Some(l) => l,
        None => lock(&o).map_err(cleanup)?,
    };
    let shown = o.name.clone();
    if !args.force && !created {
        if let Some(what) = occupied(&o).map_err(cleanup)? {
            return Err(format!("{what}; use -f to overwrite it"));
        }
    }
    let summary = newfs(o.dev.as_ref(), &opts).map_err(|e| cleanup(format!("{shown}: {e}")))?;
    println!(
        "Volume {:<15} size {}",
        shown,
        size_string(summary.geometry.total_size)
    );
    println!("---------------------------------------------");
    print!("{summary}");
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            log::debug!("failed: {msg}");
            eprintln!("mkfs.hammer2: {msg}");
            ExitCode::from(1)
        }
    }
}
