//! QEMU's own shared-nothing migration, the live baseline: the destination
//! starts the same QEMU (same devices) on an empty disk of the same size with
//! `-incoming defer` and exports that disk over NBD; the source mirrors its
//! disk into the export (`blockdev-mirror`, write-blocking once ready, as
//! `virsh migrate --copy-storage-all` does), then migrates memory the way
//! `edgeshift migrate` does (multifd with zstd) plus auto-converge (`virsh
//! migrate --auto-converge`): with QEMU's plain defaults the busy test
//! guest's memory never converged at 10 Mbit/s here, so this isolates the disk.
//!
//! The destination's command line is the source QEMU's own (read from
//! /proc/PID/cmdline) with its run directory and disk replaced, so both sides
//! have the same devices without this crate knowing how the agent builds
//! them. QMP goes through the agent's typed client.
//!
//! Note for `migrate-bench` (perf/src/bin/migrate-bench.rs, another owner):
//! its `qemu_run` does the same steps; it can call [`mirror_and_migrate`].

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edgeshift_agent::vm::{QmpClient, VmError};
use serde_json::{json, Value};

const NBD_PORT: u16 = 10809;
const MIGRATION_PORT: u16 = 4444;
/// multifd channels, as the agent's memory transport uses.
const MULTIFD_CHANNELS: u32 = 2;

