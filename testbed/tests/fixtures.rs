//! The fixtures beside the namespaces: daemon readiness, the capability
//! guards, and the coordinator fixture against the real program (built by
//! cargo for this test's profile when it is out of date).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edgeshift_testbed::caps;
use edgeshift_testbed::coordinator::{CoordinatorProc, CoordinatorSpec};
use edgeshift_testbed::daemon::{self, wait_ready, DaemonError};

fn sh(script: &str) -> std::process::Child {
    Command::new("sh")
        .args(["-c", script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn sh")
}

#[test]
fn wait_ready_returns_the_ready_line_and_keeps_draining() {
    // The daemon writes more after its ready line: a closed pipe would kill it.
    let mut child = sh(
        "echo starting; echo 'listening on 127.0.0.1:9'; for i in $(seq 2000); do echo more $i; done; exit 7",
    );
    let line = wait_ready(&mut child, "sh", "listening on", Duration::from_secs(10)).expect("ready");
    assert_eq!(line, "listening on 127.0.0.1:9");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(7), "the daemon ran to its end");
}

#[test]
fn wait_ready_gives_up_on_a_silent_or_dead_daemon() {
    let mut silent = sh("sleep 30");
    let started = Instant::now();
    let err =
        wait_ready(&mut silent, "silent", "listening", Duration::from_millis(300)).expect_err("not ready");
    assert!(matches!(err, DaemonError::NotReady { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    daemon::kill(&mut silent);
    let mut dead = sh("echo bye");
    assert!(wait_ready(&mut dead, "dead", "listening", Duration::from_secs(10)).is_err());
    let _ = dead.wait();
}

#[test]
fn interrupt_stops_a_daemon_and_kills_one_that_ignores_it() {
    // SIGINT's default action, even when this test inherited it ignored (as
    // a background job of a non-interactive shell does).
    let mut polite = sh("exec env --default-signal=INT sleep 30");
    let started = Instant::now();
    daemon::interrupt(&mut polite, Duration::from_secs(10));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "SIGINT ends sleep at once"
    );
    let mut stubborn = sh("trap '' INT; sleep 30");
    let started = Instant::now();
    daemon::interrupt(&mut stubborn, Duration::from_millis(300));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "killed after the grace period"
    );
}

#[test]
fn capability_checks_name_what_is_missing() {
    assert_eq!(caps::missing(false, &["sh"], &["/"]), None);
    assert!(caps::has_tool("sh"));
    assert!(!caps::has_tool("edgeshift-no-such-tool"));
    assert!(caps::available("something present", true));
    if !caps::under_ci() {
        let why = caps::missing(false, &["edgeshift-no-such-tool"], &["/no/such/file"]).expect("missing");
        assert!(why.contains("edgeshift-no-such-tool missing"), "{why}");
        assert!(why.contains("/no/such/file missing"), "{why}");
    }
}

/// `GET path` with a bearer token; the status code.
fn get_status(addr: SocketAddr, path: &str, token: &str) -> u16 {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn coordinator_fixture_starts_and_restarts_on_its_data() {
    // Open (--insecure-no-auth): this crate speaks no TLS; the coordinator's
    // own tests cover HTTPS and client certificates.
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("coord");
    let mut c = CoordinatorProc::local(CoordinatorSpec::insecure("127.0.0.1:0", &data)).expect("start");
    assert!(c.url.starts_with("http://127.0.0.1:"), "{}", c.url);
    assert_eq!(c.operator_token(), None);
    assert_eq!(get_status(c.addr, "/v1/policy", "any"), 200);
    let addr = c.addr;
    c.kill();
    assert!(TcpStream::connect(addr).is_err(), "killed");
    // Started again on the same data and address, as a restart test does.
    let spec = CoordinatorSpec::insecure(&addr.to_string(), &data);
    let bin = edgeshift_testbed::bins::coordinator().expect("binary");
    let again = CoordinatorProc::start_local(&bin, spec).expect("restart");
    assert_eq!(again.addr, addr);
    assert_eq!(get_status(again.addr, "/v1/policy", "any"), 200);
}
