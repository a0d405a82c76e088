//! A scripted stand-in for QEMU's monitor, for tests of what drives a VM
//! (the migration engine's phases) without root or QEMU.
//!
//! It records every command as one line (`name` or `name args`), keeps the
//! little state the engine reads back (running or paused, the disk's write
//! throttle, a migration begun or cancelled) and answers `query-migrate`
//! from a script, and models block jobs: a mirror is ready at once, a
//! script may make it fail after some queries (its NBD connection cut).
//! QEMU's own rule that reaching `pre-switchover` pauses the
//! VM is modelled; nothing else is.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use super::api::Qmp;
use super::types::{
    BlockJobInfo, DiskThrottle, MemoryTransport, MigrationInfo, MigrationRam, MigrationTls, NbdTls, QmpEvent,
    StatusInfo,
};
use crate::vm::tls::TlsEndpoint;
use crate::vm::VmError;

/// The qdev path the fake's one disk has.
pub const FAKE_QDEV: &str = "/machine/peripheral/vd0/virtio-backend";

/// See the module docs.
#[derive(Debug)]
pub struct FakeQmp {
    calls: Vec<String>,
    running: bool,
    /// Answers of `query-migrate` once `migrate` ran; the last one repeats.
    migration: VecDeque<MigrationInfo>,
    migrating: bool,
    cancelled: bool,
    /// Calls whose line starts with one of these fail.
    failing: Vec<String>,
    events: VecDeque<QmpEvent>,
    throttle: DiskThrottle,
    nodes: Vec<String>,
    /// QOM objects added and not deleted.
    objects: Vec<String>,
    jobs: Vec<BlockJobInfo>,
    /// A mirror fails with this error once `query-block-jobs` has answered
    /// this many more times.
    mirror_failure: Option<(u32, String)>,
}

impl Default for FakeQmp {
    fn default() -> Self {
        Self::running()
    }
}

impl FakeQmp {
    /// A VM that runs, with no migration and no throttle.
    pub fn running() -> Self {
        FakeQmp {
            calls: Vec::new(),
            running: true,
            migration: VecDeque::new(),
            migrating: false,
            cancelled: false,
            failing: Vec::new(),
            events: VecDeque::new(),
            throttle: DiskThrottle {
                qdev: FAKE_QDEV.into(),
                bps_wr: 0,
                iops_wr: 0,
            },
            nodes: Vec::new(),
            objects: Vec::new(),
            jobs: Vec::new(),
            mirror_failure: None,
        }
    }

    /// Makes the mirror job fail with `error` after `queries` more answers
    /// of `query-block-jobs` (0: at the next).
    pub fn fail_mirror_after(&mut self, queries: u32, error: &str) {
        self.mirror_failure = Some((queries, error.to_string()));
    }

    /// Block nodes added and not deleted.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// QOM objects (TLS credentials, authz) added and not deleted.
    pub fn objects(&self) -> &[String] {
        &self.objects
    }

    /// Block jobs not dismissed.
    pub fn jobs(&self) -> &[BlockJobInfo] {
        &self.jobs
    }

    /// The statuses `query-migrate` answers once `migrate` ran, in order
    /// (the last repeats), each with `ram`'s figures.
    pub fn script_migration(&mut self, statuses: &[&str], ram: MigrationRam) {
        self.migration = statuses
            .iter()
            .map(|s| MigrationInfo {
                status: Some((*s).to_string()),
                downtime: (*s == "completed").then_some(42),
                ram: Some(ram.clone()),
                ..Default::default()
            })
            .collect();
    }

    /// Adds one answer of `query-migrate` to the script.
    pub fn push_migration(&mut self, info: MigrationInfo) {
        self.migration.push_back(info);
    }

    /// Makes every call whose recorded line starts with `prefix` fail
    /// (e.g. `"migrate-continue"`, `"migrate-set-parameters avail-switchover-bandwidth"`).
    pub fn fail(&mut self, prefix: &str) {
        self.failing.push(prefix.to_string());
    }

    pub fn push_event(&mut self, event: &str) {
        self.events.push_back(QmpEvent {
            event: event.into(),
            data: serde_json::Value::Null,
        });
    }

    /// Every command so far, one line each, in order.
    pub fn calls(&self) -> &[String] {
        &self.calls
    }

    /// Whether a call was made whose line starts with `prefix`.
    pub fn called(&self, prefix: &str) -> bool {
        self.position(prefix).is_some()
    }

    /// Index of the first call whose line starts with `prefix`.
    pub fn position(&self, prefix: &str) -> Option<usize> {
        self.calls.iter().position(|c| c.starts_with(prefix))
    }

