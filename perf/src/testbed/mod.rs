//! The emulated edge cloud: network namespaces as hosts, veth pairs with tbf
//! rate limits as WAN links, and bridges across namespaces as shared L2
//! segments (so QEMU taps at two edges sit on one Ethernet).
//!
//! Everything a [`Testbed`] creates lives inside namespaces named
//! `es-{tag}-{host}`: deleting those namespaces (after killing whatever runs in
//! them) removes every veth, bridge and qdisc too. [`Testbed`] does that on
//! drop, also while unwinding from a panic; [`cleanup_stale`] does it for a
//! tag whose owner died (kill -9, Ctrl-C without handler).
//!
//! Addresses come from 198.18.0.0/15 (RFC 2544's benchmarking range) only:
//! point-to-point links get 198.18.{link}.1/.2 /24, L2 segments
//! 198.19.{segment}.0/24. Namespaces isolate testbeds from one another, so two
//! testbeds may reuse the same addresses.
//!
//! Latency is not emulated (this kernel has no netem); bandwidth is.

mod cmd;
pub mod iperf;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

pub use cmd::run;

/// Prefix of every namespace a testbed creates.
pub const NETNS_PREFIX: &str = "es-";
/// Longest host or tag name: keeps `to-{host}` within IFNAMSIZ (15 chars).
pub const MAX_NAME_LEN: usize = 12;

/// Errors from building or tearing down a testbed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// A tag or host name with characters other than `[A-Za-z0-9_]`, empty or too long.
    #[error("invalid {what} name {name:?}: use 1-{MAX_NAME_LEN} chars of [A-Za-z0-9_]")]
    InvalidName { what: &'static str, name: String },
    /// Namespaces of this tag already exist (another run, or a crashed one).
    #[error("namespaces for tag {0:?} already exist (another run, or a stale one: call cleanup_stale)")]
    TagInUse(String),
    /// A host was named twice.
    #[error("host {0:?} already exists in this testbed")]
    DuplicateHost(String),
    /// A name not added with `add_host`.
    #[error("no host {0:?} in this testbed")]
    UnknownHost(String),
    /// `link(a, a, ..)`, or a second link between the same pair.
    #[error("cannot link {0:?} and {1:?}: {2}")]
    BadLink(String, String, &'static str),
    /// No link between these two hosts.
    #[error("no link between {0:?} and {1:?}")]
    NoLink(String, String),
    /// No L2 segment with this name.
    #[error("no L2 segment {0:?}")]
    UnknownSegment(String),
    /// More links or segments than the address plan has /24s for.
    #[error("address plan exhausted: at most 255 links and 255 segments per testbed")]
    AddressesExhausted,
    /// A rate of 0 Mbit/s.
    #[error("link rate must be at least 1 Mbit/s")]
    ZeroRate,
    /// A command (`ip`, `tc`, ...) could not start.
    #[error("cannot run {cmd}: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    /// A command exited non-zero.
    #[error("{cmd} failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    /// A command's output was not what we expected.
    #[error("unexpected output from {cmd}: {output:?}")]
    Parse { cmd: String, output: String },
}

/// Properties of an emulated link; applied to the egress of both ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkSpec {
    /// Rate limit in Mbit/s per direction (tbf); `None` is an unlimited veth.
    pub rate_mbit: Option<u32>,
}

impl LinkSpec {
    /// A link limited to `mbit` Mbit/s in each direction.
    pub fn mbit(mbit: u32) -> Self {
        Self {
            rate_mbit: Some(mbit),
        }
    }
}

/// A host of the testbed: one network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostHandle {
    /// The name given to [`Testbed::add_host`].
    pub name: String,
    /// The namespace's name (`es-{tag}-{name}`), for `ip netns exec`.
    pub netns: String,
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
struct Link {
    a: LinkEnd,
    b: LinkEnd,
    spec: LinkSpec,
}

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

/// Byte counters of one interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IfaceCounters {
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

/// Serialises `ip netns add`: concurrent first-time mounts of /run/netns race.
static NETNS_ADD_LOCK: Mutex<()> = Mutex::new(());

