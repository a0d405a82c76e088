//! `edgeshift restore ID --store DIR --out PATH`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use edgeshift_agent::slicer::restore_image;
use edgeshift_agent::store::{ChunkStore, LocalStore};
use edgeshift_common::ManifestId;

/// Rebuild an image byte for byte from its manifest id.
///
/// Every chunk is verified against its fingerprint before it is written. A
/// file is built next to PATH and renamed onto it only once whole and synced
/// (a failed restore leaves nothing at PATH); zero chunks become holes. If
/// PATH is an existing block device it is written in place and read back.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Manifest id (64 hex digits, as `slice` printed it).
    pub id: ManifestId,
    /// Chunk store directory holding the manifest and its chunks.
    #[arg(long)]
    pub store: PathBuf,
    /// Where to write the image: a file path, or an existing block device.
    #[arg(long)]
    pub out: PathBuf,
    /// Print a one-line JSON report.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let store = LocalStore::open(&args.store)?;
    let size = store.get_manifest(&args.id)?.image_size;
    let bar = std::io::stderr()
        .is_terminal()
        .then(|| indicatif::ProgressBar::new(size));
    let on_progress = |done: u64| {
        if let Some(b) = &bar {
            b.set_position(done);
        }
    };
    let result = restore_image(&store, &args.id, &args.out, Some(&on_progress));
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let report = result.with_context(|| format!("restoring {} to {}", args.id, args.out.display()))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        eprintln!(
            "{}: {} bytes, {} chunks written, {} zero chunks, {:.2}s",
            report.out.display(),
            report.image_size,
            report.chunks_written,
            report.zero_chunks,
            report.seconds
        );
    }
    Ok(())
}
