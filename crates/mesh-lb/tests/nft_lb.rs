//! Real-kernel tests of the nftables load balancer ([`mesh_lb::NftLb`]); they need root and
//! `nft`, `ip`.
//!
//! Not root (or no `nft`/`ip`): prints "skipped: <reason>" and passes, unless `CI` is set (to
//! anything but "", "0" or "false"): then it fails.
//!
//! Nothing is added to the namespace the tests run in. Each test builds a `Lab` of its own
//! namespaces, named `nftlb-<pid>-<n>-<role>` (`ip netns add`): a bridge namespace `br`
//! (bridge `br0`), a client `c` (10.77.0.1/24, the VIP 10.255.0.1/32 on `lo`, and the
//! `NftLb`) and three servers `s1..s3` (10.77.0.11-13/24), each joined to the bridge by a
//! veth pair. Servers are threads of this process serving sockets made inside their
//! namespace; they answer `<id> <peer address>`, so a test sees which backend answered and
//! from which source the backend saw the client. Clients are threads inside the client
//! namespace. The `Lab` stops the servers and deletes its namespaces on drop, also on panic.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mesh_lb::{LbError, NftLb, Proto, ServiceEntry};
use mesh_netlink::{nft, Netns};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const SERVERS: [(&str, Ipv4Addr); 3] = [
    ("s1", Ipv4Addr::new(10, 77, 0, 11)),
    ("s2", Ipv4Addr::new(10, 77, 0, 12)),
    ("s3", Ipv4Addr::new(10, 77, 0, 13)),
];

use mesh_netns::serial::{Ctx, TestResult};
use mesh_netns::serial_ensure as ensure;

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd).args(args).output().ctx(cmd)?;
    ensure!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip_of(name: &str) -> Ipv4Addr {
    SERVERS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, a)| *a)
        .expect("a server name")
}

fn addrs(names: &[&str]) -> Vec<Ipv4Addr> {
    names.iter().map(|n| ip_of(n)).collect()
}

// ---------------------------------------------------------------------------
// The lab

static SEQ: AtomicU32 = AtomicU32::new(0);

struct Lab {
    prefix: String,
    /// Namespaces made so far (deleted on drop).
    made: Vec<String>,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
}

