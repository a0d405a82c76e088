//! A coordinator for tests: `edgeshift-coordinator` as a process serving
//! HTTPS with a cluster's files (or open, `--insecure-no-auth`), ready once
//! it prints where it listens, killed on drop.

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

/// The cluster files a coordinator serves HTTPS with (made by `edgeshift
/// cluster` or the identity module; this crate does not make them).
#[derive(Debug, Clone)]
pub struct CoordinatorTls {
    pub ca: PathBuf,
    /// A certificate of role `coordinator` valid for the address clients dial.
    pub cert: PathBuf,
    pub key: PathBuf,
    pub crl: Option<PathBuf>,
}

/// How to start a coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorSpec {
    /// Where it listens (`127.0.0.1:0` picks a port).
    pub listen: String,
    /// Its database directory.
    pub data: PathBuf,
    /// HTTPS with these files; `None`: `--insecure-no-auth` (plain HTTP, open).
    pub tls: Option<CoordinatorTls>,
    /// Operator bearer token (written to `<data>.token`), with `tls` only.
    pub operator_token: Option<String>,
    /// Where its stderr goes; `None`: discarded.
    pub log: Option<PathBuf>,
    /// Further arguments.
    pub extra: Vec<String>,
}

impl CoordinatorSpec {
    /// A coordinator on `listen` with its database in `data`, serving HTTPS
    /// with `tls` and accepting `operator_token` from operators.
    pub fn new(listen: &str, data: &Path, tls: CoordinatorTls, operator_token: Option<&str>) -> Self {
        Self {
            listen: listen.to_string(),
            data: data.to_path_buf(),
            tls: Some(tls),
            operator_token: operator_token.map(str::to_string),
            log: None,
            extra: Vec::new(),
        }
    }

    /// A coordinator with `--insecure-no-auth`: plain HTTP, every request allowed.
    pub fn insecure(listen: &str, data: &Path) -> Self {
        Self {
            listen: listen.to_string(),
            data: data.to_path_buf(),
            tls: None,
            operator_token: None,
            log: None,
            extra: Vec::new(),
        }
    }

    /// The file holding the operator token.
    pub fn token_file(&self) -> PathBuf {
        self.data.with_extension("token")
    }
}

/// A running `edgeshift-coordinator`; killed on drop.
#[derive(Debug)]
pub struct CoordinatorProc {
    child: Child,
    /// `https://addr` (or `http://addr` when insecure) it printed.
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
        match &spec.tls {
            Some(tls) => {
                program.arg("--tls-ca").arg(&tls.ca);
                program.arg("--tls-cert").arg(&tls.cert);
                program.arg("--tls-key").arg(&tls.key);
                if let Some(crl) = &tls.crl {
                    program.arg("--tls-crl").arg(crl);
                }
                if let Some(token) = &spec.operator_token {
                    let file = spec.token_file();
                    std::fs::write(&file, format!("{token}\n"))
                        .map_err(io(format!("writing {}", file.display())))?;
                    program.arg("--operator-token-file").arg(&file);
                }
            }
            None => {
                program.arg("--insecure-no-auth");
            }
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
        let addr = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"))
            .and_then(|a| a.parse().ok());
        let Some(addr) = addr else {
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

    /// Starts this build's coordinator ([`bins::coordinator`]) on this host.
    pub fn local(spec: CoordinatorSpec) -> Result<Self, CoordinatorError> {
        let bin = bins::coordinator()?;
        Self::start_local(&bin, spec)
    }

    /// The operator's bearer token, if any.
    pub fn operator_token(&self) -> Option<&str> {
        self.spec.operator_token.as_deref()
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
