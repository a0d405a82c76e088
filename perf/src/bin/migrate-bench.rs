//! `migrate-bench`: one VM, one workload, the same 100 Mbit/s tbf links, in
//! one run: QEMU's own shared-nothing migration (blockdev-mirror to an NBD
//! export on the destination, then `migrate`, as `virsh migrate
//! --copy-storage-all` does) against edgeshift with
//!   (a) a cold destination, the VM's base image at two neighbours,
//!   (b) a warm destination (the base held there),
//!   (c) a warm destination and an earlier copy of this VM's disk at two
//!       neighbours,
//! plus the effect of temperature ordering: (b) with cold-first against
//! plain index order, bytes re-sent and rounds.
//!
//! Each scenario gets a fresh testbed: hosts `src`, `dst`, `n1`, `n2`, links
//! src–dst, n1–dst, n2–dst at `--mbit`, and an L2 segment for the VM's NIC.
//! Before its VM starts, each edgeshift scenario's testbed measures the
//! TCP goodput of its three paths into dst with iperf3: the rates of the
//! physical limit (`limits`), beside which the limit at the nominal link
//! rate is kept. Writes JSON and markdown under `--out`
//! (perf/reports/migrate/). Needs root, QEMU, iperf3 and the test VM
//! (perf/images/build-test-vm.sh).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use edgeshift_agent::vm::{
    Accel, AccelChoice, LaunchConfig, MemoryTransport, NetSpec, Qemu, QmpClient, StateDir, VmSpec,
};
use edgeshift_perf::counter_client::CounterClient;
use edgeshift_perf::holdings::{chunk_set, lacked_by_holders};
use edgeshift_testbed::iperf::{iperf3, Direction};
use edgeshift_testbed::{LinkSpec, Testbed};
use serde::Serialize;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    about = "Live migration: QEMU's NBD mirror + migrate against edgeshift (cold, warm, warm + neighbours)"
)]
struct Args {
    /// Rate of every WAN link, Mbit/s each way.
    #[arg(long, default_value_t = 100)]
    mbit: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    memory_mib: u64,
    /// Seconds the VM runs its workload before a migration starts.
    #[arg(long, default_value_t = 20)]
    warmup_secs: u64,
    /// Where the JSON and markdown reports go.
    #[arg(long, default_value = "perf/reports/migrate")]
    out: PathBuf,
    /// The edgeshift binary (default: next to this one).
    #[arg(long)]
    edgeshift: Option<PathBuf>,
    /// Only these scenarios (qemu, qemu-zstd, a, b, c, b-index, b-plain,
    /// b-overlap: (b) with memory beside the disk, b-slice: (b) slicing the
    /// live disk instead of reading the boot log; c-whole: (c) with chunks
    /// written again sent whole, not as deltas; b-nothrot: (b) with the
    /// disk-write throttle off, c-overlap: (c) with memory beside the
    /// disk, and b-pause: (b) with the last chunks in the pause instead of
    /// beside the disk mirror, these three only when named),
    /// comma-separated or repeated; default all but b-nothrot, c-overlap
    /// and b-pause. E.g. `--only qemu,b,c --mbit 10`.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Seconds of iperf3 per path (after one omitted for slow start) to
    /// measure each path's TCP goodput, the rate of the physical limit.
    #[arg(long, default_value_t = 3)]
    goodput_secs: u32,
    /// QEMU's row without `auto-converge`: QEMU's defaults. On a slow link
    /// a guest that writes all the time then may never reach the
    /// switchover (docs/migration.md), so by default the baseline throttles
    /// vCPUs as an operator would.
    #[arg(long)]
    qemu_no_auto_converge: bool,
}

/// The agents' `--listen` (chunks) and `--migrate-listen` ports.
const CHUNK_PORT: u16 = 7070;
const MIGRATE_PORT: u16 = 7080;
const NBD_PORT: u16 = 10809;
const MIG_PORT: u16 = 4444;
/// First of three iperf3 ports (one per path into dst).
const IPERF_PORT: u16 = 5201;

#[derive(Debug, Clone, Serialize)]
struct Row {
    scenario: String,
    method: String,
    total_seconds: f64,
    downtime_ms: u64,
    /// Bytes that crossed the links into the destination (all paths, both
    /// disk and memory, protocol overhead included), from interface counters.
    wire_bytes: u64,
    disk_bytes: u64,
    memory_bytes: u64,
    /// How QEMU moved memory: `multifd-zstd` or `plain`.
    memory_transport: String,
    rounds: usize,
    chunks_resent: u64,
    /// edgeshift only: chunks sent as the blocks that differ from the
    /// destination's earlier copy, and the bytes that saved.
    delta_chunks: u64,
    delta_saved_bytes: u64,
    /// edgeshift only: bytes the destination lacked at the plan.
    missing_bytes: u64,
    /// edgeshift only: the bytes the destination lacked of the final disk,
    /// over the paths that held them ([`disk_lower_bound`]), plus the
    /// memory limit ([`limits`]), at the paths' measured TCP goodput.
    physical_limit_seconds: Option<f64>,
    /// The disk part of the limit alone.
    disk_limit_seconds: Option<f64>,
    /// The same limit at the links' nominal rate (`--mbit` taken as payload
    /// bytes, headers ignored): a bound no TCP stream can reach.
    nominal_limit_seconds: Option<f64>,
    /// edgeshift only: TCP goodput of the paths src, n1, n2 into dst,
    /// measured with iperf3 in this run's testbed before the VM started.
    path_goodput_mbit: Vec<f64>,
    /// edgeshift only: bytes of the final disk the destination lacked, by
    /// the set of paths that held them (bit 0 src, 1 n1, 2 n2).
    lacked_by_paths: std::collections::BTreeMap<u32, u64>,
    bytes_by_source: serde_json::Value,
    /// edgeshift only: the full `migrate --json` report (phases, rounds, ...).
    report: serde_json::Value,
    /// The longest silence of a client reading the VM's counter stream (a
    /// line every ~100 ms) from the migration's start to 2 s after it, ms;
    /// None when the client could not connect.
    client_longest_gap_ms: Option<u64>,
    /// The client's silences over 300 ms: (start, seconds after the
    /// migration's start; length ms), to set beside the migration's log.
    client_gaps: Vec<(f64, u64)>,
    /// The client's connection was still open after the handoff.
    client_survived: bool,
}

