//! Service management on the leader: spec validation (bad specs are refused before anything is
//! stored), create, update (rolling, or a plain scale), rollback, remove, and the views
//! `service ls`, `service ps` and `service inspect` show.

use std::collections::BTreeMap;

use mesh_api::{
    ApiError, ErrorKind, Service, ServiceMode, ServiceSpec, ServiceSummary, ServiceUpdate,
    TaskState, TaskSummary, UpdateState, UpdateStatus,
};
use serde_json::{json, Value};

use crate::state::StoreState;

/// Service names follow DNS labels, as Docker's: they become DNS names later.
pub fn validate_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "invalid service name: {name:?} (1-63 letters, digits, '-' or '_', starting with a letter or digit)"
        )))
    }
}

/// Checks a service's health check as swarmkit and Docker's daemon do.
fn validate_health(h: &mesh_api::HealthConfig) -> Result<(), String> {
    match h.test.first().map(String::as_str) {
        None | Some("NONE") => {}
        Some("CMD") if h.test.len() >= 2 && !h.test[1].is_empty() => {}
        Some("CMD-SHELL") if h.test.len() == 2 && !h.test[1].trim().is_empty() => {}
        Some("CMD" | "CMD-SHELL") => {
            return Err(format!("invalid healthcheck test: {:?}", h.test));
        }
        Some(other) => return Err(format!("unknown healthcheck type: {other:?}")),
    }
    Ok(())
}

/// Checks a spec against the cluster; the error names what is wrong.
pub fn validate_spec(spec: &ServiceSpec, state: &StoreState) -> Result<(), ApiError> {
    validate_name(&spec.name)?;
    if let Some(h) = &spec.healthcheck {
        validate_health(h).map_err(ApiError::invalid)?;
    }
    if spec.image.is_empty() {
        if spec.command.is_empty() || spec.command[0].trim().is_empty() {
            return Err(ApiError::invalid(format!(
                "service {}: the command is empty",
                spec.name
            )));
        }
        if !spec.entrypoint.is_empty()
            || !spec.user.is_empty()
            || !spec.workdir.is_empty()
            || !spec.mounts.is_empty()
            || spec.read_only
            || spec.init
        {
            return Err(ApiError::invalid(format!(
                "service {}: entrypoint, user, workdir, mounts, read-only and init need an image",
                spec.name
            )));
        }
    } else if spec.image.trim() != spec.image || spec.image.contains(char::is_whitespace) {
        return Err(ApiError::invalid(format!(
            "invalid reference format: {:?}",
            spec.image
        )));
    }
    if !spec.workdir.is_empty() && !spec.workdir.starts_with('/') {
        return Err(ApiError::invalid(format!(
            "the working directory '{}' is invalid, it needs to be an absolute path",
            spec.workdir
        )));
    }
    if !spec.hostname.is_empty()
        && (spec.hostname.len() > 64
            || !spec
                .hostname
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'))
    {
        return Err(ApiError::invalid(format!(
            "invalid hostname: {:?}",
            spec.hostname
        )));
    }
    if !spec.stop_signal.is_empty() && mesh_api::signal_number(&spec.stop_signal).is_none() {
        return Err(ApiError::invalid(format!(
            "invalid signal: {}",
            spec.stop_signal
        )));
    }
    let mut targets = std::collections::BTreeSet::new();
    for m in &spec.mounts {
        m.validate().map_err(ApiError::invalid)?;
        if !targets.insert(m.target.as_str()) {
            return Err(ApiError::invalid(format!(
                "Duplicate mount point: {}",
                m.target
            )));
        }
    }
    for e in &spec.env {
        match e.split_once('=') {
            Some((k, _)) if !k.is_empty() => {}
            _ => {
                return Err(ApiError::invalid(format!(
                    "invalid environment variable: {e:?} (expected KEY=VALUE)"
                )))
            }
        }
    }
    mesh_scheduler::parse_constraints(&spec.constraints).map_err(ApiError::invalid)?;
    let mut seen = std::collections::BTreeSet::new();
    for name in &spec.networks {
        let n = state
            .find_network(name)
            .map_err(|_| ApiError::not_found(format!("no such network: {name}")))?;
        if n.spec.ingress {
            return Err(ApiError::invalid(
                "service cannot be explicitly attached to the ingress network \"ingress\"",
            ));
        }
        if !seen.insert(n.id.clone()) {
            return Err(ApiError::invalid(format!(
                "network {name} is given more than once"
            )));
        }
    }
    let mut published = std::collections::BTreeSet::new();
    for p in &spec.ports {
        if p.target == 0 {
            return Err(ApiError::invalid("a published port needs a target port"));
        }
        if p.published != 0 && !published.insert((p.protocol, p.published)) {
            return Err(ApiError::invalid(format!(
                "port {}/{} is published more than once",
                p.published, p.protocol
            )));
        }
    }
    if spec.endpoint_mode == mesh_api::EndpointMode::Dnsrr
        && spec
            .ports
            .iter()
            .any(|p| p.mode == mesh_api::PublishMode::Ingress)
    {
        return Err(ApiError::invalid(
            "port published with ingress mode can't be used with dnsrr mode",
        ));
    }
    if spec.update.monitor_ms > 3_600_000
        || spec.update.delay_ms > 3_600_000
        || spec.restart.delay_ms > 3_600_000
    {
        return Err(ApiError::invalid(
            "delays and monitor periods must be at most 1h",
        ));
    }
    Ok(())
}

/// The service other than `own` that publishes `proto`/`port`, if any. Published ports are
/// cluster-wide, whatever their mode: an ingress port answers on every node, and a host port
/// taken by two services could not run both on one node.
pub fn port_user<'a>(
    state: &'a StoreState,
    proto: mesh_api::Protocol,
    port: u16,
    own: Option<&str>,
) -> Option<&'a Service> {
    state.services.values().find(|s| {
        Some(s.id.as_str()) != own
            && s.spec
                .ports
                .iter()
                .any(|p| p.protocol == proto && p.published == port)
    })
}

