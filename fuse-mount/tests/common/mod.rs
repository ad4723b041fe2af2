//! Helpers shared by the mount tests: root and /dev/fuse, scratch
//! directories, the reference images, mounting and unmounting guards,
//! running the binary.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_mount-hammer2");
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures/hammer2");
pub const TREECHECK: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/tools/treecheck.py"
);

/// Root and /dev/fuse, or a loud failure.
pub fn require_fuse() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the mount tests need root (they mount with mount(2))"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "the mount tests need /dev/fuse: load the fuse module (modprobe fuse) \
         or give the container the device"
    );
}

/// A directory for this test process (`mount-PID` under cargo's test
/// temp dir); those of earlier runs, whose process is gone, are removed
/// the first time.
pub fn scratch(tag: &str) -> PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        for e in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix("mount-") else {
                continue;
            };
            if !Path::new("/proc").join(pid).exists() {
                // A mount left inside (its daemon may still run) is
                // detached first, so removing cannot reach into it.
                for mnt in mounts_under(&e.path()) {
                    let _ = nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH);
                }
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        tmp.join(format!("mount-{}", std::process::id()))
    });
    let p = base.join(tag);
    std::fs::create_dir_all(&p).expect("create scratch dir");
    p
}

/// Decompress `src` (zstd) into `dst`, leaving zero runs as holes.
pub fn restore_sparse(src: &Path, dst: &Path) -> std::io::Result<()> {
    const CHUNK: usize = 65536;
    static ZEROS: [u8; CHUNK] = [0; CHUNK];
    let mut dec = zstd::stream::read::Decoder::new(File::open(src)?)?;
    let mut out = File::create(dst)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
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
        for chunk in buf[..filled].chunks(CHUNK) {
            if chunk == &ZEROS[..chunk.len()] {
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

/// Fixture `name` restored once per test process (different images in
/// parallel).
pub fn fixture(name: &str) -> PathBuf {
    static IMAGES: OnceLock<Mutex<BTreeMap<String, Arc<OnceLock<PathBuf>>>>> = OnceLock::new();
    let cell = IMAGES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(name.to_string())
        .or_default()
        .clone();
    cell.get_or_init(|| {
        let dst = scratch("fixtures").join(format!("{name}.img"));
        let src = Path::new(FIXTURES).join(format!("{name}.img.zst"));
        restore_sparse(&src, &dst).unwrap_or_else(|e| panic!("restore {}: {e}", src.display()));
        dst
    })
    .clone()
}

/// A private copy of a fixture, to damage.
pub fn fixture_copy(name: &str, tag: &str) -> PathBuf {
    let src = fixture(name);
    let dst = scratch(tag).join(format!("{name}.img"));
    let ok = Command::new("cp")
        .arg("--sparse=always")
        .arg(&src)
        .arg(&dst)
        .status()
        .expect("run cp")
        .success();
    assert!(ok, "cp {} failed", src.display());
    dst
}

pub fn manifest_path(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(format!("{name}.json"))
}

/// Mountpoints at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v
}

/// Is `mnt` a mountpoint now? (/proc/self/mountinfo, field 5.)
pub fn is_mounted(mnt: &Path) -> bool {
    let mnt = mnt.canonicalize().unwrap_or_else(|_| mnt.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| Path::new(p) == mnt)
}

pub fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Unmounts on drop, whatever happened in between.
pub struct Mounted {
    pub mnt: PathBuf,
}

impl Mounted {
    /// Mount in the background (the default mode): the command returns
    /// once the mount is up.
    pub fn new(source: &str, mnt: &Path, args: &[&str]) -> Mounted {
        let out = run(&[&[source, mnt.to_str().unwrap()], args].concat());
        let guard = Mounted {
            mnt: mnt.to_path_buf(),
        };
        assert!(
            out.status.success(),
            "mount.hammer2 {source} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            is_mounted(mnt),
            "mount.hammer2 returned before {} was mounted",
            mnt.display()
        );
        guard
    }

    /// Track a mount made some other way (a foreground process).
    pub fn adopt(mnt: &Path) -> Mounted {
        Mounted {
            mnt: mnt.to_path_buf(),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if !is_mounted(&self.mnt) {
            return;
        }
        if nix::mount::umount(&self.mnt).is_err() {
            let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// umount(2) `mnt`, again while it is EBUSY for a moment: a child
/// another test forks holds this test's open descriptors (close-on-exec
/// or not) between its fork and its exec.
pub fn umount_settled(mnt: &Path) {
    let mut tries = 0;
    while let Err(e) = nix::mount::umount(mnt) {
        tries += 1;
        assert!(
            e == nix::errno::Errno::EBUSY && tries < 100,
            "umount {}: {e}",
            mnt.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Run mount.hammer2 to completion.
pub fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run mount.hammer2")
}

/// A foreground mount (-f), its stderr going to `log`, once mounted.
pub fn mount_foreground(source: &str, mnt: &Path, log: &Path, opts: &str) -> (Child, Mounted) {
    mount_foreground_env(source, mnt, log, opts, &[])
}

/// `mount_foreground` with `env` added to the daemon's environment.
pub fn mount_foreground_env(
    source: &str,
    mnt: &Path,
    log: &Path,
    opts: &str,
    env: &[(&str, &str)],
) -> (Child, Mounted) {
    let mut child = Command::new(BIN)
        .args(["-f", "-o", opts, source, mnt.to_str().unwrap()])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stderr(File::create(log).expect("create log"))
        .spawn()
        .expect("start mount.hammer2 -f");
    let guard = Mounted::adopt(mnt);
    let mut exited = None;
    wait_until("the foreground mount", Duration::from_secs(10), || {
        exited = child.try_wait().expect("wait");
        exited.is_some() || is_mounted(mnt)
    });
    if let Some(status) = exited {
        panic!(
            "mount.hammer2 -f exited ({status}):\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    (child, guard)
}

pub fn sigterm(child: &Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("kill -TERM");
}

pub fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("mount.hammer2 did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fresh volume of `gib` GiB (sparse), made by mkfs with its defaults.
pub fn new_volume(tag: &str, gib: u64) -> PathBuf {
    let path = scratch(tag).join("disk.img");
    File::create(&path)
        .and_then(|f| f.set_len(gib << 30))
        .expect("create image");
    let dev = bufcache::FileDevice::open(&path, true).expect("open image");
    mkfs::newfs::newfs(&dev, &mkfs::newfs::NewfsOptions::default()).expect("newfs");
    path
}

/// fsck of every PFS of `img` (with its freemap cross-check), which
/// must find no problem.
pub fn fsck_clean(img: &Path) {
    fsck_report(img);
}

/// `fsck_clean`, and no warning either (an orphan would be one).
pub fn fsck_spotless(img: &Path) {
    let warnings: Vec<String> = fsck_report(img)
        .warnings
        .iter()
        .map(|w| w.to_string())
        .collect();
    assert!(warnings.is_empty(), "fsck warnings: {warnings:#?}");
}

fn fsck_report(img: &Path) -> hammer2::fsck::Report {
    let dev: Arc<dyn bufcache::BlockDevice> =
        Arc::new(bufcache::FileDevice::open(img, false).expect("open image"));
    let r = hammer2::fsck::fsck(dev, hammer2::fsck::Options::default()).expect("fsck");
    let problems: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
    assert!(problems.is_empty(), "fsck: {problems:#?}");
    r
}

/// A foreground read-write mount; `unmount` waits for the daemon's exit.
pub struct Rw {
    pub child: Option<Child>,
    pub guard: Option<Mounted>,
    pub log: PathBuf,
}

impl Rw {
    pub fn new(img: &Path, mnt: &Path, opts: &str) -> Rw {
        let log = mnt.with_extension("log");
        let (child, guard) = mount_foreground(img.to_str().unwrap(), mnt, &log, opts);
        Rw {
            child: Some(child),
            guard: Some(guard),
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Unmount and wait (two minutes at most) for a clean exit; the log.
    pub fn unmount(mut self) -> String {
        let guard = self.guard.take().expect("mounted");
        umount_settled(&guard.mnt);
        let mut child = self.child.take().expect("running");
        let status = wait_exit(&mut child, Duration::from_secs(120));
        assert!(
            status.success(),
            "mount.hammer2 exited {status}:\n{}",
            self.log()
        );
        self.log()
    }

    /// kill -9 the daemon, as a crash would, and detach its mountpoint.
    pub fn crash(mut self) -> String {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(g) = self.guard.take() {
            let _ = nix::mount::umount2(&g.mnt, nix::mount::MntFlags::MNT_DETACH);
            std::mem::forget(g);
        }
        self.log()
    }
}

impl Drop for Rw {
    fn drop(&mut self) {
        drop(self.guard.take());
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Bytes no compressor shrinks and dedup never matches (xorshift64 from
/// `seed`).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// xorshift64 for choices.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in 0..n (0 for n = 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// An index uniform in 0..n (0 for n = 0).
    pub fn pick(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }
}

/// A long test's run time: `var` in seconds if set and a number, else
/// `default_secs`.
pub fn run_seconds(var: &str, default_secs: u64) -> std::time::Duration {
    std::time::Duration::from_secs(
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default_secs),
    )
}
