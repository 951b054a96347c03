//! A node's life inside a swarm: its control-port server, its Raft instance while it is a
//! manager, its heartbeats, and the leader's handling of joins, heartbeats and management calls.
//!
//! Every management call runs on the leader: a follower forwards it once (never twice, so no
//! forwarding loops), and a manager that cannot reach a leader answers "no leader" within a few
//! seconds instead of hanging.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex, RwLock as StdRwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mesh_api::answers::to_response;
use mesh_api::{
    ApiError, BlobKind, ErrorKind, IdAnswer, MessageAnswer, Node, NodeRole, NodeState, NodeSummary,
    Request, Response, TokenAnswer, UnlockKeyAnswer,
};
use mesh_ca::{JoinToken, NodeTls, RootCa};
use openraft::{BasicNode, ChangeMembers, Config, ServerState, SnapshotPolicy};
use serde_json::json;
use tokio::sync::{watch, RwLock};
use tracing::{debug, info, warn};

use crate::datakey::DataKey;
use crate::dispatcher::{assigned_to, assignments_digest, ended_on, POLL_HOLD};
use crate::dispatcher::{Dispatcher, Verdict, HEARTBEAT_PERIOD};
use crate::gossipkeys;
use crate::local::LocalState;
use crate::network::Network;
use crate::node_agent::NodeAgent;
use crate::orchestrator::Orchestrator;
use crate::peer::{HeartbeatAck, JoinAccept, JoinRequest, PeerRequest, PeerResponse, RaftRequest};
use crate::raft_types::Raft;
use crate::services;
use crate::state::{Command, CommandResult, StoreState};
use crate::storage::{self, StateMachineStore};

mod ca_rotation;
mod certs;
mod forward;
mod raft_api;

pub use certs::set_min_cert_expiry;
pub use raft_api::ForcedCluster;

/// How long a management call waits for a leader or a commit before saying there is none.
const LEADER_WAIT: Duration = Duration::from_secs(4);
const COMMIT_TIMEOUT: Duration = Duration::from_secs(4);
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// A leader that has not heard from a quorum for this long does not answer.
const QUORUM_STALE_MS: u64 = 1500;
/// Connections per peer for forwarded calls.
const POOL: usize = 4;

/// The wall clock in seconds since the epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The wall clock in milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Raft timing: elections within ~1 s of a leader's death, so failover stays far below
/// swarmkit's 10 s.
pub fn raft_config() -> Arc<Config> {
    let cfg = Config {
        cluster_name: "mesh".into(),
        heartbeat_interval: 100,
        election_timeout_min: 300,
        election_timeout_max: 600,
        install_snapshot_timeout: 5000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(5000),
        max_in_snapshot_log_to_keep: 1000,
        ..Default::default()
    };
    Arc::new(cfg.validate().expect("static raft config is valid"))
}

/// The Raft instance of a manager and its state machine.
#[derive(Clone)]
pub(crate) struct RaftNode {
    pub raft: Raft,
    pub sm: StateMachineStore,
    pub raft_id: u64,
}

/// Something the member asks the daemon to do about its own life.
#[derive(Debug)]
pub enum MemberEvent {
    /// The cluster removed this node: leave, wiping the local state.
    Removed,
}

/// What a member reports to the daemon that runs it.
#[derive(Clone)]
pub struct Hooks {
    pub events: tokio::sync::mpsc::UnboundedSender<MemberEvent>,
    /// The daemon's control-plane instruments (they outlive members).
    pub metrics: crate::metrics::Metrics,
}

/// Where the leader is, from this manager's view.
type Leader = forward::Leader<RaftNode>;

/// A node inside a swarm: its identity and TLS, Raft while it manages, its connections to
/// the other members, and its node's agent.
pub struct Member {
    pub data_dir: PathBuf,
    local: StdRwLock<LocalState>,
    client_tls: Arc<rustls::ClientConfig>,
    /// The node certificate both TLS sides present, replaced on renewal (`certs`).
    live_tls: mesh_ca::LiveTls,
    raft: RwLock<Option<RaftNode>>,
    dispatcher: Dispatcher,
    shutdown: watch::Sender<bool>,
    clients: StdMutex<HashMap<String, mesh_rpc::Client>>,
    next_client: std::sync::atomic::AtomicUsize,
    events: tokio::sync::mpsc::UnboundedSender<MemberEvent>,
    metrics: crate::metrics::Metrics,
    tasks: StdMutex<Vec<tokio::task::JoinHandle<()>>>,
    pub agent: Arc<dyn NodeAgent>,
    orchestrator: tokio::sync::Mutex<Orchestrator>,
    /// One fetch, creation, re-wrap or removal of the data key at a time.
    data_key_lock: tokio::sync::Mutex<()>,
    /// Held by the leader over each change of the Raft voters together with the roles it
    /// follows: a voter added for a promoted manager (checked, caught up, added) and a
    /// demotion or leave (voter removed, role written) never interleave. Interleaved, a
    /// node demoted while it was being added became a voter after its role said worker; it
    /// stopped Raft, and two voters with one gone had no quorum: no leader.
    membership_lock: tokio::sync::Mutex<()>,
    /// The data key once opened, and the unlock key its file is wrapped with (`None`: a key
    /// kept beside it). With autolock the key file cannot be opened without the unlock key,
    /// so the open key lives here for the daemon's life.
    keys: StdMutex<Option<Keys>>,
    /// Whether `node.json` was written with the TLS key sealed since this member started.
    tls_key_sealed: std::sync::atomic::AtomicBool,
    /// The cluster's `--cert-expiry` (seconds) from the last heartbeat answer; 0: not known.
    cert_expiry: std::sync::atomic::AtomicU64,
    /// The CA key the leader wants this node's certificate from (last heartbeat answer).
    want_issuer: StdMutex<Option<String>>,
    /// Held while the node's certificate or trusted root changes (`node.json` and
    /// [`mesh_ca::LiveTls`] together).
    tls_update: StdMutex<()>,
}

/// A manager's open data key and how its file is wrapped.
#[derive(Clone, Debug)]
pub struct Keys {
    pub dek: DataKey,
    pub wrapped_with: Option<Vec<u8>>,
}

/// A new unlock key (32 random bytes, base64), as `swarm init --autolock`, `swarm update
/// --autolock=true` and `unlock-key --rotate` make.
pub fn new_unlock_key() -> Result<String, ApiError> {
    use base64::Engine as _;
    let k = DataKey::generate()?;
    Ok(base64::engine::general_purpose::STANDARD_NO_PAD.encode(k.bytes()))
}

/// How long a manager without the data key asks the others for it before its Raft
/// instance gives up starting.
const DATA_KEY_WAIT: Duration = Duration::from_secs(10);

/// How long `network rm` waits for the tasks of removed services to end (their drain and
/// stop grace), under the forwarding timeout.
const NETWORK_RM_WAIT: Duration = Duration::from_secs(8);

impl Member {
    /// Starts the member runtime on an already-bound control listener. With `init`, this node
    /// is the first manager: its Raft group is initialized with itself as the only voter.
    pub async fn start(
        data_dir: PathBuf,
        local: LocalState,
        listener: tokio::net::TcpListener,
        init: bool,
        hooks: Hooks,
        agent: Arc<dyn NodeAgent>,
        keys: Option<Keys>,
    ) -> Result<Arc<Member>, ApiError> {
        let tls = NodeTls {
            ca_cert_pem: local.ca_cert_pem.clone(),
            cert_pem: local.cert_pem.clone(),
            key_pem: local.key_pem.clone(),
        };
        let live_tls = mesh_ca::LiveTls::new(&tls).map_err(ApiError::internal)?;
        let server_tls = live_tls.server_config();
        let client_tls = live_tls.client_config();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let is_manager = local.role == NodeRole::Manager;
        let member = Arc::new(Member {
            data_dir,
            local: StdRwLock::new(local),
            client_tls,
            live_tls,
            raft: RwLock::new(None),
            dispatcher: Dispatcher::default(),
            data_key_lock: tokio::sync::Mutex::new(()),
            membership_lock: tokio::sync::Mutex::new(()),
            keys: StdMutex::new(keys),
            tls_key_sealed: std::sync::atomic::AtomicBool::new(false),
            cert_expiry: std::sync::atomic::AtomicU64::new(0),
            want_issuer: StdMutex::new(None),
            tls_update: StdMutex::new(()),
            shutdown,
            clients: StdMutex::new(HashMap::new()),
            next_client: std::sync::atomic::AtomicUsize::new(0),
            events: hooks.events,
            metrics: hooks.metrics,
            tasks: StdMutex::new(Vec::new()),
            agent: agent.clone(),
            orchestrator: tokio::sync::Mutex::new(Orchestrator::default()),
        });
        let from_store = if is_manager {
            member.start_raft(init).await?;
            member.gossip_from_store().await
        } else {
            None
        };
        let handler = Arc::new(PeerHandler {
            member: member.clone(),
        });
        let serve = tokio::spawn(mesh_rpc::serve(listener, server_tls, handler, shutdown_rx));
        let hb = tokio::spawn(member.clone().heartbeat_loop());
        let mon = tokio::spawn(member.clone().monitor_loop());
        let keyl = tokio::spawn(member.clone().key_loop());
        let certl = tokio::spawn(member.clone().cert_loop());
        if agent.has_plane() {
            let l = member.local();
            let ip = |a: &str| {
                a.parse::<std::net::SocketAddr>()
                    .ok()
                    .and_then(|s| match s.ip() {
                        std::net::IpAddr::V4(v4) => Some(v4),
                        _ => None,
                    })
            };
            let addr = ip(&l.advertise_addr).unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
            // Joined through the managers first, then any member the store knows: a
            // manager restarted while the other managers are away still finds the workers.
            let mut peers: Vec<std::net::Ipv4Addr> =
                l.managers.iter().filter_map(|m| ip(m)).collect();
            for m in from_store.iter().flat_map(|(_, members, _)| members) {
                if *m != addr && !peers.contains(m) {
                    peers.push(*m);
                }
            }
            let me = crate::node_agent::PlaneIdentity {
                node_id: l.node_id.clone(),
                cluster_id: l.cluster_id.clone(),
                addr,
                peers,
            };
            agent.start_plane(me);
            // The keys only: the underlay filter keeps what the previous run set from the
            // leader's answers (newer than this store may be) until the next answer.
            if let Some((keys, _, tasks)) = from_store {
                agent.give_gossip(keys, None);
                member
                    .tasks_lock()
                    .push(tokio::spawn(agent.clone().seed_plane(tasks)));
            }
        }
        let orch = tokio::spawn(member.clone().orchestrator_loop());
        let loops = agent.run(
            crate::node_agent::MemberLink(member.clone()),
            member.shutdown.subscribe(),
        );
        member
            .tasks_lock()
            .extend([serve, hb, mon, keyl, certl, orch].into_iter().chain(loops));
        Ok(member)
    }

