//! `StartIncoming` and `AwaitIncoming`: the destination QEMU, started in
//! the background with `-incoming defer` while the disk rounds go on, and
//! the wait for it to listen for the memory stream.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::incoming::Incoming;
use crate::migrate::MigrateError;
use crate::vm::loopdev::LoopDevice;
use crate::vm::qmp::MigrationTls;
use crate::vm::tls::{authz_identity, creds_dir, TlsEndpoint, TLS_AUTHZ_ID, TLS_CREDS_ID};
use crate::vm::{self, Hypervisor, LaunchConfig, Launched, MemoryTransport, Qemu, Qmp, QmpClient};

impl Incoming {
    /// Starts the destination QEMU in the background (`-incoming defer`,
    /// the memory transport set over QMP, then `migrate-incoming`), so its
    /// start-up overlaps the disk rounds. QEMU reads nothing of the disk
    /// before the switchover, and `verify` syncs the image before that.
    pub(super) fn start(
        &mut self,
        ip: std::net::IpAddr,
        memory: MemoryTransport,
        source: &str,
    ) -> Result<String, MigrateError> {
        if self.qemu.is_some() || self.starting.is_some() {
            return Err(MigrateError::State("QEMU already started for this VM".into()));
        }
        let dev = LoopDevice::attach(&self.image_path)?;
        let port = {
            let l = TcpListener::bind((ip, 0))
                .map_err(|e| MigrateError::Channel(format!("no free port: {e}")))?;
            l.local_addr()
                .map_err(|e| MigrateError::Channel(e.to_string()))?
                .port()
        };
        let uri = format!("tcp:{ip}:{port}");
        let cfg = LaunchConfig {
            spec: self.spec.clone(),
            disk: dev.path().to_path_buf(),
            run_dir: self.dir.clone(),
            incoming: Some("defer".into()),
        };
        let qemu = self.host.cfg.qemu.clone();
        let tls = match self.host.cfg.trust.credentials() {
            Some(c) => Some(IncomingTls {
                dir: creds_dir(&self.dir, c.files())?,
                source_dn: authz_identity(source),
            }),
            None => {
                tracing::warn!(vm = %self.spec.name, "incoming memory in plaintext, from any host (--insecure-plaintext)");
                None
            }
        };
        let listen = uri.clone();
        let (dir, chunk_size) = (self.dir.clone(), self.chunk_size.bytes());
        self.starting = Some(std::thread::spawn(move || {
            // The boot log counts from before QEMU starts: nothing writes
            // through the loop device until the VM resumes here, so once
            // `Verify` has passed it logs the writes since the manifest the
            // VM arrived as. (Loading the BPF program is slow: here, off the
            // answer's path.)
            if let Err(e) = crate::dirty::boot_log::start(&dir, &cfg.disk, chunk_size) {
                tracing::warn!(vm = %cfg.spec.name, error = %e, "no boot log: a migration of this VM from here slices its disk");
            }
            start_incoming_qemu(&qemu, &cfg, &listen, memory, tls.as_ref())
        }));
        self.loop_dev = Some(dev);
        self.uri = Some(uri.clone());
        Ok(uri)
    }

    /// Waits for the background start; its error, if any, is this answer's.
    pub(super) fn await_started(&mut self) -> Result<(String, MemoryTransport), MigrateError> {
        if let Some(h) = self.starting.take() {
            let (launched, memory) = h
                .join()
                .map_err(|_| MigrateError::State("destination QEMU start panicked".into()))??;
            self.qemu = Some(launched);
            self.memory = memory;
            // Memory starts now and takes seconds: flush what the pre-copy
            // wrote meanwhile.
            self.flush_in_background();
        }
        match (&self.qemu, &self.uri) {
            (Some(_), Some(uri)) => Ok((uri.clone(), self.memory)),
            _ => Err(MigrateError::State("AwaitIncoming before StartIncoming".into())),
        }
    }

