//! [`OperatorApi`]: the coordinator's HTTP API as an edge platform's
//! operator calls it: curl inside the coordinator host's namespace, with
//! the cluster's operator certificate over HTTPS (or plain HTTP to a
//! coordinator run with `--insecure-no-auth`).

use std::process::Stdio;

use crate::cluster::{Cluster, ClusterError, COORDINATOR_PORT};
use crate::scenario::{io, ScenarioError};
use edgeshift_common::identity::TlsFiles;
use edgeshift_testbed::Testbed;

/// Calls the coordinator's API as the operator.
#[derive(Debug)]
pub struct OperatorApi {
    /// Namespace host curl runs in (the coordinator's).
    host: String,
    url: String,
    /// `None`: the coordinator is open (plain HTTP).
    files: Option<TlsFiles>,
}

impl OperatorApi {
    /// The operator of `cluster`'s coordinator (which must run).
    pub fn new(cluster: &Cluster) -> Result<Self, ClusterError> {
        let host = cluster
            .coordinator
            .as_ref()
            .map(|(h, _)| h.clone())
            .ok_or_else(|| ClusterError::Io {
                what: "the topology names no coordinator".into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })?;
        let (url, files) = match &cluster.coordinator_api {
            Some(url) if url.starts_with("https://") => (url.clone(), Some(cluster.creds.operator_files()?)),
            _ => (format!("http://127.0.0.1:{COORDINATOR_PORT}"), None),
        };
        Ok(Self { host, url, files })
    }

    /// `METHOD path` with an optional JSON body: (HTTP status, JSON body;
    /// `Null` when the body is not JSON).
    pub fn request(
        &self,
        tb: &Testbed,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), ScenarioError> {
        let mut cmd = tb.command(&self.host, "curl");
        cmd.args(["-sS", "-m", "20", "-X", method, "-w", "\n%{http_code}"]);
        if let Some(f) = &self.files {
            cmd.arg("--cacert")
                .arg(&f.ca)
                .arg("--cert")
                .arg(&f.cert)
                .arg("--key")
                .arg(&f.key);
        }
        if let Some(b) = body {
            cmd.args(["-H", "content-type: application/json", "-d", &b.to_string()]);
        }
        let out = cmd
            .arg(format!("{}{path}", self.url))
            .stdin(Stdio::null())
            .output()
            .map_err(io("curl"))?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
        let status: u16 = status.trim().parse().unwrap_or(0);
        if !out.status.success() || status == 0 {
            return Err(ScenarioError::Output(
                format!("coordinator {method} {path}"),
                format!("{text} {}", String::from_utf8_lossy(&out.stderr).trim()),
            ));
        }
        Ok((
            status,
            serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
        ))
    }

    pub fn get(&self, tb: &Testbed, path: &str) -> Result<(u16, serde_json::Value), ScenarioError> {
        self.request(tb, "GET", path, None)
    }
}
