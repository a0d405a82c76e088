//! The measured scenarios: a VM disk handed to edge `e2` from `e1` (and the
//! other holders) on the edge3 topology, by edgeshift and by the baselines,
//! at several link rates, destination cache states, source counts and write
//! volumes. Each run is recorded as a [`Run`]; [`Bench`] owns the testbed,
//! the cluster and the prepared stores, and tears all of it down on drop.
//!
//! Until `edgeshift migrate` drives whole handoffs here, an edgeshift run is
//! its disk part: `edgeshift fetch` (all sources at once) then `edgeshift
//! restore` at the destination, timed end to end.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cluster::{Cluster, ClusterError};
use crate::images::{self, DebianImages, ImageError, Workload};
use crate::record::{Run, Sample, Storage};
use crate::signals;
use crate::topology::{Topology, TopologyError};
use edgeshift_testbed::{self as testbed, LinkSpec, Testbed, TestbedError};

/// The destination edge and the VM's current edge in every scenario.
pub const DST: &str = "e2";
pub const SRC: &str = "e1";
const RSYNC_PORT: u16 = 8873;
const HTTP_PORT: u16 = 8080;

/// Errors running a scenario.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error(transparent)]
    Testbed(#[from] TestbedError),
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{cmd} failed ({status}): {stderr}")]
    Tool {
        cmd: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("unexpected output from {0}: {1}")]
    Output(String, String),
}

/// Runs `body` while a scoped thread calls `sample` every `every`, and
/// returns body's result with the samples taken (seconds since the start,
/// value; a `None` is skipped).
pub(crate) fn sampled<R, T: Send>(
    every: Duration,
    sample: impl Fn() -> Option<T> + Sync,
    body: impl FnOnce() -> R,
) -> (R, Vec<(f64, T)>) {
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some(v) = sample() {
                    out.push((start.elapsed().as_secs_f64(), v));
                }
                std::thread::sleep(every);
            }
            out
        });
        let value = body();
        stop.store(true, Ordering::Relaxed);
        (value, sampler.join().unwrap_or_default())
    })
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ScenarioError {
    let what = what.into();
    move |source| ScenarioError::Io { what, source }
}

/// Runs `cmd`, returning stdout; errors carry stderr's tail.
fn run_tool(cmd: &mut Command) -> Result<String, ScenarioError> {
    let line = format!("{cmd:?}");
    must(cmd, &line)
}

/// Waits until `child`'s stdout prints a line starting with `prefix`; `what`
/// names the scenario in the error.
pub(crate) fn wait_line(
    what: &str,
    child: &mut Child,
    prefix: &str,
    timeout: Duration,
) -> Result<(), ScenarioError> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| ScenarioError::Output(what.into(), "no stdout".into()))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = prefix.to_string();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with(&wanted) {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(timeout)
        .map_err(|_| ScenarioError::Output(what.into(), format!("no {prefix:?} line within {timeout:?}")))
}

/// Runs `cmd`, returning stdout; errors name it `what` and carry stderr's tail.
pub(crate) fn must(cmd: &mut Command, what: &str) -> Result<String, ScenarioError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("starting {what}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: String = stderr
            .lines()
            .rev()
            .take(8)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        return Err(ScenarioError::Tool {
            cmd: what.to_string(),
            status: out.status,
            stderr: tail,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Destination cache state before a handoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cache {
    /// Nothing of the image at the destination.
    Cold,
    /// The base image (Debian minbase) at the destination.
    Warm,
    /// An earlier copy of this VM's disk (the nginx image before its writes).
    Prefetched,
}

impl Cache {
    pub fn name(self) -> &'static str {
        match self {
            Cache::Cold => "cold",
            Cache::Warm => "warm",
            Cache::Prefetched => "prefetched",
        }
    }
}

/// A manifest id plus the image it came from.
#[derive(Debug, Clone)]
struct Sliced {
    path: PathBuf,
    id: String,
}

/// Testbed, cluster, images and seeds for the scenarios.
pub struct Bench {
    pub topo: Topology,
    // Field order matters for drop: daemons die before the namespaces go.
    cluster: Cluster,
    tb: Testbed,
    work: PathBuf,
    base: Sliced,
    nginx: Sliced,
    vm: BTreeMap<&'static str, Sliced>,
    seeds: BTreeMap<&'static str, PathBuf>,
    servers: Vec<Child>,
    run_seq: u32,
    current_rate: Option<u32>,
    pub notes: Vec<String>,
}

/// `edgeshift slice IMAGE --store STORE`: the manifest id (last stdout line).
fn slice(bin: &Path, image: &Path, store: &Path) -> Result<String, ScenarioError> {
    let out = run_tool(
        Command::new(bin)
            .arg("slice")
            .arg(image)
            .arg("--store")
            .arg(store),
    )?;
    let id = out.lines().last().unwrap_or_default().trim().to_string();
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ScenarioError::Output("edgeshift slice".into(), out));
    }
    Ok(id)
}

