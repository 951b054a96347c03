//! The engine serving inside a real network namespace (needs root: skipped otherwise, but
//! failing when CI=true).

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use mesh_dns::{bind_in_netns, Dns, DnsError, DNS_ADDR};

/// Whether the test can run; panics when it must (CI) but cannot.
fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("this test needs root (network namespaces) and CI=true");
    }
    eprintln!("skipping: needs root to create a network namespace");
    false
}

/// A named network namespace (`ip netns add`), deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Netns {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let name = format!("meshdns-{}-{nanos}", std::process::id());
        ip(&["netns", "add", &name]);
        Netns { name }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    fn lo_up(&self) {
        ip(&["-n", &self.name, "link", "set", "lo", "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

/// Runs `f` on a fresh thread inside the namespace at `path` (the thread then exits, so
/// no other code ever runs in the wrong namespace).
fn in_netns<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = File::open(path).expect("open netns");
    std::thread::spawn(move || {
        // SAFETY: a valid namespace fd; only this short-lived thread changes namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread")
}

/// A blocking UDP and TCP query to 127.0.0.11:53 from the current namespace.
fn ask_both(msg: &Message) -> (Message, Message) {
    let bytes = msg.to_vec().unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    udp.send_to(&bytes, DNS_ADDR).unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, from) = udp
        .recv_from(&mut buf)
        .expect("UDP answer inside the namespace");
    assert_eq!(from, DNS_ADDR);
    let udp_answer = Message::from_vec(&buf[..n]).unwrap();

    let mut tcp = TcpStream::connect_timeout(&DNS_ADDR, Duration::from_secs(3)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&bytes);
    tcp.write_all(&out).unwrap();
    let mut len = [0u8; 2];
    tcp.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
    tcp.read_exact(&mut body).unwrap();
    (udp_answer, Message::from_vec(&body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_127_0_0_11_inside_a_namespace() {
    if !privileged() {
        return;
    }
    let ns = Netns::create();
    let path = ns.path();

    // 127.0.0.11 is bindable even with lo down, but nothing reaches it until lo is up.
    ns.lo_up();
    let (udp, tcp) = bind_in_netns(&path).expect("bind in netns");
    assert_eq!(udp.local_addr().unwrap(), DNS_ADDR);
    assert_eq!(tcp.local_addr().unwrap(), DNS_ADDR);

    let dns = Dns::new(vec![]);
    dns.update(cluster);
    let reg = dns
        .register("t-ns", nets(&[("n-front", "front")]), udp, tcp)
        .expect("register");

    let q = query("web", RecordType::A, false);
    let (u, t) = {
        let q = q.clone();
        let path = path.clone();
        tokio::task::spawn_blocking(move || in_netns(&path, move || ask_both(&q)))
            .await
            .unwrap()
    };
    for m in [&u, &t] {
        assert_eq!(m.metadata.id, q.metadata.id);
        assert_eq!(a_ips(m), vec![common::ip("10.0.1.2")]);
    }
    let q = query("tasks.web.front.", RecordType::A, false);
    let (u, _) = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || in_netns(&path, move || ask_both(&q)))
            .await
            .unwrap()
    };
    assert_eq!(a_ips(&u).len(), 3);
    // Not a name the task can see, no upstreams: SERVFAIL from inside as well.
    let q = query("secret", RecordType::A, false);
    let (u, t) = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || in_netns(&path, move || ask_both(&q)))
            .await
            .unwrap()
    };
    assert_eq!(u.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(t.metadata.response_code, ResponseCode::ServFail);

    // Unregistering frees 127.0.0.11:53 in the namespace.
    drop(reg);
    let mut again = None;
    for _ in 0..50 {
        if let Ok(pair) = bind_in_netns(&path) {
            again = Some(pair);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        again.is_some(),
        "127.0.0.11:53 still bound after unregister"
    );
}

#[test]
fn missing_namespace_is_a_clear_error() {
    let err = bind_in_netns(Path::new("/nonexistent/ns/net")).unwrap_err();
    assert!(matches!(err, DnsError::OpenNetns { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/ns/net"));
    let _: SocketAddr = DNS_ADDR;
}
