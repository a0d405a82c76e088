//! The delay line on real links (root, iproute2, ping, iperf3): ping's RTT
//! is twice the configured one-way delay, a 100 Mbit/s link with 40 ms RTT
//! carries >= 90 Mbit/s after a visible slow start, and the line itself
//! loses and reorders nothing (its counters, and iperf3's UDP sequence check
//! with jitter on). docs/wan.md has the longer validation these assert.

use std::process::Stdio;

use edgeshift_testbed::{caps, cleanup_stale, LinkSpec, Testbed};

fn capable() -> bool {
    caps::missing_for_netns(&["iperf3", "ping"]).is_none()
}

/// Average RTT in ms of 20 pings from `from` to `to` over their link,
/// after one that resolves ARP (which crosses the delay line too).
fn ping_avg_ms(tb: &Testbed, from: &str, to: &str) -> f64 {
    let addr = tb.addr_of(to, from).expect("addr").to_string();
    tb.run_in(from, "ping", &["-c", "1", "-W", "2", &addr])
        .expect("first ping");
    let out = tb
        .run_in(from, "ping", &["-q", "-c", "20", "-i", "0.02", &addr])
        .expect("ping");
    // "rtt min/avg/max/mdev = 19.9/20.1/20.4/0.1 ms"
    let stats = out
        .lines()
        .find_map(|l| l.split(" = ").nth(1).filter(|_| l.starts_with("rtt")))
        .unwrap_or_else(|| panic!("no rtt line in {out}"));
    stats
        .split('/')
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad rtt line {stats}"))
}

/// Runs iperf3 (`client_args` after `-c ADDR -J`) from `client` to a
/// one-shot server in `server`; its JSON report.
fn iperf3_json(tb: &Testbed, client: &str, server: &str, client_args: &[&str]) -> serde_json::Value {
    let addr = tb.addr_of(server, client).expect("addr").to_string();
    let mut srv = tb
        .command(server, "iperf3")
        .args(["-s", "-1", "-B", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server");
    let mut last = String::new();
    for _ in 0..30 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let out = tb
            .command(client, "iperf3")
            .args(["-c", &addr, "-J"])
            .args(client_args)
            .output()
            .expect("iperf3 client");
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&last) {
            if v.get("error").is_none() {
                let _ = srv.wait();
                return v;
            }
        }
    }
    let _ = srv.kill();
    let _ = srv.wait();
    panic!("iperf3 {client} -> {server} never ran: {last}");
}

/// RcvbufErrors of `host`'s UDP (a fresh namespace counts from 0).
fn udp_rcvbuf_errors(tb: &Testbed, host: &str) -> u64 {
    let snmp = tb
        .run_in(host, "cat", &["/proc/net/snmp"])
        .expect("/proc/net/snmp");
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next().expect("Udp header"), udp.next().expect("Udp values"));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .expect("RcvbufErrors")
}

#[test]
fn ping_rtt_is_twice_the_one_way_delay() {
    if !capable() {
        return;
    }
    let tag = "tbwanrtt";
    cleanup_stale(tag).expect("cleanup");
    let mut tb = Testbed::new(tag).expect("testbed");
    for h in ["a", "b", "c", "d"] {
        tb.add_host(h).expect("host");
    }
    tb.link("a", "b", LinkSpec::default()).expect("plain link");
    tb.link("a", "c", LinkSpec::default().delay_ms(10.0))
        .expect("10 ms link");
    tb.link("a", "d", LinkSpec::mbit(100).delay_ms(30.0))
        .expect("30 ms link");
    let plain = ping_avg_ms(&tb, "a", "b");
    assert!(plain < 1.0, "no delay line, RTT {plain} ms");
    for (peer, want) in [("c", 20.0), ("d", 60.0)] {
        let got = ping_avg_ms(&tb, "a", peer);
        assert!(
            (got - want).abs() <= 1.0,
            "RTT to {peer}: {got} ms, configured {want} ms"
        );
    }
    let stats = tb.delay_stats("a", "c").expect("stats");
    assert!(stats.outbound.sent >= 21 && stats.inbound.sent >= 21, "{stats:?}");
}

