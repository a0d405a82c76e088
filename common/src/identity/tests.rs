use std::time::{Duration, SystemTime};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

use super::*;

/// A cluster's files in a temporary directory.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        Files {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// Writes `ca.pem` (all of `cas`), `NAME.pem`, `NAME.key` and returns the paths.
    fn write(&self, cas: &[&IssuedPem], name: &str, cert: &IssuedPem, crl: Option<&str>) -> TlsFiles {
        let d = self.dir.path();
        let ca_pem: String = cas.iter().map(|c| c.cert_pem.as_str()).collect();
        std::fs::write(d.join("ca.pem"), ca_pem).expect("write");
        std::fs::write(d.join(format!("{name}.pem")), &cert.cert_pem).expect("write");
        std::fs::write(d.join(format!("{name}.key")), &cert.key_pem).expect("write");
        let crl = crl.map(|text| {
            let p = d.join("crl.pem");
            std::fs::write(&p, text).expect("write");
            p
        });
        TlsFiles {
            ca: d.join("ca.pem"),
            cert: d.join(format!("{name}.pem")),
            key: d.join(format!("{name}.key")),
            crl,
        }
    }

    fn load(&self, cas: &[&IssuedPem], name: &str, cert: &IssuedPem, crl: Option<&str>) -> Credentials {
        Credentials::load(&self.write(cas, name, cert, crl)).expect("load credentials")
    }
}

/// Runs a TLS handshake in memory; on success each side's view of the other.
fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    dialled: &str,
) -> Result<(PeerIdentity, PeerIdentity), rustls::Error> {
    let name = ServerName::try_from(dialled.to_string()).expect("server name");
    let mut s = ServerConnection::new(server)?;
    let mut c = ClientConnection::new(client, name)?;
    let mut buf = Vec::new();
    for _ in 0..16 {
        buf.clear();
        while c.wants_write() {
            c.write_tls(&mut buf).expect("to memory");
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).expect("from memory");
            s.process_new_packets()?;
        }
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).expect("to memory");
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).expect("from memory");
            c.process_new_packets()?;
        }
        if !s.is_handshaking() && !c.is_handshaking() && !c.wants_write() && !s.wants_write() {
            let seen_by_server = peer_identity(s.peer_certificates()).expect("client identity");
            let seen_by_client = peer_identity(c.peer_certificates()).expect("server identity");
            return Ok((seen_by_server, seen_by_client));
        }
    }
    panic!("handshake did not finish");
}

fn edge(name: &str) -> PeerIdentity {
    PeerIdentity {
        role: Role::Edge,
        name: name.into(),
    }
}

struct Cluster {
    ca: IssuedPem,
    a: IssuedPem,
    b: IssuedPem,
}

fn cluster(name: &str) -> Cluster {
    let ca = new_ca(name, 30).expect("ca");
    let a = issue(&ca, Role::Edge, "edge-a", &["127.0.0.1".into()], 30).expect("a");
    let b = issue(&ca, Role::Edge, "edge-b", &[], 30).expect("b");
    Cluster { ca, a, b }
}

#[test]
fn edges_of_one_cluster_learn_each_other_from_their_certificates() {
    let k = cluster("test");
    let (fa, fb) = (Files::new(), Files::new());
    let a = fa.load(&[&k.ca], "edge-a", &k.a, None);
    let b = fb.load(&[&k.ca], "edge-b", &k.b, None);
    assert_eq!(a.identity(), &edge("edge-a"));
    assert_eq!(
        identity_of(&CertificateDer::from_pem_slice(k.b.cert_pem.as_bytes()).expect("pem")).expect("id"),
        edge("edge-b")
    );
    // Dialled by address: the name comes from the certificate.
    let (seen_by_a, seen_by_b) =
        handshake(a.server_config(), b.edge_client_config(), "10.9.8.7").expect("handshake");
    assert_eq!((seen_by_a, seen_by_b), (edge("edge-b"), edge("edge-a")));
    // The name-checking client accepts the right name (or an IP SAN), not another.
    handshake(a.server_config(), b.client_config(), "edge-a").expect("by name");
    handshake(a.server_config(), b.client_config(), "127.0.0.1").expect("by IP SAN");
    assert!(handshake(a.server_config(), b.client_config(), "edge-b").is_err());
}

