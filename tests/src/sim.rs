//! A seeded simulation mixing operations, crashes and faults on one
//! filesystem: random operations checked against the path model
//! (`ace::Model`), flushes, crashes inside a flush (the unflushed suffix
//! and a random subset of the writes in flight dropped), and faults
//! through `FaultDevice`: a failed write, barrier or read at a chosen
//! point, bit flips on reads of data, metadata and volume header
//! blocks, and a full disk. Every fault must come back as an error
//! (I/O, check-code mismatch, NoSpace, Poisoned), never a panic or
//! wrong data; a failed write or barrier poisons the mount; and after
//! healing and remounting, the image is fsck-clean and holds a state the
//! model allows. A failure names its seed; the same seed replays it.

use crate::ace::{
    self, fsck_clean, lib_apply, lib_tree, tree_diff, Committed, Groups, Model, Op, LABEL,
};
use bufcache::recording::{Event, FaultDevice, RecordingDevice};
use bufcache::{BlockDevice, MemDevice};
use hammer2::mount::{Mount, ROOT_INUM};
use hammer2::Error;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// What a simulation did.
#[derive(Clone, Debug, Default)]
pub struct SimStats {
    pub ops: u64,
    /// The most file data pages at once (seeds run with a page layer).
    pub data_pages_peak: u64,
    pub flushes: u64,
    /// Launderings that wrote file data ahead of a commit.
    pub launders: u64,
    pub crashes: u64,
    pub write_faults: u64,
    pub barrier_faults: u64,
    pub read_faults: u64,
    pub bit_flips: u64,
    pub enospc: u64,
    /// Errors the faults surfaced (each checked to be the right kind).
    pub errors_seen: u64,
    /// Images checked after a remount (fsck and tree).
    pub remounts: u64,
}

type R<T> = std::result::Result<T, String>;

/// An error a device fault or damaged media may surface as.
fn is_media_or_io(e: &Error) -> bool {
    matches!(e, Error::Io { .. }) || e.is_media_damage()
}

struct Sim {
    rng: SmallRng,
    rec: Arc<RecordingDevice>,
    fault: Arc<FaultDevice>,
    /// The page layer the mount keeps its pending file data on, for half
    /// the seeds (`databuf`); the device under it caches nothing, so
    /// crashes and faults are the same either way.
    pages: Option<Arc<bufcache::Vm>>,
    m: Option<Mount>,
    /// The model of what the library holds in memory.
    model: Model,
    /// The state of the last commit, and of the one before it.
    durable: Model,
    prev: Model,
    /// The dependency groups since the last commit, and the committed
    /// state as partial commits (fsync) build it (`ace::Committed`).
    groups: Groups,
    committed: Committed,
    now: u64,
    stats: SimStats,
    /// Recent actions, for the failure report.
    trail: Vec<String>,
}

const NAMES: [&str; 6] = ["a", "b", "c", "dd", "e", "longer-name-f"];

impl Sim {
    fn m(&mut self) -> &mut Mount {
        self.m.as_mut().expect("mounted")
    }

    fn note(&mut self, what: String) {
        self.trail.push(what);
        if self.trail.len() > 12 {
            self.trail.remove(0);
        }
    }

    /// A fault device over the recorder, offering the run's page layer.
    fn fault_device(&self) -> Arc<FaultDevice> {
        let f = Arc::new(FaultDevice::new(self.rec.clone()));
        f.set_page_layer(self.pages.clone());
        f
    }

    /// The image as the device holds it now.
    fn image(&self) -> MemDevice {
        self.rec.image_at(self.rec.position())
    }

    /// Unmount and open `img` through a fresh recorder and fault device.
    fn remount_on(&mut self, img: MemDevice) -> R<()> {
        self.m = None;
        self.rec = Arc::new(RecordingDevice::from_mem(img));
        self.fault = self.fault_device();
        let d: Arc<dyn BlockDevice> = self.fault.clone();
        self.m = Some(Mount::open(d).map_err(|e| format!("mount: {e}"))?);
        self.all_committed();
        Ok(())
    }

