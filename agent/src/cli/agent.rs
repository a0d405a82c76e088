//! `edgeshift agent`: the one daemon of an edge. It serves this edge's
//! chunks and manifests to authenticated peers, receives migrations
//! (`--migrate-listen`), keeps the coordinator link and exports the metrics,
//! all on one async runtime.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use edgeshift_agent::coordination::handoff::HandoffConfig;
use edgeshift_agent::migrate::destination::{self, HostConfig};
use edgeshift_agent::store::LocalStore;
use edgeshift_agent::transfer::server::{serve, ServerConfig, ZstdPolicy};
use edgeshift_agent::transfer::Trust;
use edgeshift_agent::vm::lifecycle::{self, Recovered};
use edgeshift_agent::vm::{Qemu, StateDir};
use edgeshift_common::service;

use crate::cli::args::{ClusterArgs, CoordinatorArgs, StateArgs};

/// Run the edge's one daemon: serve chunks, receive migrations, report to the coordinator.
///
/// It serves chunks and manifests to the cluster's edges over mutual TLS:
/// each side proves its certificate (--tls-ca/--tls-cert/--tls-key, made
/// with `edgeshift cluster`) before any manifest or chunk flows, and a
/// peer is the edge its certificate names. A peer that fails is dropped
/// and counted in `edgeshift_auth_failures_total`. Without loadable
/// credentials the agent does not start. A chunk is zstd-compressed only
/// when the fetcher allows it and it makes that path finish sooner.
///
/// With --migrate-listen it also receives VMs (`edgeshift migrate --to`
/// names that address): their chunks go into this store, their records
/// into --state-dir.
///
/// With --coordinator (and --capacity) it reports inventory, deltas and
/// its running VMs under --id, carries out the handoffs the coordinator
/// orders (`POST /v1/vms/NAME/handoff`: `edgeshift migrate` with its
/// defaults, to the ordered edge's --migrate-listen), carries out the coordinator's GC (never a locally pinned
/// chunk) and prefetch orders; an incoming VM's missing chunks then come
/// from the edges the coordinator's plan names (ranked by measured path
/// rate; the source and the origin included), its image is pinned while it
/// arrives and its final image once it runs here, and an unreachable
/// coordinator fails the migration before anything starts. Without it, an
/// incoming VM's chunks come from the source and the holders it names
/// (`edgeshift migrate --peer`).
///
/// Settings come from /etc/edgeshift/agent.toml (or --config), then
/// EDGESHIFT_* variables, then flags. At start it tidies what a crash or a
/// reboot left of its VMs and starts again those asked to (`vm run
/// --autostart`). Every check (key, store, listeners, coordinator) passes
/// before it prints `listening on ADDR` on standard output (port 0 picks
/// one; after `receiving migrations on ADDR` when --migrate-listen is
/// given) and tells systemd it is ready. SIGTERM or SIGINT stops it
/// cleanly: no new work, incoming migrations aborted (the VMs stay at their
/// sources), exit 0; running VMs keep running.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on for peers, e.g. 10.0.0.1:7070 (port 0: any free
    /// port). No default: the agent listens only where it is told.
    #[arg(long, env = "EDGESHIFT_LISTEN")]
    listen: SocketAddr,
    /// Address to listen on for migrations into this edge (the control
    /// channel `edgeshift migrate --to` connects to), e.g. 0.0.0.0:7080.
    /// Without it this agent receives no VMs.
    #[arg(long, env = "EDGESHIFT_MIGRATE_LISTEN")]
    migrate_listen: Option<SocketAddr>,
    /// The chunk store directory to serve (created if absent).
    #[arg(long, env = "EDGESHIFT_STORE", default_value = DEFAULT_STORE)]
    store: PathBuf,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Serve Prometheus metrics at http://ADDR/metrics. A bare port means
    /// loopback (127.0.0.1:PORT): the listener has no authentication, so
    /// give another address only on a management network.
    #[arg(long, env = "EDGESHIFT_METRICS_LISTEN", value_parser = parse_metrics_listen)]
    metrics_listen: Option<SocketAddr>,
    /// Never compress chunks, even when a fetcher allows it.
    #[arg(long, env = "EDGESHIFT_NO_ZSTD")]
    no_zstd: bool,
    #[command(flatten)]
    coord: CoordinatorArgs,
    /// Bytes the store may use, e.g. 200GiB; the coordinator's GC keeps it
    /// under its watermarks. Needed with --coordinator.
    #[arg(long, env = "EDGESHIFT_CAPACITY", value_parser = edgeshift_common::parse_size)]
    capacity: Option<u64>,
    /// Plan incoming VMs' sources from the holders the source names
    /// (`edgeshift migrate --source-addr/--peer`) even with --coordinator,
    /// and pin nothing for them at the coordinator: what a `vm host`
    /// without --coordinator beside a coordinated agent did.
    #[arg(long, env = "EDGESHIFT_UNCOORDINATED_MIGRATIONS")]
    uncoordinated_migrations: bool,
    /// Do not start again the VMs recorded with autostart.
    #[arg(long, env = "EDGESHIFT_NO_AUTOSTART")]
    no_autostart: bool,
    #[command(flatten)]
    state: StateArgs,
}

