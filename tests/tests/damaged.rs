//! Damage that passes the check codes (made with `tests::craft`, which
//! reseals every check code up to the volume header), against the read
//! view (`Pfs`), the write path (`Mount`), fsck (the library and the
//! `fsck.hammer2` exit codes) and the offline `hammer2` verbs: a bad
//! size, count or length read from disk is an error for that object,
//! never a panic, an abort or a giant allocation; a damaged blockref
//! reads as an error, never as zeros; fsck calls each of these damage
//! (exit 4) and says "not HAMMER2" (exit 8) of anything else; every walk
//! survives a directory cycle; and orphans left by a crash are reported
//! and reclaimed at the next read-write mount.

use bufcache::{BlockDevice, MemDevice};
use hammer2::disk::{comp_method, enc_methods, BlockrefType, ObjType};
use hammer2::fsck::{fsck, Options, Report};
use hammer2::mount::{Mount, ROOT_INUM};
use hammer2::setmethods::Methods;
use hammer2::{Error, Pfs, Volume};
use rand::{RngCore, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tests::craft::Craft;
use tests::*;

const L: &str = "DATA";

/// What the test image holds.
struct Img {
    dev: Arc<MemDevice>,
    /// /d, a directory holding /d/inner (a small file) and /d/sub (an
    /// empty directory).
    d: u64,
    sub: u64,
    /// /e, a directory holding /e/x (a small file).
    e: u64,
    x: u64,
    /// /small: 100 bytes, in the inode.
    small: u64,
    /// /big: 200 KiB of random bytes, four blocks in the inode's
    /// blockset.
    big: u64,
    big_data: Vec<u8>,
    /// /huge: 2 MiB of random bytes, under an indirect block.
    huge: u64,
    huge_data: Vec<u8>,
    /// /ln -> "target" (in the inode).
    ln: u64,
    /// /longln -> 1000 bytes (in a data block).
    longln: u64,
    /// /LONG...: a file whose 200-byte name lives in its own block.
    long_name: Vec<u8>,
}

fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rngs::SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn image() -> Img {
    let dev = new_fs(1);
    let mut m = open(&dev);
    let d = m.mkdir(L, ROOT_INUM, b"d", 0o755, 0, 0, T0).unwrap();
    let inner = create_file(&mut m, L, d, b"inner").unwrap();
    m.write(L, inner, 0, b"inner file", T0).unwrap();
    let sub = m.mkdir(L, d, b"sub", 0o755, 0, 0, T0).unwrap();
    let e = m.mkdir(L, ROOT_INUM, b"e", 0o755, 0, 0, T0).unwrap();
    let x = create_file(&mut m, L, e, b"x").unwrap();
    let small = create_file(&mut m, L, ROOT_INUM, b"small").unwrap();
    m.write(L, small, 0, &[7u8; 100], T0).unwrap();
    let big = create_file(&mut m, L, ROOT_INUM, b"big").unwrap();
    let big_data = random(200 << 10, 1);
    m.write(L, big, 0, &big_data, T0).unwrap();
    let huge = create_file(&mut m, L, ROOT_INUM, b"huge").unwrap();
    let huge_data = random(2 << 20, 2);
    m.write(L, huge, 0, &huge_data, T0).unwrap();
    let ln = m.symlink(L, ROOT_INUM, b"ln", b"target", 0, 0, T0).unwrap();
    let longln = m
        .symlink(L, ROOT_INUM, b"longln", &[b'a'; 1000], 0, 0, T0)
        .unwrap();
    let long_name = vec![b'n'; 200];
    create_file(&mut m, L, ROOT_INUM, &long_name).unwrap();
    m.flush().unwrap();
    drop(m);
    let img = Img {
        dev,
        d,
        sub,
        e,
        x,
        small,
        big,
        big_data,
        huge,
        huge_data,
        ln,
        longln,
        long_name,
    };
    let r = report(&img);
    assert!(r.is_clean() && r.warnings.is_empty(), "{:?}", r.problems);
    img
}

impl Img {
    fn craft(&self) -> Craft {
        Craft::new(self.dev.clone())
    }
    fn dyn_dev(&self) -> Arc<dyn BlockDevice> {
        self.dev.clone()
    }
    fn pfs(&self) -> Pfs {
        Pfs::open(Arc::new(Volume::open(self.dyn_dev()).unwrap()), L).unwrap()
    }
    fn mount(&self) -> Mount {
        Mount::open(self.dyn_dev()).unwrap()
    }
    /// The image in a file, for the command-line tools.
    fn save(&self, tag: &str) -> PathBuf {
        let path = scratch_dir(tag).join("damaged.img");
        save_sparse(&self.dev, &path);
        path
    }
}

fn report(img: &Img) -> Report {
    fsck(img.dyn_dev(), Options::default()).unwrap()
}

fn problems(img: &Img) -> Vec<String> {
    report(img).problems.iter().map(|p| p.to_string()).collect()
}

/// fsck finds exactly one kind of problem, whose text has `what`.
fn assert_fsck_finds(img: &Img, what: &str) {
    let p = problems(img);
    assert!(
        !p.is_empty() && p.iter().any(|t| t.contains(what)),
        "fsck should report {what:?}, reported: {p:#?}"
    );
}

fn is_corrupt<T: std::fmt::Debug>(r: hammer2::Result<T>, what: &str) -> String {
    match r {
        Err(e @ Error::Corrupt { .. }) => {
            let text = e.to_string();
            assert!(text.contains(what), "{what:?} not in {text}");
            text
        }
        other => {
            let shown: String = format!("{other:?}").chars().take(300).collect();
            panic!("expected damage ({what}), got {shown}")
        }
    }
}

/// Run a workspace binary to completion, killed (and failed) past
/// `limit`: the commands under test must end, damaged image or not.
fn run_bounded(bin: &str, args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(bin_path(bin))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Drained meanwhile, so a long output cannot stall the child.
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            v
        })
    };
    let out = drain(child.stdout.take().map(|o| Box::new(o) as _));
    let err = drain(child.stderr.take().map(|o| Box::new(o) as _));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{bin} {args:?} still running after {limit:?} (killed):\n{}",
                String::from_utf8_lossy(&err.join().unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

const LIMIT: Duration = Duration::from_secs(120);

fn fsck_cli(path: &Path) -> (Option<i32>, String) {
    let out = run_bounded("fsck-hammer2", &[path.to_str().unwrap()], LIMIT);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

// ---- the crafting tool itself ----

#[test]
fn crafted_changes_pass_every_check_code() {
    let img = image();
    let c = img.craft();
    // An inode field.
    c.edit_inode(c.inode(L, img.small), |ino| ino.meta.mode = 0o600);
    // The bytes of a data block (stored uncompressed: random bytes).
    let first = c.leaves(L, img.big)[0];
    assert_eq!(c.bref(first).comp_method(), comp_method::NONE);
    c.edit_block(first, |b| b[..5].copy_from_slice(b"HELLO"));
    // A blockref field, two levels down (under huge's indirect block).
    let leaf = c.leaves(L, img.huge)[3];
    c.edit_bref(leaf, |br| br.modify_tid -= 1);

    let r = report(&img);
    assert!(r.is_clean(), "{:?}", r.problems);
    let pfs = img.pfs();
    assert_eq!(pfs.inode(img.small).unwrap().meta().mode, 0o600);
    let mut want = img.big_data.clone();
    want[..5].copy_from_slice(b"HELLO");
    assert!(pfs.read_all(&pfs.inode(img.big).unwrap()).unwrap() == want);
    let mut m = img.mount();
    assert_eq!(m.read(L, img.big, 0, 5).unwrap(), b"HELLO");
    assert!(m.read(L, img.huge, 0, 2 << 20).unwrap() == img.huge_data);
}

// ---- item 9: sizes, counts and lengths read from disk are bounded ----

#[test]
fn a_symlink_with_a_huge_size_is_an_error_not_an_allocation() {
    let img = image();
    let c = img.craft();
    // In the inode (direct data) and in a data block.
    c.edit_inode(c.inode(L, img.ln), |ino| ino.meta.size = 1 << 44);
    c.edit_inode(c.inode(L, img.longln), |ino| ino.meta.size = 1 << 44);
    let pfs = img.pfs();
    for inum in [img.ln, img.longln] {
        is_corrupt(pfs.inode(inum), "exceeds");
        let mut m = img.mount();
        is_corrupt(m.readlink(L, inum), "exceeds");
        is_corrupt(m.getattr(L, inum), "exceeds");
    }
    // The rest still reads.
    assert!(pfs.read_all(&pfs.inode(img.huge).unwrap()).unwrap() == img.huge_data);
    assert_fsck_finds(&img, "direct data of 17592186044416 bytes");
    assert_fsck_finds(&img, "symlink target of 17592186044416 bytes");
}

#[test]
fn a_size_past_what_an_inode_can_hold_is_an_error() {
    let img = image();
    let c = img.craft();
    // Direct data can hold 512 bytes: past that, reads made up zeros.
    c.edit_inode(c.inode(L, img.small), |ino| ino.meta.size = 4096);
    // Past Linux's largest file size: the kernel refuses the attribute.
    c.edit_inode(c.inode(L, img.big), |ino| ino.meta.size = 1 << 63);
    let pfs = img.pfs();
    is_corrupt(pfs.inode(img.small), "direct data of 4096 bytes");
    is_corrupt(pfs.inode(img.big), "largest file size");
    let mut m = img.mount();
    is_corrupt(m.read(L, img.small, 0, 4096), "direct data");
    is_corrupt(m.getattr(L, img.big), "largest file size");
    assert_fsck_finds(&img, "direct data of 4096 bytes");
    assert_fsck_finds(&img, "exceeds the largest file size");
}

#[test]
fn a_name_longer_than_255_bytes_is_an_error() {
    let img = image();
    let c = img.craft();
    let slot = c.dirent(L, ROOT_INUM, &img.long_name);
    c.edit_bref(slot, |br| {
        let mut d = br.dirent();
        d.namlen = 1000;
        br.set_dirent(d);
    });
    let pfs = img.pfs();
    is_corrupt(pfs.readdir(&pfs.root), "name length 1000");
    is_corrupt(img.mount().readdir(L, ROOT_INUM, 0), "name length 1000");
    assert_fsck_finds(&img, "name length 1000");
}

#[test]
fn data_keybits_out_of_range_are_an_error() {
    let img = image();
    let c = img.craft();
    // The last block: a logical block of 4 KiB read as zeros past it.
    let last = *c.leaves(L, img.big).last().unwrap();
    c.edit_bref(last, |br| br.keybits = 12);
    let pfs = img.pfs();
    is_corrupt(
        pfs.read_all(&pfs.inode(img.big).unwrap()),
        "not a 64 KiB block",
    );
    is_corrupt(
        img.mount().read(L, img.big, 0, 200 << 10),
        "not a 64 KiB block",
    );
    assert_fsck_finds(&img, "is not a 64 KiB block");
}

#[test]
fn indirect_keybits_out_of_range_are_an_error() {
    let img = image();
    let c = img.craft();
    let ind = c.indirects(L, img.huge)[0];
    c.edit_bref(ind, |br| br.keybits = 70);
    let pfs = img.pfs();
    is_corrupt(pfs.read_all(&pfs.inode(img.huge).unwrap()), "keybits 70");
    is_corrupt(img.mount().read(L, img.huge, 0, 4096), "keybits 70");
    assert_fsck_finds(&img, "keybits 70");
}

#[test]
fn a_damaged_inode_allocator_is_an_error_not_an_overwrite() {
    let img = image();
    let c = img.craft();
    // Behind an inode in use: the new file would replace /big.
    c.edit_inode(c.pfs_root(L), |ino| ino.meta.pfs_inum = img.big - 1);
    let mut m = img.mount();
    is_corrupt(
        create_file(&mut m, L, ROOT_INUM, b"new"),
        &format!("is behind inode {}", img.big),
    );
    m.flush().unwrap();
    drop(m);
    let pfs = img.pfs();
    assert!(pfs.read_all(&pfs.inode(img.big).unwrap()).unwrap() == img.big_data);
    // At the end of the inode numbers (2^63 and up are dirent keys), and
    // at the end of the counter.
    for last in [(1u64 << 63) - 1, u64::MAX] {
        c.edit_inode(c.pfs_root(L), |ino| ino.meta.pfs_inum = last);
        let mut m = img.mount();
        is_corrupt(
            create_file(&mut m, L, ROOT_INUM, b"new"),
            "is past the inode numbers",
        );
    }
}

#[test]
fn counters_at_their_maximum_are_errors_not_overflows() {
    let img = image();
    let c = img.craft();
    c.edit_inode(c.inode(L, img.x), |ino| ino.meta.nlinks = u64::MAX);
    let mut m = img.mount();
    is_corrupt(m.link(L, img.x, ROOT_INUM, b"x2", T0), "nlinks");
    // Refused whole: no entry was added.
    assert_eq!(m.lookup(L, ROOT_INUM, b"x2").unwrap(), None);
    drop(m);
    c.edit_header(|vh| vh.mirror_tid = u64::MAX);
    let mut m = img.mount();
    m.write(L, img.big, 0, b"new bytes", T0).unwrap();
    is_corrupt(m.flush(), "mirror_tid 0xffffffffffffffff is at its maximum");
}

// ---- item 11: a damaged blockref reads as an error, never as zeros ----

/// Every read of `huge` or `big` must fail, through both read paths.
fn reads_fail(img: &Img, inum: u64, what: &str) {
    let pfs = img.pfs();
    is_corrupt(pfs.read_all(&pfs.inode(inum).unwrap()), what);
    is_corrupt(img.mount().read(L, inum, 0, 64 << 10), what);
}

#[test]
fn a_data_blockref_typed_inode_is_an_error() {
    let img = image();
    let c = img.craft();
    c.edit_bref(c.leaves(L, img.big)[0], |br| br.btype = BlockrefType::Inode);
    reads_fail(&img, img.big, "inode blockref (type 1) at file offset 0x0");
    assert_fsck_finds(&img, "inode blockref key 0x0 inside inode");
}

#[test]
fn a_blockref_of_unknown_type_is_an_error() {
    let img = image();
    let c = img.craft();
    c.edit_bref(c.leaves(L, img.big)[0], |br| {
        br.btype = BlockrefType::from_u8(9)
    });
    reads_fail(&img, img.big, "(type 9)");
    assert_fsck_finds(&img, "unexpected unknown blockref (type 9)");
}

#[test]
fn an_indirect_blockref_aimed_at_an_inode_block_is_an_error() {
    let img = image();
    let c = img.craft();
    let target = c.bref(c.inode(L, img.small)).data_off;
    c.point_at(c.indirects(L, img.huge)[0], target);
    reads_fail(&img, img.huge, "points at a block of 1024 bytes");
    assert_fsck_finds(&img, "points at a block of 1024 bytes");
}

#[test]
fn a_freemap_node_in_a_file_is_an_error() {
    let img = image();
    let c = img.craft();
    c.edit_bref(c.indirects(L, img.huge)[0], |br| {
        br.btype = BlockrefType::FreemapNode
    });
    reads_fail(&img, img.huge, "freemap_node blockref");
}

#[test]
fn a_leaf_of_unknown_type_in_a_directory_is_an_error() {
    let img = image();
    let c = img.craft();
    // /e holds x alone.
    c.edit_bref(c.dirent(L, img.e, b"x"), |br| {
        br.btype = BlockrefType::from_u8(9)
    });
    let pfs = img.pfs();
    let e = pfs.inode(img.e).unwrap();
    is_corrupt(pfs.readdir(&e), "among a directory's entries");
    is_corrupt(pfs.lookup(&e, b"x"), "among a directory's entries");
    let mut m = img.mount();
    is_corrupt(m.readdir(L, img.e, 0), "among a directory's entries");
    is_corrupt(m.lookup(L, img.e, b"x"), "among a directory's entries");
    // Not empty: rmdir must not drop what it cannot read.
    is_corrupt(
        m.rmdir(L, ROOT_INUM, b"e", T0),
        "among a directory's entries",
    );
    assert_fsck_finds(&img, "unexpected unknown blockref (type 9)");
}

// ---- item 12: what fsck calls damage ----

/// Point entry `name` of directory `dir` at inode `inum`, a directory.
fn retarget_entry(c: &Craft, dir: u64, name: &[u8], inum: u64) {
    c.edit_bref(c.dirent(L, dir, name), |br| {
        let mut d = br.dirent();
        d.inum = inum;
        d.obj_type = ObjType::Directory.to_u8();
        br.set_dirent(d);
    });
}

#[test]
fn fsck_reports_an_entry_naming_the_root() {
    let img = image();
    retarget_entry(&img.craft(), img.d, b"inner", ROOT_INUM);
    assert_fsck_finds(&img, "dirent \"inner\" names the PFS root");
    let pfs = img.pfs();
    is_corrupt(
        pfs.readdir(&pfs.inode(img.d).unwrap()),
        "names the PFS root",
    );
    is_corrupt(img.mount().lookup(L, img.d, b"inner"), "names the PFS root");
}

#[test]
fn fsck_reports_an_entry_naming_its_own_directory() {
    let img = image();
    retarget_entry(&img.craft(), img.d, b"inner", img.d);
    assert_fsck_finds(&img, "dirent \"inner\" names its own directory");
    let pfs = img.pfs();
    is_corrupt(
        pfs.lookup(&pfs.inode(img.d).unwrap(), b"inner"),
        "names its own directory",
    );
    is_corrupt(img.mount().readdir(L, img.d, 0), "names its own directory");
}

#[test]
fn fsck_reports_a_directory_with_two_parents() {
    let img = image();
    // /e/x now names /d/sub too.
    retarget_entry(&img.craft(), img.e, b"x", img.sub);
    assert_fsck_finds(&img, &format!("directory inode {} has 2 parents", img.sub));
}

#[test]
fn fsck_reports_directories_cut_off_in_a_cycle() {
    let img = image();
    let c = img.craft();
    // /d/sub/ gets an entry naming /d, and the root's "d" names /e: /d
    // and /d/sub are each other's parent, and reach the root no more.
    let mut m = img.mount();
    create_file(&mut m, L, img.sub, b"up").unwrap();
    m.flush().unwrap();
    drop(m);
    retarget_entry(&c, img.sub, b"up", img.d);
    retarget_entry(&c, ROOT_INUM, b"d", img.e);
    let p = problems(&img);
    for inum in [img.d, img.sub] {
        let what = format!("directory inode {inum} does not reach the root");
        assert!(p.iter().any(|t| t.contains(&what)), "{what}: {p:#?}");
    }
}

#[test]
fn fsck_reports_an_unknown_compression_method() {
    let img = image();
    let c = img.craft();
    c.edit_bref(c.leaves(L, img.big)[1], |br| {
        br.methods = enc_methods(br.check_method(), 5)
    });
    assert_fsck_finds(&img, "compression method 5");
    let pfs = img.pfs();
    assert!(matches!(
        pfs.read_all(&pfs.inode(img.big).unwrap()),
        Err(Error::Unsupported { .. })
    ));
}

#[test]
fn fsck_reports_a_named_inode_with_no_links() {
    let img = image();
    let c = img.craft();
    c.edit_inode(c.inode(L, img.x), |ino| ino.meta.nlinks = 0);
    assert_fsck_finds(&img, &format!("inode {} has nlinks 0 but 1", img.x));
    // Damage, not an orphan: a read-write mount leaves it.
    let mut m = img.mount();
    assert_eq!(m.reclaim_orphans(L).unwrap(), Vec::<u64>::new());
    m.flush().unwrap();
    assert_eq!(m.getattr(L, img.x).unwrap().nlinks, 0);
}

#[test]
fn fsck_exit_codes_for_damage_and_for_what_is_not_hammer2() {
    // Damage: exit 4.
    let img = image();
    let c = img.craft();
    c.edit_inode(c.inode(L, img.big), |ino| ino.meta.size = 1 << 63);
    let path = img.save("fsck-exit-damaged");
    let (code, text) = fsck_cli(&path);
    assert_eq!(code, Some(4), "{text}");
    assert!(text.contains("largest file size"), "{text}");
    std::fs::remove_file(&path).unwrap();

    // Not HAMMER2 at all: exit 8, said as such.
    let dir = scratch_dir("fsck-exit-foreign");
    let random_img = dir.join("random.img");
    std::fs::write(&random_img, random(8 << 20, 3)).unwrap();
    let zeros = dir.join("zeros.img");
    std::fs::File::create(&zeros)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let tiny = dir.join("tiny.img");
    std::fs::write(&tiny, b"hello").unwrap();
    let mut foreign = vec![random_img, zeros, tiny];
    let ext4 = dir.join("ext4.img");
    let made = Command::new("mkfs.ext4")
        .args(["-q", "-F", ext4.to_str().unwrap(), "16M"])
        .status();
    match made {
        Ok(s) if s.success() => foreign.push(ext4),
        other => panic!("mkfs.ext4 (e2fsprogs) is needed for this test: {other:?}"),
    }
    for f in &foreign {
        let (code, text) = fsck_cli(f);
        assert_eq!(code, Some(8), "{}: {text}", f.display());
        assert!(
            text.contains("not a HAMMER2 filesystem"),
            "{}: {text}",
            f.display()
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- item 10: every walk survives a directory that contains itself ----

/// /d/sub gets an entry "loop" naming /d: a cycle under the root.
fn cyclic_image() -> Img {
    let img = image();
    let mut m = img.mount();
    create_file(&mut m, L, img.sub, b"loop").unwrap();
    m.flush().unwrap();
    drop(m);
    retarget_entry(&img.craft(), img.sub, b"loop", img.d);
    img
}

#[test]
fn setcomp_recursive_stops_at_a_cycle() {
    let img = cyclic_image();
    // The library walk: an error naming the directory met again, in
    // bounded time (it used to loop for ever, memory growing).
    let dev = img.dyn_dev();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut m = Mount::open(dev).unwrap();
        let m2 = Methods {
            comp: Some(comp_method::ZLIB),
            check: None,
        };
        let _ = tx.send(m.set_methods(L, ROOT_INUM, m2, true, &mut |_, _| {}));
    });
    let r = rx
        .recv_timeout(LIMIT)
        .expect("set_methods -r did not end on a cyclic tree");
    is_corrupt(r, &format!("directory inode {} is met again", img.d));

    // The offline verbs end too: setcomp -r fails and leaves the image
    // as it was; fsck reports the damage; bulkfree, snapshot and show
    // complete.
    let path = img.save("cycle-verbs");
    let p = path.to_str().unwrap();
    let before = std::fs::read(&path).unwrap();
    let out = run_bounded(
        "hammer2",
        &["setcomp", "-r", "zlib", &format!("{p}@DATA:/d")],
        LIMIT,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is met again"), "{err}");
    assert!(
        std::fs::read(&path).unwrap() == before,
        "setcomp changed the image"
    );
    let (code, text) = fsck_cli(&path);
    assert_eq!(code, Some(4), "{text}");
    assert!(
        text.contains("names inode") || text.contains("parents"),
        "{text}"
    );
    for args in [
        vec!["bulkfree", p],
        vec!["snapshot", p, "SNAP"],
        vec!["show", p],
    ] {
        let out = run_bounded("hammer2", &args, LIMIT);
        assert!(
            out.status.success(),
            "hammer2 {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::remove_file(&path).unwrap();
}

// ---- item 7: orphans left by a crash ----

/// An open file unlinked, flushed while open, and the mount dropped
/// without its last close: what a crash leaves.
fn crash_with_open_unlinked(img: &Img) -> u64 {
    let mut m = img.mount();
    let f = create_file(&mut m, L, img.d, b"open-unlinked").unwrap();
    m.write(L, f, 0, &random(1 << 20, 9), T0).unwrap();
    m.flush().unwrap();
    m.pin(L, f).unwrap();
    m.unlink(L, img.d, b"open-unlinked", T0).unwrap();
    m.flush().unwrap();
    f
}

fn free_bytes(m: &mut Mount) -> u64 {
    m.statfs(L).unwrap().bytes_free
}

#[test]
fn orphans_are_reported_and_reclaimed_at_the_next_read_write_mount() {
    let img = image();
    let f = crash_with_open_unlinked(&img);
    let r = report(&img);
    assert!(r.is_clean(), "{:?}", r.problems);
    assert_eq!(r.orphans.len(), 1, "{:?}", r.warnings);
    assert_eq!((r.orphans[0].inum, r.orphans[0].nlinks), (f, 0));
    let path = img.save("orphan-cli");
    let (code, text) = fsck_cli(&path);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!(
            "1 orphaned inodes unlinked while open (nlinks 0): removed at the next \
             read-write mount of their PFS (or by fsck -p); PFS DATA: inodes {f}"
        )),
        "{text}"
    );
    std::fs::remove_file(&path).unwrap();

    // The next read-write mount removes it; the first bulkfree pair
    // gives its megabyte back.
    let mut m = img.mount();
    assert_eq!(m.reclaim_orphans(L).unwrap(), vec![f]);
    m.flush().unwrap();
    let before = free_bytes(&mut m);
    m.bulkfree(None).unwrap();
    m.bulkfree(None).unwrap();
    let after = free_bytes(&mut m);
    assert!(
        after >= before + (1 << 20),
        "bulkfree freed {} bytes",
        after - before
    );
    drop(m);
    let r = report(&img);
    assert!(r.is_clean() && r.orphans.is_empty(), "{:?}", r.warnings);
    assert!(matches!(img.pfs().inode(f), Err(Error::NotFound { .. })));
}

#[test]
fn a_pinned_inode_is_not_reclaimed() {
    let img = image();
    let mut m = img.mount();
    let f = create_file(&mut m, L, ROOT_INUM, b"open").unwrap();
    m.flush().unwrap();
    m.pin(L, f).unwrap();
    m.unlink(L, ROOT_INUM, b"open", T0).unwrap();
    m.flush().unwrap();
    // Nothing waits for a flush: the scan runs, and keeps the pinned one.
    assert_eq!(m.reclaim_orphans(L).unwrap(), Vec::<u64>::new());
    assert_eq!(m.getattr(L, f).unwrap().nlinks, 0);
    m.unpin(L, f).unwrap();
    m.flush().unwrap();
    assert!(matches!(m.getattr(L, f), Err(Error::NotFound { .. })));
}

#[test]
fn an_unlinked_directory_left_open_is_reclaimed_too() {
    let img = image();
    let mut m = img.mount();
    m.pin(L, img.sub).unwrap();
    m.rmdir(L, img.d, b"sub", T0).unwrap();
    m.flush().unwrap();
    drop(m);
    let mut m = img.mount();
    assert_eq!(m.reclaim_orphans(L).unwrap(), vec![img.sub]);
    m.flush().unwrap();
    drop(m);
    let r = report(&img);
    assert!(r.is_clean() && r.orphans.is_empty(), "{:?}", r.warnings);
}