    /// Everything in the model committed (a whole flush, or a new
    /// mount): nothing waits for a commit.
    fn all_committed(&mut self) {
        self.groups = Groups::default();
        self.committed = Committed::full(&self.model);
    }

    /// Remount the device as it is and check it: fsck-clean, and the
    /// tree one of `accept` (which becomes the model).
    fn verify(&mut self, accept: &[Model], why: &str) -> R<()> {
        self.fault.heal();
        let img = self.image();
        self.remount_on(img)?;
        self.stats.remounts += 1;
        let dev: Arc<dyn BlockDevice> = self.rec.clone();
        fsck_clean(dev, None).map_err(|e| format!("after {why}: {e}"))?;
        let t = lib_tree(self.m()).map_err(|e| format!("after {why}: reading: {e}"))?;
        match accept.iter().find(|a| a.tree() == t) {
            Some(a) => {
                let a = a.clone();
                self.model = a.clone();
                self.all_committed();
                if a.tree() != self.durable.tree() {
                    self.prev = std::mem::replace(&mut self.durable, a);
                }
                Ok(())
            }
            None => Err(format!(
                "after {why}: tree is no state allowed: {}",
                accept
                    .iter()
                    .map(|a| tree_diff(&t, &a.tree()))
                    .collect::<Vec<_>>()
                    .join(" / or / ")
            )),
        }
    }

    /// A random operation over the current tree.
    fn random_op(&mut self) -> Op {
        let paths = self.model.paths();
        let rng = &mut self.rng;
        let pick = |rng: &mut SmallRng, want: Option<char>| -> String {
            let c: Vec<&String> = paths
                .iter()
                .filter(|(_, k)| want.is_none_or(|w| w == *k))
                .map(|(p, _)| p)
                .collect();
            if c.is_empty() || rng.gen_bool(0.1) {
                NAMES[rng.gen_range(0..NAMES.len())].to_string()
            } else {
                c[rng.gen_range(0..c.len())].clone()
            }
        };
        let fresh = |rng: &mut SmallRng| -> String {
            let dirs: Vec<&String> = paths
                .iter()
                .filter(|(_, k)| *k == 'd')
                .map(|(p, _)| p)
                .collect();
            let n = NAMES[rng.gen_range(0..NAMES.len())];
            if dirs.is_empty() || rng.gen_bool(0.3) {
                n.to_string()
            } else {
                format!("{}/{n}", dirs[rng.gen_range(0..dirs.len())])
            }
        };
        match rng.gen_range(0..100) {
            0..=11 => Op::Creat(fresh(rng)),
            12..=17 => Op::Mkdir(fresh(rng)),
            18..=44 => {
                let len = [1usize, 700, 4096, 65_536, 100_000][rng.gen_range(0..5)];
                Op::Write {
                    path: pick(rng, Some('f')),
                    off: rng.gen_range(0..300_000),
                    len,
                    seed: rng.gen(),
                }
            }
            45..=52 => Op::Truncate {
                path: pick(rng, Some('f')),
                size: [0u64, 1, 4000, 65_536, 70_000, 400_000][rng.gen_range(0..6)],
            },
            53..=57 => Op::Fallocate {
                path: pick(rng, Some('f')),
                off: rng.gen_range(0..200_000),
                len: rng.gen_range(1..150_000),
                punch: rng.gen_bool(0.5),
            },
            58..=63 => Op::Link(pick(rng, Some('f')), fresh(rng)),
            64..=72 => Op::Unlink(pick(rng, None)),
            73..=77 => Op::Rmdir(pick(rng, Some('d'))),
            78..=88 => Op::Rename(pick(rng, None), fresh(rng)),
            89..=93 => Op::Symlink {
                target: "t".repeat(rng.gen_range(1..300)),
                path: fresh(rng),
            },
            _ => Op::Setattr {
                path: pick(rng, None),
                mode: [0o600, 0o644, 0o755, 0o4711][rng.gen_range(0..4)],
            },
        }
    }

