//! SVG figures with plotters, each drawn from a [`RunSet`].

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use crate::record::{Heatmap, PolicyRun, PolicyStep, Run, RunSet, Storage};

/// A plotting error, as text (plotters' error type is generic over the backend).
#[derive(Debug, thiserror::Error)]
#[error("drawing {file}: {msg}")]
pub struct PlotError {
    pub file: String,
    pub msg: String,
}

fn perr(file: &Path) -> impl Fn(String) -> PlotError + '_ {
    move |msg| PlotError {
        file: file.display().to_string(),
        msg,
    }
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

pub(crate) fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

/// Migration time against link rate, one line per tool, with the physical
/// limit of one path and of all the holders' paths drawn dashed.
pub fn time_vs_bandwidth(set: &RunSet, file: &Path) -> Result<bool, PlotError> {
    let runs: Vec<&Run> = set.runs.iter().filter(|r| r.scenario == "bandwidth").collect();
    time_vs_rate(
        &runs,
        "edgeshift",
        false,
        "Handoff time vs link rate (warm destination)",
        file,
    )
}

/// Live handoffs of the running VM: `edgeshift migrate` (warm destination)
/// and QEMU's shared-nothing migration, each with its own physical limit.
pub fn live_vs_bandwidth(set: &RunSet, file: &Path) -> Result<bool, PlotError> {
    let runs: Vec<&Run> = set.runs.iter().filter(|r| r.scenario == "live").collect();
    time_vs_rate(
        &runs,
        "edgeshift migrate",
        true,
        "Live handoff of a running VM vs link rate",
        file,
    )
}

