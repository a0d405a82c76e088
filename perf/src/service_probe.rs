//! What a user of the VM feels during a handoff: a client in a testbed
//! host's namespace asks the guest's HTTP server (busybox httpd on port 80,
//! perf/images/guest/init) for a page every [`PERIOD`], one request at a
//! time on a fresh connection, and records when each started, how long it
//! took, and whether it failed. The thread enters the host's namespace with
//! setns(2), so requests are plain `std::net` calls.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Time between the starts of two requests (when the previous one was quick).
pub const PERIOD: Duration = Duration::from_millis(50);
/// A request that has not been answered by then failed.
const TIMEOUT: Duration = Duration::from_secs(5);

/// One request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Start, seconds after the probe's zero (the handoff's start).
    pub t: f64,
    /// Milliseconds until the whole answer was read; `None` if it failed.
    pub ms: Option<f64>,
}

/// A summary of the requests (the report's columns).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ServiceSummary {
    pub requests: usize,
    pub failed: usize,
    pub median_ms: f64,
    pub max_ms: f64,
    /// Longest time without a completed answer (from one answer's end to the next's).
    pub longest_gap_ms: f64,
}

/// A running probe; [`ServiceProbe::finish`] stops it.
pub struct ServiceProbe {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    thread: Option<JoinHandle<std::io::Result<Vec<Request>>>>,
}

/// Moves the calling thread into network namespace `netns` (`ip netns` name).
fn enter_netns(netns: &str) -> std::io::Result<()> {
    let file = std::fs::File::open(format!("/run/netns/{netns}"))?;
    // SAFETY: `file` is an open namespace file for the call's duration;
    // setns only changes this thread's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One GET on a fresh connection: Ok if a 200 answer was read to its end.
fn get(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    s.write_all(b"GET /index.html HTTP/1.0\r\nHost: vm\r\n\r\n")?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    if answer.starts_with(b"HTTP/1.0 200") || answer.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(std::io::Error::other("not a 200 answer"))
    }
}

impl ServiceProbe {
    /// Starts asking `addr` from namespace `netns`; times count from `zero`.
    pub fn start(netns: &str, addr: SocketAddr, zero: Instant) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let (s, a) = (Arc::clone(&stop), Arc::clone(&answered));
        let netns = netns.to_string();
        let thread = std::thread::spawn(move || {
            enter_netns(&netns)?;
            let mut out = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ms = get(addr).ok().map(|()| t.elapsed().as_secs_f64() * 1e3);
                if ms.is_some() {
                    a.fetch_add(1, Ordering::Relaxed);
                }
                out.push(Request {
                    t: t.saturating_duration_since(zero).as_secs_f64(),
                    ms,
                });
                if let Some(rest) = PERIOD.checked_sub(t.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
            Ok(out)
        });
        Self {
            stop,
            answered,
            thread: Some(thread),
        }
    }

    /// Waits until `n` requests have been answered (false after `limit`).
    pub fn wait_answers(&self, n: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.answered.load(Ordering::Relaxed) < n {
            if Instant::now() > deadline || self.thread.as_ref().is_none_or(JoinHandle::is_finished) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Stops after the request in flight; every request made.
    pub fn finish(mut self) -> std::io::Result<Vec<Request>> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(std::io::Error::other("service probe panicked")),
            None => Ok(Vec::new()),
        }
    }
}

