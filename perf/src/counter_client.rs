//! A client of the test VM's counter stream (TCP 7000: one line every
//! ~100 ms), run in a testbed host's namespace: the longest silence it saw
//! across a handoff is what a user of the VM feels of the pause.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use edgeshift_testbed::Testbed;

/// The counter stream's client; stopped on drop.
pub struct CounterClient {
    child: Child,
    /// Arrival of every line, and whether the stream ended.
    seen: Arc<Mutex<(Vec<Instant>, bool)>>,
    reader: Option<JoinHandle<()>>,
}

impl CounterClient {
    /// Connects from `host` to the VM at `vm_ip`.
    pub fn start(tb: &Testbed, host: &str, vm_ip: &str) -> std::io::Result<Self> {
        let mut child = tb
            .command(host, "socat")
            .args(["-u", &format!("TCP:{vm_ip}:7000,connect-timeout=10"), "-"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("socat without stdout"))?;
        let seen = Arc::new(Mutex::new((Vec::new(), false)));
        let s = Arc::clone(&seen);
        let reader = std::thread::spawn(move || {
            for _ in BufReader::new(out).lines().map_while(Result::ok) {
                s.lock().unwrap_or_else(|p| p.into_inner()).0.push(Instant::now());
            }
            s.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        });
        Ok(CounterClient {
            child,
            seen,
            reader: Some(reader),
        })
    }

    /// Waits until `n` lines came (false after `timeout`).
    pub fn wait_lines(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.seen.lock().unwrap_or_else(|p| p.into_inner()).0.len() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// The longest silence since `since` (between two lines, or from the
    /// last line until now, so a stream that stopped answering counts),
    /// and whether the stream is still open.
    pub fn longest_gap_since(&self, since: Instant) -> (Duration, bool) {
        let gap = self
            .silences(since)
            .into_iter()
            .map(|(_, len)| len)
            .max()
            .unwrap_or_default();
        let s = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        (gap, !s.1)
    }

    /// Every silence ending after `since`: (its start, its length); the
    /// last one runs until now.
    fn silences(&self, since: Instant) -> Vec<(Instant, Duration)> {
        let s = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let mut out: Vec<(Instant, Duration)> =
            s.0.windows(2)
                .filter(|w| w[1] >= since)
                .map(|w| (w[0], w[1].duration_since(w[0])))
                .collect();
        let last = s.0.last().copied().unwrap_or(since).max(since);
        out.push((last, now.duration_since(last)));
        out
    }

    /// Every silence longer than `min` ending after `since` (the last one
    /// running until now): its start (seconds after `since`, negative if
    /// before) and its length in ms, to place the gaps on a migration's
    /// timeline.
    pub fn gaps_since(&self, since: Instant, min: Duration) -> Vec<(f64, u64)> {
        self.silences(since)
            .into_iter()
            .filter(|(_, len)| *len > min)
            .map(|(start, len)| {
                let at = if start >= since {
                    start.duration_since(since).as_secs_f64()
                } else {
                    -since.duration_since(start).as_secs_f64()
                };
                (at, len.as_millis() as u64)
            })
            .collect()
    }
}

impl Drop for CounterClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}
