//! Topology descriptions (TOML in perf/topologies/): hosts with a role, the
//! rate, one-way delay, jitter and loss of each link, and which host runs
//! the cache coordinator. Every pair of hosts is linked; pairs not listed
//! get `default_rate_mbit` and `default_delay_ms`.

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use edgeshift_testbed::{LinkSpec, Testbed, TestbedError};

/// Errors reading or building a topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("parsing topology: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("invalid topology: {0}")]
    Invalid(String),
    #[error(transparent)]
    Testbed(#[from] TestbedError),
}

/// What a host is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An edge server: runs an agent (and VMs).
    Edge,
    /// The origin data centre: holds every image.
    Origin,
    /// A client of the VMs (no agent).
    Client,
}

/// One host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSpec {
    pub name: String,
    pub role: Role,
}

/// One link's properties (the same in both directions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkRate {
    pub a: String,
    pub b: String,
    /// Mbit/s; absent means unlimited.
    pub rate_mbit: Option<u32>,
    /// One-way delay in ms (RTT is twice this); absent means `default_delay_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<f64>,
    /// Each frame's delay varies uniformly by up to this many ms (order kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter_ms: Option<f64>,
    /// Fraction of frames lost on purpose, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
}

/// A whole topology.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    pub name: String,
    /// Host that runs `edgeshift-coordinator`, if any.
    pub coordinator: Option<String>,
    /// Rate of every pair not listed in `link`; absent means unlimited.
    pub default_rate_mbit: Option<u32>,
    /// One-way delay (ms) of every link that names none; absent means 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_delay_ms: Option<f64>,
    #[serde(rename = "host")]
    pub hosts: Vec<HostSpec>,
    #[serde(rename = "link", default)]
    pub links: Vec<LinkRate>,
}

/// The built-in topology of the demo and the scenarios (perf/topologies/edge3.toml).
pub const EDGE3: &str = include_str!("../topologies/edge3.toml");

impl Topology {
    /// Parses and validates a topology.
    pub fn from_toml(text: &str) -> Result<Self, TopologyError> {
        let t: Topology = toml::from_str(text)?;
        t.validate()?;
        Ok(t)
    }

    /// Reads a topology file.
    pub fn load(path: &Path) -> Result<Self, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// The built-in three-edge topology.
    pub fn edge3() -> Self {
        // The embedded file is checked by a unit test, so this cannot fail at run time.
        Self::from_toml(EDGE3).unwrap_or_else(|e| panic!("built-in topology edge3.toml: {e}"))
    }

    fn validate(&self) -> Result<(), TopologyError> {
        let bad = |m: String| Err(TopologyError::Invalid(m));
        let mut names = BTreeSet::new();
        for h in &self.hosts {
            if !names.insert(h.name.as_str()) {
                return bad(format!("host {:?} listed twice", h.name));
            }
        }
        if self.hosts.len() < 2 {
            return bad("at least two hosts are needed".into());
        }
        if self.default_rate_mbit == Some(0) {
            return bad("default_rate_mbit must be at least 1".into());
        }
        if !self
            .default_delay_ms
            .is_none_or(|v| (0.0..=10_000.0).contains(&v))
        {
            return bad("default_delay_ms must be within 0..=10000".into());
        }
        let mut pairs = BTreeSet::new();
        for l in &self.links {
            for end in [&l.a, &l.b] {
                if !names.contains(end.as_str()) {
                    return bad(format!("link names unknown host {end:?}"));
                }
            }
            if l.a == l.b {
                return bad(format!("link from {:?} to itself", l.a));
            }
            if l.rate_mbit == Some(0) {
                return bad(format!("link {}-{} has rate 0", l.a, l.b));
            }
            let ms_ok = |v: Option<f64>| v.is_none_or(|v| (0.0..=10_000.0).contains(&v));
            if !ms_ok(l.delay_ms) || !ms_ok(l.jitter_ms) {
                return bad(format!(
                    "link {}-{}: delay_ms and jitter_ms must be within 0..=10000",
                    l.a, l.b
                ));
            }
            if l.jitter_ms.unwrap_or(0.0) > l.delay_ms.or(self.default_delay_ms).unwrap_or(0.0) {
                return bad(format!("link {}-{}: jitter_ms larger than the delay", l.a, l.b));
            }
            if !l.loss.is_none_or(|p| (0.0..=1.0).contains(&p)) {
                return bad(format!(
                    "link {}-{}: loss must be a fraction within 0..=1",
                    l.a, l.b
                ));
            }
            let key = if l.a < l.b { (&l.a, &l.b) } else { (&l.b, &l.a) };
            if !pairs.insert(key) {
                return bad(format!("link {}-{} listed twice", l.a, l.b));
            }
        }
        if let Some(c) = &self.coordinator {
            if !names.contains(c.as_str()) {
                return bad(format!("coordinator host {c:?} is not a host"));
            }
        }
        Ok(())
    }

