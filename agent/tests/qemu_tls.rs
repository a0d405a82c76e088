//! QEMU's memory stream under the cluster's TLS, with real QEMUs on
//! loopback (no guest, no root): the destination takes the stream only
//! over TLS and only from the source edge its `authz-simple` names; a
//! plaintext `migrate`, another edge's certificate and a certificate of
//! another CA are all refused and the destination never loads a VM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgeshift_agent::vm::qmp::MigrationTls;
use edgeshift_agent::vm::tls::{authz_identity, creds_dir, TlsEndpoint, TLS_AUTHZ_ID, TLS_CREDS_ID};
use edgeshift_agent::vm::QmpClient;
use edgeshift_common::identity::{issue, new_ca, IssuedPem, Role, TlsFiles};

const SRC: &str = "edge-src";
const DST: &str = "edge-dst";

fn qemu_present() -> bool {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok && std::env::var_os("CI").is_some() {
        panic!("qemu-system-x86_64 is missing (CI=true: not skipped)");
    }
    ok
}

/// `name`'s certificate of `ca`, written under `dir/name/`.
fn edge_files(dir: &Path, ca: &IssuedPem, name: &str) -> TlsFiles {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).expect("dir");
    let edge = issue(ca, Role::Edge, name, &[], 1).expect("issue");
    let files = TlsFiles {
        ca: d.join("ca.pem"),
        cert: d.join("cert.pem"),
        key: d.join("key.pem"),
        crl: None,
    };
    std::fs::write(&files.ca, &ca.cert_pem).expect("ca");
    std::fs::write(&files.cert, &edge.cert_pem).expect("cert");
    std::fs::write(&files.key, &edge.key_pem).expect("key");
    files
}

/// A QEMU with a tiny paused machine and a QMP socket; killed on drop.
struct Vm {
    child: Child,
    qmp: QmpClient,
    dir: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn launch(dir: &Path, name: &str, incoming: bool) -> Vm {
    let dir = dir.join(format!("vm-{name}"));
    std::fs::create_dir_all(&dir).expect("vm dir");
    let sock = dir.join("qmp.sock");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-machine",
        "pc,accel=tcg",
        "-m",
        "32",
        "-nodefaults",
        "-display",
        "none",
        "-S",
    ])
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", sock.display()))
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(dir.join("stderr")).expect("stderr file"));
    if incoming {
        cmd.args(["-incoming", "defer"]);
    }
    let child = cmd.spawn().expect("qemu starts");
    let qmp = QmpClient::connect(&sock, Duration::from_secs(10)).expect("QMP");
    Vm { child, qmp, dir }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// The destination as the agent sets it up: TLS with `files`, only `SRC`'s
/// certificate let in; listening on the returned URI.
fn destination(dir: &Path, files: &TlsFiles) -> (Vm, String) {
    let mut vm = launch(dir, "dst", true);
    let creds = creds_dir(&vm.dir, files).expect("creds dir");
    vm.qmp
        .add_tls_creds(TLS_CREDS_ID, &creds, TlsEndpoint::Server)
        .expect("server creds");
    vm.qmp
        .add_authz(TLS_AUTHZ_ID, &authz_identity(SRC))
        .expect("authz");
    vm.qmp
        .migrate_set_tls(&MigrationTls {
            creds: TLS_CREDS_ID.into(),
            hostname: None,
            authz: Some(TLS_AUTHZ_ID.into()),
        })
        .expect("tls parameters");
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    vm.qmp.migrate_incoming(&uri).expect("listen");
    (vm, uri)
}

