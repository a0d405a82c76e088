//! Command-line front end. One file per subcommand, each with its `Args` and
//! `run`; this file only dispatches. `anyhow` lives here and nowhere below.

use clap::{Parser, Subcommand};

mod agent;
mod args;
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
}

pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
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
    }
}
