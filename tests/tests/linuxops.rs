//! The operations Linux asks for that DragonFly's vnops lack
//! (`hammer2/src/mount/linux.rs`), through the library: O_TMPFILE files,
//! RENAME_WHITEOUT, FALLOC_FL_ZERO_RANGE and access times written by
//! the next flush without starting one. Each checked after a flush and
//! a reopen, and with fsck.

use bufcache::{BlockDevice, MemDevice};
use hammer2::disk::ObjType;
use hammer2::fsck::{fsck, Options};
use hammer2::mount::{Mount, ATIMES_MAX, ROOT_INUM};
use hammer2::Error;
use std::sync::Arc;
use tests::cold::Cold;
use tests::{create_file, new_fs, open, T0};

const L: &str = "DATA";

/// fsck: no problems, and the warnings (orphans) it gives.
fn fsck_problems_free(dev: &Arc<MemDevice>) -> Vec<String> {
    let d: Arc<dyn BlockDevice> = dev.clone();
    let r = fsck(d, Options::default()).unwrap();
    let p: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
    assert!(p.is_empty(), "fsck: {p:#?}");
    r.warnings.iter().map(|w| w.to_string()).collect()
}

fn lookup(m: &mut Mount, dir: u64, name: &[u8]) -> Option<u64> {
    m.lookup(L, dir, name).unwrap()
}

/// An O_TMPFILE file has no name and no links, lives while pinned, and
/// is gone at its last unpin; one given a name by `link` stays. A flush
/// while it is unnamed leaves an orphan, which the next mount removes.
#[test]
fn tmpfiles_live_while_pinned_and_link_names_them() {
    let dev = new_fs(1);
    let mut m = open(&dev);
    let d = m.mkdir(L, ROOT_INUM, b"d", 0o755, 0, 0, T0).unwrap();
    let kept = m.tmpfile(L, d, 0o600, 7, 8, T0).unwrap();
    let dropped = m.tmpfile(L, d, 0o644, 0, 0, T0).unwrap();
    assert!(m.readdir(L, d, 0).unwrap().is_empty(), "no names");
    let meta = m.getattr(L, kept).unwrap();
    assert_eq!(
        (meta.nlinks, meta.mode, meta.uid_unix(), meta.gid_unix()),
        (0, 0o600, 7, 8)
    );
    assert_eq!(meta.obj_type, ObjType::Regfile);
    assert_eq!(m.pin_count(L, kept), 1);
    m.write(L, kept, 0, b"named later", T0).unwrap();
    m.write(L, dropped, 0, &vec![7u8; 200_000], T0).unwrap();
    // A flush with both unnamed: orphans on disk.
    m.flush().unwrap();
    let warnings = fsck_problems_free(&dev);
    assert_eq!(warnings.len(), 2, "{warnings:#?}");
    m.link(L, kept, ROOT_INUM, b"kept", T0).unwrap();
    assert_eq!(m.getattr(L, kept).unwrap().nlinks, 1);
    m.unpin(L, kept).unwrap();
    m.unpin(L, dropped).unwrap();
    assert!(matches!(m.getattr(L, dropped), Err(Error::NotFound { .. })));
    m.flush().unwrap();
    assert!(fsck_problems_free(&dev).is_empty());
    let mut m = open(&dev);
    let k = lookup(&mut m, ROOT_INUM, b"kept").expect("named");
    assert_eq!(k, kept);
    assert_eq!(m.read(L, k, 0, 100).unwrap(), b"named later");

    // Left unnamed by a crash (no unpin): an orphan, which the next
    // mount removes.
    let t = m.tmpfile(L, ROOT_INUM, 0o600, 0, 0, T0).unwrap();
    m.flush().unwrap();
    drop(m);
    assert_eq!(fsck_problems_free(&dev).len(), 1);
    let mut m = open(&dev);
    assert_eq!(m.reclaim_orphans(L).unwrap(), vec![t]);
    m.flush().unwrap();
    assert!(fsck_problems_free(&dev).is_empty());
}

