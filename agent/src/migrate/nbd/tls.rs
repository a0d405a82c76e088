//! The export's connection, buffered both ways over one stream (a TCP
//! socket, or rustls over it), and the upgrade to TLS after the
//! `NBD_REP_ACK` of `NBD_OPT_STARTTLS`: a rustls server handshake with the
//! cluster's server configuration (a client certificate under the cluster
//! CA required, CRL checked), then the client's certificate must be an
//! edge's and, where the caller knows it, the source's.

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use edgeshift_common::identity::{self, Role};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

use super::NbdError;

/// Longest a client may take over its TLS handshake.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(10);
/// Replies are gathered up to this before they go (one TLS record each
/// flush rather than one per 16-byte reply header).
const WRITE_BUFFER: usize = 64 << 10;
/// Reads: a mirror write is up to 32 MiB, most are a few KiB.
const READ_BUFFER: usize = 1 << 20;

/// One stream read through a buffer, written through another (flushed
/// when the server has answered all it read).
pub(super) struct Conn<S: Read + Write> {
    r: BufReader<S>,
    out: Vec<u8>,
}

impl<S: Read + Write> Conn<S> {
    pub(super) fn new(stream: S) -> Self {
        Conn {
            r: BufReader::with_capacity(READ_BUFFER, stream),
            out: Vec::with_capacity(WRITE_BUFFER),
        }
    }
}

impl<S: Read + Write> Read for Conn<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.r.read(buf)
    }
}

impl<S: Read + Write> Write for Conn<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > WRITE_BUFFER && !self.out.is_empty() {
            self.flush()?;
        }
        if buf.len() >= WRITE_BUFFER {
            return self.r.get_mut().write(buf);
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let s = self.r.get_mut();
        s.write_all(&self.out)?;
        self.out.clear();
        s.flush()
    }
}

/// The export's TLS: the cluster's server configuration and the client it
/// takes.
#[derive(Clone)]
pub struct ExportTls {
    /// `Credentials::server_config`: a client certificate chaining to a
    /// cluster CA, not revoked, is required.
    pub config: Arc<ServerConfig>,
    /// The edge the client's certificate must name (the migration's source,
    /// as the control channel authenticated it); `None`: any edge.
    pub client: Option<String>,
}

impl std::fmt::Debug for ExportTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportTls")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl ExportTls {
    /// Right after the `NBD_REP_ACK` of STARTTLS: the TLS handshake on
    /// `plain`'s socket and the client's certificate checked.
    pub(super) fn upgrade(
        &self,
        mut plain: Conn<TcpStream>,
    ) -> Result<Conn<StreamOwned<ServerConnection, TcpStream>>, NbdError> {
        if !plain.r.buffer().is_empty() {
            // Bytes sent before our ACK could only be plaintext injected
            // ahead of the handshake (the spec's STARTTLS injection).
            return Err(NbdError::Protocol(
                "data after NBD_OPT_STARTTLS before the TLS handshake".into(),
            ));
        }
        plain.flush()?;
        let mut sock = plain.r.into_inner();
        let mut conn =
            ServerConnection::new(self.config.clone()).map_err(|e| NbdError::Tls(e.to_string()))?;
        sock.set_read_timeout(Some(HANDSHAKE_WAIT))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)
                .map_err(|e| NbdError::Tls(format!("handshake: {e}")))?;
        }
        sock.set_read_timeout(None)?;
        let peer = identity::peer_identity(conn.peer_certificates())
            .map_err(|e| NbdError::Refused(e.to_string()))?;
        if peer.role != Role::Edge {
            return Err(NbdError::Refused(format!("{peer} is not an edge")));
        }
        if let Some(want) = &self.client {
            if &peer.name != want {
                return Err(NbdError::Refused(format!(
                    "edge {} is not this migration's source ({want})",
                    peer.name
                )));
            }
        }
        tracing::debug!(client = %peer, "disk mirror export: TLS up");
        Ok(Conn::new(StreamOwned::new(conn, sock)))
    }
}
