//! Real-kernel tests of the routing mesh; they need root and `nft`.
//!
//! Not root (or no `nft`): prints "skipped: <reason>" and passes, unless `CI` is set (to
//! anything but "", "0" or "false"): then it fails.
//!
//! Nothing is added to the namespace the tests run in. Each test builds its own world of
//! namespaces named `ingt-<pid>-<n>-*` (bind-mounted under `/run/netns`, so `ip netns exec`
//! can look inside while a test runs):
//!
//! ```text
//!   client 192.168.77.100 --+                       +-- t0 eth0 10.0.0.5 --+
//!                           | u: bridge br0         |   t1 eth0 10.0.0.6   | o: bridge br0
//!   host 192.168.77.10 -----+  (the underlay)       |   t2 eth0 10.0.0.7 --+ (stands in for
//!     mesh_ingr0 169.254.77.1 == mi0 169.254.77.2 sandbox s eth0 10.0.0.2 -+  the ingress overlay)
//!     gwt0 172.18.77.1 ============================ t0 eth1 172.18.77.5 (its "gateway bridge"
//!                                                   leg, default route; for host-mode ports)
//! ```
//!
//! The [`Ingress`] runs on `host` with sandbox `s`. Every task serves TCP 8080 (answers
//! `<task> <peer address>\n`, then echoes lines) and UDP 5353 (answers `<task> <peer
//! address>`), from threads of this process whose sockets were made inside the task's
//! namespace. Clients are threads inside the client (or host) namespace. The `Lab` stops the
//! servers and deletes every namespace on drop, also on panic; the kernel removes the rest
//! (links, nftables tables, conntrack) with the namespaces. Every wait is bounded.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mesh_ingress::{HostPort, Ingress, IngressConfig, IngressError, Proto, PublishedEntry};
use mesh_netlink::{nft, Handle, Netns};

const HOST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 10);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 100);
const SBOX_OV_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const TASK_IPS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 0, 0, 5),
    Ipv4Addr::new(10, 0, 0, 6),
    Ipv4Addr::new(10, 0, 0, 7),
];
const GW_HOST_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 77, 1);
const GW_TASK_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 77, 5);
const TCP_TARGET: u16 = 8080;
const UDP_TARGET: u16 = 5353;
/// t0's UDP server for host-mode ports: a UDP port served through the routing mesh answers
/// from the task's ingress address (`return_path::add_routes`), so host mode has its own.
const HOST_UDP_TARGET: u16 = 5354;
const OVERLAY_MTU: u32 = 1450;

use mesh_netns::serial::{Ctx, TestResult};
use mesh_netns::serial_ensure as ensure;

// ---------------------------------------------------------------------------
// The lab

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Deletes the namespaces it made, on drop.
struct NsGuard {
    dir: PathBuf,
    prefix: String,
    names: Vec<String>,
}

impl NsGuard {
    fn create(&mut self, suffix: &str) -> Result<Netns, String> {
        let name = format!("{}{suffix}", self.prefix);
        let ns = Netns::create(&self.dir, &name).ctx(&format!("create namespace {name}"))?;
        self.names.push(name);
        Ok(ns)
    }
}

impl Drop for NsGuard {
    fn drop(&mut self) {
        for name in &self.names {
            if let Err(e) = Netns::delete(&self.dir, name) {
                eprintln!("warning: cannot delete namespace {name}: {e}");
            }
        }
    }
}

struct Lab {
    rt: tokio::runtime::Runtime,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    host: Netns,
    client: Netns,
    sandbox: Netns,
    tasks: Vec<Netns>,
    // Last: the namespaces are deleted after everything above is dropped.
    _guard: NsGuard,
}

