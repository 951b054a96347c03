//! Real-kernel tests of a network's namespace being released and set up again at once, as in a
//! rolling update (the last local task of a network leaves, the next one arrives); they need
//! root.
//!
//! Not root: each test prints "skipped: needs root" and passes, unless `CI` is set (to
//! anything but "", "0" or "false"): then it fails.
//!
//! The kernel destroys a network namespace asynchronously (`cleanup_net`, a work queue), and a
//! VXLAN device stays registered in the VNI table of the namespace that *created* it until it is
//! unregistered. The overlay creates `vx-<vni>` in the host namespace and moves it into
//! `ov-<vni>`: if it let the kernel destroy `ov-<vni>` with the device still inside, a new
//! `vx-<vni>` made in that window would fail with `File exists` (`vxlan_vni_in_use`).
//!
//! Nothing is ever added to the namespace the tests run in. Each test builds its own world
//! under its own temp dir: a "host" namespace H (where the [`Overlay`] runs, through
//! [`Overlay::new_in`]), namespace holders that are `sleep` processes in network namespaces of
//! their own, and tasks that are `sleep` processes too. The guards kill the processes and
//! delete H on drop, also on panic; the kernel removes the rest with the namespaces. Loops are
//! bounded in rounds and in time.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_netlink::{mac_for_ip, Handle, Netns};
use mesh_overlay::{
    ns_name, Attachment, HolderError, Holders, NetworkDesc, Overlay, OverlayConfig, OverlayError,
    Remote,
};

