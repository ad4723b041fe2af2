//! Dependency-tracked fsync: `Mount::fsync` commits the inode's
//! dependency group (with the PFS root's) and nothing else. Each test
//! changes several files, fsyncs one, and reads the image as it is right
//! after the fsync (what a crash then would leave) with the read-only
//! library: the fsynced file and everything an operation tied to it are
//! there, every other change is not, fsck finds nothing, and the image
//! mounts and takes writes. The expected states are written out by hand
//! from the operations, not taken from the library. With `H2_DFLY_FSCK`
//! (`tests::dragonfly_fsck`) every such image goes through DragonFly's
//! fsck too.

use bufcache::{BlockDevice, MemDevice};
use hammer2::disk::ObjType;
use hammer2::fsck::{fsck, Options};
use hammer2::mount::{Mount, RenameFlags, ROOT_INUM};
use hammer2::{Pfs, Volume};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tests::{create_file, new_fs, noise, open, T0 as NOW};

const L: &str = "DATA";

/// The image as a crash right now would leave it: a copy, checked by
/// fsck and opened read-only.
fn crash_image(dev: &Arc<MemDevice>) -> (Arc<MemDevice>, Pfs) {
    let img = Arc::new(dev.snapshot());
    let d: Arc<dyn BlockDevice> = img.clone();
    let r = fsck(d.clone(), Options::default()).unwrap();
    let p: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
    assert!(p.is_empty(), "fsck of the crash image: {p:#?}");
    // And DragonFly's, where the suite has it (`H2_DFLY_FSCK`).
    static N: AtomicUsize = AtomicUsize::new(0);
    tests::dragonfly_fsck(
        &img,
        &format!("crash-{}", N.fetch_add(1, Ordering::Relaxed)),
    );
    let vol = Arc::new(Volume::open(d).unwrap());
    let pfs = Pfs::open(vol, L).unwrap();
    (img, pfs)
}

fn content(pfs: &Pfs, path: &str) -> Option<Vec<u8>> {
    match pfs.resolve(path) {
        Ok(ino) => Some(pfs.read_all(&ino).unwrap()),
        Err(hammer2::Error::NotFound { .. }) => None,
        Err(e) => panic!("{path}: {e}"),
    }
}

fn nlinks(pfs: &Pfs, path: &str) -> u64 {
    pfs.resolve(path).unwrap().meta().nlinks
}

fn mkdir(m: &mut Mount, dir: u64, name: &[u8]) -> u64 {
    m.mkdir(L, dir, name, 0o755, 0, 0, NOW).unwrap()
}

/// The image still mounts read-write after the crash and takes a change.
fn remount_and_write(img: &Arc<MemDevice>) {
    let mut m = open(img);
    let f = create_file(&mut m, L, ROOT_INUM, b"after-crash").unwrap();
    m.write(L, f, 0, b"ok", NOW).unwrap();
    m.flush().unwrap();
    let (_, pfs) = crash_image(img);
    assert_eq!(content(&pfs, "/after-crash").unwrap(), b"ok");
}

