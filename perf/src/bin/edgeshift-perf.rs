//! `edgeshift-perf`: the emulated edge cloud, the scenarios with their
//! baselines, reports with plots, and the demo. Needs root (namespaces, tc,
//! loop devices, QEMU).

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edgeshift_perf::{demo, images, report, suite, topology::Topology};
use edgeshift_testbed as testbed;

/// Evaluate edgeshift on an emulated edge cloud on this machine: hosts are
/// network namespaces, WAN links are veth pairs limited by tbf (bandwidth
/// only: no netem here, so latency is not emulated).
#[derive(Debug, Parser)]
#[command(name = "edgeshift-perf", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run scenario groups (cache, sources, bandwidth, writes, policies, live, live-writes), record runs.json and write report.md beside it.
    Scenario {
        /// Scenario groups to run, e.g. `bandwidth cache`.
        #[arg(required = true)]
        names: Vec<String>,
        /// Output directory (default perf/reports/<names joined by '-'>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print the run records as one JSON object on stdout.
        #[arg(long)]
        json: bool,
        /// Round-trip times between edges to run the groups at (ms; the
        /// testbed's delay line), e.g. `0,20,60`.
        #[arg(long, value_delimiter = ',', default_value = "0")]
        rtt_ms: Vec<f64>,
        /// Edge-to-edge rates of the bandwidth and live groups (Mbit/s).
        #[arg(long, value_delimiter = ',', default_value = "10,50,100")]
        rates: Vec<u32>,
        /// Namespace tag (es-<tag>-<host>) and work directory name: two
        /// runs on one machine need different tags, or the second one's
        /// stale-namespace cleanup kills the first's processes.
        #[arg(long, default_value = "scen")]
        tag: String,
    },
    /// The full evaluation (cache, sources, bandwidth, policies, live, live-writes), then report.md with plots in perf/reports/full.
    Report {
        /// Output directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Do not measure: regenerate report.md and the figures from this runs.json (or the directory holding it).
        #[arg(long)]
        from_runs: Option<PathBuf>,
        /// Also run migrate-bench (the 1 GiB test VM: QEMU's NBD mirror vs
        /// edgeshift migrate in its cases a, b, c; about 8 more minutes).
        #[arg(long)]
        with_migrate_bench: bool,
    },
    /// Three edges and an HTTPS coordinator in namespaces, a VM booted at e1
    /// and handed off to e2 by `POST /v1/vms/vm1/handoff` while a client
    /// stays connected; prints a short report.
    Demo {
        /// Also print the demo's record as JSON.
        #[arg(long)]
        json: bool,
        /// Run the installed package's programs (/usr/bin/edgeshift,
        /// /usr/bin/edgeshift-coordinator) with its configuration files
        /// (/etc/edgeshift/*.toml; the demo's flags override them), not
        /// this build's.
        #[arg(long)]
        installed: bool,
    },
    /// Build a topology (TOML; default: the built-in edge3) and keep it up until Ctrl-C.
    Up {
        topology: Option<PathBuf>,
        /// Namespace tag (names become es-<tag>-<host>).
        #[arg(long, default_value = "up")]
        tag: String,
    },
    /// Measure the per-chunk dirty-rate heat map (fio on a loop device,
    /// watched by `edgeshift dirty`) into a recorded runs.json, and redraw its report.
    Heatmap {
        /// The runs.json to add the heat map to (its report.md is rewritten).
        #[arg(long, default_value = "perf/reports/full/runs.json")]
        into: PathBuf,
        /// Intervals (rows) to record.
        #[arg(long, default_value_t = 8)]
        rows: usize,
    },
    /// Remove namespaces (and kill their processes) left by a killed run with this tag.
    CleanupStale { tag: String },
}

fn log(msg: &str) {
    let stamp = suite::utc_now();
    eprintln!("[{}] {msg}", stamp.get(11..19).unwrap_or(&stamp));
}

