//! The migration control listener of `edgeshift agent --migrate-listen`:
//! accepts on the agent's runtime, authenticates, then serves each
//! connection's requests in order on a thread of its own.
//!
//! Why a thread per connection and not a task: every command but `Pull`
//! blocks (the image's fsync, QEMU's start, QMP polls, loop devices, the
//! coordinator's HTTP client) and a migration holds its connection for
//! minutes, so it would pin a runtime worker or the blocking pool for that
//! long. A `Pull` awaits the fetcher on the agent's runtime through its
//! handle, so chunks still move on the one runtime of the daemon.

use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use super::context::Host;
use super::session::Session;
use crate::migrate::channel;
use crate::migrate::proto::{self, Request, Response};
use crate::migrate::MigrateError;
use crate::transfer::admission::{sanitize, Admission, RateLimitedLog, Ticket, ACCEPT_BACKOFF};

static ACCEPT_ERRORS: RateLimitedLog = RateLimitedLog::new();

/// Accepts control connections until the listener fails.
pub async fn serve(host: Arc<Host>, listener: tokio::net::TcpListener) -> Result<(), MigrateError> {
    tracing::info!(addr = ?listener.local_addr().ok(), id = %host.cfg.id, "receiving migrations");
    // Unauthenticated connections are bounded as the chunk server's are: a
    // flood must not cost a thread (and a descriptor) per connection.
    let admission = Arc::new(Admission::for_this_process());
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                if let Some(suppressed) = ACCEPT_ERRORS.allow() {
                    tracing::warn!(error = %e, suppressed, "accept failed; pausing");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Some(ticket) = admission.admit(peer.ip()) else {
            metrics::counter!("edgeshift_preauth_refused_total").increment(1);
            continue;
        };
        let std_conn = conn.into_std().and_then(|s| s.set_nonblocking(false).map(|()| s));
        let s = match std_conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "control connection not taken");
                continue;
            }
        };
        let Some(registered) = host.connections.register(&s) else {
            tracing::info!(%peer, "control connection refused: the agent is stopping");
            continue;
        };
        let host = Arc::clone(&host);
        let spawned = std::thread::Builder::new()
            .name("migrate-control".into())
            .spawn(move || {
                if let Err(e) = handle(host, s, ticket) {
                    tracing::info!(%peer, error = %e, "control connection ended");
                }
                // Unregistered only once the session (and its incoming VM's
                // teardown) is over.
                drop(registered);
            });
        if let Err(e) = spawned {
            tracing::warn!(%peer, error = %e, "no thread for a control connection");
        }
    }
}

/// Authenticates the source, then answers its requests in order until it
/// hangs up; the session's incoming VM goes with it.
fn handle(host: Arc<Host>, s: TcpStream, ticket: Ticket) -> Result<(), MigrateError> {
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| MigrateError::Channel(e.to_string()))?;
    let (mut s, peer) = channel::accept(s, &host.cfg.trust)?;
    drop(ticket);
    let peer = sanitize(&peer);
    // A migration can sit between requests while QEMU moves memory.
    s.tcp()
        .set_read_timeout(None)
        .map_err(|e| MigrateError::Channel(e.to_string()))?;
    tracing::debug!(peer = %peer, "peer authenticated");
    let local_ip = s
        .tcp()
        .local_addr()
        .map_err(|e| MigrateError::Channel(e.to_string()))?
        .ip();
    let peer_ip = s
        .tcp()
        .peer_addr()
        .map_err(|e| MigrateError::Channel(e.to_string()))?
        .ip();
    let mut session = Session::new(host, local_ip, peer_ip);
    loop {
        let req: Request = match proto::recv(&mut s) {
            Ok(r) => r,
            Err(MigrateError::Channel(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let resp = match session.handle(req) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(peer = %peer, state = %session.state(), error = %e, "request failed");
                Response::Error(e.to_string())
            }
        };
        proto::send(&mut s, &resp)?;
    }
}