impl Lab {
    fn new() -> Result<Lab, String> {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let mut lab = Lab {
            prefix: format!("nftlb-{}-{n}", std::process::id()),
            made: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
        };
        // From here on, Drop cleans up whatever was made.
        let br = lab.add_ns("br")?;
        run("ip", &["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &br, "link", "set", "br0", "up"])?;
        let mut members = vec![("c", CLIENT)];
        members.extend(SERVERS);
        for (role, addr) in members {
            let ns = lab.add_ns(role)?;
            let port = format!("v{role}");
            run(
                "ip",
                &[
                    "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ],
            )?;
            run(
                "ip",
                &["-n", &br, "link", "set", &port, "master", "br0", "up"],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    "eth0",
                ],
            )?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        // The caller of NftLb puts the VIP on the task's lo.
        run(
            "ip",
            &[
                "-n",
                &lab.ns("c"),
                "addr",
                "add",
                &format!("{VIP}/32"),
                "dev",
                "lo",
            ],
        )?;
        Ok(lab)
    }

    fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    fn add_ns(&mut self, role: &str) -> Result<String, String> {
        let name = self.ns(role);
        run("ip", &["netns", "add", &name])?;
        self.made.push(name.clone());
        run("ip", &["-n", &name, "link", "set", "lo", "up"])?;
        Ok(name)
    }

    fn netns(&self, role: &str) -> Result<Netns, String> {
        Netns::open(&PathBuf::from("/run/netns").join(self.ns(role))).ctx("open netns")
    }

    /// A balancer in the client namespace.
    fn lb(&self) -> Result<NftLb, String> {
        NftLb::new(Some(self.netns("c")?)).ctx("NftLb::new")
    }

    /// Runs `f` on a thread inside namespace `role` (sockets made there stay there).
    fn in_ns<T: Send + 'static>(
        &self,
        role: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        let ns = File::open(PathBuf::from("/run/netns").join(self.ns(role))).ctx("open netns")?;
        std::thread::spawn(move || {
            // SAFETY: setns on this thread only, with a valid namespace fd.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("setns: {}", std::io::Error::last_os_error()));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| "netns thread panicked".to_string())?
    }

    /// Like [`Lab::in_ns`], but returns at once: `f` runs on its own thread.
    fn spawn_in_ns<T: Send + 'static>(
        &self,
        role: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<JoinHandle<Result<T, String>>, String> {
        let ns = File::open(PathBuf::from("/run/netns").join(self.ns(role))).ctx("open netns")?;
        Ok(std::thread::spawn(move || {
            // SAFETY: setns on this thread only, with a valid namespace fd.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("setns: {}", std::io::Error::last_os_error()));
            }
            Ok(f())
        }))
    }

    /// In every server namespace: TCP on ports 80 and 8080 answering `<id>:<port> <peer ip>`
    /// and closing, UDP on 53 answering `<id> <peer ip> <payload>`.
    fn start_servers(&mut self) -> TestResult {
        for (id, _) in SERVERS {
            for port in [80u16, 8080] {
                let listener = self
                    .in_ns(id, move || TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))?
                    .ctx(&format!("bind tcp {port} in {id}"))?;
                listener.set_nonblocking(true).ctx("nonblocking")?;
                let stop = self.stop.clone();
                self.servers.push(std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if !readable(&listener, 50) {
                            continue;
                        }
                        if let Ok((mut s, peer)) = listener.accept() {
                            let _ = s.set_nonblocking(false);
                            let _ = s.write_all(format!("{id}:{port} {}", peer.ip()).as_bytes());
                        }
                    }
                }));
            }
            let sock = self
                .in_ns(id, || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 53)))?
                .ctx(&format!("bind udp 53 in {id}"))?;
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .ctx("timeout")?;
            let stop = self.stop.clone();
            self.servers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((len, from)) = sock.recv_from(&mut buf) {
                        let reply = format!(
                            "{id} {} {}",
                            from.ip(),
                            String::from_utf8_lossy(&buf[..len])
                        );
                        let _ = sock.send_to(reply.as_bytes(), from);
                    }
                }
            }));
        }
        Ok(())
    }

    /// `nft ARGS` in namespace `role`.
    fn nft(&self, role: &str, args: &[&str]) -> Result<String, String> {
        nft::output_in(&self.netns(role)?, args).map_err(|e| e.to_string())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.servers.drain(..) {
            let _ = t.join();
        }
        for ns in self.made.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
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

/// One TCP exchange: `Ok((answer, peer address the client sees))` or the errno.
fn tcp_once(port: u16) -> Result<(String, SocketAddr), i32> {
    let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(-1);
    let mut s = TcpStream::connect_timeout(&SocketAddr::from((VIP, port)), Duration::from_secs(2))
        .map_err(errno)?;
    let peer = s.peer_addr().map_err(errno)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(errno)?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(errno)?;
    Ok((answer, peer))
}

/// One UDP exchange on a fresh socket (so a new flow): the answer, or the errno
/// (`ECONNREFUSED` when the datagram reached the untranslated VIP on `lo`).
fn udp_once(payload: &[u8]) -> Result<String, i32> {
    let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(-1);
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(errno)?;
    s.connect((VIP, 53)).map_err(errno)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(errno)?;
    s.send(payload).map_err(errno)?;
    let mut buf = [0u8; 1500];
    let n = s.recv(&mut buf).map_err(errno)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn histogram<'a>(ids: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut h = BTreeMap::new();
    for id in ids {
        *h.entry(id.to_string()).or_default() += 1;
    }
    h
}

/// Our `nft` children (the `nft -i` sessions), by pid.
fn nft_children() -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ..."
        let Some((comm, rest)) = stat.split_once(") ") else {
            continue;
        };
        let ppid = rest.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok());
        if comm.ends_with("(nft") && ppid == Some(me) {
            out.push(pid);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Tests

/// 60 connections to VIP:80 reach all three backends; the port is kept (8080 too); the
/// client sees the VIP as its peer and the server sees the client's own address.
fn tcp_spreads_over_all_backends() -> TestResult {
    let mut lab = Lab::new()?;
    lab.start_servers()?;
    let mut lb = lab.lb()?;
    lb.set_service(VIP, &addrs(&["s1", "s2", "s3"]))
        .ctx("set_service")?;

    let results = lab.in_ns("c", || {
        (0..60)
            .map(|i| tcp_once(if i % 2 == 0 { 80 } else { 8080 }))
            .collect::<Vec<_>>()
    })?;
    let mut ids = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let (answer, peer) = r.as_ref().map_err(|e| format!("connect {i}: errno {e}"))?;
        let port = if i % 2 == 0 { 80 } else { 8080 };
        ensure!(
            *peer == SocketAddr::from((VIP, port)),
            "the client sees {peer}, not the VIP"
        );
        let (id, seen) = answer.split_once(' ').unwrap_or_default();
        let (id, answered_port) = id.split_once(':').unwrap_or_default();
        ensure!(
            answered_port == port.to_string(),
            "port {port} answered on {answered_port}"
        );
        ensure!(
            seen == CLIENT.to_string(),
            "the backend saw the client as {seen}, not {CLIENT}"
        );
        ids.push(id.to_string());
    }
    let h = histogram(ids.iter().map(String::as_str));
    println!("    60 connects over 3 backends: {h:?}");
    ensure!(h.len() == 3, "not all backends reached: {h:?}");
    Ok(())
}

