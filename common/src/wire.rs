//! The agent-to-agent data-plane protocol: frames on a TCP stream.
//!
//! Every frame is a fixed 24-byte little-endian [`FrameHeader`] followed by
//! `length` bytes of body. Bodies start with a fixed `zerocopy` struct where
//! they have one; the variable tail (fingerprint lists, chunk bytes, manifest
//! bytes, UTF-8 text) follows it. The full description, including the
//! authentication exchange, is in `docs/wire.md`. Nothing here does I/O: the
//! agent's transfer module reads and writes frames with these types.

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::fingerprint::Fingerprint;

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"ESW1";
/// Protocol version carried in every header; a peer speaking another is refused.
pub const VERSION: u8 = 1;
/// Length of [`FrameHeader`] on the wire.
pub const HEADER_LEN: usize = std::mem::size_of::<FrameHeader>();
/// Largest body accepted once a peer is authenticated: a 16 MiB chunk plus its
/// head, or a manifest of up to ~2 M chunks. Checked before any allocation.
pub const MAX_FRAME_LEN: u32 = 64 << 20;
/// Largest body accepted before authentication (hello, challenge, response):
/// an unauthenticated peer cannot make us allocate more than this.
pub const MAX_AUTH_FRAME_LEN: u32 = 1024;
/// Longest node id a peer may announce, in bytes.
pub const MAX_PEER_ID_LEN: usize = 128;
/// Most fingerprints one chunk request may carry.
pub const MAX_BATCH: usize = 4096;
/// Most fingerprints in one `HasRequest` (2 MiB of body).
pub const MAX_HAS: usize = 65536;
/// Largest decompressed chunk (the largest chunk size).
pub const MAX_CHUNK_LEN: u32 = 16 << 20;

/// Header flag on a chunk request: the client accepts zstd-compressed payloads.
pub const FLAG_ZSTD_OK: u16 = 1;
/// Header flag on a chunk payload: the bytes are a zstd frame.
pub const FLAG_ZSTD: u16 = 1 << 1;

/// Errors from decoding frames.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("not an edgeshift frame (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("peer speaks protocol version {0}, this build speaks {VERSION}")]
    Version(u8),
    #[error("unknown frame type {0}")]
    UnknownKind(u8),
    #[error("frame body of {len} bytes exceeds the limit of {max}")]
    TooLong { len: u32, max: u32 },
    #[error("{kind:?} frame body is {len} bytes, which is malformed for that type")]
    BadBody { kind: FrameKind, len: usize },
    #[error("peer id is {0} bytes (limit {MAX_PEER_ID_LEN}) or not UTF-8")]
    BadPeerId(usize),
    #[error("chunk request carries {0} fingerprints (limit {MAX_BATCH})")]
    BatchTooLarge(usize),
    #[error("holdings query carries {0} fingerprints (limit {MAX_HAS})")]
    HasTooLarge(usize),
    #[error("chunk payload announces {0} bytes decompressed (limit {MAX_CHUNK_LEN})")]
    ChunkTooLong(u32),
}

