//! `hammer2 recover IMG[@LABEL] [PATH] DESTDIR`: copy what can be read
//! out of a damaged image (`mkfs::salvage`), never writing to it.

use crate::CmdError;
use bufcache::imagelock::{self, Holder, LockError};
use bufcache::{BlockDevice, FileDevice};
use mkfs::salvage::{self, Options};
use mkfs::units::human;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Run the verb: `args` is IMG[@LABEL], then PATH and DESTDIR or just
/// DESTDIR. Returns how many things could not be recovered.
pub fn run(args: &[String], no_scan: bool, out: &mut dyn Write) -> Result<u64, CmdError> {
    let (spec, path, dest) = match args {
        [s, d] => (s, None, d),
        [s, p, d] => (s, Some(p.clone()), d),
        _ => return Err(CmdError::Fail("recover: IMG[@LABEL] [PATH] DESTDIR".into())),
    };
    // A spec naming an existing file is the image, else IMG@LABEL.
    let (img, label) = if Path::new(spec).exists() {
        (PathBuf::from(spec), None)
    } else {
        crate::admin::split_spec(spec)
    };
    crate::check_image_path(&img)?;
    let name = img.display().to_string();
    let waiting = || {
        eprintln!(
            "hammer2: {name}: waiting for the mount that was unmounted to write its last flush"
        )
    };
    match imagelock::wait_for_writer(&img, waiting) {
        Ok(Holder::Nobody) | Err(LockError::Io(..)) => {}
        Ok(Holder::Mounted(on)) => eprintln!(
            "hammer2: warning: {}: recovering from its last flush",
            mkfs::held_by(&name, on.as_deref())
        ),
        Err(e) => return Err(CmdError::Fail(format!("{name}: {e}"))),
    }
    let dev = FileDevice::open(&img, false).map_err(|e| CmdError::Fail(format!("{name}: {e}")))?;
    let dev: Arc<dyn BlockDevice> = Arc::new(dev);
    let opts = Options {
        label,
        path,
        no_scan,
    };
    let mut say = |line: &str| eprintln!("hammer2: recover: {line}");
    let r = salvage::recover(dev, &opts, Path::new(dest), &mut say)
        .map_err(|e| CmdError::Fail(format!("{name}: {e}")))?;
    writeln!(
        out,
        "recovered {} files ({}), {} directories, {} symlinks, {} hard links into {dest}; \
         {} in lost+found",
        r.files,
        human(r.bytes),
        r.dirs,
        r.symlinks,
        r.links,
        r.lost_found
    )
    .map_err(CmdError::Output)?;
    if r.skipped > 0 {
        writeln!(out, "{} devices, fifos or sockets not recreated", r.skipped)
            .map_err(CmdError::Output)?;
    }
    if !r.problems.is_empty() {
        writeln!(
            out,
            "{} things could not be read ({} of file data left as holes); listed above",
            r.problems.len(),
            human(r.lost_bytes)
        )
        .map_err(CmdError::Output)?;
    }
    Ok(r.problems.len() as u64)
}