/// fsync of one file commits it alone: another file's 8 MiB of new data,
/// new files in other directories stay in memory (and out of the image);
/// fsync of a directory commits its new entries and their inodes; a
/// flush then commits the rest.
#[test]
fn an_fsync_commits_the_file_and_leaves_other_changes() {
    let dev = new_fs(21);
    let mut m = open(&dev);
    let d1 = mkdir(&mut m, ROOT_INUM, b"d1");
    let d2 = mkdir(&mut m, ROOT_INUM, b"d2");
    let a = create_file(&mut m, L, d1, b"a").unwrap();
    let b = create_file(&mut m, L, d2, b"b").unwrap();
    let b_old = noise(1, 1 << 20);
    m.write(L, b, 0, &b_old, NOW).unwrap();
    m.flush().unwrap();

    m.write(L, a, 0, b"new a", NOW).unwrap();
    let b_new = noise(2, 8 << 20);
    m.write(L, b, 0, &b_new, NOW).unwrap();
    let c = create_file(&mut m, L, d2, b"c").unwrap();
    m.write(L, c, 0, b"cee", NOW).unwrap();
    let x = create_file(&mut m, L, d1, b"x").unwrap();
    m.write(L, x, 0, b"ex", NOW).unwrap();

    let s = m.fsync(L, a).unwrap();
    // a's data block, its inode, the inode index path, the PFS root and
    // the super-root: not b's 128 blocks.
    assert!(s.blocks <= 10, "fsync of a wrote {} blocks", s.blocks);
    let (img, pfs) = crash_image(&dev);
    assert_eq!(content(&pfs, "/d1/a").unwrap(), b"new a");
    assert_eq!(content(&pfs, "/d2/b").unwrap(), b_old);
    assert_eq!(content(&pfs, "/d2/c"), None);
    assert_eq!(content(&pfs, "/d1/x"), None);
    remount_and_write(&img);

    // The directory: its new entry x and x's inode and data, not c.
    m.fsync(L, d1).unwrap();
    let (img, pfs) = crash_image(&dev);
    assert_eq!(content(&pfs, "/d1/x").unwrap(), b"ex");
    assert_eq!(content(&pfs, "/d2/b").unwrap(), b_old);
    assert_eq!(content(&pfs, "/d2/c"), None);
    remount_and_write(&img);

    // A new file's fsync brings its directory entry (and the directory).
    m.fsync(L, c).unwrap();
    let (_, pfs) = crash_image(&dev);
    assert_eq!(content(&pfs, "/d2/c").unwrap(), b"cee");
    assert_eq!(content(&pfs, "/d2/b").unwrap(), b_old);

    m.flush().unwrap();
    let (_, pfs) = crash_image(&dev);
    assert_eq!(content(&pfs, "/d2/b").unwrap(), b_new);
    assert_eq!(content(&pfs, "/d1/a").unwrap(), b"new a");
}

/// Operations on several inodes land whole: a rename across directories
/// (old name gone and new name there, never both or neither), a hard
/// link (entry and link count), an unlink (entry gone and the inode
/// with it), all with an unrelated change left out.
#[test]
fn multi_inode_operations_land_whole() {
    let dev = new_fs(22);
    let mut m = open(&dev);
    let d1 = mkdir(&mut m, ROOT_INUM, b"d1");
    let d2 = mkdir(&mut m, ROOT_INUM, b"d2");
    let d3 = mkdir(&mut m, ROOT_INUM, b"d3");
    let f = create_file(&mut m, L, d1, b"f").unwrap();
    m.write(L, f, 0, b"eff", NOW).unwrap();
    let h = create_file(&mut m, L, d1, b"h").unwrap();
    m.write(L, h, 0, b"aitch", NOW).unwrap();
    let u = create_file(&mut m, L, d3, b"u").unwrap();
    m.write(L, u, 0, b"you", NOW).unwrap();
    let other = create_file(&mut m, L, d3, b"other").unwrap();
    m.flush().unwrap();

    // A rename from d1 to d2, then a write to the moved file: fsync of
    // the file commits both directories with it.
    m.rename(L, d1, b"f", d2, b"g", RenameFlags::default(), NOW)
        .unwrap();
    m.write(L, f, 3, b"!", NOW).unwrap();
    m.write(L, other, 0, b"unrelated", NOW).unwrap();
    m.fsync(L, f).unwrap();
    let (_, pfs) = crash_image(&dev);
    assert_eq!(content(&pfs, "/d1/f"), None);
    assert_eq!(content(&pfs, "/d2/g").unwrap(), b"eff!");
    assert_eq!(content(&pfs, "/d3/other").unwrap(), b"");

    // A hard link into d3: fsync of the inode brings the entry, and the
    // count matches the entries.
    m.link(L, h, d3, b"h2", NOW).unwrap();
    m.fsync(L, h).unwrap();
    let (_, pfs) = crash_image(&dev);
    assert_eq!(content(&pfs, "/d3/h2").unwrap(), b"aitch");
    assert_eq!(nlinks(&pfs, "/d1/h"), 2);
    assert_eq!(content(&pfs, "/d3/other").unwrap(), b"");

    // An unlink, committed by fsync of the directory: the inode leaves
    // the index with its entry (fsck would see an orphan otherwise).
    m.unlink(L, d3, b"u", NOW).unwrap();
    m.fsync(L, d3).unwrap();
    let (_, pfs) = crash_image(&dev);
    assert_eq!(content(&pfs, "/d3/u"), None);
    assert!(matches!(pfs.inode(u), Err(hammer2::Error::NotFound { .. })));
    // d3 is tied to `other` by nothing: its write is still not there.
    assert_eq!(content(&pfs, "/d3/other").unwrap(), b"");
    let _ = ObjType::Regfile;
}

