//! The daemon core: one per `meshd`. It owns the node's swarm membership (none, or a running
//! [`Member`]), turns `swarm init/join/leave` into that membership, and answers the local API.
//! Management calls go to the Raft leader through the member; a worker refuses them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_api::answers::to_response;
use mesh_api::{
    ApiError, ErrorKind, ExecAnswer, IdAnswer, JoinAnswer, LocalInfo, MessageAnswer, NodeRole,
    RegistryAuth, Request, Response, SwarmInitAnswer, TokenAnswer,
};
use mesh_ca::{JoinToken, NodeKey, RootCa};
use serde_json::json;
use tokio::sync::{mpsc, Mutex, RwLock};
use tracing::{info, warn};

use crate::agent::Agent;
use crate::runtime::{Images, NetworkPlane, PlaneError, Runtime};
use mesh_manager::datakey::DataKey;
use mesh_manager::local::{self, LocalState};
use mesh_manager::member::{now_secs, Keys, Member, MemberEvent};
use mesh_manager::peer::{JoinRequest, PeerRequest, PeerResponse};

/// Default control port, as Swarm's.
pub const DEFAULT_CONTROL_PORT: u16 = 2377;

/// Static settings of a daemon.
#[derive(Clone)]
pub struct DaemonConfig {
    pub node_name: String,
    pub data_dir: PathBuf,
    pub exec_root: PathBuf,
    /// Runs the tasks assigned to this node.
    pub runtime: Arc<dyn Runtime>,
    /// Overlay plumbing and endpoint gossip (`None`: tasks get no network but `lo`).
    pub plane: Option<Arc<dyn NetworkPlane>>,
    /// The node's image store (`None`: services of images are refused here, and image
    /// tasks rejected).
    pub images: Option<Arc<dyn Images>>,
}

/// The daemon core.
pub struct Daemon {
    cfg: DaemonConfig,
    member: RwLock<Option<Arc<Member>>>,
    /// A manager that restarted with autolock on and waits for `swarm unlock`: its state,
    /// which it cannot use until then (its data key is wrapped with the unlock key).
    locked: RwLock<Option<LocalState>>,
    /// Serializes init, join, unlock and leave.
    lifecycle: Mutex<()>,
    events: mpsc::UnboundedSender<MemberEvent>,
    metrics: mesh_manager::metrics::Metrics,
}

fn already_in_swarm() -> ApiError {
    ApiError::new(
        ErrorKind::AlreadyInSwarm,
        "This node is already part of a swarm. Use \"mesh swarm leave\" to leave this swarm and join another one.",
    )
}