#[test]
fn long_fat_link_reaches_its_rate_after_slow_start() {
    if !capable() {
        return;
    }
    let tag = "tbwanbdp";
    cleanup_stale(tag).expect("cleanup");
    let mut tb = Testbed::new(tag).expect("testbed");
    tb.add_host("a").expect("host");
    tb.add_host("b").expect("host");
    tb.link("a", "b", LinkSpec::mbit(100).delay_ms(20.0))
        .expect("link");
    // Intervals of 100 ms (two RTTs each) show the window growing.
    let v = iperf3_json(&tb, "a", "b", &["-R", "-t", "5", "-i", "0.1", "-w", "4M"]);
    let intervals: Vec<f64> = v["intervals"]
        .as_array()
        .expect("intervals")
        .iter()
        .filter_map(|i| i["sum"]["bits_per_second"].as_f64())
        .map(|b| b / 1e6)
        .collect();
    let received = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("received")
        / 1e6;
    let steady: f64 = intervals[20..].iter().sum::<f64>() / (intervals.len() - 20) as f64;
    eprintln!(
        "100 Mbit/s, 40 ms RTT: first intervals {:?}, steady {steady:.1} Mbit/s, whole {received:.1}",
        &intervals[..8]
    );
    assert!(
        steady >= 90.0,
        "steady state {steady:.1} Mbit/s < 90 on a 100 Mbit/s link"
    );
    assert!(
        intervals[0] < 0.5 * steady,
        "no slow start visible: {intervals:?}"
    );
    let stats = tb.delay_stats("a", "b").expect("stats");
    assert_eq!(
        stats.outbound.dropped_full + stats.outbound.dropped_rx + stats.outbound.send_errors,
        0,
        "{stats:?}"
    );
}

#[test]
fn delay_line_loses_and_reorders_nothing_of_its_own() {
    if !capable() {
        return;
    }
    let tag = "tbwanseq";
    cleanup_stale(tag).expect("cleanup");
    let mut tb = Testbed::new(tag).expect("testbed");
    tb.add_host("a").expect("host");
    tb.add_host("b").expect("host");
    let spec = LinkSpec {
        jitter_us: 2000,
        ..LinkSpec::default().delay_ms(10.0)
    };
    tb.link("a", "b", spec).expect("link");
    // 30 000 datagrams with sequence numbers; iperf3's receiver counts the
    // missing and the out-of-order ones.
    let v = iperf3_json(
        &tb,
        "a",
        "b",
        &["-u", "-b", "200M", "-l", "1000", "-n", "30000000", "-w", "8M"],
    );
    // A receiving socket that overflows is not the line's loss: count it apart.
    let overflowed = udp_rcvbuf_errors(&tb, "b");
    let sum = &v["end"]["sum"];
    let (packets, lost) = (
        sum["packets"].as_u64().expect("packets"),
        sum["lost_packets"].as_u64().expect("lost"),
    );
    let out_of_order = v["end"]["streams"][0]["udp"]["out_of_order"]
        .as_u64()
        .unwrap_or(0);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let stats = tb.delay_stats("a", "b").expect("stats");
    eprintln!("udp: {packets} sent, {lost} lost ({overflowed} by b's socket), {out_of_order} out of order; line {stats:?}");
    assert!(packets >= 30_000, "{packets} datagrams");
    assert_eq!(
        (lost - overflowed.min(lost), out_of_order),
        (0, 0),
        "lost or reordered through a jittery line"
    );
    assert!(lost <= packets / 100, "{lost} of {packets} lost at the receiver");
    let o = stats.outbound;
    assert_eq!(o.received, o.sent, "{o:?}");
    assert_eq!(
        o.dropped_full + o.dropped_rx + o.send_errors + o.dropped_loss,
        0,
        "{o:?}"
    );
}

/// Min/avg/max/mdev of 50 pings (ms), after one that resolves ARP.
fn ping_stats(tb: &Testbed, from: &str, to: &str) -> String {
    let addr = tb.addr_of(to, from).expect("addr").to_string();
    tb.run_in(from, "ping", &["-c", "1", "-W", "2", &addr])
        .expect("first ping");
    let out = tb
        .run_in(from, "ping", &["-q", "-c", "50", "-i", "0.02", &addr])
        .expect("ping");
    out.lines()
        .find_map(|l| l.split(" = ").nth(1).filter(|_| l.starts_with("rtt")))
        .unwrap_or("?")
        .replace(" ms", "")
}

/// Per-interval received Mbit/s of a `-R` iperf3 run, and its end.
fn tcp_run(tb: &Testbed, args: &[&str]) -> (Vec<f64>, f64) {
    let v = iperf3_json(tb, "a", "b", args);
    let intervals = v["intervals"]
        .as_array()
        .expect("intervals")
        .iter()
        .filter_map(|i| i["sum"]["bits_per_second"].as_f64())
        .map(|b| b / 1e6)
        .collect();
    (
        intervals,
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e6,
    )
}

