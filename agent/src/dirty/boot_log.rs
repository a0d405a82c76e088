//! A VM's boot log: which chunks of its disk were written since it started
//! on this edge (since `vm run` restored the image, or since it arrived by
//! migration), with how many writes each.
//!
//! It is the eBPF tracker on the VM's loop device, left counting in the
//! kernel with its link and maps pinned in a bpffs, so no process needs to
//! run beside the VM and an agent restart loses nothing. A migration reads
//! it instead of slicing the whole live disk to learn what changed since
//! the manifest the VM booted from: round 0 can then carry those chunks at
//! once. `vm stop`, the source's teardown after a handoff, and a torn-down
//! incoming VM remove it (unpinned, the kernel detaches the program).
//!
//! The pins live under [`PIN_ROOT`], a bpffs mounted in the host's mount
//! namespace (the agent mounts it when it runs there). Not under
//! `/sys/fs/bpf`: `ip netns exec`, which runs agents in an edge's network
//! namespace, gives them a private mount namespace with a fresh `/sys`, so a
//! pin there would die with that one command; a mount made from such a
//! namespace would too, so the agent refuses to make one there.
//!
//! The log is trusted only when it can be: the device must be the VM's loop
//! device, the chunk size the manifest's, and the program must have lost no
//! update; otherwise the migration slices the disk as before.

use std::path::{Path, PathBuf};

pub use super::ebpf::PinnedChunk;
use super::ebpf::{read_pinned, unpin};
use super::{capacity_for, DeviceId, DirtyError, DirtyTracker, EbpfTracker};

/// Where boot logs are pinned: a bpffs in the host's mount namespace.
pub const PIN_ROOT: &str = "/run/edgeshift/bpf";

/// The pin directory of the VM whose state lives in `vm_dir`: one per VM
/// directory, so that edges sharing a host (tests, the demo) never collide.
pub fn pin_dir(vm_dir: &Path) -> PathBuf {
    let abs = std::fs::canonicalize(vm_dir).unwrap_or_else(|_| vm_dir.to_path_buf());
    let h = blake3::hash(abs.as_os_str().as_encoded_bytes());
    Path::new(PIN_ROOT).join(format!("vm-{}", &h.to_hex()[..16]))
}

/// Starts the boot log of a VM: call with its disk attached and before
/// anything writes to it through `dev_path`.
pub fn start(vm_dir: &Path, dev_path: &Path, chunk_size: u64) -> Result<PathBuf, DirtyError> {
    ensure_bpffs()?;
    let dir = pin_dir(vm_dir);
    // A log left by an earlier VM of this directory counts other writes.
    unpin(&dir)?;
    let dev = DeviceId::of_path(dev_path)?;
    let mut tracker = EbpfTracker::new(chunk_size, capacity_for(&[dev], chunk_size)?)?;
    tracker.watch(dev)?;
    tracker.pin(&dir)?;
    tracing::info!(dir = %dir.display(), %dev, chunk_size, "boot log started (eBPF tracker pinned)");
    Ok(dir)
}

/// Chunks written since the log started, by index.
pub fn read(vm_dir: &Path, dev_path: &Path, chunk_size: u64) -> Result<Vec<PinnedChunk>, DirtyError> {
    let dir = pin_dir(vm_dir);
    let r = read_pinned(&dir)?;
    let dev = DeviceId::of_path(dev_path)?;
    if r.dev != dev {
        return Err(DirtyError::BootLog(format!(
            "it watches {} but the VM's disk is {dev}",
            r.dev
        )));
    }
    if r.chunk_size != chunk_size {
        return Err(DirtyError::BootLog(format!(
            "it counts {} B chunks, the manifest has {chunk_size} B",
            r.chunk_size
        )));
    }
    if r.lost > 0 {
        return Err(DirtyError::BootLog(format!("it lost {} chunk updates", r.lost)));
    }
    Ok(r.written)
}

/// Removes the VM's boot log, if it has one.
pub fn stop(vm_dir: &Path) -> Result<(), DirtyError> {
    unpin(&pin_dir(vm_dir))
}

/// [`stop`] for teardowns, which go on whatever happens: a failure is
/// logged. Call it before `vm_dir` goes (the pin's name derives from it).
pub fn stop_or_warn(vm_dir: &Path) {
    if let Err(e) = stop(vm_dir) {
        tracing::warn!(dir = %vm_dir.display(), error = %e, "boot log not removed");
    }
}

fn is_bpffs(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[1] == path && f[2] == "bpf"
        })
    })
}

/// Mounts a bpffs at [`PIN_ROOT`] unless one is there, and only from the
/// host's own mount namespace (see the module doc).
pub fn ensure_bpffs() -> Result<(), DirtyError> {
    if is_bpffs(PIN_ROOT) {
        return Ok(());
    }
    if in_private_mount_ns() {
        return Err(DirtyError::NoBpffs(format!(
            "{PIN_ROOT} is not a bpffs and this agent runs in a private mount namespace \
             (ip netns exec?), where a mount would not outlive it: \
             `mkdir -p {PIN_ROOT} && mount -t bpf bpf {PIN_ROOT}` in the host's"
        )));
    }
    std::fs::create_dir_all(PIN_ROOT).map_err(|e| DirtyError::NoBpffs(format!("{PIN_ROOT}: {e}")))?;
    let out = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", PIN_ROOT])
        .output()
        .map_err(|e| DirtyError::NoBpffs(format!("mount: {e}")))?;
    if !out.status.success() {
        return Err(DirtyError::NoBpffs(format!(
            "mount -t bpf bpf {PIN_ROOT}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Whether this process runs in a mount namespace of its own: one other
/// than init's, or (where init's cannot be read, as in some sandboxes) in a
/// network namespace named under /run/netns, which `ip netns exec` enters
/// with a private mount namespace.
fn in_private_mount_ns() -> bool {
    use std::os::unix::fs::MetadataExt;
    let link = |p: &str| std::fs::read_link(p).ok();
    if let (Some(me), Some(init)) = (link("/proc/self/ns/mnt"), link("/proc/1/ns/mnt")) {
        return me != init;
    }
    let Ok(net) = std::fs::metadata("/proc/self/ns/net") else {
        return false;
    };
    std::fs::read_dir("/run/netns").is_ok_and(|d| {
        d.flatten().any(|e| {
            e.metadata()
                .is_ok_and(|m| m.dev() == net.dev() && m.ino() == net.ino())
        })
    })
}
