//! The coordinator's caching policies under eviction pressure: the same
//! trace of handoffs of the Debian image family (four users whose VMs run
//! base, nginx, postgresql and python3 move around the edges) on the edge3
//! topology, once per policy, each in its own testbed with its own
//! coordinator (the three run side by side: the figures are bytes and
//! chunks, not times). Edges' stores are limited by `--capacity` to less
//! than the family's working set, so the coordinator's GC really evicts.
//!
//! A handoff is what the migration engine does to the disk: the destination
//! runs `edgeshift fetch --coordinator` (pins the image there, fetches what
//! it lacks from the planned holders), the edge the VM left drops its pin
//! (`STORE/pins/ID` and `DELETE /v1/edges/{edge}/pins/{id}`), and the trace
//! waits for the agents to carry out the GC orders that follow.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edgeshift_common::fingerprint::Fingerprint;
use edgeshift_common::manifest::Manifest;

use crate::cluster::{Cluster, COORDINATOR_PORT};
use crate::images::DebianImages;
use crate::record::{EdgeStore, PolicyRun, PolicyStep};
use crate::scenario::ScenarioError;
use crate::signals;
use crate::topology::Topology;
use edgeshift_testbed::{self as testbed, Testbed};

/// The policies compared, as the coordinator names them.
pub const POLICIES: [&str; 3] = ["lru", "lfu", "popularity"];
/// The image family.
pub const IMAGES: [&str; 4] = ["base", "nginx", "postgresql", "python3"];
/// Each edge's store capacity: under the family's working set (about 834 MB
/// of distinct chunks; postgresql alone is 752 MB).
pub const EDGE_CAPACITY: u64 = 800_000_000;
const EDGES: [&str; 3] = ["e1", "e2", "e3"];
/// (user, image, edge it moves to), in order; a user's first entry places it.
pub const TRACE: [(&str, &str, &str); 14] = [
    ("u1", "nginx", "e1"),
    ("u2", "postgresql", "e2"),
    ("u3", "python3", "e3"),
    ("u4", "base", "e1"),
    ("u1", "nginx", "e2"),
    ("u2", "postgresql", "e3"),
    ("u3", "python3", "e1"),
    ("u4", "base", "e3"),
    ("u1", "nginx", "e3"),
    ("u2", "postgresql", "e1"),
    ("u3", "python3", "e2"),
    ("u4", "base", "e2"),
    ("u1", "nginx", "e1"),
    ("u2", "postgresql", "e2"),
];
/// Longest wait for an edge's GC after a step (agents beat every 5 s).
const GC_WAIT: Duration = Duration::from_secs(16);

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ScenarioError {
    let what = what.into();
    move |source| ScenarioError::Io { what, source }
}

fn out_err(what: &str, msg: impl Into<String>) -> ScenarioError {
    ScenarioError::Output(what.to_string(), msg.into())
}

/// Runs the trace once per policy, side by side; returns them in [`POLICIES`] order.
pub fn run_all(tag: &str, work: &Path, log: &dyn Fn(&str)) -> Result<Vec<PolicyRun>, ScenarioError> {
    let images = DebianImages::ensure(&IMAGES)?;
    log(&format!(
        "policies: {} handoffs of the Debian family under {} (edges' capacity {:.0} MB, unthrottled links), side by side",
        TRACE.len(),
        POLICIES.join(", "),
        EDGE_CAPACITY as f64 / 1e6
    ));
    let results: Vec<Result<PolicyRun, ScenarioError>> = std::thread::scope(|s| {
        let handles: Vec<_> = POLICIES
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let tag = format!("{tag}{i}");
                let dir = work.join(p);
                let images = &images;
                s.spawn(move || run_one(&tag, &dir, p, images))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(out_err("policy trace", "a trace thread panicked")))
            })
            .collect()
    });
    let mut runs = Vec::new();
    for r in results {
        let r = r?;
        log(&format!(
            "  {}: hit ratio {:.3} (local {:.3}), {:.1} MB from the origin, {:.1} MB evicted, {:.1} MB stored at the end, dedup {:.2}x",
            r.policy,
            r.hit_ratio(),
            r.local_hit_ratio(),
            r.origin_wire_bytes() as f64 / 1e6,
            r.evicted_bytes() as f64 / 1e6,
            r.stored_bytes() as f64 / 1e6,
            r.dedup_ratio()
        ));
        runs.push(r);
    }
    Ok(runs)
}

