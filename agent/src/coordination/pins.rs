//! The local pin set: `STORE/pins/<manifest id>` marks a manifest this edge
//! must keep whole (the image of a VM that runs here, or one being fetched
//! for a migration). The agent checks a GC order against it right before it
//! deletes, holding `STORE/pins/.lock`; pinning takes the same lock, so a
//! pin made while GC runs either is seen by it or comes after its deletes
//! (and the fetch that made it then sees the chunk missing and fetches it).

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use edgeshift_common::{Fingerprint, ManifestId};

use super::CoordError;
use crate::store::{ChunkStore, LocalStore, StoreError};

const LOCK_FILE: &str = ".lock";

#[derive(Debug, Clone)]
pub struct LocalPins {
    dir: PathBuf,
}

/// An exclusive `flock` on the pin set; released on drop.
pub struct PinLock {
    file: File,
}

impl Drop for PinLock {
    fn drop(&mut self) {
        // SAFETY: the fd belongs to `self.file`, which is open until after this call.
        unsafe {
            libc::flock(self.file.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

fn pins_err(path: &Path) -> impl FnOnce(std::io::Error) -> CoordError + '_ {
    move |source| CoordError::Pins {
        path: path.to_path_buf(),
        source,
    }
}

/// What a GC order came to after the local check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcOutcome {
    pub removed: Vec<Fingerprint>,
    /// Named by the coordinator but pinned here: kept.
    pub kept_pinned: Vec<Fingerprint>,
    /// Named but not in the store any more.
    pub absent: Vec<Fingerprint>,
}

impl LocalPins {
    pub fn for_store(store: &LocalStore) -> Result<Self, CoordError> {
        let dir = store.root().join("pins");
        fs::create_dir_all(&dir).map_err(pins_err(&dir))?;
        Ok(LocalPins { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the pin-set lock (blocks while another process holds it).
    pub fn lock(&self) -> Result<PinLock, CoordError> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(pins_err(&path))?;
        // SAFETY: flock on an fd we own and keep open for the lock's life.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(CoordError::Pins {
                path,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(PinLock { file })
    }

    /// Pins a manifest (idempotent); true when it was not pinned before.
    /// `why` is kept in the file for operators.
    pub fn pin(&self, id: &ManifestId, why: &str) -> Result<bool, CoordError> {
        let _lock = self.lock()?;
        let path = self.dir.join(id.to_hex());
        let fresh = !path.exists();
        fs::write(&path, format!("{why}\n")).map_err(pins_err(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(pins_err(&self.dir))?;
        Ok(fresh)
    }

    /// Removes a pin; false when it was not pinned.
    pub fn unpin(&self, id: &ManifestId) -> Result<bool, CoordError> {
        let _lock = self.lock()?;
        let path = self.dir.join(id.to_hex());
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(CoordError::Pins { path, source: e }),
        }
    }

    pub fn list(&self) -> Result<Vec<ManifestId>, CoordError> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(pins_err(&self.dir))? {
            let e = e.map_err(pins_err(&self.dir))?;
            if let Some(id) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.push(id);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every chunk of every pinned manifest. A pinned manifest missing from
    /// the store is an error: GC cannot know what it protects.
    pub fn pinned_chunks(&self, store: &LocalStore) -> Result<HashSet<Fingerprint>, CoordError> {
        let mut out = HashSet::new();
        for id in self.list()? {
            let m = match store.get_manifest(&id) {
                Ok(m) => m,
                Err(StoreError::ManifestMissing(_)) => return Err(CoordError::PinnedManifestMissing(id)),
                Err(e) => return Err(e.into()),
            };
            out.extend(m.chunks.into_iter().filter(|f| !f.is_zero_chunk()));
        }
        Ok(out)
    }

    /// Carries out a GC order: under the lock, re-reads the pins and deletes
    /// only chunks no pinned manifest uses and `busy` does not name (chunks
    /// this process is fetching or serving right now).
    pub fn collect(
        &self,
        store: &LocalStore,
        order: &[Fingerprint],
        busy: &HashSet<Fingerprint>,
    ) -> Result<GcOutcome, CoordError> {
        let _lock = self.lock()?;
        let pinned = self.pinned_chunks(store)?;
        let mut out = GcOutcome::default();
        for fp in order {
            if pinned.contains(fp) || busy.contains(fp) {
                out.kept_pinned.push(*fp);
                continue;
            }
            if store.remove_chunk(fp)? {
                out.removed.push(*fp);
            } else {
                out.absent.push(*fp);
            }
        }
        if !out.kept_pinned.is_empty() {
            tracing::warn!(
                kept = out.kept_pinned.len(),
                "GC order named locally pinned or busy chunks; kept them"
            );
        }
        metrics::counter!("edgeshift_gc_removed_chunks_total").increment(out.removed.len() as u64);
        metrics::counter!("edgeshift_gc_refused_chunks_total").increment(out.kept_pinned.len() as u64);
        Ok(out)
    }
}

/// True if `store` still has every non-zero chunk of manifest `id`.
pub fn manifest_complete(store: &LocalStore, id: &ManifestId) -> Result<bool, CoordError> {
    let m = store.get_manifest(id)?;
    for fp in m.chunks.iter().filter(|f| !f.is_zero_chunk()) {
        if !store.has_chunk(fp)? {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeshift_common::{ChunkSize, Manifest};

    #[test]
    fn gc_keeps_pinned_and_busy_chunks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::open_or_create(dir.path().join("s")).expect("store");
        let datas: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i + 1; 4096]).collect();
        let fps: Vec<Fingerprint> = datas.iter().map(|d| Fingerprint::of(d)).collect();
        for (f, d) in fps.iter().zip(&datas) {
            store.put_chunk(f, d).expect("put");
        }
        let m = Manifest::new(ChunkSize::new(4096).expect("cs"), 4096, vec![fps[0]]);
        let id = store.put_manifest(&m).expect("manifest");
        let pins = LocalPins::for_store(&store).expect("pins");
        pins.pin(&id, "test").expect("pin");
        assert_eq!(pins.list().expect("list"), vec![id]);
        let busy: HashSet<_> = [fps[1]].into();
        let ghost = Fingerprint::of(b"ghost");
        let out = pins
            .collect(&store, &[fps[0], fps[1], fps[2], ghost], &busy)
            .expect("gc");
        assert_eq!(out.removed, vec![fps[2]]);
        assert_eq!(out.kept_pinned, vec![fps[0], fps[1]]);
        assert_eq!(out.absent, vec![ghost]);
        assert!(store.has_chunk(&fps[0]).expect("has"));
        assert!(manifest_complete(&store, &id).expect("complete"));
        assert!(pins.unpin(&id).expect("unpin"));
        assert!(!pins.unpin(&id).expect("unpin"));
        let out = pins.collect(&store, &[fps[0]], &HashSet::new()).expect("gc");
        assert_eq!(out.removed, vec![fps[0]]);
    }

    #[test]
    fn a_pin_without_its_manifest_stops_gc() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::open_or_create(dir.path().join("s")).expect("store");
        let pins = LocalPins::for_store(&store).expect("pins");
        let id = Fingerprint::of(b"not here");
        pins.pin(&id, "test").expect("pin");
        assert!(matches!(
            pins.collect(&store, &[Fingerprint::of(b"x")], &HashSet::new()),
            Err(CoordError::PinnedManifestMissing(_))
        ));
    }
}
