//! `slice-bench`: how fast `edgeshift slice` is, and which chunk size to use.
//!
//! 1. Speed: a 1.5 GiB ext4 image of real files (perf/images/make-test-images.sh
//!    bench), page cache warm, timed side by side in one run, the order
//!    rotating every round: `b3sum` (the hashing limit), `casync make`,
//!    `edgeshift slice` into an empty store and again into the store that now
//!    holds every chunk, and `dd conv=fdatasync` of as many bytes as the empty
//!    store receives (the disk's limit for durable writes). Medians, and each
//!    one's ratio to b3sum's median.
//! 2. Chunk size: two derived 384 MiB images (dedup-base, dedup-derived) at
//!    4 KiB … 4 MiB: the bytes the store needs for both, the bytes the derived
//!    image adds to a store holding the base (what a migration sends), the
//!    manifest size, chunk files, and slicing speed.
//!
//! Prints the two target ratios (empty store ÷ dd, full store ÷ b3sum) and
//! writes `slice-bench.json` and `slice-bench.md` under `--out`; `--quick`
//! (3 rounds, no casync, no chunk-size table) to iterate.
//! Run: `cargo build --release -p edgeshift-agent && cargo run --release -p edgeshift-perf --bin slice-bench`

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "slice-bench",
    about = "Time edgeshift slice against b3sum and casync; chunk-size dedup table"
)]
struct Args {
    /// Rounds of the speed comparison (medians are reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Chunk size for the speed comparison.
    #[arg(long, default_value = "256KiB")]
    chunk_size: String,
    /// Skip the chunk-size table.
    #[arg(long)]
    no_dedup: bool,
    /// Skip the speed comparison.
    #[arg(long)]
    no_speed: bool,
    /// Fast iteration: 3 rounds, no casync, no chunk-size table (the two
    /// target ratios are still measured side by side).
    #[arg(long)]
    quick: bool,
    /// Scratch directory for stores (on the file system under test).
    #[arg(long, default_value = "target/slice-bench")]
    scratch: PathBuf,
    /// Where the JSON and markdown reports go.
    #[arg(long, default_value = "perf/reports/slice")]
    out: PathBuf,
}

fn edgeshift_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("edgeshift");
    if !bin.is_file() {
        bail!(
            "{} not found: build it first (cargo build --release -p edgeshift-agent)",
            bin.display()
        );
    }
    Ok(bin)
}

fn images(which: &str) -> anyhow::Result<PathBuf> {
    let out = Command::new("bash")
        .arg("perf/images/make-test-images.sh")
        .arg(which)
        .stderr(Stdio::inherit())
        .output()
        .context("run perf/images/make-test-images.sh (run slice-bench from the repository root)")?;
    if !out.status.success() {
        bail!("make-test-images.sh {which} failed");
    }
    let dir = String::from_utf8(out.stdout)?;
    Ok(PathBuf::from(dir.lines().last().unwrap_or_default()))
}

/// Runs a command to completion, failing loudly; returns (seconds, stdout).
fn timed(cmd: &mut Command) -> anyhow::Result<(f64, String)> {
    let started = Instant::now();
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("{cmd:?}"))?;
    let secs = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((secs, String::from_utf8(out.stdout)?))
}

/// Flushes dirty pages so one run's writeback does not land in the next.
fn settle() -> anyhow::Result<()> {
    let st = Command::new("sync").status()?;
    if !st.success() {
        bail!("sync failed");
    }
    Ok(())
}

