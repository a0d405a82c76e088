//! The coordinator binary over HTTPS with a throwaway cluster: who gets in
//! (cluster certificates, the operator token), who may do what (an edge
//! only as itself), revocation, refusing to start open, and what
//! unauthenticated clients can make it hold (issue 21, findings 2, 3, 5).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use edgeshift_common::identity::{self, IssuedPem, Role};
use edgeshift_testbed::coordinator::{CoordinatorProc, CoordinatorSpec, CoordinatorTls};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};

const OPERATOR_TOKEN: &str = "operator-token-0123456789";

/// A cluster in a temporary directory: its CA, the coordinator's files.
struct Cluster {
    dir: tempfile::TempDir,
    ca: IssuedPem,
}

impl Cluster {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = identity::new_ca("test", 30).expect("CA");
        std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem).expect("write CA");
        let c = identity::issue(&ca, Role::Coordinator, "coord", &["127.0.0.1".into()], 30).expect("issue");
        write_pair(dir.path(), "coord", &c);
        Cluster { dir, ca }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn tls(&self, crl: Option<PathBuf>) -> CoordinatorTls {
        CoordinatorTls {
            ca: self.path("ca.pem"),
            cert: self.path("coord.pem"),
            key: self.path("coord.key"),
            crl,
        }
    }

    fn start(&self, crl: Option<PathBuf>, extra: &[&str]) -> CoordinatorProc {
        let mut spec = CoordinatorSpec::new(
            "127.0.0.1:0",
            &self.path("data"),
            self.tls(crl),
            Some(OPERATOR_TOKEN),
        );
        spec.extra = extra.iter().map(|a| a.to_string()).collect();
        let bin = Path::new(env!("CARGO_BIN_EXE_edgeshift-coordinator"));
        CoordinatorProc::start_local(bin, spec).expect("start edgeshift-coordinator")
    }

    fn issue(&self, role: Role, name: &str) -> IssuedPem {
        identity::issue(&self.ca, role, name, &[], 30).expect("issue")
    }
}

fn write_pair(dir: &Path, name: &str, p: &IssuedPem) {
    std::fs::write(dir.join(format!("{name}.pem")), &p.cert_pem).expect("write cert");
    std::fs::write(dir.join(format!("{name}.key")), &p.key_pem).expect("write key");
}

/// A client of the coordinator: trusts `ca`, presents `cert` if given.
struct Client {
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
}

impl Client {
    fn new(ca_pem: &str, cert: Option<&IssuedPem>, addr: SocketAddr) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c.expect("CA PEM")).expect("CA");
        }
        let builder = rustls::ClientConfig::builder_with_provider(identity::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots);
        let config = match cert {
            Some(c) => {
                let chain = CertificateDer::pem_slice_iter(c.cert_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("cert PEM");
                let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).expect("key PEM");
                builder.with_client_auth_cert(chain, key).expect("client cert")
            }
            None => builder.with_no_client_auth(),
        };
        Client {
            config: Arc::new(config),
            addr,
        }
    }

    /// One request on a new connection: the status and the JSON answer, or
    /// the error if the TLS handshake or the connection failed.
    fn try_req(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> Result<(u16, Value), String> {
        let name = ServerName::try_from("127.0.0.1").expect("name");
        let conn = rustls::ClientConnection::new(self.config.clone(), name).map_err(|e| e.to_string())?;
        let tcp = TcpStream::connect(self.addr).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: coord\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        tls.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
        tls.write_all(body.as_bytes()).map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        if let Err(e) = tls.read_to_end(&mut answer) {
            // A close without close_notify after a full answer is fine.
            if answer.is_empty() {
                return Err(e.to_string());
            }
        }
        let text = String::from_utf8_lossy(&answer);
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status line in {text:?}"))?;
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        let json = serde_json::from_str(body).unwrap_or(Value::String(body.to_string()));
        Ok((status, json))
    }

    fn req(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.try_req(method, path, body, None)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }
}

