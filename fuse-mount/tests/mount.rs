//! mount.hammer2 end to end: the built binary mounts every PFS of every
//! reference image in `../shared/fixtures/hammer2/`, and the independent
//! checker `../shared/tools/treecheck.py` compares the mounted tree with
//! the image's manifest. Also: a damaged data block reads as EIO (and is
//! logged with its offset) while the rest reads fine; readdir continues
//! across calls without repeating or losing entries; the command-line
//! failures exit as documented; SIGTERM unmounts, also when busy.
//!
//! These tests need root and /dev/fuse, and fail (not skip) without them.
//! Every mount is undone by a guard's Drop, so a failing test leaves no
//! mount behind.

use bufcache::{BlockDevice, FileDevice};
use hammer2::chain;
use hammer2::disk::BlockrefType;
use hammer2::{Pfs, Volume};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

mod common;
use common::*;

/// telldir/seekdir through Python's os module.
const SEEKDIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/seekdir.py");

/// The clean image most tests use: the full tree, lz4 and xxhash64.
const FULL: &str = "v1-lz4-xxhash64";

/// PFS label -> path -> entry.
fn manifest(name: &str) -> BTreeMap<String, BTreeMap<String, Value>> {
    let text = std::fs::read_to_string(manifest_path(name)).expect("read manifest");
    let v: Value = serde_json::from_str(&text).expect("parse manifest");
    v["pfs"]
        .as_object()
        .expect("pfs object")
        .iter()
        .map(|(label, tree)| {
            let entries = tree
                .as_object()
                .expect("tree object")
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (label.clone(), entries)
        })
        .collect()
}

fn open_pfs(img: &Path, label: &str) -> Pfs {
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(img, false).expect("open image"));
    Pfs::open(Arc::new(Volume::open(dev).expect("open volume")), label).expect("open PFS")
}

/// Mount each PFS of `name` and require treecheck to find no difference.
fn treecheck_image(name: &str) {
    require_fuse();
    let img = fixture(name);
    let labels: Vec<String> = manifest(name).into_keys().collect();
    assert!(!labels.is_empty(), "{name}: manifest lists no PFS");
    for label in labels {
        let mnt = scratch(&format!("{name}-{label}"));
        let _m = Mounted::new(&format!("{}@{label}", img.display()), &mnt, &["-o", "ro"]);
        let root = std::fs::metadata(&mnt).expect("stat root");
        assert_eq!(root.ino(), 1, "{name}@{label}: root is node 1");
        assert!(root.is_dir());
        treecheck_mounted(name, &label, &mnt);
    }
}

