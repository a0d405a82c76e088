//! The demo: the edge3 topology plus a client, one L2 segment joining the
//! edges' VM bridges and the client, the test VM (perf/images/build-test-vm.sh)
//! booted at e1 with its disk held by e1 and e3, a client holding a TCP
//! connection to the VM's counter service, and `edgeshift migrate` to e2.
//! Afterwards: whether the client's connection survived, how the counter went
//! on, and the migration's own report. Everything is torn down at the end.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cluster::{Cluster, Programs, AGENT_PORT, MIGRATE_PORT};
use crate::images::repo_root;
use crate::scenario::{io, must, ScenarioError};
use crate::signals;
use crate::topology::Topology;
use edgeshift_testbed::{self as testbed, LinkSpec};

const SEGMENT: &str = "vmnet";

/// What the demo saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DemoRecord {
    pub ok: bool,
    pub error: Option<String>,
    pub boot_seconds: f64,
    pub migrate_seconds: f64,
    /// `edgeshift migrate --json` output.
    pub migrate: serde_json::Value,
    /// Counter lines the client read before and after the switch.
    pub counter_before: Option<u64>,
    pub counter_after: Option<u64>,
    /// Longest silence on the client's connection during the handoff.
    pub longest_gap_ms: u64,
    /// The client's connection was still open at the end.
    pub connection_survived: bool,
    pub total_seconds: f64,
}

/// The client's view of the counter stream: (arrival, value) per line.
#[derive(Default)]
struct Stream {
    lines: Vec<(Instant, u64)>,
    closed: bool,
}

