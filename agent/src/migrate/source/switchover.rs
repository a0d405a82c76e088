//! Step 4, the pause: the source VM is stopped (QEMU paused it before the
//! switchover) and its disk flushed; the disk mirror is completed (or,
//! without one, the last dirty chunks go over), the
//! destination's disk is checked equal to the source's manifest, then
//! `migrate-continue` hands the VM over and the destination keeps it.

use std::time::{Duration, Instant};

use edgeshift_common::Manifest;

use super::disk::LiveDisk;
use super::memory::MEMORY_TIMEOUT;
use super::session::Session;
use crate::migrate::report::Phase;
use crate::migrate::temperature::Temperature;
use crate::migrate::MigrateError;
use crate::vm::Qmp;

/// How often the switchover is polled: the VM is down until it completes.
const SWITCHOVER_POLL: Duration = Duration::from_millis(2);

/// What the switchover did.
#[derive(Debug, Clone)]
pub(super) struct Switched {
    /// QEMU's downtime, ms.
    pub(super) downtime_ms: u64,
    /// Memory bytes QEMU sent in all.
    pub(super) memory_bytes: u64,
    /// Time the source VM was paused for the disk.
    pub(super) pause_disk_seconds: f64,
    /// The live disk's final manifest, hex.
    pub(super) manifest_id: String,
}

impl Session<'_> {
    /// Step 4, from the live disk `cur` as last read and the memory bytes
    /// sent before the pause. Past its `migrate-continue` the VM is the
    /// destination's.
    pub(super) fn switchover(
        &mut self,
        qmp: &mut dyn Qmp,
        disk: &dyn LiveDisk,
        cur: Manifest,
        mem_bytes_precopy: u64,
    ) -> Result<Switched, MigrateError> {
        let t = Instant::now();
        self.say(Phase::Pause, "final chunks");
        let st = qmp.query_status()?;
        if st.running {
            return Err(MigrateError::Memory(format!(
                "source VM still {} in the pause",
                st.status
            )));
        }
        // QEMU drained the guest's writes when it paused it: the last look
        // reads the disk while the mirror is seen to be in step (or
        // completed, if it still had writes in flight).
        let mirrored = self.mirror.is_some();
        let mut temp = std::mem::replace(&mut self.temp, Temperature::new(0));
        let (looked, in_step) = std::thread::scope(|sc| {
            let reader = sc.spawn(|| -> Result<(Manifest, f64), MigrateError> {
                if !mirrored {
                    disk.flush()?;
                }
                let mut fin = disk.look(&cur, &mut temp)?;
                let t_look = t.elapsed().as_secs_f64();
                if mirrored {
                    // Every chunk written since the mirror started, read now
                    // that the guest's writes have all landed.
                    fin = disk.read_again(&fin, &disk.written_collected())?;
                }
                Ok((fin, t_look))
            });
            let in_step = self.mirror_in_step(qmp);
            let looked = reader
                .join()
                .unwrap_or_else(|_| Err(MigrateError::State("the pause's look panicked".into())));
            (looked, in_step)
        });
        self.temp = temp;
        in_step?;
        let t_mirror = t.elapsed().as_secs_f64();
        let (fin, t_look) = looked?;
        let t_slice = t.elapsed().as_secs_f64();
        self.temp.observe(&cur, &fin);
        let mut last = self.ledger.stale(&fin);
        let last_n = last.len();
        let before = self.ledger.disk_bytes();
        if self.mirror.is_some() {
            // The mirror carried them; the destination hashes what it wrote.
            last.clear();
        } else {
            // Everything written since the last round exists only at the source.
            let only_source = self.only_source();
            self.round_from(&fin, last.clone(), only_source)?;
        }
        let t_round = t.elapsed().as_secs_f64();
        let fin_id = fin.id();
        let verdict = self.dest()?.verify(fin_id.0, last)?;
        if !verdict.ok {
            return Err(MigrateError::Verify(verdict.detail));
        }
        tracing::info!(
            final_chunks = last_n,
            mirror = self.mirror.is_some(),
            detail = %verdict.detail,
            mirror_s = t_mirror,
            look_s = t_look,
            slice_s = t_slice,
            round_s = t_round - t_slice,
            verify_s = t.elapsed().as_secs_f64() - t_round,
            tracker = disk.tracked(),
            "pause: destination disk equals the source's"
        );
        self.injected(Phase::Pause)?;
        let pause_disk_seconds = t.elapsed().as_secs_f64();
        qmp.migrate_continue("pre-switchover")?;
        let done = loop {
            let m = qmp.query_migrate()?;
            match m.status.as_deref() {
                Some("completed") => break m,
                Some("failed") | Some("cancelled") => {
                    return Err(MigrateError::Memory(format!(
                        "failed at the switchover: {}",
                        m.error_desc.unwrap_or_else(|| "no reason given".into())
                    )))
                }
                _ => {}
            }
            if t.elapsed() > MEMORY_TIMEOUT {
                return Err(MigrateError::Memory("switchover did not complete".into()));
            }
            std::thread::sleep(SWITCHOVER_POLL);
        };
        // Past this point the VM is the destination's: no rollback.
        self.migration_started = false;
        self.phase_done(Phase::Pause, t, self.ledger.disk_bytes() - before);
        self.say(Phase::Pause, "finishing at the destination");
        match self.dest()?.finish() {
            Ok(coordinator) => {
                if let Some(t) = coordinator.as_deref().filter(|t| t.contains("left:")) {
                    self.coord.left.push(format!("destination: {t}"));
                }
                self.coord.destination = coordinator;
            }
            Err(e) => {
                tracing::warn!(error = %e, "destination did not confirm Finish; it keeps a VM that switched over")
            }
        }
        Ok(Switched {
            downtime_ms: done.downtime.unwrap_or(0),
            memory_bytes: done.ram.map(|r| r.transferred).unwrap_or(mem_bytes_precopy),
            pause_disk_seconds,
            manifest_id: fin_id.to_hex(),
        })
    }
}
