//! Where the repository and the edgeshift programs are: `edgeshift` and
//! `edgeshift-coordinator` from target/<profile>, found the way the benches
//! and tests find them (or built once under cargo).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Errors locating the programs.
#[derive(Debug, thiserror::Error)]
pub enum BinariesError {
    /// A program is neither next to this one nor in $EDGESHIFT_BIN_DIR.
    #[error("{0} not found next to this program or in $EDGESHIFT_BIN_DIR ({1}); build it: cargo build --release -p edgeshift-agent -p edgeshift-coordinator")]
    Missing(&'static str, String),
    /// Locating this program or running cargo failed.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

/// The repository root (this crate's manifest dir's parent).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where the edgeshift binaries are: $EDGESHIFT_BIN_DIR, else the directory
/// of the running program (target/release next to edgeshift-perf, or one
/// level above a test binary in target/<profile>/deps).
#[derive(Debug, Clone)]
pub struct Binaries {
    pub edgeshift: PathBuf,
    pub coordinator: PathBuf,
}

impl Binaries {
    /// Finds both programs; under cargo (which sets $CARGO) a missing one is
    /// built first (`cargo build --release`), so a fresh checkout works.
    pub fn locate() -> Result<Self, BinariesError> {
        let dir = programs_dir()?;
        let find = |name: &'static str| find_program(&dir, name);
        if let (Ok(edgeshift), Ok(coordinator)) = (find("edgeshift"), find("edgeshift-coordinator")) {
            return Ok(Self {
                edgeshift,
                coordinator,
            });
        }
        if let Some(cargo) = std::env::var_os("CARGO") {
            build_release(&cargo)?;
        }
        Ok(Self {
            edgeshift: find("edgeshift")?,
            coordinator: find("edgeshift-coordinator")?,
        })
    }
}

/// The coordinator program of this test's build profile, brought up to
/// date first when running under cargo (`cargo build -p
/// edgeshift-coordinator` in the profile of target/<profile>/deps/<test>,
/// quick when nothing changed), so a test never runs a stale coordinator.
/// Elsewhere (or with $EDGESHIFT_BIN_DIR) as [`Binaries::locate`].
pub fn coordinator() -> Result<PathBuf, BinariesError> {
    // One build per test binary, whatever the number of tests asking at
    // once: the others wait for it here rather than on cargo's lock.
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(bin) = built.as_ref() {
        return Ok(bin.clone());
    }
    let bin = build_coordinator()?;
    *built = Some(bin.clone());
    Ok(bin)
}

/// $EDGESHIFT_BIN_DIR, else the running program's directory.
fn programs_dir() -> Result<PathBuf, BinariesError> {
    Ok(match std::env::var_os("EDGESHIFT_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::current_exe()
            .map_err(|source| BinariesError::Io {
                what: "locating this program".into(),
                source,
            })?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    })
}

/// Program `name` in `dir` or one level up (test binaries live in
/// target/<profile>/deps; the programs in target/<profile>).
fn find_program(dir: &Path, name: &'static str) -> Result<PathBuf, BinariesError> {
    [Some(dir.to_path_buf()), dir.parent().map(Path::to_path_buf)]
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| BinariesError::Missing(name, dir.display().to_string()))
}

fn build_coordinator() -> Result<PathBuf, BinariesError> {
    match build_in_profile("edgeshift-coordinator", "edgeshift-coordinator")? {
        Some(bin) => Ok(bin),
        None => Ok(Binaries::locate()?.coordinator),
    }
}

/// The delay line (`edgeshift-delayline`, this crate's program): built like
/// [`coordinator`] under cargo, else $EDGESHIFT_BIN_DIR or next to the
/// running program (target/release after `cargo build --release --workspace`).
pub fn delayline() -> Result<PathBuf, BinariesError> {
    const NAME: &str = "edgeshift-delayline";
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(bin) = built.as_ref() {
        return Ok(bin.clone());
    }
    let bin = match build_in_profile("edgeshift-testbed", NAME)? {
        Some(bin) => bin,
        None => find_program(&programs_dir()?, NAME)?,
    };
    *built = Some(bin.clone());
    Ok(bin)
}

/// Under cargo, from a test binary in target/<profile>/deps (and without
/// $EDGESHIFT_BIN_DIR): `cargo build -p package --bin bin` in that profile
/// and the program's path. `None` elsewhere.
fn build_in_profile(package: &str, bin: &'static str) -> Result<Option<PathBuf>, BinariesError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| BinariesError::Io { what, source }
    };
    let exe = std::env::current_exe().map_err(io("locating this program"))?;
    let profile_dir = exe
        .parent()
        .filter(|d| d.ends_with("deps"))
        .and_then(Path::parent);
    let (Some(cargo), Some(dir), None) = (
        std::env::var_os("CARGO"),
        profile_dir,
        std::env::var_os("EDGESHIFT_BIN_DIR"),
    ) else {
        return Ok(None);
    };
    let mut build = Command::new(cargo);
    build.args(["build", "--quiet", "-p", package, "--bin", bin]);
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            build.arg("--release");
        }
        Some(other) => {
            build.args(["--profile", other]);
        }
        None => {}
    }
    let status = build
        .current_dir(repo_root())
        .status()
        .map_err(io("running cargo build"))?;
    if !status.success() {
        return Err(BinariesError::Io {
            what: format!("cargo build -p {package} --bin {bin}"),
            source: std::io::Error::other(status.to_string()),
        });
    }
    let path = dir.join(bin);
    if path.is_file() {
        Ok(Some(path))
    } else {
        Err(BinariesError::Missing(bin, dir.display().to_string()))
    }
}

/// `cargo build --release` of both programs, from the repository root.
fn build_release(cargo: &std::ffi::OsStr) -> Result<(), BinariesError> {
    const WHAT: &str = "cargo build --release -p edgeshift-agent -p edgeshift-coordinator";
    tracing::info!("building edgeshift and edgeshift-coordinator (release)");
    eprintln!("building edgeshift and edgeshift-coordinator (cargo build --release)...");
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "edgeshift-agent",
            "-p",
            "edgeshift-coordinator",
        ])
        .current_dir(repo_root())
        .status()
        .map_err(|source| BinariesError::Io {
            what: "running cargo build".into(),
            source,
        })?;
    if !status.success() {
        return Err(BinariesError::Io {
            what: WHAT.into(),
            source: std::io::Error::other(status.to_string()),
        });
    }
    Ok(())
}
