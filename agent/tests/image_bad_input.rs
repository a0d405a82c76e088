//! Bad input gives a clear error, a non-zero exit, no output file, and loses
//! nothing from the store: truncated and corrupted manifests, a flipped byte
//! in a stored chunk, a file with a vmdk header QEMU cannot read, a missing store or image, chunk sizes that
//! are not a power of two, unwritable output paths.

mod image_util;

use std::fs;
use std::path::Path;
use std::process::Command;

use edgeshift_testbed::caps;
use image_util::*;

/// A store holding the two small images; returns (dir, store, base id, derived id).
fn populated() -> (tempfile::TempDir, std::path::PathBuf, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let a = slice(&image("small-base.img"), &store, "64KiB");
    let b = slice(&image("small-derived.img"), &store, "64KiB");
    (dir, store, a, b)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// No file at `out` and no temp file left beside it.
fn nothing_at(out: &Path) {
    assert!(!out.exists(), "{} exists after a failed restore", out.display());
    let dir = out.parent().expect("parent");
    let leftovers: Vec<_> = fs::read_dir(dir)
        .expect("read dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("edgeshift-restore"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

#[test]
fn corrupted_and_truncated_manifests_are_refused() {
    let (dir, store, a, b) = populated();
    let mpath = store.join("manifests").join(&a);
    let good = fs::read(&mpath).expect("read manifest");
    let out = dir.path().join("out.img");
    let cases: [(&str, Vec<u8>); 3] = [
        ("flipped byte", {
            let mut m = good.clone();
            let i = m.len() / 2;
            m[i] ^= 0x40;
            m
        }),
        ("truncated body", good[..good.len() - 7].to_vec()),
        ("truncated header", good[..10].to_vec()),
    ];
    for (what, bytes) in cases {
        fs::write(&mpath, &bytes).expect("damage manifest");
        let before = snapshot(&store);
        let err = fails(&["restore", &a, "--store", s(&store), "--out", s(&out)]);
        assert!(
            err.contains("manifest") && err.contains(&a),
            "{what}: unclear error: {err}"
        );
        nothing_at(&out);
        let err = fails(&["inspect", &a, "--store", s(&store), "--json"]);
        assert!(err.contains("manifest"), "{what}: unclear error: {err}");
        assert_eq!(snapshot(&store), before, "{what}: the store changed");
    }
    // The other image in the store is untouched and still restores.
    fs::write(&mpath, &good).expect("repair");
    restore(&b, &store, &out);
    assert_eq!(
        fs::read(&out).expect("read"),
        fs::read(image("small-derived.img")).expect("read")
    );
}

#[test]
fn flipped_byte_in_a_chunk_fails_restore_naming_the_chunk() {
    let (dir, store, a, b) = populated();
    // A chunk of the base that the derived image does not use.
    let base_chunks = inspect_chunks(&store, &a);
    let derived_chunks = inspect_chunks(&store, &b);
    let victim = base_chunks
        .iter()
        .find(|c| !derived_chunks.contains(c))
        .expect("a chunk only the base uses")
        .clone();
    let cpath = store.join("chunks").join(&victim[..2]).join(&victim);
    let mut bytes = fs::read(&cpath).expect("read chunk");
    bytes[100] ^= 1;
    fs::write(&cpath, &bytes).expect("flip a byte");
    let before = snapshot(&store);

    let out = dir.path().join("out.img");
    let err = fails(&["restore", &a, "--store", s(&store), "--out", s(&out)]);
    assert!(
        err.contains(&victim),
        "the error does not name chunk {victim}: {err}"
    );
    assert!(err.contains("corrupt"), "unclear error: {err}");
    nothing_at(&out);
    assert_eq!(snapshot(&store), before, "a failed restore changed the store");

    let err = fails(&["inspect", &a, "--store", s(&store), "--verify"]);
    assert!(err.contains("1 corrupt"), "inspect --verify: {err}");
    // The store is otherwise intact: the derived image restores.
    restore(&b, &store, &out);
    assert_eq!(
        fs::read(&out).expect("read"),
        fs::read(image("small-derived.img")).expect("read")
    );
}

/// The manifest's chunk names, read from its file (header 32 bytes, then 32
/// bytes per chunk).
fn inspect_chunks(store: &Path, id: &str) -> Vec<String> {
    let m = fs::read(store.join("manifests").join(id)).expect("manifest");
    m[32..]
        .chunks(32)
        .filter(|c| c.iter().any(|b| *b != 0))
        .map(hex::encode)
        .collect()
}

#[test]
fn non_raw_headers_qemu_cannot_read_are_refused() {
    let (dir, store, _, _) = populated();
    let before = snapshot(&store);
    if caps::missing(false, &["qemu-img"], &[]).is_some() {
        return;
    }
    // A VMDK magic and nothing a VMDK needs: QEMU cannot read it, so it is
    // not sliced as raw either (agent/tests/image_qcow2.rs slices real ones).
    let v = dir.path().join("disk.vmdk");
    let mut vmdk = b"KDMV\x01\0\0\0".to_vec();
    vmdk.resize(1 << 20, 0);
    fs::write(&v, vmdk).expect("write vmdk");
    let err = fails(&["slice", s(&v), "--store", s(&store)]);
    assert!(err.contains("(vmdk) cannot be sliced"), "{err}");
    assert_eq!(snapshot(&store), before, "a refused slice changed the store");
}

#[test]
fn missing_store_and_missing_image() {
    let (dir, _, a, _) = populated();
    let nowhere = dir.path().join("no-such-store");
    let out = dir.path().join("out.img");
    let err = fails(&["restore", &a, "--store", s(&nowhere), "--out", s(&out)]);
    assert!(err.contains("no chunk store"), "{err}");
    let err = fails(&["inspect", &a, "--store", s(&nowhere)]);
    assert!(err.contains("no chunk store"), "{err}");
    assert!(!nowhere.exists(), "a read command created a store");
    nothing_at(&out);

    let err = fails(&[
        "slice",
        s(&dir.path().join("no-such.img")),
        "--store",
        s(&nowhere),
    ]);
    assert!(err.contains("no-such.img"), "{err}");
    assert!(!nowhere.exists(), "slicing a missing image created a store");

    // A directory that is not a store is not taken for one.
    let other = dir.path().join("other");
    fs::create_dir(&other).expect("mkdir");
    fs::write(other.join("precious"), b"data").expect("write");
    let err = fails(&["slice", s(&image("aligned.img")), "--store", s(&other)]);
    assert!(err.contains("not an edgeshift chunk store"), "{err}");
    assert_eq!(fs::read(other.join("precious")).expect("read"), b"data");

    // An unknown manifest id.
    let (_keep, store, _, _) = populated();
    let err = fails(&["inspect", &"ab".repeat(32), "--store", s(&store)]);
    assert!(err.contains("not in the store"), "{err}");
    let err = fails(&["inspect", "xyz", "--store", s(&store)]);
    assert!(err.contains("64 hex digits"), "{err}");
}

#[test]
fn chunk_sizes_outside_the_rule_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let img = image("aligned.img");
    for (size, says) in [
        ("3000", "not a power of two"),
        ("100KiB", "not a power of two"),
        ("2KiB", "outside"),
        ("32MiB", "outside"),
        ("4 furlongs", "cannot read"),
    ] {
        let err = fails(&["slice", s(&img), "--store", s(&store), "--chunk-size", size]);
        assert!(err.contains(says), "--chunk-size {size}: {err}");
    }
    assert!(!store.exists(), "a refused slice created a store");
}

#[test]
fn unwritable_output_paths_fail_cleanly() {
    let (dir, store, a, _) = populated();
    let before = snapshot(&store);
    for out in [
        dir.path().join("no-such-dir").join("out.img"),
        Path::new("/proc/edgeshift-out.img").to_path_buf(),
    ] {
        let err = fails(&["restore", &a, "--store", s(&store), "--out", s(&out)]);
        assert!(err.contains(s(out.parent().expect("parent"))), "{err}");
        assert!(!out.exists());
    }
    // A directory is not an image path.
    let err = fails(&["restore", &a, "--store", s(&store), "--out", s(dir.path())]);
    assert!(err.contains("is a directory"), "{err}");
    // A full file system: a 1 MiB tmpfs cannot hold a 48 MiB image.
    if caps::is_root() {
        let mnt = dir.path().join("tiny");
        fs::create_dir(&mnt).expect("mkdir");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "edgeshift-test"])
            .arg(&mnt)
            .status()
            .is_ok_and(|st| st.success());
        if mounted {
            let out = mnt.join("out.img");
            let err = fails(&["restore", &a, "--store", s(&store), "--out", s(&out)]);
            let leftover = fs::read_dir(&mnt).expect("read").count();
            let _ = Command::new("umount").arg(&mnt).status();
            assert!(err.contains("No space left"), "{err}");
            assert_eq!(leftover, 0, "a failed restore left files on the full file system");
        } else {
            // Outside CI, fall through to the store check.
            caps::unavailable("mount -t tmpfs is not available");
        }
    }
    assert_eq!(snapshot(&store), before, "a failed restore changed the store");
}
