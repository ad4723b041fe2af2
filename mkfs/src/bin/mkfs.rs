//! mkfs.hammer2: make an empty HAMMER2 filesystem, as DragonFly's
//! newfs_hammer2 does, on an image file or a block device.
//!
//! Exit status: 0 made, 1 error, 2 usage error.

#![forbid(unsafe_code)]

use bufcache::imagelock::{LockError, WriterLock};
use bufcache::FileDevice;
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

    /// Image file or block device
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

/// Open the target, creating or growing a regular file to `-s`. Returns
/// the device and whether this run created the file.
fn open_target(path: &Path, size: Option<u64>) -> Result<(FileDevice, bool), String> {
    let shown = path.display();
    let created = match std::fs::metadata(path) {
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
            false
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
            true
        }
        Err(e) => return Err(format!("{shown}: {e}")),
    };
    match FileDevice::open(path, true) {
        Ok(dev) => Ok((dev, created)),
        Err(e) => {
            if created {
                let _ = std::fs::remove_file(path);
            }
            Err(format!("Unable to open {shown} R+W: {e}"))
        }
    }
}

/// Take the image's writer locks, exclusive (`bufcache::imagelock`):
/// never over an image something writes or a read-only mount shows, by
/// any name (a mount of it or of a loop device over it, a hammer2 tool),
/// nor over a block device anything holds (a mounted filesystem), -f or
/// not.
fn lock(image: &Path) -> Result<WriterLock, String> {
    bufcache::imagelock::lock_writer(image, true, || {
        eprintln!(
            "mkfs.hammer2: {}: waiting for the mount that was unmounted to write its last flush",
            image.display()
        )
    })
    .map_err(|e| match e {
        LockError::Mounted { on: Some(_), .. } | LockError::ReadOnly { on: Some(_), .. } => {
            format!("{e}; unmount it first")
        }
        e => e.to_string(),
    })
}

fn run(args: &Args) -> Result<(), String> {
    let opts = args.options();
    opts.validate().map_err(|e| e.to_string())?;
    // Locked before anything is changed (an image file grown to -s).
    let early = match std::fs::metadata(&args.image) {
        Ok(_) => Some(lock(&args.image)?),
        Err(_) => None,
    };
    let (dev, created) = open_target(&args.image, args.size)?;
    let shown = args.image.display();
    let cleanup = |msg: String| {
        if created {
            let _ = std::fs::remove_file(&args.image);
        }
        msg
    };
    let _lock = match early {
        Some(l) => l,
        None => lock(&args.image).map_err(cleanup)?,
    };
    if !args.force && !created {
        let found = find_hammer2(&dev).map_err(|e| e.to_string())?;
        if let Some(at) = found {
            return Err(format!(
                "{shown} already holds a HAMMER2 filesystem (volume header at {at:#x}); use -f to overwrite it"
            ));
        }
        // As mkfs.ext4: not over any other filesystem or partition table
        // either.
        match mkfs::signatures::other_signature(&args.image) {
            Ok(None) => {}
            Ok(Some(what)) => {
                return Err(format!(
                    "{shown} already holds {what} (found by blkid); use -f to overwrite it"
                ))
            }
            Err(why) => return Err(format!("{shown}: {why}; use -f to make it anyway")),
        }
    }
    let summary = newfs(&dev, &opts).map_err(|e| cleanup(format!("{shown}: {e}")))?;
    println!(
        "Volume {:<15} size {}",
        shown.to_string(),
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
