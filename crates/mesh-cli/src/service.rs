//! `mesh service ...` and `mesh exec`: flags as Docker's, specs built here and validated again
//! by the leader, and progress shown until the tasks converge (unless `--detach`).

use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use mesh_api::{
    EndpointMode, FailureAction, Request, Resources, RestartCondition, RestartPolicy,
    RollbackConfig, ServiceMode, ServiceSpec, ServiceUpdate, UpdateConfig, UpdateOrder,
};
use serde_json::{json, Value};

use crate::client::Client;
use crate::{table, Failure, Format, Result};

#[derive(Subcommand, Debug)]
pub enum ServiceCmd {
    /// Create a service.
    Create(CreateArgs),
    /// List services.
    #[command(alias = "list")]
    Ls(crate::FormatArg),
    /// List the tasks of a service, with their history.
    Ps {
        #[arg(long, default_value = "table")]
        format: Format,
        service: String,
    },
    /// Show a service in detail (JSON).
    Inspect {
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Scale replicated services: `mesh service scale web=5 api=2`.
    Scale {
        #[arg(short, long)]
        detach: bool,
        #[arg(required = true)]
        pairs: Vec<String>,
    },
    /// Update a service (rolling update).
    Update(UpdateArgs),
    /// Go back to the previous spec.
    Rollback {
        #[arg(short, long)]
        detach: bool,
        service: String,
    },
    /// Remove services.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Show the output of a service's tasks.
    Logs { service: String },
}

/// Restart, update and resource flags, shared by `create` and `update`.
#[derive(Args, Debug)]
pub struct PolicyArgs {
    #[arg(long)]
    restart_condition: Option<String>,
    #[arg(long)]
    restart_delay: Option<String>,
    #[arg(long, allow_negative_numbers = true)]
    restart_max_attempts: Option<i64>,
    #[arg(long, allow_negative_numbers = true)]
    update_parallelism: Option<i64>,
    #[arg(long)]
    update_delay: Option<String>,
    #[arg(long)]
    update_failure_action: Option<String>,
    #[arg(long)]
    update_monitor: Option<String>,
    /// Update order ("start-first"|"stop-first").
    #[arg(long)]
    update_order: Option<String>,
    /// Rollback order ("start-first"|"stop-first").
    #[arg(long)]
    rollback_order: Option<String>,
    #[arg(long)]
    limit_cpu: Option<String>,
    #[arg(long)]
    limit_memory: Option<String>,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    #[arg(long)]
    name: String,
    #[arg(long, allow_negative_numbers = true)]
    replicas: Option<i64>,
    #[arg(long, default_value = "replicated")]
    mode: String,
    #[arg(long = "network")]
    networks: Vec<String>,
    #[arg(long = "publish", short = 'p')]
    publish: Vec<String>,
    #[arg(long, default_value = "vip")]
    endpoint_mode: String,
    #[arg(long = "constraint")]
    constraints: Vec<String>,
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Return at once instead of waiting for the tasks.
    #[arg(short, long)]
    detach: bool,
    /// The command each task runs.
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    #[arg(long, allow_negative_numbers = true)]
    replicas: Option<i64>,
    #[arg(long = "env-add")]
    env_add: Vec<String>,
    #[arg(long = "env-rm")]
    env_rm: Vec<String>,
    #[arg(long = "constraint-add")]
    constraint_add: Vec<String>,
    #[arg(long = "constraint-rm")]
    constraint_rm: Vec<String>,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Replace the tasks even if nothing changed.
    #[arg(long)]
    force: bool,
    #[arg(short, long)]
    detach: bool,
    service: String,
    /// A new command (`-- COMMAND ARGS`).
    #[arg(last = true)]
    command: Vec<String>,
}

/// `--update-order` / `--rollback-order`, refused as Docker refuses a bad flag value.
fn parse_order(flag: &str, v: Option<&str>) -> Result<Option<UpdateOrder>> {
    v.map(|v| {
        v.parse::<UpdateOrder>()
            .map_err(|e| Failure(format!("invalid argument {v:?} for \"--{flag}\" flag: {e}")))
    })
    .transpose()
}

fn non_negative(what: &str, v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| Failure(format!("invalid {what}: {v} (must be 0 or more)")))
}

