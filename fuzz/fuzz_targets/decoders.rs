//! Fuzz target: every fixed-layout decoder on arbitrary bytes (blockref,
//! blockref arrays, inode, freemap bitmap entry and leaf, volume header,
//! dirent names in blockrefs, check-code verification). Errors are
//! fine; a panic is a bug.
#![no_main]

use hammer2::disk::freemap::{BmapData, BMAP_BYTES};
use hammer2::disk::{Blockref, InodeData, VolumeHeader, BLOCKREF_BYTES, VOLUME_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut b = [0u8; BLOCKREF_BYTES];
    let n = data.len().min(BLOCKREF_BYTES);
    b[..n].copy_from_slice(&data[..n]);
    let br = Blockref::decode(&b);
    assert_eq!(br.encode(), b);
    let _ = (br.key_end(), br.dirent(), br.data_off.bytes(), format!("{br:?}"));
    let _ = hammer2::check::verify(&br, data);
    let _ = hammer2::chain::decode_set(data);
    let _ = Blockref::decode_at(data, 1);
    if let Ok(ino) = InodeData::decode(data, 0) {
        let _ = (ino.name(), ino.blockset());
    }
    let mut bm = [0u8; BMAP_BYTES];
    let n = data.len().min(BMAP_BYTES);
    bm[..n].copy_from_slice(&data[..n]);
    let _ = BmapData::decode(&bm);
    let _ = BmapData::decode_at(data, 0);
    let _ = hammer2::freemap::decode_leaf(&br, data);
    let mut vh = vec![0u8; VOLUME_BYTES];
    let n = data.len().min(VOLUME_BYTES);
    vh[..n].copy_from_slice(&data[..n]);
    let _ = VolumeHeader::decode(&vh, 0);
    let _ = VolumeHeader::decode(data, 0);
});
