//! `edgeshift migrate NAME --to EDGE`: hand a running VM over to another edge.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use edgeshift_agent::migrate::report::Phase;
use edgeshift_agent::migrate::source::DiskHandoff;
use edgeshift_agent::migrate::temperature::Ordering;
use edgeshift_agent::migrate::{self, MigrateOptions};
use edgeshift_agent::vm::MemoryTransport;

use crate::cli::args::{ClusterArgs, CoordinatorArgs, StateArgs};

/// Hand a running VM over to another edge.
///
/// Its disk moves as the chunks the destination lacks (pulled from every
/// holder at once, coldest first), its memory by QEMU live migration, the
/// last dirty chunks in the switchover pause. On any failure before the switchover the VM keeps running here.
///
/// With --coordinator, before anything moves this edge (its id at the
/// coordinator is --id, as for its `edgeshift agent`) reports the live
/// disk's chunks to it (so its plan can name this edge for what the VM
/// wrote), and after the switchover drops this edge's reference to the
/// image (its chunks stay cached until the policy evicts them). If it
/// cannot be reached before the start, the migration fails and the VM keeps
/// running here. Whether the destination's sources come from the
/// coordinator is the destination agent's --coordinator; without it, it
/// pulls from --source-addr and the --peer list.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The VM to move (see `edgeshift vm list`).
    name: String,
    /// The destination agent's migration address (its `edgeshift agent
    /// --migrate-listen`), HOST:PORT.
    #[arg(long)]
    to: String,
    /// This edge's chunk server (`edgeshift agent --listen`) as the
    /// destination reaches it (IP:PORT): the live disk's chunks come from it.
    #[arg(long = "source-addr")]
    source_addr: String,
    /// Another edge's chunk server holding chunks of the image (IP:PORT,
    /// repeatable): used when the destination has no coordinator, and for
    /// chunks its plan does not name.
    #[arg(long = "peer")]
    peers: Vec<String>,
    #[command(flatten)]
    coord: CoordinatorArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// cold-first (by observed write rate, hottest in the pause) or index.
    #[arg(long, value_enum, default_value = "cold-first")]
    order: Ordering,
    /// Most pre-copy rounds after the first.
    #[arg(long, default_value_t = 6)]
    max_rounds: u32,
    /// End pre-copy once a round needs at most this many chunks.
    #[arg(long, default_value_t = 8)]
    converge_chunks: usize,
    /// QEMU's memory downtime limit in milliseconds.
    #[arg(long, default_value_t = 300)]
    downtime_limit_ms: u64,
    /// Extra seconds to sample chunk temperature before anything is sent.
    /// 0 (the default): the first sample is the writes seen while the live
    /// disk is sliced, and every round adds to it.
    #[arg(long, default_value_t = 0.0)]
    sample_secs: f64,
    /// Downtime budget for the disk, in seconds: while memory moves, if the
    /// chunks the guest dirties per round would take longer than this to
    /// send in the pause (at the source's measured rate), the source VM's
    /// disk writes are throttled (QMP block_set_io_throttle), harder each
    /// round; lifted again if the migration fails. Reported in --json.
    #[arg(long, default_value_t = 1.0)]
    max_downtime: f64,
    /// How QEMU moves memory: multifd-zstd (2 streams, zstd-compressed
    /// pages; plain when a QEMU lacks it) or plain (one uncompressed stream).
    #[arg(long, value_enum, default_value = "multifd-zstd")]
    memory: MemoryTransport,
    /// When QEMU's memory migration starts: after-disk (once the disk
    /// pre-copy rounds end) or with-disk (at once, so the path carries
    /// memory while the live disk is sliced; held from converging until the
    /// rounds end). with-disk shortens the downtime on a fast link, but on a
    /// slow one memory re-sends dirty pages all through a long disk phase
    /// (figures in docs/migration.md).
    #[arg(long, value_enum, default_value = "after-disk")]
    memory_start: MemoryStart,
    /// Cap QEMU's memory streams at this many Mbit/s (QEMU max-bandwidth),
    /// to leave the path to other traffic; by default uncapped. QEMU keeps
    /// to it with `--memory plain`; its multifd streams were measured well
    /// above it (docs/migration.md).
    #[arg(long)]
    memory_max_mbit: Option<f64>,
    /// Find what changed since the VM booted by slicing its whole live disk
    /// (beside round 0; the changed chunks then go in round 1) even when the
    /// VM has a boot log (the eBPF tracker `vm run` left counting, which
    /// names them at once). For comparison; the report's
    /// `changed_since_boot_from` says which ran.
    #[arg(long)]
    no_boot_log: bool,
    /// Send chunks written again after they were sent whole, instead of
    /// as the 4 KiB blocks that differ from the destination's earlier copy.
    /// For comparison; the report's `delta_chunks` counts the deltas.
    #[arg(long)]
    whole_chunks: bool,
    /// How the chunks the guest writes after the pre-copy rounds reach the
    /// destination: mirror (QEMU mirrors every new write to the
    /// destination's NBD export while the VM runs, the chunks written
    /// before it go beside it, and the pause only checks) or pause (they
    /// are sent in the pause: a longer downtime; to compare).
    #[arg(long, value_enum, default_value = "mirror")]
    disk_handoff: DiskHandoff,
    /// Testing: fail on purpose after this phase (the VM must stay at the source).
    #[arg(long, value_enum, hide = true)]
    fail_after: Option<Phase>,
    #[command(flatten)]
    state: StateArgs,
    /// Print the report (phases with seconds and bytes, rounds, downtime,
    /// bytes from each source) as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MemoryStart {
    WithDisk,
    AfterDisk,
}

