//! QEMU's own TLS for the streams QEMU opens itself (the memory migration,
//! the disk mirror's NBD client): a per-VM directory that QEMU's
//! `tls-creds-x509` object reads the edge's cluster credentials from, the
//! QMP object ids, and the certificate name QEMU's `tls-authz` compares.
//!
//! The agent never hands QEMU anything but links to its own files: no key
//! is copied, and the directory is the VM's (mode 0700).

use std::os::unix::fs::{symlink, DirBuilderExt};
use std::path::{Path, PathBuf};

use edgeshift_common::identity::TlsFiles;

use super::VmError;

/// The `tls-creds-x509` object of a VM's QEMU (one per QEMU: the source
/// uses it for memory and the mirror's NBD client, the destination for
/// the incoming memory stream).
pub const TLS_CREDS_ID: &str = "edgeshift-tls";
/// The destination's `authz-simple` object: the one certificate name
/// whose memory stream it takes.
pub const TLS_AUTHZ_ID: &str = "edgeshift-authz";
/// The VM directory's subdirectory QEMU reads the credentials from.
const CREDS_DIR: &str = "tls";

/// Which side of a TLS session the credentials are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsEndpoint {
    /// Accepts (the destination's incoming migration).
    Server,
    /// Connects (the source's `migrate`, its NBD client).
    Client,
}

impl TlsEndpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsEndpoint::Server => "server",
            TlsEndpoint::Client => "client",
        }
    }
}

/// Makes `vm_dir/tls` (0700) hold links to this edge's `files` under the
/// names QEMU's `tls-creds-x509` looks for: `ca-cert.pem`,
/// `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
/// `client-key.pem` (one edge certificate serves both ends: it carries
/// serverAuth and clientAuth), and `ca-crl.pem` when the edge has a CRL. A
/// directory left from an earlier run is replaced. Returns its path.
pub fn creds_dir(vm_dir: &Path, files: &TlsFiles) -> Result<PathBuf, VmError> {
    let dir = vm_dir.join(CREDS_DIR);
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| VmError::Io { op, path, source }
    };
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io("remove old TLS directory", &dir))?;
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(io("create TLS directory", &dir))?;
    let f = files;
    let mut links: Vec<(&Path, &str)> = vec![
        (&f.ca, "ca-cert.pem"),
        (&f.cert, "server-cert.pem"),
        (&f.key, "server-key.pem"),
        (&f.cert, "client-cert.pem"),
        (&f.key, "client-key.pem"),
    ];
    if let Some(crl) = &f.crl {
        links.push((crl, "ca-crl.pem"));
    }
    for (target, name) in links {
        // Absolute: QEMU resolves the links from its own directory.
        let target = std::fs::canonicalize(target).map_err(io("find TLS file", target))?;
        let link = dir.join(name);
        symlink(&target, &link).map_err(io("link TLS file", &link))?;
    }
    Ok(dir)
}

/// The certificate name QEMU's `tls-authz` compares for the edge `name`'s
/// certificate, as QEMU 10's GnuTLS prints the subject: its RDNs in the
/// certificate's order (not RFC 4514's reversed one: QEMU logged
/// "authz check for O=edgeshift,OU=edge,CN=edge-src is denied" for the
/// reversed string), values escaped as RFC 4514 says. The subject is
/// `identity::issue`'s: O=edgeshift, OU=edge, CN=name.
pub fn authz_identity(name: &str) -> String {
    format!("O=edgeshift,OU=edge,CN={}", rfc4514_escape(name))
}

/// RFC 4514 value escaping: `,+"\<>;` always, `#` and a space at the start,
/// a space at the end.
fn rfc4514_escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && matches!(c, '#' | ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_creds_directory_links_every_name_qemu_reads() {
        let d = tempfile::tempdir().expect("tempdir");
        for f in ["ca.pem", "edge.pem", "edge.key", "crl.pem"] {
            std::fs::write(d.path().join(f), f).expect("write");
        }
        let files = TlsFiles {
            ca: d.path().join("ca.pem"),
            cert: d.path().join("edge.pem"),
            key: d.path().join("edge.key"),
            crl: Some(d.path().join("crl.pem")),
        };
        let vm = d.path().join("vm");
        // Twice: a directory left from an earlier run is replaced.
        creds_dir(&vm, &files).expect("first");
        let dir = creds_dir(&vm, &files).expect("again");
        let read = |n: &str| std::fs::read_to_string(dir.join(n)).expect(n);
        assert_eq!(read("ca-cert.pem"), "ca.pem");
        assert_eq!(read("server-cert.pem"), "edge.pem");
        assert_eq!(read("client-cert.pem"), "edge.pem");
        assert_eq!(read("server-key.pem"), "edge.key");
        assert_eq!(read("client-key.pem"), "edge.key");
        assert_eq!(read("ca-crl.pem"), "crl.pem");
        assert!(std::fs::symlink_metadata(dir.join("server-key.pem"))
            .expect("link")
            .file_type()
            .is_symlink());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir).expect("dir").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn a_missing_file_is_named() {
        let d = tempfile::tempdir().expect("tempdir");
        let files = TlsFiles {
            ca: d.path().join("nope.pem"),
            cert: d.path().join("edge.pem"),
            key: d.path().join("edge.key"),
            crl: None,
        };
        let err = creds_dir(d.path(), &files).expect_err("no CA file");
        assert!(err.to_string().contains("nope.pem"), "{err}");
    }

    #[test]
    fn the_authz_identity_is_the_subject_as_gnutls_prints_it() {
        assert_eq!(authz_identity("a,b"), "O=edgeshift,OU=edge,CN=a\\,b");
        assert_eq!(authz_identity("#x "), "O=edgeshift,OU=edge,CN=\\#x\\ ");
        // What an issued certificate's subject is, printed in the
        // certificate's order (as QEMU's GnuTLS does) by openssl.
        use edgeshift_common::identity::{issue, new_ca, Role};
        let ca = new_ca("test", 1).expect("ca");
        let edge = issue(&ca, Role::Edge, "edge-a", &[], 1).expect("edge");
        let d = tempfile::tempdir().expect("tempdir");
        let pem = d.path().join("edge.pem");
        std::fs::write(&pem, &edge.cert_pem).expect("write");
        let out = std::process::Command::new("openssl")
            .args([
                "x509",
                "-noout",
                "-subject",
                "-nameopt",
                "sep_comma_plus,esc_2253",
                "-in",
            ])
            .arg(&pem)
            .output()
            .expect("openssl runs");
        let printed = String::from_utf8_lossy(&out.stdout);
        assert_eq!(printed.trim(), format!("subject={}", authz_identity("edge-a")));
    }
}
