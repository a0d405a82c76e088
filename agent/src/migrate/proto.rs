//! The migration control channel's messages: framed postcard over mutual
//! TLS ([`super::channel`]), or, under `--insecure-plaintext` (tests only),
//! over plaintext after a mutual keyed-BLAKE3 challenge–response (the
//! cluster key; the proofs are the data plane's,
//! [`edgeshift_common::wire::auth_proof`]).
//!
//! A frame is a fixed [`ControlHeader`] (magic, body length) and a postcard
//! body. One request, one response, in order.

use std::io::{Read, Write};
use std::net::TcpStream;

use edgeshift_common::wire::{auth_proof, verify_proof, Role};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zerocopy::byteorder::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::MigrateError;
use crate::vm::{MemoryTransport, VmSpec};

pub const CONTROL_MAGIC: [u8; 4] = *b"ESC1";
/// Largest body once authenticated: a manifest of ~1 M chunks plus indices.
pub const MAX_BODY: u32 = 64 << 20;
/// Largest body before authentication.
const MAX_AUTH_BODY: u32 = 512;

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ControlHeader {
    pub magic: [u8; 4],
    pub length: U32,
}

/// A fingerprint on the control channel.
pub type Fp = [u8; 32];

/// What a client asks.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Destination: get ready to receive `spec` whose disk is `manifest`.
    Prepare { spec: VmSpec, manifest: Vec<u8> },
    /// Destination: make the image's chunk at each index of `chunks` the
    /// fingerprint paired with it, pulling what the store lacks from
    /// `holders` at once, in the order given (holders are chunk servers:
    /// `edgeshift agent`). Only the named chunks travel, not the whole
    /// manifest (128 KiB for a 1 GiB disk: 10 ms of a 100 Mbit/s path per
    /// round, in the pause too); `image_size` and `chunk_size` must be
    /// those of the `Prepare`.
    Pull {
        image_size: u64,
        chunk_size: u32,
        chunks: Vec<(u32, Fp)>,
        holders: Vec<String>,
        /// Indices whose chunks fill the round's tail: fetched only while
        /// other chunks of the round are still on their way (hot chunks:
        /// sent early they would likely be written again), else left as
        /// they are (`PullStats::skipped`).
        filler: Vec<u32>,
        /// A chunk whose index the image already holds an earlier version
        /// of may come as the blocks that differ (`docs/wire.md`, deltas);
        /// false: whole chunks only.
        deltas: bool,
    },
    /// Destination: start QEMU waiting for the memory stream, moved as
    /// `memory` says. Answers the URI at once; QEMU starts in the background
    /// while pulls go on (see `AwaitIncoming`).
    StartIncoming { memory: MemoryTransport },
    /// Destination: is the disk now exactly `manifest_id`? Re-read `recheck`.
    Verify { manifest_id: Fp, recheck: Vec<u32> },
    /// Destination: the switchover is done; keep the VM.
    Finish,
    /// Destination: drop everything of this incoming VM.
    Abort,
    /// Destination: answers once the QEMU of `StartIncoming` listens, with
    /// the memory transport it really set up.
    AwaitIncoming,
    /// Destination: open an NBD export of the image for the source QEMU's
    /// disk mirror (one connection, from the source's address only); its
    /// writes win over chunks pulled before or after them.
    OpenMirror,
    /// Destination: answers once every chunk pulled so far is in the image
    /// (its background writes done), so that the pause does not wait for
    /// them.
    AwaitImage,
}

/// Per-holder figures of one pull.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HolderStats {
    pub holder: String,
    pub chunks: u64,
    pub bytes: u64,
    /// Of `chunks`, those sent as deltas against what the image held, and
    /// the bytes that saved.
    pub delta_chunks: u64,
    pub delta_saved_bytes: u64,
    pub error: Option<String>,
}

