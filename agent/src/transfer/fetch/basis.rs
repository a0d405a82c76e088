//! The delta basis of a fetch: for a wanted image, the nearest earlier
//! version of it this store holds (a manifest of the same image size and
//! chunk size sharing the most chunks at the same places), so that each
//! wanted chunk can be asked for as the 4 KiB blocks that differ from the
//! chunk this store holds at its place (`ChunkWant::base`).

use std::collections::HashMap;

use edgeshift_common::{Fingerprint, Manifest, ManifestId};
use tracing::debug;

use crate::store::{ChunkStore, LocalStore, StoreError};

/// Per wanted chunk, the chunk this store holds at its place in the
/// nearest earlier version of the image.
#[derive(Debug, Default)]
pub struct Basis {
    /// The manifest the bases come from, if any was near.
    pub from: Option<ManifestId>,
    by_want: HashMap<Fingerprint, Fingerprint>,
}

impl Basis {
    /// The base for wanted chunk `fp`, if this store holds one.
    pub fn base_of(&self, fp: &Fingerprint) -> Option<Fingerprint> {
        self.by_want.get(fp).copied()
    }

    /// Wanted chunks that have a base.
    pub fn len(&self) -> usize {
        self.by_want.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_want.is_empty()
    }
}

/// Of the manifests in `store` other than `want` with its image size and
/// chunk size, the one with the most chunks equal at the same index; None
/// when none shares any.
pub fn nearest_manifest(
    store: &LocalStore,
    want: &Manifest,
) -> Result<Option<(ManifestId, Manifest)>, StoreError> {
    let mut best: Option<(usize, ManifestId, Manifest)> = None;
    for id in store.list_manifests()? {
        // A manifest that cannot be read is no basis; the fetch goes on without it.
        let Ok(m) = store.get_manifest(&id) else { continue };
        if m.image_size != want.image_size || m.chunk_size != want.chunk_size || m == *want {
            continue;
        }
        let same = m
            .chunks
            .iter()
            .zip(&want.chunks)
            .filter(|(a, b)| a == b && !a.is_zero_chunk())
            .count();
        if same > 0 && best.as_ref().is_none_or(|(n, _, _)| same > *n) {
            best = Some((same, id, m));
        }
    }
    Ok(best.map(|(_, id, m)| (id, m)))
}

/// The basis of `want` in `store`: for each chunk of `want` this store
/// lacks, the chunk at its index in the nearest manifest, when the store
/// holds it and it is not all zeros.
pub fn basis_for(store: &LocalStore, want: &Manifest) -> Result<Basis, StoreError> {
    let Some((id, near)) = nearest_manifest(store, want)? else {
        return Ok(Basis::default());
    };
    let mut by_want = HashMap::new();
    for (w, b) in want.chunks.iter().zip(&near.chunks) {
        if w == b || w.is_zero_chunk() || b.is_zero_chunk() || by_want.contains_key(w) {
            continue;
        }
        if store.has_chunk(w)? || !store.has_chunk(b)? {
            continue;
        }
        by_want.insert(*w, *b);
    }
    debug!(basis = %id, bases = by_want.len(), "delta basis");
    Ok(Basis {
        from: Some(id),
        by_want,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeshift_common::ChunkSize;

    fn chunk(seed: u8) -> Vec<u8> {
        vec![seed; 4096]
    }

    #[test]
    fn the_nearest_manifest_gives_the_bases_of_the_chunks_that_changed() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = LocalStore::open_or_create(dir.path()).expect("store");
        let cs = ChunkSize::new(4096).expect("size");
        let put = |seed: u8| {
            let data = chunk(seed);
            let fp = Fingerprint::of(&data);
            store.put_chunk(&fp, &data).expect("put");
            fp
        };
        let (a, b, c, d) = (put(1), put(2), put(3), put(4));
        let fresh = Fingerprint::of(&chunk(9));
        let far = Manifest::new(cs, 3 * 4096, vec![d, d, d]);
        let near = Manifest::new(cs, 3 * 4096, vec![a, b, c]);
        let other_size = Manifest::new(cs, 4 * 4096, vec![a, b, c, d]);
        for m in [&far, &near, &other_size] {
            store.put_manifest(m).expect("manifest");
        }
        // Index 1 changed (a chunk not held here); index 2 is held already.
        let want = Manifest::new(cs, 3 * 4096, vec![a, fresh, d]);
        store.put_manifest(&want).expect("manifest");
        let basis = basis_for(&store, &want).expect("basis");
        assert_eq!(basis.from, Some(store.put_manifest(&near).expect("id")));
        assert_eq!(basis.base_of(&fresh), Some(b));
        assert_eq!(basis.len(), 1, "only the chunk this store lacks");
    }
}
