//! One handler per Engine API endpoint. Reads come from one `Request::Objects` snapshot of
//! the leader's store (scoped to one service when the question is about one; filtered and
//! shaped here); writes are the local API's requests, so
//! the `docker` CLI and the `mesh` CLI change the same objects through the same checks.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode};
use mesh_api::{
    Availability, ClusterObjects, IdAnswer, LocalInfo, NetworkSpec, NodeRole, Request, Service,
    SwarmInitAnswer, Task, TaskState, UnlockKeyAnswer,
};
use serde_json::{json, Value};

use crate::convert::{self, rfc3339};
use crate::server::{Call, EngineError, Reply};
use crate::Backend;

type Result<T> = std::result::Result<T, EngineError>;

async fn call(b: &dyn Backend, req: Request) -> Result<Value> {
    b.call(req).await.map_err(EngineError::from)
}

/// As [`call`], the answer read as the type it is (`mesh_api::answers`).
async fn call_as<T: serde::de::DeserializeOwned>(b: &dyn Backend, req: Request) -> Result<T> {
    Ok(mesh_api::answers::from_value(call(b, req).await?)?)
}

async fn objects(b: &dyn Backend) -> Result<ClusterObjects> {
    objects_of(b, None).await
}

/// The objects, or (with `service`) one service's and its tasks only: what a question about
/// one service needs, at a cost that does not grow with the other services.
async fn objects_of(b: &dyn Backend, service: Option<&str>) -> Result<ClusterObjects> {
    let v = call(
        b,
        Request::Objects {
            service: service.map(str::to_string),
        },
    )
    .await?;
    serde_json::from_value(v).map_err(|e| {
        EngineError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read the cluster's objects: {e}"),
        )
    })
}

async fn local_info(b: &dyn Backend) -> Result<LocalInfo> {
    let v = call(b, Request::Info).await?;
    serde_json::from_value(v)
        .map_err(|e| EngineError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("bad info: {e}")))
}

/// Dispatches a call to its handler; unknown endpoints are 404 "page not found", as dockerd.
pub async fn route(backend: &Arc<dyn Backend>, c: &Call) -> Result<Reply> {
    let b = backend.as_ref();
    let segs: Vec<&str> = c.segments.iter().map(String::as_str).collect();
    let get = c.method == Method::GET || c.method == Method::HEAD;
    let post = c.method == Method::POST;
    let delete = c.method == Method::DELETE;
    match segs.as_slice() {
        ["_ping"] if get => ping(b).await,
        ["version"] if get => version().await,
        ["info"] if get => info(b).await,
        ["swarm"] if get => swarm_inspect(b).await,
        ["swarm", "init"] if post => swarm_init(b, c).await,
        ["swarm", "join"] if post => swarm_join(b, c).await,
        ["swarm", "leave"] if post => {
            call(
                b,
                Request::SwarmLeave {
                    force: c.query.flag("force"),
                },
            )
            .await?;
            Ok(Reply::Empty(StatusCode::OK))
        }
        ["swarm", "update"] if post => swarm_update(b, c).await,
        ["swarm", "unlockkey"] if get => {
            let a: UnlockKeyAnswer = call_as(b, Request::UnlockKey { rotate: false }).await?;
            Ok(Reply::ok(json!({"UnlockKey": a.key.unwrap_or_default()})))
        }
        ["swarm", "unlock"] if post => {
            let v = c.json()?;
            let key = str_field(&v, "UnlockKey").unwrap_or_default();
            call(b, Request::SwarmUnlock { key }).await?;
            Ok(Reply::Empty(StatusCode::OK))
        }
        ["nodes"] if get => node_ls(b, c).await,
        ["nodes", id] if get => {
            let o = objects(b).await?;
            let n = find_node(&o, id)?;
            Ok(Reply::ok(convert::node(n, false)))
        }
        ["nodes", id] if delete => {
            call(
                b,
                Request::NodeRm {
                    node: id.to_string(),
                    force: c.query.flag("force"),
                },
            )
            .await?;
            Ok(Reply::Empty(StatusCode::OK))
        }
        ["nodes", id, "update"] if post => node_update(b, c, id).await,
        ["services"] if get => service_ls(b, c).await,
        ["services", "create"] if post => service_create(b, c).await,
        ["services", id] if get => {
            let o = objects_of(b, Some(id)).await?;
            let s = find_service(&o, id)?;
            Ok(Reply::ok(convert::service_json(s, &o, false)))
        }
        ["services", id] if delete => {
            let o = objects_of(b, Some(id)).await?;
            let s = find_service(&o, id)?;
            call(
                b,
                Request::ServiceRm {
                    service: s.id.clone(),
                },
            )
            .await?;
            Ok(Reply::Empty(StatusCode::OK))
        }
        ["services", id, "update"] if post => service_update(b, c, id).await,
        ["services", id, "logs"] if get => service_logs(backend, c, id).await,
        ["tasks"] if get => task_ls(b, c).await,
        ["tasks", id] if get => {
            let o = objects(b).await?;
            let t = o
                .tasks
                .iter()
                .find(|t| t.id == *id)
                .or_else(|| unique(o.tasks.iter().filter(|t| t.id.starts_with(id))))
                .ok_or_else(|| EngineError::not_found(format!("task {id} not found")))?;
            Ok(Reply::ok(convert::task(t, &o)))
        }
        ["networks"] if get => network_ls(b, c).await,
        ["networks", "create"] if post => network_create(b, c).await,
        ["networks", id] if get => {
            let o = objects(b).await?;
            let n = find_network(&o, id)?;
            Ok(Reply::ok(convert::network_json(n)))
        }
        ["networks", id] if delete => {
            let o = objects(b).await?;
            let n = find_network(&o, id)?;
            call(
                b,
                Request::NetworkRm {
                    network: n.id.clone(),
                },
            )
            .await?;
            Ok(Reply::Empty(StatusCode::NO_CONTENT))
        }
        ["events"] if get => events(backend, c).await,
        ["containers", "json"] if get => container_ls(b, c).await,
        ["containers", id, "json"] if get => {
            let tasks = local_tasks(b).await?;
            let t = find_container(&tasks, id)?;
            Ok(Reply::ok(crate::containers::container_inspect(t)))
        }
        ["distribution", name @ .., "json"] if get && !name.is_empty() => {
            distribution(b, &name.join("/")).await
        }
        ["secrets", rest @ ..] => crate::blobs::route(b, c, mesh_api::BlobKind::Secret, rest).await,
        ["configs", rest @ ..] => crate::blobs::route(b, c, mesh_api::BlobKind::Config, rest).await,
        _ => Err(EngineError::not_found("page not found")),
    }
}

