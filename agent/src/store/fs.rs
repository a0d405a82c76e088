//! The few file-system calls every part of the store makes the same way:
//! errors that name the path, durable directories, early writeback, and
//! batches of syncs (through [`crate::diskio`]).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::StoreError;
use crate::diskio::Engine;

pub(crate) fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Starts writing `f`'s dirty pages back without waiting for them and
/// without a journal commit (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so
/// a later `fsync` finds little left. Best effort: errors are ignored.
pub fn start_writeback(f: &File) {
    // SAFETY: sync_file_range only reads the fd, which `f` keeps open;
    // SYNC_FILE_RANGE_WRITE does not wait and touches no user memory.
    let _ = unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

/// Syncs a directory so that a rename into it is durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", dir))
}

/// `fsync`s (or `fdatasync`s) every file at once and waits for all of them
/// (the file system folds them into few journal commits); the first failure
/// is returned, reported against `what`.
pub(crate) fn sync_all_parallel(files: &[&File], data_only: bool, what: &Path) -> Result<(), StoreError> {
    Engine::current()
        .sync_files(files, data_only)
        .map_err(io_err("sync", what))
}
