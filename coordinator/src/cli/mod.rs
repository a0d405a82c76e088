//! The coordinator's command line over its configuration file
//! (`/etc/edgeshift/coordinator.toml`): the file's values become the flags'
//! defaults, under `EDGESHIFT_COORDINATOR_*` variables and the flags
//! themselves (`edgeshift_common::config`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};
use edgeshift_common::config::{self, ConfigError};
use edgeshift_common::service::LogFormat;
use edgeshift_coordinator::api::DEFAULT_BODY_LIMIT;

/// Where an installed coordinator's configuration lives.
pub const DEFAULT_PATH: &str = "/etc/edgeshift/coordinator.toml";

/// The edgeshift cache coordinator.
#[derive(clap::Parser, Debug)]
#[command(name = "edgeshift-coordinator", version, about, long_about = crate::LONG_ABOUT)]
pub struct Args {
    /// Configuration file (TOML; default /etc/edgeshift/coordinator.toml when present).
    #[arg(long, env = "EDGESHIFT_COORDINATOR_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:7800 or 0.0.0.0:7800.
    #[arg(long, env = "EDGESHIFT_COORDINATOR_LISTEN", default_value = "0.0.0.0:7800")]
    pub listen: String,
    /// Directory for the database (created if absent).
    #[arg(
        long,
        env = "EDGESHIFT_COORDINATOR_DATA",
        default_value = "/var/lib/edgeshift-coordinator"
    )]
    pub data: PathBuf,
    /// Cluster CA certificate(s) that client certificates must chain to
    /// (two during a CA rollover).
    #[arg(
        long,
        env = "EDGESHIFT_TLS_CA",
        value_name = "FILE",
        default_value = "/etc/edgeshift/tls/ca.pem"
    )]
    pub tls_ca: PathBuf,
    /// The coordinator's certificate (role coordinator, SANs for the names
    /// agents dial): `edgeshift cluster issue --role coordinator NAME --san HOST`.
    #[arg(
        long,
        env = "EDGESHIFT_TLS_CERT",
        value_name = "FILE",
        default_value = "/etc/edgeshift/tls/cert.pem"
    )]
    pub tls_cert: PathBuf,
    /// The coordinator's private key.
    #[arg(
        long,
        env = "EDGESHIFT_TLS_KEY",
        value_name = "FILE",
        default_value = "/etc/edgeshift/tls/key.pem"
    )]
    pub tls_key: PathBuf,
    /// Revoked certificates (PEM CRL from `edgeshift cluster revoke`).
    #[arg(long, env = "EDGESHIFT_TLS_CRL", value_name = "FILE")]
    pub tls_crl: Option<PathBuf>,
    /// File holding the operator's bearer token (policy, hints,
    /// deregistration) for operators without an operator certificate.
    #[arg(long, env = "EDGESHIFT_COORDINATOR_OPERATOR_TOKEN_FILE", value_name = "FILE")]
    pub operator_token_file: Option<PathBuf>,
    /// Plain HTTP and no authentication at all: anyone who reaches the port
    /// may act as any edge and change the policy. For tests on a closed
    /// network only; logged at every start.
    #[arg(long, env = "EDGESHIFT_COORDINATOR_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// Replaced: edges use their certificates, the operator
    /// --operator-token-file. Refused with a message saying so.
    #[arg(long, env = "EDGESHIFT_COORDINATOR_TOKEN_FILE", hide = true)]
    pub token_file: Option<PathBuf>,
    /// Seconds a client gets to send each request's headers (and to finish
    /// its TLS handshake) before the connection is closed.
    #[arg(long, env = "EDGESHIFT_COORDINATOR_HEADER_TIMEOUT", default_value_t = 10.0)]
    pub header_timeout: f64,
    /// Connections served at once; further ones wait in the listen backlog.
    #[arg(long, env = "EDGESHIFT_COORDINATOR_MAX_CONNECTIONS", default_value_t = edgeshift_coordinator::serve::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Largest request body accepted, in bytes (413 beyond).
    #[arg(long, env = "EDGESHIFT_COORDINATOR_MAX_BODY", default_value_t = DEFAULT_BODY_LIMIT)]
    pub max_body: usize,
    /// Rate assumed for a path no agent has measured, in bytes per second.
    #[arg(
        long,
        env = "EDGESHIFT_COORDINATOR_DEFAULT_PATH_RATE",
        default_value_t = 12.5e6
    )]
    pub default_path_rate: f64,
    /// How long a plan or prefetch order protects its source chunks, seconds.
    #[arg(long, env = "EDGESHIFT_COORDINATOR_LEASE_SECS", default_value_t = 900)]
    pub lease_secs: u64,
    /// Log lines as text (coloured only on a terminal) or JSON objects.
    #[arg(
        long,
        env = "EDGESHIFT_COORDINATOR_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// Every key the file may hold (unknown keys are errors); the packaged