/// Bytes a file or tree occupies on disk (du -s -B1).
pub fn disk_usage(path: &Path) -> Result<u64, ScenarioError> {
    let out = run_tool(Command::new("du").args(["-s", "-B1"]).arg(path))?;
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| ScenarioError::Output("du".into(), out.clone()))
}

fn same_file(a: &Path, b: &Path) -> Result<bool, ScenarioError> {
    let st = Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .map_err(io("cmp"))?;
    Ok(st.success())
}

fn copy_sparse(from: &Path, to: &Path) -> Result<(), ScenarioError> {
    run_tool(Command::new("cp").arg("--sparse=always").arg(from).arg(to)).map(|_| ())
}

impl Bench {
    /// Builds images (cached), the testbed, the cluster, slices images into
    /// the holders' stores and prepares the baselines' servers.
    /// `rtt_ms` is the round-trip time between edges (the delay line's
    /// one-way delay is half of it; links to the origin keep the topology's).
    pub fn setup(tag: &str, work: &Path, rtt_ms: f64, log: &dyn Fn(&str)) -> Result<Self, ScenarioError> {
        log("images: build-debian-images.sh base nginx (cached after the first run)");
        let deb = DebianImages::ensure(&["base", "nginx"])?;
        let vm_dir = images::repo_root().join("target/images/perf");
        std::fs::create_dir_all(&vm_dir).map_err(io("creating target/images/perf"))?;
        for w in [Workload::Low, Workload::High] {
            images::make_vm_disk(
                &deb.path("nginx"),
                &vm_dir.join(format!("vm-{}.raw", w.name())),
                w,
            )?;
        }
        let mut topo = Topology::edge3();
        if rtt_ms > 0.0 {
            topo.set_edge_rtt_ms(rtt_ms);
        }
        testbed::cleanup_stale(tag)?;
        signals::register(tag);
        log("testbed: namespaces, tbf links, agents and coordinator");
        let tb = topo.build(tag)?;
        let _ = std::fs::remove_dir_all(work);
        let cluster = Cluster::start(&tb, &topo, &work.join("cluster"))?;
        let bin = cluster.bins.edgeshift.clone();
        let store = |h: &str| {
            cluster
                .store(h)
                .map(Path::to_path_buf)
                .ok_or_else(|| ScenarioError::Output("cluster".into(), format!("no agent on {h}")))
        };
        log("stores: slicing base, nginx and the VM disks into the holders' stores");
        let mut vm = BTreeMap::new();
        for w in ["low", "high"] {
            let path = vm_dir.join(format!("vm-{w}.raw"));
            let id = slice(&bin, &path, &store(SRC)?)?;
            vm.insert(w, Sliced { path, id });
        }
        // The source runs the VM from its boot image (nginx), whose chunks
        // a running VM pins there: an edge holds the image its VM booted from.
        slice(&bin, &deb.path("nginx"), &store(SRC)?)?;
        let mut base_id = String::new();
        let mut nginx_id = String::new();
        for h in ["e3", "origin"] {
            base_id = slice(&bin, &deb.path("base"), &store(h)?)?;
            nginx_id = slice(&bin, &deb.path("nginx"), &store(h)?)?;
        }
        let seeds_dir = work.join("seeds");
        let mut seeds = BTreeMap::new();
        let warm = seeds_dir.join("warm");
        slice(&bin, &deb.path("base"), &warm)?;
        let pre = seeds_dir.join("prefetched");
        slice(&bin, &deb.path("base"), &pre)?;
        slice(&bin, &deb.path("nginx"), &pre)?;
        seeds.insert("warm", warm);
        seeds.insert("prefetched", pre);

        let mut bench = Self {
            topo,
            cluster,
            tb,
            work: work.to_path_buf(),
            base: Sliced {
                path: deb.path("base"),
                id: base_id,
            },
            nginx: Sliced {
                path: deb.path("nginx"),
                id: nginx_id,
            },
            vm,
            seeds,
            servers: Vec::new(),
            run_seq: 0,
            current_rate: None,
            notes: Vec::new(),
        };
        log("baselines: casync make, rsync daemon and HTTP server at e1");
        bench.start_baseline_servers(&vm_dir)?;
        Ok(bench)
    }

