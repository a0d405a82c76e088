//! An image written as its chunks arrive (`edgeshift fetch --out`, `vm
//! run`): the chunks the store already holds go into place at once, each
//! fetched chunk as soon as it is verified and stored, so no restore pass
//! follows the transfer. The file is written under a hidden temp name next
//! to its final path and renamed over it only once every chunk is in and
//! synced: a fetch that fails or is killed leaves no file at the final
//! path (a killed one may leave the hidden temp file, never an image that
//! looks whole). Zero chunks stay holes.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use edgeshift_common::{Fingerprint, Manifest, ManifestId};

use super::SlicerError;
use crate::store::{ChunkStore, LocalStore};

/// Threads writing chunks into place (reading a chunk back from the store
/// hashes it again: two keep up with a few hundred MB/s).
const WRITERS: usize = 2;

/// An image being written in place from a store; see the module docs.
pub struct ImageInPlace {
    out: PathBuf,
    tmp: PathBuf,
    file: Arc<File>,
    /// Fetched chunks go here once durable in the store (the writers stop
    /// at a `None` each, whoever else still holds a sender).
    sink: Sender<Option<Fingerprint>>,
    workers: Vec<JoinHandle<Result<u64, SlicerError>>>,
    /// Non-zero chunk indices the image has, each written once.
    indices: u64,
    finished: bool,
}

/// What each writer thread shares.
struct Shared {
    store: Arc<LocalStore>,
    manifest: Manifest,
    file: Arc<File>,
    tmp: PathBuf,
    id: ManifestId,
    /// Indices of each non-zero chunk.
    at: HashMap<Fingerprint, Vec<usize>>,
}

impl ImageInPlace {
    /// Starts image `id` (`manifest`) at `out`: a sized temp file beside it,
    /// and every chunk `store` holds now written into place in the
    /// background. The chunks it lacks must then come through [`Self::sink`].
    pub fn start(
        store: Arc<LocalStore>,
        id: ManifestId,
        manifest: Manifest,
        out: &Path,
    ) -> Result<Self, SlicerError> {
        if out.is_dir() {
            return Err(SlicerError::OutIsDirectory(out.to_path_buf()));
        }
        let dir = parent_of(out);
        let name = out
            .file_name()
            .ok_or_else(|| SlicerError::OutIsDirectory(out.to_path_buf()))?
            .to_string_lossy();
        let tmp = dir.join(format!(".{name}.edgeshift-fetch.{}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| SlicerError::io("create", &tmp, e))?;
        let file = Arc::new(file);
        let mut at: HashMap<Fingerprint, Vec<usize>> = HashMap::new();
        for (i, fp) in manifest.chunks.iter().enumerate() {
            if !fp.is_zero_chunk() {
                at.entry(*fp).or_default().push(i);
            }
        }
        let indices = at.values().map(|v| v.len() as u64).sum();
        let mut held = Vec::new();
        let mut seen = HashSet::new();
        for fp in &manifest.chunks {
            if !fp.is_zero_chunk() && seen.insert(*fp) && store.has_chunk(fp)? {
                held.push(*fp);
            }
        }
        // Sized up front: chunks never written (zero chunks) stay holes.
        let sized = file.set_len(manifest.image_size);
        let (tx, rx) = channel::<Option<Fingerprint>>();
        let mut me = ImageInPlace {
            out: out.to_path_buf(),
            tmp: tmp.clone(),
            file: Arc::clone(&file),
            sink: tx,
            workers: Vec::new(),
            indices,
            finished: false,
        };
        sized.map_err(|e| SlicerError::io("set length of", &tmp, e))?;
        let shared = Arc::new(Shared {
            store,
            manifest,
            file,
            tmp,
            id,
            at,
        });
        for fp in held {
            // The receiver is alive: it is in this function's hands.
            let _ = me.sink.send(Some(fp));
        }
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..WRITERS {
            let (shared, rx) = (Arc::clone(&shared), Arc::clone(&rx));
            me.workers
                .push(std::thread::spawn(move || write_loop(&shared, &rx)));
        }
        Ok(me)
    }

    /// Where a fetch reports each chunk it stored (the fetcher's
    /// `with_placement`).
    pub fn sink(&self) -> Sender<Option<Fingerprint>> {
        self.sink.clone()
    }

    /// Waits for every write, checks that every chunk was written, syncs and
    /// renames the image to its final path. Returns the chunk writes done.
    pub fn finish(mut self) -> Result<u64, SlicerError> {
        let written = self.join()?;
        if written != self.indices {
            return Err(SlicerError::Io {
                op: "complete",
                path: self.out.clone(),
                source: std::io::Error::other(format!(
                    "{written} of {} chunk places written: chunks are missing from the store",
                    self.indices
                )),
            });
        }
        self.file
            .sync_all()
            .map_err(|e| SlicerError::io("sync", &self.tmp, e))?;
        fs::rename(&self.tmp, &self.out).map_err(|e| SlicerError::io("rename into", &self.out, e))?;
        self.finished = true;
        let dir = parent_of(&self.out);
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| SlicerError::io("sync directory", &dir, e))?;
        Ok(written)
    }

    /// Stops the writers once the chunks named so far are in, and joins
    /// them: the writes they did, or the first error.
    fn join(&mut self) -> Result<u64, SlicerError> {
        for _ in &self.workers {
            let _ = self.sink.send(None);
        }
        let mut written = 0;
        let mut first_err = None;
        for w in self.workers.drain(..) {
            match w.join() {
                Ok(Ok(n)) => written += n,
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(SlicerError::WorkerPanicked);
                }
            }
        }
        first_err.map_or(Ok(written), Err)
    }
}

