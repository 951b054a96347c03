//! Engine API service specs to mesh's. A spec is first read into the Engine API's model (a
//! wrong type is a 400 naming it), then into a [`mesh_api::ServiceSpec`]; that spec is
//! written back in the Engine API's shape and compared with what was sent: any field sent
//! with a value mesh would not keep and show again (placement preferences, a log driver, a
//! sub-millisecond delay, a health check's `StartInterval`) is refused with a 400 naming the field, never dropped.
//! So what `docker service inspect` shows is exactly what was asked, and the `docker` CLI's
//! read-modify-write round trips (`scale`, `update`, `rollback`) lose nothing.

use std::collections::BTreeMap;

use bollard_stubs::models as m;
use mesh_api::{
    ClusterObjects, EndpointMode, FailureAction, Mount, MountType, PortConfig, PublishMode,
    Resources, RestartCondition, RestartPolicy, RollbackConfig, ServiceMode, ServiceSpec,
    UpdateConfig, UpdateOrder,
};
use serde_json::Value;

use crate::convert::{healthcheck_key, network_id, service_spec_json};
use crate::server::EngineError;

/// Reads a service spec sent to `POST /services/create` or `/services/{id}/update`.
pub fn from_engine(sent: &Value, objects: &ClusterObjects) -> Result<ServiceSpec, EngineError> {
    if !sent.is_object() {
        return Err(EngineError::bad(
            "invalid JSON: the service spec must be an object",
        ));
    }
    // dockerd's `Healthcheck` is the schema's (and the stubs') `HealthCheck`.
    let mut sent = sent.clone();
    if let Some(Value::Object(c)) = sent.pointer_mut("/TaskTemplate/ContainerSpec") {
        if let Some(h) = c.remove("Healthcheck") {
            c.insert("HealthCheck".into(), h);
        }
    }
    let typed: m::ServiceSpec = serde_json::from_value(sent.clone())
        .map_err(|e| EngineError::bad(format!("invalid JSON: {e}")))?;
    let spec = convert(&typed, objects)?;
    // What was sent, with network targets as IDs and the deprecated top-level `Networks` in
    // the task template, against what mesh keeps.
    healthcheck_key(&mut sent);
    normalise_networks(&mut sent, objects);
    let back = service_spec_json(&spec, objects);
    if let Some(path) = unkept("", &sent, &back) {
        return Err(EngineError::bad(format!(
            "invalid service spec: {path} is not supported by mesh (yet)"
        )));
    }
    Ok(spec)
}

fn normalise_networks(sent: &mut Value, objects: &ClusterObjects) {
    let top = sent.as_object_mut().and_then(|o| o.remove("Networks"));
    if let Some(Value::Array(nets)) = top {
        if !nets.is_empty() {
            sent["TaskTemplate"]["Networks"] = Value::Array(nets);
        }
    }
    if let Some(Value::Array(nets)) = sent.pointer_mut("/TaskTemplate/Networks") {
        for n in nets {
            if let Some(t) = n.get("Target").and_then(Value::as_str).map(str::to_string) {
                n["Target"] = Value::String(network_id(objects, &t));
            }
        }
    }
}

/// The first field of `sent` with a value `back` does not hold (see [`from_engine`]).
pub fn unkept_path(sent: &Value, back: &Value) -> Option<String> {
    unkept("", sent, back)
}

/// Whether a sent value asks for nothing (Go's zero values, and Docker's spelled-out
/// defaults that mean the same).
pub fn empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty() || s == "default",
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(empty),
    }
}

/// The first path in `sent` whose non-empty value `back` does not hold.
fn unkept(path: &str, sent: &Value, back: &Value) -> Option<String> {
    if empty(sent) {
        return None;
    }
    let here = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match (sent, back) {
        (Value::Object(s), Value::Object(b)) => s
            .iter()
            .find_map(|(k, v)| unkept(&here(k), v, b.get(k).unwrap_or(&Value::Null))),
        (Value::Array(s), Value::Array(b)) if s.len() == b.len() => s
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (sv, bv))| unkept(&format!("{path}[{i}]"), sv, bv)),
        (Value::Number(s), Value::Number(b)) if s.as_f64() == b.as_f64() => None,
        (s, b) if s == b => None,
        _ => Some(path.to_string()),
    }
}

