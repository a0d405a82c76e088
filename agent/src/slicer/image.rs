//! Opening an image for slicing: a raw file or a block device, its size, its
//! format check, and the choice between O_DIRECT and buffered reads.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{format, SlicerError};
use crate::diskio::DIRECT_ALIGN;

/// How the slicer reads the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ReadMode {
    /// O_DIRECT when most of the image is not in the page cache (a cold image
    /// is read once, so caching it would only evict useful pages), buffered
    /// when it mostly is (copying from RAM beats reading the disk again).
    Auto,
    /// O_DIRECT with aligned buffers; falls back to buffered where the file
    /// system refuses O_DIRECT (tmpfs, some FUSE and network file systems).
    Direct,
    /// Through the page cache.
    Buffered,
}

/// An image opened for slicing.
pub struct ImageSource {
    pub path: PathBuf,
    pub file: File,
    pub size: u64,
    pub is_block_device: bool,
    /// True when `file` was opened with O_DIRECT.
    pub direct: bool,
}

/// `_IOR(0x12, 114, u64)`: a block device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

fn block_device_size(file: &File, path: &Path) -> Result<u64, SlicerError> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // at a live, writable u64; the fd is open for the duration of the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc != 0 {
        return Err(SlicerError::io(
            "BLKGETSIZE64 on",
            path,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(size)
}

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// `cachestat(2)` (Linux 6.5+; the same number on every architecture).
const SYS_CACHESTAT: libc::c_long = 451;

/// Fraction of the file's pages that are in the page cache, if the kernel
/// can tell.
fn cached_fraction(file: &File, size: u64) -> Option<f64> {
    if size == 0 {
        return Some(1.0);
    }
    let range = CachestatRange { off: 0, len: size };
    let mut stat = Cachestat::default();
    // SAFETY: cachestat reads one range struct and writes one cachestat
    // struct, both live and of the layout the kernel expects (#[repr(C)],
    // five u64 counters); flags must be 0.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0u32,
        )
    };
    if rc != 0 {
        return None;
    }
    let pages = size.div_ceil(DIRECT_ALIGN as u64) as f64;
    Some((stat.nr_cache as f64 / pages).min(1.0))
}

fn open_with(path: &Path, direct: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

impl ImageSource {
    /// Opens `path`, checks that it is a raw image, and picks the read mode.
    pub fn open(path: &Path, mode: ReadMode) -> Result<Self, SlicerError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(SlicerError::ImageMissing(path.to_path_buf()))
            }
            Err(e) => return Err(SlicerError::io("open", path, e)),
        };
        let meta = file.metadata().map_err(|e| SlicerError::io("stat", path, e))?;
        let ft = meta.file_type();
        let is_block_device = ft.is_block_device();
        let size = if is_block_device {
            block_device_size(&file, path)?
        } else if ft.is_file() {
            meta.len()
        } else {
            return Err(SlicerError::NotAnImage(path.to_path_buf()));
        };
        check_raw(&file, path, size)?;
        let want_direct = match mode {
            ReadMode::Buffered => false,
            ReadMode::Direct => true,
            ReadMode::Auto => cached_fraction(&file, size).is_none_or(|f| f < 0.5),
        };
        let (file, direct) = if want_direct {
            match open_with(path, true) {
                Ok(f) => (f, true),
                // The file system does not do O_DIRECT: read through the cache.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!(path = %path.display(), "O_DIRECT refused, reading buffered");
                    (file, false)
                }
                Err(e) => return Err(SlicerError::io("open (O_DIRECT)", path, e)),
            }
        } else {
            (file, false)
        };
        Ok(ImageSource {
            path: path.to_path_buf(),
            file,
            size,
            is_block_device,
            direct,
        })
    }
}

/// Refuses images whose header says they are not raw.
fn check_raw(file: &File, path: &Path, size: u64) -> Result<(), SlicerError> {
    let mut head = vec![0u8; (format::PROBE_HEAD as u64).min(size) as usize];
    file.read_exact_at(&mut head, 0)
        .map_err(|e| SlicerError::io("read header of", path, e))?;
    let tail_len = (format::PROBE_TAIL as u64).min(size);
    let mut tail = vec![0u8; tail_len as usize];
    file.read_exact_at(&mut tail, size - tail_len)
        .map_err(|e| SlicerError::io("read footer of", path, e))?;
    match format::detect(&head, &tail) {
        Some(fmt) => Err(SlicerError::NotRaw {
            path: path.to_path_buf(),
            format: fmt,
        }),
        None => Ok(()),
    }
}