/// The largest body a client's request of `kind` can legally have (a
/// server refuses a longer announcement before reading it); 0 for kinds
/// that are not requests.
pub fn max_request_body(kind: FrameKind) -> u32 {
    let fp = 32usize;
    let head = std::mem::size_of::<ChunkRequestHead>();
    let len = match kind {
        FrameKind::ManifestRequest => fp,
        FrameKind::ChunkRequest => head + MAX_BATCH * fp,
        FrameKind::DeltaRequest => head + MAX_BATCH * std::mem::size_of::<BasedAsk>(),
        FrameKind::HasRequest => MAX_HAS * fp,
        _ => 0,
    };
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Frame types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// client → server: [`HelloBody`] + client id.
    Hello = 1,
    /// server → client: [`ChallengeBody`] + server id.
    Challenge = 2,
    /// client → server: [`ResponseBody`].
    Response = 3,
    /// server → client: empty; the peer may now send requests.
    AuthOk = 4,
    /// client → server: a manifest id (32 bytes).
    ManifestRequest = 5,
    /// server → client: the manifest's bytes.
    Manifest = 6,
    /// client → server: [`ChunkRequestHead`] + N × 32-byte fingerprints.
    ChunkRequest = 7,
    /// server → client: [`ChunkHead`] + the chunk's bytes (zstd if FLAG_ZSTD).
    Chunk = 8,
    /// server → client: the fingerprint (chunk or manifest) it does not hold.
    Missing = 9,
    /// either way: [`ErrorHead`] + UTF-8 message; the sender closes after it.
    Error = 10,
    /// client → server: N × 32-byte fingerprints (1 ≤ N ≤ [`MAX_HAS`]):
    /// which of these does the server hold?
    HasRequest = 11,
    /// server → client: ⌈N/8⌉ bytes, bit i (LSB first) set when the server
    /// holds the request's fingerprint i.
    HasReply = 12,
    /// client → server: [`ChunkRequestHead`] + N × [`BasedAsk`]: chunks
    /// asked for together with the version the client already holds at
    /// that place; answered, in order, by `Delta`, `Chunk` or `Missing`.
    DeltaRequest = 13,
    /// server → client: [`DeltaHead`] + bitmap + the changed blocks' bytes
    /// (see [`crate::delta`]).
    Delta = 14,
}

impl TryFrom<u8> for FrameKind {
    type Error = WireError;
    fn try_from(v: u8) -> Result<Self, WireError> {
        use FrameKind::*;
        Ok(match v {
            1 => Hello,
            2 => Challenge,
            3 => Response,
            4 => AuthOk,
            5 => ManifestRequest,
            6 => Manifest,
            7 => ChunkRequest,
            8 => Chunk,
            9 => Missing,
            10 => FrameKind::Error,
            11 => HasRequest,
            12 => HasReply,
            13 => DeltaRequest,
            14 => Delta,
            other => return Err(WireError::UnknownKind(other)),
        })
    }
}

/// The fixed header in front of every frame (24 bytes, little-endian).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FrameHeader {
    pub magic: [u8; 4],
    pub version: u8,
    pub kind: u8,
    pub flags: U16,
    /// Chosen by the requester, echoed on every frame that answers it.
    pub request_id: U64,
    /// Body length in bytes, not counting this header.
    pub length: U32,
    pub reserved: U32,
}

impl FrameHeader {
    pub fn new(kind: FrameKind, flags: u16, request_id: u64, length: u32) -> Self {
        FrameHeader {
            magic: MAGIC,
            version: VERSION,
            kind: kind as u8,
            flags: U16::new(flags),
            request_id: U64::new(request_id),
            length: U32::new(length),
            reserved: U32::new(0),
        }
    }

    /// Decodes and checks a header: magic, version, type, and a body length
    /// no larger than `max_len` (checked before the body is read or allocated).
    pub fn decode(bytes: &[u8; HEADER_LEN], max_len: u32) -> Result<(Self, FrameKind), WireError> {
        // A [u8; HEADER_LEN] always holds exactly one header.
        let h = FrameHeader::read_from_bytes(bytes.as_slice()).map_err(|_| WireError::BadBody {
            kind: FrameKind::Error,
            len: bytes.len(),
        })?;
        if h.magic != MAGIC {
            return Err(WireError::BadMagic(h.magic));
        }
        if h.version != VERSION {
            return Err(WireError::Version(h.version));
        }
        let kind = FrameKind::try_from(h.kind)?;
        if h.length.get() > max_len {
            return Err(WireError::TooLong {
                len: h.length.get(),
                max: max_len,
            });
        }
        Ok((h, kind))
    }

    pub fn flags(&self) -> u16 {
        self.flags.get()
    }

    pub fn request_id(&self) -> u64 {
        self.request_id.get()
    }

    pub fn body_len(&self) -> u32 {
        self.length.get()
    }
}

/// Fixed part of a hello; the client's id (UTF-8) follows.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct HelloBody {
    pub client_nonce: [u8; 32],
}

/// Fixed part of a challenge; the server's id (UTF-8) follows.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ChallengeBody {
    pub server_nonce: [u8; 32],
    /// Proves the server holds the key: [`auth_proof`] over the client's nonce.
    pub server_proof: [u8; 32],
}

