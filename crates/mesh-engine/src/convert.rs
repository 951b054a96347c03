//! mesh's objects in the Engine API's shapes (the `bollard-stubs` models). Values differ from
//! dockerd's, shapes must not: every field the `docker` CLI needs is set (ENGINE-API.md lists
//! them), times are RFC 3339 with nanoseconds, durations nanoseconds.

use std::collections::{BTreeMap, HashMap};

use bollard_stubs::models as m;
use mesh_api::{
    ClusterObjects, EndpointMode, MountType, Network, NodeRole, NodeState, NodeView, PublishMode,
    Service, ServiceMode, ServiceSpec, Task, TaskState,
};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

/// The engine version nodes report (`Description.Engine.EngineVersion`, `/version`).
pub const ENGINE_VERSION: &str = concat!("mesh-", env!("CARGO_PKG_VERSION"));

/// A value of a stubs enum from the string Docker uses for it.
pub fn enum_of<T: DeserializeOwned>(s: &str) -> Option<T> {
    serde_json::from_value(Value::String(s.to_string())).ok()
}

/// The string a mesh enum serializes to (`"stop-first"`, `"running"`).
pub fn wire<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

pub use mesh_api::human::{rfc3339, rfc3339_ms};

fn ns(ms: u64) -> i64 {
    (ms as i64).saturating_mul(1_000_000)
}