/// Unconnected UDP to the VIP reaches the backends and every reply comes from the VIP.
fn udp_replies_come_from_the_vip() -> TestResult {
    let mut lab = Lab::new()?;
    lab.start_servers()?;
    let mut lb = lab.lb()?;
    lb.set_service(VIP, &addrs(&["s1", "s2", "s3"]))
        .ctx("set_service")?;
    let lines = lab.in_ns("c", || -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 1500];
        // A fresh socket each time: a new conntrack entry, a new random pick.
        for i in 0..30 {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ctx("bind")?;
            sock.set_read_timeout(Some(Duration::from_secs(2)))
                .ctx("timeout")?;
            sock.send_to(format!("ping-{i}").as_bytes(), (VIP, 53))
                .ctx("send_to")?;
            let (len, from) = sock.recv_from(&mut buf).ctx("recv_from")?;
            out.push(format!("{from} {}", String::from_utf8_lossy(&buf[..len])));
        }
        Ok(out)
    })??;
    let mut ids = Vec::new();
    for line in &lines {
        // "<from> <id> <client as seen> ping-i"
        let f: Vec<&str> = line.split(' ').collect();
        ensure!(f.len() == 4, "bad reply {line}");
        ensure!(
            f[0] == "10.255.0.1:53",
            "reply came from {}, not the VIP",
            f[0]
        );
        ensure!(f[2] == CLIENT.to_string(), "backend saw {}", f[2]);
        ids.push(f[1]);
    }
    let h = histogram(ids.into_iter());
    println!("    30 datagrams: {h:?}");
    ensure!(h.len() >= 2, "UDP reached only {h:?}");
    Ok(())
}

