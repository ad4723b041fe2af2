//! The verbs through a running mount.hammer2: `hammer2 VERB PATH` with
//! PATH a mountpoint or any file or directory of the mount sends the
//! request over the control channel (`mkfs::control`, ioctls on a
//! descriptor of PATH), as DragonFly's hammer2(8) does against its
//! kernel. Verbs given an image (`IMG[@LABEL]`) instead run offline.

use crate::CmdError;
use hammer2::ctl::{Reply, Request};
use mkfs::control::{Channel, CtlError};
use std::io::Write;
use std::path::Path;

/// `path`'s mount, if `path` is on one; `None` if it names an image.
pub fn channel(path: &Path) -> Result<Option<Channel>, CmdError> {
    Channel::open(path).map_err(CmdError::Fail)
}

/// `path`'s mount; an error if it is not on one (`verb` works online
/// only).
pub fn require(path: &Path, verb: &str) -> Result<Channel, CmdError> {
    channel(path)?.ok_or_else(|| {
        CmdError::Fail(format!(
            "{}: not on a mounted hammer2 filesystem ({verb} works through a running \
             mount.hammer2: name its mountpoint or a file in it)",
            path.display()
        ))
    })
}

/// A failed request as the tool reports it.
pub fn fail(ch: &Channel, what: &str, e: CtlError) -> CmdError {
    let hint = match e.errno() {
        Some(libc::EPERM) => " (run as root)",
        _ => "",
    };
    CmdError::Fail(format!("{}: {what}: {e}{hint}", ch.path.display()))
}

/// Send `req`, failing with `what` as the verb's name.
pub fn call(ch: &Channel, req: Request, what: &str) -> Result<Reply, CmdError> {
    ch.call(&req).map_err(|e| fail(ch, what, e))
}

/// `hammer2 mark PATH NAME`: a named mark in the write log of the
/// device under the mount (`-o log_writes=FILE`).
pub fn mark(path: &Path, name: &str, out: &mut dyn Write) -> Result<u64, CmdError> {
    let ch = require(path, "mark")?;
    call(
        &ch,
        Request::Mark {
            name: name.to_string(),
        },
        &format!("mark {name}"),
    )?;
    writeln!(out, "marked {name}")?;
    Ok(0)
}
