//! `edgeshift slice IMAGE --store DIR [--chunk-size SIZE] [--json]`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use edgeshift_agent::slicer::{slice_image, ReadMode, SliceOptions};
use edgeshift_agent::store::LocalStore;
use edgeshift_common::ChunkSize;

/// Slice an image into content-addressed chunks in a store.
///
/// Reads IMAGE with io_uring, names every chunk by its BLAKE3 fingerprint,
/// stores the chunks the store lacks (all-zero chunks are never stored) and
/// the image's manifest. The manifest id (64 hex digits) is the last line of
/// standard output; give it to `restore`, `inspect` and `fetch`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  edgeshift slice disk.raw --store /var/lib/edgeshift/store\n  \
edgeshift slice /dev/loop3 --store store --chunk-size 1MiB --json\n  \
edgeshift slice debian.qcow2 --store store\n\n\
qcow2, vmdk, vdi, vhdx, vhd and qed files (and their backing chains) are sliced\n\
through the raw view qemu-storage-daemon exports over FUSE, after `qemu-img check`:\n\
no raw copy is written, and the manifest is the one of `qemu-img convert -O raw`'s output."
)]
pub struct Args {
    /// Image file (raw, or a format QEMU reads: qcow2, vmdk, ...) or block
    /// device (/dev/loopN, /dev/nbdN, an LV).
    pub image: PathBuf,
    /// Chunk store directory; created if it does not exist.
    #[arg(long)]
    pub store: PathBuf,
    /// Chunk size: a power of two from 4KiB to 16MiB (4096, 64KiB, 4MiB...).
    #[arg(long, default_value_t = ChunkSize::DEFAULT)]
    pub chunk_size: ChunkSize,
    /// How to read the image: `direct` (O_DIRECT), `buffered` (page cache),
    /// or `auto` (buffered if the image is mostly in the page cache already).
    #[arg(long, value_enum, default_value_t = ReadMode::Auto)]
    pub read_mode: ReadMode,
    /// Print a one-line JSON report before the id line (the id stays last).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Check the image before creating a store for it.
    std::fs::metadata(&args.image).with_context(|| format!("image {}", args.image.display()))?;
    let store = LocalStore::open_or_create(&args.store)?;
    let size = std::fs::metadata(&args.image).map(|m| m.len()).unwrap_or(0);
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(size);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let on_progress = |done: u64| {
        if let Some(b) = &bar {
            if b.length() < Some(done) {
                b.set_length(done);
            }
            b.set_position(done);
        }
    };
    let opts = SliceOptions {
        chunk_size: args.chunk_size,
        read_mode: args.read_mode,
        progress: Some(&on_progress),
    };
    let result = slice_image(&args.image, &store, &opts);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let report = result.with_context(|| format!("slicing {}", args.image.display()))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        eprintln!(
            "{} bytes, {} chunks of {}: {} new, {} already stored, {} zero; {:.2}s ({} reads)",
            report.image_size,
            report.chunks,
            args.chunk_size,
            report.new_chunks,
            report.present_chunks,
            report.zero_chunks,
            report.seconds,
            report.read_mode
        );
    }
    println!("{}", report.manifest_id);
    Ok(())
}