/// `PORT` (loopback) or `ADDR:PORT`.
fn parse_metrics_listen(s: &str) -> Result<SocketAddr, String> {
    match s.parse::<u16>() {
        Ok(port) => Ok(SocketAddr::from(([127, 0, 0, 1], port))),
        Err(_) => s
            .parse()
            .map_err(|_| format!("{s:?} is neither a port nor ADDR:PORT")),
    }
}

/// Where an installed edge keeps its chunk store.
pub const DEFAULT_STORE: &str = "/var/lib/edgeshift/store";

/// How long a stop waits for incoming migrations to be torn down.
const DRAIN_WAIT: Duration = Duration::from_secs(20);

pub fn run(mut args: Args) -> anyhow::Result<()> {
    // Every check before anything starts: the key, the coordinator's
    // settings, the store, the VMs a crash left.
    // The coordinator's GC keeps the store under watermarks of this figure;
    // a guess (the file system's size, say) could let it fill a shared disk.
    let capacity = match (&args.coord.coordinator, args.capacity) {
        (Some(_), None) => anyhow::bail!(
            "--coordinator needs --capacity (e.g. --capacity 200GiB, or `capacity = \"200GiB\"` in {}, or EDGESHIFT_CAPACITY): the coordinator's GC keeps this store under watermarks of it",
            crate::cli::config::DEFAULT_PATH
        ),
        (_, c) => c,
    };
    let trust = args.cluster.trust()?;
    args.coord.refuse_token_file()?;
    let id = args.cluster.id.id.clone();
    // One store for the chunk server, the coordinator link and incoming VMs.
    let store = Arc::new(
        LocalStore::open_or_create(&args.store)
            .with_context(|| format!("opening the store {}", args.store.display()))?,
    );
    recover_vms(&args.state.state_dir, !args.no_autostart)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = rt.block_on(serve_until_stopped(args, trust, id, store, capacity));
    // Peer connections still open are cut here; chunk files are only ever
    // renamed into place whole, so the store stays consistent.
    rt.shutdown_timeout(Duration::from_secs(5));
    result
}

