//! One control connection's migration: each request is checked against the
//! receive state, carried out by the file named after it, and only then
//! advances the state.

use std::net::IpAddr;
use std::sync::Arc;

use edgeshift_common::{Fingerprint, Manifest};

use super::context::Host;
use super::incoming::Incoming;
use super::prepare::prepare;
use super::state::{Command, ReceiveState};
use crate::migrate::proto::{Request, Response};
use crate::migrate::MigrateError;

/// The incoming migration of one control connection.
pub(super) struct Session {
    host: Arc<Host>,
    /// The address the source reached this edge at: the memory stream's
    /// listener binds there.
    local_ip: IpAddr,
    state: ReceiveState,
    /// Present exactly while `state.holds_vm()`; dropping it tears the
    /// destination half down unless it finished.
    incoming: Option<Incoming>,
}

impl Session {
    pub(super) fn new(host: Arc<Host>, local_ip: IpAddr) -> Self {
        Session {
            host,
            local_ip,
            state: ReceiveState::Idle,
            incoming: None,
        }
    }

    pub(super) fn state(&self) -> ReceiveState {
        self.state
    }

    /// Carries out one request; the state moves on only if it succeeded.
    pub(super) fn handle(&mut self, req: Request) -> Result<Response, MigrateError> {
        let next = self.state.advance(Command::of(&req))?;
        let (resp, advanced) = self.dispatch(req)?;
        if advanced {
            self.state = next;
        }
        if !self.state.holds_vm() {
            // Dropping the incoming VM tears it down (Abort), or lets a
            // finished one go (it is recorded by then).
            self.incoming = None;
        }
        Ok(resp)
    }

    /// The answer, and whether the state advances (a `Verify` that finds
    /// the disk differs does not).
    fn dispatch(&mut self, req: Request) -> Result<(Response, bool), MigrateError> {
        match req {
            Request::Prepare { spec, manifest } => {
                let manifest = Manifest::from_bytes(&manifest)?;
                let (inc, resp) = prepare(&self.host, spec, &manifest)?;
                self.incoming = Some(inc);
                Ok((resp, true))
            }
            Request::Abort => Ok((Response::Done, true)),
            Request::Pull {
                image_size,
                chunk_size,
                chunks,
                holders,
                filler,
                deltas,
            } => {
                let inc = self.incoming()?;
                if u64::from(chunk_size) != inc.chunk_size.bytes() || image_size != inc.image_size {
                    return Err(MigrateError::State(
                        "the disk's geometry changed during the migration".into(),
                    ));
                }
                let stats = inc.pull(&chunks, &holders, &filler, deltas)?;
                Ok((Response::Pulled(stats), true))
            }
            Request::StartIncoming { memory } => {
                let ip = self.local_ip;
                let uri = self.incoming()?.start(ip, memory)?;
                Ok((Response::Incoming { uri, memory }, true))
            }
            Request::AwaitIncoming => {
                let (uri, memory) = self.incoming()?.await_started()?;
                Ok((Response::Incoming { uri, memory }, true))
            }
            Request::Verify { manifest_id, recheck } => {
                let (ok, detail) = self.incoming()?.verify(&Fingerprint(manifest_id), &recheck)?;
                Ok((Response::Verified { ok, detail }, ok))
            }
            Request::Finish => {
                let inc = self.incoming()?;
                inc.finish()?;
                let coordinator = inc.after.take();
                Ok((Response::Finished { coordinator }, true))
            }
        }
    }

    /// The incoming VM; the state took the command, so there is one.
    fn incoming(&mut self) -> Result<&mut Incoming, MigrateError> {
        self.incoming
            .as_mut()
            .ok_or_else(|| MigrateError::State("no incoming VM on this connection".into()))
    }
}
