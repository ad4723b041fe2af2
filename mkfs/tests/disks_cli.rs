//! The tools on whole disks: a DragonFly MBR disk with a disklabel64 in
//! slice 1 and an extended partition, a GPT disk with a disklabel64
//! slice and a HAMMER2 partition, made by sfdisk, sgdisk and the
//! disklabel64 format. mkfs writes into the partition named and nothing
//! else; fsck and the hammer2 verbs find the HAMMER2 partition by
//! themselves when there is one, and say what there is when there is
//! none or several; `hammer2 probe` lists what each partition holds.

#[path = "../../tests/src/disks.rs"]
mod disks;

use disks::{fill, filled, gpt_disklabel64, mbr_disklabel64};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn scratch(tag: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("disks-cli-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin).args(args).output().unwrap()
}

fn mkfs(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_mkfs-hammer2"), args)
}
fn fsck(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_fsck-hammer2"), args)
}
fn h2(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_hammer2"), args)
}

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn an_mbr_disk_with_a_disklabel64_slice() {
    let dir = scratch("mbr");
    let img = dir.join("dfly.raw");
    let s = img.to_str().unwrap();
    let (s1a, _, s2, s5) = mbr_disklabel64(&img);
    for (p, tag) in [(s1a, 0xa1), (s2, 0xa2), (s5, 0xa5)] {
        fill(&img, p, tag);
    }
    let o = mkfs(&[&format!("{s}:s1d")]);
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        out(&o).starts_with(&format!("Volume {s}:s1d ")),
        "{}",
        out(&o)
    );
    // Nothing outside s1d changed, the label included.
    for (p, tag) in [(s1a, 0xa1), (s2, 0xa2), (s5, 0xa5)] {
        assert!(filled(&img, p, tag), "{p:?} was written");
    }
    let probe = h2(&["probe", s]);
    let text = out(&probe);
    assert!(probe.status.success(), "{text}");
    assert!(text.contains("MBR partition table"), "{text}");
    for (name, what) in [
        ("s1", "MBR 0x6c DragonFly"),
        ("s1a", "disklabel64 swap"),
        ("s1d", "disklabel64 HAMMER2"),
        ("s2", "MBR 0x83 Linux"),
        ("s5", "MBR 0x83 Linux"),
    ] {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("{s}:{name} ")))
            .unwrap_or_else(|| panic!("no row {name}: {text}"));
        assert!(row.contains(what), "{row}");
    }
    let row = text
        .lines()
        .find(|l| l.starts_with(&format!("{s}:s1d ")))
        .unwrap();
    assert!(
        row.contains("HAMMER2 version 2") && row.contains("PFS: DATA, LOCAL"),
        "{row}"
    );
    assert!(
        text.contains(&format!("the tools use {s}:s1d when given {s}")),
        "{text}"
    );
    // Found by itself.
    let o = fsck(&[s]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(
        out(&o).contains(&format!("checking {s}:s1d")),
        "{}",
        out(&o)
    );
    let o = h2(&["snapshot", &format!("{s}@DATA"), "SNAP1"]);
    assert!(o.status.success(), "{}", out(&o));
    // Linux's name for the same partition.
    let o = h2(&["pfs-list", &format!("{s}:p1d")]);
    assert!(out(&o).contains("SNAP1"), "{}", out(&o));
    // The logical partition, by either name.
    let o = mkfs(&["-f", &format!("{s}:p5")]);
    assert!(o.status.success(), "{}", out(&o));
    let o = fsck(&[&format!("{s}:s5")]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    // Now two: the tools want one named.
    let o = fsck(&[s]);
    assert_eq!(o.status.code(), Some(8), "{}", out(&o));
    assert!(
        out(&o).contains("2 partitions holding HAMMER2 volumes (s1d, s5)"),
        "{}",
        out(&o)
    );
    assert!(filled(&img, s1a, 0xa1) && filled(&img, s2, 0xa2));
}

#[test]
fn a_gpt_disk_with_a_disklabel64_slice_and_a_hammer2_partition() {
    let dir = scratch("gpt");
    let img = dir.join("gpt.raw");
    let s = img.to_str().unwrap();
    let (_, s2) = gpt_disklabel64(&img);
    fill(&img, s2, 0x22);
    // No HAMMER2 yet: the error lists the partitions.
    let o = fsck(&[s]);
    assert_eq!(o.status.code(), Some(8), "{}", out(&o));
    let t = out(&o);
    assert!(
        t.contains("no partition holds one") && t.contains("s1d (disklabel64 HAMMER2"),
        "{t}"
    );
    // p2d is Linux's name of s1d (GPT entries count from s0 in DragonFly).
    let o = mkfs(&[&format!("{s}:p2d")]);
    assert!(o.status.success(), "{}", out(&o));
    assert!(filled(&img, s2, 0x22));
    let o = h2(&["info", s]);
    assert!(o.status.success(), "{}", out(&o));
    let probe = out(&h2(&["probe", s]));
    assert!(probe.contains("GPT partition table"), "{probe}");
    let row = probe
        .lines()
        .find(|l| l.starts_with(&format!("{s}:s2 ")))
        .unwrap();
    assert!(row.contains("GPT DragonFly HAMMER2"), "{row}");
    let row = probe
        .lines()
        .find(|l| l.starts_with(&format!("{s}:s1 ")))
        .unwrap();
    assert!(row.contains("disklabel64 (partitions d)"), "{row}");
}

#[test]
fn refusals_name_what_is_there() {
    let dir = scratch("refuse");
    let img = dir.join("dfly.raw");
    let s = img.to_str().unwrap();
    let (_, _, s2, _) = mbr_disklabel64(&img);
    // The labelled slice itself: mkfs would destroy the label.
    let o = mkfs(&[&format!("{s}:s1")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        out(&o).contains("holding a disklabel64 (partitions s1a, s1d)"),
        "{}",
        out(&o)
    );
    // No such partition.
    let o = mkfs(&[&format!("{s}:s9")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        out(&o).contains("has no partition s9") && out(&o).contains("s5 (MBR 0x83"),
        "{}",
        out(&o)
    );
    // A partition holding ext4, found by blkid in the partition's range.
    let mk = Command::new("mkfs.ext4")
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .args(["-q", "-F", "-E", &format!("offset={}", s2.start)])
        .arg(&img)
        .arg(format!("{}k", s2.size / 1024))
        .output()
        .expect("mkfs.ext4 (e2fsprogs; scripts/test installs it)");
    assert!(mk.status.success(), "{}", out(&mk));
    let o = mkfs(&[&format!("{s}:s2")]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("ext4"), "{}", out(&o));
    assert!(mkfs(&["-f", &format!("{s}:s2")]).status.success());
    // Not partitioned: a partition cannot be found in it.
    let plain = dir.join("plain.img");
    std::fs::File::create(&plain)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let o = fsck(&[&format!("{}:s1", plain.display())]);
    assert_eq!(o.status.code(), Some(8));
    assert!(out(&o).contains("has no partition table"), "{}", out(&o));
    // probe takes a whole disk.
    let o = h2(&["probe", &format!("{s}:s1d")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).contains("whole disk"), "{}", out(&o));
}
