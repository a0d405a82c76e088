//! What the destination was asked to hold, and what the disk rounds cost:
//! the chunks still to send, the source path's measured rate, and from it
//! what the pause would take.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use edgeshift_common::{Fingerprint, Manifest};

use crate::migrate::proto::PullStats;
use crate::migrate::report::RoundReport;

pub(super) struct Ledger {
    /// What the destination was last asked to hold at each index.
    sent: Vec<Option<Fingerprint>>,
    pub(super) resent: u64,
    pub(super) rounds: Vec<RoundReport>,
    pub(super) bytes_by_source: BTreeMap<String, u64>,
    /// Bytes per second the source's path carried in the last round it sent
    /// in with no memory stream beside it (the pause has the path to itself;
    /// a round beside QEMU's streams gets a small share of it).
    pub(super) source_rate: Option<f64>,
    /// QEMU's memory stream runs beside the rounds now.
    pub(super) memory_running: bool,
    /// The disk's chunk size in bytes.
    pub(super) chunk_bytes: u64,
    /// This edge's address as the destination names it among the holders.
    source_addr: String,
    /// Budget for the disk's part of the downtime.
    max_downtime: Duration,
    /// Chunks sent again may go as deltas.
    deltas: bool,
}

impl Ledger {
    pub(super) fn new(
        chunks: usize,
        chunk_bytes: u64,
        source_addr: String,
        max_downtime: Duration,
        deltas: bool,
    ) -> Self {
        Ledger {
            sent: vec![None; chunks],
            resent: 0,
            rounds: Vec::new(),
            bytes_by_source: BTreeMap::new(),
            source_rate: None,
            memory_running: false,
            chunk_bytes,
            source_addr,
            max_downtime,
            deltas,
        }
    }

    /// Of `indices`, those the destination was asked for before.
    pub(super) fn sent_before(&self, indices: &[u32]) -> Vec<u32> {
        indices
            .iter()
            .copied()
            .filter(|&i| self.sent.get(i as usize).is_some_and(Option::is_some))
            .collect()
    }

    /// Books one round that asked for `m` at `indices` and was answered
    /// `stats`; `resent` of them were sent before.
    pub(super) fn record(
        &mut self,
        m: &Manifest,
        indices: &[u32],
        stats: &PullStats,
        resent: u64,
        seconds: f64,
    ) -> &RoundReport {
        let skipped: HashSet<u32> = stats.skipped.iter().copied().collect();
        for &i in indices {
            if !skipped.contains(&i) {
                self.sent[i as usize] = Some(m.chunks[i as usize]);
            }
        }
        let bytes: u64 = stats.holders.iter().map(|h| h.bytes).sum();
        for h in &stats.holders {
            *self.bytes_by_source.entry(h.holder.clone()).or_default() += h.bytes;
            if h.holder == self.source_addr
                && h.bytes > 0
                && stats.seconds > 0.0
                && (!self.memory_running || self.source_rate.is_none())
            {
                self.source_rate = Some(h.bytes as f64 / stats.seconds);
            }
        }
        self.resent += resent;
        self.rounds.push(RoundReport {
            round: self.rounds.len() as u32,
            chunks: indices.len() as u64,
            bytes,
            resent_chunks: resent,
            delta_chunks: stats.holders.iter().map(|h| h.delta_chunks).sum(),
            delta_saved_bytes: stats.holders.iter().map(|h| h.delta_saved_bytes).sum(),
            seconds,
        });
        &self.rounds[self.rounds.len() - 1]
    }

    /// Disk bytes pulled so far, over all holders.
    pub(super) fn disk_bytes(&self) -> u64 {
        self.bytes_by_source.values().sum()
    }

    /// Indices whose current fingerprint the destination was not yet asked for.
    pub(super) fn stale(&self, m: &Manifest) -> Vec<u32> {
        (0..m.chunks.len())
            .filter(|&i| self.sent[i] != Some(m.chunks[i]))
            .map(|i| i as u32)
            .collect()
    }

    /// Chunks the source's path sends within the budget.
    pub(super) fn budget_chunks(&self) -> usize {
        self.source_rate.map_or(usize::MAX, |rate| {
            (rate * self.max_downtime.as_secs_f64() / self.chunk_bytes as f64) as usize
        })
    }

    /// How many hot chunks may wait for the pause: half of what the budget
    /// sends (the rest is for what the guest writes meanwhile); none before
    /// the source's path has been measured.
    pub(super) fn hold_room(&self) -> usize {
        if self.source_rate.is_none() {
            return 0;
        }
        self.budget_chunks() / 2
    }

    /// Bytes the pause would send for `pending`: a chunk the destination
    /// holds an earlier version of goes as a delta, at the share of a whole
    /// chunk the deltas of the rounds so far took (a whole chunk until one
    /// was measured).
    fn pause_bytes(&self, pending: &[u32]) -> f64 {
        let cb = self.chunk_bytes as f64;
        let deltas: u64 = self.rounds.iter().map(|r| r.delta_chunks).sum();
        let saved: u64 = self.rounds.iter().map(|r| r.delta_saved_bytes).sum();
        let delta_share = if self.deltas && deltas > 0 {
            1.0 - saved as f64 / (deltas as f64 * cb)
        } else {
            1.0
        };
        pending
            .iter()
            .map(|&i| match self.sent.get(i as usize) {
                Some(Some(fp)) if !fp.is_zero_chunk() => cb * delta_share,
                _ => cb,
            })
            .sum()
    }

    /// Seconds the pause would take to send `pending` (None: the source's
    /// path not measured yet).
    pub(super) fn pause_estimate(&self, pending: &[u32]) -> Option<f64> {
        self.source_rate.map(|rate| self.pause_bytes(pending) / rate)
    }

    /// Whether `pending` would take longer than the budget to send.
    pub(super) fn over_budget(&self, pending: &[u32]) -> bool {
        self.pause_estimate(pending)
            .is_some_and(|t| t > self.max_downtime.as_secs_f64())
    }

    pub(super) fn max_downtime(&self) -> Duration {
        self.max_downtime
    }
}
