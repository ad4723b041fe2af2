//! newfs against the images DragonFly's newfs_hammer2 made: the same
//! header fields, the same super-root and PFS root inodes, the same
//! blocks written, everything except UUIDs, times and the check codes
//! over them. Expected values are decoded from the fixtures.

use bufcache::{BlockDevice, MemDevice};
use hammer2::check::verify;
use hammer2::disk::{
    comp_method, Blockref, BlockrefType, InodeData, Uuid, VolumeHeader, INODE_BYTES, PBUFSIZE,
    ZONE_BYTES64,
};
use mkfs::newfs::{newfs, NewfsError, NewfsOptions, NewfsSummary, NEWFS_TID};
use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const GIB: u64 = 1 << 30;

fn fixture_dir() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates = [
        here.join("../../shared/fixtures/hammer2"),
        here.join("../shared/fixtures/hammer2"),
    ];
    for c in &candidates {
        if c.is_dir() {
            return c.clone();
        }
    }
    panic!("fixture images not found beside the project (looked in {candidates:?})");
}

/// A fixture image as a sparse MemDevice: only 64 KiB chunks that hold a
/// non-zero byte are kept. Decompression stops after `limit` bytes.
fn load_fixture(name: &str, size: u64, limit: u64) -> MemDevice {
    let path = fixture_dir().join(format!("{name}.img.zst"));
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let mut dec = zstd::stream::read::Decoder::new(file).unwrap();
    let dev = MemDevice::new(size);
    let mut chunk = vec![0u8; PBUFSIZE as usize];
    let mut at = 0u64;
    while at < limit.min(size) {
        dec.read_exact(&mut chunk).unwrap();
        if chunk.iter().any(|&b| b != 0) {
            dev.write_at(&chunk, at).unwrap();
        }
        at += PBUFSIZE;
    }
    dev
}

fn non_zero_chunks(dev: &MemDevice, limit: u64) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    let mut buf = vec![0u8; PBUFSIZE as usize];
    let mut at = 0;
    while at < limit.min(dev.size_bytes()) {
        dev.read_at(&mut buf, at).unwrap();
        if buf.iter().any(|&b| b != 0) {
            set.insert(at);
        }
        at += PBUFSIZE;
    }
    set
}

fn header_at(dev: &dyn BlockDevice, i: usize) -> VolumeHeader {
    let at = i as u64 * ZONE_BYTES64;
    let mut buf = vec![0u8; PBUFSIZE as usize];
    dev.read_at(&mut buf, at).unwrap();
    let vh = VolumeHeader::decode(&buf, at).unwrap();
    assert!(vh.crcs().all_good(), "header {i} CRCs");
    vh
}

fn without_check(br: &Blockref) -> Blockref {
    let mut b = *br;
    b.check = [0; 64];
    b
}

/// The header fields newfs decides, all of them except fsid and CRCs.
fn assert_header_like(mine: &VolumeHeader, theirs: &VolumeHeader) {
    assert_eq!(mine.magic, theirs.magic);
    assert_eq!(
        (mine.boot_beg, mine.boot_end, mine.aux_beg, mine.aux_end),
        (
            theirs.boot_beg,
            theirs.boot_end,
            theirs.aux_beg,
            theirs.aux_end
        ),
        "boot/aux"
    );
    assert_eq!(mine.volu_size, theirs.volu_size);
    assert_eq!(mine.version, theirs.version);
    assert_eq!(mine.flags, theirs.flags);
    assert_eq!(mine.copyid, theirs.copyid);
    assert_eq!(mine.freemap_version, theirs.freemap_version);
    assert_eq!(mine.peer_type, theirs.peer_type);
    assert_eq!(mine.volu_id, theirs.volu_id);
    assert_eq!(mine.nvolumes, theirs.nvolumes);
    assert_eq!(mine.fstype, theirs.fstype);
    assert_eq!(mine.allocator_size, theirs.allocator_size);
    assert_eq!(mine.allocator_free, theirs.allocator_free);
    assert_eq!(mine.allocator_beg, theirs.allocator_beg);
    assert_eq!(mine.mirror_tid, theirs.mirror_tid);
    assert_eq!(mine.freemap_tid, theirs.freemap_tid);
    assert_eq!(mine.bulkfree_tid, theirs.bulkfree_tid);
    assert_eq!(mine.total_size, theirs.total_size);
    assert_eq!(mine.copyexists, theirs.copyexists);
    assert_eq!(mine.icrc_sects[..6], theirs.icrc_sects[..6]);
    assert_eq!(mine.volu_loff, theirs.volu_loff);
    assert_eq!(mine.freemap_blockset, theirs.freemap_blockset);
    for (m, t) in mine.sroot_blockset.iter().zip(&theirs.sroot_blockset) {
        assert_eq!(without_check(m), without_check(t));
    }
    assert_ne!(mine.fsid, Uuid::NIL);
    // Reserved and copyinfo bytes: zero in both.
    let reserved = |vh: &VolumeHeader| {
        let r = vh.raw();
        let mut v = r[0x80..0x90].to_vec();
        v.extend_from_slice(&r[0xA0..0xC0]);
        v.extend_from_slice(&r[0x400..0x800]);
        v.extend_from_slice(&r[0xA00..0xE00]);
        v.extend_from_slice(&r[0x1000..0xFFFC]);
        v
    };
    assert_eq!(reserved(mine), reserved(theirs));
}