    fn find(&self, a: &str, b: &str) -> Option<&LinkRate> {
        self.links
            .iter()
            .find(|l| (l.a == a && l.b == b) || (l.a == b && l.b == a))
    }

    /// The rate between `a` and `b`.
    pub fn rate(&self, a: &str, b: &str) -> Option<u32> {
        self.find(a, b).map_or(self.default_rate_mbit, |l| l.rate_mbit)
    }

    /// Everything about the link between `a` and `b`, as the testbed takes it.
    pub fn link_spec(&self, a: &str, b: &str) -> LinkSpec {
        let link = self.find(a, b);
        let us = |ms: Option<f64>| (ms.unwrap_or(0.0) * 1000.0).round() as u32;
        LinkSpec {
            rate_mbit: self.rate(a, b),
            delay_us: us(link.and_then(|l| l.delay_ms).or(self.default_delay_ms)),
            jitter_us: us(link.and_then(|l| l.jitter_ms)),
            loss_ppm: (link.and_then(|l| l.loss).unwrap_or(0.0) * 1e6).round() as u32,
        }
    }

    /// Sets the rate of every edge-to-edge pair (the scenarios' variable);
    /// their delay, jitter and loss are kept.
    pub fn set_edge_rate(&mut self, mbit: Option<u32>) {
        self.set_edge_links(|l| l.rate_mbit = mbit);
    }

    /// Sets the round-trip time of every edge-to-edge pair (one-way delay
    /// `rtt_ms / 2` each way); their rate, jitter and loss are kept.
    pub fn set_edge_rtt_ms(&mut self, rtt_ms: f64) {
        self.set_edge_links(|l| l.delay_ms = Some(rtt_ms / 2.0));
    }

    fn set_edge_links(&mut self, change: impl Fn(&mut LinkRate)) {
        let edges: Vec<String> = self.hosts_with(Role::Edge);
        for (i, a) in edges.iter().enumerate() {
            for b in &edges[i + 1..] {
                if self.find(a, b).is_none() {
                    let spec = self.link_spec(a, b);
                    self.links.push(LinkRate {
                        a: a.clone(),
                        b: b.clone(),
                        rate_mbit: spec.rate_mbit,
                        delay_ms: self.default_delay_ms,
                        jitter_ms: None,
                        loss: None,
                    });
                }
            }
        }
        for l in &mut self.links {
            if edges.contains(&l.a) && edges.contains(&l.b) {
                change(l);
            }
        }
    }

    /// Names of hosts with `role`, in file order.
    pub fn hosts_with(&self, role: Role) -> Vec<String> {
        self.hosts
            .iter()
            .filter(|h| h.role == role)
            .map(|h| h.name.clone())
            .collect()
    }

