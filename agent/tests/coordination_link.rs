//! The agent's coordinator link against a real coordinator (the
//! `edgeshift-coordinator` program on 127.0.0.1:0) and real chunk servers:
//! inventory, GC re-checked against local pins, prefetch through the
//! transfer fetcher, the planned fetch, a coordinator restart (after a
//! crash), and pins racing GC. The coordinator runs open (plain HTTP)
//! except in the end-to-end CLI test, where the agents present their
//! cluster certificates over HTTPS.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edgeshift_agent::coordination::client::Client;
use edgeshift_agent::coordination::fetch::CoordinatedFetch;
use edgeshift_agent::coordination::link::{Link, LinkConfig};
use edgeshift_agent::coordination::pins::LocalPins;
use edgeshift_agent::store::{ChunkStore, ChunkUses, LocalStore};
use edgeshift_agent::transfer::fetch::{FetchOptions, Fetcher};
use edgeshift_agent::transfer::server::{serve, ServerConfig, ZstdPolicy};
use edgeshift_agent::transfer::Trust;
use edgeshift_common::identity::{Role, ThrowawayCluster, TlsFiles};
use edgeshift_common::{ChunkSize, Fingerprint, Manifest, ManifestId};
use edgeshift_testbed::coordinator::{CoordinatorProc, CoordinatorSpec, CoordinatorTls};

const CHUNK: usize = 4096;

type Coord = CoordinatorProc;

/// `edgeshift-coordinator` on `addr` with its database in `data`; killed on drop.
fn start_coord(data: &Path, addr: &str) -> Coord {
    CoordinatorProc::local(CoordinatorSpec::insecure(addr, data)).expect("start edgeshift-coordinator")
}

fn client(c: &Coord) -> Client {
    Client::new(&c.url, None).expect("client")
}

/// Raw GET for checks, as JSON.
fn get(c: &Coord, path: &str) -> serde_json::Value {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent.get(format!("{}{}", c.url, path)).call().expect("get");
    assert_eq!(r.status().as_u16(), 200, "GET {path}");
    r.body_mut().read_json().expect("json")
}

fn put_policy(c: &Coord, body: serde_json::Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let r = agent
        .put(format!("{}/v1/policy", c.url))
        .send_json(body)
        .expect("put");
    assert_eq!(r.status().as_u16(), 200);
}

fn chunk_data(n: u32) -> Vec<u8> {
    let mut d = vec![0u8; CHUNK];
    d[..4].copy_from_slice(&n.to_le_bytes());
    d[CHUNK - 1] = 7;
    d
}

/// Puts chunks `ns` and their manifest into `store`; returns the manifest id.
fn image(store: &LocalStore, ns: impl IntoIterator<Item = u32>) -> (ManifestId, Manifest) {
    let mut fps = Vec::new();
    for n in ns {
        let d = chunk_data(n);
        let f = Fingerprint::of(&d);
        store.put_chunk(&f, &d).expect("put chunk");
        fps.push(f);
    }
    let m = Manifest::new(
        ChunkSize::new(CHUNK as u64).expect("cs"),
        (CHUNK * fps.len()) as u64,
        fps,
    );
    (store.put_manifest(&m).expect("manifest"), m)
}

fn link(
    c: &Coord,
    edge: &str,
    store: &Arc<LocalStore>,
    capacity: u64,
    trust: Option<Trust>,
    addr: &str,
) -> Link {
    Link::new(
        client(c),
        LinkConfig {
            edge: edge.into(),
            advertise: addr.into(),
            capacity,
            interval: Duration::from_millis(100),
        },
        store.clone(),
        trust,
    )
    .expect("link")
}

/// A chunk server for `store` on 127.0.0.1:0, on its own runtime thread.
struct Server {
    addr: SocketAddr,
    _rt: tokio::runtime::Runtime,
}

/// An edge's TLS identity in the test's throwaway cluster.
fn tls(cluster: &ThrowawayCluster, name: &str) -> Trust {
    Trust::Tls(cluster.edge(name).expect("edge credentials"))
}

