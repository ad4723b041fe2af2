//! DragonFly's `struct uuid` as stored on disk: the fields in host
//! (little-endian) order, so `time_low`, `time_mid` and `time_hi` appear
//! byte-swapped compared with the RFC 4122 text form.

use std::fmt;

/// A UUID held in RFC 4122 order (the order its text form reads in).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Uuid(pub [u8; 16]);

pub const UUID_BYTES: usize = 16;

/// HAMMER2's filesystem type UUID.
pub const FSTYPE_HAMMER2: Uuid = Uuid([
    0x5c, 0xbb, 0x9a, 0xd1, 0x86, 0x2d, 0x11, 0xdc, 0xa9, 0x4d, 0x01, 0x30, 0x1b, 0xb8, 0xa9, 0xf5,
]);

impl Uuid {
    pub const NIL: Uuid = Uuid([0; 16]);

    /// Decode from the on-disk layout (16 bytes; caller checks length).
    pub fn decode(b: &[u8]) -> Uuid {
        let mut u = [0u8; 16];
        u[0] = b[3];
        u[1] = b[2];
        u[2] = b[1];
        u[3] = b[0];
        u[4] = b[5];
        u[5] = b[4];
        u[6] = b[7];
        u[7] = b[6];
        u[8..16].copy_from_slice(&b[8..16]);
        Uuid(u)
    }

    /// Encode into the on-disk layout.
    pub fn encode(&self, b: &mut [u8]) {
        let u = &self.0;
        b[0] = u[3];
        b[1] = u[2];
        b[2] = u[1];
        b[3] = u[0];
        b[4] = u[5];
        b[5] = u[4];
        b[6] = u[7];
        b[7] = u[6];
        b[8..16].copy_from_slice(&u[8..16]);
    }

    /// A version 4 (random) UUID from 16 random bytes.
    pub fn from_random(mut r: [u8; 16]) -> Uuid {
        r[6] = (r[6] & 0x0f) | 0x40;
        r[8] = (r[8] & 0x3f) | 0x80;
        Uuid(r)
    }

    /// HAMMER2 stores a unix uid/gid as a "degenerate" UUID: the id in
    /// the last four bytes of the node field (on-disk bytes 12..16, host
    /// order), everything else zero.
    pub fn from_unix_id(id: u32) -> Uuid {
        let mut disk = [0u8; 16];
        disk[12..16].copy_from_slice(&id.to_le_bytes());
        Uuid::decode(&disk)
    }

    /// The unix id of a degenerate uid/gid UUID.
    pub fn unix_id(&self) -> u32 {
        let mut disk = [0u8; 16];
        self.encode(&mut disk);
        u32::from_le_bytes([disk[12], disk[13], disk[14], disk[15]])
    }

    /// Parse the text form `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    pub fn parse(s: &str) -> Option<Uuid> {
        let hex: Vec<u8> = s.bytes().filter(|&c| c != b'-').collect();
        if hex.len() != 32 || s.len() != 36 {
            return None;
        }
        let mut u = [0u8; 16];
        for (i, pair) in hex.chunks(2).enumerate() {
            let txt = std::str::from_utf8(pair).ok()?;
            u[i] = u8::from_str_radix(txt, 16).ok()?;
        }
        Some(Uuid(u))
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let u = &self.0;
        write!(
            f,
            "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13],
            u[14], u[15]
        )
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstype_disk_bytes_match_format_doc() {
        // The bytes hexdump shows in every HAMMER2 volume header at 0x50.
        let disk = [
            0xd1, 0x9a, 0xbb, 0x5c, 0x2d, 0x86, 0xdc, 0x11, 0xa9, 0x4d, 0x01, 0x30, 0x1b, 0xb8,
            0xa9, 0xf5,
        ];
        assert_eq!(Uuid::decode(&disk), FSTYPE_HAMMER2);
        assert_eq!(
            FSTYPE_HAMMER2.to_string(),
            "5cbb9ad1-862d-11dc-a94d-01301bb8a9f5"
        );
        let mut out = [0u8; 16];
        FSTYPE_HAMMER2.encode(&mut out);
        assert_eq!(out, disk);
        assert_eq!(
            Uuid::parse("5cbb9ad1-862d-11dc-a94d-01301bb8a9f5"),
            Some(FSTYPE_HAMMER2)
        );
    }

    #[test]
    fn unix_id_round_trip() {
        for id in [0u32, 1, 1000, 65534, u32::MAX] {
            assert_eq!(Uuid::from_unix_id(id).unix_id(), id);
        }
    }
}
