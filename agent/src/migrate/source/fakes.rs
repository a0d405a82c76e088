//! Stand-ins for the destination and the live disk, for the unit tests of
//! the phases (QEMU's is [`crate::vm::qmp::fake::FakeQmp`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use edgeshift_common::{ChunkSize, Fingerprint, Manifest};

use super::control::{Destination, Prepared, PullOrder, Verdict};
use super::disk::LiveDisk;
use crate::migrate::coord::{CoordConfig, CoordReport};
use crate::migrate::proto::{Fp, HolderStats, PullStats};
use crate::migrate::temperature::Temperature;
use crate::migrate::MigrateError;
use crate::vm::{MemoryTransport, VmSpec};

pub(super) const CHUNK: u64 = 64 << 10;
pub(super) const INCOMING_URI: &str = "tcp:10.0.0.2:4444";
/// The fake destination's edge name.
pub(super) const FAKE_DEST_NAME: &str = "edge-dst";
pub(super) const MIRROR_EXPORT_ADDR: &str = "10.0.0.2:4555";

/// A boot manifest of `chunks` distinct chunks.
pub(super) fn boot_manifest(chunks: u32) -> Manifest {
    Manifest::new(
        ChunkSize::new(CHUNK).expect("chunk size"),
        chunks as u64 * CHUNK,
        (0..chunks).map(|i| Fingerprint::of(&i.to_le_bytes())).collect(),
    )
}

/// What the fake destination was asked, and how it answers.
#[derive(Debug, Default)]
pub(super) struct DestState {
    /// Every request, by name, in order.
    pub(super) requests: Vec<&'static str>,
    /// The chunks each pull asked for, in order.
    pub(super) pulls: Vec<Vec<u32>>,
    /// The request that fails (by name), if any.
    pub(super) fail: Option<&'static str>,
    /// Verify answers not equal.
    pub(super) verify_differs: bool,
    /// Seconds a pulled chunk takes (the source's measured rate).
    pub(super) secs_per_chunk: f64,
    /// The memory transport the destination QEMU set up.
    memory: Option<MemoryTransport>,
}

/// The fake destination: shared, so the test keeps a handle on what the
/// session was given.
#[derive(Debug, Clone, Default)]
pub(super) struct FakeDestination(Arc<Mutex<DestState>>);

impl FakeDestination {
    pub(super) fn new(secs_per_chunk: f64) -> Self {
        let d = FakeDestination::default();
        d.state().secs_per_chunk = secs_per_chunk;
        d
    }

    pub(super) fn state(&self) -> MutexGuard<'_, DestState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ask(&self, request: &'static str) -> Result<MutexGuard<'_, DestState>, MigrateError> {
        let mut s = self.state();
        s.requests.push(request);
        if s.fail == Some(request) {
            return Err(MigrateError::Remote(format!("{request} failed (scripted)")));
        }
        Ok(s)
    }
}

impl Destination for FakeDestination {
    fn prepare(&mut self, _spec: VmSpec, manifest: Vec<u8>) -> Result<Prepared, MigrateError> {
        drop(self.ask("prepare")?);
        let m = Manifest::from_bytes(&manifest)?;
        Ok(Prepared {
            missing_chunks: m.chunks.len() as u64,
            missing_bytes: m.image_size,
            ..Default::default()
        })
    }

    fn pull(&mut self, order: PullOrder) -> Result<PullStats, MigrateError> {
        let mut s = self.ask("pull")?;
        let n = order.chunks.len() as u64;
        s.pulls.push(order.chunks.iter().map(|&(i, _)| i).collect());
        // All of it from the first holder named (the source).
        let holder = order.holders.first().cloned().unwrap_or_default();
        Ok(PullStats {
            indices_written: n,
            holders: vec![HolderStats {
                holder,
                chunks: n,
                bytes: n * CHUNK,
                ..Default::default()
            }],
            seconds: n as f64 * s.secs_per_chunk,
            ..Default::default()
        })
    }

    fn start_incoming(&mut self, memory: MemoryTransport) -> Result<String, MigrateError> {
        let mut s = self.ask("start_incoming")?;
        s.memory = Some(memory);
        Ok(INCOMING_URI.into())
    }

