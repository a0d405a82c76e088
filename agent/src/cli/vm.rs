//! `edgeshift vm run|list|stop|start|rm`: VMs on this edge. (`vm host` was merged into
//! `edgeshift agent`; it is kept hidden only to say so.)

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use edgeshift_agent::coordination::fetch::pin_image;
use edgeshift_agent::migrate::coord::release_source;
use edgeshift_agent::slicer::place::ImageInPlace;
use edgeshift_agent::store::{ChunkStore, LocalStore};
use edgeshift_agent::transfer::fetch::Fetcher;
use edgeshift_agent::vm::state::is_running;
use edgeshift_agent::vm::{
    self, AccelChoice, Hypervisor, LaunchConfig, NetSpec, Qemu, StateDir, VmRecord, VmSpec,
};
use edgeshift_common::{parse_size, Fingerprint};

use crate::cli::args::{ClusterArgs, CoordinatorArgs, IdArgs, StateArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Restore an image from the store, expose it as a loop device and boot it under QEMU.
    ///
    /// With --coordinator the VM's image counts as referenced by this edge
    /// (--id) while the VM runs here: `vm run` pins it (locally and at the
    /// coordinator, so GC keeps its chunks; an unreachable coordinator
    /// fails the start).
    Run(Box<RunArgs>),
    /// List the VMs on this edge.
    List(ListArgs),
    /// Stop a VM (QMP quit) and detach its disk; its disk image and record
    /// stay (`vm start` boots it again, `vm rm` deletes it).
    ///
    /// With --coordinator, drops this edge's (--id) reference to the VM's
    /// image; its chunks stay cached until the policy evicts them.
    Stop(StopArgs),
    /// Start a stopped VM again from its disk image as it was left.
    Start(StartArgs),
    /// Delete a VM that is not running: its disk image and record.
    Rm(RmArgs),
    /// Retired: merged into `edgeshift agent --migrate-listen`.
    #[command(hide = true)]
    Host(RetiredArgs),
}

/// Whatever a retired command was given: it only says what replaced it.
#[derive(Debug, clap::Args)]
struct RetiredArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    _rest: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The VM's name on this edge (letters, digits, '-', '_').
    name: String,
    /// Manifest id (64 hex digits) of the disk image.
    #[arg(long)]
    image: String,
    /// The chunk store holding the image.
    #[arg(long)]
    store: PathBuf,
    /// A peer's chunk server (IP:PORT, repeatable) to fetch the image's
    /// missing chunks (and manifest) from, all peers at once.
    #[arg(long = "peer")]
    peers: Vec<std::net::SocketAddr>,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Guest memory (e.g. 256MiB).
    #[arg(long, default_value = "256MiB")]
    memory: String,
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Attach the VM's NIC (a tap) to this existing bridge.
    #[arg(long)]
    net: Option<String>,
    /// auto: KVM where a probe guest really runs under it, else TCG.
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelChoice,
    /// Boot this kernel directly (the test VM) instead of the disk's boot loader.
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line (with --kernel).
    #[arg(long, requires = "kernel")]
    append: Option<String>,
    #[command(flatten)]
    coord: CoordinatorArgs,
    #[command(flatten)]
    state: StateArgs,
    /// Start the VM again when the agent starts and finds it not running
    /// (after a reboot), unless it was stopped with `vm stop`.
    #[arg(long)]
    autostart: bool,
    /// Print the VM's record as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct StartArgs {
    name: String,
    #[command(flatten)]
    state: StateArgs,
    /// Print the VM's record as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct RmArgs {
    name: String,
    #[command(flatten)]
    state: StateArgs,
}

#[derive(Debug, clap::Args)]
struct ListArgs {
    #[command(flatten)]
    state: StateArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct StopArgs {
    name: String,
    #[command(flatten)]
    id: IdArgs,
    #[command(flatten)]
    coord: CoordinatorArgs,
    #[command(flatten)]
    state: StateArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.cmd {
        Cmd::Run(a) => run_vm(*a),
        Cmd::List(a) => list(a),
        Cmd::Stop(a) => stop(a),
        Cmd::Start(a) => start(a),
        Cmd::Rm(a) => rm(a),
        Cmd::Host(_) => anyhow::bail!(
            "`edgeshift vm host` was merged into `edgeshift agent`: run `edgeshift agent --listen ADDR --migrate-listen ADDR --store DIR --state-dir DIR --cluster-key-file K` (one daemon per edge; docs/migration.md)"
        ),
    }
}

fn parse_id(s: &str) -> anyhow::Result<Fingerprint> {
    let bytes = hex::decode(s).with_context(|| format!("image id {s:?} is not hex"))?;
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("image id {s:?} is not 64 hex digits"))?;
    Ok(Fingerprint(arr))
}

