//! Chunk writes made durable together: [`ChunkBatch`].

use std::fs::{self, File};
use std::io::ErrorKind;
use std::path::PathBuf;

use edgeshift_common::Fingerprint;

use super::fs::{io_err, sync_all_parallel};
use super::layout::StorePaths;
use super::staged::StagedChunk;
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
    /// Dropping them (with the batch) removes their temp files.
    staged: Vec<StagedChunk>,
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

    /// Writes `data` (which the caller hashed to `fp`) to a new temp file,
    /// through the page cache, and adds it to the batch.
    pub fn stage(&mut self, fp: &Fingerprint, data: &[u8]) -> Result<(), StoreError> {
        let staged = StagedChunk::write(self.paths, fp, data, false)?;
        self.adopt(staged);
        Ok(())
    }

    /// Adds a chunk staged elsewhere ([`super::LocalStore::stage_chunk`]) to
    /// the batch. It must come from this batch's store.
    pub fn adopt(&mut self, staged: StagedChunk) {
        self.staged_bytes += staged.len;
        self.staged.push(staged);
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
        let files: Vec<&File> = self.staged.iter().map(|s| &s.file).collect();
        sync_all_parallel(&files, true, &self.paths.tmp_dir())?;
        let chunks_dir = self.paths.chunks_dir();
        let mut touched: Vec<PathBuf> = Vec::new();
        let mut made_fan = false;
        let mut stored = 0;
        for mut staged in self.staged.drain(..) {
            let (tmp, fp) = (staged.tmp.clone(), staged.fp);
            let dest = self.paths.chunk_path(&fp);
            if dest.exists() {
                // Dropped still pending: its temp file is removed.
                continue;
            }
            // From here on the temp file is this loop's to rename or report.
            staged.pending = false;
            drop(staged);
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
