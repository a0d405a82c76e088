//! The HTTP + JSON surface (`/v1/...`) and Prometheus text at `/metrics`.
//! Every request is authenticated first ([`Auth`]); a request without a
//! credential gets 401 without its body being parsed, and handlers check
//! what the [`Caller`] may do (403 otherwise).

use std::collections::BTreeMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use edgeshift_common::{Fingerprint, ManifestId};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::access::Caller;
use crate::ledger::LedgerError;
use crate::policy::Policy;
use crate::service::ServiceError;

use crate::http::auth;
pub use crate::http::{metrics_handle, ApiError, AppState, Auth, JsonBody, DEFAULT_BODY_LIMIT};
/// The router with every route, auth and the body limit.
pub fn router(app: AppState, body_limit: usize) -> Router {
    Router::new()
        .route("/v1/edges/{id}/register", post(register))
        .route("/v1/edges/{id}/inventory", put(inventory))
        .route("/v1/edges/{id}/delta", post(delta))
        .route("/v1/edges/{id}/paths", post(paths))
        .route("/v1/edges/{id}/pins", post(pin))
        .route("/v1/edges/{id}/pins/{manifest}", delete(unpin))
        .route("/v1/edges/{id}/orders", get(orders))
        .route("/v1/edges/{id}", get(edge_info).delete(deregister))
        .route("/v1/manifests", post(publish))
        .route("/v1/manifests/{id}", get(manifest_info))
        .route("/v1/chunks/{fp}", get(chunk_info))
        .route("/v1/plan", get(plan))
        .route("/v1/hints", post(hint))
        .route("/v1/hints/{edge}/{manifest}", delete(unhint))
        .route("/v1/leases/{id}", delete(release))
        .route("/v1/policy", get(get_policy).put(set_policy))
        .route("/metrics", get(render_metrics))
        .merge(crate::handoff_api::routes())
        .fallback(|| async {
            ApiError::NotFound("no such endpoint (see `edgeshift-coordinator --help`)".into())
        })
        .layer(middleware::from_fn_with_state(app.clone(), auth))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(app)
}

