//! A coordinator for tests: `edgeshift-coordinator` as a process with a
//! token, ready once it prints where it listens, killed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::bins::{self, BinariesError};
use crate::daemon::{self, wait_ready, DaemonError};

/// How long a coordinator may take to open its database and bind.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors starting a coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(transparent)]
    NotReady(#[from] DaemonError),
    #[error(transparent)]
    Binary(#[from] BinariesError),
    /// The ready line did not name an address.
    #[error("unexpected ready line {0:?}")]
    BadReadyLine(String),
}

/// How to start a coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorSpec {
    /// Where it listens (`127.0.0.1:0` picks a port).
    pub listen: String,
    /// Its database directory.
    pub data: PathBuf,
    /// Bearer token it requires (written to `<data>.token`); `None`: none.
    pub token: Option<String>,
    /// Where its stderr goes; `None`: discarded.
    pub log: Option<PathBuf>,
    /// Further arguments.
    pub extra: Vec<String>,
}

impl CoordinatorSpec {
    /// A coordinator on `listen` with its database in `data` and `token`.
    pub fn new(listen: &str, data: &Path, token: &str) -> Self {
        Self {
            listen: listen.to_string(),
            data: data.to_path_buf(),
            token: Some(token.to_string()),
            log: None,
            extra: Vec::new(),
        }
    }

    /// The file holding the token.
    pub fn token_file(&self) -> PathBuf {
        self.data.with_extension("token")
    }
}

/// A running `edgeshift-coordinator`; killed on drop.
#[derive(Debug)]
pub struct CoordinatorProc {
    child: Child,
    /// `http://addr` it printed.
    pub url: String,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// How it was started (start it again with this spec after a kill).
    pub spec: CoordinatorSpec,
}

impl CoordinatorProc {
    /// Starts the coordinator with `program` (a command whose program is the
    /// binary, e.g. `Command::new(bin)` or a testbed's `command(host, bin)`)
    /// and waits until it listens.
    pub fn start(mut program: Command, spec: CoordinatorSpec) -> Result<Self, CoordinatorError> {
        let io = |what: String| move |source| CoordinatorError::Io { what, source };
        program.args(["--listen", &spec.listen, "--data"]).arg(&spec.data);
        if let Some(token) = &spec.token {
            let file = spec.token_file();
            std::fs::write(&file, format!("{token}\n")).map_err(io(format!("writing {}", file.display())))?;
            program.arg("--token-file").arg(&file);
        }
        let stderr = match &spec.log {
            Some(log) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .map_err(io(format!("opening {}", log.display())))?,
            ),
            None => Stdio::null(),
        };
        let mut child = program
            .args(&spec.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(io("starting edgeshift-coordinator".into()))?;
        let line = match wait_ready(&mut child, "edgeshift-coordinator", "listening on", READY_TIMEOUT) {
            Ok(line) => line,
            Err(e) => {
                daemon::kill(&mut child);
                return Err(e.into());
            }
        };
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_default()
            .to_string();
        let Some(addr) = url.strip_prefix("http://").and_then(|a| a.parse().ok()) else {
            daemon::kill(&mut child);
            return Err(CoordinatorError::BadReadyLine(line));
        };
        Ok(Self {
            child,
            url,
            addr,
            spec,
        })
    }

    /// Starts `bin` on this host (no namespace).
    pub fn start_local(bin: &Path, spec: CoordinatorSpec) -> Result<Self, CoordinatorError> {
        Self::start(Command::new(bin), spec)
    }

    /// Starts this build's coordinator ([`bins::coordinator`]) on this host,
    /// listening on `listen`, with its database in `data` and `token`.
    pub fn local(listen: &str, data: &Path, token: &str) -> Result<Self, CoordinatorError> {
        let bin = bins::coordinator()?;
        Self::start_local(&bin, CoordinatorSpec::new(listen, data, token))
    }

    /// The bearer token, if any.
    pub fn token(&self) -> Option<&str> {
        self.spec.token.as_deref()
    }

    /// Kills the process as a crash would (SIGKILL); [`Drop`] does this
    /// too, so a coordinator started again on the same data proves that
    /// what it acknowledged survives a crash.
    pub fn kill(&mut self) {
        daemon::kill(&mut self.child);
    }

    /// Stops the process as Ctrl-C would (it then closes its database),
    /// killing it if it has not exited within a few seconds.
    pub fn stop(&mut self) {
        daemon::interrupt(&mut self.child, Duration::from_secs(5));
    }
}

impl Drop for CoordinatorProc {
    fn drop(&mut self) {
        self.kill();
    }
}
