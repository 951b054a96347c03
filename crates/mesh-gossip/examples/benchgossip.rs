//! Temporary: builds bench/src/gossip.rs as it will be built inside mesh-bench.
#[path = "../../../bench/src/gossip.rs"]
mod gossip;
#[path = "../../../bench/src/report.rs"]
#[allow(dead_code)]
mod report;
#[path = "../../../bench/src/stats.rs"]
#[allow(dead_code)]
mod stats;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let _ = gossip::ABOUT;
    println!("{}", gossip::run(&args)?);
    Ok(())
}