/// One image as the trace needs it.
struct Image {
    id: String,
    manifest: Manifest,
    unique: Vec<Fingerprint>,
}

impl Image {
    fn chunk_bytes(&self) -> u64 {
        self.manifest.chunk_size.bytes()
    }
}

fn chunk_path(store: &Path, fp: &Fingerprint) -> PathBuf {
    let hex = fp.to_hex();
    store.join("chunks").join(&hex[..2]).join(hex)
}

/// Bytes of chunk files in a store.
fn store_usage(store: &Path) -> Result<u64, ScenarioError> {
    let mut sum = 0;
    let chunks = store.join("chunks");
    let fans = match std::fs::read_dir(&chunks) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io("reading a store")(e)),
    };
    for fan in fans {
        let fan = fan.map_err(io("reading a store"))?;
        let Ok(entries) = std::fs::read_dir(fan.path()) else {
            continue;
        };
        for c in entries.flatten() {
            // A chunk deleted by GC between listing and stat is simply gone.
            if let Ok(m) = c.metadata() {
                if m.is_file() {
                    sum += m.len();
                }
            }
        }
    }
    Ok(sum)
}

/// A coordinator API call from inside the coordinator's namespace.
fn api(
    tb: &Testbed,
    host: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<serde_json::Value, ScenarioError> {
    let mut cmd = tb.command(host, "curl");
    cmd.args(["-sS", "--fail-with-body", "-X", method])
        .arg(format!("http://127.0.0.1:{COORDINATOR_PORT}{path}"));
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "-d", b]);
    }
    let out = cmd.stdin(Stdio::null()).output().map_err(io("curl"))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(out_err(
            &format!("coordinator {method} {path}"),
            format!("{text} {}", String::from_utf8_lossy(&out.stderr).trim()),
        ));
    }
    if text.trim().is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_str(&text).map_err(|_| out_err(&format!("coordinator {method} {path}"), text))
}

