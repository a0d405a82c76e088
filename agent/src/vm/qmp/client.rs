//! A typed QMP client over a Unix socket: greeting, capability negotiation,
//! commands with typed arguments and returns, and asynchronous events.
//!
//! QMP sends one JSON object per line. A reply is `{"return": ...}` or
//! `{"error": {...}}`, tagged with the `id` we sent; events
//! (`{"event": ...}`) may arrive at any time and are queued for
//! [`QmpClient::wait_event`].

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::api::Qmp;
use super::types::{
    BlockJobInfo, DiskThrottle, MemoryTransport, MigrationInfo, MigrationTls, NbdTls, QmpEvent, StatusInfo,
    MULTIFD_CHANNELS,
};
use crate::vm::tls::TlsEndpoint;
use crate::vm::VmError;

/// Longest a single reply may take before the client gives up.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Least time to wait for the greeting once connected (QEMU sends it at once).
const GREETING_MIN_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Deserialize)]
struct QmpErrorBody {
    class: String,
    desc: String,
}

/// One line from QEMU, whichever kind it is.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Incoming {
    Return {
        #[serde(rename = "return")]
        ret: Value,
        id: Option<u64>,
    },
    Error {
        error: QmpErrorBody,
        id: Option<u64>,
    },
    Event(QmpEvent),
    Greeting {
        #[serde(rename = "QMP")]
        _qmp: Value,
    },
}

#[derive(Serialize)]
struct Capability<'a> {
    capability: &'a str,
    state: bool,
}

#[derive(Serialize)]
struct SetCapabilities<'a> {
    capabilities: Vec<Capability<'a>>,
}

#[derive(Serialize)]
struct MigrateArgs<'a> {
    uri: &'a str,
}

#[derive(Serialize)]
struct MigrateContinueArgs<'a> {
    state: &'a str,
}

#[derive(Serialize)]
struct AnnounceArgs {
    initial: u64,
    max: u64,
    rounds: u64,
    step: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct MultifdParameters<'a> {
    multifd_channels: u64,
    multifd_compression: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct MigrateParameters {
    #[serde(skip_serializing_if = "Option::is_none")]
    downtime_limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_bandwidth: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    avail_switchover_bandwidth: Option<u64>,
}

/// Events accepted before the greeting of a new QMP connection.
const MAX_EVENTS_BEFORE_GREETING: usize = 16;

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<QmpEvent>,
    next_id: u64,
}

