//! The NBD server against a client written here (as QEMU's speaks it),
//! plaintext and over TLS.

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

/// The client's side of the greeting.
fn greeted(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    assert_eq!(be64(&g), NBDMAGIC);
    s.write_all(&CLIENT_NO_ZEROES.to_be_bytes()).expect("flags");
    s
}

fn send_option(s: &mut impl Write, opt: u32, data: &[u8]) {
    let mut o = IHAVEOPT.to_be_bytes().to_vec();
    o.extend_from_slice(&opt.to_be_bytes());
    o.extend_from_slice(&(data.len() as u32).to_be_bytes());
    o.extend_from_slice(data);
    s.write_all(&o).expect("option");
    s.flush().expect("flush");
}

/// One option reply: its type and body.
fn option_reply(s: &mut impl Read) -> std::io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    let mut body = vec![0u8; be32(&h[16..]) as usize];
    s.read_exact(&mut body)?;
    Ok((be32(&h[12..]), body))
}

/// GO with the export's name, as QEMU's client sends it: the export's
/// size, or the option's error reply type; an I/O error when the server
/// ends the session instead.
fn try_go_on(s: &mut (impl Read + Write), name: &str) -> std::io::Result<Result<u64, u32>> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    let mut o = IHAVEOPT.to_be_bytes().to_vec();
    o.extend_from_slice(&OPT_GO.to_be_bytes());
    o.extend_from_slice(&(data.len() as u32).to_be_bytes());
    o.extend_from_slice(&data);
    s.write_all(&o)?;
    s.flush()?;
    let mut size = 0;
    loop {
        let (kind, body) = option_reply(s)?;
        match kind {
            REP_ACK => return Ok(Ok(size)),
            REP_INFO if be16(&body) == INFO_EXPORT => size = be64(&body[2..]),
            REP_INFO => {}
            err => return Ok(Err(err)),
        }
    }
}

fn go_on(s: &mut (impl Read + Write), name: &str) -> Result<u64, u32> {
    try_go_on(s, name).expect("option haggling")
}

/// A client as QEMU's speaks it without TLS: GO with the export's name;
/// returns the connection, or the option's error reply type.
fn go(addr: std::net::SocketAddr, name: &str) -> Result<(TcpStream, u64), u32> {
    let mut s = greeted(addr);
    go_on(&mut s, name).map(|size| (s, size))
}

