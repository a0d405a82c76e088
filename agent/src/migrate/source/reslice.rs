//! Reading the live disk again: all of it through the slicer, or only the
//! chunks the write log names.

use std::path::Path;
use std::time::Instant;

use edgeshift_common::{ChunkSize, Fingerprint, Manifest};

use super::write_log::WriteLog;
use crate::migrate::temperature::Temperature;
use crate::migrate::MigrateError;
use crate::slicer::{slice_image, ReadMode, SliceOptions};
use crate::store::{ChunkStore, LocalStore};
use crate::vm;

/// Most threads reading chunks again, whatever the cores: the reads wait
/// on the disk (the guest's writes reach it with O_DIRECT), and more of
/// them in flight overlap those waits with the hashing.
const REREAD_THREADS: usize = 8;
/// Fewest chunks worth a thread of their own.
const REREAD_MIN_PER_THREAD: usize = 8;

/// The whole live disk, through the slicer's io_uring pipeline (parallel
/// hashing) reading the loop device's backing file: the loop device writes it
/// with O_DIRECT, so a read never sees stale cached pages.
pub(super) fn full_slice(
    image: &Path,
    chunk_size: ChunkSize,
    store: &LocalStore,
) -> Result<Manifest, MigrateError> {
    let opts = SliceOptions {
        chunk_size,
        read_mode: ReadMode::Auto,
        progress: None,
    };
    let report = slice_image(image, store, &opts)?;
    Ok(store.get_manifest(&report.manifest_id)?)
}

/// The live disk now: only the chunks the write log saw written are read
/// again when it can say so (with `also`), else all of it. Returns the
/// disk and the chunks the log named (None: it named nothing, all was read).
pub(super) fn reslice(
    dev: &Path,
    image: &Path,
    cur: &Manifest,
    writes: Option<&mut WriteLog>,
    also: &[u32],
    temp: &mut Temperature,
    store: &LocalStore,
) -> Result<(Manifest, Option<Vec<u32>>), MigrateError> {
    match writes.and_then(|w| w.take()) {
        Some(written) => {
            for &(i, n) in &written {
                temp.add_writes(i as usize, n as f64);
            }
            let named: Vec<u32> = written.iter().map(|&(i, _)| i).collect();
            let mut idx = named.clone();
            idx.extend_from_slice(also);
            idx.sort_unstable();
            idx.dedup();
            tracing::debug!(
                chunks = idx.len(),
                named = named.len(),
                "re-reading the chunks written since the last slices"
            );
            Ok((reslice_some(dev, cur, &idx, store)?, Some(named)))
        }
        None => Ok((full_slice(image, cur.chunk_size, store)?, None)),
    }
}

/// `cur` with the chunks at `indices` read again from the device, on up
/// to [`REREAD_THREADS`] threads; the chunks the store lacks are written
/// and synced behind, so the source's path waits for neither, placed
/// roughly in the order of `indices`.
pub(super) fn reslice_some(
    dev: &Path,
    cur: &Manifest,
    indices: &[u32],
    store: &LocalStore,
) -> Result<Manifest, MigrateError> {
    let started = Instant::now();
    let f = std::fs::File::open(dev).map_err(|source| MigrateError::Io {
        op: "open",
        path: dev.to_path_buf(),
        source,
    })?;
    let indices: Vec<usize> = indices
        .iter()
        .map(|&i| i as usize)
        .filter(|&i| i < cur.chunks.len())
        .collect();
    let read: Vec<(usize, Fingerprint, Vec<u8>)> =
        crate::par::map_in_parts_waiting(&indices, REREAD_THREADS, REREAD_MIN_PER_THREAD, |&i| {
            drop_cached(&f, cur.chunk_size.bytes(), i);
            let data = vm::image::read_chunk(&f, dev, cur.chunk_size, cur.image_size, i)?;
            Ok((i, vm::image::fingerprint_chunk(&data), data))
        })
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(MigrateError::State("chunk reader panicked".into()))))
        .collect::<Result<_, MigrateError>>()?;
    let read_s = started.elapsed().as_secs_f64();
    let mut next = cur.clone();
    let mut chunks = Vec::with_capacity(indices.len());
    for (i, fp, data) in read {
        next.chunks[i] = fp;
        chunks.push((fp, data));
    }
    // The destination asks the source's chunk server for these at once:
    // they are written and synced on another thread once an intent names
    // them (the server waits for a chunk being written; see
    // `store::publish`), so the source's path waits for neither.
    let stored = store.publish_sync_later(chunks)?;
    tracing::debug!(
        chunks = indices.len(),
        stored,
        read_s,
        seconds = started.elapsed().as_secs_f64(),
        "chunks read again"
    );
    Ok(next)
}

/// Drops the device's cached pages of chunk `i` before it is read: a
/// buffered read that raced one of QEMU's O_DIRECT writes may have cached
/// what was there before (the pause's check beside the mirror caught such
/// stale reads), and a read of a dropped page goes to the disk.
fn drop_cached(f: &std::fs::File, chunk_bytes: u64, i: usize) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(len)) = (
        libc::off_t::try_from(i as u64 * chunk_bytes),
        libc::off_t::try_from(chunk_bytes),
    ) else {
        return;
    };
    // SAFETY: an advisory call on a descriptor `f` keeps open for the
    // call; no memory is passed.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), off, len, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        tracing::debug!(errno = r, chunk = i, "posix_fadvise(DONTNEED) failed");
    }
}

/// `a` and `b` alternately, then what is left of the longer.
pub(super) fn interleave(a: Vec<u32>, b: Vec<u32>) -> Vec<u32> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter(), b.into_iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => return out,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleave_alternates_then_keeps_the_rest_of_the_longer() {
        assert_eq!(interleave(vec![1, 2, 3], vec![7]), vec![1, 7, 2, 3]);
        assert_eq!(interleave(vec![], vec![7, 8]), vec![7, 8]);
        assert_eq!(interleave(vec![1, 2], vec![7, 8, 9]), vec![1, 7, 2, 8, 9]);
        assert!(interleave(vec![], vec![]).is_empty());
    }
}
