//! The cluster's identity: one CA (or two during a rollover), a certificate
//! per edge, coordinator and operator, and the rustls configurations every
//! TLS endpoint of edgeshift builds from them.
//!
//! A certificate's subject names its holder: CN = the name (an edge's id),
//! OU = its [`Role`]. Peers learn each other's name from the certificate
//! (never from anything the peer says), so a connection's identity is bound
//! to the session's keys. Issuing (the `edgeshift cluster` CLI and tests'
//! throwaway clusters) lives in [`issue`](self::issue); only
//! [rustls](https://docs.rs/rustls) with the ring provider does cryptography.

mod issue;
mod throwaway;
mod verify;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

pub use issue::{issue, issue_with_validity, new_ca, revoke, IssuedPem};
pub use throwaway::ThrowawayCluster;
pub use verify::EdgeServerVerifier;

/// Errors from loading, checking or issuing cluster credentials.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {reason} (make the cluster's files with `edgeshift cluster init` and `edgeshift cluster add-edge NAME`)")]
    File { path: PathBuf, reason: String },
    #[error("certificate: {0}")]
    BadCertificate(String),
    #[error("the certificate's subject has no {0}")]
    MissingSubjectField(&'static str),
    #[error("unknown role {0:?} in the certificate's OU (edge, coordinator or operator)")]
    UnknownRole(String),
    #[error("invalid name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("issuing: {0}")]
    Issue(String),
}

/// What a certificate lets its holder be; the subject's OU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Edge,
    Coordinator,
    Operator,
}

impl Role {
    /// The OU string, as written in certificates and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Edge => "edge",
            Role::Coordinator => "coordinator",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "edge" => Ok(Role::Edge),
            "coordinator" => Ok(Role::Coordinator),
            "operator" => Ok(Role::Operator),
            other => Err(IdentityError::UnknownRole(other.to_string())),
        }
    }
}

/// Who is on the other end of a verified connection (or who we are).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    pub role: Role,
    /// The subject's CN: an edge's id, a coordinator's or operator's name.
    pub name: String,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
}

/// Where the cluster files are; QEMU's `tls-creds-x509` objects read them too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// One or more CA certificates (two during a rollover: both trusted).
    pub ca: PathBuf,
    /// Our certificate (optionally followed by its chain).
    pub cert: PathBuf,
    /// Our private key (PKCS#8 PEM).
    pub key: PathBuf,
    /// Revoked certificates, one CRL per CA, PEM.
    pub crl: Option<PathBuf>,
}

impl TlsFiles {
    /// The packaged defaults under `/etc/edgeshift/tls`.
    pub fn default_paths() -> Self {
        let dir = Path::new("/etc/edgeshift/tls");
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            crl: None,
        }
    }
}

/// Loaded and checked credentials, with the rustls configurations made from
/// them once (so a bad file fails at load, not at the first connection).
pub struct Credentials {
    files: TlsFiles,
    identity: PeerIdentity,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    edge_client: Arc<ClientConfig>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The configurations hold the private key: print only where it is.
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// The crypto provider of every edgeshift TLS endpoint: ring, with
/// AES-128-GCM preferred (the cheapest suite with AES-NI; docs/wire.md).
pub fn provider() -> Arc<CryptoProvider> {
    // Deprecated only for lacking post-quantum key exchange; ring is the
    // project's provider (aws-lc takes too long to build on the edges).
    #[allow(deprecated)]
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        _ => 2,
    });
    Arc::new(p)
}

