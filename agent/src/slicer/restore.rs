//! Rebuilding an image from its manifest: every chunk read from the store and
//! verified, written ([`crate::diskio`], io_uring where it works) while the
//! next batch is read and verified. A file is written next to its final path
//! and renamed over it only after every chunk is in and synced, so a failed
//! restore leaves nothing at PATH; all-zero chunks stay holes. An existing block device is written in place
//! (zero chunks written as zeros, the device may hold old data) and read back.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use edgeshift_common::{Fingerprint, Manifest, ManifestId};

use super::{chunk_fingerprint, Progress, SlicerError};
use crate::diskio::{AlignedBuf, Engine, Queue, DIRECT_ALIGN};
use crate::store::{ChunkStore, LocalStore};

/// Bytes read and verified per batch (one batch is written while the next
/// is read).
const BATCH_BYTES: usize = 32 << 20;
const BATCH_MAX_CHUNKS: usize = 64;

#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub manifest_id: ManifestId,
    pub out: PathBuf,
    pub image_size: u64,
    pub chunks_written: u64,
    /// Zero chunks left as holes (file) or written as zeros (block device).
    pub zero_chunks: u64,
    pub block_device: bool,
    pub seconds: f64,
}

/// Removes the temp file unless the restore succeeded.
struct TempGuard {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// One chunk to write: its index and where its verified bytes are.
#[derive(Clone, Copy)]
struct Job {
    index: usize,
    fp: Fingerprint,
}

/// Rebuilds image `id` from `store` at `out`.
pub fn restore_image(
    store: &LocalStore,
    id: &ManifestId,
    out: &Path,
    progress: Option<Progress<'_>>,
) -> Result<RestoreReport, SlicerError> {
    let started = Instant::now();
    let manifest = store.get_manifest(id)?;
    let is_device = fs::metadata(out).is_ok_and(|m| m.file_type().is_block_device());
    if out.is_dir() {
        return Err(SlicerError::OutIsDirectory(out.to_path_buf()));
    }
    let (file, write_path, mut guard) = if is_device {
        let f = OpenOptions::new()
            .write(true)
            .open(out)
            .map_err(|e| SlicerError::io("open for writing", out, e))?;
        let mut device = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64 into `device`, a live local.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), 0x8008_1272, &mut device as *mut u64) };
        if rc != 0 {
            return Err(SlicerError::io(
                "BLKGETSIZE64 on",
                out,
                std::io::Error::last_os_error(),
            ));
        }
        if device < manifest.image_size {
            return Err(SlicerError::DeviceTooSmall {
                path: out.to_path_buf(),
                device,
                image: manifest.image_size,
            });
        }
        let guard = TempGuard {
            path: out.to_path_buf(),
            armed: false,
        };
        (f, out.to_path_buf(), guard)
    } else {
        let dir = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = out
            .file_name()
            .ok_or_else(|| SlicerError::OutIsDirectory(out.to_path_buf()))?
            .to_string_lossy();
        let tmp = dir.join(format!(".{name}.edgeshift-restore.{}", std::process::id()));
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| SlicerError::io("create", &tmp, e))?;
        let guard = TempGuard {
            path: tmp.clone(),
            armed: true,
        };
        // Sized up front: chunks never written (zero chunks) stay holes.
        f.set_len(manifest.image_size)
            .map_err(|e| SlicerError::io("set length of", &tmp, e))?;
        (f, tmp, guard)
    };

    let (written, zero) = write_chunks(store, id, &manifest, &file, &write_path, is_device, progress)?;
    file.sync_all()
        .map_err(|e| SlicerError::io("sync", &write_path, e))?;
    drop(file);

    if is_device {
        read_back(out, &manifest)?;
    } else {
        fs::rename(&write_path, out).map_err(|e| SlicerError::io("rename into", out, e))?;
        guard.armed = false;
        let dir = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| SlicerError::io("sync directory", dir, e))?;
    }
    let report = RestoreReport {
        manifest_id: *id,
        out: out.to_path_buf(),
        image_size: manifest.image_size,
        chunks_written: written,
        zero_chunks: zero,
        block_device: is_device,
        seconds: started.elapsed().as_secs_f64(),
    };
    metrics::counter!("edgeshift_restore_bytes_total").increment(manifest.image_size);
    tracing::debug!(id = %id, out = %out.display(), secs = report.seconds, "restored");
    Ok(report)
}

