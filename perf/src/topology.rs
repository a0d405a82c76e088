//! Topology descriptions (TOML in perf/topologies/): hosts with a role, the
//! rate of each link, and which host runs the cache coordinator. Every pair
//! of hosts is linked; pairs not listed get `default_rate_mbit`.

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

/// One link's rate (both directions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRate {
    pub a: String,
    pub b: String,
    /// Mbit/s; absent means unlimited.
    pub rate_mbit: Option<u32>,
}

/// A whole topology.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    pub name: String,
    /// Host that runs `edgeshift-coordinator`, if any.
    pub coordinator: Option<String>,
    /// Rate of every pair not listed in `link`; absent means unlimited.
    pub default_rate_mbit: Option<u32>,
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

    /// The rate between `a` and `b`.
    pub fn rate(&self, a: &str, b: &str) -> Option<u32> {
        self.links
            .iter()
            .find(|l| (l.a == a && l.b == b) || (l.a == b && l.b == a))
            .map_or(self.default_rate_mbit, |l| l.rate_mbit)
    }

    /// Sets the rate of every edge-to-edge pair (the scenarios' variable).
    pub fn set_edge_rate(&mut self, mbit: Option<u32>) {
        let edges: Vec<String> = self.hosts_with(Role::Edge);
        self.links
            .retain(|l| !(edges.contains(&l.a) && edges.contains(&l.b)));
        for (i, a) in edges.iter().enumerate() {
            for b in &edges[i + 1..] {
                self.links.push(LinkRate {
                    a: a.clone(),
                    b: b.clone(),
                    rate_mbit: mbit,
                });
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
                let spec = LinkSpec {
                    rate_mbit: self.rate(&a.name, &b.name),
                };
                tb.link(&a.name, &b.name, spec)?;
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