/// Refuses ports another service publishes, and assigns the missing published ports the
/// lowest free ones of [`mesh_api::AUTO_PORTS`] (written into the spec, so every node and every
/// later update sees the port actually used).
pub fn allocate_ports(
    state: &StoreState,
    spec: &mut ServiceSpec,
    own: Option<&str>,
) -> Result<(), ApiError> {
    for p in spec.ports.iter().filter(|p| p.published != 0) {
        if let Some(other) = port_user(state, p.protocol, p.published, own) {
            return Err(ApiError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "port {}/{} is already in use by service {} ({})",
                    p.published, p.protocol, other.spec.name, other.id
                ),
            ));
        }
    }
    let taken: std::collections::BTreeSet<(mesh_api::Protocol, u16)> = spec
        .ports
        .iter()
        .map(|p| (p.protocol, p.published))
        .collect();
    let mut taken = taken;
    for i in 0..spec.ports.len() {
        if spec.ports[i].published != 0 {
            continue;
        }
        let proto = spec.ports[i].protocol;
        let port = mesh_api::AUTO_PORTS
            .clone()
            .find(|&n| !taken.contains(&(proto, n)) && port_user(state, proto, n, own).is_none())
            .ok_or_else(|| {
                ApiError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "no free port left in {}-{} for {proto}",
                        mesh_api::AUTO_PORTS.start(),
                        mesh_api::AUTO_PORTS.end()
                    ),
                )
            })?;
        taken.insert((proto, port));
        spec.ports[i].published = port;
    }
    Ok(())
}

