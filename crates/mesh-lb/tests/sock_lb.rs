//! Real-kernel tests of the socket load balancer; they need root, cgroup v2 and the eBPF
//! object (built with clang).
//!
//! Not root (or no eBPF object, or no cgroup v2 hierarchy): prints "skipped: <reason>" and
//! passes, unless `CI` is set (to anything but "", "0" or "false"): then it fails.
//!
//! Nothing is added to the namespace the tests run in. Each test builds a `Lab`: a network
//! namespace of its own (`ip netns add`, only `lo` up, no route to the VIP) and a v2 cgroup of
//! its own (`/sys/fs/cgroup/unified/<name>` on hybrid hosts, `/sys/fs/cgroup/<name>` on pure
//! v2). Backends are threads of this process serving sockets created inside the namespace
//! (on 127.0.0.1); clients are this test binary re-executed (`__mesh_lb_test_child`) that
//! enter the namespace and, unless told otherwise, the cgroup before exec. The `Lab` stops the
//! servers, deletes the namespace and removes the cgroup on drop, also on panic.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mesh_lb::{LbError, LoadOptions, Proto, ServiceEntry, SockLb};

const CHILD_ARG: &str = "__mesh_lb_test_child";
/// Assigned to nothing, routed nowhere in the lab namespace.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 1);
const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;

use mesh_netns::serial::{Ctx, TestResult};
use mesh_netns::serial_ensure as ensure;

// ---------------------------------------------------------------------------
// The lab: a namespace, a cgroup, servers, clients

static SEQ: AtomicU32 = AtomicU32::new(0);

struct Lab {
    netns: String,
    netns_file: File,
    cgroup: PathBuf,
    procs: File,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
}

/// The v2 hierarchy: `/sys/fs/cgroup` on pure v2 hosts, `/sys/fs/cgroup/unified` on hybrid.
fn cgroup2_root() -> Option<PathBuf> {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        return Some(PathBuf::from("/sys/fs/cgroup"));
    }
    let unified = Path::new("/sys/fs/cgroup/unified");
    unified
        .join("cgroup.procs")
        .exists()
        .then(|| unified.to_path_buf())
}

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

impl Lab {
    fn new() -> Result<Lab, String> {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("mlb-{}-{n}", std::process::id());
        let cgroup = cgroup2_root()
            .ok_or("no cgroup v2 hierarchy")?
            .join(format!("mesh-lb-test-{}-{n}", std::process::id()));
        run("ip", &["netns", "add", &name])?;
        // From here on, Drop cleans up whatever was made.
        let mut lab = Lab {
            netns: name.clone(),
            netns_file: File::open("/dev/null").ctx("/dev/null")?,
            cgroup: cgroup.clone(),
            procs: File::open("/dev/null").ctx("/dev/null")?,
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
        };
        lab.netns_file = File::open(format!("/run/netns/{name}")).ctx("open netns")?;
        run("ip", &["-n", &name, "link", "set", "lo", "up"])?;
        fs::create_dir(&cgroup).ctx(&format!("mkdir {}", cgroup.display()))?;
        lab.procs = OpenOptions::new()
            .write(true)
            .open(cgroup.join("cgroup.procs"))
            .ctx("open cgroup.procs")?;
        Ok(lab)
    }

    /// Runs `f` on a thread inside the lab namespace (sockets made there stay there).
    fn in_netns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        let ns = self.netns_file.try_clone().ctx("dup netns fd")?;
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

