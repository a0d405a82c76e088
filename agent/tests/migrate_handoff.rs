//! A live handoff between two edges in network namespaces, over tbf-limited
//! links, with a third edge holding the image's base: real QEMU (TCG here),
//! real loop devices, real TCP. The guest keeps counting across the switch,
//! its client's connection never drops, the disk at the destination — read
//! back inside the guest bypassing its cache — holds every write made before
//! the pause, and a second handoff back works too.

mod migrate_support;

use std::time::Duration;

use migrate_support::{require_capabilities, Cloud};

fn report(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("migrate --json prints one JSON object")
}

#[test]
fn handoff_there_and_back_keeps_the_vm_its_disk_and_its_client() {
    if require_capabilities().is_some() {
        return;
    }
    let mut cloud = Cloud::new(&["a", "b", "c"], 400);
    cloud.seed_base("a");
    cloud.seed_base("c");
    for e in ["a", "b", "c"] {
        cloud.start_daemons(e);
    }
    let base = cloud.base_id.clone();
    cloud.run_vm("a", "vm1", &base);
    let vms = cloud.list("a");
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0]["state"], "running");

    let stream = cloud.counter_stream();
    assert!(
        stream.wait_above(stream.last().unwrap_or(0) + 10, Duration::from_secs(30)),
        "the guest counts"
    );
    let before = stream.last().expect("counter values");

    // a → b: b is cold, c holds the base, a holds everything.
    let (ok, out, err) = cloud.migrate("vm1", "a", "b", &["c"], &[]);
    assert!(ok, "migration a→b failed: {err}");
    let r = report(&out);
    eprintln!("a→b report: {r}");
    assert!(cloud.list("a").is_empty(), "the source no longer has the VM");
    let at_b = cloud.list("b");
    assert_eq!(at_b.len(), 1, "the destination has the VM");
    assert_eq!(at_b[0]["state"], "running");
    let by_source = r["bytes_by_source"].as_object().expect("bytes_by_source");
    let from_c = by_source
        .get(&cloud.edge("c").chunk_addr())
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let from_a = by_source
        .get(&cloud.edge("a").chunk_addr())
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    assert!(
        from_c > 0 && from_a > 0,
        "both holders sent chunks: a {from_a}, c {from_c}"
    );
    assert!(
        r["rounds"].as_array().expect("rounds").len() >= 2,
        "pre-copy plus the pause round"
    );
    assert!(r["downtime_ms"].as_u64().expect("downtime") > 0);
    // `vm run` started the VM's boot log: no slice of the live disk.
    assert_eq!(r["changed_since_boot_from"], "boot log", "{r}");
    // By default memory moves after the disk rounds.
    assert_eq!(
        r["memory_started_with_disk"], false,
        "memory went after the disk: {r}"
    );

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

    // b → a: a still holds most chunks (the source keeps its cache).
    let mid = stream.last().expect("counter");
    // Back with memory beside the disk rounds, held from converging until
    // they end: the pause is then memory's last pass and the last chunks,
    // never a disk round that was still running.
    let (ok, out, err) = cloud.migrate("vm1", "b", "a", &["c"], &["--memory-start", "with-disk"]);
    assert!(ok, "migration b→a failed: {err}");
    let r2 = report(&out);
    eprintln!("b→a report: {r2}");
    // b started the arriving VM's boot log before it ran there.
    assert_eq!(r2["changed_since_boot_from"], "boot log", "{r2}");
    assert_eq!(
        r2["memory_started_with_disk"], true,
        "QEMU 10 can hold memory back: {r2}"
    );
    assert!(
        r2["downtime_ms"].as_u64().expect("downtime") < 3000,
        "the pause did not wait for disk rounds: {r2}"
    );
    assert!(cloud.list("b").is_empty());
    assert_eq!(cloud.list("a").len(), 1);
    assert!(
        r2["disk_bytes"].as_u64().expect("disk bytes") < r["disk_bytes"].as_u64().expect("disk bytes") / 4,
        "going back moves far less disk: the source kept its chunks"
    );
    assert!(
        stream.wait_above(mid + 20, Duration::from_secs(30)),
        "the counter keeps rising after the second switch"
    );
    assert!(
        stream.is_open(),
        "the client's TCP connection survived both switches"
    );
    let values = stream.values();
    assert!(
        values.windows(2).all(|w| w[1] >= w[0]),
        "the counter never went back"
    );
    let check = cloud.check_disk();
    assert!(
        check.starts_with("check ok"),
        "disk at a after the move back: {check}"
    );
    eprintln!("longest gap seen by the client: {:?}", stream.longest_gap());
}
