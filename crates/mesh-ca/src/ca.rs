//! The cluster root CA, node keys/CSRs and identities read from node certificates.
//!
//! Node certificates carry the node id as CN, the role as OU (`mesh-manager` or
//! `mesh-worker`) and the cluster id as O, like Swarm's.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use x509_parser::extensions::ParsedExtension;
use x509_parser::x509::AttributeTypeAndValue;

use crate::tls::SERVER_NAME;
use crate::token::ca_digest;

const ROOT_CN: &str = "mesh-root-ca";
const OU_MANAGER: &str = "mesh-manager";
const OU_WORKER: &str = "mesh-worker";
const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600 + 5 * 24 * 3600);
const NODE_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// Certificates are valid from one hour in the past, to tolerate clock skew.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Errors from the CA, node keys and certificate parsing.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot generate key pair: {0}")]
    KeyGen(rcgen::Error),
    #[error("invalid private key: {0}")]
    InvalidKey(String),
    #[error("invalid certificate: {0}")]
    InvalidCert(String),
    #[error("invalid certificate signing request: {0}")]
    InvalidCsr(rcgen::Error),
    #[error("cannot sign certificate: {0}")]
    Sign(rcgen::Error),
    #[error("cannot create certificate signing request: {0}")]
    Csr(rcgen::Error),
    #[error("CA private key does not match the CA certificate")]
    KeyMismatch,
    #[error("invalid node id {0:?}: must be 1-63 characters of a-z, A-Z, 0-9 and '-'")]
    InvalidNodeId(String),
    #[error("invalid cluster id: must not be empty")]
    InvalidClusterId,
    #[error("peer certificate has no {0}")]
    MissingField(&'static str),
    #[error("peer certificate has unknown role {0:?}")]
    UnknownRole(String),
    #[error("invalid CA digest {0:?}: expected 50 characters of 0-9a-z")]
    InvalidDigest(String),
    #[error("CA digest mismatch: the server's CA certificate does not match the join token")]
    DigestMismatch,
    #[error("invalid TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot build certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("system clock is before 1970")]
    Clock,
}

/// A node's role, carried in its certificate's OU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Worker,
    Manager,
}

impl Role {
    fn ou(self) -> &'static str {
        match self {
            Role::Worker => OU_WORKER,
            Role::Manager => OU_MANAGER,
        }
    }
}

/// The cluster's root CA: ECDSA P-256, CN `mesh-root-ca`, valid 20 years.
pub struct RootCa {
    cert_pem: String,
    key_pem: String,
    cert_der: Vec<u8>,
    /// Certificate with the same subject and key as `cert_der`, used only as the
    /// issuer when signing (after [`RootCa::from_pem`] its bytes differ from
    /// the original, which stays the trust anchor).
    issuer: rcgen::Certificate,
    key: KeyPair,
}

impl RootCa {
    /// Creates a new self-signed root CA.
    pub fn generate() -> Result<RootCa, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::KeyGen)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, ROOT_CN);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_VALIDITY)?;
        params.serial_number = Some(random_serial());
        let issuer = params.self_signed(&key).map_err(CaError::Sign)?;
        Ok(RootCa {
            cert_pem: issuer.pem(),
            key_pem: key.serialize_pem(),
            cert_der: issuer.der().to_vec(),
            issuer,
            key,
        })
    }

    /// Loads a CA back (e.g. from the replicated store). The given certificate
    /// stays the trust anchor byte for byte.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<RootCa, CaError> {
        let cert_der = cert_der_from_pem(cert_pem)?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::InvalidKey(e.to_string()))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| CaError::InvalidCert(e.to_string()))?;
        if x509.public_key().raw != key.public_key_der().as_slice() {
            return Err(CaError::KeyMismatch);
        }
        let params =
            CertificateParams::from_ca_cert_der(&CertificateDer::from(cert_der.as_slice()))
                .map_err(|e| CaError::InvalidCert(e.to_string()))?;
        if !matches!(params.is_ca, IsCa::Ca(_)) {
            return Err(CaError::InvalidCert("not a CA certificate".into()));
        }
        let issuer = params.self_signed(&key).map_err(CaError::Sign)?;
        Ok(RootCa {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            cert_der,
            issuer,
            key,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The digest that goes into join tokens.
    pub fn digest(&self) -> String {
        ca_digest(&self.cert_der)
    }

    /// Signs a node's CSR (PEM) and returns the certificate PEM.
    ///
    /// The CSR's signature is verified (by rcgen, via x509-parser) but only its
    /// public key is used: the subject is CN = `node_id`, OU = role, O =
    /// `cluster_id`; SANs are `node_id` and [`SERVER_NAME`]; 90 days validity;
    /// digitalSignature + keyEncipherment, serverAuth + clientAuth.
    pub fn sign_node_csr(
        &self,
        csr_pem: &str,
        node_id: &str,
        role: Role,
        cluster_id: &str,
    ) -> Result<String, CaError> {
        self.sign_node_csr_valid_for(csr_pem, node_id, role, cluster_id, NODE_VALIDITY)
    }

    /// [`Self::sign_node_csr`] with the validity the cluster asks for (`--cert-expiry`).
    pub fn sign_node_csr_valid_for(
        &self,
        csr_pem: &str,
        node_id: &str,
        role: Role,
        cluster_id: &str,
        validity: Duration,
    ) -> Result<String, CaError> {
        if node_id.is_empty()
            || node_id.len() > 63
            || !node_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(CaError::InvalidNodeId(node_id.to_owned()));
        }
        if cluster_id.is_empty() {
            return Err(CaError::InvalidClusterId);
        }
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::InvalidCsr)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, node_id);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, role.ou());
        params
            .distinguished_name
            .push(DnType::OrganizationName, cluster_id);
        params.subject_alt_names = [node_id, SERVER_NAME]
            .into_iter()
            .map(|n| n.try_into().map(SanType::DnsName))
            .collect::<Result<_, _>>()
            .map_err(CaError::Sign)?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        set_validity(&mut params, validity)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer, &self.key)
            .map_err(CaError::Sign)?;
        Ok(cert.pem())
    }
}

