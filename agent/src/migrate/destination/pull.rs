//! `Pull`: make the image's chunks at the named indices the fingerprints
//! given: what this edge's store holds is written at once, the rest is
//! fetched from every holder at once by the transfer module's striped
//! fetcher, awaited on the agent's runtime.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use edgeshift_common::Fingerprint;

use super::incoming::Incoming;
use crate::migrate::proto::{Fp, HolderStats, PullStats};
use crate::migrate::MigrateError;
use crate::store::ChunkStore;
use crate::transfer::fetch::{ChunkWant, FetchOptions, Fetcher};

/// One chunk a pull fetches.
struct Fetch {
    fp: Fingerprint,
    len: u64,
    /// Fills the round's tail only (`ChunkWant::optional`).
    optional: bool,
    /// What the image held at its place (`ChunkWant::base`).
    base: Option<Fingerprint>,
}

impl Incoming {
    pub(super) fn pull(
        &mut self,
        chunks: &[(u32, Fp)],
        holders: &[String],
        filler: &[u32],
        deltas: bool,
    ) -> Result<PullStats, MigrateError> {
        let start = Instant::now();
        let filler: HashSet<u32> = filler.iter().copied().collect();
        let mut stats = PullStats::default();
        let mut wanted: HashMap<Fingerprint, Vec<usize>> = HashMap::new();
        let mut order: Vec<Fetch> = Vec::new();
        // Chunks this edge's store holds (and zero chunks) go into the image
        // in the background while the rest is fetched.
        let mut writes: Vec<(usize, Fingerprint)> = Vec::new();
        let store = &self.host.store;
        for &(i, want) in chunks {
            let i = i as usize;
            if i >= self.current.len() {
                return Err(MigrateError::Protocol(format!("chunk index {i} out of range")));
            }
            let want = Fingerprint(want);
            if self.current[i] == want {
                continue;
            }
            stats.indices_written += 1;
            if want.is_zero_chunk() {
                stats.zero_chunks += 1;
                writes.push((i, want));
            } else if let Some(v) = wanted.get_mut(&want) {
                v.push(i);
            } else if self.held_at_prepare.contains(&want) || store.has_chunk(&want)? {
                stats.local_chunks += 1;
                writes.push((i, want));
            } else {
                wanted.insert(want, vec![i]);
                order.push(Fetch {
                    fp: want,
                    len: self.chunk_len(i),
                    // Set once every index that needs it is known.
                    optional: false,
                    // What the image held where it goes (before it held
                    // anything there: what the nearest earlier version held
                    // here has): a peer holding both sends only the blocks
                    // that differ (the fetcher ignores a zero chunk as base).
                    base: deltas.then(|| self.base_at(i)),
                });
            }
            // What the image will hold once the writer is done: `verify`
            // waits for it first. (A fetched chunk is set once it came.)
            if !wanted.contains_key(&want) {
                self.current[i] = want;
            }
        }
        self.writer.queue(writes)?;
        let order_len = order.len();
        let mut fetch_s = 0.0;
        if !order.is_empty() {
            // A chunk is filler when every index that needs it is.
            for f in &mut order {
                f.optional = wanted
                    .get(&f.fp)
                    .is_some_and(|at| at.iter().all(|&i| filler.contains(&(i as u32))));
            }
            let t = Instant::now();
            let skipped = self.fetch_from_holders(order, holders, &mut stats)?;
            fetch_s = t.elapsed().as_secs_f64();
            for fp in &skipped {
                if let Some(at) = wanted.remove(fp) {
                    stats.skipped.extend(at.iter().map(|&i| i as u32));
                    stats.indices_written -= at.len() as u64;
                }
            }
            let fetched: Vec<(usize, Fingerprint)> = wanted
                .iter()
                .flat_map(|(fp, at)| at.iter().map(move |&i| (i, *fp)))
                .collect();
            for &(i, fp) in &fetched {
                self.current[i] = fp;
            }
            // The fetcher verified the bytes on arrival; the store re-checks on read.
            self.writer.queue(fetched)?;
        }
        stats.seconds = start.elapsed().as_secs_f64();
        tracing::info!(
            vm = %self.spec.name,
            indices = stats.indices_written,
            local = stats.local_chunks,
            fetched = order_len,
            skipped = stats.skipped.len(),
            bytes = stats.holders.iter().map(|h| h.bytes).sum::<u64>(),
            fetch_s = fetch_s,
            seconds = stats.seconds,
            "pull"
        );
        metrics::counter!("edgeshift_migrate_pulled_bytes_total")
            .increment(stats.holders.iter().map(|h| h.bytes).sum::<u64>());
        Ok(stats)
    }