fn write_chunks(
    store: &LocalStore,
    id: &ManifestId,
    manifest: &Manifest,
    file: &File,
    path: &Path,
    is_device: bool,
    progress: Option<Progress<'_>>,
) -> Result<(u64, u64), SlicerError> {
    let cs = manifest.chunk_size.as_usize();
    let per_batch = (BATCH_BYTES / cs).clamp(1, BATCH_MAX_CHUNKS);
    let zero_chunks = manifest.zero_chunks() as u64;
    let jobs: Vec<Job> = manifest
        .chunks
        .iter()
        .enumerate()
        .filter(|(_, fp)| is_device || !fp.is_zero_chunk())
        .map(|(index, fp)| Job { index, fp: *fp })
        .collect();
    // Two buffer sets: one being written while the other is filled.
    let mut sets: [Vec<Vec<u8>>; 2] = [
        (0..per_batch).map(|_| vec![0u8; cs]).collect(),
        (0..per_batch).map(|_| vec![0u8; cs]).collect(),
    ];
    // Room for both sets' writes, though only one set is written at a time.
    let mut queue = Engine::current()
        .queue::<Vec<u8>>((per_batch * 2).next_power_of_two())
        .map_err(|e| SlicerError::io("set up disk writes for", path, e))?;
    let mut done = 0u64;
    for (n, batch) in jobs.chunks(per_batch).enumerate() {
        let set = n % 2;
        fill_batch(store, id, manifest, batch, &mut sets[set])?;
        // The other set's writes were submitted a batch ago; they must be done
        // before that set is filled again, i.e. before the next iteration.
        wait_writes(&mut queue, &mut sets, per_batch, path)?;
        for (i, job) in batch.iter().enumerate() {
            if queue.is_full() {
                wait_writes(&mut queue, &mut sets, per_batch, path)?;
            }
            let len = manifest.chunk_len(job.index) as usize;
            // The buffer travels with its write and is put back by wait_writes.
            let buf = std::mem::take(&mut sets[set][i]);
            queue
                .write(
                    file,
                    buf,
                    0..len,
                    manifest.chunk_offset(job.index),
                    set * per_batch + i,
                )
                .map_err(|e| SlicerError::io("submit a write to", path, e))?;
            done += len as u64;
        }
        if let Some(p) = progress {
            p(done);
        }
    }
    wait_writes(&mut queue, &mut sets, per_batch, path)?;
    drop(queue);
    let written = jobs.iter().filter(|j| !j.fp.is_zero_chunk()).count() as u64;
    Ok((written, zero_chunks))
}

/// Waits for every write in flight and puts each buffer back in its set
/// (tag `set * per_batch + i`). A failed or short write is an error: a
/// regular file or block device writes short only when it is full.
fn wait_writes(
    queue: &mut Queue<'_, Vec<u8>>,
    sets: &mut [Vec<Vec<u8>>; 2],
    per_batch: usize,
    path: &Path,
) -> Result<(), SlicerError> {
    let mut first_err = None;
    while queue.in_flight() > 0 {
        let done = queue
            .next_completion()
            .map_err(|e| SlicerError::io("wait for writes to", path, e))?;
        let written = match done.result {
            Ok(n) if n == done.requested => Ok(()),
            Ok(_) => Err(std::io::Error::from_raw_os_error(libc::ENOSPC)),
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            first_err.get_or_insert(e);
        }
        if let Some(slot) = sets
            .get_mut(done.tag / per_batch)
            .and_then(|set| set.get_mut(done.tag % per_batch))
        {
            *slot = done.buf;
        }
    }
    first_err.map_or(Ok(()), |e| Err(SlicerError::io("write", path, e)))
}

/// Reads and verifies a batch of chunks into `bufs`, on every core.
fn fill_batch(
    store: &LocalStore,
    id: &ManifestId,
    manifest: &Manifest,
    batch: &[Job],
    bufs: &mut [Vec<u8>],
) -> Result<(), SlicerError> {
    let per_thread = batch
        .len()
        .div_ceil(crate::par::threads_for(batch.len(), 8, 1))
        .max(1);
    let fill_one = |job: &Job, buf: &mut Vec<u8>| -> Result<(), SlicerError> {
        let len = manifest.chunk_len(job.index) as usize;
        let slot = &mut buf[..len];
        if job.fp.is_zero_chunk() {
            slot.fill(0);
            return Ok(());
        }
        store
            .read_chunk_into(&job.fp, slot)
            .map_err(|source| SlicerError::RestoreChunk {
                id: *id,
                index: job.index,
                offset: manifest.chunk_offset(job.index),
                source: Box::new(source),
            })
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = batch
            .chunks(per_thread)
            .zip(bufs.chunks_mut(per_thread))
            .map(|(jobs, bufs)| {
                s.spawn(move || {
                    jobs.iter()
                        .zip(bufs.iter_mut())
                        .try_for_each(|(job, buf)| fill_one(job, buf))
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().map_err(|_| SlicerError::WorkerPanicked)?)
    })
}

/// Reads a block device back with O_DIRECT (past the page cache) and checks
/// every chunk against the manifest.
fn read_back(path: &Path, manifest: &Manifest) -> Result<(), SlicerError> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .or_else(|_| File::open(path))
        .map_err(|e| SlicerError::io("open for read-back", path, e))?;
    let cs = manifest.chunk_size.as_usize();
    let mut buf = AlignedBuf::new(cs);
    for (index, fp) in manifest.chunks.iter().enumerate() {
        let len = manifest.chunk_len(index) as usize;
        let want = len.next_multiple_of(DIRECT_ALIGN).min(buf.len());
        let off = manifest.chunk_offset(index);
        let mut got = 0;
        while got < len {
            let n = f
                .read_at(&mut buf.as_mut_slice()[got..want], off + got as u64)
                .map_err(|e| SlicerError::io("read back", path, e))?;
            if n == 0 {
                break;
            }
            got += n;
        }
        let actual = chunk_fingerprint(&buf.as_slice()[..len.min(got)]);
        if got < len || actual != *fp {
            return Err(SlicerError::ReadBack {
                path: path.to_path_buf(),
                index,
                fp: *fp,
                actual,
            });
        }
    }
    Ok(())
}
