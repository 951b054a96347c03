//! Root CA rotation (`swarm ca --rotate`), the cross-signed way of swarmkit, without a
//! restart and without a moment in which two nodes of the swarm refuse each other.
//!
//! 1. The leader makes a new root and has the current root sign it (the *cross-signed* new
//!    root, [`mesh_ca::RootCa::cross_sign`]) and writes both ([`Command::StartCaRotation`]).
//!    From then on every certificate the leader issues (renewal, join) comes from the new
//!    root and is presented with the cross-signed copy after it, so that the nodes that still
//!    trust only the current root accept it.
//! 2. Every heartbeat carries the node's TLS state (the key that signed its certificate and
//!    the root it trusts, [`NodeTlsState`]); the answer says which key the leader wants its
//!    certificate from, and a node whose certificate is from another renews at once
//!    (`certs::cert_loop`).
//! 3. When every node that has not left has a certificate from the new root (a Down node too:
//!    as with Docker, the rotation waits for every registered node, or its removal), the
//!    leader makes the new root the current one ([`Command::FinishCaRotation`]). Heartbeat
//!    answers hand it to every node still trusting the old one, which trusts it from its
//!    next handshake on ([`mesh_ca::LiveTls::replace`]); the certificates keep presenting the
//!    cross-signed copy, so the nodes that have not switched yet still accept them.
//!
//! From then on a certificate from the old root is refused, and join tokens carry the new
//! root's digest. The heartbeat states live in the leader's memory (the dispatcher); a new
//! leader knows every live node's within one heartbeat.

use std::sync::Arc;

use mesh_api::{ApiError, CaAnswer, CaRotation, Cluster, NodeState, TlsInfo};
use mesh_ca::{NodeTls, RootCa};
use tracing::{info, warn};

use super::{Member, RaftNode};
use crate::peer::{HeartbeatAck, NodeTlsState};
use crate::state::{Command, StoreState};

/// The root that signs the certificates the leader issues now, and the intermediates they are
/// presented with.
pub(super) fn signing_ca(c: &Cluster) -> Result<(RootCa, String), ApiError> {
    let (cert, key, chain) = match &c.ca_rotation {
        Some(r) => (&r.cert_pem, &r.key_pem, &r.cross_pem),
        None => (&c.ca_cert_pem, &c.ca_key_pem, &c.ca_chain_pem),
    };
    let ca = RootCa::from_pem(cert, key).map_err(ApiError::internal)?;
    Ok((ca, chain.clone()))
}

/// The root the swarm wants every node to have a certificate from and to trust: the new one
/// while a rotation goes on.
fn desired_root(c: &Cluster) -> &str {
    c.ca_rotation
        .as_ref()
        .map_or(&c.ca_cert_pem, |r| &r.cert_pem)
}

fn key_id(cert_pem: &str) -> String {
    mesh_ca::cert_key_id(cert_pem).unwrap_or_default()
}

/// What the swarm wants of its nodes' TLS, as Docker shows it (`ClusterInfo.TLSInfo`).
pub(super) fn cluster_tls_info(c: &Cluster) -> TlsInfo {
    tls_info(desired_root(c))
}

/// `root_pem` as trust root and as the issuer of a certificate.
fn tls_info(root_pem: &str) -> TlsInfo {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let (subject, key) = mesh_ca::subject_and_public_key(root_pem).unwrap_or_default();
    TlsInfo {
        trust_root: root_pem.to_string(),
        cert_issuer_subject: b64(&subject),
        cert_issuer_public_key: b64(&key),
    }
}

/// A node's TLS state, as its heartbeat reports it.
pub(super) fn tls_state(tls: &NodeTls) -> NodeTlsState {
    NodeTlsState {
        trust_root: key_id(&tls.ca_cert_pem),
        issuer: mesh_ca::issuer_key_id(&tls.cert_pem).unwrap_or_default(),
    }
}

impl Member {
    /// The leader's part of a heartbeat answer: the key the node's certificate should be
    /// from, and the root to trust when it trusts another.
    pub(super) fn ca_advice(&self, c: &Cluster, node_id: &str, ack: &mut HeartbeatAck) {
        let seen = self.dispatcher.tls_of(node_id);
        ack.issuer_key_id = Some(key_id(desired_root(c)));
        if seen.is_some_and(|s| s.trust_root != key_id(&c.ca_cert_pem)) {
            ack.trust_root_pem = Some(c.ca_cert_pem.clone());
        }
    }

    /// The TLS state of a node as Docker shows it (`Description.TLSInfo`): the roots it
    /// trusts and that issued its certificate, when they are the swarm's current or desired
    /// root (an older root shows empty).
    pub(super) fn node_tls_info(&self, c: &Cluster, node_id: &str) -> Option<TlsInfo> {
        let seen = self.dispatcher.tls_of(node_id)?;
        let known = [desired_root(c), c.ca_cert_pem.as_str()];
        let find = |id: &str| known.into_iter().find(|pem| key_id(pem) == id);
        let issuer = find(&seen.issuer).map(tls_info).unwrap_or_default();
        Some(TlsInfo {
            trust_root: find(&seen.trust_root).unwrap_or_default().to_string(),
            ..issuer
        })
    }

