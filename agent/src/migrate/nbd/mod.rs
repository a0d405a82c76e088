//! A small NBD server (the protocol's fixed-newstyle handshake, `NBD_OPT_GO`
//! or `NBD_OPT_EXPORT_NAME`, simple replies; READ, WRITE, FLUSH, DISC) for
//! the disk mirror's stream: the source QEMU's `blockdev-mirror` sends
//! every guest write here once the pre-copy has converged, and the
//! destination agent puts it into the image beside its own chunk writes
//! ([`crate::migrate::image_writer::MirrorSink`]), so the two are ordered
//! in one place (docs/migration.md, "Last chunks beside a mirror").
//!
//! Requests are served one after the other in the order they came; QEMU's
//! client keeps several in flight and matches replies by cookie. Options
//! this server lacks (structured replies, meta contexts) are answered
//! "unsupported", and QEMU's client falls back to what is offered.
//!
//! With [`ExportTls`] the server runs the protocol's FORCEDTLS mode
//! (`tls.rs`): every option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is
//! answered `NBD_REP_ERR_TLS_REQD` until TLS is up, `NBD_OPT_EXPORT_NAME`
//! (which cannot be refused with a reply) ends the connection, and after
//! the `NBD_REP_ACK` to STARTTLS everything goes over rustls, the client's
//! certificate checked against the cluster's CA and the source's name.

mod tls;

use std::io::{Read, Write};
use std::net::TcpStream;

use tls::Conn;
pub use tls::ExportTls;

/// What the server reads and writes.
pub trait BlockTarget {
    /// Bytes in the export.
    fn size(&self) -> u64;
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    fn flush(&self) -> std::io::Result<()>;
}

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("NBD connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("NBD protocol: {0}")]
    Protocol(String),
    #[error("NBD client went away before choosing an export")]
    NoExport,
    #[error("NBD client refused: {0}")]
    Refused(String),
    #[error("NBD TLS: {0}")]
    Tls(String),
}

/// What one connection did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServeStats {
    pub writes: u64,
    pub bytes_written: u64,
    pub flushes: u64,
}

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const CLIENT_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_POLICY: u32 = 0x8000_0002;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TFLAG_HAS_FLAGS: u16 = 1;
const TFLAG_SEND_FLUSH: u16 = 4;
const TFLAG_SEND_FUA: u16 = 8;
const CMD_FLAG_FUA: u16 = 1;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const ENOTSUP: u32 = 95;

/// Largest payload of one request (QEMU's client sends at most 32 MiB).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option body before the export is chosen.
const MAX_OPTION: u32 = 4096;

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The NBD error number of an I/O error (a full disk stays a full disk).
fn errno_of(e: &std::io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => ENOSPC,
        Some(libc::EPERM) | Some(libc::EACCES) => EPERM,
        _ if e.kind() == std::io::ErrorKind::PermissionDenied => EPERM,
        _ => EIO,
    }
}

/// Where option haggling stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsMode {
    /// No TLS here (`--insecure-plaintext`): STARTTLS is refused.
    Off,
    /// TLS is required and not up yet.
    Required,
    /// The session runs over TLS.
    Active,
}

/// How option haggling ended.
#[derive(Debug, PartialEq, Eq)]
enum Haggled {
    Transmission,
    Aborted,
    StartTls,
}

/// Serves one client on `stream` until it disconnects: the export is
/// `target`, under the name `export` (any other name is refused); with
/// `tls`, only over TLS and only to the client certificate it names.
pub fn serve(
    stream: TcpStream,
    export: &str,
    target: &dyn BlockTarget,
    tls: Option<&ExportTls>,
) -> Result<ServeStats, NbdError> {
    stream.set_nodelay(true)?;
    let mut plain = Conn::new(stream);
    let no_zeroes = greet(&mut plain)?;
    let size = target.size();
    let Some(tls) = tls else {
        return match haggle(&mut plain, export, size, no_zeroes, TlsMode::Off)? {
            Haggled::Transmission => transmission(&mut plain, target),
            _ => Err(NbdError::NoExport),
        };
    };
    match haggle(&mut plain, export, size, no_zeroes, TlsMode::Required)? {
        Haggled::StartTls => {}
        _ => return Err(NbdError::NoExport),
    }
    let mut secure = tls.upgrade(plain)?;
    match haggle(&mut secure, export, size, no_zeroes, TlsMode::Active)? {
        Haggled::Transmission => transmission(&mut secure, target),
        _ => Err(NbdError::NoExport),
    }
}

