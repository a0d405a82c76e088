//! The testbed on small topologies, for real: namespaces, tbf-limited veths
//! measured with iperf3, an L2 segment across namespaces, and teardown that
//! leaves nothing behind (on drop, after a panic, and via cleanup_stale).
//! Needs root, iproute2 and iperf3; skips without them only when CI != "true".
//! (A topology file built into a testbed is tested in perf/tests/topology.rs.)

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edgeshift_testbed::caps;
use edgeshift_testbed::iperf::{iperf3, link_goodput_mbit, Direction};
use edgeshift_testbed::{cleanup_stale, list_netns, LinkSpec, Testbed, TestbedError};

/// Whether the test can run (root, iproute2, iperf3, ping); panics under
/// CI=true when it cannot.
fn capable() -> bool {
    caps::missing_for_netns(&["iperf3", "ping"]).is_none()
}

fn netns_of_tag(tag: &str) -> Vec<String> {
    let prefix = format!("es-{tag}-");
    list_netns()
        .expect("ip netns list")
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

fn root_ifaces() -> String {
    let out = Command::new("ip").args(["-o", "link"]).output().expect("ip link");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Throughput in Mbit/s from `client` to `server` (or back with `reverse`),
/// 4 s after 1 s of slow start.
fn iperf_mbit(tb: &Testbed, client: &str, server: &str, reverse: bool) -> f64 {
    let direction = if reverse {
        Direction::FromServer
    } else {
        Direction::ToServer
    };
    link_goodput_mbit(tb, client, server, 4, direction)
        .unwrap_or_else(|e| panic!("iperf3 {client} -> {server}: {e}"))
}

#[test]
fn links_are_rate_limited_both_ways_and_torn_down() {
    if !capable() {
        return;
    }
    let tag = "tbrate";
    cleanup_stale(tag).expect("cleanup");
    let mut tb = Testbed::new(tag).expect("testbed");
    tb.add_host("a").expect("host a");
    tb.add_host("b").expect("host b");
    tb.add_host("c").expect("host c");
    let (addr_a, addr_b) = tb.link("a", "b", LinkSpec::mbit(40)).expect("link a-b");
    tb.link("a", "c", LinkSpec::default()).expect("link a-c");
    assert_eq!(tb.addr_of("a", "b").expect("a's addr"), addr_a);
    assert_eq!(tb.addr_of("b", "a").expect("b's addr"), addr_b);
    for addr in [addr_a, addr_b] {
        assert_eq!(addr.octets()[..2], [198, 18], "{addr} outside 198.18.0.0/15");
    }
    assert_eq!(netns_of_tag(tag).len(), 3);

    let forward = iperf_mbit(&tb, "a", "b", false);
    let backward = iperf_mbit(&tb, "a", "b", true);
    for (dir, mbit) in [("a->b", forward), ("b->a", backward)] {
        assert!(
            (36.0..=44.0).contains(&mbit),
            "{dir}: {mbit:.1} Mbit/s is not within 10% of the 40 Mbit/s tbf rate"
        );
    }
    // The unlimited link is not held to the rate: the limit is the qdisc's doing.
    let free = iperf_mbit(&tb, "a", "c", false);
    assert!(free > 200.0, "unlimited veth only reached {free:.1} Mbit/s");

    // Counters see the traffic: at least 4 s at ~40 Mbit/s went a -> b.
    let counters = tb.link_counters("a", "b").expect("counters");
    assert!(counters.tx_bytes > 15_000_000, "tx_bytes {}", counters.tx_bytes);

    // Changing the rate takes effect.
    tb.set_rate("a", "b", LinkSpec::mbit(10)).expect("set rate");
    let slower = iperf_mbit(&tb, "a", "b", false);
    assert!(
        (9.0..=11.0).contains(&slower),
        "after set_rate(10): {slower:.1} Mbit/s"
    );

    drop(tb);
    assert!(
        netns_of_tag(tag).is_empty(),
        "namespaces left: {:?}",
        netns_of_tag(tag)
    );
    let ifaces = root_ifaces();
    assert!(
        !ifaces.contains("to-a") && !ifaces.contains("to-b"),
        "veth left in root ns:\n{ifaces}"
    );
}

#[test]
fn l2_segment_joins_hosts_on_one_ethernet() {
    if !capable() {
        return;
    }
    let tag = "tbl2";
    cleanup_stale(tag).expect("cleanup");
    let mut tb = Testbed::new(tag).expect("testbed");
    for h in ["e1", "e2", "e3"] {
        tb.add_host(h).expect("host");
    }
    let seg = tb
        .l2_segment("vmnet", &["e1", "e2", "e3"], LinkSpec::default())
        .expect("segment")
        .clone();
    assert_eq!(seg.members.len(), 3);
    let e2_addr = seg.members["e2"];
    assert_eq!(e2_addr.octets()[..2], [198, 19]);

    // A stand-in for a VM tap: a veth whose far end sits in a "guest"
    // namespace, enslaved to e1's segment bridge just as a tap would be.
    let guest = tb.add_host("guest").expect("guest host");
    let guest_addr = seg.guest_addr(0).expect("guest addr");
    let e1 = tb.host("e1").expect("e1").netns.clone();
    let run = |args: &[&str]| {
        let st = Command::new("ip").args(args).status().expect("ip");
        assert!(st.success(), "ip {args:?}");
    };
    run(&[
        "link",
        "add",
        "tap0",
        "netns",
        &e1,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &guest.netns,
    ]);
    run(&["-n", &e1, "link", "set", "tap0", "master", "vmnet", "up"]);
    run(&[
        "-n",
        &guest.netns,
        "addr",
        "add",
        &format!("{guest_addr}/24"),
        "dev",
        "eth0",
    ]);
    run(&["-n", &guest.netns, "link", "set", "eth0", "up"]);

    // e3 reaches the guest behind e1, and e2, without any routing: one L2.
    for target in [guest_addr, e2_addr] {
        let out = tb
            .run_in("e3", "ping", &["-c", "2", "-W", "2", &target.to_string()])
            .unwrap_or_else(|e| panic!("ping {target} from e3: {e}"));
        assert!(out.contains("2 received"), "{out}");
    }
    // The guest's MAC is learnt directly (a neighbour entry, not a gateway).
    let neigh = tb
        .run_in("e3", "ip", &["neigh", "show", &guest_addr.to_string()])
        .expect("neigh");
    assert!(
        neigh.contains("lladdr"),
        "no neighbour entry for the guest: {neigh}"
    );
    // Hosts outside the segment are not on it.
    let mut cmd = tb.command("guest", "ping");
    cmd.args(["-c", "1", "-W", "1", &Ipv4Addr::new(198, 18, 1, 1).to_string()]);
    assert!(!cmd.output().expect("ping").status.success());

    let netns = tb.segment("vmnet").expect("segment").netns.clone();
    assert!(list_netns().expect("list").contains(&netns));
    tb.teardown().expect("teardown");
    assert!(
        netns_of_tag(tag).is_empty(),
        "namespaces left: {:?}",
        netns_of_tag(tag)
    );
}

#[test]
fn teardown_after_panic_kills_processes_and_removes_namespaces() {
    if !capable() {
        return;
    }
    let tag = "tbpanic";
    cleanup_stale(tag).expect("cleanup");
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let mut tb = Testbed::new(tag).expect("testbed");
        tb.add_host("x").expect("host");
        tb.add_host("y").expect("host");
        tb.link("x", "y", LinkSpec::mbit(5)).expect("link");
        let child = tb.command("x", "sleep").arg("600").spawn().expect("sleep");
        tx.send(child).expect("send child");
        panic!("deliberate panic with a testbed alive");
    });
    assert!(result.is_err());
    let mut child = rx.recv().expect("child");
    assert!(
        netns_of_tag(tag).is_empty(),
        "namespaces left: {:?}",
        netns_of_tag(tag)
    );
    // The sleeper was killed by the teardown, not left running for 600 s.
    let deadline = Instant::now() + Duration::from_secs(2);
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "sleeper still running after teardown");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "sleeper exited normally: {status}");
}

