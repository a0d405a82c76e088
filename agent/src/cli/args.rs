//! Option groups that several commands share, declared once and flattened
//! (`#[command(flatten)]`) into each command that needs them, so a flag
//! means the same everywhere: the cluster (certificates, this edge's id),
//! the coordinator, and where VM state lives.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use edgeshift_agent::transfer::Trust;
use edgeshift_common::identity::{Credentials, TlsFiles};

use edgeshift_agent::migrate::coord::CoordConfig;
use edgeshift_agent::transfer::default_node_id;
use edgeshift_agent::transfer::ClusterKey;
use edgeshift_agent::vm::state::DEFAULT_STATE_DIR;

/// Where an installed edge keeps the cluster key.
pub const DEFAULT_KEY_FILE: &str = "/etc/edgeshift/cluster.key";

/// This edge's id, one rule for every command.
#[derive(Debug, Clone, clap::Args)]
pub struct IdArgs {
    /// This edge's id: its name in handshakes with peers and its edge id at
    /// the coordinator (default: the host name). `--edge` and `--node-id`
    /// are deprecated aliases of it.
    #[arg(long, aliases = ["edge", "node-id"], env = "EDGESHIFT_ID", default_value_t = default_node_id())]
    pub id: String,
}

/// Where the cluster's certificates are installed by default.
pub const DEFAULT_TLS_CA: &str = "/etc/edgeshift/tls/ca.pem";
pub const DEFAULT_TLS_CERT: &str = "/etc/edgeshift/tls/cert.pem";
pub const DEFAULT_TLS_KEY: &str = "/etc/edgeshift/tls/key.pem";

/// The cluster's credentials and this edge's id.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// The cluster's CA certificate(s), PEM (two during a CA rollover;
    /// `edgeshift cluster init` makes it).
    #[arg(long, env = "EDGESHIFT_TLS_CA", default_value = DEFAULT_TLS_CA)]
    pub tls_ca: PathBuf,
    /// This edge's certificate, PEM (`edgeshift cluster add-edge NAME`);
    /// its name is this edge's id.
    #[arg(long, env = "EDGESHIFT_TLS_CERT", default_value = DEFAULT_TLS_CERT)]
    pub tls_cert: PathBuf,
    /// This edge's private key, PEM (mode 0600).
    #[arg(long, env = "EDGESHIFT_TLS_KEY", default_value = DEFAULT_TLS_KEY)]
    pub tls_key: PathBuf,
    /// Revoked certificates, PEM (`edgeshift cluster revoke`).
    #[arg(long, env = "EDGESHIFT_TLS_CRL")]
    pub tls_crl: Option<PathBuf>,
    /// TESTS ONLY: no TLS anywhere VM data travels; peers prove the
    /// cluster key of --cluster-key-file instead and everything crosses
    /// the network in plaintext.
    #[arg(long, hide = true, env = "EDGESHIFT_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
    /// With --insecure-plaintext only: the cluster key, 64 hex digits.
    #[arg(long, hide = true, env = "EDGESHIFT_CLUSTER_KEY_FILE", default_value = DEFAULT_KEY_FILE)]
    pub cluster_key_file: PathBuf,
    #[command(flatten)]
    pub id: IdArgs,
}

impl ClusterArgs {
    /// This edge's files for the coordinator link (`None` under
    /// `--insecure-plaintext`).
    pub fn coordinator_tls(&self) -> Option<TlsFiles> {
        (!self.insecure_plaintext).then(|| self.tls_files())
    }

    pub fn tls_files(&self) -> TlsFiles {
        TlsFiles {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            crl: self.tls_crl.clone(),
        }
    }

    /// Loads how this edge authenticates. Under TLS this edge's id becomes
    /// its certificate's name (the only one its peers and the coordinator
    /// will accept from it). Logs a warning at every use of the insecure mode.
    pub fn trust(&mut self) -> anyhow::Result<Trust> {
        if self.insecure_plaintext {
            tracing::warn!(
                "--insecure-plaintext: VM disks and memory cross the network UNENCRYPTED and peers are not identified by certificate; for tests only"
            );
            let key = ClusterKey::from_file(&self.cluster_key_file).with_context(|| {
                format!(
                    "the cluster key (`cluster_key_file`, {})",
                    self.cluster_key_file.display()
                )
            })?;
            return Ok(Trust::InsecurePlaintext {
                key,
                id: self.id.id.clone(),
            });
        }
        let creds =
            Credentials::load(&self.tls_files()).context("loading this edge's cluster credentials")?;
        let name = &creds.identity().name;
        if *name != self.id.id {
            tracing::info!(id = %self.id.id, certificate = %name, "this edge's id is its certificate's name");
            self.id.id = name.clone();
        }
        Ok(Trust::Tls(Arc::new(creds)))
    }
}