/// RENAME_WHITEOUT: the rename, and a character device 0/0 with mode 0
/// where the source was, in one step; with RENAME_NOREPLACE an existing
/// target refuses both.
#[test]
fn rename_whiteout_leaves_a_char_device_0_0() {
    let dev = new_fs(2);
    let mut m = open(&dev);
    let a = m.mkdir(L, ROOT_INUM, b"a", 0o755, 0, 0, T0).unwrap();
    let b = m.mkdir(L, ROOT_INUM, b"b", 0o755, 0, 0, T0).unwrap();
    let f = create_file(&mut m, L, a, b"f").unwrap();
    let g = create_file(&mut m, L, b, b"g").unwrap();
    m.rename_whiteout(L, a, b"f", b, b"moved", false, 5, 6, T0 + 1)
        .unwrap();
    assert_eq!(lookup(&mut m, b, b"moved"), Some(f));
    let w = lookup(&mut m, a, b"f").expect("whiteout");
    let wm = m.getattr(L, w).unwrap();
    assert_eq!(
        (
            wm.obj_type,
            wm.mode,
            wm.rmajor,
            wm.rminor,
            wm.uid_unix(),
            wm.gid_unix()
        ),
        (ObjType::Cdev, 0, 0, 0, 5, 6)
    );
    // Over an existing target.
    let h = create_file(&mut m, L, a, b"h").unwrap();
    m.rename_whiteout(L, a, b"h", b, b"g", false, 0, 0, T0 + 2)
        .unwrap();
    assert_eq!(lookup(&mut m, b, b"g"), Some(h));
    assert!(matches!(m.getattr(L, g), Err(Error::NotFound { .. })));
    let wh = lookup(&mut m, a, b"h").expect("whiteout");
    assert_eq!(m.getattr(L, wh).unwrap().obj_type, ObjType::Cdev);
    // NOREPLACE onto an existing name: nothing changes.
    let i = create_file(&mut m, L, a, b"i").unwrap();
    let r = m.rename_whiteout(L, a, b"i", b, b"g", true, 0, 0, T0 + 3);
    assert!(matches!(r, Err(Error::Exists { .. })), "{r:?}");
    assert_eq!(lookup(&mut m, a, b"i"), Some(i));
    assert_eq!(lookup(&mut m, b, b"g"), Some(h));
    m.flush().unwrap();
    assert!(fsck_problems_free(&dev).is_empty());
    let mut m = open(&dev);
    let names: Vec<Vec<u8>> = m
        .readdir(L, a, 0)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names.len(), 3, "f and h (whiteouts) and i");
}

