//! Chunks visible now, durable a little later: [`LocalStore::publish`].
//!
//! A migration's source reads the chunks its VM wrote since boot and must
//! serve them to the destination at once; syncing them first (the store's
//! usual rule) keeps the source's path idle for as long as the sync takes
//! (docs/wire.md, "The disk path", has the figures). Publishing renames
//! the chunks into place unsynced and syncs them on another thread.
//!
//! The store's promise, that a chunk file under its name is whole, still
//! holds for every opener: before any chunk is renamed, an intent file under
//! `DIR/unsynced/` naming them is written and synced. It is removed once the
//! chunks are durable. [`LocalStore::open`] re-hashes the chunks an orphaned
//! intent names (its writer died before they were synced, perhaps in a power
//! cut) and removes those that are torn ([`super::recover`]). A reader meanwhile checks each chunk
//! against its name anyway (`ChunkInvalid`).

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use edgeshift_common::Fingerprint;

use super::fs::{io_err, sync_all_parallel, sync_dir};
use super::layout::writer_alive;
use super::local::LocalStore;
use super::StoreError;
// Where callers have always found it.
pub use super::layout::UNSYNCED_DIR;

/// Chunks published but not yet durable. [`Unsynced::sync`] makes them so
/// (on any thread); dropping it without syncing leaves the intent file, and
/// the next open checks those chunks.
#[derive(Debug)]
#[must_use = "published chunks are not durable until synced"]
pub struct Unsynced {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    intent: Option<PathBuf>,
    chunks: usize,
}

impl Drop for LocalStore {
    fn drop(&mut self) {
        if let Err(e) = self.wait_synced() {
            // The intent stays: the next open checks those chunks.
            tracing::warn!(error = %e, store = %self.root().display(), "published chunks not synced");
        }
    }
}

impl Unsynced {
    /// How many chunks this publish stored.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// Syncs the published chunks' data and directories, then drops the
    /// intent. On an error the intent stays, so the next open checks them.
    pub fn sync(mut self) -> Result<(), StoreError> {
        let Some(intent) = self.intent.take() else {
            return Ok(());
        };
        let mut open = Vec::with_capacity(self.files.len() + self.dirs.len());
        for p in self.files.iter().chain(&self.dirs) {
            match File::open(p) {
                Ok(f) => open.push(f),
                // Removed since (the coordinator's GC): nothing to sync.
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("open", p)(e)),
            }
        }
        let files: Vec<&File> = open.iter().collect();
        sync_all_parallel(&files, false, &intent)?;
        fs::remove_file(&intent).map_err(io_err("remove", &intent))?;
        Ok(())
    }
}

/// One chunk of a publish: where it is written, where it goes, its bytes.
struct Placement<D> {
    fp: Fingerprint,
    tmp: PathBuf,
    dest: PathBuf,
    data: D,
}

impl LocalStore {
    /// Stores `chunks` (bytes the caller hashed to their fingerprints; the
    /// zero chunk and chunks present already are skipped) visible at once,
    /// durable once the returned [`Unsynced`] is synced.
    pub fn publish(&self, chunks: &[(Fingerprint, &[u8])]) -> Result<Unsynced, StoreError> {
        let (intent, todo) = self.begin_publish(chunks.iter().copied())?;
        match place_all(self.root(), intent, todo) {
            (u, Ok(())) => Ok(u),
            (u, Err(e)) => {
                // What was placed is made durable; the failure is the answer.
                if let Err(se) = u.sync() {
                    tracing::warn!(error = %se, "chunks placed before a failed publish not synced");
                }
                Err(e)
            }
        }
    }

