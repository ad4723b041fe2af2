//! Whole-disk images for tests, made as a DragonFly or Linux user's disk
//! is: partition tables written by util-linux's `sfdisk` (MBR, with an
//! extended partition) and gdisk's `sgdisk` (GPT), and DragonFly's
//! disklabel64 inside a slice, written from the format
//! (`bufcache::partition::encode_disklabel64`). Sparse files; shared by
//! the bufcache, mkfs and mount tests (included by path where the
//! `tests` crate is not a dependency).

#![allow(dead_code)]

use bufcache::partition::{encode_disklabel64, Guid, Label64Part, FS_HAMMER2};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

pub const MIB: u64 = 1 << 20;

fn tool(name: &str) -> String {
    for d in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let p = Path::new(d).join(name);
        if p.exists() {
            return p.display().to_string();
        }
    }
    panic!("{name} is not installed (scripts/test installs fdisk and gdisk)");
}

fn sparse(img: &Path, size: u64) {
    let f = std::fs::File::create(img).unwrap();
    f.set_len(size).unwrap();
}

/// Run sfdisk with `script` on `img`.
pub fn sfdisk(img: &Path, script: &str) {
    let mut c = Command::new(tool("sfdisk"))
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(img)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(c.wait().unwrap().success(), "sfdisk failed on {script}");
}

/// Run sgdisk with `args` on `img`.
pub fn sgdisk(img: &Path, args: &[&str]) {
    let out = Command::new(tool("sgdisk"))
        .args(args)
        .arg(img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sgdisk {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Write a disklabel64 at `slice_start` of `img` for a slice of
/// `slice_size` bytes, with partitions (letter index, offset in the
/// slice, size, fstype).
pub fn write_disklabel64(
    img: &Path,
    slice_start: u64,
    slice_size: u64,
    parts: &[(usize, u64, u64, u8)],
) {
    let n = parts.iter().map(|p| p.0 + 1).max().unwrap_or(0);
    let mut v: Vec<Option<Label64Part>> = vec![None; n];
    for &(i, offset, size, fstype) in parts {
        v[i] = Some(Label64Part {
            offset,
            size,
            fstype,
            type_guid: Guid([0; 16]),
        });
    }
    let label = encode_disklabel64(slice_size, &v);
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&label, slice_start).unwrap();
}

/// Where the partitions of a test disk are (bytes on the disk).
#[derive(Clone, Copy, Debug)]
pub struct Part {
    pub start: u64,
    pub size: u64,
}

/// A DragonFly-style MBR disk of 1 GiB: slice 1 (type 0x6c, 1 MiB to 601
/// MiB) holding a disklabel64 with `a` (64 MiB, swap) and `d` (535 MiB,
/// HAMMER2), slice 2 Linux (64 MiB), and an extended slice 3 holding one
/// logical partition (s5, 128 MiB). Returns (s1a, s1d, s2, s5).
pub fn mbr_disklabel64(img: &Path) -> (Part, Part, Part, Part) {
    sparse(img, 1024 * MIB);
    sfdisk(
        img,
        "label: dos\n\
         start=2048, size=1228800, type=6c\n\
         start=1234944, size=131072, type=83\n\
         start=1366016, size=512000, type=5\n\
         start=1368064, size=262144, type=83\n",
    );
    let s1 = MIB;
    write_disklabel64(
        img,
        s1,
        600 * MIB,
        &[(0, MIB, 64 * MIB, 1), (3, 65 * MIB, 535 * MIB, FS_HAMMER2)],
    );
    (
        Part {
            start: s1 + MIB,
            size: 64 * MIB,
        },
        Part {
            start: s1 + 65 * MIB,
            size: 535 * MIB,
        },
        Part {
            start: 1234944 * 512,
            size: 64 * MIB,
        },
        Part {
            start: 1368064 * 512,
            size: 128 * MIB,
        },
    )
}

/// A GPT disk of 1 GiB: p1/s0 EFI (32 MiB), p2/s1 a DragonFly
/// disklabel64 slice (600 MiB) whose `d` is HAMMER2-typed (from 1 MiB to
/// its end), p3/s2 a DragonFly HAMMER2 partition (300 MiB). Returns (s1d,
/// s2).
pub fn gpt_disklabel64(img: &Path) -> (Part, Part) {
    sparse(img, 1024 * MIB);
    sgdisk(
        img,
        &[
            "-n",
            "1:2048:+32M",
            "-t",
            "1:ef00",
            "-n",
            "2:67584:+600M",
            "-t",
            "2:3d48ce54-1d16-11dc-8696-01301bb8a9f5",
            "-n",
            "3:1296384:+300M",
            "-t",
            "3:5cbb9ad1-862d-11dc-a94d-01301bb8a9f5",
        ],
    );
    let s1 = 33 * MIB;
    let s2 = s1 + 600 * MIB;
    write_disklabel64(img, s1, 600 * MIB, &[(3, MIB, 599 * MIB, FS_HAMMER2)]);
    (
        Part {
            start: s1 + MIB,
            size: 599 * MIB,
        },
        Part {
            start: s2,
            size: 300 * MIB,
        },
    )
}

/// Fill `part` of `img` with a recognisable pattern (so a test can see
/// that nothing outside another partition changed).
pub fn fill(img: &Path, part: Part, tag: u8) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    let chunk = vec![tag; MIB as usize];
    let mut at = 0;
    while at < part.size {
        f.write_all_at(&chunk, part.start + at).unwrap();
        at += MIB;
    }
}

/// Does `part` of `img` still hold `fill`'s pattern?
pub fn filled(img: &Path, part: Part, tag: u8) -> bool {
    let f = std::fs::File::open(img).unwrap();
    let mut chunk = vec![0u8; MIB as usize];
    let mut at = 0;
    while at < part.size {
        f.read_exact_at(&mut chunk, part.start + at).unwrap();
        if chunk.iter().any(|&b| b != tag) {
            return false;
        }
        at += MIB;
    }
    true
}