/// FALLOC_FL_ZERO_RANGE: the range reads as zeros and keeps no data
/// blocks once flushed, partly covered blocks keep their other bytes,
/// the file grows unless KEEP_SIZE, and a full volume refuses it with
/// nothing changed.
#[test]
fn zero_range_zeros_and_grows() {
    let dev = new_fs(3);
    let mut m = open(&dev);
    let f = create_file(&mut m, L, ROOT_INUM, b"f").unwrap();
    let data: Vec<u8> = (0..4 * 65536u32).map(|i| (i % 251 + 1) as u8).collect();
    m.write(L, f, 0, &data, T0).unwrap();
    m.flush().unwrap();
    // From the middle of block 0 to the middle of block 2.
    m.zero_range(L, f, 1000, 2 * 65536, true, T0 + 1).unwrap();
    let mut want = data.clone();
    want[1000..1000 + 2 * 65536].fill(0);
    assert_eq!(m.read(L, f, 0, want.len()).unwrap(), want);
    assert_eq!(m.getattr(L, f).unwrap().size, data.len() as u64);
    assert_eq!(m.getattr(L, f).unwrap().mtime, T0 + 1);
    // Block 1, wholly zeroed, is a hole at once.
    assert_eq!(m.seek_hole(L, f, 0).unwrap(), 65536);
    assert_eq!(m.seek_data(L, f, 65536).unwrap(), Some(2 * 65536));
    // Past the end, growing the file.
    m.zero_range(L, f, 5 * 65536, 100, false, T0 + 2).unwrap();
    assert_eq!(m.getattr(L, f).unwrap().size, 5 * 65536 + 100);
    // Not a file.
    let d = m.mkdir(L, ROOT_INUM, b"d", 0o755, 0, 0, T0).unwrap();
    assert!(matches!(
        m.zero_range(L, d, 0, 1, true, T0),
        Err(Error::InvalidArgument { .. })
    ));
    m.flush().unwrap();
    assert!(fsck_problems_free(&dev).is_empty());
    let mut m = open(&dev);
    want.resize(5 * 65536 + 100, 0);
    assert_eq!(m.read(L, f, 0, want.len()).unwrap(), want);
    assert_eq!(m.seek_hole(L, f, 0).unwrap(), 65536);
    // A range larger than the volume: refused, nothing changed.
    let r = m.zero_range(L, f, 0, 1 << 40, false, T0 + 3);
    assert!(matches!(r, Err(Error::NoSpace { .. })), "{r:?}");
    assert_eq!(m.getattr(L, f).unwrap().size, 5 * 65536 + 100);
    assert_eq!(m.read(L, f, 0, want.len()).unwrap(), want);
}

/// An access time alone does not make the mount dirty (no flush is
/// started for it), survives the inode leaving memory, and is written by
/// the next flush of anything, or once handed over with `flush_atimes`
/// (what fsync, sync and unmount do); `ATIMES_MAX` bounds how many wait.
#[test]
fn access_times_wait_for_a_flush_without_starting_one() {
    let dev = new_fs(4);
    let mut m = open(&dev);
    let f = create_file(&mut m, L, ROOT_INUM, b"f").unwrap();
    let g = create_file(&mut m, L, ROOT_INUM, b"g").unwrap();
    m.flush().unwrap();
    assert!(!m.is_dirty());
    m.touch_atime(L, f, T0 + 10).unwrap();
    assert!(!m.is_dirty(), "an access time alone starts no flush");
    assert_eq!(m.atimes_waiting(), 1);
    assert_eq!(m.getattr(L, f).unwrap().atime, T0 + 10);
    // Dropped from memory (as between flushes), then read again.
    m.release_clean();
    assert_eq!(m.getattr(L, f).unwrap().atime, T0 + 10);
    // Another change's flush writes it.
    m.setattr(
        L,
        g,
        hammer2::mount::SetAttr {
            mode: Some(0o600),
            ..Default::default()
        },
        T0 + 20,
    )
    .unwrap();
    m.flush().unwrap();
    assert_eq!(m.atimes_waiting(), 0);
    let mut m = open(&dev);
    assert_eq!(m.getattr(L, f).unwrap().atime, T0 + 10);
    assert_eq!(m.getattr(L, f).unwrap().ctime, T0, "ctime untouched");

    // Handed over: the mount is dirty, a flush writes it.
    m.touch_atime(L, g, T0 + 30).unwrap();
    m.touch_atime(L, ROOT_INUM, T0 + 31).unwrap();
    assert!(!m.is_dirty());
    m.flush_atimes().unwrap();
    assert!(m.is_dirty());
    m.flush().unwrap();
    let mut m = open(&dev);
    assert_eq!(m.getattr(L, g).unwrap().atime, T0 + 30);
    assert_eq!(m.getattr(L, ROOT_INUM).unwrap().atime, T0 + 31);

    // A removed file's waiting time is dropped with it.
    m.touch_atime(L, f, T0 + 40).unwrap();
    m.unlink(L, ROOT_INUM, b"f", T0 + 41).unwrap();
    m.flush().unwrap();

    // Past ATIMES_MAX they are handed over at once.
    let d = m.mkdir(L, ROOT_INUM, b"many", 0o755, 0, 0, T0).unwrap();
    let files: Vec<u64> = (0..=ATIMES_MAX)
        .map(|i| create_file(&mut m, L, d, format!("{i}").as_bytes()).unwrap())
        .collect();
    m.flush().unwrap();
    for &i in &files[..ATIMES_MAX] {
        m.touch_atime(L, i, T0 + 50).unwrap();
    }
    assert!(!m.is_dirty());
    m.touch_atime(L, files[ATIMES_MAX], T0 + 50).unwrap();
    assert!(m.is_dirty());
    assert_eq!(m.atimes_waiting(), 0);
    m.flush().unwrap();
    assert!(fsck_problems_free(&dev).is_empty());
    let mut m = open(&dev);
    assert_eq!(m.getattr(L, files[0]).unwrap().atime, T0 + 50);
}