    fn start_baseline_servers(&mut self, vm_dir: &Path) -> Result<(), ScenarioError> {
        let src_addr = self.tb.addr_of(SRC, DST)?;
        // casync: a chunk store and blob index per VM disk, served over HTTP.
        let ca = self.work.join("casync");
        for w in ["low", "high"] {
            let img = &self.vm[w].path;
            std::fs::create_dir_all(&ca).map_err(io("casync dir"))?;
            run_tool(
                Command::new("casync")
                    .arg("make")
                    .arg(format!("--store={}", ca.join("store.castr").display()))
                    .arg(ca.join(format!("vm-{w}.caibx")))
                    .arg(img),
            )?;
        }
        let httpd = self
            .tb
            .command(SRC, "busybox")
            .args(["httpd", "-f", "-p", &format!("{src_addr}:{HTTP_PORT}"), "-h"])
            .arg(&ca)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("starting busybox httpd"))?;
        self.servers.push(httpd);
        // rsync daemon exporting the VM disks.
        let conf = self.work.join("rsyncd.conf");
        std::fs::write(
            &conf,
            format!(
                "use chroot = no\n[img]\npath = {}\nread only = yes\n",
                vm_dir.display()
            ),
        )
        .map_err(io("writing rsyncd.conf"))?;
        let rsyncd = self
            .tb
            .command(SRC, "rsync")
            .args([
                "--daemon",
                "--no-detach",
                &format!("--address={src_addr}"),
                &format!("--port={RSYNC_PORT}"),
            ])
            .arg(format!("--config={}", conf.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("starting rsync --daemon"))?;
        self.servers.push(rsyncd);
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }

    /// Sets every edge-to-edge link to `mbit`.
    pub fn set_rate(&mut self, mbit: u32) -> Result<(), ScenarioError> {
        if self.current_rate == Some(mbit) {
            return Ok(());
        }
        let edges = self.topo.hosts_with(crate::topology::Role::Edge);
        for (i, a) in edges.iter().enumerate() {
            for b in &edges[i + 1..] {
                // The rate only: the links' delay lines stay.
                self.tb.set_rate(a, b, LinkSpec::mbit(mbit))?;
            }
        }
        self.topo.set_edge_rate(Some(mbit));
        self.current_rate = Some(mbit);
        Ok(())
    }

    fn rate_to(&self, host: &str) -> u32 {
        self.topo.rate(host, DST).unwrap_or(10_000)
    }

