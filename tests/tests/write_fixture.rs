//! Fill a fresh image with a reference image's whole tree through the
//! write path, then delete, rename and overwrite part of it; after a
//! remount everything reads back as expected (the fixture's manifest,
//! edited the same way) and fsck is clean. `H2_KEEP=DIR` keeps the image
//! for checking with DragonFly's tools.

use bufcache::{BlockDevice, MemDevice};
use hammer2::disk::ObjType;
use hammer2::fsck::{fsck, Options};
use hammer2::mount::{Mount, RenameFlags, SetAttr, ROOT_INUM};
use hammer2::Pfs;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use tests::*;

const SRC: &str = "v1-lz4-xxhash64";
const NOW: u64 = 1_800_000_000_000_000;

/// Copy every entry of `src_dir` (read-only library) into `dst_dir`.
fn copy_tree(src: &Pfs, m: &mut Mount, src_dir: &hammer2::Inode, dst_dir: u64) {
    for e in src.readdir(src_dir).unwrap() {
        let ino = src.inode(e.inum).unwrap();
        let meta = ino.meta();
        let (uid, gid, mode) = (meta.uid_unix(), meta.gid_unix(), meta.mode);
        match ino.obj_type() {
            ObjType::Directory => {
                let d = m
                    .mkdir("DATA", dst_dir, &e.name, mode, uid, gid, NOW)
                    .unwrap();
                copy_tree(src, m, &ino, d);
                m.setattr(
                    "DATA",
                    d,
                    SetAttr {
                        mtime: Some(meta.mtime),
                        ..Default::default()
                    },
                    NOW,
                )
                .unwrap();
            }
            ObjType::Softlink => {
                let t = src.readlink(&ino).unwrap();
                m.symlink("DATA", dst_dir, &e.name, &t, uid, gid, NOW)
                    .unwrap();
            }
            _ => {
                let f = m
                    .create(
                        "DATA",
                        dst_dir,
                        &e.name,
                        ObjType::Regfile,
                        mode,
                        uid,
                        gid,
                        (0, 0),
                        NOW,
                    )
                    .unwrap();
                let mut off = 0;
                while off < meta.size {
                    let chunk = src.read(&ino, off, 1 << 20).unwrap();
                    m.write("DATA", f, off, &chunk, NOW).unwrap();
                    off += chunk.len() as u64;
                }
                m.setattr(
                    "DATA",
                    f,
                    SetAttr {
                        mtime: Some(meta.mtime),
                        ..Default::default()
                    },
                    NOW,
                )
                .unwrap();
            }
        }
    }
}

