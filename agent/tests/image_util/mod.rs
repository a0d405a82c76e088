//! Shared helpers for the image_* tests: the test images (built and cached by
//! perf/images/make-test-images.sh, through edgeshift-testbed), running the real `edgeshift` binary, and
//! an independent reckoning of what a manifest of an image must say.
#![allow(dead_code)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub const BIN: &str = env!("CARGO_BIN_EXE_edgeshift");

/// Directory holding small-base.img, small-derived.img and aligned.img.
pub fn images() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        edgeshift_testbed::images::test_images("small").unwrap_or_else(|e| panic!("the test images: {e}"))
    })
}

pub fn image(name: &str) -> PathBuf {
    images().join(name)
}

/// Runs `edgeshift ARGS` and returns its output (whatever the exit status).
pub fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run edgeshift")
}

/// Runs `edgeshift ARGS`, which must succeed; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "edgeshift {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs `edgeshift ARGS`, which must fail; returns stderr.
pub fn fails(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        !out.status.success(),
        "edgeshift {args:?} should have failed; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).expect("utf-8 stderr")
}

/// `edgeshift slice`, checking the contract: the last stdout line is the
/// manifest id, 64 hex digits.
pub fn slice(img: &Path, store: &Path, chunk_size: &str) -> String {
    let out = ok(&[
        "slice",
        img.to_str().expect("utf-8"),
        "--store",
        store.to_str().expect("utf-8"),
        "--chunk-size",
        chunk_size,
    ]);
    let id = out.lines().last().expect("slice prints a line").to_string();
    assert_eq!(id.len(), 64, "last line is not a manifest id: {out:?}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "not hex: {id}");
    id
}

pub fn restore(id: &str, store: &Path, out: &Path) {
    ok(&[
        "restore",
        id,
        "--store",
        store.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
    ]);
}

pub fn inspect_json(id: &str, store: &Path) -> serde_json::Value {
    let out = ok(&["inspect", id, "--store", store.to_str().expect("utf-8"), "--json"]);
    serde_json::from_str(out.trim()).expect("inspect --json prints one JSON object")
}

/// What a manifest of `bytes` in `chunk_size` chunks must say, worked out
/// here with blake3 directly (not through the slicer).
#[derive(Debug, Default, Clone)]
pub struct Expected {
    pub chunks: u64,
    pub zero_chunks: u64,
    pub unique: HashSet<[u8; 32]>,
    pub unique_bytes: u64,
}

pub fn expected(bytes: &[u8], chunk_size: usize) -> Expected {
    let mut e = Expected::default();
    for c in bytes.chunks(chunk_size) {
        e.chunks += 1;
        if c.iter().all(|b| *b == 0) {
            e.zero_chunks += 1;
        } else if e.unique.insert(*blake3::hash(c).as_bytes()) {
            e.unique_bytes += c.len() as u64;
        }
    }
    e
}

/// Every file under `dir` with its bytes, sorted by path: a snapshot to
/// prove a failed command lost nothing from a store.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).expect("read file");
                out.push((p, bytes));
            }
        }
    }
    out.sort();
    out
}

/// A read-only loop device over a file, detached on drop.
pub struct LoopDevice {
    pub path: PathBuf,
}

impl LoopDevice {
    pub fn attach(file: &Path) -> Result<Self, String> {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--read-only"])
            .arg(file)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(LoopDevice {
            path: PathBuf::from(path),
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}
