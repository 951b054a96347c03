//! `mesh`: the command-line client. It speaks the local API (one JSON line per request) to one
//! `meshd`, chosen by `-H`/`MESH_HOST`, and prints tables, JSON or Docker-like messages.
//! Errors are one line on stderr and a non-zero exit status.
#![forbid(unsafe_code)]

mod bench;
mod blob;
mod client;
mod discovery;
mod events;
mod format;
mod image;
mod login;
mod logs;
mod network;
mod pretty;
mod prompt;
mod service;
mod stack;
mod swarm;
mod table;

use std::collections::BTreeMap;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use mesh_api::{Availability, Filters, NodeRole, NodeSummary, Request};
use serde_json::{json, Value};

use client::Client;
pub use format::Format;

#[derive(Parser, Debug)]
#[command(
    name = "mesh",
    version,
    about = "Drive a mesh cluster: swarm, nodes, networks, services, stacks"
)]
struct Cli {
    /// Daemon socket to connect to.
    #[arg(
        short = 'H',
        long = "host",
        env = "MESH_HOST",
        default_value = "unix:///run/mesh/meshd.sock",
        global = true
    )]
    host: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show the client and daemon versions.
    Version,
    /// Show what the local daemon knows of its swarm membership.
    Info(FormatArg),
    /// Manage the swarm.
    #[command(subcommand)]
    Swarm(SwarmCmd),
    /// Manage swarm nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Manage services.
    #[command(subcommand)]
    Service(Box<service::ServiceCmd>),
    /// Manage overlay networks.
    #[command(subcommand)]
    Network(network::NetworkCmd),
    /// Manage secrets.
    #[command(subcommand)]
    Secret(blob::BlobCmd),
    /// Manage configs.
    #[command(subcommand)]
    Config(blob::BlobCmd),
    /// Manage stacks: applications deployed from compose files.
    #[command(subcommand)]
    Stack(stack::StackCmd),
    /// Manage the images of this node.
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Log this node in to a registry (its pulls use the login).
    Login(login::LoginArgs),
    /// Log this node out of a registry.
    Logout {
        /// The registry; Docker Hub when left out.
        server: Option<String>,
    },
    /// Service VIPs on this node.
    #[command(subcommand)]
    Vip(discovery::VipCmd),
    /// The embedded DNS on this node.
    #[command(subcommand)]
    Dns(discovery::DnsCmd),
    /// Benchmark the cluster from this machine.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Run a command inside a task running on this node.
    Exec {
        /// Task ID, or name such as web.1.
        task: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Get real time events from the cluster (services, nodes, networks).
    Events(events::EventsArgs),
    /// Print the shell completion script for bash, zsh or fish.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Docker's words for `--format` on listings.
const FORMAT_HELP: &str = "Format output using a custom template: 'table' (default), 'table TEMPLATE', 'json' or 'TEMPLATE' (Go template syntax, e.g. '{{.ID}}')";

#[derive(Args, Debug)]
pub struct FormatArg {
    #[arg(long, default_value = "table", help = FORMAT_HELP)]
    pub format: Format,
}

impl FormatArg {
    /// Whether JSON was asked for, for outputs that have no template fields (a template is
    /// refused rather than ignored).
    pub fn is_json(&self) -> Result<bool> {
        match self.format {
            Format::Table => Ok(false),
            Format::Json => Ok(true),
            _ => Err(Failure(
                "this command's --format takes table or json, not a template".into(),
            )),
        }
    }
}

/// `--filter`, `--format` and `-q` of a listing, as Docker's.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// Filter output based on conditions provided (KEY=VALUE, repeatable).
    #[arg(short = 'f', long = "filter", value_name = "FILTER")]
    pub filter: Vec<String>,
    /// Format output using a custom template.
    #[arg(long, default_value = "table", help = FORMAT_HELP)]
    pub format: Format,
    /// Only display IDs.
    #[arg(short, long)]
    pub quiet: bool,
}

impl ListArgs {
    /// The `--filter`s, parsed (Docker's error for a malformed one).
    pub fn filters(&self) -> Result<Filters> {
        Filters::parse_args(&self.filter).map_err(Failure)
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RoleArg {
    /// A worker's token.
    Worker,
    /// A manager's token.
    Manager,
}

impl From<RoleArg> for NodeRole {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Worker => NodeRole::Worker,
            RoleArg::Manager => NodeRole::Manager,
        }
    }
}

