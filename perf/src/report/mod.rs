//! `report.md` and its figures, generated from a recorded [`RunSet`]
//! (`runs.json` beside it). Nothing here measures; every number comes from
//! the record, so a report can be regenerated from its JSON alone.

pub mod plots;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::record::{Run, RunSet};

/// Errors writing a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a run record: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Plot(#[from] plots::PlotError),
}

/// Reads a `runs.json`.
pub fn load(path: &Path) -> Result<RunSet, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReportError::Io {
        what: "reading",
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ReportError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `runs.json` into `dir`.
pub fn save(set: &RunSet, dir: &Path) -> Result<PathBuf, ReportError> {
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Io {
        what: "creating",
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join("runs.json");
    let text = serde_json::to_string_pretty(set).map_err(|source| ReportError::Json {
        path: path.clone(),
        source,
    })?;
    std::fs::write(&path, text).map_err(|source| ReportError::Io {
        what: "writing",
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

fn mb(b: u64) -> String {
    format!("{:.1}", b as f64 / 1e6)
}

fn ratio(r: &Run) -> String {
    r.ratio_to_limit().map_or("–".into(), |x| format!("{x:.2}×"))
}

fn secs(r: &Run) -> String {
    match r.projected_from {
        Some(from) => format!("{:.1}*", r.seconds).replace("*", &format!(" (projected from {from} Mbit/s)")),
        None => format!("{:.1}", r.seconds),
    }
}

fn ok(r: &Run) -> &'static str {
    if r.projected_from.is_some() {
        "–"
    } else if r.verified {
        "yes"
    } else {
        "NO"
    }
}

/// The headline table: every tool at every rate of the bandwidth scenario.
pub fn headline_table(set: &RunSet) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| rate (Mbit/s) | tool | seconds | MB on the wire | MB needed | paths (Mbit/s) | physical limit (s) | time ÷ limit | time ÷ edgeshift time | byte-exact |"
    );
    let _ = writeln!(s, "|---:|---|---:|---:|---:|---:|---:|---:|---:|:---:|");
    let mut runs: Vec<&Run> = set.runs.iter().filter(|r| r.scenario == "bandwidth").collect();
    runs.sort_by(|a, b| a.rate_mbit.cmp(&b.rate_mbit).then(a.tool.cmp(&b.tool)));
    for r in &runs {
        let es = runs
            .iter()
            .find(|x| x.tool == "edgeshift" && x.rate_mbit == r.rate_mbit)
            .map(|x| x.seconds);
        let speedup = match es {
            Some(e) if e > 0.0 && r.tool != "edgeshift" => format!("{:.1}×", r.seconds / e),
            _ => "–".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {} |",
            r.rate_mbit,
            r.tool,
            secs(r),
            mb(r.wire_bytes),
            mb(r.needed_bytes),
            r.path_mbit,
            r.limit_seconds,
            ratio(r),
            speedup,
            ok(r)
        );
    }
    s
}

fn scenario_table(set: &RunSet, scenario: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| tool | rate | cache | sources | writes | seconds | MB on the wire | MB needed | limit (s) | time ÷ limit | byte-exact |"
    );
    let _ = writeln!(s, "|---|---:|---|---|---|---:|---:|---:|---:|---:|:---:|");
    for r in set.runs.iter().filter(|r| r.scenario == scenario) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {} |",
            r.tool,
            r.rate_mbit,
            r.cache,
            r.sources.join(", "),
            r.workload,
            secs(r),
            mb(r.wire_bytes),
            mb(r.needed_bytes),
            r.limit_seconds,
            ratio(r),
            ok(r)
        );
    }
    s
}

/// The run whose timeline the report draws: the edgeshift run with the most sources.
fn timeline_run(set: &RunSet) -> Option<&Run> {
    set.runs
        .iter()
        .filter(|r| r.tool == "edgeshift" && r.timeline.len() > 1)
        .max_by(|a, b| {
            a.sources
                .len()
                .cmp(&b.sources.len())
                .then(a.seconds.total_cmp(&b.seconds))
        })
}

/// Draws one figure from a record into a file; false when there is nothing to draw.
type Figure = fn(&RunSet, &Path) -> Result<bool, plots::PlotError>;

