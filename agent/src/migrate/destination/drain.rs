//! Stopping the destination side cleanly: the agent's shutdown cuts every
//! open control connection, so each session ends as if its source had hung
//! up — an incoming VM that has not switched over is torn down (the VM
//! stays at its source, whose migrate command rolls back) and one that has
//! is kept — then waits for the connection threads to finish that.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The control connections open now.
#[derive(Debug)]
pub struct Connections {
    inner: Mutex<Open>,
    changed: Condvar,
    /// Turns true at shutdown: a pull in progress stops waiting for its
    /// fetch (chunk files are renamed into place whole, so the store keeps
    /// only complete chunks).
    stop: tokio::sync::watch::Sender<bool>,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            inner: Mutex::default(),
            changed: Condvar::new(),
            stop: tokio::sync::watch::Sender::new(false),
        }
    }
}

#[derive(Debug, Default)]
struct Open {
    stopping: bool,
    next: u64,
    conns: HashMap<u64, TcpStream>,
}

/// One registered connection; dropping it (its thread is done) unregisters it.
pub struct Registered {
    owner: Arc<Connections>,
    id: u64,
}

impl Connections {
    fn lock(&self) -> MutexGuard<'_, Open> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection about to be served; `None` once stopping
    /// (the caller drops it unserved) or if the socket cannot be cloned.
    pub fn register(self: &Arc<Self>, conn: &TcpStream) -> Option<Registered> {
        let clone = conn.try_clone().ok()?;
        let mut open = self.lock();
        if open.stopping {
            return None;
        }
        let id = open.next;
        open.next += 1;
        open.conns.insert(id, clone);
        Some(Registered {
            owner: Arc::clone(self),
            id,
        })
    }

    /// Resolves once the agent is stopping.
    pub fn stopping(&self) -> impl std::future::Future<Output = ()> + use<> {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|stopping| *stopping).await;
        }
    }

    /// Refuses new connections, cuts the open ones, ends the pulls in
    /// progress and waits up to `wait` for their threads to finish; returns
    /// how many were still running.
    pub fn shut_down(&self, wait: Duration) -> usize {
        let _ = self.stop.send(true);
        let mut open = self.lock();
        open.stopping = true;
        for c in open.conns.values() {
            let _ = c.shutdown(Shutdown::Both);
        }
        let deadline = Instant::now() + wait;
        while !open.conns.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            open = self
                .changed
                .wait_timeout(open, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        open.conns.len()
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.owner.lock().conns.remove(&self.id);
        self.owner.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn shutting_down_cuts_open_connections_waits_for_them_and_refuses_new_ones() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).expect("connect");
        let (server, _) = l.accept().expect("accept");
        let conns = Arc::new(Connections::default());
        let reg = conns.register(&server).expect("registered");
        let t = std::thread::spawn(move || {
            let mut server = server;
            // Blocks until the shutdown cuts the socket.
            let n = server.read(&mut [0u8; 8]).unwrap_or(0);
            drop(reg);
            n
        });
        assert_eq!(conns.shut_down(Duration::from_secs(10)), 0);
        assert_eq!(t.join().expect("thread"), 0, "the read ended at the cut");
        let late = TcpStream::connect(addr).expect("connect");
        assert!(conns.register(&late).is_none());
    }
}
