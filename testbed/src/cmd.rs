//! Running helper programs (`ip`, `tc`) with errors that carry their stderr.

use std::process::Command;

use crate::TestbedError;

/// Runs `cmd` to completion; its stdout on success, or an error holding the
/// command line, exit status and stderr.
pub fn run(cmd: &mut Command) -> Result<String, TestbedError> {
    let line = describe(cmd);
    tracing::debug!(cmd = %line, "run");
    let out = cmd.output().map_err(|source| TestbedError::Spawn {
        cmd: line.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(TestbedError::Command {
            cmd: line,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}