/// treecheck of PFS `label` of fixture `name`, mounted on `mnt`.
fn treecheck_mounted(name: &str, label: &str, mnt: &Path) {
    {
        let out = Command::new("python3")
            .arg(TREECHECK)
            .arg("compare")
            .arg(mnt)
            .arg(manifest_path(name))
            .arg(label)
            .output()
            .expect("run python3 treecheck.py");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().unwrap_or("");
        println!("treecheck {name}@{label}: {last}");
        assert!(
            out.status.success() && last.ends_with(" entries, 0 differ"),
            "treecheck {name}@{label} failed:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `cache_size=` read-only: the image read through a 4 MiB buffer cache
/// (its 10 MiB of file data do not fit, so buffers are paged out while
/// it is read) matches the manifest.
#[test]
fn a_read_only_mount_reads_through_the_buffer_cache() {
    require_fuse();
    let img = fixture(FULL);
    let mnt = scratch("ro-cached");
    let log = scratch("ro-cached-log").join("log");
    let (mut child, m) = mount_foreground(img.to_str().unwrap(), &mnt, &log, "ro,cache_size=4M");
    treecheck_mounted(FULL, "DATA", &mnt);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("read-only") && text.contains("buffer cache of 4 MiB"),
        "{text}"
    );
    drop(m);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success(), "{status}");
}

#[test]
fn treecheck_v1_lz4_xxhash64() {
    treecheck_image("v1-lz4-xxhash64");
}

#[test]
fn treecheck_v2_lz4_xxhash64() {
    treecheck_image("v2-lz4-xxhash64");
}

#[test]
fn treecheck_v1_zlib_iscsi32() {
    treecheck_image("v1-zlib-iscsi32");
}

#[test]
fn treecheck_v1_none_xxhash64() {
    treecheck_image("v1-none-xxhash64");
}

#[test]
fn treecheck_v1_autozero_none() {
    treecheck_image("v1-autozero-none");
}

#[test]
fn treecheck_v1_snapshot() {
    treecheck_image("v1-snapshot");
}

#[test]
fn treecheck_v1_4headers_10g() {
    treecheck_image("v1-4headers-10g");
}

#[test]
fn treecheck_newfs_empty() {
    treecheck_image("newfs-v1-empty");
    treecheck_image("newfs-v2-empty");
}

/// Every fixture is covered by a test above.
#[test]
fn every_fixture_has_a_treecheck_test() {
    let covered = [
        "v1-lz4-xxhash64",
        "v2-lz4-xxhash64",
        "v1-zlib-iscsi32",
        "v1-none-xxhash64",
        "v1-autozero-none",
        "v1-snapshot",
        "v1-4headers-10g",
        "newfs-v1-empty",
        "newfs-v2-empty",
    ];
    let mut names: Vec<String> = std::fs::read_dir(FIXTURES)
        .expect("read fixture dir")
        .filter_map(|e| {
            let n = e.ok()?.file_name().into_string().ok()?;
            n.strip_suffix(".img.zst").map(str::to_string)
        })
        .collect();
    names.sort();
    for n in &names {
        assert!(covered.contains(&n.as_str()), "fixture {n} has no test");
    }
}

/// A directory of about a thousand entries takes many readdir replies;
/// the listing continues from each cookie without repeating or losing
/// an entry, seekdir goes back to any telldir position, and statfs and
/// stat report what the header and inodes say.
#[test]
fn readdir_continues_across_calls_and_statfs_matches_the_header() {
    require_fuse();
    let img = fixture(FULL);
    let mnt = scratch("readdir");
    let _m = Mounted::new(img.to_str().unwrap(), &mnt, &["-o", "ro"]);

    let want: BTreeSet<String> = manifest(FULL)["DATA"]
        .keys()
        .filter_map(|p| p.strip_prefix("big/"))
        .filter(|p| !p.contains('/'))
        .map(str::to_string)
        .collect();
    assert!(want.len() > 1000, "the big directory has {}", want.len());
    for pass in 0..2 {
        let names: Vec<String> = std::fs::read_dir(mnt.join("big"))
            .expect("read_dir big")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        let unique: BTreeSet<String> = names.iter().cloned().collect();
        assert_eq!(
            names.len(),
            unique.len(),
            "pass {pass}: an entry came twice"
        );
        assert_eq!(unique, want, "pass {pass}");
    }
    // telldir/seekdir: positions are cookies, resumed at any point.
    let out = Command::new("python3")
        .arg(SEEKDIR)
        .arg(mnt.join("big"))
        .output()
        .expect("run python3 seekdir.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("seekdir big: {}", stdout.trim_end());
    assert!(
        out.status.success(),
        "seekdir.py failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let pfs = open_pfs(&img, "DATA");
    let h = &pfs.volume().header;
    let st = nix::sys::statvfs::statvfs(&mnt).expect("statvfs");
    assert_eq!(st.block_size(), 65536);
    assert_eq!(st.fragment_size(), 65536);
    assert_eq!(st.blocks(), h.allocator_size / 65536);
    assert_eq!(st.blocks_free(), h.allocator_free / 65536);
    assert!(st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY));

    let ino = pfs.resolve("rand_70000.bin").expect("resolve");
    let md = std::fs::symlink_metadata(mnt.join("rand_70000.bin")).expect("stat");
    assert_eq!(md.ino(), ino.inum());
    assert_eq!(md.size(), 70000);
    // st_blocks: the space its blocks take (two data blocks, no
    // indirect block), summed from its blockrefs.
    let stored: u64 = ino.blockset().iter().map(|b| b.data_off.bytes()).sum();
    assert!(ino
        .blockset()
        .iter()
        .all(|b| b.btype != BlockrefType::Indirect));
    assert_eq!(md.blocks() * 512, stored);
    assert_eq!(md.blksize(), 65536);
    assert_eq!(md.mtime() as u64, ino.meta().mtime / 1_000_000);
    assert_eq!(md.nlink(), ino.meta().nlinks);
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("rand_70000.bin"))
        .expect_err("opened for writing");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
}

/// Directories report POSIX link counts (2 + subdirectories, as the
/// manifest's tree has them) though HAMMER2 stores 1; files report the
/// inode's count.
#[test]
fn directories_report_posix_link_counts() {
    require_fuse();
    let img = fixture(FULL);
    let mnt = scratch("dirlinks");
    let _m = Mounted::new(img.to_str().unwrap(), &mnt, &["-o", "ro"]);
    let tree = &manifest(FULL)["DATA"];
    let is_dir = |p: &str| tree[p]["type"] == "dir";
    let parent = |p: &str| p.rsplit_once('/').map_or("", |(d, _)| d).to_string();
    let mut dirs: Vec<String> = tree.keys().filter(|p| is_dir(p)).cloned().collect();
    dirs.push(String::new());
    assert!(dirs.len() > 10, "{} directories", dirs.len());
    for d in &dirs {
        let subdirs = dirs
            .iter()
            .filter(|s| !s.is_empty() && parent(s) == *d)
            .count();
        let md = std::fs::symlink_metadata(mnt.join(d)).expect("stat");
        assert_eq!(md.nlink(), 2 + subdirs as u64, "/{d}");
    }
    let pfs = open_pfs(&img, "DATA");
    assert_eq!(pfs.resolve("deep").expect("resolve").meta().nlinks, 1);
}

/// One flipped byte in a file's data block: reading that file fails
/// with EIO, the error is logged with the block's image offset and the
/// inode, and other files still read correctly.
#[test]
fn damaged_data_block_reads_as_eio_and_the_rest_reads() {
    require_fuse();
    let img = fixture_copy(FULL, "damaged");
    let (at, inum) = {
        let pfs = open_pfs(&img, "DATA");
        let ino = pfs.resolve("rand_65536.bin").expect("resolve");
        let brefs = chain::collect(pfs.volume(), &ino.blockset(), 0, u64::MAX).expect("collect");
        let br = brefs
            .iter()
            .find(|b| b.btype == BlockrefType::Data)
            .expect("a data block");
        (br.data_off.offset(), ino.inum())
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .expect("open image rw");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at + 100).expect("read byte");
    b[0] ^= 0xff;
    f.write_all_at(&b, at + 100).expect("write byte");
    drop(f);

    let clean = open_pfs(&fixture(FULL), "DATA");
    let mnt = scratch("damaged-mnt");
    let log = scratch("damaged").join("mount.log");
    let (mut child, _m) = mount_foreground(img.to_str().unwrap(), &mnt, &log, "ro");

    let err = std::fs::read(mnt.join("rand_65536.bin")).expect_err("damaged file read");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    for name in [
        "rand_65535.bin",
        "rand_65537.bin",
        "rand_1048583.bin",
        "link_short",
    ] {
        let ino = clean.resolve(name).expect("resolve");
        let want = clean.read_all(&ino).expect("read clean");
        let path = mnt.join(name);
        let have = if name.starts_with("link") {
            std::fs::read_link(&path)
                .expect("readlink")
                .into_os_string()
                .into_encoded_bytes()
        } else {
            std::fs::read(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        assert!(have == want, "{name} reads differently");
    }

    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(!is_mounted(&mnt), "still mounted after SIGTERM");
    let text = std::fs::read_to_string(&log).expect("read log");
    let line = text
        .lines()
        .find(|l| l.contains("check code mismatch"))
        .unwrap_or_else(|| panic!("no check-code error logged:\n{text}"));
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains(&format!("at {at:#x}")), "{line}");
    assert!(line.contains(&format!("inode {inum}")), "{line}");
    assert!(line.contains("offset 0x0"), "{line}");
}

/// SIGTERM while a file is open: the mount is detached at once, the open
/// file keeps reading, and the daemon exits when it is closed.
#[test]
fn sigterm_on_a_busy_mount_detaches_and_exits_when_the_last_file_closes() {
    require_fuse();
    let img = fixture(FULL);
    let mnt = scratch("busy");
    let log = scratch("busy-log").join("mount.log");
    let (mut child, _m) = mount_foreground(img.to_str().unwrap(), &mnt, &log, "ro");
    let f = File::open(mnt.join("rand_262145.bin")).expect("open");

    sigterm(&child);
    wait_until("the detach", Duration::from_secs(10), || !is_mounted(&mnt));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "exited while busy"
    );
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 200_000)
        .expect("read after detach");

    drop(f);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(
        status.success(),
        "exit after the last close: {status}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

#[test]
fn a_missing_label_exits_32_listing_the_labels() {
    require_fuse();
    let img = fixture("v1-snapshot");
    let mnt = scratch("nolabel");
    let out = run(&[&format!("{}@NOPE", img.display()), mnt.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(32), "{err}");
    assert!(err.contains("\"NOPE\""), "{err}");
    assert!(err.contains("it has: DATA, LOCAL, SNAP1"), "{err}");
    assert!(!is_mounted(&mnt));
}

/// Without ro or rw the mount is read-write
/// (`options::READ_WRITE_BY_DEFAULT`); of the two, the last wins. (A
/// private copy: a read-write mount may write the image.)
#[test]
fn read_write_unless_ro_comes_last() {
    require_fuse();
    let img = fixture_copy(FULL, "rw-or-not-img");
    let mnt = scratch("rw-or-not");
    for (opts, rdonly) in [
        ("defaults", !fuse_mount::options::READ_WRITE_BY_DEFAULT),
        ("rw,ro", true),
        ("ro,rw", false),
    ] {
        let m = Mounted::new(img.to_str().unwrap(), &mnt, &["-o", opts]);
        let st = nix::sys::statvfs::statvfs(&mnt).expect("statvfs");
        assert_eq!(
            st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY),
            rdonly,
            "-o {opts}"
        );
        // A read-write mount's umount returns after its last flush (and
        // the next mount would wait for it anyway).
        drop(m);
    }
}

/// A write-protected image (here: a read-only bind mount of its
/// directory) asked for read-write mounts read-only, with a warning, as
/// mount(8) does with a write-protected device.
#[test]
fn a_write_protected_image_mounts_read_only() {
    require_fuse();
    let img = fixture(FULL);
    let mnt = scratch("wp-mnt");
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount --bind \"$1\" \"$1\" && mount -o remount,bind,ro \"$1\" && \
             \"$0\" -o rw \"$2\" \"$3\" && stat -f -c %T \"$3\" && \
             grep \" $3 \" /proc/self/mounts && umount \"$3\"",
        )
        .args([BIN, img.parent().unwrap().to_str().unwrap()])
        .args([img.to_str().unwrap(), mnt.to_str().unwrap()])
        .output()
        .expect("run unshare");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("write-protected"), "{stderr}");
    assert!(stdout.contains(" ro,"), "{stdout}");
}