    /// TCP servers on 127.0.0.1:`port` (in the namespace) that answer `id` and close.
    fn tcp_servers(&mut self, servers: &[(u16, &str)]) -> TestResult {
        for (port, id) in servers {
            let port = *port;
            let listener = self
                .in_netns(move || TcpListener::bind((LOCAL, port)))?
                .ctx(&format!("bind tcp {port}"))?;
            listener.set_nonblocking(true).ctx("nonblocking")?;
            let (stop, id) = (self.stop.clone(), id.to_string());
            self.servers.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if !readable(&listener, 50) {
                        continue;
                    }
                    if let Ok((mut s, _)) = listener.accept() {
                        let _ = s.set_nonblocking(false);
                        let _ = s.write_all(id.as_bytes());
                    }
                }
            }));
        }
        Ok(())
    }

    /// UDP servers on 127.0.0.1:`port` (in the namespace) that answer `<id> <payload>`.
    fn udp_servers(&mut self, servers: &[(u16, &str)]) -> TestResult {
        for (port, id) in servers {
            let port = *port;
            let sock = self
                .in_netns(move || UdpSocket::bind((LOCAL, port)))?
                .ctx(&format!("bind udp {port}"))?;
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .ctx("timeout")?;
            let (stop, id) = (self.stop.clone(), id.to_string());
            self.servers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((len, from)) = sock.recv_from(&mut buf) {
                        let reply = format!("{id} {}", String::from_utf8_lossy(&buf[..len]));
                        let _ = sock.send_to(reply.as_bytes(), from);
                    }
                }
            }));
        }
        Ok(())
    }

    /// Runs this binary as a client in the lab namespace (and in the lab cgroup if
    /// `in_cgroup`), bounded by 20 s; returns its stdout.
    fn client(&self, in_cgroup: bool, args: &[&str]) -> Result<String, String> {
        let exe = std::env::current_exe().ctx("current_exe")?;
        let ns_fd = self.netns_file.as_raw_fd();
        let procs_fd = self.procs.as_raw_fd();
        let mut cmd = Command::new(exe);
        cmd.arg(CHILD_ARG)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: only async-signal-safe calls (setns, write) between fork and exec, on fds
        // that the parent keeps open until the child is reaped.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process itself into the cgroup.
                if in_cgroup && libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().ctx("spawn client")?;
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let out_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = child.try_wait().ctx("wait client")? {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("client {args:?} timed out"));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let out = out_reader.join().unwrap_or_default();
        let err = err_reader.join().unwrap_or_default();
        ensure!(status.success(), "client {args:?}: {status}\n{out}\n{err}");
        Ok(out)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.servers.drain(..) {
            let _ = t.join();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
        // Reaped clients may linger in the cgroup for a moment: retry.
        for _ in 0..100 {
            match fs::remove_dir(&self.cgroup) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        if self.cgroup.exists() {
            eprintln!("warning: could not remove {}", self.cgroup.display());
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

/// `ok <text>` lines of a client's output, and the `err ...` ones.
fn parse(out: &str) -> (Vec<String>, Vec<String>) {
    let mut ok = Vec::new();
    let mut err = Vec::new();
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("ok ") {
            ok.push(rest.to_string());
        } else if let Some(rest) = line.strip_prefix("err ") {
            err.push(rest.to_string());
        }
    }
    (ok, err)
}

fn histogram(ids: &[String]) -> BTreeMap<String, usize> {
    let mut h = BTreeMap::new();
    for id in ids {
        *h.entry(id.clone()).or_default() += 1;
    }
    h
}

fn backends(ports: &[u16]) -> Vec<(Ipv4Addr, u16)> {
    ports.iter().map(|p| (LOCAL, *p)).collect()
}

// ---------------------------------------------------------------------------
// Kernel state: what is attached to a cgroup

/// Programs attached to `cgroup` for the four attach types (BPF_PROG_QUERY), in order
/// connect4, sendmsg4, recvmsg4, getpeername4.
fn attached_counts(cgroup: &Path) -> Result<[u32; 4], String> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    // BPF_CGROUP_INET4_CONNECT, _UDP4_SENDMSG, _UDP4_RECVMSG, _INET4_GETPEERNAME
    const TYPES: [u32; 4] = [10, 14, 19, 29];
    #[repr(C)]
    #[derive(Default)]
    struct Query {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        pad: u32,
        rest: [u64; 8],
    }
    let dir = File::open(cgroup).ctx("open cgroup")?;
    let mut out = [0; 4];
    for (i, t) in TYPES.iter().enumerate() {
        let mut q = Query {
            target_fd: dir.as_raw_fd() as u32,
            attach_type: *t,
            ..Default::default()
        };
        // SAFETY: `q` is a zero-padded bpf_attr prefix for BPF_PROG_QUERY, large enough for
        // the fields the kernel reads and writes; prog_ids = 0 asks for the count only.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_QUERY,
                &mut q as *mut Query,
                std::mem::size_of::<Query>(),
            )
        };
        ensure!(
            r == 0,
            "BPF_PROG_QUERY: {}",
            std::io::Error::last_os_error()
        );
        out[i] = q.prog_cnt;
    }
    Ok(out)
}

