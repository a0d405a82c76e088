//! QEMU as the [`Hypervisor`]: command line, tap set-up, accelerator choice.
//!
//! `-daemonize` lets a VM outlive the command that started it; everything
//! after the launch goes through the QMP socket.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{run_tool, Hypervisor, LaunchConfig, Launched, QmpClient, VmError};

/// Where the accelerator choice comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM if it really runs a guest here, TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

/// The accelerator a VM runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// How long a probe guest under KVM has to print its first console line.
/// Debian's kernel prints within a fraction of a second where KVM works.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(4);

/// The QEMU hypervisor.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub binary: PathBuf,
}

impl Default for Qemu {
    fn default() -> Self {
        Qemu {
            binary: PathBuf::from("qemu-system-x86_64"),
        }
    }
}

/// The block node of a VM's disk (QMP finds the disk by it).
pub const DISK_NODE_NAME: &str = "disk0";

/// Tap device name for a VM (at most 15 bytes, stable per VM name).
pub fn tap_name(vm: &str) -> String {
    let h = blake3::hash(vm.as_bytes());
    format!("est{}", &hex::encode(h.as_bytes())[..10])
}

impl Qemu {
    /// Resolves `auto` by probing KVM once per process; `kvm` is checked
    /// the same way and refused, with the reason, when it cannot run guests.
    pub fn resolve_accel(&self, choice: AccelChoice, probe_kernel: Option<&Path>) -> Result<Accel, VmError> {
        if choice == AccelChoice::Tcg {
            tracing::info!("accelerator: tcg (asked for)");
            return Ok(Accel::Tcg);
        }
        static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
        let verdict = PROBE.get_or_init(|| self.probe_kvm(probe_kernel));
        match (choice, verdict) {
            (_, Ok(())) => {
                tracing::info!("accelerator: kvm (a probe guest booted under KVM)");
                Ok(Accel::Kvm)
            }
            (AccelChoice::Kvm, Err(why)) => Err(VmError::KvmUnusable(why.clone())),
            (_, Err(why)) => {
                tracing::info!(reason = %why, "accelerator: tcg, because KVM cannot run guests here");
                Ok(Accel::Tcg)
            }
        }
    }

