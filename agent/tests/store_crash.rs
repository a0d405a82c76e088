//! kill -9 at random points of a slice, a fetch and a GC (50 points each,
//! small images so each point is quick), then: every chunk file the store
//! names hashes to its name, the store opens (its recovery clears what the
//! dead writer left), a pinned chunk is never gone, and a manifest the
//! store holds has all its chunks.
//!
//! The delay before each kill is drawn uniformly from [0, the operation's
//! duration measured undisturbed), so the points spread over the whole
//! write path, commits included; a run that finished before its kill does
//! not count as a point. The seed is printed.

mod transfer_support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgeshift_agent::coordination::pins::LocalPins;
use edgeshift_agent::store::{ChunkStore, LocalStore};
use edgeshift_common::{Fingerprint, ManifestId};
use transfer_support::*;

/// Kills that caught the process running, per test.
const POINTS: usize = 50;
/// Most runs tried to get them (a run may finish before its kill).
const MAX_TRIES: usize = 4 * POINTS;
/// 256 chunks of 16 KiB: 4 MiB, so a point takes tens of milliseconds.
const CHUNKS: usize = 256;
const CHUNK: usize = 16 << 10;

/// A small xorshift for the kill delays; seeded from the clock and printed.
struct Delays(u64);

impl Delays {
    fn new(what: &str) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        eprintln!("{what}: kill delays seeded with {seed}");
        Delays(seed)
    }

    /// A delay in [0, max).
    fn next(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        max.mul_f64((self.0 >> 11) as f64 / (1u64 << 53) as f64)
    }
}

/// Runs `cmd` undisturbed; how long it took (at least 5 ms).
fn duration_of(mut cmd: Command) -> Duration {
    let t = Instant::now();
    let st = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run");
    assert!(st.success(), "{cmd:?} failed undisturbed");
    t.elapsed().max(Duration::from_millis(5))
}

/// The kill window after a run that finished before its kill: the
/// undisturbed run may have been timed while other work slowed it, and a
/// window longer than the operation wastes tries past its end.
fn shorter(window: Duration) -> Duration {
    window.mul_f64(0.9).max(Duration::from_millis(5))
}

/// Starts `cmd`, kills it (SIGKILL) after `after` unless it finished;
/// whether it was still running.
fn kill_after(mut cmd: Command, after: Duration) -> bool {
    let mut child: Child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    std::thread::sleep(after);
    let running = child.try_wait().expect("try_wait").is_none();
    let _ = child.kill();
    let _ = child.wait();
    running
}

/// Every chunk file under `store/chunks` hashes to its name; their names.
fn assert_chunks_whole(store: &Path) -> HashSet<Fingerprint> {
    let mut names = HashSet::new();
    let Ok(fans) = std::fs::read_dir(store.join("chunks")) else {
        return names;
    };
    for fan in fans.flatten() {
        for e in std::fs::read_dir(fan.path()).expect("fan").flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let fp: Fingerprint = name.parse().expect("a chunk file is named by a fingerprint");
            let bytes = std::fs::read(e.path()).expect("read chunk");
            assert_eq!(Fingerprint::of(&bytes), fp, "torn chunk {}", e.path().display());
            names.insert(fp);
        }
    }
    names
}

/// The store opens after the kill, keeps no temp file of the dead writer,
/// and every chunk it names is whole; with `manifests_complete` (a slice
/// stores its manifest only once its chunks are durable; a fetch stores the
/// manifest first, to resume) each manifest it holds has all its chunks.
fn assert_store_sound(store: &Path, manifests_complete: bool) -> LocalStore {
    // A kill while the store was being created leaves its directory without
    // the marker; the next run's open_or_create completes it (a foreign
    // directory would still be refused).
    let s = LocalStore::open_or_create(store).expect("the store opens after kill -9");
    let left = std::fs::read_dir(store.join("tmp")).expect("tmp").count();
    assert_eq!(left, 0, "temp files of the dead writer remain");
    let names = assert_chunks_whole(store);
    if !manifests_complete {
        return s;
    }
    for id in s.list_manifests().expect("manifests") {
        let m = s.get_manifest(&id).expect("manifest reads");
        for fp in m.chunks.iter().filter(|f| !f.is_zero_chunk()) {
            assert!(names.contains(fp), "manifest {id} stored before its chunk {fp}");
        }
    }
    s
}

fn slice_cmd(image: &Path, store: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.arg("slice")
        .arg(image)
        .arg("--store")
        .arg(store)
        .args(["--chunk-size", "16KiB"]);
    c
}

#[test]
fn kill_9_during_slice_never_leaves_a_torn_chunk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("image.raw");
    write_image(&image, CHUNKS, CHUNK, 7);
    let mut took = duration_of(slice_cmd(&image, &dir.path().join("timing")));
    let mut delays = Delays::new("slice");
    let (mut interrupted, mut point) = (0, 0);
    while interrupted < POINTS && point < MAX_TRIES {
        point += 1;
        let store = dir.path().join(format!("s{point}"));
        // Every other point starts from a store holding part of the image
        // (the last point's leftovers): presence checks and new chunks mixed.
        let prev = dir.path().join(format!("s{}", point - 1));
        if point % 2 == 0 && prev.exists() {
            std::fs::rename(&prev, &store).expect("reuse the last store");
        }
        if kill_after(slice_cmd(&image, &store), delays.next(took)) {
            interrupted += 1;
        } else {
            took = shorter(took);
        }
        if store.exists() {
            assert_store_sound(&store, true);
        }
        if point % 2 == 0 {
            let _ = std::fs::remove_dir_all(&store);
        }
    }
    assert_eq!(
        interrupted, POINTS,
        "{point} tries: only {interrupted} slices were still running when killed"
    );
}

