//! The report generator on recorded runs (perf/tests/fixtures/runs.json, a
//! trimmed record of a real `edgeshift-perf report` run): tables computed
//! from the record, SVG figures drawn, bad records rejected.

use std::path::Path;

use edgeshift_perf::record::RunSet;
use edgeshift_perf::report::{self, ReportError};

/// The first line of a markdown `table` that starts with `prefix`.
fn row_starting<'a>(table: &'a str, prefix: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no row starting {prefix:?} in:\n{table}"))
}

fn fixture() -> RunSet {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/runs.json");
    report::load(&path).expect("fixture loads")
}

#[test]
fn report_tables_come_from_the_record() {
    let set = fixture();
    let dir = tempfile::tempdir().expect("temp dir");
    let md_path = report::write(&set, dir.path()).expect("report written");
    let md = std::fs::read_to_string(&md_path).expect("report.md");

    assert!(
        md.contains("Latency is emulated only where a run says so"),
        "the report must say where latency is emulated"
    );
    // Every bandwidth run has a headline row with its own seconds and ratio.
    let headline = report::headline_table(&set);
    let bw: Vec<_> = set.runs.iter().filter(|r| r.scenario == "bandwidth").collect();
    assert!(!bw.is_empty(), "fixture has bandwidth runs");
    for r in &bw {
        let row = row_starting(&headline, &format!("| {} | {} |", r.rate_mbit, r.tool));
        assert!(row.contains(&format!("{:.1}", r.seconds)), "{row}");
        let ratio = r.seconds / r.limit_seconds;
        assert!(
            row.contains(&format!("{ratio:.2}×")),
            "{row} lacks ratio {ratio:.2}"
        );
        assert!(md.contains(row), "headline row missing from report.md");
    }
    // Speed-up of a baseline is its time over edgeshift's at the same rate.
    let es = bw.iter().find(|r| r.tool == "edgeshift").expect("edgeshift run");
    let other = bw
        .iter()
        .find(|r| r.tool != "edgeshift" && r.rate_mbit == es.rate_mbit)
        .expect("a baseline at the same rate");
    let row = row_starting(&headline, &format!("| {} | {} |", other.rate_mbit, other.tool));
    assert!(
        row.contains(&format!("{:.2}×", other.seconds / es.seconds)),
        "{row}"
    );

    // Storage table: dedup ratio computed from logical / physical.
    for s in &set.storage {
        assert!(md.contains(&format!(
            "{:.2}×",
            s.logical_bytes as f64 / s.physical_bytes as f64
        )));
    }
    // Figures exist, are SVG, and show what they claim.
    for (file, needle) in [
        ("time_vs_bandwidth.svg", "physical limit"),
        ("wire_bytes.svg", "edgeshift"),
        ("storage.svg", "dedup"),
        ("timeline.svg", "from e1"),
        ("heatmap.svg", "write rate"),
    ] {
        let svg = std::fs::read_to_string(dir.path().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(
            svg.starts_with("<svg") || svg.contains("<svg"),
            "{file} is not SVG"
        );
        assert!(svg.contains(needle), "{file} lacks {needle:?}");
        assert!(
            md.contains(&format!("]({file})")),
            "report.md does not link {file}"
        );
    }
}

#[test]
fn report_round_trips_through_json() {
    let set = fixture();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = report::save(&set, dir.path()).expect("saved");
    let again = report::load(&path).expect("reloaded");
    assert_eq!(set, again);
}

#[test]
fn empty_record_gives_a_report_without_figures() {
    let set = RunSet {
        name: "empty".into(),
        ..RunSet::default()
    };
    let dir = tempfile::tempdir().expect("temp dir");
    report::write(&set, dir.path()).expect("written");
    let svgs = std::fs::read_dir(dir.path())
        .expect("read dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "svg"))
        })
        .count();
    assert_eq!(svgs, 0, "no runs, no figures");
}

#[test]
fn projected_rows_are_labelled() {
    let mut set = fixture();
    let r = set
        .runs
        .iter_mut()
        .find(|r| r.scenario == "bandwidth")
        .expect("bandwidth run");
    r.projected_from = Some(100);
    let table = report::headline_table(&set);
    assert!(table.contains("projected from 100 Mbit/s"), "{table}");
}

#[test]
fn bad_records_are_rejected() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("nope.json");
    assert!(matches!(report::load(&missing), Err(ReportError::Io { .. })));
    for bad in ["", "{", "[]", "{\"name\": 3}", "{\"runs\": [{\"tool\": \"x\"}]}"] {
        let p = dir.path().join("bad.json");
        std::fs::write(&p, bad).expect("write");
        assert!(
            matches!(report::load(&p), Err(ReportError::Json { .. })),
            "accepted {bad:?}"
        );
    }
}

