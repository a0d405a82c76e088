//! `edgeshift-coordinator`: the cache coordinator daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use edgeshift_coordinator::api::DEFAULT_BODY_LIMIT;
use edgeshift_coordinator::{AppState, Coordinator, Options};

const LONG_ABOUT: &str = "\
The edgeshift cache coordinator: knows which edge holds which chunk, keeps
reference counts (pins per edge, popularity across the fleet), tells edges what
to drop when they pass their high watermark (LRU, LFU or popularity order; never
a pinned or in-flight chunk), asks edges to prefetch images that are likely to
arrive, and plans which edges send which chunks to a migration's destination.

It persists the image catalogue, settings, path measurements and hints in
DIR/coordinator.redb; inventories are rebuilt from the agents' reports.

HTTP + JSON API (all routes need `Authorization: Bearer TOKEN` when
--token-file is given; errors are {\"error\": \"...\"} with a 4xx/5xx status):
  POST   /v1/edges/{id}/register      {addr, capacity}              register or update an edge
  PUT    /v1/edges/{id}/inventory     {chunks:[fp], usage, pins:[id]} full inventory on (re)connect
  POST   /v1/edges/{id}/delta         {added, removed, accessed, usage} heartbeat
  POST   /v1/edges/{id}/paths         {paths:[{peer, bytes_per_sec}]} measured rates peer -> id
  POST   /v1/edges/{id}/pins          {manifest}                    pin a manifest on the edge
  DELETE /v1/edges/{id}/pins/{manifest}                             drop one pin
  GET    /v1/edges/{id}/orders                                      GC drops and prefetch work for the edge
  GET    /v1/edges/{id}                                             usage, pins, leases, hints
  POST   /v1/manifests                {manifest_hex}                publish to the catalogue
  GET    /v1/manifests/{id}                                         catalogue entry
  GET    /v1/chunks/{fp}                                            holders, images using it, pins per edge
  GET    /v1/plan?manifest=ID&dest=EDGE[&alternatives=N&max_sources=N&lease=BOOL]
                                                                    source plan for a destination
  POST   /v1/hints                    {manifest, edge}              VM likely to move: prefetch there
  DELETE /v1/hints/{edge}/{manifest}                                withdraw a hint
  DELETE /v1/leases/{id}                                            transfer done: release its sources
  GET    /v1/policy, PUT /v1/policy   {policy, high_watermark, low_watermark}
  GET    /metrics                                                   Prometheus text format
                                                                    (requests, latency, heartbeats, plans,
                                                                    GC orders; edges, chunks, leases, hints)

See docs/coordinator.md for the data model, the GC rules and the planner's bound.";

/// The edgeshift cache coordinator.
#[derive(Parser)]
#[command(version, about, long_about = LONG_ABOUT)]
struct Args {
    /// Address to listen on, e.g. 127.0.0.1:7800 or 0.0.0.0:7800.
    #[arg(long)]
    listen: String,
    /// Directory for the database (created if absent).
    #[arg(long)]
    data: PathBuf,
    /// File holding the bearer token agents and operators must send. Without
    /// it the API is open (only sensible on a loopback address).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Largest request body accepted, in bytes (413 beyond).
    #[arg(long, default_value_t = DEFAULT_BODY_LIMIT)]
    max_body: usize,
    /// Rate assumed for a path no agent has measured, in bytes per second.
    #[arg(long, default_value_t = 12.5e6)]
    default_path_rate: f64,
    /// How long a plan or prefetch order protects its source chunks, seconds.
    #[arg(long, default_value_t = 900)]
    lease_secs: u64,
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let default = match args.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    anyhow::ensure!(
        args.default_path_rate.is_finite() && args.default_path_rate > 0.0,
        "--default-path-rate must be a positive number of bytes per second"
    );

    let token = match &args.token_file {
        Some(p) => {
            let t = std::fs::read_to_string(p).with_context(|| format!("read token file {}", p.display()))?;
            let t = t.trim().to_string();
            anyhow::ensure!(!t.is_empty(), "token file {} is empty", p.display());
            Some(t)
        }
        None => {
            tracing::warn!("no --token-file: the API accepts every request");
            None
        }
    };
    let options = Options {
        default_path_rate: args.default_path_rate,
        lease_ms: args.lease_secs.saturating_mul(1000),
        ..Options::default()
    };
    let coord = Coordinator::open(&args.data, options)
        .with_context(|| format!("open coordinator data in {}", args.data.display()))?;
    tracing::info!(
        db = %coord.store_path().display(),
        manifests = coord.ledger.catalogue.len(),
        policy = %coord.settings.policy,
        "state restored"
    );
    let app = AppState::new(coord, token);
    let rt = tokio::runtime::Runtime::new().context("start the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("listen on {}", args.listen))?;
        let local = listener.local_addr().context("local address")?;
        // Scripts and tests read this line to learn the port when ADDR ends in :0.
        println!("listening on http://{local}");
        tracing::info!(%local, "coordinator up");
        edgeshift_coordinator::serve(listener, app, args.max_body, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serve")
    })
}
