//! [`EdgeServerVerifier`]: checks an edge's server certificate when edges
//! dial each other by address, with no name to check it against.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};

use super::{identity_of, Role};

/// Full WebPKI verification (chain to a cluster CA, validity dates, key
/// usage, CRL) done for the name the certificate itself carries, which must
/// be an edge's: the caller then learns who answered from the certificate.
/// The dialled name is ignored because edges are dialled by address.
#[derive(Debug)]
pub struct EdgeServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl EdgeServerVerifier {
    pub fn new(inner: Arc<WebPkiServerVerifier>) -> Self {
        EdgeServerVerifier { inner }
    }
}

impl ServerCertVerifier for EdgeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let id = identity_of(end_entity).map_err(|e| Error::General(e.to_string()))?;
        if id.role != Role::Edge {
            return Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        // Edges carry DNS SAN = their name (identity::issue), so checking
        // the chain for that name checks everything else unchanged.
        let name = ServerName::try_from(id.name.as_str())
            .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        self.inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
