//! `edgeshift cluster`: makes the cluster's identity files: the CA, a
//! certificate per edge, coordinator and operator, and the revocation list.
//! Keys are written mode 0600 and no existing file is ever overwritten.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use edgeshift_common::identity::{self, IssuedPem, Role};

/// Make and manage the cluster's certificates (mutual TLS between edges,
/// the coordinator and operators).
///
/// Files of a cluster directory (--dir): `ca.pem` (the CA certificate:
/// copy it to every host), `ca.key` (the CA's private key, mode 0600: keep
/// it on the operator's machine only), `crl.pem` (revoked certificates:
/// copy it to every host, as `tls_crl`). `issue` writes NAME.pem and
/// NAME.key (mode 0600) into --out; on an edge they become
/// /etc/edgeshift/tls/cert.pem and key.pem beside ca.pem.
///
/// A CA rollover without downtime: (1) `edgeshift cluster init --dir NEW`;
/// (2) append NEW/ca.pem to ca.pem on every host (two CAs in one file are
/// both trusted) and restart its agent; (3) issue every host a certificate
/// with `--dir NEW`, install it and restart the agent, host by host;
/// (4) remove the old CA from ca.pem everywhere.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Make a new cluster CA: DIR/ca.pem and DIR/ca.key (refuses to overwrite).
    Init {
        /// The cluster directory to create or fill.
        #[arg(long)]
        dir: PathBuf,
        /// The cluster's name, written in the CA's subject.
        #[arg(long, default_value = "edgeshift")]
        name: String,
        /// How long the CA is valid, in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a certificate signed by DIR's CA: OUT/NAME.pem and OUT/NAME.key.
    Issue {
        #[command(flatten)]
        issue: IssueArgs,
        /// What the holder is: edge (server and client), coordinator
        /// (server; give its host names as --san) or operator (client).
        #[arg(long, value_parser = parse_role)]
        role: Role,
    },
    /// Same as `issue --role edge NAME`: an edge's certificate (NAME = its --id).
    AddEdge {
        #[command(flatten)]
        issue: IssueArgs,
    },
    /// Revoke certificates: adds them to DIR/crl.pem (made if absent).
    Revoke {
        /// The cluster directory (its ca.pem and ca.key sign the list).
        #[arg(long)]
        dir: PathBuf,
        /// The certificates (PEM files) to revoke.
        #[arg(required = true)]
        certs: Vec<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct IssueArgs {
    /// The cluster directory holding ca.pem and ca.key.
    #[arg(long)]
    dir: PathBuf,
    /// The holder's name: an edge's id, a coordinator's or operator's name.
    name: String,
    /// Extra names the certificate is valid for (DNS names or IP
    /// addresses), e.g. the coordinator's host name; repeatable.
    #[arg(long = "san")]
    sans: Vec<String>,
    /// How long the certificate is valid, in days.
    #[arg(long, default_value_t = 825)]
    days: u32,
    /// Where to write NAME.pem and NAME.key (default: --dir).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse().map_err(|e: identity::IdentityError| e.to_string())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Init { dir, name, days } => init(&dir, &name, days),
        Command::Issue { issue: a, role } => issue(&a, role),
        Command::AddEdge { issue: a } => issue(&a, Role::Edge),
        Command::Revoke { dir, certs } => revoke(&dir, &certs),
    }
}

/// Writes `text` to a new file (never over an existing one) with `mode`.
fn write_new(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                anyhow::anyhow!(
                    "{} exists; refusing to overwrite it (move it away first)",
                    path.display()
                )
            }
            _ => anyhow::Error::new(e).context(format!("creating {}", path.display())),
        })?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn refuse_existing(paths: &[&Path]) -> anyhow::Result<()> {
    for p in paths {
        if p.exists() {
            bail!(
                "{} exists; refusing to overwrite it (move it away first)",
                p.display()
            );
        }
    }
    Ok(())
}

fn init(dir: &Path, name: &str, days: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    refuse_existing(&[&cert, &key])?;
    let ca = identity::new_ca(name, days)?;
    write_new(&key, &ca.key_pem, 0o600)?;
    write_new(&cert, &ca.cert_pem, 0o644)?;
    println!("{}", cert.display());
    println!("{}", key.display());
    Ok(())
}

