//! Shared L2 segments: a bridge in a hub namespace with a veth to each
//! member host, so taps at any member sit on one Ethernet.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Command;

use crate::cmd::run;
use crate::link::{apply_tbf, LinkSpec};
use crate::netns::check_name;
use crate::{Testbed, TestbedError};

/// A shared Ethernet segment: a bridge in its own namespace with a veth to
/// each member host, where it ends on a bridge named after the segment, so
/// tap devices added to that bridge at any member are on one L2 network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L2Segment {
    /// The segment's name; also the bridge's name in every member host.
    pub name: String,
    /// Namespace holding the central bridge.
    pub netns: String,
    /// First three octets of the segment's /24 (198.19.N).
    pub subnet: [u8; 3],
    /// Member hosts and each one's address on its segment bridge.
    pub members: BTreeMap<String, Ipv4Addr>,
}

impl L2Segment {
    /// Address for the `n`-th guest on this segment (198.19.N.100+n), for VMs
    /// whose address is configured statically; `None` past the /24.
    pub fn guest_addr(&self, n: u8) -> Option<Ipv4Addr> {
        let last = 100u8.checked_add(n)?;
        (last < 255).then(|| Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], last))
    }

    /// Prefix length of the segment's subnet.
    pub fn prefix_len(&self) -> u8 {
        24
    }
}

impl Testbed {
    /// Creates L2 segment `name` joining `members`: a hub namespace with a
    /// bridge, and in each member a bridge named `name` (with address
    /// 198.19.{n}.{i+1}/24) linked to the hub by a veth. Tap devices enslaved
    /// to `name` at any member share one Ethernet. `spec` limits each
    /// member's veth (both directions).
    pub fn l2_segment(
        &mut self,
        name: &str,
        members: &[&str],
        spec: LinkSpec,
    ) -> Result<&L2Segment, TestbedError> {
        check_name("segment", name)?;
        if self.segments.contains_key(name) || self.hosts.contains_key(name) {
            return Err(TestbedError::DuplicateHost(name.to_string()));
        }
        if spec.rate_mbit == Some(0) {
            return Err(TestbedError::ZeroRate);
        }
        for m in members {
            self.host(m)?;
        }
        let n = u8::try_from(self.segments.len() + 1).map_err(|_| TestbedError::AddressesExhausted)?;
        let hub = self.create_netns(name)?;
        add_bridge(&hub, "br0")?;
        run(Command::new("ip").args(["-n", &hub, "link", "set", "br0", "up"]))?;
        let subnet = [198, 19, n];
        let mut addrs = BTreeMap::new();
        for (i, m) in members.iter().enumerate() {
            let ns = self.host(m)?.netns.clone();
            let host_octet = u8::try_from(i + 1)
                .ok()
                .filter(|&o| o < 100)
                .ok_or(TestbedError::AddressesExhausted)?;
            let addr = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], host_octet);
            // Hub side is named after the member; member side after the segment.
            let hub_if = format!("p-{m}");
            let member_if = format!("{}-up", truncate(name, 12));
            run(Command::new("ip").args([
                "link", "add", &hub_if, "netns", &hub, "type", "veth", "peer", "name", &member_if, "netns",
                &ns,
            ]))?;
            run(Command::new("ip").args(["-n", &hub, "link", "set", &hub_if, "master", "br0", "up"]))?;
            add_bridge(&ns, name)?;
            run(Command::new("ip").args(["-n", &ns, "link", "set", &member_if, "master", name, "up"]))?;
            run(Command::new("ip").args(["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", name]))?;
            run(Command::new("ip").args(["-n", &ns, "link", "set", name, "up"]))?;
            if let Some(mbit) = spec.rate_mbit {
                apply_tbf(&hub, &hub_if, mbit)?;
                apply_tbf(&ns, &member_if, mbit)?;
            }
            addrs.insert(m.to_string(), addr);
        }
        let seg = L2Segment {
            name: name.to_string(),
            netns: hub,
            subnet,
            members: addrs,
        };
        Ok(self.segments.entry(name.to_string()).or_insert(seg))
    }

    /// The L2 segment `name`.
    pub fn segment(&self, name: &str) -> Result<&L2Segment, TestbedError> {
        self.segments
            .get(name)
            .ok_or_else(|| TestbedError::UnknownSegment(name.to_string()))
    }
}

fn truncate(s: &str, max: usize) -> &str {
    // Names are ASCII (check_name), so byte slicing is on char boundaries.
    &s[..s.len().min(max)]
}

/// A bridge `name` in namespace `netns` that forwards at once (no STP, no
/// forwarding delay), so a segment carries traffic as soon as it is up.
fn add_bridge(netns: &str, name: &str) -> Result<(), TestbedError> {
    run(Command::new("ip").args([
        "-n",
        netns,
        "link",
        "add",
        name,
        "type",
        "bridge",
        "stp_state",
        "0",
        "forward_delay",
        "0",
    ]))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_addresses_stay_in_range() {
        let seg = L2Segment {
            name: "vmnet".into(),
            netns: "es-t-vmnet".into(),
            subnet: [198, 19, 1],
            members: BTreeMap::new(),
        };
        assert_eq!(seg.guest_addr(0), Some(Ipv4Addr::new(198, 19, 1, 100)));
        assert_eq!(seg.guest_addr(154), Some(Ipv4Addr::new(198, 19, 1, 254)));
        assert_eq!(seg.guest_addr(155), None);
    }
}
