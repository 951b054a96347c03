//! Protocol behaviour at scale, in the deterministic simulator (virtual time).

use std::time::Duration;

use mesh_gossip::sim::{sim_name, Sim, SimConfig};

const S: Duration = Duration::from_secs(1);

fn formed(n: usize, loss: f64, seed: u64, networks: impl Fn(usize) -> Vec<&'static str>) -> Sim {
    let mut c = SimConfig::new(n);
    c.loss = loss;
    c.seed = seed;
    let mut sim = Sim::new(c);
    for i in 0..n {
        sim.set_networks(i, &networks(i));
    }
    for i in 1..n {
        sim.join(i, &[0]);
        sim.run_for(Duration::from_millis(2));
    }
    let t = sim.run_until_true(30 * S, Duration::from_millis(100), |s| {
        (0..n).all(|i| s.alive_seen_by(i) == n - 1)
    });
    assert!(t.is_some(), "membership did not converge");
    sim.run_for(10 * S); // let network memberships settle (and a push-pull pass)
    sim
}

#[test]
fn entries_reach_exactly_the_network_members() {
    let n = 60;
    let mut sim = formed(n, 0.0, 1, |i| match i {
        0 => vec!["a", "b"],
        i if i % 2 == 0 => vec!["a"],
        _ => vec!["b"],
    });
    let mut worst = Duration::ZERO;
    for k in 0..10 {
        let origin = 2 * (k % 30);
        let t = sim
            .measure_put(origin, "a", "ep", &format!("k{k}"), vec![k as u8], 2 * S)
            .expect("put did not converge");
        worst = worst.max(t);
    }
    println!("60 nodes, 31 in network a: worst put convergence {worst:?}");
    assert!(worst < Duration::from_millis(100));
    for i in 0..n {
        let have = sim.entries(i, "a", "ep").len();
        if i % 2 == 0 {
            assert_eq!(have, 10, "node {i}");
        } else {
            assert_eq!(have, 0, "node {i} holds records of a network it lacks");
        }
        assert_eq!(
            sim.stats(i).out_of_scope,
            0,
            "node {i} was sent out-of-scope records"
        );
    }
    // Delete converges too.
    let t = sim
        .measure_delete(4, "a", "ep", "k2", 2 * S)
        .expect("delete");
    assert!(t < Duration::from_millis(100));
}

#[test]
fn one_percent_loss_still_converges_fast() {
    let n = 200;
    let mut sim = formed(n, 0.01, 2, |_| vec!["net"]);
    let mut times = Vec::new();
    for k in 0..30 {
        let t = sim
            .measure_put(k % n, "net", "ep", &format!("k{k}"), vec![1], 10 * S)
            .expect("put did not converge");
        times.push(t);
        sim.run_for(Duration::from_millis(50 + 37 * (k as u64 % 7)));
    }
    times.sort();
    println!(
        "200 nodes, 1% loss: median {:?}, max {:?}",
        times[15], times[29]
    );
    assert!(times[29] < S, "max {:?}", times[29]);
}

