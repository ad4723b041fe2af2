//! `hammer2 replay-log`: rebuild an image from a write log that
//! `mount.hammer2 -o log_writes=FILE` kept (`bufcache::logwrites`), as
//! dm-log-writes' replay-log does: onto a copy of the image as it was at
//! mount time (the base), up to the end, an entry, a barrier or a mark,
//! optionally checking the image after every barrier (`--fsck`, or any
//! command with `--check`). `--list` prints the log's entries.

use crate::CmdError;
use bufcache::logwrites::{
    fingerprint_file, fingerprint_hex, replay, scan_log, IndexKind, LogIndex, ReplayError,
    ReplayPoint, Stop,
};
use bufcache::{BlockDevice, FileDevice};
use mkfs::progress::{percent, ProgressLine};
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// Where to stop and what to check, from the command line.
pub struct Plan<'a> {
    pub stop: Stop,
    /// A shell command run after every barrier: `sh -c CMD replay-log IMG`
    /// (so `$1` is the image), with H2_REPLAY_IMAGE, H2_REPLAY_ENTRY and
    /// H2_REPLAY_BARRIER in its environment; a non-zero exit stops.
    pub check: Option<&'a str>,
    /// Our fsck after every barrier; damage stops.
    pub fsck: bool,
}

fn open_log(log: &Path) -> Result<LogIndex, CmdError> {
    scan_log(log).map_err(|e| CmdError::Fail(format!("{}: {e}", log.display())))
}

/// `hammer2 replay-log LOG --list`.
pub fn list(log: &Path, out: &mut dyn Write) -> Result<u64, CmdError> {
    let index = open_log(log)?;
    writeln!(
        out,
        "{}: log of a {}-byte device, base fingerprint {}",
        log.display(),
        index.header.device_size,
        fingerprint_hex(&index.header.base_fingerprint)
    )?;
    writeln!(
        out,
        "{} entries, {} barriers, {} marks",
        index.len(),
        index.barriers(),
        index.marks().len()
    )?;
    for e in &index.entries {
        match &e.kind {
            IndexKind::Write { offset, len } => {
                writeln!(out, "{:>8} write   {offset:#018x} {len}", e.seq)?
            }
            IndexKind::Barrier { n } => writeln!(out, "{:>8} barrier {n}", e.seq)?,
            IndexKind::Mark(name) => writeln!(out, "{:>8} mark    {name}", e.seq)?,
        }
    }
    if let Some(t) = &index.tail {
        writeln!(out, "torn tail ignored: {t:?}")?;
    }
    Ok(0)
}

/// Our fsck of the image as it is now: `None` when clean, else the first
/// problems.
fn fsck_image(img: &Path) -> Result<Option<String>, CmdError> {
    let dev = FileDevice::open(img, false)
        .map_err(|e| CmdError::Fail(format!("{}: {e}", img.display())))?;
    let dev: Arc<dyn BlockDevice> = Arc::new(dev);
    match hammer2::fsck::fsck(dev, hammer2::fsck::Options::default()) {
        Ok(r) if r.problems.is_empty() => Ok(None),
        Ok(r) => Ok(Some(
            r.problems
                .iter()
                .take(5)
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        )),
        Err(e) => Ok(Some(e.to_string())),
    }
}

/// Run the `--check` command; `None` when it passed.
fn run_check(cmd: &str, img: &Path, p: &ReplayPoint) -> Result<Option<String>, CmdError> {
    let status = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .arg("replay-log")
        .arg(img)
        .env("H2_REPLAY_IMAGE", img)
        .env("H2_REPLAY_ENTRY", p.entries.to_string())
        .env("H2_REPLAY_BARRIER", p.barriers.to_string())
        .status()
        .map_err(|e| CmdError::Fail(format!("cannot run --check command: {e}")))?;
    Ok((!status.success()).then(|| format!("`{cmd}` exited with {status}")))
}

/// `hammer2 replay-log LOG IMG [...]`.
pub fn run(log: &Path, img: &Path, plan: &Plan, out: &mut dyn Write) -> Result<u64, CmdError> {
    let index = open_log(log)?;
    let upto = index.resolve(&plan.stop).map_err(CmdError::Fail)?;
    let shown = img.display();
    crate::check_path(img, false)?;
    let file = File::open(img).map_err(|e| CmdError::Fail(format!("{shown}: {e}")))?;
    // Replaying writes the image, in place: not while anything else
    // writes it or a read-only mount shows it, by any name (a mount of
    // it, of a loop device over it, a tool); held to the end, checks
    // included (an fsck run by --check sees it held).
    let _lock = bufcache::imagelock::lock_writer(img, true, || {
        eprintln!(
            "hammer2: {shown}: waiting for the mount that was unmounted to write its last flush"
        )
    })
    .map_err(|e| CmdError::Fail(e.to_string()))?;
    let fp = fingerprint_file(&file).map_err(|e| CmdError::Fail(format!("{shown}: {e}")))?;
    if fp != index.header.base_fingerprint {
        return Err(CmdError::Fail(format!(
            "{shown} is not the image the log starts from (fingerprint {}, the log's base is {}): \
             replay onto a copy of the image as it was when it was mounted with log_writes=",
            fingerprint_hex(&fp),
            fingerprint_hex(&index.header.base_fingerprint)
        )));
    }
    drop(file);
    let dev = FileDevice::open(img, true).map_err(|e| CmdError::Fail(format!("{shown}: {e}")))?;
    let mut progress = ProgressLine::new(true);
    let total = upto;
    let mut failure: Option<(ReplayPoint, String)> = None;
    let mut checked = 0u64;
    let result = replay(
        log,
        &dev,
        upto,
        |p| {
            if !plan.fsck && plan.check.is_none() {
                return true;
            }
            checked += 1;
            let verdict = (|| {
                if plan.fsck {
                    if let Some(why) = fsck_image(img)? {
                        return Ok(Some(format!("fsck: {why}")));
                    }
                }
                match plan.check {
                    Some(cmd) => run_check(cmd, img, p),
                    None => Ok(None),
                }
            })();
            match verdict {
                Ok(None) => true,
                Ok(Some(why)) => {
                    failure = Some((*p, why));
                    false
                }
                Err(CmdError::Fail(why)) => {
                    failure = Some((*p, why));
                    false
                }
                Err(CmdError::Output(e)) => {
                    failure = Some((*p, e.to_string()));
                    false
                }
            }
        },
        |p| {
            progress.show(|| {
                format!(
                    "replaying: entry {} of {total} ({}%), barrier {}",
                    p.entries,
                    percent(p.entries, total),
                    p.barriers
                )
            })
        },
    );
    progress.clear();
    match result {
        Ok(p) => {
            writeln!(
                out,
                "replayed {} entries ({} writes, {} bytes, {} barriers) onto {shown}{}",
                p.entries,
                p.writes,
                p.bytes,
                p.barriers,
                if checked > 0 {
                    format!("; {checked} barriers checked, all passed")
                } else {
                    String::new()
                }
            )?;
            Ok(0)
        }
        Err(ReplayError::Stopped(_)) => {
            let (p, why) = failure.expect("a stopped replay has a reason");
            writeln!(
                out,
                "check failed after barrier {} (entry {}): {why}; {shown} is left at that point",
                p.barriers, p.entries
            )?;
            Ok(1)
        }
        Err(e) => Err(CmdError::Fail(format!("{}: {e}", log.display()))),
    }
}
