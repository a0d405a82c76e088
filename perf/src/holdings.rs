//! What a handoff's destination lacked, from the chunk stores' contents:
//! the bytes a physical limit is computed from (the live scenarios and
//! `migrate-bench`).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use edgeshift_agent::store::{LocalStore, StoreError};
use edgeshift_common::{Fingerprint, Manifest};

/// The chunks the store at `store` holds (none when it does not exist).
pub fn chunk_set(store: &Path) -> Result<HashSet<Fingerprint>, StoreError> {
    if !store.exists() {
        return Ok(HashSet::new());
    }
    Ok(LocalStore::open(store)?.list_chunks()?.into_iter().collect())
}

/// Bytes of `final_disk`'s distinct non-zero chunks that `dst` lacked, by
/// which of `paths` held them (bit i: `paths[i]`; the source, path 0, holds
/// all of its disk, so `paths` may be empty when it is the only one).
pub fn lacked_by_holders(
    final_disk: &Manifest,
    dst: &HashSet<Fingerprint>,
    paths: &[HashSet<Fingerprint>],
) -> HashMap<u32, u64> {
    let mut seen = HashSet::new();
    let mut out = HashMap::new();
    for (i, fp) in final_disk.chunks.iter().enumerate() {
        if fp.is_zero_chunk() || dst.contains(fp) || !seen.insert(*fp) {
            continue;
        }
        let mut held = 1u32;
        for (p, set) in paths.iter().enumerate().skip(1) {
            if set.contains(fp) {
                held |= 1 << p;
            }
        }
        *out.entry(held).or_default() += final_disk.chunk_len(i);
    }
    out
}
