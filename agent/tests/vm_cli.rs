//! `edgeshift vm run|list|stop|start|rm` with real QEMU (TCG here), a real
//! loop device and a real store, and the agent bringing back an autostart
//! VM after a crash; and the ways they refuse bad input.

mod migrate_support;

use std::process::{Command, Stdio};
use std::time::Duration;

use migrate_support::{base_store, require_capabilities, test_vm, BIN};

fn edgeshift(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().expect("run edgeshift")
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().expect("temp dir");
    let st = dir.path().to_string_lossy().to_string();
    let store = dir.path().join("store").to_string_lossy().to_string();
    let id = "ab".repeat(32);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "vm",
                "run",
                "../evil",
                "--image",
                &id,
                "--store",
                &store,
                "--state-dir",
                &st,
            ],
            "invalid VM name",
        ),
        (
            vec![
                "vm",
                "run",
                "vm1",
                "--image",
                "xyz",
                "--store",
                &store,
                "--state-dir",
                &st,
            ],
            "not hex",
        ),
        (
            vec![
                "vm",
                "run",
                "vm1",
                "--image",
                "abcd",
                "--store",
                &store,
                "--state-dir",
                &st,
            ],
            "64 hex digits",
        ),
        (
            vec![
                "vm",
                "run",
                "vm1",
                "--image",
                &id,
                "--store",
                &store,
                "--memory",
                "12x",
                "--state-dir",
                &st,
            ],
            "--memory",
        ),
        (
            vec![
                "vm",
                "run",
                "vm1",
                "--image",
                &id,
                "--store",
                &store,
                "--memory",
                "1MiB",
                "--state-dir",
                &st,
            ],
            "too small",
        ),
        (
            vec![
                "vm",
                "run",
                "vm1",
                "--image",
                &id,
                "--store",
                &store,
                "--state-dir",
                &st,
            ],
            "manifest",
        ),
        (vec!["vm", "stop", "nope", "--state-dir", &st], "no VM named nope"),
        // The retired second daemon names its replacement, whatever its flags.
        (
            vec!["vm", "host", "--listen", "127.0.0.1:1", "--state-dir", &st],
            "merged into `edgeshift agent`",
        ),
        (
            vec![
                "agent",
                "--listen",
                "127.0.0.1:0",
                "--store",
                &store,
                "--tls-cert",
                "/nonexistent",
            ],
            "/nonexistent",
        ),
        (
            vec![
                "agent",
                "--listen",
                "127.0.0.1:0",
                "--store",
                &store,
                "--tls-cert",
                "/nonexistent",
                "--coordinator",
                "http://127.0.0.1:1",
            ],
            "--coordinator needs --capacity",
        ),
        (
            vec![
                "migrate",
                "nope",
                "--to",
                "127.0.0.1:1",
                "--source-addr",
                "127.0.0.1:2",
                "--tls-cert",
                "/nonexistent",
                "--state-dir",
                &st,
            ],
            "/nonexistent",
        ),
    ];
    for (args, want) in cases {
        let out = edgeshift(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err}");
    }
    let out = edgeshift(&["vm", "list", "--json", "--state-dir", &st]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
}