/// A client of the VM's counter stream from src (the VM segment reaches
/// the VM at either end), once it reads lines.
fn counter_client(b: &Bed) -> Option<CounterClient> {
    (0..3).find_map(|_| {
        let c = CounterClient::start(&b.tb, "src", &b.vm_ip).ok()?;
        c.wait_lines(3, Duration::from_secs(20)).then_some(c)
    })
}

/// The client's longest gap since `t0`, 2 s after the handoff.
fn client_gap(c: Option<&CounterClient>, t0: Instant) -> (Option<u64>, bool, Vec<(f64, u64)>) {
    let Some(c) = c else {
        return (None, false, Vec::new());
    };
    std::thread::sleep(Duration::from_secs(2));
    let (gap, open) = c.longest_gap_since(t0);
    let gaps = c.gaps_since(t0, Duration::from_millis(300));
    (Some(gap.as_millis() as u64), open, gaps)
}

struct Bed {
    tb: Testbed,
    dir: tempfile::TempDir,
    creds: edgeshift_perf::creds::Creds,
    bin: PathBuf,
    daemons: Vec<Child>,
    vm_ip: String,
}

impl Bed {
    fn ns(&self, host: &str) -> anyhow::Result<String> {
        Ok(self.tb.host(host)?.netns.clone())
    }
    fn store(&self, host: &str) -> PathBuf {
        self.dir.path().join(format!("store-{host}"))
    }
    fn state(&self, host: &str) -> PathBuf {
        self.dir.path().join(format!("state-{host}"))
    }
    /// `host`'s address as `dst` reaches it (dst: its address towards src).
    fn addr(&self, host: &str) -> anyhow::Result<String> {
        Ok(if host == "dst" {
            self.tb.addr_of("dst", "src")?.to_string()
        } else {
            self.tb.addr_of(host, "dst")?.to_string()
        })
    }
    fn edgeshift(&self, host: &str) -> anyhow::Result<Command> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host)?]).arg(&self.bin);
        Ok(c)
    }
    /// Starts `host`'s one daemon: `edgeshift agent`, serving chunks and
    /// receiving migrations.
    fn start_daemons(&mut self, host: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.state(host))?;
        let mut c = self.edgeshift(host)?;
        c.args(["agent", "--listen", &format!("0.0.0.0:{CHUNK_PORT}")])
            .args(["--migrate-listen", &format!("0.0.0.0:{MIGRATE_PORT}")])
            .arg("--no-zstd")
            .arg("--store")
            .arg(self.store(host))
            .args(self.creds.args(host)?)
            .arg("--state-dir")
            .arg(self.state(host))
            .args(["--id", host]);
        let log = std::fs::File::create(self.dir.path().join(format!("{host}-agent.log")))?;
        let child = c
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start daemon")?;
        self.daemons.push(child);
        std::thread::sleep(Duration::from_secs(1));
        Ok(())
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for host in ["src", "dst", "n1", "n2"] {
            if let Ok(recs) = StateDir::new(self.state(host)).list() {
                for r in recs {
                    let _ = edgeshift_agent::vm::teardown(&Qemu::default(), &r);
                }
            }
            if let Ok(ns) = self.ns(host) {
                if let Ok(out) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-9", pid]).output();
                    }
                }
            }
        }
        for c in &mut self.daemons {
            let _ = c.kill();
            let _ = c.wait();
        }
        for entry in walk_images(self.dir.path()) {
            edgeshift_agent::vm::loopdev::detach_backing(&entry);
        }
    }
}

fn walk_images(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(es) = std::fs::read_dir(dir) {
        for e in es.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk_images(&p));
            } else if p.extension().is_some_and(|x| x == "raw") {
                out.push(p);
            }
        }
    }
    out
}

fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

struct Vm {
    kernel: PathBuf,
    initrd: PathBuf,
    base_store: PathBuf,
    base_id: String,
}

fn prepare_vm(bin: &Path) -> anyhow::Result<Vm> {
    let out = sh(Command::new("bash").arg("perf/images/build-test-vm.sh"))?;
    let dir = PathBuf::from(out.lines().last().context("build-test-vm.sh output")?.trim());
    let store = dir.join("store-256k");
    let id_file = dir.join("store-256k.id");
    if !id_file.exists() {
        let _ = std::fs::remove_dir_all(&store);
        let out = sh(Command::new(bin)
            .arg("slice")
            .arg(dir.join("base.raw"))
            .arg("--store")
            .arg(&store))?;
        std::fs::write(&id_file, out.lines().last().context("slice output")?.trim())?;
    }
    Ok(Vm {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initramfs.gz"),
        base_store: store,
        base_id: std::fs::read_to_string(&id_file)?.trim().to_string(),
    })
}