fn warm(path: &Path) -> anyhow::Result<()> {
    let mut f = std::fs::File::open(path)?;
    std::io::copy(&mut f, &mut std::io::sink())?;
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

#[derive(Serialize)]
struct SpeedRow {
    tool: &'static str,
    what: &'static str,
    runs_s: Vec<f64>,
    median_s: f64,
    /// Median over rounds of (this tool's time / b3sum's time in the same
    /// round): pairs runs that saw the same machine load.
    ratio_to_b3sum: f64,
    /// median_s / b3sum's median_s, for reference.
    ratio_of_medians: f64,
    gib_per_s: f64,
}

#[derive(Serialize)]
struct Speed {
    image: PathBuf,
    image_bytes: u64,
    chunk_size: String,
    rounds: usize,
    read_mode: String,
    new_chunks: u64,
    new_bytes: u64,
    zero_chunks: u64,
    rows: Vec<SpeedRow>,
    /// Median over rounds of (empty-store slice / dd conv=fdatasync in the
    /// same round): the store's write path against the disk's.
    empty_store_to_dd: f64,
    /// The full-store slice's `ratio_to_b3sum`: read + hash + presence check
    /// against hashing alone.
    full_store_to_b3sum: f64,
    /// Targets (issue 25): empty store ≤ 1.3× dd, full store ≤ 1.2× b3sum.
    target_empty_store_to_dd: f64,
    target_full_store_to_b3sum: f64,
}

#[derive(Serialize)]
struct DedupRow {
    chunk_size: String,
    chunk_size_bytes: u64,
    base_unique_bytes: u64,
    derived_unique_bytes: u64,
    /// Bytes a store needs for both images.
    store_bytes_both: u64,
    /// Bytes the derived image adds to a store that holds the base.
    derived_new_bytes: u64,
    derived_new_chunks: u64,
    manifest_bytes: u64,
    chunk_files: u64,
    slice_empty_s: f64,
    slice_empty_mib_s: f64,
    reslice_s: f64,
    reslice_mib_s: f64,
}

#[derive(Serialize)]
struct Report {
    host_cpus: usize,
    loadavg_start: String,
    loadavg_end: String,
    speed: Option<Speed>,
    dedup: Vec<DedupRow>,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn json_line(stdout: &str) -> anyhow::Result<serde_json::Value> {
    let line = stdout.lines().next().context("slice --json printed nothing")?;
    Ok(serde_json::from_str(line)?)
}

fn speed(args: &Args, es: &Path) -> anyhow::Result<Speed> {
    let img = images("bench")?.join("bench.img");
    let size = std::fs::metadata(&img)?.len();
    let scratch = args.scratch.join("speed");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    warm(&img)?;
    warm(&img)?;
    let tools = [
        "b3sum",
        "casync make",
        "edgeshift slice (empty store)",
        "edgeshift slice (full store)",
        "dd conv=fdatasync",
    ];
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); tools.len()];
    let (mut read_mode, mut new_chunks, mut new_bytes, mut zero_chunks) = (String::new(), 0, 0, 0);
    for round in 0..args.rounds {
        let store = scratch.join(format!("store-{round}"));
        let castr = scratch.join(format!("casync-{round}.castr"));
        let caibx = scratch.join(format!("casync-{round}.caibx"));
        // Rotate which tool goes first; empty-store and full-store slices stay
        // in that order (the second needs the first's store).
        let order: Vec<usize> = {
            let base: &[usize] = if args.quick { &[0, 2, 4] } else { &[0, 1, 2, 4] };
            let mut o: Vec<usize> = (0..base.len()).map(|i| base[(i + round) % base.len()]).collect();
            let at = o.iter().position(|t| *t == 2).unwrap_or(0);
            o.insert(at + 1, 3);
            o
        };
        for t in order {
            settle()?;
            warm(&img)?;
            let secs = match t {
                0 => timed(Command::new("b3sum").arg("--no-names").arg(&img))?.0,
                1 => {
                    timed(
                        Command::new("casync")
                            .arg("make")
                            .arg(format!("--store={}", castr.display()))
                            .arg(&caibx)
                            .arg(&img),
                    )?
                    .0
                }
                2 | 3 => {
                    let (secs, out) = timed(
                        Command::new(es)
                            .arg("slice")
                            .arg(&img)
                            .arg("--store")
                            .arg(&store)
                            .arg("--chunk-size")
                            .arg(&args.chunk_size)
                            .arg("--json")
                            .env("RUST_LOG", "warn"),
                    )?;
                    let r = json_line(&out)?;
                    if t == 2 {
                        let field = |k: &str| r[k].as_u64().with_context(|| format!("no {k} in {out}"));
                        read_mode = r["read_mode"].as_str().context("no read_mode")?.to_string();
                        new_chunks = field("new_chunks")?;
                        new_bytes = field("new_bytes")?;
                        zero_chunks = field("zero_chunks")?;
                        if new_chunks == 0 {
                            bail!("the empty-store slice stored nothing: {out}");
                        }
                    } else if r["new_chunks"].as_u64() != Some(0) {
                        bail!("the full-store slice stored chunks: {out}");
                    }
                    secs
                }
                _ => {
                    // The disk's durable write speed for the bytes the empty
                    // store receives (round 0 runs it after the first slice,
                    // which measures that count).
                    let mib = (new_bytes.max(1 << 20) >> 20).to_string();
                    let dst = scratch.join("dd.out");
                    let secs = timed(
                        Command::new("dd")
                            .arg(format!("if={}", img.display()))
                            .arg(format!("of={}", dst.display()))
                            .args(["bs=1M", "conv=fdatasync", "status=none"])
                            .arg(format!("count={mib}")),
                    )?
                    .0;
                    std::fs::remove_file(&dst)?;
                    secs
                }
            };
            eprintln!("round {round}: {:<32} {secs:.3}s", tools[t]);
            runs[t].push(secs);
        }
    }
    // Every round's stores are deleted only now: on an ext4 without a
    // journal, files made within seconds to minutes of a large deletion pay
    // a scan past the freed inodes (docs/store.md), which would charge each
    // round after the first for the round before it.
    for round in 0..args.rounds {
        let _ = std::fs::remove_dir_all(scratch.join(format!("store-{round}")));
        let _ = std::fs::remove_dir_all(scratch.join(format!("casync-{round}.castr")));
        let _ = std::fs::remove_file(scratch.join(format!("casync-{round}.caibx")));
    }
    let b3 = median(&runs[0]);
    let b3_runs = runs[0].clone();
    let paired = |a: &[f64], b: &[f64]| median(&a.iter().zip(b).map(|(x, y)| x / y).collect::<Vec<_>>());
    let empty_store_to_dd = paired(&runs[2], &runs[4]);
    let full_store_to_b3sum = paired(&runs[3], &runs[0]);
    let whats = [
        "BLAKE3 of the whole image, all cores (the hashing limit)",
        "casync's content-defined chunking + chunk store (default settings)",
        "read + hash + write every new chunk durably",
        "read + hash + presence check (every chunk already stored)",
        "durable write of as many bytes as the empty store receives",
    ];
    let rows = tools
        .iter()
        .zip(whats)
        .zip(runs)
        .filter(|(_, runs_s)| !runs_s.is_empty())
        .map(|((tool, what), runs_s)| {
            let m = median(&runs_s);
            let paired: Vec<f64> = runs_s.iter().zip(&b3_runs).map(|(t, b)| t / b).collect();
            SpeedRow {
                tool,
                what,
                median_s: m,
                ratio_to_b3sum: median(&paired),
                ratio_of_medians: m / b3,
                gib_per_s: size as f64 / m / (1u64 << 30) as f64,
                runs_s,
            }
        })
        .collect();
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(Speed {
        image: img,
        image_bytes: size,
        chunk_size: args.chunk_size.clone(),
        rounds: args.rounds,
        read_mode,
        new_chunks,
        new_bytes,
        zero_chunks,
        rows,
        empty_store_to_dd,
        full_store_to_b3sum,
        target_empty_store_to_dd: 1.3,
        target_full_store_to_b3sum: 1.2,
    })
}

