//! A topology file built into a testbed, for real: every pair linked at its
//! rate, and nothing left behind. Needs root, iproute2 and iperf3; skips
//! without them only when CI != "true".

use edgeshift_perf::topology::Topology;
use edgeshift_testbed::iperf::{link_goodput_mbit, Direction};
use edgeshift_testbed::{caps, cleanup_stale, list_netns, Testbed};

fn netns_of_tag(tag: &str) -> Vec<String> {
    let prefix = format!("es-{tag}-");
    list_netns()
        .expect("ip netns list")
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
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
fn topology_toml_builds_rate_limited_links_and_leaves_nothing() {
    if caps::missing_for_netns(&["iperf3"]).is_some() {
        return;
    }
    let tag = "tbtopo";
    cleanup_stale(tag).expect("cleanup");
    let topo = Topology::from_toml(
        "name = 'small'\ndefault_rate_mbit = 20\n\
         [[host]]\nname = 'dc'\nrole = 'origin'\n\
         [[host]]\nname = 'x1'\nrole = 'edge'\n\
         [[host]]\nname = 'x2'\nrole = 'edge'\n\
         [[link]]\na = 'x1'\nb = 'x2'\nrate_mbit = 60\n",
    )
    .expect("topology parses");
    let tb = topo.build(tag).expect("testbed from topology");
    assert_eq!(netns_of_tag(tag).len(), 3);
    // Every pair is linked: the listed pair at its rate, the others at the default.
    let fast = iperf_mbit(&tb, "x1", "x2", false);
    assert!(
        (54.0..=66.0).contains(&fast),
        "x1->x2 {fast:.1} Mbit/s, want 60 ±10%"
    );
    let slow = iperf_mbit(&tb, "dc", "x2", true);
    assert!(
        (18.0..=22.0).contains(&slow),
        "x2->dc {slow:.1} Mbit/s, want 20 ±10%"
    );
    assert!(tb.addr_of("dc", "x1").is_ok());
    drop(tb);
    assert!(
        netns_of_tag(tag).is_empty(),
        "namespaces left: {:?}",
        netns_of_tag(tag)
    );
}
