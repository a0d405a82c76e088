//! The edgeshift cluster on a testbed: `edgeshift agent` on every edge and
//! the origin, `edgeshift-coordinator` on the topology's coordinator host,
//! each in its host's namespace with its own store under a work directory.
//! Processes die with the testbed's namespaces; the work directory is
//! removed on drop.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::topology::{Role, Topology, TopologyError};
use edgeshift_testbed::{Testbed, TestbedError};

/// Port every agent listens on for chunks (inside its own namespace).
pub const AGENT_PORT: u16 = 7070;
/// Port agents that receive migrations listen on for them (`--migrate-listen`).
pub const MIGRATE_PORT: u16 = 7900;
/// Port of the coordinator's HTTP API.
pub const COORDINATOR_PORT: u16 = 7800;

/// Errors starting the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Binaries(#[from] edgeshift_testbed::bins::BinariesError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0} did not report listening within {1:?}")]
    NotListening(String, Duration),
    #[error(transparent)]
    Testbed(#[from] TestbedError),
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("cluster credentials: {0}")]
    Identity(#[from] edgeshift_common::identity::IdentityError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// Where the edgeshift programs are (the testbed crate finds them the way
/// the tests do, building them once under `cargo run`).
pub use edgeshift_testbed::Binaries;

/// Which programs the cluster runs and with which configuration files.
#[derive(Debug, Clone, Default)]
pub struct Programs {
    /// The binaries; `None`: [`Binaries::locate`] (this build's).
    pub bins: Option<Binaries>,
    /// `--config` for every agent (its flags still override the file).
    pub agent_config: Option<PathBuf>,
    /// `--config` for the coordinator.
    pub coordinator_config: Option<PathBuf>,
}

impl Programs {
    /// An installed package's: /usr/bin and /etc/edgeshift.
    pub fn installed() -> Result<Self, ClusterError> {
        let bins = Binaries {
            edgeshift: PathBuf::from("/usr/bin/edgeshift"),
            coordinator: PathBuf::from("/usr/bin/edgeshift-coordinator"),
        };
        let agent_config = PathBuf::from("/etc/edgeshift/agent.toml");
        let coordinator_config = PathBuf::from("/etc/edgeshift/coordinator.toml");
        for p in [
            &bins.edgeshift,
            &bins.coordinator,
            &agent_config,
            &coordinator_config,
        ] {
            if !p.is_file() {
                return Err(ClusterError::Io {
                    what: format!(
                        "{} is not installed (cargo xtask deb, then dpkg -i target/debian/edgeshift_*.deb)",
                        p.display()
                    ),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                });
            }
        }
        Ok(Self {
            bins: Some(bins),
            agent_config: Some(agent_config),
            coordinator_config: Some(coordinator_config),
        })
    }
}

/// A running agent.
#[derive(Debug)]
pub struct AgentProc {
    pub host: String,
    pub store: PathBuf,
    pub child: Child,
}

/// The daemons of one topology on one testbed.
#[derive(Debug)]
pub struct Cluster {
    pub bins: Binaries,
    pub work: PathBuf,
    /// The cluster's credentials (TLS unless EDGESHIFT_BENCH_PLAINTEXT=1).
    pub creds: crate::creds::Creds,
    pub agents: Vec<AgentProc>,
    pub coordinator: Option<(String, Child)>,
    pub coordinator_url: Option<String>,
    /// The URL agents reach the coordinator at (`https://` when it serves
    /// the cluster's certificate).
    pub coordinator_api: Option<String>,
}

/// How [`Cluster::launch`] starts the daemons.
struct Launch<'a> {
    capacity: &'a dyn Fn(&str) -> u64,
    /// Agents listen on their host's routed address (see [`Cluster::start_with`]).
    on_host_addrs: bool,
    /// Agents also receive migrations on [`MIGRATE_PORT`].
    receive_migrations: bool,
    /// The coordinator serves HTTPS with the cluster's certificate and
    /// plans incoming migrations (no `--uncoordinated-migrations`).
    coordinated: bool,
    programs: &'a Programs,
}

/// Waits for a daemon's "listening on ..." line on stdout.
fn wait_listening(child: &mut Child, what: &str, timeout: Duration) -> Result<String, ClusterError> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| ClusterError::NotListening(what.to_string(), timeout))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("listening on") {
                let _ = tx.send(line);
            }
        }
    });
    rx.recv_timeout(timeout)
        .map_err(|_| ClusterError::NotListening(what.to_string(), timeout))
}