impl Daemon {
    /// Creates the daemon and, if `--data-dir` holds a swarm membership, rejoins it.
    pub async fn start(cfg: DaemonConfig) -> Result<Arc<Daemon>, ApiError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
            ApiError::internal(format!("cannot create {}: {e}", cfg.data_dir.display()))
        })?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let daemon = Arc::new(Daemon {
            cfg,
            member: RwLock::new(None),
            locked: RwLock::new(None),
            lifecycle: Mutex::new(()),
            events: tx,
            metrics: mesh_manager::metrics::Metrics::default(),
        });
        if let Some(local) = LocalState::load(&daemon.cfg.data_dir).map_err(ApiError::internal)? {
            if local.role == NodeRole::Manager && DataKey::is_locked(&daemon.cfg.data_dir) {
                warn!(
                    node_id = local.node_id,
                    "swarm is locked: this manager waits for \"mesh swarm unlock\""
                );
                *daemon.locked.write().await = Some(local);
            } else {
                info!(node_id = local.node_id, role = %local.role, "resuming swarm membership");
                let keys = DataKey::load(&daemon.cfg.data_dir)?.map(|dek| Keys {
                    dek,
                    wrapped_with: None,
                });
                let mut local = local;
                if local.key_is_sealed() {
                    let k = keys.as_ref().ok_or_else(|| {
                        ApiError::internal(
                            "the node's TLS key is sealed and this node has no data key",
                        )
                    })?;
                    local.open_key(&k.dek)?;
                }
                daemon.resume(local, keys).await?;
            }
        } else {
            // Not in a swarm: nothing of one may stay, neither its tasks nor what it put in
            // the kernel (a swarm left while the daemon was down). Done before the API is
            // served, so a swarm joined next loses nothing of its own.
            let rt = daemon.cfg.runtime.clone();
            let plane = daemon.cfg.plane.clone();
            let _ = tokio::task::spawn_blocking(move || {
                remove_tasks(&*rt);
                if let Some(plane) = plane {
                    plane.clean_leftovers();
                }
            })
            .await;
        }
        let weak = Arc::downgrade(&daemon);
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                let Some(d) = weak.upgrade() else { return };
                match ev {
                    MemberEvent::Removed => {
                        if let Err(e) = d.leave_local().await {
                            warn!("leaving after removal: {e}");
                        }
                    }
                }
            }
        });
        Ok(daemon)
    }

    /// Starts the member of a node that was in a swarm when the daemon stopped.
    async fn resume(&self, local: LocalState, keys: Option<Keys>) -> Result<(), ApiError> {
        let listener = bind(&local.listen_addr).await?;
        let member = self.start_member(local, listener, false, keys).await?;
        *self.member.write().await = Some(member);
        Ok(())
    }

    /// A member of this daemon's swarm membership (`init`: the first manager of a new one).
    async fn start_member(
        &self,
        local: LocalState,
        listener: tokio::net::TcpListener,
        init: bool,
        keys: Option<Keys>,
    ) -> Result<Arc<Member>, ApiError> {
        Member::start(
            self.cfg.data_dir.clone(),
            local,
            listener,
            init,
            mesh_manager::member::Hooks {
                events: self.events.clone(),
                metrics: self.metrics.clone(),
            },
            self.new_agent(),
            keys,
        )
        .await
    }

    /// `swarm unlock`: opens the data key with the unlock key and starts the member.
    async fn unlock(&self, key: String) -> Response {
        let _g = self.lifecycle.lock().await;
        let Some(mut local) = self.locked.read().await.clone() else {
            return Err(if self.member().await.is_some() {
                ApiError::invalid("swarm is not locked")
            } else {
                ApiError::new(ErrorKind::NotInSwarm, "This node is not part of a swarm")
            });
        };
        let (dek, unlock_key) = DataKey::unlock(&self.cfg.data_dir, &key)?;
        local.open_key(&dek)?;
        let keys = Keys {
            dek,
            wrapped_with: Some(unlock_key),
        };
        self.resume(local, Some(keys)).await?;
        *self.locked.write().await = None;
        info!("swarm unlocked");
        Ok(json!({ "unlocked": true }))
    }

    /// The error a call needing the swarm gets on a node without a running member.
    async fn no_member(&self) -> ApiError {
        if self.locked.read().await.is_some() {
            ApiError::locked()
        } else {
            ApiError::not_in_swarm()
        }
    }

    fn new_agent(&self) -> Arc<Agent> {
        Agent::new(
            self.cfg.runtime.clone(),
            self.cfg.plane.clone(),
            self.cfg.images.clone(),
            self.cfg.node_name.clone(),
        )
    }

    /// Runs a command inside a task on this node (`mesh exec`). TASK is a task ID (or unique
    /// prefix), a full task name (`web.1.<id>`) or a short one (`web.1`).
    async fn exec(&self, task: String, argv: Vec<String>) -> Response {
        if argv.is_empty() {
            return Err(ApiError::invalid("exec needs a command"));
        }
        let Some(member) = self.member().await else {
            return Err(self.no_member().await);
        };
        let assigned = member.agent.assigned_tasks();
        let rt = self.cfg.runtime.clone();
        let local: Vec<String> = tokio::task::spawn_blocking(move || {
            rt.list()
                .into_iter()
                .filter(|(_, s)| matches!(s, crate::runtime::RunState::Running { .. }))
                .map(|(id, _)| id)
                .collect()
        })
        .await
        .map_err(ApiError::internal)?;
        let matches: Vec<&String> = local
            .iter()
            .filter(|id| {
                **id == task
                    || id.starts_with(&task)
                    || assigned
                        .iter()
                        .any(|t| t.id == **id && (t.name() == task || t.short_name() == task))
            })
            .collect();
        let id = match matches.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(ApiError::not_found(format!(
                    "no such task running on this node: {task}"
                )))
            }
            _ => {
                return Err(ApiError::invalid(format!(
                    "task {task} is ambiguous ({} matches)",
                    matches.len()
                )))
            }
        };
        let rt = self.cfg.runtime.clone();
        let r = tokio::task::spawn_blocking(move || rt.exec(&id, &argv, Duration::from_secs(300)))
            .await
            .map_err(ApiError::internal)??;
        to_response(&ExecAnswer {
            status: r.status,
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        })
    }

    /// Runs a blocking query of the network plane.
    async fn plane_call<T: serde::Serialize + Send + 'static>(
        &self,
        f: impl FnOnce(&dyn NetworkPlane) -> Result<T, PlaneError> + Send + 'static,
    ) -> Response {
        self.member().await.ok_or_else(ApiError::not_in_swarm)?;
        let plane = self.cfg.plane.clone().ok_or_else(|| {
            ApiError::new(
                ErrorKind::Unavailable,
                "this node has no network data plane",
            )
        })?;
        let answer = tokio::task::spawn_blocking(move || f(plane.as_ref()))
            .await
            .map_err(ApiError::internal)??;
        serde_json::to_value(answer).map_err(ApiError::internal)
    }

    /// Stops the member runtime, keeping the state for the next start.
    pub async fn shutdown(&self) {
        if let Some(m) = self.member.write().await.take() {
            m.stop().await;
        }
    }

    /// The control plane's live instruments, to register once (`mesh_raft_propose_seconds`,
    /// `mesh_raft_leader_changes_total`).
    pub fn metrics(&self) -> &mesh_manager::metrics::Metrics {
        &self.metrics
    }

    /// The control plane's figures now, for a scrape: the Raft figures on a manager, the
    /// cluster's figures from the store on the leader (counted under the store's read lock,
    /// without copying it).
    pub async fn metrics_snapshot(&self) -> mesh_manager::metrics::Snapshot {
        match self.member().await {
            Some(member) => member.metrics_snapshot().await,
            None => mesh_manager::metrics::Snapshot::default(),
        }
    }

    async fn member(&self) -> Option<Arc<Member>> {
        self.member.read().await.clone()
    }

    /// Answers one local API request.
    pub async fn handle(&self, req: Request) -> Response {
        match req {
            Request::Version => Ok(json!({ "version": env!("CARGO_PKG_VERSION") })),
            Request::Info => {
                Ok(serde_json::to_value(self.info().await).map_err(ApiError::internal)?)
            }
            Request::SwarmInit {
                advertise_addr,
                listen_addr,
                autolock,
                force_new_cluster,
            } => {
                if force_new_cluster && self.member().await.is_some() {
                    self.force_new_cluster(advertise_addr, autolock).await
                } else if force_new_cluster && self.locked.read().await.is_some() {
                    // The store is sealed with a key only the unlock key opens.
                    Err(ApiError::locked())
                } else {
                    // Outside a swarm `--force-new-cluster` is a plain init, as Docker's.
                    self.init(advertise_addr, listen_addr, autolock).await
                }
            }
            Request::SwarmUnlock { key } => self.unlock(key).await,
            Request::SwarmJoin {
                token,
                remote,
                advertise_addr,
                listen_addr,
            } => self.join(token, remote, advertise_addr, listen_addr).await,
            Request::SwarmLeave { force } => self.leave(force).await,
            Request::Exec { task, argv } => self.exec(task, argv).await,
            Request::VipLs => self.plane_call(|p| p.vip_ls()).await,
            Request::DnsQuery {
                network,
                name,
                qtype,
            } => {
                self.plane_call(move |p| p.dns_query(network.as_deref(), &name, &qtype))
                    .await
            }
            Request::ImageLs => {
                self.image_call(|i| {
                    i.ls()
                        .and_then(|l| serde_json::to_value(l).map_err(ApiError::internal))
                })
                .await
            }
            Request::Login {
                server,
                credentials,
            } => {
                self.image_call(move |i| {
                    let saved = i.login(&server, &credentials)?;
                    tracing::info!(registry = saved, user = credentials.username, "login saved");
                    Ok(json!({ "status": "Login Succeeded", "server": saved }))
                })
                .await
            }
            Request::Logout { server } => {
                self.image_call(move |i| {
                    let had = i.logout(&server)?;
                    Ok(json!({ "removed": had }))
                })
                .await
            }
            Request::ImagePull { reference } => {
                self.image_call(move |i| {
                    let r = i.pull(&reference, None)?;
                    Ok(json!({ "reference": r.reference }))
                })
                .await
            }
            Request::LocalTasks => match self.member().await {
                Some(m) => Ok(json!(m.agent.local_tasks(&self.cfg.node_name).await)),
                None => Ok(json!([])),
            },
            Request::ImageResolve { reference } => {
                self.image_call(move |i| {
                    let normal = i.normalise(&reference)?;
                    let pinned = i.pin(&normal, None)?;
                    let digest = pinned.split_once('@').map(|(_, d)| d.to_string());
                    Ok(json!({ "reference": pinned, "digest": digest }))
                })
                .await
            }
            Request::ImageRm { reference } => {
                let in_use = match self.member().await {
                    Some(m) => m.agent.images_in_use(),
                    None => Vec::new(),
                };
                self.image_call(move |i| {
                    let normal = i.normalise(&reference)?;
                    // As Docker: an image a task of this node uses is not removed.
                    if let Some(user) = in_use
                        .iter()
                        .find(|u| **u == normal || u.split('@').next() == Some(normal.as_str()))
                    {
                        return Err(ApiError::new(
                            ErrorKind::AlreadyExists,
                            format!(
                                "conflict: unable to remove repository reference \"{reference}\" (must force) - a task of this node is using its referenced image {user}"
                            ),
                        ));
                    }
                    i.rm(&reference)
                })
                .await
            }
            Request::ImagePrune => {
                let keep = match self.member().await {
                    Some(m) => m.agent.images_in_use(),
                    None => Vec::new(),
                };
                self.image_call(move |i| i.prune(&keep)).await
            }
            Request::ImageLoad { path } => {
                self.image_call(move |i| i.load(&path).map(|refs| json!({ "loaded": refs })))
                    .await
            }
            Request::ServiceCreate {
                mut spec,
                registry_auth,
            } if !spec.image.is_empty() => {
                self.manager().await?;
                let registry_auth = self.resolve_auth(registry_auth, &spec.image).await?;
                let warning = self.pin_image(&mut spec.image, &registry_auth).await?;
                let v = self
                    .management(Request::ServiceCreate {
                        spec,
                        registry_auth,
                    })
                    .await?;
                with_warning(v, warning)
            }
            Request::ServiceUpdate {
                service,
                mut update,
            } if update.image.is_some() || update.registry_auth.is_some() => {
                self.manager().await?;
                let image = match update.image.clone() {
                    Some(i) => i,
                    None => {
                        let v = self
                            .management(Request::ServiceInspect {
                                service: service.clone(),
                            })
                            .await?;
                        v["Spec"]["image"].as_str().unwrap_or_default().to_string()
                    }
                };
                update.registry_auth = self.resolve_auth(update.registry_auth, &image).await?;
                let warning = match update.image.take() {
                    Some(mut image) => {
                        let w = self.pin_image(&mut image, &update.registry_auth).await?;
                        update.image = Some(image);
                        w
                    }
                    None => None,
                };
                let v = self
                    .management(Request::ServiceUpdate { service, update })
                    .await?;
                with_warning(v, warning)
            }
            Request::ServiceReplace {
                service,
                version,
                mut spec,
                rollback,
                registry_auth,
            } => {
                self.manager().await?;
                let registry_auth = self.resolve_auth(registry_auth, &spec.image).await?;
                let warning = if rollback || spec.image.is_empty() || spec.image.contains('@') {
                    None
                } else {
                    self.pin_image(&mut spec.image, &registry_auth).await?
                };
                let v = self
                    .management(Request::ServiceReplace {
                        service,
                        version,
                        spec,
                        rollback,
                        registry_auth,
                    })
                    .await?;
                with_warning(v, warning)
            }
            req => self.management(req).await,
        }
    }

    /// Runs a blocking call of the image store.
    async fn image_call(
        &self,
        f: impl FnOnce(&dyn Images) -> Response + Send + 'static,
    ) -> Response {
        let images =
            self.cfg.images.clone().ok_or_else(|| {
                ApiError::new(ErrorKind::Unavailable, "this node has no image store")
            })?;
        tokio::task::spawn_blocking(move || f(images.as_ref()))
            .await
            .map_err(ApiError::internal)?
    }

    /// Normalises a service's image and pins it to the digest its tag names on the registry
    /// now, as Docker's CLI does at create and update, so every task runs the same bits.
    /// When the registry cannot tell, the tag is kept and Docker's warning is returned.
    async fn pin_image(
        &self,
        image: &mut String,
        auth: &Option<RegistryAuth>,
    ) -> Result<Option<String>, ApiError> {
        let Some(images) = self.cfg.images.clone() else {
            return Ok(None);
        };
        let given = image.clone();
        let auth = match auth {
            Some(RegistryAuth::Credentials(c)) => Some(c.clone()),
            _ => None,
        };
        let (pinned, warning) = tokio::task::spawn_blocking(move || {
            let normal = images.normalise(&given)?;
            Ok::<_, ApiError>(match images.pin(&normal, auth.as_ref()) {
                Ok(p) => (p, None),
                Err(e) => {
                    tracing::warn!(image = given, error = %e, "cannot pin the image to a digest");
                    (
                        normal,
                        Some(format!(
                            "image {given} could not be accessed on a registry to record\n\
                             its digest. Each node will access {given} independently,\n\
                             possibly leading to different nodes running different\n\
                             versions of the image.\n"
                        )),
                    )
                }
            })
        })
        .await
        .map_err(ApiError::internal)??;
        *image = pinned;
        Ok(warning)
    }

    /// `--with-registry-auth` becomes this node's login for the image's registry (none if it
    /// has none, as Docker's CLI then sends empty credentials).
    async fn resolve_auth(
        &self,
        auth: Option<RegistryAuth>,
        image: &str,
    ) -> Result<Option<RegistryAuth>, ApiError> {
        match auth {
            Some(RegistryAuth::NodeLogin) => {
                let Some(images) = self.cfg.images.clone() else {
                    return Ok(None);
                };
                let image = image.to_string();
                let creds = tokio::task::spawn_blocking(move || images.node_login(&image))
                    .await
                    .map_err(ApiError::internal)?;
                Ok(creds.map(RegistryAuth::Credentials))
            }
            other => Ok(other),
        }
    }

    /// This node's member, if it is a manager (else the error a management call gets).
    async fn manager(&self) -> Result<Arc<Member>, ApiError> {
        let Some(member) = self.member().await else {
            return Err(self.no_member().await);
        };
        if member.local().role != NodeRole::Manager || !member.runs_raft().await {
            return Err(ApiError::not_manager());
        }
        Ok(member)
    }

    async fn management(&self, req: Request) -> Response {
        let member = self.manager().await?;
        let local = member.local();
        let is_ls = matches!(req, Request::NodeLs { .. });
        let is_token = matches!(req, Request::JoinToken { .. });
        let mut v = match member.on_leader(PeerRequest::Api(Box::new(req))).await {
            PeerResponse::Api(r) => r?,
            PeerResponse::Error(e) => return Err(e),
            other => return Err(ApiError::internal(format!("unexpected answer: {other:?}"))),
        };
        if is_ls {
            if let Some(arr) = v.as_array_mut() {
                for n in arr {
                    n["is_self"] = json!(n["id"] == json!(local.node_id));
                }
            }
        }
        if is_token {
            let mut a: TokenAnswer = mesh_api::answers::from_value(v)?;
            a.addr = local.advertise_addr.clone();
            return to_response(&a);
        }
        Ok(v)
    }

    async fn info(&self) -> LocalInfo {
        let mut info = LocalInfo {
            node_name: self.cfg.node_name.clone(),
            swarm: "inactive".into(),
            resources: crate::host::machine_resources(),
            ..Default::default()
        };
        let Some(member) = self.member().await else {
            if let Some(local) = self.locked.read().await.as_ref() {
                info.swarm = "locked".into();
                info.node_id = Some(local.node_id.clone());
                info.cluster_id = Some(local.cluster_id.clone());
                info.role = Some(local.role);
                info.node_addr = Some(local.advertise_addr.clone());
                info.managers = local.managers.clone();
            }
            return info;
        };
        let local = member.local();
        info.swarm = "active".into();
        info.node_id = Some(local.node_id.clone());
        info.cluster_id = Some(local.cluster_id.clone());
        info.role = Some(local.role);
        info.node_addr = Some(local.advertise_addr.clone());
        info.managers = local.managers.clone();
        info.gossip = self.cfg.plane.as_ref().and_then(|p| p.gossip_info());
        if let Some((raft, leader)) = member.raft_info().await {
            info.raft = Some(raft);
            info.leader = leader;
        }
        info
    }

    fn addrs(
        &self,
        advertise_addr: Option<String>,
        listen_addr: Option<String>,
    ) -> Result<(SocketAddr, SocketAddr), ApiError> {
        let listen = match &listen_addr {
            Some(l) => {
                local::parse_addr(l, None, DEFAULT_CONTROL_PORT).map_err(ApiError::invalid)?
            }
            None => SocketAddr::from(([0, 0, 0, 0], DEFAULT_CONTROL_PORT)),
        };
        let advertise = match advertise_addr {
            Some(a) => local::parse_addr(&a, None, listen.port()).map_err(ApiError::invalid)?,
            None if !listen.ip().is_unspecified() => listen,
            None => SocketAddr::new(
                crate::host::default_advertise_ip().map_err(ApiError::invalid)?,
                listen.port(),
            ),
        };
        if advertise.ip().is_unspecified() || advertise.ip().is_loopback() {
            return Err(ApiError::invalid(format!(
                "advertise address must be a non-zero, non-loopback IP address: {advertise}"
            )));
        }
        Ok((advertise, listen))
    }

    async fn init(
        &self,
        advertise_addr: Option<String>,
        listen_addr: Option<String>,
        autolock: bool,
    ) -> Response {
        let _g = self.lifecycle.lock().await;
        if self.member().await.is_some() || self.locked.read().await.is_some() {
            return Err(already_in_swarm());
        }
        let (advertise, listen) = self.addrs(advertise_addr, listen_addr)?;
        let listener = bind(&listen.to_string()).await?;
        let ca = RootCa::generate().map_err(ApiError::internal)?;
        let cluster_id = mesh_ca::new_secret();
        let node_id = mesh_ca::new_secret();
        let key = NodeKey::generate().map_err(ApiError::internal)?;
        let csr = key.csr_pem().map_err(ApiError::internal)?;
        let cert_pem = ca
            .sign_node_csr(&csr, &node_id, mesh_ca::Role::Manager, &cluster_id)
            .map_err(ApiError::internal)?;
        let raft_id = rand::random::<u64>().max(1);
        let local = LocalState {
            node_id: node_id.clone(),
            cluster_id: cluster_id.clone(),
            role: NodeRole::Manager,
            raft_id,
            ca_cert_pem: ca.cert_pem().to_string(),
            cert_pem,
            key_pem: key.key_pem().to_string(),
            key_sealed: None,
            advertise_addr: advertise.to_string(),
            listen_addr: listen.to_string(),
            managers: vec![advertise.to_string()],
        };
        // A half-done earlier init may have left a raft store: start clean.
        let _ = std::fs::remove_file(self.cfg.data_dir.join("raft.redb"));
        let unlock_key = if autolock {
            Some(mesh_manager::member::new_unlock_key()?)
        } else {
            None
        };
        let wrapped_with = unlock_key.as_deref().and_then(mesh_api::unlock_key_bytes);
        let dek = DataKey::generate()?;
        dek.save(&self.cfg.data_dir, wrapped_with.as_deref())?;
        let member = self
            .start_member(
                local.clone(),
                listener,
                true,
                Some(Keys { dek, wrapped_with }),
            )
            .await?;
        let now = now_secs();
        let cluster = mesh_api::Cluster {
            id: cluster_id,
            created_at: now,
            ca_cert_pem: ca.cert_pem().to_string(),
            ca_key_pem: ca.key_pem().to_string(),
            worker_secret: mesh_ca::new_secret(),
            manager_secret: mesh_ca::new_secret(),
            unlock_key: unlock_key.clone(),
            settings: Default::default(),
            ca_chain_pem: String::new(),
            ca_rotation: None,
        };
        let node = mesh_api::Node {
            raft_id,
            resources: crate::host::machine_resources(),
            created_at: now,
            updated_at: now,
            ..mesh_api::Node::new(
                node_id.clone(),
                self.cfg.node_name.clone(),
                NodeRole::Manager,
                advertise.to_string(),
            )
        };
        let worker_token = JoinToken::new(&ca.digest(), &cluster.worker_secret).to_string();
        let res = member.bootstrap(cluster, node, now).await;
        if let Err(e) = res.and_then(|_| member.persist_local()) {
            member.stop().await;
            let _ = std::fs::remove_file(self.cfg.data_dir.join("raft.redb"));
            let _ = std::fs::remove_file(self.cfg.data_dir.join(mesh_manager::datakey::KEY_FILE));
            return Err(e);
        }
        *self.member.write().await = Some(member);
        info!(node_id, "swarm initialized");
        to_response(&SwarmInitAnswer {
            node_id,
            worker_token,
            addr: advertise.to_string(),
            unlock_key: unlock_key.map(|k| mesh_api::human_unlock_key(&k)),
        })
    }

    /// `swarm init --force-new-cluster` on a member: a manager becomes the one manager of a
    /// swarm rebuilt from its committed state (see `storage::rebuild_single_voter`); the
    /// cluster, its IDs, CA, tokens and objects stay, the other managers stay in the store as
    /// nodes outside Raft (no manager status, removable), and the nodes that knew this
    /// manager's address report to it again. The node keeps its addresses (a listen address
    /// in the request is not used: Docker's CLI always sends one).
    async fn force_new_cluster(&self, advertise_addr: Option<String>, autolock: bool) -> Response {
        let _g = self.lifecycle.lock().await;
        let Some(member) = self.member().await else {
            return Err(ApiError::not_in_swarm());
        };
        let local = member.local();
        if local.role != NodeRole::Manager {
            return Err(ApiError::not_manager());
        }
        if autolock {
            // The rebuilt swarm keeps its settings; autolock is changed apart.
            return Err(ApiError::invalid(
                "--autolock cannot be changed by --force-new-cluster: use \"mesh swarm update --autolock\" once the swarm has a leader",
            ));
        }
        if let Some(a) = advertise_addr {
            let port = local::parse_addr(&local.advertise_addr, None, DEFAULT_CONTROL_PORT)
                .map(|a| a.port())
                .unwrap_or(DEFAULT_CONTROL_PORT);
            let want = local::parse_addr(&a, None, port).map_err(ApiError::invalid)?;
            if want.to_string() != local.advertise_addr {
                return Err(ApiError::invalid(format!(
                    "--force-new-cluster keeps this node's advertise address {}: {a} cannot be taken",
                    local.advertise_addr
                )));
            }
        }
        let forced = member.force_new_cluster().await?;
        let rebuilt = &forced.rebuilt;
        info!(
            index = rebuilt.index,
            dropped = rebuilt.dropped,
            removed = ?rebuilt.removed,
            "raft store rebuilt with this manager as the only voter"
        );
        let worker_token = forced.worker_token;
        info!(
            node_id = local.node_id,
            "new cluster forced from the local state"
        );
        to_response(&SwarmInitAnswer {
            node_id: local.node_id,
            worker_token,
            addr: local.advertise_addr,
            unlock_key: None,
        })
    }

    async fn join(
        &self,
        token: String,
        remote: String,
        advertise_addr: Option<String>,
        listen_addr: Option<String>,
    ) -> Response {
        let _g = self.lifecycle.lock().await;
        if self.member().await.is_some() || self.locked.read().await.is_some() {
            return Err(already_in_swarm());
        }
        let parsed = JoinToken::parse(&token).map_err(ApiError::invalid)?;
        let remote = local::parse_addr(&remote, None, DEFAULT_CONTROL_PORT)
            .map_err(ApiError::invalid)?
            .to_string();
        let (advertise, listen) = self.addrs(advertise_addr, listen_addr)?;
        let listener = bind(&listen.to_string()).await?;
        let key = NodeKey::generate().map_err(ApiError::internal)?;
        let tls =
            mesh_ca::bootstrap_client_config(&parsed.ca_digest).map_err(ApiError::internal)?;
        let req = PeerRequest::Join(JoinRequest {
            token,
            csr_pem: key.csr_pem().map_err(ApiError::internal)?,
            hostname: self.cfg.node_name.clone(),
            addr: advertise.to_string(),
            resources: crate::host::machine_resources(),
        });
        let resp: PeerResponse = mesh_rpc::call_once(&remote, tls, &req, Duration::from_secs(20))
            .await
            .map_err(|e| {
                let msg = e.to_string();
                if msg.contains("CA digest mismatch") {
                    ApiError::new(
                        ErrorKind::PermissionDenied,
                        format!("the join token does not match the CA of the swarm at {remote}: check the token"),
                    )
                } else {
                    ApiError::new(ErrorKind::Unavailable, format!("cannot join the swarm at {remote}: {msg}"))
                }
            })?;
        let accept = match resp {
            PeerResponse::Joined(a) => a,
            PeerResponse::Error(e) => return Err(e),
            other => {
                return Err(ApiError::internal(format!(
                    "unexpected answer to join: {other:?}"
                )))
            }
        };
        // The connection was pinned to the token's CA; check the CA we are told to store too.
        let ca_der = mesh_ca::cert_der_from_pem(&accept.ca_cert_pem).map_err(ApiError::internal)?;
        if mesh_ca::ca_digest(&ca_der) != parsed.ca_digest {
            return Err(ApiError::new(
                ErrorKind::PermissionDenied,
                "the swarm's CA certificate does not match the join token",
            ));
        }
        let mut managers = accept.managers.clone();
        if !managers.contains(&remote) {
            managers.push(remote.clone());
        }
        let local = LocalState {
            node_id: accept.node_id.clone(),
            cluster_id: accept.cluster_id,
            role: accept.role,
            raft_id: accept.raft_id,
            ca_cert_pem: accept.ca_cert_pem,
            cert_pem: accept.cert_pem,
            key_pem: key.key_pem().to_string(),
            key_sealed: None,
            advertise_addr: advertise.to_string(),
            listen_addr: listen.to_string(),
            managers,
        };
        local.save(&self.cfg.data_dir).map_err(ApiError::internal)?;
        let _ = std::fs::remove_file(self.cfg.data_dir.join("raft.redb"));
        let _ = std::fs::remove_file(self.cfg.data_dir.join(mesh_manager::datakey::KEY_FILE));
        let member = self.start_member(local, listener, false, None).await?;
        if accept.role == NodeRole::Manager {
            if let Err(e) = member.become_manager().await {
                // The node is in the swarm; the heartbeat loop retries joining Raft.
                warn!("joining raft: {e}");
            }
        }
        *self.member.write().await = Some(member);
        info!(node_id = accept.node_id, role = %accept.role, "joined swarm");
        to_response(&JoinAnswer {
            node_id: accept.node_id,
            role: accept.role,
        })
    }

    async fn leave(&self, force: bool) -> Response {
        if self.locked.read().await.is_some() {
            // As Docker: a locked manager can only be forced out (its state is wiped).
            if !force {
                return Err(ApiError::invalid(
                    "You are attempting to leave the swarm on a node that is participating as a manager. The swarm is locked on this node, so its state cannot be read. Use `--force` to ignore this message.",
                ));
            }
            self.leave_local().await?;
            return to_response(&MessageAnswer::new("Node left the swarm."));
        }
        let member = self.member().await.ok_or_else(|| {
            ApiError::new(ErrorKind::NotInSwarm, "This node is not part of a swarm")
        })?;
        let local = member.local();
        if local.role == NodeRole::Manager && !force {
            let voters = member.raft_voters().await.unwrap_or(1);
            let msg = if voters <= 1 {
                "You are attempting to leave the swarm on a node that is participating as a manager. Removing the last manager erases all current state of the swarm. Use `--force` to ignore this message.".to_string()
            } else {
                let left = voters - 1;
                let quorum_kept = left > voters / 2;
                format!(
                    "You are attempting to leave the swarm on a node that is participating as a manager. Removing this node leaves {left} managers out of {voters}.{} Use `--force` to suppress this message.",
                    if quorum_kept { "" } else { " Without a Raft quorum your swarm will be inaccessible." }
                )
            };
            return Err(ApiError::invalid(msg));
        }
        // Tell the leader (best effort: a forced leave works without quorum too); a worker
        // goes through the managers it knows.
        let req = PeerRequest::Leave {
            node_id: local.node_id.clone(),
        };
        let _ = tokio::time::timeout(Duration::from_secs(8), member.to_leader(req)).await;
        self.leave_local().await?;
        to_response(&MessageAnswer::new("Node left the swarm."))
    }

    /// Stops the member and wipes the swarm state from `--data-dir`.
    async fn leave_local(&self) -> Result<(), ApiError> {
        let _g = self.lifecycle.lock().await;
        if let Some(m) = self.member.write().await.take() {
            m.stop().await;
        }
        // As Docker removes the node's task containers when it leaves.
        let rt = self.cfg.runtime.clone();
        let _ = tokio::task::spawn_blocking(move || remove_tasks(&*rt)).await;
        *self.locked.write().await = None;
        LocalState::remove(&self.cfg.data_dir).map_err(ApiError::internal)?;
        let _ = std::fs::remove_file(self.cfg.data_dir.join("raft.redb"));
        let _ = std::fs::remove_file(self.cfg.data_dir.join(mesh_manager::datakey::KEY_FILE));
        info!("left the swarm");
        Ok(())
    }
}

/// Removes every task of this node, running or ended (killed, then its state, logs and
/// writable layer): the tasks of a swarm the node left. Blocking.
fn remove_tasks(rt: &dyn Runtime) {
    for (id, _) in rt.list() {
        if let Err(e) = rt.stop(&id, libc::SIGKILL, Duration::ZERO) {
            warn!(task = id, "stopping a task of the swarm left: {e}");
        }
        match rt.remove(&id) {
            Ok(()) => info!(task = id, "removed a task of the swarm left"),
            Err(e) => warn!(task = id, "removing a task of the swarm left: {e}"),
        }
    }
}

async fn bind(addr: &str) -> Result<tokio::net::TcpListener, ApiError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        ApiError::new(
            ErrorKind::Unavailable,
            format!("cannot listen on {addr}: {e}"),
        )
    })
}

/// A service's create or update answer with the daemon's warning (an image not pinned).
fn with_warning(v: serde_json::Value, warning: Option<String>) -> Response {
    let Some(w) = warning else { return Ok(v) };
    let mut a: IdAnswer = mesh_api::answers::from_value(v)?;
    a.warnings.push(w);
    to_response(&a)
}