    /// The gossip keys, member addresses and this node's tasks that this manager's own
    /// store holds (`None` without Raft or the data key). A restarted manager gossips with
    /// them at once (`Agent::seed_plane`): waiting for them from a leader would keep it out
    /// of gossip for an election (seconds, or for good without quorum), long enough for the
    /// other nodes to drop its tasks, which keep running, from their VIPs and DNS. The
    /// leader's answers replace them.
    async fn gossip_from_store(
        &self,
    ) -> Option<(
        Vec<crate::node_agent::GossipKey>,
        Vec<std::net::Ipv4Addr>,
        Vec<mesh_api::Task>,
    )> {
        let node = self.raft().await?;
        let key = match self.data_key().await {
            Ok(k) => k,
            Err(e) => {
                debug!("gossip keys from the store: {e}");
                return None;
            }
        };
        let id = self.local().node_id;
        let from_store = node
            .sm
            .with_state(|s| {
                (
                    gossipkeys::for_node(s, &id, Some(&key)),
                    gossipkeys::member_addrs(s),
                    assigned_to(s.tasks.values(), &id),
                )
            })
            .await;
        Some(from_store)
    }

    fn tasks_lock(&self) -> std::sync::MutexGuard<'_, Vec<tokio::task::JoinHandle<()>>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn local(&self) -> LocalState {
        self.local.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn tls_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.tls_update.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update_local(&self, f: impl FnOnce(&mut LocalState)) {
        let mut g = self.local.write().unwrap_or_else(|p| p.into_inner());
        let before = serde_json::to_string(&*g).ok();
        f(&mut g);
        if serde_json::to_string(&*g).ok() != before {
            if let Err(e) = self.save_local(&g) {
                warn!("saving node state: {e}");
            }
        }
    }

    pub fn raft_path(&self) -> PathBuf {
        self.data_dir.join("raft.redb")
    }

    async fn start_raft(&self, init: bool) -> Result<RaftNode, ApiError> {
        if let Some(r) = self.raft().await {
            return Ok(r);
        }
        // The store is sealed with the data key: a manager that joined or was promoted gets
        // it from the others first (they know it as a manager by now).
        let key = self.data_key_for_raft().await?;
        let mut slot = self.raft.write().await;
        if let Some(r) = slot.as_ref() {
            return Ok(r.clone());
        }
        self.open_raft(&mut slot, key, init).await
    }

    /// Opens the store and starts Raft on it, into the (held, empty) slot.
    async fn open_raft(
        &self,
        slot: &mut Option<RaftNode>,
        key: DataKey,
        init: bool,
    ) -> Result<RaftNode, ApiError> {
        let local = self.local();
        // Blocking: the file may still be locked for a moment by the previous daemon's
        // children (`storage::open`).
        let path = self.raft_path();
        let (log, sm) = tokio::task::spawn_blocking(move || {
            storage::open(&path, Some(key)).map_err(ApiError::internal)
        })
        .await
        .map_err(ApiError::internal)??;
        let network = Network {
            tls: self.client_tls.clone(),
        };
        let raft = Raft::new(local.raft_id, raft_config(), network, log, sm.clone())
            .await
            .map_err(|e| ApiError::internal(format!("cannot start raft: {e}")))?;
        if init {
            let mut members = BTreeMap::new();
            members.insert(local.raft_id, BasicNode::new(local.advertise_addr.clone()));
            raft.initialize(members)
                .await
                .map_err(|e| ApiError::internal(format!("cannot initialize raft: {e}")))?;
        }
        let node = RaftNode {
            raft,
            sm,
            raft_id: local.raft_id,
        };
        // Ends when this instance stops (its metrics channel closes).
        tokio::spawn(crate::metrics::watch_leader_changes(
            node.raft.metrics(),
            self.metrics.leader_changes.clone(),
        ));
        *slot = Some(node.clone());
        info!(raft_id = local.raft_id, init, "raft started");
        Ok(node)
    }

    async fn stop_raft(&self) {
        let node = self.raft.write().await.take();
        if let Some(node) = node {
            if let Err(e) = node.raft.shutdown().await {
                warn!("raft shutdown: {e}");
            }
            info!("raft stopped");
        }
    }

    /// Whether `raft_id` is in this manager's Raft membership (voter or learner); true when
    /// that cannot be told at once. As swarmkit's, a manager has a manager status, and cannot
    /// be removed, only while it is a member: the managers a `--force-new-cluster` left
    /// behind keep their role but are neither.
    fn is_raft_member(&self, raft_id: u64) -> bool {
        match self.raft.try_read() {
            Ok(slot) => slot.as_ref().is_none_or(|n| {
                n.raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .nodes()
                    .any(|(id, _)| *id == raft_id)
            }),
            Err(_) => true,
        }
    }

    /// This manager's data key (see `blobs`): from its data directory, else from another
    /// manager (a manager that joined or was promoted since the key was made), else, when
    /// every other manager answered that it has none, a new one.
    pub(crate) async fn data_key(&self) -> Result<DataKey, ApiError> {
        self.get_data_key(true).await
    }

    /// Registry credentials given with a service, sealed as secrets are (`None`: none given;
    /// `--with-registry-auth` was resolved by the daemon that took the request).
    async fn seal_registry_auth(
        &self,
        auth: Option<mesh_api::RegistryAuth>,
    ) -> Result<Option<Vec<u8>>, ApiError> {
        let Some(mesh_api::RegistryAuth::Credentials(c)) = auth else {
            return Ok(None);
        };
        let plain = serde_json::to_vec(&c).map_err(ApiError::internal)?;
        Ok(Some(self.data_key().await?.seal(&plain)?))
    }

    /// The data key, asked of the other managers for up to [`DATA_KEY_WAIT`] while they
    /// cannot be reached (a manager that just joined, one restarting with the others).
    async fn data_key_for_raft(&self) -> Result<DataKey, ApiError> {
        let deadline = tokio::time::Instant::now() + DATA_KEY_WAIT;
        loop {
            match self.get_data_key(true).await {
                Err(e)
                    if e.kind == ErrorKind::Unavailable
                        && tokio::time::Instant::now() < deadline =>
                {
                    debug!("data key: {e}");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                other => return other,
            }
        }
    }

    /// Writes the node's state as it is now (swarm init, once Raft has the cluster).
    pub fn persist_local(&self) -> Result<(), ApiError> {
        let g = self.local.write().unwrap_or_else(|p| p.into_inner());
        self.save_local(&g)
    }

    /// Writes the node's state: its TLS key sealed while it is a manager with the data key.
    fn save_local(&self, l: &LocalState) -> Result<(), ApiError> {
        match self.keys() {
            Some(k) if l.role == NodeRole::Manager => l.save_sealed(&self.data_dir, &k.dek),
            _ => l.save(&self.data_dir).map_err(ApiError::internal),
        }
    }

    fn keys(&self) -> Option<Keys> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_keys(&self, keys: Option<Keys>) {
        *self.keys.lock().unwrap_or_else(|p| p.into_inner()) = keys;
    }

    /// Forgets the data key and removes its file (leave, demotion).
    pub(crate) async fn forget_data_key(&self) {
        let _one_at_a_time = self.data_key_lock.lock().await;
        self.set_keys(None);
        self.tls_key_sealed
            .store(false, std::sync::atomic::Ordering::Relaxed);
        // The TLS key in the clear first: without the data key it could not be read again.
        {
            let g = self.local.write().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = g.save(&self.data_dir) {
                warn!("saving node state: {e}");
                return;
            }
        }
        let _ = std::fs::remove_file(self.data_dir.join(crate::datakey::KEY_FILE));
    }

    async fn get_data_key(&self, may_create: bool) -> Result<DataKey, ApiError> {
        let _one_at_a_time = self.data_key_lock.lock().await;
        if let Some(k) = self.keys() {
            return Ok(k.dek);
        }
        if let Some(k) = DataKey::load(&self.data_dir)? {
            self.set_keys(Some(Keys {
                dek: k.clone(),
                wrapped_with: None,
            }));
            return Ok(k);
        }
        let local = self.local();
        let mut unreachable = Vec::new();
        for addr in local
            .managers
            .iter()
            .filter(|a| **a != local.advertise_addr)
        {
            match self
                .call(addr, &PeerRequest::DataKey, Duration::from_secs(2))
                .await
            {
                Ok(PeerResponse::DataKey {
                    key: Some(b),
                    unlock_key,
                }) => {
                    let k = DataKey::from_bytes(&b)
                        .ok_or_else(|| ApiError::internal("a damaged data key was sent"))?;
                    k.save(&self.data_dir, unlock_key.as_deref())?;
                    self.set_keys(Some(Keys {
                        dek: k.clone(),
                        wrapped_with: unlock_key,
                    }));
                    info!("data key received from the manager at {addr}");
                    return Ok(k);
                }
                Ok(PeerResponse::DataKey { key: None, .. }) => {}
                other => unreachable.push(format!("{addr}: {other:?}")),
            }
        }
        if !unreachable.is_empty() || !may_create {
            return Err(ApiError::new(
                ErrorKind::Unavailable,
                format!(
                    "this manager does not have the data key and cannot ask every other manager for it ({})",
                    unreachable.join("; ")
                ),
            ));
        }
        let k = DataKey::generate()?;
        k.save(&self.data_dir, None)?;
        self.set_keys(Some(Keys {
            dek: k.clone(),
            wrapped_with: None,
        }));
        info!("data key created");
        Ok(k)
    }

    /// Keeps the data key's file wrapped as the cluster says: with the unlock key while
    /// autolock is on, else with a key beside it. Runs on every node; acts while it manages.
    async fn key_loop(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            self.sync_key_files().await;
        }
    }