    /// Run one random operation; the library and the model must agree.
    fn op(&mut self) -> R<()> {
        let op = self.random_op();
        self.now += 1000;
        let now = self.now;
        let mut next = self.model.clone();
        let want = next.apply(&op);
        let got = lib_apply(self.m(), &op, now);
        self.stats.ops += 1;
        self.note(format!("{op:?} -> {got:?}"));
        match (want, got) {
            (Ok(()), Ok(())) => {
                self.groups.note(&self.model, &next, &op);
                self.model = next;
                Ok(())
            }
            (Err(_), Err(_)) => Ok(()),
            (Ok(()), Err(e)) => Err(format!("{op:?} failed: {e}")),
            (Err(w), Ok(())) => Err(format!("{op:?} succeeded; expected: {w}")),
        }
    }

    /// The log position of the last volume header write at or after `from`.
    fn header_since(&self, from: usize) -> Option<usize> {
        self.rec
            .events()
            .iter()
            .enumerate()
            .skip(from)
            .filter(|(_, e)| {
                matches!(e, Event::Write { offset, data }
                    if data.len() == hammer2::disk::VOLUME_BYTES
                        && (0..hammer2::disk::NUM_VOLHDRS)
                            .any(|i| hammer2::disk::volhdr_offset(i) == *offset))
            })
            .map(|(i, _)| i)
            .next_back()
    }

    /// A flush of everything, or an fsync of a random path (a partial
    /// commit of its groups and the root's).
    fn flush(&mut self) -> R<()> {
        let all = self.rng.gen_bool(0.5);
        self.commit(all)
    }

    /// A flush of everything: the model is the durable state after it.
    fn flush_all(&mut self) -> R<()> {
        self.commit(true)
    }

    fn commit(&mut self, all: bool) -> R<()> {
        let start = self.rec.position();
        let r = if all {
            self.all_committed();
            self.m().flush().map(|_| ())
        } else {
            let paths = self.model.paths();
            let (inum, id) = if paths.is_empty() {
                (ROOT_INUM, ace::MROOT)
            } else {
                let p = paths[self.rng.gen_range(0..paths.len())].0.clone();
                let inum = ace::resolve(self.m(), &p).map_err(|e| format!("resolve {p}: {e}"))?;
                (inum, self.model.id_of(&p).unwrap_or(ace::MROOT))
            };
            let ids = self.groups.closure(id);
            self.committed.apply(&self.model, &ids);
            self.groups.committed(&ids);
            self.note(format!("fsync of {ids:?}"));
            self.m().fsync(LABEL, inum).map(|_| ())
        };
        r.map_err(|e| format!("flush: {e}"))?;
        self.committed_since(start)
    }

    /// A pipelined flush with the frontend going on, as the daemon runs
    /// it: operations and fsyncs (partial commits, which may commit
    /// blocks the flush's batch has out too) between its begin and its
    /// commit. The flush commits everything as it is at its commit.
    fn pipelined(&mut self) -> R<()> {
        let mut batch = self
            .m()
            .flush_begin()
            .map_err(|e| format!("flush_begin: {e}"))?;
        batch.write();
        self.note("flush begun".into());
        let n = self.rng.gen_range(1..6);
        self.frontend(n)?;
        let start = self.rec.position();
        self.all_committed();
        self.m()
            .flush_commit(batch)
            .map_err(|e| format!("pipelined flush: {e}"))?;
        self.committed_since(start)
    }

    /// Laundering, as the daemon's flusher runs it when much is written
    /// (`Mount::launder_begin`): file data written to new blocks and
    /// recorded in the inodes, with operations and fsyncs between its
    /// begin and its finish. It commits nothing: no header, the durable
    /// state stays, and the library still shows the model.
    fn launder(&mut self) -> R<()> {
        let start = self.rec.position();
        let mut batch = self
            .m()
            .launder_begin()
            .map_err(|e| format!("launder_begin: {e}"))?;
        batch.write();
        self.note(format!("laundering of {} blocks begun", batch.len()));
        if let Some(h) = self.header_since(start) {
            return Err(format!("laundering wrote a volume header (event {h})"));
        }
        let n = self.rng.gen_range(0..4);
        self.frontend(n)?;
        let mid = self.rec.position();
        let stats = self
            .m()
            .launder_finish(batch)
            .map_err(|e| format!("launder_finish: {e}"))?;
        if let Some(h) = self.header_since(mid) {
            return Err(format!("launder_finish wrote a volume header (event {h})"));
        }
        if stats.blocks > 0 {
            self.stats.launders += 1;
        }
        self.note("laundered".into());
        self.shows_the_model("after laundering")
    }

