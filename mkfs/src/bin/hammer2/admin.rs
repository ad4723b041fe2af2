//! The verbs that write, offline on an image: `snapshot`, `pfs-create`,
//! `pfs-delete` and `bulkfree`, through the library's `Mount` (the image
//! is opened read-write, the freemap loaded and recovered, and every
//! change committed by a flush before the verb returns). DragonFly runs
//! these through a mounted filesystem's ioctls, as `online.rs` does when
//! given a path in a mount; an image mount.hammer2 serves is refused
//! here (name its mountpoint instead).

use crate::fmt::{self, GIB};
use crate::{CmdError, Image};
use bufcache::imagelock::LockError;
use bufcache::BlockDevice;
use hammer2::bulkfree::{BulkfreeStats, Progress};
use hammer2::mount::Mount;
use mkfs::progress::{percent, ProgressLine};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The PFS an `IMG` without `@LABEL` names (as mount.hammer2).
pub const LABEL_DEFAULT: &str = "DATA";

pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Split `IMG@LABEL` as mount.hammer2 does
/// (`hammer2::pfsops::split_image_spec`): a spec naming an existing file
/// is the image; otherwise the label is what follows the last `@`,
/// unless that contains a `/`.
pub fn split_spec(spec: &str) -> (PathBuf, Option<String>) {
    hammer2::pfsops::split_image_spec(spec, |p| p.exists())
}

/// Open `path` read-write as a `Mount`, holding the image's writer locks
/// (`bufcache::imagelock`), so that an image mounted read-write, by this
/// name or any other (a loop device over it, say), or written by another
/// tool, is refused; a mount that was unmounted is waited for until it
/// has written its last flush.
pub fn open_rw(path: &Path) -> Result<(Image, Mount), CmdError> {
    crate::check_image_path(path)?;
    let o = mkfs::open_image(path, true).map_err(|e| CmdError::Fail(e.to_string()))?;
    let lock = bufcache::imagelock::lock_writer_at(&o.backing, o.claim.as_deref(), false, || {
        eprintln!(
            "hammer2: {}: waiting for the mount that was unmounted to write its last flush",
            o.name
        )
    })
    .map_err(|e| match e {
        LockError::Mounted { on: Some(_), .. } => CmdError::Fail(format!(
            "{e}; name the mountpoint to run this verb through the mount"
        )),
        e => CmdError::Fail(e.to_string()),
    })?;
    let dev: Arc<dyn BlockDevice> = o.dev.clone();
    let shown = PathBuf::from(&o.name);
    let img = Image {
        path: shown.clone(),
        dev: dev.clone(),
        backing: Some(o.backing),
        _lock: Some(lock),
    };
    let m = Mount::open(dev.clone()).map_err(|e| {
        crate::volume_error(&shown, dev.as_ref(), "cannot open volume read-write", &e)
    })?;
    Ok((img, m))
}

/// After a verb's change: the headers that free what its flushes
/// dropped (`Mount::reclaim`), so the freemap left on the image shows
/// them free.
pub fn finish(img: &Image, m: &mut Mount) -> Result<(), CmdError> {
    m.reclaim()
        .map(|_| ())
        .map_err(|e| img.fail("the last flush", &e))
}

/// DragonFly's default snapshot name: `LABEL.YYYYMMDD.HHMMSS` (here in
/// UTC; DragonFly uses local time).
pub fn default_snapshot_name(label: &str, micros: u64) -> String {
    format!("{label}.{}", fmt::date_stamp(micros))
}

/// `hammer2 snapshot IMG[@LABEL] [NAME]`.
pub fn snapshot(spec: &str, name: Option<&str>, out: &mut dyn Write) -> Result<u64, CmdError> {
    let (path, label) = split_spec(spec);
    let label = label.unwrap_or_else(|| LABEL_DEFAULT.to_string());
    let (img, mut m) = open_rw(&path)?;
    let now = now_micros();
    let name = name
        .map(str::to_string)
        .unwrap_or_else(|| default_snapshot_name(&label, now));
    let t = Instant::now();
    m.snapshot(&label, &name, now)
        .map_err(|e| img.fail(&format!("snapshot of {label} as {name}"), &e))?;
    finish(&img, &mut m)?;
    writeln!(out, "created snapshot {name}")?;
    log::info!("snapshot took {:?}", t.elapsed());
    Ok(0)
}

/// `hammer2 pfs-create IMG LABEL`.
pub fn pfs_create(path: &Path, label: &str, out: &mut dyn Write) -> Result<u64, CmdError> {
    let (img, mut m) = open_rw(path)?;
    m.pfs_create(label, now_micros())
        .map_err(|e| img.fail(&format!("pfs_create({label})"), &e))?;
    finish(&img, &mut m)?;
    writeln!(out, "hammer2: pfs_create({label}): SUCCESS")?;
    Ok(0)
}

