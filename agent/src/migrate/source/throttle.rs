//! The squeeze on the source VM's disk writes while memory moves: when the
//! chunks dirtied per round would take longer than `--max-downtime` to send
//! in the pause, the guest's writes are throttled, harder each step, so the
//! pause stays near its budget (QEMU's auto-converge does the same to vCPUs
//! for memory). Lifted again when the VM stays here.

use std::time::Duration;

use super::ledger::Ledger;
use crate::migrate::report::ThrottleReport;
use crate::migrate::MigrateError;
use crate::vm::{qemu::DISK_NODE_NAME, Qmp};

/// The squeeze starts at what the source's path can send within the
/// budget each second (a write can dirty a whole chunk, so IOPS is chunks
/// per second), at most these; each further step halves both, down to the
/// floors (the guest keeps making progress).
pub(super) const THROTTLE_START_BPS: u64 = 16 << 20;
pub(super) const THROTTLE_START_IOPS: u64 = 1024;
pub(super) const THROTTLE_FLOOR_BPS: u64 = 64 << 10;
pub(super) const THROTTLE_FLOOR_IOPS: u64 = 2;

pub(super) struct Throttle {
    pub(super) report: ThrottleReport,
    /// The source disk's qdev path once a throttle was set (to lift it).
    qdev: Option<String>,
}

impl Throttle {
    /// No throttle yet; `max_downtime` is the pause's budget.
    pub(super) fn new(max_downtime: Duration) -> Self {
        Throttle {
            report: ThrottleReport {
                max_downtime_ms: max_downtime.as_millis() as u64,
                ..Default::default()
            },
            qdev: None,
        }
    }

    pub(super) fn applied(&self) -> bool {
        self.report.applied
    }

    /// Tightens the throttle one step when `stale` chunks would take longer
    /// than the budget to send in the pause; nothing before the source's
    /// path was measured, and nothing once at the floors.
    pub(super) fn squeeze(
        &mut self,
        qmp: &mut dyn Qmp,
        ledger: &Ledger,
        stale: &[u32],
    ) -> Result<(), MigrateError> {
        let (Some(rate), Some(estimate)) = (ledger.source_rate, ledger.pause_estimate(stale)) else {
            return Ok(());
        };
        let budget = ledger.max_downtime().as_secs_f64();
        if estimate <= budget {
            return Ok(());
        }
        let pending = stale.len();
        let qdev = match &self.qdev {
            Some(q) => q.clone(),
            None => qmp.disk_write_throttle(DISK_NODE_NAME)?.qdev,
        };
        let t = &mut self.report;
        let (bps, iops) = if t.applied {
            (
                (t.bps_wr / 2).max(THROTTLE_FLOOR_BPS),
                (t.iops_wr / 2).max(THROTTLE_FLOOR_IOPS),
            )
        } else {
            let budget_bytes = rate * budget;
            (
                (budget_bytes as u64).clamp(THROTTLE_FLOOR_BPS, THROTTLE_START_BPS),
                ((budget_bytes / ledger.chunk_bytes as f64) as u64)
                    .clamp(THROTTLE_FLOOR_IOPS, THROTTLE_START_IOPS),
            )
        };
        if t.applied && bps == t.bps_wr && iops == t.iops_wr {
            return Ok(());
        }
        qmp.set_disk_write_throttle(&qdev, bps, iops)?;
        self.qdev = Some(qdev);
        t.applied = true;
        t.steps += 1;
        t.bps_wr = bps;
        t.iops_wr = iops;
        t.pending_chunks = pending as u64;
        t.estimated_pause_seconds = estimate;
        tracing::warn!(
            pending,
            estimate_s = estimate,
            budget_s = budget,
            bps_wr = bps,
            iops_wr = iops,
            step = t.steps,
            "throttling the source VM's disk writes so the pause fits the downtime budget"
        );
        metrics::counter!("edgeshift_migrate_throttle_steps_total").increment(1);
        Ok(())
    }

