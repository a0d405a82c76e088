//! BLAKE3-256 fingerprints that name chunks and manifests.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Errors from parsing a fingerprint's text form.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FingerprintError {
    #[error("a fingerprint is 64 hex digits, got {0} characters")]
    Length(usize),
    #[error("a fingerprint is 64 hex digits, got a non-hex character in {0:?}")]
    NotHex(String),
}

/// The BLAKE3-256 hash of a chunk's bytes (or of a manifest's bytes, for a
/// manifest id). The all-zero value is reserved: in a manifest it marks a
/// chunk whose bytes are all zero (a hole), which is never stored nor sent.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(transparent)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The reserved value that marks an all-zero chunk in a manifest.
    pub const ZERO_CHUNK: Fingerprint = Fingerprint([0u8; 32]);

    /// Fingerprint of `data`.
    pub fn of(data: &[u8]) -> Self {
        Fingerprint(*blake3::hash(data).as_bytes())
    }

    /// Fingerprint of `data`, hashing with all cores for large buffers.
    pub fn of_parallel(data: &[u8]) -> Self {
        if data.len() >= 128 * 1024 {
            let mut h = blake3::Hasher::new();
            h.update_rayon(data);
            Fingerprint(*h.finalize().as_bytes())
        } else {
            Self::of(data)
        }
    }

    /// True for the hole marker.
    pub fn is_zero_chunk(&self) -> bool {
        *self == Self::ZERO_CHUNK
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl From<blake3::Hash> for Fingerprint {
    fn from(h: blake3::Hash) -> Self {
        Fingerprint(*h.as_bytes())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &self.to_hex()[..16])
    }
}

impl FromStr for Fingerprint {
    type Err = FingerprintError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 64 {
            return Err(FingerprintError::Length(s.len()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| FingerprintError::NotHex(s.to_string()))?;
        Ok(Fingerprint(out))
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_hex())
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            Ok(Fingerprint(<[u8; 32]>::deserialize(d)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_errors() {
        let fp = Fingerprint::of(b"edgeshift");
        let s = fp.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<Fingerprint>(), Ok(fp));
        assert_eq!("abc".parse::<Fingerprint>(), Err(FingerprintError::Length(3)));
        assert!(matches!(
            "z".repeat(64).parse::<Fingerprint>(),
            Err(FingerprintError::NotHex(_))
        ));
    }

    #[test]
    fn parallel_hash_equals_serial() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(Fingerprint::of(&data), Fingerprint::of_parallel(&data));
    }

    #[test]
    fn json_is_hex() {
        let fp = Fingerprint::of(b"x");
        let j = serde_json::to_string(&fp).expect("serialise");
        assert_eq!(j, format!("\"{fp}\""));
        let back: Fingerprint = serde_json::from_str(&j).expect("parse");
        assert_eq!(back, fp);
    }
}