    /// The delta base for index `i`: what the image holds there, else the
    /// chunk the nearest earlier version held here has there (a zero chunk
    /// when neither, which is no base).
    fn base_at(&self, i: usize) -> Fingerprint {
        let now = self.current[i];
        if !now.is_zero_chunk() {
            return now;
        }
        match self.basis.get(i) {
            Some(b) if self.held_at_prepare.contains(b) || self.host.store.has_chunk(b).unwrap_or(false) => {
                *b
            }
            _ => now,
        }
    }

    /// Pulls the chunks in `order` from every holder at once with the
    /// transfer module's striped fetcher (faster paths take more, a path that
    /// falls behind has its queue stolen, earlier chunks are asked for
    /// first), into this edge's store.
    /// Chunks marked optional only fill the tail of the others (see
    /// `ChunkWant::optional`); those left out are returned.
    fn fetch_from_holders(
        &self,
        order: Vec<Fetch>,
        holders: &[String],
        stats: &mut PullStats,
    ) -> Result<Vec<Fingerprint>, MigrateError> {
        let mut peers = Vec::with_capacity(holders.len());
        for h in holders {
            let addr: SocketAddr = h
                .parse()
                .map_err(|e| MigrateError::Protocol(format!("holder address {h:?}: {e}")))?;
            peers.push(addr);
        }
        // With a plan, a chunk comes from the holders the coordinator named
        // for it, and one it did not name (written since) from the holders
        // the source named; without one, from any holder.
        let plan = self.plan.as_ref();
        let named = plan.map(|_| peers.clone());
        if let Some(p) = plan {
            for a in p.peers() {
                if !peers.contains(a) {
                    peers.push(*a);
                }
            }
        }
        let wants: Vec<ChunkWant> = order
            .iter()
            .map(|f| ChunkWant {
                fp: f.fp,
                len: f.len,
                sources: plan
                    .and_then(|p| p.sources_for(&f.fp).cloned())
                    .or_else(|| named.clone()),
                optional: f.optional,
                base: f.base,
            })
            .collect();
        let fetcher = Fetcher::with_options(
            Arc::clone(&self.host.store),
            peers,
            self.host.cfg.trust.clone(),
            FetchOptions::default(),
        )
        .with_pool(Arc::clone(&self.conns));
        // This thread is the control connection's, outside the runtime:
        // it waits here while the fetch runs on the agent's workers.
        let stopping = self.host.connections.stopping();
        let report = self.host.runtime.block_on(async {
            tokio::select! {
                r = fetcher.fetch_chunks(wants) => r.map_err(|e| MigrateError::Unavailable(e.to_string())),
                () = stopping => Err(MigrateError::Unavailable("the destination agent is stopping".into())),
            }
        })?;
        if let Some(p) = plan {
            p.report_rates(&report);
        }
        stats.holders = report
            .peers
            .iter()
            .map(|p| HolderStats {
                holder: p.addr.clone(),
                chunks: p.chunks,
                bytes: p.bytes,
                delta_chunks: p.delta_chunks,
                delta_saved_bytes: p.delta_saved_bytes,
                error: p.dropped.clone(),
            })
            .collect();
        Ok(report.skipped)
    }
}
