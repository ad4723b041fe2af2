//! Shared helpers for the integration tests: restoring the reference
//! images from `../shared/fixtures/hammer2/` (sparse, into a temporary
//! directory), reading their manifests, and walking a PFS through the
//! library into the same manifest shape.

#![forbid(unsafe_code)]

pub mod ace;
pub mod cold;
pub mod craft;
pub mod damage;
pub mod disks;
pub mod freemap_check;
pub mod nbdserver;
pub mod sim;

use bufcache::{BlockDevice, FileDevice};
use hammer2::pfs::Pfs;
use hammer2::{disk::ObjType, Volume};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// The fixture directory beside the project.
pub fn fixture_dir() -> PathBuf {
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

/// Names of every fixture image (without `.img.zst`).
pub fn fixture_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixture_dir())
        .expect("read fixture dir")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".img.zst"))
                .map(str::to_string)
        })
        .collect();
    names.sort();
    names
}

/// A scratch directory for this test process (`hammer2-tests-PID` in the
/// temp dir); each test gets its own subdirectory. Those of earlier test
/// processes that are gone are removed the first time, so a run leaves
/// at most its own behind (restored fixtures and damaged copies, tens of
/// MiB per process) for a failure to be looked at.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        let tmp = std::env::temp_dir();
        for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("hammer2-tests-") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let p = tmp.join(format!("hammer2-tests-{}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create scratch dir");
        p
    });
    let p = base.join(tag);
    std::fs::create_dir_all(&p).expect("create scratch subdir");
    p
}

/// Decompress `src` (zstd) into `dst`, leaving runs of zeros as holes.
pub fn restore_sparse(src: &Path, dst: &Path) -> std::io::Result<()> {
    let mut dec = zstd::stream::read::Decoder::new(File::open(src)?)?;
    let mut out = File::create(dst)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut len: u64 = 0;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = dec.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        for chunk in buf[..filled].chunks(65536) {
            if chunk.iter().all(|&b| b == 0) {
                out.seek(SeekFrom::Current(chunk.len() as i64))?;
            } else {
                out.write_all(chunk)?;
            }
            len += chunk.len() as u64;
        }
    }
    out.set_len(len)?;
    Ok(())
}

/// A private copy of fixture `name`, restored once per process and then
/// copied (sparse) for each caller that wants to damage it.
pub fn fixture_image(name: &str) -> PathBuf {
    static RESTORED: OnceLock<Mutex<BTreeMap<String, PathBuf>>> = OnceLock::new();
    let map = RESTORED.get_or_init(|| Mutex::new(BTreeMap::new()));
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = map.get(name) {
        return p.clone();
    }
    let dst = scratch_dir("fixtures").join(format!("{name}.img"));
    restore_sparse(&fixture_dir().join(format!("{name}.img.zst")), &dst).expect("restore fixture");
    map.insert(name.to_string(), dst.clone());
    dst
}

/// A writable copy of fixture `name` for a test to damage (`cp`
/// skips the holes, so a 10 GiB image copies in milliseconds).
pub fn fixture_copy(name: &str, tag: &str) -> PathBuf {
    let src = fixture_image(name);
    let dst = scratch_dir(tag).join(format!("{name}.img"));
    let status = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(&src)
        .arg(&dst)
        .status()
        .expect("run cp");
    assert!(status.success(), "cp {} failed", src.display());
    let mut perms = std::fs::metadata(&dst).expect("stat copy").permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&dst, perms).expect("chmod copy");
    dst
}

/// The manifest of fixture `name`: PFS label -> path -> entry.
pub fn manifest(name: &str) -> BTreeMap<String, BTreeMap<String, Value>> {
    let text =
        std::fs::read_to_string(fixture_dir().join(format!("{name}.json"))).expect("read manifest");
    let v: Value = serde_json::from_str(&text).expect("parse manifest");
    let mut out = BTreeMap::new();
    for (label, tree) in v["pfs"].as_object().expect("pfs object") {
        let entries = tree
            .as_object()
            .expect("tree object")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.insert(label.clone(), entries);
    }
    out
}

pub fn open_volume(path: &Path) -> hammer2::Result<Arc<Volume>> {
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(path, false).expect("open image"));
    Volume::open(dev).map(Arc::new)
}

pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Describe a PFS the way the manifests do, reading everything through
/// the library: path -> {type, mode, uid, gid, mtime, size, sha256 |
/// target}. Unreadable entries carry an "error" key instead.
pub fn describe_pfs(pfs: &Pfs) -> hammer2::Result<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(String::new(), pfs.root.clone())];
    while let Some((prefix, dir)) = stack.pop() {
        for e in pfs.readdir(&dir)? {
            let name = String::from_utf8_lossy(&e.name).into_owned();
            let path = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let ino = pfs.inode(e.inum)?;
            let m = ino.meta();
            let mut entry = serde_json::Map::new();
            entry.insert(
                "mode".into(),
                Value::String(format!("0o{:o}", m.mode & 0o7777)),
            );
            entry.insert("uid".into(), Value::from(m.uid_unix()));
            entry.insert("gid".into(), Value::from(m.gid_unix()));
            entry.insert("mtime".into(), Value::from(m.mtime / 1_000_000));
            match ino.obj_type() {
                ObjType::Directory => {
                    entry.insert("type".into(), Value::String("dir".into()));
                    stack.push((path.clone(), ino.clone()));
                }
                ObjType::Softlink => {
                    entry.insert("type".into(), Value::String("symlink".into()));
                    let t = pfs.readlink(&ino)?;
                    entry.insert(
                        "target".into(),
                        Value::String(String::from_utf8_lossy(&t).into_owned()),
                    );
                }
                _ => {
                    entry.insert("type".into(), Value::String("file".into()));
                    entry.insert("size".into(), Value::from(m.size));
                    match pfs.read_all(&ino) {
                        Ok(data) => {
                            entry.insert("sha256".into(), Value::String(sha256_hex(&data)));
                        }
                        Err(e) => {
                            entry.insert("error".into(), Value::String(e.to_string()));
                        }
                    }
                }
            }
            out.insert(path, Value::Object(entry));
        }
    }
    Ok(out)
}

/// Compare a described tree with a manifest: the keys a manifest entry
/// has are compared; every path must be in both. Returns the differences.
pub fn diff_manifest(
    want: &BTreeMap<String, Value>,
    have: &BTreeMap<String, Value>,
) -> Vec<String> {
    let mut diffs = Vec::new();
    for (path, w) in want {
        let Some(h) = have.get(path) else {
            diffs.push(format!("missing: {path}"));
            continue;
        };
        for (k, wv) in w.as_object().into_iter().flatten() {
            let hv = h.get(k);
            if hv != Some(wv) {
                diffs.push(format!("{path}: {k}: want {wv}, have {hv:?}"));
            }
        }
    }
    for path in have.keys() {
        if !want.contains_key(path) {
            diffs.push(format!("extra: {path}"));
        }
    }
    diffs
}

/// The path of a workspace binary (built by `cargo test --workspace`
/// beside this test executable's `deps/` directory).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace` or `cargo test --workspace`",
        p.display()
    );
    p
}

/// Flip the bits of one byte of an image file.
pub fn flip_byte(path: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open image rw");
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).expect("read byte");
    b[0] ^= 0xff;
    f.write_all_at(&b, offset).expect("write byte");
}

/// Write a memory device's contents to a sparse file (to keep an image a
/// test made, for checking with other tools).
pub fn save_sparse(dev: &bufcache::MemDevice, path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = File::create(path).expect("create image file");
    f.set_len(dev.size_bytes()).expect("size image file");
    let mut buf = vec![0u8; 65536];
    let mut off = 0;
    while off < dev.size_bytes() {
        dev.read_at(&mut buf, off).expect("read memory device");
        if buf.iter().any(|&b| b != 0) {
            f.write_all_at(&buf, off).expect("write image file");
        }
        off += 65536;
    }
}

