//! fsck.hammer2's repairs (`hammer2::repair`) and `hammer2 recover`
//! (`mkfs::salvage`): the damage campaign sampled (`tests::damage`),
//! preen against -y, rewinds, the exit codes and the writer lock of the
//! fsck-hammer2 binary, and recovering files from damaged images.

use bufcache::{BlockDevice, MemDevice};
use hammer2::fsck::{fsck, Options as FsckOptions};
use hammer2::repair::{self, Mode};
use hammer2::volume::{header_slots, read_header_slot, HeaderSlot};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use tests::craft::{Craft, Holder};
use tests::damage::{self, Base, Kind};
use tests::*;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn repair_yes(dev: Arc<dyn BlockDevice>, mode: Mode, rewind: Option<usize>) -> repair::Outcome {
    let before = fsck(dev.clone(), FsckOptions::default()).expect("fsck");
    repair::repair(
        dev,
        before,
        &repair::Options {
            mode,
            rewind,
            now: T0,
            cancel: None,
        },
    )
    .expect("repair")
}

/// The newest header copy with good CRCs.
fn newest_slot(dev: &dyn BlockDevice) -> usize {
    (0..header_slots(dev.size_bytes()))
        .filter_map(|i| match read_header_slot(dev, i) {
            HeaderSlot::Good(vh) => Some((vh.mirror_tid, i)),
            _ => None,
        })
        .max()
        .expect("a good header")
        .1
}

/// The campaign, sampled: every block kind of an image written through
/// the library (four header copies, two PFSs, a snapshot) and of a
/// DragonFly fixture, raw bit flips and crafted damage, each case
/// checked by the campaign's oracle (fsck -n reports it without
/// writing, -y repairs it, a second -n is clean, untouched files read
/// back identical, the image takes writes). `H2_DAMAGE_SEED` and
/// `H2_DAMAGE_CASES` (per kind and image, 2 by default) widen it;
/// `damage` (tests/src/bin) is the full campaign.
#[test]
fn damage_campaign_sample() {
    let seed = env_u64("H2_DAMAGE_SEED", 14);
    let cases = env_u64("H2_DAMAGE_CASES", 2);
    let bases = [
        Base::new("own", damage::own_image(1, (6 << 30) + (8 << 20))),
        Base::new("v1-lz4-xxhash64", damage::fixture_mem("v1-lz4-xxhash64")),
    ];
    let mut results = Vec::new();
    for (n, b) in bases.iter().enumerate() {
        let mut rng = SmallRng::seed_from_u64(seed ^ n as u64);
        for kind in Kind::ALL {
            let mut done = 0;
            let mut tries = 0;
            while done < cases && tries < 200 {
                tries += 1;
                let Some((t, how)) = damage::pick(b, kind, &mut rng) else {
                    break;
                };
                if let Some(r) = damage::run_case(b, &t, &how, seed + tries, None) {
                    done += 1;
                    results.push(r);
                }
            }
        }
    }
    let table = damage::table(&results);
    println!("{}", damage::format_table(&table));
    let bad: Vec<String> = results
        .iter()
        .filter(|r| !r.violations.is_empty())
        .map(|r| {
            format!(
                "{} {} at {:#x} ({}): {}",
                r.base,
                r.kind.name(),
                r.at,
                r.how,
                r.violations.join("; ")
            )
        })
        .collect();
    assert!(bad.is_empty(), "violations:\n{}", bad.join("\n"));
    // Every kind the images have was damaged (the own image has a
    // freemap node; the fixture none).
    for kind in Kind::ALL {
        assert!(table.contains_key(&kind), "no case of {}", kind.name());
    }
}

/// Overwrite `bytes` at `off` with junk (a check code over it fails and
/// nothing in it reads as sound).
fn junk(dev: &dyn BlockDevice, off: u64, bytes: u64) {
    let junk: Vec<u8> = (0..bytes).map(|i| (i * 151 % 251) as u8 ^ 0xa5).collect();
    dev.write_at(&junk, off).expect("write junk");
}

