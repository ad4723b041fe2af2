//! The `hammer2` verbs that write (snapshot, pfs-create, pfs-delete,
//! bulkfree) on copies of the reference images: what they print, what
//! they refuse, what the image holds afterwards (read back through the
//! library), and fsck after every step. Bulkfree's figures on the
//! fixture are the ones DragonFly's own bulkfree printed for it
//! (14 blocks staged, then 14 freed).

use bufcache::FileDevice;
use hammer2::disk::pfs_subtype;
use hammer2::fsck::{fsck, Options};
use hammer2::pfs::{pfs_list, Pfs};
use hammer2::Volume;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures/hammer2");
const BIN: &str = env!("CARGO_BIN_EXE_hammer2");

/// A fresh sparse copy of fixture `name` for test `tag`.
fn fixture_copy(name: &str, tag: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hammer2-admin-cli");
    std::fs::create_dir_all(&dir).unwrap();
    let dst = dir.join(format!("{tag}.img"));
    let src = Path::new(FIXTURES).join(format!("{name}.img.zst"));
    let mut dec = zstd::stream::read::Decoder::new(File::open(src).unwrap()).unwrap();
    let mut out = File::create(&dst).unwrap();
    let mut buf = vec![0u8; 65536];
    let mut len = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = dec.read(&mut buf[filled..]).unwrap();
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        if buf[..filled].iter().all(|&b| b == 0) {
            out.seek(SeekFrom::Current(filled as i64)).unwrap();
        } else {
            out.write_all(&buf[..filled]).unwrap();
        }
        len += filled as u64;
    }
    out.set_len(len).unwrap();
    dst
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run hammer2")
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "hammer2 {args:?}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(args: &[&str], why: &str) {
    let o = run(args);
    assert_eq!(o.status.code(), Some(1), "hammer2 {args:?} should fail");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(why), "hammer2 {args:?}: {err}");
}

fn volume(path: &Path) -> Arc<Volume> {
    let dev = Arc::new(FileDevice::open(path, false).unwrap());
    Arc::new(Volume::open(dev).unwrap())
}

fn fsck_clean(path: &Path) {
    let dev = Arc::new(FileDevice::open(path, false).unwrap());
    let r = fsck(dev, Options::default()).unwrap();
    let p: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
    assert!(p.is_empty(), "{}: {}", path.display(), p.join("\n"));
}

fn labels(path: &Path) -> Vec<String> {
    let mut l: Vec<String> = pfs_list(&volume(path))
        .unwrap()
        .into_iter()
        .map(|p| p.label)
        .collect();
    l.sort();
    l
}

#[test]
fn snapshot_names_and_reads_back() {
    let img = fixture_copy("v1-lz4-xxhash64", "snapshot");
    let s = img.to_str().unwrap();
    let out = ok(&["snapshot", &format!("{s}@DATA")]);
    let name = out
        .trim()
        .strip_prefix("created snapshot ")
        .unwrap()
        .to_string();
    let stamp = name.strip_prefix("DATA.").unwrap();
    assert!(
        stamp.len() == 15
            && stamp.as_bytes()[8] == b'.'
            && stamp.bytes().filter(u8::is_ascii_digit).count() == 14,
        "{name}"
    );
    ok(&["snapshot", s, "SNAP1"]); // DATA by default
    ok(&["-s", &format!("{s}@LOCAL"), "snapshot", "LOCALSNAP"]);
    fails(&["snapshot", &format!("{s}@DATA"), "SNAP1"], "exists");
    fails(&["snapshot", &format!("{s}@NOPE"), "X"], "not found");
    fsck_clean(&img);
    let vol = volume(&img);
    let list = pfs_list(&vol).unwrap();
    for label in [name.as_str(), "SNAP1", "LOCALSNAP"] {
        let p = list.iter().find(|p| p.label == label).unwrap();
        assert_eq!(p.root.meta().pfs_subtype, pfs_subtype::SNAPSHOT);
    }
    let origin = Pfs::open(vol.clone(), "DATA").unwrap();
    let snap = Pfs::open(vol.clone(), "SNAP1").unwrap();
    for path in ["text_5m.txt", "big/entry_00003_2fa193b6", "UPPER.lower"] {
        let (a, b) = (origin.resolve(path).unwrap(), snap.resolve(path).unwrap());
        assert_eq!(origin.read_all(&a).unwrap(), snap.read_all(&b).unwrap());
    }
    let listing = ok(&["pfs-list", s]);
    assert!(
        listing.contains("SNAPSHOT") && listing.contains("SNAP1"),
        "{listing}"
    );
}

