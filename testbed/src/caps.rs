//! Capability guards for tests that need root, namespaces, QEMU, loop
//! devices or the kernel's tracing (eBPF, tracefs).
//!
//! One rule everywhere: outside CI a missing capability skips the test with
//! the reason printed; under `CI=true` it fails the test (a panic naming
//! what is missing), so CI never passes by skipping.

use std::path::Path;
use std::process::{Command, Stdio};

/// Tools every namespace test runs.
pub const NETNS_TOOLS: &[&str] = &["ip", "tc"];
/// Tools the VM tests run (QEMU, loop devices, the guest's TCP services, mkfs).
pub const VM_TOOLS: &[&str] = &["qemu-system-x86_64", "ip", "losetup", "socat", "tc", "mkfs.ext4"];

/// Whether this run is CI (`CI=true`), where missing capabilities fail.
pub fn under_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions, cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// Whether `tool` is on the PATH.
pub fn has_tool(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Reports that the test cannot run for want of `what`: panics under
/// `CI=true`, otherwise prints why it skips.
pub fn unavailable(what: &str) {
    report_unavailable(what, under_ci());
}

fn report_unavailable(what: &str, ci: bool) {
    if ci {
        panic!("CI=true and this test cannot run: {what} (run .ci/setup as root)");
    }
    eprintln!("skipping: {what} (set CI=true to make this a failure)");
}

/// `ok`, after reporting `what` as [`unavailable`] when it is false: call as
/// `if !available("root", is_root()) { return; }`.
pub fn available(what: &str, ok: bool) -> bool {
    if !ok {
        unavailable(&format!("{what} is unavailable"));
    }
    ok
}

/// True when the test must skip for want of root (reported as
/// [`unavailable`], so under `CI=true` this panics instead).
pub fn skip_unless_root(what: &str) -> bool {
    !available(&format!("root (for {what})"), is_root())
}

/// What of root, `tools` and `files` is missing, comma-separated; `None`
/// when all is there. Reports it as [`unavailable`].
pub fn missing(root: bool, tools: &[&str], files: &[&str]) -> Option<String> {
    let mut why = Vec::new();
    if root && !is_root() {
        why.push("not root".to_string());
    }
    why.extend(
        tools
            .iter()
            .filter(|t| !has_tool(t))
            .map(|t| format!("{t} missing")),
    );
    why.extend(
        files
            .iter()
            .filter(|f| !Path::new(f).exists())
            .map(|f| format!("{f} missing")),
    );
    if why.is_empty() {
        return None;
    }
    let why = why.join(", ");
    unavailable(&why);
    Some(why)
}

/// Root and the namespace tools plus `extra_tools`; `None` when the test can
/// run, else why not (see [`missing`]).
pub fn missing_for_netns(extra_tools: &[&str]) -> Option<String> {
    let tools: Vec<&str> = NETNS_TOOLS.iter().chain(extra_tools).copied().collect();
    missing(true, &tools, &[])
}

/// Root, QEMU and the tools and devices a VM on a testbed needs; `None` when
/// the test can run, else why not (see [`missing`]).
pub fn missing_for_vms() -> Option<String> {
    missing(true, VM_TOOLS, &["/dev/net/tun"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "CI=true and this test cannot run: a pretend capability")]
    fn under_ci_a_missing_capability_fails() {
        report_unavailable("a pretend capability", true);
    }

    #[test]
    fn outside_ci_a_missing_capability_skips() {
        report_unavailable("a pretend capability", false);
    }
}