    /// Starts writing the image's dirty pages back, in a thread of its own
    /// (submitting hundreds of MB of writes blocks while the device queue is
    /// full), without waiting for them and without the journal commit an
    /// fsync forces on everything else on this file system. So the pause's
    /// `Verify` (downtime) only syncs what the last rounds wrote
    /// (docs/migration.md, "The destination"). Best effort.
    fn flush_in_background(&self) {
        match self.file.try_clone() {
            Ok(f) => {
                std::thread::spawn(move || crate::store::local::start_writeback(&f));
            }
            Err(e) => tracing::debug!(error = %e, "no background image writeback"),
        }
    }
}

/// The destination QEMU's TLS for the memory stream: its credentials'
/// directory and the one certificate name it takes the stream from.
struct IncomingTls {
    dir: PathBuf,
    source_dn: String,
}

/// Sets `tls` up on a QEMU about to listen: the credentials (server
/// endpoint: the source must present a certificate under the cluster CA)
/// and an `authz-simple` that lets only the source's certificate in, so a
/// stream from any other host, even another edge of the cluster, is
/// refused before QEMU reads a byte of it.
pub(super) fn secure_incoming(q: &mut dyn Qmp, dir: &Path, source_dn: &str) -> Result<(), MigrateError> {
    q.add_tls_creds(TLS_CREDS_ID, dir, TlsEndpoint::Server)?;
    q.add_authz(TLS_AUTHZ_ID, source_dn)?;
    q.migrate_set_tls(&MigrationTls {
        creds: TLS_CREDS_ID.into(),
        hostname: None,
        authz: Some(TLS_AUTHZ_ID.into()),
    })?;
    Ok(())
}

/// Launches QEMU waiting with `-incoming defer`, sets the memory transport
/// (falling back to plain migration, with a log line, when this QEMU lacks
/// multifd or zstd) and, with `tls`, the memory stream's TLS, then listens
/// on `uri`. A QEMU that started but could not be set up is stopped again.
fn start_incoming_qemu(
    qemu: &Qemu,
    cfg: &LaunchConfig,
    uri: &str,
    memory: MemoryTransport,
    tls: Option<&IncomingTls>,
) -> Result<(Launched, MemoryTransport), MigrateError> {
    let launched = qemu.launch(cfg)?;
    let set_up = (|| -> Result<MemoryTransport, MigrateError> {
        let mut q = QmpClient::connect(&launched.qmp_socket, Duration::from_secs(5))?;
        if let Some(t) = tls {
            secure_incoming(&mut q, &t.dir, &t.source_dn)?;
        }
        let applied = match q.set_memory_transport(memory) {
            Ok(()) => memory,
            Err(e) => {
                tracing::warn!(error = %e, ?memory, "this QEMU cannot take that memory transport; falling back to plain migration");
                q.set_memory_transport(MemoryTransport::Plain)?;
                MemoryTransport::Plain
            }
        };
        q.migrate_incoming(uri)?;
        Ok(applied)
    })();
    match set_up {
        Ok(applied) => {
            tracing::info!(vm = %cfg.spec.name, %uri, memory = ?applied, "destination QEMU listens");
            Ok((launched, applied))
        }
        Err(e) => {
            if let Err(k) = qemu.kill(launched.pid, &launched.qmp_socket) {
                tracing::warn!(error = %k, "destination QEMU not stopped");
            }
            if cfg.spec.net.is_some() {
                vm::qemu::remove_tap(&cfg.spec.name);
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::qmp::fake::FakeQmp;

    #[test]
    fn the_incoming_qemu_takes_memory_only_over_tls_from_the_source() {
        let mut q = FakeQmp::running();
        let dn = authz_identity("edge-src");
        secure_incoming(&mut q, Path::new("/run/vm/tls"), &dn).expect("secured");
        assert_eq!(
            q.calls(),
            [
                format!("object-add tls-creds-x509 {TLS_CREDS_ID} endpoint=server dir=/run/vm/tls"),
                format!("object-add authz-simple {TLS_AUTHZ_ID} identity=O=edgeshift,OU=edge,CN=edge-src"),
                format!(
                    "migrate-set-parameters tls-creds={TLS_CREDS_ID} tls-hostname=- tls-authz={TLS_AUTHZ_ID}"
                ),
            ]
        );
    }
}
