//! Block compression as HAMMER2 stores it. LZ4 blocks carry a 4-byte
//! native-order length before the raw LZ4 block; ZLIB blocks are a zlib
//! stream. ZSTD (our extension method 8, which DragonFly cannot read) is
//! laid out as LZ4 is: a 4-byte little-endian length, then one zstd
//! frame. A compressed block is kept only when it fits in half the
//! logical block, and its physical size is rounded up to a power of two
//! (at least 1 KiB) with a zeroed tail.

use crate::disk::comp_method as cmp;
use crate::error::{Error, Result, Where};
use std::io::{Read, Write};

/// The name of a compression algorithm (`comp_algo`'s low nibble), as
/// hammer2(8) prints it; `None` for a number no method has.
pub fn method_name(method: u8) -> Option<&'static str> {
    Some(match method {
        cmp::NONE => "none",
        cmp::AUTOZERO => "autozero",
        cmp::LZ4 => "lz4",
        cmp::ZLIB => "zlib",
        cmp::ZSTD => "zstd",
        _ => return None,
    })
}

/// Expand the physical block `phys` (at image offset `at`) written with
/// compression `method` into `logical_bytes` bytes; a short result is
/// zero-filled, as DragonFly's read path does.
pub fn decompress(method: u8, phys: &[u8], logical_bytes: usize, at: u64) -> Result<Vec<u8>> {
    let fail = |detail: String| Error::Decompress {
        at,
        method,
        detail,
        place: Where::default(),
    };
    let mut out = match method {
        cmp::NONE | cmp::AUTOZERO => {
            let n = phys.len().min(logical_bytes);
            phys[..n].to_vec()
        }
        cmp::LZ4 | cmp::ZSTD => {
            if phys.len() < 4 {
                return Err(fail("block shorter than its length prefix".into()));
            }
            let clen = u32::from_le_bytes([phys[0], phys[1], phys[2], phys[3]]) as usize;
            if clen > phys.len() - 4 {
                return Err(fail(format!(
                    "compressed length {clen} exceeds block of {}",
                    phys.len()
                )));
            }
            let body = &phys[4..4 + clen];
            if method == cmp::ZSTD {
                zstd::bulk::decompress(body, logical_bytes)
                    .map_err(|e| fail(format!("zstd: {e}")))?
            } else {
                let mut buf = vec![0u8; logical_bytes];
                let n = lz4_flex::block::decompress_into(body, &mut buf)
                    .map_err(|e| fail(format!("lz4: {e}")))?;
                buf.truncate(n);
                buf
            }
        }
        cmp::ZLIB => {
            let mut buf = Vec::with_capacity(logical_bytes);
            let mut dec = flate2::read::ZlibDecoder::new(phys).take(logical_bytes as u64);
            dec.read_to_end(&mut buf)
                .map_err(|e| fail(format!("zlib: {e}")))?;
            buf
        }
        other => {
            return Err(Error::Unsupported {
                what: format!("compression method {other}"),
                at,
            });
        }
    };
    out.resize(logical_bytes, 0);
    Ok(out)
}

/// Physical size for `n` bytes of compressed output: the next power of
/// two, at least 1 KiB.
pub fn physical_size(n: usize) -> usize {
    n.next_power_of_two().max(1024)
}