/// Runs the demo with `programs` (this build's, or an installed
/// package's); a failure is recorded (`ok: false`), teardown always happens.
pub fn run(
    tag: &str,
    work: &Path,
    programs: &Programs,
    log: &dyn Fn(&str),
) -> Result<DemoRecord, ScenarioError> {
    let started = Instant::now();
    log("test VM: perf/images/build-test-vm.sh (kernel, initramfs, 1 GiB base disk; cached)");
    let out = must(
        Command::new("bash").arg(repo_root().join("perf/images/build-test-vm.sh")),
        "build-test-vm.sh",
    )?;
    let vm_dir = PathBuf::from(out.lines().last().unwrap_or_default().trim());
    let mut topo = Topology::edge3();
    topo.hosts.push(crate::topology::HostSpec {
        name: "client".into(),
        role: crate::topology::Role::Client,
    });
    testbed::cleanup_stale(tag)?;
    signals::register(tag);
    log("testbed: origin + 3 edges + client in namespaces, 100 Mbit/s between edges, one VM segment");
    let mut tb = topo.build(tag)?;
    tb.l2_segment(SEGMENT, &["e1", "e2", "e3", "client"], LinkSpec::default())?;
    let vm_ip = tb
        .segment(SEGMENT)?
        .guest_addr(0)
        .ok_or_else(|| ScenarioError::Output("demo".into(), "no guest address".into()))?;
    let _ = std::fs::remove_dir_all(work);
    // One daemon per edge: each agent serves chunks and receives migrations.
    let cluster = Cluster::start_receiving_with(&tb, &topo, &work.join("cluster"), programs)?;
    let bin = cluster.bins.edgeshift.clone();
    let store = |h: &str| cluster.store(h).map(Path::to_path_buf).unwrap_or_default();
    let state = |h: &str| cluster.state(h);
    log("stores: the VM's base disk sliced at e1 (its edge) and e3 (a neighbour)");
    let id_out = must(
        Command::new(&bin)
            .arg("slice")
            .arg(vm_dir.join("base.raw"))
            .arg("--store")
            .arg(store("e1")),
        "edgeshift slice",
    )?;
    let id = id_out.lines().last().unwrap_or_default().trim().to_string();
    must(
        Command::new(&bin)
            .arg("slice")
            .arg(vm_dir.join("base.raw"))
            .arg("--store")
            .arg(store("e3")),
        "edgeshift slice",
    )?;

    let mut rec = DemoRecord::default();
    let mut children: Vec<Child> = Vec::new();
    let result = (|| -> Result<(), ScenarioError> {
        let e2_addr = tb.addr_of("e2", "e1")?;
        log(&format!("VM: booting at e1 under QEMU (address {vm_ip})"));
        let boot = Instant::now();
        must(
            tb.command("e1", &bin)
                .args(["vm", "run", "demo", "--image", &id, "--store"])
                .arg(store("e1"))
                .arg("--state-dir")
                .arg(state("e1"))
                .args(["--net", SEGMENT, "--memory", "128MiB", "--kernel"])
                .arg(vm_dir.join("vmlinuz"))
                .arg("--initrd")
                .arg(vm_dir.join("initramfs.gz"))
                .args(["--append", &format!("console=ttyS0 quiet es_ip={vm_ip}/24")]),
            "edgeshift vm run",
        )?;
        // The client connects once the guest's counter service answers.
        let stream = Arc::new(Mutex::new(Stream::default()));
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let mut socat = tb
                .command("client", "socat")
                .args(["-u", &format!("TCP:{vm_ip}:7000,connect-timeout=2"), "-"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .map_err(io("starting socat"))?;
            let stdout = socat.stdout.take();
            let (tx, rx) = std::sync::mpsc::channel();
            let s2 = stream.clone();
            if let Some(stdout) = stdout {
                std::thread::spawn(move || {
                    let mut first = true;
                    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                        let Some(v) = line.split_whitespace().find_map(|w| w.parse::<u64>().ok()) else {
                            continue;
                        };
                        s2.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .lines
                            .push((Instant::now(), v));
                        if first {
                            let _ = tx.send(());
                            first = false;
                        }
                    }
                    s2.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
                });
            }
            if rx.recv_timeout(Duration::from_secs(5)).is_ok() {
                children.push(socat);
                break;
            }
            let _ = socat.kill();
            let _ = socat.wait();
            stream.lock().unwrap_or_else(|p| p.into_inner()).closed = false;
            if Instant::now() > deadline {
                return Err(ScenarioError::Output(
                    "demo".into(),
                    "the VM's counter service never answered".into(),
                ));
            }
        }
        rec.boot_seconds = boot.elapsed().as_secs_f64();
        log(&format!(
            "client: connected to the VM's counter after {:.1} s; handing off e1 -> e2",
            rec.boot_seconds
        ));
        std::thread::sleep(Duration::from_secs(2));
        rec.counter_before = stream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lines
            .last()
            .map(|l| l.1);
        let t_mig = Instant::now();
        let e1_for_e2 = tb.addr_of("e1", "e2")?;
        let e3_for_e2 = tb.addr_of("e3", "e2")?;
        let mig = must(
            tb.command("e1", &bin)
                .args(["migrate", "demo", "--to", &format!("{e2_addr}:{MIGRATE_PORT}")])
                .args(["--source-addr", &format!("{e1_for_e2}:{AGENT_PORT}")])
                .args(["--peer", &format!("{e3_for_e2}:{AGENT_PORT}")])
                .args(
                    cluster
                        .creds
                        .args("e1")
                        .map_err(crate::cluster::ClusterError::from)?,
                )
                .arg("--state-dir")
                .arg(state("e1"))
                .args(["--id", "e1", "--json"]),
            "edgeshift migrate",
        )?;
        rec.migrate_seconds = t_mig.elapsed().as_secs_f64();
        rec.migrate = serde_json::from_str(mig.lines().last().unwrap_or("null"))
            .unwrap_or(serde_json::Value::String(mig.clone()));
        std::thread::sleep(Duration::from_secs(3));
        let s = stream.lock().unwrap_or_else(|p| p.into_inner());
        rec.counter_after = s.lines.last().map(|l| l.1);
        rec.connection_survived = !s.closed;
        rec.longest_gap_ms = s
            .lines
            .windows(2)
            .filter(|w| w[1].0 >= t_mig)
            .map(|w| w[1].0.duration_since(w[0].0).as_millis() as u64)
            .max()
            .unwrap_or(0);
        let rising = matches!((rec.counter_before, rec.counter_after), (Some(a), Some(b)) if b > a);
        if !rec.connection_survived || !rising {
            return Err(ScenarioError::Output(
                "demo".into(),
                format!(
                    "after the handoff: connection open {}, counter {:?} -> {:?}",
                    rec.connection_survived, rec.counter_before, rec.counter_after
                ),
            ));
        }
        Ok(())
    })();
    if let Err(e) = &result {
        rec.error = Some(e.to_string());
    }
    rec.ok = result.is_ok();
    log("teardown: stopping VMs (detaching their loop devices), then the namespaces");
    for h in ["e1", "e2"] {
        for verb in ["stop", "rm"] {
            let _ = tb
                .command(h, &bin)
                .args(["vm", verb, "demo", "--state-dir"])
                .arg(state(h))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    drop(cluster);
    tb.teardown()?;
    signals::unregister(tag);
    if std::env::var_os("EDGESHIFT_PERF_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(work);
    }
    rec.total_seconds = started.elapsed().as_secs_f64();
    Ok(rec)
}

/// The short report printed at the end of the demo.
pub fn summary(r: &DemoRecord) -> String {
    let mut s = String::from("edgeshift demo: VM handoff e1 -> e2 (3 edges + origin + coordinator in network namespaces; bandwidth emulated with tbf, latency not)\n");
    s += &format!(
        "  result:              {}\n",
        if r.ok {
            "handed off, client connected throughout".to_string()
        } else {
            format!("FAILED: {}", r.error.as_deref().unwrap_or("?"))
        }
    );
    s += &format!("  VM boot (TCG):       {:.1} s\n", r.boot_seconds);
    s += &format!("  migrate command:     {:.1} s wall\n", r.migrate_seconds);
    if let Some(phases) = r.migrate["phases"].as_array() {
        let list: Vec<String> = phases
            .iter()
            .map(|p| {
                format!(
                    "{} {:.1} s",
                    p["phase"].as_str().unwrap_or("?"),
                    p["seconds"].as_f64().unwrap_or(0.0)
                )
            })
            .collect();
        s += &format!("  phases:              {}\n", list.join(", "));
    }
    if let Some(d) = r.migrate["downtime_ms"].as_u64() {
        s += &format!("  downtime:            {d} ms\n");
    }
    if let Some(rounds) = r.migrate["rounds"].as_array() {
        s += &format!("  pre-copy rounds:     {}\n", rounds.len());
    }
    if let Some(src) = r.migrate["bytes_by_source"].as_object() {
        let list: Vec<String> = src
            .iter()
            .map(|(k, v)| format!("{k}: {:.1} MB", v.as_f64().unwrap_or(0.0) / 1e6))
            .collect();
        s += &format!("  disk bytes from:     {}\n", list.join(", "));
    }
    s += &format!(
        "  counter:             {:?} -> {:?}\n",
        r.counter_before, r.counter_after
    );
    s += &format!(
        "  longest client gap:  {} ms; connection survived: {}\n",
        r.longest_gap_ms, r.connection_survived
    );
    s += &format!("  demo wall time:      {:.0} s\n", r.total_seconds);
    s
}
