//! What a destination needs and shares between its connections: the
//! configuration, the store, the VM records and the names being received.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::drain::Connections;
use crate::migrate::coord::CoordConfig;
use crate::migrate::MigrateError;
use crate::store::LocalStore;
use crate::transfer::Trust;
use crate::vm::{Qemu, StateDir};

/// What a destination needs.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub state_dir: PathBuf,
    /// How sources and peers authenticate (the cluster credentials).
    pub trust: Trust,
    /// This edge's name (its certificate's, under TLS).
    pub id: String,
    pub qemu: Qemu,
    /// The coordinator that plans incoming VMs' sources and counts their
    /// references; without one the pulls use the holders the source names.
    pub coordinator: Option<CoordConfig>,
}

/// The destination side of this edge, shared by its control connections.
#[derive(Debug)]
pub struct Host {
    pub(super) cfg: HostConfig,
    pub(super) store: Arc<LocalStore>,
    pub(super) state: StateDir,
    /// The agent's runtime: pulls await the fetcher on it.
    pub(super) runtime: tokio::runtime::Handle,
    /// Names of VMs being received right now.
    receiving: Mutex<HashSet<String>>,
    /// The control connections open now (cut at shutdown).
    pub(super) connections: Arc<Connections>,
}

impl Host {
    /// Receives into `store` (the daemon's own, shared with its chunk
    /// server); pulls run on `runtime`. Does not touch VMs (see
    /// [`super::open`], which also removes what a crash left).
    pub fn new(cfg: HostConfig, store: Arc<LocalStore>, runtime: tokio::runtime::Handle) -> Self {
        let state = StateDir::new(&cfg.state_dir);
        Host {
            cfg,
            store,
            state,
            runtime,
            receiving: Mutex::new(HashSet::new()),
            connections: Arc::default(),
        }
    }

    /// The agent is stopping: refuses new migrations and ends the incoming
    /// ones (torn down unless switched over, see [`super::drain`]), waiting
    /// up to `wait`. Returns how many had not ended by then.
    pub fn shut_down(&self, wait: std::time::Duration) -> usize {
        self.connections.shut_down(wait)
    }

    /// Claims `name` for one incoming migration; false if it is already
    /// being received.
    pub(super) fn mark(&self, name: &str) -> Result<bool, MigrateError> {
        let mut r = self
            .receiving
            .lock()
            .map_err(|_| MigrateError::State("host state poisoned".into()))?;
        Ok(r.insert(name.to_string()))
    }

    pub(super) fn unmark(&self, name: &str) {
        if let Ok(mut r) = self.receiving.lock() {
            r.remove(name);
        }
    }
}
