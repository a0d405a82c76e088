//! A chunk store in a directory on this edge ([`super::layout`] has the
//! layout).
//!
//! A chunk is written to `tmp/`, synced, then renamed into place and its
//! directory synced: a chunk file under `chunks/` is always whole and
//! durable, and a crash leaves at most a stray temp file, which the next open
//! removes ([`super::recover`]). (Chunks published before they are synced,
//! [`LocalStore::publish`], are named in `DIR/unsynced/` first; the next open
//! checks them.)

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use edgeshift_common::{Fingerprint, Manifest, ManifestId};

use super::fs::{io_err, sync_dir};
use super::layout::{StorePaths, MARKER_TEXT, MARKER_TMP_PREFIX, STORE_LAYOUT_DIRS, STORE_MARKER};
use super::recover::{clean_tmp, recover_unsynced};
use super::staged::StagedChunk;
use super::{ChunkStore, PutOutcome, StoreError, StoreStats};
// Where callers have always found them.
pub use super::batch::{ChunkBatch, BATCH_MAX_BYTES, BATCH_MAX_FILES};
pub use super::fs::start_writeback;

/// A chunk store rooted at a directory.
#[derive(Debug)]
pub struct LocalStore {
    paths: StorePaths,
    /// Syncs of chunks published unsynced ([`LocalStore::publish_sync_later`]),
    /// waited for on drop.
    pub(super) syncing: std::sync::Mutex<Vec<std::thread::JoinHandle<Result<(), StoreError>>>>,
}

impl LocalStore {
    /// Opens an existing store; a missing directory or one without the marker
    /// is an error (so a typo never silently creates an empty store).
    pub fn open(root: impl AsRef<Path>) -> Result<Self, StoreError> {
        let root = root.as_ref().to_path_buf();
        if !root.exists() {
            return Err(StoreError::Missing(root));
        }
        if !root.join(STORE_MARKER).is_file() {
            return Err(StoreError::NotAStore(root));
        }
        let paths = StorePaths::new(root);
        clean_tmp(&paths)?;
        recover_unsynced(&paths)?;
        Ok(LocalStore {
            paths,
            syncing: Default::default(),
        })
    }

