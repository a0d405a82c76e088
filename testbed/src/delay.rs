//! A link with a delay: the two hosts' veths end in a middle namespace
//! (`es-{tag}-dl_{n}`), where `edgeshift-delayline` forwards frames between
//! them after the link's one-way delay. The hosts keep their interface
//! names, addresses and tbf (rate first, then delay, as a bottleneck
//! followed by propagation); the middle namespace has no addresses and its
//! own stack drops everything it is handed.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cmd::run;
use crate::delayline::Counters;
use crate::{LinkSpec, Testbed, TestbedError};

/// A running delay line, owned by its [`Testbed`].
#[derive(Debug)]
pub(crate) struct DelayLine {
    /// Host whose frames are counted as `a_to_b`.
    pub(crate) a: String,
    pub(crate) b: String,
    pub(crate) child: Child,
    pub(crate) stats: PathBuf,
    pub(crate) log: PathBuf,
}

/// A delay line's counters, seen from one host of the link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DelayStats {
    /// Frames from this host to its peer.
    pub outbound: Counters,
    /// Frames from the peer to this host.
    pub inbound: Counters,
    /// CPU seconds the delay line has used (both directions).
    pub cpu_seconds: f64,
}

/// How long a delay line may take to open its sockets.
const START_TIMEOUT: Duration = Duration::from_secs(10);

impl Testbed {
    /// Makes link `n` between `a` and `b` through a middle namespace with a
    /// delay line, leaving `a_if` in `a` and `b_if` in `b` (not yet up).
    pub(crate) fn delay_line(
        &mut self,
        n: u8,
        (a, ns_a, a_if): (&str, &str, &str),
        (b, ns_b, b_if): (&str, &str, &str),
        spec: LinkSpec,
    ) -> Result<(), TestbedError> {
        let bin = crate::bins::delayline().map_err(|e| TestbedError::DelayLine {
            link: format!("{a}-{b}"),
            reason: e.to_string(),
        })?;
        let mid_name = format!("dl_{n}");
        if self.hosts.contains_key(&mid_name) || self.segments.contains_key(&mid_name) {
            return Err(TestbedError::DuplicateHost(mid_name));
        }
        let mid = self.create_netns(&mid_name)?;
        let (mid_a, mid_b) = (format!("to-{a}"), format!("to-{b}"));
        for (ns, host_if, mid_if) in [(ns_a, a_if, &mid_a), (ns_b, b_if, &mid_b)] {
            run(Command::new("ip").args([
                "link", "add", host_if, "netns", ns, "type", "veth", "peer", "name", mid_if, "netns", &mid,
            ]))?;
            run(Command::new("ip").args(["-n", &mid, "link", "set", mid_if, "up"]))?;
            // The delay line's socket sees frames before tc's ingress hook:
            // dropping there spares the middle stack a copy of the traffic.
            let dropped = run(Command::new("tc").args(["-n", &mid, "qdisc", "add", "dev", mid_if, "clsact"]))
                .and_then(|_| {
                    run(Command::new("tc").args([
                        "-n", &mid, "filter", "add", "dev", mid_if, "ingress", "matchall", "action", "drop",
                    ]))
                });
            if let Err(e) = dropped {
                tracing::debug!(error = %e, "no ingress drop in the delay line's namespace");
            }
        }
        let base = std::env::temp_dir().join(format!("edgeshift-delay-{mid}"));
        let (stats, log) = (base.with_extension("json"), base.with_extension("log"));
        let _ = std::fs::remove_file(&stats);
        let log_file = std::fs::File::create(&log).map_err(|e| TestbedError::DelayLine {
            link: format!("{a}-{b}"),
            reason: format!("{}: {e}", log.display()),
        })?;
        let mut cmd = self.command(&mid_name, &bin);
        cmd.args(["--a", &mid_a, "--b", &mid_b])
            .args(["--delay-us", &spec.delay_us.to_string()])
            .args(["--jitter-us", &spec.jitter_us.to_string()])
            .args(["--loss-ppm", &spec.loss_ppm.to_string()])
            .arg("--stats")
            .arg(&stats)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = cmd.spawn().map_err(|source| TestbedError::Spawn {
            cmd: bin.display().to_string(),
            source,
        })?;
        self.delay_lines.push(DelayLine {
            a: a.into(),
            b: b.into(),
            child,
            stats: stats.clone(),
            log: log.clone(),
        });
        let started = Instant::now();
        while !stats.is_file() {
            let exited = self
                .delay_lines
                .last_mut()
                .and_then(|d| d.child.try_wait().ok().flatten());
            if let Some(status) = exited {
                return Err(delay_line_failed(a, b, &log, &format!("exited ({status})")));
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(delay_line_failed(a, b, &log, "did not start"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// The counters of the delay line on the link between `host` and
    /// `peer`, as of its last report (at most 100 ms old).
    pub fn delay_stats(&self, host: &str, peer: &str) -> Result<DelayStats, TestbedError> {
        let line = self
            .delay_lines
            .iter()
            .find(|d| (d.a == host && d.b == peer) || (d.a == peer && d.b == host))
            .ok_or_else(|| TestbedError::NoLink(host.into(), peer.into()))?;
        let bad = |reason: String| TestbedError::DelayLine {
            link: format!("{host}-{peer}"),
            reason,
        };
        let text = std::fs::read_to_string(&line.stats)
            .map_err(|e| bad(format!("{}: {e}", line.stats.display())))?;
        let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("stats: {e}")))?;
        let (a_to_b, b_to_a) = (counters(&doc["a_to_b"]), counters(&doc["b_to_a"]));
        let (outbound, inbound) = if line.a == host {
            (a_to_b, b_to_a)
        } else {
            (b_to_a, a_to_b)
        };
        Ok(DelayStats {
            outbound,
            inbound,
            cpu_seconds: doc["cpu_seconds"].as_f64().unwrap_or(0.0),
        })
    }

    /// Reaps the delay lines (their namespaces' teardown killed them) and
    /// removes their files.
    pub(crate) fn reap_delay_lines(&mut self) {
        for mut d in self.delay_lines.drain(..) {
            let _ = d.child.kill();
            let _ = d.child.wait();
            let _ = std::fs::remove_file(&d.stats);
            let _ = std::fs::remove_file(&d.log);
        }
    }
}

fn counters(v: &serde_json::Value) -> Counters {
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    Counters {
        received: n("received"),
        sent: n("sent"),
        sent_bytes: n("sent_bytes"),
        dropped_loss: n("dropped_loss"),
        dropped_full: n("dropped_full"),
        send_errors: n("send_errors"),
        dropped_rx: n("dropped_rx"),
        peak_bytes: n("peak_bytes"),
    }
}

fn delay_line_failed(a: &str, b: &str, log: &std::path::Path, what: &str) -> TestbedError {
    let said = std::fs::read_to_string(log).unwrap_or_default();
    TestbedError::DelayLine {
        link: format!("{a}-{b}"),
        reason: format!("{what}: {}", said.trim()),
    }
}
