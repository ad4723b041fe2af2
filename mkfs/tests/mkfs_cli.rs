//! mkfs.hammer2 as a command: exit codes, messages, image files.

use bufcache::{BlockDevice, FileDevice};
use hammer2::disk::VolumeHeader;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `mkfs-cli-TAG` under cargo's test temp dir, emptied first: a run leaves
/// one per test, inside the target directory.
fn scratch(tag: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("mkfs-cli-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn mkfs(args: &[&str], img: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mkfs-hammer2"))
        .args(args)
        .arg(img)
        .output()
        .unwrap()
}

/// The project's fsck.hammer2 finds the image clean.
fn assert_fsck_clean(img: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_fsck-hammer2"))
        .arg(img)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn creates_a_sparse_image_and_prints_the_summary() {
    let dir = scratch("create");
    let img = dir.join("a.img");
    let out = mkfs(&["-s", "2G"], &img);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("Volume ") && lines[0].ends_with("size   2.00GB"));
    assert_eq!(lines[1], "-".repeat(45));
    assert_eq!(lines[2], "version:          2");
    assert_eq!(lines[7], "free-size:          1.87GB (2004877312 bytes)");
    assert!(stdout.contains("PFS \"LOCAL\"\n") && stdout.contains("PFS \"DATA\"\n"));
    let meta = std::fs::metadata(&img).unwrap();
    assert_eq!(meta.len(), 2 << 30);
    assert!(meta.blocks() * 512 < 16 << 20, "image is sparse");
    let dev = FileDevice::open(&img, false).unwrap();
    let mut buf = vec![0u8; 65536];
    dev.read_at(&mut buf, 0).unwrap();
    let vh = VolumeHeader::decode(&buf, 0).unwrap();
    assert!(vh.crcs().all_good());
    assert_eq!(vh.version, 2);
    assert_fsck_clean(&img);

    // A second run needs -f.
    let out = mkfs(&["-V", "1"], &img);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("already holds a HAMMER2 filesystem"));
    let out = mkfs(&["-f", "-V", "1", "-L", "none"], &img);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("version:          1\n"));
    assert!(stdout.contains("PFS \"LOCAL\"") && !stdout.contains("PFS \"DATA\""));
    assert_fsck_clean(&img);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn usage_errors_exit_2() {
    let dir = scratch("usage");
    let img = dir.join("u.img");
    for args in [
        &["-s", "512M"][..],
        &["-s", "2X"],
        &["-s", "1028M"],
        &["-V", "3"],
        &["-b", "512M", "-s", "2G"],
        &["-L", "", "-s", "2G"],
        &["-q"],
    ] {
        let out = mkfs(args, &img);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(!img.exists(), "{args:?} created the image");
    }
    let out = mkfs(&["-s", "512M"], &img);
    assert!(text(&out.stderr).contains("Value too small: 512M, min is 1.00GB"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn errors_exit_1_and_leave_no_new_file() {
    let dir = scratch("errors");
    let img = dir.join("e.img");
    // Missing image without -s.
    let out = mkfs(&[], &img);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("does not exist"));
    // Too many labels: checked before the file is created.
    let out = mkfs(
        &["-s", "2G", "-L", "A", "-L", "B", "-L", "C", "-L", "D"],
        &img,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("Limit of 3 local labels"));
    assert!(!img.exists());
    // Areas that leave no room: the file made for it is removed.
    let out = mkfs(&["-s", "1G", "-b", "256M", "-r", "1G"], &img);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not enough free space"));
    assert!(!img.exists());
    // An existing file too small for anything.
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let out = mkfs(&[], &img);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not enough free space"));
    assert!(img.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn existing_file_is_grown_to_the_size_asked() {
    let dir = scratch("grow");
    let img = dir.join("g.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let out = mkfs(&["-s", "3G"], &img);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 3 << 30);
    assert!(text(&out.stdout).contains("total-size:         3.00GB"));
    assert_fsck_clean(&img);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Run a system tool (mkfs.ext4, mkswap: e2fsprogs and util-linux) and
/// require success.
fn tool(cmd: &str, args: &[&str], target: &Path) {
    let out = Command::new(cmd)
        .args(args)
        .arg(target)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd} (e2fsprogs, util-linux): {e}"));
    assert!(out.status.success(), "{cmd}: {}", text(&out.stderr));
}

/// A DOS partition table as fdisk writes one: one Linux partition from
/// sector 2048, and the 0x55AA signature.
fn write_mbr(img: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    let mut entry = [0u8; 16];
    entry[4] = 0x83;
    entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
    entry[12..16].copy_from_slice(&(64u32 << 11).to_le_bytes());
    f.write_all_at(&entry, 446).unwrap();
    f.write_all_at(&[0x55, 0xaa], 510).unwrap();
}

/// As mkfs.ext4: without -f, mkfs.hammer2 refuses a target holding any
/// filesystem or partition table blkid knows, not only HAMMER2, and says
/// what it found; nothing is written. -f makes the filesystem.
#[test]
fn other_filesystems_and_partition_tables_need_f() {
    let dir = scratch("others");
    type Case<'a> = (&'a str, &'a dyn Fn(&Path), &'a str);
    let cases: [Case; 3] = [
        (
            "ext4",
            &|p| tool("mkfs.ext4", &["-q", "-F"], p),
            "a filesystem of type ext4",
        ),
        ("swap", &|p| tool("mkswap", &[], p), "a swap area"),
        ("mbr", &|p| write_mbr(p), "a partition table of type dos"),
    ];
    for (name, make, what) in cases {
        let img = dir.join(format!("{name}.img"));
        std::fs::File::create(&img)
            .unwrap()
            .set_len(128 << 20)
            .unwrap();
        make(&img);
        let before = std::fs::read(&img).unwrap();
        let out = mkfs(&[], &img);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(
            err.contains(&format!("already holds {what}")),
            "{name}: {err}"
        );
        assert!(err.contains("use -f"), "{name}: {err}");
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        assert!(std::fs::read(&img).unwrap() == before, "{name}: changed");
        let out = mkfs(&["-f"], &img);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", text(&out.stderr));
        assert_fsck_clean(&img);
        std::fs::remove_file(&img).unwrap();
    }
    // Zeros hold nothing: no -f needed.
    let img = dir.join("zeros.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let out = mkfs(&[], &img);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}
