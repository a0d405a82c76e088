//! [`PeerStream`]: an authenticated connection to a peer agent, either
//! mutual TLS (the default) or plaintext after the cluster-key handshake
//! (`--insecure-plaintext`, tests only).

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// One peer connection, whichever way it was secured.
#[derive(Debug)]
pub enum PeerStream {
    /// No encryption: `sendfile(2)` may write chunk files to it directly.
    Plain(TcpStream),
    /// Mutual TLS; boxed, as its buffers make it large.
    Tls(Box<tokio_rustls::TlsStream<TlsIo>>),
}

/// What TLS runs over: the socket behind a large read buffer. rustls asks
/// for at most 4 KiB of ciphertext per read; served from this buffer, the
/// socket is read [`TLS_READ_BUFFER`] at a time instead (docs/wire.md, TLS
/// costs). Writes pass straight through.
pub type TlsIo = tokio::io::BufReader<TcpStream>;

/// Bytes of ciphertext read from the socket at once.
pub const TLS_READ_BUFFER: usize = 256 << 10;

/// Plaintext rustls may seal ahead of the socket: a whole chunk, so one
/// write of a chunk becomes its records in a few large socket writes.
pub const TLS_WRITE_BUFFER: usize = 1 << 20;

/// Wraps a connected socket for TLS.
pub fn tls_io(sock: TcpStream) -> TlsIo {
    tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, sock)
}

impl PeerStream {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            PeerStream::Plain(s) => s,
            PeerStream::Tls(s) => s.get_ref().0.get_ref(),
        }
    }

    /// True when nothing has arrived on an idle connection and the peer
    /// has not closed it: the only state in which a pooled one is reusable.
    /// (Our TLS server sends no session tickets, so an idle TLS connection
    /// has nothing unread either.)
    pub fn is_idle_and_open(&self) -> bool {
        let mut probe = [0u8; 1];
        let mut buf = ReadBuf::new(&mut probe);
        // Registers a no-op waker for reads; the next real read replaces it.
        let mut cx = Context::from_waker(Waker::noop());
        matches!(self.tcp().poll_peek(&mut cx, &mut buf), Poll::Pending)
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            PeerStream::Plain(s) => s.is_write_vectored(),
            PeerStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_flush(cx),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
