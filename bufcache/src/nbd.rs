//! A network block device client: an NBD export (qemu-nbd, nbdkit,
//! nbd-server, Ceph's rbd-nbd...) as a `BlockDevice`, named by an NBD URI
//! (the NBD project's URI standard):
//!
//! - `nbd://HOST[:PORT]/EXPORT` over TCP (port 10809 by default; an IPv6
//!   host in brackets);
//! - `nbd+unix:///EXPORT?socket=PATH` over a unix socket.
//!
//! The export name is the path after the first `/`, percent-decoded
//! (empty: the server's default export). TLS (`nbds://`) is refused.
//!
//! The handshake is the fixed newstyle one with `NBD_OPT_GO` (asking for
//! the block size constraints; `NBD_OPT_EXPORT_NAME` when the server has
//! no GO), then simple replies only. Requests carry a handle and any
//! number are in flight at once: every caller (the mount's request
//! threads, the flush's data writer) sends its request under a short
//! lock on the socket and waits for its own reply, which one reader
//! thread reads and hands over by handle; a request longer than the
//! server's maximum is split into chunks sent back to back. A barrier is
//! `NBD_CMD_FLUSH` (which covers every write the server has answered),
//! `write_at_fua` uses `NBD_CMD_FLAG_FUA` when the server offers it, and
//! `trim` sends `NBD_CMD_TRIM` when it offers that. Reads and writes
//! not aligned to the server's minimum block size are widened (a write,
//! by a read-modify-write of its edge blocks under a lock of their own).
//!
//! When the server goes away (the connection closes or fails), every
//! request in flight and every later one fails with an error naming the
//! export and what happened; nothing is retried, so a write the server
//! did not answer is never assumed done: the buffer cache and the mount
//! above poison themselves on the first failed write or barrier, as on
//! a failing disk. Remount once the server is back.

use crate::device::BlockDevice;
use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// How long connecting and the handshake may take (a server that allows
/// one client, as qemu-nbd by default, leaves a second one waiting).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests longer than this are split, whatever the server allows.
const MAX_CHUNK: u32 = 32 << 20;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 1 << 31 | 1;
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
const TF_HAS_FLAGS: u16 = 1;
const TF_READ_ONLY: u16 = 2;
const TF_SEND_FLUSH: u16 = 4;
const TF_SEND_FUA: u16 = 8;
const TF_SEND_TRIM: u16 = 32;
const TF_CAN_MULTI_CONN: u16 = 256;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_FLAG_FUA: u16 = 1;

/// Where an export is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp { host: String, port: u16 },
    Unix { socket: PathBuf },
}

