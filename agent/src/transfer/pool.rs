//! Authenticated peer connections kept between fetches.
//!
//! A migration pulls in rounds, each a fetch of its own; a handshake per
//! peer per round delays the first request, most in the pause, where the
//! handshake's answers queue behind memory's last bytes on the source's
//! path (`docs/wire.md`). A fetch given a pool takes an idle connection
//! from it and gives it back when it ends with nothing outstanding on it;
//! the holdings probe does the same, so the chunk requests go on the
//! connection the probe opened.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Mutex;

use tokio::net::TcpStream;

use super::dial::{connect, DialOptions};
use super::{ClusterKey, TransferError};

/// Idle, authenticated connections by peer address, with the peer's id.
#[derive(Debug, Default)]
pub struct ConnPool {
    idle: Mutex<HashMap<SocketAddr, Vec<(std::net::TcpStream, String)>>>,
}

impl ConnPool {
    pub fn new() -> Self {
        Self::default()
    }

    /// An idle connection to `addr` the peer has not closed meanwhile (a
    /// closed one, or one with bytes nobody asked for, is dropped).
    fn take(&self, addr: &SocketAddr) -> Option<(std::net::TcpStream, String)> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(addr)?;
        while let Some((sock, id)) = list.pop() {
            let mut probe = [0u8; 1];
            // The socket is non-blocking (tokio's `into_std` leaves it so):
            // nothing to read is the only state of a healthy idle connection.
            match sock.peek(&mut probe) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Some((sock, id)),
                _ => continue,
            }
        }
        None
    }

    fn put(&self, addr: SocketAddr, sock: std::net::TcpStream, id: String) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.entry(addr).or_default().push((sock, id));
    }

    /// Idle connections held (for tests and logs).
    pub fn idle_count(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.values().map(Vec::len).sum()
    }
}

/// A connection to `addr`: an idle one from `pool` if it has one, else a
/// new one, authenticated.
pub(crate) async fn checkout(
    pool: Option<&ConnPool>,
    addr: SocketAddr,
    key: &ClusterKey,
    opts: &DialOptions,
) -> Result<(TcpStream, String), TransferError> {
    if let Some((sock, id)) = pool.and_then(|p| p.take(&addr)) {
        match TcpStream::from_std(sock) {
            Ok(s) => return Ok((s, id)),
            Err(e) => {
                tracing::debug!(peer = %addr, error = %e, "pooled connection unusable; connecting anew")
            }
        }
    }
    connect(addr, key, opts).await
}

/// Gives a connection with nothing outstanding on it back to `pool`.
pub(crate) fn checkin(pool: Option<&ConnPool>, addr: SocketAddr, sock: TcpStream, id: String) {
    if let Some(p) = pool {
        if let Ok(s) = sock.into_std() {
            p.put(addr, s, id);
        }
    }
}
