//! The daemons' configuration files: TOML text checked against a typed
//! struct, with errors that name the file and the key, and the rule that
//! puts a file's values under the command line.
//!
//! Precedence, the same for every key of both daemons: the file's value
//! replaces the built-in default, an `EDGESHIFT_*` variable replaces the
//! file's, a flag replaces both. The file's values become the clap
//! arguments' defaults ([`apply_defaults`]), so clap's own order (flag, then
//! `env`, then default) does the merge and no flag's default can hide a
//! value from the file. Reading the file is the caller's job: nothing here
//! does I/O.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// One key's value is wrong (or the key is unknown).
    #[error("{file}: line {line}: key `{key}`: {reason}")]
    Key {
        file: PathBuf,
        line: usize,
        key: String,
        reason: String,
    },
    /// The text is not TOML at all.
    #[error("{file}: {reason}")]
    Syntax { file: PathBuf, reason: String },
    /// The file was asked for but could not be read.
    #[error("reading the configuration file {file}: {reason}")]
    Unreadable { file: PathBuf, reason: String },
}

/// Parses `text` (the contents of `file`) into `T`; `T` should deny unknown
/// fields so that a misspelt key is an error, not silently ignored.
pub fn parse<T: DeserializeOwned>(text: &str, file: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let reason = e.message().trim().to_string();
        let Some(span) = e.span() else {
            return ConfigError::Syntax {
                file: file.to_path_buf(),
                reason,
            };
        };
        let start = span.start.min(text.len());
        let line_no = text[..start].matches('\n').count() + 1;
        let line = text.lines().nth(line_no - 1).unwrap_or_default();
        match line.split_once('=') {
            Some((key, _)) if !key.trim().is_empty() && !key.trim_start().starts_with('[') => {
                ConfigError::Key {
                    file: file.to_path_buf(),
                    line: line_no,
                    key: key.trim().trim_matches('"').to_string(),
                    reason,
                }
            }
            _ => ConfigError::Syntax {
                file: file.to_path_buf(),
                reason: format!("line {line_no}: {reason}"),
            },
        }
    })
}

/// Which configuration file a command line names: `--config PATH` (or
/// `--config=PATH`) in `argv`, else `env_value` (the daemon's
/// `EDGESHIFT_*CONFIG` variable); both must exist. Else `default`, used
/// only if it exists. The bool says whether the file must exist.
pub fn choose_file(argv: &[OsString], env_value: Option<OsString>, default: &Path) -> (PathBuf, bool) {
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        if a == "--config" {
            if let Some(p) = it.next() {
                return (PathBuf::from(p), true);
            }
        } else if let Some(p) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return (PathBuf::from(p), true);
        }
    }
    match env_value {
        Some(p) if !p.is_empty() => (PathBuf::from(p), true),
        _ => (default.to_path_buf(), false),
    }
}

/// Makes each `(argument id, value)` the default of every option (`--x`,
/// never a positional) with that id, in `cmd` and all its subcommands: a
/// file's values sit under the `env` variables and flags clap reads first.
/// An option required on the command line is not once the file gives it.
pub fn apply_defaults(cmd: clap::Command, defaults: &[(&'static str, String)]) -> clap::Command {
    let cmd = cmd.mut_args(|arg| {
        let found = arg
            .get_long()
            .and_then(|_| defaults.iter().find(|(id, _)| arg.get_id() == *id));
        match found {
            Some((_, v)) => arg.default_value(v.clone()).required(false),
            None => arg,
        }
    });
    cmd.mut_subcommands(|sub| apply_defaults(sub, defaults))
}

/// Deserializes a size written as bytes (`1073741824`) or with a unit
/// (`"200GiB"`), for `#[serde(deserialize_with = ...)]` on an `Option<u64>`.
pub fn size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match <Size as serde::Deserialize>::deserialize(d)? {
        Size::Bytes(b) => Ok(Some(b)),
        Size::Text(t) => crate::parse_size(&t)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("{e} (write e.g. \"200GiB\")"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Probe {
        listen: Option<std::net::SocketAddr>,
        #[serde(default, deserialize_with = "size")]
        capacity: Option<u64>,
    }

    fn err(text: &str) -> String {
        parse::<Probe>(text, Path::new("/etc/x.toml"))
            .expect_err("bad config accepted")
            .to_string()
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let ok: Probe =
            parse("listen = \"0.0.0.0:7\"\ncapacity = \"2KiB\"\n", Path::new("f")).expect("parses");
        assert_eq!(ok.capacity, Some(2048));
        assert!(ok.listen.is_some());
        let e = err("# c\nlisten = \"nowhere\"\n");
        assert!(e.starts_with("/etc/x.toml: line 2: key `listen`:"), "{e}");
        let e = err("capacity = \"lots\"\n");
        assert!(e.contains("key `capacity`") && e.contains("200GiB"), "{e}");
        let e = err("lisen = \"0.0.0.0:7\"\n");
        assert!(e.contains("key `lisen`") && e.contains("unknown field"), "{e}");
        let e = err("listen = \n");
        assert!(e.starts_with("/etc/x.toml:"), "{e}");
    }

    #[test]
    fn the_flag_beats_the_variable_which_beats_the_default() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let d = Path::new("/etc/d.toml");
        assert_eq!(
            choose_file(&os(&["x", "agent"]), None, d),
            (d.to_path_buf(), false)
        );
        assert_eq!(
            choose_file(&os(&["x", "agent"]), Some("/e".into()), d),
            ("/e".into(), true)
        );
        assert_eq!(
            choose_file(&os(&["x", "--config", "/f", "agent"]), Some("/e".into()), d),
            ("/f".into(), true)
        );
        assert_eq!(
            choose_file(&os(&["x", "agent", "--config=/g"]), None, d),
            ("/g".into(), true)
        );
    }

    #[test]
    fn file_values_sit_between_the_built_in_default_and_env_and_flags() {
        #[derive(clap::Parser, Debug)]
        struct Cli {
            #[command(subcommand)]
            sub: Sub,
        }
        #[derive(clap::Subcommand, Debug)]
        enum Sub {
            Run {
                #[arg(long, env = "EDGESHIFT_TEST_PRECEDENCE", default_value = "builtin")]
                mode: String,
                /// A positional of the same id keeps its value.
                #[arg(default_value = "p")]
                id: String,
                #[arg(long)]
                required: String,
            },
        }
        use clap::{CommandFactory, FromArgMatches};
        let mode = |argv: &[&str], file: Option<&str>| {
            let mut cmd = Cli::command();
            cmd = apply_defaults(cmd, &[("id", "e1".into()), ("required", "r".into())]);
            if let Some(v) = file {
                cmd = apply_defaults(cmd, &[("mode", v.to_string())]);
            }
            let m = cmd.try_get_matches_from(argv).expect("parses");
            let Sub::Run { mode, id, .. } = Cli::from_arg_matches(&m).expect("matches").sub;
            assert_eq!(id, "p");
            mode
        };
        assert_eq!(mode(&["x", "run"], None), "builtin");
        assert_eq!(mode(&["x", "run"], Some("file")), "file");
        assert_eq!(mode(&["x", "run", "--mode", "flag"], Some("file")), "flag");
        // The variable is read by clap itself; set only in this test.
        std::env::set_var("EDGESHIFT_TEST_PRECEDENCE", "env");
        assert_eq!(mode(&["x", "run"], Some("file")), "env");
        assert_eq!(mode(&["x", "run", "--mode", "flag"], Some("file")), "flag");
        std::env::remove_var("EDGESHIFT_TEST_PRECEDENCE");
    }
}