/// A parsed NBD URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub transport: Transport,
    /// The export name, decoded.
    pub export: String,
    /// The URI as given.
    pub text: String,
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Does `s` look like an NBD URI (any scheme of the standard, so that
/// the ones not supported get a clear refusal rather than "no such
/// file")?
pub fn is_uri(s: &str) -> bool {
    [
        "nbd://",
        "nbd+unix://",
        "nbds://",
        "nbds+unix://",
        "nbd+vsock://",
        "nbds+vsock://",
    ]
    .iter()
    .any(|p| s.starts_with(p))
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape at byte {i} of {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

impl NbdUri {
    /// Parse `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`.
    pub fn parse(s: &str) -> Result<NbdUri, String> {
        let bad = |why: &str| format!("{s}: {why}");
        let (scheme, rest) = match s.split_once("://") {
            Some(x) => x,
            None => return Err(bad("not an NBD URI")),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path).map_err(|e| bad(&e))?;
        let mut socket = None;
        for kv in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|k| !k.is_empty())
        {
            match kv.split_once('=') {
                Some(("socket", v)) => socket = Some(percent_decode(v).map_err(|e| bad(&e))?),
                Some((k, _)) if k.starts_with("tls") => {
                    return Err(bad(
                        "TLS is not supported (no nbds:// and no tls-* parameters)",
                    ))
                }
                _ => return Err(bad(&format!("unknown query parameter {kv:?}"))),
            }
        }
        let transport = match scheme {
            "nbd" => {
                if socket.is_some() {
                    return Err(bad("socket= belongs to nbd+unix:// URIs"));
                }
                let (host, port) = split_host_port(authority).map_err(|e| bad(&e))?;
                if host.is_empty() {
                    return Err(bad("no host (nbd://HOST[:PORT]/EXPORT)"));
                }
                Transport::Tcp { host, port }
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad(
                        "a unix socket URI has no host (nbd+unix:///EXPORT?socket=PATH)",
                    ));
                }
                match socket {
                    Some(p) if !p.is_empty() => Transport::Unix {
                        socket: PathBuf::from(p),
                    },
                    _ => return Err(bad("no socket (nbd+unix:///EXPORT?socket=PATH)")),
                }
            }
            "nbds" | "nbds+unix" | "nbds+vsock" => {
                return Err(bad(
                    "TLS (nbds) is not supported; use a plain nbd:// or nbd+unix:// URI",
                ))
            }
            "nbd+vsock" => return Err(bad("vsock is not supported; use nbd:// or nbd+unix://")),
            _ => return Err(bad("not an NBD URI (nbd:// or nbd+unix://)")),
        };
        Ok(NbdUri {
            transport,
            export,
            text: s.to_string(),
        })
    }

    /// A short stable key for the export (for lock files): transport and
    /// export, without the URI's spelling.
    pub fn key(&self) -> String {
        match &self.transport {
            Transport::Tcp { host, port } => format!("tcp:{host}:{port}:{}", self.export),
            Transport::Unix { socket } => {
                let s = socket.canonicalize().unwrap_or_else(|_| socket.clone());
                format!("unix:{}:{}", s.display(), self.export)
            }
        }
    }
}

fn split_host_port(a: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (h, r) = rest
            .split_once(']')
            .ok_or_else(|| format!("unclosed [ in {a:?}"))?;
        (h, r.strip_prefix(':'))
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        }
    };
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p.parse().map_err(|_| format!("bad port {p:?}"))?,
    };
    Ok((host.to_string(), port))
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
            Stream::Unix(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
        }
    }
    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a reply brings its waiter.
type Reply = Result<Vec<u8>, io::Error>;

struct Waiter {
    /// Bytes of data that follow a successful reply (reads).
    len: usize,
    tx: SyncSender<Reply>,
}

struct Pending {
    next: u64,
    waiters: HashMap<u64, Waiter>,
    /// Why the connection is gone, once it is.
    dead: Option<String>,
}

struct Shared {
    name: String,
    out: Mutex<Stream>,
    pending: Mutex<Pending>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn gone(&self, why: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::BrokenPipe,
            format!("{}: the NBD server went away ({why})", self.name),
        )
    }

    /// The connection is gone: fail every waiter, and every later request.
    fn kill(&self, why: String) {
        let waiters = {
            let mut p = lock(&self.pending);
            if p.dead.is_none() {
                log::error!("{}: the NBD server went away ({why})", self.name);
                p.dead = Some(why.clone());
            }
            std::mem::take(&mut p.waiters)
        };
        for (_, w) in waiters {
            let _ = w.tx.send(Err(self.gone(&why)));
        }
        lock(&self.out).shutdown();
    }

    /// Send one request; its reply arrives on the receiver.
    fn send(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<Receiver<Reply>> {
        let (tx, rx) = sync_channel(1);
        let handle = {
            let mut p = lock(&self.pending);
            if let Some(why) = &p.dead {
                return Err(self.gone(why));
            }
            let h = p.next;
            p.next = p.next.wrapping_add(1);
            let want = if cmd == CMD_READ { len as usize } else { 0 };
            p.waiters.insert(h, Waiter { len: want, tx });
            h
        };
        let mut hdr = Vec::with_capacity(28 + if data.len() <= 65536 { data.len() } else { 0 });
        hdr.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        hdr.extend_from_slice(&flags.to_be_bytes());
        hdr.extend_from_slice(&cmd.to_be_bytes());
        hdr.extend_from_slice(&handle.to_be_bytes());
        hdr.extend_from_slice(&offset.to_be_bytes());
        hdr.extend_from_slice(&len.to_be_bytes());
        let small = data.len() <= 65536;
        if small {
            hdr.extend_from_slice(data);
        }
        let sent = {
            let mut out = lock(&self.out);
            out.write_all(&hdr)
                .and_then(|_| if small { Ok(()) } else { out.write_all(data) })
        };
        if let Err(e) = sent {
            self.kill(format!("sending a request failed: {e}"));
            lock(&self.pending).waiters.remove(&handle);
            return Err(self.gone(&e.to_string()));
        }
        Ok(rx)
    }

    fn wait(&self, rx: Receiver<Reply>) -> io::Result<Vec<u8>> {
        rx.recv()
            .unwrap_or_else(|_| Err(self.gone("the reply reader stopped")))
    }
}