    /// `n` steps of the frontend while a batch is out: operations, and
    /// fsyncs (partial commits, which may commit blocks the batch has
    /// out too).
    fn frontend(&mut self, n: usize) -> R<()> {
        for _ in 0..n {
            if self.rng.gen_bool(0.6) {
                self.op()?;
            } else {
                self.commit(false)?;
            }
        }
        Ok(())
    }

    /// What the library shows equals the model.
    fn shows_the_model(&mut self, when: &str) -> R<()> {
        let t = lib_tree(self.m()).map_err(|e| format!("reading: {e}"))?;
        if t != self.model.tree() {
            return Err(format!(
                "tree in memory {when}: {}",
                tree_diff(&t, &self.model.tree())
            ));
        }
        Ok(())
    }

    /// Laundering and then a flush, each failing on a device error
    /// (for the fault steps).
    fn launder_then_flush(&mut self) -> hammer2::Result<()> {
        let m = self.m();
        let mut batch = m.launder_begin()?;
        batch.write();
        m.launder_finish(batch)?;
        m.flush().map(|_| ())
    }

    /// After a commit that began at log position `start`: the durable
    /// state is the committed one, if a header was written.
    fn committed_since(&mut self, start: usize) -> R<()> {
        self.stats.flushes += 1;
        self.note("flush".into());
        let now_durable = self.committed.to_model(&self.model);
        if self.header_since(start).is_some() {
            self.prev = std::mem::replace(&mut self.durable, now_durable);
        } else if now_durable.tree() != self.durable.tree() {
            return Err(format!(
                "a commit wrote no header, but the committed state changed: {}",
                tree_diff(&self.durable.tree(), &now_durable.tree())
            ));
        }
        self.shows_the_model("after a commit")
    }

    /// Crash inside a flush: writes of earlier epochs whole, a random
    /// subset of one epoch's writes, nothing after.
    fn crash(&mut self) -> R<()> {
        self.stats.crashes += 1;
        let start = self.rec.position();
        let before = self.durable.clone();
        let after = self.model.clone();
        self.m().flush().map_err(|e| format!("flush: {e}"))?;
        self.all_committed();
        let header = self.header_since(start);
        let events = self.rec.events();
        // Epoch boundaries after `start`.
        let mut bounds = vec![start];
        for (i, e) in events.iter().enumerate().skip(start) {
            if matches!(e, Event::Barrier) {
                bounds.push(i + 1);
            }
        }
        bounds.push(events.len());
        let k = self.rng.gen_range(0..bounds.len() - 1);
        let (e0, e1) = (bounds[k], bounds[k + 1]);
        let img = self.rec.image_at(e0);
        let mut header_in = header.is_some_and(|h| h < e0);
        for (i, e) in events.iter().enumerate().take(e1).skip(e0) {
            if let Event::Write { offset, data } = e {
                if self.rng.gen_bool(0.5) {
                    img.write_at(data, *offset).map_err(|e| e.to_string())?;
                    header_in |= Some(i) == header;
                }
            }
        }
        self.note(format!(
            "crash in epoch {e0}..{e1} (header {header:?} landed: {header_in})"
        ));
        let want = if header_in { after } else { before };
        self.m = None;
        self.rec = Arc::new(RecordingDevice::from_mem(img));
        self.fault = self.fault_device();
        self.verify(&[want], "a crash")
    }

