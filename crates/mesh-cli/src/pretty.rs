//! `service inspect --pretty` and `node inspect --pretty`: the human layout of Docker's CLI
//! (`ID:`, `Name:`, `Service Mode:`, ...), with only the sections whose data mesh has.

use std::fmt::Write as _;

use mesh_api::{Node, ServiceMode, ServiceSpec};
use serde::Serialize;
use serde_json::Value;

use crate::Result;

/// Values start at this column, as Docker's tab-aligned layout puts them.
const COLUMN: usize = 16;

/// `key` then `value` at [`COLUMN`] (one space at least).
fn kv(out: &mut String, key: &str, value: impl std::fmt::Display) {
    let pad = COLUMN.saturating_sub(key.len()).max(1);
    let _ = writeln!(out, "{key}{:pad$}{value}", "");
}

/// An enum's wire word (`on-failure`, `vip`, ...).
fn word(v: impl Serialize) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Go's `time.Duration` text: `500ms`, `5s`, `1m30s`, `1h0m0s`.
pub fn go_duration(ms: u64) -> String {
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m) = (ms / 3_600_000, ms / 60_000 % 60);
    let mut s = format!("{}", ms / 1000 % 60);
    if !ms.is_multiple_of(1000) {
        let frac = format!("{:03}", ms % 1000);
        s = format!("{s}.{}", frac.trim_end_matches('0'));
    }
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// Bytes as Docker's `units.BytesSize`: `64MiB`, `1.5GiB`.
fn bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}{}", units[i])
}

/// Docker's `Joined at` form: `2009-11-10 23:00:00 +0000 utc`.
fn joined_at(secs: u64) -> String {
    let t = mesh_api::human::rfc3339(secs);
    let (date, time) = t.split_once('T').unwrap_or((&t, ""));
    let time = time.split('.').next().unwrap_or("");
    format!("{date} {time} +0000 utc")
}

/// `service inspect --pretty` of one `ServiceInspect` answer.
pub fn service(v: &Value) -> Result<String> {
    let spec: ServiceSpec = serde_json::from_value(v["Spec"].clone())?;
    let mut out = String::new();
    kv(&mut out, "ID:", v["ID"].as_str().unwrap_or(""));
    kv(&mut out, "Name:", &spec.name);
    if !spec.labels.is_empty() {
        out.push_str("Labels:\n");
        for (k, v) in &spec.labels {
            let eq = if v.is_empty() { "" } else { "=" };
            let _ = writeln!(out, " - {k}{eq}{v}");
        }
    }
    match spec.mode {
        ServiceMode::Global => kv(&mut out, "Service Mode:", "Global"),
        ServiceMode::Replicated { replicas } => {
            kv(&mut out, "Service Mode:", "Replicated");
            kv(&mut out, " Replicas:", replicas);
        }
    }
    if let Some(state) = v["UpdateStatus"]["State"].as_str() {
        out.push_str("UpdateStatus:\n");
        kv(&mut out, " State:", state);
        let msg = v["UpdateStatus"]["Message"].as_str().unwrap_or("");
        kv(&mut out, " Message:", msg);
    }
    out.push_str("Placement:\n");
    if !spec.constraints.is_empty() {
        kv(&mut out, " Constraints:", format!("{:?}", spec.constraints));
    }
    let u = &spec.update;
    out.push_str("UpdateConfig:\n");
    kv(&mut out, " Parallelism:", u.parallelism);
    if u.delay_ms > 0 {
        kv(&mut out, " Delay:", go_duration(u.delay_ms));
    }
    kv(&mut out, " On failure:", word(u.failure_action));
    kv(&mut out, " Monitoring Period:", go_duration(u.monitor_ms));
    kv(&mut out, " Update order:", u.order);
    out.push_str("RollbackConfig:\n");
    kv(&mut out, " Rollback order:", spec.rollback.order);
    out.push_str("RestartPolicy:\n");
    kv(&mut out, " Condition:", word(spec.restart.condition));
    kv(&mut out, " Delay:", go_duration(spec.restart.delay_ms));
    kv(&mut out, " Max attempts:", spec.restart.max_attempts);
    out.push_str("ContainerSpec:\n");
    if spec.image.is_empty() {
        kv(&mut out, " Command:", spec.command.join(" "));
    } else {
        kv(&mut out, " Image:", &spec.image);
        if !spec.entrypoint.is_empty() {
            kv(&mut out, " Entrypoint:", spec.entrypoint.join(" "));
        }
        if !spec.command.is_empty() {
            kv(&mut out, " Args:", spec.command.join(" "));
        }
    }
    if !spec.env.is_empty() {
        kv(&mut out, " Env:", spec.env.join(" "));
    }
    if !spec.workdir.is_empty() {
        kv(&mut out, " Dir:", &spec.workdir);
    }
    if spec.init {
        kv(&mut out, " Init:", "true");
    }
    if !spec.user.is_empty() {
        kv(&mut out, " User:", &spec.user);
    }
    if !spec.mounts.is_empty() {
        out.push_str("Mounts:\n");
        for m in &spec.mounts {
            kv(&mut out, " Target:", &m.target);
            kv(&mut out, "  Source:", &m.source);
            kv(&mut out, "  ReadOnly:", m.readonly);
            kv(&mut out, "  Type:", word(m.kind));
        }
    }
    for (title, refs) in [("Configs:", &spec.configs), ("Secrets:", &spec.secrets)] {
        if !refs.is_empty() {
            let _ = writeln!(out, "{title}");
            for r in refs {
                kv(&mut out, " Target:", &r.target);
                kv(&mut out, "  Source:", &r.source);
            }
        }
    }
    let r = &spec.resources;
    if r.nano_cpus > 0 || r.memory_bytes > 0 {
        out.push_str("Resources:\n Limits:\n");
        if r.nano_cpus > 0 {
            kv(&mut out, "  CPU:", r.nano_cpus as f64 / 1e9);
        }
        if r.memory_bytes > 0 {
            kv(&mut out, "  Memory:", bytes(r.memory_bytes));
        }
    }
    if !spec.networks.is_empty() {
        kv(&mut out, "Networks:", spec.networks.join(" "));
    }
    kv(&mut out, "Endpoint Mode:", word(spec.endpoint_mode));
    if !spec.ports.is_empty() {
        out.push_str("Ports:\n");
        for p in &spec.ports {
            let _ = writeln!(out, " PublishedPort = {}", p.published);
            let _ = writeln!(out, "  Protocol = {}", p.protocol);
            let _ = writeln!(out, "  TargetPort = {}", p.target);
            let _ = writeln!(out, "  PublishMode = {}", word(p.mode));
        }
    }
    if let Some(h) = spec.healthcheck.as_ref().filter(|h| !h.test.is_empty()) {
        out.push_str(" Healthcheck:\n");
        let _ = writeln!(out, "  Interval = {}", go_duration(h.interval_ms));
        let _ = writeln!(out, "  Retries = {}", h.retries);
        let _ = writeln!(out, "  StartPeriod = {}", go_duration(h.start_period_ms));
        let _ = writeln!(out, "  Timeout = {}", go_duration(h.timeout_ms));
        out.push_str("  Tests:\n");
        for t in &h.test {
            let _ = writeln!(out, "\t Test = {t}");
        }
    }
    Ok(out)
}

