//! A VM disk as chunks: slicing a file or live block device into a manifest
//! (optionally storing the chunks) and re-reading single chunks. Restoring
//! an image is the slicer's (`slicer::restore_image`, through `diskio`).
//!
//! Until the slicer module lands these are the migration engine's own
//! sequential readers; they read through the page cache, which stays
//! coherent with the guest's O_DIRECT writes (the kernel invalidates cached
//! pages a direct write covers).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use edgeshift_common::{ChunkSize, Fingerprint, Manifest};

use super::VmError;
use crate::store::ChunkStore;

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VmError + 'a {
    move |source| VmError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Size in bytes of a file or block device.
pub fn device_size(path: &Path) -> Result<u64, VmError> {
    use std::io::Seek;
    let mut f = File::open(path).map_err(io("open", path))?;
    f.seek(std::io::SeekFrom::End(0)).map_err(io("seek", path))
}

/// Fingerprint of one chunk's bytes, the hole marker for all-zero bytes.
pub fn fingerprint_chunk(data: &[u8]) -> Fingerprint {
    if data.iter().all(|&b| b == 0) {
        Fingerprint::ZERO_CHUNK
    } else {
        Fingerprint::of(data)
    }
}

/// Reads chunk `index` of `manifest`'s layout from `f`.
pub fn read_chunk(
    f: &File,
    path: &Path,
    chunk_size: ChunkSize,
    image_size: u64,
    index: usize,
) -> Result<Vec<u8>, VmError> {
    let off = index as u64 * chunk_size.bytes();
    let len = (image_size - off).min(chunk_size.bytes()) as usize;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off).map_err(io("read", path))?;
    Ok(buf)
}

/// Slices `path` (a file or a block device) into a manifest. With a store,
/// each non-zero chunk the store lacks is put into it.
pub fn slice(
    path: &Path,
    chunk_size: ChunkSize,
    store: Option<&dyn ChunkStore>,
) -> Result<Manifest, VmError> {
    let size = device_size(path)?;
    let f = File::open(path).map_err(io("open", path))?;
    let count = edgeshift_common::manifest::chunk_count(size, chunk_size) as usize;
    let mut chunks = Vec::with_capacity(count);
    for i in 0..count {
        let data = read_chunk(&f, path, chunk_size, size, i)?;
        let fp = fingerprint_chunk(&data);
        if let Some(s) = store {
            if !fp.is_zero_chunk() && !s.has_chunk(&fp)? {
                s.put_chunk(&fp, &data)?;
            }
        }
        chunks.push(fp);
    }
    Ok(Manifest::new(chunk_size, size, chunks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    #[test]
    fn slice_restore_round_trip_with_holes_and_short_tail() {
        let dir = tempfile::tempdir().expect("temp dir");
        let img = dir.path().join("img");
        let cs = ChunkSize::new(4096).expect("chunk size");
        let mut data = vec![0u8; 4096 * 5 + 100];
        data[10] = 1;
        data[4096 * 3..4096 * 4].fill(7);
        data[4096 * 5 + 50] = 9;
        std::fs::write(&img, &data).expect("write image");
        let store = LocalStore::open_or_create(dir.path().join("store")).expect("store");
        let m = slice(&img, cs, Some(&store)).expect("slice");
        assert_eq!(m.chunks.len(), 6);
        assert!(m.chunks[1].is_zero_chunk());
        assert!(!m.chunks[5].is_zero_chunk());
        // Restored (as `edgeshift vm run` does) byte for byte.
        let id = store.put_manifest(&m).expect("manifest");
        let out = dir.path().join("out");
        crate::slicer::restore_image(&store, &id, &out, None).expect("restore");
        assert_eq!(std::fs::read(&out).expect("read back"), data);
    }
}
