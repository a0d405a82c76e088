//! A file mapped read-only into memory ([`MappedFile`]): the slicer hashes
//! an image that is in the page cache where it lies, without copying it
//! through `read` first (the copy alone costs as much CPU as the hashing).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// A read-only, shared mapping of the first `len` bytes of a file.
///
/// Another process may write the file while it is mapped; the bytes seen
/// here may then change between two reads of them. Callers that store bytes
/// under a fingerprint therefore copy them out and hash the copy. A file
/// truncated below the mapping faults (SIGBUS) where it is read past its
/// end, as with any mapping: map only images nobody truncates.
pub struct MappedFile {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value; sharing `&[u8]`
// views of it between threads is what `&[u8]` allows anyway.
unsafe impl Send for MappedFile {}
// SAFETY: as above; no interior mutability.
unsafe impl Sync for MappedFile {}

impl MappedFile {
    /// Maps `len` bytes of `file` from offset 0. An empty length cannot be
    /// mapped and is an error.
    pub fn map(file: &File, len: u64) -> io::Result<Self> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: a fresh shared read-only mapping chosen by the kernel
        // (null hint); it aliases no Rust memory, and the fd only needs to
        // be open for the call (the mapping holds its own reference).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        // SAFETY: the range is the mapping just made; advice never changes
        // its contents. Best effort: read ahead, and in order.
        unsafe {
            libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_SEQUENTIAL);
        }
        Ok(MappedFile { ptr, len })
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr..ptr + len` is mapped readable for as long as `self`
        // lives (unmapped only in Drop); see the type's docs on writers.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no `&[u8]` from
        // `bytes` outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}