fn start_server(store: Arc<LocalStore>, trust: Trust) -> Server {
    start_server_noting(store, trust, None)
}

/// A chunk server that notes what it serves in `uses` (as `edgeshift agent` does).
fn start_server_noting(store: Arc<LocalStore>, trust: Trust, uses: Option<Arc<ChunkUses>>) -> Server {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cfg = Arc::new(ServerConfig {
        trust,
        store,
        zstd: ZstdPolicy::never(),
        uses,
    });
    rt.spawn(async move {
        let _ = serve(listener, cfg).await;
    });
    Server { addr, _rt: rt }
}

#[test]
fn gc_orders_are_rechecked_against_local_pins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start_coord(&dir.path().join("coord"), "127.0.0.1:0");
    let store = Arc::new(LocalStore::open_or_create(dir.path().join("store")).expect("store"));
    let (pinned_id, pinned_m) = image(&store, 0..4);
    let (_other_id, _) = image(&store, 4..20);
    // Pinned locally before connecting: the coordinator learns it in the inventory.
    let pins = LocalPins::for_store(&store).expect("pins");
    pins.pin(&pinned_id, "vm").expect("pin");
    put_policy(
        &c,
        serde_json::json!({ "policy": "lru", "high_watermark": 0.8, "low_watermark": 0.2 }),
    );
    // 20 chunks of 4 KiB in a 20-chunk capacity: over the high watermark.
    let mut l = link(&c, "edge-a", &store, 20 * CHUNK as u64, None, "127.0.0.1:1");
    l.connect().expect("connect");
    let e = get(&c, "/v1/edges/edge-a");
    assert_eq!(e["chunks"], 20);
    assert_eq!(e["pinned_chunks"], 4);
    assert_eq!(e["pinned_manifests"][pinned_id.to_hex()], 1);

    // A second manifest is pinned locally only (the coordinator does not know).
    let late_fps: Vec<_> = (4..8u32).map(|n| Fingerprint::of(&chunk_data(n))).collect();
    let late = Manifest::new(
        ChunkSize::new(CHUNK as u64).expect("cs"),
        4 * CHUNK as u64,
        late_fps.clone(),
    );
    let late_id = store.put_manifest(&late).expect("manifest");
    // Publish it but do not pin it at the coordinator: only the local pin protects it.
    client(&c).publish(&late).expect("publish");
    pins.pin(&late_id, "incoming vm").expect("pin");

    let rep = l.step().expect("step");
    // Low watermark: 4 chunks. All 16 unpinned (by the coordinator's view) are
    // ordered dropped, the locally pinned manifest's included: the link's
    // heartbeat reported them used (a new local pin), so they rank last, but
    // the coordinator does not know the pin and still orders them dropped.
    assert!(!rep.gc.kept_pinned.is_empty(), "{rep:?}");
    for f in pinned_m.chunks.iter().chain(&late_fps) {
        assert!(store.has_chunk(f).expect("has"), "a pinned chunk was deleted");
        assert!(!rep.gc.removed.contains(f));
    }
    assert!(rep.gc.removed.len() >= 6, "{rep:?}");
    for f in &rep.gc.removed {
        assert!(!store.has_chunk(f).expect("has"));
    }
    // The follow-up delta told the coordinator what went.
    let e = get(&c, "/v1/edges/edge-a");
    assert_eq!(e["chunks"], 20 - rep.gc.removed.len() as u64);
}

