//! The io_uring engine: operations are pushed to a ring and submitted at
//! once, and completions are reaped as they come, so many reads, writes or
//! syncs are in the kernel together. Only the pushes are unsafe (the kernel
//! keeps a raw pointer into the buffer); [`super::Queue`] upholds their
//! contract.

use std::fs::File;
use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};

/// Entries of the ring a batch of syncs goes through; larger batches go
/// through it in groups.
const SYNC_RING_ENTRIES: usize = 256;

/// Whether this kernel (and its seccomp profile, and `io_uring_disabled`)
/// lets us set up a ring at all.
pub(super) fn probe() -> io::Result<()> {
    IoUring::new(2).map(drop)
}

pub(super) struct Ring {
    ring: IoUring,
}

impl Ring {
    pub(super) fn new(entries: usize) -> io::Result<Self> {
        let entries = u32::try_from(entries).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
        Ok(Ring {
            ring: IoUring::new(entries)?,
        })
    }

    /// Queues a read of `len` bytes at `offset` into `ptr` (not yet submitted).
    ///
    /// # Safety
    /// `ptr..ptr + len` must stay valid, and untouched by anyone else, until
    /// the completion carrying `user_data` is reaped; `fd` must stay open
    /// until the entry is submitted.
    pub(super) unsafe fn push_read(
        &mut self,
        fd: RawFd,
        ptr: *mut u8,
        len: u32,
        offset: u64,
        user_data: u64,
    ) -> io::Result<()> {
        let sqe = opcode::Read::new(types::Fd(fd), ptr, len)
            .offset(offset)
            .build()
            .user_data(user_data);
        // SAFETY: the caller guarantees the buffer and fd outlive the entry.
        unsafe { self.push(&sqe) }
    }

    /// Queues a write of `len` bytes at `offset` from `ptr` (not yet submitted).
    ///
    /// # Safety
    /// As [`Ring::push_read`]: `ptr..ptr + len` valid and unchanged until the
    /// completion is reaped, `fd` open until the entry is submitted.
    pub(super) unsafe fn push_write(
        &mut self,
        fd: RawFd,
        ptr: *const u8,
        len: u32,
        offset: u64,
        user_data: u64,
    ) -> io::Result<()> {
        let sqe = opcode::Write::new(types::Fd(fd), ptr, len)
            .offset(offset)
            .build()
            .user_data(user_data);
        // SAFETY: the caller guarantees the buffer and fd outlive the entry.
        unsafe { self.push(&sqe) }
    }

    /// # Safety
    /// Whatever memory and fd `sqe` names must outlive its completion.
    unsafe fn push(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        // SAFETY: passed on to the caller.
        let pushed = unsafe { self.ring.submission().push(sqe) };
        pushed.map_err(|_| io::Error::other("io_uring submission queue full"))
    }

    /// Hands every queued entry to the kernel.
    pub(super) fn submit(&mut self) -> io::Result<()> {
        self.ring.submit().map(drop)
    }

    /// Waits for one completion: (user_data, result).
    pub(super) fn wait(&mut self) -> io::Result<(u64, io::Result<usize>)> {
        loop {
            if let Some(cqe) = self.ring.completion().next() {
                return Ok((cqe.user_data(), result(cqe.result())));
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A completion's result: bytes done, or the negated errno.
fn result(res: i32) -> io::Result<usize> {
    usize::try_from(res).map_err(|_| io::Error::from_raw_os_error(-res))
}

/// `fsync`s (or `fdatasync`s) every file at once and waits for all of them,
/// so the file system can fold them into few journal commits; the first
/// failure is returned.
pub(super) fn sync_files(files: &[&File], data_only: bool) -> io::Result<()> {
    let mut ring = IoUring::new(SYNC_RING_ENTRIES as u32)?;
    let flags = if data_only {
        types::FsyncFlags::DATASYNC
    } else {
        types::FsyncFlags::empty()
    };
    let mut first_err: Option<io::Error> = None;
    for group in files.chunks(SYNC_RING_ENTRIES) {
        for (i, f) in group.iter().enumerate() {
            let sqe = opcode::Fsync::new(types::Fd(f.as_raw_fd()))
                .flags(flags)
                .build()
                .user_data(i as u64);
            // SAFETY: an fsync entry refers to no user memory, only to an fd
            // that `files` keeps open until this function returns; the queue
            // has room because a group is at most the ring size.
            let pushed = unsafe { ring.submission().push(&sqe) };
            pushed.map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        let mut done = 0;
        while done < group.len() {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for cqe in ring.completion() {
                done += 1;
                if let Err(e) = result(cqe.result()) {
                    first_err.get_or_insert(e);
                }
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}