/// The validation table of docs/wan.md (a minute; run in release:
/// `cargo test --release -p edgeshift-testbed --test wan -- --ignored --nocapture`).
#[test]
#[ignore = "prints docs/wan.md's table; not an assertion"]
fn validation_table() {
    if !capable() {
        return;
    }
    println!("| what | configured | measured |\n|---|---|---|");
    for (i, (rtt, rate)) in [
        (0.0, None),
        (20.0, None),
        (60.0, None),
        (20.0, Some(100)),
        (60.0, Some(100)),
    ]
    .into_iter()
    .enumerate()
    {
        let tag = format!("tbwanv{i}");
        cleanup_stale(&tag).expect("cleanup");
        let mut tb = Testbed::new(&tag).expect("testbed");
        tb.add_host("a").expect("host");
        tb.add_host("b").expect("host");
        let spec = LinkSpec {
            rate_mbit: rate,
            ..LinkSpec::default().delay_ms(rtt / 2.0)
        };
        tb.link("a", "b", spec).expect("link");
        let rate = rate.map_or("unlimited".to_string(), |r| format!("{r} Mbit/s"));
        println!(
            "| ping RTT min/avg/max/mdev ms (50 pings) | {rtt} ms, {rate} | {} |",
            ping_stats(&tb, "a", "b")
        );
    }
    for (name, delay_ms, rate, window) in [
        ("100 Mbit/s 40 ms, default autotuning", 20.0, Some(100), None),
        ("100 Mbit/s 40 ms, -w 4M", 20.0, Some(100), Some("4M")),
        ("unlimited, 20 ms RTT, default autotuning", 10.0, None, None),
        ("unlimited, no delay line", 0.0, None, None),
    ] {
        let tag = "tbwanvt";
        cleanup_stale(tag).expect("cleanup");
        let mut tb = Testbed::new(tag).expect("testbed");
        tb.add_host("a").expect("host");
        tb.add_host("b").expect("host");
        let spec = LinkSpec {
            rate_mbit: rate,
            ..LinkSpec::default().delay_ms(delay_ms)
        };
        tb.link("a", "b", spec).expect("link");
        let cpu_before = tb.delay_stats("a", "b").map(|s| s.cpu_seconds).unwrap_or(0.0);
        let mut args = vec!["-R", "-t", "6", "-i", "0.1"];
        if let Some(w) = window {
            args.extend(["-w", w]);
        }
        let (intervals, end) = tcp_run(&tb, &args);
        let line = tb.delay_stats("a", "b").ok();
        let steady = intervals[20..].iter().sum::<f64>() / (intervals.len() - 20) as f64;
        let first: Vec<String> = intervals[..6].iter().map(|m| format!("{m:.0}")).collect();
        let cpu = line.map_or("-".to_string(), |s| {
            let gbit = end * 6.0 / 1000.0;
            format!("{:.2} CPU s per Gbit", (s.cpu_seconds - cpu_before) / gbit)
        });
        let drops = line.map_or("-".to_string(), |s| {
            let c = s.inbound;
            format!(
                "{} full / {} rx / {} tx drops",
                c.dropped_full, c.dropped_rx, c.send_errors
            )
        });
        println!(
            "| iperf3 TCP b->a 6 s | {name} | steady {steady:.1} Mbit/s (from 2 s), whole run {end:.1}; first 100 ms intervals {}; line: {cpu}, {drops} |",
            first.join(", ")
        );
    }
    let tag = "tbwanvu";
    cleanup_stale(tag).expect("cleanup");
    let mut tb = Testbed::new(tag).expect("testbed");
    tb.add_host("a").expect("host");
    tb.add_host("b").expect("host");
    let spec = LinkSpec {
        jitter_us: 2000,
        ..LinkSpec::default().delay_ms(10.0)
    };
    tb.link("a", "b", spec).expect("link");
    let v = iperf3_json(
        &tb,
        "a",
        "b",
        &["-u", "-b", "400M", "-l", "1000", "-n", "100000000", "-w", "8M"],
    );
    let overflowed = udp_rcvbuf_errors(&tb, "b");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let s = tb.delay_stats("a", "b").expect("stats").outbound;
    let sum = &v["end"]["sum"];
    println!(
        "| iperf3 UDP a->b, 100 000 datagrams at 400 Mbit/s | 10 ms ± 2 ms one way, no reorder | {} lost ({overflowed} by b's socket), {} out of order; line received {} sent {}, drops {} |",
        sum["lost_packets"],
        v["end"]["streams"][0]["udp"]["out_of_order"],
        s.received,
        s.sent,
        s.dropped_full + s.dropped_rx + s.send_errors
    );
}