fn dedup(args: &Args, es: &Path) -> anyhow::Result<Vec<DedupRow>> {
    let dir = images("dedup")?;
    let (base, derived) = (dir.join("dedup-base.img"), dir.join("dedup-derived.img"));
    let size = std::fs::metadata(&base)?.len() as f64;
    let scratch = args.scratch.join("dedup");
    let mut rows = Vec::new();
    for cs in ["4KiB", "16KiB", "64KiB", "256KiB", "1MiB", "4MiB"] {
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)?;
        let store = scratch.join("store");
        let slice = |img: &Path| -> anyhow::Result<(f64, serde_json::Value, String)> {
            settle()?;
            warm(img)?;
            let (secs, out) = timed(
                Command::new(es)
                    .arg("slice")
                    .arg(img)
                    .arg("--store")
                    .arg(&store)
                    .arg("--chunk-size")
                    .arg(cs)
                    .arg("--json")
                    .env("RUST_LOG", "warn"),
            )?;
            let id = out.lines().last().unwrap_or_default().to_string();
            Ok((secs, json_line(&out)?, id))
        };
        let inspect = |id: &str| -> anyhow::Result<serde_json::Value> {
            let (_, out) = timed(
                Command::new(es)
                    .args(["inspect", id, "--json", "--store"])
                    .arg(&store),
            )?;
            Ok(serde_json::from_str(out.trim())?)
        };
        let (empty_s, _, id_b) = slice(&base)?;
        // Re-slicing is short and CPU-bound: median of three.
        let mut reslices = Vec::new();
        for _ in 0..3 {
            let (secs, again, _) = slice(&base)?;
            if again["new_chunks"].as_u64() != Some(0) {
                bail!("re-slicing the base stored new chunks at {cs}");
            }
            reslices.push(secs);
        }
        let reslice_s = median(&reslices);
        let (_, d, id_d) = slice(&derived)?;
        let (fb, fd) = (inspect(&id_b)?, inspect(&id_d)?);
        let u = |v: &serde_json::Value, k: &str| -> anyhow::Result<u64> {
            v[k].as_u64().with_context(|| format!("no {k} in {v}"))
        };
        let chunk_files = std::fs::read_dir(store.join("chunks"))?
            .flatten()
            .map(|fan| {
                std::fs::read_dir(fan.path())
                    .map(|e| e.count() as u64)
                    .unwrap_or(0)
            })
            .sum();
        let row = DedupRow {
            chunk_size: cs.to_string(),
            chunk_size_bytes: u(&fb, "chunk_size")?,
            base_unique_bytes: u(&fb, "unique_bytes")?,
            derived_unique_bytes: u(&fd, "unique_bytes")?,
            store_bytes_both: u(&fb, "unique_bytes")? + u(&d, "new_bytes")?,
            derived_new_bytes: u(&d, "new_bytes")?,
            derived_new_chunks: u(&d, "new_chunks")?,
            manifest_bytes: u(&fb, "manifest_bytes")?,
            chunk_files,
            slice_empty_s: empty_s,
            slice_empty_mib_s: size / empty_s / (1 << 20) as f64,
            reslice_s,
            reslice_mib_s: size / reslice_s / (1 << 20) as f64,
        };
        eprintln!(
            "{cs:>6}: derived adds {} MiB, manifest {} KiB, {:.0} MiB/s empty, {:.0} MiB/s re-slice",
            row.derived_new_bytes >> 20,
            row.manifest_bytes >> 10,
            row.slice_empty_mib_s,
            row.reslice_mib_s
        );
        rows.push(row);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(rows)
}