/// Errors of the QEMU baseline.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(transparent)]
    Qmp(#[from] VmError),
    #[error("{0}")]
    Protocol(String),
    #[error("{cmd} failed: {stderr}")]
    Tool { cmd: String, stderr: String },
    #[error("timed out: {0}")]
    Timeout(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> QemuError {
    let what = what.into();
    move |source| QemuError::Io { what, source }
}

fn run(cmd: &mut Command) -> Result<String, QemuError> {
    let line = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("starting {line}")))?;
    if !out.status.success() {
        return Err(QemuError::Tool {
            cmd: line,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The running source VM, from its `edgeshift vm run` record (vm.json).
#[derive(Debug, Clone)]
pub struct SourceVm {
    pub pid: u32,
    pub qmp_socket: PathBuf,
    pub loop_device: PathBuf,
    /// Bridge its NIC's tap is enslaved to, if it has a NIC.
    pub bridge: Option<String>,
}

impl SourceVm {
    /// Reads the fields this baseline needs from an agent's VM record.
    pub fn from_record(path: &Path) -> Result<Self, QemuError> {
        let text = std::fs::read_to_string(path).map_err(io(format!("reading {}", path.display())))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| QemuError::Protocol(format!("{}: {e}", path.display())))?;
        let field = |k: &str| {
            v[k].as_str()
                .map(PathBuf::from)
                .ok_or_else(|| QemuError::Protocol(format!("{}: no {k}", path.display())))
        };
        Ok(SourceVm {
            pid: v["pid"]
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .ok_or_else(|| QemuError::Protocol(format!("{}: no pid", path.display())))?,
            qmp_socket: field("qmp_socket")?,
            loop_device: field("loop_device")?,
            bridge: v["spec"]["net"]["bridge"].as_str().map(str::to_string),
        })
    }

    /// QEMU's argv (program first) from /proc.
    fn argv(&self) -> Result<Vec<String>, QemuError> {
        let raw = std::fs::read(format!("/proc/{}/cmdline", self.pid))
            .map_err(io(format!("reading the command line of QEMU pid {}", self.pid)))?;
        let argv: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if argv.is_empty() {
            return Err(QemuError::Protocol(format!(
                "QEMU pid {} has no command line",
                self.pid
            )));
        }
        Ok(argv)
    }
}

/// The destination's command line: the source's, with its run directory and
/// disk replaced, any `-incoming` dropped and `-incoming defer` added.
pub fn destination_argv(
    src_argv: &[String],
    src_run: &Path,
    src_disk: &Path,
    dst_run: &Path,
    dst_disk: &Path,
) -> Vec<String> {
    let (sr, sd) = (src_run.display().to_string(), src_disk.display().to_string());
    let (dr, dd) = (dst_run.display().to_string(), dst_disk.display().to_string());
    let mut out = Vec::with_capacity(src_argv.len() + 2);
    let mut skip_next = false;
    for a in src_argv {
        if skip_next {
            skip_next = false;
            continue;
        }
        if a == "-incoming" {
            skip_next = true;
            continue;
        }
        out.push(a.replace(&sd, &dd).replace(&sr, &dr));
    }
    out.extend(["-incoming".to_string(), "defer".to_string()]);
    out
}

/// The tap name in `-netdev tap,...,ifname=NAME,...`, if any.
pub fn tap_of(argv: &[String]) -> Option<String> {
    argv.windows(2)
        .filter(|w| w[0] == "-netdev" && w[1].starts_with("tap,"))
        .find_map(|w| {
            w[1].split(',')
                .find_map(|kv| kv.strip_prefix("ifname=").map(str::to_string))
        })
}

/// What the baseline measured.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MirrorOutcome {
    /// From the mirror's start to migration completed.
    pub total_seconds: f64,
    /// Until the mirror reported ready (the whole disk copied once).
    pub mirror_ready_seconds: f64,
    pub downtime_ms: u64,
    /// RAM bytes QEMU transferred.
    pub memory_bytes: u64,
    /// Size of the disk mirrored.
    pub disk_size: u64,
    /// The destination VM was running after the switch.
    pub destination_running: bool,
}

/// The migrated VM at the destination: its QEMU, loop device and tap, all
/// removed on drop (after the caller checked the guest).
pub struct QemuDestination {
    netns: String,
    run_dir: PathBuf,
    loop_dev: Option<String>,
    tap: Option<String>,
}

impl Drop for QemuDestination {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.run_dir.join("qemu.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: kill(2) with a pid read from QEMU's own pid file and a
                // valid signal number has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                for _ in 0..50 {
                    if !Path::new(&format!("/proc/{pid}")).exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        if let Some(tap) = &self.tap {
            let _ = Command::new("ip")
                .args(["-n", &self.netns, "link", "del", tap])
                .stderr(Stdio::null())
                .status();
        }
        if let Some(dev) = &self.loop_dev {
            let _ = Command::new("losetup")
                .args(["-d", dev])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// QEMU's shared-nothing migration of `src` (running in any namespace) to a
/// new QEMU in namespace `dst_netns`, reached at `dst_ip`; destination files
/// live in `dst_run` (created). The source is left paused (post-migrate);
/// the destination keeps running until the returned guard is dropped.
pub fn mirror_and_migrate(
    src: &SourceVm,
    dst_netns: &str,
    dst_ip: Ipv4Addr,
    dst_run: &Path,
    timeout: Duration,
) -> Result<(MirrorOutcome, QemuDestination), QemuError> {
    let argv = src.argv()?;
    let src_run = src
        .qmp_socket
        .parent()
        .ok_or_else(|| QemuError::Protocol("QMP socket has no directory".into()))?;
    std::fs::create_dir_all(dst_run).map_err(io("creating the destination run dir"))?;
    let disk_size: u64 = run(Command::new("blockdev").arg("--getsize64").arg(&src.loop_device))?
        .trim()
        .parse()
        .map_err(|e| QemuError::Protocol(format!("blockdev --getsize64: {e}")))?;
    let img = dst_run.join("disk.raw");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(disk_size))
        .map_err(io("creating the destination disk"))?;
    let mut dst = QemuDestination {
        netns: dst_netns.to_string(),
        run_dir: dst_run.to_path_buf(),
        loop_dev: None,
        tap: None,
    };
    let dev = run(Command::new("losetup")
        .args(["--find", "--show", "--direct-io=on"])
        .arg(&img))?
    .trim()
    .to_string();
    dst.loop_dev = Some(dev.clone());
    let dst_argv = destination_argv(&argv, src_run, &src.loop_device, dst_run, Path::new(&dev));
    if let (Some(tap), Some(bridge)) = (tap_of(&dst_argv), &src.bridge) {
        let _ = Command::new("ip")
            .args(["-n", dst_netns, "link", "del", &tap])
            .stderr(Stdio::null())
            .status();
        run(Command::new("ip").args(["-n", dst_netns, "tuntap", "add", "dev", &tap, "mode", "tap"]))?;
        dst.tap = Some(tap.clone());
        run(Command::new("ip").args(["-n", dst_netns, "link", "set", &tap, "master", bridge, "up"]))?;
    }
    // -daemonize: the command returns once QEMU is up.
    run(Command::new("ip")
        .args(["netns", "exec", dst_netns])
        .args(&dst_argv))?;
    let mut dq = QmpClient::connect(&dst_run.join("qmp.sock"), Duration::from_secs(10))?;
    let mut sq = QmpClient::connect(&src.qmp_socket, Duration::from_secs(5))?;
    let host = dst_ip.to_string();
    // Memory moves the way `edgeshift migrate` moves it (multifd, zstd), plus
    // auto-converge; set on both ends before migrate-incoming.
    for q in [&mut dq, &mut sq] {
        q.execute_raw(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [
                {"capability": "multifd", "state": true},
                {"capability": "auto-converge", "state": true}
            ]})),
        )?;
        q.execute_raw(
            "migrate-set-parameters",
            Some(json!({"multifd-channels": MULTIFD_CHANNELS, "multifd-compression": "zstd"})),
        )?;
    }
    dq.execute_raw(
        "nbd-server-start",
        Some(json!({"addr": {"type": "inet", "data": {"host": host, "port": NBD_PORT.to_string()}}})),
    )?;
    dq.execute_raw(
        "block-export-add",
        Some(json!({"type": "nbd", "id": "exp0", "node-name": "disk0", "name": "disk0", "writable": true})),
    )?;
    dq.execute_raw(
        "migrate-incoming",
        Some(json!({"uri": format!("tcp:{host}:{MIGRATION_PORT}")})),
    )?;
    let t0 = Instant::now();
    let deadline = t0 + timeout;
    sq.execute_raw(
        "blockdev-add",
        Some(
            json!({"driver": "nbd", "node-name": "es-mirror-target", "export": "disk0",
                     "server": {"type": "inet", "host": host, "port": NBD_PORT.to_string()}}),
        ),
    )?;
    sq.execute_raw(
        "blockdev-mirror",
        Some(
            json!({"job-id": "es-mirror", "device": "disk0", "target": "es-mirror-target",
                     "sync": "full", "copy-mode": "write-blocking"}),
        ),
    )?;
    loop {
        let jobs = sq.execute_raw("query-block-jobs", None)?;
        let job = jobs
            .as_array()
            .and_then(|j| j.iter().find(|x| x["device"] == "es-mirror"));
        match job {
            Some(j) if j["ready"] == true => break,
            Some(_) => {}
            None => return Err(QemuError::Protocol("the mirror job disappeared".into())),
        }
        if Instant::now() > deadline {
            return Err(QemuError::Timeout("QEMU's mirror never became ready".into()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mirror_ready_seconds = t0.elapsed().as_secs_f64();
    sq.execute_raw(
        "migrate",
        Some(json!({"uri": format!("tcp:{host}:{MIGRATION_PORT}")})),
    )?;
    let done = loop {
        let m = sq.execute_raw("query-migrate", None)?;
        match m["status"].as_str() {
            Some("completed") => break m,
            Some("failed") | Some("cancelled") => {
                return Err(QemuError::Protocol(format!(
                    "QEMU migration {}: {}",
                    m["status"],
                    m["error-desc"].as_str().unwrap_or("")
                )))
            }
            _ => {}
        }
        if Instant::now() > deadline {
            let _ = sq.execute_raw("migrate_cancel", None);
            return Err(QemuError::Timeout(
                "QEMU's memory migration did not finish".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let total_seconds = t0.elapsed().as_secs_f64();
    // The source is paused now; the mirror's last writes are in the export.
    sq.execute_raw("block-job-cancel", Some(json!({"device": "es-mirror"})))?;
    // The destination resumes the guest once it has loaded the last state.
    let mut destination_running = false;
    let resume_deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < resume_deadline {
        if dq.execute_raw("query-status", None)?["status"] == "running" {
            destination_running = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = dq.execute_raw("block-export-del", Some(json!({"id": "exp0"})));
    let _ = dq.execute_raw("nbd-server-stop", None);
    Ok((
        MirrorOutcome {
            total_seconds,
            mirror_ready_seconds,
            downtime_ms: done["downtime"].as_u64().unwrap_or(0),
            memory_bytes: done["ram"]["transferred"].as_u64().unwrap_or(0),
            disk_size,
            destination_running,
        },
        dst,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_argv_swaps_run_dir_and_disk() {
        let src: Vec<String> = [
            "qemu-system-x86_64",
            "-blockdev",
            "driver=host_device,filename=/dev/loop3,node-name=disk0",
            "-qmp",
            "unix:/s/vm1/qmp.sock,server=on,wait=off",
            "-pidfile",
            "/s/vm1/qemu.pid",
            "-incoming",
            "tcp:1.2.3.4:5",
            "-netdev",
            "tap,id=net0,ifname=es-vm1,script=no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let d = destination_argv(
            &src,
            Path::new("/s/vm1"),
            Path::new("/dev/loop3"),
            Path::new("/d/run"),
            Path::new("/dev/loop9"),
        );
        assert!(d.contains(&"driver=host_device,filename=/dev/loop9,node-name=disk0".to_string()));
        assert!(d.contains(&"/d/run/qemu.pid".to_string()));
        assert!(
            !d.iter().any(|a| a.contains("1.2.3.4")),
            "old -incoming kept: {d:?}"
        );
        assert_eq!(&d[d.len() - 2..], &["-incoming".to_string(), "defer".to_string()]);
        assert_eq!(tap_of(&d).as_deref(), Some("es-vm1"));
        assert_eq!(tap_of(&src[..3]), None);
    }

    #[test]
    fn record_without_fields_is_rejected() {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = dir.path().join("vm.json");
        std::fs::write(&p, r#"{"pid": 1}"#).expect("write");
        assert!(SourceVm::from_record(&p).is_err());
        std::fs::write(&p, "not json").expect("write");
        assert!(SourceVm::from_record(&p).is_err());
        assert!(SourceVm::from_record(&dir.path().join("absent.json")).is_err());
    }
}
