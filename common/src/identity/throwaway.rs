//! [`ThrowawayCluster`]: a CA and certificates written to a directory in
//! one call, for tests, benchmarks and the demo (which run with TLS on).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{issue, new_ca, Credentials, IdentityError, IssuedPem, Role, TlsFiles};

/// A cluster CA in `dir` (ca.pem, ca.key) that issues certificates on demand.
#[derive(Debug)]
pub struct ThrowawayCluster {
    dir: PathBuf,
    ca: IssuedPem,
    /// Names issued by this CA (files left in `dir` by an earlier one are
    /// issued again, not reused).
    issued: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl ThrowawayCluster {
    /// Makes a CA valid for a day and writes it into `dir` (created if absent).
    pub fn new(dir: &Path) -> Result<Self, IdentityError> {
        let ca = new_ca("test", 1)?;
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        write(&dir.join("ca.pem"), &ca.cert_pem)?;
        write(&dir.join("ca.key"), &ca.key_pem)?;
        Ok(ThrowawayCluster {
            dir: dir.to_path_buf(),
            ca,
            issued: Default::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca(&self) -> &IssuedPem {
        &self.ca
    }

    /// Issues (or reuses, when this CA issued it already) `name`'s certificate in
    /// `role`, valid for `sans` too; returns its files.
    pub fn files(&self, role: Role, name: &str, sans: &[String]) -> Result<TlsFiles, IdentityError> {
        let files = TlsFiles {
            ca: self.dir.join("ca.pem"),
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
            crl: None,
        };
        let mut issued = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        if issued.insert(name.to_string()) {
            let issued = issue(&self.ca, role, name, sans, 1)?;
            write(&files.key, &issued.key_pem)?;
            write(&files.cert, &issued.cert_pem)?;
        }
        Ok(files)
    }

    /// An edge's files (DNS SAN = name, plus 127.0.0.1).
    pub fn edge_files(&self, name: &str) -> Result<TlsFiles, IdentityError> {
        self.files(Role::Edge, name, &["127.0.0.1".to_string()])
    }

    /// `edgeshift` flags naming an edge's files (issued on first use).
    pub fn cli_args(&self, name: &str) -> Result<Vec<String>, IdentityError> {
        let f = self.edge_files(name)?;
        let path = |p: &Path| p.display().to_string();
        Ok(vec![
            "--tls-ca".into(),
            path(&f.ca),
            "--tls-cert".into(),
            path(&f.cert),
            "--tls-key".into(),
            path(&f.key),
        ])
    }

    /// An edge's loaded credentials.
    pub fn edge(&self, name: &str) -> Result<Arc<Credentials>, IdentityError> {
        Ok(Arc::new(Credentials::load(&self.edge_files(name)?)?))
    }
}

fn io(path: &Path, e: std::io::Error) -> IdentityError {
    IdentityError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn write(path: &Path, text: &str) -> Result<(), IdentityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io(path, e))?;
    f.write_all(text.as_bytes()).map_err(|e| io(path, e))
}
