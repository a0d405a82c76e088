//! The Debian package, built the way `cargo xtask deb --no-build` builds it
//! from the release binaries the test step already has, then unpacked into
//! a fresh root (`dpkg-deb -x`; this host's own /etc and /usr stay
//! untouched): its units pass `systemd-analyze verify`, and the agent and
//! the coordinator start from the packaged default configurations plus a
//! key and a coordinator URL (ports and directories moved by EDGESHIFT_*
//! variables), say they are ready to systemd only once every check passed,
//! answer, and stop with exit 0 on SIGTERM.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use edgeshift_testbed::{caps, Binaries};

/// The package built once and unpacked into a fresh root, shared by the tests.
struct Installed {
    _dir: tempfile::TempDir,
    deb: PathBuf,
    root: PathBuf,
    work: PathBuf,
}

fn installed() -> Option<&'static Installed> {
    static ONCE: OnceLock<Option<Installed>> = OnceLock::new();
    ONCE.get_or_init(|| {
        for tool in ["dpkg-deb", "dpkg"] {
            if !caps::available(tool, caps::has_tool(tool)) {
                return None;
            }
        }
        let bins = Binaries::locate().expect("the release binaries");
        let bin_dir = bins.edgeshift.parent().expect("bin dir").to_path_buf();
        let dir = tempfile::tempdir().expect("temp dir");
        let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["deb", "--no-build", "--bin-dir"])
            .arg(&bin_dir)
            .arg("--out-dir")
            .arg(dir.path())
            .output()
            .expect("cargo xtask deb");
        assert!(
            out.status.success(),
            "xtask deb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let deb = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(deb.is_file(), "no package at {}", deb.display());
        let root = dir.path().join("root");
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work).expect("work dir");
        Some(Installed {
            deb,
            root,
            work,
            _dir: dir,
        })
    })
    .as_ref()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn the_package_holds_the_binaries_units_conffiles_and_state_directory() {
    let Some(i) = installed() else { return };
    let info = run(Command::new("dpkg-deb").arg("--info").arg(&i.deb));
    assert!(info.contains("Package: edgeshift"), "{info}");
    let listing = run(Command::new("dpkg-deb").arg("--contents").arg(&i.deb));
    for path in [
        "./usr/bin/edgeshift",
        "./usr/bin/edgeshift-coordinator",
        "./lib/systemd/system/edgeshift-agent.service",
        "./lib/systemd/system/edgeshift-coordinator.service",
        "./etc/edgeshift/agent.toml",
        "./etc/edgeshift/coordinator.toml",
        "./usr/lib/sysusers.d/edgeshift.conf",
        "./var/lib/edgeshift/",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(path)),
            "{path} not packaged:\n{listing}"
        );
    }
    let ctrl = i.work.join("ctrl");
    run(Command::new("dpkg-deb").arg("--control").arg(&i.deb).arg(&ctrl));
    let conffiles = std::fs::read_to_string(ctrl.join("conffiles")).expect("conffiles");
    assert!(
        conffiles.contains("/etc/edgeshift/agent.toml")
            && conffiles.contains("/etc/edgeshift/coordinator.toml")
    );
    // The BPF object is inside the binary: the agent's help runs from the root alone.
    run(Command::new(i.root.join("usr/bin/edgeshift")).arg("--version"));
}

