//! The raw view of an image in a format QEMU reads (qcow2, vmdk, vdi, vhdx,
//! vpc, qed), with its backing chain: `qemu-storage-daemon` exports it
//! read-only over FUSE as one regular file, which the slicer reads as it
//! reads a raw image, so no raw copy is ever written and QEMU's own format
//! code (the code that will run the VM) decides what the guest sees.
//!
//! Before the export, `qemu-img info --backing-chain` names the format and
//! chain and `qemu-img check` checks each image's metadata: QEMU reads
//! clusters past the end of a truncated file as zeros, so without the check
//! a truncated qcow2 would slice "fine" into a disk full of holes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::SlicerError;

/// How long the export may take to appear.
const MOUNT_WAIT: Duration = Duration::from_secs(15);

/// One image of a chain as `qemu-img info --output=json` describes it.
#[derive(Debug, Deserialize)]
struct ImageInfo {
    filename: String,
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
}

/// A raw view, mounted while this lives; dropping it stops the daemon,
/// which unmounts the view.
pub struct RawView {
    /// The regular file to slice.
    pub path: PathBuf,
    /// The image's format (the top of the chain), e.g. "qcow2".
    pub format: String,
    /// Images in the chain, the image itself first.
    pub chain: usize,
    pub size: u64,
    daemon: Child,
    dir: PathBuf,
}

fn bad(path: &Path, format: &str, reason: impl Into<String>) -> SlicerError {
    SlicerError::BadImage {
        path: path.to_path_buf(),
        format: format.to_string(),
        reason: reason.into(),
    }
}

fn run(cmd: &mut Command, path: &Path) -> Result<std::process::Output, SlicerError> {
    let program = cmd.get_program().to_string_lossy().to_string();
    cmd.stdin(Stdio::null()).output().map_err(|e| SlicerError::Tool {
        tool: program,
        reason: format!("{e} (needed to read {}; install qemu-utils)", path.display()),
    })
}

/// The image and its backing files, checked.
fn checked_chain(path: &Path, format: &str) -> Result<Vec<ImageInfo>, SlicerError> {
    let out = run(
        Command::new("qemu-img")
            .args(["info", "--output=json", "--backing-chain", "-f", format])
            .arg(path),
        path,
    )?;
    if !out.status.success() {
        return Err(bad(
            path,
            format,
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let chain: Vec<ImageInfo> = serde_json::from_slice(&out.stdout)
        .map_err(|e| bad(path, format, format!("qemu-img info's answer: {e}")))?;
    for img in &chain {
        let out = run(
            Command::new("qemu-img")
                .args(["check", "-q", "-f", &img.format])
                .arg(&img.filename),
            path,
        )?;
        // 0: clean; 3: leaked clusters only (harmless for reading); 63: the
        // format has no check. 1 (cannot check) and 2 (corrupt) are errors.
        match out.status.code() {
            Some(0 | 3 | 63) => {}
            _ => {
                let said = String::from_utf8_lossy(&out.stderr);
                let lines: Vec<&str> = said.lines().filter(|l| !l.trim().is_empty()).collect();
                let first = lines.first().copied().unwrap_or("no message");
                return Err(bad(
                    Path::new(&img.filename),
                    &img.format,
                    format!(
                        "`qemu-img check` finds it corrupt or truncated ({} problem line(s), the first: {first}){}",
                        lines.len(),
                        if img.filename != path.to_string_lossy() {
                            format!(" (a backing file of {})", path.display())
                        } else {
                            String::new()
                        }
                    ),
                ));
            }
        }
    }
    if chain.is_empty() {
        return Err(bad(path, format, "qemu-img info described no image"));
    }
    Ok(chain)
}

fn st_dev(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.dev())
}

impl RawView {
    /// Checks `path` (a `format` image, as [`super::format::detect`] named
    /// it) and its backing chain, and mounts its raw view.
    pub fn open(path: &Path, format: &str) -> Result<RawView, SlicerError> {
        // `detect`'s names are QEMU's, except vpc's label.
        let format = match format {
            "vhd (vpc)" => "vpc",
            f => f,
        };
        let chain = checked_chain(path, format)?;
        let size = chain[0].virtual_size;
        let dir = std::env::temp_dir().join(format!(
            "edgeshift-view-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir(&dir).map_err(|e| SlicerError::io("create", &dir, e))?;
        let mnt = dir.join("raw");
        std::fs::File::create(&mnt).map_err(|e| SlicerError::io("create", &mnt, e))?;
        // JSON options: a file name with a comma cannot break them.
        let file = serde_json::json!({
            "driver": "file", "node-name": "file0", "read-only": true,
            "filename": path.to_string_lossy(),
        });
        let image = serde_json::json!({
            "driver": format, "node-name": "image", "file": "file0", "read-only": true,
        });
        let export = serde_json::json!({
            "type": "fuse", "id": "view", "node-name": "image", "writable": false,
            "mountpoint": mnt.to_string_lossy(),
        });
        let spawned = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(file.to_string())
            .arg("--blockdev")
            .arg(image.to_string())
            .arg("--export")
            .arg(export.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let daemon = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(SlicerError::Tool {
                    tool: "qemu-storage-daemon".into(),
                    reason: format!(
                        "{e} (needed to read {} images; install qemu-system-common)",
                        format
                    ),
                });
            }
        };
        let mut view = RawView {
            path: mnt,
            format: format.to_string(),
            chain: chain.len(),
            size,
            daemon,
            dir,
        };
        view.wait_mounted()?;
        tracing::debug!(image = %path.display(), format, chain = view.chain, size, "raw view mounted");
        Ok(view)
    }

    /// Waits until the export covers the placeholder file.
    fn wait_mounted(&mut self) -> Result<(), SlicerError> {
        let deadline = Instant::now() + MOUNT_WAIT;
        loop {
            if st_dev(&self.path) != st_dev(&self.dir) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.daemon.try_wait() {
                let mut said = String::new();
                if let Some(mut e) = self.daemon.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut said);
                }
                return Err(SlicerError::Tool {
                    tool: "qemu-storage-daemon".into(),
                    reason: format!("exporting the raw view ended ({status}): {}", said.trim()),
                });
            }
            if Instant::now() > deadline {
                return Err(SlicerError::Tool {
                    tool: "qemu-storage-daemon".into(),
                    reason: format!(
                        "its FUSE export did not appear within {MOUNT_WAIT:?} (is /dev/fuse there?)"
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RawView {
    fn drop(&mut self) {
        // SIGTERM: the daemon unmounts its export as it exits (SIGKILL would
        // leave the mount behind).
        if let Ok(pid) = libc::pid_t::try_from(self.daemon.id()) {
            // SAFETY: kill(2) on our own child, not yet reaped; no memory involved.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.daemon.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if st_dev(&self.path) != st_dev(&self.dir) {
            tracing::warn!(mount = %self.path.display(), "raw view still mounted; killing its daemon");
            let _ = self.daemon.kill();
            let _ = self.daemon.wait();
            let _ = Command::new("fusermount3").arg("-u").arg(&self.path).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
