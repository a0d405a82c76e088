//! The [`Testbed`]: hosts as network namespaces, the links and segments
//! between them (see `link` and `segment`), commands run inside a host, and
//! teardown on drop.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Command;

use crate::cmd::run;
use crate::delay::DelayLine;
use crate::link::Link;
use crate::netns::{check_name, destroy_netns, list_netns, tag_namespaces, NETNS_ADD_LOCK, NETNS_PREFIX};
use crate::segment::L2Segment;
use crate::TestbedError;

/// A host of the testbed: one network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostHandle {
    /// The name given to [`Testbed::add_host`].
    pub name: String,
    /// The namespace's name (`es-{tag}-{name}`), for `ip netns exec`.
    pub netns: String,
}

/// An emulated network of namespaces; everything is torn down on drop.
#[derive(Debug)]
pub struct Testbed {
    pub(crate) tag: String,
    pub(crate) hosts: BTreeMap<String, HostHandle>,
    pub(crate) links: Vec<Link>,
    pub(crate) segments: BTreeMap<String, L2Segment>,
    /// Host addresses routed over the direct links (see [`Testbed::route_host_addrs`]).
    pub(crate) host_addrs: BTreeMap<String, Ipv4Addr>,
    /// Every namespace created, hosts and segment hubs, in creation order.
    pub(crate) namespaces: Vec<String>,
    /// The delay lines of links with a delay (see `delay`).
    pub(crate) delay_lines: Vec<DelayLine>,
    pub(crate) torn_down: bool,
}

impl Testbed {
    /// An empty testbed whose namespaces are named `es-{tag}-*`. Fails with
    /// [`TestbedError::TagInUse`] if namespaces of that tag exist already.
    pub fn new(tag: &str) -> Result<Self, TestbedError> {
        check_name("tag", tag)?;
        if !tag_namespaces(tag, &list_netns()?).is_empty() {
            return Err(TestbedError::TagInUse(tag.to_string()));
        }
        Ok(Self {
            tag: tag.to_string(),
            hosts: BTreeMap::new(),
            links: Vec::new(),
            segments: BTreeMap::new(),
            host_addrs: BTreeMap::new(),
            namespaces: Vec::new(),
            delay_lines: Vec::new(),
            torn_down: false,
        })
    }

    /// The tag this testbed was created with.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    fn netns_name(&self, name: &str) -> String {
        format!("{NETNS_PREFIX}{}-{name}", self.tag)
    }

    pub(crate) fn create_netns(&mut self, name: &str) -> Result<String, TestbedError> {
        let netns = self.netns_name(name);
        {
            let _guard = NETNS_ADD_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            run(Command::new("ip").args(["netns", "add", &netns]))?;
        }
        self.namespaces.push(netns.clone());
        run(Command::new("ip").args(["-n", &netns, "link", "set", "lo", "up"]))?;
        Ok(netns)
    }

    /// Adds a host: a new namespace with loopback up.
    pub fn add_host(&mut self, name: &str) -> Result<HostHandle, TestbedError> {
        check_name("host", name)?;
        // Segment hubs and delay lines have namespaces of the same shape.
        if self.hosts.contains_key(name) || self.namespaces.contains(&self.netns_name(name)) {
            return Err(TestbedError::DuplicateHost(name.to_string()));
        }
        let netns = self.create_netns(name)?;
        let handle = HostHandle {
            name: name.to_string(),
            netns,
        };
        self.hosts.insert(name.to_string(), handle.clone());
        Ok(handle)
    }

    /// Gives every host one address (198.19.250.N/32 on its loopback) that
    /// every directly linked host routes over their link, for daemons that
    /// advertise one address to all peers (a coordinator's plan carries one
    /// address per agent, while link addresses are only reachable from the
    /// link's other end). Call after the links are made.
    pub fn route_host_addrs(&mut self) -> Result<(), TestbedError> {
        let mut addrs = BTreeMap::new();
        for (i, (name, h)) in self.hosts.iter().enumerate() {
            let last = u8::try_from(i + 1)
                .ok()
                .filter(|&o| o < 255)
                .ok_or(TestbedError::AddressesExhausted)?;
            let addr = Ipv4Addr::new(198, 19, 250, last);
            run(Command::new("ip").args([
                "-n",
                &h.netns,
                "addr",
                "add",
                &format!("{addr}/32"),
                "dev",
                "lo",
            ]))?;
            addrs.insert(name.clone(), addr);
        }
        for l in &self.links {
            for (from, to) in [(&l.a, &l.b), (&l.b, &l.a)] {
                let ns = &self.host(&from.host)?.netns;
                run(Command::new("ip").args([
                    "-n",
                    ns,
                    "route",
                    "add",
                    &format!("{}/32", addrs[&to.host]),
                    "via",
                    &to.addr.to_string(),
                    "dev",
                    &from.ifname,
                ]))?;
            }
        }
        self.host_addrs = addrs;
        Ok(())
    }

    /// `host`'s routed address (after [`Testbed::route_host_addrs`]).
    pub fn host_addr(&self, host: &str) -> Result<Ipv4Addr, TestbedError> {
        self.host_addrs
            .get(host)
            .copied()
            .ok_or_else(|| TestbedError::UnknownHost(host.to_string()))
    }

    /// The handle of host `name`.
    pub fn host(&self, name: &str) -> Result<&HostHandle, TestbedError> {
        self.hosts
            .get(name)
            .ok_or_else(|| TestbedError::UnknownHost(name.to_string()))
    }

    /// Names of all hosts.
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.hosts.keys().map(String::as_str)
    }

    /// A command that runs `program` inside `host`'s namespace (via
    /// `ip netns exec`, which execs, so the child's pid is the program's).
    /// Unknown hosts yield a command that fails to find the namespace.
    pub fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let netns = self.netns_name(host);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec"]).arg(netns).arg(program);
        cmd
    }

    /// Runs `program args..` in `host` to completion; stdout on success.
    pub fn run_in(&self, host: &str, program: &str, args: &[&str]) -> Result<String, TestbedError> {
        self.host(host)?;
        let mut cmd = self.command(host, program);
        cmd.args(args);
        run(&mut cmd)
    }

    /// Kills everything running in the testbed and deletes all its
    /// namespaces (and with them every veth, bridge and qdisc). Idempotent;
    /// also run on drop.
    pub fn teardown(&mut self) -> Result<(), TestbedError> {
        let mut first_err = None;
        // Segment hubs and hosts alike; reverse order is not required but tidy.
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = destroy_netns(ns) {
                tracing::warn!(netns = %ns, error = %e, "teardown");
                first_err.get_or_insert(e);
            }
        }
        self.reap_delay_lines();
        self.torn_down = true;
        self.namespaces.clear();
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if !self.torn_down {
            if let Err(e) = self.teardown() {
                eprintln!("testbed {}: teardown failed: {e}", self.tag);
            }
        }
    }
}
