//! The scenario groups, each a list of runs on one [`Bench`], collected into
//! a [`RunSet`].

use std::path::Path;
use std::time::Instant;

use crate::images::Workload;
use crate::live::WriteRate;
use crate::record::{Run, RunSet};
use crate::scenario::{Bench, Cache, ScenarioError, SRC};

/// Scenario groups, in the order a full report runs them.
pub const ALL: [&str; 8] = [
    "cache",
    "sources",
    "bandwidth",
    "neighbour",
    "writes",
    "policies",
    "live",
    "live-writes",
];

/// Groups the full report runs (`writes`, the disk-only write volumes, is
/// left to `edgeshift-perf scenario writes`: the live groups measure a VM
/// really writing, and the report's 20-minute budget has no room for both).
pub const REPORT: [&str; 7] = [
    "cache",
    "sources",
    "bandwidth",
    "neighbour",
    "policies",
    "live",
    "live-writes",
];

/// Groups that need the disk scenarios' testbed ([`Bench`]).
const DISK_GROUPS: [&str; 5] = ["cache", "sources", "bandwidth", "neighbour", "writes"];

/// The tool name of the bandwidth rows fetching from the source alone.
pub const ONE_PATH_TOOL: &str = "edgeshift, one path";

/// The tool name of the neighbour group's rows.
pub const NEIGHBOUR_TOOL: &str = "edgeshift, neighbour holds an earlier copy";

/// Edge-to-edge rates of the bandwidth sweep.
pub const RATES: [u32; 3] = [10, 50, 100];

/// The axes the bandwidth and live groups sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    /// Edge-to-edge round-trip times (ms); each gets its own testbeds.
    pub rtt_ms: Vec<f64>,
    /// Edge-to-edge rates (Mbit/s), fastest first when run.
    pub rates: Vec<u32>,
}

impl Default for Sweep {
    fn default() -> Self {
        Self {
            rtt_ms: vec![0.0],
            rates: RATES.to_vec(),
        }
    }
}

/// Runs `groups` once per round-trip time of `sweep` (the policy traces and
/// the heat map only at the first) and returns everything measured.
pub fn run(
    name: &str,
    groups: &[String],
    sweep: &Sweep,
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
    for (i, &rtt) in sweep.rtt_ms.iter().enumerate() {
        let groups: Vec<String> = groups
            .iter()
            .filter(|g| i == 0 || g.as_str() != "policies")
            .cloned()
            .collect();
        if sweep.rtt_ms.len() > 1 {
            log(&format!("round-trip time {rtt} ms between edges"));
        }
        run_at(&mut set, &groups, sweep, rtt, i == 0, tag, work, log)?;
    }
    set.wall_seconds = started.elapsed().as_secs_f64();
    Ok(set)
}

