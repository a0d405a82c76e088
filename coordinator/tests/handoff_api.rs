//! The handoff API in process (issue 24): an operator orders a VM moved,
//! the source edge gets the order in its orders poll and reports progress,
//! the operator follows it; refusals are 404/409/403 with clear messages.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use edgeshift_coordinator::access::{Caller, Peer};
use edgeshift_coordinator::{router, AppState, Auth, Coordinator, Options};
use serde_json::{json, Value};
use tower::ServiceExt;

const OPERATOR_TOKEN: &str = "operator-token-0123456789";

struct Fleet {
    app: axum::Router,
    _dir: tempfile::TempDir,
}

#[derive(Clone, Copy)]
enum As<'a> {
    Edge(&'a str),
    Operator,
}

impl Fleet {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let coord = Coordinator::open(&dir.path().join("data"), Options::default()).expect("open");
        let auth = Auth::Certificates {
            operator_token: Some(OPERATOR_TOKEN.into()),
        };
        Fleet {
            app: router(AppState::new(coord, auth), 1 << 20),
            _dir: dir,
        }
    }

    async fn call(&self, who: As<'_>, method: &str, path: &str, body: Value) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        let peer = match who {
            As::Edge(name) => Peer(Some(Caller::Edge(name.into()))),
            As::Operator => {
                req = req.header("Authorization", format!("Bearer {OPERATOR_TOKEN}"));
                Peer(None)
            }
        };
        let body = if body.is_null() {
            Body::empty()
        } else {
            Body::from(body.to_string())
        };
        let mut req = req
            .header("Content-Type", "application/json")
            .body(body)
            .expect("request");
        req.extensions_mut().insert(peer);
        let resp = self.app.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn edge(&self, id: &str, vms: &[&str], migrate_addr: &str) {
        let body = json!({ "addr": format!("{id}.test:7700"), "capacity": 1 << 30 });
        let (s, v) = self
            .call(As::Edge(id), "POST", &format!("/v1/edges/{id}/register"), body)
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let body = json!({ "vms": vms, "migrate_addr": migrate_addr });
        let (s, v) = self
            .call(As::Edge(id), "PUT", &format!("/v1/edges/{id}/vms"), body)
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
}

fn error(v: &Value) -> &str {
    v["error"].as_str().unwrap_or("")
}

#[tokio::test]
async fn an_ordered_handoff_reaches_the_source_and_reports_back() {
    let f = Fleet::new();
    f.edge("e1", &["web"], "10.0.0.1:7080").await;
    f.edge("e2", &[], "10.0.0.2:7080").await;

    let to_e2 = json!({ "to": "e2" });
    let (s, v) = f
        .call(As::Edge("e1"), "POST", "/v1/vms/web/handoff", to_e2.clone())
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "an edge may not order handoffs: {v}");
    let (s, v) = f
        .call(As::Operator, "POST", "/v1/vms/web/handoff", to_e2.clone())
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(
        (v["from"].as_str(), v["state"].as_str()),
        (Some("e1"), Some("ordered"))
    );
    let id = v["id"].as_u64().expect("id");

    let (s, v) = f
        .call(As::Operator, "POST", "/v1/vms/web/handoff", to_e2.clone())
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(error(&v).contains("already moving"), "{v}");

    let (s, v) = f
        .call(As::Edge("e1"), "GET", "/v1/edges/e1/orders", Value::Null)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["handoffs"][0]["vm"], "web", "{v}");
    assert_eq!(v["handoffs"][0]["to_migrate_addr"], "10.0.0.2:7080", "{v}");
    let (_, v) = f
        .call(As::Edge("e2"), "GET", "/v1/edges/e2/orders", Value::Null)
        .await;
    assert_eq!(v["handoffs"], json!([]), "only the source gets the order: {v}");

    let path = format!("/v1/edges/e1/handoffs/{id}");
    let running = json!({ "state": "running", "phase": "precopy" });
    let (s, _) = f.call(As::Edge("e2"), "POST", &path, running.clone()).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "e2 may not report for e1");
    let (s, v) = f.call(As::Edge("e1"), "POST", &path, running).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, v) = f
        .call(As::Edge("e1"), "GET", "/v1/edges/e1/orders", Value::Null)
        .await;
    assert_eq!(v["handoffs"], json!([]), "a taken order is not sent again: {v}");
    let (_, v) = f
        .call(As::Operator, "GET", "/v1/vms/web/handoff", Value::Null)
        .await;
    assert_eq!(
        (v["state"].as_str(), v["phase"].as_str()),
        (Some("running"), Some("precopy"))
    );

    let report = json!({ "vm": "web", "downtime_ms": 640, "rounds": [{"round": 0}] });
    let done = json!({ "state": "done", "phase": "pause", "bytes": 12345, "rounds": 1, "report": report });
    let (s, v) = f.call(As::Edge("e1"), "POST", &path, done).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = f
        .call(As::Operator, "GET", "/v1/vms/web/handoff", Value::Null)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "done");
    assert_eq!(v["bytes"], 12345);
    assert_eq!(v["report"]["downtime_ms"], 640);
    let (_, v) = f.call(As::Operator, "GET", "/v1/vms", Value::Null).await;
    assert_eq!(v["vms"]["web"], "e2", "{v}");
    // Moving it back is a new handoff, from e2 now.
    let (s, v) = f
        .call(As::Operator, "POST", "/v1/vms/web/handoff", json!({ "to": "e1" }))
        .await;
    assert_eq!((s, v["from"].as_str()), (StatusCode::ACCEPTED, Some("e2")), "{v}");
}