#[test]
fn cleanup_stale_removes_a_leaked_testbed() {
    if !capable() {
        return;
    }
    let tag = "tbstale";
    cleanup_stale(tag).expect("cleanup");
    let mut tb = Testbed::new(tag).expect("testbed");
    tb.add_host("p").expect("host");
    tb.add_host("q").expect("host");
    tb.link("p", "q", LinkSpec::mbit(5)).expect("link");
    tb.l2_segment("seg", &["p", "q"], LinkSpec::default())
        .expect("segment");
    let mut sleeper = tb.command("q", "sleep").arg("600").spawn().expect("sleep");
    // As if the owner were killed with -9: no Drop runs.
    std::mem::forget(tb);
    assert_eq!(netns_of_tag(tag).len(), 3);
    assert!(matches!(Testbed::new(tag), Err(TestbedError::TagInUse(_))));

    let mut removed = cleanup_stale(tag).expect("cleanup_stale");
    removed.sort();
    assert_eq!(removed, vec!["es-tbstale-p", "es-tbstale-q", "es-tbstale-seg"]);
    assert!(netns_of_tag(tag).is_empty());
    let status = sleeper.wait().expect("wait sleeper");
    assert!(!status.success(), "sleeper should have been killed");
    // Nothing left: a second call finds nothing, and the tag is free again.
    assert!(cleanup_stale(tag).expect("again").is_empty());
    drop(Testbed::new(tag).expect("tag free again"));
}

