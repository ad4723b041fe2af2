//! File data waiting for a flush lives on the page layer under the
//! buffer cache (`hammer2::databuf`): one anonymous page per pending
//! 64 KiB block, within the cache's budget, back to the page layer once
//! a flush or laundering writes the block. A read plan that shares a
//! block keeps the bytes it was planned on while a write changes a copy.
//! A shortage of pages fails a write whole, with an out-of-memory error
//! that poisons nothing.

use bufcache::{BlockDevice, BufCache, BufCacheConfig, CachedDevice, MemDevice, Vm, VmConfig};
use hammer2::mount::{Mount, ROOT_INUM};
use hammer2::Error;
use std::sync::Arc;
use std::time::Duration;

const NOW: u64 = 1_700_000_000_000_000;
const L: &str = "DATA";
const B: usize = 65536;

fn image() -> Arc<MemDevice> {
    tests::new_fs_bytes(3, 1 << 30)
}

/// A mount over a buffer cache of `budget` bytes whose page layer waits
/// `wait` for a free page; the page layer too.
fn mount_cached(dev: &Arc<MemDevice>, budget: u64, wait: Duration) -> (Mount, Arc<Vm>) {
    let mut cfg = VmConfig::new(budget);
    cfg.alloc_wait_max = wait;
    let vm = Vm::new(cfg).unwrap();
    let d: Arc<dyn BlockDevice> = dev.clone();
    let cache = BufCache::new(d, vm.clone(), BufCacheConfig::default()).unwrap();
    let cached: Arc<dyn BlockDevice> = Arc::new(CachedDevice::new(cache));
    (Mount::open(cached).unwrap(), vm)
}

fn file(m: &mut Mount, name: &str) -> u64 {
    tests::create_file(m, L, ROOT_INUM, name.as_bytes()).unwrap()
}

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    tests::noise(seed, len)
}

#[test]
fn pending_file_data_is_on_anonymous_pages_until_the_flush() {
    let dev = image();
    let (mut m, vm) = mount_cached(&dev, 32 << 20, Duration::from_secs(10));
    let small = file(&mut m, "small");
    let sparse = file(&mut m, "sparse");
    let big = file(&mut m, "big");
    assert_eq!(vm.stats().anon, 0);
    m.write(L, small, 0, &bytes(1, 4096), NOW).unwrap();
    m.write(L, sparse, B as u64 + 999, b"x", NOW).unwrap();
    let big_data = bytes(2, 16 * B + 100);
    m.write(L, big, 0, &big_data, NOW).unwrap();
    // One page per pending block: 1 + 1 + 17.
    assert_eq!(vm.stats().anon, 19);
    assert_eq!(m.pending_bytes(), 19 * B as u64);
    vm.verify().unwrap();

    // What reads back is the file's, from the pages.
    let mut sparse_want = vec![0u8; B + 1000];
    sparse_want[B + 999] = b'x';
    assert_eq!(m.read(L, sparse, 0, 4 * B).unwrap(), sparse_want);
    assert_eq!(m.read(L, big, 0, 32 * B).unwrap(), big_data);

    // A plan taken before a write keeps the bytes it was planned on; the
    // write changes a copy on a page of its own.
    let (plan, ticket) = m.read_plan(L, big, 0, 2 * B).unwrap();
    m.write(L, big, 10, b"changed", NOW).unwrap();
    assert_eq!(vm.stats().anon, 20, "the shared block was copied");
    assert_eq!(plan.run(m.volume()).unwrap(), big_data[..2 * B]);
    drop(ticket);
    assert_eq!(vm.stats().anon, 19, "the plan's copy went with the plan");
    let mut big_now = big_data.clone();
    big_now[10..17].copy_from_slice(b"changed");
    assert_eq!(m.read(L, big, 0, 32 * B).unwrap(), big_now);

    m.flush().unwrap();
    assert_eq!(vm.stats().anon, 0, "the flush gave every page back");
    assert_eq!(m.pending_bytes(), 0);
    vm.verify().unwrap();
    assert_eq!(m.read(L, sparse, 0, 4 * B).unwrap(), sparse_want);
    assert_eq!(m.read(L, big, 0, 32 * B).unwrap(), big_now);
    assert_eq!(m.read(L, small, 0, B).unwrap(), bytes(1, 4096));
    drop(m);
    // DragonFly's own fscks, where the suite has them (`H2_DFLY_FSCK`),
    // on what was written from the pages.
    tests::dragonfly_fsck(&dev, "data-pages");
}