/// The digest a tag names on its registry, so the CLI pins services as it does with dockerd.
async fn distribution(b: &dyn Backend, reference: &str) -> Result<Reply> {
    let r = call(
        b,
        Request::ImageResolve {
            reference: reference.to_string(),
        },
    )
    .await
    .map_err(|e| match e.status {
        StatusCode::SERVICE_UNAVAILABLE => {
            EngineError::new(StatusCode::INTERNAL_SERVER_ERROR, e.message)
        }
        _ => e,
    })?;
    let digest = r["digest"]
        .as_str()
        .ok_or_else(|| EngineError::not_found(format!("{reference}: no digest")))?;
    Ok(Reply::ok(json!({
        "Descriptor": {
            "MediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "Digest": digest,
            "Size": 0,
        },
        // The image's platforms are not checked by mesh's scheduler: none are claimed.
        "Platforms": [],
    })))
}

/// `docker events`: the cluster's changes, the kept ones since `since` first (see
/// [`crate::events`]).
async fn events(backend: &Arc<dyn Backend>, c: &Call) -> Result<Reply> {
    let f = c.query.filters().map_err(EngineError::bad)?;
    f.only(mesh_api::events::FILTER_KEYS)
        .map_err(EngineError::bad)?;
    let time = |k: &str| -> Result<Option<u64>> {
        c.query
            .get(k)
            .filter(|v| !v.is_empty())
            .map(|v| {
                mesh_api::logs::parse_since(v, mesh_api::human::now_ns()).map_err(EngineError::bad)
            })
            .transpose()
    };
    let since = time("since")?;
    let until = time("until")?;
    let v = call(
        backend.as_ref(),
        Request::Events {
            after: None,
            since_ns: since,
        },
    )
    .await?;
    let first = serde_json::from_value(v).map_err(|e| {
        EngineError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("bad event list: {e}"),
        )
    })?;
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    crate::events::stream(backend.clone(), first, f, until, tx);
    Ok(Reply::Stream("application/json", rx))
}

async fn local_tasks(b: &dyn Backend) -> Result<Vec<mesh_api::LocalTask>> {
    let v = call(b, Request::LocalTasks).await?;
    serde_json::from_value(v).map_err(|e| {
        EngineError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("bad task list: {e}"),
        )
    })
}

fn find_container<'a>(
    tasks: &'a [mesh_api::LocalTask],
    key: &str,
) -> Result<&'a mesh_api::LocalTask> {
    let key = key.strip_prefix('/').unwrap_or(key);
    tasks
        .iter()
        .find(|t| t.task.id == key || t.task.name() == key)
        .or_else(|| {
            unique(
                tasks
                    .iter()
                    .filter(|t| !key.is_empty() && t.task.id.starts_with(key)),
            )
        })
        .ok_or_else(|| EngineError::not_found(format!("No such container: {key}")))
}

/// `docker ps [-a] [--filter]`: this node's tasks as containers, with Swarm's labels.
async fn container_ls(b: &dyn Backend, c: &Call) -> Result<Reply> {
    let f = c.query.filters().map_err(EngineError::bad)?;
    f.only(&["id", "name", "label", "status"])
        .map_err(EngineError::bad)?;
    let all = c.query.flag("all");
    let tasks = local_tasks(b).await?;
    let out: Vec<Value> = tasks
        .iter()
        .filter(|t| all || t.running)
        .filter(|t| {
            let labels = crate::containers::container_labels(t);
            f.any("id", |v| t.task.id.starts_with(v))
                && f.any("name", |v| t.task.name().contains(v))
                && f.any("status", |v| {
                    v == if t.running { "running" } else { "exited" }
                })
                && f.labels("label", &labels)
        })
        .map(crate::containers::container_summary)
        .collect();
    Ok(Reply::ok(out))
}

