//! Compression matched to the link: which zstd level (if any) the chunk
//! server uses for a client, from the client's measured path rate and this
//! machine's measured speed at each level. The strongest level that still
//! compresses several times faster than the path carries bytes is chosen,
//! so compressing never becomes the bottleneck and slow links get the
//! stronger levels (docs/compression.md has the figures behind it).

use std::time::{Duration, Instant};

/// The levels the server chooses from, weakest first.
pub const LEVELS: [i32; 5] = [1, 3, 6, 9, 19];

/// How much faster than the path a level must compress to be used: the
/// output of a chunk that compresses to a quarter still leaves the
/// socket no sooner than the next chunk is ready.
const HEADROOM: f64 = 4.0;

/// When and how hard to compress: this machine's speed at each of
/// [`LEVELS`], measured once at start.
#[derive(Debug, Clone, Copy)]
pub struct ZstdPolicy {
    /// Bytes per second each of [`LEVELS`] compresses here (0 = never use it).
    pub speeds: [f64; LEVELS.len()],
}

impl ZstdPolicy {
    /// Never compress.
    pub fn never() -> Self {
        ZstdPolicy {
            speeds: [0.0; LEVELS.len()],
        }
    }

    /// Only level 1, at `rate` bytes/s (tests, and a forced speed).
    pub fn level1_only(rate: f64) -> Self {
        let mut speeds = [0.0; LEVELS.len()];
        speeds[0] = rate;
        ZstdPolicy { speeds }
    }

    /// Measures each level's speed on half-compressible bytes (1 MiB; 256 KiB
    /// for level 19, which runs at a few MB/s): about 0.15 s in all.
    pub fn calibrate() -> Self {
        let sample = calibration_sample(1 << 20);
        let mut speeds = [0.0; LEVELS.len()];
        for (speed, &level) in speeds.iter_mut().zip(&LEVELS) {
            let part = if level >= 19 {
                &sample[..256 << 10]
            } else {
                &sample[..]
            };
            let t = Instant::now();
            if zstd::bulk::compress(part, level).is_ok() {
                *speed = part.len() as f64 / t.elapsed().as_secs_f64().max(1e-6);
            }
        }
        ZstdPolicy { speeds }
    }

    /// The level to use on a path of `path_rate` bytes/s: the strongest
    /// that compresses [`HEADROOM`] times faster than the path; None when
    /// even level 1 does not. Before the path is measured (rate 0: a
    /// fetch's first window, several MiB) level 1, which outruns any WAN
    /// path: sent raw, the first window of a 10 Mbit/s fetch of mostly
    /// empty chunks cost about 2 MB more than compressed.
    pub fn level_for(&self, path_rate: u64) -> Option<i32> {
        if path_rate == 0 {
            return (self.speeds[0] > 0.0).then_some(LEVELS[0]);
        }
        let need = HEADROOM * path_rate as f64;
        LEVELS
            .iter()
            .zip(&self.speeds)
            .filter(|(_, &s)| s > need)
            .map(|(&l, _)| l)
            .next_back()
    }

    /// After compressing: does sending `compressed` bytes (having spent
    /// `spent`) finish sooner than sending `raw` bytes at `path_rate`?
    pub fn finishes_sooner(raw: usize, compressed: usize, spent: Duration, path_rate: u64) -> bool {
        let rate = path_rate.max(1) as f64;
        spent.as_secs_f64() + compressed as f64 / rate < raw as f64 / rate
    }
}

/// Alternating random-looking and repetitive runs of 4 KiB.
fn calibration_sample(len: usize) -> Vec<u8> {
    let mut sample = vec![0u8; len];
    let mut x: u32 = 0x9e37_79b9;
    for (i, b) in sample.iter_mut().enumerate() {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        *b = if (i / 4096) % 2 == 0 {
            (x >> 24) as u8
        } else {
            (i % 7) as u8
        };
    }
    sample
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slower_paths_get_stronger_levels_and_none_when_the_cpu_would_be_the_bottleneck() {
        // Speeds of this machine's order (docs/compression.md).
        let p = ZstdPolicy {
            speeds: [550e6, 380e6, 125e6, 83e6, 3.4e6],
        };
        assert_eq!(p.level_for(0), Some(1), "not measured yet");
        assert_eq!(p.level_for(125_000), Some(19), "1 Mbit/s");
        assert_eq!(p.level_for(1_250_000), Some(9), "10 Mbit/s");
        assert_eq!(p.level_for(12_500_000), Some(9), "100 Mbit/s");
        assert_eq!(p.level_for(62_500_000), Some(3), "500 Mbit/s");
        assert_eq!(p.level_for(125_000_000), Some(1), "1 Gbit/s");
        assert_eq!(p.level_for(1_250_000_000), None, "10 Gbit/s");
        assert_eq!(ZstdPolicy::never().level_for(125_000), None);
        assert_eq!(ZstdPolicy::never().level_for(0), None);
        assert_eq!(ZstdPolicy::level1_only(400e6).level_for(2_500_000), Some(1));
        let spent = Duration::from_millis(2);
        assert!(ZstdPolicy::finishes_sooner(262_144, 131_072, spent, 2_500_000));
        assert!(!ZstdPolicy::finishes_sooner(262_144, 259_500, spent, 2_500_000));
        let measured = ZstdPolicy::calibrate();
        assert!(measured.speeds.iter().all(|&s| s > 0.0), "{measured:?}");
        assert!(
            measured.speeds[0] > measured.speeds[4],
            "level 1 is faster than 19"
        );
    }
}
