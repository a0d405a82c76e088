//! The migration's coordinator steps (agent/src/migrate/coord.rs) against a
//! real coordinator (the `edgeshift-coordinator` program on 127.0.0.1:0),
//! without VMs: the source's report of its live disk, the destination's plan
//! and pin, the pin moving to the final image after the switchover, an
//! aborted migration taking its pin and lease back, the source releasing its
//! reference, and an unreachable coordinator.

use std::net::SocketAddr;
use std::path::Path;

use edgeshift_agent::coordination::client::Client;
use edgeshift_agent::coordination::pins::LocalPins;
use edgeshift_agent::migrate::coord::{
    plan_incoming, release_source, report_live_disk, CoordConfig, CoordReport,
};
use edgeshift_agent::migrate::MigrateError;
use edgeshift_agent::store::{ChunkStore, LocalStore};
use edgeshift_agent::vm::StateDir;
use edgeshift_common::{ChunkSize, Fingerprint, Manifest};
use edgeshift_testbed::coordinator::{CoordinatorProc, CoordinatorSpec};

const CHUNK: usize = 4096;
/// Where the source's chunk server would be (never dialled here).
const SRC_ADDR: &str = "127.0.0.1:7999";

type Coord = CoordinatorProc;

/// `edgeshift-coordinator` on 127.0.0.1:0 with its database in `data`;
/// killed on drop.
fn start_coord(data: &Path) -> Coord {
    // Open: these steps are about the handoff's bookkeeping; who may act as
    // which edge is tested in the coordinator's tests/https_auth.rs.
    CoordinatorProc::local(CoordinatorSpec::insecure("127.0.0.1:0", data))
        .expect("start edgeshift-coordinator")
}

fn get(c: &Coord, path: &str) -> serde_json::Value {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent.get(format!("{}{}", c.url, path)).call().expect("get");
    assert_eq!(r.status().as_u16(), 200, "GET {path}");
    r.body_mut().read_json().expect("json")
}

fn pins_at(c: &Coord, edge: &str) -> serde_json::Map<String, serde_json::Value> {
    get(c, &format!("/v1/edges/{edge}"))["pinned_manifests"]
        .as_object()
        .cloned()
        .expect("pinned_manifests")
}

/// Chunks `ns` into `store` and their manifest; returns it.
fn image(store: &LocalStore, ns: impl IntoIterator<Item = u32>) -> Manifest {
    let mut fps = Vec::new();
    for n in ns {
        let mut d = vec![0u8; CHUNK];
        d[..4].copy_from_slice(&n.to_le_bytes());
        d[CHUNK - 1] = 9;
        let f = Fingerprint::of(&d);
        store.put_chunk(&f, &d).expect("put chunk");
        fps.push(f);
    }
    let len = (fps.len() * CHUNK) as u64;
    let m = Manifest::new(ChunkSize::new(CHUNK as u64).expect("chunk size"), len, fps);
    store.put_manifest(&m).expect("put manifest");
    m
}

fn config(c: &Coord, edge: &str) -> CoordConfig {
    CoordConfig {
        url: c.url.clone(),
        tls: None,
        edge: edge.into(),
    }
}

struct World {
    coord: Coord,
    src: LocalStore,
    dst: LocalStore,
    state: StateDir,
    _dir: tempfile::TempDir,
}

/// A coordinator with a registered source (holding nothing yet) and a
/// registered, empty destination.
fn world() -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let coord = start_coord(&dir.path().join("coord"));
    let client = Client::new(&coord.url, None).expect("client");
    for (edge, addr) in [("src", SRC_ADDR), ("dst", "127.0.0.1:7998")] {
        client.register(edge, addr, 1 << 30).expect("register");
        client.inventory(edge, &[], 0, &[]).expect("inventory");
    }
    World {
        src: LocalStore::open_or_create(dir.path().join("src")).expect("src store"),
        dst: LocalStore::open_or_create(dir.path().join("dst")).expect("dst store"),
        state: StateDir::new(dir.path().join("state")),
        coord,
        _dir: dir,
    }
}

#[test]
fn the_plan_names_the_reporting_source_and_the_pin_moves_to_the_final_image() {
    let w = world();
    let live = image(&w.src, 0..20);
    let mut rep = CoordReport::default();
    report_live_disk(&config(&w.coord, "src"), &w.src, &live, &mut rep).expect("report the live disk");
    assert_eq!(rep.reported_chunks, 20);
    assert_eq!(get(&w.coord, "/v1/edges/src")["chunks"], 20);

    let plan = plan_incoming(&config(&w.coord, "dst"), &w.dst, &live).expect("plan");
    assert_eq!(plan.summary.missing_chunks, 20);
    assert_eq!(plan.summary.dest, "dst");
    assert_eq!(plan.summary.sources.len(), 1);
    assert_eq!(plan.summary.sources[0].edge, "src");
    assert_eq!(plan.summary.sources[0].chunks, 20);
    let src_addr: SocketAddr = SRC_ADDR.parse().expect("addr");
    assert_eq!(plan.peers(), &[src_addr]);
    assert_eq!(plan.sources_for(&live.chunks[3]), Some(&vec![src_addr]));
    assert_eq!(plan.sources_for(&Fingerprint::of(b"not in the plan")), None);
    let live_id = live.id().to_hex();
    assert_eq!(
        pins_at(&w.coord, "dst").get(&live_id),
        Some(&serde_json::json!(1))
    );
    let local = LocalPins::for_store(&w.dst).expect("pins");
    assert_eq!(local.list().expect("list"), vec![live.id()]);
    assert_eq!(
        get(&w.coord, "/v1/edges/src")["leased_chunks"],
        20,
        "the plan leases its sources"
    );

    // The VM wrote more before the pause: the final image differs.
    let fin = image(&w.dst, 0..21);
    let text = plan.switched_over(&w.dst, &fin);
    assert!(text.starts_with("pinned"), "{text}");
    let at_dst = pins_at(&w.coord, "dst");
    assert_eq!(at_dst.len(), 1, "{at_dst:?}");
    assert_eq!(at_dst.get(&fin.id().to_hex()), Some(&serde_json::json!(1)));
    assert_eq!(local.list().expect("list"), vec![fin.id()]);
    assert_eq!(
        get(&w.coord, "/v1/edges/src")["leased_chunks"],
        0,
        "lease released"
    );
}

