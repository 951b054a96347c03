//! `mesh service ...` and `mesh exec`: flags as Docker's, specs built here and validated again
//! by the leader, and progress shown until the tasks converge (unless `--detach`).

use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use mesh_api::{
    EndpointMode, ExecAnswer, FailureAction, IdAnswer, Request, Resources, RestartCondition,
    RestartPolicy, RollbackConfig, ServiceMode, ServiceSpec, ServiceUpdate, UpdateConfig,
    UpdateOrder,
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
    Ls(crate::ListArgs),
    /// List the tasks of a service, with their history.
    Ps {
        #[command(flatten)]
        list: crate::ListArgs,
        /// Do not truncate output.
        #[arg(long)]
        no_trunc: bool,
        /// Services (ID or name).
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Show a service in detail: JSON as Docker's (the Engine API's `Service`), or `--pretty`.
    Inspect {
        /// Print the information in a human friendly format.
        #[arg(long)]
        pretty: bool,
        /// Services (ID or name).
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Scale replicated services: `mesh service scale web=5 api=2`.
    Scale {
        /// Exit immediately instead of waiting for the service to converge.
        #[arg(short, long)]
        detach: bool,
        /// SERVICE=REPLICAS pairs.
        #[arg(required = true)]
        pairs: Vec<String>,
    },
    /// Update a service (rolling update).
    Update(UpdateArgs),
    /// Go back to the previous spec.
    Rollback {
        /// Exit immediately instead of waiting for the service to converge.
        #[arg(short, long)]
        detach: bool,
        /// The service (ID or name).
        service: String,
    },
    /// Remove services.
    #[command(alias = "remove")]
    Rm {
        /// Services (ID or name).
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Fetch the logs of a service or task.
    Logs(LogsArgs),
}

/// `mesh service logs` (Docker's flags).
#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Follow log output.
    #[arg(short, long)]
    pub follow: bool,
    /// Do not map IDs to Names in output.
    #[arg(long)]
    pub no_resolve: bool,
    /// Do not include task IDs in output.
    #[arg(long)]
    pub no_task_ids: bool,
    /// Do not truncate output.
    #[arg(long)]
    pub no_trunc: bool,
    /// Do not neatly format logs.
    #[arg(long)]
    pub raw: bool,
    /// Show logs since timestamp (e.g. "2013-01-02T13:23:37Z") or relative (e.g. "42m" for
    /// 42 minutes).
    #[arg(long)]
    pub since: Option<String>,
    /// Number of lines to show from the end of the logs.
    #[arg(short = 'n', long, default_value = "all", allow_hyphen_values = true)]
    pub tail: String,
    /// Show timestamps.
    #[arg(short, long)]
    pub timestamps: bool,
    /// The service (ID or name) or task (ID).
    #[arg(value_name = "SERVICE|TASK")]
    pub service: String,
}

/// Restart, update and resource flags, shared by `create` and `update`.
#[derive(Args, Debug)]
pub struct PolicyArgs {
    /// Restart when condition is met ("none", "on-failure", "any").
    #[arg(long)]
    restart_condition: Option<String>,
    /// Delay between restart attempts (ns|us|ms|s|m|h).
    #[arg(long)]
    restart_delay: Option<String>,
    /// Maximum number of restarts before giving up.
    #[arg(long, allow_negative_numbers = true)]
    restart_max_attempts: Option<i64>,
    /// Maximum number of tasks updated simultaneously (0 to update all at once).
    #[arg(long, allow_negative_numbers = true)]
    update_parallelism: Option<i64>,
    /// Delay between updates (ns|us|ms|s|m|h).
    #[arg(long)]
    update_delay: Option<String>,
    /// Action on update failure ("pause", "continue", "rollback").
    #[arg(long)]
    update_failure_action: Option<String>,
    /// Duration after each task update to monitor for failure (ns|us|ms|s|m|h).
    #[arg(long)]
    update_monitor: Option<String>,
    /// Update order ("start-first"|"stop-first").
    #[arg(long)]
    update_order: Option<String>,
    /// Rollback order ("start-first"|"stop-first").
    #[arg(long)]
    rollback_order: Option<String>,
    /// Limit CPUs.
    #[arg(long)]
    limit_cpu: Option<String>,
    /// Limit Memory.
    #[arg(long)]
    limit_memory: Option<String>,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Service name.
    #[arg(long)]
    name: String,
    /// Send this node's registry login (`mesh login`) to the nodes that pull the image.
    #[arg(long)]
    with_registry_auth: bool,
    /// Number of tasks.
    #[arg(long, allow_negative_numbers = true)]
    replicas: Option<i64>,
    /// Service mode ("replicated" or "global").
    #[arg(long, default_value = "replicated")]
    mode: String,
    /// Network attachments.
    #[arg(long = "network")]
    networks: Vec<String>,
    /// Publish a port as a node port ([mode=ingress|host,]PUBLISHED:TARGET[/PROTOCOL]).
    #[arg(long = "publish", short = 'p')]
    publish: Vec<String>,
    /// Endpoint mode ("vip" or "dnsrr").
    #[arg(long, default_value = "vip")]
    endpoint_mode: String,
    /// Placement constraints.
    #[arg(long = "constraint")]
    constraints: Vec<String>,
    /// Set environment variables.
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Service labels (KEY[=VALUE]).
    #[arg(long = "label", short = 'l')]
    labels: Vec<String>,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Return at once instead of waiting for the tasks.
    #[arg(short, long)]
    detach: bool,
    #[command(flatten)]
    container: ContainerArgs,
    /// IMAGE [COMMAND] [ARG...]: the image the tasks run, and a command replacing its Cmd;
    /// after `--`, COMMAND [ARG...]: a host process (a mesh extension).
    #[arg(
        value_name = "IMAGE",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    image: Vec<String>,
    /// Set by [`mark_host_command`] for a `--` before the first positional argument.
    #[arg(long = "host-command", hide = true)]
    host_command: bool,
}

/// clap drops a `--` that comes before any positional argument, so `create -- sleep 1` (a
/// host process) and `create sleep 1` (the image `sleep`) would parse alike: this turns
/// that `--` of `service create` into the hidden flag `--host-command`. Options that take a
/// value (from clap's own definition of the command) have it skipped, so `-e -- ...` stays
/// an option's value.
pub fn mark_host_command(
    cli: &clap::Command,
    mut args: Vec<std::ffi::OsString>,
) -> Vec<std::ffi::OsString> {
    let Some(at) = args
        .windows(2)
        .position(|w| w[0] == "service" && (w[1] == "create"))
    else {
        return args;
    };
    let Some(create) = cli
        .find_subcommand("service")
        .and_then(|s| s.find_subcommand("create"))
    else {
        return args;
    };
    let takes_value = |a: &clap::Arg| a.get_action().takes_values();
    let longs: Vec<String> = create
        .get_arguments()
        .filter(|a| takes_value(a))
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect();
    let shorts: Vec<char> = create
        .get_arguments()
        .filter(|a| takes_value(a))
        .filter_map(|a| a.get_short())
        .collect();
    let mut i = at + 2;
    while i < args.len() {
        let Some(t) = args[i].to_str() else {
            return args;
        };
        if t == "--" {
            args[i] = "--host-command".into();
            return args;
        }
        if let Some(long) = t.strip_prefix("--") {
            if !long.contains('=') && longs.iter().any(|l| l == long) {
                i += 1;
            }
        } else if let Some(short) = t.strip_prefix('-').filter(|s| !s.is_empty()) {
            // `-e K=V` takes the next token; `-eK=V` and `-d` do not.
            let mut chars = short.chars();
            if let (Some(c), None) = (chars.next(), chars.next()) {
                if shorts.contains(&c) {
                    i += 1;
                }
            }
        } else {
            return args; // the image: what follows is its command
        }
        i += 1;
    }
    args
}

/// `--health-*` and `--no-healthcheck`, shared by `create` and `update`, as Docker's.
#[derive(Args, Debug, Default)]
pub struct HealthArgs {
    /// Command to run to check health.
    #[arg(long)]
    health_cmd: Option<String>,
    /// Time between running the check (ms|s|m|h).
    #[arg(long, allow_hyphen_values = true)]
    health_interval: Option<String>,
    /// Maximum time to allow one check to run (ms|s|m|h).
    #[arg(long, allow_hyphen_values = true)]
    health_timeout: Option<String>,
    /// Consecutive failures needed to report unhealthy.
    #[arg(long, allow_negative_numbers = true)]
    health_retries: Option<i64>,
    /// Start period for the container to initialize before counting retries towards
    /// unstable (ms|s|m|h).
    #[arg(long, allow_hyphen_values = true)]
    health_start_period: Option<String>,
    /// Disable any container-specified HEALTHCHECK.
    #[arg(long)]
    no_healthcheck: bool,
}

impl HealthArgs {
    /// The flags, checked as Docker's CLI checks them.
    fn flags(&self) -> Result<mesh_api::HealthFlags> {
        let duration = |flag: &str, v: &Option<String>| -> Result<Option<u64>> {
            v.as_deref()
                .map(|d| {
                    if d.starts_with('-') {
                        return Err(Failure(format!(
                            "invalid argument {d:?} for \"--{flag}\" flag: duration cannot be negative"
                        )));
                    }
                    parse_duration_ms(d).map_err(|e| {
                        Failure(format!("invalid argument {d:?} for \"--{flag}\" flag: {}", e.0))
                    })
                })
                .transpose()
        };
        let retries = self
            .health_retries
            .map(|r| {
                u64::try_from(r).map_err(|_| {
                    Failure("ContainerSpec: Retries in HealthConfig cannot be negative".into())
                })
            })
            .transpose()?;
        let f = mesh_api::HealthFlags {
            cmd: self.health_cmd.clone(),
            interval_ms: duration("health-interval", &self.health_interval)?,
            timeout_ms: duration("health-timeout", &self.health_timeout)?,
            start_period_ms: duration("health-start-period", &self.health_start_period)?,
            retries,
            none: self.no_healthcheck,
        };
        if f.none && f.any_option() {
            return Err(Failure(mesh_api::health::HEALTH_CONFLICT.into()));
        }
        Ok(f)
    }
}

/// The options of an image's tasks, as Docker's.
#[derive(Args, Debug)]
pub struct ContainerArgs {
    /// Overwrite the default ENTRYPOINT of the image.
    #[arg(long)]
    entrypoint: Option<String>,
    /// Username or UID (format: <name|uid>[:<group|gid>]).
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// Working directory inside the container.
    #[arg(long, short = 'w')]
    workdir: Option<String>,
    /// Container hostname.
    #[arg(long)]
    hostname: Option<String>,
    /// Attach a filesystem mount to the service.
    #[arg(long = "mount")]
    mounts: Vec<String>,
    /// Mount the container's root filesystem as read only.
    #[arg(long)]
    read_only: bool,
    /// Use an init inside each service container to forward signals and reap processes.
    #[arg(long)]
    init: bool,
    /// Signal to stop the container.
    #[arg(long)]
    stop_signal: Option<String>,
    /// Time to wait before force killing a container (ns|us|ms|s|m|h).
    #[arg(long)]
    stop_grace_period: Option<String>,
    /// Specify secrets to expose to the service.
    #[arg(long = "secret")]
    secrets: Vec<String>,
    /// Specify configurations to expose to the service.
    #[arg(long = "config")]
    configs: Vec<String>,
    #[command(flatten)]
    health: HealthArgs,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    /// Number of tasks.
    #[arg(long, allow_negative_numbers = true)]
    replicas: Option<i64>,
    /// Add or update an environment variable.
    #[arg(long = "env-add")]
    env_add: Vec<String>,
    /// Remove an environment variable.
    #[arg(long = "env-rm")]
    env_rm: Vec<String>,
    /// Add or update a placement constraint.
    #[arg(long = "constraint-add")]
    constraint_add: Vec<String>,
    /// Remove a constraint.
    #[arg(long = "constraint-rm")]
    constraint_rm: Vec<String>,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Replace the tasks even if nothing changed.
    #[arg(long)]
    force: bool,
    /// Exit immediately instead of waiting for the service to converge.
    #[arg(short, long)]
    detach: bool,
    /// Service image tag.
    #[arg(long)]
    image: Option<String>,
    /// Send this node's registry login (`mesh login`) to the nodes that pull the image.
    #[arg(long)]
    with_registry_auth: bool,
    /// Add or update a secret on a service.
    #[arg(long = "secret-add")]
    secret_add: Vec<String>,
    /// Remove a secret.
    #[arg(long = "secret-rm")]
    secret_rm: Vec<String>,
    /// Add or update a config file on a service.
    #[arg(long = "config-add")]
    config_add: Vec<String>,
    /// Remove a configuration file.
    #[arg(long = "config-rm")]
    config_rm: Vec<String>,
    #[command(flatten)]
    health: HealthArgs,
    /// The service (ID or name).
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
    mesh_api::human::go_duration_ns(s)
        .map(|ns| (ns as f64 / 1e6).round() as u64)
        .ok_or_else(|| Failure(format!("invalid duration: {s:?} (e.g. 500ms, 5s, 1m)")))
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

/// The spec `mesh service create ARGS` sends (ARGS after `create`, with `--host-command`
/// for a host process' `--`), for commands that deploy services of their own.
pub fn spec_of(args: &[String]) -> Result<ServiceSpec> {
    #[derive(clap::Parser)]
    struct Create {
        #[command(flatten)]
        a: CreateArgs,
    }
    let argv = std::iter::once("create".to_string()).chain(args.iter().cloned());
    let c = <Create as clap::Parser>::try_parse_from(argv).map_err(|e| Failure(e.to_string()))?;
    create_spec(&c.a)
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
    let (image, command) = match (a.image.split_first(), a.host_command) {
        (Some((image, args)), false) => (image.clone(), args.to_vec()),
        (Some(_), true) => (String::new(), a.image.clone()),
        (None, _) => {
            return Err(Failure(
                "\"mesh service create\" requires at least 1 argument: mesh service create [OPTIONS] IMAGE [COMMAND] [ARG...], or -- COMMAND [ARG...] for a host process".into(),
            ))
        }
    };
    let c = &a.container;
    if image.is_empty()
        && (c.entrypoint.is_some()
            || c.user.is_some()
            || c.workdir.is_some()
            || !c.mounts.is_empty()
            || c.read_only
            || c.init
            || !c.secrets.is_empty()
            || !c.configs.is_empty())
    {
        return Err(Failure(
            "--entrypoint, --user, --workdir, --mount, --read-only, --init, --secret and --config need an image".into(),
        ));
    }
    let refs = |kind, list: &[String]| {
        list.iter()
            .map(|r| mesh_api::BlobReference::parse(kind, r).map_err(Failure))
            .collect::<Result<Vec<_>>>()
    };
    let secrets = refs(mesh_api::BlobKind::Secret, &c.secrets)?;
    let configs = refs(mesh_api::BlobKind::Config, &c.configs)?;
    let mounts = c
        .mounts
        .iter()
        .map(|m| mesh_api::Mount::parse(m).map_err(Failure))
        .collect::<Result<Vec<_>>>()?;
    let entrypoint = match &c.entrypoint {
        Some(e) => split_words(e)?,
        None => Vec::new(),
    };
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
        command,
        env: a.env.clone(),
        networks: a.networks.clone(),
        ports,
        endpoint_mode,
        constraints: a.constraints.clone(),
        restart,
        update,
        rollback,
        resources,
        labels: crate::blob::parse_labels(&a.labels)?,
        image,
        entrypoint,
        user: c.user.clone().unwrap_or_default(),
        workdir: c.workdir.clone().unwrap_or_default(),
        hostname: c.hostname.clone().unwrap_or_default(),
        read_only: c.read_only,
        init: c.init,
        mounts,
        stop_signal: match &c.stop_signal {
            Some(sig) if mesh_api::signal_number(sig).is_none() => {
                return Err(Failure(format!("invalid signal: {sig}")))
            }
            Some(sig) => sig.clone(),
            None => String::new(),
        },
        stop_grace_period_ms: c
            .stop_grace_period
            .as_deref()
            .map(parse_duration_ms)
            .transpose()?,
        force_update: 0,
        container_labels: Default::default(),
        platforms: Vec::new(),
        aliases: Default::default(),
        secrets,
        configs,
        healthcheck: c.health.flags()?.to_config().map_err(Failure)?,
    })
}

