//! `coord-bench`: the cache coordinator at fleet scale, and its caching
//! policies on a handoff workload.
//!
//! 1. Fleet: `--edges` edges × `--chunks-per-edge` chunks, drawn from a
//!    shared universe (half from a hot set every edge shares, half from a
//!    long tail), so chunks have many holders. Measured: the coordinator's
//!    resident memory for the ledger (RSS growth while loading), the time to
//!    rebuild after a restart (reopen the database, every edge registers and
//!    re-reports its full inventory), heartbeats (delta reports) per second
//!    in-process and over real HTTP on loopback, and the latency of a plan
//!    for a 10 GiB image (40,960 chunks of 256 KiB) with measured rates on
//!    every path to the destination — plus its makespan over the lower bound.
//!    The restart check compares the plan before and after: they must match.
//! 2. Handoff: edges on a ring, users with VMs whose images are built from a
//!    few shared base layers, moving to a neighbouring edge (mostly onward).
//!    Hit ratio at the destination (share of the image's chunks already
//!    there on arrival) per policy, without prefetch hints, with an oracle's
//!    hints (the edge the user is heading to, right as often as users go
//!    onward) and with the coordinator's own hints (its mobility model,
//!    taught by each move as a finished handoff teaches it), carried out
//!    through the coordinator's prefetch orders, all in one run so the
//!    ratios compare.
//!
//! The fleet is fed in-process (1,000 × 200,000 fingerprints as JSON would be
//! 13 GB); the HTTP figures use the same state served by the real router.
//! Writes `coord-bench.json` and `coord-bench.md` under `--out`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use edgeshift_common::{ChunkSize, Fingerprint, Manifest, ManifestId};
use edgeshift_coordinator::policy::Policy;
use edgeshift_coordinator::{AppState, Coordinator, Options};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "coord-bench",
    about = "Measure the cache coordinator: memory, rebuild time, heartbeats/s, plan latency, hit ratio per policy"
)]
struct Args {
    /// Edges in the simulated fleet.
    #[arg(long, default_value_t = 1000)]
    edges: usize,
    /// Chunks each edge holds.
    #[arg(long, default_value_t = 200_000)]
    chunks_per_edge: usize,
    /// Chunks in the hot set all edges draw half their chunks from.
    #[arg(long, default_value_t = 300_000)]
    hot: usize,
    /// Chunks in the whole universe (hot set + long tail).
    #[arg(long, default_value_t = 3_000_000)]
    universe: usize,
    /// Chunks of the image planned (40,960 × 256 KiB = 10 GiB).
    #[arg(long, default_value_t = 40_960)]
    image_chunks: usize,
    /// Seconds of heartbeats per heartbeat measurement.
    #[arg(long, default_value_t = 5)]
    heartbeat_secs: u64,
    /// HTTP client threads sending heartbeats.
    #[arg(long, default_value_t = 4)]
    http_clients: usize,
    /// Moves in each handoff run.
    #[arg(long, default_value_t = 3000)]
    moves: usize,
    /// Skip the fleet-scale part.
    #[arg(long)]
    skip_fleet: bool,
    /// Skip the handoff hit-ratio part.
    #[arg(long)]
    skip_handoff: bool,
    /// Where the JSON and markdown reports go.
    #[arg(long, default_value = "perf/reports/coordinator")]
    out: PathBuf,
}

/// Deterministic xorshift64*, enough for workload draws.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn fp_of(i: u64) -> Fingerprint {
    Fingerprint::of(&i.to_le_bytes())
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<u64>().ok()))
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