/// `hammer2 pfs-delete IMG LABEL`.
pub fn pfs_delete(path: &Path, label: &str, out: &mut dyn Write) -> Result<u64, CmdError> {
    let (img, mut m) = open_rw(path)?;
    m.pfs_delete(label)
        .map_err(|e| img.fail(&format!("pfs_delete({label})"), &e))?;
    finish(&img, &mut m)?;
    writeln!(out, "hammer2: pfs_delete({label}): SUCCESS")?;
    Ok(0)
}

/// Free, staged and allocated bytes per the freemap, for the lines
/// `bulkfree` prints before and after.
pub fn space_line(img: &Image, when: &str, out: &mut dyn Write) -> Result<(), CmdError> {
    // A mount writing the image rewrites the freemap's zone of an older
    // header in place (DragonFly's rotation): a block failing its check
    // code may be one met half written, so the volume is opened again
    // (a newer header) and read again, a few times, before the freemap
    // is called damaged.
    let mut tries = 0;
    let s = loop {
        let vol = img.volume()?;
        match crate::pfs::space(&vol) {
            Ok(s) => break s,
            Err(hammer2::Error::CheckMismatch { .. }) if tries < crate::HEADER_REREADS => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => return Err(img.fail("cannot read the freemap", &e)),
        }
    };
    let g = |b: u64| b as f64 / GIB;
    writeln!(
        out,
        "{when:<7} free {:7.3}GB  possibly free {:7.3}GB  allocated {:7.3}GB",
        g(s.free),
        g(s.staged),
        g(s.allocated)
    )?;
    Ok(())
}

/// `hammer2 bulkfree IMG`: two passes (the first stages what nothing
/// references, the second frees it), or one with `single_pass`.
pub fn bulkfree(path: &Path, single_pass: bool, out: &mut dyn Write) -> Result<u64, CmdError> {
    let (img, mut m) = open_rw(path)?;
    space_line(&img, "before", out)?;
    out.flush()?;
    let passes = if single_pass { 1 } else { 2 };
    let (mut freed, mut staged) = (0, 0);
    for n in 1..=passes {
        let start = Instant::now();
        let mut line = ProgressLine::new(true);
        let mut progress = |p: Progress| {
            line.show(|| {
                let pct = percent(p.bytes, p.bytes_in_use);
                format!(
                    "bulkfree pass {n}/{passes}: {} blockrefs, {} scanned (~{pct}%)",
                    p.brefs,
                    fmt::size_string(p.bytes).trim_start()
                )
            })
        };
        let st = m
            .bulkfree(Some(&mut progress))
            .map_err(|e| img.fail(&format!("bulkfree pass {n}"), &e))?;
        line.clear();
        print_pass(n, &st, start.elapsed(), out)?;
        freed += st.sync.freed;
        staged = st.sync.staged;
    }
    finish(&img, &mut m)?;
    drop(m);
    space_line(&img, "after", out)?;
    let block = hammer2::disk::FREEMAP_BLOCK_SIZE;
    writeln!(
        out,
        "freed {} ({} bytes), {} staged for the next pass",
        fmt::size_string(freed * block).trim_start(),
        freed * block,
        fmt::size_string(staged * block).trim_start()
    )?;
    Ok(0)
}

fn print_pass(
    n: u32,
    st: &BulkfreeStats,
    took: Duration,
    out: &mut dyn Write,
) -> Result<(), CmdError> {
    writeln!(
        out,
        "bulkfree pass {n} (tid {:#x}, {:.2}s): {}",
        st.tid,
        took.as_secs_f64(),
        st.scan
    )?;
    writeln!(out, "{}", st.sync)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_split_as_mount_does() {
        assert_eq!(
            split_spec("disk.img@SNAP1"),
            (PathBuf::from("disk.img"), Some("SNAP1".into()))
        );
        assert_eq!(split_spec("disk.img"), (PathBuf::from("disk.img"), None));
        assert_eq!(
            split_spec("/a@b/disk.img"),
            (PathBuf::from("/a@b/disk.img"), None)
        );
        assert_eq!(
            split_spec("/a@b/d.img@X@Y"),
            (PathBuf::from("/a@b/d.img@X"), Some("Y".into()))
        );
    }

    #[test]
    fn default_names_are_dragonflys() {
        // 1700000000 s = 2023-11-14 22:13:20 UTC.
        assert_eq!(
            default_snapshot_name("DATA", 1_700_000_000_000_000),
            "DATA.20231114.221320"
        );
    }
}