fn read_inode(dev: &dyn BlockDevice, br: &Blockref) -> InodeData {
    assert_eq!(br.btype, BlockrefType::Inode);
    assert_eq!(br.data_off.bytes(), INODE_BYTES as u64);
    let mut buf = vec![0u8; INODE_BYTES];
    dev.read_at(&mut buf, br.data_off.offset()).unwrap();
    verify(br, &buf).unwrap();
    InodeData::decode(&buf, br.data_off.offset()).unwrap()
}

/// Inode fields newfs decides: all but the four times and the PFS ids;
/// the times must all be one nonzero instant, as DragonFly stamps them.
fn assert_inode_like(mine: &InodeData, theirs: &InodeData) {
    let strip = |ino: &InodeData| {
        let mut i = ino.clone();
        let m = &mut i.meta;
        assert!(m.ctime != 0);
        assert_eq!([m.mtime, m.atime, m.btime], [m.ctime; 3], "times");
        m.ctime = 0;
        m.mtime = 0;
        m.atime = 0;
        m.btime = 0;
        assert_ne!(m.pfs_clid, Uuid::NIL);
        assert_ne!(m.pfs_fsid, Uuid::NIL);
        m.pfs_clid = Uuid::NIL;
        m.pfs_fsid = Uuid::NIL;
        let set = i.blockset().map(|b| without_check(&b));
        i.set_blockset(&set);
        i
    };
    assert_eq!(strip(mine), strip(theirs));
}

/// The whole tree newfs makes: super-root, then each PFS root.
fn assert_tree_like(mine: &dyn BlockDevice, theirs: &dyn BlockDevice) -> usize {
    let (vm, vt) = (header_at(mine, 0), header_at(theirs, 0));
    let (sm, st) = (
        read_inode(mine, &vm.sroot_blockset[0]),
        read_inode(theirs, &vt.sroot_blockset[0]),
    );
    assert_inode_like(&sm, &st);
    assert_eq!(sm.name(), b"SUPROOT");
    let mut pfs = 0;
    for (bm, bt) in sm.blockset().iter().zip(st.blockset().iter()) {
        if bt.is_empty() {
            assert!(bm.is_empty());
            continue;
        }
        assert_eq!(bm.mirror_tid, NEWFS_TID);
        let (im, it) = (read_inode(mine, bm), read_inode(theirs, bt));
        assert_inode_like(&im, &it);
        pfs += 1;
    }
    pfs
}

/// The project's fsck finds the image clean, with these PFSs.
fn assert_fsck_clean(dev: &Arc<MemDevice>, labels: &[&str]) {
    let report = hammer2::fsck::fsck(dev.clone(), hammer2::fsck::Options::default()).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert_eq!(report.mirror_tid, NEWFS_TID);
    let mut want: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
    let mut got = report.pfs_labels.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want);
}

fn make(size: u64, version: u32) -> (Arc<MemDevice>, NewfsSummary) {
    let dev = Arc::new(MemDevice::new(size));
    let opts = NewfsOptions {
        version,
        ..NewfsOptions::default()
    };
    let summary = newfs(&*dev, &opts).unwrap();
    assert_fsck_clean(&dev, &["LOCAL", "DATA"]);
    (dev, summary)
}

