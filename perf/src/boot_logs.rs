//! The bpffs that VMs started in a testbed's namespaces pin their boot logs
//! in. `ip netns exec` gives each command a private mount namespace, where a
//! mount would not outlive the command, so it is mounted from here, the
//! host's mount namespace, before a testbed's VMs start. Without it
//! migrations slice the disk instead of reading the boot log.

/// Mounts the boot logs' bpffs unless it is there; a failure is logged.
pub fn ensure_bpffs() {
    if let Err(e) = edgeshift_agent::dirty::boot_log::ensure_bpffs() {
        tracing::warn!(error = %e, "no bpffs for boot logs");
    }
}