/// `node inspect --pretty` of one `NodeInspect` answer.
pub fn node(v: &Value) -> Result<String> {
    let n: Node = serde_json::from_value(v.clone())?;
    let manager_status = v["manager_status"].as_str().unwrap_or("");
    let mut out = String::new();
    let wide = |out: &mut String, k: &str, val: &dyn std::fmt::Display| {
        let pad = 24usize.saturating_sub(k.len()).max(1);
        let _ = writeln!(out, "{k}{:pad$}{val}", "");
    };
    wide(&mut out, "ID:", &n.id);
    if !n.labels.is_empty() {
        out.push_str("Labels:\n");
        for (k, v) in &n.labels {
            let eq = if v.is_empty() { "" } else { "=" };
            let _ = writeln!(out, " - {k}{eq}{v}");
        }
    }
    wide(&mut out, "Hostname:", &n.hostname);
    wide(&mut out, "Joined at:", &joined_at(n.created_at));
    out.push_str("Status:\n");
    wide(&mut out, " State:", &n.state);
    wide(&mut out, " Availability:", &n.availability);
    let host = n
        .addr
        .rsplit_once(':')
        .map_or(n.addr.as_str(), |(h, _)| h)
        .to_string();
    if !host.is_empty() {
        wide(&mut out, " Address:", &host);
    }
    if n.role == mesh_api::NodeRole::Manager {
        out.push_str("Manager Status:\n");
        wide(&mut out, " Address:", &n.addr);
        let reach = if manager_status == "Unreachable" {
            "Unreachable"
        } else {
            "Reachable"
        };
        wide(&mut out, " Raft Status:", &reach);
        let leader = if manager_status == "Leader" {
            "Yes"
        } else {
            "No"
        };
        wide(&mut out, " Leader:", &leader);
    }
    out.push_str("Platform:\n");
    wide(&mut out, " Operating System:", &std::env::consts::OS);
    wide(&mut out, " Architecture:", &std::env::consts::ARCH);
    let r = &n.resources;
    if r.nano_cpus > 0 || r.memory_bytes > 0 {
        out.push_str("Resources:\n");
        wide(&mut out, " CPUs:", &(r.nano_cpus / 1_000_000_000));
        wide(&mut out, " Memory:", &bytes(r.memory_bytes));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn durations_and_sizes_as_go_prints_them() {
        assert_eq!(go_duration(0), "0s");
        assert_eq!(go_duration(500), "500ms");
        assert_eq!(go_duration(5000), "5s");
        assert_eq!(go_duration(1500), "1.5s");
        assert_eq!(go_duration(90_000), "1m30s");
        assert_eq!(go_duration(3_600_000), "1h0m0s");
        assert_eq!(bytes(64 << 20), "64MiB");
        assert_eq!(bytes(1536 << 20), "1.5GiB");
        assert_eq!(joined_at(0), "1970-01-01 00:00:00 +0000 utc");
    }

    #[test]
    fn a_service_in_docker_s_layout() {
        let mut spec = ServiceSpec {
            name: "web".into(),
            mode: ServiceMode::Replicated { replicas: 3 },
            image: "nginx:alpine".into(),
            ..Default::default()
        };
        spec.labels.insert("tier".into(), "front".into());
        spec.ports = vec![mesh_api::PortConfig::parse("8080:80").unwrap()];
        spec.networks = vec!["app".into()];
        let text = service(&json!({"ID": "abc", "Spec": spec})).unwrap();
        for line in [
            "ID:             abc",
            "Name:           web",
            " - tier=front",
            "Service Mode:   Replicated",
            " Replicas:      3",
            "UpdateConfig:",
            " Update order:  stop-first",
            "ContainerSpec:",
            " Image:         nginx:alpine",
            "Networks:       app",
            "Endpoint Mode:  vip",
            " PublishedPort = 8080",
            "  TargetPort = 80",
            "  PublishMode = ingress",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
    }
}
