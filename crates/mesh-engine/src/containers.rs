//! This node's tasks as the Engine API's containers (`docker ps`, `docker inspect`), with
//! Swarm's labels, from the agent's assignments and the runtime's view of their processes.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::convert::{rfc3339, rfc3339_ms};

/// Docker's labels on a task's container: Swarm's, the stack's (the spec's container labels).
pub fn container_labels(t: &mesh_api::LocalTask) -> BTreeMap<String, String> {
    let task = &t.task;
    let mut l = task.spec.container_labels.clone();
    for (k, v) in [
        ("com.docker.swarm.node.id", task.node_id.clone()),
        ("com.docker.swarm.service.id", task.service_id.clone()),
        ("com.docker.swarm.service.name", task.service_name.clone()),
        ("com.docker.swarm.task", String::new()),
        ("com.docker.swarm.task.id", task.id.clone()),
        ("com.docker.swarm.task.name", task.name()),
    ] {
        l.insert(k.to_string(), v);
    }
    l
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn container_networks(t: &mesh_api::LocalTask) -> Value {
    let nets: serde_json::Map<String, Value> = t
        .task
        .networks
        .iter()
        .map(|a| {
            let (ip, len) = (a.addr.ip.to_string(), a.addr.prefix);
            (
                a.network_name.clone(),
                json!({
                    "IPAMConfig": {"IPv4Address": ip},
                    "Links": null,
                    "Aliases": null,
                    "NetworkID": a.network_id,
                    "EndpointID": "",
                    "Gateway": "",
                    "IPAddress": ip,
                    "IPPrefixLen": len,
                    "IPv6Gateway": "",
                    "GlobalIPv6Address": "",
                    "GlobalIPv6PrefixLen": 0,
                    "MacAddress": "",
                    "DriverOpts": null,
                }),
            )
        })
        .collect();
    Value::Object(nets)
}

fn container_argv(t: &mesh_api::LocalTask) -> (Vec<String>, Vec<String>) {
    let s = &t.task.spec;
    if s.image.is_empty() {
        (Vec::new(), s.command.clone())
    } else {
        (s.entrypoint.clone(), s.command.clone())
    }
}

fn container_status(t: &mesh_api::LocalTask) -> String {
    let now = now_ms();
    if t.running {
        format!(
            "Up {}",
            mesh_api::human_duration(now.saturating_sub(t.started_at_ms) / 1000)
        )
    } else {
        format!(
            "Exited ({}) {} ago",
            t.exit_code.unwrap_or(0),
            mesh_api::human_duration(now.saturating_sub(t.finished_at_ms) / 1000)
        )
    }
}

/// One row of `GET /containers/json`.
pub fn container_summary(t: &mesh_api::LocalTask) -> Value {
    let (entry, args) = container_argv(t);
    let command = entry
        .iter()
        .chain(args.iter())
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    json!({
        "Id": t.task.id,
        "Names": [format!("/{}", t.task.name())],
        "Image": t.task.spec.image,
        "ImageID": "",
        "Command": command,
        "Created": t.started_at_ms.max(t.task.created_at * 1000) / 1000,
        "Ports": [],
        "Labels": container_labels(t),
        "State": if t.running { "running" } else { "exited" },
        "Status": container_status(t),
        "HostConfig": {"NetworkMode": "default"},
        "NetworkSettings": {"Networks": container_networks(t)},
        "Mounts": [],
    })
}

/// `GET /containers/{id}/json`.
pub fn container_inspect(t: &mesh_api::LocalTask) -> Value {
    let (entry, args) = container_argv(t);
    let s = &t.task.spec;
    let (path, rest) = match entry.iter().chain(args.iter()).cloned().collect::<Vec<_>>() {
        v if v.is_empty() => (String::new(), Vec::new()),
        v => (v[0].clone(), v[1..].to_vec()),
    };
    let at = |ms: u64| {
        if ms == 0 {
            "0001-01-01T00:00:00Z".to_string()
        } else {
            rfc3339_ms(ms)
        }
    };
    json!({
        "Id": t.task.id,
        "Created": rfc3339(t.task.created_at),
        "Path": path,
        "Args": rest,
        "State": {
            "Status": if t.running { "running" } else { "exited" },
            "Running": t.running,
            "Paused": false,
            "Restarting": false,
            "OOMKilled": false,
            "Dead": false,
            "Pid": t.pid.unwrap_or(0),
            "ExitCode": t.exit_code.unwrap_or(0),
            "Error": t.task.status.err,
            "StartedAt": at(t.started_at_ms),
            "FinishedAt": at(t.finished_at_ms),
        },
        "Image": s.image,
        "Name": format!("/{}", t.task.name()),
        "RestartCount": 0,
        "Driver": "overlay",
        "Platform": "linux",
        "HostConfig": {"NetworkMode": "default", "ReadonlyRootfs": s.read_only, "Init": s.init},
        "Config": {
            "Hostname": if s.hostname.is_empty() { t.task.id.chars().take(12).collect() } else { s.hostname.clone() },
            "User": s.user,
            "Env": s.env,
            "Cmd": args,
            "Entrypoint": if entry.is_empty() { Value::Null } else { json!(entry) },
            "Image": s.image,
            "WorkingDir": s.workdir,
            "Labels": container_labels(t),
            "StopSignal": s.stop_signal,
            "Tty": false,
            "OpenStdin": false,
        },
        "NetworkSettings": {"Networks": container_networks(t)},
        "Mounts": [],
        "Node": {"ID": t.task.node_id, "Name": t.node_name},
    })
}
