//! Command-line front end. One file per subcommand, each with its `Args` and
//! `run`; this file only dispatches. `anyhow` lives here and nowhere below.

use std::ffi::OsString;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use edgeshift_common::service::LogFormat;

mod agent;
mod args;
mod cluster;
pub mod config;
mod dirty;
mod fetch;
mod inspect;
mod migrate;
mod restore;
mod slice;
mod vm;

/// edgeshift moves running VMs between edge servers: images as
/// content-addressed chunks, only what the destination lacks on the wire.
#[derive(Debug, Parser)]
#[command(name = "edgeshift", version, about, long_about = None)]
pub struct Cli {
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Configuration file (TOML, keys as in /etc/edgeshift/agent.toml, which
    /// is read when present and this is not given). Its values are every
    /// command's defaults; EDGESHIFT_* variables and flags override them.
    #[arg(long, global = true, env = "EDGESHIFT_CONFIG", value_name = "PATH")]
    pub config: Option<std::path::PathBuf>,
    /// Log lines as text (coloured only on a terminal) or JSON objects.
    #[arg(
        long,
        global = true,
        env = "EDGESHIFT_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Slice an image (raw file or block device) into chunks in a store; prints the manifest id last.
    Slice(slice::Args),
    /// Rebuild an image byte for byte from its manifest id.
    Restore(restore::Args),
    /// Show an image's figures: size, chunk size, chunks, unique and zero chunks.
    Inspect(inspect::Args),
    // Agent, Fetch and Migrate take their help from their Args' doc
    // comments, whose later paragraphs say what --coordinator does there.
    Agent(agent::Args),
    Fetch(fetch::Args),
    /// Watch a block device and report per-chunk write rates.
    Dirty(dirty::Args),
    /// Run, list and stop VMs on this edge.
    Vm(vm::Args),
    Migrate(migrate::Args),
    Cluster(cluster::Args),
}

impl Cli {
    /// Parses `argv` over the configuration file's values: a bad file is an
    /// error naming it and the key, before any command starts. Help and
    /// usage errors exit here, as with `Cli::parse`.
    pub fn parse_with_config(argv: Vec<OsString>) -> anyhow::Result<Cli> {
        let (_, file) = config::load(&argv)?;
        let cmd = edgeshift_common::config::apply_defaults(Cli::command(), &file.defaults());
        let matches = cmd.get_matches_from(argv);
        Ok(Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()))
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Slice(a) => slice::run(a),
        Command::Restore(a) => restore::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Agent(a) => agent::run(a),
        Command::Fetch(a) => fetch::run(a),
        Command::Dirty(a) => dirty::run(a),
        Command::Vm(a) => vm::run(a),
        Command::Migrate(a) => migrate::run(a),
        Command::Cluster(a) => cluster::run(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// clap's own consistency checks: among them, two arguments of one
    /// command keyed by the same name (a positional `id` beside the shared
    /// `--id` made `fetch ID` unusable once).
    #[test]
    fn every_command_is_consistent() {
        Cli::command().debug_assert();
    }

    /// The command lines DESIGN.md's contract promises parse as written.
    #[test]
    fn the_contracts_command_lines_parse() {
        let id = "ab".repeat(32);
        let lines: [&[&str]; 11] = [
            &["slice", "img", "--store", "s", "--chunk-size", "256KiB"],
            &["restore", &id, "--store", "s", "--out", "o"],
            &["inspect", &id, "--store", "s", "--json"],
            &[
                "agent",
                "--listen",
                "0.0.0.0:7070",
                "--store",
                "s",
                "--cluster-key-file",
                "k",
            ],
            &[
                "fetch",
                &id,
                "--store",
                "s",
                "--peer",
                "10.0.0.1:7070",
                "--peer",
                "10.0.0.2:7070",
                "--json",
                "--cluster-key-file",
                "k",
            ],
            &[
                "vm", "run", "v", "--image", &id, "--store", "s", "--net", "br0", "--accel", "tcg",
            ],
            &["vm", "list", "--json"],
            // Added with the service work: stop keeps the disk, start and rm.
            &["vm", "stop", "v"],
            &["vm", "start", "v"],
            &["vm", "rm", "v"],
            &[
                "migrate",
                "v",
                "--to",
                "10.0.0.2:7900",
                "--source-addr",
                "10.0.0.1:7070",
                "--cluster-key-file",
                "k",
                "--json",
            ],
        ];
        for line in lines {
            let argv = std::iter::once("edgeshift").chain(line.iter().copied());
            if let Err(e) = Cli::try_parse_from(argv) {
                panic!("`edgeshift {}` does not parse: {e}", line.join(" "));
            }
        }
        // The manifest id and this edge's id are different arguments.
        let cli = Cli::try_parse_from([
            "edgeshift",
            "fetch",
            &id,
            "--store",
            "s",
            "--peer",
            "10.0.0.1:7070",
            "--cluster-key-file",
            "k",
            "--id",
            "e2",
        ])
        .expect("fetch with --id parses");
        let Command::Fetch(f) = cli.command else {
            panic!("not a fetch");
        };
        let parsed = format!("{f:?}");
        assert!(parsed.contains("id: \"e2\""), "{parsed}");
    }
}
