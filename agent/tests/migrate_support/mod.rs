//! Shared harness of the VM and migration tests: the test VM (built by
//! perf/images/build-test-vm.sh, cached under target/images/vm/), edges as
//! hosts of a testbed (edgeshift-testbed) on one WAN segment through a hub
//! with tbf-limited legs, one L2 segment for the VMs' NICs across all edges
//! with a client host on it, and each edge's one daemon (`edgeshift agent`,
//! chunks and migrations) as a real process. Everything is named with a
//! per-test tag and removed on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use edgeshift_testbed::caps::missing_for_vms as require_capabilities;
pub use edgeshift_testbed::images::TestVm;
use edgeshift_testbed::{daemon, LinkSpec, Testbed};

pub const BIN: &str = env!("CARGO_BIN_EXE_edgeshift");
/// The VM's address: the first guest address of the VM segment (checked
/// against the testbed's address plan in [`Cloud::new`]).
pub const VM_IP: &str = "198.19.2.100";
/// The WAN hub's address, for services every edge reaches (a coordinator).
pub const HUB_IP: &str = "198.19.1.254";
/// The agents' `--listen` (chunks) and `--migrate-listen` ports.
pub const CHUNK_PORT: u16 = 7070;
pub const MIGRATE_PORT: u16 = 7080;
/// The WAN segment (first, so 198.19.1.0/24) and the VMs' segment, whose
/// bridge at every edge is the `--net` of `vm run` (198.19.2.0/24).
const WAN: &str = "wan";
const VM_NET: &str = "br0";
const CLIENT: &str = "client";

pub fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Builds (or reuses) the test VM; one build at a time across test binaries.
pub fn test_vm() -> TestVm {
    TestVm::ensure().unwrap_or_else(|e| panic!("the test VM: {e}"))
}

/// A store holding the base image, sliced once and cached; returns (store, id).
pub fn base_store(vm: &TestVm) -> (PathBuf, String) {
    let store = vm.dir.join("store-256k");
    let id_file = vm.dir.join("store-256k.id");
    let lock = vm.dir.join("store.lock");
    let script = format!(
        "set -e; if [ ! -s '{id}' ]; then rm -rf '{st}'; '{bin}' slice '{base}' --store '{st}' --chunk-size 256KiB | tail -n1 > '{id}.tmp'; mv '{id}.tmp' '{id}'; fi",
        id = id_file.display(),
        st = store.display(),
        bin = BIN,
        base = vm.base.display()
    );
    sh(Command::new("flock").arg(&lock).args(["sh", "-c", &script]));
    let id = std::fs::read_to_string(&id_file)
        .expect("read base id")
        .trim()
        .to_string();
    assert_eq!(id.len(), 64, "bad base id {id:?}");
    (store, id)
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A per-test tag short enough for interface names.
pub fn tag() -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("m{:x}{}", std::process::id() % 0xfffff, n)
}

/// One edge: a namespace with a WAN address, a VM bridge, a store, a state
/// dir, and its daemon.
pub struct Edge {
    pub name: String,
    pub ns: String,
    pub wan_ip: String,
    pub store: PathBuf,
    pub state: PathBuf,
    pub agent: Option<Child>,
}

impl Edge {
    pub fn chunk_addr(&self) -> String {
        format!("{}:{CHUNK_PORT}", self.wan_ip)
    }
    pub fn migrate_addr(&self) -> String {
        format!("{}:{MIGRATE_PORT}", self.wan_ip)
    }
}

