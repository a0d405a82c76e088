//! The source's side of the control channel ([`crate::migrate::proto`]),
//! typed: one method per request, each returning what its answer carries,
//! so the phases never match [`Response`] variants. [`Destination`] is the
//! seam the phases are written against; [`ControlClient`] is the real one.

use std::time::Duration;

use crate::migrate::channel::{self, ControlStream};
use crate::migrate::coord::PlanSummary;
use crate::migrate::proto::{self, Fp, PullStats, Request, Response};
use crate::migrate::MigrateError;
use crate::transfer::Trust;
use crate::vm::{MemoryTransport, VmSpec};

/// The answer to `Prepare`: what the destination's store lacks.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    pub missing_chunks: u64,
    pub missing_bytes: u64,
    pub local_chunks: u64,
    /// The coordinator's plan, when the destination has a coordinator.
    pub plan: Option<PlanSummary>,
}

/// One disk round as asked of the destination (see [`Request::Pull`]).
#[derive(Debug, Clone)]
pub struct PullOrder {
    pub image_size: u64,
    pub chunk_size: u32,
    pub chunks: Vec<(u32, Fp)>,
    pub holders: Vec<String>,
    pub filler: Vec<u32>,
    pub deltas: bool,
}

/// The answer to `Verify`.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub ok: bool,
    pub detail: String,
}

/// The destination of a migration, one request at a time.
pub trait Destination {
    /// Get ready to receive `spec` whose disk is the manifest `manifest`.
    fn prepare(&mut self, spec: VmSpec, manifest: Vec<u8>) -> Result<Prepared, MigrateError>;
    /// One disk round.
    fn pull(&mut self, order: PullOrder) -> Result<PullStats, MigrateError>;
    /// Start the destination QEMU waiting for memory; returns the URI it
    /// will listen on.
    fn start_incoming(&mut self, memory: MemoryTransport) -> Result<String, MigrateError>;
    /// Waits until that QEMU listens; returns the memory transport it set up.
    fn await_incoming(&mut self) -> Result<MemoryTransport, MigrateError>;
    /// Is the destination's disk now exactly `manifest_id`?
    fn verify(&mut self, manifest_id: Fp, recheck: Vec<u32>) -> Result<Verdict, MigrateError>;
    /// The switchover is done; returns what the destination did at its
    /// coordinator, if it has one.
    fn finish(&mut self) -> Result<Option<String>, MigrateError>;
    /// Drop everything of this incoming VM.
    fn abort(&mut self) -> Result<(), MigrateError>;
    /// Open the NBD export for the disk mirror; returns its address and name.
    fn open_mirror(&mut self) -> Result<(String, String), MigrateError>;
    /// Waits until every chunk pulled so far is in the destination's image.
    fn await_image(&mut self) -> Result<(), MigrateError>;
}

/// How long the destination may take to answer one request (a pull of a
/// whole disk over a slow link included).
const ANSWER_WAIT: Duration = Duration::from_secs(600);
const CONNECT_WAIT: Duration = Duration::from_secs(5);
/// How long an abort may take: the destination tears down when the
/// connection drops anyway.
const ABORT_WAIT: Duration = Duration::from_secs(30);

/// The authenticated control connection to a destination's listener.
#[derive(Debug)]
pub struct ControlClient {
    stream: ControlStream,
}

impl ControlClient {
    /// Connects to `addr` and authenticates both ways per `trust`.
    pub fn connect(addr: &str, trust: &Trust) -> Result<Self, MigrateError> {
        let (stream, peer) = channel::connect(addr, trust, CONNECT_WAIT)?;
        stream
            .tcp()
            .set_read_timeout(Some(ANSWER_WAIT))
            .map_err(|e| MigrateError::Channel(e.to_string()))?;
        tracing::debug!(%peer, "control channel to the destination authenticated");
        Ok(ControlClient { stream })
    }

    fn call(&mut self, req: &Request) -> Result<Response, MigrateError> {
        proto::call(&mut self.stream, req)
    }
}

fn unexpected(request: &str, answer: Response) -> MigrateError {
    MigrateError::Protocol(format!("unexpected answer to {request}: {answer:?}"))
}

impl Destination for ControlClient {
    fn prepare(&mut self, spec: VmSpec, manifest: Vec<u8>) -> Result<Prepared, MigrateError> {
        match self.call(&Request::Prepare { spec, manifest })? {
            Response::Prepared {
                missing_chunks,
                missing_bytes,
                local_chunks,
                plan,
            } => Ok(Prepared {
                missing_chunks,
                missing_bytes,
                local_chunks,
                plan,
            }),
            other => Err(unexpected("Prepare", other)),
        }
    }

    fn pull(&mut self, order: PullOrder) -> Result<PullStats, MigrateError> {
        let req = Request::Pull {
            image_size: order.image_size,
            chunk_size: order.chunk_size,
            chunks: order.chunks,
            holders: order.holders,
            filler: order.filler,
            deltas: order.deltas,
        };
        match self.call(&req)? {
            Response::Pulled(stats) => Ok(stats),
            other => Err(unexpected("Pull", other)),
        }
    }

    fn start_incoming(&mut self, memory: MemoryTransport) -> Result<String, MigrateError> {
        match self.call(&Request::StartIncoming { memory })? {
            Response::Incoming { uri, .. } => Ok(uri),
            other => Err(unexpected("StartIncoming", other)),
        }
    }

    fn await_incoming(&mut self) -> Result<MemoryTransport, MigrateError> {
        match self.call(&Request::AwaitIncoming)? {
            Response::Incoming { memory, .. } => Ok(memory),
            other => Err(unexpected("AwaitIncoming", other)),
        }
    }

    fn verify(&mut self, manifest_id: Fp, recheck: Vec<u32>) -> Result<Verdict, MigrateError> {
        match self.call(&Request::Verify { manifest_id, recheck })? {
            Response::Verified { ok, detail } => Ok(Verdict { ok, detail }),
            other => Err(unexpected("Verify", other)),
        }
    }

    fn finish(&mut self) -> Result<Option<String>, MigrateError> {
        match self.call(&Request::Finish)? {
            Response::Done => Ok(None),
            Response::Finished { coordinator } => Ok(coordinator),
            other => Err(unexpected("Finish", other)),
        }
    }

    fn open_mirror(&mut self) -> Result<(String, String), MigrateError> {
        match self.call(&Request::OpenMirror)? {
            Response::MirrorOpen { addr, export } => Ok((addr, export)),
            other => Err(unexpected("OpenMirror", other)),
        }
    }

    fn await_image(&mut self) -> Result<(), MigrateError> {
        match self.call(&Request::AwaitImage)? {
            Response::Done => Ok(()),
            other => Err(unexpected("AwaitImage", other)),
        }
    }

    fn abort(&mut self) -> Result<(), MigrateError> {
        let _ = self.stream.tcp().set_read_timeout(Some(ABORT_WAIT));
        self.call(&Request::Abort).map(|_| ())
    }
}