fn unique<'a, T>(mut it: impl Iterator<Item = &'a T>) -> Option<&'a T> {
    let first = it.next()?;
    it.next().is_none().then_some(first)
}

fn find_node<'a>(o: &'a ClusterObjects, key: &str) -> Result<&'a mesh_api::NodeView> {
    o.nodes
        .iter()
        .find(|n| n.node.id == key)
        .or_else(|| unique(o.nodes.iter().filter(|n| n.node.hostname == key)))
        .or_else(|| unique(o.nodes.iter().filter(|n| n.node.id.starts_with(key))))
        .ok_or_else(|| EngineError::not_found(format!("node {key} not found")))
}

fn find_service<'a>(o: &'a ClusterObjects, key: &str) -> Result<&'a Service> {
    o.services
        .iter()
        .find(|s| s.id == key)
        .or_else(|| o.services.iter().find(|s| s.spec.name == key))
        .or_else(|| unique(o.services.iter().filter(|s| s.id.starts_with(key))))
        .ok_or_else(|| EngineError::not_found(format!("service {key} not found")))
}

fn find_network<'a>(o: &'a ClusterObjects, key: &str) -> Result<&'a mesh_api::Network> {
    o.networks
        .iter()
        .find(|n| n.id == key)
        .or_else(|| o.networks.iter().find(|n| n.spec.name == key))
        .or_else(|| unique(o.networks.iter().filter(|n| n.id.starts_with(key))))
        .ok_or_else(|| EngineError::not_found(format!("network {key} not found")))
}

fn swarm_state(i: &LocalInfo) -> &'static str {
    match (i.swarm.as_str(), i.role) {
        ("active", Some(NodeRole::Manager)) => "active/manager",
        ("active", _) => "active/worker",
        ("locked", _) => "locked",
        ("pending", _) => "pending",
        ("error", _) => "error",
        _ => "inactive",
    }
}

