//! The edgeshift cache coordinator: which edge holds which chunk, what each
//! edge keeps, and where a destination should fetch from.
//!
//! Modules, each testable alone: [`ledger`] (inventory, pins, leases,
//! popularity), [`policy`] (LRU / LFU / popularity eviction order), [`gc`]
//! (watermark GC), [`handoff`] (where VMs run, ordered handoffs), [`mobility`]
//! (next-edge predictions from moves), [`planner`] (source assignment), [`persist`] (redb), then
//! [`service`] ties them together, [`api`] puts them on HTTP with
//! [`access`] deciding who may do what, and [`serve`] accepts connections.

pub mod access;
pub mod api;
pub mod gc;
pub mod handoff;
pub mod handoff_api;
pub mod http;
pub mod ledger;
pub mod mobility;
pub mod persist;
pub mod planner;
pub mod policy;
pub mod serve;
pub mod service;
pub mod tls;

pub use api::{router, AppState, Auth};
pub use service::{Coordinator, Options};

/// Serves the coordinator on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: AppState,
    body_limit: usize,
    limits: serve::Limits,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    serve::serve(listener, router(app, body_limit), limits, tls, shutdown).await
}