/// The whole emulated cloud of one test.
pub struct Cloud {
    pub tag: String,
    /// The WAN hub's namespace (answering at [`HUB_IP`]).
    pub hub: String,
    pub client_ns: String,
    pub edges: Vec<Edge>,
    /// The cluster key, used only when `insecure` is set.
    pub key: PathBuf,
    /// The test's throwaway cluster CA; every edge gets a certificate of it
    /// named after the edge (SANs: its name and WAN address).
    pub cluster: edgeshift_common::identity::ThrowawayCluster,
    /// Run agents and migrations with `--insecure-plaintext` (TLS is on
    /// unless a test sets this, e.g. to show what an eavesdropper sees).
    pub insecure: bool,
    pub vm: TestVm,
    pub base_id: String,
    /// Namespaces, links and segments; torn down before `dir` goes.
    pub tb: Testbed,
    pub dir: tempfile::TempDir,
}

impl Cloud {
    /// Edges `names` linked to a hub at `mbit` each way, one VM segment.
    pub fn new(names: &[&str], mbit: u32) -> Cloud {
        // The VMs' boot logs are pinned in a bpffs outside /sys, mounted
        // here in the host's mount namespace (`ip netns exec` replaces /sys).
        edgeshift_agent::dirty::boot_log::ensure_bpffs().expect("a bpffs for boot logs");
        let vm = test_vm();
        let (base_store, base_id) = base_store(&vm);
        let tag = tag();
        let dir = tempfile::Builder::new()
            .prefix("edgeshift-mig")
            .tempdir()
            .expect("temp dir");
        let key = dir.path().join("cluster.key");
        std::fs::write(&key, hex::encode(rand_key())).expect("key");
        let cluster =
            edgeshift_common::identity::ThrowawayCluster::new(&dir.path().join("tls")).expect("cluster CA");
        let (tb, hub) = build_net(&tag, names, mbit);
        let wan = tb.segment(WAN).expect("WAN segment");
        let edges = names
            .iter()
            .map(|name| {
                let store = dir.path().join(format!("store-{name}"));
                let state = dir.path().join(format!("state-{name}"));
                std::fs::create_dir_all(&state).expect("state dir");
                Edge {
                    name: name.to_string(),
                    ns: tb.host(name).expect("edge host").netns.clone(),
                    wan_ip: wan.members[*name].to_string(),
                    store,
                    state,
                    agent: None,
                }
            })
            .collect();
        let _ = base_store;
        Cloud {
            client_ns: tb.host(CLIENT).expect("client host").netns.clone(),
            hub,
            edges,
            tag,
            key,
            cluster,
            insecure: false,
            vm,
            base_id,
            tb,
            dir,
        }
    }

    pub fn in_ns(&self, ns: &str, prog: &str, args: &[&str]) -> String {
        sh(Command::new("ip").args(["netns", "exec", ns, prog]).args(args))
    }

    pub fn edge(&self, name: &str) -> &Edge {
        self.edges.iter().find(|e| e.name == name).expect("no such edge")
    }

    fn edge_mut(&mut self, name: &str) -> &mut Edge {
        self.edges
            .iter_mut()
            .find(|e| e.name == name)
            .expect("no such edge")
    }

    /// Gives `edge` a copy of the base image's chunks.
    pub fn seed_base(&self, edge: &str) {
        let (store, _) = base_store(&self.vm);
        let dst = &self.edge(edge).store;
        sh(Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(&store)
            .arg(dst));
    }

