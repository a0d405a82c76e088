//! `tls-send-bench`: is an io_uring send path faster than tokio +
//! tokio-rustls for a chunk server's TLS sends? (issue 21; docs/wire.md)
//!
//! Both send the same chunk files (256 KiB each, in the page cache) over
//! loopback mutual TLS with the cluster's rustls configuration, to the same
//! receiver (a thread that decrypts and discards):
//! - `tokio`: the product's path: a current-thread tokio runtime,
//!   tokio-rustls, per chunk a `pread` into a reused buffer and one
//!   `write_all` (rustls seals it into records, tokio writes them).
//! - `uring`: a dedicated thread driving a `rustls::ServerConnection` by
//!   hand over io_uring: per chunk a `READ_FIXED` into a registered buffer,
//!   rustls seals it, its records go to the socket with `WRITEV`
//!   submissions (no copy of the ciphertext into a buffer of ours).
//!
//! Prints, per path and round, goodput and the sender thread's CPU seconds
//! per GiB. A benchmark binary, not product code.

use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use edgeshift_common::identity::{Credentials, ThrowawayCluster};
use io_uring::{opcode, types, IoUring};
use rustls::pki_types::ServerName;

const CHUNK: usize = 256 << 10;

/// CPU seconds of the calling thread.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own and nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Writes `n` chunk files of random-looking bytes and reads them once (page cache).
fn make_chunks(dir: &Path, n: usize) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; CHUNK];
    let mut paths = Vec::with_capacity(n);
    for i in 0..n {
        for w in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let p = dir.join(format!("{i:05}"));
        std::fs::write(&p, &buf)?;
        paths.push(p);
    }
    for p in &paths {
        std::fs::read(p)?;
    }
    Ok(paths)
}

/// The receiving side: accepts one client connection's worth of TLS from
/// the sender at `addr`, decrypts everything and counts it.
fn receiver(addr: SocketAddr, creds: Arc<Credentials>, expect: u64) -> std::thread::JoinHandle<Result<u64>> {
    std::thread::spawn(move || {
        let sock = TcpStream::connect(addr)?;
        sock.set_nodelay(true)?;
        let conn =
            rustls::ClientConnection::new(creds.edge_client_config(), ServerName::try_from("127.0.0.1")?)?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < expect {
            let n = tls.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        Ok(got)
    })
}

/// The product's path: tokio + tokio-rustls.
fn send_tokio(listener: &TcpListener, creds: &Credentials, chunks: &[PathBuf]) -> Result<f64> {
    use tokio::io::AsyncWriteExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (sock, _) = listener.accept()?;
    sock.set_nodelay(true)?;
    sock.set_nonblocking(true)?;
    rt.block_on(async {
        let sock = tokio::net::TcpStream::from_std(sock)?;
        let mut tls = tokio_rustls::TlsAcceptor::from(creds.server_config())
            .accept(sock)
            .await?;
        let cpu0 = thread_cpu();
        let mut frame = vec![0u8; CHUNK];
        for p in chunks {
            let f = File::open(p)?;
            f.read_exact_at(&mut frame, 0)?;
            tls.write_all(&frame).await?;
        }
        tls.flush().await?;
        let cpu = thread_cpu() - cpu0;
        tls.shutdown().await?;
        Ok::<f64, anyhow::Error>(cpu)
    })
}

/// An `io::Write` whose vectored writes are io_uring `WRITEV`s on `fd`,
/// each submitted and waited for.
struct UringSocket<'a> {
    ring: &'a mut IoUring,
    fd: i32,
}

