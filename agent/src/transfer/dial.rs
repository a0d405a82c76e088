//! Dialling a peer: connect, then authenticate both ways ([`super::conn`]).
//!
//! The lowest layer of the client side: the fetcher, the connection pool
//! and [`super::peer::PeerStore`] all open their connections here.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use super::conn::{client_handshake, AUTH_TIMEOUT};
use super::{default_node_id, ClusterKey, TransferError};

/// How to reach a peer and how long to wait on it.
#[derive(Debug, Clone)]
pub struct DialOptions {
    /// Our node id, sent in the hello.
    pub id: String,
    pub connect_timeout: Duration,
    /// A request with nothing received for this long is given up.
    pub stall_timeout: Duration,
}

impl Default for DialOptions {
    fn default() -> Self {
        DialOptions {
            id: default_node_id(),
            connect_timeout: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(10),
        }
    }
}

/// Connects and authenticates; returns the stream and the peer's id.
pub(crate) async fn connect(
    addr: SocketAddr,
    key: &ClusterKey,
    opts: &DialOptions,
) -> Result<(TcpStream, String), TransferError> {
    let mut sock = tokio::time::timeout(opts.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| TransferError::Timeout("connecting"))??;
    let _ = sock.set_nodelay(true);
    let label = addr.to_string();
    let id = tokio::time::timeout(AUTH_TIMEOUT, client_handshake(&mut sock, key, &opts.id, &label))
        .await
        .map_err(|_| TransferError::Timeout("authenticating"))?;
    match id {
        Ok(id) => Ok((sock, id)),
        Err(e) => {
            metrics::counter!("edgeshift_auth_failures_total", "side" => "client").increment(1);
            Err(e)
        }
    }
}
