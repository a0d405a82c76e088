//! `edgeshift agent`: the daemon that serves this edge's chunks and manifests
//! to authenticated peers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use edgeshift_agent::store::LocalStore;
use edgeshift_agent::transfer::fetch::default_node_id;
use edgeshift_agent::transfer::server::{serve, ServerConfig, ZstdPolicy};
use edgeshift_agent::transfer::ClusterKey;
use std::io::Write;

/// Serve chunks and manifests from a store to peers that hold the cluster key.
///
/// Peers authenticate both ways (keyed BLAKE3 challenge-response) before any
/// manifest or chunk flows; a peer that fails is dropped and logged, and
/// counted in `edgeshift_auth_failures_total`. Uncompressed chunks are sent
/// from the store's files with sendfile(2); a chunk is zstd-compressed only
/// when the fetcher allows it and it makes that path finish sooner.
/// Prints `listening on ADDR` on standard output once bound (port 0 picks one).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on for peers, e.g. 0.0.0.0:7070 (port 0: any free port).
    #[arg(long)]
    listen: SocketAddr,
    /// The chunk store directory to serve (created if absent).
    #[arg(long)]
    store: PathBuf,
    /// File holding the cluster key: 64 hex digits (`head -c32 /dev/urandom | xxd -p -c64`).
    #[arg(long)]
    cluster_key_file: PathBuf,
    /// This node's id, announced to peers (default: the host name).
    #[arg(long)]
    id: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Never compress chunks, even when a fetcher allows it.
    #[arg(long)]
    no_zstd: bool,
    /// Report to the cache coordinator at URL (http://HOST:PORT): inventory and
    /// deltas, then carry out its GC (never a locally pinned chunk) and prefetch orders.
    #[arg(long, requires = "capacity")]
    coordinator: Option<String>,
    /// File holding the coordinator's bearer token.
    #[arg(long, requires = "coordinator")]
    token_file: Option<PathBuf>,
    /// Bytes the store may use, e.g. 200GiB; the coordinator's GC keeps it under its watermarks.
    #[arg(long, value_parser = edgeshift_common::parse_size)]
    capacity: Option<u64>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let key = ClusterKey::from_file(&args.cluster_key_file)?;
    let store = LocalStore::open_or_create(&args.store)
        .with_context(|| format!("opening the store {}", args.store.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        if let Some(addr) = args.metrics_listen {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .install()
                .with_context(|| format!("starting the metrics listener on {addr}"))?;
            tracing::info!(%addr, "metrics at /metrics");
        }
        let zstd = if args.no_zstd {
            ZstdPolicy { compress_rate: 0.0 }
        } else {
            ZstdPolicy::calibrate()
        };
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let local = listener.local_addr().context("reading the bound address")?;
        let id = args.id.unwrap_or_else(default_node_id);
        tracing::info!(%local, %id, store = %args.store.display(), zstd_mb_per_s = zstd.compress_rate / 1e6, "agent serving");
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening on {local}")?;
            out.flush()?;
        }
        let store = Arc::new(store);
        let link = match (&args.coordinator, args.capacity) {
            (Some(url), Some(capacity)) => Some(edgeshift_agent::coordination::link::start(
                url, args.token_file.as_deref(), capacity, &id, local, store.clone(), key.clone(),
            )?),
            _ => None,
        };
        let cfg = Arc::new(ServerConfig {
            id,
            key,
            store,
            zstd,
            uses: link.as_ref().map(|l| l.uses()),
        });
        serve(listener, cfg).await.context("serving peers")?;
        Ok(())
    })
}