/// Compress a logical block with `method` (LZ4; ZLIB at `level`, 0 for
/// the default 6; ZSTD at `level`, 0 for zstd's default 3). Returns the padded physical block, or `None` when the
/// output would not fit in half the logical block (store it raw then).
pub fn compress(method: u8, level: u8, data: &[u8]) -> Option<Vec<u8>> {
    let limit = data.len() / 2;
    let mut out = match method {
        cmp::LZ4 => {
            let body = lz4_flex::block::compress(data);
            if body.len() + 4 > limit {
                return None;
            }
            let mut v = Vec::with_capacity(body.len() + 4);
            v.extend_from_slice(&(body.len() as u32).to_le_bytes());
            v.extend_from_slice(&body);
            v
        }
        cmp::ZSTD => {
            let lvl = if level == 0 { 3 } else { i32::from(level) };
            let body = zstd::bulk::compress(data, lvl).ok()?;
            if body.len() + 4 > limit {
                return None;
            }
            let mut v = Vec::with_capacity(body.len() + 4);
            v.extend_from_slice(&(body.len() as u32).to_le_bytes());
            v.extend_from_slice(&body);
            v
        }
        cmp::ZLIB => {
            let lvl = if level == 0 { 6 } else { level.min(9) as u32 };
            let mut enc =
                flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(lvl));
            enc.write_all(data).ok()?;
            let v = enc.finish().ok()?;
            if v.len() > limit {
                return None;
            }
            v
        }
        _ => return None,
    };
    let phys = physical_size(out.len());
    if phys > limit.max(1024) {
        return None;
    }
    out.resize(phys, 0);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Vec<u8> {
        let line = b"The quick brown fox jumps over the lazy dog. 0123456789\n";
        line.iter().cycle().take(n).copied().collect()
    }

    #[test]
    fn lz4_round_trip_and_half_rule() {
        let data = text(65536);
        let phys = compress(cmp::LZ4, 0, &data).unwrap();
        assert!(phys.len() <= 32768 && phys.len().is_power_of_two());
        assert_eq!(decompress(cmp::LZ4, &phys, 65536, 0).unwrap(), data);
        // Random bytes do not compress: stored raw.
        let mut x = 0x1234_5678u32;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        assert!(compress(cmp::LZ4, 0, &noise).is_none());
    }

    #[test]
    fn zlib_round_trip() {
        let data = text(65536);
        let phys = compress(cmp::ZLIB, 9, &data).unwrap();
        assert_eq!(decompress(cmp::ZLIB, &phys, 65536, 0).unwrap(), data);
    }

    #[test]
    fn zstd_round_trip_against_the_zstd_crate() {
        let data = text(65536);
        let phys = compress(cmp::ZSTD, 0, &data).unwrap();
        assert!(phys.len() <= 32768 && phys.len().is_power_of_two());
        // The layout: a length, then a frame the zstd crate itself decodes.
        let clen = u32::from_le_bytes([phys[0], phys[1], phys[2], phys[3]]) as usize;
        assert_eq!(
            zstd::stream::decode_all(&phys[4..4 + clen]).unwrap(),
            data,
            "frame readable by the zstd crate"
        );
        assert!(phys[4 + clen..].iter().all(|&b| b == 0), "zeroed tail");
        // A frame made by the zstd crate is read back.
        let frame = zstd::stream::encode_all(&data[..], 19).unwrap();
        let mut ext = (frame.len() as u32).to_le_bytes().to_vec();
        ext.extend_from_slice(&frame);
        ext.resize(physical_size(ext.len()), 0);
        assert_eq!(decompress(cmp::ZSTD, &ext, 65536, 0).unwrap(), data);
        assert_eq!(
            decompress(
                cmp::ZSTD,
                &compress(cmp::ZSTD, 15, &data).unwrap(),
                65536,
                0
            )
            .unwrap(),
            data
        );
        assert_eq!(method_name(cmp::ZSTD), Some("zstd"));
        // Garbage inside a valid length is an error naming the method.
        let mut bad = phys.clone();
        bad[8] ^= 0xff;
        bad[9] ^= 0xff;
        assert!(matches!(
            decompress(cmp::ZSTD, &bad, 65536, 0x1234),
            Err(Error::Decompress {
                at: 0x1234,
                method: cmp::ZSTD,
                ..
            })
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let junk = vec![0xffu8; 1024];
        assert!(decompress(cmp::LZ4, &junk, 65536, 0).is_err());
        assert!(decompress(cmp::ZLIB, &junk, 65536, 0).is_err());
        assert!(decompress(cmp::LZ4, &[1, 0], 65536, 0).is_err());
        assert!(decompress(cmp::ZSTD, &junk, 65536, 0).is_err());
        assert!(decompress(9, &junk, 65536, 0).is_err());
    }

    #[test]
    fn short_output_is_zero_filled() {
        let data = text(1000);
        let body = lz4_flex::block::compress(&data);
        let mut phys = (body.len() as u32).to_le_bytes().to_vec();
        phys.extend_from_slice(&body);
        let out = decompress(cmp::LZ4, &phys, 4096, 0).unwrap();
        assert_eq!(&out[..1000], &data[..]);
        assert!(out[1000..].iter().all(|&b| b == 0));
    }
}
