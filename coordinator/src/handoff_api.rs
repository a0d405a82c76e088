//! The handoff routes: edges report the VMs they run and their handoffs'
//! progress; the operator (an edge platform's mobility manager) orders a
//! handoff and follows it. The source edge learns of an order through its
//! orders poll (`GET /v1/edges/{id}/orders`), so the coordinator never
//! needs to reach an edge.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use edgeshift_common::control::{HandoffProgress, VmsReport};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::access::Caller;
use crate::api::{ApiError, AppState, JsonBody};
use crate::handoff::{Handoff, HandoffError};
use crate::service::now_ms;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/edges/{id}/vms", put(report_vms))
        .route("/v1/edges/{id}/handoffs/{handoff}", post(progress))
        .route("/v1/vms", get(list_vms))
        .route("/v1/vms/{name}/handoff", post(order).get(status))
}

impl HandoffError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            HandoffError::UnknownVm(_)
            | HandoffError::UnknownEdge(_)
            | HandoffError::NoHandoff(_)
            | HandoffError::UnknownHandoff(..) => StatusCode::NOT_FOUND,
            HandoffError::NotReceiving(_)
            | HandoffError::AlreadyThere { .. }
            | HandoffError::Moving { .. }
            | HandoffError::Over(..) => StatusCode::CONFLICT,
        }
    }
}

async fn report_vms(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(r): JsonBody<VmsReport>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.act_as_edge(&id)?;
    let mut c = app.lock()?;
    // Only a registered edge places VMs (404 "unknown edge" makes it register).
    c.ledger
        .edge_ix(&id)
        .map_err(crate::service::ServiceError::from)?;
    c.handoffs.report_vms(&id, &r);
    Ok(Json(json!({ "edge": id, "vms": r.vms.len() })))
}

async fn progress(
    State(app): State<AppState>,
    caller: Caller,
    Path((id, handoff)): Path<(String, String)>,
    JsonBody(p): JsonBody<HandoffProgress>,
) -> Result<Json<Handoff>, ApiError> {
    caller.act_as_edge(&id)?;
    let handoff: u64 = handoff
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("handoff id {handoff:?} is not a number")))?;
    let mut c = app.lock()?;
    let h = c.handoffs.progress(&id, handoff, p, now_ms())?.clone();
    tracing::info!(vm = %h.vm, id = h.id, state = ?h.state, phase = ?h.phase, "handoff progress");
    Ok(Json(h))
}

async fn list_vms(State(app): State<AppState>, caller: Caller) -> Result<Json<serde_json::Value>, ApiError> {
    caller.operator()?;
    let c = app.lock()?;
    Ok(Json(json!({ "vms": c.handoffs.places() })))
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoffReq {
    /// The destination edge's id.
    pub to: String,
}

async fn order(
    State(app): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(r): JsonBody<HandoffReq>,
) -> Result<(StatusCode, Json<Handoff>), ApiError> {
    caller.operator()?;
    let mut c = app.lock()?;
    let registered = c.ledger.edge_ix(&r.to).is_ok();
    let h = c.handoffs.order(&name, &r.to, registered, now_ms())?;
    tracing::info!(vm = %h.vm, id = h.id, from = %h.from, to = %h.to, "handoff ordered");
    metrics::counter!("coordinator_handoffs_total", "outcome" => "ordered").increment(1);
    Ok((StatusCode::ACCEPTED, Json(h)))
}

async fn status(
    State(app): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Handoff>, ApiError> {
    caller.operator()?;
    Ok(Json(app.lock()?.handoffs.get(&name)?.clone()))
}