fn golden_2g(version: u32, fixture: &str) {
    let theirs = load_fixture(fixture, 2 * GIB, 2 * GIB);
    let (mine, summary) = make(2 * GIB, version);
    assert_header_like(&header_at(&*mine, 0), &header_at(&theirs, 0));
    assert_eq!(assert_tree_like(&*mine, &theirs), 2);
    let labels: Vec<&str> = summary.pfs.iter().map(|p| p.label.as_str()).collect();
    assert_eq!(labels, ["LOCAL", "DATA"]);
    // Nothing written besides: the same blocks hold data in both.
    assert_eq!(
        non_zero_chunks(&mine, 2 * GIB),
        non_zero_chunks(&theirs, 2 * GIB)
    );
}

#[test]
fn v1_2g_matches_dragonfly_newfs() {
    golden_2g(1, "newfs-v1-empty");
}

#[test]
fn v2_2g_matches_dragonfly_newfs() {
    golden_2g(2, "newfs-v2-empty");
}

#[test]
fn v1_10g_has_four_headers_like_dragonfly() {
    // The fixture was made by newfs_hammer2 and then written once through
    // the kernel code, which rotated into header 1; headers 0, 2 and 3
    // are still newfs's own.
    let limit = 3 * ZONE_BYTES64 + PBUFSIZE;
    let theirs = load_fixture("v1-4headers-10g", 10 * GIB, limit);
    let (mine, summary) = make(10 * GIB, 1);
    assert_eq!(summary.geometry.volhdr_count, 4);
    let first = header_at(&*mine, 0);
    for i in 0..4 {
        let (m, t) = (header_at(&*mine, i), header_at(&theirs, i));
        assert_eq!(m.raw(), first.raw(), "header copies are identical");
        if t.mirror_tid == NEWFS_TID {
            assert_header_like(&m, &t);
        } else {
            assert_eq!(
                (m.boot_beg, m.boot_end, m.aux_beg, m.aux_end),
                (t.boot_beg, t.boot_end, t.aux_beg, t.aux_end)
            );
            assert_eq!(m.volu_size, t.volu_size);
            assert_eq!(m.allocator_size, t.allocator_size);
            assert_eq!(m.allocator_beg, t.allocator_beg);
        }
    }
}

#[test]
fn too_small_is_an_error() {
    let dev = MemDevice::new(16 << 20);
    assert!(matches!(
        newfs(&dev, &NewfsOptions::default()),
        Err(NewfsError::NotEnoughSpace { .. })
    ));
    let dev = MemDevice::new(4 << 20);
    assert!(matches!(
        newfs(&dev, &NewfsOptions::default()),
        Err(NewfsError::DeviceTooSmall { .. })
    ));
    let opts = NewfsOptions {
        size_bytes: Some(GIB / 2),
        ..NewfsOptions::default()
    };
    assert!(matches!(
        newfs(&MemDevice::new(2 * GIB), &opts),
        Err(NewfsError::SizeTooSmall { .. })
    ));
}

#[test]
fn labels_none_and_boot() {
    // `-L none`: LOCAL alone.
    let dev = Arc::new(MemDevice::new(2 * GIB));
    let opts = NewfsOptions {
        labels: vec![],
        ..NewfsOptions::default()
    };
    let s = newfs(&*dev, &opts).unwrap();
    assert_fsck_clean(&dev, &["LOCAL"]);
    assert_eq!(s.pfs.len(), 1);
    let vh = header_at(&*dev, 0);
    assert_eq!(vh.allocator_beg, 0x840_0800);
    let sroot = read_inode(&*dev, &vh.sroot_blockset[0]);
    let set = sroot.blockset();
    assert_eq!(set[0].key, s.pfs[0].key);
    assert!(set[1..].iter().all(|b| b.is_empty()));

    // A BOOT PFS is never compressed; the others get the default.
    let dev = Arc::new(MemDevice::new(2 * GIB));
    let opts = NewfsOptions {
        labels: vec!["BOOT".into(), "ROOT".into(), "home".into()],
        ..NewfsOptions::default()
    };
    newfs(&*dev, &opts).unwrap();
    assert_fsck_clean(&dev, &["LOCAL", "BOOT", "ROOT", "home"]);
    let vh = header_at(&*dev, 0);
    let sroot = read_inode(&*dev, &vh.sroot_blockset[0]);
    let set = sroot.blockset();
    let mut keys = Vec::new();
    for br in &set {
        let ino = read_inode(&*dev, br);
        let want = if ino.name() == b"BOOT" {
            comp_method::AUTOZERO
        } else {
            comp_method::LZ4
        };
        assert_eq!(ino.meta.comp_algo, want);
        assert_eq!(ino.meta.name_key, br.key);
        keys.push(br.key);
    }
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "super-root blockset sorted by key");
}
