//! `dirty-bench`: what the dirty tracker costs and how many events it keeps up with.
//!
//! 1. Overhead: fio 4 KiB random direct writes (io_uring, iodepth 32) to a
//!    loop device over a tmpfs file, alternating in one run between no
//!    tracker, the eBPF tracker and the ftrace fallback (the order rotates
//!    every round so no mode always runs first); IOPS lost = 1 − median
//!    tracked IOPS / median untracked IOPS.
//! 2. Events per second: the heaviest load this machine generates (one fio
//!    job per CPU, iodepth 32, 4 KiB chunks so nearly every write is a new
//!    map key) with the eBPF tracker: events/s seen, dropped (must be 0), and
//!    the program's own cost per event from the kernel's BPF run-time stats;
//!    the fallback under rising load until its ring buffer loses events.
//!
//! Writes `dirty-bench.json` and `dirty-bench.md` under `--out`. Needs root.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use edgeshift_agent::dirty::{
    capacity_for, DeviceId, DirtyMonitor, DirtyTracker, EbpfTracker, FtraceTracker, RateConfig,
};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "dirty-bench",
    about = "Measure the dirty tracker: IOPS lost under fio and events/s before drops"
)]
struct Args {
    /// Rounds of (none, eBPF, fallback) fio runs for the overhead figure.
    #[arg(long, default_value_t = 15)]
    rounds: usize,
    /// Seconds per fio run.
    #[arg(long, default_value_t = 2)]
    seconds: u64,
    /// Size of the tmpfs-backed loop device, in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Chunk size for the overhead runs, in KiB.
    #[arg(long, default_value_t = 256)]
    chunk_kib: u64,
    /// How often the agent-style poller reads the counters, in ms.
    #[arg(long, default_value_t = 1000)]
    poll_ms: u64,
    /// Where the JSON and markdown reports go.
    #[arg(long, default_value = "perf/reports/dirty")]
    out: PathBuf,
}

/// A scratch dir on tmpfs with a loop device over a file in it; both go on drop.
struct LoopOnTmpfs {
    dir: PathBuf,
    dev: PathBuf,
}

