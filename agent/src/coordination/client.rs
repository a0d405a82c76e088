//! Blocking HTTPS + JSON client for the coordinator's `/v1` API (ureq with
//! rustls and ring: no async runtime needed). It presents this edge's
//! certificate, which is how the coordinator knows which edge is calling,
//! and checks the coordinator's against the cluster CA. Plain `http://` is
//! only for a coordinator run with `--insecure-no-auth`. The answer types
//! carry the fields the agent uses; the coordinator may send more.

use std::time::Duration;

use edgeshift_common::identity::{self, TlsFiles};
use edgeshift_common::{Fingerprint, Manifest, ManifestId};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use super::CoordError;

pub use edgeshift_common::control::{
    Delta, HandoffOrder, HandoffProgress, Orders, Plan, PlanChunk, PlanSource, PrefetchChunk, PrefetchOrder,
};

/// Largest answer read (a plan for a 10 GiB image is a few MB).
const MAX_ANSWER: u64 = 256 << 20;

#[derive(Debug, Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
}

/// Reads a PEM file for ureq; errors name the file.
fn pem_items(path: &std::path::Path) -> Result<Vec<ureq::tls::PemItem<'static>>, CoordError> {
    let bad = |reason: String| CoordError::Tls {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    ureq::tls::parse_pem(&bytes)
        .map(|item| item.map_err(|e| bad(format!("not PEM: {e}"))))
        .collect()
}

/// ureq's TLS settings from the cluster files: the CA(s) as the only roots,
/// this edge's certificate as the client certificate, ring as the provider.
fn tls_config(files: &TlsFiles) -> Result<ureq::tls::TlsConfig, CoordError> {
    use ureq::tls::{ClientCert, PemItem, RootCerts, TlsConfig, TlsProvider};
    let certs = |path: &std::path::Path| -> Result<Vec<ureq::tls::Certificate<'static>>, CoordError> {
        let certs: Vec<_> = pem_items(path)?
            .into_iter()
            .filter_map(|i| match i {
                PemItem::Certificate(c) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(CoordError::Tls {
                path: path.to_path_buf(),
                reason: "holds no PEM certificate".into(),
            });
        }
        Ok(certs)
    };
    let roots = certs(&files.ca)?;
    let chain = certs(&files.cert)?;
    let key = pem_items(&files.key)?
        .into_iter()
        .find_map(|i| match i {
            PemItem::PrivateKey(k) => Some(k),
            _ => None,
        })
        .ok_or_else(|| CoordError::Tls {
            path: files.key.clone(),
            reason: "holds no PEM private key".into(),
        })?;
    Ok(TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(identity::provider())
        .root_certs(RootCerts::new_with_certs(&roots))
        .client_cert(Some(ClientCert::new_with_certs(&chain, key)))
        .build())
}

