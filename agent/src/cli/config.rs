//! `/etc/edgeshift/agent.toml`: the agent's configuration file, read before
//! the command line is parsed. Its values become the defaults of the options
//! of the same name in every command (`edgeshift_common::config`), so an
//! `EDGESHIFT_*` variable or a flag overrides them, and `edgeshift vm list`
//! or `slice` find the daemon's state directory and store without flags.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use edgeshift_common::config::{self, ConfigError};

use edgeshift_common::service::LogFormat;

/// Where an installed agent's configuration lives.
pub const DEFAULT_PATH: &str = "/etc/edgeshift/agent.toml";

/// Every key the file may hold (unknown keys are errors). The packaged file
/// (`packaging/agent.toml`) documents each one.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub listen: Option<SocketAddr>,
    pub migrate_listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub store: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub cluster_key_file: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_crl: Option<PathBuf>,
    pub id: Option<String>,
    pub coordinator: Option<String>,
    pub token_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "config::size")]
    pub capacity: Option<u64>,
    pub zstd: Option<bool>,
    pub uncoordinated_migrations: Option<bool>,
    pub autostart: Option<bool>,
    pub log_format: Option<LogFormat>,
}

impl AgentFile {
    /// The file's values as (clap argument id, value) pairs.
    pub fn defaults(&self) -> Vec<(&'static str, String)> {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        let pairs: [(&'static str, Option<String>); 18] = [
            ("listen", self.listen.map(|a| a.to_string())),
            ("migrate_listen", self.migrate_listen.map(|a| a.to_string())),
            ("metrics_listen", self.metrics_listen.map(|a| a.to_string())),
            ("store", path(&self.store)),
            ("state_dir", path(&self.state_dir)),
            ("cluster_key_file", path(&self.cluster_key_file)),
            ("tls_ca", path(&self.tls_ca)),
            ("tls_cert", path(&self.tls_cert)),
            ("tls_key", path(&self.tls_key)),
            ("tls_crl", path(&self.tls_crl)),
            ("id", self.id.clone()),
            ("coordinator", self.coordinator.clone()),
            ("token_file", path(&self.token_file)),
            ("capacity", self.capacity.map(|c| c.to_string())),
            ("no_zstd", self.zstd.map(|z| (!z).to_string())),
            (
                "uncoordinated_migrations",
                self.uncoordinated_migrations.map(|u| u.to_string()),
            ),
            ("no_autostart", self.autostart.map(|a| (!a).to_string())),
            ("log_format", self.log_format.map(|f| f.as_str().to_string())),
        ];
        pairs.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect()
    }
}

/// The configuration file this command line names (`--config`,
/// `$EDGESHIFT_CONFIG`, else [`DEFAULT_PATH`] if present) and its contents.
pub fn load(argv: &[OsString]) -> anyhow::Result<(Option<PathBuf>, AgentFile)> {
    let (path, required) = config::choose_file(
        argv,
        std::env::var_os("EDGESHIFT_CONFIG"),
        Path::new(DEFAULT_PATH),
    );
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((None, AgentFile::default()))
        }
        Err(e) => {
            return Err(ConfigError::Unreadable {
                file: path,
                reason: e.to_string(),
            })
            .context("the agent's configuration")
        }
    };
    let file = config::parse(&text, &path)?;
    Ok((Some(path), file))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packaged file parses, and every key it documents is one the
    /// agent knows (a renamed key fails here, not on an edge).
    #[test]
    fn the_packaged_file_parses_and_documents_every_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/agent.toml");
        let text = std::fs::read_to_string(&path).expect("packaging/agent.toml");
        let file: AgentFile = config::parse(&text, &path).expect("parses");
        assert_eq!(file.store.as_deref(), Some(Path::new("/var/lib/edgeshift/store")));
        // Uncommenting every `# key = value` line must parse too.
        let all: String = text
            .lines()
            .map(|l| l.strip_prefix("# ").filter(|r| r.contains(" = ")).unwrap_or(l))
            .map(|l| format!("{l}\n"))
            .collect();
        let all: AgentFile = config::parse(&all, &path).expect("every documented key parses");
        let keys: Vec<_> = all.defaults().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys.len(), 18, "a key is not documented: {keys:?}");
    }
}
