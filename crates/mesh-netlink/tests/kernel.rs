//! Real-kernel tests of namespaces, links, addresses, routes, neighbours and
//! the VXLAN FDB; they need root.
//!
//! Not root: each test prints "skipped: needs root" and passes, unless `CI`
//! is set (to anything but "", "0" or "false"): then it fails.
//!
//! Nothing is ever added to the namespace the tests run in: every test
//! creates its own namespaces (unique names: pid + counter) under its own
//! temp dir, and the `Lab` guard deletes them on drop, also on panic.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use mesh_netlink::{format_mac, mac_for_ip, Handle, NetlinkError, Netns};

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
        "mesh-netlink kernel tests need root, and CI is set: failing instead of skipping"
    );
    eprintln!("skipped: needs root");
    false
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A temp dir holding this test's namespaces; deletes all of them on drop.
struct Lab {
    dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::Builder::new()
            .prefix("mesh-netlink-test-")
            .tempdir()
            .expect("temp dir");
        Lab { dir }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A new namespace named `<prefix>-<pid>-<n>`.
    fn ns(&self, prefix: &str) -> Netns {
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        Netns::create(self.dir(), &name).expect("create namespace")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Ok(names) = Netns::list(self.dir()) {
            for name in names {
                if let Err(e) = Netns::delete(self.dir(), &name) {
                    eprintln!("cleanup: {e}");
                }
            }
        }
    }
}

fn mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    let p = path.to_string_lossy();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(&*p))
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    let d = dir.to_string_lossy();
    mounts
        .lines()
        .filter(|l| l.split(' ').nth(1).is_some_and(|m| m.starts_with(&*d)))
        .map(str::to_string)
        .collect()
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
                .expect("spawn command");
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
    run_in(
        ns,
        &[
            "ping",
            "-n",
            "-q",
            "-c",
            "1",
            "-W",
            &wait_s.to_string(),
            &ip.to_string(),
        ],
    )
    .0
}

