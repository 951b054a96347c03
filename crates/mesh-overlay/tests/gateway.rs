//! Real-kernel tests of the gateway bridge; they need root (and `nft`, `ping`, `ip`).
//!
//! Not root: each test prints "skipped: needs root" and passes, unless `CI` is set (to
//! anything but "", "0" or "false"): then it fails.
//!
//! Nothing is ever added to the namespace the tests run in. Each test builds its own world
//! under its own temp dir: a "host" namespace H (where the [`Overlay`] runs, through
//! [`Overlay::new_in`]) linked by a veth to an "outside" namespace O (10.97.0.1/24 on O,
//! 10.97.0.2/24 on H, H's default route via O), and tasks that are `sleep` processes in
//! namespaces of their own. The `Lab` guard kills the tasks and deletes H and O on drop, also on
//! panic; the kernel removes the rest (links, nftables tables, sysctls) with the namespaces.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_netlink::{Handle, Netns};
use mesh_overlay::{
    GatewayConfig, HolderError, Holders, Overlay, OverlayConfig, OverlayError, GW_BRIDGE,
};

const O_IP: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 1);
const H_IP: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 2);
const GW: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 1);
/// The underlay MTU (not 1500, to see that the gateway bridge follows it).
const UNDERLAY_MTU: u32 = 1400;

