//! `edgeshift dirty`: watch block devices for a while and report per-chunk
//! write counts and rates.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use edgeshift_agent::dirty::{
    capacity_for, open_tracker, DeviceId, DirtyMonitor, RateConfig, Snapshot, TrackerChoice,
};
use edgeshift_common::ChunkSize;

/// Counts the writes to each chunk of a block device (a VM disk: loop, nbd
/// or LV device) for DURATION seconds, then prints per-chunk write counts,
/// bytes and exponentially weighted write rates, hottest first.
///
/// The eBPF tracker hooks the block:block_bio_queue tracepoint; the fallback
/// reads the same tracepoint through an ftrace instance. Needs root.
/// On a terminal a live top-N view refreshes every second.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example: edgeshift dirty --device /dev/loop3 --chunk-size 256KiB --duration 30 --json"
)]
pub struct Args {
    /// Block device to watch (repeat for several).
    #[arg(long, required = true)]
    device: Vec<PathBuf>,
    /// Chunk size: a power of two from 4KiB to 16MiB (4KiB, 256KiB, 4MiB, or bytes).
    #[arg(long, default_value_t = ChunkSize::DEFAULT)]
    chunk_size: ChunkSize,
    /// How long to watch, in seconds (fractions allowed).
    #[arg(long)]
    duration: f64,
    /// Print one JSON object: tracker, chunk_size, events, dropped and a
    /// `chunks` list of {device, index, writes, bytes, rate, temperature}.
    #[arg(long)]
    json: bool,
    /// Chunks shown in the live view; also limits the final list when given.
    #[arg(long)]
    top: Option<usize>,
    /// Which tracker: eBPF, the ftrace fallback, or auto (eBPF if it loads).
    #[arg(long, value_enum, default_value_t = TrackerChoice::Auto)]
    tracker: TrackerChoice,
    /// eBPF chunk counters to allocate (default: exactly the watched
    /// devices' chunk count). Writes past a device's size at start (it grew)
    /// are counted as dropped.
    #[arg(long)]
    capacity: Option<u32>,
    /// Half-life of the write rate's exponential smoothing, in seconds.
    #[arg(long, default_value_t = 5.0)]
    half_life: f64,
}

#[derive(serde::Serialize)]
struct JsonChunk {
    device: String,
    index: u64,
    writes: u64,
    bytes: u64,
    rate: f64,
    temperature: edgeshift_agent::dirty::Temperature,
}

#[derive(serde::Serialize)]
struct JsonReport {
    tracker: edgeshift_agent::dirty::TrackerKind,
    devices: Vec<String>,
    chunk_size: u64,
    duration_secs: f64,
    events: u64,
    dropped: u64,
    truncated: u64,
    chunks: Vec<JsonChunk>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !(args.duration.is_finite() && args.duration > 0.0) {
        anyhow::bail!("--duration must be a positive number of seconds");
    }
    if !(args.half_life.is_finite() && args.half_life > 0.0) {
        anyhow::bail!("--half-life must be a positive number of seconds");
    }
    let devices = args
        .device
        .iter()
        .map(|p| DeviceId::of_path(p).map(|d| (p.display().to_string(), d)))
        .collect::<Result<Vec<_>, _>>()?;
    let ids: Vec<DeviceId> = devices.iter().map(|(_, d)| *d).collect();
    let capacity = match args.capacity {
        Some(c) => c,
        None => capacity_for(&ids, args.chunk_size.bytes())?,
    };
    let tracker = open_tracker(args.tracker, args.chunk_size.bytes(), capacity)
        .context("starting the dirty tracker")?;
    let mut monitor = DirtyMonitor::new(
        tracker,
        RateConfig {
            half_life: Duration::from_secs_f64(args.half_life),
            ..RateConfig::default()
        },
    );
    for (path, dev) in &devices {
        monitor
            .tracker()
            .watch(*dev)
            .with_context(|| format!("watching {path} ({dev})"))?;
        tracing::info!(device = %path, dev = %dev, "watching");
    }

    let live = !args.json && std::io::stdout().is_terminal();
    let bar = (!live && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new((args.duration * 10.0) as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("watching {bar:40} {elapsed}/{duration} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.duration);
    let poll_every = Duration::from_millis(250);
    let mut last_view = start;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep(poll_every.min(end - now));
        monitor.poll().context("reading the dirty counters")?;
        if let Some(bar) = &bar {
            bar.set_position((start.elapsed().as_secs_f64() * 10.0) as u64);
            bar.set_message(format!("{} events", monitor.current().events));
        }
        if live && last_view.elapsed() >= Duration::from_secs(1) {
            last_view = Instant::now();
            let snap = monitor.current();
            let mut out = std::io::stdout().lock();
            // Clear the screen and home the cursor, then redraw.
            write!(out, "\x1b[2J\x1b[H")?;
            print_table(&mut out, &snap, &devices, Some(args.top.unwrap_or(10)))?;
            out.flush()?;
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let snap = monitor.snapshot().context("reading the dirty counters")?;
    if snap.dropped > 0 {
        tracing::warn!(
            dropped = snap.dropped,
            "some writes were not counted (device grew past its counters, or the fallback's buffer overran)"
        );
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let limit = args.top.unwrap_or(usize::MAX);
        let report = JsonReport {
            tracker: snap.tracker,
            devices: devices.iter().map(|(p, _)| p.clone()).collect(),
            chunk_size: snap.chunk_size,
            duration_secs: snap.elapsed_secs,
            events: snap.events,
            dropped: snap.dropped,
            truncated: snap.truncated,
            chunks: snap
                .hottest(limit)
                .iter()
                .map(|c| JsonChunk {
                    device: device_name(&devices, c.device),
                    index: c.index,
                    writes: c.writes,
                    bytes: c.bytes,
                    rate: c.rate,
                    temperature: c.temperature,
                })
                .collect(),
        };
        serde_json::to_writer(&mut out, &report)?;
        writeln!(out)?;
    } else {
        if live {
            write!(out, "\x1b[2J\x1b[H")?;
        }
        print_table(&mut out, &snap, &devices, args.top)?;
    }
    Ok(())
}

fn device_name(devices: &[(String, DeviceId)], dev: DeviceId) -> String {
    devices
        .iter()
        .find(|(_, d)| *d == dev)
        .map(|(p, _)| p.clone())
        .unwrap_or_else(|| dev.to_string())
}

fn print_table(
    out: &mut impl Write,
    snap: &Snapshot,
    devices: &[(String, DeviceId)],
    limit: Option<usize>,
) -> std::io::Result<()> {
    writeln!(
        out,
        "tracker {}  chunk size {}  {:.1}s  events {}  dropped {}  chunks written {}",
        snap.tracker,
        edgeshift_common::size::format_size(snap.chunk_size),
        snap.elapsed_secs,
        snap.events,
        snap.dropped,
        snap.chunks.len()
    )?;
    writeln!(
        out,
        "{:<14} {:>10} {:>14} {:>10} {:>14} {:>10}  temp",
        "device", "chunk", "offset", "writes", "bytes", "rate/s"
    )?;
    for c in snap.hottest(limit.unwrap_or(usize::MAX)) {
        writeln!(
            out,
            "{:<14} {:>10} {:>14} {:>10} {:>14} {:>10.3}  {:?}",
            device_name(devices, c.device),
            c.index,
            c.index * snap.chunk_size,
            c.writes,
            c.bytes,
            c.rate,
            c.temperature
        )?;
    }
    Ok(())
}