/// `bpftool cgroup show <dir>` lines naming our programs, or None without bpftool.
fn bpftool_lines(cgroup: &Path) -> Option<Vec<String>> {
    let out = Command::new("bpftool")
        .arg("cgroup")
        .arg("show")
        .arg(cgroup)
        .output()
        .ok()?;
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("sock_lb"))
            .map(str::to_string)
            .collect(),
    )
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(3);
    while !cond() {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Tests

/// TCP to the VIP spreads over all backends; an update stops new connections to a removed
/// backend; getpeername shows the VIP; no backend refuses; a removed service is not touched.
fn tcp_spreads_and_follows_updates() -> TestResult {
    let mut lab = Lab::new()?;
    lab.tcp_servers(&[(9001, "b1"), (9002, "b2"), (9003, "b3")])?;
    let mut lb = SockLb::load().ctx("load")?;
    lb.set_service(VIP, 80, Proto::Tcp, &backends(&[9001, 9002, 9003]))
        .ctx("set_service")?;
    lb.attach(&lab.cgroup).ctx("attach")?;

    let out = lab.client(true, &["tcp", "10.255.0.1:80", "300"])?;
    let (ok, err) = parse(&out);
    ensure!(err.is_empty() && ok.len() == 300, "errors: {err:?}");
    let h = histogram(&ok);
    println!("    300 connects over 3 backends: {h:?}");
    ensure!(h.len() == 3, "not all backends reached: {h:?}");
    // Binomial(300, 1/3): mean 100, sd 8.2; 50 is six sd below.
    ensure!(h.values().all(|c| *c >= 50), "degenerate spread: {h:?}");

    let out = lab.client(true, &["tcp-peer", "10.255.0.1:80"])?;
    let (ok, err) = parse(&out);
    ensure!(err.is_empty() && ok.len() == 1, "peer: {out}");
    let (peer, id) = ok[0].split_once(' ').unwrap_or_default();
    ensure!(
        peer == "10.255.0.1:80",
        "getpeername says {peer} (backend {id}), not the VIP"
    );

    // Remove b2: new connections never reach it.
    lb.set_service(VIP, 80, Proto::Tcp, &backends(&[9001, 9003]))
        .ctx("set_service")?;
    let dump = lb.dump().ctx("dump")?;
    ensure!(
        dump == vec![ServiceEntry {
            vip: VIP,
            port: 80,
            proto: Proto::Tcp,
            rev: 2,
            backends: backends(&[9001, 9003]),
        }],
        "dump: {dump:?}"
    );
    let out = lab.client(true, &["tcp", "10.255.0.1:80", "150"])?;
    let (ok, err) = parse(&out);
    ensure!(err.is_empty(), "errors: {err:?}");
    let h = histogram(&ok);
    println!("    150 connects after removing b2: {h:?}");
    ensure!(
        !h.contains_key("b2") && h.len() == 2,
        "after removing b2: {h:?}"
    );

    // No backend: refused at once by the program.
    lb.set_service(VIP, 80, Proto::Tcp, &[])
        .ctx("set_service empty")?;
    let out = lab.client(true, &["tcp", "10.255.0.1:80", "1"])?;
    let (ok, err) = parse(&out);
    ensure!(ok.is_empty() && err.len() == 1, "no backends: {out}");
    ensure!(
        err[0].starts_with(&format!("{} ", libc::ECONNREFUSED)),
        "no backends: {}",
        err[0]
    );

    // Removed: the VIP is no longer translated; in the lab it is unreachable.
    lb.remove_service(VIP, 80, Proto::Tcp)
        .ctx("remove_service")?;
    ensure!(lb.dump().ctx("dump")?.is_empty(), "dump not empty");
    let t = Instant::now();
    let out = lab.client(true, &["tcp", "10.255.0.1:80", "1"])?;
    let (ok, err) = parse(&out);
    ensure!(ok.is_empty() && err.len() == 1, "removed service: {out}");
    println!(
        "    connect after remove_service: {} ({:?})",
        err[0],
        t.elapsed()
    );
    Ok(())
}

/// Backends change while a client connects in a loop: thanks to the update order no connect
/// ever finds an empty slot (it would be refused), and every connect reaches a backend.
fn updates_under_load_never_refuse() -> TestResult {
    let mut lab = Lab::new()?;
    lab.tcp_servers(&[(9001, "b1"), (9002, "b2"), (9003, "b3"), (9004, "b4")])?;
    let mut lb = SockLb::load().ctx("load")?;
    lb.set_service(VIP, 80, Proto::Tcp, &backends(&[9001, 9002, 9003]))
        .ctx("set_service")?;
    lb.attach(&lab.cgroup).ctx("attach")?;
    let sets: [&[u16]; 5] = [
        &[9001, 9003],
        &[9002],
        &[9001, 9002, 9003, 9004],
        &[9004, 9001],
        &[9003, 9002, 9001],
    ];
    let (out, updates) = std::thread::scope(|s| {
        let client = s.spawn(|| lab.client(true, &["tcp", "10.255.0.1:80", "1500"]));
        let mut updates = 0;
        while !client.is_finished() {
            lb.set_service(VIP, 80, Proto::Tcp, &backends(sets[updates % sets.len()]))
                .ctx("set_service")?;
            updates += 1;
            std::thread::sleep(Duration::from_micros(200));
        }
        let out = client
            .join()
            .map_err(|_| "client thread panicked".to_string())?;
        Ok::<_, String>((out?, updates))
    })?;
    let (ok, err) = parse(&out);
    println!(
        "    1500 connects during {updates} updates: {:?}",
        histogram(&ok)
    );
    ensure!(updates > 10, "too few updates ({updates}) to mean anything");
    ensure!(
        err.is_empty() && ok.len() == 1500,
        "errors during updates: {err:?}"
    );
    Ok(())
}

/// Unconnected UDP reaches the backends and replies come from the VIP; connected UDP too.
fn udp_replies_come_from_the_vip() -> TestResult {
    let mut lab = Lab::new()?;
    lab.udp_servers(&[(9101, "u1"), (9102, "u2")])?;
    let mut lb = SockLb::load().ctx("load")?;
    lb.set_service(VIP, 53, Proto::Udp, &backends(&[9101, 9102]))
        .ctx("set_service")?;
    lb.attach(&lab.cgroup).ctx("attach")?;

    // 40 sockets x 3 datagrams each.
    let out = lab.client(true, &["udp", "10.255.0.1:53", "40", "3"])?;
    let (ok, err) = parse(&out);
    ensure!(
        err.is_empty() && ok.len() == 120,
        "udp: {err:?} ({} ok)",
        ok.len()
    );
    let mut per_socket: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut ids = Vec::new();
    for line in &ok {
        // "<socket> <from> <id> <payload>"
        let f: Vec<&str> = line.split(' ').collect();
        ensure!(f.len() >= 3, "bad line {line}");
        ensure!(
            f[1] == "10.255.0.1:53",
            "reply came from {}, not the VIP: {line}",
            f[1]
        );
        per_socket
            .entry(f[0].to_string())
            .or_default()
            .push(f[2].to_string());
        ids.push(f[2].to_string());
    }
    let h = histogram(&ids);
    println!("    120 datagrams on 40 sockets: {h:?}");
    ensure!(h.len() == 2, "not all UDP backends reached: {h:?}");
    for (sock, ids) in &per_socket {
        ensure!(
            ids.iter().all(|i| *i == ids[0]),
            "socket {sock} hopped backends: {ids:?}"
        );
    }

    let out = lab.client(true, &["udp-connected", "10.255.0.1:53"])?;
    let (ok, err) = parse(&out);
    ensure!(err.is_empty() && ok.len() == 1, "connected udp: {out}");
    ensure!(
        ok[0].starts_with("10.255.0.1:53 u"),
        "connected udp peer/reply: {}",
        ok[0]
    );
    Ok(())
}

/// A process in the namespace but outside the cgroup is not translated.
fn outside_the_cgroup_is_not_affected() -> TestResult {
    let mut lab = Lab::new()?;
    lab.tcp_servers(&[(9001, "b1")])?;
    let mut lb = SockLb::load().ctx("load")?;
    lb.set_service(VIP, 80, Proto::Tcp, &backends(&[9001]))
        .ctx("set_service")?;
    lb.attach(&lab.cgroup).ctx("attach")?;

    let out = lab.client(false, &["tcp", "10.255.0.1:80", "3"])?;
    let (ok, err) = parse(&out);
    ensure!(ok.is_empty() && err.len() == 3, "outside the cgroup: {out}");
    let out = lab.client(true, &["tcp", "10.255.0.1:80", "3"])?;
    let (ok, _) = parse(&out);
    ensure!(ok == ["b1", "b1", "b1"], "inside the cgroup: {out}");
    // A thread of this process (outside the cgroup) in the lab namespace: untouched too.
    let res = lab.in_netns(|| {
        TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), Duration::from_secs(1))
            .map(|_| ())
            .map_err(|e| e.raw_os_error())
    })?;
    ensure!(
        res == Err(Some(libc::ENETUNREACH)),
        "test process in the lab: {res:?}"
    );
    Ok(())
}

