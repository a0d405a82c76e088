//! The source half of a migration, step by step:
//!
//! 1. **plan** ([`prepare`]): the destination prepares with the manifest
//!    the VM booted from (this edge holds it in full) and says what its
//!    store lacks and, with a coordinator, which edges send what
//!    ([`crate::migrate::coord`]); its QEMU then starts with `-incoming
//!    defer` in the background.
//! 2. **pre-copy** ([`precopy`]): the VM's boot log (a pinned eBPF write
//!    counter, [`crate::dirty::boot_log`]) names what changed since boot;
//!    round 0 pulls the whole live disk from every holder at once, coldest
//!    first, the hot chunks only as filler of its tail (without a boot log:
//!    the boot manifest while the live disk is sliced here, then a round 1
//!    of what changed); each later round re-reads what the guest wrote
//!    since and sends it, until the rounds stop shrinking; the hottest
//!    chunks wait for the pause, within its budget.
//! 3. **memory** ([`memory`]): the destination QEMU waits with `-incoming`;
//!    the source runs QMP `migrate` with `pause-before-switchover`. If the
//!    chunks dirtied per round would overrun `--max-downtime` in the pause,
//!    the source VM's disk writes are throttled step by step ([`throttle`]).
//!    With `--disk-handoff mirror` (the default), beside memory's first
//!    pass (held from converging meanwhile; [`mirror`]): QEMU mirrors every
//!    new guest write to the destination's NBD export, each completing at
//!    both ends, and the chunks written before the mirror was ready go
//!    beside it; no round runs after that.
//! 4. **pause** ([`switchover`]): the source VM is stopped and its disk
//!    flushed; the mirror is completed (or, without it, the last dirty
//!    chunks go over), the destination's disk is checked equal to the
//!    source's manifest, then `migrate-continue`.
//! 5. **after**: the destination keeps the VM and announces it; the source
//!    stops its QEMU and frees the disk; the coordinator's reference counts
//!    move with the VM.
//!
//! Any failure before step 4's `migrate-continue` cancels the migration,
//! resumes the source VM if it was paused, and tells the destination to
//! tear its half down ([`rollback`]).
//!
//! The phases are methods of [`session::Session`] and reach QEMU through
//! [`crate::vm::Qmp`], the destination through [`control::Destination`]
//! and the disk through [`disk::LiveDisk`], so they run against fakes in
//! the unit tests.

mod control;
mod disk;
mod ledger;
mod memory;
mod mirror;
mod options;
mod precopy;
mod prepare;
mod reslice;
mod rollback;
mod session;
mod switchover;
mod throttle;
mod write_log;

#[cfg(test)]
mod fakes;
#[cfg(test)]
mod mirror_tests;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

use edgeshift_common::{Fingerprint, Manifest};

pub use crate::migrate::report::DiskHandoff;
pub use options::MigrateOptions;

use crate::migrate::report::{MigrationReport, MirrorReport, Phase};
use crate::migrate::MigrateError;
use crate::store::{ChunkStore, LocalStore};
use crate::vm::{self, Qemu, Qmp, QmpClient, StateDir, VmSpec};
use control::{ControlClient, Destination};
use disk::{LiveDisk, SourceDisk};
use prepare::Missing;
use session::Session;

const QMP_WAIT: Duration = Duration::from_secs(5);

/// What a migration that switched over did, for its report.
#[derive(Debug, Clone)]
struct Outcome {
    downtime_ms: u64,
    memory_bytes: u64,
    pause_disk_seconds: f64,
    /// The live disk's final manifest, hex.
    manifest_id: String,
    missing: Missing,
}