    /// The edgeshift command run inside `edge`'s namespace.
    pub fn cmd(&self, edge: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.edge(edge).ns, BIN]);
        c
    }

    /// Starts `edge`'s daemon: `edgeshift agent` serving chunks and
    /// receiving migrations, under the edge's name as its id.
    pub fn start_daemons(&mut self, edge: &str) {
        self.start_daemons_with(edge, &[]);
    }

    /// [`Self::start_daemons`] with extra arguments for the agent.
    pub fn start_daemons_with(&mut self, edge: &str, agent_args: &[&str]) {
        let (ns, ip, store, state) = {
            let e = self.edge(edge);
            (e.ns.clone(), e.wan_ip.clone(), e.store.clone(), e.state.clone())
        };
        let log = std::fs::File::create(self.dir.path().join(format!("{edge}-agent.log"))).expect("log file");
        let agent = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                BIN,
                "agent",
                "--listen",
                &format!("{ip}:{CHUNK_PORT}"),
                "--migrate-listen",
                &format!("{ip}:{MIGRATE_PORT}"),
                "--store",
            ])
            .arg(&store)
            .args(self.cred_args(edge))
            .arg("--state-dir")
            .arg(&state)
            .args(["--id", edge, "--no-zstd"])
            .args(agent_args)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start agent");
        let agent = wait_line(agent, "listening");
        self.edge_mut(edge).agent = Some(agent);
    }

    /// Kills `edge`'s agent (as a crash would): its chunk server and any
    /// migration it is receiving go with it.
    pub fn kill_agent(&mut self, edge: &str) {
        if let Some(mut c) = self.edge_mut(edge).agent.take() {
            kill_tree(&mut c);
        }
    }

    /// Stops `edge`'s agent with SIGTERM, as systemd does; returns its exit
    /// status (it is killed after 40 s).
    pub fn term_agent(&mut self, edge: &str) -> std::process::ExitStatus {
        let mut c = self.edge_mut(edge).agent.take().expect("the agent runs");
        let pid = libc::pid_t::try_from(c.id()).expect("pid");
        // SAFETY: kill(2) on our own child, not yet reaped; no memory involved.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        kill_tree(&mut c);
        panic!("the agent at {edge} did not stop within 40 s of SIGTERM");
    }

    /// `edgeshift vm run` of the test VM on `edge`.
    pub fn run_vm(&self, edge: &str, name: &str, image: &str) {
        self.run_vm_with(edge, name, image, "");
    }

    /// [`Self::run_vm`] with more kernel arguments (the workload's knobs,
    /// e.g. `es_hot_every=1 es_hot_blocks=16`).
    pub fn run_vm_with(&self, edge: &str, name: &str, image: &str, more_append: &str) {
        let e = self.edge(edge);
        let append = format!("console=ttyS0 quiet es_ip={VM_IP}/24 {more_append}");
        sh(self
            .cmd(edge)
            .args(["vm", "run", name, "--image", image, "--store"])
            .arg(&e.store)
            .arg("--state-dir")
            .arg(&e.state)
            .args([
                "--net", "br0", "--memory", "128MiB", "--accel", "auto", "--kernel",
            ])
            .arg(&self.vm.kernel)
            .arg("--initrd")
            .arg(&self.vm.initrd)
            .args(["--append", &append]));
    }

    /// `edgeshift vm list --json` on `edge`.
    pub fn list(&self, edge: &str) -> Vec<serde_json::Value> {
        let out = sh(self
            .cmd(edge)
            .args(["vm", "list", "--json", "--state-dir"])
            .arg(&self.edge(edge).state));
        serde_json::from_str(&out).expect("vm list --json parses")
    }

    /// `edgeshift migrate NAME` from `from` to `to`'s migration listener,
    /// with the cluster key and `from`'s state directory; not yet run.
    pub fn migrate_cmd(&self, name: &str, from: &str, to: &str) -> Command {
        let mut c = self.cmd(from);
        c.args([
            "migrate",
            name,
            "--to",
            &self.edge(to).migrate_addr(),
            "--source-addr",
            &self.edge(from).chunk_addr(),
        ])
        .args(self.cred_args(from))
        .arg("--state-dir")
        .arg(&self.edge(from).state);
        c
    }

    /// The flags that give `edge`'s agent or commands their credentials:
    /// its certificate of the test's cluster, or the cluster key when
    /// `insecure` is set.
    pub fn cred_args(&self, edge: &str) -> Vec<String> {
        if self.insecure {
            return vec![
                "--insecure-plaintext".into(),
                "--cluster-key-file".into(),
                self.key.display().to_string(),
            ];
        }
        let sans = vec![self.edge(edge).wan_ip.clone()];
        let f = self
            .cluster
            .files(edgeshift_common::identity::Role::Edge, edge, &sans)
            .expect("edge certificate");
        let path = |p: &std::path::Path| p.display().to_string();
        vec![
            "--tls-ca".into(),
            path(&f.ca),
            "--tls-cert".into(),
            path(&f.cert),
            "--tls-key".into(),
            path(&f.key),
        ]
    }

    /// Runs `edgeshift migrate` from `from` to `to` with extra args; returns
    /// (success, stdout, stderr).
    pub fn migrate(
        &self,
        name: &str,
        from: &str,
        to: &str,
        peers: &[&str],
        extra: &[&str],
    ) -> (bool, String, String) {
        let mut c = self.migrate_cmd(name, from, to);
        c.args(["--id", from, "--json"]);
        for p in peers {
            c.args(["--peer", &self.edge(p).chunk_addr()]);
        }
        c.args(extra);
        let out = c.output().expect("run migrate");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    /// One line from a TCP service of the VM, read from the client namespace.
    pub fn ask_vm(&self, port: u16, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.client_ns, "timeout", "60", "socat", "-u"])
                .arg(format!("TCP:{VM_IP}:{port},connect-timeout=2"))
                .arg("-")
                .output()
                .expect("run socat");
            let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !text.is_empty() {
                return Some(text);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        None
    }

    /// The VM's disk check (reads back every remembered write bypassing the cache).
    pub fn check_disk(&self) -> String {
        self.ask_vm(7001, Duration::from_secs(60))
            .expect("the VM's check service answers")
    }

    /// Opens a long-lived connection to the VM's counter stream from the client.
    pub fn counter_stream(&self) -> CounterStream {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let mut child = Command::new("ip")
                .args(["netns", "exec", &self.client_ns, "socat", "-u"])
                .arg(format!("TCP:{VM_IP}:7000,connect-timeout=2"))
                .arg("-")
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("start socat");
            let stdout = child.stdout.take().expect("socat stdout");
            let values = Arc::new(Mutex::new(Vec::new()));
            let closed = Arc::new(Mutex::new(None));
            let (v, c) = (values.clone(), closed.clone());
            std::thread::spawn(move || {
                let start = Instant::now();
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some(n) = line
                        .strip_prefix("counter ")
                        .and_then(|n| n.trim().parse::<u64>().ok())
                    {
                        if let Ok(mut v) = v.lock() {
                            v.push((start.elapsed(), n));
                        }
                    }
                }
                if let Ok(mut c) = c.lock() {
                    *c = Some(start.elapsed());
                }
            });
            std::thread::sleep(Duration::from_secs(1));
            let got = values.lock().map(|v| !v.is_empty()).unwrap_or(false);
            if got {
                return CounterStream {
                    child,
                    values,
                    closed,
                };
            }
            kill_tree(&mut child);
            assert!(
                Instant::now() < deadline,
                "the VM's counter service never answered"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// A client's open connection to the VM's counter stream.
pub struct CounterStream {
    child: Child,
    values: Arc<Mutex<Vec<(Duration, u64)>>>,
    closed: Arc<Mutex<Option<Duration>>>,
}

impl CounterStream {
    pub fn last(&self) -> Option<u64> {
        self.values.lock().ok().and_then(|v| v.last().map(|x| x.1))
    }
    pub fn is_open(&self) -> bool {
        self.closed.lock().map(|c| c.is_none()).unwrap_or(false)
    }
    /// Values seen, in order.
    pub fn values(&self) -> Vec<u64> {
        self.values
            .lock()
            .map(|v| v.iter().map(|x| x.1).collect())
            .unwrap_or_default()
    }
    /// Longest gap between two consecutive lines.
    pub fn longest_gap(&self) -> Duration {
        let v = self.values.lock().map(|v| v.clone()).unwrap_or_default();
        v.windows(2).map(|w| w[1].0 - w[0].0).max().unwrap_or_default()
    }
    /// Waits until the counter exceeds `n`.
    pub fn wait_above(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.last().is_some_and(|l| l > n) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

impl Drop for CounterStream {
    fn drop(&mut self) {
        kill_tree(&mut self.child);
    }
}

fn rand_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    let s = format!("{:?}{}", Instant::now(), std::process::id());
    k.copy_from_slice(blake3::hash(s.as_bytes()).as_bytes());
    k
}

/// Waits for a daemon's readiness line on stdout (stdout is drained after).
fn wait_line(mut child: Child, want: &str) -> Child {
    match daemon::wait_ready(&mut child, "daemon", want, Duration::from_secs(30)) {
        Ok(_) => child,
        Err(e) => {
            kill_tree(&mut child);
            panic!("daemon did not get ready: {e}");
        }
    }
}

/// Kills a process started through `ip netns exec` (which execs, so the pid
/// is the daemon's own).
pub fn kill_tree(c: &mut Child) {
    daemon::kill(c);
}

impl Drop for Cloud {
    fn drop(&mut self) {
        // VMs first (QEMU, taps, loop devices), then daemons, then namespaces.
        for e in &self.edges {
            if let Ok(out) = Command::new(BIN)
                .args(["vm", "list", "--json", "--state-dir"])
                .arg(&e.state)
                .output()
            {
                let vms: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
                for v in vms {
                    if let Some(name) = v["spec"]["name"].as_str() {
                        let _ = Command::new("ip")
                            .args(["netns", "exec", &e.ns, BIN, "vm", "stop", name, "--state-dir"])
                            .arg(&e.state)
                            .output();
                    }
                }
            }
        }
        for e in &mut self.edges {
            if let Some(mut c) = e.agent.take() {
                kill_tree(&mut c);
            }
        }
        // Any QEMU still in our namespaces (e.g. a half-made destination).
        for e in &self.edges {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &e.ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).output();
                }
            }
            for dir in std::fs::read_dir(&e.state).into_iter().flatten().flatten() {
                let img = dir.path().join("disk.raw");
                if let Ok(out) = Command::new("losetup").args(["-j"]).arg(&img).output() {
                    for line in String::from_utf8_lossy(&out.stdout).lines() {
                        if let Some(dev) = line.split(':').next() {
                            let _ = Command::new("losetup").args(["-d", dev]).output();
                        }
                    }
                }
            }
        }
        // The testbed (a field) then removes the namespaces with everything in them.
    }
}

