//! Namespace names and lifecycle: which namespaces belong to a tag, and
//! removing them with whatever still runs inside.

use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::cmd::run;
use crate::TestbedError;

/// Prefix of every namespace a testbed creates.
pub const NETNS_PREFIX: &str = "es-";
/// Longest host or tag name: keeps `to-{host}` within IFNAMSIZ (15 chars).
pub const MAX_NAME_LEN: usize = 12;

/// Serialises `ip netns add`: concurrent first-time mounts of /run/netns race.
pub(crate) static NETNS_ADD_LOCK: Mutex<()> = Mutex::new(());

pub(crate) fn check_name(what: &'static str, name: &str) -> Result<(), TestbedError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(TestbedError::InvalidName {
            what,
            name: name.to_string(),
        })
    }
}

/// Names of all existing namespaces.
pub fn list_netns() -> Result<Vec<String>, TestbedError> {
    let out = run(Command::new("ip").args(["netns", "list"]))?;
    // Lines look like "name" or "name (id: 3)".
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Namespaces that belong to `tag`: `es-{tag}-{name}` where name has no '-'
/// (names cannot contain one), so tag `a` never matches tag `a_b`'s or `a-b`'s.
pub(crate) fn tag_namespaces(tag: &str, all: &[String]) -> Vec<String> {
    let prefix = format!("{NETNS_PREFIX}{tag}-");
    all.iter()
        .filter(|ns| {
            ns.strip_prefix(&prefix)
                .is_some_and(|rest| !rest.is_empty() && !rest.contains('-'))
        })
        .cloned()
        .collect()
}

/// Kills every process in `netns` and deletes it; a namespace already gone is fine.
pub(crate) fn destroy_netns(netns: &str) -> Result<(), TestbedError> {
    // Processes keep a namespace (and its veths) alive after `ip netns del`.
    for _ in 0..50 {
        let pids = match run(Command::new("ip").args(["netns", "pids", netns])) {
            Ok(out) => out,
            Err(TestbedError::Command { .. }) => String::new(),
            Err(e) => return Err(e),
        };
        let pids: Vec<i32> = pids.split_whitespace().filter_map(|p| p.parse().ok()).collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: kill(2) takes plain integers and touches no memory of ours.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match run(Command::new("ip").args(["netns", "del", netns])) {
        Ok(_) => Ok(()),
        Err(TestbedError::Command { stderr, .. }) if stderr.contains("No such file") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes everything left behind by testbeds of `tag` (after kill -9 or an
/// abort); returns the namespaces it deleted.
pub fn cleanup_stale(tag: &str) -> Result<Vec<String>, TestbedError> {
    check_name("tag", tag)?;
    let stale = tag_namespaces(tag, &list_netns()?);
    for ns in &stale {
        tracing::info!(netns = %ns, "removing stale namespace");
        destroy_netns(ns)?;
    }
    Ok(stale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("tag", "edge1").is_ok());
        assert!(check_name("tag", "a_b").is_ok());
        assert!(check_name("tag", "").is_err());
        assert!(check_name("tag", "a-b").is_err());
        assert!(check_name("tag", "a/b").is_err());
        assert!(check_name("tag", "abcdefghijklm").is_err());
    }

    #[test]
    fn tag_matching_is_exact() {
        let all: Vec<String> = ["es-a-x", "es-a_b-y", "es-ab-z", "es-a-", "other", "es-a-b-c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(tag_namespaces("a", &all), vec!["es-a-x".to_string()]);
        assert_eq!(tag_namespaces("a_b", &all), vec!["es-a_b-y".to_string()]);
        assert!(tag_namespaces("zz", &all).is_empty());
    }
}