#[test]
fn partition_restart_and_down_nodes() {
    let n = 20;
    let mut sim = formed(n, 0.0, 3, |_| vec!["net"]);
    for i in 0..n {
        sim.put(i, "net", "ep", &format!("ep{i}"), vec![i as u8])
            .unwrap();
    }
    sim.run_for(S);
    assert!((0..n).all(|i| sim.entries(i, "net", "ep").len() == n));

    // Long partition of node 5: declared down, its entries leave the others (and theirs
    // leave it); after the heal everything comes back without any re-put.
    sim.set_partitioned(5, true);
    sim.run_for(15 * S);
    for i in (0..n).filter(|&i| i != 5) {
        let m = sim.members(i);
        assert!(
            m.iter().any(|m| m.id == sim_name(5) && !m.alive),
            "node {i} still sees 5"
        );
        assert!(sim.entries(i, "net", "ep").iter().all(|e| e.key != "ep5"));
    }
    assert!(sim.entries(5, "net", "ep").len() <= 1);
    sim.set_partitioned(5, false);
    let t = sim.run_until_true(20 * S, Duration::from_millis(50), |s| {
        (0..n).all(|i| s.entries(i, "net", "ep").len() == n && s.alive_seen_by(i) == n - 1)
    });
    println!("after a 15 s partition, converged {t:?} after the heal");
    assert!(t.is_some());

    // Crash and immediate restart of node 7 (before anyone notices): the restarted process
    // does not re-put "ep7", so its old entry must disappear everywhere.
    sim.kill(7);
    sim.restart(7, &[0]);
    sim.put(7, "net", "ep", "fresh7", vec![7]).unwrap_err(); // no network declared yet
    sim.set_networks(7, &["net"]);
    sim.put(7, "net", "ep", "fresh7", vec![7]).unwrap();
    let t = sim.run_until_true(10 * S, Duration::from_millis(50), |s| {
        (0..n).all(|i| {
            let e = s.entries(i, "net", "ep");
            e.iter().all(|e| e.key != "ep7") && e.iter().any(|e| e.key == "fresh7")
        })
    });
    assert!(
        t.is_some(),
        "old generation entries linger or new ones are missing"
    );

    // A killed node is detected and its entries removed.
    let t = sim
        .measure_failure_detection(9, 20 * S)
        .expect("not detected");
    println!("20 nodes: failure detected by all in {t:?}");
    sim.run_for(Duration::from_millis(100));
    assert!((0..n)
        .filter(|&i| i != 9)
        .all(|i| sim.entries(i, "net", "ep").iter().all(|e| e.key != "ep9")));
}

#[test]
fn same_seed_same_run() {
    let run = || {
        let mut sim = formed(30, 0.02, 9, |_| vec!["net"]);
        let mut out = Vec::new();
        for k in 0..5 {
            out.push(sim.measure_put(k, "net", "t", &format!("k{k}"), vec![1], 10 * S));
        }
        out.push(sim.measure_failure_detection(29, 20 * S));
        (out, sim.delivered, sim.lost)
    };
    assert_eq!(run(), run());
}

/// Every record received by broadcast counts its convergence lag (its owner's wall clock at
/// the write to this node's at arrival): with a 20 ms one-way latency, no lag is under
/// 20 ms, and each lands in the bucket of the time the put took to reach that node.
#[test]
fn convergence_lag_is_counted_per_received_record() {
    let n = 5;
    let mut c = SimConfig::new(n);
    c.latency = Duration::from_millis(20);
    c.jitter = Duration::ZERO;
    c.seed = 9;
    let mut sim = Sim::new(c);
    for i in 0..n {
        sim.set_networks(i, &["net"]);
    }
    for i in 1..n {
        sim.join(i, &[0]);
    }
    let formed = sim.run_until_true(30 * S, Duration::from_millis(100), |s| {
        (0..n).all(|i| s.alive_seen_by(i) == n - 1)
    });
    assert!(formed.is_some(), "membership did not converge");
    sim.run_for(10 * S);
    let before: Vec<_> = (0..n).map(|i| sim.stats(i)).collect();
    let took = sim
        .measure_put(0, "net", "ep", "k", vec![1], 2 * S)
        .expect("put did not converge");
    sim.run_for(S);
    for (i, b) in before.iter().enumerate().skip(1) {
        let a = sim.stats(i);
        let new: Vec<u64> = (0..a.lag_buckets.len())
            .map(|k| a.lag_buckets[k] - b.lag_buckets[k])
            .collect();
        let count: u64 = new.iter().sum();
        assert_eq!(count, 1, "node {i}: one record, one lag ({new:?})");
        let lag_ms = a.lag_sum_ms - b.lag_sum_ms;
        assert!(
            (20..=took.as_millis() as u64).contains(&lag_ms),
            "node {i}: lag {lag_ms} ms, the put took {took:?} to reach every node"
        );
        let bucket = new.iter().position(|c| *c == 1).unwrap_or_default();
        let bound = mesh_gossip::LAG_BOUNDS[bucket];
        assert!(
            lag_ms as f64 / 1000.0 <= bound
                && (bucket == 0 || lag_ms as f64 / 1000.0 > mesh_gossip::LAG_BOUNDS[bucket - 1]),
            "node {i}: {lag_ms} ms in the bucket up to {bound} s"
        );
    }
    // The writer counts none of its own.
    assert_eq!(sim.stats(0).lag_buckets, before[0].lag_buckets);
}
