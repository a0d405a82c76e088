//! A recorded VM's life after its first start: stop it keeping its disk,
//! start it again from that disk, delete it, and — when the agent starts —
//! tidy what a crash or a reboot left and bring back the VMs asked for.

use std::path::Path;

use super::state::is_running;
use super::{loopdev, qemu, Hypervisor, LaunchConfig, StateDir, VmError, VmRecord};

/// What [`recover`] did with one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// Its QEMU still runs (the agent alone restarted): untouched.
    StillRunning,
    /// Stopped on purpose before: untouched.
    Stopped,
    /// It was running and is not: tidied, and started again (`autostart`).
    Restarted { pid: u32 },
    /// It was running and is not: tidied and marked stopped (no
    /// `autostart`, or the restart failed: the reason).
    MarkedStopped { restart_error: Option<String> },
}

/// Stops the VM (QMP quit, then a signal), detaches its disk and keeps the
/// disk image and the record, marked stopped.
pub fn stop(hv: &dyn Hypervisor, sd: &StateDir, name: &str) -> Result<VmRecord, VmError> {
    let mut rec = sd.load(name)?;
    if !rec.stopped {
        super::teardown(hv, &rec)?;
        tidy(sd, &rec);
        rec.stopped = true;
        sd.save(&rec)?;
    }
    Ok(rec)
}

/// Starts a stopped (or crashed) VM again from its disk image as it was
/// left: a new loop device and QEMU, the record updated.
pub fn start(hv: &dyn Hypervisor, sd: &StateDir, name: &str) -> Result<VmRecord, VmError> {
    let rec = sd.load(name)?;
    if is_running(&rec) {
        return Err(VmError::Exists(format!(
            "{name} (already running, pid {})",
            rec.pid
        )));
    }
    boot(hv, sd, rec)
}

/// Deletes a VM that does not run: its directory (disk image included) and
/// record. A running VM is refused: stop it first.
pub fn remove(sd: &StateDir, name: &str) -> Result<VmRecord, VmError> {
    let rec = sd.load(name)?;
    if is_running(&rec) {
        return Err(VmError::Running(name.to_string()));
    }
    tidy(sd, &rec);
    let dir = sd.vm_dir(name)?;
    std::fs::remove_dir_all(&dir).map_err(|source| VmError::Io {
        op: "remove",
        path: dir,
        source,
    })?;
    Ok(rec)
}

/// At the agent's start: every VM recorded as running whose QEMU is gone
/// (a crash, a reboot) is tidied (stale pid file, QMP socket, loop device,
/// tap) and, if it asked for `autostart` and `autostart` is on here,
/// started again; otherwise marked stopped. Running and stopped VMs are
/// left alone.
pub fn recover(
    hv: &dyn Hypervisor,
    sd: &StateDir,
    autostart: bool,
) -> Result<Vec<(String, Recovered)>, VmError> {
    let mut out = Vec::new();
    for rec in sd.list()? {
        let name = rec.spec.name.clone();
        if rec.stopped {
            out.push((name, Recovered::Stopped));
            continue;
        }
        if is_running(&rec) {
            out.push((name, Recovered::StillRunning));
            continue;
        }
        tidy(sd, &rec);
        let restarted = if autostart && rec.autostart {
            Some(boot(hv, sd, rec.clone()))
        } else {
            None
        };
        let outcome = match restarted {
            Some(Ok(r)) => Recovered::Restarted { pid: r.pid },
            other => {
                let mut r = rec;
                r.stopped = true;
                sd.save(&r)?;
                Recovered::MarkedStopped {
                    restart_error: other.and_then(|o| o.err()).map(|e| e.to_string()),
                }
            }
        };
        out.push((name, outcome));
    }
    Ok(out)
}

/// Removes what a VM's dead QEMU left: its pid file and QMP socket, any
/// loop device still on its image, its tap and its boot log.
fn tidy(sd: &StateDir, rec: &VmRecord) {
    if let Ok(dir) = sd.vm_dir(&rec.spec.name) {
        for stale in ["qemu.pid", "qmp.sock"] {
            let _ = std::fs::remove_file(dir.join(stale));
        }
        crate::dirty::boot_log::stop_or_warn(&dir);
    }
    loopdev::detach_backing(&rec.image_path);
    if rec.spec.net.is_some() {
        qemu::remove_tap(&rec.spec.name);
    }
}