#[test]
fn a_certificate_of_another_ca_is_refused_both_ways() {
    let k = cluster("test");
    let other = cluster("test"); // same cluster name, different key
    let (fa, fx) = (Files::new(), Files::new());
    let a = fa.load(&[&k.ca], "edge-a", &k.a, None);
    let intruder = fx.load(&[&other.ca], "edge-b", &other.b, None);
    let e =
        handshake(a.server_config(), intruder.edge_client_config(), "x").expect_err("client of another CA");
    assert!(matches!(e, rustls::Error::InvalidCertificate(_)), "{e:?}");
    let e =
        handshake(intruder.server_config(), a.edge_client_config(), "x").expect_err("server of another CA");
    assert!(matches!(e, rustls::Error::InvalidCertificate(_)), "{e:?}");
    assert!(handshake(intruder.server_config(), a.client_config(), "edge-b").is_err());
}

#[test]
fn no_client_certificate_is_refused() {
    let k = cluster("test");
    let fa = Files::new();
    let a = fa.load(&[&k.ca], "edge-a", &k.a, None);
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(k.ca.cert_pem.as_bytes()).expect("pem"))
        .expect("root");
    let anonymous = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let e = handshake(a.server_config(), Arc::new(anonymous), "edge-a").expect_err("anonymous client");
    assert!(matches!(e, rustls::Error::NoCertificatesPresented), "{e:?}");
}

#[test]
fn a_revoked_certificate_is_refused_and_revocations_accumulate() {
    let k = cluster("test");
    let c = issue(&k.ca, Role::Edge, "edge-c", &[], 30).expect("c");
    let crl = revoke(&k.ca, std::slice::from_ref(&k.b.cert_pem), None).expect("crl");
    let (fa, fb, fc) = (Files::new(), Files::new(), Files::new());
    let a = fa.load(&[&k.ca], "edge-a", &k.a, Some(&crl));
    let b = fb.load(&[&k.ca], "edge-b", &k.b, Some(&crl));
    let c_creds = fc.load(&[&k.ca], "edge-c", &c, Some(&crl));
    let e = handshake(a.server_config(), b.edge_client_config(), "x").expect_err("revoked client");
    assert!(
        matches!(
            e,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
        ),
        "{e:?}"
    );
    let e = handshake(b.server_config(), a.edge_client_config(), "x").expect_err("revoked server");
    assert!(
        matches!(
            e,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
        ),
        "{e:?}"
    );
    handshake(a.server_config(), c_creds.edge_client_config(), "x").expect("c is not revoked");
    // A second revocation keeps the first.
    let crl2 = revoke(&k.ca, std::slice::from_ref(&c.cert_pem), Some(&crl)).expect("crl2");
    let fa2 = Files::new();
    let a2 = fa2.load(&[&k.ca], "edge-a", &k.a, Some(&crl2));
    assert!(handshake(a2.server_config(), c_creds.edge_client_config(), "x").is_err());
    assert!(handshake(a2.server_config(), b.edge_client_config(), "x").is_err());
    // A certificate of another CA cannot be put on this CA's list.
    let other = cluster("other");
    assert!(revoke(&k.ca, &[other.a.cert_pem], None).is_err());
}

#[test]
fn an_expired_certificate_is_refused() {
    let k = cluster("test");
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let old = issue_with_validity(&k.ca, Role::Edge, "edge-b", &[], now - day * 10, now - day).expect("old");
    let (fa, fb) = (Files::new(), Files::new());
    let a = fa.load(&[&k.ca], "edge-a", &k.a, None);
    let b = fb.load(&[&k.ca], "edge-b", &old, None);
    let e = handshake(a.server_config(), b.edge_client_config(), "x").expect_err("expired client");
    assert!(
        matches!(
            e,
            rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext { .. })
        ),
        "{e:?}"
    );
    assert!(handshake(b.server_config(), a.edge_client_config(), "x").is_err());
}