/// After drop, nothing is attached and the programs and maps are gone; detach_all and
/// re-attach work; attach errors name the directory.
fn drop_leaves_nothing() -> TestResult {
    let lab = Lab::new()?;
    let mut lb = SockLb::load().ctx("load")?;
    lb.attach(&lab.cgroup).ctx("attach")?;
    lb.attach(&lab.cgroup).ctx("attach twice")?;
    ensure!(
        attached_counts(&lab.cgroup)? == [1, 1, 1, 1],
        "attached: {:?}",
        attached_counts(&lab.cgroup)?
    );
    let with_bpftool = bpftool_lines(&lab.cgroup);
    if let Some(lines) = &with_bpftool {
        ensure!(lines.len() == 4, "bpftool cgroup show: {lines:?}");
    } else {
        println!("    (bpftool not installed: checking with BPF_PROG_QUERY only)");
    }

    lb.detach_all();
    ensure!(attached_counts(&lab.cgroup)? == [0; 4], "after detach_all");
    lb.attach(&lab.cgroup).ctx("re-attach")?;
    ensure!(attached_counts(&lab.cgroup)? == [1; 4], "after re-attach");

    let ids = lb.ids().ctx("ids")?;
    ensure!(
        ids.programs.len() == 4 && ids.maps.len() == 3,
        "ids: {ids:?}"
    );
    drop(lb);

    ensure!(
        attached_counts(&lab.cgroup)? == [0; 4],
        "after drop: {:?}",
        attached_counts(&lab.cgroup)?
    );
    if let Some(lines) = bpftool_lines(&lab.cgroup) {
        ensure!(
            lines.is_empty(),
            "bpftool cgroup show after drop: {lines:?}"
        );
    }
    wait_until("programs unloaded", || {
        let live: Vec<u32> = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .map(|p| p.id())
            .collect();
        ids.programs.iter().all(|(_, id)| !live.contains(id))
    })?;
    wait_until("maps freed", || {
        ids.maps
            .iter()
            .all(|(_, id)| aya::maps::MapData::from_id(*id).is_err())
    })?;

    let mut lb = SockLb::load().ctx("load")?;
    let e = lb.attach(Path::new("/tmp")).expect_err("attach to /tmp");
    ensure!(matches!(e, LbError::NotCgroup2(_)), "attach /tmp: {e}");
    ensure!(e.to_string().contains("/tmp"), "{e}");
    let e = lb
        .attach(Path::new("/nonexistent/cg"))
        .expect_err("attach to a missing dir");
    ensure!(e.to_string().contains("/nonexistent/cg"), "{e}");
    ensure!(lb.attached().is_empty(), "failed attaches left state");
    Ok(())
}