    /// [`LocalStore::publish`] with the chunks placed and synced on a thread
    /// of their own: returns once the intent naming them is durable, and
    /// the store's chunk server waits for a chunk being placed
    /// ([`LocalStore::being_published`]). Returns how many chunks will be
    /// stored. [`LocalStore::wait_synced`] (or dropping the store) waits
    /// for the thread.
    pub fn publish_sync_later(&self, chunks: Vec<(Fingerprint, Vec<u8>)>) -> Result<usize, StoreError> {
        let (intent, todo) = self.begin_publish(chunks)?;
        let n = todo.len();
        let Some(intent) = intent else {
            return Ok(0);
        };
        let root = self.root().to_path_buf();
        // Without a thread the intent stays, and the next open checks them.
        let h = std::thread::Builder::new()
            .name("store-publish".into())
            .spawn(move || {
                let t = std::time::Instant::now();
                let (u, placed) = place_all(&root, Some(intent), todo);
                let placed_s = t.elapsed().as_secs_f64();
                u.sync()?;
                tracing::debug!(
                    chunks = n,
                    placed_s,
                    synced_s = t.elapsed().as_secs_f64(),
                    "published chunks placed and synced"
                );
                placed
            })
            .map_err(io_err("start a publishing thread for", self.root()))?;
        self.syncing.lock().unwrap_or_else(|e| e.into_inner()).push(h);
        Ok(n)
    }

    /// Whether a publish in progress (its writer alive) names chunk `fp`:
    /// it is about to appear.
    pub fn being_published(&self, fp: &Fingerprint) -> bool {
        self.being_published_set().contains(fp)
    }

    /// Every chunk that publishes in progress (their writers alive) name.
    pub fn being_published_set(&self) -> std::collections::HashSet<Fingerprint> {
        let dir = self.root().join(UNSYNCED_DIR);
        let Ok(entries) = fs::read_dir(&dir) else {
            return Default::default();
        };
        entries
            .flatten()
            .filter(|e| writer_alive(&e.file_name().to_string_lossy()))
            .filter_map(|e| fs::read_to_string(e.path()).ok())
            .flat_map(|t| {
                t.lines()
                    .filter_map(|l| l.parse().ok())
                    .collect::<Vec<Fingerprint>>()
            })
            .collect()
    }

    /// Dedups `chunks`, drops the zero chunk and chunks present already,
    /// and makes an intent naming the rest durable (synced while little else
    /// is dirty, so the sync is short): before any of them can be.
    fn begin_publish<D>(
        &self,
        chunks: impl IntoIterator<Item = (Fingerprint, D)>,
    ) -> Result<(Option<PathBuf>, Vec<Placement<D>>), StoreError> {
        let mut seen = std::collections::HashSet::new();
        let mut todo = Vec::new();
        for (fp, data) in chunks {
            let dest = self.chunk_path(&fp);
            if !fp.is_zero_chunk() && seen.insert(fp) && !dest.exists() {
                let tmp = self.tmp_path("chunk");
                todo.push(Placement { fp, tmp, dest, data });
            }
        }
        if todo.is_empty() {
            return Ok((None, todo));
        }
        let dir = self.root().join(UNSYNCED_DIR);
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        let intent = dir.join(
            self.tmp_path("publish")
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_default(),
        );
        write_intent(&intent, todo.iter().map(|p| &p.fp))?;
        Ok((Some(intent), todo))
    }

