//! The one error type of the testbed: bad names, bad links, and failed
//! `ip`/`tc` commands with their stderr.

use crate::netns::MAX_NAME_LEN;

/// Errors from building or tearing down a testbed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// A tag or host name with characters other than `[A-Za-z0-9_]`, empty or too long.
    #[error("invalid {what} name {name:?}: use 1-{MAX_NAME_LEN} chars of [A-Za-z0-9_]")]
    InvalidName { what: &'static str, name: String },
    /// Namespaces of this tag already exist (another run, or a crashed one).
    #[error("namespaces for tag {0:?} already exist (another run, or a stale one: call cleanup_stale)")]
    TagInUse(String),
    /// A host was named twice.
    #[error("host {0:?} already exists in this testbed")]
    DuplicateHost(String),
    /// A name not added with `add_host`.
    #[error("no host {0:?} in this testbed")]
    UnknownHost(String),
    /// `link(a, a, ..)`, or a second link between the same pair.
    #[error("cannot link {0:?} and {1:?}: {2}")]
    BadLink(String, String, &'static str),
    /// No link between these two hosts.
    #[error("no link between {0:?} and {1:?}")]
    NoLink(String, String),
    /// No L2 segment with this name.
    #[error("no L2 segment {0:?}")]
    UnknownSegment(String),
    /// More links or segments than the address plan has /24s for.
    #[error("address plan exhausted: at most 255 links and 255 segments per testbed")]
    AddressesExhausted,
    /// A rate of 0 Mbit/s.
    #[error("link rate must be at least 1 Mbit/s")]
    ZeroRate,
    /// A command (`ip`, `tc`, ...) could not start.
    #[error("cannot run {cmd}: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    /// A command exited non-zero.
    #[error("{cmd} failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    /// A link's delay line could not start or report.
    #[error("delay line of {link}: {reason}")]
    DelayLine { link: String, reason: String },
    /// A command's output was not what we expected.
    #[error("unexpected output from {cmd}: {output:?}")]
    Parse { cmd: String, output: String },
}
