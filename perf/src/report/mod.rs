//! `report.md` and its figures, generated from a recorded [`RunSet`]
//! (`runs.json` beside it). Nothing here measures; every number comes from
//! the record, so a report can be regenerated from its JSON alone.

pub mod plots;
pub mod wan;

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

/// Which handoff a headline row is: the disk part on the Debian nginx image,
/// or a whole live handoff of the running test VM.
fn kind(r: &Run) -> &'static str {
    if r.scenario == "live" {
        "live VM"
    } else {
        "disk"
    }
}

/// The headline table: every tool at every rate of the bandwidth scenario
/// (disk part of a handoff) and of the live sweep (whole handoff of a
/// running VM), each with its ratio to the physical limit and to edgeshift.
pub fn headline_table(set: &RunSet) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| rate (Mbit/s) | tool | handoff | seconds | MB on the wire | MB needed | paths (Mbit/s) | physical limit (s) | time ÷ limit | time ÷ edgeshift time | time ÷ rsync-base time | verified |"
    );
    let _ = writeln!(s, "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|");
    let mut runs: Vec<&Run> = set
        .runs
        .iter()
        .filter(|r| r.scenario == "bandwidth" || r.scenario == "neighbour" || r.scenario == "live")
        .collect();
    runs.sort_by(|a, b| {
        a.rate_mbit
            .cmp(&b.rate_mbit)
            .then(kind(a).cmp(kind(b)))
            .then(a.tool.cmp(&b.tool))
    });
    for r in &runs {
        let reference = if r.scenario == "live" {
            "edgeshift migrate"
        } else {
            "edgeshift"
        };
        // Disk rows (the neighbour's too) against the bandwidth sweep's.
        let same_kind =
            |x: &Run| x.rate_mbit == r.rate_mbit && kind(x) == kind(r) && x.scenario != "neighbour";
        let seconds_of = |tool: &str| {
            runs.iter()
                .find(|x| x.tool == tool && same_kind(x))
                .map(|x| x.seconds)
        };
        let against = |e: Option<f64>, tool: &str| match e {
            Some(e) if e > 0.0 && r.tool != tool => format!("{:.2}×", r.seconds / e),
            _ => "–".into(),
        };
        let speedup = against(seconds_of(reference), reference);
        let vs_rsync = if kind(r) == "disk" {
            against(seconds_of("rsync-base"), "rsync-base")
        } else {
            "–".into()
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {} |",
            r.rate_mbit,
            r.tool,
            kind(r),
            secs(r),
            mb(r.wire_bytes),
            mb(r.needed_bytes),
            r.path_mbit,
            r.limit_seconds,
            ratio(r),
            speedup,
            vs_rsync,
            ok(r)
        );
    }
    s
}

/// Live handoffs of the running VM (sweep and write rates): the migration's
/// own figures next to time and bytes.
pub fn live_table(set: &RunSet) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| scenario | tool | rate (Mbit/s) | RTT (ms) | guest writes | guest writes (KB/s) | destination | seconds | command (s) | downtime (ms) | rounds | chunks re-sent | disk MB lacked | memory MB | MB on the wire | limit (s) | time ÷ limit | guest disk check |"
    );
    let _ = writeln!(
        s,
        "|---|---|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for r in set
        .runs
        .iter()
        .filter(|r| r.scenario == "live" || r.scenario == "live-writes")
    {
        let d = &r.detail;
        let num = |k: &str| d[k].as_u64().map_or("–".to_string(), |v| v.to_string());
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {} |",
            r.scenario,
            r.tool,
            r.rate_mbit,
            r.rtt_ms,
            r.workload,
            d["guest_write_bytes_per_s"]
                .as_f64()
                .map_or("–".to_string(), |v| format!("{:.0}", v / 1e3)),
            r.cache,
            r.seconds,
            d["command_seconds"]
                .as_f64()
                .map_or("–".to_string(), |v| format!("{v:.1}")),
            num("downtime_ms"),
            num("rounds"),
            num("chunks_resent"),
            d["missing_disk_bytes"].as_u64().map_or("–".to_string(), mb),
            d["memory_bytes"].as_u64().map_or("–".to_string(), mb),
            mb(r.wire_bytes),
            r.limit_seconds,
            ratio(r),
            d["guest_check"].as_str().unwrap_or("–")
        );
    }
    s
}