fn register_body() -> Value {
    json!({ "addr": "127.0.0.1:7700", "capacity": 1u64 << 30 })
}

#[test]
fn a_client_without_a_cluster_certificate_is_refused() {
    let cluster = Cluster::new();
    let c = cluster.start(None, &[]);
    // TLS, but no certificate and no token: 401, nothing changed.
    let anonymous = Client::new(&cluster.ca.cert_pem, None, c.addr);
    let (s, v) = anonymous.req("POST", "/v1/edges/e1/register", Some(register_body()));
    assert_eq!(s, 401, "{v}");
    assert_eq!(anonymous.req("GET", "/metrics", None).0, 401);
    assert_eq!(
        anonymous
            .try_req("GET", "/v1/policy", None, Some("wrong-token-0123456789"))
            .expect("answer")
            .0,
        401
    );
    // A certificate of another cluster: the handshake fails.
    let other_ca = identity::new_ca("other", 30).expect("CA");
    let stranger = identity::issue(&other_ca, Role::Edge, "e1", &[], 30).expect("issue");
    let outsider = Client::new(&cluster.ca.cert_pem, Some(&stranger), c.addr);
    assert!(
        outsider.try_req("GET", "/v1/policy", None, None).is_err(),
        "a foreign certificate got in"
    );
    // Plain HTTP to the HTTPS port gets no answer from the API.
    let mut plain = TcpStream::connect(c.addr).expect("connect");
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    plain
        .write_all(b"GET /v1/policy HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let mut buf = Vec::new();
    let _ = plain.read_to_end(&mut buf);
    assert!(
        !String::from_utf8_lossy(&buf).contains("watermarks"),
        "plain HTTP was served"
    );
    // The operator's token alone is enough for the operator's routes.
    let (s, v) = anonymous
        .try_req("GET", "/v1/policy", None, Some(OPERATOR_TOKEN))
        .expect("answer");
    assert_eq!(s, 200, "{v}");
    let e1 = Client::new(
        &cluster.ca.cert_pem,
        Some(&cluster.issue(Role::Operator, "alice")),
        c.addr,
    );
    assert_eq!(
        e1.req("GET", "/v1/edges/e1", None).0,
        404,
        "the refused register must not have happened"
    );
}

#[test]
fn an_edge_cannot_act_as_another_or_change_the_fleet() {
    let cluster = Cluster::new();
    let c = cluster.start(None, &[]);
    let ca = &cluster.ca.cert_pem;
    let e1 = Client::new(ca, Some(&cluster.issue(Role::Edge, "e1")), c.addr);
    let e2 = Client::new(ca, Some(&cluster.issue(Role::Edge, "e2")), c.addr);
    let operator = Client::new(ca, Some(&cluster.issue(Role::Operator, "alice")), c.addr);
    assert_eq!(
        e1.req("POST", "/v1/edges/e1/register", Some(register_body())).0,
        200
    );
    assert_eq!(
        e2.req("POST", "/v1/edges/e2/register", Some(register_body())).0,
        200
    );
    // Registering another (or a new) edge.
    let (s, v) = e1.req("POST", "/v1/edges/e3/register", Some(register_body()));
    assert_eq!(s, 403, "{v}");
    let (s, v) = e1.req(
        "POST",
        "/v1/edges/e2/register",
        Some(json!({"addr": "6.6.6.6:1", "capacity": 1})),
    );
    assert_eq!(s, 403, "{v}");
    // Reporting and pinning as another edge.
    let m = hex::encode(
        edgeshift_common::Manifest::new(
            edgeshift_common::ChunkSize::new(4096).expect("size"),
            4096,
            vec![edgeshift_common::Fingerprint::of(b"x")],
        )
        .to_bytes(),
    );
    let (s, v) = e1.req("POST", "/v1/manifests", Some(json!({ "manifest_hex": m })));
    assert_eq!(s, 200, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    let (s, v) = e1.req("POST", "/v1/edges/e2/pins", Some(json!({ "manifest": id })));
    assert_eq!(s, 403, "{v}");
    let (s, v) = e1.req(
        "PUT",
        "/v1/edges/e2/inventory",
        Some(json!({ "chunks": [], "usage": 0 })),
    );
    assert_eq!(s, 403, "{v}");
    let (s, v) = e1.req("POST", "/v1/edges/e2/delta", Some(json!({ "usage": 0 })));
    assert_eq!(s, 403, "{v}");
    // The fleet's policy (the attack of finding 5) and hints.
    let low = json!({ "high_watermark": 0.002, "low_watermark": 0.001 });
    let (s, v) = e1.req("PUT", "/v1/policy", Some(low.clone()));
    assert_eq!(s, 403, "{v}");
    let (s, v) = e1.req("POST", "/v1/hints", Some(json!({ "manifest": id, "edge": "e2" })));
    assert_eq!(s, 403, "{v}");
    let (_, info) = operator.req("GET", "/v1/edges/e2", None);
    assert_eq!(
        (info["addr"].as_str(), info["pinned_chunks"].as_u64()),
        (Some("127.0.0.1:7700"), Some(0)),
        "{info}"
    );
    // What each may do.
    assert_eq!(
        e2.req("POST", "/v1/edges/e2/pins", Some(json!({ "manifest": id })))
            .0,
        200
    );
    assert_eq!(operator.req("PUT", "/v1/policy", Some(low)).0, 200);
    assert_eq!(operator.req("DELETE", "/v1/edges/e1", None).0, 204);
    assert_eq!(operator.req("GET", "/v1/edges/e1", None).0, 404);
}

#[test]
fn a_revoked_or_expired_certificate_is_refused() {
    let cluster = Cluster::new();
    let good = cluster.issue(Role::Edge, "e1");
    let revoked = cluster.issue(Role::Edge, "e2");
    let crl = identity::revoke(&cluster.ca, std::slice::from_ref(&revoked.cert_pem), None).expect("CRL");
    std::fs::write(cluster.path("crl.pem"), crl).expect("write CRL");
    let c = cluster.start(Some(cluster.path("crl.pem")), &[]);
    let ca = &cluster.ca.cert_pem;
    let e1 = Client::new(ca, Some(&good), c.addr);
    assert_eq!(
        e1.req("POST", "/v1/edges/e1/register", Some(register_body())).0,
        200
    );
    let e2 = Client::new(ca, Some(&revoked), c.addr);
    let got = e2.try_req("POST", "/v1/edges/e2/register", Some(register_body()), None);
    assert!(got.is_err(), "a revoked certificate got in: {got:?}");
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    let old = identity::issue_with_validity(&cluster.ca, Role::Edge, "e3", &[], now - 10 * day, now - day)
        .expect("issue");
    let e3 = Client::new(ca, Some(&old), c.addr);
    let got = e3.try_req("POST", "/v1/edges/e3/register", Some(register_body()), None);
    assert!(got.is_err(), "an expired certificate got in: {got:?}");
}

/// Runs the binary expecting it to refuse to start; returns its stderr.
fn refuses(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgeshift-coordinator"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} started: {stderr}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening on"),
        "{args:?} listened"
    );
    stderr
}

