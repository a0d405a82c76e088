//! One migration as it runs: its options, the control connection, what was
//! sent and measured, and the phases done so far. The phases (`prepare`,
//! `precopy`, `memory`, `switchover`, `rollback`) are methods of
//! [`Session`] in files of their own.

use std::time::Instant;

use edgeshift_common::Manifest;

use super::control::{Destination, PullOrder};
use super::disk::LiveDisk;
use super::ledger::Ledger;
use super::options::MigrateOptions;
use super::throttle::Throttle;
use crate::migrate::coord::CoordReport;
use crate::migrate::proto::PullStats;
use crate::migrate::report::{ChangedSinceBoot, Phase, PhaseReport};
use crate::migrate::temperature::Temperature;
use crate::migrate::MigrateError;
use crate::vm::qmp::NbdTls;
use crate::vm::Qmp;

/// The mirror as it runs, for the rollback and the report.
#[derive(Debug, Clone)]
pub(super) struct MirrorRun {
    pub(super) started: Instant,
    /// The NBD node exists in the source QEMU.
    pub(super) node: bool,
    /// The block job exists (until dismissed).
    pub(super) job: bool,
    /// Disk bytes the engine sent beside the mirror.
    pub(super) engine_bytes: u64,
    pub(super) engine_chunks: u64,
    /// Bytes the mirror carried (QEMU's job offset), as last seen.
    pub(super) mirrored_bytes: u64,
}

pub(super) struct Session<'a> {
    pub(super) opts: MigrateOptions,
    progress: &'a dyn Fn(Phase, &str),
    /// The control connection, once made (step 1).
    pub(super) dest: Option<Box<dyn Destination>>,
    pub(super) ledger: Ledger,
    pub(super) throttle: Throttle,
    pub(super) coord: CoordReport,
    pub(super) phases: Vec<PhaseReport>,
    pub(super) temp: Temperature,
    /// Memory started with the disk pre-copy (see `start_memory`).
    pub(super) memory_with_disk: bool,
    pub(super) changed_since_boot_from: ChangedSinceBoot,
    /// QEMU's migration runs: a failure before the switchover cancels it.
    pub(super) migration_started: bool,
    /// The disk mirror, once started (step 3a).
    pub(super) mirror: Option<MirrorRun>,
    /// The source QEMU holds our TLS object (a rollback removes it).
    pub(super) qemu_tls_added: bool,
    /// The mirror's NBD node goes over TLS with these (None: plaintext).
    pub(super) nbd_tls: Option<NbdTls>,
    /// When the session began: phases report their start from it.
    began: Instant,
}

impl<'a> Session<'a> {
    /// A session for the VM that booted from `boot`.
    pub(super) fn new(opts: MigrateOptions, boot: &Manifest, progress: &'a dyn Fn(Phase, &str)) -> Self {
        let ledger = Ledger::new(
            boot.chunks.len(),
            boot.chunk_size.bytes(),
            opts.source_addr.clone(),
            opts.max_downtime,
            opts.deltas,
        );
        Session {
            throttle: Throttle::new(opts.max_downtime),
            ledger,
            temp: Temperature::new(boot.chunks.len()),
            dest: None,
            coord: CoordReport::default(),
            phases: Vec::new(),
            memory_with_disk: false,
            changed_since_boot_from: ChangedSinceBoot::Slice,
            migration_started: false,
            mirror: None,
            qemu_tls_added: false,
            nbd_tls: None,
            began: Instant::now(),
            progress,
            opts,
        }
    }

    pub(super) fn say(&self, phase: Phase, msg: &str) {
        (self.progress)(phase, msg)
    }

    pub(super) fn dest(&mut self) -> Result<&mut dyn Destination, MigrateError> {
        match self.dest.as_mut() {
            Some(d) => Ok(d.as_mut()),
            None => Err(MigrateError::Channel("no control connection".into())),
        }
    }

    /// Every edge holding chunks of the image: this one first.
    pub(super) fn holders(&self) -> Vec<String> {
        let mut h = vec![self.opts.source_addr.clone()];
        h.extend(self.opts.peers.iter().cloned());
        h
    }