/// Migrates a VM of this edge to another. On error before the switchover
/// the VM keeps running here and the destination's half is torn down.
pub fn migrate(
    opts: MigrateOptions,
    progress: &dyn Fn(Phase, &str),
) -> Result<MigrationReport, MigrateError> {
    let t0 = Instant::now();
    let sd = StateDir::new(&opts.state_dir);
    let rec = sd.load(&opts.name)?;
    if !vm::state::is_running(&rec) {
        return Err(MigrateError::State(format!(
            "VM {} is not running (pid {} gone)",
            opts.name, rec.pid
        )));
    }
    let mut qmp = QmpClient::connect(&rec.qmp_socket, QMP_WAIT)?;
    let status = qmp.query_status()?;
    if !status.running {
        return Err(MigrateError::State(format!(
            "VM {} is {}, not running",
            opts.name, status.status
        )));
    }
    let store = LocalStore::open(&rec.store)?;
    let boot_id = Fingerprint(
        hex::decode(&rec.manifest_id)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                MigrateError::State(format!("VM record has a bad manifest id {:?}", rec.manifest_id))
            })?,
    );
    let boot = store.get_manifest(&boot_id)?;
    let disk = SourceDisk::new(rec.loop_device.clone(), rec.image_path.clone(), &store);
    let mut session = Session::new(opts, &boot, progress);
    tracing::debug!(
        setup_s = t0.elapsed().as_secs_f64(),
        "VM record, QMP session and boot manifest loaded"
    );
    let (to, trust) = (session.opts.to.clone(), session.opts.trust.clone());
    let connect = move || -> Result<Box<dyn Destination>, MigrateError> {
        Ok(Box::new(ControlClient::connect(&to, &trust)?))
    };
    match session.drive(&mut qmp, &disk, &rec.spec, &boot, connect) {
        Ok(outcome) => {
            // The handoff is done when the destination runs the VM; the
            // source's clean-up below is not part of it.
            let total_seconds = t0.elapsed().as_secs_f64();
            // The VM runs at the destination: stop the source's copy. QEMU
            // serves one QMP client at a time, so ours goes first or the
            // teardown's own session would wait for a greeting.
            drop(qmp);
            if let Err(e) = vm::teardown(&Qemu::default(), &rec) {
                tracing::warn!(error = %e, "source QEMU teardown incomplete");
            }
            let _ = sd.remove_record(&rec.spec.name);
            if let Ok(dir) = sd.vm_dir(&rec.spec.name) {
                let _ = std::fs::remove_dir_all(dir);
            }
            // Step 5 at the source: this edge's reference to the image goes.
            if let Some(c) = &session.opts.coordinator {
                let left = crate::migrate::coord::release_source(
                    c,
                    &sd,
                    &rec.store,
                    &rec.spec.name,
                    &rec.manifest_id,
                );
                session.coord.source_released = left.is_empty();
                session.coord.left.extend(left);
            }
            Ok(session.into_report(rec.spec.name.clone(), total_seconds, outcome))
        }
        Err(e) => {
            tracing::warn!(error = %e, "migration failed; keeping the VM at the source");
            // A fresh QMP session: the old one may be mid-reply after an error.
            let mut fresh = QmpClient::connect(&rec.qmp_socket, QMP_WAIT).ok();
            let q: &mut dyn Qmp = match fresh.as_mut() {
                Some(q) => q,
                None => &mut qmp,
            };
            session.rollback(q);
            Err(e)
        }
    }
}

impl Session<'_> {
    /// Steps 1 to 4 for the VM `spec` that booted from `boot`; `connect`
    /// makes the control connection to the destination.
    fn drive(
        &mut self,
        qmp: &mut dyn Qmp,
        disk: &dyn LiveDisk,
        spec: &VmSpec,
        boot: &Manifest,
        connect: impl FnOnce() -> Result<Box<dyn Destination>, MigrateError>,
    ) -> Result<Outcome, MigrateError> {
        let ready = self.prepare(qmp, disk, spec, boot, connect)?;
        // Memory starts with the disk when asked: the path carries it while the
        // live disk is sliced (else idle), then shares it with the disk rounds
        // (held so that it cannot converge first); it converges after them.
        let memory_started = if self.opts.memory_with_disk {
            let t = Instant::now();
            let started = self.start_memory(qmp, &ready.uri, ready.asked, true)?;
            self.migration_started = started;
            self.memory_with_disk = started;
            self.ledger.memory_running = started;
            started.then_some(t)
        } else {
            None
        };
        let cur = self.precopy(qmp, disk, boot, ready.since_boot, memory_started.is_some())?;
        let (cur, mem_bytes) = self.memory(qmp, disk, cur, &ready.uri, ready.asked, memory_started)?;
        let switched = self.switchover(qmp, disk, cur, mem_bytes)?;
        Ok(Outcome {
            downtime_ms: switched.downtime_ms,
            memory_bytes: switched.memory_bytes,
            pause_disk_seconds: switched.pause_disk_seconds,
            manifest_id: switched.manifest_id,
            missing: ready.missing,
        })
    }

    /// The report of a migration that switched over after `total_seconds`.
    fn into_report(self, vm: String, total_seconds: f64, outcome: Outcome) -> MigrationReport {
        let ledger = self.ledger;
        MigrationReport {
            vm,
            to: self.opts.to,
            ordering: self.opts.ordering,
            total_seconds,
            downtime_ms: outcome.downtime_ms,
            pause_disk_seconds: outcome.pause_disk_seconds,
            phases: self.phases,
            chunks_resent: ledger.resent,
            delta_chunks: ledger.rounds.iter().map(|r| r.delta_chunks).sum(),
            delta_saved_bytes: ledger.rounds.iter().map(|r| r.delta_saved_bytes).sum(),
            disk_bytes: ledger.disk_bytes(),
            rounds: ledger.rounds,
            memory_bytes: outcome.memory_bytes,
            bytes_by_source: ledger.bytes_by_source,
            missing_at_plan_chunks: outcome.missing.chunks,
            missing_at_plan_bytes: outcome.missing.bytes,
            manifest_id: outcome.manifest_id,
            coordination: self.coord,
            throttle: self.throttle.report,
            memory_started_with_disk: self.memory_with_disk,
            disk_handoff: self.opts.disk_handoff,
            mirror: self.mirror.map(|m| MirrorReport {
                engine_chunks: m.engine_chunks,
                engine_bytes: m.engine_bytes,
                mirrored_bytes: m.mirrored_bytes,
            }),
            changed_since_boot_from: self.changed_since_boot_from,
        }
    }
}