impl QmpClient {
    /// Connects to `socket`, retrying until `wait` has passed (QEMU creates
    /// the socket a moment after it starts), reads the greeting and leaves
    /// capability negotiation mode.
    pub fn connect(socket: &Path, wait: Duration) -> Result<Self, VmError> {
        let deadline = Instant::now() + wait;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    tracing::trace!(socket = %socket.display(), error = %e, "QMP socket not ready");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(source) => {
                    return Err(VmError::Io {
                        op: "connect to QMP socket",
                        path: socket.to_path_buf(),
                        source,
                    })
                }
            }
        };
        let io = |op: &'static str| {
            let path = socket.to_path_buf();
            move |source| VmError::Io { op, path, source }
        };
        // QEMU serves one QMP client at a time: while another holds the
        // monitor, the connection is accepted but no greeting comes. Wait for
        // it only as long as the caller allowed, not a full reply timeout.
        stream
            .set_read_timeout(Some(wait.max(GREETING_MIN_WAIT)))
            .map_err(io("set QMP read timeout"))?;
        let writer = stream.try_clone().map_err(io("clone QMP socket"))?;
        let mut client = QmpClient {
            reader: BufReader::new(stream),
            writer,
            events: VecDeque::new(),
            next_id: 1,
        };
        // An event can come first: measured once, a RESUME at a migration's
        // switchover reached a client that connected as the previous one
        // left, before its greeting. Such events are kept, not an error.
        let mut early = 0;
        loop {
            match client.read_message()? {
                Incoming::Greeting { .. } => break,
                Incoming::Event(e) if early < MAX_EVENTS_BEFORE_GREETING => {
                    early += 1;
                    client.events.push_back(e);
                }
                other => return Err(VmError::Qmp(format!("expected the QMP greeting, got {other:?}"))),
            }
        }
        client
            .reader
            .get_ref()
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(io("set QMP read timeout"))?;
        client.execute_raw("qmp_capabilities", None)?;
        Ok(client)
    }

    fn read_message(&mut self) -> Result<Incoming, VmError> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                VmError::Timeout("a QMP message".into())
            }
            _ => VmError::Qmp(format!("reading from QEMU: {e}")),
        })?;
        if n == 0 {
            return Err(VmError::QmpClosed);
        }
        serde_json::from_str(&line).map_err(|e| VmError::Qmp(format!("malformed QMP message {line:?}: {e}")))
    }

    /// Sends a command and waits for its reply, queueing events that arrive
    /// meanwhile.
    pub fn execute_raw(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, VmError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = serde_json::json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| VmError::Qmp(e.to_string()))?;
        bytes.push(b'\n');
        self.writer
            .write_all(&bytes)
            .map_err(|e| VmError::Qmp(format!("sending {command}: {e}")))?;
        loop {
            match self.read_message()? {
                Incoming::Return { ret, id: rid } if rid == Some(id) => return Ok(ret),
                Incoming::Error { error, id: rid } if rid == Some(id) => {
                    return Err(VmError::QmpCommand {
                        command: command.to_string(),
                        class: error.class,
                        desc: error.desc,
                    })
                }
                Incoming::Event(ev) => {
                    tracing::debug!(event = %ev.event, data = %ev.data, "QMP event");
                    self.events.push_back(ev);
                }
                other => tracing::debug!(?other, "QMP message for another request ignored"),
            }
        }
    }

    /// Sends a command with typed arguments and parses its typed return.
    pub fn execute<A: Serialize, R: DeserializeOwned>(
        &mut self,
        command: &str,
        args: Option<&A>,
    ) -> Result<R, VmError> {
        let args = args
            .map(serde_json::to_value)
            .transpose()
            .map_err(|e| VmError::Qmp(e.to_string()))?;
        let ret = self.execute_raw(command, args)?;
        serde_json::from_value(ret).map_err(|e| VmError::Qmp(format!("unexpected return of {command}: {e}")))
    }

    fn execute_unit<A: Serialize>(&mut self, command: &str, args: Option<&A>) -> Result<(), VmError> {
        self.execute::<A, Value>(command, args).map(|_| ())
    }

    pub fn query_status(&mut self) -> Result<StatusInfo, VmError> {
        self.execute::<(), _>("query-status", None)
    }

    pub fn stop(&mut self) -> Result<(), VmError> {
        self.execute_unit::<()>("stop", None)
    }

    pub fn cont(&mut self) -> Result<(), VmError> {
        self.execute_unit::<()>("cont", None)
    }

    /// Asks QEMU to exit; the socket closes right after the reply.
    pub fn quit(&mut self) -> Result<(), VmError> {
        match self.execute_unit::<()>("quit", None) {
            Ok(()) | Err(VmError::QmpClosed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn migrate_set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), VmError> {
        let args = SetCapabilities {
            capabilities: caps
                .iter()
                .map(|(capability, state)| Capability {
                    capability,
                    state: *state,
                })
                .collect(),
        };
        self.execute_unit("migrate-set-capabilities", Some(&args))
    }

    /// Sets the allowed downtime (ms) and the migration bandwidth cap (bytes/s).
    pub fn migrate_set_parameters(
        &mut self,
        downtime_limit_ms: Option<u64>,
        max_bandwidth: Option<u64>,
    ) -> Result<(), VmError> {
        let args = MigrateParameters {
            downtime_limit: downtime_limit_ms,
            max_bandwidth,
            avail_switchover_bandwidth: None,
        };
        self.execute_unit("migrate-set-parameters", Some(&args))
    }

    /// QEMU's `avail-switchover-bandwidth` (bytes/s; 0: the measured rate):
    /// the rate QEMU assumes for the final copy when it decides whether
    /// the rest fits the downtime limit; a tiny rate holds convergence back
    /// (QEMU 8.2 and later).
    pub fn set_switchover_bandwidth(&mut self, bytes_per_sec: u64) -> Result<(), VmError> {
        let args = MigrateParameters {
            downtime_limit: None,
            max_bandwidth: None,
            avail_switchover_bandwidth: Some(bytes_per_sec),
        };
        self.execute_unit("migrate-set-parameters", Some(&args))
    }

    /// Sets up `t` for the next migration (either end; the destination
    /// before `migrate-incoming`). On error QEMU may have taken part of it:
    /// call again with [`MemoryTransport::Plain`] to fall back.
    pub fn set_memory_transport(&mut self, t: MemoryTransport) -> Result<(), VmError> {
        match t {
            MemoryTransport::Plain => self.migrate_set_capabilities(&[("multifd", false)]),
            MemoryTransport::MultifdZstd => {
                self.migrate_set_capabilities(&[("multifd", true)])?;
                self.execute_unit(
                    "migrate-set-parameters",
                    Some(&MultifdParameters {
                        multifd_channels: MULTIFD_CHANNELS,
                        multifd_compression: "zstd",
                    }),
                )
            }
        }
    }

    /// `migrate-incoming`: a QEMU started with `-incoming defer` starts
    /// listening on `uri`.
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), VmError> {
        self.execute_unit("migrate-incoming", Some(&MigrateArgs { uri }))
    }

    pub fn migrate(&mut self, uri: &str) -> Result<(), VmError> {
        self.execute_unit("migrate", Some(&MigrateArgs { uri }))
    }

    pub fn query_migrate(&mut self) -> Result<MigrationInfo, VmError> {
        self.execute::<(), _>("query-migrate", None)
    }

    /// Leaves the pause that `pause-before-switchover` made (`state` is the
    /// state being left, `pre-switchover`).
    pub fn migrate_continue(&mut self, state: &str) -> Result<(), VmError> {
        self.execute_unit("migrate-continue", Some(&MigrateContinueArgs { state }))
    }

    /// The write throttle of the VM's disk (the block device with node
    /// name `node`), as `query-block` reports it, with the device's qdev
    /// path (what `block_set_io_throttle` takes).
    pub fn disk_write_throttle(&mut self, node: &str) -> Result<DiskThrottle, VmError> {
        let blocks: Vec<BlockInfo> = self.execute::<(), _>("query-block", None)?;
        blocks
            .into_iter()
            .find_map(|b| {
                let ins = b.inserted?;
                (ins.node_name.as_deref() == Some(node)).then(|| DiskThrottle {
                    qdev: b.qdev.unwrap_or_default(),
                    bps_wr: ins.bps_wr,
                    iops_wr: ins.iops_wr,
                })
            })
            .ok_or_else(|| VmError::Qmp(format!("no block device with node name {node}")))
    }

    /// Limits the disk's guest writes to `bps_wr` bytes and `iops_wr`
    /// requests per second (0 lifts a limit); reads stay unlimited.
    pub fn set_disk_write_throttle(&mut self, qdev: &str, bps_wr: u64, iops_wr: u64) -> Result<(), VmError> {
        self.execute_unit(
            "block_set_io_throttle",
            Some(&serde_json::json!({
                "id": qdev,
                "bps": 0, "bps_rd": 0, "bps_wr": bps_wr,
                "iops": 0, "iops_rd": 0, "iops_wr": iops_wr,
            })),
        )
    }

    pub fn migrate_cancel(&mut self) -> Result<(), VmError> {
        self.execute_unit::<()>("migrate_cancel", None)
    }

    /// Makes QEMU send gratuitous ARP/RARP for the VM's NICs so switches
    /// learn its new port.
    pub fn announce_self(&mut self) -> Result<(), VmError> {
        self.execute_unit(
            "announce-self",
            Some(&AnnounceArgs {
                initial: 50,
                max: 550,
                rounds: 5,
                step: 100,
            }),
        )
    }

    /// Events received so far and not yet taken.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// Waits for an event named `name` (a queued one counts).
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<QmpEvent, VmError> {
        if let Some(pos) = self.events.iter().position(|e| e.event == name) {
            if let Some(ev) = self.events.remove(pos) {
                return Ok(ev);
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(VmError::Timeout(format!("QMP event {name}")));
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|e| VmError::Qmp(e.to_string()))?;
            let msg = self.read_message();
            self.reader
                .get_ref()
                .set_read_timeout(Some(REPLY_TIMEOUT))
                .map_err(|e| VmError::Qmp(e.to_string()))?;
            match msg {
                Ok(Incoming::Event(ev)) if ev.event == name => return Ok(ev),
                Ok(Incoming::Event(ev)) => self.events.push_back(ev),
                Ok(_) => {}
                Err(VmError::Timeout(_)) => return Err(VmError::Timeout(format!("QMP event {name}"))),
                Err(e) => return Err(e),
            }
        }
    }
}

