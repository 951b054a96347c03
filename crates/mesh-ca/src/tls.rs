//! rustls configurations for node-to-node mutual TLS and for pinned bootstrap.
//!
//! Every configuration uses the ring provider explicitly; the process-default
//! provider is never consulted. Servers send `[leaf, intermediates, CA]` so that a joining
//! node can pin the CA by the digest in its join token. The intermediates are the
//! cross-signed new root of a root rotation (see [`crate::RootCa::cross_sign`]): a node's
//! certificate PEM is its leaf followed by them.

use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption, WebPkiServerVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    ServerConfig, SignatureScheme,
};

use crate::ca::CaError;

/// The TLS server name every node certificate carries and clients ask for.
pub const SERVER_NAME: &str = "mesh-node";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Everything a node needs for mutual TLS (all PEM).
#[derive(Clone)]
pub struct NodeTls {
    /// The root the node trusts.
    pub ca_cert_pem: String,
    /// The node's certificate, followed by the intermediates it presents with it.
    pub cert_pem: String,
    pub key_pem: String,
}

impl NodeTls {
    /// Server side: presents `[node cert, CA cert]`; client certificates are
    /// verified against the CA when presented but optional (a joining node has
    /// none yet, the RPC layer restricts what unauthenticated peers may do).
    /// The certificate is fixed; see [`LiveTls`] for one that can be replaced.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, CaError> {
        Ok(LiveTls::new(self)?.server_config())
    }

    /// Client side: presents the node cert and trusts only the cluster CA.
    /// Connect with server name [`SERVER_NAME`].
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, CaError> {
        Ok(LiveTls::new(self)?.client_config())
    }

    fn roots(&self) -> Result<(RootCertStore, CertificateDer<'static>), CaError> {
        let ca = parse_cert(&self.ca_cert_pem)?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone())?;
        Ok((roots, ca))
    }

    /// The leaf and its intermediates.
    fn chain(&self) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CaError::InvalidCert(e.to_string()))?;
        if chain.is_empty() {
            return Err(CaError::InvalidCert("no certificate".into()));
        }
        Ok(chain)
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, CaError> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| CaError::InvalidKey(e.to_string()))
    }

    /// What the server presents (`[leaf, intermediates, CA]`) and what the client presents
    /// (`[leaf, intermediates]`).
    fn certified(&self, provider: &CryptoProvider) -> Result<Certified, CaError> {
        let (_, ca) = self.roots()?;
        let chain = self.chain()?;
        let mut presented = chain.clone();
        presented.push(ca);
        let server = CertifiedKey::from_der(presented, self.key()?, provider)?;
        let client = CertifiedKey::from_der(chain, self.key()?, provider)?;
        Ok(Certified {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// The node certificate as both sides present it.
#[derive(Clone, Debug)]
struct Certified {
    server: Arc<CertifiedKey>,
    client: Arc<CertifiedKey>,
}

/// Mutual TLS configurations whose node certificate, key and trusted root can be replaced
/// while they are in use (renewal, a new role, a root rotation): every handshake from then
/// on, as server and as client, presents the new certificate and trusts the new root;
/// connections already open keep theirs.
///
/// Session resumption is off on both sides: a resumed session would carry the identity of
/// the certificate it was first made with, so a node's old certificate (or old role) would
/// outlive its replacement.
pub struct LiveTls {
    current: Arc<CurrentCert>,
    trust: Arc<LiveTrust>,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// The verifiers of a [`LiveTls`], for the root it trusts now.
#[derive(Debug)]
struct LiveTrust {
    slot: RwLock<Verifiers>,
    /// The roots' subject, which every root of a swarm shares (sent in certificate requests).
    hints: Vec<DistinguishedName>,
    provider: Arc<CryptoProvider>,
}

#[derive(Debug, Clone)]
struct Verifiers {
    ca_cert_pem: String,
    client: Arc<dyn ClientCertVerifier>,
    server: Arc<dyn ServerCertVerifier>,
}

impl Verifiers {
    fn new(tls: &NodeTls, provider: &Arc<CryptoProvider>) -> Result<Verifiers, CaError> {
        let (roots, _) = tls.roots()?;
        let roots = Arc::new(roots);
        let client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .allow_unauthenticated()
            .build()?;
        let server = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| CaError::Tls(rustls::Error::General(e.to_string())))?;
        Ok(Verifiers {
            ca_cert_pem: tls.ca_cert_pem.clone(),
            client,
            server,
        })
    }
}

impl LiveTrust {
    fn get(&self) -> Verifiers {
        self.slot.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ClientCertVerifier for LiveTrust {
    fn offer_client_auth(&self) -> bool {
        self.get().client.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.get().client.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.get()
            .client
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for LiveTrust {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.get().server.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ClientCertVerifier::verify_tls12_signature(self, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ClientCertVerifier::verify_tls13_signature(self, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ClientCertVerifier::supported_verify_schemes(self)
    }
}

/// The certificate resolvers of a [`LiveTls`]: both read the same slot.
#[derive(Debug)]
struct CurrentCert {
    slot: RwLock<Certified>,
    provider: Arc<CryptoProvider>,
}

impl CurrentCert {
    fn get(&self) -> Certified {
        self.slot.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get().server)
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.get().client)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl LiveTls {
    /// Configurations presenting `tls`'s certificate, trusting `tls`'s CA.
    pub fn new(tls: &NodeTls) -> Result<LiveTls, CaError> {
        let provider = provider();
        let current = Arc::new(CurrentCert {
            slot: RwLock::new(tls.certified(&provider)?),
            provider: provider.clone(),
        });
        let verifiers = Verifiers::new(tls, &provider)?;
        let trust = Arc::new(LiveTrust {
            hints: verifiers.client.root_hint_subjects().to_vec(),
            slot: RwLock::new(verifiers),
            provider: provider.clone(),
        });
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(trust.clone())
            .with_cert_resolver(current.clone());
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(trust.clone())
            .with_client_cert_resolver(current.clone());
        client.resumption = Resumption::disabled();
        Ok(LiveTls {
            current,
            trust,
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// The server side (see [`NodeTls::server_config`]), following replacements.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The client side (see [`NodeTls::client_config`]), following replacements.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// Presents `tls`'s certificate and key, and trusts `tls`'s CA, from the next handshake
    /// on. Fails, changing nothing, when the key does not match the certificate or a
    /// certificate cannot be read.
    pub fn replace(&self, tls: &NodeTls) -> Result<(), CaError> {
        let certified = tls.certified(&self.current.provider)?;
        certified.client.keys_match()?;
        let verifiers = (self.trust.get().ca_cert_pem != tls.ca_cert_pem)
            .then(|| Verifiers::new(tls, &self.trust.provider))
            .transpose()?;
        *self.current.slot.write().unwrap_or_else(|p| p.into_inner()) = certified;
        if let Some(v) = verifiers {
            *self.trust.slot.write().unwrap_or_else(|p| p.into_inner()) = v;
        }
        Ok(())
    }
}

impl fmt::Debug for LiveTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveTls").finish_non_exhaustive()
    }
}

impl fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeTls").finish_non_exhaustive()
    }
}

fn parse_cert(pem: &str) -> Result<CertificateDer<'static>, CaError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| CaError::InvalidCert(e.to_string()))
}

/// Client configuration for a joining node that has no certificate yet,
/// pinned by the CA digest of its join token: the server must present a CA
/// certificate with that digest after its leaf, and the leaf must verify
/// against that CA (as for [`SERVER_NAME`]). Otherwise the handshake fails
/// with an error whose text contains "CA digest mismatch".
pub fn bootstrap_client_config(ca_digest: &str) -> Result<Arc<ClientConfig>, CaError> {
    if ca_digest.len() != 50
        || !ca_digest
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    {
        return Err(CaError::InvalidDigest(ca_digest.to_owned()));
    }
    let provider = provider();
    let verifier = PinnedCaVerifier {
        ca_digest: ca_digest.to_owned(),
        provider: provider.clone(),
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The certificate in a presented chain whose digest is `ca_digest`, if any.
/// After a pinned bootstrap handshake, this is the CA to store (pass it the
/// connection's `peer_certificates()`).
pub fn find_pinned_ca<'a>(
    chain: &'a [CertificateDer<'a>],
    ca_digest: &str,
) -> Option<&'a CertificateDer<'a>> {
    chain
        .iter()
        .find(|c| crate::token::ca_digest(c) == ca_digest)
}

#[derive(Debug)]
struct PinnedCaVerifier {
    ca_digest: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = find_pinned_ca(intermediates, &self.ca_digest)
            .ok_or_else(|| rustls::Error::Other(OtherError(Arc::new(CaError::DigestMismatch))))?;
        // The certificates between the leaf and the pinned root: a cross-signed new root
        // while the swarm rotates its root.
        let between: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .filter(|c| c.as_ref() != ca.as_ref())
            .cloned()
            .collect();
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_server_cert(end_entity, &between, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    use rustls::{ClientConnection, ServerConnection, StreamOwned};

    use super::*;
    use crate::{peer_identity, NodeKey, PeerIdentity, Role, RootCa};

    fn node_tls(ca: &RootCa, node_id: &str, role: Role) -> NodeTls {
        let key = NodeKey::generate().unwrap();
        let cert_pem = ca
            .sign_node_csr(&key.csr_pem().unwrap(), node_id, role, "cluster-1")
            .unwrap();
        NodeTls {
            ca_cert_pem: ca.cert_pem().to_owned(),
            cert_pem,
            key_pem: key.key_pem().to_owned(),
        }
    }

    type ServerResult = Result<Option<PeerIdentity>, String>;
    type ClientResult = Result<Vec<CertificateDer<'static>>, String>;

    /// One ping/pong over a loopback TCP connection. Returns what the server
    /// saw (the client's identity) and what the client saw (the server chain).
    fn exchange(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> (ServerResult, ClientResult) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::scope(|s| {
            let server = s.spawn(move || -> ServerResult {
                let (tcp, _) = listener.accept().map_err(|e| e.to_string())?;
                tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let conn = ServerConnection::new(server).map_err(|e| e.to_string())?;
                let mut tls = StreamOwned::new(conn, tcp);
                let mut buf = [0u8; 4];
                tls.read_exact(&mut buf).map_err(|e| e.to_string())?;
                assert_eq!(&buf, b"ping");
                tls.write_all(b"pong").map_err(|e| e.to_string())?;
                tls.flush().map_err(|e| e.to_string())?;
                let peer = tls.conn.peer_certificates().and_then(|c| c.first());
                Ok(peer.map(|c| peer_identity(c).unwrap()))
            });
            let client = (|| -> ClientResult {
                let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
                tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let name = ServerName::try_from(SERVER_NAME).unwrap();
                let conn = ClientConnection::new(client, name).map_err(|e| e.to_string())?;
                let mut tls = StreamOwned::new(conn, tcp);
                tls.write_all(b"ping").map_err(|e| e.to_string())?;
                tls.flush().map_err(|e| e.to_string())?;
                let mut buf = [0u8; 4];
                tls.read_exact(&mut buf).map_err(|e| e.to_string())?;
                assert_eq!(&buf, b"pong");
                let chain = tls.conn.peer_certificates().unwrap_or_default();
                Ok(chain.iter().map(|c| c.clone().into_owned()).collect())
            })();
            (server.join().unwrap(), client)
        })
    }

    #[test]
    fn mutual_tls() {
        let ca = RootCa::generate().unwrap();
        let server = node_tls(&ca, "node-a", Role::Manager);
        let client = node_tls(&ca, "node-b", Role::Worker);
        let (seen_by_server, seen_by_client) = exchange(
            server.server_config().unwrap(),
            client.client_config().unwrap(),
        );
        assert_eq!(
            seen_by_server.unwrap(),
            Some(PeerIdentity {
                node_id: "node-b".into(),
                role: Role::Worker,
                cluster_id: "cluster-1".into(),
            })
        );
        let chain = seen_by_client.unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(peer_identity(&chain[0]).unwrap().role, Role::Manager);
        assert_eq!(chain[1].as_ref(), ca.cert_der());
    }

    #[test]
    fn live_tls_presents_the_replaced_certificate() {
        let ca = RootCa::generate().unwrap();
        let server = LiveTls::new(&node_tls(&ca, "node-a", Role::Manager)).unwrap();
        let client = LiveTls::new(&node_tls(&ca, "node-b", Role::Worker)).unwrap();
        let (seen, chain) = exchange(server.server_config(), client.client_config());
        assert_eq!(seen.unwrap().unwrap().role, Role::Worker);
        let first_leaf = chain.unwrap()[0].clone();

        // Same configurations, new certificates on both sides.
        client
            .replace(&node_tls(&ca, "node-b", Role::Manager))
            .unwrap();
        let renewed = node_tls(&ca, "node-a", Role::Manager);
        server.replace(&renewed).unwrap();
        let (seen, chain) = exchange(server.server_config(), client.client_config());
        assert_eq!(seen.unwrap().unwrap().role, Role::Manager);
        let leaf = chain.unwrap()[0].clone();
        assert_ne!(leaf, first_leaf);
        assert_eq!(leaf, parse_cert(&renewed.cert_pem).unwrap());

        // A key that does not match its certificate changes nothing.
        let mut wrong = node_tls(&ca, "node-b", Role::Worker);
        wrong.key_pem = NodeKey::generate().unwrap().key_pem().to_owned();
        assert!(client.replace(&wrong).is_err());
        let (seen, _) = exchange(server.server_config(), client.client_config());
        assert_eq!(seen.unwrap().unwrap().role, Role::Manager);
    }

    /// A node certificate from `issuer`, presented with `intermediates`, trusting `trusted`.
    fn rotating_tls(issuer: &RootCa, intermediates: &str, trusted: &RootCa, id: &str) -> NodeTls {
        let mut tls = node_tls(issuer, id, Role::Manager);
        tls.cert_pem.push_str(intermediates);
        tls.ca_cert_pem = trusted.cert_pem().to_owned();
        tls
    }

    fn handshake(server: &NodeTls, client: &NodeTls) -> Result<(), String> {
        let (s, c) = exchange(
            server.server_config().unwrap(),
            client.client_config().unwrap(),
        );
        s?;
        c?;
        Ok(())
    }

    /// swarmkit's cross-signed rotation: while nodes move from the old root to the new one,
    /// every pair of them still completes a handshake, both ways; once everyone trusts the
    /// new root, the old root's certificates are refused.
    #[test]
    fn root_rotation_by_cross_signing() {
        let old = RootCa::generate().unwrap();
        let new = RootCa::generate().unwrap();
        let cross = old.cross_sign(&new).unwrap();
        // The key identifiers tell who signed what.
        assert_ne!(old.key_id(), new.key_id());
        assert_eq!(crate::cert_key_id(&cross).unwrap(), new.key_id());
        assert_eq!(crate::issuer_key_id(&cross).unwrap(), old.key_id());
        assert_eq!(crate::cert_key_id(old.cert_pem()).unwrap(), old.key_id());

        let not_renewed = rotating_tls(&old, "", &old, "a");
        let renewed = rotating_tls(&new, &cross, &old, "b");
        let switched = rotating_tls(&new, &cross, &new, "c");
        let later = rotating_tls(&new, "", &new, "d");
        assert_eq!(
            crate::issuer_key_id(&renewed.cert_pem).unwrap(),
            new.key_id()
        );
        assert_eq!(
            crate::issuer_key_id(&not_renewed.cert_pem).unwrap(),
            old.key_id()
        );
        // Phase 1: certificates move to the new key, trust stays on the old root.
        for (x, y) in [
            (&not_renewed, &renewed),
            (&renewed, &not_renewed),
            (&renewed, &renewed),
        ] {
            handshake(x, y).unwrap();
        }
        // Phase 2: every certificate is from the new key; trust moves to the new root.
        for (x, y) in [
            (&renewed, &switched),
            (&switched, &renewed),
            (&switched, &later),
        ] {
            handshake(x, y).unwrap();
        }
        // The old root's certificates are refused by a node that trusts the new root only.
        let err = handshake(&switched, &not_renewed).unwrap_err();
        assert!(err.contains("invalid peer certificate"), "{err}");
        assert!(handshake(&not_renewed, &switched).is_err());

        // A live configuration moves from one root to the other in place.
        let live = LiveTls::new(&not_renewed).unwrap();
        let peer_old = rotating_tls(&old, "", &old, "e");
        let (seen, _) = exchange(live.server_config(), peer_old.client_config().unwrap());
        assert_eq!(seen.unwrap().unwrap().node_id, "e");
        live.replace(&rotating_tls(&new, &cross, &new, "a"))
            .unwrap();
        let (seen, _) = exchange(live.server_config(), peer_old.client_config().unwrap());
        assert!(seen.is_err(), "the old root is no longer trusted");
        let (seen, chain) = exchange(live.server_config(), later.client_config().unwrap());
        assert_eq!(seen.unwrap().unwrap().node_id, "d");
        assert_eq!(chain.unwrap().len(), 3, "leaf, cross-signed root, root");
        let (_, chain) = exchange(later.server_config().unwrap(), live.client_config());
        chain.unwrap();

        // Joining during phase 1 with a token of the old root, and after with the new one.
        let (_, chain) = exchange(
            renewed.server_config().unwrap(),
            bootstrap_client_config(&old.digest()).unwrap(),
        );
        chain.unwrap();
        let (_, chain) = exchange(
            renewed.server_config().unwrap(),
            bootstrap_client_config(&new.digest()).unwrap(),
        );
        assert!(chain.unwrap_err().contains("CA digest mismatch"));
        let (_, chain) = exchange(
            switched.server_config().unwrap(),
            bootstrap_client_config(&new.digest()).unwrap(),
        );
        chain.unwrap();
    }

    #[test]
    fn bootstrap_pinned_by_digest() {
        let ca = RootCa::generate().unwrap();
        let server = node_tls(&ca, "node-a", Role::Manager);
        let client = bootstrap_client_config(&ca.digest()).unwrap();
        let (seen_by_server, seen_by_client) = exchange(server.server_config().unwrap(), client);
        assert_eq!(seen_by_server.unwrap(), None);
        let chain = seen_by_client.unwrap();
        let pinned = find_pinned_ca(&chain, &ca.digest()).unwrap();
        assert_eq!(pinned.as_ref(), ca.cert_der());
    }

    #[test]
    fn bootstrap_wrong_digest_fails() {
        let ca = RootCa::generate().unwrap();
        let other = RootCa::generate().unwrap();
        let server = node_tls(&ca, "node-a", Role::Manager);
        let client = bootstrap_client_config(&other.digest()).unwrap();
        let (seen_by_server, seen_by_client) = exchange(server.server_config().unwrap(), client);
        assert!(seen_by_server.is_err());
        let err = seen_by_client.unwrap_err();
        assert!(err.contains("CA digest mismatch"), "{err}");
    }

    #[test]
    fn bootstrap_rejects_leaf_not_signed_by_pinned_ca() {
        // The server presents the pinned CA but a leaf from another CA.
        let ca = RootCa::generate().unwrap();
        let other = RootCa::generate().unwrap();
        let mut server = node_tls(&other, "node-a", Role::Manager);
        server.ca_cert_pem = ca.cert_pem().to_owned();
        let client = bootstrap_client_config(&ca.digest()).unwrap();
        let (_, seen_by_client) = exchange(server.server_config().unwrap(), client);
        let err = seen_by_client.unwrap_err();
        assert!(
            err.contains("invalid peer certificate: BadSignature"),
            "{err}"
        );
    }

    // All root CAs share the subject "mesh-root-ca", so webpki finds the
    // issuer by name and then fails on the signature: BadSignature.
    #[test]
    fn foreign_client_cert_rejected() {
        let ca = RootCa::generate().unwrap();
        let other = RootCa::generate().unwrap();
        let server = node_tls(&ca, "node-a", Role::Manager);
        let mut client = node_tls(&other, "node-b", Role::Manager);
        client.ca_cert_pem = ca.cert_pem().to_owned(); // trusts the server
        let (seen_by_server, seen_by_client) = exchange(
            server.server_config().unwrap(),
            client.client_config().unwrap(),
        );
        let err = seen_by_server.unwrap_err();
        assert!(
            err.contains("invalid peer certificate: BadSignature"),
            "{err}"
        );
        assert!(seen_by_client.is_err());
    }

    #[test]
    fn foreign_server_cert_rejected() {
        let ca = RootCa::generate().unwrap();
        let other = RootCa::generate().unwrap();
        let server = node_tls(&other, "node-a", Role::Manager);
        let mut client = node_tls(&other, "node-b", Role::Manager);
        client.ca_cert_pem = ca.cert_pem().to_owned();
        let (_, seen_by_client) = exchange(
            server.server_config().unwrap(),
            client.client_config().unwrap(),
        );
        let err = seen_by_client.unwrap_err();
        assert!(
            err.contains("invalid peer certificate: BadSignature"),
            "{err}"
        );
    }

    #[test]
    fn reloaded_ca_issues_certs_trusted_by_original() {
        let ca = RootCa::generate().unwrap();
        let reloaded = RootCa::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        assert_eq!(reloaded.cert_der(), ca.cert_der());
        assert_eq!(reloaded.digest(), ca.digest());
        // Leaf from the reloaded CA, verified by webpki against the original.
        let server = node_tls(&reloaded, "node-a", Role::Manager);
        let leaf = parse_cert(&server.cert_pem).unwrap();
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca.cert_der().to_vec()))
            .unwrap();
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .unwrap()
            .verify_server_cert(
                &leaf,
                &[],
                &ServerName::try_from(SERVER_NAME).unwrap(),
                &[],
                UnixTime::now(),
            )
            .unwrap();
        // And over a real handshake, both directions.
        let client = node_tls(&ca, "node-b", Role::Worker);
        let (seen_by_server, seen_by_client) = exchange(
            server.server_config().unwrap(),
            client.client_config().unwrap(),
        );
        assert_eq!(seen_by_server.unwrap().unwrap().node_id, "node-b");
        seen_by_client.unwrap();
    }

    #[test]
    fn bad_inputs() {
        assert!(matches!(
            bootstrap_client_config("abc"),
            Err(CaError::InvalidDigest(_))
        ));
        let broken = NodeTls {
            ca_cert_pem: "nope".into(),
            cert_pem: String::new(),
            key_pem: String::new(),
        };
        assert!(matches!(
            broken.server_config(),
            Err(CaError::InvalidCert(_))
        ));
        assert!(matches!(
            broken.client_config(),
            Err(CaError::InvalidCert(_))
        ));
    }
}
