//! The `hammer2` admin binary over the reference images in
//! `../shared/fixtures/hammer2/`: its figures are checked against the
//! library (an independent reading of the same image) and, where noted,
//! against numbers DragonFly's own tools printed for the image.

use bufcache::FileDevice;
use hammer2::chain;
use hammer2::disk::{BlockrefType, DIRHASH_LOMASK};
use hammer2::pfs::{pfs_list, read_inode, Pfs};
use hammer2::Volume;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, OnceLock};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures/hammer2");
const BIN: &str = env!("CARGO_BIN_EXE_hammer2");

fn scratch() -> PathBuf {
    let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hammer2-cli");
    std::fs::create_dir_all(&p).expect("create scratch dir");
    p
}

/// Decompress `src` (zstd) into `dst`, leaving zero runs as holes.
fn restore_sparse(src: &Path, dst: &Path) -> std::io::Result<()> {
    let mut dec = zstd::stream::read::Decoder::new(File::open(src)?)?;
    let mut out = File::create(dst)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = dec.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        for chunk in buf[..filled].chunks(65536) {
            if chunk.iter().all(|&b| b == 0) {
                out.seek(SeekFrom::Current(chunk.len() as i64))?;
            } else {
                out.write_all(chunk)?;
            }
            len += chunk.len() as u64;
        }
    }
    out.set_len(len)?;
    Ok(())
}

/// Fixture `name`, restored once (kept across runs in the target dir,
/// redone when the fixture is newer; written under a temporary name and
/// renamed, so a partial restore is never reused).
fn fixture(name: &str) -> PathBuf {
    static LOCK: OnceLock<Mutex<()>> = OnceLock::new();
    let _guard = LOCK
        .get_or_init(|| Mutex::new(()))
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let dst = scratch().join(format!("{name}.img"));
    let src = Path::new(FIXTURES).join(format!("{name}.img.zst"));
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let stale = match (modified(&src), modified(&dst)) {
        (Some(s), Some(d)) => s > d,
        _ => true,
    };
    if stale {
        let tmp = scratch().join(format!("{name}.img.part{}", std::process::id()));
        restore_sparse(&src, &tmp).expect("restore fixture");
        std::fs::rename(&tmp, &dst).expect("rename restored fixture");
    }
    dst
}

fn fixture_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(FIXTURES)
        .expect("fixture dir")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".img.zst"))
                .map(str::to_string)
        })
        .collect();
    names.sort();
    assert!(names.len() >= 9, "fixtures missing: {names:?}");
    names
}

fn run<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(BIN).args(args).output().expect("run hammer2")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn open(path: &Path) -> Arc<Volume> {
    let dev = FileDevice::open(path, false).expect("open image");
    Arc::new(Volume::open(Arc::new(dev)).expect("open volume"))
}

/// Blockref entries `show` printed, by type name.
fn show_counts(text: &str) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let t = line.trim_start();
        let Some((head, _)) = t.split_once(' ') else {
            continue;
        };
        let Some((ty, idx)) = head.split_once('.') else {
            continue;
        };
        if idx.parse::<u32>().is_ok() && ty.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            *counts.entry(ty.to_string()).or_insert(0) += 1;
        }
    }
    counts
}

/// Inodes and directory entries the library finds: the super-root, and
/// in each PFS its root, the inodes of its index and every directory's
/// entries.
fn library_counts(vol: &Arc<Volume>) -> (u64, u64) {
    let mut inodes = 1; // the super-root
    let mut dirents = 0;
    for info in pfs_list(vol).expect("pfs list") {
        let pfs = Pfs::open(vol.clone(), &info.label).expect("open pfs");
        inodes += 1;
        dirents += pfs.readdir(&pfs.root).expect("readdir root").len() as u64;
        let index = chain::collect(vol, &pfs.root.blockset(), 0, u64::MAX).expect("index");
        for br in index.iter().filter(|b| b.btype == BlockrefType::Inode) {
            inodes += 1;
            let ino = read_inode(vol, br).expect("inode");
            if ino.is_dir() {
                dirents += pfs.readdir(&ino).expect("readdir").len() as u64;
            }
        }
    }
    (inodes, dirents)
}

#[test]
fn show_counts_match_the_library_on_every_fixture() {
    for name in fixture_names() {
        let img = fixture(&name);
        let out = run([OsStr::new("show"), img.as_os_str()]);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", stdout(&out));
        let text = stdout(&out);
        let counts = show_counts(&text);
        let (inodes, dirents) = library_counts(&open(&img));
        assert_eq!(counts.get("inode").copied().unwrap_or(0), inodes, "{name}");
        assert_eq!(
            counts.get("dirent").copied().unwrap_or(0),
            dirents,
            "{name}"
        );
        assert!(
            !text.contains("failed") && !text.contains("(error"),
            "{name}"
        );
        // The walk covers both trees and closes them.
        assert!(text.contains("} (volume."), "{name}");
        assert!(
            text.trim_end().ends_with(")") && text.contains("} (freemap."),
            "{name}"
        );
    }
}

