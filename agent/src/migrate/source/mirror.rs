//! Step 3a, the last chunks beside a mirror: once the pre-copy rounds have
//! converged, the source QEMU mirrors every new guest write to the
//! destination's NBD export, each write completing at both ends
//! (`blockdev-mirror`, `sync: none`, `copy-mode: write-blocking`); the
//! chunks written before the mirror was ready then go as one more disk
//! round, read after it, while the VM runs. The destination writes them
//! around the bytes the mirror carried (those are newer), so the pause
//! holds no disk round: QEMU completes the mirror, both sides hash what
//! changed, and memory's last pages go.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use edgeshift_common::Manifest;

use super::disk::LiveDisk;
use super::memory::{hold_memory_back, MemoryHold};
use super::session::{MirrorRun, Session};
use crate::migrate::report::Phase;
use crate::migrate::MigrateError;
use crate::vm::qemu::DISK_NODE_NAME;
use crate::vm::qmp::BlockJobInfo;
use crate::vm::Qmp;

/// The mirror's block job and its NBD client node in the source QEMU.
pub(super) const MIRROR_JOB: &str = "edgeshift-mirror";
pub(super) const MIRROR_NODE: &str = "edgeshift-mirror-target";
/// Longest the mirror may take to become ready, or to conclude.
const JOB_WAIT: Duration = Duration::from_secs(30);
/// How often the job is polled while it is waited for: in the pause, the
/// VM is down until it concludes.
const JOB_POLL: Duration = Duration::from_millis(2);

fn our_job(jobs: Vec<BlockJobInfo>) -> Option<BlockJobInfo> {
    jobs.into_iter().find(|j| j.device == MIRROR_JOB)
}

/// The mirror's job, or why it is not mirroring any more.
fn running_job(qmp: &mut dyn Qmp) -> Result<BlockJobInfo, MigrateError> {
    match our_job(qmp.query_block_jobs()?) {
        Some(j) if j.status == "concluded" || j.error.is_some() => Err(MigrateError::Mirror(format!(
            "the disk mirror stopped: {}",
            j.error.as_deref().unwrap_or("concluded")
        ))),
        Some(j) => Ok(j),
        None => Err(MigrateError::Mirror("the disk mirror's job is gone".into())),
    }
}

/// Polls the job until it concludes; returns it.
fn wait_concluded(qmp: &mut dyn Qmp, wait: Duration) -> Result<BlockJobInfo, MigrateError> {
    let t = Instant::now();
    loop {
        match our_job(qmp.query_block_jobs()?) {
            Some(j) if j.status == "concluded" => return Ok(j),
            Some(_) => {}
            None => return Err(MigrateError::Mirror("the disk mirror's job is gone".into())),
        }
        if t.elapsed() > wait {
            return Err(MigrateError::Mirror("the disk mirror did not conclude".into()));
        }
        std::thread::sleep(JOB_POLL);
    }
}

