//! The slicer's two ways in (a mapping of a cached image, reads into
//! buffers) agree, and each stores only what the store lacks.

use std::path::Path;

use edgeshift_common::{ChunkSize, Fingerprint};

use super::{slice_image, ReadMode, SliceOptions, SliceReport};
use crate::store::{ChunkStore, LocalStore};

const CS: usize = 64 << 10;

/// 40 chunks and a short tail: pseudo-random ones, zero ones, repeats.
fn image(dir: &Path) -> std::path::PathBuf {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut bytes = Vec::new();
    for i in 0..40 {
        if i % 7 == 3 {
            bytes.extend(std::iter::repeat_n(0u8, CS));
        } else if i % 11 == 5 {
            let copy = bytes[..CS].to_vec();
            bytes.extend(copy);
        } else {
            for _ in 0..CS / 8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
    bytes.extend_from_slice(&[0x5a; 1000]);
    let p = dir.join("image.raw");
    std::fs::write(&p, bytes).expect("write image");
    p
}

fn slice(img: &Path, store: &LocalStore, mode: ReadMode) -> SliceReport {
    let opts = SliceOptions {
        chunk_size: ChunkSize::new(CS as u64).expect("chunk size"),
        read_mode: mode,
        progress: None,
    };
    slice_image(img, store, &opts).expect("slice")
}

#[test]
fn mapped_and_read_slices_agree_and_store_only_what_is_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path());
    let mapped = LocalStore::open_or_create(dir.path().join("mapped")).expect("store");
    let read = LocalStore::open_or_create(dir.path().join("read")).expect("store");
    let a = slice(&img, &mapped, ReadMode::Buffered);
    let b = slice(&img, &read, ReadMode::Direct);
    assert_eq!((a.read_mode, b.read_mode), ("buffered", "direct"));
    assert_eq!(a.manifest_id, b.manifest_id);
    assert_eq!(a.new_chunks, a.unique_chunks);
    assert_eq!((a.new_chunks, a.zero_chunks), (b.new_chunks, b.zero_chunks));
    assert!(a.zero_chunks > 0 && a.unique_chunks < a.chunks - a.zero_chunks);
    assert!(mapped.verify_all_chunks().expect("verify").is_empty());

    // Half the chunks gone: the mapped path copies out only those.
    let m = mapped.get_manifest(&a.manifest_id).expect("manifest");
    let unique: Vec<Fingerprint> = m.unique_chunks().into_iter().collect();
    for fp in unique.iter().step_by(2) {
        assert!(mapped.remove_chunk(fp).expect("remove"));
    }
    let again = slice(&img, &mapped, ReadMode::Buffered);
    assert_eq!(again.manifest_id, a.manifest_id);
    assert_eq!(again.new_chunks as usize, unique.len().div_ceil(2));
    assert_eq!(again.present_chunks as usize, unique.len() / 2);
    assert!(mapped.verify_all_chunks().expect("verify").is_empty());
    for mode in [ReadMode::Buffered, ReadMode::Direct] {
        let full = slice(&img, &read, mode);
        assert_eq!((full.new_chunks, full.present_chunks), (0, b.unique_chunks));
    }
}