/// Pinned maps outlive the loader and are picked up by the next one (in a child with a
/// private mount namespace and its own bpffs, so nothing stays on the host).
fn pinned_maps_survive_a_reload() -> TestResult {
    let dir = std::env::temp_dir().join(format!(
        "mesh-lb-bpffs-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir).ctx("mkdir")?;
    let res = (|| {
        let exe = std::env::current_exe().ctx("current_exe")?;
        let mut cmd = Command::new(exe);
        cmd.arg(CHILD_ARG).arg("pin-reload").arg(&dir);
        // SAFETY: unshare is async-signal-safe; the child is single-threaded after fork.
        unsafe {
            cmd.pre_exec(|| {
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().ctx("spawn")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "pin-reload: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(stdout.contains("ok pinned"), "pin-reload: {stdout}");
        Ok(())
    })();
    let _ = fs::remove_dir(&dir);
    res
}

// ---------------------------------------------------------------------------
// Client (child) side

fn child_main(args: &[String]) -> i32 {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let res = match a.as_slice() {
        ["tcp", addr, n] => tcp_client(addr, n.parse().unwrap_or(1)),
        ["tcp-peer", addr] => tcp_peer(addr),
        ["udp", addr, sockets, per] => {
            udp_client(addr, sockets.parse().unwrap_or(1), per.parse().unwrap_or(1))
        }
        ["udp-connected", addr] => udp_connected(addr),
        ["pin-reload", dir] => pin_reload(Path::new(dir)),
        _ => Err(format!("bad child args {a:?}")),
    };
    match res {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("child: {e}");
            1
        }
    }
}

fn err_line(e: &std::io::Error) -> String {
    format!("err {} {e}", e.raw_os_error().unwrap_or(0))
}

fn tcp_client(addr: &str, n: usize) -> TestResult {
    let addr: SocketAddr = addr.parse().ctx("addr")?;
    for _ in 0..n {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(2)))
                    .ctx("timeout")?;
                let mut id = String::new();
                match s.read_to_string(&mut id) {
                    Ok(_) => println!("ok {id}"),
                    Err(e) => println!("{}", err_line(&e)),
                }
            }
            Err(e) => println!("{}", err_line(&e)),
        }
    }
    Ok(())
}

