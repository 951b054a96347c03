//! What the node's daemon asks of its member's Raft instance: whether it runs, its figures
//! for `mesh info` and the metrics, the first records of a new swarm, and
//! `--force-new-cluster`. The daemon (in `mesh-agent`) never holds the Raft handle itself.

use std::time::Duration;

use mesh_api::{ApiError, Cluster, Node, RaftInfo};
use mesh_ca::{JoinToken, RootCa};
use tracing::warn;

use super::Member;
use crate::metrics::{ClusterSummary, RaftFigures, Snapshot};
use crate::state::{Command, CommandResult};
use crate::storage;

/// How long a manager that bootstraps a swarm waits to be elected by itself.
const SELF_ELECTION: Duration = Duration::from_secs(10);

/// What `--force-new-cluster` did.
#[derive(Debug)]
pub struct ForcedCluster {
    /// The rebuilt store (see `storage::rebuild_single_voter`).
    pub rebuilt: storage::Rebuilt,
    /// The swarm's worker join token, as `swarm init` answers it.
    pub worker_token: String,
}

impl Member {
    /// Whether this member runs Raft (a manager whose Raft instance started).
    pub async fn runs_raft(&self) -> bool {
        self.raft().await.is_some()
    }

    /// The number of Raft voters as this manager sees them (`None`: it runs no Raft).
    pub async fn raft_voters(&self) -> Option<usize> {
        let node = self.raft().await?;
        let n = node
            .raft
            .metrics()
            .borrow()
            .membership_config
            .voter_ids()
            .count();
        Some(n)
    }

    /// This manager's Raft figures for `mesh info`, with its store's applied index and
    /// digest, and the leader's node ID (`None`: it runs no Raft).
    pub async fn raft_info(&self) -> Option<(RaftInfo, Option<String>)> {
        let node = self.raft().await?;
        let m = node.raft.metrics().borrow().clone();
        let leader = m.current_leader;
        let (applied, digest) = node.sm.applied_digest().await;
        let info = RaftInfo {
            raft_id: node.raft_id,
            term: m.current_term,
            state: format!("{:?}", m.state),
            leader_raft_id: leader,
            last_log_index: m.last_log_index,
            last_applied: m.last_applied.map(|l| l.index),
            voters: m.membership_config.voter_ids().collect(),
            state_applied: applied,
            state_digest: Some(digest),
        };
        let leader_id = node
            .sm
            .with_state(|s| {
                s.managers()
                    .find(|n| Some(n.raft_id) == leader)
                    .map(|n| n.id.clone())
            })
            .await;
        Some((info, leader_id))
    }

    /// The control plane's figures for a metrics scrape: Raft's on a manager, the cluster's
    /// on the leader, computed now from the store.
    pub async fn metrics_snapshot(&self) -> Snapshot {
        let mut snap = Snapshot::default();
        let Some(node) = self.raft().await else {
            return snap;
        };
        let raft = RaftFigures::of(&node.raft.metrics().borrow());
        if raft.is_leader {
            snap.cluster = Some(node.sm.with_state(ClusterSummary::of).await);
        }
        snap.raft = Some(raft);
        snap
    }

    /// The first records of a new swarm, on the manager that `swarm init` started: once it
    /// elected itself, the cluster record with this node, then the `ingress` network.
    pub async fn bootstrap(&self, cluster: Cluster, node: Node, now: u64) -> Result<(), ApiError> {
        let raft = self
            .raft()
            .await
            .ok_or_else(|| ApiError::internal("raft did not start"))?;
        self.wait_self_elected().await?;
        let r = raft
            .raft
            .client_write(Command::InitCluster { cluster, node })
            .await
            .map_err(|e| ApiError::internal(format!("cannot write the cluster record: {e}")))?;
        if let CommandResult::Err(e) = r.data {
            return Err(ApiError::internal(e.to_string()));
        }
        let ingress = crate::networks::ingress(now);
        let r = raft
            .raft
            .client_write(Command::CreateNetwork { network: ingress })
            .await
            .map_err(|e| ApiError::internal(format!("cannot create the ingress network: {e}")))?;
        match r.data {
            CommandResult::Ok => Ok(()),
            CommandResult::Err(e) => Err(ApiError::internal(e.to_string())),
        }
    }

    /// `swarm init --force-new-cluster`: stops this manager's Raft instance, rebuilds its
    /// store as a one-voter group from what it committed (`storage::rebuild_single_voter`),
    /// starts Raft again on whatever the store then holds and waits until it elected itself.
    /// The Raft slot stays locked throughout the rebuild, so nothing starts Raft on the old
    /// store meanwhile.
    pub async fn force_new_cluster(&self) -> Result<ForcedCluster, ApiError> {
        let key = self.data_key_for_raft().await?;
        let rebuilt = {
            let mut slot = self.raft.write().await;
            let old = slot.take();
            if let Some(node) = &old {
                if let Err(e) = node.raft.shutdown().await {
                    warn!("raft shutdown: {e}");
                }
            }
            let local = self.local();
            let (path, id, addr) = (self.raft_path(), local.raft_id, &local.advertise_addr);
            let rebuilt = match &old {
                Some(node) => storage::rebuild_single_voter_of(&node.sm, &path, id, addr).await,
                None => storage::rebuild_single_voter(&path, Some(key.clone()), id, addr).await,
            }
            .map_err(ApiError::internal);
            drop(old);
            let started = self.open_raft(&mut slot, key, false).await;
            let rebuilt = rebuilt?;
            started?;
            rebuilt
        };
        self.wait_self_elected().await?;
        let raft = self
            .raft()
            .await
            .ok_or_else(|| ApiError::internal("raft did not start"))?;
        let worker_token = raft
            .sm
            .with_state(|s| {
                let c = s.cluster.as_ref()?;
                let ca = RootCa::from_pem(&c.ca_cert_pem, &c.ca_key_pem).ok()?;
                Some(JoinToken::new(&ca.digest(), &c.worker_secret).to_string())
            })
            .await
            .ok_or_else(|| ApiError::internal("cluster not initialized"))?;
        Ok(ForcedCluster {
            rebuilt,
            worker_token,
        })
    }

    /// Waits until this manager, the only voter, leads.
    async fn wait_self_elected(&self) -> Result<(), ApiError> {
        let raft = self
            .raft()
            .await
            .ok_or_else(|| ApiError::internal("raft did not start"))?;
        raft.raft
            .wait(Some(SELF_ELECTION))
            .current_leader(self.local().raft_id, "self-election")
            .await
            .map_err(|e| ApiError::internal(format!("raft did not elect this node: {e}")))?;
        Ok(())
    }
}
