//! The coordinator binary over real HTTP on loopback, run open
//! (`--insecure-no-auth`; tests/https_auth.rs covers HTTPS and who may do
//! what): bad input, plans, GC orders, prefetch, restart, GC racing hints
//! and fetches, and connections that hold the listener.

use std::path::Path;
use std::time::Duration;

use edgeshift_common::{ChunkSize, Fingerprint, Manifest};
use edgeshift_testbed::coordinator::{CoordinatorProc, CoordinatorSpec};
use serde_json::{json, Value};

const CHUNK: u64 = 4096;

type Coord = CoordinatorProc;

/// This package's coordinator on a free loopback port with `extra` arguments;
/// killed on drop.
fn start(data: &Path, extra: &[&str]) -> Coord {
    let mut spec = CoordinatorSpec::insecure("127.0.0.1:0", data);
    spec.extra = extra.iter().map(|a| a.to_string()).collect();
    let bin = Path::new(env!("CARGO_BIN_EXE_edgeshift-coordinator"));
    CoordinatorProc::start_local(bin, spec).expect("start edgeshift-coordinator")
}

struct Http {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl Http {
    fn new(c: &Coord) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Http {
            agent,
            base: c.url.clone(),
            token: None,
        }
    }

    fn req(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let url = format!("{}{}", self.base, path);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        macro_rules! go {
            ($r:expr) => {{
                let mut r = $r;
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r
            }};
        }
        let resp = match (method, body) {
            ("GET", _) => go!(self.agent.get(&url)).call(),
            ("DELETE", _) => go!(self.agent.delete(&url)).call(),
            ("POST", Some(b)) => go!(self.agent.post(&url))
                .content_type("application/json")
                .send(b),
            ("PUT", Some(b)) => go!(self.agent.put(&url)).content_type("application/json").send(b),
            _ => panic!("bad test request {method}"),
        };
        let mut resp = resp.expect("http request");
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_string()
            .expect("body");
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    fn ok(&self, method: &str, path: &str, body: Value) -> Value {
        let b = body.to_string();
        let (s, v) = self.req(method, path, Some(b.as_str()).filter(|_| !body.is_null()));
        assert!((200..300).contains(&s), "{method} {path} gave {s}: {v}");
        v
    }
}

fn fp(n: u32) -> Fingerprint {
    Fingerprint::of(&n.to_le_bytes())
}

fn manifest(ns: impl IntoIterator<Item = u32>) -> Manifest {
    let chunks: Vec<_> = ns.into_iter().map(fp).collect();
    Manifest::new(
        ChunkSize::new(CHUNK).expect("size"),
        CHUNK * chunks.len() as u64,
        chunks,
    )
}

fn publish(h: &Http, m: &Manifest) -> String {
    let v = h.ok(
        "POST",
        "/v1/manifests",
        json!({ "manifest_hex": hex::encode(m.to_bytes()) }),
    );
    v["id"].as_str().expect("id").to_string()
}

fn register(h: &Http, id: &str, capacity: u64) {
    h.ok(
        "POST",
        &format!("/v1/edges/{id}/register"),
        json!({ "addr": format!("{id}.test:7700"), "capacity": capacity }),
    );
}

fn inventory(h: &Http, id: &str, ns: impl IntoIterator<Item = u32>, pins: &[&str]) {
    let chunks: Vec<_> = ns.into_iter().map(fp).collect();
    let usage = chunks.len() as u64 * CHUNK;
    h.ok(
        "PUT",
        &format!("/v1/edges/{id}/inventory"),
        json!({ "chunks": chunks, "usage": usage, "pins": pins }),
    );
}

fn fps(v: &Value) -> Vec<Fingerprint> {
    serde_json::from_value(v.clone()).expect("fingerprint list")
}

#[test]
fn bad_requests_get_clear_4xx() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start(&dir.path().join("data"), &["--max-body", "4096"]);
    let h = Http::new(&c);
    register(&h, "e1", 1 << 20);

