//! Ctrl-C and SIGTERM tear the emulated cloud down before the process exits.
//!
//! [`install`] blocks SIGINT/SIGTERM/SIGHUP in the calling thread (call it
//! first in `main`, before other threads exist, so every thread inherits the
//! mask) and starts a thread that waits for them with sigwait(2). On a signal
//! that thread removes the namespaces of every tag registered with
//! [`register`] (killing what runs in them) and exits with 128+signal.

use std::sync::Mutex;

use crate::testbed;

static ACTIVE_TAGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

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
            std::process::exit(128 + sig);
        })?;
    Ok(())
}
