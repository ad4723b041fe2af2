//! fsck is clean on every reference image, and counts what DragonFly's
//! own fsck_hammer2 counts.

use hammer2::fsck::{fsck, Options, Report};
use std::sync::Arc;
use tests::*;

fn check(name: &str) -> Report {
    let dev: Arc<dyn bufcache::BlockDevice> =
        Arc::new(bufcache::FileDevice::open(&fixture_image(name), false).unwrap());
    fsck(dev, Options::default()).unwrap()
}

#[test]
fn every_fixture_is_clean() {
    for name in fixture_names() {
        let report = check(&name);
        let msgs: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
        assert!(
            report.is_clean(),
            "{name}: {} problems:\n{}",
            msgs.len(),
            msgs.join("\n")
        );
        assert_eq!(
            report.stats.headers_good, report.stats.headers_total,
            "{name}"
        );
    }
}

#[test]
fn counts_agree_with_dragonfly_fsck() {
    // DragonFly's fsck_hammer2 (both the C and the Rust port) prints for
    // this image: "2344 blockref (1096 inode, 28 indirect, 127 data,
    // 1093 dirent), 6.20MB".
    let s = check("v1-lz4-xxhash64").stats;
    assert_eq!(
        (s.inode, s.indirect, s.data, s.dirent),
        (1096, 28, 127, 1093)
    );
    assert_eq!(s.pfs, 2);
    let s = check("v1-4headers-10g").stats;
    assert_eq!(s.headers_total, 4);
}

#[test]
fn destroyed_entry_leaves_one_orphan_in_data_only() {
    // The fixture README: /text_5m.txt was destroyed in DATA after SNAP1
    // was taken, so DATA holds its inode without a directory entry.
    let r = check("v1-snapshot");
    assert!(r.is_clean());
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    assert_eq!(r.warnings[0].pfs.as_deref(), Some("DATA"));
    let data = open_volume(&fixture_image("v1-snapshot")).unwrap();
    let snap = hammer2::Pfs::open(data.clone(), "SNAP1").unwrap();
    let text = snap.resolve("text_5m.txt").unwrap();
    assert_eq!(Some(text.inum()), r.warnings[0].inum);
}