fn ms(what: &str, ns: Option<i64>) -> Result<Option<u64>, EngineError> {
    match ns {
        None => Ok(None),
        Some(n) if n < 0 => Err(EngineError::bad(format!(
            "invalid {what}: negative duration"
        ))),
        Some(n) => Ok(Some(n as u64 / 1_000_000)),
    }
}

fn unsigned(what: &str, n: Option<i64>) -> Result<Option<u64>, EngineError> {
    match n {
        Some(n) if n < 0 => Err(EngineError::bad(format!("invalid {what}: {n} is negative"))),
        n => Ok(n.map(|n| n as u64)),
    }
}

/// A name for a service created without one, as Docker makes them (`adjective_name`).
fn generated_name() -> String {
    const ADJ: [&str; 8] = [
        "brave", "calm", "eager", "keen", "lucid", "quirky", "stoic", "vivid",
    ];
    const NAMES: [&str; 8] = [
        "curie", "hopper", "lovelace", "noether", "pike", "ritchie", "turing", "wozniak",
    ];
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0) as usize;
    format!("{}_{}", ADJ[n % 8], NAMES[(n / 8) % 8])
}

fn convert(t: &m::ServiceSpec, objects: &ClusterObjects) -> Result<ServiceSpec, EngineError> {
    let tt = t.task_template.clone().unwrap_or_default();
    let c = tt.container_spec.clone().unwrap_or_default();
    let image = c.image.clone().unwrap_or_default();
    let (entrypoint, command) = if image.is_empty() {
        // A host process (a mesh extension, API only): its command line is `Args`.
        (
            Vec::new(),
            c.command
                .clone()
                .unwrap_or_default()
                .into_iter()
                .chain(c.args.clone().unwrap_or_default())
                .collect(),
        )
    } else {
        (
            c.command.clone().unwrap_or_default(),
            c.args.clone().unwrap_or_default(),
        )
    };
    let mut mounts = Vec::new();
    for (i, mt) in c.mounts.iter().flatten().enumerate() {
        let kind = match mt.typ {
            Some(m::MountType::BIND) => MountType::Bind,
            Some(m::MountType::VOLUME) | None => MountType::Volume,
            Some(m::MountType::TMPFS) => MountType::Tmpfs,
            Some(other) => {
                return Err(EngineError::bad(format!(
                    "invalid service spec: TaskTemplate.ContainerSpec.Mounts[{i}].Type {other} is not supported by mesh (bind, volume or tmpfs)"
                )))
            }
        };
        let target = mt.target.clone().unwrap_or_default();
        if target.is_empty() {
            return Err(EngineError::bad(format!(
                "invalid mount config: TaskTemplate.ContainerSpec.Mounts[{i}]: Target must not be empty"
            )));
        }
        mounts.push(Mount {
            kind,
            source: mt.source.clone().unwrap_or_default(),
            target,
            readonly: mt.read_only.unwrap_or(false),
        });
    }
    let limits = tt
        .resources
        .as_ref()
        .and_then(|r| r.limits.clone())
        .unwrap_or_default();
    let rp = tt.restart_policy.clone().unwrap_or_default();
    let restart_default = RestartPolicy::default();
    let restart = RestartPolicy {
        condition: match rp.condition {
            None | Some(m::TaskSpecRestartPolicyConditionEnum::EMPTY) => restart_default.condition,
            Some(m::TaskSpecRestartPolicyConditionEnum::ANY) => RestartCondition::Any,
            Some(m::TaskSpecRestartPolicyConditionEnum::ON_FAILURE) => RestartCondition::OnFailure,
            Some(m::TaskSpecRestartPolicyConditionEnum::NONE) => RestartCondition::None,
        },
        delay_ms: ms("RestartPolicy.Delay", rp.delay)?.unwrap_or(restart_default.delay_ms),
        max_attempts: unsigned("RestartPolicy.MaxAttempts", rp.max_attempts)?.unwrap_or(0),
    };
    let placement = tt.placement.clone().unwrap_or_default();
    let mut networks = Vec::new();
    let mut aliases = BTreeMap::new();
    for n in tt
        .networks
        .iter()
        .flatten()
        .chain(t.networks.iter().flatten())
    {
        let target = n.target.clone().unwrap_or_default();
        let net = objects
            .networks
            .iter()
            .find(|x| x.id == target || x.spec.name == target)
            .or_else(|| {
                let by_prefix: Vec<_> = objects
                    .networks
                    .iter()
                    .filter(|x| !target.is_empty() && x.id.starts_with(&target))
                    .collect();
                (by_prefix.len() == 1).then(|| by_prefix[0])
            })
            .ok_or_else(|| EngineError::not_found(format!("network {target} not found")))?;
        if net.spec.ingress {
            return Err(EngineError::bad(
                "service cannot be explicitly attached to the ingress network \"ingress\"",
            ));
        }
        if let Some(a) = n.aliases.as_ref().filter(|a| !a.is_empty()) {
            for alias in a {
                mesh_api::validate_dns_name(alias).map_err(|e| {
                    EngineError::bad(format!("invalid network alias {alias:?}: {e}"))
                })?;
            }
            aliases.insert(net.spec.name.clone(), a.clone());
        }
        networks.push(net.spec.name.clone());
    }
    let mode = match &t.mode {
        None => ServiceMode::default(),
        Some(md) if md.replicated_job.is_some() || md.global_job.is_some() => {
            return Err(EngineError::bad(
                "invalid service spec: Mode.ReplicatedJob and Mode.GlobalJob are not supported by mesh (yet)",
            ))
        }
        Some(md) if md.global.is_some() => ServiceMode::Global,
        Some(md) => ServiceMode::Replicated {
            replicas: unsigned(
                "Mode.Replicated.Replicas",
                md.replicated.as_ref().and_then(|r| r.replicas),
            )?
            .unwrap_or(1),
        },
    };
    let uc = t.update_config.clone().unwrap_or_default();
    let ud = UpdateConfig::default();
    let update = UpdateConfig {
        parallelism: unsigned("UpdateConfig.Parallelism", uc.parallelism)?
            .unwrap_or(ud.parallelism),
        delay_ms: ms("UpdateConfig.Delay", uc.delay)?.unwrap_or(ud.delay_ms),
        failure_action: match uc.failure_action {
            None | Some(m::ServiceSpecUpdateConfigFailureActionEnum::EMPTY) => ud.failure_action,
            Some(m::ServiceSpecUpdateConfigFailureActionEnum::PAUSE) => FailureAction::Pause,
            Some(m::ServiceSpecUpdateConfigFailureActionEnum::CONTINUE) => FailureAction::Continue,
            Some(m::ServiceSpecUpdateConfigFailureActionEnum::ROLLBACK) => FailureAction::Rollback,
        },
        monitor_ms: match ms("UpdateConfig.Monitor", uc.monitor)? {
            None | Some(0) => ud.monitor_ms,
            Some(v) => v,
        },
        order: match uc.order {
            Some(m::ServiceSpecUpdateConfigOrderEnum::START_FIRST) => UpdateOrder::StartFirst,
            _ => UpdateOrder::StopFirst,
        },
    };
    let rollback = RollbackConfig {
        order: match t.rollback_config.as_ref().and_then(|r| r.order) {
            Some(m::ServiceSpecRollbackConfigOrderEnum::START_FIRST) => UpdateOrder::StartFirst,
            _ => UpdateOrder::StopFirst,
        },
    };
    let es = t.endpoint_spec.clone().unwrap_or_default();
    let mut ports = Vec::new();
    for (i, p) in es.ports.iter().flatten().enumerate() {
        let port = |what: &str, v: Option<i64>| -> Result<u16, EngineError> {
            let v = v.unwrap_or(0);
            u16::try_from(v).map_err(|_| {
                EngineError::bad(format!(
                    "invalid service spec: EndpointSpec.Ports[{i}].{what}: {v} is not a port"
                ))
            })
        };
        let target = port("TargetPort", p.target_port)?;
        if target == 0 {
            return Err(EngineError::bad(format!(
                "invalid service spec: EndpointSpec.Ports[{i}].TargetPort must be set"
            )));
        }
        ports.push(PortConfig {
            protocol: match p.protocol {
                Some(m::EndpointPortConfigProtocolEnum::UDP) => mesh_api::Protocol::Udp,
                Some(m::EndpointPortConfigProtocolEnum::SCTP) => {
                    return Err(EngineError::bad(format!(
                        "invalid service spec: EndpointSpec.Ports[{i}].Protocol sctp is not supported by mesh"
                    )))
                }
                _ => mesh_api::Protocol::Tcp,
            },
            target,
            published: port("PublishedPort", p.published_port)?,
            mode: match p.publish_mode {
                Some(m::EndpointPortConfigPublishModeEnum::HOST) => PublishMode::Host,
                _ => PublishMode::Ingress,
            },
        });
    }
    let labels: BTreeMap<String, String> =
        t.labels.clone().unwrap_or_default().into_iter().collect();
    Ok(ServiceSpec {
        name: t
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(generated_name),
        mode,
        command,
        env: c.env.clone().unwrap_or_default(),
        networks,
        ports,
        endpoint_mode: match es.mode {
            Some(m::EndpointSpecModeEnum::DNSRR) => EndpointMode::Dnsrr,
            _ => EndpointMode::Vip,
        },
        constraints: placement.constraints.clone().unwrap_or_default(),
        restart,
        update,
        rollback,
        resources: Resources {
            nano_cpus: unsigned("Resources.Limits.NanoCPUs", limits.nano_cpus)?.unwrap_or(0),
            memory_bytes: unsigned("Resources.Limits.MemoryBytes", limits.memory_bytes)?
                .unwrap_or(0),
        },
        labels,
        image,
        entrypoint,
        user: c.user.clone().unwrap_or_default(),
        workdir: c.dir.clone().unwrap_or_default(),
        hostname: c.hostname.clone().unwrap_or_default(),
        read_only: c.read_only.unwrap_or(false),
        init: c.init.unwrap_or(false),
        mounts,
        stop_signal: c.stop_signal.clone().unwrap_or_default(),
        stop_grace_period_ms: ms("ContainerSpec.StopGracePeriod", c.stop_grace_period)?,
        force_update: tt.force_update.unwrap_or(0),
        container_labels: c.labels.clone().unwrap_or_default().into_iter().collect(),
        platforms: placement
            .platforms
            .iter()
            .flatten()
            .map(|p| {
                format!(
                    "{}/{}",
                    p.os.clone().unwrap_or_else(|| "linux".into()),
                    p.architecture.clone().unwrap_or_default()
                )
            })
            .collect(),
        aliases,
        secrets: c
            .secrets
            .iter()
            .flatten()
            .map(|r| {
                let f = r.file.clone().unwrap_or_default();
                blob_ref(
                    r.secret_name.clone(),
                    r.secret_id.clone(),
                    f.name,
                    f.uid,
                    f.gid,
                    f.mode,
                )
            })
            .collect(),
        configs: c
            .configs
            .iter()
            .flatten()
            .map(|r| {
                let f = r.file.clone().unwrap_or_default();
                blob_ref(
                    r.config_name.clone(),
                    r.config_id.clone(),
                    f.name,
                    f.uid,
                    f.gid,
                    f.mode,
                )
            })
            .collect(),
        healthcheck: health_config(c.health_check.as_ref())?,
    })
}

