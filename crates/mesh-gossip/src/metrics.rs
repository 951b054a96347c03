//! The gossip layer's Prometheus metrics: its [`Stats`] as counters (and two gauges), for
//! the daemon to encode at scrape time from the running node's counters
//! ([`crate::Gossip::stats`]). The counters restart from zero with a new gossip node (a
//! node that left and joined again), which Prometheus' `rate` takes as a reset.
//!
//! | metric | type | from |
//! |---|---|---|
//! | `mesh_gossip_members` | gauge | this node and the others alive in its view |
//! | `mesh_gossip_packets_received_total`, `mesh_gossip_packets_sent_total` | counter | UDP packets |
//! | `mesh_gossip_received_bytes_total`, `mesh_gossip_sent_bytes_total` | counter | UDP bytes |
//! | `mesh_gossip_pushpull_total{direction="in\|out"}` | counter | push-pull connections |
//! | `mesh_gossip_syncs_total`, `mesh_gossip_sync_failures_total` | counter | push-pull exchanges |
//! | `mesh_gossip_dropped_total{reason}` | counter | packets or streams dropped: `malformed`, `foreign` (another cluster), `bad_tag`, `unknown_key`, `unsealed`, `out_of_scope` (records of a network not held) |
//! | `mesh_gossip_unsent_total` | counter | packets not sent for want of a key |
//! | `mesh_gossip_convergence_lag_seconds` | histogram | per table record received by broadcast: from its write on the owner to its arrival here (the two wall clocks; skew between hosts adds in) |

use prometheus_client::encoding::NoLabelSet;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use crate::stats::LAG_BOUNDS;
use crate::Stats;

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(v).encode(m)
}

/// Encodes `stats` (names relative to the registry's `mesh` prefix); call it from a
/// `prometheus_client` collector.
pub fn encode(stats: &Stats, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let m = encoder.encode_descriptor(
        "gossip_members",
        "Gossip members alive in this node's view, itself included",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(i64::try_from(stats.alive_peers.saturating_add(1)).unwrap_or(i64::MAX))
        .encode(m)?;
    counter(
        encoder,
        "gossip_packets_received",
        "Gossip UDP packets received (dropped ones included)",
        stats.udp_in,
    )?;
    counter(
        encoder,
        "gossip_packets_sent",
        "Gossip UDP packets sent",
        stats.udp_out,
    )?;
    counter(
        encoder,
        "gossip_received_bytes",
        "Gossip UDP bytes received",
        stats.bytes_in,
    )?;
    counter(
        encoder,
        "gossip_sent_bytes",
        "Gossip UDP bytes sent",
        stats.bytes_out,
    )?;
    {
        let mut m = encoder.encode_descriptor(
            "gossip_pushpull",
            "Push-pull connections accepted (in) and opened (out)",
            None,
            MetricType::Counter,
        )?;
        for (dir, v) in [("in", stats.tcp_in), ("out", stats.tcp_out)] {
            ConstCounter::new(v).encode(m.encode_family(&[("direction", dir)])?)?;
        }
    }
    counter(
        encoder,
        "gossip_syncs",
        "Push-pull exchanges merged (both directions)",
        stats.syncs,
    )?;
    counter(
        encoder,
        "gossip_sync_failures",
        "Push-pull exchanges that failed (connect, timeout, bad stream)",
        stats.sync_failures,
    )?;
    {
        let mut m = encoder.encode_descriptor(
            "gossip_dropped",
            "Gossip packets or streams dropped, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, v) in [
            ("malformed", stats.malformed),
            ("foreign", stats.foreign),
            ("bad_tag", stats.bad_tag),
            ("unknown_key", stats.unknown_key),
            ("unsealed", stats.unsealed),
            ("out_of_scope", stats.out_of_scope),
        ] {
            ConstCounter::new(v).encode(m.encode_family(&[("reason", reason)])?)?;
        }
    }
    counter(
        encoder,
        "gossip_unsent",
        "Gossip packets or push-pulls not sent for want of a key",
        stats.no_key,
    )?;
    let m = encoder.encode_descriptor(
        "gossip_convergence_lag",
        "Time from a table record's write on its owner to its arrival here by broadcast",
        Some(&Unit::Seconds),
        MetricType::Histogram,
    )?;
    let buckets: Vec<(f64, u64)> = LAG_BOUNDS
        .iter()
        .copied()
        // The encoder's mark for the `+Inf` bucket.
        .chain([f64::MAX])
        .zip(stats.lag_buckets)
        .collect();
    let count = stats.lag_buckets.iter().sum();
    let sum = stats.lag_sum_ms as f64 / 1000.0;
    let mut m = m;
    m.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::collector::Collector;
    use prometheus_client::registry::Registry;

    #[derive(Debug)]
    struct C(Stats);

    impl Collector for C {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            encode(&self.0, &mut encoder)
        }
    }

    #[test]
    fn stats_encode_as_counters() {
        let mut r = Registry::with_prefix("mesh");
        r.register_collector(Box::new(C(Stats {
            udp_in: 7,
            bad_tag: 2,
            alive_peers: 2,
            tcp_out: 1,
            lag_buckets: [0, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            lag_sum_ms: 120_070,
            ..Stats::default()
        })));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        for line in [
            "mesh_gossip_members 3",
            "# TYPE mesh_gossip_packets_received counter",
            "mesh_gossip_packets_received_total 7",
            "mesh_gossip_dropped_total{reason=\"bad_tag\"} 2",
            "mesh_gossip_pushpull_total{direction=\"out\"} 1",
            "# TYPE mesh_gossip_convergence_lag_seconds histogram",
            "mesh_gossip_convergence_lag_seconds_sum 120.07",
            "mesh_gossip_convergence_lag_seconds_count 4",
            "mesh_gossip_convergence_lag_seconds_bucket{le=\"0.01\"} 0",
            "mesh_gossip_convergence_lag_seconds_bucket{le=\"0.025\"} 1",
            "mesh_gossip_convergence_lag_seconds_bucket{le=\"0.05\"} 3",
            "mesh_gossip_convergence_lag_seconds_bucket{le=\"30.0\"} 3",
            "mesh_gossip_convergence_lag_seconds_bucket{le=\"+Inf\"} 4",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
    }
}