/// The client's answer to a challenge.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ResponseBody {
    pub client_proof: [u8; 32],
}

/// Fixed part of a chunk request; the fingerprints follow.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ChunkRequestHead {
    /// The client's measured goodput of this path in bytes per second (0 =
    /// not yet known). The server uses it to decide whether compressing a
    /// chunk would make it arrive sooner.
    pub path_rate: U64,
}

/// Fixed part of a chunk payload; the bytes follow.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ChunkHead {
    pub fingerprint: Fingerprint,
    /// Length of the chunk itself (after decompression if FLAG_ZSTD).
    pub raw_len: U32,
    pub reserved: U32,
}

pub const CHUNK_HEAD_LEN: usize = std::mem::size_of::<ChunkHead>();

/// One entry of a `DeltaRequest`: the chunk wanted and the chunk the client
/// holds where it goes (its earlier version).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct BasedAsk {
    pub want: Fingerprint,
    pub base: Fingerprint,
}

/// Fixed part of a delta payload; the bitmap (⌈⌈raw_len / 4096⌉ / 8⌉
/// bytes) and the bytes of the blocks it names follow.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DeltaHead {
    pub fingerprint: Fingerprint,
    /// The version the delta applies to (the one the client named).
    pub base: Fingerprint,
    /// Length of the rebuilt chunk.
    pub raw_len: U32,
    pub reserved: U32,
}

pub const DELTA_HEAD_LEN: usize = std::mem::size_of::<DeltaHead>();

/// Fixed part of an error frame; a UTF-8 message follows.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ErrorHead {
    pub code: U32,
}

/// Error codes carried in [`ErrorHead`].
pub mod error_code {
    pub const MALFORMED: u32 = 1;
    pub const AUTH_FAILED: u32 = 2;
    pub const TOO_LONG: u32 = 3;
    pub const UNEXPECTED: u32 = 4;
    pub const INTERNAL: u32 = 5;
}

/// Which side of the exchange a proof is for; part of the hashed message so a
/// proof can never be reflected back as the other side's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

impl Role {
    fn tag(self) -> &'static [u8] {
        match self {
            Role::Client => b"edgeshift-auth-client",
            Role::Server => b"edgeshift-auth-server",
        }
    }
}

/// The proof one side sends: `keyed_blake3(key, nonce || role || len(own_id) || own_id || len(peer_id) || peer_id)`
/// (lengths as u32 little-endian),
/// where `nonce` is the one the *other* side chose.
pub fn auth_proof(key: &[u8; 32], nonce: &[u8; 32], role: Role, own_id: &str, peer_id: &str) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(nonce);
    h.update(role.tag());
    h.update(&(own_id.len() as u32).to_le_bytes());
    h.update(own_id.as_bytes());
    h.update(&(peer_id.len() as u32).to_le_bytes());
    h.update(peer_id.as_bytes());
    *h.finalize().as_bytes()
}

/// Checks a received proof in constant time (`blake3::Hash` equality is).
pub fn verify_proof(
    key: &[u8; 32],
    nonce: &[u8; 32],
    role: Role,
    prover_id: &str,
    verifier_id: &str,
    proof: &[u8; 32],
) -> bool {
    let want = blake3::Hash::from(auth_proof(key, nonce, role, prover_id, verifier_id));
    want == blake3::Hash::from(*proof)
}

