//! Node certificates while a node runs: renewal before expiry, a new certificate when the
//! node's role changes, and refusal of removed nodes on the control port.
//!
//! Each node's `cert_loop` picks, for every certificate it gets, a random point between
//! 50 % and 80 % of its validity (swarmkit's window, so that the nodes of a swarm made
//! together do not all renew at once) and renews there: a new key pair and CSR
//! ([`mesh_ca::NodeKey`]), [`PeerRequest::RenewCert`] to the leader, which signs only for the
//! node the presenting certificate names, with the node's role in the store as OU and the
//! cluster's `--cert-expiry`. The node writes the certificate and key to `node.json` (a
//! manager's key sealed, as `save_local` does) and swaps them into its [`mesh_ca::LiveTls`],
//! so both its server and its client present them from the next handshake on, without a
//! restart; its pooled connections are dropped so that they reconnect with it. A node whose
//! certificate names another role than the store (promote, demote: the heartbeat answer
//! carries the role) renews at once, as does one whose certificate outlives the cluster's
//! `--cert-expiry` (also in the heartbeat answer) by more than half of it, so that a shortened
//! setting reaches the certificates already issued.
//!
//! A manager refuses the control-port requests of a node its store has as Left, or, while it
//! leads, does not have at all (removed); a follower passes the requests that the leader
//! checks by node ID anyway (heartbeats, polls, reports, renewal), because a node that joined
//! a moment ago may not be in its store yet. Raft messages are not checked here: a manager's
//! store is empty until the leader's entries reach it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_api::{ApiError, ErrorKind, NodeRole, NodeState};
use mesh_ca::{NodeKey, NodeTls, PeerIdentity};
use rand::Rng;
use tracing::{debug, info, warn};

use super::{Member, RaftNode};
use crate::peer::{PeerRequest, PeerResponse};

/// Docker's minimum `--cert-expiry`.
pub const MIN_CERT_EXPIRY: Duration = Duration::from_secs(3600);

/// 0: [`MIN_CERT_EXPIRY`].
static MIN_EXPIRY_SECS: AtomicU64 = AtomicU64::new(0);

/// How often a node looks at its certificate (a comparison of times; renewal itself is rare).
const CHECK: Duration = Duration::from_secs(1);
/// The longest wait between two attempts after failed renewals.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The clock difference between a node and the leader that [`outlives_expiry`] tolerates
/// (node certificates are backdated by as much).
const SKEW: Duration = Duration::from_secs(3600);
/// Where in a certificate's validity it is renewed: a random point in this window.
const RENEW_WINDOW: (f64, f64) = (0.5, 0.8);

/// Tests only: lets this process's leader accept a `--cert-expiry` down to `min` (the hidden
/// `meshd --min-cert-expiry`), so that renewals happen within a test's minutes.
pub fn set_min_cert_expiry(min: Duration) {
    MIN_EXPIRY_SECS.store(min.as_secs().max(1), Ordering::Relaxed);
}

fn min_cert_expiry() -> Duration {
    match MIN_EXPIRY_SECS.load(Ordering::Relaxed) {
        0 => MIN_CERT_EXPIRY,
        s => Duration::from_secs(s),
    }
}

/// Refuses a `--cert-expiry` under the minimum, with Docker's message.
pub(super) fn check_cert_expiry(secs: u64) -> Result<(), ApiError> {
    let min = min_cert_expiry();
    if secs < min.as_secs() {
        return Err(ApiError::invalid(format!(
            "minimum certificate expiry time is: {}",
            go_duration(min)
        )));
    }
    Ok(())
}

/// A whole number of seconds as Go prints a `time.Duration`: `1h0m0s`, `1m30s`, `30s`.
fn go_duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, m, s) => format!("{h}h{m}m{s}s"),
    }
}

/// When a certificate of this validity is renewed, `at` (0..1) through the renewal window.
fn renewal_time(v: &mesh_ca::CertValidity, at: f64) -> SystemTime {
    let (lo, hi) = RENEW_WINDOW;
    let fraction = lo + (hi - lo) * at.clamp(0.0, 1.0);
    v.issued_at + v.lifetime().mul_f64(fraction)
}

/// Whether a certificate valid until `expires_at` outlives the cluster's `--cert-expiry`
/// (`expiry_secs`, 0: not known) counted from `now`, by more than half of it and at least
/// [`SKEW`]: the setting was shortened since it was issued, and it is renewed at once. The
/// margin keeps a node whose clock is behind the leader's from renewing again and again.
fn outlives_expiry(expires_at: SystemTime, expiry_secs: u64, now: SystemTime) -> bool {
    let expiry = Duration::from_secs(expiry_secs);
    expiry_secs > 0 && expires_at > now + expiry + (expiry / 2).max(SKEW)
}

/// Whether `cert_pem` names another role than `role` (or cannot be read).
fn names_other_role(cert_pem: &str, role: NodeRole) -> bool {
    let want = match role {
        NodeRole::Manager => mesh_ca::Role::Manager,
        NodeRole::Worker => mesh_ca::Role::Worker,
    };
    mesh_ca::cert_der_from_pem(cert_pem)
        .and_then(|der| mesh_ca::peer_identity(&der))
        .map_or(true, |id| id.role != want)
}

