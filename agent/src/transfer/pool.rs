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
use std::net::SocketAddr;
use std::sync::Mutex;

use super::dial::{connect, DialOptions};
use super::stream::PeerStream;
use super::trust::Trust;
use super::TransferError;

/// Idle, authenticated connections by peer address, with the peer's name.
/// They stay registered with the runtime that opened them: the pool serves
/// one runtime (the agent's, or one `edgeshift migrate`'s).
#[derive(Debug, Default)]
pub struct ConnPool {
    idle: Mutex<HashMap<SocketAddr, Vec<(PeerStream, String)>>>,
}

impl ConnPool {
    pub fn new() -> Self {
        Self::default()
    }

    /// An idle connection to `addr` the peer has not closed meanwhile (a
    /// closed one, or one with bytes nobody asked for, is dropped).
    fn take(&self, addr: &SocketAddr) -> Option<(PeerStream, String)> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(addr)?;
        while let Some((sock, id)) = list.pop() {
            if sock.is_idle_and_open() {
                return Some((sock, id));
            }
        }
        None
    }

    fn put(&self, addr: SocketAddr, sock: PeerStream, id: String) {
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
    trust: &Trust,
    opts: &DialOptions,
) -> Result<(PeerStream, String), TransferError> {
    if let Some(found) = pool.and_then(|p| p.take(&addr)) {
        return Ok(found);
    }
    connect(addr, trust, opts).await
}

/// Gives a connection with nothing outstanding on it back to `pool`.
pub(crate) fn checkin(pool: Option<&ConnPool>, addr: SocketAddr, sock: PeerStream, id: String) {
    if let Some(p) = pool {
        p.put(addr, sock, id);
    }
}
