//! Damage one block of a reference image at a time: fsck reports it at
//! its image offset and exits 4; reading the damaged object fails with a
//! check error naming the inode and offset, while everything else still
//! reads; one bad volume header copy of four still leaves the image
//! usable.

use hammer2::chain;
use hammer2::disk::BlockrefType;
use hammer2::fsck::{fsck, Options};
use hammer2::{Error, Pfs};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use tests::*;

const IMG: &str = "v1-lz4-xxhash64";

fn fsck_report(path: &Path) -> hammer2::fsck::Report {
    let dev: Arc<dyn bufcache::BlockDevice> =
        Arc::new(bufcache::FileDevice::open(path, false).unwrap());
    fsck(dev, Options::default()).unwrap()
}

/// fsck.hammer2 exits 4 and prints the offset.
fn assert_cli_reports(path: &Path, offset: u64) {
    let out = Command::new(bin_path("fsck-hammer2"))
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(
        text.contains(&format!("{offset:#014x}")),
        "offset {offset:#x} not in:\n{text}"
    );
}

/// Everything in the manifest except `skip` still reads and matches.
fn rest_still_reads(path: &Path, skip: &[&str]) {
    let vol = open_volume(path).unwrap();
    let pfs = Pfs::open(vol, "DATA").unwrap();
    let want = manifest(IMG).remove("DATA").unwrap();
    let mut checked = 0;
    for (p, entry) in &want {
        if skip
            .iter()
            .any(|s| p == s || p.starts_with(&format!("{s}/")))
        {
            continue;
        }
        let ino = pfs.resolve(p).unwrap_or_else(|e| panic!("{p}: {e}"));
        if entry["type"] == "file" {
            let data = pfs.read_all(&ino).unwrap_or_else(|e| panic!("{p}: {e}"));
            assert_eq!(entry["sha256"], sha256_hex(&data), "{p}");
            checked += 1;
        }
    }
    assert!(checked > 1000, "only {checked} files checked");
}

fn data_brefs(pfs: &Pfs, path: &str) -> Vec<hammer2::disk::Blockref> {
    let ino = pfs.resolve(path).unwrap();
    chain::collect(pfs.volume(), &ino.blockset(), 0, u64::MAX).unwrap()
}

#[test]
fn flipped_data_block() {
    let path = fixture_copy(IMG, "corrupt-data");
    let pfs = Pfs::open(open_volume(&path).unwrap(), "DATA").unwrap();
    let ino = pfs.resolve("rand_65536.bin").unwrap();
    let br = data_brefs(&pfs, "rand_65536.bin")[0];
    assert_eq!(br.btype, BlockrefType::Data);
    let at = br.data_off.offset();
    flip_byte(&path, at + 100);

    let r = fsck_report(&path);
    assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
    assert_eq!(r.problems[0].at, Some(at));
    assert_eq!(r.problems[0].inum, Some(ino.inum()));
    assert_eq!(r.problems[0].path.as_deref(), Some("rand_65536.bin"));
    assert_cli_reports(&path, at);

    let pfs = Pfs::open(open_volume(&path).unwrap(), "DATA").unwrap();
    match pfs.read_all(&ino) {
        Err(Error::CheckMismatch { at: a, place, .. }) => {
            assert_eq!(a, at);
            assert_eq!(place.inum, Some(ino.inum()));
            assert_eq!(place.key, Some(0));
        }
        other => panic!("expected a check mismatch, got {other:?}"),
    }
    rest_still_reads(&path, &["rand_65536.bin"]);
}

#[test]
fn flipped_inode() {
    let path = fixture_copy(IMG, "corrupt-inode");
    let pfs = Pfs::open(open_volume(&path).unwrap(), "DATA").unwrap();
    let ino = pfs.resolve("mode640").unwrap();
    let at = ino.bref.data_off.offset();
    flip_byte(&path, at + 0x54); // the mode field

    let r = fsck_report(&path);
    assert!(!r.problems.is_empty());
    assert!(
        r.problems
            .iter()
            .any(|p| p.at == Some(at) && p.what.contains("check code")),
        "{:?}",
        r.problems
    );
    assert_cli_reports(&path, at);

    let pfs = Pfs::open(open_volume(&path).unwrap(), "DATA").unwrap();
    assert!(matches!(pfs.resolve("mode640"), Err(Error::CheckMismatch { at: a, .. }) if a == at));
    rest_still_reads(&path, &["mode640"]);
}