#[test]
fn an_unchanged_disk_keeps_one_pin() {
    let w = world();
    let live = image(&w.src, 0..4);
    let mut rep = CoordReport::default();
    report_live_disk(&config(&w.coord, "src"), &w.src, &live, &mut rep).expect("report");
    let plan = plan_incoming(&config(&w.coord, "dst"), &w.dst, &live).expect("plan");
    let text = plan.switched_over(&w.dst, &live);
    assert!(text.starts_with("pinned"), "{text}");
    assert_eq!(
        pins_at(&w.coord, "dst").get(&live.id().to_hex()),
        Some(&serde_json::json!(1)),
        "one reference, not two"
    );
    assert_eq!(
        LocalPins::for_store(&w.dst).expect("pins").list().expect("list"),
        vec![live.id()]
    );
}

#[test]
fn an_aborted_migration_takes_its_pin_and_lease_back() {
    let w = world();
    let live = image(&w.src, 0..8);
    let mut rep = CoordReport::default();
    report_live_disk(&config(&w.coord, "src"), &w.src, &live, &mut rep).expect("report");
    let plan = plan_incoming(&config(&w.coord, "dst"), &w.dst, &live).expect("plan");
    assert_eq!(pins_at(&w.coord, "dst").len(), 1);
    drop(plan);
    assert!(pins_at(&w.coord, "dst").is_empty());
    assert!(LocalPins::for_store(&w.dst)
        .expect("pins")
        .list()
        .expect("list")
        .is_empty());
    assert_eq!(get(&w.coord, "/v1/edges/src")["leased_chunks"], 0);
}

#[test]
fn the_source_releases_its_reference_and_keeps_the_chunks() {
    let w = world();
    let m = image(&w.src, 0..6);
    let mut rep = CoordReport::default();
    let cfg = config(&w.coord, "src");
    report_live_disk(&cfg, &w.src, &m, &mut rep).expect("report");
    let client = cfg.client().expect("client");
    edgeshift_agent::coordination::fetch::pin_image(&client, &w.src, "src", &m.id(), "test VM").expect("pin");
    let left = release_source(&cfg, &w.state, w.src.root(), "vm1", &m.id().to_hex());
    assert!(left.is_empty(), "{left:?}");
    assert!(pins_at(&w.coord, "src").is_empty());
    assert!(LocalPins::for_store(&w.src)
        .expect("pins")
        .list()
        .expect("list")
        .is_empty());
    assert!(w.src.has_chunk(&m.chunks[0]).expect("has"), "chunks stay cached");
    assert_eq!(get(&w.coord, "/v1/edges/src")["chunks"], 6);
    // Releasing what is not pinned (a VM started without --coordinator) is fine.
    assert!(release_source(&cfg, &w.state, w.src.root(), "vm1", &m.id().to_hex()).is_empty());
    // A record with a bad manifest id says so instead of failing the handoff.
    let left = release_source(&cfg, &w.state, w.src.root(), "vm1", "not-hex");
    assert!(left.iter().any(|l| l.contains("not a manifest id")), "{left:?}");
}

#[test]
fn an_unreachable_coordinator_fails_before_anything_starts() {
    let w = world();
    let m = image(&w.src, 0..3);
    let gone = CoordConfig {
        url: "http://127.0.0.1:1".into(),
        tls: None,
        edge: "dst".into(),
    };
    let err = plan_incoming(&gone, &w.dst, &m).expect_err("no coordinator, no plan");
    assert!(matches!(err, MigrateError::Coordinator(_)), "{err}");
    assert!(err.to_string().contains("cannot reach the coordinator"), "{err}");
    assert!(LocalPins::for_store(&w.dst)
        .expect("pins")
        .list()
        .expect("list")
        .is_empty());
    let mut rep = CoordReport::default();
    assert!(report_live_disk(&gone, &w.src, &m, &mut rep).is_err());
    let bad_url = CoordConfig {
        url: "ftp://x".into(),
        ..gone.clone()
    };
    assert!(plan_incoming(&bad_url, &w.dst, &m).is_err());
    // An unknown destination edge: refused, and no pin stays behind.
    let unknown = config(&w.coord, "nobody");
    let err = plan_incoming(&unknown, &w.dst, &m).expect_err("unknown edge");
    assert!(err.to_string().contains("nobody"), "{err}");
    assert!(LocalPins::for_store(&w.dst)
        .expect("pins")
        .list()
        .expect("list")
        .is_empty());
}
