//! A user-space delay line between two interfaces (this kernel has no
//! netem): every frame one interface receives leaves by the other after a
//! one-way delay, with optional jitter and loss, through a bounded queue.
//!
//! Per direction one thread reads frames in batches (recvmmsg) and stamps
//! them with the monotonic clock, and one sends them in batches (sendmmsg)
//! when due. Frames keep their virtio-net header, so TCP's GSO frames cross
//! whole and the line costs per 64 KiB, not per 1500 bytes. The counters go
//! to a JSON file every 100 ms (written first once both sockets are open:
//! its appearance means "ready").

mod packet_socket;
pub mod queue;

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use packet_socket::{PacketSocket, MAX_FRAME};
pub use queue::{Counters, Rng, Shape, TimedQueue};

/// Frames per recvmmsg/sendmmsg.
const BATCH: usize = 64;
/// Socket receive buffer: a 1 Gbit/s burst of ~30 ms.
const RCVBUF: usize = 4 << 20;

/// What to run: two interfaces and the shape of each direction.
#[derive(Debug, Clone)]
pub struct Config {
    pub a: String,
    pub b: String,
    pub a_to_b: Shape,
    pub b_to_a: Shape,
    /// Where to keep the counters (JSON, rewritten every 100 ms).
    pub stats: Option<PathBuf>,
    pub seed: u64,
}

struct Direction {
    queue: Mutex<TimedQueue>,
    due_changed: Condvar,
}

impl Direction {
    fn lock(&self) -> MutexGuard<'_, TimedQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Puts the calling thread in SCHED_FIFO (low priority 10), so due frames
/// leave on time while compilers and VMs keep both cores busy; the threads
/// block between batches, and the kernel's RT throttle bounds the worst
/// case. Without the privilege the thread stays as it was (logged).
fn prefer_punctual_wakeups() {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: `param` is a live sched_param; pid 0 means the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        eprintln!(
            "edgeshift-delayline: SCHED_FIFO refused ({}); delays may stretch under load",
            io::Error::last_os_error()
        );
    }
}

fn receive(from: &PacketSocket, dir: &Direction) -> io::Result<()> {
    prefer_punctual_wakeups();
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; MAX_FRAME]).collect();
    let mut lens = Vec::with_capacity(BATCH);
    loop {
        from.recv_batch(&mut bufs, &mut lens)?;
        let now = Instant::now();
        let mut q = dir.lock();
        let front = q.next_due();
        for (buf, &len) in bufs.iter().zip(&lens) {
            if len == 0 {
                q.counters.dropped_rx += 1;
            } else {
                q.push(now, buf[..len].to_vec());
            }
        }
        if q.next_due() != front {
            dir.due_changed.notify_one();
        }
    }
}

fn transmit(dir: &Direction, to: &PacketSocket) -> io::Result<()> {
    prefer_punctual_wakeups();
    let mut out = Vec::with_capacity(BATCH);
    let mut q = dir.lock();
    loop {
        let now = Instant::now();
        match q.next_due() {
            None => q = dir.due_changed.wait(q).unwrap_or_else(|p| p.into_inner()),
            Some(due) if due > now => {
                q = dir
                    .due_changed
                    .wait_timeout(q, due - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            Some(_) => {
                q.pop_due(now, BATCH, &mut out);
                drop(q);
                let frames: Vec<&[u8]> = out.iter().map(Vec::as_slice).collect();
                let refused = to.send_batch(&frames)?;
                let bytes: u64 = out.iter().map(|f| f.len() as u64).sum();
                q = dir.lock();
                q.counters.sent += out.len() as u64 - refused;
                q.counters.sent_bytes += bytes;
                q.counters.send_errors += refused;
                out.clear();
            }
        }
    }
}

fn counters_json(c: &Counters) -> serde_json::Value {
    serde_json::json!({
        "received": c.received,
        "sent": c.sent,
        "sent_bytes": c.sent_bytes,
        "dropped_loss": c.dropped_loss,
        "dropped_full": c.dropped_full,
        "dropped_rx": c.dropped_rx,
        "send_errors": c.send_errors,
        "peak_bytes": c.peak_bytes,
    })
}

/// CPU seconds (user + system) this process has used.
fn cpu_seconds() -> f64 {
    // SAFETY: rusage is plain data; getrusage only writes the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a live, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

fn write_stats(
    path: &PathBuf,
    ab: &Direction,
    ba: &Direction,
    sa: &PacketSocket,
    sb: &PacketSocket,
) -> io::Result<()> {
    // The kernel's drop counters reset on reading: fold them into ours.
    let (drops_a, drops_b) = (sa.kernel_drops()?, sb.kernel_drops()?);
    let ab_c = {
        let mut q = ab.lock();
        q.counters.dropped_rx += drops_a;
        q.counters
    };
    let ba_c = {
        let mut q = ba.lock();
        q.counters.dropped_rx += drops_b;
        q.counters
    };
    let doc = serde_json::json!({
        "a_to_b": counters_json(&ab_c),
        "b_to_a": counters_json(&ba_c),
        "cpu_seconds": cpu_seconds(),
    });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, doc.to_string())?;
    std::fs::rename(&tmp, path)
}

/// Runs the delay line until a thread fails (it never stops on its own).
pub fn run(cfg: &Config) -> io::Result<()> {
    let sa = Arc::new(PacketSocket::open(&cfg.a, RCVBUF)?);
    let sb = Arc::new(PacketSocket::open(&cfg.b, RCVBUF)?);
    let new_dir = |shape: Shape, seed: u64| {
        Arc::new(Direction {
            queue: Mutex::new(TimedQueue::new(shape, Rng::new(seed))),
            due_changed: Condvar::new(),
        })
    };
    let ab = new_dir(cfg.a_to_b, cfg.seed);
    let ba = new_dir(cfg.b_to_a, cfg.seed.rotate_left(32) ^ 0x9E37_79B9);
    let mut threads: Vec<JoinHandle<io::Result<()>>> = Vec::new();
    for (from, dir, to) in [(&sa, &ab, &sb), (&sb, &ba, &sa)] {
        let (f, d) = (Arc::clone(from), Arc::clone(dir));
        threads.push(std::thread::spawn(move || receive(&f, &d)));
        let (d, t) = (Arc::clone(dir), Arc::clone(to));
        threads.push(std::thread::spawn(move || transmit(&d, &t)));
    }
    loop {
        if let Some(path) = &cfg.stats {
            write_stats(path, &ab, &ba, &sa, &sb)?;
        }
        if let Some(i) = threads.iter().position(JoinHandle::is_finished) {
            let t = threads.swap_remove(i);
            return match t.join() {
                Ok(Ok(())) => Err(io::Error::other("a delay-line thread stopped")),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(io::Error::other("a delay-line thread panicked")),
            };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
