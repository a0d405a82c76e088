//! Live handoffs of the running test VM (perf/images/build-test-vm.sh, its
//! guest workload writing all the time) from edge e1 to edge e2 over one
//! tbf-limited link: `edgeshift migrate` with a warm destination (the VM's
//! base image held there) against QEMU's shared-nothing migration
//! ([`crate::qemu_mirror`]), at several link rates and guest write rates.
//!
//! The VM is the small variant of the test VM (`EDGESHIFT_VM_DISK_MIB`, 192
//! MiB here) so that QEMU's whole-disk mirror at 10 Mbit/s fits
//! the report's time budget. Every run boots a fresh VM, lets its workload
//! run, measures its write rate on the loop device, migrates, then asks the
//! guest at the destination to check its disk (`es-check` on TCP 7001).

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgeshift_agent::store::{ChunkStore, LocalStore};
use edgeshift_common::Fingerprint;

use crate::cluster::{Binaries, ClusterError, AGENT_PORT, MIGRATE_PORT};
use crate::holdings;
use crate::qemu_mirror::{self, SourceVm};
use crate::record::{Run, Sample};
use crate::scenario::{io, limit, must, sampled, wait_line, ScenarioError};
use crate::service_probe;
use crate::signals;
use edgeshift_testbed::{LinkSpec, Testbed};

const SRC: &str = "e1";
const DST: &str = "e2";
/// The VM's user: a host on the VM segment asking its HTTP server.
const CLIENT: &str = "client";
const SEGMENT: &str = "vmnet";
/// Disk size of the VM variant the live runs use.
pub const DISK_MIB: u32 = 192;
/// Guest memory.
pub const MEMORY_MIB: u32 = 128;
/// Seconds the workload runs at the source before a handoff starts.
const WARMUP_SECS: u64 = 6;
/// How often a handoff's timeline samples the bytes e2 received.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// How hard the guest writes: `es_hot_every` / `es_hot_blocks` on the
/// kernel command line (perf/images/guest/es-workload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteRate {
    /// One 64 KiB slot per second.
    Low,
    /// The guest's default: one 64 KiB slot every 200 ms.
    Default,
    /// Eight 64 KiB slots every 100 ms.
    High,
}

impl WriteRate {
    pub fn name(self) -> &'static str {
        match self {
            WriteRate::Low => "low",
            WriteRate::Default => "default",
            WriteRate::High => "high",
        }
    }

    fn kernel_args(self) -> &'static str {
        match self {
            WriteRate::Low => " es_hot_every=10 es_hot_blocks=1",
            WriteRate::Default => "",
            WriteRate::High => " es_hot_every=1 es_hot_blocks=8",
        }
    }
}

/// The testbed (e1, e2, one link, one VM segment), the small test VM sliced
/// at e1, e1's chunk server, and a base-only seed store for e2.
pub struct LiveBench {
    tb: Testbed,
    bins: Binaries,
    work: PathBuf,
    creds: crate::creds::Creds,
    vm_dir: PathBuf,
    base_id: String,
    vm_ip: Ipv4Addr,
    agent: Option<Child>,
    rate: u32,
    rtt_ms: f64,
    seq: u32,
}

