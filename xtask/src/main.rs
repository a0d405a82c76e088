//! `cargo xtask …`: build glue.
//!
//! - `build-ebpf` compiles the dirty tracker's BPF object with the same
//!   recipe `agent/build.rs` runs ([`edgeshift_ebpf::build_object`]).
//! - `deb` builds the Debian package (`deb.rs`).
//! - `ci` is what CI runs (`.ci/run` and the README's test command): style,
//!   lints, then every test, then (under CI=true) the fuzz targets for a
//!   bounded time, stopping at the first step that fails.
//! - `fuzz` runs the fuzz targets of `fuzz/` for a bounded time (`fuzz.rs`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

mod deb;
mod fuzz;

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
    /// Build the Debian package (target/debian/edgeshift_VERSION_ARCH.deb):
    /// both binaries, systemd units, commented default configurations in
    /// /etc/edgeshift, /var/lib/edgeshift. Prints its path.
    Deb {
        /// Use the binaries already in --bin-dir instead of running `cargo
        /// build --release` (CI reuses its test step's).
        #[arg(long)]
        no_build: bool,
        /// Where the release binaries are (default: target/release).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Output directory (default: target/debian).
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Run CI's checks in order: `cargo fmt --check`, `cargo clippy
    /// --workspace --all-targets -- -D warnings`, then `cargo test
    /// --workspace --release`. Stops at the first failure with a non-zero
    /// exit. Needs root for the tests that use namespaces, QEMU and eBPF
    /// (run `.ci/setup` first; under CI=true a missing capability fails).
    Ci {
        /// Only the style and lint steps, no tests.
        #[arg(long)]
        no_tests: bool,
        /// Extra arguments passed to `cargo test` after `--` (a test name filter, say).
        #[arg(last = true)]
        test_args: Vec<String>,
    },
    /// Build the fuzz targets (`cargo +nightly fuzz`, fuzz/) and run each
    /// for a bounded time; a crash fails and names the saved input.
    /// `cargo xtask ci` runs it with CI=true (docs/fuzzing.md).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 30)]
        seconds: u32,
        /// Only these targets (default: frame, manifest, delta, control).
        #[arg(long, value_delimiter = ',')]
        targets: Vec<String>,
        /// Also build the agent crate and its `migrate_control` target.
        #[arg(long)]
        with_agent: bool,
    },
}

/// Seconds per fuzz target when CI runs them: four targets and the nightly
/// build stay within about three minutes (docs/fuzzing.md).
const CI_FUZZ_SECONDS: u32 = 20;

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs one cargo step in the workspace root, timing it.
fn cargo_step(name: &str, args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("==> {name}: cargo {}", args.join(" "));
    let start = Instant::now();
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("starting {cargo}"))?;
    let secs = start.elapsed().as_secs_f64();
    if !status.success() {
        bail!("{name} failed after {secs:.0} s ({status})");
    }
    eprintln!("==> {name}: passed in {secs:.0} s");
    Ok(())
}

fn ci(no_tests: bool, test_args: &[String]) -> anyhow::Result<()> {
    cargo_step("format", &["fmt", "--all", "--", "--check"])?;
    cargo_step(
        "lints",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--release",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    if no_tests {
        return Ok(());
    }
    // The tests never read this host's installed configuration
    // (/etc/edgeshift/*.toml of an installed package would otherwise be
    // every test daemon's defaults); an empty file is a valid one.
    std::env::set_var("EDGESHIFT_CONFIG", "/dev/null");
    std::env::set_var("EDGESHIFT_COORDINATOR_CONFIG", "/dev/null");
    let mut args = vec!["test", "--workspace", "--release"];
    if !test_args.is_empty() {
        args.push("--");
        args.extend(test_args.iter().map(String::as_str));
    }
    cargo_step("tests", &args)?;
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        let targets: Vec<String> = fuzz::TARGETS.iter().map(|t| t.to_string()).collect();
        fuzz::run(&workspace_root(), CI_FUZZ_SECONDS, &targets, false)?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::BuildEbpf { out_dir } => {
            let out_dir = out_dir.unwrap_or_else(|| workspace_root().join("target/bpf"));
            let object = edgeshift_ebpf::build_object(&out_dir)?;
            let object = object.canonicalize().unwrap_or(object);
            println!("{}", object.display());
            Ok(())
        }
        Cmd::Deb {
            no_build,
            bin_dir,
            out_dir,
        } => {
            let root = workspace_root();
            if !no_build {
                cargo_step(
                    "release build",
                    &[
                        "build",
                        "--release",
                        "-p",
                        "edgeshift-agent",
                        "-p",
                        "edgeshift-coordinator",
                    ],
                )?;
            }
            let bin_dir = bin_dir.unwrap_or_else(|| root.join("target/release"));
            let out_dir = out_dir.unwrap_or_else(|| root.join("target/debian"));
            let deb = deb::build(&root, &bin_dir, &out_dir)?;
            println!("{}", deb.display());
            Ok(())
        }
        Cmd::Ci { no_tests, test_args } => ci(no_tests, &test_args),
        Cmd::Fuzz {
            seconds,
            targets,
            with_agent,
        } => {
            let mut targets = targets;
            if targets.is_empty() {
                targets = fuzz::TARGETS.iter().map(|t| t.to_string()).collect();
                if with_agent {
                    targets.push("migrate_control".into());
                }
            }
            fuzz::run(&workspace_root(), seconds, &targets, with_agent)
        }
    }
}
