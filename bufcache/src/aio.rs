//! Linux native AIO (`io_submit`) for a file opened with O_DIRECT: a
//! batch of gathered writes handed to the kernel in one call and reaped
//! together, so the device's queue holds them all at once without a
//! thread per write (`FileDevice::write_many`).
//!
//! Why not threads: four writer threads per batch gave 4 KiB random
//! writes with an fsync every 32 20% more, but an fsync beside a large
//! writer then waited for them to be scheduled on busy CPUs (p99 3 to
//! 20 ms). Here the caller submits and sleeps until the kernel is done.
//!
//! The one contract that makes this sound: every buffer an iocb points
//! at (the iovec arrays and the bytes they name) stays alive and
//! unmoved until the kernel has reported that iocb done. `write_batch`
//! never returns while an iocb it submitted may be in flight: it reaps
//! every one, and if reaping fails it destroys the context, which waits
//! for whatever could not be cancelled (io_destroy(2)), and does not
//! reuse it.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// `IOCB_CMD_PWRITEV` (linux/aio_abi.h).
const IOCB_CMD_PWRITEV: u16 = 8;

/// Events a context holds, and so the most iocbs one submission has in
/// flight.
const CONTEXT_EVENTS: usize = 256;

/// `struct iocb` (linux/aio_abi.h) on a little-endian machine, where
/// `aio_key` comes before `aio_rw_flags`.
#[repr(C)]
#[derive(Default)]
struct Iocb {
    aio_data: u64,
    aio_key: u32,
    aio_rw_flags: i32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

const _: () = assert!(std::mem::size_of::<Iocb>() == 64);

/// `struct io_event`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

/// AIO contexts of one file, made on first use (a process that forks
/// after opening the file, before writing, makes its own) and kept for
/// the next batch.
#[derive(Default)]
pub(crate) struct Contexts {
    free: Mutex<Vec<u64>>,
    /// Set when the kernel refused a context (AIO disabled or its
    /// system-wide limit reached): the file writes in turn from then on.
    refused: AtomicBool,
    /// Writes the kernel reported done through these contexts.
    done: AtomicU64,
}

impl Contexts {
    fn take(&self) -> Option<u64> {
        if let Some(ctx) = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Some(ctx);
        }
        if self.refused.load(Ordering::Relaxed) {
            return None;
        }
        let mut ctx: u64 = 0;
        // SAFETY: io_setup writes the new context's id into `ctx`, a
        // live u64 of this frame.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_setup,
                CONTEXT_EVENTS as libc::c_long,
                &mut ctx as *mut u64,
            )
        };
        if r < 0 {
            log::info!(
                "direct writes one at a time: the kernel refused an AIO context ({})",
                io::Error::last_os_error()
            );
            self.refused.store(true, Ordering::Relaxed);
            return None;
        }
        Some(ctx)
    }

    /// Writes reported done through AIO so far.
    #[cfg(test)]
    pub(crate) fn writes_done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    fn give_back(&self, ctx: u64) {
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ctx);
    }

    /// Write each of `writes` (offset, pieces; every piece aligned for
    /// the direct file `fd`) at once. One result per write: the bytes
    /// the kernel wrote, or its error. `None` when no context could be
    /// had (nothing was written): the caller writes in turn.
    pub(crate) fn write_batch(
        &self,
        fd: RawFd,
        writes: &[(u64, Vec<&[u8]>)],
    ) -> Option<Vec<io::Result<usize>>> {
        if !cfg!(target_endian = "little") {
            return None;
        }
        let ctx = self.take()?;
        let mut out = Vec::with_capacity(writes.len());
        let mut broken: Option<String> = None;
        for chunk in writes.chunks(CONTEXT_EVENTS) {
            if let Some(why) = &broken {
                out.extend(
                    chunk
                        .iter()
                        .map(|_| Err(io::Error::other(format!("not written: {why}")))),
                );
                continue;
            }
            match submit_and_reap(ctx, fd, chunk) {
                Ok(r) => {
                    let ok = r.iter().filter(|r| r.is_ok()).count() as u64;
                    self.done.fetch_add(ok, Ordering::Relaxed);
                    out.extend(r)
                }
                Err(e) => {
                    // Every iocb of the chunk is done (the context was
                    // destroyed, which waits for them), but which were
                    // written is not known: all fail, and the context
                    // is gone.
                    out.extend(
                        chunk
                            .iter()
                            .map(|_| Err(io::Error::new(e.kind(), e.to_string()))),
                    );
                    broken = Some(format!("the AIO context failed: {e}"));
                }
            }
        }
        if broken.is_none() {
            self.give_back(ctx);
        }
        Some(out)
    }
}