fn tcp_peer(addr: &str) -> TestResult {
    let addr: SocketAddr = addr.parse().ctx("addr")?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ctx("connect")?;
    let peer = s.peer_addr().ctx("getpeername")?;
    let mut id = String::new();
    s.read_to_string(&mut id).ctx("read")?;
    println!("ok {peer} {id}");
    Ok(())
}

fn udp_client(addr: &str, sockets: usize, per_socket: usize) -> TestResult {
    let addr: SocketAddrV4 = addr.parse().ctx("addr")?;
    let mut buf = [0u8; 1500];
    for s in 0..sockets {
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ctx("bind")?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))
            .ctx("timeout")?;
        for i in 0..per_socket {
            let payload = format!("ping-{s}-{i}");
            if let Err(e) = sock.send_to(payload.as_bytes(), addr) {
                println!("{}", err_line(&e));
                continue;
            }
            match sock.recv_from(&mut buf) {
                Ok((len, from)) => {
                    println!("ok {s} {from} {}", String::from_utf8_lossy(&buf[..len]))
                }
                Err(e) => println!("{}", err_line(&e)),
            }
        }
    }
    Ok(())
}

fn udp_connected(addr: &str) -> TestResult {
    let addr: SocketAddrV4 = addr.parse().ctx("addr")?;
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ctx("bind")?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))
        .ctx("timeout")?;
    sock.connect(addr).ctx("connect")?;
    let peer = sock.peer_addr().ctx("getpeername")?;
    sock.send(b"hello").ctx("send")?;
    let mut buf = [0u8; 1500];
    let len = sock.recv(&mut buf).ctx("recv")?;
    println!("ok {peer} {}", String::from_utf8_lossy(&buf[..len]));
    Ok(())
}