fn map(b: &BTreeMap<String, String>) -> HashMap<String, String> {
    b.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The architecture as Docker names it (`uname -m` says `x86_64`, Docker `amd64`).
pub fn docker_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// A network's ID from a name or ID as a spec holds it (the name itself when unknown).
pub fn network_id(objects: &ClusterObjects, key: &str) -> String {
    objects
        .networks
        .iter()
        .find(|n| n.id == key || n.spec.name == key)
        .map_or_else(|| key.to_string(), |n| n.id.clone())
}

/// Docker's `TLSInfo`.
pub fn tls_info(t: &mesh_api::TlsInfo) -> m::TlsInfo {
    let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
    m::TlsInfo {
        trust_root: some(&t.trust_root),
        cert_issuer_subject: some(&t.cert_issuer_subject),
        cert_issuer_public_key: some(&t.cert_issuer_public_key),
    }
}

pub fn node(n: &NodeView, leader_raft: bool) -> m::Node {
    let node = &n.node;
    let host = node.addr.split(':').next().unwrap_or("").to_string();
    m::Node {
        id: Some(node.id.clone()),
        version: Some(m::ObjectVersion {
            index: Some(node.updated_at.max(1)),
        }),
        created_at: Some(rfc3339(node.created_at)),
        updated_at: Some(rfc3339(node.updated_at)),
        spec: Some(m::NodeSpec {
            name: None,
            labels: Some(map(&node.labels)),
            role: enum_of(&node.role.to_string()),
            availability: enum_of(&wire(&node.availability)),
        }),
        description: Some(m::NodeDescription {
            hostname: Some(node.hostname.clone()),
            platform: Some(m::Platform {
                architecture: Some(std::env::consts::ARCH.to_string()),
                os: Some("linux".into()),
            }),
            resources: Some(m::ResourceObject {
                nano_cpus: Some(node.resources.nano_cpus as i64),
                memory_bytes: Some(node.resources.memory_bytes as i64),
                generic_resources: None,
            }),
            engine: Some(m::EngineDescription {
                engine_version: Some(ENGINE_VERSION.into()),
                labels: None,
                plugins: Some(vec![m::EngineDescriptionPlugins {
                    typ: Some("Network".into()),
                    name: Some("overlay".into()),
                }]),
            }),
            // dockerd always sends it; `{}` for a node the leader has not heard yet.
            tls_info: Some(
                n.tls_info
                    .as_ref()
                    .map_or_else(m::TlsInfo::default, tls_info),
            ),
        }),
        status: Some(m::NodeStatus {
            state: Some(match node.state {
                NodeState::Ready => m::NodeState::READY,
                NodeState::Down | NodeState::Left => m::NodeState::DOWN,
            }),
            message: None,
            addr: Some(host),
        }),
        // A manager outside the Raft membership (left behind by `--force-new-cluster`) has
        // no manager status, as swarmkit's.
        manager_status: (node.role == NodeRole::Manager && !n.manager_status.is_empty()).then(
            || m::ManagerStatus {
                leader: Some(leader_raft || n.manager_status == "Leader"),
                reachability: Some(if n.manager_status == "Unreachable" {
                    m::Reachability::UNREACHABLE
                } else {
                    m::Reachability::REACHABLE
                }),
                addr: Some(node.addr.clone()),
            },
        ),
    }
}

/// A mesh service spec in the Engine API's shape. Network targets are IDs, as dockerd
/// stores them.
pub fn service_spec(s: &ServiceSpec, objects: &ClusterObjects) -> m::ServiceSpec {
    let image = !s.image.is_empty();
    let (command, args) = if image {
        (s.entrypoint.clone(), s.command.clone())
    } else {
        (Vec::new(), s.command.clone())
    };
    let some_vec = |v: Vec<String>| (!v.is_empty()).then_some(v);
    let container = m::TaskSpecContainerSpec {
        image: Some(s.image.clone()),
        labels: (!s.container_labels.is_empty()).then(|| map(&s.container_labels)),
        command: some_vec(command),
        args: some_vec(args),
        hostname: (!s.hostname.is_empty()).then(|| s.hostname.clone()),
        env: some_vec(s.env.clone()),
        dir: (!s.workdir.is_empty()).then(|| s.workdir.clone()),
        user: (!s.user.is_empty()).then(|| s.user.clone()),
        read_only: s.read_only.then_some(true),
        mounts: (!s.mounts.is_empty()).then(|| {
            s.mounts
                .iter()
                .map(|mt| m::Mount {
                    target: Some(mt.target.clone()),
                    source: (!mt.source.is_empty()).then(|| mt.source.clone()),
                    typ: Some(match mt.kind {
                        MountType::Bind => m::MountType::BIND,
                        MountType::Volume => m::MountType::VOLUME,
                        MountType::Tmpfs => m::MountType::TMPFS,
                    }),
                    read_only: mt.readonly.then_some(true),
                    ..Default::default()
                })
                .collect()
        }),
        stop_signal: (!s.stop_signal.is_empty()).then(|| s.stop_signal.clone()),
        stop_grace_period: s.stop_grace_period_ms.map(ns),
        secrets: (!s.secrets.is_empty()).then(|| {
            s.secrets
                .iter()
                .map(|r| m::TaskSpecContainerSpecSecrets {
                    file: Some(m::TaskSpecContainerSpecFile {
                        name: Some(r.target.clone()),
                        uid: Some(r.uid.clone()),
                        gid: Some(r.gid.clone()),
                        mode: Some(r.mode),
                    }),
                    secret_id: Some(r.id.clone()),
                    secret_name: Some(r.source.clone()),
                })
                .collect()
        }),
        configs: (!s.configs.is_empty()).then(|| {
            s.configs
                .iter()
                .map(|r| m::TaskSpecContainerSpecConfigs {
                    file: Some(m::TaskSpecContainerSpecFile1 {
                        name: Some(r.target.clone()),
                        uid: Some(r.uid.clone()),
                        gid: Some(r.gid.clone()),
                        mode: Some(r.mode),
                    }),
                    runtime: None,
                    config_id: Some(r.id.clone()),
                    config_name: Some(r.source.clone()),
                })
                .collect()
        }),
        health_check: s.healthcheck.as_ref().map(|h| m::HealthConfig {
            test: (!h.test.is_empty()).then(|| h.test.clone()),
            interval: (h.interval_ms != 0).then(|| ns(h.interval_ms)),
            timeout: (h.timeout_ms != 0).then(|| ns(h.timeout_ms)),
            retries: (h.retries != 0).then_some(h.retries as i64),
            start_period: (h.start_period_ms != 0).then(|| ns(h.start_period_ms)),
            start_interval: None,
        }),
        // dockerd sends what the CLI stored: `Init`, `Isolation` and an empty `DNSConfig`
        // always (mesh has no DNS options and only the default isolation).
        init: Some(s.init),
        isolation: Some(m::TaskSpecContainerSpecIsolationEnum::DEFAULT),
        dns_config: Some(m::TaskSpecContainerSpecDnsConfig::default()),
        ..Default::default()
    };
    // `Resources{Limits, Reservations}` always, as dockerd stores the CLI's specs (mesh has
    // no reservations: `{}`).
    let limits = m::Limit {
        nano_cpus: (s.resources.nano_cpus != 0).then_some(s.resources.nano_cpus as i64),
        memory_bytes: (s.resources.memory_bytes != 0).then_some(s.resources.memory_bytes as i64),
        pids: None,
    };
    m::ServiceSpec {
        name: Some(s.name.clone()),
        labels: Some(map(&s.labels)),
        task_template: Some(m::TaskSpec {
            container_spec: Some(container),
            resources: Some(m::TaskSpecResources {
                limits: Some(limits),
                reservations: Some(m::ResourceObject::default()),
                ..Default::default()
            }),
            restart_policy: Some(m::TaskSpecRestartPolicy {
                condition: enum_of(&wire(&s.restart.condition)),
                delay: Some(ns(s.restart.delay_ms)),
                max_attempts: Some(s.restart.max_attempts as i64),
                window: None,
            }),
            placement: Some(m::TaskSpecPlacement {
                constraints: some_vec(s.constraints.clone()),
                platforms: (!s.platforms.is_empty()).then(|| {
                    s.platforms
                        .iter()
                        .map(|p| {
                            let (os, arch) = p.split_once('/').unwrap_or(("linux", p));
                            m::Platform {
                                architecture: Some(arch.to_string()),
                                os: Some(os.to_string()),
                            }
                        })
                        .collect()
                }),
                ..Default::default()
            }),
            force_update: Some(s.force_update),
            runtime: Some("container".into()),
            networks: (!s.networks.is_empty()).then(|| {
                s.networks
                    .iter()
                    .map(|n| m::NetworkAttachmentConfig {
                        target: Some(network_id(objects, n)),
                        aliases: s.aliases.get(n).filter(|a| !a.is_empty()).cloned(),
                        driver_opts: None,
                    })
                    .collect()
            }),
            ..Default::default()
        }),
        mode: Some(match s.mode {
            ServiceMode::Replicated { replicas } => m::ServiceSpecMode {
                replicated: Some(m::ServiceSpecModeReplicated {
                    replicas: Some(replicas as i64),
                }),
                ..Default::default()
            },
            ServiceMode::Global => m::ServiceSpecMode {
                global: Some(HashMap::new()),
                ..Default::default()
            },
        }),
        update_config: Some(m::ServiceSpecUpdateConfig {
            parallelism: Some(s.update.parallelism as i64),
            delay: Some(ns(s.update.delay_ms)),
            failure_action: enum_of(&wire(&s.update.failure_action)),
            monitor: Some(ns(s.update.monitor_ms)),
            max_failure_ratio: Some(0.0),
            order: enum_of(&wire(&s.update.order)),
        }),
        rollback_config: Some(m::ServiceSpecRollbackConfig {
            order: enum_of(&wire(&s.rollback.order)),
            ..Default::default()
        }),
        networks: None,
        endpoint_spec: Some(m::EndpointSpec {
            mode: Some(match s.endpoint_mode {
                EndpointMode::Vip => m::EndpointSpecModeEnum::VIP,
                EndpointMode::Dnsrr => m::EndpointSpecModeEnum::DNSRR,
            }),
            ports: (!s.ports.is_empty()).then(|| ports(s)),
        }),
    }
}

fn ports(s: &ServiceSpec) -> Vec<m::EndpointPortConfig> {
    s.ports
        .iter()
        .map(|p| m::EndpointPortConfig {
            name: None,
            protocol: enum_of(&wire(&p.protocol)),
            target_port: Some(i64::from(p.target)),
            published_port: Some(i64::from(p.published)),
            publish_mode: enum_of(&wire(&p.mode)),
        })
        .collect()
}

/// How many tasks run and are wanted (`ServiceStatus`), as `service ls` counts them.
pub fn service_status(svc: &Service, objects: &ClusterObjects) -> m::ServiceServiceStatus {
    let tasks = || objects.tasks.iter().filter(|t| t.service_id == svc.id);
    let running = tasks()
        .filter(|t| t.desired_state == TaskState::Running && t.status.state == TaskState::Running)
        .count() as u64;
    let desired = match svc.spec.mode {
        ServiceMode::Replicated { replicas } => replicas,
        ServiceMode::Global => tasks()
            .filter(|t| t.desired_state == TaskState::Running && !t.status.state.is_terminal())
            .count() as u64,
    };
    m::ServiceServiceStatus {
        running_tasks: Some(running),
        desired_tasks: Some(desired),
        completed_tasks: Some(0),
    }
}

pub fn service(svc: &Service, objects: &ClusterObjects, status: bool) -> m::Service {
    let spec = service_spec(&svc.spec, objects);
    m::Service {
        id: Some(svc.id.clone()),
        version: Some(m::ObjectVersion {
            index: Some(svc.version),
        }),
        created_at: Some(rfc3339(svc.created_at)),
        updated_at: Some(rfc3339(svc.updated_at)),
        endpoint: Some(m::ServiceEndpoint {
            spec: spec.endpoint_spec.clone(),
            ports: (!svc.spec.ports.is_empty()).then(|| ports(&svc.spec)),
            virtual_ips: (!svc.vips.is_empty()).then(|| {
                svc.vips
                    .iter()
                    .map(|v| m::ServiceEndpointVirtualIps {
                        network_id: Some(v.network_id.clone()),
                        addr: Some(v.addr.to_string()),
                    })
                    .collect()
            }),
        }),
        spec: Some(spec),
        update_status: svc.update_status.as_ref().map(|u| {
            let done = matches!(
                u.state,
                mesh_api::UpdateState::Completed | mesh_api::UpdateState::RollbackCompleted
            );
            m::ServiceUpdateStatus {
                state: enum_of(&wire(&u.state)),
                started_at: Some(rfc3339(u.started_at)),
                completed_at: done.then(|| rfc3339(svc.updated_at.max(u.started_at))),
                message: Some(u.message.clone()),
            }
        }),
        service_status: status.then(|| service_status(svc, objects)),
        job_status: None,
    }
}

/// The whole service document: the model plus `PreviousSpec` (absent from the stubs).
pub fn service_json(svc: &Service, objects: &ClusterObjects, status: bool) -> Value {
    let mut v = serde_json::to_value(service(svc, objects, status)).unwrap_or(Value::Null);
    if let Some(prev) = &svc.previous_spec {
        v["PreviousSpec"] = service_spec_json(prev, objects);
    }
    if let Some(spec) = v.get_mut("Spec") {
        healthcheck_key(spec);
    }
    v
}

/// [`service_spec`] as JSON, as dockerd writes it.
pub fn service_spec_json(s: &ServiceSpec, objects: &ClusterObjects) -> Value {
    let mut v = serde_json::to_value(service_spec(s, objects)).unwrap_or_default();
    healthcheck_key(&mut v);
    v
}

/// dockerd (Go's `swarm.ContainerSpec`) names a task's health check `Healthcheck`; the Engine
/// API's schema, and so the stubs, say `HealthCheck`: renamed in a service spec's JSON.
pub fn healthcheck_key(spec: &mut Value) {
    if let Some(Value::Object(c)) = spec.pointer_mut("/TaskTemplate/ContainerSpec") {
        if let Some(h) = c.remove("HealthCheck") {
            c.insert("Healthcheck".into(), h);
        }
    }
}

pub fn task(t: &Task, objects: &ClusterObjects) -> Value {
    let svc = objects.services.iter().find(|s| s.id == t.service_id);
    let mut spec = service_spec(&t.spec, objects)
        .task_template
        .unwrap_or_default();
    if let Some(c) = spec.container_spec.as_mut() {
        c.tty = Some(false);
    }
    let labels = svc.map(|s| map(&s.spec.labels)).unwrap_or_default();
    let model = m::Task {
        id: Some(t.id.clone()),
        version: Some(m::ObjectVersion {
            index: Some(t.status.timestamp_ms.max(1)),
        }),
        created_at: Some(rfc3339(t.created_at)),
        updated_at: Some(rfc3339_ms(t.status.timestamp_ms)),
        name: None,
        labels: Some(HashMap::new()),
        spec: Some(spec),
        service_id: Some(t.service_id.clone()),
        slot: (t.slot > 0).then_some(t.slot as i64),
        node_id: (!t.node_id.is_empty()).then(|| t.node_id.clone()),
        assigned_generic_resources: None,
        status: Some(m::TaskStatus {
            timestamp: Some(rfc3339_ms(t.status.timestamp_ms)),
            state: enum_of(&wire(&t.status.state)),
            message: Some(t.status.message.clone()),
            err: (!t.status.err.is_empty()).then(|| t.status.err.clone()),
            // dockerd always sends `PID` and `ExitCode` (0 when unknown or still running).
            container_status: Some(m::ContainerStatus {
                container_id: Some(t.id.clone()),
                pid: Some(0),
                exit_code: Some(t.status.exit_code.map_or(0, i64::from)),
            }),
            port_status: Some(port_status(t)),
        }),
        desired_state: enum_of(&wire(&t.desired_state)),
        job_iteration: None,
    };
    let mut v = serde_json::to_value(model).unwrap_or(Value::Null);
    if let Some(Value::Object(c)) = v.pointer_mut("/Spec/ContainerSpec") {
        if let Some(h) = c.remove("HealthCheck") {
            c.insert("Healthcheck".into(), h);
        }
    }
    // Tools read the service's labels on tasks (stack ps filters by them).
    v["ServiceLabels"] = json!(labels);
    let attachments: Vec<Value> = t
        .networks
        .iter()
        .map(|a| {
            let net = objects.networks.iter().find(|n| n.id == a.network_id);
            json!({
                "Network": net.map_or_else(|| json!({"ID": a.network_id}), swarm_network),
                "Addresses": [a.addr],
            })
        })
        .collect();
    if !attachments.is_empty() {
        v["NetworksAttachments"] = json!(attachments);
    }
    v
}

/// `PortStatus`: the host-mode ports a running task publishes on its node (`service ps`
/// shows them under PORTS); `{}` otherwise, as dockerd sends it.
fn port_status(t: &Task) -> m::PortStatus {
    let ports: Vec<m::EndpointPortConfig> = if t.status.state == TaskState::Running {
        t.spec
            .ports
            .iter()
            .filter(|p| p.mode == PublishMode::Host && p.published != 0)
            .map(|p| m::EndpointPortConfig {
                name: None,
                protocol: enum_of(&wire(&p.protocol)),
                target_port: Some(i64::from(p.target)),
                published_port: Some(i64::from(p.published)),
                publish_mode: enum_of(&wire(&p.mode)),
            })
            .collect()
    } else {
        Vec::new()
    };
    m::PortStatus {
        ports: (!ports.is_empty()).then_some(ports),
    }
}

/// A network as tasks' `NetworksAttachments` show it (swarm's network object).
fn swarm_network(n: &Network) -> Value {
    json!({
        "ID": n.id,
        "Version": {"Index": n.created_at.max(1)},
        "CreatedAt": rfc3339(n.created_at),
        "UpdatedAt": rfc3339(n.created_at),
        "Spec": {
            "Name": n.spec.name,
            "Labels": n.spec.labels,
            "DriverConfiguration": {"Name": n.spec.driver},
            "Attachable": n.spec.attachable,
            "Ingress": n.spec.ingress,
            "IPAMOptions": {"Driver": {"Name": "default"}, "Configs": [{"Subnet": n.subnet, "Gateway": n.gateway}]},
            "Scope": "swarm",
        },
        "DriverState": {"Name": n.spec.driver, "Options": {"com.docker.network.driver.overlay.vxlanid_list": n.vni.to_string()}},
        "IPAMOptions": {"Driver": {"Name": "default"}, "Configs": [{"Subnet": n.subnet, "Gateway": n.gateway}]},
    })
}

pub fn network(n: &Network) -> m::Network {
    m::Network {
        name: Some(n.spec.name.clone()),
        id: Some(n.id.clone()),
        created: Some(rfc3339(n.created_at)),
        scope: Some("swarm".into()),
        driver: Some(n.spec.driver.clone()),
        enable_ipv4: Some(true),
        enable_ipv6: Some(false),
        ipam: Some(m::Ipam {
            driver: Some("default".into()),
            config: Some(vec![m::IpamConfig {
                subnet: Some(n.subnet.clone()),
                gateway: Some(n.gateway.to_string()),
                ..Default::default()
            }]),
            options: None,
        }),
        internal: Some(false),
        attachable: Some(n.spec.attachable),
        ingress: Some(n.spec.ingress),
        config_from: Some(m::ConfigReference {
            network: Some(String::new()),
        }),
        config_only: Some(false),
        options: Some(
            [(
                "com.docker.network.driver.overlay.vxlanid_list".to_string(),
                n.vni.to_string(),
            )]
            .into_iter()
            .chain(
                n.spec
                    .encrypted
                    .then(|| ("encrypted".to_string(), String::new())),
            )
            .collect(),
        ),
        labels: Some(map(&n.spec.labels)),
        peers: None,
    }
}

/// `GET /networks/{id}`: the list shape plus `Containers` (this node's tasks on it are not
/// tracked per node here: empty, as dockerd shows for a network without local endpoints).
pub fn network_json(n: &Network) -> Value {
    let mut v = network_list_json(n);
    v["Containers"] = json!({});
    v
}

/// A network as dockerd lists it (`GET /networks`): the model plus what the stubs cannot
/// express, `IPAM.Options` and (swarm networks) `Containers` as `null`.
pub fn network_list_json(n: &Network) -> Value {
    let mut v = serde_json::to_value(network(n)).unwrap_or(Value::Null);
    v["IPAM"]["Options"] = Value::Null;
    v["Containers"] = Value::Null;
    v
}
