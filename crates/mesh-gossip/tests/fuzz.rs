//! Fuzz-style robustness: thousands of random and mutated packets into the UDP and TCP
//! decoders (deterministic PRNG). Nothing may panic; garbage is counted, not applied.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_gossip::core::{Core, Output};
use mesh_gossip::stats::Counters;
use mesh_gossip::wire;
use mesh_gossip::Config;

/// xorshift64*: small and deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn core(name: &str, port: u16, key: &str) -> (Core, Arc<Counters>) {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut cfg = Config::new(name, addr, key);
    cfg.generation = Some(u64::from(port));
    let counters = Arc::new(Counters::default());
    (
        Core::new(cfg, counters.clone(), Duration::ZERO, u64::from(port)),
        counters,
    )
}

/// Valid packets and push-pull streams from a small exchange between two cores.
fn corpus() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let (mut a, _) = core("a", 1001, "fuzz");
    let (mut b, _) = core("b", 1002, "fuzz");
    let nets: BTreeSet<String> = ["n1".to_string(), "n2".to_string()].into();
    let mut packets = Vec::new();
    let mut t = Duration::ZERO;
    a.set_networks(&nets, t);
    b.set_networks(&nets, t);
    b.join(&["127.0.0.1:1001".parse().unwrap()], t);
    let req = b.sync_request();
    let resp = a.handle_sync_request(req.clone(), t);
    b.handle_sync_response(resp.clone(), t);
    let mut streams = vec![
        wire::encode_sync(&req, a.tag()),
        wire::encode_sync(&resp, a.tag()),
    ];
    for i in 0..20 {
        t += Duration::from_millis(100);
        a.put("n1", "ep", &format!("k{i}"), vec![i as u8; i * 7], t)
            .unwrap();
        if i % 3 == 0 {
            a.delete("n1", "ep", &format!("k{}", i / 2), t).unwrap();
        }
        a.poll(t);
        b.poll(t);
        // Shuttle packets both ways, keeping a copy of each.
        for _ in 0..3 {
            for (from, to) in [(0, 1), (1, 0)] {
                let outs = if from == 0 {
                    a.take_outputs()
                } else {
                    b.take_outputs()
                };
                for o in outs {
                    if let Output::Udp { data, .. } = o {
                        packets.push(data.clone());
                        if to == 1 {
                            b.handle_udp(&data, t);
                        } else {
                            a.handle_udp(&data, t);
                        }
                    }
                }
            }
        }
    }
    let resp = a.handle_sync_request(b.sync_request(), t);
    streams.push(wire::encode_sync(&resp, a.tag()));
    assert!(
        packets.iter().any(|p| p[3] == 1),
        "no SWIM packet in the corpus"
    );
    assert!(
        packets.iter().any(|p| p[3] == 2),
        "no table packet in the corpus"
    );
    (packets, streams)
}

fn mutate(rng: &mut Rng, src: &[u8]) -> Vec<u8> {
    let mut p = src.to_vec();
    match rng.below(6) {
        0 => {
            // flip a few bytes (past the header, to reach the body decoders)
            for _ in 0..1 + rng.below(4) {
                if p.len() > 12 {
                    let i = 12 + rng.below(p.len() - 12);
                    p[i] ^= 1 << rng.below(8);
                }
            }
        }
        1 => p.truncate(rng.below(p.len() + 1)),
        2 => {
            let n = 1 + rng.below(64);
            let extra = rng.bytes(n);
            p.extend(extra);
        }
        3 => {
            // overwrite a run with random bytes
            if !p.is_empty() {
                let i = rng.below(p.len());
                let n = rng.below(p.len() - i + 1);
                let junk = rng.bytes(n);
                p[i..i + n].copy_from_slice(&junk);
            }
        }
        4 => {
            // a large length prefix somewhere
            if p.len() > 16 {
                let i = 12 + rng.below(p.len() - 16);
                p[i..i + 4].copy_from_slice(&[0xff, 0xff, 0xff, 0x0f]);
            }
        }
        _ => {
            // splice with another part of itself
            let i = rng.below(p.len() + 1);
            let tail = p[..i].to_vec();
            p.extend(tail);
        }
    }
    p
}

#[test]
fn random_udp_packets_are_counted_as_malformed() {
    let (mut c, counters) = core("victim", 2001, "fuzz");
    c.set_networks(&["n1".to_string()].into(), Duration::ZERO);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let n = 5000;
    for i in 0..n {
        let len = rng.below(1600);
        let mut p = rng.bytes(len);
        if i % 2 == 0 && p.len() > 3 {
            p[..3].copy_from_slice(b"MG\x01"); // pass the magic check, fail later
        }
        c.handle_udp(&p, Duration::from_millis(i as u64));
        c.poll(Duration::from_millis(i as u64));
    }
    let s = counters.snapshot();
    println!("random udp: {s:?}");
    assert_eq!(s.udp_in, n as u64);
    assert_eq!(
        s.malformed + s.foreign,
        n as u64,
        "every random packet is dropped"
    );
    assert!(c.entries("n1", "ep").is_empty());
}

#[test]
fn mutated_valid_packets_never_panic() {
    let (packets, _) = corpus();
    let (mut c, counters) = core("victim", 2002, "fuzz");
    c.set_networks(&["n1".to_string(), "n2".to_string()].into(), Duration::ZERO);
    let mut rng = Rng(42);
    let n = 20_000;
    for i in 0..n {
        let k = rng.below(packets.len());
        let p = mutate(&mut rng, &packets[k]);
        let now = Duration::from_millis(i as u64);
        c.handle_udp(&p, now);
        c.poll(now);
        let _ = c.take_outputs();
    }
    let s = counters.snapshot();
    println!("mutated udp ({} seeds): {s:?}", packets.len());
    assert_eq!(s.udp_in, n as u64);
    assert!(
        s.malformed > n as u64 / 4,
        "most mutations must be caught: {s:?}"
    );
    // Unmutated packets of another cluster are foreign.
    let (mut other, oc) = core("other", 2003, "another-cluster");
    for p in &packets {
        other.handle_udp(p, Duration::ZERO);
    }
    assert_eq!(oc.snapshot().foreign, packets.len() as u64);
}

#[test]
fn random_and_mutated_push_pull_streams_never_panic() {
    let (_, streams) = corpus();
    let (mut c, _) = core("victim", 2004, "fuzz");
    c.set_networks(&["n1".to_string()].into(), Duration::ZERO);
    let tag = c.tag();
    let mut rng = Rng(7);
    let (mut ok, mut bad) = (0, 0);
    for i in 0..5000 {
        let data = if i % 5 == 0 {
            let len = rng.below(4096);
            rng.bytes(len)
        } else {
            let k = rng.below(streams.len());
            mutate(&mut rng, &streams[k])
        };
        match wire::decode_sync(&data, tag) {
            Ok(state) => {
                ok += 1;
                let _ = c.handle_sync_request(state, Duration::from_millis(i));
                let _ = c.take_outputs();
            }
            Err(_) => bad += 1,
        }
    }
    println!("push-pull streams: {ok} decoded, {bad} rejected");
    assert!(bad > 2500);
    for s in &streams {
        assert!(wire::decode_sync(s, tag).is_ok());
        assert_eq!(
            wire::decode_sync(s, wire::cluster_tag("another-cluster")),
            Err(wire::Reject::Foreign)
        );
    }
}