/// The caching policies side by side: hits, origin traffic, evictions, and
/// storage and dedup after the trace.
pub fn policy_table(set: &RunSet) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| policy | handoffs | hit ratio (edge tier) | local hit ratio | held by the edge tier | MB from the origin | MB from edges | MB evicted | stored per edge (MB) | stored MB | logical MB held | dedup ratio | dedup ratio, non-zero data |"
    );
    let _ = writeln!(
        s,
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"
    );
    for p in &set.policies {
        let per: Vec<String> = p
            .edges
            .iter()
            .map(|e| format!("{}: {} ({})", e.edge, mb(e.stored_bytes), e.images.join("+")))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {} | {} | {:.2}× | {:.2}× |",
            p.policy,
            p.steps.len(),
            p.hit_ratio(),
            p.local_hit_ratio(),
            p.edge_held_ratio(),
            mb(p.origin_wire_bytes()),
            mb(p.edges_wire_bytes()),
            mb(p.evicted_bytes()),
            per.join(", "),
            mb(p.stored_bytes()),
            mb(p.edges.iter().map(|e| e.logical_bytes).sum()),
            p.dedup_ratio(),
            p.nonzero_dedup_ratio()
        );
    }
    s
}

/// One policy's trace, step by step.
pub fn policy_steps_table(p: &crate::record::PolicyRun) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| # | user | image | from → to | chunks | local | held by other edges | from edges | from origin | fetch (s) | MB evicted after |"
    );
    let _ = writeln!(s, "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for (i, st) in p.steps.iter().enumerate() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} → {} | {} | {} | {} | {} | {} | {:.1} | {} |",
            i + 1,
            st.user,
            st.image,
            st.from.as_deref().unwrap_or("(start)"),
            st.to,
            st.chunks,
            st.local_chunks,
            st.edge_held_chunks,
            st.from_edges_chunks,
            st.from_origin_chunks,
            st.fetch_seconds,
            mb(st.evicted_bytes)
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

/// The live handoff whose timeline the report draws: `edgeshift migrate`
/// in the `live` group at the rate nearest 50 Mbit/s (phases long enough
/// to see, short enough to read).
fn live_timeline_run(set: &RunSet) -> Option<&Run> {
    set.runs
        .iter()
        .filter(|r| r.scenario == "live" && r.tool == "edgeshift migrate" && r.timeline.len() > 1)
        .min_by_key(|r| r.rate_mbit.abs_diff(50))
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
        "Measured {} on {} ({} s of measurement, {} min {} s). Every number and figure below is computed from `runs.json` in this directory; regenerate with `edgeshift-perf report --from-runs {}`.\n",
        set.started,
        set.host["summary"].as_str().unwrap_or("this machine"),
        set.wall_seconds.round(),
        (set.wall_seconds / 60.0).floor(),
        (set.wall_seconds % 60.0).round(),
        dir.display()
    );
    let _ = writeln!(
        md,
        "The edge cloud is emulated with network namespaces: every pair of hosts is joined by a veth pair whose two egresses are limited by tbf. Latency is emulated only where a run says so (its RTT, in ms, between edges: the testbed's user-space delay line, docs/wan.md, as this kernel has no netem); at RTT 0 round trips are sub-millisecond and latency-bound protocols look better than on a real WAN. Bytes on the wire are the destination's interface counters (both directions, headers included). The physical limit is the bytes the destination lacked divided by the summed rates of the paths the run used; a ratio of 1.00× would be a perfect transfer.\n"
    );
    if set.runs.iter().any(|r| r.tool == "edgeshift") {
        let _ = writeln!(
            md,
            "An edgeshift run here is the disk part of a handoff: `edgeshift fetch --out` from all sources at once into the destination's store, writing the image as its chunks arrive (a build without `--out`: fetch, then `edgeshift restore`), timed end to end and checked byte for byte against the source. The VM disk is the Debian nginx image with 64 KiB writes on top (low: 16 MiB, high: 96 MiB) — what the VM changed since the earlier copy. The source edge (e1) holds the VM's disk and the nginx image it booted from; the second edge (e3) and the origin hold the base and nginx images.\n"
        );
    }
    let _ = writeln!(
        md,
        "## Headline: edgeshift against every baseline at each link rate\n"
    );
    if set.runs.iter().any(|r| r.scenario == "live") {
        let _ = writeln!(
            md,
            "Two kinds of rows. **disk**: the disk part of a handoff of the Debian nginx VM disk (1 GiB) to a warm destination (the base image held), edgeshift from two edges at once (and, \"edgeshift, one path\", from the source alone) against rsync, casync and a whole copy from one; the row \"edgeshift, neighbour holds an earlier copy\" is edgeshift's again with the second edge holding an earlier copy of the VM's disk (its first half of the writes), as an edge the VM ran on before would. **live VM**: the whole handoff of the running test VM (a smaller disk, see *Live handoffs* below), `edgeshift migrate` to a warm destination against QEMU's shared-nothing migration (blockdev-mirror to NBD + migrate, empty destination); time until the VM runs at the destination. \"time ÷ edgeshift time\" and \"time ÷ rsync-base time\" compare each row with edgeshift's (rsync's against the base) row of the same kind and rate; \"verified\" is the byte-for-byte check (disk) or the guest's own disk check after the switch (live).\n"
        );
    }
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
    if set
        .runs
        .iter()
        .any(|r| r.scenario == "live" || r.scenario == "live-writes")
    {
        let first = set
            .runs
            .iter()
            .find(|r| r.scenario == "live" || r.scenario == "live-writes");
        let (disk, mem, warmup) = first.map_or((0, 0, 0), |r| {
            (
                r.detail["disk_mib"].as_u64().unwrap_or(0),
                r.detail["memory_mib"].as_u64().unwrap_or(0),
                r.detail["warmup_seconds"].as_u64().unwrap_or(0),
            )
        });
        let _ = writeln!(
            md,
            "## Live handoffs of a running VM\n\nThe test VM (`perf/images/build-test-vm.sh` with `EDGESHIFT_VM_DISK_MIB={disk}`: a {disk} MiB ext4 disk of the Debian base's files minus /usr/share, {mem} MiB of memory, TCG) boots at e1 with its guest workload writing (counter fsync'd every 100 ms, 64 KiB hot-slot rewrites; the write-rate knobs `es_hot_every`/`es_hot_blocks` on its kernel command line), runs {warmup} s, and is handed to e2 over one tbf link. `edgeshift migrate` finds the VM's base image at e2 (warm); QEMU's shared-nothing migration (blockdev-mirror of the whole disk to an NBD export at e2, then `migrate`) starts from an empty disk; its memory moves as edgeshift's does (multifd with zstd) plus auto-converge, because with QEMU's plain defaults the busy guest's memory did not converge at 10 Mbit/s, so the two differ in how the disk moves. The smaller disk keeps QEMU's whole-disk copy at 10 Mbit/s inside the report's time budget. Needed bytes = the disk bytes the destination lacked (edgeshift: its plan; QEMU: every non-zero chunk of the disk) + the memory QEMU sent; the limit is those over the link rate. Guest writes are measured on the VM's loop device during the {warmup} s before the handoff. After each handoff the guest checks its own disk (`es-check`: every hot slot, the cold file and the counter) at the destination.\n"
        );
        md.push_str(&live_table(set));
        md.push('\n');
        if plots::live_vs_bandwidth(set, &dir.join("live_vs_bandwidth.svg"))? {
            let _ = writeln!(
                md,
                "![Live handoff time against link rate](live_vs_bandwidth.svg)\n"
            );
        }
        if let Some(run) = live_timeline_run(set) {
            if plots::timeline(run, &dir.join("live_timeline.svg"))? {
                let _ = writeln!(
                    md,
                    "### One live handoff, phase by phase\n\n`edgeshift migrate` at {} Mbit/s ({} guest writes, {:.1} s): bytes e2 received from e1, sampled every 100 ms, shaded by the engine's phases from its `--json` report. precopy: the disk rounds; mirror: the chunks written before QEMU's disk mirror started, sent beside it (the mirror then carries every new guest write, through memory, to the pause); memory: QEMU's stream (without a mirror, with disk rounds beside it when the guest wrote enough); pause: the VM stopped at e1 while the disk is checked (without a mirror, while the last dirty chunks go); switchover: QEMU's final state, then the VM runs at e2.\n\n![Live handoff timeline](live_timeline.svg)\n",
                    run.rate_mbit, run.workload, run.seconds
                );
            }
        }
    }
    md.push_str(&wan::section(set, dir)?);
    let live: Vec<&Run> = set.runs.iter().filter(|r| r.scenario == "live-bench").collect();
    if !live.is_empty() {
        let _ = writeln!(
            md,
            "## migrate-bench: QEMU's shared-nothing migration against edgeshift migrate (1 GiB test VM)\n\nFrom migrate-bench (its JSON is in `migrate/` here): the test VM with its guest workload, {} Mbit/s links. Cases a, b, c are the migration engine's: a = cold destination, base at two neighbours; b = warm destination; c = warm + an earlier copy at two neighbours.\n",
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
    if !set.policies.is_empty() {
        let p0 = &set.policies[0];
        let _ = writeln!(
            md,
            "## Caching policies: storage per edge, dedup and hits under eviction pressure\n\nOne trace per policy, each on its own edge3 testbed with its own coordinator (`PUT /v1/policy`), links unthrottled (the figures are bytes and chunks). Four users whose VMs run the Debian images (base, nginx, postgresql, python3) are placed on e1–e3 and then move edge to edge, {} handoffs in all: the destination runs `edgeshift fetch --coordinator` (pins the image, fetches what it lacks from the planned holders: other edges and the origin, which holds every image), the edge the VM left drops its pin, and the trace waits for the agents to carry out the coordinator's GC orders. Every edge's store has `--capacity` {} (watermarks {:.2}/{:.2}), less than the family's distinct chunks, so GC evicts in the policy's order (the origin's store is unlimited).\n\nHit ratio = chunks of the handed-off images that the edge tier served (already at the destination, or sent by another edge) ÷ all their non-zero distinct chunks; \"held by the edge tier\" counts the chunks some edge had before the fetch, whichever source the planner then chose. Dedup ratio = logical bytes of the images the edges hold in full (as VMs see them, 1 GiB each) ÷ bytes stored on the edges; the non-zero ratio counts only the images' non-zero distinct chunks, so it shows sharing between images rather than sparseness (below 1 when edges keep chunks of images they no longer hold in full).\n",
            p0.steps.len(),
            mb(p0.capacity_bytes) + " MB",
            p0.high_watermark,
            p0.low_watermark
        );
        md.push_str(&policy_table(set));
        md.push('\n');
        let _ = writeln!(
            md,
            "Reading it: chunks that a running VM pins are never evicted, and every VM here pins the base chunks its image shares with the family, so most local hits are those whatever the policy; the policies differ in which chunks of images that left an edge they keep. Agents report as uses only the chunks they serve to peers and the chunks of images newly pinned there (not a VM's reads of its own disk), so LRU and LFU see few uses beyond arrivals, and what separates them is mostly when each agent's GC ran relative to those. The origin/edge split of the bytes also depends on the planner, which spreads one fetch over every holder by path rate: \"held by the edge tier\" is the policy's part of it.\n"
        );
        if plots::policy_storage(set, &dir.join("policy_storage.svg"))? {
            let _ = writeln!(md, "![Storage per edge by policy](policy_storage.svg)\n");
        }
        for p in &set.policies {
            let file = format!("policy_{}.svg", p.policy);
            let _ = writeln!(md, "### Policy {}\n", p.policy);
            md.push_str(&policy_steps_table(p));
            md.push('\n');
            if plots::policy_trace(p, &dir.join(&file))? {
                let _ = writeln!(md, "![Trace under {}]({file})\n", p.policy);
            }
        }
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
