//! Disk I/O for the slicer, the restorer and the store: reads and writes at
//! offsets kept in flight together ([`Queue`]), and batches of syncs
//! ([`Engine::sync_files`]), through io_uring where the kernel allows it and
//! plain `pread`/`pwrite`/`fsync` where it does not.
//!
//! The engine is chosen once per process ([`Engine::current`]): io_uring,
//! unless `EDGESHIFT_DISK_IO=sync` asks for the fallback or a ring cannot be
//! set up (no io_uring in the kernel, a seccomp profile or
//! `kernel.io_uring_disabled` refusing it); the choice is logged once.
//! Callers never see which engine runs. A [`Queue`] takes each buffer by
//! value while the kernel may use it and hands it back with the completion,
//! so the unsafe code stays in this module.

mod buf;
mod map;
mod sync;
#[cfg(test)]
mod tests;
mod uring;

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

pub use buf::{AlignedBuf, IoBuf, DIRECT_ALIGN};
pub use map::MappedFile;

/// The environment variable that forces the fallback engine (`sync`).
pub const ENGINE_ENV: &str = "EDGESHIFT_DISK_IO";

/// How disk operations reach the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// io_uring: many operations in flight from one thread.
    Uring,
    /// One blocking system call per operation.
    Sync,
}

impl Engine {
    /// The engine this process uses, probed on first use.
    pub fn current() -> Engine {
        static CHOSEN: OnceLock<Engine> = OnceLock::new();
        *CHOSEN.get_or_init(|| choose(std::env::var(ENGINE_ENV).ok().as_deref(), uring::probe))
    }

    /// A queue of up to `depth` reads and writes in flight.
    pub fn queue<'f, B: IoBuf>(self, depth: usize) -> io::Result<Queue<'f, B>> {
        let backend = match self {
            Engine::Uring => Backend::Uring(Box::new(uring::Ring::new(depth)?)),
            Engine::Sync => Backend::Sync(sync::Done::default()),
        };
        Ok(Queue {
            backend,
            slots: (0..depth).map(|_| None).collect(),
            in_flight: 0,
            _files: PhantomData,
        })
    }

    /// Syncs every file (`fdatasync` if `data_only`, else `fsync`) and
    /// returns once all are done; the first failure, if any.
    pub fn sync_files(self, files: &[&File], data_only: bool) -> io::Result<()> {
        match self {
            Engine::Uring => uring::sync_files(files, data_only),
            Engine::Sync => sync::sync_files(files, data_only),
        }
    }
}

/// The choice, given the override's value and a way to probe io_uring.
fn choose(forced: Option<&str>, probe: impl FnOnce() -> io::Result<()>) -> Engine {
    if forced == Some("sync") {
        tracing::info!("disk I/O through pread/pwrite/fsync ({ENGINE_ENV}=sync)");
        return Engine::Sync;
    }
    match probe() {
        Ok(()) => Engine::Uring,
        Err(e) => {
            tracing::warn!(error = %e, "io_uring unavailable: disk I/O falls back to pread/pwrite/fsync");
            Engine::Sync
        }
    }
}

/// A finished read or write, with the buffer it was given.
pub struct Completion<B> {
    /// The caller's tag for the operation.
    pub tag: usize,
    pub buf: B,
    /// Bytes asked for; a read or write may do fewer.
    pub requested: usize,
    /// Bytes done, or the error.
    pub result: io::Result<usize>,
}

/// An operation the kernel may still be working on, and its buffer.
struct Pending<B> {
    tag: usize,
    buf: B,
    requested: usize,
}

enum Backend {
    // Boxed: a ring's handle is large, and the fallback's is small.
    Uring(Box<uring::Ring>),
    Sync(sync::Done),
}

/// Reads and writes at offsets of files borrowed for `'f`, up to the depth
/// it was made with in flight at once. Buffers go in by value and come back
/// with their [`Completion`]; dropping the queue waits for every operation
/// still in flight.
pub struct Queue<'f, B: IoBuf> {
    backend: Backend,
    /// Operations in flight by slot (the ring's user data): their buffers
    /// stay here, untouched, until their completion is reaped.
    slots: Box<[Option<Pending<B>>]>,
    in_flight: usize,
    _files: PhantomData<&'f File>,
}

