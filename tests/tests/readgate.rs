//! Reads outside the mount's lock (`Mount::read_plan`, `ReadPlan::run`)
//! and the frees that wait for them (`readgate.rs`): while a reader
//! holds the ticket of a plan naming a block, flushes that drop the
//! block free nothing, and the plan still reads the bytes it was taken
//! on, however the file changed meanwhile; once the ticket goes, the
//! next flushes free the dropped blocks. Without readers, frees happen
//! at the commit that allows them, as before. The allocator's own
//! `freed` count and the reads are the witnesses.

use bufcache::{BlockDevice, MemDevice};
use hammer2::disk::ObjType;
use hammer2::mount::{Mount, ROOT_INUM};
use std::sync::Arc;
use tests::noise;

const NOW: u64 = 1_700_000_000_000_000;
const L: &str = "DATA";
const BLOCK: usize = 65536;

/// A 1 GiB volume (one volume header, so a dropped block is freed by
/// the very next commit) with file `f` of four 64 KiB blocks, flushed.
fn setup() -> (Mount, u64, Vec<u8>) {
    let dev = Arc::new(MemDevice::new(1 << 30));
    let opts = mkfs::newfs::NewfsOptions {
        now_us: Some(NOW),
        uuid_seed: Some(5),
        ..Default::default()
    };
    mkfs::newfs::newfs(dev.as_ref(), &opts).unwrap();
    let d: Arc<dyn BlockDevice> = dev;
    let mut m = Mount::open(d).unwrap();
    let inum = m
        .create(
            L,
            ROOT_INUM,
            b"f",
            ObjType::Regfile,
            0o644,
            0,
            0,
            (0, 0),
            NOW,
        )
        .unwrap();
    let body = noise(1, 4 * BLOCK);
    m.write(L, inum, 0, &body, NOW).unwrap();
    m.flush().unwrap();
    (m, inum, body)
}

/// Rewrite the whole file with other bytes and flush; the bytes freed.
fn rewrite(m: &mut Mount, inum: u64, seed: u64) -> u64 {
    m.write(L, inum, 0, &noise(seed, 4 * BLOCK), NOW).unwrap();
    m.flush().unwrap().freed
}

#[test]
fn a_reader_holds_the_blocks_of_its_plan() {
    let (mut m, inum, body) = setup();
    let (plan, ticket) = m.read_plan(L, inum, 1000, 3 * BLOCK).unwrap();
    assert_eq!(plan.disk_blocks(), 4, "the plan names the file's blocks");
    let mut freed_held = 0;
    for seed in 2..6 {
        freed_held += rewrite(&mut m, inum, seed);
    }
    assert_eq!(freed_held, 0, "blocks freed under a reader's plan");
    // The plan reads what the file held when it was taken.
    let reader = m.volume().reader();
    assert!(plan.run(&reader).unwrap() == body[1000..1000 + 3 * BLOCK]);
    drop(ticket);
    let mut freed_after = 0;
    for seed in 6..9 {
        freed_after += rewrite(&mut m, inum, seed);
    }
    assert!(
        freed_after >= 4 * 4 * BLOCK as u64,
        "{freed_after} bytes freed once the reader was gone"
    );
}

#[test]
fn without_readers_frees_are_not_delayed() {
    let (mut m, inum, _) = setup();
    // Each rewrite's commit frees the blocks the one before dropped.
    rewrite(&mut m, inum, 2);
    let freed = rewrite(&mut m, inum, 3);
    assert!(freed >= 4 * BLOCK as u64, "{freed} bytes freed");
    // A plan run and done before the flush delays nothing either.
    let (plan, ticket) = m.read_plan(L, inum, 0, BLOCK).unwrap();
    let reader = m.volume().reader();
    assert!(plan.run(&reader).unwrap() == noise(3, 4 * BLOCK)[..BLOCK]);
    drop(ticket);
    let freed = rewrite(&mut m, inum, 4);
    assert!(freed >= 4 * BLOCK as u64, "{freed} bytes freed");
}

/// A bulkfree merge waits for the readers that planned before its
/// scan began (a block they read may be one the scan found
/// unreferenced): `readers_done_since` says so, and a merge tried
/// meanwhile is refused; once they end, the merge goes through.
#[test]
fn a_bulkfree_merge_waits_for_older_readers() {
    let (mut m, inum, _) = setup();
    let (_plan, ticket) = m.read_plan(L, inum, 0, BLOCK).unwrap();
    let mut scan = m.bulkfree_begin().unwrap();
    scan.run(None).unwrap();
    // Flushes meanwhile do not let the merge past the reader.
    rewrite(&mut m, inum, 2);
    assert!(!m.readers_done_since(scan.read_epoch()));
    drop(ticket);
    assert!(m.readers_done_since(scan.read_epoch()));
    m.bulkfree_commit(scan).unwrap();
    m.flush().unwrap();

    let (_plan, ticket) = m.read_plan(L, inum, 0, BLOCK).unwrap();
    let mut scan = m.bulkfree_begin().unwrap();
    scan.run(None).unwrap();
    let e = m.bulkfree_commit(scan).unwrap_err();
    assert!(e.to_string().contains("still running"), "{e}");
    drop(ticket);
}
