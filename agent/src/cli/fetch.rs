//! `edgeshift fetch`: pull an image's missing chunks from several peers at once.

use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use edgeshift_agent::slicer::place::ImageInPlace;
use edgeshift_agent::store::LocalStore;
use edgeshift_agent::transfer::fetch::{FetchOptions, Fetcher};
use edgeshift_common::ManifestId;

use crate::cli::args::{ClusterArgs, CoordinatorArgs};

/// Fetch an image's missing chunks from several peers at once.
///
/// Fetches manifest ID and every chunk the local store lacks, from all peers at once.
///
/// The manifest comes from the first peer that has it and must hash to ID.
/// Chunks are striped over the peers by measured path throughput; a slow path's
/// work is taken by faster ones at the tail. Every chunk is hashed before it is
/// stored; a peer that sends wrong bytes is dropped for this fetch, and a peer
/// that dies or stalls costs only its in-flight chunks. Stored chunks are
/// durable, so running the same fetch again after an interruption fetches only
/// what is still missing.
///
/// A chunk of which this store holds an earlier version (the chunk at its
/// place in the nearest other manifest of the same size) is asked for as the
/// 4 KiB blocks that differ, from peers holding both.
///
/// With --out IMAGE the image is written as the chunks arrive (those held
/// here at once) under a hidden temp name beside IMAGE, renamed to IMAGE
/// once complete and synced: byte-equal to `edgeshift restore`, and a failed
/// or killed fetch leaves no IMAGE. Without it, restore the image afterwards
/// with `edgeshift restore`.
///
/// With --coordinator the sources come from the coordinator instead of
/// --peer: the image is pinned here (edge --id), fetched from the planned
/// holders, and the measured path rates are reported back.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Manifest id (64 hex digits) of the image to fetch. (Not `id`: that
    /// name is this edge's `--id`, and clap keys arguments by name.)
    #[arg(value_name = "ID")]
    manifest: ManifestId,
    /// The local chunk store to fill (created if absent).
    #[arg(long)]
    store: PathBuf,
    /// A peer agent's address (HOST:PORT); repeat for several. Needed
    /// unless a coordinator is set.
    // Checked in `run`: clap's required_unless_present would not count a
    // coordinator that comes from the configuration file.
    #[arg(long = "peer")]
    peers: Vec<String>,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Print one JSON object with the figures instead of a summary line.
    #[arg(long)]
    json: bool,
    /// Drop a peer that sends nothing for this many seconds while chunks are outstanding.
    #[arg(long, default_value_t = 10.0)]
    stall_timeout: f64,
    /// Drop a peer that, while chunks are outstanding, delivers less than
    /// this per second over a whole --stall-timeout (a peer trickling a
    /// byte at a time would otherwise hold its chunks forever). A size:
    /// `16KiB` means 16 KiB/s.
    #[arg(long, default_value = "16KiB", value_parser = edgeshift_common::parse_size)]
    min_peer_rate: u64,
    /// Never ask peers for zstd-compressed chunks.
    #[arg(long)]
    no_zstd: bool,
    /// Also write the image here as its chunks arrive (renamed into place
    /// once complete and synced).
    #[arg(long, value_name = "IMAGE")]
    out: Option<PathBuf>,
    #[command(flatten)]
    coord: CoordinatorArgs,
}

fn resolve(peer: &str) -> anyhow::Result<SocketAddr> {
    peer.to_socket_addrs()
        .with_context(|| format!("peer address {peer:?} (expected HOST:PORT)"))?
        .next()
        .with_context(|| format!("peer address {peer:?} resolves to nothing"))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.peers.is_empty() || args.coord.coordinator.is_some(),
        "fetch needs --peer ADDR (repeatable) or a coordinator (--coordinator URL, or `coordinator` in the configuration file)"
    );
    let mut args = args;
    let trust = args.cluster.trust()?;
    let peers = args
        .peers
        .iter()
        .map(|p| resolve(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let store = LocalStore::open_or_create(&args.store)
        .with_context(|| format!("opening the store {}", args.store.display()))?;
    if !(args.stall_timeout > 0.0 && args.stall_timeout.is_finite()) {
        anyhow::bail!("--stall-timeout must be a positive number of seconds");
    }
    let opts = FetchOptions {
        stall_timeout: Duration::from_secs_f64(args.stall_timeout),
        min_peer_rate: args.min_peer_rate,
        zstd: !args.no_zstd,
        ..FetchOptions::default()
    };
    args.coord.refuse_token_file()?;
    let coordinated = match &args.coord.coordinator {
        Some(url) => Some(edgeshift_agent::coordination::fetch::CoordinatedFetch::begin_url(
            url,
            args.coord.tls_for(args.cluster.coordinator_tls()).as_ref(),
            &store,
            &args.cluster.id.id,
            &args.manifest,
        )?),
        None => None,
    };
    let peers = coordinated.as_ref().map(|c| c.peers.clone()).unwrap_or(peers);
    let store = Arc::new(store);
    let mut fetcher = Fetcher::with_options(Arc::clone(&store), peers, trust, opts);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let placing = match &args.out {
        Some(out) => {
            let manifest = rt
                .block_on(fetcher.fetch_manifest(&args.manifest))
                .with_context(|| format!("fetching the manifest {}", args.manifest))?;
            let place = ImageInPlace::start(store, args.manifest, manifest, out)
                .with_context(|| format!("starting the image {}", out.display()))?;
            fetcher = fetcher.with_placement(place.sink());
            Some(place)
        }
        None => None,
    };
    let progress = fetcher.progress();
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(bar)
    } else {
        None
    };
    let report = rt.block_on(async {
        let ticker = bar.clone().map(|bar| {
            let progress = progress.clone();
            tokio::spawn(async move {
                loop {
                    bar.set_length(progress.total_bytes.load(Ordering::Relaxed));
                    bar.set_position(progress.bytes.load(Ordering::Relaxed));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        });
        let r = match &coordinated {
            Some(c) => c.run(&fetcher).await,
            None => fetcher.fetch(&args.manifest).await.map_err(Into::into),
        };
        if let Some(t) = ticker {
            t.abort();
        }
        r
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let report = report.with_context(|| format!("fetching {}", args.manifest))?;
    drop(fetcher);
    if let (Some(place), Some(out)) = (placing, &args.out) {
        place
            .finish()
            .with_context(|| format!("writing the image {}", out.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "fetched {} chunks, {} bytes in {:.2} s ({:.1} Mbit/s)",
            report.chunks_fetched,
            report.bytes_received,
            report.seconds,
            if report.seconds > 0.0 {
                report.bytes_received as f64 * 8.0 / report.seconds / 1e6
            } else {
                0.0
            }
        );
        for p in &report.peers {
            println!(
                "  {}: {} chunks, {} bytes, {:.1} Mbit/s{}",
                p.addr,
                p.chunks,
                p.bytes,
                p.mbit_per_s,
                p.dropped
                    .as_deref()
                    .map(|d| format!(" (dropped: {d})"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}
