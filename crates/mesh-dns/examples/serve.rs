//! Serves a small demo record set on an address of your choice, forwarding other names to
//! the host's resolvers, for poking at the engine with `dig`:
//!
//! ```text
//! cargo run -p mesh-dns --example serve -- 127.0.0.53:5353
//! dig @127.0.0.53 -p 5353 tasks.web
//! ```

use std::net::{Ipv4Addr, SocketAddr};

use mesh_dns::{Config, Dns, ResolvConf, ServiceRecord, TaskRecord};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.53:5353".into())
        .parse()?;
    let host = ResolvConf::read_host().unwrap_or_default();
    let mut cfg = Config::new(host.nameservers);
    cfg.search_domains = host.search;
    let dns = Dns::with_config(cfg);
    dns.update(|r| {
        r.put_service(
            "net1",
            ServiceRecord {
                name: "web".into(),
                vip: Some(Ipv4Addr::new(10, 0, 1, 2)),
                dnsrr: false,
                tasks: (1..=3u8)
                    .map(|i| {
                        TaskRecord::new(
                            format!("web.{i}.task{i}00000000000"),
                            format!("task{i}0000000"),
                            Ipv4Addr::new(10, 0, 1, 10 + i),
                        )
                    })
                    .collect(),
            },
        );
    });
    let udp = std::net::UdpSocket::bind(addr)?;
    let tcp = std::net::TcpListener::bind(addr)?;
    let _reg = dns.register("demo", vec![("net1".into(), "appnet".into())], udp, tcp)?;
    println!(
        "serving on {addr}, upstreams {:?}; Ctrl-C to stop",
        dns.upstreams()
    );
    tokio::signal::ctrl_c().await?;
    println!("{:?}", dns.stats());
    Ok(())
}
