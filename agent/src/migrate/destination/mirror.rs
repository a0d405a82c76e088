//! `OpenMirror`: the NBD export the source QEMU's disk mirror writes to
//! once the pre-copy has converged ([`crate::migrate::nbd`] over the image
//! writer's [`MirrorSink`]), and, in the pause's `Verify`, the chunks it
//! wrote hashed again from the image.
//!
//! The listener binds only the address the source reached this edge at,
//! takes one connection, only from the source's address, and serves the
//! export only under a name drawn at random for this migration. The stream
//! itself is plaintext until the cluster's TLS covers it (issue 21).

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::incoming::Incoming;
use crate::migrate::image_writer::MirrorSink;
use crate::migrate::nbd::{self, ServeStats};
use crate::migrate::MigrateError;
use crate::vm;

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
    nbd::serve(s, export, sink).map_err(|e| e.to_string())
}

impl Incoming {
    /// Opens the export on `local_ip` for the source at `source`; returns
    /// its address and name.
    pub(super) fn open_mirror(
        &mut self,
        local_ip: IpAddr,
        source: IpAddr,
    ) -> Result<(String, String), MigrateError> {
        if self.mirror.is_some() {
            return Err(MigrateError::State(
                "the disk mirror's export is open already".into(),
            ));
        }
        let l = TcpListener::bind((local_ip, 0))
            .map_err(|e| MigrateError::Channel(format!("disk mirror export: {e}")))?;
        l.set_nonblocking(true)
            .map_err(|e| MigrateError::Channel(e.to_string()))?;
        let addr: SocketAddr = l.local_addr().map_err(|e| MigrateError::Channel(e.to_string()))?;
        let export = hex::encode(rand::random::<[u8; 16]>());
        let sink = self.writer.mirror_sink();
        let stop = Arc::new(AtomicBool::new(false));
        let conn = Arc::new(Mutex::new(None));
        let (stop2, conn2, name) = (Arc::clone(&stop), Arc::clone(&conn), export.clone());
        let thread = std::thread::spawn(move || accept_and_serve(l, source, &name, &sink, &stop2, &conn2));
        self.mirror = Some(MirrorServer {
            stop,
            conn,
            thread: Some(thread),
        });
        tracing::info!(vm = %self.spec.name, %addr, %source, "disk mirror export open");
        Ok((addr.to_string(), export))
    }

    /// In the pause's `Verify`: refuses the mirror's writes from now on and
    /// sets what the image holds at every chunk the mirror wrote, read back
    /// from the image (synced by the caller); returns their count and the
    /// mirror's bytes.
    pub(super) fn settle_mirror(&mut self) -> Result<(usize, u64), MigrateError> {
        if self.mirror.is_none() {
            return Ok((0, 0));
        }
        let (touched, bytes) = self.writer.close_mirror()?;
        let (file, path) = (&self.file, &self.image_path);
        let (cs, size) = (self.chunk_size, self.image_size);
        let hashed = crate::par::map_in_parts(&touched, 8, 4, |&i| {
            vm::image::read_chunk(file, path, cs, size, i).map(|d| vm::image::fingerprint_chunk(&d))
        });
        for (&i, fp) in touched.iter().zip(hashed) {
            self.current[i] =
                fp.ok_or_else(|| MigrateError::State("hashing the mirrored chunks stopped".into()))??;
        }
        Ok((touched.len(), bytes))
    }
}
