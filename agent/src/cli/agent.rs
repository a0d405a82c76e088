//! `edgeshift agent`: the one daemon of an edge. It serves this edge's
//! chunks and manifests to authenticated peers, receives migrations
//! (`--migrate-listen`), keeps the coordinator link and exports the metrics,
//! all on one async runtime.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use edgeshift_agent::migrate::destination::{self, HostConfig};
use edgeshift_agent::store::LocalStore;
use edgeshift_agent::transfer::server::{serve, ServerConfig, ZstdPolicy};
use edgeshift_agent::vm::Qemu;

use crate::cli::args::{ClusterArgs, CoordinatorArgs, StateArgs};

/// Run the edge's one daemon: serve chunks, receive migrations, report to the coordinator.
///
/// It serves chunks and manifests to peers that hold the cluster key. Peers authenticate both ways (keyed BLAKE3 challenge-response) before any
/// manifest or chunk flows; a peer that fails is dropped and logged, and
/// counted in `edgeshift_auth_failures_total`. Uncompressed chunks are sent
/// from the store's files with sendfile(2); a chunk is zstd-compressed only
/// when the fetcher allows it and it makes that path finish sooner.
///
/// With --migrate-listen it also receives VMs (`edgeshift migrate --to`
/// names that address): their chunks go into this store, their records
/// into --state-dir.
///
/// With --coordinator (and --capacity) it reports inventory and deltas
/// under --id, carries out the coordinator's GC (never a locally pinned
/// chunk) and prefetch orders; an incoming VM's missing chunks then come
/// from the edges the coordinator's plan names (ranked by measured path
/// rate; the source and the origin included), its image is pinned while it
/// arrives and its final image once it runs here, and an unreachable
/// coordinator fails the migration before anything starts. Without it, an
/// incoming VM's chunks come from the source and the holders it names
/// (`edgeshift migrate --peer`).
///
/// Prints `listening on ADDR` on standard output once bound (port 0 picks
/// one), after `receiving migrations on ADDR` when --migrate-listen is given.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on for peers, e.g. 0.0.0.0:7070 (port 0: any free port).
    #[arg(long)]
    listen: SocketAddr,
    /// Address to listen on for migrations into this edge (the control
    /// channel `edgeshift migrate --to` connects to), e.g. 0.0.0.0:7080.
    /// Without it this agent receives no VMs.
    #[arg(long)]
    migrate_listen: Option<SocketAddr>,
    /// The chunk store directory to serve (created if absent).
    #[arg(long)]
    store: PathBuf,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Never compress chunks, even when a fetcher allows it.
    #[arg(long)]
    no_zstd: bool,
    #[command(flatten)]
    coord: CoordinatorArgs,
    /// Bytes the store may use, e.g. 200GiB; the coordinator's GC keeps it
    /// under its watermarks. Needed with --coordinator.
    #[arg(long, value_parser = edgeshift_common::parse_size)]
    capacity: Option<u64>,
    /// Plan incoming VMs' sources from the holders the source names
    /// (`edgeshift migrate --source-addr/--peer`) even with --coordinator,
    /// and pin nothing for them at the coordinator: what a `vm host`
    /// without --coordinator beside a coordinated agent did.
    #[arg(long, requires = "migrate_listen")]
    uncoordinated_migrations: bool,
    #[command(flatten)]
    state: StateArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // The coordinator's GC keeps the store under watermarks of this figure;
    // a guess (the file system's size, say) could let it fill a shared disk.
    let capacity = match (&args.coord.coordinator, args.capacity) {
        (Some(_), None) => anyhow::bail!(
            "--coordinator needs --capacity (e.g. --capacity 200GiB): the coordinator's GC keeps this store under watermarks of it"
        ),
        (_, c) => c,
    };
    let key = args.cluster.key()?;
    let id = args.cluster.id.id.clone();
    // One store for the chunk server, the coordinator link and incoming VMs.
    let store = Arc::new(
        LocalStore::open_or_create(&args.store)
            .with_context(|| format!("opening the store {}", args.store.display()))?,
    );
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
        // Migrations come on a port of their own: on the control channel
        // the server speaks first, so its connections cannot be told from
        // a chunk peer's by their first bytes without waiting on a timer.
        let incoming = match args.migrate_listen {
            Some(addr) => {
                let host = destination::open(
                    HostConfig {
                        state_dir: args.state.state_dir.clone(),
                        key: key.clone(),
                        id: id.clone(),
                        qemu: Qemu::default(),
                        coordinator: args
                            .coord
                            .config(&args.cluster.id)
                            .filter(|_| !args.uncoordinated_migrations),
                    },
                    store.clone(),
                    tokio::runtime::Handle::current(),
                );
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("listening for migrations on {addr}"))?;
                Some((host, l))
            }
            None => None,
        };
        tracing::info!(%local, %id, store = %args.store.display(), zstd_mb_per_s = zstd.compress_rate / 1e6, "agent serving");
        {
            let mut out = std::io::stdout().lock();
            if let Some((_, l)) = &incoming {
                writeln!(out, "receiving migrations on {}", l.local_addr()?)?;
            }
            writeln!(out, "listening on {local}")?;
            out.flush()?;
        }
        let link = match (&args.coord.coordinator, capacity) {
            (Some(url), Some(capacity)) => Some(edgeshift_agent::coordination::link::start(
                url,
                args.coord.token_file.as_deref(),
                capacity,
                &id,
                local,
                store.clone(),
                key.clone(),
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
        match incoming {
            Some((host, l)) => {
                tokio::select! {
                    r = serve(listener, cfg) => r.context("serving peers")?,
                    r = destination::serve(host, l) => r.context("receiving migrations")?,
                }
            }
            None => serve(listener, cfg).await.context("serving peers")?,
        }
        Ok(())
    })
}