#[tokio::test]
async fn unknown_vms_and_edges_get_clear_404s() {
    let f = Fleet::new();
    f.edge("e1", &["web"], "10.0.0.1:7080").await;
    let (s, v) = f
        .call(
            As::Operator,
            "POST",
            "/v1/vms/nope/handoff",
            json!({ "to": "e1" }),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert!(error(&v).contains("unknown VM \"nope\""), "{v}");
    let (s, v) = f
        .call(As::Operator, "POST", "/v1/vms/web/handoff", json!({ "to": "e9" }))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert!(error(&v).contains("unknown edge \"e9\""), "{v}");
    let (s, v) = f
        .call(As::Operator, "GET", "/v1/vms/web/handoff", Value::Null)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = f
        .call(As::Operator, "POST", "/v1/vms/web/handoff", json!({ "to": "e1" }))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (s, v) = f
        .call(
            As::Operator,
            "POST",
            "/v1/vms/web/handoff",
            json!({ "edge": "e1" }),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // An edge that has not registered cannot place VMs.
    let (s, v) = f
        .call(As::Edge("e7"), "PUT", "/v1/edges/e7/vms", json!({ "vms": ["x"] }))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert!(error(&v).contains("unknown edge"), "{v}");
}

#[tokio::test]
async fn moves_teach_the_model_whose_prediction_becomes_a_prefetch_hint() {
    use edgeshift_common::{ChunkSize, Fingerprint, Manifest};
    let f = Fleet::new();
    for e in ["e1", "e2", "e3"] {
        f.edge(e, &[], "10.0.0.9:7080").await;
    }
    let chunks = vec![Fingerprint::of(b"one"), Fingerprint::of(b"two")];
    let m = Manifest::new(ChunkSize::new(4096).expect("size"), 8192, chunks.clone());
    let (s, v) = f
        .call(
            As::Edge("e1"),
            "POST",
            "/v1/manifests",
            json!({ "manifest_hex": hex::encode(m.to_bytes()) }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    let inv = json!({ "chunks": chunks, "usage": 8192, "pins": [] });
    let (s, v) = f.call(As::Edge("e1"), "PUT", "/v1/edges/e1/inventory", inv).await;
    assert_eq!(s, StatusCode::OK, "{v}");

    let mv = |vm: &str, from: &str, to: &str| json!({ "vm": vm, "from": from, "to": to, "manifest": id });
    let (s, _) = f
        .call(As::Edge("e1"), "POST", "/v1/moves", mv("v1", "e1", "e2"))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "moves are the operator's");
    // Two VMs drive e1 → e2 → e3; a third reaches e2 from e1.
    for vm in ["v1", "v2"] {
        for (from, to) in [("e1", "e2"), ("e2", "e3")] {
            let (s, v) = f.call(As::Operator, "POST", "/v1/moves", mv(vm, from, to)).await;
            assert_eq!(s, StatusCode::OK, "{v}");
        }
    }
    let (_, v) = f
        .call(As::Operator, "POST", "/v1/moves", mv("v3", "e1", "e2"))
        .await;
    assert_eq!(v["next"], "e3", "{v}");
    let (_, e3) = f.call(As::Operator, "GET", "/v1/edges/e3", Value::Null).await;
    assert_eq!(e3["hints"], json!([id]), "the prediction is a hint: {e3}");
    let (_, o) = f
        .call(As::Edge("e3"), "GET", "/v1/edges/e3/orders", Value::Null)
        .await;
    assert_eq!(
        o["prefetch"][0]["chunks"].as_array().map(Vec::len),
        Some(2),
        "{o}"
    );
    assert_eq!(o["prefetch"][0]["chunks"][0]["source"], "e1", "{o}");

    // v3 goes where predicted: right; its hint there is withdrawn.
    let (_, _) = f
        .call(As::Operator, "POST", "/v1/moves", mv("v3", "e2", "e3"))
        .await;
    let (_, stats) = f.call(As::Operator, "GET", "/v1/mobility", Value::Null).await;
    assert_eq!(
        (stats["moves"].as_u64(), stats["right"].as_u64()),
        (Some(6), Some(1)),
        "{stats}"
    );
    assert_eq!(stats["accuracy"], 1.0, "{stats}");
    let (_, e3) = f.call(As::Operator, "GET", "/v1/edges/e3", Value::Null).await;
    assert_eq!(e3["hints"], json!([]), "{e3}");
}
