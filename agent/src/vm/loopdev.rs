//! A raw image exposed as a block device: a loop device with direct I/O, so
//! the guest's writes (QEMU opens it with O_DIRECT) reach the image file
//! without a second page cache.

use std::path::{Path, PathBuf};

use super::{run_tool, VmError};

/// An attached loop device; detached on drop unless [`LoopDevice::keep`] was
/// called (a running VM keeps its device after the CLI exits).
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    attached: bool,
}

impl LoopDevice {
    pub fn attach(image: &Path) -> Result<Self, VmError> {
        let image_s = image.to_string_lossy();
        let dev = run_tool("losetup", &["--find", "--show", "--direct-io=on", &image_s])?;
        tracing::debug!(image = %image.display(), device = %dev, "loop device attached");
        Ok(LoopDevice {
            path: PathBuf::from(dev),
            attached: true,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the device attached after this value is dropped.
    pub fn keep(mut self) -> PathBuf {
        self.attached = false;
        self.path.clone()
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if self.attached {
            if let Err(e) = detach(&self.path) {
                tracing::warn!(device = %self.path.display(), error = %e, "loop device not detached");
            }
        }
    }
}

/// Detaches a loop device by path.
pub fn detach(dev: &Path) -> Result<(), VmError> {
    run_tool("losetup", &["-d", &dev.to_string_lossy()]).map(|_| ())
}

/// Detaches every loop device backed by `image` (best effort: for clean-up).
pub fn detach_backing(image: &Path) {
    let Ok(list) = run_tool("losetup", &["-j", &image.to_string_lossy()]) else {
        return;
    };
    for line in list.lines() {
        if let Some(dev) = line.split(':').next() {
            if let Err(e) = detach(Path::new(dev)) {
                tracing::warn!(device = dev, error = %e, "loop device not detached");
            }
        }
    }
}