impl Drop for ImageInPlace {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.join();
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

fn parent_of(out: &Path) -> PathBuf {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes each chunk named on `rx` into all its places until told to stop
/// (or the sink is gone); returns the places written.
fn write_loop(shared: &Shared, rx: &Mutex<Receiver<Option<Fingerprint>>>) -> Result<u64, SlicerError> {
    let cs = shared.manifest.chunk_size.as_usize();
    let mut buf = vec![0u8; cs];
    let mut written = 0;
    loop {
        let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(Some(fp)) = next else { return Ok(written) };
        let Some(places) = shared.at.get(&fp) else {
            continue;
        };
        let first = places[0];
        let len = shared.manifest.chunk_len(first) as usize;
        // Read back (and so checked) from the store: the bytes that go in
        // are the verified ones.
        shared
            .store
            .read_chunk_into(&fp, &mut buf[..len])
            .map_err(|source| SlicerError::RestoreChunk {
                id: shared.id,
                index: first,
                offset: shared.manifest.chunk_offset(first),
                source: Box::new(source),
            })?;
        for &i in places {
            shared
                .file
                .write_all_at(&buf[..len], shared.manifest.chunk_offset(i))
                .map_err(|e| SlicerError::io("write", &shared.tmp, e))?;
            written += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeshift_common::ChunkSize;

    #[test]
    fn held_chunks_go_in_at_once_the_rest_as_reported_and_only_a_whole_image_is_renamed() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Arc::new(LocalStore::open_or_create(dir.path().join("store")).expect("store"));
        let cs = ChunkSize::new(4096).expect("size");
        let (a, b) = (vec![1u8; 4096], vec![2u8; 4096]);
        let (fa, fb) = (Fingerprint::of(&a), Fingerprint::of(&b));
        store.put_chunk(&fa, &a).expect("put");
        let m = Manifest::new(cs, 4 * 4096, vec![fa, Fingerprint::ZERO_CHUNK, fb, fa]);
        let id = store.put_manifest(&m).expect("manifest");
        let out = dir.path().join("image.raw");

        // `b` never comes: no image at `out`, and the temp file is gone.
        let place = ImageInPlace::start(store.clone(), id, m.clone(), &out).expect("start");
        assert!(place.finish().is_err(), "a chunk is missing");
        assert!(!out.exists());
        let left: Vec<_> = fs::read_dir(dir.path()).expect("ls").flatten().collect();
        assert_eq!(left.len(), 1, "only the store is left: {left:?}");

        // `b` arrives after the start: the image is whole and byte-exact.
        let place = ImageInPlace::start(store.clone(), id, m.clone(), &out).expect("start");
        store.put_chunk(&fb, &b).expect("put");
        place.sink().send(Some(fb)).expect("send");
        assert_eq!(place.finish().expect("finish"), 3);
        let mut want = a.clone();
        want.extend(vec![0u8; 4096]);
        want.extend(&b);
        want.extend(&a);
        assert_eq!(fs::read(&out).expect("read"), want);
    }
}
