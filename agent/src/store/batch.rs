//! Chunk writes made durable together: [`ChunkBatch`].

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::PathBuf;

use edgeshift_common::Fingerprint;

use super::fs::{io_err, start_writeback, sync_all_parallel};
use super::layout::StorePaths;
use super::StoreError;

/// Most files a batch keeps open before it should be committed (stays well
/// under the usual 1024 open-file limit, and within one ring of syncs).
pub const BATCH_MAX_FILES: usize = 256;
/// Most bytes a batch holds before it should be committed.
pub const BATCH_MAX_BYTES: u64 = 128 << 20;

/// Chunk writes made durable together: each chunk goes to its own temp file
/// at [`ChunkBatch::stage`]; [`ChunkBatch::commit`] then syncs all of them at
/// once (parallel `fdatasync`, so the file system folds them into few
/// journal commits), renames them into place and syncs the touched
/// directories, again in parallel. A chunk is visible only after its data is
/// durable, exactly as with [`super::ChunkStore::put_chunk`], at a fraction
/// of the cost of one sync per chunk. Temp files not committed are removed
/// on drop.
pub struct ChunkBatch<'s> {
    paths: &'s StorePaths,
    staged: Vec<(File, PathBuf, Fingerprint)>,
    staged_bytes: u64,
}

impl<'s> ChunkBatch<'s> {
    pub(super) fn new(paths: &'s StorePaths) -> Self {
        ChunkBatch {
            paths,
            staged: Vec::new(),
            staged_bytes: 0,
        }
    }

    /// Writes `data` (which the caller hashed to `fp`) to a new temp file.
    pub fn stage(&mut self, fp: &Fingerprint, data: &[u8]) -> Result<(), StoreError> {
        if fp.is_zero_chunk() {
            return Err(StoreError::ZeroChunk);
        }
        let tmp = self.paths.tmp_path("chunk");
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        if let Err(e) = f.write_all(data) {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::Io {
                op: "write",
                path: tmp,
                source: e,
            });
        }
        // Start writeback now, so the disk is busy while more chunks are
        // staged and the commit's fdatasync finds little left to do.
        start_writeback(&f);
        self.staged.push((f, tmp, *fp));
        self.staged_bytes += data.len() as u64;
        Ok(())
    }

    /// True when the batch should be committed before staging more.
    pub fn is_full(&self) -> bool {
        self.staged.len() >= BATCH_MAX_FILES || self.staged_bytes >= BATCH_MAX_BYTES
    }

    pub fn len(&self) -> usize {
        self.staged.len()
    }

    pub fn is_empty(&self) -> bool {
        self.staged.is_empty()
    }

    /// Makes every staged chunk durable and visible; returns how many were
    /// newly stored (a chunk another writer stored meanwhile is not counted).
    pub fn commit(&mut self) -> Result<u64, StoreError> {
        if self.staged.is_empty() {
            return Ok(0);
        }
        let files: Vec<&File> = self.staged.iter().map(|(f, _, _)| f).collect();
        sync_all_parallel(&files, true, &self.paths.tmp_dir())?;
        let chunks_dir = self.paths.chunks_dir();
        let mut touched: Vec<PathBuf> = Vec::new();
        let mut made_fan = false;
        let mut stored = 0;
        for (f, tmp, fp) in self.staged.drain(..) {
            drop(f);
            let dest = self.paths.chunk_path(&fp);
            if dest.exists() {
                let _ = fs::remove_file(&tmp);
                continue;
            }
            let dir = dest.parent().unwrap_or(&chunks_dir).to_path_buf();
            if let Err(e) = fs::rename(&tmp, &dest) {
                if e.kind() != ErrorKind::NotFound || dir.exists() {
                    return Err(StoreError::Io {
                        op: "rename into",
                        path: dest,
                        source: e,
                    });
                }
                fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
                made_fan = true;
                fs::rename(&tmp, &dest).map_err(io_err("rename into", &dest))?;
            }
            if !touched.contains(&dir) {
                touched.push(dir);
            }
            stored += 1;
        }
        self.staged_bytes = 0;
        if made_fan {
            touched.push(chunks_dir);
        }
        let dirs: Vec<File> = touched
            .iter()
            .map(|d| File::open(d).map_err(io_err("open directory", d)))
            .collect::<Result<_, _>>()?;
        let dir_refs: Vec<&File> = dirs.iter().collect();
        sync_all_parallel(&dir_refs, false, self.paths.root())?;
        Ok(stored)
    }
}

impl Drop for ChunkBatch<'_> {
    fn drop(&mut self) {
        for (_, tmp, _) in self.staged.drain(..) {
            let _ = fs::remove_file(tmp);
        }
    }
}