impl Write for UringSocket<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let iov = bufs.as_ptr().cast::<libc::iovec>();
        let len = u32::try_from(bufs.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let sqe = opcode::Writev::new(types::Fd(self.fd), iov, len).build();
        // SAFETY: `bufs` (IoSlice is ABI-compatible with iovec) and the
        // memory it points at outlive the submission: we wait for its
        // completion before returning.
        unsafe { self.ring.submission().push(&sqe) }.map_err(|_| io::Error::other("ring full"))?;
        self.ring.submit_and_wait(1)?;
        let cqe = self
            .ring
            .completion()
            .next()
            .ok_or_else(|| io::Error::other("no completion"))?;
        if cqe.result() < 0 {
            return Err(io::Error::from_raw_os_error(-cqe.result()));
        }
        Ok(cqe.result() as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The prototype: rustls driven by hand, reads and sends through io_uring.
fn send_uring(listener: &TcpListener, creds: &Credentials, chunks: &[PathBuf]) -> Result<f64> {
    let (mut sock, _) = listener.accept()?;
    sock.set_nodelay(true)?;
    let mut conn = rustls::ServerConnection::new(creds.server_config())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    // A whole chunk is sealed in one go, its records then written out
    // together (the default 64 KiB limit would need the write split).
    conn.set_buffer_limit(None);
    let mut ring = IoUring::new(8)?;
    let mut buf = vec![0u8; CHUNK];
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `buf` outlives the registration (unregistered below, before it drops).
    unsafe { ring.submitter().register_buffers(&[iov]) }?;
    let fd = sock.as_raw_fd();
    let cpu0 = thread_cpu();
    for p in chunks {
        let f = File::open(p)?;
        let sqe = opcode::ReadFixed::new(types::Fd(f.as_raw_fd()), buf.as_mut_ptr(), CHUNK as u32, 0)
            .offset(0)
            .build();
        // SAFETY: `buf` is registered buffer 0 and is not touched until the
        // completion is reaped just below; `f` stays open meanwhile.
        unsafe { ring.submission().push(&sqe) }.map_err(|_| anyhow::anyhow!("ring full"))?;
        ring.submit_and_wait(1)?;
        let cqe = ring.completion().next().context("no completion")?;
        if cqe.result() != CHUNK as i32 {
            bail!("short read of {}: {}", p.display(), cqe.result());
        }
        conn.writer().write_all(&buf)?;
        let mut out = UringSocket { ring: &mut ring, fd };
        while conn.wants_write() {
            conn.write_tls(&mut out)?;
        }
    }
    let cpu = thread_cpu() - cpu0;
    conn.send_close_notify();
    while conn.wants_write() {
        conn.write_tls(&mut sock)?;
    }
    ring.submitter().unregister_buffers()?;
    Ok(cpu)
}

fn main() -> Result<()> {
    let mut gib = 1u64;
    let mut rounds = 3usize;
    let mut dir = std::env::temp_dir().join(format!("tls-send-bench-{}", std::process::id()));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--gib" => gib = args.next().context("--gib N")?.parse()?,
            "--rounds" => rounds = args.next().context("--rounds N")?.parse()?,
            "--dir" => dir = PathBuf::from(args.next().context("--dir PATH")?),
            "-h" | "--help" => {
                println!("tls-send-bench [--gib 1] [--rounds 3] [--dir PATH]: TLS chunk sends, tokio+tokio-rustls vs io_uring+rustls, on loopback");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    let result = run(&dir, gib, rounds);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(dir: &Path, gib: u64, rounds: usize) -> Result<()> {
    let n = (gib << 30) as usize / CHUNK;
    let chunks = make_chunks(&dir.join("chunks"), n)?;
    let cluster = ThrowawayCluster::new(&dir.join("tls"))?;
    let server = cluster.edge("server")?;
    let client = cluster.edge("client")?;
    let bytes = (n * CHUNK) as u64;
    println!(
        "{n} chunks of 256 KiB ({gib} GiB) from the page cache, loopback, TLS 1.3 {:?}",
        identity_suite()
    );
    println!("| path | round | goodput Mbit/s | sender CPU s/GiB |");
    println!("|---|---:|---:|---:|");
    for round in 1..=rounds {
        for path in ["tokio", "uring"] {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let rx = receiver(listener.local_addr()?, client.clone(), bytes);
            let t = Instant::now();
            let cpu = match path {
                "tokio" => send_tokio(&listener, &server, &chunks)?,
                _ => send_uring(&listener, &server, &chunks)?,
            };
            let got = rx.join().map_err(|_| anyhow::anyhow!("receiver panicked"))??;
            let secs = t.elapsed().as_secs_f64();
            if got != bytes {
                bail!("{path}: received {got} of {bytes} bytes");
            }
            println!(
                "| {path} | {round} | {:.0} | {:.3} |",
                bytes as f64 * 8.0 / secs / 1e6,
                cpu / (bytes as f64 / (1u64 << 30) as f64)
            );
        }
    }
    Ok(())
}

fn identity_suite() -> &'static str {
    "AES-128-GCM (edgeshift_common::identity::provider)"
}