const H_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 2);
/// Rounds of each churn loop, and the time they may take.
const ROUNDS: usize = 50;
const BUDGET: Duration = Duration::from_secs(20);

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
        "mesh-overlay churn tests need root, and CI is set: failing instead of skipping"
    );
    eprintln!("skipped: needs root");
    false
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `sleep` in a network namespace of its own (made by the child itself, before `exec`, so the
/// namespace exists when `spawn` returns).
fn sleeper() -> Child {
    let mut cmd = Command::new("sleep");
    cmd.arg("300").stdin(Stdio::null());
    // SAFETY: unshare is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().expect("spawn sleep")
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Holders as the executor's: a process per namespace; `remove` kills it (SIGKILL) and returns
/// once it is gone.
#[derive(Default)]
struct ProcHolders(Mutex<BTreeMap<String, Child>>);

impl ProcHolders {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Child>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Kills the holder of `name` behind the overlay's back (as an OOM kill or a stray
    /// `kill -9` would); its entry stays, dead, as a holder record would.
    fn kill_behind_the_back(&self, name: &str) {
        let mut m = self.map();
        let child = m.get_mut(name).expect("a holder to kill");
        kill(child);
    }
}

impl Holders for ProcHolders {
    fn ensure(&self, name: &str) -> Result<u32, HolderError> {
        let mut m = self.map();
        if let Some(c) = m.get_mut(name) {
            if matches!(c.try_wait(), Ok(None)) {
                return Ok(c.id());
            }
        }
        let child = sleeper();
        let pid = child.id();
        m.insert(name.to_string(), child);
        Ok(pid)
    }

    fn list(&self) -> Vec<(String, u32)> {
        let mut m = self.map();
        m.retain(|_, c| matches!(c.try_wait(), Ok(None)));
        m.iter().map(|(n, c)| (n.clone(), c.id())).collect()
    }

    fn remove(&self, name: &str) -> Result<(), HolderError> {
        if let Some(mut c) = self.map().remove(name) {
            kill(&mut c);
        }
        Ok(())
    }
}

impl Drop for ProcHolders {
    fn drop(&mut self) {
        for c in self.map().values_mut() {
            kill(c);
        }
    }
}

/// H, the holders and the tasks of one test; everything goes on drop.
struct Lab {
    dir: tempfile::TempDir,
    host: Netns,
    holders: Arc<ProcHolders>,
    tasks: Vec<Child>,
}

impl Lab {
    async fn new() -> Lab {
        let dir = tempfile::Builder::new()
            .prefix("mesh-overlay-churn-test-")
            .tempdir()
            .expect("temp dir");
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let host =
            Netns::create(dir.path(), &format!("h-{}-{n}", std::process::id())).expect("create H");
        let lab = Lab {
            dir,
            host,
            holders: Arc::new(ProcHolders::default()),
            tasks: Vec::new(),
        };
        // An underlay address for the VTEP: a veth pair inside H.
        let h = Handle::new(&lab.host).await.unwrap();
        h.add_veth("up0", "up1", None, None).await.unwrap();
        h.add_address("up0", H_IP, 24).await.unwrap();
        for dev in ["lo", "up0", "up1"] {
            h.set_up(dev).await.unwrap();
        }
        lab
    }

    async fn overlay(&self) -> Overlay {
        Overlay::new_in(
            OverlayConfig {
                vtep: H_IP,
                vxlan_port: 4789,
                mtu: Some(1400),
                gateway: None,
            },
            self.holders.clone(),
            self.host.try_clone().unwrap(),
        )
        .await
        .expect("overlay")
    }

    /// A new task; returns its pid.
    fn task(&mut self) -> u32 {
        let child = sleeper();
        let pid = child.id();
        self.tasks.push(child);
        pid
    }

    /// Kills the task `pid` (the task leaves).
    fn end_task(&mut self, pid: u32) {
        if let Some(i) = self.tasks.iter().position(|c| c.id() == pid) {
            kill(&mut self.tasks.remove(i));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for t in &mut self.tasks {
            kill(t);
        }
        if let Err(e) = Netns::delete(self.dir.path(), self.host.name()) {
            eprintln!("cleanup: {e}");
        }
    }
}

fn net(vni: u32, third: u8) -> NetworkDesc {
    NetworkDesc {
        vni,
        gateway: Ipv4Addr::new(10, 0, third, 1),
        prefix: 24,
        encrypted: false,
    }
}

fn attachment(network: &NetworkDesc, host: u8) -> Attachment {
    let o = network.gateway.octets();
    Attachment {
        network: network.clone(),
        ip: Ipv4Addr::new(o[0], o[1], o[2], host),
        ifname: "eth0".into(),
    }
}

/// The links of the network namespace held by `pid`: name -> kind.
async fn links_of(pid: u32) -> BTreeMap<String, Option<String>> {
    let ns = Netns::open(Path::new(&format!("/proc/{pid}/ns/net"))).expect("holder namespace");
    let h = Handle::new(&ns).await.unwrap();
    h.links()
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.name, l.kind))
        .collect()
}

/// The task's `eth0`, with its address.
async fn task_has_eth0(pid: u32, ip: Ipv4Addr) -> bool {
    let ns = Netns::open(Path::new(&format!("/proc/{pid}/ns/net"))).expect("task namespace");
    let h = Handle::new(&ns).await.unwrap();
    h.addresses("eth0").await.is_ok_and(|a| a == vec![(ip, 24)])
}

/// Asserts that no VXLAN device is left in H.
async fn no_vxlan_in_host(lab: &Lab) {
    let h = Handle::new(&lab.host).await.unwrap();
    let left: Vec<String> = h
        .links()
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.kind.as_deref() == Some("vxlan"))
        .map(|l| l.name)
        .collect();
    assert!(left.is_empty(), "VXLAN devices left in H: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_released_by_gc_can_be_set_up_again_at_once() {
    if !root_or_skip() {
        return;
    }
    let mut lab = Lab::new().await;
    let ov = lab.overlay().await;
    let (churned, kept) = (net(4097, 1), net(4098, 2));
    // A network with a task throughout: gc must leave it alone.
    let steady = lab.task();
    ov.attach(steady, &attachment(&kept, 2)).await.unwrap();
    let keep: BTreeSet<u32> = [kept.vni].into();

    let deadline = Instant::now() + BUDGET;
    let (mut rounds, mut failures) = (0, Vec::new());
    while rounds < ROUNDS && Instant::now() < deadline {
        let a = attachment(&churned, 2);
        let pid = lab.task();
        match ov.attach(pid, &a).await {
            Ok(()) => assert!(task_has_eth0(pid, a.ip).await, "round {rounds}: no eth0"),
            Err(e) => failures.push(format!("round {rounds}: {e}")),
        }
        // The last task of the network leaves: its namespace is released...
        lab.end_task(pid);
        ov.gc(&keep).await.unwrap();
        let live: Vec<String> = lab.holders.list().into_iter().map(|(n, _)| n).collect();
        assert_eq!(live, vec![ns_name(kept.vni)], "round {rounds}");
        // ...and the next round's task arrives at once.
        rounds += 1;
    }
    assert!(
        failures.is_empty(),
        "{} of {rounds} attaches failed right after a gc; first: {}",
        failures.len(),
        failures[0]
    );
    assert!(rounds >= 10, "only {rounds} rounds in {BUDGET:?}");
    eprintln!("{rounds} rounds, no failure");

    // The kept network is whole, its task still plumbed.
    let (_, holder) = lab.holders.list()[0].clone();
    let links = links_of(holder).await;
    assert_eq!(
        links.get("br0"),
        Some(&Some("bridge".to_string())),
        "{links:?}"
    );
    assert_eq!(
        links.get("vx-4098"),
        Some(&Some("vxlan".to_string())),
        "{links:?}"
    );
    assert!(task_has_eth0(steady, Ipv4Addr::new(10, 0, 2, 2)).await);

    // As meshd's stop: nothing kept, nothing left.
    lab.end_task(steady);
    ov.gc(&BTreeSet::new()).await.unwrap();
    assert!(lab.holders.list().is_empty());
    no_vxlan_in_host(&lab).await;
    // And the network can come back at once.
    let pid = lab.task();
    ov.attach(pid, &attachment(&kept, 3)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_whose_holder_died_can_be_set_up_again_at_once() {
    if !root_or_skip() {
        return;
    }
    let mut lab = Lab::new().await;
    let ov = lab.overlay().await;
    let network = net(4097, 1);
    let name = ns_name(network.vni);

    let deadline = Instant::now() + BUDGET;
    let (mut rounds, mut failures) = (0, Vec::new());
    let mut prev: Option<u32> = None;
    while rounds < ROUNDS && Instant::now() < deadline {
        let a = attachment(&network, 2 + (rounds % 2) as u8);
        let pid = lab.task();
        match ov.attach(pid, &a).await {
            Ok(()) => assert!(task_has_eth0(pid, a.ip).await, "round {rounds}: no eth0"),
            Err(e) => failures.push(format!("round {rounds}: {e}")),
        }
        if let Some(p) = prev.take() {
            lab.end_task(p);
        }
        prev = Some(pid);
        // The holder dies on its own, a task still on the network; the next round's task
        // arrives at once and gets a new namespace.
        lab.holders.kill_behind_the_back(&name);
        rounds += 1;
    }
    assert!(
        failures.is_empty(),
        "{} of {rounds} attaches failed right after the holder died; first: {}",
        failures.len(),
        failures[0]
    );
    assert!(rounds >= 10, "only {rounds} rounds in {BUDGET:?}");
    eprintln!("{rounds} rounds, no failure");

    // A last one, looked at closely: a new namespace with the bridge and the VXLAN device.
    let pid = lab.task();
    ov.attach(pid, &attachment(&network, 9)).await.unwrap();
    // The task's interface asks ARP every 100 ms, 10 broadcast probes (`NEIGH_SYSCTLS`).
    let task_ns = Netns::open(Path::new(&format!("/proc/{pid}/ns/net"))).expect("task namespace");
    let neigh = task_ns
        .run(|| {
            ["retrans_time_ms", "mcast_solicit"].map(|n| {
                std::fs::read_to_string(format!("/proc/sys/net/ipv4/neigh/eth0/{n}"))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default()
            })
        })
        .unwrap();
    assert_eq!(neigh, ["100".to_string(), "10".to_string()]);
    let holder = lab.holders.list()[0].1;
    let links = links_of(holder).await;
    assert_eq!(
        links.get("br0"),
        Some(&Some("bridge".to_string())),
        "{links:?}"
    );
    assert_eq!(
        links.get("vx-4097"),
        Some(&Some("vxlan".to_string())),
        "{links:?}"
    );
    no_vxlan_in_host(&lab).await;

    // A dead holder with no task left: gc lets go of what remains of it, and the network can
    // come back at once.
    lab.holders.kill_behind_the_back(&name);
    lab.end_task(pid);
    if let Some(p) = prev {
        lab.end_task(p);
    }
    ov.gc(&BTreeSet::new()).await.unwrap();
    assert!(lab.holders.list().is_empty());
    let pid = lab.task();
    ov.attach(pid, &attachment(&network, 2)).await.unwrap();
    ov.gc(&[network.vni].into()).await.unwrap();
    assert_eq!(lab.holders.list().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vni_taken_by_another_device_is_named() {
    if !root_or_skip() {
        return;
    }
    let mut lab = Lab::new().await;
    let ov = lab.overlay().await;
    let network = net(4097, 1);
    // A VXLAN device of H with the same VNI and port under another name: the kernel refuses a
    // second one, whatever its name and wherever it would live.
    let h = Handle::new(&lab.host).await.unwrap();
    h.add_vxlan("other0", 4097, 4789, H_IP, None, None)
        .await
        .unwrap();
    let pid = lab.task();
    let err = ov
        .attach(pid, &attachment(&network, 2))
        .await
        .expect_err("vni 4097 is taken");
    assert!(
        matches!(
            err,
            OverlayError::VniInUse {
                vni: 4097,
                port: 4789
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("vni 4097 (udp port 4789) is taken"),
        "{err}"
    );
    // Once it is gone, the same task gets the network.
    h.del_link("other0").await.unwrap();
    ov.attach(pid, &attachment(&network, 2)).await.unwrap();
    assert!(task_has_eth0(pid, Ipv4Addr::new(10, 0, 1, 2)).await);
}

/// A remote endpoint's MAC is a static entry of the network bridge's FDB on `vx-<vni>`, so
/// frames to it are never flooded to the local ports; it goes when the endpoint does. A
/// local task's MAC is one on its own port from `attach`, and a remote record of the same
/// address (its task just left another node) does not take it away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_endpoints_are_static_in_the_bridge_and_a_local_address_wins() {
    if !root_or_skip() {
        return;
    }
    let mut lab = Lab::new().await;
    let ov = lab.overlay().await;
    let network = net(4098, 2);
    let pid = lab.task();
    let local = attachment(&network, 2);
    ov.attach(pid, &local).await.unwrap();
    let holder = lab
        .holders
        .list()
        .into_iter()
        .find(|(n, _)| *n == ns_name(4098))
        .expect("the network's namespace")
        .1;
    let ns = Netns::open(Path::new(&format!("/proc/{holder}/ns/net"))).unwrap();
    let h = Handle::new(&ns).await.unwrap();
    let vx_port = h.link_index("vx-4098").await.unwrap().expect("vx-4098");
    let remote_ip = Ipv4Addr::new(10, 0, 2, 3);
    let (remote_mac, local_mac) = (mac_for_ip(remote_ip), mac_for_ip(local.ip));
    let vtep = Ipv4Addr::new(10, 96, 0, 9);
    let networks = BTreeMap::from([(4098, network.clone())]);
    let entries = || async {
        h.bridge_fdb("br0")
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.mac, e))
            .collect::<BTreeMap<_, _>>()
    };

    let remotes = BTreeMap::from([(
        4098,
        BTreeSet::from([
            Remote {
                ip: remote_ip,
                mac: remote_mac,
                vtep,
            },
            Remote {
                ip: local.ip,
                mac: local_mac,
                vtep,
            },
        ]),
    )]);
    for round in 0..2 {
        ov.sync_remotes(&networks, &remotes, &BTreeSet::new())
            .await
            .unwrap();
        let fdb = entries().await;
        let remote = fdb.get(&remote_mac).expect("the remote endpoint's entry");
        assert!(
            remote.is_static && remote.port == vx_port,
            "round {round}: {remote:?}"
        );
        let mine = fdb.get(&local_mac).expect("the local task's entry");
        assert!(
            mine.is_static && mine.port != vx_port,
            "round {round}: the local task's entry moved to vx-4098: {mine:?}"
        );
    }

    let gone = BTreeMap::from([(4098, BTreeSet::new())]);
    ov.sync_remotes(&networks, &gone, &BTreeSet::new())
        .await
        .unwrap();
    let fdb = entries().await;
    assert!(!fdb.contains_key(&remote_mac), "{fdb:?}");
    assert!(
        fdb.get(&local_mac).is_some_and(|e| e.port != vx_port),
        "{fdb:?}"
    );
}
