//! The listener every edge runs for migrations (`edgeshift vm host`): it
//! receives incoming VMs — the destination half of a migration. Chunks come
//! from the holders' chunk servers (`edgeshift agent`) through the transfer
//! module's fetcher.
//!
//! An incoming VM belongs to the control connection that prepared it. If
//! that connection ends before `Finish`, the destination half is torn down
//! (QEMU killed, tap removed, loop device detached, image deleted) — unless
//! the migration had already switched over and the VM runs here, in which
//! case it is kept and recorded, so nothing of the VM is ever lost.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgeshift_common::{Fingerprint, Manifest};

use super::image_writer::ImageWriter;
use super::proto::{self, HolderStats, PullStats, Request, Response};
use super::MigrateError;
use crate::store::{ChunkStore, LocalStore};
use crate::transfer::fetch::{ChunkWant, FetchOptions, Fetcher};
use crate::transfer::pool::ConnPool;
use crate::transfer::ClusterKey;
use crate::vm::loopdev::LoopDevice;
use crate::vm::{
    self, Hypervisor, LaunchConfig, Launched, MemoryTransport, Qemu, QmpClient, StateDir, VmRecord, VmSpec,
};

/// What a host needs.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub store: PathBuf,
    pub state_dir: PathBuf,
    pub key: [u8; 32],
    /// This edge's name in handshakes.
    pub id: String,
    pub qemu: Qemu,
    /// The coordinator that plans incoming VMs' sources and counts their
    /// references; without one the pulls use the holders the source names.
    pub coordinator: Option<super::coord::CoordConfig>,
}

/// A running host.
#[derive(Debug)]
pub struct Host {
    cfg: HostConfig,
    store: Arc<LocalStore>,
    state: StateDir,
    /// Names of VMs being received right now.
    receiving: Mutex<HashSet<String>>,
}

/// The destination half of one migration.
struct Incoming<'h> {
    host: &'h Host,
    spec: VmSpec,
    chunk_size: edgeshift_common::ChunkSize,
    image_size: u64,
    /// What the image file holds now, per chunk.
    current: Vec<Fingerprint>,
    /// Chunks of the boot manifest this edge's store held at Prepare: a
    /// Pull does not look them up again (2,900 lookups were 0.02 s before
    /// round 0's fetch could start).
    held_at_prepare: HashSet<Fingerprint>,
    image_path: PathBuf,
    dir: PathBuf,
    file: File,
    /// Writes the pulled chunks into `file` in the background.
    writer: ImageWriter,
    loop_dev: Option<LoopDevice>,
    /// The destination QEMU being started in the background (StartIncoming).
    starting: Option<std::thread::JoinHandle<Result<(Launched, MemoryTransport), MigrateError>>>,
    /// Set once `starting` is joined.
    qemu: Option<Launched>,
    memory: MemoryTransport,
    uri: Option<String>,
    finished: bool,
    /// The coordinator's plan for this VM (step 1) and the pin it holds.
    plan: Option<super::coord::IncomingPlan>,
    /// What step 5 did at the coordinator.
    after: Option<String>,
    /// The holders' connections, kept from one pull to the next.
    conns: Arc<ConnPool>,
}