impl RootCa {
    /// The new root `next` signed by this one: the same subject and key as `next`, so that a
    /// certificate `next` issues chains through it to this root. During a root rotation
    /// (`swarm ca --rotate`, swarmkit's cross-signed rotation), nodes that still trust only
    /// this root accept the certificates of `next` presented with it as an intermediate.
    pub fn cross_sign(&self, next: &RootCa) -> Result<String, CaError> {
        let mut params =
            CertificateParams::from_ca_cert_der(&CertificateDer::from(next.cert_der.as_slice()))
                .map_err(|e| CaError::InvalidCert(e.to_string()))?;
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let cert = params
            .signed_by(&next.key, &self.issuer, &self.key)
            .map_err(CaError::Sign)?;
        Ok(cert.pem())
    }

    /// This root's key identifier (its subject key identifier, hex): what the certificates it
    /// issues name as their authority key identifier.
    pub fn key_id(&self) -> String {
        subject_key_id(&self.cert_der).unwrap_or_default()
    }
}

impl fmt::Debug for RootCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootCa")
            .field("digest", &self.digest())
            .finish_non_exhaustive()
    }
}

/// A node's key pair (ECDSA P-256), generated locally: the private key never
/// leaves the node, only CSRs do.
pub struct NodeKey {
    key_pem: String,
    key: KeyPair,
}

impl NodeKey {
    pub fn generate() -> Result<NodeKey, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::KeyGen)?;
        Ok(NodeKey {
            key_pem: key.serialize_pem(),
            key,
        })
    }

    pub fn from_pem(key_pem: &str) -> Result<NodeKey, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::InvalidKey(e.to_string()))?;
        Ok(NodeKey {
            key_pem: key_pem.to_owned(),
            key,
        })
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A PEM CSR for this key (its subject is ignored by the CA).
    pub fn csr_pem(&self) -> Result<String, CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, SERVER_NAME);
        params
            .serialize_request(&self.key)
            .and_then(|csr| csr.pem())
            .map_err(CaError::Csr)
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeKey { .. }")
    }
}

/// Identity read from a (verified) peer certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerIdentity {
    /// The certificate's CN.
    pub node_id: String,
    /// From the certificate's OU.
    pub role: Role,
    /// The certificate's O.
    pub cluster_id: String,
}

/// Reads CN, OU and O from a node certificate (DER). Does not verify it.
pub fn peer_identity(cert_der: &[u8]) -> Result<PeerIdentity, CaError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| CaError::InvalidCert(e.to_string()))?;
    let subject = cert.subject();
    let node_id = first_attr(subject.iter_common_name(), "common name")?;
    let ou = first_attr(subject.iter_organizational_unit(), "organizational unit")?;
    let cluster_id = first_attr(subject.iter_organization(), "organization")?;
    let role = match ou.as_str() {
        OU_MANAGER => Role::Manager,
        OU_WORKER => Role::Worker,
        _ => return Err(CaError::UnknownRole(ou)),
    };
    Ok(PeerIdentity {
        node_id,
        role,
        cluster_id,
    })
}

