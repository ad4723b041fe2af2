//! Fuzz target: the block decompressors (autozero, lz4, zlib, zstd and
//! unknown methods) on arbitrary physical blocks. The first byte picks
//! the method, the next two the logical size in KiB; errors are fine, a
//! panic or an output of the wrong size is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let method = data[0] & 0x0f;
    let logical = (usize::from(u16::from_le_bytes([data[1], data[2]])) % 64 + 1) * 1024;
    if let Ok(out) = hammer2::compress::decompress(method, &data[3..], logical, 0) {
        assert_eq!(out.len(), logical, "method {method}");
    }
});
