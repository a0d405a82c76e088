//! Tearing the destination half down: when its control connection ends
//! before `Finish` (QEMU killed, tap removed, loop device detached, image
//! deleted; a VM that already switched over is kept), and at start-up, what
//! a crashed agent left.

use std::time::Duration;

use super::context::Host;
use super::incoming::Incoming;
use crate::vm::{self, Hypervisor, QmpClient};

/// A daemon that died while receiving a VM leaves a VM directory without a
/// record: its QEMU never switched over (the record is written at the
/// switchover), so that half is torn down here.
pub(super) fn remove_stale_incoming(host: &Host) {
    let Ok(entries) = std::fs::read_dir(host.state.root()) else {
        return;
    };
    for e in entries.flatten() {
        let dir = e.path();
        if !dir.is_dir() || dir.join("vm.json").exists() || !dir.join("disk.raw").exists() {
            continue;
        }
        let name = e.file_name().to_string_lossy().to_string();
        tracing::warn!(vm = %name, "removing the half of an incoming VM left by a crash");
        if let Some(pid) = std::fs::read_to_string(dir.join("qemu.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        {
            let _ = host.cfg.qemu.kill(pid, &dir.join("qmp.sock"));
        }
        vm::qemu::remove_tap(&name);
        crate::dirty::boot_log::stop_or_warn(&dir);
        vm::loopdev::detach_backing(&dir.join("disk.raw"));
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "stale incoming VM not removed");
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.host.unmark(&self.spec.name);
        if self.finished {
            return;
        }
        if let Some(h) = self.starting.take() {
            // A QEMU still starting is waited for, so it is stopped below.
            match h.join() {
                Ok(Ok((l, _))) => self.qemu = Some(l),
                Ok(Err(e)) => {
                    tracing::info!(vm = %self.spec.name, error = %e, "destination QEMU had not started")
                }
                Err(_) => tracing::warn!(vm = %self.spec.name, "destination QEMU start panicked"),
            }
        }
        if let Some(l) = self.qemu.clone() {
            // Only a VM that already switched over runs here; keep it then.
            let running = QmpClient::connect(&l.qmp_socket, Duration::from_millis(500))
                .and_then(|mut q| q.query_status())
                .map(|s| s.running)
                .unwrap_or(false);
            if running {
                tracing::warn!(vm = %self.spec.name, "control connection lost after the switchover; keeping the VM");
                if self.adopt(&l).is_ok() {
                    return;
                }
            }
            if let Err(e) = self.host.cfg.qemu.kill(l.pid, &l.qmp_socket) {
                tracing::warn!(vm = %self.spec.name, error = %e, "destination QEMU not stopped");
            }
            if self.spec.net.is_some() {
                vm::qemu::remove_tap(&self.spec.name);
            }
        }
        // No more writes into the image, and the loop device detached,
        // before the image goes.
        if let Some(mut m) = self.mirror.take() {
            m.stop();
        }
        self.writer.shutdown();
        crate::dirty::boot_log::stop_or_warn(&self.dir);
        self.loop_dev = None;
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "destination half not removed");
        }
        tracing::info!(vm = %self.spec.name, "incoming VM torn down");
    }
}
