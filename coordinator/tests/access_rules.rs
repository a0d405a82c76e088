//! Who may do what, in process: requests carry the caller the transport
//! would have proved (an edge's certificate, or none) and the router decides
//! (issue 21, finding 5: one credential must not be every edge's and the
//! operator's at once).

use axum::body::Body;
use axum::http::{Request, StatusCode};
use edgeshift_common::{ChunkSize, Fingerprint, Manifest};
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
    Nobody,
}

impl Fleet {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let coord = Coordinator::open(&dir.path().join("data"), Options::default()).expect("open");
        let auth = Auth::Certificates {
            operator_token: Some(OPERATOR_TOKEN.into()),
        };
        Fleet {
            app: router(AppState::new(coord, auth), 32 << 20),
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
            As::Nobody => Peer(None),
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
}

fn register_body() -> Value {
    json!({ "addr": "e.test:7700", "capacity": 1 << 20 })
}

fn published() -> (Manifest, String) {
    let chunks = vec![Fingerprint::of(b"one"), Fingerprint::of(b"two")];
    let m = Manifest::new(ChunkSize::new(4096).expect("size"), 8192, chunks);
    let hex = hex::encode(m.to_bytes());
    (m, hex)
}

#[tokio::test]
async fn an_edge_acts_only_as_itself() {
    let f = Fleet::new();
    assert_eq!(
        f.call(As::Nobody, "POST", "/v1/edges/e1/register", register_body())
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    for e in ["e1", "e2"] {
        let (s, v) = f
            .call(
                As::Edge(e),
                "POST",
                &format!("/v1/edges/{e}/register"),
                register_body(),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    // Registering a new edge needs that edge's own credential; the operator's will not do.
    let (s, v) = f
        .call(As::Edge("e1"), "POST", "/v1/edges/e3/register", register_body())
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(
        f.call(As::Operator, "POST", "/v1/edges/e3/register", register_body())
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        f.call(As::Operator, "GET", "/v1/edges/e3", Value::Null).await.0,
        StatusCode::NOT_FOUND,
        "the refused registrations must not have happened"
    );

    let (_, hex) = published();
    let (s, v) = f
        .call(
            As::Edge("e1"),
            "POST",
            "/v1/manifests",
            json!({ "manifest_hex": hex }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    let fp = Fingerprint::of(b"one");
    let e2_inventory = json!({ "chunks": [fp], "usage": 4096, "pins": [] });
    for (method, path, body) in [
        ("PUT", "/v1/edges/e2/inventory", e2_inventory.clone()),
        (
            "POST",
            "/v1/edges/e2/delta",
            json!({ "usage": 0, "removed": [fp] }),
        ),
        (
            "POST",
            "/v1/edges/e2/paths",
            json!({ "paths": [{ "peer": "e1", "bytes_per_sec": 1e9 }] }),
        ),
        ("POST", "/v1/edges/e2/pins", json!({ "manifest": id })),
        ("GET", "/v1/edges/e2/orders", Value::Null),
        ("GET", &format!("/v1/plan?manifest={id}&dest=e2"), Value::Null),
    ] {
        let (s, v) = f.call(As::Edge("e1"), method, path, body).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "e1 did {method} {path}: {v}");
    }
    let (s, v) = f
        .call(As::Edge("e2"), "PUT", "/v1/edges/e2/inventory", e2_inventory)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = f
        .call(
            As::Edge("e2"),
            "POST",
            "/v1/edges/e2/pins",
            json!({ "manifest": id }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = f
        .call(
            As::Edge("e2"),
            "GET",
            &format!("/v1/plan?manifest={id}&dest=e2"),
            Value::Null,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = f
        .call(
            As::Edge("e1"),
            "DELETE",
            &format!("/v1/edges/e2/pins/{id}"),
            Value::Null,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (_, info) = f.call(As::Operator, "GET", "/v1/edges/e2", Value::Null).await;
    assert_eq!(info["chunks"], 1, "{info}");
}

#[tokio::test]
async fn fleet_settings_need_the_operator() {
    let f = Fleet::new();
    f.call(As::Edge("e1"), "POST", "/v1/edges/e1/register", register_body())
        .await;
    let (_, hex) = published();
    let (_, v) = f
        .call(
            As::Edge("e1"),
            "POST",
            "/v1/manifests",
            json!({ "manifest_hex": hex }),
        )
        .await;
    let id = v["id"].as_str().expect("id").to_string();
    let policy = json!({ "high_watermark": 0.002, "low_watermark": 0.001 });
    let (s, v) = f.call(As::Edge("e1"), "PUT", "/v1/policy", policy.clone()).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = f
        .call(
            As::Edge("e1"),
            "POST",
            "/v1/hints",
            json!({ "manifest": id, "edge": "e1" }),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = f
        .call(As::Edge("e1"), "DELETE", "/v1/edges/e1", Value::Null)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (_, p) = f.call(As::Edge("e1"), "GET", "/v1/policy", Value::Null).await;
    assert_ne!(
        p["watermarks"]["high"], 0.002,
        "the refused change must not have happened: {p}"
    );

    let (s, v) = f.call(As::Operator, "PUT", "/v1/policy", policy).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = f
        .call(
            As::Operator,
            "POST",
            "/v1/hints",
            json!({ "manifest": id, "edge": "e1" }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = f.call(As::Operator, "DELETE", "/v1/edges/e1", Value::Null).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    assert_eq!(
        f.call(As::Operator, "GET", "/v1/edges/e1", Value::Null).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn inventories_past_capacity_are_refused() {
    let f = Fleet::new();
    let small = json!({ "addr": "e.test:7700", "capacity": 0 });
    f.call(As::Edge("e1"), "POST", "/v1/edges/e1/register", small)
        .await;
    let max = edgeshift_coordinator::ledger::max_chunks(0) as u32;
    let chunks: Vec<Fingerprint> = (0..=max).map(|n| Fingerprint::of(&n.to_le_bytes())).collect();
    let (s, v) = f
        .call(
            As::Edge("e1"),
            "PUT",
            "/v1/edges/e1/inventory",
            json!({ "chunks": chunks, "usage": 0 }),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (_, info) = f.call(As::Operator, "GET", "/v1/edges/e1", Value::Null).await;
    assert_eq!(info["chunks"], 0, "{info}");
}