/// Same namespace as `ns`? (compares nsfs inodes)
fn same(a: &Netns, b: &Netns) -> bool {
    a.inode().expect("inode") == b.inode().expect("inode")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_lifecycle() {
    if !root_or_skip() {
        return;
    }
    let lab = Lab::new();
    let a = lab.ns("a");
    let b = lab.ns("b");
    let a_path: PathBuf = a.path().expect("path").to_path_buf();
    assert!(mounted(&a_path), "{a_path:?} not in /proc/mounts");
    assert_eq!(
        Netns::list(lab.dir()).unwrap(),
        vec![a.name().to_string(), b.name().to_string()]
    );

    // Exists already.
    let err = Netns::create(lab.dir(), a.name()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "cannot create network namespace {}: File exists (os error 17)",
            a_path.display()
        )
    );
    assert!(matches!(
        Netns::create(lab.dir(), "x/y"),
        Err(NetlinkError::InvalidName(_))
    ));

    // open() and run() land in the same namespace; it is not ours.
    let host = Netns::current().unwrap();
    assert_eq!(host.name(), "host");
    let a2 = Netns::open(&a_path).unwrap();
    assert_eq!(a2.name(), a.name());
    assert!(same(&a, &a2));
    assert!(!same(&a, &host));
    assert!(!same(&a, &b));
    let inside = a
        .run(|| Netns::current().and_then(|n| n.inode()))
        .unwrap()
        .unwrap();
    assert_eq!(inside, a.inode().unwrap());
    // The calling thread did not move.
    assert!(same(&Netns::current().unwrap(), &host));
    let pid_ns = Netns::open(Path::new(&format!("/proc/{}/ns/net", std::process::id()))).unwrap();
    assert!(same(&pid_ns, &host));

    // A fresh namespace has only lo, down.
    let h = Handle::new(&a).await.unwrap();
    let links = h.links().await.unwrap();
    assert_eq!(links.len(), 1, "{links:?}");
    assert_eq!(links[0].name, "lo");
    assert!(links[0].loopback && !links[0].up);
    h.set_up("lo").await.unwrap();
    assert!(h.link("lo").await.unwrap().unwrap().up);

    // delete: the mount and the file go away; idempotent.
    Netns::delete(lab.dir(), a.name()).unwrap();
    assert!(!mounted(&a_path));
    assert!(!a_path.exists());
    Netns::delete(lab.dir(), a.name()).unwrap();
    assert_eq!(Netns::list(lab.dir()).unwrap(), vec![b.name().to_string()]);
    assert!(Netns::open(&a_path).is_err());
    // Held fds keep the namespace alive (and usable) after the delete.
    assert_eq!(h.links().await.unwrap().len(), 1);

    // A name can be reused after delete; it is a new namespace.
    let a3 = Netns::create(lab.dir(), a.name()).unwrap();
    assert!(!same(&a3, &a));
    drop(a3);

    let dir = lab.dir().to_path_buf();
    drop(lab);
    assert!(
        mounts_under(&dir).is_empty(),
        "left over: {:?}",
        mounts_under(&dir)
    );
    assert!(!dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_detaches_copies_in_other_mount_namespaces() {
    if !root_or_skip() {
        return;
    }
    let lab = Lab::new();
    let a = lab.ns("m");
    let path = a.path().unwrap().to_path_buf();
    drop(a);
    // A process in a new mount namespace (a copy that holds the bind mount,
    // like a task's) that waits, then reports whether it still sees it.
    let check = format!(
        "if grep -q ' {} ' /proc/self/mounts; then echo held; else echo gone; fi",
        path.display()
    );
    let script = format!("{check}; read _; {check}");
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn unshare");
    // Wait until it runs in its own mount namespace (a copy holding the mount).
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(
        line.trim(),
        "held",
        "the copy does not hold the mount to begin with"
    );
    let child_mnt = std::fs::read_link(format!("/proc/{}/ns/mnt", child.id())).unwrap();
    assert_ne!(child_mnt, std::fs::read_link("/proc/self/ns/mnt").unwrap());
    Netns::delete(lab.dir(), path.file_name().unwrap().to_str().unwrap()).unwrap();
    drop(child.stdin.take());
    line.clear();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(line.trim(), "gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_veth_addresses_routes() {
    if !root_or_skip() {
        return;
    }
    let lab = Lab::new();
    let hns = lab.ns("h");
    let cns = lab.ns("c");
    let h = Handle::new(&hns).await.unwrap();
    let c = Handle::new(&cns).await.unwrap();
    let gw = Ipv4Addr::new(10, 97, 0, 1);
    let cip = Ipv4Addr::new(10, 97, 0, 2);

    let br = h.add_bridge("br0", None).await.unwrap();
    assert_eq!(
        h.add_bridge("br0", None).await.unwrap(),
        br,
        "add_bridge is idempotent"
    );
    h.add_address("br0", gw, 24).await.unwrap();
    h.add_address("br0", gw, 24).await.unwrap();
    assert_eq!(h.addresses("br0").await.unwrap(), vec![(gw, 24)]);

    let ve = h
        .add_veth("ve0", "eth0", Some(&cns), Some(1400))
        .await
        .unwrap();
    assert_eq!(
        h.add_veth("ve0", "eth0", Some(&cns), Some(1400))
            .await
            .unwrap(),
        ve
    );
    assert!(
        h.link_index("eth0").await.unwrap().is_none(),
        "the peer is created in c"
    );
    h.set_master("ve0", "br0").await.unwrap();
    h.set_master("ve0", "br0").await.unwrap();
    h.set_up("ve0").await.unwrap();
    h.set_up("ve0").await.unwrap();

    let links = h.links().await.unwrap();
    let ve0 = links.iter().find(|l| l.name == "ve0").unwrap();
    assert_eq!(ve0.kind.as_deref(), Some("veth"));
    assert_eq!(ve0.master, Some(br));
    assert_eq!(ve0.mtu, Some(1400));
    assert!(ve0.up);
    let br0 = links.iter().find(|l| l.name == "br0").unwrap();
    assert_eq!(br0.kind.as_deref(), Some("bridge"));
    assert!(br0.up, "bridges are created up");

    let eth0 = c.link("eth0").await.unwrap().expect("eth0 in c");
    assert_eq!(eth0.kind.as_deref(), Some("veth"));
    assert_eq!(eth0.mtu, Some(1400));
    c.set_up("lo").await.unwrap();
    c.set_mac("eth0", mac_for_ip(cip)).await.unwrap();
    c.set_up("eth0").await.unwrap();
    c.add_address("eth0", cip, 24).await.unwrap();
    c.add_default_route(gw).await.unwrap();
    c.add_default_route(gw).await.unwrap();
    assert_eq!(
        c.link("eth0").await.unwrap().unwrap().mac,
        Some(mac_for_ip(cip))
    );

    assert!(ping(&cns, gw, 2), "c cannot ping the bridge");
    assert!(ping(&hns, cip, 2), "h cannot ping c");
    // The default route is there (and only one).
    let (ok, routes) = run_in(&cns, &["ip", "-4", "route", "show", "default"]);
    assert!(ok);
    assert_eq!(
        routes.trim(),
        format!("default via {gw} dev eth0 proto static")
    );

    // route_mtu: the link toward the destination; unroutable -> first up
    // non-loopback link.
    assert_eq!(c.route_mtu(gw).await.unwrap(), Some(1400));
    assert_eq!(
        c.route_mtu(Ipv4Addr::new(192, 0, 2, 1)).await.unwrap(),
        Some(1400),
        "via default"
    );
    c.set_mtu("eth0", 1300).await.unwrap();
    assert_eq!(c.route_mtu(gw).await.unwrap(), Some(1300));
    let fallback = h.route_mtu(Ipv4Addr::new(192, 0, 2, 1)).await.unwrap();
    assert!(fallback.is_some(), "fallback to an up link");

    // rename (before up), mac, mtu, delete.
    h.add_veth("tmpa", "tmpb", None, None).await.unwrap();
    h.rename("tmpb", "tmpc").await.unwrap();
    h.rename("tmpb", "tmpc").await.unwrap();
    assert!(h.link_index("tmpb").await.unwrap().is_none());
    assert!(h.link_index("tmpc").await.unwrap().is_some());
    h.set_mtu("tmpc", 1234).await.unwrap();
    h.set_mac("tmpc", [0x02, 0, 0, 0, 0, 0x42]).await.unwrap();
    let tmpc = h.link("tmpc").await.unwrap().unwrap();
    assert_eq!(
        (tmpc.mtu, tmpc.mac),
        (Some(1234), Some([0x02, 0, 0, 0, 0, 0x42]))
    );
    h.del_link("tmpa").await.unwrap();
    h.del_link("tmpa").await.unwrap();
    assert!(
        h.link_index("tmpc").await.unwrap().is_none(),
        "the peer goes with it"
    );

    // Errors name the object and the namespace.
    let err = h
        .add_veth("ve1", "eth0", Some(&cns), None)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "cannot create veth ve1 (peer eth0) in namespace {}: File exists (os error 17)",
            hns.name()
        )
    );
    assert!(err.is_exists());
    let err = h.set_up("nope").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("link nope not found in namespace {}", hns.name())
    );
    assert!(err.is_not_found());
    let err = h.add_bridge("ve0", None).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "cannot create bridge ve0 in namespace {}: a veth link of that name exists",
            hns.name()
        )
    );
    let err = c
        .add_address("eth0", Ipv4Addr::new(10, 97, 0, 3), 33)
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "cannot add address 10.97.0.3/33 to eth0 in namespace {}: ",
            cns.name()
        )),
        "{err}"
    );
}