pub fn run(mut a: Args) -> anyhow::Result<()> {
    let trust = a.cluster.trust()?;
    anyhow::ensure!(
        a.sample_secs >= 0.0 && a.sample_secs < 600.0,
        "--sample-secs out of range"
    );
    anyhow::ensure!(
        a.max_downtime > 0.0 && a.max_downtime < 3600.0,
        "--max-downtime must be between 0 and 3600 seconds"
    );
    if let Some(m) = a.memory_max_mbit {
        anyhow::ensure!(
            (0.1..=100_000.0).contains(&m),
            "--memory-max-mbit must be between 0.1 and 100000"
        );
    }
    a.coord.refuse_token_file()?;
    let coordinator = a.coord.config(&a.cluster.id, a.cluster.coordinator_tls());
    let opts = MigrateOptions {
        name: a.name.clone(),
        state_dir: a.state.state_dir.clone(),
        to: a.to.clone(),
        source_addr: a.source_addr,
        peers: a.peers,
        trust,
        id: a.cluster.id.id,
        ordering: a.order,
        max_rounds: a.max_rounds,
        converge_chunks: a.converge_chunks,
        downtime_limit_ms: a.downtime_limit_ms,
        sample_interval: Duration::from_secs_f64(a.sample_secs),
        fail_after: a.fail_after,
        coordinator,
        memory: a.memory,
        max_downtime: Duration::from_secs_f64(a.max_downtime),
        memory_with_disk: a.memory_start == MemoryStart::WithDisk,
        use_boot_log: !a.no_boot_log,
        deltas: !a.whole_chunks,
        disk_handoff: a.disk_handoff,
        memory_max_bps: a.memory_max_mbit.map(|m| (m * 1e6 / 8.0) as u64),
    };
    let bar = if std::io::stderr().is_terminal() {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.enable_steady_tick(Duration::from_millis(120));
        Some(pb)
    } else {
        None
    };
    let progress = |phase: Phase, msg: &str| {
        if let Some(pb) = &bar {
            pb.set_message(format!("{phase:?}: {msg}"));
        }
        tracing::debug!(?phase, msg, "progress");
    };
    let result = migrate::migrate(opts, &progress);
    if let Some(pb) = &bar {
        pb.finish_and_clear();
    }
    let report = result.with_context(|| {
        format!(
            "migrating {} to {} failed; the VM keeps running here",
            a.name, a.to
        )
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} moved to {} in {:.2} s (downtime {} ms): disk {} bytes in {} rounds ({} chunks re-sent), memory {} bytes",
            report.vm,
            report.to,
            report.total_seconds,
            report.downtime_ms,
            report.disk_bytes,
            report.rounds.len(),
            report.chunks_resent,
            report.memory_bytes
        );
        for (src, bytes) in &report.bytes_by_source {
            println!("  from {src}: {bytes} bytes");
        }
        if report.throttle.applied {
            println!(
                "  source disk writes throttled in {} steps, down to {} B/s and {} IOPS (budget {} ms)",
                report.throttle.steps,
                report.throttle.bps_wr,
                report.throttle.iops_wr,
                report.throttle.max_downtime_ms
            );
        }
        println!("  sources planned by: {}", report.coordination.plan_from);
        for left in &report.coordination.left {
            println!("  left at the coordinator: {left}");
        }
    }
    Ok(())
}