fn bed(tag: &str, a: &Args, bin: &Path) -> anyhow::Result<Bed> {
    let _ = edgeshift_perf::testbed::cleanup_stale(tag);
    let mut tb = Testbed::new(tag)?;
    edgeshift_perf::boot_logs::ensure_bpffs();
    for h in ["src", "dst", "n1", "n2"] {
        tb.add_host(h)?;
    }
    for h in ["src", "n1", "n2"] {
        tb.link(h, "dst", LinkSpec::mbit(a.mbit))?;
    }
    let seg = tb.l2_segment("vmnet", &["src", "dst"], LinkSpec::default())?;
    let vm_ip = seg.guest_addr(10).context("guest address")?.to_string();
    let dir = tempfile::Builder::new().prefix("migrate-bench").tempdir()?;
    let creds = edgeshift_perf::creds::Creds::from_env(dir.path())?;
    Ok(Bed {
        tb,
        creds,
        dir,
        bin: bin.to_path_buf(),
        daemons: Vec::new(),
        vm_ip,
    })
}

fn copy_store(from: &Path, to: &Path) -> anyhow::Result<()> {
    sh(Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(from)
        .arg(to))
    .map(|_| ())
}

fn run_vm(b: &Bed, vm: &Vm, a: &Args) -> anyhow::Result<()> {
    let append = format!("console=ttyS0 quiet es_ip={}/24", b.vm_ip);
    sh(b.edgeshift("src")?
        .args(["vm", "run", "vm1", "--image", &vm.base_id, "--store"])
        .arg(b.store("src"))
        .arg("--state-dir")
        .arg(b.state("src"))
        .args([
            "--net",
            "vmnet",
            "--memory",
            &format!("{}MiB", a.memory_mib),
            "--accel",
            "auto",
            "--kernel",
        ])
        .arg(&vm.kernel)
        .arg("--initrd")
        .arg(&vm.initrd)
        .args(["--append", &append]))?;
    std::thread::sleep(Duration::from_secs(a.warmup_secs));
    Ok(())
}

/// Bytes sent towards dst on every link into it.
fn wire_into_dst(b: &Bed) -> anyhow::Result<u64> {
    let mut sum = 0;
    for h in ["src", "n1", "n2"] {
        sum += b.tb.link_counters(h, "dst")?.tx_bytes;
    }
    Ok(sum)
}

/// A lower bound on the seconds to move `bytes_by_holders` (bytes per set
/// of paths holding them, as bit masks over `rates`, bytes/s): for every set
/// S of paths, the bytes held only within S must cross S's paths, so the
/// time is at least max over S of bytes(only in S) ÷ rate(S). (The
/// coordinator planner's `lower_bound` takes single paths and all paths
/// only; with equal rates and chunks held by pairs this is tighter.)
fn disk_lower_bound(bytes_by_holders: &std::collections::HashMap<u32, u64>, rates: &[f64]) -> f64 {
    let n = rates.len().min(31);
    let mut best: f64 = 0.0;
    for set in 1u32..(1 << n) {
        let bytes: u64 = bytes_by_holders
            .iter()
            .filter(|(&held, _)| held != 0 && held & !set == 0)
            .map(|(_, &b)| b)
            .sum();
        let rate: f64 = (0..n).filter(|i| set & (1 << i) != 0).map(|i| rates[i]).sum();
        if rate > 0.0 {
            best = best.max(bytes as f64 / rate);
        }
    }
    best
}

/// One edgeshift scenario of the bench: who holds what before the handoff,
/// and how `edgeshift migrate` is asked to move the VM.
struct Scenario {
    name: &'static str,
    /// The VM's base image at the destination (warm); else at both
    /// neighbours (a cold destination).
    warm: bool,
    /// An earlier copy of this VM's disk at both neighbours (edges it
    /// passed through), sliced a warm-up before the handoff.
    earlier_copy: bool,
    order: &'static str,
    memory: &'static str,
    /// More `edgeshift migrate` flags.
    flags: &'static [&'static str],
    /// Run only when named in `--only`.
    named_only: bool,
}

const fn scenario(name: &'static str, warm: bool, earlier_copy: bool) -> Scenario {
    Scenario {
        name,
        warm,
        earlier_copy,
        order: "cold-first",
        memory: "multifd-zstd",
        flags: &[],
        named_only: false,
    }
}

/// The edgeshift rows, in the report's order.
const SCENARIOS: &[Scenario] = &[
    scenario("a", false, false),
    scenario("b", true, false),
    scenario("c", true, true),
    Scenario {
        order: "index",
        ..scenario("b-index", true, false)
    },
    Scenario {
        memory: "plain",
        ..scenario("b-plain", true, false)
    },
    // Memory beside the disk pre-copy, held from converging.
    Scenario {
        flags: &["--memory-start", "with-disk"],
        ..scenario("b-overlap", true, false)
    },
    Scenario {
        flags: &["--memory-start", "with-disk"],
        named_only: true,
        ..scenario("c-overlap", true, true)
    },
    // What changed since boot found by a slice, not the boot log.
    Scenario {
        flags: &["--no-boot-log"],
        ..scenario("b-slice", true, false)
    },
    // Chunks written again sent whole, not as deltas.
    Scenario {
        flags: &["--whole-chunks"],
        ..scenario("c-whole", true, true)
    },
    // A budget no pause reaches: the throttle never engages.
    Scenario {
        flags: &["--max-downtime", "3599"],
        named_only: true,
        ..scenario("b-nothrot", true, false)
    },
    Scenario {
        flags: &["--disk-handoff", "pause"],
        named_only: true,
        ..scenario("b-pause", true, false)
    },
];

