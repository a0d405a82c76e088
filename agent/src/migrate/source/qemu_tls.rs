//! The source QEMU's TLS (issue 21): its `tls-creds-x509` object (client
//! endpoint, this edge's cluster certificate) for the memory stream and
//! the disk mirror's NBD client, both checking that the destination's
//! certificate names the edge the control channel authenticated.
//! The destination's side is `destination/incoming_qemu.rs`.

use super::session::Session;
use crate::migrate::MigrateError;
use crate::vm::qmp::{MigrationTls, NbdTls};
use crate::vm::tls::{creds_dir, TlsEndpoint, TLS_CREDS_ID};
use crate::vm::{Qmp, StateDir};

impl Session<'_> {
    /// Adds the credentials to the source QEMU and names them, with the
    /// destination's edge name, for the next migration and the mirror's
    /// NBD node. Nothing without credentials (`--insecure-plaintext`).
    pub(super) fn secure_qemu(&mut self, qmp: &mut dyn Qmp) -> Result<(), MigrateError> {
        let Some(creds) = self.opts.trust.credentials().cloned() else {
            tracing::warn!("QEMU's memory stream and disk mirror go in plaintext (--insecure-plaintext)");
            return Ok(());
        };
        let vm_dir = StateDir::new(&self.opts.state_dir).vm_dir(&self.opts.name)?;
        let dir = creds_dir(&vm_dir, creds.files())?;
        // An earlier handoff that failed where no rollback reached may
        // have left the object behind; its files are the same.
        if qmp.object_del(TLS_CREDS_ID).is_ok() {
            tracing::debug!("an earlier TLS object removed from the source QEMU");
        }
        qmp.add_tls_creds(TLS_CREDS_ID, &dir, TlsEndpoint::Client)?;
        self.qemu_tls_added = true;
        let hostname = self.dest()?.peer_name().to_string();
        qmp.migrate_set_tls(&MigrationTls {
            creds: TLS_CREDS_ID.into(),
            hostname: Some(hostname.clone()),
            authz: None,
        })?;
        tracing::info!(destination = %hostname, "source QEMU: memory and disk mirror over TLS");
        self.nbd_tls = Some(NbdTls {
            creds: TLS_CREDS_ID.into(),
            hostname,
        });
        Ok(())
    }

    /// Rollback: the source QEMU's migration back to no TLS and the
    /// credentials object removed (the VM stays here; a later handoff adds
    /// them again).
    pub(super) fn drop_qemu_tls(&mut self, qmp: &mut dyn Qmp) {
        if !std::mem::take(&mut self.qemu_tls_added) {
            return;
        }
        if let Err(e) = qmp.migrate_set_tls(&MigrationTls::default()) {
            tracing::warn!(error = %e, "source QEMU's migration TLS not reset");
        }
        if let Err(e) = qmp.object_del(TLS_CREDS_ID) {
            tracing::warn!(error = %e, "source QEMU's TLS object not removed");
        }
    }
}
