//! A full disk: writes fail with NoSpace before the flush reserve is
//! touched, the flush still completes, the image stays fsck-clean, and
//! everything written before the failure is there after a remount.

use bufcache::{BlockDevice, MemDevice};
use hammer2::disk::ObjType;
use hammer2::fsck::{fsck, Options};
use hammer2::mount::{Mount, ROOT_INUM};
use hammer2::{Error, Pfs};
use std::sync::Arc;
use tests::sha256_hex;

const NOW: u64 = 1_800_000_000_000_000;

/// Incompressible bytes, different for every seed (so live dedup finds
/// nothing to share and the disk fills as the bytes say).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

#[test]
fn full_disk_fails_the_write_not_the_flush() {
    let dev = Arc::new(MemDevice::new(1 << 30));
    let opts = mkfs::newfs::NewfsOptions {
        now_us: Some(NOW),
        uuid_seed: Some(3),
        ..Default::default()
    };
    mkfs::newfs::newfs(dev.as_ref(), &opts).unwrap();
    let d: Arc<dyn BlockDevice> = dev.clone();
    let mut m = Mount::open(d.clone()).unwrap();
    let chunk = 1 << 20;
    let mut written: Vec<(String, String)> = Vec::new();
    let mut refused = None;
    'fill: for file in 0..10_000u64 {
        let name = format!("fill{file}");
        let f = m
            .create(
                "DATA",
                ROOT_INUM,
                name.as_bytes(),
                ObjType::Regfile,
                0o644,
                0,
                0,
                (0, 0),
                NOW,
            )
            .unwrap();
        let mut content = Vec::new();
        for part in 0..16u64 {
            let data = noise(file * 100 + part + 1, chunk);
            match m.write("DATA", f, part * chunk as u64, &data, NOW) {
                Ok(()) => content.extend_from_slice(&data),
                Err(e @ Error::NoSpace { .. }) => {
                    refused = Some(e);
                    written.push((name, sha256_hex(&content)));
                    break 'fill;
                }
                Err(e) => panic!("{name}: {e}"),
            }
        }
        written.push((name, sha256_hex(&content)));
        if file % 8 == 7 {
            m.flush().unwrap();
        }
    }
    assert!(refused.is_some(), "the disk never filled");
    // The flush always completes on a full disk.
    m.flush().unwrap();
    // Another attempt is refused cleanly too.
    let f = m.lookup("DATA", ROOT_INUM, b"fill0").unwrap().unwrap();
    assert!(matches!(
        m.write("DATA", f, 1 << 40, &noise(9, 1 << 20), NOW),
        Err(Error::NoSpace { .. })
    ));
    m.flush().unwrap();
    drop(m);
    clean_and_holding(&d, &written);
    eprintln!(
        "{} files written before the disk filled: {}",
        written.len(),
        refused.unwrap()
    );
}

/// A partial commit taken beside a flush whose batch holds the same
/// blocks writes them a second time; the room for that second copy is
/// admitted when the partial commit begins. On a volume with no room for
/// it, `fsync_begin` is refused with NoSpace, changing nothing, and the
/// flush's own writes (which admission promised) still find their room:
/// the flush commits, the partial commit then goes through with nothing
/// left to write twice, and the image is clean with every byte there.
/// Without the admission, the partial commit's copies (more than the
/// flush reserve) took room promised to the flush's blocks, and the
/// flush failed for space.
#[test]
fn a_partial_commit_beside_a_flush_is_refused_when_its_second_copies_have_no_room() {
    let dev = tests::new_fs_bytes(4, 512 << 20);
    let d: Arc<dyn BlockDevice> = dev.clone();
    let mut m = tests::open(&dev);
    let create = |m: &mut Mount, name: &str| {
        tests::create_file(m, "DATA", ROOT_INUM, name.as_bytes()).unwrap()
    };
    // File a: 48 MiB waiting for the flush; file b: as much more as
    // admission lets in, a block at a time, so nothing is left.
    let a = create(&mut m, "a");
    let a_data = noise(1, 48 << 20);
    m.write("DATA", a, 0, &a_data, NOW).unwrap();
    let b = create(&mut m, "b");
    let mut b_data = Vec::new();
    loop {
        let data = noise(2 + b_data.len() as u64, 65536);
        match m.write("DATA", b, b_data.len() as u64, &data, NOW) {
            Ok(()) => b_data.extend_from_slice(&data),
            Err(Error::NoSpace { .. }) => break,
            Err(e) => panic!("b: {e}"),
        }
    }
    assert!(
        b_data.len() > 64 << 20,
        "b holds only {} bytes",
        b_data.len()
    );
    let mut batch = m.flush_begin().unwrap();
    match m.fsync_begin("DATA", a) {
        Err(Error::NoSpace { .. }) => {}
        Err(e) => panic!("fsync_begin: {e}"),
        Ok(_) => panic!("a partial commit with no room for its second copies began"),
    }
    batch.write();
    m.flush_commit(batch).unwrap();
    let mut partial = m.fsync_begin("DATA", a).unwrap();
    partial.write();
    m.flush_commit(partial).unwrap();
    drop(m);
    clean_and_holding(
        &d,
        &[
            ("a".to_string(), sha256_hex(&a_data)),
            ("b".to_string(), sha256_hex(&b_data)),
        ],
    );
    // DragonFly's own fscks, where the suite has them (`H2_DFLY_FSCK`).
    tests::dragonfly_fsck(&dev, "dup-admission");
}

/// fsck finds the image clean, and each file (name, SHA-256) reads back.
fn clean_and_holding(d: &Arc<dyn BlockDevice>, files: &[(String, String)]) {
    let report = fsck(d.clone(), Options::default()).unwrap();
    let msgs: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
    assert!(report.is_clean(), "fsck: {}", msgs.join("\n"));
    let vol = Arc::new(hammer2::Volume::open(d.clone()).unwrap());
    let pfs = Pfs::open(vol, "DATA").unwrap();
    for (name, sum) in files {
        let ino = pfs.resolve(name).unwrap();
        assert_eq!(&sha256_hex(&pfs.read_all(&ino).unwrap()), sum, "{name}");
    }
}
