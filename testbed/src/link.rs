//! Point-to-point WAN links: a veth pair between two hosts with a tbf rate
//! limit on the egress of both ends, and, when the link has a delay, a
//! middle namespace with the delay line in it (see `delay`).

use std::net::Ipv4Addr;
use std::process::Command;

use crate::cmd::run;
use crate::counters::{iface_counters, IfaceCounters};
use crate::{Testbed, TestbedError};

/// Properties of an emulated link, the same in both directions: the rate
/// (tbf on each end's egress), then the delay line's one-way delay, jitter
/// and loss (as a bottleneck followed by propagation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkSpec {
    /// Rate limit in Mbit/s per direction (tbf); `None` is an unlimited veth.
    pub rate_mbit: Option<u32>,
    /// One-way delay in microseconds (0: no delay line).
    pub delay_us: u32,
    /// Each frame's delay varies uniformly by up to this much (no reordering).
    pub jitter_us: u32,
    /// Frames lost on purpose, in parts per million.
    pub loss_ppm: u32,
}

impl LinkSpec {
    /// A link limited to `mbit` Mbit/s in each direction.
    pub fn mbit(mbit: u32) -> Self {
        Self {
            rate_mbit: Some(mbit),
            ..Self::default()
        }
    }

    /// This link with a one-way delay of `ms` milliseconds (RTT 2 × ms).
    pub fn delay_ms(self, ms: f64) -> Self {
        Self {
            delay_us: (ms * 1000.0).round() as u32,
            ..self
        }
    }

    /// Whether frames cross a delay line (any delay, jitter or loss).
    pub fn needs_delay_line(&self) -> bool {
        self.delay_us > 0 || self.jitter_us > 0 || self.loss_ppm > 0
    }
}

/// One side of a point-to-point link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkEnd {
    /// Host this end is in.
    pub host: String,
    /// Interface name inside the host's namespace (`to-{peer}`).
    pub ifname: String,
    /// Address of this end.
    pub addr: Ipv4Addr,
}

#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub(crate) a: LinkEnd,
    pub(crate) b: LinkEnd,
    pub(crate) spec: LinkSpec,
}

impl Testbed {
    /// Connects `a` and `b` with a veth pair (`to-b` in a, `to-a` in b),
    /// addresses 198.18.{n}.1 and .2, and `spec`'s rate on both egresses.
    /// Returns (a's address, b's address).
    pub fn link(&mut self, a: &str, b: &str, spec: LinkSpec) -> Result<(Ipv4Addr, Ipv4Addr), TestbedError> {
        if a == b {
            return Err(TestbedError::BadLink(a.into(), b.into(), "same host"));
        }
        if self.find_link(a, b).is_some() {
            return Err(TestbedError::BadLink(a.into(), b.into(), "already linked"));
        }
        if spec.rate_mbit == Some(0) {
            return Err(TestbedError::ZeroRate);
        }
        let ns_a = self.host(a)?.netns.clone();
        let ns_b = self.host(b)?.netns.clone();
        let n = u8::try_from(self.links.len() + 1).map_err(|_| TestbedError::AddressesExhausted)?;
        let if_a = format!("to-{b}");
        let if_b = format!("to-{a}");
        let addr_a = Ipv4Addr::new(198, 18, n, 1);
        let addr_b = Ipv4Addr::new(198, 18, n, 2);
        if spec.needs_delay_line() {
            // Two veth pairs through a middle namespace; the hosts see the
            // same interface names and one /24, as without a delay.
            self.delay_line(n, (a, &ns_a, &if_a), (b, &ns_b, &if_b), spec)?;
        } else {
            // Both ends are created straight inside their namespaces, so nothing
            // ever exists in the root namespace and names cannot collide there.
            run(Command::new("ip").args([
                "link", "add", &if_a, "netns", &ns_a, "type", "veth", "peer", "name", &if_b, "netns", &ns_b,
            ]))?;
        }
        for (ns, ifname, addr) in [(&ns_a, &if_a, addr_a), (&ns_b, &if_b, addr_b)] {
            run(Command::new("ip").args(["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", ifname]))?;
            run(Command::new("ip").args(["-n", ns, "link", "set", ifname, "up"]))?;
            if let Some(mbit) = spec.rate_mbit {
                apply_tbf(ns, ifname, mbit)?;
            }
        }
        self.links.push(Link {
            a: LinkEnd {
                host: a.into(),
                ifname: if_a,
                addr: addr_a,
            },
            b: LinkEnd {
                host: b.into(),
                ifname: if_b,
                addr: addr_b,
            },
            spec,
        });
        Ok((addr_a, addr_b))
    }