#[test]
fn kill_9_during_fetch_never_leaves_a_torn_chunk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("image.raw");
    write_image(&image, CHUNKS, CHUNK, 11);
    let src = dir.path().join("src");
    let id = slice(&image, &src, "16KiB");
    let key = write_key(dir.path(), "key", 0x42);
    let agent = Agent::local(&src, &key, false, &dir.path().join("agent.log"));
    let fetch_to = |store: &Path| fetch_cmd(Command::new(BIN), &id, store, &key, &[agent.addr]);
    let mut took = duration_of(fetch_to(&dir.path().join("timing")));
    let mut delays = Delays::new("fetch");
    let (mut interrupted, mut point) = (0, 0);
    while interrupted < POINTS && point < MAX_TRIES {
        point += 1;
        let store = dir.path().join(format!("d{point}"));
        if kill_after(fetch_to(&store), delays.next(took)) {
            interrupted += 1;
        } else {
            took = shorter(took);
        }
        if store.exists() {
            assert_store_sound(&store, false);
        }
        let _ = std::fs::remove_dir_all(&store);
    }
    assert_eq!(
        interrupted, POINTS,
        "{point} tries: only {interrupted} fetches were still running when killed"
    );
    // The last store fetched again completes and restores byte for byte.
    let store = dir.path().join("final");
    report(&fetch(&id, &store, &key, &[agent.addr]));
    assert_restores(&id, &store, &image);
}

/// The GC child: set by [`kill_9_during_gc_never_removes_a_pinned_chunk`].
const GC_CHILD_ENV: &str = "EDGESHIFT_TEST_GC_CHILD_STORE";

/// Not a test on its own: the process the GC test kills. It orders every
/// chunk of the store dropped, as a coordinator's GC order would.
#[test]
#[ignore = "run by kill_9_during_gc_never_removes_a_pinned_chunk"]
fn gc_child_process() {
    let Some(store) = std::env::var_os(GC_CHILD_ENV) else {
        return;
    };
    let store = LocalStore::open(PathBuf::from(store)).expect("open");
    let pins = LocalPins::for_store(&store).expect("pins");
    let all: Vec<Fingerprint> = store.list_chunks().expect("list");
    pins.collect(&store, &all, &HashSet::new()).expect("gc");
}

#[test]
fn kill_9_during_gc_never_removes_a_pinned_chunk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (kept_img, dropped_img) = (dir.path().join("kept.raw"), dir.path().join("dropped.raw"));
    write_image(&kept_img, CHUNKS / 2, 4096, 21);
    write_image(&dropped_img, CHUNKS, 4096, 22);
    let store = dir.path().join("store");
    let kept: ManifestId = slice(&kept_img, &store, "4KiB").parse().expect("id");
    let pinned: HashSet<Fingerprint> = {
        let s = LocalStore::open(&store).expect("open");
        LocalPins::for_store(&s)
            .expect("pins")
            .pin(&kept, "vm")
            .expect("pin");
        let m = s.get_manifest(&kept).expect("manifest");
        m.chunks.into_iter().filter(|f| !f.is_zero_chunk()).collect()
    };
    let gc = || {
        let mut c = Command::new(std::env::current_exe().expect("test binary"));
        c.args(["--exact", "gc_child_process", "--ignored", "--test-threads", "1"])
            .env(GC_CHILD_ENV, &store);
        c
    };
    slice(&dropped_img, &store, "4KiB");
    // What GC removes, put back in one batch (quicker than a slice).
    let dropped: Vec<Vec<u8>> = std::fs::read(&dropped_img)
        .expect("read")
        .chunks(4096)
        .map(<[u8]>::to_vec)
        .filter(|c| c.iter().any(|b| *b != 0))
        .collect();
    let refill = || {
        let s = LocalStore::open(&store).expect("open");
        let mut batch = s.batch();
        for c in &dropped {
            let fp = Fingerprint::of(c);
            if !s.has_chunk(&fp).expect("has") {
                batch.stage(&fp, c).expect("stage");
            }
        }
        batch.commit().expect("commit");
    };
    let mut took = duration_of(gc());
    let mut delays = Delays::new("gc");
    let (mut interrupted, mut point) = (0, 0);
    while interrupted < POINTS && point < MAX_TRIES {
        point += 1;
        refill();
        if kill_after(gc(), delays.next(took)) {
            interrupted += 1;
        } else {
            took = shorter(took);
        }
        let s = LocalStore::open(&store).expect("the store opens after kill -9");
        let names = assert_chunks_whole(&store);
        for fp in &pinned {
            assert!(names.contains(fp), "GC removed pinned chunk {fp}");
        }
        assert!(s.get_manifest(&kept).is_ok());
    }
    assert_eq!(
        interrupted, POINTS,
        "{point} tries: only {interrupted} GCs were still running when killed"
    );
}