#[test]
fn show_counts_match_reference_fsck() {
    // DragonFly's fsck_hammer2 (both the C and the Rust port) on
    // v1-lz4-xxhash64.img reports, for the volume topology:
    //   2344 blockref (1096 inode, 28 indirect, 127 data, 1093 dirent)
    // (`fsck_hammer2 -q v1-lz4-xxhash64.img`, section "volume", zone.0).
    let out = run([OsStr::new("show"), fixture("v1-lz4-xxhash64").as_os_str()]);
    assert_eq!(out.status.code(), Some(0));
    let c = show_counts(&stdout(&out));
    let get = |t: &str| c.get(t).copied().unwrap_or(0);
    assert_eq!(get("inode"), 1096);
    assert_eq!(get("indirect"), 28);
    assert_eq!(get("data"), 127);
    assert_eq!(get("dirent"), 1093);
    assert_eq!(
        get("inode") + get("indirect") + get("data") + get("dirent"),
        2344
    );
    // The freemap tree of a 2 GiB image: one leaf straight in the header.
    assert_eq!(get("freemap_leaf"), 1);
}

#[test]
fn show_line_format_is_dragonfly_s() {
    let out = run([OsStr::new("show"), fixture("v1-lz4-xxhash64").as_os_str()]);
    let text = stdout(&out);
    // Lines as DragonFly's hammer2 show prints them for this image.
    for want in [
        "volume.0     0000000000000010 0000000000000000/0  ",
        "  inode.0      0000000008911c0a 0000000000000000/0  ",
        "               meth=xxhash64|autozero:default xxh=543ede946d3ea6dc {",
        "    filename \"SUPROOT\"",
        "      pfs_type 6 (MASTER)",
        "              data.0       0000000008c00010 0000000000000000/16 ",
        "  } (inode.0, \"SUPROOT\")",
        "} (volume.0)",
        "freemap.0    0000000000000010 0000000000000000/0  ",
        "  freemap_leaf.0   000000000001000f 0000000000000000/30 ",
    ] {
        assert!(text.lines().any(|l| l == want), "missing line {want:?}");
    }
}

#[test]
fn corrupt_data_block_is_flagged_and_walk_finishes() {
    let src = fixture("v1-lz4-xxhash64");
    let img = scratch().join(format!("corrupt-{}.img", std::process::id()));
    {
        // A sparse copy, then 4 bytes overwritten inside data block
        // 0x8c00000 (64 KiB, the first block of the 5 MiB text file).
        let mut input = File::open(&src).unwrap();
        let len = input.metadata().unwrap().len();
        let mut out = File::create(&img).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut pos = 0;
        while pos < len {
            input.read_exact(&mut buf).unwrap();
            if buf.iter().any(|&b| b != 0) {
                out.seek(SeekFrom::Start(pos)).unwrap();
                out.write_all(&buf).unwrap();
            }
            pos += buf.len() as u64;
        }
        out.set_len(len).unwrap();
        out.seek(SeekFrom::Start(0x8c0_0100)).unwrap();
        out.write_all(&[0xde, 0xad, 0xbe, 0xef]).unwrap();
    }
    let out = run([OsStr::new("show"), img.as_os_str()]);
    std::fs::remove_file(&img).ok();
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim_start().starts_with("data.0       0000000008c00010 "))
        .expect("the damaged block is listed");
    assert!(
        lines[at + 2].contains("failed"),
        "no failure marker: {:?}",
        &lines[at..at + 3]
    );
    assert_eq!(text.matches("failed)").count(), 1);
    // Everything else is still there.
    let c = show_counts(&text);
    assert_eq!(c.get("data").copied(), Some(127));
    assert_eq!(c.get("inode").copied(), Some(1096));
    assert!(text.trim_end().ends_with("} (freemap.0)"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("0000000008c00010"), "{err}");
}

#[test]
fn pfs_list_marks_the_snapshot() {
    let out = run([OsStr::new("pfs-list"), fixture("v1-snapshot").as_os_str()]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    let rows: Vec<(String, String)> = text
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_string(), f[2].to_string())
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("MASTER".to_string(), "DATA".to_string()),
            ("MASTER".to_string(), "LOCAL".to_string()),
            ("SNAPSHOT".to_string(), "SNAP1".to_string()),
        ]
    );
    assert!(text.starts_with("Type        ClusterId (pfs_clid)"));
    // The cluster ids are the PFS roots' pfs_clid.
    let vol = open(&fixture("v1-snapshot"));
    for p in pfs_list(&vol).unwrap() {
        let clid = p.root.meta().pfs_clid.to_string();
        assert!(text
            .lines()
            .any(|l| l.contains(&clid) && l.ends_with(&p.label)));
    }
    // -s names the image as well.
    let img = fixture("v1-snapshot");
    let again = run([OsStr::new("-s"), img.as_os_str(), OsStr::new("pfs-list")]);
    assert_eq!(again.stdout, out.stdout);
}