    let (s, v) = h.req("POST", "/v1/edges/e1/delta", Some("{\"usage\": 1,"));
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"].as_str().expect("msg").contains("malformed JSON"),
        "{v}"
    );
    let (s, v) = h.req("POST", "/v1/edges/e1/delta", Some(r#"{"usage":"lots"}"#));
    assert_eq!(s, 400, "{v}");
    let (s, v) = h.req(
        "POST",
        "/v1/edges/e1/delta",
        Some(r#"{"usage":1,"added":["nothex"]}"#),
    );
    assert_eq!(s, 400, "{v}");

    let (s, v) = h.req("POST", "/v1/edges/ghost/delta", Some(r#"{"usage":1}"#));
    assert_eq!(s, 404, "{v}");
    assert!(v["error"].as_str().expect("msg").contains("ghost"));
    assert_eq!(h.req("GET", "/v1/edges/ghost/orders", None).0, 404);

    let big = format!(
        r#"{{"usage":1,"added":[{}]}}"#,
        vec![format!("\"{}\"", fp(1)); 200].join(",")
    );
    let (s, v) = h.req("POST", "/v1/edges/e1/delta", Some(&big));
    assert_eq!(s, 413, "{v}");

    let (s, _) = h.req("GET", "/v1/chunks/zz", None);
    assert_eq!(s, 400);
    let (s, _) = h.req("GET", &format!("/v1/chunks/{}", fp(9)), None);
    assert_eq!(s, 404);
    let (s, v) = h.req("PUT", "/v1/policy", Some(r#"{"policy":"fifo"}"#));
    assert_eq!(s, 400, "{v}");
    let (s, v) = h.req(
        "PUT",
        "/v1/policy",
        Some(r#"{"high_watermark":0.5,"low_watermark":0.7}"#),
    );
    assert_eq!(s, 400, "{v}");
    let (s, v) = h.req("POST", "/v1/manifests", Some(r#"{"manifest_hex":"00ff"}"#));
    assert_eq!(s, 400, "{v}");
    let (s, v) = h.req("GET", "/v1/plan?dest=e1", None);
    assert_eq!(s, 400, "{v}");
    let (s, v) = h.req(
        "POST",
        "/v1/edges/e1/paths",
        Some(r#"{"paths":[{"peer":"e2","bytes_per_sec":-5}]}"#),
    );
    assert_eq!(s, 400, "{v}");
    let (s, v) = h.req("POST", "/v1/edges/e1/register", Some(r#"{"addr":"x"}"#));
    assert_eq!(s, 400, "{v}");
    assert_eq!(h.req("DELETE", "/v1/leases/77", None).0, 404);
    assert_eq!(h.req("GET", "/v1/nope", None).0, 404);
}

#[test]
fn plans_rank_by_path_rate_and_are_empty_when_nothing_is_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start(&dir.path().join("data"), &[]);
    let h = Http::new(&c);
    let m = publish(&h, &manifest(0..30));
    for e in ["dst", "fast", "slow", "full"] {
        register(&h, e, 1 << 30);
    }
    inventory(&h, "fast", 0..30, &[]);
    inventory(&h, "slow", 0..30, &[]);
    inventory(&h, "full", 0..30, &[]);
    inventory(&h, "dst", 0..5, &[]);
    h.ok(
        "POST",
        "/v1/edges/dst/paths",
        json!({ "paths": [
            { "peer": "fast", "bytes_per_sec": 100e6 },
            { "peer": "slow", "bytes_per_sec": 50e6 },
            { "peer": "full", "bytes_per_sec": 1e6 },
        ]}),
    );
    let p = h.ok(
        "GET",
        &format!("/v1/plan?manifest={m}&dest=dst&alternatives=3"),
        Value::Null,
    );
    assert_eq!(p["missing_chunks"], 25);
    assert_eq!(p["unavailable_chunks"], 0);
    let chunks = p["chunks"].as_array().expect("chunks");
    assert_eq!(chunks.len(), 25);
    assert_eq!(chunks[0]["holders"], json!(["fast", "slow", "full"]));
    let count = |e: &str| chunks.iter().filter(|c| c["source"] == e).count();
    // 100:50:1 MB/s over 25 equal chunks: about 2/3 to fast, 1/3 to slow.
    assert!(count("fast") >= 16 && count("slow") >= 7, "{p}");
    assert!(p["makespan_secs"].as_f64().expect("f") >= p["lower_bound_secs"].as_f64().expect("f"));
    let lease = p["lease"].as_u64().expect("a plan takes a lease");
    // The leased source chunks show in the chunk view.
    let ci = h.ok("GET", &format!("/v1/chunks/{}", fp(10)), Value::Null);
    assert_eq!(ci["holders"], json!(["fast", "full", "slow"]));
    assert_eq!(ci["leased_on"].as_array().expect("arr").len(), 1);
    assert_eq!(h.req("DELETE", &format!("/v1/leases/{lease}"), None).0, 204);

    let p = h.ok("GET", &format!("/v1/plan?manifest={m}&dest=full"), Value::Null);
    assert_eq!(p["missing_chunks"], 0);
    assert_eq!(p["chunks"], json!([]));
    assert_eq!(p["sources"], json!([]));
    assert_eq!(p["lease"], Value::Null);

    // A chunk nobody holds is listed as unavailable, not silently dropped.
    let m2 = publish(&h, &manifest([0, 999]));
    let p = h.ok("GET", &format!("/v1/plan?manifest={m2}&dest=dst"), Value::Null);
    assert_eq!(p["missing_chunks"], 1);
    assert_eq!(p["unavailable_chunks"], 1);
    assert_eq!(p["chunks"][0]["source"], Value::Null);
    let (s, _) = h.req("GET", &format!("/v1/plan?manifest={}&dest=dst", fp(5)), None);
    assert_eq!(s, 404);
    let (s, _) = h.req("GET", &format!("/v1/plan?manifest={m}&dest=ghost"), None);
    assert_eq!(s, 404);
}

#[test]
fn gc_orders_follow_policy_and_spare_pinned_and_leased_chunks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start(&dir.path().join("data"), &[]);
    let h = Http::new(&c);
    h.ok(
        "PUT",
        "/v1/policy",
        json!({ "policy": "lru", "high_watermark": 0.9, "low_watermark": 0.5 }),
    );
    let pinned = publish(&h, &manifest(0..5));
    // The image the chunks come from, so the coordinator knows their size.
    publish(&h, &manifest(0..20));
    register(&h, "a", 20 * CHUNK);
    register(&h, "b", 1 << 30);
    inventory(&h, "a", [], &[&pinned]);
    // Chunks 0..19 arrive one report at a time (so LRU order = arrival).
    for n in 0..20 {
        h.ok(
            "POST",
            "/v1/edges/a/delta",
            json!({ "added": [fp(n)], "usage": (n as u64 + 1) * CHUNK }),
        );
    }
    // Chunk 5 is then read often, chunk 6 is leased by b's transfer.
    for _ in 0..3 {
        h.ok(
            "POST",
            "/v1/edges/a/delta",
            json!({ "accessed": [fp(5)], "usage": 20 * CHUNK }),
        );
    }
    let want = publish(&h, &manifest([6]));
    inventory(&h, "b", [], &[]);
    let p = h.ok("GET", &format!("/v1/plan?manifest={want}&dest=b"), Value::Null);
    assert_eq!(p["chunks"][0]["source"], "a");

    let o = h.ok("GET", "/v1/edges/a/orders", Value::Null);
    let drop = fps(&o["drop"]);
    // 20 chunks, low watermark 10: drop 10, oldest first, skipping pinned 0..5 and leased 6.
    assert_eq!(drop, (7..17).map(fp).collect::<Vec<_>>(), "{o}");
    assert_eq!(o["policy"], "lru");

    // Switch to LFU at run time: chunk 5 (most used) is pinned anyway; order
    // now ranks by count, all 1 except 5, so arrival breaks ties — same set.
    h.ok("PUT", "/v1/policy", json!({ "policy": "lfu" }));
    let o = h.ok("GET", "/v1/edges/a/orders", Value::Null);
    assert_eq!(o["policy"], "lfu");
    for d in fps(&o["drop"]) {
        assert!(
            d != fp(6) && !(0..5).map(fp).any(|x| x == d),
            "dropped protected {d}"
        );
    }
    // Below the high watermark after the drops: no orders.
    h.ok(
        "POST",
        "/v1/edges/a/delta",
        json!({ "removed": drop, "usage": 10 * CHUNK }),
    );
    let o = h.ok("GET", "/v1/edges/a/orders", Value::Null);
    assert_eq!(o["drop"], json!([]));
    let e = h.ok("GET", "/v1/edges/a", Value::Null);
    assert_eq!(e["chunks"], 10);
    assert_eq!(e["pinned_chunks"], 5);
}

#[test]
fn hints_turn_into_prefetch_orders_within_capacity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start(&dir.path().join("data"), &[]);
    let h = Http::new(&c);
    h.ok(
        "PUT",
        "/v1/policy",
        json!({ "high_watermark": 0.9, "low_watermark": 0.5 }),
    );
    let m = publish(&h, &manifest(0..40));
    register(&h, "src", 1 << 30);
    register(&h, "dst", 20 * CHUNK);
    inventory(&h, "src", 0..40, &[]);
    inventory(&h, "dst", 0..4, &[]);
    let v = h.ok("POST", "/v1/hints", json!({ "manifest": m, "edge": "dst" }));
    assert_eq!(v["missing_chunks"], 36);
    let o = h.ok("GET", "/v1/edges/dst/orders", Value::Null);
    let pf = &o["prefetch"][0];
    assert_eq!(pf["manifest"], m.as_str());
    let chunks = pf["chunks"].as_array().expect("chunks");
    // Room under the high watermark: 18 chunks - 4 held = 14.
    assert_eq!(chunks.len(), 14, "{o}");
    assert_eq!(chunks[0]["fp"], fp(4).to_string());
    assert_eq!(chunks[0]["source"], "src");
    assert_eq!(chunks[0]["addr"], "src.test:7700");
    assert!(o["lease"].as_u64().is_some());
    let (s, _) = h.req(
        "POST",
        "/v1/hints",
        Some(&json!({ "manifest": m, "edge": "nowhere" }).to_string()),
    );
    assert_eq!(s, 404);
    assert_eq!(h.req("DELETE", &format!("/v1/hints/dst/{m}"), None).0, 204);
    let o = h.ok("GET", "/v1/edges/dst/orders", Value::Null);
    assert_eq!(o["prefetch"], json!([]));
    assert_eq!(h.req("DELETE", &format!("/v1/hints/dst/{m}"), None).0, 404);
    // The VM arriving (its image pinned there) fulfils a hint.
    h.ok("POST", "/v1/hints", json!({ "manifest": m, "edge": "dst" }));
    assert_eq!(h.ok("GET", "/v1/edges/dst", Value::Null)["hints"], json!([m]));
    h.ok("POST", "/v1/edges/dst/pins", json!({ "manifest": m }));
    assert_eq!(h.ok("GET", "/v1/edges/dst", Value::Null)["hints"], json!([]));
}

#[test]
fn restart_keeps_catalogue_policy_paths_hints_and_plans() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let m = manifest(0..64);
    let setup = |h: &Http| {
        for e in ["e3", "e1", "e2", "d"] {
            register(h, e, 1 << 30);
        }
        inventory(h, "e1", 0..40, &[]);
        inventory(h, "e2", 20..64, &[]);
        inventory(h, "e3", (0..64).step_by(3), &[]);
        inventory(h, "d", 0..8, &[]);
    };
    let (before, mid, leased) = {
        let c = start(&data, &[]);
        let h = Http::new(&c);
        let id = publish(&h, &m);
        setup(&h);
        h.ok(
            "POST",
            "/v1/edges/d/paths",
            json!({ "paths": [
                { "peer": "e1", "bytes_per_sec": 30e6 },
                { "peer": "e2", "bytes_per_sec": 80e6 },
                { "peer": "e3", "bytes_per_sec": 5e6 },
            ]}),
        );
        h.ok(
            "PUT",
            "/v1/policy",
            json!({ "policy": "popularity", "high_watermark": 0.8, "low_watermark": 0.6 }),
        );
        h.ok("POST", "/v1/hints", json!({ "manifest": id, "edge": "d" }));
        let plan = h.ok(
            "GET",
            &format!("/v1/plan?manifest={id}&dest=d&lease=false"),
            Value::Null,
        );
        // An in-flight transfer's lease, to survive the restart.
        let leased = h.ok("GET", &format!("/v1/plan?manifest={id}&dest=d"), Value::Null);
        (plan, id, leased)
    };
    let c = start(&data, &[]);
    let h = Http::new(&c);
    let pol = h.ok("GET", "/v1/policy", Value::Null);
    assert_eq!(pol["policy"], "popularity");
    assert_eq!(pol["watermarks"]["high"], 0.8);
    let cat = h.ok("GET", &format!("/v1/manifests/{mid}"), Value::Null);
    assert_eq!(cat["chunks"], 64);
    // Inventory is not persisted: until agents re-register, edges are unknown.
    assert_eq!(h.req("GET", "/v1/edges/d", None).0, 404);
    // Re-register in another order: plans must not depend on it.
    setup(&h);
    let e = h.ok("GET", "/v1/edges/d", Value::Null);
    assert_eq!(e["hints"], json!([mid]));
    let after = h.ok(
        "GET",
        &format!("/v1/plan?manifest={mid}&dest=d&lease=false"),
        Value::Null,
    );
    assert_eq!(before, after);
    assert_eq!(after["sources"][0]["measured"], true);
    // The lease came back as its sources re-reported: its chunks are still
    // protected there, and it can be released.
    let lease = leased["lease"].as_u64().expect("lease id");
    let first = &leased["chunks"][0];
    let src = first["source"].as_str().expect("source");
    let ci = h.ok(
        "GET",
        &format!("/v1/chunks/{}", first["fp"].as_str().expect("fp")),
        Value::Null,
    );
    assert_eq!(ci["leased_on"], json!([src]), "{ci}");
    let n: u64 = ["e1", "e2", "e3"]
        .iter()
        .map(|e| {
            h.ok("GET", &format!("/v1/edges/{e}"), Value::Null)["leased_chunks"]
                .as_u64()
                .expect("n")
        })
        .sum();
    assert_eq!(n, leased["missing_chunks"].as_u64().expect("missing"));
    assert_eq!(h.req("DELETE", &format!("/v1/leases/{lease}"), None).0, 204);
    let ci = h.ok(
        "GET",
        &format!("/v1/chunks/{}", first["fp"].as_str().expect("fp")),
        Value::Null,
    );
    assert_eq!(ci["leased_on"], json!([]));
    // New leases do not reuse the old id.
    let again = h.ok("GET", &format!("/v1/plan?manifest={mid}&dest=d"), Value::Null);
    assert!(again["lease"].as_u64().expect("lease") > lease);
}

#[test]
fn metrics_are_prometheus_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start(&dir.path().join("data"), &[]);
    let h = Http::new(&c);
    register(&h, "e1", 1 << 20);
    inventory(&h, "e1", 0..3, &[]);
    let (s, v) = h.req("GET", "/metrics", None);
    assert_eq!(s, 200);
    let text = v.as_str().expect("text body");
    assert!(text.contains("coordinator_edges 1"), "{text}");
    assert!(text.contains("coordinator_chunks_known 3"), "{text}");
    assert!(text.contains("coordinator_http_requests_total{"), "{text}");
}

/// GC, hints, plans (fetches) and heartbeats race from several threads. The
/// invariants: no drop order ever names a pinned chunk, nor a chunk that a
/// plan holding a live lease assigned to that edge.
#[test]
fn gc_never_drops_pinned_or_in_flight_chunks_under_races() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start(&dir.path().join("data"), &[]);
    let h = Http::new(&c);
    h.ok(
        "PUT",
        "/v1/policy",
        json!({ "policy": "lru", "high_watermark": 0.6, "low_watermark": 0.3 }),
    );
    let pinned_m = manifest(0..50);
    let pinned_id = publish(&h, &pinned_m);
    let images: Vec<(String, Vec<u32>)> = (0..6u32)
        .map(|i| {
            let ns: Vec<u32> = (1000 + i * 40..1000 + i * 40 + 60).collect();
            (publish(&h, &manifest(ns.clone())), ns)
        })
        .collect();
    let edges = ["s0", "s1", "s2"];
    for e in edges {
        register(&h, e, 200 * CHUNK);
        inventory(&h, e, (0..50).chain(1000..1300), &[&pinned_id]);
    }
    register(&h, "dest", 1 << 30);
    inventory(&h, "dest", [], &[]);
    let pinned: Vec<Fingerprint> = (0..50).map(fp).collect();

    std::thread::scope(|s| {
        // Fetchers: plan with a lease, check GC spares the leased chunks on
        // their sources while the lease lives, then release.
        for t in 0..2 {
            let h = Http::new(&c);
            let images = &images;
            s.spawn(move || {
                for round in 0..15 {
                    let (id, _) = &images[(t + round) % images.len()];
                    let p = h.ok("GET", &format!("/v1/plan?manifest={id}&dest=dest"), Value::Null);
                    let lease = p["lease"].as_u64();
                    for e in ["s0", "s1", "s2"] {
                        let o = h.ok("GET", &format!("/v1/edges/{e}/orders"), Value::Null);
                        let drop = fps(&o["drop"]);
                        for ch in p["chunks"].as_array().expect("chunks") {
                            if ch["source"] == e {
                                let f: Fingerprint = serde_json::from_value(ch["fp"].clone()).expect("fp");
                                assert!(!drop.contains(&f), "GC dropped in-flight chunk {f} on {e}");
                            }
                        }
                    }
                    if let Some(l) = lease {
                        assert_eq!(h.req("DELETE", &format!("/v1/leases/{l}"), None).0, 204);
                    }
                }
            });
        }
        // Agents: carry out drops, add new chunks, report accesses.
        for (i, e) in edges.iter().enumerate() {
            let h = Http::new(&c);
            let pinned = &pinned;
            s.spawn(move || {
                let mut next = 5000 + i as u32 * 10_000;
                let mut held: u64 = 350;
                for _ in 0..25 {
                    let o = h.ok("GET", &format!("/v1/edges/{e}/orders"), Value::Null);
                    let drop = fps(&o["drop"]);
                    for d in &drop {
                        assert!(!pinned.contains(d), "GC dropped pinned chunk {d} on {e}");
                    }
                    let added: Vec<_> = (next..next + 30).map(fp).collect();
                    next += 30;
                    held = held + 30 - drop.len() as u64;
                    h.ok(
                        "POST",
                        &format!("/v1/edges/{e}/delta"),
                        json!({ "added": added, "removed": drop, "accessed": [fp(1000)], "usage": held * CHUNK }),
                    );
                }
            });
        }
        // Hints for the destination, and its prefetch orders.
        let h2 = Http::new(&c);
        let images = &images;
        s.spawn(move || {
            for (id, _) in images {
                h2.ok("POST", "/v1/hints", json!({ "manifest": id, "edge": "dest" }));
                h2.ok("GET", "/v1/edges/dest/orders", Value::Null);
            }
        });
    });
    // Every source still holds every pinned chunk.
    for f in &pinned {
        let ci = h.ok("GET", &format!("/v1/chunks/{f}"), Value::Null);
        assert_eq!(ci["holders"], json!(["s0", "s1", "s2"]));
        assert_eq!(ci["pins"]["s0"], 1);
    }
}

#[test]
fn plans_cap_their_sources_but_keep_every_chunk_reachable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start(&dir.path().join("data"), &[]);
    let h = Http::new(&c);
    let m = publish(&h, &manifest(0..11));
    register(&h, "dst", 1 << 30);
    inventory(&h, "dst", [], &[]);
    let mut rates = Vec::new();
    for i in 0..6u32 {
        let e = format!("e{i}");
        register(&h, &e, 1 << 30);
        // Only the slowest, e5, holds chunk 10.
        if i == 5 {
            inventory(&h, &e, 0..11, &[]);
        } else {
            inventory(&h, &e, 0..10, &[]);
        }
        rates.push(json!({ "peer": e, "bytes_per_sec": 100e6 - i as f64 * 10e6 }));
    }
    h.ok("POST", "/v1/edges/dst/paths", json!({ "paths": rates }));
    let used = |p: &Value| -> Vec<String> {
        let mut v: Vec<String> = p["sources"]
            .as_array()
            .expect("sources")
            .iter()
            .map(|s| s["edge"].as_str().expect("edge").to_string())
            .collect();
        v.sort();
        v
    };
    let p = h.ok(
        "GET",
        &format!("/v1/plan?manifest={m}&dest=dst&max_sources=2&lease=false"),
        Value::Null,
    );
    assert_eq!(used(&p), vec!["e0", "e5"], "{p}");
    assert_eq!(p["unavailable_chunks"], 0);
    // One allowed, but chunk 10 needs e5: coverage wins over the cap.
    let p = h.ok(
        "GET",
        &format!("/v1/plan?manifest={m}&dest=dst&max_sources=1&lease=false"),
        Value::Null,
    );
    assert_eq!(used(&p), vec!["e0", "e5"], "{p}");
    let p = h.ok(
        "GET",
        &format!("/v1/plan?manifest={m}&dest=dst&lease=false"),
        Value::Null,
    );
    assert_eq!(used(&p).len(), 6, "{p}");
    for ch in p["chunks"].as_array().expect("chunks") {
        assert!(ch["holders"].as_array().expect("holders").len() <= 4);
    }
}

#[test]
fn half_sent_headers_are_closed_and_do_not_block_real_requests() {
    // Issue 21, finding 3: connections holding half-sent headers were never closed.
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start(&dir.path().join("data"), &["--header-timeout", "1"]);
    let h = Http::new(&c);
    let mut half: Vec<std::net::TcpStream> = (0..300)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(c.addr).expect("connect");
            s.write_all(b"GET /v1/policy HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .expect("send part");
            s
        })
        .collect();
    let started = std::time::Instant::now();
    let (s, v) = h.req("GET", "/v1/policy", None);
    assert_eq!(s, 200, "{v}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a real request waited {:?} behind 300 half-sent ones",
        started.elapsed()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    for (i, s) in half.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("half-sent connection {i} still open after the 1 s header timeout: {e}"),
        }
    }
}