impl LoopOnTmpfs {
    fn new(size: u64, name: &str) -> anyhow::Result<Self> {
        let dir = PathBuf::from(format!(
            "/dev/shm/edgeshift-dirty-bench-{}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let img = dir.join("disk.img");
        File::create(&img)
            .and_then(|f| f.set_len(size))
            .with_context(|| format!("creating {}", img.display()))?;
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&img)
            .output()
            .context("running losetup")?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            bail!("losetup: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Ok(LoopOnTmpfs { dir, dev })
    }
}

impl Drop for LoopOnTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct FioResult {
    iops: f64,
    /// fio's own CPU time (user + system) per write, in µs: the tracepoint
    /// and the BPF program run in the submitting thread, so this shows the
    /// tracker's cost even when other work on the machine skews IOPS.
    cpu_us_per_io: f64,
    total_ios: u64,
    runtime_s: f64,
}

fn fio(dev: &Path, seconds: u64, jobs: usize, iodepth: u32) -> anyhow::Result<FioResult> {
    let out = Command::new("fio")
        .arg("--name=dirty-bench")
        .arg(format!("--filename={}", dev.display()))
        .args([
            "--rw=randwrite",
            "--bs=4k",
            "--direct=1",
            "--ioengine=io_uring",
            "--time_based",
            "--group_reporting",
            "--randrepeat=0",
            "--output-format=json",
        ])
        .arg(format!("--iodepth={iodepth}"))
        .arg(format!("--numjobs={jobs}"))
        .arg(format!("--runtime={seconds}"))
        .output()
        .context("running fio (apt-get install fio)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("reading fio's JSON output")?;
    let job = &v["jobs"][0];
    let write = &job["write"];
    let (Some(iops), Some(total_ios), Some(runtime_ms)) = (
        write["iops"].as_f64(),
        write["total_ios"].as_u64(),
        job["job_runtime"].as_f64(),
    ) else {
        bail!("fio's JSON lacks write.iops/total_ios/job_runtime");
    };
    let cpu_pct = job["usr_cpu"].as_f64().unwrap_or(0.0) + job["sys_cpu"].as_f64().unwrap_or(0.0);
    // With --group_reporting job_runtime sums the jobs' runtimes.
    let cpu_s = cpu_pct / 100.0 * runtime_ms / 1000.0;
    Ok(FioResult {
        iops,
        cpu_us_per_io: if total_ios > 0 {
            cpu_s * 1e6 / total_ios as f64
        } else {
            f64::NAN
        },
        total_ios,
        runtime_s: runtime_ms / 1000.0 / jobs as f64,
    })
}

/// Runs fio while `monitor` watches `dev`, polled every `poll` as the agent
/// would; returns fio's result and the final snapshot's (events, dropped).
fn fio_tracked(
    poll: Duration,
    monitor: DirtyMonitor,
    dev: &Path,
    seconds: u64,
    jobs: usize,
    iodepth: u32,
) -> anyhow::Result<(FioResult, DirtyMonitor, u64, u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let stop = stop.clone();
        let mut monitor = monitor;
        std::thread::spawn(move || -> anyhow::Result<DirtyMonitor> {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(poll);
                monitor.poll()?;
            }
            Ok(monitor)
        })
    };
    let result = fio(dev, seconds, jobs, iodepth);
    stop.store(true, Ordering::Relaxed);
    let mut monitor = poller
        .join()
        .map_err(|_| anyhow::anyhow!("poller thread panicked"))??;
    let snap = monitor.snapshot()?;
    Ok((result?, monitor, snap.events, snap.dropped))
}

#[derive(Serialize, Default)]
struct ModeRuns {
    iops: Vec<f64>,
    cpu_us_per_io: Vec<f64>,
    events: Vec<u64>,
    fio_ios: Vec<u64>,
    dropped: Vec<u64>,
}

#[derive(Serialize)]
struct LoadPoint {
    tracker: &'static str,
    jobs: usize,
    iodepth: u32,
    chunk_size: u64,
    capacity: Option<u32>,
    fio_iops: f64,
    fio_ios: u64,
    events: u64,
    events_per_sec: f64,
    dropped: u64,
    /// eBPF only: nanoseconds of program run time per event (kernel stats).
    ns_per_event: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    /// /proc/loadavg before and after: other work on the machine makes the
    /// IOPS figures noisy, and this says how much there was.
    loadavg_before: String,
    /// Right after the overhead rounds (the bench itself adds about 2: fio
    /// and the loop device's worker).
    loadavg_after_overhead: String,
    loadavg_after: String,
    kernel: String,
    cpus: usize,
    rounds: usize,
    seconds_per_run: u64,
    device_mib: u64,
    chunk_size: u64,
    baseline: ModeRuns,
    ebpf: ModeRuns,
    fallback: ModeRuns,
    baseline_median_iops: f64,
    ebpf_median_iops: f64,
    fallback_median_iops: f64,
    ebpf_iops_lost_pct: f64,
    fallback_iops_lost_pct: f64,
    ebpf_paired_lost_pct: Vec<f64>,
    ebpf_paired_lost_median_pct: f64,
    /// The target for `ebpf_iops_lost_pct`, in percent.
    target_lost_pct: f64,
    /// Spread of the untracked runs: median absolute deviation of their
    /// IOPS over their median, in percent. Other work on the machine shows
    /// here first; above `MAX_BASELINE_SPREAD_PCT` the comparison cannot
    /// resolve a 2 % effect.
    baseline_spread_pct: f64,
    /// Whether any of [`noise_reasons`] held: other work on the machine,
    /// or a baseline spread too wide.
    busy: bool,
    /// Extra fio CPU time per write with the tracker, relative to none
    /// (medians), in percent.
    ebpf_cpu_per_io_extra_pct: f64,
    fallback_cpu_per_io_extra_pct: f64,
    load: Vec<LoadPoint>,
    ebpf_max_events_per_sec_without_drops: f64,
    ebpf_first_drop_events_per_sec: Option<f64>,
    /// Worst program run time per event seen in the ramp (kernel stats).
    ebpf_worst_ns_per_event: Option<f64>,
    /// Program run time per event at the overhead runs' chunk size, on the
    /// watched device (median of `ebpf_ns_per_event_runs`).
    ebpf_ns_per_event_overhead_config: Option<f64>,
    ebpf_ns_per_event_runs: Vec<f64>,
    /// The same with the tracker watching another device: the reject path
    /// every unwatched device's bios take.
    ebpf_ns_per_event_unwatched: Option<f64>,
    ebpf_ns_per_event_unwatched_runs: Vec<f64>,
    poll_ms: u64,
    fallback_max_events_per_sec_without_drops: f64,
    fallback_first_drop_events_per_sec: Option<f64>,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The 1-minute load average of a /proc/loadavg line.
/// The noise conditions that held, in words (none: a quiet machine; the
/// report's `busy` flag): load above 0.5 before the run, above 3 after the
/// overhead rounds (where this bench alone adds about 2), or the untracked
/// runs' IOPS spread too wide to resolve a 2 % effect. A spread alone
/// (nothing else running) reads differently from a loaded host.
fn noise_reasons(
    loadavg_before: &str,
    loadavg_after_overhead: &str,
    baseline_spread_pct: f64,
) -> Vec<String> {
    let mut why = Vec::new();
    if load1(loadavg_before) > 0.5 {
        why.push(format!(
            "1-minute load {:.2} before the run, above 0.5",
            load1(loadavg_before)
        ));
    }
    if load1(loadavg_after_overhead) > 3.0 {
        why.push(format!(
            "1-minute load {:.2} after the overhead rounds, above 3",
            load1(loadavg_after_overhead)
        ));
    }
    if baseline_spread_pct.is_nan() || baseline_spread_pct > MAX_BASELINE_SPREAD_PCT {
        why.push(format!(
            "the untracked runs' IOPS spread {baseline_spread_pct:.1} % (median absolute deviation), above {MAX_BASELINE_SPREAD_PCT} %"
        ));
    }
    why
}

/// [`noise_reasons`] of a report.
fn report_noise(r: &Report) -> Vec<String> {
    noise_reasons(
        &r.loadavg_before,
        &r.loadavg_after_overhead,
        r.baseline_spread_pct,
    )
}

fn load1(line: &str) -> f64 {
    line.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Most IOPS the eBPF tracker may cost (issue 5), in percent.
const TARGET_LOST_PCT: f64 = 2.0;

/// Widest spread of the untracked runs (see `Report::baseline_spread_pct`)
/// at which the machine counts as quiet; an idle run here showed 1.3 %.
const MAX_BASELINE_SPREAD_PCT: f64 = 2.0;

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn new_monitor(tracker: Box<dyn DirtyTracker>, dev: DeviceId) -> anyhow::Result<DirtyMonitor> {
    let mut m = DirtyMonitor::new(tracker, RateConfig::default());
    m.tracker().watch(dev)?;
    Ok(m)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("dirty-bench needs root (loop devices, BPF, tracefs)");
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let loadavg_before = loadavg();
    let loopdev = LoopOnTmpfs::new(args.size_mib << 20, "main")?;
    let dev = DeviceId::of_path(&loopdev.dev)?;
    let chunk = args.chunk_kib << 10;
    let poll = Duration::from_millis(args.poll_ms.max(1));
    eprintln!(
        "dirty-bench: {} over tmpfs, {} rounds × 3 modes × {} s",
        loopdev.dev.display(),
        args.rounds,
        args.seconds
    );

    // Warm-up: tmpfs pages get allocated on first write; do not let the
    // first measured mode pay for that.
    fio(&loopdev.dev, args.seconds, 1, 32)?;

    let (mut base, mut ebpf, mut fb) = (ModeRuns::default(), ModeRuns::default(), ModeRuns::default());
    for round in 0..args.rounds {
        for k in 0..3 {
            match (round + k) % 3 {
                0 => {
                    let r = fio(&loopdev.dev, args.seconds, 1, 32)?;
                    eprintln!("round {round}: none     {:>9.0} IOPS", r.iops);
                    base.iops.push(r.iops);
                    base.cpu_us_per_io.push(r.cpu_us_per_io);
                    base.fio_ios.push(r.total_ios);
                }
                1 => {
                    let m = new_monitor(
                        Box::new(EbpfTracker::new(chunk, capacity_for(&[dev], chunk)?)?),
                        dev,
                    )?;
                    let (r, _, events, dropped) = fio_tracked(poll, m, &loopdev.dev, args.seconds, 1, 32)?;
                    eprintln!(
                        "round {round}: ebpf     {:>9.0} IOPS ({events} events, {dropped} dropped)",
                        r.iops
                    );
                    ebpf.iops.push(r.iops);
                    ebpf.cpu_us_per_io.push(r.cpu_us_per_io);
                    ebpf.fio_ios.push(r.total_ios);
                    ebpf.events.push(events);
                    ebpf.dropped.push(dropped);
                }
                _ => {
                    let m = new_monitor(Box::new(FtraceTracker::new(chunk)?), dev)?;
                    let (r, _, events, dropped) = fio_tracked(poll, m, &loopdev.dev, args.seconds, 1, 32)?;
                    eprintln!(
                        "round {round}: fallback {:>9.0} IOPS ({events} events, {dropped} dropped)",
                        r.iops
                    );
                    fb.iops.push(r.iops);
                    fb.cpu_us_per_io.push(r.cpu_us_per_io);
                    fb.fio_ios.push(r.total_ios);
                    fb.events.push(events);
                    fb.dropped.push(dropped);
                }
            }
        }
    }
    let loadavg_after_overhead = loadavg();
    let (mb, me, mf) = (median(&base.iops), median(&ebpf.iops), median(&fb.iops));
    let paired: Vec<f64> = base
        .iops
        .iter()
        .zip(&ebpf.iops)
        .map(|(b, e)| (1.0 - e / b) * 100.0)
        .collect();

    // Events per second: both trackers under rising load (fio jobs × iodepth
    // 32), 4 KiB chunks so nearly every write lands in a chunk of its own.
    let mut load = Vec::new();
    let ramp = [1, cpus, cpus * 2, cpus * 4];
    {
        // Kernel run-time statistics only while this is held, so the
        // overhead runs above did not pay for them.
        let _stats =
            aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF run-time statistics")?;
        for jobs in ramp {
            let tracker = EbpfTracker::new(4096, capacity_for(&[dev], 4096)?)?;
            let prog_id = tracker.kernel_ids().0;
            let m = new_monitor(Box::new(tracker), dev)?;
            let (r, m, events, dropped) = fio_tracked(poll, m, &loopdev.dev, args.seconds, jobs, 32)?;
            let ns = ebpf_ns_per_event(prog_id);
            drop(m);
            eprintln!(
                "ebpf {jobs} jobs: {:.0} events/s, {dropped} dropped, {} ns/event",
                events as f64 / r.runtime_s,
                ns.map_or("?".into(), |n| format!("{n:.0}"))
            );
            load.push(LoadPoint {
                tracker: "ebpf",
                jobs,
                iodepth: 32,
                chunk_size: 4096,
                capacity: Some(capacity_for(&[dev], 4096)?),
                fio_iops: r.iops,
                fio_ios: r.total_ios,
                events,
                events_per_sec: events as f64 / r.runtime_s,
                dropped,
                ns_per_event: ns,
            });
        }
    }
    // The program's cost per event in the overhead runs' set-up (one job,
    // the overhead chunk size: mostly updates of chunks already in the map).
    // Several runs, median: one run's figure moves with whatever else the
    // machine does. "Unwatched": the tracker watches another device, so
    // every fio bio takes the reject path, which is what every other
    // device on the host pays.
    let (ebpf_ns_runs, ebpf_ns_unwatched_runs) = {
        let _stats =
            aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF run-time statistics")?;
        let other = LoopOnTmpfs::new(1 << 20, "other")?;
        let other_dev = DeviceId::of_path(&other.dev)?;
        let (mut watched, mut unwatched) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds.clamp(1, 5) {
            for (target, runs) in [(dev, &mut watched), (other_dev, &mut unwatched)] {
                let tracker = EbpfTracker::new(chunk, capacity_for(&[target], chunk)?)?;
                let prog_id = tracker.kernel_ids().0;
                let m = new_monitor(Box::new(tracker), target)?;
                let (_, m, _, _) = fio_tracked(poll, m, &loopdev.dev, args.seconds, 1, 32)?;
                let ns = ebpf_ns_per_event(prog_id);
                drop(m);
                eprintln!(
                    "ebpf {} KiB chunks, device {}: {} ns/event",
                    chunk >> 10,
                    if target == dev { "watched" } else { "not watched" },
                    ns.map_or("?".into(), |n| format!("{n:.0}"))
                );
                runs.extend(ns);
            }
        }
        (watched, unwatched)
    };
    let ebpf_ns_overhead_config = (!ebpf_ns_runs.is_empty()).then(|| median(&ebpf_ns_runs));
    let ebpf_ns_unwatched = (!ebpf_ns_unwatched_runs.is_empty()).then(|| median(&ebpf_ns_unwatched_runs));
    for jobs in ramp {
        let m = new_monitor(Box::new(FtraceTracker::new(4096)?), dev)?;
        let (r, _, events, dropped) = fio_tracked(poll, m, &loopdev.dev, args.seconds, jobs, 32)?;
        eprintln!(
            "fallback {jobs} jobs: {:.0} events/s, {dropped} dropped",
            events as f64 / r.runtime_s
        );
        load.push(LoadPoint {
            tracker: "fallback",
            jobs,
            iodepth: 32,
            chunk_size: 4096,
            capacity: None,
            fio_iops: r.iops,
            fio_ios: r.total_ios,
            events,
            events_per_sec: events as f64 / r.runtime_s,
            dropped,
            ns_per_event: None,
        });
    }
    let best_without_drops = |tracker: &str| {
        load.iter()
            .filter(|p| p.tracker == tracker && p.dropped == 0)
            .map(|p| p.events_per_sec)
            .fold(0.0, f64::max)
    };
    let first_drop = |tracker: &str| {
        load.iter()
            .filter(|p| p.tracker == tracker && p.dropped > 0)
            .map(|p| p.events_per_sec)
            .reduce(f64::min)
    };
    let ebpf_max_clean = best_without_drops("ebpf");
    let fallback_max_clean = best_without_drops("fallback");
    let ebpf_first_drop = first_drop("ebpf");
    let fallback_first_drop = first_drop("fallback");
    let ebpf_ns = load.iter().filter_map(|p| p.ns_per_event).reduce(f64::max);

    let paired_median = median(&paired);
    let baseline_spread_pct = {
        let deviations: Vec<f64> = base.iops.iter().map(|i| (i - mb).abs()).collect();
        median(&deviations) / mb * 100.0
    };
    let busy = !noise_reasons(&loadavg_before, &loadavg_after_overhead, baseline_spread_pct).is_empty();
    let report = Report {
        baseline_spread_pct,
        busy,
        loadavg_before,
        loadavg_after_overhead,
        loadavg_after: loadavg(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        cpus,
        rounds: args.rounds,
        seconds_per_run: args.seconds,
        device_mib: args.size_mib,
        chunk_size: chunk,
        baseline_median_iops: mb,
        ebpf_median_iops: me,
        fallback_median_iops: mf,
        ebpf_iops_lost_pct: (1.0 - me / mb) * 100.0,
        fallback_iops_lost_pct: (1.0 - mf / mb) * 100.0,
        ebpf_paired_lost_pct: paired,
        ebpf_paired_lost_median_pct: paired_median,
        target_lost_pct: TARGET_LOST_PCT,
        ebpf_cpu_per_io_extra_pct: (median(&ebpf.cpu_us_per_io) / median(&base.cpu_us_per_io) - 1.0) * 100.0,
        fallback_cpu_per_io_extra_pct: (median(&fb.cpu_us_per_io) / median(&base.cpu_us_per_io) - 1.0)
            * 100.0,
        baseline: base,
        ebpf,
        fallback: fb,
        load,
        ebpf_max_events_per_sec_without_drops: ebpf_max_clean,
        ebpf_first_drop_events_per_sec: ebpf_first_drop,
        ebpf_worst_ns_per_event: ebpf_ns,
        ebpf_ns_per_event_overhead_config: ebpf_ns_overhead_config,
        ebpf_ns_per_event_runs: ebpf_ns_runs,
        ebpf_ns_per_event_unwatched: ebpf_ns_unwatched,
        ebpf_ns_per_event_unwatched_runs: ebpf_ns_unwatched_runs,
        poll_ms: args.poll_ms,
        fallback_max_events_per_sec_without_drops: fallback_max_clean,
        fallback_first_drop_events_per_sec: fallback_first_drop,
    };
    std::fs::create_dir_all(&args.out)?;
    let json = args.out.join("dirty-bench.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
    let md = args.out.join("dirty-bench.md");
    std::fs::write(&md, markdown(&report))?;
    println!("{}", markdown(&report));
    eprintln!("wrote {} and {}", json.display(), md.display());
    Ok(())
}

/// The program's run time per run from the kernel's BPF statistics
/// (counted only while `enable_stats` is held), found by program id.
fn ebpf_ns_per_event(prog_id: u32) -> Option<f64> {
    aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == prog_id)
        .filter(|p| p.run_count() > 0)
        .map(|p| p.run_time().as_nanos() as f64 / p.run_count() as f64)
}

fn markdown(r: &Report) -> String {
    let mut s = String::new();
    s.push_str("# Dirty tracker: overhead and event rate\n\n");
    let verdict =
        if r.ebpf_iops_lost_pct <= r.target_lost_pct && r.ebpf_paired_lost_median_pct <= r.target_lost_pct {
            "met"
        } else {
            "**not met**"
        };
    s.push_str(&format!(
        "**Summary.** fio IOPS without a tracker {:.0} and with the eBPF tracker {:.0} (medians): \
         **{:.2} % lost**; median of the per-round paired losses **{:.2} %**; target ≤ {:.0} %: {}. \
         The BPF program runs {} per event on the watched device and {} per bio of a device \
         it does not watch (kernel BPF run-time stats, medians, {} KiB chunks). \
         Sustained {:.0} events/s with nothing dropped. Machine {} during the overhead rounds \
         (load average before `{}`, after them `{}`; untracked runs spread {:.1} %).\n\n",
        r.baseline_median_iops,
        r.ebpf_median_iops,
        r.ebpf_iops_lost_pct,
        r.ebpf_paired_lost_median_pct,
        r.target_lost_pct,
        verdict,
        r.ebpf_ns_per_event_overhead_config
            .map_or("? ns".into(), |n| format!("{n:.0} ns")),
        r.ebpf_ns_per_event_unwatched
            .map_or("? ns".into(), |n| format!("{n:.0} ns")),
        r.chunk_size >> 10,
        r.ebpf_max_events_per_sec_without_drops,
        if r.busy {
            format!("**noisy** ({})", report_noise(r).join("; "))
        } else {
            "quiet".into()
        },
        r.loadavg_before,
        r.loadavg_after_overhead,
        r.baseline_spread_pct,
    ));
    s.push_str(&format!(
        "Kernel {}, {} CPUs. fio 4 KiB random writes, direct, io_uring, iodepth 32, one job, \
         to a {} MiB loop device over tmpfs; {} rounds of {} s per mode, modes alternated \
         (order rotated per round); chunk size {} KiB; the agent-style poller reads the \
         counters every {} ms; the eBPF program costs {} per event here (kernel BPF stats). \
         Reproduce: `cargo build --release -p edgeshift-perf --bin dirty-bench && \
         sudo target/release/dirty-bench --rounds {} --seconds {}`.\n\n",
        r.kernel,
        r.cpus,
        r.device_mib,
        r.rounds,
        r.seconds_per_run,
        r.chunk_size >> 10,
        r.poll_ms,
        r.ebpf_ns_per_event_overhead_config
            .map_or("?".into(), |n| format!("{n:.0} ns")),
        r.rounds,
        r.seconds_per_run,
    ));
    s.push_str("| mode | median IOPS | IOPS lost | runs (IOPS) | events = fio writes? | dropped |\n");
    s.push_str("| --- | ---: | ---: | --- | --- | ---: |\n");
    let runs = |m: &ModeRuns| {
        m.iops
            .iter()
            .map(|i| format!("{i:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let seen = |m: &ModeRuns| {
        if m.events.is_empty() {
            "–".to_string()
        } else {
            m.events
                .iter()
                .zip(&m.fio_ios)
                .map(|(e, f)| format!("{e}/{f}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    s.push_str(&format!(
        "| none | {:.0} | – | {} | – | – |\n",
        r.baseline_median_iops,
        runs(&r.baseline)
    ));
    s.push_str(&format!(
        "| eBPF | {:.0} | {:.2} % | {} | {} | {} |\n",
        r.ebpf_median_iops,
        r.ebpf_iops_lost_pct,
        runs(&r.ebpf),
        seen(&r.ebpf),
        r.ebpf.dropped.iter().sum::<u64>()
    ));
    s.push_str(&format!(
        "| fallback (ftrace) | {:.0} | {:.2} % | {} | {} | {} |\n\n",
        r.fallback_median_iops,
        r.fallback_iops_lost_pct,
        runs(&r.fallback),
        seen(&r.fallback),
        r.fallback.dropped.iter().sum::<u64>()
    ));
    s.push_str(&format!(
        "Machine load (/proc/loadavg) before: `{}`, after the overhead rounds: `{}` \
         (fio and the loop worker add about 2), at the end: `{}`.\n\n",
        r.loadavg_before, r.loadavg_after_overhead, r.loadavg_after
    ));
    if r.busy {
        s.push_str(&format!(
            "**Caveat:** the machine was noisy during the overhead rounds ({}; this \
                 bench alone adds about 2 to the load), so run-to-run IOPS swing more than \
                 the effect being measured and the IOPS-lost figures above are not \
                 trustworthy to ±2 %. The BPF cost per event (kernel run-time stats) and \
                 fio's CPU time per write are the steadier figures.\n\n",
            report_noise(r).join("; ")
        ));
    }
    s.push_str(&format!(
        "fio CPU time per write (median µs, user + system): none {:.2}, eBPF {:.2} ({:+.2} %), \
         fallback {:.2} ({:+.2} %).\n\n",
        median(&r.baseline.cpu_us_per_io),
        median(&r.ebpf.cpu_us_per_io),
        r.ebpf_cpu_per_io_extra_pct,
        median(&r.fallback.cpu_us_per_io),
        r.fallback_cpu_per_io_extra_pct,
    ));
    s.push_str(&format!(
        "Median of the per-round paired losses: {:.2} %.\n",
        median(&r.ebpf_paired_lost_pct)
    ));
    s.push_str(&format!(
        "eBPF IOPS lost per round (paired with the same round's untracked run): {}\n\n",
        r.ebpf_paired_lost_pct
            .iter()
            .map(|p| format!("{p:.2} %"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    s.push_str("## Events per second\n\n");
    s.push_str("| tracker | fio jobs × iodepth | chunk | map capacity | events | events/s | dropped | BPF ns/event |\n");
    s.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for p in &r.load {
        s.push_str(&format!(
            "| {} | {} × {} | {} KiB | {} | {} | {:.0} | {} | {} |\n",
            p.tracker,
            p.jobs,
            p.iodepth,
            p.chunk_size >> 10,
            p.capacity.map_or("–".into(), |c| c.to_string()),
            p.events,
            p.events_per_sec,
            p.dropped,
            p.ns_per_event.map_or("–".into(), |n| format!("{n:.0}"))
        ));
    }
    s.push('\n');
    let drop_at = |d: Option<f64>| {
        d.map_or("no drop at any load this machine generated".to_string(), |e| {
            format!("first drops at {e:.0} events/s")
        })
    };
    s.push_str(&format!(
        "eBPF: {:.0} events/s with nothing dropped ({}); the program costs {} per event, \
         so on its own it would keep up with about {} events/s per CPU. \
         Fallback (ftrace text): {:.0} events/s with nothing dropped ({}). \
         The eBPF counters are an array with a slot per chunk, so no load makes it drop; \
         only writes past a device's size at watch time are dropped (and counted).\n",
        r.ebpf_max_events_per_sec_without_drops,
        drop_at(r.ebpf_first_drop_events_per_sec),
        r.ebpf_worst_ns_per_event
            .map_or("an unknown time".into(), |n| format!("{n:.0} ns")),
        r.ebpf_worst_ns_per_event
            .map_or("?".into(), |n| format!("{:.0}", 1e9 / n)),
        r.fallback_max_events_per_sec_without_drops,
        drop_at(r.fallback_first_drop_events_per_sec),
    ));
    s
}
