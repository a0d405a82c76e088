//! [`PeerStore`]: read access to one remote agent's store over one
//! authenticated connection, for callers that want a manifest or a few chunks
//! from a known peer rather than a striped fetch (the fetcher uses it for
//! manifests). Everything it returns has been checked against its name.

use std::net::SocketAddr;

use edgeshift_common::wire::{self, FrameKind, MAX_CHUNK_LEN, MAX_FRAME_LEN};
use edgeshift_common::{Fingerprint, Manifest, ManifestId};
use tokio::io::AsyncWriteExt;

use super::conn::{read_frame, unexpected, Frame};
use super::dial::{connect, DialOptions};
use super::stream::PeerStream;
use super::trust::Trust;
use super::TransferError;
use crate::store::StoreError;

/// One authenticated connection to a peer agent.
pub struct PeerStore {
    addr: SocketAddr,
    peer_id: String,
    sock: PeerStream,
    next_request: u64,
    opts: DialOptions,
}

impl PeerStore {
    /// Connects and authenticates (both ways) per `trust`. `opts` may be
    /// [`DialOptions`] or a fetch's options.
    pub async fn connect(
        addr: SocketAddr,
        trust: &Trust,
        opts: impl Into<DialOptions>,
    ) -> Result<Self, TransferError> {
        let opts = opts.into();
        let (sock, peer_id) = connect(addr, trust, &opts).await?;
        Ok(PeerStore {
            addr,
            peer_id,
            sock,
            next_request: 0,
            opts,
        })
    }

    /// The peer's name: from its certificate (or, insecure, its hello).
    pub fn peer_id(&self) -> &str {
        &self.peer_id
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    async fn next_frame(&mut self) -> Result<Frame, TransferError> {
        tokio::time::timeout(
            self.opts.stall_timeout,
            read_frame(&mut self.sock, MAX_FRAME_LEN, None),
        )
        .await
        .map_err(|_| TransferError::Timeout("waiting for the peer"))?
    }

    /// Manifest `id`; its bytes must hash to `id`. A peer without it yields
    /// [`StoreError::ManifestMissing`].
    pub async fn get_manifest(&mut self, id: &ManifestId) -> Result<Manifest, TransferError> {
        self.next_request += 1;
        let rid = self.next_request;
        self.sock
            .write_all(&wire::encode(
                FrameKind::ManifestRequest,
                0,
                rid,
                &[id.as_bytes()],
            ))
            .await?;
        let f = self.next_frame().await?;
        match f.kind {
            FrameKind::Manifest => {
                Manifest::from_bytes_checked(&f.body, id).map_err(|source| TransferError::BadManifest {
                    id: *id,
                    peer: self.addr.to_string(),
                    source: Box::new(source),
                })
            }
            FrameKind::Missing => Err(TransferError::Store(StoreError::ManifestMissing(*id))),
            _ => Err(unexpected(&f)),
        }
    }

    /// The chunks `fps` (at most [`wire::MAX_BATCH`]), in order: `Some(bytes)`
    /// for each the peer holds, `None` for each it lacks. Bytes that do not
    /// hash to their fingerprint fail the whole call with
    /// [`StoreError::ChunkRejected`]; the connection should then be dropped.
    pub async fn get_chunks(&mut self, fps: &[Fingerprint]) -> Result<Vec<Option<Vec<u8>>>, TransferError> {
        if fps.is_empty() {
            return Ok(Vec::new());
        }
        if fps.len() > wire::MAX_BATCH {
            return Err(TransferError::Wire(wire::WireError::BatchTooLarge(fps.len())));
        }
        self.next_request += 1;
        let rid = self.next_request;
        // Uncompressed: without a manifest there is no length to bound a
        // decompression by other than the largest chunk size.
        self.sock
            .write_all(&wire::encode_chunk_request(rid, false, 0, fps))
            .await?;
        // One answer per fingerprint; a chunk the server is still placing
        // may come after later ones (docs/wire.md), so each answer fills the
        // first unanswered position of its fingerprint.
        let mut out: Vec<Option<Option<Vec<u8>>>> = vec![None; fps.len()];
        for _ in 0..fps.len() {
            let f = self.next_frame().await?;
            let (fp, answer) = match f.kind {
                FrameKind::Chunk => {
                    let (head, bytes) = wire::decode_chunk(&f.body)?;
                    let fp = head.fingerprint;
                    if f.header.flags() & wire::FLAG_ZSTD != 0 {
                        return Err(TransferError::BadChunk {
                            fp,
                            reason: "peer compressed it unasked".into(),
                        });
                    }
                    if bytes.len() > MAX_CHUNK_LEN as usize || head.raw_len.get() as usize != bytes.len() {
                        return Err(TransferError::BadChunk {
                            fp,
                            reason: "length does not match its header".into(),
                        });
                    }
                    (fp, Some(bytes))
                }
                FrameKind::Missing => (wire::decode_fingerprint(f.kind, &f.body)?, None),
                _ => return Err(unexpected(&f)),
            };
            let Some(slot) = (0..fps.len()).find(|&i| fps[i] == fp && out[i].is_none()) else {
                return Err(TransferError::BadChunk {
                    fp,
                    reason: "peer answered a chunk not asked for (or twice)".into(),
                });
            };
            if let Some(bytes) = answer {
                let actual = Fingerprint::of(bytes);
                if actual != fp {
                    return Err(TransferError::Store(StoreError::ChunkRejected { fp, actual }));
                }
                out[slot] = Some(Some(bytes.to_vec()));
            } else {
                out[slot] = Some(None);
            }
        }
        Ok(out.into_iter().map(Option::flatten).collect())
    }
}