/// As the daemon runs a request (`RwVolume::locked`): cache-only, and
/// when a read missed, read that block and run the whole unit again.
/// Returns the result and how many runs missed.
fn cache_only_unit<T>(
    m: &mut Mount,
    cold: &Cold,
    mut f: impl FnMut(&mut Mount) -> hammer2::Result<T>,
) -> (hammer2::Result<T>, usize) {
    let mut misses = 0;
    loop {
        let r = {
            let _only = hammer2::volume::cache_only();
            hammer2::volume::take_miss();
            f(m)
        };
        match hammer2::volume::take_miss() {
            Some((at, bytes)) => {
                misses += 1;
                assert!(misses < 100, "a unit that never ends");
                let mut buf = vec![0; bytes as usize];
                cold.read_at(&mut buf, at).unwrap();
            }
            None => return (r, misses),
        }
    }
}

/// The operations of `mount/linux.rs` under the daemon's rule that a
/// request reads only what the cache holds: one that misses fails before
/// it changes anything and runs again once the block is read. On a cold
/// cache each misses at least once, and ends as a single run on a warm
/// cache does: the same data, size, times, links and the same space
/// admitted (a retry does not admit twice), fsck clean after the flush.
#[test]
fn linux_operations_run_again_after_a_cache_miss_as_if_once() {
    // The same image, then each operation on a warm and a cold mount.
    let base = new_fs(5);
    {
        let mut m = open(&base);
        let f = create_file(&mut m, L, ROOT_INUM, b"f").unwrap();
        let data: Vec<u8> = (0..6 * 65536u32).map(|i| (i % 241 + 1) as u8).collect();
        m.write(L, f, 0, &data, T0).unwrap();
        m.mkdir(L, ROOT_INUM, b"d", 0o755, 0, 0, T0).unwrap();
        create_file(&mut m, L, ROOT_INUM, b"g").unwrap();
        m.flush().unwrap();
    }
    let copy = |dev: &Arc<MemDevice>| {
        let c = Arc::new(MemDevice::new(dev.size_bytes()));
        let mut buf = vec![0u8; 4 << 20];
        let mut at = 0;
        while at < dev.size_bytes() {
            dev.read_at(&mut buf, at).unwrap();
            c.write_at(&buf, at).unwrap();
            at += buf.len() as u64;
        }
        c
    };
    type Outcome = (Vec<u8>, u64, u64, u32, u64, u64);
    let run = |cold_cache: bool| -> (Outcome, usize) {
        let dev = copy(&base);
        let cold = Cold::over(&dev);
        let d: Arc<dyn BlockDevice> = cold.clone();
        let mut m = Mount::open(d).unwrap();
        if !cold_cache {
            // Everything read once: nothing misses.
            let mut buf = vec![0u8; 4 << 20];
            let mut at = 0;
            while at < dev.size_bytes() {
                cold.read_at(&mut buf, at).unwrap();
                at += buf.len() as u64;
            }
        }
        let f = lookup(&mut m, ROOT_INUM, b"f").unwrap();
        let g = lookup(&mut m, ROOT_INUM, b"g").unwrap();
        let dir = lookup(&mut m, ROOT_INUM, b"d").unwrap();
        let mut misses = 0;
        let (r, n) = cache_only_unit(&mut m, &cold, |m| {
            m.zero_range(L, f, 70_000, 3 * 65536, false, T0 + 1)
        });
        r.unwrap();
        misses += n;
        let (r, n) = cache_only_unit(&mut m, &cold, |m| m.touch_atime(L, g, T0 + 2));
        r.unwrap();
        misses += n;
        let (t, n) = cache_only_unit(&mut m, &cold, |m| m.tmpfile(L, dir, 0o600, 0, 0, T0 + 3));
        let t = t.unwrap();
        misses += n;
        m.link(L, t, dir, b"t", T0 + 3).unwrap();
        m.unpin(L, t).unwrap();
        let avail = m.statfs(L).unwrap().bytes_avail;
        m.flush().unwrap();
        drop(m);
        assert!(fsck_problems_free(&dev).is_empty());
        let mut m = open(&dev);
        let size = m.getattr(L, f).unwrap().size;
        let out = (
            m.read(L, f, 0, size as usize).unwrap(),
            size,
            m.getattr(L, g).unwrap().atime,
            m.getattr(L, t).unwrap().nlinks as u32,
            t,
            avail,
        );
        (out, misses)
    };
    let (warm, warm_misses) = run(false);
    let (cold, cold_misses) = run(true);
    assert_eq!(warm_misses, 0);
    assert!(cold_misses >= 3, "each operation missed: {cold_misses}");
    let mut want: Vec<u8> = (0..6 * 65536u32).map(|i| (i % 241 + 1) as u8).collect();
    want[70_000..70_000 + 3 * 65536].fill(0);
    assert!(warm.0 == want, "zeroed range");
    assert_eq!((warm.1, warm.2, warm.3), (6 * 65536, T0 + 2, 1));
    assert!(cold.0 == warm.0, "the same data");
    assert_eq!(
        (cold.1, cold.2, cold.3, cold.4, cold.5),
        (warm.1, warm.2, warm.3, warm.4, warm.5),
        "size, atime, links, inode number, space admitted"
    );
}

