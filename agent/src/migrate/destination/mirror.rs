//! `OpenMirror`: the NBD export the source QEMU's disk mirror writes to
//! once the pre-copy has converged (served by [`MirrorServer`] into the
//! image writer's mirror sink), and, in the pause's `Verify`, the chunks it
//! wrote hashed again from the image.
//!
//! The listener binds only the address the source reached this edge at,
//! takes one connection, only from the source's address, and serves the
//! export only under a name drawn at random for this migration; with the
//! cluster's credentials, only over TLS to the source edge's certificate
//! (`migrate/nbd/tls.rs`).

use std::net::{IpAddr, SocketAddr, TcpListener};

use super::incoming::Incoming;
use super::mirror_server::MirrorServer;
use crate::migrate::nbd::ExportTls;
use crate::migrate::MigrateError;
use crate::vm;

impl Incoming {
    /// Opens the export on `local_ip` for the source at `source`, the edge
    /// `source_name` (over TLS, its certificate only, unless this edge runs
    /// `--insecure-plaintext`); returns its address and name.
    pub(super) fn open_mirror(
        &mut self,
        local_ip: IpAddr,
        source: IpAddr,
        source_name: &str,
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
        let tls = self.host.cfg.trust.credentials().map(|c| ExportTls {
            config: c.server_config(),
            client: Some(source_name.to_string()),
        });
        let over_tls = tls.is_some();
        self.mirror = Some(MirrorServer::spawn(l, source, export.clone(), sink, tls));
        tracing::info!(vm = %self.spec.name, %addr, %source, source_name, over_tls, "disk mirror export open");
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