#[derive(Subcommand, Debug)]
enum SwarmCmd {
    /// Initialize a swarm with this node as its first manager.
    Init {
        /// Advertised address (IP[:PORT]).
        #[arg(long)]
        advertise_addr: Option<String>,
        /// Listen address (IP:PORT), default 0.0.0.0:2377.
        #[arg(long)]
        listen_addr: Option<String>,
        /// Enable manager autolocking (requiring an unlock key to start a stopped manager).
        #[arg(long)]
        autolock: bool,
        /// Force create a new cluster from current state (a manager whose swarm lost its
        /// quorum for good becomes the one manager of a swarm keeping its state).
        #[arg(long)]
        force_new_cluster: bool,
    },
    /// Display and rotate the root CA.
    Ca {
        /// Rotate the swarm CA: a new root certificate and key are generated.
        #[arg(long)]
        rotate: bool,
        /// Exit immediately instead of waiting for the root rotation to converge.
        #[arg(short, long)]
        detach: bool,
        /// Suppress progress output.
        #[arg(short, long)]
        quiet: bool,
        /// Validity period for node certificates (ns|us|ms|s|m|h), e.g. 2160h.
        #[arg(long, value_name = "DURATION")]
        cert_expiry: Option<String>,
    },
    /// Unlock a locked manager (the key is read from a prompt or stdin).
    Unlock,
    /// Manage the unlock key.
    UnlockKey {
        /// Only display the key.
        #[arg(short, long)]
        quiet: bool,
        /// Rotate the unlock key.
        #[arg(long)]
        rotate: bool,
    },
    /// Update the swarm's settings.
    Update {
        /// Change manager autolocking setting (true|false).
        #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        autolock: Option<bool>,
        /// Validity period for node certificates (ns|us|ms|s|m|h), e.g. 2160h.
        #[arg(long, value_name = "DURATION")]
        cert_expiry: Option<String>,
        /// Dispatcher heartbeat period (ns|us|ms|s|m|h).
        #[arg(long, value_name = "DURATION")]
        dispatcher_heartbeat: Option<String>,
        /// Task history retention limit.
        #[arg(long, value_name = "N", allow_negative_numbers = true)]
        task_history_limit: Option<i64>,
    },
    /// Join a swarm as a worker or a manager, as the token says.
    Join {
        /// Token for entry into the swarm.
        #[arg(long)]
        token: String,
        /// Advertised address (IP[:PORT]).
        #[arg(long)]
        advertise_addr: Option<String>,
        /// Listen address (IP:PORT), default 0.0.0.0:2377.
        #[arg(long)]
        listen_addr: Option<String>,
        /// A manager's address, IP[:PORT].
        remote: String,
    },
    /// Show or rotate a join token.
    JoinToken {
        /// Only print the token.
        #[arg(short, long)]
        quiet: bool,
        /// Rotate the token: the old one stops working.
        #[arg(long)]
        rotate: bool,
        /// Whose token: worker or manager.
        role: RoleArg,
    },
    /// Leave the swarm.
    Leave {
        /// Leave even as a manager.
        #[arg(short, long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// List the nodes.
    #[command(alias = "list")]
    Ls(ListArgs),
    /// List the tasks running on one or more nodes, defaults to this node.
    Ps {
        #[command(flatten)]
        list: ListArgs,
        /// Do not truncate output.
        #[arg(long)]
        no_trunc: bool,
        /// Nodes (ID, name, or `self`); this node when none is given.
        nodes: Vec<String>,
    },
    /// Show nodes in detail (JSON).
    Inspect {
        /// Print the information in a human friendly format.
        #[arg(long)]
        pretty: bool,
        /// Nodes (ID, name, or `self`).
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Change a node's availability or labels.
    Update {
        /// Availability of the node ("active", "pause", "drain").
        #[arg(long)]
        availability: Option<String>,
        /// Add or update a node label (KEY=VALUE).
        #[arg(long = "label-add")]
        label_add: Vec<String>,
        /// Remove a node label if exists.
        #[arg(long = "label-rm")]
        label_rm: Vec<String>,
        /// The node (ID or name).
        node: String,
    },
    /// Make workers managers.
    Promote {
        /// Nodes (ID or name).
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Make managers workers.
    Demote {
        /// Nodes (ID or name).
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Remove nodes from the swarm.
    #[command(alias = "remove")]
    Rm {
        /// Force remove a node from the swarm.
        #[arg(short, long)]
        force: bool,
        /// Nodes (ID or name).
        #[arg(required = true)]
        nodes: Vec<String>,
    },
}

/// A failure to report: one line, then exit 1.
#[derive(Debug)]
pub struct Failure(pub String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Failure>;

fn main() {
    let args = service::mark_host_command(&Cli::command(), std::env::args_os().collect());
    let cli = Cli::parse_from(args);
    if let Err(Failure(msg)) = run(cli) {
        if msg.starts_with("Error") {
            eprintln!("{msg}");
        } else {
            eprintln!("Error: {msg}");
        }
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Cmd::Completion { shell } = cli.cmd {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "mesh", &mut script);
        // A closed pipe (`| head`) ends the output quietly.
        let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
        return Ok(());
    }
    let c = Client::new(&cli.host)?;
    match cli.cmd {
        Cmd::Version => {
            println!("Client: mesh {}", env!("CARGO_PKG_VERSION"));
            let v = c.call(Request::Version)?;
            println!("Server: meshd {}", v["version"].as_str().unwrap_or("?"));
        }
        Cmd::Info(f) => {
            let v = c.call(Request::Info)?;
            match f.format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                Format::Table => print_info(&v),
                _ => return Err(Failure("mesh info: --format takes table or json".into())),
            }
        }
        Cmd::Swarm(s) => swarm(&c, s)?,
        Cmd::Node(n) => node(&c, n)?,
        Cmd::Service(s) => service::run(&c, *s)?,
        Cmd::Network(n) => network::run(&c, n)?,
        Cmd::Secret(b) => blob::run(&c, mesh_api::BlobKind::Secret, b)?,
        Cmd::Config(b) => blob::run(&c, mesh_api::BlobKind::Config, b)?,
        Cmd::Stack(s) => stack::run(&c, s)?,
        Cmd::Image(i) => image::run(&c, i)?,
        Cmd::Login(a) => login::login(&c, a)?,
        Cmd::Logout { server } => login::logout(&c, server)?,
        Cmd::Vip(v) => discovery::vip(&c, v)?,
        Cmd::Dns(d) => discovery::dns(&c, d)?,
        Cmd::Bench(b) => bench::run(&c, b)?,
        Cmd::Exec { task, command } => {
            let status = service::exec(&c, task, command)?;
            std::process::exit(status);
        }
        Cmd::Events(a) => events::run(&c, &a)?,
        Cmd::Completion { .. } => unreachable!("handled before connecting"),
    }
    Ok(())
}

/// A JSON object as a listing row.
pub fn row(v: Value) -> format::Row {
    match v {
        Value::Object(m) => m,
        _ => format::Row::new(),
    }
}

/// A node's full ID: `self` is this node (as Docker's CLI), anything else is resolved by the
/// leader (ID, unique ID prefix or name).
fn node_id(c: &Client, key: &str) -> Result<String> {
    if key == "self" {
        let info: mesh_api::LocalInfo = c.call_as(Request::Info)?;
        return info
            .node_id
            .ok_or_else(|| Failure(mesh_api::api::NOT_IN_SWARM_MESSAGE.into()));
    }
    let v = c.call(Request::NodeInspect {
        node: key.to_string(),
    })?;
    Ok(v["id"].as_str().unwrap_or(key).to_string())
}

fn print_info(v: &Value) {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    println!("Node name: {}", s("node_name"));
    println!("Swarm: {}", s("swarm"));
    if s("swarm") == "active" || s("swarm") == "locked" {
        println!(" NodeID: {}", s("node_id"));
        println!(" ClusterID: {}", s("cluster_id"));
        println!(" Role: {}", s("role"));
        println!(" Node Address: {}", s("node_addr"));
        let managers: Vec<&str> = v["managers"]
            .as_array()
            .map(|a| a.iter().filter_map(|m| m.as_str()).collect())
            .unwrap_or_default();
        println!(" Manager Addresses: {}", managers.join(", "));
        if let Some(l) = v["leader"].as_str() {
            println!(" Leader: {l}");
        }
    }
}

fn swarm(c: &Client, cmd: SwarmCmd) -> Result<()> {
    match cmd {
        SwarmCmd::Init {
            advertise_addr,
            listen_addr,
            autolock,
            force_new_cluster,
        } => {
            let a: mesh_api::SwarmInitAnswer = c.call_as(Request::SwarmInit {
                advertise_addr,
                listen_addr,
                autolock,
                force_new_cluster,
            })?;
            println!(
                "Swarm initialized: current node ({}) is now a manager.\n",
                a.node_id
            );
            println!("To add a worker to this swarm, run the following command:\n");
            println!(
                "    mesh swarm join --token {} {}\n",
                a.worker_token, a.addr
            );
            println!("To add a manager to this swarm, run 'mesh swarm join-token manager' and follow the instructions.");
            if let Some(key) = &a.unlock_key {
                println!();
                swarm::print_unlock_command(key);
            }
        }
        SwarmCmd::Ca {
            rotate,
            detach,
            quiet,
            cert_expiry,
        } => swarm::ca(c, rotate, detach, quiet, cert_expiry)?,
        SwarmCmd::Unlock => swarm::unlock(c)?,
        SwarmCmd::UnlockKey { quiet, rotate } => swarm::unlock_key(c, quiet, rotate)?,
        SwarmCmd::Update {
            autolock,
            cert_expiry,
            dispatcher_heartbeat,
            task_history_limit,
        } => swarm::update(
            c,
            autolock,
            task_history_limit,
            cert_expiry,
            dispatcher_heartbeat,
        )?,
        SwarmCmd::Join {
            token,
            advertise_addr,
            listen_addr,
            remote,
        } => {
            let a: mesh_api::JoinAnswer = c.call_as(Request::SwarmJoin {
                token,
                remote,
                advertise_addr,
                listen_addr,
            })?;
            println!("This node joined a swarm as a {}.", a.role);
        }
        SwarmCmd::JoinToken {
            quiet,
            rotate,
            role,
        } => {
            let role: NodeRole = role.into();
            let a: mesh_api::TokenAnswer = c.call_as(Request::JoinToken { role, rotate })?;
            let token = &a.token;
            if quiet {
                println!("{token}");
                return Ok(());
            }
            if rotate {
                println!("Successfully rotated {role} join token.\n");
            }
            println!("To add a {role} to this swarm, run the following command:\n");
            println!("    mesh swarm join --token {token} {}\n", a.addr);
        }
        SwarmCmd::Leave { force } => {
            c.call(Request::SwarmLeave { force })?;
            println!("Node left the swarm.");
        }
    }
    Ok(())
}

fn node(c: &Client, cmd: NodeCmd) -> Result<()> {
    match cmd {
        NodeCmd::Ls(l) => {
            let v = c.call(Request::NodeLs {
                filters: l.filters()?,
            })?;
            let nodes: Vec<NodeSummary> = serde_json::from_value(v)?;
            let rows: Vec<format::Row> = nodes
                .iter()
                .map(|n| {
                    row(json!({
                        "ID": n.id, "Hostname": n.hostname, "Status": n.status,
                        "Availability": n.availability, "ManagerStatus": n.manager_status, "Self": n.is_self,
                        "TLSStatus": n.tls_status,
                    }))
                })
                .collect();
            format::print(&l.format, l.quiet, format::NODE, &rows, &[], || {
                let rows = nodes
                    .iter()
                    .map(|n| {
                        vec![
                            if n.is_self {
                                format!("{} *", n.id)
                            } else {
                                n.id.clone()
                            },
                            n.hostname.clone(),
                            n.status.clone(),
                            n.availability.clone(),
                            n.manager_status.clone(),
                        ]
                    })
                    .collect();
                table::print(
                    &["ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER STATUS"],
                    rows,
                );
            })?;
        }
        NodeCmd::Ps {
            list,
            no_trunc,
            nodes,
        } => {
            let nodes = if nodes.is_empty() {
                vec!["self".to_string()]
            } else {
                nodes
            };
            let mut rows = Vec::new();
            for n in nodes {
                let id = node_id(c, &n)?;
                let mut filters = list.filters()?;
                filters.add("node", id);
                let v = c.call(Request::TaskLs { filters })?;
                rows.extend(v.as_array().cloned().unwrap_or_default());
            }
            service::print_tasks(&rows, &list.format, list.quiet, no_trunc)?;
        }
        NodeCmd::Inspect { pretty, nodes } => {
            let mut out = Vec::new();
            for n in nodes {
                let node = if n == "self" { node_id(c, &n)? } else { n };
                out.push(c.call(Request::NodeInspect { node })?);
            }
            if pretty {
                for (i, v) in out.iter().enumerate() {
                    if i > 0 {
                        println!();
                    }
                    print!("{}", pretty::node(v)?);
                }
            } else {
                println!("{}", serde_json::to_string_pretty(&out)?);
            }
        }
        NodeCmd::Update {
            availability,
            label_add,
            label_rm,
            node,
        } => {
            let availability = availability
                .map(|a| a.parse::<Availability>())
                .transpose()?;
            let mut add = BTreeMap::new();
            for l in label_add {
                let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
                if k.is_empty() {
                    return Err(Failure(format!(
                        "invalid label: {l:?} (expected KEY=VALUE)"
                    )));
                }
                add.insert(k.to_string(), v.to_string());
            }
            if availability.is_none() && add.is_empty() && label_rm.is_empty() {
                return Err(Failure(
                    "nothing to update: give --availability, --label-add or --label-rm".into(),
                ));
            }
            c.call(Request::NodeUpdate {
                node: node.clone(),
                availability,
                label_add: add,
                label_rm,
            })?;
            println!("{node}");
        }
        NodeCmd::Promote { nodes } => {
            for n in nodes {
                let a: mesh_api::MessageAnswer = c.call_as(Request::NodePromote { node: n })?;
                println!("{}", a.message);
            }
        }
        NodeCmd::Demote { nodes } => {
            for n in nodes {
                let a: mesh_api::MessageAnswer = c.call_as(Request::NodeDemote { node: n })?;
                println!("{}", a.message);
            }
        }
        NodeCmd::Rm { force, nodes } => {
            for n in nodes {
                c.call(Request::NodeRm {
                    node: n.clone(),
                    force,
                })?;
                println!("{n}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tidy check: every subcommand and argument says what it is for in `--help`, as
    /// Docker's help does.
    #[test]
    fn every_command_and_flag_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
                if a.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
                    missing.push(format!("{path} <{}>", a.get_id()));
                }
            }
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                let p = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(p.clone());
                }
                walk(sub, &p, missing);
            }
        }
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "mesh", &mut missing);
        assert!(missing.is_empty(), "no help text for: {missing:#?}");
    }

    #[test]
    fn completions_for_three_shells() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "mesh", &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains("mesh") && text.contains("service"), "{shell}");
        }
    }

    #[test]
    fn listing_flags_parse_as_docker_s() {
        let cli = Cli::try_parse_from([
            "mesh",
            "service",
            "ps",
            "-f",
            "desired-state=running",
            "--filter",
            "node=h1",
            "--format",
            "table {{.ID}}\t{{.Name}}",
            "-q",
            "--no-trunc",
            "web",
        ])
        .unwrap();
        let Cmd::Service(s) = cli.cmd else {
            panic!("not a service command")
        };
        let service::ServiceCmd::Ps {
            list,
            no_trunc,
            services,
        } = *s
        else {
            panic!("not service ps")
        };
        assert!(list.quiet && no_trunc && services == ["web"]);
        assert_eq!(
            list.format,
            Format::TableTemplate("{{.ID}}\t{{.Name}}".into())
        );
        let f = list.filters().unwrap();
        assert!(f.any("node", |v| v == "h1") && f.any("desired-state", |v| v == "running"));
        assert!(Cli::try_parse_from(["mesh", "node", "ps"]).is_ok());
        assert!(Cli::try_parse_from(["mesh", "node", "inspect", "--pretty", "self"]).is_ok());
    }
}