/// When wired pages take the budget, a write that needs a page fails
/// with an out-of-memory error before changing anything: the file reads
/// as before it, the mount is not poisoned, and once a flush gives the
/// pages back the same write goes through.
#[test]
fn a_shortage_of_pages_fails_a_write_whole_and_poisons_nothing() {
    let dev = image();
    let (mut m, vm) = mount_cached(&dev, 8 << 20, Duration::from_millis(20));
    let mut files = Vec::new();
    let mut model: Vec<Vec<u8>> = Vec::new();
    let err = loop {
        assert!(files.len() < 200, "128 pages never ran out");
        let f = file(&mut m, &format!("f{}", files.len()));
        // Two blocks each: the second write's block needs its own page.
        let data = bytes(files.len() as u64, B + 512);
        match m.write(L, f, 0, &data, NOW) {
            Ok(()) => {
                files.push(f);
                model.push(data);
            }
            Err(e) => {
                assert_eq!(
                    m.read(L, f, 0, 2 * B).unwrap(),
                    b"",
                    "a failed write left data"
                );
                break e;
            }
        }
    };
    assert!(
        matches!(&err, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::OutOfMemory),
        "{err}"
    );
    assert!(
        files.len() >= 16,
        "only {} files before the shortage",
        files.len()
    );
    for (f, want) in files.iter().zip(&model) {
        assert_eq!(&m.read(L, *f, 0, 2 * B).unwrap(), want);
    }
    m.flush().unwrap();
    assert_eq!(vm.stats().anon, 0);
    let f = file(&mut m, "after");
    let data = bytes(999, B + 512);
    m.write(L, f, 0, &data, NOW).unwrap();
    m.flush().unwrap();
    assert_eq!(m.read(L, f, 0, 2 * B).unwrap(), data);
    for (f, want) in files.iter().zip(&model) {
        assert_eq!(&m.read(L, *f, 0, 2 * B).unwrap(), want);
    }
    vm.verify().unwrap();
}

/// Laundering writes pending blocks ahead of the commit and gives their
/// pages back; the data reads back from the blocks it wrote.
#[test]
fn laundering_gives_the_pages_back() {
    let dev = image();
    let (mut m, vm) = mount_cached(&dev, 32 << 20, Duration::from_secs(10));
    let f = file(&mut m, "f");
    let data = bytes(5, 32 * B);
    m.write(L, f, 0, &data, NOW).unwrap();
    assert_eq!(vm.stats().anon, 32);
    let mut batch = m.launder_begin().unwrap();
    batch.write();
    m.launder_finish(batch).unwrap();
    assert_eq!(vm.stats().anon, 0, "laundered blocks kept their pages");
    assert_eq!(m.pending_bytes(), 0);
    assert_eq!(m.read(L, f, 0, 32 * B).unwrap(), data);
    m.flush().unwrap();
    assert_eq!(m.read(L, f, 0, 32 * B).unwrap(), data);
    vm.verify().unwrap();
}

/// A write's whole blocks copied onto pages before the lock
/// (`Filled::of`) are put in place of its blocks as they are: no page
/// more is taken under the lock, a block a read plan shares is replaced
/// (the plan keeps its bytes), the partial edges go the usual way, and a
/// write that fails leaves them all to be given back.
#[test]
fn blocks_filled_before_the_lock_are_put_in_place() {
    let dev = image();
    let (mut m, vm) = mount_cached(&dev, 32 << 20, Duration::from_secs(10));
    let f = file(&mut m, "f");
    let first = bytes(1, 8 * B);
    m.write(L, f, 0, &first, NOW).unwrap();
    assert_eq!(vm.stats().anon, 8);
    let (plan, ticket) = m.read_plan(L, f, 0, 8 * B).unwrap();

    // 100 bytes into block 1 to 300 bytes into block 6: blocks 2 to 5
    // are whole.
    let (off, len) = (B as u64 + 100, 5 * B + 200);
    let second = bytes(2, len);
    let mut filled = hammer2::inode::Filled::of(m.volume(), off, &second);
    assert_eq!(vm.stats().anon, 12, "four whole blocks filled");
    m.write_filled(L, f, off, &second, NOW, &mut filled)
        .unwrap();
    // The plan shares all 8 blocks: the write copied the two edge
    // blocks (1 and 6) and put the four filled ones in place.
    assert_eq!(vm.stats().anon, 14);
    drop(filled);
    assert_eq!(vm.stats().anon, 14, "every filled block was used");
    assert_eq!(plan.run(m.volume()).unwrap(), first);
    drop(ticket);
    assert_eq!(vm.stats().anon, 8, "the plan's blocks went with it");
    let mut want = first.clone();
    want[off as usize..off as usize + len].copy_from_slice(&second);
    assert_eq!(m.read(L, f, 0, 8 * B).unwrap(), want);

    // A write that fails (to a directory) takes none of them.
    let d = m.mkdir(L, ROOT_INUM, b"d", 0o755, 0, 0, NOW).unwrap();
    let mut filled = hammer2::inode::Filled::of(m.volume(), 0, &first);
    assert_eq!(vm.stats().anon, 16);
    assert!(m.write_filled(L, d, 0, &first, NOW, &mut filled).is_err());
    drop(filled);
    assert_eq!(vm.stats().anon, 8, "the unused blocks were given back");

    m.flush().unwrap();
    assert_eq!(vm.stats().anon, 0);
    vm.verify().unwrap();
    drop(m);
    let (mut m2, _) = mount_cached(&dev, 32 << 20, Duration::from_secs(10));
    assert_eq!(m2.read(L, f, 0, 8 * B).unwrap(), want);
    drop(m2);
    let d: Arc<dyn BlockDevice> = dev.clone();
    let report = hammer2::fsck::fsck(d, hammer2::fsck::Options::default()).unwrap();
    assert!(report.is_clean(), "fsck: {:?}", report.problems);
    tests::dragonfly_fsck(&dev, "filled-blocks");
}
