//! The dirty trackers against real loop devices, real writes and the real
//! kernel: the eBPF program on block:block_bio_queue and the ftrace fallback.
//!
//! Needs root (loop devices, BPF, tracefs). Outside CI a missing capability
//! skips a test with the reason; under CI=true it fails it.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use edgeshift_agent::dirty::{
    DeviceId, DirtyMonitor, DirtyTracker, EbpfTracker, FtraceTracker, RateConfig, RawCounts,
};
use edgeshift_testbed::caps;

const KIB: u64 = 1024;

/// A loop device over a sparse file in a private temp dir (tmpfs when there
/// is one); detached and removed on drop, even when the test fails.
struct LoopDev {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDev {
    fn new(size: u64) -> Option<LoopDev> {
        if !caps::available("root", caps::is_root()) {
            return None;
        }
        let dir = if Path::new("/dev/shm").is_dir() {
            tempfile::tempdir_in("/dev/shm")
        } else {
            tempfile::tempdir()
        }
        .expect("temp dir for the loop device's backing file");
        let backing = dir.path().join("disk.img");
        File::create(&backing)
            .and_then(|f| f.set_len(size))
            .expect("backing file");
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&backing)
            .output()
            .expect("losetup runs");
        if !caps::available(
            &format!("a loop device ({})", String::from_utf8_lossy(&out.stderr).trim()),
            out.status.success(),
        ) {
            return None;
        }
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(LoopDev { path, _dir: dir })
    }

    fn id(&self) -> DeviceId {
        DeviceId::of_path(&self.path).expect("loop device is a block device")
    }

    /// `dd if=/dev/urandom of=DEV bs=BS count=N seek=OFFSET oflag=direct`:
    /// N separate direct writes of BS bytes from byte OFFSET on.
    fn dd(&self, offset: u64, bs: u64, count: u64) {
        let st = Command::new("dd")
            .arg("if=/dev/urandom")
            .arg(format!("of={}", self.path.display()))
            .arg(format!("bs={bs}"))
            .arg(format!("count={count}"))
            .arg(format!("seek={offset}"))
            .args(["oflag=direct,seek_bytes", "status=none"])
            .status()
            .expect("dd runs");
        assert!(st.success(), "dd to {} failed", self.path.display());
    }

