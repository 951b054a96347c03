//! Helpers shared by the integration tests: sockets, DNS clients, a fake upstream.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use mesh_dns::{Records, ServiceRecord, TaskRecord};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Binds UDP and TCP on `ip`, each on some free port.
pub fn bind_pair(ip: &str) -> (std::net::UdpSocket, std::net::TcpListener) {
    let udp = std::net::UdpSocket::bind((ip, 0)).expect("bind udp");
    let tcp = std::net::TcpListener::bind((ip, 0)).expect("bind tcp");
    (udp, tcp)
}

pub fn query(name: &str, rtype: RecordType, edns: bool) -> Message {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m
}

/// Sends raw bytes over UDP; the first datagram back, if any within `wait`.
pub async fn udp_raw(server: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(bytes, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(wait, sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

pub async fn udp_ask(server: SocketAddr, msg: &Message) -> Message {
    let reply = udp_raw(server, &msg.to_vec().unwrap(), Duration::from_secs(3))
        .await
        .expect("no UDP answer");
    let m = Message::from_vec(&reply).expect("answer parses");
    assert_eq!(m.metadata.id, msg.metadata.id, "answer ID");
    m
}

/// Sends one length-prefixed message on a TCP stream and reads one back.
pub async fn tcp_roundtrip(stream: &mut tokio::net::TcpStream, bytes: &[u8]) -> Option<Vec<u8>> {
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    stream.write_all(&out).await.ok()?;
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(3), stream.read_exact(&mut len))
        .await
        .ok()?
        .ok()?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    stream.read_exact(&mut buf).await.ok()?;
    Some(buf)
}

pub async fn tcp_ask(server: SocketAddr, msg: &Message) -> Message {
    let mut s = tokio::net::TcpStream::connect(server).await.unwrap();
    let reply = tcp_roundtrip(&mut s, &msg.to_vec().unwrap())
        .await
        .expect("no TCP answer");
    let m = Message::from_vec(&reply).unwrap();
    assert_eq!(m.metadata.id, msg.metadata.id);
    m
}

pub fn a_ips(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

pub fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

pub fn nets(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// The cluster used by the tests: network `n-front` ("front") with `web` (VIP, 3 tasks) and
/// `api` (dnsrr, 2 tasks); network `n-back` ("back") with `web` (another VIP, 1 task) and
/// `big` (dnsrr, 200 tasks); network `n-other` ("other") with `secret`.
pub fn cluster(r: &mut Records) {
    r.put_service(
        "n-front",
        ServiceRecord {
            name: "web".into(),
            vip: Some(ip("10.0.1.2")),
            dnsrr: false,
            tasks: vec![
                TaskRecord::new("web.1.aaaaaaaaaaaa0000", "aaaaaaaaaaaa", ip("10.0.1.10")),
                TaskRecord::new("web.2.bbbbbbbbbbbb0000", "bbbbbbbbbbbb", ip("10.0.1.11")),
                TaskRecord::new("web.3.cccccccccccc0000", "cccccccccccc", ip("10.0.1.12")),
            ],
        },
    );
    r.put_service(
        "n-front",
        ServiceRecord {
            name: "api".into(),
            vip: None,
            dnsrr: true,
            tasks: vec![
                TaskRecord::new("api.1.dddddddddddd0000", "dddddddddddd", ip("10.0.1.20")),
                TaskRecord::new("api.2.eeeeeeeeeeee0000", "eeeeeeeeeeee", ip("10.0.1.21")),
            ],
        },
    );
    r.upsert_service("n-back", "web", Some(ip("10.0.2.2")), false);
    r.upsert_task(
        "n-back",
        "web",
        TaskRecord::new("web.1.aaaaaaaaaaaa0000", "aaaaaaaaaaaa", ip("10.0.2.10")),
    );
    r.upsert_service("n-back", "big", None, true);
    r.set_tasks(
        "n-back",
        "big",
        (0..200u32)
            .map(|i| {
                TaskRecord::new(
                    format!("big.{i}.t{i:011}"),
                    format!("t{i:011}"),
                    Ipv4Addr::from(0x0a00_3000 + i),
                )
            })
            .collect(),
    );
    r.upsert_service("n-other", "secret", Some(ip("10.0.9.2")), false);
}

/// A tiny upstream resolver on one loopback address and port (UDP and TCP):
/// - `*.ok.test` A -> 192.0.2.1;
/// - `drop.test` -> never answered;
/// - `fail.test` -> SERVFAIL;
/// - `big.test` -> over UDP an empty truncated answer, over TCP 100 A records.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub udp_hits: Arc<AtomicUsize>,
    pub tcp_hits: Arc<AtomicUsize>,
}

fn upstream_answer(req: &Message, tcp: bool) -> Option<Message> {
    let q = req.queries.first()?.clone();
    let name = q.name().to_ascii().to_ascii_lowercase();
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.recursion_available = true;
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.add_query(q.clone());
    match name.as_str() {
        "drop.test." => return None,
        "fail.test." => resp.metadata.response_code = ResponseCode::ServFail,
        "big.test." if !tcp => resp.metadata.truncation = true,
        "big.test." => {
            for i in 0..100u32 {
                resp.add_answer(Record::from_rdata(
                    q.name().clone(),
                    60,
                    RData::A(A(Ipv4Addr::from(0xc633_6400 + i))),
                ));
            }
        }
        n if n.ends_with(".ok.test.") && q.query_type() == RecordType::A => {
            resp.add_answer(Record::from_rdata(
                q.name().clone(),
                300,
                RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
            ));
        }
        _ => resp.metadata.response_code = ResponseCode::NXDomain,
    }
    Some(resp)
}

impl FakeUpstream {
    pub async fn start(ip: &str) -> FakeUpstream {
        let (udp, tcp) = loop {
            let udp = tokio::net::UdpSocket::bind((ip, 0)).await.unwrap();
            let port = udp.local_addr().unwrap().port();
            if let Ok(tcp) = tokio::net::TcpListener::bind((ip, port)).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let udp_hits = Arc::new(AtomicUsize::new(0));
        let tcp_hits = Arc::new(AtomicUsize::new(0));
        let hits = udp_hits.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            loop {
                let Ok((n, src)) = udp.recv_from(&mut buf).await else {
                    continue;
                };
                hits.fetch_add(1, Ordering::SeqCst);
                let Ok(req) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                if let Some(resp) = upstream_answer(&req, false) {
                    let _ = udp.send_to(&resp.to_vec().unwrap(), src).await;
                }
            }
        });
        let hits = tcp_hits.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = tcp.accept().await else {
                    continue;
                };
                let hits = hits.clone();
                tokio::spawn(async move {
                    let mut len = [0u8; 2];
                    if s.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
                    if s.read_exact(&mut buf).await.is_err() {
                        return;
                    }
                    hits.fetch_add(1, Ordering::SeqCst);
                    let Ok(req) = Message::from_vec(&buf) else {
                        return;
                    };
                    if let Some(resp) = upstream_answer(&req, true) {
                        let bytes = resp.to_vec().unwrap();
                        let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
                        out.extend_from_slice(&bytes);
                        let _ = s.write_all(&out).await;
                    }
                });
            }
        });
        FakeUpstream {
            addr,
            udp_hits,
            tcp_hits,
        }
    }
}