/// Whole frame (header + body) in one buffer.
pub fn encode(kind: FrameKind, flags: u16, request_id: u64, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(HEADER_LEN + len);
    out.extend_from_slice(FrameHeader::new(kind, flags, request_id, len as u32).as_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

fn peer_id_from(tail: &[u8]) -> Result<String, WireError> {
    if tail.len() > MAX_PEER_ID_LEN {
        return Err(WireError::BadPeerId(tail.len()));
    }
    String::from_utf8(tail.to_vec()).map_err(|_| WireError::BadPeerId(tail.len()))
}

pub fn encode_hello(nonce: &[u8; 32], id: &str) -> Vec<u8> {
    let body = HelloBody { client_nonce: *nonce };
    encode(FrameKind::Hello, 0, 0, &[body.as_bytes(), id.as_bytes()])
}

pub fn decode_hello(body: &[u8]) -> Result<(HelloBody, String), WireError> {
    let (h, tail) = HelloBody::read_from_prefix(body).map_err(|_| WireError::BadBody {
        kind: FrameKind::Hello,
        len: body.len(),
    })?;
    Ok((h, peer_id_from(tail)?))
}

pub fn encode_challenge(c: &ChallengeBody, id: &str) -> Vec<u8> {
    encode(FrameKind::Challenge, 0, 0, &[c.as_bytes(), id.as_bytes()])
}

pub fn decode_challenge(body: &[u8]) -> Result<(ChallengeBody, String), WireError> {
    let (c, tail) = ChallengeBody::read_from_prefix(body).map_err(|_| WireError::BadBody {
        kind: FrameKind::Challenge,
        len: body.len(),
    })?;
    Ok((c, peer_id_from(tail)?))
}

pub fn decode_response(body: &[u8]) -> Result<ResponseBody, WireError> {
    ResponseBody::read_from_bytes(body).map_err(|_| WireError::BadBody {
        kind: FrameKind::Response,
        len: body.len(),
    })
}

/// A body that is exactly one fingerprint (manifest request, missing).
pub fn decode_fingerprint(kind: FrameKind, body: &[u8]) -> Result<Fingerprint, WireError> {
    Fingerprint::read_from_bytes(body).map_err(|_| WireError::BadBody {
        kind,
        len: body.len(),
    })
}

/// A request frame: [`ChunkRequestHead`] and then `items` (fingerprints or
/// [`BasedAsk`]s).
fn encode_request<T: IntoBytes + Immutable>(
    kind: FrameKind,
    request_id: u64,
    zstd_ok: bool,
    path_rate: u64,
    items: &[T],
) -> Vec<u8> {
    let head = ChunkRequestHead {
        path_rate: U64::new(path_rate),
    };
    let flags = if zstd_ok { FLAG_ZSTD_OK } else { 0 };
    encode(kind, flags, request_id, &[head.as_bytes(), items.as_bytes()])
}

/// The head and the 1 to [`MAX_BATCH`] items of a request body.
fn decode_request<T: FromBytes + KnownLayout + Immutable>(
    kind: FrameKind,
    body: &[u8],
) -> Result<(ChunkRequestHead, &[T]), WireError> {
    let bad = || WireError::BadBody {
        kind,
        len: body.len(),
    };
    let (head, tail) = ChunkRequestHead::read_from_prefix(body).map_err(|_| bad())?;
    let items = <[T]>::ref_from_bytes(tail).map_err(|_| bad())?;
    if items.is_empty() {
        return Err(bad());
    }
    if items.len() > MAX_BATCH {
        return Err(WireError::BatchTooLarge(items.len()));
    }
    Ok((head, items))
}

pub fn encode_chunk_request(request_id: u64, zstd_ok: bool, path_rate: u64, fps: &[Fingerprint]) -> Vec<u8> {
    encode_request(FrameKind::ChunkRequest, request_id, zstd_ok, path_rate, fps)
}

pub fn decode_chunk_request(body: &[u8]) -> Result<(ChunkRequestHead, &[Fingerprint]), WireError> {
    decode_request(FrameKind::ChunkRequest, body)
}

/// A chunk request naming each chunk's base (1 ≤ len ≤ [`MAX_BATCH`]).
pub fn encode_delta_request(request_id: u64, zstd_ok: bool, path_rate: u64, asks: &[BasedAsk]) -> Vec<u8> {
    encode_request(FrameKind::DeltaRequest, request_id, zstd_ok, path_rate, asks)
}

pub fn decode_delta_request(body: &[u8]) -> Result<(ChunkRequestHead, &[BasedAsk]), WireError> {
    decode_request(FrameKind::DeltaRequest, body)
}

/// A whole delta frame: `fp` rebuilt from `base` with `bitmap` and `payload`.
pub fn encode_delta(
    request_id: u64,
    fp: &Fingerprint,
    base: &Fingerprint,
    raw_len: u32,
    bitmap: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    delta_frame(request_id, fp, base, raw_len, 0, &[bitmap, payload])
}

/// A whole delta frame whose bitmap and block bytes went through zstd as
/// one frame (`FLAG_ZSTD`): `compressed` decompresses to the bitmap
/// followed by the blocks, at most [`delta_body_bound`] bytes.
pub fn encode_delta_zstd(
    request_id: u64,
    fp: &Fingerprint,
    base: &Fingerprint,
    raw_len: u32,
    compressed: &[u8],
) -> Vec<u8> {
    delta_frame(request_id, fp, base, raw_len, FLAG_ZSTD, &[compressed])
}

fn delta_frame(
    request_id: u64,
    fp: &Fingerprint,
    base: &Fingerprint,
    raw_len: u32,
    flags: u16,
    body: &[&[u8]],
) -> Vec<u8> {
    let head = DeltaHead {
        fingerprint: *fp,
        base: *base,
        raw_len: U32::new(raw_len),
        reserved: U32::new(0),
    };
    let mut parts: Vec<&[u8]> = Vec::with_capacity(1 + body.len());
    parts.push(head.as_bytes());
    parts.extend_from_slice(body);
    encode(FrameKind::Delta, flags, request_id, &parts)
}

/// Most bytes the bitmap and blocks of a delta of a `raw_len`-byte chunk
/// take: a compressed delta may not decompress to more.
pub fn delta_body_bound(raw_len: u32) -> usize {
    crate::delta::bitmap_len(raw_len as usize) + raw_len as usize
}

/// Splits a delta body into its head and what follows it (compressed
/// when the frame has `FLAG_ZSTD`), checking the announced length.
pub fn decode_delta_head(body: &[u8]) -> Result<(DeltaHead, &[u8]), WireError> {
    let (head, tail) = DeltaHead::ref_from_prefix(body).map_err(|_| WireError::BadBody {
        kind: FrameKind::Delta,
        len: body.len(),
    })?;
    let raw_len = head.raw_len.get();
    if raw_len > MAX_CHUNK_LEN {
        return Err(WireError::ChunkTooLong(raw_len));
    }
    Ok((*head, tail))
}

/// Splits a delta's (decompressed) bitmap-and-blocks bytes of a
/// `raw_len`-byte chunk.
pub fn split_delta(raw_len: u32, tail: &[u8]) -> Result<(&[u8], &[u8]), WireError> {
    let n = crate::delta::bitmap_len(raw_len as usize);
    if tail.len() < n {
        return Err(WireError::BadBody {
            kind: FrameKind::Delta,
            len: tail.len(),
        });
    }
    Ok(tail.split_at(n))
}

/// Splits a delta body into its head, bitmap and block bytes (the bitmap's
/// length follows from `raw_len`; `crate::delta::apply` checks the rest).
pub fn decode_delta(body: &[u8]) -> Result<(DeltaHead, &[u8], &[u8]), WireError> {
    let (head, tail) = decode_delta_head(body)?;
    let (bitmap, payload) = split_delta(head.raw_len.get(), tail).map_err(|_| WireError::BadBody {
        kind: FrameKind::Delta,
        len: body.len(),
    })?;
    Ok((head, bitmap, payload))
}

/// Which of `fps` does the server hold? (1 ≤ len ≤ [`MAX_HAS`]).
pub fn encode_has_request(request_id: u64, fps: &[Fingerprint]) -> Vec<u8> {
    encode(FrameKind::HasRequest, 0, request_id, &[fps.as_bytes()])
}

pub fn decode_has_request(body: &[u8]) -> Result<&[Fingerprint], WireError> {
    let fps = <[Fingerprint]>::ref_from_bytes(body).map_err(|_| WireError::BadBody {
        kind: FrameKind::HasRequest,
        len: body.len(),
    })?;
    if fps.is_empty() {
        return Err(WireError::BadBody {
            kind: FrameKind::HasRequest,
            len: 0,
        });
    }
    if fps.len() > MAX_HAS {
        return Err(WireError::HasTooLarge(fps.len()));
    }
    Ok(fps)
}

/// The answer to a `HasRequest`: bit i set when `held[i]`.
pub fn encode_has_reply(request_id: u64, held: &[bool]) -> Vec<u8> {
    let mut bits = vec![0u8; held.len().div_ceil(8)];
    for (i, &h) in held.iter().enumerate() {
        if h {
            bits[i / 8] |= 1 << (i % 8);
        }
    }
    encode(FrameKind::HasReply, 0, request_id, &[&bits])
}

/// A `HasReply` to a request of `n` fingerprints; a body of another length
/// is malformed.
pub fn decode_has_reply(body: &[u8], n: usize) -> Result<Vec<bool>, WireError> {
    if body.len() != n.div_ceil(8) {
        return Err(WireError::BadBody {
            kind: FrameKind::HasReply,
            len: body.len(),
        });
    }
    Ok((0..n).map(|i| body[i / 8] & (1 << (i % 8)) != 0).collect())
}

/// Header + chunk head for a payload of `wire_len` bytes; the payload itself
/// is sent separately (straight from the chunk file when uncompressed).
pub fn encode_chunk_prefix(
    request_id: u64,
    fp: &Fingerprint,
    raw_len: u32,
    wire_len: u32,
    zstd: bool,
) -> Vec<u8> {
    let head = ChunkHead {
        fingerprint: *fp,
        raw_len: U32::new(raw_len),
        reserved: U32::new(0),
    };
    let flags = if zstd { FLAG_ZSTD } else { 0 };
    let mut out = Vec::with_capacity(HEADER_LEN + CHUNK_HEAD_LEN);
    let hdr = FrameHeader::new(
        FrameKind::Chunk,
        flags,
        request_id,
        CHUNK_HEAD_LEN as u32 + wire_len,
    );
    out.extend_from_slice(hdr.as_bytes());
    out.extend_from_slice(head.as_bytes());
    out
}

/// Splits a chunk body into its head and payload bytes.
pub fn decode_chunk(body: &[u8]) -> Result<(ChunkHead, &[u8]), WireError> {
    let (head, tail) = ChunkHead::ref_from_prefix(body).map_err(|_| WireError::BadBody {
        kind: FrameKind::Chunk,
        len: body.len(),
    })?;
    if head.raw_len.get() > MAX_CHUNK_LEN {
        return Err(WireError::ChunkTooLong(head.raw_len.get()));
    }
    Ok((*head, tail))
}

pub fn encode_error(request_id: u64, code: u32, message: &str) -> Vec<u8> {
    let head = ErrorHead { code: U32::new(code) };
    encode(
        FrameKind::Error,
        0,
        request_id,
        &[head.as_bytes(), message.as_bytes()],
    )
}

pub fn decode_error(body: &[u8]) -> (u32, String) {
    match ErrorHead::read_from_prefix(body) {
        Ok((h, tail)) => (h.code.get(), String::from_utf8_lossy(tail).into_owned()),
        Err(_) => (0, String::from("(malformed error frame)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_of(frame: &[u8]) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&frame[..HEADER_LEN]);
        h
    }

    #[test]
    fn header_is_24_bytes_and_round_trips() {
        assert_eq!(HEADER_LEN, 24);
        let fps = [Fingerprint::of(b"a"), Fingerprint::of(b"b")];
        let f = encode_chunk_request(7, true, 1234, &fps);
        let (h, kind) = FrameHeader::decode(&header_of(&f), MAX_FRAME_LEN).expect("valid header");
        assert_eq!(kind, FrameKind::ChunkRequest);
        assert_eq!(h.request_id(), 7);
        assert_eq!(h.flags(), FLAG_ZSTD_OK);
        assert_eq!(h.body_len() as usize, f.len() - HEADER_LEN);
        let (head, got) = decode_chunk_request(&f[HEADER_LEN..]).expect("valid body");
        assert_eq!(head.path_rate.get(), 1234);
        assert_eq!(got, &fps);
    }

    #[test]
    fn holdings_query_and_reply_round_trip_and_refuse_bad_bodies() {
        let fps: Vec<Fingerprint> = (0..11u8).map(|i| Fingerprint::of(&[i])).collect();
        let f = encode_has_request(3, &fps);
        let (h, kind) = FrameHeader::decode(&header_of(&f), MAX_FRAME_LEN).expect("valid header");
        assert_eq!((kind, h.request_id()), (FrameKind::HasRequest, 3));
        assert_eq!(
            decode_has_request(&f[HEADER_LEN..]).expect("valid body"),
            &fps[..]
        );
        let held: Vec<bool> = (0..11).map(|i| i % 3 == 0).collect();
        let r = encode_has_reply(3, &held);
        assert_eq!(r.len() - HEADER_LEN, 2, "11 answers fit 2 bytes");
        assert_eq!(decode_has_reply(&r[HEADER_LEN..], 11).expect("valid reply"), held);
        // A reply sized for another request, an empty or ragged query.
        assert!(decode_has_reply(&r[HEADER_LEN..], 17).is_err());
        assert!(decode_has_request(&[]).is_err());
        assert!(decode_has_request(&[0u8; 33]).is_err());
        let too_many = vec![0u8; 32 * (MAX_HAS + 1)];
        assert_eq!(
            decode_has_request(&too_many).err(),
            Some(WireError::HasTooLarge(MAX_HAS + 1))
        );
    }

    #[test]
    fn bad_headers_are_refused() {
        let f = encode_hello(&[1; 32], "node-a");
        let mut h = header_of(&f);
        h[0] = b'X';
        assert!(matches!(
            FrameHeader::decode(&h, MAX_FRAME_LEN),
            Err(WireError::BadMagic(_))
        ));
        let mut h = header_of(&f);
        h[4] = 9;
        assert_eq!(
            FrameHeader::decode(&h, MAX_FRAME_LEN).err(),
            Some(WireError::Version(9))
        );
        let mut h = header_of(&f);
        h[5] = 200;
        assert_eq!(
            FrameHeader::decode(&h, MAX_FRAME_LEN).err(),
            Some(WireError::UnknownKind(200))
        );
        let big = FrameHeader::new(FrameKind::Chunk, 0, 0, MAX_FRAME_LEN + 1);
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(big.as_bytes());
        assert!(matches!(
            FrameHeader::decode(&h, MAX_FRAME_LEN),
            Err(WireError::TooLong { .. })
        ));
        // Before authentication the limit is far smaller.
        let (_, _) = FrameHeader::decode(&header_of(&f), MAX_AUTH_FRAME_LEN).expect("hello fits");
        let manifest = FrameHeader::new(FrameKind::Manifest, 0, 0, 4096);
        h.copy_from_slice(manifest.as_bytes());
        assert!(FrameHeader::decode(&h, MAX_AUTH_FRAME_LEN).is_err());
    }

    #[test]
    fn bad_bodies_are_refused() {
        assert!(decode_hello(&[0u8; 10]).is_err());
        let mut long_id = vec![0u8; 32];
        long_id.extend(std::iter::repeat_n(b'a', MAX_PEER_ID_LEN + 1));
        assert!(matches!(decode_hello(&long_id), Err(WireError::BadPeerId(_))));
        // Not a whole number of fingerprints.
        assert!(decode_chunk_request(&[0u8; 8 + 33]).is_err());
        // Empty request.
        assert!(decode_chunk_request(&[0u8; 8]).is_err());
        let too_many = vec![0u8; 8 + 32 * (MAX_BATCH + 1)];
        assert!(matches!(
            decode_chunk_request(&too_many),
            Err(WireError::BatchTooLarge(_))
        ));
        assert!(decode_chunk(&[0u8; 10]).is_err());
        let mut huge = encode_chunk_prefix(1, &Fingerprint::of(b"x"), MAX_CHUNK_LEN + 1, 0, true);
        huge.drain(..HEADER_LEN);
        assert!(matches!(decode_chunk(&huge), Err(WireError::ChunkTooLong(_))));
        assert!(decode_fingerprint(FrameKind::Missing, &[0u8; 31]).is_err());
    }

    #[test]
    fn delta_request_and_delta_round_trip_and_refuse_bad_bodies() {
        let asks = [BasedAsk {
            want: Fingerprint::of(b"new"),
            base: Fingerprint::of(b"old"),
        }];
        let f = encode_delta_request(4, false, 99, &asks);
        let (h, kind) = FrameHeader::decode(&header_of(&f), MAX_FRAME_LEN).expect("header");
        assert_eq!((kind, h.request_id(), h.flags()), (FrameKind::DeltaRequest, 4, 0));
        let (head, got) = decode_delta_request(&f[HEADER_LEN..]).expect("body");
        assert_eq!((head.path_rate.get(), got), (99, &asks[..]));
        assert!(decode_delta_request(&[0u8; 8]).is_err(), "empty");
        assert!(decode_delta_request(&[0u8; 8 + 63]).is_err(), "ragged");

        let d = encode_delta(4, &asks[0].want, &asks[0].base, 3 * 4096, &[0b010], &[7u8; 4096]);
        let (h, kind) = FrameHeader::decode(&header_of(&d), MAX_FRAME_LEN).expect("header");
        assert_eq!(
            (kind, h.body_len() as usize),
            (FrameKind::Delta, d.len() - HEADER_LEN)
        );
        let (head, bitmap, payload) = decode_delta(&d[HEADER_LEN..]).expect("body");
        assert_eq!((head.fingerprint, head.base), (asks[0].want, asks[0].base));
        assert_eq!(
            (head.raw_len.get(), bitmap, payload.len()),
            (3 * 4096, &[0b010u8][..], 4096)
        );
        // Too short for its bitmap; too long a chunk.
        let cut = &d[HEADER_LEN..HEADER_LEN + DELTA_HEAD_LEN];
        assert!(decode_delta(cut).is_err());
        let huge = encode_delta(4, &asks[0].want, &asks[0].base, MAX_CHUNK_LEN + 1, &[], &[]);
        assert!(matches!(
            decode_delta(&huge[HEADER_LEN..]),
            Err(WireError::ChunkTooLong(_))
        ));
        // A compressed delta: flagged, its head readable, the rest as sent.
        let z = encode_delta_zstd(5, &asks[0].want, &asks[0].base, 3 * 4096, b"zstd bytes");
        let (h, _) = FrameHeader::decode(&header_of(&z), MAX_FRAME_LEN).expect("header");
        assert_eq!(h.flags(), FLAG_ZSTD);
        let (head, tail) = decode_delta_head(&z[HEADER_LEN..]).expect("head");
        assert_eq!((head.raw_len.get(), tail), (3 * 4096, &b"zstd bytes"[..]));
        assert_eq!(delta_body_bound(3 * 4096), 1 + 3 * 4096);
        assert!(split_delta(3 * 4096, &[]).is_err(), "no room for the bitmap");
    }

    #[test]
    fn proofs_bind_key_nonce_role_and_ids() {
        let key = [7u8; 32];
        let nonce = [3u8; 32];
        let p = auth_proof(&key, &nonce, Role::Client, "a", "b");
        assert!(verify_proof(&key, &nonce, Role::Client, "a", "b", &p));
        assert!(!verify_proof(&[8u8; 32], &nonce, Role::Client, "a", "b", &p));
        assert!(!verify_proof(&key, &[4u8; 32], Role::Client, "a", "b", &p));
        assert!(!verify_proof(&key, &nonce, Role::Server, "a", "b", &p));
        assert!(!verify_proof(&key, &nonce, Role::Client, "b", "a", &p));
        // Length-prefixing keeps ("ab","") and ("a","b") apart.
        assert_ne!(p, auth_proof(&key, &nonce, Role::Client, "ab", ""));
    }

    #[test]
    fn chunk_prefix_and_error_round_trip() {
        let fp = Fingerprint::of(b"payload");
        let mut f = encode_chunk_prefix(9, &fp, 7, 7, false);
        f.extend_from_slice(b"payload");
        let (h, kind) = FrameHeader::decode(&header_of(&f), MAX_FRAME_LEN).expect("header");
        assert_eq!(kind, FrameKind::Chunk);
        assert_eq!(h.body_len() as usize, f.len() - HEADER_LEN);
        let (head, bytes) = decode_chunk(&f[HEADER_LEN..]).expect("chunk");
        assert_eq!(head.fingerprint, fp);
        assert_eq!(bytes, b"payload");
        let e = encode_error(3, error_code::AUTH_FAILED, "nope");
        assert_eq!(
            decode_error(&e[HEADER_LEN..]),
            (error_code::AUTH_FAILED, "nope".to_string())
        );
    }
}
