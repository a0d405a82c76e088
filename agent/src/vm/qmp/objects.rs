//! The client's TLS commands: QEMU's `tls-creds-x509` and `authz-simple`
//! objects and the migration parameters that name them.

use std::path::Path;

use serde_json::{json, Map, Value};

use super::client::QmpClient;
use super::types::MigrationTls;
use crate::vm::tls::TlsEndpoint;
use crate::vm::VmError;

impl QmpClient {
    /// `object-add` of a `tls-creds-x509` object reading `dir`; peers'
    /// certificates are verified (`verify-peer`, so a server endpoint asks
    /// for the client's certificate and a client checks the server's).
    pub fn add_tls_creds(&mut self, id: &str, dir: &Path, endpoint: TlsEndpoint) -> Result<(), VmError> {
        let dir = dir
            .to_str()
            .ok_or_else(|| VmError::Qmp(format!("TLS directory {} is not UTF-8", dir.display())))?;
        self.execute_raw(
            "object-add",
            Some(json!({
                "qom-type": "tls-creds-x509",
                "id": id,
                "dir": dir,
                "endpoint": endpoint.as_str(),
                "verify-peer": true,
            })),
        )
        .map(|_| ())
    }

    /// `object-add` of an `authz-simple` object that allows `identity` only.
    pub fn add_authz(&mut self, id: &str, identity: &str) -> Result<(), VmError> {
        self.execute_raw(
            "object-add",
            Some(json!({ "qom-type": "authz-simple", "id": id, "identity": identity })),
        )
        .map(|_| ())
    }

    pub fn object_del(&mut self, id: &str) -> Result<(), VmError> {
        self.execute_raw("object-del", Some(json!({ "id": id })))
            .map(|_| ())
    }

    /// `migrate-set-parameters` with `tls-creds` and, when given,
    /// `tls-hostname` and `tls-authz`.
    pub fn migrate_set_tls(&mut self, tls: &MigrationTls) -> Result<(), VmError> {
        let mut args = Map::new();
        args.insert("tls-creds".into(), Value::from(tls.creds.as_str()));
        if let Some(h) = &tls.hostname {
            args.insert("tls-hostname".into(), Value::from(h.as_str()));
        }
        if let Some(a) = &tls.authz {
            args.insert("tls-authz".into(), Value::from(a.as_str()));
        }
        self.execute_raw("migrate-set-parameters", Some(Value::Object(args)))
            .map(|_| ())
    }
}