    /// Calls whose line starts with `prefix`.
    pub fn calls_of(&self, prefix: &str) -> Vec<&str> {
        self.calls
            .iter()
            .filter(|c| c.starts_with(prefix))
            .map(String::as_str)
            .collect()
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// The disk's write limits now (bytes/s, requests/s; 0: none).
    pub fn throttle(&self) -> (u64, u64) {
        (self.throttle.bps_wr, self.throttle.iops_wr)
    }

    /// QEMU refuses a second object under an id in use.
    fn add_object(&mut self, id: &str) -> Result<(), VmError> {
        if self.objects.iter().any(|o| o == id) {
            return Err(VmError::QmpCommand {
                command: "object-add".into(),
                class: "GenericError".into(),
                desc: format!("attempt to add duplicate property '{id}'"),
            });
        }
        self.objects.push(id.to_string());
        Ok(())
    }

    fn call(&mut self, line: String) -> Result<(), VmError> {
        let fails = self.failing.iter().any(|p| line.starts_with(p.as_str()));
        let command = line.split(' ').next().unwrap_or_default().to_string();
        self.calls.push(line);
        if fails {
            return Err(VmError::QmpCommand {
                command,
                class: "GenericError".into(),
                desc: "failure scripted by the test".into(),
            });
        }
        Ok(())
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

impl Qmp for FakeQmp {
    fn query_status(&mut self) -> Result<StatusInfo, VmError> {
        self.call("query-status".into())?;
        Ok(StatusInfo {
            running: self.running,
            status: if self.running { "running" } else { "paused" }.into(),
        })
    }

    fn stop(&mut self) -> Result<(), VmError> {
        self.call("stop".into())?;
        self.running = false;
        Ok(())
    }

    fn cont(&mut self) -> Result<(), VmError> {
        self.call("cont".into())?;
        self.running = true;
        Ok(())
    }

    fn migrate_set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), VmError> {
        let args: Vec<String> = caps.iter().map(|(c, s)| format!("{c}={s}")).collect();
        self.call(format!("migrate-set-capabilities {}", args.join(" ")))
    }

    fn migrate_set_parameters(
        &mut self,
        downtime_limit_ms: Option<u64>,
        max_bandwidth: Option<u64>,
    ) -> Result<(), VmError> {
        self.call(format!(
            "migrate-set-parameters downtime-limit={} max-bandwidth={}",
            opt(downtime_limit_ms),
            opt(max_bandwidth)
        ))
    }

    fn set_switchover_bandwidth(&mut self, bytes_per_sec: u64) -> Result<(), VmError> {
        self.call(format!(
            "migrate-set-parameters avail-switchover-bandwidth={bytes_per_sec}"
        ))
    }

    fn set_memory_transport(&mut self, t: MemoryTransport) -> Result<(), VmError> {
        self.call(format!("set-memory-transport {t:?}"))
    }

    fn migrate_incoming(&mut self, uri: &str) -> Result<(), VmError> {
        self.call(format!("migrate-incoming {uri}"))
    }

    fn migrate(&mut self, uri: &str) -> Result<(), VmError> {
        self.call(format!("migrate {uri}"))?;
        self.migrating = true;
        Ok(())
    }

    fn query_migrate(&mut self) -> Result<MigrationInfo, VmError> {
        self.call("query-migrate".into())?;
        if self.cancelled {
            return Ok(MigrationInfo {
                status: Some("cancelled".into()),
                ..Default::default()
            });
        }
        if !self.migrating {
            return Ok(MigrationInfo::default());
        }
        let info = if self.migration.len() > 1 {
            self.migration.pop_front().unwrap_or_default()
        } else {
            self.migration.front().cloned().unwrap_or_default()
        };
        if info.status.as_deref() == Some("pre-switchover") {
            // QEMU pauses the VM to wait in this state.
            self.running = false;
        }
        Ok(info)
    }

    fn migrate_continue(&mut self, state: &str) -> Result<(), VmError> {
        self.call(format!("migrate-continue {state}"))
    }

    fn disk_write_throttle(&mut self, node: &str) -> Result<DiskThrottle, VmError> {
        self.call(format!("query-block {node}"))?;
        Ok(self.throttle.clone())
    }

    fn set_disk_write_throttle(&mut self, qdev: &str, bps_wr: u64, iops_wr: u64) -> Result<(), VmError> {
        self.call(format!(
            "block_set_io_throttle {qdev} bps_wr={bps_wr} iops_wr={iops_wr}"
        ))?;
        self.throttle.bps_wr = bps_wr;
        self.throttle.iops_wr = iops_wr;
        Ok(())
    }

    fn migrate_cancel(&mut self) -> Result<(), VmError> {
        self.call("migrate_cancel".into())?;
        if self.migrating {
            self.cancelled = true;
        }
        Ok(())
    }

    fn announce_self(&mut self) -> Result<(), VmError> {
        self.call("announce-self".into())
    }

    fn add_tls_creds(&mut self, id: &str, dir: &Path, endpoint: TlsEndpoint) -> Result<(), VmError> {
        self.call(format!(
            "object-add tls-creds-x509 {id} endpoint={} dir={}",
            endpoint.as_str(),
            dir.display()
        ))?;
        self.add_object(id)
    }

    fn add_authz(&mut self, id: &str, identity: &str) -> Result<(), VmError> {
        self.call(format!("object-add authz-simple {id} identity={identity}"))?;
        self.add_object(id)
    }

    fn object_del(&mut self, id: &str) -> Result<(), VmError> {
        self.call(format!("object-del {id}"))?;
        let before = self.objects.len();
        self.objects.retain(|o| o != id);
        if self.objects.len() == before {
            return Err(VmError::Qmp(format!("no object {id}")));
        }
        Ok(())
    }

    fn migrate_set_tls(&mut self, tls: &MigrationTls) -> Result<(), VmError> {
        self.call(format!(
            "migrate-set-parameters tls-creds={} tls-hostname={} tls-authz={}",
            tls.creds,
            tls.hostname.as_deref().unwrap_or("-"),
            tls.authz.as_deref().unwrap_or("-")
        ))
    }

    fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    fn blockdev_add_nbd(
        &mut self,
        node: &str,
        host: &str,
        port: u16,
        export: &str,
        tls: Option<&NbdTls>,
    ) -> Result<(), VmError> {
        let tls = tls.map_or_else(String::new, |t| {
            format!(" tls-creds={} tls-hostname={}", t.creds, t.hostname)
        });
        self.call(format!("blockdev-add nbd {node} {host}:{port} {export}{tls}"))?;
        self.nodes.push(node.to_string());
        Ok(())
    }

    fn blockdev_del(&mut self, node: &str) -> Result<(), VmError> {
        self.call(format!("blockdev-del {node}"))?;
        if self.jobs.iter().any(|j| j.status != "concluded") {
            return Err(VmError::Qmp(format!("node {node} is in use by a block job")));
        }
        self.nodes.retain(|n| n != node);
        Ok(())
    }

    fn mirror_new_writes(&mut self, job: &str, device: &str, target: &str) -> Result<(), VmError> {
        self.call(format!("blockdev-mirror {job} {device} -> {target}"))?;
        if !self.nodes.iter().any(|n| n == target) {
            return Err(VmError::Qmp(format!("no node {target}")));
        }
        self.jobs.push(BlockJobInfo {
            device: job.to_string(),
            status: "ready".into(),
            ready: true,
            ..Default::default()
        });
        Ok(())
    }

    fn query_block_jobs(&mut self) -> Result<Vec<BlockJobInfo>, VmError> {
        self.call("query-block-jobs".into())?;
        if let Some((left, err)) = self.mirror_failure.take() {
            if left == 0 {
                for j in &mut self.jobs {
                    j.status = "concluded".into();
                    j.ready = false;
                    j.error = Some(err.clone());
                }
            } else {
                self.mirror_failure = Some((left - 1, err));
            }
        }
        for j in &mut self.jobs {
            if j.status == "ready" {
                // Each look finds a few more guest writes carried.
                j.offset += 4096;
                j.len = j.offset;
            }
        }
        Ok(self.jobs.clone())
    }

    fn block_job_cancel(&mut self, job: &str, force: bool) -> Result<(), VmError> {
        self.call(format!("block-job-cancel {job} force={force}"))?;
        let j = self
            .jobs
            .iter_mut()
            .find(|j| j.device == job)
            .ok_or_else(|| VmError::Qmp(format!("no job {job}")))?;
        if j.status != "concluded" {
            j.status = "concluded".into();
            if force {
                j.error = Some("Operation canceled".into());
            }
        }
        Ok(())
    }

    fn job_dismiss(&mut self, job: &str) -> Result<(), VmError> {
        self.call(format!("job-dismiss {job}"))?;
        let before = self.jobs.len();
        self.jobs
            .retain(|j| !(j.device == job && j.status == "concluded"));
        if self.jobs.len() == before {
            return Err(VmError::Qmp(format!("no concluded job {job}")));
        }
        Ok(())
    }

    fn wait_event(&mut self, name: &str, _timeout: Duration) -> Result<QmpEvent, VmError> {
        match self.events.iter().position(|e| e.event == name) {
            Some(pos) => self
                .events
                .remove(pos)
                .ok_or_else(|| VmError::Qmp("event queue changed".into())),
            None => Err(VmError::Timeout(format!("QMP event {name}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripted_migration_pauses_at_pre_switchover_and_cancels() {
        let mut q = FakeQmp::running();
        q.script_migration(&["active", "pre-switchover"], MigrationRam::default());
        assert_eq!(q.query_migrate().expect("query").status, None, "no migration yet");
        q.migrate("tcp:x").expect("migrate");
        assert_eq!(
            q.query_migrate().expect("query").status.as_deref(),
            Some("active")
        );
        assert!(q.is_running());
        assert_eq!(
            q.query_migrate().expect("query").status.as_deref(),
            Some("pre-switchover")
        );
        assert!(!q.is_running(), "QEMU pauses the VM at pre-switchover");
        q.migrate_cancel().expect("cancel");
        assert_eq!(
            q.query_migrate().expect("query").status.as_deref(),
            Some("cancelled")
        );
    }

    #[test]
    fn a_scripted_failure_fails_only_matching_calls() {
        let mut q = FakeQmp::running();
        q.fail("migrate-set-parameters avail-switchover-bandwidth");
        assert!(q.set_switchover_bandwidth(0).is_err());
        assert!(q.migrate_set_parameters(Some(300), None).is_ok());
        assert_eq!(q.calls().len(), 2, "failed calls are recorded too");
        q.stop().expect("stop");
        assert!(!q.query_status().expect("status").running);
    }
}