/// Applies `service update` arguments to a spec.
pub fn apply_update(spec: &ServiceSpec, u: &ServiceUpdate) -> Result<ServiceSpec, ApiError> {
    let mut s = spec.clone();
    if let Some(r) = u.replicas {
        match &mut s.mode {
            ServiceMode::Replicated { replicas } => *replicas = r,
            ServiceMode::Global => {
                return Err(ApiError::invalid(format!(
                    "service {}: replicas can only be used with replicated mode",
                    spec.name
                )))
            }
        }
    }
    if let Some(c) = &u.command {
        s.command = c.clone();
    }
    // As Docker's CLI: removals by name, then additions replace a reference to the same
    // object or at the same target.
    for (list, rm, add) in [
        (&mut s.secrets, &u.secret_rm, &u.secret_add),
        (&mut s.configs, &u.config_rm, &u.config_add),
    ] {
        list.retain(|r| !rm.contains(&r.source) && !rm.contains(&r.id));
        for a in add {
            list.retain(|r| r.source != a.source && r.target != a.target);
            list.push(a.clone());
        }
    }
    if let Some(i) = &u.image {
        if s.image.is_empty() {
            return Err(ApiError::invalid(format!(
                "service {}: runs a host command, not an image",
                spec.name
            )));
        }
        s.image = i.clone();
    }
    let key = |e: &str| {
        e.split_once('=')
            .map(|(k, _)| k.to_string())
            .unwrap_or_else(|| e.to_string())
    };
    s.env
        .retain(|e| !u.env_rm.contains(&key(e)) && !u.env_add.iter().any(|a| key(a) == key(e)));
    s.env.extend(u.env_add.iter().cloned());
    s.constraints.retain(|c| !u.constraint_rm.contains(c));
    for c in &u.constraint_add {
        if !s.constraints.contains(c) {
            s.constraints.push(c.clone());
        }
    }
    if let Some(c) = u.restart_condition {
        s.restart.condition = c;
    }
    if let Some(d) = u.restart_delay_ms {
        s.restart.delay_ms = d;
    }
    if let Some(m) = u.restart_max_attempts {
        s.restart.max_attempts = m;
    }
    if let Some(p) = u.update_parallelism {
        s.update.parallelism = p;
    }
    if let Some(d) = u.update_delay_ms {
        s.update.delay_ms = d;
    }
    if let Some(a) = u.update_failure_action {
        s.update.failure_action = a;
    }
    if let Some(m) = u.update_monitor_ms {
        s.update.monitor_ms = m;
    }
    if let Some(o) = u.update_order {
        s.update.order = o;
    }
    if let Some(o) = u.rollback_order {
        s.rollback.order = o;
    }
    if let Some(c) = u.nano_cpus {
        s.resources.nano_cpus = c;
    }
    if let Some(m) = u.memory_bytes {
        s.resources.memory_bytes = m;
    }
    u.health
        .apply(&mut s.healthcheck)
        .map_err(ApiError::invalid)?;
    Ok(s)
}

/// Whether two specs differ in more than the replica count (a plain scale replaces no task).
pub fn needs_rollout(old: &ServiceSpec, new: &ServiceSpec) -> bool {
    let mut a = old.clone();
    let mut b = new.clone();
    if let (ServiceMode::Replicated { .. }, ServiceMode::Replicated { .. }) = (&a.mode, &b.mode) {
        a.mode = ServiceMode::Replicated { replicas: 0 };
        b.mode = ServiceMode::Replicated { replicas: 0 };
    }
    // Update and rollback settings steer the orchestrator; they do not change the tasks.
    a.update = Default::default();
    b.update = Default::default();
    a.rollback = Default::default();
    b.rollback = Default::default();
    a != b
}

/// The next version of a service whose spec becomes `spec`.
pub fn updated(svc: &Service, spec: ServiceSpec, force: bool, now: u64) -> Service {
    let mut next = svc.clone();
    let rollout = force || needs_rollout(&svc.spec, &spec);
    if rollout {
        next.previous_spec = Some(svc.spec.clone());
        next.version += 1;
        next.update_status = Some(UpdateStatus {
            state: UpdateState::Updating,
            started_at: now,
            message: "update in progress".into(),
        });
    }
    next.spec = spec;
    next.updated_at = now;
    next
}

/// The version `service rollback` goes back to.
pub fn rolled_back(svc: &Service, now: u64) -> Result<Service, ApiError> {
    let prev = svc.previous_spec.clone().ok_or_else(|| {
        ApiError::invalid(format!(
            "service {} does not have a previous spec",
            svc.spec.name
        ))
    })?;
    let mut next = svc.clone();
    next.previous_spec = Some(svc.spec.clone());
    next.spec = prev;
    next.version += 1;
    next.updated_at = now;
    next.update_status = Some(UpdateStatus {
        state: UpdateState::RollbackStarted,
        started_at: now,
        message: "manually requested rollback".into(),
    });
    Ok(next)
}