#[test]
fn live_rows_come_from_the_record() {
    let set = fixture();
    let dir = tempfile::tempdir().expect("temp dir");
    let md =
        std::fs::read_to_string(report::write(&set, dir.path()).expect("report written")).expect("report.md");
    let headline = report::headline_table(&set);
    let live: Vec<_> = set.runs.iter().filter(|r| r.scenario == "live").collect();
    assert!(
        live.iter().any(|r| r.tool == "qemu-mirror") && live.iter().any(|r| r.tool == "edgeshift migrate"),
        "fixture has both live tools"
    );
    let rates: std::collections::BTreeSet<u32> = live.iter().map(|r| r.rate_mbit).collect();
    assert_eq!(rates.len(), 3, "QEMU and edgeshift at three rates");
    for r in &live {
        let row = row_starting(&headline, &format!("| {} | {} | live VM |", r.rate_mbit, r.tool));
        assert!(row.contains(&format!("| {:.1} |", r.seconds)), "{row}");
        assert!(
            row.contains(&format!("{:.2}×", r.seconds / r.limit_seconds)),
            "{row}"
        );
        if r.tool == "qemu-mirror" {
            // QEMU's time over edgeshift migrate's at the same rate.
            let es = live
                .iter()
                .find(|x| x.tool == "edgeshift migrate" && x.rate_mbit == r.rate_mbit)
                .expect("edgeshift at the same rate");
            assert!(row.contains(&format!("{:.2}×", r.seconds / es.seconds)), "{row}");
        }
    }
    // The live table: downtime, rounds and re-sent chunks from the migration's report.
    let table = report::live_table(&set);
    for r in set
        .runs
        .iter()
        .filter(|r| r.scenario == "live" || r.scenario == "live-writes")
    {
        let downtime = r.detail["downtime_ms"].as_u64().expect("downtime recorded");
        let row = table
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "| {} | {} | {} | {} | {} |",
                    r.scenario, r.tool, r.rate_mbit, r.rtt_ms, r.workload
                )) && l.contains(&format!("| {downtime} |"))
            })
            .unwrap_or_else(|| panic!("no live row for {} {} {}", r.scenario, r.tool, r.rate_mbit));
        if let Some(resent) = r.detail["chunks_resent"].as_u64() {
            assert!(row.contains(&format!("| {resent} |")), "{row}");
        }
        assert!(md.contains(row), "live row missing from report.md");
    }
    let writes: Vec<&str> = set
        .runs
        .iter()
        .filter(|r| r.scenario == "live-writes")
        .map(|r| r.workload.as_str())
        .collect();
    assert!(writes.contains(&"low") && writes.contains(&"high"), "{writes:?}");
    let svg = std::fs::read_to_string(dir.path().join("live_vs_bandwidth.svg")).expect("live figure");
    assert!(svg.contains("physical limit") && svg.contains("qemu-mirror"));
    assert!(md.contains("](live_vs_bandwidth.svg)"));
}