fn default_out(name: &str) -> PathBuf {
    images::repo_root().join("perf/reports").join(name)
}

fn work_dir(tag: &str) -> PathBuf {
    images::repo_root().join("target/perf-work").join(tag)
}

fn main() -> anyhow::Result<()> {
    // Before any thread exists, so all inherit the blocked signal mask.
    edgeshift_perf::signals::install().context("installing the signal handler")?;
    tracing_init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Scenario {
            names,
            out,
            json,
            rtt_ms,
            rates,
            tag,
        } => {
            let name = names.join("-");
            let out = out.unwrap_or_else(|| default_out(&name));
            let sweep = suite::Sweep { rtt_ms, rates };
            let set = suite::run(&name, &names, &sweep, &tag, &work_dir(&tag), &log)?;
            let runs = report::save(&set, &out)?;
            let md = report::write(&set, &out)?;
            if json {
                println!("{}", serde_json::to_string(&set)?);
            }
            log(&format!(
                "recorded {} runs in {}; report {}",
                set.runs.len(),
                runs.display(),
                md.display()
            ));
        }
        Cmd::Report {
            out,
            from_runs,
            with_migrate_bench,
        } => {
            let out = out.unwrap_or_else(|| default_out("full"));
            let set = match from_runs {
                Some(path) if path.is_dir() => report::load(&path.join("runs.json"))?,
                Some(path) => report::load(&path)?,
                None => {
                    let groups: Vec<String> = suite::REPORT.iter().map(|s| s.to_string()).collect();
                    let mut set = suite::run(
                        "full",
                        &groups,
                        &suite::Sweep::default(),
                        "full",
                        &work_dir("full"),
                        &log,
                    )?;
                    if with_migrate_bench {
                        suite::add_live_migration(&mut set, &out.join("migrate"), &log);
                    }
                    report::save(&set, &out)?;
                    set
                }
            };
            let md = report::write(&set, &out)?;
            println!("{}", report::headline_table(&set));
            log(&format!(
                "report: {} ({} runs, measured in {:.0} s)",
                md.display(),
                set.runs.len(),
                set.wall_seconds
            ));
        }
        Cmd::Demo { json, installed } => {
            let programs = if installed {
                edgeshift_perf::cluster::Programs::installed()?
            } else {
                edgeshift_perf::cluster::Programs::default()
            };
            let rec = demo::run("demo", &work_dir("demo"), &programs, &log)?;
            println!("{}", demo::summary(&rec));
            if json {
                println!("{}", serde_json::to_string(&rec)?);
            }
            if !rec.ok {
                anyhow::bail!(
                    "the demo handoff did not complete: {}",
                    rec.error.as_deref().unwrap_or("see above")
                );
            }
        }
        Cmd::Up { topology, tag } => {
            let topo = match topology {
                Some(p) => Topology::load(&p)?,
                None => Topology::edge3(),
            };
            testbed::cleanup_stale(&tag)?;
            edgeshift_perf::signals::register(&tag);
            let tb = topo.build(&tag)?;
            for h in tb.hosts() {
                println!("{h}: ip netns exec es-{tag}-{h} ...");
            }
            if std::io::stdin().is_terminal() {
                eprintln!("up; press Ctrl-C to tear down");
            }
            loop {
                std::thread::park();
            }
        }
        Cmd::Heatmap { into, rows } => {
            let mut set = report::load(&into)?;
            set.heatmap = Some(suite::heatmap(rows, &work_dir("heat"), &log)?);
            let dir = into.parent().map(PathBuf::from).unwrap_or_default();
            report::save(&set, &dir)?;
            let md = report::write(&set, &dir)?;
            log(&format!(
                "heat map recorded in {}; report {}",
                into.display(),
                md.display()
            ));
        }
        Cmd::CleanupStale { tag } => {
            for ns in testbed::cleanup_stale(&tag)? {
                println!("removed {ns}");
            }
        }
    }
    Ok(())
}

fn tracing_init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