/// DragonFly's fsck on an image a test made, where the suite has it:
/// `H2_DFLY_FSCK` holds one or more commands separated by `;` (say the
/// C `fsck_hammer2` and the Rust port), each run as `sh -c 'CMD "$1"'`
/// with the image file as `$1`; each must exit 0. Returns how many ran
/// (0 without the variable: the suite has no such tools here).
pub fn dragonfly_fsck(dev: &bufcache::MemDevice, tag: &str) -> usize {
    let Ok(cmds) = std::env::var("H2_DFLY_FSCK") else {
        return 0;
    };
    let img = scratch_dir("dfly-fsck").join(format!("{tag}.img"));
    save_sparse(dev, &img);
    let mut ran = 0;
    for cmd in cmds.split(';').map(str::trim).filter(|c| !c.is_empty()) {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{cmd} \"$1\""))
            .arg("sh")
            .arg(&img)
            .output()
            .unwrap_or_else(|e| panic!("{cmd}: {e}"));
        assert!(
            out.status.success(),
            "{cmd} {}: {}\n{}{}",
            img.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ran += 1;
    }
    let _ = std::fs::remove_file(&img);
    ran
}

/// A memory image that counts the reads that reach it, independently of
/// the library (what a cache above it saved).
pub struct CountingDevice {
    pub dev: bufcache::MemDevice,
    pub reads: std::sync::atomic::AtomicU64,
}

impl CountingDevice {
    pub fn new(bytes: u64) -> CountingDevice {
        CountingDevice {
            dev: bufcache::MemDevice::new(bytes),
            reads: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Reads so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl bufcache::BlockDevice for CountingDevice {
    fn size_bytes(&self) -> u64 {
        self.dev.size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dev.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.dev.write_at(buf, offset)
    }
    fn barrier(&self) -> std::io::Result<()> {
        self.dev.barrier()
    }
}

/// `len` bytes no compressor shrinks and dedup does not match across
/// seeds (xorshift64 from `seed`).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Inode times the tests stamp on fresh images (microseconds).
pub const T0: u64 = 1_700_000_000_000_000;

/// A fresh 2 GiB image made by mkfs on a memory device: version 1 for
/// even seeds, 2 for odd ones; times T0, UUIDs from the seed.
pub fn new_fs(seed: u64) -> Arc<bufcache::MemDevice> {
    new_fs_bytes(seed, 2 << 30)
}

/// `new_fs` of `bytes` (2 GiB + 4 MiB and more hold two volume header
/// copies, 6 GiB + 4 MiB and more all four).
pub fn new_fs_bytes(seed: u64, bytes: u64) -> Arc<bufcache::MemDevice> {
    let dev = Arc::new(bufcache::MemDevice::new(bytes));
    let opts = mkfs::newfs::NewfsOptions {
        version: if seed.is_multiple_of(2) { 1 } else { 2 },
        now_us: Some(T0),
        uuid_seed: Some(seed),
        ..Default::default()
    };
    mkfs::newfs::newfs(dev.as_ref(), &opts).expect("newfs");
    dev
}

/// Create an empty regular file `name` in directory `dir` of PFS `label`:
/// mode 0644, owned by root, stamped `T0`.
pub fn create_file(
    m: &mut hammer2::mount::Mount,
    label: &str,
    dir: u64,
    name: &[u8],
) -> hammer2::Result<u64> {
    m.create(
        label,
        dir,
        name,
        hammer2::disk::ObjType::Regfile,
        0o644,
        0,
        0,
        (0, 0),
        T0,
    )
}

/// Open a memory image read-write.
pub fn open(dev: &Arc<bufcache::MemDevice>) -> hammer2::mount::Mount {
    let d: Arc<dyn BlockDevice> = dev.clone();
    hammer2::mount::Mount::open(d).expect("open read-write")
}

/// A read-write mount of `dev` with `chunks` whole free 64 KiB chunks
/// left, all of them the flush reserve (the rest taken as if by data
/// never linked in): a full volume whose flush still has `chunks`.
pub fn open_nearly_full(dev: &Arc<bufcache::MemDevice>, chunks: u64) -> hammer2::mount::Mount {
    let d: Arc<dyn BlockDevice> = dev.clone();
    let vol = hammer2::Volume::open(d.clone()).expect("open volume");
    let mut alloc = hammer2::alloc::Allocator::load(&vol).expect("load freemap");
    alloc.recover(&vol).expect("recover freemap");
    while alloc.free_chunk_bytes() > chunks * 65536 {
        alloc
            .alloc_flush(hammer2::disk::BlockrefType::Data, 65536)
            .expect("fill");
    }
    alloc.set_reserve_bytes(alloc.free_chunk_bytes());
    hammer2::mount::Mount::open_with(d, Box::new(alloc)).expect("open read-write")
}