/// Go-style durations: `300ms`, `5s`, `1m30s`, `2h`; `0` alone is allowed.
pub fn parse_duration_ms(s: &str) -> Result<u64> {
    let bad = || Failure(format!("invalid duration: {s:?} (e.g. 500ms, 5s, 1m)"));
    if s == "0" {
        return Ok(0);
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_len == 0 {
            return Err(bad());
        }
        let n: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_len] {
            "ns" => 1e-6,
            "us" | "µs" => 1e-3,
            "ms" => 1.0,
            "s" => 1e3,
            "m" => 60e3,
            "h" => 3600e3,
            _ => return Err(bad()),
        };
        total += n * mult;
        rest = &rest[unit_len..];
    }
    Ok(total.round() as u64)
}

/// Bytes with an optional unit: `512m`, `1g`, `64k`, `1048576`.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let bad = || Failure(format!("invalid memory size: {s:?} (e.g. 64m, 1g)"));
    let lower = s.trim().to_ascii_lowercase();
    let lower = lower
        .strip_suffix('b')
        .filter(|r| !r.is_empty() && r.ends_with(|c: char| c.is_ascii_alphabetic()))
        .map(str::to_string)
        .unwrap_or(lower);
    let (num, mult) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 1u64 << 10),
        Some('m') => (&lower[..lower.len() - 1], 1 << 20),
        Some('g') => (&lower[..lower.len() - 1], 1 << 30),
        Some('b') => (&lower[..lower.len() - 1], 1),
        Some(c) if c.is_ascii_digit() => (lower.as_str(), 1),
        _ => return Err(bad()),
    };
    let n: f64 = num.parse().map_err(|_| bad())?;
    if n < 0.0 || !n.is_finite() {
        return Err(bad());
    }
    Ok((n * mult as f64) as u64)
}

pub fn parse_cpus(s: &str) -> Result<u64> {
    let n: f64 = s
        .parse()
        .map_err(|_| Failure(format!("invalid CPU limit: {s:?} (e.g. 0.5)")))?;
    if n < 0.0 || !n.is_finite() {
        return Err(Failure(format!("invalid CPU limit: {s:?} (e.g. 0.5)")));
    }
    Ok((n * 1e9) as u64)
}

fn create_spec(a: &CreateArgs) -> Result<ServiceSpec> {
    let mode = match a.mode.as_str() {
        "replicated" => ServiceMode::Replicated {
            replicas: non_negative("replicas", a.replicas.unwrap_or(1))?,
        },
        "global" => {
            if a.replicas.is_some() {
                return Err(Failure(
                    "replicas can only be used with replicated mode".into(),
                ));
            }
            ServiceMode::Global
        }
        m => {
            return Err(Failure(format!(
                "invalid mode: {m} (expected replicated or global)"
            )))
        }
    };
    if a.command.is_empty() {
        return Err(Failure(
            "a command is needed: mesh service create --name NAME -- COMMAND [ARG...]".into(),
        ));
    }
    let endpoint_mode = match a.endpoint_mode.as_str() {
        "vip" => EndpointMode::Vip,
        "dnsrr" => EndpointMode::Dnsrr,
        m => {
            return Err(Failure(format!(
                "invalid endpoint mode: {m} (expected vip or dnsrr)"
            )))
        }
    };
    let ports = a
        .publish
        .iter()
        .map(|p| mesh_api::PortConfig::parse(p).map_err(Failure))
        .collect::<Result<Vec<_>>>()?;
    let mut restart = RestartPolicy::default();
    if let Some(c) = &a.policy.restart_condition {
        restart.condition = c.parse::<RestartCondition>()?;
    }
    if let Some(d) = &a.policy.restart_delay {
        restart.delay_ms = parse_duration_ms(d)?;
    }
    if let Some(m) = a.policy.restart_max_attempts {
        restart.max_attempts = non_negative("restart max attempts", m)?;
    }
    let mut update = UpdateConfig::default();
    if let Some(p) = a.policy.update_parallelism {
        update.parallelism = non_negative("update parallelism", p)?;
    }
    if let Some(d) = &a.policy.update_delay {
        update.delay_ms = parse_duration_ms(d)?;
    }
    if let Some(f) = &a.policy.update_failure_action {
        update.failure_action = f.parse::<FailureAction>()?;
    }
    if let Some(m) = &a.policy.update_monitor {
        update.monitor_ms = parse_duration_ms(m)?;
    }
    if let Some(o) = parse_order("update-order", a.policy.update_order.as_deref())? {
        update.order = o;
    }
    let mut rollback = RollbackConfig::default();
    if let Some(o) = parse_order("rollback-order", a.policy.rollback_order.as_deref())? {
        rollback.order = o;
    }
    let resources = Resources {
        nano_cpus: a
            .policy
            .limit_cpu
            .as_deref()
            .map(parse_cpus)
            .transpose()?
            .unwrap_or(0),
        memory_bytes: a
            .policy
            .limit_memory
            .as_deref()
            .map(parse_bytes)
            .transpose()?
            .unwrap_or(0),
    };
    Ok(ServiceSpec {
        name: a.name.clone(),
        mode,
        command: a.command.clone(),
        env: a.env.clone(),
        networks: a.networks.clone(),
        ports,
        endpoint_mode,
        constraints: a.constraints.clone(),
        restart,
        update,
        rollback,
        resources,
        labels: Default::default(),
    })
}

