//! Sealed gossip on real sockets (loopback): nodes holding the cluster keys form a cluster
//! and replicate across a key rotation; a node without them, or with other keys, neither
//! reads nor injects; tampered packets are dropped and counted.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use mesh_gossip::{Config, Gossip, Key};

const NET: &str = "blue";
const TABLE: &str = "endpoints";

fn key(id: u32, fill: u8) -> Key {
    Key {
        id,
        secret: [fill; 32],
    }
}

async fn node(name: &str, keys: &[Key]) -> Gossip {
    let mut c = Config::new(name, "127.0.0.1:0".parse().unwrap(), "cluster");
    c.probe_period = Duration::from_millis(300);
    c.probe_timeout = Duration::from_millis(150);
    c.gossip_interval = Duration::from_millis(100);
    c.push_pull_interval = Duration::from_secs(1);
    c.encrypt = true;
    let g = Gossip::start(c).await.unwrap();
    g.set_keys(keys);
    g.set_networks([NET.to_string()].into_iter().collect::<BTreeSet<_>>())
        .await;
    g
}

async fn has(g: &Gossip, key: &str, value: &[u8]) -> bool {
    g.entries(NET, TABLE)
        .await
        .iter()
        .any(|e| e.key == key && e.value == value)
}

async fn eventually(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < timeout, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_key_holders_gossip_and_tampering_is_counted() {
    let k1 = key(1, 0x11);
    let a = node("a", std::slice::from_ref(&k1)).await;
    let b = node("b", std::slice::from_ref(&k1)).await;
    // c has no key yet: it cannot even join.
    let c = node("c", &[]).await;
    assert!(c.join(&[a.local_addr()]).await.is_err());
    assert!(c.stats().no_key > 0);
    b.join(&[a.local_addr()]).await.unwrap();
    a.put(NET, TABLE, "ep-a", b"1".to_vec()).await.unwrap();
    eventually("b reads a's entry", Duration::from_secs(5), async || {
        has(&b, "ep-a", b"1").await
    })
    .await;

    // An intruder with a made-up key under the same ID: nothing of its reaches a or b.
    let evil = node("evil", &[key(1, 0x66)]).await;
    evil.put(NET, TABLE, "ep-evil", b"x".to_vec())
        .await
        .unwrap();
    assert!(evil.join(&[a.local_addr()]).await.is_err());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(a.stats().bad_tag > 0, "{:?}", a.stats());
    assert!(!has(&a, "ep-evil", b"x").await);
    assert!(evil
        .entries(NET, TABLE)
        .await
        .iter()
        .all(|e| e.key == "ep-evil"));

    // A packet of a's, seen on the wire, with one bit flipped: dropped and counted. One
    // under a key ID b does not hold: dropped and counted apart. A plain one: refused.
    let ring = mesh_gossip::Keyring::new(std::slice::from_ref(&k1));
    let good = ring.seal(b"MG\x01\x02 not even a valid body").unwrap();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let before = b.stats();
    let mut flipped = good.clone();
    flipped[30] ^= 0x04;
    sock.send_to(&flipped, b.local_addr()).await.unwrap();
    let other = mesh_gossip::Keyring::new(&[key(9, 0x11)])
        .seal(b"MG\x01\x02")
        .unwrap();
    sock.send_to(&other, b.local_addr()).await.unwrap();
    sock.send_to(b"MG\x01\x01plain", b.local_addr())
        .await
        .unwrap();
    eventually(
        "b counts the bad packets",
        Duration::from_secs(2),
        async || {
            let s = b.stats();
            s.bad_tag > before.bad_tag
                && s.unknown_key > before.unknown_key
                && s.unsealed > before.unsealed
        },
    )
    .await;

    // Rotation: b gets key 2 first and seals with it at once; a still reads b only once it
    // has key 2 too, and b still reads a (key 1 stays in its ring).
    let k2 = key(2, 0x22);
    b.set_keys(&[k1.clone(), k2.clone()]);
    b.put(NET, TABLE, "ep-b", b"2".to_vec()).await.unwrap();
    a.put(NET, TABLE, "ep-a2", b"3".to_vec()).await.unwrap();
    eventually(
        "b reads a under the old key",
        Duration::from_secs(5),
        async || has(&b, "ep-a2", b"3").await,
    )
    .await;
    a.set_keys(&[k1.clone(), k2.clone()]);
    eventually(
        "a reads b under the new key",
        Duration::from_secs(5),
        async || has(&a, "ep-b", b"2").await,
    )
    .await;
    // The late node gets the keys and joins.
    c.set_keys(&[k1, k2]);
    c.join(&[a.local_addr()]).await.unwrap();
    eventually("c reads both", Duration::from_secs(5), async || {
        has(&c, "ep-b", b"2").await && has(&c, "ep-a", b"1").await
    })
    .await;
    for g in [a, b, c, evil] {
        g.abort().await;
    }
}

/// A node that joins while its peer cannot take it yet (the peer's keys, or its member
/// filter, lag behind this node's) joins once the peer can: one refused attempt does not
/// leave it alone for good (the restart-gap test saw a node's routing mesh never learn the
/// others' tasks after its only join attempt fell in that window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_refused_at_first_is_tried_again() {
    let k1 = key(1, 0x21);
    let a = node("a", &[]).await;
    let b = node("b", std::slice::from_ref(&k1)).await;
    let (b2, peer) = (b.clone(), a.local_addr());
    let joining =
        tokio::spawn(async move { b2.join_retrying(&[peer], Duration::from_millis(200)).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!joining.is_finished(), "joined a peer that has no key");
    a.set_keys(std::slice::from_ref(&k1));
    tokio::time::timeout(Duration::from_secs(5), joining)
        .await
        .expect("the join was not tried again")
        .unwrap()
        .unwrap();
    eventually("a knows b", Duration::from_secs(5), async || {
        a.members().await.iter().any(|m| m.id == b.node_id())
    })
    .await;
}