/// A partial commit writes O(depth of the tree) metadata blocks, however
/// many other files are dirty: on one tree of 10,000 files, with 1, 100
/// and all 10,000 of them written since the last flush, fsync of one
/// small file writes the same handful of blocks (its data block, its
/// inode, the inode index path, the PFS root, the super-root).
#[test]
fn a_partial_commit_writes_in_proportion_to_depth_not_to_dirty_files() {
    const FILES: usize = 10_000;
    let mut written = Vec::new();
    for dirty in [1usize, 100, FILES] {
        let dev = new_fs(23);
        let mut m = open(&dev);
        let many = mkdir(&mut m, ROOT_INUM, b"many");
        let files: Vec<u64> = (0..FILES)
            .map(|i| create_file(&mut m, L, many, format!("f{i}").as_bytes()).unwrap())
            .collect();
        let a = create_file(&mut m, L, ROOT_INUM, b"a").unwrap();
        m.flush().unwrap();
        for &f in &files[..dirty] {
            m.write(L, f, 0, b"dirty", NOW).unwrap();
        }
        m.write(L, a, 0, &noise(3, 4096), NOW).unwrap();
        let s = m.fsync(L, a).unwrap();
        eprintln!(
            "{dirty} other dirty files: the fsync wrote {} blocks",
            s.blocks
        );
        written.push(s.blocks);
        let (_, pfs) = crash_image(&dev);
        assert_eq!(content(&pfs, "/a").unwrap(), noise(3, 4096));
        assert_eq!(content(&pfs, "/many/f0").unwrap(), b"");
        // The flush after it writes every dirty file.
        let s = m.flush().unwrap();
        assert!(
            s.blocks as usize > dirty,
            "{} blocks for {dirty} files",
            s.blocks
        );
    }
    assert!(written[0] <= 10, "{written:?}");
    assert!(written.iter().all(|&b| b == written[0]), "{written:?}");
}