fn update_of(a: &UpdateArgs) -> Result<ServiceUpdate> {
    Ok(ServiceUpdate {
        replicas: a
            .replicas
            .map(|r| non_negative("replicas", r))
            .transpose()?,
        command: (!a.command.is_empty()).then(|| a.command.clone()),
        env_add: a.env_add.clone(),
        env_rm: a.env_rm.clone(),
        constraint_add: a.constraint_add.clone(),
        constraint_rm: a.constraint_rm.clone(),
        restart_condition: a
            .policy
            .restart_condition
            .as_deref()
            .map(str::parse)
            .transpose()?,
        restart_delay_ms: a
            .policy
            .restart_delay
            .as_deref()
            .map(parse_duration_ms)
            .transpose()?,
        restart_max_attempts: a
            .policy
            .restart_max_attempts
            .map(|m| non_negative("restart max attempts", m))
            .transpose()?,
        update_parallelism: a
            .policy
            .update_parallelism
            .map(|p| non_negative("update parallelism", p))
            .transpose()?,
        update_delay_ms: a
            .policy
            .update_delay
            .as_deref()
            .map(parse_duration_ms)
            .transpose()?,
        update_failure_action: a
            .policy
            .update_failure_action
            .as_deref()
            .map(str::parse)
            .transpose()?,
        update_monitor_ms: a
            .policy
            .update_monitor
            .as_deref()
            .map(parse_duration_ms)
            .transpose()?,
        update_order: parse_order("update-order", a.policy.update_order.as_deref())?,
        rollback_order: parse_order("rollback-order", a.policy.rollback_order.as_deref())?,
        nano_cpus: a.policy.limit_cpu.as_deref().map(parse_cpus).transpose()?,
        memory_bytes: a
            .policy
            .limit_memory
            .as_deref()
            .map(parse_bytes)
            .transpose()?,
        force: a.force,
    })
}

/// "5 seconds ago", as Docker prints ages.
fn ago(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => "Less than a second ago".into(),
        1 => "1 second ago".into(),
        2..=59 => format!("{s} seconds ago"),
        60..=119 => "About a minute ago".into(),
        120..=3599 => format!("{} minutes ago", s / 60),
        3600..=7199 => "About an hour ago".into(),
        _ => format!("{} hours ago", s / 3600),
    }
}