fn removed(node_id: &str) -> ApiError {
    ApiError::not_found(format!("no such node: {node_id} (removed from the swarm)"))
}

impl Member {
    /// Remembers the cluster's `--cert-expiry` a heartbeat answer gave.
    pub(super) fn note_cert_expiry(&self, secs: u64) {
        self.cert_expiry.store(secs, Ordering::Relaxed);
    }

    /// Renews this node's certificate in its renewal window, and at once when its role
    /// changed; see the module's documentation.
    pub(super) async fn cert_loop(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        let mut tick = tokio::time::interval(CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The certificate the renewal time was drawn for, that time, and its expiry.
        let mut plan: Option<(String, SystemTime, SystemTime)> = None;
        let mut failures = 0u32;
        let mut not_before = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            if tokio::time::Instant::now() < not_before {
                continue;
            }
            let local = self.local();
            if plan
                .as_ref()
                .is_none_or(|(pem, _, _)| *pem != local.cert_pem)
            {
                plan = match mesh_ca::cert_validity(&local.cert_pem) {
                    Ok(v) => {
                        let at = renewal_time(&v, rand::thread_rng().gen::<f64>());
                        Some((local.cert_pem.clone(), at, v.expires_at))
                    }
                    Err(e) => {
                        warn!("reading the node certificate: {e}");
                        let now = SystemTime::now();
                        Some((local.cert_pem.clone(), now, now))
                    }
                };
            }
            let now = SystemTime::now();
            let expiry = self.cert_expiry.load(Ordering::Relaxed);
            let due = plan.as_ref().is_some_and(|(_, at, expires)| {
                now >= *at || outlives_expiry(*expires, expiry, now)
            });
            let role_changed = names_other_role(&local.cert_pem, local.role);
            let want = self
                .want_issuer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            // A root rotation: the leader issues certificates from another root now.
            let other_root = want.is_some_and(|w| {
                mesh_ca::issuer_key_id(&local.cert_pem).is_ok_and(|have| have != w)
            });
            if !due && !role_changed && !other_root {
                continue;
            }
            match self.renew_cert().await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    let wait = CHECK.saturating_mul(1 << failures.min(5)).min(MAX_BACKOFF);
                    debug!(?wait, "renewing the node certificate: {e}");
                    if failures == 3 {
                        warn!("renewing the node certificate: {e}");
                    }
                    not_before = tokio::time::Instant::now() + wait;
                }
            }
        }
    }

    /// Gets a certificate for a new key from the leader, writes both to `node.json` and
    /// presents them from the next handshake on.
    async fn renew_cert(self: &Arc<Self>) -> Result<(), ApiError> {
        let local = self.local();
        let key = NodeKey::generate().map_err(ApiError::internal)?;
        let req = PeerRequest::RenewCert {
            node_id: local.node_id.clone(),
            csr_pem: key.csr_pem().map_err(ApiError::internal)?,
        };
        let cert_pem = match self.to_leader(req).await {
            PeerResponse::Cert { cert_pem } => cert_pem,
            PeerResponse::Error(e) => return Err(e),
            other => {
                return Err(ApiError::internal(format!(
                    "unexpected answer to a renewal: {other:?}"
                )))
            }
        };
        let id = mesh_ca::cert_der_from_pem(&cert_pem)
            .and_then(|der| mesh_ca::peer_identity(&der))
            .map_err(ApiError::internal)?;
        if id.node_id != local.node_id || id.cluster_id != local.cluster_id {
            return Err(ApiError::internal(
                "the leader signed a certificate for another node",
            ));
        }
        {
            // The trusted root as it is now: a heartbeat answer may have changed it meanwhile.
            let _g = self.tls_lock();
            let tls = NodeTls {
                ca_cert_pem: self.local().ca_cert_pem,
                cert_pem: cert_pem.clone(),
                key_pem: key.key_pem().to_owned(),
            };
            // Fails, changing nothing, if the certificate is not for this key.
            self.live_tls.replace(&tls).map_err(ApiError::internal)?;
            self.update_local(|l| {
                l.cert_pem = tls.cert_pem.clone();
                l.key_pem = tls.key_pem.clone();
            });
        }
        // Pooled connections were made with the old certificate: new calls reconnect.
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let expires = mesh_ca::cert_validity(&cert_pem)
            .ok()
            .and_then(|v| v.expires_at.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        info!(role = ?id.role, expires, "node certificate renewed");
        Ok(())
    }

    /// The leader signs a renewal CSR of `node_id` (already checked to be the presenting
    /// certificate's node) with its role in the store and the cluster's `--cert-expiry`.
    pub(super) async fn leader_renew_cert(
        &self,
        node: &RaftNode,
        node_id: &str,
        csr_pem: &str,
    ) -> Result<String, ApiError> {
        let state = self.read(node).await?;
        let cluster = state
            .cluster
            .as_ref()
            .ok_or_else(|| ApiError::internal("cluster not initialized"))?;
        let n = state
            .nodes
            .get(node_id)
            .filter(|n| n.state != NodeState::Left)
            .ok_or_else(|| removed(node_id))?;
        let role = match n.role {
            NodeRole::Manager => mesh_ca::Role::Manager,
            NodeRole::Worker => mesh_ca::Role::Worker,
        };
        let (ca, chain) = super::ca_rotation::signing_ca(cluster)?;
        let mut cert_pem = ca
            .sign_node_csr_valid_for(
                csr_pem,
                node_id,
                role,
                &cluster.id,
                Duration::from_secs(cluster.settings.cert_expiry_secs),
            )
            .map_err(|e| ApiError::invalid(format!("cannot sign the node certificate: {e}")))?;
        cert_pem.push_str(&chain);
        debug!(node = n.hostname, ?role, "node certificate issued");
        Ok(cert_pem)
    }

    /// Why this node refuses `req` from `peer` (a certificate of this swarm), if it does: a
    /// removed node, or a direct management call from a node that is not a manager.
    pub(super) async fn refuse_peer(
        &self,
        peer: &PeerIdentity,
        req: &PeerRequest,
    ) -> Option<ApiError> {
        if matches!(req, PeerRequest::Raft(_)) {
            return None;
        }
        // Workers keep no store: they answer managers' log requests only.
        let node = self.raft().await?;
        let found = node
            .sm
            .with_state(|s| {
                s.nodes
                    .get(&peer.node_id)
                    .map(|n| (n.state == NodeState::Left, n.role == NodeRole::Manager))
            })
            .await;
        match found {
            Some((true, _)) => Some(removed(&peer.node_id)),
            Some((false, manager)) => (matches!(req, PeerRequest::Api(_)) && !manager).then(|| {
                ApiError::new(
                    ErrorKind::PermissionDenied,
                    "only managers forward management calls",
                )
            }),
            None => {
                let leading = {
                    let m = node.raft.metrics();
                    let m = m.borrow();
                    m.current_leader == Some(node.raft_id)
                };
                let leader_checks_it = matches!(
                    req,
                    PeerRequest::Heartbeat { .. }
                        | PeerRequest::Leave { .. }
                        | PeerRequest::AddVoter { .. }
                        | PeerRequest::Assignments { .. }
                        | PeerRequest::TaskStatus { .. }
                        | PeerRequest::RenewCert { .. }
                        | PeerRequest::Forwarded(_)
                );
                (leading || !leader_checks_it).then(|| removed(&peer.node_id))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use mesh_ca::RootCa;

    use super::*;

    #[test]
    fn minimum_expiry_in_go_words() {
        assert_eq!(go_duration(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(go_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(go_duration(Duration::from_secs(30)), "30s");
        assert_eq!(
            check_cert_expiry(3599).unwrap_err().message,
            "minimum certificate expiry time is: 1h0m0s"
        );
        assert!(check_cert_expiry(3600).is_ok());
    }

    #[test]
    fn renewed_between_half_and_four_fifths_of_the_validity() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let v = mesh_ca::CertValidity {
            issued_at: t0,
            expires_at: t0 + Duration::from_secs(100),
        };
        assert_eq!(renewal_time(&v, 0.0), t0 + Duration::from_secs(50));
        assert_eq!(renewal_time(&v, 1.0), t0 + Duration::from_secs(80));
        assert_eq!(renewal_time(&v, 7.0), t0 + Duration::from_secs(80));
    }

    #[test]
    fn a_shortened_expiry_reaches_longer_certificates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let in_90_days = now + Duration::from_secs(90 * 86400);
        assert!(outlives_expiry(in_90_days, 40, now));
        assert!(!outlives_expiry(in_90_days, 0, now));
        assert!(!outlives_expiry(now + Duration::from_secs(39), 40, now));
        assert!(!outlives_expiry(in_90_days, 90 * 86400, now));
        // Issued by a leader whose clock is ahead: not renewed again.
        let ahead = now + Duration::from_secs(600);
        assert!(!outlives_expiry(ahead + Duration::from_secs(40), 40, now));
        // 90 days shortened to 30: the 90-day certificates go at once, not to 80.
        assert!(outlives_expiry(in_90_days, 30 * 86400, now));
        assert!(!outlives_expiry(in_90_days, 80 * 86400, now));
    }

    #[test]
    fn a_role_change_is_seen_in_the_certificate() {
        let ca = RootCa::generate().unwrap();
        let key = NodeKey::generate().unwrap();
        let pem = ca
            .sign_node_csr(&key.csr_pem().unwrap(), "n1", mesh_ca::Role::Worker, "c")
            .unwrap();
        assert!(!names_other_role(&pem, NodeRole::Worker));
        assert!(names_other_role(&pem, NodeRole::Manager));
        assert!(names_other_role("garbage", NodeRole::Worker));
    }
}