fn markdown(r: &Report) -> String {
    let mut s = String::from(
        "# slice-bench\n\nGenerated by `cargo run --release -p edgeshift-perf --bin slice-bench` ",
    );
    s += &format!(
        "on {} CPUs (load average at start: {}; at end: {}).\n\n",
        r.host_cpus, r.loadavg_start, r.loadavg_end
    );
    if let Some(sp) = &r.speed {
        s += &format!(
            "## Slicing a {:.1} GiB ext4 image of real files (page cache warm)\n\n\
             Chunk size {}, {} rounds, medians; reads: {}. The empty store receives {} chunks, {} MiB ({} zero chunks are not stored).\n\n\
             \"× b3sum\" is the median of the per-round ratios (each run against b3sum's run in the same round, \
             so both saw the same load from other work on the machine).\n\n\
             | tool | what | median s | × b3sum | GiB/s | runs (s) |\n|---|---|---:|---:|---:|---|\n",
            sp.image_bytes as f64 / (1u64 << 30) as f64,
            sp.chunk_size,
            sp.rounds,
            sp.read_mode,
            sp.new_chunks,
            sp.new_bytes >> 20,
            sp.zero_chunks
        );
        for row in &sp.rows {
            s += &format!(
                "| {} | {} | {:.3} | {:.2} | {:.2} | {} |\n",
                row.tool,
                row.what,
                row.median_s,
                row.ratio_to_b3sum,
                row.gib_per_s,
                row.runs_s
                    .iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        s += &format!("\n{}\n\n", verdict(sp));
    }
    if !r.dedup.is_empty() {
        s += "## Chunk size: two derived 384 MiB ext4 images\n\n\
              | chunk size | store bytes for both (MiB) | derived adds to base (MiB) | derived adds (chunks) | manifest (KiB) | chunk files | slice, empty store (MiB/s) | re-slice (MiB/s) |\n\
              |---:|---:|---:|---:|---:|---:|---:|---:|\n";
        for d in &r.dedup {
            s += &format!(
                "| {} | {:.1} | {:.1} | {} | {:.1} | {} | {:.0} | {:.0} |\n",
                d.chunk_size,
                d.store_bytes_both as f64 / (1 << 20) as f64,
                d.derived_new_bytes as f64 / (1 << 20) as f64,
                d.derived_new_chunks,
                d.manifest_bytes as f64 / 1024.0,
                d.chunk_files,
                d.slice_empty_mib_s,
                d.reslice_mib_s
            );
        }
    }
    s
}

/// The two target ratios, each median of per-round pairs, and the targets.
fn verdict(sp: &Speed) -> String {
    let met = |r: f64, t: f64| if r <= t { "met" } else { "**not met**" };
    format!(
        "Targets (issue 25): slicing into an empty store {:.2}× `dd conv=fdatasync` of the bytes it stores \
         (target ≤ {}×: {}); re-slicing into a full store {:.2}× b3sum (target ≤ {}×: {}). \
         Each the median of per-round ratios.",
        sp.empty_store_to_dd,
        sp.target_empty_store_to_dd,
        met(sp.empty_store_to_dd, sp.target_empty_store_to_dd),
        sp.full_store_to_b3sum,
        sp.target_full_store_to_b3sum,
        met(sp.full_store_to_b3sum, sp.target_full_store_to_b3sum),
    )
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.rounds = args.rounds.min(3);
        args.no_dedup = true;
    }
    let es = edgeshift_bin()?;
    let mut report = Report {
        host_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
        speed: None,
        dedup: Vec::new(),
    };
    if !args.no_speed {
        let sp = speed(&args, &es)?;
        eprintln!("{}", verdict(&sp));
        report.speed = Some(sp);
    }
    if !args.no_dedup {
        report.dedup = dedup(&args, &es)?;
    }
    report.loadavg_end = loadavg();
    std::fs::create_dir_all(&args.out)?;
    let md = markdown(&report);
    std::fs::write(
        args.out.join("slice-bench.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("slice-bench.md"), &md)?;
    println!("{md}");
    Ok(())
}