#[derive(Debug, Serialize)]
struct FleetReport {
    edges: usize,
    chunks_per_edge: usize,
    edge_chunk_pairs: u64,
    distinct_chunks: usize,
    mean_holders_per_chunk: f64,
    rss_before_mib: f64,
    rss_after_load_mib: f64,
    ledger_rss_mib: f64,
    bytes_per_edge_chunk_pair: f64,
    initial_load_secs: f64,
    restart_reopen_secs: f64,
    restart_rebuild_secs: f64,
    plan_equal_after_restart: bool,
    heartbeats_per_sec_in_process: f64,
    heartbeats_per_sec_http: f64,
    http_clients: usize,
    heartbeat_shape: String,
    plan_chunks: usize,
    plan_missing_chunks: u64,
    plan_sources: usize,
    plan_in_process_ms_p50: f64,
    plan_in_process_ms_p99: f64,
    plan_http_ms_p50: f64,
    plan_http_ms_p99: f64,
    plan_http_response_mib: f64,
    plan_makespan_over_lower_bound: f64,
    http_full_inventory_one_edge_ms: f64,
}

/// Draws one edge's chunk indices: half hot, half tail (duplicates allowed,
/// as a bitmap dedups them).
fn edge_chunks(rng: &mut Rng, n: usize, hot: usize, universe: usize) -> Vec<u64> {
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                rng.below(hot) as u64
            } else {
                (hot + rng.below(universe - hot)) as u64
            }
        })
        .collect()
}

fn load_fleet(coord: &mut Coordinator, table: &[Fingerprint], args: &Args, seed: u64) -> anyhow::Result<f64> {
    let mut rng = Rng(seed);
    let mut spent = Duration::ZERO;
    let mut buf = Vec::with_capacity(args.chunks_per_edge);
    let cap = args.chunks_per_edge as u64 * (256 << 10) * 2;
    for e in 0..args.edges {
        buf.clear();
        buf.extend(
            edge_chunks(&mut rng, args.chunks_per_edge, args.hot, args.universe)
                .into_iter()
                .map(|i| table[i as usize]),
        );
        let id = format!("edge-{e:04}");
        let t = Instant::now();
        coord
            .ledger
            .register(&id, &format!("198.18.{}.{}:7700", e / 250, e % 250 + 1), cap)?;
        coord
            .ledger
            .put_inventory(&id, &buf, args.chunks_per_edge as u64 * (256 << 10))?;
        spent += t.elapsed();
    }
    Ok(spent.as_secs_f64())
}