#[test]
fn usage_and_environment_failures_exit_as_documented() {
    let img = fixture(FULL);
    let mnt = scratch("usage");
    let img_s = img.to_str().unwrap();
    let mnt_s = mnt.to_str().unwrap();

    let out = run(&["-o", "ro,frobnicate", img_s, mnt_s]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("frobnicate"));

    let out = run(&[img_s]);
    assert_eq!(out.status.code(), Some(1), "missing mountpoint argument");

    let missing = mnt.join("no-such-dir");
    let out = run(&["-o", "ro", img_s, missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(32));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));

    let zeros = scratch("usage").join("zeros.img");
    File::create(&zeros)
        .and_then(|f| f.set_len(8 << 20))
        .expect("make zero image");
    let out = run(&[zeros.to_str().unwrap(), mnt_s]);
    assert_eq!(out.status.code(), Some(32));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a usable HAMMER2 image"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // No /dev/fuse: in a mount namespace whose /dev is an empty tmpfs
    // (in the foreground: the daemon's parent wants /dev/null).
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs none /dev && exec \"$0\" \"$@\"")
        .args([BIN, "-f", "-o", "ro", img_s, mnt_s])
        .output()
        .expect("run unshare");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(32), "{err}");
    assert!(err.contains("/dev/fuse does not exist"), "{err}");
    assert!(!is_mounted(&mnt));
}

