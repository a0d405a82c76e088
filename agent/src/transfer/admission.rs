//! What an unauthenticated connection may hold (issue 21, finding 1): at
//! most [`MAX_PREAUTH`] handshakes at once and [`MAX_PREAUTH_PER_IP`] from
//! one address, so a flood of half-open connections from one place neither
//! uses up the descriptors nor keeps other peers out; accept errors (EMFILE)
//! back off instead of ending the server; pre-authentication failures are
//! logged at most once a second.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Handshakes in progress at once, from everyone (and at most a quarter of
/// the descriptor limit, [`Admission::for_this_process`]).
pub const MAX_PREAUTH: usize = 256;
/// Handshakes in progress at once from one address.
pub const MAX_PREAUTH_PER_IP: u32 = 8;
/// How long the accept loop pauses after an accept error (EMFILE: a
/// descriptor frees when a handshake times out or a peer leaves).
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Counts handshakes in progress, in total and per address.
#[derive(Debug)]
pub struct Admission {
    max_total: usize,
    inner: Mutex<(usize, HashMap<IpAddr, u32>)>,
}

impl Default for Admission {
    fn default() -> Self {
        Admission::with_max(MAX_PREAUTH)
    }
}

/// A handshake's place; given back when dropped.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Admission {
    pub fn with_max(max_total: usize) -> Self {
        Admission {
            max_total,
            inner: Mutex::new((0, HashMap::new())),
        }
    }

    /// Bounds for this process: [`MAX_PREAUTH`], or a quarter of the
    /// descriptor limit if that is lower, so that handshakes in progress
    /// never take the descriptors authenticated peers and the store need.
    pub fn for_this_process() -> Self {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct we own and nothing else.
        let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
        let quarter = if ok {
            usize::try_from(lim.rlim_cur / 4).unwrap_or(MAX_PREAUTH)
        } else {
            MAX_PREAUTH
        };
        Admission::with_max(MAX_PREAUTH.min(quarter.max(16)))
    }

    /// A place for a handshake from `ip`, or `None` when either bound is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Ticket> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_ip) = &mut *g;
        let here = per_ip.get(&ip).copied().unwrap_or(0);
        if *total >= self.max_total || here >= MAX_PREAUTH_PER_IP {
            return None;
        }
        *total += 1;
        per_ip.insert(ip, here + 1);
        Some(Ticket {
            admission: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut g = self.admission.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_ip) = &mut *g;
        *total = total.saturating_sub(1);
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// At most one log line a second for events an unauthenticated stranger
/// can cause at will; returns how many were suppressed before this one, or
/// `None` when this one is to be suppressed too.
#[derive(Debug, Default)]
pub struct RateLimitedLog {
    last_second: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimitedLog {
    pub const fn new() -> Self {
        RateLimitedLog {
            last_second: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    pub fn allow(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let last = self.last_second.load(Ordering::Relaxed);
        if now != last
            && self
                .last_second
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// A peer-supplied name made safe for one log field: control characters
/// (newlines forge log lines) become `?`, and it is cut at 64 characters.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_hold_per_address_and_in_total_and_free_on_drop() {
        let a = Arc::new(Admission::default());
        let ip: IpAddr = [10, 0, 0, 1].into();
        let held: Vec<Ticket> = (0..MAX_PREAUTH_PER_IP)
            .map(|_| a.admit(ip).expect("room"))
            .collect();
        assert!(a.admit(ip).is_none(), "per-address bound");
        assert!(
            a.admit([10, 0, 0, 2].into()).is_some(),
            "another address still gets in"
        );
        drop(held);
        assert!(a.admit(ip).is_some());
        let many: Vec<Ticket> = (0..MAX_PREAUTH as u32)
            .filter_map(|i| a.admit(IpAddr::from((0x0a00_0000 + i).to_be_bytes())))
            .collect();
        assert!(many.len() < MAX_PREAUTH + 1);
        assert!(a.admit([192, 168, 0, 1].into()).is_none(), "total bound");
    }

    #[test]
    fn names_lose_control_characters_and_length() {
        assert_eq!(sanitize("e1\nFAKE LOG LINE"), "e1?FAKE LOG LINE");
        assert_eq!(sanitize(&"x".repeat(100)).len(), 64);
    }

    #[test]
    fn a_flood_logs_once_a_second() {
        let l = RateLimitedLog::new();
        let allowed = (0..1000).filter(|_| l.allow().is_some()).count();
        assert!((1..=2).contains(&allowed), "{allowed}");
    }
}