/// The reply reader: one thread per connection.
fn read_replies(shared: Arc<Shared>, stream: Stream) {
    let mut r = BufReader::with_capacity(256 << 10, stream);
    loop {
        let mut h = [0u8; 16];
        if let Err(e) = r.read_exact(&mut h) {
            let why = match e.kind() {
                io::ErrorKind::UnexpectedEof => "the connection was closed".to_string(),
                _ => format!("reading a reply failed: {e}"),
            };
            shared.kill(why);
            return;
        }
        let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let error = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let handle = u64::from_be_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        if magic != SIMPLE_REPLY_MAGIC {
            shared.kill(format!(
                "a reply with magic {magic:#010x}: the stream is out of step"
            ));
            return;
        }
        let Some(w) = lock(&shared.pending).waiters.remove(&handle) else {
            shared.kill(format!("a reply to a request never sent (handle {handle})"));
            return;
        };
        let reply = if error != 0 {
            Err(nbd_error(&shared.name, error))
        } else {
            let mut data = vec![0u8; w.len];
            if let Err(e) = r.read_exact(&mut data) {
                let why = format!("reading a reply's data failed: {e}");
                let _ = w.tx.send(Err(shared.gone(&why)));
                shared.kill(why);
                return;
            }
            Ok(data)
        };
        let _ = w.tx.send(reply);
    }
}

/// An NBD error number as an `io::Error` (the protocol's numbers are
/// Linux's errnos for the ones it defines).
fn nbd_error(name: &str, e: u32) -> io::Error {
    let errno = match e {
        1 | 5 | 12 | 22 | 28 | 75 | 95 | 108 => e as i32,
        _ => libc::EIO,
    };
    let os = io::Error::from_raw_os_error(errno);
    io::Error::new(os.kind(), format!("{name}: the NBD server answered: {os}"))
}

/// An NBD export, connected.
pub struct NbdDevice {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    size: u64,
    flags: u16,
    min_block: u32,
    max_chunk: u32,
    writable: bool,
    /// Serializes read-modify-writes of unaligned writes.
    rmw: Mutex<()>,
}

/// What the handshake learnt.
struct Export {
    size: u64,
    flags: u16,
    min_block: u32,
    max_block: u32,
}

fn hs_err(name: &str, why: impl fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{name}: NBD handshake: {why}"),
    )
}

fn read_u16(s: &mut Stream) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(s: &mut Stream) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(s: &mut Stream) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn send_option(s: &mut Stream, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b)
}

/// The longest option reply read (an error message, an info block).
const MAX_OPTION_REPLY: u32 = 64 << 10;

