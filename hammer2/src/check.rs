//! Check codes: computing and verifying the value a blockref carries for
//! the physical bytes it references (after compression, padding
//! included). BLAKE3 (our extension method 8, which DragonFly cannot
//! verify) keeps the 32-byte hash in the first half of the 64-byte check
//! area.

use crate::disk::check_method as cm;
use crate::disk::Blockref;
use crate::error::{Error, Result, Where};
use sha2::{Digest, Sha256};

/// DragonFly's xxhash64 seed ("MattDlln").
pub const XXH_HAMMER2_SEED: u64 = 0x4d61_7474_446c_6c6e;

/// CRC-32C ("iscsi crc32"), as `hammer2_icrc32`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

pub fn xxhash64(data: &[u8]) -> u64 {
    xxhash_rust::xxh64::xxh64(data, XXH_HAMMER2_SEED)
}

/// SHA-256, with the 4th 64-bit word folded into the 3rd, first 24 bytes.
pub fn sha192(data: &[u8]) -> [u8; 24] {
    let d = Sha256::digest(data);
    let mut out = [0u8; 24];
    out.copy_from_slice(&d[..24]);
    for i in 0..8 {
        out[16 + i] ^= d[24 + i];
    }
    out
}

/// BLAKE3 of the physical block, as the BLAKE3 check method stores it.
pub fn blake3(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

/// The name of a check algorithm (`check_algo`'s low nibble), as
/// hammer2(8) prints it; `None` for a number no method has.
pub fn method_name(method: u8) -> Option<&'static str> {
    Some(match method {
        cm::NONE => "none",
        cm::DISABLED => "disabled",
        cm::ISCSI32 => "crc32",
        cm::XXHASH64 => "xxhash64",
        cm::SHA192 => "sha192",
        cm::FREEMAP => "freemap",
        cm::BLAKE3 => "blake3",
        _ => return None,
    })
}

/// Store the check code of `data` in `br.check` per `br`'s check method.
pub fn set_check(br: &mut Blockref, data: &[u8]) {
    match br.check_method() {
        cm::ISCSI32 => {
            br.check = [0; 64];
            br.check[..4].copy_from_slice(&crc32c(data).to_le_bytes());
        }
        cm::XXHASH64 => {
            br.check = [0; 64];
            br.check[..8].copy_from_slice(&xxhash64(data).to_le_bytes());
        }
        cm::SHA192 => {
            br.check = [0; 64];
            br.check[..24].copy_from_slice(&sha192(data));
        }
        cm::BLAKE3 => {
            br.check = [0; 64];
            br.check[..32].copy_from_slice(&blake3(data));
        }
        // The freemap check keeps its bigmask/avail hints beside the CRC.
        cm::FREEMAP => br.check[..4].copy_from_slice(&crc32c(data).to_le_bytes()),
        _ => {}
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Verify `data` (the physical block at `br.data_off`) against `br`.
/// Methods NONE and DISABLED always pass; an unknown method is reported
/// as unsupported.
pub fn verify(br: &Blockref, data: &[u8]) -> Result<()> {
    let at = br.data_off.offset();
    let (expected, actual) = match br.check_method() {
        cm::NONE | cm::DISABLED => return Ok(()),
        cm::ISCSI32 | cm::FREEMAP => {
            let stored = u32::from_le_bytes([br.check[0], br.check[1], br.check[2], br.check[3]]);
            let computed = crc32c(data);
            if stored == computed {
                return Ok(());
            }
            (format!("{stored:08x}"), format!("{computed:08x}"))
        }
        cm::XXHASH64 => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&br.check[..8]);
            let stored = u64::from_le_bytes(a);
            let computed = xxhash64(data);
            if stored == computed {
                return Ok(());
            }
            (format!("{stored:016x}"), format!("{computed:016x}"))
        }
        cm::SHA192 => {
            let computed = sha192(data);
            if computed[..] == br.check[..24] {
                return Ok(());
            }
            (hex(&br.check[..24]), hex(&computed))
        }
        cm::BLAKE3 => {
            let computed = blake3(data);
            if computed[..] == br.check[..32] {
                return Ok(());
            }
            (hex(&br.check[..32]), hex(&computed))
        }
        other => {
            return Err(Error::Unsupported {
                what: format!("check method {other}"),
                at,
            });
        }
    };
    Err(Error::CheckMismatch {
        at,
        method: br.check_method(),
        expected,
        actual,
        place: Where::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{enc_methods, BlockrefType, DataOff};

    #[test]
    fn crc32c_check_value() {
        // The standard CRC-32C check value, as the format notes record.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn xxhash64_known_values() {
        // XXH64 reference vectors with seed 0 (from the xxHash spec tests).
        assert_eq!(xxhash_rust::xxh64::xxh64(b"", 0), 0xEF46_DB37_51D8_E999);
        // Seeded value differs from the unseeded one.
        assert_ne!(xxhash64(b""), 0xEF46_DB37_51D8_E999);
    }

    #[test]
    fn sha192_folds_fourth_word() {
        let d = Sha256::digest(b"abc");
        let s = sha192(b"abc");
        assert_eq!(&s[..16], &d[..16]);
        for i in 0..8 {
            assert_eq!(s[16 + i], d[16 + i] ^ d[24 + i]);
        }
    }

    #[test]
    fn blake3_check_area_holds_the_hash() {
        // The BLAKE3 spec's test vector for the empty input, and the
        // blake3 crate's incremental hasher as a second reference.
        let empty = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";
        assert_eq!(hex(&blake3(b"")), empty);
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut h = blake3::Hasher::new();
        for part in data.chunks(1000) {
            h.update(part);
        }
        let mut br = Blockref::EMPTY;
        br.btype = BlockrefType::Data;
        br.methods = enc_methods(cm::BLAKE3, 0);
        br.data_off = DataOff::new(0x80_0000, 16);
        br.check = [0xaa; 64];
        set_check(&mut br, &data);
        assert_eq!(&br.check[..32], h.finalize().as_bytes());
        assert!(br.check[32..].iter().all(|&b| b == 0));
        let mut bad = data.clone();
        bad[65535] ^= 0x80;
        match verify(&br, &bad) {
            Err(
                e @ Error::CheckMismatch {
                    at: 0x80_0000,
                    method: cm::BLAKE3,
                    ..
                },
            ) => {
                let text = e.to_string();
                assert!(
                    text.contains("blake3") && text.contains("0x800000"),
                    "{text}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn set_then_verify_each_method() {
        let data = vec![7u8; 1024];
        for m in [
            cm::NONE,
            cm::DISABLED,
            cm::ISCSI32,
            cm::XXHASH64,
            cm::SHA192,
            cm::FREEMAP,
            cm::BLAKE3,
        ] {
            let mut br = Blockref::EMPTY;
            br.btype = BlockrefType::Data;
            br.methods = enc_methods(m, 0);
            br.data_off = DataOff::new(0x40_0000, 10);
            set_check(&mut br, &data);
            verify(&br, &data).unwrap();
            let mut bad = data.clone();
            bad[5] ^= 1;
            let r = verify(&br, &bad);
            if m == cm::NONE || m == cm::DISABLED {
                assert!(r.is_ok());
            } else {
                assert!(
                    matches!(r, Err(Error::CheckMismatch { at: 0x40_0000, .. })),
                    "{m}"
                );
            }
        }
    }
}
