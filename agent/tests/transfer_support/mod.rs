//! Shared helpers of the transfer tests: test images sliced with
//! `edgeshift slice`, agents run as real processes, fetches run as the CLI.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_edgeshift");

/// Writes a deterministic test image: pseudo-random chunks, a run of zero
/// chunks and a few repeated chunks, so dedup and holes are exercised.
pub fn write_image(path: &Path, chunks: usize, chunk_size: usize, seed: u64) {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(chunks * chunk_size + 1000);
    for i in 0..chunks {
        if i % 17 == 5 {
            out.extend(std::iter::repeat_n(0u8, chunk_size));
            continue;
        }
        if i % 23 == 7 && i >= 3 {
            let start = (i - 3) * chunk_size;
            let copy = out[start..start + chunk_size].to_vec();
            out.extend(copy);
            continue;
        }
        for _ in 0..chunk_size / 8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    // A short last chunk.
    out.extend_from_slice(&[0xa5; 1000]);
    std::fs::write(path, out).expect("write test image");
}

/// Slices `image` into `store` with the CLI; returns the manifest id.
pub fn slice(image: &Path, store: &Path, chunk_size: &str) -> String {
    let out = Command::new(BIN)
        .args(["slice"])
        .arg(image)
        .arg("--store")
        .arg(store)
        .args(["--chunk-size", chunk_size])
        .output()
        .expect("run edgeshift slice");
    assert!(
        out.status.success(),
        "slice failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let id = stdout
        .lines()
        .last()
        .expect("slice prints the id")
        .trim()
        .to_string();
    assert_eq!(id.len(), 64, "id line {id:?}");
    id
}

/// Restores `id` from `store` and asserts it equals `image` byte for byte.
pub fn assert_restores(id: &str, store: &Path, image: &Path) {
    let out_path = store.with_extension("restored");
    let out = Command::new(BIN)
        .args(["restore", id, "--store"])
        .arg(store)
        .arg("--out")
        .arg(&out_path)
        .output()
        .expect("run edgeshift restore");
    assert!(
        out.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = std::fs::read(image).expect("read image");
    let b = std::fs::read(&out_path).expect("read restored");
    assert!(a == b, "restored image differs from the original");
    let _ = std::fs::remove_file(out_path);
}

/// Makes a throwaway cluster (its own CA) in directory `dir/name` with one
/// edge certificate, `edge`, that every test agent and fetch of the cluster
/// presents; returns the directory. Tests run with TLS on: a credentials
/// path that is a directory means TLS ([`cred_args`]). `_byte` is kept from
/// the cluster-key days: two calls always make two distinct clusters.
pub fn write_key(dir: &Path, name: &str, _byte: u8) -> PathBuf {
    let p = dir.join(name);
    let cluster = edgeshift_common::identity::ThrowawayCluster::new(&p).expect("throwaway cluster");
    cluster.edge_files("edge").expect("edge certificate");
    p
}

/// Writes a cluster key file with 32 bytes of `byte`: for the tests of the
/// test-only `--insecure-plaintext` handshake and frames after it.
pub fn write_plain_key(dir: &Path, name: &str, byte: u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{}\n", hex::encode([byte; 32]))).expect("write key");
    p
}

/// The flags naming credentials `cred`: a throwaway cluster's directory
/// ([`write_key`]) or an insecure key file ([`write_plain_key`]).
pub fn cred_args(cred: &Path) -> Vec<std::ffi::OsString> {
    if cred.is_dir() {
        vec![
            "--tls-ca".into(),
            cred.join("ca.pem").into(),
            "--tls-cert".into(),
            cred.join("edge.pem").into(),
            "--tls-key".into(),
            cred.join("edge.key").into(),
        ]
    } else {
        vec![
            "--insecure-plaintext".into(),
            "--cluster-key-file".into(),
            cred.into(),
        ]
    }
}

/// The library's view of credentials `cred` (see [`cred_args`]).
pub fn trust_of(cred: &Path) -> edgeshift_agent::transfer::Trust {
    use edgeshift_agent::transfer::{ClusterKey, Trust};
    if cred.is_dir() {
        let files = edgeshift_common::identity::TlsFiles {
            ca: cred.join("ca.pem"),
            cert: cred.join("edge.pem"),
            key: cred.join("edge.key"),
            crl: None,
        };
        let creds = edgeshift_common::identity::Credentials::load(&files).expect("credentials");
        Trust::Tls(std::sync::Arc::new(creds))
    } else {
        Trust::InsecurePlaintext {
            key: ClusterKey::from_file(cred).expect("key"),
            id: "tester".into(),
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// An agent process; killed (SIGKILL) and reaped on drop.
pub struct Agent {
    pub child: Child,
    pub addr: SocketAddr,
    pub metrics: Option<SocketAddr>,
    stderr_log: PathBuf,
}

impl Agent {
    /// Starts `edgeshift agent` with `cmd` (program and leading args already
    /// set, e.g. by a testbed's `command`) and waits for its "listening on".
    pub fn start(
        mut cmd: Command,
        store: &Path,
        key: &Path,
        listen: &str,
        metrics: Option<SocketAddr>,
        log: &Path,
    ) -> Agent {
        cmd.args(["agent", "--listen", listen, "--store"])
            .arg(store)
            .args(cred_args(key));
        if let Some(m) = metrics {
            cmd.arg("--metrics-listen").arg(m.to_string());
        }
        let stderr = std::fs::File::create(log).expect("create agent log");
        cmd.stdout(Stdio::piped()).stderr(stderr).stdin(Stdio::null());
        let mut child = cmd.spawn().expect("spawn edgeshift agent");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok());
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "agent did not start (stdout {line:?}); log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        };
        Agent {
            child,
            addr,
            metrics,
            stderr_log: log.to_path_buf(),
        }
    }

    /// An agent on loopback.
    pub fn local(store: &Path, key: &Path, with_metrics: bool, log: &Path) -> Agent {
        let metrics = with_metrics.then(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
        Agent::start(Command::new(BIN), store, key, "127.0.0.1:0", metrics, log)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// The Prometheus text from /metrics.
    pub fn metrics_text(&self) -> String {
        let addr = self.metrics.expect("agent started with metrics");
        for _ in 0..50 {
            if let Ok(mut s) = TcpStream::connect(addr) {
                let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
                let mut text = String::new();
                let _ = s.read_to_string(&mut text);
                if text.contains("200") {
                    return text;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no metrics at {addr}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Value of a counter line `name{...label...} value` in Prometheus text.
pub fn metric(text: &str, name: &str, label_contains: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label_contains))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// `edgeshift fetch` as a command (not yet run).
pub fn fetch_cmd(mut cmd: Command, id: &str, store: &Path, key: &Path, peers: &[SocketAddr]) -> Command {
    cmd.args(["fetch", id, "--json", "--stall-timeout", "3", "--store"])
        .arg(store)
        .args(cred_args(key));
    for p in peers {
        cmd.arg("--peer").arg(p.to_string());
    }
    cmd
}

/// Runs a fetch on loopback; returns the output.
pub fn fetch(id: &str, store: &Path, key: &Path, peers: &[SocketAddr]) -> Output {
    fetch_cmd(Command::new(BIN), id, store, key, peers)
        .output()
        .expect("run edgeshift fetch")
}

/// Parses a successful fetch's JSON report.
pub fn report(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "fetch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("fetch --json prints one JSON object")
}

/// Number of chunk files in a store.
pub fn chunk_files(store: &Path) -> usize {
    let Ok(fans) = std::fs::read_dir(store.join("chunks")) else {
        return 0;
    };
    fans.flatten()
        .filter_map(|f| std::fs::read_dir(f.path()).ok())
        .map(|d| d.count())
        .sum()
}

/// Copies the chunks of `src` for which `keep(index)` holds (index in the
/// directory walk order) into a new store at `dst`, with all manifests if
/// `with_manifests`.
pub fn partial_copy(src: &Path, dst: &Path, keep: impl Fn(usize) -> bool, with_manifests: bool) {
    std::fs::create_dir_all(dst.join("chunks")).expect("mkdir");
    std::fs::create_dir_all(dst.join("manifests")).expect("mkdir");
    std::fs::create_dir_all(dst.join("tmp")).expect("mkdir");
    std::fs::copy(src.join("edgeshift-store"), dst.join("edgeshift-store")).expect("copy marker");
    let mut files: Vec<PathBuf> = std::fs::read_dir(src.join("chunks"))
        .expect("read chunks")
        .flatten()
        .flat_map(|f| {
            std::fs::read_dir(f.path())
                .expect("read fan")
                .flatten()
                .map(|e| e.path())
        })
        .collect();
    files.sort();
    for (i, f) in files.iter().enumerate() {
        if keep(i) {
            let fan = f.parent().and_then(|p| p.file_name()).expect("fan dir");
            let d = dst.join("chunks").join(fan);
            std::fs::create_dir_all(&d).expect("mkdir fan");
            std::fs::copy(f, d.join(f.file_name().expect("name"))).expect("copy chunk");
        }
    }
    if with_manifests {
        for m in std::fs::read_dir(src.join("manifests"))
            .expect("read manifests")
            .flatten()
        {
            std::fs::copy(m.path(), dst.join("manifests").join(m.file_name())).expect("copy manifest");
        }
    }
}