    /// Opens the store at `root`, creating it (and its directory) if absent.
    /// An existing non-empty directory that is not a store is refused.
    pub fn open_or_create(root: impl AsRef<Path>) -> Result<Self, StoreError> {
        let root = root.as_ref().to_path_buf();
        if root.join(STORE_MARKER).is_file() {
            return Self::open(root);
        }
        if root.exists() {
            // Only the layout's own names may be there: another process (an
            // agent and a VM host started together) may be creating the same
            // store right now, and both must succeed.
            let entries = fs::read_dir(&root).map_err(io_err("read directory", &root))?;
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                let ours = STORE_LAYOUT_DIRS.contains(&name.as_ref())
                    || name == STORE_MARKER
                    || name.starts_with(MARKER_TMP_PREFIX);
                if !ours {
                    return Err(StoreError::NotAStore(root));
                }
            }
        }
        for sub in STORE_LAYOUT_DIRS {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err("create directory", &p))?;
        }
        // The marker appears atomically (rename), so a concurrent opener sees
        // either no store yet or a whole one.
        let marker = root.join(STORE_MARKER);
        static CREATORS: AtomicU64 = AtomicU64::new(0);
        let creator = CREATORS.fetch_add(1, Ordering::Relaxed);
        let marker_tmp = root.join(format!("{MARKER_TMP_PREFIX}{}.{creator}", std::process::id()));
        fs::write(&marker_tmp, MARKER_TEXT).map_err(io_err("write", &marker_tmp))?;
        fs::rename(&marker_tmp, &marker).map_err(io_err("rename into", &marker))?;
        sync_dir(&root)?;
        Self::open(root)
    }

    pub fn root(&self) -> &Path {
        self.paths.root()
    }

    /// Where chunk `fp` lives (whether or not it is there). The transfer sends
    /// chunk payloads straight from this file.
    pub fn chunk_path(&self, fp: &Fingerprint) -> PathBuf {
        self.paths.chunk_path(fp)
    }

    pub fn manifest_path(&self, id: &ManifestId) -> PathBuf {
        self.paths.manifest_path(id)
    }

    /// Directory for writes in progress; files there are never read as chunks.
    pub fn tmp_dir(&self) -> PathBuf {
        self.paths.tmp_dir()
    }

    /// A fresh temp file path under `tmp/`, unique within this process.
    pub fn tmp_path(&self, tag: &str) -> PathBuf {
        self.paths.tmp_path(tag)
    }

    /// Moves a whole, synced temp file into place as chunk `fp`.
    /// The caller guarantees the file holds bytes that hash to `fp` and has
    /// synced it.
    pub fn commit_tmp_chunk(&self, tmp: &Path, fp: &Fingerprint) -> Result<PutOutcome, StoreError> {
        let dest = self.chunk_path(fp);
        if dest.exists() {
            let _ = fs::remove_file(tmp);
            return Ok(PutOutcome::AlreadyPresent);
        }
        let dir = dest.parent().unwrap_or(self.root()).to_path_buf();
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
            sync_dir(&self.paths.chunks_dir())?;
        }
        fs::rename(tmp, &dest).map_err(io_err("rename into", &dest))?;
        sync_dir(&dir)?;
        Ok(PutOutcome::Stored)
    }

    /// Writes `data` to a temp file and syncs it; returns the temp path.
    fn write_tmp(&self, tag: &str, data: &[u8]) -> Result<PathBuf, StoreError> {
        let tmp = self.tmp_path(tag);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        f.write_all(data).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("sync", &tmp))?;
        Ok(tmp)
    }

    /// Deletes a chunk (on the coordinator's word; pin checks are the caller's).
    pub fn remove_chunk(&self, fp: &Fingerprint) -> Result<bool, StoreError> {
        let p = self.chunk_path(fp);
        match fs::remove_file(&p) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::Io {
                op: "remove",
                path: p,
                source: e,
            }),
        }
    }

    /// Opens chunk `fp`'s file at `p` (its [`Self::chunk_path`]); a missing
    /// file is [`StoreError::ChunkMissing`].
    fn open_chunk(&self, fp: &Fingerprint, p: &Path) -> Result<File, StoreError> {
        match File::open(p) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(StoreError::ChunkMissing(*fp)),
            Err(e) => Err(StoreError::Io {
                op: "open",
                path: p.to_path_buf(),
                source: e,
            }),
        }
    }

    /// Reads chunk `fp` into `buf`, which must be exactly the chunk's length
    /// (the manifest knows it), and checks its fingerprint. A chunk whose
    /// length or bytes are wrong is reported as [`StoreError::ChunkInvalid`]
    /// and `buf` must then not be used. No allocation on the good path.
    pub fn read_chunk_into(&self, fp: &Fingerprint, buf: &mut [u8]) -> Result<(), StoreError> {
        let p = self.chunk_path(fp);
        let mut f = self.open_chunk(fp, &p)?;
        let len = f.metadata().map_err(io_err("stat", &p))?.len();
        if len == buf.len() as u64 {
            f.read_exact(buf).map_err(io_err("read", &p))?;
            if Fingerprint::of(buf) == *fp {
                return Ok(());
            }
        }
        // Slow path, only for a bad chunk: name what its bytes really hash to.
        let bytes = fs::read(&p).map_err(io_err("read", &p))?;
        metrics::counter!("edgeshift_store_corrupt_chunks_total").increment(1);
        Err(StoreError::ChunkInvalid {
            fp: *fp,
            actual: Fingerprint::of(&bytes),
        })
    }

    /// Byte length of stored chunk `fp`, or `None` if it is absent.
    pub fn chunk_len(&self, fp: &Fingerprint) -> Result<Option<u64>, StoreError> {
        let p = self.chunk_path(fp);
        match fs::metadata(&p) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Io {
                op: "stat",
                path: p,
                source: e,
            }),
        }
    }

    /// Re-hashes every chunk file and returns the ones whose bytes do not
    /// match their name (an fsck; a healthy store returns an empty list).
    pub fn verify_all_chunks(&self) -> Result<Vec<Fingerprint>, StoreError> {
        let mut bad = Vec::new();
        for fp in self.list_chunks()? {
            let p = self.chunk_path(&fp);
            let bytes = fs::read(&p).map_err(io_err("read", &p))?;
            if Fingerprint::of(&bytes) != fp {
                bad.push(fp);
            }
        }
        Ok(bad)
    }

    /// Starts a batch of chunk writes that become durable and visible
    /// together (see [`ChunkBatch`]).
    pub fn batch(&self) -> ChunkBatch<'_> {
        ChunkBatch::new(&self.paths)
    }

    /// Writes `data` (hashed by the caller to `fp`) to a temp file of this
    /// store, from any thread, for a [`ChunkBatch`] to adopt and commit.
    /// Page-aligned whole blocks (an [`crate::diskio::AlignedBuf`]) are
    /// written with O_DIRECT where the file system takes it.
    pub fn stage_chunk(&self, fp: &Fingerprint, data: &[u8]) -> Result<StagedChunk, StoreError> {
        StagedChunk::write(&self.paths, fp, data, true)
    }

    /// Every chunk fingerprint in the store (directory walk).
    pub fn list_chunks(&self) -> Result<Vec<Fingerprint>, StoreError> {
        let mut out = Vec::new();
        self.walk_chunks(|fp, _| out.push(fp))?;
        Ok(out)
    }

    fn walk_chunks(&self, mut f: impl FnMut(Fingerprint, u64)) -> Result<(), StoreError> {
        let chunks = self.paths.chunks_dir();
        for fan in fs::read_dir(&chunks)
            .map_err(io_err("read directory", &chunks))?
            .flatten()
        {
            let fan_path = fan.path();
            let Ok(entries) = fs::read_dir(&fan_path) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name();
                if let Some(fp) = name.to_str().and_then(|s| s.parse::<Fingerprint>().ok()) {
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    f(fp, len);
                }
            }
        }
        Ok(())
    }
}

