//! Images as they come (issue 24): a qcow2 with a backing chain, and the
//! other formats QEMU reads, slice to the manifest of their raw conversion
//! through qemu-storage-daemon's FUSE view (no raw copy written); a
//! truncated or corrupt qcow2, or one whose backing file is gone, is refused
//! with a clear error and leaves the store as it was.

mod image_util;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use edgeshift_testbed::caps;
use image_util::*;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn tools_missing() -> bool {
    caps::missing(
        true,
        &["qemu-img", "qemu-io", "qemu-storage-daemon"],
        &["/dev/fuse"],
    )
    .is_some()
}

fn qemu(prog: &str, args: &[&str]) {
    let out = Command::new(prog).args(args).output().expect("run qemu tool");
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn slice_json(img: &Path, store: &Path) -> serde_json::Value {
    let out = ok(&[
        "slice",
        s(img),
        "--store",
        s(store),
        "--chunk-size",
        "64KiB",
        "--json",
    ]);
    let line = out.lines().next().expect("a JSON line");
    serde_json::from_str(line).expect("slice --json")
}

/// The tests check that no view is left mounted, so they run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// No FUSE view left mounted.
fn no_views_left() {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    assert!(!mounts.contains("edgeshift-view-"), "a raw view is still mounted");
}

#[test]
fn a_qcow2_chain_slices_to_its_raw_conversions_manifest() {
    if tools_missing() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |n: &str| dir.path().join(n);
    // A base holding the test image's bytes, an overlay writing over part
    // of it and past its data, as a cloud image and a VM's disk would.
    let raw_base = image("small-base.img");
    qemu(
        "qemu-img",
        &["convert", "-q", "-O", "qcow2", s(&raw_base), s(&p("base.qcow2"))],
    );
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&p("base.qcow2")),
            "-F",
            "qcow2",
            s(&p("top.qcow2")),
        ],
    );
    qemu(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 192k 200k", s(&p("top.qcow2"))],
    );
    qemu(
        "qemu-img",
        &["convert", "-q", "-O", "raw", s(&p("top.qcow2")), s(&p("top.raw"))],
    );

    let store = p("store");
    let t = Instant::now();
    let via_raw = slice_json(&p("top.raw"), &store);
    let raw_secs = t.elapsed().as_secs_f64();
    let store2 = p("store2");
    let t = Instant::now();
    let via_qcow2 = slice_json(&p("top.qcow2"), &store2);
    let qcow2_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "{} bytes: raw slice {raw_secs:.3} s, qcow2 view slice {qcow2_secs:.3} s (process wall time)",
        via_raw["image_size"]
    );
    assert_eq!(
        via_qcow2["manifest_id"], via_raw["manifest_id"],
        "{via_qcow2} vs {via_raw}"
    );
    assert_eq!(via_qcow2["format"], "qcow2");
    assert_eq!(via_qcow2["backing_chain"], 2, "the backing file was followed");
    assert_eq!(via_raw["format"], "raw");
    // The base alone is a different image.
    let base = slice_json(&p("base.qcow2"), &store2);
    assert_ne!(base["manifest_id"], via_raw["manifest_id"]);
    assert_eq!(base["backing_chain"], 1);
    // No raw copy was written beside the images, and no view is left.
    let names: Vec<String> = fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names.len(), 5, "{names:?}");
    no_views_left();

    // Other formats QEMU reads: the same bytes, the same manifest.
    for fmt in ["vmdk", "vdi", "vhdx"] {
        let img = p(&format!("top.{fmt}"));
        qemu(
            "qemu-img",
            &["convert", "-q", "-O", fmt, s(&p("top.qcow2")), s(&img)],
        );
        let r = slice_json(&img, &store2);
        assert_eq!(r["format"], fmt, "{r}");
        assert_eq!(r["manifest_id"], via_raw["manifest_id"], "{fmt}: {r}");
    }
    no_views_left();
}

#[test]
fn corrupt_truncated_and_orphaned_qcow2_get_clear_errors() {
    if tools_missing() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |n: &str| dir.path().join(n);
    let store = p("store");
    slice(&image("small-base.img"), &store, "64KiB");
    let before = snapshot(&store);

    // Truncated: its data clusters cut off (QEMU would read them as zeros).
    qemu(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-O",
            "qcow2",
            s(&image("small-base.img")),
            s(&p("t.qcow2")),
        ],
    );
    let len = fs::metadata(p("t.qcow2")).expect("stat").len();
    fs::OpenOptions::new()
        .write(true)
        .open(p("t.qcow2"))
        .and_then(|f| f.set_len(len / 2))
        .expect("truncate");
    let err = fails(&["slice", s(&p("t.qcow2")), "--store", s(&store)]);
    assert!(
        err.contains("qcow2") && err.contains("corrupt or truncated"),
        "{err}"
    );

    // A header that is not a qcow2 header.
    let mut junk = b"QFI\xfbjunkjunkjunkjunk".to_vec();
    junk.resize(1 << 16, 0xee);
    fs::write(p("j.qcow2"), junk).expect("write");
    let err = fails(&["slice", s(&p("j.qcow2")), "--store", s(&store)]);
    assert!(err.contains("j.qcow2 (qcow2) cannot be sliced"), "{err}");

    // An overlay whose backing file is gone.
    qemu(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&p("b.qcow2")), "8M"],
    );
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&p("b.qcow2")),
            "-F",
            "qcow2",
            s(&p("o.qcow2")),
        ],
    );
    fs::remove_file(p("b.qcow2")).expect("rm backing");
    let err = fails(&["slice", s(&p("o.qcow2")), "--store", s(&store)]);
    assert!(err.contains("o.qcow2") && err.contains("b.qcow2"), "{err}");

    assert_eq!(snapshot(&store), before, "a refused slice changed the store");
    no_views_left();
}