#[test]
fn two_cas_in_ca_pem_trust_both_during_a_rollover() {
    let old = cluster("prod");
    let new = cluster("prod"); // the rollover keeps the cluster's name
                               // Only the old CA has a CRL so far: the new CA's certificates have no
                               // authoritative CRL and must still be accepted.
    let crl = revoke(&old.ca, &[], None).expect("empty crl");
    let (fa, fb) = (Files::new(), Files::new());
    let a_old = fa.load(&[&old.ca, &new.ca], "edge-a", &old.a, Some(&crl));
    let b_new = fb.load(&[&old.ca, &new.ca], "edge-b", &new.b, Some(&crl));
    let (x, y) =
        handshake(a_old.server_config(), b_new.edge_client_config(), "x").expect("old server, new client");
    assert_eq!((x, y), (edge("edge-b"), edge("edge-a")));
    handshake(b_new.server_config(), a_old.edge_client_config(), "x").expect("new server, old client");
    // After the rollover (old CA removed) the old certificate is refused.
    let fc = Files::new();
    let b_only_new = fc.load(&[&new.ca], "edge-b", &new.b, None);
    assert!(handshake(b_only_new.server_config(), a_old.edge_client_config(), "x").is_err());
}

#[test]
fn edge_peers_must_be_edges() {
    let k = cluster("test");
    let coord = issue(&k.ca, Role::Coordinator, "coord", &["localhost".into()], 30).expect("coord");
    let (fa, fc) = (Files::new(), Files::new());
    let a = fa.load(&[&k.ca], "edge-a", &k.a, None);
    let c = fc.load(&[&k.ca], "coord", &coord, None);
    assert_eq!(c.identity().role, Role::Coordinator);
    assert!(handshake(c.server_config(), a.edge_client_config(), "x").is_err());
    // ... while the name-checking client talks to the coordinator by host.
    let (_, seen) =
        handshake(c.server_config(), a.client_config(), "localhost").expect("coordinator by host");
    assert_eq!(seen.role, Role::Coordinator);
    // An operator certificate cannot serve (no serverAuth).
    let op = issue(&k.ca, Role::Operator, "alice", &[], 30).expect("operator");
    let fo = Files::new();
    let o = fo.load(&[&k.ca], "alice", &op, None);
    handshake(a.server_config(), o.client_config(), "edge-a").expect("operator as client");
    assert!(handshake(o.server_config(), a.client_config(), "alice").is_err());
}

#[test]
fn errors_name_the_file_and_secrets_stay_out_of_debug() {
    let k = cluster("test");
    let f = Files::new();
    let mut files = f.write(&[&k.ca], "edge-a", &k.a, None);
    let creds = Credentials::load(&files).expect("load");
    let shown = format!("{creds:?} {:?}", k.a);
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    assert!(
        !shown.contains(k.a.key_pem.lines().nth(1).expect("key line")),
        "{shown}"
    );
    files.key = f.dir.path().join("missing.key");
    let e = Credentials::load(&files).expect_err("missing key").to_string();
    assert!(
        e.contains("missing.key") && e.contains("edgeshift cluster"),
        "{e}"
    );
    // A key that does not go with the certificate.
    std::fs::write(f.dir.path().join("b.key"), &k.b.key_pem).expect("write");
    files.key = f.dir.path().join("b.key");
    let e = Credentials::load(&files).expect_err("wrong key").to_string();
    assert!(e.contains("b.key"), "{e}");
}

#[test]
fn names_are_checked() {
    let ca = new_ca("test", 1).expect("ca");
    for bad in ["", "-x", "a b", "a\nb", "é", &"x".repeat(64)] {
        assert!(issue(&ca, Role::Edge, bad, &[], 1).is_err(), "{bad:?}");
    }
    assert!(issue(&ca, Role::Edge, "edge_1.example-2", &[], 1).is_ok());
    assert!(new_ca("test", 0).is_err());
}