#[test]
fn flipped_indirect_block() {
    let path = fixture_copy(IMG, "corrupt-indirect");
    let pfs = Pfs::open(open_volume(&path).unwrap(), "DATA").unwrap();
    let ino = pfs.resolve("rand_1048583.bin").unwrap();
    let ind = ino
        .blockset()
        .into_iter()
        .find(|b| b.btype == BlockrefType::Indirect)
        .expect("an indirect block");
    let at = ind.data_off.offset();
    flip_byte(&path, at + 7);

    let r = fsck_report(&path);
    assert!(
        r.problems
            .iter()
            .any(|p| p.at == Some(at) && p.inum == Some(ino.inum())),
        "{:?}",
        r.problems
    );
    assert_cli_reports(&path, at);

    let pfs = Pfs::open(open_volume(&path).unwrap(), "DATA").unwrap();
    let ino = pfs.resolve("rand_1048583.bin").unwrap();
    assert!(matches!(pfs.read_all(&ino), Err(Error::CheckMismatch { at: a, .. }) if a == at));
    rest_still_reads(&path, &["rand_1048583.bin"]);
}

#[test]
fn flipped_long_name_dirent_block() {
    let long = "c".repeat(100);
    let path = fixture_copy(IMG, "corrupt-dirent");
    let pfs = Pfs::open(open_volume(&path).unwrap(), "DATA").unwrap();
    let (beg, end) = hammer2::dirhash::dirhash_range(long.as_bytes());
    let brefs = chain::collect(pfs.volume(), &pfs.root.blockset(), beg, end).unwrap();
    let br = brefs
        .iter()
        .find(|b| b.btype == BlockrefType::Dirent && b.dirent().namlen == 100)
        .unwrap();
    let at = br.data_off.offset();
    assert_eq!(br.data_off.bytes(), 1024);
    flip_byte(&path, at + 3);

    let r = fsck_report(&path);
    assert!(
        r.problems
            .iter()
            .any(|p| p.at == Some(at) && p.inum == Some(1)),
        "{:?}",
        r.problems
    );
    assert_cli_reports(&path, at);

    let pfs = Pfs::open(open_volume(&path).unwrap(), "DATA").unwrap();
    assert!(matches!(pfs.resolve(&long), Err(Error::CheckMismatch { at: a, .. }) if a == at));
    // Lookups of every other name still work (readdir of the root does
    // not, as it must read the damaged name).
    rest_still_reads(&path, &[long.as_str()]);
}

#[test]
fn one_of_four_volume_headers_damaged() {
    let pristine = open_volume(&fixture_image("v1-4headers-10g")).unwrap();
    assert_eq!(pristine.slots.len(), 4);
    let newest = pristine.header_index as u64;
    for copy in 0..4u64 {
        let path = fixture_copy("v1-4headers-10g", &format!("corrupt-vh{copy}"));
        let at = copy * (2 << 30);
        flip_byte(&path, at + 0x80);

        let r = fsck_report(&path);
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert_eq!(r.problems[0].at, Some(at));
        assert_eq!(r.stats.headers_good, 3);
        assert_cli_reports(&path, at);

        let vol = open_volume(&path).unwrap();
        assert_ne!(vol.header_index as u64, copy);
        if copy == newest {
            // The volume opens at the previous flush, which the other
            // copies still describe.
            assert!(vol.header.mirror_tid < pristine.header.mirror_tid);
            assert!(Pfs::open(vol, "DATA").is_ok());
        } else {
            assert_eq!(vol.header_index as u64, newest);
            let pfs = Pfs::open(vol, "DATA").unwrap();
            let ino = pfs.resolve("hello.txt").unwrap();
            let want = &manifest("v1-4headers-10g")["DATA"]["hello.txt"];
            assert_eq!(want["sha256"], sha256_hex(&pfs.read_all(&ino).unwrap()));
        }
    }
}