fn handshake(s: &mut Stream, name: &str, export: &str) -> io::Result<Export> {
    let timeout = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => hs_err(
            name,
            format!(
                "no answer within {} s (a server that takes one client at a time, as \
                 qemu-nbd without --shared, may be serving another)",
                HANDSHAKE_TIMEOUT.as_secs()
            ),
        ),
        io::ErrorKind::UnexpectedEof => hs_err(name, "the server closed the connection"),
        _ => hs_err(name, e),
    };
    let magic = read_u64(s).map_err(timeout)?;
    if magic != NBDMAGIC {
        return Err(hs_err(name, "not an NBD server (no NBDMAGIC)"));
    }
    let opt = read_u64(s).map_err(timeout)?;
    if opt != IHAVEOPT {
        return Err(hs_err(
            name,
            "the server speaks only the oldstyle protocol, which has no export names",
        ));
    }
    let hflags = read_u16(s).map_err(timeout)?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(hs_err(name, "the server does not speak fixed newstyle"));
    }
    let cflags = (FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)) as u32;
    s.write_all(&cflags.to_be_bytes()).map_err(timeout)?;
    // NBD_OPT_GO: the name, and one info request (block sizes).
    let mut go = Vec::new();
    go.extend_from_slice(&(export.len() as u32).to_be_bytes());
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &go).map_err(timeout)?;
    let mut got: Option<(u64, u16)> = None;
    let (mut min_block, mut max_block) = (1u32, MAX_CHUNK);
    loop {
        let magic = read_u64(s).map_err(timeout)?;
        let _opt = read_u32(s).map_err(timeout)?;
        let rtype = read_u32(s).map_err(timeout)?;
        let len = read_u32(s).map_err(timeout)?;
        if magic != REPLY_MAGIC || len > MAX_OPTION_REPLY {
            return Err(hs_err(name, "a malformed option reply"));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).map_err(timeout)?;
        match rtype {
            REP_ACK => break,
            REP_INFO if data.len() >= 2 => {
                let kind = u16::from_be_bytes([data[0], data[1]]);
                if kind == INFO_EXPORT && data.len() >= 12 {
                    let size = u64::from_be_bytes(data[2..10].try_into().unwrap_or([0; 8]));
                    let flags = u16::from_be_bytes([data[10], data[11]]);
                    got = Some((size, flags));
                } else if kind == INFO_BLOCK_SIZE && data.len() >= 14 {
                    let v =
                        |i: usize| u32::from_be_bytes(data[i..i + 4].try_into().unwrap_or([0; 4]));
                    min_block = v(2).max(1);
                    max_block = v(10).max(min_block);
                }
            }
            REP_ERR_UNSUP => {
                // An old server: NBD_OPT_EXPORT_NAME, which answers with
                // the size and flags or closes the connection.
                send_option(s, OPT_EXPORT_NAME, export.as_bytes()).map_err(timeout)?;
                let size = read_u64(s).map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => {
                        hs_err(name, format!("the server has no export {export:?}"))
                    }
                    _ => timeout(e),
                })?;
                let flags = read_u16(s).map_err(timeout)?;
                if hflags & FLAG_NO_ZEROES == 0 {
                    let mut z = [0u8; 124];
                    s.read_exact(&mut z).map_err(timeout)?;
                }
                got = Some((size, flags));
                break;
            }
            t if t & (1 << 31) != 0 => {
                let msg = String::from_utf8_lossy(&data).into_owned();
                let what = match t & 0x7fff_ffff {
                    2 => "refused by its policy",
                    3 => "an invalid request",
                    5 => "TLS is required, which this client does not speak",
                    6 => "no such export",
                    7 => "the server is shutting down",
                    _ => "refused",
                };
                let _ = send_option(s, OPT_ABORT, &[]);
                let msg = if msg.is_empty() {
                    String::new()
                } else {
                    format!(": {msg}")
                };
                return Err(hs_err(name, format!("export {export:?}: {what}{msg}")));
            }
            _ => {}
        }
    }
    let (size, flags) =
        got.ok_or_else(|| hs_err(name, "the server did not give the export's size"))?;
    if !min_block.is_power_of_two() || min_block > 65536 {
        return Err(hs_err(name, format!("a minimum block size of {min_block}")));
    }
    Ok(Export {
        size,
        flags: if flags & TF_HAS_FLAGS != 0 { flags } else { 0 },
        min_block,
        max_block,
    })
}

