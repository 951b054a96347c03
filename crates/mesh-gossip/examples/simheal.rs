use std::time::Duration;
use mesh_gossip::sim::{Sim, SimConfig};
const S: Duration = Duration::from_secs(1);
fn main() {
    let n = 20;
    let mut c = SimConfig::new(n); c.seed = 3;
    let mut sim = Sim::new(c);
    for i in 0..n { sim.set_networks(i, &["net"]); }
    for i in 1..n { sim.join(i, &[0]); sim.run_for(Duration::from_millis(2)); }
    sim.run_for(10 * S);
    for i in 0..n { sim.put(i, "net", "ep", &format!("ep{i}"), vec![i as u8]).unwrap(); }
    sim.run_for(S);
    println!("before: ents {:?}", (0..n).map(|i| sim.entries(i, "net", "ep").len()).collect::<Vec<_>>());
    sim.record_events();
    sim.set_partitioned(5, true);
    sim.run_for(15 * S);
    println!("during: node5 sees {} alive; node0 sees {}", sim.alive_seen_by(5), sim.alive_seen_by(0));
    println!("during: ents {:?}", (0..n).map(|i| sim.entries(i, "net", "ep").len()).collect::<Vec<_>>());
    for (i, e) in sim.take_events() { if i == 0 { println!("   ev {i}: {:?}", e); } }
    sim.set_partitioned(5, false);
    for k in 0..20 {
        sim.run_for(S);
        let alive: Vec<usize> = (0..n).map(|i| sim.alive_seen_by(i)).collect();
        let ents: Vec<usize> = (0..n).map(|i| sim.entries(i, "net", "ep").len()).collect();
        println!("t+{k}s alive {:?}\n       ents {:?} st5 {:?}", alive, ents, sim.stats(5));
        for (i, e) in sim.take_events() { if i == 5 || i == 0 { println!("   ev {i}: {:?}", e); } }
    }
}