#[test]
fn systemd_analyze_verify_passes_on_the_packaged_units() {
    let Some(i) = installed() else { return };
    if !caps::available("systemd-analyze", caps::has_tool("systemd-analyze")) {
        return;
    }
    // verify checks that ExecStart's program exists: point the units'
    // /usr/bin at the unpacked root's.
    let units = i.work.join("units");
    std::fs::create_dir_all(&units).expect("units dir");
    let mut paths = Vec::new();
    for name in ["edgeshift-agent.service", "edgeshift-coordinator.service"] {
        let text = std::fs::read_to_string(i.root.join("lib/systemd/system").join(name)).expect("unit");
        assert!(text.contains("Type=notify"), "{name}");
        let p = units.join(name);
        let bin = format!("{}/usr/bin/", i.root.display());
        std::fs::write(&p, text.replace("/usr/bin/", &bin)).expect("unit copy");
        paths.push(p);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Warnings (an unknown key, a bad value) do not fail verify: none allowed.
    let complaints: Vec<&str> = stderr.lines().filter(|l| l.contains("edgeshift")).collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
}

/// A daemon started from the unpacked root with a readiness socket of its own.
struct Daemon {
    child: Child,
    notify: UnixDatagram,
    stdout: mpsc::Receiver<String>,
}

impl Daemon {
    fn start(mut cmd: Command, notify_path: &Path) -> Daemon {
        let _ = std::fs::remove_file(notify_path);
        let notify = UnixDatagram::bind(notify_path).expect("notify socket");
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut child = cmd
            .env("NOTIFY_SOCKET", notify_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Daemon {
            child,
            notify,
            stdout: rx,
        }
    }

    /// The readiness message, and the stdout lines printed before it.
    fn wait_ready(&mut self, timeout: Duration) -> (String, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                if msg.contains("READY=1") {
                    std::thread::sleep(Duration::from_millis(50));
                    return (msg, self.stdout.try_iter().collect());
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("exited ({status}) before it was ready: {}", self.stderr());
            }
        }
        panic!("not ready within {timeout:?}");
    }

    fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
        }
        s
    }

    /// SIGTERM, then the exit status (killed after 30 s).
    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child, not yet reaped; no memory involved.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        panic!("did not stop within 30 s of SIGTERM");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn listening_addr(lines: &[String]) -> String {
    lines
        .iter()
        .find_map(|l| l.strip_prefix("listening on "))
        .unwrap_or_else(|| panic!("no listening line in {lines:?}"))
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .to_string()
}