#[test]
fn served_and_newly_pinned_chunks_rank_as_recent_under_lru() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start_coord(&dir.path().join("coord"), "127.0.0.1:0");
    let cluster = ThrowawayCluster::new(&dir.path().join("tls")).expect("cluster");
    let store = Arc::new(LocalStore::open_or_create(dir.path().join("a")).expect("store"));
    let (served_id, served) = image(&store, 300..310);
    let (_idle_id, idle) = image(&store, 310..320);
    let (pinned_id, pinned) = image(&store, 320..330);
    put_policy(
        &c,
        serde_json::json!({ "policy": "lru", "high_watermark": 0.9, "low_watermark": 0.5 }),
    );
    // 30 chunks in a 40-chunk capacity: under the high watermark, no GC yet.
    let mut l = link(&c, "edge-a", &store, 40 * CHUNK as u64, None, "127.0.0.1:1");
    let server = start_server_noting(store.clone(), tls(&cluster, "edge-a"), Some(l.uses()));
    l.connect().expect("connect");
    assert!(l.step().expect("step").gc.removed.is_empty());

    // A peer fetches one image from this edge; another image starts being
    // used here (a VM pins it) and is released again.
    let peer_store = Arc::new(LocalStore::open_or_create(dir.path().join("b")).expect("store"));
    let fetcher = Fetcher::new(peer_store.clone(), vec![server.addr], tls(&cluster, "edge-b"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let report = rt.block_on(fetcher.fetch(&served_id)).expect("fetch");
    assert_eq!(report.chunks_fetched, 10);
    let pins = LocalPins::for_store(&store).expect("pins");
    pins.pin(&pinned_id, "vm").expect("pin");
    assert!(l.uses().len() >= 10, "served chunks noted");
    l.heartbeat().expect("heartbeat with uses");
    assert!(l.uses().is_empty(), "reported uses are drained");
    pins.unpin(&pinned_id).expect("unpin");

    // Now over the high watermark: GC down to 20 chunks takes the 10 chunks
    // nobody used since they arrived, before any used one.
    put_policy(
        &c,
        serde_json::json!({ "policy": "lru", "high_watermark": 0.7, "low_watermark": 0.5 }),
    );
    let rep = l.step().expect("step");
    let removed: HashSet<Fingerprint> = rep.gc.removed.iter().copied().collect();
    assert_eq!(removed.len(), 10, "{rep:?}");
    for f in &idle.chunks {
        assert!(removed.contains(f), "an unused chunk was kept over used ones");
    }
    for f in served.chunks.iter().chain(&pinned.chunks) {
        assert!(
            store.has_chunk(f).expect("has"),
            "a recently used chunk was evicted first"
        );
    }
}

#[test]
fn pins_racing_gc_are_never_undercut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(LocalStore::open_or_create(dir.path().join("store")).expect("store"));
    let images: Vec<(ManifestId, Manifest)> = (0..8u32).map(|i| image(&store, i * 10..i * 10 + 10)).collect();
    let all: Vec<Fingerprint> = images.iter().flat_map(|(_, m)| m.chunks.clone()).collect();
    let pins = LocalPins::for_store(&store).expect("pins");
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // GC: keeps ordering every chunk dropped, and re-creates dropped ones
        // so there is always something to race over.
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                pins.collect(&store, &all, &HashSet::new()).expect("gc");
                for n in 0..80u32 {
                    let d = chunk_data(n);
                    store.put_chunk(&Fingerprint::of(&d), &d).expect("put");
                }
            }
        });
        for (id, m) in &images {
            pins.pin(id, "race").expect("pin");
            // From here on, nothing of m that exists may disappear.
            let present: Vec<_> = m
                .chunks
                .iter()
                .filter(|f| store.has_chunk(f).expect("has"))
                .copied()
                .collect();
            std::thread::sleep(Duration::from_millis(20));
            for f in &present {
                assert!(
                    store.has_chunk(f).expect("has"),
                    "GC deleted a chunk of a pinned manifest"
                );
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    // Every image is pinned and whole now that GC has stopped re-running.
    let out = pins.collect(&store, &all, &HashSet::new()).expect("gc");
    assert!(out.removed.is_empty(), "{out:?}");
}

#[test]
fn hints_prefetch_through_the_fetcher_and_planned_fetch_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start_coord(&dir.path().join("coord"), "127.0.0.1:0");
    let cluster = ThrowawayCluster::new(&dir.path().join("tls")).expect("cluster");
    let src_store = Arc::new(LocalStore::open_or_create(dir.path().join("src")).expect("store"));
    let (id, m) = image(&src_store, 100..160);
    let server = start_server(src_store.clone(), tls(&cluster, "src"));
    let mut src = link(&c, "src", &src_store, 1 << 30, None, &server.addr.to_string());
    src.connect().expect("src connect");

    // Prefetch: the hint makes the coordinator order dst to pull within its room.
    put_policy(
        &c,
        serde_json::json!({ "high_watermark": 0.5, "low_watermark": 0.4 }),
    );
    let dst_store = Arc::new(LocalStore::open_or_create(dir.path().join("dst")).expect("store"));
    let mut dst = link(
        &c,
        "dst",
        &dst_store,
        80 * CHUNK as u64,
        Some(tls(&cluster, "dst")),
        "127.0.0.1:2",
    );
    dst.connect().expect("dst connect");
    client(&c).hint(&id, "dst").expect("hint");
    let rep = dst.step().expect("step");
    // Room under the high watermark: 40 chunks of the 60.
    assert_eq!(rep.prefetched_chunks, 40, "{rep:?}");
    let have = m
        .chunks
        .iter()
        .filter(|f| dst_store.has_chunk(f).expect("has"))
        .count();
    assert_eq!(have, 40);
    let e = get(&c, "/v1/edges/dst");
    assert_eq!(e["chunks"], 40);
    assert_eq!(
        get(&c, "/v1/edges/src")["leased_chunks"],
        0,
        "prefetch lease released"
    );

    // The planned fetch brings the remaining 20 and pins the image here.
    let cf = CoordinatedFetch::begin(client(&c), &dst_store, "dst", &id).expect("plan");
    assert_eq!(cf.plan.missing_chunks, 20);
    assert_eq!(cf.peers, vec![server.addr]);
    assert_eq!(get(&c, "/v1/edges/src")["leased_chunks"], 20);
    let fetcher = Fetcher::with_options(
        dst_store.clone(),
        cf.peers.clone(),
        tls(&cluster, "dst"),
        FetchOptions::default(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let report = rt.block_on(cf.run(&fetcher)).expect("fetch");
    assert_eq!(report.chunks_fetched, 20);
    assert!(m.chunks.iter().all(|f| dst_store.has_chunk(f).expect("has")));
    assert_eq!(
        LocalPins::for_store(&dst_store)
            .expect("pins")
            .list()
            .expect("list"),
        vec![id]
    );
    assert_eq!(
        get(&c, "/v1/edges/src")["leased_chunks"],
        0,
        "plan lease released"
    );
    assert_eq!(get(&c, "/v1/edges/dst")["pinned_manifests"][id.to_hex()], 1);
    dst.step().expect("step");
    assert_eq!(get(&c, "/v1/edges/dst")["chunks"], 60);
    // Now dst holds everything: its plan is empty.
    let p = client(&c).plan(&id, "dst", 4).expect("plan");
    assert_eq!(p.missing_chunks, 0);
    assert!(p.chunks.is_empty());
}

#[test]
fn link_reports_again_after_a_coordinator_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("coord");
    let c = start_coord(&data, "127.0.0.1:0");
    let addr = c.addr;
    let store = Arc::new(LocalStore::open_or_create(dir.path().join("store")).expect("store"));
    let (id, _) = image(&store, 0..10);
    LocalPins::for_store(&store)
        .expect("pins")
        .pin(&id, "vm")
        .expect("pin");
    let mut l = link(&c, "edge-r", &store, 1 << 30, None, "127.0.0.1:3");
    assert!(l.step().expect("first step").reconnected);
    assert!(!l.step().expect("second step").reconnected);
    drop(c);
    // While it is down, the link fails and will report in full later.
    assert!(l.step().is_err());
    image(&store, 10..15);
    let c = start_coord(&data, &addr.to_string());
    let rep = l.step().expect("step after restart");
    assert!(rep.reconnected);
    let e = get(&c, "/v1/edges/edge-r");
    assert_eq!(e["chunks"], 15);
    assert_eq!(e["pinned_manifests"][id.to_hex()], 1);
    // The catalogue survived the restart too.
    assert_eq!(get(&c, &format!("/v1/manifests/{id}"))["chunks"], 10);
}

#[test]
fn bad_coordinator_urls_and_credentials_are_refused() {
    assert!(Client::new("ftp://x", None).is_err());
    assert!(Client::new("http://", None).is_err());
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = ThrowawayCluster::new(&dir.path().join("tls")).expect("cluster");
    let e = Client::new("https://127.0.0.1:1", None).expect_err("https without a certificate");
    assert!(e.to_string().contains("cluster certificate"), "{e}");
    let files = cluster.edge_files("e1").expect("files");
    let e = Client::new("http://127.0.0.1:1", Some(&files)).expect_err("http with credentials");
    assert!(e.to_string().contains("https://"), "{e}");
    let missing = TlsFiles {
        key: dir.path().join("missing.key"),
        ..files
    };
    let e = Client::new("https://127.0.0.1:1", Some(&missing)).expect_err("missing key");
    assert!(e.to_string().contains("missing.key"), "{e}");
    let c = start_coord(&dir.path().join("coord"), "127.0.0.1:0");
    let unknown = client(&c).orders("ghost").expect_err("unknown edge");
    assert!(unknown.is_unknown_edge(), "{unknown}");
}

/// A child process killed on drop.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn edgeshift() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_edgeshift"))
}

