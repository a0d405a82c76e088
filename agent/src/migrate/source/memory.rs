//! Memory through QEMU: the transport, starting QEMU's `migrate` (with
//! `pause-before-switchover`), holding memory back from converging while
//! the disk pre-copy runs beside it, then step 3: memory up to the pause,
//! with disk rounds alongside.

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use edgeshift_common::Manifest;

use super::disk::LiveDisk;
use super::options::MigrateOptions;
use super::session::Session;
use crate::migrate::report::DiskHandoff;
use crate::migrate::report::Phase;
use crate::migrate::MigrateError;
use crate::vm::{MemoryTransport, Qmp};

/// QEMU's `max-bandwidth` when nothing caps memory (1 GiB/s: the path decides).
const UNCAPPED_BPS: u64 = 1 << 30;
/// QEMU's `max-bandwidth` once memory's first pass is nearly over and disk
/// rounds still run: a trickle. Passes over the dirty pages now would send
/// pages that are dirtied again before the switchover (the path is the
/// disk's), and slow passes leave little chance of one with nothing dirty
/// (the one way a held migration can still converge). QEMU 10's multifd
/// streams do not keep to it, but its passes slow down.
const MEMORY_TRICKLE_BPS: u64 = 64 << 10;
/// How often the watch looks at QEMU.
const MEMORY_WATCH: Duration = Duration::from_millis(25);
/// How often a disk round runs while QEMU moves memory.
const DISK_ROUND_DURING_MEMORY: Duration = Duration::from_secs(1);
/// Longest memory may take to reach the pause (and the pause to complete).
pub(super) const MEMORY_TIMEOUT: Duration = Duration::from_secs(900);
/// How often step 3 looks for the pause: it starts when this loop notices.
const PAUSE_POLL: Duration = Duration::from_millis(3);

/// Sets `want` on the source QEMU, or plain migration (with a log line)
/// when this QEMU cannot take it. Returns what was set.
pub(super) fn source_memory_transport(
    qmp: &mut dyn Qmp,
    want: MemoryTransport,
) -> Result<MemoryTransport, MigrateError> {
    match qmp.set_memory_transport(want) {
        Ok(()) => Ok(want),
        Err(e) => {
            tracing::warn!(error = %e, ?want, "this QEMU cannot take that memory transport; falling back to plain migration");
            qmp.set_memory_transport(MemoryTransport::Plain)?;
            Ok(MemoryTransport::Plain)
        }
    }
}

/// QEMU's `max-bandwidth` for memory: `--memory-max-mbit`, else uncapped.
fn memory_cap(opts: &MigrateOptions) -> u64 {
    opts.memory_max_bps.unwrap_or(UNCAPPED_BPS)
}

impl Session<'_> {
    /// Starts QEMU's memory migration to `uri` once the destination QEMU
    /// listens: the transport the destination settled on,
    /// pause-before-switchover, the downtime limit and the
    /// `--memory-max-mbit` cap. With `hold`, memory cannot converge (QEMU's
    /// switchover bandwidth set to a few bytes/s) until
    /// [`Session::let_memory_converge`]; false, and nothing started, when
    /// this QEMU cannot do that.
    pub(super) fn start_memory(
        &mut self,
        qmp: &mut dyn Qmp,
        uri: &str,
        asked: MemoryTransport,
        hold: bool,
    ) -> Result<bool, MigrateError> {
        if hold {
            // QEMU converges once what is pending fits the downtime at this
            // rate. The budget must stay above zero: at zero the first pass's
            // end (nothing pending before a new dirty sync) counts as
            // converged. Half a page (2 KiB over the downtime limit) lets
            // only a sync that finds no page dirty converge.
            let hold_bps = (2048 * 1000 / self.opts.downtime_limit_ms.max(1)).max(1);
            if let Err(e) = qmp.set_switchover_bandwidth(hold_bps) {
                tracing::warn!(error = %e, "this QEMU cannot hold memory back; memory goes after the disk");
                return Ok(false);
            }
        } else if let Err(e) = qmp.set_switchover_bandwidth(0) {
            // Older QEMU: nothing of a held migration can linger there either.
            tracing::debug!(error = %e, "no avail-switchover-bandwidth in this QEMU");
        }
        self.say(Phase::Memory, "waiting for the destination QEMU");
        let memory = self.dest()?.await_incoming()?;
        if memory != asked {
            tracing::warn!(
                ?asked,
                ?memory,
                "the destination QEMU fell back; so does the source"
            );
            qmp.set_memory_transport(memory)?;
        }
        self.say(Phase::Memory, &format!("QEMU migrate to {uri} ({memory:?})"));
        qmp.migrate_set_capabilities(&[("pause-before-switchover", true), ("events", true)])?;
        let cap = memory_cap(&self.opts);
        qmp.migrate_set_parameters(Some(self.opts.downtime_limit_ms), Some(cap))?;
        qmp.migrate(uri)?;
        tracing::info!(%uri, ?memory, hold, cap_bps = cap, "memory migration started");
        Ok(true)
    }

    /// Ends the hold of [`Session::start_memory`]: the measured rate
    /// decides the switchover again, and memory has the path (up to
    /// `--memory-max-mbit`).
    pub(super) fn let_memory_converge(&self, qmp: &mut dyn Qmp) -> Result<(), MigrateError> {
        qmp.set_switchover_bandwidth(0)?;
        qmp.migrate_set_parameters(Some(self.opts.downtime_limit_ms), Some(memory_cap(&self.opts)))?;
        Ok(())
    }
}