#[test]
fn agent_and_coordinator_start_from_the_default_configs_plus_certificates_and_a_url() {
    let Some(i) = installed() else { return };
    if caps::skip_unless_root("an agent's store and VM directory") {
        return;
    }
    let work = i.work.join("daemons");
    std::fs::create_dir_all(&work).expect("work");
    let etc = i.root.join("etc/edgeshift");
    let edgeshift = i.root.join("usr/bin/edgeshift");

    // The cluster's files, made by the packaged binary as an operator would.
    let tls = work.join("tls");
    let cluster = |args: &[&str]| {
        let out = Command::new(&edgeshift)
            .arg("cluster")
            .args(args)
            .output()
            .expect("edgeshift cluster");
        assert!(
            out.status.success(),
            "cluster {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let dir = tls.to_str().expect("utf-8 path");
    cluster(&["init", "--dir", dir]);
    cluster(&[
        "issue",
        "--dir",
        dir,
        "--role",
        "coordinator",
        "coordinator",
        "--san",
        "127.0.0.1",
    ]);
    cluster(&["add-edge", "--dir", dir, "edge-pkg", "--san", "127.0.0.1"]);
    cluster(&["issue", "--dir", dir, "--role", "operator", "op"]);
    let tls_env = |c: &mut Command, name: &str| {
        c.env("EDGESHIFT_TLS_CA", tls.join("ca.pem"))
            .env("EDGESHIFT_TLS_CERT", tls.join(format!("{name}.pem")))
            .env("EDGESHIFT_TLS_KEY", tls.join(format!("{name}.key")));
    };

    let mut coord_cmd = Command::new(i.root.join("usr/bin/edgeshift-coordinator"));
    coord_cmd
        .arg("--config")
        .arg(etc.join("coordinator.toml"))
        .env("EDGESHIFT_COORDINATOR_LISTEN", "127.0.0.1:0")
        .env("EDGESHIFT_COORDINATOR_DATA", work.join("coordinator"))
        .env("EDGESHIFT_COORDINATOR_LOG_FORMAT", "json");
    tls_env(&mut coord_cmd, "coordinator");
    let mut coord = Daemon::start(coord_cmd, &work.join("coordinator.notify"));
    let (ready, lines) = coord.wait_ready(Duration::from_secs(30));
    let coord_addr = listening_addr(&lines);
    assert!(ready.contains("STATUS=serving on"), "{ready}");
    let url = format!("https://{coord_addr}");

    let agent_cmd = || {
        let mut c = Command::new(&edgeshift);
        c.arg("agent")
            .arg("--config")
            .arg(etc.join("agent.toml"))
            .env("EDGESHIFT_COORDINATOR", &url)
            .env("EDGESHIFT_CAPACITY", "1GiB")
            .env("EDGESHIFT_ID", "edge-pkg")
            .env("EDGESHIFT_LISTEN", "127.0.0.1:0")
            .env("EDGESHIFT_MIGRATE_LISTEN", "127.0.0.1:0")
            .env("EDGESHIFT_STORE", work.join("store"))
            .env("EDGESHIFT_STATE_DIR", work.join("vms"))
            .env("EDGESHIFT_NO_ZSTD", "true");
        tls_env(&mut c, "edge-pkg");
        c
    };

    // Missing cluster credentials stop the agent before it listens or says
    // it is ready, naming the file and the command that makes it.
    let mut c = agent_cmd();
    let out = c
        .env_remove("NOTIFY_SOCKET")
        .env("EDGESHIFT_TLS_CERT", work.join("no-such.pem"))
        .output()
        .expect("agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without its certificate");
    assert!(
        stderr.contains("no-such.pem") && stderr.contains("edgeshift cluster"),
        "{stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "listened before the credentials check"
    );

    let mut agent = Daemon::start(agent_cmd(), &work.join("agent.notify"));
    let (ready, lines) = agent.wait_ready(Duration::from_secs(60));
    assert!(ready.contains(&format!("coordinator {url} reached")), "{ready}");
    assert!(
        lines.iter().any(|l| l.starts_with("receiving migrations on ")),
        "{lines:?}"
    );
    let agent_addr = listening_addr(&lines);
    let s = std::net::TcpStream::connect(&agent_addr).expect("agent answers");
    drop(s);
    // The coordinator knows the edge (registered over mutual TLS before the
    // agent said ready); asked by the operator's certificate.
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--cacert"])
        .arg(tls.join("ca.pem"))
        .arg("--cert")
        .arg(tls.join("op.pem"))
        .arg("--key")
        .arg(tls.join("op.key"))
        .arg(format!("{url}/v1/edges/edge-pkg"))
        .output()
        .expect("curl");
    let edge = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(edge.contains("capacity") || edge.contains("usage"), "{edge}");

    let agent_pid = agent.child.id();
    assert!(agent.terminate().success(), "agent: {}", agent.stderr());
    // Nothing of the agent outlives it (its KVM probe QEMU, started at
    // start-up and possibly still running at the stop).
    std::thread::sleep(Duration::from_millis(500));
    let probe = format!("edgeshift-kvm-probe-{agent_pid}/");
    let left: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&probe))
        .collect();
    assert!(left.is_empty(), "left running after the agent stopped: {left:?}");
    assert!(coord.terminate().success(), "coordinator");
    let logs = coord.stderr();
    let first = logs.lines().next().unwrap_or_default();
    assert!(
        serde_json::from_str::<serde_json::Value>(first).is_ok(),
        "log_format json: {first}"
    );
}

#[test]
fn a_bad_config_stops_each_daemon_before_it_starts_naming_the_file_and_the_key() {
    let Some(i) = installed() else { return };
    let bad = i.work.join("bad-agent.toml");
    let text = std::fs::read_to_string(i.root.join("etc/edgeshift/agent.toml"))
        .expect("agent.toml")
        .replace("listen = \"0.0.0.0:7070\"", "listen = \"0.0.0.0:seventy\"");
    std::fs::write(&bad, text).expect("bad config");
    let out = Command::new(i.root.join("usr/bin/edgeshift"))
        .args(["agent", "--config"])
        .arg(&bad)
        .output()
        .expect("agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&bad.display().to_string()) && stderr.contains("key `listen`"),
        "{stderr}"
    );
    let bad = i.work.join("bad-coordinator.toml");
    std::fs::write(&bad, "lease_secs = \"long\"\n").expect("bad config");
    let out = Command::new(i.root.join("usr/bin/edgeshift-coordinator"))
        .env("EDGESHIFT_COORDINATOR_CONFIG", &bad)
        .output()
        .expect("coordinator");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("bad-coordinator.toml: line 1: key `lease_secs`"),
        "{stderr}"
    );
}