    /// Settles `auto` now, on a thread of its own, when this host has a
    /// kernel to probe KVM with: the first VM this process starts (an
    /// incoming handoff's, say) then does not wait for the probe, nor share
    /// the CPU with it (0.4 s of a probe QEMU here, during a handoff's
    /// first disk round). Without a host kernel the probe waits for the
    /// first VM's own kernel, as before.
    pub fn probe_ahead(&self) {
        if newest_host_kernel().is_none() {
            return;
        }
        let qemu = self.clone();
        let spawned = std::thread::Builder::new()
            .name("kvm-probe".into())
            .spawn(move || qemu.resolve_accel(AccelChoice::Auto, None));
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "no thread for the KVM probe; the first VM start runs it");
        }
    }

    /// Boots a kernel under KVM with no root file system and waits a few
    /// seconds for it to print on the serial console. A KVM that opens but
    /// makes no progress is caught here instead of hanging a real VM.
    fn probe_kvm(&self, kernel: Option<&Path>) -> Result<(), String> {
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            return Err(format!("/dev/kvm cannot be opened: {e}"));
        }
        let kernel = match kernel {
            Some(k) => k.to_path_buf(),
            None => newest_host_kernel().ok_or("no kernel to probe KVM with (no /boot/vmlinuz-*)")?,
        };
        let dir = tempfile_dir().map_err(|e| format!("probe directory: {e}"))?;
        let log = dir.join("probe-serial.log");
        let mut probe = Command::new(&self.binary);
        // The probe QEMU must not outlive an agent stopped mid-probe (a KVM
        // that makes no progress would keep it spinning for ever).
        // SAFETY: the closure runs in the forked child before exec and only
        // calls prctl(2), which is async-signal-safe and touches no memory
        // of the parent.
        unsafe {
            probe.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = probe
            .args([
                "-accel",
                "kvm",
                "-machine",
                "q35",
                "-cpu",
                "host",
                "-m",
                "128",
                "-nodefaults",
            ])
            .args(["-display", "none", "-no-reboot", "-kernel"])
            .arg(&kernel)
            .args(["-append", "console=ttyS0 panic=-1", "-serial"])
            .arg(format!("file:{}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.binary.display()))?;
        let start = Instant::now();
        let verdict = loop {
            let printed = std::fs::read(&log)
                .map(|b| b.windows(13).any(|w| w == b"Linux version"))
                .unwrap_or(false);
            if printed {
                break Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                break Err(format!(
                    "probe QEMU exited ({status}) before the guest printed anything: {}",
                    err.trim()
                ));
            }
            if start.elapsed() > KVM_PROBE_TIMEOUT {
                break Err(format!(
                    "a guest under KVM printed nothing in {} s (KVM opens but makes no progress)",
                    KVM_PROBE_TIMEOUT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
        verdict
    }

    /// The full QEMU command line for a VM.
    pub fn command_line(&self, cfg: &LaunchConfig, accel: Accel) -> Vec<String> {
        let spec = &cfg.spec;
        let run = |f: &str| cfg.run_dir.join(f).display().to_string();
        let mut a: Vec<String> = vec![
            "-name".into(),
            spec.name.clone(),
            "-machine".into(),
            "q35".into(),
            "-accel".into(),
            accel.as_str().into(),
        ];
        if accel == Accel::Kvm {
            a.extend(["-cpu".into(), "host".into()]);
        }
        a.extend([
            "-m".into(),
            spec.memory_mib.to_string(),
            "-smp".into(),
            spec.cpus.to_string(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-serial".into(),
            format!("file:{}", run("serial.log")),
            "-blockdev".into(),
            format!(
                "driver=host_device,filename={},node-name={DISK_NODE_NAME},cache.direct=on,cache.no-flush=off,aio=native",
                cfg.disk.display()
            ),
            "-device".into(),
            format!("virtio-blk-pci,drive={DISK_NODE_NAME},id=vd0"),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", run("qmp.sock")),
            "-pidfile".into(),
            run("qemu.pid"),
            "-daemonize".into(),
        ]);
        if let Some(k) = &spec.kernel {
            a.extend(["-kernel".into(), k.display().to_string()]);
        }
        if let Some(i) = &spec.initrd {
            a.extend(["-initrd".into(), i.display().to_string()]);
        }
        if let Some(ap) = &spec.append {
            a.extend(["-append".into(), ap.clone()]);
        }
        if let Some(net) = &spec.net {
            a.extend([
                "-netdev".into(),
                format!(
                    "tap,id=net0,ifname={},script=no,downscript=no",
                    tap_name(&spec.name)
                ),
                "-device".into(),
                format!("virtio-net-pci,netdev=net0,mac={}", net.mac),
            ]);
        }
        if let Some(uri) = &cfg.incoming {
            a.extend(["-incoming".into(), uri.clone()]);
        }
        a
    }
}

/// Below this many free bytes a file system counts as full for QEMU's
/// start (its pid file, its QMP socket).
const FULL_BELOW: u64 = 1 << 20;

/// Bytes an unprivileged writer may still use on `path`'s file system.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and `st`
    // points to writable memory the size of a `statvfs`, which the kernel
    // fills when the call returns 0 (read only then).
    let st = unsafe {
        if libc::statvfs(c.as_ptr(), st.as_mut_ptr()) != 0 {
            return None;
        }
        st.assume_init()
    };
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

fn newest_host_kernel() -> Option<PathBuf> {
    let mut ks: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    ks.sort();
    ks.pop()
}

fn tempfile_dir() -> std::io::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("edgeshift-kvm-probe-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Creates the VM's tap on `bridge` (replacing a stale one of the same name).
fn setup_tap(vm: &str, bridge: &str) -> Result<(), VmError> {
    let tap = tap_name(vm);
    let _ = run_tool("ip", &["link", "del", &tap]);
    run_tool("ip", &["tuntap", "add", "dev", &tap, "mode", "tap"])?;
    if let Err(e) = run_tool("ip", &["link", "set", &tap, "master", bridge, "up"]) {
        let _ = run_tool("ip", &["link", "del", &tap]);
        return Err(e);
    }
    Ok(())
}

/// Removes a VM's tap, if any.
pub fn remove_tap(vm: &str) {
    let _ = run_tool("ip", &["link", "del", &tap_name(vm)]);
}

/// True while `pid` runs. A zombie counts as gone: a daemonized QEMU is
/// re-parented to whatever PID 1 is, which may never reap it.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

impl Hypervisor for Qemu {
    fn launch(&self, cfg: &LaunchConfig) -> Result<Launched, VmError> {
        let accel = self.resolve_accel(cfg.spec.accel, cfg.spec.kernel.as_deref())?;
        std::fs::create_dir_all(&cfg.run_dir).map_err(|source| VmError::Io {
            op: "create directory",
            path: cfg.run_dir.clone(),
            source,
        })?;
        for stale in ["qmp.sock", "qemu.pid"] {
            let _ = std::fs::remove_file(cfg.run_dir.join(stale));
        }
        if let Some(net) = &cfg.spec.net {
            setup_tap(&cfg.spec.name, &net.bridge)?;
        }
        let args = self.command_line(cfg, accel);
        tracing::info!(vm = %cfg.spec.name, accel = accel.as_str(), incoming = ?cfg.incoming, "starting QEMU");
        tracing::debug!(?args, "QEMU command line");
        let out = Command::new(&self.binary)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| VmError::Io {
                op: "run",
                path: self.binary.clone(),
                source,
            })?;
        if !out.status.success() {
            if cfg.spec.net.is_some() {
                remove_tap(&cfg.spec.name);
            }
            let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            // QEMU says only "Failed to write pid file" when the run
            // directory's file system is full (an incoming VM's image
            // filling it, say): name the cause.
            if let Some(free) = free_bytes(&cfg.run_dir).filter(|&f| f < FULL_BELOW) {
                stderr.push_str(&format!(
                    " (no space left on the file system of {}: {free} bytes free)",
                    cfg.run_dir.display()
                ));
            }
            return Err(VmError::Command {
                program: self.binary.display().to_string(),
                status: out.status.to_string(),
                stderr,
            });
        }
        let pid_path = cfg.run_dir.join("qemu.pid");
        let pid: u32 = std::fs::read_to_string(&pid_path)
            .map_err(|source| VmError::Io {
                op: "read",
                path: pid_path.clone(),
                source,
            })?
            .trim()
            .parse()
            .map_err(|e| VmError::Qmp(format!("QEMU pid file {}: {e}", pid_path.display())))?;
        let qmp_socket = cfg.run_dir.join("qmp.sock");
        // The socket exists once -daemonize returns; a session proves QEMU answers.
        let mut qmp = QmpClient::connect(&qmp_socket, Duration::from_secs(10))?;
        let status = qmp.query_status()?;
        tracing::info!(vm = %cfg.spec.name, pid, status = %status.status, "QEMU is up");
        Ok(Launched {
            pid,
            qmp_socket,
            accel,
        })
    }

    fn kill(&self, pid: u32, qmp_socket: &Path) -> Result<(), VmError> {
        if let Ok(mut q) = QmpClient::connect(qmp_socket, Duration::from_millis(500)) {
            if let Err(e) = q.quit() {
                tracing::warn!(pid, error = %e, "QMP quit failed; signalling QEMU");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if pid_alive(pid) {
            // SAFETY: kill(2) with a pid we started and a valid signal number has no memory effects.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while pid_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_bytes_reads_the_file_system_and_is_none_for_a_missing_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(free_bytes(dir.path()).is_some_and(|f| f > 0));
        assert_eq!(free_bytes(&dir.path().join("no-such-dir")), None);
    }
}
