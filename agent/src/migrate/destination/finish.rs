//! `Finish`: the switchover is done; wait for the VM to run here, announce
//! it on its network and record it as this edge's own.

use std::time::{Duration, Instant};

use edgeshift_common::Manifest;

use super::incoming::Incoming;
use crate::migrate::MigrateError;
use crate::vm::{Launched, QmpClient, VmRecord};

impl Incoming {
    pub(super) fn finish(&mut self) -> Result<(), MigrateError> {
        if self.starting.is_some() {
            self.await_started()?;
        }
        let launched = self
            .qemu
            .clone()
            .ok_or_else(|| MigrateError::State("Finish before QEMU started".into()))?;
        let mut q = QmpClient::connect(&launched.qmp_socket, Duration::from_secs(5))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = q.query_status()?;
            if st.running {
                break;
            }
            if Instant::now() > deadline {
                return Err(MigrateError::Memory(format!(
                    "destination VM is {} after the switchover",
                    st.status
                )));
            }
            // The handoff ends when this notices the VM running: poll tightly.
            std::thread::sleep(Duration::from_millis(5));
        }
        q.announce_self()?;
        self.adopt(&launched)?;
        if self.mirror.is_some() {
            self.sync_in_background();
        }
        Ok(())
    }

    /// Syncs the image on a thread of its own (the pause's `Verify` did
    /// not, beside a mirror); a failure is logged: the VM runs by then.
    fn sync_in_background(&self) {
        let (file, path) = match self.file.try_clone() {
            Ok(f) => (f, self.image_path.clone()),
            Err(e) => {
                tracing::warn!(error = %e, "image not synced after the switchover");
                return;
            }
        };
        std::thread::spawn(move || {
            let t = Instant::now();
            match file.sync_all() {
                Ok(()) => tracing::info!(
                    seconds = t.elapsed().as_secs_f64(),
                    "image synced after the switchover"
                ),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "image sync after the switchover failed")
                }
            }
        });
    }

    /// Records the VM as this edge's own and keeps its loop device.
    pub(super) fn adopt(&mut self, launched: &Launched) -> Result<(), MigrateError> {
        let manifest = Manifest::new(self.chunk_size, self.image_size, self.current.clone());
        let rec = VmRecord {
            spec: self.spec.clone(),
            pid: launched.pid,
            accel: launched.accel,
            qmp_socket: launched.qmp_socket.clone(),
            loop_device: self
                .loop_dev
                .take()
                .map(|d| d.keep())
                .ok_or_else(|| MigrateError::State("no loop device".into()))?,
            image_path: self.image_path.clone(),
            manifest_id: manifest.id().to_hex(),
            store: self.host.store.root().to_path_buf(),
            started_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            // The source's choice does not travel with the VM.
            autostart: false,
            stopped: false,
        };
        self.host.state.save(&rec)?;
        self.finished = true;
        if let Some(p) = self.plan.take() {
            self.after = Some(p.switched_over(&self.host.store, &manifest));
        }
        tracing::info!(vm = %self.spec.name, pid = launched.pid, "incoming VM runs here now");
        Ok(())
    }
}
