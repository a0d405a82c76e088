//! `Verify`, in the switchover pause: is the image now exactly the
//! source's final manifest? The chunks sent last are read back from disk,
//! and every chunk the disk mirror wrote is hashed from it.

use edgeshift_common::{Fingerprint, Manifest};

use super::incoming::{io, Incoming};
use crate::migrate::MigrateError;
use crate::store::ChunkStore;
use crate::vm;

impl Incoming {
    /// `(true, detail)` when the image equals manifest `id` and every index
    /// in `recheck` reads back as expected; its manifest is stored then.
    pub(super) fn verify(
        &mut self,
        id: &Fingerprint,
        recheck: &[u32],
    ) -> Result<(bool, String), MigrateError> {
        self.writer.wait()?;
        let (mirrored, mirror_bytes) = self.settle_mirror()?;
        if self.mirror.is_none() {
            self.file.sync_all().map_err(io("sync", &self.image_path))?;
        } else {
            // Beside a mirror the pause holds no disk work: the image (as
            // every reader sees it already) is synced once the VM runs
            // here (`Finish`), the guest's own first flush syncing it too.
            crate::store::local::start_writeback(&self.file);
        }
        let mine = Manifest::new(self.chunk_size, self.image_size, self.current.clone());
        if mine.id() != *id {
            return Ok((
                false,
                format!(
                    "destination disk is manifest {}, source's is {}",
                    mine.id().to_hex(),
                    id.to_hex()
                ),
            ));
        }
        for &i in recheck {
            let i = i as usize;
            if i >= self.current.len() {
                return Err(MigrateError::Protocol(format!("chunk index {i} out of range")));
            }
            let data =
                vm::image::read_chunk(&self.file, &self.image_path, self.chunk_size, self.image_size, i)?;
            let fp = vm::image::fingerprint_chunk(&data);
            if fp != self.current[i] {
                return Ok((false, format!("chunk {i} reads back as {} on disk", fp.to_hex())));
            }
        }
        self.host.store.put_manifest(&mine)?;
        Ok((
            true,
            format!(
                "{} chunks match, {} re-read, {} written by the mirror ({} bytes)",
                self.current.len(),
                recheck.len(),
                mirrored,
                mirror_bytes
            ),
        ))
    }
}
