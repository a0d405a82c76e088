//! Putting the source back as it was after a failure before the
//! switchover: QEMU's migration cancelled, the disk mirror stopped and its
//! NBD node removed, QEMU's TLS object removed, the disk-write throttle lifted,
//! the VM running, the destination told to drop its half.

use std::time::{Duration, Instant};

use super::session::Session;
use crate::vm::Qmp;

/// Longest the cancelled migration may take to settle.
const CANCEL_WAIT: Duration = Duration::from_secs(30);
const CANCEL_POLL: Duration = Duration::from_millis(50);

impl Session<'_> {
    /// Rolls back through `qmp` (best a fresh session: the one the
    /// migration used may be mid-reply after an error). Every step is
    /// tried whatever the others did.
    pub(super) fn rollback(&mut self, qmp: &mut dyn Qmp) {
        if self.migration_started {
            if let Err(e) = qmp.migrate_cancel() {
                tracing::warn!(error = %e, "migrate_cancel failed");
            }
            let deadline = Instant::now() + CANCEL_WAIT;
            while Instant::now() < deadline {
                match qmp.query_migrate() {
                    Ok(m)
                        if matches!(
                            m.status.as_deref(),
                            Some("cancelled" | "failed" | "completed") | None
                        ) =>
                    {
                        break
                    }
                    Ok(_) => std::thread::sleep(CANCEL_POLL),
                    Err(_) => break,
                }
            }
        }
        self.drop_mirror(qmp);
        self.drop_qemu_tls(qmp);
        self.throttle.lift(qmp);
        match qmp.query_status() {
            Ok(s) if !s.running => {
                if let Err(e) = qmp.cont() {
                    tracing::error!(error = %e, "the source VM could not be resumed");
                } else {
                    tracing::info!("source VM resumed");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "source VM state unknown"),
        }
        if let Some(mut dest) = self.dest.take() {
            match dest.abort() {
                Ok(()) => tracing::info!("destination tore its half down"),
                Err(e) => {
                    tracing::warn!(error = %e, "destination not reachable for abort (it tears down when the connection drops)")
                }
            }
        }
    }
}