#[derive(Clone, Copy)]
enum Op {
    Read,
    Write,
}

impl<'f, B: IoBuf> Queue<'f, B> {
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// True when no further operation fits until one is reaped.
    pub fn is_full(&self) -> bool {
        self.in_flight == self.slots.len()
    }

    /// Reads into `buf[range]` from `file` at `offset`.
    pub fn read(
        &mut self,
        file: &'f File,
        buf: B,
        range: Range<usize>,
        offset: u64,
        tag: usize,
    ) -> io::Result<()> {
        self.start(Op::Read, file, buf, range, offset, tag)
    }

    /// Writes `buf[range]` to `file` at `offset`.
    pub fn write(
        &mut self,
        file: &'f File,
        buf: B,
        range: Range<usize>,
        offset: u64,
        tag: usize,
    ) -> io::Result<()> {
        self.start(Op::Write, file, buf, range, offset, tag)
    }

    /// On an error the operation was not started and `buf` is dropped,
    /// except when the ring refused the submission: then the entry may
    /// still run, and the buffer stays until it is reaped.
    fn start(
        &mut self,
        op: Op,
        file: &'f File,
        buf: B,
        range: Range<usize>,
        offset: u64,
        tag: usize,
    ) -> io::Result<()> {
        let Some(slot) = self.slots.iter().position(Option::is_none) else {
            return Err(io::Error::other("disk I/O queue full"));
        };
        let requested = range.len();
        let pending = self.slots[slot].insert(Pending { tag, buf, requested });
        let Some(bytes) = pending.buf.bytes_mut().get_mut(range) else {
            self.slots[slot] = None;
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        match &mut self.backend {
            Backend::Sync(done) => {
                match op {
                    Op::Read => done.read(file, bytes, offset, slot),
                    Op::Write => done.write(file, bytes, offset, slot),
                }
                self.in_flight += 1;
                Ok(())
            }
            Backend::Uring(ring) => {
                let Ok(len) = u32::try_from(bytes.len()) else {
                    self.slots[slot] = None;
                    return Err(io::Error::from(io::ErrorKind::InvalidInput));
                };
                let (fd, ptr) = (file.as_raw_fd(), bytes.as_mut_ptr());
                // SAFETY: `ptr..ptr + len` lies in the buffer just moved into
                // `slots[slot]`, whose bytes are on the heap (IoBuf is sealed
                // to such types) and stay put; the slot is left untouched
                // until this entry's completion is reaped, and Drop reaps
                // every entry in flight before the slots are freed (or leaks
                // them). `file` is borrowed for 'f, which the queue cannot
                // outlive, and the entry is submitted below.
                let pushed = unsafe {
                    match op {
                        Op::Read => ring.push_read(fd, ptr, len, offset, slot as u64),
                        Op::Write => ring.push_write(fd, ptr, len, offset, slot as u64),
                    }
                };
                if let Err(e) = pushed {
                    self.slots[slot] = None;
                    return Err(e);
                }
                self.in_flight += 1;
                ring.submit()
            }
        }
    }

    /// Waits for the next operation to finish. An error here is the queue's
    /// own (the ring failed); an operation's error is in its completion.
    pub fn next_completion(&mut self) -> io::Result<Completion<B>> {
        while self.in_flight > 0 {
            let (slot, result) = match &mut self.backend {
                Backend::Uring(ring) => {
                    let (user_data, result) = ring.wait()?;
                    (user_data as usize, result)
                }
                Backend::Sync(done) => done
                    .next()
                    .ok_or_else(|| io::Error::other("disk I/O completion lost"))?,
            };
            self.in_flight -= 1;
            if let Some(p) = self.slots.get_mut(slot).and_then(Option::take) {
                return Ok(Completion {
                    tag: p.tag,
                    buf: p.buf,
                    requested: p.requested,
                    result,
                });
            }
        }
        Err(io::Error::other("no disk I/O in flight"))
    }
}

impl<B: IoBuf> Drop for Queue<'_, B> {
    fn drop(&mut self) {
        while self.in_flight > 0 {
            if self.next_completion().is_err() {
                // Cannot tell when the kernel is done with the buffers: leak
                // them rather than free memory it may still write into.
                std::mem::forget(std::mem::take(&mut self.slots));
                return;
            }
        }
    }
}
