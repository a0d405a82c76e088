//! Step 2, the disk pre-copy: round 0 pulls the live disk from every
//! holder, the hot chunks only as filler of its tail (without a boot log:
//! the boot image while the live disk is sliced here, then a round 1 of
//! what changed since boot, from every holder); then rounds of what was
//! written since (it exists only here) while they are big and shrinking,
//! the hottest waiting for the pause.

use std::time::Instant;

use edgeshift_common::Manifest;

use super::disk::LiveDisk;
use super::memory::{hold_memory_back, MemoryHold};
use super::prepare::SinceBoot;
use super::session::Session;
use crate::migrate::report::Phase;
use crate::migrate::temperature::Ordering;
use crate::migrate::MigrateError;
use crate::vm::Qmp;

/// Whether a pre-copy round of `todo` chunks is not worth sending: few
/// enough are left for the pause (`converge_chunks`), or the rounds shrink
/// by less than a fifth (the last sent `last` chunks), so another round
/// would mostly send the hot set again.
pub(super) fn rounds_converged(todo: usize, last: usize, converge_chunks: usize) -> bool {
    todo <= converge_chunks || (todo as u64) * 5 > (last as u64).saturating_mul(4)
}

impl Session<'_> {
    /// Step 2. With `memory_beside` (memory started with the disk), a watch
    /// on memory slows it as its first pass ends, so that it cannot
    /// converge (stop the VM) before the disk rounds do. Returns the live
    /// disk as last read.
    pub(super) fn precopy(
        &mut self,
        qmp: &mut dyn Qmp,
        disk: &dyn LiveDisk,
        boot: &Manifest,
        since_boot: Option<SinceBoot>,
        memory_beside: bool,
    ) -> Result<Manifest, MigrateError> {
        let t = Instant::now();
        let before = self.ledger.disk_bytes();
        let hold = MemoryHold::default();
        let (precopy, monitor) = std::thread::scope(|sc| {
            let monitor = memory_beside.then(|| {
                let hold = &hold;
                sc.spawn(move || hold_memory_back(qmp, hold))
            });
            let precopy = (|| {
                // What changed since boot: from the boot log when it can be
                // trusted (no slice), else from a slice of the live disk
                // beside round 0.
                let cur = match since_boot {
                    Some(since) => self.round0_from_boot_log(disk, boot, since)?,
                    None => self.round0_beside_slice(disk, boot)?,
                };
                self.later_rounds(disk, cur, &hold)
            })();
            hold.stop();
            let monitor = monitor.map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(MigrateError::State("memory monitor panicked".into())))
            });
            (precopy, monitor)
        });
        let cur = precopy?;
        if let Some(m) = monitor {
            m?;
        }
        self.phase_done(Phase::Precopy, t, self.ledger.disk_bytes() - before);
        self.injected(Phase::Precopy)?;
        Ok(cur)
    }

    /// Round 0 with a boot log: the boot image and what changed since boot
    /// at once, from every holder (an earlier copy of this disk may sit at
    /// a neighbour; the fetcher's holdings query keeps the source's path on
    /// what only it holds), the chunks the log counts fewest writes for
    /// first.
    fn round0_from_boot_log(
        &mut self,
        disk: &dyn LiveDisk,
        boot: &Manifest,
        since: SinceBoot,
    ) -> Result<Manifest, MigrateError> {
        let ordering = self.opts.ordering;
        let cur = since.live;
        self.report_live_disk(disk, &cur);
        self.say(
            Phase::Precopy,
            &format!(
                "round 0: the boot image and {} chunks written since boot",
                since.indices.len()
            ),
        );
        let all: Vec<u32> = (0..boot.chunks.len() as u32).collect();
        // The hot chunks go last, and only while the rest of round 0 is
        // still on its way (a neighbour holding an earlier copy still
        // sends, the source's path fills its idle tail); the others wait,
        // to be sent once.
        let hot: Vec<u32> = all
            .iter()
            .copied()
            .filter(|&i| self.temp.is_hot(i as usize) && cur.chunks[i as usize] != boot.chunks[i as usize])
            .collect();
        let round0 = self.temp.order(all, ordering, false);
        let filler = if ordering == Ordering::ColdFirst {
            hot
        } else {
            Vec::new()
        };
        let holders = self.holders();
        self.pull(&cur, round0, holders, filler, false)?;
        Ok(cur)
    }

    /// Without a boot log: round 0 pulls the boot image from every holder
    /// while the live disk is sliced here (io_uring, parallel hashing);
    /// round 1 then sends what changed since boot (it exists only in that
    /// slice), from every holder, coldest first. Returns the live disk as
    /// last read.
    fn round0_beside_slice(
        &mut self,
        disk: &dyn LiveDisk,
        boot: &Manifest,
    ) -> Result<Manifest, MigrateError> {
        let ordering = self.opts.ordering;
        self.say(Phase::Precopy, "round 0 (boot image), slicing the live disk");
        let all: Vec<u32> = (0..boot.chunks.len() as u32).collect();
        let round0 = self.temp.order(all, ordering, true);
        // With a warm destination round 0 is local writes there, with a cold
        // one it pulls from every holder.
        let (sliced, pulled) = std::thread::scope(|sc| {
            let slicer = sc.spawn(|| {
                let t = Instant::now();
                disk.slice_all(boot.chunk_size)
                    .map(|m| (m, t.elapsed().as_secs_f64()))
            });
            let holders = self.holders();
            let pulled = self.round_from(boot, round0, holders);
            let sliced = slicer
                .join()
                .unwrap_or_else(|_| Err(MigrateError::State("live disk slicer panicked".into())));
            (sliced, pulled)
        });
        pulled?;
        let (mut cur, slice_s) = sliced?;
        tracing::info!(slice_s, "live disk sliced alongside round 0");
        if ordering == Ordering::ColdFirst && !self.opts.sample_interval.is_zero() {
            // An optional longer first temperature sample.
            std::thread::sleep(self.opts.sample_interval);
        }
        if disk.tracked() {
            // The first temperature sample is what the guest wrote while the
            // slice ran (what changed since boot is not a temperature: the
            // guest's first minutes wrote much that stays cold).
            let next = disk.look(&cur, &mut self.temp)?;
            self.temp.observe(&cur, &next);
            cur = next;
        }
        self.report_live_disk(disk, &cur);
        let changed = self.ledger.stale(&cur);
        if changed.len() > self.opts.converge_chunks {
            let todo = self.temp.order(changed, ordering, true);
            self.say(
                Phase::Precopy,
                &format!("round 1: {} chunks changed since boot", todo.len()),
            );
            let holders = self.holders();
            self.pull(&cur, todo, holders, Vec::new(), false)?;
        }
        Ok(cur)
    }

    /// Rounds of what was written since the last (at most `--max-rounds`),
    /// from the source alone, while they are big and shrinking (see
    /// [`rounds_converged`]); the hottest chunks wait for the pause, as
    /// many as its budget holds.
    fn later_rounds(
        &mut self,
        disk: &dyn LiveDisk,
        mut cur: Manifest,
        hold: &MemoryHold,
    ) -> Result<Manifest, MigrateError> {
        let ordering = self.opts.ordering;
        let mut last_len = usize::MAX;
        for r in 1..=self.opts.max_rounds {
            if hold.converged() {
                // Memory converged under the disk rounds after all (the
                // watch said so): the VM is stopped, the rest goes in the pause.
                break;
            }
            // Few enough written since the last look (the log says so
            // without a slice): memory starts now, and the slice runs
            // beside it (the first look while memory moves) instead of
            // keeping the source's path idle. A round that the pause's
            // budget could nearly hold goes beside memory too, at that
            // first look: before memory, its slice and its tail would leave
            // the source's path idle.
            if let Some(written) = disk.peek_written() {
                let mut pending = self.ledger.stale(&cur);
                pending.extend(written);
                pending.sort_unstable();
                pending.dedup();
                let (_, todo) = self.temp.hold_hottest(pending, ordering, self.ledger.hold_room());
                if todo.len() <= self.opts.converge_chunks.max(self.ledger.budget_chunks()) {
                    break;
                }
            }
            let next = disk.look(&cur, &mut self.temp)?;
            self.temp.observe(&cur, &next);
            cur = next;
            let (waiting, todo) =
                self.temp
                    .hold_hottest(self.ledger.stale(&cur), ordering, self.ledger.hold_room());
            let n = todo.len();
            if rounds_converged(n, last_len, self.opts.converge_chunks) {
                break;
            }
            self.say(
                Phase::Precopy,
                &format!("round {r}: {n} chunks ({} hot wait)", waiting.len()),
            );
            // What was written since the last round, and the hot chunks
            // no neighbour had, exist only here.
            let only_source = self.only_source();
            self.round_from(&cur, todo, only_source)?;
            last_len = n;
        }
        Ok(cur)
    }
}

#[cfg(test)]
mod tests {
    use super::rounds_converged;

    #[test]
    fn rounds_go_on_while_big_and_shrinking_by_a_fifth() {
        // The first round after round 0 has nothing to compare with.
        assert!(!rounds_converged(100, usize::MAX, 10));
        assert!(!rounds_converged(80, 100, 10), "shrank by exactly a fifth");
        assert!(rounds_converged(81, 100, 10), "shrank by less than a fifth");
        assert!(rounds_converged(120, 100, 10), "grew");
        assert!(rounds_converged(10, usize::MAX, 10), "few enough for the pause");
        assert!(!rounds_converged(11, usize::MAX, 10));
        assert!(rounds_converged(0, 5, 0));
    }
}