async fn ping(b: &dyn Backend) -> Result<Reply> {
    let i = local_info(b).await?;
    Ok(Reply::Ping(swarm_state(&i)))
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

async fn version() -> Result<Reply> {
    let details = HashMap::from([
        ("ApiVersion".to_string(), crate::API_VERSION.to_string()),
        (
            "MinAPIVersion".to_string(),
            crate::MIN_API_VERSION.to_string(),
        ),
        ("Os".to_string(), "linux".to_string()),
        ("Arch".to_string(), convert::docker_arch().to_string()),
        ("KernelVersion".to_string(), kernel()),
        ("GitCommit".to_string(), String::new()),
        ("GoVersion".to_string(), "none (Rust)".to_string()),
        ("BuildTime".to_string(), String::new()),
        ("Experimental".to_string(), "false".to_string()),
    ]);
    Ok(Reply::ok(bollard_stubs::models::SystemVersion {
        platform: Some(bollard_stubs::models::SystemVersionPlatform {
            name: "mesh".into(),
        }),
        components: Some(vec![bollard_stubs::models::SystemVersionComponents {
            name: "Engine".into(),
            version: convert::ENGINE_VERSION.into(),
            details: Some(details),
        }]),
        version: Some(convert::ENGINE_VERSION.into()),
        api_version: Some(crate::API_VERSION.into()),
        min_api_version: Some(crate::MIN_API_VERSION.into()),
        git_commit: Some(String::new()),
        go_version: Some("none (Rust)".into()),
        os: Some("linux".into()),
        arch: Some(convert::docker_arch().into()),
        kernel_version: Some(kernel()),
        experimental: Some(false),
        build_time: Some(String::new()),
    }))
}

/// The cluster settings mesh runs with, in `SwarmSpec`'s shape. `swarm update` changes the
/// task history limit, the certificate expiry, the dispatcher heartbeat and autolock, and
/// refuses changes to the others.
fn swarm_spec(c: &mesh_api::ClusterView) -> Value {
    json!({
        "Name": "default",
        "Labels": {},
        "Orchestration": {"TaskHistoryRetentionLimit": c.settings.task_history_limit},
        "Raft": {"SnapshotInterval": 10000, "KeepOldSnapshots": 0, "LogEntriesForSlowFollowers": 500, "ElectionTick": 10, "HeartbeatTick": 1},
        "Dispatcher": {"HeartbeatPeriod": c.settings.dispatcher_heartbeat_ms * 1_000_000},
        "CAConfig": {
            "NodeCertExpiry": c.settings.cert_expiry_secs * 1_000_000_000,
            "ForceRotate": c.settings.force_rotate,
        },
        "TaskDefaults": {},
        "EncryptionConfig": {"AutoLockManagers": c.autolock},
    })
}

fn cluster_json(o: &ClusterObjects) -> Value {
    json!({
        "ID": o.cluster.id,
        "Version": {"Index": o.cluster.created_at.max(1)},
        "CreatedAt": rfc3339(o.cluster.created_at),
        "UpdatedAt": rfc3339(o.cluster.created_at),
        "Spec": swarm_spec(&o.cluster),
        "TLSInfo": convert::tls_info(&o.cluster.tls_info),
        "RootRotationInProgress": o.cluster.root_rotation_in_progress,
        "DataPathPort": 4789,
        "DefaultAddrPool": ["10.0.0.0/8"],
        "SubnetSize": 24,
    })
}

async fn swarm_inspect(b: &dyn Backend) -> Result<Reply> {
    let o = objects(b).await?;
    let mut v = cluster_json(&o);
    v["JoinTokens"] = json!({"Worker": o.cluster.worker_token, "Manager": o.cluster.manager_token});
    Ok(Reply::ok(v))
}

async fn info(b: &dyn Backend) -> Result<Reply> {
    let i = local_info(b).await?;
    let manager = i.swarm == "active" && i.role == Some(NodeRole::Manager);
    // A manager answers from the cluster's objects; a worker (or a manager without a
    // leader) from what it knows locally.
    let o = if manager { objects(b).await.ok() } else { None };
    let local_tasks: Vec<&Task> = o
        .as_ref()
        .map(|o| {
            o.tasks
                .iter()
                .filter(|t| Some(&t.node_id) == i.node_id.as_ref())
                .collect()
        })
        .unwrap_or_default();
    let running = local_tasks
        .iter()
        .filter(|t| t.status.state == TaskState::Running)
        .count();
    let remote: Vec<Value> = match &o {
        Some(o) => o
            .nodes
            .iter()
            .filter(|n| n.node.role == NodeRole::Manager)
            .map(|n| json!({"NodeID": n.node.id, "Addr": n.node.addr}))
            .collect(),
        None => i
            .managers
            .iter()
            .map(|a| json!({"NodeID": "", "Addr": a}))
            .collect(),
    };
    let local_state = match i.swarm.as_str() {
        "active" | "locked" | "pending" | "error" => i.swarm.clone(),
        _ => "inactive".into(),
    };
    let mut swarm = json!({
        "NodeID": i.node_id.clone().unwrap_or_default(),
        "NodeAddr": i.node_addr.as_deref().map(|a| a.split(':').next().unwrap_or("")).unwrap_or(""),
        "LocalNodeState": local_state,
        "ControlAvailable": manager,
        "Error": "",
        "RemoteManagers": if i.swarm == "active" { json!(remote) } else { Value::Null },
    });
    if let Some(o) = &o {
        swarm["Nodes"] = json!(o.nodes.len());
        swarm["Managers"] = json!(o
            .nodes
            .iter()
            .filter(|n| n.node.role == NodeRole::Manager)
            .count());
        swarm["Cluster"] = cluster_json(o);
    }
    Ok(Reply::ok(json!({
        "ID": i.node_id.clone().unwrap_or_else(|| i.node_name.clone()),
        "Containers": local_tasks.len(),
        "ContainersRunning": running,
        "ContainersPaused": 0,
        "ContainersStopped": local_tasks.len() - running,
        "Images": 0,
        "Driver": "overlay",
        "DriverStatus": [],
        "Plugins": {"Volume": ["local"], "Network": ["overlay"], "Authorization": null, "Log": []},
        "MemoryLimit": true,
        "SwapLimit": true,
        "CpuCfsPeriod": true,
        "CpuCfsQuota": true,
        "CPUShares": true,
        "CPUSet": true,
        "PidsLimit": true,
        "OomKillDisable": true,
        "IPv4Forwarding": true,
        "BridgeNfIptables": true,
        "BridgeNfIp6tables": true,
        "Debug": false,
        "NFd": 0,
        "NGoroutines": 0,
        "SystemTime": rfc3339(now_secs()),
        "LoggingDriver": "mesh",
        "CgroupDriver": "cgroupfs",
        "CgroupVersion": "2",
        "NEventsListener": 0,
        "KernelVersion": kernel(),
        "OperatingSystem": "mesh",
        "OSVersion": "",
        "OSType": "linux",
        "Architecture": std::env::consts::ARCH,
        "NCPU": i.resources.nano_cpus / 1_000_000_000,
        "MemTotal": i.resources.memory_bytes,
        "IndexServerAddress": "https://index.docker.io/v1/",
        "RegistryConfig": {"AllowNondistributableArtifactsCIDRs": [], "AllowNondistributableArtifactsHostnames": [], "IndexConfigs": {}, "InsecureRegistryCIDRs": [], "Mirrors": []},
        "GenericResources": null,
        "DockerRootDir": "",
        "HttpProxy": "",
        "HttpsProxy": "",
        "NoProxy": "",
        "KernelMemory": false,
        "KernelMemoryTCP": false,
        "ContainerdCommit": {"ID": "", "Expected": ""},
        "RuncCommit": {"ID": "", "Expected": ""},
        "InitCommit": {"ID": "", "Expected": ""},
        "Name": i.node_name,
        "Labels": [],
        "ExperimentalBuild": false,
        "ServerVersion": convert::ENGINE_VERSION,
        "Runtimes": {"mesh": {"path": "meshd"}},
        "DefaultRuntime": "mesh",
        "Swarm": swarm,
        "LiveRestoreEnabled": true,
        "Isolation": "",
        "InitBinary": "",
        "SecurityOptions": [],
        "Warnings": null,
    })))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn str_field(v: &Value, k: &str) -> Option<String> {
    v.get(k)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

async fn swarm_init(b: &dyn Backend, c: &Call) -> Result<Reply> {
    let v = c.json()?;
    let autolock = v
        .pointer("/Spec/EncryptionConfig/AutoLockManagers")
        .and_then(Value::as_bool)
        == Some(true)
        || v.get("AutoLockManagers").and_then(Value::as_bool) == Some(true);
    let r: SwarmInitAnswer = call_as(
        b,
        Request::SwarmInit {
            advertise_addr: str_field(&v, "AdvertiseAddr"),
            listen_addr: str_field(&v, "ListenAddr"),
            autolock,
            force_new_cluster: v.get("ForceNewCluster").and_then(Value::as_bool) == Some(true),
        },
    )
    .await?;
    Ok(Reply::ok(json!(r.node_id)))
}

async fn swarm_join(b: &dyn Backend, c: &Call) -> Result<Reply> {
    let v = c.json()?;
    let remote = v
        .get("RemoteAddrs")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str)
        .ok_or_else(|| EngineError::bad("at least 1 RemoteAddr is required to join"))?
        .to_string();
    let token =
        str_field(&v, "JoinToken").ok_or_else(|| EngineError::bad("invalid join token: empty"))?;
    call(
        b,
        Request::SwarmJoin {
            token,
            remote,
            advertise_addr: str_field(&v, "AdvertiseAddr"),
            listen_addr: str_field(&v, "ListenAddr"),
        },
    )
    .await?;
    Ok(Reply::Empty(StatusCode::OK))
}

async fn swarm_update(b: &dyn Backend, c: &Call) -> Result<Reply> {
    let v = c.json()?;
    // A management call even when nothing changes: a worker answers "not a manager".
    let o = objects(b).await?;
    // The settings mesh keeps are taken from the spec; a change to any other is refused.
    let u64_at = |p: &str| v.pointer(p).and_then(Value::as_u64);
    let autolock = v
        .pointer("/EncryptionConfig/AutoLockManagers")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let history = u64_at("/Orchestration/TaskHistoryRetentionLimit");
    let expiry_ns = u64_at("/CAConfig/NodeCertExpiry").filter(|n| *n > 0);
    let heartbeat_ns = u64_at("/Dispatcher/HeartbeatPeriod").filter(|n| *n > 0);
    // `swarm ca --rotate` sends the counter one higher.
    let force_rotate = u64_at("/CAConfig/ForceRotate");
    let rotate = force_rotate.is_some_and(|n| n > o.cluster.settings.force_rotate);
    let mut kept = swarm_spec(&o.cluster);
    kept["EncryptionConfig"]["AutoLockManagers"] = json!(autolock);
    if let Some(n) = force_rotate {
        kept["CAConfig"]["ForceRotate"] = json!(n);
    }
    for (p, val) in [
        ("/Orchestration/TaskHistoryRetentionLimit", history),
        ("/CAConfig/NodeCertExpiry", expiry_ns),
        ("/Dispatcher/HeartbeatPeriod", heartbeat_ns),
    ] {
        if let (Some(slot), Some(val)) = (kept.pointer_mut(p), val) {
            *slot = json!(val);
        }
    }
    if let Some(path) = crate::spec::unkept_path(&v, &kept) {
        return Err(EngineError::bad(format!(
            "invalid swarm spec: changing {path} is not supported by mesh (yet)"
        )));
    }
    let s = &o.cluster.settings;
    let changed = |new: Option<u64>, old: u64| new.filter(|n| *n != old);
    call(
        b,
        Request::SwarmUpdate {
            autolock: (autolock != o.cluster.autolock).then_some(autolock),
            task_history_limit: changed(history, s.task_history_limit.into())
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
            cert_expiry_secs: changed(expiry_ns.map(|n| n / 1_000_000_000), s.cert_expiry_secs),
            dispatcher_heartbeat_ms: changed(
                heartbeat_ns.map(|n| (n / 1_000_000).max(1)),
                s.dispatcher_heartbeat_ms,
            ),
        },
    )
    .await?;
    if c.query.flag("rotateManagerUnlockKey") {
        call(b, Request::UnlockKey { rotate: true }).await?;
    }
    if rotate {
        call(b, Request::SwarmCa { rotate: true }).await?;
    }
    for (flag, role) in [
        ("rotateWorkerToken", NodeRole::Worker),
        ("rotateManagerToken", NodeRole::Manager),
    ] {
        if c.query.flag(flag) {
            call(b, Request::JoinToken { role, rotate: true }).await?;
        }
    }
    Ok(Reply::Empty(StatusCode::OK))
}

async fn node_ls(b: &dyn Backend, c: &Call) -> Result<Reply> {
    let f = c.query.filters().map_err(EngineError::bad)?;
    f.check_nodes().map_err(EngineError::bad)?;
    let o = objects(b).await?;
    let out: Vec<_> = o
        .nodes
        .iter()
        .filter(|n| mesh_api::filter::node(&f, &n.node))
        .map(|n| convert::node(n, false))
        .collect();
    Ok(Reply::ok(out))
}

async fn node_update(b: &dyn Backend, c: &Call, key: &str) -> Result<Reply> {
    let v = c.json()?;
    let spec: bollard_stubs::models::NodeSpec =
        serde_json::from_value(v).map_err(|e| EngineError::bad(format!("invalid JSON: {e}")))?;
    let o = objects(b).await?;
    let n = find_node(&o, key)?.node.clone();
    if let Some(name) = spec.name.as_deref().filter(|s| !s.is_empty()) {
        if name != n.hostname {
            return Err(EngineError::bad(
                "invalid node spec: Name is not supported by mesh (nodes are named by --node-name)",
            ));
        }
    }
    let want_role = match spec.role {
        Some(bollard_stubs::models::NodeSpecRoleEnum::MANAGER) => Some(NodeRole::Manager),
        Some(bollard_stubs::models::NodeSpecRoleEnum::WORKER) => Some(NodeRole::Worker),
        _ => None,
    };
    let availability = match spec.availability {
        Some(bollard_stubs::models::NodeSpecAvailabilityEnum::ACTIVE) => Some(Availability::Active),
        Some(bollard_stubs::models::NodeSpecAvailabilityEnum::PAUSE) => Some(Availability::Pause),
        Some(bollard_stubs::models::NodeSpecAvailabilityEnum::DRAIN) => Some(Availability::Drain),
        _ => None,
    }
    .filter(|a| *a != n.availability);
    let labels: BTreeMap<String, String> = spec.labels.unwrap_or_default().into_iter().collect();
    let label_add: BTreeMap<String, String> = labels
        .iter()
        .filter(|(k, v)| n.labels.get(*k) != Some(v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let label_rm: Vec<String> = n
        .labels
        .keys()
        .filter(|k| !labels.contains_key(*k))
        .cloned()
        .collect();
    if availability.is_some() || !label_add.is_empty() || !label_rm.is_empty() {
        call(
            b,
            Request::NodeUpdate {
                node: n.id.clone(),
                availability,
                label_add,
                label_rm,
            },
        )
        .await?;
    }
    match want_role {
        Some(NodeRole::Manager) if n.role == NodeRole::Worker => {
            call(b, Request::NodePromote { node: n.id.clone() }).await?;
        }
        Some(NodeRole::Worker) if n.role == NodeRole::Manager => {
            call(b, Request::NodeDemote { node: n.id.clone() }).await?;
        }
        _ => {}
    }
    Ok(Reply::Empty(StatusCode::OK))
}

async fn service_ls(b: &dyn Backend, c: &Call) -> Result<Reply> {
    let f = c.query.filters().map_err(EngineError::bad)?;
    f.check_services().map_err(EngineError::bad)?;
    let status = c.query.flag("status");
    let o = objects(b).await?;
    let out: Vec<Value> = o
        .services
        .iter()
        .filter(|s| mesh_api::filter::service(&f, s))
        .map(|s| convert::service_json(s, &o, status))
        .collect();
    Ok(Reply::ok(out))
}

fn warnings(a: &IdAnswer) -> Value {
    if a.warnings.is_empty() {
        return Value::Null;
    }
    a.warnings.iter().map(|w| json!(w.trim_end())).collect()
}

async fn service_create(b: &dyn Backend, c: &Call) -> Result<Reply> {
    let v = c.json()?;
    let o = objects(b).await?;
    let spec = crate::spec::from_engine(&v, &o)?;
    let registry_auth = registry_auth(c)?;
    let r: IdAnswer = call_as(
        b,
        Request::ServiceCreate {
            spec,
            registry_auth,
        },
    )
    .await?;
    Ok(Reply::created(
        json!({"ID": r.id, "Warnings": warnings(&r)}),
    ))
}

async fn service_update(b: &dyn Backend, c: &Call, key: &str) -> Result<Reply> {
    let version = c
        .query
        .u64("version")
        .map_err(EngineError::bad)?
        .ok_or_else(|| EngineError::bad("invalid service version '': a version is required"))?;
    let rollback = match c.query.get("rollback") {
        None | Some("") => false,
        Some("previous") => true,
        Some(other) => {
            return Err(EngineError::bad(format!(
                "unrecognized rollback option {other}"
            )))
        }
    };
    let v = c.json()?;
    let o = objects_of(b, Some(key)).await?;
    let svc = find_service(&o, key)?;
    let spec = if rollback {
        svc.spec.clone()
    } else {
        crate::spec::from_engine(&v, &o)?
    };
    let r: IdAnswer = call_as(
        b,
        Request::ServiceReplace {
            service: svc.id.clone(),
            version,
            spec,
            rollback,
            registry_auth: registry_auth(c)?,
        },
    )
    .await?;
    Ok(Reply::ok(json!({"Warnings": warnings(&r)})))
}

/// The `X-Registry-Auth` header (base64url of Docker's `AuthConfig` JSON) as credentials:
/// `username` and `password`, or `auth` (`base64(user:password)`); none when it names no
/// user (the CLI sends `{}` without `--with-registry-auth`).
fn registry_auth(c: &Call) -> Result<Option<mesh_api::RegistryAuth>> {
    match c.registry_auth.as_deref().filter(|h| !h.is_empty()) {
        Some(h) => parse_registry_auth(h),
        None => Ok(None),
    }
}

fn parse_registry_auth(h: &str) -> Result<Option<mesh_api::RegistryAuth>> {
    use base64::Engine as _;
    let bad = |why: &str| EngineError::bad(format!("invalid X-Registry-Auth header: {why}"));
    let engines = [
        base64::engine::general_purpose::URL_SAFE,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
        base64::engine::general_purpose::STANDARD,
    ];
    let raw = engines
        .iter()
        .find_map(|e| e.decode(h.trim()).ok())
        .ok_or_else(|| bad("not base64"))?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad("not JSON"))?;
    let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default();
    let (mut username, mut password) =
        (field("username").to_string(), field("password").to_string());
    if username.is_empty() && !field("auth").is_empty() {
        let pair = base64::engine::general_purpose::STANDARD
            .decode(field("auth"))
            .map_err(|_| bad("auth is not base64"))?;
        let pair = String::from_utf8(pair).map_err(|_| bad("auth is not text"))?;
        let (u, p) = pair
            .split_once(':')
            .ok_or_else(|| bad("auth is not user:password"))?;
        (username, password) = (u.to_string(), p.to_string());
    }
    if !field("identitytoken").is_empty() || !field("registrytoken").is_empty() {
        return Err(bad(
            "identity and registry tokens are not supported by mesh",
        ));
    }
    if username.is_empty() {
        return Ok(None);
    }
    let creds = mesh_api::RegistryCredentials { username, password };
    Ok(Some(mesh_api::RegistryAuth::Credentials(creds)))
}

/// The log lines of a service's tasks (see [`Request::ServiceLogs`]).
async fn fetch_logs(
    b: &dyn Backend,
    service_id: &str,
    since_ns: Option<u64>,
    after: &BTreeMap<String, u64>,
) -> Result<mesh_api::ServiceLogs> {
    let r = call(
        b,
        Request::ServiceLogs {
            service: service_id.to_string(),
            since_ns,
            tail: None,
            after: after.clone(),
        },
    )
    .await?;
    serde_json::from_value(r).map_err(|e| {
        EngineError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("service logs: {e}"),
        )
    })
}

/// How often `--follow` reads the logs again.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// One line in the multiplexed stream format (stream 1 stdout, 2 stderr): `[TIME ][DETAILS ]TEXT`,
/// TIME as Docker's fixed-width RFC 3339 with nanoseconds.
fn log_frame(l: &mesh_api::ServiceLogLine, timestamps: bool, details: bool) -> Bytes {
    let mut payload = String::new();
    if timestamps {
        payload.push_str(&mesh_api::human::rfc3339_ns(l.line.time_ns));
        payload.push(' ');
    }
    if details {
        payload.push_str(&format!(
            "com.docker.swarm.node.id={},com.docker.swarm.service.id={},com.docker.swarm.task.id={} ",
            l.node_id, l.service_id, l.task_id
        ));
    }
    payload.push_str(&l.line.text);
    payload.push('\n');
    let stream = match l.line.stream {
        mesh_api::LogStream::Stdout => 1,
        mesh_api::LogStream::Stderr => 2,
    };
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.extend_from_slice(&[stream, 0, 0, 0]);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload.as_bytes());
    Bytes::from(frame)
}

/// `docker service logs [--follow] [--tail N] [--since T] [--timestamps] [--details]`: the
/// tasks' lines, by time, then (following) the lines they add, read again every
/// [`FOLLOW_EVERY`] from a cursor per task, new tasks included, until the client goes away
/// or the service is removed.
async fn service_logs(b: &Arc<dyn Backend>, c: &Call, key: &str) -> Result<Reply> {
    let o = objects_of(b.as_ref(), Some(key)).await?;
    let svc = find_service(&o, key)?.clone();
    let tail = match c.query.get("tail") {
        None | Some("") | Some("all") => None,
        // Docker: a negative number or a non-integer means all.
        Some(n) => n.parse::<usize>().ok(),
    };
    let since_ns = match c.query.get("since") {
        None | Some("") | Some("0") => None,
        Some(v) => Some(
            mesh_api::logs::parse_since(v, mesh_api::human::now_ns()).map_err(EngineError::bad)?,
        ),
    };
    let (mut want_out, mut want_err) = (c.query.flag("stdout"), c.query.flag("stderr"));
    if !want_out && !want_err {
        (want_out, want_err) = (true, true);
    }
    let details = c.query.flag("details");
    let timestamps = c.query.flag("timestamps");
    let follow = c.query.flag("follow");
    let first = fetch_logs(b.as_ref(), &svc.id, since_ns, &BTreeMap::new()).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let b = b.clone();
    tokio::spawn(async move {
        // Every task seen so far is read from its last line on (with `--tail`, the lines
        // not shown are not shown later either).
        let mut after: BTreeMap<String, u64> = BTreeMap::new();
        for l in &first.lines {
            after.insert(l.task_id.clone(), l.line.time_ns);
        }
        let mut batch = mesh_api::logs::tail_per_task(first.lines, tail);
        loop {
            for l in batch.drain(..) {
                after.insert(l.task_id.clone(), l.line.time_ns);
                let wanted = match l.line.stream {
                    mesh_api::LogStream::Stdout => want_out,
                    mesh_api::LogStream::Stderr => want_err,
                };
                if wanted && tx.send(log_frame(&l, timestamps, details)).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(FOLLOW_EVERY) => {}
                _ = tx.closed() => return,
            }
            match fetch_logs(b.as_ref(), &svc.id, since_ns, &after).await {
                Ok(l) => batch = l.lines,
                Err(e) if e.status == StatusCode::NOT_FOUND => return,
                Err(_) => continue,
            }
        }
    });
    Ok(Reply::Stream(
        "application/vnd.docker.multiplexed-stream",
        rx,
    ))
}

async fn task_ls(b: &dyn Backend, c: &Call) -> Result<Reply> {
    let f = c.query.filters().map_err(EngineError::bad)?;
    f.check_tasks().map_err(EngineError::bad)?;
    // One service asked for (the CLI's `service ps` and progress poll): only its objects.
    let one = f
        .values("service")
        .filter(|v| v.len() == 1)
        .and_then(|v| v.iter().next());
    let o = objects_of(b, one.map(String::as_str)).await?;
    let svc_of = |t: &Task| o.services.iter().find(|s| s.id == t.service_id);
    let out: Vec<Value> = o
        .tasks
        .iter()
        .filter(|t| {
            let host = o
                .nodes
                .iter()
                .find(|n| n.node.id == t.node_id)
                .map(|n| n.node.hostname.as_str());
            mesh_api::filter::task(&f, t, host, svc_of(t))
        })
        .map(|t| convert::task(t, &o))
        .collect();
    Ok(Reply::ok(out))
}

async fn network_ls(b: &dyn Backend, c: &Call) -> Result<Reply> {
    let f = c.query.filters().map_err(EngineError::bad)?;
    f.check_networks().map_err(EngineError::bad)?;
    let o = objects(b).await?;
    let out: Vec<_> = o
        .networks
        .iter()
        .filter(|n| mesh_api::filter::network(&f, n))
        .map(convert::network_list_json)
        .collect();
    Ok(Reply::ok(out))
}

async fn network_create(b: &dyn Backend, c: &Call) -> Result<Reply> {
    let v = c.json()?;
    let name = str_field(&v, "Name").ok_or_else(|| EngineError::bad("network name is required"))?;
    let driver = str_field(&v, "Driver").unwrap_or_else(|| "bridge".into());
    if driver != "overlay" {
        return Err(EngineError::bad(format!(
            "mesh creates overlay networks only (driver {driver:?} is not supported)"
        )));
    }
    for (k, what) in [
        ("Internal", "internal networks"),
        ("EnableIPv6", "IPv6"),
        ("Ingress", "another ingress network"),
        ("ConfigOnly", "config-only networks"),
    ] {
        if v.get(k).and_then(Value::as_bool) == Some(true) {
            return Err(EngineError::bad(format!(
                "invalid network spec: {k}: {what} are not supported by mesh (yet)"
            )));
        }
    }
    let encrypted = mesh_api::overlay_driver_options(
        v.get("Options")
            .and_then(Value::as_object)
            .into_iter()
            .flat_map(|o| o.keys().map(String::as_str)),
    )
    .map_err(|e| EngineError::bad(format!("invalid network spec: {e}")))?;
    let configs = v
        .pointer("/IPAM/Config")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if configs.len() > 1 {
        return Err(EngineError::bad(
            "invalid network spec: mesh networks have one subnet",
        ));
    }
    let subnet = configs.first().and_then(|c| str_field(c, "Subnet"));
    if let Some(k) = configs
        .first()
        .and_then(Value::as_object)
        .and_then(|c| {
            c.iter()
                .find(|(k, v)| *k != "Subnet" && !crate::spec::empty(v))
        })
        .map(|(k, _)| k.clone())
    {
        return Err(EngineError::bad(format!(
            "invalid network spec: IPAM.Config[0].{k} is not supported by mesh (yet)"
        )));
    }
    let labels: BTreeMap<String, String> = match v.get("Labels") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(l) => serde_json::from_value(l.clone())
            .map_err(|e| EngineError::bad(format!("invalid JSON: Labels: {e}")))?,
    };
    let attachable = v
        .get("Attachable")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let r: IdAnswer = call_as(
        b,
        Request::NetworkCreate {
            spec: NetworkSpec {
                name,
                driver,
                subnet,
                encrypted,
                attachable,
                ingress: false,
                labels,
            },
        },
    )
    .await?;
    Ok(Reply::created(json!({"Id": r.id, "Warning": ""})))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn header(json: &str) -> String {
        base64::engine::general_purpose::URL_SAFE.encode(json)
    }

    #[test]
    fn x_registry_auth_as_the_docker_cli_sends_it() {
        let creds = |u: &str, p: &str| {
            Some(mesh_api::RegistryAuth::Credentials(
                mesh_api::RegistryCredentials {
                    username: u.into(),
                    password: p.into(),
                },
            ))
        };
        let h = header(r#"{"username":"alice","password":"pw","serveraddress":"reg:5000"}"#);
        assert_eq!(parse_registry_auth(&h).unwrap(), creds("alice", "pw"));
        // `auth` is base64("user:password"), as config.json keeps it.
        let h = header(r#"{"auth":"Ym9iOnNlY3JldA=="}"#);
        assert_eq!(parse_registry_auth(&h).unwrap(), creds("bob", "secret"));
        // `{}`: no credentials.
        assert_eq!(parse_registry_auth(&header("{}")).unwrap(), None);
        assert!(parse_registry_auth("%%%").is_err());
        assert!(parse_registry_auth(&header(r#"{"identitytoken":"x"}"#)).is_err());
    }
}