/// An access time set explicitly (utimensat, `setattr` with an atime)
/// after a read left one waiting in memory (`touch_atime`) is the one
/// the flush writes: the waiting time is the older event. Before, the
/// flush put the waiting read's time back over it.
#[test]
fn an_explicit_access_time_wins_over_one_waiting_from_a_read() {
    let dev = new_fs(71);
    let mut m = open(&dev);
    let f = create_file(&mut m, L, ROOT_INUM, b"f").unwrap();
    m.flush().unwrap();
    m.touch_atime(L, f, T0 + 10).unwrap();
    assert_eq!(m.atimes_waiting(), 1);
    // touch -a -d 2000-01-01: older than the read's.
    let set = 946_684_800_000_000;
    let a = hammer2::mount::SetAttr {
        atime: Some(set),
        ..Default::default()
    };
    // With the mount shared it declines (the waiting time is the
    // PFS's to drop), and runs with the mount exclusive.
    assert!(m
        .setattr_shared(L, f, T0 + 20, |_| Ok::<_, ()>(a))
        .is_none());
    m.setattr(L, f, a, T0 + 20).unwrap();
    assert_eq!(m.getattr(L, f).unwrap().atime, set);
    m.flush().unwrap();
    assert_eq!(m.getattr(L, f).unwrap().atime, set);
    let mut m = open(&dev);
    assert_eq!(m.getattr(L, f).unwrap().atime, set);
    // A read after it waits again, and is written.
    m.touch_atime(L, f, T0 + 30).unwrap();
    m.flush_atimes().unwrap();
    m.flush().unwrap();
    let mut m = open(&dev);
    assert_eq!(m.getattr(L, f).unwrap().atime, T0 + 30);
    assert!(fsck_problems_free(&dev).is_empty());
}
