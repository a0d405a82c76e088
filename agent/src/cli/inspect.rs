//! `edgeshift inspect [ID] --store DIR [--json] [--verify]`.

use std::path::PathBuf;

use edgeshift_agent::slicer::inspect_image;
use edgeshift_agent::store::{ChunkStore, LocalStore};
use edgeshift_common::ManifestId;

/// Show an image's figures: size, chunk size, chunks, unique and zero chunks,
/// and how much of it the store holds. Without ID: the store's own figures
/// (chunk files, their bytes, the manifests it holds).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Manifest id (64 hex digits); omit it for the whole store.
    pub id: Option<ManifestId>,
    /// Chunk store directory.
    #[arg(long)]
    pub store: PathBuf,
    /// One JSON object: image_size, chunk_size, chunks, unique_chunks,
    /// zero_chunks, unique_bytes, stored_chunks, stored_bytes, missing_chunks,
    /// manifest_bytes, manifest_id (and corrupt_chunks with --verify).
    #[arg(long)]
    pub json: bool,
    /// Also re-read and hash every stored chunk of the image; exits non-zero
    /// if any is corrupt or missing.
    #[arg(long)]
    pub verify: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let store = LocalStore::open(&args.store)?;
    let Some(id) = args.id else {
        return store_figures(&store, &args);
    };
    let f = inspect_image(&store, &id, args.verify)?;
    if args.json {
        println!("{}", serde_json::to_string(&f)?);
    } else {
        let rows: [(&str, String); 11] = [
            ("manifest", f.manifest_id.to_string()),
            ("image size", f.image_size.to_string()),
            ("chunk size", f.chunk_size.to_string()),
            ("chunks", f.chunks.to_string()),
            ("unique chunks", f.unique_chunks.to_string()),
            ("zero chunks", f.zero_chunks.to_string()),
            ("unique bytes", f.unique_bytes.to_string()),
            ("stored chunks", f.stored_chunks.to_string()),
            ("stored bytes", f.stored_bytes.to_string()),
            ("missing chunks", f.missing_chunks.to_string()),
            ("manifest bytes", f.manifest_bytes.to_string()),
        ];
        for (k, v) in rows {
            println!("{k:<15} {v}");
        }
        if let Some(bad) = &f.corrupt_chunks {
            println!("{:<15} {}", "corrupt chunks", bad.len());
            for fp in bad {
                println!("  {fp}");
            }
        }
    }
    if args.verify {
        let corrupt = f.corrupt_chunks.as_ref().map_or(0, Vec::len);
        if corrupt > 0 || f.missing_chunks > 0 {
            anyhow::bail!(
                "image {} is not whole in the store: {} corrupt, {} missing chunks",
                f.manifest_id,
                corrupt,
                f.missing_chunks
            );
        }
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct StoreFigures {
    chunks: u64,
    chunk_bytes: u64,
    manifests: Vec<ManifestId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    corrupt_chunks: Option<Vec<edgeshift_common::Fingerprint>>,
}

fn store_figures(store: &LocalStore, args: &Args) -> anyhow::Result<()> {
    let stats = store.stats()?;
    let f = StoreFigures {
        chunks: stats.chunks,
        chunk_bytes: stats.chunk_bytes,
        manifests: store.list_manifests()?,
        corrupt_chunks: if args.verify {
            Some(store.verify_all_chunks()?)
        } else {
            None
        },
    };
    if args.json {
        println!("{}", serde_json::to_string(&f)?);
    } else {
        println!("{:<15} {}", "store", store.root().display());
        println!("{:<15} {}", "chunks", f.chunks);
        println!("{:<15} {}", "chunk bytes", f.chunk_bytes);
        println!("{:<15} {}", "manifests", f.manifests.len());
        for id in &f.manifests {
            println!("  {id}");
        }
    }
    if let Some(bad) = &f.corrupt_chunks {
        if !bad.is_empty() {
            anyhow::bail!(
                "{} corrupt chunks in {}: {}",
                bad.len(),
                store.root().display(),
                bad.iter().map(|fp| fp.to_string()).collect::<Vec<_>>().join(", ")
            );
        }
    }
    Ok(())
}