fn run_vm(mut a: RunArgs) -> anyhow::Result<()> {
    vm::check_name(&a.name)?;
    let memory = parse_size(&a.memory).with_context(|| format!("--memory {}", a.memory))?;
    anyhow::ensure!(
        memory >= 16 << 20,
        "--memory {} is too small (at least 16MiB)",
        a.memory
    );
    anyhow::ensure!(a.cpus >= 1 && a.cpus <= 64, "--cpus must be 1..=64");
    let id = parse_id(&a.image)?;
    let sd = StateDir::new(&a.state.state_dir);
    anyhow::ensure!(
        !sd.exists(&a.name)?,
        "a VM named {} already exists on this edge",
        a.name
    );
    let store = Arc::new(
        LocalStore::open_or_create(&a.store)
            .with_context(|| format!("opening store {}", a.store.display()))?,
    );
    let mut disk_written = false;
    if !a.peers.is_empty() {
        let trust = a
            .cluster
            .trust()
            .context("--peer needs this edge's cluster credentials")?;
        let fetcher = Fetcher::new(Arc::clone(&store), a.peers.clone(), trust);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // The disk is written as its chunks arrive: no restore pass after.
        let dir = sd.vm_dir(&a.name)?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut cleanup = DirGuard(Some(dir.clone()));
        let manifest = rt
            .block_on(fetcher.fetch_manifest(&id))
            .context("fetching the image's manifest")?;
        let place = ImageInPlace::start(Arc::clone(&store), id, manifest, &dir.join("disk.raw"))
            .context("starting the disk image")?;
        let fetcher = fetcher.with_placement(place.sink());
        let report = rt
            .block_on(fetcher.fetch(&id))
            .context("fetching the image's missing chunks")?;
        drop(fetcher);
        place.finish().context("writing the disk image")?;
        tracing::info!(
            chunks = report.chunks_fetched,
            bytes = report.bytes_received,
            "fetched missing chunks into the disk image"
        );
        // start_vm owns the directory from here.
        cleanup.0 = None;
        disk_written = true;
    }
    let manifest = store.get_manifest(&id)?;
    let missing = manifest
        .unique_chunks()
        .into_iter()
        .filter(|fp| !store.has_chunk(fp).unwrap_or(false))
        .count();
    anyhow::ensure!(
        missing == 0,
        "the store lacks {missing} chunks of image {}; give --peer to fetch them",
        a.image
    );
    a.coord.refuse_token_file()?;
    let coord = a.coord.config(&a.cluster.id, a.cluster.coordinator_tls());
    if let Some(c) = &coord {
        let client = c.client()?;
        client
            .publish(&manifest)
            .and_then(|_| pin_image(&client, &store, &c.edge, &id, &format!("VM {} runs here", a.name)))
            .with_context(|| format!("pinning image {} at the coordinator {}", a.image, c.url))?;
    }
    let json = a.json;
    let started = start_vm(a, &sd, &store, &manifest, id, memory, disk_written);
    if let (Err(_), Some(c)) = (&started, &coord) {
        // The VM did not start: its reference goes again.
        for left in release_source(c, &sd, store.root(), "", &id.to_hex()) {
            tracing::warn!(%left, "pin of a VM that did not start");
        }
    }
    print_started(&started?, json)
}

fn print_started(rec: &VmRecord, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(rec)?);
    } else {
        println!(
            "VM {} running: pid {}, {} , disk {} ({}), QMP {}",
            rec.spec.name,
            rec.pid,
            rec.accel.as_str(),
            rec.loop_device.display(),
            rec.image_path.display(),
            rec.qmp_socket.display()
        );
    }
    Ok(())
}