#[test]
fn pfs_create_and_delete() {
    let img = fixture_copy("newfs-v2-empty", "pfs");
    let s = img.to_str().unwrap();
    assert_eq!(
        ok(&["pfs-create", s, "NEW"]).trim(),
        "hammer2: pfs_create(NEW): SUCCESS"
    );
    fails(&["pfs-create", s, "NEW"], "exists");
    fails(&["pfs-create", s, "a/b"], "label");
    assert_eq!(labels(&img), ["DATA", "LOCAL", "NEW"]);
    fsck_clean(&img);
    for l in ["NEW", "DATA"] {
        assert_eq!(
            ok(&["pfs-delete", s, l]).trim(),
            format!("hammer2: pfs_delete({l}): SUCCESS")
        );
        fsck_clean(&img);
    }
    fails(&["pfs-delete", s, "NOPE"], "not found");
    fails(&["pfs-delete", s, "LOCAL"], "last PFS");
    assert_eq!(labels(&img), ["LOCAL"]);
}

#[test]
fn bulkfree_frees_what_dragonfly_frees() {
    let img = fixture_copy("v1-snapshot", "bulkfree");
    let s = img.to_str().unwrap();
    let out = ok(&["bulkfree", s]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("before  free"), "{out}");
    assert!(lines[lines.len() - 2].starts_with("after   free"), "{out}");
    assert_eq!(
        *lines.last().unwrap(),
        "freed 224.00KB (229376 bytes), 0.00B staged for the next pass"
    );
    let count = |what: &str| -> Vec<u64> {
        lines
            .iter()
            .filter_map(|l| l.trim().strip_prefix(what))
            .map(|n| n.trim().parse().unwrap())
            .collect()
    };
    assert_eq!(count("transition->staged"), [14, 0], "{out}");
    assert_eq!(count("transition->free"), [0, 14], "{out}");
    fsck_clean(&img);
    let info = ok(&["info", s]);
    assert!(
        !info.contains("bulkfree_tid   0x0000000000000000"),
        "{info}"
    );
    // Nothing left to do.
    let again = ok(&["bulkfree", "--single-pass", s]);
    assert!(again.contains("transition->staged 0"), "{again}");
    assert_eq!(again.matches("bulkfree pass").count(), 1, "{again}");
    fsck_clean(&img);
    // Deleting the snapshot frees nothing here: DragonFly's destroy of
    // text_5m.txt in DATA left its inode (an orphan) in DATA's index, and
    // SNAP1's root inode shares its 16 KiB block with live inodes.
    ok(&["pfs-delete", s, "SNAP1"]);
    let out = ok(&["bulkfree", s]);
    assert_eq!(out.matches("transition->free   0").count(), 2, "{out}");
    fsck_clean(&img);
}

#[test]
fn setcomp_and_setcheck_offline() {
    let img = fixture_copy("v1-lz4-xxhash64", "setmethods");
    let s = img.to_str().unwrap();
    let before = Pfs::open(volume(&img), "DATA").unwrap();
    let big = before.resolve("big").unwrap();
    let entries = before.readdir(&big).unwrap().len();
    let root_comp = before.root.meta().comp_algo;
    drop(before);

    let target = format!("{s}@DATA:/big");
    let o = run(&["setcomp", "-r", "zstd:5", &target]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("DragonFly BSD cannot read"), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), entries + 1, "{out}");
    assert_eq!(lines[0], format!("{target}\tcomp_algo=0x58"));
    assert!(lines[1..]
        .iter()
        .all(|l| l.starts_with(&format!("{target}/")) && l.ends_with("\tcomp_algo=0x58")));
    let o = run(&["setcheck", "blake3", &format!("{s}:/text_5m.txt")]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("DragonFly BSD cannot read"));
    // No warning for DragonFly's own methods.
    let o = run(&["setcomp", "zlib:9", &format!("{s}@DATA:/UPPER.lower")]);
    assert!(o.status.success() && o.stderr.is_empty());
    fails(&["setcomp", "brotli", s], "unknown compression method");
    fails(&["setcheck", "freemap", s], "unknown check method");
    fails(&["setcomp", "lz4", &format!("{s}:/nope")], "no such file");
    fsck_clean(&img);

    let pfs = Pfs::open(volume(&img), "DATA").unwrap();
    assert_eq!(pfs.root.meta().comp_algo, root_comp);
    let big = pfs.resolve("big").unwrap();
    assert_eq!(big.meta().comp_algo, 0x58);
    for e in pfs.readdir(&big).unwrap() {
        assert_eq!(pfs.inode(e.inum).unwrap().meta().comp_algo, 0x58);
    }
    let t = pfs.resolve("text_5m.txt").unwrap();
    assert_eq!(t.meta().check_algo, 8);
    assert_eq!(pfs.resolve("UPPER.lower").unwrap().meta().comp_algo, 0x93);
}