/// Another user (nobody) with allow_other: without default_permissions
/// the mount checks the mode bits itself, with it the kernel does; both
/// refuse 0600 and 0640 root files and allow 0644 ones.
#[test]
fn other_users_get_what_the_mode_bits_give() {
    use std::os::unix::process::CommandExt;
    require_fuse();
    let img = fixture(FULL);
    for opts in ["ro,allow_other", "ro,allow_other,default_permissions"] {
        let mnt = scratch(&format!("perm-{opts}"));
        let _m = Mounted::new(img.to_str().unwrap(), &mnt, &["-o", opts]);
        let as_nobody = |prog: &str, name: &str| {
            Command::new(prog)
                .arg(mnt.join(name))
                .uid(65534)
                .gid(65534)
                .output()
                .expect("run as nobody")
        };
        for (name, readable) in [
            ("rand_300.bin", true),
            ("mode600", false),
            ("mode640", false),
        ] {
            let out = as_nobody("cat", name);
            assert_eq!(
                out.status.success(),
                readable,
                "-o {opts}: cat {name} as nobody: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            if !readable {
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(err.contains("Permission denied"), "-o {opts}: {err}");
            }
        }
        // stat needs no permission on the file, only search on the dirs.
        assert!(as_nobody("stat", "mode600").status.success(), "-o {opts}");
    }
    // Without allow_other nobody else gets in at all.
    let mnt = scratch("perm-owner");
    let _m = Mounted::new(img.to_str().unwrap(), &mnt, &["-o", "ro"]);
    let out = Command::new("stat")
        .arg(mnt.join("rand_300.bin"))
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run as nobody");
    assert!(!out.status.success(), "nobody got into an owner-only mount");
}
