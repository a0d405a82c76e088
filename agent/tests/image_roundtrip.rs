//! Slice → restore round trips, byte for byte, on ext4 images of real files:
//! every chunk size from 4 KiB to 16 MiB, images that are and are not a
//! multiple of the chunk size, an empty image, direct and buffered reads, a
//! loop device as input and as output.

mod image_util;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use edgeshift_agent::slicer::{restore_image, slice_image, ReadMode, SliceOptions};
use edgeshift_agent::store::{ChunkStore, LocalStore};
use edgeshift_common::{ChunkSize, ManifestId};
use edgeshift_testbed::caps;
use image_util::*;

fn assert_same_file(a: &Path, b: &Path) {
    let (x, y) = (fs::read(a).expect("read a"), fs::read(b).expect("read b"));
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in length",
        a.display(),
        b.display()
    );
    if let Some(pos) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ at byte {pos}", a.display(), b.display());
    }
}

/// Round trip through the CLI, checking inspect's figures against an
/// independent count and that zero chunks became holes.
fn round_trip(img: &Path, chunk_size: &str, dir: &Path) {
    let store = dir.join(format!("store-{chunk_size}"));
    let out = dir.join(format!("out-{chunk_size}.img"));
    let id = slice(img, &store, chunk_size);
    restore(&id, &store, &out);
    assert_same_file(img, &out);

    let bytes = fs::read(img).expect("read image");
    let cs = chunk_size.parse::<ChunkSize>().expect("chunk size").as_usize();
    let want = expected(&bytes, cs);
    let got = inspect_json(&id, &store);
    assert_eq!(got["image_size"], bytes.len() as u64, "{chunk_size}");
    assert_eq!(got["chunk_size"], cs as u64, "{chunk_size}");
    assert_eq!(got["chunks"], want.chunks, "{chunk_size}");
    assert_eq!(got["zero_chunks"], want.zero_chunks, "{chunk_size}");
    assert_eq!(got["unique_chunks"], want.unique.len() as u64, "{chunk_size}");
    assert_eq!(got["missing_chunks"], 0, "{chunk_size}");

    // Zero chunks are holes: the restored file allocates no more than its
    // non-zero chunks (plus a little file-system slack).
    let nonzero_bytes = (want.chunks - want.zero_chunks) * cs as u64;
    let allocated = fs::metadata(&out).expect("stat").blocks() * 512;
    if want.zero_chunks > 0 {
        assert!(
            allocated <= nonzero_bytes + (1 << 20),
            "{chunk_size}: restored file allocates {allocated} bytes for {nonzero_bytes} non-zero bytes"
        );
    }
    // The store holds the distinct non-zero chunks only.
    let files = LocalStore::open(&store)
        .expect("open store")
        .stats()
        .expect("stats");
    assert_eq!(files.chunks, want.unique.len() as u64, "{chunk_size}");
    fs::remove_dir_all(&store).expect("clean store");
    fs::remove_file(&out).expect("clean out");
}

#[test]
fn every_chunk_size_round_trips_an_image_not_a_multiple_of_it() {
    let img = image("small-base.img");
    let size = fs::metadata(&img).expect("stat").len();
    assert_ne!(
        size % 4096,
        0,
        "the test image must not be a multiple of any chunk size"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    for shift in 12..=24 {
        round_trip(&img, &(1u64 << shift).to_string(), dir.path());
    }
}

#[test]
fn image_a_multiple_of_the_chunk_size_round_trips() {
    let img = image("aligned.img");
    assert_eq!(fs::metadata(&img).expect("stat").len() % (16 << 20), 0);
    let dir = tempfile::tempdir().expect("tempdir");
    for cs in ["4KiB", "256KiB", "16MiB"] {
        round_trip(&img, cs, dir.path());
    }
}

#[test]
fn empty_image_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("empty.img");
    fs::write(&img, b"").expect("create empty image");
    let store = dir.path().join("store");
    let id = slice(&img, &store, "64KiB");
    let got = inspect_json(&id, &store);
    assert_eq!(got["image_size"], 0);
    assert_eq!(got["chunks"], 0);
    assert_eq!(got["unique_chunks"], 0);
    let out = dir.path().join("out.img");
    restore(&id, &store, &out);
    assert_eq!(fs::metadata(&out).expect("restored file exists").len(), 0);
}

