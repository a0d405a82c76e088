//! Step 1, the plan: the destination prepares with the manifest the VM
//! booted from and says what its store lacks, and its QEMU starts with
//! `-incoming defer`, while what changed since boot is read here.

use std::time::Instant;

use edgeshift_common::Manifest;

use super::control::Destination;
use super::disk::LiveDisk;
use super::memory::source_memory_transport;
use super::reslice::interleave;
use super::session::Session;
use crate::migrate::report::{ChangedSinceBoot, Phase};
use crate::migrate::MigrateError;
use crate::vm::{MemoryTransport, Qmp, VmSpec};

/// A chunk the boot log saw written at least this often since boot is hot
/// from the start: one guest write of a chunk is one or two block writes,
/// so three mean it was written again. A chunk written often long ago (a
/// journal block of an earlier lap) counts as hot too; waiting costs it
/// nothing but pause time, and the pause's budget caps how many wait.
/// (When each chunk was last written would tell them apart, but a
/// timestamp per write is too dear for every write of every VM; see
/// docs/migration.md.)
const HOT_WRITES: u64 = 3;

/// The chunks and bytes the destination's store lacked at the plan.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Missing {
    pub(super) chunks: u64,
    pub(super) bytes: u64,
}

/// What changed since boot by the boot log, and the live disk with those
/// chunks read again.
pub(super) struct SinceBoot {
    pub(super) indices: Vec<u32>,
    pub(super) live: Manifest,
}

/// What step 1 leaves for the rest.
pub(super) struct Ready {
    /// The memory transport the source asked the destination for.
    pub(super) asked: MemoryTransport,
    /// Where the destination QEMU listens for memory.
    pub(super) uri: String,
    pub(super) missing: Missing,
    /// None without a boot log: round 0 then goes beside a slice.
    pub(super) since_boot: Option<SinceBoot>,
}

impl Session<'_> {
    /// Step 1. The VM booted from a manifest this edge's store holds
    /// in full (pinned while it runs), so the destination prepares with it
    /// at once (the coordinator plans sources for it) while nothing of the
    /// live disk is read yet; the pause's check is against the final live
    /// manifest, so the shortcut does not weaken it. `connect` makes the
    /// control connection.
    pub(super) fn prepare(
        &mut self,
        qmp: &mut dyn Qmp,
        disk: &dyn LiveDisk,
        spec: &VmSpec,
        boot: &Manifest,
        connect: impl FnOnce() -> Result<Box<dyn Destination>, MigrateError>,
    ) -> Result<Ready, MigrateError> {
        let t = Instant::now();
        let ordering = self.opts.ordering;
        self.say(Phase::Plan, "asking the destination what it lacks");
        // What changed since the boot manifest: the boot log's first look, when
        // the VM has a log that can be trusted; else a slice beside round 0.
        let since_boot = disk.open_write_log(self.opts.use_boot_log, boot.chunk_size.bytes());
        if let Some(since) = &since_boot {
            self.mark_hot_since_boot(since);
        }
        self.changed_since_boot_from = match since_boot {
            Some(_) => ChangedSinceBoot::BootLog,
            None => ChangedSinceBoot::Slice,
        };
        // What changed since boot is read (and published) while the
        // destination prepares and its QEMU starts: the source's path would
        // otherwise wait for the read.
        let since_idx: Option<Vec<u32>> = since_boot.map(|w| w.iter().map(|&(i, _)| i).collect());
        // Read and published in the order the destination will likely ask the
        // source for them (its chunk server waits for a chunk not yet placed):
        // round 0's order, with the hot ones that fill its tail interleaved,
        // since which of the two the source is asked for first depends on what
        // the neighbours hold (the source's queue puts what only it holds first).
        let publish_order: Option<Vec<u32>> = since_idx.as_ref().map(|idx| {
            let (hot, rest): (Vec<u32>, Vec<u32>) = idx.iter().partition(|&&i| self.temp.is_hot(i as usize));
            interleave(
                self.temp.order(rest, ordering, false),
                self.temp.order(hot, ordering, false),
            )
        });
        let (steps, live) = std::thread::scope(|sc| {
            let reader = publish_order
                .as_deref()
                .map(|idx| sc.spawn(|| disk.read_again(boot, idx)));
            let steps = self.prepare_destination(qmp, spec, boot, t, connect);
            let live = reader.map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(MigrateError::State("chunk reader panicked".into())))
            });
            (steps, live)
        });
        let (asked, uri, missing) = steps?;
        let live = live.transpose()?;
        let since_boot = match (since_idx, live) {
            (Some(indices), Some(live)) => Some(SinceBoot { indices, live }),
            _ => None,
        };
        Ok(Ready {
            asked,
            uri,
            missing,
            since_boot,
        })
    }

    /// Written again and again since boot: such chunks are hot before any
    /// look of ours and wait (the most written first, within the pause's
    /// budget) instead of going in round 0 to be sent twice.
    fn mark_hot_since_boot(&mut self, since: &[(u32, u64)]) {
        let mut hot = 0;
        for &(i, n) in since {
            self.temp.add_writes(i as usize, n as f64);
            if n >= HOT_WRITES {
                self.temp.mark_hot(i as usize);
                hot += 1;
            }
        }
        tracing::info!(chunks = since.len(), hot, "boot log: chunks written since boot");
        tracing::debug!(?since, "boot log: (chunk, writes since boot)");
    }

    /// Step 1 at the destination: `Prepare`, then its QEMU started with
    /// `-incoming defer`, the memory transport set on it; the plan's phase
    /// started at `t`. Returns the memory transport asked for, the
    /// URI memory goes to, and what the destination lacked.
    fn prepare_destination(
        &mut self,
        qmp: &mut dyn Qmp,
        spec: &VmSpec,
        boot: &Manifest,
        t: Instant,
        connect: impl FnOnce() -> Result<Box<dyn Destination>, MigrateError>,
    ) -> Result<(MemoryTransport, String, Missing), MigrateError> {
        self.dest = Some(connect()?);
        self.say(Phase::Plan, "asking the destination what it lacks");
        let p = self.dest()?.prepare(spec.clone(), boot.to_bytes())?;
        tracing::info!(
            missing_chunks = p.missing_chunks,
            missing_bytes = p.missing_bytes,
            local_chunks = p.local_chunks,
            coordinator = p.plan.is_some(),
            "plan"
        );
        self.coord.plan_from = if p.plan.is_some() {
            "coordinator"
        } else {
            "peer list"
        }
        .into();
        self.coord.plan = p.plan;
        let missing = Missing {
            chunks: p.missing_chunks,
            bytes: p.missing_bytes,
        };
        self.phase_done(Phase::Plan, t, 0);
        self.injected(Phase::Plan)?;

        // The destination QEMU starts in the background (`-incoming defer`,
        // the memory transport set on it) while the disk moves.
        let t = Instant::now();
        self.say(Phase::Incoming, "starting the destination QEMU");
        let asked = source_memory_transport(qmp, self.opts.memory)?;
        self.secure_qemu(qmp)?;
        let uri = self.dest()?.start_incoming(asked)?;
        self.phase_done(Phase::Incoming, t, 0);
        self.injected(Phase::Incoming)?;
        Ok((asked, uri, missing))
    }
}
