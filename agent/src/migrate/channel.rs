//! The migration control channel's connection: mutual TLS with the
//! cluster's certificates (blocking rustls: the channel runs on threads of
//! its own), or, under `--insecure-plaintext`, the cluster key's handshake
//! on plaintext. Either way the peer's edge name comes out of the handshake.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use edgeshift_common::identity::{peer_identity, Role};
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection, StreamOwned};

use super::proto;
use super::MigrateError;
use crate::transfer::Trust;

/// An authenticated control connection.
#[derive(Debug)]
pub enum ControlStream {
    Plain(TcpStream),
    TlsClient(Box<StreamOwned<ClientConnection, TcpStream>>),
    TlsServer(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl ControlStream {
    /// The TCP socket underneath (timeouts, addresses).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            ControlStream::Plain(s) => s,
            ControlStream::TlsClient(s) => s.get_ref(),
            ControlStream::TlsServer(s) => s.get_ref(),
        }
    }
}

impl Read for ControlStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            ControlStream::Plain(s) => s.read(buf),
            ControlStream::TlsClient(s) => s.read(buf),
            ControlStream::TlsServer(s) => s.read(buf),
        }
    }
}

impl Write for ControlStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            ControlStream::Plain(s) => s.write(buf),
            ControlStream::TlsClient(s) => s.write(buf),
            ControlStream::TlsServer(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            ControlStream::Plain(s) => s.flush(),
            ControlStream::TlsClient(s) => s.flush(),
            ControlStream::TlsServer(s) => s.flush(),
        }
    }
}

fn auth(peer: &str, e: impl std::fmt::Display) -> MigrateError {
    MigrateError::Auth(format!("{peer}: {e}"))
}

/// The verified edge name of a finished TLS handshake.
fn edge_name(
    peer: &str,
    certs: Option<&[rustls::pki_types::CertificateDer<'_>]>,
) -> Result<String, MigrateError> {
    let id = peer_identity(certs).map_err(|e| auth(peer, e))?;
    if id.role != Role::Edge {
        return Err(auth(peer, format!("{id} is not an edge")));
    }
    Ok(id.name)
}

/// Drives a blocking handshake to its end (the socket's timeouts bound it).
fn finish_handshake<C, D>(conn: &mut C, sock: &mut TcpStream, peer: &str) -> Result<(), MigrateError>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
    D: rustls::SideData,
{
    while conn.is_handshaking() {
        conn.complete_io(sock).map_err(|e| auth(peer, e))?;
    }
    // TLS 1.3: the client's last flight may still be queued.
    while conn.wants_write() {
        conn.complete_io(sock).map_err(|e| auth(peer, e))?;
    }
    Ok(())
}

/// Connects to a destination's control listener at `addr` and
/// authenticates both ways; returns the connection and the peer's name.
pub fn connect(
    addr: &str,
    trust: &Trust,
    timeout: Duration,
) -> Result<(ControlStream, String), MigrateError> {
    match trust {
        Trust::InsecurePlaintext { key, id } => {
            let s = proto::connect_auth(addr, key.as_bytes(), id, timeout)?;
            // The insecure handshake checks the key, not a name.
            Ok((ControlStream::Plain(s), addr.to_string()))
        }
        Trust::Tls(creds) => {
            let sa: SocketAddr = addr
                .to_socket_addrs()
                .map_err(|e| MigrateError::Channel(format!("address {addr}: {e}")))?
                .next()
                .ok_or_else(|| MigrateError::Channel(format!("address {addr} resolves to nothing")))?;
            let mut sock = TcpStream::connect_timeout(&sa, timeout)
                .map_err(|e| MigrateError::Channel(format!("connect to {addr}: {e}")))?;
            let _ = sock.set_nodelay(true);
            sock.set_read_timeout(Some(timeout))
                .map_err(|e| MigrateError::Channel(e.to_string()))?;
            // Edges are dialled by address; the verifier checks the edge
            // name the certificate carries.
            let mut conn =
                ClientConnection::new(creds.edge_client_config(), ServerName::IpAddress(sa.ip().into()))
                    .map_err(|e| auth(addr, e))?;
            finish_handshake(&mut conn, &mut sock, addr)?;
            let name = edge_name(addr, conn.peer_certificates())?;
            sock.set_read_timeout(None)
                .map_err(|e| MigrateError::Channel(e.to_string()))?;
            Ok((
                ControlStream::TlsClient(Box::new(StreamOwned::new(conn, sock))),
                name,
            ))
        }
    }
}

/// Authenticates the client of an accepted control connection (the
/// socket's read timeout bounds it); returns the connection and its name.
pub fn accept(mut sock: TcpStream, trust: &Trust) -> Result<(ControlStream, String), MigrateError> {
    let peer = sock
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    match trust {
        Trust::InsecurePlaintext { key, id } => {
            let name = proto::accept_auth(&mut sock, key.as_bytes(), id)?;
            Ok((ControlStream::Plain(sock), name))
        }
        Trust::Tls(creds) => {
            let mut conn =
                ServerConnection::new(Arc::clone(&creds.server_config())).map_err(|e| auth(&peer, e))?;
            finish_handshake(&mut conn, &mut sock, &peer)?;
            let name = edge_name(&peer, conn.peer_certificates())?;
            Ok((
                ControlStream::TlsServer(Box::new(StreamOwned::new(conn, sock))),
                name,
            ))
        }
    }
}
