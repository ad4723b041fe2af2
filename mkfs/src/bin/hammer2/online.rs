//! The verbs through a running mount.hammer2: `hammer2 VERB PATH` with
//! PATH a mountpoint or any file or directory of the mount sends the
//! request over the control channel (`mkfs::control`, ioctls on a
//! descriptor of PATH), as DragonFly's hammer2(8) does against its
//! kernel. Verbs given an image (`IMG[@LABEL]`) instead run offline.

use crate::fmt;
use crate::{CmdError, Image};
use hammer2::ctl::{bulkfree_state, MountInfo, PfsEntry, Reply, Request};
use hammer2::disk::{pfs_subtype, pfs_type, ObjType};
use mkfs::control::{Channel, CtlError};
use mkfs::progress::{percent, ProgressLine};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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

/// What the daemon behind `ch` serves.
pub fn mount_info(ch: &Channel) -> Result<MountInfo, CmdError> {
    match call(ch, Request::MountInfo, "mount-info")? {
        Reply::MountInfo(m) => Ok(m),
        other => Err(unexpected(ch, &other)),
    }
}

fn unexpected(ch: &Channel, r: &Reply) -> CmdError {
    CmdError::Fail(format!(
        "{}: unexpected reply from mount.hammer2: {r:?}",
        ch.path.display()
    ))
}

/// The image behind a mount, flushed first (so what is read from it is
/// the mount's state as of now) when the caller may flush (root);
/// otherwise as of the daemon's last flush.
pub fn flushed_image(ch: &Channel) -> Result<Image, CmdError> {
    let info = mount_info(ch)?;
    match ch.call(&Request::Flush) {
        Ok(_) => {}
        Err(e) if e.errno() == Some(libc::EPERM) || e.errno() == Some(libc::EROFS) => {}
        Err(e) => return Err(fail(ch, "flush", e)),
    }
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(&info.image));
    Image::open_live(&path)
}

/// `hammer2 snapshot PATH [NAME]`: snapshot the PFS mounted at PATH;
/// NAME defaults to LABEL.YYYYMMDD.HHMMSS (UTC).
pub fn snapshot(ch: &Channel, name: Option<&str>, out: &mut dyn Write) -> Result<u64, CmdError> {
    let label = mount_info(ch)?.label;
    let name = name
        .map(str::to_string)
        .unwrap_or_else(|| crate::admin::default_snapshot_name(&label, crate::admin::now_micros()));
    call(
        ch,
        Request::Snapshot { name: name.clone() },
        &format!("snapshot of {label} as {name}"),
    )?;
    writeln!(out, "created snapshot {name}")?;
    Ok(0)
}

/// Every PFS, page by page.
pub fn pfs_entries(ch: &Channel) -> Result<Vec<PfsEntry>, CmdError> {
    let mut all = Vec::new();
    let mut cursor = 0;
    loop {
        match call(ch, Request::PfsList { cursor }, "pfs-list")? {
            Reply::PfsList { entries, next } => {
                all.extend(entries);
                match next {
                    Some(n) if n > cursor => cursor = n,
                    Some(_) => {
                        return Err(CmdError::Fail("pfs-list: the cursor did not move".into()))
                    }
                    None => return Ok(all),
                }
            }
            other => return Err(unexpected(ch, &other)),
        }
    }
}

/// The type column: a MASTER with a subtype shows the subtype
/// (snapshots read SNAPSHOT), as the offline list.
fn type_label(p: &PfsEntry) -> &'static str {
    if p.pfs_type & 15 == pfs_type::MASTER && p.pfs_subtype != pfs_subtype::NONE {
        pfs_subtype::name(p.pfs_subtype)
    } else {
        pfs_type::name(p.pfs_type)
    }
}

/// `hammer2 pfs-list PATH`: as the offline list, the PFS mounted marked.
pub fn pfs_list(ch: &Channel, out: &mut dyn Write) -> Result<u64, CmdError> {
    let list = pfs_entries(ch)?;
    writeln!(
        out,
        "Type        ClusterId (pfs_clid)                 Label on {}",
        ch.path.display()
    )?;
    for p in &list {
        writeln!(
            out,
            "{:<11} {} {}{}",
            type_label(p),
            p.clid,
            fmt::name_string(&p.label),
            if p.mounted { " (mounted)" } else { "" }
        )?;
    }
    Ok(0)
}

/// `hammer2 pfs-create PATH LABEL`.
pub fn pfs_create(ch: &Channel, label: &str, out: &mut dyn Write) -> Result<u64, CmdError> {
    call(
        ch,
        Request::PfsCreate {
            label: label.to_string(),
        },
        &format!("pfs_create({label})"),
    )?;
    writeln!(out, "hammer2: pfs_create({label}): SUCCESS")?;
    Ok(0)
}

