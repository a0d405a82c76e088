//! The handoff routes: edges report the VMs they run and their handoffs'
//! progress; the operator (an edge platform's mobility manager) orders a
//! handoff and follows it. The source edge learns of an order through its
//! orders poll (`GET /v1/edges/{id}/orders`), so the coordinator never
//! needs to reach an edge. A finished handoff, and a move an operator's
//! system reports (`POST /v1/moves`), teach the mobility model, whose
//! prediction becomes the VM's prefetch hint (`GET /v1/mobility`: how it fares).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use edgeshift_common::control::{HandoffProgress, HandoffState, VmsReport};
use edgeshift_common::ManifestId;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::access::Caller;
use crate::handoff::{Handoff, HandoffError};
use crate::http::{ApiError, AppState, JsonBody};
use crate::service::now_ms;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/edges/{id}/vms", put(report_vms))
        .route("/v1/edges/{id}/handoffs/{handoff}", post(progress))
        .route("/v1/vms", get(list_vms))
        .route("/v1/vms/{name}/handoff", post(order).get(status))
        .route("/v1/moves", post(report_move))
        .route("/v1/mobility", get(mobility))
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
    if h.state == HandoffState::Done {
        let manifest = h
            .report
            .as_ref()
            .and_then(|r| r["manifest_id"].as_str())
            .and_then(|s| s.parse::<ManifestId>().ok());
        match c.learn_move(&h.vm, manifest.as_ref(), &h.from, &h.to) {
            Ok(Some(p)) => tracing::info!(vm = %h.vm, next = %p.edge, share = p.share, "predicted next edge"),
            Ok(None) => {}
            // The handoff is recorded either way; a failed hint only costs prefetch.
            Err(e) => tracing::warn!(vm = %h.vm, error = %e, "learning the move"),
        }
    }
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

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveReq {
    pub vm: String,
    pub from: String,
    pub to: String,
    /// The VM's image, to prefetch at its predicted next edge.
    #[serde(default)]
    pub manifest: Option<ManifestId>,
}

async fn report_move(
    State(app): State<AppState>,
    caller: Caller,
    JsonBody(r): JsonBody<MoveReq>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.operator()?;
    let next = app
        .lock()?
        .learn_move(&r.vm, r.manifest.as_ref(), &r.from, &r.to)?;
    Ok(Json(json!({
        "vm": r.vm,
        "next": next.as_ref().map(|p| &p.edge),
        "share": next.as_ref().map(|p| p.share),
    })))
}

async fn mobility(State(app): State<AppState>, caller: Caller) -> Result<Json<serde_json::Value>, ApiError> {
    caller.operator()?;
    let c = app.lock()?;
    let s = c.predictions;
    Ok(Json(json!({
        "vms": c.mobility.vms(),
        "moves": s.moves,
        "predicted": s.predicted,
        "right": s.right,
        "accuracy": if s.predicted > 0 { s.right as f64 / s.predicted as f64 } else { 0.0 },
    })))
}

async fn status(
    State(app): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Handoff>, ApiError> {
    caller.operator()?;
    Ok(Json(app.lock()?.handoffs.get(&name)?.clone()))
}
