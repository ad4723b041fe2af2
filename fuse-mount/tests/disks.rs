//! Disks as users have them, through mount(8) and the tools: a DragonFly
//! MBR disk with a disklabel64, a GPT disk, a qcow2 of the MBR disk
//! served by qemu-nbd, and raw images over qemu-nbd and nbdkit on unix
//! sockets and loopback. Each: mkfs (into the partition, or over NBD),
//! `mount -t hammer2` with the partition found by itself (or an fstab
//! line through `mount -T`), a tree written, unmounted, fsck clean, read
//! back exactly read-only; `mount -o remount,ro` and back; and a server
//! killed in the middle of writes: the writes fail, the mount is
//! poisoned, and once the server is back the image is fsck-clean with
//! everything fsync'd before the kill.
//!
//! mount(8) looks for its helpers in /sbin only; the scenarios run in a
//! private mount namespace (`unshare -m`) where /usr/sbin is overlaid
//! with the helpers (`mount.hammer2`, `mount.fuse.hammer2`,
//! `mount.fuseblk.hammer2`) linked to this build, so nothing outside the
//! test changes. Needs root, /dev/fuse, loop devices, util-linux, fdisk,
//! gdisk, qemu-utils and nbdkit (scripts/test installs them) and the
//! tools built (`cargo build --workspace --bins`).

mod common;
#[path = "../../tests/src/disks.rs"]
mod disks;
#[path = "../../tests/src/nbdserver.rs"]
mod nbdserver;