    /// A flush whose N-th write (or barrier) fails: an I/O error, the
    /// mount poisoned, and after a remount the last flush's state (or
    /// the new one when its header was written).
    fn write_or_barrier_fault(&mut self, barrier: bool) -> R<()> {
        for _ in 0..self.rng.gen_range(1..4) {
            self.op()?;
        }
        let start = self.rec.position();
        if barrier {
            self.stats.barrier_faults += 1;
            self.fault.fail_barriers_after(self.rng.gen_range(0..2));
        } else {
            self.stats.write_faults += 1;
            self.fault.fail_writes_after(self.rng.gen_range(0..10));
        }
        let what = if barrier { "barrier" } else { "write" };
        let launder = self.rng.gen_bool(0.5);
        self.note(format!("{what} fault armed (laundering first: {launder})"));
        let r = match launder {
            true => self.launder_then_flush(),
            false => self.m().flush().map(|_| ()),
        };
        match r {
            Ok(()) => {
                // The flush needed fewer writes than allowed.
                self.all_committed();
                self.fault.heal();
                if self.header_since(start).is_some() {
                    self.prev = std::mem::replace(&mut self.durable, self.model.clone());
                }
                Ok(())
            }
            Err(Error::Io { .. }) => {
                self.stats.errors_seen += 1;
                let r = self
                    .m()
                    .mkdir(LABEL, ROOT_INUM, b"after-fault", 0o755, 0, 0, 1);
                if !matches!(r, Err(Error::Poisoned { .. })) {
                    return Err(format!("a failed {what} left the mount writable: {r:?}"));
                }
                if !matches!(self.m().flush(), Err(Error::Poisoned { .. })) {
                    return Err(format!("a failed {what} left the mount flushing"));
                }
                let want = if self.header_since(start).is_some() {
                    self.model.clone()
                } else {
                    self.durable.clone()
                };
                self.verify(&[want], &format!("a failed {what}"))
            }
            Err(e) => Err(format!("a failed {what} surfaced as {e}")),
        }
    }

    /// Reads fail after a while: every result is the right data or an
    /// error; an operation that failed is not half done.
    fn read_fault(&mut self) -> R<()> {
        self.stats.read_faults += 1;
        self.flush_all()?;
        let img = self.image();
        self.remount_on(img)?;
        let n = self.rng.gen_range(0..40);
        self.fault.fail_reads_after(n);
        self.note(format!("reads fail after {n}"));
        match lib_tree(self.m()) {
            Ok(t) if t == self.durable.tree() => {}
            Ok(t) => {
                return Err(format!(
                    "read fault: wrong tree: {}",
                    tree_diff(&t, &self.durable.tree())
                ))
            }
            Err(e) if is_media_or_io(&e) => self.stats.errors_seen += 1,
            Err(e) => return Err(format!("read fault surfaced as {e}")),
        }
        // An operation under the fault: done whole or not at all.
        let op = self.random_op();
        self.now += 1000;
        let now = self.now;
        let mut next = self.model.clone();
        let want = next.apply(&op);
        let got = lib_apply(self.m(), &op, now);
        self.note(format!("{op:?} -> {got:?}"));
        let accept = match (&want, &got) {
            (Ok(()), Ok(())) => vec![next],
            (Err(_), Err(_)) => vec![self.model.clone()],
            (Ok(()), Err(e)) if is_media_or_io(e) => {
                self.stats.errors_seen += 1;
                vec![self.model.clone()]
            }
            _ => {
                return Err(format!(
                    "{op:?} under a read fault: {got:?}, model {want:?}"
                ))
            }
        };
        let start = self.rec.position();
        let flushed = self.m().flush();
        let r = match flushed {
            Ok(_) => self.verify(&accept, "a flush under read faults"),
            Err(e) if is_media_or_io(&e) => {
                self.stats.errors_seen += 1;
                if matches!(e, Error::Io { .. })
                    && !matches!(self.m().flush(), Err(Error::Poisoned { .. }))
                {
                    return Err("a failed flush left the mount unpoisoned".into());
                }
                let mut ok = vec![self.durable.clone()];
                if self.header_since(start).is_some() {
                    ok = accept;
                }
                self.verify(&ok, "a failed flush under read faults")
            }
            Err(e) => Err(format!("a flush under read faults surfaced as {e}")),
        };
        r
    }