/// Migrates `src` to `uri` (over TLS with `files` when given, naming
/// `DST`); returns the source's final migration status.
fn migrate(dir: &Path, files: Option<&TlsFiles>, uri: &str) -> String {
    let mut src = launch(dir, "src", false);
    if let Some(f) = files {
        let creds = creds_dir(&src.dir, f).expect("creds dir");
        src.qmp
            .add_tls_creds(TLS_CREDS_ID, &creds, TlsEndpoint::Client)
            .expect("client creds");
        src.qmp
            .migrate_set_tls(&MigrationTls {
                creds: TLS_CREDS_ID.into(),
                hostname: Some(DST.into()),
                authz: None,
            })
            .expect("tls parameters");
    }
    src.qmp.migrate(uri).expect("migrate starts");
    let t = Instant::now();
    loop {
        let m = src.qmp.query_migrate().expect("query");
        let st = m.status.unwrap_or_default();
        if matches!(st.as_str(), "completed" | "failed" | "cancelled")
            || t.elapsed() > Duration::from_secs(60)
        {
            if let Some(e) = m.error_desc {
                eprintln!("source: migration {st}: {e}");
            }
            return st;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What became of the destination: its run state, or that QEMU is gone
/// (an incoming migration that fails ends the process).
fn destination_state(dst: &mut Vm) -> String {
    std::thread::sleep(Duration::from_millis(300));
    match dst.qmp.query_status() {
        Ok(s) => s.status,
        Err(e) => format!("gone ({e})"),
    }
}

#[test]
fn the_memory_stream_is_taken_only_over_tls_from_the_named_source() {
    if !qemu_present() {
        return;
    }
    let d = tempfile::tempdir().expect("tempdir");
    let ca = new_ca("test", 1).expect("ca");
    let dst_files = edge_files(d.path(), &ca, DST);

    // The source edge: the stream goes, and the destination holds the VM.
    let (mut dst, uri) = destination(&d.path().join("ok"), &dst_files);
    let src_files = edge_files(d.path(), &ca, SRC);
    let status = migrate(&d.path().join("ok"), Some(&src_files), &uri);
    let log = std::fs::read_to_string(dst.dir.join("stderr")).unwrap_or_default();
    assert_eq!(status, "completed", "destination: {log}");
    let st = destination_state(&mut dst);
    let log = std::fs::read_to_string(dst.dir.join("stderr")).unwrap_or_default();
    // The source's machine never ran (-S): loaded, the destination leaves
    // `inmigrate` for the state it had.
    assert_eq!(st, "prelaunch", "the destination loaded the VM: {log}");
    drop(dst);

    // Refused: plaintext, another edge of the cluster, and a certificate
    // under the source's name from another CA.
    let other_edge = edge_files(d.path(), &ca, "edge-other");
    let other_ca = new_ca("rogue", 1).expect("rogue ca");
    let forged = edge_files(&d.path().join("rogue"), &other_ca, SRC);
    for (what, files) in [
        ("plaintext", None),
        ("another edge's certificate", Some(&other_edge)),
        ("another CA's certificate", Some(&forged)),
    ] {
        let run = d.path().join(what.replace(' ', "-"));
        let (mut dst, uri) = destination(&run, &dst_files);
        let status = migrate(&run, files, &uri);
        assert_ne!(status, "completed", "{what}: the stream was taken");
        let st = destination_state(&mut dst);
        assert!(
            st == "inmigrate" || st.starts_with("gone"),
            "{what}: the destination is {st}, it must not hold a VM"
        );
    }
}

/// An image in memory for the export.
struct Mem(std::sync::Mutex<Vec<u8>>);

impl edgeshift_agent::migrate::nbd::BlockTarget for Mem {
    fn size(&self) -> u64 {
        self.0.lock().map(|m| m.len() as u64).unwrap_or(0)
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut m = self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?;
        m[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let m = self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?;
        buf.copy_from_slice(&m[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `qemu-io` as the NBD client QEMU's mirror is (over TLS with `files`,
/// naming `DST`, when given): writes 64 KiB of 0xab and reads them back.
fn qemu_io(dir: &Path, files: Option<&TlsFiles>, port: u16) -> std::process::Output {
    let mut opts =
        format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=secret");
    let mut cmd = Command::new("qemu-io");
    if let Some(f) = files {
        let d = dir.join(format!("io-{}", rand::random::<u32>()));
        let creds = creds_dir(&d, f).expect("creds dir");
        cmd.arg("--object").arg(format!(
            "tls-creds-x509,id=t,dir={},endpoint=client",
            creds.display()
        ));
        opts.push_str(&format!(",tls-creds=t,tls-hostname={DST}"));
    }
    cmd.args([
        "--image-opts",
        &opts,
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        "read -P 0xab 0 64k",
    ])
    .output()
    .expect("qemu-io runs")
}

#[test]
fn qemus_nbd_client_writes_to_the_export_only_over_tls_as_the_source() {
    use edgeshift_agent::migrate::nbd::{serve, ExportTls, NbdError};
    use edgeshift_common::identity::Credentials;
    if !qemu_present() {
        return;
    }
    let d = tempfile::tempdir().expect("tempdir");
    let ca = new_ca("test", 1).expect("ca");
    let dst = Credentials::load(&edge_files(d.path(), &ca, DST)).expect("dst");
    let src_files = edge_files(d.path(), &ca, SRC);
    let other_edge = edge_files(d.path(), &ca, "edge-other");
    let rogue = new_ca("rogue", 1).expect("rogue ca");
    let forged = edge_files(&d.path().join("rogue"), &rogue, SRC);
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let target = std::sync::Arc::new(Mem(std::sync::Mutex::new(vec![0u8; 1 << 20])));
    let t = std::sync::Arc::clone(&target);
    let tls = ExportTls {
        config: dst.server_config(),
        client: Some(SRC.into()),
    };
    let server = std::thread::spawn(
        move || -> Vec<Result<edgeshift_agent::migrate::nbd::ServeStats, NbdError>> {
            (0..4)
                .map(|_| {
                    let (s, _) = l.accept().expect("accept");
                    serve(s, "secret", t.as_ref(), Some(&tls))
                })
                .collect()
        },
    );
    for (what, files) in [
        ("plaintext", None),
        ("another edge's certificate", Some(&other_edge)),
        ("another CA's certificate", Some(&forged)),
    ] {
        let out = qemu_io(d.path(), files, port);
        let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(
            !said.contains("wrote 65536/65536"),
            "{what}: the export took a write: {said}"
        );
    }
    assert!(
        target.0.lock().expect("lock").iter().all(|&b| b == 0),
        "nothing written"
    );
    let out = qemu_io(d.path(), Some(&src_files), port);
    let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.contains("wrote 65536/65536"),
        "{said}"
    );
    assert!(said.contains("read 65536/65536"), "{said}");
    let results = server.join().expect("server");
    assert!(results[..3].iter().all(|r| r.is_err()), "{results:?}");
    assert!(results[3].is_ok(), "{results:?}");
    assert!(target.0.lock().expect("lock")[..65536].iter().all(|&b| b == 0xab));
}