    fn find_link(&self, a: &str, b: &str) -> Option<&Link> {
        self.links
            .iter()
            .find(|l| (l.a.host == a && l.b.host == b) || (l.a.host == b && l.b.host == a))
    }

    /// `host`'s end of its link to `peer`.
    pub fn link_end(&self, host: &str, peer: &str) -> Result<&LinkEnd, TestbedError> {
        let link = self
            .find_link(host, peer)
            .ok_or_else(|| TestbedError::NoLink(host.into(), peer.into()))?;
        Ok(if link.a.host == host { &link.a } else { &link.b })
    }

    /// `host`'s address on its link to `peer` (what `peer` connects to).
    pub fn addr_of(&self, host: &str, peer: &str) -> Result<Ipv4Addr, TestbedError> {
        Ok(self.link_end(host, peer)?.addr)
    }

    /// The rate of the link between `a` and `b`.
    pub fn link_spec(&self, a: &str, b: &str) -> Result<LinkSpec, TestbedError> {
        self.find_link(a, b)
            .map(|l| l.spec)
            .ok_or_else(|| TestbedError::NoLink(a.into(), b.into()))
    }

    /// Changes the rate of an existing link (both directions); its delay,
    /// jitter and loss stay as the link was made.
    pub fn set_rate(&mut self, a: &str, b: &str, spec: LinkSpec) -> Result<(), TestbedError> {
        if spec.rate_mbit == Some(0) {
            return Err(TestbedError::ZeroRate);
        }
        let link = self
            .find_link(a, b)
            .ok_or_else(|| TestbedError::NoLink(a.into(), b.into()))?
            .clone();
        for end in [&link.a, &link.b] {
            let ns = self.host(&end.host)?.netns.clone();
            // Deleting a root qdisc that is not there fails; ignore that case.
            let _ = run(Command::new("tc").args(["-n", &ns, "qdisc", "del", "dev", &end.ifname, "root"]));
            if let Some(mbit) = spec.rate_mbit {
                apply_tbf(&ns, &end.ifname, mbit)?;
            }
        }
        if let Some(l) = self
            .links
            .iter_mut()
            .find(|l| (l.a.host == a && l.b.host == b) || (l.a.host == b && l.b.host == a))
        {
            l.spec.rate_mbit = spec.rate_mbit;
        }
        Ok(())
    }

    /// Byte counters of `host`'s interface towards `peer`.
    pub fn link_counters(&self, host: &str, peer: &str) -> Result<IfaceCounters, TestbedError> {
        let end = self.link_end(host, peer)?;
        let ns = &self.host(host)?.netns;
        iface_counters(ns, &end.ifname)
    }
}

/// tbf on the egress of `ifname`: `mbit` Mbit/s, burst of ~10 ms (at least
/// 32 KiB so GSO-sized packets pass), queue up to 100 ms.
pub(crate) fn apply_tbf(netns: &str, ifname: &str, mbit: u32) -> Result<(), TestbedError> {
    let bytes_per_sec = u64::from(mbit) * 1_000_000 / 8;
    let burst = (bytes_per_sec / 100).max(32 * 1024);
    run(Command::new("tc").args([
        "-n",
        netns,
        "qdisc",
        "add",
        "dev",
        ifname,
        "root",
        "tbf",
        "rate",
        &format!("{mbit}mbit"),
        "burst",
        &burst.to_string(),
        "latency",
        "100ms",
    ]))?;
    Ok(())
}
