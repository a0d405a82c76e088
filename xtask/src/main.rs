//! `cargo xtask …`: build glue. `build-ebpf` compiles the dirty tracker's BPF
//! object with the same recipe `agent/build.rs` runs
//! ([`edgeshift_ebpf::build_object`]).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "edgeshift build glue")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compile the dirty tracker's BPF object from ebpf/src/dirty.bpf.c with
    /// clang (-target bpf -O2 -g, BTF included) and print its path.
    BuildEbpf {
        /// Output directory (default: target/bpf in the workspace).
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::BuildEbpf { out_dir } => {
            let out_dir =
                out_dir.unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bpf"));
            let object = edgeshift_ebpf::build_object(&out_dir)?;
            let object = object.canonicalize().unwrap_or(object);
            println!("{}", object.display());
            Ok(())
        }
    }
}