impl LiveBench {
    /// Builds the small test VM (cached), the testbed and e1's agent.
    /// `rtt_ms` is the e1–e2 link's round-trip time (the delay line's
    /// one-way delay is half of it); 0 is no delay line.
    pub fn setup(tag: &str, work: &Path, rtt_ms: f64, log: &dyn Fn(&str)) -> Result<Self, ScenarioError> {
        log(&format!(
            "live: test VM variant with a {DISK_MIB} MiB disk (perf/images/build-test-vm.sh, EDGESHIFT_VM_DISK_MIB={DISK_MIB}; cached)"
        ));
        let out = must(
            Command::new("bash")
                .arg(crate::images::repo_root().join("perf/images/build-test-vm.sh"))
                .env("EDGESHIFT_VM_DISK_MIB", DISK_MIB.to_string()),
            "build-test-vm.sh",
        )?;
        let vm_dir = PathBuf::from(out.lines().last().unwrap_or_default().trim());
        let bins = Binaries::locate().map_err(ClusterError::from)?;
        crate::testbed::cleanup_stale(tag)?;
        signals::register(tag);
        signals::detach_loops_under(&[work.to_path_buf()]);
        signals::register_loop_dir(work);
        let mut tb = Testbed::new(tag)?;
        crate::boot_logs::ensure_bpffs();
        tb.add_host(SRC)?;
        tb.add_host(DST)?;
        tb.add_host(CLIENT)?;
        tb.link(SRC, DST, LinkSpec::mbit(100).delay_ms(rtt_ms / 2.0))?;
        tb.l2_segment(SEGMENT, &[SRC, DST, CLIENT], LinkSpec::default())?;
        let vm_ip = tb
            .segment(SEGMENT)?
            .guest_addr(0)
            .ok_or_else(|| ScenarioError::Output("live".into(), "no guest address".into()))?;
        let _ = std::fs::remove_dir_all(work);
        std::fs::create_dir_all(work).map_err(io("creating the live work dir"))?;
        let creds = crate::creds::Creds::from_env(work).map_err(ClusterError::from)?;
        let mut me = LiveBench {
            tb,
            bins,
            work: work.to_path_buf(),
            creds,
            vm_dir,
            base_id: String::new(),
            vm_ip,
            agent: None,
            rate: 100,
            rtt_ms,
            seq: 0,
        };
        for host in [SRC, "seed"] {
            let id = must(
                Command::new(&me.bins.edgeshift)
                    .arg("slice")
                    .arg(me.vm_dir.join("base.raw"))
                    .arg("--store")
                    .arg(me.work.join(host).join("store")),
                "edgeshift slice",
            )?;
            me.base_id = id.lines().last().unwrap_or_default().trim().to_string();
        }
        let agent = me
            .tb
            .command(SRC, &me.bins.edgeshift)
            .args(["agent", "--listen", &format!("0.0.0.0:{AGENT_PORT}"), "--store"])
            .arg(me.work.join(SRC).join("store"))
            .args(me.creds.args(SRC).map_err(ClusterError::from)?)
            .args(["--id", SRC])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(me.work.join("e1-agent.log")).map_err(io("log"))?)
            .spawn()
            .map_err(io("starting edgeshift agent"))?;
        me.agent = Some(agent);
        if let Some(a) = me.agent.as_mut() {
            wait_line("live", a, "listening", Duration::from_secs(20))?;
        }
        Ok(me)
    }

    /// Sets the e1–e2 link's rate (its delay stays).
    pub fn set_rate(&mut self, mbit: u32) -> Result<(), ScenarioError> {
        self.tb.set_rate(SRC, DST, LinkSpec::mbit(mbit))?;
        self.rate = mbit;
        Ok(())
    }

    fn state(&self, host: &str) -> PathBuf {
        self.work.join(host).join("vms")
    }

    /// Boots a fresh VM at e1 and waits until its workload runs; returns its
    /// name and the guest's measured disk write rate (bytes/s) over the warm-up.
    fn boot(&mut self, rate: WriteRate, log: &dyn Fn(&str)) -> Result<(String, f64), ScenarioError> {
        self.seq += 1;
        let name = format!("live{}", self.seq);
        let append = format!(
            "console=ttyS0 quiet es_ip={}/24{}",
            self.vm_ip,
            rate.kernel_args()
        );
        let t = Instant::now();
        must(
            self.tb
                .command(SRC, &self.bins.edgeshift)
                .args(["vm", "run", &name, "--image", &self.base_id, "--store"])
                .arg(self.work.join(SRC).join("store"))
                .arg("--state-dir")
                .arg(self.state(SRC))
                .args([
                    "--net",
                    SEGMENT,
                    "--memory",
                    &format!("{MEMORY_MIB}MiB"),
                    "--kernel",
                ])
                .arg(self.vm_dir.join("vmlinuz"))
                .arg("--initrd")
                .arg(self.vm_dir.join("initramfs.gz"))
                .args(["--append", &append]),
            "edgeshift vm run",
        )?;
        let serial = self.state(SRC).join(&name).join("serial.log");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let text = std::fs::read_to_string(&serial).unwrap_or_default();
            if text.contains("edgeshift-guest: workload steady") {
                break;
            }
            if Instant::now() > deadline {
                return Err(ScenarioError::Output(
                    "live".into(),
                    format!(
                        "VM {name} not ready after 120 s; serial: {}",
                        text.lines().last().unwrap_or("")
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let rec = SourceVm::from_record(&self.state(SRC).join(&name).join("vm.json"))
            .map_err(|e| ScenarioError::Output("live".into(), e.to_string()))?;
        let w0 = sectors_written(&rec.loop_device);
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(WARMUP_SECS));
        let w1 = sectors_written(&rec.loop_device);
        let write_rate = (w1.saturating_sub(w0) * 512) as f64 / t0.elapsed().as_secs_f64();
        log(&format!(
            "  VM {name} booted in {:.1} s, guest writes {:.0} KB/s ({} write rate)",
            t.elapsed().as_secs_f64() - WARMUP_SECS as f64,
            write_rate / 1e3,
            rate.name()
        ));
        Ok((name, write_rate))
    }

    /// Runs `body` while the bytes e2 received from e1 are sampled every
    /// [`SAMPLE_EVERY`]: (seconds since the start, bytes since it).
    fn sampling_rx<T>(&self, body: impl FnOnce() -> T) -> Result<(T, Vec<(f64, u64)>), ScenarioError> {
        let rx0 = self.tb.link_counters(DST, SRC)?.rx_bytes;
        Ok(sampled(
            SAMPLE_EVERY,
            || {
                let c = self.tb.link_counters(DST, SRC).ok()?;
                Some(c.rx_bytes.saturating_sub(rx0))
            },
            body,
        ))
    }

    /// Bytes both ways on e2's end of the e1–e2 link.
    fn wire(&self) -> Result<u64, ScenarioError> {
        let c = self.tb.link_counters(DST, SRC)?;
        Ok(c.rx_bytes + c.tx_bytes)
    }

    /// The guest's own disk check, asked over the VM segment from e1.
    fn guest_check(&self) -> String {
        let out = self
            .tb
            .command(SRC, "socat")
            .args([
                "-u",
                "-T",
                "60",
                &format!("TCP:{}:7001,connect-timeout=10", self.vm_ip),
                "-",
            ])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) => String::from_utf8_lossy(&o.stdout).trim().to_string(),
            Err(e) => format!("socat: {e}"),
        }
    }

    /// Stops the VM and deletes its disk (`vm stop` keeps it).
    fn stop_vm(&self, host: &str, name: &str) {
        for verb in ["stop", "rm"] {
            let _ = self
                .tb
                .command(host, &self.bins.edgeshift)
                .args(["vm", verb, name, "--state-dir"])
                .arg(self.state(host))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// `edgeshift migrate` of a fresh VM to e2, whose store holds the base.
    pub fn run_edgeshift(
        &mut self,
        scenario: &str,
        rate: WriteRate,
        log: &dyn Fn(&str),
    ) -> Result<Run, ScenarioError> {
        let store = self.work.join(DST).join(format!("store-{}", self.seq + 1));
        let _ = std::fs::remove_dir_all(&store);
        std::fs::create_dir_all(self.work.join(DST)).map_err(io("creating e2's dir"))?;
        must(
            Command::new("cp")
                .arg("-al")
                .arg(self.work.join("seed").join("store"))
                .arg(&store),
            "seeding e2's store",
        )?;
        let dst_addr = self.tb.addr_of(DST, SRC)?;
        // e2's one daemon, on this run's fresh store: it receives the VM.
        let mut host = self
            .tb
            .command(DST, &self.bins.edgeshift)
            .args([
                "agent",
                "--listen",
                &format!("{dst_addr}:{AGENT_PORT}"),
                "--migrate-listen",
                &format!("{dst_addr}:{MIGRATE_PORT}"),
                "--store",
            ])
            .arg(&store)
            .args(self.creds.args(DST).map_err(ClusterError::from)?)
            .arg("--state-dir")
            .arg(self.state(DST))
            .args(["--id", DST])
            .stdout(Stdio::piped())
            .stderr(
                std::fs::File::create(self.work.join(format!("e2-agent-{}.log", self.seq + 1)))
                    .map_err(io("log"))?,
            )
            .spawn()
            .map_err(io("starting edgeshift agent"))?;
        let result = (|| {
            wait_line("live", &mut host, "listening", Duration::from_secs(20))?;
            let (name, write_rate) = self.boot(rate, log)?;
            let src_addr = self.tb.addr_of(SRC, DST)?;
            let held = holdings::chunk_set(&store).map_err(store_error)?;
            let wire0 = self.wire()?;
            let mut migrate = self.tb.command(SRC, &self.bins.edgeshift);
            migrate
                .args(["migrate", &name, "--to", &format!("{dst_addr}:{MIGRATE_PORT}")])
                .args(["--source-addr", &format!("{src_addr}:{AGENT_PORT}")])
                .args(self.creds.args(SRC).map_err(ClusterError::from)?)
                .arg("--state-dir")
                .arg(self.state(SRC))
                .args(["--id", SRC, "--json"])
                .stdin(Stdio::null());
            let client = self.tb.host(CLIENT)?.netns.clone();
            let http = SocketAddr::from((self.vm_ip, 80));
            let (sampled, requests) = service_probe::around(&client, http, || {
                let t = Instant::now();
                self.sampling_rx(|| migrate.output())
                    .map(|(out, received)| (out, received, t.elapsed().as_secs_f64()))
            });
            let (out, received, seconds) = sampled?;
            let out = out.map_err(io("edgeshift migrate"))?;
            let wire = self.wire()?.saturating_sub(wire0);
            let _ = std::fs::write(self.work.join(format!("{name}-migrate.log")), &out.stderr);
            let _ = std::fs::write(self.work.join(format!("{name}-migrate.json")), &out.stdout);
            if !out.status.success() {
                self.stop_vm(SRC, &name);
                return Err(ScenarioError::Tool {
                    cmd: "edgeshift migrate".into(),
                    status: out.status,
                    stderr: String::from_utf8_lossy(&out.stderr)
                        .lines()
                        .rev()
                        .take(6)
                        .collect::<Vec<_>>()
                        .join(" | "),
                });
            }
            let stdout = String::from_utf8_lossy(&out.stdout);
            let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
                .map_err(|_| ScenarioError::Output("edgeshift migrate --json".into(), stdout.to_string()))?;
            let check = self.guest_check();
            self.stop_vm(DST, &name);
            self.stop_vm(SRC, &name);
            // The handoff is over when the VM runs at the destination: the
            // engine's own total (QEMU's run is timed the same way). The
            // command itself returns after its source-side cleanup.
            let handoff_seconds = report["total_seconds"].as_f64().unwrap_or(seconds);
            // What e2 lacked of the disk the VM runs on there (the plan
            // counts only the boot image: what changed since boot is found
            // after it).
            let final_id = report["manifest_id"].as_str().unwrap_or_default();
            let missing = lacked_bytes(&store, final_id, &held)?;
            let memory = report["memory_bytes"].as_u64().unwrap_or(0);
            let needed = missing + memory;
            let r = Run {
                scenario: scenario.into(),
                tool: "edgeshift migrate".into(),
                rate_mbit: self.rate,
                rtt_ms: self.rtt_ms,
                cache: "warm".into(),
                sources: vec![SRC.into()],
                workload: rate.name().into(),
                seconds: handoff_seconds,
                wire_bytes: wire,
                needed_bytes: needed,
                path_mbit: self.rate,
                limit_seconds: limit(needed, self.rate),
                verified: check.starts_with("check ok"),
                projected_from: None,
                timeline: phased(received, &report),
                detail: serde_json::json!({
                    "command_seconds": seconds,
                    "downtime_ms": report["downtime_ms"],
                    "rounds": report["rounds"].as_array().map(Vec::len),
                    "chunks_resent": report["chunks_resent"],
                    "disk_bytes": report["disk_bytes"],
                    "memory_bytes": memory,
                    "missing_disk_bytes": missing,
                    "guest_write_bytes_per_s": write_rate,
                    "guest_check": check,
                    "disk_mib": DISK_MIB,
                    "warmup_seconds": WARMUP_SECS,
                    "memory_mib": MEMORY_MIB,
                    "migrate": report,
                    "rtt_ms": self.rtt_ms,
                    "service": service_probe::detail(&requests),
                }),
            };
            Ok(r)
        })();
        let _ = host.kill();
        let _ = host.wait();
        let _ = std::fs::remove_dir_all(&store);
        result
    }

    /// QEMU's shared-nothing migration of a fresh VM to e2 (empty disk there).
    pub fn run_qemu(
        &mut self,
        scenario: &str,
        rate: WriteRate,
        log: &dyn Fn(&str),
    ) -> Result<Run, ScenarioError> {
        let (name, write_rate) = self.boot(rate, log)?;
        let result = (|| {
            let src = SourceVm::from_record(&self.state(SRC).join(&name).join("vm.json"))
                .map_err(|e| ScenarioError::Output("qemu baseline".into(), e.to_string()))?;
            let dst_netns = self.tb.host(DST)?.netns.clone();
            let dst_ip = self.tb.addr_of(DST, SRC)?;
            let run_dir = self.work.join(DST).join(format!("qemu-{name}"));
            let wire0 = self.wire()?;
            let client = self.tb.host(CLIENT)?.netns.clone();
            let http = SocketAddr::from((self.vm_ip, 80));
            let (outcome, requests) = service_probe::around(&client, http, || {
                qemu_mirror::mirror_and_migrate(&src, &dst_netns, dst_ip, &run_dir, Duration::from_secs(600))
            });
            let (outcome, dest) = outcome
                .map_err(|e| ScenarioError::Output("QEMU blockdev-mirror + migrate".into(), e.to_string()))?;
            let wire = self.wire()?.saturating_sub(wire0);
            let check = self.guest_check();
            drop(dest);
            let _ = std::fs::remove_dir_all(&run_dir);
            // What an empty destination lacked: the disk's non-zero chunks,
            // measured on the (now paused) source disk.
            let scratch = self.work.join("qemu-lacked");
            let _ = std::fs::remove_dir_all(&scratch);
            let id = must(
                Command::new(&self.bins.edgeshift)
                    .arg("slice")
                    .arg(&src.loop_device)
                    .arg("--store")
                    .arg(&scratch),
                "edgeshift slice (source disk)",
            )?;
            let id = id.lines().last().unwrap_or_default().trim().to_string();
            let figures = must(
                Command::new(&self.bins.edgeshift)
                    .args(["inspect", &id, "--store"])
                    .arg(&scratch)
                    .arg("--json"),
                "edgeshift inspect",
            )?;
            let _ = std::fs::remove_dir_all(&scratch);
            let figures: serde_json::Value = serde_json::from_str(figures.trim())
                .map_err(|_| ScenarioError::Output("edgeshift inspect --json".into(), figures.clone()))?;
            let nonzero = figures["unique_bytes"].as_u64().unwrap_or(0);
            let needed = nonzero + outcome.memory_bytes;
            log(&format!(
                "  QEMU: mirror ready after {:.1} s, migrated after {:.1} s",
                outcome.mirror_ready_seconds, outcome.total_seconds
            ));
            Ok(Run {
                scenario: scenario.into(),
                tool: "qemu-mirror".into(),
                rate_mbit: self.rate,
                rtt_ms: self.rtt_ms,
                cache: "cold".into(),
                sources: vec![SRC.into()],
                workload: rate.name().into(),
                seconds: outcome.total_seconds,
                wire_bytes: wire,
                needed_bytes: needed,
                path_mbit: self.rate,
                limit_seconds: limit(needed, self.rate),
                verified: outcome.destination_running && check.starts_with("check ok"),
                projected_from: None,
                timeline: Vec::new(),
                detail: serde_json::json!({
                    "downtime_ms": outcome.downtime_ms,
                    "memory_bytes": outcome.memory_bytes,
                    "disk_bytes": outcome.disk_size,
                    "missing_disk_bytes": nonzero,
                    "mirror_ready_seconds": outcome.mirror_ready_seconds,
                    "rtt_ms": self.rtt_ms,
                    "service": service_probe::detail(&requests),
                    "guest_write_bytes_per_s": write_rate,
                    "guest_check": check,
                    "disk_mib": DISK_MIB,
                    "warmup_seconds": WARMUP_SECS,
                    "memory_mib": MEMORY_MIB,
                }),
            })
        })();
        self.stop_vm(SRC, &name);
        result
    }
}

impl Drop for LiveBench {
    fn drop(&mut self) {
        for host in [SRC, DST] {
            if let Ok(entries) = std::fs::read_dir(self.state(host)) {
                for e in entries.flatten() {
                    if let Some(name) = e.file_name().to_str() {
                        self.stop_vm(host, name);
                    }
                }
            }
        }
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        let _ = self.tb.teardown();
        signals::unregister(self.tb.tag());
        signals::detach_loops_under(std::slice::from_ref(&self.work));
        signals::unregister_loop_dir(&self.work);
        if std::env::var_os("EDGESHIFT_PERF_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

/// e2's store could not be read.
fn store_error(e: impl std::fmt::Display) -> ScenarioError {
    ScenarioError::Output("e2's chunk store".into(), e.to_string())
}

/// Bytes of the disk `id` (a manifest in `store`, hex) in distinct non-zero
/// chunks that were not in `held`: what the destination lacked of it.
fn lacked_bytes(store: &Path, id: &str, held: &HashSet<Fingerprint>) -> Result<u64, ScenarioError> {
    let id: Fingerprint = id.parse().map_err(|e| {
        ScenarioError::Output(
            "edgeshift migrate --json manifest_id".into(),
            format!("{id:?}: {e:?}"),
        )
    })?;
    let disk = LocalStore::open(store)
        .and_then(|s| s.get_manifest(&id))
        .map_err(store_error)?;
    Ok(holdings::lacked_by_holders(&disk, held, &[]).values().sum())
}

/// A handoff's samples of bytes received, each named by the engine's phase
/// it fell in: the `--json` report's phases, each from its `start_seconds`
/// for its `seconds` (a report without starts: one after the other); where
/// phases overlap (the disk mirror runs beside memory) the one that started
/// last names the sample; past the last, "switchover" (QEMU's last state,
/// then the VM runs at e2, and the source cleans up). The command's start
/// stands for the engine's, a few ms apart.
fn phased(received: Vec<(f64, u64)>, report: &serde_json::Value) -> Vec<Sample> {
    let mut spans = Vec::new();
    let mut t = 0.0;
    for p in report["phases"].as_array().into_iter().flatten() {
        let start = p["start_seconds"].as_f64().unwrap_or(t);
        let end = start + p["seconds"].as_f64().unwrap_or(0.0);
        t = end;
        spans.push((start, end, p["phase"].as_str().unwrap_or("?").to_string()));
    }
    let last_end = spans.iter().map(|s| s.1).fold(0.0, f64::max);
    received
        .into_iter()
        .map(|(t, bytes)| {
            let within = spans
                .iter()
                .filter(|(start, end, _)| *start <= t && t < *end)
                .max_by(|a, b| a.0.total_cmp(&b.0));
            let phase = match within {
                Some((_, _, name)) => name.clone(),
                // Between phases (a few ms of bookkeeping): the next one.
                None if t < last_end => spans
                    .iter()
                    .find(|(start, _, _)| t < *start)
                    .map_or_else(|| "switchover".to_string(), |s| s.2.clone()),
                None => "switchover".to_string(),
            };
            Sample {
                t,
                phase,
                bytes: vec![(SRC.to_string(), bytes)],
            }
        })
        .collect()
}

/// Sectors written to a block device so far (/sys/block/NAME/stat, field 7).
fn sectors_written(dev: &Path) -> u64 {
    let name = dev.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    std::fs::read_to_string(format!("/sys/block/{name}/stat"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(6).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_named_by_the_phase_they_fall_in() {
        let report = serde_json::json!({"phases": [
            {"phase": "plan", "seconds": 0.05},
            {"phase": "precopy", "seconds": 0.9},
            {"phase": "memory", "seconds": 2.0},
            {"phase": "pause", "seconds": 1.0},
        ]});
        let got = phased(
            vec![(0.0, 0), (0.5, 10), (1.0, 20), (3.9, 30), (4.0, 40)],
            &report,
        );
        let names: Vec<&str> = got.iter().map(|s| s.phase.as_str()).collect();
        assert_eq!(names, ["plan", "precopy", "memory", "pause", "switchover"]);
        assert_eq!(got[2].bytes, vec![(SRC.to_string(), 20)]);
        // With starts, overlapping phases: the mirror runs beside memory,
        // which names what falls in both; the mirror alone before it.
        let report = serde_json::json!({"phases": [
            {"phase": "plan", "start_seconds": 0.0, "seconds": 0.05},
            {"phase": "precopy", "start_seconds": 0.05, "seconds": 0.9},
            {"phase": "memory", "start_seconds": 1.5, "seconds": 2.0},
            {"phase": "mirror", "start_seconds": 0.95, "seconds": 2.6},
            {"phase": "pause", "start_seconds": 3.5, "seconds": 0.1},
        ]});
        let got = phased(vec![(0.5, 1), (1.0, 2), (2.0, 3), (3.52, 4), (3.7, 5)], &report);
        let names: Vec<&str> = got.iter().map(|s| s.phase.as_str()).collect();
        assert_eq!(names, ["precopy", "mirror", "memory", "pause", "switchover"]);
        // A report without phases (a failed parse upstream) names nothing.
        let bare = phased(vec![(0.1, 1)], &serde_json::json!({}));
        assert_eq!(bare[0].phase, "switchover");
    }
}
