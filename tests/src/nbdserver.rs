//! NBD servers for tests: `qemu-nbd` (qemu-utils) and `nbdkit` serving
//! an image file on a unix socket or on loopback TCP, killed when
//! dropped. Shared by the bufcache, mkfs and mount tests (included by
//! path where the `tests` crate is not a dependency).

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Which server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    QemuNbd,
    Nbdkit,
}

/// Where it listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(u16),
}

/// A running server; killed (SIGKILL) and reaped on drop.
pub struct NbdServer {
    child: Option<Child>,
    pub uri: String,
    pub listen: Listen,
}

static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The export name every server here uses.
pub const EXPORT: &str = "h2";

fn which(bin: &str) -> bool {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"]
        .iter()
        .any(|d| Path::new(d).join(bin).exists())
}

/// Is `server` installed? (scripts/test installs both.)
pub fn available(server: Server) -> bool {
    which(match server {
        Server::QemuNbd => "qemu-nbd",
        Server::Nbdkit => "nbdkit",
    })
}

/// A TCP port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on loopback")
}

impl NbdServer {
    /// Serve `image` (format `format`: "raw" or "qcow2"; nbdkit serves
    /// raw only) read-write, to any number of clients, until dropped.
    /// `unix_dir`: a directory for the socket; `None`: loopback TCP.
    pub fn start(server: Server, image: &Path, format: &str, unix_dir: Option<&Path>) -> NbdServer {
        Self::start_with(server, image, format, unix_dir, &[])
    }

    /// As `start`, with extra arguments (`-r` for read-only, a filter).
    pub fn start_with(
        server: Server,
        image: &Path,
        format: &str,
        unix_dir: Option<&Path>,
        extra: &[&str],
    ) -> NbdServer {
        // A port can be taken between free_port and the server's bind:
        // try again with another.
        for _ in 0..5 {
            let listen = match unix_dir {
                Some(d) => Listen::Unix(d.join(format!(
                    "nbd-{}-{}.sock",
                    std::process::id(),
                    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                ))),
                None => Listen::Tcp(free_port()),
            };
            if let Listen::Unix(p) = &listen {
                let _ = std::fs::remove_file(p);
            }
            let mut cmd = match server {
                Server::QemuNbd => {
                    let mut c = Command::new("qemu-nbd");
                    c.args([
                        "-t",
                        "-e",
                        "8",
                        "-x",
                        EXPORT,
                        "-f",
                        format,
                        "--cache=writeback",
                    ]);
                    match &listen {
                        Listen::Unix(p) => c.arg("-k").arg(p),
                        Listen::Tcp(port) => c.args(["-b", "127.0.0.1", "-p", &port.to_string()]),
                    };
                    c.args(extra).arg(image);
                    c
                }
                Server::Nbdkit => {
                    assert_eq!(format, "raw", "nbdkit serves raw images here");
                    let mut c = Command::new("nbdkit");
                    c.args(["-f", "-e", EXPORT]);
                    match &listen {
                        Listen::Unix(p) => c.arg("-U").arg(p),
                        Listen::Tcp(port) => c.args(["-i", "127.0.0.1", "-p", &port.to_string()]),
                    };
                    // Flags (a filter) before the plugin, parameters after.
                    c.args(extra.iter().filter(|a| a.starts_with('-')));
                    c.arg("file").arg(format!("file={}", image.display()));
                    c.args(extra.iter().filter(|a| !a.starts_with('-')));
                    c
                }
            };
            let mut child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {server:?}: {e}"));
            let uri = match &listen {
                Listen::Unix(p) => format!("nbd+unix:///{EXPORT}?socket={}", p.display()),
                Listen::Tcp(port) => format!("nbd://127.0.0.1:{port}/{EXPORT}"),
            };
            let start = Instant::now();
            loop {
                let up = match &listen {
                    Listen::Unix(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
                    Listen::Tcp(port) => std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok(),
                };
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if up {
                    return NbdServer {
                        child: Some(child),
                        uri,
                        listen,
                    };
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "{server:?} did not start listening"
                );
                thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("{server:?} would not start");
    }

    /// Kill the server at once (SIGKILL): the connection drops mid-request.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.kill();
        if let Listen::Unix(p) = &self.listen {
            let _ = std::fs::remove_file(p);
        }
        // The tools' lock file of this export (in /run/hammer2/nbd): its
        // socket or port is never used again.
        if let Ok(lock) = bufcache::nbd::NbdUri::parse(&self.uri)
            .and_then(|u| bufcache::source::nbd_lock_path(&u).map_err(|e| e.to_string()))
        {
            let _ = std::fs::remove_file(lock);
        }
    }
}