    /// This edge alone: what the guest wrote since the last round exists
    /// only here.
    pub(super) fn only_source(&self) -> Vec<String> {
        vec![self.opts.source_addr.clone()]
    }

    /// One disk round from `holders`: the destination matches `m` at
    /// `indices`; an index sent before counts as re-sent.
    pub(super) fn round_from(
        &mut self,
        m: &Manifest,
        indices: Vec<u32>,
        holders: Vec<String>,
    ) -> Result<PullStats, MigrateError> {
        self.pull(m, indices, holders, Vec::new(), true)
    }

    /// Asks the destination to match `m` at `indices`, the chunks at
    /// `filler` only filling the round's tail (see `Request::Pull`); with
    /// `count_resent`, an index sent before counts as re-sent (without:
    /// first sends of the live disk, what changed since boot).
    pub(super) fn pull(
        &mut self,
        m: &Manifest,
        indices: Vec<u32>,
        holders: Vec<String>,
        filler: Vec<u32>,
        count_resent: bool,
    ) -> Result<PullStats, MigrateError> {
        let start = Instant::now();
        let again = if count_resent {
            self.ledger.sent_before(&indices)
        } else {
            Vec::new()
        };
        tracing::debug!(?again, ?filler, "round sends these indices again");
        let chunks = indices
            .iter()
            .map(|&i| {
                m.chunks
                    .get(i as usize)
                    .map(|fp| (i, fp.0))
                    .ok_or_else(|| MigrateError::State(format!("chunk index {i} past the disk's end")))
            })
            .collect::<Result<_, _>>()?;
        let order = PullOrder {
            image_size: m.image_size,
            chunk_size: m.chunk_size.bytes() as u32,
            chunks,
            holders,
            filler,
            deltas: self.opts.deltas,
        };
        let stats = self.dest()?.pull(order)?;
        let r = self.ledger.record(
            m,
            &indices,
            &stats,
            again.len() as u64,
            start.elapsed().as_secs_f64(),
        );
        tracing::info!(
            round = r.round,
            chunks = r.chunks,
            bytes = r.bytes,
            resent = r.resent_chunks,
            delta = r.delta_chunks,
            seconds = r.seconds,
            "disk round"
        );
        Ok(stats)
    }

    /// Tightens the disk-write throttle a step if `stale` would overrun
    /// the pause's budget.
    pub(super) fn squeeze(&mut self, qmp: &mut dyn Qmp, stale: &[u32]) -> Result<(), MigrateError> {
        self.throttle.squeeze(qmp, &self.ledger, stale)
    }

    /// Tells the coordinator what the source holds now (the live disk): the
    /// plan is made with the boot image, which it knows already, so a
    /// coordinator gone since the plan does not stop the handoff.
    pub(super) fn report_live_disk(&mut self, disk: &dyn LiveDisk, cur: &Manifest) {
        if let Some(c) = &self.opts.coordinator {
            (self.progress)(Phase::Precopy, "reporting the live disk to the coordinator");
            if let Err(e) = disk.report_to(c, cur, &mut self.coord) {
                tracing::warn!(error = %e, "live disk not reported to the coordinator; the handoff goes on");
                self.coord.left.push(format!("live disk not reported: {e}"));
            }
        }
    }

    /// Books a phase that started at `started` and moved `bytes`.
    pub(super) fn phase_done(&mut self, phase: Phase, started: Instant, bytes: u64) {
        self.phases.push(PhaseReport {
            phase,
            start_seconds: started.saturating_duration_since(self.began).as_secs_f64(),
            seconds: started.elapsed().as_secs_f64(),
            bytes,
        });
    }

    /// Fault injection for tests: an error after `phase` when asked.
    pub(super) fn injected(&self, phase: Phase) -> Result<(), MigrateError> {
        if self.opts.fail_after == Some(phase) {
            return Err(MigrateError::State(format!(
                "failure injected after the {phase:?} phase"
            )));
        }
        Ok(())
    }
}
