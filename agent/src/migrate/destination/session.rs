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
    /// The source's address: the only one the disk mirror's export takes.
    peer_ip: IpAddr,
    state: ReceiveState,
    /// Present exactly while `state.holds_vm()`; dropping it tears the
    /// destination half down unless it finished.
    incoming: Option<Incoming>,
}

impl Session {
    pub(super) fn new(host: Arc<Host>, local_ip: IpAddr, peer_ip: IpAddr) -> Self {
        Session {
            host,
            local_ip,
            peer_ip,
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
            Request::OpenMirror => {
                let (local, peer) = (self.local_ip, self.peer_ip);
                let (addr, export) = self.incoming()?.open_mirror(local, peer)?;
                Ok((Response::MirrorOpen { addr, export }, true))
            }
            Request::AwaitImage => {
                self.incoming()?.writer.wait()?;
                Ok((Response::Done, true))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::destination::context::HostConfig;
    use crate::transfer::{ClusterKey, Trust};
    use crate::vm::{MemoryTransport, Qemu};

    fn session(dir: &std::path::Path, rt: &tokio::runtime::Runtime) -> Session {
        let store = crate::store::LocalStore::open_or_create(dir.join("store")).expect("store");
        let host = Host::new(
            HostConfig {
                state_dir: dir.join("vms"),
                trust: Trust::InsecurePlaintext {
                    key: ClusterKey::from_bytes([3; 32]),
                    id: "dst".into(),
                },
                id: "dst".into(),
                qemu: Qemu::default(),
                coordinator: None,
            },
            Arc::new(store),
            rt.handle().clone(),
        );
        let lo = IpAddr::from([127, 0, 0, 1]);
        Session::new(Arc::new(host), lo, lo)
    }

    fn spec(name: &str) -> crate::vm::VmSpec {
        crate::vm::VmSpec {
            name: name.into(),
            memory_mib: 128,
            cpus: 1,
            accel: crate::vm::AccelChoice::Tcg,
            kernel: None,
            initrd: None,
            append: None,
            net: None,
        }
    }

    /// Prepare, a pull of holes and the refusals around them need no root
    /// (no loop device, no QEMU); Abort removes the half made.
    #[test]
    fn a_prepared_vm_takes_pulls_refuses_what_is_out_of_order_and_aborts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let mut s = session(dir.path(), &rt);
        let cs = edgeshift_common::ChunkSize::new(4096).expect("chunk size");
        let manifest = Manifest::new(cs, 8192, vec![Fingerprint::ZERO_CHUNK; 2]);
        let prepare = || Request::Prepare {
            spec: spec("vm1"),
            manifest: manifest.to_bytes(),
        };
        match s.handle(prepare()) {
            Ok(Response::Prepared { missing_chunks, .. }) => assert_eq!(missing_chunks, 0),
            other => panic!("Prepare: {other:?}"),
        }
        let image = dir.path().join("vms").join("vm1").join("disk.raw");
        assert!(image.exists(), "the sparse image");
        assert!(matches!(s.handle(prepare()), Err(MigrateError::OutOfOrder(_))));
        let pull = s.handle(Request::Pull {
            image_size: 8192,
            chunk_size: 4096,
            chunks: vec![(1, [0; 32])],
            holders: Vec::new(),
            filler: Vec::new(),
            deltas: true,
        });
        assert!(matches!(pull, Ok(Response::Pulled(_))), "{pull:?}");
        assert_eq!(s.state(), ReceiveState::Prepared { pulls: 1 });
        for req in [Request::AwaitIncoming, Request::Finish] {
            match s.handle(req) {
                Err(MigrateError::OutOfOrder(e)) => {
                    assert_eq!(e.state, ReceiveState::Prepared { pulls: 1 })
                }
                other => panic!("out of order: {other:?}"),
            }
        }
        assert!(matches!(s.handle(Request::Abort), Ok(Response::Done)));
        assert!(!image.exists(), "Abort tore the half down");
    }

    #[test]
    fn commands_before_prepare_are_refused_and_abort_ends_the_session() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let mut s = session(dir.path(), &rt);
        let early = [
            Request::Pull {
                image_size: 4096,
                chunk_size: 4096,
                chunks: vec![(0, [1; 32])],
                holders: vec!["127.0.0.1:1".into()],
                filler: Vec::new(),
                deltas: true,
            },
            Request::StartIncoming {
                memory: MemoryTransport::Plain,
            },
            Request::AwaitIncoming,
            Request::Verify {
                manifest_id: [0; 32],
                recheck: Vec::new(),
            },
            Request::Finish,
        ];
        for req in early {
            let what = format!("{req:?}");
            match s.handle(req) {
                Err(MigrateError::OutOfOrder(e)) => {
                    assert_eq!(e.state, ReceiveState::Idle, "{what}");
                    assert!(e.to_string().contains("Prepare first"), "{e}");
                }
                other => panic!("{what} before Prepare: {other:?}"),
            }
            assert_eq!(s.state(), ReceiveState::Idle);
        }
        assert!(matches!(s.handle(Request::Abort), Ok(Response::Done)));
        assert_eq!(s.state(), ReceiveState::Aborted);
        let again = s.handle(Request::Prepare {
            spec: spec("vm1"),
            manifest: Vec::new(),
        });
        assert!(matches!(again, Err(MigrateError::OutOfOrder(_))), "{again:?}");
        assert!(
            !dir.path().join("vms").join("vm1").exists(),
            "a refused Prepare makes nothing"
        );
    }
}