impl NbdDevice {
    /// Connect to the export `uri` names, read-only or read-write (a
    /// read-only export refuses the latter).
    pub fn open(uri: &NbdUri, writable: bool) -> io::Result<NbdDevice> {
        let name = uri.text.clone();
        let ctx = |e: io::Error| io::Error::new(e.kind(), format!("{name}: cannot connect: {e}"));
        let mut stream = match &uri.transport {
            Transport::Unix { socket } => Stream::Unix(UnixStream::connect(socket).map_err(ctx)?),
            Transport::Tcp { host, port } => {
                let addrs: Vec<_> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(ctx)?
                    .collect();
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                let mut conn = None;
                for a in addrs {
                    match TcpStream::connect_timeout(&a, HANDSHAKE_TIMEOUT) {
                        Ok(s) => {
                            conn = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = conn.ok_or_else(|| ctx(last))?;
                s.set_nodelay(true).map_err(ctx)?;
                Stream::Tcp(s)
            }
        };
        stream.set_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(ctx)?;
        let ex = handshake(&mut stream, &name, &uri.export)?;
        stream.set_timeout(None).map_err(ctx)?;
        if writable && ex.flags & TF_READ_ONLY != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{name}: the server exports it read-only"),
            ));
        }
        let shared = Arc::new(Shared {
            name: name.clone(),
            out: Mutex::new(stream.try_clone().map_err(ctx)?),
            pending: Mutex::new(Pending {
                next: 1,
                waiters: HashMap::new(),
                dead: None,
            }),
        });
        let s2 = shared.clone();
        let reader = std::thread::Builder::new()
            .name("nbd-replies".into())
            .spawn(move || read_replies(s2, stream))
            .map_err(ctx)?;
        let max_chunk = ex.max_block.min(MAX_CHUNK) / ex.min_block * ex.min_block;
        log::info!(
            "{name}: {} bytes, flags {:#x} (flush {}, fua {}, trim {}, multi-conn {}), \
             block sizes {}..{}",
            ex.size,
            ex.flags,
            ex.flags & TF_SEND_FLUSH != 0,
            ex.flags & TF_SEND_FUA != 0,
            ex.flags & TF_SEND_TRIM != 0,
            ex.flags & TF_CAN_MULTI_CONN != 0,
            ex.min_block,
            ex.max_block
        );
        Ok(NbdDevice {
            shared,
            reader: Some(reader),
            size: ex.size,
            flags: ex.flags,
            min_block: ex.min_block,
            max_chunk: max_chunk.max(ex.min_block),
            writable,
            rmw: Mutex::new(()),
        })
    }

    /// The server offers FUA writes.
    pub fn has_fua(&self) -> bool {
        self.flags & TF_SEND_FUA != 0
    }

    /// The server offers TRIM.
    pub fn has_trim(&self) -> bool {
        self.flags & TF_SEND_TRIM != 0
    }

    /// The server's minimum block size and the longest request sent.
    pub fn block_sizes(&self) -> (u32, u32) {
        (self.min_block, self.max_chunk)
    }