impl Session<'_> {
    /// Step 3a, beside memory's first pass (held from converging when
    /// `held`: a watch then slows it to a trickle as the pass ends), from
    /// the live disk `cur` as last read: the mirror starts, the chunks
    /// written before it go, and the destination writes them into its
    /// image. Returns the disk as read once the mirror was ready.
    pub(super) fn mirror_beside_memory(
        &mut self,
        qmp: &mut dyn Qmp,
        disk: &dyn LiveDisk,
        cur: Manifest,
        held: bool,
    ) -> Result<Manifest, MigrateError> {
        let t = Instant::now();
        self.start_mirror(qmp)?;
        let ready_s = t.elapsed().as_secs_f64();
        // The pause reads again every chunk written from now on (the
        // destination hashes what the mirror wrote).
        disk.collect_written();
        let hold = MemoryHold::default();
        let (sent, watched) = std::thread::scope(|sc| {
            let watch = held.then(|| {
                let hold = &hold;
                sc.spawn(move || hold_memory_back(qmp, hold))
            });
            let sent = self.send_beside_mirror(disk, cur);
            hold.stop();
            let watched = watch.map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(MigrateError::State("memory monitor panicked".into())))
            });
            (sent, watched)
        });
        let (next, n, bytes) = sent?;
        if let Some(w) = watched {
            w?;
        }
        tracing::info!(
            ready_s,
            chunks = n,
            bytes,
            seconds = t.elapsed().as_secs_f64(),
            "disk mirror running; the chunks written before it are in the destination's image"
        );
        self.injected(Phase::Mirror)?;
        Ok(next)
    }

    /// Opens the destination's export and starts the mirror job; returns
    /// once it is ready.
    fn start_mirror(&mut self, qmp: &mut dyn Qmp) -> Result<(), MigrateError> {
        let t = Instant::now();
        self.say(Phase::Mirror, "opening the destination's export");
        let (addr, export) = self.dest()?.open_mirror()?;
        let at: SocketAddr = addr
            .parse()
            .map_err(|e| MigrateError::Protocol(format!("mirror export address {addr:?}: {e}")))?;
        qmp.blockdev_add_nbd(
            MIRROR_NODE,
            &at.ip().to_string(),
            at.port(),
            &export,
            self.nbd_tls.as_ref(),
        )?;
        self.mirror = Some(MirrorRun {
            started: t,
            node: true,
            job: false,
            engine_bytes: 0,
            engine_chunks: 0,
            mirrored_bytes: 0,
        });
        qmp.mirror_new_writes(MIRROR_JOB, DISK_NODE_NAME, MIRROR_NODE)?;
        if let Some(m) = self.mirror.as_mut() {
            m.job = true;
        }
        loop {
            if running_job(qmp)?.ready {
                return Ok(());
            }
            if t.elapsed() > JOB_WAIT {
                return Err(MigrateError::Mirror(
                    "the disk mirror did not become ready".into(),
                ));
            }
            std::thread::sleep(JOB_POLL);
        }
    }

    /// Every guest write now completes at both ends: what was written
    /// before, read now, is all the engine still sends; then the wait for
    /// the destination's image to hold it. Returns the disk as read, the
    /// chunks sent and their bytes.
    fn send_beside_mirror(
        &mut self,
        disk: &dyn LiveDisk,
        cur: Manifest,
    ) -> Result<(Manifest, u64, u64), MigrateError> {
        let next = disk.look(&cur, &mut self.temp)?;
        self.temp.observe(&cur, &next);
        let stale = self.ledger.stale(&next);
        let n = stale.len() as u64;
        self.say(
            Phase::Mirror,
            &format!("mirror ready; {n} chunks written before it go beside it"),
        );
        let before = self.ledger.disk_bytes();
        if !stale.is_empty() {
            let only_source = self.only_source();
            self.round_from(&next, stale, only_source)?;
        }
        let sent = self.ledger.disk_bytes() - before;
        if let Some(m) = self.mirror.as_mut() {
            m.engine_bytes = sent;
            m.engine_chunks = n;
        }
        let t = Instant::now();
        self.dest()?.await_image()?;
        tracing::info!(seconds = t.elapsed().as_secs_f64(), "destination image written");
        Ok((next, n, sent))
    }

    /// While memory moves: an error once the mirror has stopped (its NBD
    /// connection cut, the destination's disk full, ...).
    pub(super) fn check_mirror(&mut self, qmp: &mut dyn Qmp) -> Result<(), MigrateError> {
        if self.mirror.is_none() {
            return Ok(());
        }
        let j = running_job(qmp)?;
        if let Some(m) = self.mirror.as_mut() {
            m.mirrored_bytes = j.offset;
        }
        Ok(())
    }

    /// In the pause (the VM stopped): QEMU completes the mirror, so the
    /// destination's disk holds every write. (A guest write that covers
    /// its granules only in part leaves them dirty for QEMU's background
    /// copy, and the job's `len` counts them only when its loop next runs:
    /// a job that looks in step may not be; skipping this made one run of
    /// (b) at 50 Mbit/s fail its check.)
    pub(super) fn mirror_in_step(&mut self, qmp: &mut dyn Qmp) -> Result<(), MigrateError> {
        let Some(started) = self.mirror.as_ref().map(|m| m.started) else {
            return Ok(());
        };
        running_job(qmp)?;
        self.complete_mirror(qmp, started)
    }

    /// QEMU completes the mirror (a ready job cancelled without `force`
    /// ends once the target is in step).
    fn complete_mirror(&mut self, qmp: &mut dyn Qmp, started: Instant) -> Result<(), MigrateError> {
        let t = Instant::now();
        qmp.block_job_cancel(MIRROR_JOB, false)?;
        let asked_s = t.elapsed().as_secs_f64();
        let j = wait_concluded(qmp, JOB_WAIT)?;
        tracing::info!(
            asked_s,
            concluded_s = t.elapsed().as_secs_f64(),
            "disk mirror completed in the pause"
        );
        if let Some(e) = j.error {
            return Err(MigrateError::Mirror(format!(
                "the disk mirror failed at the end: {e}"
            )));
        }
        qmp.job_dismiss(MIRROR_JOB)?;
        let bytes = match self.mirror.as_mut() {
            Some(m) => {
                m.job = false;
                m.mirrored_bytes = j.offset;
                m.engine_bytes + j.offset
            }
            None => 0,
        };
        self.phase_done(Phase::Mirror, started, bytes);
        Ok(())
    }

    /// Rollback: the mirror stopped at once and its node removed; the
    /// source's disk is as the guest left it (the mirror only reads it).
    pub(super) fn drop_mirror(&mut self, qmp: &mut dyn Qmp) {
        let Some(m) = self.mirror.take() else {
            return;
        };
        if m.job {
            if let Err(e) = qmp.block_job_cancel(MIRROR_JOB, true) {
                tracing::debug!(error = %e, "block-job-cancel (the job may have concluded)");
            }
            match wait_concluded(qmp, JOB_WAIT) {
                Ok(_) => {
                    if let Err(e) = qmp.job_dismiss(MIRROR_JOB) {
                        tracing::warn!(error = %e, "mirror job not dismissed");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "mirror job not concluded"),
            }
        }
        if m.node {
            if let Err(e) = qmp.blockdev_del(MIRROR_NODE) {
                tracing::warn!(error = %e, "mirror's NBD node not removed");
            }
        }
        tracing::info!("disk mirror stopped");
    }
}