#[test]
fn direct_buffered_and_auto_reads_agree() {
    let img = image("small-derived.img");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::open_or_create(dir.path().join("store")).expect("store");
    let mut ids = Vec::new();
    for mode in [ReadMode::Direct, ReadMode::Buffered, ReadMode::Auto] {
        let opts = SliceOptions {
            chunk_size: ChunkSize::new(1 << 20).expect("1MiB"),
            read_mode: mode,
            progress: None,
        };
        let r = slice_image(&img, &store, &opts).expect("slice");
        match mode {
            ReadMode::Direct => assert_eq!(r.read_mode, "direct", "ext4 under /tmp takes O_DIRECT"),
            ReadMode::Buffered => {
                assert_eq!(r.read_mode, "buffered");
                // The second slice finds every chunk already stored.
                assert_eq!(r.new_chunks, 0);
                assert_eq!(r.present_chunks, r.unique_chunks);
            }
            ReadMode::Auto => {}
        }
        ids.push(r.manifest_id);
    }
    // tmpfs (O_DIRECT only since Linux 6.6; older kernels refuse it and the
    // slicer falls back to buffered reads) gives the same manifest.
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let on_tmpfs = tempfile::tempdir_in(shm).expect("tempdir on /dev/shm");
        let copy = on_tmpfs.path().join("img");
        fs::copy(&img, &copy).expect("copy to tmpfs");
        let opts = SliceOptions {
            chunk_size: ChunkSize::new(1 << 20).expect("1MiB"),
            read_mode: ReadMode::Direct,
            progress: None,
        };
        ids.push(
            slice_image(&copy, &store, &opts)
                .expect("slice on tmpfs")
                .manifest_id,
        );
    }
    assert!(
        ids.windows(2).all(|w| w[0] == w[1]),
        "read modes disagree: {ids:?}"
    );
}

#[test]
fn library_slice_dedups_repeated_chunks_and_restores() {
    // An image made of real file bytes, with a repeated chunk and a hole.
    let real = fs::read(image("small-base.img")).expect("read image");
    let cs = 64 << 10;
    let mut distinct: Vec<&[u8]> = Vec::new();
    for c in real.chunks_exact(cs) {
        if c.iter().any(|b| *b != 0) && !distinct.contains(&c) {
            distinct.push(c);
        }
        if distinct.len() == 4 {
            break;
        }
    }
    assert_eq!(distinct.len(), 4, "the test image has data chunks");
    let mut bytes = Vec::new();
    for c in &distinct[..3] {
        bytes.extend_from_slice(c); // 3 chunks
    }
    bytes.extend_from_slice(distinct[0]); // a repeat of chunk 0
    bytes.extend(std::iter::repeat_n(0u8, 2 * cs)); // 2 zero chunks
    bytes.extend_from_slice(&distinct[3][..1000]); // a short tail
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("img");
    fs::write(&img, &bytes).expect("write image");
    let store = LocalStore::open_or_create(dir.path().join("store")).expect("store");
    let opts = SliceOptions {
        chunk_size: ChunkSize::new(cs as u64).expect("cs"),
        ..SliceOptions::default()
    };
    let r = slice_image(&img, &store, &opts).expect("slice");
    assert_eq!(r.chunks, 7);
    assert_eq!(r.zero_chunks, 2);
    assert_eq!(r.unique_chunks, 4);
    assert_eq!(r.new_chunks, 4);
    let m = store.get_manifest(&r.manifest_id).expect("manifest stored");
    assert_eq!(m.chunks[0], m.chunks[3]);
    assert!(m.chunks[4].is_zero_chunk() && m.chunks[5].is_zero_chunk());
    assert_eq!(m.chunk_len(6), 1000);
    let out = dir.path().join("out");
    let rep = restore_image(&store, &r.manifest_id, &out, None).expect("restore");
    assert_eq!(rep.chunks_written, 5);
    assert_eq!(fs::read(&out).expect("read out"), bytes);
    let _: ManifestId = r.manifest_id;
}

#[test]
fn loop_device_as_input_and_as_output() {
    if caps::skip_unless_root("losetup") {
        return;
    }
    let img = image("aligned.img");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let from_file = slice(&img, &store, "256KiB");
    let lo = match LoopDevice::attach(&img) {
        Ok(lo) => lo,
        Err(e) => {
            caps::unavailable(&format!("a loop device is not available ({e})"));
            return;
        }
    };
    // The device is the same bytes, so it has the same manifest.
    let from_device = slice(&lo.path, &store, "256KiB");
    assert_eq!(from_file, from_device);
    let json = ok(&[
        "slice",
        lo.path.to_str().expect("utf-8"),
        "--store",
        store.to_str().expect("utf-8"),
        "--chunk-size",
        "256KiB",
        "--json",
    ]);
    let report: serde_json::Value =
        serde_json::from_str(json.lines().next().expect("json line")).expect("json");
    assert_eq!(report["image_size"], fs::metadata(&img).expect("stat").len());

    // Restore into a block device that holds other bytes: written in place,
    // zero chunks included, then read back.
    let target = dir.path().join("target.img");
    let mut junk = fs::read(image("small-base.img")).expect("read");
    junk.truncate(fs::metadata(&img).expect("stat").len() as usize);
    junk.iter_mut().for_each(|b| *b = b.wrapping_add(1));
    fs::write(&target, &junk).expect("write target");
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&target)
        .output()
        .expect("losetup");
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rw = LoopDevice {
        path: String::from_utf8_lossy(&out.stdout).trim().into(),
    };
    restore(&from_file, &store, &rw.path);
    drop(rw);
    assert_same_file(&img, &target);
}
