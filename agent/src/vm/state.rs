//! The record of each VM on this edge: `STATE_DIR/NAME/vm.json` next to the
//! VM's QMP socket, pid file, serial log and (by default) its image file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{check_name, Accel, VmError, VmSpec};

/// Default state directory: on disk, so stopped VMs and their writes
/// survive a reboot (`/run` is usually a tmpfs).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/edgeshift/vms";

/// What this edge knows about one of its VMs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    pub spec: VmSpec,
    pub pid: u32,
    pub accel: Accel,
    pub qmp_socket: PathBuf,
    pub loop_device: PathBuf,
    pub image_path: PathBuf,
    /// Hex id of the manifest the disk was restored from (or received as).
    pub manifest_id: String,
    pub store: PathBuf,
    /// Seconds since the epoch when it started here.
    pub started_at: u64,
    /// Bring the VM back when the agent starts and finds it not running
    /// (after a reboot, say), unless it was stopped on purpose.
    #[serde(default)]
    pub autostart: bool,
    /// Stopped on purpose (`vm stop`): the disk and this record stay, no
    /// QEMU runs, and `pid` and `loop_device` are stale.
    #[serde(default)]
    pub stopped: bool,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The VM's own directory (not created).
    pub fn vm_dir(&self, name: &str) -> Result<PathBuf, VmError> {
        check_name(name)?;
        Ok(self.root.join(name))
    }

    fn record_path(&self, name: &str) -> Result<PathBuf, VmError> {
        Ok(self.vm_dir(name)?.join("vm.json"))
    }

    pub fn exists(&self, name: &str) -> Result<bool, VmError> {
        Ok(self.record_path(name)?.is_file())
    }

    pub fn load(&self, name: &str) -> Result<VmRecord, VmError> {
        let path = self.record_path(name)?;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VmError::NoSuchVm(name.to_string()))
            }
            Err(source) => {
                return Err(VmError::Io {
                    op: "read",
                    path,
                    source,
                })
            }
        };
        serde_json::from_slice(&bytes).map_err(|e| VmError::BadRecord {
            path,
            reason: e.to_string(),
        })
    }

    /// Writes the record atomically (temp file + rename).
    pub fn save(&self, rec: &VmRecord) -> Result<(), VmError> {
        let dir = self.vm_dir(&rec.spec.name)?;
        std::fs::create_dir_all(&dir).map_err(|source| VmError::Io {
            op: "create directory",
            path: dir.clone(),
            source,
        })?;
        let path = dir.join("vm.json");
        let tmp = dir.join("vm.json.tmp");
        let bytes = serde_json::to_vec_pretty(rec).map_err(|e| VmError::BadRecord {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        std::fs::write(&tmp, bytes).map_err(|source| VmError::Io {
            op: "write",
            path: tmp.clone(),
            source,
        })?;
        std::fs::rename(&tmp, &path).map_err(|source| VmError::Io {
            op: "rename",
            path,
            source,
        })
    }

    /// Removes the record only (the directory keeps the image if it is there).
    pub fn remove_record(&self, name: &str) -> Result<(), VmError> {
        let path = self.record_path(name)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(VmError::Io {
                op: "remove",
                path,
                source,
            }),
        }
    }

    /// Every VM record here, sorted by name; unreadable records are errors.
    pub fn list(&self) -> Result<Vec<VmRecord>, VmError> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(source) => {
                return Err(VmError::Io {
                    op: "read directory",
                    path: self.root.clone(),
                    source,
                })
            }
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if check_name(&name).is_ok() && e.path().join("vm.json").is_file() {
                out.push(self.load(&name)?);
            }
        }
        out.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        Ok(out)
    }
}

/// True if the VM's QEMU process is alive: its pid runs and is the QEMU
/// of this VM (its command line names the VM's QMP socket), not a process
/// that took the pid over after a reboot.
pub fn is_running(rec: &VmRecord) -> bool {
    if rec.stopped || !super::qemu::pid_alive(rec.pid) {
        return false;
    }
    let socket = rec.qmp_socket.to_string_lossy();
    match std::fs::read(format!("/proc/{}/cmdline", rec.pid)) {
        Ok(cmdline) => cmdline
            .split(|&b| b == 0)
            .any(|arg| String::from_utf8_lossy(arg).contains(socket.as_ref())),
        // Another user's process, or gone since: not this VM.
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::AccelChoice;

    #[test]
    fn save_load_list_and_bad_records() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sd = StateDir::new(dir.path());
        assert!(sd.list().expect("empty list").is_empty());
        assert!(matches!(sd.load("nope"), Err(VmError::NoSuchVm(_))));
        assert!(matches!(sd.load("../etc"), Err(VmError::BadName(_))));
        let rec = VmRecord {
            spec: VmSpec {
                name: "vm1".into(),
                memory_mib: 128,
                cpus: 1,
                accel: AccelChoice::Tcg,
                kernel: None,
                initrd: None,
                append: None,
                net: None,
            },
            pid: 1,
            accel: Accel::Tcg,
            qmp_socket: "/x/qmp.sock".into(),
            loop_device: "/dev/loop9".into(),
            image_path: "/x/disk.raw".into(),
            manifest_id: "00".repeat(32),
            store: "/store".into(),
            started_at: 0,
            autostart: false,
            stopped: false,
        };
        // pid 1 runs, but it is not this VM's QEMU.
        assert!(!is_running(&rec));
        sd.save(&rec).expect("save");
        assert_eq!(sd.load("vm1").expect("load").spec, rec.spec);
        // Records written before `autostart` and `stopped` existed still load.
        let old = std::fs::read_to_string(dir.path().join("vm1/vm.json"))
            .expect("record")
            .replace("\"autostart\": false,", "")
            .replace("\"stopped\": false", "\"x\": 0");
        std::fs::write(dir.path().join("vm1/vm.json"), old).expect("old record");
        assert!(!sd.load("vm1").expect("old record loads").autostart);
        assert_eq!(sd.list().expect("list").len(), 1);
        std::fs::write(dir.path().join("vm1/vm.json"), b"{not json").expect("corrupt");
        assert!(matches!(sd.load("vm1"), Err(VmError::BadRecord { .. })));
        sd.remove_record("vm1").expect("remove");
        assert!(!sd.exists("vm1").expect("exists"));
    }
}