/// A backend that is the client task itself: reached through `lo`, not masqueraded (the
/// server sees the VIP as its peer, a valid local address), and the client still sees the
/// VIP. Mixed with a remote backend, both answer.
fn backend_on_the_client_itself() -> TestResult {
    let mut lab = Lab::new()?;
    lab.start_servers()?;
    let listener = lab
        .in_ns("c", || TcpListener::bind((CLIENT, 80)))?
        .ctx("bind in the client")?;
    listener.set_nonblocking(true).ctx("nonblocking")?;
    let stop = lab.stop.clone();
    lab.servers.push(std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if !readable(&listener, 50) {
                continue;
            }
            if let Ok((mut s, peer)) = listener.accept() {
                let _ = s.set_nonblocking(false);
                let _ = s.write_all(format!("self:80 {}", peer.ip()).as_bytes());
            }
        }
    }));
    let mut lb = lab.lb()?;
    lb.set_service(VIP, &[CLIENT, ip_of("s1")])
        .ctx("set_service")?;
    let results = lab.in_ns("c", || (0..40).map(|_| tcp_once(80)).collect::<Vec<_>>())?;
    let mut ids = Vec::new();
    for r in &results {
        let (answer, peer) = r.as_ref().map_err(|e| format!("connect: errno {e}"))?;
        ensure!(
            *peer == SocketAddr::from((VIP, 80)),
            "the client sees {peer}"
        );
        let (id, seen) = answer.split_once(' ').unwrap_or_default();
        let want_seen = if id == "self:80" { VIP } else { CLIENT };
        ensure!(
            seen == want_seen.to_string(),
            "{id} saw the client as {seen}, not {want_seen}"
        );
        ids.push(id.to_string());
    }
    let h = histogram(ids.iter().map(String::as_str));
    println!("    40 connects, self and s1: {h:?}");
    ensure!(h.len() == 2, "not both reached: {h:?}");
    Ok(())
}

