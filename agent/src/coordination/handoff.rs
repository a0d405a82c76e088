//! Handoffs the coordinator orders (`POST /v1/vms/{name}/handoff`): the
//! link reports this edge's running VMs, picks orders up from its orders
//! poll and hands each here; each runs `edgeshift migrate`'s engine in a
//! thread of its own, while a second thread posts its progress, so a slow
//! coordinator never holds the migration up.
//!
//! The order comes through the link's poll rather than the coordinator
//! calling the agent: the edge already holds a mutual-TLS client to the
//! coordinator, the coordinator needs no client certificate and no route to
//! the edges (which may sit behind NAT), and the cost is one poll interval
//! (5 s) of latency before the handoff starts.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use edgeshift_common::control::{HandoffOrder, HandoffProgress, HandoffState, VmsReport};

use super::client::Client;
use super::CoordError;
use crate::migrate::coord::CoordConfig;
use crate::migrate::report::Phase;
use crate::migrate::source::DiskHandoff;
use crate::migrate::temperature::Ordering;
use crate::migrate::{self, MigrateOptions, MigrationReport};
use crate::transfer::Trust;
use crate::vm::{self, MemoryTransport, StateDir};

/// What an ordered handoff needs beyond the order itself.
#[derive(Debug, Clone)]
pub struct HandoffConfig {
    pub state_dir: PathBuf,
    pub trust: Trust,
    /// This edge's id.
    pub id: String,
    /// The coordinator as `edgeshift migrate --coordinator` would reach it.
    pub coordinator: Option<CoordConfig>,
    /// This edge's migration listener as peers reach it (none: it receives
    /// no VMs).
    pub migrate_addr: Option<String>,
}

/// Starts ordered handoffs, each once.
pub struct HandoffRunner {
    cfg: HandoffConfig,
    started: HashSet<u64>,
}

/// How often the final report is retried before it is given up (the
/// coordinator then fails nothing: the order was taken; the operator sees
/// the last phase).
const FINAL_TRIES: u32 = 10;

enum Update {
    Phase(Phase),
    Over(Box<Result<MigrationReport, String>>),
}

impl HandoffRunner {
    pub fn new(cfg: HandoffConfig) -> Self {
        HandoffRunner {
            cfg,
            started: HashSet::new(),
        }
    }

    /// The VMs running here and where this edge receives migrations.
    pub fn report(&self) -> Result<VmsReport, CoordError> {
        let records = StateDir::new(&self.cfg.state_dir)
            .list()
            .map_err(|e| CoordError::Vms(e.to_string()))?;
        Ok(VmsReport {
            vms: records
                .into_iter()
                .filter(vm::state::is_running)
                .map(|r| r.spec.name)
                .collect(),
            migrate_addr: self.cfg.migrate_addr.clone(),
        })
    }

    /// Starts `order` unless it was started before; `source_addr` is this
    /// edge's chunk server as peers reach it.
    pub fn start(&mut self, order: &HandoffOrder, client: &Client, source_addr: &str) -> std::io::Result<()> {
        if !self.started.insert(order.id) {
            return Ok(());
        }
        tracing::info!(vm = %order.vm, id = order.id, to = %order.to, "handoff ordered by the coordinator");
        let opts = self.options(order, source_addr);
        let (tx, rx) = mpsc::channel();
        let reporter = {
            let (client, edge, id) = (client.clone(), self.cfg.id.clone(), order.id);
            move || report_progress(&client, &edge, id, rx)
        };
        std::thread::Builder::new()
            .name(format!("handoff-{}-report", order.id))
            .spawn(reporter)?;
        std::thread::Builder::new()
            .name(format!("handoff-{}", order.id))
            .spawn(move || {
                let progress = |phase: Phase, _: &str| {
                    let _ = tx.send(Update::Phase(phase));
                };
                let result = migrate::migrate(opts, &progress).map_err(|e| e.to_string());
                let _ = tx.send(Update::Over(Box::new(result)));
            })?;
        Ok(())
    }

    /// `edgeshift migrate`'s defaults, aimed at the ordered destination.
    fn options(&self, order: &HandoffOrder, source_addr: &str) -> MigrateOptions {
        MigrateOptions {
            name: order.vm.clone(),
            state_dir: self.cfg.state_dir.clone(),
            to: order.to_migrate_addr.clone(),
            source_addr: source_addr.to_string(),
            peers: Vec::new(),
            trust: self.cfg.trust.clone(),
            id: self.cfg.id.clone(),
            ordering: Ordering::ColdFirst,
            max_rounds: 6,
            converge_chunks: 8,
            downtime_limit_ms: 300,
            sample_interval: Duration::ZERO,
            fail_after: None,
            coordinator: self.cfg.coordinator.clone(),
            memory: MemoryTransport::MultifdZstd,
            max_downtime: Duration::from_secs(1),
            memory_max_bps: None,
            memory_with_disk: false,
            use_boot_log: true,
            deltas: true,
            disk_handoff: DiskHandoff::Mirror,
        }
    }
}

fn phase_name(p: Phase) -> Option<String> {
    serde_json::to_value(p).ok()?.as_str().map(str::to_string)
}

/// Posts `running` at once (the order's acknowledgement), then the latest
/// phase as phases change, then the outcome with the `migrate --json` report.
fn report_progress(client: &Client, edge: &str, id: u64, rx: mpsc::Receiver<Update>) {
    let post = |p: &HandoffProgress| client.handoff_progress(edge, id, p);
    let mut current = HandoffProgress {
        state: HandoffState::Running,
        phase: None,
        bytes: 0,
        rounds: 0,
        report: None,
        error: None,
    };
    if let Err(e) = post(&current) {
        tracing::warn!(id, error = %e, "acknowledging the handoff order");
    }
    let outcome = loop {
        let Ok(first) = rx.recv() else {
            break Err("the migration thread ended without a result".to_string());
        };
        // Only the latest phase matters when several came at once.
        let mut last = first;
        while let Ok(next) = rx.try_recv() {
            if let Update::Over(_) = last {
                break;
            }
            last = next;
        }
        match last {
            Update::Phase(p) => {
                current.phase = phase_name(p);
                if let Err(e) = post(&current) {
                    tracing::debug!(id, error = %e, "handoff progress not posted");
                }
            }
            Update::Over(r) => break *r,
        }
    };
    match outcome {
        Ok(report) => {
            current.state = HandoffState::Done;
            current.bytes = report.disk_bytes + report.memory_bytes;
            current.rounds = report.rounds.len() as u32;
            current.report = serde_json::to_value(&report).ok();
            tracing::info!(vm = %report.vm, id, downtime_ms = report.downtime_ms, "ordered handoff done");
        }
        Err(e) => {
            tracing::warn!(id, error = %e, "ordered handoff failed; the VM keeps running here");
            current.state = HandoffState::Failed;
            current.error = Some(e);
        }
    }
    for attempt in 1..=FINAL_TRIES {
        match post(&current) {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(id, attempt, error = %e, "posting the handoff's outcome");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}
