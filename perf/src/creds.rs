//! [`Creds`]: the credentials a benchmark's agents and commands run with: a
//! throwaway cluster CA and one certificate per host (TLS on, as in
//! production), or the old cluster key with `--insecure-plaintext` to
//! measure what TLS costs beside it.

use std::path::{Path, PathBuf};

use edgeshift_common::identity::{IdentityError, Role, ThrowawayCluster, TlsFiles};

/// How a benchmark's edges authenticate.
#[derive(Debug)]
pub struct Creds {
    cluster: ThrowawayCluster,
    /// `Some(key file)`: plaintext with the cluster key (test-only mode).
    insecure_key: Option<PathBuf>,
}

impl Creds {
    /// A new cluster CA under `work/tls`; plaintext when `insecure` (the
    /// key is written beside it).
    pub fn new(work: &Path, insecure: bool) -> Result<Self, IdentityError> {
        let cluster = ThrowawayCluster::new(&work.join("tls"))?;
        let insecure_key = if insecure {
            let key = work.join("cluster.key");
            let mut bytes = [0u8; 32];
            edgeshift_common::identity::provider()
                .secure_random
                .fill(&mut bytes)
                .map_err(|_| IdentityError::Issue("no randomness for the cluster key".into()))?;
            std::fs::write(&key, hex::encode(bytes)).map_err(|e| IdentityError::File {
                path: key.clone(),
                reason: e.to_string(),
            })?;
            Some(key)
        } else {
            None
        };
        Ok(Creds {
            cluster,
            insecure_key,
        })
    }

    /// `EDGESHIFT_BENCH_PLAINTEXT=1` in the environment: plaintext.
    pub fn from_env(work: &Path) -> Result<Self, IdentityError> {
        let insecure = std::env::var("EDGESHIFT_BENCH_PLAINTEXT").is_ok_and(|v| v == "1");
        Self::new(work, insecure)
    }

    pub fn is_tls(&self) -> bool {
        self.insecure_key.is_none()
    }

    /// The flags giving host `name` (an edge) its credentials.
    pub fn args(&self, name: &str) -> Result<Vec<String>, IdentityError> {
        if let Some(key) = &self.insecure_key {
            return Ok(vec![
                "--insecure-plaintext".into(),
                "--cluster-key-file".into(),
                key.display().to_string(),
            ]);
        }
        Ok(self.cluster.files(Role::Edge, name, &[])?.cli_args())
    }

    /// The coordinator's certificate, valid for every address in `sans`
    /// (the ones its clients dial).
    pub fn coordinator_files(&self, sans: &[String]) -> Result<TlsFiles, IdentityError> {
        self.cluster.files(Role::Coordinator, "coordinator", sans)
    }

    /// An operator's certificate (the role that may order handoffs).
    pub fn operator_files(&self) -> Result<TlsFiles, IdentityError> {
        self.cluster.files(Role::Operator, "operator", &[])
    }
}