/// A `Secrets[]` / `Configs[]` entry as mesh keeps it (the manager resolves and checks it).
fn blob_ref(
    name: Option<String>,
    id: Option<String>,
    target: Option<String>,
    uid: Option<String>,
    gid: Option<String>,
    mode: Option<u32>,
) -> mesh_api::BlobReference {
    mesh_api::BlobReference {
        source: name.unwrap_or_default(),
        id: id.unwrap_or_default(),
        target: target.unwrap_or_default(),
        uid: uid.unwrap_or_else(|| "0".into()),
        gid: gid.unwrap_or_else(|| "0".into()),
        mode: mode.unwrap_or(0o444),
    }
}

/// `ContainerSpec.Healthcheck`, checked as swarmkit checks it (durations of 1 ms at least,
/// retries not negative); an empty one is none.
fn health_config(
    h: Option<&m::HealthConfig>,
) -> Result<Option<mesh_api::HealthConfig>, EngineError> {
    let Some(h) = h else { return Ok(None) };
    let dur = |what: &str, v: Option<i64>| -> Result<u64, EngineError> {
        match v.unwrap_or(0) {
            n if n < 0 || (n > 0 && n < 1_000_000) => Err(EngineError::bad(format!(
                "ContainerSpec: {what} in HealthConfig cannot be less than 1ms"
            ))),
            n => Ok(n as u64 / 1_000_000),
        }
    };
    let retries = h.retries.unwrap_or(0);
    if retries < 0 {
        return Err(EngineError::bad(
            "ContainerSpec: Retries in HealthConfig cannot be negative",
        ));
    }
    let hc = mesh_api::HealthConfig {
        test: h.test.clone().unwrap_or_default(),
        interval_ms: dur("Interval", h.interval)?,
        timeout_ms: dur("Timeout", h.timeout)?,
        start_period_ms: dur("StartPeriod", h.start_period)?,
        retries: retries as u64,
    };
    Ok((hc != mesh_api::HealthConfig::default()).then_some(hc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn objects() -> ClusterObjects {
        ClusterObjects {
            networks: vec![mesh_api::Network {
                id: "qc1a78mx1evuht6t0uzs9im0y".into(),
                spec: mesh_api::NetworkSpec {
                    name: "appnet".into(),
                    driver: "overlay".into(),
                    subnet: Some("10.0.1.0/24".into()),
                    encrypted: false,
                    attachable: false,
                    ingress: false,
                    labels: Default::default(),
                },
                subnet: "10.0.1.0/24".into(),
                gateway: "10.0.1.1".parse().unwrap(),
                vni: 4097,
                created_at: 0,
            }],
            ..Default::default()
        }
    }

    /// The body `docker service create --name web --replicas 2 --network appnet --publish
    /// 8080:80 busybox httpd -f -p 80` sends (captured from the real CLI).
    fn cli_create() -> Value {
        json!({
            "Name": "web", "Labels": {},
            "TaskTemplate": {
                "ContainerSpec": {"Image": "busybox:latest", "Args": ["httpd", "-f", "-p", "80"], "Init": false, "DNSConfig": {}},
                "Resources": {"Limits": {}, "Reservations": {}}, "Placement": {},
                "Networks": [{"Target": "qc1a78mx1evuht6t0uzs9im0y"}], "ForceUpdate": 0
            },
            "Mode": {"Replicated": {"Replicas": 2}},
            "EndpointSpec": {"Mode": "vip", "Ports": [{"Protocol": "tcp", "TargetPort": 80, "PublishedPort": 8080, "PublishMode": "ingress"}]}
        })
    }

    #[test]
    fn the_cli_create_body_converts() {
        let o = objects();
        let s = from_engine(&cli_create(), &o).unwrap();
        assert_eq!(s.name, "web");
        assert_eq!(s.image, "busybox:latest");
        assert_eq!(s.command, vec!["httpd", "-f", "-p", "80"]);
        assert!(s.entrypoint.is_empty());
        assert_eq!(s.mode, ServiceMode::Replicated { replicas: 2 });
        assert_eq!(s.networks, vec!["appnet"]);
        assert_eq!(s.ports[0].published, 8080);
        // And what mesh shows goes back unchanged (the CLI's read-modify-write).
        let shown = service_spec_json(&s, &o);
        assert_eq!(from_engine(&shown, &o).unwrap(), s);
    }

    #[test]
    fn unkept_fields_are_refused_by_name() {
        let o = objects();
        let mut v = cli_create();
        v["TaskTemplate"]["ContainerSpec"]["Healthcheck"] =
            json!({"Test": ["CMD", "true"], "StartInterval": 1_000_000_000});
        let e = from_engine(&v, &o).unwrap_err();
        assert_eq!(e.status, http::StatusCode::BAD_REQUEST);
        assert!(
            e.message
                .contains("TaskTemplate.ContainerSpec.Healthcheck.StartInterval"),
            "{}",
            e.message
        );
        let mut v = cli_create();
        v["TaskTemplate"]["Placement"]["Preferences"] =
            json!([{"Spread": {"SpreadDescriptor": "node.labels.zone"}}]);
        let e = from_engine(&v, &o).unwrap_err();
        assert!(
            e.message.contains("TaskTemplate.Placement.Preferences"),
            "{}",
            e.message
        );
        let mut v = cli_create();
        v["UpdateConfig"] = json!({"Delay": 1_500_000});
        let e = from_engine(&v, &o).unwrap_err();
        assert!(e.message.contains("UpdateConfig.Delay"), "{}", e.message);
    }

    #[test]
    fn health_checks_round_trip() {
        let o = objects();
        let mut v = cli_create();
        // What `docker service create --health-cmd 'test -f /ok' --health-interval 500ms
        // --health-retries 2` sends.
        v["TaskTemplate"]["ContainerSpec"]["Healthcheck"] =
            json!({"Test": ["CMD-SHELL", "test -f /ok"], "Interval": 500_000_000, "Retries": 2});
        let s = from_engine(&v, &o).unwrap();
        let h = s.healthcheck.clone().unwrap();
        assert_eq!(h.test, ["CMD-SHELL", "test -f /ok"]);
        assert_eq!((h.interval_ms, h.timeout_ms, h.retries), (500, 0, 2));
        let shown = service_spec_json(&s, &o);
        assert_eq!(
            shown["TaskTemplate"]["ContainerSpec"]["Healthcheck"],
            v["TaskTemplate"]["ContainerSpec"]["Healthcheck"]
        );
        assert_eq!(from_engine(&shown, &o).unwrap(), s);
        // --no-healthcheck.
        v["TaskTemplate"]["ContainerSpec"]["Healthcheck"] = json!({"Test": ["NONE"]});
        let s = from_engine(&v, &o).unwrap();
        assert_eq!(s.healthcheck.unwrap().test, ["NONE"]);
        // swarmkit's limits.
        v["TaskTemplate"]["ContainerSpec"]["Healthcheck"] = json!({"Interval": 500_000});
        let e = from_engine(&v, &o).unwrap_err();
        assert_eq!(
            e.message,
            "ContainerSpec: Interval in HealthConfig cannot be less than 1ms"
        );
        v["TaskTemplate"]["ContainerSpec"]["Healthcheck"] = json!({"Retries": -1});
        assert!(from_engine(&v, &o).is_err());
    }

    #[test]
    fn wrong_types_and_unknown_networks_are_clear() {
        let o = objects();
        let mut v = cli_create();
        v["Mode"]["Replicated"]["Replicas"] = json!("two");
        let e = from_engine(&v, &o).unwrap_err();
        assert!(e.message.starts_with("invalid JSON:"), "{}", e.message);
        let mut v = cli_create();
        v["TaskTemplate"]["Networks"] = json!([{"Target": "nope"}]);
        let e = from_engine(&v, &o).unwrap_err();
        assert_eq!(e.status, http::StatusCode::NOT_FOUND);
        assert_eq!(e.message, "network nope not found");
        assert!(from_engine(&json!([1]), &o).is_err());
    }
}
