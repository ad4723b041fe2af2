//! `hammer2 probe IMG`: what a disk image (a file, a block device, an
//! NBD export) holds, as `blkid` and `lsblk -f` would show it: its
//! partition table and, for every partition (and the disk when it is
//! not partitioned), its type there and what is in it: a HAMMER2
//! volume (its version, size and PFS labels), another filesystem blkid
//! knows, or nothing known. The name in the first column is what every
//! tool takes (`IMG:s1d`); the partition the tools use by themselves,
//! when there is exactly one HAMMER2 volume, is marked.

use crate::CmdError;
use bufcache::nbd::NbdDevice;
use bufcache::partition::{self, RangeDevice, Table};
use bufcache::source::{human, Location, Spec};
use bufcache::{BlockDevice, FileDevice};
use hammer2::pfs::pfs_list;
use hammer2::Volume;
use std::io::Write;
use std::sync::Arc;

/// What is in one device, in words.
fn content(
    dev: &Arc<dyn BlockDevice>,
    local: Option<(&std::path::Path, u64, u64)>,
) -> (bool, String) {
    if mkfs::is_hammer2(dev.as_ref()) {
        return match Volume::open(dev.clone()) {
            Ok(vol) => {
                let labels = match pfs_list(&vol) {
                    Ok(l) => {
                        let mut v: Vec<String> = l.into_iter().map(|p| p.label).collect();
                        v.sort();
                        v.join(", ")
                    }
                    Err(e) => format!("(cannot list PFSs: {e})"),
                };
                (
                    true,
                    format!(
                        "HAMMER2 version {}, {}, PFS: {labels}",
                        vol.header.version,
                        human(vol.header.volu_size)
                    ),
                )
            }
            Err(e) => (true, format!("HAMMER2, damaged: {e}")),
        };
    }
    if let Some((path, start, size)) = local {
        let range = (start > 0 || size != dev.size_bytes()).then_some((start, size));
        if let Ok(Some(what)) = mkfs::signatures::other_signature_in(path, range) {
            return (false, what);
        }
    }
    (false, "-".to_string())
}

/// `hammer2 probe IMG`.
pub fn run(text: &str, out: &mut dyn Write) -> Result<u64, CmdError> {
    let spec = Spec::parse(text, |p| p.exists()).map_err(CmdError::Fail)?;
    if spec.part.is_some() {
        return Err(CmdError::Fail(format!(
            "{text}: probe takes a whole disk (without :PART), and lists its partitions"
        )));
    }
    if let Location::Path(p) = &spec.location {
        crate::check_path(p, false)?;
    }
    let fail = |e: std::io::Error| CmdError::Fail(format!("{text}: {e}"));
    let whole: Arc<dyn BlockDevice> = match &spec.location {
        Location::Path(p) => Arc::new(FileDevice::open(p, false).map_err(fail)?),
        Location::Nbd(u) => Arc::new(NbdDevice::open(u, false).map_err(fail)?),
    };
    let local = match &spec.location {
        Location::Path(p) => Some(p.as_path()),
        Location::Nbd(_) => None,
    };
    let size = whole.size_bytes();
    let table: Option<Table> = match mkfs::is_hammer2(whole.as_ref()) {
        true => None,
        false => partition::read_table(whole.as_ref()).map_err(fail)?,
    };
    let Some(t) = table else {
        let (_, what) = content(&whole, local.map(|p| (p, 0, size)));
        writeln!(out, "{text}: {}, no partition table", human(size))?;
        writeln!(out, "{text}  {what}")?;
        return Ok(0);
    };
    writeln!(out, "{text}: {}, {} partition table", human(size), t.scheme)?;
    let mut rows = Vec::new();
    let mut found = Vec::new();
    for p in &t.partitions {
        let name = format!("{text}:{}", p.dfly);
        let what = if p.has_label {
            let inner: Vec<&str> = t
                .partitions
                .iter()
                .filter(|q| q.dfly.starts_with(&p.dfly) && q.dfly.len() > p.dfly.len())
                .map(|q| &q.dfly[p.dfly.len()..])
                .collect();
            format!("disklabel64 (partitions {})", inner.join(", "))
        } else {
            let dev: Arc<dyn BlockDevice> =
                Arc::new(RangeDevice::new(whole.clone(), p.start, p.size).map_err(fail)?);
            let (h2, what) = content(&dev, local.map(|l| (l, p.start, p.size)));
            if h2 {
                found.push(rows.len());
            }
            what
        };
        rows.push([
            name,
            p.linux.clone(),
            p.start.to_string(),
            human(p.size),
            p.type_name(),
            what,
        ]);
    }
    let head = ["NAME", "LINUX", "START", "SIZE", "TYPE", "CONTENT"];
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].len())
            .chain([head[i].len()])
            .max()
            .unwrap_or(0)
    };
    let w: Vec<usize> = (0..5).map(width).collect();
    writeln!(
        out,
        "{:<w0$}  {:<w1$}  {:>w2$}  {:>w3$}  {:<w4$}  {}",
        head[0],
        head[1],
        head[2],
        head[3],
        head[4],
        head[5],
        w0 = w[0],
        w1 = w[1],
        w2 = w[2],
        w3 = w[3],
        w4 = w[4]
    )?;
    for r in &rows {
        writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:>w2$}  {:>w3$}  {:<w4$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3],
            w4 = w[4]
        )?;
    }
    for p in &t.problems {
        writeln!(out, "problem: {p}")?;
    }
    match found.as_slice() {
        [one] => writeln!(out, "the tools use {} when given {text}", rows[*one][0])?,
        [] => writeln!(out, "no partition holds a HAMMER2 volume")?,
        _ => writeln!(
            out,
            "several partitions hold HAMMER2 volumes: name one (IMG:sN[x])"
        )?,
    }
    Ok(0)
}