/// The image of `own_image` with four header copies, each a different
/// state, and the files of each state.
fn four_states() -> (Arc<MemDevice>, Base) {
    let base = Base::new("own", damage::own_image(1, (6 << 30) + (8 << 20)));
    assert_eq!(base.states.len(), 4, "four good header copies");
    (Arc::new(base.dev.snapshot()), base)
}

fn files_of(dev: &Arc<MemDevice>) -> damage::Files {
    let d: Arc<dyn BlockDevice> = Arc::new(dev.snapshot());
    damage::read_files(Arc::new(hammer2::Volume::open(d).expect("open")))
}

/// The super-root of the newest tree unreadable: no PFS can be saved in
/// place, so -y goes back to the newest header copy whose whole tree
/// verifies, says so, and the image then holds exactly that state in
/// every header copy.
#[test]
fn rewind_when_the_super_root_is_lost() {
    let (dev, base) = four_states();
    let d: Arc<dyn BlockDevice> = dev.clone();
    let newest = newest_slot(d.as_ref());
    let sroot = Craft::new(d.clone()).header().sroot_blockset[0];
    junk(d.as_ref(), sroot.data_off.offset(), sroot.data_off.bytes());
    let before = fsck(d.clone(), FsckOptions::default()).unwrap();
    assert!(!before.is_clean());
    // What -n offers.
    let offer = repair::would_rewind(d.clone(), &before)
        .unwrap()
        .expect("a rewind");
    let o = repair_yes(d.clone(), Mode::Yes, None);
    let r = o.rewind.as_ref().expect("rewound");
    assert_eq!(r.to_slot, offer.to_slot);
    assert_ne!(r.to_slot, newest);
    assert_eq!(r.from_slot, Some(newest));
    assert!(r.to_tid < r.from_tid);
    let line = repair::rewind_line(r);
    assert!(line.contains(&format!("copy {}", r.to_slot)), "{line}");
    assert!(o
        .actions
        .iter()
        .any(|a| a.lossy && a.what.contains("rewound")));
    assert!(o.after.is_clean(), "{:?}", o.after.problems);
    assert!(
        files_of(&dev) == base.states[&r.to_slot],
        "files differ from the state rewound to"
    );
    // Every copy holds the repaired state: the next open sees it.
    for i in 0..4 {
        assert!(matches!(
            read_header_slot(d.as_ref(), i),
            HeaderSlot::Good(_)
        ));
    }
    assert!(fsck(d, FsckOptions::default()).unwrap().is_clean());
}

/// `--rewind=N` goes to the copy named, whose tree verifies, even on an
/// image without damage; a copy whose tree does not verify is refused
/// before anything is written.
#[test]
fn rewind_to_a_chosen_copy() {
    let (dev, base) = four_states();
    let d: Arc<dyn BlockDevice> = dev.clone();
    let oldest = (0..4)
        .filter_map(|i| match read_header_slot(d.as_ref(), i) {
            HeaderSlot::Good(vh) => Some((vh.mirror_tid, i)),
            _ => None,
        })
        .min()
        .unwrap()
        .1;
    let o = repair_yes(d.clone(), Mode::Yes, Some(oldest));
    assert_eq!(o.rewind.as_ref().map(|r| r.to_slot), Some(oldest));
    assert!(o.after.is_clean(), "{:?}", o.after.problems);
    assert!(
        files_of(&dev) == base.states[&oldest],
        "files differ from the state rewound to"
    );

    // A copy whose tree reaches a damaged block is no target.
    let (dev, _) = four_states();
    let d: Arc<dyn BlockDevice> = dev.clone();
    let slot = newest_slot(d.as_ref());
    let c = Craft::new(d.clone());
    let leaf = c.bref(c.leaves("DATA", c_inum(&dev, "DATA", "/docs/f6"))[3]);
    junk(d.as_ref(), leaf.data_off.offset(), leaf.data_off.bytes());
    let image = dev.snapshot();
    let before = fsck(d.clone(), FsckOptions::default()).unwrap();
    let err = repair::repair(
        d.clone(),
        before,
        &repair::Options {
            mode: Mode::Yes,
            rewind: Some(slot),
            now: T0,
            cancel: None,
        },
    )
    .expect_err("a copy whose tree does not verify");
    assert!(err.to_string().contains("verif"), "{err}");
    assert!(same_bytes(&image, &dev), "a refused rewind wrote");
}