use common::{require_fuse, scratch, BIN};
use nbdserver::{available, NbdServer, Server};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn workspace_bin(name: &str) -> PathBuf {
    let p = Path::new(BIN).parent().unwrap().join(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

fn tool(name: &str, args: &[&str]) -> Output {
    Command::new(workspace_bin(name))
        .args(args)
        .output()
        .expect("run tool")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn fsck_clean(spec: &str) -> String {
    let o = tool("fsck-hammer2", &[spec]);
    assert_eq!(o.status.code(), Some(0), "fsck {spec}: {}", text(&o));
    text(&o)
}

/// A small tree to copy in: nested directories, empty, small, odd-sized
/// and multi-block files, a symlink.
fn make_tree(dir: &Path) -> PathBuf {
    let t = dir.join("tree");
    let _ = std::fs::remove_dir_all(&t);
    for d in 0..4 {
        let sub = t.join(format!("d{d}/e{}", d * 7));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..12u32 {
            let len = [0usize, 1, 511, 4096, 65537, 300_001][(f % 6) as usize];
            let data: Vec<u8> = (0..len)
                .map(|i| (i as u32 * 31 + f * 7 + d) as u8)
                .collect();
            let file = sub.join(format!("f{f}.bin"));
            std::fs::write(&file, data).unwrap();
            let mode = [0o644, 0o600, 0o755, 0o640][(f % 4) as usize];
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }
    std::fs::set_permissions(t.join("d2"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("d0/e0/f3.bin", t.join("link")).unwrap();
    t
}

/// Run `script` (sh, `set -e`) in a private mount namespace whose /sbin
/// has this build's mount helpers. `$B` is the directory of the built
/// tools.
fn in_namespace(dir: &Path, script: &str) -> Output {
    require_fuse();
    let helpers = dir.join("helpers");
    let _ = std::fs::remove_dir_all(&helpers);
    std::fs::create_dir_all(&helpers).unwrap();
    for n in [
        "mount.hammer2",
        "mount.fuse.hammer2",
        "mount.fuseblk.hammer2",
    ] {
        std::os::unix::fs::symlink(BIN, helpers.join(n)).unwrap();
    }
    let sbin = std::fs::canonicalize("/sbin").unwrap();
    let full = format!(
        "set -e\nmount -t overlay overlay -o lowerdir={}:{} {}\n{script}",
        helpers.display(),
        sbin.display(),
        sbin.display()
    );
    let mut c = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-s"])
        .env("B", Path::new(BIN).parent().unwrap())
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare (util-linux)");
    c.stdin.take().unwrap().write_all(full.as_bytes()).unwrap();
    c.wait_with_output().unwrap()
}

/// treecheck's manifest of `tree` (type, mode, owner, mtime, a file's
/// size and sha256, a symlink's target) as PFS DATA, in a file.
fn manifest_of(dir: &Path, tree: &Path) -> PathBuf {
    let o = Command::new("python3")
        .arg(common::TREECHECK)
        .arg("manifest")
        .arg(tree)
        .output()
        .expect("run python3 treecheck.py");
    assert!(o.status.success(), "{}", text(&o));
    let out = dir.join("tree.json");
    let m = String::from_utf8(o.stdout).unwrap();
    std::fs::write(&out, format!("{{\"pfs\": {{\"DATA\": {m}}}}}")).unwrap();
    out
}

/// Mount `source` with mount(8) (`-t TYPE`), copy the tree in, check
/// what findmnt shows, unmount; fsck; mount it read-only and compare
/// with the tree (contents, types, modes, owners, times, link targets);
/// mount it read-write again and change it (a file written, one
/// removed, one renamed), unmount, fsck, and read the changes back.
fn round_trip(dir: &Path, source: &str, fstype: &str, fsck_spec: &str) {
    let tree = make_tree(dir);
    let manifest = manifest_of(dir, &tree);
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let (t, m) = (tree.display(), mnt.display());
    let o = in_namespace(
        dir,
        &format!(
            "mount -t {fstype} '{source}' {m}\n\
             findmnt -n -o FSTYPE,OPTIONS {m}\n\
             cp -a {t} {m}/\n\
             umount {m}\n"
        ),
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("fuseblk.hammer2 rw,"), "{out}");
    fsck_clean(fsck_spec);
    let o = in_namespace(
        dir,
        &format!(
            "mount -t {fstype} -o ro '{source}@DATA' {m}\n\
             findmnt -n -o SOURCE,FSTYPE {m}\n\
             diff -r --no-dereference {t} {m}/tree\n\
             python3 {tc} compare {m}/tree {j} DATA\n\
             umount {m}\n",
            tc = common::TREECHECK,
            j = manifest.display()
        ),
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    // Every entry of the tree (4 directories of 12 files under 4 more,
    // and the symlink) compared, none differing.
    assert!(out.contains("57 entries, 0 differ"), "{out}");
    assert!(out.contains("fuse.hammer2"), "{out}");
    let o = in_namespace(
        dir,
        &format!(
            "mount -t {fstype} '{source}' {m}\n\
             head -c 200000 /dev/urandom > {m}/written\n\
             cp {m}/written {d}/written\n\
             rm {m}/tree/d1/e7/f4.bin\n\
             mv {m}/tree/d3/e21/f5.bin {m}/tree/moved\n\
             umount {m}\n",
            d = dir.display()
        ),
    );
    assert!(o.status.success(), "{}", text(&o));
    fsck_clean(fsck_spec);
    let o = in_namespace(
        dir,
        &format!(
            "mount -t {fstype} -o ro '{source}' {m}\n\
             cmp {m}/written {d}/written\n\
             cmp {m}/tree/moved {t}/d3/e21/f5.bin\n\
             test ! -e {m}/tree/d1/e7/f4.bin && test ! -e {m}/tree/d3/e21/f5.bin\n\
             echo changed\n\
             umount {m}\n",
            d = dir.display()
        ),
    );
    assert!(
        o.status.success() && text(&o).contains("changed"),
        "{}",
        text(&o)
    );
}

#[test]
fn an_mbr_disklabel64_disk_through_mount8() {
    let dir = scratch("disk-mbr");
    let img = dir.join("dfly.raw");
    let (s1a, _, s2, s5) = disks::mbr_disklabel64(&img);
    disks::fill(&img, s1a, 0x5a);
    let s = img.to_str().unwrap();
    assert!(tool("mkfs-hammer2", &[&format!("{s}:s1d")])
        .status
        .success());
    round_trip(&dir, s, "hammer2", s);
    let out = fsck_clean(s);
    assert!(out.contains(&format!("checking {s}:s1d")), "{out}");
    assert!(disks::filled(&img, s1a, 0x5a), "s1a was written");
    // probe lists every partition, the logical one too, and what the
    // HAMMER2 one holds.
    let o = tool("hammer2", &["probe", s]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{s}:{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {out}"))
            .to_string()
    };
    assert!(
        line("s1").contains("disklabel64 (partitions a, d)"),
        "{out}"
    );
    assert!(line("s1a").contains(&s1a.start.to_string()), "{out}");
    assert!(
        line("s1d").contains("disklabel64 HAMMER2") && line("s1d").contains("PFS: DATA, LOCAL"),
        "{out}"
    );
    assert!(line("s2").contains(&s2.start.to_string()), "{out}");
    assert!(line("s5").contains(&s5.start.to_string()), "{out}");
    assert!(
        out.contains(&format!("the tools use {s}:s1d when given {s}")),
        "{out}"
    );
}

#[test]
fn a_gpt_disk_through_an_fstab_line() {
    let dir = scratch("disk-gpt");
    let img = dir.join("gpt.raw");
    let _ = disks::gpt_disklabel64(&img);
    let s = img.to_str().unwrap();
    assert!(tool("mkfs-hammer2", &[&format!("{s}:s2")]).status.success());
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let tree = make_tree(&dir);
    let fstab = dir.join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# a test fstab\n{s}@DATA {} fuse.hammer2 defaults,nofail,_netdev,x-systemd.automount 0 0\n",
            mnt.display()
        ),
    )
    .unwrap();
    let (t, m, f) = (tree.display(), mnt.display(), fstab.display());
    let o = in_namespace(
        &dir,
        &format!(
            "mount -T {f} {m}\n\
             findmnt -n -o FSTYPE,OPTIONS {m}\n\
             cp -a {t} {m}/\n\
             mount -o remount,ro {m}\n\
             findmnt -n -o OPTIONS {m}\n\
             if touch {m}/nope 2>/dev/null; then echo wrote-on-ro; fi\n\
             mount -o remount,rw {m}\n\
             echo again > {m}/again\n\
             mount -s -o remount,ro {m}\n\
             test $(findmnt -n {m} | wc -l) = 1 && echo one-mount\n\
             umount {m}\n\
             if findmnt {m} >/dev/null; then echo still-mounted; fi\n"
        ),
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    // Through mount(8), suid and dev as it means them (no nosuid/nodev).
    assert!(
        lines[0].starts_with("fuseblk.hammer2 rw,") && !lines[0].contains("nosuid"),
        "{out}"
    );
    assert!(lines[1].starts_with("ro,"), "{out}");
    assert!(
        !out.contains("wrote-on-ro") && !out.contains("still-mounted"),
        "{out}"
    );
    assert!(out.contains("one-mount"), "{out}");
    let found = fsck_clean(s);
    assert!(found.contains(&format!("checking {s}:s2")), "{found}");
    let o = tool("hammer2", &["probe", s]);
    assert!(text(&o).contains("the tools use"), "{}", text(&o));
    let o = in_namespace(
        &dir,
        &format!(
            "mount -t hammer2 -o ro {s} {m}\ndiff -r {t} {m}/tree\ncat {m}/again\numount {m}\n"
        ),
    );
    assert!(
        o.status.success() && text(&o).contains("again"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_read_only_mount_cannot_be_remounted_read_write() {
    let dir = scratch("disk-ro");
    let img = dir.join("plain.img");
    let s = img.to_str().unwrap();
    assert!(tool("mkfs-hammer2", &["-s", "1G", s]).status.success());
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let m = mnt.display();
    let o = in_namespace(
        &dir,
        &format!(
            "mount -t hammer2 -o ro {s} {m}\n\
             if mount -o remount,rw {m}; then echo remounted; fi\n\
             findmnt -n -o OPTIONS {m}\n\
             umount {m}\n"
        ),
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(!out.contains("remounted"), "{out}");
    assert!(out.contains("mounted read-only (-o ro)"), "{out}");
}

#[test]
fn a_qcow2_disk_over_qemu_nbd() {
    assert!(
        available(Server::QemuNbd),
        "qemu-nbd (qemu-utils) is needed"
    );
    let dir = scratch("disk-qcow2");
    let raw = dir.join("dfly.raw");
    let _ = disks::mbr_disklabel64(&raw);
    let r = raw.to_str().unwrap();
    assert!(tool("mkfs-hammer2", &[&format!("{r}:s1d")])
        .status
        .success());
    let q = dir.join("dfly.qcow2");
    let conv = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2", r])
        .arg(&q)
        .output()
        .unwrap();
    assert!(conv.status.success(), "{}", text(&conv));
    std::fs::remove_file(&raw).unwrap();
    let srv = NbdServer::start(Server::QemuNbd, &q, "qcow2", Some(&dir));
    // The partition is found inside the export, by mount and fsck.
    round_trip(&dir, &srv.uri, "hammer2", &srv.uri);
    let out = fsck_clean(&srv.uri);
    assert!(out.contains(":s1d"), "{out}");
    let o = tool("hammer2", &["probe", &srv.uri]);
    assert!(text(&o).contains("disklabel64 HAMMER2"), "{}", text(&o));
}

/// All four tools over NBD, raw exports, unix socket and loopback TCP,
/// qemu-nbd and nbdkit.
#[test]
fn the_tools_over_nbd() {
    for (server, tcp) in [(Server::Nbdkit, true), (Server::QemuNbd, false)] {
        assert!(available(server), "{server:?} is needed");
        let dir = scratch(&format!("nbd-{server:?}-{tcp}"));
        let img = dir.join("disk.raw");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let srv = NbdServer::start(server, &img, "raw", (!tcp).then_some(dir.as_path()));
        let o = tool("mkfs-hammer2", &[&srv.uri]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            text(&o).starts_with(&format!("Volume {} ", srv.uri)),
            "{}",
            text(&o)
        );
        let o = tool("hammer2", &["pfs-create", &srv.uri, "MORE"]);
        assert!(o.status.success(), "{}", text(&o));
        round_trip(&dir, &srv.uri, "fuse.hammer2", &srv.uri);
        let o = tool("hammer2", &["pfs-list", &srv.uri]);
        assert!(text(&o).contains("MORE"), "{}", text(&o));
        // mkfs refuses what is there.
        let o = tool("mkfs-hammer2", &[&srv.uri]);
        assert_eq!(o.status.code(), Some(1));
        assert!(text(&o).contains("already holds a HAMMER2"), "{}", text(&o));
    }
}

/// The server killed while a writer runs (each file fsync'd): the writer
/// gets EIO, nothing works on the mount after that (the connection is
/// gone for good, also once the server is back), the daemon logs that
/// the server went away and exits when unmounted, non-zero exactly when
/// it says what was lost (a flush failed with unflushed changes; when
/// the kill lands on a read, nothing was waiting and nothing is lost);
/// and the image holds what was fsync'd, fsck-clean.
#[test]
fn killing_the_nbd_server_mid_write_loses_nothing_that_was_synced() {
    require_fuse();
    assert!(
        available(Server::QemuNbd),
        "qemu-nbd (qemu-utils) is needed"
    );
    let dir = scratch("nbd-kill");
    let img = dir.join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let mut srv = NbdServer::start(Server::QemuNbd, &img, "raw", Some(&dir));
    assert!(tool("mkfs-hammer2", &[&srv.uri]).status.success());
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let log = dir.join("mount.log");
    let (mut child, guard) = common::mount_foreground(&srv.uri, &mnt, &log, "rw,sync_interval=0");
    // Synced before the kill.
    let synced: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    {
        let mut f = std::fs::File::create(mnt.join("synced")).unwrap();
        f.write_all(&synced).unwrap();
        f.sync_all().unwrap();
    }
    // A writer that goes on until it fails; the server is killed once it
    // has written two files.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (m2, done2) = (mnt.clone(), done.clone());
    let writer = std::thread::spawn(move || {
        let start = Instant::now();
        let chunk = vec![7u8; 1 << 20];
        for i in 0.. {
            let r = std::fs::File::create(m2.join(format!("w{i}")))
                .and_then(|mut f| f.write_all(&chunk).and_then(|_| f.sync_all()));
            if let Err(e) = r {
                return e;
            }
            done2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            assert!(start.elapsed() < Duration::from_secs(60), "writes went on");
        }
        unreachable!()
    });
    let start = Instant::now();
    while done.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the writer did not get going"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    srv.kill();
    let e = writer.join().unwrap();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // The server back (on another socket): this mount's connection is
    // gone, nothing is written.
    let srv = NbdServer::start(Server::QemuNbd, &img, "raw", Some(&dir));
    let r = std::fs::write(mnt.join("after"), b"x")
        .and_then(|_| std::fs::File::open(mnt.join("after"))?.sync_all());
    assert!(r.is_err(), "a mount whose server went away took a write");
    // A child another thread forks may hold a descriptor of this mount
    // for the moment between its fork and its exec: EBUSY, briefly.
    let mut tries = 0;
    while let Err(e) = nix::mount::umount(&mnt) {
        tries += 1;
        assert!(
            e == nix::errno::Errno::EBUSY && tries < 100,
            "umount: {e}: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(guard);
    let status = common::wait_exit(&mut child, Duration::from_secs(30));
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("went away"), "{log_text}");
    assert_eq!(
        status.success(),
        !log_text.contains("since the last completed flush are lost"),
        "{status}: {log_text}"
    );
    // What was synced is there, and the image is clean.
    fsck_clean(&srv.uri);
    std::fs::write(dir.join("synced-copy"), &synced).unwrap();
    let o = in_namespace(
        &dir,
        &format!(
            "mount -t hammer2 -o ro '{}' {m}\ncmp {m}/synced {s}\necho same\numount {m}\n",
            srv.uri,
            m = mnt.display(),
            s = dir.join("synced-copy").display()
        ),
    );
    assert!(
        o.status.success() && text(&o).contains("same"),
        "{}",
        text(&o)
    );
}