/// `DELETE /v1/edges/{edge}/pins/{id}`; a pin the coordinator does not know is fine.
fn unpin_at_coordinator(tb: &Testbed, coord: &str, edge: &str, id: &str) -> Result<(), ScenarioError> {
    let out = tb
        .command(coord, "curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "DELETE"])
        .arg(format!(
            "http://127.0.0.1:{COORDINATOR_PORT}/v1/edges/{edge}/pins/{id}"
        ))
        .stdin(Stdio::null())
        .output()
        .map_err(io("curl"))?;
    let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match code.as_str() {
        "200" | "204" | "404" => Ok(()),
        _ => Err(out_err(
            "coordinator DELETE pin",
            format!("HTTP {code}: {}", String::from_utf8_lossy(&out.stderr)),
        )),
    }
}

fn run_one(tag: &str, work: &Path, policy: &str, images: &DebianImages) -> Result<PolicyRun, ScenarioError> {
    let started = Instant::now();
    let mut topo = Topology::edge3();
    topo.links.clear();
    topo.default_rate_mbit = None;
    let coord = topo
        .coordinator
        .clone()
        .ok_or_else(|| out_err("edge3 topology", "no coordinator host"))?;
    testbed::cleanup_stale(tag)?;
    signals::register(tag);
    let mut tb = topo.build(tag)?;
    let _ = std::fs::remove_dir_all(work);
    let result = (|| {
        tb.route_host_addrs()?;
        let capacity = |h: &str| if h == coord { 64 << 30 } else { EDGE_CAPACITY };
        let cluster = Cluster::start_with(&tb, &topo, &work.join("cluster"), &capacity, true)?;
        let store = |h: &str| {
            cluster
                .store(h)
                .map(Path::to_path_buf)
                .ok_or_else(|| out_err("cluster", format!("no store on {h}")))
        };
        let origin_store = store(&coord)?;
        let mut imgs: BTreeMap<&str, Image> = BTreeMap::new();
        for name in IMAGES {
            let out = Command::new(&cluster.bins.edgeshift)
                .arg("slice")
                .arg(images.path(name))
                .arg("--store")
                .arg(&origin_store)
                .stdin(Stdio::null())
                .output()
                .map_err(io("edgeshift slice"))?;
            let text = String::from_utf8_lossy(&out.stdout);
            let id = text.lines().last().unwrap_or_default().trim().to_string();
            if !out.status.success() || id.len() != 64 {
                return Err(out_err("edgeshift slice", String::from_utf8_lossy(&out.stderr)));
            }
            let bytes =
                std::fs::read(origin_store.join("manifests").join(&id)).map_err(io("reading a manifest"))?;
            let manifest = Manifest::from_bytes(&bytes).map_err(|e| out_err("manifest", e.to_string()))?;
            let unique = manifest.unique_chunks();
            imgs.insert(name, Image { id, manifest, unique });
        }
        let set = api(
            &tb,
            &coord,
            "PUT",
            "/v1/policy",
            Some(&format!("{{\"policy\":\"{policy}\"}}")),
        )?;
        let high = set["watermarks"]["high"].as_f64().unwrap_or(0.9);
        let low = set["watermarks"]["low"].as_f64().unwrap_or(0.75);
        if set["policy"].as_str() != Some(policy) {
            return Err(out_err("PUT /v1/policy", set.to_string()));
        }
        // The origin's agent publishes the manifests and reports its chunks
        // with its next heartbeat; every plan must find a holder.
        let deadline = Instant::now() + Duration::from_secs(40);
        for img in imgs.values() {
            loop {
                let plan = api(
                    &tb,
                    &coord,
                    "GET",
                    &format!("/v1/plan?manifest={}&dest=e1&lease=false", img.id),
                    None,
                );
                match plan {
                    Ok(p)
                        if p["unavailable_chunks"].as_u64() == Some(0)
                            && p["missing_chunks"].as_u64() > Some(0) =>
                    {
                        break
                    }
                    _ if Instant::now() > deadline => {
                        return Err(out_err(
                            "coordinator",
                            format!("no plan with holders for {} after 40 s", img.id),
                        ))
                    }
                    _ => std::thread::sleep(Duration::from_millis(500)),
                }
            }
        }
        let edge_stores: BTreeMap<&str, PathBuf> = EDGES
            .iter()
            .map(|e| store(e).map(|s| (*e, s)))
            .collect::<Result<_, _>>()?;
        let mut running: BTreeMap<&str, (&str, &str)> = BTreeMap::new(); // user -> (image, edge)
        let mut steps = Vec::new();
        for (user, image, to) in TRACE {
            let img = &imgs[image];
            let from = running.get(user).map(|(_, e)| *e);
            let dst_store = &edge_stores[to];
            let local = img
                .unique
                .iter()
                .filter(|fp| chunk_path(dst_store, fp).is_file())
                .count() as u64;
            let edge_held = img
                .unique
                .iter()
                .filter(|fp| !chunk_path(dst_store, fp).is_file())
                .filter(|fp| {
                    edge_stores
                        .iter()
                        .any(|(e, s)| e != &to && chunk_path(s, fp).is_file())
                })
                .count() as u64;
            let url = format!("http://{}:{COORDINATOR_PORT}", tb.addr_of(&coord, to)?);
            let t = Instant::now();
            let out = tb
                .command(to, &cluster.bins.edgeshift)
                .arg("fetch")
                .arg(&img.id)
                .arg("--store")
                .arg(dst_store)
                .args(
                    cluster
                        .creds
                        .args(to)
                        .map_err(crate::cluster::ClusterError::from)?,
                )
                .args(["--coordinator", &url, "--json", "--id", to])
                .stdin(Stdio::null())
                .output()
                .map_err(io("edgeshift fetch"))?;
            let fetch_seconds = t.elapsed().as_secs_f64();
            let text = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                return Err(out_err(
                    "edgeshift fetch --coordinator",
                    format!("{user} {image} -> {to}: {}", String::from_utf8_lossy(&out.stderr)),
                ));
            }
            let report: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or(""))
                .map_err(|_| out_err("edgeshift fetch --json", text.to_string()))?;
            let (mut oc, mut ow, mut ec, mut ew) = (0, 0, 0, 0);
            for p in report["peers"].as_array().into_iter().flatten() {
                let (c, b) = (
                    p["chunks"].as_u64().unwrap_or(0),
                    p["bytes"].as_u64().unwrap_or(0),
                );
                if p["id"].as_str() == Some(coord.as_str()) {
                    oc += c;
                    ow += b;
                } else {
                    ec += c;
                    ew += b;
                }
            }
            running.insert(user, (image, to));
            // The VM left `from`: its pin goes unless another VM there runs the same image.
            if let Some(from) = from.filter(|f| *f != to) {
                let still = running.values().any(|(i, e)| *i == image && *e == from);
                if !still {
                    let _ = std::fs::remove_file(edge_stores[from].join("pins").join(&img.id));
                    unpin_at_coordinator(&tb, &coord, from, &img.id)?;
                }
            }
            // Wait for the GC the step triggers: every edge under its high
            // watermark, or down to what its running VMs pin.
            let protected = |edge: &str| -> u64 {
                let mut set: HashSet<&Fingerprint> = HashSet::new();
                for (i, e) in running.values() {
                    if *e == edge {
                        set.extend(imgs[i].unique.iter());
                    }
                }
                set.len() as u64 * img.chunk_bytes()
            };
            let before: u64 = EDGES
                .iter()
                .map(|e| store_usage(&edge_stores[e]))
                .sum::<Result<u64, _>>()?;
            let gc_deadline = Instant::now() + GC_WAIT;
            loop {
                let mut settled = true;
                for e in EDGES {
                    let usage = store_usage(&edge_stores[e])?;
                    let target = ((high * EDGE_CAPACITY as f64) as u64).max(protected(e) + img.chunk_bytes());
                    if usage > target {
                        settled = false;
                    }
                }
                if settled || Instant::now() > gc_deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            let after: u64 = EDGES
                .iter()
                .map(|e| store_usage(&edge_stores[e]))
                .sum::<Result<u64, _>>()?;
            steps.push(PolicyStep {
                user: user.into(),
                image: image.into(),
                from: from.map(str::to_string),
                to: to.into(),
                chunks: img.unique.len() as u64,
                bytes: img.unique.len() as u64 * img.chunk_bytes(),
                local_chunks: local,
                edge_held_chunks: edge_held,
                from_edges_chunks: ec,
                from_origin_chunks: oc,
                origin_wire_bytes: ow,
                edges_wire_bytes: ew,
                fetch_seconds,
                evicted_bytes: before.saturating_sub(after),
            });
        }
        let mut edges = Vec::new();
        for e in EDGES {
            let s = &edge_stores[e];
            let mut held = Vec::new();
            let (mut logical, mut nonzero) = (0, 0);
            for (name, img) in &imgs {
                if img.unique.iter().all(|fp| chunk_path(s, fp).is_file()) {
                    held.push(name.to_string());
                    logical += img.manifest.image_size;
                    nonzero += img.unique.len() as u64 * img.chunk_bytes();
                }
            }
            edges.push(EdgeStore {
                edge: e.into(),
                stored_bytes: store_usage(s)?,
                images: held,
                logical_bytes: logical,
                nonzero_bytes: nonzero,
            });
        }
        drop(cluster);
        Ok(PolicyRun {
            policy: policy.into(),
            capacity_bytes: EDGE_CAPACITY,
            high_watermark: high,
            low_watermark: low,
            steps,
            edges,
            wall_seconds: started.elapsed().as_secs_f64(),
        })
    })();
    let _ = tb.teardown();
    signals::unregister(tag);
    if std::env::var_os("EDGESHIFT_PERF_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(work);
    }
    result
}

/// Distinct images named in the trace (for the report's description).
pub fn trace_images() -> BTreeSet<&'static str> {
    TRACE.iter().map(|(_, i, _)| *i).collect()
}