/// `edgeshift agent … --coordinator` on 127.0.0.1:0; returns once it listens.
fn spawn_agent(id: &str, store: &Path, cluster: &ThrowawayCluster, url: &str) -> Proc {
    use std::io::BufRead;
    let mut child = edgeshift()
        .args(["agent", "--listen", "127.0.0.1:0", "--id", id, "--no-zstd"])
        .arg("--store")
        .arg(store)
        .args(cluster.cli_args(id).expect("certificate"))
        .args(["--coordinator", url, "--capacity", "1GiB"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn agent");
    let out = child.stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufReader::new(out)
        .read_line(&mut line)
        .expect("read listening line");
    assert!(line.starts_with("listening on"), "agent said {line:?}");
    Proc(child)
}

/// The CLI end to end over HTTPS: two `edgeshift agent --coordinator`
/// daemons report to the coordinator with their edge certificates;
/// `edgeshift fetch --coordinator` pulls an image sliced at one into the
/// other from the plan, and it restores byte for byte; another edge's
/// certificate may not pin for it.
#[test]
fn agent_and_fetch_cli_work_through_the_coordinator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = ThrowawayCluster::new(&dir.path().join("tls")).expect("cluster");
    let coord_files = cluster
        .files(Role::Coordinator, "coord", &["127.0.0.1".into()])
        .expect("coordinator files");
    let tls = CoordinatorTls {
        ca: coord_files.ca,
        cert: coord_files.cert,
        key: coord_files.key,
        crl: None,
    };
    let c = CoordinatorProc::local(CoordinatorSpec::new(
        "127.0.0.1:0",
        &dir.path().join("coord"),
        tls,
        None,
    ))
    .expect("start edgeshift-coordinator");
    assert!(c.url.starts_with("https://"), "{}", c.url);
    let operator_files = cluster
        .files(Role::Operator, "alice", &[])
        .expect("operator files");
    let operator = Client::new(&c.url, Some(&operator_files)).expect("client");
    let get = |_: &Coord, path: &str| operator.get_json(path).expect("GET");
    // A 3 MiB image of distinct 256 KiB chunks, with a hole.
    let mut img = vec![0u8; 3 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for word in img[..5 << 19].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
    }
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, &img).expect("image");
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let out = edgeshift()
        .arg("slice")
        .arg(&image)
        .arg("--store")
        .arg(&src)
        .output()
        .expect("slice");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .expect("id line")
        .trim()
        .to_string();
    let _src_agent = spawn_agent("src", &src, &cluster, &c.url);
    let _dst_agent = spawn_agent("dst", &dst, &cluster, &c.url);
    // Wait for both links' first reports.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let known = |e: &str| {
            operator
                .get_json(&format!("/v1/edges/{e}"))
                .is_ok_and(|v| v["reported"] == true)
        };
        if known("src") && known("dst") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "agents never reported");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(get(&c, "/v1/edges/src")["chunks"], 10, "the hole is not a chunk");
    assert_eq!(get(&c, &format!("/v1/manifests/{id}"))["unique_chunks"], 10);

    let out = edgeshift()
        .args([
            "fetch",
            &id,
            "--node-id",
            "dst",
            "--json",
            "--coordinator",
            &c.url,
        ])
        .arg("--store")
        .arg(&dst)
        .args(cluster.cli_args("dst").expect("certificate"))
        .output()
        .expect("fetch");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fetch json");
    assert_eq!(report["chunks_fetched"], 10);
    let restored = dir.path().join("restored.raw");
    let out = edgeshift()
        .args(["restore", &id])
        .arg("--store")
        .arg(&dst)
        .arg("--out")
        .arg(&restored)
        .output()
        .expect("restore");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        std::fs::read(&restored).expect("read") == img,
        "restored image differs"
    );
    assert!(
        dst.join("pins").join(&id).is_file(),
        "fetch pins the image locally"
    );
    assert_eq!(get(&c, "/v1/edges/dst")["pinned_manifests"][&id], 1);
    assert_eq!(get(&c, "/v1/edges/src")["leased_chunks"], 0);
    // With its own certificate, src may not pin (or report) for dst.
    let src_files = cluster.edge_files("src").expect("files");
    let as_src = Client::new(&c.url, Some(&src_files)).expect("client");
    let manifest: ManifestId = id.parse().expect("manifest id");
    let e = as_src.pin("dst", &manifest).expect_err("src pinning for dst");
    assert!(e.to_string().contains("403"), "{e}");
    let e = as_src
        .inventory("dst", &[], 0, &[])
        .expect_err("src reporting for dst");
    assert!(e.to_string().contains("403"), "{e}");
    assert_eq!(get(&c, "/v1/edges/dst")["pinned_manifests"][&id], 1);
}