/// Restores the disk (unless `disk_written`: the fetch wrote it as its
/// chunks arrived), attaches it and starts QEMU; records the VM.
fn start_vm(
    a: RunArgs,
    sd: &StateDir,
    store: &LocalStore,
    manifest: &edgeshift_common::Manifest,
    id: Fingerprint,
    memory: u64,
    disk_written: bool,
) -> anyhow::Result<VmRecord> {
    let dir = sd.vm_dir(&a.name)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let cleanup = DirGuard(Some(dir.clone()));
    let image_path = dir.join("disk.raw");
    if !disk_written {
        // Through the I/O module, as `edgeshift restore` (io_uring writes).
        edgeshift_agent::slicer::restore_image(store, &id, &image_path, None)
            .context("restoring the disk image")?;
    }
    let dev = vm::loopdev::LoopDevice::attach(&image_path)?;
    // Counts the VM's writes from its first one, so that a migration need
    // not slice the disk to find what changed since this manifest.
    if let Err(e) = edgeshift_agent::dirty::boot_log::start(&dir, dev.path(), manifest.chunk_size.bytes()) {
        tracing::warn!(vm = %a.name, error = %e, "no boot log: a migration of this VM slices its disk");
    }
    let spec = VmSpec {
        name: a.name.clone(),
        memory_mib: memory >> 20,
        cpus: a.cpus,
        accel: a.accel,
        kernel: a.kernel.map(absolute).transpose()?,
        initrd: a.initrd.map(absolute).transpose()?,
        append: a.append,
        net: a.net.map(|bridge| NetSpec {
            bridge,
            mac: VmSpec::mac_for(&a.name),
        }),
    };
    let qemu = Qemu::default();
    let launched = qemu.launch(&LaunchConfig {
        spec: spec.clone(),
        disk: dev.path().to_path_buf(),
        run_dir: dir.clone(),
        incoming: None,
    })?;
    let rec = VmRecord {
        spec,
        pid: launched.pid,
        accel: launched.accel,
        qmp_socket: launched.qmp_socket,
        loop_device: dev.keep(),
        image_path,
        manifest_id: id.to_hex(),
        store: a.store.canonicalize().unwrap_or(a.store),
        started_at: now_secs(),
        autostart: a.autostart,
        stopped: false,
    };
    sd.save(&rec)?;
    std::mem::forget(cleanup);
    Ok(rec)
}

fn absolute(p: PathBuf) -> anyhow::Result<PathBuf> {
    p.canonicalize()
        .with_context(|| format!("{} does not exist", p.display()))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Removes a half-made VM directory on error paths.
struct DirGuard(Option<PathBuf>);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            // The boot log's pin name derives from the directory: first.
            edgeshift_agent::dirty::boot_log::stop_or_warn(&d);
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

#[derive(serde::Serialize)]
struct ListEntry<'a> {
    #[serde(flatten)]
    rec: &'a VmRecord,
    state: String,
}

fn list(a: ListArgs) -> anyhow::Result<()> {
    let sd = StateDir::new(&a.state.state_dir);
    let recs = sd.list()?;
    let entries: Vec<ListEntry> = recs
        .iter()
        .map(|rec| {
            let state = if rec.stopped {
                "stopped".to_string()
            } else if !is_running(rec) {
                "dead".to_string()
            } else {
                match vm::QmpClient::connect(&rec.qmp_socket, Duration::from_millis(500))
                    .and_then(|mut q| q.query_status())
                {
                    Ok(s) => s.status,
                    Err(e) => format!("unreachable ({e})"),
                }
            };
            ListEntry { rec, state }
        })
        .collect();
    if a.json {
        println!("{}", serde_json::to_string(&entries)?);
    } else {
        println!(
            "{:<20} {:>8} {:<6} {:<12} {:<12} image",
            "NAME", "PID", "ACCEL", "STATE", "DISK"
        );
        for e in &entries {
            println!(
                "{:<20} {:>8} {:<6} {:<12} {:<12} {}",
                e.rec.spec.name,
                e.rec.pid,
                e.rec.accel.as_str(),
                e.state,
                e.rec.loop_device.display(),
                &e.rec.manifest_id[..16.min(e.rec.manifest_id.len())]
            );
        }
    }
    Ok(())
}

fn stop(a: StopArgs) -> anyhow::Result<()> {
    let sd = StateDir::new(&a.state.state_dir);
    let rec = vm::lifecycle::stop(&Qemu::default(), &sd, &a.name)?;
    println!(
        "VM {} stopped; its disk {} stays (`edgeshift vm start {0}` boots it, `edgeshift vm rm {0}` deletes it)",
        a.name,
        rec.image_path.display()
    );
    if let Some(c) = a.coord.config(&a.id, Some(CoordinatorArgs::default_tls())) {
        // The VM is gone whatever the coordinator says; say what was left.
        for left in release_source(&c, &sd, &rec.store, &a.name, &rec.manifest_id) {
            eprintln!("warning: left at the coordinator: {left}");
        }
    }
    Ok(())
}

fn start(a: StartArgs) -> anyhow::Result<()> {
    let sd = StateDir::new(&a.state.state_dir);
    let rec = vm::lifecycle::start(&Qemu::default(), &sd, &a.name)?;
    print_started(&rec, a.json)
}

fn rm(a: RmArgs) -> anyhow::Result<()> {
    let sd = StateDir::new(&a.state.state_dir);
    let rec = vm::lifecycle::remove(&sd, &a.name)?;
    println!("VM {} deleted with its disk {}", a.name, rec.image_path.display());
    Ok(())
}
