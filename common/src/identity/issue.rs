//! Issuing: a cluster CA, certificates for edges, coordinators and
//! operators, and revocation lists. Used by `edgeshift cluster` and by tests
//! that make a throwaway cluster; keys are ECDSA P-256 made by rcgen.

use std::fmt;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use time::OffsetDateTime;

use super::{check_name, IdentityError, Role};

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct IssuedPem {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for IssuedPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedPem")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

const DAY: Duration = Duration::from_secs(86_400);
/// Certificates start a little in the past so that a peer whose clock is a
/// few minutes behind accepts a certificate issued just now.
const BACKDATE: Duration = Duration::from_secs(600);

fn err(e: impl fmt::Display) -> IdentityError {
    IdentityError::Issue(e.to_string())
}

fn random_serial() -> Result<SerialNumber, IdentityError> {
    let mut bytes = [0u8; 16];
    super::provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| IdentityError::Issue("no randomness for a serial number".into()))?;
    bytes[0] &= 0x7f; // a positive integer
    bytes[0] |= 0x01; // no leading zero byte to strip
    Ok(SerialNumber::from_slice(&bytes))
}

fn days_from_now(days: u32) -> Result<(SystemTime, SystemTime), IdentityError> {
    if days == 0 {
        return Err(IdentityError::Issue("validity must be at least one day".into()));
    }
    let now = SystemTime::now();
    Ok((now - BACKDATE, now + DAY * days))
}

/// A new cluster CA, `CN=edgeshift cluster CLUSTER TAG` (TAG: 8 random hex
/// digits), valid for `days`.
pub fn new_ca(cluster: &str, days: u32) -> Result<IssuedPem, IdentityError> {
    check_name(cluster)?;
    let (not_before, not_after) = days_from_now(days)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "edgeshift");
    // A random tag makes each CA's subject unique: during a rollover both
    // CAs are trusted and a verifier picks the issuer by subject (webpki
    // stops at the first trust anchor of the right name whose signature fails).
    let mut tag = [0u8; 4];
    super::provider()
        .secure_random
        .fill(&mut tag)
        .map_err(|_| IdentityError::Issue("no randomness for the CA's tag".into()))?;
    dn.push(
        DnType::CommonName,
        format!("edgeshift cluster {cluster} {}", hex::encode(tag)),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.key_identifier_method = KeyIdMethod::Sha256;
    params.serial_number = Some(random_serial()?);
    params.not_before = OffsetDateTime::from(not_before);
    params.not_after = OffsetDateTime::from(not_after);
    let cert = params.self_signed(&key).map_err(err)?;
    Ok(IssuedPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A certificate for `name` in `role`, signed by `ca`, valid for `days`.
/// Edges get DNS SAN = name plus `sans` (IP addresses allowed) and may act
/// as server and client; a coordinator is a server (its `sans` are its host
/// names); an operator is a client.
pub fn issue(
    ca: &IssuedPem,
    role: Role,
    name: &str,
    sans: &[String],
    days: u32,
) -> Result<IssuedPem, IdentityError> {
    let (not_before, not_after) = days_from_now(days)?;
    issue_with_validity(ca, role, name, sans, not_before, not_after)
}

/// [`issue`] with explicit dates (tests make expired certificates with it).
pub fn issue_with_validity(
    ca: &IssuedPem,
    role: Role,
    name: &str,
    sans: &[String],
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<IssuedPem, IdentityError> {
    check_name(name)?;
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(|e| err(format!("CA key: {e}")))?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(|e| err(format!("CA certificate: {e}")))?;
    let mut names = Vec::new();
    if role == Role::Edge {
        names.push(name.to_string());
    }
    names.extend(sans.iter().cloned());
    let mut params =
        CertificateParams::new(names).map_err(|e| err(format!("subject alternative name: {e}")))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "edgeshift");
    dn.push(DnType::OrganizationalUnitName, role.as_str());
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match role {
        Role::Edge => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Role::Coordinator => vec![ExtendedKeyUsagePurpose::ServerAuth],
        Role::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    params.not_before = OffsetDateTime::from(not_before);
    params.not_after = OffsetDateTime::from(not_after);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let cert = params.signed_by(&key, &issuer).map_err(err)?;
    Ok(IssuedPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn pem_der(pem: &str, what: &str) -> Result<Vec<u8>, IdentityError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
    let bytes = pem.as_bytes();
    if what == "CRL" {
        CertificateRevocationListDer::from_pem_slice(bytes).map(|d| d.as_ref().to_vec())
    } else {
        CertificateDer::from_pem_slice(bytes).map(|d| d.as_ref().to_vec())
    }
    .map_err(|e| err(format!("{what}: not PEM: {e}")))
}

/// A CRL of `ca` listing `cert_pems` and everything `previous_crl` (this
/// CA's current CRL, PEM) listed. A certificate `ca` did not issue is an error.
pub fn revoke(
    ca: &IssuedPem,
    cert_pems: &[String],
    previous_crl: Option<&str>,
) -> Result<String, IdentityError> {
    let ca_der = pem_der(&ca.cert_pem, "CA certificate")?;
    let (_, ca_cert) =
        x509_parser::parse_x509_certificate(&ca_der).map_err(|e| err(format!("CA certificate: {e}")))?;
    let now = SystemTime::now();
    let mut revoked: Vec<RevokedCertParams> = Vec::new();
    let mut crl_number = 0u64;
    if let Some(prev) = previous_crl {
        let der = pem_der(prev, "CRL")?;
        let (_, crl) = x509_parser::parse_x509_crl(&der).map_err(|e| err(format!("previous CRL: {e}")))?;
        if crl.issuer().as_raw() != ca_cert.subject().as_raw() {
            return Err(err("the previous CRL was not issued by this CA"));
        }
        crl_number = crl.crl_number().and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
        for entry in crl.iter_revoked_certificates() {
            let when = u64::try_from(entry.revocation_date.timestamp()).unwrap_or(0);
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(entry.raw_serial()),
                revocation_time: OffsetDateTime::from(SystemTime::UNIX_EPOCH + Duration::from_secs(when)),
                reason_code: None,
                invalidity_date: None,
            });
        }
    }
    for pem in cert_pems {
        let der = pem_der(pem, "certificate")?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| err(format!("certificate: {e}")))?;
        if cert.issuer().as_raw() != ca_cert.subject().as_raw() {
            return Err(err(format!("{} was not issued by this CA", cert.subject())));
        }
        let serial = SerialNumber::from_slice(cert.raw_serial());
        if !revoked.iter().any(|r| r.serial_number == serial) {
            revoked.push(RevokedCertParams {
                serial_number: serial,
                revocation_time: OffsetDateTime::from(now),
                reason_code: None,
                invalidity_date: None,
            });
        }
    }
    let unix_now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let params = CertificateRevocationListParams {
        this_update: OffsetDateTime::from(now - BACKDATE),
        next_update: OffsetDateTime::from(now + DAY * 365),
        // Increasing across updates, as RFC 5280 wants.
        crl_number: SerialNumber::from(crl_number.saturating_add(1).max(unix_now)),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(|e| err(format!("CA key: {e}")))?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(|e| err(format!("CA certificate: {e}")))?;
    params.signed_by(&issuer).map_err(err)?.pem().map_err(err)
}
