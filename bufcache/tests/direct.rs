//! The buffer cache over a file opened for direct I/O (O_DIRECT), as a
//! mount uses it: random reads and writes of any offset and length (1 KiB
//! blocks written in part, runs that do not fill a sector), barriers and a
//! budget small enough to evict, against a memory device taking the same
//! writes; then the file, read with the page cache, holds what the model
//! holds.

use bufcache::{BlockDevice, BufCache, CachedDevice, FileDevice, MemDevice};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use std::fs::File;
use std::sync::Arc;

#[test]
fn cached_direct_device_matches_memory() {
    let dir = std::env::temp_dir().join(format!("bufcache-cdirect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("img");
    const SIZE: u64 = 64 << 20;
    File::create(&path).unwrap().set_len(SIZE).unwrap();
    let file = FileDevice::open_direct(&path, true).unwrap();
    assert!(file.is_direct(), "O_DIRECT refused on {}", dir.display());
    let cache = BufCache::open(Arc::new(file), 8 << 20).unwrap();
    let dev = CachedDevice::new(cache);
    let model = MemDevice::new(SIZE);
    let mut rng = SmallRng::seed_from_u64(3);
    for i in 0..6000 {
        let off = rng.gen_range(0..SIZE - 200_000);
        let len = match rng.gen_range(0..4) {
            0 => rng.gen_range(1..1024),
            1 => rng.gen_range(1..8) * 1024,
            2 => 65536,
            _ => rng.gen_range(1..200_000),
        };
        match rng.gen_range(0..10) {
            0..=4 => {
                let mut data = vec![0u8; len];
                rng.fill_bytes(&mut data);
                dev.write_at(&data, off).unwrap();
                model.write_at(&data, off).unwrap();
            }
            5..=8 => {
                let (mut got, mut want) = (vec![0u8; len], vec![0u8; len]);
                dev.read_at(&mut got, off).unwrap();
                model.read_at(&mut want, off).unwrap();
                assert!(got == want, "op {i}: read {len} at {off:#x}");
            }
            _ => dev.barrier().unwrap(),
        }
    }
    dev.barrier().unwrap();
    drop(dev);
    let buffered = FileDevice::open(&path, false).unwrap();
    let (mut a, mut b) = (vec![0u8; SIZE as usize], vec![0u8; SIZE as usize]);
    buffered.read_at(&mut a, 0).unwrap();
    model.read_at(&mut b, 0).unwrap();
    assert!(a == b, "the file differs from the model");
    std::fs::remove_dir_all(&dir).unwrap();
}
