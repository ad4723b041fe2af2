//! What else a mkfs target holds: the filesystems, partition tables and
//! other signatures blkid knows (ext2/3/4, xfs, btrfs, vfat, swap, LUKS,
//! LVM, MBR and GPT, and many more), found with `blkid -p` (libblkid's
//! low-level probe of superblocks and partition tables, as mkfs.ext4 and
//! wipefs use). HAMMER2 itself, which blkid does not know, is found by
//! `newfs::find_hammer2`.

use std::io;
use std::path::Path;
use std::process::{Command, Output};

/// Where blkid may be when it is not on PATH (root's tools).
const BLKID: &[&str] = &["blkid", "/usr/sbin/blkid", "/sbin/blkid"];

fn run_blkid(target: &Path, range: Option<(u64, u64)>) -> io::Result<Output> {
    let mut last = io::Error::from(io::ErrorKind::NotFound);
    for bin in BLKID {
        let mut cmd = Command::new(bin);
        cmd.args(["-p", "-o", "export"]);
        if let Some((offset, size)) = range {
            // Probe the partition's bytes only (and as if the device
            // ended where it does).
            cmd.args(["-O", &offset.to_string(), "-S", &size.to_string()]);
        }
        match cmd.arg("--").arg(target).output() {
            Ok(out) => return Ok(out),
            Err(e) if e.kind() == io::ErrorKind::NotFound => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// What blkid's `KEY=VALUE` lines say is there, in words.
fn describe(export: &str) -> Option<String> {
    let get = |k: &str| {
        export
            .lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(str::to_string)
    };
    let what = match (get("TYPE"), get("USAGE"), get("PTTYPE")) {
        (Some(t), Some(u), _) if u == "filesystem" => format!("a filesystem of type {t}"),
        (Some(t), Some(u), _) if u == "raid" => format!("a RAID member of type {t}"),
        (Some(t), Some(u), _) if u == "crypto" => format!("an encrypted volume of type {t}"),
        (Some(t), _, _) if t == "swap" => "a swap area".to_string(),
        (Some(t), _, _) => format!("a signature of type {t}"),
        (None, _, Some(p)) => format!("a partition table of type {p}"),
        (None, _, None) => return None,
    };
    Some(what)
}

/// What `target` holds besides HAMMER2, if blkid finds anything: "a
/// filesystem of type ext4", "a partition table of type gpt". An error when blkid cannot
/// be run or fails (the caller refuses then, unless forced).
pub fn other_signature(target: &Path) -> Result<Option<String>, String> {
    other_signature_in(target, None)
}

/// `other_signature` of `size` bytes of `target` from `offset` (a
/// partition the tools found in a disk image).
pub fn other_signature_in(
    target: &Path,
    range: Option<(u64, u64)>,
) -> Result<Option<String>, String> {
    let out = run_blkid(target, range).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => {
            "blkid (util-linux) is not installed to check it for other filesystems".to_string()
        }
        _ => format!("cannot run blkid to check it for other filesystems: {e}"),
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match out.status.code() {
        // Found something: a signature (TYPE) or a partition table
        // (PTTYPE); on a partition, also its entry in the disk's table
        // (PART_ENTRY_*), which is not content.
        Some(0) => Ok(describe(&stdout)),
        // Nothing found.
        Some(2) => Ok(None),
        // "Ambivalent result": more than one signature.
        Some(8) => Ok(Some(
            "more than one filesystem signature (blkid: ambivalent result; wipefs lists them)"
                .to_string(),
        )),
        _ => Err(format!(
            "blkid could not check it for other filesystems ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkid_export_lines_read_as_words() {
        let ext4 =
            "DEVNAME=e.img\nUUID=b6\nVERSION=1.0\nBLOCK_SIZE=1024\nTYPE=ext4\nUSAGE=filesystem\n";
        assert_eq!(describe(ext4).as_deref(), Some("a filesystem of type ext4"));
        let swap = "DEVNAME=z.img\nUUID=a1\nVERSION=1\nTYPE=swap\nUSAGE=other\n";
        assert_eq!(describe(swap).as_deref(), Some("a swap area"));
        let gpt = "DEVNAME=d.img\nPTUUID=x\nPTTYPE=gpt\n";
        assert_eq!(
            describe(gpt).as_deref(),
            Some("a partition table of type gpt")
        );
        let luks = "DEVNAME=l\nTYPE=crypto_LUKS\nUSAGE=crypto\n";
        assert_eq!(
            describe(luks).as_deref(),
            Some("an encrypted volume of type crypto_LUKS")
        );
        assert_eq!(describe("DEVNAME=x\n"), None);
        let entry = "DEVNAME=/dev/loop2p1\nPART_ENTRY_SCHEME=dos\nPART_ENTRY_TYPE=0x83\n";
        assert_eq!(describe(entry), None);
    }
}