#[test]
fn run_list_stop_a_real_vm() {
    if require_capabilities().is_some() {
        return;
    }
    let vm = test_vm();
    let (base, id) = base_store(&vm);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("store");
    sh_ok(
        Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(&base)
            .arg(&store),
    );
    let state = dir.path().join("state");
    let name = format!("vmcli{}", std::process::id());
    let out = Command::new(BIN)
        .args([
            "vm",
            "run",
            &name,
            "--image",
            &id,
            "--memory",
            "128MiB",
            "--accel",
            "auto",
            "--json",
            "--autostart",
            "--store",
        ])
        .arg(&store)
        .arg("--state-dir")
        .arg(&state)
        .arg("--kernel")
        .arg(&vm.kernel)
        .arg("--initrd")
        .arg(&vm.initrd)
        .args(["--append", "console=ttyS0 quiet"])
        .output()
        .expect("vm run");
    assert!(
        out.status.success(),
        "vm run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rec: serde_json::Value = serde_json::from_slice(&out.stdout).expect("vm run --json");
    let loop_dev = rec["loop_device"].as_str().expect("loop device").to_string();
    // Stops the VM even if an assertion fails.
    struct Stop(String, std::path::PathBuf);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = Command::new(BIN)
                .args(["vm", "stop", &self.0, "--state-dir"])
                .arg(&self.1)
                .output();
        }
    }
    let _stop = Stop(name.clone(), state.clone());
    // KVM does not run guests on this kind of machine; whichever was chosen,
    // the log says why and the VM runs.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("accelerator:"),
        "the accelerator choice is logged: {err}"
    );

    let list = Command::new(BIN)
        .args(["vm", "list", "--json", "--state-dir"])
        .arg(&state)
        .output()
        .expect("list");
    let vms: serde_json::Value = serde_json::from_slice(&list.stdout).expect("list json");
    assert_eq!(vms[0]["spec"]["name"], name.as_str());
    assert_eq!(vms[0]["state"], "running");
    // The guest boots and mounts its disk (serial console in the VM's dir).
    let serial = state.join(&name).join("serial.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        if text.contains("edgeshift-guest: disk mounted") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "guest did not mount its disk: {text}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // A second VM of the same name is refused.
    let again = Command::new(BIN)
        .args(["vm", "run", &name, "--image", &id, "--store"])
        .arg(&store)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .expect("vm run again");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    let stop = Command::new(BIN)
        .args(["vm", "stop", &name, "--state-dir"])
        .arg(&state)
        .output()
        .expect("stop");
    assert!(
        stop.status.success(),
        "vm stop: {}",
        String::from_utf8_lossy(&stop.stderr)
    );
    let list_json = || -> serde_json::Value {
        let list = Command::new(BIN)
            .args(["vm", "list", "--json", "--state-dir"])
            .arg(&state)
            .output()
            .expect("list");
        serde_json::from_slice(&list.stdout).expect("list json")
    };
    // Stopping is not deleting: the record and the disk (with what the
    // guest wrote) stay.
    let vms = list_json();
    assert_eq!(vms[0]["state"], "stopped", "{vms}");
    let disk = state.join(&name).join("disk.raw");
    assert!(disk.is_file(), "vm stop kept the disk");
    let losetup = Command::new("losetup")
        .arg(&loop_dev)
        .stderr(Stdio::null())
        .output()
        .expect("losetup");
    let shown = String::from_utf8_lossy(&losetup.stdout);
    assert!(!shown.contains(&name), "the loop device is detached: {shown}");
    // It starts again from that disk; a running VM cannot be removed.
    let vm = |verb: &str| {
        Command::new(BIN)
            .args(["vm", verb, &name, "--state-dir"])
            .arg(&state)
            .output()
            .expect("vm command")
    };
    let start = vm("start");
    assert!(
        start.status.success(),
        "vm start: {}",
        String::from_utf8_lossy(&start.stderr)
    );
    assert_eq!(list_json()[0]["state"], "running");

    // A crash (QEMU killed, as a host reboot would): the agent's start
    // tidies what it left and boots the autostart VM again before it says
    // it listens; the agent's stop leaves the VM running.
    let crashed = list_json()[0]["pid"].as_u64().expect("pid");
    sh_ok(Command::new("kill").args(["-9", &crashed.to_string()]));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(list_json()[0]["state"], "dead");
    let cluster =
        edgeshift_common::identity::ThrowawayCluster::new(&dir.path().join("tls")).expect("cluster");
    let mut agent = Command::new(BIN)
        .args(["agent", "--listen", "127.0.0.1:0", "--no-zstd", "--store"])
        .arg(&store)
        .args(cluster.cli_args("edge").expect("certificate"))
        .arg("--state-dir")
        .arg(&state)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("agent");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(agent.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("listening line");
    assert!(line.starts_with("listening on"), "{line}");
    let vms = list_json();
    assert_eq!(vms[0]["state"], "running", "autostart brought it back: {vms}");
    let restarted = vms[0]["pid"].as_u64().expect("pid");
    assert_ne!(restarted, crashed);
    sh_ok(Command::new("kill").args(["-TERM", &agent.id().to_string()]));
    let status = agent.wait().expect("agent exits");
    assert!(status.success(), "SIGTERM: exit 0 ({status})");
    let vms = list_json();
    assert_eq!(
        (vms[0]["state"].as_str(), vms[0]["pid"].as_u64()),
        (Some("running"), Some(restarted)),
        "the agent's stop leaves its VMs running: {vms}"
    );
    let rm = vm("rm");
    assert!(!rm.status.success(), "vm rm of a running VM is refused");
    assert!(String::from_utf8_lossy(&rm.stderr).contains("stop it first"));
    assert!(vm("stop").status.success());
    let rm = vm("rm");
    assert!(
        rm.status.success(),
        "vm rm: {}",
        String::from_utf8_lossy(&rm.stderr)
    );
    assert_eq!(list_json(), serde_json::json!([]));
    assert!(!state.join(&name).exists(), "vm rm deleted the VM's directory");
}

fn sh_ok(c: &mut Command) {
    let out = c.output().expect("run");
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