/// An emulated network of namespaces; everything is torn down on drop.
#[derive(Debug)]
pub struct Testbed {
    tag: String,
    hosts: BTreeMap<String, HostHandle>,
    links: Vec<Link>,
    segments: BTreeMap<String, L2Segment>,
    /// Host addresses routed over the direct links (see [`Testbed::route_host_addrs`]).
    host_addrs: BTreeMap<String, Ipv4Addr>,
    /// Every namespace created, hosts and segment hubs, in creation order.
    namespaces: Vec<String>,
    torn_down: bool,
}

fn check_name(what: &'static str, name: &str) -> Result<(), TestbedError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(TestbedError::InvalidName {
            what,
            name: name.to_string(),
        })
    }
}

/// Names of all existing namespaces.
pub fn list_netns() -> Result<Vec<String>, TestbedError> {
    let out = run(Command::new("ip").args(["netns", "list"]))?;
    // Lines look like "name" or "name (id: 3)".
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Namespaces that belong to `tag`: `es-{tag}-{name}` where name has no '-'
/// (names cannot contain one), so tag `a` never matches tag `a_b`'s or `a-b`'s.
fn tag_namespaces(tag: &str, all: &[String]) -> Vec<String> {
    let prefix = format!("{NETNS_PREFIX}{tag}-");
    all.iter()
        .filter(|ns| {
            ns.strip_prefix(&prefix)
                .is_some_and(|rest| !rest.is_empty() && !rest.contains('-'))
        })
        .cloned()
        .collect()
}

/// Kills every process in `netns` and deletes it; a namespace already gone is fine.
fn destroy_netns(netns: &str) -> Result<(), TestbedError> {
    // Processes keep a namespace (and its veths) alive after `ip netns del`.
    for _ in 0..50 {
        let pids = match run(Command::new("ip").args(["netns", "pids", netns])) {
            Ok(out) => out,
            Err(TestbedError::Command { .. }) => String::new(),
            Err(e) => return Err(e),
        };
        let pids: Vec<i32> = pids.split_whitespace().filter_map(|p| p.parse().ok()).collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: kill(2) takes plain integers and touches no memory of ours.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match run(Command::new("ip").args(["netns", "del", netns])) {
        Ok(_) => Ok(()),
        Err(TestbedError::Command { stderr, .. }) if stderr.contains("No such file") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes everything left behind by testbeds of `tag` (after kill -9 or an
/// abort); returns the namespaces it deleted.
pub fn cleanup_stale(tag: &str) -> Result<Vec<String>, TestbedError> {
    check_name("tag", tag)?;
    let stale = tag_namespaces(tag, &list_netns()?);
    for ns in &stale {
        tracing::info!(netns = %ns, "removing stale namespace");
        destroy_netns(ns)?;
    }
    Ok(stale)
}

impl Testbed {
    /// An empty testbed whose namespaces are named `es-{tag}-*`. Fails with
    /// [`TestbedError::TagInUse`] if namespaces of that tag exist already.
    pub fn new(tag: &str) -> Result<Self, TestbedError> {
        check_name("tag", tag)?;
        if !tag_namespaces(tag, &list_netns()?).is_empty() {
            return Err(TestbedError::TagInUse(tag.to_string()));
        }
        // VMs started in the namespaces pin their boot logs in a bpffs that
        // `ip netns exec` does not replace; it is mounted from here, the
        // host's mount namespace. Without it migrations slice the disk.
        if let Err(e) = edgeshift_agent::dirty::boot_log::ensure_bpffs() {
            tracing::warn!(error = %e, "no bpffs for boot logs");
        }
        Ok(Self {
            tag: tag.to_string(),
            hosts: BTreeMap::new(),
            links: Vec::new(),
            segments: BTreeMap::new(),
            host_addrs: BTreeMap::new(),
            namespaces: Vec::new(),
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

    fn create_netns(&mut self, name: &str) -> Result<String, TestbedError> {
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
        if self.hosts.contains_key(name) || self.segments.contains_key(name) {
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
        // Both ends are created straight inside their namespaces, so nothing
        // ever exists in the root namespace and names cannot collide there.
        run(Command::new("ip").args([
            "link", "add", &if_a, "netns", &ns_a, "type", "veth", "peer", "name", &if_b, "netns", &ns_b,
        ]))?;
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

    /// Changes the rate of an existing link (both directions).
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
            l.spec = spec;
        }
        Ok(())
    }

    /// Byte counters of `host`'s interface towards `peer`.
    pub fn link_counters(&self, host: &str, peer: &str) -> Result<IfaceCounters, TestbedError> {
        let end = self.link_end(host, peer)?;
        let ns = &self.host(host)?.netns;
        iface_counters(ns, &end.ifname)
    }

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
        run(Command::new("ip").args([
            "-n",
            &hub,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ]))?;
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
            run(Command::new("ip").args([
                "-n",
                &ns,
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

fn truncate(s: &str, max: usize) -> &str {
    // Names are ASCII (check_name), so byte slicing is on char boundaries.
    &s[..s.len().min(max)]
}

/// tbf on the egress of `ifname`: `mbit` Mbit/s, burst of ~10 ms (at least
/// 32 KiB so GSO-sized packets pass), queue up to 100 ms.
fn apply_tbf(netns: &str, ifname: &str, mbit: u32) -> Result<(), TestbedError> {
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

/// Byte counters of `ifname` inside `netns`, from `ip -s link`.
pub fn iface_counters(netns: &str, ifname: &str) -> Result<IfaceCounters, TestbedError> {
    // /sys/class/net shows the caller's namespace, so read it from inside.
    let read = |which: &str| -> Result<u64, TestbedError> {
        let path = format!("/sys/class/net/{ifname}/statistics/{which}");
        let out = run(Command::new("ip").args(["netns", "exec", netns, "cat", &path]))?;
        out.trim().parse().map_err(|_| TestbedError::Parse {
            cmd: format!("cat {path}"),
            output: out.clone(),
        })
    };
    Ok(IfaceCounters {
        rx_bytes: read("rx_bytes")?,
        tx_bytes: read("tx_bytes")?,
    })
}

/// Byte counters of every interface in `netns` (one `ip -s -j link` call).
pub fn all_counters(netns: &str) -> Result<BTreeMap<String, IfaceCounters>, TestbedError> {
    let cmd_line = format!("ip -n {netns} -s -j link");
    let out = run(Command::new("ip").args(["-n", netns, "-s", "-j", "link"]))?;
    let parsed: serde_json::Value = serde_json::from_str(&out).map_err(|_| TestbedError::Parse {
        cmd: cmd_line.clone(),
        output: out.clone(),
    })?;
    let mut map = BTreeMap::new();
    for link in parsed.as_array().into_iter().flatten() {
        let name = link["ifname"].as_str();
        let rx = link["stats64"]["rx"]["bytes"].as_u64();
        let tx = link["stats64"]["tx"]["bytes"].as_u64();
        if let (Some(name), Some(rx_bytes), Some(tx_bytes)) = (name, rx, tx) {
            map.insert(name.to_string(), IfaceCounters { rx_bytes, tx_bytes });
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("tag", "edge1").is_ok());
        assert!(check_name("tag", "a_b").is_ok());
        assert!(check_name("tag", "").is_err());
        assert!(check_name("tag", "a-b").is_err());
        assert!(check_name("tag", "a/b").is_err());
        assert!(check_name("tag", "abcdefghijklm").is_err());
    }

    #[test]
    fn tag_matching_is_exact() {
        let all: Vec<String> = ["es-a-x", "es-a_b-y", "es-ab-z", "es-a-", "other", "es-a-b-c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(tag_namespaces("a", &all), vec!["es-a-x".to_string()]);
        assert_eq!(tag_namespaces("a_b", &all), vec!["es-a_b-y".to_string()]);
        assert!(tag_namespaces("zz", &all).is_empty());
    }

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