    /// One pass of [`Self::key_loop`]: the TLS key sealed in `node.json`, the data key's file
    /// wrapped with the cluster's unlock key (or a key beside it).
    async fn sync_key_files(&self) {
        let Some(node) = self.raft().await else {
            return;
        };
        let Some(want) = node
            .sm
            .with_state(|s| s.cluster.as_ref().map(|c| c.unlock_key.clone()))
            .await
        else {
            return;
        };
        let want = want.and_then(|k| mesh_api::unlock_key_bytes(&k));
        let _one_at_a_time = self.data_key_lock.lock().await;
        let Some(keys) = self.keys() else {
            return;
        };
        if !self
            .tls_key_sealed
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            // Under the state's lock, as every write of `node.json`; not before the daemon
            // wrote it first (a swarm init that fails leaves none).
            let g = self.local.write().unwrap_or_else(|p| p.into_inner());
            if g.role == NodeRole::Manager && LocalState::path(&self.data_dir).exists() {
                match g.save_sealed(&self.data_dir, &keys.dek) {
                    Ok(()) => self
                        .tls_key_sealed
                        .store(true, std::sync::atomic::Ordering::Relaxed),
                    Err(e) => warn!("sealing the node's TLS key: {e}"),
                }
            }
        }
        if keys.wrapped_with == want || self.raft().await.is_none() {
            return;
        }
        match keys.dek.save(&self.data_dir, want.as_deref()) {
            Ok(()) => {
                info!(autolock = want.is_some(), "data key wrapped anew");
                self.set_keys(Some(Keys {
                    dek: keys.dek,
                    wrapped_with: want,
                }));
            }
            Err(e) => warn!("wrapping the data key: {e}"),
        }
    }

    async fn is_manager_node(&self, node_id: &str) -> bool {
        match self.raft().await {
            Some(node) => {
                node.sm
                    .with_state(|s| {
                        s.nodes
                            .get(node_id)
                            .is_some_and(|n| n.role == NodeRole::Manager)
                    })
                    .await
            }
            None => false,
        }
    }

    pub(crate) async fn raft(&self) -> Option<RaftNode> {
        self.raft.read().await.clone()
    }

    /// Stops everything this member runs. The local state stays unless the caller wipes it.
    pub async fn stop(&self) {
        self.shutdown.send_replace(true);
        // Before the plane stops: a start in flight ends with its task plumbed, and the
        // caller (a node leaving its swarm removes its tasks) sees every task there is.
        self.agent.close().await;
        self.agent.stop_plane();
        self.stop_raft().await;
        let tasks: Vec<_> = self.tasks_lock().drain(..).collect();
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
    }

    /// One of [`POOL`] persistent connections to `addr`, round robin, so that concurrent
    /// calls (forwarded management calls, log requests) do not queue behind each other.
    fn client(&self, addr: &str) -> mesh_rpc::Client {
        let n = self
            .next_client
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.pooled(&format!("{addr}#{}", n % POOL), addr)
    }

    fn pooled(&self, key: &str, addr: &str) -> mesh_rpc::Client {
        let mut g = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        g.entry(key.to_string())
            .or_insert_with(|| mesh_rpc::Client::new(addr.to_string(), self.client_tls.clone()))
            .clone()
    }

    async fn call(
        &self,
        addr: &str,
        req: &PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, mesh_rpc::RpcError> {
        self.client(addr).call(req, timeout).await
    }

    /// Sends `req` to the member at `addr` (the leader, or on a worker a manager that
    /// forwards it). Long polls get a connection of their own, so that they never hold up
    /// the other calls this manager forwards.
    async fn forward(
        &self,
        addr: &str,
        req: &PeerRequest,
    ) -> Result<PeerResponse, mesh_rpc::RpcError> {
        let long = matches!(req, PeerRequest::Forwarded(r) if matches!(**r, PeerRequest::Assignments { .. }));
        if long {
            mesh_rpc::call_once(addr, self.client_tls.clone(), req, FORWARD_TIMEOUT).await
        } else {
            self.call(addr, req, FORWARD_TIMEOUT).await
        }
    }

    /// Sends `req` to the leader: through Raft's view on a manager, through the known
    /// managers on a worker.
    pub async fn to_leader(self: &Arc<Self>, req: PeerRequest) -> PeerResponse {
        if self.raft().await.is_some() {
            return self.on_leader(req).await;
        }
        forward::via_managers(self, &self.local().managers, &req).await
    }

    /// The agent's long poll: on a dedicated connection (`client`), to the leader if this node
    /// manages, else to a manager that forwards it.
    pub async fn to_leader_polling(
        self: &Arc<Self>,
        req: PeerRequest,
        client: &mut Option<mesh_rpc::Client>,
    ) -> PeerResponse {
        let timeout = POLL_HOLD + Duration::from_secs(5);
        let (addr, req) = match self.raft().await {
            Some(_) => match self.leader().await {
                Ok(Leader::Me(node)) => return self.handle_as_leader(&node, req).await,
                Ok(Leader::Other(addr)) => (addr, PeerRequest::Forwarded(Box::new(req))),
                Err(e) => return PeerResponse::Error(e),
            },
            None => {
                let managers = self.local().managers;
                let pick = match client {
                    Some(c) if managers.iter().any(|m| m == c.addr()) => c.addr().to_string(),
                    _ => match managers.first() {
                        Some(m) => m.clone(),
                        None => return PeerResponse::Error(ApiError::no_leader()),
                    },
                };
                (pick, req)
            }
        };
        if client.as_ref().is_none_or(|c| c.addr() != addr) {
            *client = Some(mesh_rpc::Client::new(addr.clone(), self.client_tls.clone()));
        }
        let Some(c) = client.as_ref() else {
            return PeerResponse::Error(ApiError::no_leader());
        };
        match c.call(&req, timeout).await {
            Ok(r) => r,
            Err(e) => {
                debug!("assignments poll via {addr}: {e}");
                // Next time, try another manager.
                let managers = self.local().managers;
                if let Some(i) = managers.iter().position(|m| *m == addr) {
                    if let Some(next) = managers.get((i + 1) % managers.len()) {
                        *client =
                            Some(mesh_rpc::Client::new(next.clone(), self.client_tls.clone()));
                    }
                }
                PeerResponse::Error(ApiError::no_leader())
            }
        }
    }

    /// Finds the leader, waiting up to [`LEADER_WAIT`] for an election to finish.
    async fn leader(&self) -> Result<Leader, ApiError> {
        let Some(node) = self.raft().await else {
            return Err(ApiError::not_manager());
        };
        let mut rx = node.raft.metrics();
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            {
                let m = rx.borrow_and_update();
                if let Some(l) = m.current_leader {
                    if l == node.raft_id {
                        if m.state == ServerState::Leader {
                            let stale = m
                                .millis_since_quorum_ack
                                .is_none_or(|ms| ms > QUORUM_STALE_MS);
                            let alone = m.membership_config.voter_ids().count() == 1;
                            if stale && !alone {
                                return Err(ApiError::no_leader());
                            }
                            return Ok(Leader::Me(node.clone()));
                        }
                    } else if let Some(n) = m
                        .membership_config
                        .nodes()
                        .find(|(id, _)| **id == l)
                        .map(|(_, n)| n)
                    {
                        return Ok(Leader::Other(n.addr.clone()));
                    }
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(ApiError::no_leader());
            }
        }
    }

    /// Runs `req` on the leader: here if this manager leads, else forwarded once.
    pub async fn on_leader(self: &Arc<Self>, req: PeerRequest) -> PeerResponse {
        forward::on_leader(self, req, LEADER_WAIT).await
    }

    async fn handle_as_leader(self: &Arc<Self>, node: &RaftNode, req: PeerRequest) -> PeerResponse {
        let r = match req {
            PeerRequest::Join(j) => self.leader_join(node, j).await.map(PeerResponse::Joined),
            PeerRequest::Heartbeat { node_id, tls } => self
                .leader_heartbeat(node, &node_id, tls)
                .await
                .map(PeerResponse::Heartbeat),
            PeerRequest::AddVoter { node_id } => self
                .leader_add_voter(node, &node_id)
                .await
                .map(|_| PeerResponse::Done),
            PeerRequest::Leave { node_id } => self
                .leader_leave(node, &node_id)
                .await
                .map(|_| PeerResponse::Done),
            PeerRequest::Api(req) => Ok(PeerResponse::Api(self.leader_api(node, *req).await)),
            PeerRequest::Assignments { node_id, known } => {
                Ok(self.leader_assignments(node, &node_id, known).await)
            }
            PeerRequest::TaskStatus { node_id, updates } => self
                .leader_task_status(node, &node_id, updates)
                .await
                .map(|_| PeerResponse::Done),
            PeerRequest::TaskLogs { .. } => Err(ApiError::internal(
                "task logs are asked of nodes, not the leader",
            )),
            PeerRequest::DataKey => Err(ApiError::internal(
                "the data key is asked of a manager directly",
            )),
            PeerRequest::RenewCert { node_id, csr_pem } => self
                .leader_renew_cert(node, &node_id, &csr_pem)
                .await
                .map(|cert_pem| PeerResponse::Cert { cert_pem }),
            PeerRequest::Raft(_) | PeerRequest::Forwarded(_) => {
                Err(ApiError::internal("request cannot run on the leader"))
            }
        };
        r.unwrap_or_else(PeerResponse::Error)
    }

    /// Proposes a command and waits for it to be applied.
    async fn write(&self, node: &RaftNode, cmd: Command) -> Result<(), ApiError> {
        let proposed = Instant::now();
        match tokio::time::timeout(COMMIT_TIMEOUT, node.raft.client_write(cmd)).await {
            Err(_) => Err(ApiError::no_leader()),
            Ok(Err(e)) => {
                debug!("raft write: {e}");
                Err(ApiError::no_leader())
            }
            Ok(Ok(resp)) => {
                // Applied (a command the state refuses is applied too, changing nothing).
                self.metrics
                    .propose
                    .observe(proposed.elapsed().as_secs_f64());
                match resp.data {
                    CommandResult::Ok => Ok(()),
                    CommandResult::Err(e) => Err(e.into()),
                }
            }
        }
    }

    /// Makes sure this leader still leads, then reads its state.
    ///
    /// [`COMMIT_TIMEOUT`] bounds the whole read, not one round of it: a round fails at once
    /// when one voter's heartbeat fails (a manager that joined a moment ago has no connection
    /// yet, and a debug build's TLS handshake can outlast the 100 ms heartbeat; a `swarm
    /// join` arriving then was refused with "no leader" in the soak). Only a leader that
    /// learns it no longer leads answers at once.
    async fn read(&self, node: &RaftNode) -> Result<StoreState, ApiError> {
        let deadline = tokio::time::Instant::now() + COMMIT_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, node.raft.ensure_linearizable()).await {
                Ok(Ok(_)) => return Ok(node.sm.state().await),
                Ok(Err(openraft::error::RaftError::APIError(
                    openraft::error::CheckIsLeaderError::QuorumNotEnough(e),
                ))) if tokio::time::Instant::now() < deadline => {
                    debug!("linearizable read: {e}; asking the quorum again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ => return Err(ApiError::no_leader()),
            }
        }
    }

    fn managers_of(state: &StoreState, leader_raft: Option<u64>) -> Vec<String> {
        let mut m: Vec<&Node> = state
            .managers()
            .filter(|n| n.state != NodeState::Left)
            .collect();
        m.sort_by_key(|n| (Some(n.raft_id) != leader_raft, n.hostname.clone()));
        m.into_iter().map(|n| n.addr.clone()).collect()
    }

    async fn leader_join(&self, node: &RaftNode, j: JoinRequest) -> Result<JoinAccept, ApiError> {
        let token = JoinToken::parse(&j.token)
            .map_err(|e| ApiError::new(ErrorKind::PermissionDenied, e))?;
        let state = self.read(node).await?;
        let cluster = state
            .cluster
            .as_ref()
            .ok_or_else(|| ApiError::internal("cluster not initialized"))?;
        let current = RootCa::from_pem(&cluster.ca_cert_pem, &cluster.ca_key_pem)
            .map_err(ApiError::internal)?;
        if token.ca_digest != current.digest() {
            return Err(ApiError::new(
                ErrorKind::PermissionDenied,
                "the join token does not match this swarm's CA (CA digest mismatch)",
            ));
        }
        let role = if mesh_ca::secrets_match(&token.secret, &cluster.manager_secret) {
            NodeRole::Manager
        } else if mesh_ca::secrets_match(&token.secret, &cluster.worker_secret) {
            NodeRole::Worker
        } else {
            return Err(ApiError::new(
                ErrorKind::PermissionDenied,
                "invalid join token: a valid join token is necessary to join this swarm (was it rotated?)",
            ));
        };
        let node_id = mesh_ca::new_secret();
        let ca_role = match role {
            NodeRole::Manager => mesh_ca::Role::Manager,
            NodeRole::Worker => mesh_ca::Role::Worker,
        };
        let (ca, chain) = ca_rotation::signing_ca(cluster)?;
        let mut cert_pem = ca
            .sign_node_csr_valid_for(
                &j.csr_pem,
                &node_id,
                ca_role,
                &cluster.id,
                Duration::from_secs(cluster.settings.cert_expiry_secs),
            )
            .map_err(|e| ApiError::invalid(format!("cannot sign the node certificate: {e}")))?;
        cert_pem.push_str(&chain);
        let now = now_secs();
        let raft_id = rand::random::<u64>().max(1);
        let new = Node {
            raft_id,
            resources: j.resources,
            created_at: now,
            updated_at: now,
            ..Node::new(node_id.clone(), j.hostname, role, j.addr)
        };
        self.write(node, Command::AddNode { node: new }).await?;
        self.dispatcher.beat(&node_id);
        // Through this leader's underlay filter before the answer: the node gossips with
        // it first as soon as it has its keys.
        let members = node.sm.with_state(gossipkeys::member_addrs).await;
        self.agent.admit_members(members).await;
        info!(node_id, ?role, "node joined");
        Ok(JoinAccept {
            node_id,
            cluster_id: cluster.id.clone(),
            role,
            raft_id,
            cert_pem,
            ca_cert_pem: cluster.ca_cert_pem.clone(),
            managers: Self::managers_of(&state, Some(node.raft_id)),
        })
    }

    async fn leader_heartbeat(
        &self,
        node: &RaftNode,
        node_id: &str,
        tls: Option<crate::peer::NodeTlsState>,
    ) -> Result<HeartbeatAck, ApiError> {
        let lookup = |s: &StoreState| {
            let n = s.nodes.get(node_id)?;
            let period = s
                .cluster
                .as_ref()
                .map_or(HEARTBEAT_PERIOD.as_millis() as u64, |c| {
                    c.settings.dispatcher_heartbeat_ms
                });
            let expiry = s
                .cluster
                .as_ref()
                .map_or(0, |c| c.settings.cert_expiry_secs);
            (n.state != NodeState::Left).then(|| {
                (
                    n.role,
                    Self::managers_of(s, Some(node.raft_id)),
                    period,
                    expiry,
                    s.cluster.clone(),
                )
            })
        };
        let found = match node.sm.with_state(lookup).await {
            Some(found) => Some(found),
            None => {
                // Confirm on a linearizable read: a fresh leader may not have applied everything.
                let state = self.read(node).await?;
                if state.cluster.is_none() {
                    return Err(ApiError::new(
                        ErrorKind::Unavailable,
                        "cluster not initialized yet",
                    ));
                }
                lookup(&state)
            }
        };
        let (role, managers, period_ms, cert_expiry_secs, cluster) =
            found.ok_or_else(|| ApiError::not_found(format!("no such node: {node_id}")))?;
        self.dispatcher
            .set_period(Duration::from_millis(period_ms.max(1)));
        self.dispatcher.beat(node_id);
        if let Some(tls) = tls {
            self.dispatcher.note_tls(node_id, tls);
        }
        let mut ack = HeartbeatAck {
            role,
            managers,
            period_ms,
            cert_expiry_secs,
            issuer_key_id: None,
            trust_root_pem: None,
        };
        if let Some(c) = &cluster {
            self.ca_advice(c, node_id, &mut ack);
        }
        Ok(ack)
    }

    async fn leader_add_voter(&self, node: &RaftNode, node_id: &str) -> Result<(), ApiError> {
        let _membership = self.membership_lock.lock().await;
        let state = self.read(node).await?;
        let n = state
            .nodes
            .get(node_id)
            .ok_or_else(|| ApiError::not_found(format!("no such node: {node_id}")))?;
        if n.role != NodeRole::Manager {
            return Err(ApiError::invalid(format!(
                "node {} is not a manager",
                n.hostname
            )));
        }
        let m = node.raft.metrics().borrow().membership_config.clone();
        if m.voter_ids().any(|v| v == n.raft_id) {
            return Ok(());
        }
        let raft_err = |e: String| {
            ApiError::new(
                ErrorKind::Unavailable,
                format!("cannot add {} to raft: {e}", n.hostname),
            )
        };
        tokio::time::timeout(
            Duration::from_secs(20),
            node.raft
                .add_learner(n.raft_id, BasicNode::new(n.addr.clone()), true),
        )
        .await
        .map_err(|_| raft_err("timed out catching up".into()))?
        .map_err(|e| raft_err(e.to_string()))?;
        let ids: BTreeSet<u64> = [n.raft_id].into();
        tokio::time::timeout(
            Duration::from_secs(10),
            node.raft
                .change_membership(ChangeMembers::AddVoterIds(ids), false),
        )
        .await
        .map_err(|_| raft_err("timed out".into()))?
        .map_err(|e| raft_err(e.to_string()))?;
        info!(
            node = n.hostname,
            raft_id = n.raft_id,
            "manager added to raft"
        );
        Ok(())
    }

    async fn remove_voter(&self, node: &RaftNode, raft_id: u64) -> Result<(), ApiError> {
        let m = node.raft.metrics().borrow().membership_config.clone();
        if !m.nodes().any(|(id, _)| *id == raft_id) {
            return Ok(());
        }
        let ids: BTreeSet<u64> = [raft_id].into();
        let res = if m.voter_ids().any(|v| v == raft_id) {
            node.raft
                .change_membership(ChangeMembers::RemoveVoters(ids), false)
                .await
        } else {
            node.raft
                .change_membership(ChangeMembers::RemoveNodes(ids), false)
                .await
        };
        res.map(|_| ()).map_err(|e| {
            ApiError::new(
                ErrorKind::Unavailable,
                format!("cannot change raft membership: {e}"),
            )
        })
    }

    async fn leader_leave(&self, node: &RaftNode, node_id: &str) -> Result<(), ApiError> {
        let _membership = self.membership_lock.lock().await;
        let state = self.read(node).await?;
        let Some(n) = state.nodes.get(node_id) else {
            return Ok(());
        };
        let at = now_secs();
        let manager = n.role == NodeRole::Manager;
        // As in `node demote`: another manager leaves the voters while it can still
        // acknowledge the change, before its role (which stops its Raft) is written.
        let other = n.raft_id != node.raft_id;
        if manager && other {
            self.remove_voter(node, n.raft_id).await?;
        }
        if manager {
            self.write(
                node,
                Command::SetNodeRole {
                    id: n.id.clone(),
                    role: NodeRole::Worker,
                    at,
                },
            )
            .await?;
        }
        self.write(
            node,
            Command::SetNodeState {
                id: n.id.clone(),
                state: NodeState::Left,
                at,
            },
        )
        .await?;
        self.dispatcher.forget(node_id);
        if manager && !other {
            self.remove_voter(node, n.raft_id).await?;
        }
        Ok(())
    }

    fn manager_status(&self, n: &Node, leader: Option<u64>) -> String {
        if n.role != NodeRole::Manager || !self.is_raft_member(n.raft_id) {
            return String::new();
        }
        if Some(n.raft_id) == leader {
            "Leader".into()
        } else if n.state != NodeState::Left && self.dispatcher.fresh_or_grace(&n.id) {
            "Reachable".into()
        } else {
            "Unreachable".into()
        }
    }

    /// Every stored object (or one service's, see `Request::Objects`), with the join tokens
    /// and each node's manager status.
    fn objects(
        &self,
        state: &crate::state::StoreState,
        leader: Option<u64>,
        service: Option<&str>,
    ) -> Result<mesh_api::ClusterObjects, ApiError> {
        // Scoped to one service: that service and its tasks only.
        let only = service.map(|key| state.find_service(key).ok().map(|s| s.id.clone()));
        let wanted = |id: &str| only.as_ref().is_none_or(|o| o.as_deref() == Some(id));
        let c = state
            .cluster
            .as_ref()
            .ok_or_else(|| ApiError::internal("cluster not initialized"))?;
        let digest = RootCa::from_pem(&c.ca_cert_pem, &c.ca_key_pem)
            .map_err(ApiError::internal)?
            .digest();
        Ok(mesh_api::ClusterObjects {
            cluster: mesh_api::ClusterView {
                id: c.id.clone(),
                created_at: c.created_at,
                worker_token: JoinToken::new(&digest, &c.worker_secret).to_string(),
                manager_token: JoinToken::new(&digest, &c.manager_secret).to_string(),
                ca_cert_pem: c.ca_cert_pem.clone(),
                autolock: c.unlock_key.is_some(),
                settings: c.settings.clone(),
                root_rotation_in_progress: c.ca_rotation.is_some(),
                tls_info: ca_rotation::cluster_tls_info(c),
            },
            nodes: state
                .nodes
                .values()
                .map(|n| mesh_api::NodeView {
                    node: n.clone(),
                    manager_status: self.manager_status(n, leader),
                    tls_status: self.tls_status(c, &n.id),
                    tls_info: self.node_tls_info(c, &n.id),
                })
                .collect(),
            services: state
                .services
                .values()
                .filter(|s| wanted(&s.id))
                .cloned()
                .collect(),
            tasks: state
                .tasks
                .values()
                .filter(|t| wanted(&t.service_id))
                .cloned()
                .collect(),
            networks: state.networks.values().cloned().collect(),
        })
    }

    /// `unlock-key [--rotate]` and `swarm update`, on the leader.
    async fn leader_swarm_settings(&self, node: &RaftNode, req: Request) -> Response {
        match req {
            Request::UnlockKey { rotate } => {
                let state = self.read(node).await?;
                let c = state
                    .cluster
                    .as_ref()
                    .ok_or_else(|| ApiError::internal("cluster not initialized"))?;
                let mut key = c.unlock_key.clone();
                if rotate {
                    if key.is_none() {
                        return Err(ApiError::invalid(
                            "cannot rotate because autolock is not turned on",
                        ));
                    }
                    key = Some(new_unlock_key()?);
                    self.write(
                        node,
                        Command::UpdateCluster {
                            unlock_key: key.clone(),
                            settings: c.settings.clone(),
                        },
                    )
                    .await?;
                    // The leader's own files at once; the other managers' within a tick.
                    self.sync_key_files().await;
                }
                to_response(&UnlockKeyAnswer {
                    key: key.map(|k| mesh_api::human_unlock_key(&k)),
                    rotated: rotate,
                })
            }
            Request::SwarmUpdate {
                autolock,
                task_history_limit,
                cert_expiry_secs,
                dispatcher_heartbeat_ms,
            } => {
                let state = self.read(node).await?;
                let c = state
                    .cluster
                    .as_ref()
                    .ok_or_else(|| ApiError::internal("cluster not initialized"))?;
                let mut settings = c.settings.clone();
                if let Some(n) = task_history_limit {
                    settings.task_history_limit = n;
                }
                if let Some(secs) = cert_expiry_secs {
                    certs::check_cert_expiry(secs)?;
                    settings.cert_expiry_secs = secs;
                }
                if let Some(ms) = dispatcher_heartbeat_ms {
                    if ms == 0 {
                        return Err(ApiError::invalid(
                            "invalid dispatcher heartbeat period: it must be positive",
                        ));
                    }
                    settings.dispatcher_heartbeat_ms = ms;
                }
                let unlock_key = match (autolock, &c.unlock_key) {
                    (Some(true), None) => Some(new_unlock_key()?),
                    (Some(false), _) => None,
                    (_, k) => k.clone(),
                };
                let turned_on = c.unlock_key.is_none() && unlock_key.is_some();
                if unlock_key != c.unlock_key || settings != c.settings {
                    self.write(
                        node,
                        Command::UpdateCluster {
                            unlock_key: unlock_key.clone(),
                            settings,
                        },
                    )
                    .await?;
                    self.sync_key_files().await;
                }
                Ok(json!({
                    "autolock": unlock_key.is_some(),
                    "unlock_key": unlock_key.filter(|_| turned_on).map(|k| mesh_api::human_unlock_key(&k)),
                }))
            }
            other => Err(ApiError::internal(format!(
                "not a settings request: {other:?}"
            ))),
        }
    }

    async fn leader_api(&self, node: &RaftNode, req: Request) -> Response {
        let leader = Some(node.raft_id);
        match req {
            Request::NodeLs { filters } => {
                filters.check_nodes().map_err(ApiError::invalid)?;
                let state = self.read(node).await?;
                let cluster = state.cluster.as_ref();
                let mut out: Vec<NodeSummary> = state
                    .nodes
                    .values()
                    .filter(|n| mesh_api::filter::node(&filters, n))
                    .map(|n| NodeSummary {
                        id: n.id.clone(),
                        hostname: n.hostname.clone(),
                        status: n.state.to_string(),
                        availability: n.availability.to_string(),
                        manager_status: self.manager_status(n, leader),
                        is_self: false,
                        tls_status: cluster
                            .map_or_else(|| "Unknown".into(), |c| self.tls_status(c, &n.id)),
                    })
                    .collect();
                out.sort_by(|a, b| (&a.hostname, &a.id).cmp(&(&b.hostname, &b.id)));
                Ok(json!(out))
            }
            Request::NodeInspect { node: key } => {
                let state = self.read(node).await?;
                let n = state.find_node(&key)?;
                let mut v = serde_json::to_value(n).map_err(ApiError::internal)?;
                v["manager_status"] = json!(self.manager_status(n, leader));
                Ok(v)
            }
            Request::NodeUpdate {
                node: key,
                availability,
                label_add,
                label_rm,
            } => {
                if let Some(k) = label_add
                    .keys()
                    .chain(label_rm.iter())
                    .find(|k| k.is_empty())
                {
                    return Err(ApiError::invalid(format!("invalid label key: {k:?}")));
                }
                let state = self.read(node).await?;
                let id = state.find_node(&key)?.id.clone();
                self.write(
                    node,
                    Command::UpdateNode {
                        id: id.clone(),
                        availability,
                        label_add,
                        label_rm,
                        at: now_secs(),
                    },
                )
                .await?;
                to_response(&IdAnswer::new(id))
            }
            Request::NodePromote { node: key } => {
                let state = self.read(node).await?;
                let n = state.find_node(&key)?;
                if n.role == NodeRole::Manager {
                    return to_response(&MessageAnswer::new(format!(
                        "Node {} is already a manager.",
                        n.hostname
                    )));
                }
                if n.state != NodeState::Ready {
                    return Err(ApiError::invalid(format!(
                        "node {} is not ready and cannot be promoted",
                        n.hostname
                    )));
                }
                self.write(
                    node,
                    Command::SetNodeRole {
                        id: n.id.clone(),
                        role: NodeRole::Manager,
                        at: now_secs(),
                    },
                )
                .await?;
                to_response(&MessageAnswer::new(format!(
                    "Node {} promoted to a manager in the swarm.",
                    n.hostname
                )))
            }
            Request::NodeDemote { node: key } => {
                let _membership = self.membership_lock.lock().await;
                let state = self.read(node).await?;
                let n = state.find_node(&key)?;
                if n.role == NodeRole::Worker {
                    return to_response(&MessageAnswer::new(format!(
                        "Node {} is already a worker.",
                        n.hostname
                    )));
                }
                if state.managers().count() <= 1 {
                    return Err(ApiError::invalid(format!(
                        "attempting to demote the last manager of the swarm: {}",
                        n.hostname
                    )));
                }
                let (id, raft_id, name) = (n.id.clone(), n.raft_id, n.hostname.clone());
                // Another manager leaves the voters first, while it still runs Raft and can
                // acknowledge the change: once it learns its new role it stops Raft, and a
                // membership change that still needed it (two managers) would never commit.
                // The leader itself changes its role first: leaving the voters ends its lead.
                let other = raft_id != node.raft_id;
                if other {
                    self.remove_voter(node, raft_id).await?;
                }
                self.write(
                    node,
                    Command::SetNodeRole {
                        id,
                        role: NodeRole::Worker,
                        at: now_secs(),
                    },
                )
                .await?;
                if !other {
                    self.remove_voter(node, raft_id).await?;
                }
                to_response(&MessageAnswer::new(format!(
                    "Manager {name} demoted in the swarm."
                )))
            }
            Request::NodeRm { node: key, force } => {
                let state = self.read(node).await?;
                let n = state.find_node(&key)?;
                if n.role == NodeRole::Manager
                    && n.state != NodeState::Left
                    && self.is_raft_member(n.raft_id)
                {
                    return Err(ApiError::invalid(format!(
                        "node {} is a cluster manager and is a member of the raft cluster. It must be demoted to worker before removal",
                        n.hostname
                    )));
                }
                if n.state == NodeState::Ready && !force {
                    return Err(ApiError::invalid(format!(
                        "node {} is not down and can't be removed (use --force)",
                        n.hostname
                    )));
                }
                let id = n.id.clone();
                self.write(node, Command::RemoveNode { id: id.clone() })
                    .await?;
                self.dispatcher.forget(&id);
                to_response(&IdAnswer::new(id))
            }
            Request::JoinToken { role, rotate } => {
                if rotate {
                    self.write(
                        node,
                        Command::RotateSecret {
                            role,
                            secret: mesh_ca::new_secret(),
                        },
                    )
                    .await?;
                }
                let state = self.read(node).await?;
                let c = state
                    .cluster
                    .as_ref()
                    .ok_or_else(|| ApiError::internal("cluster not initialized"))?;
                let digest = RootCa::from_pem(&c.ca_cert_pem, &c.ca_key_pem)
                    .map_err(ApiError::internal)?
                    .digest();
                let secret = match role {
                    NodeRole::Worker => &c.worker_secret,
                    NodeRole::Manager => &c.manager_secret,
                };
                to_response(&TokenAnswer {
                    token: JoinToken::new(&digest, secret).to_string(),
                    role,
                    rotated: rotate,
                    addr: String::new(),
                })
            }
            Request::SwarmCa { rotate } => {
                if rotate {
                    self.leader_rotate_ca(node).await?;
                }
                let state = self.read(node).await?;
                to_response(&self.ca_answer(&state)?)
            }
            req @ (Request::UnlockKey { .. } | Request::SwarmUpdate { .. }) => {
                // Boxed: the arms of this match make one future, and it must stay small
                // enough for a worker thread's stack.
                Box::pin(self.leader_swarm_settings(node, req)).await
            }
            Request::BlobCreate { kind, mut spec } => {
                spec.validate(kind).map_err(ApiError::invalid)?;
                let state = self.read(node).await?;
                if state
                    .blobs
                    .values()
                    .any(|b| b.kind == kind && b.spec.name == spec.name)
                {
                    return Err(ApiError::new(
                        ErrorKind::AlreadyExists,
                        format!("{kind} {} already exists", spec.name),
                    ));
                }
                if kind == BlobKind::Secret {
                    spec.data = self.data_key().await?.seal(&spec.data)?;
                }
                let now = now_secs();
                let blob = mesh_api::Blob {
                    id: mesh_ca::new_secret(),
                    kind,
                    spec,
                    version: 1,
                    created_at: now,
                    updated_at: now,
                };
                let id = blob.id.clone();
                self.write(node, Command::CreateBlob { blob }).await?;
                to_response(&IdAnswer::new(id))
            }
            Request::BlobLs { kind, filters } => {
                filters.check_blobs().map_err(ApiError::invalid)?;
                let state = self.read(node).await?;
                let list: Vec<mesh_api::Blob> = state
                    .blobs
                    .values()
                    .filter(|b| b.kind == kind)
                    .map(crate::blobs::public)
                    .filter(|b| mesh_api::filter::blob(&filters, b))
                    .collect();
                Ok(json!(list))
            }
            Request::BlobInspect { kind, name } => {
                let state = self.read(node).await?;
                let b = state.find_blob(kind, &name)?;
                Ok(json!(crate::blobs::public(b)))
            }
            Request::BlobUpdate { kind, name, spec } => {
                let state = self.read(node).await?;
                let b = state.find_blob(kind, &name)?;
                let same_data = spec.data.is_empty()
                    || match kind {
                        BlobKind::Config => spec.data == b.spec.data,
                        BlobKind::Secret => {
                            self.data_key().await?.unseal(&b.spec.data).ok() == Some(spec.data)
                        }
                    };
                if spec.name != b.spec.name || !same_data {
                    return Err(ApiError::invalid("only updates to Labels are allowed"));
                }
                if spec.labels != b.spec.labels {
                    let cmd = Command::SetBlobLabels {
                        id: b.id.clone(),
                        labels: spec.labels,
                        at: now_secs(),
                    };
                    self.write(node, cmd).await?;
                }
                to_response(&IdAnswer::new(b.id.clone()))
            }
            Request::BlobRm { kind, name } => {
                let state = self.read(node).await?;
                let b = state.find_blob(kind, &name)?;
                crate::blobs::check_unused(&state, b).map_err(ApiError::invalid)?;
                let id = b.id.clone();
                self.write(node, Command::RemoveBlob { id: id.clone() })
                    .await?;
                to_response(&IdAnswer::new(id))
            }
            Request::ServiceCreate {
                mut spec,
                registry_auth,
            } => {
                let registry_auth = self.seal_registry_auth(registry_auth).await?;
                let state = self.read(node).await?;
                services::validate_spec(&spec, &state)?;
                crate::blobs::resolve_references(&state, &mut spec)?;
                services::allocate_ports(&state, &mut spec, None)?;
                if state.services.values().any(|s| s.spec.name == spec.name) {
                    return Err(services::conflict(&spec.name));
                }
                let now = now_secs();
                let vips = crate::networks::allocate_vips(&state, &spec)?;
                let svc = mesh_api::Service {
                    id: mesh_ca::new_secret(),
                    spec,
                    previous_spec: None,
                    version: 1,
                    created_at: now,
                    updated_at: now,
                    update_status: None,
                    vips,
                    registry_auth: registry_auth.unwrap_or_default(),
                };
                let id = svc.id.clone();
                self.write(node, Command::CreateService { service: svc })
                    .await?;
                to_response(&IdAnswer::new(id))
            }
            Request::NetworkCreate { spec } => {
                let state = self.read(node).await?;
                let network = crate::networks::new_network(&state, spec, now_secs())?;
                let id = network.id.clone();
                self.write(node, Command::CreateNetwork { network }).await?;
                to_response(&IdAnswer::new(id))
            }
            Request::NetworkLs { filters } => {
                filters.check_networks().map_err(ApiError::invalid)?;
                Ok(json!(crate::networks::ls(
                    &self.read(node).await?,
                    &filters
                )))
            }
            Request::NetworkInspect { network } => {
                let state = self.read(node).await?;
                let n = state.find_network(&network)?;
                Ok(crate::networks::inspect(&state, n))
            }
            Request::NetworkRm { network } => {
                // Tasks of services removed just before are still stopping (`stack rm`
                // removes the networks right after the services): while no service uses
                // the network, their end is waited for, a bounded time.
                let deadline = tokio::time::Instant::now() + NETWORK_RM_WAIT;
                let (state, id) = loop {
                    let state = self.read(node).await?;
                    let n = state.find_network(&network)?;
                    match crate::networks::check_unused(&state, n) {
                        Ok(()) => {
                            let id = n.id.clone();
                            break (state, id);
                        }
                        Err(_)
                            if !crate::networks::used_by_service(&state, n)
                                && tokio::time::Instant::now() < deadline =>
                        {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => return Err(e),
                    }
                };
                drop(state);
                self.write(node, Command::RemoveNetwork { id: id.clone() })
                    .await?;
                to_response(&IdAnswer::new(id))
            }
            Request::ServiceLs { filters } => {
                filters.check_services().map_err(ApiError::invalid)?;
                Ok(json!(services::ls(&self.read(node).await?, &filters)))
            }
            Request::ServicePs { service, filters } => {
                filters.check_tasks().map_err(ApiError::invalid)?;
                let state = self.read(node).await?;
                let svc = state.find_service(&service)?;
                Ok(task_rows(services::ps(&state, svc, &filters)))
            }
            Request::TaskLs { filters } => {
                filters.check_tasks().map_err(ApiError::invalid)?;
                let state = self.read(node).await?;
                Ok(task_rows(services::task_ls(&state, &filters)))
            }
            Request::ServiceInspect { service } => {
                let state = self.read(node).await?;
                let svc = state.find_service(&service)?;
                Ok(services::inspect(&state, svc))
            }
            Request::ServiceScale { service, replicas } => {
                let state = self.read(node).await?;
                let svc = state.find_service(&service)?;
                if svc.spec.mode == mesh_api::ServiceMode::Global {
                    return Err(ApiError::invalid(format!(
                        "{}: scale can only be used with replicated mode",
                        svc.spec.name
                    )));
                }
                let u = mesh_api::ServiceUpdate {
                    replicas: Some(replicas),
                    ..Default::default()
                };
                let spec = services::apply_update(&svc.spec, &u)?;
                let next = services::updated(svc, spec, false, now_secs());
                self.write(node, Command::UpdateService { service: next })
                    .await?;
                to_response(&IdAnswer::new(svc.id.clone()))
            }
            Request::ServiceUpdate { service, update } => {
                let state = self.read(node).await?;
                let svc = state.find_service(&service)?;
                let mut spec = services::apply_update(&svc.spec, &update)?;
                services::validate_spec(&spec, &state)?;
                crate::blobs::resolve_references(&state, &mut spec)?;
                let mut next = services::updated(svc, spec, update.force, now_secs());
                if let Some(sealed) = self.seal_registry_auth(update.registry_auth).await? {
                    next.registry_auth = sealed;
                }
                let rollout = next.version != svc.version;
                self.write(node, Command::UpdateService { service: next })
                    .await?;
                to_response(&IdAnswer::rollout(svc.id.clone(), rollout))
            }
            Request::ServiceRollback { service } => {
                let state = self.read(node).await?;
                let svc = state.find_service(&service)?;
                let next = services::rolled_back(svc, now_secs())?;
                self.write(node, Command::UpdateService { service: next })
                    .await?;
                to_response(&IdAnswer::new(svc.id.clone()))
            }
            Request::ServiceReplace {
                service,
                version,
                spec,
                rollback,
                registry_auth,
            } => {
                let registry_auth = self.seal_registry_auth(registry_auth).await?;
                let state = self.read(node).await?;
                let svc = state.find_service(&service)?;
                if svc.version != version {
                    return Err(ApiError::invalid(format!(
                        "update out of sequence: service {} is at version {}, not {version}",
                        svc.spec.name, svc.version
                    )));
                }
                let next = if rollback {
                    services::rolled_back(svc, now_secs())?
                } else {
                    let mut spec = spec;
                    if spec.name != svc.spec.name {
                        return Err(ApiError::invalid(format!(
                            "renaming services is not supported ({} to {})",
                            svc.spec.name, spec.name
                        )));
                    }
                    services::validate_spec(&spec, &state)?;
                    crate::blobs::resolve_references(&state, &mut spec)?;
                    let ids = |names: &[String]| -> Vec<String> {
                        names
                            .iter()
                            .map(|n| {
                                state
                                    .find_network(n)
                                    .map(|n| n.id.clone())
                                    .unwrap_or_default()
                            })
                            .collect()
                    };
                    if ids(&spec.networks) != ids(&svc.spec.networks)
                        || spec.endpoint_mode != svc.spec.endpoint_mode
                    {
                        return Err(ApiError::invalid(format!(
                            "service {}: changing the networks or the endpoint mode of a service is not supported yet (remove the service and create it again)",
                            svc.spec.name
                        )));
                    }
                    services::allocate_ports(&state, &mut spec, Some(&svc.id))?;
                    let force = spec.force_update != svc.spec.force_update;
                    services::updated(svc, spec, force, now_secs())
                };
                let mut next = next;
                if let Some(sealed) = registry_auth {
                    next.registry_auth = sealed;
                }
                let rollout = next.version != svc.version;
                self.write(node, Command::UpdateService { service: next })
                    .await?;
                to_response(&IdAnswer::rollout(svc.id.clone(), rollout))
            }
            Request::Objects { service } => {
                let state = self.read(node).await?;
                Ok(json!(self.objects(&state, leader, service.as_deref())?))
            }
            Request::ServiceRm { service } => {
                let state = self.read(node).await?;
                let id = state.find_service(&service)?.id.clone();
                self.write(node, Command::RemoveService { id: id.clone() })
                    .await?;
                to_response(&IdAnswer::new(id))
            }
            // Any manager's history would do (seqs are the log's); the leader's is the newest.
            Request::Events { after, since_ns } => {
                Ok(json!(node.sm.history().read(after, since_ns)))
            }
            Request::ServiceLogs {
                service,
                since_ns,
                tail,
                after,
            } => {
                let state = self.read(node).await?;
                let tasks = log_targets(&state, &service)?;
                let logs = self.gather_logs(&state, tasks, since_ns, tail, after).await;
                Ok(json!(logs))
            }
            other => Err(ApiError::internal(format!(
                "not a management request: {other:?}"
            ))),
        }
    }

    /// Every node, managers included, reports to the leader every [`HEARTBEAT_PERIOD`]; the
    /// answer carries the node's role (so promote/demote reach it) and the managers' addresses.
    async fn heartbeat_loop(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        let mut period = HEARTBEAT_PERIOD;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut not_found = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let local = self.local();
            let tls = ca_rotation::tls_state(&NodeTls {
                ca_cert_pem: local.ca_cert_pem.clone(),
                cert_pem: local.cert_pem.clone(),
                key_pem: String::new(),
            });
            let req = || PeerRequest::Heartbeat {
                node_id: local.node_id.clone(),
                tls: Some(tls.clone()),
            };
            let resp = if self.raft().await.is_some() {
                self.on_leader(req()).await
            } else {
                self.heartbeat_any_manager(&local.managers, req()).await
            };
            match resp {
                PeerResponse::Heartbeat(ack) => {
                    not_found = 0;
                    self.note_cert_expiry(ack.cert_expiry_secs);
                    if let Some(root) = &ack.trust_root_pem {
                        self.trust_root(root);
                    }
                    *self.want_issuer.lock().unwrap_or_else(|p| p.into_inner()) =
                        ack.issuer_key_id.clone();
                    // The cluster's `--dispatcher-heartbeat`, from the leader.
                    let asked = Duration::from_millis(ack.period_ms.max(1));
                    if asked != period {
                        period = asked;
                        tick =
                            tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                    self.apply_ack(ack).await
                }
                PeerResponse::Error(e) if e.kind == ErrorKind::NotFound && not_found < 2 => {
                    not_found += 1
                }
                PeerResponse::Error(e) if e.kind == ErrorKind::NotFound => {
                    warn!("this node was removed from the swarm");
                    let _ = self.events.send(MemberEvent::Removed);
                    return;
                }
                other => debug!("heartbeat: {other:?}"),
            }
        }
    }

    async fn heartbeat_any_manager(&self, managers: &[String], req: PeerRequest) -> PeerResponse {
        let mut last = PeerResponse::Error(ApiError::no_leader());
        for addr in managers {
            let hb = self.pooled(&format!("{addr}#heartbeat"), addr);
            match hb.call(&req, Duration::from_secs(1)).await {
                Ok(PeerResponse::Error(e)) if e.kind != ErrorKind::NotFound => {
                    last = PeerResponse::Error(e)
                }
                Ok(r) => return r,
                Err(e) => debug!("heartbeat to {addr}: {e}"),
            }
        }
        last
    }

    async fn apply_ack(self: &Arc<Self>, ack: HeartbeatAck) {
        let role_before = self.local().role;
        self.update_local(|l| {
            if !ack.managers.is_empty() {
                l.managers = ack.managers.clone();
            }
            l.role = ack.role;
        });
        let running = self.raft().await.is_some();
        match (ack.role, running) {
            (NodeRole::Manager, false) => {
                info!("promoted: starting raft");
                if let Err(e) = self.become_manager().await {
                    warn!("becoming a manager: {e}");
                }
            }
            (NodeRole::Worker, true) if role_before == NodeRole::Manager || running => {
                info!("demoted: stopping raft");
                self.stop_raft().await;
                let _ = std::fs::remove_file(self.raft_path());
                self.forget_data_key().await;
            }
            _ => {}
        }
    }

    /// Starts Raft (fresh storage) and asks the leader to make this node a voter.
    pub async fn become_manager(self: &Arc<Self>) -> Result<(), ApiError> {
        if self.raft().await.is_none() {
            let _ = std::fs::remove_file(self.raft_path());
        }
        self.start_raft(false).await?;
        let local = self.local();
        let req = PeerRequest::AddVoter {
            node_id: local.node_id.clone(),
        };
        // The leader may not be known to a fresh raft instance yet: ask the known managers.
        let mut last = ApiError::no_leader();
        for addr in &local.managers {
            if *addr == local.advertise_addr {
                continue;
            }
            match self.call(addr, &req, Duration::from_secs(40)).await {
                Ok(PeerResponse::Done) => return Ok(()),
                Ok(PeerResponse::Error(e)) => last = e,
                Ok(other) => last = ApiError::internal(format!("unexpected answer: {other:?}")),
                Err(e) => last = ApiError::new(ErrorKind::Unavailable, e),
            }
        }
        Err(last)
    }

    /// While this manager leads, turns heartbeat silence into Down and heartbeats into Ready.
    async fn monitor_loop(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let Some(node) = self.raft().await else {
                self.dispatcher.not_leading();
                continue;
            };
            let leading = {
                let m = node.raft.metrics();
                let m = m.borrow();
                m.state == ServerState::Leader && m.current_leader == Some(node.raft_id)
            };
            if !leading {
                self.dispatcher.not_leading();
                continue;
            }
            self.dispatcher.leading();
            self.dispatcher.beat(&self.local().node_id);
            self.ca_rotation_step(&node).await;
            let now = Instant::now();
            let changes: Vec<(String, NodeState)> = node
                .sm
                .with_state(|s| {
                    s.nodes
                        .values()
                        .filter(|n| n.state != NodeState::Left)
                        .filter_map(|n| {
                            match self
                                .dispatcher
                                .verdict(&n.id, n.state == NodeState::Ready, now)
                            {
                                Verdict::NowDown => Some((n.id.clone(), NodeState::Down)),
                                Verdict::NowReady => Some((n.id.clone(), NodeState::Ready)),
                                _ => None,
                            }
                        })
                        .collect()
                })
                .await;
            for (id, state) in changes {
                info!(
                    node = id,
                    ?state,
                    "node status changed (no heartbeat for {:?} means down)",
                    self.dispatcher.down_after()
                );
                if let Err(e) = self
                    .write(
                        &node,
                        Command::SetNodeState {
                            id,
                            state,
                            at: now_secs(),
                        },
                    )
                    .await
                {
                    debug!("writing node state: {e}");
                    break;
                }
            }
        }
    }
}

