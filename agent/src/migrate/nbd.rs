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
//! this server lacks (structured replies, meta contexts, TLS) are answered
//! "unsupported", and QEMU's client falls back to what is offered.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::TcpStream;

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
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_INVALID: u32 = 0x8000_0003;
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

/// Serves one client on `stream` until it disconnects: the export is
/// `target`, under the name `export` (any other name is refused).
pub fn serve(stream: TcpStream, export: &str, target: &dyn BlockTarget) -> Result<ServeStats, NbdError> {
    stream.set_nodelay(true)?;
    let mut r = BufReader::with_capacity(1 << 20, stream.try_clone()?);
    let mut w = BufWriter::with_capacity(64 << 10, stream);
    if !handshake(&mut r, &mut w, export, target.size())? {
        return Err(NbdError::NoExport);
    }
    transmission(&mut r, &mut w, target)
}

fn opt_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    w.write_all(&OPT_REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&opt.to_be_bytes())?;
    w.write_all(&kind.to_be_bytes())?;
    w.write_all(&(data.len() as u32).to_be_bytes())?;
    w.write_all(data)
}

/// The handshake up to transmission; false when the client aborted.
fn handshake(r: &mut impl Read, w: &mut impl Write, export: &str, size: u64) -> Result<bool, NbdError> {
    let tflags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
    w.write_all(&NBDMAGIC.to_be_bytes())?;
    w.write_all(&IHAVEOPT.to_be_bytes())?;
    w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
    w.flush()?;
    let mut b4 = [0u8; 4];
    r.read_exact(&mut b4)?;
    let no_zeroes = be32(&b4) & CLIENT_NO_ZEROES != 0;
    loop {
        let mut h = [0u8; 16];
        r.read_exact(&mut h)?;
        if be64(&h) != IHAVEOPT {
            return Err(NbdError::Protocol("bad option magic".into()));
        }
        let (opt, len) = (be32(&h[8..]), be32(&h[12..]));
        if len > MAX_OPTION {
            return Err(NbdError::Protocol(format!("option {opt} of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                if data != export.as_bytes() {
                    // This option has no error reply: the connection closes.
                    return Err(NbdError::Protocol("unknown export name".into()));
                }
                w.write_all(&size.to_be_bytes())?;
                w.write_all(&tflags.to_be_bytes())?;
                if !no_zeroes {
                    w.write_all(&[0u8; 124])?;
                }
                w.flush()?;
                return Ok(true);
            }
            OPT_GO | OPT_INFO => {
                let name = (data.len() >= 6)
                    .then(|| be32(&data) as usize)
                    .filter(|&n| 4 + n + 2 <= data.len())
                    .map(|n| (&data[4..4 + n], be16(&data[4 + n..]) as usize, 6 + n));
                let Some((name, asked, at)) = name else {
                    opt_reply(w, opt, REP_ERR_INVALID, b"malformed")?;
                    w.flush()?;
                    continue;
                };
                if name != export.as_bytes() {
                    opt_reply(w, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    w.flush()?;
                    continue;
                }
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&tflags.to_be_bytes());
                opt_reply(w, opt, REP_INFO, &info)?;
                let wants_sizes = (0..asked)
                    .filter_map(|k| data.get(at + 2 * k..at + 2 * k + 2))
                    .any(|t| be16(t) == INFO_BLOCK_SIZE);
                if wants_sizes {
                    let mut bs = Vec::with_capacity(14);
                    bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    bs.extend_from_slice(&1u32.to_be_bytes());
                    bs.extend_from_slice(&4096u32.to_be_bytes());
                    bs.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                    opt_reply(w, opt, REP_INFO, &bs)?;
                }
                opt_reply(w, opt, REP_ACK, &[])?;
                w.flush()?;
                if opt == OPT_GO {
                    return Ok(true);
                }
            }
            OPT_ABORT => {
                opt_reply(w, opt, REP_ACK, &[])?;
                w.flush()?;
                return Ok(false);
            }
            _ => {
                opt_reply(w, opt, REP_ERR_UNSUP, &[])?;
                w.flush()?;
            }
        }
    }
}

fn reply(w: &mut impl Write, err: u32, cookie: u64) -> std::io::Result<()> {
    w.write_all(&SIMPLE_REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&err.to_be_bytes())?;
    w.write_all(&cookie.to_be_bytes())
}

fn transmission(
    r: &mut impl Read,
    w: &mut impl Write,
    target: &dyn BlockTarget,
) -> Result<ServeStats, NbdError> {
    let size = target.size();
    let mut stats = ServeStats::default();
    let mut buf = Vec::new();
    loop {
        let mut h = [0u8; 28];
        match r.read_exact(&mut h) {
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
                r.read_exact(&mut buf)?;
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
                reply(w, err, cookie)?;
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
                reply(w, err, cookie)?;
                if err == 0 {
                    w.write_all(&buf)?;
                }
            }
            CMD_FLUSH => {
                let err = target.flush().err().map_or(0, |e| errno_of(&e));
                stats.flushes += 1;
                reply(w, err, cookie)?;
            }
            CMD_DISC => {
                w.flush()?;
                return Ok(stats);
            }
            _ => reply(w, ENOTSUP, cookie)?,
        }
        // Replies go out as soon as nothing more is waiting to be read.
        w.flush()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::Mutex;

    struct Mem(Mutex<Vec<u8>>);

    impl BlockTarget for Mem {
        fn size(&self) -> u64 {
            self.0.lock().expect("lock").len() as u64
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            let mut m = self.0.lock().expect("lock");
            m[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            let m = self.0.lock().expect("lock");
            buf.copy_from_slice(&m[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A client as QEMU's speaks it: GO with the export's name; returns
    /// the connection, or the option's error reply type.
    fn go(addr: std::net::SocketAddr, name: &str) -> Result<(TcpStream, u64), u32> {
        let mut s = TcpStream::connect(addr).expect("connect");
        let mut g = [0u8; 18];
        s.read_exact(&mut g).expect("greeting");
        assert_eq!(be64(&g), NBDMAGIC);
        s.write_all(&CLIENT_NO_ZEROES.to_be_bytes()).expect("flags");
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let mut o = IHAVEOPT.to_be_bytes().to_vec();
        o.extend_from_slice(&OPT_GO.to_be_bytes());
        o.extend_from_slice(&(data.len() as u32).to_be_bytes());
        o.extend_from_slice(&data);
        s.write_all(&o).expect("option");
        let mut size = 0;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).expect("option reply");
            let mut body = vec![0u8; be32(&h[16..]) as usize];
            s.read_exact(&mut body).expect("body");
            match be32(&h[12..]) {
                REP_ACK => return Ok((s, size)),
                REP_INFO if be16(&body) == INFO_EXPORT => size = be64(&body[2..]),
                REP_INFO => {}
                err => return Err(err),
            }
        }
    }

    fn request(s: &mut TcpStream, cmd: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) -> u32 {
        let mut h = REQUEST_MAGIC.to_be_bytes().to_vec();
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&cmd.to_be_bytes());
        h.extend_from_slice(&cookie.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(data);
        s.write_all(&h).expect("request");
        let mut rep = [0u8; 16];
        s.read_exact(&mut rep).expect("reply");
        assert_eq!(be32(&rep), SIMPLE_REPLY_MAGIC);
        assert_eq!(be64(&rep[8..]), cookie);
        be32(&rep[4..])
    }

    #[test]
    fn writes_reads_and_flushes_reach_the_target_and_other_names_are_refused() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let target = std::sync::Arc::new(Mem(Mutex::new(vec![0u8; 8192])));
        let t = std::sync::Arc::clone(&target);
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().expect("accept");
            let wrong = serve(s, "secret", t.as_ref());
            let (s, _) = l.accept().expect("accept");
            (wrong, serve(s, "secret", t.as_ref()))
        });
        match go(addr, "guess") {
            Err(e) => assert_eq!(e, REP_ERR_UNKNOWN),
            Ok(_) => panic!("a wrong export name was taken"),
        }
        let (mut s, size) = go(addr, "secret").expect("the right name");
        assert_eq!(size, 8192);
        assert_eq!(request(&mut s, CMD_WRITE, 7, 100, 3, b"abc"), 0);
        assert_eq!(
            request(&mut s, CMD_WRITE, 8, 8190, 3, b"xyz"),
            EINVAL,
            "past the end"
        );
        assert_eq!(request(&mut s, CMD_FLUSH, 9, 0, 0, &[]), 0);
        assert_eq!(request(&mut s, CMD_READ, 10, 99, 5, &[]), 0);
        let mut got = [0u8; 5];
        s.read_exact(&mut got).expect("read data");
        assert_eq!(&got, b"\0abc\0");
        s.write_all(&{
            let mut h = REQUEST_MAGIC.to_be_bytes().to_vec();
            h.extend_from_slice(&[0, 0, 0, CMD_DISC as u8]);
            h.extend_from_slice(&[0u8; 20]);
            h
        })
        .expect("disc");
        let (wrong, ok) = server.join().expect("server");
        assert!(wrong.is_err(), "the connection with a wrong name serves nothing");
        let stats = ok.expect("served");
        assert_eq!((stats.writes, stats.bytes_written, stats.flushes), (1, 3, 1));
        assert_eq!(&target.0.lock().expect("lock")[100..103], b"abc");
    }
}