#[test]
fn policy_tables_come_from_the_record() {
    let set = fixture();
    assert_eq!(
        set.policies.iter().map(|p| p.policy.as_str()).collect::<Vec<_>>(),
        ["lru", "lfu", "popularity"],
        "fixture has a trace per policy"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let md =
        std::fs::read_to_string(report::write(&set, dir.path()).expect("report written")).expect("report.md");
    let table = report::policy_table(&set);
    for p in &set.policies {
        let row = row_starting(&table, &format!("| {} |", p.policy));
        // Ratios recomputed here from the steps and the edges' stores.
        let chunks: u64 = p.steps.iter().map(|s| s.chunks).sum();
        let hits: u64 = p.steps.iter().map(|s| s.local_chunks + s.from_edges_chunks).sum();
        assert!(
            row.contains(&format!("| {:.3} |", hits as f64 / chunks as f64)),
            "{row}"
        );
        let stored: u64 = p.edges.iter().map(|e| e.stored_bytes).sum();
        let logical: u64 = p.edges.iter().map(|e| e.logical_bytes).sum();
        assert!(
            row.contains(&format!("{:.2}×", logical as f64 / stored as f64)),
            "{row}"
        );
        assert!(
            row.contains(&format!("{:.1}", p.origin_wire_bytes() as f64 / 1e6)),
            "{row}"
        );
        assert!(md.contains(row), "policy row missing from report.md");
        // Its own step table and figure.
        let steps = report::policy_steps_table(p);
        assert_eq!(steps.lines().count(), p.steps.len() + 2, "{steps}");
        assert!(md.contains(&steps));
        let file = format!("policy_{}.svg", p.policy);
        let svg = std::fs::read_to_string(dir.path().join(&file)).expect("policy figure");
        assert!(svg.contains("from the origin") && svg.contains(&p.policy));
        assert!(md.contains(&format!("]({file})")));
    }
    assert!(
        set.policies.iter().map(|p| p.evicted_bytes()).sum::<u64>() > 0,
        "the recorded traces evicted something (capacity below the working set)"
    );
    let svg = std::fs::read_to_string(dir.path().join("policy_storage.svg")).expect("storage figure");
    assert!(svg.contains("dedup"));
}

#[test]
fn policy_ratios_handle_empty_traces() {
    let mut set = fixture();
    let p = set.policies.first_mut().expect("a policy");
    p.steps.clear();
    p.edges.clear();
    assert_eq!(p.hit_ratio(), 0.0);
    assert_eq!(p.dedup_ratio(), 0.0);
    let table = report::policy_table(&set);
    assert!(
        table.contains(&format!("| {} | 0 | 0.000 |", set.policies[0].policy)),
        "{table}"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    report::write(&set, dir.path()).expect("a report even with an empty trace");
}

#[test]
fn malformed_policy_records_are_rejected() {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = dir.path().join("runs.json");
    for bad in [
        r#"{"name":"x","started":"","wall_seconds":0,"host":null,"images":null,"runs":[],"policies":[{"policy":"lru"}]}"#,
        r#"{"name":"x","started":"","wall_seconds":0,"host":null,"images":null,"runs":[],"policies":3}"#,
    ] {
        std::fs::write(&p, bad).expect("write");
        assert!(
            matches!(report::load(&p), Err(ReportError::Json { .. })),
            "accepted {bad}"
        );
    }
}

#[test]
fn a_live_handoff_timeline_is_drawn_with_its_phases_when_recorded() {
    let mut set = fixture();
    let dir = tempfile::tempdir().expect("temp dir");
    // The fixture predates live timelines: no section without one.
    let md = std::fs::read_to_string(report::write(&set, dir.path()).expect("report")).expect("report.md");
    assert!(!md.contains("live_timeline.svg"));
    let run = set
        .runs
        .iter_mut()
        .find(|r| r.scenario == "live" && r.tool == "edgeshift migrate" && r.rate_mbit == 50)
        .expect("fixture has edgeshift migrate at 50 Mbit/s");
    run.timeline = [
        (0.1, "precopy", 1_000_000u64),
        (1.0, "memory", 6_000_000),
        (4.0, "pause", 30_000_000),
        (5.0, "switchover", 34_000_000),
    ]
    .into_iter()
    .map(|(t, phase, b)| edgeshift_perf::record::Sample {
        t,
        phase: phase.into(),
        bytes: vec![("e1".into(), b)],
    })
    .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let md = std::fs::read_to_string(report::write(&set, dir.path()).expect("report")).expect("report.md");
    assert!(
        md.contains("### One live handoff, phase by phase\n\n`edgeshift migrate` at 50 Mbit/s"),
        "{md}"
    );
    assert!(md.contains("](live_timeline.svg)"));
    let svg = std::fs::read_to_string(dir.path().join("live_timeline.svg")).expect("live timeline figure");
    for phase in ["precopy", "memory", "pause", "switchover"] {
        assert!(svg.contains(phase), "{phase} band missing");
    }
    assert!(svg.contains("from e1"));
}

/// Live runs at two RTTs with their users' requests: the report draws time
/// and downtime against RTT and the request latencies, and its users' table
/// carries each run's summary.
#[test]
fn rtt_axis_and_users_come_from_the_record() {
    let mut set = fixture();
    let live: Vec<_> = set
        .runs
        .iter()
        .filter(|r| r.scenario == "live")
        .cloned()
        .collect();
    for (i, r) in set.runs.iter_mut().filter(|r| r.scenario == "live").enumerate() {
        let requests: Vec<edgeshift_perf::service_probe::Request> = (0..60)
            .map(|k| edgeshift_perf::service_probe::Request {
                t: f64::from(k) * 0.05 - 1.0,
                ms: (k != 30).then_some(2.0 + f64::from(k % 7) + i as f64),
            })
            .collect();
        r.detail["service"] =
            edgeshift_perf::service_probe::detail(&Ok(edgeshift_perf::service_probe::Probed {
                requests,
                ..Default::default()
            }));
    }
    for mut r in live {
        r.rtt_ms = 60.0;
        r.seconds *= 1.5;
        set.runs.push(r);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let md =
        std::fs::read_to_string(report::write(&set, dir.path()).expect("report written")).expect("report.md");
    for svg in [
        "live_time_vs_rtt.svg",
        "live_downtime_vs_rtt.svg",
        "service_latency.svg",
    ] {
        assert!(dir.path().join(svg).is_file(), "{svg} not drawn");
        assert!(md.contains(svg), "{svg} not in report.md");
    }
    let table = report::wan::service_table(&set);
    for r in set
        .runs
        .iter()
        .filter(|r| r.scenario == "live" && r.rtt_ms == 0.0)
    {
        let sum = &r.detail["service"]["summary"];
        let row = format!(
            "| {} | {} | {} | {:.1} |",
            r.tool, r.rate_mbit, r.rtt_ms, r.seconds
        );
        let line = table
            .lines()
            .find(|l| l.starts_with(&row))
            .unwrap_or_else(|| panic!("no row {row} in\n{table}"));
        assert!(
            line.contains(&format!(
                "| 60 | 1 | {:.0} |",
                sum["median_ms"].as_f64().expect("median")
            )),
            "{line}"
        );
        assert!(md.contains(line));
    }
}
