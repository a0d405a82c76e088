//! The cluster's TLS credentials of this edge (`--tls-ca`, `--tls-cert`,
//! `--tls-key`, `--tls-crl`) and the test-only `--insecure-plaintext`,
//! shared by the commands that move VM data (`agent`, `migrate`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use edgeshift_common::identity::{Credentials, TlsFiles};

#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// The cluster's CA certificate(s) (two during a CA rollover).
    #[arg(long, env = "EDGESHIFT_TLS_CA", default_value = "/etc/edgeshift/tls/ca.pem")]
    pub tls_ca: PathBuf,
    /// This edge's certificate (`edgeshift cluster add-edge NAME`).
    #[arg(long, env = "EDGESHIFT_TLS_CERT", default_value = "/etc/edgeshift/tls/cert.pem")]
    pub tls_cert: PathBuf,
    /// This edge's private key.
    #[arg(long, env = "EDGESHIFT_TLS_KEY", default_value = "/etc/edgeshift/tls/key.pem")]
    pub tls_key: PathBuf,
    /// Revoked certificates (`edgeshift cluster revoke`).
    #[arg(long, env = "EDGESHIFT_TLS_CRL")]
    pub tls_crl: Option<PathBuf>,
    /// Tests only: VM data (memory, disk mirror) travels in plaintext.
    #[arg(long, hide = true)]
    pub insecure_plaintext: bool,
}

impl TlsArgs {
    /// This edge's credentials; `None` with `--insecure-plaintext` (a WARN
    /// says so at every start). Files that cannot be loaded are an error
    /// naming the file and the command that makes it.
    pub fn credentials(&self) -> anyhow::Result<Option<Arc<Credentials>>> {
        if self.insecure_plaintext {
            tracing::warn!("--insecure-plaintext: VM memory and disk travel unencrypted and unauthenticated by certificate");
            return Ok(None);
        }
        let files = TlsFiles {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            crl: self.tls_crl.clone(),
        };
        let creds = Credentials::load(&files).with_context(|| {
            "loading this edge's TLS credentials (make them with `edgeshift cluster init --dir DIR` \
             and `edgeshift cluster add-edge NAME`, then pass --tls-ca/--tls-cert/--tls-key)"
        })?;
        Ok(Some(Arc::new(creds)))
    }
}
