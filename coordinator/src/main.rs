//! `edgeshift-coordinator` (being built: see issue 4).

use clap::Parser;

/// The edgeshift cache coordinator.
#[derive(Parser)]
#[command(version, about)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _ = Args::parse();
    anyhow::bail!("the coordinator is not built yet")
}