    fn fresh_dir(&mut self, what: &str) -> Result<PathBuf, ScenarioError> {
        self.run_seq += 1;
        let dir = self.work.join("runs").join(format!("{:03}-{what}", self.run_seq));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io("creating a run dir"))?;
        Ok(dir)
    }

    /// Counters of the destination's links, by peer host.
    fn dst_counters(tb: &Testbed, netns: &str) -> Result<BTreeMap<String, (u64, u64)>, ScenarioError> {
        let all = testbed::all_counters(netns)?;
        Ok(all
            .into_iter()
            .filter_map(|(ifname, c)| {
                ifname
                    .strip_prefix("to-")
                    .map(|peer| (peer.to_string(), (c.rx_bytes, c.tx_bytes)))
            })
            .filter(|(peer, _)| tb.host(peer).is_ok())
            .collect())
    }

    /// Measures `body` at the destination: wall time, wire bytes and a
    /// per-source timeline sampled every 250 ms.
    fn measured<T>(
        &self,
        phase_of: &dyn Fn(f64) -> String,
        body: impl FnOnce() -> Result<T, ScenarioError>,
    ) -> Result<(T, f64, u64, Vec<Sample>), ScenarioError> {
        let netns = self.tb.host(DST)?.netns.clone();
        let before = Self::dst_counters(&self.tb, &netns)?;
        let start = Instant::now();
        let (result, samples) = sampled(
            Duration::from_millis(250),
            || {
                let now = Self::dst_counters(&self.tb, &netns).ok()?;
                Some(
                    now.iter()
                        .map(|(peer, (rx, _))| {
                            (
                                peer.clone(),
                                rx.saturating_sub(before.get(peer).map_or(0, |b| b.0)),
                            )
                        })
                        .collect::<Vec<_>>(),
                )
            },
            body,
        );
        let seconds = start.elapsed().as_secs_f64();
        let value = result?;
        let after = Self::dst_counters(&self.tb, &netns)?;
        let wire: u64 = after
            .iter()
            .map(|(peer, (rx, tx))| {
                let (brx, btx) = before.get(peer).copied().unwrap_or_default();
                rx.saturating_sub(brx) + tx.saturating_sub(btx)
            })
            .sum();
        let timeline = samples
            .into_iter()
            .map(|(t, bytes)| Sample {
                t,
                phase: phase_of(t),
                bytes,
            })
            .collect();
        Ok((value, seconds, wire, timeline))
    }

    /// A neighbour (e3) comes to hold an earlier copy of the low-write VM
    /// disk (`images::make_earlier_copy`), as an edge the VM ran on before
    /// would. For good: the runs after this one see it there.
    pub fn give_neighbour_an_earlier_copy(&mut self) -> Result<(), ScenarioError> {
        let vm_dir = images::repo_root().join("target/images/perf");
        let earlier = vm_dir.join("vm-low-earlier.raw");
        images::make_earlier_copy(&self.nginx.path, &earlier, Workload::Low)?;
        let store = self
            .cluster
            .store("e3")
            .map(Path::to_path_buf)
            .ok_or_else(|| ScenarioError::Output("cluster".into(), "no agent on e3".into()))?;
        slice(&self.cluster.bins.edgeshift, &earlier, &store)?;
        Ok(())
    }

    /// Whether this build's `edgeshift fetch` writes the image itself
    /// (`--out`); an older build is timed as fetch, then restore.
    fn fetch_writes_image(&self) -> bool {
        Command::new(&self.cluster.bins.edgeshift)
            .args(["fetch", "--help"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--out"))
    }

    /// edgeshift: fetch from `sources` at once into a store seeded per
    /// `cache`, writing the image as it arrives (`fetch --out`; with an
    /// older build, a restore after the fetch); verified against the
    /// source image.
    pub fn run_edgeshift(
        &mut self,
        scenario: &str,
        cache: Cache,
        sources: &[&str],
        workload: Workload,
    ) -> Result<Run, ScenarioError> {
        let rate = self.current_rate.unwrap_or(0);
        let dir = self.fresh_dir("edgeshift")?;
        let store = dir.join("store");
        match self.seeds.get(cache.name()) {
            Some(seed) => {
                run_tool(Command::new("cp").arg("-al").arg(seed).arg(&store))?;
            }
            None => std::fs::create_dir_all(&store).map_err(io("store dir"))?,
        }
        let vm = self.vm[workload.name()].clone();
        let out = dir.join("vm.raw");
        let mut fetch = self.tb.command(DST, &self.cluster.bins.edgeshift);
        fetch.arg("fetch").arg(&vm.id).arg("--store").arg(&store);
        for s in sources {
            fetch
                .arg("--peer")
                .arg(Cluster::agent_addr(&self.tb, s, DST)?.to_string());
        }
        fetch
            .args(self.cluster.creds.args(DST).map_err(ClusterError::from)?)
            .args(["--json", "--id", DST]);
        let in_place = self.fetch_writes_image();
        if in_place {
            fetch.arg("--out").arg(&out);
        }
        let mut restore = Command::new(&self.cluster.bins.edgeshift);
        restore
            .arg("restore")
            .arg(&vm.id)
            .arg("--store")
            .arg(&store)
            .arg("--out")
            .arg(&out);
        let fetch_done = Arc::new(Mutex::new(None::<f64>));
        let fd = fetch_done.clone();
        let phase = move |t: f64| match *fd.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(end) if t >= end => "restore".to_string(),
            _ => "fetch".to_string(),
        };
        let t0 = Instant::now();
        let ((report, fetch_s, restore_s), seconds, wire, timeline) = self.measured(&phase, || {
            let report = run_tool(&mut fetch)?;
            let fetch_s = t0.elapsed().as_secs_f64();
            *fetch_done.lock().unwrap_or_else(|p| p.into_inner()) = Some(fetch_s);
            if !in_place {
                run_tool(&mut restore)?;
            }
            Ok((report, fetch_s, t0.elapsed().as_secs_f64() - fetch_s))
        })?;
        let report: serde_json::Value = serde_json::from_str(report.trim())
            .map_err(|_| ScenarioError::Output("edgeshift fetch --json".into(), report.clone()))?;
        let needed = report["bytes_stored"].as_u64().unwrap_or(0);
        let verified = same_file(&vm.path, &out)?;
        let path_mbit: u32 = sources.iter().map(|s| self.rate_to(s)).sum();
        let _ = std::fs::remove_dir_all(&dir);
        Ok(Run {
            scenario: scenario.into(),
            tool: "edgeshift".into(),
            rate_mbit: rate,
            rtt_ms: 0.0,
            cache: cache.name().into(),
            sources: sources.iter().map(|s| s.to_string()).collect(),
            workload: workload.name().into(),
            seconds,
            wire_bytes: wire,
            needed_bytes: needed,
            path_mbit,
            limit_seconds: limit(needed, path_mbit),
            verified,
            projected_from: None,
            timeline,
            detail: serde_json::json!({ "fetch_seconds": fetch_s, "restore_seconds": restore_s, "fetch": report }),
        })
    }

    /// rsync from e1's daemon: `whole` into an empty destination, else
    /// against a copy of the base image already there (rsync's delta transfer).
    pub fn run_rsync(
        &mut self,
        scenario: &str,
        whole: bool,
        workload: Workload,
        needed: u64,
    ) -> Result<Run, ScenarioError> {
        let rate = self.current_rate.unwrap_or(0);
        let dir = self.fresh_dir(if whole { "rsync-whole" } else { "rsync-base" })?;
        let out = dir.join("vm.raw");
        if !whole {
            copy_sparse(&self.base.path, &out)?;
        }
        let vm = self.vm[workload.name()].clone();
        let src = self.tb.addr_of(SRC, DST)?;
        let url = format!("rsync://{src}:{RSYNC_PORT}/img/vm-{}.raw", workload.name());
        let mut cmd = self.tb.command(DST, "rsync");
        // -z as over any WAN; edgeshift and casync compress too.
        cmd.arg("-z");
        if whole {
            cmd.args(["--whole-file", "--sparse"]);
        } else {
            cmd.args(["--inplace", "--no-whole-file"]);
        }
        cmd.arg("--stats").arg(&url).arg(&out);
        let phase = |_: f64| "copy".to_string();
        let (stats, seconds, wire, timeline) = self.measured(&phase, || run_tool(&mut cmd))?;
        let verified = same_file(&vm.path, &out)?;
        let _ = std::fs::remove_dir_all(&dir);
        let path_mbit = self.rate_to(SRC);
        Ok(Run {
            scenario: scenario.into(),
            tool: if whole { "rsync-whole" } else { "rsync-base" }.into(),
            rate_mbit: rate,
            rtt_ms: 0.0,
            cache: if whole { "cold" } else { "warm" }.into(),
            sources: vec![SRC.into()],
            workload: workload.name().into(),
            seconds,
            wire_bytes: wire,
            needed_bytes: needed,
            path_mbit,
            limit_seconds: limit(needed, path_mbit),
            verified,
            projected_from: None,
            timeline,
            detail: serde_json::json!({ "rsync_stats": stats.lines().filter(|l| !l.trim().is_empty()).collect::<Vec<_>>() }),
        })
    }

    /// casync extract over HTTP from e1, seeded with the base image at the destination.
    pub fn run_casync(
        &mut self,
        scenario: &str,
        workload: Workload,
        needed: u64,
    ) -> Result<Run, ScenarioError> {
        let rate = self.current_rate.unwrap_or(0);
        let dir = self.fresh_dir("casync")?;
        let seed = dir.join("base.raw");
        copy_sparse(&self.base.path, &seed)?;
        let out = dir.join("vm.raw");
        let vm = self.vm[workload.name()].clone();
        let src = self.tb.addr_of(SRC, DST)?;
        let mut cmd = self.tb.command(DST, "casync");
        cmd.arg("extract")
            .arg(format!("--store=http://{src}:{HTTP_PORT}/store.castr"))
            .arg(format!("--seed={}", seed.display()))
            .arg(format!("http://{src}:{HTTP_PORT}/vm-{}.caibx", workload.name()))
            .arg(&out);
        let phase = |_: f64| "extract".to_string();
        let (_, seconds, wire, timeline) = self.measured(&phase, || run_tool(&mut cmd))?;
        let verified = same_file(&vm.path, &out)?;
        let _ = std::fs::remove_dir_all(&dir);
        let path_mbit = self.rate_to(SRC);
        Ok(Run {
            scenario: scenario.into(),
            tool: "casync-seed".into(),
            rate_mbit: rate,
            rtt_ms: 0.0,
            cache: "warm".into(),
            sources: vec![SRC.into()],
            workload: workload.name().into(),
            seconds,
            wire_bytes: wire,
            needed_bytes: needed,
            path_mbit,
            limit_seconds: limit(needed, path_mbit),
            verified,
            projected_from: None,
            timeline,
            detail: serde_json::Value::Null,
        })
    }

    /// Storage the fleet's held images take under three layouts, from the
    /// real stores and image files: what each edge holds is what the
    /// scenarios left there (e1: the VM disks; e2: base + nginx; e3 and
    /// origin: base + nginx).
    pub fn storage(&self) -> Result<Vec<Storage>, ScenarioError> {
        let vm_paths: Vec<PathBuf> = self.vm.values().map(|s| s.path.clone()).collect();
        let held: Vec<(&str, Vec<PathBuf>, PathBuf)> = vec![
            (SRC, vm_paths, self.store_dir(SRC)?),
            (
                DST,
                vec![self.base.path.clone(), self.nginx.path.clone()],
                self.seeds["prefetched"].clone(),
            ),
            (
                "e3",
                vec![self.base.path.clone(), self.nginx.path.clone()],
                self.store_dir("e3")?,
            ),
            (
                "origin",
                vec![self.base.path.clone(), self.nginx.path.clone()],
                self.store_dir("origin")?,
            ),
        ];
        let mut logical = 0u64;
        let mut files = Vec::new();
        let mut stores = Vec::new();
        let mut unique: BTreeMap<String, u64> = BTreeMap::new();
        for (edge, imgs, store) in &held {
            let mut f = 0;
            for i in imgs {
                logical += std::fs::metadata(i).map_err(io("stat image"))?.len();
                f += disk_usage(i)?;
            }
            files.push((edge.to_string(), f));
            let chunks = store.join("chunks");
            stores.push((edge.to_string(), disk_usage(&chunks)?));
            for fan in std::fs::read_dir(&chunks).map_err(io("reading a store"))? {
                let fan = fan.map_err(io("reading a store"))?;
                for c in std::fs::read_dir(fan.path()).map_err(io("reading a store"))? {
                    let c = c.map_err(io("reading a store"))?;
                    let len = c.metadata().map_err(io("stat chunk"))?.len();
                    unique.insert(c.file_name().to_string_lossy().into_owned(), len);
                }
            }
        }
        let fleet: u64 = unique.values().sum();
        let sum = |v: &[(String, u64)]| v.iter().map(|(_, b)| b).sum();
        Ok(vec![
            Storage {
                policy: "image files (sparse)".into(),
                physical_bytes: sum(&files),
                per_edge: files,
                logical_bytes: logical,
            },
            Storage {
                policy: "chunk store per edge".into(),
                physical_bytes: sum(&stores),
                per_edge: stores,
                logical_bytes: logical,
            },
            Storage {
                policy: "fleet-wide single copy".into(),
                per_edge: vec![("fleet".into(), fleet)],
                physical_bytes: fleet,
                logical_bytes: logical,
            },
        ])
    }

    fn store_dir(&self, host: &str) -> Result<PathBuf, ScenarioError> {
        self.cluster
            .store(host)
            .map(Path::to_path_buf)
            .ok_or_else(|| ScenarioError::Output("cluster".into(), format!("no store on {host}")))
    }

    /// Image facts for the record.
    pub fn images_json(&self) -> serde_json::Value {
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let used = |p: &Path| disk_usage(p).unwrap_or(0);
        serde_json::json!({
            "base": { "size": size(&self.base.path), "allocated": used(&self.base.path), "id": self.base.id },
            "nginx": { "size": size(&self.nginx.path), "allocated": used(&self.nginx.path), "id": self.nginx.id },
            "vm-low": { "id": self.vm["low"].id, "writes": "256 x 64 KiB" },
            "vm-high": { "id": self.vm["high"].id, "writes": "1536 x 64 KiB" },
        })
    }

    /// Allocated bytes of a VM disk (what a whole copy must move).
    pub fn vm_allocated(&self, w: Workload) -> Result<u64, ScenarioError> {
        disk_usage(&self.vm[w.name()].path)
    }

    pub fn tag(&self) -> &str {
        self.tb.tag()
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        signals::unregister(self.tb.tag());
        if std::env::var_os("EDGESHIFT_PERF_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

/// Seconds to move `bytes` over `mbit` Mbit/s.
pub fn limit(bytes: u64, mbit: u32) -> f64 {
    if mbit == 0 {
        0.0
    } else {
        bytes as f64 * 8.0 / (f64::from(mbit) * 1e6)
    }
}
