//! TCP goodput of a testbed path, measured with iperf3 (a bulk stream, the
//! payload bytes the receiver got per second): what a path really carries,
//! below its link rate by the Ethernet, IP and TCP headers of every frame.

use std::io::Read;
use std::net::Ipv4Addr;
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::{Testbed, TestbedError};

/// One iperf3 run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Iperf3Run {
    /// Payload received, Mbit/s (10^6 bits).
    pub mbit_per_s: f64,
    /// Payload bytes received.
    pub bytes: f64,
    /// CPU seconds (user + system) of the server and of the client.
    pub server_cpu_s: f64,
    pub client_cpu_s: f64,
}

/// Which way the stream flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The client sends to the server.
    ToServer,
    /// The server sends to the client (`-R`), as a chunk server does.
    FromServer,
}

/// Runs an iperf3 server in `server_host` bound to `server_addr:port` for
/// one test, and a client in `client_host` for `seconds` (the first second
/// omitted, so TCP's slow start is not averaged in).
pub fn iperf3(
    tb: &Testbed,
    server_host: &str,
    server_addr: Ipv4Addr,
    port: u16,
    client_host: &str,
    seconds: u32,
    direction: Direction,
) -> Result<Iperf3Run, TestbedError> {
    tb.host(server_host)?;
    tb.host(client_host)?;
    let mut server = tb
        .command(server_host, "iperf3")
        .args([
            "-s",
            "-1",
            "-B",
            &server_addr.to_string(),
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(spawn_err)?;
    let (mbit_per_s, bytes, client_cpu_s) =
        match measure(tb, server_addr, port, client_host, seconds, direction) {
            Ok(m) => m,
            Err(e) => {
                // Not left waiting for a client in the namespace.
                stop(&mut server);
                return Err(e);
            }
        };
    // `-s -1` sometimes lingers after its test: give it a moment, then stop
    // it (its CPU time so far is still counted).
    let (_, server_cpu_s) = wait_rusage_within(&mut server, Duration::from_secs(2)).map_err(spawn_err)?;
    Ok(Iperf3Run {
        mbit_per_s,
        bytes,
        server_cpu_s,
        client_cpu_s,
    })
}

/// The client's side of [`iperf3`]: (Mbit/s, bytes, client CPU seconds).
fn measure(
    tb: &Testbed,
    server_addr: Ipv4Addr,
    port: u16,
    client_host: &str,
    seconds: u32,
    direction: Direction,
) -> Result<(f64, f64, f64), TestbedError> {
    // The server needs a moment to listen; a client that comes too early
    // is refused, so retry a few times rather than sleeping long.
    let mut last = String::new();
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(100));
        let mut cmd = tb.command(client_host, "iperf3");
        cmd.args([
            "-c",
            &server_addr.to_string(),
            "-p",
            &port.to_string(),
            "-J",
            "-O",
            "1",
            "-t",
        ])
        .arg(seconds.to_string());
        if direction == Direction::FromServer {
            cmd.arg("-R");
        }
        let mut client = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(spawn_err)?;
        let mut out = String::new();
        let read = client
            .stdout
            .take()
            .map(|mut s| s.read_to_string(&mut out))
            .transpose();
        let (status, client_cpu_s) = wait_rusage(&mut client).map_err(spawn_err)?;
        read.map_err(spawn_err)?;
        let v: Option<serde_json::Value> = serde_json::from_str(&out).ok();
        // iperf3 3.12 exits 0 with an "error" in its JSON when it could not
        // connect: a server not listening yet, so try again.
        if status != 0 || v.as_ref().is_none_or(|v| v.get("error").is_some()) {
            last = out;
            continue;
        }
        let received = v.as_ref().map(|v| &v["end"]["sum_received"]);
        let (Some(bps), Some(bytes)) = (
            received.and_then(|r| r["bits_per_second"].as_f64()),
            received.and_then(|r| r["bytes"].as_f64()),
        ) else {
            return Err(TestbedError::Parse {
                cmd: "iperf3 -J (end.sum_received)".into(),
                output: out,
            });
        };
        return Ok((bps / 1e6, bytes, client_cpu_s));
    }
    Err(TestbedError::Parse {
        cmd: format!("iperf3 -c {server_addr}:{port} from {client_host}"),
        output: last,
    })
}

fn spawn_err(source: std::io::Error) -> TestbedError {
    TestbedError::Spawn {
        cmd: "iperf3 (is it installed?)".into(),
        source,
    }
}

fn stop(server: &mut Child) {
    let _ = server.kill();
    let _ = wait_rusage(server);
}

/// [`wait_rusage`], killing `child` first if it has not exited within
/// `limit`.
pub fn wait_rusage_within(child: &mut Child, limit: Duration) -> std::io::Result<(i32, f64)> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(done) = reap(child, libc::WNOHANG)? {
            return Ok(done);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            return wait_rusage(child);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reaps `child`; its exit status (as `wait4` gives it) and CPU seconds
/// (user + system).
pub fn wait_rusage(child: &mut Child) -> std::io::Result<(i32, f64)> {
    reap(child, 0)?.ok_or_else(|| std::io::Error::other("wait4 returned without a child"))
}

/// `wait4` on `child` with `flags`; `None` when WNOHANG found it running.
fn reap(child: &mut Child, flags: libc::c_int) -> std::io::Result<Option<(i32, f64)>> {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own unreaped child; status and ru point to live locals.
    let r = unsafe { libc::wait4(pid, &mut status, flags, &mut ru) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if r == 0 {
        return Ok(None);
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Some((status, secs(ru.ru_utime) + secs(ru.ru_stime))))
}

/// TCP goodput in Mbit/s over the link between `client_host` and
/// `server_host` (the server bound to its address on that link, port 5201),
/// `seconds` after one second of slow start. A run that moved no bytes is
/// reported as unexpected output, not as a rate of 0.
pub fn link_goodput_mbit(
    tb: &Testbed,
    client_host: &str,
    server_host: &str,
    seconds: u32,
    direction: Direction,
) -> Result<f64, TestbedError> {
    let server_addr = tb.addr_of(server_host, client_host)?;
    let run = iperf3(
        tb,
        server_host,
        server_addr,
        5201,
        client_host,
        seconds,
        direction,
    )?;
    if run.bytes <= 0.0 {
        return Err(TestbedError::Parse {
            cmd: format!("iperf3 {client_host} -> {server_host}"),
            output: format!("no bytes moved: {run:?}"),
        });
    }
    Ok(run.mbit_per_s)
}