/// Waits until the service runs its desired tasks (and a rolling update is done), printing
/// progress lines as they change.
fn converge(c: &Client, service: &str, rollout: bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut last = String::new();
    loop {
        let v = c.call(Request::ServiceInspect {
            service: service.to_string(),
        })?;
        let running = v["ServiceStatus"]["RunningTasks"].as_u64().unwrap_or(0);
        let desired = v["ServiceStatus"]["DesiredTasks"].as_u64().unwrap_or(0);
        let update = v["UpdateStatus"]["State"]
            .as_str()
            .or(v["UpdateStatus"]["state"].as_str())
            .unwrap_or("");
        let line = format!("overall progress: {running} out of {desired} tasks");
        if line != last {
            println!("{line}");
            last = line;
        }
        let msg = v["UpdateStatus"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        match update {
            "paused" | "rollback_paused" => return Err(Failure(format!("update paused: {msg}"))),
            "rollback_completed" if rollout => {
                return Err(Failure(format!("rollback: update rolled back: {msg}")));
            }
            _ => {}
        }
        let update_done = !rollout || matches!(update, "completed" | "rollback_completed" | "");
        if running == desired && update_done {
            println!("verify: Service converged");
            return Ok(());
        }
        if Instant::now() > deadline {
            let ps = c.call(Request::ServicePs {
                service: service.to_string(),
            })?;
            let errs: Vec<String> = ps
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|t| {
                            t["error"]
                                .as_str()
                                .filter(|e| !e.is_empty())
                                .map(str::to_string)
                        })
                        .collect()
                })
                .unwrap_or_default();
            return Err(Failure(format!(
                "service {service} did not converge within 180s{}",
                errs.first().map(|e| format!(": {e}")).unwrap_or_default()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn run(c: &Client, cmd: ServiceCmd) -> Result<()> {
    match cmd {
        ServiceCmd::Create(a) => {
            let spec = create_spec(&a)?;
            let v = c.call(Request::ServiceCreate { spec })?;
            let id = v["id"].as_str().unwrap_or("").to_string();
            println!("{id}");
            if !a.detach {
                converge(c, &id, false)?;
            }
        }
        ServiceCmd::Ls(f) => {
            let v = c.call(Request::ServiceLs)?;
            let rows = v.as_array().cloned().unwrap_or_default();
            let s = |r: &Value, k: &str| r[k].as_str().unwrap_or("").to_string();
            let replicas = |r: &Value| {
                format!(
                    "{}/{}",
                    r["running"].as_u64().unwrap_or(0),
                    r["desired"].as_u64().unwrap_or(0)
                )
            };
            if f.format == Format::Json {
                let out: Vec<Value> = rows
                    .iter()
                    .map(|r| json!({"ID": s(r, "id"), "Name": s(r, "name"), "Mode": s(r, "mode"), "Replicas": replicas(r), "Ports": s(r, "ports")}))
                    .collect();
                println!("{}", serde_json::to_string(&out)?);
            } else {
                let rows = rows
                    .iter()
                    .map(|r| {
                        vec![
                            s(r, "id"),
                            s(r, "name"),
                            s(r, "mode"),
                            replicas(r),
                            s(r, "ports"),
                        ]
                    })
                    .collect();
                table::print(&["ID", "NAME", "MODE", "REPLICAS", "PORTS"], rows);
            }
        }
        ServiceCmd::Ps { format, service } => {
            let v = c.call(Request::ServicePs { service })?;
            let rows = v.as_array().cloned().unwrap_or_default();
            let s = |r: &Value, k: &str| r[k].as_str().unwrap_or("").to_string();
            let current = |r: &Value| {
                format!(
                    "{} {}",
                    s(r, "current_state"),
                    ago(r["age_ms"].as_u64().unwrap_or(0))
                )
            };
            if format == Format::Json {
                let out: Vec<Value> = rows
                    .iter()
                    .map(|r| {
                        json!({"ID": s(r, "id"), "Name": s(r, "name"), "Node": s(r, "node"),
                               "DesiredState": s(r, "desired_state"), "CurrentState": current(r), "Error": s(r, "error")})
                    })
                    .collect();
                println!("{}", serde_json::to_string(&out)?);
            } else {
                let rows = rows
                    .iter()
                    .map(|r| {
                        let name = if r["is_history"].as_bool().unwrap_or(false) {
                            format!(" \\_ {}", s(r, "name"))
                        } else {
                            s(r, "name")
                        };
                        vec![
                            s(r, "id"),
                            name,
                            s(r, "node"),
                            s(r, "desired_state"),
                            current(r),
                            s(r, "error"),
                        ]
                    })
                    .collect();
                table::print(
                    &[
                        "ID",
                        "NAME",
                        "NODE",
                        "DESIRED STATE",
                        "CURRENT STATE",
                        "ERROR",
                    ],
                    rows,
                );
            }
        }
        ServiceCmd::Inspect { services } => {
            let mut out = Vec::new();
            for s in services {
                out.push(c.call(Request::ServiceInspect { service: s })?);
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        ServiceCmd::Scale { detach, pairs } => {
            let mut parsed = Vec::new();
            for p in &pairs {
                let (name, n) = p.split_once('=').ok_or_else(|| {
                    Failure(format!(
                        "invalid scale specifier: {p:?} (expected SERVICE=REPLICAS)"
                    ))
                })?;
                let n: i64 = n
                    .parse()
                    .map_err(|_| Failure(format!("invalid replicas: {n:?}")))?;
                parsed.push((name.to_string(), non_negative("replicas", n)?));
            }
            for (name, n) in parsed {
                c.call(Request::ServiceScale {
                    service: name.clone(),
                    replicas: n,
                })?;
                println!("{name} scaled to {n}");
                if !detach {
                    converge(c, &name, false)?;
                }
            }
        }
        ServiceCmd::Update(a) => {
            let update = update_of(&a)?;
            let v = c.call(Request::ServiceUpdate {
                service: a.service.clone(),
                update,
            })?;
            println!("{}", a.service);
            if !a.detach {
                converge(c, &a.service, v["rollout"].as_bool().unwrap_or(false))?;
            }
        }
        ServiceCmd::Rollback { detach, service } => {
            c.call(Request::ServiceRollback {
                service: service.clone(),
            })?;
            println!("{service}");
            if !detach {
                converge(c, &service, false)?;
            }
        }
        ServiceCmd::Rm { services } => {
            for s in services {
                c.call(Request::ServiceRm { service: s.clone() })?;
                println!("{s}");
            }
        }
        ServiceCmd::Logs { service } => {
            let v = c.call(Request::ServiceLogs {
                service,
                max_bytes: 1 << 20,
            })?;
            for l in v["lines"].as_array().cloned().unwrap_or_default() {
                println!("{}", l.as_str().unwrap_or(""));
            }
        }
    }
    Ok(())
}

/// `mesh exec TASK -- CMD...`: prints the command's output and exits with its status.
pub fn exec(c: &Client, task: String, argv: Vec<String>) -> Result<i32> {
    if argv.is_empty() {
        return Err(Failure(
            "a command is needed: mesh exec TASK -- COMMAND [ARG...]".into(),
        ));
    }
    let v = c.call(Request::Exec { task, argv })?;
    print!("{}", v["stdout"].as_str().unwrap_or(""));
    eprint!("{}", v["stderr"].as_str().unwrap_or(""));
    Ok(v["status"].as_i64().unwrap_or(1) as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("0").unwrap(), 0);
        assert_eq!(parse_duration_ms("300ms").unwrap(), 300);
        assert_eq!(parse_duration_ms("5s").unwrap(), 5000);
        assert_eq!(parse_duration_ms("1m30s").unwrap(), 90_000);
        assert_eq!(parse_duration_ms("1.5s").unwrap(), 1500);
        assert!(parse_duration_ms("5").is_err());
        assert!(parse_duration_ms("s").is_err());
        assert!(parse_duration_ms("5x").is_err());
        assert!(parse_duration_ms("").is_err());
    }

    #[test]
    fn orders_parse_or_fail_as_docker_does() {
        assert_eq!(
            parse_order("update-order", Some("start-first")).unwrap(),
            Some(UpdateOrder::StartFirst)
        );
        assert_eq!(parse_order("update-order", None).unwrap(), None);
        let e = parse_order("rollback-order", Some("sideways")).unwrap_err();
        assert_eq!(
            e.0,
            "invalid argument \"sideways\" for \"--rollback-order\" flag: unrecognized update order \
             sideways (expected start-first or stop-first)"
        );
    }

    #[test]
    fn sizes_and_cpus() {
        assert_eq!(parse_bytes("64m").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("1g").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_bytes("512MB").unwrap(), 512 << 20);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("-1m").is_err());
        assert_eq!(parse_cpus("0.5").unwrap(), 500_000_000);
        assert!(parse_cpus("x").is_err());
    }
}
