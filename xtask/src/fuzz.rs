//! `cargo xtask fuzz`: builds the fuzz targets of `fuzz/` with `cargo fuzz`
//! on nightly and runs each for a bounded time. CI runs it after the tests
//! (docs/fuzzing.md). A crash fails the step and names the input libFuzzer
//! saved, to be kept as a regression test in the normal suite.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};

/// The targets CI runs (`migrate_control` needs the agent crate's build:
/// `--with-agent`).
pub const TARGETS: &[&str] = &["frame", "manifest", "delta", "control"];

/// `rustup run nightly cargo fuzz ARGS` in `fuzz/`, with nothing of the
/// outer (stable) cargo's environment that would pick its toolchain.
fn cargo_fuzz(fuzz_dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", "cargo", "fuzz"])
        .args(args)
        .current_dir(fuzz_dir);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO",
        "CARGO_TARGET_DIR",
    ] {
        c.env_remove(var);
    }
    c
}

/// Builds the targets, then runs each of `targets` for `seconds`.
pub fn run(root: &Path, seconds: u32, targets: &[String], with_agent: bool) -> anyhow::Result<()> {
    let fuzz_dir = root.join("fuzz");
    let probe = cargo_fuzz(&fuzz_dir, &["--version"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        bail!(
            "`cargo +nightly fuzz` is not available: install a nightly toolchain and cargo-fuzz \
             (`rustup toolchain install nightly --profile minimal && cargo install cargo-fuzz --locked`; .ci/setup does both)"
        );
    }
    let mut build = vec!["build", "-O"];
    if with_agent {
        build.extend(["--features", "agent"]);
    }
    step("fuzz build", cargo_fuzz(&fuzz_dir, &build))?;
    let max_time = format!("-max_total_time={seconds}");
    for target in targets {
        let mut args = vec!["run", "-O"];
        if with_agent {
            args.extend(["--features", "agent"]);
        }
        args.push(target);
        // Seeds kept in git (valid encodings) next to the corpus libFuzzer grows.
        let seeds = fuzz_dir.join("seeds").join(target);
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        let (corpus, seeds) = (corpus.display().to_string(), seeds.display().to_string());
        args.push(&corpus);
        if Path::new(&seeds).is_dir() {
            args.push(&seeds);
        }
        args.extend([
            "--",
            &max_time,
            "-rss_limit_mb=2048",
            "-timeout=10",
            "-print_final_stats=1",
        ]);
        step(
            &format!("fuzz {target} for {seconds} s"),
            cargo_fuzz(&fuzz_dir, &args),
        )
        .with_context(|| {
            format!(
                "fuzz target {target} found a crash: the input is in fuzz/artifacts/{target}/; \
                 keep it as a regression test (common/tests/hostile_input.rs) and fix the decoder"
            )
        })?;
    }
    Ok(())
}

fn step(name: &str, mut cmd: Command) -> anyhow::Result<()> {
    eprintln!("==> {name}");
    let start = Instant::now();
    let status = cmd.status().with_context(|| format!("starting {name}"))?;
    let secs = start.elapsed().as_secs_f64();
    if !status.success() {
        bail!("{name} failed after {secs:.0} s ({status})");
    }
    eprintln!("==> {name}: passed in {secs:.0} s");
    Ok(())
}