/// Signals between the disk pre-copy and [`hold_memory_back`].
#[derive(Default)]
pub(super) struct MemoryHold {
    /// QEMU reached pre-switchover (the VM is stopped) under the disk rounds.
    pub(super) converged: AtomicBool,
    pub(super) stop: AtomicBool,
}

impl MemoryHold {
    pub(super) fn converged(&self) -> bool {
        self.converged.load(AtomicOrdering::Acquire)
    }

    pub(super) fn stop(&self) {
        self.stop.store(true, AtomicOrdering::Release);
    }
}

/// Runs beside the disk pre-copy while memory moves (held from converging,
/// see [`Session::start_memory`]): before the first pass ends (in its last
/// quarter, or at QEMU's second dirty sync) memory drops to a trickle. (A
/// cap on memory's share of the path beside round 0 does not hold: QEMU's
/// multifd streams overran it; see docs/migration.md.)
pub(super) fn hold_memory_back(qmp: &mut dyn Qmp, hold: &MemoryHold) -> Result<(), MigrateError> {
    let mut held = false;
    while !hold.stop.load(AtomicOrdering::Acquire) {
        let info = qmp.query_migrate()?;
        match info.status.as_deref() {
            Some("pre-switchover") => {
                hold.converged.store(true, AtomicOrdering::Release);
                tracing::warn!("memory converged before the disk rounds ended; the pause sends the rest");
                return Ok(());
            }
            // The memory phase reports these.
            Some("failed") | Some("cancelled") | Some("completed") => return Ok(()),
            _ => {}
        }
        let ram = info.ram.unwrap_or_default();
        tracing::debug!(
            status = info.status.as_deref().unwrap_or("-"),
            transferred = ram.transferred,
            remaining = ram.remaining,
            dirty_syncs = ram.dirty_sync_count,
            "memory under the disk rounds"
        );
        // QEMU walks memory in address order and the end of a guest's
        // memory is mostly zero pages (free on the wire), so the last
        // quarter goes in a blink; held back before it, the pass ends (if
        // at all) at a trickle, where no quick run of empty dirty syncs can
        // converge it.
        let last_quarter = ram.total > 0 && ram.remaining < ram.total / 4 && ram.transferred > 0;
        if !held && (ram.dirty_sync_count >= 2 || last_quarter) {
            qmp.migrate_set_parameters(None, Some(MEMORY_TRICKLE_BPS))?;
            held = true;
            tracing::info!(
                transferred = ram.transferred,
                remaining = ram.remaining,
                "memory's first pass nearly done under the disk rounds: held back until they end"
            );
        }
        std::thread::sleep(MEMORY_WATCH);
    }
    Ok(())
}