    /// The VM stays here: its disk runs at full speed again. The report
    /// keeps what was applied.
    pub(super) fn lift(&mut self, qmp: &mut dyn Qmp) {
        if let Some(qdev) = self.qdev.take() {
            match qmp.set_disk_write_throttle(&qdev, 0, 0) {
                Ok(()) => tracing::info!("source disk write throttle lifted"),
                Err(e) => tracing::error!(error = %e, "the source disk write throttle could not be lifted"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::proto::{HolderStats, PullStats};
    use crate::vm::qmp::fake::{FakeQmp, FAKE_QDEV};
    use edgeshift_common::{ChunkSize, Fingerprint, Manifest};

    const CHUNK: u64 = 64 << 10;
    const SOURCE: &str = "10.0.0.1:7000";

    /// A ledger whose source path was measured at `chunks_per_s` chunks a
    /// second, with a budget of one second.
    fn measured(chunks_per_s: u64) -> (Ledger, Manifest) {
        let m = Manifest::new(
            ChunkSize::new(CHUNK).expect("chunk size"),
            100 * CHUNK,
            (0..100u32).map(|i| Fingerprint::of(&i.to_le_bytes())).collect(),
        );
        let mut l = Ledger::new(100, CHUNK, SOURCE.into(), Duration::from_secs(1), true);
        let stats = PullStats {
            holders: vec![HolderStats {
                holder: SOURCE.into(),
                chunks: chunks_per_s,
                bytes: chunks_per_s * CHUNK,
                ..Default::default()
            }],
            seconds: 1.0,
            ..Default::default()
        };
        let idx: Vec<u32> = (0..chunks_per_s.min(100) as u32).collect();
        l.record(&m, &idx, &stats, 0, 1.0);
        (l, m)
    }

    fn pending(n: u32) -> Vec<u32> {
        (50..50 + n).collect()
    }

    #[test]
    fn no_squeeze_within_the_budget_or_before_a_measurement() {
        let mut q = FakeQmp::running();
        let (l, _) = measured(10);
        let mut t = Throttle::new(l.max_downtime());
        t.squeeze(&mut q, &l, &pending(10)).expect("squeeze");
        assert!(!t.applied(), "10 chunks at 10/s fit a 1 s budget");
        let unmeasured = Ledger::new(100, CHUNK, SOURCE.into(), Duration::from_secs(1), true);
        t.squeeze(&mut q, &unmeasured, &pending(40)).expect("squeeze");
        assert!(!t.applied(), "no rate yet: no estimate");
        assert!(q.calls().is_empty(), "{:?}", q.calls());
    }

    #[test]
    fn squeeze_engages_over_budget_then_halves_down_to_the_floors() {
        let mut q = FakeQmp::running();
        let (l, _) = measured(10);
        let mut t = Throttle::new(l.max_downtime());
        t.squeeze(&mut q, &l, &pending(30)).expect("squeeze");
        assert!(t.applied());
        // The budget is 10 chunks (640 KiB) a second at the measured rate.
        assert_eq!(q.throttle(), (10 * CHUNK, 10));
        assert_eq!(t.report.steps, 1);
        assert_eq!(t.report.pending_chunks, 30);
        assert!((t.report.estimated_pause_seconds - 3.0).abs() < 1e-9);
        t.squeeze(&mut q, &l, &pending(30)).expect("squeeze");
        assert_eq!(q.throttle(), (5 * CHUNK, 5), "halved");
        for _ in 0..20 {
            t.squeeze(&mut q, &l, &pending(30)).expect("squeeze");
        }
        assert_eq!(q.throttle(), (THROTTLE_FLOOR_BPS, THROTTLE_FLOOR_IOPS));
        let steps = t.report.steps;
        let sets = q.calls_of("block_set_io_throttle").len();
        t.squeeze(&mut q, &l, &pending(30)).expect("squeeze");
        assert_eq!(t.report.steps, steps, "no step past the floors");
        assert_eq!(q.calls_of("block_set_io_throttle").len(), sets, "and no QMP call");
        assert_eq!(q.calls_of("query-block").len(), 1, "the qdev is looked up once");
        assert!(q.calls()[1].contains(FAKE_QDEV), "{:?}", q.calls());
    }

    #[test]
    fn the_first_step_is_capped_at_the_start_limits() {
        let mut q = FakeQmp::running();
        // 2000 chunks a second: the budget (125 MiB, 2000 chunks) is above both caps.
        let (l, _) = measured(2000);
        let mut t = Throttle::new(l.max_downtime());
        t.squeeze(&mut q, &l, &(0..1900).collect::<Vec<_>>())
            .expect("squeeze");
        assert!(!t.applied(), "1900 chunks fit");
        t.squeeze(&mut q, &l, &(0..3000).collect::<Vec<_>>())
            .expect("squeeze");
        assert!(t.applied());
        assert_eq!(q.throttle(), (THROTTLE_START_BPS, THROTTLE_START_IOPS));
    }

    #[test]
    fn lift_sets_no_limit_and_only_once() {
        let mut q = FakeQmp::running();
        let (l, _) = measured(10);
        let mut t = Throttle::new(l.max_downtime());
        t.lift(&mut q);
        assert!(q.calls().is_empty(), "nothing to lift");
        t.squeeze(&mut q, &l, &pending(30)).expect("squeeze");
        t.lift(&mut q);
        assert_eq!(q.throttle(), (0, 0));
        let n = q.calls().len();
        t.lift(&mut q);
        assert_eq!(q.calls().len(), n);
        assert!(t.report.applied, "the report keeps what was applied");
    }
}
