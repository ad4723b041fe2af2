//! Names and paths the tools are given: a PFS label or snapshot name is
//! held to one rule wherever it is made (mkfs.hammer2 -L, pfs-create,
//! snapshot), so every PFS can be named as `IMG@LABEL`; an image whose
//! file name holds an `@` is named whole; a path that is neither a
//! hammer2 mount nor an image is called that, not "Is a directory".

use hammer2::pfs::pfs_list;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

/// `names-cli-TAG` under cargo's test temp dir, emptied first.
fn scratch(tag: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("names-cli-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn mkfs(args: &[&str], img: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mkfs-hammer2"))
        .args(args)
        .arg(img)
        .output()
        .unwrap()
}

fn hammer2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hammer2"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A new 1 GiB image at `img`, PFSs LOCAL and DATA.
fn new_image(img: &Path) {
    let out = mkfs(&["-s", "1G"], img);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

fn labels(img: &Path) -> Vec<String> {
    let dev = Arc::new(bufcache::FileDevice::open(img, false).unwrap());
    let vol = hammer2::Volume::open(dev).unwrap();
    let mut v: Vec<String> = pfs_list(&vol)
        .unwrap()
        .into_iter()
        .map(|p| p.label)
        .collect();
    v.sort();
    v
}

const BAD: [&str; 6] = ["a/b", "a@b", ".", "..", "a\nb", "tab\there"];

/// mkfs.hammer2 -L takes only labels `IMG@LABEL` can name (as
/// pfs-create): refused with exit 1, and no image is made.
#[test]
fn mkfs_refuses_labels_no_mount_could_name() {
    let dir = scratch("mkfs");
    for bad in BAD {
        let img = dir.join("x.img");
        let out = mkfs(&["-s", "1G", "-L", bad], &img);
        assert_eq!(out.status.code(), Some(1), "-L {bad:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("Volume label"), "{}", stderr(&out));
        assert!(!img.exists(), "-L {bad:?} made an image");
    }
    let img = dir.join("ok.img");
    let out = mkfs(&["-s", "1G", "-L", "a.b c"], &img);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(labels(&img), ["LOCAL", "a.b c"]);
}

/// Offline, the same rule for snapshot names and new PFSs; the image is
/// left as it was.
#[test]
fn snapshot_and_pfs_create_refuse_the_same_names() {
    let dir = scratch("offline");
    let img = dir.join("d.img");
    new_image(&img);
    let i = img.to_str().unwrap();
    for bad in BAD {
        let out = hammer2(&["snapshot", i, bad]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "snapshot {bad:?}: {}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("PFS label"), "{}", stderr(&out));
        let out = hammer2(&["pfs-create", i, bad]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "pfs-create {bad:?}: {}",
            stderr(&out)
        );
    }
    assert_eq!(labels(&img), ["DATA", "LOCAL"]);
}

/// An image whose file name holds an `@` is named whole; `@LABEL` after
/// it still picks a PFS.
#[test]
fn an_image_named_with_an_at_sign_is_found_whole() {
    let dir = scratch("at");
    let img = dir.join("mail@x.img");
    new_image(&img);
    let i = img.to_str().unwrap();
    let out = hammer2(&["snapshot", i, "S1"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = hammer2(&["snapshot", &format!("{i}@LOCAL"), "S2"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = hammer2(&["pfs-list", i]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(labels(&img), ["DATA", "LOCAL", "S1", "S2"]);
    let dev = Arc::new(bufcache::FileDevice::open(&img, false).unwrap());
    let vol = hammer2::Volume::open(dev).unwrap();
    let lsnap = |label: &str| {
        pfs_list(&vol)
            .unwrap()
            .into_iter()
            .find(|p| p.label == label)
            .map(|p| p.root.meta().pfs_lsnap_tid)
            .unwrap()
    };
    // Each snapshot's origin records it (pfs_lsnap_tid): S1 of DATA, S2
    // of LOCAL.
    assert_eq!(lsnap("S1"), lsnap("DATA"));
    assert_eq!(lsnap("S2"), lsnap("LOCAL"));
    assert_ne!(lsnap("S1"), lsnap("S2"));
}

/// Every verb given a directory on no mount.hammer2 says it is not a
/// hammer2 mount; a file that is not an image is called that.
#[test]
fn paths_that_are_neither_a_mount_nor_an_image_are_named_so() {
    let dir = scratch("paths");
    let d = dir.to_str().unwrap();
    let verbs: [&[&str]; 10] = [
        &["snapshot", d],
        &["snapshot", d, "X"],
        &["setcomp", "lz4", d],
        &["setcheck", "xxhash64", d],
        &["pfs-create", d, "X"],
        &["pfs-delete", d, "X"],
        &["bulkfree", d],
        &["info", d],
        &["show", d],
        &["pfs-list", d],
    ];
    for args in verbs {
        let out = hammer2(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("not a hammer2 mount"),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains("Is a directory"), "{args:?}");
    }
    let text = dir.join("text");
    std::fs::write(&text, vec![b'x'; 1 << 20]).unwrap();
    let t = text.to_str().unwrap();
    for args in [
        &["snapshot", t][..],
        &["info", t],
        &["setcomp", "lz4", t],
        &["bulkfree", t],
    ] {
        let out = hammer2(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("no volume header"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let out = hammer2(&["info", "/dev/null"]);
    assert!(
        stderr(&out).contains("not a HAMMER2 image"),
        "{}",
        stderr(&out)
    );
}