impl Session<'_> {
    /// Step 3: memory up to the pause before switchover, with disk rounds
    /// alongside (QEMU's `migrate` runs in its own threads). Started
    /// already with the disk (at `started_with_disk`), memory is now let
    /// converge at full rate. Returns the live disk as last read and the
    /// memory bytes sent so far.
    pub(super) fn memory(
        &mut self,
        qmp: &mut dyn Qmp,
        disk: &dyn LiveDisk,
        mut cur: Manifest,
        uri: &str,
        asked: MemoryTransport,
        started_with_disk: Option<Instant>,
    ) -> Result<(Manifest, u64), MigrateError> {
        let ordering = self.opts.ordering;
        let converge_chunks = self.opts.converge_chunks;
        let beside_mirror = self.opts.disk_handoff == DiskHandoff::Mirror;
        let t = match started_with_disk {
            Some(started) if beside_mirror => {
                // Still held from converging: the mirror starts beside it.
                let next = self.mirror_beside_memory(qmp, disk, cur, true)?;
                cur = next;
                self.say(Phase::Memory, &format!("QEMU migrate to {uri}: converging"));
                self.let_memory_converge(qmp)?;
                started
            }
            Some(started) => {
                self.say(Phase::Memory, &format!("QEMU migrate to {uri}: converging"));
                self.let_memory_converge(qmp)?;
                started
            }
            None if beside_mirror => {
                // Memory's first pass runs while the mirror starts, the
                // chunks written before it go and the destination writes
                // them into its image, held from converging (the pause
                // must not wait for any of that).
                let t = Instant::now();
                let held = self.start_memory(qmp, uri, asked, true)?;
                if !held {
                    self.start_memory(qmp, uri, asked, false)?;
                }
                self.migration_started = true;
                cur = self.mirror_beside_memory(qmp, disk, cur, held)?;
                if held {
                    self.let_memory_converge(qmp)?;
                }
                t
            }
            None => {
                let t = Instant::now();
                self.start_memory(qmp, uri, asked, false)?;
                self.migration_started = true;
                t
            }
        };
        self.ledger.memory_running = true;
        // The first look at the disk goes at once.
        let mut last_disk: Option<Instant> = None;
        let info = loop {
            let m = qmp.query_migrate()?;
            match m.status.as_deref() {
                Some("pre-switchover") => break m,
                Some("failed") | Some("cancelled") => {
                    return Err(MigrateError::Memory(format!(
                        "failed before the switchover: {}",
                        m.error_desc.unwrap_or_else(|| "no reason given".into())
                    )))
                }
                _ => {}
            }
            if t.elapsed() > MEMORY_TIMEOUT {
                return Err(MigrateError::Memory("did not converge in time".into()));
            }
            // While memory moves, the writes pile up for the pause (downtime).
            // Past twice `converge_chunks` a round sends them (the hot chunks
            // held so far included, coldest first). Fewer are left for the
            // pause: a round beside QEMU's streams gets a small share of the
            // source's path and holds up noticing the pre-switchover state.
            // The first look, with memory's whole pass ahead, sends what
            // pre-copy left past `converge_chunks`, as a round before memory
            // would have.
            let first_look = last_disk.is_none();
            if self.mirror.is_some() {
                // The mirror carries every write: a look keeps the pause's
                // own look small, and the mirror must still run.
                if last_disk.is_none_or(|l| l.elapsed() >= DISK_ROUND_DURING_MEMORY) {
                    last_disk = Some(Instant::now());
                    self.check_mirror(qmp)?;
                    let next = disk.look(&cur, &mut self.temp)?;
                    self.temp.observe(&cur, &next);
                    cur = next;
                    if self.opts.fail_after == Some(Phase::MemoryRound) {
                        return Err(MigrateError::State(format!(
                            "failure injected at a disk look while QEMU moves memory (migration {}) beside the mirror",
                            m.status.as_deref().unwrap_or("unknown")
                        )));
                    }
                }
            } else if last_disk.is_none_or(|l| l.elapsed() >= DISK_ROUND_DURING_MEMORY) {
                last_disk = Some(Instant::now());
                let next = disk.look(&cur, &mut self.temp)?;
                self.temp.observe(&cur, &next);
                cur = next;
                let stale = self.ledger.stale(&cur);
                self.squeeze(qmp, &stale)?;
                // Throttled, a round goes whenever more is pending than the
                // budget allows, so the pause starts from a small set.
                let over_budget = self.throttle.applied() && self.ledger.over_budget(&stale);
                let (_, mut todo) = self.temp.hold_hottest(stale, ordering, self.ledger.hold_room());
                let most_left = if first_look {
                    converge_chunks
                } else {
                    2 * converge_chunks
                };
                if todo.len() > most_left || over_budget {
                    if self.throttle.applied() {
                        // A round blocks noticing the pause; throttled (a slow
                        // path), it sends only what the budget holds, coldest
                        // first, so a pause that comes meanwhile waits little.
                        todo.truncate(self.ledger.budget_chunks().max(1));
                    }
                    let only_source = self.only_source();
                    self.round_from(&cur, todo, only_source)?;
                }
                if self.opts.fail_after == Some(Phase::MemoryRound) {
                    return Err(MigrateError::State(format!(
                        "failure injected at a disk round while QEMU moves memory (migration {})",
                        m.status.as_deref().unwrap_or("unknown")
                    )));
                }
            }
            std::thread::sleep(PAUSE_POLL);
        };
        let mem_bytes = info.ram.map(|r| r.transferred).unwrap_or(0);
        self.phase_done(Phase::Memory, t, mem_bytes);
        self.injected(Phase::Memory)?;
        Ok((cur, mem_bytes))
    }
}
