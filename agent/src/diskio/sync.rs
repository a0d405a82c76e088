//! The fallback engine: each operation is done with a plain `pread`,
//! `pwrite` or `fsync` when it is queued, and its completion waits in a list
//! until it is asked for. Slower (no overlap), but it runs wherever io_uring
//! is missing or refused, and it needs no unsafe code.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Completions of operations already done, in order: (slot, result).
#[derive(Default)]
pub(super) struct Done {
    done: VecDeque<(usize, io::Result<usize>)>,
}

impl Done {
    pub(super) fn read(&mut self, file: &File, buf: &mut [u8], offset: u64, slot: usize) {
        self.done.push_back((slot, file.read_at(buf, offset)));
    }

    pub(super) fn write(&mut self, file: &File, buf: &[u8], offset: u64, slot: usize) {
        self.done.push_back((slot, file.write_at(buf, offset)));
    }

    pub(super) fn next(&mut self) -> Option<(usize, io::Result<usize>)> {
        self.done.pop_front()
    }
}

/// Syncs every file one after another; every one is tried, the first
/// failure is returned.
pub(super) fn sync_files(files: &[&File], data_only: bool) -> io::Result<()> {
    let mut first_err = None;
    for f in files {
        let r = if data_only { f.sync_data() } else { f.sync_all() };
        if let Err(e) = r {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}
