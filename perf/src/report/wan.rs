//! The report's round-trip-time parts: what the VM's users felt during live
//! handoffs (request latency over time beside the migration's phases), and
//! time and downtime against the edges' round-trip time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use super::plots::PlotError;
use crate::record::{Run, RunSet};
use crate::service_probe::{requests_of, Request};

fn perr(file: &Path) -> impl Fn(String) -> PlotError + '_ {
    move |msg| PlotError {
        file: file.display().to_string(),
        msg,
    }
}

fn is_live(r: &Run) -> bool {
    r.scenario == "live" || r.scenario == "live-writes"
}

/// One row per live handoff whose users were measured.
pub fn service_table(set: &RunSet) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| tool | rate (Mbit/s) | RTT (ms) | handoff (s) | downtime (ms) | requests | failed | median (ms) | slowest (ms) | longest gap (ms) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in set.runs.iter().filter(|r| is_live(r)) {
        let sum = &r.detail["service"]["summary"];
        if sum.is_null() {
            continue;
        }
        let f = |k: &str| sum[k].as_f64().map_or("–".into(), |v| format!("{v:.0}"));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {} |",
            r.tool,
            r.rate_mbit,
            r.rtt_ms,
            r.seconds,
            r.detail["downtime_ms"]
                .as_u64()
                .map_or("–".into(), |v| v.to_string()),
            f("requests"),
            f("failed"),
            f("median_ms"),
            f("max_ms"),
            f("longest_gap_ms"),
        );
    }
    s
}

/// The engine's phases as (name, start, end) seconds: edgeshift's from its
/// sampled timeline, QEMU's from its mirror-ready time and downtime.
fn phases(r: &Run) -> Vec<(String, f64, f64)> {
    if r.tool == "qemu-mirror" {
        let ready = r.detail["mirror_ready_seconds"].as_f64().unwrap_or(0.0);
        let down = r.detail["downtime_ms"].as_f64().unwrap_or(0.0) / 1e3;
        return vec![
            ("mirror".into(), 0.0, ready),
            ("memory".into(), ready, (r.seconds - down).max(ready)),
            ("pause".into(), (r.seconds - down).max(ready), r.seconds),
        ];
    }
    let mut bands: Vec<(String, f64, f64)> = Vec::new();
    for s in &r.timeline {
        match bands.last_mut() {
            Some(b) if b.0 == s.phase => b.2 = s.t,
            _ => bands.push((s.phase.clone(), s.t, s.t)),
        }
    }
    if let Some(last) = bands.last_mut() {
        last.2 = last.2.max(r.seconds);
    }
    bands
}

