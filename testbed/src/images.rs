//! The test images, built and cached by the scripts in perf/images: the
//! test VM (kernel, initramfs, base disk) and the small file-system images
//! the image tests slice.

use std::path::PathBuf;
use std::process::Command;

use crate::bins::repo_root;

/// Errors building a test image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The script could not start.
    #[error("cannot run {script}: {source}")]
    Spawn { script: String, source: std::io::Error },
    /// The script failed.
    #[error("{script} failed ({status}): {stderr}")]
    Failed {
        script: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    /// The script did not print its output directory on its last line.
    #[error("{0} printed no output directory")]
    NoOutput(String),
}

/// Runs `cmd` (a build script), which prints its output directory last.
fn output_dir(script: &str, cmd: &mut Command) -> Result<PathBuf, ImageError> {
    let out = cmd.output().map_err(|source| ImageError::Spawn {
        script: script.into(),
        source,
    })?;
    if !out.status.success() {
        return Err(ImageError::Failed {
            script: script.into(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().map(str::trim).unwrap_or("");
    if last.is_empty() {
        return Err(ImageError::NoOutput(script.into()));
    }
    Ok(PathBuf::from(last))
}

/// The test VM's files (perf/images/build-test-vm.sh).
#[derive(Debug, Clone)]
pub struct TestVm {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub base: PathBuf,
}

impl TestVm {
    /// Builds (or reuses) the test VM; one build at a time across test
    /// binaries (a lock file under target/).
    pub fn ensure() -> Result<TestVm, ImageError> {
        let repo = repo_root();
        let dir = output_dir(
            "build-test-vm.sh",
            Command::new("flock")
                .arg(repo.join("target/.build-test-vm.lock"))
                .arg("bash")
                .arg(repo.join("perf/images/build-test-vm.sh")),
        )?;
        Ok(Self::in_dir(dir))
    }

    /// The test VM whose files are in `dir`.
    pub fn in_dir(dir: PathBuf) -> TestVm {
        TestVm {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initramfs.gz"),
            base: dir.join("base.raw"),
            dir,
        }
    }
}

/// Builds (or reuses) the file-system images of `which` ("small", ...) with
/// perf/images/make-test-images.sh; returns their directory.
pub fn test_images(which: &str) -> Result<PathBuf, ImageError> {
    let script = repo_root().join("perf/images/make-test-images.sh");
    output_dir(
        "make-test-images.sh",
        Command::new("bash").arg(&script).arg(which),
    )
}
