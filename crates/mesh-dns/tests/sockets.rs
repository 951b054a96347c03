//! Real DNS packets over real loopback sockets (root namespace, no privileges needed).

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use mesh_dns::{Config, Dns, ForwardConfig, Registration, TaskRecord};

/// An engine with the test cluster, forwarding to `upstreams` with short timeouts.
fn engine(upstreams: Vec<SocketAddr>) -> Dns {
    let mut cfg = Config::new(upstreams);
    cfg.search_domains = vec!["corp.example".into()];
    cfg.forward = ForwardConfig {
        upstream_timeout: Duration::from_millis(300),
        total_timeout: Duration::from_millis(800),
        ..ForwardConfig::default()
    };
    let dns = Dns::with_config(cfg);
    dns.update(cluster);
    dns
}

/// Registers a task on front and back, on sockets bound to `ip`.
fn serve(dns: &Dns, task: &str, ip: &str) -> Registration {
    let (udp, tcp) = bind_pair(ip);
    dns.register(
        task,
        nets(&[("n-front", "front"), ("n-back", "back")]),
        udp,
        tcp,
    )
    .expect("register")
}

#[tokio::test]
async fn udp_answers_every_record_kind() {
    let dns = engine(vec![]);
    let reg = serve(&dns, "t1", "127.0.0.53");
    let srv = reg.udp_addr();

    // SERVICE -> VIP (first network wins), TTL 10, AA+RA, owner keeps the asked case.
    let m = udp_ask(srv, &query("WeB.", RecordType::A, false)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative && m.metadata.recursion_available);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert_eq!(a_ips(&m), vec![ip("10.0.1.2")]);
    assert_eq!(m.answers[0].ttl, 10);
    assert_eq!(m.answers[0].name.to_ascii(), "WeB.");
    assert_eq!(m.queries[0].name().to_ascii(), "WeB.");

    // tasks.SERVICE -> all task IPs, TTL 0.
    let m = udp_ask(srv, &query("tasks.web", RecordType::A, true)).await;
    let got: HashSet<_> = a_ips(&m).into_iter().collect();
    let want: HashSet<_> = ["10.0.1.10", "10.0.1.11", "10.0.1.12"].map(ip).into();
    assert_eq!(got, want);
    assert!(m.answers.iter().all(|r| r.ttl == 0));
    assert!(m.edns.is_some(), "EDNS echoed");

    // dnsrr SERVICE -> task IPs.
    let m = udp_ask(srv, &query("api", RecordType::A, false)).await;
    assert_eq!(a_ips(&m).len(), 2);
    assert!(m.answers.iter().all(|r| r.ttl == 0));

    // Task full name and hostname.
    let m = udp_ask(srv, &query("web.2.bbbbbbbbbbbb0000", RecordType::A, false)).await;
    assert_eq!(a_ips(&m), vec![ip("10.0.1.11")]);
    assert_eq!(m.answers[0].ttl, 5);
    let m = udp_ask(srv, &query("CCCCCCCCCCCC", RecordType::A, false)).await;
    assert_eq!(a_ips(&m), vec![ip("10.0.1.12")]);

    // SERVICE.NETWORK and tasks.SERVICE.NETWORK.
    let m = udp_ask(srv, &query("web.back.", RecordType::A, false)).await;
    assert_eq!(a_ips(&m), vec![ip("10.0.2.2")]);
    let m = udp_ask(srv, &query("tasks.web.back", RecordType::A, false)).await;
    assert_eq!(a_ips(&m), vec![ip("10.0.2.10")]);

    // Search domain appended by the client.
    let m = udp_ask(srv, &query("web.corp.example.", RecordType::A, false)).await;
    assert_eq!(a_ips(&m), vec![ip("10.0.1.2")]);

    // PTR for a task and a VIP.
    let m = udp_ask(
        srv,
        &query("11.1.0.10.in-addr.arpa.", RecordType::PTR, false),
    )
    .await;
    let targets: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
    assert_eq!(targets, vec!["web.2.bbbbbbbbbbbb0000."]);
    assert_eq!(m.answers[0].ttl, 5);
    let m = udp_ask(
        srv,
        &query("2.2.0.10.in-addr.arpa.", RecordType::PTR, false),
    )
    .await;
    assert!(matches!(&m.answers[0].data, RData::PTR(p) if p.0.to_ascii() == "web."));

    // AAAA of an existing name: NOERROR, no records (not NXDOMAIN).
    for name in ["web", "tasks.web", "aaaaaaaaaaaa", "api.front"] {
        let m = udp_ask(srv, &query(name, RecordType::AAAA, false)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
        assert!(m.answers.is_empty(), "{name}");
    }

    // Another network's service is not ours: forwarded, and with no upstream, SERVFAIL.
    let m = udp_ask(srv, &query("secret", RecordType::A, false)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);

    let stats = dns.stats();
    assert_eq!(stats.registered, 1);
    assert_eq!(
        (stats.udp_queries, stats.local_answers),
        (15, 14),
        "{stats:?}"
    );
    assert_eq!(stats.forward_failures, 1);
}

#[tokio::test]
async fn tasks_answers_are_shuffled_over_the_wire() {
    let dns = engine(vec![]);
    let reg = serve(&dns, "t1", "127.0.0.54");
    let mut orders = HashSet::new();
    for _ in 0..40 {
        let m = udp_ask(reg.udp_addr(), &query("tasks.web", RecordType::A, false)).await;
        orders.insert(a_ips(&m));
    }
    assert!(orders.len() > 1, "always the same order: {orders:?}");
    assert!(orders.iter().all(|o| o.len() == 3));
}

#[tokio::test]
async fn tcp_queries_and_truncation() {
    let dns = engine(vec![]);
    let reg = serve(&dns, "t1", "127.0.0.55");

    // Several queries on one TCP connection.
    let mut s = tokio::net::TcpStream::connect(reg.tcp_addr())
        .await
        .unwrap();
    for (name, want) in [("web", "10.0.1.2"), ("web.back", "10.0.2.2")] {
        let q = query(name, RecordType::A, false);
        let reply = tcp_roundtrip(&mut s, &q.to_vec().unwrap()).await.unwrap();
        let m = Message::from_vec(&reply).unwrap();
        assert_eq!(m.metadata.id, q.metadata.id);
        assert_eq!(a_ips(&m), vec![ip(want)]);
    }

    // 200 task IPs do not fit 512 bytes: UDP answer is truncated, TCP has them all.
    let m = udp_ask(reg.udp_addr(), &query("big", RecordType::A, false)).await;
    assert!(m.metadata.truncation);
    assert!(m.answers.is_empty());
    let m = tcp_ask(reg.tcp_addr(), &query("big", RecordType::A, false)).await;
    assert!(!m.metadata.truncation);
    assert_eq!(a_ips(&m).len(), 200);
    // With a large EDNS buffer they fit in UDP too.
    let mut q = query("tasks.big", RecordType::A, true);
    if let Some(e) = q.edns.as_mut() {
        e.set_max_payload(4096);
    }
    let m = udp_ask(reg.udp_addr(), &q).await;
    assert!(!m.metadata.truncation);
    assert_eq!(a_ips(&m).len(), 200);
    assert!(dns.stats().truncated >= 1);
    assert!(dns.stats().tcp_queries >= 3);
}

#[tokio::test]
async fn forwarding_to_upstreams() {
    let up = FakeUpstream::start("127.0.0.60").await;
    let dns = engine(vec![up.addr]);
    let reg = serve(&dns, "t1", "127.0.0.56");
    let srv = reg.udp_addr();

    // Answered by the upstream, with the client's ID and exact question case.
    let m = udp_ask(srv, &query("Www.OK.test.", RecordType::A, true)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(a_ips(&m), vec![ip("192.0.2.1")]);
    assert_eq!(m.answers[0].ttl, 300);
    assert_eq!(m.queries[0].name().to_ascii(), "Www.OK.test.");
    // NXDOMAIN comes back as is.
    let m = udp_ask(srv, &query("nothing.test.", RecordType::A, false)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // A cluster name of a network the task is not on goes upstream too.
    let m = udp_ask(srv, &query("secret", RecordType::A, false)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    // A name the upstream never answers: SERVFAIL within the bound.
    let t0 = Instant::now();
    let m = udp_ask(srv, &query("drop.test.", RecordType::A, false)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
    // SERVFAIL from the upstream is not usable either.
    let m = udp_ask(srv, &query("fail.test.", RecordType::A, false)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);

    // A client asking over TCP is forwarded over TCP.
    let tcp_before = up.tcp_hits.load(Ordering::SeqCst);
    let m = tcp_ask(reg.tcp_addr(), &query("tcp.ok.test.", RecordType::A, false)).await;
    assert_eq!(a_ips(&m), vec![ip("192.0.2.1")]);
    assert_eq!(up.tcp_hits.load(Ordering::SeqCst), tcp_before + 1);

    // Truncated upstream answer: relayed with TC to a UDP client, which retries over TCP.
    let m = udp_ask(srv, &query("big.test.", RecordType::A, false)).await;
    assert!(m.metadata.truncation);
    let m = tcp_ask(reg.tcp_addr(), &query("big.test.", RecordType::A, false)).await;
    assert_eq!(a_ips(&m).len(), 100);
    // The query API retries over TCP itself.
    let a = dns.query(&[], "big.test", "A").await.unwrap();
    assert_eq!(
        (a.rcode.as_str(), a.answers.len(), a.forwarded),
        ("NOERROR", 100, true)
    );

    let stats = dns.stats();
    assert!(stats.forwarded >= 6, "{stats:?}");
    assert_eq!(stats.forward_failures, 2, "{stats:?}");
}

#[tokio::test]
async fn dead_first_upstream_falls_through_and_is_tried_last() {
    // The first upstream swallows queries (bound, never read), the second answers.
    let black_hole = std::net::UdpSocket::bind("127.0.0.61:0").unwrap();
    let dead = black_hole.local_addr().unwrap();
    let up = FakeUpstream::start("127.0.0.62").await;
    let mut cfg = Config::new(vec![dead, up.addr]);
    cfg.forward.upstream_timeout = Duration::from_secs(1);
    let dns = Dns::with_config(cfg);
    let reg = serve(&dns, "t1", "127.0.0.57");
    let t0 = Instant::now();
    let m = udp_ask(reg.udp_addr(), &query("a.ok.test.", RecordType::A, false)).await;
    assert_eq!(a_ips(&m), vec![ip("192.0.2.1")]);
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "waited for the first"
    );
    // Now the dead one is tried last: answers come at once.
    for _ in 0..3 {
        let t0 = Instant::now();
        let m = udp_ask(reg.udp_addr(), &query("b.ok.test.", RecordType::A, false)).await;
        assert_eq!(a_ips(&m), vec![ip("192.0.2.1")]);
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
    }
    assert_eq!(up.udp_hits.load(Ordering::SeqCst), 4);
    assert_eq!(dns.upstreams(), vec![dead, up.addr]);

    // Refused (nothing bound, ICMP port unreachable) fails over at once.
    let closed = {
        let s = std::net::UdpSocket::bind("127.0.0.61:0").unwrap();
        s.local_addr().unwrap()
    };
    let dns2 = engine(vec![closed, up.addr]);
    let reg2 = serve(&dns2, "t1", "127.0.0.57");
    let t0 = Instant::now();
    let m = udp_ask(reg2.udp_addr(), &query("c.ok.test.", RecordType::A, false)).await;
    assert_eq!(a_ips(&m), vec![ip("192.0.2.1")]);
    assert!(
        t0.elapsed() < Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );
    drop(black_hole);

    // 127.0.0.11 is never an upstream (a loop).
    let dns = Dns::new(vec!["127.0.0.11:53".parse().unwrap()]);
    assert!(dns.upstreams().is_empty());
}

#[tokio::test]
async fn malformed_packets_are_survived() {
    let dns = engine(vec![]);
    let reg = serve(&dns, "t1", "127.0.0.58");
    let srv = reg.udp_addr();
    let short = Duration::from_millis(300);

    // Too short for a header: dropped.
    assert!(udp_raw(srv, &[0x12, 0x34, 0x01], short).await.is_none());
    assert!(udp_raw(srv, &[], short).await.is_none());
    // Header only, qdcount = 5: FORMERR with the same ID.
    let pkt = [0xab, 0xcd, 0x01, 0x00, 0x00, 0x05, 0, 0, 0, 0, 0, 0];
    let reply = udp_raw(srv, &pkt, Duration::from_secs(2))
        .await
        .expect("FORMERR");
    let m = Message::from_vec(&reply).unwrap();
    assert_eq!(m.metadata.id, 0xabcd);
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // A query cut in the middle of its name.
    let mut cut = query("web", RecordType::A, false).to_vec().unwrap();
    cut.truncate(15);
    let reply = udp_raw(srv, &cut, Duration::from_secs(2))
        .await
        .expect("FORMERR");
    assert_eq!(
        Message::from_vec(&reply).unwrap().metadata.response_code,
        ResponseCode::FormErr
    );
    // No question at all: FORMERR.
    let pkt = [0x00, 0x07, 0x01, 0x00, 0, 0, 0, 0, 0, 0, 0, 0];
    let reply = udp_raw(srv, &pkt, Duration::from_secs(2))
        .await
        .expect("FORMERR");
    assert_eq!(
        Message::from_vec(&reply).unwrap().metadata.response_code,
        ResponseCode::FormErr
    );
    // A response sent to us: dropped (no reflection).
    let mut resp = query("web", RecordType::A, false);
    resp.metadata.message_type = MessageType::Response;
    assert!(udp_raw(srv, &resp.to_vec().unwrap(), short).await.is_none());
    // Random garbage: answered FORMERR or dropped, never crashing the server.
    let mut x: u32 = 0x1234_5678;
    for len in [1usize, 7, 12, 13, 40, 300, 1500] {
        let pkt: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let _ = udp_raw(srv, &pkt, Duration::from_millis(100)).await;
    }
    // Malformed over TCP: FORMERR on the same connection, which keeps working.
    let mut s = tokio::net::TcpStream::connect(reg.tcp_addr())
        .await
        .unwrap();
    let pkt = [0xab, 0xce, 0x01, 0x00, 0x00, 0x05, 0, 0, 0, 0, 0, 0];
    let reply = tcp_roundtrip(&mut s, &pkt).await.unwrap();
    assert_eq!(
        Message::from_vec(&reply).unwrap().metadata.response_code,
        ResponseCode::FormErr
    );
    let reply = tcp_roundtrip(
        &mut s,
        &query("web", RecordType::A, false).to_vec().unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(
        a_ips(&Message::from_vec(&reply).unwrap()),
        vec![ip("10.0.1.2")]
    );

    // Still serving.
    let m = udp_ask(srv, &query("web", RecordType::A, false)).await;
    assert_eq!(a_ips(&m), vec![ip("10.0.1.2")]);
    let stats = dns.stats();
    assert!(stats.malformed >= 6, "{stats:?}");
    assert!(stats.dropped >= 1, "{stats:?}");
}

#[tokio::test]
async fn updates_are_seen_at_once_and_scoped_per_task() {
    let dns = engine(vec![]);
    let front_and_back = serve(&dns, "t1", "127.0.0.59");
    let (udp, tcp) = bind_pair("127.0.0.59");
    let other_only = dns
        .register("t2", nets(&[("n-other", "other")]), udp, tcp)
        .unwrap();

    // The other task sees only its network.
    let m = udp_ask(
        other_only.udp_addr(),
        &query("secret", RecordType::A, false),
    )
    .await;
    assert_eq!(a_ips(&m), vec![ip("10.0.9.2")]);
    let m = udp_ask(other_only.udp_addr(), &query("web", RecordType::A, false)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);

    // Scale web down to one task: the next answer has one IP.
    dns.update(|r| {
        r.remove_task("n-front", "web", "web.2.bbbbbbbbbbbb0000");
        r.remove_task("n-front", "web", "web.3.cccccccccccc0000");
    });
    let m = udp_ask(
        front_and_back.udp_addr(),
        &query("tasks.web", RecordType::A, false),
    )
    .await;
    assert_eq!(a_ips(&m), vec![ip("10.0.1.10")]);
    let m = udp_ask(
        front_and_back.udp_addr(),
        &query("bbbbbbbbbbbb", RecordType::A, false),
    )
    .await;
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::ServFail,
        "gone, so forwarded"
    );
    // Scale to zero on front: the next network with tasks of that name answers...
    dns.update(|r| r.set_tasks("n-front", "web", vec![]));
    let m = udp_ask(
        front_and_back.udp_addr(),
        &query("tasks.web", RecordType::A, false),
    )
    .await;
    assert_eq!(a_ips(&m), vec![ip("10.0.2.10")]);
    // ...and on front alone the service still exists: NOERROR, empty, never NXDOMAIN.
    let m = udp_ask(
        front_and_back.udp_addr(),
        &query("tasks.web.front", RecordType::A, false),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(a_ips(&m).is_empty());
    dns.update(|r| {
        r.upsert_task(
            "n-front",
            "web",
            TaskRecord::new("web.4.ffffffffffff0000", "ffffffffffff", ip("10.0.1.14")),
        )
    });
    let m = udp_ask(
        front_and_back.udp_addr(),
        &query("ffffffffffff", RecordType::A, false),
    )
    .await;
    assert_eq!(a_ips(&m), vec![ip("10.0.1.14")]);

    // A task attached to a new network sees it.
    assert!(dns.set_networks("t2", nets(&[("n-other", "other"), ("n-front", "front")])));
    let m = udp_ask(other_only.udp_addr(), &query("web", RecordType::A, false)).await;
    assert_eq!(a_ips(&m), vec![ip("10.0.1.2")]);
}

#[tokio::test]
async fn unregistering_closes_the_sockets() {
    let dns = engine(vec![]);
    let reg = serve(&dns, "t1", "127.0.0.63");
    let (udp_addr, tcp_addr) = (reg.udp_addr(), reg.tcp_addr());
    let m = udp_ask(udp_addr, &query("web", RecordType::A, false)).await;
    assert_eq!(a_ips(&m), vec![ip("10.0.1.2")]);
    drop(reg);
    assert_eq!(dns.stats().registered, 0);
    // The tasks are aborted asynchronously; the sockets close once they are dropped.
    let mut rebound = None;
    for _ in 0..50 {
        if let (Ok(u), Ok(t)) = (
            std::net::UdpSocket::bind(udp_addr),
            std::net::TcpListener::bind(tcp_addr),
        ) {
            rebound = Some((u, t));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (udp, tcp) = rebound.expect("sockets were released");
    // Re-registering (same task id) on the same addresses works, and replaces.
    let reg = dns
        .register("t1", nets(&[("n-back", "back")]), udp, tcp)
        .unwrap();
    let m = udp_ask(reg.udp_addr(), &query("web", RecordType::A, false)).await;
    assert_eq!(a_ips(&m), vec![ip("10.0.2.2")]);
    let (udp, tcp) = bind_pair("127.0.0.63");
    let reg2 = dns
        .register("t1", nets(&[("n-front", "front")]), udp, tcp)
        .unwrap();
    assert_eq!(dns.registered(), vec!["t1".to_string()]);
    // The replaced registration's guard no longer removes the new one.
    drop(reg);
    assert_eq!(dns.stats().registered, 1);
    assert!(dns.unregister("t1"));
    assert!(!dns.unregister("t1"));
    drop(reg2);
}

#[test]
fn register_outside_a_runtime_is_an_error() {
    let dns = Dns::new(vec![]);
    let (udp, tcp) = bind_pair("127.0.0.1");
    assert!(matches!(
        dns.register("t", vec![], udp, tcp),
        Err(mesh_dns::DnsError::NoRuntime)
    ));
}

#[tokio::test]
async fn queries_are_counted_by_type_and_rcode() {
    // No upstream: a name that is not ours is SERVFAIL.
    let dns = engine(vec![]);
    let reg = serve(&dns, "t1", "127.0.0.71");
    let srv = reg.udp_addr();
    for (name, rtype, rcode) in [
        ("web", RecordType::A, ResponseCode::NoError),
        ("web", RecordType::AAAA, ResponseCode::NoError),
        ("tasks.web", RecordType::A, ResponseCode::NoError),
        ("outside.example", RecordType::A, ResponseCode::ServFail),
    ] {
        let m = udp_ask(srv, &query(name, rtype, false)).await;
        assert_eq!(m.metadata.response_code, rcode, "{name} {rtype}");
    }
    let m = tcp_ask(reg.tcp_addr(), &query("web", RecordType::A, false)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    // The API's queries (`mesh dns query`) are not the tasks': not counted.
    dns.query(&nets(&[("n-front", "front")]), "web", "A")
        .await
        .unwrap();

    let mut registry = prometheus_client::registry::Registry::with_prefix("mesh");
    dns.register_metrics(&mut registry);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
    for line in [
        "# TYPE mesh_dns_queries counter",
        "mesh_dns_queries_total{type=\"A\",rcode=\"NOERROR\"} 3",
        "mesh_dns_queries_total{type=\"AAAA\",rcode=\"NOERROR\"} 1",
        "mesh_dns_queries_total{type=\"A\",rcode=\"SERVFAIL\"} 1",
        "# TYPE mesh_dns_query_duration_seconds histogram",
        "# UNIT mesh_dns_query_duration_seconds seconds",
        "mesh_dns_query_duration_seconds_count 5",
        "mesh_dns_forwarded_total 0",
        "mesh_dns_forward_failures_total 1",
        "mesh_dns_tasks 1",
    ] {
        assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
    }
    drop(reg);
}
