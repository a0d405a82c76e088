//! Types every edgeshift part shares: chunk fingerprints, sizes, the manifest
//! layout (an image's recipe), and — as they are added — wire frames and
//! control messages. Nothing here does I/O.

pub mod config;
pub mod control;
pub mod delta;
pub mod fingerprint;
pub mod manifest;
pub mod size;
pub mod wire;

pub use fingerprint::{Fingerprint, FingerprintError};
pub use manifest::{Manifest, ManifestError, ManifestHeader, ManifestId};
pub use size::{parse_size, ChunkSize, SizeError};
