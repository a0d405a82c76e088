//! Human sizes (`4KiB`, `256KiB`, `4MiB`, plain byte counts) and the chunk
//! size rule (a power of two from 4 KiB to 16 MiB).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("cannot read {0:?} as a size (examples: 4096, 4KiB, 256KiB, 4MiB, 1GiB)")]
    Unparsable(String),
    #[error("size {0:?} overflows 64 bits")]
    Overflow(String),
    #[error("chunk size {0} is not a power of two (examples: 4KiB, 256KiB, 4MiB)")]
    NotPowerOfTwo(u64),
    #[error("chunk size {0} is outside 4 KiB ..= 16 MiB")]
    OutOfRange(u64),
}

/// Parses `4096`, `4KiB`, `4K`, `4kb`, `256KiB`, `4MiB`, `1GiB`, `2TiB`.
/// Units are binary (KiB = 1024) whatever the spelling, as for `dd` and `qemu-img`.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(SizeError::Unparsable(s.to_string()));
    }
    let n: u64 = num.parse().map_err(|_| SizeError::Overflow(s.to_string()))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(SizeError::Unparsable(s.to_string())),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(s.to_string()))
}

/// Formats a byte count with a binary unit, exact when it can be (`4MiB`).
pub fn format_size(n: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{}{}", n >> shift, unit);
        }
    }
    n.to_string()
}

/// A validated chunk size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct ChunkSize(u32);

impl ChunkSize {
    pub const MIN: u64 = 4 << 10;
    pub const MAX: u64 = 16 << 20;
    /// Chosen from the dedup/speed table in `perf` (see docs/chunk-size.md).
    pub const DEFAULT: ChunkSize = ChunkSize(256 << 10);

    pub fn new(bytes: u64) -> Result<Self, SizeError> {
        if !bytes.is_power_of_two() {
            return Err(SizeError::NotPowerOfTwo(bytes));
        }
        if !(Self::MIN..=Self::MAX).contains(&bytes) {
            return Err(SizeError::OutOfRange(bytes));
        }
        Ok(ChunkSize(bytes as u32))
    }

    pub fn bytes(self) -> u64 {
        self.0 as u64
    }

    pub fn as_usize(self) -> usize {
        self.0 as usize
    }
}

impl TryFrom<u64> for ChunkSize {
    type Error = SizeError;
    fn try_from(v: u64) -> Result<Self, SizeError> {
        ChunkSize::new(v)
    }
}

impl From<ChunkSize> for u64 {
    fn from(c: ChunkSize) -> u64 {
        c.bytes()
    }
}

impl FromStr for ChunkSize {
    type Err = SizeError;
    fn from_str(s: &str) -> Result<Self, SizeError> {
        ChunkSize::new(parse_size(s)?)
    }
}

impl fmt::Display for ChunkSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_size(self.bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("256KiB"), Ok(256 << 10));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(matches!(parse_size("MiB"), Err(SizeError::Unparsable(_))));
        assert!(matches!(parse_size("4 furlongs"), Err(SizeError::Unparsable(_))));
        assert!(matches!(
            parse_size("99999999999999TiB"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn chunk_size_rules() {
        assert_eq!("4KiB".parse::<ChunkSize>().map(|c| c.bytes()), Ok(4096));
        assert_eq!("16MiB".parse::<ChunkSize>().map(|c| c.bytes()), Ok(16 << 20));
        assert_eq!("3000".parse::<ChunkSize>(), Err(SizeError::NotPowerOfTwo(3000)));
        assert_eq!("2KiB".parse::<ChunkSize>(), Err(SizeError::OutOfRange(2048)));
        assert_eq!("32MiB".parse::<ChunkSize>(), Err(SizeError::OutOfRange(32 << 20)));
        assert_eq!(ChunkSize::DEFAULT.to_string(), "256KiB");
    }
}
