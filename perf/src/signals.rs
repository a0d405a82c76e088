//! Ctrl-C and SIGTERM tear the emulated cloud down before the process exits.
//!
//! [`install`] blocks SIGINT/SIGTERM/SIGHUP in the calling thread (call it
//! first in `main`, before other threads exist, so every thread inherits the
//! mask) and starts a thread that waits for them with sigwait(2). On a signal
//! that thread removes the namespaces of every tag registered with
//! [`register`] (killing what runs in them) and exits with 128+signal.

use std::sync::Mutex;

use edgeshift_testbed as testbed;

static ACTIVE_TAGS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static LOOP_DIRS: Mutex<Vec<std::path::PathBuf>> = Mutex::new(Vec::new());

/// A directory whose files may back loop devices (VM disks): a signal
/// detaches every loop device backed by a file under it, after the
/// namespaces (and the QEMUs in them) are gone.
pub fn register_loop_dir(dir: &std::path::Path) {
    let mut dirs = LOOP_DIRS.lock().unwrap_or_else(|p| p.into_inner());
    if !dirs.iter().any(|d| d == dir) {
        dirs.push(dir.to_path_buf());
    }
}

/// The directory was cleaned up normally.
pub fn unregister_loop_dir(dir: &std::path::Path) {
    LOOP_DIRS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|d| d != dir);
}

/// Detaches loop devices whose backing file lies under one of `dirs`
/// (from `losetup -a`: "/dev/loopN: [dev]:inode (/path/file)").
pub fn detach_loops_under(dirs: &[std::path::PathBuf]) {
    let Ok(out) = std::process::Command::new("losetup").arg("-a").output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((dev, rest)) = line.split_once(':') else {
            continue;
        };
        let Some(file) = rest.rsplit_once('(').map(|(_, f)| f.trim_end_matches(')')) else {
            continue;
        };
        let file = file.trim_end_matches(" (deleted)");
        if dirs.iter().any(|d| std::path::Path::new(file).starts_with(d)) {
            let _ = std::process::Command::new("losetup").args(["-d", dev]).status();
        }
    }
}

/// Tags whose namespaces a signal must remove.
pub fn register(tag: &str) {
    let mut tags = ACTIVE_TAGS.lock().unwrap_or_else(|p| p.into_inner());
    if !tags.iter().any(|t| t == tag) {
        tags.push(tag.to_string());
    }
}

/// The tag was torn down normally; a signal need not touch it.
pub fn unregister(tag: &str) {
    let mut tags = ACTIVE_TAGS.lock().unwrap_or_else(|p| p.into_inner());
    tags.retain(|t| t != tag);
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
    }
    set
}

/// Routes SIGINT/SIGTERM/SIGHUP to a teardown thread. Call before spawning threads.
pub fn install() -> std::io::Result<()> {
    let set = signal_set();
    // SAFETY: `set` is initialised; a null old-mask pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is initialised and blocked in this thread; `sig` is a valid out-pointer.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc != 0 {
                return;
            }
            let tags = ACTIVE_TAGS.lock().unwrap_or_else(|p| p.into_inner()).clone();
            eprintln!("signal {sig}: tearing down {} testbed(s)", tags.len());
            for tag in tags {
                if let Err(e) = testbed::cleanup_stale(&tag) {
                    eprintln!("teardown of {tag}: {e}");
                }
            }
            let dirs = LOOP_DIRS.lock().unwrap_or_else(|p| p.into_inner()).clone();
            detach_loops_under(&dirs);
            std::process::exit(128 + sig);
        })?;
    Ok(())
}