    /// The export is read-only.
    pub fn read_only(&self) -> bool {
        self.flags & TF_READ_ONLY != 0
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(e) if e <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: access of {len} bytes at {offset:#x} is past the export's end {:#x}",
                    self.shared.name, self.size
                ),
            )),
        }
    }

    fn aligned(&self, offset: u64, len: usize) -> bool {
        let m = self.min_block as u64;
        offset.is_multiple_of(m) && (len as u64).is_multiple_of(m)
    }

    /// Read aligned bytes: chunks sent back to back, then collected.
    fn read_aligned(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let chunk = self.max_chunk as usize;
        let mut rxs = Vec::new();
        for (i, c) in buf.chunks(chunk).enumerate() {
            let at = offset + (i * chunk) as u64;
            rxs.push(self.shared.send(CMD_READ, 0, at, c.len() as u32, &[])?);
        }
        let mut first_err = None;
        for (rx, c) in rxs.into_iter().zip(buf.chunks_mut(chunk)) {
            match self.shared.wait(rx) {
                Ok(d) if d.len() == c.len() => c.copy_from_slice(&d),
                Ok(_) => first_err = first_err.or(Some(io::Error::other("short NBD read"))),
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn write_aligned(&self, buf: &[u8], offset: u64, flags: u16) -> io::Result<()> {
        let rxs = self.send_aligned(buf, offset, flags)?;
        self.wait_all(rxs)
    }

    /// Send an aligned write, in requests of at most the server's
    /// maximum, without waiting for the replies.
    fn send_aligned(
        &self,
        buf: &[u8],
        offset: u64,
        flags: u16,
    ) -> io::Result<Vec<Receiver<Reply>>> {
        let chunk = self.max_chunk as usize;
        buf.chunks(chunk)
            .enumerate()
            .map(|(i, c)| {
                let at = offset + (i * chunk) as u64;
                self.shared.send(CMD_WRITE, flags, at, c.len() as u32, c)
            })
            .collect()
    }

    /// Wait for every reply of `rxs`; the first error, if any.
    fn wait_all(&self, rxs: Vec<Receiver<Reply>>) -> io::Result<()> {
        let mut first_err = None;
        for rx in rxs {
            if let Err(e) = self.shared.wait(rx) {
                first_err = first_err.or(Some(e));
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The aligned range covering `offset..offset+len`.
    fn widen(&self, offset: u64, len: usize) -> (u64, usize) {
        let m = self.min_block as u64;
        let start = offset / m * m;
        let end = (offset + len as u64).div_ceil(m) * m;
        (start, (end.min(self.size) - start) as usize)
    }

    fn write_flags(&self, buf: &[u8], offset: u64, flags: u16) -> io::Result<()> {
        self.check(offset, buf.len())?;
        if !self.writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{}: opened read-only", self.shared.name),
            ));
        }
        if self.aligned(offset, buf.len()) {
            return self.write_aligned(buf, offset, flags);
        }
        let _held = lock(&self.rmw);
        let (start, len) = self.widen(offset, buf.len());
        let mut whole = vec![0u8; len];
        self.read_aligned(&mut whole, start)?;
        let at = (offset - start) as usize;
        whole[at..at + buf.len()].copy_from_slice(buf);
        self.write_aligned(&whole, start, flags)
    }

    /// Write `buf` at `offset` and make it durable before returning: a
    /// FUA write when the server offers it, else a write and a flush.
    pub fn write_at_fua(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.has_fua() {
            self.write_flags(buf, offset, CMD_FLAG_FUA)
        } else {
            self.write_flags(buf, offset, 0)?;
            self.barrier()
        }
    }

    /// Tell the server `len` bytes at `offset` are no longer needed
    /// (NBD_CMD_TRIM); `Unsupported` when it does not offer TRIM.
    pub fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.has_trim() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{}: the server does not offer TRIM", self.shared.name),
            ));
        }
        let mut at = offset;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "trim past the end"))?;
        let mut rxs = Vec::new();
        while at < end {
            let n = (end - at).min(1 << 30);
            rxs.push(self.shared.send(CMD_TRIM, 0, at, n as u32, &[])?);
            at += n;
        }
        rxs.into_iter()
            .try_for_each(|rx| self.shared.wait(rx).map(|_| ()))
    }
}

