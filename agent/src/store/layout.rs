//! Where things are in a store directory, and how its temp names are made.
//!
//! Layout: `DIR/edgeshift-store` (marker), `DIR/chunks/ab/<64 hex>` (one file
//! per chunk, fanned out by the first byte), `DIR/manifests/<64 hex>`,
//! `DIR/tmp/` for writes in progress, `DIR/unsynced/` for intents of chunks
//! published before they are synced, and `DIR/pins` (the coordination
//! module's). Temp and intent files are named `tag.PID.SEQ`, so an opener
//! can tell whether their writer still runs.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use edgeshift_common::{Fingerprint, ManifestId};

pub const STORE_MARKER: &str = "edgeshift-store";
pub(super) const MARKER_TEXT: &str = "edgeshift chunk store, layout 1\n";
pub(super) const MARKER_TMP_PREFIX: &str = ".edgeshift-store.creating.";
/// Directory of intent files, one per publish not yet durable.
pub const UNSYNCED_DIR: &str = "unsynced";
/// Directories of a store's layout.
pub(super) const STORE_LAYOUT_DIRS: [&str; 5] = ["chunks", "manifests", "tmp", "pins", UNSYNCED_DIR];

/// The paths of one store, and the sequence its temp names are drawn from.
#[derive(Debug)]
pub(super) struct StorePaths {
    root: PathBuf,
    tmp_seq: AtomicU64,
}

impl StorePaths {
    pub(super) fn new(root: PathBuf) -> Self {
        StorePaths {
            root,
            tmp_seq: AtomicU64::new(0),
        }
    }

    pub(super) fn root(&self) -> &Path {
        &self.root
    }

    pub(super) fn chunks_dir(&self) -> PathBuf {
        self.root.join("chunks")
    }

    pub(super) fn chunk_path(&self, fp: &Fingerprint) -> PathBuf {
        let hex = fp.to_hex();
        self.chunks_dir().join(&hex[..2]).join(hex)
    }

    pub(super) fn manifests_dir(&self) -> PathBuf {
        self.root.join("manifests")
    }

    pub(super) fn manifest_path(&self, id: &ManifestId) -> PathBuf {
        self.manifests_dir().join(id.to_hex())
    }

    pub(super) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub(super) fn unsynced_dir(&self) -> PathBuf {
        self.root.join(UNSYNCED_DIR)
    }

    /// A fresh temp file path under `tmp/`, unique within this process.
    pub(super) fn tmp_path(&self, tag: &str) -> PathBuf {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.tmp_dir().join(format!("{tag}.{}.{n}", std::process::id()))
    }
}

/// Whether the process named in a `tag.PID.SEQ` file name still runs.
pub(super) fn writer_alive(name: &str) -> bool {
    name.split('.')
        .nth(1)
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}