fn load_ca(dir: &Path) -> anyhow::Result<IssuedPem> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read_to_string(&p).with_context(|| {
            format!(
                "reading {} (make it with `edgeshift cluster init --dir {}`)",
                p.display(),
                dir.display()
            )
        })
    };
    Ok(IssuedPem {
        cert_pem: read("ca.pem")?,
        key_pem: read("ca.key")?,
    })
}

fn issue(a: &IssueArgs, role: Role) -> anyhow::Result<()> {
    identity::check_name(&a.name)?;
    let out = a.out.as_deref().unwrap_or(&a.dir);
    let (cert, key) = (
        out.join(format!("{}.pem", a.name)),
        out.join(format!("{}.key", a.name)),
    );
    refuse_existing(&[&cert, &key])?;
    let ca = load_ca(&a.dir)?;
    let issued = identity::issue(&ca, role, &a.name, &a.sans, a.days)
        .with_context(|| format!("issuing with the CA in {}", a.dir.display()))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_new(&key, &issued.key_pem, 0o600)?;
    write_new(&cert, &issued.cert_pem, 0o644)?;
    println!("{}", cert.display());
    println!("{}", key.display());
    Ok(())
}

fn revoke(dir: &Path, certs: &[PathBuf]) -> anyhow::Result<()> {
    let ca = load_ca(dir)?;
    let pems = certs
        .iter()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let crl_path = dir.join("crl.pem");
    let previous = match std::fs::read_to_string(&crl_path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", crl_path.display())),
    };
    let crl = identity::revoke(&ca, &pems, previous.as_deref())?;
    // Replaced whole (rename), so a reader never sees half a list.
    let tmp = dir.join("crl.pem.tmp");
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, &crl, 0o644)?;
    std::fs::rename(&tmp, &crl_path).with_context(|| format!("replacing {}", crl_path.display()))?;
    println!("{}", crl_path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use edgeshift_common::identity::{Credentials, TlsFiles};

    fn run_line(line: &[&str]) -> anyhow::Result<()> {
        use clap::Parser;
        #[derive(Debug, clap::Parser)]
        struct Probe {
            #[command(flatten)]
            args: Args,
        }
        let argv = std::iter::once("x").chain(line.iter().copied());
        run(Probe::try_parse_from(argv)?.args)
    }

    #[test]
    fn init_issue_revoke_make_loadable_files_and_never_overwrite() {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("cluster");
        let d = dir.to_str().expect("utf-8");
        run_line(&["init", "--dir", d]).expect("init");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join("ca.key")), 0o600);
        let e = run_line(&["init", "--dir", d]).expect_err("second init");
        assert!(e.to_string().contains("refusing to overwrite"), "{e}");
        run_line(&["add-edge", "--dir", d, "e1", "--san", "10.0.0.1"]).expect("add-edge");
        run_line(&["issue", "--dir", d, "--role", "operator", "alice"]).expect("issue");
        assert_eq!(mode(&dir.join("e1.key")), 0o600);
        assert!(run_line(&["add-edge", "--dir", d, "e1"]).is_err(), "overwrote e1");
        assert!(run_line(&["issue", "--dir", d, "--role", "boss", "x"]).is_err());
        let files = |crl: Option<PathBuf>| TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("e1.pem"),
            key: dir.join("e1.key"),
            crl,
        };
        let creds = Credentials::load(&files(None)).expect("load e1");
        assert_eq!(creds.identity().name, "e1");
        let e1 = dir.join("e1.pem");
        run_line(&["revoke", "--dir", d, e1.to_str().expect("utf-8")]).expect("revoke");
        Credentials::load(&files(Some(dir.join("crl.pem")))).expect("load with the crl");
        let none = t.path().join("nowhere");
        let e = run_line(&["add-edge", "--dir", none.to_str().expect("utf-8"), "e2"]).expect_err("no CA");
        assert!(format!("{e:#}").contains("edgeshift cluster init"), "{e:#}");
    }
}