/// The network of a cloud: edges `names` on one WAN segment through a hub,
/// each leg limited to `mbit` both ways, the hub answering at [`HUB_IP`];
/// the VM segment joining the edges' `br0` bridges and the client. Returns
/// the testbed and the hub's namespace.
fn build_net(tag: &str, names: &[&str], mbit: u32) -> (Testbed, String) {
    // A cloud left by a killed earlier run with this pid would block the tag.
    let _ = edgeshift_testbed::cleanup_stale(tag);
    let mut tb = Testbed::new(tag).expect("testbed");
    for name in names.iter().chain(&[CLIENT]) {
        tb.add_host(name).expect("host");
    }
    let wan = tb
        .l2_segment(WAN, names, LinkSpec::mbit(mbit))
        .expect("WAN segment");
    let hub = wan.netns.clone();
    assert_eq!(
        wan.guest_addr(154).map(|a| a.to_string()).as_deref(),
        Some(HUB_IP)
    );
    sh(Command::new("ip").args(["-n", &hub, "addr", "add", &format!("{HUB_IP}/24"), "dev", "br0"]));
    let vm_members: Vec<&str> = names.iter().chain(&[CLIENT]).copied().collect();
    let vm_net = tb
        .l2_segment(VM_NET, &vm_members, LinkSpec::default())
        .expect("VM segment");
    assert_eq!(
        vm_net.guest_addr(0).map(|a| a.to_string()).as_deref(),
        Some(VM_IP)
    );
    (tb, hub)
}