#[allow(clippy::too_many_arguments)]
fn run_at(
    set: &mut RunSet,
    groups: &[String],
    sweep: &Sweep,
    rtt_ms: f64,
    first: bool,
    tag: &str,
    work: &Path,
    log: &dyn Fn(&str),
) -> Result<(), ScenarioError> {
    if let Some(bad) = groups.iter().find(|g| !ALL.contains(&g.as_str())) {
        return Err(ScenarioError::Output(
            "scenario".into(),
            format!("unknown scenario {bad:?} (known: {})", ALL.join(", ")),
        ));
    }
    let mut bench = if groups.iter().any(|g| DISK_GROUPS.contains(&g.as_str())) {
        let b = Bench::setup(tag, work, rtt_ms, log)?;
        set.images = b.images_json();
        Some(b)
    } else {
        None
    };
    let mut live: Option<crate::live::LiveBench> = None;
    let push = |set: &mut RunSet, mut r: Run, log: &dyn Fn(&str)| {
        r.rtt_ms = rtt_ms;
        log(&format!(
            "  {} {} {} Mbit/s {} ms RTT {} cache from [{}]: {:.1} s, {:.1} MB on the wire, {:.2}x the limit, byte-exact: {}",
            r.scenario,
            r.tool,
            r.rate_mbit,
            r.rtt_ms,
            r.cache,
            r.sources.join(","),
            r.seconds,
            r.wire_bytes as f64 / 1e6,
            r.ratio_to_limit().unwrap_or(0.0),
            r.verified
        ));
        if let Some(check) = r.detail["guest_check"].as_str() {
            log(&format!("    guest disk check at the destination: {check:?}"));
        }
        set.runs.push(r);
    };
    for g in groups {
        log(&format!("scenario {g}"));
        let group_started = Instant::now();
        if g == "policies" {
            let tag = format!("{tag}p");
            set.policies = crate::policy::run_all(&tag, &work.join("policies"), log)?;
            log(&format!(
                "  policies took {:.0} s",
                group_started.elapsed().as_secs_f64()
            ));
            continue;
        }
        if g == "live" || g == "live-writes" {
            if live.is_none() {
                live = Some(crate::live::LiveBench::setup(
                    &format!("{tag}l"),
                    &work.join("live"),
                    rtt_ms,
                    log,
                )?);
            }
            let Some(lb) = live.as_mut() else { continue };
            // A failed live run is a note: the other runs stand on their own.
            let keep = |set: &mut RunSet, what: String, r: Result<Run, ScenarioError>| match r {
                Ok(r) => push(set, r, log),
                Err(e) => {
                    log(&format!("  {what} failed: {e}"));
                    set.notes.push(format!("{what} failed: {e}"));
                }
            };
            if g == "live" {
                for rate in sweep.rates.iter().rev() {
                    lb.set_rate(*rate)?;
                    let r = lb.run_qemu("live", WriteRate::Default, log);
                    keep(
                        set,
                        format!("live QEMU migration at {rate} Mbit/s, {rtt_ms} ms RTT"),
                        r,
                    );
                    let r = lb.run_edgeshift("live", WriteRate::Default, log);
                    keep(
                        set,
                        format!("live edgeshift migrate at {rate} Mbit/s, {rtt_ms} ms RTT"),
                        r,
                    );
                }
            } else {
                lb.set_rate(100)?;
                for w in [WriteRate::Low, WriteRate::High] {
                    let r = lb.run_edgeshift("live-writes", w, log);
                    keep(set, format!("live edgeshift migrate, {} write rate", w.name()), r);
                }
            }
            log(&format!(
                "  {g} took {:.0} s",
                group_started.elapsed().as_secs_f64()
            ));
            continue;
        }
        let Some(bench) = bench.as_mut() else { continue };
        match g.as_str() {
            "cache" => {
                bench.set_rate(100)?;
                for cache in [Cache::Cold, Cache::Warm, Cache::Prefetched] {
                    let r = bench.run_edgeshift("cache", cache, &["e1", "e3", "origin"], Workload::Low)?;
                    push(set, r, log);
                }
            }
            "sources" => {
                bench.set_rate(50)?;
                for n in 1..=3 {
                    let sources = &["e1", "e3", "origin"][..n];
                    let r = bench.run_edgeshift("sources", Cache::Cold, sources, Workload::Low)?;
                    push(set, r, log);
                }
            }
            "bandwidth" => {
                for rate in sweep.rates.iter().rev() {
                    bench.set_rate(*rate)?;
                    let es = bench.run_edgeshift("bandwidth", Cache::Warm, &[SRC, "e3"], Workload::Low)?;
                    let needed = es.needed_bytes;
                    push(set, es, log);
                    // From the source alone, as rsync: the same paths.
                    let mut one = bench.run_edgeshift("bandwidth", Cache::Warm, &[SRC], Workload::Low)?;
                    one.tool = ONE_PATH_TOOL.into();
                    push(set, one, log);
                    let r = bench.run_rsync("bandwidth", false, Workload::Low, needed)?;
                    push(set, r, log);
                    let r = bench.run_casync("bandwidth", Workload::Low, needed)?;
                    push(set, r, log);
                    // A whole copy must move every allocated block of the image.
                    let whole_needed = bench.vm_allocated(Workload::Low)?;
                    let r = bench.run_rsync("bandwidth", true, Workload::Low, whole_needed)?;
                    push(set, r, log);
                }
            }
            "neighbour" => {
                // After the bandwidth rows: e3 holds the earlier copy for good.
                bench.give_neighbour_an_earlier_copy()?;
                for rate in sweep.rates.iter().rev() {
                    bench.set_rate(*rate)?;
                    let mut r = bench.run_edgeshift("neighbour", Cache::Warm, &[SRC, "e3"], Workload::Low)?;
                    r.tool = NEIGHBOUR_TOOL.into();
                    push(set, r, log);
                }
            }
            "writes" => {
                bench.set_rate(100)?;
                for w in [Workload::Low, Workload::High] {
                    let es = bench.run_edgeshift("writes", Cache::Warm, &[SRC, "e3"], w)?;
                    let needed = es.needed_bytes;
                    push(set, es, log);
                    let r = bench.run_rsync("writes", false, w, needed)?;
                    push(set, r, log);
                    let r = bench.run_casync("writes", w, needed)?;
                    push(set, r, log);
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
    drop(live);
    if let Some(bench) = bench.as_mut() {
        if first {
            set.storage = bench.storage()?;
        }
        set.notes.append(&mut bench.notes);
    }
    if first
        && set
            .runs
            .iter()
            .any(|r| r.scenario != "live" && r.scenario != "live-writes")
    {
        match heatmap(8, &work.join("heat"), log) {
            Ok(h) => set.heatmap = Some(h),
            Err(e) => set.notes.push(format!("heat map not measured: {e}")),
        }
    }
    if !first {
        drop(bench);
        return Ok(());
    }
    set.notes.push(
        "Compression: edgeshift may zstd chunks per path, rsync runs with -z, casync's store holds compressed chunks; the physical limit counts uncompressed bytes, so a ratio under 1.00x means compression saved more than the protocol cost.".into(),
    );
    set.notes.push(
        "Storage layouts: `image files` counts each held image's allocated blocks; `chunk store per edge` is each edge's edgeshift store (duplicate and zero chunks stored once per edge); `fleet-wide single copy` is the union of all stores' chunks, the floor a fleet-wide dedup could reach. These layouts hold no eviction pressure; the coordinator's LRU/LFU/popularity eviction is measured by the policy traces.".into(),
    );
    drop(bench);
    Ok(())
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

/// Runs `migrate-bench` (the live-migration measurement: QEMU's NBD mirror +
/// migrate against `edgeshift migrate`, by the migration engine's owners)
/// into `out` and adds its rows to `set` as scenario "live-bench". A failure is a
/// note, not an error: the disk scenarios stand on their own.
pub fn add_live_migration(set: &mut RunSet, out: &Path, log: &dyn Fn(&str)) {
    let bench = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("migrate-bench")))
        .filter(|p| p.is_file());
    let Some(bench) = bench else {
        set.notes
            .push("live migration not measured: migrate-bench is not built next to edgeshift-perf".into());
        return;
    };
    log("live migration: migrate-bench (QEMU NBD mirror vs edgeshift migrate, 100 Mbit/s)");
    let status = std::process::Command::new(&bench)
        .arg("--out")
        .arg(out)
        .current_dir(crate::images::repo_root())
        .stdout(std::process::Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => {
            set.notes.push(format!(
                "migrate-bench failed ({s}); live-migration rows are missing"
            ));
            return;
        }
        Err(e) => {
            set.notes.push(format!("migrate-bench could not start: {e}"));
            return;
        }
    }
    match import_live(&out.join("migrate-bench.json")) {
        Ok(runs) => set.runs.extend(runs),
        Err(e) => set.notes.push(format!("migrate-bench output unreadable: {e}")),
    }
}

/// Reads migrate-bench.json rows as runs of scenario "live".
pub fn import_live(path: &Path) -> Result<Vec<Run>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mbit = v["mbit"]
        .as_u64()
        .and_then(|m| u32::try_from(m).ok())
        .unwrap_or(0);
    let rows = v["rows"]
        .as_array()
        .ok_or_else(|| format!("{}: no rows", path.display()))?;
    Ok(rows
        .iter()
        .map(|r| {
            let scenario = r["scenario"].as_str().unwrap_or("?");
            let method = r["method"].as_str().unwrap_or("?");
            let limit = r["physical_limit_seconds"].as_f64().unwrap_or(0.0);
            Run {
                scenario: "live-bench".into(),
                tool: if method.contains("qemu") || scenario == "qemu" {
                    "qemu-mirror".into()
                } else {
                    format!("edgeshift ({scenario})")
                },
                rate_mbit: mbit,
                rtt_ms: 0.0,
                cache: scenario.into(),
                sources: Vec::new(),
                workload: "guest workload".into(),
                seconds: r["total_seconds"].as_f64().unwrap_or(0.0),
                wire_bytes: r["wire_bytes"].as_u64().unwrap_or(0),
                needed_bytes: r["missing_bytes"].as_u64().unwrap_or(0),
                path_mbit: mbit,
                limit_seconds: limit,
                verified: true,
                projected_from: None,
                timeline: Vec::new(),
                detail: r.clone(),
            }
        })
        .collect())
}

/// The dirty-rate heat map on a copy of the low-write VM disk.
pub fn heatmap(
    rows: usize,
    work: &Path,
    log: &dyn Fn(&str),
) -> Result<crate::record::Heatmap, ScenarioError> {
    log("heat map: fio zipf writes on a loop device, edgeshift dirty per 1 s interval");
    let bins = crate::cluster::Binaries::locate().map_err(crate::cluster::ClusterError::from)?;
    let image = crate::images::repo_root().join("target/images/perf/vm-low.raw");
    let h = crate::heat::measure(&bins.edgeshift, &image, work, rows, 1.0);
    let _ = std::fs::remove_dir_all(work);
    h
}
