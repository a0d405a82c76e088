//! Two images that share a base (one derived from the other by removing,
//! rewriting and adding files) share most chunks in a store, and `inspect
//! --json` gives exact figures: every one is checked against a count made
//! here from the image bytes with blake3 directly.

mod image_util;

use std::collections::HashSet;
use std::fs;

use image_util::*;

fn check_figures(id: &str, store: &std::path::Path, want: &Expected, size: u64, cs: u64) {
    let got = inspect_json(id, store);
    assert_eq!(got["manifest_id"], id);
    assert_eq!(got["image_size"], size);
    assert_eq!(got["chunk_size"], cs);
    assert_eq!(got["chunks"], want.chunks);
    assert_eq!(got["zero_chunks"], want.zero_chunks);
    assert_eq!(got["unique_chunks"], want.unique.len() as u64);
    assert_eq!(got["unique_bytes"], want.unique_bytes);
    assert_eq!(got["stored_chunks"], want.unique.len() as u64);
    assert_eq!(got["stored_bytes"], want.unique_bytes);
    assert_eq!(got["missing_chunks"], 0);
    assert_eq!(got["manifest_bytes"], 32 + 32 * want.chunks);
}

#[test]
fn derived_images_share_most_chunks_and_figures_are_exact() {
    let base = image("small-base.img");
    let derived = image("small-derived.img");
    let (b, d) = (fs::read(&base).expect("read"), fs::read(&derived).expect("read"));
    assert_ne!(b, d, "the derived image must differ from its base");
    // At 1 MiB and more, scattered directory and inode-table updates touch
    // most chunks of this small, densely packed file system (see
    // docs/chunk-size.md for the whole table).
    for cs in [4096usize, 16 << 10, 64 << 10] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store");
        let (eb, ed) = (expected(&b, cs), expected(&d, cs));
        let shared: HashSet<_> = eb.unique.intersection(&ed.unique).collect();
        let only_derived = ed.unique.len() - shared.len();

        let id_b = slice(&base, &store, &cs.to_string());
        check_figures(&id_b, &store, &eb, b.len() as u64, cs as u64);

        // The second slice writes only the chunks the base lacks.
        let out = ok(&[
            "slice",
            derived.to_str().expect("utf-8"),
            "--store",
            store.to_str().expect("utf-8"),
            "--chunk-size",
            &cs.to_string(),
            "--json",
        ]);
        let report: serde_json::Value =
            serde_json::from_str(out.lines().next().expect("json line")).expect("slice --json");
        let id_d = out.lines().last().expect("id line").to_string();
        assert_eq!(report["manifest_id"], id_d.as_str());
        assert_eq!(report["new_chunks"], only_derived as u64, "chunk size {cs}");
        assert_eq!(report["present_chunks"], shared.len() as u64, "chunk size {cs}");
        check_figures(&id_d, &store, &ed, d.len() as u64, cs as u64);

        // "Most": more than half of the derived image's distinct chunks are
        // already in the base (in practice far more at small sizes).
        assert!(
            shared.len() * 2 > ed.unique.len(),
            "chunk size {cs}: only {} of {} chunks shared",
            shared.len(),
            ed.unique.len()
        );
        // The store holds the union, once each.
        let union = eb.unique.union(&ed.unique).count() as u64;
        let chunk_files = snapshot(&store.join("chunks")).len() as u64;
        assert_eq!(chunk_files, union, "chunk size {cs}");
        // The store reports the same, and the manifests it holds.
        let whole = ok(&["inspect", "--store", store.to_str().expect("utf-8"), "--json"]);
        let whole: serde_json::Value = serde_json::from_str(whole.trim()).expect("store json");
        assert_eq!(whole["chunks"], union);
        assert_eq!(
            whole["chunk_bytes"],
            eb.unique_bytes + report["new_bytes"].as_u64().expect("new_bytes")
        );
        let mut ids = vec![id_b.clone(), id_d.clone()];
        ids.sort();
        assert_eq!(whole["manifests"], serde_json::json!(ids));
        eprintln!(
            "chunk size {cs}: base {} / derived {} distinct chunks, {} shared",
            eb.unique.len(),
            ed.unique.len(),
            shared.len()
        );
    }
}