    /// Builds the testbed: one namespace per host, a rate-limited veth per
    /// pair, and the bpffs its VMs' boot logs need.
    pub fn build(&self, tag: &str) -> Result<Testbed, TopologyError> {
        let mut tb = Testbed::new(tag)?;
        crate::boot_logs::ensure_bpffs();
        for h in &self.hosts {
            tb.add_host(&h.name)?;
        }
        for (i, a) in self.hosts.iter().enumerate() {
            for b in &self.hosts[i + 1..] {
                tb.link(&a.name, &b.name, self.link_spec(&a.name, &b.name))?;
            }
        }
        Ok(tb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_topology_parses() {
        let t = Topology::edge3();
        assert_eq!(t.hosts_with(Role::Edge), vec!["e1", "e2", "e3"]);
        assert_eq!(t.rate("e1", "origin"), Some(50));
        assert_eq!(t.rate("e1", "e2"), Some(100));
    }

    #[test]
    fn edge_rate_override_keeps_origin_links() {
        let mut t = Topology::edge3();
        t.set_edge_rate(Some(10));
        assert_eq!(t.rate("e2", "e3"), Some(10));
        assert_eq!(t.rate("e3", "e1"), Some(10));
        assert_eq!(t.rate("origin", "e2"), Some(50));
    }

    #[test]
    fn delays_come_from_the_link_or_the_default() {
        let text = "name='t'\ndefault_delay_ms=5\n[[host]]\nname='a'\nrole='edge'\n[[host]]\nname='b'\nrole='edge'\n\
                    [[host]]\nname='o'\nrole='origin'\n\
                    [[link]]\na='a'\nb='o'\nrate_mbit=10\ndelay_ms=30\njitter_ms=2\nloss=0.01\n";
        let mut t = Topology::from_toml(text).expect("parses");
        assert_eq!(
            t.link_spec("o", "a"),
            LinkSpec {
                rate_mbit: Some(10),
                delay_us: 30_000,
                jitter_us: 2_000,
                loss_ppm: 10_000
            }
        );
        assert_eq!(t.link_spec("a", "b").delay_us, 5_000);
        t.set_edge_rtt_ms(60.0);
        t.set_edge_rate(Some(50));
        assert_eq!(t.link_spec("a", "b"), LinkSpec::mbit(50).delay_ms(30.0));
        assert_eq!(t.link_spec("a", "o").delay_us, 30_000, "origin links keep theirs");
        for extra in ["delay_ms=-1\n", "loss=1.5\n", "jitter_ms=40\n"] {
            let text = format!("{text}[[link]]\na='a'\nb='b'\n{extra}");
            assert!(Topology::from_toml(&text).is_err(), "accepted:\n{text}");
        }
    }

    #[test]
    fn bad_topologies_are_rejected() {
        let base = "name='t'\n[[host]]\nname='a'\nrole='edge'\n[[host]]\nname='b'\nrole='edge'\n";
        assert!(Topology::from_toml(base).is_ok());
        for extra in [
            "[[link]]\na='a'\nb='zz'\nrate_mbit=1\n",
            "[[link]]\na='a'\nb='a'\nrate_mbit=1\n",
            "[[link]]\na='a'\nb='b'\nrate_mbit=0\n",
            "[[link]]\na='a'\nb='b'\n[[link]]\na='b'\nb='a'\n",
            "[[host]]\nname='a'\nrole='edge'\n",
            "[[host]]\nname='c'\nrole='moon'\n",
        ] {
            let text = format!("{base}{extra}");
            assert!(Topology::from_toml(&text).is_err(), "accepted:\n{text}");
        }
        assert!(Topology::from_toml(
            "name='t'\ncoordinator='x'\n[[host]]\nname='a'\nrole='edge'\n[[host]]\nname='b'\nrole='edge'\n"
        )
        .is_err());
        assert!(Topology::from_toml(
            "name='t'\nbogus=1\n[[host]]\nname='a'\nrole='edge'\n[[host]]\nname='b'\nrole='edge'\n"
        )
        .is_err());
        assert!(Topology::from_toml("not toml [").is_err());
    }
}