#[test]
fn images_pin_and_unpin_on_both_sides() {
    use edgeshift_agent::coordination::fetch::{pin_image, unpin_image};
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start_coord(&dir.path().join("coord"), "127.0.0.1:0");
    let store = Arc::new(LocalStore::open_or_create(dir.path().join("store")).expect("store"));
    let (id, _) = image(&store, 0..3);
    let mut l = link(&c, "edge-p", &store, 1 << 30, None, "127.0.0.1:4");
    l.connect().expect("connect");
    let cl = client(&c);
    pin_image(&cl, &store, "edge-p", &id, "vm 1").expect("pin");
    assert_eq!(get(&c, "/v1/edges/edge-p")["pinned_chunks"], 3);
    assert_eq!(
        LocalPins::for_store(&store).expect("pins").list().expect("list"),
        vec![id]
    );
    unpin_image(&cl, &store, "edge-p", &id).expect("unpin");
    assert_eq!(get(&c, "/v1/edges/edge-p")["pinned_chunks"], 0);
    assert!(LocalPins::for_store(&store)
        .expect("pins")
        .list()
        .expect("list")
        .is_empty());
    // Unpinning again is harmless; pinning an unpublished image is refused.
    unpin_image(&cl, &store, "edge-p", &id).expect("unpin twice");
    let unknown = Fingerprint::of(b"unpublished");
    let e = pin_image(&cl, &store, "edge-p", &unknown, "vm 2").expect_err("unknown manifest");
    assert!(e.to_string().contains("404"), "{e}");
    // The refused pin left no local pin behind (it would stop local GC).
    assert!(LocalPins::for_store(&store)
        .expect("pins")
        .list()
        .expect("list")
        .is_empty());
}