fn first_attr<'a, 'b: 'a>(
    mut attrs: impl Iterator<Item = &'a AttributeTypeAndValue<'b>>,
    what: &'static str,
) -> Result<String, CaError> {
    attrs
        .next()
        .and_then(|a| a.as_str().ok())
        .map(str::to_owned)
        .ok_or(CaError::MissingField(what))
}

/// When a node certificate was issued and when it expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CertValidity {
    /// The signing time: the certificate's notBefore plus the one hour it is backdated by.
    pub issued_at: SystemTime,
    /// notAfter.
    pub expires_at: SystemTime,
}

impl CertValidity {
    /// The validity the CA was asked for (`--cert-expiry`): from issuance to expiry.
    pub fn lifetime(&self) -> Duration {
        self.expires_at
            .duration_since(self.issued_at)
            .unwrap_or_default()
    }
}

/// Reads a node certificate's (PEM) issuance and expiry times. Does not verify it.
pub fn cert_validity(cert_pem: &str) -> Result<CertValidity, CaError> {
    let der = cert_der_from_pem(cert_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| CaError::InvalidCert(e.to_string()))?;
    let at = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    let v = cert.validity();
    Ok(CertValidity {
        issued_at: at(v.not_before.timestamp()) + BACKDATE,
        expires_at: at(v.not_after.timestamp()),
    })
}

/// The subject key identifier (hex) of the first certificate in `cert_pem`: for a root CA,
/// what identifies its key in the certificates it issues.
pub fn cert_key_id(cert_pem: &str) -> Result<String, CaError> {
    subject_key_id(&cert_der_from_pem(cert_pem)?)
}

/// The authority key identifier (hex) of the first certificate in `cert_pem`: which CA key
/// signed it.
pub fn issuer_key_id(cert_pem: &str) -> Result<String, CaError> {
    let der = cert_der_from_pem(cert_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| CaError::InvalidCert(e.to_string()))?;
    let id = cert
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| hex(k.0))
            }
            _ => None,
        });
    id.ok_or(CaError::MissingField("authority key identifier"))
}

/// The raw DER of the subject and of the public key (SubjectPublicKeyInfo) of the first
/// certificate in `cert_pem`: how Docker names an issuer (`TLSInfo`).
pub fn subject_and_public_key(cert_pem: &str) -> Result<(Vec<u8>, Vec<u8>), CaError> {
    let der = cert_der_from_pem(cert_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| CaError::InvalidCert(e.to_string()))?;
    Ok((
        cert.tbs_certificate.subject.as_raw().to_vec(),
        cert.tbs_certificate.subject_pki.raw.to_vec(),
    ))
}

fn subject_key_id(der: &[u8]) -> Result<String, CaError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CaError::InvalidCert(e.to_string()))?;
    let id = cert
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(hex(k.0)),
            _ => None,
        });
    id.ok_or(CaError::MissingField("subject key identifier"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// DER of the first certificate in a PEM string.
pub fn cert_der_from_pem(cert_pem: &str) -> Result<Vec<u8>, CaError> {
    CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| CaError::InvalidCert(e.to_string()))
}

fn set_validity(params: &mut CertificateParams, validity: Duration) -> Result<(), CaError> {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CaError::Clock)?;
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
    Ok(())
}

