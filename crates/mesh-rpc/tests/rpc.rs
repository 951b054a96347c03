//! End-to-end tests over loopback TLS.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_ca::{bootstrap_client_config, NodeKey, NodeTls, Role, RootCa};
use mesh_rpc::{call_once, decode_error_count, serve, Client, Handler, Peer, RpcError};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const T: Duration = Duration::from_secs(5);

#[derive(Serialize, Deserialize)]
struct Req {
    msg: String,
    sleep_ms: u64,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Resp {
    msg: String,
    peer: Option<(String, Role)>,
}

struct Echo;

impl Handler<Req, Resp> for Echo {
    async fn handle(&self, peer: Peer, req: Req) -> Resp {
        tokio::time::sleep(Duration::from_millis(req.sleep_ms)).await;
        Resp {
            msg: req.msg,
            peer: peer.map(|p| (p.node_id, p.role)),
        }
    }
}

fn req(msg: &str) -> Req {
    Req {
        msg: msg.into(),
        sleep_ms: 0,
    }
}

fn node_tls(ca: &RootCa, node_id: &str, role: Role) -> NodeTls {
    let key = NodeKey::generate().unwrap();
    let csr = key.csr_pem().unwrap();
    NodeTls {
        ca_cert_pem: ca.cert_pem().to_owned(),
        cert_pem: ca.sign_node_csr(&csr, node_id, role, "c1").unwrap(),
        key_pem: key.key_pem().to_owned(),
    }
}

struct Server {
    addr: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(listener: TcpListener, tls: &NodeTls) -> Server {
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, rx) = watch::channel(false);
        let config = tls.server_config().unwrap();
        let task = tokio::spawn(serve::<Req, Resp, _>(listener, config, Arc::new(Echo), rx));
        Server { addr, stop, task }
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(T, self.task).await.unwrap().unwrap();
    }
}

struct Fixture {
    ca: RootCa,
    server: Server,
    manager: NodeTls,
}

async fn fixture() -> Fixture {
    let ca = RootCa::generate().unwrap();
    let manager = node_tls(&ca, "node-a", Role::Manager);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Server::start(listener, &manager).await;
    Fixture {
        ca,
        server,
        manager,
    }
}

#[tokio::test]
async fn mtls_round_trip_with_peer_identity() {
    let f = fixture().await;
    let worker = node_tls(&f.ca, "node-b", Role::Worker);
    let client = Client::new(f.server.addr.clone(), worker.client_config().unwrap());
    assert_eq!(client.addr(), f.server.addr);
    for i in 0..3 {
        let resp: Resp = client.call(&req(&format!("hi {i}")), T).await.unwrap();
        assert_eq!(resp.msg, format!("hi {i}"));
        assert_eq!(resp.peer, Some(("node-b".into(), Role::Worker)));
    }
    // Clones share one connection; concurrent calls are serialized.
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.call::<_, Resp>(&req(&i.to_string()), T).await })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap().msg, i.to_string());
    }
    f.server.stop().await;
}

#[tokio::test]
async fn bootstrap_peer_is_unauthenticated() {
    let f = fixture().await;
    let tls = bootstrap_client_config(&f.ca.digest()).unwrap();
    let resp: Resp = call_once(&f.server.addr, tls, &req("join"), T)
        .await
        .unwrap();
    assert_eq!(
        resp,
        Resp {
            msg: "join".into(),
            peer: None
        }
    );
    f.server.stop().await;
}

#[tokio::test]
async fn bootstrap_with_wrong_digest_fails() {
    let f = fixture().await;
    let other = RootCa::generate().unwrap();
    let tls = bootstrap_client_config(&other.digest()).unwrap();
    let err = call_once::<_, Resp>(&f.server.addr, tls, &req("join"), T)
        .await
        .unwrap_err();
    assert!(err.is_ca_digest_mismatch(), "{err}");
    assert!(err.to_string().contains("CA digest mismatch"), "{err}");
    f.server.stop().await;
}

#[tokio::test]
async fn foreign_client_cert_is_rejected() {
    let f = fixture().await;
    let other = RootCa::generate().unwrap();
    let mut stranger = node_tls(&other, "node-x", Role::Manager);
    stranger.ca_cert_pem = f.ca.cert_pem().to_owned();
    let client = Client::new(f.server.addr.clone(), stranger.client_config().unwrap());
    let err = client.call::<_, Resp>(&req("x"), T).await.unwrap_err();
    assert!(matches!(err, RpcError::Tls(..)), "{err}");
    f.server.stop().await;
}

