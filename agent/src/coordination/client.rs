//! Blocking HTTP + JSON client for the coordinator's `/v1` API (ureq: no
//! async runtime needed, small dependency footprint). The answer types carry
//! the fields the agent uses; the coordinator may send more.

use std::time::Duration;

use edgeshift_common::{Fingerprint, Manifest, ManifestId};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use super::CoordError;

pub use edgeshift_common::control::{
    Delta, Orders, Plan, PlanChunk, PlanSource, PrefetchChunk, PrefetchOrder,
};

/// Largest answer read (a plan for a 10 GiB image is a few MB).
const MAX_ANSWER: u64 = 256 << 20;

#[derive(Debug, Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl Client {
    /// `url` is the coordinator's base, e.g. `http://10.0.0.1:7800`.
    pub fn new(url: &str, token: Option<String>) -> Result<Self, CoordError> {
        let base = url.trim_end_matches('/').to_string();
        if !base.starts_with("http://") || base.len() <= "http://".len() {
            return Err(CoordError::BadUrl(url.to_string()));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Ok(Client { agent, base, token })
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
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let with_auth = |r: ureq::RequestBuilder<ureq::typestate::WithoutBody>| match &auth {
            Some(a) => r.header("Authorization", a),
            None => r,
        };
        let with_auth_body = |r: ureq::RequestBuilder<ureq::typestate::WithBody>| match &auth {
            Some(a) => r.header("Authorization", a),
            None => r,
        };
        let sent = match (method, body) {
            ("GET", _) => with_auth(self.agent.get(&url)).call(),
            ("DELETE", _) => with_auth(self.agent.delete(&url)).call(),
            ("POST", b) => with_auth_body(self.agent.post(&url)).send_json(b.unwrap_or(json!({}))),
            ("PUT", b) => with_auth_body(self.agent.put(&url)).send_json(b.unwrap_or(json!({}))),
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
}
