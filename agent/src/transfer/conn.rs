//! Frames on a TCP stream, and the authentication exchange.
//!
//! Under `--insecure-plaintext` only (tests; TLS is the product's
//! authentication, `super::trust`), authentication (both directions, before
//! any manifest or chunk flows): the client sends `Hello{client_nonce, client_id}`; the server answers
//! `Challenge{server_nonce, server_proof, server_id}` where `server_proof`
//! is the keyed BLAKE3 of the client's nonce (role "server"); the client
//! checks it (a server without the key is left at once) and sends
//! `Response{client_proof}` over the server's nonce (role "client"); the
//! server checks it and sends `AuthOk`, or an error frame and closes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use edgeshift_common::wire::{
    self, error_code, FrameHeader, FrameKind, Role, HEADER_LEN, MAX_AUTH_FRAME_LEN,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{ClusterKey, TransferError};

/// How long either side waits for the whole authentication exchange.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);

/// One received frame.
#[derive(Debug)]
pub struct Frame {
    pub header: FrameHeader,
    pub kind: FrameKind,
    pub body: Vec<u8>,
}

/// Bodies are read in pieces of this size so progress is visible (stall
/// detection) while a large chunk arrives.
const READ_PIECE: usize = 256 << 10;

/// Reads one frame; the body length is checked against `max_len` before the
/// body buffer is allocated. A clean end of stream before a header is
/// [`TransferError::Closed`]. `progress`, if given, counts body bytes as
/// they arrive.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max_len: u32,
    progress: Option<&AtomicU64>,
) -> Result<Frame, TransferError> {
    read_frame_into(r, max_len, progress, Vec::new()).await
}

/// [`read_frame`] into a recycled buffer (cleared first), which saves the
/// page faults of a fresh allocation per chunk on a busy receiver.
pub async fn read_frame_into<R: AsyncRead + Unpin>(
    r: &mut R,
    max_len: u32,
    progress: Option<&AtomicU64>,
    body: Vec<u8>,
) -> Result<Frame, TransferError> {
    let (header, kind) = read_header(r, max_len).await?;
    read_body_into(r, header, kind, progress, body).await
}

/// Reads a frame's header; its body length is checked against `max_len`.
/// A clean end of stream is [`TransferError::Closed`].
pub async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    max_len: u32,
) -> Result<(FrameHeader, FrameKind), TransferError> {
    let mut hdr = [0u8; HEADER_LEN];
    match r.read_exact(&mut hdr).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(TransferError::Closed),
        Err(e) => return Err(e.into()),
    }
    Ok(FrameHeader::decode(&hdr, max_len)?)
}

