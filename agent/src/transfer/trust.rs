//! [`Trust`]: how peer agents prove who they are, and the handshakes that
//! turn a TCP connection into a [`PeerStream`] with a verified peer name.

use std::net::SocketAddr;
use std::sync::Arc;

use edgeshift_common::identity::{peer_identity, Credentials, Role};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::conn::{client_handshake, server_handshake};
use super::stream::{tls_io, PeerStream, TLS_WRITE_BUFFER};
use super::{ClusterKey, TransferError};

/// How this agent authenticates peers (and itself to them).
#[derive(Clone, Debug)]
pub enum Trust {
    /// Mutual TLS with the cluster's certificates: a peer is the edge its
    /// certificate names, and everything after the handshake is encrypted
    /// and bound to it.
    Tls(Arc<Credentials>),
    /// Test-only (`--insecure-plaintext`): the keyed-BLAKE3 handshake of
    /// the cluster key, then plaintext; `id` is what we announce.
    InsecurePlaintext { key: ClusterKey, id: String },
}

impl Trust {
    /// Our own name: the certificate's, or the announced id.
    pub fn own_name(&self) -> &str {
        match self {
            Trust::Tls(c) => &c.identity().name,
            Trust::InsecurePlaintext { id, .. } => id,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Trust::Tls(_))
    }

    /// The cluster credentials, for other TLS endpoints (QEMU's streams,
    /// the coordinator client); `None` under `--insecure-plaintext`.
    pub fn credentials(&self) -> Option<&Arc<Credentials>> {
        match self {
            Trust::Tls(c) => Some(c),
            Trust::InsecurePlaintext { .. } => None,
        }
    }
}

fn tls_failed(peer: SocketAddr, e: impl std::fmt::Display) -> TransferError {
    TransferError::AuthFailed {
        peer: peer.to_string(),
        reason: e.to_string(),
    }
}

/// The edge name a finished TLS handshake verified, or an error for a
/// certificate that is not an edge's.
fn edge_name(
    peer: SocketAddr,
    certs: Option<&[rustls::pki_types::CertificateDer<'_>]>,
) -> Result<String, TransferError> {
    let id = peer_identity(certs).map_err(|e| tls_failed(peer, e))?;
    if id.role != Role::Edge {
        return Err(tls_failed(peer, format!("{id} is not an edge")));
    }
    Ok(id.name)
}

/// Client side: authenticates `sock` (connected to `peer`); returns the
/// stream and the peer's name.
pub async fn secure_client(
    trust: &Trust,
    sock: TcpStream,
    peer: SocketAddr,
) -> Result<(PeerStream, String), TransferError> {
    match trust {
        Trust::Tls(creds) => {
            let connector = tokio_rustls::TlsConnector::from(creds.edge_client_config());
            // Edges are dialled by address; the verifier checks the
            // certificate for the edge name it carries.
            let mut tls = connector
                .connect(ServerName::IpAddress(peer.ip().into()), tls_io(sock))
                .await
                .map_err(|e| tls_failed(peer, e))?;
            tls.get_mut().1.set_buffer_limit(Some(TLS_WRITE_BUFFER));
            let name = edge_name(peer, tls.get_ref().1.peer_certificates())?;
            Ok((PeerStream::Tls(Box::new(tls.into())), name))
        }
        Trust::InsecurePlaintext { key, id } => {
            let mut sock = sock;
            let name = client_handshake(&mut sock, key, id, &peer.to_string()).await?;
            Ok((PeerStream::Plain(sock), name))
        }
    }
}

/// Server side: authenticates the client on `sock`; returns the stream and
/// the client's name.
pub async fn secure_server(
    trust: &Trust,
    sock: TcpStream,
    peer: SocketAddr,
) -> Result<(PeerStream, String), TransferError> {
    match trust {
        Trust::Tls(creds) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(creds.server_config());
            let mut tls = acceptor
                .accept(tls_io(sock))
                .await
                .map_err(|e| tls_failed(peer, e))?;
            tls.get_mut().1.set_buffer_limit(Some(TLS_WRITE_BUFFER));
            let name = edge_name(peer, tls.get_ref().1.peer_certificates())?;
            Ok((PeerStream::Tls(Box::new(tls.into())), name))
        }
        Trust::InsecurePlaintext { key, id } => {
            let mut sock = sock;
            let name = server_handshake(&mut sock, key, id, &peer.to_string()).await?;
            Ok((PeerStream::Plain(sock), name))
        }
    }
}