/// In a private mount namespace: mount a bpffs on `dir`, load with pinned maps, set a
/// service, drop, load again, and find the service (and the same maps) there.
fn pin_reload(dir: &Path) -> TestResult {
    use std::ffi::CString;
    let root = CString::new("/").expect("cstr");
    let none = CString::new("none").expect("cstr");
    let bpf = CString::new("bpf").expect("cstr");
    let target = CString::new(dir.as_os_str().as_encoded_bytes()).ctx("path")?;
    // SAFETY: valid C strings; making our (private) mount namespace's mounts private so the
    // bpffs mount below never propagates to the host.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    ensure!(
        r == 0,
        "make / private: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::mount(
            none.as_ptr(),
            target.as_ptr(),
            bpf.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    ensure!(r == 0, "mount bpffs: {}", std::io::Error::last_os_error());

    let opts = LoadOptions {
        pin_dir: Some(dir.join("mesh-lb")),
        ..Default::default()
    };
    let first = {
        let mut lb = SockLb::load_with(&opts).ctx("load pinned")?;
        lb.set_service(VIP, 80, Proto::Tcp, &backends(&[9001, 9002]))
            .ctx("set_service")?;
        lb.ids().ctx("ids")?.maps
    };
    for name in ["services", "backends", "revnat"] {
        ensure!(dir.join("mesh-lb").join(name).exists(), "{name} not pinned");
    }
    let mut lb = SockLb::load_with(&opts).ctx("reload pinned")?;
    ensure!(lb.ids().ctx("ids")?.maps == first, "maps were not reused");
    let dump = lb.dump().ctx("dump")?;
    ensure!(
        dump.len() == 1 && dump[0].backends == backends(&[9001, 9002]),
        "after reload: {dump:?}"
    );
    // The reconciler carries on from the map state: adding one backend is an update.
    lb.set_service(VIP, 80, Proto::Tcp, &backends(&[9001, 9002, 9003]))
        .ctx("set_service")?;
    ensure!(lb.dump().ctx("dump")?[0].rev == 2, "rev not carried on");
    drop(lb);
    for name in ["services", "backends", "revnat"] {
        fs::remove_file(dir.join("mesh-lb").join(name)).ctx("unpin")?;
    }
    println!("ok pinned");
    Ok(())
}

// ---------------------------------------------------------------------------
// Runner

fn ci() -> bool {
    std::env::var("CI")
        .map(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false"))
        .unwrap_or(false)
}

/// Ok if the tests can run; otherwise prints why and returns false, or exits 1 in CI.
fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let reason = if unsafe { libc::geteuid() } != 0 {
        Some("needs root".to_string())
    } else if cgroup2_root().is_none() {
        Some("no cgroup v2 hierarchy (socket hooks attach to v2 cgroups only)".to_string())
    } else {
        match SockLb::load() {
            Ok(_) => None,
            Err(e @ LbError::NotBuilt) => Some(e.to_string()),
            // Anything else is a real failure (e.g. the verifier): let the tests show it.
            Err(_) => None,
        }
    };
    let Some(reason) = reason else { return true };
    if ci() {
        eprintln!("error: mesh-lb tests cannot run ({reason}), and CI is set: failing instead of skipping");
        std::process::exit(1);
    }
    eprintln!("skipped: {reason}");
    false
}

type TestFn = fn() -> TestResult;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(CHILD_ARG) {
        std::process::exit(child_main(&args[2..]));
    }
    if !can_run() {
        return;
    }
    let tests: &[(&str, TestFn)] = &[
        (
            "tcp_spreads_and_follows_updates",
            tcp_spreads_and_follows_updates,
        ),
        (
            "updates_under_load_never_refuse",
            updates_under_load_never_refuse,
        ),
        (
            "udp_replies_come_from_the_vip",
            udp_replies_come_from_the_vip,
        ),
        (
            "outside_the_cgroup_is_not_affected",
            outside_the_cgroup_is_not_affected,
        ),
        ("drop_leaves_nothing", drop_leaves_nothing),
        ("pinned_maps_survive_a_reload", pinned_maps_survive_a_reload),
    ];
    mesh_netns::serial::run_serial(tests);
}