/// The trait's operations are the client's own methods (callers that hold
/// a `QmpClient` use those directly, without the trait in scope).
impl Qmp for QmpClient {
    fn query_status(&mut self) -> Result<StatusInfo, VmError> {
        QmpClient::query_status(self)
    }
    fn stop(&mut self) -> Result<(), VmError> {
        QmpClient::stop(self)
    }
    fn cont(&mut self) -> Result<(), VmError> {
        QmpClient::cont(self)
    }
    fn migrate_set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), VmError> {
        QmpClient::migrate_set_capabilities(self, caps)
    }
    fn migrate_set_parameters(
        &mut self,
        downtime_limit_ms: Option<u64>,
        max_bandwidth: Option<u64>,
    ) -> Result<(), VmError> {
        QmpClient::migrate_set_parameters(self, downtime_limit_ms, max_bandwidth)
    }
    fn set_switchover_bandwidth(&mut self, bytes_per_sec: u64) -> Result<(), VmError> {
        QmpClient::set_switchover_bandwidth(self, bytes_per_sec)
    }
    fn set_memory_transport(&mut self, t: MemoryTransport) -> Result<(), VmError> {
        QmpClient::set_memory_transport(self, t)
    }
    fn migrate_incoming(&mut self, uri: &str) -> Result<(), VmError> {
        QmpClient::migrate_incoming(self, uri)
    }
    fn migrate(&mut self, uri: &str) -> Result<(), VmError> {
        QmpClient::migrate(self, uri)
    }
    fn query_migrate(&mut self) -> Result<MigrationInfo, VmError> {
        QmpClient::query_migrate(self)
    }
    fn migrate_continue(&mut self, state: &str) -> Result<(), VmError> {
        QmpClient::migrate_continue(self, state)
    }
    fn disk_write_throttle(&mut self, node: &str) -> Result<DiskThrottle, VmError> {
        QmpClient::disk_write_throttle(self, node)
    }
    fn set_disk_write_throttle(&mut self, qdev: &str, bps_wr: u64, iops_wr: u64) -> Result<(), VmError> {
        QmpClient::set_disk_write_throttle(self, qdev, bps_wr, iops_wr)
    }
    fn migrate_cancel(&mut self) -> Result<(), VmError> {
        QmpClient::migrate_cancel(self)
    }
    fn announce_self(&mut self) -> Result<(), VmError> {
        QmpClient::announce_self(self)
    }
    fn take_events(&mut self) -> Vec<QmpEvent> {
        QmpClient::take_events(self)
    }
    fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<QmpEvent, VmError> {
        QmpClient::wait_event(self, name, timeout)
    }
    fn blockdev_add_nbd(
        &mut self,
        node: &str,
        host: &str,
        port: u16,
        export: &str,
        tls: Option<&NbdTls>,
    ) -> Result<(), VmError> {
        QmpClient::blockdev_add_nbd(self, node, host, port, export, tls)
    }
    fn add_tls_creds(&mut self, id: &str, dir: &Path, endpoint: TlsEndpoint) -> Result<(), VmError> {
        QmpClient::add_tls_creds(self, id, dir, endpoint)
    }
    fn add_authz(&mut self, id: &str, identity: &str) -> Result<(), VmError> {
        QmpClient::add_authz(self, id, identity)
    }
    fn object_del(&mut self, id: &str) -> Result<(), VmError> {
        QmpClient::object_del(self, id)
    }
    fn migrate_set_tls(&mut self, tls: &MigrationTls) -> Result<(), VmError> {
        QmpClient::migrate_set_tls(self, tls)
    }
    fn blockdev_del(&mut self, node: &str) -> Result<(), VmError> {
        QmpClient::blockdev_del(self, node)
    }
    fn mirror_new_writes(&mut self, job: &str, device: &str, target: &str) -> Result<(), VmError> {
        QmpClient::mirror_new_writes(self, job, device, target)
    }
    fn query_block_jobs(&mut self) -> Result<Vec<BlockJobInfo>, VmError> {
        QmpClient::query_block_jobs(self)
    }
    fn block_job_cancel(&mut self, job: &str, force: bool) -> Result<(), VmError> {
        QmpClient::block_job_cancel(self, job, force)
    }
    fn job_dismiss(&mut self, job: &str) -> Result<(), VmError> {
        QmpClient::job_dismiss(self, job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-client QMP server that writes `lines` on connect, then
    /// answers each command with an empty return carrying its id.
    fn fake_qmp(lines: &'static [&'static str]) -> (tempfile::TempDir, std::path::PathBuf) {
        use std::io::{BufRead, Write};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            for l in lines {
                s.write_all(l.as_bytes()).expect("write");
                s.write_all(b"\n").expect("write");
            }
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            let mut line = String::new();
            while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                let v: Value = serde_json::from_str(&line).expect("command");
                let reply = serde_json::json!({"return": {}, "id": v["id"]});
                s.write_all(format!("{reply}\n").as_bytes()).expect("reply");
                line.clear();
            }
        });
        (dir, path)
    }

    const GREETING: &str = r#"{"QMP": {"version": {}, "capabilities": []}}"#;

    #[test]
    fn an_event_before_the_greeting_is_kept_not_an_error() {
        let (_dir, path) = fake_qmp(&[
            r#"{"event": "RESUME", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}"#,
            GREETING,
        ]);
        let mut q = QmpClient::connect(&path, Duration::from_secs(5)).expect("connect");
        let events = q.take_events();
        assert_eq!(events.len(), 1, "the early event is kept: {events:?}");
        assert_eq!(events[0].event, "RESUME");
    }

    #[test]
    fn a_reply_instead_of_the_greeting_is_refused() {
        let (_dir, path) = fake_qmp(&[r#"{"return": {}, "id": 7}"#]);
        let err = QmpClient::connect(&path, Duration::from_secs(5)).expect_err("no greeting");
        assert!(err.to_string().contains("expected the QMP greeting"), "{err}");
    }

    #[test]
    fn parses_replies_events_and_errors() {
        let r: Incoming =
            serde_json::from_str(r#"{"return": {"running": true, "status": "running"}, "id": 3}"#)
                .expect("return");
        assert!(matches!(r, Incoming::Return { id: Some(3), .. }));
        let e: Incoming =
            serde_json::from_str(r#"{"error": {"class": "GenericError", "desc": "no"}, "id": 4}"#)
                .expect("error");
        assert!(matches!(e, Incoming::Error { id: Some(4), .. }));
        let ev: Incoming = serde_json::from_str(
            r#"{"event": "MIGRATION", "data": {"status": "pre-switchover"}, "timestamp": {"seconds": 1, "microseconds": 2}}"#,
        )
        .expect("event");
        match ev {
            Incoming::Event(ev) => assert_eq!(ev.data["status"], "pre-switchover"),
            other => panic!("not an event: {other:?}"),
        }
        let g: Incoming =
            serde_json::from_str(r#"{"QMP": {"version": {}, "capabilities": []}}"#).expect("greeting");
        assert!(matches!(g, Incoming::Greeting { .. }));
        assert!(serde_json::from_str::<Incoming>("[1,2]").is_err());
        let m: MigrationInfo = serde_json::from_str(
            r#"{"status": "completed", "total-time": 5000, "downtime": 31, "ram": {"transferred": 100, "remaining": 0, "total": 200, "dirty-sync-count": 3}}"#,
        )
        .expect("migration info");
        assert_eq!(m.downtime, Some(31));
        assert_eq!(m.ram.expect("ram").dirty_sync_count, 3);
    }
}

/// One entry of `query-block` (the fields used here).
#[derive(Debug, Deserialize)]
struct BlockInfo {
    #[serde(default)]
    qdev: Option<String>,
    #[serde(default)]
    inserted: Option<BlockInserted>,
}

#[derive(Debug, Deserialize)]
struct BlockInserted {
    #[serde(rename = "node-name", default)]
    node_name: Option<String>,
    #[serde(default)]
    bps_wr: u64,
    #[serde(default)]
    iops_wr: u64,
}