impl Lab {
    fn new() -> Result<Lab, String> {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let mut guard = NsGuard {
            dir: PathBuf::from("/run/netns"),
            prefix: format!("ingt-{}-{n}-", std::process::id()),
            names: Vec::new(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ctx("tokio runtime")?;
        let under = guard.create("u")?;
        let host = guard.create("h")?;
        let client = guard.create("c")?;
        let overlay = guard.create("o")?;
        let sandbox = guard.create("s")?;
        let tasks = (0..3)
            .map(|i| guard.create(&format!("t{i}")))
            .collect::<Result<Vec<_>, _>>()?;
        rt.block_on(async {
            let u = Handle::new(&under).await?;
            let h = Handle::new(&host).await?;
            let c = Handle::new(&client).await?;
            let o = Handle::new(&overlay).await?;
            let s = Handle::new(&sandbox).await?;
            u.add_bridge("br0", None).await?;
            u.set_up("br0").await?;
            o.add_bridge("br0", Some(OVERLAY_MTU)).await?;
            o.set_up("br0").await?;
            // The underlay: host and client on u's bridge.
            for (hd, port, ip) in [(&h, "uh", HOST_IP), (&c, "uc", CLIENT_IP)] {
                hd.add_veth("u0", port, Some(&under), None).await?;
                u.set_master(port, "br0").await?;
                u.set_up(port).await?;
                hd.add_address("u0", ip, 24).await?;
                hd.set_up("u0").await?;
                hd.set_up("lo").await?;
            }
            // The "ingress overlay": the sandbox and the tasks on o's bridge.
            let mut ov = vec![(s.clone(), "os".to_string(), SBOX_OV_IP)];
            for (i, t) in tasks.iter().enumerate() {
                ov.push((Handle::new(t).await?, format!("ot{i}"), TASK_IPS[i]));
            }
            for (hd, port, ip) in &ov {
                hd.add_veth("eth0", port, Some(&overlay), Some(OVERLAY_MTU))
                    .await?;
                o.set_master(port, "br0").await?;
                o.set_up(port).await?;
                // Overlay MACs are 02:42 + the address, as the overlay makes them: the
                // tasks' return path reads the sandbox's address from its MAC.
                hd.set_mac("eth0", mesh_netlink::mac_for_ip(*ip)).await?;
                hd.add_address("eth0", *ip, 24).await?;
                hd.set_up("eth0").await?;
                hd.set_up("lo").await?;
            }
            // t0's "gateway bridge" leg, for host-mode ports.
            let t0 = &ov[1].0;
            h.add_veth("gwt0", "eth1", Some(&tasks[0]), None).await?;
            h.add_address("gwt0", GW_HOST_IP, 24).await?;
            h.set_up("gwt0").await?;
            t0.add_address("eth1", GW_TASK_IP, 24).await?;
            t0.set_up("eth1").await?;
            t0.add_default_route_dev(GW_HOST_IP, "eth1").await?;
            // t1 and t2 route everything else to an address nobody has: only their return
            // path brings replies to clients back to the sandbox.
            for (hd, _, _) in &ov[2..] {
                hd.add_default_route_dev(Ipv4Addr::new(10, 0, 0, 254), "eth0")
                    .await?;
            }
            Ok::<_, mesh_netlink::NetlinkError>(())
        })
        .ctx("plumbing")?;
        // Every task's way back to the sandbox for the connections it balanced.
        for t in &tasks {
            mesh_ingress::return_path::setup_table(t, "eth0", None).ctx("return path")?;
            rt.block_on(mesh_ingress::return_path::add_routes(
                t,
                "eth0",
                &[SBOX_OV_IP],
                &[UDP_TARGET],
            ))
            .ctx("return routes")?;
        }
        // Clients reuse ports in TIME_WAIT (long load runs would run out of ports otherwise),
        // which also exercises conntrack's reopening of TIME_WAIT entries on the way.
        for ns in [&client, &host] {
            ns.run(|| std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1"))
                .ctx("enter")?
                .ctx("tcp_tw_reuse")?;
        }
        let mut lab = Lab {
            rt,
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            host,
            client,
            sandbox,
            tasks,
            _guard: guard,
        };
        for i in 0..3 {
            lab.tcp_server(i, TCP_TARGET)?;
            lab.udp_server(i, UDP_TARGET)?;
            if i == 0 {
                lab.udp_server(i, HOST_UDP_TARGET)?;
            }
        }
        Ok(lab)
    }

    /// TCP server in task `i` on `0.0.0.0:port`: `t<i> <peer ip>\n`, then echoes lines.
    fn tcp_server(&mut self, i: usize, port: u16) -> TestResult {
        let listener = self.tasks[i]
            .run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))
            .ctx("enter task")?
            .ctx(&format!("bind tcp {port} in t{i}"))?;
        listener.set_nonblocking(true).ctx("nonblocking")?;
        let stop = self.stop.clone();
        let name = format!("t{i}");
        self.servers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if !readable(&listener, 50) {
                    continue;
                }
                let Ok((stream, peer)) = listener.accept() else {
                    continue;
                };
                let (stop, name) = (stop.clone(), name.clone());
                std::thread::spawn(move || serve_tcp(stream, &name, peer.ip(), &stop));
            }
        }));
        Ok(())
    }

    /// UDP server in task `i` on `0.0.0.0:port`: answers `t<i> <peer ip>`.
    fn udp_server(&mut self, i: usize, port: u16) -> TestResult {
        let sock = self.tasks[i]
            .run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)))
            .ctx("enter task")?
            .ctx(&format!("bind udp {port} in t{i}"))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .ctx("timeout")?;
        let stop = self.stop.clone();
        let name = format!("t{i}");
        self.servers.push(std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(format!("{name} {}", from.ip()).as_bytes(), from);
                }
            }
        }));
        Ok(())
    }

    fn setup(&self) -> Result<Ingress, String> {
        let host = self.host.try_clone().ctx("dup host")?;
        let sandbox = self.sandbox.try_clone().ctx("dup sandbox")?;
        self.rt
            .block_on(Ingress::setup(host, sandbox, IngressConfig::default()))
            .ctx("setup")
    }

    fn teardown(&self, ing: Ingress) -> TestResult {
        self.rt.block_on(ing.teardown()).ctx("teardown")
    }

    /// `nft list table ip mesh_ingress` in `ns` (`-a`: with rule handles), `None` if absent.
    fn listing(ns: &Netns, handles: bool) -> Result<Option<String>, String> {
        let tables = nft::output_in(ns, &["list", "tables"]).map_err(|e| e.to_string())?;
        if !tables.contains("table ip mesh_ingress") {
            return Ok(None);
        }
        let args: &[&str] = if handles {
            &["-a", "list", "table", "ip", "mesh_ingress"]
        } else {
            &["list", "table", "ip", "mesh_ingress"]
        };
        nft::output_in(ns, args)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    fn link_exists(&self, ns: &Netns, name: &str) -> Result<bool, String> {
        self.rt
            .block_on(async { Handle::new(ns).await?.link(name).await })
            .map(|l| l.is_some())
            .ctx("link")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.servers.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_tcp(stream: TcpStream, name: &str, peer: std::net::IpAddr, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut w = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    if w.write_all(format!("{name} {peer}\n").as_bytes()).is_err() {
        return;
    }
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    // Bounded: a client silent for longer than any test runs is dropped.
    let idle = load_duration() * 3 + Duration::from_secs(30);
    let mut deadline = Instant::now() + idle;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if w.write_all(line.as_bytes()).is_err() {
                    return;
                }
                deadline = Instant::now() + idle;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

fn readable(fd: &impl AsRawFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) > 0 }
}

// ---------------------------------------------------------------------------
// Clients (called inside a namespace through `Netns::run`)

/// Connects, reads the greeting line (`t<i> <peer>`), closes.
fn tcp_ask(ip: Ipv4Addr, port: u16) -> io::Result<String> {
    let s =
        TcpStream::connect_timeout(&SocketAddrV4::new(ip, port).into(), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed without a greeting",
        ));
    }
    Ok(line.trim_end().to_string())
}