/// How many tasks a service wants, and how many run.
pub fn replica_counts(state: &StoreState, svc: &Service) -> (u64, u64) {
    let running = state
        .service_tasks(&svc.id)
        .filter(|t| t.desired_state == TaskState::Running && t.status.state == TaskState::Running)
        .count() as u64;
    let desired = match svc.spec.mode {
        ServiceMode::Replicated { replicas } => replicas,
        ServiceMode::Global => state
            .service_tasks(&svc.id)
            .filter(|t| t.desired_state == TaskState::Running && !t.status.state.is_terminal())
            .count() as u64,
    };
    (running, desired)
}

pub fn ls(state: &StoreState, filters: &mesh_api::Filters) -> Vec<ServiceSummary> {
    let mut out: Vec<ServiceSummary> = state
        .services
        .values()
        .filter(|svc| mesh_api::filter::service(filters, svc))
        .map(|svc| {
            let (running, desired) = replica_counts(state, svc);
            ServiceSummary {
                id: svc.id.clone(),
                name: svc.spec.name.clone(),
                mode: match svc.spec.mode {
                    ServiceMode::Replicated { .. } => "replicated".into(),
                    ServiceMode::Global => "global".into(),
                },
                running,
                desired,
                ports: svc
                    .spec
                    .ports
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                image: mesh_api::familiar_image(&svc.spec.image),
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// `service ps`: per slot the newest task first, then its history, as Docker lists them;
/// only the tasks `filters` match (see [`mesh_api::filter::task`]).
pub fn ps(
    state: &StoreState,
    svc: &Service,
    filters: &mesh_api::Filters,
) -> Vec<(TaskSummary, u64)> {
    let tasks = state
        .service_tasks(&svc.id)
        .filter(|t| task_matches(state, t, filters));
    group_tasks(state, tasks)
}

/// The task listings' rows (`node ps`, `stack ps`, `/tasks`): the tasks of every service
/// that `filters` match, grouped by service name, then as [`ps`] does.
pub fn task_ls(state: &StoreState, filters: &mesh_api::Filters) -> Vec<(TaskSummary, u64)> {
    let tasks = state
        .tasks
        .values()
        .filter(|t| task_matches(state, t, filters));
    group_tasks(state, tasks)
}

fn task_matches(state: &StoreState, t: &mesh_api::Task, filters: &mesh_api::Filters) -> bool {
    filters.is_empty()
        || mesh_api::filter::task(
            filters,
            t,
            state.nodes.get(&t.node_id).map(|n| n.hostname.as_str()),
            state.services.get(&t.service_id),
        )
}

fn group_tasks<'a>(
    state: &StoreState,
    tasks: impl Iterator<Item = &'a mesh_api::Task>,
) -> Vec<(TaskSummary, u64)> {
    let mut by_slot: BTreeMap<(String, String, u64, String), Vec<&mesh_api::Task>> =
        BTreeMap::new();
    for t in tasks {
        let key = if t.slot > 0 {
            (
                t.service_name.clone(),
                t.service_id.clone(),
                t.slot,
                String::new(),
            )
        } else {
            (
                t.service_name.clone(),
                t.service_id.clone(),
                0,
                t.node_id.clone(),
            )
        };
        by_slot.entry(key).or_default().push(t);
    }
    let node_name = |id: &str| {
        state
            .nodes
            .get(id)
            .map(|n| n.hostname.clone())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for (_, mut tasks) in by_slot {
        // Newest first; a slot's later tasks never run an older version (a start-first
        // update can stop the old task after its replacement was created, in the same second).
        tasks.sort_by(|a, b| {
            (b.version, b.created_at, b.status.timestamp_ms).cmp(&(
                a.version,
                a.created_at,
                a.status.timestamp_ms,
            ))
        });
        for (i, t) in tasks.into_iter().enumerate() {
            let desired = if t.desired_state <= TaskState::Running && t.status.state.is_terminal() {
                TaskState::Shutdown
            } else {
                t.desired_state
            };
            out.push((
                TaskSummary {
                    id: t.id.clone(),
                    name: t.short_name(),
                    node: node_name(&t.node_id),
                    desired_state: desired.to_string(),
                    current_state: t.status.state.to_string(),
                    error: t.status.err.clone(),
                    is_history: i > 0,
                    image: mesh_api::familiar_image(&t.spec.image),
                },
                t.status.timestamp_ms,
            ));
        }
    }
    out
}

/// A service's `UpdateStatus` as Docker shows it (`CompletedAt` once the update or rollback has
/// ended).
fn update_status(svc: &Service, u: &UpdateStatus) -> Value {
    let mut v = json!({
        "State": u.state,
        "StartedAt": mesh_api::human::rfc3339(u.started_at),
        "Message": u.message,
    });
    if matches!(
        u.state,
        UpdateState::Completed | UpdateState::RollbackCompleted
    ) {
        v["CompletedAt"] = json!(mesh_api::human::rfc3339(svc.updated_at.max(u.started_at)));
    }
    v
}

/// `service inspect`, in Docker's shape.
pub fn inspect(state: &StoreState, svc: &Service) -> Value {
    let (running, desired) = replica_counts(state, svc);
    json!({
        "ID": svc.id,
        "Version": { "Index": svc.version },
        "CreatedAt": mesh_api::human::rfc3339(svc.created_at),
        "UpdatedAt": mesh_api::human::rfc3339(svc.updated_at),
        "Spec": svc.spec,
        "PreviousSpec": svc.previous_spec,
        "UpdateStatus": svc.update_status.as_ref().map(|u| update_status(svc, u)),
        "Endpoint": {
            "Spec": { "Mode": svc.spec.endpoint_mode },
            "Ports": svc.spec.ports.iter().map(|p| json!({
                "Protocol": p.protocol,
                "TargetPort": p.target,
                "PublishedPort": p.published,
                "PublishMode": p.mode,
            })).collect::<Vec<_>>(),
            "VirtualIPs": svc.vips.iter().map(|v| json!({ "NetworkID": v.network_id, "Addr": v.addr })).collect::<Vec<_>>(),
        },
        "ServiceStatus": { "RunningTasks": running, "DesiredTasks": desired },
    })
}

pub fn conflict(name: &str) -> ApiError {
    ApiError::new(
        ErrorKind::AlreadyExists,
        format!("service {name} already exists"),
    )
}

#[cfg(test)]
#[allow(clippy::field_reassign_with_default)]
mod tests {
    use super::*;

    fn health(test: &[&str], interval_ms: u64, retries: u64) -> mesh_api::HealthConfig {
        mesh_api::HealthConfig {
            test: test.iter().map(|s| s.to_string()).collect(),
            interval_ms,
            retries,
            ..Default::default()
        }
    }

    #[test]
    fn bad_tests_are_refused() {
        assert!(validate_health(&health(&["CMD-SHELL", "true"], 0, 0)).is_ok());
        assert!(validate_health(&health(&["CMD", "true"], 0, 0)).is_ok());
        assert!(validate_health(&health(&["NONE"], 0, 0)).is_ok());
        assert!(validate_health(&health(&[], 1, 0)).is_ok());
        assert!(validate_health(&health(&["CMD"], 0, 0)).is_err());
        assert!(validate_health(&health(&["CMD-SHELL", "a", "b"], 0, 0)).is_err());
        assert_eq!(
            validate_health(&health(&["SHELL", "x"], 0, 0)).unwrap_err(),
            "unknown healthcheck type: \"SHELL\""
        );
    }

    fn spec() -> ServiceSpec {
        ServiceSpec {
            name: "web".into(),
            mode: ServiceMode::Replicated { replicas: 2 },
            command: vec!["sleep".into(), "1000".into()],
            env: vec!["A=1".into()],
            networks: vec![],
            ports: vec![],
            endpoint_mode: Default::default(),
            constraints: vec![],
            restart: Default::default(),
            update: Default::default(),
            rollback: Default::default(),
            resources: Default::default(),
            labels: Default::default(),
            ..Default::default()
        }
    }

    #[test]
    fn published_ports_are_assigned_and_never_shared() {
        let port = |spec: &str| mesh_api::PortConfig::parse(spec).unwrap();
        let mut st = StoreState::default();
        let mut a = spec();
        a.ports = vec![port(":80"), port("8080:81"), port(":53/udp")];
        allocate_ports(&st, &mut a, None).unwrap();
        let got: Vec<u16> = a.ports.iter().map(|p| p.published).collect();
        assert_eq!(got, vec![30000, 8080, 30000]);
        st.services.insert(
            "s1".into(),
            Service {
                id: "s1".into(),
                spec: a.clone(),
                previous_spec: None,
                version: 1,
                created_at: 0,
                updated_at: 0,
                update_status: None,
                vips: vec![],
                registry_auth: Vec::new(),
            },
        );
        // The service keeps its own ports on update; another one cannot take them.
        allocate_ports(&st, &mut a.clone(), Some("s1")).unwrap();
        let mut b = spec();
        b.name = "b".into();
        b.ports = vec![port("mode=host,8080:80")];
        let e = allocate_ports(&st, &mut b, None).unwrap_err();
        assert!(
            e.message
                .contains("port 8080/tcp is already in use by service web"),
            "{e:?}"
        );
        b.ports = vec![port(":80"), port(":80")];
        allocate_ports(&st, &mut b, None).unwrap();
        let got: Vec<u16> = b.ports.iter().map(|p| p.published).collect();
        assert_eq!(got, vec![30001, 30002]);
        b.ports = vec![port("9000:80"), port("9000:81")];
        assert!(validate_spec(&b, &st).is_err());
    }

    #[test]
    fn image_specs_are_checked() {
        let st = StoreState::default();
        let mut s = spec();
        s.image = "docker.io/library/busybox:latest".into();
        s.command = vec![];
        validate_spec(&s, &st).unwrap();
        s.mounts = vec![mesh_api::Mount::parse("type=tmpfs,target=/run").unwrap()];
        s.workdir = "/srv".into();
        validate_spec(&s, &st).unwrap();
        let mut dup = s.clone();
        dup.mounts
            .push(mesh_api::Mount::parse("type=volume,source=v,target=/run").unwrap());
        let e = validate_spec(&dup, &st).unwrap_err();
        assert_eq!(e.message, "Duplicate mount point: /run");
        let mut rel = s.clone();
        rel.workdir = "srv".into();
        assert!(validate_spec(&rel, &st)
            .unwrap_err()
            .message
            .contains("absolute path"));
        let mut host = spec();
        host.user = "nobody".into();
        assert!(validate_spec(&host, &st)
            .unwrap_err()
            .message
            .contains("need an image"));
        // An image can replace an image; a host command cannot become one by update.
        let u = ServiceUpdate {
            image: Some("docker.io/library/busybox:1.36".into()),
            ..Default::default()
        };
        assert_eq!(
            apply_update(&s, &u).unwrap().image,
            "docker.io/library/busybox:1.36"
        );
        assert!(apply_update(&spec(), &u).is_err());
    }

    #[test]
    fn names_are_dns_labels() {
        assert!(validate_name("web-1").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("-x").is_err());
        assert!(validate_name("a.b").is_err());
        assert!(validate_name(&"x".repeat(64)).is_err());
    }

    #[test]
    fn bad_specs_are_refused_with_clear_errors() {
        let st = StoreState::default();
        let mut s = spec();
        s.command = vec![];
        assert!(validate_spec(&s, &st)
            .unwrap_err()
            .message
            .contains("command is empty"));
        let mut s = spec();
        s.constraints = vec!["node.colour==red".into()];
        assert!(validate_spec(&s, &st)
            .unwrap_err()
            .message
            .contains("unknown key"));
        let mut s = spec();
        s.constraints = vec!["node.role=manager".into()];
        assert!(validate_spec(&s, &st).is_err());
        let mut s = spec();
        s.env = vec!["NOVALUE".into()];
        assert!(validate_spec(&s, &st)
            .unwrap_err()
            .message
            .contains("KEY=VALUE"));
        let mut s = spec();
        s.networks = vec!["appnet".into()];
        let mut st2 = StoreState::default();
        st2.cluster = Some(crate::state::test_cluster());
        assert_eq!(
            validate_spec(&s, &st2).unwrap_err().message,
            "no such network: appnet"
        );
    }

    #[test]
    fn scale_is_not_a_rollout_but_a_command_change_is() {
        let a = spec();
        let mut b = spec();
        b.mode = ServiceMode::Replicated { replicas: 5 };
        assert!(!needs_rollout(&a, &b));
        b.command = vec!["sleep".into(), "5".into()];
        assert!(needs_rollout(&a, &b));
        let mut c = spec();
        c.update.parallelism = 3;
        assert!(!needs_rollout(&a, &c));
        c.update.order = mesh_api::UpdateOrder::StartFirst;
        c.rollback.order = mesh_api::UpdateOrder::StartFirst;
        assert!(!needs_rollout(&a, &c));
    }

    #[test]
    fn update_sets_the_orders_and_keeps_them_otherwise() {
        use mesh_api::UpdateOrder;
        let u = ServiceUpdate {
            update_order: Some(UpdateOrder::StartFirst),
            ..Default::default()
        };
        let s = apply_update(&spec(), &u).unwrap();
        assert_eq!(
            (s.update.order, s.rollback.order),
            (UpdateOrder::StartFirst, UpdateOrder::StopFirst)
        );
        let u = ServiceUpdate {
            rollback_order: Some(UpdateOrder::StartFirst),
            env_add: vec!["B=1".into()],
            ..Default::default()
        };
        let s = apply_update(&s, &u).unwrap();
        assert_eq!(
            (s.update.order, s.rollback.order),
            (UpdateOrder::StartFirst, UpdateOrder::StartFirst)
        );
        // Inspect shows both, in Docker's words.
        let st = StoreState::default();
        let svc = Service {
            id: "s1".into(),
            spec: s,
            previous_spec: None,
            version: 1,
            created_at: 0,
            updated_at: 0,
            update_status: None,
            registry_auth: Vec::new(),
            vips: vec![],
        };
        let v = inspect(&st, &svc);
        assert_eq!(v["Spec"]["update"]["order"], "start-first");
        assert_eq!(v["Spec"]["rollback"]["order"], "start-first");
        assert_eq!(v["CreatedAt"], "1970-01-01T00:00:00.000000000Z");
        assert!(v["UpdateStatus"].is_null());
    }

    #[test]
    fn inspect_shows_the_update_status_in_dockers_words() {
        let mut svc = Service {
            id: "s1".into(),
            spec: spec(),
            previous_spec: None,
            version: 2,
            created_at: 60,
            updated_at: 125,
            update_status: Some(UpdateStatus {
                state: UpdateState::Updating,
                started_at: 120,
                message: "update in progress".into(),
            }),
            registry_auth: Vec::new(),
            vips: vec![],
        };
        let st = StoreState::default();
        let v = inspect(&st, &svc);
        assert_eq!(v["UpdatedAt"], "1970-01-01T00:02:05.000000000Z");
        let u = &v["UpdateStatus"];
        assert_eq!(u["State"], "updating");
        assert_eq!(u["StartedAt"], "1970-01-01T00:02:00.000000000Z");
        assert_eq!(u["Message"], "update in progress");
        assert!(u.get("CompletedAt").is_none(), "{u}");
        svc.update_status = Some(UpdateStatus {
            state: UpdateState::Completed,
            started_at: 120,
            message: "update completed".into(),
        });
        let v = inspect(&st, &svc);
        assert_eq!(v["UpdateStatus"]["State"], "completed");
        assert_eq!(
            v["UpdateStatus"]["CompletedAt"],
            "1970-01-01T00:02:05.000000000Z"
        );
    }

    #[test]
    fn update_edits_env_and_constraints() {
        let u = ServiceUpdate {
            env_add: vec!["B=2".into(), "A=9".into()],
            constraint_add: vec!["node.role==worker".into()],
            ..Default::default()
        };
        let s = apply_update(&spec(), &u).unwrap();
        assert_eq!(s.env, vec!["B=2".to_string(), "A=9".to_string()]);
        assert_eq!(s.constraints, vec!["node.role==worker".to_string()]);
        let u = ServiceUpdate {
            env_rm: vec!["A".into()],
            ..Default::default()
        };
        assert!(apply_update(&spec(), &u).unwrap().env.is_empty());
        let mut g = spec();
        g.mode = ServiceMode::Global;
        let u = ServiceUpdate {
            replicas: Some(3),
            ..Default::default()
        };
        assert!(apply_update(&g, &u).is_err());
    }
}