fn read_file(path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|e| IdentityError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn file_error(path: &Path, reason: impl Into<String>) -> IdentityError {
    IdentityError::File {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn certs_in(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let bytes = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn crls_in(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, IdentityError> {
    let bytes = read_file(path)?;
    CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, format!("not PEM CRLs: {e}")))
}

impl Credentials {
    /// Reads and checks the files; every error names the file it is about.
    pub fn load(files: &TlsFiles) -> Result<Self, IdentityError> {
        // This edge's own files first: on a host not yet set up, the error
        // then names the file the operator gave.
        let chain = certs_in(&files.cert)?;
        let key_bytes = read_file(&files.key)?;
        let cas = certs_in(&files.ca)?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes)
            .map_err(|e| file_error(&files.key, format!("not a PEM private key: {e}")))?;
        let crls = match &files.crl {
            Some(path) => crls_in(path)?,
            None => Vec::new(),
        };
        let identity = identity_of(&chain[0]).map_err(|e| file_error(&files.cert, e.to_string()))?;
        let mut roots = RootCertStore::empty();
        for ca in &cas {
            roots
                .add(ca.clone())
                .map_err(|e| file_error(&files.ca, format!("not a usable CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let provider = provider();
        let tls = |e: rustls::Error| IdentityError::Tls(e.to_string());

        // Revocation: only leaf certificates are issued under a cluster CA, and
        // during a rollover the CRL file may hold a CRL of one CA only, so a
        // certificate of the other CA has an unknown (not revoked) status.
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .with_crls(crls.clone())
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(tls)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| {
                file_error(
                    &files.key,
                    format!("does not go with {}: {e}", files.cert.display()),
                )
            })?;
        // No session resumption: connections are long-lived, and a ticket
        // arriving on an idle pooled connection would read as unasked bytes.
        server.send_tls13_tickets = 0;

        let server_verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .with_crls(crls)
                .only_check_end_entity_revocation()
                .allow_unknown_revocation_status()
                .build()
                .map_err(|e| IdentityError::Tls(e.to_string()))?;
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(tls)?
            .with_webpki_verifier(server_verifier.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(tls)?;
        let edge_client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(tls)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EdgeServerVerifier::new(server_verifier)))
            .with_client_auth_cert(chain, key)
            .map_err(tls)?;
        Ok(Credentials {
            files: files.clone(),
            identity,
            server: Arc::new(server),
            client: Arc::new(client),
            edge_client: Arc::new(edge_client),
        })
    }

    /// Who our certificate says we are.
    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }

    /// The files these were loaded from (QEMU's `tls-creds-x509` reads them).
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// A server that requires a client certificate chaining to a cluster CA
    /// and not revoked. Any role is let in: the caller checks
    /// [`peer_identity`] against what it serves.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// A client that presents our certificate and checks the server's chain,
    /// revocation and that it is valid for the server name dialled.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// A client for edge-to-edge connections, which are dialled by address:
    /// the server must hold a valid, unrevoked **edge** certificate of the
    /// cluster, whatever server name is passed; its name is then read with
    /// [`peer_identity`].
    pub fn edge_client_config(&self) -> Arc<ClientConfig> {
        self.edge_client.clone()
    }
}

/// The identity of the peer of a finished handshake (`conn.peer_certificates()`).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<PeerIdentity, IdentityError> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or_else(|| IdentityError::BadCertificate("the peer presented none".into()))?;
    identity_of(leaf)
}

/// Role and name from a certificate's subject (OU and CN). It does not
/// verify the certificate: use it on one a handshake verified.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<PeerIdentity, IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let subject = parsed.subject();
    fn first<'a>(
        mut it: impl Iterator<Item = &'a x509_parser::x509::AttributeTypeAndValue<'a>>,
        what: &'static str,
    ) -> Result<String, IdentityError> {
        it.next()
            .and_then(|a| a.as_str().ok())
            .map(str::to_string)
            .ok_or(IdentityError::MissingSubjectField(what))
    }
    let name = first(subject.iter_common_name(), "common name (CN)")?;
    let role = first(subject.iter_organizational_unit(), "organizational unit (OU)")?.parse()?;
    check_name(&name)?;
    Ok(PeerIdentity { role, name })
}

/// Names become DNS SANs, file names and log fields: letters, digits, `.`,
/// `-` and `_`, at most 63 bytes, not starting with a dot or dash.
pub fn check_name(name: &str) -> Result<(), IdentityError> {
    let bad = |reason| IdentityError::BadName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() || name.len() > 63 {
        return Err(bad("must be 1 to 63 characters"));
    }
    if name.starts_with(['.', '-']) {
        return Err(bad("must not start with '.' or '-'"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(bad("only letters, digits, '.', '-' and '_'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