impl ChunkStore for LocalStore {
    fn has_chunk(&self, fp: &Fingerprint) -> Result<bool, StoreError> {
        Ok(self.chunk_path(fp).is_file())
    }

    fn get_chunk(&self, fp: &Fingerprint) -> Result<Vec<u8>, StoreError> {
        let p = self.chunk_path(fp);
        let mut f = self.open_chunk(fp, &p)?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).map_err(io_err("read", &p))?;
        let actual = Fingerprint::of(&buf);
        if actual != *fp {
            metrics::counter!("edgeshift_store_corrupt_chunks_total").increment(1);
            return Err(StoreError::ChunkInvalid { fp: *fp, actual });
        }
        Ok(buf)
    }

    fn put_chunk(&self, fp: &Fingerprint, data: &[u8]) -> Result<PutOutcome, StoreError> {
        if fp.is_zero_chunk() {
            return Err(StoreError::ZeroChunk);
        }
        if self.has_chunk(fp)? {
            return Ok(PutOutcome::AlreadyPresent);
        }
        let tmp = self.write_tmp("chunk", data)?;
        self.commit_tmp_chunk(&tmp, fp)
    }

    fn get_manifest(&self, id: &ManifestId) -> Result<Manifest, StoreError> {
        let p = self.manifest_path(id);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(StoreError::ManifestMissing(*id)),
            Err(e) => {
                return Err(StoreError::Io {
                    op: "read",
                    path: p,
                    source: e,
                })
            }
        };
        Manifest::from_bytes_checked(&bytes, id)
            .map_err(|source| StoreError::ManifestInvalid { id: *id, source })
    }

    fn put_manifest(&self, manifest: &Manifest) -> Result<ManifestId, StoreError> {
        let bytes = manifest.to_bytes();
        let id = Fingerprint::of(&bytes);
        let dest = self.manifest_path(&id);
        if dest.is_file() {
            return Ok(id);
        }
        let tmp = self.write_tmp("manifest", &bytes)?;
        fs::rename(&tmp, &dest).map_err(io_err("rename into", &dest))?;
        sync_dir(&self.paths.manifests_dir())?;
        Ok(id)
    }

    fn list_manifests(&self) -> Result<Vec<ManifestId>, StoreError> {
        let dir = self.paths.manifests_dir();
        let mut out = Vec::new();
        for e in fs::read_dir(&dir)
            .map_err(io_err("read directory", &dir))?
            .flatten()
        {
            if let Some(id) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.push(id);
            }
        }
        out.sort();
        Ok(out)
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        let mut s = StoreStats::default();
        self.walk_chunks(|_, len| {
            s.chunks += 1;
            s.chunk_bytes += len;
        })?;
        s.manifests = self.list_manifests()?.len() as u64;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeshift_common::ChunkSize;

    #[test]
    fn put_get_and_verify() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::open_or_create(dir.path().join("s")).expect("create");
        let data = b"hello chunk".to_vec();
        let fp = Fingerprint::of(&data);
        assert_eq!(store.put_chunk(&fp, &data).expect("put"), PutOutcome::Stored);
        assert_eq!(
            store.put_chunk(&fp, &data).expect("put"),
            PutOutcome::AlreadyPresent
        );
        assert_eq!(store.get_chunk(&fp).expect("get"), data);
        let wrong = Fingerprint::of(b"other");
        assert!(matches!(
            store.put_chunk_verified(&wrong, &data),
            Err(StoreError::ChunkRejected { .. })
        ));
        assert!(matches!(
            store.get_chunk(&wrong),
            Err(StoreError::ChunkMissing(_))
        ));

        // A flipped byte on disk is reported by name, never returned.
        let p = store.chunk_path(&fp);
        let mut bytes = fs::read(&p).expect("read");
        bytes[0] ^= 0xff;
        fs::write(&p, bytes).expect("write");
        match store.get_chunk(&fp) {
            Err(StoreError::ChunkInvalid { fp: named, .. }) => assert_eq!(named, fp),
            other => panic!("expected ChunkInvalid, got {other:?}"),
        }
    }

    #[test]
    fn manifests_and_stats() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::open_or_create(dir.path()).expect("create");
        let a = Fingerprint::of(b"a");
        store.put_chunk(&a, b"a").expect("put");
        let m = Manifest::new(ChunkSize::new(4096).expect("cs"), 10, vec![a]);
        let id = store.put_manifest(&m).expect("put manifest");
        assert_eq!(store.get_manifest(&id).expect("get"), m);
        assert_eq!(
            store.stats().expect("stats"),
            StoreStats {
                chunks: 1,
                chunk_bytes: 1,
                manifests: 1
            }
        );
        assert!(matches!(
            LocalStore::open(dir.path().join("nope")),
            Err(StoreError::Missing(_))
        ));
    }

    #[test]
    fn batch_commits_visibly_and_drop_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::open_or_create(dir.path()).expect("create");
        let blobs: Vec<Vec<u8>> = (0..300u32).map(|i| format!("chunk {i}").into_bytes()).collect();
        let mut batch = store.batch();
        for b in &blobs[..200] {
            batch.stage(&Fingerprint::of(b), b).expect("stage");
            // Staged is not visible.
            assert!(!store.has_chunk(&Fingerprint::of(b)).expect("has"));
        }
        assert!(batch.stage(&Fingerprint::ZERO_CHUNK, b"").is_err());
        assert_eq!(batch.commit().expect("commit"), 200);
        for b in &blobs[..200] {
            assert_eq!(store.get_chunk(&Fingerprint::of(b)).expect("get"), *b);
        }
        // A batch dropped before its commit (an error mid-slice) leaves no
        // chunk and no temp file.
        let mut batch = store.batch();
        for b in &blobs[200..] {
            batch.stage(&Fingerprint::of(b), b).expect("stage");
        }
        drop(batch);
        assert_eq!(store.stats().expect("stats").chunks, 200);
        assert_eq!(fs::read_dir(store.tmp_dir()).expect("tmp").count(), 0);
        // read_chunk_into checks length and bytes.
        let fp = Fingerprint::of(&blobs[0]);
        let mut buf = vec![0u8; blobs[0].len()];
        store.read_chunk_into(&fp, &mut buf).expect("read");
        assert_eq!(buf, blobs[0]);
        let mut short = vec![0u8; blobs[0].len() - 1];
        assert!(matches!(
            store.read_chunk_into(&fp, &mut short),
            Err(StoreError::ChunkInvalid { .. })
        ));
    }

    #[test]
    fn concurrent_creation_of_one_store_succeeds_everywhere() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("s");
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let root = root.clone();
                std::thread::spawn(move || LocalStore::open_or_create(&root).map(|_| ()))
            })
            .collect();
        for h in handles {
            h.join().expect("thread").expect("every creator opens the store");
        }
        // A directory holding anything else is still refused.
        let other = dir.path().join("other");
        fs::create_dir_all(&other).expect("mkdir");
        fs::write(other.join("notes.txt"), b"x").expect("write");
        assert!(matches!(
            LocalStore::open_or_create(&other),
            Err(StoreError::NotAStore(_))
        ));
    }

    #[test]
    fn stray_temp_files_are_cleaned_and_never_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::open_or_create(dir.path()).expect("create");
        // A writer killed mid-chunk leaves a temp file owned by a dead pid.
        let stray = store.tmp_dir().join("chunk.999999999.0");
        fs::write(&stray, b"torn").expect("write");
        drop(store);
        let store = LocalStore::open(dir.path()).expect("reopen");
        assert!(!stray.exists());
        assert_eq!(store.stats().expect("stats").chunks, 0);
    }
}
