//! The client's block-layer commands: the NBD node the disk mirror writes
//! to, the mirror job itself and the queries and cancels around it.

use serde_json::json;

use super::client::QmpClient;
use super::types::{BlockJobInfo, NbdTls};
use crate::vm::VmError;

impl QmpClient {
    /// `blockdev-add` of an NBD client node `node` for `export` at
    /// `host:port`, over TLS with `tls` (QEMU's client then starts with
    /// `NBD_OPT_STARTTLS` and checks the server's certificate names
    /// `tls.hostname`). Discards stay ignored (`discard` is off by
    /// default), as on the VM's own disk, so the two sides cannot drift on
    /// a discard.
    pub fn blockdev_add_nbd(
        &mut self,
        node: &str,
        host: &str,
        port: u16,
        export: &str,
        tls: Option<&NbdTls>,
    ) -> Result<(), VmError> {
        let mut args = json!({
            "driver": "nbd",
            "node-name": node,
            "server": {"type": "inet", "host": host, "port": port.to_string()},
            "export": export,
        });
        if let Some(t) = tls {
            args["tls-creds"] = json!(t.creds);
            args["tls-hostname"] = json!(t.hostname);
        }
        self.execute_raw("blockdev-add", Some(args)).map(|_| ())
    }

    pub fn blockdev_del(&mut self, node: &str) -> Result<(), VmError> {
        self.execute_raw("blockdev-del", Some(json!({ "node-name": node })))
            .map(|_| ())
    }

    /// `blockdev-mirror` of `device` to `target` as job `job`: new writes
    /// only (`sync: none`), each completing on both sides
    /// (`copy-mode: write-blocking`); a concluded job stays until dismissed
    /// (`auto-dismiss: false`) so its error can be read.
    pub fn mirror_new_writes(&mut self, job: &str, device: &str, target: &str) -> Result<(), VmError> {
        self.execute_raw(
            "blockdev-mirror",
            Some(json!({
                "job-id": job,
                "device": device,
                "target": target,
                "sync": "none",
                "copy-mode": "write-blocking",
                // The guest's 4 KiB blocks then cover whole granules, so
                // its writes complete at both ends, not in the background.
                "granularity": 4096,
                "auto-dismiss": false,
            })),
        )
        .map(|_| ())
    }

    pub fn query_block_jobs(&mut self) -> Result<Vec<BlockJobInfo>, VmError> {
        self.execute::<(), _>("query-block-jobs", None)
    }

    /// `block-job-cancel`: a ready mirror completes (the target in step)
    /// without `force`; with it, stops at once.
    pub fn block_job_cancel(&mut self, job: &str, force: bool) -> Result<(), VmError> {
        self.execute_raw("block-job-cancel", Some(json!({ "device": job, "force": force })))
            .map(|_| ())
    }

    pub fn job_dismiss(&mut self, job: &str) -> Result<(), VmError> {
        self.execute_raw("job-dismiss", Some(json!({ "id": job })))
            .map(|_| ())
    }
}