/// Splits `--entrypoint`'s value into words as a shell would for a simple command line
/// (whitespace, single and double quotes, backslash escapes), like Docker's CLI.
fn split_words(s: &str) -> Result<Vec<String>> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    let mut quote: Option<char> = None;
    while let Some(ch) = chars.next() {
        match (quote, ch) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => match chars.next() {
                Some(n) => cur.push(n),
                None => cur.push('\\'),
            },
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(ch);
                in_word = true;
            }
            (None, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err(Failure(format!(
            "invalid entrypoint {s:?}: unterminated quote"
        )));
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

fn update_of(a: &UpdateArgs) -> Result<ServiceUpdate> {
    Ok(ServiceUpdate {
        replicas: a
            .replicas
            .map(|r| non_negative("replicas", r))
            .transpose()?,
        command: (!a.command.is_empty()).then(|| a.command.clone()),
        image: a.image.clone(),
        secret_add: a
            .secret_add
            .iter()
            .map(|r| mesh_api::BlobReference::parse(mesh_api::BlobKind::Secret, r).map_err(Failure))
            .collect::<Result<_>>()?,
        secret_rm: a.secret_rm.clone(),
        config_add: a
            .config_add
            .iter()
            .map(|r| mesh_api::BlobReference::parse(mesh_api::BlobKind::Config, r).map_err(Failure))
            .collect::<Result<_>>()?,
        config_rm: a.config_rm.clone(),
        registry_auth: a
            .with_registry_auth
            .then_some(mesh_api::RegistryAuth::NodeLogin),
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
        health: a.health.flags()?,
    })
}

/// The daemon's warnings (e.g. an image tag that could not be pinned), on stderr.
pub(crate) fn print_warnings(a: &IdAnswer) {
    for w in &a.warnings {
        eprint!("{w}");
    }
}

/// A service as `docker service inspect` prints it (the Engine API's `Service` object, as
/// the Engine API front door answers it), found by ID, name or unique ID prefix.
fn docker_service(c: &Client, key: &str) -> Result<Value> {
    let v = c.call(Request::Objects {
        service: Some(key.to_string()),
    })?;
    let objects: mesh_api::ClusterObjects = serde_json::from_value(v)
        .map_err(|e| Failure(format!("cannot read the cluster's objects: {e}")))?;
    match objects.services.first() {
        Some(svc) => Ok(mesh_engine::convert::service_json(svc, &objects, false)),
        // The manager's words for why (no such service, an ambiguous prefix).
        None => {
            c.call(Request::ServiceInspect {
                service: key.to_string(),
            })?;
            Err(Failure(format!("no such service: {key}")))
        }
    }
}

/// "5 seconds ago", as Docker prints ages.
fn ago(ms: u64) -> String {
    format!("{} ago", mesh_api::human_duration(ms / 1000))
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
        let update = v["UpdateStatus"]["State"].as_str().unwrap_or("");
        let line = format!("overall progress: {running} out of {desired} tasks");
        if line != last {
            println!("{line}");
            last = line;
        }
        let msg = v["UpdateStatus"]["Message"]
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
                filters: Default::default(),
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
            let answer: IdAnswer = c.call_as(Request::ServiceCreate {
                spec,
                registry_auth: a
                    .with_registry_auth
                    .then_some(mesh_api::RegistryAuth::NodeLogin),
            })?;
            print_warnings(&answer);
            println!("{}", answer.id);
            if !a.detach {
                converge(c, &answer.id, false)?;
            }
        }
        ServiceCmd::Ls(l) => {
            let v = c.call(Request::ServiceLs {
                filters: l.filters()?,
            })?;
            print_services(
                &v.as_array().cloned().unwrap_or_default(),
                &l.format,
                l.quiet,
            )?;
        }
        ServiceCmd::Ps {
            list,
            no_trunc,
            services,
        } => {
            let filters = list.filters()?;
            let mut rows = Vec::new();
            for service in services {
                let v = c.call(Request::ServicePs {
                    service,
                    filters: filters.clone(),
                })?;
                rows.extend(v.as_array().cloned().unwrap_or_default());
            }
            print_tasks(&rows, &list.format, list.quiet, no_trunc)?;
        }
        ServiceCmd::Inspect { pretty, services } => {
            let mut out = Vec::new();
            for s in services {
                out.push(if pretty {
                    c.call(Request::ServiceInspect { service: s })?
                } else {
                    docker_service(c, &s)?
                });
            }
            if pretty {
                for (i, v) in out.iter().enumerate() {
                    if i > 0 {
                        println!();
                    }
                    print!("{}", crate::pretty::service(v)?);
                }
            } else {
                println!("{}", serde_json::to_string_pretty(&out)?);
            }
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
            let answer: IdAnswer = c.call_as(Request::ServiceUpdate {
                service: a.service.clone(),
                update,
            })?;
            print_warnings(&answer);
            println!("{}", a.service);
            if !a.detach {
                converge(c, &a.service, answer.rollout)?;
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
        ServiceCmd::Logs(a) => crate::logs::service_logs(c, &a)?,
    }
    Ok(())
}

/// The rows of `service ls` (the daemon's `ServiceSummary`s) in `format`, or their IDs.
pub fn print_services(rows: &[Value], format: &Format, quiet: bool) -> Result<()> {
    let s = |r: &Value, k: &str| r[k].as_str().unwrap_or("").to_string();
    let replicas = |r: &Value| {
        format!(
            "{}/{}",
            r["running"].as_u64().unwrap_or(0),
            r["desired"].as_u64().unwrap_or(0)
        )
    };
    // Docker shows 12 characters of a service's ID (`-q` too); JSON has it whole.
    let id = |r: &Value| {
        let id = s(r, "id");
        if *format == Format::Json {
            id
        } else {
            id.chars().take(12).collect()
        }
    };
    let list: Vec<crate::format::Row> = rows
        .iter()
        .map(|r| crate::row(json!({"ID": id(r), "Name": s(r, "name"), "Mode": s(r, "mode"), "Replicas": replicas(r), "Image": s(r, "image"), "Ports": s(r, "ports")})))
        .collect();
    crate::format::print(format, quiet, crate::format::SERVICE, &list, &[], || {
        let rows = rows
            .iter()
            .map(|r| {
                vec![
                    id(r),
                    s(r, "name"),
                    s(r, "mode"),
                    replicas(r),
                    s(r, "image"),
                    s(r, "ports"),
                ]
            })
            .collect();
        table::print(&["ID", "NAME", "MODE", "REPLICAS", "IMAGE", "PORTS"], rows);
    })
}

/// Docker's `service ps` truncations, undone by `--no-trunc`: IDs to 12 characters, errors
/// to 30 (ending in `…`).
fn truncate(id: &str, error: &str, no_trunc: bool) -> (String, String) {
    if no_trunc {
        return (id.to_string(), error.to_string());
    }
    let id: String = id.chars().take(12).collect();
    let error = if error.chars().count() > 30 {
        let mut e: String = error.chars().take(29).collect();
        e.push('…');
        e
    } else {
        error.to_string()
    };
    (id, error)
}

/// The rows of `service ps`, `node ps` and `stack ps` (the daemon's task summaries) in
/// `format`, or their IDs. Tables, templates and `-q` truncate as Docker's unless
/// `no_trunc`; JSON (mesh's machine output) never does.
pub fn print_tasks(rows: &[Value], format: &Format, quiet: bool, no_trunc: bool) -> Result<()> {
    let s = |r: &Value, k: &str| r[k].as_str().unwrap_or("").to_string();
    let current = |r: &Value| {
        format!(
            "{} {}",
            s(r, "current_state"),
            ago(r["age_ms"].as_u64().unwrap_or(0))
        )
    };
    let full = no_trunc || *format == Format::Json;
    let list: Vec<crate::format::Row> = rows
        .iter()
        .map(|r| {
            let (id, error) = truncate(&s(r, "id"), &s(r, "error"), full);
            crate::row(json!({"ID": id, "Name": s(r, "name"), "Image": s(r, "image"), "Node": s(r, "node"),
                   "DesiredState": s(r, "desired_state"), "CurrentState": current(r), "Error": error, "Ports": ""}))
        })
        .collect();
    crate::format::print(format, quiet, crate::format::TASK, &list, &[], || {
        // A slot's older tasks under its newest (the daemon groups them after filtering).
        let rows = rows
            .iter()
            .zip(&list)
            .map(|(r, l)| {
                let name = if r["is_history"].as_bool().unwrap_or(false) {
                    format!(" \\_ {}", s(r, "name"))
                } else {
                    s(r, "name")
                };
                let f = |k: &str| l[k].as_str().unwrap_or("").to_string();
                vec![
                    f("ID"),
                    name,
                    s(r, "image"),
                    s(r, "node"),
                    s(r, "desired_state"),
                    current(r),
                    f("Error"),
                    String::new(),
                ]
            })
            .collect();
        table::print(
            &[
                "ID",
                "NAME",
                "IMAGE",
                "NODE",
                "DESIRED STATE",
                "CURRENT STATE",
                "ERROR",
                "PORTS",
            ],
            rows,
        );
    })
}

/// `mesh exec TASK -- CMD...`: prints the command's output and exits with its status.
pub fn exec(c: &Client, task: String, argv: Vec<String>) -> Result<i32> {
    if argv.is_empty() {
        return Err(Failure(
            "a command is needed: mesh exec TASK -- COMMAND [ARG...]".into(),
        ));
    }
    let out: ExecAnswer = c.call_as(Request::Exec { task, argv })?;
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    Ok(out.status)
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

    #[derive(clap::Parser, Debug)]
    struct Create {
        #[command(flatten)]
        a: CreateArgs,
    }

    fn create(args: &[&str]) -> Result<ServiceSpec> {
        use clap::{CommandFactory, Parser};
        let raw = ["mesh", "service", "create"]
            .iter()
            .chain(args)
            .map(std::ffi::OsString::from)
            .collect();
        let raw = mark_host_command(&crate::Cli::command(), raw);
        let c =
            Create::try_parse_from(raw.into_iter().skip(2)).map_err(|e| Failure(e.to_string()))?;
        create_spec(&c.a)
    }

    #[test]
    fn an_image_and_its_command_or_a_host_command() {
        let s = create(&["--name", "web", "busybox", "sh", "-c", "httpd -f"]).unwrap();
        assert_eq!(s.image, "busybox");
        assert_eq!(s.command, ["sh", "-c", "httpd -f"]);
        let s = create(&[
            "--name",
            "web",
            "-u",
            "1000:1000",
            "--entrypoint",
            "/bin/sh -c",
            "busybox",
        ])
        .unwrap();
        assert_eq!((s.image.as_str(), s.command.len()), ("busybox", 0));
        assert_eq!(s.entrypoint, ["/bin/sh", "-c"]);
        assert_eq!(s.user, "1000:1000");
        let s = create(&["--name", "web", "--", "sleep", "100"]).unwrap();
        assert_eq!(
            (s.image.as_str(), s.command.clone()),
            ("", vec!["sleep".to_string(), "100".into()])
        );
        let s = create(&[
            "--name",
            "v",
            "--mount",
            "type=volume,source=data,target=/data",
            "alpine",
        ])
        .unwrap();
        assert_eq!(s.mounts[0].source, "data");
        // `--` after an option's value, and an image whose command has a `--`.
        let s = create(&["--name", "web", "-e", "A=1", "--", "env"]).unwrap();
        assert_eq!(
            (s.image.as_str(), s.env.clone()),
            ("", vec!["A=1".to_string()])
        );
        let s = create(&["--name", "web", "busybox", "sh", "--", "x"]).unwrap();
        assert_eq!((s.image.as_str(), s.command.len()), ("busybox", 3));
        let s = create(&["--name=web", "-d", "--", "sleep", "-e", "1"]).unwrap();
        assert_eq!(s.command, ["sleep", "-e", "1"]);
        let e = create(&["--name", "web"]).unwrap_err();
        assert!(e.0.contains("requires at least 1 argument"), "{}", e.0);
        let e = create(&["--name", "web", "--user", "1", "--", "sleep", "1"]).unwrap_err();
        assert!(e.0.contains("need an image"), "{}", e.0);
        let e =
            create(&["--name", "web", "--mount", "type=bind,target=/x", "busybox"]).unwrap_err();
        assert!(e.0.contains("Source must not be empty"), "{}", e.0);
    }

    #[test]
    fn health_flags_as_docker_s() {
        let s = create(&[
            "--name",
            "web",
            "--health-cmd",
            "test -f /ok",
            "--health-interval",
            "500ms",
            "--health-timeout=2s",
            "--health-retries",
            "2",
            "--health-start-period",
            "1m",
            "--",
            "sleep",
            "100",
        ])
        .unwrap();
        let h = s.healthcheck.unwrap();
        assert_eq!(h.test, ["CMD-SHELL", "test -f /ok"]);
        assert_eq!(
            (h.interval_ms, h.timeout_ms, h.retries, h.start_period_ms),
            (500, 2000, 2, 60_000)
        );
        let s = create(&["--name", "web", "busybox"]).unwrap();
        assert_eq!(s.healthcheck, None);
        let s = create(&["--name", "web", "--no-healthcheck", "busybox"]).unwrap();
        assert_eq!(s.healthcheck.unwrap().test, ["NONE"]);
        let e = create(&[
            "--name",
            "web",
            "--no-healthcheck",
            "--health-retries",
            "1",
            "busybox",
        ])
        .unwrap_err();
        assert_eq!(e.0, "--no-healthcheck conflicts with --health-* options");
        let e = create(&["--name", "web", "--health-interval", "-1s", "busybox"]).unwrap_err();
        assert_eq!(
            e.0,
            "invalid argument \"-1s\" for \"--health-interval\" flag: duration cannot be negative"
        );
        let e = create(&["--name", "web", "--health-timeout", "soon", "busybox"]).unwrap_err();
        assert!(e
            .0
            .starts_with("invalid argument \"soon\" for \"--health-timeout\" flag"));
        let e = create(&["--name", "web", "--health-retries", "-1", "busybox"]).unwrap_err();
        assert!(e.0.contains("cannot be negative"), "{}", e.0);
    }

    #[derive(clap::Parser, Debug)]
    struct Update {
        #[command(flatten)]
        a: UpdateArgs,
    }

    #[test]
    fn health_flags_of_update() {
        use clap::Parser;
        let u = |args: &[&str]| {
            let raw = ["update"].iter().chain(args).copied();
            update_of(&Update::try_parse_from(raw).unwrap().a)
        };
        let got = u(&["--health-interval", "1s", "web"]).unwrap();
        assert_eq!(got.health.interval_ms, Some(1000));
        assert_eq!(got.health.cmd, None);
        let got = u(&["--no-healthcheck", "web"]).unwrap();
        assert!(got.health.none);
        let e = u(&["--no-healthcheck", "--health-cmd", "true", "web"]).unwrap_err();
        assert_eq!(e.0, "--no-healthcheck conflicts with --health-* options");
        assert!(u(&["web"]).unwrap().health.is_empty());
    }

    #[test]
    fn entrypoints_split_as_a_shell_would() {
        assert_eq!(
            split_words(r#"/bin/sh -c "echo 'hi there'""#).unwrap(),
            ["/bin/sh", "-c", "echo 'hi there'"]
        );
        assert_eq!(split_words("a\\ b  c").unwrap(), ["a b", "c"]);
        assert_eq!(split_words("''").unwrap(), [""]);
        assert!(split_words("'open").is_err());
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