#[test]
fn bad_input_is_rejected() {
    if !capable() {
        return;
    }
    for tag in ["", "has-dash", "has space", "much_too_long_tag", "a/b"] {
        assert!(
            matches!(Testbed::new(tag), Err(TestbedError::InvalidName { .. })),
            "tag {tag:?}"
        );
        assert!(cleanup_stale(tag).is_err(), "cleanup_stale({tag:?})");
    }
    let tag = "tbbad";
    cleanup_stale(tag).expect("cleanup");
    let mut tb = Testbed::new(tag).expect("testbed");
    tb.add_host("a").expect("host");
    tb.add_host("b").expect("host");
    assert!(matches!(tb.add_host("a"), Err(TestbedError::DuplicateHost(_))));
    assert!(matches!(
        tb.add_host("bad-name"),
        Err(TestbedError::InvalidName { .. })
    ));
    assert!(matches!(
        tb.link("a", "a", LinkSpec::default()),
        Err(TestbedError::BadLink(..))
    ));
    assert!(matches!(
        tb.link("a", "zz", LinkSpec::default()),
        Err(TestbedError::UnknownHost(_))
    ));
    assert!(matches!(
        tb.link("a", "b", LinkSpec::mbit(0)),
        Err(TestbedError::ZeroRate)
    ));
    tb.link("a", "b", LinkSpec::mbit(10)).expect("link");
    assert!(matches!(
        tb.link("b", "a", LinkSpec::default()),
        Err(TestbedError::BadLink(..))
    ));
    assert!(matches!(tb.addr_of("a", "zz"), Err(TestbedError::NoLink(..))));
    assert!(matches!(tb.segment("nope"), Err(TestbedError::UnknownSegment(_))));
    assert!(matches!(
        tb.l2_segment("s", &["a", "zz"], LinkSpec::default()),
        Err(TestbedError::UnknownHost(_))
    ));
    // iperf3 between unknown hosts, or to an address no server can bind
    // (not a's): an error, not a hang.
    assert!(matches!(
        iperf3(
            &tb,
            "zz",
            Ipv4Addr::new(198, 18, 9, 9),
            5201,
            "a",
            1,
            Direction::ToServer
        ),
        Err(TestbedError::UnknownHost(_))
    ));
    let started = Instant::now();
    match iperf3(
        &tb,
        "a",
        Ipv4Addr::new(198, 18, 200, 1),
        5201,
        "b",
        1,
        Direction::ToServer,
    ) {
        Err(TestbedError::Parse { cmd, .. }) => assert!(cmd.contains("198.18.200.1"), "{cmd}"),
        other => panic!("expected iperf3 to fail without a server, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // A failing command surfaces its stderr.
    match tb.run_in("a", "ip", &["link", "set", "nonexistent0", "up"]) {
        Err(TestbedError::Command { stderr, .. }) => assert!(!stderr.is_empty()),
        other => panic!("expected a command error, got {other:?}"),
    }
    drop(tb);
    assert!(netns_of_tag(tag).is_empty());
}

#[test]
fn host_addresses_reach_every_linked_host_over_its_direct_link() {
    if !capable() {
        return;
    }
    let tag = "tbha";
    cleanup_stale(tag).expect("cleanup");
    let mut tb = Testbed::new(tag).expect("testbed");
    for h in ["a", "b", "c", "d"] {
        tb.add_host(h).expect("host");
    }
    // a, b, c fully meshed; d linked to a only.
    for (x, y) in [("a", "b"), ("a", "c"), ("b", "c"), ("a", "d")] {
        tb.link(x, y, LinkSpec::default()).expect("link");
    }
    assert!(tb.host_addr("a").is_err(), "no host address before routing");
    tb.route_host_addrs().expect("route host addresses");
    let addrs: Vec<Ipv4Addr> = ["a", "b", "c", "d"]
        .iter()
        .map(|h| tb.host_addr(h).expect("host address"))
        .collect();
    assert_eq!(
        addrs.iter().collect::<std::collections::BTreeSet<_>>().len(),
        4,
        "distinct: {addrs:?}"
    );
    for a in &addrs {
        assert_eq!(a.octets()[..3], [198, 19, 250], "benchmarking range: {a}");
    }
    let ping = |from: &str, to: Ipv4Addr| {
        tb.command(from, "ping")
            .args(["-c", "1", "-W", "2", &to.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    for (from, to) in [("b", "c"), ("c", "a"), ("a", "d"), ("d", "a"), ("c", "b")] {
        assert!(
            ping(from, tb.host_addr(to).expect("addr")),
            "{from} cannot reach {to}'s host address"
        );
    }
    // The route goes over the direct link: b's way to c's address is its link to c.
    let route = tb
        .run_in(
            "b",
            "ip",
            &["route", "get", &tb.host_addr("c").expect("addr").to_string()],
        )
        .expect("ip route get");
    assert!(route.contains("to-c"), "{route}");
    // No link from b to d: no route either (nothing is forwarded through a).
    assert!(!ping("b", tb.host_addr("d").expect("addr")));
    assert!(tb.host_addr("nope").is_err());
    drop(tb);
    assert!(netns_of_tag(tag).is_empty(), "namespaces left behind");
}