impl Cluster {
    /// Starts the coordinator (if the topology names one) and an agent on
    /// every edge and origin host. Stores live in `work/<host>/store`.
    pub fn start(tb: &Testbed, topo: &Topology, work: &Path) -> Result<Self, ClusterError> {
        Self::start_with(tb, topo, work, &|_| 64 << 30, false)
    }

    /// As [`Cluster::start`], every agent also receiving migrations on
    /// [`MIGRATE_PORT`], its VMs' state in [`Cluster::state`]: one daemon
    /// per edge.
    pub fn start_receiving(tb: &Testbed, topo: &Topology, work: &Path) -> Result<Self, ClusterError> {
        Self::start_receiving_with(tb, topo, work, &Programs::default())
    }

    /// As [`Cluster::start_receiving`], running `programs`.
    pub fn start_receiving_with(
        tb: &Testbed,
        topo: &Topology,
        work: &Path,
        programs: &Programs,
    ) -> Result<Self, ClusterError> {
        let how = Launch {
            capacity: &|_| 64 << 30,
            on_host_addrs: false,
            receive_migrations: true,
            coordinated: false,
            programs,
        };
        Self::launch(tb, topo, work, &how)
    }

    /// As [`Cluster::start_receiving_with`], as a production fleet runs: the
    /// coordinator serves HTTPS with the cluster's certificate (valid for
    /// its routed address, which agents dial), agents listen on their
    /// routed addresses ([`Testbed::route_host_addrs`] must have been
    /// called) and incoming migrations follow the coordinator's plan, so a
    /// handoff can be ordered through `POST /v1/vms/{name}/handoff`.
    pub fn start_coordinated(
        tb: &Testbed,
        topo: &Topology,
        work: &Path,
        programs: &Programs,
    ) -> Result<Self, ClusterError> {
        let how = Launch {
            capacity: &|_| 64 << 30,
            on_host_addrs: true,
            receive_migrations: true,
            coordinated: true,
            programs,
        };
        Self::launch(tb, topo, work, &how)
    }

    /// As [`Cluster::start`], each agent's store limited to `capacity(host)`
    /// bytes (the coordinator's GC keeps it under its watermarks); with
    /// `on_host_addrs`, agents listen on their host's routed address
    /// ([`Testbed::route_host_addrs`], which must have been called), so the
    /// address they advertise to the coordinator is reachable from every edge.
    pub fn start_with(
        tb: &Testbed,
        topo: &Topology,
        work: &Path,
        capacity: &dyn Fn(&str) -> u64,
        on_host_addrs: bool,
    ) -> Result<Self, ClusterError> {
        let how = Launch {
            capacity,
            on_host_addrs,
            receive_migrations: false,
            coordinated: false,
            programs: &Programs::default(),
        };
        Self::launch(tb, topo, work, &how)
    }