/// What a pull did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PullStats {
    /// Indices that differed and were rewritten.
    pub indices_written: u64,
    /// Chunks found in the destination's own store.
    pub local_chunks: u64,
    /// Holes written.
    pub zero_chunks: u64,
    pub holders: Vec<HolderStats>,
    pub seconds: f64,
    /// Filler indices left as they were: the rest of the round was done first.
    pub skipped: Vec<u32>,
}

/// What a server answers.
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    Prepared {
        missing_chunks: u64,
        missing_bytes: u64,
        local_chunks: u64,
        /// The coordinator's plan, when the destination has a coordinator;
        /// `None`: the pulls use the holders the source names.
        plan: Option<super::coord::PlanSummary>,
    },
    Pulled(PullStats),
    Incoming {
        uri: String,
        memory: MemoryTransport,
    },
    Verified {
        ok: bool,
        detail: String,
    },
    Done,
    /// Answer to `OpenMirror`: the export's address and name.
    MirrorOpen {
        addr: String,
        export: String,
    },
    /// Answer to `Finish`: the VM is the destination's; what it did at the
    /// coordinator (step 5), if it has one.
    Finished {
        coordinator: Option<String>,
    },
    Error(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct Challenge {
    nonce: Fp,
    id: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    nonce: Fp,
    id: String,
    proof: Fp,
}

#[derive(Debug, Serialize, Deserialize)]
struct Welcome {
    proof: Fp,
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> MigrateError {
    move |e| MigrateError::Channel(format!("{op}: {e}"))
}

/// Writes one frame.
pub fn send<T: Serialize, S: Write>(s: &mut S, msg: &T) -> Result<(), MigrateError> {
    let body = postcard::to_allocvec(msg).map_err(|e| MigrateError::Protocol(e.to_string()))?;
    let len = u32::try_from(body.len()).map_err(|_| MigrateError::Protocol("message too large".into()))?;
    let h = ControlHeader {
        magic: CONTROL_MAGIC,
        length: U32::new(len),
    };
    s.write_all(h.as_bytes()).map_err(io("send"))?;
    s.write_all(&body).map_err(io("send"))
}

/// Reads one frame of at most `max` bytes.
pub fn recv_max<T: DeserializeOwned, S: Read>(s: &mut S, max: u32) -> Result<T, MigrateError> {
    let mut hb = [0u8; std::mem::size_of::<ControlHeader>()];
    s.read_exact(&mut hb).map_err(io("receive"))?;
    let h =
        ControlHeader::read_from_bytes(&hb[..]).map_err(|_| MigrateError::Protocol("short header".into()))?;
    if h.magic != CONTROL_MAGIC {
        return Err(MigrateError::Protocol(format!("bad magic {:02x?}", h.magic)));
    }
    let len = h.length.get();
    if len > max {
        return Err(MigrateError::Protocol(format!(
            "frame of {len} bytes exceeds {max}"
        )));
    }
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body).map_err(io("receive"))?;
    postcard::from_bytes(&body).map_err(|e| MigrateError::Protocol(format!("undecodable message: {e}")))
}

pub fn recv<T: DeserializeOwned, S: Read>(s: &mut S) -> Result<T, MigrateError> {
    recv_max(s, MAX_BODY)
}

fn nonce() -> Fp {
    rand::random()
}

/// Server side of the handshake; returns the client's id.
pub fn accept_auth(s: &mut TcpStream, key: &[u8; 32], own_id: &str) -> Result<String, MigrateError> {
    let n_s = nonce();
    send(
        s,
        &Challenge {
            nonce: n_s,
            id: own_id.to_string(),
        },
    )?;
    let hello: Hello = recv_max(s, MAX_AUTH_BODY)?;
    if !verify_proof(key, &n_s, Role::Client, &hello.id, own_id, &hello.proof) {
        return Err(MigrateError::Auth(format!(
            "peer {:?} does not hold the cluster key",
            hello.id
        )));
    }
    send(
        s,
        &Welcome {
            proof: auth_proof(key, &hello.nonce, Role::Server, own_id, &hello.id),
        },
    )?;
    Ok(hello.id)
}

/// Client side of the handshake: proves we hold the key and checks the server does.
pub fn connect_auth(
    addr: &str,
    key: &[u8; 32],
    own_id: &str,
    timeout: std::time::Duration,
) -> Result<TcpStream, MigrateError> {
    use std::net::ToSocketAddrs;
    let sa = addr
        .to_socket_addrs()
        .map_err(|e| MigrateError::Channel(format!("address {addr}: {e}")))?
        .next()
        .ok_or_else(|| MigrateError::Channel(format!("address {addr} resolves to nothing")))?;
    let mut s = TcpStream::connect_timeout(&sa, timeout)
        .map_err(|e| MigrateError::Channel(format!("connect to {addr}: {e}")))?;
    s.set_nodelay(true).map_err(io("set nodelay"))?;
    let ch: Challenge = recv_max(&mut s, MAX_AUTH_BODY)?;
    let n_c = nonce();
    send(
        &mut s,
        &Hello {
            nonce: n_c,
            id: own_id.to_string(),
            proof: auth_proof(key, &ch.nonce, Role::Client, own_id, &ch.id),
        },
    )?;
    let w: Welcome = recv_max(&mut s, MAX_AUTH_BODY)
        .map_err(|e| MigrateError::Auth(format!("{addr} refused us (wrong cluster key?): {e}")))?;
    if !verify_proof(key, &n_c, Role::Server, &ch.id, own_id, &w.proof) {
        return Err(MigrateError::Auth(format!(
            "{addr} does not hold the cluster key"
        )));
    }
    Ok(s)
}

/// Sends a request and reads its response; a [`Response::Error`] becomes
/// [`MigrateError::Remote`].
pub fn call<S: Read + Write>(s: &mut S, req: &Request) -> Result<Response, MigrateError> {
    send(s, req)?;
    match recv(s)? {
        Response::Error(e) => Err(MigrateError::Remote(e)),
        r => Ok(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn handshake_accepts_the_key_and_refuses_others() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let key = [7u8; 32];
        let server = std::thread::spawn(move || {
            let mut out = Vec::new();
            for _ in 0..2 {
                let (mut s, _) = l.accept().expect("accept");
                let r = accept_auth(&mut s, &key, "dst");
                if r.is_ok() {
                    let req: Request = recv(&mut s).expect("request");
                    assert!(matches!(req, Request::Finish));
                    send(&mut s, &Response::Done).expect("reply");
                }
                out.push(r);
            }
            out
        });
        let t = std::time::Duration::from_secs(5);
        let mut s = connect_auth(&addr, &key, "src", t).expect("good key");
        assert!(matches!(call(&mut s, &Request::Finish), Ok(Response::Done)));
        assert!(connect_auth(&addr, &[8u8; 32], "evil", t).is_err());
        let results = server.join().expect("server thread");
        assert_eq!(results[0].as_ref().expect("first accepted"), "src");
        assert!(matches!(results[1], Err(MigrateError::Auth(_))));
    }

    #[test]
    fn oversized_and_garbage_frames_are_refused() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let r1 = recv_max::<Request, _>(&mut s, 16);
            let (mut s2, _) = l.accept().expect("accept");
            let r2 = recv::<Request, _>(&mut s2);
            (r1.is_err(), r2.is_err())
        });
        let mut c = TcpStream::connect(addr).expect("connect");
        let h = ControlHeader {
            magic: CONTROL_MAGIC,
            length: U32::new(1 << 20),
        };
        c.write_all(h.as_bytes()).expect("write");
        let mut c2 = TcpStream::connect(addr).expect("connect");
        c2.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
        let (a, b) = t.join().expect("join");
        assert!(a && b);
    }
}