    fn await_incoming(&mut self) -> Result<MemoryTransport, MigrateError> {
        let s = self.ask("await_incoming")?;
        Ok(s.memory.unwrap_or(MemoryTransport::Plain))
    }

    fn verify(&mut self, _manifest_id: Fp, _recheck: Vec<u32>) -> Result<Verdict, MigrateError> {
        let s = self.ask("verify")?;
        Ok(Verdict {
            ok: !s.verify_differs,
            detail: if s.verify_differs {
                "chunk 3 differs"
            } else {
                "equal"
            }
            .into(),
        })
    }

    fn finish(&mut self) -> Result<Option<String>, MigrateError> {
        drop(self.ask("finish")?);
        Ok(None)
    }

    fn abort(&mut self) -> Result<(), MigrateError> {
        drop(self.ask("abort")?);
        Ok(())
    }

    fn await_image(&mut self) -> Result<(), MigrateError> {
        drop(self.ask("await_image")?);
        Ok(())
    }

    fn peer_name(&self) -> &str {
        FAKE_DEST_NAME
    }

    fn open_mirror(&mut self) -> Result<(String, String), MigrateError> {
        drop(self.ask("open_mirror")?);
        Ok((MIRROR_EXPORT_ADDR.into(), "export-name".into()))
    }
}

struct DiskState {
    live: Manifest,
    /// What the guest writes before each look at the disk, in order; then nothing.
    writes: VecDeque<Vec<u32>>,
    generation: u32,
    flushes: u32,
}

/// A live disk the guest writes as scripted: before each look (a slice or
/// a re-read of what changed) the next batch of chunks gets new contents.
/// No write log: every look reads the whole disk.
pub(super) struct FakeDisk(Mutex<DiskState>);

impl FakeDisk {
    pub(super) fn new(boot: &Manifest, writes: &[std::ops::Range<u32>]) -> Self {
        FakeDisk(Mutex::new(DiskState {
            live: boot.clone(),
            writes: writes.iter().map(|r| r.clone().collect()).collect(),
            generation: 0,
            flushes: 0,
        }))
    }

    fn state(&self) -> MutexGuard<'_, DiskState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The guest's next batch of writes, then the disk as it is.
    fn written_now(&self) -> Manifest {
        let mut s = self.state();
        if let Some(batch) = s.writes.pop_front() {
            s.generation += 1;
            let g = s.generation;
            for i in batch {
                let fp = Fingerprint::of(&[g.to_le_bytes(), i.to_le_bytes()].concat());
                s.live.chunks[i as usize] = fp;
            }
        }
        s.live.clone()
    }

    pub(super) fn flushes(&self) -> u32 {
        self.state().flushes
    }

    /// Batches of writes not yet made.
    pub(super) fn writes_left(&self) -> usize {
        self.state().writes.len()
    }
}

impl LiveDisk for FakeDisk {
    fn open_write_log(&self, _use_boot_log: bool, _chunk_bytes: u64) -> Option<Vec<(u32, u64)>> {
        None
    }

    fn tracked(&self) -> bool {
        false
    }

    fn peek_written(&self) -> Option<Vec<u32>> {
        None
    }

    fn look(&self, _cur: &Manifest, _temp: &mut Temperature) -> Result<Manifest, MigrateError> {
        Ok(self.written_now())
    }

    fn read_again(&self, cur: &Manifest, indices: &[u32]) -> Result<Manifest, MigrateError> {
        let s = self.state();
        let mut next = cur.clone();
        for &i in indices {
            next.chunks[i as usize] = s.live.chunks[i as usize];
        }
        Ok(next)
    }

    fn slice_all(&self, _chunk_size: ChunkSize) -> Result<Manifest, MigrateError> {
        Ok(self.written_now())
    }

    fn flush(&self) -> Result<(), MigrateError> {
        self.state().flushes += 1;
        Ok(())
    }

    fn collect_written(&self) {}

    fn written_collected(&self) -> Vec<u32> {
        Vec::new()
    }

    fn report_to(
        &self,
        _c: &CoordConfig,
        _live: &Manifest,
        _out: &mut CoordReport,
    ) -> Result<(), MigrateError> {
        Ok(())
    }
}
