//! Dialling a peer: connect, then authenticate both ways ([`super::conn`]).
//!
//! The lowest layer of the client side: the fetcher, the connection pool
//! and [`super::peer::PeerStore`] all open their connections here.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use super::conn::AUTH_TIMEOUT;
use super::stream::PeerStream;
use super::trust::{secure_client, Trust};
use super::TransferError;

/// How to reach a peer and how long to wait on it.
#[derive(Debug, Clone)]
pub struct DialOptions {
    pub connect_timeout: Duration,
    /// A request with nothing received for this long is given up.
    pub stall_timeout: Duration,
}

impl Default for DialOptions {
    fn default() -> Self {
        DialOptions {
            connect_timeout: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(10),
        }
    }
}

/// Connects and authenticates; returns the stream and the peer's name.
pub(crate) async fn connect(
    addr: SocketAddr,
    trust: &Trust,
    opts: &DialOptions,
) -> Result<(PeerStream, String), TransferError> {
    let sock = tokio::time::timeout(opts.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| TransferError::Timeout("connecting"))??;
    let _ = sock.set_nodelay(true);
    let id = tokio::time::timeout(AUTH_TIMEOUT, secure_client(trust, sock, addr))
        .await
        .map_err(|_| TransferError::Timeout("authenticating"))?;
    match id {
        Ok(authenticated) => Ok(authenticated),
        Err(e) => {
            metrics::counter!("edgeshift_auth_failures_total", "side" => "client").increment(1);
            Err(e)
        }
    }
}
