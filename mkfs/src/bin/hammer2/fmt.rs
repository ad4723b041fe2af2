//! Text forms shared by the verbs: the names hammer2(8) prints for
//! blockref types, check and compression modes, sizes, times and names.

use hammer2::disk::BlockrefType;

/// The blockref type names DragonFly's `hammer2 show` prints.
pub fn type_name(t: BlockrefType) -> &'static str {
    match t {
        BlockrefType::Empty => "empty",
        BlockrefType::Inode => "inode",
        BlockrefType::Indirect => "indirect",
        BlockrefType::Data => "data",
        BlockrefType::Dirent => "dirent",
        BlockrefType::FreemapNode => "freemap_node",
        BlockrefType::FreemapLeaf => "freemap_leaf",
        BlockrefType::Freemap => "freemap",
        BlockrefType::Volume => "volume",
        BlockrefType::Invalid(_) => "unknown",
    }
}

/// A check mode byte (algorithm in the low nibble, level in the high
/// one, as an inode's `check_algo`): "xxhash64", or "name:level".
pub fn check_mode(x: u8) -> String {
    let (algo, level) = (x & 15, x >> 4);
    let name = match hammer2::check::method_name(algo) {
        Some(n) => n.to_string(),
        None => format!("unknown({algo})"),
    };
    if level != 0 {
        format!("{name}:{level}")
    } else {
        name
    }
}

/// A compression mode byte: "lz4:default", or "zlib:6" with a level.
pub fn comp_mode(x: u8) -> String {
    let (algo, level) = (x & 15, x >> 4);
    let name = match hammer2::compress::method_name(algo) {
        Some(n) => n.to_string(),
        None => format!("unknown({algo})"),
    };
    if level != 0 {
        format!("{name}:{level}")
    } else {
        format!("{name}:default")
    }
}

/// The `meth=` text of a blockref's methods byte: "check|comp:default".
pub fn methods(m: u8) -> String {
    format!(
        "{}|{}",
        check_mode(hammer2::disk::dec_check(m)),
        comp_mode(hammer2::disk::dec_comp(m))
    )
}

pub const KIB: f64 = 1024.0;
pub const MIB: f64 = 1024.0 * 1024.0;
pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
pub const TIB: f64 = GIB * 1024.0;

/// A byte count as hammer2(8) prints sizes: "  6.20MB".
pub fn size_string(bytes: u64) -> String {
    let b = bytes as f64;
    if b < KIB / 2.0 {
        format!("{b:6.2}B")
    } else if b < MIB / 2.0 {
        format!("{:6.2}KB", b / KIB)
    } else if b < GIB / 2.0 {
        format!("{:6.2}MB", b / MIB)
    } else if b < TIB / 2.0 {
        format!("{:6.2}GB", b / GIB)
    } else {
        format!("{:6.2}TB", b / TIB)
    }
}

/// Microseconds since the epoch as "22-Nov-2026 04:59:30" (UTC; DragonFly
/// prints local time, which is the same on a machine set to UTC). An
/// inode's times are signed, before 1970 in two's complement as DragonFly
/// writes them (DragonFly's tool divides unsigned and prints those as
/// after the year 292,277).
pub fn time_string(micros: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = (micros as i64).div_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{day:02}-{}-{year} {:02}:{:02}:{:02}",
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Microseconds since the epoch as "YYYYMMDD.HHMMSS" in UTC (the stamp
/// in DragonFly's default snapshot names, which use local time).
pub fn date_stamp(micros: u64) -> String {
    let secs = (micros / 1_000_000) as i64;
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{year:04}{month:02}{day:02}.{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month 1..=12, day 1..=31), proleptic
/// Gregorian (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A name from the media, printable: valid UTF-8 passes through, control
/// characters, quotes, backslashes and invalid bytes are escaped.
pub fn name_string(name: &[u8]) -> String {
    let mut out = String::with_capacity(name.len());
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(time_string(0), "01-Jan-1970 00:00:00");
        // 1700000000 s: the mtime the fixtures carry (14-Nov-2023 22:13:20).
        assert_eq!(time_string(1_700_000_000_000_000), "14-Nov-2023 22:13:20");
        assert_eq!(time_string(951_782_400_000_000), "29-Feb-2000 00:00:00");
        // touch -t 196001010101 (generic/258), -315615540 s as stored.
        let raw = 0u64.wrapping_sub(315_615_540_000_000);
        assert_eq!(time_string(raw), "01-Jan-1960 01:01:00");
        assert_eq!(time_string(u64::MAX), "31-Dec-1969 23:59:59");
        assert_eq!(
            date_stamp(951_782_400_000_000 + 3_723_000_000),
            "20000229.010203"
        );
    }

    #[test]
    fn modes() {
        assert_eq!(methods(0x32), "xxhash64|lz4:default");
        assert_eq!(comp_mode(0x63), "zlib:6");
        assert_eq!(check_mode(0x0e), "unknown(14)");
        assert_eq!(size_string(6_500_352), "  6.20MB");
    }

    #[test]
    fn names() {
        assert_eq!(name_string(b"a\"b"), "a\\\"b");
        assert_eq!(name_string(b"x\xffy\n"), "x\\xffy\\x0a");
        assert_eq!(name_string("Grüße".as_bytes()), "Grüße");
    }
}
