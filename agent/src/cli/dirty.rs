//! `edgeshift dirty` (being built).

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`edgeshift dirty` is not built yet")
}
