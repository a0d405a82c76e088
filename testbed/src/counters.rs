//! Interface byte counters, read from inside a namespace.

use std::collections::BTreeMap;
use std::process::Command;

use crate::cmd::run;
use crate::TestbedError;

/// Byte counters of one interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IfaceCounters {
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

/// Byte counters of `ifname` inside `netns`, from `ip -s link`.
pub fn iface_counters(netns: &str, ifname: &str) -> Result<IfaceCounters, TestbedError> {
    // /sys/class/net shows the caller's namespace, so read it from inside.
    let read = |which: &str| -> Result<u64, TestbedError> {
        let path = format!("/sys/class/net/{ifname}/statistics/{which}");
        let out = run(Command::new("ip").args(["netns", "exec", netns, "cat", &path]))?;
        out.trim().parse().map_err(|_| TestbedError::Parse {
            cmd: format!("cat {path}"),
            output: out.clone(),
        })
    };
    Ok(IfaceCounters {
        rx_bytes: read("rx_bytes")?,
        tx_bytes: read("tx_bytes")?,
    })
}

/// Byte counters of every interface in `netns` (one `ip -s -j link` call).
pub fn all_counters(netns: &str) -> Result<BTreeMap<String, IfaceCounters>, TestbedError> {
    let cmd_line = format!("ip -n {netns} -s -j link");
    let out = run(Command::new("ip").args(["-n", netns, "-s", "-j", "link"]))?;
    let parsed: serde_json::Value = serde_json::from_str(&out).map_err(|_| TestbedError::Parse {
        cmd: cmd_line.clone(),
        output: out.clone(),
    })?;
    let mut map = BTreeMap::new();
    for link in parsed.as_array().into_iter().flatten() {
        let name = link["ifname"].as_str();
        let rx = link["stats64"]["rx"]["bytes"].as_u64();
        let tx = link["stats64"]["tx"]["bytes"].as_u64();
        if let (Some(name), Some(rx_bytes), Some(tx_bytes)) = (name, rx, tx) {
            map.insert(name.to_string(), IfaceCounters { rx_bytes, tx_bytes });
        }
    }
    Ok(map)
}
