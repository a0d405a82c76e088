//! `cargo xtask …`: build glue. `build-ebpf` compiles the dirty tracker's BPF
//! object (being built: see issue 5).

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "edgeshift build glue")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compile the dirty tracker's BPF object from ebpf/src with clang.
    BuildEbpf,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::BuildEbpf => anyhow::bail!("build-ebpf is not built yet"),
    }
}
