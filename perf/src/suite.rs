//! The scenario groups, each a list of runs on one [`Bench`], collected into
//! a [`RunSet`].

use std::path::Path;
use std::time::Instant;

use crate::images::Workload;
use crate::record::{Run, RunSet};
use crate::scenario::{Bench, Cache, ScenarioError, SRC};

/// Scenario groups, in the order a full report runs them.
pub const ALL: [&str; 4] = ["cache", "sources", "bandwidth", "writes"];

/// Edge-to-edge rates of the bandwidth sweep.
pub const RATES: [u32; 3] = [10, 50, 100];

/// Runs `groups` and returns everything measured.
pub fn run(
    name: &str,
    groups: &[String],
    tag: &str,
    work: &Path,
    log: &dyn Fn(&str),
) -> Result<RunSet, ScenarioError> {
    let started = Instant::now();
    let mut set = RunSet {
        name: name.to_string(),
        started: utc_now(),
        host: host_facts(),
        ..RunSet::default()
    };
    let mut bench = Bench::setup(tag, work, log)?;
    set.images = bench.images_json();
    let push = |set: &mut RunSet, r: Run, log: &dyn Fn(&str)| {
        log(&format!(
            "  {} {} {} Mbit/s {} cache from [{}]: {:.1} s, {:.1} MB on the wire, {:.2}x the limit, byte-exact: {}",
            r.scenario,
            r.tool,
            r.rate_mbit,
            r.cache,
            r.sources.join(","),
            r.seconds,
            r.wire_bytes as f64 / 1e6,
            r.ratio_to_limit().unwrap_or(0.0),
            r.verified
        ));
        set.runs.push(r);
    };
    for g in groups {
        log(&format!("scenario {g}"));
        match g.as_str() {
            "cache" => {
                bench.set_rate(100)?;
                for cache in [Cache::Cold, Cache::Warm, Cache::Prefetched] {
                    let r = bench.run_edgeshift("cache", cache, &["e1", "e3", "origin"], Workload::Low)?;
                    push(&mut set, r, log);
                }
            }
            "sources" => {
                bench.set_rate(50)?;
                for n in 1..=3 {
                    let sources = &["e1", "e3", "origin"][..n];
                    let r = bench.run_edgeshift("sources", Cache::Cold, sources, Workload::Low)?;
                    push(&mut set, r, log);
                }
            }
            "bandwidth" => {
                let mut whole: Option<Run> = None;
                for rate in RATES.iter().rev() {
                    bench.set_rate(*rate)?;
                    let es = bench.run_edgeshift("bandwidth", Cache::Warm, &[SRC, "e3"], Workload::Low)?;
                    let needed = es.needed_bytes;
                    push(&mut set, es, log);
                    let r = bench.run_rsync("bandwidth", false, Workload::Low, needed)?;
                    push(&mut set, r, log);
                    let r = bench.run_casync("bandwidth", Workload::Low, needed)?;
                    push(&mut set, r, log);
                    // The whole-image copy moves ~1 GiB: measured once at the
                    // fastest rate, projected (labelled) for the slower ones.
                    match &whole {
                        None => {
                            let r = bench.run_rsync("bandwidth", true, Workload::Low, needed)?;
                            whole = Some(r.clone());
                            push(&mut set, r, log);
                        }
                        Some(w) => {
                            let mut p = w.clone();
                            p.rate_mbit = *rate;
                            p.path_mbit = *rate;
                            p.seconds = w.wire_bytes as f64 * 8.0 / (f64::from(*rate) * 1e6);
                            p.limit_seconds = crate::scenario::limit(p.needed_bytes, *rate);
                            p.projected_from = Some(w.rate_mbit);
                            p.timeline.clear();
                            set.runs.push(p);
                        }
                    }
                }
            }
            "writes" => {
                bench.set_rate(100)?;
                for w in [Workload::Low, Workload::High] {
                    let es = bench.run_edgeshift("writes", Cache::Warm, &[SRC, "e3"], w)?;
                    let needed = es.needed_bytes;
                    push(&mut set, es, log);
                    let r = bench.run_rsync("writes", false, w, needed)?;
                    push(&mut set, r, log);
                    let r = bench.run_casync("writes", w, needed)?;
                    push(&mut set, r, log);
                }
            }
            other => {
                return Err(ScenarioError::Output(
                    "scenario".into(),
                    format!("unknown scenario {other:?} (known: {})", ALL.join(", ")),
                ))
            }
        }
    }
    set.storage = bench.storage()?;
    set.notes.append(&mut bench.notes);
    set.notes.push(
        "QEMU's shared-nothing migration (blockdev-mirror to NBD, then migrate) is measured by migrate-bench on the same images; see perf/reports/migrate/ for its figures.".into(),
    );
    set.notes.push(
        "Storage layouts: `image files` counts each held image's allocated blocks; `chunk store per edge` is each edge's edgeshift store (duplicate and zero chunks stored once per edge); `fleet-wide single copy` is the union of all stores' chunks, the floor a fleet-wide dedup could reach. The coordinator's LRU/LFU/popularity eviction is not exercised here (no eviction pressure).".into(),
    );
    drop(bench);
    set.wall_seconds = started.elapsed().as_secs_f64();
    Ok(set)
}

/// Current UTC time as RFC 3339, from `date` (no time crate needed).
pub fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn host_facts() -> serde_json::Value {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let kernel = kernel.trim();
    serde_json::json!({
        "cpus": cpus,
        "kernel": kernel,
        "summary": format!("{cpus} CPUs, Linux {kernel}"),
    })
}