/// Writes `report.md` and its SVG figures into `dir` (runs.json must be
/// beside it, see [`save`]). Returns the report's path.
pub fn write(set: &RunSet, dir: &Path) -> Result<PathBuf, ReportError> {
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Io {
        what: "creating",
        path: dir.to_path_buf(),
        source,
    })?;
    let mut md = String::new();
    let _ = writeln!(md, "# edgeshift evaluation: {}\n", set.name);
    let _ = writeln!(
        md,
        "Measured {} on {} ({} s of measurement). Every number and figure below is computed from `runs.json` in this directory; regenerate with `edgeshift-perf report --from-runs {}`.\n",
        set.started,
        set.host["summary"].as_str().unwrap_or("this machine"),
        set.wall_seconds.round(),
        dir.display()
    );
    let _ = writeln!(
        md,
        "The edge cloud is emulated with network namespaces: every pair of hosts is joined by a veth pair whose two egresses are limited by tbf. **Only bandwidth is emulated, not latency**: this kernel has no netem, so round trips are sub-millisecond and latency-bound protocols look better here than on a real WAN. Bytes on the wire are the destination's interface counters (both directions, headers included). The physical limit is the bytes the destination lacked divided by the summed rates of the paths the run used; a ratio of 1.00× would be a perfect transfer.\n"
    );
    if set.runs.iter().any(|r| r.tool == "edgeshift") {
        let _ = writeln!(
            md,
            "An edgeshift run here is the disk part of a handoff: `edgeshift fetch` from all sources at once into the destination's store, then `edgeshift restore` of the image, timed end to end and checked byte for byte against the source. The VM disk is the Debian nginx image with 64 KiB writes on top (low: 16 MiB, high: 96 MiB) — what the VM changed since the earlier copy.\n"
        );
    }
    let _ = writeln!(
        md,
        "## Headline: handoff time against link rate (warm destination: the base image held)\n"
    );
    md.push_str(&headline_table(set));
    if set.runs.iter().any(|r| r.projected_from.is_some()) {
        let _ = writeln!(
            md,
            "\nProjected rows were not run at that rate (a whole 1 GiB copy at 10 Mbit/s takes a quarter of an hour): their time is the wire bytes measured at the stated rate divided by this rate, which is a lower bound for the real copy."
        );
    }
    let figs: [(&str, &str, Figure); 3] = [
        (
            "time_vs_bandwidth.svg",
            "Handoff time against link rate, with the physical limit",
            plots::time_vs_bandwidth,
        ),
        ("wire_bytes.svg", "Bytes on the wire", plots::wire_bytes),
        ("storage.svg", "Storage per caching layout", plots::storage),
    ];
    for (i, (file, title, draw)) in figs.iter().enumerate() {
        if draw(set, &dir.join(file))? {
            let _ = writeln!(md, "\n![{title}]({file})\n");
        }
        if i == 1 {
            for (scenario, heading) in [
                ("cache", "Destination cache: cold, warm, prefetched"),
                ("sources", "Number of sources (cold destination)"),
                ("writes", "Write volume on the VM's disk (warm destination)"),
            ] {
                if set.runs.iter().any(|r| r.scenario == scenario) {
                    let _ = writeln!(md, "## {heading}\n");
                    md.push_str(&scenario_table(set, scenario));
                    md.push('\n');
                }
            }
        }
    }
    let live: Vec<&Run> = set.runs.iter().filter(|r| r.scenario == "live").collect();
    if !live.is_empty() {
        let _ = writeln!(
            md,
            "## Live migration: QEMU's shared-nothing migration against edgeshift migrate\n\nFrom migrate-bench (its JSON is in `migrate/` here): the test VM with its guest workload, {} Mbit/s links; QEMU mirrors the whole disk to an NBD export on the destination, then migrates memory. Cases a, b, c are the migration engine's: a = cold destination, base at two neighbours; b = warm destination; c = warm + an earlier copy at two neighbours.\n",
            live[0].rate_mbit
        );
        let qemu = live.iter().find(|r| r.tool == "qemu-mirror").map(|r| r.seconds);
        let _ = writeln!(md, "| tool | case | seconds | downtime (ms) | MB on the wire | physical limit (s) | time ÷ limit | faster than QEMU |");
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|");
        for r in &live {
            let speed = match qemu {
                Some(q) if r.tool != "qemu-mirror" && r.seconds > 0.0 => format!("{:.1}×", q / r.seconds),
                _ => "–".into(),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {:.1} | {} | {} | {} | {} | {} |",
                r.tool,
                r.cache,
                r.seconds,
                r.detail["downtime_ms"]
                    .as_u64()
                    .map_or("–".into(), |d| d.to_string()),
                mb(r.wire_bytes),
                if r.limit_seconds > 0.0 {
                    format!("{:.1}", r.limit_seconds)
                } else {
                    "–".into()
                },
                ratio(r),
                speed
            );
        }
        md.push('\n');
    }
    if !set.storage.is_empty() {
        let _ = writeln!(md, "## Storage and the fleet's dedup ratio\n");
        let _ = writeln!(
            md,
            "| layout | per edge (MB) | fleet MB | logical MB | dedup ratio |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|");
        for s in &set.storage {
            let per: Vec<String> = s
                .per_edge
                .iter()
                .map(|(e, b)| format!("{e}: {}", mb(*b)))
                .collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {:.2}× |",
                s.policy,
                per.join(", "),
                mb(s.physical_bytes),
                mb(s.logical_bytes),
                s.dedup_ratio()
            );
        }
        md.push('\n');
    }
    if let Some(run) = timeline_run(set) {
        if plots::timeline(run, &dir.join("timeline.svg"))? {
            let _ = writeln!(
                md,
                "## Handoff timeline\n\n{} with a {} destination over {} Mbit/s links from {}: bytes received from each source over time.\n\n![Handoff timeline](timeline.svg)\n",
                run.tool,
                run.cache,
                run.rate_mbit,
                run.sources.join(", ")
            );
        }
    }
    if let Some(h) = &set.heatmap {
        if plots::heatmap(h, &dir.join("heatmap.svg"))? {
            let _ = writeln!(
                md,
                "## Per-chunk dirty rate\n\nWrites per chunk per {:.1} s interval on the VM's disk, measured by `edgeshift dirty` ({}).\n\n![Dirty-rate heat map](heatmap.svg)\n",
                h.interval, h.tracker
            );
        }
    }
    if !set.notes.is_empty() {
        let _ = writeln!(md, "## Notes\n");
        for n in &set.notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    let path = dir.join("report.md");
    std::fs::write(&path, md).map_err(|source| ReportError::Io {
        what: "writing",
        path: path.clone(),
        source,
    })?;
    Ok(path)
}
