//! Real sockets on loopback: nodes on 127.0.0.1 with distinct (kernel-chosen) ports.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_gossip::{Config, Entry, Event, Gossip, GossipError};
use tokio::sync::broadcast;

const NET: &str = "blue";
const TABLE: &str = "endpoints";

/// Test timing: faster probes than the defaults, so detection takes ~2 s.
fn cfg(name: &str, key: &str) -> Config {
    let mut c = Config::new(name, "127.0.0.1:0".parse().unwrap(), key);
    c.probe_period = Duration::from_millis(300);
    c.probe_timeout = Duration::from_millis(150);
    c.gossip_interval = Duration::from_millis(100);
    c.push_pull_interval = Duration::from_secs(2);
    c
}

fn nets(n: &[&str]) -> BTreeSet<String> {
    n.iter().map(|s| s.to_string()).collect()
}

/// Polls `f` every 10 ms until it holds; the time it took, or `None` after `timeout`.
async fn wait_for<F, Fut>(timeout: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return Some(start.elapsed());
        }
        if start.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits for an event matching `pred`.
async fn wait_event(
    rx: &mut broadcast::Receiver<Event>,
    timeout: Duration,
    pred: impl Fn(&Event) -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    let r = tokio::time::timeout(timeout, async {
        loop {
            match rx.recv().await {
                Ok(e) if pred(&e) => return true,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return false,
            }
        }
    })
    .await;
    matches!(r, Ok(true)).then(|| start.elapsed())
}

async fn alive_count(g: &Gossip) -> usize {
    g.members().await.iter().skip(1).filter(|m| m.alive).count()
}

/// Starts `names.len()` nodes, all joining the first, and waits until all see each other.
async fn cluster(names: &[&str], key: &str, tweak: impl Fn(&mut Config)) -> Vec<Gossip> {
    let mut nodes = Vec::new();
    for n in names {
        let mut c = cfg(n, key);
        tweak(&mut c);
        nodes.push(Gossip::start(c).await.unwrap());
    }
    let seed = nodes[0].local_addr();
    for n in &nodes[1..] {
        n.join(&[seed]).await.unwrap();
    }
    let want = names.len() - 1;
    for n in &nodes {
        let n = n.clone();
        let t = wait_for(Duration::from_secs(10), || {
            let n = n.clone();
            async move { alive_count(&n).await == want }
        })
        .await;
        assert!(t.is_some(), "{} did not see every node alive", n.node_id());
    }
    nodes
}

fn has(entries: &[Entry], key: &str, value: &[u8]) -> bool {
    entries.iter().any(|e| e.key == key && e.value == value)
}

async fn wait_entry(
    g: &Gossip,
    network: &str,
    key: &str,
    value: &[u8],
    timeout: Duration,
) -> Option<Duration> {
    wait_for(timeout, || {
        let g = g.clone();
        let (network, key, value) = (network.to_string(), key.to_string(), value.to_vec());
        async move { has(&g.entries(&network, TABLE).await, &key, &value) }
    })
    .await
}

