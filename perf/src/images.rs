//! The images the scenarios move: the Debian family from
//! perf/images/build-debian-images.sh, and the "VM disk" — the nginx variant
//! with writes on top (what the VM changed since an edge last saw it).

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors preparing images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("build-debian-images.sh failed ({0}); see its output above")]
    Build(std::process::ExitStatus),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

pub use edgeshift_testbed::repo_root;

/// Paths of the Debian images.
#[derive(Debug, Clone)]
pub struct DebianImages {
    pub dir: PathBuf,
}

impl DebianImages {
    /// Builds (or finds cached) base and nginx images.
    pub fn ensure(which: &[&str]) -> Result<Self, ImageError> {
        let root = repo_root();
        let script = root.join("perf/images/build-debian-images.sh");
        let status = Command::new("bash")
            .arg(&script)
            .args(which)
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(io(format!("running {}", script.display())))?;
        if !status.success() {
            return Err(ImageError::Build(status));
        }
        let dir = std::env::var_os("EDGESHIFT_DEBIAN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/images/debian"));
        Ok(Self { dir })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.raw"))
    }
}

/// How much the VM wrote since its earlier copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// 256 writes of 64 KiB (16 MiB) at scattered offsets.
    Low,
    /// 1536 writes of 64 KiB (96 MiB).
    High,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Low => "low",
            Workload::High => "high",
        }
    }

    fn writes(self) -> u64 {
        match self {
            Workload::Low => 256,
            Workload::High => 1536,
        }
    }
}

/// xorshift64*: deterministic data and offsets, so runs are repeatable.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Writes `dst` = `base` with `workload`'s writes applied (cached: an
/// existing `dst` is reused). Writes land in the image's used area (the
/// first 60%), where a file system's hot files live.
pub fn make_vm_disk(base: &Path, dst: &Path, workload: Workload) -> Result<(), ImageError> {
    make_disk_after(base, dst, workload, workload.writes())
}

/// An earlier copy of `workload`'s VM disk, as an edge the VM ran on before
/// holds it: `base` with only the first half of the workload's writes (the
/// same bytes at the same places as in the VM disk).
pub fn make_earlier_copy(base: &Path, dst: &Path, workload: Workload) -> Result<(), ImageError> {
    make_disk_after(base, dst, workload, workload.writes() / 2)
}

/// `base` with the first `writes` of `workload`'s writes (cached).
fn make_disk_after(base: &Path, dst: &Path, workload: Workload, writes: u64) -> Result<(), ImageError> {
    if dst.is_file() {
        return Ok(());
    }
    let tmp = dst.with_extension("tmp");
    let st = Command::new("cp")
        .args(["--sparse=always"])
        .arg(base)
        .arg(&tmp)
        .status()
        .map_err(io("cp"))?;
    if !st.success() {
        return Err(ImageError::Io {
            what: format!("cp {} {}", base.display(), tmp.display()),
            source: std::io::Error::other(format!("{st}")),
        });
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&tmp)
        .map_err(io(format!("opening {}", tmp.display())))?;
    let size = f.metadata().map_err(io("stat"))?.len();
    let span = (size / 10 * 6) / 65536;
    let mut rng = Xorshift(0x9E37_79B9_7F4A_7C15 ^ workload.writes());
    let mut buf = vec![0u8; 65536];
    for _ in 0..writes {
        let block = rng.next() % span.max(1);
        for word in buf.chunks_mut(8) {
            word.copy_from_slice(&rng.next().to_le_bytes());
        }
        f.seek(SeekFrom::Start(block * 65536)).map_err(io("seek"))?;
        f.write_all(&buf).map_err(io("write"))?;
    }
    f.sync_all().map_err(io("sync"))?;
    std::fs::rename(&tmp, dst).map_err(io("rename"))?;
    Ok(())
}