/// The inode number of `path` in PFS `label`.
fn c_inum(dev: &Arc<MemDevice>, label: &str, path: &str) -> u64 {
    let d: Arc<dyn BlockDevice> = Arc::new(dev.snapshot());
    let vol = Arc::new(hammer2::Volume::open(d).unwrap());
    hammer2::Pfs::open(vol, label)
        .unwrap()
        .resolve(path)
        .unwrap()
        .inum()
}

fn same_bytes(a: &MemDevice, b: &MemDevice) -> bool {
    let mut x = vec![0u8; 1 << 20];
    let mut y = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < a.size_bytes() {
        let n = (a.size_bytes() - at).min(x.len() as u64) as usize;
        a.read_at(&mut x[..n], at).unwrap();
        b.read_at(&mut y[..n], at).unwrap();
        if x[..n] != y[..n] {
            return false;
        }
        at += n as u64;
    }
    true
}

/// -p makes the repairs that lose nothing (a freemap leaf crafted to
/// call every block of its zone free: rebuilt from the topology) and
/// refuses, writing nothing, one that would cut file data; -y then cuts
/// it, reports the hole and its bytes, and the file keeps its other
/// blocks.
#[test]
fn preen_against_yes() {
    let dev = Arc::new(damage::own_image(2, 2 << 30));
    let d: Arc<dyn BlockDevice> = dev.clone();
    let c = Craft::new(d.clone());
    let leaf = c
        .tree(Holder::FreemapSet)
        .into_iter()
        .find(|(_, b)| b.btype == hammer2::disk::BlockrefType::FreemapLeaf)
        .expect("a freemap leaf")
        .0;
    c.edit_block(leaf, |bytes| {
        for n in 0..hammer2::disk::FREEMAP_COUNT {
            let at = n * hammer2::disk::BMAP_BYTES + 0x40;
            bytes[at..at + 64].fill(0);
        }
    });
    let o = repair_yes(d.clone(), Mode::Preen, None);
    assert!(o.written && o.refused.is_none(), "{:?}", o.refused);
    assert!(o.actions.iter().all(|a| !a.lossy));
    assert!(o.after.is_clean(), "{:?}", o.after.problems);

    let before_files = files_of(&dev);
    let f6 = c_inum(&dev, "DATA", "/docs/f6");
    let leaves = c.leaves("DATA", f6);
    let br = c.bref(leaves[2]);
    junk(d.as_ref(), br.data_off.offset(), br.data_off.bytes());
    let image = dev.snapshot();
    let o = repair_yes(d.clone(), Mode::Preen, None);
    assert!(!o.written);
    assert!(
        o.refused.as_deref().unwrap_or("").contains("-y"),
        "{:?}",
        o.refused
    );
    assert!(same_bytes(&image, &dev), "preen wrote although it refused");

    let o = repair_yes(d.clone(), Mode::Yes, None);
    assert!(o.written);
    assert!(o.after.is_clean(), "{:?}", o.after.problems);
    let hole = o
        .actions
        .iter()
        .find(|a| a.inum == Some(f6) && a.lossy)
        .unwrap_or_else(|| panic!("no cut reported on inode {f6}: {:#?}", o.actions));
    assert_eq!(hole.lost_bytes, 65536);
    assert!(
        hole.what.contains(&format!("{:#x}", br.key)),
        "{}",
        hole.what
    );
    let after = files_of(&dev);
    let key = ("DATA".to_string(), f6);
    let (was, now) = (&before_files[&key], &after[&key]);
    assert_eq!(was.len(), now.len());
    let k = br.key as usize;
    assert!(was[..k] == now[..k], "bytes before the hole differ");
    assert!(now[k..k + 65536].iter().all(|&b| b == 0));
    assert!(
        was[k + 65536..] == now[k + 65536..],
        "bytes after the hole differ"
    );
    // Every other file reads as before (the snapshot shares the block:
    // its f6 has the same hole).
    for (k2, v) in &before_files {
        if k2.1 != f6 {
            assert!(Some(v) == after.get(k2), "{k2:?} reads differently");
        }
    }
    assert!(after[&("SNAP".to_string(), f6)][k..k + 65536]
        .iter()
        .all(|&b| b == 0));
}