/// Whether `req` is a node's own heartbeat, leave or voter request.
fn speaks_for_itself(req: &PeerRequest, peer: &str) -> bool {
    matches!(req,
        PeerRequest::Heartbeat { node_id, .. }
        | PeerRequest::Leave { node_id }
        | PeerRequest::AddVoter { node_id }
        | PeerRequest::Assignments { node_id, .. }
        | PeerRequest::TaskStatus { node_id, .. }
        | PeerRequest::RenewCert { node_id, .. }
            if node_id == peer)
}

/// Serves the control port.
struct PeerHandler {
    member: Arc<Member>,
}

impl mesh_rpc::Handler<PeerRequest, PeerResponse> for PeerHandler {
    async fn handle(&self, peer: mesh_rpc::Peer, req: PeerRequest) -> PeerResponse {
        let m = &self.member;
        let local = m.local();
        // Joining nodes have no certificate yet: joins are the only unauthenticated request.
        if let PeerRequest::Join(j) = req {
            return m.on_leader(PeerRequest::Join(j)).await;
        }
        let Some(peer) = peer else {
            return PeerResponse::Error(ApiError::new(
                ErrorKind::PermissionDenied,
                "a node certificate is required",
            ));
        };
        if peer.cluster_id != local.cluster_id {
            return PeerResponse::Error(ApiError::new(
                ErrorKind::PermissionDenied,
                "certificate of another swarm",
            ));
        }
        if let Some(refused) = m.refuse_peer(&peer, &req).await {
            return PeerResponse::Error(refused);
        }
        match req {
            PeerRequest::Raft(r) => {
                let Some(node) = m.raft().await else {
                    return PeerResponse::Error(ApiError::new(
                        ErrorKind::Unavailable,
                        "raft is not running on this node",
                    ));
                };
                match r {
                    RaftRequest::AppendEntries(a) => {
                        PeerResponse::AppendEntries(node.raft.append_entries(a).await)
                    }
                    RaftRequest::Vote(v) => PeerResponse::Vote(node.raft.vote(v).await),
                    RaftRequest::InstallSnapshot(s) => {
                        PeerResponse::InstallSnapshot(node.raft.install_snapshot(s).await)
                    }
                }
            }
            PeerRequest::TaskLogs {
                task_ids,
                since_ns,
                tail,
                after,
            } => {
                if !m.is_manager_node(&peer.node_id).await && peer.role != mesh_ca::Role::Manager {
                    return PeerResponse::Error(ApiError::new(
                        ErrorKind::PermissionDenied,
                        "only managers ask for logs",
                    ));
                }
                PeerResponse::TaskLogs(m.agent.logs(task_ids, since_ns, tail, after).await)
            }
            PeerRequest::DataKey => {
                if !m.is_manager_node(&peer.node_id).await {
                    return PeerResponse::Error(ApiError::new(
                        ErrorKind::PermissionDenied,
                        "only managers hold the data key",
                    ));
                }
                let unlock_key = match m.raft().await {
                    Some(node) => node
                        .sm
                        .with_state(|s| s.cluster.as_ref().and_then(|c| c.unlock_key.clone()))
                        .await
                        .and_then(|k| mesh_api::unlock_key_bytes(&k)),
                    None => None,
                };
                let key = match m.keys() {
                    Some(k) => Some(k.dek),
                    None => match DataKey::load(&m.data_dir) {
                        Ok(k) => k,
                        Err(e) => return PeerResponse::Error(e),
                    },
                };
                PeerResponse::DataKey {
                    key: key.map(|k| k.bytes().to_vec()),
                    unlock_key,
                }
            }
            PeerRequest::Heartbeat { ref node_id, .. }
            | PeerRequest::Leave { ref node_id }
            | PeerRequest::AddVoter { ref node_id }
            | PeerRequest::Assignments { ref node_id, .. }
            | PeerRequest::TaskStatus { ref node_id, .. }
            | PeerRequest::RenewCert { ref node_id, .. }
                if *node_id != peer.node_id =>
            {
                PeerResponse::Error(ApiError::new(
                    ErrorKind::PermissionDenied,
                    "a node may only speak for itself",
                ))
            }
            PeerRequest::Forwarded(inner) => match m.leader().await {
                _ if !speaks_for_itself(&inner, &peer.node_id)
                    && !m.is_manager_node(&peer.node_id).await =>
                {
                    PeerResponse::Error(ApiError::new(
                        ErrorKind::PermissionDenied,
                        "only managers forward requests",
                    ))
                }
                Ok(Leader::Me(node)) => m.handle_as_leader(&node, *inner).await,
                Ok(Leader::Other(_)) => PeerResponse::Error(ApiError::no_leader()),
                Err(e) => PeerResponse::Error(e),
            },
            other => m.on_leader(other).await,
        }
    }
}

