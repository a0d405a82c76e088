//! The coordinator's HTTP plumbing shared by every route module: errors as
//! responses, JSON bodies, who is asking (the auth middleware) and the
//! app's state. The routes are in `api.rs` and `handoff_api.rs`.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::access::{Caller, Forbidden, Peer};
use crate::ledger::LedgerError;
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
    pub(crate) metrics: PrometheusHandle,
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

pub(crate) async fn auth(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
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
