use std::time::Duration;
use mesh_gossip::sim::{Sim, SimConfig};
fn main() {
    let n = 100;
    let mut c = SimConfig::new(n);
    c.loss = 0.01;
    let mut sim = Sim::new(c);
    sim.bootstrap(&["net"], Duration::from_millis(2), Duration::from_secs(120));
    sim.run_for(Duration::from_secs(2));
    for i in 0..6 {
        let key = format!("k{i}");
        sim.put(i % n, "net", "ep", &key, vec![1]).unwrap();
        let before: Vec<u64> = (0..n).map(|j| sim.stats(j).udp_in).collect();
        for step in 0..10 {
            sim.run_for(Duration::from_millis(50));
            let q: usize = (0..n).filter(|&j| sim.queued(j) > 0).count();
            let missing: Vec<usize> = (0..n).filter(|&j| sim.entries(j, "net", "ep").iter().all(|e| e.key != key)).collect();
            println!("{key} t={}ms q={q} missing={:?} tp={} d={:?} st={:?}", (step+1)*50, missing, sim.table_packets, missing.iter().map(|&m| sim.stats(m).udp_in - before[m]).collect::<Vec<_>>(), missing.first().map(|&m| sim.stats(m)));
        }
    }
}