fn io<'a>(op: &'static str, path: &'a std::path::Path) -> impl FnOnce(std::io::Error) -> MigrateError + 'a {
    move |source| MigrateError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl Host {
    pub fn new(cfg: HostConfig) -> Result<Self, MigrateError> {
        let store = Arc::new(LocalStore::open_or_create(&cfg.store)?);
        let state = StateDir::new(&cfg.state_dir);
        let host = Host {
            cfg,
            store,
            state,
            receiving: Mutex::new(HashSet::new()),
        };
        host.remove_stale_incoming();
        Ok(host)
    }

    /// A host that died while receiving a VM leaves a VM directory without a
    /// record: its QEMU never switched over (the record is written at the
    /// switchover), so that half is torn down here.
    fn remove_stale_incoming(&self) {
        let Ok(entries) = std::fs::read_dir(self.state.root()) else {
            return;
        };
        for e in entries.flatten() {
            let dir = e.path();
            if !dir.is_dir() || dir.join("vm.json").exists() || !dir.join("disk.raw").exists() {
                continue;
            }
            let name = e.file_name().to_string_lossy().to_string();
            tracing::warn!(vm = %name, "removing the half of an incoming VM left by a crash");
            if let Some(pid) = std::fs::read_to_string(dir.join("qemu.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
            {
                let _ = self.cfg.qemu.kill(pid, &dir.join("qmp.sock"));
            }
            vm::qemu::remove_tap(&name);
            crate::dirty::boot_log::stop_or_warn(&dir);
            vm::loopdev::detach_backing(&dir.join("disk.raw"));
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "stale incoming VM not removed");
            }
        }
    }

    /// Accepts connections forever, one thread each.
    pub fn serve(self: Arc<Self>, listener: TcpListener) -> Result<(), MigrateError> {
        tracing::info!(addr = ?listener.local_addr().ok(), id = %self.cfg.id, "migration host listening");
        self.cfg.qemu.probe_ahead();
        for conn in listener.incoming() {
            let s = match conn {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            };
            let host = Arc::clone(&self);
            std::thread::spawn(move || {
                let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                if let Err(e) = host.handle(s) {
                    tracing::info!(peer = %peer, error = %e, "control connection ended");
                }
            });
        }
        Ok(())
    }

    fn handle(&self, mut s: TcpStream) -> Result<(), MigrateError> {
        let _ = s.set_nodelay(true);
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| MigrateError::Channel(e.to_string()))?;
        let peer = proto::accept_auth(&mut s, &self.cfg.key, &self.cfg.id)?;
        // A migration can sit between requests while QEMU moves memory.
        s.set_read_timeout(None)
            .map_err(|e| MigrateError::Channel(e.to_string()))?;
        tracing::debug!(peer = %peer, "peer authenticated");
        let mut incoming: Option<Incoming> = None;
        loop {
            let req: Request = match proto::recv(&mut s) {
                Ok(r) => r,
                Err(MigrateError::Channel(_)) => return Ok(()),
                Err(e) => return Err(e),
            };
            let resp = match self.dispatch(req, &mut incoming, &s) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(peer = %peer, error = %e, "request failed");
                    Response::Error(e.to_string())
                }
            };
            proto::send(&mut s, &resp)?;
        }
    }

    fn dispatch<'h>(
        &'h self,
        req: Request,
        incoming: &mut Option<Incoming<'h>>,
        conn: &TcpStream,
    ) -> Result<Response, MigrateError> {
        match req {
            Request::Prepare { spec, manifest } => {
                if incoming.is_some() {
                    return Err(MigrateError::State(
                        "this connection already prepared a VM".into(),
                    ));
                }
                let manifest = Manifest::from_bytes(&manifest)?;
                let (inc, resp) = self.prepare(spec, &manifest)?;
                *incoming = Some(inc);
                Ok(resp)
            }
            Request::Pull {
                image_size,
                chunk_size,
                chunks,
                holders,
                filler,
                deltas,
            } => {
                let inc = incoming
                    .as_mut()
                    .ok_or_else(|| MigrateError::State("Pull before Prepare".into()))?;
                if u64::from(chunk_size) != inc.chunk_size.bytes() || image_size != inc.image_size {
                    return Err(MigrateError::State(
                        "the disk's geometry changed during the migration".into(),
                    ));
                }
                Ok(Response::Pulled(inc.pull(&chunks, &holders, &filler, deltas)?))
            }
            Request::StartIncoming { memory } => {
                let inc = incoming
                    .as_mut()
                    .ok_or_else(|| MigrateError::State("StartIncoming before Prepare".into()))?;
                let ip = conn
                    .local_addr()
                    .map_err(|e| MigrateError::Channel(e.to_string()))?
                    .ip();
                Ok(Response::Incoming {
                    uri: inc.start(ip, memory)?,
                    memory,
                })
            }
            Request::AwaitIncoming => {
                let inc = incoming
                    .as_mut()
                    .ok_or_else(|| MigrateError::State("AwaitIncoming before Prepare".into()))?;
                let (uri, memory) = inc.await_started()?;
                Ok(Response::Incoming { uri, memory })
            }
            Request::Verify { manifest_id, recheck } => {
                let inc = incoming
                    .as_mut()
                    .ok_or_else(|| MigrateError::State("Verify before Prepare".into()))?;
                let (ok, detail) = inc.verify(&Fingerprint(manifest_id), &recheck)?;
                Ok(Response::Verified { ok, detail })
            }
            Request::Finish => {
                let inc = incoming
                    .as_mut()
                    .ok_or_else(|| MigrateError::State("Finish before Prepare".into()))?;
                inc.finish()?;
                let coordinator = inc.after.take();
                *incoming = None;
                Ok(Response::Finished { coordinator })
            }
            Request::Abort => {
                // Dropping the incoming VM tears it down.
                *incoming = None;
                Ok(Response::Done)
            }
        }
    }

    fn prepare(&self, spec: VmSpec, manifest: &Manifest) -> Result<(Incoming<'_>, Response), MigrateError> {
        vm::check_name(&spec.name)?;
        if self.state.exists(&spec.name)? {
            return Err(MigrateError::State(format!(
                "a VM named {} already runs on this edge",
                spec.name
            )));
        }
        {
            let mut r = self
                .receiving
                .lock()
                .map_err(|_| MigrateError::State("host state poisoned".into()))?;
            if !r.insert(spec.name.clone()) {
                return Err(MigrateError::State(format!(
                    "{} is already being received",
                    spec.name
                )));
            }
        }
        let dir = self.state.vm_dir(&spec.name)?;
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
            // Sparse. (Preallocating with fallocate was measured and
            // dropped: writing the store's chunks into unwritten extents
            // made round 0's local writes 5x slower, 2.2 s against 0.44 s
            // for 720 MB.)
            Ok::<_, MigrateError>((image_path, file))
        })();
        let (image_path, file) = match made {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                self.unmark(&spec.name);
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
            if self.store.has_chunk(fp)? {
                held_at_prepare.insert(*fp);
            } else {
                missing_chunks += 1;
                missing_bytes += manifest.chunk_len(i);
            }
        }
        let local_chunks = held_at_prepare.len() as u64;
        tracing::info!(vm = %spec.name, missing_chunks, missing_bytes, local_chunks, "prepared incoming VM");
        let writer = ImageWriter::new(
            file.try_clone().map_err(io("open", &image_path))?,
            image_path.clone(),
            Arc::clone(&self.store),
            manifest.chunk_size,
            manifest.image_size,
        );
        let mut inc = Incoming {
            host: self,
            writer,
            chunk_size: manifest.chunk_size,
            image_size: manifest.image_size,
            current: vec![Fingerprint::ZERO_CHUNK; manifest.chunks.len()],
            held_at_prepare,
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
        };
        if let Some(c) = &self.cfg.coordinator {
            // On error `inc` is dropped, which tears this half down again.
            inc.plan = Some(super::coord::plan_incoming(c, &self.store, manifest)?);
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

    fn unmark(&self, name: &str) {
        if let Ok(mut r) = self.receiving.lock() {
            r.remove(name);
        }
    }
}

