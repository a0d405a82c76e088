//! Running VMs under QEMU, driven only through QMP.
//!
//! - [`qmp`]: a typed QMP client.
//! - [`qemu`]: the [`Hypervisor`] implementation for QEMU (launch, accelerator
//!   choice with a real KVM probe, incoming migration).
//! - [`image`]: a VM disk as chunks: slicing a live device or file, restoring
//!   an image file from a store.
//! - [`loopdev`]: the loop device a VM's raw image is exposed through.
//! - [`state`]: the per-VM record under the state directory.

pub mod image;
pub mod lifecycle;
pub mod loopdev;
pub mod qemu;
pub mod qmp;
pub mod state;
pub mod tls;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use qemu::{Accel, AccelChoice, Qemu};
pub use qmp::{MemoryTransport, Qmp, QmpClient};
pub use state::{StateDir, VmRecord};

/// Errors from running VMs.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("QEMU closed the QMP connection")]
    QmpClosed,
    #[error("QMP command {command} failed: {class}: {desc}")]
    QmpCommand {
        command: String,
        class: String,
        desc: String,
    },
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error("{program} failed ({status}): {stderr}")]
    Command {
        program: String,
        status: String,
        stderr: String,
    },
    #[error("VM {0} already exists on this edge")]
    Exists(String),
    #[error("no VM named {0} on this edge")]
    NoSuchVm(String),
    #[error("VM {0} is running: stop it first (`edgeshift vm stop {0}`)")]
    Running(String),
    #[error("invalid VM name {0:?}: use 1-32 letters, digits, '-' or '_'")]
    BadName(String),
    #[error("VM record {path} is unreadable: {reason}")]
    BadRecord { path: PathBuf, reason: String },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("KVM was asked for but cannot run guests here: {0}")]
    KvmUnusable(String),
}

/// The VM's network attachment: a tap on an existing bridge.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetSpec {
    pub bridge: String,
    /// Stable across migrations: the guest's NIC keeps its address.
    pub mac: String,
}

/// What a VM is, independently of where it runs: sent to the destination of a
/// migration, which must start an identical QEMU.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmSpec {
    pub name: String,
    pub memory_mib: u64,
    pub cpus: u32,
    pub accel: AccelChoice,
    /// Direct kernel boot (the test VM); `None` boots from the disk.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    pub net: Option<NetSpec>,
}

impl VmSpec {
    /// A MAC address derived from the VM's name: locally administered,
    /// unicast, the same on every edge.
    pub fn mac_for(name: &str) -> String {
        let h = blake3::hash(name.as_bytes());
        let b = h.as_bytes();
        format!("52:54:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
    }
}

/// Checks a VM name (it becomes a directory and part of a tap name).
pub fn check_name(name: &str) -> Result<(), VmError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(VmError::BadName(name.to_string()))
    }
}

/// Where a running VM's pieces are, as the hypervisor reports them.
#[derive(Debug, Clone)]
pub struct Launched {
    pub pid: u32,
    pub qmp_socket: PathBuf,
    pub accel: Accel,
}

/// Everything a hypervisor needs to start one VM on this edge.
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    pub spec: VmSpec,
    /// The block device (or file) that is the VM's disk.
    pub disk: PathBuf,
    /// Directory for the QMP socket, pid file and serial log.
    pub run_dir: PathBuf,
    /// `Some("tcp:IP:PORT")` to start waiting for an incoming migration.
    pub incoming: Option<String>,
}

/// A hypervisor that runs VMs and is driven over QMP.
pub trait Hypervisor {
    fn launch(&self, cfg: &LaunchConfig) -> Result<Launched, VmError>;
    /// Stops the VM for good: QMP `quit`, then the process if it lingers.
    fn kill(&self, pid: u32, qmp_socket: &std::path::Path) -> Result<(), VmError>;
}

pub(crate) fn run_tool(program: &str, args: &[&str]) -> Result<String, VmError> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|source| VmError::Io {
            op: "run",
            path: PathBuf::from(program),
            source,
        })?;
    if !out.status.success() {
        return Err(VmError::Command {
            program: format!("{program} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Stops a VM's QEMU, removes its tap and boot log and detaches its loop
/// device.
pub fn teardown(hv: &dyn Hypervisor, rec: &VmRecord) -> Result<(), VmError> {
    hv.kill(rec.pid, &rec.qmp_socket)?;
    if rec.spec.net.is_some() {
        qemu::remove_tap(&rec.spec.name);
    }
    if let Some(dir) = rec.image_path.parent() {
        crate::dirty::boot_log::stop_or_warn(dir);
    }
    loopdev::detach(&rec.loop_device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_macs() {
        assert!(check_name("vm-1_a").is_ok());
        for bad in ["", "a/b", "../x", "with space", &"x".repeat(33)] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        let m = VmSpec::mac_for("vm1");
        assert_eq!(m, VmSpec::mac_for("vm1"));
        assert_ne!(m, VmSpec::mac_for("vm2"));
        assert!(m.starts_with("52:54:"));
        assert_eq!(m.len(), 17);
    }
}