    /// Waits for every sync [`LocalStore::publish_sync_later`] started;
    /// the first error, if any.
    pub fn wait_synced(&self) -> Result<(), StoreError> {
        let handles = std::mem::take(&mut *self.syncing.lock().unwrap_or_else(|e| e.into_inner()));
        let mut first = Ok(());
        for h in handles {
            let r = h.join().unwrap_or_else(|_| {
                Err(io_err("sync", &self.root().join(UNSYNCED_DIR))(
                    std::io::Error::other("sync thread panicked"),
                ))
            });
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// Writes each chunk to its temp file and renames it into place, unsynced,
/// on a few threads (the copies into the page cache dominate). Returns what
/// was placed, and the first failure: then the intent is rewritten to name
/// only the chunks placed (the chunk server waits for a chunk an intent
/// names, so one that will never come must not stay named).
fn place_all<D: AsRef<[u8]> + Sync>(
    root: &Path,
    intent: Option<PathBuf>,
    todo: Vec<Placement<D>>,
) -> (Unsynced, Result<(), StoreError>) {
    let mut out = Unsynced {
        files: Vec::new(),
        dirs: Vec::new(),
        intent,
        chunks: 0,
    };
    if todo.is_empty() {
        return (out, Ok(()));
    }
    // In the caller's order overall (map_in_parts interleaves its threads):
    // the chunk server waits for a chunk named but not yet placed.
    let results: Vec<Result<bool, StoreError>> = crate::par::map_in_parts(&todo, 4, 16, place)
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(io_err("publish", root)(std::io::Error::other(
                    "writer thread panicked",
                )))
            })
        })
        .collect();
    let mut failed = None;
    let mut placed = Vec::new();
    for (p, r) in todo.iter().zip(results) {
        match r {
            Ok(made_fan) => {
                if made_fan {
                    push_new(&mut out.dirs, root.join("chunks"));
                }
                if let Some(fan) = p.dest.parent() {
                    push_new(&mut out.dirs, fan.to_path_buf());
                }
                out.files.push(p.dest.clone());
                out.chunks += 1;
                placed.push(p.fp);
            }
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    let Some(e) = failed else {
        return (out, Ok(()));
    };
    if let Some(intent) = &out.intent {
        if let Err(re) = write_intent(intent, &placed) {
            tracing::warn!(error = %re, "the intent of a failed publish still names chunks never placed");
        }
    }
    (out, Err(e))
}

/// Makes the intent at `path` name `fps`, durably and atomically (a new
/// file, synced, renamed over it, its directory synced): a publish's first
/// intent, and the narrower one of a publish that failed part way.
fn write_intent<'a>(path: &Path, fps: impl IntoIterator<Item = &'a Fingerprint>) -> Result<(), StoreError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let text: String = fps.into_iter().map(|f| format!("{}\n", f.to_hex())).collect();
    let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
    f.write_all(text.as_bytes()).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("sync", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("rename into", path))?;
    sync_dir(path.parent().unwrap_or(path))
}

/// Writes one chunk to its temp file and renames it into place, unsynced;
/// true if its fan-out directory was made now.
fn place<D: AsRef<[u8]>>(p: &Placement<D>) -> Result<bool, StoreError> {
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p.tmp)
        .and_then(|mut f| f.write_all(p.data.as_ref()));
    if let Err(e) = written {
        let _ = fs::remove_file(&p.tmp);
        return Err(io_err("write", &p.tmp)(e));
    }
    let fan = p.dest.parent().unwrap_or(&p.dest);
    let made_fan = !fan.exists();
    if made_fan {
        fs::create_dir_all(fan).map_err(io_err("create directory", fan))?;
    }
    fs::rename(&p.tmp, &p.dest).map_err(io_err("rename into", &p.dest))?;
    Ok(made_fan)
}