/// `hammer2 pfs-delete PATH LABEL`.
pub fn pfs_delete(ch: &Channel, label: &str, out: &mut dyn Write) -> Result<u64, CmdError> {
    call(
        ch,
        Request::PfsDelete {
            label: label.to_string(),
        },
        &format!("pfs_delete({label})"),
    )?;
    writeln!(out, "hammer2: pfs_delete({label}): SUCCESS")?;
    Ok(0)
}

/// `hammer2 stat PATH...`: each file's inode as the mount has it.
pub fn stat(paths: &[PathBuf], out: &mut dyn Write) -> Result<u64, CmdError> {
    for p in paths {
        let ch = require(p, "stat")?;
        let s = match call(&ch, Request::Stat, "stat")? {
            Reply::Stat(s) => s,
            other => return Err(unexpected(&ch, &other)),
        };
        writeln!(out, "{}:", p.display())?;
        writeln!(out, "    inum         {:#018x} ({})", s.inum, s.inum)?;
        writeln!(
            out,
            "    type         {}",
            ObjType::from_u8(s.obj_type).name()
        )?;
        writeln!(out, "    mode         {:04o}", s.mode)?;
        writeln!(out, "    nlinks       {}", s.nlinks)?;
        writeln!(out, "    uid, gid     {}, {}", s.uid, s.gid)?;
        writeln!(out, "    size         {}", s.size)?;
        writeln!(
            out,
            "    data_count   {} ({}) as of the last flush",
            s.data_count,
            fmt::size_string(s.data_count).trim_start()
        )?;
        writeln!(out, "    inode_count  {}", s.inode_count)?;
        writeln!(out, "    unflushed    {} bytes of file data", s.dirty_bytes)?;
        writeln!(out, "    comp         {}", fmt::comp_mode(s.comp_algo))?;
        writeln!(out, "    check        {}", fmt::check_mode(s.check_algo))?;
        writeln!(out, "    version      {}", s.version)?;
        writeln!(
            out,
            "    data         {}",
            if s.op_flags & hammer2::disk::OPFLAG_DIRECTDATA != 0 {
                "in the inode (direct data)"
            } else {
                "in blocks"
            }
        )?;
        writeln!(out, "    ctime        {}", fmt::time_string(s.ctime))?;
        writeln!(out, "    mtime        {}", fmt::time_string(s.mtime))?;
        writeln!(out, "    atime        {}", fmt::time_string(s.atime))?;
        writeln!(out, "    btime        {}", fmt::time_string(s.btime))?;
    }
    Ok(0)
}

/// `hammer2 bulkfree PATH`: start the daemon's bulkfree and follow it
/// (progress on a terminal) until it ends; free space before and after,
/// from the image as flushed.
pub fn bulkfree(ch: &Channel, single_pass: bool, out: &mut dyn Write) -> Result<u64, CmdError> {
    let passes = if single_pass { 1 } else { 2 };
    let img = flushed_image(ch)?;
    crate::admin::space_line(&img, "before", out)?;
    out.flush()?;
    let start = Instant::now();
    call(ch, Request::BulkfreeStart { passes }, "bulkfree")?;
    let mut line = ProgressLine::new(true);
    let st = loop {
        let st = match call(ch, Request::BulkfreeStatus, "bulkfree status")? {
            Reply::Bulkfree(s) => s,
            other => return Err(unexpected(ch, &other)),
        };
        if st.state != bulkfree_state::RUNNING {
            break st;
        }
        line.show(|| {
            let pct = percent(st.bytes, st.bytes_in_use);
            format!(
                "bulkfree pass {}/{}: {} blockrefs, {} scanned (~{pct}%)",
                st.pass,
                st.passes,
                st.brefs,
                fmt::size_string(st.bytes).trim_start()
            )
        });
        std::thread::sleep(Duration::from_millis(100));
    };
    line.clear();
    if !st.report.is_empty() {
        writeln!(out, "{}", st.report)?;
    }
    if st.state == bulkfree_state::FAILED {
        return Err(CmdError::Fail(format!(
            "{}: bulkfree failed: {}",
            ch.path.display(),
            st.report.lines().last().unwrap_or("")
        )));
    }
    writeln!(out, "bulkfree took {:.2}s", start.elapsed().as_secs_f64())?;
    crate::admin::space_line(&img, "after", out)?;
    let block = hammer2::disk::FREEMAP_BLOCK_SIZE;
    writeln!(
        out,
        "freed {} ({} bytes), {} staged for the next pass",
        fmt::size_string(st.freed * block).trim_start(),
        st.freed * block,
        fmt::size_string(st.staged * block).trim_start()
    )?;
    Ok(0)
}