/// Boots `rec`'s disk image as it is now. No boot log: the disk differs
/// from the recorded manifest by whatever the VM wrote before, so a
/// migration of it slices the disk.
fn boot(hv: &dyn Hypervisor, sd: &StateDir, mut rec: VmRecord) -> Result<VmRecord, VmError> {
    if !rec.image_path.is_file() {
        return Err(VmError::Io {
            op: "find the disk image",
            path: rec.image_path.clone(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    let dev = loopdev::LoopDevice::attach(&rec.image_path)?;
    let run_dir = rec
        .image_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or(sd.vm_dir(&rec.spec.name)?);
    let launched = hv.launch(&LaunchConfig {
        spec: rec.spec.clone(),
        disk: dev.path().to_path_buf(),
        run_dir,
        incoming: None,
    })?;
    rec.pid = launched.pid;
    rec.accel = launched.accel;
    rec.qmp_socket = launched.qmp_socket;
    rec.loop_device = dev.keep();
    rec.stopped = false;
    rec.started_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    sd.save(&rec)?;
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{Accel, AccelChoice, Launched, VmSpec};

    /// A hypervisor these tests never reach.
    struct Unreached;

    impl Hypervisor for Unreached {
        fn launch(&self, _: &LaunchConfig) -> Result<Launched, VmError> {
            panic!("no VM may start in this test");
        }
        fn kill(&self, _: u32, _: &Path) -> Result<(), VmError> {
            Ok(())
        }
    }

    fn record(sd: &StateDir, name: &str, autostart: bool, stopped: bool) -> VmRecord {
        let dir = sd.vm_dir(name).expect("name");
        std::fs::create_dir_all(&dir).expect("vm dir");
        // What a crashed QEMU leaves beside the record.
        std::fs::write(dir.join("qemu.pid"), "999999999").expect("pid file");
        std::fs::write(dir.join("qmp.sock"), "").expect("socket");
        let rec = VmRecord {
            spec: VmSpec {
                name: name.into(),
                memory_mib: 128,
                cpus: 1,
                accel: AccelChoice::Tcg,
                kernel: None,
                initrd: None,
                append: None,
                net: None,
            },
            // No such process: the VM died with the host.
            pid: 999_999_999,
            accel: Accel::Tcg,
            qmp_socket: dir.join("qmp.sock"),
            loop_device: "/dev/loop-none".into(),
            image_path: dir.join("disk.raw"),
            manifest_id: "00".repeat(32),
            store: "/store".into(),
            started_at: 0,
            autostart,
            stopped,
        };
        sd.save(&rec).expect("save");
        rec
    }

    #[test]
    fn recovery_tidies_dead_vms_and_leaves_stopped_ones_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sd = StateDir::new(dir.path());
        record(&sd, "crashed", false, false);
        record(&sd, "wanted", true, false);
        record(&sd, "parked", true, true);
        let mut found = recover(&Unreached, &sd, true).expect("recover");
        found.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            found[0],
            ("crashed".into(), Recovered::MarkedStopped { restart_error: None })
        );
        assert_eq!(found[1], ("parked".into(), Recovered::Stopped));
        // Its disk is gone: the restart fails, saying why, and it is stopped.
        let (
            name,
            Recovered::MarkedStopped {
                restart_error: Some(e),
            },
        ) = &found[2]
        else {
            panic!("{found:?}");
        };
        assert_eq!(name, "wanted");
        assert!(e.contains("disk.raw"), "{e}");
        for vm in ["crashed", "wanted"] {
            assert!(sd.load(vm).expect("record kept").stopped, "{vm} marked stopped");
            let vm_dir = sd.vm_dir(vm).expect("dir");
            assert!(
                !vm_dir.join("qemu.pid").exists() && !vm_dir.join("qmp.sock").exists(),
                "{vm}: stale files removed"
            );
        }
        assert!(
            sd.vm_dir("parked").expect("dir").join("qemu.pid").exists(),
            "a stopped VM is not touched"
        );
        // A VM that does not run can be removed; its directory goes.
        remove(&sd, "crashed").expect("rm");
        assert!(!sd.vm_dir("crashed").expect("dir").exists());
        assert!(matches!(
            start(&Unreached, &sd, "crashed"),
            Err(VmError::NoSuchVm(_))
        ));
    }
}
