//! `edgeshift-coordinator`: the cache coordinator daemon.

use anyhow::Context;
use edgeshift_common::service;
use edgeshift_coordinator::{AppState, Auth, Coordinator, Options};

mod cli;

pub(crate) const LONG_ABOUT: &str = "\
The edgeshift cache coordinator: knows which edge holds which chunk, keeps
reference counts (pins per edge, popularity across the fleet), tells edges what
to drop when they pass their high watermark (LRU, LFU or popularity order; never
a pinned or in-flight chunk), asks edges to prefetch images that are likely to
arrive, and plans which edges send which chunks to a migration's destination.

It persists the image catalogue, settings, path measurements and hints in
DIR/coordinator.redb; inventories are rebuilt from the agents' reports.

HTTPS + JSON API with client certificates of the cluster (--tls-ca,
--tls-cert, --tls-key, --tls-crl): an edge's certificate acts only as that
edge; the policy, hints and DELETE /v1/edges/{id} need an operator
certificate or `Authorization: Bearer TOKEN` from --operator-token-file. It
refuses to start without credentials; --insecure-no-auth runs it open (plain
HTTP, tests only, logged at every start). Errors are {\"error\": \"...\"}
with a 4xx/5xx status (401 no credential, 403 not this caller's to do):
  POST   /v1/edges/{id}/register      {addr, capacity}              register or update an edge
  PUT    /v1/edges/{id}/inventory     {chunks:[fp], usage, pins:[id]} full inventory on (re)connect
  POST   /v1/edges/{id}/delta         {added, removed, accessed, usage} heartbeat
  POST   /v1/edges/{id}/paths         {paths:[{peer, bytes_per_sec}]} measured rates peer -> id
  POST   /v1/edges/{id}/pins          {manifest}                    pin a manifest on the edge
  DELETE /v1/edges/{id}/pins/{manifest}                             drop one pin
  GET    /v1/edges/{id}/orders                                      GC drops and prefetch work for the edge
  GET    /v1/edges/{id}                                             usage, pins, leases, hints
  DELETE /v1/edges/{id}                                             forget an edge (operator)
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

Settings come from /etc/edgeshift/coordinator.toml (or --config), then
EDGESHIFT_COORDINATOR_* variables, then flags. Readiness goes to systemd
(Type=notify) once the database is open and the listener bound; SIGTERM or
SIGINT stops it cleanly (requests in flight are answered, the database
closed) with exit 0.

See docs/coordinator.md for the data model, the GC rules and the planner's bound.";

fn main() -> std::process::ExitCode {
    let args = match cli::Args::parse_with_config(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    service::init_logging(args.verbose, args.log_format);
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: cli::Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.default_path_rate.is_finite() && args.default_path_rate > 0.0,
        "`default_path_rate` must be a positive number of bytes per second"
    );
    anyhow::ensure!(
        args.header_timeout.is_finite() && args.header_timeout > 0.0,
        "`header_timeout` must be a positive number of seconds"
    );
    let limits = edgeshift_coordinator::serve::Limits {
        max_connections: args.max_connections,
        header_timeout: std::time::Duration::from_secs_f64(args.header_timeout),
    };
    let (auth, tls) = auth_from(&args)?;
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
    let app = AppState::new(coord, auth);
    let rt = tokio::runtime::Runtime::new().context("start the async runtime")?;
    rt.block_on(async move {
        let stop = service::stop_signal().context("installing the SIGTERM handler")?;
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("listen on {}", args.listen))?;
        let local = listener.local_addr().context("local address")?;
        // Scripts and tests read this line to learn the port when ADDR ends in :0.
        let scheme = if tls.is_some() { "https" } else { "http" };
        println!("listening on {scheme}://{local}");
        tracing::info!(%local, "coordinator up");
        service::notify_ready(&format!("serving on {local}"));
        edgeshift_coordinator::serve(listener, app, args.max_body, limits, tls, async move {
            let signal = stop.await;
            service::notify_stopping();
            tracing::info!(signal, "stopping: answering the requests in flight");
        })
        .await
        .context("serve")?;
        // Every change was committed as it was made; the database closes
        // with the state dropped here.
        tracing::info!("stopped");
        Ok(())
    })
}

/// How requests are authenticated, and the TLS configuration: credentials
/// are required unless `--insecure-no-auth` says otherwise, out loud.
fn auth_from(args: &cli::Args) -> anyhow::Result<(Auth, Option<std::sync::Arc<rustls::ServerConfig>>)> {
    if let Some(p) = &args.token_file {
        anyhow::bail!(
            "`token_file` ({}) was replaced: edges now authenticate with their cluster certificates \
             (--tls-ca, --tls-cert, --tls-key), and the operator's bearer token goes in \
             --operator-token-file (`operator_token_file`), which acts only as the operator",
            p.display()
        );
    }
    if args.insecure_no_auth {
        tracing::warn!(
            "--insecure-no-auth: plain HTTP and no authentication; anyone who reaches {} may act as \
             any edge and change the fleet's policy (tests on a closed network only)",
            args.listen
        );
        if args.operator_token_file.is_some() {
            tracing::warn!("--operator-token-file is ignored with --insecure-no-auth");
        }
        return Ok((Auth::Open, None));
    }
    let files = edgeshift_common::identity::TlsFiles {
        ca: args.tls_ca.clone(),
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
        crl: args.tls_crl.clone(),
    };
    let config = edgeshift_coordinator::tls::server_config(&files).context(
        "the coordinator's TLS credentials (it does not start without them; \
         `--insecure-no-auth` runs it open, for tests only)",
    )?;
    let operator_token = match &args.operator_token_file {
        Some(p) => {
            let t = std::fs::read_to_string(p).with_context(|| {
                format!(
                    "reading the operator token file (`operator_token_file`) {}",
                    p.display()
                )
            })?;
            let t = t.trim().to_string();
            anyhow::ensure!(
                t.len() >= 16,
                "operator token file {} holds fewer than 16 characters",
                p.display()
            );
            Some(t.into())
        }
        None => None,
    };
    Ok((Auth::Certificates { operator_token }, Some(config)))
}