/// Run fsck-hammer2 with `args`: exit code, stdout, stderr.
fn fsck_bin(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin_path("fsck-hammer2"))
        .args(args)
        .output()
        .expect("run fsck-hammer2");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A digest of an image file, read 1 MiB at a time.
fn file_hash(p: &Path) -> Vec<u8> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(p).expect("open image");
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read image");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().to_vec()
}

/// A damaged image file: the own 2 GiB image with one data block of
/// DATA:/docs/f6 overwritten (a repair must cut it: -p refuses).
fn damaged_image_file(tag: &str) -> (std::path::PathBuf, u64) {
    let dev = Arc::new(damage::own_image(2, 2 << 30));
    let d: Arc<dyn BlockDevice> = dev.clone();
    let f6 = c_inum(&dev, "DATA", "/docs/f6");
    let c = Craft::new(d.clone());
    let br = c.bref(c.leaves("DATA", f6)[2]);
    junk(d.as_ref(), br.data_off.offset(), br.data_off.bytes());
    let path = scratch_dir(tag).join("img");
    save_sparse(&dev, &path);
    (path, f6)
}

/// The modes and fsck(8)'s exit codes: -n reports (4) and writes
/// nothing; -p refuses a repair that cuts data (4, nothing written);
/// -y repairs (1), one line per repair; then -n and -y find it clean
/// (0); -p with -y is a usage error (16).
#[test]
fn fsck_cli_modes_and_exit_codes() {
    let (img, f6) = damaged_image_file("fsck-modes");
    let i = img.to_str().unwrap();
    let h = file_hash(&img);
    let (code, out, _) = fsck_bin(&["-n", i]);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("nothing changed"), "{out}");
    let (code, out, _) = fsck_bin(&[i]);
    assert_eq!(code, 4, "-n is the default: {out}");
    let (code, out, _) = fsck_bin(&["-p", i]);
    assert_eq!(code, 4, "{out}");
    assert!(
        out.contains("UNEXPECTED INCONSISTENCY") && out.contains("-y"),
        "{out}"
    );
    assert_eq!(file_hash(&img), h, "fsck -n or -p wrote");
    let (code, _, err) = fsck_bin(&["-p", "-y", i]);
    assert_eq!(code, 16, "{err}");
    let (code, _, err) = fsck_bin(&["--rewind=1", i]);
    assert_eq!(code, 16, "--rewind without -y: {err}");
    let (code, out, _) = fsck_bin(&["-y", i]);
    assert_eq!(code, 1, "{out}");
    let fixed: Vec<&str> = out.lines().filter(|l| l.starts_with("fixed: ")).collect();
    assert!(
        fixed
            .iter()
            .any(|l| l.contains(&format!("inode {f6}")) && l.contains("a hole now")),
        "{out}"
    );
    assert!(fixed.iter().any(|l| l.contains("freemap rebuilt")), "{out}");
    assert!(
        out.contains("clean now") && out.contains("KiB of file data cut"),
        "{out}"
    );
    let (code, out, _) = fsck_bin(&["-n", i]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = fsck_bin(&["-y", i]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = fsck_bin(&["-p", i]);
    assert_eq!(code, 0, "{out}");
    let _ = std::fs::remove_file(&img);
}

/// A repair takes the image's writer lock as a read-write mount holds
/// it: an image being written is refused by any name (here a symlink
/// and a hard link), exit 8, nothing written; -n still checks it, with
/// a warning.
#[test]
fn fsck_refuses_to_repair_an_image_being_written() {
    let (img, _) = damaged_image_file("fsck-locked");
    let dir = img.parent().unwrap().to_path_buf();
    let sym = dir.join("sym");
    let hard = dir.join("hard");
    std::os::unix::fs::symlink(&img, &sym).unwrap();
    std::fs::hard_link(&img, &hard).unwrap();
    let h = file_hash(&img);
    let lock = bufcache::imagelock::lock_writer(&img, false, || {}).expect("writer lock");
    for name in [&img, &sym, &hard] {
        let n = name.to_str().unwrap();
        for mode in ["-y", "-p"] {
            let (code, out, err) = fsck_bin(&[mode, n]);
            assert_eq!(code, 8, "{mode} {n}: {out}{err}");
            assert!(
                err.contains("being written") || err.contains("mounted"),
                "{err}"
            );
        }
        let (code, out, err) = fsck_bin(&["-n", n]);
        assert_eq!(code, 4, "{out}{err}");
        assert!(err.contains("warning"), "{err}");
    }
    assert_eq!(file_hash(&img), h, "a refused repair wrote");
    drop(lock);
    let (code, out, _) = fsck_bin(&["-y", sym.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// -y --rewind=N from the command line: the state of copy N, reported.
#[test]
fn fsck_cli_rewind() {
    let (dev, base) = four_states();
    let d: Arc<dyn BlockDevice> = dev.clone();
    let newest = newest_slot(d.as_ref());
    let target = base.states.keys().copied().find(|&s| s != newest).unwrap();
    let path = scratch_dir("fsck-rewind").join("img");
    save_sparse(&dev, &path);
    let p = path.to_str().unwrap();
    let (code, out, err) = fsck_bin(&["-y", &format!("--rewind={target}"), p]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(&format!("rewound to volume header copy {target}")),
        "{out}"
    );
    let vol = open_volume(&path).unwrap();
    assert!(damage::read_files(vol) == base.states[&target]);
    let (code, out, _) = fsck_bin(&["-n", p]);
    assert_eq!(code, 0, "{out}");
    let _ = std::fs::remove_file(&path);
}

/// Run the hammer2 tool: exit code, stdout, stderr.
fn hammer2_bin(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin_path("hammer2"))
        .args(args)
        .output()
        .expect("run hammer2");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every regular file under `dir`, by content.
fn host_files(dir: &Path, out: &mut Vec<(std::path::PathBuf, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            host_files(&e.path(), out);
        } else if t.is_file() {
            out.push((e.path(), std::fs::read(e.path()).unwrap()));
        }
    }
}

/// `hammer2 recover` where in-place repair would lose files: a block of
/// a large directory and a file's data block destroyed (one header
/// copy, so no older tree to take them from). Everything reachable is
/// copied with its name, the damaged file with a hole where its block
/// was; the directory's lost entries come back in `lost+found` (found
/// through the inode index) under the names the snapshot's copy of the
/// directory still gives them; the image is not written; exit 1 says
/// something could not be read.
#[test]
fn recover_from_a_damaged_image() {
    let dev = Arc::new(damage::own_image(2, 2 << 30));
    let d: Arc<dyn BlockDevice> = dev.clone();
    let before = files_of(&dev);
    let big = c_inum(&dev, "DATA", "/big");
    let f6 = c_inum(&dev, "DATA", "/docs/f6");
    let after_snapshot = c_inum(&dev, "DATA", "/big/after-snapshot");
    let c = Craft::new(d.clone());
    let ind = c.bref(c.indirects("DATA", big)[0]);
    let leaf = c.bref(c.leaves("DATA", f6)[2]);
    junk(d.as_ref(), ind.data_off.offset(), ind.data_off.bytes());
    junk(d.as_ref(), leaf.data_off.offset(), leaf.data_off.bytes());
    let dir = scratch_dir("recover");
    let img = dir.join("img");
    save_sparse(&dev, &img);
    let h = file_hash(&img);
    let dest = dir.join("out");
    let (code, out, err) = hammer2_bin(&["recover", img.to_str().unwrap(), dest.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("in lost+found"), "{out}");
    assert!(err.contains("lost (a hole)"), "{err}");
    assert_eq!(file_hash(&img), h, "recover wrote to the image");

    // The damaged file: its other blocks, zeros where the block was.
    let got = std::fs::read(dest.join("DATA/docs/f6")).unwrap();
    let was = &before[&("DATA".to_string(), f6)];
    let k = leaf.key as usize;
    assert_eq!(got.len(), was.len());
    assert!(got[..k] == was[..k] && got[k + 65536..] == was[k + 65536..]);
    assert!(got[k..k + 65536].iter().all(|&b| b == 0));
    // Every other file of every PFS is somewhere in DESTDIR/LABEL with
    // its bytes.
    for label in ["DATA", "LOCAL", "SNAP"] {
        let mut host = Vec::new();
        host_files(&dest.join(label), &mut host);
        for ((l, inum), bytes) in &before {
            if l != label || *inum == f6 {
                continue;
            }
            let t = c_type(&dev, l, *inum);
            if t != hammer2::disk::ObjType::Regfile {
                continue;
            }
            assert!(
                host.iter().any(|(_, b)| b == bytes),
                "{l}:{inum} ({} bytes) not recovered",
                bytes.len()
            );
        }
    }
    // The lost entries, by name, in DATA's lost+found.
    let lf: Vec<String> = std::fs::read_dir(dest.join("DATA/lost+found"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    // Named as the snapshot's directory names them; the file made after
    // the snapshot has no entry left anywhere: #INUM.
    assert!(lf.len() > 1);
    let unnamed = format!("#{after_snapshot}");
    assert!(lf.contains(&unnamed), "{lf:?}");
    assert!(
        lf.iter().all(|n| n.starts_with("entry-") || *n == unnamed),
        "{lf:?}"
    );

    // One PFS, one path.
    let dest2 = dir.join("docs");
    let spec = format!("{}@DATA", img.display());
    let (code, out, err) = hammer2_bin(&["recover", &spec, "/docs", dest2.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        std::fs::read(dest2.join("f1")).unwrap()
            == before[&("DATA".into(), c_inum(&dev, "DATA", "/docs/f1"))]
    );
    assert!(std::fs::symlink_metadata(dest2.join("longln"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(!dest2.join("lost+found").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

fn c_type(dev: &Arc<MemDevice>, label: &str, inum: u64) -> hammer2::disk::ObjType {
    let d: Arc<dyn BlockDevice> = Arc::new(dev.snapshot());
    let vol = Arc::new(hammer2::Volume::open(d).unwrap());
    hammer2::Pfs::open(vol, label)
        .unwrap()
        .inode(inum)
        .unwrap()
        .obj_type()
}

/// The newest header copy destroyed: the repair goes on from the next
/// newest, and says so as a rewind (the flush that copy held is given
/// up), never as an in-place repair that lost nothing.
#[test]
fn an_unreadable_newest_header_is_reported_as_a_rewind() {
    let (dev, base) = four_states();
    let d: Arc<dyn BlockDevice> = dev.clone();
    let newest = newest_slot(d.as_ref());
    junk(
        d.as_ref(),
        hammer2::disk::volhdr_offset(newest),
        hammer2::disk::VOLUME_BYTES as u64,
    );
    let second = newest_slot(d.as_ref());
    let o = repair_yes(d.clone(), Mode::Yes, None);
    let r = o.rewind.as_ref().expect("reported as a rewind");
    assert_eq!((r.from_slot, r.to_slot), (Some(newest), second));
    assert!(
        o.actions
            .iter()
            .any(|a| a.lossy && a.what.contains(&format!("copy {newest} is unreadable"))),
        "{:#?}",
        o.actions
    );
    assert!(o.after.is_clean(), "{:?}", o.after.problems);
    assert!(files_of(&dev) == base.states[&second]);
}

/// A PFS root destroyed on an image with one header copy: no older tree
/// holds it and in-place repair loses the PFS. `hammer2 recover` still
/// copies every other PFS whole, and finds the lost PFS's files by
/// scanning the image for inodes whose check codes verify: every file
/// of the PFS is recovered, those changed since the snapshot (which
/// holds the rest) into lost+found.
#[test]
fn recover_a_pfs_whose_root_is_lost() {
    let dev = Arc::new(damage::own_image(2, 2 << 30));
    let d: Arc<dyn BlockDevice> = dev.clone();
    let before = files_of(&dev);
    let regular: Vec<&(String, u64)> = before
        .keys()
        .filter(|(l, i)| c_type(&dev, l, *i) == hammer2::disk::ObjType::Regfile)
        .collect();
    let c = Craft::new(d.clone());
    let root = c.bref(c.pfs_root("DATA"));
    junk(d.as_ref(), root.data_off.offset(), root.data_off.bytes());
    let dir = scratch_dir("recover-pfs");
    let img = dir.join("img");
    save_sparse(&dev, &img);
    let dest = dir.join("out");
    let (code, out, err) = hammer2_bin(&["recover", img.to_str().unwrap(), dest.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("PFS root at key"), "{err}");
    assert!(!dest.join("DATA").exists());
    let mut host = Vec::new();
    host_files(&dest, &mut host);
    for k in regular {
        let bytes = &before[k];
        assert!(
            host.iter().any(|(_, b)| b == bytes),
            "{}:{} ({} bytes) not recovered",
            k.0,
            k.1,
            bytes.len()
        );
    }
    assert!(dest.join("lost+found").is_dir());

    // In place, the PFS is cut: its files are gone.
    let o = repair_yes(d.clone(), Mode::Yes, None);
    assert!(o.after.is_clean());
    let after = files_of(&dev);
    assert!(after.keys().all(|(l, _)| l != "DATA"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// DragonFly's image with two header copies written, the newest
/// destroyed, the older one's tree not whole (blocks the newer flush
/// freed were reused): the repair goes on from the older copy and
/// reports the newer flush as given up, never as a repair that lost
/// nothing (it used to say nothing of the file the flush had made).
#[test]
fn an_unreadable_newest_header_is_reported_when_the_older_tree_is_not_whole() {
    let base = Base::new("v1-4headers-10g", damage::fixture_mem("v1-4headers-10g"));
    let dev = Arc::new(base.dev.snapshot());
    let d: Arc<dyn BlockDevice> = dev.clone();
    let newest = newest_slot(d.as_ref());
    junk(
        d.as_ref(),
        hammer2::disk::volhdr_offset(newest),
        hammer2::disk::VOLUME_BYTES as u64,
    );
    let second = newest_slot(d.as_ref());
    let o = repair_yes(d.clone(), Mode::Yes, None);
    let r = o.rewind.as_ref().expect("reported as a rewind");
    assert_eq!((r.from_slot, r.to_slot), (Some(newest), second));
    assert!(o.after.is_clean(), "{:?}", o.after.problems);
    assert!(files_of(&dev) == base.states[&second]);
}

/// A PFS whose inode counter fell behind its highest inode (the next
/// create would reuse a number in use) is repaired by raising it, and
/// the raised counter is what the repair's commit writes: the mount's
/// own counter, which creates take numbers from, does not put the old
/// one back. Then creates go on from past the highest inode.
#[test]
fn the_inode_counter_raised_by_a_repair_stays_raised() {
    let dev = new_fs(3);
    let mut highest = 0;
    {
        let mut m = hammer2::mount::Mount::open(dev.clone()).expect("open");
        for i in 0..5 {
            highest = create_file(
                &mut m,
                "DATA",
                hammer2::mount::ROOT_INUM,
                format!("f{i}").as_bytes(),
            )
            .expect("create");
        }
        m.flush().expect("flush");
    }
    let c = Craft::new(dev.clone());
    let root = c.pfs_root("DATA");
    c.edit_inode(root, |d| d.meta.pfs_inum = highest - 3);
    let found = fsck(dev.clone(), FsckOptions::default()).expect("fsck");
    assert!(
        !found.problems.is_empty(),
        "fsck reports the counter behind inode {highest}"
    );
    repair_yes(dev.clone(), Mode::Yes, None);
    let after = fsck(dev.clone(), FsckOptions::default()).expect("fsck");
    assert!(
        after.problems.is_empty(),
        "after the repair: {:#?}",
        after.problems
    );
    assert_eq!(c.inode_data(c.pfs_root("DATA")).meta.pfs_inum, highest);
    let mut m = hammer2::mount::Mount::open(dev.clone()).expect("open");
    let next = create_file(&mut m, "DATA", hammer2::mount::ROOT_INUM, b"g").expect("create");
    assert_eq!(next, highest + 1);
}
