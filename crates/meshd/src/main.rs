//! `meshd`: the mesh daemon. Parses flags, sets up logging, takes the exec-root lock, serves
//! the local API socket and wires it to the node's daemon core in `mesh-agent`.

#![forbid(unsafe_code)]

mod api;
mod config;
mod metrics;

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, ValueEnum};
use mesh_agent::{exec, images, metrics::PullMetrics, plane, Daemon, DaemonConfig};
use tracing::info;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `--lb-backend`'s values (`plane::LbBackend`).
#[derive(Clone, Copy, Debug, ValueEnum)]
enum LbBackendFlag {
    /// eBPF socket-LB when the kernel takes it, else nftables.
    Auto,
    /// eBPF socket-LB on the cgroup hooks (fails to start without it).
    Ebpf,
    /// nftables DNAT in each task's namespace.
    Nftables,
}

impl From<LbBackendFlag> for plane::LbBackend {
    fn from(f: LbBackendFlag) -> Self {
        match f {
            LbBackendFlag::Auto => plane::LbBackend::Auto,
            LbBackendFlag::Ebpf => plane::LbBackend::Ebpf,
            LbBackendFlag::Nftables => plane::LbBackend::Nftables,
        }
    }
}

/// `--ingress-datapath`'s values (`plane::IngressDatapath`).
#[derive(Clone, Copy, Debug, ValueEnum)]
enum IngressDatapathFlag {
    /// The eBPF fast path when the kernel takes it, else nftables only.
    Auto,
    /// The eBPF fast path (the routing mesh fails to start without it).
    Ebpf,
    /// nftables only: host DNAT to the ingress sandbox, which balances.
    Nftables,
}

impl From<IngressDatapathFlag> for plane::IngressDatapath {
    fn from(f: IngressDatapathFlag) -> Self {
        match f {
            IngressDatapathFlag::Auto => plane::IngressDatapath::Auto,
            IngressDatapathFlag::Ebpf => plane::IngressDatapath::Ebpf,
            IngressDatapathFlag::Nftables => plane::IngressDatapath::Nftables,
        }
    }
}

