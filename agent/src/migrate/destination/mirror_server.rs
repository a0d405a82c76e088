//! The disk mirror's NBD export as it runs: the thread that accepts the
//! source's one connection (only from the source's address) and serves it
//! ([`crate::migrate::nbd`]) into the image writer's [`MirrorSink`], and how
//! it is stopped.

use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::migrate::image_writer::MirrorSink;
use crate::migrate::nbd::{self, ExportTls, ServeStats};

/// Longest the source may take to connect once the export is open.
const CONNECT_WAIT: Duration = Duration::from_secs(60);
const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// The export's thread and how to stop it.
pub(super) struct MirrorServer {
    stop: Arc<AtomicBool>,
    /// The source's connection once accepted (shut down to stop serving).
    conn: Arc<Mutex<Option<TcpStream>>>,
    thread: Option<JoinHandle<Result<ServeStats, String>>>,
}

impl MirrorServer {
    /// Serves `export` on `l` to the first connection from `source`, on a
    /// thread of its own; with `tls`, only over TLS to the certificate it
    /// names.
    pub(super) fn spawn(
        l: TcpListener,
        source: IpAddr,
        export: String,
        sink: MirrorSink,
        tls: Option<ExportTls>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let conn = Arc::new(Mutex::new(None));
        let (stop2, conn2) = (Arc::clone(&stop), Arc::clone(&conn));
        let thread = std::thread::spawn(move || {
            accept_and_serve(l, source, &export, &sink, tls.as_ref(), &stop2, &conn2)
        });
        MirrorServer {
            stop,
            conn,
            thread: Some(thread),
        }
    }

    /// Stops serving: the connection is shut down, the thread joined.
    pub(super) fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Ok(c) = self.conn.lock() {
            if let Some(s) = c.as_ref() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Ok(stats)) => tracing::info!(
                    writes = stats.writes,
                    bytes = stats.bytes_written,
                    flushes = stats.flushes,
                    "disk mirror export closed"
                ),
                Ok(Err(e)) => tracing::info!(error = %e, "disk mirror export ended"),
                Err(_) => tracing::warn!("disk mirror export thread panicked"),
            }
        }
    }
}

impl Drop for MirrorServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Accepts the source's connection (others are closed at once) and serves
/// it until it ends.
fn accept_and_serve(
    l: TcpListener,
    source: IpAddr,
    export: &str,
    sink: &MirrorSink,
    tls: Option<&ExportTls>,
    stop: &AtomicBool,
    conn: &Mutex<Option<TcpStream>>,
) -> Result<ServeStats, String> {
    let deadline = Instant::now() + CONNECT_WAIT;
    let s = loop {
        if stop.load(Ordering::Acquire) {
            return Err("stopped before the source connected".into());
        }
        match l.accept() {
            Ok((s, from)) if from.ip() == source => break s,
            Ok((_, from)) => {
                tracing::warn!(%from, %source, "disk mirror export: refused a connection not from the source");
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err("the source did not connect".into());
                }
                std::thread::sleep(ACCEPT_POLL);
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    drop(l);
    s.set_nonblocking(false).map_err(|e| e.to_string())?;
    if let Ok(mut c) = conn.lock() {
        *c = s.try_clone().ok();
    }
    if stop.load(Ordering::Acquire) {
        return Err("stopped".into());
    }
    nbd::serve(s, export, sink, tls).map_err(|e| {
        if matches!(e, nbd::NbdError::Refused(_) | nbd::NbdError::Tls(_)) {
            tracing::warn!(error = %e, "disk mirror export: client refused");
        }
        e.to_string()
    })
}