impl Member {
    /// Answers a node's long poll: its assignment set and its ended tasks still in the store,
    /// once they differ from what the node knows or after [`POLL_HOLD`].
    async fn leader_assignments(&self, node: &RaftNode, node_id: &str, known: u64) -> PeerResponse {
        let mut rx = node.sm.subscribe();
        let deadline = tokio::time::Instant::now() + POLL_HOLD;
        loop {
            let (tasks, ended, ingress, key_ids, members) = node
                .sm
                .with_state(|s| {
                    (
                        assigned_to(s.tasks.values(), node_id),
                        ended_on(s.tasks.values(), node_id),
                        crate::networks::ingress_attachment(s, node_id),
                        if gossipkeys::entitled(s, node_id) {
                            gossipkeys::ids(s)
                        } else {
                            Vec::new()
                        },
                        gossipkeys::member_addrs(s),
                    )
                })
                .await;
            let d = {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                assignments_digest(&tasks, &ended, ingress.as_ref()).hash(&mut h);
                (&key_ids, &members).hash(&mut h);
                h.finish()
            };
            if d != known || tokio::time::Instant::now() >= deadline {
                let needed = crate::blobs::needed_by(tasks.iter());
                let auth_of: BTreeSet<String> = tasks
                    .iter()
                    .filter(|t| t.desired_state <= mesh_api::TaskState::Running)
                    .map(|t| t.service_id.clone())
                    .collect();
                let sealed_auths: Vec<(String, Vec<u8>)> = node
                    .sm
                    .with_state(|s| {
                        auth_of
                            .iter()
                            .filter_map(|id| s.services.get(id))
                            .filter(|svc| !svc.registry_auth.is_empty())
                            .map(|svc| (svc.id.clone(), svc.registry_auth.clone()))
                            .collect()
                    })
                    .await;
                let mut registry_auths = BTreeMap::new();
                if !sealed_auths.is_empty() {
                    match self.data_key().await {
                        Ok(k) => {
                            for (id, sealed) in sealed_auths {
                                let creds = k
                                    .unseal(&sealed)
                                    .ok()
                                    .and_then(|p| serde_json::from_slice(&p).ok());
                                match creds {
                                    Some(c) => {
                                        registry_auths.insert(id, c);
                                    }
                                    None => warn!(
                                        "registry credentials of service {id} cannot be opened"
                                    ),
                                }
                            }
                        }
                        Err(e) => warn!("registry credentials for node {node_id}: {e}"),
                    }
                }
                let blobs = if needed.is_empty() {
                    Default::default()
                } else {
                    let key = match self.data_key().await {
                        Ok(k) => Some(k),
                        Err(e) => {
                            warn!("secrets for node {node_id}: {e}");
                            None
                        }
                    };
                    let payload = node
                        .sm
                        .with_state(|s| crate::blobs::payload(s, &needed, key.as_ref()))
                        .await;
                    match payload {
                        Ok(p) => p,
                        Err(e) => return PeerResponse::Error(ApiError::internal(e)),
                    }
                };
                let gossip_keys = if key_ids.is_empty() {
                    Vec::new()
                } else {
                    let key = self.data_key().await;
                    if let Err(e) = &key {
                        warn!("gossip keys for node {node_id}: {e}");
                    }
                    node.sm
                        .with_state(|s| gossipkeys::for_node(s, node_id, key.as_ref().ok()))
                        .await
                };
                return PeerResponse::Assignments {
                    digest: d,
                    tasks,
                    ended: Some(ended),
                    ingress,
                    blobs,
                    registry_auths,
                    gossip_keys,
                    members: Some(members),
                };
            }
            let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
        }
    }

