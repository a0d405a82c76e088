//! The last chunks beside QEMU's disk mirror (the default handoff), with a
//! guest rewriting the same hot chunks as fast as it can: the destination
//! agent killed while the mirror runs (its NBD connection cut) leaves the
//! VM at the source with its disk whole; a handoff then keeps every write,
//! as the guest itself reads them back bypassing its cache.

mod migrate_support;

use std::process::Stdio;
use std::time::Duration;

use migrate_support::{require_capabilities, Cloud};

/// Every 100 ms tick rewrites 16 random 64 KiB slots of the guest's 8 MiB
/// hot file (the default: one slot every other tick).
const RACING: &str = "es_hot_every=1 es_hot_blocks=16";

fn report(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("migrate --json prints one JSON object")
}

#[test]
fn racing_writes_beside_the_mirror_survive_a_cut_and_a_handoff() {
    if require_capabilities().is_some() {
        return;
    }
    let mut cloud = Cloud::new(&["a", "b"], 400);
    cloud.seed_base("a");
    cloud.seed_base("b");
    for e in ["a", "b"] {
        cloud.start_daemons(e);
    }
    let base = cloud.base_id.clone();
    cloud.run_vm_with("a", "vm1", &base, RACING);
    let stream = cloud.counter_stream();
    assert!(
        stream.wait_above(stream.last().unwrap_or(0) + 10, Duration::from_secs(60)),
        "the guest counts"
    );

    // 1. The destination's agent (and with it the mirror's NBD export)
    //    killed while the mirror runs.
    let mut mig = cloud.migrate_cmd("vm1", "a", "b");
    mig.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = mig.spawn().expect("start migrate");
    let stderr = child.stderr.take().expect("stderr piped");
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut log = String::new();
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("disk mirror running") {
                let _ = seen_tx.send(());
            }
            log.push_str(&line);
            log.push('\n');
        }
        log
    });
    assert!(
        seen_rx.recv_timeout(Duration::from_secs(120)).is_ok(),
        "the mirror started"
    );
    cloud.kill_agent("b");
    let status = child.wait().expect("migrate ends");
    let log = reader.join().expect("stderr reader");
    assert!(!status.success(), "a cut mirror fails the migration: {log}");
    assert!(
        log.contains("disk mirror stopped"),
        "the rollback stopped the mirror: {log}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(cloud.list("a").len(), 1, "the VM is still at the source");
    assert_eq!(cloud.list("a")[0]["state"], "running");
    let last = stream.last().expect("counter");
    assert!(
        stream.wait_above(last + 5, Duration::from_secs(30)),
        "the guest keeps counting at the source"
    );
    let check = cloud.check_disk();
    assert!(
        check.starts_with("check ok"),
        "disk at the source after the cut: {check}"
    );
    cloud.start_daemons("b");

    // 2. The handoff, the guest racing it.
    let before = stream.last().expect("counter");
    let (ok, out, err) = cloud.migrate("vm1", "a", "b", &[], &[]);
    assert!(ok, "migration a→b failed: {err}");
    let r = report(&out);
    eprintln!("a→b report: {r}");
    assert_eq!(r["disk_handoff"], "mirror", "{r}");
    let phases: Vec<&str> = r["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .filter_map(|p| p["phase"].as_str())
        .collect();
    assert!(phases.contains(&"mirror"), "{r}");
    assert!(
        r["mirror"]["mirrored_bytes"].as_u64().expect("mirrored bytes") > 0,
        "the mirror carried the guest's writes: {r}"
    );
    assert_eq!(cloud.list("b").len(), 1, "the destination has the VM");
    assert!(cloud.list("a").is_empty());
    assert!(
        stream.wait_above(before + 20, Duration::from_secs(30)),
        "the counter keeps rising after the switch"
    );
    assert!(
        stream.is_open(),
        "the client's TCP connection survived the switch"
    );
    let check = cloud.check_disk();
    assert!(check.starts_with("check ok"), "disk at b after the move: {check}");
    eprintln!("longest gap seen by the client: {:?}", stream.longest_gap());
}