fn request(s: &mut (impl Read + Write), cmd: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) -> u32 {
    let mut h = REQUEST_MAGIC.to_be_bytes().to_vec();
    h.extend_from_slice(&0u16.to_be_bytes());
    h.extend_from_slice(&cmd.to_be_bytes());
    h.extend_from_slice(&cookie.to_be_bytes());
    h.extend_from_slice(&offset.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(data);
    s.write_all(&h).expect("request");
    s.flush().expect("flush");
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
        let wrong = serve(s, "secret", t.as_ref(), None);
        let (s, _) = l.accept().expect("accept");
        (wrong, serve(s, "secret", t.as_ref(), None))
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

mod over_tls {
    use std::sync::Arc;

    use edgeshift_common::identity::{issue, new_ca, Credentials, IssuedPem, Role, TlsFiles};
    use rustls::pki_types::ServerName;
    use rustls::{ClientConnection, StreamOwned};

    use super::*;

    const DST: &str = "edge-dst";
    const SRC: &str = "edge-src";

    fn creds(dir: &std::path::Path, ca: &IssuedPem, name: &str) -> Arc<Credentials> {
        let edge = issue(ca, Role::Edge, name, &[], 1).expect("issue");
        let d = dir.join(format!("{name}-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&d).expect("dir");
        let files = TlsFiles {
            ca: d.join("ca.pem"),
            cert: d.join("cert.pem"),
            key: d.join("key.pem"),
            crl: None,
        };
        std::fs::write(&files.ca, &ca.cert_pem).expect("write");
        std::fs::write(&files.cert, &edge.cert_pem).expect("write");
        std::fs::write(&files.key, &edge.key_pem).expect("write");
        Arc::new(Credentials::load(&files).expect("load"))
    }

    /// The server thread: each connection's result.
    type Served = std::thread::JoinHandle<Vec<Result<ServeStats, NbdError>>>;

    /// An export of 8 KiB served over TLS to `SRC` only, for `n`
    /// connections one after the other; their results.
    fn export(dst: &Credentials, n: usize) -> (std::net::SocketAddr, Arc<Mem>, Served) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let target = Arc::new(Mem(Mutex::new(vec![0u8; 8192])));
        let t = Arc::clone(&target);
        let tls = ExportTls {
            config: dst.server_config(),
            client: Some(SRC.into()),
        };
        let h = std::thread::spawn(move || {
            (0..n)
                .map(|_| {
                    let (s, _) = l.accept().expect("accept");
                    serve(s, "secret", t.as_ref(), Some(&tls))
                })
                .collect()
        });
        (addr, target, h)
    }

    /// STARTTLS, its ACK, then a TLS client with `me`'s certificate that
    /// checks the server is `DST`.
    fn start_tls(addr: std::net::SocketAddr, me: &Credentials) -> StreamOwned<ClientConnection, TcpStream> {
        let mut s = greeted(addr);
        send_option(&mut s, OPT_STARTTLS, &[]);
        let (kind, _) = option_reply(&mut s).expect("STARTTLS reply");
        assert_eq!(kind, REP_ACK);
        let name = ServerName::try_from(DST).expect("name");
        let conn = ClientConnection::new(me.client_config(), name).expect("client");
        StreamOwned::new(conn, s)
    }

    #[test]
    fn the_source_edge_writes_and_reads_over_tls() {
        let d = tempfile::tempdir().expect("tempdir");
        let ca = new_ca("test", 1).expect("ca");
        let (dst, src) = (creds(d.path(), &ca, DST), creds(d.path(), &ca, SRC));
        let (addr, target, server) = export(&dst, 1);
        let mut s = start_tls(addr, &src);
        send_option(&mut s, OPT_STARTTLS, &[]);
        let (kind, _) = option_reply(&mut s).expect("second STARTTLS");
        assert_eq!(kind, REP_ERR_INVALID, "TLS is up already");
        assert_eq!(go_on(&mut s, "secret"), Ok(8192));
        assert_eq!(request(&mut s, CMD_WRITE, 1, 10, 4, b"tls!"), 0);
        assert_eq!(request(&mut s, CMD_READ, 2, 10, 4, &[]), 0);
        let mut got = [0u8; 4];
        s.read_exact(&mut got).expect("read data");
        assert_eq!(&got, b"tls!");
        s.conn.send_close_notify();
        drop(s);
        let stats = server
            .join()
            .expect("server")
            .pop()
            .expect("one")
            .expect("served");
        assert_eq!(stats.writes, 1);
        assert_eq!(&target.0.lock().expect("lock")[10..14], b"tls!");
    }

    #[test]
    fn a_client_without_tls_gets_nothing() {
        let d = tempfile::tempdir().expect("tempdir");
        let ca = new_ca("test", 1).expect("ca");
        let dst = creds(d.path(), &ca, DST);
        let (addr, _target, server) = export(&dst, 2);
        // GO before TLS: refused with the code the spec names, and
        // the connection stays in option haggling.
        let mut s = greeted(addr);
        assert_eq!(go_on(&mut s, "secret"), Err(REP_ERR_TLS_REQD));
        send_option(&mut s, OPT_INFO, &[0, 0, 0, 0, 0, 0]);
        assert_eq!(option_reply(&mut s).expect("reply").0, REP_ERR_TLS_REQD);
        send_option(&mut s, OPT_ABORT, &[]);
        assert_eq!(option_reply(&mut s).expect("reply").0, REP_ACK);
        // EXPORT_NAME before TLS cannot be answered: the session ends.
        let mut s = greeted(addr);
        send_option(&mut s, OPT_EXPORT_NAME, b"secret");
        let mut b = [0u8; 8];
        assert!(
            s.read_exact(&mut b).is_err(),
            "no export size may follow EXPORT_NAME in plaintext"
        );
        let results = server.join().expect("server");
        assert!(matches!(results[0], Err(NbdError::NoExport)), "{:?}", results[0]);
        assert!(
            matches!(results[1], Err(NbdError::Refused(_))),
            "{:?}",
            results[1]
        );
    }

    #[test]
    fn another_edge_or_a_foreign_certificate_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let ca = new_ca("test", 1).expect("ca");
        let dst = creds(d.path(), &ca, DST);
        let other_edge = creds(d.path(), &ca, "edge-other");
        let rogue = new_ca("rogue", 1).expect("rogue ca");
        // A certificate under the source's name from another CA; its client
        // trusts the real CA so that only the server's check can stop it.
        let forged_pem = issue(&rogue, Role::Edge, SRC, &[], 1).expect("forged");
        let fd = d.path().join("forged");
        std::fs::create_dir_all(&fd).expect("dir");
        let files = TlsFiles {
            ca: fd.join("ca.pem"),
            cert: fd.join("cert.pem"),
            key: fd.join("key.pem"),
            crl: None,
        };
        std::fs::write(&files.ca, &ca.cert_pem).expect("write");
        std::fs::write(&files.cert, &forged_pem.cert_pem).expect("write");
        std::fs::write(&files.key, &forged_pem.key_pem).expect("write");
        let forged = Credentials::load(&files).expect("load");
        let (addr, target, server) = export(&dst, 2);
        for who in [&*other_edge, &forged] {
            let mut s = start_tls(addr, who);
            // The handshake or the first exchange fails: nothing is served.
            let r = try_go_on(&mut s, "secret");
            assert!(!matches!(r, Ok(Ok(_))), "an export was given: {r:?}");
        }
        let results = server.join().expect("server");
        assert!(
            matches!(&results[0], Err(NbdError::Refused(m)) if m.contains("edge-other")),
            "{:?}",
            results[0]
        );
        assert!(matches!(results[1], Err(NbdError::Tls(_))), "{:?}", results[1]);
        assert!(target.0.lock().expect("lock").iter().all(|&b| b == 0));
    }

    #[test]
    fn without_tls_here_starttls_is_refused_by_policy() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let target = Arc::new(Mem(Mutex::new(vec![0u8; 4096])));
        let t = Arc::clone(&target);
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().expect("accept");
            serve(s, "secret", t.as_ref(), None)
        });
        let mut s = greeted(addr);
        send_option(&mut s, OPT_STARTTLS, &[]);
        assert_eq!(option_reply(&mut s).expect("reply").0, REP_ERR_POLICY);
        assert_eq!(go_on(&mut s, "secret"), Ok(4096));
        drop(s);
        server.join().expect("server").expect("served");
    }
}
