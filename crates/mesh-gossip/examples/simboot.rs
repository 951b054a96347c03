use std::time::{Duration, Instant};
use mesh_gossip::sim::{Sim, SimConfig};
fn main() {
    let n: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(500);
    let mut sim = Sim::new(SimConfig::new(n));
    let t = Instant::now();
    for i in 0..n { sim.set_networks(i, &["net"]); }
    for i in 1..n { sim.join(i, &[0]); sim.run_for(Duration::from_millis(2)); }
    for _ in 0..30 {
        sim.run_for(Duration::from_secs(1));
        let alive_ok = (0..n).filter(|&i| sim.alive_seen_by(i) == n - 1).count();
        let mem_ok = (0..n).filter(|&i| sim.memberships_seen_by(i) == n).count();
        let min_alive = (0..n).map(|i| sim.alive_seen_by(i)).min().unwrap();
        let min_mem = (0..n).map(|i| sim.memberships_seen_by(i)).min().unwrap();
        println!("t={:?} alive_ok={alive_ok} (min {min_alive}) mem_ok={mem_ok} (min {min_mem}) wall {:?}", sim.now(), t.elapsed());
        if alive_ok == n && mem_ok == n { break; }
    }

    for k in 0..5 {
        let who = (k * 197) % n;
        let net = format!("x{k}");
        sim.set_networks(who, &["net", &net]);
        let start = sim.now();
        let mut last = 0;
        for step in 0..200 {
            sim.run_for(Duration::from_millis(50));
            let know = (0..n).filter(|&i| sim.members(i).iter().any(|m| m.id == mesh_gossip::sim::sim_name(who) && m.networks.contains(&net))).count();
            last = know;
            if know == n { println!("net {net} known by all after {:?}", sim.now() - start); break; }
            if step == 199 { let miss: Vec<usize> = (0..n).filter(|&i| !sim.members(i).iter().any(|m| m.id == mesh_gossip::sim::sim_name(who) && m.networks.contains(&net))).collect(); println!("net {net} (who={who}) known by {know} after 10s; missing {:?}; their view of who: {:?}", miss, sim.members(miss[0]).iter().find(|m| m.id == mesh_gossip::sim::sim_name(who))); }
        }
        let _ = last;
    }
}