/// A thread connects in a loop while the backends change 100 times, always among live
/// backends: no connection fails.
fn changes_under_load_lose_nothing() -> TestResult {
    let mut lab = Lab::new()?;
    lab.start_servers()?;
    let mut lb = lab.lb()?;
    lb.set_service(VIP, &addrs(&["s1", "s2", "s3"]))
        .ctx("set_service")?;
    let sets: [&[&str]; 6] = [
        &["s1", "s2"],
        &["s2", "s3"],
        &["s3"],
        &["s1", "s2", "s3"],
        &["s3", "s1"],
        &["s2"],
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let ns = File::open(PathBuf::from("/run/netns").join(lab.ns("c"))).ctx("open netns")?;
    let client = {
        let (stop, ok, failed, errors) = (stop.clone(), ok.clone(), failed.clone(), errors.clone());
        std::thread::spawn(move || {
            // SAFETY: setns on this thread only, with a valid namespace fd.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return;
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match tcp_once(80) {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.lock().expect("lock").push(e);
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        })
    };
    let mut times = Vec::new();
    let res = (|| -> TestResult {
        for i in 0..100 {
            let t = Instant::now();
            lb.set_service(VIP, &addrs(sets[i % sets.len()]))
                .ctx("set_service")?;
            times.push(t.elapsed());
            std::thread::sleep(Duration::from_millis(3));
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = client.join();
    res?;
    times.sort();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "    {ok} connects during 100 changes, {failed} failed; change median {:?}, max {:?}",
        times[50], times[99]
    );
    ensure!(ok > 50, "too few connects ({ok}) to mean anything");
    ensure!(
        failed == 0,
        "{failed} failed connects (errnos {:?})",
        errors.lock().expect("lock")
    );
    let dump = lb.dump().ctx("dump")?;
    let mut last: Vec<(Ipv4Addr, u16)> =
        dump.first().map(|e| e.backends.clone()).unwrap_or_default();
    last.sort();
    let mut want: Vec<(Ipv4Addr, u16)> = addrs(sets[99 % sets.len()])
        .into_iter()
        .map(|a| (a, 0))
        .collect();
    want.sort();
    ensure!(
        dump.len() == 2 && last == want,
        "dump after the changes: {dump:?}"
    );
    Ok(())
}

/// The regression test of the mixed-generation race: a packet reads the rule generation
/// once, but each map lookup uses the generation current at that instant, so a packet can
/// take the verdict `goto lb_3` of one generation and look its slot up in the next. Every
/// change here alters the backend count (3 -> 1 -> 2 -> 1 ...), back to back, while UDP
/// clients open a new flow (a new conntrack entry, so a new NAT decision) per request: a
/// slot deleted in the transaction that lowers the count, or a chain used in the
/// transaction that creates it, shows up as a refused request (the datagram reaches the
/// VIP on `lo`). Before the fix this failed within a few hundred changes.
fn count_changes_under_load_lose_nothing() -> TestResult {
    let mut lab = Lab::new()?;
    lab.start_servers()?;
    let mut lb = lab.lb()?;
    let sets: [&[&str]; 6] = [
        &["s1", "s2", "s3"],
        &["s2"],
        &["s1", "s3"],
        &["s3"],
        &["s2", "s3", "s1"],
        &["s1", "s2"],
    ];
    lb.set_service(VIP, &addrs(sets[0])).ctx("set_service")?;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let errors = Arc::new(std::sync::Mutex::new(BTreeMap::<i32, usize>::new()));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let ns = File::open(PathBuf::from("/run/netns").join(lab.ns("c"))).ctx("open netns")?;
        let (stop, ok, failed, errors) = (stop.clone(), ok.clone(), failed.clone(), errors.clone());
        clients.push(std::thread::spawn(move || {
            // SAFETY: setns on this thread only, with a valid namespace fd.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return;
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match udp_once(b"x") {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        *errors.lock().expect("lock").entry(e).or_default() += 1;
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    // Let the clients get going before the changes start.
    std::thread::sleep(Duration::from_millis(100));
    let changes = 1500;
    let t = Instant::now();
    let res = (|| -> TestResult {
        for i in 1..=changes {
            lb.set_service(VIP, &addrs(sets[i % sets.len()]))
                .ctx("set_service")?;
        }
        Ok(())
    })();
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    res?;
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("    {ok} new flows during {changes} count changes ({took:?}), {failed} failed");
    ensure!(ok > 500, "too few requests ({ok}) to mean anything");
    ensure!(
        failed == 0,
        "{failed} failed requests (errno: count {:?})",
        errors.lock().expect("lock")
    );
    // Lowering the count leaves the slots above it lingering; the next transaction (here a
    // sync that changes nothing else) deletes them: the kernel holds exactly the last set.
    let slots = |lab: &Lab| -> Result<usize, String> {
        let listing = lab.nft("c", &["list", "map", "ip", "mesh_lb", "backends"])?;
        Ok(listing.matches(&format!("{VIP} . ")).count())
    };
    lb.set_service(VIP, &addrs(&["s1", "s2", "s3"]))
        .ctx("set_service")?;
    lb.set_service(VIP, &addrs(&["s2"])).ctx("set_service")?;
    ensure!(slots(&lab)? == 3, "slots 1 and 2 should linger");
    lb.sync(&BTreeMap::from([(VIP, addrs(&["s2"]))]))
        .ctx("sync")?;
    ensure!(slots(&lab)? == 1, "lingering slots left after a sync");
    ensure!(
        lb.dump().ctx("dump")?[0].backends == vec![(ip_of("s2"), 0)],
        "dump after the sync"
    );
    Ok(())
}

/// Zero backends: the VIP stays, untranslated, and the VIP on lo refuses at once. Then
/// remove_service: nothing is translated any more (refused by lo too, and the table is
/// empty); and a service set again works.
fn zero_backends_and_removal_refuse_fast() -> TestResult {
    let mut lab = Lab::new()?;
    lab.start_servers()?;
    let mut lb = lab.lb()?;
    lb.set_service(VIP, &addrs(&["s1"])).ctx("set_service")?;
    let r = lab.in_ns("c", || tcp_once(80))?;
    ensure!(r.is_ok(), "with one backend: {r:?}");

    lb.set_service(VIP, &[]).ctx("set_service empty")?;
    let dump = lb.dump().ctx("dump")?;
    ensure!(
        dump == vec![
            ServiceEntry {
                vip: VIP,
                port: 0,
                proto: Proto::Tcp,
                rev: 0,
                backends: vec![]
            },
            ServiceEntry {
                vip: VIP,
                port: 0,
                proto: Proto::Udp,
                rev: 0,
                backends: vec![]
            }
        ],
        "dump: {dump:?}"
    );
    let (r, took) = lab.in_ns("c", || {
        let t = Instant::now();
        (tcp_once(80), t.elapsed())
    })?;
    println!("    zero backends: {r:?} in {took:?}");
    ensure!(r == Err(libc::ECONNREFUSED), "zero backends: {r:?}");
    ensure!(
        took < Duration::from_millis(500),
        "refused slowly: {took:?}"
    );

    lb.remove_service(VIP).ctx("remove_service")?;
    ensure!(lb.dump().ctx("dump")?.is_empty(), "dump after remove");
    ensure!(lb.services().is_empty(), "services after remove");
    let listing = lab.nft("c", &["list", "map", "ip", "mesh_lb", "backends"])?;
    ensure!(!listing.contains("10.255.0.1"), "elements left: {listing}");
    let r = lab.in_ns("c", || tcp_once(80))?;
    ensure!(r == Err(libc::ECONNREFUSED), "after remove_service: {r:?}");

    lb.set_service(VIP, &addrs(&["s2"]))
        .ctx("set_service again")?;
    let r = lab.in_ns("c", || tcp_once(80))?;
    ensure!(
        r.as_ref().is_ok_and(|(a, _)| a.starts_with("s2:80 ")),
        "after setting again: {r:?}"
    );
    Ok(())
}

/// A backend lost silently (its packets dropped, as when its node is cut off) and removed
/// from the VIP strands nothing: a connect in progress toward it, and a UDP flow sending to
/// it, reach the remaining backend at their next retransmission or datagram after the
/// balancer deletes their conntrack entries (a second after the change). Without that, the SYNs follow the entry to the
/// lost backend until `connect` gives up, and the UDP entry, renewed by every datagram,
/// never expires.
fn a_lost_backend_strands_no_flow() -> TestResult {
    let mut lab = Lab::new()?;
    lab.start_servers()?;
    // s1 is lost: it drops everything that arrives.
    lab.nft(
        "s1",
        &[
            "add table ip lost; add chain ip lost input { type filter hook input priority 0; policy drop; }",
        ],
    )?;
    let mut lb = lab.lb()?;
    lb.set_service(VIP, &addrs(&["s1"])).ctx("set_service")?;

    let tcp = lab.spawn_in_ns("c", || {
        let t = Instant::now();
        let r = TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), Duration::from_secs(6))
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut answer = String::new();
                s.read_to_string(&mut answer)?;
                Ok(answer)
            });
        (r.map_err(|e| e.to_string()), t.elapsed())
    })?;
    let udp = lab.spawn_in_ns("c", || -> Result<(String, Duration), String> {
        let t = Instant::now();
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| e.to_string())?;
        s.connect((VIP, 53)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 1500];
        // One socket, one flow: a datagram every 200 ms for 6 s at most.
        for i in 0..30 {
            s.send(format!("ping{i}").as_bytes())
                .map_err(|e| e.to_string())?;
            if let Ok(n) = s.recv(&mut buf) {
                return Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), t.elapsed()));
            }
        }
        Err("no answer in 6 s".to_string())
    })?;

    // Both flows are toward s1 and unanswered; then s1 leaves the VIP for s2.
    std::thread::sleep(Duration::from_millis(400));
    let before = mesh_netlink::conntrack::list(&lab.netns("c")?).ctx("conntrack list")?;
    let toward_s1 = before
        .iter()
        .filter(|f| f.dnat_to() == Some(ip_of("s1")))
        .count();
    ensure!(
        toward_s1 >= 2,
        "expected a TCP and a UDP entry toward s1, got {before:?}"
    );
    lb.set_service(VIP, &addrs(&["s2"])).ctx("set_service s2")?;
    // They are deleted a second later (a backend merely leaving answers in that time).
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let after = mesh_netlink::conntrack::list(&lab.netns("c")?).ctx("conntrack list")?;
        if !after.iter().any(|f| f.dnat_to() == Some(ip_of("s1"))) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "entries toward s1 left after 3 s: {after:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let (tcp, tcp_took) = tcp.join().map_err(|_| "tcp client panicked")??;
    let tcp = tcp.map_err(|e| format!("connect in progress: {e} (after {tcp_took:?})"))?;
    ensure!(tcp.starts_with("s2:80 "), "tcp answered by {tcp}");
    let (udp, udp_took) = udp.join().map_err(|_| "udp client panicked")???;
    ensure!(udp.starts_with("s2 "), "udp answered by {udp}");
    println!(
        "    connect in progress answered by s2 after {tcp_took:?}, udp flow after {udp_took:?}"
    );
    Ok(())
}