/// Partial commits while a volume-wide flush has its batch out (as the
/// daemon runs them: an fsync between the flusher's begin and commit),
/// with the flushed file rewritten meanwhile: after everything is
/// deleted and the frees have waited out their headers, the freemap on
/// disk equals a full scan of the tree (no block leaked, none freed
/// while referenced) and fsck is clean.
#[test]
fn partial_commits_inside_a_pipelined_flush_leak_nothing() {
    use tests::freemap_check::{allocator_free_offset, assert_freemap_is_full_scan};
    let dev = new_fs(24);
    let mut m = open(&dev);
    m.flush().unwrap();
    let offset = allocator_free_offset(&dev);
    let a = create_file(&mut m, L, ROOT_INUM, b"a").unwrap();
    let d = mkdir(&mut m, ROOT_INUM, b"d");
    let b = create_file(&mut m, L, d, b"b").unwrap();
    m.write(L, a, 0, &noise(1, 1 << 20), NOW).unwrap();
    m.flush().unwrap();
    let mut x = 7u64;
    for i in 0..60u64 {
        m.write(L, b, (i % 8) << 16, &noise(100 + i, 3 << 16), NOW)
            .unwrap();
        m.write(L, a, (i % 16) << 16, &noise(200 + i, 4096), NOW)
            .unwrap();
        let mut batch = m.flush_begin().unwrap();
        batch.write();
        for k in 0..3 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            m.write(
                L,
                a,
                (x % 16) << 16 | 512,
                &noise(300 + i * 3 + k, 4096),
                NOW,
            )
            .unwrap();
            if k == 1 {
                // The flushed file rewritten under the batch.
                m.write(L, b, 0, &noise(400 + i, 1 << 16), NOW).unwrap();
            }
            m.fsync(L, a).unwrap();
        }
        m.flush_commit(batch).unwrap();
        // The other way round: a flush begins while a partial commit
        // has its batch out, and either commits first.
        m.write(L, a, (i % 16) << 16, &noise(500 + i, 8192), NOW)
            .unwrap();
        let mut part = m.fsync_begin(L, a).unwrap();
        part.write();
        m.write(L, b, 1 << 16, &noise(600 + i, 1 << 16), NOW)
            .unwrap();
        let mut batch = m.flush_begin().unwrap();
        batch.write();
        if i % 2 == 0 {
            m.flush_commit(part).unwrap();
            m.flush_commit(batch).unwrap();
        } else {
            m.flush_commit(batch).unwrap();
            m.flush_commit(part).unwrap();
        }
        // A block written after a flush began, taken by a partial
        // commit, and written again by the flush's commit (not from its
        // batch); the partial commit's copy written before or after.
        let mut batch = m.flush_begin().unwrap();
        batch.write();
        m.write(L, a, (i % 16) << 16, &noise(700 + i, 1 << 16), NOW)
            .unwrap();
        let mut part = m.fsync_begin(L, a).unwrap();
        if i % 2 == 0 {
            part.write();
            m.flush_commit(batch).unwrap();
        } else {
            m.flush_commit(batch).unwrap();
            part.write();
        }
        m.flush_commit(part).unwrap();
    }
    m.unlink(L, ROOT_INUM, b"a", NOW).unwrap();
    m.unlink(L, d, b"b", NOW).unwrap();
    m.fsync(L, d).unwrap();
    m.flush().unwrap();
    m.reclaim().unwrap();
    drop(m);
    let (img, _) = crash_image(&dev);
    assert_freemap_is_full_scan(&img, offset, "after the deletes");
}

/// Laundered file data (written ahead, recorded in memory, no header)
/// is not in the image after an fsync of another file, and is whole
/// after the next flush, with a block rewritten after laundering read
/// as rewritten. Each image passes fsck (and DragonFly's, where the
/// suite has it).
#[test]
fn laundered_data_lands_with_its_commit_only() {
    let dev = new_fs(24);
    let mut m = open(&dev);
    let a = create_file(&mut m, L, ROOT_INUM, b"a").unwrap();
    m.flush().unwrap();
    let mut a_data = noise(3, 2 << 20);
    m.write(L, a, 0, &a_data, NOW).unwrap();
    let mut batch = m.launder_begin().unwrap();
    batch.write();
    let stats = m.launder_finish(batch).unwrap();
    assert_eq!(stats.blocks, 32, "2 MiB laundered as 32 blocks");
    // One laundered block rewritten before any commit.
    let patch = noise(4, 70_000);
    m.write(L, a, 100_000, &patch, NOW).unwrap();
    a_data[100_000..170_000].copy_from_slice(&patch);
    let b = create_file(&mut m, L, ROOT_INUM, b"b").unwrap();
    m.write(L, b, 0, b"fsynced", NOW).unwrap();
    m.fsync(L, b).unwrap();
    let (_, pfs) = crash_image(&dev);
    assert_eq!(content(&pfs, "/b").unwrap(), b"fsynced");
    assert_eq!(
        content(&pfs, "/a").unwrap(),
        b"",
        "laundered data reached the image"
    );
    m.flush().unwrap();
    let (img, pfs) = crash_image(&dev);
    assert!(content(&pfs, "/a").unwrap() == a_data, "a after the flush");
    remount_and_write(&img);
}