/// The cache coordinator. Its edge id for this edge is `--id`.
#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorArgs {
    /// The cache coordinator (https://HOST:PORT; the edge presents its
    /// cluster certificate); what it does for this command is in the
    /// command's description (`--help`).
    #[arg(long, env = "EDGESHIFT_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Replaced by the edge's certificate; refused with a message saying so.
    #[arg(long, env = "EDGESHIFT_TOKEN_FILE", requires = "coordinator", hide = true)]
    pub token_file: Option<PathBuf>,
}

impl CoordinatorArgs {
    /// How to reach the coordinator as edge `id` presenting `tls`, if one was given.
    pub fn config(&self, id: &IdArgs, tls: Option<TlsFiles>) -> Option<CoordConfig> {
        self.coordinator.as_ref().map(|url| CoordConfig {
            url: url.clone(),
            tls: self.tls_for(tls),
            edge: id.id.clone(),
        })
    }

    /// The `--token-file` of old: an error naming what replaced it.
    pub fn refuse_token_file(&self) -> anyhow::Result<()> {
        match &self.token_file {
            Some(t) => anyhow::bail!(
                "`token_file` ({}) was replaced: the agent authenticates to the coordinator with this edge's \
                 cluster certificate (--tls-ca, --tls-cert, --tls-key; `edgeshift cluster add-edge NAME`)",
                t.display()
            ),
            None => Ok(()),
        }
    }

    /// `tls` if the coordinator is `https://` (a coordinator run with
    /// `--insecure-no-auth` is `http://` and gets no certificate).
    pub fn tls_for(&self, tls: Option<TlsFiles>) -> Option<TlsFiles> {
        tls.filter(|_| {
            self.coordinator
                .as_deref()
                .is_some_and(|u| u.starts_with("https://"))
        })
    }

    /// The packaged files (or `EDGESHIFT_TLS_*`), for commands without the
    /// cluster flags (`vm stop`).
    pub fn default_tls() -> TlsFiles {
        let var = |name: &str| std::env::var_os(name).map(PathBuf::from);
        let d = TlsFiles::default_paths();
        TlsFiles {
            ca: var("EDGESHIFT_TLS_CA").unwrap_or(d.ca),
            cert: var("EDGESHIFT_TLS_CERT").unwrap_or(d.cert),
            key: var("EDGESHIFT_TLS_KEY").unwrap_or(d.key),
            crl: var("EDGESHIFT_TLS_CRL"),
        }
    }
}

/// Where this edge's VM records, sockets, logs and disks live.
#[derive(Debug, Clone, clap::Args)]
pub struct StateArgs {
    /// Where VM records, sockets, logs and disks live.
    #[arg(long, env = "EDGESHIFT_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Probe {
        #[command(flatten)]
        cluster: ClusterArgs,
        #[command(flatten)]
        coord: CoordinatorArgs,
    }

    #[test]
    fn the_edge_id_defaults_to_the_host_name_and_takes_the_old_spellings() {
        let p = Probe::try_parse_from(["x"]).expect("parses");
        assert_eq!(p.cluster.id.id, default_node_id());
        assert!(p.coord.config(&p.cluster.id, None).is_none());
        for flag in ["--id", "--edge", "--node-id"] {
            let p = Probe::try_parse_from(["x", flag, "e7", "--coordinator", "http://c:1"]).expect("parses");
            let c = p.coord.config(&p.cluster.id, None).expect("coordinator");
            assert_eq!((c.edge.as_str(), c.url.as_str()), ("e7", "http://c:1"), "{flag}");
        }
        assert!(Probe::try_parse_from(["x", "--token-file", "t"]).is_err());
    }
}