/// Request latency over time for each of `runs` (one panel each), the
/// engine's phases shaded behind, failed requests as red crosses on top.
pub fn service_plot(runs: &[&Run], file: &Path) -> Result<bool, PlotError> {
    let series: Vec<(&Run, Vec<Request>)> = runs
        .iter()
        .map(|r| (*r, requests_of(&r.detail["service"])))
        .filter(|(_, rs)| !rs.is_empty())
        .collect();
    if series.is_empty() {
        return Ok(false);
    }
    let e = perr(file);
    let t_min = series
        .iter()
        .flat_map(|(_, rs)| rs.iter().map(|q| q.t))
        .fold(0.0, f64::min);
    let t_max = series
        .iter()
        .flat_map(|(_, rs)| rs.iter().map(|q| q.t))
        .fold(1.0, f64::max);
    let y_max = series
        .iter()
        .flat_map(|(_, rs)| rs.iter().filter_map(|q| q.ms))
        .fold(10.0, f64::max)
        * 3.0;
    let root = SVGBackend::new(file, (900, 300 * series.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    for ((run, rs), area) in series.iter().zip(root.split_evenly((series.len(), 1))) {
        let mut chart = ChartBuilder::on(&area)
            .caption(
                format!(
                    "{}: HTTP requests to the VM, {} Mbit/s, {} ms RTT",
                    run.tool, run.rate_mbit, run.rtt_ms
                ),
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(t_min..t_max, (0.1..y_max).log_scale())
            .map_err(|x| e(x.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("seconds from the handoff's start")
            .y_desc("latency ms (log)")
            .draw()
            .map_err(|x| e(x.to_string()))?;
        for (i, (name, a, b)) in phases(run).iter().enumerate() {
            let shade = if i % 2 == 0 {
                RGBColor(240, 240, 240)
            } else {
                RGBColor(222, 230, 245)
            };
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(*a, 0.1), (*b, y_max)],
                    shade.filled(),
                )))
                .map_err(|x| e(x.to_string()))?;
            chart
                .draw_series(std::iter::once(Text::new(
                    name.clone(),
                    (*a, y_max / 2.0),
                    ("sans-serif", 12),
                )))
                .map_err(|x| e(x.to_string()))?;
        }
        chart
            .draw_series(rs.iter().filter_map(|q| {
                q.ms.map(|ms| Circle::new((q.t, ms.max(0.11)), 2, super::plots::color(0).filled()))
            }))
            .map_err(|x| e(x.to_string()))?;
        chart
            .draw_series(
                rs.iter()
                    .filter(|q| q.ms.is_none())
                    .map(|q| Cross::new((q.t, y_max / 1.5), 4, RED.stroke_width(2))),
            )
            .map_err(|x| e(x.to_string()))?;
    }
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(true)
}

/// `value` of runs against RTT, one line per (scenario, tool, rate).
fn vs_rtt(
    runs: &[&Run],
    value: impl Fn(&Run) -> Option<f64>,
    caption: &str,
    y_desc: &str,
    file: &Path,
) -> Result<bool, PlotError> {
    let mut lines: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in runs {
        if let Some(v) = value(r) {
            lines
                .entry(format!("{} {} Mbit/s", r.tool, r.rate_mbit))
                .or_default()
                .push((r.rtt_ms, v));
        }
    }
    let rtts: Vec<f64> = runs.iter().map(|r| r.rtt_ms).collect();
    if lines.is_empty() || rtts.iter().all(|&t| t == rtts[0]) {
        return Ok(false);
    }
    let e = perr(file);
    let x_max = rtts.iter().copied().fold(1.0, f64::max) * 1.1;
    let y_max = lines.values().flatten().map(|p| p.1).fold(1.0, f64::max) * 1.15;
    let root = SVGBackend::new(file, (820, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("round-trip time between edges (ms)")
        .y_desc(y_desc)
        .draw()
        .map_err(|x| e(x.to_string()))?;
    for (i, (name, pts)) in lines.iter_mut().enumerate() {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let c = super::plots::color(i);
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(|x| e(x.to_string()))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
            .map_err(|x| e(x.to_string()))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|x| e(x.to_string()))?;
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(true)
}

/// The report's section on round-trip times and users (empty when the
/// runs have neither service measurements nor more than one RTT).
pub fn section(set: &RunSet, dir: &Path) -> Result<String, PlotError> {
    let mut md = String::new();
    let live: Vec<&Run> = set.runs.iter().filter(|r| r.scenario == "live").collect();
    let disk: Vec<&Run> = set.runs.iter().filter(|r| r.scenario == "bandwidth").collect();
    let seconds = |r: &Run| Some(r.seconds);
    let downtime = |r: &Run| r.detail["downtime_ms"].as_f64();
    let mut figures = String::new();
    for (runs, value, caption, y, name) in [
        (
            &live,
            &seconds as &dyn Fn(&Run) -> Option<f64>,
            "Live handoff time vs RTT",
            "seconds",
            "live_time_vs_rtt.svg",
        ),
        (
            &live,
            &downtime,
            "Live handoff downtime vs RTT",
            "downtime (ms)",
            "live_downtime_vs_rtt.svg",
        ),
        (
            &disk,
            &seconds,
            "Disk part of a handoff vs RTT (warm destination)",
            "seconds",
            "disk_time_vs_rtt.svg",
        ),
    ] {
        if vs_rtt(runs, value, caption, y, &dir.join(name))? {
            let _ = writeln!(figures, "![{caption}]({name})\n");
        }
    }
    if !figures.is_empty() {
        let _ = writeln!(
            md,
            "## Against round-trip time\n\nThe edges' links carry the testbed's delay line (docs/wan.md: one-way delay = RTT / 2 each way, after tbf's rate); links to the origin keep their own.\n\n{figures}"
        );
    }
    if set
        .runs
        .iter()
        .any(|r| is_live(r) && !r.detail["service"]["summary"].is_null())
    {
        let _ = writeln!(
            md,
            "## What the VM's users felt\n\nA client on the VM network (host `client`, outside the VM and off the migration's link) asks the guest's busybox httpd for a page on the VM's disk every 50 ms, one request at a time on a fresh TCP connection, from 1 s before the handoff to 1 s after it. A request fails after 5 s without an answer; the longest gap is the longest time between two completed answers.\n\n{}",
            service_table(set)
        );
        let mut pairs: BTreeMap<(u32, u64), Vec<&Run>> = BTreeMap::new();
        for r in live.iter().filter(|r| !r.detail["service"]["requests"].is_null()) {
            pairs
                .entry((r.rate_mbit, r.rtt_ms.to_bits()))
                .or_default()
                .push(r);
        }
        // The pair nearest 50 Mbit/s at the largest RTT: long phases, real delay.
        let pick = pairs
            .iter()
            .filter(|(_, rs)| rs.len() > 1)
            .max_by(|a, b| {
                let key = |k: &(u32, u64)| (f64::from_bits(k.1), -(f64::from(k.0) - 50.0).abs());
                key(a.0)
                    .partial_cmp(&key(b.0))
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .or_else(|| pairs.iter().next());
        if let Some((_, rs)) = pick {
            if service_plot(rs, &dir.join("service_latency.svg"))? {
                let _ = writeln!(md, "![Request latency during handoffs](service_latency.svg)\n");
            }
        }
    }
    Ok(md)
}