async fn serve_until_stopped(
    args: Args,
    trust: Trust,
    id: String,
    store: Arc<LocalStore>,
    capacity: Option<u64>,
) -> anyhow::Result<()> {
    let stop = service::stop_signal().context("installing the SIGTERM handler")?;
    if let Some(addr) = args.metrics_listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("starting the metrics listener on {addr}"))?;
        tracing::info!(%addr, "metrics at /metrics");
    }
    let zstd = if args.no_zstd {
        ZstdPolicy::never()
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
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening for migrations on {addr}"))?;
            let host = destination::open(
                HostConfig {
                    state_dir: args.state.state_dir.clone(),
                    trust: trust.clone(),
                    id: id.clone(),
                    qemu: Qemu::default(),
                    coordinator: args
                        .coord
                        .config(&args.cluster.id, args.cluster.coordinator_tls())
                        .filter(|_| !args.uncoordinated_migrations),
                },
                store.clone(),
                tokio::runtime::Handle::current(),
            );
            Some((host, l))
        }
        None => None,
    };
    let link = match (&args.coord.coordinator, capacity) {
        (Some(url), Some(capacity)) => {
            let tls = args.coord.tls_for(args.cluster.coordinator_tls());
            let (url, id, store, trust) = (url.clone(), id.clone(), store.clone(), trust.clone());
            let migrate_addr = match &incoming {
                Some((_, l)) => Some(edgeshift_agent::coordination::link::advertise_addr(
                    l.local_addr()
                        .context("reading the migration listener's address")?,
                    &url,
                )),
                None => None,
            };
            let handoffs = HandoffConfig {
                state_dir: args.state.state_dir.clone(),
                trust: trust.clone(),
                id: id.clone(),
                coordinator: args
                    .coord
                    .config(&args.cluster.id, args.cluster.coordinator_tls()),
                migrate_addr,
            };
            // Its first exchange blocks on HTTP.
            let link = tokio::task::block_in_place(|| {
                edgeshift_agent::coordination::link::start(
                    &url,
                    tls.as_ref(),
                    capacity,
                    local,
                    store,
                    handoffs,
                )
            })?;
            Some(link)
        }
        _ => None,
    };
    let coordinator = match (&link, &args.coord.coordinator) {
        (Some(l), Some(url)) => match l.first_step_error() {
            None => format!("coordinator {url} reached"),
            Some(e) => {
                tracing::warn!(coordinator = %url, error = %e, "coordinator not reached; the link keeps retrying");
                format!("coordinator {url} NOT reached, retrying")
            }
        },
        _ => "no coordinator".to_string(),
    };
    tracing::info!(%local, %id, store = %args.store.display(), zstd_mb_per_s = ?zstd.speeds.map(|s| (s / 1e6).round()), "agent serving");
    {
        let mut out = std::io::stdout().lock();
        if let Some((_, l)) = &incoming {
            writeln!(out, "receiving migrations on {}", l.local_addr()?)?;
        }
        writeln!(out, "listening on {local}")?;
        out.flush()?;
    }
    service::notify_ready(&format!("serving on {local}; {coordinator}"));
    let cfg = Arc::new(ServerConfig {
        trust,
        store,
        zstd,
        uses: link.as_ref().map(|l| l.uses()),
    });
    let host = incoming.as_ref().map(|(h, _)| h.clone());
    let receive = async move {
        match incoming {
            Some((host, l)) => destination::serve(host, l).await,
            None => std::future::pending().await,
        }
    };
    let signal = tokio::select! {
        r = serve(listener, cfg) => return r.context("serving peers"),
        r = receive => return r.context("receiving migrations"),
        s = stop => s,
    };
    // Listeners are closed (dropped with the select): no new work.
    service::notify_stopping();
    tracing::info!(signal, "stopping: no new peers or migrations");
    if let Some(host) = host {
        let left = tokio::task::block_in_place(|| host.shut_down(DRAIN_WAIT));
        if left > 0 {
            tracing::warn!(
                left,
                "incoming migrations still ending; the next start removes what they leave"
            );
        }
    }
    // The link's last report goes before the exit (its drop joins it).
    drop(link);
    tracing::info!("stopped");
    Ok(())
}

/// Tidies what a crash or reboot left of this edge's VMs and starts again
/// those recorded with autostart (when `autostart`).
fn recover_vms(state_dir: &std::path::Path, autostart: bool) -> anyhow::Result<()> {
    let sd = StateDir::new(state_dir);
    let found = lifecycle::recover(&Qemu::default(), &sd, autostart)
        .with_context(|| format!("reading the VM records in {}", state_dir.display()))?;
    for (vm, what) in found {
        match what {
            Recovered::Restarted { pid } => tracing::info!(%vm, pid, "VM started again (autostart)"),
            Recovered::MarkedStopped {
                restart_error: Some(e),
            } => {
                tracing::warn!(%vm, error = %e, "VM was running before; starting it again failed, now stopped")
            }
            Recovered::MarkedStopped { restart_error: None } => {
                tracing::info!(%vm, "VM was running before and is not; now stopped (no autostart)")
            }
            Recovered::StillRunning | Recovered::Stopped => {}
        }
    }
    Ok(())
}
