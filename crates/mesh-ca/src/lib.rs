//! Cluster certificate authority, node certificates and join tokens.
//!
//! Mirrors Docker Swarm: `swarm init` creates a root CA ([`RootCa`]); join
//! tokens ([`JoinToken`]) carry the digest of that CA so a joining node can pin
//! it ([`bootstrap_client_config`]); nodes then talk mutual TLS ([`NodeTls`])
//! with certificates signed by the CA ([`RootCa::sign_node_csr`]), which a node
//! replaces while it runs ([`LiveTls`]) when it renews them.
#![forbid(unsafe_code)]

mod ca;
mod tls;
mod token;

pub use ca::{
    cert_der_from_pem, cert_key_id, cert_validity, issuer_key_id, peer_identity,
    subject_and_public_key, CaError, CertValidity, NodeKey, PeerIdentity, Role, RootCa,
};
pub use tls::{bootstrap_client_config, find_pinned_ca, LiveTls, NodeTls, SERVER_NAME};
pub use token::{ca_digest, new_secret, secrets_match, JoinToken, TokenError, TOKEN_PREFIX};
