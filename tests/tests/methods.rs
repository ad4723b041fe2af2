//! setcomp/setcheck and the extension methods (zstd compression 8,
//! BLAKE3 check 8) end to end: an inode's methods change, blocks written
//! before keep theirs, new blocks follow the inode, new files inherit
//! from their directory; the blocks on disk are checked with the zstd
//! and blake3 crates' own functions, read back after a remount, fsck is
//! clean, and a corrupted BLAKE3-checked block is an error naming its
//! offset, from the reader and from fsck.

use bufcache::{BlockDevice, MemDevice};
use hammer2::disk::{check_method as cm, comp_method as cmp, Blockref, BlockrefType};
use hammer2::fsck::{fsck, Options};
use hammer2::mount::{Mount, ROOT_INUM};
use hammer2::pfs::Pfs;
use hammer2::setmethods::{parse_check, parse_comp, Methods};
use hammer2::{Error, Volume};
use std::sync::Arc;
use tests::{create_file, new_fs, open, T0};

const PFS: &str = "DATA";

/// Compressible but not trivial: a text with a counter in each line.
fn text(len: usize, salt: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = 0u32;
    while out.len() < len {
        out.extend_from_slice(format!("line {i} of file {salt}: hammer2 zstd blake3\n").as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

fn volume(dev: &Arc<MemDevice>) -> Arc<Volume> {
    let d: Arc<dyn BlockDevice> = dev.clone();
    Arc::new(Volume::open(d).unwrap())
}

/// The DATA blockrefs of `path`, with the inode's own blockref.
fn brefs(dev: &Arc<MemDevice>, path: &str) -> (Vec<Blockref>, u8, u8) {
    let vol = volume(dev);
    let pfs = Pfs::open(vol.clone(), PFS).unwrap();
    let ino = pfs.resolve(path).unwrap();
    let data = hammer2::chain::collect(&vol, &ino.blockset(), 0, u64::MAX)
        .unwrap()
        .into_iter()
        .filter(|b| b.btype == BlockrefType::Data)
        .collect();
    (data, ino.meta().comp_algo, ino.meta().check_algo)
}

fn raw(dev: &Arc<MemDevice>, br: &Blockref) -> Vec<u8> {
    let mut buf = vec![0u8; br.data_off.bytes() as usize];
    dev.read_at(&mut buf, br.data_off.offset()).unwrap();
    buf
}

fn mkfile(m: &mut Mount, dir: u64, name: &str, data: &[u8]) -> u64 {
    let inum = create_file(m, PFS, dir, name.as_bytes()).unwrap();
    m.write(PFS, inum, 0, data, T0).unwrap();
    inum
}

fn fsck_problems(dev: &Arc<MemDevice>) -> Vec<String> {
    let d: Arc<dyn BlockDevice> = dev.clone();
    fsck(d, Options::default())
        .unwrap()
        .problems
        .iter()
        .map(|p| p.to_string())
        .collect()
}

#[test]
fn names_parse_as_dragonfly_spells_them() {
    assert_eq!(parse_comp("lz4").unwrap(), cmp::LZ4);
    assert_eq!(parse_comp("default").unwrap(), cmp::LZ4);
    assert_eq!(parse_comp("disabled").unwrap(), cmp::AUTOZERO);
    assert_eq!(parse_comp("zlib:9").unwrap(), cmp::ZLIB | 9 << 4);
    assert_eq!(parse_comp("ZSTD:15").unwrap(), 8 | 15 << 4);
    assert_eq!(parse_comp("zstd").unwrap(), 8);
    assert!(parse_comp("zlib:10").is_err());
    assert!(parse_comp("lz4:3").is_err());
    assert!(parse_comp("brotli").is_err());
    assert!(parse_comp("5").is_err());
    assert_eq!(parse_check("blake3").unwrap(), 8);
    assert_eq!(parse_check("crc32").unwrap(), cm::ISCSI32);
    assert_eq!(parse_check("2").unwrap(), cm::ISCSI32);
    assert!(parse_check("freemap").is_err());
    assert!(parse_check("5").is_err());
    assert!(parse_check("sha256").is_err());
}

#[test]
fn setcomp_zstd_and_setcheck_blake3_on_a_tree() {
    let dev = new_fs(7);
    let mut m = open(&dev);
    let dir = m.mkdir(PFS, ROOT_INUM, b"d", 0o755, 0, 0, T0).unwrap();
    let sub = m.mkdir(PFS, dir, b"sub", 0o755, 0, 0, T0).unwrap();
    let old_text = text(200_000, 1);
    let old = mkfile(&mut m, sub, "old", &old_text);
    let outside_text = text(100_000, 2);
    mkfile(&mut m, ROOT_INUM, "outside", &outside_text);
    m.flush().unwrap();
    let (before, ..) = brefs(&dev, "d/sub/old");
    assert!(before.iter().all(|b| b.comp_method() == cmp::LZ4));

    let mut seen = Vec::new();
    let n = m
        .set_methods(
            PFS,
            dir,
            Methods {
                comp: Some(8 | 9 << 4),
                check: Some(8),
            },
            true,
            &mut |p, i| seen.push((String::from_utf8_lossy(p).into_owned(), i)),
        )
        .unwrap();
    assert_eq!(n, 3);
    let paths: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths, ["", "sub", "sub/old"]);
    m.flush().unwrap();
    // Existing blocks are not rewritten.
    let (kept, comp, check) = brefs(&dev, "d/sub/old");
    assert_eq!((comp, check), (8 | 9 << 4, 8));
    assert_eq!(kept, before);

    // New blocks of the old file, a new file in the tree (inherited), and
    // a file outside (unchanged methods).
    let tail = text(70_000, 3);
    m.write(PFS, old, 200_000, &tail, T0).unwrap();
    let new_text = text(300_000, 4);
    mkfile(&mut m, sub, "new", &new_text);
    mkfile(&mut m, ROOT_INUM, "outside2", &text(90_000, 5));
    m.flush().unwrap();
    let (new_brefs, comp, check) = brefs(&dev, "d/sub/new");
    assert_eq!((comp, check), (8 | 9 << 4, 8));
    assert_eq!(new_brefs.len(), 5);
    for br in &new_brefs {
        assert_eq!(br.comp_method(), 8, "{br:?}");
        assert_eq!(br.check_method(), 8);
        let phys = raw(&dev, br);
        // The check area holds the blake3 crate's hash of the block.
        assert_eq!(&br.check[..32], blake3::hash(&phys).as_bytes());
        // A length, then a frame the zstd crate decodes.
        let len = u32::from_le_bytes(phys[..4].try_into().unwrap()) as usize;
        let plain = zstd::stream::decode_all(&phys[4..4 + len]).unwrap();
        let lbase = br.key as usize;
        let end = (lbase + 65536).min(new_text.len());
        // The last block holds the file's end, zero-padded.
        assert!(
            plain[..end - lbase] == new_text[lbase..end],
            "block {lbase}"
        );
        assert!(plain[end - lbase..].iter().all(|&b| b == 0));
    }
    let (old_after, ..) = brefs(&dev, "d/sub/old");
    assert!(old_after
        .iter()
        .filter(|b| b.key < 196_608)
        .all(|b| b.comp_method() == cmp::LZ4));
    assert!(old_after.iter().any(|b| b.comp_method() == 8));
    let (outside, comp, check) = brefs(&dev, "outside2");
    assert_eq!((comp & 15, check), (cmp::LZ4, cm::XXHASH64));
    assert!(outside.iter().all(|b| b.comp_method() == cmp::LZ4));
    assert!(fsck_problems(&dev).is_empty(), "{:?}", fsck_problems(&dev));

    drop(m);
    let mut m = open(&dev);
    let sub = m.lookup(PFS, ROOT_INUM, b"d").unwrap().unwrap();
    let sub = m.lookup(PFS, sub, b"sub").unwrap().unwrap();
    let newi = m.lookup(PFS, sub, b"new").unwrap().unwrap();
    assert!(m.read(PFS, newi, 0, 400_000).unwrap() == new_text);
    let mut want = old_text.clone();
    want.extend_from_slice(&tail);
    assert!(m.read(PFS, old, 0, 400_000).unwrap() == want);

    // Damage one BLAKE3-checked block: the reader and fsck name it.
    let victim = new_brefs[2];
    let mut phys = raw(&dev, &victim);
    phys[7] ^= 0x40;
    dev.write_at(&phys, victim.data_off.offset()).unwrap();
    drop(m);
    let vol = volume(&dev);
    let pfs = Pfs::open(vol, PFS).unwrap();
    let ino = pfs.resolve("d/sub/new").unwrap();
    match pfs.read(&ino, 0, 300_000) {
        Err(Error::CheckMismatch { at, method: 8, .. }) => {
            assert_eq!(at, victim.data_off.offset())
        }
        other => panic!("{other:?}"),
    }
    let problems = fsck_problems(&dev);
    let at = format!("{:#014x}", victim.data_off.offset());
    assert!(
        problems.len() == 1 && problems[0].contains(&at[2..]),
        "{problems:?} should name {at}"
    );
}