/// file (`packaging/coordinator.toml`) documents each one.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorFile {
    pub listen: Option<String>,
    pub data: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_crl: Option<PathBuf>,
    pub operator_token_file: Option<PathBuf>,
    pub insecure_no_auth: Option<bool>,
    pub max_body: Option<usize>,
    pub header_timeout: Option<f64>,
    pub max_connections: Option<usize>,
    pub default_path_rate: Option<f64>,
    pub lease_secs: Option<u64>,
    pub log_format: Option<LogFormat>,
}

impl CoordinatorFile {
    /// The file's values as (clap argument id, value) pairs.
    pub fn defaults(&self) -> Vec<(&'static str, String)> {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        let pairs: [(&'static str, Option<String>); 15] = [
            ("listen", self.listen.clone()),
            ("data", path(&self.data)),
            ("token_file", path(&self.token_file)),
            ("tls_ca", path(&self.tls_ca)),
            ("tls_cert", path(&self.tls_cert)),
            ("tls_key", path(&self.tls_key)),
            ("tls_crl", path(&self.tls_crl)),
            ("operator_token_file", path(&self.operator_token_file)),
            ("insecure_no_auth", self.insecure_no_auth.map(|v| v.to_string())),
            ("max_body", self.max_body.map(|v| v.to_string())),
            ("header_timeout", self.header_timeout.map(|v| v.to_string())),
            ("max_connections", self.max_connections.map(|v| v.to_string())),
            ("default_path_rate", self.default_path_rate.map(|v| v.to_string())),
            ("lease_secs", self.lease_secs.map(|v| v.to_string())),
            ("log_format", self.log_format.map(|f| f.as_str().to_string())),
        ];
        pairs.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect()
    }
}

impl Args {
    /// Parses `argv` over the configuration file's values; a bad file is an
    /// error naming it and the key, before anything starts.
    pub fn parse_with_config(argv: Vec<OsString>) -> anyhow::Result<Args> {
        let (path, required) = config::choose_file(
            &argv,
            std::env::var_os("EDGESHIFT_COORDINATOR_CONFIG"),
            Path::new(DEFAULT_PATH),
        );
        let file: CoordinatorFile = match std::fs::read_to_string(&path) {
            Ok(text) => config::parse(&text, &path)?,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => CoordinatorFile::default(),
            Err(e) => {
                return Err(ConfigError::Unreadable {
                    file: path,
                    reason: e.to_string(),
                })
                .context("the coordinator's configuration")
            }
        };
        let cmd = config::apply_defaults(Args::command(), &file.defaults());
        let matches = cmd.get_matches_from(argv);
        Ok(Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistent_and_the_packaged_file_documents_every_key() {
        Args::command().debug_assert();
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/coordinator.toml");
        let text = std::fs::read_to_string(&path).expect("packaging/coordinator.toml");
        let file: CoordinatorFile = config::parse(&text, &path).expect("parses");
        assert_eq!(
            file.data.as_deref(),
            Some(Path::new("/var/lib/edgeshift-coordinator"))
        );
        let all: String = text
            .lines()
            .map(|l| l.strip_prefix("# ").filter(|r| r.contains(" = ")).unwrap_or(l))
            .map(|l| format!("{l}\n"))
            .collect();
        let all: CoordinatorFile = config::parse(&all, &path).expect("every documented key parses");
        // All but `token_file`, which is only read to refuse it by name.
        assert_eq!(all.defaults().len(), 14, "a key is not documented");
        let m = config::apply_defaults(Args::command(), &all.defaults())
            .try_get_matches_from(["c", "--lease-secs", "5"])
            .expect("parses");
        let a = Args::from_arg_matches(&m).expect("args");
        assert_eq!(
            (a.lease_secs, a.max_body),
            (5, 33554432),
            "flag over file, file over built-in"
        );
    }
}
