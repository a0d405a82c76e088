//! `edgeshift-delayline --a IF --b IF --delay-us N [--jitter-us N]
//! [--reorder] [--loss-ppm N] [--limit-bytes N] [--seed N] [--stats FILE]`:
//! forwards every frame between interfaces IF and IF (both directions) after
//! a one-way delay. The testbed starts it inside a link's middle namespace
//! (see edgeshift_testbed::link); it runs until killed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use edgeshift_testbed::delayline::{run, Config, Shape};

const USAGE: &str = "usage: edgeshift-delayline --a IF --b IF --delay-us N [--jitter-us N] [--reorder] \
                     [--loss-ppm N] [--limit-bytes N] [--seed N] [--stats FILE]";

fn parse(args: &[String]) -> Result<Config, String> {
    let (mut a, mut b, mut stats) = (None, None, None);
    let (mut delay_us, mut jitter_us, mut loss_ppm) = (0u64, 0u64, 0u32);
    let mut limit_bytes = 32usize << 20;
    let mut reorder = false;
    let mut seed = u64::from(std::process::id()) << 20 ^ 0x5DEE_CE66;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--reorder" {
            reorder = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--a" => a = Some(value.clone()),
            "--b" => b = Some(value.clone()),
            "--delay-us" => delay_us = num(value)?,
            "--jitter-us" => jitter_us = num(value)?,
            "--loss-ppm" => {
                loss_ppm = u32::try_from(num(value)?).map_err(|_| "--loss-ppm too large".to_string())?
            }
            "--limit-bytes" => limit_bytes = usize::try_from(num(value)?).map_err(|e| e.to_string())?,
            "--seed" => seed = num(value)?,
            "--stats" => stats = Some(PathBuf::from(value)),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    let shape = Shape {
        delay: Duration::from_micros(delay_us),
        jitter: Duration::from_micros(jitter_us),
        reorder,
        loss_ppm,
        limit_bytes,
    };
    Ok(Config {
        a: a.ok_or("--a is required")?,
        b: b.ok_or("--b is required")?,
        a_to_b: shape,
        b_to_a: shape,
        stats,
        seed,
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match parse(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edgeshift-delayline: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgeshift-delayline: {e}");
            ExitCode::FAILURE
        }
    }
}
