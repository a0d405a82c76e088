//! One chunk written to a temp file, not yet durable or visible:
//! [`StagedChunk`]. Writing one needs only the store's paths, so any thread
//! may stage chunks in parallel; a [`super::ChunkBatch`] then adopts them
//! and makes them durable and visible together.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use edgeshift_common::Fingerprint;

use super::fs::{io_err, start_writeback};
use super::layout::StorePaths;
use super::StoreError;
use crate::diskio::DIRECT_ALIGN;

/// Set to `0` to write every chunk through the page cache (the old path,
/// kept for comparison and for file systems that mishandle O_DIRECT).
pub const DIRECT_WRITES_ENV: &str = "EDGESHIFT_DIRECT_WRITES";

/// A chunk in its own temp file; removed on drop unless a batch committed it.
pub struct StagedChunk {
    pub(super) file: File,
    pub(super) tmp: PathBuf,
    pub(super) fp: Fingerprint,
    pub(super) len: u64,
    /// False once committed (renamed into place).
    pub(super) pending: bool,
}

impl StagedChunk {
    /// Writes `data` (which the caller hashed to `fp`) to a new temp file.
    /// If `direct_ok`, bytes at a [`DIRECT_ALIGN`]ed address and of a whole
    /// number of blocks go straight to the disk (O_DIRECT: no copy into the page cache and no
    /// writeback to pay later); others, or where the file system refuses
    /// O_DIRECT, are written buffered and their writeback started at once.
    pub(super) fn write(
        paths: &StorePaths,
        fp: &Fingerprint,
        data: &[u8],
        direct_ok: bool,
    ) -> Result<Self, StoreError> {
        if fp.is_zero_chunk() {
            return Err(StoreError::ZeroChunk);
        }
        let tmp = paths.tmp_path("chunk");
        let aligned = direct_ok
            && (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
            && data.len().is_multiple_of(DIRECT_ALIGN)
            && !data.is_empty();
        let mut direct = aligned && direct_writes();
        let mut f = match open_new(&tmp, direct) {
            Ok(f) => f,
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                // The file may have been created before O_DIRECT was refused.
                let _ = fs::remove_file(&tmp);
                direct = false;
                open_new(&tmp, false).map_err(io_err("create", &tmp))?
            }
            Err(e) => return Err(io_err("create", &tmp)(e)),
        };
        let mut written = f.write_all(data);
        if direct && matches!(&written, Err(e) if e.raw_os_error() == Some(libc::EINVAL)) {
            // The device wants larger blocks than DIRECT_ALIGN: start over buffered.
            drop(f);
            let _ = fs::remove_file(&tmp);
            direct = false;
            f = open_new(&tmp, false).map_err(io_err("create", &tmp))?;
            written = f.write_all(data);
        }
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::Io {
                op: "write",
                path: tmp,
                source: e,
            });
        }
        if !direct {
            // Start writeback now, so the disk is busy while more chunks are
            // staged and the commit's fdatasync finds little left to do.
            start_writeback(&f);
        }
        Ok(StagedChunk {
            file: f,
            tmp,
            fp: *fp,
            len: data.len() as u64,
            pending: true,
        })
    }

    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fp
    }
}

impl Drop for StagedChunk {
    fn drop(&mut self) {
        if self.pending {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

fn open_new(path: &std::path::Path, direct: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.write(true).create_new(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

/// Whether aligned chunks are written with O_DIRECT (on unless
/// [`DIRECT_WRITES_ENV`] is `0`); read once per process.
fn direct_writes() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var(DIRECT_WRITES_ENV).map_or(true, |v| v != "0"))
}

#[cfg(test)]
mod tests {
    use crate::diskio::{AlignedBuf, DIRECT_ALIGN};
    use crate::store::{ChunkStore, LocalStore};
    use edgeshift_common::Fingerprint;

    /// Aligned chunks (O_DIRECT where the file system allows it, as in the
    /// fetch) and unaligned ones (buffered) stage, commit and read back the
    /// same; a staged chunk dropped unadopted leaves no temp file.
    #[test]
    fn aligned_and_unaligned_chunks_stage_commit_and_drop_cleanly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::open_or_create(dir.path()).expect("create");
        let mut aligned = AlignedBuf::new(4 * DIRECT_ALIGN);
        for (i, b) in aligned.as_mut_slice().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let whole = aligned.as_slice();
        let odd = &whole[1..3 * DIRECT_ALIGN + 7];
        let mut batch = store.batch();
        for data in [whole, odd] {
            let fp = Fingerprint::of(data);
            let staged = store.stage_chunk(&fp, data).expect("stage");
            assert_eq!(staged.fingerprint(), &fp);
            batch.adopt(staged);
            assert!(!store.has_chunk(&fp).expect("has"));
        }
        assert_eq!(batch.commit().expect("commit"), 2);
        for data in [whole, odd] {
            assert_eq!(store.get_chunk(&Fingerprint::of(data)).expect("get"), data);
        }
        let other = &whole[..2 * DIRECT_ALIGN];
        drop(store.stage_chunk(&Fingerprint::of(other), other).expect("stage"));
        let tmp = dir.path().join("tmp");
        assert_eq!(std::fs::read_dir(&tmp).expect("tmp dir").count(), 0);
        assert!(!store.has_chunk(&Fingerprint::of(other)).expect("has"));
    }
}