    /// Opens the device for O_DIRECT writes from this process.
    fn open_direct(&self) -> File {
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&self.path)
            .expect("open loop device O_DIRECT")
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// A 4 KiB-aligned buffer for O_DIRECT, without unsafe: over-allocate and
/// start at the aligned offset.
struct Aligned {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let buf = vec![0xa5u8; len + 4096];
        let start = buf.as_ptr().align_offset(4096);
        Aligned { buf, start, len }
    }
    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

fn ebpf_tracker(chunk_size: u64, capacity: u32) -> Option<EbpfTracker> {
    match EbpfTracker::new(chunk_size, capacity) {
        Ok(t) => Some(t),
        Err(e) => {
            caps::available(&format!("BPF ({e})"), false);
            None
        }
    }
}

fn ftrace_tracker(chunk_size: u64) -> Option<FtraceTracker> {
    match FtraceTracker::new(chunk_size) {
        Ok(t) => Some(t),
        Err(e) => {
            caps::available(&format!("tracefs ({e})"), false);
            None
        }
    }
}

/// A reading as {(device, chunk) → (writes, bytes)}.
fn by_chunk(counts: &RawCounts) -> BTreeMap<(DeviceId, u64), (u64, u64)> {
    counts
        .chunks
        .iter()
        .map(|c| ((c.dev, c.index), (c.writes, c.bytes)))
        .collect()
}

fn of_device(map: &BTreeMap<(DeviceId, u64), (u64, u64)>, dev: DeviceId) -> BTreeMap<u64, (u64, u64)> {
    map.iter()
        .filter(|((d, _), _)| *d == dev)
        .map(|((_, i), v)| (*i, *v))
        .collect()
}

#[test]
fn ebpf_counts_dd_writes_exactly_per_chunk() {
    let Some(dev) = LoopDev::new(16 << 20) else {
        return;
    };
    let Some(mut t) = ebpf_tracker(64 * KIB, 1 << 16) else {
        return;
    };
    t.watch(dev.id()).expect("watch");
    dev.dd(3 * 64 * KIB, 4096, 1); // chunk 3: one 4 KiB write
    dev.dd(5 * 64 * KIB + 8192, 4096, 3); // chunk 5: three 4 KiB writes
    dev.dd(7 * 64 * KIB + 60 * KIB, 8192, 1); // spans chunks 7 and 8: 4 KiB each
    dev.dd(10 * 64 * KIB, 128 * KIB, 1); // one bio over chunks 10 and 11 whole
    let counts = t.read_counts().expect("read");
    let got = of_device(&by_chunk(&counts), dev.id());
    let want: BTreeMap<u64, (u64, u64)> = [
        (3, (1, 4096)),
        (5, (3, 3 * 4096)),
        (7, (1, 4096)),
        (8, (1, 4096)),
        (10, (1, 64 * KIB)),
        (11, (1, 64 * KIB)),
    ]
    .into_iter()
    .collect();
    assert_eq!(got, want);
    assert_eq!(counts.events, 6);
    assert_eq!(counts.dropped, 0);
    assert_eq!(counts.truncated, 0);
}

#[test]
fn ebpf_hot_region_ranks_first() {
    let Some(dev) = LoopDev::new(16 << 20) else {
        return;
    };
    let Some(t) = ebpf_tracker(256 * KIB, 1 << 16) else {
        return;
    };
    let mut m = DirtyMonitor::new(Box::new(t), RateConfig::default());
    m.tracker().watch(dev.id()).expect("watch");
    let f = dev.open_direct();
    let buf = Aligned::new(4096);
    // Chunk 9 is hot (60 writes), chunk 2 warm (6), chunks 30..40 once each.
    for round in 0..60u64 {
        f.write_at(buf.bytes(), 9 * 256 * KIB + (round % 64) * 4096)
            .expect("write hot");
        if round % 10 == 0 {
            f.write_at(buf.bytes(), 2 * 256 * KIB).expect("write warm");
        }
    }
    for c in 30..40u64 {
        f.write_at(buf.bytes(), c * 256 * KIB + 4096).expect("write cold");
    }
    let top = m.hottest(3).expect("hottest");
    assert_eq!(top[0].index, 9, "{top:?}");
    assert_eq!(top[0].writes, 60);
    assert_eq!(top[1].index, 2, "{top:?}");
    assert_eq!(top[1].writes, 6);
    assert!(top[2].index >= 30 && top[2].writes == 1, "{top:?}");
    assert!(top[0].rate > top[1].rate && top[1].rate > top[2].rate);
    let snap = m.snapshot().expect("snapshot");
    assert_eq!(snap.chunks.len(), 12);
    assert!(snap.chunks.iter().all(|c| c.device == dev.id()));
}

#[test]
fn ebpf_ignores_unwatched_devices() {
    let (Some(watched), Some(other)) = (LoopDev::new(8 << 20), LoopDev::new(8 << 20)) else {
        return;
    };
    let Some(mut t) = ebpf_tracker(64 * KIB, 1 << 16) else {
        return;
    };
    t.watch(watched.id()).expect("watch");
    other.dd(0, 4096, 4);
    other.dd(64 * KIB, 4096, 4);
    watched.dd(128 * KIB, 4096, 2);
    let counts = by_chunk(&t.read_counts().expect("read"));
    assert!(of_device(&counts, other.id()).is_empty(), "{counts:?}");
    assert_eq!(
        of_device(&counts, watched.id()),
        [(2, (2, 8192))].into_iter().collect()
    );
    // After unwatch, writes are no longer counted; earlier counts stay.
    t.unwatch(watched.id()).expect("unwatch");
    watched.dd(0, 4096, 1);
    let counts = by_chunk(&t.read_counts().expect("read"));
    assert_eq!(
        of_device(&counts, watched.id()),
        [(2, (2, 8192))].into_iter().collect()
    );
}

#[test]
fn two_ebpf_trackers_at_once_each_see_their_devices() {
    let (Some(a), Some(b), Some(shared)) = (
        LoopDev::new(8 << 20),
        LoopDev::new(8 << 20),
        LoopDev::new(8 << 20),
    ) else {
        return;
    };
    // Different chunk sizes too: each tracker has its own program and maps.
    let (Some(mut ta), Some(mut tb)) = (ebpf_tracker(64 * KIB, 1 << 16), ebpf_tracker(4 * KIB, 1 << 16))
    else {
        return;
    };
    ta.watch(a.id()).expect("watch a");
    ta.watch(shared.id()).expect("watch shared");
    tb.watch(b.id()).expect("watch b");
    tb.watch(shared.id()).expect("watch shared");
    a.dd(0, 4096, 3);
    b.dd(8192, 4096, 2);
    shared.dd(64 * KIB, 8192, 1);
    let ca = by_chunk(&ta.read_counts().expect("read a"));
    let cb = by_chunk(&tb.read_counts().expect("read b"));
    assert_eq!(of_device(&ca, a.id()), [(0, (3, 12288))].into_iter().collect());
    assert!(of_device(&ca, b.id()).is_empty());
    assert_eq!(
        of_device(&ca, shared.id()),
        [(1, (1, 8192))].into_iter().collect()
    );
    assert_eq!(
        of_device(&cb, b.id()),
        [(2, (1, 4096)), (3, (1, 4096))].into_iter().collect()
    );
    assert!(of_device(&cb, a.id()).is_empty());
    assert_eq!(
        of_device(&cb, shared.id()),
        [(16, (1, 4096)), (17, (1, 4096))].into_iter().collect()
    );
}

/// More devices than the program's inline table holds: the ones past it go
/// to the overflow hash map and are counted exactly like the others; the
/// unwatched ones stop counting whichever side they live on, and watching
/// again resumes the same counters.
#[test]
fn ebpf_counts_devices_past_the_inline_table() {
    let n = edgeshift_ebpf::INLINE_WATCHED + 2;
    let mut devs = Vec::new();
    for _ in 0..n {
        let Some(d) = LoopDev::new(1 << 20) else {
            return;
        };
        devs.push(d);
    }
    let Some(mut t) = ebpf_tracker(64 * KIB, 1 << 12) else {
        return;
    };
    for d in &devs {
        t.watch(d.id()).expect("watch");
    }
    // Device i: i + 1 writes of 4 KiB into chunk i (of 16).
    for (i, d) in devs.iter().enumerate() {
        d.dd(i as u64 * 64 * KIB, 4096, i as u64 + 1);
    }
    let counts = t.read_counts().expect("read");
    let map = by_chunk(&counts);
    for (i, d) in devs.iter().enumerate() {
        let w = i as u64 + 1;
        assert_eq!(
            of_device(&map, d.id()),
            [(i as u64, (w, w * 4096))].into_iter().collect(),
            "device {i} ({})",
            d.id()
        );
    }
    let total: u64 = (1..=n as u64).sum();
    assert_eq!(counts.events, total);
    assert_eq!(counts.dropped, 0);

    // Unwatch one device in the table and one past it; write to all again.
    let (in_table, past) = (1, n - 1);
    t.unwatch(devs[in_table].id()).expect("unwatch in table");
    t.unwatch(devs[past].id()).expect("unwatch past the table");
    for d in &devs {
        d.dd(15 * 64 * KIB, 4096, 1);
    }
    let map = by_chunk(&t.read_counts().expect("read"));
    for (i, d) in devs.iter().enumerate() {
        let got = of_device(&map, d.id()).get(&15).copied();
        let want = if i == in_table || i == past {
            None
        } else {
            Some((1, 4096))
        };
        assert_eq!(got, want, "chunk 15 of device {i}");
    }
    // Watching again resumes the same counters.
    t.watch(devs[in_table].id()).expect("watch again in table");
    t.watch(devs[past].id()).expect("watch again past the table");
    devs[in_table].dd(in_table as u64 * 64 * KIB, 4096, 1);
    devs[past].dd(past as u64 * 64 * KIB, 4096, 1);
    let map = by_chunk(&t.read_counts().expect("read"));
    for i in [in_table, past] {
        let w = i as u64 + 2;
        assert_eq!(
            of_device(&map, devs[i].id()),
            [(i as u64, (w, w * 4096))].into_iter().collect(),
            "device {i} after watching again"
        );
    }
}

#[test]
fn ebpf_loses_no_increment_under_concurrent_writers() {
    let Some(dev) = LoopDev::new(8 << 20) else {
        return;
    };
    let Some(mut t) = ebpf_tracker(1 << 20, 1 << 16) else {
        return;
    };
    t.watch(dev.id()).expect("watch");
    const THREADS: u64 = 4;
    const WRITES: u64 = 500;
    std::thread::scope(|s| {
        for th in 0..THREADS {
            let f = dev.open_direct();
            s.spawn(move || {
                let buf = Aligned::new(4096);
                // All threads hammer chunk 0 (new key race included) and chunk 1.
                for i in 0..WRITES {
                    let off = (i % 2) * (1 << 20) + th * 4096;
                    f.write_at(buf.bytes(), off).expect("write");
                }
            });
        }
    });
    let counts = t.read_counts().expect("read");
    let got = of_device(&by_chunk(&counts), dev.id());
    let half = THREADS * WRITES / 2;
    assert_eq!(
        got,
        [(0, (half, half * 4096)), (1, (half, half * 4096))]
            .into_iter()
            .collect()
    );
    assert_eq!(counts.events, THREADS * WRITES);
    assert_eq!(counts.dropped, 0);
}

#[test]
fn ebpf_reports_writes_it_has_no_counter_for() {
    let Some(dev) = LoopDev::new(1 << 20) else {
        return;
    };
    // Too few counters for the device: watching fails loudly.
    let Some(mut small) = ebpf_tracker(4 * KIB, 100) else {
        return;
    };
    let err = small.watch(dev.id()).expect_err("256 chunks do not fit in 100");
    assert!(err.to_string().contains("needs 256"), "{err}");
    drop(small);

    // Exactly enough counters for 1 MiB; then the device grows to 2 MiB
    // (backing file extended, `losetup -c`): writes past the first MiB have
    // no counter and must show up as dropped, not vanish.
    let Some(mut t) = ebpf_tracker(4 * KIB, 256) else {
        return;
    };
    t.watch(dev.id()).expect("watch");
    assert_eq!(t.free_slots(), 0);
    let backing = dev._dir.path().join("disk.img");
    OpenOptions::new()
        .write(true)
        .open(&backing)
        .and_then(|f| f.set_len(2 << 20))
        .expect("grow backing file");
    let st = Command::new("losetup")
        .arg("-c")
        .arg(&dev.path)
        .status()
        .expect("losetup -c runs");
    assert!(st.success());
    dev.dd(255 * 4 * KIB, 4096, 1); // last counted chunk
    dev.dd(300 * 4 * KIB, 4096, 2); // past the counters: 2 dropped
    dev.dd(1020 * KIB, 8192, 1); // chunk 255 counted, chunk 256 dropped
    let counts = t.read_counts().expect("read");
    assert_eq!(
        of_device(&by_chunk(&counts), dev.id()),
        [(255, (2, 8192))].into_iter().collect()
    );
    assert_eq!(counts.dropped, 3);
    assert_eq!(counts.events, 4);
}

fn bpftool_has(kind: &str, id: u32) -> bool {
    Command::new("bpftool")
        .args([kind, "show", "id", &id.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("bpftool runs")
        .success()
}

#[test]
fn detaching_leaves_no_bpf_program_or_map_behind() {
    if !caps::available("root", caps::is_root()) {
        return;
    }
    let Some(t) = ebpf_tracker(64 * KIB, 1 << 16) else {
        return;
    };
    let (prog, maps) = t.kernel_ids();
    let maps = maps.to_vec();
    assert!(bpftool_has("prog", prog), "program {prog} not loaded");
    assert!(maps.len() >= 3, "expected WATCHED, CHUNKS, STATS: {maps:?}");
    for &m in &maps {
        assert!(bpftool_has("map", m), "map {m} not there");
    }
    // The tracepoint link is visible as a perf event of this process.
    drop(t);
    // Map frees are deferred to an RCU grace period: give it a moment.
    let gone = |kind: &str, id: u32| {
        (0..50).any(|_| {
            let gone = !bpftool_has(kind, id);
            if !gone {
                std::thread::sleep(Duration::from_millis(100));
            }
            gone
        })
    };
    assert!(gone("prog", prog), "program {prog} still loaded");
    for &m in &maps {
        assert!(gone("map", m), "map {m} still there");
    }
}

#[test]
fn fallback_gives_the_same_counts_and_ranking_as_ebpf() {
    let Some(dev) = LoopDev::new(32 << 20) else {
        return;
    };
    let (Some(ebpf), Some(fallback)) = (ebpf_tracker(64 * KIB, 4096), ftrace_tracker(64 * KIB)) else {
        return;
    };
    let mut me = DirtyMonitor::new(Box::new(ebpf), RateConfig::default());
    let mut mf = DirtyMonitor::new(Box::new(fallback), RateConfig::default());
    me.tracker().watch(dev.id()).expect("watch ebpf");
    mf.tracker().watch(dev.id()).expect("watch fallback");
    // A skewed workload: chunk c gets (c % 7 + 1) * 3 writes for c in 0..40,
    // interleaved, plus writes spanning chunk boundaries.
    let f = dev.open_direct();
    let small = Aligned::new(4096);
    let wide = Aligned::new(16384);
    for round in 0..21u64 {
        for c in 0..40u64 {
            if round < (c % 7 + 1) * 3 {
                f.write_at(small.bytes(), c * 64 * KIB + (round % 16) * 4096)
                    .expect("write");
            }
        }
    }
    for c in 1..5u64 {
        f.write_at(wide.bytes(), c * 64 * KIB - 8192)
            .expect("write across boundary");
    }
    let se = me.snapshot().expect("ebpf snapshot");
    let sf = mf.snapshot().expect("fallback snapshot");
    let key = |s: &edgeshift_agent::dirty::Snapshot| -> Vec<(u64, u64, u64)> {
        let mut v: Vec<_> = s.chunks.iter().map(|c| (c.index, c.writes, c.bytes)).collect();
        v.sort();
        v
    };
    assert_eq!(key(&se), key(&sf));
    assert_eq!(se.chunks.len(), 40);
    assert_eq!(se.events, sf.events);
    assert_eq!(sf.dropped, 0);
    // Same ranking by writes (rates differ by a few ms of poll timing).
    let rank = |s: &edgeshift_agent::dirty::Snapshot| -> Vec<u64> {
        let mut v: Vec<_> = s
            .chunks
            .iter()
            .map(|c| (std::cmp::Reverse(c.writes), c.index))
            .collect();
        v.sort();
        v.into_iter().map(|(_, i)| i).collect()
    };
    assert_eq!(rank(&se), rank(&sf));
    // And the hottest chunks by rate are the most written ones in both.
    let top_e: Vec<u64> = se.hottest(5).iter().map(|c| c.writes).collect();
    let top_f: Vec<u64> = sf.hottest(5).iter().map(|c| c.writes).collect();
    assert_eq!(top_e, top_f);
    assert!(top_e.iter().all(|&w| w >= 21));
}

#[test]
fn fallback_ignores_unwatched_and_cleans_up_its_instance() {
    let (Some(watched), Some(other)) = (LoopDev::new(8 << 20), LoopDev::new(8 << 20)) else {
        return;
    };
    let Some(mut t) = ftrace_tracker(64 * KIB) else {
        return;
    };
    t.watch(watched.id()).expect("watch");
    other.dd(0, 4096, 3);
    watched.dd(64 * KIB, 4096, 2);
    let counts = by_chunk(&t.read_counts().expect("read"));
    assert!(of_device(&counts, other.id()).is_empty());
    assert_eq!(
        of_device(&counts, watched.id()),
        [(1, (2, 8192))].into_iter().collect()
    );
    let instance = t.instance().to_path_buf();
    assert!(instance.join("trace_pipe").exists(), "{instance:?}");
    assert!(instance
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("edgeshift-dirty-")));
    drop(t);
    assert!(!instance.exists(), "{instance:?} left behind");
}

fn edgeshift() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgeshift"))
}

#[test]
fn cli_dirty_json_reports_the_writes() {
    let Some(dev) = LoopDev::new(16 << 20) else {
        return;
    };
    if ebpf_tracker(64 * KIB, 16).is_none() {
        return;
    }
    let mut child = edgeshift()
        .args(["dirty", "--device"])
        .arg(&dev.path)
        .args([
            "--chunk-size",
            "64KiB",
            "--duration",
            "4",
            "--json",
            "--tracker",
            "ebpf",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("edgeshift runs");
    // Write once the tracker says it is attached.
    let stderr = child.stderr.take().expect("stderr piped");
    let mut lines = BufReader::new(stderr).lines();
    let mut log = String::new();
    for line in lines.by_ref() {
        let line = line.expect("stderr line");
        log.push_str(&line);
        log.push('\n');
        if line.contains("watching") {
            break;
        }
    }
    assert!(
        log.contains("dirty tracker active: eBPF"),
        "no active-tracker log line:\n{log}"
    );
    for _ in 0..5 {
        dev.dd(2 * 64 * KIB, 4096, 1);
    }
    dev.dd(6 * 64 * KIB, 4096, 1);
    let out = child.wait_with_output().expect("edgeshift finishes");
    assert!(out.status.success(), "{:?}", out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(v["tracker"], "ebpf");
    assert_eq!(v["dropped"], 0);
    let chunks = v["chunks"].as_array().expect("chunks list");
    assert_eq!(chunks.len(), 2, "{v}");
    assert_eq!(chunks[0]["index"], 2);
    assert_eq!(chunks[0]["writes"], 5);
    assert_eq!(chunks[0]["bytes"], 5 * 4096);
    assert!(chunks[0]["rate"].as_f64().expect("rate") > 0.0);
    assert_eq!(chunks[1]["index"], 6);
    assert_eq!(chunks[1]["writes"], 1);
}

#[test]
fn cli_dirty_rejects_bad_input() {
    let cases: [&[&str]; 4] = [
        // not a block device
        &[
            "--device",
            "/etc/hostname",
            "--chunk-size",
            "64KiB",
            "--duration",
            "1",
        ],
        // chunk size not a power of two
        &["--device", "/dev/null", "--chunk-size", "3000", "--duration", "1"],
        // duration not positive
        &[
            "--device",
            "/dev/null",
            "--chunk-size",
            "64KiB",
            "--duration",
            "0",
        ],
        // no device
        &["--chunk-size", "64KiB", "--duration", "1"],
    ];
    for args in cases {
        let out = edgeshift()
            .arg("dirty")
            .args(args)
            .output()
            .expect("edgeshift runs");
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(!out.stderr.is_empty(), "{args:?}: no error message");
    }
}

#[test]
fn discards_change_chunks_and_reads_do_not_in_both_trackers() {
    let Some(dev) = LoopDev::new(8 << 20) else {
        return;
    };
    let (Some(mut ebpf), Some(mut fallback)) = (ebpf_tracker(64 * KIB, 1 << 16), ftrace_tracker(64 * KIB))
    else {
        return;
    };
    ebpf.watch(dev.id()).expect("watch ebpf");
    fallback.watch(dev.id()).expect("watch fallback");
    // A discard of 128 KiB from chunk 4 on: chunks 4 and 5 change.
    let st = Command::new("blkdiscard")
        .args(["-o", &(4 * 64 * KIB).to_string(), "-l", &(128 * KIB).to_string()])
        .arg(&dev.path)
        .status()
        .expect("blkdiscard runs");
    assert!(st.success(), "blkdiscard failed");
    // Direct reads change nothing.
    let st = Command::new("dd")
        .arg(format!("if={}", dev.path.display()))
        .args(["of=/dev/null", "bs=64k", "count=8", "iflag=direct", "status=none"])
        .status()
        .expect("dd runs");
    assert!(st.success());
    let want: BTreeMap<u64, (u64, u64)> = [(4, (1, 64 * KIB)), (5, (1, 64 * KIB))].into_iter().collect();
    let e = ebpf.read_counts().expect("read ebpf");
    let f = fallback.read_counts().expect("read fallback");
    assert_eq!(of_device(&by_chunk(&e), dev.id()), want);
    assert_eq!(of_device(&by_chunk(&f), dev.id()), want);
}

/// The program id behind a pinned link, from `bpftool link show pinned`.
fn pinned_link_prog(path: &Path) -> Option<u32> {
    let out = Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(path)
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get("prog_id")?.as_u64().map(|id| id as u32)
}

#[test]
fn boot_log_keeps_counting_pinned_and_stop_frees_it() {
    use edgeshift_agent::dirty::boot_log;
    let Some(dev) = LoopDev::new(16 << 20) else {
        return;
    };
    let vm_dir = tempfile::tempdir().expect("vm dir");
    let pins = match boot_log::start(vm_dir.path(), &dev.path, 64 * KIB) {
        Ok(p) => p,
        Err(e) => {
            caps::available(&format!("a pinned eBPF boot log ({e})"), false);
            return;
        }
    };
    assert_eq!(pins, boot_log::pin_dir(vm_dir.path()));
    // No tracker object is alive any more: only the pins hold the program.
    let prog = pinned_link_prog(&pins.join("link")).expect("bpftool shows the pinned link");
    assert!(bpftool_has("prog", prog));
    dev.dd(2 * 64 * KIB, 4096, 3); // chunk 2: three writes
    dev.dd(9 * 64 * KIB + 60 * KIB, 8192, 1); // chunks 9 and 10: one each
    let counts = |w: &[boot_log::PinnedChunk]| w.iter().map(|c| (c.index, c.writes)).collect::<Vec<_>>();
    let got = boot_log::read(vm_dir.path(), &dev.path, 64 * KIB).expect("read the boot log");
    assert_eq!(counts(&got), vec![(2, 3), (9, 1), (10, 1)]);
    // Reads do not reset it; later writes add.
    dev.dd(2 * 64 * KIB, 4096, 1);
    let again = boot_log::read(vm_dir.path(), &dev.path, 64 * KIB).expect("read again");
    assert_eq!(counts(&again), vec![(2, 4), (9, 1), (10, 1)]);
    // A log is only trusted for the device and chunk size it counts.
    let err = boot_log::read(vm_dir.path(), &dev.path, 128 * KIB).expect_err("other chunk size");
    assert!(err.to_string().contains("chunks"), "{err}");
    let other = LoopDev::new(1 << 20).expect("second loop device");
    let err = boot_log::read(vm_dir.path(), &other.path, 64 * KIB).expect_err("other device");
    assert!(err.to_string().contains("watches"), "{err}");
    // Starting again (a new VM in this directory) begins from zero.
    boot_log::start(vm_dir.path(), &dev.path, 64 * KIB).expect("restart");
    let fresh = boot_log::read(vm_dir.path(), &dev.path, 64 * KIB).expect("read fresh");
    assert!(fresh.is_empty(), "{fresh:?}");
    let prog2 = pinned_link_prog(&pins.join("link")).expect("pinned link");
    boot_log::stop(vm_dir.path()).expect("stop");
    assert!(!pins.exists(), "pin directory left behind");
    boot_log::stop(vm_dir.path()).expect("stopping twice is fine");
    assert!(boot_log::read(vm_dir.path(), &dev.path, 64 * KIB).is_err());
    for id in [prog, prog2] {
        let gone = (0..50).any(|_| {
            let gone = !bpftool_has("prog", id);
            if !gone {
                std::thread::sleep(Duration::from_millis(100));
            }
            gone
        });
        assert!(gone, "program {id} still loaded after the boot log stopped");
    }
}