#[test]
fn hash_gives_the_keys_the_dirents_carry() {
    let vol = open(&fixture("v1-lz4-xxhash64"));
    let pfs = Pfs::open(vol.clone(), "DATA").unwrap();
    let mut entries = pfs.readdir(&pfs.root).unwrap();
    // The root's odd names, and the thousand-entry directory, where
    // hash collisions are likeliest.
    let big = pfs.resolve("/big").unwrap();
    entries.extend(pfs.readdir(&big).unwrap());
    assert!(entries.len() > 1000);
    // "--": names such as "-leading-dash" are not options.
    let mut args = vec![OsStr::new("hash"), OsStr::new("--")];
    args.extend(entries.iter().map(|e| OsStr::from_bytes(&e.name)));
    let out = run(args);
    assert_eq!(out.status.code(), Some(0));
    let lines: Vec<&[u8]> = out.stdout.split(|&b| b == b'\n').collect();
    for (e, line) in entries.iter().zip(lines) {
        let (hex, name) = line.split_at(16);
        let hash = u64::from_str_radix(std::str::from_utf8(hex).unwrap(), 16).unwrap();
        assert_eq!(&name[1..], &e.name[..]);
        // The stored key is the hash plus the collision counter.
        assert_eq!(e.key & !DIRHASH_LOMASK, hash, "{:?}", e.name);
    }
    // DragonFly's format: "%016jx %s".
    let one = run(["hash", "hello.txt"]);
    assert_eq!(stdout(&one), "d6e8905688708000 hello.txt\n");
}

#[test]
fn volhdr_shows_version_and_copies() {
    for (name, version, copies) in [
        ("v1-lz4-xxhash64", 1, 1),
        ("v2-lz4-xxhash64", 2, 1),
        ("newfs-v1-empty", 1, 1),
        ("newfs-v2-empty", 2, 1),
        ("v1-4headers-10g", 1, 4),
    ] {
        let out = run([OsStr::new("volhdr"), fixture(name).as_os_str()]);
        assert_eq!(out.status.code(), Some(0), "{name}");
        let text = stdout(&out);
        assert!(
            text.lines()
                .any(|l| l == format!("    version        {version}")),
            "{name}"
        );
        let summaries: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("Volume 0 header "))
            .filter(|l| l.contains(": mirror_tid="))
            .collect();
        assert_eq!(summaries.len(), copies, "{name}: {summaries:?}");
        assert_eq!(
            summaries.iter().filter(|l| l.ends_with("(in use)")).count(),
            1
        );
        for crc in ["icrc_sects[6]", "icrc_sects[7]", "icrc_volhdr"] {
            let line = text
                .lines()
                .find(|l| l.trim_start().starts_with(crc))
                .unwrap();
            assert!(line.ends_with("(OK)"), "{name}: {line}");
        }
    }
    // The 10 GiB image's newest copy (mirror_tid 0x11) is header 1, as
    // the reference fsck found.
    let out = run([OsStr::new("volhdr"), fixture("v1-4headers-10g").as_os_str()]);
    assert!(stdout(&out).contains("Volume 0 header 1: mirror_tid=0000000000000011 (in use)"));
    assert!(stdout(&out).contains("\nVolume 0 header 1 {\n"));
}

#[test]
fn freemap_lists_every_bmap_entry_and_totals() {
    let out = run([
        OsStr::new("freemap"),
        fixture("v1-lz4-xxhash64").as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    let rows = text
        .lines()
        .filter(|l| l.trim_start().contains(" linear="))
        .count();
    assert_eq!(rows, 256);
    // The totals DragonFly's `hammer2 freemap` (Rust port) printed for
    // this image.
    assert!(text.contains("Total unallocated storage:    0.861GB ( 0.860GB in 64KB chunks)"));
    assert!(text.contains("Total freemap storage:        1.000GB"));
}

#[test]
fn info_reports_each_pfs() {
    let out = run([OsStr::new("info"), fixture("v1-lz4-xxhash64").as_os_str()]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(text.contains("    PFS \"DATA\""));
    assert!(text.contains("    PFS \"LOCAL\""));
    assert!(text.contains("        inode_count  1093"));
    assert!(text.contains("        data_count   6500352"));
    assert!(text.contains("    version        1"));
}

#[test]
fn errors_and_usage() {
    let out = run(["show", "/nonexistent/image"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/image"));
    // Not a HAMMER2 image.
    let junk = scratch().join(format!("junk-{}.img", std::process::id()));
    std::fs::write(&junk, vec![0u8; 8 << 20]).unwrap();
    for verb in ["show", "volhdr", "freemap", "pfs-list", "info"] {
        let out = run([OsStr::new(verb), junk.as_os_str()]);
        assert_eq!(out.status.code(), Some(1), "{verb}");
        assert!(!out.stderr.is_empty(), "{verb}");
    }
    std::fs::remove_file(&junk).ok();
    assert_eq!(run(["show"]).status.code(), Some(2));
    assert_eq!(run(["hash"]).status.code(), Some(2));
    assert_eq!(run(["frobnicate", "x"]).status.code(), Some(2));
}