async fn wait_gone(g: &Gossip, network: &str, key: &str, timeout: Duration) -> Option<Duration> {
    wait_for(timeout, || {
        let g = g.clone();
        let (network, key) = (network.to_string(), key.to_string());
        async move {
            g.entries(&network, TABLE)
                .await
                .iter()
                .all(|e| e.key != key)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_replicate_only_within_the_network() {
    let names = ["n0", "n1", "n2", "n3", "n4"];
    let nodes = cluster(&names, "c-scope", |_| {}).await;
    // n0..n3 have blue (n0 also red); n4 only red.
    for (i, n) in nodes.iter().enumerate() {
        let set = match i {
            0 => nets(&[NET, "red"]),
            4 => nets(&["red"]),
            _ => nets(&[NET]),
        };
        n.set_networks(set).await;
    }
    // Everyone learns everyone's networks.
    for n in &nodes {
        let n = n.clone();
        let ok = wait_for(Duration::from_secs(5), || {
            let n = n.clone();
            async move {
                let m = n.members().await;
                m.len() == 5 && m.iter().all(|m| !m.networks.is_empty())
            }
        })
        .await;
        assert!(ok.is_some(), "{} did not learn the networks", n.node_id());
    }
    let mut rx: Vec<_> = nodes.iter().map(Gossip::subscribe).collect();

    let start = Instant::now();
    nodes[1]
        .put(NET, TABLE, "ep1", b"10.0.0.2".to_vec())
        .await
        .unwrap();
    let mut worst = Duration::ZERO;
    for i in [0, 2, 3] {
        let t = wait_event(&mut rx[i], Duration::from_secs(2), |e| {
            matches!(e, Event::Upsert { key, value, owner, .. }
                if key == "ep1" && value == b"10.0.0.2" && owner == "n1")
        })
        .await;
        assert!(t.is_some(), "n{i} did not get the put within 2 s");
        worst = worst.max(start.elapsed());
    }
    println!("put on n1 reached n0, n2, n3 in {worst:?}");
    assert!(worst < Duration::from_secs(2));
    for n in &nodes[..4] {
        assert!(has(&n.entries(NET, TABLE).await, "ep1", b"10.0.0.2"));
    }

    // Delete propagates.
    let start = Instant::now();
    nodes[1].delete(NET, TABLE, "ep1").await.unwrap();
    for i in [0, 2, 3] {
        let t = wait_event(
            &mut rx[i],
            Duration::from_secs(2),
            |e| matches!(e, Event::Delete { key, .. } if key == "ep1"),
        )
        .await;
        assert!(t.is_some(), "n{i} did not get the delete within 2 s");
    }
    println!("delete on n1 reached n0, n2, n3 in {:?}", start.elapsed());

    // Red: n4 and n0 only.
    nodes[4]
        .put("red", TABLE, "r1", b"x".to_vec())
        .await
        .unwrap();
    assert!(
        wait_entry(&nodes[0], "red", "r1", b"x", Duration::from_secs(2))
            .await
            .is_some()
    );

    // Writes to a network the node does not have are refused.
    let err = nodes[2]
        .put("red", TABLE, "nope", vec![1])
        .await
        .unwrap_err();
    assert!(matches!(err, GossipError::Table(_)), "{err}");
    assert_eq!(err.to_string(), "no such network on this node: red");
    // Only the owner deletes.
    assert!(nodes[0].delete("red", TABLE, "r1").await.is_err());

    // n4 never holds, nor is ever sent, a blue record; n1..n3 never a red one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(nodes[4].entries(NET, TABLE).await.is_empty());
    while let Ok(e) = rx[4].try_recv() {
        if let Event::Upsert { network, .. } | Event::Delete { network, .. } = &e {
            assert_eq!(network, "red", "n4 saw {e:?}");
        }
    }
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(
            n.stats().out_of_scope,
            0,
            "n{i} was sent records of a network it lacks"
        );
        assert_eq!(n.stats().malformed, 0);
    }
    for n in &nodes[1..4] {
        assert!(n.entries("red", TABLE).await.is_empty());
    }

    // Leaving a network drops its table (with delete events).
    nodes[0].set_networks(nets(&[NET])).await;
    assert!(nodes[0].entries("red", TABLE).await.is_empty());
    let t = wait_event(
        &mut rx[0],
        Duration::from_secs(1),
        |e| matches!(e, Event::Delete { network, key, .. } if network == "red" && key == "r1"),
    )
    .await;
    assert!(t.is_some());
    for n in &nodes {
        n.leave().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_is_detected_and_restarted_node_rejoins() {
    let nodes = cluster(&["k0", "k1", "k2"], "c-kill", |_| {}).await;
    for n in &nodes {
        n.set_networks(nets(&[NET])).await;
    }
    nodes[2]
        .put(NET, TABLE, "ep-k2", b"old".to_vec())
        .await
        .unwrap();
    for n in &nodes[..2] {
        assert!(wait_entry(n, NET, "ep-k2", b"old", Duration::from_secs(3))
            .await
            .is_some());
    }
    let mut rx: Vec<_> = nodes.iter().map(Gossip::subscribe).collect();
    let addr2 = nodes[2].local_addr();

    // Kill k2: no leave, tasks aborted, sockets closed.
    let start = Instant::now();
    nodes[2].abort().await;
    for (i, rx) in rx.iter_mut().enumerate().take(2) {
        let t = wait_event(
            rx,
            Duration::from_secs(10),
            |e| matches!(e, Event::NodeDown { id } if id == "k2"),
        )
        .await;
        assert!(t.is_some(), "k{i} did not detect k2 down");
    }
    println!("k2 detected down by both in {:?}", start.elapsed());
    for n in &nodes[..2] {
        assert!(
            n.entries(NET, TABLE).await.is_empty(),
            "k2's entries must go with it"
        );
        let m = n.members().await;
        assert!(m.iter().any(|m| m.id == "k2" && !m.alive));
    }

    // Restart with the same name and address: a new generation, rejoins at once.
    let mut c = cfg("k2", "c-kill");
    c.bind = addr2;
    c.advertise = addr2;
    let k2 = Gossip::start(c).await.unwrap();
    k2.join(&[nodes[0].local_addr()]).await.unwrap();
    k2.set_networks(nets(&[NET])).await;
    k2.put(NET, TABLE, "ep-k2", b"new".to_vec()).await.unwrap();
    for i in 0..2 {
        let t = wait_event(
            &mut rx[i],
            Duration::from_secs(5),
            |e| matches!(e, Event::NodeUp { id, .. } if id == "k2"),
        )
        .await;
        assert!(t.is_some(), "k{i} did not see k2 back");
        assert!(
            wait_entry(&nodes[i], NET, "ep-k2", b"new", Duration::from_secs(3))
                .await
                .is_some()
        );
    }
    // And the restarted node gets the others' entries.
    nodes[0]
        .put(NET, TABLE, "ep-k0", b"v".to_vec())
        .await
        .unwrap();
    assert!(wait_entry(&k2, NET, "ep-k0", b"v", Duration::from_secs(3))
        .await
        .is_some());
    k2.leave().await;
    for n in &nodes[..2] {
        n.leave().await;
    }
}

/// A restarted node rejoins its network with only its own records: `synced` says when the
/// others' are in (its first push-pull with a member), and `Event::Synced` comes after the
/// events of what that brought.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_learns_when_its_tables_are_complete() {
    let nodes = cluster(&["s0", "s1", "s2"], "c-synced", |_| {}).await;
    for n in &nodes {
        n.set_networks(nets(&[NET])).await;
    }
    for (i, n) in nodes.iter().enumerate() {
        n.put(NET, TABLE, &format!("ep-s{i}"), b"v".to_vec())
            .await
            .unwrap();
    }
    for n in &nodes {
        for i in 0..3 {
            assert!(
                wait_entry(n, NET, &format!("ep-s{i}"), b"v", Duration::from_secs(3))
                    .await
                    .is_some()
            );
        }
        // Having the entries is not being synced: that takes a push-pull covering the
        // network (the one on joining it, or its follow-up a second later).
        let synced = wait_for(Duration::from_secs(5), || {
            let n = n.clone();
            async move { n.synced().await == nets(&[NET]) }
        })
        .await;
        assert!(synced.is_some(), "{} never synced {NET}", n.node_id());
    }
    let addr2 = nodes[2].local_addr();
    nodes[2].abort().await;
    let mut c = cfg("s2", "c-synced");
    c.bind = addr2;
    c.advertise = addr2;
    let s2 = Gossip::start(c).await.unwrap();
    let mut rx = s2.subscribe();
    s2.join(&[nodes[0].local_addr()]).await.unwrap();
    s2.set_networks(nets(&[NET, "solo"])).await;
    s2.put(NET, TABLE, "ep-s2", b"v".to_vec()).await.unwrap();
    // Nobody else has "solo": synced at once. NET waits for a member's tables.
    let (mut upserts, mut synced_at) = (BTreeSet::new(), None);
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match rx.recv().await {
                Ok(Event::Upsert { network, key, .. }) if network == NET => {
                    upserts.insert(key);
                }
                Ok(Event::Synced { network }) if network == NET => {
                    synced_at = Some(upserts.clone());
                    return;
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    })
    .await;
    assert!(got.is_ok(), "s2 never synced {NET}");
    let seen = synced_at.expect("synced");
    // The others' entries (s2's own, put after joining the network, may come after).
    for k in ["ep-s0", "ep-s1"] {
        assert!(seen.contains(k), "{k} not reported before Synced: {seen:?}");
    }
    assert_eq!(s2.synced().await, nets(&[NET, "solo"]));
    assert_eq!(s2.entries(NET, TABLE).await.len(), 3);
    s2.leave().await;
    for n in &nodes[..2] {
        n.leave().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_of_another_cluster_are_dropped_and_counted() {
    let nodes = cluster(&["f0", "f1"], "cluster-a", |_| {}).await;
    let stranger = Gossip::start(cfg("x0", "cluster-b")).await.unwrap();
    let err = stranger.join(&[nodes[0].local_addr()]).await.unwrap_err();
    assert!(matches!(err, GossipError::JoinFailed(_)), "{err}");
    // Its announce (UDP) and push-pull (TCP) were both refused as foreign.
    let ok = wait_for(Duration::from_secs(3), || {
        let n = nodes[0].clone();
        async move { n.stats().foreign >= 2 }
    })
    .await;
    assert!(ok.is_some(), "stats: {:?}", nodes[0].stats());
    assert_eq!(alive_count(&nodes[0]).await, 1);
    assert!(nodes[0].members().await.iter().all(|m| m.id != "x0"));
    stranger.leave().await;
    for n in &nodes {
        n.leave().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_partition_heals_through_push_pull() {
    // Long suspicion: the cut-off node is not declared down, so only anti-entropy can
    // bring back what it missed.
    let nodes = cluster(&["p0", "p1", "p2"], "c-part", |c| {
        c.suspicion_mult = 20;
        c.push_pull_interval = Duration::from_secs(1);
    })
    .await;
    for n in &nodes {
        n.set_networks(nets(&[NET])).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = nodes[2].stats().syncs;
    nodes[2].set_isolated(true);
    nodes[0]
        .put(NET, TABLE, "during-0", b"a".to_vec())
        .await
        .unwrap();
    nodes[2]
        .put(NET, TABLE, "during-2", b"b".to_vec())
        .await
        .unwrap();
    // Longer than the table gossip rounds: the updates are dropped for good.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(nodes[2]
        .entries(NET, TABLE)
        .await
        .iter()
        .all(|e| e.key != "during-0"));
    assert!(nodes[1]
        .entries(NET, TABLE)
        .await
        .iter()
        .all(|e| e.key != "during-2"));
    nodes[2].set_isolated(false);
    let start = Instant::now();
    assert!(
        wait_entry(&nodes[2], NET, "during-0", b"a", Duration::from_secs(5))
            .await
            .is_some()
    );
    assert!(
        wait_entry(&nodes[0], NET, "during-2", b"b", Duration::from_secs(5))
            .await
            .is_some()
    );
    assert!(
        wait_entry(&nodes[1], NET, "during-2", b"b", Duration::from_secs(5))
            .await
            .is_some()
    );
    println!(
        "tables converged {:?} after the partition healed",
        start.elapsed()
    );
    assert!(nodes[2].stats().syncs > before);
    for n in &nodes {
        n.leave().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_partition_renews_identity_and_reannounces() {
    let nodes = cluster(&["r0", "r1", "r2"], "c-renew", |_| {}).await;
    for n in &nodes {
        n.set_networks(nets(&[NET])).await;
    }
    for (i, n) in nodes.iter().enumerate() {
        n.put(NET, TABLE, &format!("ep-r{i}"), vec![i as u8])
            .await
            .unwrap();
    }
    for n in &nodes {
        for i in 0..3 {
            assert!(wait_entry(
                n,
                NET,
                &format!("ep-r{i}"),
                &[i as u8],
                Duration::from_secs(3)
            )
            .await
            .is_some());
        }
    }
    let mut rx0 = nodes[0].subscribe();
    nodes[2].set_isolated(true);
    // Declared down on both sides: r2's entries leave r0 and r1, and theirs leave r2.
    let t = wait_event(
        &mut rx0,
        Duration::from_secs(10),
        |e| matches!(e, Event::NodeDown { id } if id == "r2"),
    )
    .await;
    assert!(t.is_some(), "r2 not declared down");
    assert!(wait_gone(&nodes[0], NET, "ep-r2", Duration::from_secs(1))
        .await
        .is_some());
    assert!(wait_gone(&nodes[2], NET, "ep-r0", Duration::from_secs(10))
        .await
        .is_some());
    nodes[2].set_isolated(false);
    let start = Instant::now();
    for (i, n) in nodes.iter().enumerate() {
        for k in 0..3 {
            let t = wait_entry(
                n,
                NET,
                &format!("ep-r{k}"),
                &[k as u8],
                Duration::from_secs(15),
            )
            .await;
            assert!(t.is_some(), "r{i} lacks ep-r{k} after the heal");
        }
    }
    println!(
        "all entries back everywhere {:?} after the heal",
        start.elapsed()
    );
    for n in &nodes {
        let n2 = n.clone();
        let t = wait_for(Duration::from_secs(10), || {
            let n = n2.clone();
            async move { alive_count(&n).await == 2 }
        })
        .await;
        assert!(
            t.is_some(),
            "{} does not see both others alive",
            n.node_id()
        );
    }
    for n in &nodes {
        n.leave().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_sockets_is_counted_not_fatal() {
    let nodes = cluster(&["g0", "g1"], "c-garbage", |_| {}).await;
    let target: SocketAddr = nodes[0].local_addr();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut x: u64 = 0x1234_5678;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut sent = 0;
    for i in 0..500 {
        let len = (next() % 1600) as usize;
        let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if i % 2 == 0 && buf.len() >= 12 {
            // Valid magic and version, random rest: exercises the deeper decoders.
            buf[..3].copy_from_slice(b"MG\x01");
        }
        sock.send_to(&buf, target).await.unwrap();
        sent += 1;
        if i % 10 == 0 {
            // Pace the flood so the receive buffer does not overflow.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    // One junk stream at a time (the node answers at most 8 push-pulls at once and refuses
    // the rest): each ends when the node closes the connection on it.
    for _ in 0..20 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(target).await.unwrap();
        let junk: Vec<u8> = (0..(next() % 300)).map(|_| next() as u8).collect();
        let _ = s.write_all(&junk).await;
        let _ = s.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
    }
    let ok = wait_for(Duration::from_secs(5), || {
        let n = nodes[0].clone();
        async move {
            let s = n.stats();
            s.malformed + s.foreign >= sent + 20
        }
    })
    .await;
    println!("after garbage: {:?}", nodes[0].stats());
    assert!(
        ok.is_some(),
        "not all garbage was counted: {:?}",
        nodes[0].stats()
    );
    // Still works.
    for n in &nodes {
        n.set_networks(nets(&[NET])).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    nodes[1]
        .put(NET, TABLE, "after", b"ok".to_vec())
        .await
        .unwrap();
    assert!(
        wait_entry(&nodes[0], NET, "after", b"ok", Duration::from_secs(3))
            .await
            .is_some()
    );
    for n in &nodes {
        n.leave().await;
    }
}
