//! The delay line's timed queue for one direction: each frame gets a due
//! time (arrival + delay ± jitter) and leaves in due order; a byte bound
//! drops at the tail; random loss drops before queueing. Pure data, no I/O.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What one direction does to frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// One-way delay added to every frame.
    pub delay: Duration,
    /// Each frame's delay is drawn uniformly from delay ± jitter.
    pub jitter: Duration,
    /// Whether jitter may reorder frames (otherwise a frame never leaves
    /// before the one ahead of it, as on a single path).
    pub reorder: bool,
    /// Probability of dropping a frame, in parts per million.
    pub loss_ppm: u32,
    /// Most bytes held at once; a frame that would exceed it is dropped.
    pub limit_bytes: usize,
}

/// Counters of one direction (monotonic).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub received: u64,
    pub sent: u64,
    pub sent_bytes: u64,
    /// Dropped on purpose (`loss_ppm`).
    pub dropped_loss: u64,
    /// Dropped because the queue held `limit_bytes` (drop-tail).
    pub dropped_full: u64,
    /// Refused by the outgoing device.
    pub send_errors: u64,
    /// Lost before the queue: socket buffer overruns and truncated frames.
    pub dropped_rx: u64,
    /// Most bytes held at once.
    pub peak_bytes: u64,
}

struct Held {
    due: Instant,
    frame: Vec<u8>,
}

/// xorshift64*: jitter and loss need spread, not secrecy.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, n).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// Frames of one direction, waiting for their due time.
pub struct TimedQueue {
    shape: Shape,
    rng: Rng,
    // Sorted by due time: pushes keep it so (binary insertion when reordering).
    held: VecDeque<Held>,
    bytes: usize,
    last_due: Option<Instant>,
    pub counters: Counters,
}

impl TimedQueue {
    pub fn new(shape: Shape, rng: Rng) -> Self {
        Self {
            shape,
            rng,
            held: VecDeque::new(),
            bytes: 0,
            last_due: None,
            counters: Counters::default(),
        }
    }

    fn delay_for_next(&mut self) -> Duration {
        let j = self.shape.jitter.as_nanos() as u64;
        if j == 0 {
            return self.shape.delay;
        }
        let offset = self.rng.below(2 * j + 1);
        let d = self.shape.delay.as_nanos() as u64 + offset;
        Duration::from_nanos(d.saturating_sub(j))
    }

    /// Takes a frame that arrived at `now`; it may be dropped (loss, full).
    pub fn push(&mut self, now: Instant, frame: Vec<u8>) {
        self.counters.received += 1;
        if self.shape.loss_ppm > 0 && self.rng.below(1_000_000) < u64::from(self.shape.loss_ppm) {
            self.counters.dropped_loss += 1;
            return;
        }
        if self.bytes + frame.len() > self.shape.limit_bytes {
            self.counters.dropped_full += 1;
            return;
        }
        let mut due = now + self.delay_for_next();
        self.bytes += frame.len();
        self.counters.peak_bytes = self.counters.peak_bytes.max(self.bytes as u64);
        if self.shape.reorder {
            let at = self.held.partition_point(|h| h.due <= due);
            self.held.insert(at, Held { due, frame });
        } else {
            if let Some(last) = self.last_due {
                due = due.max(last);
            }
            self.last_due = Some(due);
            self.held.push_back(Held { due, frame });
        }
    }

    /// When the first frame is due, if any is held.
    pub fn next_due(&self) -> Option<Instant> {
        self.held.front().map(|h| h.due)
    }

    /// Moves up to `max` frames due by `now` into `out`.
    pub fn pop_due(&mut self, now: Instant, max: usize, out: &mut Vec<Vec<u8>>) {
        while out.len() < max {
            match self.held.front() {
                Some(h) if h.due <= now => {}
                _ => break,
            }
            if let Some(h) = self.held.pop_front() {
                self.bytes -= h.frame.len();
                out.push(h.frame);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(delay_ms: u64, jitter_ms: u64, reorder: bool, loss_ppm: u32, limit: usize) -> Shape {
        Shape {
            delay: Duration::from_millis(delay_ms),
            jitter: Duration::from_millis(jitter_ms),
            reorder,
            loss_ppm,
            limit_bytes: limit,
        }
    }

    #[test]
    fn frames_leave_after_their_delay_in_order() {
        let mut q = TimedQueue::new(shape(20, 0, false, 0, 1 << 20), Rng::new(1));
        let t0 = Instant::now();
        q.push(t0, vec![1]);
        q.push(t0 + Duration::from_millis(1), vec![2]);
        let mut out = Vec::new();
        q.pop_due(t0 + Duration::from_millis(19), 10, &mut out);
        assert!(out.is_empty());
        assert_eq!(q.next_due(), Some(t0 + Duration::from_millis(20)));
        q.pop_due(t0 + Duration::from_millis(20), 10, &mut out);
        assert_eq!(out, vec![vec![1]]);
        q.pop_due(t0 + Duration::from_millis(30), 10, &mut out);
        assert_eq!(out, vec![vec![1], vec![2]]);
        assert!(q.is_empty());
        assert_eq!(q.counters.received, 2);
    }

    #[test]
    fn jitter_without_reorder_keeps_order_and_bounds() {
        let mut q = TimedQueue::new(shape(20, 5, false, 0, 1 << 20), Rng::new(7));
        let t0 = Instant::now();
        for i in 0..1000u32 {
            q.push(
                t0 + Duration::from_micros(u64::from(i) * 10),
                i.to_le_bytes().to_vec(),
            );
        }
        let mut out = Vec::new();
        q.pop_due(t0 + Duration::from_secs(1), 2000, &mut out);
        let seq: Vec<u32> = out
            .iter()
            .map(|f| u32::from_le_bytes([f[0], f[1], f[2], f[3]]))
            .collect();
        assert_eq!(seq, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn jitter_with_reorder_reorders_within_bounds() {
        let mut q = TimedQueue::new(shape(20, 5, true, 0, 1 << 20), Rng::new(7));
        let t0 = Instant::now();
        for i in 0..1000u32 {
            q.push(
                t0 + Duration::from_micros(u64::from(i) * 10),
                i.to_le_bytes().to_vec(),
            );
        }
        let mut out = Vec::new();
        q.pop_due(t0 + Duration::from_millis(14), 2000, &mut out);
        assert!(out.is_empty(), "nothing before delay - jitter");
        q.pop_due(t0 + Duration::from_secs(1), 2000, &mut out);
        let seq: Vec<u32> = out
            .iter()
            .map(|f| u32::from_le_bytes([f[0], f[1], f[2], f[3]]))
            .collect();
        assert_eq!(seq.len(), 1000);
        assert!(seq.windows(2).any(|w| w[0] > w[1]), "some frames reordered");
    }

    #[test]
    fn full_queue_drops_at_the_tail_and_loss_is_near_its_rate() {
        let mut q = TimedQueue::new(shape(10, 0, false, 0, 3000), Rng::new(3));
        let t0 = Instant::now();
        for _ in 0..5 {
            q.push(t0, vec![0; 1000]);
        }
        assert_eq!(q.counters.dropped_full, 2);
        assert_eq!(q.counters.peak_bytes, 3000);
        let mut lossy = TimedQueue::new(shape(0, 0, false, 100_000, 1 << 30), Rng::new(3));
        for _ in 0..100_000 {
            lossy.push(t0, vec![0]);
        }
        let lost = lossy.counters.dropped_loss;
        assert!((9_000..11_000).contains(&lost), "lost {lost} of 100000 at 10 %");
    }
}