impl Drop for Contexts {
    fn drop(&mut self) {
        let done = self.done.load(Ordering::Relaxed);
        if done > 0 {
            log::debug!("{done} direct writes went through AIO");
        }
        for ctx in self
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            // SAFETY: a context in `free` has nothing in flight (every
            // batch reaps all it submitted before giving it back).
            unsafe {
                libc::syscall(libc::SYS_io_destroy, ctx);
            }
        }
    }
}

/// Submit `writes` (at most `CONTEXT_EVENTS`) on `ctx` and wait for all
/// of them. `Err` only when the context failed; it has then been
/// destroyed, after every iocb submitted on it finished.
fn submit_and_reap(
    ctx: u64,
    fd: RawFd,
    writes: &[(u64, Vec<&[u8]>)],
) -> io::Result<Vec<io::Result<usize>>> {
    // Built whole before anything is submitted, and not touched until
    // every iocb is reaped: the kernel reads them while it works.
    let iovecs: Vec<Vec<libc::iovec>> = writes
        .iter()
        .map(|(_, pieces)| {
            pieces
                .iter()
                .map(|p| libc::iovec {
                    iov_base: p.as_ptr() as *mut libc::c_void,
                    iov_len: p.len(),
                })
                .collect()
        })
        .collect();
    let mut iocbs: Vec<Iocb> = writes
        .iter()
        .zip(&iovecs)
        .enumerate()
        .map(|(i, ((offset, _), iov))| Iocb {
            aio_data: i as u64,
            aio_lio_opcode: IOCB_CMD_PWRITEV,
            aio_fildes: fd as u32,
            aio_buf: iov.as_ptr() as u64,
            aio_nbytes: iov.len() as u64,
            aio_offset: *offset as i64,
            ..Iocb::default()
        })
        .collect();
    let mut ptrs: Vec<*mut Iocb> = iocbs.iter_mut().map(|c| c as *mut Iocb).collect();
    let mut results: Vec<Option<io::Result<usize>>> = writes.iter().map(|_| None).collect();
    let mut submitted = 0usize;
    let mut failed: Option<io::Error> = None;
    while submitted < ptrs.len() {
        // SAFETY: `ptrs[submitted..]` point at iocbs of `iocbs`, whose
        // iovecs (`iovecs`) and bytes (`writes`) outlive this function,
        // which reaps every iocb the kernel took before returning.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_submit,
                ctx,
                (ptrs.len() - submitted) as libc::c_long,
                ptrs[submitted..].as_mut_ptr(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // The first not taken failed: say so for it and the rest.
            failed = Some(e);
            break;
        }
        if r == 0 {
            failed = Some(io::Error::other("io_submit took none"));
            break;
        }
        submitted += r as usize;
    }
    if let Some(e) = failed {
        for r in results.iter_mut().skip(submitted) {
            *r = Some(Err(io::Error::new(e.kind(), e.to_string())));
        }
    }
    let mut events = vec![IoEvent::default(); submitted.max(1)];
    let mut reaped = 0usize;
    while reaped < submitted {
        // SAFETY: `events` has room for `submitted - reaped` events; a
        // null timeout waits until at least one is done.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_getevents,
                ctx,
                1 as libc::c_long,
                (submitted - reaped) as libc::c_long,
                events.as_mut_ptr(),
                std::ptr::null_mut::<libc::timespec>(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // Cannot tell what is still in flight: destroying the
            // context waits for it (io_destroy(2)); then nothing points
            // at our buffers any more.
            // SAFETY: the context is ours and not used after this.
            unsafe {
                libc::syscall(libc::SYS_io_destroy, ctx);
            }
            return Err(e);
        }
        for ev in &events[..r as usize] {
            let i = ev.data as usize;
            if let Some(slot) = results.get_mut(i) {
                *slot = Some(if ev.res < 0 {
                    Err(io::Error::from_raw_os_error((-ev.res) as i32))
                } else {
                    Ok(ev.res as usize)
                });
            }
        }
        reaped += r as usize;
    }
    // Keep the iocbs and iovecs alive to here, past the last reap.
    drop(ptrs);
    drop(iocbs);
    drop(iovecs);
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(io::Error::other("an AIO write went unreported"))))
        .collect())
}
