//! `edgeshift migrate` (being built).

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`edgeshift migrate` is not built yet")
}