#[test]
fn it_will_not_start_open_without_the_explicit_flag() {
    let cluster = Cluster::new();
    let data = cluster.path("data");
    let data = data.to_str().expect("utf-8");
    let missing = cluster.path("nope.pem");
    let missing = missing.to_str().expect("utf-8");
    let base = ["--config", "/dev/null", "--listen", "127.0.0.1:0", "--data", data];
    let ca = cluster.path("ca.pem");
    let ca = ca.to_str().expect("utf-8");
    let err = refuses(
        &[
            &base[..],
            &["--tls-ca", ca, "--tls-cert", missing, "--tls-key", missing],
        ]
        .concat(),
    );
    assert!(
        err.contains("nope.pem") && err.contains("--insecure-no-auth"),
        "{err}"
    );
    let token = cluster.path("token");
    std::fs::write(&token, OPERATOR_TOKEN).expect("token");
    let err = refuses(&[&base[..], &["--token-file", token.to_str().expect("utf-8")]].concat());
    assert!(err.contains("--operator-token-file"), "{err}");
    // An edge's certificate does not make a coordinator.
    write_pair(cluster.dir.path(), "e1", &cluster.issue(Role::Edge, "e1"));
    let (cert, key) = (cluster.path("e1.pem"), cluster.path("e1.key"));
    let err = refuses(
        &[
            &base[..],
            &[
                "--tls-ca",
                ca,
                "--tls-cert",
                cert.to_str().expect("utf-8"),
                "--tls-key",
                key.to_str().expect("utf-8"),
            ],
        ]
        .concat(),
    );
    assert!(err.contains("not of a coordinator"), "{err}");
    // With the flag it starts, open, and says so.
    let log = cluster.path("open.log");
    let mut spec = CoordinatorSpec::insecure("127.0.0.1:0", &cluster.path("data"));
    spec.log = Some(log.clone());
    let bin = Path::new(env!("CARGO_BIN_EXE_edgeshift-coordinator"));
    let open = CoordinatorProc::start_local(bin, spec).expect("starts with --insecure-no-auth");
    assert!(open.url.starts_with("http://"), "{}", open.url);
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.contains("WARN") && text.contains("--insecure-no-auth"),
        "{text}"
    );
}