#[test]
fn fixture_tree_copied_edited_and_read_back() {
    let src_vol = open_volume(&fixture_image(SRC)).unwrap();
    let src = Pfs::open(src_vol, "DATA").unwrap();
    let dev = Arc::new(MemDevice::new(2 << 30));
    let opts = mkfs::newfs::NewfsOptions {
        now_us: Some(NOW),
        uuid_seed: Some(7),
        ..Default::default()
    };
    mkfs::newfs::newfs(dev.as_ref(), &opts).unwrap();
    let d: Arc<dyn BlockDevice> = dev.clone();
    let mut m = Mount::open(d.clone()).unwrap();
    copy_tree(&src, &mut m, &src.root, ROOT_INUM);
    m.flush().unwrap();

    let mut want: BTreeMap<String, Value> = manifest(SRC).remove("DATA").unwrap();
    // Delete a file, a whole directory tree's leaf, and a long name.
    let long = "c".repeat(100);
    for name in ["rand_65536.bin", long.as_str(), "zeros_3m.bin"] {
        m.unlink("DATA", ROOT_INUM, name.as_bytes(), NOW).unwrap();
        want.remove(name);
    }
    // Rename across directories.
    let big = m.lookup("DATA", ROOT_INUM, b"big").unwrap().unwrap();
    m.rename(
        "DATA",
        ROOT_INUM,
        b"text_5m.txt",
        big,
        b"moved.txt",
        RenameFlags::default(),
        NOW,
    )
    .unwrap();
    let e = want.remove("text_5m.txt").unwrap();
    want.insert("big/moved.txt".into(), e);
    // The directory that gained an entry has a new mtime.
    want.get_mut("big").unwrap()["mtime"] = Value::from(NOW / 1_000_000);
    // Overwrite the middle of a large file and shrink another.
    let f = m
        .lookup("DATA", ROOT_INUM, b"rand_1048583.bin")
        .unwrap()
        .unwrap();
    let mut content = m.read("DATA", f, 0, 2 << 20).unwrap();
    let patch = vec![0x5au8; 100_000];
    m.write("DATA", f, 300_000, &patch, NOW).unwrap();
    content[300_000..400_000].copy_from_slice(&patch);
    let g = m
        .lookup("DATA", ROOT_INUM, b"rand_300000.bin")
        .unwrap()
        .unwrap();
    let mut g_content = m.read("DATA", g, 0, 1 << 20).unwrap();
    m.setattr(
        "DATA",
        g,
        SetAttr {
            size: Some(70_001),
            mtime: Some(1_700_000_000_000_000),
            ..Default::default()
        },
        NOW,
    )
    .unwrap();
    g_content.truncate(70_001);
    m.setattr(
        "DATA",
        f,
        SetAttr {
            mtime: Some(1_700_000_000_000_000),
            ..Default::default()
        },
        NOW,
    )
    .unwrap();
    for (path, data) in [
        ("rand_1048583.bin", &content),
        ("rand_300000.bin", &g_content),
    ] {
        let e = want.get_mut(path).unwrap();
        e["size"] = Value::from(data.len());
        e["sha256"] = Value::from(sha256_hex(data));
    }
    m.flush().unwrap();
    drop(m);

    if let Ok(dir) = std::env::var("H2_KEEP") {
        save_sparse(
            dev.as_ref(),
            &std::path::Path::new(&dir).join("write-fixture.img"),
        );
    }
    let vol = Arc::new(hammer2::Volume::open(d.clone()).unwrap());
    let pfs = Pfs::open(vol, "DATA").unwrap();
    let have = describe_pfs(&pfs).unwrap();
    let diffs = diff_manifest(&want, &have);
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    let report = fsck(d, Options::default()).unwrap();
    let msgs: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
    assert!(msgs.is_empty(), "fsck: {}", msgs.join("\n"));
}

#[test]
fn fixture_image_changed_in_place_shows_the_change_after_remount() {
    for name in [
        "v1-lz4-xxhash64",
        "v2-lz4-xxhash64",
        "v1-zlib-iscsi32",
        "v1-snapshot",
    ] {
        let path = fixture_copy(name, &format!("rw-{name}"));
        let d: Arc<dyn BlockDevice> = Arc::new(bufcache::FileDevice::open(&path, true).unwrap());
        let mut m = Mount::open(d.clone()).unwrap();
        let f = m
            .create(
                "DATA",
                ROOT_INUM,
                b"added.txt",
                ObjType::Regfile,
                0o600,
                1000,
                1000,
                (0, 0),
                NOW,
            )
            .unwrap();
        let text: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
        m.write("DATA", f, 0, &text, NOW).unwrap();
        m.unlink("DATA", ROOT_INUM, b"mode600", NOW).unwrap();
        let big = m.lookup("DATA", ROOT_INUM, b"big").unwrap().unwrap();
        m.rename(
            "DATA",
            big,
            b"entry_00000_fd14ab02",
            ROOT_INUM,
            b"renamed",
            RenameFlags::default(),
            NOW,
        )
        .unwrap();
        m.flush().unwrap();
        drop(m);

        let vol = open_volume(&path).unwrap();
        let pfs = Pfs::open(vol, "DATA").unwrap();
        let added = pfs.resolve("added.txt").unwrap();
        assert_eq!(pfs.read_all(&added).unwrap(), text, "{name}");
        assert_eq!((added.meta().uid_unix(), added.meta().mode), (1000, 0o600));
        assert!(pfs.resolve("mode600").is_err());
        assert!(pfs.resolve("big/entry_00000_fd14ab02").is_err());
        let want = &manifest(name)["DATA"]["big/entry_00000_fd14ab02"];
        assert_eq!(
            want["sha256"],
            sha256_hex(&pfs.read_all(&pfs.resolve("renamed").unwrap()).unwrap())
        );
        let report = fsck(d, Options::default()).unwrap();
        let msgs: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
        assert!(report.is_clean(), "{name}: fsck: {}", msgs.join("\n"));
        if name == "v1-snapshot" {
            // The snapshot still shows the old state.
            let vol = open_volume(&path).unwrap();
            let snap = Pfs::open(vol, "SNAP1").unwrap();
            assert!(snap.resolve("mode600").is_ok());
            assert!(snap.resolve("added.txt").is_err());
        }
    }
}