/// A connected UDP socket sends one datagram and waits up to 1 s for the answer.
fn udp_ask(ip: Ipv4Addr, port: u16) -> io::Result<String> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    s.connect((ip, port))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.send(b"hello")?;
    let mut buf = [0u8; 1500];
    let n = s.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// `n` TCP connections from `ns`; the answers (`t<i> <peer>`) or the first error.
fn tcp_many(ns: &Netns, ip: Ipv4Addr, port: u16, n: usize) -> Result<Vec<String>, String> {
    ns.run(|| {
        (0..n)
            .map(|_| tcp_ask(ip, port))
            .collect::<io::Result<Vec<_>>>()
    })
    .ctx("enter")?
    .ctx(&format!("tcp {ip}:{port}"))
}

/// Answer -> (task, peer it saw).
fn split(answer: &str) -> (String, String) {
    let (t, p) = answer.split_once(' ').unwrap_or((answer, ""));
    (t.to_string(), p.to_string())
}

fn histogram(answers: &[String]) -> BTreeMap<String, usize> {
    let mut h = BTreeMap::new();
    for a in answers {
        *h.entry(split(a).0).or_default() += 1;
    }
    h
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// `mean .., p50 .., p90 .., max ..` of some durations.
fn stats(times: &mut [Duration]) -> String {
    if times.is_empty() {
        return "no samples".to_string();
    }
    times.sort();
    let total: Duration = times.iter().sum();
    format!(
        "mean {}, p50 {}, p90 {}, max {} ({} changes)",
        ms(total / times.len() as u32),
        ms(times[times.len() / 2]),
        ms(times[times.len() * 9 / 10]),
        ms(times[times.len() - 1]),
        times.len()
    )
}

/// How long the changes-under-load test changes backends: `MESH_INGRESS_LOAD_SECS`, else 3 s.
fn load_duration() -> Duration {
    let secs = std::env::var("MESH_INGRESS_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(3);
    Duration::from_secs(secs.clamp(1, 600))
}

/// Refused within `bound`: `Ok(elapsed)`.
fn expect_refused(
    what: &str,
    bound: Duration,
    f: impl FnOnce() -> io::Result<String>,
) -> Result<Duration, String> {
    let t = Instant::now();
    let res = f();
    let el = t.elapsed();
    match res {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            ensure!(el < bound, "{what}: refused, but only after {el:?}");
            Ok(el)
        }
        other => Err(format!(
            "{what}: expected a refusal, got {other:?} after {el:?}"
        )),
    }
}

// ---------------------------------------------------------------------------
// Tests

/// 60 connections from the client to host:30080 reach all 3 tasks, which see the client's
/// address; the host reaches its own published port (its underlay address and
/// 127.0.0.1); a port that is not published is refused by the host itself.
fn tcp_reaches_all_tasks() -> TestResult {
    let lab = Lab::new()?;
    let mut ing = lab.setup()?;
    let t = Instant::now();
    ing.set_published(Proto::Tcp, 30080, TCP_TARGET, &TASK_IPS)
        .ctx("set_published")?;
    println!(
        "    set_published (new port, 2 transactions): {}",
        ms(t.elapsed())
    );

    let answers = tcp_many(&lab.client, HOST_IP, 30080, 60)?;
    let h = histogram(&answers);
    println!("    60 connections client -> {HOST_IP}:30080: {h:?}");
    ensure!(h.len() == 3, "not all tasks reached: {h:?}");
    for a in &answers {
        ensure!(
            split(a).1 == CLIENT_IP.to_string(),
            "a task saw {a:?}, not the client's address {CLIENT_IP}"
        );
    }

    // The host to itself: from its own address (kept), and from 127.0.0.1 (which the host
    // masquerades to its end of the sandbox link).
    for (ip, seen) in [
        (HOST_IP, HOST_IP),
        (Ipv4Addr::LOCALHOST, Ipv4Addr::new(169, 254, 77, 1)),
    ] {
        let answers = tcp_many(&lab.host, ip, 30080, 12)?;
        println!(
            "    12 connections host -> {ip}:30080: {:?}",
            histogram(&answers)
        );
        ensure!(
            answers.iter().all(|a| split(a).1 == seen.to_string()),
            "host -> {ip}: {answers:?}, want the tasks to see {seen}"
        );
    }

    // Backend changes on an idle host.
    let mut times = Vec::new();
    for i in 0..30 {
        let set = if i % 2 == 0 {
            &TASK_IPS[..2]
        } else {
            &TASK_IPS[..]
        };
        let t = Instant::now();
        ing.set_published(Proto::Tcp, 30080, TCP_TARGET, set)
            .ctx("set_published")?;
        times.push(t.elapsed());
    }
    println!(
        "    set_published idle (backend change, 1 transaction): {}",
        stats(&mut times)
    );

    let el = expect_refused("unpublished port", Duration::from_millis(500), || {
        lab.client
            .run(|| tcp_ask(HOST_IP, 30099))
            .map_err(io::Error::other)?
    })?;
    println!("    unpublished port: refused in {}", ms(el));
    ensure!(
        ing.published()
            == vec![PublishedEntry {
                proto: Proto::Tcp,
                port: 30080,
                target: TCP_TARGET,
                backends: TASK_IPS.to_vec(),
            }],
        "published(): {:?}",
        ing.published()
    );
    lab.teardown(ing)
}

/// A UDP published port spreads new flows over the tasks and answers every datagram.
fn udp_published_port() -> TestResult {
    let lab = Lab::new()?;
    let mut ing = lab.setup()?;
    ing.set_published(Proto::Udp, 30053, UDP_TARGET, &TASK_IPS)
        .ctx("set_published")?;
    let answers = lab
        .client
        .run(|| {
            (0..30)
                .map(|_| udp_ask(HOST_IP, 30053))
                .collect::<io::Result<Vec<_>>>()
        })
        .ctx("enter")?
        .ctx("udp")?;
    let h = histogram(&answers);
    println!("    30 UDP flows client -> {HOST_IP}:30053: {h:?}");
    ensure!(h.len() >= 2, "UDP flows not spread: {h:?}");
    for a in &answers {
        ensure!(split(a).1 == CLIENT_IP.to_string(), "UDP answer {a:?}");
    }
    let a = lab
        .host
        .run(|| udp_ask(HOST_IP, 30053))
        .ctx("enter")?
        .ctx("udp from the host")?;
    println!("    UDP host -> {HOST_IP}:30053: {a}");
    lab.teardown(ing)
}

/// A UDP client that keeps sending from one socket follows its backend's removal from the
/// port: the removed task still answers (as one draining would), so only the deletion of
/// the flow's conntrack entry in the sandbox moves it; without it the flow stayed on the
/// removed task for as long as the client kept sending (kube-proxy deletes such entries).
fn udp_flow_leaves_a_removed_backend() -> TestResult {
    let lab = Lab::new()?;
    let mut ing = lab.setup()?;
    ing.set_published(Proto::Udp, 30053, UDP_TARGET, &TASK_IPS)
        .ctx("set_published")?;
    let sock = lab
        .client
        .run(|| -> io::Result<UdpSocket> {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            s.connect((HOST_IP, 30053))?;
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            Ok(s)
        })
        .ctx("enter")?
        .ctx("client socket")?;
    // One datagram; the task that answered (or none).
    let ask = |s: &UdpSocket| -> Option<String> {
        s.send(b"hello").ok()?;
        let mut buf = [0u8; 1500];
        let n = s.recv(&mut buf).ok()?;
        Some(split(&String::from_utf8_lossy(&buf[..n])).0)
    };
    let first = (0..10)
        .find_map(|_| ask(&sock))
        .ok_or("no answer to the flow")?;
    for _ in 0..5 {
        let again = ask(&sock).ok_or("the flow lost its answer")?;
        ensure!(again == first, "one flow, two backends: {first}, {again}");
    }
    let i: usize = first.trim_start_matches('t').parse().ctx("task name")?;
    let rest: Vec<Ipv4Addr> = TASK_IPS
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(_, ip)| *ip)
        .collect();
    ing.set_published(Proto::Udp, 30053, UDP_TARGET, &rest)
        .ctx("remove the flow's backend")?;
    let removed = Instant::now();
    // The flow keeps sending every 100 ms (refreshing its entry) and must reach another
    // task within 3 s (the entries go a second after the backend leaves).
    let moved = loop {
        match ask(&sock) {
            Some(t) if t != first => break t,
            _ => {}
        }
        ensure!(
            removed.elapsed() < Duration::from_secs(3),
            "the flow still reaches the removed {first} after 3 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    println!(
        "    a UDP flow on {first} moved to {moved} {} after its backend left",
        ms(removed.elapsed())
    );
    for _ in 0..5 {
        let t = ask(&sock).ok_or("the moved flow lost its answer")?;
        ensure!(t == moved, "the moved flow went back to {t}");
    }
    drop(sock);
    lab.teardown(ing)
}

/// Backends change every few milliseconds while two clients connect in loops: no
/// connection fails; connections opened before the changes (to backends later removed)
/// still work after them. Prints the time per change.
fn backend_changes_under_load() -> TestResult {
    let lab = Lab::new()?;
    let mut ing = lab.setup()?;
    ing.set_published(Proto::Tcp, 30080, TCP_TARGET, &TASK_IPS)
        .ctx("set_published")?;
    // Long-lived connections, one per task if the dice allow.
    let mut long = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while long.len() < 6 && Instant::now() < deadline {
        let s = lab
            .client
            .run(|| {
                TcpStream::connect_timeout(
                    &SocketAddrV4::new(HOST_IP, 30080).into(),
                    Duration::from_secs(2),
                )
            })
            .ctx("enter")?
            .ctx("long-lived connect")?;
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .ctx("timeout")?;
        let mut r = BufReader::new(s.try_clone().ctx("clone")?);
        let mut greeting = String::new();
        r.read_line(&mut greeting).ctx("greeting")?;
        long.push((s, r, greeting.trim_end().to_string()));
    }
    let sets: [&[Ipv4Addr]; 5] = [
        &[TASK_IPS[0]],
        &[TASK_IPS[1], TASK_IPS[2]],
        &TASK_IPS,
        &[TASK_IPS[2]],
        &[TASK_IPS[0], TASK_IPS[1]],
    ];
    let stop = AtomicBool::new(false);
    let mut times = Vec::new();
    let results = std::thread::scope(|sc| {
        let clients: Vec<_> = (0..2)
            .map(|_| {
                sc.spawn(|| {
                    lab.client.run(|| {
                        let (mut ok, mut errs) = (Vec::new(), Vec::new());
                        let end = Instant::now() + load_duration() * 3;
                        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                            match tcp_ask(HOST_IP, 30080) {
                                Ok(a) => ok.push(a),
                                Err(e) => errs.push(e.to_string()),
                            }
                        }
                        (ok, errs)
                    })
                })
            })
            .collect();
        let end = Instant::now() + load_duration();
        let mut i = 0;
        let mut err = None;
        while Instant::now() < end {
            let t = Instant::now();
            if let Err(e) = ing.set_published(Proto::Tcp, 30080, TCP_TARGET, sets[i % sets.len()]) {
                err = Some(e.to_string());
                break;
            }
            times.push(t.elapsed());
            i += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        let outs: Vec<_> = clients.into_iter().map(|c| c.join()).collect();
        (err, outs)
    });
    let (err, outs) = results;
    if let Some(e) = err {
        return Err(format!("set_published under load: {e}"));
    }
    let (mut ok, mut errs) = (Vec::new(), Vec::new());
    for o in outs {
        let (o, e) = o
            .map_err(|_| "client thread panicked".to_string())?
            .ctx("enter client")?;
        ok.extend(o);
        errs.extend(e);
    }
    println!(
        "    {} connections during {} backend changes: {:?}, {} failed",
        ok.len() + errs.len(),
        times.len(),
        histogram(&ok),
        errs.len()
    );
    println!(
        "    set_published under load (backend change, 1 transaction): {}",
        stats(&mut times)
    );
    ensure!(
        times.len() > 20,
        "too few changes ({}) to mean anything",
        times.len()
    );
    ensure!(ok.len() > 100, "too few connections ({})", ok.len());
    ensure!(
        errs.is_empty(),
        "{} connections failed during changes: {:?}",
        errs.len(),
        histogram(&errs)
    );
    // The long-lived connections survived every change.
    for (s, r, greeting) in &mut long {
        s.write_all(b"ping\n").ctx("ping")?;
        let mut line = String::new();
        r.read_line(&mut line).ctx(&format!("echo on {greeting}"))?;
        ensure!(line == "ping\n", "echo on {greeting}: {line:?}");
    }
    println!(
        "    {} long-lived connections ({:?}) still echo",
        long.len(),
        histogram(&long.iter().map(|l| l.2.clone()).collect::<Vec<_>>())
    );
    lab.teardown(ing)
}

/// No backend: TCP is reset and UDP gets port-unreachable at once; removing the port makes
/// the host refuse it; re-adding backends opens it again.
fn no_backends_and_removal_refuse() -> TestResult {
    let lab = Lab::new()?;
    let mut ing = lab.setup()?;
    ing.set_published(Proto::Tcp, 30080, TCP_TARGET, &[])
        .ctx("set_published")?;
    ing.set_published(Proto::Udp, 30053, UDP_TARGET, &[])
        .ctx("set_published")?;
    let bound = Duration::from_millis(300);
    let el = expect_refused("tcp, no backend", bound, || {
        lab.client
            .run(|| tcp_ask(HOST_IP, 30080))
            .map_err(io::Error::other)?
    })?;
    println!("    tcp, no backend: refused in {}", ms(el));
    let el = expect_refused("udp, no backend", bound, || {
        lab.client
            .run(|| udp_ask(HOST_IP, 30053))
            .map_err(io::Error::other)?
    })?;
    println!("    udp, no backend: refused in {}", ms(el));

    ing.set_published(Proto::Tcp, 30080, TCP_TARGET, &TASK_IPS[1..2])
        .ctx("set_published")?;
    let a = tcp_many(&lab.client, HOST_IP, 30080, 5)?;
    ensure!(histogram(&a).keys().eq(["t1"]), "one backend: {a:?}");

    ing.remove_published(Proto::Tcp, 30080).ctx("remove")?;
    ing.remove_published(Proto::Udp, 30053).ctx("remove")?;
    ensure!(
        ing.published().is_empty(),
        "published: {:?}",
        ing.published()
    );
    let el = expect_refused("tcp, removed", bound, || {
        lab.client
            .run(|| tcp_ask(HOST_IP, 30080))
            .map_err(io::Error::other)?
    })?;
    println!("    tcp, removed: refused in {}", ms(el));
    let t = Instant::now();
    match lab.client.run(|| udp_ask(HOST_IP, 30053)).ctx("enter")? {
        Ok(a) => return Err(format!("udp, removed: answered {a:?}")),
        Err(e) => println!("    udp, removed: {e} after {}", ms(t.elapsed())),
    }
    // No leftovers in the sandbox: no port chain, empty map.
    let listing = Lab::listing(&lab.sandbox, false)?.unwrap_or_default();
    ensure!(
        !listing.contains("chain p_"),
        "sandbox after removal:\n{listing}"
    );
    // Removing again is a no-op.
    ing.remove_published(Proto::Tcp, 30080)
        .ctx("remove twice")?;
    lab.teardown(ing)
}

/// A host-mode port goes straight to the task (which sees the client's address: no sandbox,
/// no SNAT), for TCP and UDP; it cannot take a port published through the ingress; removing
/// it closes it.
fn host_mode_port() -> TestResult {
    let lab = Lab::new()?;
    let mut ing = lab.setup()?;
    ing.set_published(Proto::Tcp, 30080, TCP_TARGET, &TASK_IPS)
        .ctx("set_published")?;
    ing.set_host_port(Proto::Tcp, 30081, GW_TASK_IP, TCP_TARGET)
        .ctx("set_host_port")?;
    ing.set_host_port(Proto::Udp, 30054, GW_TASK_IP, HOST_UDP_TARGET)
        .ctx("set_host_port")?;
    let answers = tcp_many(&lab.client, HOST_IP, 30081, 10)?;
    for a in &answers {
        ensure!(
            *a == format!("t0 {CLIENT_IP}"),
            "host-mode answer {a:?}, want t0 seeing the client {CLIENT_IP}"
        );
    }
    let a = lab
        .client
        .run(|| udp_ask(HOST_IP, 30054))
        .ctx("enter")?
        .ctx("udp host mode")?;
    ensure!(a == format!("t0 {CLIENT_IP}"), "udp host-mode answer {a:?}");
    println!("    host mode tcp and udp: t0 sees the client {CLIENT_IP}");
    let a = lab
        .host
        .run(|| tcp_ask(HOST_IP, 30081))
        .ctx("enter")?
        .ctx("host mode from the host")?;
    ensure!(a.starts_with("t0 "), "host -> own host-mode port: {a:?}");
    // The ingress port still goes through the sandbox.
    let a = tcp_many(&lab.client, HOST_IP, 30080, 3)?;
    ensure!(
        a.iter().all(|a| split(a).1 == CLIENT_IP.to_string()),
        "ingress next to host mode: {a:?}"
    );
    // A task calling the published port through its host's gateway address, balanced to
    // every task (itself included): masqueraded (the task would drop its own address as a
    // martian), so every call is answered.
    let a = tcp_many(&lab.tasks[0], GW_HOST_IP, 30080, 30)?;
    let h = histogram(&a);
    ensure!(
        h.contains_key("t0") && a.iter().all(|a| split(a).1 == SBOX_OV_IP.to_string()),
        "t0 -> its host's published port: {h:?} {a:?}"
    );
    println!("    t0 -> {GW_HOST_IP}:30080 (its own port too): {h:?}, masqueraded");

    match ing.set_host_port(Proto::Tcp, 30080, GW_TASK_IP, TCP_TARGET) {
        Err(IngressError::Conflict { .. }) => {}
        other => return Err(format!("host port over an ingress port: {other:?}")),
    }
    match ing.set_published(Proto::Tcp, 30081, TCP_TARGET, &TASK_IPS) {
        Err(IngressError::Conflict { .. }) => {}
        other => return Err(format!("ingress port over a host port: {other:?}")),
    }
    // Moving the host port elsewhere is one transaction; so is removing it.
    ing.set_host_port(Proto::Tcp, 30081, GW_TASK_IP, UDP_TARGET + 1)
        .ctx("move host port")?;
    ensure!(
        ing.host_ports().contains(&HostPort {
            proto: Proto::Tcp,
            port: 30081,
            dest: GW_TASK_IP,
            target: UDP_TARGET + 1
        }),
        "host_ports: {:?}",
        ing.host_ports()
    );
    ing.remove_host_port(Proto::Tcp, 30081)
        .ctx("remove_host_port")?;
    expect_refused("removed host port", Duration::from_millis(300), || {
        lab.client
            .run(|| tcp_ask(HOST_IP, 30081))
            .map_err(io::Error::other)?
    })?;
    lab.teardown(ing)
}

/// A restarted daemon (the `Ingress` dropped without teardown, `setup` again, under load)
/// adopts the programmed state: same entries, the same ruleset (nothing duplicated), no
/// failed connection; unchanged calls are no-ops afterwards; `sync` applies only the
/// differences. Then teardown leaves no table and no veth.
fn restart_adopts_and_teardown_cleans() -> TestResult {
    let lab = Lab::new()?;
    let mut ing = lab.setup()?;
    ing.set_published(Proto::Tcp, 30080, TCP_TARGET, &TASK_IPS)
        .ctx("set")?;
    ing.set_published(Proto::Udp, 30053, UDP_TARGET, &TASK_IPS[..2])
        .ctx("set")?;
    ing.set_published(Proto::Tcp, 30090, TCP_TARGET, &[])
        .ctx("set")?;
    ing.set_host_port(Proto::Tcp, 30081, GW_TASK_IP, TCP_TARGET)
        .ctx("set host port")?;
    let (published, host_ports) = (ing.published(), ing.host_ports());
    let before = (
        Lab::listing(&lab.host, false)?,
        Lab::listing(&lab.sandbox, false)?,
    );
    drop(ing); // a crash: nothing is cleaned up

    let stop = AtomicBool::new(false);
    let (setups, (ok, errs)) = std::thread::scope(|sc| {
        let client = sc.spawn(|| {
            lab.client.run(|| {
                let (mut ok, mut errs) = (0usize, Vec::new());
                let end = Instant::now() + Duration::from_secs(10);
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    match tcp_ask(HOST_IP, 30080) {
                        Ok(_) => ok += 1,
                        Err(e) => errs.push(e.to_string()),
                    }
                }
                (ok, errs)
            })
        });
        std::thread::sleep(Duration::from_millis(100));
        let mut setups = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let r = lab.setup();
            setups.push(r.map(|i| (i, t.elapsed())));
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Relaxed);
        let out = client.join().map_err(|_| "client panicked".to_string());
        (
            setups,
            out.and_then(|r| r.ctx("enter client"))
                .unwrap_or((0, vec!["client failed".into()])),
        )
    });
    let mut last = None;
    for s in setups {
        let (i, took) = s?;
        println!("    setup over a live state: {}", ms(took));
        last = Some(i);
    }
    let mut ing = last.ok_or("no setup")?;
    println!(
        "    {ok} connections during 3 setups, {} failed",
        errs.len()
    );
    ensure!(errs.is_empty(), "connections failed during setup: {errs:?}");
    ensure!(
        ing.published() == published,
        "adopted {:?}",
        ing.published()
    );
    ensure!(
        ing.host_ports() == host_ports,
        "adopted {:?}",
        ing.host_ports()
    );
    let after = (
        Lab::listing(&lab.host, false)?,
        Lab::listing(&lab.sandbox, false)?,
    );
    ensure!(
        before == after,
        "ruleset changed by the restart:\nbefore {before:#?}\nafter {after:#?}"
    );
    let addrs = lab
        .rt
        .block_on(async { Handle::new(&lab.host).await?.addresses("mesh_ingr0").await })
        .ctx("addresses")?;
    ensure!(
        addrs == vec![(Ipv4Addr::new(169, 254, 77, 1), 30)],
        "mesh_ingr0 addresses {addrs:?}"
    );

    // Unchanged: no transaction (rule handles stay).
    let handles = Lab::listing(&lab.sandbox, true)?;
    let t = Instant::now();
    ing.set_published(
        Proto::Tcp,
        30080,
        TCP_TARGET,
        &[TASK_IPS[2], TASK_IPS[0], TASK_IPS[1]],
    )
    .ctx("same")?;
    ing.set_host_port(Proto::Tcp, 30081, GW_TASK_IP, TCP_TARGET)
        .ctx("same host port")?;
    println!(
        "    unchanged set_published + set_host_port: {}",
        ms(t.elapsed())
    );
    ensure!(
        Lab::listing(&lab.sandbox, true)? == handles,
        "a no-op changed the sandbox"
    );

    // sync: only the differences (30080 untouched: same rule handle).
    let rule_line = |l: &Option<String>, chain: &str| -> Option<String> {
        let l = l.as_ref()?;
        let at = l.find(&format!("chain {chain} {{"))?;
        l[at..].lines().nth(1).map(str::to_string)
    };
    let h_before = rule_line(&handles, "p_tcp_30080");
    let t = Instant::now();
    ing.sync(
        &[
            PublishedEntry {
                proto: Proto::Tcp,
                port: 30080,
                target: TCP_TARGET,
                backends: TASK_IPS.to_vec(),
            },
            PublishedEntry {
                proto: Proto::Udp,
                port: 30054,
                target: UDP_TARGET,
                backends: vec![TASK_IPS[1]],
            },
        ],
        &[HostPort {
            proto: Proto::Udp,
            port: 30055,
            dest: GW_TASK_IP,
            target: HOST_UDP_TARGET,
        }],
    )
    .ctx("sync")?;
    println!(
        "    sync (2 removed, 1 added, host ports swapped): {}",
        ms(t.elapsed())
    );
    let now = Lab::listing(&lab.sandbox, true)?;
    ensure!(
        rule_line(&now, "p_tcp_30080") == h_before && h_before.is_some(),
        "sync rewrote an unchanged port: {h_before:?} -> {:?}",
        rule_line(&now, "p_tcp_30080")
    );
    let sbox = now.unwrap_or_default();
    ensure!(
        !sbox.contains("p_udp_30053")
            && !sbox.contains("p_tcp_30090")
            && sbox.contains("p_udp_30054"),
        "sandbox after sync:\n{sbox}"
    );
    let a = lab
        .client
        .run(|| udp_ask(HOST_IP, 30054))
        .ctx("enter")?
        .ctx("udp 30054")?;
    ensure!(a.starts_with("t1 "), "udp 30054: {a}");
    let a = lab
        .client
        .run(|| udp_ask(HOST_IP, 30055))
        .ctx("enter")?
        .ctx("udp 30055")?;
    ensure!(a == format!("t0 {CLIENT_IP}"), "udp 30055: {a}");

    lab.teardown(ing)?;
    ensure!(Lab::listing(&lab.host, false)?.is_none(), "host table left");
    ensure!(
        Lab::listing(&lab.sandbox, false)?.is_none(),
        "sandbox table left"
    );
    ensure!(
        !lab.link_exists(&lab.host, "mesh_ingr0")?,
        "mesh_ingr0 left"
    );
    ensure!(!lab.link_exists(&lab.sandbox, "mi0")?, "mi0 left");
    expect_refused("after teardown", Duration::from_millis(300), || {
        lab.client
            .run(|| tcp_ask(HOST_IP, 30080))
            .map_err(io::Error::other)?
    })?;
    // And it can come back.
    let mut ing = lab.setup()?;
    ensure!(
        ing.published().is_empty(),
        "state after teardown: {:?}",
        ing.published()
    );
    ing.set_published(Proto::Tcp, 30080, TCP_TARGET, &TASK_IPS)
        .ctx("set after teardown")?;
    tcp_many(&lab.client, HOST_IP, 30080, 3)?;
    lab.teardown(ing)
}