    /// Docker's `TLSStatus` of a node: `Ready`, `Needs Rotation` or `Unknown`.
    pub(super) fn tls_status(&self, c: &Cluster, node_id: &str) -> String {
        let want = key_id(desired_root(c));
        match self.dispatcher.tls_of(node_id) {
            None => "Unknown",
            Some(s) if s.issuer == want && s.trust_root == want => "Ready",
            Some(_) => "Needs Rotation",
        }
        .to_string()
    }

    /// `swarm ca`: the desired root and how many nodes have moved to it.
    pub(super) fn ca_answer(&self, state: &StoreState) -> Result<CaAnswer, ApiError> {
        let c = state
            .cluster
            .as_ref()
            .ok_or_else(|| ApiError::internal("cluster not initialized"))?;
        let root = desired_root(c);
        let want = key_id(root);
        let sha = ring::digest::digest(&ring::digest::SHA256, root.as_bytes());
        let hex: String = sha.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let mut a = CaAnswer {
            root_pem: root.to_string(),
            root_digest: format!("sha256:{hex}"),
            rotating: c.ca_rotation.is_some(),
            ..CaAnswer::default()
        };
        for n in state.nodes.values().filter(|n| n.state != NodeState::Left) {
            a.nodes += 1;
            if let Some(s) = self.dispatcher.tls_of(&n.id) {
                a.tls_rotated += u32::from(s.issuer == want);
                a.trust_rotated += u32::from(s.trust_root == want);
            }
        }
        Ok(a)
    }

    /// `swarm ca --rotate` on the leader: a new root, cross-signed by the current one.
    pub(super) async fn leader_rotate_ca(&self, node: &RaftNode) -> Result<(), ApiError> {
        let state = self.read(node).await?;
        let c = state
            .cluster
            .as_ref()
            .ok_or_else(|| ApiError::internal("cluster not initialized"))?;
        let current =
            RootCa::from_pem(&c.ca_cert_pem, &c.ca_key_pem).map_err(ApiError::internal)?;
        let next = RootCa::generate().map_err(ApiError::internal)?;
        let cross_pem = current.cross_sign(&next).map_err(ApiError::internal)?;
        self.write(
            node,
            Command::StartCaRotation {
                rotation: CaRotation {
                    cert_pem: next.cert_pem().to_string(),
                    key_pem: next.key_pem().to_string(),
                    cross_pem,
                },
            },
        )
        .await?;
        info!(root = next.digest(), "root CA rotation started");
        Ok(())
    }

    /// While leading: ends a rotation once every node that has not left has a certificate
    /// from the new root.
    pub(super) async fn ca_rotation_step(&self, node: &RaftNode) {
        let done = node
            .sm
            .with_state(|s| {
                let r = s.cluster.as_ref()?.ca_rotation.as_ref()?;
                let want = key_id(&r.cert_pem);
                s.nodes
                    .values()
                    .filter(|n| n.state != NodeState::Left)
                    .all(|n| {
                        self.dispatcher
                            .tls_of(&n.id)
                            .is_some_and(|t| t.issuer == want)
                    })
                    .then(|| r.cert_pem.clone())
            })
            .await;
        let Some(cert_pem) = done else { return };
        match self
            .write(node, Command::FinishCaRotation { cert_pem })
            .await
        {
            Ok(()) => info!("root CA rotation: every node has a certificate from the new root, which is now the swarm's root"),
            Err(e) => warn!("ending the root CA rotation: {e}"),
        }
    }

    /// A node trusts the root a heartbeat answer hands it (the swarm's root changed), from
    /// its next handshake on, and keeps it in `node.json`.
    pub(super) fn trust_root(self: &Arc<Self>, root_pem: &str) {
        let _g = self.tls_lock();
        let local = self.local();
        if local.ca_cert_pem == root_pem {
            return;
        }
        let tls = NodeTls {
            ca_cert_pem: root_pem.to_string(),
            cert_pem: local.cert_pem.clone(),
            key_pem: local.key_pem.clone(),
        };
        if let Err(e) = self.live_tls.replace(&tls) {
            warn!("trusting the swarm's new root CA: {e}");
            return;
        }
        self.update_local(|l| l.ca_cert_pem = tls.ca_cert_pem.clone());
        // Pooled connections were verified against the old root: new calls reconnect.
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        info!(
            root = mesh_ca::cert_der_from_pem(root_pem)
                .map(|d| mesh_ca::ca_digest(&d))
                .unwrap_or_default(),
            "trusting the swarm's new root CA"
        );
    }
}