/// The mesh daemon: one per host.
#[derive(Parser, Debug)]
#[command(name = "meshd", version, about)]
struct Args {
    /// The configuration file: meshd's flags as JSON keys (Docker's daemon.json); a flag on
    /// the command line wins.
    #[arg(long, value_name = "PATH", default_value = config::DEFAULT_CONFIG_FILE)]
    config_file: PathBuf,
    /// Node name (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// Everything that must survive a restart.
    #[arg(long, default_value = "/var/lib/mesh")]
    data_dir: PathBuf,
    /// Runtime state: the API socket, namespace handles, pid files.
    #[arg(long, default_value = "/run/mesh")]
    exec_root: PathBuf,
    /// Name of this daemon's cgroup subtree (tasks go below it), unique per meshd on a machine.
    #[arg(long, default_value = "mesh")]
    cgroup_parent: String,
    /// Gossip port (UDP and TCP), as Swarm's 7946.
    #[arg(long, default_value_t = 7946)]
    gossip_port: u16,
    /// VXLAN UDP port, as Swarm's 4789.
    #[arg(long, default_value_t = plane::DEFAULT_VXLAN_PORT)]
    vxlan_port: u16,
    /// Overlay MTU (default: the underlay's MTU minus 50).
    #[arg(long)]
    overlay_mtu: Option<u32>,
    /// The service-VIP balancer: eBPF socket-LB on the cgroup hooks, nftables DNAT in each
    /// task's namespace, or auto (eBPF when the kernel takes it).
    #[arg(long, value_enum, default_value = "auto")]
    lb_backend: LbBackendFlag,
    /// The routing mesh's data path for published ports served by another node's task: an
    /// eBPF fast path on tc (no conntrack or NAT rules on the node taking the connection)
    /// with the nftables path behind it, nftables only, or auto (eBPF when the kernel takes it).
    #[arg(long, value_enum, default_value = "auto")]
    ingress_datapath: IngressDatapathFlag,
    /// A registry reached over plain HTTP (HOST:PORT); repeatable. Others need HTTPS.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure_registries: Vec<String>,
    /// A pull-through mirror of Docker Hub (URL); repeatable.
    #[arg(long = "registry-mirror", value_name = "URL")]
    registry_mirrors: Vec<String>,
    /// CA certificates of registries, as Docker's certs.d: DIR/HOST:PORT/*.crt are trusted
    /// for that registry beside the system roots.
    #[arg(long, value_name = "DIR", default_value = "/etc/mesh/certs.d")]
    registry_certs_dir: PathBuf,
    /// Where the Docker Engine API is served (default: EXEC_ROOT/docker.sock); point it at
    /// /var/run/docker.sock on a host without Docker to drive mesh with `docker` unchanged.
    #[arg(long, value_name = "PATH")]
    docker_socket: Option<PathBuf>,
    /// A task log option, KEY=VALUE; repeatable: max-size (default 10m) and max-file
    /// (default 3) bound each task's log, as Docker's json-file driver.
    #[arg(long = "log-opt", value_name = "KEY=VALUE", value_parser = parse_log_opt)]
    log_opts: Vec<String>,
    /// Serve Prometheus metrics on http://IP:PORT/metrics (off by default).
    #[arg(long, value_name = "IP:PORT")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// error, warn, info, debug or trace (or a tracing filter).
    #[arg(long, default_value = "info")]
    log_level: String,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Tests only: seconds between gossip key rotations while this daemon leads (default
    /// 12 hours, as Docker's).
    #[arg(long, hide = true, value_name = "SECS")]
    gossip_key_rotation: Option<u64>,
    /// Tests only: the shortest `swarm update --cert-expiry` this daemon accepts while it
    /// leads (default 1 hour, as Docker's), so that certificates renew within a test.
    #[arg(long, hide = true, value_name = "SECS")]
    min_cert_expiry: Option<u64>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn init_logging(args: &Args) -> anyhow::Result<()> {
    let level = match args.log_level.as_str() {
        l @ ("error" | "warn" | "info" | "debug" | "trace") => {
            // Keep the libraries' chatter one notch down.
            format!("{l},openraft=warn,redb=warn,rustls=warn")
        }
        other => other.to_string(),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&level)
        .with_context(|| format!("invalid --log-level: {}", args.log_level))?;
    // Colours only on a terminal: a log file or journald gets plain lines (as dockerd's).
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
    Ok(())
}

fn main() {
    // A task shim is meshd re-executed: it must not parse meshd's flags.
    mesh_executor::shim_main_if_requested();
    let argv = match config::merge(Args::command(), std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("meshd: {e}");
            std::process::exit(1);
        }
    };
    let args = Args::parse_from(argv);
    if let Err(e) = run(args) {
        eprintln!("meshd: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    init_logging(&args)?;
    if let Some(secs) = args.gossip_key_rotation {
        mesh_manager::gossipkeys::set_rotation_period(std::time::Duration::from_secs(secs.max(1)));
    }
    if let Some(secs) = args.min_cert_expiry {
        mesh_manager::member::set_min_cert_expiry(std::time::Duration::from_secs(secs));
    }
    let node_name = args.node_name.clone().unwrap_or_else(hostname);
    if node_name.is_empty() || node_name.len() > 63 {
        bail!("invalid --node-name: {node_name:?} (1 to 63 characters)");
    }
    for dir in [&args.data_dir, &args.exec_root] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // One daemon per exec-root: the lock dies with the process, also on SIGKILL, and none
    // of its children holds it (`mesh_executor::ExecRootLock`).
    let lock_path = args.exec_root.join("meshd.lock");
    let Some(lock) = mesh_executor::ExecRootLock::acquire(&lock_path)
        .with_context(|| format!("cannot lock {}", lock_path.display()))?
    else {
        bail!(
            "another meshd is running with --exec-root {}",
            args.exec_root.display()
        );
    };
    std::fs::write(
        args.exec_root.join("meshd.pid"),
        format!("{}\n", std::process::id()),
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // A management call is polled through the API connection, the daemon, the member's
        // forwarding, the leader's handler and openraft's read path: in a debug build those
        // poll frames outgrow tokio's default 2 MiB worker stack.
        .thread_stack_size(8 << 20)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let executor = mesh_executor::Executor::new(mesh_executor::ExecutorConfig {
            exec_root: args.exec_root.clone(),
            cgroup_parent: args.cgroup_parent.clone(),
            shim_exe: None,
            rw_root: Some(args.data_dir.join("rw")),
        })
        .map_err(|e| anyhow::anyhow!("cannot set up the task executor: {e}"))?;
        let executor = std::sync::Arc::new(executor);
        let plane = plane::Plane::new(
            plane::PlaneConfig {
                exec_root: args.exec_root.clone(),
                gossip_port: args.gossip_port,
                vxlan_port: args.vxlan_port,
                mtu: args.overlay_mtu,
                lb_backend: args.lb_backend.into(),
                ingress_datapath: args.ingress_datapath.into(),
            },
            tokio::runtime::Handle::current(),
            executor.clone(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut registry = prometheus_client::registry::Registry::with_prefix("mesh");
        plane.register_metrics(&mut registry);
        let pulls = PullMetrics::default();
        pulls.register(&mut registry);
        let store = mesh_image::Store::open(mesh_image::StoreConfig {
            root: args.data_dir.join("images"),
            insecure_registries: args.insecure_registries.clone(),
            mirrors: args.registry_mirrors.clone(),
            certs_dir: Some(args.registry_certs_dir.clone()),
        })
        .map_err(|e| anyhow::anyhow!("cannot open the image store: {e}"))?;
        let logins = mesh_image::login::Logins::open(&args.data_dir)
            .map_err(|e| anyhow::anyhow!("cannot read the registry logins: {e}"))?;
        let cfg = DaemonConfig {
            node_name: node_name.clone(),
            data_dir: args.data_dir.clone(),
            exec_root: args.exec_root.clone(),
            runtime: std::sync::Arc::new(exec::ExecRuntime {
                executor,
                volumes: args.data_dir.join("volumes"),
                log: log_options(&args.log_opts)?,
            }),
            plane: Some(std::sync::Arc::new(plane)),
            images: Some(std::sync::Arc::new(images::StoreImages::new(
                store,
                logins,
                tokio::runtime::Handle::current(),
                pulls,
            ))),
        };
        let daemon = Daemon::start(cfg)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let sock = args.exec_root.join("meshd.sock");
        let server = api::serve(&sock, daemon.clone())?;
        let docker_sock = args
            .docker_socket
            .clone()
            .unwrap_or_else(|| args.exec_root.join("docker.sock"));
        let engine = mesh_engine::serve(&docker_sock, std::sync::Arc::new(api::Engine(daemon.clone())))
            .map_err(|e| anyhow::anyhow!("docker API socket {}: {e}", docker_sock.display()))?;
        let metrics_server = match args.metrics_addr {
            Some(addr) => {
                let scraper = metrics::Scraper::new(registry, daemon.clone());
                let task = metrics::serve(addr, std::sync::Arc::new(scraper))?;
                info!(%addr, "metrics served on /metrics");
                Some(task)
            }
            None => None,
        };
        info!(node_name, socket = %sock.display(), docker_socket = %docker_sock.display(), "meshd ready");
        wait_for_signal().await?;
        info!("shutting down");
        server.abort();
        if let Some(task) = metrics_server {
            task.abort();
        }
        engine.shutdown();
        daemon.shutdown().await;
        let _ = std::fs::remove_file(&sock);
        drop(lock);
        Ok(())
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Checks one `--log-opt` as it is parsed (the error names the flag).
fn parse_log_opt(v: &str) -> Result<String, String> {
    mesh_executor::LogOptions::default().set(v)?;
    Ok(v.to_string())
}

/// The task log options of the `--log-opt` flags (the last of a key wins).
fn log_options(opts: &[String]) -> anyhow::Result<mesh_executor::LogOptions> {
    let mut o = mesh_executor::LogOptions::default();
    for v in opts {
        o.set(v).map_err(anyhow::Error::msg)?;
    }
    Ok(o)
}