/// Someone deletes the sandbox's table and a host element behind the `Ingress`'s back: the
/// next change fails incrementally, reads the tables back and heals them.
fn heals_drift() -> TestResult {
    let lab = Lab::new()?;
    let mut ing = lab.setup()?;
    ing.set_published(Proto::Tcp, 30080, TCP_TARGET, &TASK_IPS)
        .ctx("set")?;
    ing.set_published(Proto::Udp, 30053, UDP_TARGET, &TASK_IPS)
        .ctx("set")?;
    nft::apply_in(&lab.sandbox, "delete table ip mesh_ingress\n").ctx("drift")?;
    nft::apply_in(
        &lab.host,
        "delete element ip mesh_ingress published { udp . 30053 }\n",
    )
    .ctx("drift")?;
    let t = Instant::now();
    ing.set_published(Proto::Tcp, 30080, TCP_TARGET, &TASK_IPS[..2])
        .ctx("set after drift")?;
    println!(
        "    change over a drifted ruleset (fail, read back, heal): {}",
        ms(t.elapsed())
    );
    let h = histogram(&tcp_many(&lab.client, HOST_IP, 30080, 30)?);
    ensure!(
        h.len() == 2 && !h.contains_key("t2"),
        "after healing: {h:?}"
    );
    let a = lab
        .client
        .run(|| udp_ask(HOST_IP, 30053))
        .ctx("enter")?
        .ctx("udp after healing")?;
    ensure!(
        a.ends_with(&CLIENT_IP.to_string()),
        "udp after healing: {a}"
    );
    lab.teardown(ing)
}