    /// Adds a gossip key (see `gossipkeys`); whether it was written.
    async fn rotate_gossip_key(&self, node: &RaftNode, retire: bool) -> bool {
        let key = match self.data_key().await {
            Ok(k) => k,
            Err(e) => {
                debug!("gossip key: {e}");
                return false;
            }
        };
        let cmd = match gossipkeys::new_key(&key, now_ms(), retire) {
            Ok(c) => c,
            Err(e) => {
                warn!("gossip key: {e}");
                return false;
            }
        };
        match self.write(node, cmd).await {
            Ok(()) => {
                info!(retire, "new gossip key");
                true
            }
            Err(e) => {
                debug!("gossip key write: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                false
            }
        }
    }

    /// Takes a node's task reports; only for tasks placed on that node.
    async fn leader_task_status(
        &self,
        node: &RaftNode,
        node_id: &str,
        updates: Vec<(String, mesh_api::TaskStatus)>,
    ) -> Result<(), ApiError> {
        let updates: Vec<_> = node
            .sm
            .with_state(|s| {
                updates
                    .into_iter()
                    .filter(|(id, st)| {
                        s.tasks
                            .get(id)
                            .is_some_and(|t| t.node_id == node_id && st.state > t.status.state)
                    })
                    .collect()
            })
            .await;
        if updates.is_empty() {
            return Ok(());
        }
        self.write(node, Command::UpdateTaskStatus { updates })
            .await
    }

    /// While this manager leads: run the orchestrator after every change and on a short tick.
    async fn orchestrator_loop(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        loop {
            let Some(node) = self.raft().await else {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => continue,
                    _ = shutdown.changed() => return,
                }
            };
            let mut changes = node.sm.subscribe();
            let leading = {
                let m = node.raft.metrics();
                let m = m.borrow();
                m.state == ServerState::Leader && m.current_leader == Some(node.raft_id)
            };
            if leading {
                let state = node.sm.state().await;
                if let Some(retire) =
                    gossipkeys::due(&state, now_ms(), gossipkeys::rotation_period())
                {
                    if self.rotate_gossip_key(&node, retire).await {
                        continue;
                    }
                }
                let cmds = self.orchestrator.lock().await.plan(&state, now_ms());
                if !cmds.is_empty() {
                    if let Err(e) = self.write(&node, Command::Batch { commands: cmds }).await {
                        debug!("orchestrator write: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    continue;
                }
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

impl Member {
    /// Collects the log lines of `tasks` from the nodes that ran them (each node asked once,
    /// for its tasks), merged by time; a node that cannot answer is named in `errors`.
    async fn gather_logs(
        &self,
        state: &StoreState,
        tasks: Vec<&mesh_api::Task>,
        since_ns: Option<u64>,
        tail: Option<usize>,
        after: BTreeMap<String, u64>,
    ) -> mesh_api::ServiceLogs {
        let mut by_node: BTreeMap<String, Vec<&mesh_api::Task>> = BTreeMap::new();
        for t in tasks.into_iter().filter(|t| !t.node_id.is_empty()) {
            by_node.entry(t.node_id.clone()).or_default().push(t);
        }
        let me = self.local().node_id;
        let mut out = mesh_api::ServiceLogs::default();
        for (node_id, mut tasks) in by_node {
            tasks.sort_by_key(|t| (t.slot, t.created_at));
            let ids: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
            let after: BTreeMap<String, u64> = ids
                .iter()
                .filter_map(|id| after.get(id).map(|t| (id.clone(), *t)))
                .collect();
            let host = state
                .nodes
                .get(&node_id)
                .map(|n| n.hostname.clone())
                .unwrap_or_else(|| node_id.clone());
            let logs = if node_id == me {
                self.agent.logs(ids, since_ns, tail, after).await
            } else {
                let Some(addr) = state.nodes.get(&node_id).map(|n| n.addr.clone()) else {
                    continue;
                };
                let req = PeerRequest::TaskLogs {
                    task_ids: ids,
                    since_ns,
                    tail,
                    after,
                };
                match self.call(&addr, &req, Duration::from_secs(10)).await {
                    Ok(PeerResponse::TaskLogs(l)) => l,
                    Ok(other) => {
                        out.errors
                            .push(format!("error from {host}: cannot get logs: {other:?}"));
                        continue;
                    }
                    Err(e) => {
                        out.errors
                            .push(format!("error from {host}: cannot get logs: {e}"));
                        continue;
                    }
                }
            };
            for (t, log) in tasks.iter().zip(logs) {
                if let Some(e) = log.error {
                    // A task whose directory its node removed (or never made).
                    debug!("logs of {}: {e}", t.id);
                    continue;
                }
                out.lines
                    .extend(log.lines.into_iter().map(|line| mesh_api::ServiceLogLine {
                        task_id: t.id.clone(),
                        task_name: t.short_name(),
                        service_id: t.service_id.clone(),
                        node_id: node_id.clone(),
                        node: host.clone(),
                        line,
                    }));
            }
        }
        // Merged by time (each task's lines are in order already).
        out.lines.sort_by_key(|l| l.line.time_ns);
        out
    }
}

/// The tasks `service logs KEY` reads: a service's (ID, name or unique ID prefix), or else
/// one task (ID or unique ID prefix); Docker's error when neither is found.
fn log_targets<'a>(state: &'a StoreState, key: &str) -> Result<Vec<&'a mesh_api::Task>, ApiError> {
    if let Ok(svc) = state.find_service(key) {
        return Ok(state.service_tasks(&svc.id).collect());
    }
    if let Some(t) = state.tasks.get(key) {
        return Ok(vec![t]);
    }
    let by_prefix: Vec<&mesh_api::Task> = state
        .tasks
        .values()
        .filter(|t| !key.is_empty() && t.id.starts_with(key))
        .collect();
    match by_prefix.len() {
        1 => Ok(by_prefix),
        0 => Err(ApiError::not_found(format!(
            "no such task or service: {key}"
        ))),
        n => Err(ApiError::invalid(format!(
            "task {key} is ambiguous ({n} matches)"
        ))),
    }
}

/// Task listing rows as the CLI reads them: each [`mesh_api::TaskSummary`] with `age_ms`,
/// the time since its last state change.
fn task_rows(rows: Vec<(mesh_api::TaskSummary, u64)>) -> serde_json::Value {
    let now = now_ms();
    let rows: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|(row, ts)| {
            let mut v = json!(row);
            v["age_ms"] = json!(now.saturating_sub(ts));
            v
        })
        .collect();
    json!(rows)
}

/// Forwarding (`forward`) over Raft's view of the leader and the member's connections.
impl forward::Routes for Arc<Member> {
    type Node = RaftNode;

    fn leader(&self) -> impl std::future::Future<Output = Result<Leader, ApiError>> + Send {
        Member::leader(self)
    }

    async fn lead(&self, node: RaftNode, req: PeerRequest) -> PeerResponse {
        self.handle_as_leader(&node, req).await
    }

    fn send(
        &self,
        addr: &str,
        req: &PeerRequest,
    ) -> impl std::future::Future<Output = Result<PeerResponse, mesh_rpc::RpcError>> + Send {
        self.forward(addr, req)
    }
}
