//! The HTTP + JSON surface (`/v1/...`) and Prometheus text at `/metrics`.
//! Every request is authenticated first ([`Auth`]); a request without a
//! credential gets 401 without its body being parsed, and handlers check
//! what the [`Caller`] may do (403 otherwise).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Path, Query, Request, State,
};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use edgeshift_common::{Fingerprint, ManifestId};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::access::{Caller, Forbidden, Peer};
use crate::ledger::LedgerError;
use crate::policy::Policy;
use crate::service::{Coordinator, ServiceError};

/// Default request body limit: a full inventory of 200,000 chunks is about
/// 13.4 MB of JSON.
pub const DEFAULT_BODY_LIMIT: usize = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or wrong credential (a cluster client certificate, or `Authorization: Bearer TOKEN` for the operator)")]
    Unauthorized,
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("request body too large: {0}")]
    TooLarge(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Handoff(#[from] crate::handoff::HandoffError),
    #[error("the coordinator's state lock is poisoned (a handler panicked); restart it")]
    Poisoned,
}

impl From<Forbidden> for ApiError {
    fn from(e: Forbidden) -> Self {
        ApiError::Forbidden(e.0)
    }
}

/// Handlers take the caller the auth middleware put on the request; a
/// request that reached a handler without one is refused.
impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or(ApiError::Unauthorized)
    }
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Poisoned => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Handoff(e) => e.status(),
            ApiError::Service(e) => match e {
                ServiceError::Ledger(l) => match l {
                    LedgerError::UnknownEdge(_)
                    | LedgerError::UnknownManifest(_)
                    | LedgerError::NotPinned(..) => StatusCode::NOT_FOUND,
                    LedgerError::TooManyEdges(_) => StatusCode::CONFLICT,
                    LedgerError::TooManyChunks { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                    LedgerError::BadManifest(_) | LedgerError::BadEdgeId(_) | LedgerError::BadRate(..) => {
                        StatusCode::BAD_REQUEST
                    }
                },
                ServiceError::UnknownLease(_) | ServiceError::UnknownHint(..) => StatusCode::NOT_FOUND,
                ServiceError::Gc(_) | ServiceError::BadManifest(_) | ServiceError::BadHex(_) => {
                    StatusCode::BAD_REQUEST
                }
                ServiceError::Persist(_) | ServiceError::Plan(_) | ServiceError::BadSetting(..) => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!("{self}");
        }
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

/// A JSON body whose errors are ours: 413 past the limit, 400 naming what
/// is wrong with the JSON.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge(r.body_text())
            } else {
                ApiError::BadRequest(r.body_text())
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::BadRequest(format!("malformed JSON body: {e}")))
    }
}

/// How requests are authenticated.
#[derive(Clone)]
pub enum Auth {
    /// `--insecure-no-auth`: every request may do everything.
    Open,
    /// One shared bearer token that may do everything (the old
    /// `--token-file`; replaced by certificates).
    SharedToken(Arc<str>),
    /// The connection's client certificate names the caller; without one,
    /// the operator's bearer token (if configured) makes it the operator.
    Certificates { operator_token: Option<Arc<str>> },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Open => f.write_str("Open"),
            Auth::SharedToken(_) => f.write_str("SharedToken(<redacted>)"),
            Auth::Certificates { operator_token } => f
                .debug_struct("Certificates")
                .field("operator_token", &operator_token.as_ref().map(|_| "<redacted>"))
                .finish(),
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    coord: Arc<Mutex<Coordinator>>,
    auth: Auth,
    metrics: PrometheusHandle,
}

impl AppState {
    pub fn new(coord: Coordinator, auth: Auth) -> Self {
        AppState {
            coord: Arc::new(Mutex::new(coord)),
            auth,
            metrics: metrics_handle(),
        }
    }

    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, Coordinator>, ApiError> {
        self.coord.lock().map_err(|_| ApiError::Poisoned)
    }
}

/// The process-wide Prometheus recorder (installed once; a second app in the
/// same process shares it).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "a metrics recorder is already installed; /metrics shows only what it exports"
                );
            }
            handle
        })
        .clone()
}

/// Compares in time independent of where the strings differ.
fn token_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Most an unauthenticated request's body may hold for its 401 to be
/// delivered cleanly, and how long the coordinator waits for it.
const REFUSED_BODY_DRAIN: usize = 64 << 10;
const REFUSED_BODY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads (and drops) a small body before a refusal: closing a connection
/// with unread bytes in its receive queue makes the kernel send RST, which
/// can reach the client before the 401 does. A larger or slower body is not
/// waited for; the connection is closed with it unread.
async fn drain_small_body(req: Request) {
    let body = req.into_body();
    let _ = tokio::time::timeout(REFUSED_BODY_WAIT, axum::body::to_bytes(body, REFUSED_BODY_DRAIN)).await;
}

/// The bearer token a request carries, if any.
fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Who sent `req`, or `None` when it carries no valid credential.
fn authenticate(auth: &Auth, req: &Request) -> Option<Caller> {
    let token_matches = |want: &str| bearer(req).is_some_and(|t| token_eq(t.as_bytes(), want.as_bytes()));
    match auth {
        Auth::Open => Some(Caller::Anyone),
        Auth::SharedToken(want) => token_matches(want).then_some(Caller::Anyone),
        Auth::Certificates { operator_token } => {
            let from_cert = req.extensions().get::<Peer>().and_then(|p| p.0.clone());
            from_cert.or_else(|| {
                operator_token
                    .as_deref()
                    .filter(|want| token_matches(want))
                    .map(|_| Caller::Operator)
            })
        }
    }
}

/// A fixed label for the method: a client choosing new method names must
/// not create new metric series (issue 21, finding 2).
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        _ => "other",
    }
}

async fn auth(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    // Route templates come from the router (a fixed set); anything else is "unmatched".
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = method_label(req.method());
    let started = std::time::Instant::now();
    let response = match authenticate(&app.auth, &req) {
        Some(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        None => {
            drain_small_body(req).await;
            ApiError::Unauthorized.into_response()
        }
    };
    metrics::histogram!("coordinator_http_request_seconds", "route" => route.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!(
        "coordinator_http_requests_total",
        "route" => route,
        "method" => method,
        "status" => response.status().as_u16().to_string()
    )
    .increment(1);
    response
}

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