/// Time against rate, one line per tool; dashed: the physical limit of
/// `reference` over all its paths and over the source's path alone, or with
/// `per_tool_limits` each tool's own limit.
fn time_vs_rate(
    runs: &[&Run],
    reference: &str,
    per_tool_limits: bool,
    caption: &str,
    file: &Path,
) -> Result<bool, PlotError> {
    if runs.is_empty() {
        return Ok(false);
    }
    let e = perr(file);
    let mut by_tool: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    let mut limit_multi: BTreeMap<u32, f64> = BTreeMap::new();
    let mut limit_single: BTreeMap<u32, f64> = BTreeMap::new();
    let mut tool_limits: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for r in runs {
        by_tool
            .entry(&r.tool)
            .or_default()
            .push((f64::from(r.rate_mbit), r.seconds));
        if per_tool_limits {
            if r.limit_seconds > 0.0 {
                tool_limits
                    .entry(&r.tool)
                    .or_default()
                    .push((f64::from(r.rate_mbit), r.limit_seconds));
            }
        } else if r.tool == reference {
            limit_multi.insert(r.rate_mbit, r.limit_seconds);
            // The same bytes over the source's path alone.
            if let Some(&first) = r.sources.first().map(|_| &r.rate_mbit) {
                limit_single.insert(first, crate::scenario::limit(r.needed_bytes, first));
            }
        }
    }
    let max_rate = runs.iter().map(|r| r.rate_mbit).max().unwrap_or(100) as f64;
    let max_t = runs.iter().map(|r| r.seconds).fold(1.0, f64::max);
    let min_t = runs
        .iter()
        .map(|r| {
            r.seconds.min(if r.limit_seconds > 0.0 {
                r.limit_seconds
            } else {
                r.seconds
            })
        })
        .chain(limit_multi.values().copied())
        .fold(f64::MAX, f64::min)
        .max(0.05);
    let root = SVGBackend::new(file, (820, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (5.0..max_rate * 1.15).log_scale(),
            (min_t * 0.7..max_t * 1.5).log_scale(),
        )
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("edge-to-edge link rate (Mbit/s)")
        .y_desc("seconds (log)")
        .draw()
        .map_err(|x| e(x.to_string()))?;
    for (i, (tool, pts)) in by_tool.iter_mut().enumerate() {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let c = color(i);
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(|x| e(x.to_string()))?
            .label(tool.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
            .map_err(|x| e(x.to_string()))?;
    }
    for (i, (tool, pts)) in tool_limits.iter_mut().enumerate() {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let c = color(i);
        chart
            .draw_series(DashedLineSeries::new(
                pts.iter().copied(),
                6,
                4,
                c.stroke_width(1),
            ))
            .map_err(|x| e(x.to_string()))?
            .label(format!("physical limit, {tool}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(1)));
    }
    for (name, lim, c) in [
        ("physical limit, all holders' paths", &limit_multi, BLACK),
        (
            "physical limit, source's path only",
            &limit_single,
            RGBColor(120, 120, 120),
        ),
    ] {
        if lim.is_empty() {
            continue;
        }
        let pts: Vec<(f64, f64)> = lim.iter().map(|(r, s)| (f64::from(*r), *s)).collect();
        chart
            .draw_series(DashedLineSeries::new(pts, 6, 4, c.stroke_width(1)))
            .map_err(|x| e(x.to_string()))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(1)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|x| e(x.to_string()))?;
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(true)
}

/// Horizontal bars: `(label, value)` pairs.
fn bars(file: &Path, caption: &str, unit: &str, items: &[(String, f64)]) -> Result<bool, PlotError> {
    if items.is_empty() {
        return Ok(false);
    }
    let e = perr(file);
    let max = items.iter().map(|(_, v)| *v).fold(0.0, f64::max).max(1e-9);
    let h = 90 + 34 * items.len() as u32;
    let root = SVGBackend::new(file, (820, h)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let n = items.len() as i32;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(260)
        .build_cartesian_2d(0.0..max * 1.25, 0..n)
        .map_err(|x| e(x.to_string()))?;
    let labels: Vec<String> = items.iter().map(|(l, _)| l.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc(unit)
        .y_labels(items.len())
        .y_label_formatter(&|i| {
            let idx = (n - 1 - *i) as usize;
            labels.get(idx).cloned().unwrap_or_default()
        })
        .draw()
        .map_err(|x| e(x.to_string()))?;
    chart
        .draw_series(items.iter().enumerate().map(|(i, (_, v))| {
            let y = n - 1 - i as i32;
            let mut r = Rectangle::new([(0.0, y), (*v, y + 1)], color(i).filled());
            r.set_margin(5, 5, 0, 0);
            r
        }))
        .map_err(|x| e(x.to_string()))?;
    chart
        .draw_series(items.iter().enumerate().map(|(i, (_, v))| {
            let y = n - 1 - i as i32;
            Text::new(format!("{v:.1}"), (*v + max * 0.01, y), ("sans-serif", 13))
        }))
        .map_err(|x| e(x.to_string()))?;
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(true)
}

/// Bytes on the wire per tool and rate.
pub fn wire_bytes(set: &RunSet, file: &Path) -> Result<bool, PlotError> {
    let items: Vec<(String, f64)> = set
        .runs
        .iter()
        .filter(|r| r.scenario == "bandwidth" && r.projected_from.is_none())
        .map(|r| {
            (
                format!("{} @ {} Mbit/s", r.tool, r.rate_mbit),
                r.wire_bytes as f64 / 1e6,
            )
        })
        .collect();
    bars(
        file,
        "Bytes on the destination's links (both directions)",
        "MB",
        &items,
    )
}

/// Fleet storage per caching layout, with the dedup ratio in the label.
pub fn storage(set: &RunSet, file: &Path) -> Result<bool, PlotError> {
    let items: Vec<(String, f64)> = set
        .storage
        .iter()
        .map(|s: &Storage| {
            (
                format!("{} (dedup {:.2}x)", s.policy, s.dedup_ratio()),
                s.physical_bytes as f64 / 1e6,
            )
        })
        .collect();
    bars(
        file,
        "Fleet storage for the same held images",
        "MB on disk",
        &items,
    )
}

/// Cumulative bytes from each source over time for one run, phases shaded.
pub fn timeline(run: &Run, file: &Path) -> Result<bool, PlotError> {
    if run.timeline.len() < 2 {
        return Ok(false);
    }
    let e = perr(file);
    let t_max = run.timeline.last().map_or(1.0, |s| s.t).max(run.seconds);
    let mut series: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for s in &run.timeline {
        for (src, b) in &s.bytes {
            series.entry(src).or_default().push((s.t, *b as f64 / 1e6));
        }
    }
    series.retain(|_, pts| pts.iter().any(|p| p.1 > 0.5));
    let y_max = series.values().flatten().map(|p| p.1).fold(1.0, f64::max);
    let root = SVGBackend::new(file, (820, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Handoff timeline: {} ({} cache, {} Mbit/s links)",
                run.tool, run.cache, run.rate_mbit
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max * 1.02, 0.0..y_max * 1.1)
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("MB received from source")
        .draw()
        .map_err(|x| e(x.to_string()))?;
    // Phase bands: a light band per phase after the first.
    let mut bands: Vec<(String, f64, f64)> = Vec::new();
    for s in &run.timeline {
        match bands.last_mut() {
            Some(b) if b.0 == s.phase => b.2 = s.t,
            _ => bands.push((s.phase.clone(), s.t, s.t)),
        }
    }
    if let Some(last) = bands.last_mut() {
        last.2 = t_max;
    }
    for (i, (name, a, b)) in bands.iter().enumerate() {
        let shade = if i % 2 == 0 {
            RGBColor(245, 245, 245)
        } else {
            RGBColor(225, 232, 245)
        };
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(*a, 0.0), (*b, y_max * 1.1)],
                shade.filled(),
            )))
            .map_err(|x| e(x.to_string()))?;
        chart
            .draw_series(std::iter::once(Text::new(
                name.clone(),
                (*a + 0.02 * t_max, y_max * 1.05),
                ("sans-serif", 13),
            )))
            .map_err(|x| e(x.to_string()))?;
    }
    for (i, (src, pts)) in series.iter().enumerate() {
        let c = color(i);
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(|x| e(x.to_string()))?
            .label(format!("from {src}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
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

/// Per-chunk write rate over time: one row per interval, one column per chunk.
pub fn heatmap(h: &Heatmap, file: &Path) -> Result<bool, PlotError> {
    if h.rows.is_empty() || h.chunks == 0 {
        return Ok(false);
    }
    let e = perr(file);
    let max = h.rows.iter().flatten().copied().fold(0.0, f64::max).max(1e-9);
    let rows = h.rows.len();
    let chunks = h.chunks as usize;
    let root = SVGBackend::new(file, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Per-chunk write rate ({} KiB chunks, {} tracker; darker = hotter, max {max:.0}/s)",
                h.chunk_size / 1024,
                h.tracker
            ),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0..chunks, 0.0..(rows as f64 * h.interval))
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("chunk index")
        .y_desc("seconds")
        .draw()
        .map_err(|x| e(x.to_string()))?;
    let cells = h.rows.iter().enumerate().flat_map(|(ri, row)| {
        row.iter()
            .enumerate()
            .filter(|(_, v)| **v > 0.0)
            .map(move |(ci, v)| {
                // Log scale so rarely written chunks still show.
                let level = ((1.0 + v).ln() / (1.0 + max).ln()).clamp(0.0, 1.0);
                let shade = (235.0 * (1.0 - level)) as u8;
                Rectangle::new(
                    [
                        (ci, ri as f64 * h.interval),
                        (ci + 1, (ri + 1) as f64 * h.interval),
                    ],
                    RGBColor(255, shade, shade / 2).filled(),
                )
            })
    });
    chart.draw_series(cells).map_err(|x| e(x.to_string()))?;
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(true)
}

/// Storage per edge at the end of each policy's trace, fleet dedup in the label.
pub fn policy_storage(set: &RunSet, file: &Path) -> Result<bool, PlotError> {
    let items: Vec<(String, f64)> = set
        .policies
        .iter()
        .flat_map(|p| {
            p.edges.iter().map(move |e| {
                (
                    format!("{} {} (fleet dedup {:.2}x)", p.policy, e.edge, p.dedup_ratio()),
                    e.stored_bytes as f64 / 1e6,
                )
            })
        })
        .collect();
    bars(
        file,
        "Bytes stored per edge after the trace, by caching policy",
        "MB stored",
        &items,
    )
}

/// One policy's trace: per handoff, where the image's chunks came from
/// (already at the destination, another edge, the origin), stacked, in MB.
pub fn policy_trace(run: &PolicyRun, file: &Path) -> Result<bool, PlotError> {
    if run.steps.is_empty() {
        return Ok(false);
    }
    let e = perr(file);
    let mb_per_chunk = |s: &PolicyStep| s.bytes as f64 / s.chunks.max(1) as f64 / 1e6;
    let parts = |s: &PolicyStep| {
        let k = mb_per_chunk(s);
        [
            s.local_chunks as f64 * k,
            s.from_edges_chunks as f64 * k,
            s.from_origin_chunks as f64 * k,
        ]
    };
    let max = run
        .steps
        .iter()
        .map(|s| parts(s).iter().sum::<f64>())
        .fold(1.0, f64::max);
    let n = run.steps.len();
    let root = SVGBackend::new(file, (820, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let caption = format!(
        "{}: chunks of each handed-off image by where they came from (hit ratio {:.3})",
        run.policy,
        run.hit_ratio()
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(60)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..n as f64, 0.0..max * 1.2)
        .map_err(|x| e(x.to_string()))?;
    let labels: Vec<String> = run
        .steps
        .iter()
        .map(|s| {
            format!(
                "{}:{}>{}",
                s.user,
                s.image.chars().take(4).collect::<String>(),
                s.to
            )
        })
        .collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            labels.get(i).cloned().unwrap_or_default()
        })
        .x_desc("handoff (user:image>destination), in trace order")
        .y_desc("MB of the image's chunks")
        .draw()
        .map_err(|x| e(x.to_string()))?;
    let names = [
        "already at the destination",
        "from other edges",
        "from the origin",
    ];
    let colors = [color(2), color(0), color(3)];
    for (k, name) in names.iter().enumerate() {
        let c = colors[k];
        chart
            .draw_series(run.steps.iter().enumerate().map(|(i, s)| {
                let p = parts(s);
                let lo: f64 = p[..k].iter().sum();
                let x = i as f64;
                Rectangle::new([(x + 0.15, lo), (x + 0.85, lo + p[k])], c.filled())
            }))
            .map_err(|x| e(x.to_string()))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
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