/// Request-counter series in `/metrics`.
fn request_series(operator: &Client) -> usize {
    let (s, v) = operator.req("GET", "/metrics", None);
    assert_eq!(s, 200);
    v.as_str()
        .expect("metrics text")
        .lines()
        .filter(|l| l.starts_with("coordinator_http_requests_total{"))
        .count()
}

#[test]
fn junk_requests_without_a_credential_add_no_metric_series() {
    // Finding 2: every new method name on the 401 path added a series.
    let cluster = Cluster::new();
    let c = cluster.start(None, &[]);
    let operator = Client::new(
        &cluster.ca.cert_pem,
        Some(&cluster.issue(Role::Operator, "alice")),
        c.addr,
    );
    let anonymous = Client::new(&cluster.ca.cert_pem, None, c.addr);
    anonymous.req("GET", "/v1/policy", None);
    let before = request_series(&operator);
    for i in 0..300 {
        let (s, _) = anonymous.req(&format!("JUNK{i}"), &format!("/v1/no/such/{i}"), None);
        assert!((400..500).contains(&s), "junk request {i} got {s}");
    }
    let after = request_series(&operator);
    assert!(
        after <= before + 4,
        "300 junk requests took the request counter from {before} to {after} series"
    );
}

#[test]
fn silent_connections_are_closed_within_the_header_timeout() {
    // Finding 3, on the TLS port: a connection that never finishes its
    // handshake is closed, and does not keep a real client out.
    let cluster = Cluster::new();
    let c = cluster.start(None, &["--header-timeout", "1"]);
    let mut silent: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(c.addr).expect("connect"))
        .collect();
    let operator = Client::new(
        &cluster.ca.cert_pem,
        Some(&cluster.issue(Role::Operator, "alice")),
        c.addr,
    );
    let started = Instant::now();
    assert_eq!(operator.req("GET", "/v1/policy", None).0, 200);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    for (i, s) in silent.iter_mut().enumerate() {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        s.set_read_timeout(Some(left)).expect("timeout");
        match s.read(&mut [0u8; 64]) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("silent connection {i} still open after the 1 s timeout: {e}"),
        }
    }
}
