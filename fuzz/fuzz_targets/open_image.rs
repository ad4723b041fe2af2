//! Fuzz target: a small image made by mkfs and filled through the
//! library, mutated in the blocks it uses (the input is a list of
//! (block, byte, xor) edits), then opened read-only, every PFS walked and
//! read, fsck run, and opened read-write with a write and a flush.
//! Errors are fine; a panic is a bug.
#![no_main]

use bufcache::{BlockDevice, MemDevice};
use hammer2::mount::{Mount, ROOT_INUM};
use hammer2::pfs::{pfs_list, Pfs};
use hammer2::Volume;
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};

const SIZE: u64 = 1 << 30;
const CHUNK: u64 = 1024;

/// The base image and the 1 KiB chunks of it that hold anything.
fn base() -> &'static (MemDevice, Vec<u64>) {
    static BASE: OnceLock<(MemDevice, Vec<u64>)> = OnceLock::new();
    BASE.get_or_init(|| {
        let dev = Arc::new(MemDevice::new(SIZE));
        let opts = mkfs::newfs::NewfsOptions {
            now_us: Some(1),
            uuid_seed: Some(1),
            ..Default::default()
        };
        mkfs::newfs::newfs(dev.as_ref(), &opts).expect("newfs");
        {
            let d: Arc<dyn BlockDevice> = dev.clone();
            let mut m = Mount::open(d).expect("open");
            let dir = m.mkdir("DATA", ROOT_INUM, b"dir", 0o755, 0, 0, 1).unwrap();
            for i in 0..40u32 {
                let name = format!("file-with-a-longer-name-{i:03}");
                let f = m
                    .create(
                        "DATA",
                        dir,
                        name.as_bytes(),
                        hammer2::disk::ObjType::Regfile,
                        0o644,
                        0,
                        0,
                        (0, 0),
                        1,
                    )
                    .unwrap();
                let body: Vec<u8> = (0..(i * 3001)).map(|j| (j % 7 + i) as u8).collect();
                m.write("DATA", f, 0, &body, 1).unwrap();
            }
            m.symlink("DATA", ROOT_INUM, b"ln", b"dir/x", 0, 0, 1).unwrap();
            m.flush().unwrap();
        }
        let mut used = Vec::new();
        let mut buf = vec![0u8; CHUNK as usize];
        let mut off = 0;
        while off < 64 << 20 {
            dev.read_at(&mut buf, off).unwrap();
            if buf.iter().any(|&b| b != 0) {
                used.push(off);
            }
            off += CHUNK;
        }
        (dev.snapshot(), used)
    })
}

fn walk(pfs: &Pfs, dir: &hammer2::pfs::Inode, depth: usize) {
    if depth > 8 {
        return;
    }
    let Ok(entries) = pfs.readdir(dir) else {
        return;
    };
    for e in entries.iter().take(64) {
        if let Ok(ino) = pfs.inode(e.inum) {
            let _ = pfs.read_all(&ino);
            walk(pfs, &ino, depth + 1);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (dev, used) = base();
    let img = dev.snapshot();
    for edit in data.chunks_exact(5) {
        let chunk = used[usize::from(u16::from_le_bytes([edit[0], edit[1]])) % used.len()];
        let at = chunk + u64::from(u16::from_le_bytes([edit[2], edit[3]])) % CHUNK;
        let mut b = [0u8; 1];
        img.read_at(&mut b, at).unwrap();
        b[0] ^= edit[4].max(1);
        img.write_at(&b, at).unwrap();
    }
    let img = Arc::new(img);
    let d: Arc<dyn BlockDevice> = img.clone();
    if let Ok(vol) = Volume::open(d.clone()) {
        let vol = Arc::new(vol);
        if let Ok(list) = pfs_list(&vol) {
            for p in list {
                if let Ok(pfs) = Pfs::open(vol.clone(), &p.label) {
                    if let Ok(root) = pfs.resolve("") {
                        walk(&pfs, &root, 0);
                    }
                }
            }
        }
    }
    let _ = hammer2::fsck::fsck(d.clone(), hammer2::fsck::Options::default());
    if let Ok(mut m) = Mount::open(d) {
        if let Ok(f) = m.create(
            "DATA",
            ROOT_INUM,
            b"new",
            hammer2::disk::ObjType::Regfile,
            0o644,
            0,
            0,
            (0, 0),
            2,
        ) {
            let _ = m.write("DATA", f, 0, &[7u8; 70_000], 2);
        }
        let _ = m.readdir("DATA", ROOT_INUM, 0);
        let _ = m.flush();
    }
});