fn opt_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    w.write_all(&OPT_REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&opt.to_be_bytes())?;
    w.write_all(&kind.to_be_bytes())?;
    w.write_all(&(data.len() as u32).to_be_bytes())?;
    w.write_all(data)
}

/// The server's greeting and the client's flags; whether the client
/// asked for no zeroes.
fn greet<S: Read + Write>(c: &mut Conn<S>) -> Result<bool, NbdError> {
    c.write_all(&NBDMAGIC.to_be_bytes())?;
    c.write_all(&IHAVEOPT.to_be_bytes())?;
    c.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
    c.flush()?;
    let mut b4 = [0u8; 4];
    c.read_exact(&mut b4)?;
    Ok(be32(&b4) & CLIENT_NO_ZEROES != 0)
}

/// Option haggling in `mode`, up to transmission, an abort, or (TLS
/// required) the `NBD_REP_ACK` of STARTTLS.
fn haggle<S: Read + Write>(
    c: &mut Conn<S>,
    export: &str,
    size: u64,
    no_zeroes: bool,
    mode: TlsMode,
) -> Result<Haggled, NbdError> {
    let tflags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
    loop {
        let mut h = [0u8; 16];
        c.read_exact(&mut h)?;
        if be64(&h) != IHAVEOPT {
            return Err(NbdError::Protocol("bad option magic".into()));
        }
        let (opt, len) = (be32(&h[8..]), be32(&h[12..]));
        if len > MAX_OPTION {
            return Err(NbdError::Protocol(format!("option {opt} of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        c.read_exact(&mut data)?;
        if mode == TlsMode::Required {
            match opt {
                OPT_STARTTLS if data.is_empty() => {
                    opt_reply(c, opt, REP_ACK, &[])?;
                    c.flush()?;
                    return Ok(Haggled::StartTls);
                }
                OPT_STARTTLS => opt_reply(c, opt, REP_ERR_INVALID, b"STARTTLS carries no data")?,
                // It has no error reply: the spec says to end the session.
                OPT_EXPORT_NAME => return Err(NbdError::Refused("NBD_OPT_EXPORT_NAME before TLS".into())),
                OPT_ABORT => {
                    opt_reply(c, opt, REP_ACK, &[])?;
                    c.flush()?;
                    return Ok(Haggled::Aborted);
                }
                _ => opt_reply(c, opt, REP_ERR_TLS_REQD, b"this export is served over TLS only")?,
            }
            c.flush()?;
            continue;
        }
        match opt {
            OPT_STARTTLS => {
                let (kind, why): (u32, &[u8]) = if mode == TlsMode::Active {
                    (REP_ERR_INVALID, b"TLS is up already")
                } else {
                    (REP_ERR_POLICY, b"this export is served without TLS")
                };
                opt_reply(c, opt, kind, why)?;
                c.flush()?;
            }
            OPT_EXPORT_NAME => {
                if data != export.as_bytes() {
                    // This option has no error reply: the connection closes.
                    return Err(NbdError::Protocol("unknown export name".into()));
                }
                c.write_all(&size.to_be_bytes())?;
                c.write_all(&tflags.to_be_bytes())?;
                if !no_zeroes {
                    c.write_all(&[0u8; 124])?;
                }
                c.flush()?;
                return Ok(Haggled::Transmission);
            }
            OPT_GO | OPT_INFO => {
                let name = (data.len() >= 6)
                    .then(|| be32(&data) as usize)
                    .filter(|&n| 4 + n + 2 <= data.len())
                    .map(|n| (&data[4..4 + n], be16(&data[4 + n..]) as usize, 6 + n));
                let Some((name, asked, at)) = name else {
                    opt_reply(c, opt, REP_ERR_INVALID, b"malformed")?;
                    c.flush()?;
                    continue;
                };
                if name != export.as_bytes() {
                    opt_reply(c, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    c.flush()?;
                    continue;
                }
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&tflags.to_be_bytes());
                opt_reply(c, opt, REP_INFO, &info)?;
                let wants_sizes = (0..asked)
                    .filter_map(|k| data.get(at + 2 * k..at + 2 * k + 2))
                    .any(|t| be16(t) == INFO_BLOCK_SIZE);
                if wants_sizes {
                    let mut bs = Vec::with_capacity(14);
                    bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    bs.extend_from_slice(&1u32.to_be_bytes());
                    bs.extend_from_slice(&4096u32.to_be_bytes());
                    bs.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                    opt_reply(c, opt, REP_INFO, &bs)?;
                }
                opt_reply(c, opt, REP_ACK, &[])?;
                c.flush()?;
                if opt == OPT_GO {
                    return Ok(Haggled::Transmission);
                }
            }
            OPT_ABORT => {
                opt_reply(c, opt, REP_ACK, &[])?;
                c.flush()?;
                return Ok(Haggled::Aborted);
            }
            _ => {
                opt_reply(c, opt, REP_ERR_UNSUP, &[])?;
                c.flush()?;
            }
        }
    }
}

fn reply(w: &mut impl Write, err: u32, cookie: u64) -> std::io::Result<()> {
    w.write_all(&SIMPLE_REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&err.to_be_bytes())?;
    w.write_all(&cookie.to_be_bytes())
}

fn transmission<S: Read + Write>(c: &mut Conn<S>, target: &dyn BlockTarget) -> Result<ServeStats, NbdError> {
    let size = target.size();
    let mut stats = ServeStats::default();
    let mut buf = Vec::new();
    loop {
        let mut h = [0u8; 28];
        match c.read_exact(&mut h) {
            Ok(()) => {}
            // A client that closes without NBD_CMD_DISC (QEMU killed).
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(stats),
            Err(e) => return Err(e.into()),
        }
        if be32(&h) != REQUEST_MAGIC {
            return Err(NbdError::Protocol("bad request magic".into()));
        }
        let (flags, cmd, cookie) = (be16(&h[4..]), be16(&h[6..]), be64(&h[8..]));
        let (offset, len) = (be64(&h[16..]), be32(&h[24..]));
        let in_range = offset.checked_add(u64::from(len)).is_some_and(|end| end <= size);
        match cmd {
            CMD_WRITE => {
                if len > MAX_PAYLOAD {
                    return Err(NbdError::Protocol(format!("write of {len} bytes")));
                }
                buf.resize(len as usize, 0);
                c.read_exact(&mut buf)?;
                let mut err = if in_range { 0 } else { EINVAL };
                if err == 0 {
                    err = match target.write(offset, &buf) {
                        Ok(()) => 0,
                        Err(e) => {
                            tracing::warn!(error = %e, offset, len, "mirror write failed");
                            errno_of(&e)
                        }
                    };
                }
                if err == 0 && flags & CMD_FLAG_FUA != 0 {
                    err = target.flush().err().map_or(0, |e| errno_of(&e));
                }
                if err == 0 {
                    stats.writes += 1;
                    stats.bytes_written += u64::from(len);
                }
                reply(c, err, cookie)?;
            }
            CMD_READ => {
                if len > MAX_PAYLOAD {
                    return Err(NbdError::Protocol(format!("read of {len} bytes")));
                }
                buf.resize(len as usize, 0);
                let err = if !in_range {
                    EINVAL
                } else {
                    target.read(offset, &mut buf).err().map_or(0, |e| errno_of(&e))
                };
                reply(c, err, cookie)?;
                if err == 0 {
                    c.write_all(&buf)?;
                }
            }
            CMD_FLUSH => {
                let err = target.flush().err().map_or(0, |e| errno_of(&e));
                stats.flushes += 1;
                reply(c, err, cookie)?;
            }
            CMD_DISC => {
                c.flush()?;
                return Ok(stats);
            }
            _ => reply(c, ENOTSUP, cookie)?,
        }
        // Replies go out as soon as nothing more is waiting to be read.
        c.flush()?;
    }
}

#[cfg(test)]
mod tests;
