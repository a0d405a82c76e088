//! The coordinator's HTTPS: the cluster's credentials (a `coordinator`
//! certificate), client certificates requested from every client but not
//! required, because the operator may come with a bearer token instead. The
//! routes decide what each caller may do ([`crate::access`]).

use std::sync::Arc;

use edgeshift_common::identity::{self, Credentials, IdentityError, Role, TlsFiles};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::access::{Caller, Peer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("{cert} is a certificate of {identity}, not of a coordinator (issue one with `edgeshift cluster issue --role coordinator NAME --san HOST`)")]
    NotCoordinator { cert: String, identity: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_err(path: &std::path::Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// The server configuration for `files`; every error names the file.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    // Load once with the shared checks (files readable, key matches, names valid).
    let creds = Credentials::load(files)?;
    if creds.identity().role != Role::Coordinator {
        return Err(TlsError::NotCoordinator {
            cert: files.cert.display().to_string(),
            identity: creds.identity().to_string(),
        });
    }
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&files.ca).map_err(|e| file_err(&files.ca, e))? {
        roots
            .add(ca.map_err(|e| file_err(&files.ca, e))?)
            .map_err(|e| file_err(&files.ca, e))?;
    }
    let crls = match &files.crl {
        Some(path) => CertificateRevocationListDer::pem_file_iter(path)
            .map_err(|e| file_err(path, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_err(path, e))?,
        None => Vec::new(),
    };
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| file_err(&files.cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(&files.cert, e))?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_err(&files.key, e))?;
    let provider = identity::provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        // Operators may authenticate with the bearer token instead; a
        // certificate that is presented must still verify (and not be revoked).
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| file_err(&files.key, e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl Peer {
    /// Who the verified client certificate of a connection names: an edge,
    /// the operator, or nobody (no certificate, or another role).
    pub fn from_tls(conn: &rustls::ServerConnection) -> Peer {
        let caller = conn
            .peer_certificates()
            .and_then(|certs| match identity::peer_identity(Some(certs)) {
                Ok(id) => match id.role {
                    Role::Edge => Some(Caller::Edge(id.name)),
                    Role::Operator => Some(Caller::Operator),
                    Role::Coordinator => None,
                },
                Err(e) => {
                    tracing::debug!("client certificate without a usable subject: {e}");
                    None
                }
            });
        Peer(caller)
    }
}