    fn launch(tb: &Testbed, topo: &Topology, work: &Path, how: &Launch) -> Result<Self, ClusterError> {
        let Launch {
            capacity,
            on_host_addrs,
            receive_migrations,
            coordinated,
            programs,
        } = *how;
        let bins = match &programs.bins {
            Some(b) => b.clone(),
            None => Binaries::locate()?,
        };
        std::fs::create_dir_all(work).map_err(io(format!("creating {}", work.display())))?;
        let creds = crate::creds::Creds::from_env(work)?;
        let mut cluster = Self {
            bins,
            work: work.to_path_buf(),
            creds,
            agents: Vec::new(),
            coordinator: None,
            coordinator_url: None,
            coordinator_api: None,
        };
        let timeout = Duration::from_secs(20);
        if let Some(host) = &topo.coordinator {
            let data = work.join(host).join("coordinator");
            std::fs::create_dir_all(&data).map_err(io("creating the coordinator's data dir"))?;
            let mut cmd = tb.command(host, &cluster.bins.coordinator);
            if let Some(c) = &programs.coordinator_config {
                cmd.arg("--config").arg(c);
            }
            if coordinated && cluster.creds.is_tls() {
                let addr = tb.host_addr(host)?;
                let files = cluster
                    .creds
                    .coordinator_files(&[addr.to_string(), "127.0.0.1".into()])?;
                cmd.arg("--tls-ca")
                    .arg(&files.ca)
                    .arg("--tls-cert")
                    .arg(&files.cert)
                    .arg("--tls-key")
                    .arg(&files.key);
                cluster.coordinator_api = Some(format!("https://{addr}:{COORDINATOR_PORT}"));
            } else {
                // Open, on the testbed's closed namespaces: the benches
                // measure caching and handoffs; the coordinator's HTTPS is
                // tested in coordinator/tests/https_auth.rs and by the demo.
                cmd.arg("--insecure-no-auth");
            }
            let mut child = cmd
                .args(["--listen", &format!("0.0.0.0:{COORDINATOR_PORT}"), "--data"])
                .arg(&data)
                .stdout(Stdio::piped())
                .stderr(log_file(work, &format!("{host}-coordinator.log"))?)
                .spawn()
                .map_err(io("starting edgeshift-coordinator"))?;
            wait_listening(&mut child, "edgeshift-coordinator", timeout)?;
            cluster.coordinator = Some((host.clone(), child));
        }
        let holders: Vec<String> = topo
            .hosts
            .iter()
            .filter(|h| matches!(h.role, Role::Edge | Role::Origin))
            .map(|h| h.name.clone())
            .collect();
        for host in holders {
            let store = work.join(&host).join("store");
            std::fs::create_dir_all(&store).map_err(io("creating a store"))?;
            let listen = if on_host_addrs {
                format!("{}:{AGENT_PORT}", tb.host_addr(&host)?)
            } else {
                format!("0.0.0.0:{AGENT_PORT}")
            };
            let mut cmd = tb.command(&host, &cluster.bins.edgeshift);
            if let Some(c) = &programs.agent_config {
                cmd.arg("--config").arg(c);
            }
            cmd.args(["agent", "--listen", &listen, "--store"])
                .arg(&store)
                .args(cluster.creds.args(&host)?)
                .args(["--id", &host]);
            if receive_migrations {
                let migrate_listen = if on_host_addrs {
                    format!("{}:{MIGRATE_PORT}", tb.host_addr(&host)?)
                } else {
                    format!("0.0.0.0:{MIGRATE_PORT}")
                };
                cmd.args(["--migrate-listen", &migrate_listen, "--state-dir"])
                    .arg(work.join(&host).join("vms"));
                if !coordinated {
                    // Incoming VMs pull from the holders the source names:
                    // the coordinator's plan names agents by the one
                    // address each advertises, which without routed host
                    // addresses only the link towards the coordinator reaches.
                    cmd.arg("--uncoordinated-migrations");
                }
            }
            if let Some(chost) = &topo.coordinator {
                let url = if let Some(api) = &cluster.coordinator_api {
                    api.clone()
                } else if *chost == host {
                    format!("http://127.0.0.1:{COORDINATOR_PORT}")
                } else {
                    format!("http://{}:{COORDINATOR_PORT}", tb.addr_of(chost, &host)?)
                };
                cmd.args(["--coordinator", &url, "--capacity", &capacity(&host).to_string()]);
            }
            let mut child = cmd
                .stdout(Stdio::piped())
                .stderr(log_file(work, &format!("{host}-agent.log"))?)
                .spawn()
                .map_err(io("starting edgeshift agent"))?;
            wait_listening(&mut child, &format!("agent on {host}"), timeout)?;
            cluster.agents.push(AgentProc { host, store, child });
        }
        if let Some(h) = &topo.coordinator {
            cluster.coordinator_url = Some(format!("{h}:{COORDINATOR_PORT}"));
        }
        Ok(cluster)
    }

    /// Store directory of `host`'s agent.
    pub fn store(&self, host: &str) -> Option<&Path> {
        self.agents
            .iter()
            .find(|a| a.host == host)
            .map(|a| a.store.as_path())
    }

    /// Where `host`'s agent keeps its VMs' state (with [`Cluster::start_receiving`]).
    pub fn state(&self, host: &str) -> PathBuf {
        self.work.join(host).join("vms")
    }

    /// The address `from` uses to reach `host`'s agent.
    pub fn agent_addr(tb: &Testbed, host: &str, from: &str) -> Result<SocketAddr, ClusterError> {
        let ip: Ipv4Addr = tb.addr_of(host, from)?;
        Ok(SocketAddr::from((ip, AGENT_PORT)))
    }

    /// Runs `edgeshift ARGS` (on the host, outside any namespace: local store work).
    pub fn edgeshift(&self) -> Command {
        Command::new(&self.bins.edgeshift)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for a in &mut self.agents {
            let _ = a.child.kill();
            let _ = a.child.wait();
        }
        if let Some((_, c)) = &mut self.coordinator {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::env::var_os("EDGESHIFT_PERF_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

fn log_file(work: &Path, name: &str) -> Result<std::fs::File, ClusterError> {
    std::fs::File::create(work.join(name)).map_err(io(format!("creating log {name}")))
}
