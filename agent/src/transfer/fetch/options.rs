//! [`FetchOptions`]: the knobs of a fetch.

use std::time::Duration;

use crate::transfer::dial::DialOptions;

/// Knobs of a fetch; the defaults suit WAN paths from 10 Mbit/s to 10 Gbit/s.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Most chunks in one request frame.
    pub batch: usize,
    /// A peer with chunks in flight and no byte received for this long is dropped.
    pub stall_timeout: Duration,
    /// A busy peer delivering less than this (bytes/s) over a whole
    /// `stall_timeout` is dropped too; its chunks go to the others.
    pub min_peer_rate: u64,
    pub connect_timeout: Duration,
    /// Let servers compress chunks when that makes them arrive sooner.
    pub zstd: bool,
    /// Bounds of a peer's in-flight window in bytes.
    pub min_window: u64,
    pub max_window: u64,
    /// Window before a path's goodput has been measured.
    pub initial_window: u64,
    /// A path's window holds this much of its measured goodput. It must
    /// exceed the path's round-trip time, or the window limits the path.
    pub window_time: Duration,
    /// With several peers and at least this many chunks, first ask every
    /// peer which of them it holds (one `HasRequest` each, in parallel):
    /// nobody is asked for a chunk it lacks, and each peer takes the chunks
    /// only it holds first, so a path that alone holds some chunks is not
    /// busy with shared ones while the others run dry. 0: never.
    pub probe_min_chunks: usize,
}

impl Default for FetchOptions {
    fn default() -> Self {
        let dial = DialOptions::default();
        FetchOptions {
            batch: 32,
            stall_timeout: dial.stall_timeout,
            min_peer_rate: 16 << 10,
            connect_timeout: dial.connect_timeout,
            zstd: true,
            min_window: 1 << 20,
            max_window: 32 << 20,
            initial_window: 4 << 20,
            window_time: Duration::from_millis(100),
            probe_min_chunks: 64,
        }
    }
}

impl FetchOptions {
    /// What a connection to a peer needs of these options.
    pub fn dial(&self) -> DialOptions {
        DialOptions {
            connect_timeout: self.connect_timeout,
            stall_timeout: self.stall_timeout,
        }
    }
}

impl From<FetchOptions> for DialOptions {
    fn from(opts: FetchOptions) -> Self {
        opts.dial()
    }
}
