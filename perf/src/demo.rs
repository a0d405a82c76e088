//! The demo: the edge3 topology plus a client, one L2 segment joining the
//! edges' VM bridges and the client, an HTTPS coordinator with the cluster's
//! certificate and agents linked to it, the test VM
//! (perf/images/build-test-vm.sh) booted at e1 with its disk held by e1 and
//! e3, a client holding a TCP connection to the VM's counter service, and
//! the handoff to e2 asked as an edge platform would: `POST
//! /v1/vms/vm1/handoff {"to":"e2"}` with the operator certificate, followed
//! by `GET` to its final report. Afterwards: whether the client's connection
//! survived, how the counter went on, the guest's own disk check at e2, and
//! the handoff's report. Everything is torn down at the end.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cluster::{Binaries, Cluster, Programs};
use crate::images::repo_root;
use crate::operator_api::OperatorApi;
use crate::scenario::{io, must, ScenarioError};
use crate::signals;
use crate::topology::Topology;
use edgeshift_testbed::{self as testbed, LinkSpec};

const SEGMENT: &str = "vmnet";
const VM: &str = "vm1";
/// A handoff the coordinator has not finished by then failed the demo.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(300);

/// What the demo saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DemoRecord {
    pub ok: bool,
    pub error: Option<String>,
    pub boot_seconds: f64,
    /// From the `POST` to the `GET` saying done.
    pub migrate_seconds: f64,
    /// The handoff's final report from `GET /v1/vms/vm1/handoff` (the
    /// fields of `edgeshift migrate --json`).
    pub migrate: serde_json::Value,
    /// The handoff's phases in the order `GET` showed them.
    pub handoff_phases: Vec<String>,
    /// The last `GET /v1/vms/vm1/handoff` (its report moved to `migrate`).
    pub handoff: serde_json::Value,
    /// The guest's own disk check at e2 (`es-check`, "check ok ...").
    pub disk_check: String,
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
    // Agents listen on routed addresses: the coordinator's plan names each by
    // the one address it advertises, which every edge must reach.
    tb.route_host_addrs()?;
    tb.l2_segment(SEGMENT, &["e1", "e2", "e3", "client"], LinkSpec::default())?;
    let vm_ip = tb
        .segment(SEGMENT)?
        .guest_addr(0)
        .ok_or_else(|| ScenarioError::Output("demo".into(), "no guest address".into()))?;
    let _ = std::fs::remove_dir_all(work);
    let cluster_dir = work.join("cluster");
    // Sliced before the agents start, so their first inventory at the
    // coordinator already lists the chunks (its plan names e3 as a holder).
    log("stores: the VM's base disk sliced at e1 (its edge) and e3 (a neighbour)");
    let bin = match &programs.bins {
        Some(b) => b.edgeshift.clone(),
        None => {
            Binaries::locate()
                .map_err(crate::cluster::ClusterError::from)?
                .edgeshift
        }
    };
    let mut id = String::new();
    for h in ["e1", "e3"] {
        let out = must(
            Command::new(&bin)
                .arg("slice")
                .arg(vm_dir.join("base.raw"))
                .arg("--store")
                .arg(cluster_dir.join(h).join("store")),
            "edgeshift slice",
        )?;
        id = out.lines().last().unwrap_or_default().trim().to_string();
    }
    log("cluster: HTTPS coordinator at origin (the cluster's certificate), an agent per host linked to it");
    let cluster = Cluster::start_coordinated(&tb, &topo, &cluster_dir, programs)?;
    let api = OperatorApi::new(&cluster)?;
    let coordinator_url = cluster.coordinator_api.clone().unwrap_or_default();
    let store = |h: &str| cluster.store(h).map(Path::to_path_buf).unwrap_or_default();
    let state = |h: &str| cluster.state(h);

    let mut rec = DemoRecord::default();
    let mut children: Vec<Child> = Vec::new();
    let result = (|| -> Result<(), ScenarioError> {
        log(&format!("VM: booting {VM} at e1 under QEMU (address {vm_ip})"));
        let boot = Instant::now();
        let mut coord_args = cluster
            .creds
            .args("e1")
            .map_err(crate::cluster::ClusterError::from)?;
        if !coordinator_url.is_empty() {
            // The VM's image counts as referenced by e1 at the coordinator.
            coord_args.extend(["--coordinator".into(), coordinator_url.clone()]);
        }
        coord_args.extend(["--id".into(), "e1".into()]);
        must(
            tb.command("e1", &bin)
                .args(["vm", "run", VM, "--image", &id, "--store"])
                .arg(store("e1"))
                .arg("--state-dir")
                .arg(state("e1"))
                .args(["--net", SEGMENT, "--memory", "128MiB", "--kernel"])
                .arg(vm_dir.join("vmlinuz"))
                .arg("--initrd")
                .arg(vm_dir.join("initramfs.gz"))
                .args(["--append", &format!("console=ttyS0 quiet es_ip={vm_ip}/24")])
                .args(&coord_args),
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
            "client: connected to the VM's counter after {:.1} s",
            rec.boot_seconds
        ));
        wait_placed(&tb, &api, "e1", Duration::from_secs(60))?;
        std::thread::sleep(Duration::from_secs(2));
        rec.counter_before = stream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lines
            .last()
            .map(|l| l.1);
        let t_mig = Instant::now();
        log(&format!("operator: POST /v1/vms/{VM}/handoff {{\"to\":\"e2\"}}"));
        let (status, ordered) = api.request(
            &tb,
            "POST",
            &format!("/v1/vms/{VM}/handoff"),
            Some(&serde_json::json!({ "to": "e2" })),
        )?;
        if status != 202 {
            return Err(ScenarioError::Output(
                "POST handoff".into(),
                format!("HTTP {status}: {ordered}"),
            ));
        }
        let mut last = follow_handoff(&tb, &api, &mut rec.handoff_phases, log)?;
        rec.migrate_seconds = t_mig.elapsed().as_secs_f64();
        if let Some(obj) = last.as_object_mut() {
            rec.migrate = obj.remove("report").unwrap_or_default();
        }
        rec.handoff = last;
        if rec.handoff["state"] != "done" {
            return Err(ScenarioError::Output(
                "the handoff".into(),
                format!("ended {}: {}", rec.handoff["state"], rec.handoff["error"]),
            ));
        }
        wait_placed(&tb, &api, "e2", Duration::from_secs(10))?;
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
        drop(s);
        let rising = matches!((rec.counter_before, rec.counter_after), (Some(a), Some(b)) if b > a);
        rec.disk_check = guest_disk_check(&tb, &vm_ip.to_string());
        log(&format!("guest at e2: {}", rec.disk_check));
        if !rec.connection_survived || !rising || !rec.disk_check.starts_with("check ok") {
            return Err(ScenarioError::Output(
                "demo".into(),
                format!(
                    "after the handoff: connection open {}, counter {:?} -> {:?}, disk: {}",
                    rec.connection_survived, rec.counter_before, rec.counter_after, rec.disk_check
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
                .args(["vm", verb, VM, "--state-dir"])
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
    s += &format!(
        "  handoff over HTTP:   {:.1} s wall (POST to GET done)\n",
        r.migrate_seconds
    );
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
    s += &format!("  guest disk at e2:    {}\n", r.disk_check);
    s += &format!("  demo wall time:      {:.0} s\n", r.total_seconds);
    s
}

/// Polls `GET /v1/vms/vm1/handoff`, logging each new phase, until the
/// handoff is done or failed; returns the last answer.
fn follow_handoff(
    tb: &testbed::Testbed,
    api: &OperatorApi,
    phases: &mut Vec<String>,
    log: &dyn Fn(&str),
) -> Result<serde_json::Value, ScenarioError> {
    let deadline = Instant::now() + HANDOFF_TIMEOUT;
    let mut state = String::new();
    loop {
        let (status, v) = api.get(tb, &format!("/v1/vms/{VM}/handoff"))?;
        if status != 200 {
            return Err(ScenarioError::Output(
                "GET handoff".into(),
                format!("HTTP {status}: {v}"),
            ));
        }
        if let Some(p) = v["phase"].as_str() {
            if phases.last().map(String::as_str) != Some(p) {
                log(&format!("handoff phase: {p}"));
                phases.push(p.to_string());
            }
        }
        let now_state = v["state"].as_str().unwrap_or("?").to_string();
        if now_state != state {
            // The source posts bytes and rounds with its final state.
            let moved = match now_state.as_str() {
                "done" | "failed" => format!(
                    " ({:.1} MB moved, {} disk rounds)",
                    v["bytes"].as_f64().unwrap_or(0.0) / 1e6,
                    v["rounds"]
                ),
                _ => String::new(),
            };
            log(&format!("handoff {}: {now_state}{moved}", v["id"]));
            state = now_state;
        }
        if matches!(state.as_str(), "done" | "failed") {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(ScenarioError::Output(
                "GET handoff".into(),
                format!("not over after {HANDOFF_TIMEOUT:?}: {v}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Waits until the coordinator's `GET /v1/vms` places vm1 at `edge` (the
/// agents report their VMs every link step).
fn wait_placed(
    tb: &testbed::Testbed,
    api: &OperatorApi,
    edge: &str,
    timeout: Duration,
) -> Result<(), ScenarioError> {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, v) = api.get(tb, "/v1/vms")?;
        if v["vms"][VM] == edge {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(ScenarioError::Output(
                "GET /v1/vms".into(),
                format!("{VM} not placed at {edge} within {timeout:?}: {v}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The guest's own check of its disk (`es-check` on TCP 7001: everything
/// the workload remembers writing, read back bypassing the page cache),
/// asked from the client.
fn guest_disk_check(tb: &testbed::Testbed, vm_ip: &str) -> String {
    let out = tb
        .command("client", "socat")
        .args([
            "-u",
            "-T",
            "60",
            &format!("TCP:{vm_ip}:7001,connect-timeout=10"),
            "-",
        ])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Err(e) => format!("socat: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The summary reads the handoff's report as `GET /v1/vms/vm1/handoff`
    /// returns it (the `migrate --json` fields) and the guest's disk check.
    #[test]
    fn summary_shows_the_get_report_and_the_disk_check() {
        let get: serde_json::Value = serde_json::json!({
            "id": 1, "vm": "vm1", "from": "e1", "to": "e2", "state": "done",
            "phase": "pause", "bytes": 378752596u64, "rounds": 2,
            "report": {
                "downtime_ms": 90,
                "phases": [{"phase": "precopy", "seconds": 14.7}, {"phase": "pause", "seconds": 0.1}],
                "rounds": [{"round": 0}, {"round": 1}],
                "bytes_by_source": {"198.19.250.2:7070": 178343496u64}
            }
        });
        let rec = DemoRecord {
            ok: true,
            migrate_seconds: 22.3,
            migrate: get["report"].clone(),
            handoff_phases: vec!["plan".into(), "precopy".into(), "pause".into()],
            disk_check: "check ok slots=55 counter=140".into(),
            counter_before: Some(14),
            counter_after: Some(139),
            longest_gap_ms: 403,
            connection_survived: true,
            ..DemoRecord::default()
        };
        let s = summary(&rec);
        for want in [
            "handed off, client connected throughout",
            "handoff over HTTP:   22.3 s wall",
            "phases:              precopy 14.7 s, pause 0.1 s",
            "downtime:            90 ms",
            "pre-copy rounds:     2",
            "198.19.250.2:7070: 178.3 MB",
            "longest client gap:  403 ms; connection survived: true",
            "guest disk at e2:    check ok slots=55 counter=140",
        ] {
            assert!(s.contains(want), "{want:?} missing from:\n{s}");
        }
    }
}
