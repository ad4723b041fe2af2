//! A full volume stays usable (the library's side; the mount's is in
//! fuse-mount/tests/space.rs): every change is admitted against the
//! space its flush will take before it is made, so metadata churn on a
//! full volume is refused with NoSpace and the flush never runs out;
//! deletions may use half the flush reserve; fallocate reserves room
//! that later writes cannot be refused; hole punches free blocks at
//! once. Checked against fsck, what was written, and the flush's own
//! success on volumes whose reserve is a few chunks.

use bufcache::BlockDevice;
use hammer2::disk::ObjType;
use hammer2::mount::{Mount, RenameFlags, SetAttr, ROOT_INUM};
use hammer2::Error;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use std::sync::Arc;
use tests::freemap_check::fsck_clean;
use tests::{create_file, new_fs, open, open_nearly_full, T0};

const PFS: &str = "DATA";
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 65536;

fn noise(rng: &mut SmallRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

fn touch(m: &mut Mount, inum: u64, t: u64) -> hammer2::Result<()> {
    let a = SetAttr {
        mtime: Some(t),
        atime: Some(t),
        ..SetAttr::default()
    };
    m.setattr(PFS, inum, a, t).map(|_| ())
}

/// The loop that wedged a full volume: utime, rename, fsync. With a
/// flush reserve of two chunks and no other free space, the changes are
/// refused up front with NoSpace; no flush fails; files can still be
/// read and deleted, and once deleted data comes back, written again.
#[test]
fn metadata_churn_on_a_full_volume_is_refused_up_front() {
    let dev = new_fs(11);
    let mut rng = SmallRng::seed_from_u64(11);
    let mut files = Vec::new();
    {
        let mut m = open(&dev);
        for i in 0..64 {
            let f = create_file(&mut m, PFS, ROOT_INUM, format!("f{i}").as_bytes()).unwrap();
            let data = noise(&mut rng, 200_000);
            m.write(PFS, f, 0, &data, T0).unwrap();
            files.push((format!("f{i}"), f, data));
        }
        m.flush().unwrap();
    }
    let mut m = open_nearly_full(&dev, 2);
    let mut refused = 0;
    for i in 0..200u64 {
        let (name, f, _) = &files[(i % 64) as usize];
        let other = format!("{name}.renamed");
        match touch(&mut m, *f, T0 + i) {
            Ok(()) => {}
            Err(Error::NoSpace { .. }) => refused += 1,
            Err(e) => panic!("utime: {e}"),
        }
        match m.rename(
            PFS,
            ROOT_INUM,
            name.as_bytes(),
            ROOT_INUM,
            other.as_bytes(),
            RenameFlags::default(),
            T0 + i,
        ) {
            Ok(()) => {
                m.rename(
                    PFS,
                    ROOT_INUM,
                    other.as_bytes(),
                    ROOT_INUM,
                    name.as_bytes(),
                    RenameFlags::default(),
                    T0 + i,
                )
                .unwrap_or_else(|e| panic!("rename back: {e}"));
            }
            Err(Error::NoSpace { .. }) => refused += 1,
            Err(e) => panic!("rename: {e}"),
        }
        m.fsync(PFS, *f).expect("the flush never runs out");
    }
    assert!(refused > 0, "nothing was refused on a full volume");
    // Reads work; deletions are admitted against half the reserve.
    for (name, f, data) in files.iter().take(8) {
        assert_eq!(&m.read(PFS, *f, 0, data.len()).unwrap(), data);
        m.unlink(PFS, ROOT_INUM, name.as_bytes(), T0)
            .unwrap_or_else(|e| panic!("unlink {name} on a full volume: {e}"));
        m.flush().expect("flush after a deletion");
    }
    drop(m);
    fsck_clean(&dev, "after churn on a full volume");
    // A fresh mount frees the deleted files' space with bulkfree; the
    // volume takes writes again.
    let mut m = open(&dev);
    m.bulkfree(None).unwrap();
    m.bulkfree(None).unwrap();
    let g = create_file(&mut m, PFS, ROOT_INUM, b"again").unwrap();
    let data = noise(&mut rng, MIB as usize);
    m.write(PFS, g, 0, &data, T0).unwrap();
    m.flush().unwrap();
    for (_, f, want) in files.iter().skip(8) {
        assert_eq!(&m.read(PFS, *f, 0, want.len()).unwrap(), want);
    }
    fsck_clean(&dev, "written again");
}

/// Many inodes changed in one flush on a volume whose reserve is two
/// chunks: without admission the flush would need a block of each
/// inode and its index leaves, far more than two chunks.
#[test]
fn many_inode_changes_are_admitted_before_the_flush() {
    let dev = new_fs(12);
    let mut inums = Vec::new();
    {
        let mut m = open(&dev);
        for i in 0..2000 {
            inums.push(create_file(&mut m, PFS, ROOT_INUM, format!("n{i}").as_bytes()).unwrap());
        }
        m.flush().unwrap();
    }
    let mut m = open_nearly_full(&dev, 2);
    let mut refused = 0;
    for (i, &f) in inums.iter().enumerate() {
        let a = SetAttr {
            mode: Some(0o600),
            ..SetAttr::default()
        };
        match m.setattr(PFS, f, a, T0 + i as u64) {
            Ok(_) => {}
            Err(Error::NoSpace { .. }) => refused += 1,
            Err(e) => panic!("chmod: {e}"),
        }
    }
    assert!(refused > 1900, "{refused} of 2000 changes refused");
    m.flush().expect("the flush fits what was admitted");
    drop(m);
    fsck_clean(&dev, "many inode changes");
}

/// fallocate reserves room: beyond the volume it fails with NoSpace and
/// changes nothing; within it, the range can be written after the rest
/// of the volume was filled, and truncating gives the room back.
#[test]
fn fallocate_reserves_room_for_later_writes() {
    let dev = new_fs(13);
    let mut rng = SmallRng::seed_from_u64(13);
    let mut m = open(&dev);
    let f = create_file(&mut m, PFS, ROOT_INUM, b"prealloc").unwrap();
    assert!(matches!(
        m.fallocate(PFS, f, 0, 100 << 30, false, T0),
        Err(Error::NoSpace { .. })
    ));
    assert_eq!(m.getattr(PFS, f).unwrap().size, 0, "nothing changed");
    let avail0 = m.statfs(PFS).unwrap().bytes_avail;
    m.fallocate(PFS, f, 0, 128 * MIB, true, T0).unwrap();
    assert_eq!(m.getattr(PFS, f).unwrap().size, 0, "KEEP_SIZE");
    let avail1 = m.statfs(PFS).unwrap().bytes_avail;
    assert!(
        avail0 - avail1 >= 128 * MIB,
        "statfs shows the reservation: {avail0} -> {avail1}"
    );
    // Fill everything else.
    let fill = create_file(&mut m, PFS, ROOT_INUM, b"fill").unwrap();
    let mut at = 0;
    loop {
        let data = noise(&mut rng, MIB as usize);
        match m.write(PFS, fill, at, &data, T0) {
            Ok(()) => at += MIB,
            Err(Error::NoSpace { .. }) => {
                m.flush().unwrap();
                if m.write(PFS, fill, at, &data, T0).is_err() {
                    break;
                }
                at += MIB;
            }
            Err(e) => panic!("fill: {e}"),
        }
        if at % (64 * MIB) == 0 {
            m.flush().unwrap();
        }
    }
    assert!(at > 1024 * MIB, "filled {at} bytes");
    // The reserved range takes its writes, flushes included.
    let mut want = Vec::new();
    for i in 0..128u64 {
        let data = noise(&mut rng, MIB as usize);
        m.write(PFS, f, i * MIB, &data, T0)
            .unwrap_or_else(|e| panic!("write {i} MiB into the reserved range: {e}"));
        want.extend_from_slice(&data);
        if i % 32 == 31 {
            m.flush().unwrap();
        }
    }
    m.flush().unwrap();
    assert_eq!(m.read(PFS, f, 0, want.len()).unwrap(), want);
    // A second reservation past the written part, then a truncate that
    // gives it back.
    let g = create_file(&mut m, PFS, ROOT_INUM, b"g").unwrap();
    m.unlink(PFS, ROOT_INUM, b"fill", T0).unwrap();
    m.flush().unwrap();
    m.reclaim().unwrap();
    let before = m.statfs(PFS).unwrap().bytes_avail;
    m.fallocate(PFS, g, 0, 64 * MIB, false, T0).unwrap();
    assert_eq!(m.getattr(PFS, g).unwrap().size, 64 * MIB);
    assert_eq!(m.read(PFS, g, 0, 4096).unwrap(), vec![0u8; 4096]);
    let reserved = m.statfs(PFS).unwrap().bytes_avail;
    assert!(before - reserved >= 64 * MIB);
    let a = SetAttr {
        size: Some(0),
        ..SetAttr::default()
    };
    m.setattr(PFS, g, a, T0).unwrap();
    m.flush().unwrap();
    let after = m.statfs(PFS).unwrap().bytes_avail;
    assert!(after > reserved + 60 * MIB, "{reserved} -> {after}");
    drop(m);
    fsck_clean(&dev, "fallocate");
}

/// A hole punch drops whole blocks at once (SEEK_DATA sees the hole
/// before any flush), zeroes the edges, and works on a full volume.
#[test]
fn punched_holes_show_at_once_and_read_as_zeros() {
    let dev = new_fs(14);
    let mut rng = SmallRng::seed_from_u64(14);
    let mut model = noise(&mut rng, (2 * MIB) as usize);
    let f = {
        let mut m = open(&dev);
        let f = create_file(&mut m, PFS, ROOT_INUM, b"holes").unwrap();
        m.write(PFS, f, 0, &model, T0).unwrap();
        m.flush().unwrap();
        f
    };
    let mut m = open_nearly_full(&dev, 8);
    // Whole blocks 4..8 and a partial edge on each side.
    let (off, len) = (4 * BLOCK - 1000, 4 * BLOCK + 3000);
    m.punch_hole(PFS, f, off, len, T0).unwrap();
    model[off as usize..(off + len) as usize].fill(0);
    assert_eq!(m.read(PFS, f, 0, model.len()).unwrap(), model);
    assert_eq!(
        m.seek_hole(PFS, f, 0).unwrap(),
        4 * BLOCK,
        "the whole blocks are a hole at once"
    );
    assert_eq!(m.seek_data(PFS, f, 4 * BLOCK).unwrap(), Some(8 * BLOCK));
    // A punch to the end of the file, from inside the last block.
    m.punch_hole(PFS, f, 2 * MIB - 10, 100, T0).unwrap();
    model[(2 * MIB - 10) as usize..].fill(0);
    m.flush().unwrap();
    assert_eq!(m.read(PFS, f, 0, model.len()).unwrap(), model);
    assert_eq!(m.getattr(PFS, f).unwrap().size, 2 * MIB);
    drop(m);
    let d: Arc<dyn BlockDevice> = dev.clone();
    let mut m = Mount::open(d).unwrap();
    assert_eq!(m.read(PFS, f, 0, model.len()).unwrap(), model);
    assert_eq!(m.seek_hole(PFS, f, 0).unwrap(), 4 * BLOCK);
    assert_eq!(m.seek_data(PFS, f, 4 * BLOCK).unwrap(), Some(8 * BLOCK));
    let t = m.getattr(PFS, f).unwrap().obj_type;
    assert_eq!(t, ObjType::Regfile);
    drop(m);
    fsck_clean(&dev, "punched");
}
