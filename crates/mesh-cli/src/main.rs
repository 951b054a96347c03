//! `mesh`: the command-line client. It speaks the local API (one JSON line per request) to one
//! `meshd`, chosen by `-H`/`MESH_HOST`, and prints tables, JSON or Docker-like messages.
//! Errors are one line on stderr and a non-zero exit status.
#![forbid(unsafe_code)]

mod blob;
mod client;
mod discovery;
mod image;
mod login;
mod network;
mod service;
mod stack;
mod swarm;
mod table;

use std::collections::BTreeMap;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use mesh_api::{Availability, NodeRole, NodeSummary, Request};
use serde_json::{json, Value};

use client::Client;

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
    /// Run a command inside a task running on this node.
    Exec {
        /// Task ID, or name such as web.1.
        task: String,
        #[arg(last = true)]
        command: Vec<String>,
    },
}

#[derive(Args, Debug)]
pub struct FormatArg {
    /// Output format: `table` or `json`.
    #[arg(long, default_value = "table")]
    pub format: Format,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RoleArg {
    Worker,
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
        #[arg(long)]
        token: String,
        #[arg(long)]
        advertise_addr: Option<String>,
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
    Ls(FormatArg),
    /// Show nodes in detail (JSON).
    Inspect {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Change a node's availability or labels.
    Update {
        #[arg(long)]
        availability: Option<String>,
        #[arg(long = "label-add")]
        label_add: Vec<String>,
        #[arg(long = "label-rm")]
        label_rm: Vec<String>,
        node: String,
    },
    /// Make workers managers.
    Promote {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Make managers workers.
    Demote {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Remove nodes from the swarm.
    #[command(alias = "remove")]
    Rm {
        #[arg(short, long)]
        force: bool,
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
    let c = Client::new(&cli.host)?;
    match cli.cmd {
        Cmd::Version => {
            println!("Client: mesh {}", env!("CARGO_PKG_VERSION"));
            let v = c.call(Request::Version)?;
            println!("Server: meshd {}", v["version"].as_str().unwrap_or("?"));
        }
        Cmd::Info(f) => {
            let v = c.call(Request::Info)?;
            if f.format == Format::Json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_info(&v);
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
        Cmd::Exec { task, command } => {
            let status = service::exec(&c, task, command)?;
            std::process::exit(status);
        }
    }
    Ok(())
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
            let v = c.call(Request::SwarmInit {
                advertise_addr,
                listen_addr,
                autolock,
                force_new_cluster,
            })?;
            let id = v["node_id"].as_str().unwrap_or("");
            println!("Swarm initialized: current node ({id}) is now a manager.\n");
            println!("To add a worker to this swarm, run the following command:\n");
            println!(
                "    mesh swarm join --token {} {}\n",
                v["worker_token"].as_str().unwrap_or(""),
                v["addr"].as_str().unwrap_or("")
            );
            println!("To add a manager to this swarm, run 'mesh swarm join-token manager' and follow the instructions.");
            if let Some(key) = v["unlock_key"].as_str() {
                println!();
                swarm::print_unlock_command(key);
            }
        }
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
            let v = c.call(Request::SwarmJoin {
                token,
                remote,
                advertise_addr,
                listen_addr,
            })?;
            println!(
                "This node joined a swarm as a {}.",
                v["role"].as_str().unwrap_or("worker")
            );
        }
        SwarmCmd::JoinToken {
            quiet,
            rotate,
            role,
        } => {
            let role: NodeRole = role.into();
            let v = c.call(Request::JoinToken { role, rotate })?;
            let token = v["token"].as_str().unwrap_or("");
            if quiet {
                println!("{token}");
                return Ok(());
            }
            if rotate {
                println!("Successfully rotated {role} join token.\n");
            }
            println!("To add a {role} to this swarm, run the following command:\n");
            println!(
                "    mesh swarm join --token {token} {}\n",
                v["addr"].as_str().unwrap_or("")
            );
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
        NodeCmd::Ls(f) => {
            let v = c.call(Request::NodeLs)?;
            let nodes: Vec<NodeSummary> = serde_json::from_value(v)?;
            if f.format == Format::Json {
                let out: Vec<Value> = nodes
                    .iter()
                    .map(|n| {
                        json!({
                            "ID": n.id, "Hostname": n.hostname, "Status": n.status,
                            "Availability": n.availability, "ManagerStatus": n.manager_status, "Self": n.is_self,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string(&out)?);
            } else {
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
            }
        }
        NodeCmd::Inspect { nodes } => {
            let mut out = Vec::new();
            for n in nodes {
                out.push(c.call(Request::NodeInspect { node: n })?);
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
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
                let v = c.call(Request::NodePromote { node: n })?;
                println!("{}", v["message"].as_str().unwrap_or(""));
            }
        }
        NodeCmd::Demote { nodes } => {
            for n in nodes {
                let v = c.call(Request::NodeDemote { node: n })?;
                println!("{}", v["message"].as_str().unwrap_or(""));
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