/// A second NftLb on the namespace adopts the table without writing (the listing, handles
/// included, is unchanged) and carries on; a table with a foreign rule is repaired in one
/// go, keeping the services; remove_table leaves no table and no nft process.
fn adoption_and_remove_table() -> TestResult {
    let mut lab = Lab::new()?;
    lab.start_servers()?;
    let mut lb = lab.lb()?;
    let v2 = Ipv4Addr::new(10, 255, 0, 2);
    let mut want = BTreeMap::new();
    want.insert(VIP, addrs(&["s1", "s2", "s3"]));
    want.insert(v2, addrs(&["s3"]));
    want.insert(Ipv4Addr::new(10, 255, 0, 3), vec![]);
    lb.sync(&want).ctx("sync")?;
    lb.set_service(v2, &addrs(&["s2", "s3"]))
        .ctx("set_service")?; // through the nft -i session
    ensure!(!nft_children().is_empty(), "no nft -i session running");
    let before = lb.dump().ctx("dump")?;
    ensure!(before.len() == 6, "dump: {before:?}");
    let listing = lab.nft("c", &["-j", "list", "table", "ip", "mesh_lb"])?;
    let held = lb.services().clone();
    drop(lb);
    ensure!(nft_children().is_empty(), "nft -i outlived its NftLb");

    let mut lb = lab.lb()?;
    ensure!(lb.dump().ctx("dump")? == before, "adopted dump differs");
    ensure!(*lb.services() == held, "adopted state differs");
    let again = lab.nft("c", &["-j", "list", "table", "ip", "mesh_lb"])?;
    ensure!(again == listing, "adoption rewrote the table");
    // Carrying on from the adopted state: one change, then a sync back to `want`.
    lb.set_service(VIP, &addrs(&["s1", "s3"]))
        .ctx("set_service after adoption")?;
    lb.sync(&want).ctx("sync after adoption")?;
    let r = lab.in_ns("c", || tcp_once(80))?;
    ensure!(r.is_ok(), "traffic after adoption: {r:?}");
    drop(lb);

    // Someone adds a rule to our chain: the next NftLb rewrites the table.
    lab.nft("c", &["add", "rule", "ip", "mesh_lb", "output", "counter"])?;
    let lb = lab.lb()?;
    let listing = lab.nft("c", &["list", "chain", "ip", "mesh_lb", "output"])?;
    ensure!(!listing.contains("counter"), "foreign rule kept: {listing}");
    let dump = lb.dump().ctx("dump")?;
    ensure!(
        dump.iter().map(|e| e.vip).collect::<Vec<_>>()
            == want.keys().flat_map(|v| [*v, *v]).collect::<Vec<_>>(),
        "services after the repair: {dump:?}"
    );

    lb.remove_table().ctx("remove_table")?;
    let tables = lab.nft("c", &["list", "tables"])?;
    ensure!(tables.trim().is_empty(), "tables left: {tables}");
    ensure!(nft_children().is_empty(), "nft process left");
    // And the VIP is no longer translated.
    let r = lab.in_ns("c", || tcp_once(80))?;
    ensure!(r == Err(libc::ECONNREFUSED), "after remove_table: {r:?}");
    Ok(())
}