    /// A bit flips on the way from the media, in a block the last flush
    /// wrote (data, metadata or the volume header): the right data or a
    /// check-code error, never wrong data.
    fn bit_flip(&mut self) -> R<()> {
        self.stats.bit_flips += 1;
        self.op()?;
        let start = self.rec.position();
        self.flush_all()?;
        let writes: Vec<(u64, usize)> = self
            .rec
            .events()
            .iter()
            .skip(start)
            .filter_map(|e| match e {
                Event::Write { offset, data } => Some((*offset, data.len())),
                _ => None,
            })
            .collect();
        if writes.is_empty() {
            return Ok(());
        }
        let (off, len) = writes[self.rng.gen_range(0..writes.len())];
        let at = off + self.rng.gen_range(0..len as u64);
        let mask = 1u8 << self.rng.gen_range(0..8);
        let is_header = len == hammer2::disk::VOLUME_BYTES;
        let img = self.image();
        self.m = None;
        self.rec = Arc::new(RecordingDevice::from_mem(img));
        self.fault = self.fault_device();
        self.fault.flip_on_read(Some((at, mask)));
        self.note(format!(
            "bit flip {mask:#x} at {at:#x} (header {is_header})"
        ));
        let d: Arc<dyn BlockDevice> = self.fault.clone();
        // With the header in use damaged, the copy before it is used.
        let mut accept = vec![self.durable.tree()];
        if is_header {
            accept.push(self.prev.tree());
        }
        match Mount::open(d) {
            Ok(mut m) => match lib_tree(&mut m) {
                Ok(t) if accept.contains(&t) => {}
                Ok(t) => {
                    return Err(format!(
                        "bit flip at {at:#x}: wrong data read: {}",
                        tree_diff(&t, &self.durable.tree())
                    ))
                }
                Err(e) if is_media_or_io(&e) => self.stats.errors_seen += 1,
                Err(e) => return Err(format!("bit flip surfaced as {e}")),
            },
            Err(e) if is_media_or_io(&e) => self.stats.errors_seen += 1,
            Err(e) => return Err(format!("bit flip: mount failed with {e}")),
        }
        let keep = self.durable.clone();
        self.verify(&[keep], "a bit flip (healed)")
    }

    /// A nearly full disk: writes fail with NoSpace and change nothing;
    /// the flush still completes.
    fn enospc(&mut self) -> R<()> {
        self.stats.enospc += 1;
        self.flush_all()?;
        let img = self.image();
        self.m = None;
        self.rec = Arc::new(RecordingDevice::from_mem(img));
        self.fault = self.fault_device();
        let d: Arc<dyn BlockDevice> = self.fault.clone();
        let vol = hammer2::Volume::open(d.clone()).map_err(|e| e.to_string())?;
        let mut alloc = hammer2::alloc::Allocator::load(&vol).map_err(|e| e.to_string())?;
        alloc.recover(&vol).map_err(|e| e.to_string())?;
        let room = self.rng.gen_range(64u64..1024) << 10;
        alloc.set_reserve_bytes(alloc.free_chunk_bytes().saturating_sub(room));
        self.note(format!("disk with {room} bytes of room"));
        self.m = Some(Mount::open_with(d, Box::new(alloc)).map_err(|e| e.to_string())?);
        self.all_committed();
        let mut refused = 0;
        for _ in 0..12 {
            let op = self.random_op();
            self.now += 1000;
            let now = self.now;
            let mut next = self.model.clone();
            let want = next.apply(&op);
            let got = lib_apply(self.m(), &op, now);
            self.note(format!("{op:?} -> {got:?}"));
            match (want, got) {
                (Ok(()), Ok(())) => self.model = next,
                (Err(_), Err(_)) => {}
                (Ok(()), Err(Error::NoSpace { .. })) => refused += 1,
                (Ok(()), Err(e)) => return Err(format!("{op:?} on a full disk: {e}")),
                (Err(w), Ok(())) => return Err(format!("{op:?} succeeded; expected: {w}")),
            }
        }
        self.stats.errors_seen += refused;
        // A refused operation changed nothing the flush writes.
        self.flush_all()?;
        let keep = self.model.clone();
        self.verify(&[keep], "a full disk")
    }