// ---------------------------------------------------------------------------

fn can_run() -> bool {
    let ci = std::env::var("CI")
        .map(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false"))
        .unwrap_or(false);
    // SAFETY: geteuid has no preconditions and cannot fail.
    let reason = if unsafe { libc::geteuid() } != 0 {
        Some("needs root")
    } else if Command::new("nft").arg("--version").output().is_err() {
        Some("needs nft")
    } else {
        None
    };
    match reason {
        None => true,
        Some(r) => {
            assert!(
                !ci,
                "mesh-ingress kernel tests {r}, and CI is set: failing instead of skipping"
            );
            println!("skipped: {r}");
            false
        }
    }
}

type TestFn = fn() -> TestResult;

fn main() {
    if !can_run() {
        return;
    }
    let tests: &[(&str, TestFn)] = &[
        ("tcp_reaches_all_tasks", tcp_reaches_all_tasks),
        ("udp_published_port", udp_published_port),
        (
            "udp_flow_leaves_a_removed_backend",
            udp_flow_leaves_a_removed_backend,
        ),
        ("backend_changes_under_load", backend_changes_under_load),
        (
            "no_backends_and_removal_refuse",
            no_backends_and_removal_refuse,
        ),
        ("host_mode_port", host_mode_port),
        (
            "restart_adopts_and_teardown_cleans",
            restart_adopts_and_teardown_cleans,
        ),
        ("heals_drift", heals_drift),
    ];
    mesh_netns::serial::run_serial(tests);
}
