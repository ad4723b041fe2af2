//! The NBD client against real servers (qemu-nbd and nbdkit, on a unix
//! socket and on loopback TCP): concurrent reads and writes in flight at
//! once land exactly where a model says, a barrier reaches the file,
//! requests past the server's maximum are split, unaligned ones are
//! widened (against a server that fails any request outside its limits), and a server that goes away fails every request with an
//! error that says so, at once and without a hang.

#[path = "../../tests/src/nbdserver.rs"]
mod nbdserver;

use bufcache::nbd::{NbdDevice, NbdUri};
use bufcache::BlockDevice;
use nbdserver::{available, NbdServer, Server};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SIZE: u64 = 64 << 20;

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(tag: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("nbd-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

fn image(dir: &Path) -> PathBuf {
    let p = dir.join("disk.raw");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(SIZE).unwrap();
    p
}

fn open(s: &NbdServer, writable: bool) -> NbdDevice {
    NbdDevice::open(&NbdUri::parse(&s.uri).unwrap(), writable).unwrap()
}

fn need(server: Server) {
    assert!(
        available(server),
        "{server:?} is not installed (scripts/test installs qemu-utils and nbdkit)"
    );
}

/// Four threads write and read random ranges at once; every byte ends
/// where the model says, on the device and, after a barrier, in the file.
fn concurrent_round_trip(server: Server, tcp: bool) {
    need(server);
    let dir = scratch(&format!("rt-{server:?}-{tcp}"));
    let img = image(&dir.0);
    let s = NbdServer::start(server, &img, "raw", (!tcp).then_some(dir.0.as_path()));
    let dev = Arc::new(open(&s, true));
    assert_eq!(dev.size_bytes(), SIZE);
    let model = Arc::new(Mutex::new(vec![0u8; SIZE as usize]));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let dev = dev.clone();
            let model = model.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(t);
                // Each thread owns a quarter, so the model needs no order.
                let base = t * SIZE / 4;
                for i in 0..300 {
                    let len = rng.gen_range(1..=256usize) * 1024;
                    let off = base + rng.gen_range(0..(SIZE / 4 - len as u64) / 1024) * 1024;
                    if i % 3 == 2 {
                        let mut b = vec![0u8; len];
                        dev.read_at(&mut b, off).unwrap();
                        let m = model.lock().unwrap();
                        assert!(b == m[off as usize..off as usize + len], "read at {off}");
                    } else {
                        let b: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                        dev.write_at(&b, off).unwrap();
                        model.lock().unwrap()[off as usize..off as usize + len].copy_from_slice(&b);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Several writes in flight together (`write_many`), aligned and not,
    // each in a MiB of its own.
    let mut rng = rand::rngs::SmallRng::seed_from_u64(99);
    let bufs: Vec<(u64, Vec<u8>)> = (0..8u64)
        .map(|k| {
            let unit = if k % 3 == 0 { 1 } else { 1024 };
            let len = rng.gen_range(1..=(512 << 10) / unit) * unit;
            let off = (48 << 20)
                + k * (1 << 20)
                + rng.gen_range(0..=(1 << 20) - len as u64) / unit as u64 * unit as u64;
            (off, (0..len).map(|_| rng.gen()).collect())
        })
        .collect();
    let writes: Vec<(u64, Vec<&[u8]>)> = bufs
        .iter()
        .map(|(off, b)| (*off, vec![&b[..b.len() / 2], &b[b.len() / 2..]]))
        .collect();
    for r in dev.write_many(&writes) {
        r.unwrap();
    }
    for (off, b) in &bufs {
        model.lock().unwrap()[*off as usize..*off as usize + b.len()].copy_from_slice(b);
    }
    // One request far past any server's one-request limit (split), and a
    // read of the whole device.
    let big: Vec<u8> = (0..(40u32 << 20)).map(|i| (i % 251) as u8).collect();
    dev.write_at(&big, 8 << 20).unwrap();
    model.lock().unwrap()[8 << 20..(8 << 20) + big.len()].copy_from_slice(&big);
    dev.barrier().unwrap();
    let mut all = vec![0u8; SIZE as usize];
    dev.read_at(&mut all, 0).unwrap();
    let m = model.lock().unwrap();
    assert!(all == *m, "device differs from the model");
    assert!(
        std::fs::read(&img).unwrap() == *m,
        "file differs after a barrier"
    );
    // Out of range is refused before anything is sent.
    assert!(dev.read_at(&mut [0u8; 2], SIZE - 1).is_err());
}

#[test]
fn qemu_nbd_unix_socket_round_trip() {
    concurrent_round_trip(Server::QemuNbd, false);
}

#[test]
fn nbdkit_tcp_round_trip() {
    concurrent_round_trip(Server::Nbdkit, true);
}

#[test]
fn qemu_nbd_tcp_and_nbdkit_unix_round_trip() {
    concurrent_round_trip(Server::QemuNbd, true);
    concurrent_round_trip(Server::Nbdkit, false);
}

#[test]
fn unaligned_requests_on_a_server_with_a_4k_minimum() {
    need(Server::Nbdkit);
    let dir = scratch("align");
    let img = image(&dir.0);
    // nbdkit's blocksize-policy filter advertises a 4 KiB minimum and a
    // 64 KiB maximum block size and fails any request outside them.
    let s = NbdServer::start_with(
        Server::Nbdkit,
        &img,
        "raw",
        Some(&dir.0),
        &[
            "--filter=blocksize-policy",
            "blocksize-minimum=4096",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ],
    );
    let dev = open(&s, true);
    assert_eq!(dev.block_sizes(), (4096, 65536));
    // Longer than the maximum: split.
    let long: Vec<u8> = (0..300_000u32).map(|i| (i % 7) as u8).collect();
    dev.write_at(&long, 1 << 20).unwrap();
    let mut back = vec![0u8; long.len()];
    dev.read_at(&mut back, 1 << 20).unwrap();
    assert!(back == long);
    dev.write_at(&[0xaa; 4096 * 3], 0).unwrap();
    dev.write_at(b"hello", 4093).unwrap();
    let mut b = [0u8; 12];
    dev.read_at(&mut b, 4090).unwrap();
    assert_eq!(&b, b"\xaa\xaa\xaahello\xaa\xaa\xaa\xaa");
    dev.barrier().unwrap();
    let f = std::fs::read(&img).unwrap();
    assert_eq!(&f[4090..4102], &b);
    assert!(f[..4093].iter().all(|&x| x == 0xaa));
}

#[test]
fn refusals_are_clear() {
    need(Server::QemuNbd);
    let dir = scratch("refuse");
    let img = image(&dir.0);
    let s = NbdServer::start_with(Server::QemuNbd, &img, "raw", Some(&dir.0), &["-r"]);
    let e = NbdDevice::open(&NbdUri::parse(&s.uri).unwrap(), true)
        .err()
        .unwrap();
    assert!(e.to_string().contains("read-only"), "{e}");
    let ro = open(&s, false);
    assert!(ro.write_at(b"x", 0).is_err());
    let other = s.uri.replace("/h2?", "/nope?");
    let e = NbdDevice::open(&NbdUri::parse(&other).unwrap(), false)
        .err()
        .unwrap();
    assert!(e.to_string().contains("nope"), "{e}");
    let e = NbdDevice::open(
        &NbdUri::parse(&format!(
            "nbd+unix:///h2?socket={}/none.sock",
            dir.0.display()
        ))
        .unwrap(),
        false,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("cannot connect"), "{e}");
}

#[test]
fn a_server_that_goes_away_fails_every_request() {
    need(Server::QemuNbd);
    let dir = scratch("gone");
    let img = image(&dir.0);
    let mut s = NbdServer::start(Server::QemuNbd, &img, "raw", Some(&dir.0));
    let dev = Arc::new(open(&s, true));
    dev.write_at(&[1u8; 65536], 0).unwrap();
    dev.barrier().unwrap();
    // Writers in flight while the server is killed.
    let stop = Instant::now() + Duration::from_secs(20);
    let writers: Vec<_> = (0..3u64)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || loop {
                if let Err(e) = dev.write_at(&[2u8; 1 << 20], (t + 1) << 24) {
                    return e.to_string();
                }
                assert!(
                    Instant::now() < stop,
                    "writes went on after the server died"
                );
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    s.kill();
    for w in writers {
        let e = w.join().unwrap();
        assert!(e.contains("went away"), "{e}");
    }
    let t = Instant::now();
    let e = dev.read_at(&mut [0u8; 4096], 0).unwrap_err();
    assert!(e.to_string().contains("went away"), "{e}");
    assert!(dev.barrier().is_err());
    assert!(t.elapsed() < Duration::from_secs(1));
    // What was written before the barrier is in the file.
    assert!(std::fs::read(&img).unwrap()[..65536]
        .iter()
        .all(|&b| b == 1));
}

/// FUA writes go out with the FUA flag where the server offers it (as
/// nbdkit's log filter records), and TRIM is sent where offered:
/// nbdkit's file plugin punches the range out, so it reads back as
/// zeros.
#[test]
fn fua_writes_and_trim() {
    need(Server::Nbdkit);
    let dir = scratch("fua");
    let img = image(&dir.0);
    let log = dir.0.join("requests.log");
    let s = NbdServer::start_with(
        Server::Nbdkit,
        &img,
        "raw",
        Some(&dir.0),
        &["--filter=log", &format!("logfile={}", log.display())],
    );
    let dev = open(&s, true);
    assert!(dev.has_fua() && dev.has_trim());
    dev.write_at(&[8u8; 4096], 0).unwrap();
    dev.write_at_fua(&[9u8; 1 << 20], 4 << 20).unwrap();
    let f = std::fs::read(&img).unwrap();
    assert!(f[4 << 20..5 << 20].iter().all(|&b| b == 9));
    let requests = std::fs::read_to_string(&log).unwrap();
    let writes: Vec<&str> = requests.lines().filter(|l| l.contains("Write")).collect();
    assert!(
        writes
            .iter()
            .any(|l| l.contains("offset=0x400000") && l.contains("fua=1")),
        "{requests}"
    );
    assert!(
        writes
            .iter()
            .any(|l| l.contains("offset=0x0 ") && l.contains("fua=0")),
        "{requests}"
    );
    dev.trim(4 << 20, 1 << 20).unwrap();
    let mut b = vec![1u8; 1 << 20];
    dev.read_at(&mut b, 4 << 20).unwrap();
    assert!(
        b.iter().all(|&x| x == 0),
        "trimmed range reads back as data"
    );
    assert!(dev.trim(SIZE - 10, 20).is_err());
}
