//! The report generator on recorded runs (perf/tests/fixtures/runs.json, a
//! trimmed record of a real `edgeshift-perf report` run): tables computed
//! from the record, SVG figures drawn, bad records rejected.

use std::path::Path;

use edgeshift_perf::record::RunSet;
use edgeshift_perf::report::{self, ReportError};

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
        md.contains("latency is not emulated") || md.contains("not latency"),
        "the report must say latency is not emulated"
    );
    // Every bandwidth run has a headline row with its own seconds and ratio.
    let headline = report::headline_table(&set);
    let bw: Vec<_> = set.runs.iter().filter(|r| r.scenario == "bandwidth").collect();
    assert!(!bw.is_empty(), "fixture has bandwidth runs");
    for r in &bw {
        let row = headline
            .lines()
            .find(|l| l.starts_with(&format!("| {} | {} |", r.rate_mbit, r.tool)))
            .unwrap_or_else(|| panic!("no headline row for {} at {}", r.tool, r.rate_mbit));
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
    let row = headline
        .lines()
        .find(|l| l.starts_with(&format!("| {} | {} |", other.rate_mbit, other.tool)))
        .expect("baseline row");
    assert!(
        row.contains(&format!("{:.1}×", other.seconds / es.seconds)),
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
