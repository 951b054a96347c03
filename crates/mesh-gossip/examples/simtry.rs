use std::time::{Duration, Instant};
use mesh_gossip::sim::{Sim, SimConfig};
fn main() {
    let n: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(5);
    let loss: f64 = std::env::args().nth(2).map(|s| s.parse().unwrap()).unwrap_or(0.0);
    let mut c = SimConfig::new(n);
    c.loss = loss;
    let mut sim = Sim::new(c);
    let t = Instant::now();
    let b = sim.bootstrap(&["net"], Duration::from_millis(2), Duration::from_secs(120));
    println!("bootstrap {:?} virtual, {:?} wall", b, t.elapsed());
    sim.run_for(Duration::from_secs(2));
    let t = Instant::now();
    let mut puts = vec![];
    for i in 0..20 {
        let d = sim.measure_put(i % n, "net", "ep", &format!("k{i}"), vec![1, 2, 3], Duration::from_secs(30));
        puts.push(d);
        sim.run_for(Duration::from_millis(137));
    }
    println!("puts {:?}\n wall {:?}", puts, t.elapsed());
    let mut dels = vec![];
    for i in 0..5 {
        dels.push(sim.measure_delete(i % n, "net", "ep", &format!("k{i}"), Duration::from_secs(30)));
    }
    println!("dels {:?}", dels);
    let t = Instant::now();
    let fd = sim.measure_failure_detection(n - 1, Duration::from_secs(60));
    println!("fd {:?} wall {:?}; delivered {} lost {}", fd, t.elapsed(), sim.delivered, sim.lost);
    println!("stats0 {:?}", sim.stats(0));
}