/// Opens a TLS connection (bootstrap-pinned), sends raw bytes and expects the
/// server to close the connection.
async fn expect_closed_after(f: &Fixture, bytes: &[u8]) {
    let tcp = TcpStream::connect(&f.server.addr).await.unwrap();
    let connector =
        tokio_rustls::TlsConnector::from(bootstrap_client_config(&f.ca.digest()).unwrap());
    let name = rustls::pki_types::ServerName::try_from(mesh_ca::SERVER_NAME).unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(bytes).await.unwrap();
    tls.flush().await.unwrap();
    let mut buf = Vec::new();
    // Ends (cleanly or not) without a response, well before the timeout.
    let _ = tokio::time::timeout(T, tls.read_to_end(&mut buf))
        .await
        .expect("server kept the connection open");
    assert!(buf.is_empty());
}

#[tokio::test]
async fn bad_peers_do_not_affect_others() {
    let f = fixture().await;
    let client = Client::new(f.server.addr.clone(), f.manager.client_config().unwrap());
    let _: Resp = client.call(&req("before"), T).await.unwrap();

    // A peer that connects and never speaks must not block anyone.
    let _stalled = TcpStream::connect(&f.server.addr).await.unwrap();
    // Garbage instead of a TLS handshake.
    let mut garbage = TcpStream::connect(&f.server.addr).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(T, garbage.read_to_end(&mut buf))
        .await
        .unwrap()
        .ok();

    let errors = decode_error_count();
    // Oversized length prefix.
    expect_closed_after(&f, &u32::MAX.to_be_bytes()).await;
    expect_closed_after(&f, &(64u32 << 20 | 1).to_be_bytes()).await;
    // Invalid JSON, and valid JSON of the wrong shape.
    expect_closed_after(&f, b"\0\0\0\x05{nope").await;
    expect_closed_after(&f, b"\0\0\0\x02[]").await;
    assert!(decode_error_count() >= errors + 4);

    let resp: Resp = client.call(&req("after"), T).await.unwrap();
    assert_eq!(resp.msg, "after");
    let fresh = Client::new(f.server.addr.clone(), f.manager.client_config().unwrap());
    let _: Resp = fresh.call(&req("fresh"), T).await.unwrap();
    f.server.stop().await;
}

#[tokio::test]
async fn client_reconnects_after_server_restart() {
    let f = fixture().await;
    let client = Client::new(f.server.addr.clone(), f.manager.client_config().unwrap());
    let _: Resp = client.call(&req("one"), T).await.unwrap();
    let addr = f.server.addr.clone();
    f.server.stop().await;

    let err = client.call::<_, Resp>(&req("down"), T).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("cannot connect to {addr}: connection refused")),
        "{err}"
    );

    let listener = TcpListener::bind(&addr).await.unwrap();
    let server = Server::start(listener, &f.manager).await;
    let resp: Resp = client.call(&req("two"), T).await.unwrap();
    assert_eq!(resp.msg, "two");

    // Restart again while the client holds an idle connection: the stale
    // connection is noticed and replaced without failing the call.
    server.stop().await;
    let listener = TcpListener::bind(&addr).await.unwrap();
    let server = Server::start(listener, &f.manager).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let resp: Resp = client.call(&req("three"), T).await.unwrap();
    assert_eq!(resp.msg, "three");
    server.stop().await;
}

#[tokio::test]
async fn call_times_out_and_recovers() {
    let f = fixture().await;
    let client = Client::new(f.server.addr.clone(), f.manager.client_config().unwrap());
    let slow = Req {
        msg: "slow".into(),
        sleep_ms: 3000,
    };
    let start = Instant::now();
    let err = client
        .call::<_, Resp>(&slow, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(
        matches!(err, RpcError::Timeout(ref a) if *a == f.server.addr),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    let resp: Resp = client.call(&req("fast"), T).await.unwrap();
    assert_eq!(resp.msg, "fast");

    let tls = f.manager.client_config().unwrap();
    let err = call_once::<_, Resp>(&f.server.addr, tls, &slow, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Timeout(_)), "{err}");
    f.server.stop().await;
}