/// The overlay between two "hosts" A and B on a veth underlay: in each, an
/// overlay namespace with br0 (the gateway) and a vxlan created in the host
/// namespace then moved in, and a task namespace on a veth to br0. Static
/// ARP + FDB entries make task A reach task B over VXLAN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_over_vxlan() {
    if !root_or_skip() {
        return;
    }
    let lab = Lab::new();
    let gw = Ipv4Addr::new(10, 0, 9, 1);
    let vtep = [Ipv4Addr::new(10, 98, 0, 1), Ipv4Addr::new(10, 98, 0, 2)];
    let task_ip = [Ipv4Addr::new(10, 0, 9, 2), Ipv4Addr::new(10, 0, 9, 3)];
    let (vni, port, mtu) = (4096u32, 4789u16, 1450u32);
    let vx = "vx-4096";

    let hosts = [lab.ns("ha"), lab.ns("hb")];
    let overlays = [lab.ns("oa"), lab.ns("ob")];
    let tasks = [lab.ns("ta"), lab.ns("tb")];
    let mut host_h = Vec::new();
    let mut ov_h = Vec::new();
    let mut task_h = Vec::new();
    for i in 0..2 {
        host_h.push(Handle::new(&hosts[i]).await.unwrap());
        ov_h.push(Handle::new(&overlays[i]).await.unwrap());
        task_h.push(Handle::new(&tasks[i]).await.unwrap());
    }

    // Underlay: ul0 (A) <-> ul0 (B), MTU 9000.
    host_h[0]
        .add_veth("ul0", "ul0", Some(&hosts[1]), Some(9000))
        .await
        .unwrap();
    for i in 0..2 {
        let h = &host_h[i];
        h.set_up("lo").await.unwrap();
        h.set_up("ul0").await.unwrap();
        h.add_address("ul0", vtep[i], 24).await.unwrap();
    }
    // The overlay MTU derives from the underlay.
    let underlay_mtu = host_h[0].route_mtu(vtep[1]).await.unwrap();
    assert_eq!(underlay_mtu, Some(9000));

    for i in 0..2 {
        let (h, o, t) = (&host_h[i], &ov_h[i], &task_h[i]);
        let ul0 = h.link_index("ul0").await.unwrap();
        h.add_vxlan(vx, vni, port, vtep[i], ul0, Some(mtu))
            .await
            .unwrap();
        // Idempotent while it is still here.
        h.add_vxlan(vx, vni, port, vtep[i], ul0, Some(mtu))
            .await
            .unwrap();
        h.move_to_ns(vx, &overlays[i]).await.unwrap();
        assert!(h.link_index(vx).await.unwrap().is_none());

        o.add_bridge("br0", Some(mtu)).await.unwrap();
        o.add_address("br0", gw, 24).await.unwrap();
        o.set_master(vx, "br0").await.unwrap();
        o.set_up(vx).await.unwrap();
        o.add_veth("veth0", "eth0", Some(&tasks[i]), Some(mtu))
            .await
            .unwrap();
        o.set_master("veth0", "br0").await.unwrap();
        o.set_up("veth0").await.unwrap();

        t.set_up("lo").await.unwrap();
        t.set_mac("eth0", mac_for_ip(task_ip[i])).await.unwrap();
        t.set_up("eth0").await.unwrap();
        t.add_address("eth0", task_ip[i], 24).await.unwrap();
        t.add_default_route(gw).await.unwrap();
    }

    // The vxlan's UDP socket stayed in the host namespace.
    let udp_port = format!(":{port:04X} ");
    let (_, udp_host) = run_in(&hosts[0], &["cat", "/proc/thread-self/net/udp"]);
    let (_, udp_ov) = run_in(&overlays[0], &["cat", "/proc/thread-self/net/udp"]);
    assert!(
        udp_host.contains(&udp_port),
        "no vxlan socket in host A: {udp_host}"
    );
    assert!(
        !udp_ov.contains(&udp_port),
        "vxlan socket in overlay A: {udp_ov}"
    );
    let vxl = ov_h[0].link(vx).await.unwrap().unwrap();
    assert_eq!(
        (vxl.kind.as_deref(), vxl.vni, vxl.mtu),
        (Some("vxlan"), Some(vni), Some(mtu))
    );
    let (ok, details) = run_in(&overlays[0], &["ip", "-d", "link", "show", "dev", vx]);
    assert!(ok, "{details}");
    assert!(details.contains("vxlan id 4096"), "{details}");
    assert!(details.contains("dstport 4789"), "{details}");
    assert!(details.contains("nolearning"), "{details}");
    assert!(details.contains("proxy"), "{details}");

    // No peers programmed: no way across.
    assert!(
        !ping(&tasks[0], task_ip[1], 1),
        "ping worked before any peer was programmed"
    );

    // Program the peers (twice: idempotent).
    for _ in 0..2 {
        for (i, o) in ov_h.iter().enumerate() {
            let peer = 1 - i;
            let mac = mac_for_ip(task_ip[peer]);
            o.set_neighbour(vx, task_ip[peer], mac).await.unwrap();
            o.set_fdb(vx, mac, vtep[peer]).await.unwrap();
        }
    }
    let mac_b = mac_for_ip(task_ip[1]);
    assert_eq!(
        ov_h[0].neighbours(vx).await.unwrap(),
        vec![(task_ip[1], mac_b)]
    );
    assert_eq!(ov_h[0].fdb(vx).await.unwrap(), vec![(mac_b, vtep[1])]);
    let (_, fdb_text) = run_in(&overlays[0], &["bridge", "fdb", "show", "dev", vx]);
    // e.g. "02:42:0a:00:09:03 dst 10.98.0.2 link-netnsid 0 self permanent".
    // (br0 may also have learned B's MAC on the vxlan port by now: the echo
    // request queued by the first ping goes out once A's ARP resolves.)
    let line = fdb_text
        .lines()
        .find(|l| l.starts_with(&format_mac(&mac_b)) && l.contains(" self"))
        .unwrap_or_default();
    assert!(
        line.contains(&format!(" dst {} ", vtep[1])) && line.ends_with("self permanent"),
        "{fdb_text}"
    );

    assert!(
        ping(&tasks[0], task_ip[1], 2),
        "task A cannot ping task B over vxlan"
    );
    assert!(
        ping(&tasks[1], task_ip[0], 2),
        "task B cannot ping task A over vxlan"
    );
    assert!(ping(&tasks[0], gw, 2), "task A cannot ping its gateway");

    // The bridge's own FDB: B's MAC, learned on the vxlan port from B's replies, is made
    // static there (replace), and a static entry on another port is found as such; deleted,
    // it is gone, twice.
    let vx_port = ov_h[0].link_index(vx).await.unwrap().expect("vx index");
    let bridge_entry = |fdb: Vec<mesh_netlink::BridgeFdbEntry>, mac: [u8; 6]| {
        fdb.into_iter().find(|e| e.mac == mac)
    };
    let learned = bridge_entry(ov_h[0].bridge_fdb("br0").await.unwrap(), mac_b);
    assert!(
        learned.is_some_and(|e| e.port == vx_port && !e.is_static),
        "{learned:?}"
    );
    ov_h[0].set_bridge_fdb(vx, mac_b, false).await.unwrap();
    let fdb = ov_h[0].bridge_fdb("br0").await.unwrap();
    assert_eq!(
        bridge_entry(fdb, mac_b),
        Some(mesh_netlink::BridgeFdbEntry {
            mac: mac_b,
            port: vx_port,
            is_static: true
        })
    );
    let (_, fdb_text) = run_in(&overlays[0], &["bridge", "fdb", "show", "br", "br0"]);
    assert!(
        fdb_text.lines().any(|l| l.starts_with(&format_mac(&mac_b))
            && l.contains(&format!("dev {vx} master br0 static"))),
        "{fdb_text}"
    );
    let other = [0x02, 0x42, 0x0a, 0x63, 0x00, 0x63];
    let veth_a = run_in(&overlays[0], &["ip", "-o", "link", "show", "master", "br0"]).1;
    let port_a = veth_a
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .find(|n| n != vx)
        .expect("task A's port");
    ov_h[0].set_bridge_fdb(&port_a, other, true).await.unwrap();
    let e = bridge_entry(ov_h[0].bridge_fdb("br0").await.unwrap(), other);
    assert!(e.is_some_and(|e| e.is_static && e.port != vx_port), "{e:?}");
    let (_, fdb_text) = run_in(&overlays[0], &["bridge", "fdb", "show", "br", "br0"]);
    assert!(
        fdb_text.lines().any(|l| l.starts_with(&format_mac(&other))
            && l.contains(" static")
            && l.contains("sticky")),
        "{fdb_text}"
    );
    for _ in 0..2 {
        ov_h[0].del_bridge_fdb(vx, mac_b).await.unwrap();
        ov_h[0].del_bridge_fdb(&port_a, other).await.unwrap();
    }
    let fdb = ov_h[0].bridge_fdb("br0").await.unwrap();
    assert!(
        bridge_entry(fdb.clone(), mac_b).is_none() && bridge_entry(fdb.clone(), other).is_none(),
        "{fdb:?}"
    );

    // Replace: the FDB entry moves to another VTEP, then back.
    ov_h[0]
        .set_fdb(vx, mac_b, Ipv4Addr::new(10, 98, 0, 77))
        .await
        .unwrap();
    assert_eq!(
        ov_h[0].fdb(vx).await.unwrap(),
        vec![(mac_b, Ipv4Addr::new(10, 98, 0, 77))]
    );
    ov_h[0].set_fdb(vx, mac_b, vtep[1]).await.unwrap();
    assert_eq!(ov_h[0].fdb(vx).await.unwrap(), vec![(mac_b, vtep[1])]);

    // Without the FDB entry on A, A's frames to B have nowhere to go.
    ov_h[0].del_fdb(vx, mac_b, vtep[1]).await.unwrap();
    ov_h[0].del_fdb(vx, mac_b, vtep[1]).await.unwrap();
    assert!(ov_h[0].fdb(vx).await.unwrap().is_empty());
    assert!(
        !ping(&tasks[0], task_ip[1], 1),
        "ping worked without the fdb entry"
    );
    ov_h[0].set_fdb(vx, mac_b, vtep[1]).await.unwrap();
    assert!(
        ping(&tasks[0], task_ip[1], 2),
        "ping failed after restoring the fdb entry"
    );

    // Without the ARP entry (and with the task's cache flushed), ARP for B
    // goes unanswered.
    ov_h[0].del_neighbour(vx, task_ip[1]).await.unwrap();
    ov_h[0].del_neighbour(vx, task_ip[1]).await.unwrap();
    assert!(ov_h[0].neighbours(vx).await.unwrap().is_empty());
    task_h[0].del_neighbour("eth0", task_ip[1]).await.unwrap();
    assert!(
        !ping(&tasks[0], task_ip[1], 1),
        "ping worked without the neighbour entry"
    );
    ov_h[0].set_neighbour(vx, task_ip[1], mac_b).await.unwrap();
    assert!(
        ping(&tasks[0], task_ip[1], 2),
        "ping failed after restoring the neighbour"
    );

    // A second vxlan with the same VNI and port in host A clashes with the
    // one that moved out (its socket stayed here).
    let ul0 = host_h[0].link_index("ul0").await.unwrap();
    let err = host_h[0]
        .add_vxlan("vx-other", vni, port, vtep[0], ul0, None)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "cannot create vxlan vx-other in namespace {}: File exists (os error 17)",
            hosts[0].name()
        )
    );

    // Deleting a device that is gone, or entries on it, is fine.
    ov_h[0].del_link(vx).await.unwrap();
    ov_h[0].del_link(vx).await.unwrap();
    ov_h[0].del_fdb(vx, mac_b, vtep[1]).await.unwrap();
    ov_h[0].del_neighbour(vx, task_ip[1]).await.unwrap();
}

/// A handle works on a current-thread runtime too (the socket is registered
/// from the thread that entered the namespace, then driven here).
#[tokio::test(flavor = "current_thread")]
async fn handle_on_a_current_thread_runtime() {
    if !root_or_skip() {
        return;
    }
    let lab = Lab::new();
    let ns = lab.ns("ct");
    let h = Handle::new(&ns).await.unwrap();
    let br = format!("br{}", std::process::id() % 100_000);
    h.add_bridge(&br, Some(1400)).await.unwrap();
    let h2 = h.clone();
    let (a, b) = tokio::join!(h.link(&br), h2.link("lo"));
    assert_eq!(a.unwrap().unwrap().mtu, Some(1400));
    assert!(b.unwrap().unwrap().loopback);
    // Not in the namespace the tests run in.
    let host = Handle::new(&Netns::current().unwrap()).await.unwrap();
    assert_eq!(host.link_index(&br).await.unwrap(), None);
}
