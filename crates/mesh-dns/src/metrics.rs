//! The engine's Prometheus metrics, registered by [`crate::Dns::register_metrics`]:
//!
//! - `mesh_dns_queries_total{type,rcode}`: queries from tasks (UDP and TCP) answered, by
//!   question type (`A`, `AAAA`, `SRV`, `PTR`, `ANY`, `MX`, `TXT`, `CNAME`, else `other`) and
//!   answer code (`NOERROR`, `NXDOMAIN`, `SERVFAIL`, `FORMERR`, `NOTIMP`, `REFUSED`, else
//!   `other`), forwarded ones included;
//! - `mesh_dns_query_duration_seconds`: from receiving a query to its answer being ready
//!   (forwarding included);
//! - the engine's [`crate::Stats`] counters read at scrape time: `mesh_dns_forwarded_total`
//!   (answered by an upstream), `mesh_dns_forward_failures_total`,
//!   `mesh_dns_malformed_total`, `mesh_dns_dropped_total`, `mesh_dns_truncated_total`, and
//!   the gauge `mesh_dns_tasks` (tasks served).
//!
//! `Dns::query` (`mesh dns query`, a diagnostic) is not counted in the first two. Label
//! values come from fixed lists, so the series are bounded (9 types x 7 codes at most).

use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;

/// The labels of `mesh_dns_queries_total`.
pub(crate) type QueryLabels = [(&'static str, &'static str); 2];

/// Live instruments of one engine.
#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    pub queries: Family<QueryLabels, Counter>,
    pub duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            queries: Family::default(),
            // 50 us to ~3.3 s (forwarding gives up after a few seconds).
            duration: Histogram::new(exponential_buckets(0.00005, 2.0, 17)),
        }
    }
}

impl Metrics {
    /// Counts one answered query: `request` is what the client sent, `reply` the answer.
    pub fn observe(&self, request: &[u8], reply: &[u8], started: Instant) {
        self.observe_forwarded(qtype_label(request), reply, started);
    }

    /// [`Metrics::observe`] with the question type read before the request went away.
    pub fn observe_forwarded(&self, qtype: &'static str, reply: &[u8], started: Instant) {
        self.duration.observe(started.elapsed().as_secs_f64());
        let labels = [("type", qtype), ("rcode", rcode_label(reply))];
        self.queries.get_or_create(&labels).inc();
    }
}

/// The question type of a request, read from its wire bytes (`other` when it cannot be).
pub(crate) fn qtype_label(pkt: &[u8]) -> &'static str {
    let mut pos = 12;
    loop {
        let Some(&len) = pkt.get(pos) else {
            return "other";
        };
        if len == 0 {
            pos += 1;
            break;
        }
        if len & 0xc0 == 0xc0 {
            pos += 2;
            break;
        }
        pos += 1 + usize::from(len);
    }
    let Some(t) = pkt.get(pos..pos + 2) else {
        return "other";
    };
    match u16::from_be_bytes([t[0], t[1]]) {
        1 => "A",
        5 => "CNAME",
        12 => "PTR",
        15 => "MX",
        16 => "TXT",
        28 => "AAAA",
        33 => "SRV",
        255 => "ANY",
        _ => "other",
    }
}

/// The answer code of a reply, from its header.
pub(crate) fn rcode_label(reply: &[u8]) -> &'static str {
    match reply.get(3).map(|b| b & 0x0f) {
        Some(0) => "NOERROR",
        Some(1) => "FORMERR",
        Some(2) => "SERVFAIL",
        Some(3) => "NXDOMAIN",
        Some(4) => "NOTIMP",
        Some(5) => "REFUSED",
        _ => "other",
    }
}

/// The engine's [`crate::Stats`] as counters, read at scrape time.
#[derive(Debug)]
pub(crate) struct StatsCollector(pub crate::Dns);

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.stats();
        for (name, help, v) in [
            (
                "dns_forwarded",
                "Queries forwarded to an upstream resolver and answered by it",
                s.forwarded,
            ),
            (
                "dns_forward_failures",
                "Forwarded queries no upstream answered (the client got SERVFAIL)",
                s.forward_failures,
            ),
            (
                "dns_malformed",
                "Packets that did not parse (FORMERR sent, or dropped)",
                s.malformed,
            ),
            (
                "dns_dropped",
                "Packets not answered: responses sent to the engine, over the forwarding or TCP limits",
                s.dropped,
            ),
            (
                "dns_truncated",
                "UDP answers sent truncated for the client's size",
                s.truncated,
            ),
        ] {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v).encode(m)?;
        }
        let m = encoder.encode_descriptor(
            "dns_tasks",
            "Tasks the embedded DNS serves",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(s.registered).unwrap_or(i64::MAX)).encode(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut p = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            p.push(l.len() as u8);
            p.extend_from_slice(l.as_bytes());
        }
        p.push(0);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&[0, 1]);
        p
    }

    #[test]
    fn labels_from_wire_bytes() {
        assert_eq!(qtype_label(&query("web", 1)), "A");
        assert_eq!(qtype_label(&query("tasks.web.appnet", 28)), "AAAA");
        assert_eq!(qtype_label(&query("_http._tcp.web", 33)), "SRV");
        assert_eq!(qtype_label(&query("5.1.0.10.in-addr.arpa", 12)), "PTR");
        assert_eq!(qtype_label(&query("web", 99)), "other");
        assert_eq!(qtype_label(&query("web", 1)[..14]), "other");
        assert_eq!(qtype_label(&[]), "other");
        assert_eq!(rcode_label(&[0, 0, 0x81, 0x83]), "NXDOMAIN");
        assert_eq!(rcode_label(&[0, 0, 0x81, 0x80]), "NOERROR");
        assert_eq!(rcode_label(&[0, 0, 0x81, 0x82]), "SERVFAIL");
        assert_eq!(rcode_label(&[0, 0]), "other");
    }
}
