//! Types every edgeshift part shares: chunk fingerprints, sizes, the manifest
//! layout (an image's recipe), and — as they are added — wire frames and
//! control messages. Nothing here does I/O, except the `service` feature's
//! module (logging, systemd readiness, stop signals) for the daemons.

pub mod config;
pub mod control;
pub mod delta;
pub mod fingerprint;
pub mod hostile;
#[cfg(feature = "tls")]
pub mod identity;
pub mod manifest;
#[cfg(feature = "service")]
pub mod service;
pub mod size;
pub mod wire;

pub use fingerprint::{Fingerprint, FingerprintError};
pub use manifest::{Manifest, ManifestError, ManifestHeader, ManifestId};
pub use size::{parse_size, ChunkSize, SizeError};
