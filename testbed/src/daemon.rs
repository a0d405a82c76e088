//! Daemons as child processes: waiting for the line a daemon prints on
//! stdout once it is ready, and killing it.

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Errors waiting for a daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The child's stdout was not piped.
    #[error("{0}: stdout is not piped")]
    NoStdout(String),
    /// No ready line within the timeout, or stdout closed first (it died).
    #[error("{what} did not print {want:?} within {timeout:?}")]
    NotReady {
        what: String,
        want: String,
        timeout: Duration,
    },
}

/// Waits until `child` prints a line containing `want` on stdout; returns
/// that line. Stdout keeps being drained afterwards, so the daemon never
/// blocks on (or dies of) a full or closed pipe.
pub fn wait_ready(
    child: &mut Child,
    what: &str,
    want: &str,
    timeout: Duration,
) -> Result<String, DaemonError> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| DaemonError::NoStdout(what.to_string()))?;
    let (tx, rx) = mpsc::channel();
    let needle = want.to_string();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !sent && line.contains(&needle) {
                let _ = tx.send(line);
                sent = true;
            }
        }
    });
    rx.recv_timeout(timeout).map_err(|_| DaemonError::NotReady {
        what: what.to_string(),
        want: want.to_string(),
        timeout,
    })
}

/// Kills and reaps `child` (a process started through `ip netns exec`,
/// which execs, is the daemon itself).
pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends SIGINT to `child` and reaps it, killing it if it has not exited
/// within `grace`.
pub fn interrupt(child: &mut Child, grace: Duration) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours;
        // `pid` is our own child, not yet reaped, so it names no other process.
        unsafe {
            libc::kill(pid, libc::SIGINT);
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    kill(child);
}