impl BlockDevice for NbdDevice {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        if self.aligned(offset, buf.len()) {
            return self.read_aligned(buf, offset);
        }
        let (start, len) = self.widen(offset, buf.len());
        let mut whole = vec![0u8; len];
        self.read_aligned(&mut whole, start)?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&whole[at..at + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return self.check(offset, 0);
        }
        self.write_flags(buf, offset, 0)
    }

    /// Every aligned write sent before any reply is awaited, so the
    /// server has them all at once (one round trip for the lot instead
    /// of one each); an unaligned one (read, change, write) goes alone.
    fn write_many(&self, writes: &[(u64, Vec<&[u8]>)]) -> Vec<io::Result<()>> {
        let mut sent = Vec::with_capacity(writes.len());
        for (offset, pieces) in writes {
            let len: usize = pieces.iter().map(|p| p.len()).sum();
            let plain = self.writable
                && len > 0
                && self.check(*offset, len).is_ok()
                && self.aligned(*offset, len);
            sent.push(if plain {
                self.send_aligned(&pieces.concat(), *offset, 0)
            } else {
                // Done now: a read, a change and a write.
                self.write_gathered(pieces, *offset).map(|()| Vec::new())
            });
        }
        sent.into_iter()
            .map(|s| s.and_then(|rxs| self.wait_all(rxs)))
            .collect()
    }

    fn barrier(&self) -> io::Result<()> {
        if !self.writable || self.flags & TF_SEND_FLUSH == 0 {
            // A server without FLUSH writes through (nbdkit's and
            // qemu-nbd's say so by offering it when they cache).
            return Ok(());
        }
        let rx = self.shared.send(CMD_FLUSH, 0, 0, 0, &[])?;
        self.shared.wait(rx).map(|_| ())
    }
}

impl Drop for NbdDevice {
    fn drop(&mut self) {
        // Closing, not going away: nothing in flight is waited for and
        // the reader's end of stream is no news.
        let was_dead = {
            let mut p = lock(&self.shared.pending);
            p.dead.replace("disconnected".into()).is_some()
        };
        if !was_dead {
            // Tell the server we are done (NBD_CMD_DISC has no reply).
            let mut req = Vec::with_capacity(28);
            req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            req.extend_from_slice(&0u16.to_be_bytes());
            req.extend_from_slice(&CMD_DISC.to_be_bytes());
            req.extend_from_slice(&[0u8; 20]);
            let _ = lock(&self.shared.out).write_all(&req);
        }
        lock(&self.shared.out).shutdown();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let u = NbdUri::parse("nbd://localhost/disk").unwrap();
        assert_eq!(
            u.transport,
            Transport::Tcp {
                host: "localhost".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(u.export, "disk");
        let u = NbdUri::parse("nbd://127.0.0.1:10900/").unwrap();
        assert_eq!(
            u.transport,
            Transport::Tcp {
                host: "127.0.0.1".into(),
                port: 10900
            }
        );
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd://[::1]:7000/a%20b%3Ac").unwrap();
        assert_eq!(
            u.transport,
            Transport::Tcp {
                host: "::1".into(),
                port: 7000
            }
        );
        assert_eq!(u.export, "a b:c");
        let u = NbdUri::parse("nbd+unix:///exp?socket=/run/x%20y.sock").unwrap();
        assert_eq!(
            u.transport,
            Transport::Unix {
                socket: "/run/x y.sock".into()
            }
        );
        assert_eq!(u.export, "exp");
        let u = NbdUri::parse("nbd+unix://?socket=/s").unwrap();
        assert_eq!(u.export, "");
        for (bad, why) in [
            ("nbds://h/e", "TLS"),
            ("nbd+unix:///e", "no socket"),
            ("nbd+unix://host/e?socket=/s", "no host"),
            ("nbd:///e", "no host"),
            ("nbd://h:x/e", "bad port"),
            ("nbd://h/e?socket=/s", "socket="),
            ("nbd://h/e?tls-certificates=/x", "TLS"),
            ("nbd://h/e?frob=1", "unknown"),
            ("nbd://h/%zz", "percent"),
            ("nbd+vsock://1/e", "vsock"),
        ] {
            let e = NbdUri::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(is_uri("nbd+unix:///x?socket=/s") && is_uri("nbds://h") && !is_uri("/tmp/nbd"));
    }
}
