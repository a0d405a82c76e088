//! Option groups that several commands share, declared once and flattened
//! (`#[command(flatten)]`) into each command that needs them, so a flag
//! means the same everywhere: the cluster (key file, this edge's id), the
//! coordinator, and where VM state lives.

use std::path::PathBuf;

use edgeshift_agent::migrate::coord::CoordConfig;
use edgeshift_agent::transfer::default_node_id;
use edgeshift_agent::transfer::ClusterKey;
use edgeshift_agent::vm::state::DEFAULT_STATE_DIR;
use edgeshift_common::identity::TlsFiles;

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

/// The cluster's credentials and this edge's id.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// File holding the cluster key: 64 hex digits (`head -c32 /dev/urandom | xxd -p -c64`).
    #[arg(long, env = "EDGESHIFT_CLUSTER_KEY_FILE", default_value = DEFAULT_KEY_FILE)]
    pub cluster_key_file: PathBuf,
    #[command(flatten)]
    pub id: IdArgs,
}

impl ClusterArgs {
    pub fn key(&self) -> anyhow::Result<ClusterKey> {
        Ok(ClusterKey::from_file(&self.cluster_key_file)?)
    }
}

/// The cluster key for a command that needs it only sometimes (`vm run
/// --peer`); this edge's id as everywhere.
#[derive(Debug, Clone, clap::Args)]
pub struct OptionalClusterArgs {
    /// File holding the cluster key: 64 hex digits (needed with --peer).
    #[arg(long, env = "EDGESHIFT_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<PathBuf>,
    #[command(flatten)]
    pub id: IdArgs,
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
    /// How to reach the coordinator as edge `id`, if one was given.
    pub fn config(&self, id: &IdArgs) -> Option<CoordConfig> {
        self.coordinator.as_ref().map(|url| CoordConfig {
            url: url.clone(),
            tls: self.tls(),
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

    /// This edge's cluster files for an `https://` coordinator (`None` for
    /// `http://`, a coordinator run with `--insecure-no-auth`): the shared
    /// TLS settings' variables (`EDGESHIFT_TLS_CA`, `_CERT`, `_KEY`, `_CRL`)
    /// or their defaults under /etc/edgeshift/tls.
    // TODO(lead, merge with tls-agent): take these from the agent's `--tls-*` flags.
    pub fn tls(&self) -> Option<TlsFiles> {
        let url = self.coordinator.as_deref()?;
        if !url.starts_with("https://") {
            return None;
        }
        let var = |name: &str| std::env::var_os(name).map(PathBuf::from);
        let d = TlsFiles::default_paths();
        Some(TlsFiles {
            ca: var("EDGESHIFT_TLS_CA").unwrap_or(d.ca),
            cert: var("EDGESHIFT_TLS_CERT").unwrap_or(d.cert),
            key: var("EDGESHIFT_TLS_KEY").unwrap_or(d.key),
            crl: var("EDGESHIFT_TLS_CRL"),
        })
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
        let p = Probe::try_parse_from(["x", "--cluster-key-file", "k"]).expect("parses");
        assert_eq!(p.cluster.id.id, default_node_id());
        assert!(p.coord.config(&p.cluster.id).is_none());
        for flag in ["--id", "--edge", "--node-id"] {
            let p = Probe::try_parse_from([
                "x",
                "--cluster-key-file",
                "k",
                flag,
                "e7",
                "--coordinator",
                "http://c:1",
            ])
            .expect("parses");
            let c = p.coord.config(&p.cluster.id).expect("coordinator");
            assert_eq!((c.edge.as_str(), c.url.as_str()), ("e7", "http://c:1"), "{flag}");
        }
        assert!(Probe::try_parse_from(["x", "--cluster-key-file", "k", "--token-file", "t"]).is_err());
    }
}