impl Client {
    /// `url` is the coordinator's base, `https://HOST:PORT` with this edge's
    /// cluster files in `tls`, or `http://HOST:PORT` without them (a
    /// coordinator run with `--insecure-no-auth`).
    pub fn new(url: &str, tls: Option<&TlsFiles>) -> Result<Self, CoordError> {
        let base = url.trim_end_matches('/').to_string();
        let scheme = if base.starts_with("https://") {
            "https://"
        } else {
            "http://"
        };
        if !base.starts_with(scheme) || base.len() <= scheme.len() {
            return Err(CoordError::BadUrl(url.to_string()));
        }
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)));
        match (scheme, tls) {
            ("https://", Some(files)) => config = config.tls_config(tls_config(files)?),
            ("https://", None) => return Err(CoordError::NoCredentials(base)),
            (_, Some(_)) => return Err(CoordError::PlainWithCredentials(base)),
            (_, None) => {}
        }
        let agent: ureq::Agent = config.build().into();
        Ok(Client { agent, base })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, CoordError> {
        let url = format!("{}{}", self.base, path);
        let what = format!("{method} {path}");
        let sent = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            ("POST", b) => self.agent.post(&url).send_json(b.unwrap_or(json!({}))),
            ("PUT", b) => self.agent.put(&url).send_json(b.unwrap_or(json!({}))),
            _ => {
                return Err(CoordError::BadAnswer {
                    what,
                    reason: "unsupported method".into(),
                })
            }
        };
        let mut resp = sent.map_err(|e| CoordError::Unreachable {
            url: self.base.clone(),
            reason: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .read_to_string()
            .map_err(|e| CoordError::Unreachable {
                url: self.base.clone(),
                reason: format!("reading the answer to {what}: {e}"),
            })?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or(text);
            return Err(CoordError::Refused {
                what,
                status,
                message,
            });
        }
        let text = if text.is_empty() { "null" } else { &text };
        serde_json::from_str(text).map_err(|e| CoordError::BadAnswer {
            what,
            reason: e.to_string(),
        })
    }

    /// Any `GET` of the API as JSON (for tools and tests).
    pub fn get_json(&self, path: &str) -> Result<serde_json::Value, CoordError> {
        self.call("GET", path, None)
    }

    pub fn register(&self, edge: &str, addr: &str, capacity: u64) -> Result<(), CoordError> {
        self.call::<serde_json::Value>(
            "POST",
            &format!("/v1/edges/{edge}/register"),
            Some(json!({ "addr": addr, "capacity": capacity })),
        )
        .map(drop)
    }

    pub fn inventory(
        &self,
        edge: &str,
        chunks: &[Fingerprint],
        usage: u64,
        pins: &[ManifestId],
    ) -> Result<(), CoordError> {
        self.call::<serde_json::Value>(
            "PUT",
            &format!("/v1/edges/{edge}/inventory"),
            Some(json!({ "chunks": chunks, "usage": usage, "pins": pins })),
        )
        .map(drop)
    }

    pub fn delta(&self, edge: &str, d: &Delta) -> Result<(), CoordError> {
        let body = serde_json::to_value(d).map_err(|e| CoordError::BadAnswer {
            what: "encode delta".into(),
            reason: e.to_string(),
        })?;
        self.call::<serde_json::Value>("POST", &format!("/v1/edges/{edge}/delta"), Some(body))
            .map(drop)
    }

    /// Rates measured from each peer (by edge id) to `edge`, bytes/s.
    pub fn paths(&self, edge: &str, rates: &[(String, f64)]) -> Result<(), CoordError> {
        let paths: Vec<_> = rates
            .iter()
            .map(|(p, r)| json!({ "peer": p, "bytes_per_sec": r }))
            .collect();
        self.call::<serde_json::Value>(
            "POST",
            &format!("/v1/edges/{edge}/paths"),
            Some(json!({ "paths": paths })),
        )
        .map(drop)
    }

    pub fn publish(&self, manifest: &Manifest) -> Result<ManifestId, CoordError> {
        #[derive(Deserialize)]
        struct Published {
            id: ManifestId,
        }
        let p: Published = self.call(
            "POST",
            "/v1/manifests",
            Some(json!({ "manifest_hex": hex::encode(manifest.to_bytes()) })),
        )?;
        Ok(p.id)
    }

    pub fn pin(&self, edge: &str, manifest: &ManifestId) -> Result<(), CoordError> {
        self.call::<serde_json::Value>(
            "POST",
            &format!("/v1/edges/{edge}/pins"),
            Some(json!({ "manifest": manifest })),
        )
        .map(drop)
    }

    pub fn unpin(&self, edge: &str, manifest: &ManifestId) -> Result<(), CoordError> {
        self.call::<serde_json::Value>("DELETE", &format!("/v1/edges/{edge}/pins/{manifest}"), None)
            .map(drop)
    }

    pub fn plan(&self, manifest: &ManifestId, dest: &str, alternatives: usize) -> Result<Plan, CoordError> {
        self.call(
            "GET",
            &format!("/v1/plan?manifest={manifest}&dest={dest}&alternatives={alternatives}"),
            None,
        )
    }

    pub fn orders(&self, edge: &str) -> Result<Orders, CoordError> {
        self.call("GET", &format!("/v1/edges/{edge}/orders"), None)
    }

    pub fn release(&self, lease: u64) -> Result<(), CoordError> {
        self.call::<serde_json::Value>("DELETE", &format!("/v1/leases/{lease}"), None)
            .map(drop)
    }

    pub fn hint(&self, manifest: &ManifestId, edge: &str) -> Result<(), CoordError> {
        self.call::<serde_json::Value>(
            "POST",
            "/v1/hints",
            Some(json!({ "manifest": manifest, "edge": edge })),
        )
        .map(drop)
    }

    /// The VMs running on `edge` and its migration listener.
    pub fn report_vms(
        &self,
        edge: &str,
        report: &edgeshift_common::control::VmsReport,
    ) -> Result<(), CoordError> {
        let body = serde_json::to_value(report).map_err(|e| CoordError::BadAnswer {
            what: "encode VM report".into(),
            reason: e.to_string(),
        })?;
        self.call::<serde_json::Value>("PUT", &format!("/v1/edges/{edge}/vms"), Some(body))
            .map(drop)
    }

    /// An ordered handoff's progress, from its source `edge`.
    pub fn handoff_progress(&self, edge: &str, id: u64, p: &HandoffProgress) -> Result<(), CoordError> {
        let body = serde_json::to_value(p).map_err(|e| CoordError::BadAnswer {
            what: "encode handoff progress".into(),
            reason: e.to_string(),
        })?;
        self.call::<serde_json::Value>("POST", &format!("/v1/edges/{edge}/handoffs/{id}"), Some(body))
            .map(drop)
    }
}