    fn step(&mut self) -> R<()> {
        match self.rng.gen_range(0..100) {
            0..=55 => self.op(),
            56..=59 => self.launder(),
            60..=68 => self.flush(),
            69..=71 => self.pipelined(),
            72..=79 => self.crash(),
            80..=84 => self.write_or_barrier_fault(false),
            85..=88 => self.write_or_barrier_fault(true),
            89..=92 => self.read_fault(),
            93..=97 => self.bit_flip(),
            _ => self.enospc(),
        }
    }
}

/// Run `steps` steps of the simulation seeded `seed`. `Err` names the
/// failure and the recent actions; the seed replays it.
pub fn run(seed: u64, steps: usize) -> std::result::Result<SimStats, String> {
    let version = 1 + (seed % 2) as u32;
    let base = ace::base(version);
    let r = catch_unwind(AssertUnwindSafe(|| {
        let rec = Arc::new(RecordingDevice::from_mem(base.image.snapshot()));
        let fault = Arc::new(FaultDevice::new(rec.clone()));
        // Both format versions with and without pages: seeds 2 and 3 of
        // every 4 use them.
        let pages = (seed / 2 % 2 == 1).then(|| {
            bufcache::Vm::new(bufcache::VmConfig::new(64 << 20)).expect("a 64 MiB page layer")
        });
        fault.set_page_layer(pages.clone());
        let d: Arc<dyn BlockDevice> = fault.clone();
        let m = Mount::open(d).map_err(|e| e.to_string())?;
        let mut sim = Sim {
            rng: SmallRng::seed_from_u64(seed),
            rec,
            fault,
            pages,
            m: Some(m),
            model: base.model.clone(),
            durable: base.model.clone(),
            prev: Model::default(),
            groups: Groups::default(),
            committed: Committed::full(&base.model),
            now: crate::T0 + 1_000_000,
            stats: SimStats::default(),
            trail: Vec::new(),
        };
        for i in 0..steps {
            if let Err(e) = sim.step() {
                return Err(format!(
                    "seed {seed}, step {i}: {e}\n  recent: {}",
                    sim.trail.join("\n          ")
                ));
            }
        }
        if let Some(vm) = sim.pages.clone() {
            // Every page went back with the mount that held it.
            sim.m = None;
            vm.verify().map_err(|e| format!("seed {seed}: {e}"))?;
            if vm.stats().anon != 0 {
                return Err(format!(
                    "seed {seed}: {} file data pages outlived their mount",
                    vm.stats().anon
                ));
            }
            sim.stats.data_pages_peak = vm.stats().anon_peak as u64;
        }
        Ok(sim.stats)
    }));
    match r {
        Ok(r) => r,
        Err(p) => Err(format!(
            "seed {seed}: panic: {}",
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    }
}

impl SimStats {
    /// Add another run's figures.
    pub fn add(&mut self, o: &SimStats) {
        self.ops += o.ops;
        self.flushes += o.flushes;
        self.launders += o.launders;
        self.crashes += o.crashes;
        self.write_faults += o.write_faults;
        self.barrier_faults += o.barrier_faults;
        self.read_faults += o.read_faults;
        self.bit_flips += o.bit_flips;
        self.enospc += o.enospc;
        self.errors_seen += o.errors_seen;
        self.remounts += o.remounts;
        self.data_pages_peak = self.data_pages_peak.max(o.data_pages_peak);
    }

    /// One line of figures.
    pub fn summary(&self) -> String {
        format!(
            "{} operations, {} flushes, {} launderings, {} crashes, faults: {} write, {} barrier, {} read, {} bit flips, {} full disk; {} errors surfaced and checked, {} remounts checked; file data pages at most {} at once",
            self.ops,
            self.flushes,
            self.launders,
            self.crashes,
            self.write_faults,
            self.barrier_faults,
            self.read_faults,
            self.bit_flips,
            self.enospc,
            self.errors_seen,
            self.remounts,
            self.data_pages_peak
        )
    }
}