/// The nft -i process dies, or the table is changed behind the balancer's back: the next
/// change re-reads the table and succeeds.
fn recovers_from_a_dead_session_and_tampering() -> TestResult {
    let mut lab = Lab::new()?;
    lab.start_servers()?;
    let mut lb = lab.lb()?;
    lb.set_service(VIP, &addrs(&["s1", "s2"]))
        .ctx("set_service")?;
    lb.set_service(VIP, &addrs(&["s1", "s3"]))
        .ctx("set_service")?;
    let pids = nft_children();
    ensure!(pids.len() == 1, "nft children: {pids:?}");
    // SAFETY: kill of a process this test process started (the session), by its pid.
    unsafe { libc::kill(pids[0] as libc::pid_t, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(50));
    lb.set_service(VIP, &addrs(&["s2", "s3"]))
        .ctx("set_service after kill")?;
    let dump = lb.dump().ctx("dump")?;
    ensure!(
        dump[0].backends == vec![(ip_of("s2"), 0), (ip_of("s3"), 0)]
            || dump[0].backends == vec![(ip_of("s3"), 0), (ip_of("s2"), 0)],
        "after the kill: {dump:?}"
    );

    // Tampering: slot 1 deleted by someone else. The next change (replacing it) fails
    // once, the table is re-read (and repaired: the VIP lost a slot), and the retry works.
    lab.nft(
        "c",
        &[
            "delete",
            "element",
            "ip",
            "mesh_lb",
            "backends",
            "{ 10.255.0.1 . 1 }",
        ],
    )?;
    lb.set_service(VIP, &addrs(&["s1", "s2"]))
        .ctx("set_service after tampering")?;
    let dump = lb.dump().ctx("dump")?;
    let mut got: Vec<Ipv4Addr> = dump[0].backends.iter().map(|(a, _)| *a).collect();
    got.sort();
    ensure!(got == addrs(&["s1", "s2"]), "after tampering: {dump:?}");
    let r = lab.in_ns("c", || (0..10).map(|_| tcp_once(80)).collect::<Vec<_>>())?;
    ensure!(r.iter().all(Result::is_ok), "traffic after repair: {r:?}");

    // The table deleted behind its back: recreated, and the change applied.
    lab.nft("c", &["delete", "table", "ip", "mesh_lb"])?;
    lb.set_service(VIP, &addrs(&["s3"]))
        .ctx("set_service after the table was deleted")?;
    let r = lab.in_ns("c", || tcp_once(80))?;
    ensure!(
        r.as_ref().is_ok_and(|(a, _)| a.starts_with("s3:80 ")),
        "after the table was deleted: {r:?}"
    );

    let e = lb
        .set_service(VIP, &(0..70_000u32).map(Ipv4Addr::from).collect::<Vec<_>>())
        .expect_err("70000 backends");
    ensure!(
        matches!(e, LbError::TooManyBackends { .. }),
        "too many: {e}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Runner

fn ci() -> bool {
    std::env::var("CI")
        .map(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false"))
        .unwrap_or(false)
}

fn have(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Ok if the tests can run; otherwise prints why and returns false, or exits 1 in CI.
fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let reason = if unsafe { libc::geteuid() } != 0 {
        Some("needs root")
    } else if !have("nft", "--version") {
        Some("needs nft (nftables)")
    } else if !have("ip", "-V") {
        Some("needs ip (iproute2)")
    } else {
        None
    };
    let Some(reason) = reason else { return true };
    if ci() {
        eprintln!(
            "error: nft_lb tests cannot run ({reason}), and CI is set: failing instead of skipping"
        );
        std::process::exit(1);
    }
    eprintln!("skipped: {reason}");
    false
}

type TestFn = fn() -> TestResult;

fn main() {
    if !can_run() {
        return;
    }
    let tests: &[(&str, TestFn)] = &[
        (
            "tcp_spreads_over_all_backends",
            tcp_spreads_over_all_backends,
        ),
        (
            "udp_replies_come_from_the_vip",
            udp_replies_come_from_the_vip,
        ),
        ("backend_on_the_client_itself", backend_on_the_client_itself),
        (
            "changes_under_load_lose_nothing",
            changes_under_load_lose_nothing,
        ),
        (
            "count_changes_under_load_lose_nothing",
            count_changes_under_load_lose_nothing,
        ),
        (
            "zero_backends_and_removal_refuse_fast",
            zero_backends_and_removal_refuse_fast,
        ),
        (
            "a_lost_backend_strands_no_flow",
            a_lost_backend_strands_no_flow,
        ),
        ("adoption_and_remove_table", adoption_and_remove_table),
        (
            "recovers_from_a_dead_session_and_tampering",
            recovers_from_a_dead_session_and_tampering,
        ),
    ];
    mesh_netns::serial::run_serial(tests);
}
