//! `Prepare`: claim the VM's name, create its sparse image, count what the
//! store lacks and, with a coordinator, ask it for the plan (step 1).

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::sync::Arc;

use edgeshift_common::{Fingerprint, Manifest};

use super::context::Host;
use super::incoming::{io, Incoming};
use crate::migrate::coord::plan_incoming;
use crate::migrate::image_writer::ImageWriter;
use crate::migrate::proto::Response;
use crate::migrate::MigrateError;
use crate::store::ChunkStore;
use crate::transfer::fetch::basis;
use crate::transfer::pool::ConnPool;
use crate::vm::{self, MemoryTransport, VmSpec};

/// Makes the destination half of `spec`, whose disk is `manifest`, and
/// the `Prepared` answer.
pub(super) fn prepare(
    host: &Arc<Host>,
    spec: VmSpec,
    manifest: &Manifest,
) -> Result<(Incoming, Response), MigrateError> {
    vm::check_name(&spec.name)?;
    if host.state.exists(&spec.name)? {
        return Err(MigrateError::State(format!(
            "a VM named {} already runs on this edge",
            spec.name
        )));
    }
    if !host.mark(&spec.name)? {
        return Err(MigrateError::State(format!(
            "{} is already being received",
            spec.name
        )));
    }
    let dir = host.state.vm_dir(&spec.name)?;
    let made = (|| {
        std::fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
        let image_path = dir.join("disk.raw");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&image_path)
            .map_err(io("create", &image_path))?;
        file.set_len(manifest.image_size)
            .map_err(io("size", &image_path))?;
        // Sparse: preallocated (unwritten) extents made round 0's local
        // writes slower (docs/migration.md, "The destination").
        Ok::<_, MigrateError>((image_path, file))
    })();
    let (image_path, file) = match made {
        Ok(x) => x,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            host.unmark(&spec.name);
            return Err(e);
        }
    };
    let mut missing_chunks = 0;
    let mut missing_bytes = 0;
    let mut seen = HashSet::new();
    let mut held_at_prepare = HashSet::new();
    for (i, fp) in manifest.chunks.iter().enumerate() {
        if fp.is_zero_chunk() || !seen.insert(*fp) {
            continue;
        }
        if host.store.has_chunk(fp)? {
            held_at_prepare.insert(*fp);
        } else {
            missing_chunks += 1;
            missing_bytes += manifest.chunk_len(i);
        }
    }
    let local_chunks = held_at_prepare.len() as u64;
    // What this edge holds of the disk's earlier versions (a warm
    // destination): the chunks round 0 fetches are asked for as deltas
    // against the boot image's chunk at their place where held here, else
    // against the nearest other version's.
    let near = match basis::nearest_manifest(&host.store, manifest) {
        Ok(near) => near.map(|(_, m)| m.chunks),
        Err(e) => {
            tracing::warn!(vm = %spec.name, error = %e, "no other version as delta basis (the manifests could not be read)");
            None
        }
    };
    let basis: Vec<Fingerprint> = manifest
        .chunks
        .iter()
        .enumerate()
        .map(|(i, fp)| match &near {
            _ if held_at_prepare.contains(fp) => *fp,
            Some(near) => near[i],
            None => Fingerprint::ZERO_CHUNK,
        })
        .collect();
    tracing::info!(vm = %spec.name, missing_chunks, missing_bytes, local_chunks, "prepared incoming VM");
    let writer = ImageWriter::new(
        file.try_clone().map_err(io("open", &image_path))?,
        image_path.clone(),
        Arc::clone(&host.store),
        manifest.chunk_size,
        manifest.image_size,
    );
    let mut inc = Incoming {
        host: Arc::clone(host),
        writer,
        chunk_size: manifest.chunk_size,
        image_size: manifest.image_size,
        current: vec![Fingerprint::ZERO_CHUNK; manifest.chunks.len()],
        held_at_prepare,
        basis,
        spec,
        image_path,
        dir,
        file,
        loop_dev: None,
        starting: None,
        qemu: None,
        memory: MemoryTransport::Plain,
        uri: None,
        finished: false,
        plan: None,
        after: None,
        conns: Arc::new(ConnPool::new()),
        mirror: None,
    };
    if let Some(c) = &host.cfg.coordinator {
        // On error `inc` is dropped, which tears this half down again.
        inc.plan = Some(plan_incoming(c, &host.store, manifest)?);
    }
    let plan = inc.plan.as_ref().map(|p| p.summary.clone());
    Ok((
        inc,
        Response::Prepared {
            missing_chunks,
            missing_bytes,
            local_chunks,
            plan,
        },
    ))
}
