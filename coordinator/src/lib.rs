//! The edgeshift cache coordinator: which edge holds which chunk, what each
//! edge keeps, and where a destination should fetch from.
//!
//! Modules, each testable alone: [`ledger`] (inventory, pins, leases,
//! popularity), [`policy`] (LRU / LFU / popularity eviction order), [`gc`]
//! (watermark GC), [`planner`] (source assignment), [`persist`] (redb), then
//! [`service`] ties them together and [`api`] puts them on HTTP.

pub mod api;
pub mod gc;
pub mod ledger;
pub mod persist;
pub mod planner;
pub mod policy;
pub mod service;

pub use api::{router, AppState};
pub use service::{Coordinator, Options};

/// Binds `listen`, serves the coordinator until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: AppState,
    body_limit: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(app, body_limit))
        .with_graceful_shutdown(shutdown)
        .await
}
