//! `edgeshift restore` (being built: see issue 2).

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`edgeshift restore` is not built yet")
}