impl Drop for ServiceProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs `body` while a probe in `netns` asks `addr`, from one second
/// before to one second after it; the requests' times count from `body`'s
/// start (so the ones before it are negative).
pub fn around<T>(netns: &str, addr: SocketAddr, body: impl FnOnce() -> T) -> (T, std::io::Result<Probed>) {
    let neighbours = || {
        std::process::Command::new("ip")
            .args(["-n", netns, "neigh", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let neighbours_before = neighbours();
    let warm_zero = Instant::now();
    let warmup = ServiceProbe::start(netns, addr, warm_zero);
    let reachable = warmup.wait_answers(3, Duration::from_secs(20));
    let warmup = warmup.finish().unwrap_or_default();
    if !reachable {
        tracing::warn!(%addr, "the VM's HTTP server did not answer before the handoff");
    }
    let neighbours_after = neighbours();
    let zero = Instant::now();
    let probe = ServiceProbe::start(netns, addr, zero);
    std::thread::sleep(Duration::from_secs(1));
    let offset = zero.elapsed().as_secs_f64();
    let value = body();
    std::thread::sleep(Duration::from_secs(1));
    let warm_offset = zero.duration_since(warm_zero).as_secs_f64() + offset;
    let probed = probe.finish().map(|rs| Probed {
        requests: rs.into_iter().map(|r| Request { t: r.t - offset, ..r }).collect(),
        warmup: warmup
            .into_iter()
            .map(|r| Request {
                t: r.t - warm_offset,
                ..r
            })
            .collect(),
        neighbours: vec![neighbours_before, neighbours_after],
    });
    (value, probed)
}

/// What [`around`] saw: the measured requests, the unrecorded warm-up's
/// (times on the same clock), and the client's neighbour table before and
/// after the warm-up (to tell a stale entry from a silent VM).
#[derive(Debug, Clone, Default)]
pub struct Probed {
    pub requests: Vec<Request>,
    pub warmup: Vec<Request>,
    pub neighbours: Vec<String>,
}

/// What a run's `detail.service` holds: the summary and every request as
/// `[t, ms or null]`, or the probe's error.
pub fn detail(probed: &std::io::Result<Probed>) -> serde_json::Value {
    let pairs = |rs: &[Request]| {
        rs.iter()
            .map(|r| {
                serde_json::json!([
                    (r.t * 1e3).round() / 1e3,
                    r.ms.map(|m| (m * 100.0).round() / 100.0)
                ])
            })
            .collect::<Vec<_>>()
    };
    match probed {
        Ok(p) => serde_json::json!({
            "summary": summarize(&p.requests),
            "requests": pairs(&p.requests),
            "warmup": pairs(&p.warmup),
            "neighbours": p.neighbours,
        }),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    }
}

/// The requests stored by [`detail`], back.
pub fn requests_of(detail: &serde_json::Value) -> Vec<Request> {
    detail["requests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            Some(Request {
                t: r[0].as_f64()?,
                ms: r[1].as_f64(),
            })
        })
        .collect()
}

/// The summary of `requests` (in start order).
pub fn summarize(requests: &[Request]) -> ServiceSummary {
    let mut ok: Vec<f64> = requests.iter().filter_map(|r| r.ms).collect();
    ok.sort_by(f64::total_cmp);
    let ends: Vec<f64> = requests
        .iter()
        .filter_map(|r| r.ms.map(|ms| r.t * 1e3 + ms))
        .collect();
    let longest_gap_ms = ends.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    ServiceSummary {
        requests: requests.len(),
        failed: requests.iter().filter(|r| r.ms.is_none()).count(),
        median_ms: ok.get(ok.len() / 2).copied().unwrap_or(0.0),
        max_ms: ok.last().copied().unwrap_or(0.0),
        longest_gap_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_finds_the_gap_and_the_failures() {
        let req = |t: f64, ms: Option<f64>| Request { t, ms };
        let rs = [
            req(0.0, Some(2.0)),
            req(0.05, Some(3.0)),
            req(0.10, None),
            req(5.10, Some(1200.0)),
            req(6.35, Some(2.0)),
        ];
        let s = summarize(&rs);
        assert_eq!((s.requests, s.failed), (5, 1));
        assert_eq!(s.max_ms, 1200.0);
        assert_eq!(s.median_ms, 3.0);
        // From the second answer's end (53 ms) to the fourth's (6300 ms).
        assert!((s.longest_gap_ms - 6247.0).abs() < 1e-6, "{s:?}");
    }
}