fn parse_fp(what: &str, s: &str) -> Result<Fingerprint, ApiError> {
    s.parse()
        .map_err(|e| ApiError::BadRequest(format!("{what} {s:?}: {e}")))
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterReq {
    /// `host:port` of the edge's chunk server.
    pub addr: String,
    /// Bytes the edge's store may use.
    pub capacity: u64,
}

async fn register(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(r): JsonBody<RegisterReq>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.act_as_edge(&id)?;
    let mut c = app.lock()?;
    c.ledger
        .register(&id, &r.addr, r.capacity)
        .map_err(ServiceError::from)?;
    tracing::info!(edge = %id, addr = %r.addr, capacity = r.capacity, "edge registered");
    Ok(Json(json!({ "edge": id, "registered": true })))
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryReq {
    pub chunks: Vec<Fingerprint>,
    pub usage: u64,
    /// Manifests pinned on the edge (replaces what the coordinator had).
    #[serde(default)]
    pub pins: Vec<ManifestId>,
}

async fn inventory(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(r): JsonBody<InventoryReq>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.act_as_edge(&id)?;
    app.lock()?.report_inventory(&id, &r.chunks, r.usage, &r.pins)?;
    metrics::counter!("coordinator_inventory_reports_total").increment(1);
    Ok(Json(
        json!({ "edge": id, "chunks": r.chunks.len(), "pins": r.pins.len() }),
    ))
}

/// A heartbeat's body (shared with the agent).
pub type DeltaReq = edgeshift_common::control::Delta;

async fn delta(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(r): JsonBody<DeltaReq>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.act_as_edge(&id)?;
    let mut c = app.lock()?;
    c.ledger
        .apply_delta(&id, &r.added, &r.removed, &r.accessed, r.usage)
        .map_err(ServiceError::from)?;
    metrics::counter!("coordinator_heartbeats_total").increment(1);
    Ok(Json(
        json!({ "edge": id, "reported": c.ledger.edge(&id).map(|e| e.reported).unwrap_or(false) }),
    ))
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathRate {
    /// The peer the bytes came from.
    pub peer: String,
    pub bytes_per_sec: f64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathsReq {
    pub paths: Vec<PathRate>,
}

async fn paths(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(r): JsonBody<PathsReq>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.act_as_edge(&id)?;
    let rates: Vec<(String, f64)> = r.paths.into_iter().map(|p| (p.peer, p.bytes_per_sec)).collect();
    app.lock()?.set_paths(&id, &rates)?;
    Ok(Json(json!({ "edge": id, "paths": rates.len() })))
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinReq {
    pub manifest: ManifestId,
}

async fn pin(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(r): JsonBody<PinReq>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.edge_or_operator(&id)?;
    let pins = app.lock()?.pin(&id, &r.manifest)?;
    Ok(Json(json!({ "edge": id, "manifest": r.manifest, "pins": pins })))
}

async fn unpin(
    State(app): State<AppState>,
    caller: Caller,
    Path((id, manifest)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.edge_or_operator(&id)?;
    let m = parse_fp("manifest id", &manifest)?;
    let pins = app.lock()?.ledger.unpin(&id, &m).map_err(ServiceError::from)?;
    Ok(Json(json!({ "edge": id, "manifest": m, "pins": pins })))
}

async fn orders(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<crate::service::Orders>, ApiError> {
    caller.act_as_edge(&id)?;
    Ok(Json(app.lock()?.orders(&id)?))
}

async fn edge_info(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<crate::service::EdgeInfo>, ApiError> {
    Ok(Json(app.lock()?.edge_info(&id)?))
}

async fn deregister(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.operator()?;
    app.lock()?.deregister(&id)?;
    tracing::info!(edge = %id, "edge deregistered");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishReq {
    /// The manifest's bytes (header + fingerprints), hex-encoded.
    pub manifest_hex: String,
}

async fn publish(
    State(app): State<AppState>,
    JsonBody(r): JsonBody<PublishReq>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mut c = app.lock()?;
    let (id, e) = c.publish_hex(&r.manifest_hex)?;
    Ok(Json(json!({
        "id": id, "chunk_size": e.chunk_size, "image_size": e.image_size,
        "chunks": e.chunks.len(), "unique_chunks": e.unique.len()
    })))
}

async fn manifest_info(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = parse_fp("manifest id", &id)?;
    let c = app.lock()?;
    let e = c
        .ledger
        .catalogue
        .get(&id)
        .ok_or_else(|| ServiceError::from(LedgerError::UnknownManifest(id)))?;
    let pinned_on: BTreeMap<&str, u32> = c
        .ledger
        .edges
        .iter()
        .filter_map(|edge| edge.pins.get(&id).map(|&n| (edge.id.as_str(), n)))
        .collect();
    Ok(Json(json!({
        "id": id, "chunk_size": e.chunk_size, "image_size": e.image_size,
        "chunks": e.chunks.len(), "unique_chunks": e.unique.len(), "pinned_on": pinned_on
    })))
}

async fn chunk_info(
    State(app): State<AppState>,
    Path(fp): Path<String>,
) -> Result<Json<crate::service::ChunkInfo>, ApiError> {
    let fp = parse_fp("chunk fingerprint", &fp)?;
    app.lock()?
        .chunk_info(&fp)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("chunk {fp} is unknown: no edge and no manifest has it")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanQuery {
    pub manifest: ManifestId,
    pub dest: String,
    /// Holders listed per chunk (default 4).
    pub alternatives: Option<usize>,
    /// Take a lease protecting the assigned source chunks (default true).
    pub lease: Option<bool>,
    /// Most source edges the plan uses (default 32; more only to reach chunks
    /// no chosen source holds).
    pub max_sources: Option<usize>,
}

async fn plan(
    State(app): State<AppState>,
    caller: Caller,
    q: Result<Query<PlanQuery>, QueryRejection>,
) -> Result<Json<crate::service::Plan>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    // A plan leases chunks on other edges for `dest`: only for oneself.
    caller.edge_or_operator(&q.dest)?;
    let p = app.lock()?.plan(
        &q.manifest,
        &q.dest,
        q.alternatives.unwrap_or(4),
        q.max_sources.unwrap_or(crate::service::DEFAULT_MAX_SOURCES),
        q.lease.unwrap_or(true),
    )?;
    Ok(Json(p))
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HintReq {
    /// The image of the VM likely to move.
    pub manifest: ManifestId,
    /// Where it is likely to go.
    pub edge: String,
}

async fn hint(
    State(app): State<AppState>,
    caller: Caller,
    JsonBody(r): JsonBody<HintReq>,
) -> Result<Json<crate::service::HintOutcome>, ApiError> {
    caller.operator()?;
    Ok(Json(app.lock()?.hint(&r.manifest, &r.edge)?))
}

async fn unhint(
    State(app): State<AppState>,
    caller: Caller,
    Path((edge, manifest)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.operator()?;
    let m = parse_fp("manifest id", &manifest)?;
    app.lock()?.delete_hint(&m, &edge)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn release(State(app): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("lease id {id:?} is not a number")))?;
    app.lock()?.release(id)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyReq {
    pub policy: Option<Policy>,
    pub high_watermark: Option<f64>,
    pub low_watermark: Option<f64>,
}

async fn get_policy(State(app): State<AppState>) -> Result<Json<crate::service::Settings>, ApiError> {
    Ok(Json(app.lock()?.settings))
}

async fn set_policy(
    State(app): State<AppState>,
    caller: Caller,
    JsonBody(r): JsonBody<PolicyReq>,
) -> Result<Json<crate::service::Settings>, ApiError> {
    caller.operator()?;
    let s = app
        .lock()?
        .set_settings(r.policy, r.high_watermark, r.low_watermark)?;
    tracing::info!(policy = %s.policy, high = s.watermarks.high, low = s.watermarks.low, "settings changed");
    Ok(Json(s))
}

async fn render_metrics(State(app): State<AppState>) -> Result<Response, ApiError> {
    {
        let c = app.lock()?;
        metrics::gauge!("coordinator_edges").set(c.ledger.edges.len() as f64);
        metrics::gauge!("coordinator_chunks_known").set(c.ledger.interner.len() as f64);
        metrics::gauge!("coordinator_manifests").set(c.ledger.catalogue.len() as f64);
        metrics::gauge!("coordinator_leases").set(c.ledger.live_leases() as f64);
        metrics::gauge!("coordinator_hints").set(c.hints().count() as f64);
    }
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response())
}
