//! The accept loop: at most `max_connections` connections at once, each
//! given `header_timeout` to finish its TLS handshake and to send each
//! request's headers, so half-open or half-sent connections cannot hold the
//! coordinator (issue 21, finding 3). `axum::serve` has neither bound.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::access::Peer;

/// Default `--header-timeout`.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `--max-connections`: well under the usual 1024 descriptor limit.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// How long requests in flight get to finish after the stop signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How the listener treats connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; the next waits in the kernel's backlog.
    pub max_connections: usize,
    /// Time for the TLS handshake and for each request's headers.
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
        }
    }
}

/// Serves `app` on `listener` (over TLS when `tls` is given) until
/// `shutdown` resolves, then lets requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends pass; the loop must not end on them.
                    tracing::debug!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let builder = {
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(TokioTimer::new())
                    .header_read_timeout(limits.header_timeout);
                b
            };
            let Some(acceptor) = tls else {
                let conn = builder.serve_connection(TokioIo::new(stream), with_peer(app, Peer(None)));
                if let Err(e) = watcher.watch(conn).await {
                    tracing::debug!(%remote, "connection: {e}");
                }
                return;
            };
            let stream = match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    // Debug only: a flood of refused handshakes must not fill the log.
                    tracing::debug!(%remote, "TLS handshake refused: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let peer = Peer::from_tls(stream.get_ref().1);
            let conn = builder.serve_connection(TokioIo::new(stream), with_peer(app, peer));
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%remote, "connection: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after {DRAIN_TIMEOUT:?}; stopping anyway");
    }
    Ok(())
}

/// The router as a hyper service that tags every request with who is on
/// the other end of the connection.
fn with_peer(
    app: Router,
    peer: Peer,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(peer.clone());
        let app = app.clone();
        async move {
            use tower::ServiceExt;
            app.oneshot(req.map(axum::body::Body::new)).await
        }
    })
}
