//! The destination half of one migration: what it holds from `Prepare` on.
//! The commands' work lives in the files named after them; dropping an
//! [`Incoming`] that did not finish tears it down (`teardown.rs`).

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgeshift_common::{ChunkSize, Fingerprint};

use super::context::Host;
use super::mirror_server::MirrorServer;
use crate::migrate::coord::IncomingPlan;
use crate::migrate::image_writer::ImageWriter;
use crate::migrate::MigrateError;
use crate::transfer::pool::ConnPool;
use crate::vm::loopdev::LoopDevice;
use crate::vm::{Launched, MemoryTransport, VmSpec};

/// The destination QEMU's background start: what it launched and the
/// memory transport it really set up.
pub(super) type Starting = std::thread::JoinHandle<Result<(Launched, MemoryTransport), MigrateError>>;

/// The destination half of one migration.
pub(super) struct Incoming {
    pub(super) host: Arc<Host>,
    pub(super) spec: VmSpec,
    pub(super) chunk_size: ChunkSize,
    pub(super) image_size: u64,
    /// What the image file holds now, per chunk.
    pub(super) current: Vec<Fingerprint>,
    /// Chunks of the boot manifest this edge's store held at Prepare: a
    /// Pull does not look them up again (docs/migration.md, "The
    /// destination").
    pub(super) held_at_prepare: HashSet<Fingerprint>,
    /// Per index, the chunk this edge held at that place in the nearest
    /// earlier version of the image (`transfer::fetch::basis`; zero where
    /// none): round 0's delta bases, while the image still holds nothing.
    pub(super) basis: Vec<Fingerprint>,
    pub(super) image_path: PathBuf,
    pub(super) dir: PathBuf,
    pub(super) file: File,
    /// Writes the pulled chunks into `file` in the background.
    pub(super) writer: ImageWriter,
    pub(super) loop_dev: Option<LoopDevice>,
    /// The destination QEMU being started in the background (StartIncoming).
    pub(super) starting: Option<Starting>,
    /// Set once `starting` is joined.
    pub(super) qemu: Option<Launched>,
    pub(super) memory: MemoryTransport,
    pub(super) uri: Option<String>,
    pub(super) finished: bool,
    /// The coordinator's plan for this VM (step 1) and the pin it holds.
    pub(super) plan: Option<IncomingPlan>,
    /// What step 5 did at the coordinator.
    pub(super) after: Option<String>,
    /// The disk mirror's export, once opened (`OpenMirror`).
    pub(super) mirror: Option<MirrorServer>,
    /// The holders' connections, kept from one pull to the next.
    pub(super) conns: Arc<ConnPool>,
}

impl Incoming {
    /// Bytes of chunk `i` (the last may be short).
    pub(super) fn chunk_len(&self, i: usize) -> u64 {
        let cs = self.chunk_size.bytes();
        (self.image_size - i as u64 * cs).min(cs)
    }
}

/// Names the file operation an I/O error came from.
pub(super) fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> MigrateError + 'a {
    move |source| MigrateError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}