/// True if root. Otherwise prints why and returns false, or panics in CI.
fn root_or_skip() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let ci = std::env::var("CI")
        .map(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false"))
        .unwrap_or(false);
    assert!(
        !ci,
        "mesh-overlay gateway tests need root, and CI is set: failing instead of skipping"
    );
    eprintln!("skipped: needs root");
    false
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The gateway needs no overlay namespaces.
struct NoHolders;

impl Holders for NoHolders {
    fn ensure(&self, name: &str) -> Result<u32, HolderError> {
        Err(format!("no holders in this test ({name})").into())
    }
    fn list(&self) -> Vec<(String, u32)> {
        Vec::new()
    }
    fn remove(&self, _: &str) -> Result<(), HolderError> {
        Ok(())
    }
}

/// A task: a process in a network namespace of its own.
struct Task {
    id: String,
    child: Child,
}

impl Task {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn ns(&self) -> Netns {
        Netns::open(Path::new(&format!("/proc/{}/ns/net", self.pid()))).expect("task namespace")
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// H, O and the tasks of one test; everything goes on drop.
struct Lab {
    dir: tempfile::TempDir,
    host: Netns,
    out: Netns,
    tasks: Vec<Task>,
}

impl Lab {
    async fn new() -> Lab {
        let dir = tempfile::Builder::new()
            .prefix("mesh-overlay-gw-test-")
            .tempdir()
            .expect("temp dir");
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let host = Netns::create(dir.path(), &format!("h-{pid}-{n}")).expect("create H");
        let out = match Netns::create(dir.path(), &format!("o-{pid}-{n}")) {
            Ok(o) => o,
            Err(e) => {
                let _ = Netns::delete(dir.path(), host.name());
                panic!("create O: {e}");
            }
        };
        let lab = Lab {
            dir,
            host,
            out,
            tasks: Vec::new(),
        };
        let h = Handle::new(&lab.host).await.unwrap();
        let o = Handle::new(&lab.out).await.unwrap();
        h.add_veth("up0", "up1", Some(&lab.out), Some(UNDERLAY_MTU))
            .await
            .unwrap();
        for (hd, dev, ip) in [(&h, "up0", H_IP), (&o, "up1", O_IP)] {
            hd.add_address(dev, ip, 24).await.unwrap();
            hd.set_up(dev).await.unwrap();
            hd.set_up("lo").await.unwrap();
        }
        h.add_default_route(O_IP).await.unwrap();
        lab
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("exec-root")
    }

    /// An overlay in H (as a meshd would run there), with the gateway.
    async fn overlay(&self) -> Overlay {
        Overlay::new_in(
            OverlayConfig {
                vtep: H_IP,
                vxlan_port: 4789,
                mtu: None,
                gateway: Some(GatewayConfig::new(self.state_dir())),
            },
            Arc::new(NoHolders),
            self.host.try_clone().unwrap(),
        )
        .await
        .expect("overlay")
    }

    /// A new task: `sleep` in a new network namespace (made by the child itself).
    fn task(&mut self, id: &str) -> usize {
        let mut cmd = Command::new("sleep");
        cmd.arg("60").stdin(Stdio::null());
        // SAFETY: unshare is async-signal-safe and touches only the child.
        unsafe {
            cmd.pre_exec(|| {
                if libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn a task");
        self.tasks.push(Task {
            id: id.to_string(),
            child,
        });
        self.tasks.len() - 1
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for t in &mut self.tasks {
            t.kill();
        }
        for ns in [&self.host, &self.out] {
            if let Err(e) = Netns::delete(self.dir.path(), ns.name()) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// Runs a command inside `ns` (spawned from a thread that entered it).
fn run_in(ns: &Netns, args: &[&str]) -> (bool, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::block_in_place(|| {
        ns.run(move || {
            let out = Command::new(&args[0])
                .args(&args[1..])
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", args[0]));
            (
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            )
        })
        .expect("enter namespace")
    })
}

fn ping(ns: &Netns, ip: Ipv4Addr, wait_s: u32) -> bool {
    let w = wait_s.to_string();
    let ip = ip.to_string();
    run_in(ns, &["ping", "-n", "-q", "-c", "1", "-W", &w, &ip]).0
}

fn read_in(ns: &Netns, path: &'static str) -> String {
    ns.run(move || std::fs::read_to_string(path).expect("read"))
        .expect("enter namespace")
        .trim()
        .to_string()
}

/// The peer address O sees for a TCP connection from `from`.
fn peer_seen_by_outside(lab: &Lab, from: &Netns) -> Ipv4Addr {
    let listener = lab
        .out
        .run(|| TcpListener::bind((O_IP, 0)))
        .unwrap()
        .expect("listen in O");
    let addr = listener.local_addr().unwrap();
    let _conn = from
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(3)))
        .unwrap()
        .expect("connect from the task to O");
    let (_s, peer) = listener.accept().expect("accept in O");
    match peer {
        SocketAddr::V4(p) => *p.ip(),
        SocketAddr::V6(p) => panic!("v6 peer {p}"),
    }
}

fn ids(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

async fn wait_link_gone(h: &Handle, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.link_index(name).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "{name} still there");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_get_a_masqueraded_default_route_and_no_path_to_each_other() {
    if !root_or_skip() {
        return;
    }
    let root_forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let mut lab = Lab::new().await;
    let ov = lab.overlay().await;
    assert_eq!(ov.underlay_mtu(), UNDERLAY_MTU);
    assert_eq!(ov.mtu(), UNDERLAY_MTU - 50);
    let (i1, i2) = (lab.task("task-1"), lab.task("task-2"));
    let ip1 = ov
        .attach_gateway(lab.tasks[i1].pid(), "task-1", "eth1")
        .await
        .unwrap();
    let ip2 = ov
        .attach_gateway(lab.tasks[i2].pid(), "task-2", "eth1")
        .await
        .unwrap();
    assert_eq!(ip1, Ipv4Addr::new(172, 18, 0, 2));
    assert_eq!(ip2, Ipv4Addr::new(172, 18, 0, 3));
    let (t1, t2) = (lab.tasks[i1].ns(), lab.tasks[i2].ns());

    // Inside the task: ethN with its address, the underlay MTU, the default route.
    let (ok, routes) = run_in(&t1, &["ip", "-4", "route", "show", "default"]);
    assert!(ok, "{routes}");
    assert_eq!(routes.lines().count(), 1, "{routes}");
    assert!(
        routes.starts_with("default via 172.18.0.1 dev eth1 "),
        "{routes}"
    );
    let th = Handle::new(&t1).await.unwrap();
    assert_eq!(th.addresses("eth1").await.unwrap(), vec![(ip1, 16)]);
    let eth = th.link("eth1").await.unwrap().unwrap();
    assert_eq!(eth.mtu, Some(UNDERLAY_MTU));
    assert_eq!(eth.mac, Some(mesh_netlink::mac_for_ip(ip1)));

    // In H: the bridge with the gateway address, isolated ports, forwarding, the table.
    let h = Handle::new(&lab.host).await.unwrap();
    let br = h.link(GW_BRIDGE).await.unwrap().expect("bridge");
    assert_eq!(br.kind.as_deref(), Some("bridge"));
    assert_eq!(br.mtu, Some(UNDERLAY_MTU));
    assert!(br.up);
    assert_eq!(h.addresses(GW_BRIDGE).await.unwrap(), vec![(GW, 16)]);
    let ports: Vec<_> = h
        .links()
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.master == Some(br.index))
        .collect();
    assert_eq!(ports.len(), 2, "{ports:?}");
    for p in &ports {
        assert!(p.name.starts_with("gw") && p.name.len() == 10, "{p:?}");
        assert_eq!(h.port_isolated(&p.name).await.unwrap(), Some(true));
    }
    assert_eq!(h.port_isolated("up0").await.unwrap(), None);
    assert_eq!(read_in(&lab.host, "/proc/sys/net/ipv4/ip_forward"), "1");
    let (ok, table) = run_in(&lab.host, &["nft", "list", "table", "ip", "mesh_gw"]);
    assert!(ok, "{table}");
    assert!(table.contains("masquerade"), "{table}");

    // Out through H, masqueraded.
    assert!(ping(&t1, GW, 2), "task 1 cannot ping the gateway");
    assert!(ping(&t1, O_IP, 2), "task 1 cannot ping the outside");
    assert!(ping(&t2, O_IP, 2), "task 2 cannot ping the outside");
    assert_eq!(peer_seen_by_outside(&lab, &t1), H_IP);
    assert_eq!(peer_seen_by_outside(&lab, &t2), H_IP);

    // No path between tasks: not on the bridge, not routed via the gateway.
    assert!(!ping(&t1, ip2, 1), "task 1 reached task 2");
    // Both route to the other via the gateway: only the forward chain stops that.
    for (t, peer) in [(&t1, ip2), (&t2, ip1)] {
        let dst = format!("{peer}/32");
        let (ok, out) = run_in(t, &["ip", "route", "add", &dst, "via", "172.18.0.1"]);
        assert!(ok, "{out}");
    }
    assert!(
        !ping(&t2, ip1, 1),
        "task 2 reached task 1 through the gateway"
    );

    // The root namespace was never touched.
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        root_forward
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_is_idempotent_and_a_restart_reuses_no_address() {
    if !root_or_skip() {
        return;
    }
    let mut lab = Lab::new().await;
    let ov = lab.overlay().await;
    let (i1, i2) = (lab.task("task-1"), lab.task("task-2"));
    let pid1 = lab.tasks[i1].pid();
    let ip1 = ov.attach_gateway(pid1, "task-1", "eth0").await.unwrap();
    let h = Handle::new(&lab.host).await.unwrap();
    let t1 = lab.tasks[i1].ns();
    let veth = {
        let th = Handle::new(&t1).await.unwrap();
        th.link_index("eth0").await.unwrap().expect("eth0")
    };
    // Again: same address, same interface (not recreated), ruleset applied once more.
    assert_eq!(
        ov.attach_gateway(pid1, "task-1", "eth0").await.unwrap(),
        ip1
    );
    let th = Handle::new(&t1).await.unwrap();
    assert_eq!(th.link_index("eth0").await.unwrap(), Some(veth));
    assert!(ping(&t1, O_IP, 2));
    let (ok, table) = run_in(&lab.host, &["nft", "list", "table", "ip", "mesh_gw"]);
    assert!(ok, "{table}");
    assert_eq!(table.matches("masquerade").count(), 1, "{table}");

    // A restarted meshd: same state dir, new instance.
    drop(ov);
    let ov2 = lab.overlay().await;
    assert_eq!(
        ov2.gateway_leases()
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        vec![("task-1".to_string(), ip1)]
    );
    let ip2 = ov2
        .attach_gateway(lab.tasks[i2].pid(), "task-2", "eth0")
        .await
        .unwrap();
    assert_ne!(ip2, ip1);
    assert_eq!(
        ov2.attach_gateway(pid1, "task-1", "eth0").await.unwrap(),
        ip1
    );
    assert!(ping(&lab.tasks[i2].ns(), O_IP, 2));
    assert!(ping(&t1, O_IP, 2));
    let br = h.link_index(GW_BRIDGE).await.unwrap().unwrap();
    let ports = h
        .links()
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.master == Some(br))
        .count();
    assert_eq!(ports, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_frees_the_addresses_of_gone_tasks() {
    if !root_or_skip() {
        return;
    }
    let mut lab = Lab::new().await;
    let ov = lab.overlay().await;
    let idx: Vec<usize> = ["task-1", "task-2", "task-3"]
        .iter()
        .map(|id| lab.task(id))
        .collect();
    let mut ips = Vec::new();
    for &i in &idx {
        let (pid, id) = (lab.tasks[i].pid(), lab.tasks[i].id.clone());
        ips.push(ov.attach_gateway(pid, &id, "eth0").await.unwrap());
    }
    let h = Handle::new(&lab.host).await.unwrap();
    let veth_of = |h: Handle| async move {
        let br = h.link_index(GW_BRIDGE).await.unwrap().unwrap();
        h.links()
            .await
            .unwrap()
            .into_iter()
            .filter(|l| l.master == Some(br))
            .map(|l| l.name)
            .collect::<BTreeSet<_>>()
    };
    let ports = veth_of(h.clone()).await;
    assert_eq!(ports.len(), 3);

    // Just attached, not yet running (still in their start gate): spared.
    ov.gc_gateway(&ids(&[])).await.unwrap();
    assert_eq!(ov.gateway_leases().unwrap().len(), 3);

    // Task 1's namespace goes away: its veth goes with it, gc frees its address.
    let before: BTreeSet<String> = veth_of(h.clone()).await;
    lab.tasks[idx[0]].kill();
    let deadline = Instant::now() + Duration::from_secs(5);
    while veth_of(h.clone()).await.len() == 3 {
        assert!(Instant::now() < deadline, "task 1's veth still there");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ov.gc_gateway(&ids(&["task-2"])).await.unwrap();
    let leases = ov.gateway_leases().unwrap();
    assert_eq!(
        leases.keys().cloned().collect::<BTreeSet<_>>(),
        ids(&["task-2", "task-3"])
    );

    // A restarted meshd knows nothing of starting tasks: task 3, not running, is removed
    // (veth deleted, address freed); task 2, running, stays.
    drop(ov);
    let ov2 = lab.overlay().await;
    let t3 = lab.tasks[idx[2]].ns();
    ov2.gc_gateway(&ids(&["task-2"])).await.unwrap();
    assert_eq!(
        ov2.gateway_leases()
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        vec![("task-2".to_string(), ips[1])]
    );
    let th3 = Handle::new(&t3).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while th3.link_index("eth0").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "task 3 kept its gateway interface"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = veth_of(h.clone()).await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left.is_subset(&before));

    // A gateway veth without a lease (a crash before the lease was written): removed.
    h.add_veth("gw0000beef", "gq0000beef", None, None)
        .await
        .unwrap();
    h.set_master("gw0000beef", GW_BRIDGE).await.unwrap();
    ov2.gc_gateway(&ids(&["task-2"])).await.unwrap();
    wait_link_gone(&h, "gw0000beef").await;
    assert_eq!(veth_of(h.clone()).await, left);

    // Freed addresses are not handed out again at once (round robin).
    let i4 = lab.task("task-4");
    let ip4 = ov2
        .attach_gateway(lab.tasks[i4].pid(), "task-4", "eth0")
        .await
        .unwrap();
    assert_eq!(ip4, Ipv4Addr::new(172, 18, 0, 5));
    assert!(!ips.contains(&ip4));

    // release_gateway: explicit, idempotent.
    ov2.release_gateway("task-4").await.unwrap();
    ov2.release_gateway("task-4").await.unwrap();
    assert!(!ov2.gateway_leases().unwrap().contains_key("task-4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_gateway_config_there_is_no_gateway() {
    if !root_or_skip() {
        return;
    }
    let mut lab = Lab::new().await;
    let ov = Overlay::new_in(
        OverlayConfig {
            vtep: H_IP,
            vxlan_port: 4789,
            mtu: Some(1300),
            gateway: None,
        },
        Arc::new(NoHolders),
        lab.host.try_clone().unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(ov.mtu(), 1300);
    let i = lab.task("task-1");
    let err = ov
        .attach_gateway(lab.tasks[i].pid(), "task-1", "eth0")
        .await
        .unwrap_err();
    assert!(matches!(err, OverlayError::NoGateway), "{err}");
    ov.gc_gateway(&ids(&[])).await.unwrap();
    let h = Handle::new(&lab.host).await.unwrap();
    assert!(h.link(GW_BRIDGE).await.unwrap().is_none());
    let (ok, out) = run_in(&lab.host, &["nft", "list", "tables"]);
    assert!(ok && !out.contains("mesh_gw"), "{out}");

    // A bad subnet is refused up front.
    let err = Overlay::new_in(
        OverlayConfig {
            vtep: H_IP,
            vxlan_port: 4789,
            mtu: None,
            gateway: Some(GatewayConfig {
                subnet: "172.18.0.1/16".into(),
                state_dir: lab.state_dir(),
            }),
        },
        Arc::new(NoHolders),
        lab.host.try_clone().unwrap(),
    )
    .await
    .err()
    .expect("a bad subnet");
    assert!(err.to_string().contains("host bits set"), "{err}");
}