/// A random positive 128-bit serial number.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use x509_parser::extensions::GeneralName;

    use super::*;

    fn validity_secs(cert: &x509_parser::certificate::X509Certificate<'_>) -> u64 {
        let v = cert.validity();
        (v.not_after.timestamp() - v.not_before.timestamp()) as u64
    }

    #[test]
    fn types_are_thread_safe() {
        fn check<T: Send + Sync>() {}
        check::<RootCa>();
        check::<NodeKey>();
        check::<crate::NodeTls>();
        check::<CaError>();
    }

    #[test]
    fn validity_of_a_node_cert() {
        let ca = RootCa::generate().unwrap();
        let key = NodeKey::generate().unwrap();
        let before = SystemTime::now() - Duration::from_secs(1);
        let pem = ca
            .sign_node_csr_valid_for(
                &key.csr_pem().unwrap(),
                "n1",
                Role::Worker,
                "c",
                Duration::from_secs(40),
            )
            .unwrap();
        let v = cert_validity(&pem).unwrap();
        assert_eq!(v.lifetime(), Duration::from_secs(40));
        assert!(v.issued_at >= before && v.issued_at <= SystemTime::now());
        assert!(cert_validity("nope").is_err());
    }

    #[test]
    fn root_ca_contents() {
        let ca = RootCa::generate().unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        assert_eq!(
            cert.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            ROOT_CN
        );
        assert!(cert.is_ca());
        assert_eq!(validity_secs(&cert), (CA_VALIDITY + BACKDATE).as_secs());
        assert_eq!(CA_VALIDITY.as_secs() / 86400, 20 * 365 + 5);
        assert_eq!(ca_digest(ca.cert_der()), ca.digest());
        assert_eq!(cert_der_from_pem(ca.cert_pem()).unwrap(), ca.cert_der());
    }

    #[test]
    fn node_cert_contents_ignore_csr_subject() {
        let ca = RootCa::generate().unwrap();
        let key = NodeKey::generate().unwrap();
        let csr = key.csr_pem().unwrap();
        let pem = ca
            .sign_node_csr(&csr, "abc123", Role::Manager, "clu")
            .unwrap();
        let der = cert_der_from_pem(&pem).unwrap();
        assert_eq!(
            peer_identity(&der).unwrap(),
            PeerIdentity {
                node_id: "abc123".into(),
                role: Role::Manager,
                cluster_id: "clu".into(),
            }
        );
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let sans: Vec<_> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(s) => *s,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(sans, ["abc123", SERVER_NAME]);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        assert!(!cert.is_ca());
        assert_eq!(cert.public_key().raw, key.key.public_key_der().as_slice());
        assert_eq!(validity_secs(&cert), (NODE_VALIDITY + BACKDATE).as_secs());
        assert_eq!(NODE_VALIDITY.as_secs(), 90 * 86400);
        let worker = ca.sign_node_csr(&csr, "w1", Role::Worker, "clu").unwrap();
        let der = cert_der_from_pem(&worker).unwrap();
        assert_eq!(peer_identity(&der).unwrap().role, Role::Worker);
    }

    #[test]
    fn node_key_round_trip() {
        let key = NodeKey::generate().unwrap();
        let again = NodeKey::from_pem(key.key_pem()).unwrap();
        assert_eq!(again.key.public_key_der(), key.key.public_key_der());
        assert!(matches!(
            NodeKey::from_pem("garbage"),
            Err(CaError::InvalidKey(_))
        ));
    }

    #[test]
    fn from_pem_checks() {
        let ca = RootCa::generate().unwrap();
        let other = RootCa::generate().unwrap();
        assert!(matches!(
            RootCa::from_pem(ca.cert_pem(), other.key_pem()),
            Err(CaError::KeyMismatch)
        ));
        assert!(matches!(
            RootCa::from_pem("x", ca.key_pem()),
            Err(CaError::InvalidCert(_))
        ));
        // A leaf is not a CA.
        let key = NodeKey::generate().unwrap();
        let leaf = ca
            .sign_node_csr(&key.csr_pem().unwrap(), "n1", Role::Worker, "c")
            .unwrap();
        assert!(matches!(
            RootCa::from_pem(&leaf, key.key_pem()),
            Err(CaError::InvalidCert(_))
        ));
    }

    #[test]
    fn sign_rejects_bad_input() {
        let ca = RootCa::generate().unwrap();
        let csr = NodeKey::generate().unwrap().csr_pem().unwrap();
        for id in ["", "has space", "dot.ted", &"x".repeat(64)] {
            assert!(matches!(
                ca.sign_node_csr(&csr, id, Role::Worker, "c"),
                Err(CaError::InvalidNodeId(_))
            ));
        }
        assert!(matches!(
            ca.sign_node_csr(&csr, "n1", Role::Worker, ""),
            Err(CaError::InvalidClusterId)
        ));
        assert!(matches!(
            ca.sign_node_csr("not a csr", "n1", Role::Worker, "c"),
            Err(CaError::InvalidCsr(_))
        ));
        // Flip one base64 character inside the body: signature check fails.
        let mut lines: Vec<String> = csr.lines().map(str::to_owned).collect();
        let line = &mut lines[3];
        let c = if line.as_bytes()[10] == b'A' {
            "B"
        } else {
            "A"
        };
        line.replace_range(10..11, c);
        let tampered = lines.join("\n");
        assert!(ca
            .sign_node_csr(&tampered, "n1", Role::Worker, "c")
            .is_err());
    }

    #[test]
    fn peer_identity_errors() {
        let ca = RootCa::generate().unwrap();
        assert!(matches!(
            peer_identity(ca.cert_der()),
            Err(CaError::MissingField("organizational unit"))
        ));
        assert!(matches!(
            peer_identity(b"junk"),
            Err(CaError::InvalidCert(_))
        ));
    }
}