fn edgeshift_run(sc: &Scenario, a: &Args, bin: &Path, vm: &Vm) -> anyhow::Result<Row> {
    let (name, order, memory) = (sc.name, sc.order, sc.memory);
    eprintln!("== {name}: edgeshift ({order}, memory {memory})");
    let tag = format!("mb{}", name.replace('-', "_"));
    let mut b = bed(&tag, a, bin)?;
    let goodput = path_goodput(&b, a)?;
    eprintln!(
        "   TCP goodput into dst (iperf3), Mbit/s: src {:.1}, n1 {:.1}, n2 {:.1}",
        goodput[0], goodput[1], goodput[2]
    );
    copy_store(&vm.base_store, &b.store("src"))?;
    if sc.warm {
        copy_store(&vm.base_store, &b.store("dst"))?;
    } else {
        copy_store(&vm.base_store, &b.store("n1"))?;
        copy_store(&vm.base_store, &b.store("n2"))?;
    }
    for h in ["src", "dst", "n1", "n2"] {
        b.start_daemons(h)?;
    }
    run_vm(&b, vm, a)?;
    if sc.earlier_copy {
        // An earlier copy of this VM's disk, left at the neighbours it passed through.
        let rec = StateDir::new(b.state("src")).load("vm1")?;
        let snap = b.dir.path().join("earlier");
        sh(Command::new(bin)
            .arg("slice")
            .arg(&rec.loop_device)
            .arg("--store")
            .arg(&snap))?;
        for n in ["n1", "n2"] {
            sh(Command::new("cp")
                .args(["-a", "--reflink=auto", "-T"])
                .arg(&snap)
                .arg(b.store(n)))?;
        }
        std::thread::sleep(Duration::from_secs(a.warmup_secs));
    }
    // Who holds what before the migration, for the physical limit.
    let held_dst = chunk_set(&b.store("dst"))?;
    let held_paths = vec![
        Default::default(),
        chunk_set(&b.store("n1"))?,
        chunk_set(&b.store("n2"))?,
    ];
    let client = counter_client(&b);
    let t_mig = Instant::now();
    let t_mig_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let wire0 = wire_into_dst(&b)?;
    let out = b
        .edgeshift("src")?
        .args([
            "migrate",
            "vm1",
            "--to",
            &format!("{}:{MIGRATE_PORT}", b.addr("dst")?),
        ])
        .args(["--source-addr", &format!("{}:{CHUNK_PORT}", b.addr("src")?)])
        .args(["--peer", &format!("{}:{CHUNK_PORT}", b.addr("n1")?)])
        .args(["--peer", &format!("{}:{CHUNK_PORT}", b.addr("n2")?)])
        .args(b.creds.args("src")?)
        .arg("--state-dir")
        .arg(b.state("src"))
        .args(["--order", order, "--memory", memory, "--json", "--id", "src"])
        .args(sc.flags)
        .output()?;
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(a.out.join(format!("{name}-migrate.log")), &out.stderr)?;
    // The destination's side of the handoff (its pulls), beside the source's.
    let _ = std::fs::copy(
        b.dir.path().join("dst-agent.log"),
        a.out.join(format!("{name}-dst.log")),
    );
    // The source's chunk server (what it was asked for, when).
    let _ = std::fs::copy(
        b.dir.path().join("src-agent.log"),
        a.out.join(format!("{name}-src-agent.log")),
    );
    if !out.status.success() {
        bail!(
            "edgeshift migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let wire = wire_into_dst(&b)? - wire0;
    let (client_longest_gap_ms, client_survived, client_gaps) = client_gap(client.as_ref(), t_mig);
    eprintln!("   migration started at unix {t_mig_unix:.3}; client gaps over 300 ms (start s, ms): {client_gaps:?}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).context("migrate --json output")?;
    let by_source = r["bytes_by_source"].clone();
    let missing = r["missing_at_plan_bytes"].as_u64().unwrap_or(0);
    let final_id: edgeshift_common::Fingerprint = r["manifest_id"]
        .as_str()
        .context("manifest_id in the report")?
        .parse()
        .map_err(|e| anyhow::anyhow!("manifest_id: {e:?}"))?;
    let final_disk = edgeshift_agent::store::ChunkStore::get_manifest(
        &edgeshift_agent::store::LocalStore::open(b.store("dst"))?,
        &final_id,
    )?;
    let lacked = lacked_by_holders(&final_disk, &held_dst, &held_paths);
    let memory_bytes = r["memory_bytes"].as_u64().unwrap_or(0);
    eprintln!(
        "   lacked {:.1} MB by holder set {:?}; memory {:.1} MB",
        lacked.values().sum::<u64>() as f64 / 1e6,
        lacked,
        memory_bytes as f64 / 1e6
    );
    Ok(Row {
        scenario: name.to_string(),
        method: format!("edgeshift ({order}, memory {memory})"),
        total_seconds: r["total_seconds"].as_f64().unwrap_or(0.0),
        downtime_ms: r["downtime_ms"].as_u64().unwrap_or(0),
        wire_bytes: wire,
        disk_bytes: r["disk_bytes"].as_u64().unwrap_or(0),
        memory_bytes: r["memory_bytes"].as_u64().unwrap_or(0),
        memory_transport: memory.to_string(),
        rounds: r["rounds"].as_array().map(|x| x.len()).unwrap_or(0),
        chunks_resent: r["chunks_resent"].as_u64().unwrap_or(0),
        delta_chunks: r["delta_chunks"].as_u64().unwrap_or(0),
        delta_saved_bytes: r["delta_saved_bytes"].as_u64().unwrap_or(0),
        missing_bytes: missing,
        // Filled in by `limits` once every run's memory bytes are known.
        physical_limit_seconds: None,
        disk_limit_seconds: None,
        nominal_limit_seconds: None,
        path_goodput_mbit: goodput,
        lacked_by_paths: lacked.into_iter().collect(),
        bytes_by_source: by_source,
        report: r.clone(),
        client_longest_gap_ms,
        client_gaps,
        client_survived,
    })
}

fn wait_job_ready(q: &mut QmpClient, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let jobs = q.execute_raw("query-block-jobs", None)?;
        let ready = jobs
            .as_array()
            .and_then(|j| j.first())
            .map(|j| j["ready"] == true)
            .unwrap_or(false);
        if ready {
            return Ok(());
        }
        if jobs.as_array().is_some_and(|j| j.is_empty()) {
            bail!("the mirror job disappeared");
        }
        if Instant::now() > deadline {
            bail!("the mirror never became ready");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// QEMU's shared-nothing path: NBD export of an empty disk at the
/// destination, blockdev-mirror into it (write-blocking once ready), then
/// `migrate`, then the mirror cancelled at the source.
fn qemu_run(a: &Args, bin: &Path, vm: &Vm, zstd: bool) -> anyhow::Result<Row> {
    let scenario = if zstd { "qemu-zstd" } else { "qemu" };
    let memory = if zstd {
        MemoryTransport::MultifdZstd
    } else {
        MemoryTransport::Plain
    };
    eprintln!("== {scenario}: blockdev-mirror to NBD + migrate (memory {memory:?})");
    let mut b = bed(if zstd { "mbqemuz" } else { "mbqemu" }, a, bin)?;
    copy_store(&vm.base_store, &b.store("src"))?;
    b.start_daemons("src")?;
    run_vm(&b, vm, a)?;
    let rec = StateDir::new(b.state("src")).load("vm1")?;
    // The destination: an empty disk of the same size on a loop device, QEMU
    // with the same devices waiting for an incoming migration.
    let run_dir = b.dir.path().join("qemu-dst");
    std::fs::create_dir_all(&run_dir)?;
    let img = run_dir.join("disk.raw");
    let size = std::fs::metadata(&rec.image_path)?.len();
    std::fs::File::create(&img)?.set_len(size)?;
    let dev = edgeshift_agent::vm::loopdev::LoopDevice::attach(&img)?;
    let spec = VmSpec {
        net: Some(NetSpec {
            bridge: "vmnet".into(),
            mac: rec.spec.net.as_ref().map(|n| n.mac.clone()).unwrap_or_default(),
        }),
        accel: AccelChoice::Tcg,
        ..rec.spec.clone()
    };
    let cfg = LaunchConfig {
        spec,
        disk: dev.path().to_path_buf(),
        run_dir: run_dir.clone(),
        incoming: Some("defer".into()),
    };
    let qemu = Qemu::default();
    let args = qemu.command_line(
        &cfg,
        if rec.accel == Accel::Kvm {
            Accel::Kvm
        } else {
            Accel::Tcg
        },
    );
    let tap = edgeshift_agent::vm::qemu::tap_name("vm1");
    let ns = b.ns("dst")?;
    sh(Command::new("ip").args([
        "netns", "exec", &ns, "ip", "tuntap", "add", "dev", &tap, "mode", "tap",
    ]))?;
    sh(Command::new("ip").args([
        "netns", "exec", &ns, "ip", "link", "set", &tap, "master", "vmnet", "up",
    ]))?;
    sh(Command::new("ip")
        .args(["netns", "exec", &ns, "qemu-system-x86_64"])
        .args(&args))?;
    let mut dq = QmpClient::connect(&run_dir.join("qmp.sock"), Duration::from_secs(10))?;
    let mut sq = QmpClient::connect(&rec.qmp_socket, Duration::from_secs(5))?;
    let dst_ip = b.addr("dst")?;
    dq.execute_raw(
        "nbd-server-start",
        Some(json!({"addr": {"type": "inet", "data": {"host": dst_ip, "port": NBD_PORT.to_string()}}})),
    )?;
    dq.execute_raw(
        "block-export-add",
        Some(json!({"type": "nbd", "id": "exp0", "node-name": "disk0", "name": "disk0", "writable": true})),
    )?;
    dq.set_memory_transport(memory)?;
    dq.execute_raw(
        "migrate-incoming",
        Some(json!({"uri": format!("tcp:{dst_ip}:{MIG_PORT}")})),
    )?;
    let client = counter_client(&b);
    let wire0 = wire_into_dst(&b)?;
    let t0 = Instant::now();
    sq.execute_raw(
        "blockdev-add",
        Some(json!({"driver": "nbd", "node-name": "tgt", "export": "disk0",
                     "server": {"type": "inet", "host": dst_ip, "port": NBD_PORT.to_string()}})),
    )?;
    sq.execute_raw(
        "blockdev-mirror",
        Some(json!({"job-id": "m0", "device": "disk0", "target": "tgt", "sync": "full", "copy-mode": "write-blocking"})),
    )?;
    wait_job_ready(&mut sq, Duration::from_secs(1800))?;
    let disk_secs = t0.elapsed().as_secs_f64();
    sq.migrate_set_capabilities(&[("events", true), ("auto-converge", !a.qemu_no_auto_converge)])?;
    sq.set_memory_transport(memory)?;
    sq.migrate(&format!("tcp:{dst_ip}:{MIG_PORT}"))?;
    let done = loop {
        let m = sq.query_migrate()?;
        match m.status.as_deref() {
            Some("completed") => break m,
            Some("failed") | Some("cancelled") => bail!("QEMU migration failed: {:?}", m.error_desc),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let total = t0.elapsed().as_secs_f64();
    sq.execute_raw("block-job-cancel", Some(json!({"device": "m0"})))?;
    let wire = wire_into_dst(&b)? - wire0;
    let (client_longest_gap_ms, client_survived, client_gaps) = client_gap(client.as_ref(), t0);
    eprintln!("   client gaps over 300 ms (start s after the mirror's start, ms): {client_gaps:?}");
    drop(client);
    eprintln!("   mirror ready after {disk_secs:.1} s, migrated after {total:.1} s");
    let _ = dq.execute_raw("block-export-del", Some(json!({"id": "exp0"})));
    let _ = dq.quit();
    drop(dev);
    let mem = done.ram.map(|r| r.transferred).unwrap_or(0);
    Ok(Row {
        scenario: scenario.into(),
        method: format!(
            "QEMU blockdev-mirror to NBD + migrate{}{}",
            if zstd { " (multifd zstd memory)" } else { "" },
            if a.qemu_no_auto_converge {
                ""
            } else {
                ", auto-converge"
            }
        ),
        total_seconds: total,
        downtime_ms: done.downtime.unwrap_or(0),
        wire_bytes: wire,
        disk_bytes: wire.saturating_sub(mem),
        memory_bytes: mem,
        memory_transport: if zstd { "multifd-zstd" } else { "plain" }.into(),
        rounds: 0,
        chunks_resent: 0,
        delta_chunks: 0,
        delta_saved_bytes: 0,
        missing_bytes: size,
        physical_limit_seconds: None,
        disk_limit_seconds: None,
        nominal_limit_seconds: None,
        path_goodput_mbit: Vec::new(),
        lacked_by_paths: Default::default(),
        bytes_by_source: json!({}),
        report: json!({ "mirror_ready_seconds": disk_secs }),
        client_longest_gap_ms,
        client_gaps,
        client_survived,
    })
}

fn markdown(rows: &[Row], a: &Args) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "# Live migration: QEMU's NBD mirror against edgeshift\n\nOne run, test VM ({} MiB memory, 1 GiB disk, workload writing all the time), every link {} Mbit/s tbf. Reproduce: `sudo cargo run --release -p edgeshift-perf --bin migrate-bench`.\n\n",
        a.memory_mib, a.mbit
    ));
    // Against QEMU's plain row, or its multifd + zstd row when only that ran
    // (at 10 Mbit/s the plain one does not reach the switchover).
    let qemu = rows
        .iter()
        .find(|r| r.scenario == "qemu")
        .or_else(|| rows.iter().find(|r| r.scenario == "qemu-zstd"))
        .map(|r| r.total_seconds);
    s.push_str("| scenario | method | total s | memory phase s | downtime ms | client gap ms | mirror phase s (MB) | wire MB | disk MB | memory MB | rounds | chunks re-sent | deltas (MB saved) | speed-up vs QEMU | path goodput Mbit/s (src, n1, n2) | disk limit s | physical limit s | total / limit | total / limit at nominal rate | disk throttle |\n");
    s.push_str(
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let speedup = qemu
            .map(|q| format!("{:.2}×", q / r.total_seconds))
            .unwrap_or_else(|| "-".into());
        let memory_phase = r.report["phases"]
            .as_array()
            .and_then(|p| p.iter().find(|x| x["phase"] == "memory"))
            .and_then(|x| x["seconds"].as_f64())
            .map(|x| format!("{x:.1}"))
            .unwrap_or_else(|| "-".into());
        let gap = match r.client_longest_gap_ms {
            Some(g) if r.client_survived => g.to_string(),
            Some(g) => format!("{g} (connection lost)"),
            None => "-".into(),
        };
        let mirror_phase = r.report["phases"]
            .as_array()
            .and_then(|p| p.iter().find(|x| x["phase"] == "mirror"))
            .map(|x| {
                format!(
                    "{:.1} ({:.1})",
                    x["seconds"].as_f64().unwrap_or(0.0),
                    x["bytes"].as_f64().unwrap_or(0.0) / 1e6
                )
            })
            .unwrap_or_else(|| "-".into());
        let disk_lim = r
            .disk_limit_seconds
            .map(|x| format!("{x:.1}"))
            .unwrap_or_else(|| "-".into());
        let (lim, ratio) = match r.physical_limit_seconds {
            Some(l) => (format!("{l:.1}"), format!("{:.2}", r.total_seconds / l)),
            None => ("-".into(), "-".into()),
        };
        let nominal_ratio = r
            .nominal_limit_seconds
            .map(|l| format!("{:.2}", r.total_seconds / l))
            .unwrap_or_else(|| "-".into());
        let goodput = if r.path_goodput_mbit.is_empty() {
            "-".into()
        } else {
            r.path_goodput_mbit
                .iter()
                .map(|m| format!("{m:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let deltas = if r.physical_limit_seconds.is_some() {
            format!("{} ({:.1})", r.delta_chunks, r.delta_saved_bytes as f64 / 1e6)
        } else {
            "-".into()
        };
        let t = &r.report["throttle"];
        let throttle = if t["applied"].as_bool() == Some(true) {
            format!(
                "{} steps, {:.2} MB/s, {} IOPS",
                t["steps"],
                t["bps_wr"].as_f64().unwrap_or(0.0) / 1e6,
                t["iops_wr"]
            )
        } else {
            "-".into()
        };
        s.push_str(&format!(
            "| {} | {} | {:.1} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.scenario,
            r.method,
            r.total_seconds,
            memory_phase,
            r.downtime_ms,
            gap,
            mirror_phase,
            r.wire_bytes as f64 / 1e6,
            r.disk_bytes as f64 / 1e6,
            r.memory_bytes as f64 / 1e6,
            r.rounds,
            r.chunks_resent,
            deltas,
            speedup,
            goodput,
            disk_lim,
            lim,
            ratio,
            nominal_ratio,
            throttle
        ));
    }
    s.push_str("\n(a) cold destination, base at two neighbours; (b) warm destination; (c) warm destination + an earlier copy of the disk at two neighbours; b-index: (b) with plain index order instead of cold-first; b-plain: (b) with QEMU's plain memory stream instead of multifd + zstd; b-overlap: (b) with memory started beside the disk pre-copy (`--memory-start with-disk`) instead of after it (c-overlap, run only when named in `--only`: the same for (c)); c-whole: (c) sending chunks written again whole instead of as the 4 KiB blocks that differ from the destination's earlier copy (`--whole-chunks`); deltas: chunks sent that way (the bytes they saved); b-slice: (b) finding what changed since boot by slicing the live disk beside round 0 (`--no-boot-log`; those chunks then go in round 1) instead of reading the VM's boot log; qemu-zstd: QEMU's path with the same multifd + zstd memory settings (virsh's default is the plain row `qemu`). Physical limit = disk limit + memory limit. Disk limit: the bytes of the final disk the destination lacked before the migration, grouped by the set of paths (source, n1, n2) that held them; the maximum over every set S of paths of (bytes held only within S) ÷ (S's summed path rates). Memory limit: the fewest memory bytes any run of this bench moved for this VM with the same memory transport (one pass over its memory, as sent, compressed or not; a run whose memory passed again beside a long disk phase is charged for the extra) ÷ the source path's rate. A path's rate is its TCP goodput, measured with iperf3 in the run's own testbed before the VM starts (capped at the link rate): the payload a bulk TCP stream gets through the link, below the link rate by the Ethernet, IP and TCP headers of every 1500-byte frame (about 4.4 %). `total / limit at nominal rate` takes the link rate itself as payload bytes per second instead, a bound no TCP transfer can reach. Wire bytes: interface counters of every link into the destination. Disk throttle: how hard the source VM's disk writes were squeezed to keep the pause within `--max-downtime` (1 s); b-nothrot: (b) with that throttle off. Client gap: the longest silence of a client reading the VM's counter stream (a line every ~100 ms) over its network from the migration's start to 2 s after it. Mirror phase: edgeshift's last chunks beside QEMU's disk mirror (`--disk-handoff mirror`, the default), from the mirror's start to its completion in the pause, overlapping the memory phase; its MB are the chunks written before the mirror and the guest writes it carried; b-pause: (b) with the last chunks sent in the pause instead (`--disk-handoff pause`, the way before the mirror).\n");
    s
}

/// Each edgeshift row's physical limit: the disk limit ([`disk_lower_bound`]
/// over the bytes the row's destination lacked) plus the memory limit, the
/// fewest memory bytes any run of this bench moved for this VM with the
/// same transport (one pass over its memory) over the source path's rate.
/// A run that sent more (memory passing again beside a long disk phase) is
/// charged for the extra, not credited with it. Computed at the paths'
/// measured goodput (never above `nominal`, bytes/s) and at `nominal`.
fn limits(rows: &mut [Row], nominal: f64) {
    let fewest = |t: &str, rows: &[Row]| {
        rows.iter()
            .filter(|r| r.memory_transport == t && r.memory_bytes > 0)
            .map(|r| r.memory_bytes)
            .min()
    };
    let refs: Vec<Option<u64>> = rows.iter().map(|r| fewest(&r.memory_transport, rows)).collect();
    for (r, least) in rows.iter_mut().zip(refs) {
        let (Some(mem), 3) = (least, r.path_goodput_mbit.len()) else {
            continue;
        };
        let lacked: std::collections::HashMap<u32, u64> =
            r.lacked_by_paths.iter().map(|(&k, &v)| (k, v)).collect();
        let measured: Vec<f64> = r
            .path_goodput_mbit
            .iter()
            .map(|m| (m * 1e6 / 8.0).min(nominal))
            .collect();
        let disk = disk_lower_bound(&lacked, &measured);
        r.disk_limit_seconds = Some(disk);
        r.physical_limit_seconds = Some(disk + mem as f64 / measured[0]);
        r.nominal_limit_seconds = Some(disk_lower_bound(&lacked, &[nominal; 3]) + mem as f64 / nominal);
    }
}

/// TCP goodput of the paths src, n1, n2 into dst (Mbit/s), measured at once
/// (they are separate links) with iperf3 for a few seconds each.
fn path_goodput(b: &Bed, a: &Args) -> anyhow::Result<Vec<f64>> {
    let hosts = ["src", "n1", "n2"];
    std::thread::scope(|s| {
        let runs: Vec<_> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                s.spawn(move || -> anyhow::Result<f64> {
                    let addr = b.tb.addr_of("dst", h)?;
                    let port = IPERF_PORT + i as u16;
                    let run = iperf3(&b.tb, "dst", addr, port, h, a.goodput_secs, Direction::ToServer)
                        .with_context(|| format!("iperf3 {h} -> dst"))?;
                    Ok(run.mbit_per_s)
                })
            })
            .collect();
        runs.into_iter()
            .map(|t| t.join().map_err(|_| anyhow::anyhow!("iperf3 thread panicked"))?)
            .collect()
    })
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let bin = match &a.edgeshift {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("edgeshift"),
    };
    if !bin.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p edgeshift-agent) or pass --edgeshift",
            bin.display()
        );
    }
    let known: Vec<&str> = ["qemu", "qemu-zstd"]
        .into_iter()
        .chain(SCENARIOS.iter().map(|s| s.name))
        .collect();
    if let Some(bad) = a.only.iter().find(|o| !known.contains(&o.as_str())) {
        bail!("--only {bad}: no such scenario (known: {})", known.join(", "));
    }
    let vm = prepare_vm(&bin)?;
    let want = |s: &str| a.only.is_empty() || a.only.iter().any(|o| o == s);
    let mut rows = Vec::new();
    if want("qemu") {
        rows.push(qemu_run(&a, &bin, &vm, false)?);
    }
    if want("qemu-zstd") {
        rows.push(qemu_run(&a, &bin, &vm, true)?);
    }
    for sc in SCENARIOS {
        let named = a.only.iter().any(|o| o == sc.name);
        if named || (!sc.named_only && want(sc.name)) {
            rows.push(edgeshift_run(sc, &a, &bin, &vm)?);
        }
    }
    limits(&mut rows, a.mbit as f64 * 1e6 / 8.0);
    std::fs::create_dir_all(&a.out)?;
    let json =
        serde_json::to_string_pretty(&json!({ "mbit": a.mbit, "memory_mib": a.memory_mib, "rows": rows }))?;
    std::fs::write(a.out.join("migrate-bench.json"), json)?;
    let md = markdown(&rows, &a);
    std::fs::write(a.out.join("migrate-bench.md"), &md)?;
    println!("{md}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn row(transport: &str, memory_bytes: u64, goodput: &[f64], lacked: &[(u32, u64)]) -> Row {
        Row {
            scenario: "t".into(),
            method: "t".into(),
            total_seconds: 10.0,
            downtime_ms: 0,
            wire_bytes: 0,
            disk_bytes: 0,
            memory_bytes,
            memory_transport: transport.into(),
            rounds: 0,
            chunks_resent: 0,
            delta_chunks: 0,
            delta_saved_bytes: 0,
            missing_bytes: 0,
            physical_limit_seconds: None,
            disk_limit_seconds: None,
            nominal_limit_seconds: None,
            path_goodput_mbit: goodput.to_vec(),
            lacked_by_paths: lacked.iter().copied().collect(),
            bytes_by_source: json!({}),
            report: json!({}),
            client_longest_gap_ms: None,
            client_gaps: Vec::new(),
            client_survived: false,
        }
    }

    #[test]
    fn limits_use_measured_goodput_and_the_fewest_memory_bytes() {
        // Nominal 100 Mbit/s = 12.5 MB/s; measured 96 Mbit/s = 12 MB/s.
        let nominal = 12.5e6;
        let mut rows = vec![
            // 24 MB only at the source, 36 MB at all three; memory 30 MB.
            row(
                "zstd",
                30_000_000,
                &[96.0, 96.0, 96.0],
                &[(0b001, 24_000_000), (0b111, 36_000_000)],
            ),
            // Same transport, 24 MB of memory: the fewest, used by both rows.
            row("zstd", 24_000_000, &[96.0, 96.0, 96.0], &[(0b001, 12_000_000)]),
            // Another transport keeps its own memory bytes; a path measured
            // above the link rate is held to it.
            row("plain", 50_000_000, &[200.0, 96.0, 96.0], &[(0b001, 25_000_000)]),
            // QEMU's rows measure no paths: no limit (their memory bytes
            // count towards the fewest like any run's).
            row("zstd", 26_000_000, &[], &[(0b001, 1)]),
        ];
        limits(&mut rows, nominal);
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9);
        // Disk: max(24/12, 60/36) = 2 s; memory 24 MB / 12 MB/s = 2 s.
        assert!(
            close(rows[0].disk_limit_seconds, 2.0),
            "{:?}",
            rows[0].disk_limit_seconds
        );
        assert!(close(rows[0].physical_limit_seconds, 4.0));
        // At 12.5 MB/s: 24/12.5 + 24/12.5.
        assert!(close(rows[0].nominal_limit_seconds, 48.0 / 12.5));
        assert!(close(rows[1].physical_limit_seconds, 1.0 + 2.0));
        // Source path capped at 12.5 MB/s: 25/12.5 + 50/12.5.
        assert!(close(rows[2].physical_limit_seconds, 6.0));
        assert!(close(rows[2].nominal_limit_seconds, 6.0));
        assert_eq!(rows[3].physical_limit_seconds, None);
        assert_eq!(rows[3].nominal_limit_seconds, None);
    }

    #[test]
    fn disk_bound_takes_the_tightest_set_of_paths() {
        let rates = [10.0, 10.0, 10.0];
        // 100 bytes only at the source, 200 held by all three.
        let by: HashMap<u32, u64> = [(0b001, 100), (0b111, 200)].into();
        // Source alone: 100/10 = 10; everything over all: 300/30 = 10.
        assert!((disk_lower_bound(&by, &rates) - 10.0).abs() < 1e-9);
        // 300 only at the source: the source path alone is the bound.
        let by: HashMap<u32, u64> = [(0b001, 300), (0b111, 30)].into();
        assert!((disk_lower_bound(&by, &rates) - 30.0).abs() < 1e-9);
        // Held by the pair n1+n2 only: that pair's rate, not all three.
        let by: HashMap<u32, u64> = [(0b110, 400)].into();
        assert!((disk_lower_bound(&by, &rates) - 20.0).abs() < 1e-9);
        // Nothing lacked, and a zero mask (held by nobody) is ignored.
        assert_eq!(disk_lower_bound(&HashMap::new(), &rates), 0.0);
        let by: HashMap<u32, u64> = [(0, 400)].into();
        assert_eq!(disk_lower_bound(&by, &rates), 0.0);
    }
}
