//! What a path between two edges sees of a handoff: tcpdump on the WAN
//! hub's bridge records a whole migration, and a marker the guest holds in
//! its memory and one in its disk (a chunk written after boot, so it must
//! travel) are searched for in the capture. With the cluster's TLS neither
//! appears; with `--insecure-plaintext` both do, so the search can fail.

mod migrate_support;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use migrate_support::{kill_tree, require_capabilities, sh, Cloud, VM_IP};

/// A packet capture running in a namespace.
struct Capture {
    child: Child,
}

impl Capture {
    /// tcpdump on `dev` in `ns`, every packet whole, to `file`; returns
    /// once it listens.
    fn start(ns: &str, dev: &str, file: &Path) -> Capture {
        let log = file.with_extension("log");
        let mut child = Command::new("ip")
            .args([
                "netns", "exec", ns, "tcpdump", "-i", dev, "-s", "0", "-U", "-n", "-w",
            ])
            .arg(file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("tcpdump log"))
            .spawn()
            .expect("start tcpdump");
        let t = Instant::now();
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("listening on")
        {
            assert!(t.elapsed() < Duration::from_secs(10), "tcpdump did not start");
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "tcpdump exited: {st}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Capture { child }
    }

    /// Stops it (SIGINT: the file is flushed) and returns what it holds.
    fn stop(mut self, file: &Path) -> Vec<u8> {
        sh(Command::new("kill").args(["-INT", &self.child.id().to_string()]));
        let _ = self.child.wait();
        std::fs::read(file).expect("capture file")
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The marker the guest holds in memory: bytes sent to its counter service,
/// which never reads them, so they sit in its socket's receive queue (guest
/// RAM) while memory moves. Sent on the VMs' segment, not the WAN.
fn hold_in_guest_memory(cloud: &Cloud, marker: &str) -> Child {
    let mut c = Command::new("ip")
        .args(["netns", "exec", &cloud.client_ns, "socat", "-u", "-"])
        .arg(format!("TCP:{VM_IP}:7000,connect-timeout=5"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("socat");
    let mut stdin = c.stdin.take().expect("stdin");
    stdin
        .write_all(marker.repeat(32).as_bytes())
        .expect("send the marker");
    stdin.flush().expect("flush");
    // Kept open (leaked into the child's lifetime) so the connection stays.
    std::mem::forget(stdin);
    c
}

/// The marker written into the source VM's disk after boot, through its
/// loop device, near the end of the disk where its file system keeps no
/// data: the boot log counts the write, so the chunk goes to the destination.
fn write_into_guest_disk(cloud: &Cloud, marker: &str) {
    let rec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(cloud.edge("a").state.join("vm1/vm.json")).expect("VM record"),
    )
    .expect("VM record parses");
    let dev = rec["loop_device"].as_str().expect("loop device").to_string();
    let size: u64 = sh(Command::new("blockdev").args(["--getsize64", &dev]))
        .trim()
        .parse()
        .expect("device size");
    let block = cloud.dir.path().join("marker.blk");
    let mut data = marker.repeat(4096 / marker.len() + 1).into_bytes();
    data.truncate(4096);
    std::fs::write(&block, &data).expect("marker block");
    let seek = (size - (512 << 10)) / 4096;
    sh(Command::new("dd")
        .arg(format!("if={}", block.display()))
        .arg(format!("of={dev}"))
        .args([
            "bs=4096",
            "count=1",
            &format!("seek={seek}"),
            "oflag=direct",
            "conv=notrunc",
        ]));
}

/// One handoff a -> b with the markers in place, captured on the WAN;
/// returns whether each marker (memory, disk) appeared.
fn captured_handoff(insecure: bool) -> (bool, bool) {
    let mut cloud = Cloud::new(&["a", "b"], 400);
    cloud.insecure = insecure;
    cloud.seed_base("a");
    cloud.seed_base("b");
    for e in ["a", "b"] {
        cloud.start_daemons(e);
    }
    let base = cloud.base_id.clone();
    cloud.run_vm("a", "vm1", &base);
    let stream = cloud.counter_stream();
    assert!(
        stream.wait_above(stream.last().unwrap_or(0) + 5, Duration::from_secs(60)),
        "the guest counts"
    );
    let tag = format!("{:016x}", rand::random::<u64>());
    let (mem_marker, disk_marker) = (format!("edgeshift-mem-{tag}"), format!("edgeshift-disk-{tag}"));
    let mut holder = hold_in_guest_memory(&cloud, &mem_marker);
    write_into_guest_disk(&cloud, &disk_marker);
    let file = cloud.dir.path().join("wan.pcap");
    let cap = Capture::start(&cloud.hub, "br0", &file);
    // Memory uncompressed: zstd would hide the marker whatever the TLS.
    let (ok, out, err) = cloud.migrate("vm1", "a", "b", &[], &["--memory", "plain"]);
    let bytes = cap.stop(&file);
    kill_tree(&mut holder);
    assert!(ok, "handoff (insecure: {insecure}): {out}\n{err}");
    assert_eq!(cloud.list("b").len(), 1, "the VM runs at b");
    assert!(
        bytes.len() > 1 << 20,
        "the capture holds the handoff: {} bytes",
        bytes.len()
    );
    let report: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or("")).expect("migrate --json report");
    eprintln!(
        "insecure={insecure}: handoff {:.2} s, downtime {} ms; capture {} bytes; memory marker {}, disk marker {}",
        report["total_seconds"].as_f64().unwrap_or(0.0),
        report["downtime_ms"],
        bytes.len(),
        contains(&bytes, mem_marker.as_bytes()),
        contains(&bytes, disk_marker.as_bytes())
    );
    (
        contains(&bytes, mem_marker.as_bytes()),
        contains(&bytes, disk_marker.as_bytes()),
    )
}

#[test]
fn a_handoff_over_tls_shows_the_path_nothing_of_the_guest() {
    if require_capabilities().is_some() {
        return;
    }
    let has_tcpdump = Command::new("tcpdump").arg("--version").output().is_ok();
    if !has_tcpdump {
        assert!(
            std::env::var_os("CI").is_none(),
            "tcpdump is missing (.ci/setup installs it)"
        );
        return;
    }
    // Without TLS the markers cross in the clear: the search works.
    let (mem, disk) = captured_handoff(true);
    assert!(mem, "plaintext: the memory marker is on the wire");
    assert!(disk, "plaintext: the disk marker is on the wire");
    let (mem, disk) = captured_handoff(false);
    assert!(!mem, "TLS: the guest's memory crossed in the clear");
    assert!(!disk, "TLS: the guest's disk crossed in the clear");
}
