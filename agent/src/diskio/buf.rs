//! Buffers a [`super::Queue`] may hand to the kernel: heap memory that stays
//! put while the buffer value moves, aligned where O_DIRECT needs it.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Alignment and granularity of O_DIRECT buffers, offsets and lengths (the
/// largest logical block size in common use).
pub const DIRECT_ALIGN: usize = 4096;

#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, align(4096))]
struct Page([u8; DIRECT_ALIGN]);

/// A heap buffer aligned to [`DIRECT_ALIGN`], as O_DIRECT needs. Its bytes
/// never move while it lives, so the kernel may read into it through
/// io_uring while the buffer itself is moved between threads.
pub struct AlignedBuf {
    pages: Vec<Page>,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes rounded up to a whole page.
    pub fn new(len: usize) -> Self {
        AlignedBuf {
            pages: vec![Page([0; DIRECT_ALIGN]); len.div_ceil(DIRECT_ALIGN)],
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        self.pages.as_slice().as_bytes()
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.pages.as_mut_slice().as_mut_bytes()
    }

    pub fn len(&self) -> usize {
        self.pages.len() * DIRECT_ALIGN
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for Vec<u8> {}
    impl Sealed for super::AlignedBuf {}
}

/// A buffer whose bytes live on the heap, so they stay at one address while
/// the queue holds the buffer. Sealed: the queue's safety rests on it, so
/// only the types here qualify.
pub trait IoBuf: sealed::Sealed {
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl IoBuf for Vec<u8> {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl IoBuf for AlignedBuf {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}