fn push_new(v: &mut Vec<PathBuf>, p: PathBuf) {
    if !v.contains(&p) {
        v.push(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ChunkStore;

    fn store() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = LocalStore::open_or_create(dir.path().join("s")).expect("store");
        (dir, s)
    }

    #[test]
    fn published_chunks_are_readable_at_once_and_the_intent_goes_after_sync() {
        let (_d, s) = store();
        let a = vec![1u8; 4096];
        let b = vec![2u8; 4096];
        let (fa, fb) = (Fingerprint::of(&a), Fingerprint::of(&b));
        // b twice and the hole marker: b stored once, the hole never.
        let u = s
            .publish(&[(fa, &a), (fb, &b), (fb, &b), (Fingerprint::ZERO_CHUNK, &[][..])])
            .expect("publish");
        assert_eq!(u.chunks(), 2);
        assert_eq!(s.get_chunk(&fa).expect("a"), a);
        assert_eq!(s.get_chunk(&fb).expect("b"), b);
        let intents = || fs::read_dir(s.root().join(UNSYNCED_DIR)).expect("dir").count();
        assert_eq!(intents(), 1);
        u.sync().expect("sync");
        assert_eq!(intents(), 0);
        // Present already: nothing to publish, no intent.
        let again = s.publish(&[(fa, &a)]).expect("publish again");
        assert_eq!(again.chunks(), 0);
        assert_eq!(intents(), 0);
        again.sync().expect("nothing to sync");
    }

    #[test]
    fn open_removes_a_chunk_torn_before_its_sync_and_keeps_the_whole_ones() {
        let (_d, s) = store();
        let a = vec![3u8; 8192];
        let b = vec![4u8; 8192];
        let (fa, fb) = (Fingerprint::of(&a), Fingerprint::of(&b));
        let u = s.publish(&[(fa, &a), (fb, &b)]).expect("publish");
        // What a power cut can leave: the rename durable, the data not.
        fs::write(s.chunk_path(&fb), &b[..100]).expect("tear");
        // The writer died without syncing: its intent names a dead pid.
        let dir = s.root().join(UNSYNCED_DIR);
        let intent = fs::read_dir(&dir)
            .expect("dir")
            .flatten()
            .next()
            .expect("intent")
            .path();
        fs::rename(&intent, dir.join("publish.4294967.0")).expect("orphan");
        drop(u);
        let s = LocalStore::open(s.root()).expect("reopen");
        assert_eq!(s.get_chunk(&fa).expect("a is whole"), a);
        assert!(!s.has_chunk(&fb).expect("has"), "the torn chunk is gone");
        assert_eq!(fs::read_dir(&dir).expect("dir").count(), 0, "intent removed");
    }

    #[test]
    fn a_sync_later_is_done_when_waited_for() {
        let (_d, s) = store();
        let a = vec![6u8; 4096];
        let fa = Fingerprint::of(&a);
        assert_eq!(s.publish_sync_later(vec![(fa, a.clone())]).expect("publish"), 1);
        // Written on its own thread: named as coming until it is there.
        assert!(s.has_chunk(&fa).expect("has") || s.being_published(&fa));
        s.wait_synced().expect("synced");
        assert_eq!(s.get_chunk(&fa).expect("there once synced"), a);
        assert_eq!(fs::read_dir(s.root().join(UNSYNCED_DIR)).expect("dir").count(), 0);
    }

    #[test]
    fn chunks_an_intent_names_are_being_published_until_placed() {
        let (_d, s) = store();
        let a = vec![7u8; 4096];
        let fa = Fingerprint::of(&a);
        let (intent, todo) = s.begin_publish(vec![(fa, a.clone())]).expect("intent");
        assert!(!s.has_chunk(&fa).expect("has"), "not placed yet");
        assert!(s.being_published(&fa));
        assert!(!s.being_published(&Fingerprint::of(b"other")));
        let (u, placed) = place_all(s.root(), intent, todo);
        placed.expect("place");
        u.sync().expect("sync");
        assert_eq!(s.get_chunk(&fa).expect("a"), a);
        assert!(!s.being_published(&fa), "its intent is gone");
    }

    #[test]
    fn a_chunk_that_cannot_be_placed_is_no_longer_named_as_coming() {
        let (_d, s) = store();
        let good = vec![11u8; 4096];
        let bad = vec![12u8; 4096];
        let (fg, fb) = (Fingerprint::of(&good), Fingerprint::of(&bad));
        let (intent, mut todo) = s
            .begin_publish(vec![(fg, good.clone()), (fb, bad.clone())])
            .expect("intent");
        assert!(s.being_published(&fb));
        // A write that fails (as on a full disk): its temp file cannot be made.
        let at = todo.iter().position(|p| p.fp == fb).expect("bad placement");
        todo[at].tmp = s.root().join("no-such-dir").join("chunk");
        let (u, placed) = place_all(s.root(), intent, todo);
        assert!(placed.is_err(), "the failure is reported");
        assert!(!s.being_published(&fb), "the server must not wait for it");
        assert!(s.being_published(&fg) || s.has_chunk(&fg).expect("has"));
        u.sync().expect("sync what was placed");
        assert_eq!(s.get_chunk(&fg).expect("good"), good);
        assert!(!s.has_chunk(&fb).expect("has"));
        let left: Vec<_> = fs::read_dir(s.root().join(UNSYNCED_DIR))
            .expect("dir")
            .flatten()
            .collect();
        assert!(left.is_empty(), "no intent left: {left:?}");
    }

    #[test]
    fn an_intent_of_a_live_writer_is_left_alone() {
        let (_d, s) = store();
        let a = vec![5u8; 4096];
        let fa = Fingerprint::of(&a);
        let u = s.publish(&[(fa, &a)]).expect("publish");
        // Another process opens the store while this one has not synced.
        let other = LocalStore::open(s.root()).expect("open");
        assert_eq!(other.get_chunk(&fa).expect("a"), a);
        assert_eq!(fs::read_dir(s.root().join(UNSYNCED_DIR)).expect("dir").count(), 1);
        u.sync().expect("sync");
    }
}