/// Reads the body of the frame `header` announced into `body` (cleared first).
pub async fn read_body_into<R: AsyncRead + Unpin>(
    r: &mut R,
    header: FrameHeader,
    kind: FrameKind,
    progress: Option<&AtomicU64>,
    mut body: Vec<u8>,
) -> Result<Frame, TransferError> {
    let len = header.body_len() as usize;
    // Read into spare capacity: no zero-fill pass over a buffer that the
    // socket is about to overwrite anyway.
    body.clear();
    body.reserve(len);
    while body.len() < len {
        let want = (len - body.len()).min(READ_PIECE);
        let n = (&mut *r).take(want as u64).read_buf(&mut body).await?;
        if n == 0 {
            return Err(TransferError::Closed);
        }
        if let Some(p) = progress {
            p.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    Ok(Frame { header, kind, body })
}

/// Fills `dst` from `r` in pieces, counting them in `progress` as they arrive.
pub async fn read_exact_counted<R: AsyncRead + Unpin>(
    r: &mut R,
    dst: &mut [u8],
    progress: Option<&AtomicU64>,
) -> Result<(), TransferError> {
    let mut done = 0;
    while done < dst.len() {
        let end = (done + READ_PIECE).min(dst.len());
        let n = r.read(&mut dst[done..end]).await?;
        if n == 0 {
            return Err(TransferError::Closed);
        }
        if let Some(p) = progress {
            p.fetch_add(n as u64, Ordering::Relaxed);
        }
        done += n;
    }
    Ok(())
}

/// Turns an error frame into an error; any other frame kind is `Unexpected`.
pub fn unexpected(frame: &Frame) -> TransferError {
    if frame.kind == FrameKind::Error {
        let (code, message) = wire::decode_error(&frame.body);
        TransferError::Remote { code, message }
    } else {
        TransferError::Unexpected(format!("{:?}", frame.kind))
    }
}

/// Client side of the exchange; returns the server's id.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &ClusterKey,
    my_id: &str,
    peer_label: &str,
) -> Result<String, TransferError> {
    let fail = |reason: String| TransferError::AuthFailed {
        peer: peer_label.to_string(),
        reason,
    };
    let client_nonce: [u8; 32] = rand::random();
    s.write_all(&wire::encode_hello(&client_nonce, my_id)).await?;
    let f = read_frame(s, MAX_AUTH_FRAME_LEN, None).await?;
    if f.kind != FrameKind::Challenge {
        return Err(fail(unexpected(&f).to_string()));
    }
    let (challenge, server_id) = wire::decode_challenge(&f.body)?;
    if !wire::verify_proof(
        key.as_bytes(),
        &client_nonce,
        Role::Server,
        &server_id,
        my_id,
        &challenge.server_proof,
    ) {
        return Err(fail("the server could not prove it holds the cluster key".into()));
    }
    let proof = wire::auth_proof(
        key.as_bytes(),
        &challenge.server_nonce,
        Role::Client,
        my_id,
        &server_id,
    );
    let body = wire::ResponseBody { client_proof: proof };
    s.write_all(&wire::encode(
        FrameKind::Response,
        0,
        0,
        &[zerocopy::IntoBytes::as_bytes(&body)],
    ))
    .await?;
    let f = match read_frame(s, MAX_AUTH_FRAME_LEN, None).await {
        Ok(f) => f,
        Err(TransferError::Closed) => return Err(fail("the server closed the connection".into())),
        Err(e) => return Err(e),
    };
    if f.kind != FrameKind::AuthOk {
        return Err(fail(unexpected(&f).to_string()));
    }
    Ok(server_id)
}

/// Server side of the exchange; returns the client's id. On a bad proof the
/// client is told (error frame) before the caller drops the connection.
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &ClusterKey,
    my_id: &str,
    peer_label: &str,
) -> Result<String, TransferError> {
    let fail = |reason: String| TransferError::AuthFailed {
        peer: peer_label.to_string(),
        reason,
    };
    let f = read_frame(s, MAX_AUTH_FRAME_LEN, None).await?;
    if f.kind != FrameKind::Hello {
        // Nothing is answered to an unauthenticated peer (docs/wire.md).
        return Err(fail(format!("first frame was {:?}, not a hello", f.kind)));
    }
    let (hello, client_id) = wire::decode_hello(&f.body)?;
    let server_nonce: [u8; 32] = rand::random();
    let challenge = wire::ChallengeBody {
        server_nonce,
        server_proof: wire::auth_proof(
            key.as_bytes(),
            &hello.client_nonce,
            Role::Server,
            my_id,
            &client_id,
        ),
    };
    s.write_all(&wire::encode_challenge(&challenge, my_id)).await?;
    let f = match read_frame(s, MAX_AUTH_FRAME_LEN, None).await {
        Ok(f) => f,
        Err(TransferError::Closed) => {
            return Err(fail(format!(
                "{client_id:?} closed the connection after the challenge (it does not hold our key?)"
            )))
        }
        Err(e) => return Err(e),
    };
    if f.kind != FrameKind::Response {
        return Err(fail(format!("expected a response frame, got {:?}", f.kind)));
    }
    let resp = wire::decode_response(&f.body)?;
    if !wire::verify_proof(
        key.as_bytes(),
        &server_nonce,
        Role::Client,
        &client_id,
        my_id,
        &resp.client_proof,
    ) {
        let _ = s
            .write_all(&wire::encode_error(
                0,
                error_code::AUTH_FAILED,
                "authentication failed",
            ))
            .await;
        return Err(fail(format!("{client_id:?} does not hold the cluster key")));
    }
    s.write_all(&wire::encode(FrameKind::AuthOk, 0, 0, &[])).await?;
    Ok(client_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn handshake_succeeds_with_same_key_and_fails_otherwise() {
        let key = ClusterKey::from_bytes([5; 32]);
        let (mut a, mut b) = tokio::io::duplex(4096);
        let k2 = key.clone();
        let server = tokio::spawn(async move { server_handshake(&mut b, &k2, "srv", "test").await });
        let got = client_handshake(&mut a, &key, "cli", "test").await.expect("auth");
        assert_eq!(got, "srv");
        assert_eq!(server.await.expect("join").expect("server auth"), "cli");

        let (mut a, mut b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            server_handshake(&mut b, &ClusterKey::from_bytes([6; 32]), "srv", "test").await
        });
        let err = client_handshake(&mut a, &key, "cli", "test").await;
        assert!(matches!(err, Err(TransferError::AuthFailed { .. })), "{err:?}");
        drop(a);
        assert!(server.await.expect("join").is_err());
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_before_allocation() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let hdr = FrameHeader::new(FrameKind::Chunk, 0, 0, u32::MAX);
        a.write_all(zerocopy::IntoBytes::as_bytes(&hdr))
            .await
            .expect("write");
        let err = read_frame(&mut b, wire::MAX_FRAME_LEN, None).await;
        assert!(
            matches!(err, Err(TransferError::Wire(wire::WireError::TooLong { .. }))),
            "{err:?}"
        );
    }
}