/// One chunk a pull fetches.
struct Fetch {
    fp: Fingerprint,
    len: u64,
    /// Fills the round's tail only (`ChunkWant::optional`).
    optional: bool,
    /// What the image held at its place (`ChunkWant::base`).
    base: Option<Fingerprint>,
}

impl Incoming<'_> {
    /// Bytes of chunk `i` (the last may be short).
    fn chunk_len(&self, i: usize) -> u64 {
        let cs = self.chunk_size.bytes();
        (self.image_size - i as u64 * cs).min(cs)
    }

    fn pull(
        &mut self,
        chunks: &[(u32, proto::Fp)],
        holders: &[String],
        filler: &[u32],
        deltas: bool,
    ) -> Result<PullStats, MigrateError> {
        let start = Instant::now();
        let filler: HashSet<u32> = filler.iter().copied().collect();
        let mut stats = PullStats::default();
        let mut wanted: HashMap<Fingerprint, Vec<usize>> = HashMap::new();
        let mut order: Vec<Fetch> = Vec::new();
        // Chunks this edge's store holds (and zero chunks) go into the image
        // in the background while the rest is fetched.
        let mut writes: Vec<(usize, Fingerprint)> = Vec::new();
        let store = &self.host.store;
        for &(i, want) in chunks {
            let i = i as usize;
            if i >= self.current.len() {
                return Err(MigrateError::Protocol(format!("chunk index {i} out of range")));
            }
            let want = Fingerprint(want);
            if self.current[i] == want {
                continue;
            }
            stats.indices_written += 1;
            if want.is_zero_chunk() {
                stats.zero_chunks += 1;
                writes.push((i, want));
            } else if let Some(v) = wanted.get_mut(&want) {
                v.push(i);
            } else if self.held_at_prepare.contains(&want) || store.has_chunk(&want)? {
                stats.local_chunks += 1;
                writes.push((i, want));
            } else {
                wanted.insert(want, vec![i]);
                order.push(Fetch {
                    fp: want,
                    len: self.chunk_len(i),
                    // Set once every index that needs it is known.
                    optional: false,
                    // What the image held where it goes: a peer holding both
                    // sends only the blocks that differ (the fetcher ignores
                    // a zero chunk as base).
                    base: deltas.then_some(self.current[i]),
                });
            }
            // What the image will hold once the writer is done: `verify`
            // waits for it first. (A fetched chunk is set once it came.)
            if !wanted.contains_key(&want) {
                self.current[i] = want;
            }
        }
        self.writer.queue(writes)?;
        let order_len = order.len();
        let mut fetch_s = 0.0;
        if !order.is_empty() {
            // A chunk is filler when every index that needs it is.
            for f in &mut order {
                f.optional = wanted
                    .get(&f.fp)
                    .is_some_and(|at| at.iter().all(|&i| filler.contains(&(i as u32))));
            }
            let t = Instant::now();
            let skipped = self.fetch_from_holders(order, holders, &mut stats)?;
            fetch_s = t.elapsed().as_secs_f64();
            for fp in &skipped {
                if let Some(at) = wanted.remove(fp) {
                    stats.skipped.extend(at.iter().map(|&i| i as u32));
                    stats.indices_written -= at.len() as u64;
                }
            }
            let fetched: Vec<(usize, Fingerprint)> = wanted
                .iter()
                .flat_map(|(fp, at)| at.iter().map(move |&i| (i, *fp)))
                .collect();
            for &(i, fp) in &fetched {
                self.current[i] = fp;
            }
            // The fetcher verified the bytes on arrival; the store re-checks on read.
            self.writer.queue(fetched)?;
        }
        stats.seconds = start.elapsed().as_secs_f64();
        tracing::info!(
            vm = %self.spec.name,
            indices = stats.indices_written,
            local = stats.local_chunks,
            fetched = order_len,
            skipped = stats.skipped.len(),
            bytes = stats.holders.iter().map(|h| h.bytes).sum::<u64>(),
            fetch_s = fetch_s,
            seconds = stats.seconds,
            "pull"
        );
        metrics::counter!("edgeshift_migrate_pulled_bytes_total")
            .increment(stats.holders.iter().map(|h| h.bytes).sum::<u64>());
        Ok(stats)
    }

    /// Pulls the chunks in `order` from every holder at once with the
    /// transfer module's striped fetcher (faster paths take more, a path that
    /// falls behind has its queue stolen, earlier chunks are asked for
    /// first), into this edge's store.
    /// Chunks marked optional only fill the tail of the others (see
    /// `ChunkWant::optional`); those left out are returned.
    fn fetch_from_holders(
        &self,
        order: Vec<Fetch>,
        holders: &[String],
        stats: &mut PullStats,
    ) -> Result<Vec<Fingerprint>, MigrateError> {
        let mut peers = Vec::with_capacity(holders.len());
        for h in holders {
            let addr: SocketAddr = h
                .parse()
                .map_err(|e| MigrateError::Protocol(format!("holder address {h:?}: {e}")))?;
            peers.push(addr);
        }
        // With a plan, a chunk comes from the holders the coordinator named
        // for it, and one it did not name (written since) from the holders
        // the source named; without one, from any holder.
        let plan = self.plan.as_ref();
        let named = plan.map(|_| peers.clone());
        if let Some(p) = plan {
            for a in p.peers() {
                if !peers.contains(a) {
                    peers.push(*a);
                }
            }
        }
        let wants: Vec<ChunkWant> = order
            .iter()
            .map(|f| ChunkWant {
                fp: f.fp,
                len: f.len,
                sources: plan
                    .and_then(|p| p.sources_for(&f.fp).cloned())
                    .or_else(|| named.clone()),
                optional: f.optional,
                base: f.base,
            })
            .collect();
        let fetcher = Fetcher::with_options(
            Arc::clone(&self.host.store),
            peers,
            ClusterKey::from_bytes(self.host.cfg.key),
            FetchOptions {
                id: self.host.cfg.id.clone(),
                ..FetchOptions::default()
            },
        )
        .with_pool(Arc::clone(&self.conns));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| MigrateError::State(format!("async runtime: {e}")))?;
        let report = rt
            .block_on(fetcher.fetch_chunks(wants))
            .map_err(|e| MigrateError::Unavailable(e.to_string()))?;
        if let Some(p) = plan {
            p.report_rates(&report);
        }
        stats.holders = report
            .peers
            .iter()
            .map(|p| HolderStats {
                holder: p.addr.clone(),
                chunks: p.chunks,
                bytes: p.bytes,
                delta_chunks: p.delta_chunks,
                delta_saved_bytes: p.delta_saved_bytes,
                error: p.dropped.clone(),
            })
            .collect();
        Ok(report.skipped)
    }

    /// Starts the destination QEMU in the background (`-incoming defer`,
    /// the memory transport set over QMP, then `migrate-incoming`), so its
    /// start-up overlaps the disk rounds. QEMU reads nothing of the disk
    /// before the switchover, and `verify` syncs the image before that.
    fn start(&mut self, ip: std::net::IpAddr, memory: MemoryTransport) -> Result<String, MigrateError> {
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
        let listen = uri.clone();
        let (dir, chunk_size) = (self.dir.clone(), self.chunk_size.bytes());
        self.starting = Some(std::thread::spawn(move || {
            // The boot log counts from before QEMU starts: nothing writes
            // through the loop device until the VM resumes here, so once
            // `Verify` has passed it logs the writes since the manifest the
            // VM arrived as. (Loading the BPF program takes 0.1 s: here, off
            // the answer's path.)
            if let Err(e) = crate::dirty::boot_log::start(&dir, &cfg.disk, chunk_size) {
                tracing::warn!(vm = %cfg.spec.name, error = %e, "no boot log: a migration of this VM from here slices its disk");
            }
            start_incoming_qemu(&qemu, &cfg, &listen, memory)
        }));
        self.loop_dev = Some(dev);
        self.uri = Some(uri.clone());
        Ok(uri)
    }

    /// Waits for the background start; its error, if any, is this answer's.
    fn await_started(&mut self) -> Result<(String, MemoryTransport), MigrateError> {
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
    /// full: 1.7 s measured in round 0's answer when other writeback ran),
    /// without waiting for them and without the journal commit an fsync
    /// forces on everything else on this file system. So the pause's
    /// `Verify` (downtime) only syncs what the last rounds wrote (measured:
    /// 0.3 s when 700 MB written 3 s before were still dirty). Best effort.
    fn flush_in_background(&self) {
        match self.file.try_clone() {
            Ok(f) => {
                std::thread::spawn(move || crate::store::local::start_writeback(&f));
            }
            Err(e) => tracing::debug!(error = %e, "no background image writeback"),
        }
    }

    fn verify(&mut self, id: &Fingerprint, recheck: &[u32]) -> Result<(bool, String), MigrateError> {
        self.writer.wait()?;
        self.file.sync_all().map_err(io("sync", &self.image_path))?;
        let mine = Manifest::new(self.chunk_size, self.image_size, self.current.clone());
        if mine.id() != *id {
            return Ok((
                false,
                format!(
                    "destination disk is manifest {}, source's is {}",
                    mine.id().to_hex(),
                    id.to_hex()
                ),
            ));
        }
        for &i in recheck {
            let i = i as usize;
            if i >= self.current.len() {
                return Err(MigrateError::Protocol(format!("chunk index {i} out of range")));
            }
            let data =
                vm::image::read_chunk(&self.file, &self.image_path, self.chunk_size, self.image_size, i)?;
            let fp = vm::image::fingerprint_chunk(&data);
            if fp != self.current[i] {
                return Ok((false, format!("chunk {i} reads back as {} on disk", fp.to_hex())));
            }
        }
        self.host.store.put_manifest(&mine)?;
        Ok((
            true,
            format!("{} chunks match, {} re-read", self.current.len(), recheck.len()),
        ))
    }

    fn finish(&mut self) -> Result<(), MigrateError> {
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
        Ok(())
    }

    /// Records the VM as this edge's own and keeps its loop device.
    fn adopt(&mut self, launched: &Launched) -> Result<(), MigrateError> {
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
            store: self.host.cfg.store.clone(),
            started_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
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

/// Launches QEMU waiting with `-incoming defer`, sets the memory transport
/// (falling back to plain migration, with a log line, when this QEMU lacks
/// multifd or zstd), then listens on `uri`. A QEMU that started but could not
/// be set up is stopped again.
fn start_incoming_qemu(
    qemu: &Qemu,
    cfg: &LaunchConfig,
    uri: &str,
    memory: MemoryTransport,
) -> Result<(Launched, MemoryTransport), MigrateError> {
    let launched = qemu.launch(cfg)?;
    let set_up = (|| -> Result<MemoryTransport, MigrateError> {
        let mut q = QmpClient::connect(&launched.qmp_socket, Duration::from_secs(5))?;
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

impl Drop for Incoming<'_> {
    fn drop(&mut self) {
        self.host.unmark(&self.spec.name);
        if self.finished {
            return;
        }
        if let Some(h) = self.starting.take() {
            // A QEMU still starting is waited for, so it is stopped below.
            match h.join() {
                Ok(Ok((l, _))) => self.qemu = Some(l),
                Ok(Err(e)) => {
                    tracing::info!(vm = %self.spec.name, error = %e, "destination QEMU had not started")
                }
                Err(_) => tracing::warn!(vm = %self.spec.name, "destination QEMU start panicked"),
            }
        }
        if let Some(l) = self.qemu.clone() {
            // Only a VM that already switched over runs here; keep it then.
            let running = QmpClient::connect(&l.qmp_socket, Duration::from_millis(500))
                .and_then(|mut q| q.query_status())
                .map(|s| s.running)
                .unwrap_or(false);
            if running {
                tracing::warn!(vm = %self.spec.name, "control connection lost after the switchover; keeping the VM");
                if self.adopt(&l).is_ok() {
                    return;
                }
            }
            if let Err(e) = self.host.cfg.qemu.kill(l.pid, &l.qmp_socket) {
                tracing::warn!(vm = %self.spec.name, error = %e, "destination QEMU not stopped");
            }
            if self.spec.net.is_some() {
                vm::qemu::remove_tap(&self.spec.name);
            }
        }
        // No more writes into the image, and the loop device detached,
        // before the image goes.
        self.writer.shutdown();
        crate::dirty::boot_log::stop_or_warn(&self.dir);
        self.loop_dev = None;
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "destination half not removed");
        }
        tracing::info!(vm = %self.spec.name, "incoming VM torn down");
    }
}