fn fleet(args: &Args) -> anyhow::Result<FleetReport> {
    let data = tempfile::tempdir().context("temp dir")?;
    eprintln!("fleet: hashing a universe of {} fingerprints", args.universe);
    let table: Vec<Fingerprint> = (0..args.universe as u64).map(fp_of).collect();
    // The image planned: 40,960 chunks, 3/4 from the hot set (widely held),
    // 1/4 from the tail.
    let mut rng = Rng(0x1234_5678);
    let image_fps: Vec<Fingerprint> = (0..args.image_chunks)
        .map(|i| {
            if i % 4 != 3 {
                table[rng.below(args.hot)]
            } else {
                table[args.hot + rng.below(args.universe - args.hot)]
            }
        })
        .collect();
    let cs = ChunkSize::new(256 << 10)?;
    let image = Manifest::new(cs, (256u64 << 10) * image_fps.len() as u64, image_fps);

    let rss_before = rss_bytes();
    let mut coord = Coordinator::open(data.path(), Options::default())?;
    let id = coord.publish_bytes(&image.to_bytes())?.0;
    eprintln!(
        "fleet: loading {} edges x {} chunks",
        args.edges, args.chunks_per_edge
    );
    let initial_load_secs = load_fleet(&mut coord, &table, args, 42)?;
    let rss_after = rss_bytes();
    let pairs: u64 = coord.ledger.edges.iter().map(|e| e.chunks.len()).sum();
    let distinct = coord.ledger.interner.len();

    // The destination: a fresh edge holding nothing, measured rates on every path.
    let dest = "dest";
    coord.ledger.register(dest, "198.18.9.9:7700", 1 << 40)?;
    coord.ledger.put_inventory(dest, &[], 0)?;
    let mut rates = Vec::new();
    for e in 0..args.edges {
        rates.push((format!("edge-{e:04}"), 1e6 * (1 + rng.below(100)) as f64));
    }
    coord.set_paths(dest, &rates)?;

    let mut lat = Vec::new();
    let mut plan_before = None;
    for _ in 0..10 {
        let t = Instant::now();
        let p = coord.plan(
            &id,
            dest,
            4,
            edgeshift_coordinator::service::DEFAULT_MAX_SOURCES,
            false,
        )?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        plan_before = Some(p);
    }
    let plan_before = plan_before.context("no plan")?;
    lat.sort_by(f64::total_cmp);
    let (plan_p50, plan_p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    eprintln!("fleet: plan in-process p50 {plan_p50:.1} ms");

    // Heartbeats in-process: 10 added, 10 removed, 50 accessed each.
    let hb_shape = "10 added + 10 removed + 50 accessed chunks, usage".to_string();
    let mut rng = Rng(7);
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < Duration::from_secs(args.heartbeat_secs) {
        let e = format!("edge-{:04}", rng.below(args.edges));
        let added: Vec<_> = (0..10).map(|_| table[rng.below(args.universe)]).collect();
        let removed: Vec<_> = (0..10).map(|_| table[rng.below(args.universe)]).collect();
        let accessed: Vec<_> = (0..50).map(|_| table[rng.below(args.hot)]).collect();
        coord
            .ledger
            .apply_delta(&e, &added, &removed, &accessed, 1 << 30)?;
        n += 1;
    }
    let hb_in_process = n as f64 / t.elapsed().as_secs_f64();
    eprintln!("fleet: {hb_in_process:.0} heartbeats/s in-process");

    // Restart: drop, reopen the database, every edge re-registers and reports.
    drop(coord);
    let t = Instant::now();
    let mut coord = Coordinator::open(data.path(), Options::default())?;
    let restart_reopen_secs = t.elapsed().as_secs_f64();
    let rebuild = load_fleet(&mut coord, &table, args, 42)?;
    coord.ledger.register(dest, "198.18.9.9:7700", 1 << 40)?;
    coord.ledger.put_inventory(dest, &[], 0)?;
    let restart_rebuild_secs = restart_reopen_secs + rebuild;
    // The heartbeats changed inventories before the restart; the re-reports
    // are the original ones again, as the fleet is regenerated from the seed.
    // Compare against a plan on the re-reported state rebuilt the same way:
    // the pre-heartbeat plan.
    let plan_after = coord.plan(
        &id,
        dest,
        4,
        edgeshift_coordinator::service::DEFAULT_MAX_SOURCES,
        false,
    )?;
    let plan_equal = plan_after == plan_before;
    eprintln!("fleet: rebuilt in {restart_rebuild_secs:.1} s; plan equal after restart: {plan_equal}");

    // Serve the same state over HTTP on loopback.
    // Open: the bench measures the ledger and the HTTP path, not TLS.
    let app = AppState::new(coord, edgeshift_coordinator::Auth::Open);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let limits = edgeshift_coordinator::serve::Limits::default();
    let server = rt.spawn(edgeshift_coordinator::serve(
        listener,
        app,
        64 << 20,
        limits,
        None,
        async {
            let _ = stop_rx.await;
        },
    ));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();

    let mut lat = Vec::new();
    let mut resp_bytes = 0;
    for _ in 0..10 {
        let t = Instant::now();
        let mut r = agent
            .get(format!("{base}/v1/plan?manifest={id}&dest={dest}&lease=false"))
            .call()?;
        anyhow::ensure!(r.status().as_u16() == 200, "plan over HTTP: {}", r.status());
        let body = r.body_mut().with_config().limit(1 << 30).read_to_vec()?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        resp_bytes = body.len();
    }
    lat.sort_by(f64::total_cmp);
    let (plan_http_p50, plan_http_p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));

    // One edge's full inventory over HTTP (the per-edge cost of a rebuild).
    let mut rng = Rng(99);
    let inv: Vec<Fingerprint> = edge_chunks(&mut rng, args.chunks_per_edge, args.hot, args.universe)
        .into_iter()
        .map(|i| table[i as usize])
        .collect();
    let body = serde_json::to_string(&serde_json::json!({ "chunks": inv, "usage": 1u64 << 30 }))?;
    let t = Instant::now();
    let r = agent
        .put(format!("{base}/v1/edges/edge-0000/inventory"))
        .content_type("application/json")
        .send(body.as_str())?;
    anyhow::ensure!(r.status().as_u16() == 200, "inventory over HTTP: {}", r.status());
    let inv_ms = t.elapsed().as_secs_f64() * 1e3;

    // Heartbeats over HTTP from several client threads.
    let bodies: Vec<(String, String)> = {
        let mut rng = Rng(5);
        (0..4096)
            .map(|_| {
                let e = format!("edge-{:04}", rng.below(args.edges));
                let added: Vec<_> = (0..10).map(|_| table[rng.below(args.universe)]).collect();
                let removed: Vec<_> = (0..10).map(|_| table[rng.below(args.universe)]).collect();
                let accessed: Vec<_> = (0..50).map(|_| table[rng.below(args.hot)]).collect();
                (
                    e,
                    serde_json::json!({ "added": added, "removed": removed, "accessed": accessed, "usage": 1u64 << 30 })
                        .to_string(),
                )
            })
            .collect()
    };
    let count = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let t = Instant::now();
    std::thread::scope(|s| {
        for c in 0..args.http_clients {
            let (bodies, count, failed, stop, base) = (&bodies, &count, &failed, &stop, &base);
            s.spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .build()
                    .into();
                let mut i = c;
                while !stop.load(Ordering::Relaxed) {
                    let (e, b) = &bodies[i % bodies.len()];
                    i += args.http_clients;
                    let ok = agent
                        .post(format!("{base}/v1/edges/{e}/delta"))
                        .content_type("application/json")
                        .send(b.as_str())
                        .map(|r| r.status().as_u16() == 200)
                        .unwrap_or(false);
                    if ok {
                        count.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_secs(args.heartbeat_secs));
        stop.store(true, Ordering::Relaxed);
    });
    let hb_http = count.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64();
    anyhow::ensure!(failed.load(Ordering::Relaxed) == 0, "some HTTP heartbeats failed");
    eprintln!("fleet: {hb_http:.0} heartbeats/s over HTTP");
    let _ = stop_tx.send(());
    let _ = rt.block_on(server);

    Ok(FleetReport {
        edges: args.edges,
        chunks_per_edge: args.chunks_per_edge,
        edge_chunk_pairs: pairs,
        distinct_chunks: distinct,
        mean_holders_per_chunk: pairs as f64 / distinct.max(1) as f64,
        rss_before_mib: rss_before as f64 / (1 << 20) as f64,
        rss_after_load_mib: rss_after as f64 / (1 << 20) as f64,
        ledger_rss_mib: (rss_after.saturating_sub(rss_before)) as f64 / (1 << 20) as f64,
        bytes_per_edge_chunk_pair: rss_after.saturating_sub(rss_before) as f64 / pairs.max(1) as f64,
        initial_load_secs,
        restart_reopen_secs,
        restart_rebuild_secs,
        plan_equal_after_restart: plan_equal,
        heartbeats_per_sec_in_process: hb_in_process,
        heartbeats_per_sec_http: hb_http,
        http_clients: args.http_clients,
        heartbeat_shape: hb_shape,
        plan_chunks: args.image_chunks,
        plan_missing_chunks: plan_before.missing_chunks,
        plan_sources: plan_before.sources.len(),
        plan_in_process_ms_p50: plan_p50,
        plan_in_process_ms_p99: plan_p99,
        plan_http_ms_p50: plan_http_p50,
        plan_http_ms_p99: plan_http_p99,
        plan_http_response_mib: resp_bytes as f64 / (1 << 20) as f64,
        plan_makespan_over_lower_bound: plan_before.makespan_secs
            / plan_before.lower_bound_secs.max(f64::MIN_POSITIVE),
        http_full_inventory_one_edge_ms: inv_ms,
    })
}

/// Where a handoff run's prefetch hints come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Hints {
    None,
    /// The user's own heading (right as often as users go onward).
    Oracle,
    /// The coordinator's mobility model (`Coordinator::learn_move`).
    Coordinator,
}

#[derive(Debug, Serialize, Clone)]
struct HandoffRun {
    policy: String,
    hints: Hints,
    moves: usize,
    hit_ratio: f64,
    /// Bytes the destination lacked on arrival (from the origin or another
    /// edge), per move, MiB.
    missed_mib_per_move: f64,
    /// Chunks pulled by prefetch orders, per move.
    prefetched_per_move: f64,
    /// Chunks dropped by GC orders, per move.
    dropped_per_move: f64,
    /// Hint predicted the edge the user actually went to.
    hint_accuracy: f64,
    /// Moves the coordinator had a prediction for (its own hints only).
    predicted_share: f64,
}

#[derive(Debug, Serialize, Clone)]
struct HandoffSetup {
    edges: usize,
    capacity_chunks: u64,
    users: usize,
    images: usize,
    base_layers: usize,
    base_layer_chunks: usize,
    image_own_chunks: usize,
    onward_probability: f64,
    warmup_moves: usize,
}

const HO_CHUNK: u64 = 256 << 10;

fn handoff_run(
    setup: &HandoffSetup,
    policy: Policy,
    hints: Hints,
    moves: usize,
) -> anyhow::Result<HandoffRun> {
    let data = tempfile::tempdir().context("temp dir")?;
    let mut coord = Coordinator::open(data.path(), Options::default())?;
    coord.set_settings(Some(policy), Some(0.9), Some(0.75))?;
    let cs = ChunkSize::new(HO_CHUNK)?;
    // Images: one of the base layers + chunks of their own.
    let mut images: Vec<(ManifestId, Vec<Fingerprint>)> = Vec::new();
    for i in 0..setup.images {
        let base = i % setup.base_layers;
        let mut fps: Vec<Fingerprint> = (0..setup.base_layer_chunks)
            .map(|c| fp_of(((base as u64) << 32) | c as u64))
            .collect();
        fps.extend((0..setup.image_own_chunks).map(|c| fp_of((1u64 << 48) | ((i as u64) << 24) | c as u64)));
        let m = Manifest::new(cs, HO_CHUNK * fps.len() as u64, fps.clone());
        let (id, _) = coord.publish_bytes(&m.to_bytes())?;
        images.push((id, fps));
    }
    let name = |e: usize| format!("ring-{e:02}");
    for e in 0..setup.edges {
        coord.ledger.register(
            &name(e),
            &format!("198.18.1.{}:7700", e + 1),
            setup.capacity_chunks * HO_CHUNK,
        )?;
        coord.ledger.put_inventory(&name(e), &[], 0)?;
    }
    let usage =
        |c: &Coordinator, e: &str| -> anyhow::Result<u64> { Ok(c.ledger.edge(e)?.chunks.len() * HO_CHUNK) };
    let mut rng = Rng(2024);
    // Image popularity: Zipf-like (weight 1/(rank+1)).
    let weights: Vec<f64> = (0..setup.images).map(|i| 1.0 / (i as f64 + 1.0)).collect();
    let total: f64 = weights.iter().sum();
    let pick_image = |rng: &mut Rng| {
        let mut x = rng.unit() * total;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        setup.images - 1
    };
    struct User {
        image: usize,
        at: usize,
        dir: isize,
        hinted: Option<usize>,
    }
    let mut users: Vec<User> = (0..setup.users)
        .map(|_| User {
            image: pick_image(&mut rng),
            at: rng.below(setup.edges),
            dir: if rng.below(2) == 0 { 1 } else { -1 },
            hinted: None,
        })
        .collect();
    // hint refcount per (edge, image)
    let mut hint_refs: HashMap<(usize, usize), u32> = HashMap::new();
    // Place every VM: fetch its image where it starts, pinned.
    for u in &users {
        let e = name(u.at);
        let (id, fps) = &images[u.image];
        let u0 = usage(&coord, &e)?;
        coord
            .ledger
            .apply_delta(&e, fps, &[], &[], u0 + fps.len() as u64 * HO_CHUNK)?;
        coord.ledger.pin(&e, id)?;
    }
    let step = |at: usize, dir: isize| ((at as isize + dir).rem_euclid(setup.edges as isize)) as usize;
    let (mut hits, mut wanted) = (0u64, 0u64);
    let (mut prefetched, mut dropped) = (0u64, 0u64);
    let (mut hint_right, mut hint_total) = (0u64, 0u64);
    let mut missed = 0u64;
    let mut stats_at_warmup = coord.predictions;
    let total_moves = setup.warmup_moves + moves;
    for mv in 0..total_moves {
        let ui = rng.below(users.len());
        // Direction: onward with probability p, else reverse.
        if rng.unit() >= setup.onward_probability {
            users[ui].dir = -users[ui].dir;
        }
        let (from, to) = (users[ui].at, step(users[ui].at, users[ui].dir));
        let (id, fps) = images[users[ui].image].clone();
        let (src, dst) = (name(from), name(to));
        // Arrival: what the destination already has.
        let missing = coord.ledger.missing(&id, &dst)?;
        let unique = {
            let mut s = fps.clone();
            s.sort();
            s.dedup();
            s.len() as u64
        };
        if mv == setup.warmup_moves {
            stats_at_warmup = coord.predictions;
        }
        if mv >= setup.warmup_moves {
            hits += unique - missing.len() as u64;
            wanted += unique;
            missed += missing.len() as u64;
            if hints == Hints::Oracle {
                hint_total += 1;
                if users[ui].hinted == Some(to) {
                    hint_right += 1;
                }
            }
        }
        // Fetch what is missing, pin at the destination, unpin at the source.
        coord.ledger.pin(&dst, &id)?;
        let added: Vec<Fingerprint> = missing
            .iter()
            .map(|&(c, _)| coord.ledger.interner.fp(c))
            .collect();
        let u0 = usage(&coord, &dst)?;
        coord
            .ledger
            .apply_delta(&dst, &added, &[], &fps, u0 + added.len() as u64 * HO_CHUNK)?;
        coord.ledger.unpin(&src, &id)?;
        users[ui].at = to;
        // The other running VMs use their images.
        for _ in 0..4 {
            let v = &users[rng.below(users.len())];
            let (_, vfps) = &images[v.image];
            let e = name(v.at);
            let sample: Vec<Fingerprint> = (0..32).map(|_| vfps[rng.below(vfps.len())]).collect();
            let u0 = usage(&coord, &e)?;
            coord.ledger.apply_delta(&e, &[], &[], &sample, u0)?;
        }
        // The coordinator learns the move; its prediction is the user's hint.
        let mut poll = vec![dst.clone(), src.clone()];
        if hints == Hints::Coordinator {
            if let Some(p) = coord.learn_move(&format!("user-{ui}"), Some(&id), &src, &dst)? {
                poll.push(p.edge);
            }
        }
        // Oracle hints: withdraw the user's old one, hint where they are heading.
        if hints == Hints::Oracle {
            poll.push(name(step(to, users[ui].dir)));
            if let Some(old) = users[ui].hinted.take() {
                let k = (old, users[ui].image);
                if let Some(n) = hint_refs.get_mut(&k) {
                    *n -= 1;
                    if *n == 0 {
                        hint_refs.remove(&k);
                        coord.delete_hint(&id, &name(old))?;
                    }
                }
            }
            let next = step(to, users[ui].dir);
            let k = (next, users[ui].image);
            let n = hint_refs.entry(k).or_insert(0);
            if *n == 0 {
                coord.hint(&id, &name(next))?;
            }
            *n += 1;
            users[ui].hinted = Some(next);
        }
        // Agents poll: GC orders are carried out; prefetch orders pulled.
        for e in poll {
            let o = coord.orders(&e)?;
            if !o.drop.is_empty() {
                let u0 = usage(&coord, &e)?;
                let n = o.drop.len() as u64;
                coord
                    .ledger
                    .apply_delta(&e, &[], &o.drop, &[], u0.saturating_sub(n * HO_CHUNK))?;
                if mv >= setup.warmup_moves {
                    dropped += n;
                }
            }
            let pf: Vec<Fingerprint> = o
                .prefetch
                .iter()
                .flat_map(|p| p.chunks.iter().map(|c| c.fp))
                .collect();
            if !pf.is_empty() {
                let u0 = usage(&coord, &e)?;
                coord
                    .ledger
                    .apply_delta(&e, &pf, &[], &[], u0 + pf.len() as u64 * HO_CHUNK)?;
                if mv >= setup.warmup_moves {
                    prefetched += pf.len() as u64;
                }
            }
            if let Some(l) = o.lease {
                coord.release(l)?;
            }
        }
    }
    Ok(HandoffRun {
        policy: policy.to_string(),
        hints,
        moves,
        hit_ratio: hits as f64 / wanted.max(1) as f64,
        missed_mib_per_move: missed as f64 * HO_CHUNK as f64 / (1 << 20) as f64 / moves as f64,
        prefetched_per_move: prefetched as f64 / moves as f64,
        dropped_per_move: dropped as f64 / moves as f64,
        hint_accuracy: match hints {
            Hints::Oracle if hint_total > 0 => hint_right as f64 / hint_total as f64,
            // Moves without a prediction count as misses: no hint was given.
            Hints::Coordinator => (coord.predictions.right - stats_at_warmup.right) as f64 / moves as f64,
            _ => 0.0,
        },
        predicted_share: match hints {
            Hints::Coordinator => {
                (coord.predictions.predicted - stats_at_warmup.predicted) as f64 / moves as f64
            }
            _ => 0.0,
        },
    })
}

#[derive(Debug, Serialize)]
struct Report {
    command: String,
    fleet: Option<FleetReport>,
    handoff_setup: Option<HandoffSetup>,
    handoff: Vec<HandoffRun>,
}

fn markdown(r: &Report) -> String {
    let mut s = String::from("# Coordinator benchmark\n\n");
    s.push_str(&format!("Reproduce: `{}`\n\n", r.command));
    if let Some(f) = &r.fleet {
        s.push_str(&format!(
            "## Fleet: {} edges × {} chunks ({} edge-chunk pairs, {} distinct chunks, {:.1} holders per chunk)\n\n",
            f.edges, f.chunks_per_edge, f.edge_chunk_pairs, f.distinct_chunks, f.mean_holders_per_chunk
        ));
        s.push_str("| figure | value |\n| --- | --- |\n");
        let rows = [
            (
                "coordinator memory for the ledger (RSS growth)",
                format!(
                    "{:.0} MiB ({:.2} bytes per edge-chunk pair)",
                    f.ledger_rss_mib, f.bytes_per_edge_chunk_pair
                ),
            ),
            (
                "initial load, all edges' full inventories (in-process)",
                format!("{:.1} s", f.initial_load_secs),
            ),
            (
                "rebuild after restart (reopen DB + all edges re-register and re-report)",
                format!(
                    "{:.1} s (reopen {:.3} s)",
                    f.restart_rebuild_secs, f.restart_reopen_secs
                ),
            ),
            (
                "one edge's full inventory over HTTP (JSON, 200k fingerprints)",
                format!("{:.0} ms", f.http_full_inventory_one_edge_ms),
            ),
            (
                "plan equal before and after restart",
                f.plan_equal_after_restart.to_string(),
            ),
            (
                "heartbeats/s in-process",
                format!("{:.0} ({})", f.heartbeats_per_sec_in_process, f.heartbeat_shape),
            ),
            (
                "heartbeats/s over HTTP on loopback",
                format!(
                    "{:.0} ({} client threads, 2 server workers, 2 cores shared)",
                    f.heartbeats_per_sec_http, f.http_clients
                ),
            ),
            (
                "plan for a 10 GiB image, in-process p50 / p99",
                format!(
                    "{:.0} / {:.0} ms ({} missing chunks, {} sources used)",
                    f.plan_in_process_ms_p50, f.plan_in_process_ms_p99, f.plan_missing_chunks, f.plan_sources
                ),
            ),
            (
                "same plan over HTTP p50 / p99",
                format!(
                    "{:.0} / {:.0} ms ({:.1} MiB of JSON)",
                    f.plan_http_ms_p50, f.plan_http_ms_p99, f.plan_http_response_mib
                ),
            ),
            (
                "plan makespan / lower bound",
                format!("{:.3}", f.plan_makespan_over_lower_bound),
            ),
        ];
        for (k, v) in rows {
            s.push_str(&format!("| {k} | {v} |\n"));
        }
        s.push('\n');
    }
    if let Some(h) = &r.handoff_setup {
        s.push_str(&format!(
            "## Handoff hit ratio\n\n{} edges on a ring, capacity {} chunks each (GC at 90 %, down to 75 %); {} users, {} images ({} base layers of {} chunks + {} own chunks each, Zipf popularity); a random user moves to a neighbour each step, onward with probability {}; {} warm-up moves not counted. Hit ratio = share of the image's chunks already at the destination on arrival.\n\n",
            h.edges, h.capacity_chunks, h.users, h.images, h.base_layers, h.base_layer_chunks, h.image_own_chunks, h.onward_probability, h.warmup_moves
        ));
        s.push_str("| policy | hints | hit ratio | MiB missed (from origin or other edges)/move | prefetched chunks/move | GC-dropped chunks/move | hint accuracy |\n| --- | --- | --- | --- | --- | --- | --- |\n");
        for run in &r.handoff {
            s.push_str(&format!(
                "| {} | {} | {:.3} | {:.1} | {:.1} | {:.1} | {} |\n",
                run.policy,
                match run.hints {
                    Hints::None => "none",
                    Hints::Oracle => "oracle",
                    Hints::Coordinator => "coordinator's own",
                },
                run.hit_ratio,
                run.missed_mib_per_move,
                run.prefetched_per_move,
                run.dropped_per_move,
                if run.hints == Hints::None {
                    "-".into()
                } else {
                    format!("{:.2}", run.hint_accuracy)
                }
            ));
        }
        s.push_str("\nHint accuracy: the share of counted moves that went where the hint pointed (for the coordinator, a move with no prediction counts as a miss).\n");
    }
    s
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.hot > 0 && args.universe > args.hot,
        "--universe must exceed --hot"
    );
    let command = format!(
        "cargo run --release -p edgeshift-perf --bin coord-bench -- {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let fleet = if args.skip_fleet {
        None
    } else {
        Some(fleet(&args)?)
    };
    let mut handoff = Vec::new();
    let setup = HandoffSetup {
        edges: 16,
        capacity_chunks: 6000,
        users: 48,
        images: 24,
        base_layers: 3,
        base_layer_chunks: 1200,
        image_own_chunks: 400,
        onward_probability: 0.8,
        warmup_moves: 500,
    };
    if !args.skip_handoff {
        for hints in [Hints::None, Hints::Oracle, Hints::Coordinator] {
            for policy in [Policy::Lru, Policy::Lfu, Policy::Popularity] {
                let r = handoff_run(&setup, policy, hints, args.moves)?;
                eprintln!(
                    "handoff: {policy} hints={hints:?}: hit ratio {:.3}, accuracy {:.3}",
                    r.hit_ratio, r.hint_accuracy
                );
                handoff.push(r);
            }
        }
    }
    let report = Report {
        command,
        fleet,
        handoff_setup: (!args.skip_handoff).then_some(setup),
        handoff,
    };
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(args.out.join("coord-bench.json"), &json)?;
    let md = markdown(&report);
    std::fs::write(args.out.join("coord-bench.md"), &md)?;
    println!("{md}");
    Ok(())
}
